//! The hot-path engine: multishot accept and recv over a buffer ring, ordered sends, health.
//! It knows nothing of Python; hotpath_py.rs wraps it and releases the GIL around enters.

use std::collections::VecDeque;
use std::io;
use std::time::{Duration, Instant};

use io_uring::types::Timespec;

use crate::bufring::{BufRing, MAX_BUFS};
use crate::errors::{errno_name, RingError, RingResult};
use crate::fdmap::FdMap;
use crate::slab::Slab;
use crate::uring::{close_fd, Cqe, Uring, MAX_ENTRIES};

/// How long a multishot accept that ended on EMFILE/ENFILE waits before it is re-armed.
const ACCEPT_RETRY_PAUSE: Duration = Duration::from_millis(50);
/// user_data of cancel requests: their own CQEs carry nothing we need.
const UD_INTERNAL: u64 = u64::MAX;
/// The ring timer is moved earlier only when it would fire later than this after the time
/// asked for: a little lateness saves an update per new deadline.
const TIMER_SLACK: Duration = Duration::from_millis(10);
/// Never arm the timer shorter than this: a deadline due now has just been handled.
const TIMER_MIN: Duration = Duration::from_millis(1);
pub const MIN_BUF_SIZE: u32 = 64;
pub const MAX_BUF_SIZE: u32 = 16 << 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpKind {
    Accept,
    /// A pause before re-arming an accept that ended on resource exhaustion (EMFILE...).
    AcceptRetry,
    Recv,
    Send,
    /// A multishot poll for POLLIN: a doorbell other threads ring (an eventfd).
    Poll,
    /// The ring's one timer (see `set_timer`); its CQEs stay inside the engine.
    Timer,
}

impl OpKind {
    pub fn name(self) -> &'static str {
        match self {
            OpKind::Accept | OpKind::AcceptRetry => "accept",
            OpKind::Recv => "recv",
            OpKind::Send => "send",
            OpKind::Poll => "poll",
            OpKind::Timer => "timer",
        }
    }
}

/// How a listener accepts (see `Hotpath::set_accepting`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accepting {
    /// Not at all: new peers wait in the kernel's backlog.
    Paused,
    /// One connection per arming, re-armed by the caller: never more than it allows.
    One,
    /// A multishot accept that the engine keeps armed: as many as come.
    Many,
}

/// The ops a cancel_fd() waits for.
pub struct CancelTicket {
    pub fd: i32,
    generation: u32,
    slots: Vec<u32>,
}

/// What the caller sees of a completion.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Completion {
    pub op: OpKind,
    pub fd: i32,
    pub result: i32,
    pub buf_id: Option<u16>,
    /// The operation stays armed (the ring re-arms it itself where the kernel ended it).
    pub more: bool,
}

/// A send being written; its bytes stay here, untouched, until the final CQE.
struct SendJob {
    data: Vec<u8>,
    sent: usize,
    /// The number of the SQE that last sent from it (see `Uring::first_unconsumed`).
    sqe: u64,
}

impl SendJob {
    fn new(data: Vec<u8>) -> Self {
        SendJob {
            data,
            sent: 0,
            sqe: 0,
        }
    }
}

/// What an armed operation is and whose: enough to route each of its CQEs.
#[derive(Debug, Clone, Copy)]
struct OpTag {
    kind: OpKind,
    fd: i32,
    generation: u32,
}

/// One armed operation. Its slot index is the SQE's user_data. Kept small: an idle
/// connection holds one (its recv) for as long as it stays open.
struct Op {
    tag: OpTag,
    /// A send's job in `send_jobs`, whose bytes are owned there until this op's final CQE.
    send: Option<u32>,
}

/// What is armed on one fd, tagged with a generation so that CQEs for an earlier file that had
/// the same fd number are recognised as stale.
struct FdState {
    generation: u32,
    accept_slot: Option<u32>,
    recv_slot: Option<u32>,
    /// The recv ended with ENOBUFS and waits for buffers to come back.
    recv_starved: bool,
    /// The caller stopped receiving on this fd (`pause_recv`): its recv is not re-armed.
    recv_paused: bool,
    /// How this listener accepts; Many unless a connection cap says otherwise.
    accept_mode: Accepting,
    send_slot: Option<u32>,
    /// Sends waiting for the one in flight; boxed, since most fds never queue one and an
    /// inline VecDeque would cost every idle connection 32 bytes.
    #[allow(clippy::box_collection)]
    send_queue: Option<Box<VecDeque<SendJob>>>,
}

#[derive(Debug, Default, Clone, Copy)]
pub struct Counters {
    pub accepts: u64,
    pub recv_bytes: u64,
    pub sends: u64,
    pub short_sends: u64,
    pub enobufs: u64,
    pub recv_rearms: u64,
    pub accept_rearms: u64,
    pub stale_dropped: u64,
}

pub struct Hotpath {
    pub uring: Uring,
    bufs: Option<BufRing>,
    ops: Slab<Op>,
    fds: FdMap<FdState>,
    next_generation: u32,
    starved: VecDeque<i32>,
    /// Completions for the caller, oldest first.
    pub ready: VecDeque<Completion>,
    scratch: Vec<Cqe>,
    pub counters: Counters,
    unhealthy: Option<String>,
    /// The one pause every accept retry points its timeout SQE at.
    accept_retry_pause: Box<Timespec>,
    /// The armed ring timer's op slot and when it fires.
    timer: Option<(u32, Instant)>,
    /// What the timer's SQE points at; rewritten only while no timer is armed.
    timer_ts: Box<Timespec>,
    /// What a timer update's SQE points at.
    timer_update_ts: Box<Timespec>,
    /// Buffers of completed sends, cleared, for the next ones.
    spare: Vec<Vec<u8>>,
    /// The jobs of sends in flight, indexed by their op's `send`; a slab with a free list.
    send_jobs: Slab<SendJob>,
    /// Set by `evacuate`: nothing is armed or sent any more; output stays queued per fd.
    evacuating: bool,
    /// Test hook: `evacuate` behaves as if the ring could not be entered any more.
    pub simulate_dead_ring: bool,
}

const SPARE_BUFFERS: usize = 256;
/// Larger buffers go back to the allocator rather than pinning memory for small responses.
const SPARE_MAX_CAPACITY: usize = 64 * 1024;

fn power_of_two_in(name: &str, value: u32, min: u32, max: u32) -> RingResult<()> {
    if value.is_power_of_two() && (min..=max).contains(&value) {
        Ok(())
    } else {
        Err(RingError::InvalidArgument(format!(
            "{name} must be a power of two between {min} and {max}, not {value}"
        )))
    }
}

fn setup_error(what: &'static str) -> impl FnOnce(io::Error) -> RingError {
    move |source| RingError::Setup { what, source }
}

impl Hotpath {
    pub fn validate(queue_depth: u32, n_bufs: u32, buf_size: u32) -> RingResult<()> {
        power_of_two_in("queue_depth", queue_depth, 1, MAX_ENTRIES)?;
        power_of_two_in("n_bufs", n_bufs, 1, MAX_BUFS)?;
        power_of_two_in("buf_size", buf_size, MIN_BUF_SIZE, MAX_BUF_SIZE)
    }

