"""Prometheus metrics on --metrics-bind, scraped over HTTP and parsed: requests by status
class, the duration histogram, open connections, the io_uring counters, fallback_engaged and
the backend per worker; on both backends, in one process and summed across workers."""

from __future__ import annotations

import http.client
import os
import re
import signal
import socket
from collections.abc import Callable
from typing import Any

import pytest

import uringserve
from proc_util import BOOTED, ServerProcess, answered_by
from server_util import Reader, ServerThread, echo_app, get, post, request, wait_until

SAMPLE = re.compile(r"([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{([^}]*)\})? (\S+)")
LABEL = re.compile(r'([a-zA-Z_]\w*)="((?:[^"\\]|\\.)*)"')
RING_COUNTERS = (
    "enters",
    "submissions",
    "completions",
    "enobufs",
    "recv_rearms",
    "accept_rearms",
    "short_sends",
)

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> Samples:
    """The text exposition format: every sample under a # TYPE of its family, once."""
    samples: Samples = {}
    typed: dict[str, str] = {}
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ")
            assert kind in ("counter", "gauge", "histogram"), line
            typed[name] = kind
            continue
        if not line or line.startswith("#"):
            continue
        m = SAMPLE.fullmatch(line)
        assert m, f"not a sample line: {line!r}"
        name, labels, value = m.groups()
        family = re.sub(r"_(bucket|sum|count)$", "", name)
        assert name in typed or typed.get(family) == "histogram", f"{name} has no # TYPE"
        key = (name, frozenset(LABEL.findall(labels or "")))
        assert key not in samples, f"{line!r} twice"
        samples[key] = float(value)
    return samples


def scrape(address: tuple[str, int]) -> Samples:
    conn = http.client.HTTPConnection(*address, timeout=5)
    try:
        conn.request("GET", "/metrics")
        resp = conn.getresponse()
        body = resp.read().decode()
        assert resp.status == 200, body
        assert resp.getheader("Content-Type", "").startswith("text/plain; version=0.0.4")
    finally:
        conn.close()
    return parse(body)


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


def requests_by_class(samples: Samples) -> dict[str, float]:
    return {
        dict(labels)["status"]: v
        for (name, labels), v in samples.items()
        if name == "uringserve_requests_total"
    }


def backends(samples: Samples) -> dict[str, str]:
    """worker number -> backend, from uringserve_worker_backend."""
    found = {}
    for (name, labels), v in samples.items():
        if name == "uringserve_worker_backend":
            assert v == 1
            d = dict(labels)
            found[d["worker"]] = d["backend"]
    return found


def status_app(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
    if environ["PATH_INFO"] == "/missing":
        start_response("404 Not Found", [("Content-Type", "text/plain")])
        return [b"no"]
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"ok"]


def served(serve: Callable[..., ServerThread]) -> tuple[ServerThread, tuple[str, int]]:
    st = serve(status_app, metrics_bind="127.0.0.1:0")
    address = st.server.metrics_address
    assert address is not None
    return st, address


def test_requests_by_class_and_the_duration_histogram(
    serve: Callable[..., ServerThread], backend: str
) -> None:
    st, address = served(serve)
    with st.connect() as s:
        reader = Reader(s)
        for i in range(10):
            path = "/missing" if i % 3 == 0 else "/"
            s.sendall(get(path))
            assert reader.read_response().status == (404 if path == "/missing" else 200)
    want = {"1xx": 0.0, "2xx": 6.0, "3xx": 0.0, "4xx": 4.0, "5xx": 0.0}
    assert wait_until(lambda: requests_by_class(scrape(address)) == want)
    samples = scrape(address)
    name = "uringserve_request_duration_seconds"
    buckets = sorted(
        (float(dict(labels)["le"]), v)
        for (n, labels), v in samples.items()
        if n == f"{name}_bucket"
    )
    assert buckets[-1] == (float("inf"), 10.0)
    counts = [v for _, v in buckets]
    assert counts == sorted(counts), "buckets must be cumulative"
    assert [le for le, _ in buckets][:3] == [0.005, 0.01, 0.025]
    assert value(samples, f"{name}_count") == 10
    assert 0 < value(samples, f"{name}_sum") < 10
    expected = "io_uring" if backend == "on" else "epoll"
    assert backends(samples) == {"0": expected}
    assert value(samples, "uringserve_workers") == 1


