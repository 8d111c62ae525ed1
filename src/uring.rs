//! A thin owner of one io_uring instance: setup with flag and size fallback, pushes, enters, reaping.

use std::io;
use std::mem::ManuallyDrop;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::Duration;

use io_uring::types::{CancelBuilder, Fd, SubmitArgs, Timespec};
use io_uring::{cqueue, opcode, squeue, IoUring};

/// Setup flag sets, newest first. EINVAL from one means "this kernel lacks a flag": try the next.
const FLAG_SETS: &[&[&str]] = &[
    &["SINGLE_ISSUER", "DEFER_TASKRUN"],
    &["SINGLE_ISSUER", "COOP_TASKRUN"],
    &["COOP_TASKRUN"],
    &[],
];

const ENTER_GETEVENTS: u32 = 1;

/// Largest queue depth the kernel accepts (IORING_MAX_ENTRIES).
pub const MAX_ENTRIES: u32 = 32768;

/// One completion, copied out of the CQ so the ring can be entered again while it is handled.
#[derive(Debug, Clone, Copy)]
pub struct Cqe {
    pub user_data: u64,
    pub result: i32,
    pub flags: u32,
}

impl Cqe {
    pub fn more(&self) -> bool {
        cqueue::more(self.flags)
    }

    pub fn buffer_id(&self) -> Option<u16> {
        cqueue::buffer_select(self.flags)
    }
}

/// How a ring came to be: which flags it has, and whether memlock forced it smaller.
#[derive(Debug, Clone)]
pub struct SetupReport {
    pub flags: Vec<&'static str>,
    pub entries: u32,
    pub memlock_retry: bool,
}

/// Counters kept at the syscall boundary.
#[derive(Debug, Default, Clone, Copy)]
pub struct EnterStats {
    pub enters: u64,
    pub submissions: u64,
    pub completions: u64,
}

pub struct Uring {
    ring: ManuallyDrop<IoUring>,
    pub report: SetupReport,
    pub stats: EnterStats,
    ext_arg: bool,
    /// Set in a forked child: the ring memory is the parent's and must not be unmapped here.
    leak_on_drop: bool,
    /// Set by `close()`: the ring is unmapped and its fd closed; every use fails with EBADF.
    closed: bool,
    /// SQEs pushed so far: the next one pushed gets this number.
    pushed: u64,
}

fn closed_error() -> io::Error {
    io::Error::from_raw_os_error(libc::EBADF)
}

fn build(entries: u32, cq_entries: Option<u32>, flags: &[&str]) -> io::Result<IoUring> {
    let mut builder = IoUring::builder();
    builder.dontfork();
    if let Some(cq) = cq_entries {
        builder.setup_cqsize(cq);
    }
    for flag in flags {
        match *flag {
            "SINGLE_ISSUER" => builder.setup_single_issuer(),
            "DEFER_TASKRUN" => builder.setup_defer_taskrun(),
            "COOP_TASKRUN" => builder.setup_coop_taskrun(),
            _ => unreachable!("unknown setup flag {flag}"),
        };
    }
    builder.build(entries)
}

impl Uring {
    /// Sets up a ring of `entries`, retrying without newer flags on EINVAL and, when
    /// `shrink_floor < entries`, with half the entries on ENOMEM (memlock) down to the floor.
    /// Any other error (EPERM, ENOSYS) is final and returned as the kernel gave it.
    pub fn new(entries: u32, cq_entries: Option<u32>, shrink_floor: u32) -> io::Result<Uring> {
        let mut size = entries;
        let mut memlock_retry = false;
        let mut set = 0;
        loop {
            let cq = cq_entries.map(|cq| cq.max(size));
            match build(size, cq, FLAG_SETS[set]) {
                Ok(ring) => {
                    let ext_arg = ring.params().is_feature_ext_arg();
                    return Ok(Uring {
                        ring: ManuallyDrop::new(ring),
                        report: SetupReport {
                            flags: FLAG_SETS[set].to_vec(),
                            entries: size,
                            memlock_retry,
                        },
                        stats: EnterStats::default(),
                        ext_arg,
                        leak_on_drop: false,
                        closed: false,
                        pushed: 0,
                    });
                }
                Err(err)
                    if err.raw_os_error() == Some(libc::EINVAL) && set + 1 < FLAG_SETS.len() =>
                {
                    set += 1;
                }
                Err(err)
                    if err.raw_os_error() == Some(libc::ENOMEM)
                        && size / 2 >= shrink_floor.max(1) =>
                {
                    size /= 2;
                    memlock_retry = true;
                }
                Err(err) => return Err(err),
            }
        }
    }

