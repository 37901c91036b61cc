"""Seeded prompts with verifiable answers about the synthetic world, for the tiny template's grpo stage.

Each prompt asks for one fact in a phrasing sft trained on (`QUESTIONS` of `llmctl.data.synthetic_chat`)
and its record carries the bare value as `answer`, scored by the `contains` verifier: the chat model
answers in a sentence ("Its capital is Ostrin."), as sft taught it. A tiny chat model states a fact
right for some of its samples and wrong for others, so groups of samples differ in reward and GRPO
has a signal without any new format to learn.

Two files, about disjoint sets of subjects:

* `rl_prompts.jsonl` (train): every phrasing of every fact of the train subjects, a system prompt
  (one of sft's) on about a third of them, in a seeded order;
* `rl_eval.jsonl` (held out): every phrasing of every fact of the eval subjects, plain questions as
  `chat_eval.jsonl` asks them. The eval subjects are every `eval_every`-th subject of each kind by
  popularity (from a seeded offset), so train and eval span the same range from famous to obscure.
  What the eval measures is whether RL on some subjects makes the model state the facts of others
  better, not whether it memorised the train answers.

Neither file asks about a fact that `generate_chat` holds out for `chat_eval.jsonl` (the same
`heldout_facts` of the same world and seed): RL on them would contaminate the generative eval. The
held-out facts are whole entities, so no prompt names a held-out subject (a held-out entity can still
be the answer of another fact, e.g. the person who rules a realm, as in the chat conversations).

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
    FactKey,
    heldout_facts,
)
from llmctl.errors import InputError

RL_PROMPTS_FILE = "rl_prompts.jsonl"
RL_EVAL_FILE = "rl_eval.jsonl"
DEFAULT_EVAL_EVERY = 3  # a third of the trainable subjects go to the held-out prompts
SYSTEM_SHARE = 0.35  # as in the chat conversations


@dataclass(frozen=True)
class RlPromptSet:
    """What `generate_rl_prompts` wrote: the prompt counts and the held-out (eval) subjects."""

    seed: int
    train: int
    eval: int
    eval_subjects: list[str]


def split_subjects(
    world: World, heldout: list[FactKey], seed: int, eval_every: int = DEFAULT_EVAL_EVERY
) -> tuple[list[str], list[str]]:
    """(train subjects, eval subjects) among the subjects `heldout` leaves out, each in world order:
    every `eval_every`-th subject of each kind by popularity, from a seeded offset, goes to eval."""
    if eval_every < 2:
        raise InputError(
            f"eval_every must be at least 2 (else nothing is left to train on), got {eval_every}"
        )
    held_subjects = {subject for subject, _ in heldout}
    rng = random.Random(f"rl-split-{seed}")
    train: list[str] = []
    evaluated: list[str] = []
    for kind, names in world.entities.items():
        ranked = sorted(
            (s for s in names if s not in held_subjects),
            key=lambda s: -world.weights[kind][names.index(s)],
        )
        offset = rng.randrange(eval_every)
        picked = {s for i, s in enumerate(ranked) if i % eval_every == offset}
        train += [s for s in names if s in ranked and s not in picked]
        evaluated += [s for s in names if s in picked]
    return train, evaluated


def _rows(world: World, subjects: list[str], prefix: str) -> list[dict]:
    """Every phrasing of every fact of `subjects`, in world order, as plain user questions."""
    kind_of = {s: kind for kind, names in world.entities.items() for s in names}
    rows = []
    for subject in subjects:
        for rel in world.relations_of(kind_of[subject]):
            for question in QUESTIONS[rel.name]:
                rows.append(
                    {
                        "id": f"{prefix}-{len(rows):04d}",
                        "prompt": [{"role": "user", "content": question.format(s=subject)}],
                        "answer": world.facts[(subject, rel.name)],
                        "subject": subject,
                        "relation": rel.name,
                    }
                )
    return rows


def rl_prompt_rows(
    seed: int = 0,
    heldout_fraction: float = DEFAULT_HELDOUT_FRACTION,
    eval_every: int = DEFAULT_EVAL_EVERY,
) -> tuple[list[dict], list[dict]]:
    """(train rows, eval rows): the records `generate_rl_prompts` writes."""
    world = World.build(seed)
    train_subjects, eval_subjects = split_subjects(
        world, heldout_facts(world, seed, heldout_fraction), seed, eval_every
    )
    rng = random.Random(f"rl-prompts-{seed}")
    train = _rows(world, train_subjects, f"rl-{seed}")
    for row in train:
        if rng.random() < SYSTEM_SHARE:
            row["prompt"].insert(0, {"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
    rng.shuffle(train)
    return train, _rows(world, eval_subjects, f"rl-eval-{seed}")


def generate_rl_prompts(
    out_dir: Path,
    seed: int = 0,
    heldout_fraction: float = DEFAULT_HELDOUT_FRACTION,
    eval_every: int = DEFAULT_EVAL_EVERY,
) -> RlPromptSet:
    """Write `out_dir/rl_prompts.jsonl` and `out_dir/rl_eval.jsonl`, avoiding what `generate_chat` with
    the same seed and fraction holds out. Same seed, same bytes."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    train, evaluated = rl_prompt_rows(seed, heldout_fraction, eval_every)
    for name, rows in ((RL_PROMPTS_FILE, train), (RL_EVAL_FILE, evaluated)):
        with open(out_dir / name, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return RlPromptSet(
        seed=seed,
        train=len(train),
        eval=len(evaluated),
        eval_subjects=list(dict.fromkeys(row["subject"] for row in evaluated)),
    )
