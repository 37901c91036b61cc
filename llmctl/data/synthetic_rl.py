"""Seeded prompts with verifiable answers about the synthetic world, for the tiny template's grpo stage.

Each prompt asks for one fact in a phrasing sft trained on (`QUESTIONS` of `llmctl.data.synthetic_chat`)
and its record carries the bare value as `answer`, scored by the `contains` verifier: the chat model
answers in a sentence ("Its capital is Ostrin."), as sft taught it. A tiny chat model states a fact
right for some of its samples and wrong for others, so groups of samples differ in reward and GRPO
has a signal without any new format to learn.

Two files, with no prompt in common:

* `rl_prompts.jsonl` (train): for every fact, all but `eval_phrasings` of its phrasings, a system
  prompt (one of sft's) on about a third of them, in a seeded order;
* `rl_eval.jsonl` (held out): the other `eval_phrasings` phrasings of every fact (per relation, the
  pick rotates through a seeded order of its phrasings, so every phrasing occurs on both sides), plain questions as `chat_eval.jsonl` asks them.

What the held-out reward measures is whether RL made the model state a fact right when asked in words
it was never rewarded on: the policy has to move the fact, not a string. (RL on some subjects scored on
others moved a greedy held-out reward by only +0.044 +- 0.025 here: RL sharpens what a model samples,
and a greedy answer about a subject RL never saw rarely changes.)

Neither file asks about a fact that `generate_chat` holds out for `chat_eval.jsonl` (the same
`heldout_facts` of the same world and seed): RL on them would contaminate the generative eval. The
held-out facts are whole entities, so no prompt names a held-out subject (a held-out entity can still
be the answer of another fact, e.g. the person who rules a realm, as in the chat conversations).

RL asks only about `rl_subjects`, every other remaining entity of each kind in popularity order, and
the preference pairs (`llmctl.data.synthetic_preferences`) only about the others: DPO on the same facts
left GRPO nothing to move (held-out reward 0.684 after sft, 0.781 after dpo, then +0.004 +- 0.019 from
100 GRPO steps), so each post-training stage teaches its own facts and is measured on them.

Records: `{"id", "prompt": [messages], "answer", "subject", "relation"}`; `llmctl.rl.prompts` reads
them. The same seed gives the same bytes.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from llmctl.data.synthetic import World
from llmctl.data.synthetic_chat import (
    DEFAULT_HELDOUT_FRACTION,
    QUESTIONS,
    SYSTEM_PROMPTS,
    heldout_facts,
)
from llmctl.errors import InputError

RL_PROMPTS_FILE = "rl_prompts.jsonl"
RL_EVAL_FILE = "rl_eval.jsonl"
DEFAULT_EVAL_PHRASINGS = 2  # of every fact's 4-5 phrasings; the other 2-3 are trained on
SYSTEM_SHARE = 0.35  # as in the chat conversations


@dataclass(frozen=True)
class RlPromptSet:
    """What `generate_rl_prompts` wrote: the prompt counts and how many facts they ask about."""

    seed: int
    train: int
    eval: int
    facts: int


def rl_subjects(world: World, seed: int = 0, heldout_fraction: float = DEFAULT_HELDOUT_FRACTION) -> set[str]:
    """The entities RL asks about: of each kind's entities that `generate_chat` does not hold out, the
    2nd, 4th, ... most popular, so that RL and the preference pairs both get popular and rare ones."""
    held = {subject for subject, _ in heldout_facts(world, seed, heldout_fraction)}
    chosen: set[str] = set()
    for kind, names in world.entities.items():
        weight = dict(zip(names, world.weights[kind], strict=True))
        by_popularity = sorted((s for s in names if s not in held), key=lambda s: -weight[s])
        chosen.update(by_popularity[1::2])
    return chosen


def _fact_rows(world: World, subject: str, relation: str) -> list[dict]:
    """The fact (subject, relation) in each of its phrasings, as plain user questions."""
    return [
        {
            "prompt": [{"role": "user", "content": question.format(s=subject)}],
            "answer": world.facts[(subject, relation)],
            "subject": subject,
            "relation": relation,
        }
        for question in QUESTIONS[relation]
    ]


def rl_prompt_rows(
    seed: int = 0,
    heldout_fraction: float = DEFAULT_HELDOUT_FRACTION,
    eval_phrasings: int = DEFAULT_EVAL_PHRASINGS,
) -> tuple[list[dict], list[dict]]:
    """(train rows, eval rows): the records `generate_rl_prompts` writes."""
    fewest = min(len(q) for q in QUESTIONS.values())
    if not 1 <= eval_phrasings < fewest:
        raise InputError(
            f"eval_phrasings must be between 1 and {fewest - 1} (every fact needs a phrasing on each "
            f"side), got {eval_phrasings}"
        )
    world = World.build(seed)
    asked = rl_subjects(world, seed, heldout_fraction)
    rng = random.Random(f"rl-prompts-{seed}")
    train: list[dict] = []
    evaluated: list[dict] = []
    facts = 0
    # Per relation, the held-out phrasings rotate through a seeded order of its phrasings, fact after
    # fact, so each phrasing is held out for some fact (and trained on for others).
    held_next = {rel: 0 for rel in QUESTIONS}
    order = {rel: rng.sample(range(len(qs)), len(qs)) for rel, qs in QUESTIONS.items()}
    for kind, names in world.entities.items():
        for subject in (s for s in names if s in asked):
            for rel in world.relations_of(kind):
                phrasings = _fact_rows(world, subject, rel.name)
                n, first = len(phrasings), held_next[rel.name]
                held_out = {order[rel.name][(first + j) % n] for j in range(eval_phrasings)}
                held_next[rel.name] = (first + eval_phrasings) % n
                evaluated += [row for i, row in enumerate(phrasings) if i in held_out]
                train += [row for i, row in enumerate(phrasings) if i not in held_out]
                facts += 1
    for row in train:
        if rng.random() < SYSTEM_SHARE:
            row["prompt"].insert(0, {"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
    rng.shuffle(train)
    for prefix, rows in ((f"rl-{seed}", train), (f"rl-eval-{seed}", evaluated)):
        for i, row in enumerate(rows):
            rows[i] = {"id": f"{prefix}-{i:04d}", **row}
    return train, evaluated


def generate_rl_prompts(
    out_dir: Path,
    seed: int = 0,
    heldout_fraction: float = DEFAULT_HELDOUT_FRACTION,
    eval_phrasings: int = DEFAULT_EVAL_PHRASINGS,
) -> RlPromptSet:
    """Write `out_dir/rl_prompts.jsonl` and `out_dir/rl_eval.jsonl`, avoiding what `generate_chat` with
    the same seed and fraction holds out. Same seed, same bytes."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    train, evaluated = rl_prompt_rows(seed, heldout_fraction, eval_phrasings)
    for name, rows in ((RL_PROMPTS_FILE, train), (RL_EVAL_FILE, evaluated)):
        with open(out_dir / name, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
    facts = len({(row["subject"], row["relation"]) for row in evaluated})
    return RlPromptSet(seed=seed, train=len(train), eval=len(evaluated), facts=facts)
