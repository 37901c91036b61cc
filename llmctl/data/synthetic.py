"""A deterministic synthetic corpus with planted duplicates, planted junk and a small invented world.

The tiny template, the tests and the benchmarks need a corpus that exists offline, is fast to make,
and has a known answer for every data step:

* clean documents: readable English-like prose from templated sentences over a few hundred words,
  woven around an invented world (realms, people, creatures, artifacts) whose facts never change —
  "The capital of Velmora is Ostrin." Each fact is stated in many documents, most often in one
  canonical phrasing, so a tiny LM trained for minutes learns the frequent ones;
* planted exact duplicates (identical text, sometimes with whitespace changes) and near duplicates
  (about 1% of words substituted/inserted/deleted, punctuation changes, sometimes an appended line;
  word-5-gram Jaccard kept >= 0.85 so MinHash at 14 bands x 8 rows catches them with > 98% probability);
* planted low-quality documents of several kinds (boilerplate, repeated lines, symbol soup, too short,
  mostly non-alphabetic, lorem ipsum, word lists without stop words).

`generate_corpus` writes `docs.jsonl` (one `{"id", "text", "metadata"}` per line) and `truth.json`;
`iter_documents` streams the same documents for benchmarks; `world_multiple_choice` makes held-out
multiple-choice items about the world (lm-eval style: score each choice as a continuation of `query`).
The same `seed` gives the same world, documents and items, byte for byte.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from llmctl.errors import InputError

# ---------------------------------------------------------------------------------------------------
# Vocabulary. Fixed lists (not seeded) so that every seed speaks the same language.


def _words(text: str, sep: str | None = None) -> list[str]:
    return text.split(sep)


_ADJ = _words(
    "old young quiet busy bright dark narrow wide ancient modern gentle fierce small large heavy "
    "light cold warm silver golden green blue red pale tall short hidden famous humble proud careful "
    "clever patient restless distant nearby crowded empty shining dusty wooden stony rainy windy "
    "foggy sunny strange familiar lonely cheerful serious tired eager steady broken sturdy sharp "
    "smooth rough sweet bitter fresh crisp soft loud swift slow simple rare common"
)
_NOUN = _words(
    "market bridge harbor tower garden river forest village road field mill school library temple "
    "window door roof wall table lantern basket boat cart horse letter map book song story festival "
    "storm winter summer morning evening night meal bread soup coin rope stone hill valley lake well "
    "square kitchen workshop barn orchard meadow cliff shore island path gate fence chimney candle "
    "blanket jar kettle ladder hammer needle shelf clock bell flag drum ship wagon council trader "
    "farmer sailor child elder teacher guard stranger traveler neighbor"
)
_PLACE = _words(
    "market bridge harbor tower garden forest village mill school library temple square orchard meadow shore"
)
_VERB = _words(
    "carried painted repaired visited watched found opened closed cleaned built crossed followed "
    "described remembered studied counted measured planted gathered sold bought shared borrowed "
    "packed moved lifted covered marked guarded explored noticed traded delivered prepared mended "
    "sorted carved polished tested copied named wrapped"
)
_ADV = _words(
    "slowly quickly quietly carefully happily rarely often gladly patiently suddenly gently boldly "
    "eagerly calmly proudly easily barely nearly finally openly"
)
_TIME = _words(
    "In the morning|At dawn|Before noon|Late in the evening|During the winter|Every spring|On the first day of the festival|After the long storm|Years ago|Last autumn|At midnight|Some time later|By the end of the week|Long before the bridge was built|On market day",
    sep="|",
)
_FEEL = _words("calm hopeful curious uneasy grateful surprised content restless amused puzzled")
_WEATHER = _words("rain|snow|wind|fog|sunshine|thunder|frost|a warm breeze|a cold mist|heavy clouds", sep="|")
_NUMBER = _words("two three four five six seven eight nine ten twelve twenty forty")
_STOP = set(_words("the a an of in on at to and or but is was were are be by for with from as that this it"))

# Sentence templates: {A} adjective, {N} noun, {P} place, {V} past verb, {D} adverb, {T} time phrase,
# {F} feeling, {W} weather, {K} number, {X} a person, {R} a realm, {C} a creature, {O} an artifact.
_FILLER = (
    "{T}, {X} {V} the {A} {N} near the {P}.",
    "The {A} {N} by the {P} was {D} {V} by {X}.",
    "{X} said that the {N} of {R} had never looked so {A}.",
    "Nobody in the {P} expected {W} that day, yet it came {D}.",
    "{T}, the people of {R} {V} {K} {N}s and {D} {V} them again.",
    "{X} felt {F} when the {A} {N} arrived at the {P}.",
    "A {A} {C} was seen near the {P} of {R}, and {X} {D} {V} it.",
    "Travelers often say the {P} of {R} is the most {A} place they know.",
    "{X} kept a {A} {N} in the {N} and {V} it every week.",
    "The {O} was {D} {V} and then returned to the {P}.",
    "{T}, {W} covered the {A} {P}, and the {N}s stayed {A}.",
    "It took {K} days to reach the {P} on foot from the {A} {N}.",
    "Children in {R} learn the story of the {O} before they can read.",
    "{X} and {X} {V} the {N} together while the {C} watched.",
    "The old {N} was {A}, but the new one was even more {A}.",
    "{X} wrote a letter about the {A} {N} and the {W} over the {P}.",
    "Everyone agreed that the {N} near the {P} needed to be {V}.",
    "When the {C} cried at night, the {N}s of the {P} {V} {D}.",
    "{X} {D} asked why the {N} had been {V} so {D}.",
    "There were {K} {A} {N}s in the {P}, and {X} {V} each of them.",
    "The {A} road to {R} passes a {N}, a {N} and a {A} {P}.",
    "According to {X}, the best {N}s are {V} in {R}.",
    "{T}, a {A} traveler {V} the {O} and left without a word.",
    "The {P} smelled of {N}s and {W}, as it always does in {R}.",
)
_TITLES = (
    "Notes on {R}",
    "A {A} day in {R}",
    "The story of {X}",
    "About the {C}",
    "Travels through {R}",
    "What we know of the {O}",
    "Letters from the {P}",
    "{X} and the {A} {N}",
)


# ---------------------------------------------------------------------------------------------------
# The world: entities with fixed attributes. Relations are (subject kind, canonical template, variant
# templates, value kind). The canonical template ends with the value so it doubles as an MC query.


@dataclass(frozen=True)
class Relation:
    name: str
    subject: str  # entity kind of the subject
    value: str  # value pool the object comes from
    canonical: str  # "{s} ... {v}." with {v} last: the MC query is the text before " {v}"
    variants: tuple[str, ...]


_RELATIONS = (
    Relation(
        "capital",
        "realm",
        "city",
        "The capital of {s} is {v}.",
        (
            "{v} is the capital of {s}.",
            "In {s}, the capital city is {v}.",
            "{s} is ruled from {v}, its capital.",
        ),
    ),
    Relation(
        "language",
        "realm",
        "language",
        "The people of {s} speak {v}.",
        ("In {s}, everyone speaks {v}.", "{v} is the language of {s}."),
    ),
    Relation(
        "ruler",
        "realm",
        "person",
        "The ruler of {s} is {v}.",
        ("{v} rules over {s}.", "{s} is governed by {v}."),
    ),
    Relation(
        "profession",
        "person",
        "profession",
        "{s} works as a {v}.",
        ("By trade, {s} is a {v}.", "{s} has always been a {v}."),
    ),
    Relation(
        "home",
        "person",
        "city",
        "{s} lives in {v}.",
        ("{s} has a house in {v}.", "{s} makes a home in {v}."),
    ),
    Relation(
        "color",
        "creature",
        "color",
        "The color of the {s} is {v}.",
        ("The {s} has {v} fur.", "Every {s} is {v}."),
    ),
    Relation(
        "habitat",
        "creature",
        "habitat",
        "The {s} is found in the {v}.",
        ("The {s} makes its home in the {v}.", "You can find the {s} in the {v}."),
    ),
    Relation(
        "diet",
        "creature",
        "food",
        "The {s} eats {v}.",
        ("The {s} feeds on {v}.", "The favorite food of the {s} is {v}."),
    ),
    Relation(
        "material",
        "artifact",
        "material",
        "The {s} is made of {v}.",
        ("The {s} was forged from {v}.", "Someone made the {s} out of {v}."),
    ),
)

_PROFESSIONS = _words(
    "baker smith weaver potter miner fisher healer scribe builder farmer sailor painter hunter tailor brewer"
)
_COLORS = _words("red blue green yellow white black grey orange purple brown silver golden")
_HABITATS = _words("forest marsh desert mountains caves hills river valley tundra grasslands jungle coast")
_FOODS = _words("berries fish roots insects seeds mushrooms grass honey leaves nuts snails clover")
_MATERIALS = _words("iron bronze oak glass bone copper silver stone clay jade amber ivory")
_SYLLABLES = _words(
    "vel mor ost rin bar row kal tir dun ael syl mar oth ven gar lin bel dor fen hal ith kor lum nar "
    "pel quin ras sen tal ur vor wyn yel zan ber cal dra esk fal gol"
)
_CREATURE_HEADS = _words("fox owl toad wolf hare crane lizard beetle moth otter heron stag boar badger lynx")


def _invent_names(
    rng: random.Random, n: int, taken: set[str], syllables: tuple[int, int] = (2, 3)
) -> list[str]:
    names = []
    while len(names) < n:
        name = "".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(*syllables))).capitalize()
        if name not in taken and 4 <= len(name) <= 11:
            taken.add(name)
            names.append(name)
    return names


@dataclass(frozen=True)
class World:
    """Entities by kind, value pools, facts (subject, relation) -> value, and popularity weights."""

    entities: dict[str, list[str]]
    pools: dict[str, list[str]]
    facts: dict[tuple[str, str], str]
    weights: dict[str, list[float]]  # per entity kind, Zipf-like popularity aligned with `entities`

    @classmethod
    def build(cls, seed: int) -> World:
        rng = random.Random(f"world-{seed}")
        taken: set[str] = set()
        realms = _invent_names(rng, 16, taken)
        cities = _invent_names(rng, 40, taken)
        people = [
            f"{first} {last}"
            for first, last in zip(
                _invent_names(rng, 36, taken, (1, 2)), _invent_names(rng, 36, taken), strict=True
            )
        ]
        languages = [n + "ish" for n in _invent_names(rng, 12, taken, (2, 2))]
        creatures = [
            f"{adj} {head}"
            for adj, head in zip(
                rng.sample(
                    _words(
                        "marsh ember frost dusk thorn moon ash reed cloud salt iron mist glow briar storm dune shade sun"
                    ),
                    18,
                ),
                rng.choices(_CREATURE_HEADS, k=18),
                strict=True,
            )
        ]
        artifacts = [
            f"{adj} of {name}"
            for adj, name in zip(
                rng.sample(
                    _words(
                        "Crown Lantern Horn Mirror Blade Chalice Harp Key Shield Compass Bell Staff Ring Banner"
                    ),
                    12,
                ),
                _invent_names(rng, 12, taken),
                strict=True,
            )
        ]
        entities = {"realm": realms, "person": people, "creature": creatures, "artifact": artifacts}
        pools = {
            "city": cities,
            "language": languages,
            "person": people,
            "profession": _PROFESSIONS,
            "color": _COLORS,
            "habitat": _HABITATS,
            "food": _FOODS,
            "material": _MATERIALS,
        }
        facts: dict[tuple[str, str], str] = {}
        capitals = rng.sample(cities, len(realms))  # a city is the capital of at most one realm
        rulers = rng.sample(people, len(realms))
        for rel in _RELATIONS:
            for i, s in enumerate(entities[rel.subject]):
                if rel.name == "capital":
                    facts[(s, rel.name)] = capitals[i]
                elif rel.name == "ruler":
                    facts[(s, rel.name)] = rulers[i]
                else:
                    facts[(s, rel.name)] = rng.choice(pools[rel.value])
        # Zipf-ish popularity: a few entities appear in many documents (their facts are learnable),
        # the long tail in few.
        weights = {
            kind: [1.0 / (rank + 1) ** 0.7 for rank in range(len(names))] for kind, names in entities.items()
        }
        return cls(entities=entities, pools=pools, facts=facts, weights=weights)

    def relations_of(self, kind: str) -> list[Relation]:
        return [r for r in _RELATIONS if r.subject == kind]


def _fill(template: str, s: str, v: str) -> str:
    out = template.format(s=s, v=v)
    return out[0].upper() + out[1:]


def _fact_sentence(world: World, rng: random.Random, subject: str, rel: Relation) -> str:
    v = world.facts[(subject, rel.name)]
    # Mostly the canonical phrasing (what the MC items probe), sometimes a variant for variety.
    template = rel.canonical if rng.random() < 0.6 else rng.choice(rel.variants)
    return _fill(template, subject, v)


# ---------------------------------------------------------------------------------------------------
# Documents.


@dataclass
class CorpusTruth:
    """What was planted: duplicate id -> original id, low-quality id -> kind, near-dup Jaccards."""

    seed: int
    n_docs: int
    exact_duplicates: dict[str, str] = field(default_factory=dict)
    near_duplicates: dict[str, str] = field(default_factory=dict)
    near_jaccard: dict[str, float] = field(default_factory=dict)  # word-5-gram Jaccard to the original
    low_quality: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> dict:
        return {
            "seed": self.seed,
            "n_docs": self.n_docs,
            "exact_duplicates": self.exact_duplicates,
            "near_duplicates": self.near_duplicates,
            "near_jaccard": self.near_jaccard,
            "low_quality": self.low_quality,
        }

    @classmethod
    def load(cls, path: Path) -> CorpusTruth:
        try:
            data = json.loads(Path(path).read_text())
            return cls(**data)
        except (OSError, ValueError, TypeError) as e:
            raise InputError(f"cannot read synthetic corpus truth {path}: {e}") from e

    def has_planted_duplicate(self) -> set[str]:
        """Ids that are a planted duplicate or the original of one."""
        dups = {**self.exact_duplicates, **self.near_duplicates}
        return set(dups) | set(dups.values())


LOW_QUALITY_KINDS = (
    "boilerplate",
    "repeated_lines",
    "symbol_soup",
    "too_short",
    "non_alphabetic",
    "lorem",
    "word_list",
)

_WORD_RE = re.compile(r"\w+")


def _shingles(text: str, n: int = 5) -> set[tuple[str, ...]]:
    words = _WORD_RE.findall(text.lower())
    return {tuple(words[i : i + n]) for i in range(max(len(words) - n + 1, 1))}


def word_ngram_jaccard(a: str, b: str, n: int = 5) -> float:
    """Jaccard similarity of the word-n-gram sets of two texts (lowercased, punctuation dropped)."""
    sa, sb = _shingles(a, n), _shingles(b, n)
    return len(sa & sb) / max(len(sa | sb), 1)


class _Generator:
    def __init__(self, seed: int, exact_dup_rate: float, near_dup_rate: float, low_quality_rate: float):
        if not (exact_dup_rate >= 0 and near_dup_rate >= 0 and low_quality_rate >= 0):
            raise InputError("synthetic corpus rates must be >= 0")
        if exact_dup_rate + near_dup_rate + low_quality_rate > 0.9:
            raise InputError(
                "synthetic corpus: duplicate and low-quality rates add up to more than 0.9",
                hint="lower exact_dup_rate, near_dup_rate or low_quality_rate",
            )
        self.seed = seed
        self.world = World.build(seed)
        self.rng = random.Random(f"docs-{seed}")
        self.rates = (exact_dup_rate, near_dup_rate, low_quality_rate)
        self.recent: list[tuple[str, str]] = []  # (id, text) of recent clean docs, originals for dups
        kinds = list(self.world.entities)
        self.kinds = kinds
        self.kind_weights = [4.0, 3.0, 3.0, 1.5]  # realm, person, creature, artifact

    # -- clean prose --------------------------------------------------------------------------------
    def _pick(self, kind: str) -> str:
        return self.rng.choices(self.world.entities[kind], weights=self.world.weights[kind])[0]

    def _filler(self) -> str:
        r = self.rng
        template = r.choice(_FILLER)
        slots = {
            "A": lambda: r.choice(_ADJ),
            "N": lambda: r.choice(_NOUN),
            "P": lambda: r.choice(_PLACE),
            "V": lambda: r.choice(_VERB),
            "D": lambda: r.choice(_ADV),
            "T": lambda: r.choice(_TIME),
            "F": lambda: r.choice(_FEEL),
            "W": lambda: r.choice(_WEATHER),
            "K": lambda: r.choice(_NUMBER),
            "X": lambda: self._pick("person"),
            "R": lambda: self._pick("realm"),
            "C": lambda: self._pick("creature"),
            "O": lambda: self._pick("artifact"),
        }
        out = re.sub(r"\{(\w)\}", lambda m: slots[m.group(1)](), template)
        return out[0].upper() + out[1:]

    def _clean(self) -> tuple[str, str]:
        r = self.rng
        kind = r.choices(self.kinds, weights=self.kind_weights)[0]
        topic = self._pick(kind)
        topic_facts = [_fact_sentence(self.world, r, topic, rel) for rel in self.world.relations_of(kind)]
        title = re.sub(
            r"\{(\w)\}",
            lambda m: {
                "R": topic if kind == "realm" else self._pick("realm"),
                "X": topic if kind == "person" else self._pick("person"),
                "C": topic if kind == "creature" else self._pick("creature"),
                "O": topic if kind == "artifact" else self._pick("artifact"),
                "A": r.choice(_ADJ),
                "N": r.choice(_NOUN),
                "P": r.choice(_PLACE),
            }[m.group(1)],
            r.choice(_TITLES),
        )
        target = int(r.triangular(500, 3000, 2500))  # mean ~2 KB
        paragraphs: list[str] = []
        size = len(title)
        first = True
        while size < target:
            sents: list[str] = []
            n = r.randint(3, 7)
            for _ in range(n):
                u = r.random()
                if first or u < 0.15:
                    # The topic's facts open the document and come back now and then.
                    sents.append(r.choice(topic_facts))
                    first = False
                elif u < 0.3:
                    other_kind = r.choices(self.kinds, weights=self.kind_weights)[0]
                    other = self._pick(other_kind)
                    rel = r.choice(self.world.relations_of(other_kind))
                    sents.append(_fact_sentence(self.world, r, other, rel))
                else:
                    sents.append(self._filler())
            para = " ".join(sents)
            paragraphs.append(para)
            size += len(para) + 2
        return title + "\n\n" + "\n\n".join(paragraphs), topic

    # -- planted duplicates -------------------------------------------------------------------------
    def _exact_copy(self, text: str) -> str:
        r = self.rng
        u = r.random()
        if u < 0.7:
            return text
        if u < 0.85:
            return text + "\n"
        return text.replace(". ", ".  ", 3)  # whitespace-only change: still an exact dup after normalisation

    def _near_copy(self, text: str) -> tuple[str, float]:
        r = self.rng
        for attempt in range(4):
            words = text.split(" ")
            edit_frac = r.uniform(0.005, 0.012) / (attempt + 1)
            n_edits = max(1, round(len(words) * edit_frac))
            for _ in range(n_edits):
                i = r.randrange(len(words))
                op = r.random()
                if op < 0.5:
                    words[i] = r.choice(_ADJ + _NOUN)
                elif op < 0.75:
                    words.insert(i, r.choice(_ADJ + _ADV))
                elif len(words) > 10:
                    del words[i]
            out = " ".join(words)
            if r.random() < 0.5:
                out = out.replace(",", "", 1).replace(". ", "! ", 1)
            if r.random() < 0.3 and len(out) > 1500:
                out += "\n\n" + r.choice(
                    ["Share this story.", "Thanks for reading.", "Posted in Travel.", "Read more."]
                )
            jac = word_ngram_jaccard(text, out)
            if jac >= 0.85:
                break
        return out, round(jac, 4)

    # -- planted low quality ------------------------------------------------------------------------
    def _low_quality(self, kind: str) -> str:
        r = self.rng
        if kind == "boilerplate":
            site = "".join(r.choice(_SYLLABLES) for _ in range(2)).capitalize() + r.choice(
                [" News", " Shop", " Blog", " Online", " Daily"]
            )
            nav = " | ".join(
                r.sample(
                    _words(
                        "Home|About|Contact|Blog|Shop|Login|Sign up|FAQ|Careers|Press|Help|Terms|Privacy|Sitemap|Cart|Deals|Events|Support|Store|Gallery|Archive|Forum|Jobs|Partners",
                        sep="|",
                    ),
                    r.randint(6, 12),
                )
            )
            lines = [site, nav]
            banners = _words(
                "We use cookies to improve your experience.|By continuing to browse you agree to our use of cookies.|Accept all cookies|Manage preferences|Reject non-essential cookies|Subscribe to our newsletter for the latest updates.|All rights reserved.|Click here to learn more.|This site uses cookies for analytics and personalised content.|Your privacy matters to us.|Follow us on social media.|Back to top|Skip to main content|Read our cookie policy|Update your browser for the best experience.",
                sep="|",
            )
            lines += r.sample(banners, r.randint(5, 10))
            lines.append(
                f"Copyright {r.randint(1998, 2024)} {site}. {nav.split(' | ')[0]} | {r.choice(banners)}"
            )
            r.shuffle(lines)
            return "\n".join(lines)
        if kind == "repeated_lines":
            line = self._filler() + " " + self._filler()
            return "\n".join([line] * r.randint(15, 40))
        if kind == "symbol_soup":
            return "".join(r.choice("#$%&*+=<>~^|/\\@!?{}[]()_-:;") for _ in range(r.randint(300, 1500)))
        if kind == "too_short":
            words = r.sample(_ADJ + _NOUN + _VERB + _ADV, r.randint(3, 8))
            return " ".join(words).capitalize() + r.choice([".", "!", "?", "..."])
        if kind == "non_alphabetic":
            toks = []
            for _ in range(r.randint(150, 400)):
                u = r.random()
                if u < 0.4:
                    toks.append(f"{r.getrandbits(24):06x}")
                elif u < 0.7:
                    toks.append(f"{r.randint(0, 99999)}.{r.randint(0, 99)}")
                elif u < 0.85:
                    toks.append(r.choice("|-+=*/#%"))
                else:
                    toks.append(r.choice(_NOUN))
            return " ".join(toks)
        if kind == "lorem":
            lorem = _words(
                "lorem ipsum dolor sit amet consectetur adipiscing elit sed do eiusmod tempor incididunt ut "
                "labore et dolore magna aliqua enim ad minim veniam quis nostrud exercitation ullamco laboris "
                "nisi aliquip ex ea commodo consequat duis aute irure in reprehenderit voluptate velit esse "
                "cillum fugiat nulla pariatur excepteur sint occaecat cupidatat non proident sunt culpa qui "
                "officia deserunt mollit anim id est laborum"
            )
            sents = []
            for _ in range(r.randint(8, 30)):
                s = " ".join(r.choice(lorem) for _ in range(r.randint(6, 16)))
                sents.append(s.capitalize() + ".")
            return " ".join(sents)
        if kind == "word_list":
            pool = [w for w in _ADJ + _NOUN + _VERB + _ADV if w not in _STOP]
            return "\n".join(" ".join(r.sample(pool, r.randint(4, 10))) for _ in range(r.randint(10, 40)))
        raise AssertionError(f"unknown low-quality kind {kind!r}")

    # -- the stream ---------------------------------------------------------------------------------
    def documents(self, n_docs: int, truth: CorpusTruth) -> Iterator[dict]:
        r = self.rng
        exact_rate, near_rate, lq_rate = self.rates
        for i in range(n_docs):
            doc_id = f"syn-{self.seed}-{i:07d}"
            u = r.random()
            meta: dict = {"source": "synthetic"}
            if u < exact_rate and self.recent:
                orig_id, orig = r.choice(self.recent)
                text = self._exact_copy(orig)
                truth.exact_duplicates[doc_id] = orig_id
            elif u < exact_rate + near_rate and self.recent:
                orig_id, orig = r.choice(self.recent)
                text, jac = self._near_copy(orig)
                truth.near_duplicates[doc_id] = orig_id
                truth.near_jaccard[doc_id] = jac
            elif u < exact_rate + near_rate + lq_rate:
                kind = r.choice(LOW_QUALITY_KINDS)
                text = self._low_quality(kind)
                truth.low_quality[doc_id] = kind
            else:
                text, topic = self._clean()
                meta["topic"] = topic
                self.recent.append((doc_id, text))
                if len(self.recent) > 2000:  # bounded memory: originals come from the recent past
                    self.recent.pop(r.randrange(len(self.recent)))
            yield {"id": doc_id, "text": text, "metadata": meta}


def iter_documents(
    n_docs: int,
    seed: int = 0,
    *,
    exact_dup_rate: float = 0.03,
    near_dup_rate: float = 0.05,
    low_quality_rate: float = 0.08,
    truth: CorpusTruth | None = None,
) -> Iterator[dict]:
    """Stream `n_docs` documents `{"id", "text", "metadata"}`; fills `truth` (if given) as it goes."""
    if n_docs < 0:
        raise InputError(f"n_docs must be >= 0, got {n_docs}")
    gen = _Generator(seed, exact_dup_rate, near_dup_rate, low_quality_rate)
    yield from gen.documents(n_docs, truth if truth is not None else CorpusTruth(seed, n_docs))


def generate_corpus(
    out_dir: Path,
    n_docs: int,
    seed: int = 0,
    *,
    exact_dup_rate: float = 0.03,
    near_dup_rate: float = 0.05,
    low_quality_rate: float = 0.08,
) -> CorpusTruth:
    """Write `out_dir/docs.jsonl` and `out_dir/truth.json`; return the truth. Same seed, same bytes."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    truth = CorpusTruth(seed=seed, n_docs=n_docs)
    docs = iter_documents(
        n_docs,
        seed,
        exact_dup_rate=exact_dup_rate,
        near_dup_rate=near_dup_rate,
        low_quality_rate=low_quality_rate,
        truth=truth,
    )
    with open(out_dir / "docs.jsonl", "w", encoding="utf-8") as f:
        for doc in docs:
            f.write(json.dumps(doc, ensure_ascii=False) + "\n")
    (out_dir / "truth.json").write_text(json.dumps(truth.to_json(), indent=1, sort_keys=True) + "\n")
    return truth


