"""The MoE Merging baseline (paper §5.3 baselines): the C+1 adapters' LoRA matrices averaged with a
prompt's normalised routing weights alpha_c = w_c / sum(w) into ONE adapter, then decoded alone.

    A_merged = sum_c alpha_c A_c,   B_merged = sum_c alpha_c B_c,   scale alpha/r as the adapters

PEFT's `add_weighted_adapter(combination_type="linear")` builds A = sum_c sqrt(w_c s_c) A_c and
B = sum_c sqrt(w_c s_c) B_c with scale 1 (s_c = lora_alpha / r of adapter c); passing w_c = alpha_c^2
gives A = sqrt(s) sum alpha_c A_c and B = sqrt(s) sum alpha_c B_c, i.e. the paper's average with the
adapters' common scale s. (Passing alpha_c itself would weight B_i A_j by sqrt(alpha_i alpha_j), so
a merge of identical adapters would not equal the adapter.)
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from elrea_ray.checkpoints import unwrap


def normalized_alphas(weights: np.ndarray) -> np.ndarray:
    """Paper: alpha_c = w_c / sum_c w_c (per prompt; rows of a [B, A] matrix)."""
    w = np.asarray(weights, dtype=np.float64)
    if np.any(w < 0):
        raise ValueError("merging weights must be >= 0")
    total = w.sum(axis=-1, keepdims=True)
    if np.any(total <= 0):
        raise ValueError("merging weights must have a positive sum for every prompt")
    return w / total


def merge_adapters(peft_model, adapter_names: Sequence[str], alphas: Sequence[float], name: str) -> str:
    """Add adapter `name` = the alpha-weighted average of `adapter_names` (same rank and scale)."""
    model = unwrap(peft_model)
    scales = {float(model.peft_config[a].lora_alpha) / float(model.peft_config[a].r) for a in adapter_names}
    if len(scales) != 1:
        raise ValueError(
            f"adapters {list(adapter_names)} have different lora_alpha/r; the paper's merge "
            "averages adapters of one shape"
        )
    if name in model.peft_config:
        model.delete_adapter(name)
    keep = [(a, float(x)) for a, x in zip(adapter_names, alphas) if x > 0]
    model.add_weighted_adapter([a for a, _ in keep], [x * x for _, x in keep], name, combination_type="linear")
    return name


def drop_adapter(peft_model, name: str) -> None:
    model = unwrap(peft_model)
    if name in model.peft_config:
        model.delete_adapter(name)
