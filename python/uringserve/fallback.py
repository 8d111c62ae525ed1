"""The epoll backend: a selectors loop driving the native HTTP core and WSGI bridge."""

from __future__ import annotations

import logging
import queue
import select
import selectors
import socket
import threading
import time
from collections import deque
from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING

from ._uringserve import HttpProtocol, MetricsSlot, WsgiApp
from .timeouts import Deadlines

if TYPE_CHECKING:
    from ._uringserve import HandedOver, Handover, Pulse

# Below glibc's mmap threshold: a bigger recv() buffer costs an mmap/munmap pair per read.
READ_SIZE = 64 * 1024
# Stop reading from a peer while this much response data waits to be sent to it.
HIGH_WATER = 1 << 20
ACCEPT_BATCH = 64
# How long stopping waits for app calls still running on the pool.
POOL_STOP_WAIT = 2.0

error_log = logging.getLogger("uringserve.error")


def _send_some(sock: socket.socket, out: bytearray) -> None:
    """Sends from the front of `out` until it is empty or the socket would block."""
    try:
        while out:
            del out[: sock.send(out)]
    except (BlockingIOError, InterruptedError):
        pass


class _Transport:
    """What the app's wsgi.input uses while it runs: block on this one socket for body bytes,
    and send 100 Continue after any responses still queued ahead of it."""

    __slots__ = ("body_timeout", "out", "sock")

    def __init__(self, sock: socket.socket, out: bytearray, body_timeout: float) -> None:
        self.sock = sock
        self.out = out
        # How long the app may wait for the next bytes of a request body (or to send).
        self.body_timeout = body_timeout

    def _wait(self, events: int) -> None:
        poller = select.poll()
        poller.register(self.sock, events)
        if not poller.poll(self.body_timeout * 1000):
            raise TimeoutError(f"no progress on the connection for {self.body_timeout:.1f} s")

    def pull(self) -> bytes:
        while True:
            try:
                return self.sock.recv(READ_SIZE)
            except (BlockingIOError, InterruptedError):
                self._wait(select.POLLIN)

    def send_now(self, data: bytes) -> None:
        self.out += data
        _send_some(self.sock, self.out)
        while self.out:
            self._wait(select.POLLOUT)
            _send_some(self.sock, self.out)


class _Conn:
    __slots__ = ("abandoned", "busy", "out", "overdue", "proto", "running", "sock")

    def __init__(
        self,
        sock: socket.socket,
        app: WsgiApp,
        peer: tuple[str, int],
        body_timeout: float,
        handed: HandedOver | None = None,
    ) -> None:
        self.sock = sock
        # Shared with the transport, so early sends queue behind what is already waiting.
        # A connection handed over by a sick ring starts with what the ring did not send.
        self.out = bytearray(handed.unsent if handed is not None else b"")
        transport = _Transport(sock, self.out, body_timeout)
        if handed is None:
            self.proto = HttpProtocol(app, peer[0], peer[1], transport)
        else:
            self.proto = HttpProtocol.adopt(app, handed, transport)
        # Its deadline passed while its input waited to be handled: the next turn decides.
        self.overdue = handed.overdue if handed is not None else False
        # Its turn went to the pool: the loop leaves it (and its socket) alone until the
        # output comes back (the loop's view; set and cleared on the loop's thread).
        self.busy = False
        # Its turn is still running on a pool thread (the pool's view: cleared, under the
        # pool's lock, when the turn ends, before its output waits in _Pool.done).
        self.running = False
        # Closed by the loop while its turn ran: whoever holds it last closes the socket
        # (see _Pool.finished), so a thread still in the turn never uses a reused fd number.
        self.abandoned = False


