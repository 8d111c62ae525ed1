//! A connection's working state (HTTP state, input buffer, session) is lent from a pool while
//! the connection has something to do and taken back when it rests between requests, so an
//! idle keep-alive connection holds only its peer's address (under TLS it keeps its state:
//! the TLS session lives there).

use std::sync::{Arc, Mutex, MutexGuard};

use pyo3::prelude::*;
use pyo3::types::PyString;

use crate::http::Limits;
use crate::session::Session;
use crate::transport::{lock_io, ConnIo, SharedIo};
use crate::wsgi::environ::Peer;

/// States kept for reuse: enough for every connection of a heavy load to be busy at once
/// without allocating; past it, the state of a connection going idle is freed.
const POOL_MAX: usize = 1024;
/// A pooled state keeps an input buffer up to this size (a large request head, or a couple
/// of receive buffers of body); a larger one goes back to the allocator, so the pool pins at
/// most 16 MiB of input, as the hot path's spare output buffers do.
const KEEP_INPUT: usize = 16 * 1024;
/// Port strings (REMOTE_PORT) of resting connections, kept in a table indexed by the port
/// modulo this: a connection that works again mostly finds its own, so keep-alive requests
/// make none, while 10,000 idle connections hold at most this many.
const PORT_SLOTS: usize = 1024;

pub struct Working {
    pub io: SharedIo,
    pub session: Arc<Mutex<Session>>,
}

pub fn lock_session(session: &Mutex<Session>) -> MutexGuard<'_, Session> {
    session.lock().unwrap_or_else(|p| p.into_inner())
}

#[derive(Default)]
pub struct WorkPool {
    free: Vec<Working>,
    ports: Vec<Option<(u16, Py<PyString>)>>,
    /// States made so far (each a miss of the pool): the most connections ever busy at once,
    /// not the number of connections.
    pub made: u64,
    /// The server is stopping gracefully: every state lent from now on answers its request
    /// with `Connection: close`.
    pub refuse_keep_alive: bool,
}

impl WorkPool {
    /// A fresh state for the connection on `fd`, whose session now answers for `peer` and
    /// goes on from the `requests` heads the connection had so far.
    pub fn lend(&mut self, limits: Limits, fd: i32, mut peer: Peer, requests: u32) -> Working {
        if let Some(slot) = self.ports.get_mut(usize::from(peer.port) % PORT_SLOTS) {
            if slot.as_ref().is_some_and(|(port, _)| *port == peer.port) {
                if let Some((_, s)) = slot.take() {
                    peer.restore_port_str(s);
                }
            }
        }
        let w = match self.free.pop() {
            Some(w) => w,
            None => {
                self.made += 1;
                let io = ConnIo::shared(limits, fd);
                let session = Session::new(io.clone(), Peer::unknown());
                Working {
                    io,
                    session: Arc::new(Mutex::new(session)),
                }
            }
        };
        // A pooled state and a new one are set up alike from here.
        let mut io = lock_io(&w.io);
        io.fd = fd;
        if self.refuse_keep_alive {
            io.conn.refuse_keep_alive();
        }
        drop(io);
        let mut session = lock_session(&w.session);
        session.peer = peer;
        session.set_requests(requests);
        drop(session);
        w
    }

    /// Takes `w` back if its connection rests between requests and nothing else (a turn in
    /// progress, a wsgi.input an app kept) holds it, returning the connection's peer; else
    /// hands `w` back unchanged.
    pub fn take_back(&mut self, w: Working) -> Result<Peer, Working> {
        if !unshared(&w) {
            return Err(w);
        }
        let peer = {
            let mut session = lock_session(&w.session);
            let mut io = lock_io(&w.io);
            // A TLS session must outlive its connection's idle spells: such a state stays.
            if !session.at_rest() || !io.at_rest() || io.tls.is_some() {
                None
            } else {
                io.reuse(-1, KEEP_INPUT);
                Some(std::mem::replace(&mut session.peer, Peer::unknown()))
            }
        };
        let Some(mut peer) = peer else {
            return Err(w);
        };
        if let Some(s) = peer.take_port_str() {
            if self.ports.is_empty() {
                self.ports.resize_with(PORT_SLOTS, || None);
            }
            // Replaces (and frees) the string of another port sharing the slot.
            self.ports[usize::from(peer.port) % PORT_SLOTS] = Some((peer.port, s));
        }
        if self.free.len() < POOL_MAX {
            self.free.push(w);
        }
        Ok(peer)
    }