    pub fn has_flag(&self, flag: &str) -> bool {
        self.report.flags.contains(&flag)
    }

    /// The ring's fd, or -1 once closed.
    pub fn raw_fd(&self) -> i32 {
        if self.closed {
            return -1;
        }
        self.ring.as_raw_fd()
    }

    pub fn ring(&self) -> io::Result<&IoUring> {
        if self.closed {
            return Err(closed_error());
        }
        Ok(&self.ring)
    }

    pub fn is_closed(&self) -> bool {
        self.closed
    }

    /// Unmaps the ring and closes its fd now, while its owner lives on (a server that moved
    /// to epoll). The kernel cancels whatever is still armed; the caller must already have
    /// leaked any memory those operations might touch. Later calls fail with EBADF.
    pub fn close(&mut self) {
        if self.closed || self.leak_on_drop {
            return;
        }
        self.closed = true;
        // SAFETY: `closed` makes every later use of `ring` return EBADF (and Drop skip it),
        // so it is dropped exactly once and never touched again.
        unsafe { ManuallyDrop::drop(&mut self.ring) }
    }

    /// Marks this ring as inherited through fork(): dropping it closes only this process's fd.
    pub fn leak_on_drop(&mut self) {
        self.leak_on_drop = true;
    }

    /// Pushes an SQE, submitting first when the SQ is full.
    ///
    /// # Safety
    /// Every pointer in `entry` must stay valid until the operation's final CQE is reaped.
    pub unsafe fn push(&mut self, entry: &squeue::Entry) -> io::Result<()> {
        if self.closed {
            return Err(closed_error());
        }
        loop {
            // SAFETY: the caller guarantees the SQE's memory outlives the operation.
            if unsafe { self.ring.submission().push(entry) }.is_ok() {
                self.pushed += 1;
                return Ok(());
            }
            // The SQ is full: hand what is queued to the kernel, then retry.
            self.submit()?;
        }
    }

    /// Pushes an SQE that carries no pointer into user memory.
    fn push_plain(&mut self, entry: squeue::Entry) -> io::Result<()> {
        // SAFETY: callers only pass opcodes whose SQE holds no user pointer (accept without an
        // address, multishot recv into provided buffers, poll, cancel, nop), so nothing can dangle.
        unsafe { self.push(&entry) }
    }

    pub fn push_accept(&mut self, fd: i32, user_data: u64) -> io::Result<()> {
        let flags = libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC;
        let entry = opcode::Accept::new(Fd(fd), std::ptr::null_mut(), std::ptr::null_mut())
            .flags(flags)
            .build()
            .user_data(user_data);
        self.push_plain(entry)
    }

    pub fn push_accept_multishot(&mut self, fd: i32, user_data: u64) -> io::Result<()> {
        let flags = libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC;
        let entry = opcode::AcceptMulti::new(Fd(fd))
            .flags(flags)
            .build()
            .user_data(user_data);
        self.push_plain(entry)
    }

    pub fn push_recv_multishot(&mut self, fd: i32, group: u16, user_data: u64) -> io::Result<()> {
        let entry = opcode::RecvMulti::new(Fd(fd), group)
            .build()
            .user_data(user_data);
        self.push_plain(entry)
    }

    /// Pushes a send of `len` bytes at `buf`, with MSG_NOSIGNAL so a closed peer is EPIPE, not a signal.
    ///
    /// # Safety
    /// `buf..buf+len` must stay valid and unchanged until the send's CQE is reaped.
    pub unsafe fn push_send(
        &mut self,
        fd: i32,
        buf: *const u8,
        len: u32,
        user_data: u64,
    ) -> io::Result<()> {
        let entry = opcode::Send::new(Fd(fd), buf, len)
            .flags(libc::MSG_NOSIGNAL)
            .build()
            .user_data(user_data);
        // SAFETY: forwarded from this function's contract.
        unsafe { self.push(&entry) }
    }

