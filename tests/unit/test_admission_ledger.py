"""The admission ledger counts blocks shared through decode's prefix cache once per copy: never fewer than
decode holds for the requests it admitted (else decode refuses what the ledger admits), and no more than
their whole rooms."""
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pdpipe.engine.block_manager import BlockManager
from pdpipe.kv_hash import block_hashes, root_hash
from pdpipe.messages import InstanceStats
from pdpipe.scheduler.admission import DecodeLedger

BS = 4
ROOT = root_hash("m")


def ledger_for(num_blocks=64, pool_blocks=0, block_size=BS):
    ledger = DecodeLedger()
    ledger.report(InstanceStats(instance="d", role="decode", time=0.0, num_blocks=num_blocks, block_size=block_size,
                                max_num_seqs=100, pool_blocks=pool_blocks))
    return ledger


def test_a_shared_prefix_is_committed_once_and_stays_committed_while_anyone_holds_it():
    ledger = ledger_for()
    room = ledger.room("d")
    prompt = list(range(40))  # 10 full blocks; +8 tokens of output: 12 blocks of room
    hashes = block_hashes(prompt, BS, ROOT)
    ledger.commit("a", "d", 48, hashes, shared=0, block_size=BS)  # computes the prefix: owns it
    assert room.blocks == 12
    ledger.commit("b", "d", 48, hashes, shared=10, block_size=BS)  # a's copy landed: b shares it
    ledger.commit("c", "d", 48, hashes, shared=10, block_size=BS)
    assert room.blocks == 12 + 2 + 2
    ledger.release("a")  # b and c still hold the prefix a computed
    assert room.blocks == 10 + 2 + 2
    ledger.release("b")
    assert room.blocks == 12
    ledger.release("c")
    assert room.blocks == 0 and not room.held and room.hashed == 0


def test_sharing_a_cached_copy_no_one_holds_costs_its_blocks_once():
    ledger = ledger_for()
    room = ledger.room("d")
    hashes = block_hashes(list(range(40)), BS, ROOT)
    ledger.commit("b", "d", 48, hashes, shared=10, block_size=BS)  # cached, free: taking it uses free room
    ledger.commit("c", "d", 48, hashes, shared=10, block_size=BS)
    assert room.blocks == 10 + 2 + 2


def test_two_owners_of_one_prefix_count_twice_and_a_later_sharer_does_not_hide_the_first_copy():
    """a and b computed the same prompt at once (two copies); a ends, its copy (the one cached, say) stays;
    c shares it: b's copy and the cached one are both held."""
    ledger = ledger_for()
    room = ledger.room("d")
    hashes = block_hashes(list(range(40)), BS, ROOT)
    ledger.commit("a", "d", 40, hashes, block_size=BS)
    ledger.commit("b", "d", 40, hashes, block_size=BS)
    assert room.blocks == 20
    ledger.release("a")
    ledger.commit("c", "d", 40, hashes, shared=10, block_size=BS)
    assert room.blocks == 20


def test_settling_at_reserved_takes_decodes_word_over_the_index():
    ledger = ledger_for()
    room = ledger.room("d")
    hashes = block_hashes(list(range(40)), BS, ROOT)
    ledger.commit("a", "d", 40, hashes, block_size=BS)
    ledger.commit("b", "d", 40, hashes, shared=0, block_size=BS)  # the index had not heard of a's blocks
    assert room.blocks == 20
    ledger.settle("b", 10)  # decode took a's copy
    assert room.blocks == 10
    ledger.commit("c", "d", 40, hashes, shared=10, block_size=BS)
    ledger.settle("c", 4)  # 6 of them evicted meanwhile: computed again, a copy of c's own
    assert room.blocks == 16
    for rid in "abc":
        ledger.release(rid)
    assert room.blocks == 0 and not room.held


def test_partitioned_pools_and_other_block_sizes_share_nothing():
    hashes = block_hashes(list(range(40)), BS, ROOT)
    for ledger in (ledger_for(pool_blocks=32), ledger_for(block_size=8)):
        room = ledger.room("d")
        ledger.commit("a", "d", 40, hashes, block_size=BS)
        ledger.commit("b", "d", 40, hashes, shared=10, block_size=BS)
        assert room.blocks == 2 * room.blocks_for(40)


