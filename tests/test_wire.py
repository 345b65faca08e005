"""The ZeroMQ edge: a SenderThread keeps each peer's messages in the order given and holds a fenced
message (and everything after it) until its fence completes."""
import threading

import pytest
import zmq

from pdpipe.messages import LayersReady, decode
from pdpipe.wire import RunPaths, SenderThread


@pytest.fixture
def wired(tmp_path):
    """(the transfer's inbox socket, a SenderThread), torn down after the test."""
    ctx = zmq.Context()
    paths = RunPaths(tmp_path)
    inbox = ctx.socket(zmq.PULL)
    inbox.bind(paths.inbox("transfer"))
    sender = SenderThread(ctx, paths)
    yield inbox, sender
    sender.close()
    inbox.close()
    ctx.term()


class Gate:
    """A fence that completes when the test opens it."""

    def __init__(self):
        self.opened = threading.Event()
        self.waited = threading.Event()

    def synchronize(self):
        self.waited.set()
        self.opened.wait()


def test_sender_thread_holds_messages_behind_a_fence_and_keeps_order(wired):
    inbox, sender = wired
    gate = Gate()
    sender.send("transfer", LayersReady(request_ids=["a"], layer=0))
    sender.send("transfer", LayersReady(request_ids=["a"], layer=1), after=gate)
    sender.send("transfer", LayersReady(request_ids=["a"], layer=2))
    assert decode(inbox.recv()).layer == 0
    assert gate.waited.wait(10)
    assert inbox.poll(200) == 0  # layer 1 waits for its fence, and layer 2 behind it
    gate.opened.set()
    assert [decode(inbox.recv()).layer for _ in range(2)] == [1, 2]


def test_a_failing_fence_still_lets_the_message_go(wired):
    class Broken:
        def synchronize(self):
            raise RuntimeError("device lost")

    inbox, sender = wired
    sender.send("transfer", LayersReady(request_ids=["a"], layer=3), after=Broken())
    assert inbox.poll(10_000) and decode(inbox.recv()).layer == 3
