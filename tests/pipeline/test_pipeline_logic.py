"""The pipeline's logic in one process (no sockets): disaggregated output equals colocated, every
abort point frees every block, deadlines fail requests cleanly, transfer failures are contained."""
import pytest
from conftest import make_llm, make_prompts
from local_pipeline import LocalPipeline

from pdpipe.config import DeadlineConfig
from pdpipe.messages import AbortRequest, Pause, SamplingParams
from pdpipe.transfer.base import FakeTransfer

GREEDY = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True, logprobs=0)
PD = {"prefill-0": "prefill", "decode-0": "decode"}


@pytest.fixture(scope="module")
def colocated(model_dir):
    llm = make_llm(model_dir("qwen3"))
    cache = {}

    def run(prompt):
        key = tuple(prompt)
        if key not in cache:
            cache[key] = llm.generate([prompt], GREEDY)[0]
        return cache[key]

    return run


@pytest.mark.parametrize("roles", [
    PD,
    {"prefill-0": "prefill", "prefill-1": "prefill", "decode-0": "decode", "decode-1": "decode"},
    {"mixed-0": "mixed"},
])
def test_disaggregated_equals_colocated(model_dir, colocated, roles):
    pipe = LocalPipeline(model_dir("qwen3"), roles)
    prompts = make_prompts(384, lengths=(1, 9, 17, 40, 3, 25))
    for i, p in enumerate(prompts):
        pipe.submit(str(i), p, GREEDY)
    pipe.run()
    for i, p in enumerate(prompts):
        ref = colocated(p)
        assert pipe.tokens(str(i)) == ref.token_ids
        logprobs = [lp.logprob for o in sorted(pipe.outputs[str(i)], key=lambda o: o.index)
                    for lp in o.logprobs or []]
        assert logprobs == pytest.approx([lp.logprob for lp in ref.logprobs], abs=1e-5)
        assert pipe.finish_reason(str(i)) == "length" and pipe.state(str(i)) == "FINISHED"
    assert pipe.leak_free()
    used = {name for name, n in pipe.scheduler.routed.items() if n}
    assert used == set(roles), "every instance took a share"


def test_layers_move_one_by_one_before_decode_starts(model_dir):
    pipe = LocalPipeline(model_dir("qwen3"), PD)
    pipe.workers["prefill-0"].layer_message_tokens = 1  # a message per layer, as long prompts get
    pipe.submit("r", make_prompts(384, lengths=(20,))[0], GREEDY)
    pipe.run()
    events = [e for e in pipe.scheduler.recent["r"].events]
    layer_events = [d for _, s, _, d in events if d.startswith("layer") or d.startswith("landed")]
    # the scheduler hears of the first layer and of the landing, not of every layer
    assert layer_events[0] == "layer 1/2 sent" and "layers sent over" in layer_events[1]
    assert len(layer_events) == 2
    states = [s for _, s, _, _ in events]
    assert states.index("RESERVED") < states.index("PREFILLING") < states.index("TRANSFERRING") \
        < states.index("DECODING") < states.index("FINISHED")


def test_first_token_that_ends_the_request_frees_both_sides(model_dir):
    pipe = LocalPipeline(model_dir("qwen3"), PD)
    pipe.submit("one", make_prompts(384, lengths=(12,))[0], SamplingParams(max_tokens=1, temperature=0.0))
    pipe.run()
    assert len(pipe.tokens("one")) == 1 and pipe.finish_reason("one") == "length"
    assert pipe.leak_free()


def abort_at(pipe: LocalPipeline, rid: str, state: str) -> None:
    """Advances the pipeline until `rid` is in `state`, then aborts it as a disconnecting client would."""
    for _ in range(1000):
        if pipe.state(rid) == state:
            pipe.send("scheduler", AbortRequest(request_id=rid, reason="client disconnected"))
            return
        if not pipe.deliver():
            for w in pipe.workers.values():
                if w.has_work():
                    w.step()
                    break
    raise AssertionError(f"{rid} never reached {state}")


@pytest.mark.parametrize("state, local", [("QUEUED", False), ("RESERVED", False), ("PREFILLING", False),
                                          ("TRANSFERRING", False), ("DECODING", False),
                                          ("PREFILLING", True), ("DECODING", True)])
