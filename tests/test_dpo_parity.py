"""Preference losses against TRL's own code on the same tiny HF-Llama models and token ids.

Reference = a random llama folder; policy = its weights perturbed (so log-ratios and rewards are not 0).
Our side: every pair in one batch of shared-prompt rows (collate_pairs + completion_logps on our
Transformer), then preference_loss. TRL side, one pair per call so per-example values are visible:

- sigmoid, robust (eps 0.1), ipo: DPOTrainer._compute_loss on LlamaForCausalLM with a reference model,
  inputs from its DataCollatorForPreference; per-example values read from `trainer._metrics`;
- cDPO (sigmoid with label smoothing): TRL 1.16's DPOTrainer applies label smoothing only to
  robust/exo_pair/aot, so the reference is CPOTrainer.cpo_loss (sigmoid), which is DPO's loss with the
  reference log-probs set to 0: it reads only its two inputs' difference. Given the per-completion
  log-ratios (policy - reference) that DPOTrainer computes, it returns -(1-eps) log s(beta D) -
  eps log s(-beta D) with D the DPO margin, and rewards beta * log-ratio: cDPO as TRL's DPOTrainer
  defined it before 1.x. With eps = 0 the same route reproduces DPOTrainer's sigmoid loss (checked);
- simpo: CPOTrainer (cpo_alpha 0) concatenated_forward (mean log-probs) + cpo_loss.

Tolerance: 1e-5, absolute for values below 1 and relative above (see assert_close). Observed (the
float32 rounding of two different kernels): summed log-probs <= 4e-6 abs (1.4e-7 rel); rewards
<= 8e-7 abs; sigmoid/robust losses <= 4e-7 abs; IPO losses (22..53) 2.3e-5 abs, 7e-7 rel; SimPO
losses <= 2.5e-6 abs.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from conftest import write_random_model_folder

from llmctl.model.checkpoint import load_model_folder, read_model_config, save_model_folder
from llmctl.train.preference import PairExample, collate_pairs, completion_logps, preference_loss

trl = pytest.importorskip("trl")  # a dev dependency
datasets = pytest.importorskip("datasets")
from transformers import AutoTokenizer, LlamaForCausalLM  # noqa: E402
from trl.experimental.cpo import CPOConfig, CPOTrainer  # noqa: E402

BETA = 0.1
# Different prompt lengths (1 token included), 1-token completions, unequal chosen/rejected lengths.
PAIRS = [
    PairExample(prompt=[17, 240, 33, 98, 411], chosen=[52, 7, 300, 91], rejected=[64, 128, 9, 201, 77, 15]),
    PairExample(prompt=[305], chosen=[44, 21, 460], rejected=[12, 99]),
    PairExample(prompt=[8, 19, 250, 73, 401, 66, 5, 333], chosen=[120], rejected=[480, 23, 61]),
    PairExample(prompt=[210, 47, 3], chosen=[70, 310, 88, 4, 150, 260, 11], rejected=[395]),
]
TOL = 1e-5


def assert_close(ours: torch.Tensor, theirs, *, what: str) -> None:
    """|ours - theirs| <= 1e-5 * max(1, |theirs|): absolute below 1, relative above (summed log-probs
    and IPO's squared loss reach 10-50, where float32 rounding alone is ~1e-6 relative)."""
    theirs = torch.as_tensor(theirs, dtype=torch.float64)
    diff = (ours.double() - theirs).abs()
    assert bool((diff <= TOL * theirs.abs().clamp_min(1.0)).all()), (
        f"{what}: ours {ours.tolist()} vs TRL {theirs.tolist()} (max diff {diff.max().item():.2e})"
    )


# ---- models ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> tuple[Path, Path]:
    """(reference, policy) HF-Llama folders; the policy's weights are the reference's plus seeded noise."""
    root = tmp_path_factory.mktemp("dpo-parity")
    ref = write_random_model_folder(root / "ref")
    model, _ = load_model_folder(ref, dtype=torch.float32)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=gen))
    _, raw = read_model_config(ref)
    save_model_folder(
        model, root / "policy", bos_token_id=raw["bos_token_id"], eos_token_id=raw["eos_token_id"]
    )
    return ref, root / "policy"


