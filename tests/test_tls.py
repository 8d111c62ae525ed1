"""TLS on both backends: HTTPS requests, ALPN, bad handshakes closed without harm to others,
large bodies both ways, client certificates, and the CLI's TLS options."""

from __future__ import annotations

import hashlib
import logging
import os
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests
import trustme

import uringserve
from proc_util import ServerProcess
from server_util import LogRecords, Reader, ServerThread, echo_app, get, hello_app, wait_until
from test_metrics import scrape, value

TIMEOUT = 10.0
BIG = 10 * 1024 * 1024


@dataclass(frozen=True)
class Pki:
    ca: trustme.CA
    certfile: str
    keyfile: str
    ca_file: str
    client_ca: trustme.CA
    client_ca_file: str
    tmp: Path


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    tmp = tmp_path_factory.mktemp("tls")
    ca = trustme.CA()
    leaf = ca.issue_cert("localhost", "127.0.0.1")
    certfile, keyfile, ca_file = tmp / "cert.pem", tmp / "key.pem", tmp / "ca.pem"
    certfile.write_bytes(b"".join(pem.bytes() for pem in leaf.cert_chain_pems))
    leaf.private_key_pem.write_to_path(str(keyfile))
    ca.cert_pem.write_to_path(str(ca_file))
    client_ca = trustme.CA()
    client_ca_file = tmp / "client-ca.pem"
    client_ca.cert_pem.write_to_path(str(client_ca_file))
    return Pki(ca, str(certfile), str(keyfile), str(ca_file), client_ca, str(client_ca_file), tmp)


def tls_options(pki: Pki, **extra: Any) -> dict[str, Any]:
    return {"certfile": pki.certfile, "keyfile": pki.keyfile, **extra}


def client_context(pki: Pki) -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    pki.ca.configure_trust(ctx)
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx


def connect_tls(st: ServerThread, ctx: ssl.SSLContext) -> ssl.SSLSocket:
    raw = socket.create_connection(st.address, timeout=TIMEOUT)
    try:
        return ctx.wrap_socket(raw, server_hostname="localhost")
    except BaseException:
        raw.close()
        raise