def test_abort_in_every_state_frees_every_block(model_dir, state, local):
    # A small token budget splits the 40-token prompt over several prefill steps, so PREFILLING lasts.
    from pdpipe.config import RoutingConfig

    routing = RoutingConfig(disaggregation="conditional" if local else "always", local_prompt_tokens=64)
    pipe = LocalPipeline(model_dir("qwen3"), PD, max_num_batched_tokens=8, routing=routing)
    pipe.submit("victim", make_prompts(384, lengths=(40,))[0], SamplingParams(max_tokens=30, temperature=0.0))
    pipe.submit("bystander", make_prompts(384, lengths=(15,), seed=3)[0], GREEDY)
    if state == "TRANSFERRING":
        pipe.workers["decode-0"].handle(Pause(paused=True))  # KV lands but decode does not take it
    abort_at(pipe, "victim", state)
    pipe.workers["decode-0"].handle(Pause(paused=False))
    pipe.run()
    assert pipe.state("victim") == "ABORTED"
    assert pipe.finish_reason("bystander") == "length" and len(pipe.tokens("bystander")) == 10
    assert pipe.leak_free()


def test_a_request_waits_in_the_admission_queue_until_decode_has_room(model_dir, colocated):
    pipe = LocalPipeline(model_dir("qwen3"), PD, num_blocks=8)  # 64 tokens of KV per instance
    prompts = make_prompts(384, lengths=(40, 40), seed=5)
    pipe.submit("a", prompts[0], GREEDY)
    pipe.submit("b", prompts[1], GREEDY)
    pipe.deliver()
    pipe.deliver()
    assert pipe.state("a") == "RESERVED" and pipe.state("b") == "QUEUED" and list(pipe.scheduler.queue) == ["b"]
    pipe.run()  # a finishes, decode frees its room, b leaves the queue: no timer, no tick
    assert pipe.state("a") == pipe.state("b") == "FINISHED"
    assert [pipe.tokens(r) for r in "ab"] == [colocated(p).token_ids for p in prompts]
    assert pipe.engines["decode-0"].scheduler.num_preemptions == 0
    assert pipe.leak_free()


def test_conditional_disaggregation_computes_short_prompts_on_decode(model_dir, colocated):
    from pdpipe.config import RoutingConfig

    routing = RoutingConfig(disaggregation="conditional", local_prompt_tokens=16, local_step_tokens=8)
    pipe = LocalPipeline(model_dir("qwen3"), PD, routing=routing)
    decode = pipe.engines["decode-0"]
    schedule, prompt_tokens = decode.scheduler.schedule, []

    def recording():
        out = schedule()
        prompt_tokens.append(sum(c.num_tokens for c in out.chunks if c.start < c.seq.num_prompt_tokens))
        return out

    decode.scheduler.schedule = recording
    prompts = make_prompts(384, lengths=(12, 40, 3, 25))
    for i, p in enumerate(prompts):
        pipe.submit(str(i), p, GREEDY)
    pipe.run()
    for i, p in enumerate(prompts):
        assert pipe.tokens(str(i)) == colocated(p).token_ids and pipe.state(str(i)) == "FINISHED"
    local = {rid for rid, rec in pipe.scheduler.recent.items() if rec.whole == "decode-0"}
    assert local == {"0", "2"} and pipe.scheduler.decisions == {"local": 2, "remote": 2}
    states = [s for _, s, _, _ in pipe.scheduler.recent["0"].events]
    assert states == ["QUEUED", "QUEUED", "PREFILLING", "DECODING", "FINISHED"]
    assert max(prompt_tokens) == 8 and sum(prompt_tokens) == 12 + 3  # in chunks of at most 8 a step
    assert pipe.leak_free()


def test_abort_of_a_prompt_computed_on_decode_frees_its_room(model_dir):
    from pdpipe.config import RoutingConfig

    routing = RoutingConfig(disaggregation="conditional", local_prompt_tokens=64)
    pipe = LocalPipeline(model_dir("qwen3"), PD, routing=routing, max_num_batched_tokens=8)
    pipe.submit("victim", make_prompts(384, lengths=(40,))[0], SamplingParams(max_tokens=30, temperature=0.0))
    abort_at(pipe, "victim", "PREFILLING")
    pipe.run()
    assert pipe.state("victim") == "ABORTED" and not pipe.scheduler.ledger.commitments
    assert pipe.leak_free()


