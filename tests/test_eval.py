"""llmctl eval on real components: the scoring engine's batching invariance, world_mc and custom
tasks, perplexity on token shards, results/compare/gates, and the errors a user can meet."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

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


def test_loglikelihood_is_independent_of_batching_and_grouping(lm):
    reqs = [("The capital of France is", " Paris"), ("The capital of France is", " Berlin and more"),
            ("Hi", " there"), ("", "Hello world"), ("A much longer context that goes on and on ", "end")]  # fmt: skip
    one = [lm.loglikelihood([r], batch_size=1)[0] for r in reqs]
    many = lm.loglikelihood(reqs, batch_size=16)
    for a, b in zip(one, many, strict=True):
        assert a.logprob == pytest.approx(b.logprob, abs=1e-4)
        assert a.is_greedy == b.is_greedy and a.n_tokens == b.n_tokens
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
    rows = compare([tmp_path])
    assert {"metric": "capitals/acc", str(tmp_path): flat["capitals/acc"]} in rows
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
