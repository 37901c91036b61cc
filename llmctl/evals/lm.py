"""The scoring engine: log-likelihoods of continuations, greedy generation and token losses.

    lm = EvalLM.from_folder("workspace/artifacts/pretrain/v0003")     # any HF-Llama model folder
    lm.loglikelihood([("Question: 2+2?\nAnswer:", " 4")])              # [LogLik(logprob, is_greedy)]
    lm.generate_until(["Question: ...\nAnswer:"], until=("Question:",), max_gen_tokens=256)

Tokenization follows lm-evaluation-harness exactly (`_encode_pair`): trailing spaces of the context
move onto the continuation, context+continuation is encoded whole, and the continuation's tokens are
the tail after the context's tokens; an empty context becomes the prefix token (BOS, else EOS). The
tokenizer's own post-processor decides whether BOS is prepended (what `tokenizer.encode(text)` does
in `transformers`, which is lm-eval's default): llmctl tokenizers add BOS, since every training
document starts with it. Too-long inputs are cut from the left to the model's context.

Why not one forward per (context, continuation) like lm-eval: multiple-choice items share their
context across choices. Requests with identical context tokens are grouped; the context is run once
(left-padded batch, KV cache), its cache is copied to one row per continuation, and only the
continuation tokens run again. Logits are computed only where they are scored. The result is the same
numbers (fp32; to ~1e-5) for a fraction of the compute: one-token continuations (MMLU's " A".." D")
need no second forward at all.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from llmctl.errors import InputError
from llmctl.model.checkpoint import load_model_folder
from llmctl.model.engine import Engine, SamplingParams
from llmctl.model.transformer import KVCache, Transformer
from llmctl.reporting import ProgressTask


@dataclass(frozen=True)
class LogLik:
    """Sum of the continuation's token log-probs, and whether greedy decoding would produce it."""

    logprob: float
    is_greedy: bool
    n_tokens: int


def set_threads(threads: int | None) -> int:
    """Use `threads` torch threads (default: every core); returns the number set."""
    n = max(1, min(threads or os.cpu_count() or 1, os.cpu_count() or 1))
    torch.set_num_threads(n)
    return n