def test_deadline_fails_a_stuck_request_and_frees_it(model_dir):
    pipe = LocalPipeline(model_dir("qwen3"), PD, deadlines=DeadlineConfig(transferring=5.0))
    pipe.workers["decode-0"].handle(Pause(paused=True))
    pipe.submit("stuck", make_prompts(384, lengths=(20,))[0], GREEDY)
    pipe.run()
    assert pipe.state("stuck") == "TRANSFERRING"
    pipe.clock.now += 6.0
    pipe.scheduler.tick()
    pipe.run()
    assert pipe.state("stuck") == "FAILED"
    err = pipe.outputs["stuck"][-1]
    assert err.finish_reason == "error" and "deadline: TRANSFERRING" in err.error
    pipe.workers["decode-0"].handle(Pause(paused=False))
    pipe.run()
    assert pipe.leak_free()


def test_failed_transfer_fails_only_its_request(model_dir):
    pipe = LocalPipeline(model_dir("qwen3"), PD, backend=FakeTransfer(fail={"bad"}))
    prompts = make_prompts(384, lengths=(10, 10), seed=8)
    pipe.submit("bad", prompts[0], GREEDY)
    pipe.submit("good", prompts[1], GREEDY)
    pipe.run()
    assert pipe.state("bad") == "FAILED" and "KV transfer failed" in pipe.outputs["bad"][-1].error
    assert pipe.state("good") == "FINISHED" and len(pipe.tokens("good")) == 10
    assert pipe.leak_free()


def test_a_step_that_fails_once_is_run_again_and_its_request_goes_on(model_dir, colocated):
    """A failure that does not repeat (memory short for one step) is nobody's: the step runs again and
    the request finishes with the tokens it would have had."""
    pipe = LocalPipeline(model_dir("qwen3"), PD)
    decode = pipe.workers["decode-0"]
    real_step = decode.engine.runner.execute
    calls = {"n": 0}

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("out of memory (simulated)")
        return real_step(*args, **kwargs)

    decode.engine.runner.execute = flaky
    prompt = make_prompts(384, lengths=(12,))[0]
    pipe.submit("unlucky", prompt, GREEDY)
    pipe.run()
    assert calls["n"] > 3 and pipe.finish_reason("unlucky") == "length"
    assert pipe.tokens("unlucky") == colocated(prompt).token_ids
    assert pipe.leak_free()


@pytest.mark.parametrize("instance", ["prefill-0", "decode-0"])
def test_a_step_that_raises_for_one_request_fails_it_alone(model_dir, colocated, instance):
    """One request's run raises inside a batch (on the prefill instance, whose step also announced its
    prompts to the transfer; or on decode): it fails with the reason, the others in the same batches
    finish with the tokens a colocated engine gives, and nothing is left allocated."""
    pipe = LocalPipeline(model_dir("qwen3"), PD)
    engine = pipe.workers[instance].engine
    real = engine.runner.execute

    def execute(sched, *args, **kwargs):
        if any(c.seq.request_id == "bad" for c in sched.chunks):
            raise RuntimeError("kernel fault (simulated)")
        return real(sched, *args, **kwargs)

    engine.runner.execute = execute
    prompts = make_prompts(384, lengths=(10, 12, 9), seed=5)
    for rid, prompt in zip(("good-1", "bad", "good-2"), prompts):
        pipe.submit(rid, prompt, GREEDY)
    pipe.run()
    assert pipe.state("bad") == "FAILED" and "kernel fault" in pipe.outputs["bad"][-1].error
    assert pipe.tokens("good-1") == colocated(prompts[0]).token_ids
    assert pipe.tokens("good-2") == colocated(prompts[2]).token_ids
    assert pipe.leak_free()


@pytest.mark.parametrize("threshold, messages, sent", [
    (20, [(0, 1), (1, 1)], ["layer 1/2 sent"]),  # 20 tokens × 1 layer: a message a layer
    (40, [(1, 2)], ["layers 1-2/2 sent"]),  # two layers' worth: one message, one copy for both
    (2048, [(1, 2)], ["layers 1-2/2 sent"]),  # the default: a short prompt's layers go together at the end
])
def test_a_short_prompt_announces_its_layers_in_groups(model_dir, colocated, threshold, messages, sent):
    """Each layer message costs the prefill's host time; a short prompt's layers are announced together
    and copied in one launch, every layer exactly once, and the output is unchanged."""
    from local_pipeline import TensorPools

    from pdpipe.messages import LayersReady

    class Recording(TensorPools):
        def __init__(self, engines):
            super().__init__(engines)
            self.launches = []

        def send_group(self, jobs, layer, count):
            self.launches.append((layer, count))
            super().send_group(jobs, layer, count)

    pipe = LocalPipeline(model_dir("qwen3"), PD)
    pipe.backend = pipe.transfer.backend = Recording(pipe.engines)
    pipe.workers["prefill-0"].layer_message_tokens = threshold
    seen = []
    deliver = pipe.transfer.handle

    def handle(msg):
        if isinstance(msg, LayersReady):
            seen.append((msg.layer, msg.count))
        deliver(msg)

    pipe.transfer.handle = handle
    prompt = make_prompts(384, lengths=(20,))[0]
    pipe.submit("r", prompt, GREEDY)
    pipe.run()
    assert seen == messages and pipe.backend.launches == [(last - count + 1, count) for last, count in messages]
    layer_events = [d for _, _, _, d in pipe.scheduler.recent["r"].events if d.startswith("layer")]
    assert layer_events == sent  # the first layers sent; the scheduler hears of no other layer
    assert pipe.tokens("r") == colocated(prompt).token_ids and pipe.leak_free()


