"""The scoring engine: log-likelihoods of continuations, greedy generation and token losses.

    lm = EvalLM.from_folder("workspace/artifacts/pretrain/v0003")     # any HF-Llama model folder
    lm.loglikelihood([("Question: 2+2?\nAnswer:", " 4")])              # [LogLik(logprob, is_greedy)]
    lm.generate_until(["Question: ...\nAnswer:"], until=("Question:",), max_gen_tokens=256)
    lm.generate_tokens([prompt_ids], max_gen_tokens=32)                # [Completion] (chat tasks)

Tokenization follows lm-evaluation-harness exactly (`_encode_pair`): trailing spaces of the context
move onto the continuation, context+continuation is encoded whole, and the continuation's tokens are
the tail after the context's tokens; an empty context becomes the prefix token (BOS, else EOS). The
tokenizer's own post-processor decides whether BOS is prepended (what `tokenizer.encode(text)` does
in `transformers`, which is lm-eval's default): llmctl tokenizers add BOS, since every training
document starts with it. Too-long inputs are cut from the left to the model's context.

Why not one forward per (context, continuation) like lm-eval: multiple-choice items share their
context across choices. Requests with identical context tokens are grouped and each group is packed
into one row: the context once, then every continuation's tokens, with an attention mask that lets a
continuation see the context and its own earlier tokens only, and position ids that restart at the
context's end for each continuation. So each token's logits are exactly those of lm-eval's separate
sequence (fp32; to ~1e-5), while the context runs once instead of once per choice. Rows are sorted
by length and batched by a token budget (`batch_tokens`, padded tokens per forward), so batches are
as large as memory allows and padding is small; lm_head and the log-softmax run only at scored
positions (HellaSwag: ~180 instead of ~420 tokens per item, and a quarter of the vocabulary
projections).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from llmctl.errors import InputError
from llmctl.model.checkpoint import load_model_folder
from llmctl.model.engine import Completion, Engine, SamplingParams
from llmctl.model.transformer import Transformer
from llmctl.reporting import ProgressTask
from llmctl.threads import apply_threads, choose_threads

DEFAULT_BATCH_TOKENS = 4096  # padded tokens per scoring forward (eval.batch_tokens)
LOGITS_CHUNK = 256  # scored positions per lm_head call: (256, vocab) fp32 logits at a time


@dataclass
class _Row:
    """One packed scoring row: a context once, then the inputs of each member's continuation."""

    context: tuple[int, ...]
    members: list[tuple[int, list[int]]]  # (request index, continuation tokens)

    @property
    def length(self) -> int:
        return len(self.context) + sum(len(cont) - 1 for _, cont in self.members)


@dataclass(frozen=True)
class LogLik:
    """Sum of the continuation's token log-probs, and whether greedy decoding would produce it."""

    logprob: float
    is_greedy: bool
    n_tokens: int


def set_threads(threads: int | None) -> int:
    """Use `threads` torch threads, at most the cores this process may use (default: those cores,
    see llmctl.threads); returns the number set."""
    return apply_threads(choose_threads(threads))


