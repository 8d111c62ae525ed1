//! A connection's I/O straight on its socket, for an app call still running when the ring
//! that served its connection was given up (live fallback).

use std::time::Duration;

use crate::errors::BodyError;
use crate::tls;
use crate::transport::{lock_io, ConnIo, SharedIo};
use crate::uring::{recv_waiting, send_waiting};

/// Sends wire bytes on `fd`, waiting up to `wait` for each bit of progress.
pub fn send_wire(fd: i32, bytes: &[u8], wait: Duration) -> Result<(), BodyError> {
    match send_waiting(fd, bytes, wait) {
        Ok(true) => Ok(()),
        Ok(false) => Err(BodyError::TimedOut(wait)),
        Err(e) => Err(BodyError::Disconnected(e.raw_os_error())),
    }
}

/// Sends, on the connection of `io`, the bytes the ring took for it and never sent
/// (`ConnIo::owed`), then the wire bytes `then` makes: the peer must get them in that order.
fn send_after_owed(
    io: &SharedIo,
    wait: Duration,
    then: impl FnOnce(&mut ConnIo) -> Vec<u8>,
) -> Result<(), BodyError> {
    let (fd, wire) = {
        let mut io = lock_io(io);
        let mut wire = std::mem::take(&mut io.owed);
        let more = then(&mut io);
        wire.extend_from_slice(&more);
        (io.fd, wire)
    };
    send_wire(fd, &wire, wait)
}

/// Sends `plain` (sealed under TLS) on the connection of `io`, after what the ring left unsent.
pub fn send_plain(io: &SharedIo, plain: Vec<u8>, wait: Duration) -> Result<(), BodyError> {
    send_after_owed(io, wait, |io| tls::sealed(io, plain))
}

/// Reads what the socket of `io` has (waiting up to `wait`) into its connection; what the
/// TLS session owes the peer in return goes out through `reply`.
pub fn pull_with(
    io: &SharedIo,
    wait: Duration,
    reply: impl FnOnce(Vec<u8>) -> Result<(), BodyError>,
) -> Result<(), BodyError> {
    let fd = lock_io(io).fd;
    let mut buf = vec![0; 64 * 1024];
    let n = match recv_waiting(fd, &mut buf, wait) {
        Ok(Some(n)) => n,
        Ok(None) => return Err(BodyError::TimedOut(wait)),
        Err(e) => {
            lock_io(io).conn.receive_eof();
            return Err(BodyError::Disconnected(e.raw_os_error()));
        }
    };
    let mut guard = lock_io(io);
    if n == 0 {
        guard.conn.receive_eof();
        return Ok(());
    }
    let wire = tls::receive_wire(&mut guard, &buf[..n]);
    drop(guard);
    if wire.is_empty() {
        return Ok(());
    }
    reply(wire)
}

/// `pull_with`, the reply sent after what the ring left unsent.
pub fn pull(io: &SharedIo, wait: Duration) -> Result<(), BodyError> {
    pull_with(io, wait, |wire| send_after_owed(io, wait, |_| wire))
}
