//! Response heads: the framing decision, head and chunk encoding, and canned responses.

use super::date::http_date_now;
use super::error::HttpError;
use super::fields::{has_token, is_field_value, is_token, merge_content_length, trim_ows};
use super::request::Version;

/// The value of the `Server` header added when the app does not name itself.
pub const SERVER_NAME: &str = "uringserve";

pub(crate) const LAST_CHUNK: &[u8] = b"0\r\n\r\n";

/// How the response body is delimited on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResponseFraming {
    /// Exactly this many body bytes follow the head.
    ContentLength(u64),
    /// Body bytes are chunk-encoded and end with a last chunk.
    Chunked,
    /// The body ends when the server closes the connection (HTTP/1.0 without a length).
    CloseDelimited,
    /// Nothing follows the head: HEAD, 1xx, 204, 304.
    NoBody,
}

/// What the request side contributes to the framing decision.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Exchange {
    pub version: Version,
    pub head_request: bool,
    /// Whether the connection may stay open as far as the request side is concerned.
    pub keep_alive: bool,
}

/// The facts in the app's headers that the framing decision depends on.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct AppHeaders {
    pub content_length: Option<u64>,
    /// The app asked for `Transfer-Encoding: chunked`; it is honoured as "length unknown".
    pub chunked: bool,
    /// The app's `Connection` header contained `close`.
    pub close: bool,
    pub has_date: bool,
    pub has_server: bool,
}

/// The outcome of [`plan`]: everything the head writer and the body writer need.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Plan {
    /// What actually follows the head on the wire.
    pub framing: ResponseFraming,
    pub keep_alive: bool,
    /// A Content-Length header the app did not give but that we add.
    pub add_content_length: Option<u64>,
    pub add_chunked: bool,
}

/// Splits `"200 OK"` into its code, refusing anything that would not make a valid status line.
pub(crate) fn parse_status(status: &str) -> Result<u16, HttpError> {
    let bytes = status.as_bytes();
    let bad = HttpError::internal("invalid status line from application");
    let digits = bytes.get(..3).ok_or(bad)?;
    if !digits.iter().all(u8::is_ascii_digit) || digits[0] == b'0' {
        return Err(bad);
    }
    match bytes.get(3) {
        None | Some(b' ') => {}
        Some(_) => return Err(bad),
    }
    if !is_field_value(bytes) {
        return Err(bad);
    }
    Ok(digits
        .iter()
        .fold(0u16, |n, &d| n * 10 + u16::from(d - b'0')))
}

/// Validates the app's headers and extracts what framing depends on.
pub(crate) fn inspect_headers<N: AsRef<[u8]>, V: AsRef<[u8]>>(
    headers: &[(N, V)],
) -> Result<AppHeaders, HttpError> {
    let mut app = AppHeaders::default();
    for (name, value) in headers {
        let (name, value) = (name.as_ref(), value.as_ref());
        if !is_token(name) {
            return Err(HttpError::internal(
                "invalid response header name from application",
            ));
        }
        if !is_field_value(value) {
            return Err(HttpError::internal(
                "invalid response header value from application",
            ));
        }
        if name.eq_ignore_ascii_case(b"content-length") {
            app.content_length = merge_content_length(app.content_length, value)
                .map_err(|_| HttpError::internal("invalid Content-Length from application"))?;
        } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
            if !trim_ows(value).eq_ignore_ascii_case(b"chunked") {
                return Err(HttpError::internal(
                    "unsupported Transfer-Encoding from application",
                ));
            }
            app.chunked = true;
        } else if name.eq_ignore_ascii_case(b"connection") {
            app.close |= has_token(value, "close");
        } else if name.eq_ignore_ascii_case(b"date") {
            app.has_date = true;
        } else if name.eq_ignore_ascii_case(b"server") {
            app.has_server = true;
        }
    }
    if app.chunked && app.content_length.is_some() {
        return Err(HttpError::internal(
            "both Content-Length and Transfer-Encoding from application",
        ));
    }
    Ok(app)
}

/// The one place response framing and the resulting keep-alive verdict are decided.
pub(crate) fn plan(
    code: u16,
    exchange: &Exchange,
    app: &AppHeaders,
    body_len_hint: Option<u64>,
) -> Plan {
    // An interim status as a final answer leaves the client waiting for the real one.
    let keep_alive = exchange.keep_alive && !app.close && code >= 200;
    if code < 200 || code == 204 || code == 304 {
        return Plan {
            framing: ResponseFraming::NoBody,
            keep_alive,
            add_content_length: None,
            add_chunked: false,
        };
    }
    let (framing, add_content_length, add_chunked) = match (app.content_length, body_len_hint) {
        (Some(n), _) => (ResponseFraming::ContentLength(n), None, false),
        (None, Some(n)) if !app.chunked => (ResponseFraming::ContentLength(n), Some(n), false),
        _ if exchange.version == Version::Http11 => (ResponseFraming::Chunked, None, true),
        _ => (ResponseFraming::CloseDelimited, None, false),
    };
    // HEAD gets the headers GET would get, but no body, so nothing can be close-delimited.
    let framing = if exchange.head_request {
        ResponseFraming::NoBody
    } else {
        framing
    };
    Plan {
        framing,
        keep_alive: keep_alive && framing != ResponseFraming::CloseDelimited,
        add_content_length,
        add_chunked,
    }
}

