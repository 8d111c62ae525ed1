//! The app thread pool of the io_uring loop (`threads > 1`): sessions run on pool threads,
//! and what they produce goes back to the ring thread through an eventfd the ring polls
//! itself, so only the ring's owner thread ever submits to it or enters it. Once the ring is
//! given up (live fallback), turns still running do their I/O on their sockets directly and
//! their results wait for the loop that adopted their connections.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

use pyo3::prelude::*;

use crate::deadline::Awaiting;
use crate::direct;
use crate::errors::BodyError;
use crate::protocol::PyWsgiApp;
use crate::session::Session;
use crate::transport::{lock_io, SharedIo, Transport};
use crate::uring::eventfd;
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
    /// The app read every byte the ring held for it after the ring stopped receiving for
    /// its connection (input piled up): receive again.
    Resume { fd: i32, io: SharedIo },
}

/// How a wait for body bytes ended.
pub enum Input {
    /// The ring delivered something.
    Arrived,
    /// The ring was given up: read the socket directly.
    Direct,
}

#[derive(Default)]
struct State {
    jobs: VecDeque<Job>,
    /// Handed back, for the ring to take. A wake-up is on its way whenever this is not
    /// empty: the push that fills it rings the doorbell, and the ring empties it after.
    done: Vec<Handback>,
    stopping: bool,
    /// Pool threads that have not exited yet.
    live: usize,
    /// The ring was given up: no turn starts any more, nothing is handed back, and the turns
    /// still running send and receive on their sockets themselves.
    direct: bool,
    /// The sessions (by address) whose turn runs now; the loop that adopts a connection
    /// handed over mid-turn waits for its session to leave this list.
    running: Vec<usize>,
}

pub struct AppThreads {
    state: Mutex<State>,
    /// Idle pool threads wait here for a job.
    jobs_cv: Condvar,
    /// Body reads wait here for the ring to deliver input; the stop waits for exits too.
    input_cv: Condvar,
    /// After the ring was given up: the end of each turn still running is announced here.
    turn_cv: Condvar,
    /// The eventfd the ring polls (multishot): each write posts it a completion.
    doorbell: File,
    body_timeout: Duration,
}

fn lock(state: &Mutex<State>) -> MutexGuard<'_, State> {
    state.lock().unwrap_or_else(|p| p.into_inner())
}

impl AppThreads {
    pub fn new(body_timeout: Duration) -> io::Result<Arc<AppThreads>> {
        let doorbell = File::from(eventfd()?);
        Ok(Arc::new(AppThreads {
            state: Mutex::new(State::default()),
            jobs_cv: Condvar::new(),
            input_cv: Condvar::new(),
            turn_cv: Condvar::new(),
            doorbell,
            body_timeout,
        }))
    }