    pub fn new(queue_depth: u32, n_bufs: u32, buf_size: u32) -> RingResult<Hotpath> {
        Self::validate(queue_depth, n_bufs, buf_size)?;
        let uring = Uring::new(queue_depth, None, queue_depth.min(64))
            .map_err(setup_error("io_uring_setup"))?;
        let mut bufs = BufRing::new(n_bufs, buf_size, 0).map_err(setup_error("buffer mmap"))?;
        bufs.register(&uring)
            .map_err(setup_error("io_uring_register(PBUF_RING)"))?;
        Ok(Hotpath {
            uring,
            bufs: Some(bufs),
            ops: Slab::default(),
            fds: FdMap::default(),
            next_generation: 0,
            starved: VecDeque::new(),
            ready: VecDeque::new(),
            scratch: Vec::new(),
            counters: Counters::default(),
            unhealthy: None,
            accept_retry_pause: Box::new(Timespec::from(ACCEPT_RETRY_PAUSE)),
            timer: None,
            timer_ts: Box::new(Timespec::new()),
            timer_update_ts: Box::new(Timespec::new()),
            spare: Vec::new(),
            send_jobs: Slab::default(),
            evacuating: false,
            simulate_dead_ring: false,
        })
    }

    fn bufs(&self) -> &BufRing {
        self.bufs.as_ref().expect("buffer ring present until close")
    }

    fn bufs_mut(&mut self) -> &mut BufRing {
        self.bufs.as_mut().expect("buffer ring present until close")
    }

    pub fn n_bufs(&self) -> u32 {
        self.bufs().n_bufs()
    }

    pub fn buf_size(&self) -> u32 {
        self.bufs().buf_size()
    }

    // ---- health -------------------------------------------------------------------------

    pub fn unhealthy_reason(&self) -> Option<&str> {
        self.unhealthy.as_deref()
    }

    pub fn mark_unhealthy(&mut self, reason: String) {
        if self.unhealthy.is_none() {
            self.unhealthy = Some(reason);
        }
    }

    fn check_healthy(&self) -> RingResult<()> {
        match &self.unhealthy {
            Some(reason) => Err(RingError::Unhealthy(reason.clone())),
            None => Ok(()),
        }
    }

    /// An enter or submit failed: EINTR, EBUSY and EAGAIN are expected and leave the ring
    /// healthy; anything else makes it unhealthy and is returned.
    pub fn enter_failed(&mut self, err: io::Error) -> RingResult<()> {
        match err.raw_os_error() {
            Some(libc::EINTR | libc::EBUSY | libc::EAGAIN | libc::ETIME) => Ok(()),
            _ => {
                let errno = err.raw_os_error().unwrap_or(0);
                self.mark_unhealthy(format!(
                    "io_uring_enter failed: {} ({err})",
                    errno_name(errno)
                ));
                Err(RingError::Enter(err))
            }
        }
    }

    // ---- slots and fd state -------------------------------------------------------------

    pub fn ops_in_flight(&self) -> usize {
        self.ops.len()
    }

    fn state(&mut self, fd: i32) -> &mut FdState {
        let next = &mut self.next_generation;
        self.fds.get_or_insert_with(fd, || {
            *next = next.wrapping_add(1);
            FdState {
                generation: *next,
                accept_slot: None,
                recv_slot: None,
                recv_starved: false,
                recv_paused: false,
                accept_mode: Accepting::Many,
                send_slot: None,
                send_queue: None,
            }
        })
    }

    fn current(&mut self, fd: i32, generation: u32) -> Option<&mut FdState> {
        self.fds.get_mut(fd).filter(|s| s.generation == generation)
    }

    /// A push that fails means the ring cannot take work: that is unhealthy.
    fn pushed(&mut self, result: io::Result<()>) -> RingResult<()> {
        result.map_err(|e| {
            let errno = e.raw_os_error().unwrap_or(0);
            self.mark_unhealthy(format!("submit failed: {} ({e})", errno_name(errno)));
            RingError::Enter(e)
        })
    }

    /// Like `pushed`, for the SQE of op `slot`: an SQE that never reached the ring will
    /// never complete, so its op is forgotten rather than waited for.
    fn pushed_op(&mut self, slot: u32, result: io::Result<()>) -> RingResult<()> {
        if result.is_err() {
            self.ops.remove(slot);
        }
        self.pushed(result)
    }

    /// Keeps a send that will not go through the ring now at the front of its fd's queue,
    /// where `take_unsent` finds it.
    fn requeue_front(&mut self, fd: i32, generation: u32, job: SendJob) {
        if let Some(state) = self.current(fd, generation) {
            state
                .send_queue
                .get_or_insert_with(Default::default)
                .push_front(job);
        }
    }

    // ---- arming -------------------------------------------------------------------------

    /// Registers an op that carries no send data; its slot is the SQE's user_data.
    fn new_op(&mut self, kind: OpKind, fd: i32) -> u32 {
        let generation = self.state(fd).generation;
        self.ops.insert(Op {
            tag: OpTag {
                kind,
                fd,
                generation,
            },
            send: None,
        })
    }

    fn arm_accept(&mut self, fd: i32) -> RingResult<()> {
        let slot = self.new_op(OpKind::Accept, fd);
        let state = self.state(fd);
        state.accept_slot = Some(slot);
        let res = match state.accept_mode {
            Accepting::One => self.uring.push_accept(fd, slot as u64),
            Accepting::Many | Accepting::Paused => {
                self.uring.push_accept_multishot(fd, slot as u64)
            }
        };
        self.pushed_op(slot, res)
    }

    fn arm_recv(&mut self, fd: i32) -> RingResult<()> {
        let slot = self.new_op(OpKind::Recv, fd);
        let state = self.state(fd);
        state.recv_slot = Some(slot);
        state.recv_starved = false;
        let group = self.bufs().group();
        let res = self.uring.push_recv_multishot(fd, group, slot as u64);
        self.pushed_op(slot, res)
    }

    fn arm_poll(&mut self, fd: i32) -> RingResult<()> {
        let slot = self.new_op(OpKind::Poll, fd);
        let res = self.uring.push_poll_multishot(fd, slot as u64);
        self.pushed_op(slot, res)
    }

    /// Starts the next queued send on `fd`, if none is in flight. Empty sends complete at once.
    fn pump_send(&mut self, fd: i32) -> RingResult<()> {
        loop {
            let Some(state) = self.fds.get_mut(fd) else {
                return Ok(());
            };
            if state.send_slot.is_some() {
                return Ok(());
            }
            let Some(job) = state.send_queue.as_mut().and_then(|q| q.pop_front()) else {
                // Drained: give the queue's memory back rather than keep it per connection.
                state.send_queue = None;
                return Ok(());
            };
            if job.data.is_empty() {
                self.counters.sends += 1;
                self.ready.push_back(Completion {
                    op: OpKind::Send,
                    fd,
                    result: 0,
                    buf_id: None,
                    more: false,
                });
                continue;
            }
            let generation = state.generation;
            return self.push_send_job(fd, generation, job);
        }
    }

