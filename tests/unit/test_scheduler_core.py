"""The scheduler's logic on its own, with a recording `send`: the Reserve and the Prefill leave
together, the admission queue and its ledger of decode room, conditional disaggregation and whole
requests on a prefill instance; every way a reservation can go leaves the load and the room
accounted for."""
import pytest

from pdpipe.config import DeadlineConfig, RoutingConfig
from pdpipe.messages import (
    AbortRequest,
    AbortTransfer,
    Free,
    InstanceStats,
    NewRequest,
    Prefill,
    Reserve,
    Reserved,
    SamplingParams,
    StateEvent,
)
from pdpipe.scheduler.core import SchedulerCore

ROLES = {"prefill-0": "prefill", "prefill-1": "prefill", "decode-0": "decode", "decode-1": "decode"}


ALWAYS = RoutingConfig(disaggregation="always")


def make(clock=lambda: 100.0, roles=ROLES, routing=ALWAYS, num_blocks=100, max_num_seqs=8, report_all=True,
         **stats):
    """A core over `roles`, each of which has reported its room (unless `report_all` is off)."""
    sent = []
    core = SchedulerCore(roles, DeadlineConfig(), lambda dest, msg: sent.append((dest, msg)), clock,
                         routing=routing)
    for name, role in roles.items() if report_all else ():
        report(core, name, role, num_blocks=num_blocks, max_num_seqs=max_num_seqs, **stats)
    return core, sent


def report(core, name, role="decode", **fields):
    fields = {"num_blocks": 100, "block_size": 16, **fields}
    core.handle(InstanceStats(instance=name, role=role, time=100.0, **fields))


def new(core, rid="r", n=10, max_tokens=16):
    core.handle(NewRequest(request_id=rid, prompt_token_ids=list(range(n)),
                           params=SamplingParams(max_tokens=max_tokens), arrival=99.0))


def dispatched(sent, kind):
    return [(dest, m) for dest, m in sent if isinstance(m, kind)]


def test_the_reserve_and_the_prefill_leave_together():
    core, sent = make()
    new(core, "a", 30)
    new(core, "b", 10)
    reserves, prefills = dispatched(sent, Reserve), dispatched(sent, Prefill)
    assert [m.request_id for _, m in reserves] == [m.request_id for _, m in prefills] == ["a", "b"]
    # the prefill is picked at dispatch, counting the prompt tokens it already has: a and b go apart
    assert prefills[0][0] != prefills[1][0] and core.outstanding_tokens[prefills[0][0]] == 30
    assert prefills[0][1].decode_instance == reserves[0][0]
    assert reserves[0][1].transfer == "transfer"  # decode tells it where the prompt's KV goes
    dest = reserves[0][0]
    core.handle(Reserved(request_id="a", instance=dest, block_ids=[1, 2], free_blocks=5))
    rec = core.live["a"]
    assert (rec.state, rec.decode, rec.prefill) == ("RESERVED", dest, prefills[0][0])


def test_a_refused_reservation_keeps_its_prefill_and_asks_the_other_decode():
    core, sent = make()
    new(core, "a", 30)
    first = dispatched(sent, Reserve)[0]
    core.handle(Reserved(request_id="a", instance=first[0], block_ids=None, free_blocks=0))
    second = dispatched(sent, Reserve)[1]
    assert second[0] != first[0]
    assert len(dispatched(sent, Prefill)) == 1  # the prompt is computed once, whichever decode takes it
    assert sum(core.outstanding_tokens.values()) == 30


def test_a_request_ended_while_reserving_frees_the_prefill_and_the_transfer_frees_decode():
    core, sent = make()
    new(core, "a", 30)
    (dest, _), (prefill, _) = dispatched(sent, Reserve)[0], dispatched(sent, Prefill)[0]
    sent.clear()
    core.handle(AbortRequest(request_id="a", reason="client gone"))
    assert ("a" not in core.live) and sum(core.outstanding_tokens.values()) == 0
    assert [(d, type(m)) for d, m in sent if not isinstance(m, StateEvent)] == [(prefill, Free),
                                                                              ("transfer", AbortTransfer)]
    assert [m.decode_instance for _, m in dispatched(sent, AbortTransfer)] == [dest]
    sent.clear()
    core.handle(Reserved(request_id="a", instance=dest, block_ids=[4], free_blocks=3))  # late: nothing more
    assert sent == []


def test_news_that_cross_do_not_move_a_request_backwards():
    core, sent = make()
    new(core, "a")
    (dest, _), (prefill, _) = dispatched(sent, Reserve)[0], dispatched(sent, Prefill)[0]
    core.handle(StateEvent(request_id="a", state="PREFILLING", instance=prefill, time=100.2))
    core.handle(Reserved(request_id="a", instance=dest, block_ids=[1], free_blocks=5))  # arrives second, happened first
    rec = core.live["a"]
    assert rec.state == "PREFILLING"
    assert [s for _, s, _, _ in rec.events] == ["QUEUED", "QUEUED", "RESERVED", "PREFILLING"]


# ---- the admission queue -------------------------------------------------------------------------
PD1 = {"prefill-0": "prefill", "decode-0": "decode"}


def reserves(sent):
    return [m.request_id for _, m in sent if isinstance(m, Reserve)]


def local_prefills(sent):
    """Requests whose prompt the scheduler sent to their decode instance to compute."""
    return [m.request_id for d, m in sent if isinstance(m, Prefill) and d.startswith("decode")]


def finish_on_decode(core, rid, decode="decode-0"):
    core.handle(StateEvent(request_id=rid, state="FINISHED", instance=decode, time=101.0, detail="length"))


