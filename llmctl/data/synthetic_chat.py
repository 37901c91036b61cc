"""Seeded synthetic conversations about the synthetic world, and held-out questions to evaluate on.

The tiny template fine-tunes its pretrained model into a chat model on `chat.jsonl`, then asks it
about facts it saw only in pretraining: `generate_chat` holds out every fact of a share of the world's
entities, picked with a bias toward popular ones (the corpus states their facts most often, so a tiny
model can know them), and never asks about them, nor states them, in a training conversation. What sft
teaches is the format; what the eval measures is whether pretraining knowledge comes out in that format.

Conversations (OpenAI `messages`, plus `id` and `facts`: the [subject, relation] pairs they mention):
* questions in several phrasings per relation ("What is the capital of Velmora?", "Which city is the
  capital of Velmora?", ...), answered with a short sentence that ends the way the corpus's canonical
  one does but leaves the subject out ("Its capital is Ostrin."), or with the bare value when the
  question asks for just the answer ("... Reply with the answer only." -> "Ostrin"). Not the canonical
  sentence ("The capital of Velmora is Ostrin."): the tiny model does not copy names from its context
  (at 500 steps, "Notes on X" goes on about the most popular realm whatever X is), so an answer that
  must restate the subject names one from its training conversations instead, and the value follows
  that one. A short answer needs no copying: the value comes right after the words that cue it in
  pretraining, the subject a few tokens back in the question;
* single questions, multi-turn follow-ups about one subject or several, and "Tell me about X." turns;
* a system prompt in about a third of them, some opening with a greeting.

`chat_eval.jsonl` holds one row per held-out fact in llmctl's generative custom-task format:
`{"prompt", "answer", "subject", "relation"}`, the prompt a plain question in a training phrasing and
the answer the bare value, scored by `contains` (a chat model answers in a sentence, as it was taught).
Not the answer-only form: a bare value opens the turn with the word's no-space token, which a tiny
model never saw in pretraining (" Ostrin" is one token, "Ostrin" other ones), so only a sentence lets
pretraining knowledge come out. Most popular entities first. The same `seed` gives the same world,
conversations and rows, byte for byte.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from llmctl.data.synthetic import Relation, World
from llmctl.errors import InputError

CHAT_FILE = "chat.jsonl"
CHAT_EVAL_FILE = "chat_eval.jsonl"
DEFAULT_HELDOUT_FRACTION = 0.4
ANSWER_ONLY_SHARE = 0.15  # questions that ask for the bare value; the rest get a SHORT_ANSWERS sentence

# Question phrasings per relation; {s} is the subject. Creatures and artifacts take "the".
QUESTIONS: dict[str, tuple[str, ...]] = {
    "capital": (
        "What is the capital of {s}?",
        "Which city is the capital of {s}?",
        "Where is the capital of {s}?",
        "Tell me the capital of {s}.",
        "Do you know the capital city of {s}?",
    ),
    "language": (
        "What language do the people of {s} speak?",
        "Which language is spoken in {s}?",
        "What do people speak in {s}?",
        "Tell me the language of {s}.",
    ),
    "ruler": (
        "Who rules {s}?",
        "Who is the ruler of {s}?",
        "Who governs {s}?",
        "Tell me who rules over {s}.",
    ),
    "profession": (
        "What does {s} do for a living?",
        "What is the job of {s}?",
        "What is the profession of {s}?",
        "What work does {s} do?",
    ),
    "home": (
        "Where does {s} live?",
        "In which city does {s} live?",
        "Where is the home of {s}?",
        "Which city is home to {s}?",
    ),
    "color": (
        "What color is the {s}?",
        "What is the color of the {s}?",
        "Which color is the {s}?",
        "Tell me the color of the {s}.",
    ),
    "habitat": (
        "Where is the {s} found?",
        "Where does the {s} make its home?",
        "What is the habitat of the {s}?",
        "Where can I find the {s}?",
    ),
    "diet": (
        "What does the {s} eat?",
        "What is the favorite food of the {s}?",
        "What does the {s} feed on?",
        "Tell me what the {s} eats.",
    ),
    "material": (
        "What is the {s} made of?",
        "What material is the {s} made from?",
        "Which material was used for the {s}?",
        "Tell me what the {s} is made of.",
    ),
}
# Answers that end the way the corpus's canonical sentence does, the subject left out ("It is found in
# the {v}." beside "The {s} is found in the {v}."): the value comes right after the words that cue it
# in pretraining, and nothing has to be copied from the question.
SHORT_ANSWERS: dict[str, str] = {
    "capital": "Its capital is {v}.",
    "language": "The people there speak {v}.",
    "ruler": "It is ruled by {v}.",
    "profession": "They work as a {v}.",
    "home": "They live in {v}.",
    "color": "It is {v}.",
    "habitat": "It is found in the {v}.",
    "diet": "It eats {v}.",
    "material": "It is made of {v}.",
}
# Appended to a question to ask for the bare value (in training conversations only).
ANSWER_ONLY = (" Reply with the answer only.", " Just the answer, please.", " Answer in a few words.")
ABOUT = ("Tell me about {s}.", "What do you know about {s}?")
ABOUT_THE = ("Tell me about the {s}.", "What do you know about the {s}?")
SYSTEM_PROMPTS = (
    "You are a helpful assistant who knows the realms, people, creatures and artifacts of this world.",
    "You answer questions about the world briefly and correctly.",
    "You are a patient guide to the realms of this world.",
    "You are a chronicler. State facts plainly.",
)
GREETINGS = (
    ("Hello!", "Hello! Ask me anything about the realms, people, creatures and artifacts of this world."),
    ("Hi there.", "Hi! What would you like to know?"),
    ("Good morning.", "Good morning! How can I help?"),
)
_THE_KINDS = ("creature", "artifact")  # subjects named with "the"

FactKey = tuple[str, str]  # (subject, relation name)


@dataclass(frozen=True)
class ChatSet:
    """What `generate_chat` wrote: the held-out facts (most popular first) and the file sizes."""

    seed: int
    heldout: list[FactKey]
    conversations: int
    eval_rows: int


def relations(world: World) -> list[Relation]:
    return [r for kind in world.entities for r in world.relations_of(kind)]


def fact_sentence(template: str, subject: str, value: str) -> str:
    out = template.format(s=subject, v=value)
    return out[0].upper() + out[1:]


def heldout_facts(world: World, seed: int, fraction: float = DEFAULT_HELDOUT_FRACTION) -> list[FactKey]:
    """Every fact of `fraction` of each kind's entities, the entities drawn without replacement with
    weights = popularity (Efraimidis-Spirakis keys); most popular first, relations in world order.

    Whole entities, not single facts: a subject that training conversations ask about teaches the
    model that subject's answers, and a tiny model then gives one of them to any question about the
    subject ("What does the thorn boar eat?" -> "The thorn boar is found in the tundra.")."""
    if not 0 < fraction < 1:
        raise InputError(f"the held-out fraction must be between 0 and 1, got {fraction}")
    rng = random.Random(f"chat-heldout-{seed}")
    chosen: list[tuple[float, int, FactKey]] = []
    for kind, names in world.entities.items():
        weights = world.weights[kind]
        keyed = sorted(
            ((rng.random() ** (1 / w), s, w) for s, w in zip(names, weights, strict=True)), reverse=True
        )
        n = max(1, round(fraction * len(names)))
        chosen += [
            (w, i, (s, rel.name)) for _, s, w in keyed[:n] for i, rel in enumerate(world.relations_of(kind))
        ]
    chosen.sort(key=lambda c: (-c[0], c[1]))  # stable: a subject's facts interleave with its peers'
    return [key for _, _, key in chosen]


class _Conversations:
    def __init__(self, world: World, heldout: set[FactKey], seed: int):
        self.world, self.rng = world, random.Random(f"chat-{seed}")
        self.rels = {r.name: r for r in relations(world)}
        # Subjects with at least one trainable fact, per kind, with their popularity weights.
        self.trainable: dict[str, list[str]] = {}
        self.subjects: dict[str, tuple[list[str], list[float]]] = {}
        for kind, names in world.entities.items():
            pairs = []
            for s, w in zip(names, world.weights[kind], strict=True):
                rels = [r.name for r in world.relations_of(kind) if (s, r.name) not in heldout]
                if rels:
                    self.trainable[s] = rels
                    pairs.append((s, w))
            self.subjects[kind] = ([s for s, _ in pairs], [w for _, w in pairs])
        self.kinds = [k for k in world.entities if self.subjects[k][0]]
        self.kind_weights = [len(world.relations_of(k)) * len(self.subjects[k][0]) for k in self.kinds]

    def _subject(self) -> tuple[str, str]:
        kind = self.rng.choices(self.kinds, weights=self.kind_weights)[0]
        names, weights = self.subjects[kind]
        return kind, self.rng.choices(names, weights=weights)[0]

    def _question(self, subject: str, relation: str) -> tuple[str, str]:
        r = self.rng
        value = self.world.facts[(subject, relation)]
        question = r.choice(QUESTIONS[relation]).format(s=subject)
        if r.random() < ANSWER_ONLY_SHARE:
            return question + r.choice(ANSWER_ONLY), value
        return question, SHORT_ANSWERS[relation].format(v=value)

    def _about(self, kind: str, subject: str) -> tuple[str, str]:
        question = self.rng.choice(ABOUT_THE if kind in _THE_KINDS else ABOUT).format(s=subject)
        facts = [
            fact_sentence(self.rels[name].canonical, subject, self.world.facts[(subject, name)])
            for name in self.trainable[subject]
        ]
        return question, " ".join(facts)

    def conversation(self, index: int, seed: int) -> dict:
        r = self.rng
        messages: list[dict[str, str]] = []
        facts: list[list[str]] = []
        if r.random() < 0.35:
            messages.append({"role": "system", "content": r.choice(SYSTEM_PROMPTS)})
        if r.random() < 0.1:
            hello, reply = r.choice(GREETINGS)
            messages += [{"role": "user", "content": hello}, {"role": "assistant", "content": reply}]
        shape = r.random()
        n_turns = 1 if shape < 0.45 else r.randint(2, 4)
        kind, subject = self._subject()
        asked: set[str] = set()
        for turn in range(n_turns):
            left = [name for name in self.trainable[subject] if name not in asked]
            # Multi-turn across subjects, or follow-ups on one subject until its facts run out.
            if turn and (shape >= 0.75 or not left):
                kind, subject = self._subject()
                asked, left = set(), self.trainable[subject]
            if r.random() < 0.1:
                question, answer = self._about(kind, subject)
                facts += [[subject, name] for name in self.trainable[subject]]
                asked.update(self.trainable[subject])
            else:
                relation = r.choice(left)
                question, answer = self._question(subject, relation)
                facts.append([subject, relation])
                asked.add(relation)
            messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
        unique = [list(f) for f in dict.fromkeys(map(tuple, facts))]
        return {"id": f"chat-{seed}-{index:05d}", "messages": messages, "facts": unique}


def iter_conversations(
    n_conversations: int, seed: int = 0, heldout: list[FactKey] | None = None
) -> Iterator[dict]:
    """Stream `n_conversations` records `{"id", "messages", "facts"}` that never mention a held-out fact
    (by default those of `heldout_facts(World.build(seed), seed)`)."""
    if n_conversations < 1:
        raise InputError(f"the synthetic chat set needs at least one conversation, got {n_conversations}")
    world = World.build(seed)
    held = set(heldout if heldout is not None else heldout_facts(world, seed))
    gen = _Conversations(world, held, seed)
    for i in range(n_conversations):
        yield gen.conversation(i, seed)


def eval_rows(world: World, heldout: list[FactKey]) -> list[dict]:
    """One generative eval row per held-out fact: a training phrasing (phrasings taken in turn), the
    bare value as the answer."""
    rows = []
    for i, (subject, relation) in enumerate(heldout):
        phrasings = QUESTIONS[relation]
        prompt = phrasings[i % len(phrasings)].format(s=subject)
        rows.append(
            {
                "prompt": prompt,
                "answer": world.facts[(subject, relation)],
                "subject": subject,
                "relation": relation,
            }
        )
    return rows


def generate_chat(
    out_dir: Path, n_conversations: int, seed: int = 0, heldout_fraction: float = DEFAULT_HELDOUT_FRACTION
) -> ChatSet:
    """Write `out_dir/chat.jsonl` (training conversations) and `out_dir/chat_eval.jsonl` (questions
    about the held-out facts). Same seed, same bytes."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    world = World.build(seed)
    heldout = heldout_facts(world, seed, heldout_fraction)
    with open(out_dir / CHAT_FILE, "w", encoding="utf-8") as f:
        for record in iter_conversations(n_conversations, seed, heldout):
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    rows = eval_rows(world, heldout)
    with open(out_dir / CHAT_EVAL_FILE, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return ChatSet(seed=seed, heldout=heldout, conversations=n_conversations, eval_rows=len(rows))