    fn push_send_job(&mut self, fd: i32, generation: u32, mut job: SendJob) -> RingResult<()> {
        if self.evacuating {
            self.requeue_front(fd, generation, job);
            return Ok(());
        }
        job.sqe = self.uring.next_sqe();
        let remaining = job.data.len() - job.sent;
        let len = remaining.min(u32::MAX as usize) as u32;
        let index = self.send_jobs.insert(job);
        let slot = self.ops.insert(Op {
            tag: OpTag {
                kind: OpKind::Send,
                fd,
                generation,
            },
            send: Some(index),
        });
        if let Some(state) = self.current(fd, generation) {
            state.send_slot = Some(slot);
        }
        let job = self.send_jobs.get(index).expect("just stored");
        // SAFETY: the bytes live in the heap buffer of the job's Vec, held in `send_jobs`
        // until the op's final CQE (it is removed only on that CQE, and teardown leaks
        // the jobs whose final CQE it could not confirm). Growing `send_jobs` moves the Vec
        // header, never its buffer.
        let ptr = unsafe { job.data.as_ptr().add(job.sent) };
        // SAFETY: ptr..ptr+len lies inside job.data (see above).
        let res = unsafe { self.uring.push_send(fd, ptr, len, slot as u64) };
        if res.is_err() {
            // The SQE never reached the ring: the bytes are still ours, and still unsent.
            self.ops.remove(slot);
            if let Some(job) = self.send_jobs.remove(index) {
                if let Some(state) = self.current(fd, generation) {
                    state.send_slot = None;
                }
                self.requeue_front(fd, generation, job);
            }
        }
        self.pushed(res)
    }

    pub fn submit_accept_multishot(&mut self, fd: i32) -> RingResult<()> {
        self.check_healthy()?;
        if self.state(fd).accept_slot.is_some() {
            return Err(RingError::AlreadyArmed {
                fd,
                what: "multishot accept",
            });
        }
        self.arm_accept(fd)
    }

    pub fn submit_recv_multishot(&mut self, fd: i32) -> RingResult<()> {
        self.check_healthy()?;
        let state = self.state(fd);
        if state.recv_slot.is_some() || state.recv_starved {
            return Err(RingError::AlreadyArmed {
                fd,
                what: "multishot recv",
            });
        }
        self.arm_recv(fd)
    }

    /// Watches `fd` (an eventfd another thread writes to) with a multishot poll: a Poll
    /// completion follows every write that comes after the last one reaped. The engine
    /// re-arms it if the kernel ends it; cancelled with everything else at teardown. The fd's
    /// counter is never read: the poll is edge-triggered, so it needs no reset to fire again.
    pub fn submit_poll_multishot(&mut self, fd: i32) -> RingResult<()> {
        self.check_healthy()?;
        self.arm_poll(fd)
    }

    pub fn submit_send(&mut self, fd: i32, data: Vec<u8>) -> RingResult<()> {
        if let Err(sick) = self.check_healthy() {
            // Kept in order behind what is queued, so a move to epoll can still send it.
            let queue = self
                .state(fd)
                .send_queue
                .get_or_insert_with(Default::default);
            queue.push_back(SendJob::new(data));
            return if self.evacuating { Ok(()) } else { Err(sick) };
        }
        let state = self.state(fd);
        let idle = state.send_slot.is_none() && state.send_queue.is_none();
        if idle && !data.is_empty() {
            // The usual case, one response at a time: straight to the ring, no queue.
            let generation = state.generation;
            return self.push_send_job(fd, generation, SendJob::new(data));
        }
        state
            .send_queue
            .get_or_insert_with(Default::default)
            .push_back(SendJob::new(data));
        self.pump_send(fd)
    }

    /// Whether `fd`'s recv ended on ENOBUFS and waits for buffers: bytes may wait in its socket.
    pub fn recv_starved(&self, fd: i32) -> bool {
        self.fds.get(fd).is_some_and(|s| s.recv_starved)
    }

    /// Stops receiving on `fd` until `resume_recv`: its multishot recv is cancelled (what the
    /// kernel already received still completes) and not re-armed, so further bytes wait in
    /// the socket. A recv that already ended (EOF, an error) is left as it is.
    pub fn pause_recv(&mut self, fd: i32) -> RingResult<()> {
        if self.unhealthy.is_some() {
            // Being given up (or gone): nothing is re-armed anyway.
            return Ok(());
        }
        let Some(state) = self.fds.get_mut(fd) else {
            return Ok(());
        };
        if state.recv_paused || (state.recv_slot.is_none() && !state.recv_starved) {
            return Ok(());
        }
        state.recv_paused = true;
        let Some(slot) = state.recv_slot else {
            // Starved: `rearm_starved` passes it over while paused.
            return Ok(());
        };
        self.cancel_slot(slot)
    }

    /// Receives on `fd` again after `pause_recv`.
    pub fn resume_recv(&mut self, fd: i32) -> RingResult<()> {
        let Some(state) = self.fds.get_mut(fd) else {
            return Ok(());
        };
        if !std::mem::take(&mut state.recv_paused) {
            return Ok(());
        }
        if state.recv_slot.is_some() || self.unhealthy.is_some() {
            // Its cancel has not completed yet: the final CQE re-arms it.
            return Ok(());
        }
        self.counters.recv_rearms += 1;
        self.arm_recv(fd)
    }

    /// Whether receiving on `fd` is paused (`pause_recv`).
    pub fn recv_paused(&self, fd: i32) -> bool {
        self.fds.get(fd).is_some_and(|s| s.recv_paused)
    }

    /// Sets how listener `fd` accepts, arming an accept if none is armed and one is wanted.
    /// Paused, the armed accept is cancelled, so new peers wait in the kernel's backlog
    /// (connections the kernel accepted before the cancel took effect still complete). With
    /// One, each accept takes one connection and the caller calls this again for the next,
    /// so a connection cap is never overshot; a multishot accept still armed is cancelled and
    /// replaced when its final CQE comes.
    pub fn set_accepting(&mut self, fd: i32, mode: Accepting) -> RingResult<()> {
        self.check_healthy()?;
        let state = self.state(fd);
        let was = std::mem::replace(&mut state.accept_mode, mode);
        let Some(slot) = state.accept_slot else {
            if mode == Accepting::Paused {
                return Ok(());
            }
            return self.arm_accept(fd);
        };
        if mode == Accepting::Paused || (mode == Accepting::One && was == Accepting::Many) {
            return self.cancel_slot(slot);
        }
        Ok(())
    }

    /// Makes the ring's one timer fire by `at` (give or take TIMER_SLACK), so that a wait in
    /// the kernel ends when the earliest deadline comes. A timer that fires early only wakes
    /// the caller, which asks again; None leaves an armed timer to run out harmlessly.
    pub fn set_timer(&mut self, at: Option<Instant>) -> RingResult<()> {
        let Some(at) = at else {
            return Ok(());
        };
        self.check_healthy()?;
        let after = at.saturating_duration_since(Instant::now()).max(TIMER_MIN);
        match self.timer {
            Some((_, armed)) if armed <= at + TIMER_SLACK => Ok(()),
            Some((slot, _)) => {
                self.timer = Some((slot, at));
                *self.timer_update_ts = Timespec::from(after);
                let ts: *const Timespec = &*self.timer_update_ts;
                // SAFETY: the kernel copies the timespec when it takes the SQE, and the box
                // lives as long as this engine and its ring. Rewriting it before an earlier
                // update was taken only makes that update carry the newer deadline, which is
                // the one wanted.
                let res = unsafe { self.uring.push_timeout_update(slot as u64, ts, UD_INTERNAL) };
                self.pushed(res)
            }
            None => {
                let slot = self.ops.insert(Op {
                    tag: OpTag {
                        kind: OpKind::Timer,
                        fd: -1,
                        generation: 0,
                    },
                    send: None,
                });
                self.timer = Some((slot, at));
                *self.timer_ts = Timespec::from(after);
                let ts: *const Timespec = &*self.timer_ts;
                // SAFETY: the kernel copies the timespec when it takes the SQE; the box lives
                // as long as this engine and its ring, and is rewritten only once no timer is
                // armed, that is after this one's CQE, so after the kernel took its SQE.
                let res = unsafe { self.uring.push_timeout(ts, slot as u64) };
                if res.is_err() {
                    self.timer = None;
                }
                self.pushed_op(slot, res)
            }
        }
    }

