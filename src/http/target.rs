//! The request target: its three accepted forms, path/query split and percent-decoding.

use super::error::HttpError;

/// The path (before `?`) and query (after the first `?`) of a request target.
///
/// Origin-form (`/p?q`) is the normal case; absolute-form (`http://host/p?q`) is what proxies
/// send and must be accepted by servers (RFC 9112 §3.2.2), and `*` is only meaningful for
/// OPTIONS. Authority-form (CONNECT) has no meaning for a WSGI app and is refused.
pub(crate) fn split_target<'a>(
    method: &str,
    target: &'a str,
) -> Result<(&'a str, &'a str), HttpError> {
    if target.starts_with('/') {
        return Ok(split_query(target));
    }
    if target == "*" {
        return if method == "OPTIONS" {
            Ok(("*", ""))
        } else {
            Err(HttpError::bad_request(
                "asterisk-form target on a non-OPTIONS request",
            ))
        };
    }
    let rest = strip_scheme(target).ok_or(HttpError::bad_request(
        "request target is not origin-, absolute- or asterisk-form",
    ))?;
    let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
    if authority_end == 0 {
        return Err(HttpError::bad_request(
            "absolute-form target without a host",
        ));
    }
    let (path, query) = split_query(&rest[authority_end..]);
    // `http://host?q` and `http://host` both name the root resource.
    Ok((if path.is_empty() { "/" } else { path }, query))
}

fn strip_scheme(target: &str) -> Option<&str> {
    ["http://", "https://"].iter().find_map(|scheme| {
        let head = target.get(..scheme.len())?;
        head.eq_ignore_ascii_case(scheme)
            .then(|| &target[scheme.len()..])
    })
}

fn split_query(s: &str) -> (&str, &str) {
    // A plain byte scan: targets are short, and `?` is ASCII so the split is a char boundary.
    match s.bytes().position(|b| b == b'?') {
        Some(at) => (&s[..at], &s[at + 1..]),
        None => (s, ""),
    }
}

/// Percent-decodes `raw` into `out`. Sequences that are not `%` + two hex digits are kept
/// verbatim: refusing them would reject paths real clients send, and guessing would alter them.
pub(crate) fn percent_decode(raw: &[u8], out: &mut Vec<u8>) {
    out.reserve(raw.len());
    let mut i = 0;
    while i < raw.len() {
        let b = raw[i];
        if b == b'%' && i + 2 < raw.len() {
            if let (Some(hi), Some(lo)) = (hex(raw[i + 1]), hex(raw[i + 2])) {
                out.push(hi << 4 | lo);
                i += 3;
                continue;
            }
        }
        out.push(b);
        i += 1;
    }
}

fn hex(b: u8) -> Option<u8> {
    (b as char).to_digit(16).map(|d| d as u8)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn target_forms_split_into_path_and_query() {
        let table: &[(&str, &str, &str, &str)] = &[
            ("GET", "/", "/", ""),
            ("GET", "/a/b", "/a/b", ""),
            ("GET", "/a?b=1&c", "/a", "b=1&c"),
            ("GET", "/a?b?c", "/a", "b?c"),
            ("GET", "/a?", "/a", ""),
            ("GET", "http://example.com:8080/p/q?x=1", "/p/q", "x=1"),
            ("GET", "HTTPS://example.com/p", "/p", ""),
            ("GET", "http://example.com", "/", ""),
            ("GET", "http://example.com?x", "/", "x"),
            ("OPTIONS", "*", "*", ""),
        ];
        for &(method, target, path, query) in table {
            assert_eq!(
                split_target(method, target),
                Ok((path, query)),
                "{method} {target}"
            );
        }
    }

    #[test]
    fn unsupported_target_forms_are_400() {
        let table: &[(&str, &str)] = &[
            ("GET", "*"),
            ("CONNECT", "example.com:443"),
            ("GET", "example.com/p"),
            ("GET", "ftp://example.com/p"),
            ("GET", "http:///p"),
            ("GET", "http://"),
        ];
        for &(method, target) in table {
            assert_eq!(
                split_target(method, target).map_err(|e| e.status),
                Err(400),
                "{target}"
            );
        }
    }

    #[test]
    fn percent_decoding_keeps_invalid_sequences() {
        let table: &[(&[u8], &[u8])] = &[
            (b"/plain", b"/plain"),
            (b"/a%2Fb", b"/a/b"),
            (b"/a%2fb", b"/a/b"),
            (b"/%41%42c", b"/ABc"),
            (b"/sp%20ace+plus", b"/sp ace+plus"),
            (b"/%zz", b"/%zz"),
            (b"/%4", b"/%4"),
            (b"/%", b"/%"),
            (b"/%%41", b"/%A"),
            (b"/%C3%A9", "/\u{e9}".as_bytes()),
            (b"/%00", b"/\0"),
            (b"/end%41", b"/endA"),
        ];
        let mut out = Vec::new();
        for &(raw, want) in table {
            out.clear();
            percent_decode(raw, &mut out);
            assert_eq!(out, want, "{}", String::from_utf8_lossy(raw));
        }
    }
}