class EvalLM:
    """A Transformer plus its tokenizer, with the three operations evaluation needs."""

    def __init__(
        self,
        model: Transformer,
        tokenizer,  # tokenizers.Tokenizer
        *,
        bos_id: int | None,
        eos_id: int | None,
        stop_ids: tuple[int, ...] | None = None,  # default: EOS; from a folder: its loader's decision
        name: str = "model",
        folder_tokenizer=None,  # hf_tokenizer.FolderTokenizer: chat template and specials (chat tasks)
    ):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.bos_id = bos_id
        self.eos_id = eos_id
        self.stop_ids = (
            tuple(stop_ids) if stop_ids is not None else tuple(t for t in (eos_id,) if t is not None)
        )
        self.name = name
        self.folder_tokenizer = folder_tokenizer
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
        return cls(
            model,
            tok.tokenizer,
            bos_id=tok.bos_id,
            eos_id=tok.eos_id,
            stop_ids=tok.stop_ids,
            name=str(folder),
            folder_tokenizer=tok,
        )

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
        batch_tokens: int = DEFAULT_BATCH_TOKENS,
        progress: ProgressTask | None = None,
    ) -> list[LogLik]:
        """Score each (context, continuation) pair; see the module docstring for how."""
        pairs = [self.encode_pair(c, x) for c, x in requests]
        return self.loglikelihood_tokens(pairs, batch_tokens=batch_tokens, progress=progress)

    def loglikelihood_tokens(
        self,
        pairs: Sequence[tuple[list[int], list[int]]],
        *,
        batch_tokens: int = DEFAULT_BATCH_TOKENS,
        progress: ProgressTask | None = None,
    ) -> list[LogLik]:
        """Score token-level (context, continuation) pairs: one packed row per shared context,
        rows sorted by length and batched up to `batch_tokens` (padded) tokens per forward."""
        rows = self._pack_rows(pairs)
        lengths = [row.length for row in rows]
        # Longest first (lm-eval's order): memory peaks at once, and neighbours pad each other little.
        order = sorted(range(len(rows)), key=lambda r: -lengths[r])
        results: list[LogLik | None] = [None] * len(pairs)
        batch: list[_Row] = []
        for r in order:
            # The batch's first row is its longest, so its padded size is len(batch) * that length.
            if batch and (len(batch) + 1) * batch[0].length > batch_tokens:
                self._score_rows(batch, results, progress)
                batch = []
            batch.append(rows[r])
        if batch:
            self._score_rows(batch, results, progress)
        assert all(r is not None for r in results)
        return results  # type: ignore[return-value]

    def _pack_rows(self, pairs: Sequence[tuple[list[int], list[int]]]) -> list[_Row]:
        """Group requests by their (cut) context tokens and pack each group into rows of at most
        the model's context: the context once, then every member's continuation inputs."""
        L = self.max_length
        groups: dict[tuple[int, ...], list[tuple[int, list[int]]]] = {}
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
            groups.setdefault(tuple(ctx), []).append((i, list(cont)))
        rows = []
        for ctx, members in groups.items():
            row = _Row(ctx, [])
            for member in members:
                # Each continuation fits beside its context (cut above); a full row starts another.
                if row.members and row.length + len(member[1]) - 1 > L:
                    rows.append(row)
                    row = _Row(ctx, [])
                row.members.append(member)
            rows.append(row)
        return rows

    @torch.inference_mode()
    def _score_rows(
        self, batch: list[_Row], results: list[LogLik | None], progress: ProgressTask | None
    ) -> None:
        """One forward over right-padded packed rows; lm_head and log-softmax only where scored."""
        model, dev = self.model, self.device
        B, N = len(batch), max(row.length for row in batch)
        idx = torch.zeros((B, N), dtype=torch.long)
        pos = torch.zeros((B, N), dtype=torch.long)
        seg = torch.full((B, N), -1, dtype=torch.long)  # 0: context, s: s-th continuation, -1: padding
        sources: list[int] = []  # flat (b * N + t) positions whose next-token logits are scored
        token_source: list[int] = []  # per scored token: its index into sources
        targets: list[int] = []
        requests: list[tuple[int, int]] = []  # (request, n_tokens)
        for b, row in enumerate(batch):
            Lc = len(row.context)
            idx[b, :Lc] = torch.tensor(row.context)
            pos[b, :Lc] = torch.arange(Lc)
            seg[b, :Lc] = 0
            last = len(sources)
            sources.append(b * N + Lc - 1)  # predicts every continuation's first token
            t = Lc
            for s, (i, cont) in enumerate(row.members, 1):
                k = len(cont) - 1  # the continuation's tokens that are inputs (all but its last)
                if k:
                    idx[b, t : t + k] = torch.tensor(cont[:-1])
                    pos[b, t : t + k] = torch.arange(Lc, Lc + k)
                    seg[b, t : t + k] = s
                token_source += [last, *range(len(sources), len(sources) + k)]
                sources += range(b * N + t, b * N + t + k)
                targets += cont
                requests.append((i, len(cont)))
                t += k
        # A continuation token sees the context and the earlier tokens of its own continuation;
        # padding sees only itself (an all-masked softmax row would be NaN).
        causal = torch.ones((N, N), dtype=torch.bool).tril()
        same = (seg[:, None, :] == 0) | (seg[:, None, :] == seg[:, :, None])  # (B, Tq, Tk)
        mask = (causal & same) | torch.eye(N, dtype=torch.bool)
        hidden = model(
            idx.to(dev), attention_mask=mask[:, None].to(dev), position_ids=pos.to(dev), return_hidden=True
        ).flatten(0, 1)  # (B * N, C)

        src = torch.tensor(sources, device=dev)
        tok_src = torch.tensor(token_source, device=dev)
        tgt = torch.tensor(targets, device=dev)
        # Each target's log-prob and each source's greedy token; the (rows, vocab) logits are made
        # in chunks so that their memory stays bounded.
        tok_logprob = torch.empty(len(targets), dtype=torch.float32, device=dev)
        greedy_tok = torch.empty(len(sources), dtype=torch.long, device=dev)
        for lo in range(0, len(sources), LOGITS_CHUNK):
            logits = model.lm_head(hidden[src[lo : lo + LOGITS_CHUNK]]).float()
            greedy_tok[lo : lo + LOGITS_CHUNK] = logits.argmax(-1)
            logprob = torch.log_softmax(logits, dim=-1)
            sel = (tok_src >= lo) & (tok_src < lo + LOGITS_CHUNK)
            tok_logprob[sel] = logprob[tok_src[sel] - lo, tgt[sel]]
        hit = (greedy_tok[tok_src] == tgt).cpu()
        tok_logprob = tok_logprob.double().cpu()
        start = 0
        for i, n in requests:
            results[i] = LogLik(
                float(tok_logprob[start : start + n].sum()), bool(hit[start : start + n].all()), n
            )
            start += n
        assert start == len(targets), (start, len(targets))
        if progress is not None:
            progress.advance(len(requests))

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
        self._check_room(max_gen_tokens)
        keep = self.max_length - max_gen_tokens
        completions = self.generate_tokens(
            [self.encode(p)[-keep:] for p in prompts],
            max_gen_tokens=max_gen_tokens,
            stop_strings=until,
            batch_size=batch_size,
            progress=progress,
        )
        out = []
        for c in completions:
            text = c.text or ""
            for s in until:  # the engine cuts at stop strings; this also covers decode edge cases
                text = text.split(s)[0] if s else text
            out.append(text)
        return out

    def generate_tokens(
        self,
        prompts: Sequence[Sequence[int]],
        *,
        max_gen_tokens: int,
        stop_strings: Sequence[str] = (),
        batch_size: int = 16,
        progress: ProgressTask | None = None,
    ) -> list[Completion]:
        """Greedy generation from token-id prompts with the engine `llmctl generate`/`chat` use,
        stopping at the model's stop ids (and `stop_strings`); prompts batched longest first."""
        self._check_room(max_gen_tokens)
        engine = Engine(self.model, decode=self.decode)
        params = SamplingParams(
            max_new_tokens=max_gen_tokens,
            temperature=0.0,
            stop_token_ids=self.stop_ids,
            stop_strings=tuple(stop_strings),
        )
        order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
        out: list[Completion | None] = [None] * len(prompts)
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            for i, c in zip(chunk, engine.generate([prompts[i] for i in chunk], params), strict=True):
                out[i] = c
            if progress is not None:
                progress.advance(len(chunk))
        return out  # type: ignore[return-value]

    def _check_room(self, max_gen_tokens: int) -> None:
        if max_gen_tokens >= self.max_length:
            raise InputError(
                f"max_gen_tokens ({max_gen_tokens}) must be below the model's context ({self.max_length})",
                hint="lower eval.max_gen_tokens (eval.chat_max_gen_tokens for chat tasks)",
            )

    # -- token losses ----------------------------------------------------------------------------
    @torch.inference_mode()
    def token_losses(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Per-token cross-entropy (B, T) in nats for inputs x and targets y (-100 = ignored)."""
        return self.model(x.to(self.device), y.to(self.device), reduction="none").float()
