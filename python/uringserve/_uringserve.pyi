"""Type stubs for the native io_uring core (written by hand; checked by stubtest)."""

import os
from collections.abc import Callable, Iterable, Sequence
from typing import Final, Literal, Protocol, final

from typing_extensions import Buffer, Self

__all__ = [
    "ABI_VERSION",
    "ClientDisconnected",
    "Completion",
    "FileWrapper",
    "ForkedRingError",
    "HandedOver",
    "Handover",
    "Heartbeats",
    "HotpathRing",
    "HttpProtocol",
    "InvalidBufferError",
    "InvalidRequestBody",
    "MetricsBlock",
    "MetricsSlot",
    "Pulse",
    "Ring",
    "RingClosedError",
    "RingSetupError",
    "RingUnhealthyError",
    "TlsConfig",
    "TlsConfigError",
    "UringError",
    "UringServer",
    "WrongThreadError",
    "WsgiApp",
    "check_access_log_format",
    "probe",
]

ABI_VERSION: Final[int]

class _HasFileno(Protocol):
    def fileno(self) -> int: ...

_FdLike = int | _HasFileno

class _Readable(Protocol):
    def read(self, size: int, /) -> bytes: ...

class UringError(OSError):
    """Base class of every error raised by the native core; ``errno`` keeps the kernel's errno."""

class RingSetupError(UringError):
    """io_uring_setup or a buffer-ring registration failed."""

class RingClosedError(UringError):
    """The ring was used after ``close()``."""

class WrongThreadError(UringError):
    """The ring was used from a thread other than the one that created it."""

class ForkedRingError(UringError):
    """The ring was used in a process forked after it was created."""

class RingUnhealthyError(UringError):
    """The hot-path ring turned unhealthy; new submissions are refused."""

class InvalidBufferError(UringError):
    """A provided-buffer id was out of range or not held by the caller."""

class TlsConfigError(OSError):
    """The TLS certificate, key or CA file could not be loaded; the message names the file."""

class ClientDisconnected(OSError):
    """wsgi.input: the client closed or reset the connection before its request body was
    complete."""

class InvalidRequestBody(ValueError):
    """wsgi.input: the request body broke HTTP framing (for instance a bad chunk size)."""

def probe() -> dict[str, object]:
    """Probe io_uring on this process by doing it; see ``uringserve.capabilities()``."""

@final
class Ring:
    def __new__(cls, queue_depth: int = 256) -> Self: ...
    @property
    def queue_depth(self) -> int: ...
    @property
    def closed(self) -> bool: ...
    def accept(self, sock: _FdLike, timeout: float | None = None) -> int | None: ...
    def read(self, fd: _FdLike, max_bytes: int, timeout: float | None = None) -> bytes: ...
    def close(self) -> None: ...
    def __enter__(self) -> Self: ...
    def __exit__(self, *exc_info: object) -> None: ...

@final
class Completion:
    @property
    def op(self) -> str: ...
    @property
    def fd(self) -> int: ...
    @property
    def result(self) -> int: ...
    @property
    def buf_id(self) -> int | None: ...
    @property
    def more(self) -> bool: ...

@final
class HotpathRing:
    def __new__(cls, queue_depth: int = 1024, n_bufs: int = 512, buf_size: int = 8192) -> Self: ...
    @property
    def queue_depth(self) -> int: ...
    @property
    def n_bufs(self) -> int: ...
    @property
    def buf_size(self) -> int: ...
    @property
    def setup_flags(self) -> list[str]: ...
    @property
    def healthy(self) -> bool: ...
    @property
    def unhealthy_reason(self) -> str | None: ...
    @property
    def closed(self) -> bool: ...
    def force_unhealthy(self, reason: str | None = None) -> None: ...
    def submit_accept_multishot(self, listen_fd: _FdLike) -> None: ...
    def submit_recv_multishot(self, fd: _FdLike) -> None: ...
    def submit_send(self, fd: _FdLike, data: Buffer | Sequence[Buffer]) -> None: ...
    def wait_completions(
        self, min_complete: int = 1, timeout: float | None = None, max_completions: int = 256
    ) -> list[Completion]: ...
    def copy_buffer(self, buf_id: int, length: int) -> bytes: ...
    def release_buffer(self, buf_id: int) -> None: ...
    def take_buffer(self, buf_id: int, length: int) -> bytes: ...
    def cancel_fd(self, fd: _FdLike) -> None: ...
    def stats(self) -> dict[str, int]: ...
    def close(self) -> None: ...
    def __enter__(self) -> Self: ...
    def __exit__(self, *exc_info: object) -> None: ...

