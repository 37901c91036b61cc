"""Continuous batching (llmctl/model/scheduler.py): requests that join and leave a running batch at
different steps get exactly what each gets alone from Engine.generate, and a cancelled request frees
its rows at once."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from llmctl.model.engine import Engine, SamplingParams
from llmctl.model.scheduler import RowEvent, Scheduler, SlotCache
from llmctl.model.transformer import KVCache
from tests.test_model import make_model

# Ragged prompts; the 23-token one is prefilled in chunks of 8 over 3 steps, between decode steps.
PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [3, 4], [100, 101, 102, 103], list(range(30, 53)), [7], [9, 8, 7, 6, 5]]
MAX_NEW = [12, 5, 9, 7, 14, 3]
ARRIVAL_STEP = [0, 0, 2, 3, 3, 9]  # the step before which request j is submitted


def letters(ids: list[int]) -> str:
    return "".join(chr(97 + i % 26) for i in ids)


@pytest.fixture(scope="module")
def model():
    return make_model()


def run_staggered(engine: Engine, params: list[SamplingParams], n: int = 1, **kw) -> list[dict[int, list]]:
    """Submit request j before step ARRIVAL_STEP[j], step until all finish; events per request."""
    scheduler = Scheduler(engine, max_rows=kw.pop("max_rows", 8), prefill_chunk=8, **kw)
    events: list[dict[int, list]] = [{} for _ in PROMPTS]
    step = 0
    pending = list(range(len(PROMPTS)))
    while pending or scheduler.busy:
        for j in [j for j in pending if ARRIVAL_STEP[j] <= step]:
            pending.remove(j)

            def collect(ev, j=j):
                assert isinstance(ev, RowEvent), ev
                events[j].setdefault(ev.index, []).append(ev)

            scheduler.submit(PROMPTS[j], params[j], n=n, on_event=collect)
        scheduler.step()
        step += 1
        assert step < 200
    assert scheduler._kv_used == 0 and scheduler.cache.rows == 0
    return events


def tokens(evs: list[RowEvent]) -> list[int]:
    return [e.token for e in evs if e.token is not None]


@pytest.mark.parametrize("packed", [True, False], ids=["packed", "forward"])
def test_greedy_requests_arriving_at_different_steps_equal_each_alone(model, packed):
    engine = Engine(model, decode=letters, packed=packed)
    params = [SamplingParams(max_new_tokens=m, temperature=0) for m in MAX_NEW]
    events = run_staggered(engine, params, max_rows=4)  # fewer rows than requests: some wait
    for j, prompt in enumerate(PROMPTS):
        [alone] = engine.generate([prompt], params[j])
        evs = events[j][0]
        assert tokens(evs) == alone.tokens, j
        assert "".join(e.text for e in evs) == alone.text
        assert evs[-1].finish_reason == alone.finish_reason == "length"


def test_whole_prompts_prefilled_in_one_forward_equal_each_alone(model):
    """Prompts that fit one step's budget share one right-padded forward; each still gets exactly
    what it gets alone (the padding after a prompt is invisible to it under causal attention)."""
    engine = Engine(model, decode=letters)
    prompts = [PROMPTS[0], PROMPTS[1], PROMPTS[2], PROMPTS[5]]  # 7, 2, 4 and 5 tokens
    params = SamplingParams(max_new_tokens=6, temperature=0)
    scheduler = Scheduler(engine, max_rows=8, prefill_chunk=64)
    events: list[list[RowEvent]] = [[] for _ in prompts]
    for j, prompt in enumerate(prompts):
        scheduler.submit(prompt, params, on_event=events[j].append)
    prefills = []
    hook = model.register_forward_hook(lambda m, args, out: prefills.append(args[0].shape))
    try:
        scheduler.step()
    finally:
        hook.remove()
    assert prefills == [(4, 7)] and all(events)  # all four started in the first step
    while scheduler.busy:
        scheduler.step()
    for j, prompt in enumerate(prompts):
        [alone] = engine.generate([prompt], params)
        assert tokens(events[j]) == alone.tokens, j


def test_a_shared_prefix_is_computed_once_and_kept_for_later_requests(model):
    """Chat traffic shares a system prompt: its keys and values are computed once per step's batch
    and kept, so a later request computes only its own tokens; outputs still equal each alone."""
    engine = Engine(model, decode=letters)
    system = list(range(200, 240))  # 40 tokens every prompt starts with
    prompts = [system + [5, 6, 7], system + [3], system + [9, 8, 7, 6], system + [11, 12]]
    params = SamplingParams(max_new_tokens=6, temperature=0)
    scheduler = Scheduler(engine, max_rows=8)
    events: list[list[RowEvent]] = [[] for _ in prompts]
    forwards = []  # the model's forward runs prefills only (decode steps go through the packed copy)
    hook = model.register_forward_hook(lambda m, args, out: forwards.append(tuple(args[0].shape)))
    try:
        for j in range(3):
            scheduler.submit(prompts[j], params, on_event=events[j].append)
        scheduler.step()
        assert forwards == [(1, 40), (3, 4)]  # the prefix once, then the three suffixes together
        scheduler.submit(prompts[3], params, on_event=events[3].append)
        scheduler.step()
        assert forwards[2:] == [(1, 2)]  # the kept prefix: only the request's own two tokens
    finally:
        hook.remove()
    while scheduler.busy:
        scheduler.step()
    for j, prompt in enumerate(prompts):
        [alone] = engine.generate([prompt], params)
        assert tokens(events[j]) == alone.tokens, j
    without = Scheduler(engine, max_rows=8, prefix_entries=0)
    events_without: list[RowEvent] = []
    without.submit(prompts[3], params, on_event=events_without.append)
    while without.busy:
        without.step()
    assert tokens(events_without) == tokens(events[3])


def test_the_slot_cache_grows_only_the_dimension_that_is_short(model):
    """A burst of requests adds rows one by one: the positions must not double with every row."""
    cache = SlotCache(Engine(model))
    with torch.inference_mode():  # as the scheduler's steps run
        prompt_kv = KVCache(model.config, 1, 10)
        for _ in range(16):
            cache.add(prompt_kv, 0, 10, 1)
    assert cache.capacity == (16, 64)


def test_each_request_samples_what_it_samples_alone(model):
    """Per-request params (temperature, top_p, top_k, penalty, seed) and n samples per request."""
    engine = Engine(model, decode=letters)
    kinds = [
        dict(temperature=0.7, top_p=0.9, seed=7),
        dict(temperature=1.3, top_k=50, repetition_penalty=1.2, seed=11),
        dict(temperature=0),
    ]
    params = [SamplingParams(max_new_tokens=m, **kinds[j % 3]) for j, m in enumerate(MAX_NEW)]
    events = run_staggered(engine, params, n=3)
    for j, prompt in enumerate(PROMPTS):
        alone = engine.generate([prompt], params[j], n=3)
        assert [tokens(events[j][i]) for i in range(3)] == [a.tokens for a in alone], j


def test_stop_ids_and_stop_strings_end_rows_as_they_do_alone(model):
    engine = Engine(model, decode=letters)
    free = run_staggered(engine, [SamplingParams(max_new_tokens=m, temperature=0) for m in MAX_NEW])
    params = []
    for j in range(len(PROMPTS)):
        out = tokens(free[j][0])
        # a stop id met mid-way for even requests, a stop string of two letters for odd ones
        stop = (
            dict(stop_token_ids=(out[len(out) // 2],))
            if j % 2 == 0
            else dict(stop_strings=(letters(out[1:3]),))
        )
        params.append(SamplingParams(max_new_tokens=MAX_NEW[j], temperature=0, logprobs=True, **stop))
    events = run_staggered(engine, params)
    for j, prompt in enumerate(PROMPTS):
        [alone] = engine.generate([prompt], params[j])
        evs = events[j][0]
        assert tokens(evs) == alone.tokens and evs[-1].finish_reason == alone.finish_reason == "stop", j
        assert "".join(e.text for e in evs) == alone.text
        logprobs = [e.logprob for e in evs if e.token is not None]
        torch.testing.assert_close(torch.tensor(logprobs), torch.tensor(alone.logprobs), atol=1e-4, rtol=1e-4)


def test_a_cancelled_request_frees_its_rows_for_the_next(model):
    engine = Engine(model)
    scheduler = Scheduler(engine, max_rows=2)
    got: dict[str, list[RowEvent]] = {"a": [], "b": []}
    params = SamplingParams(max_new_tokens=50, temperature=0)
    a = scheduler.submit([1, 2, 3], params, n=2, on_event=got["a"].append)
    scheduler.submit([4, 5], replace(params, max_new_tokens=3), on_event=got["b"].append)
    for _ in range(3):
        scheduler.step()
    # a's 2 rows: a token from the prefill, then one per decode step (the first in the same step)
    assert len(got["a"]) == 8 and not got["b"]  # b waits: a holds both rows
    a.cancel()
    scheduler.step()  # a's rows freed, b admitted and decoding in the same step
    assert len(got["a"]) == 8 and len(got["b"]) == 2
    while scheduler.busy:
        scheduler.step()
    assert [e.finish_reason for e in got["b"]] == [None, None, "length"]
    assert scheduler._kv_used == 0 and scheduler.cache.rows == 0


def test_the_background_thread_serves_concurrent_submissions(model):
    engine = Engine(model)
    scheduler = Scheduler(engine, max_rows=4)
    scheduler.start()
    try:
        import threading

        done = threading.Event()
        results: dict[int, list[int]] = {j: [] for j in range(len(PROMPTS))}
        left = [len(PROMPTS)]

        def on_event(ev, j):
            if ev.token is not None:
                results[j].append(ev.token)
            if ev.finish_reason:
                left[0] -= 1
                if not left[0]:
                    done.set()

        for j, prompt in enumerate(PROMPTS):
            params = SamplingParams(max_new_tokens=MAX_NEW[j], temperature=0)
            scheduler.submit(prompt, params, on_event=lambda ev, j=j: on_event(ev, j))
        assert done.wait(30)
    finally:
        scheduler.stop()
    for j, prompt in enumerate(PROMPTS):
        assert (
            results[j]
            == engine.generate([prompt], SamplingParams(max_new_tokens=MAX_NEW[j], temperature=0))[0].tokens
        )
