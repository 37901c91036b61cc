"""Rollouts for GRPO: sample G completions per prompt with the policy, score them, and serve them to
the training loop as micro-batches with their advantages and old (and reference) log-probs.

    source = RolloutSource(policy, tok, prompts, reward, cfg, info, run_dir=..., reference=ref_model)
    batch = source.next_batch()       # a RolloutBatch; a new rollout every num_iterations passes
    source.pop_stats()                # reward, pass@1/pass@G, lengths, timing of the last rollout

Each rollout takes this process's share of `prompts_per_step` prompts (a seeded order per epoch,
llmctl.train.sampler), generates G completions of each from one prefill (llmctl.model.engine, its
packed decode weights rebuilt when the policy changed), and scores them (llmctl.rl.verifiers).
Completions keep their end-of-turn token (the model must learn to stop). The old log-probs are the
engine's log-probs of the sampled tokens; the reference's come from a forward of the frozen starting
model (beta > 0 only). Sampling seeds derive from (seed, rollout index, rank), so a run resumed at a
rollout boundary samples what the uninterrupted run did; with num_iterations > 1 the rollout being
optimised is also saved in the run folder, so a resume between its passes reuses it.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from llmctl.config.grpo import GrpoConfig
from llmctl.model.engine import Engine, SamplingParams
from llmctl.model.transformer import IGNORE_INDEX
from llmctl.rl.grpo_loss import group_advantages
from llmctl.rl.prompts import PromptRecord
from llmctl.train import distributed as D
from llmctl.train.sampler import ShuffledRows
from llmctl.train.shared_prompt import pack_shared_prompts

BUFFER_FILE = "rollout_buffer.pt"
SAMPLES_FILE = "samples.jsonl"


@dataclass
class RolloutBatch:
    """Completions with their prompts, in rows where a group's completions share one copy of their
    prompt (llmctl.train.shared_prompt), and what the loss needs at each completion token."""

    input_ids: torch.Tensor  # (B, T)
    targets: torch.Tensor  # (B, T) next-token ids on completion positions, -100 elsewhere
    old_logps: torch.Tensor  # (B, T) the rollout's log-probs at those positions, 0 elsewhere
    ref_logps: torch.Tensor | None  # (B, T) the reference's, with beta > 0
    advantages: torch.Tensor  # (S,) one per completion
    completion_of: torch.Tensor  # (B, T) the completion (index into advantages) of each target, -1 elsewhere
    n_real: int  # positions holding a token
    # Rows holding several completions need their block mask and positions; None for one per row.
    attention_mask: torch.Tensor | None = None  # (B, 1, T, T) bool
    position_ids: torch.Tensor | None = None  # (B, T)

    @property
    def mask(self) -> torch.Tensor:
        return self.targets != IGNORE_INDEX

    def model_inputs(self) -> dict[str, torch.Tensor]:
        """The keyword arguments a forward over these rows needs besides ids and targets."""
        if self.attention_mask is None:
            return {}
        return {"attention_mask": self.attention_mask, "position_ids": self.position_ids}

    def to(self, device: torch.device | str) -> RolloutBatch:
        move = lambda t: None if t is None else t.to(device, non_blocking=True)  # noqa: E731
        return RolloutBatch(
            move(self.input_ids),
            move(self.targets),
            move(self.old_logps),
            move(self.ref_logps),
            move(self.advantages),
            move(self.completion_of),
            self.n_real,
            move(self.attention_mask),
            move(self.position_ids),
        )


def rollout_seed(seed: int, rollout: int, rank: int) -> int:
    return (seed * 1_000_003 + rollout * 7919 + rank) % (2**62)


def completion_tokens(completion: Any) -> tuple[list[int], list[float]]:
    """The sampled tokens with the stop token that ended them (the model must learn to stop), and
    their log-probs."""
    tokens, logps = list(completion.tokens), list(completion.logprobs or [0.0] * len(completion.tokens))
    stop = getattr(completion, "stop_token", None)
    if completion.finish_reason == "stop" and stop is not None:
        tokens.append(stop)
        logps.append(float(getattr(completion, "stop_logprob", 0.0) or 0.0))
    return tokens, logps


def collate_rollout(
    prompts: list[list[int]],
    completions: list[tuple[list[int], list[float]]],
    advantages: torch.Tensor,
    pad_id: int,
    groups: Sequence[int] | None = None,
) -> RolloutBatch:
    """Rows of completions after their prompts, targets on completion positions. Consecutive
    completions with the same `groups` key (samples of one prompt) share a row and one copy of the
    prompt; without `groups`, each completion has a row `prompt + completion` of its own."""
    keys = list(groups) if groups is not None else list(range(len(prompts)))
    members: list[list[int]] = []  # completion indices of each row
    for s, key in enumerate(keys):
        if members and keys[members[-1][0]] == key:
            members[-1].append(s)
        else:
            members.append([s])
    rows = pack_shared_prompts(
        [(prompts[idx[0]], [completions[s][0] for s in idx]) for idx in members], pad_id
    )
    old = torch.zeros(rows.targets.shape, dtype=torch.float32)
    completion_of = torch.full(rows.targets.shape, -1, dtype=torch.long)
    for b, idx in enumerate(members):
        for k, s in enumerate(idx, 1):
            at = (rows.segments[b] == k) & (rows.targets[b] != IGNORE_INDEX)
            old[b, at] = torch.tensor(completions[s][1], dtype=torch.float32)
            completion_of[b, at] = s
    shared = any(len(idx) > 1 for idx in members)
    return RolloutBatch(
        rows.input_ids,
        rows.targets,
        old,
        None,
        advantages.float(),
        completion_of,
        rows.n_real,
        rows.attention_mask if shared else None,
        rows.position_ids if shared else None,
    )


class RolloutSource:
    def __init__(
        self,
        policy: torch.nn.Module,
        tok: Any,
        prompts: list[PromptRecord],
        reward: Any,
        cfg: GrpoConfig,
        info: D.DistInfo,
        *,
        run_dir: Path,
        pad_id: int,
        reference: torch.nn.Module | None = None,
    ):
        self.policy, self.tok, self.prompts, self.reward, self.cfg, self.info = (
            policy,
            tok,
            prompts,
            reward,
            cfg,
            info,
        )
        self.run_dir, self.pad_id, self.reference = Path(run_dir), pad_id, reference
        self.per_rank = cfg.prompts_per_step // info.world_size
        self.order = ShuffledRows(
            len(prompts),
            micro_batch_size=self.per_rank,
            seed=cfg.seed,
            info=info,
            collate=lambda picked: picked,
        )
        self.engine = Engine(policy, tok.tokenizer)
        self.prompt_ids = [list(tok.encode_chat(p.prompt)) for p in prompts]
        self.rollouts = 0  # rollouts made so far
        self.passes = 0  # passes over the current rollout
        self.position = 0  # micro-batches of the current pass served
        self.buffer: list[RolloutBatch] = []
        self._stats: dict[str, float] = {}
        self.group = cfg.num_generations
        self.completions_per_rank = self.per_rank * self.group

    # -- the training loop's interface

    def next_batch(self) -> RolloutBatch:
        if not self.buffer or (
            self.position >= len(self.buffer) and self.passes + 1 >= self.cfg.num_iterations
        ):
            self._rollout()
        elif self.position >= len(self.buffer):
            self.passes, self.position = self.passes + 1, 0
        batch = self.buffer[self.position]
        self.position += 1
        return batch

    def pop_stats(self) -> dict[str, float]:
        stats, self._stats = self._stats, {}
        return stats

    def state_dict(self) -> dict[str, Any]:
        return {
            "order": self.order.state_dict(),
            "rollouts": self.rollouts,
            "passes": self.passes,
            "position": self.position,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.order.load_state_dict(state["order"])
        self.rollouts, self.passes, self.position = (
            int(state["rollouts"]),
            int(state["passes"]),
            int(state["position"]),
        )
        self.buffer = []
        if self.position and self.cfg.num_iterations > 1:  # between passes over a saved rollout
            saved = torch.load(self._buffer_path(), weights_only=False)
            if saved["rollouts"] == self.rollouts:
                self.buffer = saved["batches"]
        if not self.buffer:  # resume at a rollout boundary: the next call makes the next rollout
            self.passes = self.position = 0
            self.buffer = []

    # -- making a rollout

    def _buffer_path(self) -> Path:
        return self.run_dir / (
            BUFFER_FILE if self.info.world_size == 1 else f"rank{self.info.rank}_{BUFFER_FILE}"
        )

    def _rollout(self) -> None:
        cfg, info, G = self.cfg, self.info, self.group
        t0 = time.perf_counter()
        picked = self.order.next_batch()
        params = SamplingParams(
            max_new_tokens=cfg.rollout.max_new_tokens,
            temperature=cfg.rollout.temperature,
            top_p=cfg.rollout.top_p,
            top_k=cfg.rollout.top_k,
            stop_token_ids=tuple(self.tok.stop_ids),
            seed=rollout_seed(cfg.seed, self.rollouts, info.rank),
            logprobs=True,
        )
        was_training = self.policy.training
        self.policy.eval()
        outs = self.engine.generate([self.prompt_ids[i] for i in picked], params, n=G)
        self.policy.train(was_training)
        generated = time.perf_counter() - t0
        records = [self.prompts[i] for i in picked for _ in range(G)]
        texts = [o.text or "" for o in outs]
        results = self.reward.score([r.record for r in records], texts, [r.id for r in records])
        rewards = torch.tensor([r.total for r in results], dtype=torch.float64)
        advantages, zero_std = group_advantages(rewards, G, cfg.scale_rewards)
        completions = [completion_tokens(o) for o in outs]
        prompts = [self.prompt_ids[i] for i in picked for _ in range(G)]
        keep = list(range(len(outs)))
        if cfg.drop_zero_variance:
            keep = [k for k in keep if not bool(zero_std[k])]
        self.buffer = self._batches(keep, prompts, completions, advantages)
        self.rollouts, self.passes, self.position = self.rollouts + 1, 0, 0
        if cfg.num_iterations > 1:
            torch.save({"rollouts": self.rollouts, "batches": self.buffer}, self._buffer_path())
        self._stats = self._rollout_stats(
            results, rewards, zero_std, outs, completions, generated, time.perf_counter() - t0
        )
        if info.is_main and cfg.samples_every and (self.rollouts - 1) % cfg.samples_every == 0:
            self._write_samples(records[:G], texts[:G], results[:G])

    def _batches(self, keep, prompts, completions, advantages) -> list[RolloutBatch]:
        """This process's kept completions in micro-batches. Every process serves the same number of
        micro-batches per pass (the loop's grad_accum) whatever groups were dropped: a micro-batch
        left without completions holds one row with no completion token, which adds no loss and no
        units."""
        micro = self.cfg.micro_batch_size
        n_batches = math.ceil(self.completions_per_rank / micro)
        per_batch = math.ceil(len(keep) / n_batches) if keep else 0
        out = []
        for b in range(n_batches):
            rows = keep[b * per_batch : (b + 1) * per_batch]
            if rows:
                batch = collate_rollout(
                    [prompts[k] for k in rows],
                    [completions[k] for k in rows],
                    advantages[rows],
                    self.pad_id,
                    groups=[k // self.group for k in rows],  # samples of a prompt share its row
                )
            else:
                batch = collate_rollout([prompts[0]], [([], [])], torch.zeros(1), self.pad_id)
            if self.reference is not None:
                batch.ref_logps = self._reference_logps(batch)
            out.append(batch)
        return out

    @torch.no_grad()
    def _reference_logps(self, batch: RolloutBatch) -> torch.Tensor:
        device = next(self.reference.parameters()).device
        b = batch.to(device)
        return (-self.reference(b.input_ids, b.targets, reduction="none", **b.model_inputs())).float().cpu()

    def _rollout_stats(
        self, results, rewards, zero_std, outs, completions, generated_s, total_s
    ) -> dict[str, float]:
        """Rollout metrics over every process: sums and counts reduced once, then divided."""
        G = self.group
        best = sum(v.weight for v in self.reward.verifiers if v.weight > 0)  # every verifier satisfied
        passed = (rewards >= best - 1e-9).double()
        lengths = torch.tensor([len(c) for c, _ in completions], dtype=torch.float64)
        names = list(results[0].parts) if results else []
        values = [
            rewards.sum(),
            (rewards**2).sum(),
            passed.sum(),
            passed.view(-1, G).amax(dim=1).sum(),  # groups with a pass
            lengths.sum(),
            torch.tensor(sum(o.finish_reason == "length" for o in outs), dtype=torch.float64),
            zero_std.double().view(-1, G)[:, 0].sum(),
            torch.tensor(float(len(outs))),
            torch.tensor(float(len(outs) // G)),
            torch.tensor(generated_s),
            torch.tensor(total_s),
            *[torch.tensor(sum(r.parts.get(n, 0.0) for r in results), dtype=torch.float64) for n in names],
            torch.tensor(float(sum(bool(r.errors) for r in results))),
        ]
        sums = torch.stack(values).to(self.info.device)
        longest = lengths.max().to(self.info.device).reshape(1) if len(lengths) else torch.zeros(1)
        D.all_reduce(sums)
        if self.info.distributed:
            torch.distributed.all_reduce(longest, op=torch.distributed.ReduceOp.MAX)
        s = sums.tolist()
        n, groups = s[7], s[8]
        mean = s[0] / n
        seconds = s[9] / self.info.world_size
        stats = {
            "reward": mean,
            "reward_std": math.sqrt(max(0.0, s[1] / n - mean * mean)),
            "pass@1": s[2] / n,
            f"pass@{G}": s[3] / groups,
            "completion_len": s[4] / n,
            "completion_len_max": float(longest[0]),
            "truncated": s[5] / n,
            "zero_std_groups": s[6] / groups,
            "rollout_s": round(seconds, 3),
            "rollout_tok_s": round(s[4] / seconds, 1) if seconds else 0.0,
            "verifier_errors": s[-1],
        }
        stats.update((f"rewards/{name}", s[11 + k] / n) for k, name in enumerate(names))
        return stats

    def _write_samples(self, records, texts, results) -> None:
        with open(self.run_dir / SAMPLES_FILE, "a", encoding="utf-8") as f:
            for record, text, result in zip(records, texts, results, strict=True):
                row = {
                    "rollout": self.rollouts,
                    "id": record.id,
                    "prompt": record.prompt,
                    "completion": text,
                    "reward": result.total,
                    "parts": result.parts,
                    **({"errors": result.errors} if result.errors else {}),
                }
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