class EvalLM:
    """A Transformer plus its tokenizer, with the three operations evaluation needs."""

    def __init__(
        self,
        model: Transformer,
        tokenizer,  # tokenizers.Tokenizer
        *,
        bos_id: int | None,
        eos_id: int | None,
        name: str = "model",
    ):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.bos_id = bos_id
        self.eos_id = eos_id
        self.name = name
        self.max_length = model.config.max_seq_len
        prefix = bos_id if bos_id is not None else eos_id
        assert prefix is not None, "a model needs a BOS or EOS token to score empty contexts"
        self.prefix_id = prefix
        self.device = next(model.parameters()).device

    @classmethod
    def from_folder(
        cls, folder: str | Path, *, device: str = "cpu", dtype: torch.dtype | None = torch.float32
    ) -> EvalLM:
        """Load an HF-Llama model folder with its tokenizer (float32 by default, for exact scores)."""
        from llmctl.model.hf_tokenizer import load_folder_tokenizer

        folder = Path(folder)
        tok = load_folder_tokenizer(folder)
        model, _ = load_model_folder(folder, device=device, dtype=dtype)
        return cls(model, tok.tokenizer, bos_id=tok.bos_id, eos_id=tok.eos_id, name=str(folder))

    # -- tokenization ----------------------------------------------------------------------------
    def encode(self, text: str, special: bool = True) -> list[int]:
        """Token ids; `special` applies the tokenizer's post-processor (e.g. BOS first)."""
        return self.tokenizer.encode(text, add_special_tokens=special).ids

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """(context ids, continuation ids) exactly as lm-eval's `_encode_pair` / empty-context rule."""
        if context == "":
            cont = self.encode(continuation, special=False)
            if cont and cont[0] == self.prefix_id:
                return cont[:1], cont[1:]
            return [self.prefix_id], cont
        n_spaces = len(context) - len(context.rstrip())
        if n_spaces:
            continuation = context[-n_spaces:] + continuation
            context = context[:-n_spaces]
        whole = self.encode(context + continuation)
        ctx = self.encode(context)
        return ctx, whole[len(ctx) :]

    # -- log-likelihood --------------------------------------------------------------------------
    def loglikelihood(
        self,
        requests: Sequence[tuple[str, str]],
        *,
        batch_size: int = 16,
        progress: ProgressTask | None = None,
    ) -> list[LogLik]:
        """Score each (context, continuation) pair; see the module docstring for how."""
        pairs = [self.encode_pair(c, x) for c, x in requests]
        return self.loglikelihood_tokens(pairs, batch_size=batch_size, progress=progress)

    def loglikelihood_tokens(
        self,
        pairs: Sequence[tuple[list[int], list[int]]],
        *,
        batch_size: int = 16,
        progress: ProgressTask | None = None,
    ) -> list[LogLik]:
        """Score token-level (context, continuation) pairs, grouping requests that share a context."""
        L = self.max_length
        groups: dict[tuple[int, ...], list[int]] = {}
        conts: list[list[int]] = []
        for i, (ctx, cont) in enumerate(pairs):
            if not cont:
                raise InputError(
                    f"request {i}: the continuation is empty after tokenization",
                    hint="every choice/target must contain text",
                )
            if len(cont) > L:
                raise InputError(
                    f"request {i}: the continuation has {len(cont)} tokens, more than the model's "
                    f"context of {L}",
                    hint="shorten the choices, or use a model with a longer context",
                )
            # lm-eval keeps the last L+1 tokens of context+continuation: the context loses the rest.
            keep = L + 1 - len(cont)
            ctx = ctx[-keep:] if len(ctx) > keep else ctx
            assert ctx, f"request {i} has no context token"
            groups.setdefault(tuple(ctx), []).append(i)
            conts.append(list(cont))

        # Longest first (lm-eval's order): memory peaks at once, and the padding in a batch is small.
        order = sorted(groups.items(), key=lambda g: -(len(g[0]) + max(len(conts[i]) for i in g[1])))
        results: list[LogLik | None] = [None] * len(pairs)
        batch: list[tuple[tuple[int, ...], list[int]]] = []
        n_rows = 0
        for group in order:
            batch.append(group)
            n_rows += len(group[1])
            if n_rows >= batch_size:
                self._score_batch(batch, conts, results)
                if progress is not None:
                    progress.advance(n_rows)
                batch, n_rows = [], 0
        if batch:
            self._score_batch(batch, conts, results)
            if progress is not None:
                progress.advance(n_rows)
        assert all(r is not None for r in results)
        return results  # type: ignore[return-value]

    @torch.inference_mode()
    def _score_batch(
        self,
        batch: list[tuple[tuple[int, ...], list[int]]],
        conts: list[list[int]],
        results: list[LogLik | None],
    ) -> None:
        model, cfg, dev = self.model, self.model.config, self.device
        G = len(batch)
        ctx_lens = [len(ctx) for ctx, _ in batch]
        Lc = max(ctx_lens)
        idx = torch.zeros((G, Lc), dtype=torch.long)
        mask = torch.ones((G, Lc), dtype=torch.long)
        for g, (ctx, _) in enumerate(batch):
            idx[g, Lc - len(ctx) :] = torch.tensor(ctx)
            mask[g, : Lc - len(ctx)] = 0
        ragged = min(ctx_lens) != Lc
        idx, mask = idx.to(dev), mask.to(dev)
        pre = KVCache(cfg, G, Lc, device=dev, dtype=next(model.parameters()).dtype)
        last = model(idx, cache=pre, attention_mask=mask if ragged else None, logits_to_keep=1)[:, -1]
        last = torch.log_softmax(last.float(), dim=-1)  # (G, V): scores each continuation's first token

        rows = [(g, i) for g, (_, members) in enumerate(batch) for i in members]
        Lk = max(len(conts[i]) for _, i in rows) - 1  # continuation tokens that are model inputs
        rest = None
        if Lk > 0:
            B = len(rows)
            row_group = torch.tensor([g for g, _ in rows], device=dev)
            cache = KVCache(cfg, B, Lc + Lk, device=dev, dtype=pre.k.dtype)
            cache.k[:, :, :, :Lc] = pre.k.index_select(1, row_group)
            cache.v[:, :, :, :Lc] = pre.v.index_select(1, row_group)
            cache.pos = Lc
            inp = torch.zeros((B, Lk), dtype=torch.long)
            for r, (_, i) in enumerate(rows):
                c = conts[i][:-1]
                inp[r, : len(c)] = torch.tensor(c, dtype=torch.long)
            # Right padding after the continuation is never attended by real tokens (causal), so
            # only the context's left padding needs a mask.
            full_mask = None
            if ragged:
                full_mask = torch.cat(
                    [mask.index_select(0, row_group), torch.ones((B, Lk), dtype=torch.long, device=dev)], 1
                )
            rest = model(inp.to(dev), cache=cache, attention_mask=full_mask)  # (B, Lk, V)

        for r, (g, i) in enumerate(rows):
            cont = conts[i]
            n = len(cont)
            if n > 1:
                logits = torch.cat([last[g : g + 1], torch.log_softmax(rest[r, : n - 1].float(), dim=-1)])
            else:
                logits = last[g : g + 1]
            target = torch.tensor(cont, device=dev)
            lp = logits.gather(1, target[:, None]).sum().item()
            greedy = bool((logits.argmax(-1) == target).all())
            results[i] = LogLik(lp, greedy, n)

    # -- generation ------------------------------------------------------------------------------
    def generate_until(
        self,
        prompts: Sequence[str],
        *,
        until: Sequence[str],
        max_gen_tokens: int = 256,
        batch_size: int = 16,
        progress: ProgressTask | None = None,
    ) -> list[str]:
        """Greedy continuations of each prompt, cut before the first stop string (lm-eval's
        `generate_until`: prompts are cut from the left to leave room for max_gen_tokens)."""
        if max_gen_tokens >= self.max_length:
            raise InputError(
                f"max_gen_tokens ({max_gen_tokens}) must be below the model's context ({self.max_length})",
                hint="lower eval.max_gen_tokens",
            )
        engine = Engine(self.model, decode=self.decode)
        stop_ids = tuple(t for t in (self.eos_id,) if t is not None)
        params = SamplingParams(
            max_new_tokens=max_gen_tokens, temperature=0.0, stop_token_ids=stop_ids, stop_strings=tuple(until)
        )
        keep = self.max_length - max_gen_tokens
        encoded = [self.encode(p)[-keep:] for p in prompts]
        order = sorted(range(len(prompts)), key=lambda i: -len(encoded[i]))
        out: list[str] = [""] * len(prompts)
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            completions = engine.generate([encoded[i] for i in chunk], params)
            for i, c in zip(chunk, completions, strict=True):
                text = c.text or ""
                for s in until:  # the engine cuts at stop strings; this also covers decode edge cases
                    text = text.split(s)[0] if s else text
                out[i] = text
            if progress is not None:
                progress.advance(len(chunk))
        return out

    # -- token losses ----------------------------------------------------------------------------
    @torch.inference_mode()
    def token_losses(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Per-token cross-entropy (B, T) in nats for inputs x and targets y (-100 = ignored)."""
        return self.model(x.to(self.device), y.to(self.device), reduction="none").float()