    // ---- buffers ------------------------------------------------------------------------

    pub fn buffer(&self, bid: u32, len: usize) -> RingResult<&[u8]> {
        self.bufs()
            .bytes(bid, len)
            .map_err(RingError::InvalidBuffer)
    }

    pub fn release_buffer(&mut self, bid: u32) -> RingResult<()> {
        self.bufs_mut()
            .release(bid)
            .map_err(RingError::InvalidBuffer)?;
        self.rearm_starved()
    }

    /// Re-arms recvs that ran out of buffers, no more of them than there are free buffers, so
    /// a re-armed recv does not meet an empty ring again at once.
    fn rearm_starved(&mut self) -> RingResult<()> {
        let mut budget = self.bufs().available();
        while budget > 0 {
            let Some(fd) = self.starved.pop_front() else {
                break;
            };
            let waiting = self
                .fds
                .get(fd)
                .is_some_and(|s| s.recv_starved && s.recv_slot.is_none() && !s.recv_paused);
            if waiting && self.unhealthy.is_none() {
                self.counters.recv_rearms += 1;
                self.arm_recv(fd)?;
                budget -= 1;
            }
        }
        Ok(())
    }

    // ---- cancel -------------------------------------------------------------------------

    /// Forgets `fd` and asks the kernel to cancel everything armed on it. Returns what must
    /// reach its final CQE before the fd may be closed. Queued sends are dropped.
    pub fn begin_cancel_fd(&mut self, fd: i32) -> RingResult<CancelTicket> {
        let Some(state) = self.fds.remove(fd) else {
            return Ok(CancelTicket {
                fd,
                generation: 0,
                slots: Vec::new(),
            });
        };
        self.starved.retain(|&f| f != fd);
        let slots: Vec<u32> = [state.accept_slot, state.recv_slot, state.send_slot]
            .into_iter()
            .flatten()
            .collect();
        if !slots.is_empty() {
            let res = self.uring.push_cancel_fd(fd, UD_INTERNAL);
            self.pushed(res)?;
        }
        if let Some(slot) = state.accept_slot {
            if matches!(self.ops.get(slot), Some(op) if op.tag.kind == OpKind::AcceptRetry) {
                // A pause timer is not bound to the fd: cancel it by its user_data.
                self.cancel_slot(slot)?;
            }
        }
        Ok(CancelTicket {
            fd,
            generation: state.generation,
            slots,
        })
    }

    /// True once every op named by the ticket has posted its final CQE.
    pub fn cancel_done(&self, ticket: &CancelTicket) -> bool {
        ticket.slots.iter().all(|&slot| {
            !matches!(self.ops.get(slot), Some(op)
                if op.tag.fd == ticket.fd && op.tag.generation == ticket.generation)
        })
    }

    /// Enters and reaps until `done` holds or the deadline passes. Returns whether it held.
    /// Completions for other fds that arrive meanwhile are kept for the caller.
    pub fn drive_until(
        &mut self,
        deadline: Instant,
        done: impl Fn(&Hotpath) -> bool,
    ) -> RingResult<bool> {
        loop {
            self.reap()?;
            if done(self) {
                return Ok(true);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(false);
            }
            if let Err(e) = self.enter(1, Some(left)) {
                self.enter_failed(e)?;
            }
        }
    }

    /// Cancels op `slot` by its user_data, submitted at once: once its final CQE is reaped
    /// (even later in the batch being handled now) the slot may go to another op, which a
    /// cancel still waiting in the SQ would then hit.
    fn cancel_slot(&mut self, slot: u32) -> RingResult<()> {
        let res = self.uring.push_cancel_user_data(slot as u64, UD_INTERNAL);
        self.pushed(res)?;
        if let Err(e) = self.uring.submit() {
            self.enter_failed(e)?;
        }
        Ok(())
    }

    /// Cancels ops of an earlier file whose fd number the kernel has just reused. The number
    /// now names a new file, so cancel by user_data, never by fd.
    fn retire_stale(&mut self, fd: i32) {
        if let Some(state) = self.fds.remove(fd) {
            self.starved.retain(|&f| f != fd);
            for slot in [state.accept_slot, state.recv_slot, state.send_slot]
                .into_iter()
                .flatten()
            {
                let _ = self.cancel_slot(slot);
            }
        }
    }

    pub fn begin_cancel_all(&mut self) -> RingResult<()> {
        self.fds.clear();
        self.starved.clear();
        if self.ops_in_flight() > 0 {
            let res = self.uring.push_cancel_any(UD_INTERNAL);
            self.pushed(res)?;
        }
        Ok(())
    }

    // ---- completions --------------------------------------------------------------------

    /// Enters once: submits what is queued, waits for `want` CQEs or the timeout.
    pub fn enter(&mut self, want: usize, timeout: Option<Duration>) -> io::Result<usize> {
        self.uring.submit_and_wait(want, timeout)
    }

    /// Handles every CQE now in the CQ, without entering the kernel.
    pub fn reap(&mut self) -> RingResult<()> {
        let mut cqes = std::mem::take(&mut self.scratch);
        cqes.clear();
        self.uring.reap(&mut cqes);
        let mut result = Ok(());
        for cqe in &cqes {
            if let Err(e) = self.handle(*cqe) {
                result = Err(e);
            }
        }
        self.scratch = cqes;
        result
    }

    fn handle(&mut self, cqe: Cqe) -> RingResult<()> {
        if cqe.user_data == UD_INTERNAL {
            return Ok(());
        }
        let slot = cqe.user_data as u32;
        let more = cqe.more();
        // A multishot CQE with F_MORE leaves its op armed; the final one frees the slot.
        let (op, send) = if more {
            match self.ops.get(slot) {
                Some(op) => (op.tag, None),
                None => return Ok(()),
            }
        } else {
            match self.ops.remove(slot) {
                Some(op) => (op.tag, op.send.and_then(|i| self.send_jobs.remove(i))),
                None => return Ok(()),
            }
        };
        if op.kind == OpKind::Timer {
            // Not bound to any fd. Fired, cancelled or not, it is over: the next wait re-arms.
            if matches!(self.timer, Some((armed, _)) if armed == slot) {
                self.timer = None;
            }
            return Ok(());
        }
        let stale = self.current(op.fd, op.generation).is_none();
        match op.kind {
            OpKind::Timer => Ok(()),
            OpKind::Accept => self.on_accept(op, slot, cqe, stale),
            OpKind::AcceptRetry => self.on_accept_retry(op, slot, stale),
            OpKind::Recv => self.on_recv(op, slot, cqe, stale),
            OpKind::Send => self.on_send(op, send, cqe, stale),
            OpKind::Poll => self.on_poll(op, cqe, stale),
        }
    }