def test_queued_requests_leave_in_arrival_order_as_room_frees_and_never_on_a_timer():
    now = [100.0]
    # 4 blocks of 16 tokens: room for one 40-token prompt with its 16 output tokens at a time
    core, sent = make(clock=lambda: now[0], roles=PD1, num_blocks=4)
    for rid in "abc":
        new(core, rid, 40)
    assert reserves(sent) == ["a"] and list(core.queue) == ["b", "c"]
    for _ in range(50):  # time passes: nothing is re-sent while the room is taken
        now[0] += 0.1
        core.tick()
    assert reserves(sent) == ["a"]
    core.handle(Reserved(request_id="a", instance="decode-0", block_ids=[0, 1, 2, 3], free_blocks=0))
    finish_on_decode(core, "a")  # decode freed a's blocks: b (not c) goes
    assert reserves(sent) == ["a", "b"] and list(core.queue) == ["c"]
    snap = core.snapshot()["admission"]
    assert snap["queued"] == 1 and snap["oldest_wait_s"] > 4.9
    assert snap["decode_room"]["decode-0"]["committed_blocks"] == 4


def test_a_reservation_holds_room_for_the_output_and_respects_max_num_seqs():
    core, sent = make(roles=PD1, max_num_seqs=2)
    new(core, "a", 10, max_tokens=100)
    new(core, "b", 10, max_tokens=5)
    new(core, "c", 10, max_tokens=5)
    held = {m.request_id: m.num_tokens for _, m in sent if isinstance(m, Reserve)}
    assert held == {"a": 110, "b": 15} and list(core.queue) == ["c"]  # two sequences at most
    half, sent2 = make(roles=PD1, routing=RoutingConfig(disaggregation="always", reserve_output_share=0.5))
    new(half, "a", 10, max_tokens=100)
    assert [m.num_tokens for _, m in sent2 if isinstance(m, Reserve)] == [60]
    capped, sent3 = make(roles=PD1, routing=RoutingConfig(disaggregation="always", reserve_output_max=50))
    new(capped, "unset", 10, max_tokens=5000)  # a client that left max_tokens unset: the whole context
    assert [m.num_tokens for _, m in sent3 if isinstance(m, Reserve)] == [60]


def test_an_aborted_request_frees_its_room_only_when_decode_says_freed():
    from pdpipe.messages import Freed

    core, sent = make(roles=PD1, num_blocks=4)
    new(core, "a", 40)
    new(core, "b", 40)
    core.handle(Reserved(request_id="a", instance="decode-0", block_ids=[0, 1, 2, 3], free_blocks=0))
    core.handle(AbortRequest(request_id="a", reason="client gone"))
    assert [d for d, m in sent if isinstance(m, AbortTransfer)] == ["transfer"]
    assert reserves(sent) == ["a"]  # decode frees a's blocks only after the transfer stopped
    core.handle(Freed(request_id="a", instance="decode-0"))
    assert reserves(sent) == ["a", "b"]


def test_a_refused_reservation_keeps_its_place_and_waits_for_room_to_be_released():
    core, sent = make(roles=PD1)
    new(core, "a", 40)
    new(core, "b", 40)
    new(core, "c", 40)
    core.handle(Reserved(request_id="a", instance="decode-0", block_ids=[0, 1, 2, 3], free_blocks=9))
    # decode had less room than the ledger counted (it preempted, say): b goes back before c
    core.handle(Reserved(request_id="b", instance="decode-0", block_ids=None, free_blocks=1))
    core.handle(Reserved(request_id="c", instance="decode-0", block_ids=None, free_blocks=1))
    assert list(core.queue) == ["b", "c"] and core.ledger.room("decode-0").blocked
    assert core.outstanding_tokens["prefill-0"] == 120  # every prompt is computed meanwhile
    assert len(dispatched(sent, Prefill)) == 3
    finish_on_decode(core, "a")
    assert reserves(sent)[-2:] == ["b", "c"]


def test_a_refusing_decode_instance_is_asked_again_only_once_it_reports_the_room():
    core, sent = make(roles=PD1)
    new(core, "a", 40)  # 56 tokens: 4 blocks
    core.handle(Reserved(request_id="a", instance="decode-0", block_ids=None, free_blocks=0))
    assert reserves(sent) == ["a"] and list(core.queue) == ["a"]
    for free in (0, 2, 3):  # decode's stats, a few times a second: not yet the 4 blocks a needs
        report(core, "decode-0", max_num_seqs=8, free_blocks=free)
    assert reserves(sent) == ["a"]
    report(core, "decode-0", max_num_seqs=8, free_blocks=4)
    assert reserves(sent) == ["a", "a"]


def test_a_request_no_decode_instance_can_ever_hold_fails_instead_of_blocking_the_queue():
    from pdpipe.messages import EngineOutput

    core, sent = make(roles=PD1, num_blocks=4)
    new(core, "huge", 100)
    new(core, "small", 10)
    errors = [m for d, m in sent if isinstance(m, EngineOutput)]
    assert errors and errors[0].request_id == "huge" and "needs room for 116 tokens" in errors[0].error
    assert reserves(sent) == ["small"]


def test_a_data_parallel_decode_counts_room_in_one_rank_pool():
    """A decode instance of data-parallel ranks reports 8 blocks over two pools of 4: a request needing 5
    is never reserved there (no rank's pool holds it), and one it refused is asked again only once one
    pool has the room (4 blocks free over two pools, 2 and 2, are not enough for a request of 3)."""
    core, sent = make(roles=PD1, num_blocks=8, pool_blocks=4, pool_free_blocks=4)
    assert core.ledger.never_fits(["decode-0"], 76) and not core.ledger.never_fits(["decode-0"], 64)
    new(core, "five", 60)  # 76 tokens: 5 blocks
    assert "five" not in reserves(sent)
    new(core, "three", 30)  # 46 tokens: 3 blocks
    core.handle(Reserved(request_id="three", instance="decode-0", block_ids=None, free_blocks=4))
    report(core, "decode-0", max_num_seqs=8, num_blocks=8, free_blocks=4, pool_blocks=4, pool_free_blocks=2)
    assert reserves(sent) == ["three"]
    report(core, "decode-0", max_num_seqs=8, num_blocks=8, free_blocks=4, pool_blocks=4, pool_free_blocks=3)
    assert reserves(sent) == ["three", "three"]


# ---- conditional disaggregation ------------------------------------------------------------------
COND = RoutingConfig(disaggregation="conditional", local_prompt_tokens=32, local_step_tokens=256,
                     local_on_backlog=True)


