//! The app thread pool of the io_uring loop (`threads > 1`): sessions run on pool threads,
//! and what they produce goes back to the ring thread through a wake socket the ring reads
//! itself, so only the ring's owner thread ever submits to it or enters it.

use std::collections::VecDeque;
use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

use pyo3::prelude::*;

use crate::deadline::Awaiting;
use crate::errors::BodyError;
use crate::protocol::PyWsgiApp;
use crate::session::Session;
use crate::transport::{lock_io, SharedIo, Transport};
use crate::working::lock_session;

/// One connection's turn: its session runs until it needs more input or is over.
pub struct Job {
    pub fd: i32,
    pub session: Arc<Mutex<Session>>,
}

/// What a pool thread hands back to the ring thread, in the order it happened.
pub enum Handback {
    /// Plaintext to send at once (100 Continue, and the responses queued before it): the
    /// app is about to wait for body bytes.
    Send {
        fd: i32,
        io: SharedIo,
        bytes: Vec<u8>,
    },
    /// The turn is over; its output waits in the connection's `out`.
    Turn {
        fd: i32,
        io: SharedIo,
        closing: bool,
        awaiting: Awaiting,
    },
}

#[derive(Default)]
struct State {
    jobs: VecDeque<Job>,
    done: Vec<Handback>,
    /// A wake byte is on its way to the ring since it last took `done`.
    told: bool,
    stopping: bool,
    /// Pool threads that have not exited yet.
    live: usize,
}

pub struct AppThreads {
    state: Mutex<State>,
    /// Idle pool threads wait here for a job.
    jobs_cv: Condvar,
    /// Body reads wait here for the ring to deliver input; the stop waits for exits too.
    input_cv: Condvar,
    wake_rx: UnixStream,
    wake_tx: UnixStream,
    body_timeout: Duration,
}

fn lock(state: &Mutex<State>) -> MutexGuard<'_, State> {
    state.lock().unwrap_or_else(|p| p.into_inner())
}

impl AppThreads {
    pub fn new(body_timeout: Duration) -> io::Result<Arc<AppThreads>> {
        let (wake_rx, wake_tx) = UnixStream::pair()?;
        wake_rx.set_nonblocking(true)?;
        wake_tx.set_nonblocking(true)?;
        Ok(Arc::new(AppThreads {
            state: Mutex::new(State::default()),
            jobs_cv: Condvar::new(),
            input_cv: Condvar::new(),
            wake_rx,
            wake_tx,
            body_timeout,
        }))
    }

    /// The socket the ring keeps a multishot recv on: a byte means handbacks are waiting.
    pub fn wake_fd(&self) -> i32 {
        self.wake_rx.as_raw_fd()
    }

    /// Starts `n` threads that run sessions of `app`, each attached to Python for its life
    /// (so thread-locals of the app survive from one request to the next).
    pub fn start(
        self: &Arc<Self>,
        py: Python<'_>,
        n: usize,
        app: &Py<PyWsgiApp>,
    ) -> io::Result<()> {
        let transport: Arc<dyn Transport> = Arc::new(PoolTransport { pool: self.clone() });
        for i in 0..n {
            let pool = self.clone();
            let app = app.clone_ref(py);
            let transport = transport.clone();
            lock(&self.state).live += 1;
            let spawned = thread::Builder::new()
                .name(format!("uringserve-app-{i}"))
                .spawn(move || pool.work(&app, &transport));
            if let Err(e) = spawned {
                lock(&self.state).live -= 1;
                return Err(e);
            }
        }
        Ok(())
    }

    fn work(&self, app: &Py<PyWsgiApp>, transport: &Arc<dyn Transport>) {
        Python::attach(|py| {
            let app = app.get().app();
            while let Some(job) = py.detach(|| self.next_job()) {
                let mut session = lock_session(&job.session);
                session.advance(py, app, transport);
                let turn = Handback::Turn {
                    fd: job.fd,
                    io: session.io.clone(),
                    closing: session.closing(),
                    awaiting: session.awaiting(),
                };
                drop(session);
                // Let go of the session before the ring sees the turn: a connection at rest
                // gives its working state back only when nothing else holds it.
                drop(job);
                self.hand_back(turn);
            }
        });
        lock(&self.state).live -= 1;
        self.input_cv.notify_all();
    }