def start(worker, rid: str, src_blocks: list[int], dst: str, dst_blocks: list[int]) -> None:
    """A transfer job as the pipeline opens one: the prefill's start, then decode's blocks."""
    from pdpipe.messages import DecodeBlocks, TransferStart

    worker.handle(TransferStart(request_id=rid, src_instance="p", src_block_ids=src_blocks, dst_instance=dst))
    worker.handle(DecodeBlocks(request_id=rid, instance=dst, block_ids=dst_blocks))


def test_a_job_waiting_for_decode_blocks_leaves_the_transfer_idle():
    """Prefill announced the job and its layers, decode's blocks have not come (its reservation was
    refused and waits in the scheduler's queue): nothing for `step` to do until they come — the
    transfer does not spin — and the layers move once they do."""
    from pdpipe.messages import DecodeBlocks, LayersReady, TransferStart
    from pdpipe.transfer.worker import TransferWorker

    backend, sent = FakeTransfer(), []
    worker = TransferWorker("transfer", backend, 2, lambda dest, msg: sent.append((dest, msg)))
    worker.handle(TransferStart(request_id="r", src_instance="p", src_block_ids=[1], dst_instance="d"))
    worker.handle(LayersReady(request_ids=["r"], layer=1, count=2))
    assert not worker.has_work() and not backend.sent
    backend.in_flight.add("r")
    worker.handle(DecodeBlocks(request_id="r", instance="d", block_ids=[5]))
    assert backend.sent == [("r", 0), ("r", 1)] and worker.has_work()


def test_abort_lets_decode_free_only_after_the_copies_in_flight_end():
    from pdpipe.messages import AbortTransfer, Free, LayersReady
    from pdpipe.transfer.worker import TransferWorker

    backend, sent = FakeTransfer(), []
    worker = TransferWorker("transfer", backend, 2, lambda dest, msg: sent.append((dest, msg)))
    start(worker, "r", [1, 4], "d", [2, 3])
    worker.handle(LayersReady(request_ids=["r"], layer=0))
    backend.in_flight.add("r")  # layer 0's copy is still writing into d's blocks
    worker.handle(AbortTransfer(request_id="r", decode_instance="d", reason="client gone"))
    assert not [m for _, m in sent if isinstance(m, Free)] and worker.has_work()
    worker.step()
    assert not [m for _, m in sent if isinstance(m, Free)]
    backend.in_flight.clear()
    worker.step()
    assert [(dest, m.reason) for dest, m in sent if isinstance(m, Free)] == [("d", "client gone")]
    assert backend.aborted == ["r"] and not worker.has_work()


def test_copies_that_end_between_messages_are_still_reported():
    """The last message (PrefillDone) finds the copies running; they end with no message after it: the
    worker must still have work until it reported the landing (the GPU pipeline once stalled here)."""
    from pdpipe.messages import KVLanded, LayersReady, PrefillDone, TransferDone
    from pdpipe.transfer.worker import TransferWorker

    backend, sent = FakeTransfer(), []
    worker = TransferWorker("transfer", backend, 2, lambda dest, msg: sent.append((dest, msg)))
    start(worker, "r", [1], "d", [2])
    backend.in_flight.add("r")
    for layer in range(2):
        worker.handle(LayersReady(request_ids=["r"], layer=layer))
    worker.handle(PrefillDone(request_id="r", first_token=7))
    assert worker.has_work() and not [m for _, m in sent if isinstance(m, KVLanded)]
    backend.in_flight.clear()  # the copies end; no message follows
    assert worker.has_work()
    worker.step()
    assert [(dest, type(m)) for dest, m in sent if isinstance(m, (KVLanded, TransferDone))] == \
        [("d", KVLanded), ("p", TransferDone)]
    assert not worker.has_work()


