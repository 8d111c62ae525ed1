"""The io_uring policy layer: verdicts, reasons, off/auto/on and the per-process cache."""

from __future__ import annotations

import dataclasses
import errno
import os
import select
import signal
import subprocess
import sys
import warnings
from typing import Any

import pytest

import uringserve
from uringserve import policy
from uringserve.cli import main as cli_main
from uringserve.policy import Capabilities, Unsupported

CHILD_TIMEOUT = 60.0

PROBE_KEYS = {
    "setup_ok",
    "setup_errno",
    "setup_flags",
    "queue_depth",
    "memlock_retry",
    "single_issuer",
    "defer_taskrun",
    "accept",
    "accept_errno",
    "accept_multishot",
    "accept_multishot_errno",
    "pbuf_ring",
    "pbuf_ring_errno",
    "recv_multishot",
    "recv_multishot_errno",
    "send_zc",
    "memlock_soft",
    "memlock_hard",
}

GATES = (
    "linux=",
    "kernel=",
    "native=",
    "abi=",
    "ring_setup=",
    "accept=",
    "accept_multishot=",
    "pbuf_ring=",
    "recv_multishot=",
)


def full_probe(**overrides: object) -> dict[str, object]:
    """A probe answer from a machine where everything works, with ``overrides`` applied."""
    answer: dict[str, object] = {
        "setup_ok": True,
        "setup_errno": None,
        "setup_flags": ["SINGLE_ISSUER", "DEFER_TASKRUN", "COOP_TASKRUN"],
        "queue_depth": 1024,
        "memlock_retry": False,
        "single_issuer": True,
        "defer_taskrun": True,
        "accept": True,
        "accept_errno": None,
        "accept_multishot": True,
        "accept_multishot_errno": None,
        "pbuf_ring": True,
        "pbuf_ring_errno": None,
        "recv_multishot": True,
        "recv_multishot_errno": None,
        "send_zc": True,
        "memlock_soft": 8 * 1024 * 1024,
        "memlock_hard": -1,
    }
    assert set(answer) == PROBE_KEYS
    answer.update(overrides)
    return answer


def setup_failed(code: int) -> dict[str, object]:
    return full_probe(
        setup_ok=False,
        setup_errno=code,
        setup_flags=[],
        queue_depth=0,
        single_issuer=False,
        defer_taskrun=False,
        accept=False,
        accept_multishot=False,
        pbuf_ring=False,
        recv_multishot=False,
        send_zc=False,
    )


def make_caps(probe: dict[str, object] | None = None, **facts: Any) -> Capabilities:
    facts.setdefault("linux", True)
    facts.setdefault("kernel", (6, 18, 44))
    return Capabilities.from_probe(full_probe() if probe is None else probe, **facts)


FULL = make_caps()
# Basic path works, hot path does not (a 5.15-like kernel: no RecvMulti, no PBUF_RING).
BASIC = make_caps(
    full_probe(
        pbuf_ring=False,
        pbuf_ring_errno=errno.EINVAL,
        recv_multishot=False,
        recv_multishot_errno=errno.EINVAL,
    ),
    kernel=(5, 15, 0),
)
NONE = make_caps(setup_failed(errno.EPERM), io_uring_disabled=0)
CAPS = {"full": FULL, "basic": BASIC, "none": NONE}


@pytest.fixture
def force(monkeypatch: pytest.MonkeyPatch) -> Any:
    """Make capabilities() answer with a given Capabilities in this process."""

    def apply(caps: Capabilities) -> None:
        monkeypatch.setattr(policy, "_cache", (os.getpid(), caps))

    return apply


