"""Tests for HotpathRing: multishot accept/recv, provided buffers, ordered sends, cancel, health."""

from __future__ import annotations

import errno
import gc
import os
import random
import re
import resource
import selectors
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest

import uringserve
from echo_server import EchoServer, Event, collect, recv_data, saw_eof
from sockutil import (
    CHILD_RAISED_EXPECTED,
    Background,
    Resources,
    assert_nonblocking_cloexec,
    assert_nothing_to_read,
    connect,
    drop_in_child,
    outcomes,
    recv_exactly,
    run_in_child,
    run_while_blocked,
)
from uringserve import _uringserve as native

pytestmark = pytest.mark.needs_hotpath

PROMPT = 5.0
MiB = 1024 * 1024
STATS_KEYS = (
    "enters",
    "submissions",
    "completions",
    "accepts",
    "recv_bytes",
    "sends",
    "short_sends",
    "enobufs",
    "recv_rearms",
    "accept_rearms",
)

MakeHotpath = Callable[..., uringserve.HotpathRing]
MakeListener = Callable[..., socket.socket]


def rng_bytes(rng: random.Random, n: int) -> bytes:
    """Seeded random bytes, so a failure can be replayed."""
    return rng.getrandbits(8 * n).to_bytes(n, "little") if n else b""


def server_pair(
    lsock: socket.socket, resources: Resources, *, rcvbuf: int | None = None
) -> tuple[socket.socket, socket.socket]:
    """(server side, client side) of one loopback connection, accepted by plain Python."""
    client = resources.sock(connect(lsock.getsockname(), rcvbuf=rcvbuf))
    lsock.settimeout(PROMPT)
    server, _ = lsock.accept()
    resources.sock(server)
    return server, client


def accept_fds(ring: uringserve.HotpathRing, n: int) -> list[Event]:
    """Collect n accept completions (the multishot accept must already be armed)."""
    events = collect(ring, lambda ev: sum(e.op == "accept" for e in ev) >= n, PROMPT)
    return [e for e in events if e.op == "accept"]


def sends_of(events: list[Event], fd: int) -> list[int]:
    return [e.result for e in events if e.op == "send" and e.fd == fd]


# --- construction, properties, stats ------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        {"queue_depth": 0},
        {"queue_depth": 3},
        {"queue_depth": 65536},
        {"queue_depth": -1},
        {"n_bufs": 0},
        {"n_bufs": 3},
        {"n_bufs": 65536},
        {"buf_size": 32},
        {"buf_size": 100},
        {"buf_size": 32 * MiB},
    ],
    ids=lambda kw: "-".join(f"{k}={v}" for k, v in kw.items()),
)
def test_invalid_sizes_raise_valueerror(kwargs: dict[str, int]) -> None:
    with pytest.raises((ValueError, OverflowError)) as info:
        uringserve.HotpathRing(**kwargs)
    # A negative number may be refused by the int conversion itself; anything else by the check.
    if kwargs.get("queue_depth", 0) >= 0:
        assert info.type is ValueError


@pytest.mark.parametrize(
    ("queue_depth", "n_bufs", "buf_size"), [(1, 1, 64), (8, 16, 4096), (64, 32, 65536)]
)
def test_valid_sizes_and_properties(
    make_hotpath: MakeHotpath, queue_depth: int, n_bufs: int, buf_size: int
) -> None:
    ring = make_hotpath(queue_depth=queue_depth, n_bufs=n_bufs, buf_size=buf_size)
    assert (ring.queue_depth, ring.n_bufs, ring.buf_size) == (queue_depth, n_bufs, buf_size)
    assert ring.healthy and ring.unhealthy_reason is None and not ring.closed
    assert all(isinstance(flag, str) for flag in ring.setup_flags)


def test_stats_has_every_counter(make_hotpath: MakeHotpath) -> None:
    stats = make_hotpath(queue_depth=8, n_bufs=8, buf_size=4096).stats()
    missing = [key for key in STATS_KEYS if key not in stats]
    assert not missing, f"stats() lacks {missing}: {stats}"
    assert all(isinstance(stats[key], int) and stats[key] >= 0 for key in STATS_KEYS)


def test_wait_timeout_returns_empty_list(make_hotpath: MakeHotpath) -> None:
    ring = make_hotpath(queue_depth=8, n_bufs=8, buf_size=4096)
    start = time.monotonic()
    assert ring.wait_completions(min_complete=1, timeout=0.3) == []
    assert 0.27 <= time.monotonic() - start < 2.3


# --- accept -------------------------------------------------------------------------------------


