"""LoRA (Hu et al. 2021, https://arxiv.org/abs/2106.09685) on the linear layers of any model:
W x + (alpha / r) B A dropout(x), with W frozen, A (r x in) Kaiming-uniform and B (out x r) zero,
so training starts exactly at the base model.

    adapted = add_lora(model, rank=16, alpha=32, dropout=0.05, targets=("q_proj", "v_proj"))
    ...train (only lora_A / lora_B require grad)...
    plain, adapter = split_lora_state(full_state_dict, scaling=alpha / rank)  # W + (alpha/r) B A
    save_peft_adapter(folder, adapter, rank=16, alpha=32, dropout=0.05, base_model="pretrain:v0003")

Why our own module rather than peft: the model is ours and stays a plain module tree, so the A and B
matrices hang off the adapted `nn.Linear` as children (`...q_proj.lora_A.weight`) and every other
parameter keeps its HF name: checkpoints, DDP/FSDP wrapping and the checkpointer work unchanged, and
no transformers/accelerate import is needed at run time. The adapter it writes is PEFT's format
(`adapter_config.json`, `adapter_model.safetensors` with `base_model.model.<name>.lora_A.weight`
keys), which `peft.PeftModel.from_pretrained` loads onto the HF model (tested).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _attach(layer: nn.Linear, rank: int, alpha: float, dropout: float) -> None:
    """A and B become children of the layer itself, so their names are PEFT's (`<layer>.lora_A.weight`)
    and every other name is unchanged."""
    device = layer.weight.device
    layer.lora_A = nn.Linear(layer.in_features, rank, bias=False, device=device)
    layer.lora_B = nn.Linear(rank, layer.out_features, bias=False, device=device)
    nn.init.kaiming_uniform_(layer.lora_A.weight, a=math.sqrt(5))  # what nn.Linear and peft use
    nn.init.zeros_(layer.lora_B.weight)
    layer.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
    layer.lora_scaling = alpha / rank
    layer.register_forward_hook(_add_update)


def _add_update(layer: nn.Linear, args: tuple, output: torch.Tensor) -> torch.Tensor:
    return output + layer.lora_B(layer.lora_A(layer.lora_dropout(args[0]))) * layer.lora_scaling


def lora_layers(model: nn.Module) -> dict[str, nn.Linear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and hasattr(m, "lora_A")}


def add_lora(
    model: nn.Module, *, rank: int, alpha: float, dropout: float, targets: Iterable[str]
) -> list[str]:
    """Freeze every parameter of `model` and adapt the linear layers whose name ends with a target
    (`q_proj` matches `model.layers.3.self_attn.q_proj`); returns the adapted layer names."""
    targets = tuple(targets)
    for p in model.parameters():
        p.requires_grad_(False)
    adapted = []
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear) and name.split(".")[-1] in targets and not hasattr(module, "lora_A"):
            _attach(module, rank, alpha, dropout)
            adapted.append(name)
    if not adapted:
        raise ValueError(f"no linear layer is named {' or '.join(targets)}")
    return adapted


def split_lora_state(
    state: dict[str, torch.Tensor], scaling: float
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(plain state dict with every W + scaling * B A merged in, adapter tensors under PEFT's keys).

    Works on a full state dict (e.g. gathered from DDP/FSDP), so the adapted model itself is untouched."""
    merged, adapter = {}, {}
    for key, value in state.items():
        if ".lora_" in key:
            adapter[f"base_model.model.{key}"] = value.detach().cpu().contiguous()
        else:
            merged[key] = value
    for key in [k for k in adapter if k.endswith(".lora_A.weight")]:
        layer = key[len("base_model.model.") : -len(".lora_A.weight")]
        a, b = adapter[key], adapter[f"base_model.model.{layer}.lora_B.weight"]
        weight = merged[f"{layer}.weight"]
        merged[f"{layer}.weight"] = weight + (b.to(weight) @ a.to(weight)) * scaling
    return merged, adapter


def save_peft_adapter(
    folder: Path,
    adapter: dict[str, torch.Tensor],
    *,
    rank: int,
    alpha: float,
    dropout: float,
    base_model: str | None,
) -> None:
    """`adapter_config.json` + `adapter_model.safetensors` as peft writes them for a LoRA adapter
    (`adapter`: PEFT-keyed tensors from `split_lora_state`)."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    targets = sorted({k.split(".lora_")[0].split(".")[-1] for k in adapter})
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": rank,
        "lora_alpha": alpha,
        "lora_dropout": dropout,
        "target_modules": targets,
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "use_rslora": False,
        "use_dora": False,
        "modules_to_save": None,
    }
    (folder / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    save_file(adapter, str(folder / ADAPTER_WEIGHTS), metadata={"format": "pt"})
