"""One worker process: forked by the master, it opens its own rings and serves until told to
stop, or until it has served its max_requests."""

from __future__ import annotations

import ctypes
import ctypes.util
import dataclasses
import logging
import os
import random
import signal
import struct
import threading
import traceback
from typing import TYPE_CHECKING, NoReturn

from .loader import load_app
from .policy import Unsupported

if TYPE_CHECKING:
    from ._uringserve import MetricsSlot, Pulse
    from .server import Server

error_log = logging.getLogger("uringserve.error")

#: The exit status of a worker that could not start (app import, io_uring "on" refused...):
#: the master stops rather than restart it in a loop.
WORKER_BOOT_ERROR = 3
#: How long SIGQUIT lets an app call that is running finish before the worker exits anyway.
QUIT_WAIT = 1.0

# What a worker tells the master through the notification pipe: its pid and one letter.
NOTE = struct.Struct("=iB")
BOOTED = ord("B")
RETIRING = ord("R")

_PR_SET_PDEATHSIG = 1
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT)


def _die_with_master(master_pid: int) -> None:
    """SIGTERM (a graceful stop) when the master dies, so no worker outlives it."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):
        return  # not glibc/Linux: the master's own stop still reaches the worker
    if os.getppid() != master_pid:  # the master died before prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)


def _quit_now(server: Server) -> None:
    server.shutdown(wait=False)
    # An app call that is running is not interrupted by the stop; the exit is.
    timer = threading.Timer(QUIT_WAIT, os._exit, (0,))
    timer.daemon = True
    timer.start()


#: Set to 1 in the environment to enable the test hooks below; never in production.
TEST_HOOKS_ENV = "URINGSERVE_TEST_HOOKS"


def install_test_hooks(server: Server) -> None:
    """Test hook, only with URINGSERVE_TEST_HOOKS=1: SIGUSR2 makes the serving io_uring ring
    unhealthy (Server.force_unhealthy), so the live move to epoll can be tested in a worker."""
    if os.environ.get(TEST_HOOKS_ENV) != "1":
        return

    def sick(signum: int, frame: object) -> None:
        server.force_unhealthy(f"SIGUSR2 test hook ({TEST_HOOKS_ENV}=1)")

    signal.signal(signal.SIGUSR2, sick)


def install_stop_signals(server: Server) -> None:
    """SIGTERM/SIGINT stop gracefully, SIGQUIT at once; for one serving process. With
    URINGSERVE_TEST_HOOKS=1, SIGUSR2 is the test hook of install_test_hooks()."""

    def graceful(signum: int, frame: object) -> None:
        server.shutdown(wait=False, graceful=True)

    def quit_(signum: int, frame: object) -> None:
        _quit_now(server)

    for sig in STOP_SIGNALS:
        signal.signal(sig, quit_ if sig == signal.SIGQUIT else graceful)
    install_test_hooks(server)


def run_worker(
    master: Server,
    number: int,
    master_pid: int,
    notes: int,
    mask: set[int | signal.Signals],
    metrics: MetricsSlot | None = None,
    heartbeat: Pulse | None = None,
) -> NoReturn:
    """The body of a forked worker, which starts with the master's signals blocked (`mask`
    is the mask to restore), counts in its `metrics` slot and beats its `heartbeat` (for
    --timeout) from its serve loop; never returns."""
    status = 0
    try:
        status = _serve(master, number, master_pid, notes, mask, metrics, heartbeat)
    except BaseException:
        error_log.error(
            "worker %d (pid %d) failed:\n%s", number, os.getpid(), traceback.format_exc()
        )
        status = 1
    finally:
        logging.shutdown()
        os._exit(status)


def _serve(
    master: Server,
    number: int,
    master_pid: int,
    notes: int,
    mask: set[int | signal.Signals],
    metrics: MetricsSlot | None,
    heartbeat: Pulse | None,
) -> int:
    from .server import Server, WorkerRole

    # The master's handlers must not run here; what is for the master only is ignored. A
    # stop that comes while the worker boots is kept and applied once it can serve.
    signal.set_wakeup_fd(-1)
    early: list[int] = []
    for sig in STOP_SIGNALS:
        signal.signal(sig, lambda signum, frame: early.append(signum))
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    for sig in (signal.SIGHUP, signal.SIGTTIN, signal.SIGTTOU):
        signal.signal(sig, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_SETMASK, mask)
    _die_with_master(master_pid)
    master._wake_r.close()
    master._wake_w.close()
    if master._metrics is not None:
        master._metrics.close_in_child()

    c = master.config
    limit = c.max_requests + random.randint(0, c.max_requests_jitter) if c.max_requests else 0
    options = dataclasses.asdict(c)
    # The master's logging config is inherited; its metrics listener stays the master's.
    options.update(workers=0, max_requests=limit, log_config=None, metrics_bind=None)
    host, port = master.server_address[:2]
    options.update(host=str(host), port=int(port))
    # With reuse_port each worker binds its own socket; otherwise it shares the master's.
    sock = None if c.reuse_port else master.socket
    try:
        # A "module:attribute" app is imported here, after the fork: SIGHUP's new workers
        # import it afresh, as the master never does.
        app = load_app(master.app) if isinstance(master.app, str) else master.app
        server = Server(app, sock=sock, **options)
    except Unsupported as exc:
        error_log.error("worker %d: io_uring=on, but %s", number, exc)
        return WORKER_BOOT_ERROR
    except Exception:
        error_log.error(
            "worker %d (pid %d) failed to boot:\n%s", number, os.getpid(), traceback.format_exc()
        )
        return WORKER_BOOT_ERROR
    if c.reuse_port:
        master.socket.close()
    server._metrics_slot = metrics
    server._heartbeat = heartbeat
    server._worker = WorkerRole(c, lambda: _note(notes, RETIRING))
    install_stop_signals(server)
    for signum in early:
        signal.raise_signal(signum)
    error_log.info("worker %d (pid %d) booted on %s", number, os.getpid(), server.backend)
    _note(notes, BOOTED)
    with server:
        server.serve_forever()
    return 0


def _note(fd: int, what: int) -> None:
    try:
        os.write(fd, NOTE.pack(os.getpid(), what))
    except OSError:
        pass  # the master is gone: the death signal stops this worker