@final
class WsgiApp:
    """A WSGI app with its server's settings, shared by every connection of one server."""

    def __new__(
        cls,
        app: Callable[..., Iterable[bytes]],
        server_name: str,
        server_port: int,
        *,
        url_scheme: str | None = None,
        access_log: bool = True,
        multiprocess: bool = False,
        multithread: bool = False,
        max_body_size: int = 1073741824,
        max_request_line: int = 8192,
        max_header_bytes: int = 65536,
        max_headers: int = 100,
        tls: TlsConfig | None = None,
        max_requests: int = 0,
        access_log_format: str | None = None,
        metrics: MetricsSlot | None = None,
    ) -> Self: ...
    @property
    def metrics(self) -> MetricsSlot | None:
        """The metrics slot its requests are counted in, if any."""
    @property
    def requests(self) -> int:
        """Requests taken so far, by every connection of this app."""

def check_access_log_format(format: str) -> None:
    """Raises ValueError saying what is wrong with an access log format."""

@final
class MetricsBlock:
    """The shared counters of every worker: made before forking, scraped by the master."""

    def __new__(cls, capacity: int) -> Self: ...
    @property
    def capacity(self) -> int: ...
    def claim(self, worker: int) -> int | None:
        """A free slot for worker number `worker`, zeroed; None when every slot is taken."""
    def slot(self, index: int) -> MetricsSlot:
        """The handle on slot `index`; takes no lock, so it is safe in a freshly forked child."""
    def retire(self, index: int) -> None:
        """Folds the counters of slot `index`, whose worker exited, into the total, and frees it."""
    def render(self) -> str:
        """Every metric in the Prometheus text format."""

@final
class Heartbeats:
    """A heartbeat counter per worker slot (--timeout), mapped before forking."""

    def __new__(cls, capacity: int) -> Self: ...
    @property
    def capacity(self) -> int: ...
    def count(self, index: int) -> int:
        """The beats slot `index` has counted so far (it only grows while its worker lives)."""
    def pulse(self, index: int, interval: float) -> Pulse:
        """The handle a worker's loops beat with, at least once per `interval` seconds."""

@final
class Pulse:
    """One worker's heartbeat: its slot and how often it must beat."""

    @property
    def index(self) -> int: ...
    @property
    def interval(self) -> float:
        """Seconds between beats."""
    def beat(self) -> None:
        """One beat: a relaxed atomic add in shared memory, no syscall."""

@final
class MetricsSlot:
    """One worker's counters; the serve loops update it from Rust."""

    @property
    def index(self) -> int: ...
    @property
    def worker(self) -> int: ...
    def set_backend(self, backend: str) -> None:
        """The backend, "io_uring" or "epoll", that serves this worker's connections now."""
    def fallback_engaged(self) -> None:
        """Counts a sick ring handing this worker over to epoll."""
    def set_connections(self, open: int) -> None:
        """The open-connections gauge, for the epoll loop (the io_uring loop sets its own)."""

@final
class TlsConfig:
    """TLS settings from PEM files: a certificate chain, its key, and optionally the CAs that
    client certificates must chain to (client certificates are then required)."""

    def __new__(
        cls,
        certfile: str | os.PathLike[str],
        keyfile: str | os.PathLike[str],
        ca_certs: str | os.PathLike[str] | None = None,
    ) -> Self: ...
    @property
    def client_auth(self) -> bool: ...