@pytest.mark.parametrize("blocking", [True, False], ids=["blocking", "nonblocking"])
def test_multishot_accept_yields_nonblocking_cloexec_fds(
    make_hotpath: MakeHotpath,
    make_listener: MakeListener,
    resources: Resources,
    blocking: bool,
) -> None:
    ring = make_hotpath(queue_depth=32, n_bufs=8, buf_size=4096)
    lsock = make_listener(blocking=blocking)
    ring.submit_accept_multishot(lsock)
    # Nothing pending yet: an idle armed accept produces no completion (no EAGAIN storm).
    idle = ring.wait_completions(min_complete=1, timeout=0.2)
    assert idle == [], f"completions with no client connected: {idle}"
    for _ in range(3):
        resources.sock(connect(lsock.getsockname()))
    accepts = accept_fds(ring, 3)
    assert len(accepts) == 3
    for e in accepts:
        assert e.fd == lsock.fileno()
        assert e.result >= 0, f"accept failed: {e}"
        resources.fd(e.result)
        assert_nonblocking_cloexec(e.result)
        assert e.more, "an armed multishot accept reports more=True"
    assert ring.stats()["accepts"] >= 3


def test_accept_storm_500_connections(
    make_hotpath: MakeHotpath, make_listener: MakeListener, resources: Resources
) -> None:
    total = 500
    ring = make_hotpath(queue_depth=256, n_bufs=16, buf_size=4096)
    lsock = make_listener(backlog=1024)
    addr = lsock.getsockname()
    clients: list[socket.socket] = []

    def connect_all() -> None:
        for _ in range(total):
            clients.append(resources.sock(connect(addr)))

    ring.submit_accept_multishot(lsock)
    connector = Background(connect_all, name="storm").start()
    accepted = 0
    failures: list[int] = []
    deadline = time.monotonic() + 20.0
    for _ in range(100_000):
        if accepted >= total or time.monotonic() > deadline:
            break
        for c in ring.wait_completions(min_complete=1, timeout=0.1):
            assert c.op == "accept" and c.fd == lsock.fileno(), c
            if c.result < 0:
                failures.append(c.result)
                continue
            # Closed at once: 500 server fds need not stay open to be counted.
            os.close(c.result)
            accepted += 1
    connector.join(PROMPT * 2)
    assert not failures, f"accept errors: {[errno.errorcode.get(-r, r) for r in failures]}"
    assert accepted == total, f"accepted {accepted} of {total}: {ring.stats()}"
    # Still armed (or re-armed by the ring): later connections are accepted too.
    for _ in range(5):
        resources.sock(connect(addr))
    later = accept_fds(ring, 5)
    for e in later:
        assert e.result >= 0
        resources.fd(e.result)
    assert ring.stats()["accepts"] >= total + 5


def test_accept_survives_emfile(
    make_hotpath: MakeHotpath, listener: socket.socket, resources: Resources
) -> None:
    ring = make_hotpath(queue_depth=16, n_bufs=8, buf_size=4096)
    for _ in range(3):
        resources.sock(connect(listener.getsockname()))
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    probe = os.open(os.devnull, os.O_RDONLY)
    os.close(probe)
    # With the limit at the lowest free number, every new fd fails with EMFILE. The kernel reads
    # the limit when the accept is armed, so it is lowered before arming and raised again after.
    resource.setrlimit(resource.RLIMIT_NOFILE, (probe, hard))
    try:
        ring.submit_accept_multishot(listener)
        starved = collect(
            ring, lambda ev: any(e.op == "accept" and e.result < 0 for e in ev), PROMPT
        )
        # While fds stay exhausted the ring pauses between re-arms: re-arming at once would
        # fail at once, thousands of times in this window, and spin the server's loop.
        window_end = time.monotonic() + 0.25
        retries = 0
        for _ in range(10_000):
            if time.monotonic() >= window_end:
                break
            for c in ring.wait_completions(1, timeout=0.05):
                if c.op == "accept" and c.result >= 0:
                    resources.fd(c.result)
                retries += c.op == "accept" and c.result == -errno.EMFILE
        assert retries < 25, f"{retries} EMFILE completions in 0.25 s: the accept re-arm spins"
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    for e in starved:
        if e.result >= 0:
            resources.fd(e.result)
    assert all(e.op == "accept" and e.result == -errno.EMFILE for e in starved), starved
    # EMFILE ended the kernel's multishot; the ring re-armed it, so the waiting connections
    # are accepted once fds are available again.
    events = collect(ring, lambda ev: sum(e.op == "accept" and e.result >= 0 for e in ev) >= 3)
    for e in events:
        if e.result >= 0:
            resources.fd(e.result)
    assert ring.stats()["accept_rearms"] > 0


# --- recv and buffers ---------------------------------------------------------------------------