    fn on_accept(&mut self, op: OpTag, slot: u32, cqe: Cqe, stale: bool) -> RingResult<()> {
        let more = cqe.more();
        if stale {
            self.counters.stale_dropped += 1;
            if cqe.result >= 0 {
                // Accepted after the listener was cancelled: nobody will ever see this fd.
                close_fd(cqe.result);
            }
            return Ok(());
        }
        if cqe.result >= 0 {
            self.counters.accepts += 1;
            self.retire_stale(cqe.result);
        }
        let mut rearm = false;
        if !more {
            let mut mode = Accepting::Many;
            if let Some(state) = self.current(op.fd, op.generation) {
                if state.accept_slot == Some(slot) {
                    state.accept_slot = None;
                }
                mode = state.accept_mode;
            }
            // Errors that say the listener is gone or unusable end it; EMFILE and the like do
            // not. A cancel of a listener still known came from set_accepting: re-armed unless
            // paused. One connection at a time, the caller re-arms after each success.
            let wanted = match mode {
                Accepting::Paused => false,
                Accepting::One => cqe.result < 0,
                Accepting::Many => true,
            };
            rearm = wanted
                && !matches!(-cqe.result, libc::EBADF | libc::EINVAL | libc::ENOTSOCK)
                && self.unhealthy.is_none();
        }
        if cqe.result != -libc::ECANCELED {
            self.ready.push_back(Completion {
                op: OpKind::Accept,
                fd: op.fd,
                result: cqe.result,
                buf_id: None,
                more: more || rearm,
            });
        }
        if rearm {
            self.counters.accept_rearms += 1;
            if matches!(
                -cqe.result,
                libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM
            ) {
                // Re-arming at once would fail at once: a busy loop until an fd frees up.
                self.arm_accept_retry(op.fd)?;
            } else {
                self.arm_accept(op.fd)?;
            }
        }
        Ok(())
    }

    fn arm_accept_retry(&mut self, fd: i32) -> RingResult<()> {
        let slot = self.new_op(OpKind::AcceptRetry, fd);
        self.state(fd).accept_slot = Some(slot);
        let ts: *const Timespec = &*self.accept_retry_pause;
        // SAFETY: the kernel copies the timespec when it takes the SQE, and the box lives as
        // long as this engine and its ring, so it outlasts any submission of this SQE.
        let res = unsafe { self.uring.push_timeout(ts, slot as u64) };
        self.pushed_op(slot, res)
    }

    fn on_accept_retry(&mut self, op: OpTag, slot: u32, stale: bool) -> RingResult<()> {
        if stale {
            return Ok(());
        }
        let Some(state) = self.current(op.fd, op.generation) else {
            return Ok(());
        };
        if state.accept_slot != Some(slot) {
            return Ok(());
        }
        state.accept_slot = None;
        let paused = state.accept_mode == Accepting::Paused;
        if self.unhealthy.is_some() || paused {
            return Ok(());
        }
        self.arm_accept(op.fd)
    }

    fn on_recv(&mut self, op: OpTag, slot: u32, cqe: Cqe, stale: bool) -> RingResult<()> {
        let more = cqe.more();
        let bid = cqe.buffer_id();
        if let Some(bid) = bid {
            if !self.bufs_mut().take_from_kernel(bid) {
                self.mark_unhealthy(format!(
                    "kernel delivered buffer {bid}, which it did not hold"
                ));
                return Err(RingError::Unhealthy(
                    self.unhealthy.clone().unwrap_or_default(),
                ));
            }
        }
        if stale {
            self.counters.stale_dropped += 1;
            if let Some(bid) = bid {
                self.release_buffer(bid as u32)?;
            }
            return Ok(());
        }
        if !more {
            if let Some(state) = self.current(op.fd, op.generation) {
                if state.recv_slot == Some(slot) {
                    state.recv_slot = None;
                }
            }
        }
        if cqe.result == -libc::ENOBUFS {
            // Not a failure: the data waits in the socket until buffers come back.
            self.counters.enobufs += 1;
            if let Some(state) = self.current(op.fd, op.generation) {
                state.recv_starved = true;
                self.starved.push_back(op.fd);
            }
            return self.rearm_starved();
        }
        if cqe.result > 0 {
            self.counters.recv_bytes += cqe.result as u64;
            let paused = self
                .current(op.fd, op.generation)
                .is_some_and(|s| s.recv_paused);
            let rearm = !more && self.unhealthy.is_none() && !paused;
            self.ready.push_back(Completion {
                op: OpKind::Recv,
                fd: op.fd,
                result: cqe.result,
                buf_id: bid,
                more: more || rearm,
            });
            if rearm {
                // The kernel ended the multishot while data still flows: keep one recv armed.
                self.counters.recv_rearms += 1;
                self.arm_recv(op.fd)?;
            }
            return Ok(());
        }
        if cqe.result == -libc::ECANCELED {
            // A pause's cancel; resumed meanwhile, the recv is armed again now.
            let resumed = self
                .current(op.fd, op.generation)
                .is_some_and(|s| !s.recv_paused && s.recv_slot.is_none());
            if !more && resumed && self.unhealthy.is_none() {
                self.counters.recv_rearms += 1;
                self.arm_recv(op.fd)?;
            }
            return Ok(());
        }
        if let Some(state) = self.current(op.fd, op.generation) {
            // Over for good: there is nothing to resume.
            state.recv_paused = false;
        }
        // EOF (0) or an error: the recv is over and the caller decides what follows.
        self.ready.push_back(Completion {
            op: OpKind::Recv,
            fd: op.fd,
            result: cqe.result,
            buf_id: None,
            more,
        });
        Ok(())
    }

    fn on_poll(&mut self, op: OpTag, cqe: Cqe, stale: bool) -> RingResult<()> {
        if stale || cqe.result == -libc::ECANCELED {
            return Ok(());
        }
        if cqe.result < 0 {
            // Only a bug makes a poll on our own doorbell fail; its wake-ups would be lost.
            self.mark_unhealthy(format!(
                "poll on fd {} failed: {}",
                op.fd,
                errno_name(-cqe.result)
            ));
            return Err(RingError::Unhealthy(
                self.unhealthy.clone().unwrap_or_default(),
            ));
        }
        let more = cqe.more();
        // Ended by the kernel (an overflowing CQ ends multishots): keep one armed, since a
        // wake-up lost here would leave the other threads' work waiting for good.
        let rearm = !more && self.unhealthy.is_none();
        self.ready.push_back(Completion {
            op: OpKind::Poll,
            fd: op.fd,
            result: cqe.result,
            buf_id: None,
            more: more || rearm,
        });
        if rearm {
            self.arm_poll(op.fd)?;
        }
        Ok(())
    }

    fn on_send(
        &mut self,
        op: OpTag,
        send: Option<SendJob>,
        cqe: Cqe,
        stale: bool,
    ) -> RingResult<()> {
        let Some(mut job) = send else {
            return Ok(());
        };
        if stale {
            self.counters.stale_dropped += 1;
            return Ok(());
        }
        if let Some(state) = self.current(op.fd, op.generation) {
            state.send_slot = None;
        }
        if cqe.result == -libc::ECANCELED && self.evacuating {
            // Cancelled before it sent anything more: the rest is still to be sent.
            self.requeue_front(op.fd, op.generation, job);
            return Ok(());
        }
        if cqe.result > 0 {
            job.sent += cqe.result as usize;
            if job.sent < job.data.len() {
                // A short write: send the rest from where the kernel stopped.
                self.counters.short_sends += 1;
                return self.push_send_job(op.fd, op.generation, job);
            }
        }
        let result = if cqe.result < 0 {
            cqe.result
        } else {
            job.sent.min(i32::MAX as usize) as i32
        };
        if cqe.result >= 0 {
            self.counters.sends += 1;
        }
        self.ready.push_back(Completion {
            op: OpKind::Send,
            fd: op.fd,
            result,
            buf_id: None,
            more: false,
        });
        self.recycle(job.data);
        self.pump_send(op.fd)
    }