def hf_model(folder: Path) -> LlamaForCausalLM:
    return LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def ours(folders) -> dict[str, torch.Tensor]:
    """Our summed completion log-probs of every pair (one batch, padded rows) under policy and reference."""
    ref_folder, policy_folder = folders
    batch = collate_pairs(PAIRS, pad_id=0, indices=range(len(PAIRS)))
    out = {"chosen_tokens": batch.chosen_tokens, "rejected_tokens": batch.rejected_tokens}
    for name, folder in (("policy", policy_folder), ("ref", ref_folder)):
        model, _ = load_model_folder(folder, dtype=torch.float32)
        with torch.no_grad():
            out[f"{name}_chosen"], out[f"{name}_rejected"] = completion_logps(model, batch)
    return out


def test_shared_prompt_row_equals_each_completion_run_alone(folders, ours):
    """The row layout (a completion sees the prompt and itself, never the other completion; padding
    after short rows) gives each completion the log-probs of `prompt + completion` alone in HF."""
    model = hf_model(folders[1])
    for i, pair in enumerate(PAIRS):
        for side in ("chosen", "rejected"):
            completion = getattr(pair, side)
            ids = torch.tensor([pair.prompt + completion])
            with torch.no_grad():
                logp = model(ids).logits[0, :-1].log_softmax(-1)
            alone = logp[len(pair.prompt) - 1 :].gather(-1, ids[0, len(pair.prompt) :, None]).sum()
            assert_close(ours[f"policy_{side}"][i], alone, what=f"pair {i} {side}")
    assert ours["chosen_tokens"].tolist() == [len(p.chosen) for p in PAIRS]
    assert ours["rejected_tokens"].tolist() == [len(p.rejected) for p in PAIRS]


# ---- TRL's DPOTrainer ------------------------------------------------------------------------------


def tiny_text_dataset():
    """DPOTrainer/CPOTrainer want a data set to build; the pairs themselves go in as token ids."""
    return datasets.Dataset.from_dict({"prompt": ["hello"], "chosen": [" a"], "rejected": [" b"]})


def trainer_args(config_cls, out: Path, **kwargs):
    return config_cls(
        output_dir=str(out),
        report_to="none",
        bf16=False,
        gradient_checkpointing=False,
        use_cpu=True,
        **kwargs,
    )


