"""Prompt data for grpo: real files (JSONL plain/gz, parquet) with string, message and GSM8K prompts
read into validated prompts that keep their whole record; bad records named by file:line or skipped
and counted; a val split by the prompt's hash; and the tiny template's synthetic RL prompts, true to
the world, disjoint from their held-out set and from chat_eval's held-out facts."""

from __future__ import annotations

import gzip
import json
import time
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pydantic import ValidationError

from llmctl.config.prompts import PromptDataConfig
from llmctl.data.synthetic import World
from llmctl.data.synthetic_chat import CHAT_EVAL_FILE, QUESTIONS, SYSTEM_PROMPTS, generate_chat
from llmctl.data.synthetic_preferences import PREFERENCES_FILE, generate_preferences
from llmctl.data.synthetic_rl import RL_EVAL_FILE, RL_PROMPTS_FILE, generate_rl_prompts
from llmctl.errors import InputError
from llmctl.project import init_project
from llmctl.rl.prompts import load_prompt_data, prompt_fingerprint

USER = {"role": "user", "content": "Capital of Velmora?"}
SYSTEM = {"role": "system", "content": "Be brief."}
GSM8K = {"question": "Ann has 3 apples and buys 4. How many?", "answer": "3 + 4 = 7\n#### 7"}


def _write(path: Path, records: list) -> Path:
    path.write_bytes(b"".join(json.dumps(r).encode() + b"\n" for r in records))
    return path


def _load(base: Path, **cfg):
    return load_prompt_data(PromptDataConfig(**{"val_fraction": 0, **cfg}), base)


def _error(base: Path, **cfg) -> InputError:
    with pytest.raises(InputError) as e:
        _load(base, **cfg)
    return e.value


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# --- layouts and files ---------------------------------------------------------------------------


def test_string_messages_and_gsm8k_prompts_keep_their_records(tmp_path: Path) -> None:
    records = [
        {"id": "q-1", "prompt": "Capital of Velmora?", "answer": "Ostrin"},
        {"prompt": [SYSTEM, {"role": "user", "content": [{"type": "text", "text": "Capital of "},
                                                          {"type": "text", "text": "Velmora?"}]}],
         "answer": "Ostrin", "tests": ["assert f() == 1"]},
        {"id": 7, **GSM8K},
    ]  # fmt: skip
    _write(tmp_path / "p.jsonl", records)
    data = _load(tmp_path, sources=[{"path": "p.jsonl"}])
    assert [p.prompt for p in data.train] == [
        [USER],
        [SYSTEM, USER],
        [{"role": "user", "content": GSM8K["question"]}],
    ]
    assert [p.id for p in data.train] == ["q-1", "p.jsonl:2", "7"]  # the record's id, else file:line
    assert [p.where for p in data.train] == ["p.jsonl:1", "p.jsonl:2", "p.jsonl:3"]
    assert [p.record for p in data.train] == records  # answers, tests: everything a verifier may need
    assert data.summary() == {"files": 1, "records": 3, "prompts": 3, "skipped": {}, "train": 3, "val": 0}


def test_gz_parquet_and_a_custom_prompt_key(tmp_path: Path) -> None:
    (tmp_path / "g.jsonl.gz").write_bytes(gzip.compress(json.dumps(GSM8K).encode() + b"\n"))
    [gz] = _load(tmp_path, sources=[{"path": "g.jsonl.gz"}]).train
    assert gz.prompt[0]["content"] == GSM8K["question"] and gz.record["answer"].endswith("#### 7")
    # GSM8K as the hub stores it (parquet, question/answer columns)
    pq.write_table(pa.table({"question": [GSM8K["question"], "Two?"], "answer": ["#### 7", "#### 2"]}), tmp_path / "g.parquet")  # fmt: skip
    data = _load(tmp_path, sources=[{"path": "g.parquet"}])
    assert [(p.id, p.record["answer"]) for p in data.train] == [
        ("g.parquet:1", "#### 7"),
        ("g.parquet:2", "#### 2"),
    ]
    # messages as a struct column: every message gets every field (None where absent), dropped on read
    pq.write_table(pa.table({"query": [[SYSTEM, USER]], "answer": ["Ostrin"]}), tmp_path / "m.parquet")
    err = _error(tmp_path, sources=[{"path": "m.parquet"}])
    assert err.message == "m.parquet: no 'prompt' nor 'question' column (columns: query, answer)"
    assert "prompt_key" in err.hint
    [row] = _load(tmp_path, sources=[{"path": "m.parquet", "prompt_key": "query"}]).train
    assert row.prompt == [SYSTEM, USER] and row.record["answer"] == "Ostrin"
    # a custom key is the only one read: no GSM8K fallback behind it
    _write(tmp_path / "q.jsonl", [GSM8K])
    err = _error(tmp_path, sources=[{"path": "q.jsonl", "prompt_key": "text"}])
    assert err.message == "q.jsonl:1: no 'text' field (keys present: 'question', 'answer')"


# --- validation ----------------------------------------------------------------------------------