    /// Keeps a buffer (sent, or lent and unused) for reuse, so a steady stream of responses
    /// stops allocating.
    pub fn recycle(&mut self, mut data: Vec<u8>) {
        let worth_keeping = (1..=SPARE_MAX_CAPACITY).contains(&data.capacity());
        if worth_keeping && self.spare.len() < SPARE_BUFFERS {
            data.clear();
            self.spare.push(data);
        }
    }

    /// An empty buffer for the next send, reused from a finished one when there is one.
    pub fn spare_buffer(&mut self) -> Vec<u8> {
        self.spare.pop().unwrap_or_default()
    }

    // ---- evacuation (a sick ring hands its connections to another loop) ------------------

    /// Cancels every operation but keeps each fd's state, so what completes meanwhile still
    /// reaches `ready` as usual (received bytes, accepted fds, send results) and output not
    /// sent stays queued for `take_unsent`. Nothing is armed or sent any more. Waits up to
    /// `wait` for every final CQE; false when the kernel could not confirm them all (the
    /// ring cannot be entered, or the wait ran out): only what the CQ held was reaped then.
    pub fn evacuate(&mut self, wait: Duration) -> bool {
        self.mark_unhealthy("evacuated to another loop".into());
        self.evacuating = true;
        let reaped = self.reap().is_ok();
        if self.simulate_dead_ring || !reaped || self.uring.is_closed() {
            return false;
        }
        if self.ops_in_flight() > 0 {
            let res = self.uring.push_cancel_any(UD_INTERNAL);
            if res.is_err() {
                return false;
            }
        }
        let deadline = Instant::now() + wait;
        self.drive_until(deadline, |hp| hp.ops_in_flight() == 0)
            .unwrap_or(false)
    }

    /// After `evacuate`: `fd`'s output the kernel has not sent, in order, and whether a send
    /// of it is unconfirmed (its final CQE never came, so how much reached the peer is
    /// unknown; that send's bytes are not included).
    pub fn take_unsent(&mut self, fd: i32) -> (Vec<u8>, bool) {
        let first_unconsumed = self.uring.first_unconsumed();
        let Some(state) = self.fds.get_mut(fd) else {
            return (Vec::new(), false);
        };
        let mut out = Vec::new();
        let mut unconfirmed = false;
        if let Some(slot) = state.send_slot {
            let job = self.ops.get(slot).and_then(|op| op.send);
            let untaken = job.filter(|&index| {
                self.send_jobs
                    .get(index)
                    .is_some_and(|job| job.sqe >= first_unconsumed)
            });
            // A send whose SQE the kernel never took never started: it is still ours, and
            // unsent. One it took may have sent any part of its bytes.
            match untaken.and_then(|index| self.send_jobs.remove(index)) {
                Some(job) => out.extend_from_slice(&job.data[job.sent..]),
                None => unconfirmed = true,
            }
        }
        for job in state.send_queue.take().map(|q| *q).unwrap_or_default() {
            out.extend_from_slice(&job.data[job.sent..]);
        }
        (out, unconfirmed)
    }

    /// After `evacuate` and `take_unsent`: frees the buffer ring (or leaks what the kernel
    /// might still touch, when `confirmed` is false) and closes the ring fd.
    pub fn close_ring(&mut self, confirmed: bool) {
        self.teardown(confirmed);
        self.fds.clear();
        self.starved.clear();
        self.uring.close();
    }

    // ---- teardown -----------------------------------------------------------------------

    /// Cancels every op and waits up to `wait` for the final CQEs, then tears the buffer
    /// ring down. False when the kernel did not confirm in time (memory is leaked then).
    pub fn shut_down(&mut self, wait: Duration) -> bool {
        let deadline = Instant::now() + wait;
        let confirmed = self.begin_cancel_all().is_ok()
            && self
                .drive_until(deadline, |hp| hp.ops_in_flight() == 0)
                .unwrap_or(false);
        self.teardown(confirmed);
        confirmed
    }

    /// Unregisters the buffer ring. When `confirmed` is false (final CQEs not all seen), the
    /// memory the kernel might still use is leaked rather than freed.
    pub fn teardown(&mut self, confirmed: bool) {
        let Some(mut bufs) = self.bufs.take() else {
            return;
        };
        let unregistered = bufs.unregister(&self.uring).is_ok();
        if confirmed && unregistered {
            drop(bufs);
        } else {
            bufs.leak();
            // The kernel may still read the bytes of sends whose final CQE never came.
            self.send_jobs.leak();
        }
    }

    /// In a forked child: give up everything without touching the parent's ring.
    pub fn abandon(&mut self) {
        self.uring.leak_on_drop();
        if let Some(bufs) = self.bufs.take() {
            bufs.leak();
        }
        self.send_jobs.leak();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};
    use std::os::fd::AsRawFd;

    /// Enters until at least one completion is ready or the deadline passes.
    fn next(hp: &mut Hotpath, deadline: Instant) -> Vec<Completion> {
        loop {
            hp.reap().unwrap();
            if !hp.ready.is_empty() || Instant::now() >= deadline {
                return hp.ready.drain(..).collect();
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if let Err(e) = hp.enter(1, Some(left)) {
                hp.enter_failed(e).unwrap();
            }
        }
    }

    fn accept_one(hp: &mut Hotpath, listener: &TcpListener) -> (i32, TcpStream) {
        let client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let done = next(hp, deadline);
            assert!(Instant::now() < deadline, "no accept completion");
            if let Some(c) = done.iter().find(|c| c.op == OpKind::Accept) {
                assert!(c.result >= 0, "accept failed: {}", c.result);
                return (c.result, client);
            }
        }
    }

    /// An engine with a multishot accept on a new listener, and one connection it accepted.
    fn connected(
        queue_depth: u32,
        n_bufs: u32,
        buf_size: u32,
    ) -> (Hotpath, TcpListener, i32, TcpStream) {
        let mut hp = Hotpath::new(queue_depth, n_bufs, buf_size).unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        hp.submit_accept_multishot(listener.as_raw_fd()).unwrap();
        let (fd, client) = accept_one(&mut hp, &listener);
        (hp, listener, fd, client)
    }

    #[test]
    fn a_doorbell_written_from_another_thread_wakes_the_ring_each_time() {
        let mut hp = Hotpath::new(8, 8, 4096).unwrap();
        let doorbell = std::fs::File::from(crate::uring::eventfd().unwrap());
        hp.submit_poll_multishot(doorbell.as_raw_fd()).unwrap();
        for round in 0..3 {
            let ring = doorbell.try_clone().unwrap();
            let writer = std::thread::spawn(move || (&ring).write_all(&1u64.to_ne_bytes()));
            let done = next(&mut hp, Instant::now() + Duration::from_secs(5));
            writer.join().unwrap().unwrap();
            assert!(!done.is_empty(), "round {round}: the write woke nothing");
            for c in &done {
                assert_eq!((c.op, c.fd), (OpKind::Poll, doorbell.as_raw_fd()));
                assert!(c.result & libc::POLLIN as i32 != 0 && c.more, "{c:?}");
            }
        }
        // No user memory is involved, and the poll goes with the rest at teardown.
        assert!(hp.shut_down(Duration::from_secs(5)));
        assert_eq!(hp.ops_in_flight(), 0);
    }

