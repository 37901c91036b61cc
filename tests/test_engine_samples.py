"""The n-sample engine path (RL rollouts): G completions per prompt from one prefill, each row with its
own random stream, so every sample equals a separate single-prompt generation seeded with its row seed."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from llmctl.errors import InputError
from llmctl.model.decode import PackedDecoder
from llmctl.model.engine import Engine, SamplingParams, row_seed, sample_next
from tests.test_model import make_model

PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [3, 4], [100, 101, 102, 103]]  # ragged: left-padded in one batch
G = 4
SAMPLED = [
    SamplingParams(max_new_tokens=12, temperature=0.7, top_p=0.9, seed=7),
    SamplingParams(max_new_tokens=12, temperature=1.3, top_k=50, repetition_penalty=1.2, seed=11),
]


@pytest.fixture(scope="module")
def model():
    return make_model()


@pytest.fixture(scope="module")
def single(model):
    """The engine for separate single-prompt calls (one, so its packed weights are built once)."""
    return Engine(model)


def alone(engine: Engine, prompt: list[int], params: SamplingParams, prompt_index: int, sample: int):
    """What a separate single-prompt call with the row's derived seed generates."""
    seed = None if params.seed is None else row_seed(params.seed, prompt_index, sample)
    return engine.generate([prompt], replace(params, seed=seed))[0]


@pytest.mark.parametrize("params", SAMPLED, ids=["top_p-t0.7", "top_k-t1.3-penalty"])
@pytest.mark.parametrize("packed", [True, False], ids=["packed", "forward"])
def test_each_sample_equals_its_single_prompt_generation(model, single, params, packed):
    results = Engine(model, packed=packed).generate(PROMPTS, params, n=G)
    assert len(results) == len(PROMPTS) * G
    for j, prompt in enumerate(PROMPTS):
        group = results[j * G : (j + 1) * G]
        assert len({tuple(r.tokens) for r in group}) > 1, "samples of one prompt should differ"
        for i, res in enumerate(group):
            assert res.prompt_tokens == prompt
            assert res.tokens == alone(single, prompt, params, j, i).tokens, (j, i)


def test_rows_sample_the_same_whatever_else_is_in_the_batch(model):
    params = SAMPLED[0]
    together = [r.tokens for r in Engine(model).generate(PROMPTS, params, n=G)]
    first_only = [r.tokens for r in Engine(model).generate(PROMPTS[:1], params, n=2)]
    assert first_only == together[:2]
    # n=1 over several prompts: row j is sample 0 of prompt j.
    singles = [r.tokens for r in Engine(model).generate(PROMPTS, params)]
    assert singles == together[::G]


def test_greedy_samples_are_all_the_single_prompt_greedy_generation(model, single):
    params = SamplingParams(max_new_tokens=12, temperature=0)
    results = Engine(model).generate(PROMPTS, params, n=3)
    for j, prompt in enumerate(PROMPTS):
        expected = alone(single, prompt, params, j, 0).tokens
        assert [r.tokens for r in results[j * 3 : (j + 1) * 3]] == [expected] * 3


@pytest.mark.parametrize("packed", [True, False], ids=["packed", "forward"])
def test_stop_tokens_end_some_rows_early_and_leave_the_others_alone(model, single, packed, monkeypatch):
    params = replace(SAMPLED[0], max_new_tokens=16)
    free = Engine(model).generate(PROMPTS, params, n=G)
    # A token some rows sample after a few steps and others never do.
    counts: dict[int, int] = {}
    for r in free:
        for tok in set(r.tokens[2:]):
            counts[tok] = counts.get(tok, 0) + 1
    stop = max((c, tok) for tok, c in counts.items() if c < len(free))[1]
    events = []
    decoded_rows = []  # rows of each decode step
    if packed:
        step = PackedDecoder.step
        monkeypatch.setattr(
            PackedDecoder,
            "step",
            lambda self, ids, *a, **k: decoded_rows.append(len(ids)) or step(self, ids, *a, **k),
        )
        hook = None
    else:
        hook = model.register_forward_hook(
            lambda module, args, out: decoded_rows.append(args[0].shape[0]) if args[0].shape[1] == 1 else None
        )
    try:
        stopped = Engine(model, packed=packed).generate(
            PROMPTS, replace(params, stop_token_ids=(stop,)), n=G, on_token=events.append
        )
    finally:
        monkeypatch.undo()
        if hook is not None:
            hook.remove()
    n_stopped = 0
    for row, (f, s) in enumerate(zip(free, stopped, strict=True)):
        if stop in f.tokens:
            n_stopped += 1
            assert s.tokens == f.tokens[: f.tokens.index(stop)] and s.finish_reason == "stop", row
        else:
            assert s.tokens == f.tokens and s.finish_reason == "length", row
        assert [e.token for e in events if e.row == row and e.token is not None] == s.tokens
        j, i = divmod(row, G)
        assert s.tokens == alone(single, PROMPTS[j], replace(params, stop_token_ids=(stop,)), j, i).tokens
    assert 0 < n_stopped < len(free)
    # Finished rows leave the decode batch: the step after token k decodes only the rows still
    # running (a row that sampled its stop token as token k is done).
    ends = [len(s.tokens) if s.finish_reason == "stop" else params.max_new_tokens - 1 for s in stopped]
    assert decoded_rows == [sum(k < end for end in ends) for k in range(max(ends))]
    assert decoded_rows[0] == len(free) > decoded_rows[-1]