# ---- against decode's own block manager ------------------------------------------------------------
PREFIXES = [list(range(1000 + 100 * p, 1000 + 100 * p + 24)) for p in range(3)]  # 6 blocks each

op = st.one_of(
    st.tuples(st.just("new"), st.integers(0, 2), st.integers(0, 13), st.integers(1, 12), st.integers(-3, 3)),
    st.tuples(st.just("land"), st.integers(0, 50)),
    st.tuples(st.just("fill"), st.integers(0, 50)),
    st.tuples(st.just("end"), st.integers(0, 50)),
    st.tuples(st.just("follow"), st.integers(0, 50), st.integers(1, 9)),
)


@settings(max_examples=200, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(ops=st.lists(op, max_size=60))
def test_the_ledger_never_counts_fewer_blocks_than_decode_holds(ops):
    """Requests over shared system prompts and follow-ups of earlier ones (their replies included) reserve
    on a real block manager: it takes its cached blocks, allocates the rest, registers the prompt's blocks
    when they land and the reply's as they fill, and lets go at the end. The ledger commits with a guess of
    decode's hit that may be off by a few blocks (its index lags), settled by decode's word. At every step
    the ledger's count covers the blocks decode holds and stays within the requests' whole rooms."""
    bm = BlockManager(num_blocks=48, block_size=BS)
    ledger = ledger_for(num_blocks=48)
    room = ledger.room("d")
    live: dict[str, tuple[list[int], list[int], list[int]]] = {}  # rid → (prompt, reply, block table)
    done: list[tuple[list[int], list[int]]] = []
    landed: set[str] = set()
    n = 0

    def reserve(prompt: list[int], out: int, lag: int) -> None:
        nonlocal n
        rid, n = f"r{n}", n + 1
        hashes = block_hashes(prompt, BS, ROOT)
        cached = bm.match(hashes, len(hashes))
        tokens = len(prompt) + out
        ledger.commit(rid, "d", tokens, hashes, max(0, min(len(hashes), len(cached) + lag)), BS)
        need = bm.blocks_for(tokens) - len(cached)
        if not bm.can_allocate(need, cached):
            ledger.refused(rid)
            return
        bm.share(cached)
        table = cached + bm.allocate(need)
        ledger.settle(rid, len(cached))
        live[rid] = (prompt, [7000 + n * 50 + i for i in range(out)], table)

    def register(rid: str, tokens: list[int]) -> None:
        table = live[rid][2]
        for i, h in enumerate(block_hashes(tokens, BS, ROOT)):
            bm.register(table[i], h)

    for kind, *args in ops:
        rids = sorted(live)
        if kind == "new":
            prefix, extra, out, lag = args
            reserve(PREFIXES[prefix] + [5000 + n * 20 + i for i in range(extra)], out, lag)
        elif kind == "follow" and (done or live):
            pool = [(p, r) for p, r, _ in live.values()] + done
            prompt, reply = pool[args[0] % len(pool)]
            reserve(prompt + reply + [9000 + n * 20 + i for i in range(args[1])], 4, 0)
        elif rids:
            rid = rids[args[0] % len(rids)]
            prompt, reply, table = live[rid]
            if kind == "land":
                register(rid, prompt)
                landed.add(rid)
            elif kind == "fill" and rid in landed:
                register(rid, prompt + reply)
            elif kind == "end":
                bm.free(table)
                ledger.release(rid)
                del live[rid]
                if rid in landed:
                    done.append((prompt, reply))
        assert room.blocks >= bm.num_used_blocks
        assert room.blocks <= sum(room.blocks_for(t) for _, t in ledger.commitments.values())
        assert room.seqs == len(live) == len(ledger.commitments)
    for rid, (_, _, table) in list(live.items()):
        bm.free(table)
        ledger.release(rid)
    assert room.blocks == 0 and not room.held and bm.num_used_blocks == 0