    fn accepted(hp: &mut Hotpath, wait: Duration) -> Vec<i32> {
        let done = next(hp, Instant::now() + wait);
        done.iter()
            .filter(|c| c.op == OpKind::Accept && c.result >= 0)
            .map(|c| c.result)
            .collect()
    }

    #[test]
    fn one_timer_fires_by_the_earliest_deadline_asked_for() {
        let mut hp = Hotpath::new(64, 8, 4096).unwrap();
        let start = Instant::now();
        hp.set_timer(Some(start + Duration::from_secs(5))).unwrap();
        // A later deadline changes nothing; an earlier one moves the same timer.
        hp.set_timer(Some(start + Duration::from_secs(9))).unwrap();
        hp.set_timer(Some(start + Duration::from_millis(50)))
            .unwrap();
        assert_eq!(hp.ops_in_flight(), 1);
        let fired = hp
            .drive_until(start + Duration::from_secs(3), |h| h.ops_in_flight() == 0)
            .unwrap();
        let elapsed = start.elapsed();
        assert!(fired, "the timer did not fire");
        assert!(
            elapsed >= Duration::from_millis(45) && elapsed < Duration::from_secs(2),
            "fired after {elapsed:?}"
        );
        assert!(hp.ready.is_empty(), "timer CQEs stay inside the engine");
        hp.teardown(true);
    }

    #[test]
    fn accepting_one_at_a_time_takes_one_connection_per_arming() {
        let mut hp = Hotpath::new(64, 8, 4096).unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let lfd = listener.as_raw_fd();
        let addr = listener.local_addr().unwrap();
        let _clients: Vec<TcpStream> = (0..4).map(|_| TcpStream::connect(addr).unwrap()).collect();
        hp.set_accepting(lfd, Accepting::One).unwrap();
        let mut fds = accepted(&mut hp, Duration::from_secs(5));
        assert_eq!(fds.len(), 1);
        assert!(accepted(&mut hp, Duration::from_millis(100)).is_empty());
        hp.set_accepting(lfd, Accepting::Paused).unwrap();
        hp.set_accepting(lfd, Accepting::One).unwrap();
        fds.extend(accepted(&mut hp, Duration::from_secs(5)));
        assert_eq!(fds.len(), 2);
        // Many: the rest of the backlog with one multishot accept.
        hp.set_accepting(lfd, Accepting::Many).unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        while fds.len() < 4 && Instant::now() < deadline {
            fds.extend(accepted(&mut hp, Duration::from_millis(200)));
        }
        assert_eq!(fds.len(), 4);
        // Paused cancels the armed multishot accept, and it stays unarmed.
        hp.set_accepting(lfd, Accepting::Paused).unwrap();
        assert!(settles(&mut hp));
        let _late = TcpStream::connect(addr).unwrap();
        assert!(accepted(&mut hp, Duration::from_millis(100)).is_empty());
        for fd in fds {
            close_fd(fd);
        }
        hp.teardown(true);
    }

    #[test]
    fn a_cancel_by_slot_is_submitted_before_the_slot_can_be_reused() {
        let mut hp = Hotpath::new(64, 8, 4096).unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let lfd = listener.as_raw_fd();
        hp.set_accepting(lfd, Accepting::Many).unwrap();
        hp.enter(0, None).unwrap();
        assert_eq!(hp.uring.sq_pending(), 0);
        // Left in the SQ, the cancel would meet whatever op takes the accept's slot after its
        // final CQE is reaped; it must reach the kernel now.
        hp.set_accepting(lfd, Accepting::Paused).unwrap();
        assert_eq!(hp.uring.sq_pending(), 0, "the cancel waits in the SQ");
        assert!(settles(&mut hp));
        hp.teardown(true);
    }

    /// Drives the ring until no op is in flight any more; false if that took 5 s.
    fn settles(hp: &mut Hotpath) -> bool {
        hp.drive_until(Instant::now() + Duration::from_secs(5), |h| {
            h.ops_in_flight() == 0
        })
        .unwrap()
    }