class _Pool:
    """App threads for the epoll loop: a connection's turn (feed, feed_eof or resume) runs
    on one, which owns the connection's socket meanwhile; the output comes back to the loop
    through a wake socket the selector watches."""

    def __init__(self, threads: int) -> None:
        self.wake_r, self.wake_w = socket.socketpair()
        self.wake_r.setblocking(False)
        self.wake_w.setblocking(False)
        self.jobs: queue.SimpleQueue[tuple[_Conn, Callable[[], bytes]] | None] = queue.SimpleQueue()
        self.done: deque[tuple[_Conn, bytes]] = deque()
        # Orders a turn's end against the loop abandoning its connection.
        self.lock = threading.Lock()
        # Daemon threads: an app call stuck past the stop must not keep the process alive.
        self.threads = [
            threading.Thread(target=self._work, name=f"uringserve-app-{i}", daemon=True)
            for i in range(threads)
        ]
        for t in self.threads:
            t.start()

    def _work(self) -> None:
        while (job := self.jobs.get()) is not None:
            conn, turn = job
            try:
                out = turn()
            except Exception:  # the session answers app errors itself; this is a bug
                error_log.exception("connection turn failed on an app thread")
                conn.proto.refuse_keep_alive()
                out = b""
            if not self.finished(conn, out):
                continue
            try:
                self.wake_w.send(b"x")
            except OSError:
                pass  # full: a wake-up is already pending; closed: the loop is gone

    def finished(self, conn: _Conn, out: bytes) -> bool:
        """A turn ended: its output goes to the loop (True), or, when the loop closed the
        connection meanwhile, its socket is closed here, now that no thread uses it."""
        with self.lock:
            conn.running = False
            if not conn.abandoned:
                self.done.append((conn, out))
                return True
        conn.sock.close()
        return False

    def abandon(self, conn: _Conn) -> None:
        """From the loop: `conn` is closed while its turn may still run. Its socket is shut
        down, so the turn's reads and writes end, and closed by whoever holds it last."""
        try:
            conn.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        with self.lock:
            if conn.running:
                conn.abandoned = True
                return  # finished() closes it
        conn.sock.close()

    def submit(self, conn: _Conn, turn: Callable[[], bytes]) -> None:
        conn.busy = conn.running = True
        self.jobs.put((conn, turn))

    def stop(self) -> None:
        for _ in self.threads:
            self.jobs.put(None)
        deadline = time.monotonic() + POOL_STOP_WAIT
        for t in self.threads:
            t.join(max(0.0, deadline - time.monotonic()))
        running = sum(t.is_alive() for t in self.threads)
        if running:
            error_log.warning(
                "%d app thread(s) still running a request at stop; left to finish", running
            )
        self.wake_r.close()
        self.wake_w.close()


def _idle(conn: _Conn) -> bool:
    """A keep-alive connection holding no request: a graceful stop closes it at once. Bytes
    that already arrived are read first, so a request on its way in is answered rather than
    reset."""
    if conn.out or not conn.proto.idle:
        return False
    try:
        data = conn.sock.recv(READ_SIZE)
    except OSError:  # nothing there (EAGAIN), or the peer is gone
        return True
    conn.out += conn.proto.feed(data) if data else conn.proto.feed_eof()
    return not data