    fn next_job(&self) -> Option<Job> {
        let mut st = lock(&self.state);
        loop {
            if st.stopping {
                return None;
            }
            if let Some(job) = st.jobs.pop_front() {
                return Some(job);
            }
            st = self.jobs_cv.wait(st).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// From the ring thread: runs the turns on the pool, first come first served.
    pub fn submit(&self, jobs: impl Iterator<Item = Job>) {
        let mut st = lock(&self.state);
        let before = st.jobs.len();
        st.jobs.extend(jobs);
        let added = st.jobs.len() - before;
        drop(st);
        match added {
            0 => {}
            1 => self.jobs_cv.notify_one(),
            _ => self.jobs_cv.notify_all(),
        }
    }

    fn hand_back(&self, what: Handback) {
        let mut st = lock(&self.state);
        st.done.push(what);
        let tell = !std::mem::replace(&mut st.told, true);
        drop(st);
        if tell {
            // A full socket already holds a wake-up the ring has yet to read.
            let _ = (&self.wake_tx).write(&[1]);
        }
    }

    /// From the ring thread: everything handed back since the last call, in order.
    pub fn take_done(&self, into: &mut Vec<Handback>) {
        let mut st = lock(&self.state);
        into.append(&mut st.done);
        st.told = false;
    }

    /// From the ring thread: input arrived (or a connection ended) for a connection whose
    /// app may be waiting in a body read.
    pub fn input_arrived(&self) {
        let _st = lock(&self.state);
        self.input_cv.notify_all();
    }

    /// Waits, without the GIL, until the ring delivers input for `io`, its connection ends,
    /// or the body timeout passes.
    fn wait_for_input(&self, io: &SharedIo) -> Result<(), BodyError> {
        let deadline = Instant::now() + self.body_timeout;
        let mut st = lock(&self.state);
        let start = {
            let io = lock_io(io);
            if let Some(why) = io.severed {
                return Err(BodyError::Disconnected(why));
            }
            io.arrivals_seen
        };
        loop {
            if st.stopping {
                return Err(BodyError::Disconnected(None));
            }
            {
                let io = lock_io(io);
                if let Some(why) = io.severed {
                    return Err(BodyError::Disconnected(why));
                }
                if io.arrivals != start {
                    return Ok(());
                }
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(BodyError::TimedOut(self.body_timeout));
            }
            st = self
                .input_cv
                .wait_timeout(st, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    /// Stops the pool: idle threads exit at once, busy ones once their turn ends. Waits up
    /// to `wait` for them (call without the GIL); returns how many are still running.
    pub fn stop(&self, wait: Duration) -> usize {
        let deadline = Instant::now() + wait;
        let mut st = lock(&self.state);
        st.stopping = true;
        st.jobs.clear();
        self.jobs_cv.notify_all();
        self.input_cv.notify_all();
        while st.live > 0 {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            st = self
                .input_cv
                .wait_timeout(st, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        st.live
    }
}

/// The app's view of its connection on a pool thread: early sends and body waits go
/// through the ring thread, never into the ring from here.
struct PoolTransport {
    pool: Arc<AppThreads>,
}

impl Transport for PoolTransport {
    fn send_now(&self, _py: Python<'_>, io: &SharedIo, bytes: Vec<u8>) -> Result<(), BodyError> {
        let (fd, severed) = {
            let io = lock_io(io);
            (io.fd, io.severed)
        };
        if let Some(why) = severed {
            return Err(BodyError::Disconnected(why));
        }
        let io = io.clone();
        self.pool.hand_back(Handback::Send { fd, io, bytes });
        Ok(())
    }

    fn pull(&self, py: Python<'_>, io: &SharedIo) -> Result<(), BodyError> {
        py.detach(|| self.pool.wait_for_input(io))
    }
}
