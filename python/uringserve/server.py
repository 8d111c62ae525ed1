"""Server: binds, picks the backend from the io_uring policy, and serves a WSGI app."""

from __future__ import annotations

import logging
import signal
import socket
import threading
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from .config import Config
from .policy import capabilities, resolve_policy

if TYPE_CHECKING:
    from ._uringserve import TlsConfig

WsgiCallable = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]

error_log = logging.getLogger("uringserve.error")


def _bind(config: Config) -> socket.socket:
    family = socket.AF_INET6 if ":" in config.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((config.host, config.port))
        sock.listen(config.backlog)
    except BaseException:
        sock.close()
        raise
    return sock


def _load_tls(config: Config) -> TlsConfig | None:
    """The TLS settings, loaded from their files; TlsConfigError names a file that fails."""
    if config.certfile is None or config.keyfile is None:
        return None
    from ._uringserve import TlsConfig

    return TlsConfig(config.certfile, config.keyfile, config.ca_certs)


def _why_io_uring() -> str:
    caps = capabilities()
    kernel = ".".join(str(p) for p in caps.kernel[:2])
    return f"kernel {kernel}: multishot accept, multishot recv, provided buffers"


class Server:
    """An HTTP/1.1 server for one WSGI app, on io_uring where the policy allows, else epoll."""

    def __init__(
        self,
        app: WsgiCallable,
        host: str = "127.0.0.1",
        port: int = 8000,
        *,
        io_uring: str | bool | None = None,
        sock: socket.socket | None = None,
        backlog: int = 1024,
        **options: Any,
    ) -> None:
        # Every option lands in one Config; the CLI passes its Config's fields the same way.
        self.config = Config(host=host, port=port, backlog=backlog).with_options(
            io_uring=io_uring, **options
        )
        self.app = app
        # Loaded before binding too: a bad certificate or key fails here, naming the file.
        self._tls = _load_tls(self.config)
        # Decided before binding, so `on` on a host without io_uring fails before any side effect.
        self._use_uring = resolve_policy(self.config.io_uring)
        self._owns_socket = sock is None
        self.socket = sock if sock is not None else _bind(self.config)
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_w.setblocking(False)
        self._stop = threading.Event()
        self._stopped = threading.Event()
        self._stopped.set()
        self._serving_thread: int | None = None
        # The io_uring loop's counters (enters, completions, sends...) once serving stopped.
        self.ring_stats: dict[str, int] | None = None

    @property
    def backend(self) -> str:
        return "io_uring" if self._use_uring else "epoll"

    @property
    def server_address(self) -> tuple[Any, ...]:
        return tuple(self.socket.getsockname())

    def startup_line(self) -> str:
        from . import __version__

        host, port = self.server_address[:2]
        shown = f"[{host}]" if ":" in str(host) else host
        if self._use_uring:
            why = _why_io_uring()
        elif self.config.io_uring in ("off", False):
            why = "io_uring off by policy"
        else:
            reason = capabilities().hotpath_reason or capabilities().reason
            why = f"io_uring unavailable: {reason}"
        scheme = "https" if self._tls is not None else "http"
        where = f"{scheme}://{shown}:{port}"
        return f"uringserve {__version__} serving {where} on {self.backend} ({why})"

    def _wsgi_app(self) -> Any:
        from ._uringserve import WsgiApp

        host, port = self.server_address[:2]
        c = self.config
        return WsgiApp(
            self.app,
            str(host),
            int(port),
            access_log=c.access_log,
            max_body_size=c.max_body_size,
            max_request_line=c.max_request_line,
            max_header_bytes=c.max_header_bytes,
            max_headers=c.max_headers,
            tls=self._tls,
        )

    def _conn_limits(self) -> dict[str, Any]:
        """The timeouts and the connection cap, as both loops take them."""
        c = self.config
        return {
            "header_timeout": c.header_timeout,
            "keep_alive_timeout": c.keep_alive_timeout,
            "body_timeout": c.body_timeout,
            "max_connections": c.max_connections,
        }

    def serve_forever(self) -> None:
        """Serve on this thread until shutdown(); rings are created here, on this thread."""
        # _stop is not cleared here: a shutdown() that came first (say, from a signal during
        # start-up) must still stop this run. It is cleared when the run ends.
        self._stopped.clear()
        self._serving_thread = threading.get_ident()
        # On the main thread, every signal also writes a byte to the wake socket, so a loop
        # waiting in the kernel wakes and runs the handler (it may call shutdown()) at once.
        on_main = threading.current_thread() is threading.main_thread()
        old_wakeup = (
            signal.set_wakeup_fd(self._wake_w.fileno(), warn_on_full_buffer=False)
            if on_main
            else None
        )
        try:
            app = self._wsgi_app()
            error_log.info(self.startup_line())
            if self._use_uring:
                from ._uringserve import UringServer

                c = self.config
                native = UringServer(
                    app,
                    self.socket,
                    self._wake_r,
                    queue_depth=c.queue_depth,
                    n_bufs=c.n_bufs,
                    buf_size=c.buf_size,
                    **self._conn_limits(),
                )
                try:
                    native.serve(self._stop.is_set)
                finally:
                    self.ring_stats = native.stats()
            else:
                from .fallback import serve_epoll

                serve_epoll(
                    self.socket, app, self._wake_r, self._stop.is_set, **self._conn_limits()
                )
        finally:
            if old_wakeup is not None:
                signal.set_wakeup_fd(old_wakeup)
            self._stop.clear()
            self._stopped.set()

    def shutdown(self, wait: bool = True) -> None:
        """Stop serve_forever(); callable from another thread or a signal handler."""
        self._stop.set()
        try:
            self._wake_w.send(b"x")
        except (BlockingIOError, OSError):
            pass  # a wake-up is already pending, or the server is closed
        if wait and threading.get_ident() != self._serving_thread:
            self._stopped.wait()

    def close(self) -> None:
        if self._owns_socket:
            self.socket.close()
        self._wake_r.close()
        self._wake_w.close()

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