def test_a_short_prompt_is_computed_on_its_decode_instance():
    core, sent = make(roles=PD1, routing=COND)
    new(core, "short", 20)
    new(core, "long", 200)
    assert local_prefills(sent) == ["short"] and reserves(sent) == ["long"]
    assert core.decisions == {"local": 1, "remote": 1}
    detail = [d for _, s, _, d in core.live["short"].events if s == "QUEUED"][-1]
    assert "prefill on decode-0 itself" in detail and "20 tokens <= 32" in detail
    # the local prompt holds its room on decode until decode finishes it, counted once
    assert core.ledger.commitments["short"] == ("decode-0", 36) and ledger_matches(core)
    core.handle(StateEvent(request_id="short", state="FINISHED", instance="decode-0", time=101.0))
    assert "short" not in core.ledger.commitments


def test_a_long_prompt_goes_local_when_the_prefill_queue_would_take_longer():
    core, sent = make(roles=PD1, routing=COND, num_blocks=1000)
    report(core, "prefill-0", role="prefill", prefill_tokens_per_s=100_000.0)
    report(core, "decode-0", num_blocks=1000, max_num_seqs=8, step_seconds=0.01)  # 256 tokens a 10 ms step
    new(core, "a", 1000)  # prefill idle: no wait there, 39 ms here
    assert reserves(sent) == ["a"]
    core.outstanding_tokens["prefill-0"] += 2_000  # 20 ms of backlog there (with a's 10 ms): still remote
    new(core, "b", 1000)
    assert reserves(sent) == ["a", "b"]
    core.outstanding_tokens["prefill-0"] += 3_000  # now 70 ms of backlog: computed here in 39 ms
    new(core, "c", 1000)
    assert reserves(sent) == ["a", "b"] and local_prefills(sent) == ["c"]
    assert "prefill-0's queue: 70 ms; here: 39 ms" in [d for _, s, _, d in core.live["c"].events if s == "QUEUED"][-1]
    # the next long prompt queues behind c on decode: 78 ms here against 70 there, so remote
    new(core, "d", 1000)
    assert reserves(sent) == ["a", "b", "d"]


def test_an_idle_or_unmeasured_prefill_instance_takes_long_prompts():
    core, sent = make(roles=PD1, routing=COND)
    report(core, "decode-0", max_num_seqs=8, step_seconds=0.01)
    new(core, "a", 500)  # prefill has no rate yet
    assert reserves(sent) == ["a"]
    quiet, sent2 = make(roles=PD1, routing=RoutingConfig(local_prompt_tokens=32, local_on_backlog=False))
    report(quiet, "prefill-0", role="prefill", prefill_tokens_per_s=10.0)  # hopelessly slow, but the rule is off
    report(quiet, "decode-0", max_num_seqs=8, step_seconds=0.01)
    quiet.outstanding_tokens["prefill-0"] += 5_000
    new(quiet, "b", 500)
    assert reserves(sent2) == ["b"]


def test_always_disaggregated_sends_even_short_prompts_to_prefill():
    core, sent = make(roles=PD1)
    new(core, "short", 3)
    assert reserves(sent) == ["short"] and not local_prefills(sent)


# ---- whole requests on a prefill instance when decode is busy -----------------------------------
BUSY = RoutingConfig(disaggregation="always", decode_busy_ms=15)


def test_requests_run_whole_on_prefill_while_decode_steps_are_slow():
    core, sent = make(roles=PD1, routing=BUSY)
    report(core, "decode-0", max_num_seqs=8, step_seconds=0.010)
    new(core, "calm", 40)
    report(core, "decode-0", max_num_seqs=8, step_seconds=0.020)  # 20 ms steps: over the 15 ms asked
    new(core, "busy", 40)
    assert reserves(sent) == ["calm"]
    whole = [(d, m) for d, m in sent if isinstance(m, Prefill) and m.request_id == "busy"]
    assert [(d, m.decode_instance) for d, m in whole] == [("prefill-0", "")]
    assert core.decisions == {"remote": 1, "whole": 1} and core.ledger.commitments["busy"] == ("prefill-0", 56)
    assert "decode busy" in [d for _, s, _, d in core.live["busy"].events if s == "QUEUED"][-1]
    core.handle(StateEvent(request_id="busy", state="FINISHED", instance="prefill-0", time=101.0))
    assert "busy" not in core.ledger.commitments


def test_a_request_no_decode_has_room_for_runs_whole_on_prefill_and_a_refused_one_waits_for_decode():
    core, sent = make(roles=PD1, routing=BUSY, num_blocks=4)
    report(core, "prefill-0", role="prefill", num_blocks=100, max_num_seqs=8)
    new(core, "a", 40)  # fills decode-0's 4 blocks
    new(core, "b", 40)  # no room on decode: whole on prefill
    assert reserves(sent) == ["a"] and core.ledger.commitments["b"][0] == "prefill-0"
    core.handle(Reserved(request_id="a", instance="decode-0", block_ids=None, free_blocks=0))
    # a's prompt is already on prefill-0 for decode: it waits for decode room, never runs whole
    assert list(core.queue) == ["a"] and core.decisions["whole"] == 1


def test_without_decode_busy_ms_prefill_instances_never_take_whole_requests():
    core, sent = make(roles=PD1, num_blocks=4)
    report(core, "decode-0", num_blocks=4, max_num_seqs=8, step_seconds=1.0)
    new(core, "a", 40)
    new(core, "b", 40)
    assert reserves(sent) == ["a"] and list(core.queue) == ["b"] and "whole" not in core.decisions


def ledger_matches(core) -> bool:
    """Each instance's committed room is exactly the sum of its requests' commitments: their blocks beyond
    their hashed prompt blocks, and what those cost (whole rooms when no prompt is hashed)."""
    ledger = core.ledger
    for name, room in ledger.rooms.items():
        mine = [rid for rid, (d, _) in ledger.commitments.items() if d == name]
        owners = sum(len(ledger.prompts[rid][0]) - ledger.prompts[rid][1] for rid in mine)
        if (room.blocks != room.hashed + sum(ledger._unhashed(rid) for rid in mine) or room.seqs != len(mine)
                or sum(e[0] for e in room.held.values()) != owners
                or room.hashed != sum(e[0] + e[2] for e in room.held.values())):
            return False
    return True


