"""Continuous batching over the engine: requests join and leave the running batch at every step.

`Engine.generate` runs one fixed batch to the end. A server cannot wait for a batch to finish before
starting the next request, so the Scheduler keeps one running batch of rows (one row per sample of
a request) and at every step:

1. drops cancelled requests (a client went away), freeing their rows at once;
2. prefills waiting requests, up to `prefill_chunk` prompt tokens per step: the whole prompts that
   fit in one batched forward (right-padded, so no prompt token sees another's padding), a prompt
   longer than `prefill_chunk` alone, in chunks over several steps, so running rows keep decoding;
   a prefix the batch's prompts share (a chat system prompt) is computed once and kept for later
   requests (`prefix_entries` of them, least recently used dropped first); each prompt's keys and
   values are then copied into the n rows of its samples;
3. decodes one token for every running row in one batched forward (the packed decoder on CPU),
   every row at its own position: the SlotCache writes each row's key at that row's length, and a
   padding mask hides the rest;
4. samples per row with the row's own SamplingParams and its own random stream (row_seed(seed, 0,
   i) for sample i, as `Engine.generate`), so a request's tokens do not depend on its batch-mates;
   text and stop strings through the engine's RowText (incremental detokenization);
5. retires finished rows at once, moving the last row into the gap (the batch stays dense).

Admission is first come, first served, bounded by `max_rows` rows and a KV budget `kv_tokens`
(the sum over running requests of n * (prompt + max_new_tokens)).

    scheduler = Scheduler(engine, max_rows=32)
    handle = scheduler.submit(prompt_ids, params, n=2, on_event=print)   # RowEvent per token
    scheduler.start()       # a background thread steps while there is work
    handle.cancel()         # frees its rows at the next step
    scheduler.stop()
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from llmctl.errors import InputError
from llmctl.model.engine import (
    Engine,
    FinishReason,
    RowText,
    SamplingParams,
    apply_repetition_penalty,
    row_seed,
    sample_next,
)
from llmctl.model.transformer import KVCache

# A prefix shared by a step's prompts is computed apart (one more pass over the weights) only when
# that spares at least this many prompt tokens.
PREFIX_MIN_SAVED = 64


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading tokens `a` and `b` share."""
    n = min(len(a), len(b))
    return next((i for i in range(n) if a[i] != b[i]), n)


def start_from(cache: KVCache, prefix: KVCache, length: int) -> None:
    """Put the first `length` positions of `prefix`'s (one-row) keys and values into every row of
    `cache`, which then continues from there."""
    cache.k[:, :, :, :length] = prefix.k[:, :1, :, :length]
    cache.v[:, :, :, :length] = prefix.v[:, :1, :, :length]
    cache.pos = length


@dataclass(frozen=True)
class RowEvent:
    """One new token (or the end) of sample `index` of a request. `token` is None on the final event
    of a sample that stopped on a stop token id; `top_logprobs` are (id, log-prob) pairs, best first."""

    index: int
    token: int | None
    text: str
    finish_reason: FinishReason | None = None
    logprob: float | None = None
    top_logprobs: tuple[tuple[int, float], ...] = ()


class RequestHandle:
    """A submitted request: its events go to `on_event` (called on the scheduler's thread)."""

    def __init__(
        self,
        rid: int,
        prompt: list[int],
        params: SamplingParams,
        n: int,
        top_logprobs: int,
        on_event: Callable[[RowEvent | BaseException], None],
    ):
        self.id = rid
        self.prompt = prompt
        self.params = params
        self.n = n
        self.top_logprobs = top_logprobs
        self.on_event = on_event
        self.cancelled = False
        self.submitted_at = time.perf_counter()
        self.rows_left = n
        self.prefilled = 0  # prompt tokens already in its prefill cache
        self.prefill_cache: KVCache | None = None

    @property
    def kv_tokens(self) -> int:
        return self.n * (len(self.prompt) + self.params.max_new_tokens)

    def cancel(self) -> None:
        """Stop generating for this request; its rows are freed at the scheduler's next step."""
        self.cancelled = True


@dataclass
class _Row:
    request: RequestHandle
    index: int  # sample index within the request
    length: int  # tokens in the cache
    text: RowText
    generator: torch.Generator | None
    seen: torch.Tensor | None  # (V,) bool, for a repetition penalty
    pending: int = -1  # the sampled token not yet in the cache
    tokens: list[int] = field(default_factory=list)