def scheme_app(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [environ["wsgi.url_scheme"].encode()]


def read_until_closed(sock: socket.socket, limit: int = 1 << 20) -> bytes:
    """What the server sends until it closes; fails if it neither closes nor stops in time."""
    deadline = time.monotonic() + TIMEOUT
    data = b""
    while len(data) < limit:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        chunk = sock.recv(65536)
        if not chunk:
            return data
        data += chunk
    raise AssertionError(f"the server kept sending: {data[:200]!r}")


def served_ok(st: ServerThread, pki: Pki) -> None:
    """A good client, while a bad one is mid-handshake, gets its answer."""
    with connect_tls(st, client_context(pki)) as s:
        s.sendall(get())
        assert Reader(s).read_response().body == b"hello"


class BioHandshake:
    """A client handshake over a plain socket through memory BIOs, so the test controls
    every byte on the wire and can stop anywhere."""

    def __init__(self, sock: socket.socket, ctx: ssl.SSLContext) -> None:
        self.sock = sock
        self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.obj = ctx.wrap_bio(self.incoming, self.outgoing, server_hostname="localhost")

    def flush(self) -> None:
        pending = self.outgoing.read()
        if pending:
            self.sock.sendall(pending)

    def client_hello(self) -> None:
        with pytest.raises(ssl.SSLWantReadError):
            self.obj.do_handshake()
        self.flush()

    def run(self) -> ssl.SSLError | None:
        """Completes the handshake: None, or the error the client failed with (any alert it
        produced is sent, as a real client would)."""
        self.sock.settimeout(TIMEOUT)
        for _ in range(100):
            try:
                self.obj.do_handshake()
                self.flush()
                return None
            except ssl.SSLWantReadError:
                self.flush()
                data = self.sock.recv(65536)
                if not data:
                    self.incoming.write_eof()
                else:
                    self.incoming.write(data)
            except ssl.SSLError as exc:
                self.flush()
                return exc
        raise AssertionError("handshake did not finish in 100 rounds")

    def read_until(self, marker: bytes) -> bytes:
        """Plaintext from the server until `marker` has come (the connection stays open)."""
        plain = b""
        while marker not in plain:
            data = self.sock.recv(65536)
            assert data, f"closed before {marker!r}: {plain!r}"
            self.incoming.write(data)
            try:
                plain += self.obj.read(65536)
            except ssl.SSLWantReadError:
                pass
        return plain

    def read_to_clean_end(self) -> bytes:
        """Plaintext from the server until it closes. After close_notify a read returns b"";
        a ragged close (a TCP FIN alone) raises SSLEOFError here instead."""
        self.incoming.write(read_until_closed(self.sock))
        self.incoming.write_eof()
        plain = b""
        for _ in range(1000):
            chunk = self.obj.read(65536)
            if not chunk:
                return plain
            plain += chunk
        raise AssertionError("the server kept sending")


# ---- HTTPS requests ------------------------------------------------------------------------


def test_https_keep_alive_alpn_and_url_scheme(serve: Callable[..., ServerThread], pki: Pki) -> None:
    st = serve(scheme_app, **tls_options(pki))
    assert st.server.startup_line().split()[3].startswith("https://")
    with connect_tls(st, client_context(pki)) as s:
        assert s.selected_alpn_protocol() == "http/1.1"
        reader = Reader(s)
        for _ in range(5):
            s.sendall(get())
            resp = reader.read_response()
            assert (resp.status, resp.body) == (200, b"https")
            assert resp.header("Connection") != "close"


def test_requests_over_https(serve: Callable[..., ServerThread], pki: Pki) -> None:
    st = serve(scheme_app, **tls_options(pki))
    with requests.Session() as session:
        for _ in range(3):
            resp = session.get(f"https://localhost:{st.address[1]}/", verify=pki.ca_file)
            assert (resp.status_code, resp.content) == (200, b"https")


@pytest.mark.parametrize("key_type", [trustme.KeyType.ECDSA, trustme.KeyType.RSA])
@pytest.mark.parametrize("traditional", [False, True], ids=["pkcs8", "pkcs1-or-sec1"])
def test_key_types_and_pem_formats(
    serve: Callable[..., ServerThread],
    pki: Pki,
    tmp_path: Path,
    key_type: trustme.KeyType,
    traditional: bool,
) -> None:
    from cryptography.hazmat.primitives import serialization

    leaf = pki.ca.issue_cert("localhost", key_type=key_type)
    certfile, keyfile = tmp_path / "cert.pem", tmp_path / "key.pem"
    certfile.write_bytes(b"".join(pem.bytes() for pem in leaf.cert_chain_pems))
    key = serialization.load_pem_private_key(leaf.private_key_pem.bytes(), password=None)
    fmt = serialization.PrivateFormat
    keyfile.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            fmt.TraditionalOpenSSL if traditional else fmt.PKCS8,
            serialization.NoEncryption(),
        )
    )
    st = serve(hello_app, certfile=str(certfile), keyfile=str(keyfile))
    with connect_tls(st, client_context(pki)) as s:
        s.sendall(get())
        assert Reader(s).read_response().body == b"hello"


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3])
def test_tls_versions(
    serve: Callable[..., ServerThread], pki: Pki, version: ssl.TLSVersion
) -> None:
    st = serve(hello_app, **tls_options(pki))
    ctx = client_context(pki)
    ctx.minimum_version = ctx.maximum_version = version
    with connect_tls(st, ctx) as s:
        assert s.version() == version.name.replace("_", ".")
        s.sendall(get(extra="Connection: close\r\n"))
        reader = Reader(s)
        assert reader.read_response().body == b"hello"
        # The server ends the session with close_notify: the client sees a clean EOF.
        assert reader.at_eof()


def test_server_close_sends_close_notify(serve: Callable[..., ServerThread], pki: Pki) -> None:
    st = serve(hello_app, **tls_options(pki))
    with socket.create_connection(st.address, timeout=TIMEOUT) as sock:
        hs = BioHandshake(sock, client_context(pki))
        assert hs.run() is None
        hs.obj.write(get(extra="Connection: close\r\n"))
        hs.flush()
        plain = hs.read_to_clean_end()
        assert plain.startswith(b"HTTP/1.1 200 ") and plain.endswith(b"hello")


@pytest.mark.parametrize("how", ["keep_alive_timeout", "header_timeout", "graceful_stop", "stop"])
def test_a_connection_the_server_ends_on_its_own_gets_close_notify(
    serve: Callable[..., ServerThread], pki: Pki, how: str
) -> None:
    """An idle keep-alive connection timed out, a request head cut off by the header timeout,
    an idle connection closed by a graceful or an immediate stop: each ends with
    close_notify, so the client can tell the server's end from a cut connection."""
    st = serve(hello_app, keep_alive_timeout=0.5, header_timeout=0.5, **tls_options(pki))
    with socket.create_connection(st.address, timeout=TIMEOUT) as sock:
        hs = BioHandshake(sock, client_context(pki))
        assert hs.run() is None
        if how == "header_timeout":
            hs.obj.write(b"GET / HTTP/1.1\r\nHost: x\r\n")
            hs.flush()
        else:
            hs.obj.write(get())
            hs.flush()
            assert hs.read_until(b"hello").startswith(b"HTTP/1.1 200 ")
        stopper = None
        if how.endswith("stop"):
            graceful = how == "graceful_stop"
            stopper = threading.Thread(target=st.server.shutdown, kwargs={"graceful": graceful})
            stopper.start()
        assert hs.read_to_clean_end() == b""
    if stopper is not None:
        stopper.join(TIMEOUT)


