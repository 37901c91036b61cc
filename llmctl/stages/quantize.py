"""The quantize stage: int8/int4 weights by round-to-nearest or GPTQ, then the source and the quantized
model scored side by side, so a run says what quantizing cost.

Inputs: `model` (any model artifact that is not quantized already) and, optionally, `data` (a tokens
artifact: its val split for perplexity, its train split for GPTQ calibration). Steps:
  1. check: not quantized already, the group size divides every layer's width, enough calibration;
  2. quantize (llmctl.model.quantize) and save in compressed-tensors' pack-quantized format, with the
     source's tokenizer (format gguf: the GGUF file, beside its dequantized weights);
  3. score both models on `quantize.tasks` (llmctl.evals) and measure bytes on disk, memory while
     decoding and decode tokens/s at batch 1 and 8.
Metrics: `source/<task>/<metric>`, `quantized/...`, `delta/...`, `ppl_increase_pct`, and the size and
speed table (`<measure>/source`, `<measure>/quantized`, `<measure>/ratio`; with format gguf the bytes
on disk are the GGUF file's, speed and memory those of its dequantized weights). `gate_failures` turns them into the gates of
`--max-ppl-increase` and `--min` (exit 1, decided by the CLI after the artifact is published).
"""

from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from llmctl.config.quantize import QuantizeConfig
from llmctl.errors import InputError
from llmctl.evals.evaluate import check_thresholds, evaluate, flat_metrics
from llmctl.model import quantize as Q
from llmctl.model.checkpoint import (
    CONFIG_FILE,
    GENERATION_CONFIG_FILE,
    load_model_folder,
    read_json,
    read_model_config,
    save_model_folder,
)
from llmctl.reporting import Reporter
from llmctl.stages.context import StageContext
from llmctl.threads import apply_threads, choose_threads

RESULTS_FILE = "quantize.json"


def run(ctx: StageContext) -> dict[str, Any]:
    cfg: QuantizeConfig = ctx.config.model_copy(update=_overrides(ctx.options))
    source = ctx.inputs["model"]
    assert source is not None, "the runner resolves the model input"
    tokens = ctx.inputs.get("data")
    reporter = ctx.reporter
    apply_threads(choose_threads(cfg.threads))

    # 1. check the inputs before any work
    _, raw = read_model_config(source.path)
    if Q.is_quantized_config(raw):
        method = raw["quantization_config"].get("quant_method", "?")
        raise InputError(
            f"{source.id} is already quantized ({method}); quantizing it again would compound the error",
            hint="quantize the model it was made from (see `llmctl artifacts lineage " + source.id + "`)",
        )
    perplexity_data = _perplexity_data(cfg, tokens, ctx.project_dir)
    model, _ = load_model_folder(source.path, dtype=torch.float32)
    scheme = Q.QuantScheme(cfg.bits, None if cfg.bits == 8 else cfg.group_size, cfg.symmetric)
    names = Q.target_names(model.config.n_layer, cfg.quantize_lm_head)
    if cfg.format == "compressed-tensors" and (error := Q.check_width(model, names, scheme)):
        raise InputError(
            f"{error}", hint="choose a group size that divides it (quantize.group_size: 32 or 64)"
        )
    calibration = None
    if cfg.method == "gptq" and cfg.format == "compressed-tensors":
        calibration = calibration_ids(cfg, source.path, tokens.path if tokens else None, ctx.project_dir)

    # 2. quantize and save
    out = ctx.output_dir
    out.mkdir(parents=True, exist_ok=True)
    copy_tokenizer(source.path, out)
    errors: dict[str, float] = {}
    if cfg.format == "gguf":
        del model
        _export_gguf(source.path, out, cfg.gguf_type, reporter)
        described = f"gguf {cfg.gguf_type}"
    else:
        t0 = time.perf_counter()
        with reporter.progress(f"{cfg.method} {scheme.name}", total=len(names), unit="layers") as bar:
            errors = Q.quantize_model(
                model,
                scheme,
                lm_head=cfg.quantize_lm_head,
                method=cfg.method,
                calibration=calibration,
                damp=cfg.calibration.damp,
                progress=bar,
            )
        reporter.log(
            f"quantized {len(names)} layers ({cfg.method}, {scheme.name}) in {time.perf_counter() - t0:.1f}s"
        )
        ignore = [] if cfg.quantize_lm_head else ["lm_head"]
        save_model_folder(
            model,
            out,
            quantization_config=Q.quantization_config(scheme, ignore),
            **_special_ids(raw),
            generation_config=_generation_config(source.path),
        )
        described = f"{cfg.method} {scheme.name}"
        del model

    # 3. score both, measure size and speed
    scores = {}
    for which, folder in (("source", source.path), ("quantized", out)):
        reporter.log(f"scoring the {which} model")
        results = evaluate(
            folder,
            cfg.tasks,
            limit=cfg.limit,
            perplexity_data=perplexity_data,
            project_dir=ctx.project_dir,
            custom=[c.model_dump() for c in ctx.project.eval.custom],
            reporter=reporter,
        )
        scores[which] = flat_metrics(results)
    (out / RESULTS_FILE).write_text(json.dumps({"method": described, "scores": scores}, indent=2) + "\n")
    metrics: dict[str, Any] = {"method": described, **compare_scores(scores["source"], scores["quantized"])}
    if errors:
        metrics["calibration_error"] = sum(errors.values()) / len(errors)
    metrics.update(size_and_speed(source.path, out, cfg.speed_tokens, reporter))
    return metrics