class SlotCache:
    """KV cache rows for a running batch, each row at its own length: duck-types KVCache for
    Transformer.forward / PackedDecoder.step with one new token per row. `pos` is the longest row's
    length (the model attends over [0, pos]); `update` writes row r's key at `lengths[r]`."""

    def __init__(self, engine: Engine):
        p = next(engine.model.parameters())
        self.cfg, self.device, self.dtype = engine.model.config, p.device, p.dtype
        self.k = self.v = torch.empty(0)
        self.rows = 0
        self.pos = 0
        self._rows_idx = self._lens_idx = torch.empty(0, dtype=torch.long)
        self._reserve(1, 1)

    @property
    def capacity(self) -> tuple[int, int]:
        return self.k.shape[1], self.k.shape[3]

    def _reserve(self, rows: int, length: int) -> None:
        """Grow to at least `rows` rows of `length` positions (copying what is there)."""
        have_rows, have_len = self.capacity if self.k.dim() == 5 else (0, 0)
        if rows <= have_rows and length <= have_len:
            return
        # Only the short dimension grows (doubling, so growth costs O(1) per row or position): a new
        # row must not double the length too, or a burst of requests reaches max_seq_len positions.
        rows = have_rows if rows <= have_rows else max(rows, 2 * have_rows)
        length = have_len if length <= have_len else min(max(length, 2 * have_len, 64), self.cfg.max_seq_len)
        shape = (self.cfg.n_layer, rows, self.cfg.n_kv_head, length, self.cfg.head_dim)
        with torch.inference_mode():
            k = torch.zeros(shape, device=self.device, dtype=self.dtype)
            v = torch.zeros(shape, device=self.device, dtype=self.dtype)
            if self.rows:
                k[:, : self.rows, :, :have_len] = self.k[:, : self.rows]
                v[:, : self.rows, :, :have_len] = self.v[:, : self.rows]
        self.k, self.v = k, v

    def add(self, source: KVCache, row: int, length: int, copies: int) -> None:
        """Append `copies` rows holding the first `length` positions of `source`'s row `row`."""
        self._reserve(self.rows + copies, length + 1)
        end = self.rows + copies
        self.k[:, self.rows : end, :, :length] = source.k[:, row : row + 1, :, :length]
        self.v[:, self.rows : end, :, :length] = source.v[:, row : row + 1, :, :length]
        self.rows = end

    def move(self, src: int, dst: int, length: int) -> None:
        self.k[:, dst, :, :length] = self.k[:, src, :, :length]
        self.v[:, dst, :, :length] = self.v[:, src, :, :length]

    def prepare(self, lengths: torch.Tensor) -> None:
        """Before a decode step: row r's new token goes at lengths[r]."""
        assert lengths.shape == (self.rows,), (lengths.shape, self.rows)
        self.pos = int(lengths.max())
        self._reserve(self.rows, self.pos + 1)
        self._rows_idx = torch.arange(self.rows, device=self.device)
        self._lens_idx = lengths

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (rows, n_kv_head, 1, hd) at each row's own position; keys/values up to pos."""
        assert k.shape[0] == self.rows and k.shape[2] == 1, (k.shape, self.rows)
        end = self.pos + 1
        self.k[layer][self._rows_idx, :, self._lens_idx] = k[:, :, 0]
        self.v[layer][self._rows_idx, :, self._lens_idx] = v[:, :, 0]
        return self.k[layer, : self.rows, :, :end], self.v[layer, : self.rows, :, :end]


@dataclass
class SchedulerStats:
    """What /metrics reports: a snapshot, read without locking (ints and floats)."""

    waiting: int = 0
    running_rows: int = 0
    steps: int = 0
    prompt_tokens: int = 0
    generated_tokens: int = 0