def test_recv_data_then_eof(
    make_hotpath: MakeHotpath, listener: socket.socket, resources: Resources
) -> None:
    ring = make_hotpath(queue_depth=16, n_bufs=8, buf_size=4096)
    server, client = server_pair(listener, resources)
    ring.submit_recv_multishot(server)
    client.sendall(b"first")
    events = collect(ring, lambda ev: len(recv_data(ev, server.fileno())) >= 5, PROMPT)
    assert recv_data(events, server.fileno()) == b"first"
    data_events = [e for e in events if e.op == "recv"]
    assert all(e.result > 0 and e.buf_id is not None and e.more for e in data_events)
    client.sendall(b"second")
    client.close()
    collect(ring, lambda ev: saw_eof(ev, server.fileno()), PROMPT, events=events)
    assert recv_data(events, server.fileno()) == b"firstsecond"
    eof = [e for e in events if e.op == "recv" and e.result == 0]
    assert len(eof) == 1 and eof[0].buf_id is None and eof[0].fd == server.fileno()
    # EOF is the last thing delivered for this fd.
    assert [e for e in events if e.op == "recv"][-1] == eof[0]
    assert ring.stats()["recv_bytes"] >= 11


def test_copy_then_release_and_invalid_buffers(
    make_hotpath: MakeHotpath, listener: socket.socket, resources: Resources
) -> None:
    ring = make_hotpath(queue_depth=16, n_bufs=8, buf_size=4096)
    server, client = server_pair(listener, resources)
    ring.submit_recv_multishot(server)
    client.sendall(b"copy me")
    batch: list[native.Completion] = []
    deadline = time.monotonic() + PROMPT
    for _ in range(1000):
        if batch or time.monotonic() > deadline:
            break
        batch = ring.wait_completions(min_complete=1, timeout=0.25)
    assert len(batch) == 1, batch
    c = batch[0]
    assert (c.op, c.fd, c.result) == ("recv", server.fileno(), 7)
    assert c.buf_id is not None and 0 <= c.buf_id < ring.n_bufs
    assert ring.copy_buffer(c.buf_id, c.result) == b"copy me"
    # Copying does not give the buffer back; it can be read again until released.
    assert ring.copy_buffer(c.buf_id, 4) == b"copy"
    # A length past the end of the buffer is refused, and the buffer stays held.
    with pytest.raises((native.InvalidBufferError, ValueError)):
        ring.copy_buffer(c.buf_id, ring.buf_size + 1)
    with pytest.raises((native.InvalidBufferError, ValueError)):
        ring.take_buffer(c.buf_id, ring.buf_size + 1)
    assert ring.copy_buffer(c.buf_id, 7) == b"copy me"
    ring.release_buffer(c.buf_id)
    with pytest.raises(native.InvalidBufferError):
        ring.release_buffer(c.buf_id)  # no longer held
    with pytest.raises(native.InvalidBufferError):
        ring.take_buffer(c.buf_id, 1)
    with pytest.raises(native.InvalidBufferError):
        ring.release_buffer(ring.n_bufs)  # out of range
    # The released buffer went back into service.
    client.sendall(b"again")
    events = collect(ring, lambda ev: len(recv_data(ev, server.fileno())) >= 5, PROMPT)
    assert recv_data(events, server.fileno()) == b"again"


def test_second_recv_on_same_fd_raises_ealready(
    make_hotpath: MakeHotpath, listener: socket.socket, resources: Resources
) -> None:
    ring = make_hotpath(queue_depth=16, n_bufs=8, buf_size=4096)
    server, client = server_pair(listener, resources)
    ring.submit_recv_multishot(server)
    with pytest.raises(native.UringError) as info:
        ring.submit_recv_multishot(server.fileno())
    assert info.value.errno == errno.EALREADY
    # The first recv is unharmed and is the only one delivering.
    client.sendall(b"only once")
    events = collect(ring, lambda ev: len(recv_data(ev, server.fileno())) >= 9, PROMPT)
    assert recv_data(events, server.fileno()) == b"only once"


def test_enobufs_rearms_and_loses_nothing(
    make_hotpath: MakeHotpath, listener: socket.socket, resources: Resources
) -> None:
    ring = make_hotpath(queue_depth=16, n_bufs=2, buf_size=4096)
    server, client = server_pair(listener, resources)
    payload = rng_bytes(random.Random(1), 64 * 1024)
    # All 64 KiB wait in the socket before the recv is armed, so the two buffers run out
    # within the first batch.
    client.sendall(payload)
    client.shutdown(socket.SHUT_WR)
    ring.submit_recv_multishot(server)
    fd = server.fileno()
    events = collect(ring, lambda ev: saw_eof(ev, fd), 10.0)
    assert [e for e in events if e.op == "recv" and e.result < 0] == [], "ENOBUFS leaked out"
    got = recv_data(events, fd)
    assert len(got) == len(payload)
    assert got == payload
    stats = ring.stats()
    assert stats["enobufs"] > 0, stats
    assert stats["recv_rearms"] > 0, stats
    assert stats["recv_bytes"] >= len(payload)


# --- send ---------------------------------------------------------------------------------------