    /// Pushes a recv into `buf`.
    ///
    /// # Safety
    /// `buf..buf+len` must stay valid and not be read or written until the recv's CQE is reaped.
    pub unsafe fn push_recv(
        &mut self,
        fd: i32,
        buf: *mut u8,
        len: u32,
        user_data: u64,
    ) -> io::Result<()> {
        let entry = opcode::Recv::new(Fd(fd), buf, len)
            .build()
            .user_data(user_data);
        // SAFETY: forwarded from this function's contract.
        unsafe { self.push(&entry) }
    }

    /// Pushes a timeout that completes with -ETIME after `*ts`.
    ///
    /// # Safety
    /// `ts` must stay valid until the timeout's CQE is reaped.
    pub unsafe fn push_timeout(&mut self, ts: *const Timespec, user_data: u64) -> io::Result<()> {
        let entry = opcode::Timeout::new(ts).build().user_data(user_data);
        // SAFETY: forwarded from this function's contract.
        unsafe { self.push(&entry) }
    }

    /// Pushes an update of the armed timeout `target` to fire `*ts` from now.
    ///
    /// # Safety
    /// `ts` must stay valid until the update's CQE is reaped.
    pub unsafe fn push_timeout_update(
        &mut self,
        target: u64,
        ts: *const Timespec,
        user_data: u64,
    ) -> io::Result<()> {
        let entry = opcode::TimeoutUpdate::new(target, ts)
            .build()
            .user_data(user_data);
        // SAFETY: forwarded from this function's contract.
        unsafe { self.push(&entry) }
    }

    /// Pushes a multishot poll for POLLIN on `fd`, edge-triggered: one CQE per wake-up of the
    /// file's wait queue after the arm (and one at once if it is readable already).
    pub fn push_poll_multishot(&mut self, fd: i32, user_data: u64) -> io::Result<()> {
        let entry = opcode::PollAdd::new(Fd(fd), libc::POLLIN as u32)
            .multi(true)
            .build()
            .user_data(user_data);
        self.push_plain(entry)
    }

    pub fn push_cancel_fd(&mut self, fd: i32, user_data: u64) -> io::Result<()> {
        let entry = opcode::AsyncCancel2::new(CancelBuilder::fd(Fd(fd)).all())
            .build()
            .user_data(user_data);
        self.push_plain(entry)
    }

    pub fn push_cancel_user_data(&mut self, target: u64, user_data: u64) -> io::Result<()> {
        let entry = opcode::AsyncCancel::new(target)
            .build()
            .user_data(user_data);
        self.push_plain(entry)
    }

    pub fn push_cancel_any(&mut self, user_data: u64) -> io::Result<()> {
        let entry = opcode::AsyncCancel2::new(CancelBuilder::any())
            .build()
            .user_data(user_data);
        self.push_plain(entry)
    }

    /// The number the next SQE pushed will get (see `first_unconsumed`).
    pub fn next_sqe(&self) -> u64 {
        self.pushed
    }

    /// The number of the first SQE the kernel has not taken from the SQ: that one and every
    /// later one never started (without SQPOLL, only an enter takes SQEs).
    pub fn first_unconsumed(&mut self) -> u64 {
        self.pushed - self.sq_pending() as u64
    }

    pub fn sq_pending(&mut self) -> usize {
        if self.closed {
            return 0;
        }
        self.ring.submission().len()
    }

    /// One io_uring_enter: submits what is queued and returns at once.
    pub fn submit(&mut self) -> io::Result<usize> {
        if self.closed {
            return Err(closed_error());
        }
        self.stats.enters += 1;
        let n = self.ring.submit()?;
        self.stats.submissions += n as u64;
        Ok(n)
    }

    /// One io_uring_enter: submits what is queued and waits for `want` CQEs or the timeout.
    /// A timeout shows as `Err(ETIME)`.
    pub fn submit_and_wait(&mut self, want: usize, timeout: Option<Duration>) -> io::Result<usize> {
        if self.closed {
            return Err(closed_error());
        }
        self.stats.enters += 1;
        let n = match timeout {
            _ if want == 0 => {
                // GETEVENTS even when not waiting: with DEFER_TASKRUN, completions are only
                // posted while the issuer is inside an enter that asks for events.
                let pending = self.ring.submission().len() as u32;
                // SAFETY: no argument pointer is passed; the SQEs being submitted were pushed
                // under push()'s contract.
                unsafe {
                    self.ring.submitter().enter::<libc::sigset_t>(
                        pending,
                        0,
                        ENTER_GETEVENTS,
                        None,
                    )?
                }
            }
            Some(t) if self.ext_arg => {
                let ts = Timespec::from(t);
                let args = SubmitArgs::new().timespec(&ts);
                self.ring.submitter().submit_with_args(want, &args)?
            }
            _ => self.ring.submit_and_wait(want)?,
        };
        self.stats.submissions += n as u64;
        Ok(n)
    }

