"""llmctl eval on real components: the scoring engine's batching invariance, world_mc and custom
tasks, perplexity on token shards, results/compare/gates, and the errors a user can meet."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from llmctl.errors import InputError
from llmctl.evals.evaluate import check_thresholds, compare, evaluate, flat_metrics
from llmctl.evals.lm import EvalLM

FIXTURES = Path(__file__).parent / "fixtures" / "eval"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    from test_eval_lm_eval import make_model

    return make_model(tmp_path_factory.mktemp("m") / "model", max_seq_len=256)


@pytest.fixture(scope="module")
def lm(model_dir) -> EvalLM:
    return EvalLM.from_folder(model_dir)


def _reference_loglik(lm: EvalLM, ctx: list[int], cont: list[int]) -> tuple[float, bool]:
    """lm-eval's computation: one plain forward over (context + continuation)[-(L+1):][:-1]."""
    seq = (ctx + cont)[-(lm.max_length + 1) :]
    with torch.inference_mode():
        logits = lm.model(torch.tensor([seq[:-1]]))[0, -len(cont) :].float()
    logprobs = torch.log_softmax(logits, -1)
    target = torch.tensor(cont)
    return float(logprobs.gather(1, target[:, None]).sum()), bool((logits.argmax(-1) == target).all())


def test_packed_shared_contexts_score_as_separate_sequences(lm):
    long_choices = [" " + " ".join(f"word{j}" for j in range(k, k + 40)) for k in range(8)]
    reqs = [("The capital of France is", " Paris"), ("The capital of France is", " Berlin and more"),
            ("The capital of France is", " a"), ("Hi", " there"), ("", "Hello world"),
            ("A much longer context that goes on and on ", "end"), ("word " * 400, " end of it"),
            *[("Pick the list:", c) for c in long_choices]]  # fmt: skip
    pairs = [lm.encode_pair(c, x) for c, x in reqs]
    # the eight long choices share a context but do not fit one row of the 256-token model
    assert sum(len(pairs[-1 - j][1]) for j in range(8)) > lm.max_length
    expected = [_reference_loglik(lm, ctx, cont) for ctx, cont in pairs]
    for batch_tokens in (1, 300, 100_000):  # one row per forward, a few rows, everything at once
        got = lm.loglikelihood(reqs, batch_tokens=batch_tokens)
        for (logprob, greedy), r, (_, cont) in zip(expected, got, pairs, strict=True):
            assert r.logprob == pytest.approx(logprob, abs=1e-4)
            assert r.is_greedy == greedy and r.n_tokens == len(cont)
    # the trailing space moves onto the continuation (lm-eval's _encode_pair)
    assert lm.encode_pair("Answer: ", "x") == lm.encode_pair("Answer:", " x")


def test_long_context_is_cut_from_the_left(lm):
    long_ctx = "word " * 400
    (res,) = lm.loglikelihood([(long_ctx, "end")])
    assert res.n_tokens >= 1 and res.logprob < 0


def test_world_mc_and_custom_tasks_write_results(model_dir, tmp_path):
    custom = [
        {"name": "capitals", "path": str(FIXTURES / "custom/capitals.jsonl"), "type": "multiple_choice"},
        {
            "name": "arith",
            "path": str(FIXTURES / "custom/arith.jsonl"),
            "type": "generative",
            "until": ["\n"],
        },
    ]
    results = evaluate(model_dir, ["world_mc", "capitals", "arith"], custom=custom, world_items=20,
                       max_gen_tokens=8, samples_to_keep=3, out_dir=tmp_path)  # fmt: skip
    on_disk = json.loads((tmp_path / "results.json").read_text())
    assert on_disk["tasks"]["world_mc"]["n"] == 20
    wm = on_disk["tasks"]["world_mc"]
    assert 0 <= wm["metrics"]["acc"] <= 1 and wm["stderr"]["acc"] is not None
    assert set(wm["groups"])  # per relation
    assert len((tmp_path / "samples/world_mc.jsonl").read_text().splitlines()) == 3
    flat = flat_metrics(results)
    assert {"world_mc/acc", "capitals/acc", "arith/exact_match"} <= set(flat)
    everything = evaluate(
        model_dir, ["world_mc"], world_items=25, samples_to_keep=None, out_dir=tmp_path / "all"
    )
    assert len((tmp_path / "all/samples/world_mc.jsonl").read_text().splitlines()) == 25  # --log-samples
    compared = compare([tmp_path, tmp_path / "all"])
    a, b = str(tmp_path), str(tmp_path / "all")
    assert compared["evals"] == [{"eval": a, "model": str(model_dir)}, {"eval": b, "model": str(model_dir)}]
    rows = {row["metric"]: row for row in compared["rows"]}
    acc_a, acc_b = flat["world_mc/acc"], flat_metrics(everything)["world_mc/acc"]
    assert rows["world_mc/acc"]["values"] == {a: acc_a, b: acc_b}
    assert rows["world_mc/acc"]["delta"] == {b: pytest.approx(acc_b - acc_a)}
    assert rows["capitals/acc"]["values"] == {a: flat["capitals/acc"], b: None}
    assert rows["capitals/acc"]["delta"] == {b: None}
    assert check_thresholds(results, {"world_mc": 0.0}) == []
    assert check_thresholds(results, {"capitals/acc": 1.01}) == [
        f"capitals/acc = {flat['capitals/acc']:.4f} < 1.01"
    ]
    with pytest.raises(InputError):
        check_thresholds(results, {"nope/acc": 0.5})


def test_perplexity_on_text_file(model_dir, tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("The capital of Velmora is Ostrin. " * 40)
    r = evaluate(model_dir, ["perplexity"], perplexity_data=text)
    m = r["tasks"]["perplexity"]["metrics"]
    assert m["ppl"] > 1 and m["bits_per_byte"] > 0


def test_missing_benchmark_data_says_which_files(model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(InputError) as e:
        evaluate(model_dir, ["hellaswag"], data_dir=tmp_path)
    assert "hellaswag_val.jsonl" in e.value.hint
    with pytest.raises(InputError, match="unknown eval task"):
        evaluate(model_dir, ["nonsense"])


def test_original_release_layouts(model_dir):
    r = evaluate(model_dir, ["mmlu", "piqa"], data_dir=FIXTURES, shots={"mmlu": 2})
    mmlu = r["tasks"]["mmlu"]
    assert mmlu["n"] == 5 and mmlu["shots"] == 2
    assert {"stem", "humanities", "astronomy", "philosophy"} <= set(mmlu["groups"])
    assert r["tasks"]["piqa"]["n"] == 2
