"""Command line entry point of uringserve (for now: print the io_uring capability report)."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from .policy import capabilities


def main(argv: Sequence[str] | None = None) -> int:
    """Print the capability report and the two verdicts; return the exit status."""
    parser = argparse.ArgumentParser(
        prog="uringserve",
        description="Report what io_uring support this process has.",
    )
    parser.parse_args(argv)
    caps = capabilities()
    print(caps.report())
    print(f"supported() = {caps.supported}")
    print(f"hotpath_supported() = {caps.hotpath_supported}")
    return 0