def test_requests_the_http_core_refuses_are_counted(
    serve: Callable[..., ServerThread],
) -> None:
    # No app sees these, so only the core can count them: 400 for a bad request line and
    # 431 for too many header fields.
    st, address = served(serve)
    for head, status in (
        (b"NOT A REQUEST\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: x\r\n" + b"X-A: 1\r\n" * 200 + b"\r\n", 431),
    ):
        with st.connect() as s:
            s.sendall(head)
            assert Reader(s).read_response().status == status
    want = {"1xx": 0.0, "2xx": 0.0, "3xx": 0.0, "4xx": 2.0, "5xx": 0.0}
    assert wait_until(lambda: requests_by_class(scrape(address)) == want)
    assert value(scrape(address), "uringserve_request_duration_seconds_count") == 2


def test_open_connections_follow_held_connections(serve: Callable[..., ServerThread]) -> None:
    st, address = served(serve)
    held = []
    try:
        for _ in range(5):
            s = st.connect()
            held.append(s)
            resp, _ = request(s, get("/"))
            assert resp.status == 200

        def open_now() -> float:
            return value(scrape(address), "uringserve_open_connections")

        assert wait_until(lambda: open_now() == 5), open_now()
        for s in held[:3]:
            s.close()
        assert wait_until(lambda: open_now() == 2), open_now()
    finally:
        for s in held:
            s.close()
    assert wait_until(lambda: open_now() == 0), open_now()


def test_io_uring_counters(serve: Callable[..., ServerThread], backend: str) -> None:
    st, address = served(serve)
    for _ in range(3):
        with st.connect() as s:
            assert request(s, get("/"))[0].status == 200

    def ring(samples: Samples) -> dict[str, float]:
        return {c: value(samples, f"uringserve_io_uring_{c}_total") for c in RING_COUNTERS}

    if backend == "on":
        assert wait_until(lambda: ring(scrape(address))["completions"] >= 6)
        counters = ring(scrape(address))
        assert counters["enters"] > 0 and counters["submissions"] > 0, counters
    else:
        assert wait_until(lambda: requests_by_class(scrape(address))["2xx"] == 3)
        assert set(ring(scrape(address)).values()) == {0.0}


@pytest.mark.needs_hotpath
def test_the_ring_counters_follow_what_the_ring_did() -> None:
    """io_uring only (epoll's are zero, above). A 16 MiB body into a ring of four 4 KiB
    buffers runs it out of buffers (enobufs), and each time its recv is armed again once
    buffers come back (recv_rearms); the 16 MiB echo, sent before the peer reads any of it,
    goes out in parts (short_sends)."""
    st = ServerThread(echo_app, "on", n_bufs=4, buf_size=4096, metrics_bind="127.0.0.1:0")
    try:
        address = st.server.metrics_address
        assert address is not None
        before = {
            c: value(scrape(address), f"uringserve_io_uring_{c}_total") for c in RING_COUNTERS
        }
        assert before["enobufs"] == before["short_sends"] == 0, before
        body = bytes(range(256)) * (16 << 12)
        with st.connect(timeout=30) as s:
            s.sendall(post(len(body)) + body)
            # Read nothing until the server has had to send in parts.
            assert wait_until(
                lambda: value(scrape(address), "uringserve_io_uring_short_sends_total") > 0,
                timeout=30,
            )
            resp = Reader(s, 30).read_response()
            assert (resp.status, resp.body == body) == (200, True)
        after = {c: value(scrape(address), f"uringserve_io_uring_{c}_total") for c in RING_COUNTERS}
        assert after["enobufs"] > 0 and after["recv_rearms"] > 0, after
        assert after["recv_rearms"] >= after["enobufs"], after
    finally:
        st.stop()
    assert not st.errors, st.errors


