"""Hostile environments, each in its own process: seccomp-blocked io_uring and a tiny memlock."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import uringserve

TIMEOUT = 60
TESTS_DIR = Path(__file__).resolve().parent
# The directory holding the uringserve package this session imported, so the child tests
# the same build even when it is not installed (e.g. PYTHONPATH=python).
PACKAGE_ROOT = Path(uringserve.__file__).resolve().parent.parent
NOBODY = 65534
TINY_MEMLOCK = 16384

# Child scripts start here: the filter for the errno in argv[1], before uringserve is imported.
INSTALL_FILTER = r"""
import json, sys
from seccomp_filter import SeccompUnavailable, install_io_uring_errno_filter

code = int(sys.argv[1])
try:
    install_io_uring_errno_filter(code)
except SeccompUnavailable as exc:
    print(json.dumps({"skip": f"cannot install a seccomp filter here: {exc}"}))
    raise SystemExit(0)
"""

SECCOMP_SCRIPT = (
    INSTALL_FILTER
    + r"""
import uringserve
from uringserve import policy

caps = uringserve.capabilities()
out = {
    "supported": uringserve.supported(),
    "hotpath_supported": uringserve.hotpath_supported(),
    "caps_supported": caps.supported,
    "reason": caps.reason,
    "hotpath_reason": caps.hotpath_reason,
    "setup_errno": caps.setup_errno,
    "ring_setup": caps.ring_setup,
    "gates": caps.gates(),
    "before_setup_ok": bool(
        caps.linux and caps.kernel >= policy.MIN_KERNEL and caps.native_loaded and caps.abi_ok
    ),
    "auto": policy.resolve_policy("auto"),
    "auto_basic": policy.resolve_policy("auto", hotpath=False),
}
for hotpath in (True, False):
    key = "on_hotpath" if hotpath else "on_basic"
    try:
        out[key] = {"returned": policy.resolve_policy("on", hotpath=hotpath)}
    except policy.Unsupported as exc:
        out[key] = {"message": str(exc), "same_caps": exc.capabilities is caps}

if caps.native_loaded:
    # The constructors must refuse cleanly (an OSError carrying the errno), never crash.
    for name, make in (
        ("ring", lambda: uringserve.Ring(8)),
        ("hotpath_ring", lambda: uringserve.HotpathRing(queue_depth=8, n_bufs=8, buf_size=4096)),
    ):
        try:
            made = make()
        except Exception as exc:
            out[name] = {
                "type": type(exc).__name__,
                "is_uring_error": isinstance(exc, uringserve.UringError),
                "errno": getattr(exc, "errno", None),
                "message": str(exc),
            }
        else:
            made.close()
            out[name] = {"type": None}
print(json.dumps(out))
"""
)

MEMLOCK_SCRIPT = r"""
import json, os, resource, sys, traceback

# Import (and so load the native module) while still root: nobody may not be able to read
# the interpreter's or the package's files.
import uringserve
from uringserve import policy

limit = int(sys.argv[1])
uid = int(sys.argv[2])
resource.setrlimit(resource.RLIMIT_MEMLOCK, (limit, limit))
# Dropping every uid to non-root clears CAP_IPC_LOCK, so memlock is really charged.
os.setgroups([])
os.setgid(uid)
os.setuid(uid)

caps = uringserve.capabilities()
out = {
    "euid": os.geteuid(),
    "native_loaded": caps.native_loaded,
    "native_error": caps.native_error,
    "before_setup_ok": bool(
        caps.linux and caps.kernel >= policy.MIN_KERNEL and caps.native_loaded and caps.abi_ok
    ),
    "ring_setup": caps.ring_setup,
    "queue_depth": caps.queue_depth,
    "memlock": caps.memlock,
    "memlock_retry": caps.memlock_retry,
    "setup_errno": caps.setup_errno,
    "reason": caps.reason,
    "hotpath_reason": caps.hotpath_reason,
    "report": caps.report(),
}


def attempt(make):
    try:
        ring = make()
    except Exception as exc:
        return {
            "ok": False,
            "type": type(exc).__name__,
            "is_uring_error": isinstance(exc, uringserve.UringError),
            "errno": getattr(exc, "errno", None),
            "message": str(exc),
            "traceback": traceback.format_exc(),
        }
    try:
        return {"ok": True, "queue_depth": ring.queue_depth}
    finally:
        ring.close()


if caps.native_loaded:
    out["ring_default"] = attempt(lambda: uringserve.Ring())
    out["ring_small"] = attempt(lambda: uringserve.Ring(8))
    out["hotpath_default"] = attempt(lambda: uringserve.HotpathRing())
    out["hotpath_small"] = attempt(
        lambda: uringserve.HotpathRing(queue_depth=8, n_bufs=4, buf_size=4096)
    )