def test_logprobs_are_the_models_own_over_prompt_and_completion(model):
    params = replace(SAMPLED[1], logprobs=True)
    for res in Engine(model).generate(PROMPTS, params, n=G):
        assert len(res.logprobs) == len(res.tokens) == params.max_new_tokens
        seq = torch.tensor([res.prompt_tokens + res.tokens])
        n_prompt = len(res.prompt_tokens)
        with torch.no_grad():
            log_probs = torch.log_softmax(model(seq)[0, n_prompt - 1 : -1].float(), dim=-1)
        expected = log_probs.gather(1, torch.tensor(res.tokens)[:, None])[:, 0]
        torch.testing.assert_close(torch.tensor(res.logprobs), expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("packed", [True, False], ids=["packed", "forward"])
def test_each_prompt_is_prefilled_once(model, packed):
    shapes = []
    hook = model.register_forward_hook(lambda module, args, out: shapes.append(tuple(args[0].shape)))
    try:
        Engine(model, packed=packed).generate(PROMPTS, replace(SAMPLED[0], max_new_tokens=5), n=G)
    finally:
        hook.remove()
    longest = max(len(p) for p in PROMPTS)
    assert [s for s in shapes if s[1] > 1] == [(len(PROMPTS), longest)]
    # Decode steps: one token for every one of the B * G rows (through forward when not packed).
    assert all(s == (len(PROMPTS) * G, 1) for s in shapes if s[1] == 1)
    assert len(shapes) == (1 if packed else 5)


def test_stream_rows_are_prompt_major(model):
    params = SAMPLED[0]
    rows: dict[int, list[int]] = {}
    for ev in Engine(model).stream(PROMPTS[:2], params, n=3):
        if ev.token is not None:
            rows.setdefault(ev.row, []).append(ev.token)
    results = Engine(model).generate(PROMPTS[:2], params, n=3)
    assert [rows[r] for r in range(6)] == [r.tokens for r in results]


def test_per_row_sampling_draws_from_the_distribution_and_from_its_own_generator_only():
    """Each row draws from its own generator: the same as that row sampled alone; the draws follow
    the row's probabilities; a token cut to probability zero is never drawn."""
    torch.manual_seed(0)
    logits = torch.randn(6, 1000) * 3
    logits[:, 7] = float("-inf")  # cut (as top-k/top-p cut)
    for seed in range(20):
        batched = sample_next(
            logits, SamplingParams(), [torch.Generator().manual_seed(seed + r) for r in range(6)]
        )
        alone = [
            sample_next(logits[r : r + 1], SamplingParams(), [torch.Generator().manual_seed(seed + r)]).item()
            for r in range(6)
        ]
        assert batched.tolist() == alone
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05, 0.0]])
    g = torch.Generator().manual_seed(1)
    draws = torch.stack([sample_next(probs.log(), SamplingParams(), [g]) for _ in range(20000)]).flatten()
    freq = torch.bincount(draws, minlength=5).double() / len(draws)
    assert freq[4] == 0 and torch.allclose(freq, probs[0].double(), atol=0.012), freq


def test_row_seeds():
    assert row_seed(5, 0, 0) == 5  # a single-prompt call keeps its seed
    seeds = {row_seed(s, j, i) for s in range(4) for j in range(8) for i in range(8)}
    assert len(seeds) == 4 * 8 * 8
    assert all(0 <= s < 2**63 for s in seeds)


@pytest.mark.parametrize("n", [0, -1, 2.0])
def test_bad_n_is_an_input_error(model, n):
    with pytest.raises(InputError, match="n \\(samples per prompt\\)"):
        Engine(model).generate(PROMPTS, SAMPLED[0], n=n)
