//! Request heads: finding a head's end under the limits, then parsing and vetting it.

use std::cell::Cell;
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

/// Where one piece of a request lies in [`Request`]'s text or bytes.
#[derive(Debug, Clone, Copy, Default)]
struct Span {
    start: u32,
    end: u32,
}

impl Span {
    /// `limit` is the length of the buffer the span is in.
    fn of(limit: usize, start: usize, len: usize) -> Span {
        // Heads are bounded by the limits far below 4 GiB; clamping keeps a span in range
        // should a limit ever be set that high (the lookup then just comes out empty).
        let clamp = |n: usize| u32::try_from(n.min(limit)).unwrap_or(0);
        Span {
            start: clamp(start),
            end: clamp(start + len),
        }
    }

    fn get(self, bytes: &[u8]) -> &[u8] {
        bytes
            .get(self.start as usize..self.end as usize)
            .unwrap_or_default()
    }

    fn str(self, text: &str) -> &str {
        text.get(self.start as usize..self.end as usize)
            .unwrap_or_default()
    }
}

/// One field line: its name (as sent) and value (without surrounding whitespace).
#[derive(Debug, Clone, Copy)]
struct Field {
    name: Span,
    value: Span,
}

/// A parsed, validated request head.
///
/// Every piece lives in one copy of the head and is reached through spans, instead of one
/// allocation per string; the buffers are recycled from request to request.
#[derive(Clone)]
pub struct Request {
    /// The head as text, so the pieces that are text need no UTF-8 check when read. Should
    /// the head not be UTF-8 (obs-text in a field value), the bytes of its invalid sequences
    /// are `?` here, which keeps every offset; the values are then read from `bytes`.
    text: String,
    /// The decoded path when it differs from the raw one, and the head verbatim when it is
    /// not UTF-8.
    bytes: Vec<u8>,
    values_in_bytes: bool,
    path_in_bytes: bool,
    method: Span,
    target: Span,
    raw_path: Span,
    path: Span,
    query: Span,
    fields: Vec<Field>,
    pub version: Version,
    pub content_length: Option<u64>,
    pub chunked: bool,
    /// What the request asked for; the response side may still decide to close.
    pub keep_alive: bool,
    /// `Expect: 100-continue` on an HTTP/1.1 request (HTTP/1.0 ones must be ignored).
    pub expect_continue: bool,
}

impl Request {
    pub fn method(&self) -> &str {
        self.method.str(&self.text)
    }

    /// The request target exactly as sent.
    pub fn target(&self) -> &str {
        self.target.str(&self.text)
    }

    /// The target's path before any `?`, still percent-encoded (`/` for `http://host`).
    pub fn raw_path(&self) -> &str {
        self.raw_path.str(&self.text)
    }

    /// `raw_path` percent-decoded; bytes because `%FF` need not be UTF-8.
    pub fn path(&self) -> &[u8] {
        if self.path_in_bytes {
            self.path.get(&self.bytes)
        } else {
            self.path.get(self.text.as_bytes())
        }
    }

    /// Everything after the first `?`, without it; empty if there is none.
    pub fn query(&self) -> &str {
        self.query.str(&self.text)
    }

    /// Field lines in arrival order, names as sent (compare case-insensitively).
    pub fn headers(&self) -> impl ExactSizeIterator<Item = (&str, &[u8])> + '_ {
        let values = if self.values_in_bytes {
            &self.bytes
        } else {
            self.text.as_bytes()
        };
        self.fields
            .iter()
            .map(move |f| (f.name.str(&self.text), f.value.get(values)))
    }

    /// The first field value named `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&[u8]> {
        self.headers()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v)
    }

    /// Whether a body follows the head on the wire.
    pub fn has_body(&self) -> bool {
        self.chunked || self.content_length.is_some_and(|n| n > 0)
    }
}

impl std::fmt::Debug for Request {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let headers: Vec<(&str, String)> = self
            .headers()
            .map(|(n, v)| (n, String::from_utf8_lossy(v).into_owned()))
            .collect();
        f.debug_struct("Request")
            .field("method", &self.method())
            .field("target", &self.target())
            .field("raw_path", &self.raw_path())
            .field("path", &String::from_utf8_lossy(self.path()))
            .field("query", &self.query())
            .field("version", &self.version)
            .field("headers", &headers)
            .field("content_length", &self.content_length)
            .field("chunked", &self.chunked)
            .field("keep_alive", &self.keep_alive)
            .field("expect_continue", &self.expect_continue)
            .finish()
    }
}

