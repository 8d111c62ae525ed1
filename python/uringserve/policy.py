"""Decide whether io_uring may be used: capability probe, diagnostics and the off/auto/on policy."""

from __future__ import annotations

import errno
import importlib
import os
import re
import sys
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from types import ModuleType

__all__ = [
    "ENV_VAR",
    "EXPECTED_ABI_VERSION",
    "MIN_KERNEL",
    "Capabilities",
    "Unsupported",
    "capabilities",
    "hotpath_supported",
    "parse_kernel_release",
    "resolve_policy",
    "supported",
]

#: The ABI version of ``uringserve._uringserve`` this Python layer was written against.
EXPECTED_ABI_VERSION = 1

#: Environment variable consulted by ``resolve_policy(None)``.
ENV_VAR = "URINGSERVE_IO_URING"

#: Oldest kernel with every opcode the basic path uses (IORING_OP_SEND/RECV arrived in 5.6).
MIN_KERNEL: tuple[int, ...] = (5, 6)

_NATIVE_MODULE = "uringserve._uringserve"
_POLICIES = ("off", "auto", "on")
_IO_URING_DISABLED = "/proc/sys/kernel/io_uring_disabled"
_IO_URING_GROUP = "/proc/sys/kernel/io_uring_group"


def parse_kernel_release(release: str) -> tuple[int, ...]:
    """Return the leading numeric components of a kernel release, e.g. ``(6, 18, 44)``."""
    match = re.match(r"\d+(?:\.\d+)*", release.strip())
    if match is None:
        return ()
    return tuple(int(part) for part in match.group(0).split("."))


def _version_text(version: tuple[int, ...]) -> str:
    return ".".join(str(part) for part in version) if version else "unknown"


def _errno_name(code: int) -> str:
    return errno.errorcode.get(code, f"errno {code}")


def _errno_text(code: int | None) -> str:
    if code is None:
        return "no errno reported"
    return f"{_errno_name(code)} ({os.strerror(code)})"


def _memlock_text(memlock: int | None) -> str:
    return "unlimited" if memlock is None else f"{memlock} bytes"


def _yes(flag: bool) -> str:
    return "yes" if flag else "no"


