"""Connection deadlines for the epoll loop: header, keep-alive and body timeouts.

Every deadline of one kind is "now + that kind's timeout", so each kind's deadlines arrive in
the order they fall due: one insertion-ordered map per kind is already sorted, and starting,
stopping and expiring are O(1). The loop waits in select() until `next_due()`. The native
loop does the same in src/deadline.rs; HttpProtocol.timer() says which timeout applies.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable, Iterator
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)

KINDS = ("header", "keep_alive", "body")


class Deadlines(Generic[K]):
    """Timed connections of one loop, keyed by any hashable (the loop uses its conn objects)."""

    __slots__ = ("_kind_of", "_lists", "timeout")

    def __init__(self, header: float, keep_alive: float, body: float) -> None:
        # Each kind's timeout in seconds.
        self.timeout = {"header": header, "keep_alive": keep_alive, "body": body}
        self._lists: dict[str, OrderedDict[K, float]] = {k: OrderedDict() for k in KINDS}
        self._kind_of: dict[K, str] = {}

    def start(self, key: K, kind: str, now: float) -> None:
        """(Re)starts `key`'s deadline: `kind`'s timeout from `now`."""
        self.stop(key)
        self._lists[kind][key] = now + self.timeout[kind]
        self._kind_of[key] = kind

    def stop(self, key: K) -> None:
        kind = self._kind_of.pop(key, None)
        if kind is not None:
            del self._lists[kind][key]

    def apply(self, key: K, timer: str, now: float) -> None:
        """Follows HttpProtocol.timer()/flushed(): "keep", "stop", or a kind to start."""
        if timer == "stop":
            self.stop(key)
        elif timer != "keep":
            self.start(key, timer, now)

    def next_due(self) -> float | None:
        """When the earliest deadline falls due (time.monotonic() seconds)."""
        heads = [next(iter(d.values())) for d in self._lists.values() if d]
        return min(heads) if heads else None

    def pop_expired(self, now: float) -> Iterator[tuple[K, str]]:
        """Removes and yields every deadline that has passed at `now`."""
        for kind, pending in self._lists.items():
            while pending:
                key, due = next(iter(pending.items()))
                if due > now:
                    break
                del pending[key]
                del self._kind_of[key]
                yield key, kind