    /// The eventfd the ring keeps a multishot poll on: a wake-up means handbacks are waiting.
    pub fn wake_fd(&self) -> i32 {
        self.doorbell.as_raw_fd()
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
                let key = session_key(&job.session);
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
                self.turn_over(key, turn);
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
                st.running.push(session_key(&job.session));
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

    /// Queues `what` for the ring; gives it back once the ring was given up.
    fn hand_back(&self, what: Handback) -> Option<Handback> {
        let mut st = lock(&self.state);
        if st.direct {
            return Some(what);
        }
        self.push(&mut st, what);
        None
    }

    fn push(&self, st: &mut State, what: Handback) {
        if st.done.is_empty() {
            // Only EAGAIN can fail this, at a count of 2^64 - 2: unreachable by far.
            let _ = (&self.doorbell).write(&1u64.to_ne_bytes());
        }
        st.done.push(what);
    }

    /// A turn ended: the ring takes its connection back, or, once the ring was given up,
    /// whoever waits for it in `wait_turn` is told (the output stays in the session).
    fn turn_over(&self, key: usize, turn: Handback) {
        let mut st = lock(&self.state);
        if let Some(at) = st.running.iter().position(|&k| k == key) {
            st.running.swap_remove(at);
        }
        if !st.direct {
            self.push(&mut st, turn);
            return;
        }
        drop(st);
        self.turn_cv.notify_all();
    }

    /// Waits, without the GIL, until the turn of `session` that was running when the ring was
    /// given up is over. No bound: it lasts as long as the app call, as inline.
    pub fn wait_turn(&self, session: &Arc<Mutex<Session>>) {
        let key = session_key(session);
        let mut st = lock(&self.state);
        while st.running.contains(&key) {
            st = self.turn_cv.wait(st).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// From the ring thread, when it gives the ring up: no turn starts any more and nothing
    /// is handed back. Until the returned guard goes, the turns still running wait at their
    /// next send or body read, so the caller can first give each connection what the ring
    /// did not send for it.
    pub fn halt(&self) -> Halted<'_> {
        let mut st = lock(&self.state);
        st.direct = true;
        let unstarted = st.jobs.drain(..).map(|job| job.fd).collect();
        let done = std::mem::take(&mut st.done);
        Halted {
            pool: self,
            _st: st,
            done,
            unstarted,
        }
    }

    /// From the ring thread: everything handed back since the last call, in order.
    pub fn take_done(&self, into: &mut Vec<Handback>) {
        let mut st = lock(&self.state);
        into.append(&mut st.done);
    }

    /// From the ring thread: input arrived (or a connection ended) for a connection whose
    /// app may be waiting in a body read.
    pub fn input_arrived(&self) {
        let _st = lock(&self.state);
        self.input_cv.notify_all();
    }

    /// Waits, without the GIL, until the ring delivers input for `io`, its connection ends,
    /// the ring is given up, or the body timeout passes.
    fn wait_for_input(&self, io: &SharedIo) -> Result<Input, BodyError> {
        let deadline = Instant::now() + self.body_timeout;
        let mut st = lock(&self.state);
        let (start, resume) = {
            let mut io = lock_io(io);
            if let Some(why) = io.severed {
                return Err(BodyError::Disconnected(why));
            }
            let paused = std::mem::take(&mut io.input_paused);
            (io.arrivals_seen, paused.then_some(io.fd))
        };
        if let Some(fd) = resume.filter(|_| !st.direct) {
            // The ring stopped receiving while input piled up; the app has read it all now.
            self.push(&mut st, Handback::Resume { fd, io: io.clone() });
        }
        loop {
            {
                let io = lock_io(io);
                if let Some(why) = io.severed {
                    return Err(BodyError::Disconnected(why));
                }
                if io.arrivals != start {
                    return Ok(Input::Arrived);
                }
            }
            if st.direct {
                return Ok(Input::Direct);
            }
            if st.stopping {
                return Err(BodyError::Disconnected(None));
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

/// The ring thread's hold on a halted pool (see `AppThreads::halt`).
pub struct Halted<'a> {
    pool: &'a AppThreads,
    _st: MutexGuard<'a, State>,
    /// What was handed back and not taken by the ring yet.
    done: Vec<Handback>,
    /// Connections whose turn was queued and never started.
    pub unstarted: Vec<i32>,
}

impl Halted<'_> {
    /// The early sends (plaintext) of the connection of `io` that the ring never took, in
    /// order. Turns that ended untaken need nothing: their output stays in the session.
    pub fn sends_of(&mut self, io: &SharedIo) -> Vec<Vec<u8>> {
        let mut sends = Vec::new();
        self.done.retain_mut(|back| match back {
            Handback::Send { io: of, bytes, .. } if Arc::ptr_eq(of, io) => {
                sends.push(std::mem::take(bytes));
                false
            }
            _ => true,
        });
        sends
    }
}

impl Drop for Halted<'_> {
    fn drop(&mut self) {
        // Body reads waiting for the ring go to the socket now.
        self.pool.input_cv.notify_all();
    }
}

/// What identifies a turn's session while it runs.
fn session_key(session: &Arc<Mutex<Session>>) -> usize {
    Arc::as_ptr(session) as usize
}

/// The app's view of its connection on a pool thread: early sends and body waits go
/// through the ring thread, never into the ring from here; once the ring is given up,
/// straight to the socket.
struct PoolTransport {
    pool: Arc<AppThreads>,
}

impl Transport for PoolTransport {
    fn send_now(&self, py: Python<'_>, io: &SharedIo, bytes: Vec<u8>) -> Result<(), BodyError> {
        let (fd, severed) = {
            let io = lock_io(io);
            (io.fd, io.severed)
        };
        if let Some(why) = severed {
            return Err(BodyError::Disconnected(why));
        }
        let send = Handback::Send {
            fd,
            io: io.clone(),
            bytes,
        };
        let Some(Handback::Send { bytes, .. }) = self.pool.hand_back(send) else {
            return Ok(());
        };
        let wait = self.pool.body_timeout;
        py.detach(|| direct::send_plain(io, bytes, wait))
    }

    fn pull(&self, py: Python<'_>, io: &SharedIo) -> Result<(), BodyError> {
        py.detach(|| match self.pool.wait_for_input(io)? {
            Input::Arrived => Ok(()),
            Input::Direct => direct::pull(io, self.pool.body_timeout),
        })
    }
}