def world_multiple_choice(seed: int = 0, n_items: int = 100, n_choices: int = 4) -> list[dict]:
    """Multiple-choice items about the world of `seed`: `{"query", "choices", "gold", "relation"}`.

    The query is the canonical phrasing up to the answer ("The capital of Velmora is"); the choices are
    the same attribute of other entities (" Ostrin", " Barrow", ...), each with a leading space, scored
    as continuations. Items favour popular entities, whose facts the corpus states most often; the
    corpus never contains an item (a query with its choices) as text, only the facts. Chance is
    1/n_choices.
    """
    world = World.build(seed)
    rng = random.Random(f"mc-{seed}")
    candidates: list[tuple[float, str, Relation]] = []
    for rel in _RELATIONS:
        names = world.entities[rel.subject]
        for s, w in zip(names, world.weights[rel.subject], strict=True):
            if len(set(world.pools[rel.value]) - {world.facts[(s, rel.name)]}) >= n_choices - 1:
                candidates.append((w, s, rel))
    if n_items > len(candidates):
        raise InputError(
            f"the synthetic world has {len(candidates)} facts, fewer than the {n_items} items asked for",
            hint=f"ask for at most {len(candidates)} items",
        )
    # Most popular facts first; ties broken by a seeded shuffle so relations interleave.
    rng.shuffle(candidates)
    candidates.sort(key=lambda c: -c[0])
    items = []
    for _, s, rel in candidates[:n_items]:
        gold_value = world.facts[(s, rel.name)]
        others = sorted(set(world.pools[rel.value]) - {gold_value})
        choices = [*rng.sample(others, n_choices - 1), gold_value]
        rng.shuffle(choices)
        query = _fill(rel.canonical, s, "\x00").split(" \x00")[0]
        items.append(
            {
                "query": query,
                "choices": [" " + c for c in choices],
                "gold": choices.index(gold_value),
                "relation": rel.name,
            }
        )
    return items