@dataclass(frozen=True)
class Capabilities:
    """What this process can do with io_uring, each feature tried for real by the native probe."""

    linux: bool
    kernel: tuple[int, ...]
    native_loaded: bool
    native_error: str | None
    abi_version: int | None
    abi_ok: bool
    ring_setup: bool
    setup_errno: int | None
    setup_flags: tuple[str, ...]
    queue_depth: int
    accept: bool
    accept_multishot: bool
    pbuf_ring: bool
    recv_multishot: bool
    send_zc: bool
    single_issuer: bool
    defer_taskrun: bool
    memlock: int | None
    memlock_hard: int | None
    reason: str | None
    hotpath_reason: str | None
    # Diagnostics beyond the gates: kept so a report can say *why* each feature is missing.
    memlock_retry: bool = False
    io_uring_disabled: int | None = None
    errnos: tuple[tuple[str, int], ...] = ()

    @property
    def supported(self) -> bool:
        """True when the basic path (ring setup plus a live accept) works in this process."""
        return self.reason is None

    @property
    def hotpath_supported(self) -> bool:
        """True when multishot accept, provided buffers and multishot recv work as well."""
        return self.hotpath_reason is None

    @classmethod
    def from_probe(
        cls,
        probe: Mapping[str, object] | None,
        *,
        linux: bool,
        kernel: tuple[int, ...],
        native_error: str | None = None,
        abi_version: int | None = EXPECTED_ABI_VERSION,
        probe_error: str | None = None,
        io_uring_disabled: int | None = None,
        io_uring_group: int | None = None,
        memlock: tuple[int | None, int | None] = (None, None),
    ) -> Capabilities:
        """Judge the raw facts; ``probe`` is ``_uringserve.probe()``'s dict, or None if not run.

        ``memlock`` is the (soft, hard) RLIMIT_MEMLOCK used when the probe did not report it.
        """
        data: Mapping[str, object] = probe if probe is not None else {}
        native_loaded = native_error is None
        abi_ok = native_loaded and abi_version == EXPECTED_ABI_VERSION

        memlock_soft, memlock_hard = memlock
        if "memlock_soft" in data:
            memlock_soft = _limit(data.get("memlock_soft"))
        if "memlock_hard" in data:
            memlock_hard = _limit(data.get("memlock_hard"))

        flags = data.get("setup_flags")
        setup_flags = tuple(str(f) for f in flags) if isinstance(flags, (list, tuple)) else ()
        errnos = tuple(
            (key[: -len("_errno")], value)
            for key in (
                "setup_errno",
                "accept_errno",
                "accept_multishot_errno",
                "pbuf_ring_errno",
                "recv_multishot_errno",
            )
            if (value := _opt_int(data.get(key))) is not None
        )

        facts = cls(
            linux=linux,
            kernel=kernel,
            native_loaded=native_loaded,
            native_error=native_error,
            abi_version=abi_version if native_loaded else None,
            abi_ok=abi_ok,
            ring_setup=_flag(data.get("setup_ok")),
            setup_errno=_opt_int(data.get("setup_errno")),
            setup_flags=setup_flags,
            queue_depth=_opt_int(data.get("queue_depth")) or 0,
            accept=_flag(data.get("accept")),
            accept_multishot=_flag(data.get("accept_multishot")),
            pbuf_ring=_flag(data.get("pbuf_ring")),
            recv_multishot=_flag(data.get("recv_multishot")),
            send_zc=_flag(data.get("send_zc")),
            single_issuer=_flag(data.get("single_issuer")),
            defer_taskrun=_flag(data.get("defer_taskrun")),
            memlock=memlock_soft,
            memlock_hard=memlock_hard,
            reason=None,
            hotpath_reason=None,
            memlock_retry=_flag(data.get("memlock_retry")),
            io_uring_disabled=io_uring_disabled,
            errnos=errnos,
        )
        reason = facts._basic_reason(probe is not None, probe_error, data, io_uring_group)
        hotpath_reason = reason if reason is not None else facts._hotpath_reason(data)
        # The reasons are judged from the other fields, so they are filled in on a copy.
        return replace(facts, reason=reason, hotpath_reason=hotpath_reason)

    def _basic_reason(
        self,
        probed: bool,
        probe_error: str | None,
        data: Mapping[str, object],
        io_uring_group: int | None,
    ) -> str | None:
        if not self.linux:
            return f"not running on Linux (sys.platform is {sys.platform!r}); io_uring needs Linux"
        if self.kernel < MIN_KERNEL:
            if not self.kernel:
                return (
                    "the kernel version could not be read from os.uname().release; "
                    f"io_uring serving needs Linux {_version_text(MIN_KERNEL)} or newer"
                )
            return (
                f"Linux {_version_text(self.kernel)} is too old; io_uring serving needs "
                f"{_version_text(MIN_KERNEL)} or newer (IORING_OP_SEND/RECV)"
            )
        if not self.native_loaded:
            return f"the native module {_NATIVE_MODULE} failed to import: {self.native_error}"
        if not self.abi_ok:
            found = "no ABI_VERSION" if self.abi_version is None else f"ABI {self.abi_version}"
            return (
                f"the native module {_NATIVE_MODULE} has {found} but this Python layer expects "
                f"ABI {EXPECTED_ABI_VERSION}; reinstall uringserve so both come from one build"
            )
        if probe_error is not None:
            return f"the native io_uring probe failed: {probe_error}"
        if not probed:
            return "the native io_uring probe was not run"
        if not self.ring_setup:
            return self._setup_reason(io_uring_group)
        if not self.accept:
            return (
                "a live accept on a loopback listener failed: "
                f"{self._feature_errno_text(_opt_int(data.get('accept_errno')))} "
                "(IORING_OP_ACCEPT needs Linux 5.5)"
            )
        return None

    def _setup_reason(self, io_uring_group: int | None) -> str:
        code = self.setup_errno
        prefix = "io_uring_setup failed"
        if code is None:
            return f"{prefix} (no errno reported)"
        if code == errno.EPERM:
            return f"{prefix}: EPERM ({self._eperm_cause(io_uring_group)})"
        if code == errno.ENOSYS:
            return (
                f"{prefix}: ENOSYS (kernel built without io_uring, "
                "or a seccomp profile such as Podman's)"
            )
        if code == errno.ENOMEM:
            return (
                f"{prefix}: ENOMEM (RLIMIT_MEMLOCK is {_memlock_text(self.memlock)}; "
                "even a small ring did not fit — raise `ulimit -l` or grant CAP_IPC_LOCK)"
            )
        if code == errno.EINVAL:
            return (
                f"{prefix}: EINVAL "
                "(the kernel rejected the setup flags even without the newer ones)"
            )
        return f"{prefix}: {_errno_text(code)}"

    def _eperm_cause(self, io_uring_group: int | None) -> str:
        disabled = self.io_uring_disabled
        if disabled == 2:
            return "kernel.io_uring_disabled=2 disables io_uring for every process"
        if disabled == 1:
            group = "" if io_uring_group in (None, -1) else f" (gid {io_uring_group})"
            return (
                "kernel.io_uring_disabled=1 allows io_uring only for CAP_SYS_ADMIN and members "
                f"of kernel.io_uring_group{group}; otherwise a seccomp profile such as Docker's "
                "default blocks it"
            )
        if disabled == 0:
            # The sysctl is off, so the only remaining cause is a filter on the syscall.
            return (
                "blocked by a seccomp profile such as Docker's default; "
                "kernel.io_uring_disabled is 0, so it is not the sysctl"
            )
        return "blocked by a seccomp profile such as Docker's default, or kernel.io_uring_disabled"

    def _feature_errno_text(self, code: int | None) -> str:
        text = _errno_text(code)
        if code == errno.ENOMEM:
            # Buffer rings and rings are charged to RLIMIT_MEMLOCK on 6.x kernels.
            text += (
                f"; RLIMIT_MEMLOCK is {_memlock_text(self.memlock)} — raise `ulimit -l` "
                "or grant CAP_IPC_LOCK"
            )
        return text

    def _hotpath_reason(self, data: Mapping[str, object]) -> str | None:
        kernel = f"this kernel is {_version_text(self.kernel)}"
        checks = (
            (self.accept_multishot, "accept_multishot", "multishot accept", "5.19"),
            (self.pbuf_ring, "pbuf_ring", "provided-buffer ring (PBUF_RING) registration", "5.19"),
            (self.recv_multishot, "recv_multishot", "multishot recv (RecvMulti)", "6.0"),
        )
        for ok, key, feature, needs in checks:
            if not ok:
                code = _opt_int(data.get(f"{key}_errno"))
                return (
                    f"{feature} failed: {self._feature_errno_text(code)} "
                    f"(needs Linux {needs}; {kernel})"
                )
        return None

    def gates(self) -> str:
        """One line with every gate's state, in the order they are checked."""
        if self.abi_version is None:
            abi = "unknown"
        elif self.abi_ok:
            abi = "ok"
        else:
            abi = f"{self.abi_version}(expected {EXPECTED_ABI_VERSION})"
        kernel_ok = bool(self.kernel) and self.kernel >= MIN_KERNEL
        return (
            f"linux={_yes(self.linux)} kernel={_version_text(self.kernel)} "
            f"(>={_version_text(MIN_KERNEL)} {_yes(kernel_ok)}) "
            f"native={_yes(self.native_loaded)} abi={abi} ring_setup={_yes(self.ring_setup)} "
            f"accept={_yes(self.accept)} accept_multishot={_yes(self.accept_multishot)} "
            f"pbuf_ring={_yes(self.pbuf_ring)} recv_multishot={_yes(self.recv_multishot)}"
        )

    def report(self) -> str:
        """A readable multi-line report for humans (``python -m uringserve`` prints it)."""
        errnos = dict(self.errnos)

        def with_reason(ok: bool, reason: str | None) -> str:
            return _yes(ok) + ("" if reason is None else f": {reason}")

        def feature(ok: bool, key: str) -> str:
            if ok:
                return "yes"
            code = errnos.get(key)
            return "no" if code is None else f"no ({_errno_name(code)})"

        if self.native_loaded:
            native = f"loaded, ABI {self.abi_version} (expected {EXPECTED_ABI_VERSION})"
        else:
            native = f"not loaded: {self.native_error}"
        if self.ring_setup:
            flags = ", ".join(self.setup_flags) or "none"
            retry = ", shrunk after ENOMEM" if self.memlock_retry else ""
            ring = f"yes ({self.queue_depth} entries{retry}; flags: {flags})"
        else:
            ring = feature(False, "setup")
        disabled = "absent" if self.io_uring_disabled is None else str(self.io_uring_disabled)
        kernel_ok = bool(self.kernel) and self.kernel >= MIN_KERNEL
        rows = [
            ("platform", "Linux" if self.linux else f"not Linux ({sys.platform})"),
            (
                "kernel",
                f"{_version_text(self.kernel)} (needs >= {_version_text(MIN_KERNEL)}: "
                f"{_yes(kernel_ok)})",
            ),
            ("io_uring_disabled", disabled),
            ("native module", native),
            ("ring setup", ring),
            ("accept", feature(self.accept, "accept")),
            ("multishot accept", feature(self.accept_multishot, "accept_multishot")),
            ("PBUF_RING", feature(self.pbuf_ring, "pbuf_ring")),
            ("multishot recv", feature(self.recv_multishot, "recv_multishot")),
            ("SEND_ZC", _yes(self.send_zc)),
            ("SINGLE_ISSUER", _yes(self.single_issuer)),
            ("DEFER_TASKRUN", _yes(self.defer_taskrun)),
            (
                "RLIMIT_MEMLOCK",
                f"soft {_memlock_text(self.memlock)}, hard {_memlock_text(self.memlock_hard)}",
            ),
            ("supported", with_reason(self.supported, self.reason)),
            ("hotpath supported", with_reason(self.hotpath_supported, self.hotpath_reason)),
        ]
        width = max(len(label) for label, _ in rows)
        lines = ["uringserve io_uring capabilities"]
        lines += [f"  {label.ljust(width)}  {value}" for label, value in rows]
        return "\n".join(lines)

    def __str__(self) -> str:
        if not self.supported:
            return f"io_uring unsupported: {self.reason}"
        flags = ", ".join(self.setup_flags) or "no setup flags"
        hotpath = "yes" if self.hotpath_reason is None else f"no ({self.hotpath_reason})"
        return (
            f"io_uring supported on Linux {_version_text(self.kernel)}: ring of "
            f"{self.queue_depth} entries ({flags}); hot path: {hotpath}"
        )