def test_send_accepts_every_buffer_kind(
    make_hotpath: MakeHotpath, listener: socket.socket, resources: Resources
) -> None:
    ring = make_hotpath(queue_depth=16, n_bufs=8, buf_size=4096)
    server, client = server_pair(listener, resources)
    pieces: list[Any] = [
        b"ab",
        bytearray(b"cd"),
        memoryview(b"ef"),
        memoryview(b"xxghxx")[2:4],
        [b"ij", bytearray(b"kl"), memoryview(b"mn")],
        [],
    ]
    for piece in pieces:
        ring.submit_send(server, piece)
    fd = server.fileno()
    events = collect(ring, lambda ev: len(sends_of(ev, fd)) >= len(pieces), PROMPT)
    assert sends_of(events, fd) == [2, 2, 2, 2, 6, 0]
    assert recv_exactly(client, 14, PROMPT) == b"abcdefghijklmn"
    assert_nothing_to_read(client)


@pytest.mark.parametrize(
    "bad",
    ["text", 12, None, [b"ok", 7], [1, 2], [b"ok", "text"], [[b"nested"]]],
    ids=["str", "int", "None", "list-with-int", "list-of-ints", "list-with-str", "nested-list"],
)
def test_send_rejects_what_is_not_a_buffer(
    make_hotpath: MakeHotpath, listener: socket.socket, resources: Resources, bad: Any
) -> None:
    ring = make_hotpath(queue_depth=16, n_bufs=8, buf_size=4096)
    server, client = server_pair(listener, resources)
    with pytest.raises(TypeError):
        ring.submit_send(server, bad)
    # Nothing was queued: no completion and no byte on the wire (bytes(7) would be 7 zeros).
    assert ring.wait_completions(min_complete=1, timeout=0.1) == []
    assert_nothing_to_read(client)


def test_send_keeps_its_data_alive(
    make_hotpath: MakeHotpath, listener: socket.socket, resources: Resources
) -> None:
    ring = make_hotpath(queue_depth=16, n_bufs=8, buf_size=4096)
    # A small receive window keeps the send in flight after the caller dropped its buffer.
    server, client = server_pair(listener, resources, rcvbuf=4096)
    expected = rng_bytes(random.Random(2), MiB)
    data = bytearray(expected)
    ring.submit_send(server, data)
    del data
    gc.collect()
    clobber = [bytearray(b"\xee" * 4096) for _ in range(512)]  # reuse the freed memory
    reader = Background(lambda: recv_exactly(client, len(expected), 20.0)).start()
    fd = server.fileno()
    events = collect(ring, lambda ev: bool(sends_of(ev, fd)), 20.0)
    assert sends_of(events, fd) == [len(expected)]
    assert reader.join(20.0) == expected
    del clobber


def test_short_sends_are_resubmitted(
    make_hotpath: MakeHotpath, listener: socket.socket, resources: Resources
) -> None:
    ring = make_hotpath(queue_depth=32, n_bufs=8, buf_size=4096)
    server, client = server_pair(listener, resources, rcvbuf=4096)
    server.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    payload = rng_bytes(random.Random(3), 8 * MiB)
    # The peer reads in small pieces, so the kernel can only ever take part of the send.
    reader = Background(lambda: recv_exactly(client, len(payload), 30.0, chunk=4096)).start()
    ring.submit_send(server, payload)
    fd = server.fileno()
    events = collect(ring, lambda ev: bool(sends_of(ev, fd)), 30.0)
    got = reader.join(30.0)
    assert len(got) == len(payload)
    assert got == payload
    # Exactly one completion for the one submit_send, even though it took many writes.
    tail = ring.wait_completions(min_complete=1, timeout=0.2)
    assert sends_of(events, fd) == [len(payload)]
    assert [c for c in tail if c.op == "send"] == []
    stats = ring.stats()
    assert stats["short_sends"] > 0, stats
    assert stats["sends"] >= 1


def test_sends_on_one_fd_complete_in_order(
    make_hotpath: MakeHotpath, listener: socket.socket, resources: Resources
) -> None:
    ring = make_hotpath(queue_depth=64, n_bufs=8, buf_size=4096)
    server, client = server_pair(listener, resources, rcvbuf=8192)
    server.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8192)
    rng = random.Random(4)
    # Distinct sizes make the order of the completions checkable (Completion has no tag).
    sizes = rng.sample(range(16, 16384), 200)
    chunks = []
    for i, size in enumerate(sizes):
        head = b"%04d|" % i
        chunks.append(head + rng_bytes(rng, size - len(head)))
    expected = b"".join(chunks)
    reader = Background(lambda: recv_exactly(client, len(expected), 30.0, chunk=8192)).start()
    kinds: list[Callable[[bytes], Any]] = [bytes, bytearray, memoryview, lambda b: [b]]
    for i, chunk in enumerate(chunks):
        ring.submit_send(server, kinds[i % len(kinds)](chunk))
    fd = server.fileno()
    events = collect(ring, lambda ev: len(sends_of(ev, fd)) >= len(sizes), 30.0)
    assert sends_of(events, fd) == sizes
    got = reader.join(30.0)
    assert len(got) == len(expected)
    assert got == expected