    /// A send the peer does not read, then received bytes, then an evacuation.
    fn evacuation_case(dead: bool) -> (Hotpath, i32, TcpStream, Vec<u8>) {
        let (mut hp, _listener, fd, mut client) = connected(64, 8, 4096);
        hp.submit_recv_multishot(fd).unwrap();
        let payload: Vec<u8> = (0..8 << 20).map(|i: u32| (i % 251) as u8).collect();
        hp.submit_send(fd, payload.clone()).unwrap();
        // Queued behind the one in flight: it must come out after it, in order.
        hp.submit_send(fd, b"tail".to_vec()).unwrap();
        client.write_all(b"ping").unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        while hp.counters.recv_bytes < 4 && Instant::now() < deadline {
            next(&mut hp, deadline);
        }
        assert_eq!(hp.counters.recv_bytes, 4);
        // Until the send waits in the kernel for room (the peer reads nothing): its SQE taken,
        // and no completion of it pending. A short write on the way resubmits the rest.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let sends = hp.counters.short_sends;
            if let Err(e) = hp.enter(1, Some(Duration::from_millis(50))) {
                hp.enter_failed(e).unwrap();
            }
            hp.reap().unwrap();
            if hp.uring.sq_pending() == 0 && hp.counters.short_sends == sends {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the send never came to wait for room"
            );
        }
        hp.mark_unhealthy("test".into());
        hp.simulate_dead_ring = dead;
        (hp, fd, client, payload)
    }

    #[test]
    fn evacuation_returns_what_was_not_sent_and_closes_the_ring() {
        let (mut hp, fd, mut client, payload) = evacuation_case(false);
        assert!(
            hp.evacuate(Duration::from_secs(5)),
            "the kernel confirmed every op"
        );
        assert_eq!(hp.ops_in_flight(), 0);
        let (unsent, unconfirmed) = hp.take_unsent(fd);
        assert!(!unconfirmed);
        hp.close_ring(true);
        assert!(hp.uring.is_closed());
        assert!(hp.enter(0, None).is_err(), "a closed ring is never entered");
        // What reached the peer plus what came back unsent is the output, exactly once.
        let mut got = Vec::new();
        let mut chunk = vec![0u8; 1 << 16];
        client.set_nonblocking(true).unwrap();
        while let Ok(n) = client.read(&mut chunk) {
            if n == 0 {
                break;
            }
            got.extend_from_slice(&chunk[..n]);
        }
        assert!(
            got.len() < payload.len(),
            "the peer read nothing, so sends were pending"
        );
        got.extend_from_slice(&unsent);
        let mut want = payload;
        want.extend_from_slice(b"tail");
        assert_eq!(got.len(), want.len());
        assert!(
            got == want,
            "bytes were lost or repeated across the evacuation"
        );
        close_fd(fd);
    }

    #[test]
    fn evacuating_a_ring_that_cannot_be_entered_reports_the_send_unconfirmed() {
        let (mut hp, fd, _client, _payload) = evacuation_case(true);
        let enters = hp.uring.stats.enters;
        assert!(!hp.evacuate(Duration::from_secs(5)));
        assert_eq!(hp.uring.stats.enters, enters, "a dead ring is not entered");
        let (unsent, unconfirmed) = hp.take_unsent(fd);
        assert!(unconfirmed, "the send in flight never completed");
        assert_eq!(
            unsent, b"tail",
            "only what never reached the ring is returned"
        );
        hp.close_ring(false);
        close_fd(fd);
    }

    #[test]
    fn a_send_the_kernel_never_took_comes_back_whole_from_a_dead_ring() {
        let (mut hp, _listener, fd, _client) = connected(64, 8, 4096);
        // Pushed to the SQ, never submitted: the ring dies before the next enter.
        hp.submit_send(fd, b"response".to_vec()).unwrap();
        hp.mark_unhealthy("test".into());
        hp.simulate_dead_ring = true;
        assert!(!hp.evacuate(Duration::from_secs(5)));
        let (unsent, unconfirmed) = hp.take_unsent(fd);
        assert!(
            !unconfirmed,
            "a send the kernel never took is known not to have started"
        );
        assert_eq!(unsent, b"response");
        hp.close_ring(false);
        close_fd(fd);
    }

    #[test]
    fn rejects_sizes_that_are_not_powers_of_two() {
        assert!(Hotpath::validate(1000, 512, 8192).is_err());
        assert!(Hotpath::validate(1024, 0, 8192).is_err());
        assert!(Hotpath::validate(1024, 512, 32).is_err());
        assert!(Hotpath::validate(65536, 512, 8192).is_err());
        assert!(Hotpath::validate(1024, 512, 8192).is_ok());
    }

    /// Recv completions until `want` bytes came, their buffers released at once.
    fn receive(hp: &mut Hotpath, want: usize) -> Vec<u8> {
        let mut got = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(5);
        while got.len() < want && Instant::now() < deadline {
            for c in next(hp, deadline).iter().filter(|c| c.op == OpKind::Recv) {
                assert!(c.result > 0, "unexpected recv result {}", c.result);
                let bid = c.buf_id.unwrap() as u32;
                got.extend_from_slice(hp.buffer(bid, c.result as usize).unwrap());
                hp.release_buffer(bid).unwrap();
            }
        }
        got
    }

    #[test]
    fn a_paused_recv_leaves_input_in_the_socket_until_resumed() {
        let (mut hp, _listener, fd, mut client) = connected(64, 8, 4096);
        hp.submit_recv_multishot(fd).unwrap();
        client.write_all(b"first").unwrap();
        assert_eq!(receive(&mut hp, 5), b"first");
        hp.pause_recv(fd).unwrap();
        assert!(hp.recv_paused(fd));
        let unarmed = |h: &Hotpath| h.fds.get(fd).is_some_and(|s| s.recv_slot.is_none());
        let deadline = Instant::now() + Duration::from_secs(5);
        assert!(
            hp.drive_until(deadline, unarmed).unwrap(),
            "the recv was not cancelled"
        );
        client.write_all(b"second").unwrap();
        let mut peeked = [0u8; 16];
        let mut waiting = 0;
        for _ in 0..20 {
            // The ring is entered meanwhile: a recv still armed would take the bytes.
            assert!(next(&mut hp, Instant::now() + Duration::from_millis(10))
                .iter()
                .all(|c| c.op != OpKind::Recv));
            // SAFETY: the pointer and length describe `peeked`.
            let n = unsafe {
                libc::recv(
                    fd,
                    peeked.as_mut_ptr().cast(),
                    peeked.len(),
                    libc::MSG_PEEK | libc::MSG_DONTWAIT,
                )
            };
            waiting = n.max(0) as usize;
            if waiting == 6 {
                break;
            }
        }
        assert_eq!(
            &peeked[..waiting],
            b"second",
            "the bytes left the socket while paused"
        );
        hp.resume_recv(fd).unwrap();
        assert!(!hp.recv_paused(fd));
        assert_eq!(receive(&mut hp, 6), b"second");
        // Resumed before its cancel completed: the cancel's end re-arms it.
        hp.pause_recv(fd).unwrap();
        hp.resume_recv(fd).unwrap();
        client.write_all(b"third").unwrap();
        assert_eq!(receive(&mut hp, 5), b"third");
        hp.begin_cancel_all().unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        assert!(hp
            .drive_until(deadline, |h| h.ops_in_flight() == 0)
            .unwrap());
        hp.teardown(true);
        close_fd(fd);
    }

    #[test]
    fn enobufs_rearms_and_loses_nothing() {
        let (mut hp, _listener, fd, mut client) = connected(64, 2, 1024);
        hp.submit_recv_multishot(fd).unwrap();
        let payload: Vec<u8> = (0..32 * 1024).map(|i| (i * 7 % 251) as u8).collect();
        client.write_all(&payload).unwrap();
        let mut got = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(10);
        while got.len() < payload.len() && Instant::now() < deadline {
            // Hold every buffer of the batch before releasing any, so the pool runs dry.
            let batch = next(&mut hp, deadline);
            for c in batch.iter().filter(|c| c.op == OpKind::Recv) {
                assert!(c.result > 0, "unexpected recv result {}", c.result);
                let bid = c.buf_id.unwrap() as u32;
                got.extend_from_slice(hp.buffer(bid, c.result as usize).unwrap());
            }
            for c in batch.iter().filter(|c| c.op == OpKind::Recv) {
                hp.release_buffer(c.buf_id.unwrap() as u32).unwrap();
            }
        }
        assert_eq!(got, payload);
        assert!(hp.counters.enobufs > 0);
        assert!(hp.counters.recv_rearms > 0);
        hp.begin_cancel_all().unwrap();
        assert!(settles(&mut hp));
        hp.teardown(true);
        close_fd(fd);
    }

    #[test]
    fn short_send_is_resubmitted_in_order() {
        let (mut hp, _listener, fd, mut client) = connected(64, 8, 4096);
        let payload: Vec<u8> = (0..8 << 20).map(|i: u32| (i % 253) as u8).collect();
        hp.submit_send(fd, payload.clone()).unwrap();
        let reader = std::thread::spawn(move || {
            let mut got = Vec::new();
            let mut chunk = vec![0u8; 64 * 1024];
            while got.len() < 8 << 20 {
                let n = client.read(&mut chunk).unwrap();
                assert!(n > 0, "EOF before the whole payload");
                got.extend_from_slice(&chunk[..n]);
            }
            got
        });
        let deadline = Instant::now() + Duration::from_secs(20);
        let sent = loop {
            let done = next(&mut hp, deadline);
            assert!(Instant::now() < deadline, "send did not complete");
            if let Some(c) = done.iter().find(|c| c.op == OpKind::Send) {
                break c.result;
            }
        };
        assert_eq!(sent as usize, payload.len());
        assert_eq!(reader.join().unwrap(), payload);
        assert!(
            hp.counters.short_sends > 0,
            "8 MiB on loopback is always short-written"
        );
        let ticket = hp.begin_cancel_fd(fd).unwrap();
        assert!(hp
            .drive_until(Instant::now() + Duration::from_secs(5), |h| h
                .cancel_done(&ticket))
            .unwrap());
        close_fd(fd);
        hp.begin_cancel_all().unwrap();
        settles(&mut hp);
        hp.teardown(true);
    }
}
