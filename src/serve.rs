//! UringServer, the native serve loop: the hot-path ring, the HTTP session and the WSGI
//! bridge composed. The GIL is released while waiting in the kernel and taken once per batch
//! of ready connections; received bytes are copied out and their buffers recycled at once.

use std::net::IpAddr;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use pyo3::prelude::*;
use pyo3::types::PyDict;

use crate::deadline::{Awaiting, Deadlines, Kind, Phase, Timeouts, Timer};
use crate::direct;
use crate::errors::{BodyError, RingError, RingResult};
use crate::fdmap::FdMap;
use crate::handover::{ConnState, HandedOver, Handover};
use crate::heartbeat::{Beating, Pulse};
use crate::hotpath::{Accepting, CancelTicket, Completion, Hotpath, OpKind};
use crate::hotpath_py::stats_dict;
use crate::http::Limits;
use crate::metrics::RingPublisher;
use crate::owner::Owner;
use crate::pool::{AppThreads, Handback, Job};
use crate::protocol::PyWsgiApp;
use crate::pyargs::fd_of;
use crate::session::{Session, OUT_HIGH_WATER};
use crate::tls::{self, TlsFailure, TlsFilter};
use crate::tls_failures;
use crate::transport::{lock_io, ConnIo, SharedIo, Transport};
use crate::uring::{close_fd, peer_addr, send_waiting};
use crate::working::{lock_session, WorkPool, Working};
use crate::wsgi::environ::{Peer, PeerHost};

/// While this much response data waits to be sent to a peer, its further requests wait: the
/// session's own high-water mark, applied to what the ring has not sent yet.
const SEND_HIGH_WATER: u32 = OUT_HIGH_WATER as u32;
/// Within this many connections of the cap, accepts take one connection at a time, so the
/// cap holds exactly; further below it, one multishot accept takes as many as come.
const ONE_AT_A_TIME_WITHIN: usize = 64;
/// A peer that sends this much more while not reading its responses is cut off.
const INPUT_CAP_WHILE_BLOCKED: usize = 8 << 20;
/// Past this much input held for a connection whose app call runs on an app thread, the
/// ring stops receiving for it until the app reads it or the turn ends: the kernel's socket
/// buffer holds the rest, as when the app runs inline.
const INPUT_CAP_ON_POOL: usize = 1 << 20;
/// How long stopping waits for the kernel to confirm every cancelled operation.
const SHUTDOWN_WAIT: Duration = Duration::from_secs(5);
/// How long stopping waits for app calls still running on the pool (a graceful stop has
/// already let them finish); the threads left running then are logged.
const POOL_STOP_WAIT: Duration = Duration::from_secs(2);

/// What a connection holds between its turns.
enum State {
    /// Resting between requests: its working state went back to the pool and only the peer's
    /// address stays (None: it could not be read).
    Idle { ip: Option<IpAddr>, port: u16 },
    /// Lent a working state, whose session holds the peer meanwhile.
    Working(Working),
}

const NO_PEER: State = State::Idle { ip: None, port: 0 };

struct Conn {
    state: State,
    sends_in_flight: u32,
    /// Response bytes handed to the ring and not yet confirmed sent.
    unsent: u32,
    /// Why the connection broke (an errno): it is closed without answering further.
    broken: Option<i32>,
    /// The session is over; the fd closes once its sends complete.
    closing: bool,
    queued: bool,
    /// Which timeout the connection is under (its deadline lives in `Core::timers`).
    phase: Phase,
    /// Its deadline passed while input waited to be handled: the next turn decides.
    overdue: bool,
    /// Whether its session is running on an app thread (one byte, so that an idle
    /// connection's slot stays small).
    on_pool: OnPool,
}

/// A connection's turn on the app threads: while it runs, the ring leaves the connection's
/// session alone, so its requests stay in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum OnPool {
    No,
    Running,
    /// Something happened while it ran: the connection takes another turn after this one.
    RunAgain,
}

impl Conn {
    fn busy(&self) -> bool {
        self.on_pool != OnPool::No
    }
}

/// The per-worker connection cap: at it the listener's accept is cancelled, so new peers
/// wait in the kernel's backlog until connections drop.
struct ConnCap {
    listener: i32,
    max: usize,
    /// How the listener accepts now; Paused until serving starts.
    mode: Accepting,
    pauses: u64,
    /// Other workers accept on the same socket. The kernel wakes one waiting accept per
    /// connection, always the first queued, so an accept that stays armed (multishot) would
    /// take every connection; re-arming one at a time puts this worker back in line.
    shared: bool,
}

/// Everything the loop and the app's body reads share. Its lock is never held while Python
/// runs, only while delivering completions or waiting in the kernel without the GIL.
struct Core {
    hp: Hotpath,
    limits: Limits,
    /// Set when connections speak TLS: each gets its own session of these settings.
    tls: Option<Arc<rustls::ServerConfig>>,
    wake: i32,
    conns: FdMap<Conn>,
    /// Working states for the connections that have something to do.
    pool: WorkPool,
    /// Connections with input or a state change to act on, in arrival order.
    queue: Vec<i32>,
    /// Closed connections whose fds wait for their final CQEs before close().
    unclosed: Vec<CancelTicket>,
    /// The wake socket got a byte (a shutdown request, or a signal through Python's wakeup fd):
    /// the loop returns to Python to ask whether to stop.
    woken: bool,
    torn_down: bool,
    /// Times the loop took the GIL to run sessions: once per batch of ready connections.
    gil_batches: u64,
    /// Connections the batches ran, summed.
    batched_conns: u64,
    /// Header, keep-alive and body deadlines; one ring timer is armed for the earliest.
    timers: Deadlines,
    /// Connections closed by each timeout (header, keep-alive, body).
    timed_out: [u64; 3],
    cap: ConnCap,
    /// This worker's metrics slot, refreshed before every wait.
    metrics: Option<RingPublisher>,
    /// This worker's heartbeat (`--timeout`): it moves on every wait, idle or not, and
    /// stops while an app call holds this thread.
    heartbeat: Option<Beating>,
    /// The ring is being given up: accepted connections are no longer armed.
    evacuated: bool,
    /// Times the loop handed its connections to epoll (0 or 1: it happens once).
    fallback_engaged: u64,
    /// Set from any thread by `force_unhealthy`: the reason, and whether the ring may still
    /// be entered to cancel its operations.
    forced: Forced,
    /// What the ring's loop hands over, once it gave the ring up; sessions that were
    /// running then finish their turn into it.
    handed: Option<HandoverData>,
    /// The app threads (`threads > 1`); without it sessions run inline on this thread.
    app_threads: Option<Arc<AppThreads>>,
    /// The pool rang its doorbell (the only fd the ring polls): turns or early sends were
    /// handed back.
    pool_woken: bool,
    /// A busy connection received something: body reads on the pool are told.
    input_moved: bool,
    handbacks: Vec<Handback>,
    /// TLS sessions that failed since the loop last held the GIL: the peer and why.
    tls_failures: Vec<(String, TlsFailure)>,
    /// Times a connection's recv was stopped for `INPUT_CAP_ON_POOL`.
    input_pauses: u64,
}