def skip_reason(cfg: QuantizeConfig | None) -> str | None:
    """`llmctl run` quantizes only for a project whose llmctl.yaml has a `quantize:` section with keys
    (scoring a big model twice is not free); `llmctl quantize` runs with the defaults anywhere."""
    if cfg is None or not cfg.model_fields_set:
        return "no quantize: section in llmctl.yaml"
    return None


def _overrides(options: dict[str, Any]) -> dict[str, Any]:
    """Command-line options that replace section keys for one run (--format, --type)."""
    return {key: options[key] for key in ("format", "gguf_type") if options.get(key) is not None}


def _perplexity_data(cfg: QuantizeConfig, tokens: Any, project_dir: Path) -> Path | None:
    if cfg.text:
        path = _project_path(cfg.text, project_dir)
        if not path.is_file():
            raise InputError(
                f"quantize.text: {path} not found", hint="point quantize.text at a UTF-8 text file"
            )
        return path
    if tokens is not None:
        return tokens.path
    if "perplexity" in cfg.tasks:
        raise InputError(
            "perplexity needs a tokens artifact or a text file",
            hint="run `llmctl tokenize`, pass --data tokenize:vN, or set quantize.text",
        )
    return None


def _project_path(value: str, project_dir: Path) -> Path:
    path = Path(value).expanduser()
    return path if path.is_absolute() else project_dir / path