class Scheduler:
    """Continuous batching over `engine` (its model, packed decoder, tokenizer and sampling code)."""

    def __init__(
        self,
        engine: Engine,
        *,
        max_rows: int = 32,
        kv_tokens: int | None = None,
        prefill_chunk: int = 512,
        prefix_entries: int = 8,
    ):
        """`prefix_entries`: how many shared prompt prefixes to keep (their keys and values) for
        later requests; 0 computes every prompt whole."""
        assert max_rows >= 1 and prefill_chunk >= 1 and prefix_entries >= 0, (max_rows, prefill_chunk)
        self.engine = engine
        self.model = engine.model
        self.max_seq_len = engine.model.config.max_seq_len
        self.max_rows = max_rows
        self.kv_tokens = kv_tokens if kv_tokens is not None else max_rows * self.max_seq_len
        self.prefill_chunk = prefill_chunk
        self.prefix_entries = prefix_entries
        self._prefixes: OrderedDict[tuple[int, ...], KVCache] = OrderedDict()  # least recent first
        self.stats = SchedulerStats()
        self._waiting: deque[RequestHandle] = deque()
        self._prefilling: RequestHandle | None = None  # a prompt part-way through chunked prefill
        self._rows: list[_Row] = []
        self._kv_used = 0
        self._ids = itertools.count()
        self._cv = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.cache = SlotCache(engine)

    # ---- the caller's side (any thread) ----

    def check(self, prompt: Sequence[int], params: SamplingParams, n: int = 1) -> None:
        """Raise InputError for a request this scheduler can never run."""
        if not prompt:
            raise InputError("the prompt is empty")
        if len(prompt) + params.max_new_tokens > self.max_seq_len:
            raise InputError(
                f"prompt ({len(prompt)} tokens) + max_new_tokens ({params.max_new_tokens}) exceeds the "
                f"model's context of {self.max_seq_len} tokens"
            )
        if n > self.max_rows:
            raise InputError(f"n ({n}) is more than the {self.max_rows} rows the server runs at once")
        if n * (len(prompt) + params.max_new_tokens) > self.kv_tokens:
            raise InputError(
                f"n * (prompt + max_new_tokens) exceeds the KV budget of {self.kv_tokens} tokens"
            )
        if params.stop_strings and self.engine.decode is None:
            raise InputError("stop strings need a tokenizer")

    def submit(
        self,
        prompt: Sequence[int],
        params: SamplingParams,
        *,
        n: int = 1,
        top_logprobs: int = 0,
        on_event: Callable[[RowEvent | BaseException], None],
    ) -> RequestHandle:
        """Queue a request; `on_event` gets each RowEvent (or the exception that ended the scheduler)."""
        self.check(prompt, params, n)
        handle = RequestHandle(next(self._ids), list(prompt), params, n, top_logprobs, on_event)
        with self._cv:
            self._waiting.append(handle)
            self.stats.waiting = len(self._waiting)
            self._cv.notify()
        return handle

    def start(self) -> None:
        """Step on a background thread while there is work (the decoder's layouts built first)."""
        decoder = self.engine._get_decoder()
        if decoder is not None:
            decoder.prepare(self.max_rows)
        self._thread = threading.Thread(target=self._loop, name="llmctl-scheduler", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self._cv:
            self._stopping = True
            self._cv.notify()
        if self._thread is not None:
            self._thread.join()

    @property
    def queue_length(self) -> int:
        """Requests submitted and not yet decoding (waiting, or part-way through their prefill)."""
        return len(self._waiting) + (self._prefilling is not None)

    @property
    def busy(self) -> bool:
        return bool(self._waiting or self._rows or self._prefilling)

    def _loop(self) -> None:
        torch.set_grad_enabled(False)
        while True:
            with self._cv:
                while not self._stopping and not self.busy:
                    self._cv.wait()
                if self._stopping:
                    return
            try:
                self.step()
            except BaseException as exc:  # fail every request loudly rather than hang its client
                self._fail_all(exc)

    def _fail_all(self, exc: BaseException) -> None:
        with self._cv:
            handles = {id(r.request): r.request for r in self._rows}
            handles.update({id(h): h for h in self._waiting})
            if self._prefilling is not None:
                handles[id(self._prefilling)] = self._prefilling
            self._waiting.clear()
            self._rows, self._prefilling, self._kv_used = [], None, 0
            self.cache.rows = 0
        for h in handles.values():
            h.on_event(exc)

    # ---- one step (the scheduler's thread, or a caller driving it directly) ----

    def step(self) -> None:
        """Drop cancelled work, prefill what fits, decode one token for every running row."""
        with torch.inference_mode():
            self._drop_cancelled()
            self._prefill()
            if self._rows:
                self._decode()
        self.stats.steps += 1
        self.stats.running_rows = len(self._rows)
        self.stats.waiting = len(self._waiting) + (self._prefilling is not None)

    def _drop_cancelled(self) -> None:
        with self._cv:
            self._waiting = deque(h for h in self._waiting if not h.cancelled)
        if self._prefilling is not None and self._prefilling.cancelled:
            self._release(self._prefilling)
            self._prefilling = None
        for r in [r for r in self._rows if r.request.cancelled]:
            self._retire(r)

    def _next_to_prefill(self, reserved_rows: int = 0) -> RequestHandle | None:
        """The request to prefill: the one part-way through, else the head of the queue if it fits
        beside the running rows and `reserved_rows` (rows of prompts prefilled in this step)."""
        if self._prefilling is not None:
            return self._prefilling
        with self._cv:
            if not self._waiting:
                return None
            head = self._waiting[0]
            fits = (
                len(self._rows) + reserved_rows + head.n <= self.max_rows
                and self._kv_used + head.kv_tokens <= self.kv_tokens
            )
            if not fits:
                return None
            self._waiting.popleft()
        self._kv_used += head.kv_tokens
        return head

    def _prefill(self) -> None:
        """Up to `prefill_chunk` prompt tokens this step: whole prompts that fit go through one
        batched forward together; a longer prompt goes alone, a chunk a step."""
        budget = self.prefill_chunk
        whole: list[RequestHandle] = []
        while budget > 0:
            req = self._next_to_prefill(sum(r.n for r in whole))
            if req is None:
                break
            self._prefilling = req
            # Chunks start at multiples of prefill_chunk whatever else runs in the step, so how a
            # prompt is cut (and so its logits' rounding) depends on the prompt alone.
            take = min(len(req.prompt) - req.prefilled, self.prefill_chunk)
            is_whole = req.prefilled == 0 and take == len(req.prompt)
            cost = take - self._reusable(req.prompt, whole) if is_whole else take
            if cost > budget:
                break
            budget -= cost
            if is_whole:
                self._prefilling = None
                whole.append(req)
                continue
            if req.prefill_cache is None:
                req.prefill_cache = KVCache(
                    self.model.config, 1, len(req.prompt), device=self.cache.device, dtype=self.cache.dtype
                )
            chunk = req.prompt[req.prefilled : req.prefilled + take]
            idx = torch.tensor([chunk], dtype=torch.long, device=self.cache.device)
            logits = self.model(idx, cache=req.prefill_cache, logits_to_keep=1)[:, -1]  # (1, V)
            req.prefilled += len(chunk)
            if req.prefilled < len(req.prompt):
                break  # the rest in the next steps, between decode steps
            self._prefilling = None
            self.stats.prompt_tokens += len(req.prompt)
            self._start_rows(req, req.prefill_cache, 0, logits)
            req.prefill_cache = None
        if whole:
            self._prefill_together(whole)

    def _reusable(self, prompt: list[int], batch: list[RequestHandle]) -> int:
        """About how many of `prompt`'s tokens need no computing when it joins `batch` (whole
        prompts prefilled in this step): a kept prefix, or what it shares with the batch's first
        prompt (which computes it), so a step's budget counts the tokens it really computes."""
        if not self.prefix_entries:
            return 0
        kept = len(self._longest_kept(prompt[:-1]))
        if not batch:
            return kept
        return max(kept, common_prefix(prompt[:-1], batch[0].prompt[:-1]))

    def _longest_kept(self, tokens: Sequence[int]) -> tuple[int, ...]:
        """The longest kept prefix that `tokens` starts with (() if none)."""
        return max((k for k in self._prefixes if tuple(tokens[: len(k)]) == k), key=len, default=())

    def _prefill_together(self, reqs: list[RequestHandle]) -> None:
        """Whole prompts in one forward, right-padded: causal attention keeps every prompt token
        from seeing the padding after it, so each row's keys and values are its prompt's alone.
        One forward of many rows reads the weights once (16 chat prompts of ~45 tokens: 1.6 s
        together against 3.1 s one by one, SmolLM2-135M on one thread). A prefix all the prompts
        share (a system prompt) is computed once, or taken from earlier steps (_shared_prefix)."""
        device, cfg = self.cache.device, self.model.config
        shared, prefix = self._shared_prefix([r.prompt for r in reqs])
        P = len(shared)
        lengths = [len(r.prompt) - P for r in reqs]  # each >= 1: the last token's logits are needed
        idx = torch.zeros((len(reqs), max(lengths)), dtype=torch.long)
        for i, req in enumerate(reqs):
            idx[i, : lengths[i]] = torch.tensor(req.prompt[P:], dtype=torch.long)
        cache = KVCache(cfg, len(reqs), P + max(lengths), device=device, dtype=self.cache.dtype)
        if prefix is not None:  # every row starts with the shared prefix's keys and values
            start_from(cache, prefix, P)
        hidden = self.model(idx.to(device), cache=cache, return_hidden=True)  # (B, T, n_embd)
        last = torch.tensor(lengths, device=device) - 1
        logits = self.model.lm_head(hidden[torch.arange(len(reqs), device=device), last])  # (B, V)
        for i, req in enumerate(reqs):
            self.stats.prompt_tokens += len(req.prompt)
            self._start_rows(req, cache, i, logits[i : i + 1])

    def _shared_prefix(self, prompts: list[list[int]]) -> tuple[tuple[int, ...], KVCache | None]:
        """The prefix of every prompt whose keys and values need not be computed per prompt, and
        a one-row cache holding them: the longest prefix kept from an earlier step; or, for
        several prompts whose common prefix spares at least PREFIX_MIN_SAVED tokens, that common
        prefix, computed once (from a kept one) and kept. Chat traffic shares its system prompt and
        template tokens; vLLM and SGLang cache prefixes the same way. ((), None): nothing shared."""
        if not self.prefix_entries:
            return (), None
        head = tuple(prompts[0][:-1])  # at least one token of each prompt is computed
        for p in prompts[1:]:
            head = head[: common_prefix(head, p[:-1])]
        common = len(head)
        kept = self._longest_kept(head)
        if (len(prompts) - 1) * (common - len(kept)) < PREFIX_MIN_SAVED:
            if not kept:
                return (), None
            self._prefixes.move_to_end(kept)
            return kept, self._prefixes[kept]
        cache = KVCache(self.model.config, 1, common, device=self.cache.device, dtype=self.cache.dtype)
        if kept:
            start_from(cache, self._prefixes[kept], len(kept))
        rest = torch.tensor([head[len(kept) :]], dtype=torch.long, device=self.cache.device)
        self.model(rest, cache=cache, return_hidden=True)
        self._prefixes[head] = cache
        while len(self._prefixes) > self.prefix_entries:
            self._prefixes.popitem(last=False)  # the least recently used
        return head, cache

    def _start_rows(self, req: RequestHandle, prompt_cache: KVCache, row: int, logits: torch.Tensor) -> None:
        """The request's n rows: its prompt's KV (row `row` of `prompt_cache`) copied in, first
        tokens sampled from `logits` (1, V)."""
        params, device, P = req.params, self.cache.device, len(req.prompt)
        seed = params.seed if params.seed is not None else torch.Generator().seed()
        first = len(self._rows)
        for i in range(req.n):
            generator = None
            if params.temperature > 0:
                generator = torch.Generator(device=device).manual_seed(row_seed(seed, 0, i))
            seen = None
            if params.repetition_penalty != 1.0:
                seen = torch.zeros(self.model.config.vocab_size, dtype=torch.bool, device=device)
                seen[torch.tensor(req.prompt, device=device)] = True
            text = RowText(self.engine.decode, params.stop_strings)
            self._rows.append(_Row(req, i, P, text, generator, seen))
        self.cache.add(prompt_cache, row, P, req.n)
        self._sample_and_emit(list(range(first, len(self._rows))), logits.expand(req.n, -1))

    def _decode(self) -> None:
        rows, device = self._rows, self.cache.device
        lengths = torch.tensor([r.length for r in rows], dtype=torch.long, device=device)
        self.cache.prepare(lengths)
        ids = torch.tensor([r.pending for r in rows], dtype=torch.long, device=device)
        mask = torch.arange(self.cache.pos + 1, device=device)[None, :] <= lengths[:, None]  # (B, S)
        decoder = self.engine._get_decoder()
        if decoder is not None:
            logits = decoder.step(ids, self.cache, attention_mask=mask, position_ids=lengths)
        else:
            logits = self.model(
                ids[:, None], cache=self.cache, attention_mask=mask, position_ids=lengths[:, None]
            )
            logits = logits[:, -1]
        for r in rows:
            r.length += 1
        self._sample_and_emit(list(range(len(rows))), logits)

    def _sample_and_emit(self, positions: list[int], logits: torch.Tensor) -> None:
        """Sample the next token of the rows at `positions` (logits (len(positions), V)), emit
        events, retire finished rows."""
        rows = [self._rows[p] for p in positions]
        raw = logits
        if any(r.seen is not None for r in rows):
            logits = logits.clone()
            for j, r in enumerate(rows):
                if r.seen is not None:
                    logits[j] = apply_repetition_penalty(
                        logits[j], r.seen, r.request.params.repetition_penalty
                    )
        next_ids = self._sample(logits, rows)
        want_logprobs = any(r.request.params.logprobs for r in rows)
        chosen: list[float | None] = [None] * len(rows)
        tops: list[tuple[tuple[int, float], ...]] = [()] * len(rows)
        if want_logprobs:
            log_probs = torch.log_softmax(raw.float(), dim=-1)
            chosen = log_probs.gather(1, next_ids[:, None])[:, 0].tolist()
            k = max(r.request.top_logprobs for r in rows)
            if k:
                values, indices = log_probs.topk(k, dim=-1)
                pairs = [
                    list(zip(i, v, strict=True))
                    for i, v in zip(indices.tolist(), values.tolist(), strict=True)
                ]
                tops = [tuple(p[: r.request.top_logprobs]) for p, r in zip(pairs, rows, strict=True)]
        finished: list[_Row] = []
        for j, (r, tok) in enumerate(zip(rows, next_ids.tolist(), strict=True)):
            params = r.request.params
            logprob = chosen[j] if params.logprobs else None
            top = tops[j] if params.logprobs else ()
            if r.seen is not None:
                r.seen[tok] = True
            if tok in params.stop_token_ids:
                r.request.on_event(RowEvent(r.index, None, r.text.flush(), "stop", logprob, top))
                finished.append(r)
                continue
            r.tokens.append(tok)
            self.stats.generated_tokens += 1
            last = len(r.tokens) == params.max_new_tokens
            text, stopped = r.text.push(tok, last=last)
            finish: FinishReason | None = "stop" if stopped else "length" if last else None
            r.request.on_event(RowEvent(r.index, tok, text, finish, logprob, top))
            if finish:
                finished.append(r)
            else:
                r.pending = tok
        for r in finished:
            self._retire(r)

    @staticmethod
    def _sample(logits: torch.Tensor, rows: list[_Row]) -> torch.Tensor:
        """Each row with its own params and generator; rows sharing the same truncation settings in
        one call (sample_next draws per row from the row's own generator, so grouping is exact)."""
        ids = torch.empty(len(rows), dtype=torch.long, device=logits.device)
        groups: dict[tuple, list[int]] = {}
        for j, r in enumerate(rows):
            p = r.request.params
            key = (0.0, 0, 1.0) if p.temperature == 0 else (p.temperature, p.top_k, p.top_p)
            groups.setdefault(key, []).append(j)
        for key, members in groups.items():
            params = rows[members[0]].request.params
            generators = None if key[0] == 0 else [rows[j].generator for j in members]
            index = torch.tensor(members, device=logits.device)
            ids[index] = sample_next(logits[index], params, generators)
        return ids

    def _retire(self, row: _Row) -> None:
        """Free the row's slot now: the last row moves into it, so the batch stays dense."""
        at = self._rows.index(row)
        last = len(self._rows) - 1
        if at != last:
            moved = self._rows[last]
            self.cache.move(last, at, moved.length)
            self._rows[at] = moved
        self._rows.pop()
        self.cache.rows = len(self._rows)
        req = row.request
        req.rows_left -= 1
        if req.rows_left == 0:
            self._release(req)

    def _release(self, req: RequestHandle) -> None:
        """Return a request's KV budget (once)."""
        if req.kv_tokens and req.rows_left >= 0:
            self._kv_used -= req.kv_tokens
            req.rows_left = -1