/// Set by `force_unhealthy`: the reason and whether the ring can still be entered.
type Forced = Arc<Mutex<Option<(String, bool)>>>;

/// The earlier of two optional instants. The loop's wake-up is the earliest of the next
/// connection deadline, the drain's end and the next heartbeat (an idle loop still wakes to
/// beat); the ring's one timer is only re-armed when it moves earlier, so about once a beat.
fn earliest(a: Option<Instant>, b: Option<Instant>) -> Option<Instant> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

fn lock(core: &Mutex<Core>) -> MutexGuard<'_, Core> {
    core.lock().unwrap_or_else(|p| p.into_inner())
}

fn queue_send(hp: &mut Hotpath, fd: i32, conn: &mut Conn, out: Vec<u8>) -> RingResult<()> {
    conn.sends_in_flight += 1;
    let len = u32::try_from(out.len()).unwrap_or(u32::MAX);
    conn.unsent = conn.unsent.saturating_add(len);
    hp.submit_send(fd, out)
}

/// A turn's output as it goes on the wire: the lent buffer itself, or under TLS its records
/// sealed into a spare buffer (with close_notify when closing) while the plaintext buffer
/// goes back to the pool.
fn wire_out(hp: &mut Hotpath, io: &mut ConnIo, closing: bool) -> Vec<u8> {
    let plain = io.take_out();
    let Some(tls) = io.tls.as_deref_mut() else {
        return plain;
    };
    let mut wire = hp.spare_buffer();
    tls.seal(&plain, closing, &mut wire);
    hp.recycle(plain);
    wire
}

impl Conn {
    fn working(&self) -> Option<&Working> {
        match &self.state {
            State::Working(w) => Some(w),
            State::Idle { .. } => None,
        }
    }

    /// The working state, lent from `pool` first if the connection was idle.
    fn work(&mut self, pool: &mut WorkPool, limits: Limits, fd: i32) -> &Working {
        if let State::Idle { ip, port } = self.state {
            let peer = match ip {
                Some(ip) => Peer::new(PeerHost::Ip(ip), port),
                None => Peer::unknown(),
            };
            let requests = self.phase.requests();
            self.state = State::Working(pool.lend(limits, fd, peer, requests));
        }
        match &self.state {
            State::Working(w) => w,
            State::Idle { .. } => unreachable!("lent just above"),
        }
    }

    /// Gives the working state back to `pool` if the connection now rests between requests.
    fn rest(&mut self, pool: &mut WorkPool) {
        if let State::Working(_) = self.state {
            let State::Working(w) = std::mem::replace(&mut self.state, NO_PEER) else {
                unreachable!("matched just above")
            };
            self.state = match pool.take_back(w) {
                Ok(peer) => State::Idle {
                    // This loop makes no other kind of peer (see `open`).
                    ip: match peer.host {
                        PeerHost::Ip(ip) => Some(ip),
                        PeerHost::Name(_) => None,
                    },
                    port: peer.port,
                },
                Err(w) => State::Working(w),
            };
        }
    }
}

fn mark(queue: &mut Vec<i32>, fd: i32, conn: &mut Conn) {
    if !conn.queued {
        conn.queued = true;
        queue.push(fd);
    }
}

impl Core {
    fn publish_metrics(&mut self) {
        if let Some(m) = self.metrics.as_mut() {
            m.publish(&self.hp, self.conns.len());
        }
    }

    /// Hands every reaped completion to its connection.
    fn deliver(&mut self) -> RingResult<()> {
        self.hp.reap()?;
        while let Some(done) = self.hp.ready.pop_front() {
            match done.op {
                OpKind::Accept if done.result >= 0 => self.open(done.result)?,
                OpKind::Recv => self.on_recv(done)?,
                OpKind::Send => self.on_send(done),
                OpKind::Poll => self.pool_woken = true,
                // Accept errors are re-armed (or paused on EMFILE) by the engine; the timer
                // only wakes the wait.
                OpKind::Accept | OpKind::AcceptRetry | OpKind::Timer => {}
            }
        }
        let hp = &self.hp;
        self.unclosed.retain(|ticket| {
            let done = hp.cancel_done(ticket);
            if done {
                close_fd(ticket.fd);
            }
            !done
        });
        if std::mem::take(&mut self.input_moved) {
            if let Some(threads) = &self.app_threads {
                threads.input_arrived();
            }
        }
        Ok(())
    }

    fn open(&mut self, fd: i32) -> RingResult<()> {
        // A peer gone before getpeername still gets a session; its recv reports the end.
        let state = match peer_addr(fd) {
            Ok(Some((ip, port))) => State::Idle { ip: Some(ip), port },
            _ => NO_PEER,
        };
        let (phase, timer) = Phase::opened();
        // Idle until its first bytes arrive: a connection that never sends costs no session.
        let mut conn = Conn {
            state,
            sends_in_flight: 0,
            unsent: 0,
            broken: None,
            closing: false,
            queued: false,
            phase,
            overdue: false,
            on_pool: OnPool::No,
        };
        if self.tls.is_some() {
            // Under TLS the working state holds the TLS session, so it is the connection's
            // from accept to close (the pool never takes it back while it is open).
            let io = conn.work(&mut self.pool, self.limits, fd).io.clone();
            let attached = self.attach_tls(&io);
            drop(io);
            if !attached {
                if let State::Working(w) = conn.state {
                    self.pool.recycle(w);
                }
                close_fd(fd);
                return self.regulate_accepts();
            }
        }
        self.conns.insert(fd, conn);
        self.timers.apply(fd as u32, timer, Instant::now());
        if self.evacuated {
            return Ok(());
        }
        self.hp.submit_recv_multishot(fd)?;
        self.regulate_accepts()
    }

    fn on_recv(&mut self, done: Completion) -> RingResult<()> {
        let Some(conn) = self.conns.get_mut(done.fd) else {
            if done.fd == self.wake {
                self.woken = true;
            }
            if let Some(bid) = done.buf_id {
                self.hp.release_buffer(bid.into())?;
            }
            return Ok(());
        };
        match (done.result, done.buf_id) {
            (n, Some(bid)) if n > 0 => {
                let data = self.hp.buffer(bid.into(), n as usize)?;
                let on_pool = conn.busy();
                let w = conn.work(&mut self.pool, self.limits, done.fd);
                let mut io = lock_io(&w.io);
                io.arrivals = io.arrivals.wrapping_add(1);
                let reply = tls::receive_wire(&mut io, data);
                let failure = tls::take_failure(&mut io);
                let pause = on_pool && io.conn.buffered() > INPUT_CAP_ON_POOL;
                if pause {
                    io.input_paused = true;
                }
                drop(io);
                if let Some(why) = failure {
                    if let Some(m) = &self.metrics {
                        m.slot().tls_failed();
                    }
                    // Logged where the loop holds the GIL (`log_tls_failures`).
                    let peer = tls_failures::peer_text(peer_addr(done.fd).ok().flatten());
                    self.tls_failures.push((peer, why));
                }
                self.hp.release_buffer(bid.into())?;
                if pause && !self.hp.recv_paused(done.fd) {
                    self.hp.pause_recv(done.fd)?;
                    self.input_pauses += u64::from(self.hp.recv_paused(done.fd));
                }
                if !reply.is_empty() {
                    queue_send(&mut self.hp, done.fd, conn, reply)?;
                }
            }
            (0, _) => {
                let w = conn.work(&mut self.pool, self.limits, done.fd);
                let mut io = lock_io(&w.io);
                io.arrivals = io.arrivals.wrapping_add(1);
                io.conn.receive_eof();
            }
            (n, _) => {
                if let Some(w) = conn.working() {
                    lock_io(&w.io).severed = Some(Some(-n));
                }
                conn.broken = Some(-n);
            }
        }
        self.input_moved |= conn.busy();
        mark(&mut self.queue, done.fd, conn);
        Ok(())
    }