# --- cancel and close ---------------------------------------------------------------------------


def test_cancel_fd_with_nothing_armed_returns(
    make_hotpath: MakeHotpath, listener: socket.socket, resources: Resources
) -> None:
    ring = make_hotpath(queue_depth=16, n_bufs=8, buf_size=4096)
    server, _ = server_pair(listener, resources)
    start = time.monotonic()
    ring.cancel_fd(server)
    assert time.monotonic() - start < PROMPT


def test_cancel_fd_stops_the_recv(
    make_hotpath: MakeHotpath, listener: socket.socket, resources: Resources
) -> None:
    ring = make_hotpath(queue_depth=16, n_bufs=8, buf_size=4096)
    server, client = server_pair(listener, resources)
    fd = server.fileno()
    ring.submit_recv_multishot(server)
    client.sendall(b"before")
    events = collect(ring, lambda ev: len(recv_data(ev, fd)) >= 6, PROMPT)
    start = time.monotonic()
    ring.cancel_fd(fd)
    assert time.monotonic() - start < PROMPT
    client.sendall(b"after")
    # Nothing is delivered for the cancelled recv, and the bytes stay in the socket.
    tail = ring.wait_completions(min_complete=1, timeout=0.2)
    assert tail == [], f"completions after cancel_fd: {tail}"
    assert recv_exactly(server, 5, PROMPT) == b"after"
    assert recv_data(events, fd) == b"before"
    # The fd can be armed again once its old recv is gone.
    ring.submit_recv_multishot(fd)
    client.sendall(b"rearmed")
    events = collect(ring, lambda ev: len(recv_data(ev, fd)) >= 7, PROMPT)
    assert recv_data(events, fd) == b"rearmed"


def test_fd_number_reuse_after_cancel_never_sees_old_data(
    make_hotpath: MakeHotpath, listener: socket.socket, resources: Resources
) -> None:
    ring = make_hotpath(queue_depth=32, n_bufs=16, buf_size=4096)
    addr = listener.getsockname()
    # Sockets for later clients are made now: a socket made after the close would itself take
    # the freed number, and the accepted connection would never get it.
    spares = [resources.sock(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) for _ in range(16)]
    old_peer = resources.sock(connect(addr))
    ring.submit_accept_multishot(listener)
    old_fd = accept_fds(ring, 1)[0].result
    assert old_fd >= 0
    resources.fd(old_fd)
    ring.submit_recv_multishot(old_fd)
    old_peer.sendall(b"old hello")
    events = collect(ring, lambda ev: len(recv_data(ev, old_fd)) >= 9, PROMPT)
    assert recv_data(events, old_fd) == b"old hello"

    def old_peer_sends(n: int) -> None:
        # The server end may already be reset; the point is only that bytes keep coming.
        try:
            for _ in range(n):
                old_peer.send(b"OLD!" * 256)
        except OSError:
            pass

    # These may land in a ring buffer before cancel_fd; they must never be delivered.
    old_peer_sends(4)
    ring.cancel_fd(old_fd)
    resources.close_fd(old_fd)
    old_peer_sends(4)

    after: list[Event] = []
    new_fd = None
    new_peer = None
    for spare in spares:
        spare.settimeout(PROMPT)
        spare.connect(addr)
        n_before = sum(e.op == "accept" for e in after)

        def one_more_accept(ev: list[Event], n: int = n_before) -> bool:
            return sum(e.op == "accept" for e in ev) > n

        collect(ring, one_more_accept, PROMPT, events=after)
        fd = [e for e in after if e.op == "accept"][-1].result
        assert fd >= 0
        if fd == old_fd:
            new_fd, new_peer = fd, spare
            break
        resources.fd(fd)  # a different number: keep it open so the old one comes up next
    assert new_fd is not None, f"fd {old_fd} was never reused within {len(spares)} connections"
    assert new_peer is not None
    resources.fd(new_fd)
    ring.submit_recv_multishot(new_fd)
    old_peer_sends(4)
    new_payload = b"".join(b"new-%05d;" % i for i in range(2000))
    new_peer.sendall(new_payload)
    new_peer.shutdown(socket.SHUT_WR)
    collect(ring, lambda ev: saw_eof(ev, old_fd), PROMPT * 2, events=after)
    got = recv_data(after, old_fd)
    assert b"OLD!" not in got, "bytes of the cancelled connection reached the new one"
    assert got == new_payload


def test_close_cancels_everything_armed(
    make_hotpath: MakeHotpath, make_listener: MakeListener, resources: Resources
) -> None:
    ring = make_hotpath(queue_depth=16, n_bufs=8, buf_size=4096)
    lsock = make_listener()
    server, client = server_pair(lsock, resources)
    ring.submit_accept_multishot(lsock)
    ring.submit_recv_multishot(server)
    assert ring.wait_completions(min_complete=1, timeout=0.1) == []
    start = time.monotonic()
    ring.close()
    assert time.monotonic() - start < PROMPT
    assert ring.closed
    # Neither the accept nor the recv is left in the kernel to steal a connection or bytes.
    client.sendall(b"still here")
    assert recv_exactly(server, 10, PROMPT) == b"still here"
    resources.sock(connect(lsock.getsockname()))
    lsock.settimeout(PROMPT)
    accepted, _ = lsock.accept()
    resources.sock(accepted)


