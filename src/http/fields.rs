//! Field-value grammar shared by requests and responses: tokens, lists, Content-Length.

/// `tchar` from RFC 9110 §5.6.2, the alphabet of field names and methods.
pub(crate) fn is_tchar(b: u8) -> bool {
    TCHAR[usize::from(b)]
}

/// One lookup per byte: every response header name is checked against it.
static TCHAR: [bool; 256] = {
    let mut table = [false; 256];
    let mut b = 0;
    while b < 256 {
        let c = b as u8;
        table[b] = c.is_ascii_alphanumeric()
            || matches!(
                c,
                b'!' | b'#'
                    | b'$'
                    | b'%'
                    | b'&'
                    | b'\''
                    | b'*'
                    | b'+'
                    | b'-'
                    | b'.'
                    | b'^'
                    | b'_'
                    | b'`'
                    | b'|'
                    | b'~'
            );
        b += 1;
    }
    table
};

pub(crate) fn is_token(s: &[u8]) -> bool {
    !s.is_empty() && s.iter().all(|&b| is_tchar(b))
}

/// Whether `v` can be written as a field value without breaking the message: no CR/LF/NUL or
/// other controls that would let an application inject lines (HTAB and obs-text are allowed).
pub(crate) fn is_field_value(v: &[u8]) -> bool {
    const ONES: u64 = u64::from_ne_bytes([0x01; 8]);
    const HIGHS: u64 = u64::from_ne_bytes([0x80; 8]);
    const SPACES: u64 = u64::from_ne_bytes([0x20; 8]);
    const DELS: u64 = u64::from_ne_bytes([0x7f; 8]);
    // Eight bytes at a time while none is a control: every response header value passes
    // here. A word holding one (HTAB, most likely) is checked byte by byte.
    let mut words = v.chunks_exact(8);
    for word in &mut words {
        let w = u64::from_le_bytes(word.try_into().unwrap_or([0; 8]));
        // Bytes below 0x20 (obs-text, 0x80 and up, is not flagged), then bytes equal to DEL.
        let below_space = w.wrapping_sub(SPACES) & !w & HIGHS;
        let x = w ^ DELS;
        let del = x.wrapping_sub(ONES) & !x & HIGHS;
        if (below_space | del) != 0 && !word.iter().all(|&b| is_value_byte(b)) {
            return false;
        }
    }
    words.remainder().iter().all(|&b| is_value_byte(b))
}

fn is_value_byte(b: u8) -> bool {
    b == b'\t' || (b >= 0x20 && b != 0x7f)
}

pub(crate) fn trim_ows(v: &[u8]) -> &[u8] {
    v.trim_ascii()
}

/// The non-empty, trimmed members of a comma-separated list.
pub(crate) fn list_members(v: &[u8]) -> impl Iterator<Item = &[u8]> {
    v.split(|&b| b == b',')
        .map(trim_ows)
        .filter(|m| !m.is_empty())
}

pub(crate) fn has_token(v: &[u8], token: &str) -> bool {
    list_members(v).any(|m| m.eq_ignore_ascii_case(token.as_bytes()))
}

/// Folds one Content-Length field line into the value seen so far.
///
/// Repeats of the same number (`5, 5` or two `5` lines) are harmless and accepted; anything
/// else that could make two parties disagree about the body's end is an error.
pub(crate) fn merge_content_length(
    seen: Option<u64>,
    value: &[u8],
) -> Result<Option<u64>, &'static str> {
    let mut seen = seen;
    for member in value.split(|&b| b == b',').map(trim_ows) {
        let n = parse_decimal(member).ok_or("invalid Content-Length")?;
        if seen.is_some_and(|prev| prev != n) {
            return Err("conflicting Content-Length values");
        }
        seen = Some(n);
    }
    Ok(seen)
}

fn parse_decimal(digits: &[u8]) -> Option<u64> {
    if digits.is_empty() {
        return None;
    }
    digits.iter().try_fold(0u64, |acc, &b| {
        let d = (b as char).to_digit(10)?;
        acc.checked_mul(10)?.checked_add(u64::from(d))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_length_values() {
        let ok: &[(&[u8], u64)] = &[
            (b"0", 0),
            (b"5", 5),
            (b"005", 5),
            (b" 5 ", 5),
            (b"5, 5", 5),
            (b"5,5,5", 5),
            (b"18446744073709551615", u64::MAX),
        ];
        for &(v, n) in ok {
            assert_eq!(merge_content_length(None, v), Ok(Some(n)), "{v:?}");
        }
        let bad: &[&[u8]] = &[
            b"",
            b"-1",
            b"+5",
            b"5a",
            b"0x10",
            b"1.0",
            b"5, 6",
            b"5,",
            b",5",
            b"18446744073709551616",
            b"99999999999999999999999",
        ];
        for &v in bad {
            assert!(merge_content_length(None, v).is_err(), "{v:?}");
        }
        assert_eq!(merge_content_length(Some(5), b"5"), Ok(Some(5)));
        assert!(merge_content_length(Some(5), b"6").is_err());
    }

    #[test]
    fn token_lists_are_case_insensitive() {
        assert!(has_token(b"close", "close"));
        assert!(has_token(b"Keep-Alive, CLOSE", "close"));
        assert!(has_token(b" , upgrade ,close ,", "close"));
        assert!(!has_token(b"closed", "close"));
        assert!(!has_token(b"", "close"));
    }

    #[test]
    fn field_values_checked_word_by_word_match_byte_by_byte() {
        let mut v = [b'a'; 24];
        for at in 0..v.len() {
            for b in 0..=255u8 {
                v[at] = b;
                for start in 0..=at.min(9) {
                    let want = v[start..].iter().all(|&b| is_value_byte(b));
                    assert_eq!(is_field_value(&v[start..]), want, "{b:#04x} at {at}");
                }
            }
            v[at] = 0xe9;
        }
    }

    #[test]
    fn tchar_table_is_rfc_9110() {
        let specials = b"!#$%&'*+-.^_`|~";
        for b in 0..=255u8 {
            let want = b.is_ascii_alphanumeric() || specials.contains(&b);
            assert_eq!(is_tchar(b), want, "{b:#04x}");
        }
    }

    #[test]
    fn response_field_validation() {
        assert!(is_token(b"X-Custom_1"));
        assert!(!is_token(b""));
        assert!(!is_token(b"Bad Name"));
        assert!(!is_token(b"Bad:Name"));
        assert!(is_field_value(b"text/html; charset=utf-8\t\xe9"));
        assert!(!is_field_value(b"a\r\nSet-Cookie: x"));
        assert!(!is_field_value(b"a\nb"));
        assert!(!is_field_value(b"a\0b"));
    }
}