    fn on_send(&mut self, done: Completion) {
        let Some(conn) = self.conns.get_mut(done.fd) else {
            return;
        };
        conn.sends_in_flight = conn.sends_in_flight.saturating_sub(1);
        let was_blocked = conn.unsent > SEND_HIGH_WATER;
        if done.result < 0 {
            conn.broken = Some(-done.result);
        } else {
            conn.unsent = conn.unsent.saturating_sub(done.result as u32);
        }
        let unblocked = was_blocked && conn.unsent <= SEND_HIGH_WATER;
        if conn.unsent == 0 && conn.sends_in_flight == 0 && !conn.closing {
            let timer = conn.phase.flushed();
            self.timers.apply(done.fd as u32, timer, Instant::now());
        }
        if conn.broken.is_some() || unblocked || (conn.closing && conn.sends_in_flight == 0) {
            mark(&mut self.queue, done.fd, conn);
        }
    }

    fn send(&mut self, fd: i32, out: Vec<u8>) -> RingResult<()> {
        match self.conns.get_mut(fd) {
            Some(conn) => queue_send(&mut self.hp, fd, conn, out),
            None => Ok(()),
        }
    }

    /// After a session's turn: sends what it produced (the lent buffer goes back to the pool
    /// if it stayed empty) and closes the connection if it is over and nothing is in flight.
    fn finish_turn(&mut self, fd: i32, closing: bool) -> RingResult<()> {
        if let Some(handed) = self.handed.as_mut() {
            // The ring was given up during the turn: the output waits for epoll.
            if let Some(conn) = handed.conns.iter_mut().find(|c| c.fd == fd) {
                let out = wire_out(&mut self.hp, &mut lock_io(&conn.state.io), closing);
                conn.unsent.extend_from_slice(&out);
                self.hp.recycle(out);
            }
            return Ok(());
        }
        let Some(conn) = self.conns.get_mut(fd) else {
            return Ok(());
        };
        conn.closing = closing;
        let Some(w) = conn.working() else {
            return Ok(());
        };
        let out = wire_out(&mut self.hp, &mut lock_io(&w.io), closing);
        if out.is_empty() {
            self.hp.recycle(out);
        } else {
            queue_send(&mut self.hp, fd, conn, out)?;
        }
        if closing {
            if conn.sends_in_flight == 0 {
                self.close(fd)?;
            }
        } else {
            conn.rest(&mut self.pool);
        }
        Ok(())
    }

    /// Gives a new connection its TLS session when the server speaks TLS; false when rustls
    /// could not start one (loading the settings checked that it can), and the connection is
    /// then refused, never served in the clear.
    fn attach_tls(&self, io: &SharedIo) -> bool {
        let Some(config) = &self.tls else {
            return true;
        };
        match TlsFilter::new(config) {
            Ok(filter) => {
                lock_io(io).tls = Some(Box::new(filter));
                true
            }
            Err(_) => false,
        }
    }

    /// Closes a connection the server ends on its own (a timeout, a graceful stop). Under
    /// TLS the peer first gets close_notify, so it can tell this end from a cut connection;
    /// best effort and without waiting: a few bytes, into a socket with nothing else queued.
    fn close_owing_nothing(&mut self, fd: i32) -> RingResult<()> {
        if let Some(conn) = self.conns.get(fd) {
            if let State::Working(w) = &conn.state {
                if conn.sends_in_flight == 0 && conn.unsent == 0 {
                    let wire = tls::farewell(&mut lock_io(&w.io));
                    if !wire.is_empty() {
                        let _ = send_waiting(fd, &wire, Duration::ZERO);
                    }
                }
            }
        }
        self.close(fd)
    }

    /// Forgets the connection and cancels its ops; the fd closes after their final CQEs, so
    /// its number cannot be reused while the kernel still holds them.
    fn close(&mut self, fd: i32) -> RingResult<()> {
        if let Some(conn) = self.conns.remove(fd) {
            let busy = conn.busy();
            if let State::Working(w) = conn.state {
                if busy {
                    // Its app may be waiting for body bytes on a pool thread: none will come.
                    lock_io(&w.io).severed.get_or_insert(conn.broken);
                    if let Some(threads) = &self.app_threads {
                        threads.input_arrived();
                    }
                }
                self.pool.recycle(w);
            }
        }
        self.timers.stop(fd as u32);
        let ticket = self.hp.begin_cancel_fd(fd)?;
        if self.hp.cancel_done(&ticket) {
            close_fd(fd);
        } else {
            self.unclosed.push(ticket);
        }
        self.regulate_accepts()
    }

    /// One enter, unless work is already waiting; then every completion delivered. A signal
    /// (EINTR) just ends the wait: the caller runs Python's handlers after every pass. Once
    /// draining, `deadline` (the end of the grace period) bounds the wait too.
    fn wait(&mut self, deadline: Option<Instant>) -> RingResult<()> {
        self.beat();
        self.deliver()?;
        self.expire()?;
        if !self.queue.is_empty()
            || self.woken
            || self.pool_woken
            || deadline.is_some_and(|at| Instant::now() >= at)
        {
            return Ok(());
        }
        let due = earliest(self.timers.next_due(), deadline);
        let wake = earliest(due, self.heartbeat.as_ref().map(Beating::due));
        self.hp.set_timer(wake)?;
        if let Err(e) = self.hp.enter(1, None) {
            self.hp.enter_failed(e)?;
        }
        self.deliver()?;
        self.expire()
    }

    fn beat(&mut self) {
        if let Some(h) = self.heartbeat.as_mut() {
            h.tick();
        }
    }

    /// Closes the connections whose deadline passed. One with input still to handle is only
    /// marked: the loop may have been slow, not the peer, so its turn decides.
    fn expire(&mut self) -> RingResult<()> {
        if self.timers.is_empty() {
            return Ok(());
        }
        let now = Instant::now();
        while let Some((fd, kind)) = self.timers.pop_expired(now) {
            let fd = fd as i32;
            match self.conns.get_mut(fd) {
                Some(conn) if conn.queued || conn.busy() => conn.overdue = true,
                Some(_) => {
                    self.timed_out[kind.index()] += 1;
                    self.close_owing_nothing(fd)?;
                }
                None => {}
            }
        }
        Ok(())
    }