def test_alpn_without_http11_is_refused(serve: Callable[..., ServerThread], pki: Pki) -> None:
    st = serve(hello_app, **tls_options(pki))
    ctx = client_context(pki)
    ctx.set_alpn_protocols(["h2"])
    with pytest.raises(ssl.SSLError, match=r"NO_APPLICATION_PROTOCOL|no application protocol"):
        connect_tls(st, ctx).close()
    served_ok(st, pki)


# ---- bad clients ---------------------------------------------------------------------------


def garbage(sock: socket.socket, pki: Pki) -> bytes:
    sock.sendall(os.urandom(4096))
    return read_until_closed(sock)


def plain_http(sock: socket.socket, pki: Pki) -> bytes:
    sock.sendall(get())
    return read_until_closed(sock)


def untrusting(sock: socket.socket, pki: Pki) -> bytes:
    ctx = ssl.create_default_context()  # the system's CAs: not the test CA
    err = BioHandshake(sock, ctx).run()
    assert isinstance(err, ssl.SSLCertVerificationError)
    return read_until_closed(sock)


def hello_then_close(sock: socket.socket, pki: Pki) -> bytes:
    BioHandshake(sock, client_context(pki)).client_hello()
    sock.shutdown(socket.SHUT_WR)
    return read_until_closed(sock)