def test_copies_that_never_land_fail_their_request_and_never_hold_decode_for_good():
    """The fake backend's copies never complete: past the copy deadline the job fails with the reason;
    an aborted job whose copies never settle lets decode free its blocks after the same deadline."""
    from pdpipe.messages import AbortTransfer, Free, LayersReady, StateEvent
    from pdpipe.transfer.worker import TransferWorker

    now = [1000.0]
    backend, sent = FakeTransfer(), []
    worker = TransferWorker("transfer", backend, 2, lambda dest, msg: sent.append((dest, msg)),
                            clock=lambda: now[0], copy_deadline=30.0)
    for rid in ("stuck", "gone"):
        start(worker, rid, [1], "d", [2])
        backend.in_flight.add(rid)  # never completes
        worker.handle(LayersReady(request_ids=[rid], layer=0))
    worker.handle(AbortTransfer(request_id="gone", decode_instance="d", reason="client gone"))
    now[0] += 29
    worker.step()
    assert not [m for _, m in sent if isinstance(m, Free) or getattr(m, "state", "") == "FAILED"]
    now[0] += 2
    worker.step()
    failed = [m for _, m in sent if isinstance(m, StateEvent) and m.state == "FAILED"]
    assert [(m.request_id, m.detail) for m in failed] == [("stuck", "KV transfer failed: copies did not land "
                                                                    "within 30 s")]
    assert [(dest, m.request_id) for dest, m in sent if isinstance(m, Free)] == [("d", "gone")]
    assert not worker.has_work()


def test_a_job_failing_with_copies_still_landing_frees_decode_only_once_they_landed():
    """Layer 0's copy is still writing when layer 1's cannot be sent: the request fails at once, but
    decode frees its blocks only after layer 0's copy has settled (found in review: it was freed at once)."""
    from pdpipe.messages import AbortTransfer, Free, LayersReady, StateEvent
    from pdpipe.transfer.worker import TransferWorker

    backend, sent = FakeTransfer(refuse={1}), []
    worker = TransferWorker("transfer", backend, 2, lambda dest, msg: sent.append((dest, msg)))
    start(worker, "r", [1], "d", [2])
    backend.in_flight.add("r")
    worker.handle(LayersReady(request_ids=["r"], layer=0))
    worker.handle(LayersReady(request_ids=["r"], layer=1))
    worker.step()
    assert [(m.request_id, m.detail) for _, m in sent if isinstance(m, StateEvent) and m.state == "FAILED"] == \
        [("r", "KV transfer failed: peer refused layer 1")]
    worker.handle(AbortTransfer(request_id="r", decode_instance="d", reason="KV transfer failed"))  # the scheduler's
    worker.step()
    assert not [m for _, m in sent if isinstance(m, Free)] and worker.has_work()
    backend.in_flight.clear()
    worker.step()
    assert [(dest, m.request_id) for dest, m in sent if isinstance(m, Free)] == [("d", "r")]
    assert not worker.has_work()


@pytest.mark.parametrize("where", ["poll", "send"])
def test_a_backend_that_raises_fails_that_job_alone(where):
    """A backend bug (not a TransferError) while polling or sending one job fails that job with the
    reason; the other job of the same batch lands."""
    from pdpipe.messages import KVLanded, LayersReady, PrefillDone, StateEvent
    from pdpipe.transfer.worker import TransferWorker

    class Buggy(FakeTransfer):
        def poll(self, job):
            if where == "poll" and job.request_id == "bad":
                raise KeyError("pool layout")
            return super().poll(job)

        def send(self, job, layer):
            if where == "send" and job.request_id == "bad":
                raise KeyError("pool layout")
            super().send(job, layer)

    backend, sent = Buggy(), []
    worker = TransferWorker("transfer", backend, 1, lambda dest, msg: sent.append((dest, msg)))
    for rid in ("bad", "good"):
        start(worker, rid, [1], "d", [2])
    worker.handle(LayersReady(request_ids=["bad", "good"], layer=0))
    for rid in ("bad", "good"):
        worker.handle(PrefillDone(request_id=rid, first_token=7))
    worker.step()
    failed = [(m.request_id, m.detail) for _, m in sent if isinstance(m, StateEvent) and m.state == "FAILED"]
    assert failed == [("bad", "KV transfer failed: KeyError: 'pool layout'")]
    assert [m.request_id for _, m in sent if isinstance(m, KVLanded)] == ["good"]
    assert worker.jobs == {}