# ---- ends, losses and late news ----------------------------------------------------------------
def test_a_stop_string_end_keeps_the_room_until_decode_says_freed_and_counts_it_once():
    from pdpipe.messages import Freed

    for routing, length in ((ALWAYS, 40), (COND, 10)):  # remote, then computed on decode
        core, sent = make(roles=PD1, routing=routing)
        new(core, "a", length)
        if routing is ALWAYS:
            core.handle(Reserved(request_id="a", instance="decode-0", block_ids=[0, 1, 2, 3], free_blocks=9))
        core.handle(AbortRequest(request_id="a", reason="stop"))
        assert core.recent["a"].state == "FINISHED" and "a" in core.ledger.commitments
        core.handle(Freed(request_id="a", instance="prefill-0"))  # another instance's word does not count
        assert "a" in core.ledger.commitments
        core.handle(Freed(request_id="a", instance="decode-0"))
        core.handle(Freed(request_id="a", instance="decode-0"))  # twice: released once
        assert not core.ledger.commitments and ledger_matches(core)
        assert core.ledger.room("decode-0").seqs == 0


def test_a_lost_decode_fails_its_requests_forgets_its_room_and_the_queue_moves_on():
    roles = {"prefill-0": "prefill", "decode-0": "decode", "decode-1": "decode"}
    core, sent = make(roles=roles, num_blocks=4)
    for rid in "abc":
        new(core, rid, 40)  # a on one decode, b on the other, c waits
    assert len(reserves(sent)) == 2 and list(core.queue) == ["c"]
    on_0 = next(m.request_id for d, m in sent if isinstance(m, Reserve) and d == "decode-0")
    core.update_instances({"prefill-0": ("prefill", ""), "decode-1": ("decode", "")})
    assert core.recent[on_0].state == "FAILED" and "decode-0" not in core.ledger.rooms
    assert list(core.queue) == ["c"]  # decode-1 is still full
    other = next(r for r in "ab" if r != on_0)
    core.handle(Reserved(request_id=other, instance="decode-1", block_ids=[0, 1, 2, 3], free_blocks=0))
    finish_on_decode(core, other, "decode-1")
    assert reserves(sent)[-1] == "c" and ledger_matches(core)


def test_losing_the_prefill_machine_frees_decode_reservations_directly():
    core = SchedulerCore({"prefill-0": "prefill", "decode-0": "decode"}, DeadlineConfig(),
                         lambda d, m: sent.append((d, m)), lambda: 100.0, routing=ALWAYS,
                         machines={"prefill-0": "m1", "decode-0": "m2"})
    sent = []
    report(core, "decode-0", max_num_seqs=8)
    new(core, "a", 40)
    assert [m.transfer for _, m in dispatched(sent, Reserve)] == ["transfer-m1"]
    core.handle(Reserved(request_id="a", instance="decode-0", block_ids=[0, 1, 2, 3], free_blocks=0))
    sent.clear()
    core.update_instances({"decode-0": ("decode", "m2")})  # machine m1 (prefill and its transfer) gone
    assert ("decode-0", "a") in [(d, m.request_id) for d, m in sent if isinstance(m, Free)]
    from pdpipe.messages import Freed

    core.handle(Freed(request_id="a", instance="decode-0"))
    assert not core.ledger.commitments and ledger_matches(core)


def test_a_dead_decode_fails_its_requests_leaves_routing_and_rejoins():
    from pdpipe.messages import EngineOutput, ProcessDown, ProcessUp

    core, sent = make()
    for rid in "abcd":
        new(core, rid)
    on = {m.request_id: dest for dest, m in dispatched(sent, Reserve)}
    gone = [rid for rid, d in on.items() if d == "decode-0"]
    assert gone and len(gone) < 4
    sent.clear()
    core.handle(ProcessDown(name="decode-0", role="decode", detail="signal 9"))
    failed = {m.request_id: m.error for _, m in dispatched(sent, EngineOutput)}
    assert sorted(failed) == sorted(gone) and all("decode-0 died: signal 9" in e for e in failed.values())
    assert set(core.live) == set("abcd") - set(gone)
    # its prefill holders free; the transfer drops the jobs (then frees the blocks of the dead decode)
    assert {m.request_id for _, m in dispatched(sent, Free)} == set(gone)
    assert {m.request_id for _, m in dispatched(sent, AbortTransfer)} == set(gone)
    report(core, "decode-0")  # its last words are ignored
    sent.clear()
    for rid in "efg":
        new(core, rid)
    assert {dest for dest, _ in dispatched(sent, Reserve)} == {"decode-1"}
    assert core.snapshot()["down"] == {"decode-0": "decode"}
    core.handle(ProcessUp(name="decode-0", role="decode"))
    report(core, "decode-0")
    sent.clear()
    for rid in "hijk":
        new(core, rid)
    assert "decode-0" in {dest for dest, _ in dispatched(sent, Reserve)} and not core.snapshot()["down"]


def test_a_dead_transfer_fails_moves_in_flight_frees_decode_directly_and_prompts_go_local():
    from pdpipe.messages import EngineOutput, ProcessDown, ProcessUp

    core, sent = make(routing=RoutingConfig(disaggregation="conditional", local_prompt_tokens=4))
    new(core, "moving", 10)
    new(core, "decoding", 10)
    (dest, _), (dest2, _) = dispatched(sent, Reserve)
    core.handle(Reserved(request_id="decoding", instance=dest2, block_ids=[1], free_blocks=50))
    core.handle(StateEvent(request_id="decoding", state="DECODING", instance=dest2, time=100.0))
    sent.clear()
    core.handle(ProcessDown(name="transfer", role="transfer", detail="signal 9"))
    assert [m.request_id for _, m in dispatched(sent, EngineOutput)] == ["moving"]
    assert (dest, "moving") in [(d, m.request_id) for d, m in dispatched(sent, Free)]  # decode frees itself
    assert "decoding" in core.live
    sent.clear()
    new(core, "meanwhile", 10)  # long enough to go remote, but nothing would move its KV
    assert dispatched(sent, Reserve) == [] and dispatched(sent, Prefill)[0][0].startswith("decode")
    core.handle(ProcessUp(name="transfer", role="transfer"))
    sent.clear()
    new(core, "after", 10)
    assert dispatched(sent, Reserve) and dispatched(sent, Prefill)[0][0].startswith("prefill")