    /// Takes back the state of a closed connection, whatever it was in the middle of, if
    /// nothing else holds it: the next connection starts from a fresh state without
    /// allocating one.
    pub fn recycle(&mut self, w: Working) {
        if self.free.len() >= POOL_MAX || !unshared(&w) {
            return;
        }
        lock_io(&w.io).reuse(-1, KEEP_INPUT);
        // In place: the session's memory is reused too.
        *lock_session(&w.session) = Session::new(w.io.clone(), Peer::unknown());
        self.free.push(w);
    }
}

/// Whether only the connection holds `w`: its Working and its session's io, nothing else.
fn unshared(w: &Working) -> bool {
    Arc::strong_count(&w.session) == 1 && Arc::strong_count(&w.io) == 2
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::{lock_session, WorkPool};
    use crate::deadline::Awaiting;
    use crate::http::Limits;
    use crate::transport::lock_io;
    use crate::wsgi::environ::{Peer, PeerHost};

    fn peer(port: u16) -> Peer {
        Peer::new(PeerHost::Ip([127, 0, 0, 1].into()), port)
    }

    #[test]
    fn a_state_taken_back_serves_the_next_connection_as_its_own() {
        let mut pool = WorkPool::default();
        let w = pool.lend(Limits::default(), 7, peer(1000), 3);
        let Ok(back) = pool.take_back(w) else {
            panic!("a fresh state rests")
        };
        assert_eq!(back.port, 1000);
        let w = pool.lend(Limits::default(), 9, peer(2000), 5);
        assert_eq!(pool.made, 1, "the same state, not a new one");
        assert_eq!(lock_io(&w.io).fd, 9);
        let session = lock_session(&w.session);
        assert_eq!(session.peer.port, 2000);
        // The connection's own count of request heads, which its timeouts compare against.
        let awaiting = session.awaiting();
        assert_eq!(
            awaiting,
            Awaiting::Head {
                requests: 5,
                buffered: false
            }
        );
    }

    #[test]
    fn a_state_is_kept_while_input_waits_or_something_else_holds_it() {
        let mut pool = WorkPool::default();
        let w = pool.lend(Limits::default(), 7, peer(1000), 0);
        lock_io(&w.io).conn.receive(b"GET / HT");
        let Err(w) = pool.take_back(w) else {
            panic!("a state with half a head went back")
        };
        let held = Arc::clone(&w.io);
        lock_io(&w.io).conn.reuse(0);
        let Err(w) = pool.take_back(w) else {
            panic!("a state that a wsgi.input still holds went back")
        };
        drop(held);
        assert!(pool.take_back(w).is_ok());
    }

    #[test]
    fn while_draining_every_lent_state_refuses_keep_alive() {
        let mut pool = WorkPool::default();
        let w = pool.lend(Limits::default(), 7, peer(1000), 0);
        assert!(lock_io(&w.io).conn.keep_alive());
        assert!(pool.take_back(w).is_ok());
        pool.refuse_keep_alive = true;
        let pooled = pool.lend(Limits::default(), 8, peer(2000), 1);
        let made = pool.lend(Limits::default(), 9, peer(3000), 1);
        assert_eq!(pool.made, 2);
        assert!(!lock_io(&pooled.io).conn.keep_alive());
        assert!(!lock_io(&made.io).conn.keep_alive());
    }

    #[test]
    fn a_closed_connections_state_is_reset_for_the_next() {
        let mut pool = WorkPool::default();
        let w = pool.lend(Limits::default(), 7, peer(1000), 2);
        lock_io(&w.io).conn.receive(b"GET / HTTP/1.1\r\n");
        lock_io(&w.io).conn.receive_eof();
        lock_session(&w.session).close();
        pool.recycle(w);
        let w = pool.lend(Limits::default(), 8, peer(2000), 0);
        assert_eq!(pool.made, 1);
        let io = lock_io(&w.io);
        assert!(io.conn.at_rest() && io.out.is_empty() && io.fd == 8);
        assert!(lock_session(&w.session).at_rest());
    }
}