def trl_dpo(
    folders,
    tmp_path,
    loss_type: str | list[str],
    label_smoothing: float,
    loss_weights: list[float] | None = None,
) -> dict[str, list[float]]:
    """Per-pair loss, rewards, policy and reference log-probs from DPOTrainer's loss computation."""
    ref_folder, policy_folder = folders
    types = [loss_type] if isinstance(loss_type, str) else loss_type
    args = trainer_args(
        trl.DPOConfig,
        tmp_path,
        beta=BETA,
        loss_type=types,
        label_smoothing=label_smoothing,
        loss_weights=loss_weights,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = trl.DPOTrainer(
            model=hf_model(policy_folder),
            ref_model=hf_model(ref_folder),
            args=args,
            train_dataset=tiny_text_dataset(),
            processing_class=AutoTokenizer.from_pretrained(ref_folder),
        )
    mode = "train" if trainer.model.training else "eval"
    out = {k: [] for k in ("loss", "rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected")}
    out.update({"ref/chosen": [], "ref/rejected": []})
    for pair in PAIRS:
        inputs = trainer.data_collator(
            [{"prompt_ids": pair.prompt, "chosen_ids": pair.chosen, "rejected_ids": pair.rejected}]
        )
        with torch.no_grad():
            out["loss"].append(trainer._compute_loss(trainer.model, inputs, return_outputs=False).item())
            ref_chosen, ref_rejected = trainer.compute_ref_log_probs(trainer.ref_model, inputs)
        for key in ("rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected"):
            out[key].append(trainer._metrics[mode][key][-1])  # the mean over a batch of one pair
        out["ref/chosen"].append(ref_chosen.item())
        out["ref/rejected"].append(ref_rejected.item())
    return out


@pytest.fixture(scope="module")
def dpo_sigmoid(folders, tmp_path_factory):
    return trl_dpo(folders, tmp_path_factory.mktemp("trl"), "sigmoid", 0.0)


def our_scores(ours, loss_type: str, **kwargs):
    return preference_loss(
        loss_type,
        ours["policy_chosen"],
        ours["policy_rejected"],
        ours["ref_chosen"],
        ours["ref_rejected"],
        ours["chosen_tokens"],
        ours["rejected_tokens"],
        **kwargs,
    )


def assert_dpo_parity(ours, scores, trl_out) -> None:
    assert_close(scores.losses, trl_out["loss"], what="loss")
    assert_close(scores.chosen_rewards, trl_out["rewards/chosen"], what="rewards/chosen")
    assert_close(scores.rejected_rewards, trl_out["rewards/rejected"], what="rewards/rejected")
    assert_close(ours["policy_chosen"], trl_out["logps/chosen"], what="logps/chosen")
    assert_close(ours["policy_rejected"], trl_out["logps/rejected"], what="logps/rejected")
    assert_close(ours["ref_chosen"], trl_out["ref/chosen"], what="reference logps/chosen")
    assert_close(ours["ref_rejected"], trl_out["ref/rejected"], what="reference logps/rejected")
    # The comparison means something: the policy differs from the reference on every completion.
    assert min(abs(r) for r in trl_out["rewards/chosen"] + trl_out["rewards/rejected"]) > 1e-3


def test_dpo_sigmoid_matches_dpo_trainer(ours, dpo_sigmoid):
    assert_dpo_parity(ours, our_scores(ours, "sigmoid", beta=BETA), dpo_sigmoid)


@pytest.mark.parametrize(("loss_type", "label_smoothing"), [("robust", 0.1), ("ipo", 0.0)])
def test_loss_matches_dpo_trainer(folders, ours, tmp_path, loss_type, label_smoothing):
    theirs = trl_dpo(folders, tmp_path, loss_type, label_smoothing)
    scores = our_scores(ours, loss_type, beta=BETA, label_smoothing=label_smoothing)
    assert_dpo_parity(ours, scores, theirs)


# ---- TRL's CPOTrainer: cDPO's formula and SimPO ----------------------------------------------------


def trl_cpo(folders, tmp_path, **config) -> CPOTrainer:
    ref_folder, policy_folder = folders
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return CPOTrainer(
            model=hf_model(policy_folder),
            args=trainer_args(CPOConfig, tmp_path, **config),
            train_dataset=tiny_text_dataset(),
            processing_class=AutoTokenizer.from_pretrained(ref_folder),
        )


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_cdpo_matches_trl_sigmoid_on_dpo_trainer_log_ratios(
    folders, ours, dpo_sigmoid, tmp_path, label_smoothing
):
    cpo = trl_cpo(
        folders, tmp_path, loss_type="sigmoid", beta=BETA, label_smoothing=label_smoothing, cpo_alpha=0.0
    )
    ratio = {
        side: torch.tensor(dpo_sigmoid[f"logps/{side}"]) - torch.tensor(dpo_sigmoid[f"ref/{side}"])
        for side in ("chosen", "rejected")
    }
    losses, chosen_rewards, rejected_rewards = cpo.cpo_loss(ratio["chosen"], ratio["rejected"])
    if label_smoothing == 0.0:  # the route itself: CPO's sigmoid on DPO's log-ratios is DPOTrainer's loss
        assert_close(losses, dpo_sigmoid["loss"], what="CPO sigmoid on log-ratios vs DPOTrainer")
    scores = our_scores(ours, "sigmoid", beta=BETA, label_smoothing=label_smoothing)
    assert_close(scores.losses, losses, what="loss")
    assert_close(scores.chosen_rewards, chosen_rewards, what="rewards/chosen")
    assert_close(scores.rejected_rewards, rejected_rewards, what="rewards/rejected")


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_simpo_matches_cpo_trainer(folders, ours, tmp_path, label_smoothing):
    beta, gamma = 2.0, 0.5
    cpo = trl_cpo(
        folders,
        tmp_path,
        loss_type="simpo",
        beta=beta,
        simpo_gamma=gamma,
        cpo_alpha=0.0,
        label_smoothing=label_smoothing,
    )
    rows = {k: [] for k in ("loss", "chosen_rewards", "rejected_rewards", "chosen_logps", "rejected_logps")}
    for pair in PAIRS:
        feature = {}
        for side in ("chosen", "rejected"):  # as CPOTrainer.tokenize_row lays a pair out
            ids = pair.prompt + getattr(pair, side)
            feature[f"{side}_input_ids"] = ids
            feature[f"{side}_attention_mask"] = [1] * len(ids)
            feature[f"{side}_labels"] = [-100] * len(pair.prompt) + getattr(pair, side)
        feature["prompt_input_ids"], feature["prompt_attention_mask"] = pair.prompt, [1] * len(pair.prompt)
        batch = cpo.data_collator([feature])
        with torch.no_grad():
            chosen_logps, rejected_logps = cpo.concatenated_forward(cpo.model, batch)[:2]
            losses, chosen_rewards, rejected_rewards = cpo.cpo_loss(chosen_logps, rejected_logps)
        for key, value in zip(
            rows, (losses, chosen_rewards, rejected_rewards, chosen_logps, rejected_logps), strict=True
        ):
            rows[key].append(value.item())
    scores = preference_loss(
        "simpo",
        ours["policy_chosen"],
        ours["policy_rejected"],
        None,
        None,
        ours["chosen_tokens"],
        ours["rejected_tokens"],
        beta=beta,
        label_smoothing=label_smoothing,
        simpo_gamma=gamma,
    )
    assert_close(scores.losses, rows["loss"], what="loss")
    assert_close(scores.chosen_rewards, rows["chosen_rewards"], what="rewards/chosen")
    assert_close(scores.rejected_rewards, rows["rejected_rewards"], what="rewards/rejected")
    assert_close(
        ours["policy_chosen"] / ours["chosen_tokens"], rows["chosen_logps"], what="mean logps/chosen"
    )
    assert_close(
        ours["policy_rejected"] / ours["rejected_tokens"], rows["rejected_logps"], what="mean logps/rejected"
    )


def test_sft_term_matches_dpo_trainer(folders, ours, tmp_path):
    """dpo.sft_weight is TRL's loss_type [sigmoid, sft] with loss_weights [1, w]: the chosen tokens'
    mean NLL added to the preference loss, through llmctl's own loss function (one pair per batch)."""
    from llmctl.config.dpo import DpoConfig
    from llmctl.stages.dpo import preference_objective

    weight = 0.7
    theirs = trl_dpo(folders, tmp_path, ["sigmoid", "sft"], 0.0, loss_weights=[1.0, weight])
    reference = torch.stack([ours["ref_chosen"], ours["ref_rejected"]], dim=-1)
    loss_fn = preference_objective(DpoConfig(beta=BETA, sft_weight=weight), reference, "cpu")
    model, _ = load_model_folder(folders[1], dtype=torch.float32)
    with torch.no_grad():
        losses = [
            loss_fn(model, collate_pairs([pair], pad_id=0, indices=[i])).loss_sum
            for i, pair in enumerate(PAIRS)
        ]
    assert_close(torch.stack(losses), theirs["loss"], what="sigmoid + sft loss")
    plain = our_scores(ours, "sigmoid", beta=BETA).losses
    assert (torch.stack(losses) - plain).min() > 0.1  # the term is really there