def test_requests_prefilled_together_move_in_one_batch_per_layer(model_dir, colocated):
    from local_pipeline import TensorPools

    class Recording(TensorPools):
        def __init__(self, engines):
            super().__init__(engines)
            self.batches = []

        def send_batch(self, jobs, layer, count=1):
            self.batches.append((sorted(j.request_id for j in jobs), layer, count))
            super().send_batch(jobs, layer, count)

    pipe = LocalPipeline(model_dir("qwen3"), PD)
    pipe.backend = pipe.transfer.backend = Recording(pipe.engines)
    pipe.workers["prefill-0"].layer_message_tokens = 1  # a message per layer, as long prompts get
    prompts = make_prompts(384, lengths=(9, 17, 30))
    for i, p in enumerate(prompts):
        pipe.submit(str(i), p, GREEDY)
    pipe.run()
    for i, p in enumerate(prompts):  # one launch per layer moved all three, each into its own blocks
        assert pipe.tokens(str(i)) == colocated(p).token_ids
    assert pipe.backend.batches == [(["0", "1", "2"], 0, 1), (["0", "1", "2"], 1, 1)]
    assert pipe.leak_free()


def test_a_failing_batch_is_retried_job_by_job_so_only_the_bad_job_fails():
    from pdpipe.messages import LayersReady
    from pdpipe.transfer.base import TransferError
    from pdpipe.transfer.worker import TransferWorker

    class OneBadPeer(FakeTransfer):
        def send_batch(self, jobs, layer, count=1):
            raise TransferError("the batch spans a peer that is gone")

        def send(self, job, layer):
            if job.dst_instance == "gone":
                raise TransferError(f"no pool for {job.dst_instance}")
            super().send(job, layer)

    backend, sent = OneBadPeer(), []
    worker = TransferWorker("transfer", backend, 2, lambda dest, msg: sent.append((dest, msg)))
    for rid, dst in (("ok", "d"), ("bad", "gone")):
        start(worker, rid, [1], dst, [2])
    worker.handle(LayersReady(request_ids=["ok", "bad"], layer=1, count=2))
    assert backend.sent == [("ok", 0), ("ok", 1)]
    assert "bad" not in worker.jobs  # failed (and reported) at the poll that followed
    assert [(m.request_id, m.state) for _, m in sent if getattr(m, "state", "") == "FAILED"] == [("bad", "FAILED")]


def overstated_decode(model_dir, num_blocks: int = 8) -> LocalPipeline:
    """A 1P+1D pipeline whose scheduler believes decode has 64 blocks when it has `num_blocks` (as
    after preemptions it did not hear of): decode refuses what the ledger admits."""
    from pdpipe.messages import InstanceStats

    pipe = LocalPipeline(model_dir("qwen3"), PD, num_blocks=num_blocks)
    pipe.scheduler.handle(InstanceStats(instance="decode-0", role="decode", time=0.0, num_blocks=64,
                                        block_size=8, max_num_seqs=8))
    return pipe


def test_decode_refusing_after_prefill_started_keeps_the_prompt_until_room_frees(model_dir, colocated):
    """The second request's prompt is computed before decode refuses it; its KV waits on prefill
    until decode has room, then lands, and the output is unchanged."""
    pipe = overstated_decode(model_dir)
    prompts = make_prompts(384, lengths=(24, 24), seed=5)  # 3 blocks each on prefill, 5 with output room on decode
    pipe.submit("a", prompts[0], GREEDY)
    pipe.submit("b", prompts[1], GREEDY)
    pipe.deliver("scheduler")
    pipe.deliver("prefill-0")
    pipe.step("prefill-0")  # both prompts computed, their KV held for the transfer
    assert set(pipe.engines["prefill-0"].scheduler.held) == {"a", "b"}
    pipe.run()
    assert [pipe.tokens(r) for r in "ab"] == [colocated(p).token_ids for p in prompts]
    details = [d for _, s, _, d in pipe.scheduler.recent["b"].events if s == "QUEUED"]
    assert any(d.startswith("refused") for d in details) and details[-1].endswith("(again)")
    assert pipe.scheduler.routed["prefill-0"] == 2  # b's prompt was computed once
    assert pipe.leak_free()