def calibration_ids(
    cfg: QuantizeConfig, model_dir: Path, tokens_dir: Path | None, project_dir: Path
) -> torch.Tensor:
    """(samples, seq_len) token ids: windows spread evenly over the text file or the tokens artifact's
    train split; InputError when there are fewer tokens than requested."""
    import numpy as np

    cal = cfg.calibration
    need = cal.samples * cal.seq_len
    if cal.path is not None:
        from llmctl.model.hf_tokenizer import load_folder_tokenizer

        path = _project_path(cal.path, project_dir)
        if not path.is_file():
            raise InputError(f"quantize.calibration.path: {path} not found")
        ids = np.asarray(
            load_folder_tokenizer(model_dir).encode(path.read_text(encoding="utf-8")), dtype=np.int64
        )
        where, read = str(path), lambda start: ids[start : start + cal.seq_len]
        available = len(ids)
    else:
        if tokens_dir is None:
            raise InputError(
                "GPTQ needs calibration text: no tokens artifact and no quantize.calibration.path",
                hint="run `llmctl tokenize`, pass --data tokenize:vN, or set quantize.calibration.path",
            )
        from llmctl.data.loader import TokenStream, _open_split
        from llmctl.data.shards import TOKENIZER_DIR, TRAIN_DIR
        from llmctl.data.tokenizer import load_tokenizer, tokenizer_file_id

        model_tok = model_dir / "tokenizer.json"
        tok_id = load_tokenizer(tokens_dir / TOKENIZER_DIR).tokenizer_id
        if model_tok.is_file() and tokenizer_file_id(model_tok) != tok_id:
            raise InputError(
                f"the model's tokenizer is not the tokens artifact's ({tok_id}): calibration needs text "
                "encoded by the model's own tokenizer",
                hint="pass the tokens artifact the model was trained on (--data tokenize:vN), or set "
                "quantize.calibration.path to a text file",
            )
        stream = TokenStream(_open_split(tokens_dir / TRAIN_DIR))
        where, available = f"{tokens_dir.name}'s train split", stream.n_tokens
        read = lambda start: stream.read(start, cal.seq_len)  # noqa: E731
    if available < need:
        raise InputError(
            f"calibration set too small: {where} has {available:,} tokens, {cal.samples} x {cal.seq_len} "
            f"needs {need:,}",
            hint="lower quantize.calibration.samples or seq_len, or give more text",
        )
    starts = np.linspace(0, available - cal.seq_len, cal.samples).astype(np.int64)
    return torch.stack([torch.as_tensor(read(int(s))) for s in starts])


def copy_tokenizer(source: Path, out: Path) -> None:
    """Everything of the source folder that is not weights or config.json (tokenizer, templates)."""
    for f in source.iterdir():
        if (
            f.is_file()
            and f.suffix != ".safetensors"
            and f.name not in (CONFIG_FILE, "model.safetensors.index.json")
        ):
            shutil.copy2(f, out / f.name)


