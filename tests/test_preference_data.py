"""Preference data for dpo: real files (JSONL plain/gz, parquet) in every accepted layout read into
validated pairs; every bad record named by file:line or skipped and counted; a val split by the
prompt's hash; and the tiny template's synthetic pairs, true over false, never about a held-out fact."""

from __future__ import annotations

import gzip
import json
import re
import time
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pydantic import ValidationError

from llmctl.config.preference import PreferenceDataConfig
from llmctl.data.preference import load_preference_data, preference_fingerprint
from llmctl.data.synthetic import World
from llmctl.data.synthetic_chat import CHAT_EVAL_FILE, QUESTIONS, SHORT_ANSWERS, SYSTEM_PROMPTS, generate_chat
from llmctl.data.synthetic_preferences import EVASIVE, PREFERENCES_FILE, generate_preferences
from llmctl.errors import InputError
from llmctl.project import init_project

USER = {"role": "user", "content": "Capital of Velmora?"}
GOOD = {"role": "assistant", "content": "Ostrin."}
BAD = {"role": "assistant", "content": "Barrow."}
SYSTEM = {"role": "system", "content": "Be brief."}


def _jsonl(records: list) -> bytes:
    return b"".join(json.dumps(r).encode() + b"\n" for r in records)


def _load(base: Path, **cfg):
    return load_preference_data(PreferenceDataConfig(**{"val_fraction": 0, **cfg}), base)


def _error(base: Path, **cfg) -> InputError:
    with pytest.raises(InputError) as e:
        _load(base, **cfg)
    return e.value


def _triples(data) -> list[tuple]:
    return [(p.prompt, p.chosen, p.rejected) for p in data.train]


# --- layouts and files ---------------------------------------------------------------------------

LAYOUTS = [
    # strings
    {"prompt": "Capital of Velmora?", "chosen": "Ostrin.", "rejected": "Barrow."},
    # TRL conversational: prompt messages, completion messages
    {"prompt": [USER], "chosen": [GOOD], "rejected": [BAD]},
    # ultrafeedback_binarized: the prompt string repeats the first user turn of whole conversations
    {"prompt": "Capital of Velmora?", "chosen": [USER, GOOD], "rejected": [USER, BAD]},
    # whole conversations without a prompt field
    {"chosen": [USER, GOOD], "rejected": [USER, BAD]},
    # a whole conversation beside a prompt list: the prompt's copy is dropped
    {"prompt": [USER], "chosen": [USER, GOOD], "rejected": [BAD]},
]


def test_every_layout_reads_to_the_same_pair(tmp_path: Path) -> None:
    (tmp_path / "p.jsonl").write_bytes(_jsonl([{**r, "id": i} for i, r in enumerate(LAYOUTS)]))
    data = _load(tmp_path, sources=[{"path": "p.jsonl"}])
    assert _triples(data) == [([USER], [GOOD], [BAD])] * len(LAYOUTS)
    assert [p.where for p in data.train] == [f"p.jsonl:{i + 1}" for i in range(len(LAYOUTS))]
    assert [p.extra for p in data.train] == [{"id": i} for i in range(len(LAYOUTS))]
    assert data.summary() == {"files": 1, "records": 5, "pairs": 5, "skipped": {}, "train": 5, "val": 0}


def test_multi_turn_conversations_system_prompts_and_text_parts(tmp_path: Path) -> None:
    history = [
        SYSTEM,
        USER,
        GOOD,
        {
            "role": "user",
            "content": [{"type": "text", "text": "And "}, {"type": "text", "text": "its ruler?"}],
        },
    ]
    records = [
        {"prompt": "Capital of Velmora?", "chosen": [*history, {"role": "assistant", "content": "Ann."}],
         "rejected": [*history, {"role": "assistant", "content": "Bob."}]},
        {"prompt": [SYSTEM, USER], "chosen": [GOOD], "rejected": "Barrow."},
    ]  # fmt: skip
    (tmp_path / "p.jsonl").write_bytes(_jsonl(records))
    first, second = _load(tmp_path, sources=[{"path": "p.jsonl"}]).train
    assert first.prompt[:3] == [SYSTEM, USER, GOOD]
    assert first.prompt[3] == {"role": "user", "content": "And its ruler?"}
    assert first.chosen == [{"role": "assistant", "content": "Ann."}]
    assert (second.prompt, second.chosen, second.rejected) == ([SYSTEM, USER], [GOOD], [BAD])