def test_dropping_an_open_ring_cancels_everything_armed(
    make_listener: MakeListener, resources: Resources
) -> None:
    lsock = make_listener()
    server, client = server_pair(lsock, resources)
    # Not registered with `resources`: the only reference is this box, so clearing it frees
    # the ring without close(), as forgetting to close would.
    box = [uringserve.HotpathRing(queue_depth=16, n_bufs=8, buf_size=4096)]
    box[0].submit_accept_multishot(lsock)
    box[0].submit_recv_multishot(server)
    assert box[0].wait_completions(min_complete=1, timeout=0.1) == []
    box.clear()
    gc.collect()
    client.sendall(b"nobody took it")
    assert recv_exactly(server, 14, PROMPT) == b"nobody took it"
    resources.sock(connect(lsock.getsockname()))
    lsock.settimeout(PROMPT)
    accepted, _ = lsock.accept()
    resources.sock(accepted)


def test_closed_ring_raises(listener: socket.socket, resources: Resources) -> None:
    with uringserve.HotpathRing(queue_depth=8, n_bufs=8, buf_size=4096) as ring:
        assert not ring.closed
    assert ring.closed
    calls: dict[str, Callable[[], object]] = {
        "submit_accept_multishot": lambda: ring.submit_accept_multishot(listener),
        "submit_recv_multishot": lambda: ring.submit_recv_multishot(listener),
        "submit_send": lambda: ring.submit_send(listener, b"x"),
        "wait_completions": lambda: ring.wait_completions(timeout=0.1),
        "cancel_fd": lambda: ring.cancel_fd(listener),
        "release_buffer": lambda: ring.release_buffer(0),
    }
    for name, call in calls.items():
        try:
            call()
        except uringserve.RingClosedError:
            continue
        except Exception as exc:
            pytest.fail(f"{name} on a closed ring raised {exc!r}, not RingClosedError")
        pytest.fail(f"{name} on a closed ring did not raise")
    ring.close()  # a second close is harmless
    assert ring.closed


# --- health, threads, fork, GIL -----------------------------------------------------------------


def test_unhealthy_ring_refuses_submissions(
    make_hotpath: MakeHotpath, listener: socket.socket, resources: Resources
) -> None:
    ring = make_hotpath(queue_depth=8, n_bufs=8, buf_size=4096)
    server, _ = server_pair(listener, resources)
    assert ring.healthy
    reason = "test: the disk is on fire"
    ring.force_unhealthy(reason)
    assert not ring.healthy
    assert ring.unhealthy_reason == reason
    for call in (
        lambda: ring.submit_accept_multishot(listener),
        lambda: ring.submit_recv_multishot(server),
        lambda: ring.submit_send(server, b"x"),
    ):
        with pytest.raises(uringserve.RingUnhealthyError, match=re.escape(reason)):
            call()
    ring.close()
    assert ring.closed


def test_use_from_another_thread_raises_wrong_thread(
    make_hotpath: MakeHotpath, listener: socket.socket, resources: Resources
) -> None:
    ring = make_hotpath(queue_depth=16, n_bufs=8, buf_size=4096)
    server, client = server_pair(listener, resources)

    def use_elsewhere() -> dict[str, BaseException | None]:
        calls: dict[str, Callable[[], object]] = {
            "submit_accept_multishot": lambda: ring.submit_accept_multishot(listener),
            "submit_recv_multishot": lambda: ring.submit_recv_multishot(server),
            "submit_send": lambda: ring.submit_send(server, b"x"),
            "wait_completions": lambda: ring.wait_completions(timeout=0.05),
            "cancel_fd": lambda: ring.cancel_fd(server),
        }
        return outcomes(calls)

    outcome = Background(use_elsewhere).start().join(PROMPT * 2)
    for name, exc in outcome.items():
        assert isinstance(exc, uringserve.WrongThreadError), (name, exc)
        assert isinstance(exc, OSError)
    # Nothing was queued by the refused calls, and the owner thread still drives the ring.
    ring.submit_recv_multishot(server)
    client.sendall(b"owner")
    events = collect(ring, lambda ev: len(recv_data(ev, server.fileno())) >= 5, PROMPT)
    assert recv_data(events, server.fileno()) == b"owner"
    assert sends_of(events, server.fileno()) == []
    assert_nothing_to_read(client)


