//! Request heads: finding a head's end under the limits, then parsing and vetting it.

use std::mem::MaybeUninit;

use super::error::HttpError;
use super::fields::{has_token, merge_content_length, trim_ows};
use super::limits::Limits;
use super::target::{percent_decode, split_target};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    Http10,
    Http11,
}

impl Version {
    pub fn as_str(self) -> &'static str {
        match self {
            Version::Http10 => "HTTP/1.0",
            Version::Http11 => "HTTP/1.1",
        }
    }
}

/// A parsed, validated request head.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub method: String,
    /// The request target exactly as sent.
    pub target: String,
    /// The target's path before any `?`, still percent-encoded (`/` for `http://host`).
    pub raw_path: String,
    /// `raw_path` percent-decoded; bytes because `%FF` need not be UTF-8.
    pub path: Vec<u8>,
    /// Everything after the first `?`, without it; empty if there is none.
    pub query: String,
    pub version: Version,
    /// Field lines in arrival order, names as sent (compare case-insensitively).
    pub headers: Vec<(String, Vec<u8>)>,
    pub content_length: Option<u64>,
    pub chunked: bool,
    /// What the request asked for; the response side may still decide to close.
    pub keep_alive: bool,
    /// `Expect: 100-continue` on an HTTP/1.1 request (HTTP/1.0 ones must be ignored).
    pub expect_continue: bool,
}

impl Request {
    /// The first field value named `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&[u8]> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_slice())
    }

    /// Whether a body follows the head on the wire.
    pub fn has_body(&self) -> bool {
        self.chunked || self.content_length.is_some_and(|n| n > 0)
    }
}

/// Finds where a head ends, resuming where the previous call stopped so a head that trickles
/// in byte by byte is still scanned once.
///
/// It also enforces what httparse cannot: the size limits on partial input, CRLF-only line
/// endings (httparse takes bare LF), and an explicit refusal of obs-fold.
#[derive(Debug, Default)]
pub(crate) struct HeadScanner {
    pos: usize,
    line_start: usize,
    request_line_end: Option<usize>,
    header_lines: usize,
}

impl HeadScanner {
    pub(crate) fn is_fresh(&self) -> bool {
        self.pos == 0
    }

    pub(crate) fn header_lines(&self) -> usize {
        self.header_lines
    }

    pub(crate) fn reset(&mut self) {
        *self = HeadScanner::default();
    }

    /// `buf` starts at the request line and only ever grows between calls.
    /// Returns the head's length (final CRLF included) once it is complete.
    pub(crate) fn scan(&mut self, buf: &[u8], limits: &Limits) -> Result<Option<usize>, HttpError> {
        while let Some(off) = find_lf(&buf[self.pos..]) {
            let lf = self.pos + off;
            self.pos = lf + 1;
            let crlf = lf > self.line_start && buf[lf - 1] == b'\r';
            let line = &buf[self.line_start..if crlf { lf - 1 } else { lf }];
            self.line_start = self.pos;
            // Size limits come before the line-ending check: a line refused as too long
            // before its LF arrived must get the same answer when it arrives all at once.
            let bare_lf = HttpError::bad_request("bare LF line ending");
            match self.request_line_end {
                None => {
                    if line.len() > limits.max_request_line {
                        return Err(HttpError::header_too_large("request line too long"));
                    }
                    if !crlf {
                        return Err(bare_lf);
                    }
                    self.request_line_end = Some(self.pos);
                }
                Some(rl_end) => {
                    if self.pos - rl_end > limits.max_header_bytes {
                        return Err(HttpError::header_too_large("header section too large"));
                    }
                    if !crlf {
                        return Err(bare_lf);
                    }
                    if line.is_empty() {
                        return Ok(Some(self.pos));
                    }
                    if matches!(line[0], b' ' | b'\t') {
                        return Err(HttpError::bad_request("obsolete line folding"));
                    }
                    self.header_lines += 1;
                    if self.header_lines > limits.max_headers {
                        return Err(HttpError::header_too_large("too many header fields"));
                    }
                }
            }
        }
        self.pos = buf.len();
        // Refuse what can no longer end within the limits instead of buffering until it does.
        match self.request_line_end {
            None => {
                let pending = &buf[self.line_start..];
                let content = pending.strip_suffix(b"\r").unwrap_or(pending);
                if content.len() > limits.max_request_line {
                    return Err(HttpError::header_too_large("request line too long"));
                }
            }
            Some(rl_end) => {
                if buf.len() - rl_end > limits.max_header_bytes {
                    return Err(HttpError::header_too_large("header section too large"));
                }
            }
        }
        Ok(None)
    }
}

/// The first LF in `hay`, eight bytes at a time: this scan touches every byte of every head.
fn find_lf(hay: &[u8]) -> Option<usize> {
    const ONES: u64 = u64::from_ne_bytes([0x01; 8]);
    const HIGHS: u64 = u64::from_ne_bytes([0x80; 8]);
    const LFS: u64 = u64::from_ne_bytes([b'\n'; 8]);
    let mut words = hay.chunks_exact(8);
    let mut base = 0;
    for word in &mut words {
        let w = u64::from_le_bytes(word.try_into().unwrap_or([0xff; 8])) ^ LFS;
        // Classic has-zero-byte test; its lowest set bit marks the first zero byte exactly.
        let zero = w.wrapping_sub(ONES) & !w & HIGHS;
        if zero != 0 {
            return Some(base + zero.trailing_zeros() as usize / 8);
        }
        base += 8;
    }
    let tail = words.remainder();
    tail.iter().position(|&b| b == b'\n').map(|p| base + p)
}