def test_gz_parquet_and_custom_keys(tmp_path: Path) -> None:
    (tmp_path / "p.jsonl.gz").write_bytes(gzip.compress(_jsonl(LAYOUTS[:2])))
    assert _triples(_load(tmp_path, sources=[{"path": "p.jsonl.gz"}])) == [([USER], [GOOD], [BAD])] * 2
    # ultrafeedback_binarized as parquet: struct columns give every message every field (None if absent)
    pq.write_table(
        pa.table(
            {
                "prompt": ["Capital of Velmora?", "q"],
                "chosen": [[USER, GOOD], [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]],
                "rejected": [[USER, BAD], [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]],
                "score_chosen": [8.0, 1.0],
            }
        ),
        tmp_path / "uf.parquet",
    )  # fmt: skip
    err = _error(tmp_path, sources=[{"path": "uf.parquet"}])
    assert err.message == "uf.parquet:2: 'chosen' and 'rejected' are identical"
    data = _load(tmp_path, sources=[{"path": "uf.parquet"}], on_error="skip")
    assert _triples(data) == [([USER], [GOOD], [BAD])] and data.train[0].extra == {"score_chosen": 8.0}
    assert data.train[0].where == "uf.parquet:1" and data.summary()["skipped"] == {"identical_pair": 1}

    pq.write_table(pa.table({"question": ["Capital of Velmora?"], "good": ["Ostrin."], "bad": ["Barrow."]}), tmp_path / "k.parquet")  # fmt: skip
    err = _error(tmp_path, sources=[{"path": "k.parquet"}])
    assert err.message == "k.parquet: no 'chosen' nor 'rejected' column (columns: question, good, bad)"
    assert "chosen_key" in err.hint
    keys = {"prompt_key": "question", "chosen_key": "good", "rejected_key": "bad"}
    assert _triples(_load(tmp_path, sources=[{"path": "k.parquet", **keys}])) == [([USER], [GOOD], [BAD])]


# --- validation ----------------------------------------------------------------------------------