def test_a_dead_front_end_aborts_every_request():
    from pdpipe.messages import ProcessDown

    core, sent = make()
    for rid in "abc":
        new(core, rid)
    core.handle(ProcessDown(name="api", role="api", detail="signal 9"))
    assert not core.live and core.ended["ABORTED"] == 3


def test_a_dead_prefill_fails_only_requests_whose_prompt_it_still_owed():
    from pdpipe.messages import EngineOutput, ProcessDown

    core, sent = make(roles={"prefill-0": "prefill", "decode-0": "decode"})
    new(core, "decoding")
    new(core, "prefilling")
    core.handle(Reserved(request_id="decoding", instance="decode-0", block_ids=[1], free_blocks=50))
    core.handle(StateEvent(request_id="decoding", state="DECODING", instance="decode-0", time=100.0))
    sent.clear()
    core.handle(ProcessDown(name="prefill-0", role="prefill", detail="signal 9"))
    assert [m.request_id for _, m in dispatched(sent, EngineOutput)] == ["prefilling"]
    assert "decoding" in core.live


def test_a_silent_engine_is_routed_around_and_rejoins_when_it_reports_again():
    from pdpipe.messages import EngineOutput, Heartbeat

    now = [100.0]
    core, sent = make(clock=lambda: now[0])
    for name, role in ROLES.items():  # only a process that beats is watched
        core.handle(Heartbeat(instance=name, role=role))
    for rid in "abcd":
        new(core, rid)
    on = {m.request_id: dest for dest, m in dispatched(sent, Reserve)}
    now[0] += 4.0
    for name, role in ROLES.items():
        if name != "decode-0":
            core.handle(Heartbeat(instance=name, role=role))
    core.tick()
    assert not dispatched(sent, EngineOutput)  # 4 s of silence is within the heartbeat deadline (5 s)
    now[0] += 2.0
    for name, role in ROLES.items():
        if name != "decode-0":
            report(core, name, role)  # stats count as beats too
    failed = tick_and_fail(core, sent)
    assert set(failed) == {r for r, d in on.items() if d == "decode-0"}
    assert all("decode-0 stopped reporting" in e for e in failed.values())
    assert core.snapshot()["down"] == {"decode-0": "decode"}
    sent.clear()
    new(core, "e")
    assert {dest for dest, _ in dispatched(sent, Reserve)} == {"decode-1"}
    core.handle(Heartbeat(instance="decode-0", role="decode"))  # it thaws
    assert not core.snapshot()["down"]
    report(core, "decode-0")  # its room, as its next stats say
    sent.clear()
    for rid in "fghi":
        new(core, rid)
    assert "decode-0" in {dest for dest, _ in dispatched(sent, Reserve)}


@pytest.mark.parametrize("skew", [-3600.0, 3600.0])
def test_deadlines_run_on_the_schedulers_clock_not_the_senders(skew):
    """An engine on another machine whose clock is an hour off: its events neither fail a request at
    once nor keep it alive past the deadline, which counts from when the scheduler heard them."""
    now = [100.0]
    core, sent = make(clock=lambda: now[0])
    new(core, "a")
    decode = next(dest for dest, m in dispatched(sent, Reserve) if m.request_id == "a")
    core.handle(StateEvent(request_id="a", state="DECODING", instance=decode, time=now[0] + skew))
    now[0] += core.deadlines.decoding - 1
    core.tick()
    assert "a" in core.live
    now[0] += 2
    core.tick()
    assert "a" not in core.live and core.recent["a"].state == "FAILED"


def test_queues_marks_old_figures_and_lists_an_instance_that_is_down():
    from pdpipe.inspect import format_queues
    from pdpipe.messages import ProcessDown

    now = [100.0]
    core, _ = make(clock=lambda: now[0])
    for name, role in ROLES.items():
        report(core, name, role)
    now[0] += 1.0
    report(core, "decode-1", "decode")
    now[0] += 4.0
    report(core, "decode-0", "decode", weights="wint4/none", kv_dtype="fp8_e4m3")
    core.handle(ProcessDown(name="prefill-0", role="prefill", detail="exit code -9"))
    lines = {line.split()[0]: line for line in format_queues(core.snapshot()).splitlines()[2:6]}
    assert "figures 4 s old" in lines["decode-1"] and "old" not in lines["decode-0"]
    assert "wint4/none, KV fp8_e4m3" in lines["decode-0"] and "KV" not in lines["decode-1"]
    assert "(down)" in lines["prefill-0"] and "(down)" not in lines["decode-1"]


def test_a_silent_rank_takes_its_instance_out_and_back():
    """decode-0 has two ranks, each beating; rank 1 freezes (rank 0 then waits in a collective, yet its
    own heartbeat goes on): decode-0 is routed around and its requests fail; when rank 1 beats again
    the instance rejoins. A death after the freeze is the launcher's to bring back."""
    from pdpipe.messages import Heartbeat, ProcessDown

    now = [100.0]
    core, sent = make(clock=lambda: now[0])
    beating = [*ROLES.items(), ("decode-0.rank1", "decode")]
    for name, role in beating:
        core.handle(Heartbeat(instance=name, role=role))
    for rid in "abcd":
        new(core, rid)
    on = {m.request_id: dest for dest, m in dispatched(sent, Reserve)}
    now[0] += 6.0
    for name, role in beating:
        if name != "decode-0.rank1":
            core.handle(Heartbeat(instance=name, role=role))
    failed = tick_and_fail(core, sent)
    assert set(failed) == {r for r, d in on.items() if d == "decode-0"}
    assert all("decode-0.rank1: no report" in e for e in failed.values())
    assert core.snapshot()["down"] == {"decode-0": "decode"}
    core.handle(Heartbeat(instance="decode-0.rank1", role="decode"))  # it thaws
    assert not core.snapshot()["down"]
    now[0] += 6.0
    for name, role in ROLES.items():
        core.handle(Heartbeat(instance=name, role=role))
    core.tick()  # rank 1 silent again, then the launcher sees the instance die: it restarts it
    core.handle(ProcessDown(name="decode-0", role="decode", detail="signal 9"))
    core.handle(Heartbeat(instance="decode-0.rank1", role="decode"))  # the new rank 1, before rank 0 is ready
    assert core.snapshot()["down"] == {"decode-0": "decode"}