/// Writes the status line and headers. The app's `Connection` and `Transfer-Encoding` are
/// replaced by ours (they are hop-by-hop, and ours match the framing actually used).
pub(crate) fn write_head<N: AsRef<[u8]>, V: AsRef<[u8]>>(
    out: &mut Vec<u8>,
    status: &str,
    code: u16,
    headers: &[(N, V)],
    app: &AppHeaders,
    plan: &Plan,
    version: Version,
) {
    // One reservation for the whole head: the app's part plus what is added here.
    let app_bytes: usize = headers
        .iter()
        .map(|(n, v)| n.as_ref().len() + v.as_ref().len() + 4)
        .sum();
    out.reserve(status.len() + app_bytes + 160);
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(status.as_bytes());
    if status.len() == 3 {
        out.push(b' ');
    }
    out.extend_from_slice(b"\r\n");
    // RFC 9110 §8.6: no Content-Length in 1xx and 204 responses.
    let drop_length = code < 200 || code == 204;
    for (name, value) in headers {
        let name = name.as_ref();
        if name.eq_ignore_ascii_case(b"connection")
            || name.eq_ignore_ascii_case(b"transfer-encoding")
            || (drop_length && name.eq_ignore_ascii_case(b"content-length"))
        {
            continue;
        }
        push_field(out, name, value.as_ref());
    }
    if !app.has_date {
        push_field(out, b"Date", &http_date_now());
    }
    if !app.has_server {
        push_field(out, b"Server", SERVER_NAME.as_bytes());
    }
    if let Some(n) = plan.add_content_length {
        out.extend_from_slice(b"Content-Length: ");
        push_int(out, n, 10);
        out.extend_from_slice(b"\r\n");
    }
    if plan.add_chunked {
        out.extend_from_slice(b"Transfer-Encoding: chunked\r\n");
    }
    if !plan.keep_alive {
        out.extend_from_slice(b"Connection: close\r\n");
    } else if version == Version::Http10 {
        out.extend_from_slice(b"Connection: keep-alive\r\n");
    }
    out.extend_from_slice(b"\r\n");
}

fn push_field(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

fn push_int(out: &mut Vec<u8>, mut n: u64, radix: u64) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut buf = [0u8; 20];
    let mut at = buf.len();
    loop {
        at -= 1;
        buf[at] = DIGITS[(n % radix) as usize];
        n /= radix;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&buf[at..]);
}

/// Writes `data` as one chunk. Empty data writes nothing: an empty chunk would end the body.
pub(crate) fn write_chunk(data: &[u8], out: &mut Vec<u8>) {
    if data.is_empty() {
        return;
    }
    push_int(out, data.len() as u64, 16);
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(data);
    out.extend_from_slice(b"\r\n");
}

/// The interim response that releases a client waiting on `Expect: 100-continue`.
pub fn write_continue(out: &mut Vec<u8>) {
    out.extend_from_slice(b"HTTP/1.1 100 Continue\r\n\r\n");
}

/// A complete, minimal error response that closes the connection (400, 413, 431, 500, 503…).
pub fn write_error_response(status: u16, out: &mut Vec<u8>) {
    write_error(status, false, out);
}

/// Returns the length of the body written (0 for `head_only`), the access log's size.
pub(crate) fn write_error(status: u16, head_only: bool, out: &mut Vec<u8>) -> u64 {
    let reason = reason_phrase(status).as_bytes();
    out.extend_from_slice(b"HTTP/1.1 ");
    push_int(out, u64::from(status), 10);
    out.push(b' ');
    out.extend_from_slice(reason);
    let body_len = reason.len() as u64 + 1;
    out.extend_from_slice(b"\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: ");
    push_int(out, body_len, 10);
    out.extend_from_slice(b"\r\nConnection: close\r\n");
    push_field(out, b"Date", &http_date_now());
    push_field(out, b"Server", SERVER_NAME.as_bytes());
    out.extend_from_slice(b"\r\n");
    if head_only {
        return 0;
    }
    out.extend_from_slice(reason);
    out.push(b'\n');
    body_len
}

/// The standard reason phrase for `code` (RFC 9110 names), or a class name for unknown codes.
pub fn reason_phrase(code: u16) -> &'static str {
    match code {
        100 => "Continue",
        101 => "Switching Protocols",
        200 => "OK",
        201 => "Created",
        202 => "Accepted",
        204 => "No Content",
        206 => "Partial Content",
        301 => "Moved Permanently",
        302 => "Found",
        303 => "See Other",
        304 => "Not Modified",
        307 => "Temporary Redirect",
        308 => "Permanent Redirect",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        411 => "Length Required",
        413 => "Content Too Large",
        414 => "URI Too Long",
        417 => "Expectation Failed",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        505 => "HTTP Version Not Supported",
        _ => match code / 100 {
            4 => "Client Error",
            5 => "Server Error",
            _ => "Unknown",
        },
    }
}
