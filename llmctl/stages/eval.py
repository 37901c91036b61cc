"""The eval stage: score a model artifact on benchmark, custom and synthetic tasks.

Inputs: `model` (any model artifact; its folder is an HF-Llama model with its tokenizer) and,
optionally, `data` (a tokens artifact whose val split perplexity is measured on). Options from the
command line (`ctx.options`: tasks, limit, shots, batch_size, batch_tokens, data_dir, seed,
log_samples, base) override the `eval:` section. Output: results.json and samples/<task>.jsonl (see
llmctl.evals.evaluate); returns the flattened scores ("task/metric") for the manifest.

Chat tasks also score the model's base model, found in the model's manifest: its `model` input (what
sft records as its starting point). It is not an input of eval: the model artifact pins it already.

With `decontaminate` (eval.decontaminate, `--decontaminate`), items are checked against the model's
training documents, found through lineage (`training_documents`): walking the model's inputs back
(sft/dpo/grpo -> the model they started from -> pretrain -> its tokens and init model), the first
corpus artifact on each path (filter's output when there is one: the text the tokens were made of),
plus the data files each post-training stage read (its manifest's config names them; files changed
since are reported and skipped). A corpus's index is cached inside it under DERIVED_DIR; a data
file's under the workspace's .cache/decontaminate/.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from llmctl.config.eval import EvalConfig
from llmctl.errors import LlmctlError
from llmctl.evals.data import DATA_SUFFIXES
from llmctl.evals.decontaminate import Corpus, Decontaminator
from llmctl.evals.evaluate import RESULTS_FILE, evaluate, flat_metrics
from llmctl.reporting import Reporter
from llmctl.stages.context import StageContext
from llmctl.stages.registry import STAGES
from llmctl.workspace.integrity import DERIVED_DIR, records_content_sha256
from llmctl.workspace.manifest import stable_hash
from llmctl.workspace.store import Artifact, Workspace, load_artifact


def run(ctx: StageContext) -> dict[str, Any]:
    model = ctx.inputs["model"]
    assert model is not None, "the runner resolves the model input"
    tokens = ctx.inputs.get("data")
    base = None
    if _wants_base(ctx.config, ctx.options):
        base = base_model_of(model, ctx.workspace, ctx.reporter)
    decontaminator = None
    if ctx.options.get("decontaminate", ctx.config.decontaminate):
        corpora = training_documents(model, ctx.workspace, ctx.project_dir, ctx.reporter)
        if corpora:
            decontaminator = Decontaminator(corpora, ctx.reporter)
        else:
            ctx.reporter.log(f"decontamination: {model.id}'s lineage has no training documents; not checked")
    results = evaluate_folder(
        model.path,
        ctx.config,
        ctx.options,
        tokens_path=tokens.path if tokens is not None else None,
        project_dir=ctx.project_dir,
        out_dir=ctx.output_dir,
        reporter=ctx.reporter,
        base=base,
        decontaminator=decontaminator,
    )
    results["model"] = ctx.input_ids.get("model", model.id)  # copy:<hash> for a copy given by path
    if tokens is not None:
        results["tasks"].get("perplexity", {})["source"] = ctx.input_ids.get("data", tokens.id)
    (ctx.output_dir / RESULTS_FILE).write_text(json.dumps(results, indent=2) + "\n")
    return flat_metrics(results)


def _wants_base(cfg: EvalConfig, opts: dict[str, Any]) -> bool:
    from llmctl.evals.tasks import TASKS

    tasks = list(opts.get("tasks") or cfg.tasks)
    chat = any(t in TASKS and TASKS[t].kind == "chat" for t in tasks) or any(
        c.type == "chat" and c.name in tasks for c in cfg.custom
    )
    return chat and bool(opts.get("base", cfg.base))


def base_model_of(model: Artifact, workspace: Workspace, reporter: Reporter) -> tuple[Path, str] | None:
    """(folder, id) of the model `model` was trained from (its manifest's `model` input), or None
    when it has none; a base that is gone or changed is reported and skipped, not an error."""
    record = next((i for i in model.manifest.inputs if i.slot == "model"), None)
    if record is None:
        return None
    if not workspace.is_member(model):
        # A copy from another workspace: its input ids name that workspace's artifacts, not ours.
        reporter.log(f"base model {record.id}: {model.path} is not in this workspace; scoring without it")
        return None
    if record.path is not None:  # the base was given by path
        folder = Path(record.path)
        if (folder / "config.json").is_file():
            return folder, record.id
        reporter.log(f"base model {record.id}: {folder} is gone; scoring without it")
        return None
    try:
        base = workspace.resolve(record.id, kinds=("model",))
    except LlmctlError as e:
        reporter.log(f"base model {record.id}: {e}; scoring without it")
        return None
    if base.manifest_sha256() != record.manifest_sha256:
        reporter.log(
            f"base model {record.id}: not the artifact {model.id} was trained from; scoring without it"
        )
        return None
    return base.path, base.id


def evaluate_folder(
    model_path: Path,
    cfg: EvalConfig,
    opts: dict[str, Any],
    *,
    tokens_path: Path | None = None,
    project_dir: Path | None = None,
    out_dir: Path | None = None,
    reporter: Reporter | None = None,
    base: tuple[Path, str] | None = None,
    decontaminator: Decontaminator | None = None,
) -> dict[str, Any]:
    """Evaluate a model folder with the `eval:` section overridden by command-line options; used by
    the stage and, for a plain HF folder that is no artifact, directly by the CLI. `base` (folder, id)
    is scored beside it on chat tasks."""
    data_dir = opts.get("data_dir") or cfg.data_dir
    data_dir = Path(data_dir) if data_dir else None
    if data_dir is not None and not data_dir.is_absolute() and project_dir is not None:
        data_dir = project_dir / data_dir
    perplexity_data = tokens_path
    # `--data-dir notes.txt`: perplexity on a text file; a .jsonl/.parquet/... file is task data.
    text_file = data_dir is not None and data_dir.is_file() and data_dir.suffix.lower() not in DATA_SUFFIXES
    if perplexity_data is None and text_file:
        perplexity_data = data_dir
    tasks = list(opts.get("tasks") or cfg.tasks)
    shots = dict(cfg.shots)
    if opts.get("shots") is not None:  # --shots K applies to every task run now
        shots.update({t: int(opts["shots"]) for t in tasks})
    return evaluate(
        model_path,
        tasks,
        limit=opts.get("limit") or cfg.limit,
        shots=shots,
        batch_size=opts.get("batch_size") or cfg.batch_size,
        batch_tokens=opts.get("batch_tokens") or cfg.batch_tokens,
        data_dir=None if text_file else data_dir,
        custom=[c.model_dump() for c in cfg.custom],
        samples_to_keep=None if opts.get("log_samples") or cfg.log_samples else cfg.samples_to_keep,
        seed=opts.get("seed") if opts.get("seed") is not None else cfg.seed,
        max_gen_tokens=cfg.max_gen_tokens,
        chat_max_gen_tokens=cfg.chat_max_gen_tokens,
        base=base[0] if base is not None else None,
        base_name=base[1] if base is not None else None,
        perplexity_data=perplexity_data,
        project_dir=project_dir,
        world_seed=cfg.world_seed,
        world_items=cfg.world_items,
        out_dir=out_dir,
        reporter=reporter,
        decontaminator=decontaminator,
    )


# ---- decontamination: the model's training documents, through lineage ----------------------------


def training_documents(
    model: Artifact, workspace: Workspace, project_dir: Path, reporter: Reporter
) -> list[Corpus]:
    """The documents `model` was trained on (see the module docstring), deepest first; what cannot
    be found (an input gone or changed, raw sources read without a corpus artifact) is reported."""
    found: list[Corpus] = []
    seen: set[str] = set()

    def parent(record) -> Artifact | None:
        try:
            if record.path is not None:
                return load_artifact(Path(record.path))
            a = workspace.resolve(record.id)
        except LlmctlError as e:
            reporter.log(f"decontamination: {record.id}: {e}; its documents are not checked")
            return None
        if a.manifest_sha256() != record.manifest_sha256:
            reporter.log(f"decontamination: {record.id} is not the artifact that was used; not checked")
            return None
        return a

    def walk(a: Artifact) -> None:
        if a.id in seen:
            return
        seen.add(a.id)
        if not workspace.is_member(a):
            reporter.log(f"decontamination: {a.path} is not in this workspace; its lineage is not followed")
            return
        if a.kind == "tokens" and not any(i.kind == "corpus" for i in a.manifest.inputs):
            reporter.log(f"decontamination: {a.id} read raw data sources, not a corpus artifact; not checked")
        for record in a.manifest.inputs:
            if record.kind not in ("model", "tokens", "corpus") or (p := parent(record)) is None:
                continue
            if p.kind == "corpus":
                if p.id not in seen:
                    seen.add(p.id)
                    found.append(_corpus_of(p))
            else:
                walk(p)
        if a.stage in STAGES:
            records = _records_of(a, project_dir, workspace.root / ".cache" / "decontaminate", reporter)
            if records is not None:
                found.append(records)

    walk(model)
    return found


def _corpus_of(a: Artifact) -> Corpus:
    from llmctl.data.corpus import iter_corpus

    return Corpus(
        a.id,
        a.path / DERIVED_DIR / "decontaminate",
        records_content_sha256(a.manifest.files),
        lambda: (d.text for d in iter_corpus(a.path)),
    )


def _records_of(a: Artifact, project_dir: Path, cache_dir: Path, reporter: Reporter) -> Corpus | None:
    """The data files a post-training stage read (its section's data.sources; val_sources are held out
    and left out), one document per record; None when there are none or they changed since."""
    stage = STAGES[a.stage]
    section_model = stage.config_model()
    raw = a.manifest.config.get(a.stage)
    if section_model is None or raw is None:
        return None
    section = section_model.model_validate(raw)
    if getattr(section, "data", None) is None or stage.training_texts(section, project_dir) is None:
        return None
    if stage.source_fingerprint(section, project_dir) != a.manifest.sources:
        reporter.log(f"decontamination: {a.id}'s training data changed since it ran; not checked")
        return None
    return Corpus(
        f"{a.id} training data",
        cache_dir,
        stable_hash(a.manifest.sources),
        lambda: stage.training_texts(section, project_dir),
    )