BAD_RECORDS = [
    ('{"prompt": oops}', "malformed_json", "malformed JSON"),
    ('"just a string"', "not_an_object", "expected a JSON object, got str"),
    ('{"answer": "7"}', "no_prompt", "no 'prompt' field (keys present: 'answer')"),
    ('{"prompt": "  "}', "empty_prompt", "'prompt' is an empty string"),
    ('{"prompt": 3}', "bad_prompt", "'prompt' must be a string or a non-empty list of messages, got a int"),
    ('{"prompt": []}', "bad_prompt", "'prompt' must be a string or a non-empty list of messages, got an empty list"),
    ('{"prompt": [{"role": "bot", "content": "q"}]}', "unknown_role", "prompt[0]: role 'bot' is not one of"),
    ('{"prompt": [{"role": "user", "content": 5}]}', "bad_content", "prompt[0].content is a int, not a string"),
    ('{"prompt": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}', "assistant_last", "'prompt' ends with an assistant turn"),
]  # fmt: skip


@pytest.mark.parametrize(("line", "reason", "message"), BAD_RECORDS, ids=[b[1] for b in BAD_RECORDS])
def test_each_bad_record_names_file_and_line(tmp_path: Path, line: str, reason: str, message: str) -> None:
    good = json.dumps({"prompt": "q"})
    (tmp_path / "bad.jsonl").write_text(f"{good}\n{good}\n{line}\n{good}\n")
    err = _error(tmp_path, sources=[{"path": "bad.jsonl"}])
    assert err.message.startswith(f"bad.jsonl:3: {message}"), err.message
    assert err.exit_code == 2 and "grpo.data.on_error=skip" in err.hint


def test_on_error_skip_counts_each_reason(tmp_path: Path) -> None:
    good = json.dumps({"prompt": "q"})
    (tmp_path / "bad.jsonl").write_text("\n".join([good, *(line for line, _, _ in BAD_RECORDS), good]) + "\n")
    data = _load(tmp_path, sources=[{"path": "bad.jsonl"}], on_error="skip")
    assert [p.id for p in data.train] == ["bad.jsonl:1", f"bad.jsonl:{len(BAD_RECORDS) + 2}"]
    summary = data.summary()
    assert summary["skipped"] == dict(sorted(Counter(reason for _, reason, _ in BAD_RECORDS).items()))
    assert summary["records"] == len(BAD_RECORDS) + 2 and summary["prompts"] == 2


def test_sources_name_their_key(tmp_path: Path) -> None:
    (tmp_path / "blank.jsonl").write_text("\n")
    _write(tmp_path / "one.jsonl", [{"prompt": "q"}])
    err = _error(tmp_path, sources=[{"path": "one.jsonl"}, {"path": "blank.jsonl"}])
    assert err.message.startswith("grpo.data.sources[1]: blank.jsonl holds no prompts")
    err = _error(tmp_path, sources=[{"path": "one.jsonl"}], val_sources=[{"path": "blank.jsonl"}])
    assert err.message.startswith("grpo.data.val_sources[0]: blank.jsonl holds no prompts")
    assert _error(tmp_path, sources=[{"path": "nope/*.jsonl"}]).message.startswith(
        "grpo.data.sources[0].path"
    )


# --- val split, fingerprint, config --------------------------------------------------------------


def test_val_split_is_a_hash_of_the_prompt(tmp_path: Path) -> None:
    records = [{"prompt": f"q{i}", "answer": str(j)} for i in range(400) for j in range(2)]
    _write(tmp_path / "a.jsonl", records)
    _write(tmp_path / "b.jsonl", records[::-1])
    a = _load(tmp_path, sources=[{"path": "a.jsonl"}], val_fraction=0.1)
    b = _load(tmp_path, sources=[{"path": "b.jsonl"}], val_fraction=0.1)
    val_a = [p.prompt[0]["content"] for p in a.val]
    assert 20 <= len(set(val_a)) <= 60 and len(val_a) == 2 * len(set(val_a))  # ~10% of 400, both copies
    assert set(val_a) == {p.prompt[0]["content"] for p in b.val}  # file order does not matter
    assert not {p.prompt[0]["content"] for p in a.train} & set(val_a)  # one prompt, one side
    sep = _load(tmp_path, sources=[{"path": "a.jsonl"}], val_sources=[{"path": "b.jsonl", "limit": 3}])
    assert len(sep.train) == 800 and len(sep.val) == 3 and sep.summary()["val_sources"]["prompts"] == 3


def test_fingerprint_changes_with_the_files(tmp_path: Path) -> None:
    _write(tmp_path / "p.jsonl", [GSM8K])
    cfg = PromptDataConfig(sources=[{"path": "p.jsonl"}])
    before = prompt_fingerprint(cfg, tmp_path)
    assert before == prompt_fingerprint(cfg, tmp_path)
    assert before[0]["prompts"] is True and before[0]["files"][0]["path"] == "p.jsonl"
    time.sleep(0.01)
    _write(tmp_path / "p.jsonl", [GSM8K, GSM8K])
    assert prompt_fingerprint(cfg, tmp_path) != before


