"""wsgi.file_wrapper: the FileWrapper class itself, and files served through it on both backends."""

from __future__ import annotations

import hashlib
import io
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, BinaryIO

import pytest

from server_util import Reader, ServerThread, request, wait_until
from uringserve._uringserve import FileWrapper

StartResponse = Callable[..., Any]
Environ = dict[str, Any]

MIB = 1024 * 1024


class Recorder(io.BytesIO):
    """A BytesIO that remembers the sizes it was asked to read."""

    def __init__(self, data: bytes) -> None:
        super().__init__(data)
        self.sizes: list[int] = []

    def read(self, size: int | None = -1, /) -> bytes:
        self.sizes.append(-1 if size is None else size)
        return super().read(size)


class NoClose:
    """A file-like object with read() and nothing else."""

    def __init__(self, data: bytes) -> None:
        self.stream = io.BytesIO(data)

    def read(self, size: int) -> bytes:
        return self.stream.read(size)


def test_iterates_in_blocks_until_empty() -> None:
    f = Recorder(b"0123456789")
    wrapper = FileWrapper(f, 4)
    assert wrapper.filelike is f
    assert wrapper.blksize == 4
    assert iter(wrapper) is wrapper
    assert list(wrapper) == [b"0123", b"4567", b"89"]
    # Every read asks for blksize, and iteration stops at the first empty read.
    assert f.sizes == [4, 4, 4, 4]
    assert list(wrapper) == []


def test_default_blksize_is_8192() -> None:
    wrapper = FileWrapper(io.BytesIO(b"x" * 20000))
    assert wrapper.blksize == 8192
    assert [len(b) for b in wrapper] == [8192, 8192, 20000 - 2 * 8192]


def test_close_closes_the_file() -> None:
    f = io.BytesIO(b"data")
    FileWrapper(f).close()
    assert f.closed


def test_close_without_close_method_is_a_no_op() -> None:
    wrapper = FileWrapper(NoClose(b"abc"), 2)
    wrapper.close()
    assert list(wrapper) == [b"ab", b"c"]


def test_read_errors_propagate() -> None:
    class Broken:
        def read(self, size: int) -> bytes:
            raise OSError("disk on fire")

    with pytest.raises(OSError, match="disk on fire"):
        next(iter(FileWrapper(Broken())))


def test_zero_blksize_rejected() -> None:
    with pytest.raises(ValueError, match="blksize"):
        FileWrapper(io.BytesIO(b""), 0)


@pytest.fixture
def big_file(tmp_path: Path) -> tuple[Path, bytes]:
    # Random bytes, so a dropped, repeated or reordered block cannot go unnoticed.
    data = os.urandom(MIB)
    path = tmp_path / "big.bin"
    path.write_bytes(data)
    return path, data


def file_app(
    path: Path, opened: list[BinaryIO]
) -> Callable[[Environ, StartResponse], Iterable[bytes]]:
    def app(environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
        # Left open on purpose: closing it is the server's job, and what the tests check.
        f = open(path, "rb")
        opened.append(f)
        start_response("200 OK", [("Content-Type", "application/octet-stream")])
        wrapper: Iterable[bytes] = environ["wsgi.file_wrapper"](f, 4096)
        return wrapper

    return app


@pytest.mark.parametrize("version", ["HTTP/1.1", "HTTP/1.0"])
def test_serves_1mib_file_intact_and_closes_it(
    serve: Callable[..., ServerThread], big_file: tuple[Path, bytes], version: str
) -> None:
    path, data = big_file
    opened: list[BinaryIO] = []
    st = serve(file_app(path, opened))
    with st.connect(timeout=10) as s:
        resp, _ = request(s, f"GET /f {version}\r\nHost: x\r\n\r\n".encode(), timeout=20)
        assert resp.status == 200
        assert len(resp.body) == len(data)
        assert hashlib.sha256(resp.body).digest() == hashlib.sha256(data).digest()
        # Its length is unknown up front: chunked on 1.1, close-delimited on 1.0.
        assert resp.framing == ("chunked" if version == "HTTP/1.1" else "close")
        if version == "HTTP/1.1":
            s.sendall(b"GET /again HTTP/1.1\r\nHost: x\r\n\r\n")
            assert Reader(s, 20).read_response().body == data
    assert len(opened) == (2 if version == "HTTP/1.1" else 1)
    assert wait_until(lambda: all(f.closed for f in opened)), "the server did not close the file"


def test_head_closes_the_file(
    serve: Callable[..., ServerThread], big_file: tuple[Path, bytes]
) -> None:
    path, _ = big_file
    opened: list[BinaryIO] = []
    st = serve(file_app(path, opened))
    with st.connect() as s:
        resp, _ = request(s, b"HEAD /f HTTP/1.1\r\nHost: x\r\n\r\n", head=True)
        assert resp.status == 200
    assert len(opened) == 1
    assert wait_until(lambda: opened[0].closed), "the server did not close the file"