print(json.dumps(out))
"""


def run_child(script: str, *args: str) -> dict[str, Any]:
    env = dict(os.environ)
    paths = [str(TESTS_DIR), str(PACKAGE_ROOT)]
    if env.get("PYTHONPATH"):
        paths.append(env["PYTHONPATH"])
    env["PYTHONPATH"] = os.pathsep.join(paths)
    # The policy under test must come from the probe, not from the caller's environment.
    env.pop("URINGSERVE_IO_URING", None)
    done = subprocess.run(
        [sys.executable, "-c", script, *args],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        env=env,
        cwd=str(TESTS_DIR),
        check=False,
    )
    assert done.returncode == 0, (
        f"child exited with {done.returncode} (negative = killed by that signal)\n"
        f"stdout:\n{done.stdout}\nstderr:\n{done.stderr}"
    )
    lines = done.stdout.strip().splitlines()
    assert lines, f"child printed nothing; stderr:\n{done.stderr}"
    result: dict[str, Any] = json.loads(lines[-1])
    if "skip" in result:
        pytest.skip(result["skip"])
    return result


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="seccomp is Linux-only")
@pytest.mark.parametrize(("code", "name"), [(errno.EPERM, "EPERM"), (errno.ENOSYS, "ENOSYS")])
def test_seccomp_blocked_io_uring(code: int, name: str) -> None:
    out = run_child(SECCOMP_SCRIPT, str(code))

    # These hold whatever blocked io_uring first.
    assert out["supported"] is False
    assert out["caps_supported"] is False
    assert out["hotpath_supported"] is False
    assert out["auto"] is False
    assert out["auto_basic"] is False
    assert out["reason"]
    assert out["hotpath_reason"] == out["reason"]
    for key in ("on_hotpath", "on_basic"):
        assert "message" in out[key], f"resolve_policy('on') did not raise: {out[key]}"
        assert out[key]["same_caps"] is True
        assert out["reason"] in out[key]["message"]
        assert "ring_setup=no" in out[key]["message"]

    if not out["before_setup_ok"]:
        pytest.skip(
            f"io_uring is blocked before io_uring_setup here ({out['reason']}), "
            f"so the {name} from the filter cannot be observed; gates: {out['gates']}"
        )
    # Setup is the first io_uring syscall, so the filter's errno is what the probe reports.
    assert out["ring_setup"] is False
    assert out["setup_errno"] == code
    assert out["reason"].startswith(f"io_uring_setup failed: {name} (")
    for key in ("ring", "hotpath_ring"):
        made = out[key]
        assert made["type"] is not None, f"{key} was constructed although io_uring is blocked"
        assert made["is_uring_error"], made
        assert made["errno"] == code, made


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RLIMIT_MEMLOCK is Linux-only")
def test_tiny_memlock_as_non_root() -> None:
    if os.geteuid() != 0:
        reason = "needs root: the child sets RLIMIT_MEMLOCK then setuid()s to nobody"
        print(f"skipping: {reason}")
        pytest.skip(reason)
    out = run_child(MEMLOCK_SCRIPT, str(TINY_MEMLOCK), str(NOBODY))
    assert out["euid"] == NOBODY
    if not out["before_setup_ok"]:
        pytest.skip(f"io_uring is blocked before io_uring_setup here: {out['reason']}")
    assert out["memlock"] == TINY_MEMLOCK
    report = out["report"]
    assert f"soft {TINY_MEMLOCK} bytes" in report

    if out["ring_setup"]:
        # A smaller ring fitted under the limit.
        assert out["queue_depth"] > 0
    else:
        assert out["setup_errno"] == errno.ENOMEM, out
        reason = out["reason"]
        assert "ENOMEM" in reason
        assert "RLIMIT_MEMLOCK" in reason
        assert str(TINY_MEMLOCK) in reason

    for key in ("ring_default", "ring_small", "hotpath_default", "hotpath_small"):
        made = out[key]
        if made["ok"]:
            assert made["queue_depth"] > 0, (key, made)
            continue
        message = made["message"]
        assert "enomem" in message.lower() or "memlock" in message.lower(), (key, made)
        assert made["is_uring_error"], (key, made)


CLI_SCRIPT = (
    INSTALL_FILTER
    + r"""
import subprocess

# The filter is inherited by the CLI child, as it would be in a container.
on = subprocess.run(
    [sys.executable, "-m", "uringserve", "--io-uring", "on", "--port", "0"],
    capture_output=True, text=True, timeout=30,
)
import uringserve
from uringserve.demo import app

with uringserve.Server(app, "127.0.0.1", 0, io_uring="auto", access_log=False) as server:
    line = server.startup_line()
    backend = server.backend
print(json.dumps({"on_rc": on.returncode, "on_stderr": on.stderr, "auto_line": line,
                  "auto_backend": backend, "reason": uringserve.capabilities().reason}))
"""
)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="seccomp is Linux-only")
@pytest.mark.parametrize(("code", "name"), [(errno.EPERM, "EPERM"), (errno.ENOSYS, "ENOSYS")])
def test_cli_and_server_under_blocked_io_uring(code: int, name: str) -> None:
    out = run_child(CLI_SCRIPT, str(code))
    # `on` refuses to start: exit 1, the reason, and no traceback.
    assert out["on_rc"] == 1, out["on_stderr"]
    assert "Traceback" not in out["on_stderr"]
    assert out["reason"] in out["on_stderr"]
    # `auto` serves through epoll, and its startup line says why.
    assert out["auto_backend"] == "epoll"
    assert " on epoll (io_uring unavailable: " in out["auto_line"]
    assert out["reason"] in out["auto_line"]
    assert name in out["reason"] or "io_uring" in out["reason"]