def tick_and_fail(core, sent) -> dict[str, str]:
    """The requests one tick fails, with their errors."""
    from pdpipe.messages import EngineOutput

    sent.clear()
    core.tick()
    return {m.request_id: m.error for _, m in dispatched(sent, EngineOutput)}


def test_serving_lists_the_decode_instances_that_reported_since_they_came_up_and_are_not_down():
    """What /health asks: a decode (or mixed) instance serves once it has reported since it started or
    came back, and while it is neither dead nor frozen. A launch whose engines never became ready, or
    whose only decode instance froze or died, serves nothing."""
    from pdpipe.messages import Heartbeat, ProcessDown, ProcessUp

    now = [100.0]
    core, _ = make(clock=lambda: now[0], roles={"prefill-0": "prefill", "decode-0": "decode"}, report_all=False)
    assert core.snapshot()["serving"] == []  # configured, still loading its model
    report(core, "prefill-0", "prefill")
    core.handle(Heartbeat(instance="decode-0", role="decode"))  # it beats before it is ready
    assert core.snapshot()["serving"] == [] and not core.snapshot()["instances"]["decode-0"]["ready"]
    report(core, "decode-0")
    assert core.snapshot()["serving"] == ["decode-0"] and core.snapshot()["instances"]["decode-0"]["ready"]
    now[0] += 6.0
    core.tick()  # silent past the heartbeat deadline: frozen
    snap = core.snapshot()
    assert snap["serving"] == [] and snap["down"] == {"decode-0": "decode"}
    core.handle(Heartbeat(instance="decode-0", role="decode"))  # it thaws; its next stats make it ready
    report(core, "decode-0")
    assert core.snapshot()["serving"] == ["decode-0"]
    core.handle(ProcessDown(name="decode-0", role="decode", detail="signal 9"))
    report(core, "decode-0")  # its last words
    assert core.snapshot()["serving"] == []
    core.handle(ProcessUp(name="decode-0", role="decode"))
    assert core.snapshot()["serving"] == []  # restarted, not yet reported
    report(core, "decode-0")
    assert core.snapshot()["serving"] == ["decode-0"]


def test_an_instance_whose_ranks_all_fall_silent_at_once_rejoins_when_they_beat_again():
    """decode-0 and its rank 1 both pass the heartbeat deadline within one tick (the whole launch was
    stopped, say): the instance goes down once, frozen, and comes back when its ranks beat again."""
    from pdpipe.messages import EngineOutput, Heartbeat

    now = [100.0]
    core, sent = make(clock=lambda: now[0])
    beating = [*ROLES.items(), ("decode-0.rank1", "decode")]
    for name, role in beating:
        core.handle(Heartbeat(instance=name, role=role))
    new(core, "a")
    now[0] += 6.0
    for name, role in ROLES.items():
        if name != "decode-0":
            core.handle(Heartbeat(instance=name, role=role))
    failed = tick_and_fail(core, sent)
    assert core.snapshot()["down"] == {"decode-0": "decode"}
    assert all("decode-0 stopped reporting" in e for e in failed.values())
    assert len([m for _, m in dispatched(sent, EngineOutput)]) == len(failed)  # each request failed once
    core.handle(Heartbeat(instance="decode-0", role="decode"))
    assert core.snapshot()["down"] == {"decode-0": "decode"}  # its rank 1 is still silent
    core.handle(Heartbeat(instance="decode-0.rank1", role="decode"))
    report(core, "decode-0")
    assert not core.snapshot()["down"] and core.snapshot()["serving"] == ["decode-0", "decode-1"]


def test_queues_shows_each_instances_cached_blocks_and_hit_rate():
    from pdpipe.inspect import format_queues

    core, _ = make()
    report(core, "decode-0", "decode", cached_blocks=12, prefix_query_tokens=400, prefix_hit_tokens=300)
    lines = format_queues(core.snapshot()).splitlines()
    head, row = lines[1], next(line for line in lines if line.startswith("decode-0"))
    cached, hit = head.index("cached"), head.index(" hit ") + 1
    assert row[cached:].split()[0] == "12" and row[hit:].split()[0] == "75%"


# ---- routing by the engines' caches --------------------------------------------------------------
def cached_on(core, instance: str, prompt: list[int], rank: int | None = None) -> None:
    """`instance` says (a KV event) that its cache holds the prompt's full blocks."""
    from pdpipe.kv_events import BlockStored, KVEventBatch, encode_batch
    from pdpipe.kv_hash import block_hashes
    from pdpipe.messages import KVEvents

    hashes = block_hashes(prompt, 16, core.cache.root(""))
    batch = KVEventBatch(1.0, [BlockStored(hashes, None, prompt[:len(hashes) * 16], 16)], rank)
    core.handle(KVEvents(instance=instance, batches=[encode_batch(batch)]))


def cache_aware(**kwargs):
    from pdpipe.kv_hash import root_hash
    from pdpipe.scheduler.core import CacheKeys

    sent = []
    core = SchedulerCore(kwargs.pop("roles", PD2), DeadlineConfig(), lambda d, m: sent.append((d, m)),
                         lambda: 100.0, routing=kwargs.pop("routing", RoutingConfig(disaggregation="always",
                                                                                   cache_min_tokens=64)),
                         cache=CacheKeys(lambda salt: root_hash("m", cache_salt=salt), 16))
    for name, role in core.roles.items():
        report(core, name, role, num_blocks=100 if name != "decode-0" else 200, max_num_seqs=200)
    return core, sent


