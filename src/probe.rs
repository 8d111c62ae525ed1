//! Capability probing by doing: each feature is tried for real and its errno kept as the reason.

use std::io::Write;
use std::net::{TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use io_uring::{opcode, register::Probe};

use crate::bufring::BufRing;
use crate::uring::{close_fd, cqe_errno, Cqe, Uring};

const PROBE_WAIT: Duration = Duration::from_secs(2);
const UD_ACCEPT: u64 = 1;
const UD_ACCEPT_MULTI: u64 = 2;
const UD_RECV_MULTI: u64 = 3;
const UD_CANCEL: u64 = 4;

/// What worked, and the errno of what did not.
#[derive(Debug, Default, Clone)]
pub struct ProbeReport {
    pub setup_ok: bool,
    pub setup_errno: Option<i32>,
    pub setup_flags: Vec<&'static str>,
    pub queue_depth: u32,
    pub memlock_retry: bool,
    pub single_issuer: bool,
    pub defer_taskrun: bool,
    pub accept: bool,
    pub accept_errno: Option<i32>,
    pub accept_multishot: bool,
    pub accept_multishot_errno: Option<i32>,
    pub pbuf_ring: bool,
    pub pbuf_ring_errno: Option<i32>,
    pub recv_multishot: bool,
    pub recv_multishot_errno: Option<i32>,
    pub send_zc: bool,
    pub memlock_soft: i64,
    pub memlock_hard: i64,
}

/// RLIMIT_MEMLOCK (soft, hard) in bytes, -1 for unlimited, read from /proc to stay in safe code.
pub fn memlock_limits() -> (i64, i64) {
    let parse = |s: &str| s.parse::<i64>().unwrap_or(-1);
    std::fs::read_to_string("/proc/self/limits")
        .ok()
        .and_then(|text| {
            let line = text.lines().find(|l| l.starts_with("Max locked memory"))?;
            let mut cols = line["Max locked memory".len()..].split_whitespace();
            Some((parse(cols.next()?), parse(cols.next()?)))
        })
        .unwrap_or((-1, -1))
}

/// Enters until the CQE for `user_data` arrives (or the deadline passes); others are dropped.
fn wait_for(uring: &mut Uring, user_data: u64, deadline: Instant) -> Option<Cqe> {
    let mut cqes = Vec::new();
    loop {
        uring.reap(&mut cqes);
        if let Some(cqe) = cqes.iter().find(|c| c.user_data == user_data) {
            return Some(*cqe);
        }
        cqes.clear();
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return None;
        }
        match uring.submit_and_wait(1, Some(left)) {
            Ok(_) => {}
            Err(e) if matches!(e.raw_os_error(), Some(libc::ETIME | libc::EINTR)) => {}
            Err(_) => return None,
        }
    }
}

/// Cancels a multishot and waits for its final CQE, so nothing stays armed on the probe ring.
fn cancel(uring: &mut Uring, target: u64) {
    if uring.push_cancel_user_data(target, UD_CANCEL).is_err() {
        return;
    }
    let deadline = Instant::now() + PROBE_WAIT;
    while let Some(cqe) = wait_for(uring, target, deadline) {
        if !cqe.more() {
            break;
        }
    }
}

fn op_result(cqe: Option<Cqe>) -> Result<i32, i32> {
    match cqe {
        None => Err(libc::ETIME),
        Some(c) => match cqe_errno(c.result) {
            Some(errno) => Err(errno),
            None => Ok(c.result),
        },
    }
}