BAD_RECORDS = [
    ('{"prompt": oops}', "malformed_json", "malformed JSON"),
    ("[1, 2]", "not_an_object", "expected a JSON object, got list"),
    ('{"prompt": "q", "chosen": "a"}', "missing_field", "no 'rejected' field (keys present: 'prompt', 'chosen')"),
    ('{"chosen": "a", "rejected": "b"}', "missing_field", "no 'prompt' field, and 'chosen' is a string, not a conversation"),
    ('{"prompt": 3, "chosen": "a", "rejected": "b"}', "bad_field", "'prompt' must be a string or a non-empty list of messages, got a int"),
    ('{"prompt": "q", "chosen": [], "rejected": "b"}', "bad_field", "'chosen' must be a string or a non-empty list of messages, got an empty list"),
    ('{"prompt": "q", "chosen": ["a"], "rejected": "b"}', "bad_message", "chosen[0] is a str, not an object with role and content"),
    ('{"prompt": [{"role": "bot", "content": "q"}], "chosen": "a", "rejected": "b"}', "unknown_role", "prompt[0]: role 'bot' is not one of"),
    ('{"prompt": [{"role": "user", "content": 5}], "chosen": "a", "rejected": "b"}', "bad_content", "prompt[0].content is a int, not a string"),
    ('{"prompt": "q", "chosen": " ", "rejected": "b"}', "empty_assistant", "chosen[0]: empty assistant message"),
    ('{"prompt": "q", "chosen": "a", "rejected": [{"role": "assistant", "content": ""}]}', "empty_assistant", "rejected[0]: empty assistant message"),
    ('{"prompt": "q", "chosen": "a", "rejected": [{"role": "user", "content": "b"}]}', "not_assistant_last", "'rejected' ends with a user turn, not the assistant's"),
    ('{"prompt": "q", "chosen": "same", "rejected": "same"}', "identical_pair", "'chosen' and 'rejected' are identical"),
    ('{"chosen": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "rejected": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "b"}]}', "prompt_mismatch", "'chosen' and 'rejected' differ before their last turn (at message 0)"),
    ('{"prompt": "q", "chosen": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "rejected": "b"}', "prompt_mismatch", "'rejected' is a string, the other a whole conversation"),
    ('{"chosen": [{"role": "assistant", "content": "a"}], "rejected": [{"role": "assistant", "content": "b"}]}', "no_prompt", "'chosen' is a single turn: nothing before it to be the prompt"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("line", "reason", "message"), BAD_RECORDS, ids=[f"{i}-{b[1]}" for i, b in enumerate(BAD_RECORDS)]
)
def test_each_bad_record_names_file_and_line(tmp_path: Path, line: str, reason: str, message: str) -> None:
    good = json.dumps(LAYOUTS[0])
    (tmp_path / "bad.jsonl").write_text(f"{good}\n{good}\n{line}\n{good}\n")
    err = _error(tmp_path, sources=[{"path": "bad.jsonl"}])
    assert err.message.startswith(f"bad.jsonl:3: {message}"), err.message
    assert "dpo.data.on_error=skip" in err.hint


def test_on_error_skip_counts_each_reason(tmp_path: Path) -> None:
    good = json.dumps(LAYOUTS[0])
    (tmp_path / "bad.jsonl").write_text("\n".join([good, *(line for line, _, _ in BAD_RECORDS), good]) + "\n")
    data = _load(tmp_path, sources=[{"path": "bad.jsonl"}], on_error="skip")
    assert [p.where for p in data.train] == ["bad.jsonl:1", f"bad.jsonl:{len(BAD_RECORDS) + 2}"]
    summary = data.summary()
    assert summary["skipped"] == dict(sorted(Counter(reason for _, reason, _ in BAD_RECORDS).items()))
    assert summary["records"] == len(BAD_RECORDS) + 2 and summary["pairs"] == 2


def test_empty_sources_name_their_key(tmp_path: Path) -> None:
    (tmp_path / "blank.jsonl").write_text("\n")
    (tmp_path / "one.jsonl").write_bytes(_jsonl(LAYOUTS[:1]))
    err = _error(tmp_path, sources=[{"path": "one.jsonl"}, {"path": "blank.jsonl"}])
    assert err.message.startswith("dpo.data.sources[1]: blank.jsonl holds no preference pairs")
    err = _error(tmp_path, sources=[{"path": "one.jsonl"}], val_sources=[{"path": "blank.jsonl"}])
    assert err.message.startswith("dpo.data.val_sources[0]: blank.jsonl holds no preference pairs")
    assert _error(tmp_path, sources=[{"path": "nope/*.jsonl"}]).message.startswith("dpo.data.sources[0].path")


# --- val split, fingerprint, config --------------------------------------------------------------


def test_val_split_is_a_hash_of_the_prompt(tmp_path: Path) -> None:
    pairs = [{"prompt": f"q{i}", "chosen": "a", "rejected": f"b{j}"} for i in range(400) for j in range(2)]
    (tmp_path / "a.jsonl").write_bytes(_jsonl(pairs))
    (tmp_path / "b.jsonl").write_bytes(_jsonl(pairs[::-1]))
    a = _load(tmp_path, sources=[{"path": "a.jsonl"}], val_fraction=0.1)
    b = _load(tmp_path, sources=[{"path": "b.jsonl"}], val_fraction=0.1)
    val_a = [p.prompt[0]["content"] for p in a.val]
    assert 20 <= len(set(val_a)) <= 60 and len(val_a) == 2 * len(set(val_a))  # ~10% of 400, both pairs
    assert set(val_a) == {p.prompt[0]["content"] for p in b.val}  # file order does not matter
    assert not {p.prompt[0]["content"] for p in a.train} & set(val_a)  # one prompt, one side
    assert a.summary()["train"] + a.summary()["val"] == 800
    sep = _load(tmp_path, sources=[{"path": "a.jsonl"}], val_sources=[{"path": "b.jsonl", "limit": 3}])
    assert len(sep.train) == 800 and len(sep.val) == 3 and sep.summary()["val_sources"]["pairs"] == 3


def test_fingerprint_changes_with_the_files(tmp_path: Path) -> None:
    (tmp_path / "p.jsonl").write_bytes(_jsonl(LAYOUTS))
    cfg = PreferenceDataConfig(sources=[{"path": "p.jsonl"}])
    before = preference_fingerprint(cfg, tmp_path)
    assert before == preference_fingerprint(cfg, tmp_path)
    assert before[0]["preferences"] is True and before[0]["files"][0]["path"] == "p.jsonl"
    time.sleep(0.01)
    (tmp_path / "p.jsonl").write_bytes(_jsonl(LAYOUTS[:-1]))
    assert preference_fingerprint(cfg, tmp_path) != before


def test_config_model() -> None:
    cfg = PreferenceDataConfig(sources=[{"path": "p.jsonl"}])
    assert cfg.on_error == "error" and cfg.val_fraction == 0.05 and cfg.sources[0].chosen_key == "chosen"
    with pytest.raises(ValidationError, match="either val_fraction or val_sources"):
        PreferenceDataConfig(sources=[{"path": "a"}], val_fraction=0.1, val_sources=[{"path": "b"}])
    with pytest.raises(ValidationError, match="extra") as e:
        PreferenceDataConfig(sources=[{"path": "a", "messages_key": "m"}])
    assert e.value.errors()[0]["loc"] == ("sources", 0, "messages_key")
    with pytest.raises(ValidationError, match="at least 1"):
        PreferenceDataConfig(sources=[])
    for name, f in PreferenceDataConfig.model_fields.items():
        assert f.description, name
    for name, f in PreferenceDataConfig.model_fields["sources"].annotation.__args__[0].model_fields.items():
        assert f.description, name


# --- the tiny template's synthetic pairs ---------------------------------------------------------


def _parse_question(text: str, world: World) -> tuple[str, str]:
    """(subject, relation) from a question's text alone, not from the record's `facts`."""
    found = set()
    for relation, phrasings in QUESTIONS.items():
        for p in phrasings:
            m = re.fullmatch(re.escape(p).replace(re.escape("{s}"), "(?P<s>.+?)"), text)
            if m and (m["s"], relation) in world.facts:
                found.add((m["s"], relation))
    assert len(found) == 1, (text, found)
    return found.pop()


def _value(relation: str, sentence: str) -> str | None:
    m = re.fullmatch(re.escape(SHORT_ANSWERS[relation]).replace(re.escape("{v}"), "(?P<v>.+)"), sentence)
    return m["v"] if m else None


def test_synthetic_pairs_are_deterministic(tmp_path: Path) -> None:
    generate_preferences(tmp_path / "a", seed=0)
    generate_preferences(tmp_path / "b", seed=0)
    generate_preferences(tmp_path / "c", seed=1)
    a = (tmp_path / "a" / PREFERENCES_FILE).read_bytes()
    assert a == (tmp_path / "b" / PREFERENCES_FILE).read_bytes()
    assert a != (tmp_path / "c" / PREFERENCES_FILE).read_bytes()
    assert len(a.splitlines()) == 1500


def test_synthetic_pairs_prefer_the_true_fact_and_avoid_held_out_ones(tmp_path: Path) -> None:
    world = World.build(0)
    generate_chat(tmp_path, 10, seed=0)
    generate_preferences(tmp_path, seed=0)
    eval_rows = [json.loads(line) for line in (tmp_path / CHAT_EVAL_FILE).read_text().splitlines()]
    held_subjects = {r["subject"] for r in eval_rows}
    eval_prompts = {r["prompt"] for r in eval_rows}
    trainable = {(s, rel): v for (s, rel), v in world.facts.items() if s not in held_subjects}
    records = [json.loads(line) for line in (tmp_path / PREFERENCES_FILE).read_text().splitlines()]
    evasive, system = 0, 0
    for r in records:
        *head, question = r["prompt"]
        assert question["role"] == "user" and question["content"] not in eval_prompts
        if head:
            assert head == [{"role": "system", "content": head[0]["content"]}]
            assert head[0]["content"] in SYSTEM_PROMPTS
            system += 1
        subject, relation = _parse_question(question["content"], world)
        assert subject not in held_subjects, r  # nothing about a held-out entity
        assert r["facts"] == [[subject, relation]]
        assert _value(relation, r["chosen"][0]["content"]) == world.facts[(subject, relation)]
        wrong = _value(relation, r["rejected"][0]["content"])
        if wrong is None:
            kinds = {"realms", "people", "creatures", "artifacts"}
            assert r["rejected"][0]["content"] in {e.format(kinds=k) for e in EVASIVE for k in kinds}
            evasive += 1
        else:  # false, and another trainable entity's value for the same relation
            assert wrong != world.facts[(subject, relation)]
            assert wrong in {v for (s, rel), v in trainable.items() if rel == relation}
    assert 0.15 < evasive / len(records) < 0.25 and 0.25 < system / len(records) < 0.45
    assert len({tuple(r["facts"][0]) for r in records}) > 50  # many facts, not a few repeated
    data = _load(tmp_path, sources=[{"path": PREFERENCES_FILE}])
    assert data.summary()["pairs"] == 1500 and not data.summary()["skipped"]


def test_init_writes_the_preference_pairs(tmp_path: Path) -> None:
    made = init_project(tmp_path / "demo")
    assert "data/preferences.jsonl" in made["files"]
    generate_preferences(tmp_path / "ref", seed=0)
    written = (tmp_path / "demo" / "data" / PREFERENCES_FILE).read_bytes()
    assert written == (tmp_path / "ref" / PREFERENCES_FILE).read_bytes()
    assert (tmp_path / "demo" / "data" / "chat.jsonl").is_file()
