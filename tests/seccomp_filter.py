"""Install a seccomp filter that fails the io_uring syscalls with a chosen errno (tests only)."""

from __future__ import annotations

import ctypes
import ctypes.util
import platform
import struct

# io_uring_setup / io_uring_enter / io_uring_register. Syscalls added after the 2019 table
# unification share their numbers on every architecture, so x86_64 and aarch64 agree.
IO_URING_SYSCALLS = (425, 426, 427)

PR_SET_NO_NEW_PRIVS = 38
PR_SET_SECCOMP = 22
SECCOMP_MODE_FILTER = 2
SECCOMP_RET_ALLOW = 0x7FFF0000
SECCOMP_RET_ERRNO = 0x00050000

AUDIT_ARCH = {
    "x86_64": 0xC000003E,
    "amd64": 0xC000003E,
    "aarch64": 0xC00000B7,
    "arm64": 0xC00000B7,
}

# Classic BPF opcodes (linux/filter.h).
_BPF_LD_W_ABS = 0x20  # BPF_LD | BPF_W | BPF_ABS
_BPF_JEQ_K = 0x15  # BPF_JMP | BPF_JEQ | BPF_K
_BPF_RET_K = 0x06  # BPF_RET | BPF_K

# Offsets in struct seccomp_data { int nr; __u32 arch; ... }.
_OFFSET_NR = 0
_OFFSET_ARCH = 4


class SeccompUnavailable(OSError):
    """The filter could not be installed here (unknown architecture, no seccomp support)."""


class _SockFilter(ctypes.Structure):
    _fields_ = (
        ("code", ctypes.c_uint16),
        ("jt", ctypes.c_uint8),
        ("jf", ctypes.c_uint8),
        ("k", ctypes.c_uint32),
    )


class _SockFprog(ctypes.Structure):
    _fields_ = (
        ("len", ctypes.c_ushort),
        ("filter", ctypes.POINTER(_SockFilter)),
    )


def audit_arch(machine: str | None = None) -> int:
    """AUDIT_ARCH_* of this machine, or SeccompUnavailable when the filter does not know it."""
    name = (machine or platform.machine()).lower()
    try:
        return AUDIT_ARCH[name]
    except KeyError:
        raise SeccompUnavailable(f"no AUDIT_ARCH value known for machine {name!r}") from None


def build_program(err: int, arch: int) -> list[tuple[int, int, int, int]]:
    """The BPF program as (code, jt, jf, k) rows: io_uring syscalls get ``err``, others pass."""
    n = len(IO_URING_SYSCALLS)
    # Layout: [load arch][arch check][load nr][n compares][allow][errno].
    # Jump offsets count instructions skipped after the current one.
    program = [
        (_BPF_LD_W_ABS, 0, 0, _OFFSET_ARCH),
        # Foreign-arch syscalls are let through: this filter only models a container profile
        # for the native ABI, it is not a sandbox.
        (_BPF_JEQ_K, 0, n + 1, arch),
        (_BPF_LD_W_ABS, 0, 0, _OFFSET_NR),
    ]
    for index, number in enumerate(IO_URING_SYSCALLS):
        to_errno = n - index  # skips the remaining compares and the allow
        program.append((_BPF_JEQ_K, to_errno, 0, number))
    program.append((_BPF_RET_K, 0, 0, SECCOMP_RET_ALLOW))
    program.append((_BPF_RET_K, 0, 0, SECCOMP_RET_ERRNO | (err & 0xFFFF)))
    return program


def program_bytes(program: list[tuple[int, int, int, int]]) -> bytes:
    """Pack rows into struct sock_filter layout (handy for checking the program by eye)."""
    return b"".join(struct.pack("=HBBI", *row) for row in program)


def install_io_uring_errno_filter(err: int) -> None:
    """Make io_uring_setup/enter/register fail with ``err`` in this process and its children."""
    program = build_program(err, audit_arch())
    filters = (_SockFilter * len(program))(*(_SockFilter(*row) for row in program))
    fprog = _SockFprog(len(program), filters)

    libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
    prctl = libc.prctl
    prctl.restype = ctypes.c_int
    ulong = ctypes.c_ulong

    # Without CAP_SYS_ADMIN the kernel only accepts a filter once no_new_privs is set.
    if prctl(ulong(PR_SET_NO_NEW_PRIVS), ulong(1), ulong(0), ulong(0), ulong(0)) != 0:
        code = ctypes.get_errno()
        raise SeccompUnavailable(code, f"prctl(PR_SET_NO_NEW_PRIVS) failed: {code}")
    address = ctypes.cast(ctypes.pointer(fprog), ctypes.c_void_p).value
    if prctl(ulong(PR_SET_SECCOMP), ulong(SECCOMP_MODE_FILTER), ulong(address), ulong(0), ulong(0)):
        code = ctypes.get_errno()
        raise SeccompUnavailable(code, f"prctl(PR_SET_SECCOMP) failed: {code}")