def half_a_hello(sock: socket.socket, pki: Pki) -> bytes:
    hs = BioHandshake(sock, client_context(pki))
    with pytest.raises(ssl.SSLWantReadError):
        hs.obj.do_handshake()
    hello = hs.outgoing.read()
    sock.sendall(hello[: len(hello) // 2])
    return b""  # the test closes the socket mid-record, then checks others are served


@pytest.mark.parametrize(
    "misbehave", [garbage, plain_http, untrusting, hello_then_close, half_a_hello]
)
def test_bad_handshake_is_closed_without_harm(
    serve: Callable[..., ServerThread],
    pki: Pki,
    misbehave: Callable[[socket.socket, Pki], bytes],
) -> None:
    st = serve(hello_app, **tls_options(pki))
    with socket.create_connection(st.address, timeout=TIMEOUT) as bad:
        # A good client is served while the bad one is connected, before and after it acts.
        served_ok(st, pki)
        answer = misbehave(bad, pki)
        # Never an HTTP answer in the clear: TLS records at most (an alert, 21, or the
        # server's half of the handshake, 22), then the close.
        assert answer == b"" or answer[0] in (21, 22), answer[:16]
        served_ok(st, pki)
    served_ok(st, pki)


def test_tls_failures_are_logged_at_debug_and_counted(
    serve: Callable[..., ServerThread], pki: Pki
) -> None:
    """Each failed session is one DEBUG line on uringserve.error naming the peer and rustls's
    reason, and one count in uringserve_tls_failures_total; good clients add neither."""
    logger = logging.getLogger("uringserve.error")
    collect, level = LogRecords(logging.DEBUG), logger.level
    logger.addHandler(collect)
    logger.setLevel(logging.DEBUG)
    try:
        st = serve(hello_app, metrics_bind="127.0.0.1:0", **tls_options(pki))
        address = st.server.metrics_address
        assert address is not None
        served_ok(st, pki)
        ports = set()
        for misbehave in (garbage, plain_http, untrusting):
            with socket.create_connection(st.address, timeout=TIMEOUT) as bad:
                ports.add(bad.getsockname()[1])
                misbehave(bad, pki)
        served_ok(st, pki)

        def failures() -> list[logging.LogRecord]:
            return [r for r in collect.records if r.getMessage().startswith("TLS with ")]

        assert wait_until(lambda: len(failures()) == 3), [r.getMessage() for r in failures()]
        named = set()
        for record in failures():
            assert record.levelno == logging.DEBUG, record
            peer, _, why = record.getMessage().removeprefix("TLS with ").partition(" failed: ")
            host, _, port = peer.rpartition(":")
            assert host == "127.0.0.1" and why, record.getMessage()
            named.add(int(port))
        assert named == ports
        assert wait_until(lambda: value(scrape(address), "uringserve_tls_failures_total") == 3)
    finally:
        logger.removeHandler(collect)
        logger.setLevel(level)


def test_stalled_handshake_is_closed_by_the_header_timeout(
    serve: Callable[..., ServerThread], pki: Pki
) -> None:
    st = serve(hello_app, header_timeout=0.5, **tls_options(pki))
    with socket.create_connection(st.address, timeout=TIMEOUT) as stalled:
        start = time.monotonic()
        half_a_hello(stalled, pki)
        assert read_until_closed(stalled) == b""
        assert time.monotonic() - start < TIMEOUT
        served_ok(st, pki)


def test_many_bad_handshakes_with_good_clients_between(
    serve: Callable[..., ServerThread], pki: Pki
) -> None:
    st = serve(hello_app, **tls_options(pki))
    for i in range(20):
        with socket.create_connection(st.address, timeout=TIMEOUT) as bad:
            [garbage, plain_http, hello_then_close][i % 3](bad, pki)
        served_ok(st, pki)


# ---- large bodies --------------------------------------------------------------------------


def test_10_mib_echo_over_tls(serve: Callable[..., ServerThread], backend: str, pki: Pki) -> None:
    st = serve(echo_app, **tls_options(pki))
    body = os.urandom(BIG)
    with requests.Session() as session:
        url = f"https://localhost:{st.address[1]}/"
        resp = session.post(url, data=body, verify=pki.ca_file, timeout=60)
        assert resp.status_code == 200
        assert len(resp.content) == BIG
        assert resp.content == body
        # The same connection carries on after 20 MiB each way.
        resp = session.post(url, data=b"after", verify=pki.ca_file, timeout=60)
        assert resp.content == b"after"
    st.stop()
    if backend == "on":
        # The ciphertext came through the ring: TLS did not move the server off io_uring.
        assert st.server.ring_stats is not None
        assert st.server.ring_stats["recv_bytes"] > BIG


def digest_app(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
    """Reads the body in small pieces while it streams in (each read pulls through the loop)."""
    h = hashlib.sha256()
    stream = environ["wsgi.input"]
    for _ in range(1 << 20):
        chunk = stream.read(4096)
        if not chunk:
            break
        h.update(chunk)
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [h.hexdigest().encode()]


def test_chunked_10_mib_upload_read_in_pieces(serve: Callable[..., ServerThread], pki: Pki) -> None:
    st = serve(digest_app, **tls_options(pki))
    body = os.urandom(BIG)

    def pieces() -> Iterator[bytes]:
        for i in range(0, BIG, 256 * 1024):
            yield body[i : i + 256 * 1024]

    resp = requests.post(
        f"https://localhost:{st.address[1]}/", data=pieces(), verify=pki.ca_file, timeout=60
    )
    assert resp.content == hashlib.sha256(body).hexdigest().encode()


def test_expect_continue_over_tls(serve: Callable[..., ServerThread], pki: Pki) -> None:
    st = serve(echo_app, **tls_options(pki))
    with connect_tls(st, client_context(pki)) as s:
        s.sendall(
            b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n"
        )
        reader = Reader(s)
        assert reader.read_response().status == 100
        s.sendall(b"hello")
        assert reader.read_response().body == b"hello"


# ---- client certificates -------------------------------------------------------------------


def client_cert_context(pki: Pki, issuer: trustme.CA | None) -> ssl.SSLContext:
    ctx = client_context(pki)
    if issuer is not None:
        issuer.issue_cert("client@example.org").configure_cert(ctx)
    return ctx


def refused(st: ServerThread, ctx: ssl.SSLContext) -> bool:
    """True when the server refuses the client: the handshake or the first read fails, and
    no HTTP answer comes back."""
    try:
        with connect_tls(st, ctx) as s:
            s.sendall(get())
            return not Reader(s).read_to_eof(time.monotonic() + TIMEOUT).startswith(b"HTTP/")
    except (ssl.SSLError, ConnectionResetError, BrokenPipeError):
        return True


def test_client_certificates_required_and_verified(
    serve: Callable[..., ServerThread], pki: Pki
) -> None:
    st = serve(hello_app, **tls_options(pki, ca_certs=pki.client_ca_file))
    assert refused(st, client_cert_context(pki, None))
    # A certificate from a CA the server was not told to trust is refused too.
    assert refused(st, client_cert_context(pki, pki.ca))
    with connect_tls(st, client_cert_context(pki, pki.client_ca)) as s:
        s.sendall(get())
        assert Reader(s).read_response().body == b"hello"


# ---- configuration and the CLI -------------------------------------------------------------


def test_tls_config_errors_name_the_file(pki: Pki) -> None:
    missing = str(pki.tmp / "missing.pem")
    with pytest.raises(uringserve.TlsConfigError, match=r"missing\.pem") as info:
        uringserve.Server(hello_app, port=0, certfile=missing, keyfile=pki.keyfile)
    assert isinstance(info.value.__cause__, FileNotFoundError)
    with pytest.raises(uringserve.TlsConfigError, match=r"key\.pem holds no PEM certificate"):
        uringserve.Server(hello_app, port=0, certfile=pki.keyfile, keyfile=pki.keyfile)
    with pytest.raises(uringserve.TlsConfigError, match=r"cert\.pem holds no PEM private key"):
        uringserve.Server(hello_app, port=0, certfile=pki.certfile, keyfile=pki.certfile)
    other_key = pki.tmp / "other-key.pem"
    pki.ca.issue_cert("localhost").private_key_pem.write_to_path(str(other_key))
    with pytest.raises(uringserve.TlsConfigError, match=r"other-key\.pem"):
        uringserve.Server(hello_app, port=0, certfile=pki.certfile, keyfile=str(other_key))
    with pytest.raises(uringserve.TlsConfigError, match=r"missing\.pem"):
        uringserve.Server(hello_app, port=0, **tls_options(pki, ca_certs=missing))
    with pytest.raises(ValueError, match="both certfile and keyfile"):
        uringserve.Server(hello_app, port=0, certfile=pki.certfile)


@pytest.mark.parametrize("workers", [0, 2])
def test_cli_serves_https(backend: str, pki: Pki, workers: int) -> None:
    # With workers, each one loads the certificates after the fork.
    server = ServerProcess(
        ["--io-uring", backend, "--certfile", pki.certfile, "--keyfile", pki.keyfile,
         "--ca-certs", pki.client_ca_file, "--workers", str(workers)],
        app="uringserve.demo:app",
    )  # fmt: skip
    try:
        assert server.scheme == "https"
        assert server.backend == ("io_uring" if backend == "on" else "epoll")
        ctx = client_cert_context(pki, pki.client_ca)
        for _ in range(8 if workers else 1):
            raw = socket.create_connection(("127.0.0.1", server.port), timeout=TIMEOUT)
            with ctx.wrap_socket(raw, server_hostname="localhost") as s:
                s.sendall(get())
                assert Reader(s).read_response().status == 200
        server.stop_cleanly(TIMEOUT)
    finally:
        server.close()


@pytest.mark.parametrize("which", ["--certfile", "--keyfile", "--ca-certs"])
def test_cli_bad_tls_path_exits_1(pki: Pki, which: str) -> None:
    paths = {"--certfile": pki.certfile, "--keyfile": pki.keyfile, "--ca-certs": pki.ca_file}
    paths[which] = str(pki.tmp / "nope.pem")
    args = [arg for pair in paths.items() for arg in pair]
    server = ServerProcess(
        ["--io-uring", "off", *args], app="uringserve.demo:app", expect_startup=False
    )
    try:
        assert server.wait(TIMEOUT * 2) == 1
    finally:
        server.close()
    err = server.log()
    assert "nope.pem" in err and "ENOENT" in err
    assert "Traceback" not in err


def test_tls_options_from_env(monkeypatch: pytest.MonkeyPatch, pki: Pki) -> None:
    from uringserve.cli import _parser, build_config

    monkeypatch.setenv("URINGSERVE_CERTFILE", pki.certfile)
    monkeypatch.setenv("URINGSERVE_KEYFILE", pki.keyfile)
    config = build_config(_parser().parse_args(["--ca-certs", pki.client_ca_file]))
    assert (config.certfile, config.keyfile, config.ca_certs) == (
        pki.certfile,
        pki.keyfile,
        pki.client_ca_file,
    )


# ---- many clients at once ------------------------------------------------------------------


def test_concurrent_tls_clients(serve: Callable[..., ServerThread], pki: Pki) -> None:
    st = serve(echo_app, **tls_options(pki))
    failures: list[BaseException] = []
    ctx = client_context(pki)

    def client(n: int) -> None:
        try:
            with connect_tls(st, ctx) as s:
                reader = Reader(s)
                for i in range(20):
                    body = f"{n}-{i}".encode() * 100
                    s.sendall(
                        b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(body)
                    )
                    s.sendall(body)
                    assert reader.read_response().body == body
        except BaseException as exc:
            failures.append(exc)

    threads = [threading.Thread(target=client, args=(n,)) for n in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(TIMEOUT * 3)
    assert not any(t.is_alive() for t in threads)
    assert not failures, failures