    /// After a session's turn: which timeout the connection is under now. One whose
    /// deadline passed during the wait for its turn is closed if the turn kept it waiting
    /// for the same thing.
    fn retime(&mut self, fd: i32, awaiting: Awaiting) -> RingResult<()> {
        let Some(conn) = self.conns.get_mut(fd) else {
            return Ok(());
        };
        let was = conn.phase.kind();
        let timer = conn.phase.after_turn(awaiting, conn.unsent > 0);
        let overdue = std::mem::take(&mut conn.overdue);
        if overdue && timer == Timer::Keep {
            if let Some(kind) = was {
                self.timed_out[kind.index()] += 1;
            }
            return self.close_owing_nothing(fd);
        }
        self.timers.apply(fd as u32, timer, Instant::now());
        Ok(())
    }

    /// Arms accepts to fit the connection cap: paused at it, one at a time near it.
    fn regulate_accepts(&mut self) -> RingResult<()> {
        if self.torn_down {
            return Ok(());
        }
        let mode = match self.cap.max.saturating_sub(self.conns.len()) {
            0 => Accepting::Paused,
            _ if self.cap.shared => Accepting::One,
            room if room <= ONE_AT_A_TIME_WITHIN => Accepting::One,
            _ => Accepting::Many,
        };
        // One at a time is re-armed after every accept; the others only on a change.
        if mode == self.cap.mode && mode != Accepting::One {
            return Ok(());
        }
        if mode == Accepting::Paused {
            self.cap.pauses += 1;
        }
        self.cap.mode = mode;
        self.hp.set_accepting(self.cap.listener, mode)
    }

    /// The queued connections' sessions; broken ones are closed here instead.
    fn take_batch(&mut self, batch: &mut Vec<(i32, Arc<Mutex<Session>>)>) -> RingResult<()> {
        let queue = std::mem::take(&mut self.queue);
        for &fd in &queue {
            let Some(conn) = self.conns.get_mut(fd) else {
                continue;
            };
            conn.queued = false;
            if conn.busy() {
                conn.on_pool = OnPool::RunAgain;
                continue;
            }
            let blocked = conn.unsent > SEND_HIGH_WATER;
            // One lock of its I/O state per connection and turn serves both uses below.
            let work = conn.working().map(|w| (w, lock_io(&w.io)));
            let buffered = work.as_ref().map_or(0, |(_, io)| io.conn.buffered());
            let flooding = blocked && buffered > INPUT_CAP_WHILE_BLOCKED;
            if conn.broken.is_some() || flooding || (conn.closing && conn.sends_in_flight == 0) {
                drop(work);
                self.close(fd)?;
            } else if blocked {
                // Back-pressure: answer nothing more until the peer reads what it was sent;
                // the send completion that drains it queues the connection again.
            } else if let Some((w, mut io)) = work {
                // Output goes into a recycled buffer lent for this turn only, so an idle
                // connection holds none.
                if io.out.capacity() == 0 {
                    io.out = self.hp.spare_buffer();
                }
                drop(io);
                batch.push((fd, w.session.clone()));
            }
            // An idle connection (its send drained after it went idle) has nothing to answer.
        }
        self.queue = queue;
        self.queue.clear();
        Ok(())
    }

    /// With a pool: the batch's turns go to it, each connection busy until its turn is back.
    fn dispatch(&mut self, batch: &mut Vec<(i32, Arc<Mutex<Session>>)>) {
        let Some(pool) = self.app_threads.clone() else {
            return;
        };
        for (fd, _) in batch.iter() {
            if let Some(conn) = self.conns.get_mut(*fd) {
                conn.on_pool = OnPool::Running;
            }
        }
        pool.submit(batch.drain(..).map(|(fd, session)| Job { fd, session }));
    }

    /// What the pool handed back, in order: early sends go out, finished turns are sent,
    /// retimed, and take another turn if input came meanwhile.
    fn take_handbacks(&mut self) -> RingResult<()> {
        let Some(pool) = self.app_threads.clone() else {
            return Ok(());
        };
        self.pool_woken = false;
        let mut done = std::mem::take(&mut self.handbacks);
        pool.take_done(&mut done);
        let mut result = Ok(());
        for back in done.drain(..) {
            if result.is_err() {
                continue;
            }
            result = match back {
                Handback::Send { fd, io, bytes } => match self.conn_of(fd, &io) {
                    // Sealed here, on the ring thread, so TLS records follow the send order.
                    Some(_) => {
                        let bytes = tls::sealed(&mut lock_io(&io), bytes);
                        self.send(fd, bytes)
                    }
                    None => Ok(()),
                },
                Handback::Turn {
                    fd,
                    io,
                    closing,
                    awaiting,
                } => self.turn_done(fd, io, closing, awaiting),
                Handback::Resume { fd, io } => match self.conn_of(fd, &io) {
                    Some(_) => self.hp.resume_recv(fd),
                    None => Ok(()),
                },
            };
        }
        self.handbacks = done;
        result
    }

    fn turn_done(
        &mut self,
        fd: i32,
        io: SharedIo,
        closing: bool,
        awaiting: Awaiting,
    ) -> RingResult<()> {
        let ours = self.conn_of(fd, &io).is_some();
        if ours && self.hp.recv_paused(fd) {
            // The ring takes the connection back: input is its to hold back again.
            lock_io(&io).input_paused = false;
            self.hp.resume_recv(fd)?;
        }
        // Dropped first: a connection now at rest gives its state back only if unshared.
        drop(io);
        let Some(conn) = self.conns.get_mut(fd).filter(|_| ours) else {
            return Ok(());
        };
        let requeue = conn.on_pool == OnPool::RunAgain;
        conn.on_pool = OnPool::No;
        self.finish_turn(fd, closing)?;
        self.retime(fd, awaiting)?;
        if let Some(conn) = self.conns.get_mut(fd).filter(|_| requeue) {
            mark(&mut self.queue, fd, conn);
        }
        Ok(())
    }

    /// The connection on `fd` if it is still the one `io` belongs to: once a connection
    /// closes, its fd number may already name another.
    fn conn_of(&self, fd: i32, io: &SharedIo) -> Option<&Conn> {
        self.conns
            .get(fd)
            .filter(|c| c.working().is_some_and(|w| Arc::ptr_eq(&w.io, io)))
    }

