"""The one generation engine: batched, KV-cached sampling shared by eval, RL rollouts, chat and serving.

Prompts of different lengths are left-padded into one batch; a padding mask and per-row position
ids keep every row exactly what it would be alone. The KV cache is allocated once per batch shape
and reused; each step runs one forward over a single new token per row under `inference_mode`
(on CPU through a repacked copy of the weights: llmctl/model/decode.py). A row that finished leaves
the batch (its cache rows are overwritten by a running row's), so later steps cost only the rows
still running: RL rollouts, whose samples end at very different lengths, gain the most.

    engine = Engine(model, tokenizer)                 # tokenizer: tokenizers.Tokenizer (for text/stop strings)
    params = SamplingParams(max_new_tokens=64, temperature=0.8, top_p=0.95, seed=0,
                            stop_token_ids=(eos_id,), stop_strings=("\\n\\n",))
    completions = engine.generate([ids_a, ids_b], params)       # list[Completion]
    for event in engine.stream([ids], params):                  # TokenEvent per row per step
        print(event.text, end="", flush=True)
    groups = engine.generate([ids_a, ids_b], params, n=8)       # 16: groups[j * 8 + i] = sample i of prompt j

With `n` > 1 (RL rollouts: a group of answers per prompt) each prompt is prefilled once and its KV
cache rows copied n times; the B * n rows then decode as one batch.

Randomness is per row: row (prompt j, sample i) draws only from its own generator, seeded with
`row_seed(params.seed, j, i)`, so what a row samples does not depend on the other rows in the batch:
sample i of prompt j equals `generate([prompt_j], replace(params, seed=row_seed(seed, j, i)))`, up to
the rounding of batched matrix products. `row_seed(s, 0, 0) == s`: a single-prompt call with seed s
samples as it always did.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from llmctl.errors import InputError
from llmctl.model.decode import PackedDecoder, packing_pays_off
from llmctl.model.scratch import scratch
from llmctl.model.transformer import KVCache, Transformer

FinishReason = Literal["stop", "length"]
_MASK64 = (1 << 64) - 1


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens. temperature 0 = greedy (deterministic); top_k 0 and top_p 1.0 = off.

    `logprobs` are the model's own log-probabilities of the chosen tokens (log_softmax of the raw
    logits, before penalty, temperature and truncation; vLLM's default "raw" mode), which is what
    RL objectives and importance ratios need."""

    max_new_tokens: int = 256
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    stop_token_ids: tuple[int, ...] = ()
    stop_strings: tuple[str, ...] = ()
    seed: int | None = None
    logprobs: bool = False  # also return each sampled token's log-probability under the model

    def __post_init__(self) -> None:
        checks = [
            (self.max_new_tokens >= 1, f"max_new_tokens must be >= 1 (got {self.max_new_tokens})"),
            (self.temperature >= 0, f"temperature must be >= 0 (got {self.temperature})"),
            (self.top_k >= 0, f"top_k must be >= 0 (got {self.top_k})"),
            (0 < self.top_p <= 1, f"top_p must be in (0, 1] (got {self.top_p})"),
            (self.repetition_penalty > 0, f"repetition_penalty must be > 0 (got {self.repetition_penalty})"),
        ]
        bad = [msg for ok, msg in checks if not ok]
        if bad:
            raise InputError("invalid sampling parameters: " + "; ".join(bad))
        # Accept lists from config/JSON but store tuples (hashable, frozen).
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        object.__setattr__(self, "stop_strings", tuple(self.stop_strings))


@dataclass
class Completion:
    """One prompt's result. `tokens` excludes a stop token id; with a stop string, `tokens` ends with
    the token that completed it while `text` is cut just before the stop string."""

    prompt_tokens: list[int]
    tokens: list[int] = field(default_factory=list)
    text: str | None = None
    finish_reason: FinishReason = "length"
    logprobs: list[float] | None = None  # one per token in `tokens`, with SamplingParams(logprobs=True)
    stop_token: int | None = None  # the stop token id that ended it (finish_reason "stop" by an id)
    stop_logprob: float | None = None  # its log-probability, with SamplingParams(logprobs=True)


@dataclass(frozen=True)
class TokenEvent:
    """One streamed step of one row. `text` is the new printable text (may be empty while a
    multi-byte character or a possible stop-string prefix is held back); `token` is None on the
    final event of a row that stopped on a stop token id; `finish_reason` is set on a row's last event."""

    row: int
    token: int | None
    text: str
    finish_reason: FinishReason | None = None
    logprob: float | None = None  # with SamplingParams(logprobs=True), for a token