@pytest.fixture
def no_probe(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if anything asks for capabilities (for paths that must not probe)."""

    def refuse() -> Capabilities:
        raise AssertionError("capabilities() must not be called here")

    monkeypatch.setattr(policy, "capabilities", refuse)


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch) -> Any:
    def apply(value: str | None) -> None:
        if value is None:
            monkeypatch.delenv(policy.ENV_VAR, raising=False)
        else:
            monkeypatch.setenv(policy.ENV_VAR, value)

    apply(None)
    return apply


# ---------------------------------------------------------------------------------------------
# The policy table


@pytest.mark.parametrize("value", ["off", "OFF", " Off\n", False])
@pytest.mark.parametrize("hotpath", [True, False])
def test_off_is_false_without_probing(value: Any, hotpath: bool, no_probe: None, env: Any) -> None:
    env("on")  # an explicit policy wins over the environment
    assert policy.resolve_policy(value, hotpath=hotpath) is False


# (policy, capabilities, hotpath, expected): expected is a bool or Unsupported.
TABLE = [
    ("auto", "full", True, True),
    ("auto", "full", False, True),
    ("auto", "basic", True, False),
    ("auto", "basic", False, True),
    ("auto", "none", True, False),
    ("auto", "none", False, False),
    ("on", "full", True, True),
    ("on", "full", False, True),
    ("on", "basic", True, Unsupported),
    ("on", "basic", False, True),
    ("on", "none", True, Unsupported),
    ("on", "none", False, Unsupported),
    (True, "full", True, True),
    (True, "basic", False, True),
    (True, "basic", True, Unsupported),
    (True, "none", False, Unsupported),
    (" AUTO ", "full", True, True),
    ("Auto", "none", True, False),
    ("  on\t", "full", True, True),
    ("ON", "none", False, Unsupported),
]


def check(value: Any, hotpath: bool, caps: Capabilities, expected: Any) -> None:
    if expected is Unsupported:
        with pytest.raises(Unsupported) as info:
            policy.resolve_policy(value, hotpath=hotpath)
        assert info.value.capabilities is caps
        reason = caps.hotpath_reason if hotpath else caps.reason
        assert reason is not None
        assert reason in str(info.value)
    else:
        assert policy.resolve_policy(value, hotpath=hotpath) is expected


@pytest.mark.parametrize(("value", "kind", "hotpath", "expected"), TABLE)
def test_policy_table(
    value: Any, kind: str, hotpath: bool, expected: Any, force: Any, env: Any
) -> None:
    env("off")  # an explicit policy never reads the environment
    force(CAPS[kind])
    check(value, hotpath, CAPS[kind], expected)


@pytest.mark.parametrize(
    ("env_value", "kind", "hotpath", "expected"),
    [
        (None, "full", True, True),  # unset means auto
        (None, "none", True, False),
        (None, "basic", True, False),
        (None, "basic", False, True),
        ("", "full", True, True),  # empty means auto
        ("", "none", True, False),
        ("  ", "none", True, False),
        ("off", "full", True, False),
        ("OFF", "full", False, False),
        ("auto", "full", True, True),
        ("auto", "none", True, False),
        ("on", "full", True, True),
        ("on", "none", True, Unsupported),
        (" On ", "basic", True, Unsupported),
        ("on", "basic", False, True),
    ],
)
def test_policy_from_env(
    env_value: str | None, kind: str, hotpath: bool, expected: Any, force: Any, env: Any
) -> None:
    env(env_value)
    force(CAPS[kind])
    check(None, hotpath, CAPS[kind], expected)


def test_env_off_does_not_probe(no_probe: None, env: Any) -> None:
    env("off")
    assert policy.resolve_policy() is False


@pytest.mark.parametrize("value", ["yes", "no", "true", "", "   ", "maybe", "1", 1, 0, 1.0, b"on"])
def test_bad_policy_values(value: Any, no_probe: None, env: Any) -> None:
    env("on")
    with pytest.raises(ValueError, match="policy") as info:
        policy.resolve_policy(value)
    message = str(info.value)
    for accepted in ("'off'", "'auto'", "'on'"):
        assert accepted in message
    assert repr(value) in message


@pytest.mark.parametrize("env_value", ["yes", "1", "true", "maybe", "o n"])
def test_bad_env_value(env_value: str, no_probe: None, env: Any) -> None:
    env(env_value)
    with pytest.raises(ValueError) as info:
        policy.resolve_policy()
    message = str(info.value)
    assert policy.ENV_VAR in message
    assert repr(env_value) in message
    for accepted in ("'off'", "'auto'", "'on'"):
        assert accepted in message


def test_auto_is_quiet(
    force: Any, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    force(NONE)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert policy.resolve_policy("auto") is False
        assert policy.resolve_policy("auto", hotpath=False) is False
    assert caught == []
    assert caplog.records == []
    assert capsys.readouterr() == ("", "")


def test_module_functions_follow_capabilities(force: Any) -> None:
    for caps, basic, hot in ((FULL, True, True), (BASIC, True, False), (NONE, False, False)):
        force(caps)
        assert policy.capabilities() is caps
        assert uringserve.supported() is basic
        assert uringserve.hotpath_supported() is hot


# ---------------------------------------------------------------------------------------------
# Unsupported


@pytest.mark.parametrize("hotpath", [True, False])
def test_unsupported_message_lists_every_gate(hotpath: bool, force: Any) -> None:
    force(NONE)
    with pytest.raises(Unsupported) as info:
        policy.resolve_policy("on", hotpath=hotpath)
    error = info.value
    assert isinstance(error, RuntimeError)
    assert error.capabilities is NONE
    message = str(error)
    for gate in GATES:
        assert gate in message
    assert "linux=yes kernel=6.18.44 (>=5.6 yes) native=yes abi=ok ring_setup=no" in message
    assert NONE.reason is not None
    assert NONE.reason in message


def test_unsupported_hotpath_names_the_missing_feature(force: Any) -> None:
    force(BASIC)
    with pytest.raises(Unsupported) as info:
        policy.resolve_policy("on")
    message = str(info.value)
    assert "pbuf_ring=no" in message
    assert "PBUF_RING" in message
    assert "accept=yes" in message


# ---------------------------------------------------------------------------------------------
# Reasons: words a user understands, with the errno name kept


@pytest.mark.parametrize(
    ("code", "disabled", "expected"),
    [
        (
            errno.EPERM,
            None,
            "io_uring_setup failed: EPERM (blocked by a seccomp profile such as Docker's "
            "default, or kernel.io_uring_disabled)",
        ),
        (
            errno.ENOSYS,
            None,
            "io_uring_setup failed: ENOSYS (kernel built without io_uring, or a seccomp "
            "profile such as Podman's)",
        ),
        (
            errno.ENOMEM,
            None,
            "io_uring_setup failed: ENOMEM (RLIMIT_MEMLOCK is 16384 bytes; even a small ring "
            "did not fit — raise `ulimit -l` or grant CAP_IPC_LOCK)",
        ),
        (
            errno.EINVAL,
            None,
            "io_uring_setup failed: EINVAL (the kernel rejected the setup flags even without "
            "the newer ones)",
        ),
        (errno.EFAULT, None, f"io_uring_setup failed: EFAULT ({os.strerror(errno.EFAULT)})"),
    ],
)
def test_setup_reasons(code: int, disabled: int | None, expected: str) -> None:
    caps = make_caps(
        setup_failed(code) | {"memlock_soft": 16384, "memlock_hard": 16384},
        io_uring_disabled=disabled,
    )
    assert not caps.supported
    assert not caps.hotpath_supported
    assert caps.setup_errno == code
    assert caps.reason == expected
    assert caps.hotpath_reason == expected
    assert caps.memlock == 16384


@pytest.mark.parametrize(
    ("disabled", "group", "words"),
    [
        (0, None, ["EPERM", "seccomp", "io_uring_disabled is 0"]),
        (1, 1234, ["EPERM", "io_uring_disabled=1", "io_uring_group (gid 1234)", "seccomp"]),
        (1, -1, ["EPERM", "io_uring_disabled=1", "io_uring_group"]),
        (2, None, ["EPERM", "io_uring_disabled=2"]),
    ],
)
def test_eperm_reason_uses_the_sysctl(disabled: int, group: int | None, words: list[str]) -> None:
    caps = make_caps(setup_failed(errno.EPERM), io_uring_disabled=disabled, io_uring_group=group)
    assert caps.reason is not None
    assert caps.reason.startswith("io_uring_setup failed: EPERM (")
    for word in words:
        assert word in caps.reason
    assert caps.io_uring_disabled == disabled


def test_unlimited_memlock_is_reported_as_such() -> None:
    caps = make_caps(setup_failed(errno.ENOMEM) | {"memlock_soft": -1, "memlock_hard": -1})
    assert caps.memlock is None
    assert caps.memlock_hard is None
    assert caps.reason is not None
    assert "RLIMIT_MEMLOCK is unlimited" in caps.reason


def test_gates_are_checked_in_order() -> None:
    broken = setup_failed(errno.EPERM)

    not_linux = make_caps(broken, linux=False)
    assert not_linux.reason is not None
    assert "Linux" in not_linux.reason
    assert "EPERM" not in not_linux.reason

    old = make_caps(broken, kernel=(5, 4, 0))
    assert old.reason is not None
    assert "5.4.0" in old.reason
    assert "5.6" in old.reason

    unknown = make_caps(broken, kernel=())
    assert unknown.reason is not None
    assert "kernel version" in unknown.reason

    no_native = Capabilities.from_probe(
        None,
        linux=True,
        kernel=(6, 18, 44),
        native_error="ImportError: libfoo.so: cannot open shared object file",
    )
    assert no_native.native_loaded is False
    assert no_native.abi_ok is False
    assert no_native.reason is not None
    assert "native module" in no_native.reason
    assert "failed to import" in no_native.reason
    assert "libfoo.so" in no_native.reason

    abi = Capabilities.from_probe(None, linux=True, kernel=(6, 18, 44), abi_version=2)
    assert abi.abi_ok is False
    assert abi.reason is not None
    assert "ABI 2" in abi.reason
    assert f"ABI {policy.EXPECTED_ABI_VERSION}" in abi.reason
    assert "abi=2(expected 1)" in abi.gates()

    crashed = Capabilities.from_probe(
        None, linux=True, kernel=(6, 18, 44), probe_error="RuntimeError: boom"
    )
    assert crashed.reason is not None
    assert "RuntimeError: boom" in crashed.reason

    no_accept = make_caps(
        full_probe(accept=False, accept_errno=errno.EINVAL, accept_multishot=False)
    )
    assert no_accept.ring_setup is True
    assert no_accept.reason is not None
    assert "accept" in no_accept.reason
    assert "EINVAL" in no_accept.reason
    assert no_accept.hotpath_reason == no_accept.reason


@pytest.mark.parametrize(
    ("overrides", "words"),
    [
        (
            {"accept_multishot": False, "accept_multishot_errno": errno.EINVAL},
            ["multishot accept", "EINVAL", "5.19"],
        ),
        ({"pbuf_ring": False, "pbuf_ring_errno": errno.EINVAL}, ["PBUF_RING", "EINVAL", "5.19"]),
        (
            {"pbuf_ring": False, "pbuf_ring_errno": errno.ENOMEM, "memlock_soft": 16384},
            ["PBUF_RING", "ENOMEM", "5.19", "RLIMIT_MEMLOCK is 16384 bytes"],
        ),
        (
            {"recv_multishot": False, "recv_multishot_errno": errno.EINVAL},
            ["RecvMulti", "EINVAL", "6.0"],
        ),
        ({"recv_multishot": False}, ["RecvMulti", "no errno reported", "6.0"]),
    ],
)
def test_hotpath_reasons(overrides: dict[str, object], words: list[str]) -> None:
    caps = make_caps(full_probe(**overrides))
    assert caps.supported
    assert caps.reason is None
    assert not caps.hotpath_supported
    assert caps.hotpath_reason is not None
    for word in words:
        assert word in caps.hotpath_reason


def test_full_capabilities_fields() -> None:
    assert FULL.supported and FULL.hotpath_supported
    assert FULL.setup_flags == ("SINGLE_ISSUER", "DEFER_TASKRUN", "COOP_TASKRUN")
    assert FULL.queue_depth == 1024
    assert FULL.memlock == 8 * 1024 * 1024
    assert FULL.memlock_hard is None
    assert FULL.abi_version == policy.EXPECTED_ABI_VERSION


@pytest.mark.parametrize(
    ("release", "expected"),
    [
        ("6.18.44-fc-v657", (6, 18, 44)),
        ("5.15.0-91-generic", (5, 15, 0)),
        ("6.1", (6, 1)),
        ("4.19.0+", (4, 19, 0)),
        ("6.8.0-rc3", (6, 8, 0)),
        ("", ()),
        ("weird", ()),
    ],
)
def test_parse_kernel_release(release: str, expected: tuple[int, ...]) -> None:
    assert policy.parse_kernel_release(release) == expected


# ---------------------------------------------------------------------------------------------
# The real capabilities of this process


def test_capabilities_are_frozen_and_printable() -> None:
    caps = policy.capabilities()
    with pytest.raises(dataclasses.FrozenInstanceError):
        caps.ring_setup = True  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        caps.reason = None  # type: ignore[misc]
    text = str(caps)
    assert text and "\n" not in text
    assert repr(caps).startswith("Capabilities(")
    report = caps.report()
    assert len(report.splitlines()) > 10
    for label in ("kernel", "native module", "ring setup", "RLIMIT_MEMLOCK", "supported"):
        assert label in report
    if caps.reason is not None:
        assert caps.reason in report
        assert caps.reason in text
    assert caps.kernel == policy.parse_kernel_release(os.uname().release)
    assert caps.linux is sys.platform.startswith("linux")


def test_capabilities_report_of_forced_cases() -> None:
    for caps in (FULL, BASIC, NONE):
        report = caps.report()
        assert ("supported          yes" in report) is caps.supported
        if caps.hotpath_reason is not None:
            assert caps.hotpath_reason in report
    assert "1024 entries" in FULL.report()
    assert "SINGLE_ISSUER" in str(FULL)
    assert "no (EINVAL)" in BASIC.report()
    assert "no (EPERM)" in NONE.report()


def test_capabilities_are_cached_per_process(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(policy, "_cache", None)
    first = policy.capabilities()
    assert policy.capabilities() is first
    assert policy._cache == (os.getpid(), first)

    # A cache entry from another pid (a fork that bypassed register_at_fork) is not trusted.
    monkeypatch.setattr(policy, "_cache", (os.getpid() + 1_000_000, NONE))
    fresh = policy.capabilities()
    assert fresh is not NONE
    assert policy._cache == (os.getpid(), fresh)


def test_native_import_failure_still_gives_capabilities(monkeypatch: pytest.MonkeyPatch) -> None:
    # None in sys.modules makes the import fail exactly as a missing extension would.
    monkeypatch.setitem(sys.modules, "uringserve._uringserve", None)
    monkeypatch.setattr(policy, "_cache", None)
    caps = policy.capabilities()
    assert caps.native_loaded is False
    assert caps.native_error
    assert caps.abi_version is None
    assert caps.reason is not None
    if caps.linux and caps.kernel >= policy.MIN_KERNEL:
        assert "failed to import" in caps.reason
        assert caps.native_error in caps.reason
    assert not policy.supported()
    assert not policy.hotpath_supported()
    assert policy.resolve_policy("auto") is False
    with pytest.raises(Unsupported, match="native=no"):
        policy.resolve_policy("on")
    assert "not loaded" in caps.report()


def test_real_probe_has_the_documented_keys() -> None:
    native = pytest.importorskip("uringserve._uringserve")
    assert native.ABI_VERSION == policy.EXPECTED_ABI_VERSION
    answer = native.probe()
    assert isinstance(answer, dict)
    assert set(answer) == PROBE_KEYS
    for key in PROBE_KEYS:
        value = answer[key]
        if key.endswith("_errno"):
            assert value is None or (isinstance(value, int) and value > 0), (key, value)
        elif key in ("queue_depth", "memlock_soft", "memlock_hard"):
            assert isinstance(value, int) and not isinstance(value, bool), (key, value)
        elif key == "setup_flags":
            assert isinstance(value, list) and all(isinstance(f, str) for f in value)
        else:
            assert isinstance(value, bool), (key, value)
    assert (answer["setup_errno"] is None) is answer["setup_ok"]
    assert (answer["queue_depth"] > 0) is answer["setup_ok"]
    for feature in ("accept", "accept_multishot", "pbuf_ring", "recv_multishot"):
        if answer[feature]:
            assert answer[f"{feature}_errno"] is None, feature


def test_cache_is_dropped_in_a_forked_child(force: Any) -> None:
    force(FULL)
    assert policy.capabilities() is FULL
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: never return into pytest
        status = 1
        try:
            os.close(read_end)
            cleared = policy._cache is None
            again = policy.capabilities()
            fresh = again is not FULL and policy._cache == (os.getpid(), again)
            os.write(write_end, b"%d %d" % (cleared, fresh))
            status = 0
        finally:
            os._exit(status)
    os.close(write_end)
    try:
        ready, _, _ = select.select([read_end], [], [], CHILD_TIMEOUT)
        if not ready:
            os.kill(pid, signal.SIGKILL)
            pytest.fail(f"forked child did not answer within {CHILD_TIMEOUT}s")
        answer = os.read(read_end, 64)
    finally:
        os.close(read_end)
        _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert answer == b"1 1", "child saw: cache cleared, fresh capabilities = " + answer.decode()
    # The parent's cache is untouched by the child.
    assert policy.capabilities() is FULL


# ---------------------------------------------------------------------------------------------
# Public surface and CLI


def test_public_api() -> None:
    for name in (
        "capabilities",
        "supported",
        "hotpath_supported",
        "resolve_policy",
        "Unsupported",
        "Capabilities",
        "__version__",
    ):
        assert name in uringserve.__all__
        assert hasattr(uringserve, name)
    assert isinstance(uringserve.__version__, str) and uringserve.__version__
    assert uringserve.Unsupported is Unsupported
    assert uringserve.capabilities is policy.capabilities


def test_native_names_are_exported_or_explained() -> None:
    names = ("Ring", "HotpathRing", "Completion", "UringError", "RingSetupError")
    if uringserve._native_import_error is None:
        for name in names:
            assert name in uringserve.__all__
            assert getattr(uringserve, name) is getattr(uringserve._uringserve, name)
        assert issubclass(uringserve.UringError, OSError)
        assert issubclass(uringserve.RingSetupError, uringserve.UringError)
    else:
        for name in names:
            with pytest.raises(ImportError, match="failed to import"):
                getattr(uringserve, name)


def test_cli_main_prints_the_report(force: Any, capsys: pytest.CaptureFixture[str]) -> None:
    force(BASIC)
    assert cli_main(["--capabilities"]) == 0
    out = capsys.readouterr().out
    assert BASIC.report() in out
    assert "supported() = True" in out
    assert "hotpath_supported() = False" in out


def test_python_dash_m_uringserve() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "uringserve", "--capabilities"],
        capture_output=True,
        text=True,
        timeout=CHILD_TIMEOUT,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "uringserve io_uring capabilities" in done.stdout
    assert "hotpath_supported() = " in done.stdout
