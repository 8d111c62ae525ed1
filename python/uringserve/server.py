"""Server: binds, picks the backend from the io_uring policy, and serves a WSGI app."""

from __future__ import annotations

import logging
import signal
import socket
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .config import Config
from .loader import check_spec, load_app
from .policy import capabilities, resolve_policy

if TYPE_CHECKING:
    from ._uringserve import MetricsSlot, Pulse, TlsConfig
    from .metrics import MetricsServer

WsgiCallable = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]

error_log = logging.getLogger("uringserve.error")


@dataclass(frozen=True)
class WorkerRole:
    """What the Server of a forked worker knows of its master (set by worker.py)."""

    # The master's config: its number of workers and whether each binds its own socket.
    master: Config
    # Called once when max_requests is reached and draining begins.
    on_retire: Callable[[], None]


def _bind(config: Config, listen: bool = True) -> socket.socket:
    """The listening socket; with `listen` false, only bound (it reserves the port for the
    workers' own SO_REUSEPORT sockets)."""
    family = socket.AF_INET6 if ":" in config.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if config.reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((config.host, config.port))
        if listen:
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
    """An HTTP/1.1 server for one WSGI app, on io_uring where the policy allows, else epoll.

    `app` is a WSGI callable or "module:attribute". With `workers=N` (N >= 1) serve_forever()
    runs a master that pre-forks N workers (see Config for the process-model options);
    with the default workers=0 it serves in this process.
    """

    def __init__(
        self,
        app: WsgiCallable | str,
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
        # A callable, or "module:attribute", imported where it is served: in each worker, so
        # that SIGHUP's new workers import it afresh.
        self.app = app
        # Loaded before binding too: a bad certificate or key fails here, naming the file.
        self._tls = _load_tls(self.config)
        if isinstance(app, str):
            check_spec(app)
        workers = self.config.workers
        if sock is not None and self.config.reuse_port and workers:
            raise ValueError("reuse_port opens a socket per worker; it cannot use a given sock")
        if workers:
            # The master never opens a ring: the probe runs in a short-lived child.
            from .arbiter import probe_without_rings

            probe_without_rings()
        # Decided before binding, so `on` on a host without io_uring fails before any side effect.
        self._use_uring = resolve_policy(self.config.io_uring)
        self._owns_socket = sock is None
        if sock is None:
            sock = _bind(self.config, listen=not (workers and self.config.reuse_port))
        self.socket = sock
        try:
            self._start_observing()
        except BaseException:
            if self._owns_socket:
                sock.close()
            raise
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_w.setblocking(False)
        # shutdown(graceful=True): stop accepting, finish what is in flight, then stop.
        self._drain = threading.Event()
        self._stop = threading.Event()
        self._stopped = threading.Event()
        self._stopped.set()
        self._serving_thread: int | None = None
        # The io_uring loop's counters (enters, completions, sends...) once serving stopped.
        self.ring_stats: dict[str, int] | None = None
        # Requests taken by the last serve_forever() in this process (either backend).
        self.requests = 0
        # Set in a worker's own Server (worker.py); None in a master or a lone server.
        self._worker: WorkerRole | None = None
        self._retiring = False
        # The native loop while it serves, for force_unhealthy() from other threads.
        self._native: Any = None
        # Times a sick ring handed this server's connections to epoll (live fallback).
        self.fallback_engaged = 0
        self._fell_back = False
        # A worker's heartbeat (--timeout), set by worker.py: both loops beat it.
        self._heartbeat: Pulse | None = None

    def _start_observing(self) -> None:
        """Logs and metrics (see logs.py, metrics.py); a worker gets its metrics slot from
        the master instead (and inherits the master's logging)."""
        self._metrics: MetricsServer | None = None
        self._metrics_slot: MetricsSlot | None = None
        c = self.config
        if c.log_config is not None:
            from .logs import apply_file

            apply_file(c.log_config)
        if c.metrics_bind is not None:
            from .metrics import MetricsServer

            self._metrics = MetricsServer(c.metrics_bind, c.workers)

    @property
    def metrics_address(self) -> tuple[str, int] | None:
        """Where the Prometheus listener is bound, with metrics_bind."""
        return None if self._metrics is None else self._metrics.address

    @property
    def metrics_slot(self) -> MetricsSlot | None:
        """This process's metrics counters, while it serves (a worker, or the one process);
        the epoll fallback calls fallback_engaged() and set_backend("epoll") on it."""
        return self._metrics_slot

    @property
    def backend(self) -> str:
        """The loop serving now: "epoll" also once a sick ring handed over to it."""
        return "io_uring" if self._use_uring and not self._fell_back else "epoll"

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
        app = load_app(self.app) if isinstance(self.app, str) else self.app
        return WsgiApp(
            app,
            str(host),
            int(port),
            access_log=c.access_log,
            multiprocess=self._worker is not None and self._worker.master.workers > 1,
            multithread=c.threads > 1,
            max_body_size=c.max_body_size,
            max_request_line=c.max_request_line,
            max_header_bytes=c.max_header_bytes,
            max_headers=c.max_headers,
            tls=self._tls,
            max_requests=c.max_requests,
            access_log_format=c.access_log_format,
            metrics=self._metrics_slot,
        )

    def _loop_options(self) -> dict[str, Any]:
        """The app threads, the timeouts and the connection cap, as both loops take them."""
        c = self.config
        return {
            "threads": c.threads,
            "header_timeout": c.header_timeout,
            "keep_alive_timeout": c.keep_alive_timeout,
            "body_timeout": c.body_timeout,
            "max_connections": c.max_connections,
            "heartbeat": self._heartbeat,
        }

    def _draining(self, app: Any) -> bool:
        """Asked by the serve loop after a wake-up, and once max_requests is reached."""
        if self._drain.is_set():
            return True
        limit = self.config.max_requests
        if limit and app.requests >= limit:
            if not self._retiring:
                self._retiring = True
                error_log.info(
                    "served %d requests (max_requests): stopping gracefully", app.requests
                )
                if self._worker is not None:
                    self._worker.on_retire()
            return True
        return False

    def serve_forever(self) -> None:
        """Serve on this thread until shutdown(); rings are created here, on this thread.

        With workers, this process becomes their master: it forks them, restarts them and
        handles SIGTERM/SIGINT, SIGQUIT, SIGHUP, SIGTTIN and SIGTTOU (on the main thread).
        """
        if self._metrics is not None:
            if not self.config.workers and self._metrics_slot is None:
                # Claimed before the listener answers, so no scrape sees a serving process
                # without its slot (uringserve_workers 0).
                self._metrics_slot = self._metrics.slot(0)
            self._metrics.start()
        # _stop is not cleared here: a shutdown() that came first (say, from a signal during
        # start-up) must still stop this run. It is cleared when the run ends.
        self._stopped.clear()
        self._serving_thread = threading.get_ident()
        try:
            if self.config.workers:
                from .arbiter import Arbiter

                Arbiter(self).run()
                return
            self._serve_here()
        finally:
            self._stop.clear()
            self._drain.clear()
            self._stopped.set()
            if self._metrics is not None:
                self._metrics.stop()

    def _serve_here(self) -> None:
        # On the main thread, every signal also writes a byte to the wake socket, so a loop
        # waiting in the kernel wakes and runs the handler (it may call shutdown()) at once.
        on_main = threading.current_thread() is threading.main_thread()
        old_wakeup = (
            signal.set_wakeup_fd(self._wake_w.fileno(), warn_on_full_buffer=False)
            if on_main
            else None
        )
        # A new run opens a new ring, whatever happened to the last one.
        self._fell_back = False
        slot = self._metrics_slot
        if slot is not None:
            slot.set_backend(self.backend)
        try:
            app = self._wsgi_app()
            if self._worker is None:  # a worker logs "booted"; its master logged this line
                error_log.info(self.startup_line())
            c = self.config
            drain: dict[str, Any] = {
                "draining": lambda: self._draining(app),
                "max_requests": c.max_requests,
                "graceful_timeout": c.graceful_timeout,
            }
            if self._use_uring:
                from ._uringserve import UringServer

                native = UringServer(
                    app,
                    self.socket,
                    self._wake_r,
                    queue_depth=c.queue_depth,
                    n_bufs=c.n_bufs,
                    buf_size=c.buf_size,
                    **self._loop_options(),
                    # A worker on the master's socket, with its siblings: the ring then arms
                    # one accept at a time, so connections spread.
                    shared_listener=self._worker is not None and not self._worker.master.reuse_port,
                )
                self._native = native
                try:
                    handover = native.serve(self._stop.is_set, **drain)
                finally:
                    self._native = None
                    self.ring_stats = native.stats()
                if handover is not None:
                    self._fall_back(app, handover, drain)
            else:
                self._serve_epoll(app, drain)
            self.requests = app.requests
        finally:
            if old_wakeup is not None:
                signal.set_wakeup_fd(old_wakeup)

    def _serve_epoll(self, app: Any, drain: dict[str, Any], adopt: Any = None) -> None:
        from .fallback import serve_epoll

        serve_epoll(
            self.socket,
            app,
            self._wake_r,
            self._stop.is_set,
            **self._loop_options(),
            **drain,
            metrics=self._metrics_slot,
            adopt=adopt,
        )

    def _fall_back(self, app: Any, handover: Any, drain: dict[str, Any]) -> None:
        """Carries on with epoll after the ring turned unhealthy: same listener, same
        connections with their state."""
        self.fallback_engaged += 1
        self._fell_back = True
        slot = self._metrics_slot
        if slot is not None:
            slot.fallback_engaged()
            slot.set_backend("epoll")
        lost = ""
        if handover.dropped:
            lost = f"; {handover.dropped} with a send the kernel never confirmed were closed"
        error_log.warning(
            "io_uring ring unhealthy (%s): serving on epoll from now on, with the listener "
            "and %d open connections%s (fallback_engaged=%d)",
            handover.reason,
            len(handover.connections),
            lost,
            self.fallback_engaged,
        )
        self._serve_epoll(app, drain, handover)

    def force_unhealthy(self, reason: str | None = None, *, ring_usable: bool = True) -> bool:
        """Test hook: make the serving io_uring ring unhealthy, as an unexpected enter error
        would, and wake its loop; it moves to epoll with its open connections. Callable from
        any thread. With `ring_usable` false the ring is treated as one that can no longer
        be entered. False when no ring serves (epoll backend, or not serving)."""
        native = self._native
        if native is None:
            return False
        native.force_unhealthy(reason, ring_usable=ring_usable)
        self._wake()
        return True

    def shutdown(self, wait: bool = True, *, graceful: bool = False) -> None:
        """Stop serve_forever(); callable from another thread or a signal handler.

        By default every connection closes at once. With `graceful`, the server stops
        accepting, closes idle keep-alive connections at once, finishes the requests in
        flight (their responses say `Connection: close`) and closes what is left after
        `graceful_timeout` seconds. A plain shutdown() during a graceful one cuts it short.
        """
        serving_alone = not self._stopped.is_set() and not self.config.workers
        if graceful and serving_alone and self._worker is None and not self._drain.is_set():
            # Logged here: an app call running inline may hold the loop for a long time.
            # A master logs its workers' stop itself, and workers leave it to their master.
            error_log.info(
                "stopping gracefully: finishing the requests in flight (up to %g s)",
                self.config.graceful_timeout,
            )
        (self._drain if graceful else self._stop).set()
        self._wake()
        if wait and threading.get_ident() != self._serving_thread:
            self._stopped.wait()

    def _wake(self) -> None:
        """Wakes the serving loop (or the master's) waiting in the kernel."""
        try:
            self._wake_w.send(b"x")
        except OSError:
            pass  # full: a wake-up is already pending; closed: the server is closed

    def close(self) -> None:
        if self._metrics is not None:
            self._metrics.close()
        if self._owns_socket:
            self.socket.close()
        self._wake_r.close()
        self._wake_w.close()

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