# ---- sampling --------------------------------------------------------------------------------------


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL-style penalty (Keskar et al. 2019, as in HF): seen tokens' positive logits / p, negative * p."""
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


def _splitmix64(x: int) -> int:
    """SplitMix64's output function (Steele et al. 2014): a bijective mix of 64-bit integers."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def row_seed(seed: int, prompt: int, sample: int) -> int:
    """The seed of the random stream of sample `sample` of prompt `prompt` (indices in one call) under
    SamplingParams(seed=seed): `seed` itself for (0, 0), so a single-prompt call is unchanged; else
    splitmix64(seed ^ splitmix64(prompt << 32 | sample)) >> 1, a 63-bit hash, so nearby base seeds
    (one per RL step) give unrelated streams rather than shifted copies of each other's."""
    assert 0 <= prompt < 1 << 32 and 0 <= sample < 1 << 32, (prompt, sample)
    if prompt == 0 and sample == 0:
        return seed
    return _splitmix64((seed & _MASK64) ^ _splitmix64(prompt << 32 | sample)) >> 1


def sample_next(
    logits: torch.Tensor,
    params: SamplingParams,
    generator: torch.Generator | Sequence[torch.Generator] | None = None,
) -> torch.Tensor:
    """Next token ids (B,) from last-position logits (B, V) after penalties. `generator`: one for the
    batch, or one per row; a row then draws from its own only, the same as it would alone."""
    if params.temperature == 0:
        return logits.argmax(dim=-1)
    logits = torch.div(
        logits, params.temperature, out=scratch("sampler.logits", logits.shape, logits, torch.float32)
    )
    if params.top_k and params.top_k < logits.size(-1):
        kth = torch.topk(logits, params.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        # Drop a token when the mass before it already reaches top_p (the top token always stays).
        drop = (cum - sorted_logits.softmax(dim=-1)) >= params.top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    probs = torch.ops.aten._softmax.out(logits, -1, False, out=scratch("sampler.probs", logits.shape, logits))
    if generator is None or isinstance(generator, torch.Generator):
        return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    assert len(generator) == probs.shape[0], (len(generator), probs.shape)
    # Inverse CDF: each row draws one uniform from its own generator (so what it samples does not
    # depend on its batch), then one batched cumsum and search. torch.multinomial's one-sample path
    # draws an exponential per vocabulary entry instead: 23x slower at 32 rows x 49k tokens on one
    # core (220 ms a step against 9.4 ms), a fifth of a CPU rollout's time.
    u = torch.stack([torch.rand((), generator=g, dtype=torch.float64) for g in generator])
    # fp64 (49k fp32 partial sums drift by up to ~1e-3), converted inside the cumsum: a separate
    # .double() copy of (rows, V) cost as much as the cumsum in a rollout step
    cdf = torch.cumsum(
        probs, dim=-1, dtype=torch.float64, out=scratch("sampler.cdf", probs.shape, probs, torch.float64)
    )
    # right=True: the first entry whose cdf exceeds u * total, so a zero-probability entry (cut by
    # top-k/top-p) is not picked even when u * total lands exactly on its cdf.
    picked = torch.searchsorted(cdf, (u.to(cdf.device) * cdf[:, -1])[:, None], right=True)
    return picked.squeeze(-1).clamp_(max=probs.shape[-1] - 1)


def _check_n(n: int) -> None:
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise InputError(f"n (samples per prompt) must be an integer >= 1 (got {n!r})")


def _held_back(text: str, stop_strings: tuple[str, ...]) -> int:
    """How many trailing chars might start a stop string (or are an incomplete UTF-8 char)."""
    hold = 0
    for s in stop_strings:
        for n in range(min(len(s) - 1, len(text)), hold, -1):
            if text.endswith(s[:n]):
                hold = n
                break
    if text.endswith("\ufffd"):
        hold = max(hold, len(text) - len(text.rstrip("\ufffd")))
    return hold


def _find_stop(text: str, emitted: str, stop_strings: tuple[str, ...]) -> int | None:
    """Index of the earliest stop string in text (searching only where a new one can be)."""
    best = None
    for s in stop_strings:
        start = max(0, len(emitted) - len(s) + 1)
        i = text.find(s, start)
        if i != -1 and (best is None or i < best):
            best = i
    return best


class IncrementalDetokenizer:
    """The text of a growing list of tokens, decoding only a short window per new token.

    Decoding the whole output at every step costs O(length) per token; instead, as vLLM and
    transformers' TextStreamer do, decode the tokens from `prefix` on with and without the new ones
    and append the difference. Starting both decodes at the same earlier token keeps what a decoder
    does at the start of a string (a SentencePiece leading space) out of the difference, and text
    ending in an incomplete UTF-8 character (U+FFFD) waits for the next token."""

    def __init__(self, decode: Callable[[list[int]], str]):
        self.decode = decode
        self.tokens: list[int] = []
        self.text = ""  # complete characters so far
        self._prefix = 0  # first token of the decode window
        self._read = 0  # tokens before this one are in `text`

    def push(self, token: int) -> None:
        self.tokens.append(token)
        before = self.decode(self.tokens[self._prefix : self._read])
        after = self.decode(self.tokens[self._prefix :])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.text += after[len(before) :]
            self._prefix, self._read = self._read, len(self.tokens)

    def final_text(self) -> str:
        """`text` plus whatever the tokens not yet in it decode to (a partial character as U+FFFD)."""
        if self._read == len(self.tokens):
            return self.text
        before = self.decode(self.tokens[self._prefix : self._read])
        return self.text + self.decode(self.tokens[self._prefix :])[len(before) :]


class RowText:
    """One row's visible text: incremental detokenization, stop strings, and hold-back of text that
    may still turn into a stop string. Shared by Engine.stream and the serving scheduler, so both cut
    and stream text the same way. Without a decode function every call returns ""."""

    def __init__(self, decode: Callable[[list[int]], str] | None, stop_strings: tuple[str, ...]):
        self._detok = IncrementalDetokenizer(decode) if decode is not None else None
        self.stop_strings = stop_strings
        self.emitted = ""  # text already handed out

    def push(self, token: int, *, last: bool) -> tuple[str, bool]:
        """(new visible text, whether a stop string ended the row) after `token`; `last`: no more
        tokens will come (the length limit), so nothing is held back."""
        if self._detok is None:
            return "", False
        self._detok.push(token)
        full = self._detok.final_text() if last else self._detok.text
        cut = _find_stop(full, self.emitted, self.stop_strings)
        stopped = cut is not None
        if stopped:
            full = full[:cut]
        keep = len(full) if stopped or last else len(full) - _held_back(full, self.stop_strings)
        text = full[len(self.emitted) : keep] if keep > len(self.emitted) else ""
        self.emitted += text
        return text, stopped

    def flush(self) -> str:
        """Text still held back when the row ends on a stop token."""
        if self._detok is None:
            return ""
        full = self._detok.final_text()
        text = full[len(self.emitted) :] if full.startswith(self.emitted) else ""
        self.emitted += text
        return text


# ---- engine --------------------------------------------------------------------------------------


class Engine:
    """Generation over a Transformer. `tokenizer` (anything with `.decode(list[int]) -> str`, e.g.
    a `tokenizers.Tokenizer`) or `decode` enables text output and stop strings.

    Prompts are prefilled through the model's forward; decode steps run through a PackedDecoder
    (a repacked copy of the weights, llmctl/model/decode.py) where that is faster: fp32 on CPU,
    unless `packed=False`. The copy is rebuilt when the model's weights change."""

    def __init__(
        self,
        model: Transformer,
        tokenizer: Any = None,
        *,
        decode: Callable[[list[int]], str] | None = None,
        packed: bool | None = None,
    ):
        self.model = model
        self.packed = packed  # None: wherever it pays off for the model's current device and dtype
        self._decoder: PackedDecoder | None = None
        if decode is None and tokenizer is not None:

            def decode(ids: list[int]) -> str:
                return tokenizer.decode(ids, skip_special_tokens=True)

        self.decode = decode
        self._cache: KVCache | None = None

    def _get_cache(self, batch_size: int, max_len: int) -> KVCache:
        """Reuse the previous cache when it is big enough (no per-call re-allocation)."""
        p = next(self.model.parameters())
        c = self._cache
        if (
            c is None
            or c.k.shape[1] != batch_size
            or c.max_len < max_len
            or c.k.dtype != p.dtype
            or c.k.device != p.device
        ):
            with torch.inference_mode():
                c = KVCache(self.model.config, batch_size, max_len, device=p.device, dtype=p.dtype)
            self._cache = c
        c.reset()
        return c

    def _get_decoder(self) -> PackedDecoder | None:
        """The packed weights, (re)built when missing or out of date with the model's."""
        if not (packing_pays_off(self.model) if self.packed is None else self.packed):
            self._decoder = None
            return None
        if self._decoder is None or not self._decoder.is_current():
            self._decoder = None  # free the old copy before making the new one
            self._decoder = PackedDecoder(self.model)
        return self._decoder

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        params: SamplingParams,
        on_token: Callable[[TokenEvent], None] | None = None,
        *,
        n: int = 1,
    ) -> list[Completion]:
        """`n` completions per prompt, prompt-major: result j * n + i is sample i of prompt j (its
        random stream seeded with row_seed(params.seed, j, i)); each prompt is prefilled once.
        `on_token` sees each TokenEvent as it happens (`row` indexes the results)."""
        _check_n(n)
        results = [Completion(prompt_tokens=list(p)) for p in prompts for _ in range(n)]
        texts = [""] * len(results)
        for ev in self.stream(prompts, params, n=n, _results=results):
            texts[ev.row] += ev.text
            if on_token is not None:
                on_token(ev)
        if self.decode is not None:
            for r, t in zip(results, texts, strict=True):
                r.text = t
        return results

    def stream(
        self,
        prompts: Sequence[Sequence[int]],
        params: SamplingParams,
        *,
        n: int = 1,
        _results: list[Completion] | None = None,
    ) -> Iterator[TokenEvent]:
        """Yield a TokenEvent per active row per step, in row order, until every row finished.
        With `n` samples per prompt there are len(prompts) * n rows, row j * n + i being sample i
        of prompt j (as in `generate`)."""
        _check_n(n)
        if not prompts or any(len(p) == 0 for p in prompts):
            raise InputError(
                "every prompt needs at least one token",
                hint="encode the prompt (with BOS if the model uses one)",
            )
        if params.stop_strings and self.decode is None:
            raise InputError(
                "stop strings need a tokenizer", hint="create the Engine with the model's tokenizer"
            )
        model, cfg = self.model, self.model.config
        device = next(model.parameters()).device
        B = len(prompts)
        lens = [len(p) for p in prompts]
        L = max(lens)
        total = L + params.max_new_tokens
        if total > cfg.max_seq_len:
            raise InputError(
                f"prompt ({L} tokens) + max_new_tokens ({params.max_new_tokens}) exceeds the model's "
                f"context of {cfg.max_seq_len} tokens",
                hint="shorten the prompt or lower max_new_tokens",
            )
        R = B * n  # rows decoded: prompt-major, n per prompt
        if _results is None:
            _results = [Completion(prompt_tokens=list(p)) for p in prompts for _ in range(n)]
        results = _results
        assert len(results) == R, (len(results), R)
        ragged = min(lens) != L

        idx = torch.zeros((B, L), dtype=torch.long)
        for i, p in enumerate(prompts):
            idx[i, L - len(p) :] = torch.tensor(list(p), dtype=torch.long)
        idx = idx.to(device)
        attention_mask = None
        if ragged:  # left padding: 0 for pad, 1 for prompt and every generated position
            attention_mask = torch.ones((B, total), dtype=torch.long)
            for i, length in enumerate(lens):
                attention_mask[i, : L - length] = 0
            attention_mask = attention_mask.to(device)
            positions = torch.tensor(lens, dtype=torch.long, device=device)[:, None]  # next position per row
            positions = positions.repeat_interleave(n, dim=0)  # (R, 1)
        generators = self._row_generators(params, B, n, device)
        seen = None
        if params.repetition_penalty != 1.0:
            seen = torch.zeros((B, cfg.vocab_size), dtype=torch.bool, device=device)
            for i, p in enumerate(prompts):  # per row, so left padding does not count as "seen"
                seen[i, torch.tensor(list(p), dtype=torch.long, device=device)] = True
            seen = seen.repeat_interleave(n, dim=0)  # (R, V)

        if params.logprobs:
            for res in results:
                res.logprobs = []
        stop_ids = set(params.stop_token_ids)
        active = [True] * R
        texts = [RowText(self.decode, params.stop_strings) for _ in range(R)]
        cache = self._get_cache(R, total)
        decoder = self._get_decoder()

        with torch.inference_mode():
            logits = self._prefill(idx, attention_mask, cache, n)  # (R, V)
        if attention_mask is not None:
            attention_mask = attention_mask.repeat_interleave(n, dim=0)  # (R, total)
        # Finished rows leave the decode batch (a step's products cost about their rows): batch row b
        # is result row batch_rows[b]; every per-row tensor and list below follows that order.
        batch_rows = list(range(R))
        for step in range(params.max_new_tokens):
            with torch.inference_mode():
                raw = logits
                if seen is not None:
                    logits = apply_repetition_penalty(logits, seen, params.repetition_penalty)
                next_ids = sample_next(logits, params, generators)  # (rows,)
                chosen_logprobs = [None] * len(batch_rows)
                if params.logprobs:
                    log_probs = torch.ops.aten._log_softmax.out(
                        raw.float(), -1, False, out=scratch("engine.logprobs", raw.shape, raw, torch.float32)
                    )
                    chosen_logprobs = log_probs.gather(1, next_ids[:, None])[:, 0].tolist()
                if seen is not None:
                    seen.scatter_(1, next_ids[:, None], True)
            last_step = step == params.max_new_tokens - 1
            sampled = next_ids.tolist()
            for b in sorted(range(len(batch_rows)), key=batch_rows.__getitem__):  # events in row order
                row, tok, logprob = batch_rows[b], sampled[b], chosen_logprobs[b]
                res = results[row]
                if tok in stop_ids:
                    active[row] = False
                    res.finish_reason, res.stop_token, res.stop_logprob = "stop", tok, logprob
                    yield TokenEvent(row, None, texts[row].flush(), "stop")
                    continue
                res.tokens.append(tok)
                if res.logprobs is not None:
                    res.logprobs.append(logprob)
                finish: FinishReason | None = "length" if last_step else None
                text, stopped = texts[row].push(tok, last=last_step)
                if stopped:
                    finish = "stop"
                if finish:
                    active[row] = False
                    res.finish_reason = finish
                yield TokenEvent(row, tok, text, finish, logprob)
            if not any(active):
                break
            live = [b for b, row in enumerate(batch_rows) if active[row]]
            if len(live) < len(batch_rows):
                with torch.inference_mode():
                    placed = cache.keep_rows(live)
                batch_rows = [batch_rows[b] for b in placed]
                keep = torch.tensor(placed, device=device)
                next_ids = next_ids[keep]
                if ragged:
                    attention_mask, positions = attention_mask[keep], positions[keep]
                if seen is not None:
                    seen = seen[keep]
                if generators is not None:
                    generators = [generators[b] for b in placed]
            with torch.inference_mode():
                pos = positions + step if ragged else None  # (rows, 1)
                if decoder is not None:
                    logits = decoder.step(
                        next_ids,
                        cache,
                        attention_mask=attention_mask,
                        position_ids=None if pos is None else pos[:, 0],
                    )
                else:
                    logits = model(
                        next_ids[:, None], cache=cache, attention_mask=attention_mask, position_ids=pos
                    )[:, -1]

    def _prefill(
        self, idx: torch.Tensor, attention_mask: torch.Tensor | None, cache: KVCache, n: int
    ) -> torch.Tensor:
        """Run the B prompts idx (B, L) once and leave their keys/values in every one of the cache's
        B * n rows (row j * n + i: prompt j); last-position logits (B * n, V)."""
        model = self.model
        if n == 1:
            return model(idx, cache=cache, attention_mask=attention_mask, logits_to_keep=1)[:, -1]
        B, L = idx.shape
        prompt_cache = KVCache(model.config, B, L, device=cache.k.device, dtype=cache.k.dtype)
        logits = model(idx, cache=prompt_cache, attention_mask=attention_mask, logits_to_keep=1)[:, -1]
        # Broadcast each prompt's keys/values into its group's n rows, in place (no (B*n, L) copy).
        for mine, theirs in ((cache.k, prompt_cache.k), (cache.v, prompt_cache.v)):
            mine.unflatten(1, (B, n))[:, :, :, :, :L] = theirs[:, :, None]
        cache.pos = L
        return logits.repeat_interleave(n, dim=0)

    @staticmethod
    def _row_generators(
        params: SamplingParams, n_prompts: int, n: int, device: torch.device
    ) -> list[torch.Generator] | None:
        """One generator per row, row j * n + i seeded with row_seed(seed, j, i) (None: greedy)."""
        if params.temperature == 0:
            return None
        seed = params.seed
        if seed is None:
            seed = torch.Generator().seed()  # a fresh nondeterministic base, then derived as usual
        return [
            torch.Generator(device=device).manual_seed(row_seed(seed, j, i))
            for j in range(n_prompts)
            for i in range(n)
        ]
