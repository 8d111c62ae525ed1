"""The master of a pre-forked server: it forks the workers, restarts the ones that die, and
turns signals into gunicorn's lifecycle. It never opens an io_uring ring."""

from __future__ import annotations

import logging
import os
import pickle
import select
import signal
import sys
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from . import policy
from .metrics import capacity_for
from .worker import BOOTED, NOTE, RETIRING, WORKER_BOOT_ERROR, run_worker

if TYPE_CHECKING:
    from ._uringserve import Heartbeats, Pulse
    from .server import Server

error_log = logging.getLogger("uringserve.error")

#: After SIGQUIT, how long workers get before SIGKILL.
QUIT_WAIT = 2.0
#: After a graceful stop's timeout, how long workers get to close what is left before SIGKILL.
KILL_MARGIN = 2.0
#: Off the main thread no SIGCHLD wakes the master, so it looks for dead workers this often.
POLL_WITHOUT_SIGNALS = 0.2
#: Longest time between two heartbeats of a worker's loop (--timeout).
BEAT_EVERY = 1.0


def beat_interval(timeout: float) -> float:
    """How often a worker's loop beats and the master looks: at least four times per
    timeout, so a loop that is alive is never a whole timeout silent."""
    return min(BEAT_EVERY, timeout / 4)


_SIGNALS = (
    signal.SIGTERM,
    signal.SIGINT,
    signal.SIGQUIT,
    signal.SIGHUP,
    signal.SIGTTIN,
    signal.SIGTTOU,
    signal.SIGCHLD,
)


class WorkerBootError(RuntimeError):
    """A worker could not start (its app failed to import, or io_uring "on" was refused)."""


def describe_exit(status: int) -> str:
    """ "exit code 3" or "killed by signal SIGKILL", from a waitpid() status."""
    code = os.waitstatus_to_exitcode(status)
    if code >= 0:
        return f"exit code {code}"
    try:
        name = signal.Signals(-code).name
    except ValueError:
        name = f"signal {-code}"
    return f"killed by signal {name}"


