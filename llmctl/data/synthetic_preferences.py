"""Seeded preference pairs about the synthetic world, for the tiny template's dpo stage.

Each pair asks one question about a fact in a training phrasing of `llmctl.data.synthetic_chat` (a
system prompt in about a third of them) and prefers the true short answer over a worse one:

* mostly a plausible false answer: the same sentence with the value another entity has for the same
  relation ("Its capital is Ostrin." over "Its capital is Barrow."), so the preference is about the
  fact, not the form;
* in a minority (`EVASIVE_SHARE`), an evasive or rambling answer that states nothing.

No pair is about a fact that `generate_chat` holds out for `chat_eval.jsonl`: the held-out entities
are `heldout_facts` of the same world and seed, and the false values come from the facts of entities
that are not held out, so no pair names a held-out subject (a held-out answer appears only as a value
some other entity shares, such as a color). The generative eval then still measures knowledge that
only pretraining gave. Nor is any pair about the subjects the RL prompts ask about
(`llmctl.data.synthetic_rl.rl_subjects`): grpo's held-out reward measures facts dpo did not teach.

`generate_preferences` writes `preferences.jsonl`, one `{"id", "prompt", "chosen", "rejected",
"facts"}` per line (prompt, chosen and rejected message lists; facts the [subject, relation] asked
about); `llmctl.data.preference` reads it. The same seed gives the same bytes.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from pathlib import Path

from llmctl.data.synthetic import World
from llmctl.data.synthetic_chat import (
    DEFAULT_HELDOUT_FRACTION,
    QUESTIONS,
    SHORT_ANSWERS,
    SYSTEM_PROMPTS,
    FactKey,
    heldout_facts,
    relations,
)
from llmctl.data.synthetic_rl import rl_subjects
from llmctl.errors import InputError

PREFERENCES_FILE = "preferences.jsonl"
DEFAULT_PAIRS = 1500
EVASIVE_SHARE = 0.2  # rejected answers that dodge the question instead of stating a false value
SYSTEM_SHARE = 0.35  # as in the chat conversations
_PLURALS = {"realm": "realms", "person": "people", "creature": "creatures", "artifact": "artifacts"}
EVASIVE = (
    "I am not sure. There are many {kinds} in this world, and I might be mixing them up.",
    "That is a good question. Many have wondered about it, and some stories say one thing and some "
    "another, so it is hard to give a single answer.",
    "I would rather not guess about that.",
    "Well, it depends on whom you ask, and on the season, and on many other things besides.",
)


def iter_preference_pairs(
    n_pairs: int, seed: int = 0, heldout_fraction: float = DEFAULT_HELDOUT_FRACTION
) -> Iterator[dict]:
    """Stream `n_pairs` records, popular subjects more often, as the corpus states them, about facts
    neither `generate_chat` (its `heldout_facts`) nor the RL prompts (`rl_subjects`) hold for themselves."""
    if n_pairs < 1:
        raise InputError(f"the synthetic preference set needs at least one pair, got {n_pairs}")
    world = World.build(seed)
    held: set[FactKey] = set(heldout_facts(world, seed, heldout_fraction))
    rl_asked = rl_subjects(world, seed, heldout_fraction)
    held |= {(s, r) for (s, r) in world.facts if s in rl_asked}
    rels = {r.name: r for r in relations(world)}
    facts: list[FactKey] = []
    weights: list[float] = []
    # Per relation, the values of the facts that may be named: the false answers come from these.
    values: dict[str, list[str]] = {}
    for rel in rels.values():
        for s, w in zip(world.entities[rel.subject], world.weights[rel.subject], strict=True):
            if (s, rel.name) not in held:
                facts.append((s, rel.name))
                weights.append(w)
                values.setdefault(rel.name, []).append(world.facts[(s, rel.name)])
    rng = random.Random(f"preferences-{seed}")
    for i in range(n_pairs):
        subject, relation = rng.choices(facts, weights=weights)[0]
        truth = world.facts[(subject, relation)]
        prompt = [{"role": "user", "content": rng.choice(QUESTIONS[relation]).format(s=subject)}]
        if rng.random() < SYSTEM_SHARE:
            prompt.insert(0, {"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
        false_values = sorted(set(values[relation]) - {truth})
        if rng.random() < EVASIVE_SHARE or not false_values:
            rejected = rng.choice(EVASIVE).format(kinds=_PLURALS[rels[relation].subject])
        else:
            rejected = SHORT_ANSWERS[relation].format(v=rng.choice(false_values))
        yield {
            "id": f"pref-{seed}-{i:05d}",
            "prompt": prompt,
            "chosen": [{"role": "assistant", "content": SHORT_ANSWERS[relation].format(v=truth)}],
            "rejected": [{"role": "assistant", "content": rejected}],
            "facts": [[subject, relation]],
        }


def generate_preferences(
    out_dir: Path,
    n_pairs: int = DEFAULT_PAIRS,
    seed: int = 0,
    heldout_fraction: float = DEFAULT_HELDOUT_FRACTION,
) -> int:
    """Write `out_dir/preferences.jsonl`, holding out what `generate_chat` and `generate_rl_prompts` with
    the same seed and fraction hold out; returns the number of pairs. Same seed, same bytes."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / PREFERENCES_FILE, "w", encoding="utf-8") as f:
        for record in iter_preference_pairs(n_pairs, seed, heldout_fraction):
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    return n_pairs