def test_fallback_engaged_is_counted_and_the_backend_shown(
    serve: Callable[..., ServerThread],
) -> None:
    st, address = served(serve)
    assert wait_until(lambda: st.server.metrics_slot is not None)
    slot = st.server.metrics_slot
    assert slot is not None and slot.worker == 0
    assert value(scrape(address), "uringserve_fallback_engaged_total") == 0
    # What the live fallback does when a worker's ring turns sick.
    slot.fallback_engaged()
    slot.set_backend("epoll")
    samples = scrape(address)
    assert value(samples, "uringserve_fallback_engaged_total") == 1
    assert backends(samples) == {"0": "epoll"}
    with pytest.raises(ValueError, match="unknown backend"):
        slot.set_backend("kqueue")


def test_other_paths_are_not_found_and_a_stalled_scraper_blocks_no_one(
    serve: Callable[..., ServerThread],
) -> None:
    _, address = served(serve)
    with socket.create_connection(address, timeout=5):
        conn = http.client.HTTPConnection(*address, timeout=5)
        try:
            conn.request("GET", "/other")
            resp = conn.getresponse()
            resp.read()
            assert resp.status == 404
        finally:
            conn.close()
        assert value(scrape(address), "uringserve_workers") == 1


def test_a_busy_metrics_address_is_refused() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(OSError, match="cannot bind the metrics listener"):
            uringserve.Server(status_app, port=0, metrics_bind=f"127.0.0.1:{port}")
        server = ServerProcess(["--metrics-bind", f"127.0.0.1:{port}"], expect_startup=False)
        try:
            assert server.wait(30) == 1
            assert "cannot bind the metrics listener" in server.log()
        finally:
            server.close()


METRICS_ON = re.compile(r"metrics on http://127\.0\.0\.1:(\d+)/metrics")


def test_workers_are_summed_and_a_dead_ones_counts_kept(backend: str) -> None:
    server = ServerProcess(
        ["--io-uring", backend, "--workers", "2", "--reuse-port", "--metrics-bind", "127.0.0.1:0"]
    )
    try:
        address = ("127.0.0.1", int(server.wait_for(METRICS_ON).group(1)))
        server.booted(2)
        expected = "io_uring" if backend == "on" else "epoll"
        assert wait_until(lambda: backends(scrape(address)) == {"1": expected, "2": expected})
        pids: set[int] = set()
        sent = 0
        for sent in range(1, 201):
            pids.add(answered_by(server.port))
            if len(pids) == 2 and sent >= 10:
                break
        assert len(pids) == 2, f"one worker answered all {sent} requests"
        assert wait_until(lambda: requests_by_class(scrape(address))["2xx"] == sent)
        samples = scrape(address)
        assert value(samples, "uringserve_request_duration_seconds_count") == sent
        assert value(samples, "uringserve_workers") == 2
        if backend == "on":
            completions = "uringserve_io_uring_completions_total"
            assert wait_until(lambda: value(scrape(address), completions) > 0)

        # A worker killed outright: its replacement (worker 3) starts from zero, while the
        # totals keep what the dead one counted.
        booted = {m.group(1): int(m.group(2)) for m in server.matches(BOOTED)}
        os.kill(booted["1"], signal.SIGKILL)
        server.booted(3)
        assert wait_until(lambda: set(backends(scrape(address))) == {"2", "3"})
        samples = scrape(address)
        assert requests_by_class(samples)["2xx"] == sent
        assert value(samples, "uringserve_request_duration_seconds_count") == sent
        answered_by(server.port)
        assert wait_until(lambda: requests_by_class(scrape(address))["2xx"] == sent + 1)
    finally:
        server.close()
