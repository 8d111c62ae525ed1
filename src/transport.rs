//! The seam between one connection's HTTP state and whichever loop moves its bytes.

use std::sync::{Arc, Mutex, MutexGuard};

use pyo3::prelude::*;

use crate::errors::BodyError;
use crate::http::{Connection, Limits};
use crate::tls::TlsFilter;

/// A connection's protocol state and the response bytes waiting to go out. The loop, the
/// bridge and wsgi.input all reach it, one short lock at a time, never across an app call.
pub struct ConnIo {
    pub conn: Connection,
    /// Bytes for the peer, in order; the loop takes them after each turn.
    pub out: Vec<u8>,
    /// Bytes taken from `out` ahead of time (by a flush before a body read), for the access log.
    pub flushed: u64,
    /// The connection's fd, for a transport shared by every connection of a loop.
    pub fd: i32,
    /// The TLS session when the server speaks TLS: `conn` and `out` hold plaintext then, and
    /// the loops pass wire bytes through `crate::tls`.
    pub tls: Option<Box<TlsFilter>>,
    /// Receives so far, counted by the io_uring loop: an app reading its body on a pool
    /// thread waits for this to move.
    pub arrivals: u32,
    /// `arrivals` when the body decoder last ran out of input: the wait starts from there,
    /// so bytes that arrive between that and the wait itself are not missed.
    pub arrivals_seen: u32,
    /// Set by the io_uring loop when the connection ended under an app running on a pool
    /// thread: Some(errno) when it broke, None when the loop closed it.
    pub severed: Option<Option<i32>>,
    /// Set by the io_uring loop when it stopped receiving for this connection because input
    /// piled up under an app call on a pool thread: a body read that runs out asks it to
    /// receive again.
    pub input_paused: bool,
    /// Wire bytes the ring took for this connection and never sent, when it was given up
    /// while an app call ran on a pool thread: they go out before anything else.
    pub owed: Vec<u8>,
}

pub type SharedIo = Arc<Mutex<ConnIo>>;

impl ConnIo {
    pub fn shared(limits: Limits, fd: i32) -> SharedIo {
        Arc::new(Mutex::new(ConnIo::fresh(Connection::new(limits), fd)))
    }

    /// The state of a connection that has not exchanged anything yet; the one place that
    /// says what that is, for new states and reused ones alike.
    fn fresh(conn: Connection, fd: i32) -> ConnIo {
        ConnIo {
            conn,
            out: Vec::new(),
            flushed: 0,
            fd,
            tls: None,
            arrivals: 0,
            arrivals_seen: 0,
            severed: None,
            input_paused: false,
            owed: Vec::new(),
        }
    }

    /// Whether nothing is received, pending or owed: see [`Connection::at_rest`].
    pub fn at_rest(&self) -> bool {
        self.out.is_empty() && self.conn.at_rest()
    }

    /// Makes this the fresh state of the connection on `fd`, keeping the input allocation
    /// unless it grew past `keep_capacity`.
    pub fn reuse(&mut self, fd: i32, keep_capacity: usize) {
        self.conn.reuse(keep_capacity);
        // The Connection stand-in allocates nothing; the reused one goes back in at once.
        let stand_in = Connection::new(Limits::default());
        let ConnIo { conn, .. } = std::mem::replace(self, ConnIo::fresh(stand_in, fd));
        self.conn = conn;
    }

    /// Everything written so far, sent or not: response sizes are differences of this.
    pub fn produced(&self) -> u64 {
        self.flushed + self.out.len() as u64
    }

    /// Takes the pending output for sending.
    pub fn take_out(&mut self) -> Vec<u8> {
        let out = std::mem::take(&mut self.out);
        self.flushed += out.len() as u64;
        out
    }

    /// Marks the pending output as handed over (copied out by the caller), keeping the
    /// buffer's memory for the next response.
    pub fn clear_out(&mut self) {
        self.flushed += self.out.len() as u64;
        self.out.clear();
    }
}

pub fn lock_io(io: &SharedIo) -> MutexGuard<'_, ConnIo> {
    io.lock().unwrap_or_else(|p| p.into_inner())
}

/// What a loop offers the bridge while the app runs: sending early (100 Continue, and the
/// responses queued before it) and waiting for more of a request body.
pub trait Transport: Send + Sync {
    /// Queues `bytes` (plaintext: the transport seals them under TLS) for the peer of `io`
    /// ahead of anything produced later.
    fn send_now(&self, py: Python<'_>, io: &SharedIo, bytes: Vec<u8>) -> Result<(), BodyError>;

    /// Waits, with the GIL released, until `io` has received more bytes or the end of input
    /// (decrypted under TLS).
    fn pull(&self, py: Python<'_>, io: &SharedIo) -> Result<(), BodyError>;
}
