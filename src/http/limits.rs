//! Size limits a peer must stay within; everything else is refused before it is buffered.

/// Bounds applied while parsing a request; the defaults suit a public-facing server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Longest request line, CRLF excluded. Longer (even before its CRLF arrives) → 431.
    pub max_request_line: usize,
    /// Largest header section: every field line with its CRLF plus the closing CRLF. → 431.
    /// Chunked trailers are held to the same bound.
    pub max_header_bytes: usize,
    /// Most header field lines in one request. → 431.
    pub max_headers: usize,
    /// Largest request body. → 413 at the head for Content-Length, mid-body for chunked.
    pub max_body_size: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_request_line: 8 * 1024,
            max_header_bytes: 64 * 1024,
            max_headers: 100,
            max_body_size: 1 << 30,
        }
    }
}