def _flag(value: object) -> bool:
    return value is True


def _opt_int(value: object) -> int | None:
    # bool is an int subclass; a bool where an int belongs is a probe bug, not a number.
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    return None


def _limit(value: object) -> int | None:
    number = _opt_int(value)
    return None if number is None or number < 0 else number


class Unsupported(RuntimeError):
    """io_uring was required (policy ``"on"``) but this process cannot use it."""

    capabilities: Capabilities

    def __init__(self, capabilities: Capabilities, *, hotpath: bool = True) -> None:
        reason = capabilities.hotpath_reason if hotpath else capabilities.reason
        what = "the io_uring hot path" if hotpath else "io_uring"
        super().__init__(
            f"{what} is required (policy 'on') but unsupported: {reason}\n"
            f"  gates: {capabilities.gates()}"
        )
        self.capabilities = capabilities


def _read_int(path: str) -> int | None:
    try:
        # Binary mode: a text codec may be imported lazily, which fails once a process has
        # dropped privileges or chrooted away from the interpreter's files.
        with open(path, "rb") as handle:
            return int(handle.read().strip())
    except (OSError, ValueError):
        return None


def _memlock_rlimit() -> tuple[int | None, int | None]:
    try:
        import resource
    except ImportError:  # not POSIX
        return (None, None)
    soft, hard = resource.getrlimit(resource.RLIMIT_MEMLOCK)

    def convert(value: int) -> int | None:
        return None if value == resource.RLIM_INFINITY else value

    return (convert(soft), convert(hard))


