"""An echo (or sink) server written in Python over HotpathRing, plus a completion collector."""

from __future__ import annotations

import contextlib
import errno
import os
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from sockutil import assert_nonblocking_cloexec
from uringserve import _uringserve as native

# Upper bound on wait_completions calls in any loop here; the deadlines normally end them first.
MAX_WAITS = 200_000


@dataclass(frozen=True)
class Event:
    """One completion as the tests see it, with the buffer already copied out and released."""

    op: str
    fd: int
    result: int
    more: bool
    buf_id: int | None
    data: bytes | None


def to_events(ring: native.HotpathRing, batch: list[native.Completion]) -> list[Event]:
    """Copy out every buffer of one wait_completions batch, in completion order."""
    events = []
    for c in batch:
        data = None
        if c.op == "recv" and c.result > 0:
            assert c.buf_id is not None, f"recv of {c.result} bytes on fd {c.fd} without buf_id"
            data = ring.take_buffer(c.buf_id, c.result)
        events.append(Event(c.op, c.fd, c.result, c.more, c.buf_id, data))
    return events


def collect(
    ring: native.HotpathRing,
    until: Callable[[list[Event]], bool],
    timeout: float = 10.0,
    *,
    events: list[Event] | None = None,
    max_completions: int = 256,
) -> list[Event]:
    """Wait for completions until until(events) holds; fail after timeout seconds.

    Buffers are taken only once a whole batch is in hand, so every buffer of a batch is held at
    the same time: with a tiny pool that is what drives the ring into ENOBUFS.
    """
    events = [] if events is None else events
    deadline = time.monotonic() + timeout
    for _ in range(MAX_WAITS):
        if until(events):
            return events
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        batch = ring.wait_completions(
            min_complete=1, timeout=min(remaining, 0.25), max_completions=max_completions
        )
        assert len(batch) <= max_completions, f"{len(batch)} > max_completions={max_completions}"
        events.extend(to_events(ring, batch))
    summary = [(e.op, e.fd, e.result) for e in events[-20:]]
    raise AssertionError(f"not done after {timeout}s; {len(events)} events, last: {summary}")


def recv_data(events: list[Event], fd: int) -> bytes:
    """All bytes delivered for fd, in order."""
    return b"".join(e.data for e in events if e.op == "recv" and e.fd == fd and e.data)


def saw_eof(events: list[Event], fd: int) -> bool:
    return any(e.op == "recv" and e.fd == fd and e.result == 0 for e in events)


@dataclass
class Conn:
    fd: int
    received: bytearray = field(default_factory=bytearray)
    # Lengths of the sends in flight, oldest first: send completions must match them in order.
    sends: deque[int] = field(default_factory=deque)
    eof: bool = False


