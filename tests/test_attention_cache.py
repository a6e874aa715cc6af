"""The slot-pool attention cache on its own: a stand-in attention module whose output is its
input, so every value a CACHED row receives can be computed by hand."""

from __future__ import annotations

import pytest
import torch

from engine.attention import AttentionCache
from engine.request import GenerationRequest
from engine.scheduler import ScheduledRequest, StepPlan, make_plan
from engine.slots import SlotTable


class Identity:
    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None):
        return hidden_states.clone(), encoder_hidden_states.clone()


class FakeAttention(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.processor = Identity()
        self.calls: list[int] = []  # rows entering the wrapped processor

    def set_processor(self, processor) -> None:
        self.processor = processor

    def forward(self, hidden, text, cache_step=None):
        return self.processor(self, hidden, text, cache_step=cache_step)


def count_rows(module: FakeAttention) -> None:
    inner = module.processor.inner

    def counting(attn, hidden, text, mask=None):
        module.calls.append(hidden.shape[0])
        return inner(attn, hidden, text, mask)

    module.processor.inner = counting


class Planned:
    """An `AttentionCache` driven the way the engine drives it: the scheduler's slot table and
    requests (engine/slots.py, engine/scheduler.py) plan each step; the cache only indexes."""

    def __init__(self, module: FakeAttention, history: int = 1) -> None:
        self.attention = AttentionCache(module, history=history)
        self.order = history - 1
        halves = history
        self.slots = SlotTable(lambda key: halves * (3 * 2 + 2 * 2) * 4)  # image (3x2) + text (2x2), float32
        self.requests: dict[str, ScheduledRequest] = {}

    def plan(self, ids, fresh, steps, caches, group) -> StepPlan:
        reqs = []
        for rid, keeps, at in zip(ids, caches, steps):
            req = self.requests.get(rid)
            if req is None:
                request = GenerationRequest(
                    prompt=rid, request_id=rid, height=group[0], width=group[1], steps=100, guidance_scale=1.0
                )  # one row per request
                req = self.requests[rid] = ScheduledRequest(request, "attention", 2)
                req.slots = self.slots.allocate(group, 1) if keeps else ()
            req.policy = "attention" if keeps else "exact"
            assert req.step == at, "the steps given must follow on"
            reqs.append(req)
        return make_plan(group, reqs, fresh, self.slots, order=self.order)

    def release(self, rid: str) -> None:
        req = self.requests.pop(rid)
        self.slots.free(req.key, req.slots)

    def trim(self) -> None:
        self.attention.drop_pools(self.slots.release_idle())

    def nbytes(self) -> int:
        return self.slots.used_bytes()

    def allocated_bytes(self) -> int:
        assert self.attention.allocated_bytes() == self.slots.allocated_bytes()  # one figure
        return self.attention.allocated_bytes()

    @property
    def generation(self) -> int:
        return self.attention.generation


def step(cache: Planned, module, ids, fresh, steps, values, caches=None, group=(8, 8), frozen=None):
    """Rows hold `values` (one number per row); returns what the attention gives each row.
    `frozen`: a list holding the index buffers to run the step on (as a CUDA graph replay does),
    or an empty one to freeze this step's and keep them there (as a capture does)."""
    plan = cache.plan(ids, fresh, steps, caches or [True] * len(ids), group)
    cache.attention.drop_pools(plan.free_pools)
    context = cache.attention.begin_step(plan, list(range(len(ids))))
    if frozen == []:
        frozen.append(AttentionCache.freeze_step(context))
    elif frozen is not None:
        AttentionCache.load_step(context, frozen[0])
    hidden = torch.tensor(values, dtype=torch.float32).view(-1, 1, 1).expand(-1, 3, 2).contiguous()
    text = hidden[:, :2] * 10
    image_out, text_out = module(hidden, text, cache_step=context)
    for req, was_fresh in zip(plan.requests, plan.fresh):
        req.record_step(was_fresh)
    assert torch.equal(text_out, image_out[:, :2] * 10)  # both streams cached alike
    return image_out[:, 0, 0].tolist()


@pytest.mark.parametrize("extrapolate", [False, True])
def test_cached_rows_get_held_or_extrapolated_outputs(extrapolate):
    module = FakeAttention()
    cache = Planned(module, history=2 if extrapolate else 1)
    count_rows(module)
    assert step(cache, module, ["a", "b"], [True, True], [0, 0], [1.0, 5.0]) == [1.0, 5.0]
    # b is CACHED with one refresh so far: a hold, whatever the strategy
    assert step(cache, module, ["a", "b"], [True, False], [1, 1], [2.0, 99.0]) == [2.0, 5.0]
    assert step(cache, module, ["a", "b"], [False, True], [2, 2], [99.0, 7.0]) == [3.0 if extrapolate else 2.0, 7.0]
    # a: refreshed at steps 0 (1.0) and 1 (2.0); at step 3 extrapolation gives 2 + (2 - 1) * 2 = 4
    # b: refreshed at 0 (5.0) and 2 (7.0); at step 3, 7 + (7 - 5) * 1 / 2 = 8
    got = step(cache, module, ["a", "b"], [False, False], [3, 3], [99.0, 99.0])
    assert got == ([4.0, 8.0] if extrapolate else [2.0, 7.0])
    assert module.calls == [2, 1, 1]  # only FRESH rows entered attention; none on the last step


def test_second_order_cache_keeps_three_refreshes_and_extrapolates_a_quadratic():
    """history=3: a CACHED row gets the quadratic through its last three refreshes (first order
    until it has three); the pool holds three refreshes per slot."""
    module = FakeAttention()
    cache = Planned(module, history=3)
    count_rows(module)
    quadratic = lambda t: 1.0 + t * t  # noqa: E731
    for t in range(3):  # refreshes at steps 0, 1, 2: 1, 2, 5
        assert step(cache, module, ["a"], [True], [t], [quadratic(t)]) == [quadratic(t)]
    assert step(cache, module, ["a"], [False], [3], [99.0]) == [pytest.approx(quadratic(3))]
    assert step(cache, module, ["a"], [True], [4], [quadratic(4)]) == [quadratic(4)]  # overwrites step 1's
    assert step(cache, module, ["a"], [False], [5], [99.0]) == [pytest.approx(quadratic(5))]  # through steps 1, 2 and 4
    assert module.calls == [1, 1, 1, 1]
    assert cache.allocated_bytes() == 3 * (3 * 2 + 2 * 2) * 4


def test_second_order_cache_is_linear_with_two_refreshes():
    module = FakeAttention()
    cache = Planned(module, history=3)
    step(cache, module, ["a"], [True], [0], [1.0])
    step(cache, module, ["a"], [True], [1], [3.0])
    assert step(cache, module, ["a"], [False], [2], [99.0]) == [5.0]  # 3 + (3 - 1)


def test_history_is_checked():
    with pytest.raises(ValueError, match="history"):
        AttentionCache(FakeAttention(), history=4)


def test_slots_are_reused_and_idle_pools_are_kept_until_trimmed():
    module = FakeAttention()
    cache = Planned(module, history=2)
    step(cache, module, ["a", "b", "c"], [True] * 3, [0] * 3, [1.0, 2.0, 3.0])
    per_row = cache.allocated_bytes() // 3
    assert cache.nbytes() == 3 * per_row
    assert per_row == 2 * (3 * 2 + 2 * 2) * 4  # last + previous, image (3x2) + text (2x2), float32
    cache.release("b")
    assert cache.nbytes() == 2 * per_row
    assert cache.allocated_bytes() == 3 * per_row  # the pool keeps its high-water size
    # d takes b's slot: no growth, and it never sees b's values
    assert step(cache, module, ["a", "d", "c"], [False, True, False], [1, 0, 1], [9.0, 4.0, 9.0]) == [1.0, 4.0, 3.0]
    assert cache.allocated_bytes() == 3 * per_row
    assert step(cache, module, ["a", "d", "c"], [False, False, False], [2, 1, 2], [9.0] * 3) == [1.0, 4.0, 3.0]
    for rid in ("a", "c", "d"):
        cache.release(rid)
    # Idle, the size keeps its pools (the CUDA graphs of its cached steps hold their addresses) ...
    generation = cache.generation
    assert cache.nbytes() == 0 and cache.allocated_bytes() == 3 * per_row
    assert step(cache, module, ["e"], [True], [0], [5.0]) == [5.0]
    assert cache.generation == generation and cache.allocated_bytes() == 3 * per_row  # reused, not regrown
    cache.release("e")
    # ... until a step of another size frees them (even one without cached rows), or `trim` does.
    step(cache, module, ["f"], [True], [0], [6.0], group=(4, 4))
    assert cache.generation > generation and cache.allocated_bytes() == per_row
    cache.release("f")
    step(cache, module, ["f"], [True], [0], [6.0], group=(4, 4))  # its own size: kept
    assert cache.allocated_bytes() == per_row
    cache.release("f")
    step(cache, module, ["x"], [True], [0], [7.0], caches=[False], group=(2, 2))  # an exact row elsewhere
    assert cache.nbytes() == 0 and cache.allocated_bytes() == 0
    step(cache, module, ["g"], [True], [0], [8.0], group=(4, 4))
    cache.release("g")
    cache.trim()
    assert cache.allocated_bytes() == 0


FROZEN_PLANS = {
    # one FRESH row of three, anywhere: the merge gathers and scatters
    "scattered": [
        (["a", "b", "c"], [False, True, False], [0.0, 5.0, 0.0]),
        (["a", "b", "c"], [False, False, True], [0.0, 0.0, 6.0]),
        (["a", "b", "c"], [False, True, False], [0.0, 7.0, 0.0]),
    ],
    # the FRESH request first, as the runner orders a batch: the merge is a concatenation
    "fresh_first": [
        (["b", "a", "c"], [True, False, False], [5.0, 0.0, 0.0]),
        (["c", "a", "b"], [True, False, False], [6.0, 0.0, 0.0]),
        (["a", "b", "c"], [True, False, False], [7.0, 0.0, 0.0]),
    ],
}


@pytest.mark.parametrize("order", sorted(FROZEN_PLANS))
@pytest.mark.parametrize("extrapolate", [False, True])
def test_a_step_on_frozen_index_buffers_refilled_each_step_gives_the_same_outputs(extrapolate, order):
    """What a CUDA graph of a cached step relies on: the indices live in buffers of their own,
    `load_step` refills them for a step of the same signature, and the outputs follow."""
    plain, graphed = FakeAttention(), FakeAttention()
    caches = Planned(plain, history=2 if extrapolate else 1), Planned(graphed, history=2 if extrapolate else 1)
    for cache, module in zip(caches, (plain, graphed)):
        step(cache, module, ["a", "b", "c"], [True] * 3, [0] * 3, [1.0, 2.0, 3.0])
        step(cache, module, ["a", "b", "c"], [True, False, False], [1] * 3, [4.0, 0.0, 0.0])
    frozen: list = []
    outputs = []
    for n, (ids, fresh, values) in enumerate(FROZEN_PLANS[order]):
        want = step(caches[0], plain, ids, fresh, [2 + n] * 3, values)
        assert step(caches[1], graphed, ids, fresh, [2 + n] * 3, values, frozen=frozen) == want
        outputs.append(dict(zip(ids, want)))
    assert frozen[0].fresh_first == (order == "fresh_first")
    # Whatever the order, each request gets its own values: a refreshed at steps 0 (1.0) and 1
    # (4.0), b at 0 (2.0) and 2 (5.0), c at 0 (3.0) and 3 (6.0).
    assert outputs[0] == {"a": 7.0 if extrapolate else 4.0, "b": 5.0, "c": 3.0}
    assert outputs[1] == {"a": 10.0 if extrapolate else 4.0, "b": 6.5 if extrapolate else 5.0, "c": 6.0}
    mismatched = ["a", "b", "c"], [True, True, False], [5] * 3, [0.0] * 3
    with pytest.raises(ValueError, match="signature"):
        step(caches[1], graphed, *mismatched, frozen=frozen)
    assert caches[1].generation == caches[0].generation  # no pool was created or grown after the first step


def test_sizes_have_their_own_pools_and_rows_without_cache_keep_nothing():
    module = FakeAttention()
    cache = Planned(module)
    step(cache, module, ["a"], [True], [0], [1.0], group=(8, 8))
    step(cache, module, ["b", "x"], [True, True], [0, 0], [2.0, 3.0], caches=[True, False], group=(16, 16))
    assert cache.nbytes() == 2 * ((3 * 2 + 2 * 2) * 4)  # a and b; the exact row x keeps nothing
    assert step(cache, module, ["b", "x"], [False, True], [1, 1], [0.0, 6.0], caches=[True, False], group=(16, 16)) == [2.0, 6.0]
    with pytest.raises(RuntimeError, match="must be FRESH"):
        step(cache, module, ["x"], [False], [2], [0.0], group=(16, 16))


def test_growing_the_pool_keeps_both_refreshes_of_every_slot():
    """A new request grows every layer's pool; the halves move with the capacity."""
    module = FakeAttention()
    cache = Planned(module, history=2)
    step(cache, module, ["a", "b"], [True, True], [0, 0], [1.0, 10.0])
    step(cache, module, ["a", "b"], [True, True], [1, 1], [2.0, 20.0])  # second refreshes: a=1,2 b=10,20
    before = cache.allocated_bytes()
    # c arrives FRESH while a and b are CACHED: the pool grows from 2 to 3 slots mid-step
    got = step(cache, module, ["a", "b", "c"], [False, False, True], [2, 2, 0], [0.0, 0.0, 5.0])
    assert got == [3.0, 30.0, 5.0]  # a: 2 + (2 - 1); b: 20 + (20 - 10); c: its own output
    assert cache.allocated_bytes() == before * 3 // 2
    got = step(cache, module, ["a", "b", "c"], [False, False, False], [3, 3, 1], [0.0] * 3)
    assert got == [4.0, 40.0, 5.0]  # c has one refresh: a hold
