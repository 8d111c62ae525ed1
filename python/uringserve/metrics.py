"""The Prometheus listener (`--metrics-bind`): a thread of the master (or of the one serving
process) answering scrapes with the shared counters of every worker, summed."""

from __future__ import annotations

import logging
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any

from .config import parse_bind

if TYPE_CHECKING:
    from ._uringserve import MetricsBlock, MetricsSlot

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
#: How often the listener thread checks whether it should stop.
POLL_INTERVAL = 0.1
SCRAPE_TIMEOUT = 10.0

error_log = logging.getLogger("uringserve.error")


class MetricsBindError(OSError):
    """The metrics listener's address could not be bound."""


def capacity_for(workers: int) -> int:
    """Slots for every worker that may be alive at once: SIGHUP starts the new ones before
    the old ones leave, and SIGTTIN adds more."""
    return max(64, 4 * workers + 8)


class _Listener(ThreadingHTTPServer):
    daemon_threads = True
    block: MetricsBlock


class _Listener6(_Listener):
    address_family = socket.AF_INET6


class _Scrape(BaseHTTPRequestHandler):
    server: _Listener
    server_version = "uringserve-metrics"
    # A scraper that connects and sends nothing gives up its thread after this long.
    timeout = SCRAPE_TIMEOUT

    def do_GET(self) -> None:
        if self.path.partition("?")[0] not in ("/metrics", "/"):
            self.send_error(404, "metrics are at /metrics")
            return
        body = self.server.block.render().encode()
        self.send_response(200)
        self.send_header("Content-Type", CONTENT_TYPE)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        error_log.debug("metrics: %s - %s", self.address_string(), format % args)


class MetricsServer:
    """The shared counters and the listener that serves them; bound at once, so a busy
    address fails before any worker starts."""

    def __init__(self, bind: str, workers: int) -> None:
        from ._uringserve import MetricsBlock

        self.block = MetricsBlock(capacity_for(workers))
        where = parse_bind(bind)
        kind = _Listener6 if ":" in where["host"] else _Listener
        listener = kind((where["host"], where["port"]), _Scrape, bind_and_activate=False)
        try:
            listener.server_bind()
            listener.server_activate()
        except OSError as exc:
            listener.server_close()
            raise MetricsBindError(
                exc.errno, f"cannot bind the metrics listener {bind}: {exc.strerror or exc}"
            ) from exc
        listener.block = self.block
        self._listener = listener
        self._thread: threading.Thread | None = None

    @property
    def address(self) -> tuple[str, int]:
        host, port = self._listener.server_address[:2]
        return str(host), int(port)

    def slot(self, worker: int) -> MetricsSlot | None:
        """A fresh slot for worker number `worker` (0: the serving process itself)."""
        index = self.block.claim(worker)
        if index is None:
            error_log.warning(
                "metrics: all %d slots are taken; worker %d is not counted",
                self.block.capacity,
                worker,
            )
            return None
        return self.block.slot(index)

    def start(self) -> None:
        if self._thread is not None:
            return
        self._thread = threading.Thread(
            target=self._listener.serve_forever,
            kwargs={"poll_interval": POLL_INTERVAL},
            name="uringserve-metrics",
            daemon=True,
        )
        self._thread.start()
        host, port = self.address
        shown = f"[{host}]" if ":" in host else host
        error_log.info("metrics on http://%s:%d/metrics", shown, port)

    def stop(self) -> None:
        if self._thread is not None:
            self._listener.shutdown()
            self._thread.join()
            self._thread = None

    def close(self) -> None:
        self.stop()
        self._listener.server_close()

    def close_in_child(self) -> None:
        """In a forked worker: the listener's thread did not follow the fork; its socket did."""
        self._listener.socket.close()