    /// Waits, without the GIL, until connection `fd` has received something. True when the
    /// ring was given up instead (it is unhealthy): the caller reads the socket itself then.
    fn wait_for_input(&mut self, fd: i32, io: &SharedIo) -> Result<bool, BodyError> {
        if self.handed.is_some() {
            return Ok(true);
        }
        // A wait for body bytes ends when the connection's receive count moves (a failed
        // receive breaks the connection, which ends it too).
        if self.conn_of(fd, io).is_none() {
            return Err(BodyError::Disconnected(None));
        }
        let start = lock_io(io).arrivals;
        let wait = self.timers.timeouts().body;
        let deadline = Instant::now() + wait;
        loop {
            let delivered = self.deliver();
            if self.sick() {
                // Given up at once, so the app's read carries on without the ring.
                self.hand_over_once();
                return Ok(true);
            }
            delivered?;
            match self.conn_of(fd, io) {
                None => return Err(BodyError::Disconnected(None)),
                Some(c) if c.broken.is_some() => return Err(BodyError::Disconnected(c.broken)),
                Some(_) if lock_io(io).arrivals != start => return Ok(false),
                Some(_) => {}
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(BodyError::TimedOut(wait));
            }
            if let Err(e) = self.hp.enter(1, Some(left)) {
                let _ = self.hp.enter_failed(e);
            }
        }
    }

    /// Closes every connection, cancels the accept and the wake-up recv, and tears the ring
    /// down once the kernel confirms (or the wait runs out).
    fn stop_serving(&mut self) -> bool {
        if self.torn_down {
            return true;
        }
        self.torn_down = true;
        let fds: Vec<i32> = self.conns.fds().collect();
        for fd in fds {
            let _ = self.close_owing_nothing(fd);
        }
        let confirmed = self.hp.shut_down(SHUTDOWN_WAIT);
        self.publish_metrics();
        for ticket in self.unclosed.drain(..) {
            close_fd(ticket.fd);
        }
        for done in self.hp.ready.drain(..) {
            if done.op == OpKind::Accept && done.result >= 0 {
                close_fd(done.result);
            }
        }
        confirmed
    }
}

/// One connection handed over, before it is wrapped for Python.
struct HandedConn {
    fd: i32,
    unsent: Vec<u8>,
    timer: Option<(&'static str, f64)>,
    overdue: bool,
    state: ConnState,
}

impl HandedConn {
    /// Connection `fd` with its working state `w`, as the adopting loop takes it.
    fn new(
        fd: i32,
        w: Working,
        phase: Phase,
        unsent: Vec<u8>,
        timer: Option<(&'static str, f64)>,
        overdue: bool,
        turn: Option<Arc<AppThreads>>,
    ) -> HandedConn {
        HandedConn {
            fd,
            unsent,
            timer,
            overdue,
            state: ConnState {
                io: w.io,
                session: w.session,
                phase,
                turn,
            },
        }
    }
}

/// What the loop hands over when its ring turns unhealthy, before it is wrapped for Python.
struct HandoverData {
    reason: String,
    conns: Vec<HandedConn>,
    woken: bool,
    dropped: usize,
    confirmed: bool,
}

/// Live fallback: a sick ring gives its connections, with their state, to the epoll loop.
impl Core {
    /// Cancels every operation and delivers what completes meanwhile (received bytes,
    /// accepted connections, send results); takes each connection's unsent output from the
    /// ring; closes the ring. A connection whose send the kernel never confirmed (the ring
    /// could not be entered) is closed: how much of it reached the peer is unknown. A
    /// connection whose app call runs on an app thread is handed over too: the call carries
    /// on, sending and reading on the socket itself, and the adopting loop waits for it.
    fn hand_over(&mut self) -> HandoverData {
        let reason = self
            .hp
            .unhealthy_reason()
            .unwrap_or("unknown reason")
            .to_owned();
        self.evacuated = true;
        self.torn_down = true;
        self.fallback_engaged += 1;
        let confirmed = self.hp.evacuate(SHUTDOWN_WAIT);
        // Without a confirmed end, only what the CQ already held is delivered.
        let _ = self.deliver();
        // The ring's last counters, before it goes.
        self.publish_metrics();
        let now = Instant::now();
        let mut conns = Vec::new();
        let mut to_close = Vec::new();
        let mut dropped = 0;
        // No turn starts and nothing comes back from the app threads any more; the turns
        // still running wait at their next send or body read until this is done.
        let threads = self.app_threads.clone();
        let mut halted = threads.as_deref().map(AppThreads::halt);
        for &fd in halted.iter().flat_map(|h| h.unstarted.iter()) {
            // Queued and never started: the adopting loop runs it.
            if let Some(conn) = self.conns.get_mut(fd) {
                conn.on_pool = OnPool::No;
            }
        }
        let fds: Vec<i32> = self.conns.fds().collect();
        for fd in fds {
            let Some(mut conn) = self.conns.remove(fd) else {
                continue;
            };
            if conn.busy() {
                let State::Working(w) = conn.state else {
                    unreachable!("a turn runs on a working state")
                };
                let (mut owed, unconfirmed) = self.hp.take_unsent(fd);
                let timer = self.take_timer(fd, now);
                if conn.broken.is_some() || unconfirmed {
                    // The peer is gone, or how much reached it is unknown: a body read of
                    // its app fails at once.
                    lock_io(&w.io).severed.get_or_insert(conn.broken);
                    dropped += usize::from(unconfirmed);
                    self.pool.recycle(w);
                    to_close.push(fd);
                    continue;
                }
                if let Some(halted) = halted.as_mut() {
                    // Early sends the ring never took go out after what it did take.
                    for plain in halted.sends_of(&w.io) {
                        owed.extend_from_slice(&tls::sealed(&mut lock_io(&w.io), plain));
                    }
                }
                lock_io(&w.io).owed = owed;
                conns.push(HandedConn::new(
                    fd,
                    w,
                    conn.phase,
                    Vec::new(),
                    timer,
                    conn.overdue,
                    threads.clone(),
                ));
                continue;
            }
            // A resting connection gets its working state back: epoll keeps one per connection.
            let resting = conn.working().is_none();
            conn.work(&mut self.pool, self.limits, fd);
            let State::Working(w) = conn.state else {
                unreachable!("lent just above")
            };
            if resting && conn.phase.requests() != 0 {
                // Between requests of a keep-alive connection, as a graceful stop must see it.
                lock_io(&w.io).conn.continue_kept_alive();
            }
            let (unsent, unconfirmed) = self.hp.take_unsent(fd);
            let timer = self.take_timer(fd, now);
            if unconfirmed {
                dropped += 1;
            }
            if conn.broken.is_some() || unconfirmed || (conn.closing && unsent.is_empty()) {
                self.pool.recycle(w);
                to_close.push(fd);
                continue;
            }
            conns.push(HandedConn::new(
                fd,
                w,
                conn.phase,
                unsent,
                timer,
                conn.overdue,
                None,
            ));
        }
        // The turns still running carry on, straight on their sockets.
        drop(halted);
        self.hp.close_ring(confirmed);
        // The ring is gone, and with it every operation that held these fds.
        for fd in to_close {
            close_fd(fd);
        }
        for ticket in self.unclosed.drain(..) {
            close_fd(ticket.fd);
        }
        HandoverData {
            reason,
            conns,
            woken: std::mem::take(&mut self.woken),
            dropped,
            confirmed,
        }
    }

