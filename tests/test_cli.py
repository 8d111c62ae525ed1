"""The CLI's options reach the server: env vars, flags, and the flag winning over the env var."""

from __future__ import annotations

import pytest

from uringserve.cli import _parser, build_config, make_server
from uringserve.demo import app


def test_every_cli_option_reaches_the_server(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("URINGSERVE_MAX_BODY_SIZE", "4096")
    monkeypatch.setenv("URINGSERVE_BACKLOG", "3")
    args = _parser().parse_args(
        ["--bind", "127.0.0.1:0", "--backlog", "7", "--io-uring", "off", "--no-access-log"]
    )
    config = build_config(args)
    with make_server(app, config) as server:
        assert server.config.backlog == 7  # the flag wins over URINGSERVE_BACKLOG
        assert server.config.max_body_size == 4096  # the env var applies where no flag is given
        assert server.config.access_log is False
        assert server.backend == "epoll"
        assert server.server_address[0] == "127.0.0.1"


def test_every_flag_is_a_config_field() -> None:
    # build_config() takes each Config field from the flag of the same dest: a flag whose
    # dest is not a field would be parsed and then silently dropped.
    import dataclasses

    from uringserve.config import Config

    fields = {f.name for f in dataclasses.fields(Config)}
    dests = {a.dest for a in _parser()._actions} - {"help", "app", "bind", "capabilities"}
    assert dests <= fields
