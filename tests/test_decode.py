"""Packed CPU decode steps: the same logits and KV cache as the model's forward, and an engine that
never decodes with stale weights."""

from __future__ import annotations

import pytest
import torch

from llmctl.model.decode import (
    MKL_PACK_ROWS,
    MKL_PACKED,
    ONEDNN,
    PackedDecoder,
    PackedLinear,
    packing_pays_off,
)
from llmctl.model.engine import Engine, SamplingParams
from llmctl.model.transformer import KVCache
from tests.test_model import VOCAB, make_model


@pytest.mark.parametrize(
    "overrides",
    [{}, {"attention_bias": True, "tie_embeddings": False}, {"qk_norm": True}],
    ids=["gqa-tied", "bias-untied", "qk-norm"],
)
# column blocks (3 leaves qkv (256), o (128), head (320) padded), oneDNN's layout and MKL's packed
# one for every row
@pytest.mark.parametrize(
    "layout",
    [(1, 99, False), (2, 99, False), (3, 99, False), (2, 1, False), (2, 99, True)],
    ids=["blocks1", "blocks2", "blocks3", "onednn", "mkl"],
)
@pytest.mark.parametrize("ragged", [False, True], ids=["even", "ragged"])
# a few keys go through SDPA, 128 keys x rows and more through two bmms (decode.attention)
@pytest.mark.parametrize("T", [6, 48], ids=["few-keys", "many-keys"])
def test_packed_step_equals_forward(overrides: dict, layout: tuple[int, int, bool], ragged: bool, T: int):
    model = make_model(**overrides)
    blocks, onednn_rows, mkl = layout
    decoder = PackedDecoder(model, blocks=blocks, onednn_rows=onednn_rows, mkl=mkl)
    B, steps = 3, 4
    idx = torch.randint(0, VOCAB, (B, T))
    mask = None
    if ragged:  # rows of 6, 4 and 1 prompt tokens, left-padded, plus one slot per new token
        mask = torch.ones(B, T + steps, dtype=torch.long)
        mask[1, :2] = 0
        mask[2, :5] = 0
    ours, theirs = KVCache(model.config, B, T + steps), KVCache(model.config, B, T + steps)
    with torch.inference_mode():
        model(idx, cache=ours, attention_mask=mask)
        model(idx, cache=theirs, attention_mask=mask)
        ids = torch.randint(0, VOCAB, (B,))
        for _ in range(steps):
            expected = model(ids[:, None], cache=theirs, attention_mask=mask)[:, -1]
            got = decoder.step(ids, ours, attention_mask=mask)
            torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
            ids = expected.argmax(-1)
    assert ours.pos == theirs.pos == T + steps
    # the layout the step was meant to take, and only that one
    for product in (decoder.layers[0].qkv, decoder.lm_head):
        uses_mkl = mkl and MKL_PACKED
        uses_onednn = not uses_mkl and ONEDNN and onednn_rows <= B
        assert (product._mkl is not None, product._onednn is not None) == (uses_mkl, uses_onednn)
        assert (product._blocked is not None) == (not uses_mkl and not uses_onednn)
    torch.testing.assert_close(ours.k, theirs.k, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours.v, theirs.v, atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(not MKL_PACKED, reason="torch is built without MKL")
def test_mkl_packing_serves_every_row_count():
    """One packing (for MKL_PACK_ROWS rows) serves steps of fewer rows; a step of more rows packs
    again for its own count. Every product equals F.linear's up to fp32 rounding."""
    torch.manual_seed(0)
    weights, bias = [torch.randn(40, 24), torch.randn(24, 24)], [torch.randn(40), torch.randn(24)]
    linear = PackedLinear(weights, bias, blocks=2)
    weight, full_bias = torch.cat(weights), torch.cat(bias)
    most = 0
    for rows in (1, 3, 32, MKL_PACK_ROWS + 6, 5):
        most = max(most, rows)
        x = torch.randn(rows, 24)
        expected = torch.nn.functional.linear(x, weight, full_bias)
        torch.testing.assert_close(linear(x), expected, atol=1e-5, rtol=1e-5)
        residual = torch.randn(rows, 64)
        torch.testing.assert_close(linear.add_to(residual, x), residual + expected, atol=1e-5, rtol=1e-5)
        gate, up = linear.halves(x)
        torch.testing.assert_close(torch.cat([gate, up], -1), expected, atol=1e-5, rtol=1e-5)
        assert linear._mkl_rows == max(MKL_PACK_ROWS, most)


def test_engine_packed_and_unpacked_agree_on_ragged_batches():
    model = make_model()
    assert packing_pays_off(model)
    prompts = [[5, 6, 7, 8, 9, 10, 11], [3, 4], [100, 101, 102, 103]]
    for params in (
        SamplingParams(max_new_tokens=16, temperature=0),
        SamplingParams(max_new_tokens=16, temperature=0.9, top_p=0.9, repetition_penalty=1.1, seed=3),
    ):
        packed = [r.tokens for r in Engine(model).generate(prompts, params)]
        plain = [r.tokens for r in Engine(model, packed=False).generate(prompts, params)]
        assert packed == plain
    engine = Engine(model)
    engine.generate(prompts, SamplingParams(max_new_tokens=2))
    assert engine._decoder is not None
    model.to(torch.bfloat16)  # not measured faster packed: the engine decodes through forward
    assert not packing_pays_off(model)
    engine.generate(prompts, SamplingParams(max_new_tokens=2))
    assert engine._decoder is None


def test_engine_repacks_after_the_weights_change():
    """RL-style: the same engine generates, the policy is updated in place, it generates again."""
    model = make_model()
    engine = Engine(model)
    prompts = [[1, 2, 3, 4]]
    params = SamplingParams(max_new_tokens=12, temperature=0)
    before = engine.generate(prompts, params)[0].tokens
    first_decoder = engine._decoder
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.5 * torch.randn_like(p))
    after = engine.generate(prompts, params)[0].tokens
    assert engine._decoder is not first_decoder
    assert after == Engine(model, packed=False).generate(prompts, params)[0].tokens
    assert after != before
    engine.generate(prompts, params)
    assert engine._decoder.is_current()


def test_logprobs_are_the_models_own_for_each_sampled_token():
    """RL needs log p(token | prefix) under the model (raw logits, before temperature/penalty):
    recomputed with one full forward pass over prompt + completion, they agree."""
    model = make_model()
    prompts = [[5, 6, 7, 8, 9], [3, 4]]
    params = SamplingParams(
        max_new_tokens=10, temperature=1.3, top_k=50, repetition_penalty=1.2, seed=0, logprobs=True
    )
    events = []
    results = Engine(model).generate(prompts, params, on_token=events.append)
    for row, (prompt, res) in enumerate(zip(prompts, results, strict=True)):
        assert len(res.logprobs) == len(res.tokens) == 10
        seq = torch.tensor([prompt + res.tokens])
        with torch.no_grad():
            log_probs = torch.log_softmax(model(seq)[0, len(prompt) - 1 : -1], dim=-1)
        expected = log_probs.gather(1, torch.tensor(res.tokens)[:, None])[:, 0]
        torch.testing.assert_close(torch.tensor(res.logprobs), expected, atol=1e-4, rtol=1e-4)
        assert [e.logprob for e in events if e.row == row] == res.logprobs
    assert Engine(model).generate(prompts, SamplingParams(max_new_tokens=2))[0].logprobs is None