@pytest.mark.parametrize("how", ["abort", "deadline"])
def test_a_refused_request_whose_prompt_is_computed_ends_cleanly(model_dir, how):
    pipe = overstated_decode(model_dir)
    prompts = make_prompts(384, lengths=(40, 40), seed=5)
    pipe.submit("a", prompts[0], SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True))  # 8 blocks
    pipe.submit("b", prompts[1], GREEDY)
    pipe.deliver("scheduler")
    pipe.deliver("prefill-0")
    pipe.step("prefill-0")
    for _ in range(6):  # decode refuses b; a decodes a few steps
        pipe.deliver()
        pipe.step("decode-0")
    assert "b" in pipe.scheduler.queue
    if how == "abort":
        pipe.send("scheduler", AbortRequest(request_id="b", reason="client gone"))
    else:
        pipe.clock.now += 1000.0
        pipe.scheduler.tick()
    pipe.run()
    assert pipe.state("b") in ("ABORTED", "FAILED") and pipe.leak_free()


def make_transfer():
    from pdpipe.transfer.worker import TransferWorker

    backend, sent = FakeTransfer(), []
    return TransferWorker("transfer", backend, 2, lambda dest, msg: sent.append((dest, msg))), backend, sent


@pytest.mark.parametrize("blocks_first", [True, False])
def test_layers_wait_for_decode_blocks_whichever_comes_first(blocks_first):
    from pdpipe.messages import DecodeBlocks, KVLanded, LayersReady, PrefillDone, TransferStart

    worker, backend, sent = make_transfer()
    blocks = DecodeBlocks(request_id="r", instance="d", block_ids=[7, 8])
    if blocks_first:
        worker.handle(blocks)
    worker.handle(TransferStart(request_id="r", src_instance="p", src_block_ids=[1, 2], dst_instance="d"))
    worker.handle(LayersReady(request_ids=["r"], layer=0))
    if not blocks_first:
        assert backend.sent == []  # nowhere to write yet
        worker.handle(LayersReady(request_ids=["r"], layer=1))
        worker.handle(PrefillDone(request_id="r", first_token=3))
        worker.handle(blocks)
        assert backend.batches == [(["r"], 0), (["r"], 1)]  # both layers in one batch call
    else:
        worker.handle(LayersReady(request_ids=["r"], layer=1))
        worker.handle(PrefillDone(request_id="r", first_token=3))
    assert sorted(backend.sent) == [("r", 0), ("r", 1)]
    assert [(d, m.first_token) for d, m in sent if isinstance(m, KVLanded)] == [("d", 3)]


def test_messages_after_an_abort_move_nothing():
    from pdpipe.messages import AbortTransfer, DecodeBlocks, Free, LayersReady, TransferStart

    worker, backend, sent = make_transfer()
    worker.handle(AbortTransfer(request_id="r", decode_instance="d", reason="client gone"))
    worker.handle(TransferStart(request_id="r", src_instance="p", src_block_ids=[1], dst_instance="d"))
    worker.handle(DecodeBlocks(request_id="r", instance="d", block_ids=[5]))
    worker.handle(LayersReady(request_ids=["r"], layer=1, count=2))
    assert backend.sent == [] and not worker.jobs and not worker.has_work()
    assert [(d, m.request_id) for d, m in sent if isinstance(m, Free)] == [("d", "r")]


def test_whole_requests_on_a_prefill_instance_equal_colocated_and_free_everything(model_dir, colocated):
    from pdpipe.config import RoutingConfig
    from pdpipe.messages import InstanceStats

    pipe = LocalPipeline(model_dir("qwen3"), PD, routing=RoutingConfig(disaggregation="always",
                                                                       decode_busy_ms=5))
    pipe.scheduler.handle(InstanceStats(instance="decode-0", role="decode", time=0.0, num_blocks=64,
                                        block_size=8, max_num_seqs=8, step_seconds=0.05))
    prompts = make_prompts(384, lengths=(12, 30, 7), seed=9)
    for i, p in enumerate(prompts):
        pipe.submit(str(i), p, GREEDY)
    pipe.submit("gone", prompts[1], SamplingParams(max_tokens=30, temperature=0.0))
    abort_at(pipe, "gone", "DECODING")
    pipe.run()
    for i, p in enumerate(prompts):
        assert pipe.tokens(str(i)) == colocated(p).token_ids and pipe.state(str(i)) == "FINISHED"
        assert pipe.scheduler.recent[str(i)].whole == "prefill-0"
    assert pipe.state("gone") == "ABORTED" and pipe.scheduler.decisions == {"whole": 4}
    assert not pipe.scheduler.ledger.commitments and not pipe.transfer.jobs
    assert pipe.leak_free()