def serve_epoll(
    listener: socket.socket,
    app: WsgiApp,
    wake: socket.socket,
    stopping: Callable[[], bool],
    *,
    header_timeout: float = 10.0,
    keep_alive_timeout: float = 5.0,
    body_timeout: float = 30.0,
    max_connections: int = 1000,
    threads: int = 1,
    draining: Callable[[], bool] | None = None,
    max_requests: int = 0,
    graceful_timeout: float = 30.0,
    metrics: MetricsSlot | None = None,
    adopt: Handover | None = None,
    heartbeat: Pulse | None = None,
) -> None:
    """Serve until stopping() is true after a wake-up; returns with every connection closed.

    Connections are closed when a request head takes longer than `header_timeout` (from the
    accept, or from the first byte after an idle spell), when idle for `keep_alive_timeout`,
    or when an unread request body stalls for `body_timeout`. Past `max_connections`, the
    listener is not polled, so new peers wait in the kernel's backlog.

    Stops gracefully (as UringServer.serve does) when draining() is true after a wake-up,
    or once app.requests reaches max_requests. The open connections are shown in `metrics`.

    `adopt` is what a sick io_uring loop handed over: its open connections carry on here
    with their sessions, unsent output and deadlines (and a graceful stop in progress too).

    With `threads` > 1 the app runs on a pool of that many threads, one request of a
    connection at a time; with 1, inline on this thread.

    `heartbeat` (a worker's, for --timeout) is beaten at least once per its interval while
    this loop runs, idle or not; an app call running inline on this thread holds it still.
    """
    sel = selectors.DefaultSelector()
    listener.setblocking(False)
    sel.register(listener, selectors.EVENT_READ, None)
    sel.register(wake, selectors.EVENT_READ, None)
    conns: dict[int, _Conn] = {}
    timers: Deadlines[_Conn] = Deadlines(header_timeout, keep_alive_timeout, body_timeout)
    accepting = True
    pool = _Pool(threads) if threads > 1 else None
    if pool is not None:
        sel.register(pool.wake_r, selectors.EVENT_READ, None)

    def regulate_accepts() -> None:
        """Stops polling the listener at the connection cap, and resumes below it."""
        nonlocal accepting
        full = len(conns) >= max_connections
        if full != accepting or stopping():
            return
        if full:
            sel.unregister(listener)
        else:
            sel.register(listener, selectors.EVENT_READ, None)
        accepting = not full

    def close(conn: _Conn) -> None:
        del conns[conn.sock.fileno()]
        timers.stop(conn)
        if conn.busy and pool is not None:
            # Its app may be blocked reading the body on the pool: that ends at a closed peer.
            pool.abandon(conn)
        else:
            sel.unregister(conn.sock)
            conn.sock.close()
        regulate_accepts()
        if metrics is not None:
            metrics.set_connections(len(conns))

    def close_owing_nothing(conn: _Conn) -> None:
        """Closes a connection the server ends on its own (a timeout, a graceful stop); under
        TLS the peer gets close_notify first, best effort, so it can tell this from a cut."""
        if not conn.out and not conn.busy:
            farewell = conn.proto.farewell()
            if farewell:
                try:
                    conn.sock.send(farewell)
                except OSError:
                    pass  # full or gone: the close alone has to do
        close(conn)

    def retime(conn: _Conn, turned: bool) -> bool:
        """Moves the connection's deadline after a turn (or a flush); False if it closed."""
        now = time.monotonic()
        timer = conn.proto.timer(bool(conn.out)) if turned else "keep"
        if conn.overdue and timer == "keep":
            close_owing_nothing(conn)
            return False
        conn.overdue = False
        timers.apply(conn, timer, now)
        if not conn.out:
            timers.apply(conn, conn.proto.flushed(), now)
        return True

    def expire(events: list[tuple[selectors.SelectorKey, int]]) -> None:
        """Closes the connections whose deadline passed, except those with input waiting."""
        now = time.monotonic()
        due = timers.next_due()
        if due is None or due > now:
            return
        ready = {key.data for key, _ in events}
        for conn, _kind in list(timers.pop_expired(now)):
            if conn in ready or conn.busy:
                conn.overdue = True
            elif conn.sock.fileno() in conns:
                close_owing_nothing(conn)

    def update(conn: _Conn) -> None:
        if conn.proto.closing and not conn.out:
            close(conn)
            return
        events = selectors.EVENT_WRITE if conn.out else 0
        if not conn.proto.closing and len(conn.out) < HIGH_WATER:
            events |= selectors.EVENT_READ
        sel.modify(conn.sock, events, conn)

    def flush(conn: _Conn) -> bool:
        try:
            _send_some(conn.sock, conn.out)
        except OSError:
            close(conn)
            return False
        return True

    def run(conn: _Conn, turn: Callable[[], bytes]) -> bool:
        """Runs a turn of the connection: inline, or on the pool (then False: the loop
        leaves the connection alone until the turn comes back)."""
        if pool is None:
            conn.out += turn()
            return True
        sel.unregister(conn.sock)
        pool.submit(conn, turn)
        return False

    def pump(conn: _Conn) -> bool:
        """Sends what is queued; while the peer keeps up, answers requests that were held back
        for it. False if the connection closed or went to the pool."""
        while True:
            if conn.out and not flush(conn):
                return False
            if conn.out or not conn.proto.held_back:
                return True
            if not run(conn, conn.proto.resume):
                return False

    def returned(conn: _Conn, out: bytes) -> None:
        """A turn came back from the pool: the loop takes the connection over again."""
        conn.busy = False
        if conns.get(conn.sock.fileno()) is not conn:
            return  # closed meanwhile (a hard stop, or the graceful deadline)
        conn.out += out
        sel.register(conn.sock, selectors.EVENT_READ, conn)
        if pump(conn) and retime(conn, True):
            update(conn)

    def should_drain(woken: bool) -> bool:
        at_max = max_requests > 0 and app.requests >= max_requests
        if draining is None:
            return at_max
        return (woken or at_max) and draining()

    def drain_pass() -> bool:
        """Closes the connections holding no request; True once none is left."""
        # Every connection is told first: an app running on the pool may answer any moment.
        for conn in conns.values():
            conn.proto.refuse_keep_alive()
        for conn in list(conns.values()):
            if conn.busy:
                continue
            if _idle(conn):
                close_owing_nothing(conn)
            elif pump(conn):
                update(conn)
        return not conns

    def adopt_all(handover: Handover) -> bool:
        """Takes the handed-over connections in; True if the ring consumed a wake-up."""
        now = time.monotonic()
        # Deadlines are kept in the order they fall due, so they are taken in that order.
        order = sorted(handover.connections, key=lambda h: h.due_in or 0.0)
        adopted = []
        for handed in order:
            sock = socket.socket(fileno=handed.fd)
            sock.setblocking(False)
            conn = _Conn(sock, app, ("", 0), body_timeout, handed)
            conns[sock.fileno()] = conn
            sel.register(sock, selectors.EVENT_READ, conn)
            if handed.timer is not None and handed.due_in is not None:
                started = now + handed.due_in - timers.timeout[handed.timer]
                timers.start(conn, handed.timer, started)
            adopted.append(conn)
        # Bytes that arrived before the hand-over may complete requests: answer them now.
        for conn in adopted:
            if not run(conn, conn.proto.advance):
                continue
            if pump(conn) and retime(conn, True):
                update(conn)
        regulate_accepts()
        if metrics is not None:
            metrics.set_connections(len(conns))
        return handover.woken

    deadline: float | None = None  # the graceful deadline, once draining
    woken_before = False
    next_beat = 0.0
    try:
        if adopt is not None:
            woken_before = adopt_all(adopt)
            if adopt.drain_left is not None:
                deadline = time.monotonic() + adopt.drain_left
                max_connections = 0
                regulate_accepts()
        while not stopping():
            woken, woken_before = woken_before, False
            due = timers.next_due()
            if deadline is not None:
                due = deadline if due is None else min(due, deadline)
            # One clock read a pass, for the heartbeat and the wait alike.
            now = time.monotonic()
            if heartbeat is not None:
                # A beat (a store in shared memory) once an interval.
                if now >= next_beat:
                    heartbeat.beat()
                    next_beat = now + heartbeat.interval
                due = next_beat if due is None else min(due, next_beat)
            if woken:
                due = now
            events = sel.select(None if due is None else max(0.0, due - now))
            expire(events)
            for key, mask in events:
                if key.fileobj is wake:
                    wake.recv(64)
                    woken = True
                    continue
                if pool is not None and key.fileobj is pool.wake_r:
                    pool.wake_r.recv(4096)
                    while pool.done:
                        returned(*pool.done.popleft())
                    continue
                if key.fileobj is listener:
                    # One clock read and one gauge update for the whole batch of accepts.
                    accepted_at = time.monotonic()
                    for _ in range(ACCEPT_BATCH):
                        try:
                            sock, peer = listener.accept()
                        except (BlockingIOError, InterruptedError):
                            break
                        except OSError:
                            break  # EMFILE and the like: the backlog keeps the peer waiting
                        sock.setblocking(False)
                        conn = _Conn(sock, app, (str(peer[0]), int(peer[1])), body_timeout)
                        conns[sock.fileno()] = conn
                        sel.register(sock, selectors.EVENT_READ, conn)
                        timers.start(conn, "header", accepted_at)
                        if len(conns) >= max_connections:
                            regulate_accepts()
                            break
                    if metrics is not None:
                        metrics.set_connections(len(conns))
                    continue
                conn = key.data
                if conn.sock.fileno() not in conns or conn.busy:
                    continue  # closed by expire() above, or went to the pool just now
                turned = conn.proto.held_back
                if mask & selectors.EVENT_READ:
                    try:
                        data = conn.sock.recv(READ_SIZE)
                    except (BlockingIOError, InterruptedError):
                        data = None
                    except OSError:
                        close(conn)
                        continue
                    if data is not None and pool is None:
                        conn.out += conn.proto.feed(data) if data else conn.proto.feed_eof()
                        turned = True
                    elif data is not None:
                        run(conn, partial(conn.proto.feed, data) if data else conn.proto.feed_eof)
                        continue
                if pump(conn) and retime(conn, turned):
                    update(conn)
            if deadline is None and should_drain(woken):
                deadline = time.monotonic() + graceful_timeout
                max_connections = 0  # no room for new connections: the listener stays unpolled
                regulate_accepts()
            if deadline is not None and (drain_pass() or time.monotonic() >= deadline):
                return
    finally:
        for conn in list(conns.values()):
            close_owing_nothing(conn)
        sel.close()
        if pool is not None:
            # Every connection, busy or not, was closed above (a turn still running closes
            # its socket when it ends), so what waits in pool.done needs nothing more.
            pool.stop()
