//! The per-connection state machine: input bytes in, events out; response bytes framed.

use super::body::{BodyDecoder, Progress, Step};
use super::error::HttpError;
use super::limits::Limits;
use super::request::{parse_head, HeadScanner, Request, Version};
use super::response::{
    inspect_headers, parse_status, plan, write_chunk, write_continue, write_error, write_head,
    Exchange, ResponseFraming, LAST_CHUNK,
};

/// What the peer's bytes amount to, one step at a time.
#[derive(Debug, PartialEq, Eq)]
pub enum Event<'a> {
    /// A complete request head. Body events follow, then `EndOfMessage`.
    Request(Request),
    /// Body bytes, borrowed from the input buffer until the next call on the connection.
    Data(&'a [u8]),
    /// The request (body and trailers included) is complete.
    EndOfMessage,
    /// More input is needed: `receive` more bytes (or `receive_eof`) and ask again.
    NeedData,
    /// The current request is fully received; nothing more is read until `start_next_cycle`.
    /// Later pipelined requests stay buffered meanwhile.
    Paused,
    /// The peer closed cleanly between requests.
    ConnectionClosed,
    /// The peer broke the protocol; answer with `send_error(err.status, ..)` and close.
    /// Repeats on every later call.
    Error(HttpError),
}

/// Result of [`Connection::drain_body`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Drain {
    /// The unread body is gone; the connection can go on to the next request.
    Complete,
    /// Still within the bound but more input is needed; `receive` and call again.
    NeedData,
    /// Too much left, a framing error or EOF: the connection must close.
    Abandon,
}

#[derive(Debug)]
enum Recv {
    Head,
    Body(BodyDecoder),
    Done,
    Closed,
    Failed(HttpError),
}

#[derive(Debug)]
enum Send {
    /// No request to answer yet (or the head failed to parse).
    Idle,
    /// A request was received and its response not started.
    Ready,
    /// The head was written; `remaining` counts down a Content-Length.
    Body {
        framing: ResponseFraming,
        remaining: u64,
    },
    Done,
}

/// One HTTP/1.1 connection, free of I/O: the server feeds it bytes and writes what it produces.
#[derive(Debug)]
pub struct Connection {
    limits: Limits,
    /// Received bytes; `buf[start..]` is not consumed yet. Compacted in place, never shrunk.
    buf: Vec<u8>,
    start: usize,
    eof: bool,
    scanner: HeadScanner,
    recv: Recv,
    send: Send,
    version: Version,
    head_request: bool,
    expect_continue: bool,
    continue_sent: bool,
    keep_alive: bool,
    /// The server is stopping: no request after the current one (graceful stop).
    no_reuse: bool,
    /// A request was answered and the connection kept for another: it is a keep-alive one.
    reused: bool,
    drained: u64,
    /// Body bytes of the current response so far, framing excluded (the access log's size).
    body_sent: u64,
}

impl Connection {
    pub fn new(limits: Limits) -> Self {
        Connection {
            limits,
            buf: Vec::new(),
            start: 0,
            eof: false,
            scanner: HeadScanner::default(),
            recv: Recv::Head,
            send: Send::Idle,
            version: Version::Http11,
            head_request: false,
            expect_continue: false,
            continue_sent: false,
            keep_alive: true,
            no_reuse: false,
            reused: false,
            drained: 0,
            body_sent: 0,
        }
    }

    /// Appends bytes read from the peer (ignored after `receive_eof`).
    pub fn receive(&mut self, bytes: &[u8]) {
        if self.eof || bytes.is_empty() {
            return;
        }
        // Consumed bytes are only dropped when that avoids growing the buffer, so a
        // steady stream of requests settles into one allocation.
        if self.start == self.buf.len() {
            self.buf.clear();
            self.start = 0;
        } else if self.start > 0 && self.buf.len() + bytes.len() > self.buf.capacity() {
            self.buf.drain(..self.start);
            self.start = 0;
        }
        self.buf.extend_from_slice(bytes);
    }

    /// The peer will send nothing more.
    pub fn receive_eof(&mut self) {
        self.eof = true;
    }