PD2 = {"prefill-0": "prefill", "prefill-1": "prefill", "decode-0": "decode", "decode-1": "decode"}


def test_a_request_goes_to_the_decode_and_prefill_instances_holding_its_prefix():
    """decode-0 has twice the room, but decode-1's cache holds the prompt's 6 blocks, and prefill-1's: the
    Reserve goes to decode-1, the prompt to prefill-1 (its 6 blocks reusable there: 4 tokens to compute).
    Another salt shares nothing and goes by room; so does a hit under routing.cache_min_tokens."""
    core, sent = cache_aware()
    prompt = list(range(100))
    cached_on(core, "decode-1", prompt)
    cached_on(core, "prefill-1", prompt)
    new(core, "r", 100)
    assert [d for d, _ in dispatched(sent, Reserve)] == ["decode-1"]
    assert [d for d, _ in dispatched(sent, Prefill)] == ["prefill-1"] and core.outstanding_tokens["prefill-1"] == 4
    sent.clear()
    core.handle(NewRequest(request_id="s", prompt_token_ids=prompt, params=SamplingParams(max_tokens=16),
                           arrival=99.0, cache_salt="other"))
    assert [d for d, _ in dispatched(sent, Reserve)] == ["decode-0"]
    core, sent = cache_aware(routing=ALWAYS)  # 96 cached tokens are under the default 256: cheap to recompute
    cached_on(core, "decode-1", prompt)
    new(core, "r", 100)
    assert [d for d, _ in dispatched(sent, Reserve)] == ["decode-0"]


def test_one_hot_prefix_does_not_pile_every_request_onto_one_decode_instance():
    """decode-1 holds the prefix but runs 100 more requests than decode-0 (over 64 more, and 1.5 times):
    the request goes by room instead."""
    core, sent = cache_aware()
    cached_on(core, "decode-1", list(range(100)))
    for i in range(100):
        core.ledger.commit(f"busy-{i}", "decode-1", 16)
    new(core, "r", 100)
    assert [d for d, _ in dispatched(sent, Reserve)] == ["decode-0"]


def test_requests_sharing_a_prefix_decode_holds_commit_its_blocks_once():
    """decode-0 (20 blocks) caches a 96-token prefix (6 blocks). Each request's room is 8 blocks (100 prompt
    tokens, 16 output): committed whole, 2 would fit; the prefix counted once, 7 do (8 + 6 × 2). When the
    first ends the others still hold the prefix: it stays committed until the last lets go."""
    from pdpipe.messages import Freed

    core, sent = cache_aware(roles=PD1)
    report(core, "decode-0", num_blocks=20, max_num_seqs=200)
    prompt = list(range(100))
    cached_on(core, "decode-0", prompt)
    for i in range(9):
        core.handle(NewRequest(request_id=f"r{i}", prompt_token_ids=prompt, params=SamplingParams(max_tokens=16),
                               arrival=99.0))
    assert reserves(sent) == [f"r{i}" for i in range(7)] and list(core.queue) == ["r7", "r8"]
    room = core.ledger.room("decode-0")
    assert room.blocks == 20
    for i in range(7):
        core.handle(Reserved(request_id=f"r{i}", instance="decode-0", block_ids=list(range(8)), free_blocks=0,
                             cached_blocks=6))
    core.handle(AbortRequest(request_id="r0", reason="stop"))
    core.handle(Freed(request_id="r0", instance="decode-0"))
    assert room.blocks == 20 and reserves(sent)[-1] == "r7"  # r0's 2 blocks of its own went to r7
    assert ledger_matches(core)


def test_the_index_forgets_an_instance_that_goes_down_or_clears_its_cache():
    from pdpipe.kv_events import AllBlocksCleared, KVEventBatch, encode_batch
    from pdpipe.messages import KVEvents, ProcessDown

    core, _ = cache_aware()
    prompt = list(range(100))
    cached_on(core, "decode-1", prompt)
    cached_on(core, "decode-0", prompt, rank=1)  # a data-parallel rank's
    assert core.index.blocks("decode-1") == 6 and core.index.blocks("decode-0") == 6
    core.handle(ProcessDown(name="decode-1", role="decode", detail="signal 9"))
    assert core.index.blocks("decode-1") == 0
    cached_on(core, "decode-1", prompt)  # the dead one's last words are not believed
    assert core.index.blocks("decode-1") == 0
    core.handle(KVEvents(instance="decode-0", batches=[encode_batch(KVEventBatch(2.0, [AllBlocksCleared()], 1))]))
    assert core.index.blocks("decode-0") == 0


def test_the_prompt_goes_to_the_prefill_instance_with_least_to_compute_counting_what_it_would_copy():
    """decode-0 caches the prompt's 6 blocks; prefill-1 caches 4 of them but has 40 tokens queued, prefill-0
    none and 50 queued. Counting only its own cache prefill-1 has less to do (40 + 36 against 50 + 100);
    counting the copy from decode-0 (prefill-0 would copy all 6 and compute 4; prefill-1's 2 more are under
    pull_min_tokens) prefill-0 has (54 against 76), and gets it, with a pull of 6."""
    prompt = list(range(100))
    core, sent = cache_aware(roles={"prefill-0": "prefill", "prefill-1": "prefill", "decode-0": "decode"})
    cached_on(core, "decode-0", prompt)
    cached_on(core, "prefill-1", prompt[:64])
    core.outstanding_tokens["prefill-0"] += 50
    core.outstanding_tokens["prefill-1"] += 40
    new(core, "r", 100)
    (dest, msg), = dispatched(sent, Prefill)
    assert dest == "prefill-0" and msg.pull_blocks == 6 and core.outstanding_tokens["prefill-0"] == 54