def _load_native() -> tuple[ModuleType | None, str | None]:
    try:
        return importlib.import_module(_NATIVE_MODULE), None
    except Exception as exc:  # any import failure (missing .so, bad symbol, ...) means "no native"
        return None, f"{type(exc).__name__}: {exc}"


def _probe_process() -> Capabilities:
    linux = sys.platform.startswith("linux")
    kernel = parse_kernel_release(os.uname().release) if hasattr(os, "uname") else ()
    module, native_error = _load_native()
    abi_version: int | None = None
    probe: Mapping[str, object] | None = None
    probe_error: str | None = None
    if module is not None:
        abi_version = _opt_int(getattr(module, "ABI_VERSION", None))
        # A probe of a different ABI may return a different shape, so only trust a match.
        if linux and abi_version == EXPECTED_ABI_VERSION:
            try:
                result = module.probe()
            except Exception as exc:
                probe_error = f"{type(exc).__name__}: {exc}"
            else:
                if isinstance(result, Mapping):
                    probe = result
                else:
                    probe_error = f"probe() returned {type(result).__name__}, not a dict"
    return Capabilities.from_probe(
        probe,
        linux=linux,
        kernel=kernel,
        native_error=native_error,
        abi_version=abi_version,
        probe_error=probe_error,
        io_uring_disabled=_read_int(_IO_URING_DISABLED),
        io_uring_group=_read_int(_IO_URING_GROUP),
        memlock=_memlock_rlimit(),
    )