/// Header slots kept on the stack; typical requests carry far fewer field lines.
const INLINE_HEADERS: usize = 32;

/// Parses a complete head (as delimited by [`HeadScanner`], which also counted its field lines).
pub(crate) fn parse_head(
    head: &[u8],
    header_lines: usize,
    limits: &Limits,
) -> Result<Request, HttpError> {
    // Uninitialised slots: httparse only exposes the ones it filled, so zeroing the whole
    // array for every request would be wasted work.
    let mut inline = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; INLINE_HEADERS];
    let mut spilled = Vec::new();
    let slots = if header_lines <= INLINE_HEADERS {
        &mut inline[..header_lines]
    } else {
        spilled.reserve_exact(header_lines);
        &mut spilled.spare_capacity_mut()[..header_lines]
    };
    let mut parsed = httparse::Request::new(&mut []);
    match parsed.parse_with_uninit_headers(head, slots) {
        Ok(httparse::Status::Complete(n)) if n == head.len() => {}
        Ok(_) => return Err(HttpError::bad_request("malformed request head")),
        Err(e) => return Err(HttpError::bad_request(describe(e))),
    }
    let (Some(method), Some(target), Some(minor)) = (parsed.method, parsed.path, parsed.version)
    else {
        return Err(HttpError::bad_request("malformed request line"));
    };
    let version = if minor == 0 {
        Version::Http10
    } else {
        Version::Http11
    };

    let mut content_length = None;
    let mut transfer_encodings = 0;
    let mut chunked = false;
    let mut close = false;
    let mut keep_alive_token = false;
    let mut expect_continue = false;
    let mut headers = Vec::with_capacity(parsed.headers.len());
    for h in parsed.headers.iter() {
        let name = h.name;
        if name.eq_ignore_ascii_case("content-length") {
            content_length =
                merge_content_length(content_length, h.value).map_err(HttpError::bad_request)?;
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            transfer_encodings += 1;
            chunked = trim_ows(h.value).eq_ignore_ascii_case(b"chunked");
        } else if name.eq_ignore_ascii_case("connection") {
            close |= has_token(h.value, "close");
            keep_alive_token |= has_token(h.value, "keep-alive");
        } else if name.eq_ignore_ascii_case("expect") {
            expect_continue |= trim_ows(h.value).eq_ignore_ascii_case(b"100-continue");
        }
        headers.push((name.to_owned(), h.value.to_vec()));
    }

    if transfer_encodings > 0 {
        // Any disagreement about where the body ends is a request-smuggling vector, so only the
        // one unambiguous combination is accepted.
        if content_length.is_some() {
            return Err(HttpError::bad_request(
                "both Content-Length and Transfer-Encoding",
            ));
        }
        if transfer_encodings > 1 || !chunked {
            return Err(HttpError::bad_request(
                "Transfer-Encoding other than chunked",
            ));
        }
        if version == Version::Http10 {
            // RFC 9112 §6.1: HTTP/1.0 framing with Transfer-Encoding must be treated as faulty.
            return Err(HttpError::bad_request(
                "Transfer-Encoding on an HTTP/1.0 request",
            ));
        }
    }
    if content_length.is_some_and(|n| n > limits.max_body_size) {
        return Err(HttpError::too_large(
            "Content-Length exceeds the body limit",
        ));
    }

    let (raw_path, query) = split_target(method, target)?;
    let mut path = Vec::new();
    percent_decode(raw_path.as_bytes(), &mut path);

    Ok(Request {
        method: method.to_owned(),
        target: target.to_owned(),
        raw_path: raw_path.to_owned(),
        path,
        query: query.to_owned(),
        version,
        headers,
        content_length,
        chunked,
        keep_alive: !close && (version == Version::Http11 || keep_alive_token),
        expect_continue: expect_continue && version == Version::Http11,
    })
}

fn describe(e: httparse::Error) -> &'static str {
    match e {
        httparse::Error::HeaderName => "invalid header name",
        httparse::Error::HeaderValue => "invalid header value",
        httparse::Error::NewLine => "malformed line ending",
        httparse::Error::Version => "unsupported HTTP version",
        httparse::Error::TooManyHeaders => "too many header fields",
        httparse::Error::Token | httparse::Error::Status => "malformed request line",
    }
}

#[cfg(test)]
mod tests {
    use super::find_lf;

    #[test]
    fn find_lf_matches_a_plain_search() {
        let mut hay = vec![b'a'; 40];
        assert_eq!(find_lf(&hay), None);
        for at in 0..hay.len() {
            hay[at] = b'\n';
            // Bytes that could fool a word-at-a-time search sit around the LF.
            if at + 1 < hay.len() {
                hay[at + 1] = 0x0b;
            }
            for start in 0..=at {
                assert_eq!(
                    find_lf(&hay[start..]),
                    Some(at - start),
                    "at {at} start {start}"
                );
            }
            hay[at] = 0x8a;
        }
        assert_eq!(find_lf(&hay), None);
    }
}