/// Equal when they say the same, however their text is laid out.
impl PartialEq for Request {
    fn eq(&self, other: &Self) -> bool {
        self.method() == other.method()
            && self.target() == other.target()
            && self.raw_path() == other.raw_path()
            && self.path() == other.path()
            && self.query() == other.query()
            && self.version == other.version
            && self.headers().eq(other.headers())
            && self.content_length == other.content_length
            && self.chunked == other.chunked
            && self.keep_alive == other.keep_alive
            && self.expect_continue == other.expect_continue
    }
}

impl Eq for Request {}

thread_local! {
    // The buffers of the last request dropped on this thread, for the next one parsed here:
    // a connection's requests then cost no allocation for their text and field list.
    static SPARE: Cell<Option<Buffers>> = const { Cell::new(None) };
}

/// Buffers grown past these by an odd request are freed rather than kept.
const SPARE_TEXT_MAX: usize = 16 * 1024;
const SPARE_FIELDS_MAX: usize = 128;

type Buffers = (String, Vec<u8>, Vec<Field>);

/// Empty buffers for a new request, reusing the spare ones when there are some.
fn take_spare() -> Buffers {
    let (mut text, mut bytes, mut fields) = SPARE
        .try_with(Cell::take)
        .ok()
        .flatten()
        .unwrap_or_default();
    text.clear();
    bytes.clear();
    fields.clear();
    (text, bytes, fields)
}

impl Drop for Request {
    fn drop(&mut self) {
        if self.text.capacity() > SPARE_TEXT_MAX
            || self.bytes.capacity() > SPARE_TEXT_MAX
            || self.fields.capacity() > SPARE_FIELDS_MAX
        {
            return;
        }
        let spare = (
            std::mem::take(&mut self.text),
            std::mem::take(&mut self.bytes),
            std::mem::take(&mut self.fields),
        );
        // Fails only while the thread is exiting; the buffers are then simply freed.
        let _ = SPARE.try_with(|s| s.set(Some(spare)));
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
    let (mut text, mut bytes, mut fields) = take_spare();
    fields.reserve(parsed.headers.len());
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
        fields.push(Field {
            name: Span::of(head.len(), offset(head, name.as_bytes()), name.len()),
            value: Span::of(head.len(), offset(head, h.value), h.value.len()),
        });
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
    text.reserve(head.len() + 1);
    let values_in_bytes = match std::str::from_utf8(head) {
        Ok(head) => {
            text.push_str(head);
            false
        }
        Err(_) => {
            // Same offsets, text throughout: what is not UTF-8 becomes `?` byte for byte.
            for chunk in head.utf8_chunks() {
                text.push_str(chunk.valid());
                text.extend(chunk.invalid().iter().map(|_| '?'));
            }
            bytes.extend_from_slice(head);
            true
        }
    };
    let raw = raw_path;
    let raw_path = if offset(head, raw.as_bytes()) < head.len() {
        Span::of(text.len(), offset(head, raw.as_bytes()), raw.len())
    } else {
        // `*`, or the `/` standing for an absolute-form target's empty path: not in the head.
        let at = text.len();
        text.push_str(raw);
        Span::of(text.len(), at, raw.len())
    };
    let path_in_bytes = raw.as_bytes().contains(&b'%');
    let path = if path_in_bytes {
        let at = bytes.len();
        percent_decode(raw.as_bytes(), &mut bytes);
        Span::of(bytes.len(), at, bytes.len() - at)
    } else {
        raw_path
    };

    Ok(Request {
        method: Span::of(text.len(), offset(head, method.as_bytes()), method.len()),
        target: Span::of(text.len(), offset(head, target.as_bytes()), target.len()),
        raw_path,
        path,
        query: Span::of(text.len(), offset(head, query.as_bytes()), query.len()),
        fields,
        text,
        bytes,
        values_in_bytes,
        path_in_bytes,
        version,
        content_length,
        chunked,
        keep_alive: !close && (version == Version::Http11 || keep_alive_token),
        expect_continue: expect_continue && version == Version::Http11,
    })
}

/// Where `part`, a slice of `head`, starts in it; `head.len()` for a slice from elsewhere
/// (the static strings `split_target` may return).
fn offset(head: &[u8], part: &[u8]) -> usize {
    let at = (part.as_ptr() as usize).wrapping_sub(head.as_ptr() as usize);
    if at <= head.len() && at + part.len() <= head.len() {
        at
    } else {
        head.len()
    }
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
