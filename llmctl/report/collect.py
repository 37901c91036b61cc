"""Gather what a model card says about an artifact, from the manifests along its lineage.

    summary = collect(workspace, workspace.resolve("grpo:latest"))
    summary.training[0].curves["loss"]     # [(step, value), ...] from pretrain's metrics.jsonl
    summary.missing                        # ancestors no longer in the workspace (the card says so)

Only manifests and the small files stages write beside them are read (metrics.jsonl, results.json,
config.json): nothing heavy is imported, no weights are loaded. The lineage is the tree of inputs
down to the raw sources; the "model chain" is the subject and every model among its ancestors, and
eval and quantize artifacts are found by looking for those whose `model` input is in that chain
(they are descendants, not ancestors, of the model they score).
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from llmctl import __version__
from llmctl.train.metrics import read_metrics
from llmctl.workspace.integrity import records_content_sha256
from llmctl.workspace.store import Artifact, Workspace

# Series read from a training stage's metrics.jsonl, in plotting order (grpo: the reward too).
CURVE_KEYS = ("loss", "val_loss", "reward", "val_reward")
# What each stage's table shows from its manifest metrics, in order (absent keys are left out).
COMMON_METRICS = ("steps", "tokens", "train_loss", "val_loss", "train_seconds")
STAGE_METRICS = {
    "pretrain": ("val_bpb", "lr", "mfu"),
    "sft": ("conversations", "epochs", "packing_efficiency", "lr"),
    "dpo": (
        "loss_type",
        "beta",
        "pairs",
        "val_rewards/accuracies",
        "val_rewards/margins",
        "lr",
    ),
    "grpo": (
        "loss_type",
        "num_generations",
        "prompts",
        "train_reward",
        "start_val_reward",
        "val_reward",
        "val_reward_gain",
        "val_reward_gain_stderr",
        "lr",
    ),
}
_TOP_LEVEL_SCORE = re.compile(r"^[^/]+/[^/]+$")  # task/metric; task/group/metric is a sub-score


@dataclass(frozen=True)
class LineageNode:
    """One artifact of the lineage; `depth` 0 is the subject. Hashes are those its consumer recorded
    (the subject's: its own manifest's and files')."""

    id: str
    kind: str
    depth: int
    slot: str | None
    consumer: str | None
    status: str  # ok | missing | changed (its manifest differs from what the consumer recorded) | copy
    manifest_sha256: str | None
    content_sha256: str | None
    created: str | None = None
    copy_of: str | None = None


@dataclass(frozen=True)
class Removal:
    stage: str
    reason: str
    documents: int


@dataclass(frozen=True)
class DataFunnel:
    """Documents through dedup and filter, into tokens. Counts are None where a stage is not in the
    lineage."""

    documents_in: int | None
    after_dedup: int | None
    after_filter: int | None
    removals: list[Removal]
    tokenized_documents: int | None
    tokens: int | None
    val_tokens: int | None
    sources: list[str]
    artifacts: list[str]


@dataclass(frozen=True)
class TokenizerInfo:
    artifact: str | None
    vocab_size: int | None
    bytes_per_token: float | None
    trained: bool | None
    encoder: str | None
    tokenizer_id: str | None


@dataclass(frozen=True)
class ModelShape:
    artifact: str
    architecture: str | None
    params: int | None
    n_layer: int | None
    n_head: int | None
    n_kv_head: int | None
    n_embd: int | None
    intermediate_size: int | None
    vocab_size: int | None
    max_seq_len: int | None
    tie_word_embeddings: bool | None


@dataclass(frozen=True)
class TrainingRun:
    """One training stage of the chain (pretrain, sft, dpo, grpo, ...), oldest first."""

    artifact: str
    stage: str
    steps: int | None
    tokens: int | None
    train_seconds: float | None
    stage_seconds: float | None  # wall time of the whole stage (setup, eval, saving)
    hardware: str
    train_loss: float | None
    val_loss: float | None
    metrics: dict[str, Any]  # the stage's key metrics (STAGE_METRICS), as recorded
    curves: dict[str, list[tuple[int, float]]]


@dataclass(frozen=True)
class EvalScore:
    task: str
    metric: str
    value: float | None
    stderr: float | None
    n: int | None


@dataclass(frozen=True)
class EvalRun:
    artifact: str
    model: str
    created: str
    limit: int | None
    scores: list[EvalScore]


@dataclass(frozen=True)
class QuantDelta:
    score: str
    source: float | None
    quantized: float | None
    delta: float | None


@dataclass(frozen=True)
class QuantizeRun:
    artifact: str
    model: str
    method: str | None
    bytes_source: float | None
    bytes_quantized: float | None
    ppl_increase_pct: float | None
    deltas: list[QuantDelta]


@dataclass(frozen=True)
class Missing:
    id: str
    consumer: str
    slot: str


@dataclass(frozen=True)
class Summary:
    """Everything the card and the page show; `to_dict()` is what `llmctl report --json` prints."""

    subject: str
    kind: str
    stage: str
    project: str | None
    created: str
    llmctl_version: str  # of the code that made the subject
    report_llmctl_version: str
    environment: dict[str, Any]
    code: dict[str, str]
    lineage: list[LineageNode]
    missing: list[Missing]
    funnel: DataFunnel | None
    tokenizer: TokenizerInfo | None
    model: ModelShape | None
    training: list[TrainingRun]
    evals: list[EvalRun]
    quantize: list[QuantizeRun]
    base_model: str | None  # a hub id when the chain starts from `llmctl import org/name`
    imported_from: str | None  # what `llmctl import` read, when the chain starts from it
    datasets: list[str] = field(default_factory=list)

    @property
    def pretraining(self) -> list[TrainingRun]:
        return [t for t in self.training if t.stage == "pretrain"]

    @property
    def post_training(self) -> list[TrainingRun]:
        return [t for t in self.training if t.stage != "pretrain"]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def collect(workspace: Workspace, subject: Artifact) -> Summary:
    """The summary of `subject` from its lineage in `workspace`."""
    by_id = {a.id: a for a in workspace.artifacts()}
    by_id.setdefault(subject.id, subject)
    lineage, missing = _walk(subject, by_id)
    present = [by_id[n.id] for n in lineage if n.status in ("ok", "changed") and n.id in by_id]
    chain = [a for a in reversed(present) if a.kind == "model"]  # oldest first
    first = {}
    for a in reversed(present):  # the nearest artifact of each stage wins
        first[a.stage] = a
    m = subject.manifest
    return Summary(
        subject=subject.id,
        kind=subject.kind,
        stage=subject.stage,
        project=m.project,
        created=m.finished_at,
        llmctl_version=m.llmctl_version,
        report_llmctl_version=__version__,
        environment=dict(m.environment),
        code=dict(m.code),
        lineage=lineage,
        missing=missing,
        funnel=_funnel(first),
        tokenizer=_tokenizer(first.get("tokenize")),
        model=_model_shape(chain),
        training=[
            _training(a) for a in chain if (a.path / "metrics.jsonl").is_file() and a.stage != "quantize"
        ],
        evals=_evals(by_id.values(), [a.id for a in chain if a.id != subject.id] + [subject.id]),
        quantize=_quantize(by_id.values(), subject),
        base_model=_base_model(chain),
        imported_from=next(
            (
                f"{a.manifest.metrics.get('source')} ({a.manifest.metrics.get('kind')})"
                for a in chain
                if a.stage == "import"
            ),
            None,
        ),
        datasets=_datasets(present),
    )


def _walk(subject: Artifact, by_id: dict[str, Artifact]) -> tuple[list[LineageNode], list[Missing]]:
    """Depth-first over inputs; each artifact listed once (the first path that reaches it)."""
    nodes = [
        LineageNode(
            id=subject.id,
            kind=subject.kind,
            depth=0,
            slot=None,
            consumer=None,
            status="ok",
            manifest_sha256=subject.manifest_sha256(),
            content_sha256=records_content_sha256(subject.manifest.files),
            created=subject.manifest.finished_at,
        )
    ]
    missing: list[Missing] = []
    seen = {subject.id}

    def visit(artifact: Artifact, depth: int) -> None:
        for record in artifact.manifest.inputs:
            if record.id in seen:
                continue
            seen.add(record.id)
            parent = by_id.get(record.id) if record.copy_of is None else None
            if record.copy_of is not None:
                status = "copy"
            elif parent is None:
                status = "missing"
                missing.append(Missing(record.id, artifact.id, record.slot))
            elif parent.manifest_sha256() != record.manifest_sha256:
                status = "changed"
            else:
                status = "ok"
            nodes.append(
                LineageNode(
                    id=record.id,
                    kind=record.kind,
                    depth=depth,
                    slot=record.slot,
                    consumer=artifact.id,
                    status=status,
                    manifest_sha256=record.manifest_sha256,
                    content_sha256=record.content_sha256,
                    created=parent.manifest.finished_at if parent is not None else None,
                    copy_of=record.copy_of,
                )
            )
            if parent is not None:
                visit(parent, depth + 1)

    visit(subject, 1)
    return nodes, missing


def _funnel(first: dict[str, Artifact]) -> DataFunnel | None:
    dedup, filt, tok = first.get("dedup"), first.get("filter"), first.get("tokenize")
    if dedup is None and filt is None and tok is None:
        return None
    removals: list[Removal] = []
    documents_in = after_dedup = after_filter = None
    sources: list[str] = []
    if dedup is not None:
        d = dedup.manifest.metrics
        documents_in, after_dedup = d.get("documents_in"), d.get("documents_out")
        for reason in ("exact_duplicates", "near_duplicates"):
            if d.get(reason):
                removals.append(Removal("dedup", reason.replace("_", " "), int(d[reason])))
        sources = [_source_name(s) for s in dedup.manifest.sources]
    if filt is not None:
        f = filt.manifest.metrics
        if documents_in is None:
            documents_in = f.get("documents_in")
        after_filter = f.get("documents_out")
        for step in f.get("steps", []):
            for reason, count in step.get("dropped", {}).items():
                removals.append(Removal("filter", f"{step.get('name')}: {reason}", int(count)))
    tokens = val_tokens = tokenized = None
    if tok is not None:
        t = tok.manifest.metrics
        train, val = t.get("train") or {}, t.get("val") or {}
        tokens, val_tokens = train.get("tokens"), val.get("tokens")
        if train.get("documents") is not None:
            tokenized = train["documents"] + (val.get("documents") or 0)
    return DataFunnel(
        documents_in=documents_in,
        after_dedup=after_dedup,
        after_filter=after_filter,
        removals=removals,
        tokenized_documents=tokenized,
        tokens=tokens,
        val_tokens=val_tokens,
        sources=sources,
        artifacts=[a.id for a in (dedup, filt, tok) if a is not None],
    )


def _source_name(source: dict[str, Any]) -> str:
    path = str(source.get("path") or source.get("repo") or "")
    return path.removeprefix("hf://datasets/") if path.startswith("hf://") else path


def _tokenizer(tok: Artifact | None) -> TokenizerInfo | None:
    if tok is None:
        return None
    t = tok.manifest.metrics
    return TokenizerInfo(
        artifact=tok.id,
        vocab_size=t.get("vocab_size"),
        bytes_per_token=(t.get("train") or {}).get("bytes_per_token"),
        trained=t.get("trained"),
        encoder=t.get("encoder"),
        tokenizer_id=t.get("tokenizer_id"),
    )


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _model_shape(chain: list[Artifact]) -> ModelShape | None:
    """The newest model of the chain with a config.json (HF Llama names)."""
    for artifact in reversed(chain):
        cfg = _read_json(artifact.path / "config.json")
        if cfg is None:
            continue
        params = next(
            (a.manifest.metrics["params"] for a in reversed(chain) if "params" in a.manifest.metrics), None
        )
        return ModelShape(
            artifact=artifact.id,
            architecture=(cfg.get("architectures") or [cfg.get("model_type")])[0],
            params=params,
            n_layer=cfg.get("num_hidden_layers"),
            n_head=cfg.get("num_attention_heads"),
            n_kv_head=cfg.get("num_key_value_heads"),
            n_embd=cfg.get("hidden_size"),
            intermediate_size=cfg.get("intermediate_size"),
            vocab_size=cfg.get("vocab_size"),
            max_seq_len=cfg.get("max_position_embeddings"),
            tie_word_embeddings=cfg.get("tie_word_embeddings"),
        )
    return None


def read_curves(path: Path) -> dict[str, list[tuple[int, float]]]:
    """(step, value) series of CURVE_KEYS from a metrics.jsonl."""
    curves: dict[str, list[tuple[int, float]]] = {}
    for row in read_metrics(path):
        if not isinstance(row, dict) or not isinstance(row.get("step"), int):
            continue
        for key in CURVE_KEYS:
            value = row.get(key)
            if isinstance(value, (int, float)):
                curves.setdefault(key, []).append((row["step"], float(value)))
    return curves


def _training(artifact: Artifact) -> TrainingRun:
    m = artifact.manifest.metrics
    env = artifact.manifest.environment
    device = env.get("gpu") or m.get("device_name") or env.get("device") or "unknown"
    world = m.get("world_size")
    hardware = f"{device}" + (f" x{world} processes" if isinstance(world, int) and world > 1 else "")
    keys = (*COMMON_METRICS, *STAGE_METRICS.get(artifact.stage, ()))
    return TrainingRun(
        artifact=artifact.id,
        stage=artifact.stage,
        steps=m.get("steps"),
        tokens=m.get("tokens"),
        train_seconds=m.get("train_seconds"),
        stage_seconds=m.get("stage_seconds"),
        hardware=hardware,
        train_loss=m.get("train_loss"),
        val_loss=m.get("val_loss"),
        metrics={k: m[k] for k in keys if k in m},
        curves=read_curves(artifact.path / "metrics.jsonl"),
    )


def _model_input(artifact: Artifact) -> str | None:
    return next((i.id for i in artifact.manifest.inputs if i.slot == "model"), None)


def _evals(artifacts: Any, models: list[str]) -> list[EvalRun]:
    """Evals of `models` (oldest model first), in the order of their models, then of time."""
    order = {model: i for i, model in enumerate(models)}
    found = [a for a in artifacts if a.kind == "eval" and _model_input(a) in order]
    runs = []
    for a in sorted(found, key=lambda a: (order[_model_input(a)], a.manifest.finished_at, a.id)):
        model = _model_input(a)
        results = _read_json(a.path / "results.json") or {}
        scores = []
        for task, entry in (results.get("tasks") or {}).items():
            stderr = entry.get("stderr") or {}
            for metric, value in (entry.get("metrics") or {}).items():
                scores.append(EvalScore(task, metric, value, stderr.get(metric), entry.get("n")))
        runs.append(
            EvalRun(
                artifact=a.id,
                model=model,
                created=a.manifest.finished_at,
                limit=(results.get("settings") or {}).get("limit"),
                scores=scores,
            )
        )
    return runs


def _quantize(artifacts: Any, subject: Artifact) -> list[QuantizeRun]:
    """The subject when it is a quantized model, else quantized copies of the subject."""
    if subject.stage == "quantize":
        found = [subject]
    else:
        found = [a for a in artifacts if a.stage == "quantize" and _model_input(a) == subject.id]
    runs = []
    for a in sorted(found, key=lambda a: a.id):
        m = a.manifest.metrics
        deltas = [
            QuantDelta(key, m.get(f"source/{key}"), m.get(f"quantized/{key}"), m.get(f"delta/{key}"))
            for key in (k.removeprefix("delta/") for k in m if k.startswith("delta/"))
            if _TOP_LEVEL_SCORE.match(key)
        ]
        runs.append(
            QuantizeRun(
                artifact=a.id,
                model=_model_input(a) or "?",
                method=m.get("method"),
                bytes_source=m.get("bytes_on_disk/source"),
                bytes_quantized=m.get("bytes_on_disk/quantized"),
                ppl_increase_pct=m.get("ppl_increase_pct"),
                deltas=deltas,
            )
        )
    return runs


def _base_model(chain: list[Artifact]) -> str | None:
    """The hub id the chain starts from (`llmctl import org/name`), the only base a hub card can name."""
    for artifact in chain:
        m = artifact.manifest.metrics
        if artifact.stage == "import" and m.get("kind") == "hub" and m.get("source"):
            return str(m["source"])
    return None


def _datasets(present: list[Artifact]) -> list[str]:
    """The data the lineage trained on (the hub's `datasets:`), without files named as validation data."""
    names: list[str] = []
    for artifact in reversed(present):
        held_out = _validation_sources(artifact)
        for source in artifact.manifest.sources:
            name = _source_name(source)
            if name and name not in names and name not in held_out:
                names.append(name)
    return names


def _validation_sources(artifact: Artifact) -> set[str]:
    """What a stage's config names as validation data (`<stage>.data.val_sources`): scored, not trained on."""
    held_out: set[str] = set()
    for section in artifact.manifest.config.values():
        data = section.get("data") if isinstance(section, dict) else None
        if isinstance(data, dict):
            held_out |= {_source_name(s) for s in data.get("val_sources") or [] if isinstance(s, dict)}
    return held_out