    /// True when the kernel can bound a wait by time (EXT_ARG, 5.11).
    pub fn can_time_out(&self) -> bool {
        self.ext_arg
    }

    /// Copies every CQE now in the CQ into `out`, without entering the kernel.
    pub fn reap(&mut self, out: &mut Vec<Cqe>) -> usize {
        if self.closed {
            return 0;
        }
        let before = out.len();
        let mut cq = self.ring.completion();
        cq.sync();
        for cqe in &mut cq {
            out.push(Cqe {
                user_data: cqe.user_data(),
                result: cqe.result(),
                flags: cqe.flags(),
            });
        }
        let n = out.len() - before;
        self.stats.completions += n as u64;
        n
    }

    pub fn cq_overflow(&mut self) -> u32 {
        if self.closed {
            return 0;
        }
        self.ring.completion().overflow()
    }
}

impl Drop for Uring {
    fn drop(&mut self) {
        if self.closed {
            return;
        }
        if self.leak_on_drop {
            // SAFETY: in a forked child the ring's mappings were not inherited (dontfork), so
            // unmapping their addresses could hit an unrelated mapping; only our fd copy is ours.
            unsafe {
                libc::close(self.ring.as_raw_fd());
            }
            return;
        }
        // SAFETY: the ring is dropped exactly once, here, and never used afterwards.
        unsafe { ManuallyDrop::drop(&mut self.ring) }
    }
}

/// The errno of a failed CQE, or None for success.
pub fn cqe_errno(result: i32) -> Option<i32> {
    (result < 0).then_some(-result)
}

/// Closes an fd the kernel handed us in a completion and that nobody else owns.
/// The peer of a connected socket as (address, port); None for non-IP families.
pub fn peer_addr(fd: i32) -> io::Result<Option<(std::net::IpAddr, u16)>> {
    // SAFETY: sockaddr_storage is plain old data for which all-zero bytes are valid.
    let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    // SAFETY: the pointer and length describe `storage`, which fits any address family, and
    // getpeername writes at most `len` bytes into it.
    let rc = unsafe {
        libc::getpeername(
            fd,
            (&mut storage as *mut libc::sockaddr_storage).cast::<libc::sockaddr>(),
            &mut len,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(match i32::from(storage.ss_family) {
        libc::AF_INET => {
            // SAFETY: the kernel wrote an AF_INET address, so storage holds a sockaddr_in;
            // sockaddr_storage is aligned for every sockaddr type.
            let a = unsafe {
                &*(&storage as *const libc::sockaddr_storage).cast::<libc::sockaddr_in>()
            };
            let ip = std::net::Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr));
            Some((ip.into(), u16::from_be(a.sin_port)))
        }
        libc::AF_INET6 => {
            // SAFETY: as above, for an AF_INET6 address and sockaddr_in6.
            let a = unsafe {
                &*(&storage as *const libc::sockaddr_storage).cast::<libc::sockaddr_in6>()
            };
            let ip = std::net::Ipv6Addr::from(a.sin6_addr.s6_addr);
            Some((ip.into(), u16::from_be(a.sin6_port)))
        }
        _ => None,
    })
}

pub fn close_fd(fd: i32) {
    // SAFETY: callers pass only fds returned by accept completions that were never given out,
    // so no other owner can be using or later closing this number.
    unsafe {
        libc::close(fd);
    }
}