def test_forked_child_gets_forked_ring_error_and_parent_ring_still_works(
    make_hotpath: MakeHotpath, listener: socket.socket, resources: Resources
) -> None:
    ring = make_hotpath(queue_depth=16, n_bufs=8, buf_size=4096)
    server, client = server_pair(listener, resources)
    ring.submit_recv_multishot(server)
    for action in (
        lambda: ring.wait_completions(timeout=0.1),
        lambda: ring.submit_send(server, b"from child"),
        lambda: ring.submit_accept_multishot(listener),
    ):
        code, said = run_in_child(action, uringserve.ForkedRingError)
        assert code == CHILD_RAISED_EXPECTED, f"child exit code {code}: {said}"
    client.sendall(b"parent")
    events = collect(ring, lambda ev: len(recv_data(ev, server.fileno())) >= 6, PROMPT)
    assert recv_data(events, server.fileno()) == b"parent"
    assert_nothing_to_read(client)  # the child's refused send never happened


def test_forked_child_dropping_its_copy_leaves_parent_ring_alone(
    listener: socket.socket, resources: Resources
) -> None:
    server, client = server_pair(listener, resources)
    box = [uringserve.HotpathRing(queue_depth=16, n_bufs=8, buf_size=4096)]
    try:
        box[0].submit_recv_multishot(server)
        assert box[0].wait_completions(min_complete=1, timeout=0.05) == []

        drop_in_child(box)
        client.sendall(b"parent")
        events = collect(box[0], lambda ev: len(recv_data(ev, server.fileno())) >= 6, PROMPT)
        assert recv_data(events, server.fileno()) == b"parent"
    finally:
        for ring in box:
            ring.close()


def test_wait_completions_releases_gil(
    make_hotpath: MakeHotpath, listener: socket.socket, resources: Resources
) -> None:
    ring = make_hotpath(queue_depth=16, n_bufs=8, buf_size=4096)
    ring.submit_accept_multishot(listener)
    addr = listener.getsockname()
    wait = 10.0
    start = time.monotonic()
    batch = run_while_blocked(
        lambda: resources.sock(connect(addr)),
        lambda: ring.wait_completions(min_complete=1, timeout=wait),
    )
    assert isinstance(batch, list)
    assert batch, "no completion: the connecting thread never ran (GIL held while waiting?)"
    assert time.monotonic() - start < wait / 2
    for c in batch:
        if c.op == "accept" and c.result >= 0:
            resources.fd(c.result)


# --- batching -----------------------------------------------------------------------------------


def test_one_enter_for_a_batch_of_ready_completions(
    make_hotpath: MakeHotpath, listener: socket.socket, resources: Resources
) -> None:
    ring = make_hotpath(queue_depth=32, n_bufs=8, buf_size=4096)
    addr = listener.getsockname()
    ring.submit_accept_multishot(listener)
    # A first connection proves the accept is armed before we count.
    resources.sock(connect(addr))
    for e in accept_fds(ring, 1):
        resources.fd(e.result)
    for _ in range(6):
        resources.sock(connect(addr))
    before = ring.stats()
    batch = ring.wait_completions(min_complete=6, timeout=PROMPT)
    after = ring.stats()
    for c in batch:
        if c.op == "accept" and c.result >= 0:
            resources.fd(c.result)
    assert len(batch) == 6, batch
    assert after["enters"] - before["enters"] == 1, (before, after)
    assert after["completions"] - before["completions"] >= 6


def test_max_completions_caps_each_batch_and_keeps_the_rest(
    make_hotpath: MakeHotpath, listener: socket.socket, resources: Resources
) -> None:
    ring = make_hotpath(queue_depth=32, n_bufs=8, buf_size=4096)
    ring.submit_accept_multishot(listener)
    for _ in range(10):
        resources.sock(connect(listener.getsockname()))
    sizes: list[int] = []
    fds: list[int] = []
    deadline = time.monotonic() + PROMPT
    for _ in range(1000):
        if len(fds) >= 10 or time.monotonic() > deadline:
            break
        batch = ring.wait_completions(min_complete=1, timeout=0.25, max_completions=3)
        sizes.append(len(batch))
        for c in batch:
            assert c.op == "accept" and c.result >= 0, c
            fds.append(resources.fd(c.result))
    assert len(fds) == 10, f"{len(fds)} of 10 accepts; batches {sizes}"
    assert max(sizes) == 3, sizes
    assert all(n <= 3 for n in sizes), sizes


# --- whole-server scenarios ---------------------------------------------------------------------


@dataclass
class _Client:
    index: int
    sock: socket.socket
    payload: bytes
    sent: int = 0
    received: bytearray | None = None
    done: bool = False