def test_config_model() -> None:
    cfg = PromptDataConfig(sources=[{"path": "p.jsonl"}])
    assert cfg.on_error == "error" and cfg.val_fraction == 0.05 and cfg.sources[0].prompt_key == "prompt"
    with pytest.raises(ValidationError, match="either val_fraction or val_sources"):
        PromptDataConfig(sources=[{"path": "a"}], val_fraction=0.1, val_sources=[{"path": "b"}])
    assert PromptDataConfig(sources=[{"path": "a"}], val_sources=[{"path": "b"}]).val_sources
    with pytest.raises(ValidationError, match="extra") as e:
        PromptDataConfig(sources=[{"path": "a", "chosen_key": "c"}])
    assert e.value.errors()[0]["loc"] == ("sources", 0, "chosen_key")
    with pytest.raises(ValidationError, match="at least 1"):
        PromptDataConfig(sources=[])
    source_fields = PromptDataConfig.model_fields["sources"].annotation.__args__[0].model_fields
    for name, f in [*PromptDataConfig.model_fields.items(), *source_fields.items()]:
        assert f.description, name


# --- the tiny template's synthetic RL prompts ----------------------------------------------------


def test_synthetic_rl_prompts_are_deterministic(tmp_path: Path) -> None:
    made = {
        name: generate_rl_prompts(tmp_path / name, seed=seed) for name, seed in (("a", 0), ("b", 0), ("c", 1))
    }
    for file in (RL_PROMPTS_FILE, RL_EVAL_FILE):
        a = (tmp_path / "a" / file).read_bytes()
        assert a == (tmp_path / "b" / file).read_bytes() and a != (tmp_path / "c" / file).read_bytes()
    assert (made["a"].train, made["a"].eval, made["a"].facts) == (115, 110, 55)


def test_synthetic_rl_prompts_are_true_held_out_and_avoid_chat_eval(tmp_path: Path) -> None:
    world = World.build(0)
    generate_chat(tmp_path, 10, seed=0)
    made = generate_rl_prompts(tmp_path, seed=0)
    chat_held = {r["subject"] for r in _rows(tmp_path / CHAT_EVAL_FILE)}
    train, held = _rows(tmp_path / RL_PROMPTS_FILE), _rows(tmp_path / RL_EVAL_FILE)
    for r in train + held:
        *head, question = r["prompt"]
        assert question == {"role": "user", "content": question["content"]}
        assert question["content"] in {p.format(s=r["subject"]) for p in QUESTIONS[r["relation"]]}, r
        assert r["answer"] == world.facts[(r["subject"], r["relation"])]  # the world's value
        assert all(m["role"] == "system" and m["content"] in SYSTEM_PROMPTS for m in head)
        assert r["subject"] not in chat_held, r  # RL on chat_eval's facts would contaminate it
    # No question is asked on both sides; every fact is asked on both, in other words.
    assert not {r["prompt"][-1]["content"] for r in train} & {r["prompt"][-1]["content"] for r in held}
    facts = {(r["subject"], r["relation"]) for r in held}
    assert facts == {(r["subject"], r["relation"]) for r in train} and len(facts) == made.facts
    # RL's subjects are its own: the preference pairs ask about the other entities, half of each kind.
    generate_preferences(tmp_path, seed=0)
    preferred = {
        f[0]
        for line in (tmp_path / PREFERENCES_FILE).read_text().splitlines()
        for f in json.loads(line)["facts"]
    }
    rl_asked = {s for s, _ in facts}
    assert not rl_asked & preferred and not (rl_asked | preferred) & chat_held
    assert rl_asked | preferred | chat_held == {s for s, _ in world.facts}  # every entity used
    for kind, names in world.entities.items():
        assert abs(len(rl_asked & set(names)) - len(preferred & set(names))) <= 1, kind
    asked = {(r["relation"], r["prompt"][-1]["content"].replace(r["subject"], "{s}")) for r in held}
    assert asked == {
        (rel, q) for rel, qs in QUESTIONS.items() for q in qs
    }  # each phrasing held out somewhere
    assert not any(len(r["prompt"]) > 1 for r in held)  # plain questions, as chat_eval asks them
    assert 0.25 < sum(len(r["prompt"]) > 1 for r in train) / len(train) < 0.45
    assert len({r["id"] for r in train + held}) == len(train) + len(held)
    for file, rows in ((RL_PROMPTS_FILE, train), (RL_EVAL_FILE, held)):  # llmctl's reader takes them
        data = _load(tmp_path, sources=[{"path": file}])
        assert [p.id for p in data.train] == [r["id"] for r in rows] and not data.summary()["skipped"]


def test_init_writes_the_rl_prompts(tmp_path: Path) -> None:
    made = init_project(tmp_path / "demo")
    assert {f"data/{RL_PROMPTS_FILE}", f"data/{RL_EVAL_FILE}"} <= set(made["files"])
    generate_rl_prompts(tmp_path / "ref", seed=0)
    for file in (RL_PROMPTS_FILE, RL_EVAL_FILE):
        assert (tmp_path / "demo" / "data" / file).read_bytes() == (tmp_path / "ref" / file).read_bytes()
