"""Ids of requests that ended here, newest kept: a message that arrives after its request's end (the
order of messages from different senders is not guaranteed) is recognised and dropped."""
from __future__ import annotations

from collections import OrderedDict

KEPT = 10000  # far more than can be in flight: a late message trails its end by milliseconds


class Tombstones:
    def __init__(self, kept: int = KEPT):
        self.kept = kept
        self._ids: OrderedDict[str, None] = OrderedDict()

    def add(self, request_id: str) -> None:
        self._ids[request_id] = None
        while len(self._ids) > self.kept:
            self._ids.popitem(last=False)

    def __contains__(self, request_id: object) -> bool:
        return request_id in self._ids
