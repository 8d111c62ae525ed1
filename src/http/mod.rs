//! Sans-I/O HTTP/1.1: parsing (httparse), body framing, response framing, keep-alive and limits.
//!
//! Nothing here touches a socket: the server feeds received bytes to a [`Connection`] and
//! writes out the bytes it produces. One request/response cycle looks like this:
//!
//! ```text
//! conn.receive(bytes) / conn.receive_eof()
//! loop conn.next_event():
//!     NeedData          → read more, receive(), ask again
//!     Request(req)      → hand to the app; conn.send_continue(out) when the app reads the body
//!     Data(bytes)       → body bytes (borrowed until the next call)
//!     EndOfMessage      → the request is complete; then Paused until the next cycle
//!     Error(e)          → conn.send_error(e.status, out), flush, close
//!     ConnectionClosed  → the peer left between requests
//! conn.start_response("200 OK", &headers, body_len_hint, out)? → ResponseFraming
//! conn.write_body(chunk, out)…; conn.finish_response(out)
//! if !conn.body_fully_received() { conn.drain_body(max) }   // Complete / NeedData / Abandon
//! if conn.start_next_cycle() { next request (maybe already buffered) } else { close }
//! ```
//!
//! Files, one concept each: `limits.rs`, `error.rs`, `request.rs` (head parsing),
//! `target.rs` (request-target forms, percent-decoding), `fields.rs` (shared field-value
//! grammar), `body.rs` (request-body framing, chunked decoding), `response.rs` (framing
//! decision, head writing, chunk encoding, canned responses), `date.rs` (cached Date and log time),
//! `conn.rs` (the state machine); `tests/` holds the byte-table tests.

mod body;
mod conn;
mod date;
mod error;
mod fields;
mod limits;
mod request;
mod response;
mod target;

#[cfg(test)]
mod tests;

pub use conn::{Connection, Drain, Event};
pub use date::{http_date_now, push_log_time_now, HTTP_DATE_LEN};
pub use error::HttpError;
pub use limits::Limits;
pub use request::{Request, Version};
pub use response::{
    reason_phrase, write_continue, write_error_response, ResponseFraming, SERVER_NAME,
};