def _probe_in_child() -> policy.Capabilities:
    """The io_uring probe, run in a short-lived child that inherits this process's seccomp
    filters, rlimits and credentials; rings are created and closed there, never here."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        status = 1
        try:
            os.close(r)
            data = pickle.dumps(policy.capabilities())
            view = memoryview(data)
            while view:
                view = view[os.write(w, view) :]
            status = 0
        finally:
            os._exit(status)
    os.close(w)
    with os.fdopen(r, "rb") as pipe:
        data = pipe.read()
    _, status = os.waitpid(pid, 0)
    if status == 0 and data:
        caps = pickle.loads(data)
        if isinstance(caps, policy.Capabilities):
            return caps
    return policy.Capabilities.from_probe(
        None,
        linux=sys.platform.startswith("linux"),
        kernel=policy.parse_kernel_release(os.uname().release),
        probe_error=f"the probe's child process failed ({describe_exit(status)})",
    )


def probe_without_rings() -> None:
    """Makes this process's capabilities() the answer of a probe run in a child, unless it
    already has one; forked workers still probe for themselves."""
    policy.cached_capabilities(_probe_in_child)


@dataclass
class _Worker:
    pid: int
    number: int
    # "serving"; "retiring" (it reached max_requests and stops by itself; a replacement is
    # already started); "stopping" (the master asked it to stop).
    state: str = "serving"
    booted: bool = False
    # Its metrics slot (with --metrics-bind), folded into the total when it exits.
    slot: int | None = None
    # Its heartbeat slot (with --timeout), the beats counted when last looked at, and when
    # they last moved (from its fork: its boot counts against the timeout, as in gunicorn).
    pulse: int | None = None
    beats: int = 0
    heard: float = 0.0
    # When the master asked it to stop or it began retiring: its graceful timeout governs.
    stopping_since: float | None = None
    timed_out: bool = False


class Arbiter:
    """Runs the master loop of `server` (whose config has workers >= 1) until it stops."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.config = server.config
        self.target = server.config.workers
        self.workers: dict[int, _Worker] = {}
        self.spawned = 0
        self.actions: list[int] = []  # SIGHUP, SIGTTIN, SIGTTOU in arrival order
        self.stopping: str | None = None  # "graceful" or "quick"
        self.kill_at = 0.0
        self.failure: str | None = None
        self._notes_r = -1
        self._notes_w = -1
        self._partial = b""
        # The workers' heartbeats, mapped before any fork; None with timeout 0.
        self.heartbeats: Heartbeats | None = None
        self._free_pulses: list[int] = []
        if self.config.timeout > 0:
            from ._uringserve import Heartbeats

            self.heartbeats = Heartbeats(capacity_for(self.target))
            self._free_pulses = list(range(self.heartbeats.capacity - 1, -1, -1))

    # ---- the loop ---------------------------------------------------------------------------

    def run(self) -> None:
        """Serves until a stop; raises WorkerBootError if a worker could not start."""
        self._notes_r, self._notes_w = os.pipe()
        os.set_blocking(self._notes_r, False)
        on_main = threading.current_thread() is threading.main_thread()
        saved = self._install_signals() if on_main else {}
        try:
            error_log.info(
                "%s with %d worker%s (master pid %d%s)",
                self.server.startup_line(),
                self.target,
                "" if self.target == 1 else "s",
                os.getpid(),
                ", SO_REUSEPORT" if self.config.reuse_port else "",
            )
            self._loop(on_main)
        finally:
            # Whatever went wrong here, no worker is left behind.
            for w in self.workers.values():
                self._kill(w, signal.SIGKILL)
            for pid in list(self.workers):
                try:
                    os.waitpid(pid, 0)
                except ChildProcessError:
                    pass
            for sig, old in saved.items():
                signal.signal(sig, old)
            if on_main:
                signal.set_wakeup_fd(-1)
            os.close(self._notes_r)
            os.close(self._notes_w)
        if self.failure is not None:
            raise WorkerBootError(self.failure)

    def _loop(self, on_main: bool) -> None:
        wake = self.server._wake_r
        wake.setblocking(False)
        while True:
            self._reap()  # reads the workers' notes too
            self._check_stop()
            if self.stopping is None:
                self._check_heartbeats()
                self._run_actions()
                self._spawn_missing()
            else:
                if not self.workers:
                    error_log.info("master (pid %d) stopped", os.getpid())
                    return
                if time.monotonic() >= self.kill_at:
                    for w in self.workers.values():
                        error_log.warning(
                            "worker %d (pid %d) still running at the deadline: SIGKILL",
                            w.number,
                            w.pid,
                        )
                        self._kill(w, signal.SIGKILL)
                    self.kill_at = float("inf")
            timeout = None if on_main else POLL_WITHOUT_SIGNALS
            if self.heartbeats is not None and self.stopping is None:
                look = beat_interval(self.config.timeout)
                timeout = look if timeout is None else min(timeout, look)
            if self.stopping is not None and self.kill_at != float("inf"):
                left = max(0.0, self.kill_at - time.monotonic())
                timeout = left if timeout is None else min(timeout, left)
            try:
                select.select([wake.fileno(), self._notes_r], [], [], timeout)
            except InterruptedError:
                pass
            try:
                while wake.recv(4096):
                    pass
            except (BlockingIOError, InterruptedError):
                pass

    # ---- signals -----------------------------------------------------------------------------

    def _install_signals(self) -> dict[signal.Signals, Any]:
        server = self.server

        def on_signal(signum: int, frame: object) -> None:
            if signum in (signal.SIGTERM, signal.SIGINT):
                server.shutdown(wait=False, graceful=True)
            elif signum == signal.SIGQUIT:
                server.shutdown(wait=False)
            elif signum != signal.SIGCHLD:
                self.actions.append(signum)
            # SIGCHLD only wakes the loop (the wakeup fd), which reaps.

        saved = {sig: signal.signal(sig, on_signal) for sig in _SIGNALS}
        signal.set_wakeup_fd(server._wake_w.fileno(), warn_on_full_buffer=False)
        return saved

    def _check_stop(self) -> None:
        # SIGQUIT during a graceful stop cuts it short.
        if self.server._stop.is_set() and self.stopping != "quick":
            self._begin_stop("quick")
        elif self.server._drain.is_set() and self.stopping is None:
            self._begin_stop("graceful")

    def _begin_stop(self, how: str) -> None:
        self.stopping = how
        if how == "graceful":
            error_log.info(
                "stopping gracefully: %d worker(s) finish their requests (up to %g s)",
                len(self.workers),
                self.config.graceful_timeout,
            )
            self.kill_at = time.monotonic() + self.config.graceful_timeout + KILL_MARGIN
            sig = signal.SIGTERM
        else:
            error_log.info("stopping now (%d worker(s))", len(self.workers))
            self.kill_at = time.monotonic() + QUIT_WAIT
            sig = signal.SIGQUIT
        for w in self.workers.values():
            self._stopping(w)
            self._kill(w, sig)

    def _run_actions(self) -> None:
        actions, self.actions = self.actions, []
        for sig in actions:
            if sig == signal.SIGHUP:
                self._reload()
            elif sig == signal.SIGTTIN:
                self.target += 1
                error_log.info("SIGTTIN: %d workers", self.target)
            elif sig == signal.SIGTTOU:
                if self.target <= 1:
                    error_log.info("SIGTTOU ignored: keeping the last worker")
                    continue
                self.target -= 1
                error_log.info("SIGTTOU: %d workers", self.target)
                oldest = min(self._serving(), key=lambda w: w.number, default=None)
                if oldest is not None:
                    self._retire(oldest)

    def _reload(self) -> None:
        fresh = isinstance(self.server.app, str)
        error_log.info(
            "SIGHUP: replacing %d worker(s)%s",
            self.target,
            " with a fresh import of the app"
            if fresh
            else " (the app is an object, not module:attribute: it is not re-imported)",
        )
        old = self._serving()
        for _ in range(self.target):
            self._spawn()
        for w in old:
            self._retire(w)

    # ---- workers -----------------------------------------------------------------------------

    def _serving(self) -> list[_Worker]:
        return [w for w in self.workers.values() if w.state == "serving"]

    def _spawn_missing(self) -> None:
        for _ in range(self.target - len(self._serving())):
            self._spawn()

    def _spawn(self) -> None:
        self.spawned += 1
        number = self.spawned
        master_pid = os.getpid()
        # Blocked across the fork: until the worker has its own handlers, a signal must not
        # run the master's handlers in the worker (it stays pending until the worker is ready).
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS)
        metrics = self.server._metrics
        slot = None if metrics is None else metrics.slot(number)
        pulse = self._pulse(number)
        try:
            pid = os.fork()
            if pid == 0:
                os.close(self._notes_r)
                run_worker(self.server, number, master_pid, self._notes_w, mask, slot, pulse)
        except BaseException:
            if metrics is not None and slot is not None:
                metrics.block.retire(slot.index)
            if pulse is not None:
                self._free_pulses.append(pulse.index)
            raise
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        w = _Worker(pid, number, slot=None if slot is None else slot.index)
        if pulse is not None and self.heartbeats is not None:
            w.pulse = pulse.index
            w.beats = self.heartbeats.count(pulse.index)
            w.heard = time.monotonic()
        self.workers[pid] = w

    def _pulse(self, number: int) -> Pulse | None:
        """A heartbeat slot for worker `number`, or None (timeout 0, or all slots taken)."""
        if self.heartbeats is None:
            return None
        if not self._free_pulses:
            error_log.warning(
                "timeout: all %d heartbeat slots are taken; worker %d is not watched",
                self.heartbeats.capacity,
                number,
            )
            return None
        index = self._free_pulses.pop()
        return self.heartbeats.pulse(index, beat_interval(self.config.timeout))

    def _check_heartbeats(self) -> None:
        """Kills the workers whose serve loop has not beaten for longer than the timeout;
        reaping replaces them. One that is stopping has its graceful timeout first."""
        beats = self.heartbeats
        if beats is None:
            return
        timeout = self.config.timeout
        now = time.monotonic()
        for w in self.workers.values():
            if w.pulse is None or w.timed_out:
                continue
            count = beats.count(w.pulse)
            if count != w.beats:
                w.beats, w.heard = count, now
                continue
            if now - w.heard <= timeout:
                continue
            grace = self.config.graceful_timeout + KILL_MARGIN
            if w.stopping_since is not None and now - w.stopping_since <= grace:
                continue
            error_log.error(
                "worker %d (pid %d) timed out after %g s: killing it", w.number, w.pid, timeout
            )
            w.timed_out = True
            # SIGKILL at once, not SIGABRT first: a stuck loop may be stuck in C code (a
            # blocking call, a lock) where no Python handler would run, SIGABRT's default
            # action writes a core of the whole worker, and only SIGKILL cannot be caught or
            # ignored by the app, so its capacity comes back promptly.
            self._kill(w, signal.SIGKILL)

    def _stopping(self, w: _Worker, state: str = "stopping") -> None:
        w.state = state
        if w.stopping_since is None:
            w.stopping_since = time.monotonic()

    def _retire(self, w: _Worker) -> None:
        """Stops a worker gracefully; it is not replaced."""
        self._stopping(w)
        self._kill(w, signal.SIGTERM)

    def _kill(self, w: _Worker, sig: int) -> None:
        try:
            os.kill(w.pid, sig)
        except ProcessLookupError:
            pass  # already dead: reaped on the next pass

    def _reap(self) -> None:
        exited: list[tuple[_Worker, int]] = []
        for pid, w in list(self.workers.items()):
            try:
                done, status = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                done, status = pid, 0
            if done != 0:
                exited.append((w, status))
        # A worker's notes were written before it exited: read them before judging its exit.
        self._read_notes()
        for w, status in exited:
            pid = w.pid
            del self.workers[pid]
            if w.slot is not None and self.server._metrics is not None:
                self.server._metrics.block.retire(w.slot)
            if w.pulse is not None:
                self._free_pulses.append(w.pulse)
            cause = describe_exit(status)
            if w.timed_out:
                cause += f", silent past the {self.config.timeout:g} s timeout"
            code = os.waitstatus_to_exitcode(status)
            if w.state == "stopping":
                level = logging.INFO if code == 0 else logging.WARNING
                error_log.log(level, "worker %d (pid %d) stopped (%s)", w.number, pid, cause)
            elif w.state == "retiring" and code == 0:
                error_log.info(
                    "worker %d (pid %d) exited after its max requests (%s)", w.number, pid, cause
                )
            elif code == WORKER_BOOT_ERROR and self.stopping is None:
                self.failure = f"worker {w.number} (pid {pid}) failed to boot ({cause})"
                error_log.error("%s: stopping", self.failure)
                self._begin_stop("quick")
            elif self.stopping is None:
                error_log.error(
                    "worker %d (pid %d) died (%s); starting a new one", w.number, pid, cause
                )
            else:
                error_log.warning("worker %d (pid %d) exited (%s)", w.number, pid, cause)

    def _read_notes(self) -> None:
        while True:
            try:
                data = os.read(self._notes_r, 4096)
            except (BlockingIOError, InterruptedError):
                break
            if not data:
                break
            self._partial += data
        whole = len(self._partial) - len(self._partial) % NOTE.size
        for pid, what in NOTE.iter_unpack(self._partial[:whole]):
            w = self.workers.get(pid)
            if w is None:
                continue
            if what == BOOTED:
                w.booted = True
            elif what == RETIRING and w.state == "serving":
                # Its replacement starts now, while it finishes its requests.
                self._stopping(w, "retiring")
        self._partial = self._partial[whole:]