def run_echo_clients(
    addr: tuple[str, int], payloads: list[bytes], timeout: float
) -> list[bytes | None]:
    """Drive one non-blocking client per payload with a selector: each sends its payload, shuts
    down its write side, and reads until EOF. Returns what each got back (None if unfinished)."""
    sel = selectors.DefaultSelector()
    clients: list[_Client] = []
    try:
        for i, payload in enumerate(payloads):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setblocking(False)
            clients.append(_Client(i, sock, payload, received=bytearray()))
            err = sock.connect_ex(addr)
            if err not in (0, errno.EINPROGRESS):
                raise OSError(err, f"connect: {os.strerror(err)}")
            sel.register(sock, selectors.EVENT_READ | selectors.EVENT_WRITE, clients[-1])
        remaining_clients = len(clients)
        deadline = time.monotonic() + timeout
        for _ in range(1_000_000):
            if not remaining_clients or time.monotonic() > deadline:
                break
            for key, mask in sel.select(timeout=0.1):
                cl: _Client = key.data
                if mask & selectors.EVENT_WRITE and cl.sent < len(cl.payload):
                    try:
                        cl.sent += cl.sock.send(cl.payload[cl.sent : cl.sent + 65536])
                    except BlockingIOError:
                        pass
                    if cl.sent == len(cl.payload):
                        cl.sock.shutdown(socket.SHUT_WR)
                        sel.modify(cl.sock, selectors.EVENT_READ, cl)
                if mask & selectors.EVENT_READ:
                    try:
                        data = cl.sock.recv(65536)
                    except BlockingIOError:
                        continue
                    assert cl.received is not None
                    if data:
                        cl.received += data
                    else:
                        cl.done = True
                        sel.unregister(cl.sock)
                        remaining_clients -= 1
        return [
            bytes(cl.received) if cl.done and cl.received is not None else None for cl in clients
        ]
    finally:
        sel.close()
        for cl in clients:
            cl.sock.close()


def test_echo_300_concurrent_connections_without_crosstalk(
    make_hotpath: MakeHotpath, make_listener: MakeListener
) -> None:
    ring = make_hotpath(queue_depth=256, n_bufs=512, buf_size=8192)
    lsock = make_listener(backlog=1024)
    rng = random.Random(6)
    payloads = [
        b"client-%03d:" % i + rng_bytes(rng, rng.randrange(1024, 40 * 1024)) for i in range(300)
    ]
    server = EchoServer(ring, lsock.fileno())
    clients = Background(lambda: run_echo_clients(lsock.getsockname(), payloads, 40.0)).start()
    try:
        deadline = time.monotonic() + 45.0
        for _ in range(1_000_000):
            if not clients.is_alive() or time.monotonic() > deadline:
                break
            server.pump(0.05)
        results = clients.join(PROMPT)
        # The last echoes are sent; let the server see the last send completions and close.
        server.run_until(lambda: server.closed >= len(payloads), PROMPT)
    finally:
        server.close_all()
    assert server.errors == []
    unfinished = [i for i, got in enumerate(results) if got is None]
    assert not unfinished, f"{len(unfinished)} clients unfinished, e.g. {unfinished[:5]}"
    wrong = [i for i, (got, sent) in enumerate(zip(results, payloads, strict=True)) if got != sent]
    assert not wrong, f"{len(wrong)} clients got other bytes back, e.g. {wrong[:5]}"
    assert server.accepted == len(payloads)
    stats = ring.stats()
    total = sum(map(len, payloads))
    assert stats["accepts"] >= len(payloads)
    assert stats["recv_bytes"] >= total
    assert stats["sends"] >= server.send_calls
    assert server.sent_bytes == total


@pytest.mark.parametrize("max_completions", [256, 1])
def test_cq_overflow_loses_nothing(
    make_hotpath: MakeHotpath,
    make_listener: MakeListener,
    resources: Resources,
    max_completions: int,
) -> None:
    # queue_depth=4 gives a completion queue of 8 entries; 64 connections that all have data
    # waiting make far more completions than that at once.
    ring = make_hotpath(queue_depth=4, n_bufs=256, buf_size=4096)
    lsock = make_listener(backlog=256)
    rng = random.Random(7)
    payloads = [b"conn-%02d:" % i + rng_bytes(rng, rng.randrange(100, 12000)) for i in range(64)]
    for payload in payloads:
        client = resources.sock(connect(lsock.getsockname()))
        client.sendall(payload)
        client.shutdown(socket.SHUT_WR)
    server = EchoServer(
        ring, lsock.fileno(), echo=False, keep_data=True, max_completions=max_completions
    )
    try:
        server.run_until(lambda: server.closed >= len(payloads), 30.0)
    finally:
        server.close_all()
    assert server.errors == []
    assert server.accepted == len(payloads)
    assert sorted(server.finished) == sorted(payloads)
    assert server.recv_bytes == sum(map(len, payloads))
    # Proof that the CQ really was too small: 64 accepts cannot fit in 8 slots, so either the
    # kernel ended the multishots (current kernels: the ring re-armed them) or completions
    # went through the kernel's overflow list (older kernels).
    stats = ring.stats()
    pressure = stats["accept_rearms"] + stats["recv_rearms"] + stats.get("cq_overflow", 0)
    assert pressure > 0, stats