class EchoServer:
    """Accepts with a multishot accept, receives with multishot recv, echoes (or just keeps)
    every byte, and closes a connection once its peer has finished and its echoes are sent.

    Anything that breaks the HotpathRing contract is recorded in `errors` rather than raised, so a
    test can finish its loop and report every problem at once.
    """

    def __init__(
        self,
        ring: native.HotpathRing,
        listen_fd: int,
        *,
        echo: bool = True,
        keep_data: bool = False,
        max_completions: int = 256,
    ) -> None:
        self.ring = ring
        self.listen_fd = listen_fd
        self.echo = echo
        self.keep_data = keep_data
        self.max_completions = max_completions
        self.conns: dict[int, Conn] = {}
        self.finished: list[bytes] = []
        self.errors: list[str] = []
        self.accepted = 0
        self.closed = 0
        self.recv_bytes = 0
        self.sent_bytes = 0
        self.send_calls = 0
        self.user_rearms = 0
        ring.submit_accept_multishot(listen_fd)

    def pump(self, timeout: float) -> int:
        batch = self.ring.wait_completions(
            min_complete=1, timeout=timeout, max_completions=self.max_completions
        )
        if len(batch) > self.max_completions:
            self.errors.append(f"batch of {len(batch)} > max_completions={self.max_completions}")
        for c in batch:
            handler = {"accept": self._on_accept, "recv": self._on_recv, "send": self._on_send}
            handle = handler.get(c.op)
            if handle is None:
                self.errors.append(f"unknown op {c.op!r}")
            else:
                handle(c)
        return len(batch)

    def run_until(self, done: Callable[[], bool], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        for _ in range(MAX_WAITS):
            if done():
                return
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            self.pump(min(remaining, 0.05))
        if not done():
            raise AssertionError(f"server not done after {timeout}s: {self.summary()}")

    def summary(self) -> str:
        return (
            f"accepted={self.accepted} closed={self.closed} open={len(self.conns)} "
            f"recv_bytes={self.recv_bytes} sent_bytes={self.sent_bytes} "
            f"errors={self.errors[:10]} stats={self.ring.stats()}"
        )

    def close_all(self) -> None:
        """Tear down what is still open: cancel first, then close (the order the ring needs)."""
        for fd in list(self.conns):
            with contextlib.suppress(Exception):
                self.ring.cancel_fd(fd)
            os.close(fd)
            del self.conns[fd]

    def _on_accept(self, c: native.Completion) -> None:
        if c.fd != self.listen_fd:
            self.errors.append(f"accept completion names fd {c.fd}, not the listener")
        if c.result < 0:
            self.errors.append(f"accept failed: {errno.errorcode.get(-c.result, c.result)}")
            return
        fd = c.result
        if fd in self.conns:
            self.errors.append(f"accepted fd {fd} is already an open connection")
            return
        try:
            assert_nonblocking_cloexec(fd)
        except AssertionError as exc:
            self.errors.append(str(exc))
        self.conns[fd] = Conn(fd)
        self.accepted += 1
        self.ring.submit_recv_multishot(fd)

    def _on_recv(self, c: native.Completion) -> None:
        conn = self.conns.get(c.fd)
        if conn is None:
            self.errors.append(f"recv completion ({c.result}) for fd {c.fd}, which is not open")
            if c.result > 0 and c.buf_id is not None:
                self.ring.release_buffer(c.buf_id)
            return
        if c.result < 0:
            self.errors.append(f"recv on fd {c.fd} failed: {errno.errorcode.get(-c.result)}")
            self._close(conn)
            return
        if c.result == 0:
            if c.buf_id is not None:
                self.errors.append(f"EOF on fd {c.fd} came with buf_id {c.buf_id}")
            conn.eof = True
            self._maybe_close(conn)
            return
        if c.buf_id is None:
            self.errors.append(f"recv of {c.result} bytes on fd {c.fd} without buf_id")
            return
        data = self.ring.take_buffer(c.buf_id, c.result)
        if conn.eof:
            self.errors.append(f"{c.result} bytes on fd {c.fd} after its EOF")
        self.recv_bytes += len(data)
        if self.keep_data:
            conn.received += data
        if self.echo:
            self.ring.submit_send(c.fd, data)
            conn.sends.append(len(data))
            self.send_calls += 1
        if not c.more:
            # The completion says the recv is no longer armed. A ring that re-arms by itself
            # answers EALREADY, which is fine too: either way the connection keeps receiving.
            try:
                self.ring.submit_recv_multishot(c.fd)
                self.user_rearms += 1
            except native.UringError as exc:
                if exc.errno != errno.EALREADY:
                    raise

    def _on_send(self, c: native.Completion) -> None:
        conn = self.conns.get(c.fd)
        if conn is None:
            self.errors.append(f"send completion ({c.result}) for fd {c.fd}, which is not open")
            return
        if not conn.sends:
            self.errors.append(f"send completion on fd {c.fd} with no send in flight")
            return
        expected = conn.sends.popleft()
        if c.result != expected:
            self.errors.append(f"send on fd {c.fd}: result {c.result}, expected {expected}")
        if c.result > 0:
            self.sent_bytes += c.result
        self._maybe_close(conn)

    def _maybe_close(self, conn: Conn) -> None:
        if conn.eof and not conn.sends:
            self._close(conn)

    def _close(self, conn: Conn) -> None:
        # Nothing should still be armed after EOF, but cancel_fd is the documented way to make
        # sure before the number can be reused.
        self.ring.cancel_fd(conn.fd)
        os.close(conn.fd)
        del self.conns[conn.fd]
        self.closed += 1
        if self.keep_data:
            self.finished.append(bytes(conn.received))
