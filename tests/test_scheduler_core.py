"""The scheduler's routing on its own, with a recording `send`: the Reserve names the prefill engine,
decode passes the Prefill on (the scheduler sends none), and every way a reservation can go leaves
the prefill engine's load and blocks accounted for."""
from pdpipe.config import DeadlineConfig
from pdpipe.messages import (
    AbortRequest,
    AbortTransfer,
    Free,
    NewRequest,
    Prefill,
    Reserve,
    Reserved,
    SamplingParams,
    StateEvent,
)
from pdpipe.scheduler.core import SchedulerCore

ROLES = {"prefill-0": "prefill", "prefill-1": "prefill", "decode-0": "decode", "decode-1": "decode"}


def make(clock=lambda: 100.0):
    sent = []
    core = SchedulerCore(ROLES, DeadlineConfig(), lambda dest, msg: sent.append((dest, msg)), clock)
    return core, sent


def new(core, rid="r", n=10):
    core.handle(NewRequest(request_id=rid, prompt_token_ids=list(range(n)), params=SamplingParams(), arrival=99.0))


def test_reserve_names_the_prefill_and_the_scheduler_sends_no_prefill():
    core, sent = make()
    new(core, "a", 30)
    new(core, "b", 10)
    reserves = [(dest, m) for dest, m in sent if isinstance(m, Reserve)]
    assert len(reserves) == 2
    # the prefill is picked at dispatch, counting the prompt tokens it already has: a and b go apart
    assert reserves[0][1].prefill_instance != reserves[1][1].prefill_instance
    assert core.outstanding_tokens[reserves[0][1].prefill_instance] == 30
    dest, reserve = reserves[0]
    core.handle(Reserved(request_id="a", instance=dest, block_ids=[1, 2], free_blocks=5,
                         prefill_instance=reserve.prefill_instance))
    assert not [m for _, m in sent if isinstance(m, Prefill)]
    rec = core.live["a"]
    assert (rec.state, rec.decode, rec.prefill) == ("RESERVED", dest, reserve.prefill_instance)


def test_a_refused_reservation_gives_back_the_prefill_load_and_tries_the_other_decode():
    core, sent = make()
    new(core, "a", 30)
    first = [(d, m) for d, m in sent if isinstance(m, Reserve)][0]
    core.handle(Reserved(request_id="a", instance=first[0], block_ids=None, free_blocks=0))
    second = [(d, m) for d, m in sent if isinstance(m, Reserve)][1]
    assert second[0] != first[0]
    assert sum(core.outstanding_tokens.values()) == 30  # counted once, for the new plan only
    assert core.live["a"].prefill == second[1].prefill_instance


def test_a_request_ended_while_reserving_frees_the_planned_prefill_and_the_late_blocks():
    core, sent = make()
    new(core, "a", 30)
    dest, reserve = [(d, m) for d, m in sent if isinstance(m, Reserve)][0]
    core.handle(AbortRequest(request_id="a", reason="client gone"))
    assert ("a" not in core.live) and sum(core.outstanding_tokens.values()) == 0
    assert [d for d, m in sent if isinstance(m, Free)] == [reserve.prefill_instance]
    sent.clear()
    core.handle(Reserved(request_id="a", instance=dest, block_ids=[4], free_blocks=3,
                         prefill_instance=reserve.prefill_instance))  # decode had already passed it on
    assert [(d, type(m)) for d, m in sent] == [("transfer", AbortTransfer), (reserve.prefill_instance, Free)]


def test_news_that_cross_do_not_move_a_request_backwards():
    core, sent = make()
    new(core, "a")
    dest, reserve = [(d, m) for d, m in sent if isinstance(m, Reserve)][0]
    core.handle(StateEvent(request_id="a", state="PREFILLING", instance=reserve.prefill_instance, time=100.2))
    core.handle(Reserved(request_id="a", instance=dest, block_ids=[1], free_blocks=5,
                         prefill_instance=reserve.prefill_instance))  # arrives second, happened first
    rec = core.live["a"]
    assert rec.state == "PREFILLING"
    assert [s for _, s, _, _ in rec.events] == ["QUEUED", "RESERVED", "PREFILLING"]