# (pid, capabilities): the pid guards against a fork that bypassed os.register_at_fork
# (e.g. a raw fork() from C), because capabilities do not survive into another process:
# rings, rlimits and seccomp filters are all per process.
_cache: tuple[int, Capabilities] | None = None
_lock = threading.Lock()


def _drop_cache_after_fork() -> None:
    global _cache, _lock
    _cache = None
    # Another thread may have held the lock at fork time; it would never be released here.
    _lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_drop_cache_after_fork)


def capabilities() -> Capabilities:
    """Probe io_uring once per process and return the (cached) result."""
    return cached_capabilities(_probe_process)


def cached_capabilities(probe: Callable[[], Capabilities]) -> Capabilities:
    """This process's cached capabilities; without any yet, `probe`'s answer becomes them
    (the master of workers probes in a child process, see arbiter.probe_without_rings)."""
    global _cache
    pid = os.getpid()
    cached = _cache
    if cached is not None and cached[0] == pid:
        return cached[1]
    with _lock:
        cached = _cache
        if cached is not None and cached[0] == pid:
            return cached[1]
        caps = probe()
        _cache = (pid, caps)
        return caps


def supported() -> bool:
    """True when this process can serve with io_uring's basic path."""
    return capabilities().supported


def hotpath_supported() -> bool:
    """True when this process can serve with the multishot/provided-buffer hot path."""
    return capabilities().hotpath_supported


def _parse_policy(value: object, *, from_env: bool) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, str):
        mode = value.strip().lower()
        if from_env and not mode:
            return "auto"
        if mode in _POLICIES:
            return mode
    accepted = ", ".join(repr(p) for p in _POLICIES)
    if from_env:
        raise ValueError(
            f"invalid value {value!r} for environment variable {ENV_VAR}: "
            f"expected one of {accepted} (unset or empty means 'auto')"
        )
    raise ValueError(
        f"invalid io_uring policy {value!r}: expected one of {accepted}, True, False or None"
    )


def resolve_policy(policy: str | bool | None = None, *, hotpath: bool = True) -> bool:
    """Return whether to use io_uring under ``policy`` ("off", "auto", "on", a bool or None).

    None reads ``URINGSERVE_IO_URING``. "auto" answers from the probe without complaint;
    "on" returns True or raises :class:`Unsupported`. ``hotpath`` selects which capability
    is required: the multishot hot path (default) or only the basic ring.
    """
    if policy is None:
        mode = _parse_policy(os.environ.get(ENV_VAR, ""), from_env=True)
    else:
        mode = _parse_policy(policy, from_env=False)
    if mode == "off":
        return False
    caps = capabilities()
    ok = caps.hotpath_supported if hotpath else caps.supported
    if mode == "on" and not ok:
        raise Unsupported(caps, hotpath=hotpath)
    return ok