    /// The running timeout of `fd` for the hand-over (its name and the seconds left), which
    /// this loop stops keeping.
    fn take_timer(&mut self, fd: i32, now: Instant) -> Option<(&'static str, f64)> {
        let timer = self.timers.deadline_of(fd as u32).map(|(kind, at)| {
            let left = at.saturating_duration_since(now).as_secs_f64();
            (kind.name(), left)
        });
        self.timers.stop(fd as u32);
        timer
    }

    /// Applies a pending `force_unhealthy`; true when the ring is unhealthy.
    fn sick(&mut self) -> bool {
        let forced = self.forced.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some((reason, ring_usable)) = forced {
            self.hp.simulate_dead_ring = !ring_usable;
            self.hp.mark_unhealthy(reason);
        }
        self.hp.unhealthy_reason().is_some()
    }

    /// Gives the ring up, unless that is done already.
    fn hand_over_once(&mut self) {
        if self.handed.is_none() {
            self.handed = Some(self.hand_over());
        }
    }

    /// The handed-over connection `io` belongs to.
    fn handed_conn(&mut self, fd: i32, io: &SharedIo) -> Option<&mut HandedConn> {
        let handed = self.handed.as_mut()?;
        handed
            .conns
            .iter_mut()
            .find(|c| c.fd == fd && Arc::ptr_eq(&c.state.io, io))
    }

    /// Sends to a handed-over connection directly, while the session that runs on it
    /// finishes its turn: what the ring left unsent first, then `bytes`.
    fn send_handed(&mut self, fd: i32, io: &SharedIo, bytes: &[u8]) -> Result<(), BodyError> {
        let wait = self.timers.timeouts().body;
        let Some(conn) = self.handed_conn(fd, io) else {
            return Err(BodyError::Disconnected(None));
        };
        let earlier = std::mem::take(&mut conn.unsent);
        for part in [&earlier[..], bytes] {
            match send_waiting(fd, part, wait) {
                Ok(true) => {}
                Ok(false) => return Err(BodyError::TimedOut(wait)),
                Err(e) => return Err(BodyError::Disconnected(e.raw_os_error())),
            }
        }
        Ok(())
    }
}

/// How a serve loop ended.
enum Ended {
    Stopped,
    /// The ring turned unhealthy; a graceful stop in progress ends at the deadline given.
    /// The flag says a wake-up was taken and not yet answered.
    Sick(Option<Instant>, bool),
}

/// A timeout option in seconds, as a Duration: positive and finite.
fn seconds(name: &str, value: f64) -> PyResult<Duration> {
    if value.is_finite() && value > 0.0 {
        Duration::try_from_secs_f64(value)
            .map_err(|e| RingError::InvalidArgument(format!("{name} = {value}: {e}")).into())
    } else {
        Err(RingError::InvalidArgument(format!(
            "{name} must be a positive number of seconds, not {value}"
        ))
        .into())
    }
}

/// Graceful stop (SIGTERM): no new connections, idle ones closed at once, the rest after
/// their current request, and whatever is left at the deadline closed as on a hard stop.
impl Core {
    /// Stops accepting, after handing every connection already accepted its session and
    /// every byte already received to its connection.
    fn begin_drain(&mut self) -> RingResult<()> {
        // With DEFER_TASKRUN, completions are posted only inside an enter.
        if let Err(e) = self.hp.enter(0, None) {
            self.hp.enter_failed(e)?;
        }
        self.deliver()?;
        // Connections resting now get their next state with keep-alive refused.
        self.pool.refuse_keep_alive = true;
        // No room for new connections: the cap's regulation keeps the accept paused.
        self.cap.max = 0;
        self.regulate_accepts()
    }

    /// Closes the keep-alive connections that hold no request; every other one answers its
    /// current request with `Connection: close`. True once none is left.
    fn drain_pass(&mut self) -> RingResult<bool> {
        let mut idle = Vec::new();
        for fd in self.conns.fds() {
            let Some(c) = self.conns.get(fd) else {
                continue;
            };
            let between_requests = match c.working() {
                Some(w) => {
                    let mut io = lock_io(&w.io);
                    io.conn.refuse_keep_alive();
                    io.out.is_empty() && io.conn.is_idle()
                }
                // Resting: idle once it has had a request (a new connection's first request,
                // or the end of its TLS handshake, may be on its way).
                None => c.phase.requests() != 0,
            };
            // A starved recv may have left bytes in the socket: not idle until they are read.
            if between_requests
                && !c.queued
                && !c.busy()
                && c.sends_in_flight == 0
                && !self.hp.recv_starved(fd)
            {
                idle.push(fd);
            }
        }
        for fd in idle {
            self.close_owing_nothing(fd)?;
        }
        Ok(self.conns.len() == 0 && self.unclosed.is_empty())
    }
}

/// What ends a serve loop gracefully: the caller's `draining()` after a wake-up, or the app's
/// request count reaching `max_requests`.
struct DrainPolicy<'py> {
    draining: Option<Bound<'py, PyAny>>,
    max_requests: u64,
    grace: Duration,
}

impl DrainPolicy<'_> {
    fn should_drain(&self, woken: bool, requests: u64) -> PyResult<bool> {
        let at_max = self.max_requests != 0 && requests >= self.max_requests;
        match &self.draining {
            Some(draining) if woken || at_max => draining.call0()?.is_truthy(),
            Some(_) => Ok(false),
            None => Ok(at_max),
        }
    }
}

/// The app's view of its connection while it reads a body: sending goes through the ring's
/// ordered send queue; waiting drives the ring, delivering other connections' input too.
struct LoopTransport {
    core: Weak<Mutex<Core>>,
}

impl Transport for LoopTransport {
    fn send_now(&self, py: Python<'_>, io: &SharedIo, bytes: Vec<u8>) -> Result<(), BodyError> {
        let fd = lock_io(io).fd;
        let shared = self.core.upgrade().ok_or(BodyError::Disconnected(None))?;
        let mut core = lock(&shared);
        if core.handed.is_some() {
            drop(core);
            let bytes = tls::sealed(&mut lock_io(io), bytes);
            return py.detach(|| lock(&shared).send_handed(fd, io, &bytes));
        }
        if core.conn_of(fd, io).is_none() {
            return Err(BodyError::Disconnected(None));
        }
        // Sealed under the loop's lock, so records reach the ring in the order they were made.
        let bytes = tls::sealed(&mut lock_io(io), bytes);
        core.send(fd, bytes)?;
        Ok(())
    }

    fn pull(&self, py: Python<'_>, io: &SharedIo) -> Result<(), BodyError> {
        let fd = lock_io(io).fd;
        let core = self.core.upgrade().ok_or(BodyError::Disconnected(None))?;
        let handed_over = py.detach(|| lock(&core).wait_for_input(fd, io))?;
        if handed_over {
            py.detach(|| pull_directly(&core, fd, io))?;
        }
        Ok(())
    }
}

/// A body read on a connection whose ring was given up mid-request: straight from the
/// socket, as the epoll loop's transport reads.
fn pull_directly(core: &Mutex<Core>, fd: i32, io: &SharedIo) -> Result<(), BodyError> {
    let wait = lock(core).timers.timeouts().body;
    direct::pull_with(io, wait, |reply| lock(core).send_handed(fd, io, &reply))
}