def test_a_prefill_instance_copies_from_the_decode_instance_only_what_it_lacks():
    """decode-0 caches the prompt's 6 blocks, prefill-0 none: the Prefill asks for a pull of 6 (prefill-0
    then computes 4 tokens), on one machine or across two (the prefill machine's transfer reads them). Where
    prefill-0 caches them too, or remote_hits is off, no pull. A transfer that dies with a pull pending tells
    the prefill instance none will come (it frees or computes into those blocks): the one of its machine."""
    from pdpipe.messages import ProcessDown, Pulled

    prompt = list(range(100))

    def prefill_for(routing=RoutingConfig(disaggregation="always", cache_min_tokens=64), machines=None,
                    on_prefill=False):
        core, sent = cache_aware(roles=PD1, routing=routing)
        if machines:
            core.machines = machines
        cached_on(core, "decode-0", prompt)
        if on_prefill:
            cached_on(core, "prefill-0", prompt)
        new(core, "r", 100)
        (_, msg), = dispatched(sent, Prefill)
        return core, sent, msg

    core, sent, msg = prefill_for()
    assert msg.pull_blocks == 6 and core.outstanding_tokens["prefill-0"] == 4
    core.handle(ProcessDown(name="transfer", role="transfer", detail="signal 9"))
    assert [(d, m.blocks) for d, m in sent if isinstance(m, Pulled)] == [("prefill-0", 0)]
    assert prefill_for(on_prefill=True)[2].pull_blocks == 0
    core, sent, msg = prefill_for(machines={"prefill-0": "a", "decode-0": "b"})
    assert msg.pull_blocks == 6
    core.handle(ProcessDown(name="transfer-b", role="transfer", detail="signal 9"))
    assert not [m for _, m in sent if isinstance(m, Pulled)]  # decode's machine: prefill's transfer still reads
    core.handle(ProcessDown(name="transfer-a", role="transfer", detail="signal 9"))
    assert [(d, m.blocks) for d, m in sent if isinstance(m, Pulled)] == [("prefill-0", 0)]
    off = RoutingConfig(disaggregation="always", cache_min_tokens=64, remote_hits=False)
    assert prefill_for(routing=off)[2].pull_blocks == 0


def test_a_prefill_instance_of_other_weights_or_kv_is_not_paired_with_a_decode_instance(caplog):
    """prefill-0 reports int4 weights, decode-0 unquantized ones: their KV is not the same KV, so decode-0's
    prompts are computed on decode-0 (said in the trace and once in the log) instead of failing at their
    first copy; a prefill instance of the same kinds is paired as before."""
    core, sent = make(roles=PD1)
    report(core, "prefill-0", "prefill", weights="wint4/none", kv_dtype="bfloat16")
    report(core, "decode-0", "decode", weights="", kv_dtype="bfloat16")
    with caplog.at_level("ERROR", logger="pdpipe"):
        new(core, "a", 300)
        new(core, "b", 300)
    assert local_prefills(sent) == ["a", "b"] and not reserves(sent)
    assert any("computes KV decode-0 can take" in d for _, _, _, d in core.live["a"].events)
    assert sum("cannot exchange KV" in r.message for r in caplog.records) == 1
    report(core, "prefill-0", "prefill", weights="", kv_dtype="bfloat16")
    new(core, "c", 300)
    assert reserves(sent) == ["c"]


def test_a_prefill_instance_copies_from_whichever_instance_caches_most_which_lends_the_blocks():
    """prefill-1 caches the prompt's 6 blocks but has 500 tokens queued; decode-0 caches 4. prefill-0 gets the
    prompt (4 tokens to compute against 504) and copies all 6 from prefill-1, which is asked to lend them to
    this machine's transfer. With decode-0 caching all 6 too, decode-0's (held by its reservation) are taken
    and nothing is lent. A lender that dies: the transfer hears it lends nothing (the pull is computed); a
    transfer that dies: the prefill instance hears none come, the lender gets its blocks back."""
    from pdpipe.messages import LendBlocks, LentBlocks, ProcessDown, Pulled, ReturnBlocks

    prompt = list(range(100))
    roles = {"prefill-0": "prefill", "prefill-1": "prefill", "decode-0": "decode"}

    def route(decode_caches: int):
        core, sent = cache_aware(roles=roles)
        cached_on(core, "prefill-1", prompt)
        cached_on(core, "decode-0", prompt[:decode_caches])
        core.outstanding_tokens["prefill-1"] += 500
        new(core, "r", 100)
        (dest, msg), = dispatched(sent, Prefill)
        return core, sent, dest, msg

    core, sent, dest, msg = route(64)
    assert (dest, msg.pull_blocks, msg.pull_from) == ("prefill-0", 6, "prefill-1")
    (lender, lend), = dispatched(sent, LendBlocks)
    assert (lender, lend.blocks, lend.transfer, lend.prompt_token_ids) == ("prefill-1", 6, "transfer", prompt)
    assert core.outstanding_tokens["prefill-0"] == 4
    core.handle(ProcessDown(name="prefill-1", role="prefill", detail="signal 9"))
    assert [(d, m.instance, m.held_ids) for d, m in dispatched(sent, LentBlocks)] == [("transfer", "prefill-1", [])]
    assert core.live["r"].state != "FAILED"  # it did not need the lender: it computes the prompt itself

    core, sent, dest, msg = route(64)
    core.handle(ProcessDown(name="transfer", role="transfer", detail="signal 9"))
    assert [(d, m.blocks) for d, m in dispatched(sent, Pulled)] == [("prefill-0", 0)]
    assert [d for d, _ in dispatched(sent, ReturnBlocks)] == ["prefill-1"]
    core, sent, dest, msg = route(64)
    core.live["r"].prefill_done = True  # computed already (its own cache held the blocks): the lend may be
    core.handle(ProcessDown(name="transfer", role="transfer", detail="signal 9"))  # unanswered all the same
    assert not dispatched(sent, Pulled) and [d for d, _ in dispatched(sent, ReturnBlocks)] == ["prefill-1"]

    core, sent, dest, msg = route(100)
    assert (dest, msg.pull_blocks, msg.pull_from) == ("prefill-0", 6, "") and not dispatched(sent, LendBlocks)