pub fn probe() -> ProbeReport {
    let (memlock_soft, memlock_hard) = memlock_limits();
    let mut report = ProbeReport {
        memlock_soft,
        memlock_hard,
        ..Default::default()
    };
    let mut uring = match Uring::new(64, None, 4) {
        Ok(u) => u,
        Err(e) => {
            report.setup_errno = Some(e.raw_os_error().unwrap_or(libc::EIO));
            return report;
        }
    };
    report.setup_ok = true;
    report.setup_flags = uring.report.flags.clone();
    report.queue_depth = uring.report.entries;
    report.memlock_retry = uring.report.memlock_retry;
    report.single_issuer = uring.has_flag("SINGLE_ISSUER");
    report.defer_taskrun = uring.has_flag("DEFER_TASKRUN");

    let mut opcodes = Probe::new();
    if uring
        .ring()
        .is_ok_and(|r| r.submitter().register_probe(&mut opcodes).is_ok())
    {
        report.send_zc = opcodes.is_supported(opcode::SendZc::CODE);
    }

    let Ok(listener) = TcpListener::bind("127.0.0.1:0") else {
        report.accept_errno = Some(libc::EADDRNOTAVAIL);
        return report;
    };
    let Ok(addr) = listener.local_addr() else {
        return report;
    };
    let listen_fd = listener.as_raw_fd();

    // Single-shot accept.
    let Ok(mut client) = TcpStream::connect(addr) else {
        report.accept_errno = Some(libc::ECONNREFUSED);
        return report;
    };
    let accepted = uring
        .push_accept(listen_fd, UD_ACCEPT)
        .map_err(|e| e.raw_os_error().unwrap_or(libc::EIO))
        .and_then(|_| op_result(wait_for(&mut uring, UD_ACCEPT, Instant::now() + PROBE_WAIT)));
    let conn_fd = match accepted {
        Ok(fd) => {
            report.accept = true;
            fd
        }
        Err(errno) => {
            report.accept_errno = Some(errno);
            return report;
        }
    };

    // Multishot accept (5.19): the same opcode number, so only doing it tells.
    let second = TcpStream::connect(addr);
    let multi = uring
        .push_accept_multishot(listen_fd, UD_ACCEPT_MULTI)
        .map_err(|e| e.raw_os_error().unwrap_or(libc::EIO))
        .and_then(|_| {
            let cqe = wait_for(&mut uring, UD_ACCEPT_MULTI, Instant::now() + PROBE_WAIT);
            let more = cqe.is_some_and(|c| c.more());
            op_result(cqe).and_then(|fd| {
                close_fd(fd);
                if more {
                    Ok(fd)
                } else {
                    Err(libc::EINVAL)
                }
            })
        });
    match multi {
        Ok(_) => {
            report.accept_multishot = true;
            cancel(&mut uring, UD_ACCEPT_MULTI);
        }
        Err(errno) => report.accept_multishot_errno = Some(errno),
    }
    drop(second);

    // Provided-buffer ring (5.19), then a multishot recv over it (6.0) that must deliver bytes.
    match BufRing::new(4, 4096, 0) {
        Err(e) => report.pbuf_ring_errno = Some(e.raw_os_error().unwrap_or(libc::EIO)),
        Ok(mut bufs) => match bufs.register(&uring) {
            Err(e) => {
                report.pbuf_ring_errno = Some(e.raw_os_error().unwrap_or(libc::EIO));
            }
            Ok(()) => {
                report.pbuf_ring = true;
                let recv = uring
                    .push_recv_multishot(conn_fd, bufs.group(), UD_RECV_MULTI)
                    .map_err(|e| e.raw_os_error().unwrap_or(libc::EIO))
                    .and_then(|_| client.write_all(b"probe").map_err(|_| libc::EPIPE))
                    .and_then(|_| {
                        let cqe = wait_for(&mut uring, UD_RECV_MULTI, Instant::now() + PROBE_WAIT);
                        let armed = cqe.is_some_and(|c| c.more());
                        let bid = cqe.and_then(|c| c.buffer_id());
                        let n = op_result(cqe)?;
                        if let Some(bid) = bid {
                            bufs.take_from_kernel(bid);
                        }
                        if armed {
                            cancel(&mut uring, UD_RECV_MULTI);
                        }
                        if n == 5 && bid.is_some() {
                            Ok(n)
                        } else {
                            Err(libc::EINVAL)
                        }
                    });
                match recv {
                    Ok(_) => report.recv_multishot = true,
                    Err(errno) => report.recv_multishot_errno = Some(errno),
                }
                if bufs.unregister(&uring).is_err() {
                    // The kernel may still reference the memory; never unmap it then.
                    bufs.leak();
                }
            }
        },
    }
    close_fd(conn_fd);
    report
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memlock_is_read() {
        let (soft, hard) = memlock_limits();
        assert!(soft == -1 || soft >= 0);
        assert!(hard == -1 || hard >= soft);
    }

    #[test]
    fn probe_on_this_machine_is_consistent() {
        let r = probe();
        if !r.setup_ok {
            assert!(r.setup_errno.is_some(), "a failed setup keeps its errno");
            return;
        }
        assert!(r.queue_depth >= 4);
        assert_eq!(r.accept, r.accept_errno.is_none());
        if r.recv_multishot {
            assert!(r.pbuf_ring, "multishot recv needs the buffer ring");
        }
    }
}