    /// The error the input failed with, if it did.
    pub fn failure(&self) -> Option<HttpError> {
        match self.recv {
            Recv::Failed(e) => Some(e),
            _ => None,
        }
    }

    /// Whether the peer has said it will send nothing more.
    pub fn input_ended(&self) -> bool {
        self.eof
    }

    /// Received bytes not yet turned into events (for back-pressure decisions).
    pub fn buffered(&self) -> usize {
        self.buf.len() - self.start
    }

    /// The next thing the input amounts to. This is the only place input changes state.
    pub fn next_event(&mut self) -> Event<'_> {
        match self.recv {
            Recv::Head => self.next_head(),
            Recv::Body(_) => self.next_body(),
            Recv::Done => Event::Paused,
            Recv::Closed => Event::ConnectionClosed,
            Recv::Failed(e) => Event::Error(e),
        }
    }

    fn next_head(&mut self) -> Event<'_> {
        if self.scanner.is_fresh() {
            // RFC 9112 §2.2: tolerate empty lines before a request line (some clients send
            // a CRLF after a POST body).
            loop {
                let pending = &self.buf[self.start..];
                if pending.starts_with(b"\r\n") {
                    self.start += 2;
                } else if pending.is_empty() || pending == b"\r" {
                    return if self.eof {
                        self.recv = Recv::Closed;
                        self.keep_alive = false;
                        Event::ConnectionClosed
                    } else {
                        Event::NeedData
                    };
                } else {
                    break;
                }
            }
        }
        let pending = &self.buf[self.start..];
        let head_len = match self.scanner.scan(pending, &self.limits) {
            Err(e) => return self.fail(e),
            Ok(None) if self.eof => {
                return self.fail(HttpError::bad_request(
                    "connection closed inside a request head",
                ))
            }
            Ok(None) => return Event::NeedData,
            Ok(Some(n)) => n,
        };
        let request = match parse_head(
            &pending[..head_len],
            self.scanner.header_lines(),
            &self.limits,
        ) {
            Ok(r) => r,
            Err(e) => return self.fail(e),
        };
        self.start += head_len;
        self.scanner.reset();
        self.version = request.version;
        self.head_request = request.method() == "HEAD";
        self.expect_continue = request.expect_continue;
        self.continue_sent = false;
        self.keep_alive = request.keep_alive && !self.no_reuse;
        self.drained = 0;
        self.recv = Recv::Body(if request.chunked {
            BodyDecoder::chunked(self.limits.max_body_size, self.limits.max_header_bytes)
        } else {
            BodyDecoder::length(request.content_length.unwrap_or(0))
        });
        self.send = Send::Ready;
        Event::Request(request)
    }

    fn next_body(&mut self) -> Event<'_> {
        let Recv::Body(decoder) = &mut self.recv else {
            return Event::Paused;
        };
        let at = self.start;
        let Step { consumed, progress } = match decoder.decode(&self.buf[at..]) {
            Ok(step) => step,
            Err(e) => return self.fail(e),
        };
        self.start += consumed;
        match progress {
            Progress::Data(r) => Event::Data(&self.buf[at + r.start..at + r.end]),
            Progress::NeedData if self.eof => self.fail(HttpError::bad_request(
                "connection closed inside a request body",
            )),
            Progress::NeedData => Event::NeedData,
            Progress::End => {
                self.recv = Recv::Done;
                Event::EndOfMessage
            }
        }
    }

    fn fail(&mut self, e: HttpError) -> Event<'static> {
        self.recv = Recv::Failed(e);
        self.keep_alive = false;
        Event::Error(e)
    }

    /// Whether the current request's body has fully arrived (or there is none).
    pub fn body_fully_received(&self) -> bool {
        match &self.recv {
            Recv::Done => true,
            Recv::Body(decoder) => decoder.is_finished(),
            Recv::Head | Recv::Closed | Recv::Failed(_) => false,
        }
    }

    /// Consumes and discards the rest of a body the app did not read, as long as that costs
    /// at most `max` body bytes in total for this request. A Content-Length that already
    /// says more is abandoned without waiting for it.
    pub fn drain_body(&mut self, max: u64) -> Drain {
        loop {
            let decoder = match &mut self.recv {
                Recv::Body(decoder) => decoder,
                Recv::Done | Recv::Head => return Drain::Complete,
                Recv::Closed | Recv::Failed(_) => return self.abandon(),
            };
            let budget = max.saturating_sub(self.drained);
            if decoder.known_remaining().is_some_and(|left| left > budget) {
                return self.abandon();
            }
            let Step { consumed, progress } = match decoder.decode(&self.buf[self.start..]) {
                Ok(step) => step,
                Err(e) => {
                    self.fail(e);
                    return Drain::Abandon;
                }
            };
            self.start += consumed;
            match progress {
                Progress::Data(r) => {
                    self.drained += r.len() as u64;
                    if self.drained > max {
                        return self.abandon();
                    }
                }
                Progress::NeedData if self.eof => return self.abandon(),
                Progress::NeedData => return Drain::NeedData,
                Progress::End => {
                    self.recv = Recv::Done;
                    return Drain::Complete;
                }
            }
        }
    }

    fn abandon(&mut self) -> Drain {
        self.keep_alive = false;
        Drain::Abandon
    }

    /// Writes `100 Continue` if the request is waiting for it and it is still useful (no
    /// response started, body not yet here). Returns whether it was written.
    pub fn send_continue(&mut self, out: &mut Vec<u8>) -> bool {
        let useful = self.expect_continue
            && !self.continue_sent
            && matches!(self.send, Send::Ready)
            && matches!(self.recv, Recv::Body(_))
            && !self.body_fully_received();
        if useful {
            write_continue(out);
            self.continue_sent = true;
        }
        useful
    }

    /// Writes the response head for `status` (e.g. `"200 OK"`) and the app's headers.
    ///
    /// `body_len_hint` is the body's total length when known without the app saying so (a
    /// single-chunk body); it becomes Content-Length if the app gave none. Header names and
    /// values are written as given, so non-ASCII values should arrive latin-1 encoded.
    /// Errors (500) leave nothing written: an invalid status or header, or a second call.
    pub fn start_response<N: AsRef<[u8]>, V: AsRef<[u8]>>(
        &mut self,
        status: &str,
        headers: &[(N, V)],
        body_len_hint: Option<u64>,
        out: &mut Vec<u8>,
    ) -> Result<ResponseFraming, HttpError> {
        if !matches!(self.send, Send::Ready) {
            return Err(HttpError::internal(
                "response started twice or without a request",
            ));
        }
        let code = parse_status(status)?;
        let app = inspect_headers(headers)?;
        // A client still waiting for 100 Continue may or may not send its body after a final
        // response, so what follows on the connection would be ambiguous.
        let unsent_body =
            self.expect_continue && !self.continue_sent && !self.body_fully_received();
        let exchange = Exchange {
            version: self.version,
            head_request: self.head_request,
            keep_alive: self.keep_alive && !unsent_body,
        };
        let plan = plan(code, &exchange, &app, body_len_hint);
        write_head(out, status, code, headers, &app, &plan, self.version);
        self.keep_alive = plan.keep_alive;
        self.body_sent = 0;
        let remaining = match plan.framing {
            ResponseFraming::ContentLength(n) => n,
            _ => 0,
        };
        self.send = Send::Body {
            framing: plan.framing,
            remaining,
        };
        Ok(plan.framing)
    }

    /// Frames body bytes per the decided framing: chunk-encoded, counted against
    /// Content-Length (excess is dropped), or nothing at all for bodiless responses.
    /// Ignored unless a response head has been written and not yet finished.
    pub fn write_body(&mut self, data: &[u8], out: &mut Vec<u8>) {
        let Send::Body { framing, remaining } = &mut self.send else {
            return;
        };
        let sent = match framing {
            ResponseFraming::NoBody => 0,
            ResponseFraming::ContentLength(_) => {
                let n = usize::try_from(*remaining).map_or(data.len(), |r| r.min(data.len()));
                out.extend_from_slice(&data[..n]);
                *remaining -= n as u64;
                n
            }
            ResponseFraming::Chunked => {
                write_chunk(data, out);
                data.len()
            }
            ResponseFraming::CloseDelimited => {
                out.extend_from_slice(data);
                data.len()
            }
        };
        self.body_sent += sent as u64;
    }

    /// Ends the response body. A body shorter than its Content-Length leaves the peer waiting
    /// for bytes that will never come, so the connection must then close.
    pub fn finish_response(&mut self, out: &mut Vec<u8>) {
        let Send::Body { framing, remaining } = self.send else {
            return;
        };
        match framing {
            ResponseFraming::Chunked => out.extend_from_slice(LAST_CHUNK),
            ResponseFraming::ContentLength(_) if remaining > 0 => self.keep_alive = false,
            _ => {}
        }
        self.send = Send::Done;
    }

    /// Writes a minimal error response (`status` with its reason as a text/plain body) and
    /// marks the connection for closing. Returns false, writing nothing, if a response head
    /// has already gone out; then closing is the only way to signal the failure.
    pub fn send_error(&mut self, status: u16, out: &mut Vec<u8>) -> bool {
        self.keep_alive = false;
        if matches!(self.send, Send::Body { .. } | Send::Done) {
            return false;
        }
        self.body_sent = write_error(status, self.head_request, out);
        self.send = Send::Done;
        true
    }

    /// Between requests with nothing received, nothing to answer and input still open: the
    /// state of a fresh connection, so [`reuse`](Self::reuse) loses nothing.
    pub fn at_rest(&self) -> bool {
        self.between_requests() && self.keep_alive && !self.eof
    }

    /// Waiting for a request head with nothing of it received and nothing being answered.
    fn between_requests(&self) -> bool {
        matches!(self.recv, Recv::Head)
            && matches!(self.send, Send::Idle)
            && self.buffered() == 0
            && self.scanner.is_fresh()
    }

    /// Makes this a fresh connection again, for another peer. The input buffer's allocation is
    /// kept for the next one unless it grew past `keep_capacity` bytes.
    pub fn reuse(&mut self, keep_capacity: usize) {
        let mut buf = std::mem::take(&mut self.buf);
        buf.clear();
        if buf.capacity() > keep_capacity {
            buf = Vec::new();
        }
        *self = Connection {
            buf,
            ..Connection::new(self.limits)
        };
    }

    /// Body bytes of the current (or last) response, as the app gave them: no chunk framing,
    /// nothing past its Content-Length.
    pub fn body_sent(&self) -> u64 {
        self.body_sent
    }

    #[cfg(test)]
    pub(crate) fn buf_capacity_for_tests(&self) -> usize {
        self.buf.capacity()
    }

    /// No request after the current one: a response not started yet says `Connection: close`.
    pub fn refuse_keep_alive(&mut self) {
        self.no_reuse = true;
        self.keep_alive = false;
    }

    /// A keep-alive connection between requests with nothing received: closing it now loses
    /// no request. A connection that has not had its first request is never idle: that
    /// request (or the end of a TLS handshake) may be on its way.
    pub fn is_idle(&self) -> bool {
        self.reused && self.between_requests()
    }

    /// Whether the connection can carry another request, as decided so far.
    pub fn keep_alive(&self) -> bool {
        self.keep_alive
    }

    /// Marks a fresh state as continuing a keep-alive connection that already answered a
    /// request (a loop lent it to a connection that had rested between requests).
    pub fn continue_kept_alive(&mut self) {
        self.reused = true;
    }

    /// Moves on to the next request once the response is finished and the request body is
    /// fully received (use `drain_body` first if the app left some). False: close now.
    pub fn start_next_cycle(&mut self) -> bool {
        if !self.keep_alive || !matches!(self.send, Send::Done) || !self.body_fully_received() {
            self.keep_alive = false;
            return false;
        }
        self.reused = true;
        self.recv = Recv::Head;
        self.send = Send::Idle;
        self.scanner.reset();
        self.head_request = false;
        self.expect_continue = false;
        self.continue_sent = false;
        self.drained = 0;
        if self.start == self.buf.len() {
            self.buf.clear();
            self.start = 0;
        }
        true
    }
}
