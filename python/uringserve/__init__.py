"""uringserve: a Python HTTP server whose I/O runs on Linux io_uring, with an epoll fallback."""

from __future__ import annotations

from importlib import metadata as _metadata

from .config import Config
from .policy import (
    Capabilities,
    Unsupported,
    capabilities,
    hotpath_supported,
    resolve_policy,
    supported,
)

try:
    __version__: str = _metadata.version("uringserve")
except _metadata.PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0"

# Native names are listed here whether or not the core imported: without it, reaching one
# goes to __getattr__ below, which says why it is missing.
__all__ = [
    "Capabilities",
    "ClientDisconnected",
    "Completion",
    "Config",
    "ForkedRingError",
    "HotpathRing",
    "InvalidBufferError",
    "InvalidRequestBody",
    "Ring",
    "RingClosedError",
    "RingSetupError",
    "RingUnhealthyError",
    "Server",
    "TlsConfigError",
    "Unsupported",
    "UringError",
    "WrongThreadError",
    "__version__",
    "capabilities",
    "hotpath_supported",
    "resolve_policy",
    "supported",
]

try:
    from ._uringserve import (
        ClientDisconnected,
        Completion,
        ForkedRingError,
        HotpathRing,
        InvalidBufferError,
        InvalidRequestBody,
        Ring,
        RingClosedError,
        RingSetupError,
        RingUnhealthyError,
        TlsConfigError,
        UringError,
        WrongThreadError,
    )
except ImportError as _exc:
    # The package must stay importable without its native core: the policy layer reports why
    # (capabilities().native_error) and the epoll fallback does not need it.
    _native_import_error: str | None = f"{type(_exc).__name__}: {_exc}"

    def __getattr__(name: str) -> object:
        # Only names not bound in this module get here: the exported ones are the native ones.
        if name in __all__:
            raise ImportError(
                f"uringserve.{name} needs the native module uringserve._uringserve, "
                f"which failed to import ({_native_import_error}); "
                "run `python -m uringserve` for a full report"
            )
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
else:
    _native_import_error = None

from .server import Server  # last: the module it lives in imports from this package