def _special_ids(raw: dict) -> dict[str, Any]:
    return {k: raw.get(k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}


def _generation_config(source: Path) -> dict | None:
    path = source / GENERATION_CONFIG_FILE
    return read_json(path) if path.is_file() else None


def _export_gguf(source: Path, out: Path, qtype: str, reporter: Reporter) -> Path:
    """The source as one GGUF file of `qtype` in `out`, and beside it its dequantized weights (read back
    by our GGUF importer) so every llmctl tool, and this stage's scoring, can load the artifact."""
    try:
        from llmctl.model.gguf_export import export_gguf
    except ImportError as e:
        raise InputError(f"GGUF export is not available here: {e}") from None
    from llmctl.model.hf_import import import_model

    gguf_file = export_gguf(source, out / f"model-{qtype}.gguf", qtype)
    scratch = out.parent / "gguf-import"
    import_model(gguf_file, scratch, reporter)
    for f in scratch.iterdir():
        if f.suffix == ".safetensors" or f.name in (CONFIG_FILE, "model.safetensors.index.json"):
            shutil.move(str(f), out / f.name)
    shutil.rmtree(scratch, ignore_errors=True)
    return gguf_file


def compare_scores(source: dict[str, float], quantized: dict[str, float]) -> dict[str, float]:
    """source/, quantized/ and delta/ of every task/metric, and the perplexity increase in percent."""
    out: dict[str, float] = {}
    for key in sorted(set(source) & set(quantized)):
        out[f"source/{key}"] = source[key]
        out[f"quantized/{key}"] = quantized[key]
        out[f"delta/{key}"] = quantized[key] - source[key]
    if "source/perplexity/ppl" in out:
        out["ppl_increase_pct"] = 100 * (out["quantized/perplexity/ppl"] / out["source/perplexity/ppl"] - 1)
    return out


def gate_failures(
    metrics: dict[str, Any], max_ppl_increase: float | None, minimums: dict[str, float]
) -> list[str]:
    """Failed gates, one line each: the perplexity increase above `max_ppl_increase` percent, and the
    quantized model's scores below `minimums` (keys as eval's --min)."""
    failures = []
    if max_ppl_increase is not None:
        increase = metrics.get("ppl_increase_pct")
        if increase is None:
            raise InputError(
                "--max-ppl-increase: this run measured no perplexity", hint="add perplexity to quantize.tasks"
            )
        if not increase <= max_ppl_increase:
            failures.append(f"perplexity +{increase:.2f}% > {max_ppl_increase}%")
    if minimums:
        prefix = "quantized/"
        flat = {k.removeprefix(prefix): v for k, v in metrics.items() if k.startswith(prefix)}
        tasks = {}
        for key, value in flat.items():
            task, _, metric = key.partition("/")
            tasks.setdefault(task, {"kind": "", "metrics": {}})["metrics"][metric] = value
        failures += check_thresholds({"tasks": _with_kinds(tasks)}, minimums)
    return failures


def _with_kinds(tasks: dict[str, dict]) -> dict[str, dict]:
    """Task entries as check_thresholds reads them (its primary metric needs the task's kind)."""
    from llmctl.evals.tasks import TASKS

    for name, entry in tasks.items():
        spec = TASKS.get(name)
        entry["kind"] = spec.kind if spec else "multiple_choice"
    return tasks


def size_and_speed(source: Path, quantized: Path, tokens: int, reporter: Reporter) -> dict[str, float]:
    """Bytes on disk, bytes in memory while decoding (tensors plus packed copies) and decode tokens/s
    at batch 1 and 8 (greedy, `tokens` new tokens after an 8-token prompt), for both folders."""
    out: dict[str, float] = {}
    for which, folder in (("source", source), ("quantized", quantized)):
        files = list(folder.glob("*.gguf")) or list(folder.glob("*.safetensors"))  # gguf: the file itself
        out[f"bytes_on_disk/{which}"] = float(sum(f.stat().st_size for f in files))
        if tokens == 0:
            continue
        from llmctl.model.engine import Engine, SamplingParams

        model, cfg = load_model_folder(folder, dtype=torch.float32)
        engine = Engine(model)
        params = SamplingParams(max_new_tokens=tokens, temperature=0.0)
        prompt = [1 + i % max(1, cfg.vocab_size - 1) for i in range(8)]
        engine.generate([prompt], SamplingParams(max_new_tokens=2, temperature=0.0))  # packs the weights
        decoder = engine._get_decoder()
        memory = Q.tensor_bytes(model) + (decoder.nbytes() if decoder is not None else 0)
        out[f"memory_bytes/{which}"] = float(memory)
        for batch in (1, 8):
            t0 = time.perf_counter()
            results = engine.generate([prompt] * batch, params)
            seconds = time.perf_counter() - t0
            out[f"decode_tok_s/b{batch}/{which}"] = sum(len(r.tokens) for r in results) / seconds
        del engine, model
    for key in [k for k in out if k.endswith("/source")]:
        base, after = out[key], out.get(key.replace("/source", "/quantized"))
        if after is not None and base:
            out[key.replace("/source", "/ratio")] = after / base
    reporter.log(
        "size: {:.1f} -> {:.1f} MB on disk".format(
            out["bytes_on_disk/source"] / 1e6, out["bytes_on_disk/quantized"] / 1e6
        )
        + (
            ", decode {:.1f} -> {:.1f} tok/s at batch 1".format(
                out["decode_tok_s/b1/source"], out["decode_tok_s/b1/quantized"]
            )
            if tokens
            else ""
        )
    )
    assert all(math.isfinite(v) for v in out.values()), out
    return out