/// A new non-blocking eventfd: other threads write to it to wake the ring's owner, which
/// polls it through the ring (see `push_poll_multishot`).
pub fn eventfd() -> io::Result<OwnedFd> {
    // SAFETY: eventfd(2) takes no pointer; it returns a new fd or -1.
    let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd was just created by eventfd(2) and is owned by nothing else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Waits up to `timeout` for `events` on `fd`; false when the time ran out.
fn poll_fd(fd: i32, events: i16, timeout: Duration) -> io::Result<bool> {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        let ms = i32::try_from(left.as_millis().max(1)).unwrap_or(i32::MAX);
        let mut pfd = libc::pollfd {
            fd,
            events,
            revents: 0,
        };
        // SAFETY: one valid pollfd, of which poll writes only `revents`.
        let rc = unsafe { libc::poll(&mut pfd, 1, ms) };
        if rc >= 0 {
            // POLLERR and POLLHUP count as ready: the next recv or send reports them.
            return Ok(rc > 0);
        }
        let err = io::Error::last_os_error();
        if err.raw_os_error() != Some(libc::EINTR) {
            return Err(err);
        }
    }
}

/// Runs `op`, a non-blocking recv or send on `fd`, until it goes through: again after EINTR,
/// and after EAGAIN once `fd` is ready for `events`. None when it was not within `timeout`.
fn when_ready(
    fd: i32,
    events: i16,
    timeout: Duration,
    mut op: impl FnMut() -> isize,
) -> io::Result<Option<usize>> {
    loop {
        let n = op();
        if n >= 0 {
            return Ok(Some(n as usize));
        }
        let err = io::Error::last_os_error();
        match err.raw_os_error() {
            Some(libc::EINTR) => {}
            Some(libc::EAGAIN) => {
                if !poll_fd(fd, events, timeout)? {
                    return Ok(None);
                }
            }
            _ => return Err(err),
        }
    }
}

/// Reads what socket `fd` has, waiting up to `timeout` for something: None when nothing
/// came in time, Some(0) at EOF. For a connection no ring serves any more.
pub fn recv_waiting(fd: i32, buf: &mut [u8], timeout: Duration) -> io::Result<Option<usize>> {
    when_ready(fd, libc::POLLIN, timeout, || {
        // SAFETY: the pointer and length describe `buf`, which recv may fill.
        unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), libc::MSG_DONTWAIT) }
    })
}

/// Sends all of `data` on socket `fd`, waiting up to `timeout` for each bit of progress;
/// false when the peer read nothing for that long. For a connection no ring serves any more.
pub fn send_waiting(fd: i32, data: &[u8], timeout: Duration) -> io::Result<bool> {
    let mut sent = 0;
    while sent < data.len() {
        let rest = &data[sent..];
        let flags = libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL;
        // SAFETY: the pointer and length describe `rest`, which send only reads.
        let send = || unsafe { libc::send(fd, rest.as_ptr().cast(), rest.len(), flags) };
        match when_ready(fd, libc::POLLOUT, timeout, send)? {
            Some(n) => sent += n,
            None => return Ok(false),
        }
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sets_up_and_reports_flags() {
        let ring = Uring::new(8, None, 8).expect("io_uring_setup");
        assert_eq!(ring.report.entries, 8);
        assert!(!ring.report.memlock_retry);
    }

    #[test]
    fn nop_round_trip_counts_one_enter() {
        let mut ring = Uring::new(8, None, 8).expect("io_uring_setup");
        let nop = opcode::Nop::new().build().user_data(7);
        ring.push_plain(nop).unwrap();
        ring.submit_and_wait(1, None).unwrap();
        let mut out = Vec::new();
        ring.reap(&mut out);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].user_data, 7);
        assert_eq!(ring.stats.enters, 1);
    }

    #[test]
    fn wait_times_out_with_etime() {
        let mut ring = Uring::new(8, None, 8).expect("io_uring_setup");
        if !ring.can_time_out() {
            return;
        }
        let err = ring
            .submit_and_wait(1, Some(Duration::from_millis(20)))
            .unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::ETIME));
    }

    #[test]
    fn full_sq_is_submitted_not_lost() {
        let mut ring = Uring::new(4, Some(64), 4).expect("io_uring_setup");
        for i in 0..20 {
            ring.push_plain(opcode::Nop::new().build().user_data(i))
                .unwrap();
        }
        let mut out = Vec::new();
        while out.len() < 20 {
            ring.submit_and_wait(1, None).unwrap();
            ring.reap(&mut out);
        }
        let mut ids: Vec<u64> = out.iter().map(|c| c.user_data).collect();
        ids.sort_unstable();
        assert_eq!(ids, (0..20).collect::<Vec<_>>());
    }
}