def test_decode_blocks_before_the_start_then_an_abort_leave_nothing_behind():
    from pdpipe.messages import AbortTransfer, DecodeBlocks, Free

    worker, backend, sent = make_transfer()
    worker.handle(DecodeBlocks(request_id="r", instance="d", block_ids=[5]))
    assert "r" in worker._blocks
    worker.handle(AbortTransfer(request_id="r", decode_instance="d"))
    assert not worker._blocks and not worker.jobs and [d for d, m in sent if isinstance(m, Free)] == ["d"]


def test_a_prefill_instance_announces_layers_only_in_steps_that_hand_prompts_over(model_dir, colocated):
    """Decode steps of whole requests on a prefill instance run without the per-layer announcer (on a
    GPU they replay CUDA graphs); a step that finishes a remote request's prompt announces its layers."""
    from pdpipe.config import RoutingConfig
    from pdpipe.messages import InstanceStats

    pipe = LocalPipeline(model_dir("qwen3"), PD, routing=RoutingConfig(disaggregation="always",
                                                                       decode_busy_ms=5))
    engine, steps = pipe.engines["prefill-0"], []
    execute = engine.runner.execute

    def recording(sched, on_layer_done=None):
        prompt_ends = {c.seq.request_id for c in sched.chunks if c.samples and c.seq.num_output_tokens == 0}
        steps.append((prompt_ends, on_layer_done is not None))
        return execute(sched, on_layer_done)

    engine.runner.execute = recording

    def decode_steps(seconds: float) -> None:
        pipe.scheduler.handle(InstanceStats(instance="decode-0", role="decode", time=0.0, num_blocks=64,
                                            block_size=8, max_num_seqs=8, step_seconds=seconds))

    prompts = make_prompts(384, lengths=(12, 30, 7), seed=4)
    decode_steps(0.05)  # decode is slow: the first two run whole on the prefill instance
    pipe.submit("whole-0", prompts[0], GREEDY)
    pipe.submit("whole-1", prompts[1], GREEDY)
    pipe.deliver()
    decode_steps(0.001)
    pipe.submit("remote", prompts[2], GREEDY)
    pipe.run()
    assert {rid: pipe.scheduler.recent[rid].whole for rid in ("whole-0", "whole-1", "remote")} == \
        {"whole-0": "prefill-0", "whole-1": "prefill-0", "remote": ""}
    assert all(announced == ("remote" in ends) for ends, announced in steps)
    assert sum(announced for _, announced in steps) == 1 and sum(not ends for ends, _ in steps) > 5
    for i, rid in enumerate(("whole-0", "whole-1", "remote")):
        assert pipe.tokens(rid) == colocated(prompts[i]).token_ids
    assert pipe.leak_free()


@pytest.mark.parametrize("stage", ["RESERVED", "PREFILLING", "TRANSFERRING", "DECODING"])
def test_drop_all_after_the_scheduler_died_leaves_engines_and_transfer_empty(model_dir, stage):
    """The launcher's `DropAll` to every engine and the transfer, with requests anywhere in flight (and
    the messages the dead scheduler had sent still arriving): a new scheduler finds nothing held."""
    from pdpipe.config import DeadlineConfig
    from pdpipe.messages import DropAll
    from pdpipe.scheduler.core import SchedulerCore

    pipe = LocalPipeline(model_dir("qwen3"), PD, max_num_batched_tokens=16)  # 30 tokens: two steps
    for i, p in enumerate(make_prompts(384, lengths=(12, 30, 7, 20), seed=5)):
        pipe.submit(str(i), p, SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True))
    for _ in range(1000):  # run until request 1 is at `stage`
        if pipe.state("1") == stage:
            break
        if not pipe.deliver(only="scheduler") and not pipe.deliver():
            next(w for w in pipe.workers.values() if w.has_work()).step()
    assert pipe.state("1") == stage
    pipe.queues["scheduler"].clear()  # the scheduler dies: what was on its way to it is lost
    pipe.scheduler = SchedulerCore(PD, DeadlineConfig(), pipe.send, pipe.clock)
    for name in [*pipe.workers, "transfer"]:
        pipe.queues[name].appendleft(DropAll(reason="scheduler died"))  # next in each inbox
        pipe.deliver(only=name)
    assert not any(e.has_unfinished() or e.scheduler.held or e.reserved for e in pipe.engines.values())
    assert not pipe.transfer.jobs
    pipe.deliver(only="api")  # what was computed before
    outputs = sum(len(o) for o in pipe.outputs.values())
    pipe.run()
    assert sum(len(o) for o in pipe.outputs.values()) == outputs  # nothing was computed further
    assert pipe.leak_free()