/// Serves one WSGI app on one listening socket with the native io_uring loop.
#[pyclass(module = "uringserve._uringserve", frozen)]
pub struct UringServer {
    owner: Owner,
    /// The one transport every connection's body reads go through (it finds the fd in the
    /// connection's ConnIo).
    transport: Arc<dyn Transport>,
    app: Py<PyWsgiApp>,
    core: Arc<Mutex<Core>>,
    setup_flags: Vec<&'static str>,
    /// Shared with the core, but never behind its lock: `force_unhealthy` may be called
    /// while the loop waits in the kernel holding that.
    forced: Forced,
    /// App threads: 1 runs the app inline on the ring thread.
    threads: usize,
}

impl UringServer {
    /// Stops the app threads once the ring is done with; logs those still in an app call.
    fn stop_app_threads(&self, py: Python<'_>) {
        let Some(pool) = lock(&self.core).app_threads.clone() else {
            return;
        };
        let running = py.detach(|| pool.stop(POOL_STOP_WAIT));
        if running > 0 {
            let msg =
                format!("{running} app thread(s) still running a request at stop; left to finish");
            let _ = self
                .app
                .get()
                .app()
                .error_log
                .call_method1(py, "warning", (msg,));
        }
    }

    /// Marks the ring unhealthy if `force_unhealthy` asked for it; true when it is unhealthy.
    fn sick(&self) -> bool {
        lock(&self.core).sick()
    }

    fn run(
        &self,
        py: Python<'_>,
        stopping: &Bound<'_, PyAny>,
        drain: &DrainPolicy<'_>,
    ) -> PyResult<Ended> {
        let app = self.app.get().app();
        let mut batch = Vec::new();
        // The graceful deadline, once draining.
        let mut deadline: Option<Instant> = None;
        loop {
            if self.sick() {
                return Ok(Ended::Sick(deadline, false));
            }
            let waited = py.detach(|| -> RingResult<_> {
                let mut core = lock(&self.core);
                // Before waiting: what the previous turns changed is settled.
                core.publish_metrics();
                core.wait(deadline)?;
                core.take_handbacks()?;
                core.take_batch(&mut batch)?;
                if !batch.is_empty() {
                    core.gil_batches += 1;
                    core.batched_conns += batch.len() as u64;
                }
                // With a pool the batch runs there, and this loop goes back to the ring.
                core.dispatch(&mut batch);
                // Taken here, under the lock already held; logged below, with the GIL.
                let tls_failed = std::mem::take(&mut core.tls_failures);
                Ok((std::mem::take(&mut core.woken), tls_failed))
            });
            let woken = match waited {
                Ok((woken, tls_failed)) => {
                    for (peer, why) in &tls_failed {
                        tls_failures::log(py, peer, why);
                    }
                    woken
                }
                Err(_) if self.sick() => return Ok(Ended::Sick(deadline, false)),
                Err(e) => return Err(e.into()),
            };
            // Every pass, not only after EINTR: a signal that lands while this thread is out
            // of the kernel interrupts nothing, and its Python handler must still run.
            py.check_signals()?;
            for (fd, session) in batch.drain(..) {
                let (closing, awaiting) = {
                    let mut session = lock_session(&session);
                    session.advance(py, app, &self.transport);
                    (session.closing(), session.awaiting())
                };
                // Dropped before the turn ends, so that a resting connection's state is
                // seen unshared and goes back to the pool.
                drop(session);
                let mut core = lock(&self.core);
                let turned = core
                    .finish_turn(fd, closing)
                    .and_then(|()| core.retime(fd, awaiting));
                // On a sick ring the output stays queued for the hand-over, and the other
                // sessions of the batch still run: epoll sends what they produce.
                if let Err(e) = turned {
                    if !core.sick() {
                        return Err(e.into());
                    }
                }
            }
            if woken && stopping.call0()?.is_truthy()? {
                return Ok(Ended::Stopped);
            }
            if self.sick() {
                return Ok(Ended::Sick(deadline, woken));
            }
            if deadline.is_none() && drain.should_drain(woken, app.requests())? {
                deadline = Some(Instant::now() + drain.grace);
                match py.detach(|| lock(&self.core).begin_drain()) {
                    Err(_) if self.sick() => return Ok(Ended::Sick(deadline, false)),
                    other => other?,
                }
            }
            if let Some(at) = deadline {
                match py.detach(|| lock(&self.core).drain_pass()) {
                    Ok(true) => return Ok(Ended::Stopped),
                    Err(_) if self.sick() => return Ok(Ended::Sick(deadline, false)),
                    Err(e) => return Err(e.into()),
                    Ok(false) if Instant::now() >= at => return Ok(Ended::Stopped),
                    Ok(false) => {}
                }
            }
        }
    }
}