class _BodyTransport(Protocol):
    """What the epoll loop lends the app while it reads a request body."""

    def pull(self) -> bytes: ...
    def send_now(self, data: bytes) -> None: ...

@final
class HttpProtocol:
    """One connection: bytes from the peer in, response bytes out (the app runs inside)."""

    def __new__(
        cls, app: WsgiApp, peer_host: str, peer_port: int, transport: _BodyTransport
    ) -> Self: ...
    @staticmethod
    def adopt(app: WsgiApp, handed: HandedOver, transport: _BodyTransport) -> HttpProtocol:
        """Carries on a connection the io_uring loop handed over, with its session."""
    def feed(self, data: bytes) -> bytes: ...
    def feed_eof(self) -> bytes: ...
    def advance(self) -> bytes: ...
    def resume(self) -> bytes: ...
    def timer(self, unsent: bool) -> Literal["keep", "stop", "header", "keep_alive", "body"]: ...
    def flushed(self) -> Literal["keep", "keep_alive"]: ...
    @property
    def held_back(self) -> bool: ...
    @property
    def closing(self) -> bool: ...
    @property
    def idle(self) -> bool: ...
    def refuse_keep_alive(self) -> None: ...
    def farewell(self) -> bytes:
        """close_notify under TLS (after the handshake), else b"": sent before the server
        closes the connection on its own."""

@final
class UringServer:
    """The native io_uring serve loop for one app on one listening socket."""

    def __new__(
        cls,
        app: WsgiApp,
        listener: _FdLike,
        wake: _FdLike,
        *,
        queue_depth: int = 1024,
        n_bufs: int = 512,
        buf_size: int = 8192,
        header_timeout: float = 10.0,
        keep_alive_timeout: float = 5.0,
        body_timeout: float = 30.0,
        max_connections: int = 1000,
        shared_listener: bool = False,
        threads: int = 1,
        heartbeat: Pulse | None = None,
    ) -> Self: ...
    def serve(
        self,
        stopping: Callable[[], bool],
        *,
        draining: Callable[[], bool] | None = None,
        max_requests: int = 0,
        graceful_timeout: float = 30.0,
    ) -> Handover | None: ...
    def force_unhealthy(self, reason: str | None = None, *, ring_usable: bool = True) -> None:
        """Test hook: make the ring unhealthy, as an unexpected enter error would."""
    @property
    def setup_flags(self) -> list[str]: ...
    def stats(self) -> dict[str, int]: ...

@final
class HandedOver:
    """One open connection a sick ring's loop handed over (see HttpProtocol.adopt)."""

    @property
    def fd(self) -> int: ...
    @property
    def unsent(self) -> bytes: ...
    @property
    def timer(self) -> Literal["header", "keep_alive", "body"] | None: ...
    @property
    def due_in(self) -> float | None: ...
    @property
    def overdue(self) -> bool: ...

@final
class Handover:
    """Why a ring was given up, and the connections its loop handed to epoll."""

    @property
    def reason(self) -> str: ...
    @property
    def connections(self) -> list[HandedOver]: ...
    @property
    def woken(self) -> bool: ...
    @property
    def dropped(self) -> int: ...
    @property
    def confirmed(self) -> bool: ...
    @property
    def drain_left(self) -> float | None: ...

@final
class FileWrapper:
    """``wsgi.file_wrapper``: iterates ``filelike.read(blksize)`` until it returns ``b""``."""

    def __new__(cls, filelike: _Readable, blksize: int = 8192) -> Self: ...
    @property
    def filelike(self) -> _Readable: ...
    @property
    def blksize(self) -> int: ...
    def __iter__(self) -> Self: ...
    def __next__(self) -> bytes: ...
    def close(self) -> None: ...
