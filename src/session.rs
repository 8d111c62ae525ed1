//! One connection's request/response cycles, shared by both loops: each request goes to the
//! app as soon as its head is here, a body the app left unread is drained, and the HTTP core
//! decides when the connection must close.

use std::sync::Arc;

use pyo3::prelude::*;

use crate::deadline::Awaiting;
use crate::http::{Drain, Event};
use crate::transport::{lock_io, SharedIo, Transport};
use crate::wsgi::app::WsgiApp;
use crate::wsgi::environ::Peer;

/// Past this much unsent output, buffered pipelined requests wait until the peer reads.
pub const OUT_HIGH_WATER: usize = 1 << 20;

/// A request body the app never read is drained up to this much; past it, the connection closes.
const DRAIN_LIMIT: u64 = 64 * 1024;

pub struct Session {
    pub io: SharedIo,
    /// Swapped in and out by a loop that lends sessions to connections while they work.
    pub peer: Peer,
    /// The app has answered; what it left of the request body is still to be discarded.
    draining: bool,
    closing: bool,
    /// The last advance stopped for back-pressure with requests still buffered.
    held_back: bool,
    /// Request heads received so far (wrapping): the loops' timeouts tell one idle spell
    /// from the next by it.
    requests: u32,
}

impl Session {
    pub fn new(io: SharedIo, peer: Peer) -> Self {
        Session {
            io,
            peer,
            draining: false,
            closing: false,
            held_back: false,
            requests: 0,
        }
    }

    /// Continues the count of request heads of the connection this session is lent to.
    pub fn set_requests(&mut self, requests: u32) {
        self.requests = requests;
    }

    /// What the connection waits for from its peer now that a turn is over.
    pub fn awaiting(&self) -> Awaiting {
        if self.closing || self.held_back {
            Awaiting::Nothing
        } else if self.draining {
            Awaiting::Body
        } else {
            Awaiting::Head {
                requests: self.requests,
                buffered: lock_io(&self.io).conn.buffered() > 0,
            }
        }
    }

    /// True once the connection must close after the output produced so far is sent.
    pub fn closing(&self) -> bool {
        self.closing
    }

    /// Between requests: nothing to drain, hold back or close.
    pub fn at_rest(&self) -> bool {
        !self.draining && !self.closing && !self.held_back
    }

    /// Whether buffered requests wait for the output to drain; call `advance` again then.
    pub fn held_back(&self) -> bool {
        self.held_back
    }

    pub fn close(&mut self) {
        self.closing = true;
    }

    /// Answers every request the received bytes complete, in order; responses accumulate in
    /// the connection's output. Returns when more input is needed, the connection is over, or
    /// the output passed its high-water mark.
    /// Body reads wait through `transport`, the loop's.
    pub fn advance(&mut self, py: Python<'_>, app: &WsgiApp, transport: &Arc<dyn Transport>) {
        self.held_back = false;
        while !self.closing {
            let mut guard = lock_io(&self.io);
            let io = &mut *guard;
            if io.out.len() > OUT_HIGH_WATER {
                self.held_back = true;
                return;
            }
            if self.draining {
                match io.conn.drain_body(DRAIN_LIMIT) {
                    Drain::NeedData => return,
                    Drain::Abandon => {
                        self.closing = true;
                        return;
                    }
                    Drain::Complete => {
                        self.draining = false;
                        if !io.conn.start_next_cycle() {
                            self.closing = true;
                            return;
                        }
                    }
                }
            }
            match io.conn.next_event() {
                Event::Request(req) => {
                    drop(guard);
                    self.requests = self.requests.wrapping_add(1);
                    app.respond(py, &self.io, transport, &req, &self.peer);
                    self.draining = true;
                    // Nothing more will be read, so there is nothing to drain either.
                    if !lock_io(&self.io).conn.keep_alive() {
                        self.closing = true;
                    }
                }
                Event::NeedData => return,
                Event::ConnectionClosed => self.closing = true,
                Event::Error(err) => {
                    io.conn.send_error(err.status, &mut io.out);
                    app.observer.rejected(err.status);
                    self.closing = true;
                }
                Event::Data(_) | Event::EndOfMessage | Event::Paused => self.draining = true,
            }
        }
    }
}