#[pymethods]
impl UringServer {
    #[new]
    #[pyo3(signature = (
        app, listener, wake, *, queue_depth = 1024, n_bufs = 512, buf_size = 8192,
        header_timeout = 10.0, keep_alive_timeout = 5.0, body_timeout = 30.0,
        max_connections = 1000, shared_listener = false,
        threads = 1, heartbeat = None
    ))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        app: Py<PyWsgiApp>,
        listener: &Bound<'_, PyAny>,
        wake: &Bound<'_, PyAny>,
        queue_depth: u32,
        n_bufs: u32,
        buf_size: u32,
        header_timeout: f64,
        keep_alive_timeout: f64,
        body_timeout: f64,
        max_connections: usize,
        shared_listener: bool,
        threads: usize,
        heartbeat: Option<PyRef<'_, Pulse>>,
    ) -> PyResult<Self> {
        let listener = fd_of(listener)?;
        let wake = fd_of(wake)?;
        let timeouts = Timeouts {
            header: seconds("header_timeout", header_timeout)?,
            keep_alive: seconds("keep_alive_timeout", keep_alive_timeout)?,
            body: seconds("body_timeout", body_timeout)?,
        };
        if max_connections == 0 {
            return Err(
                RingError::InvalidArgument("max_connections must be at least 1".into()).into(),
            );
        }
        if threads == 0 {
            return Err(RingError::InvalidArgument("threads must be at least 1".into()).into());
        }
        let app_threads = match threads {
            1 => None,
            _ => Some(
                AppThreads::new(timeouts.body).map_err(|source| RingError::Setup {
                    what: "the app thread pool's eventfd",
                    source,
                })?,
            ),
        };
        let hp = Hotpath::new(queue_depth, n_bufs, buf_size)?;
        let forced = Forced::default();
        let setup_flags = hp.uring.report.flags.clone();
        let limits = app.get().limits();
        let tls = app.get().tls().cloned();
        let core = Arc::new(Mutex::new(Core {
            hp,
            limits,
            tls,
            wake,
            conns: FdMap::default(),
            pool: WorkPool::default(),
            queue: Vec::new(),
            unclosed: Vec::new(),
            woken: false,
            torn_down: false,
            gil_batches: 0,
            batched_conns: 0,
            timers: Deadlines::new(timeouts),
            timed_out: [0; 3],
            cap: ConnCap {
                listener,
                max: max_connections,
                mode: Accepting::Paused,
                pauses: 0,
                shared: shared_listener,
            },
            metrics: app
                .get()
                .app()
                .observer
                .metrics()
                .cloned()
                .map(RingPublisher::new),
            heartbeat: heartbeat.map(|p| Beating::new(p.clone())),
            evacuated: false,
            fallback_engaged: 0,
            forced: forced.clone(),
            handed: None,
            app_threads,
            pool_woken: false,
            input_moved: false,
            handbacks: Vec::new(),
            tls_failures: Vec::new(),
            input_pauses: 0,
        }));
        let transport: Arc<dyn Transport> = Arc::new(LoopTransport {
            core: Arc::downgrade(&core),
        });
        Ok(UringServer {
            owner: Owner::current(),
            transport,
            app,
            core,
            setup_flags,
            forced,
            threads,
        })
    }

    /// Serves until `stopping()` is true after the wake socket received a byte, then closes
    /// every connection and the ring. Must run on the thread that created the server; it can
    /// run once. Stops gracefully when `draining()` is true after a wake-up (asked also once
    /// `max_requests` requests were taken; without it, reaching that count is enough): no
    /// more accepts, idle connections closed, the others after their current request, the
    /// rest after `graceful_timeout` seconds.
    ///
    /// When the ring turns unhealthy (an unexpected enter or submit error, or
    /// `force_unhealthy()`), its operations are cancelled, the ring is closed and a Handover
    /// is returned: the open connections with their state, for the epoll loop to carry on.
    #[pyo3(signature = (stopping, *, draining = None, max_requests = 0, graceful_timeout = 30.0))]
    fn serve(
        &self,
        py: Python<'_>,
        stopping: &Bound<'_, PyAny>,
        draining: Option<Bound<'_, PyAny>>,
        max_requests: u64,
        graceful_timeout: f64,
    ) -> PyResult<Option<Handover>> {
        let grace = Duration::try_from_secs_f64(graceful_timeout).map_err(|_| {
            RingError::InvalidArgument(format!(
                "graceful_timeout must be a non-negative number of seconds, not {graceful_timeout}"
            ))
        })?;
        let drain = DrainPolicy {
            draining,
            max_requests,
            grace,
        };
        self.owner.check()?;
        {
            let mut core = lock(&self.core);
            if core.torn_down {
                return Err(RingError::Closed.into());
            }
            let wake = core.wake;
            core.regulate_accepts()?;
            core.hp.submit_recv_multishot(wake)?;
            if let Some(pool) = core.app_threads.clone() {
                core.hp.submit_poll_multishot(pool.wake_fd())?;
                if let Err(source) = pool.start(py, self.threads, &self.app) {
                    // Those that did start exit at once: no job can reach them.
                    pool.stop(Duration::ZERO);
                    return Err(RingError::Setup {
                        what: "starting the app threads",
                        source,
                    }
                    .into());
                }
            }
        }
        let served = self.run(py, stopping, &drain);
        if let Ok(Ended::Sick(deadline, woken)) = served {
            let data = py.detach(|| {
                let mut core = lock(&self.core);
                core.hand_over_once();
                core.handed.take().expect("just handed over")
            });
            // Idle app threads exit; busy ones once their turn, handed over, is done.
            if let Some(pool) = lock(&self.core).app_threads.clone() {
                pool.stop(Duration::ZERO);
            }
            let mut connections = Vec::with_capacity(data.conns.len());
            for c in data.conns {
                let handed = HandedOver::new(c.fd, c.unsent, c.timer, c.overdue, c.state);
                connections.push(Py::new(py, handed)?);
            }
            let now = Instant::now();
            return Ok(Some(Handover {
                reason: data.reason,
                connections,
                woken: woken || data.woken,
                dropped: data.dropped,
                confirmed: data.confirmed,
                drain_left: deadline.map(|at| at.saturating_duration_since(now).as_secs_f64()),
            }));
        }
        let confirmed = py.detach(|| lock(&self.core).stop_serving());
        self.stop_app_threads(py);
        served?;
        if !confirmed {
            return Err(RingError::Unhealthy(
                "stopping could not confirm that the kernel finished every operation; \
                 their memory was leaked rather than freed"
                    .into(),
            )
            .into());
        }
        Ok(None)
    }

    /// Makes the ring unhealthy, as an unexpected enter error would: the loop hands its
    /// connections over when it next wakes (write a byte to the wake socket to wake it now).
    /// Callable from any thread. With `ring_usable` false, the ring is treated as one that
    /// cannot be entered any more (nothing is cancelled; only completions already posted
    /// are read). A test hook.
    #[pyo3(signature = (reason = None, *, ring_usable = true))]
    fn force_unhealthy(&self, reason: Option<String>, ring_usable: bool) {
        let reason = reason.unwrap_or_else(|| "forced by force_unhealthy()".to_owned());
        let mut forced = self.forced.lock().unwrap_or_else(|p| p.into_inner());
        forced.get_or_insert((reason, ring_usable));
    }

    #[getter]
    fn setup_flags(&self) -> Vec<&'static str> {
        self.setup_flags.clone()
    }

    /// The ring's counters plus open connections; from the serving thread, or once stopped.
    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        self.owner.check()?;
        let mut core = lock(&self.core);
        let d = stats_dict(py, &mut core.hp)?;
        d.set_item("connections", core.conns.len())?;
        d.set_item("gil_batches", core.gil_batches)?;
        d.set_item("batched_connections", core.batched_conns)?;
        for kind in [Kind::Header, Kind::KeepAlive, Kind::Body] {
            let key = format!("{}_timeouts", kind.name());
            d.set_item(key, core.timed_out[kind.index()])?;
        }
        d.set_item("accept_pauses", core.cap.pauses)?;
        d.set_item("timed_connections", core.timers.len())?;
        d.set_item("requests", self.app.get().app().requests())?;
        d.set_item("working_states", core.pool.made)?;
        d.set_item("fallback_engaged", core.fallback_engaged)?;
        d.set_item("input_pauses", core.input_pauses)?;
        Ok(d)
    }
}

impl Drop for UringServer {
    fn drop(&mut self) {
        let mut core = lock(&self.core);
        if self.owner.is_forked_child() {
            core.hp.abandon();
        } else if self.owner.is_owner_thread() {
            core.stop_serving();
        } else if !core.torn_down {
            // Another thread may not enter a single-issuer ring: free nothing the kernel
            // might still touch; closing the ring fd makes the kernel cancel the rest.
            core.hp.teardown(false);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Conn;

    #[test]
    fn an_idle_connection_costs_its_server_a_small_slot() {
        // Every connection, idle or not, has one of these; 10,000 idle ones must stay cheap.
        assert!(std::mem::size_of::<Option<Conn>>() <= 56);
    }
}
