"""``python -m uringserve``: delegates to :func:`uringserve.cli.main`."""

from uringserve.cli import main

raise SystemExit(main())
