"""Routing weights of the ensemble (ELREA step 5, eqs. 5.9-5.10), and the ablations' weights.

For a test feature x (unit norm) and C unit centroids:
    cos_c   = <x, centroid_c>
    cos'_c  = (cos_c - mean_c cos) / std_c cos        # eq. 5.9, population std (docs/method.md)
    w_c     = softmax_c(cos'_c / temperature)         # paper: temperature 1
    w_base  = 1 - max_c cos_c                         # raw cosine, not standardised
The ensemble adds w_base * logits_base + sum_c w_c * logits_c (eq. 5.10), so the weights need
not sum to 1. Weights are float64 so that cached weights compare exactly.
"""

from __future__ import annotations

import numpy as np
import torch


def _as_array(a: np.ndarray | torch.Tensor, name: str) -> np.ndarray:
    if isinstance(a, torch.Tensor):
        a = a.detach().to("cpu", torch.float64).numpy()
    a = np.asarray(a, dtype=np.float64)
    if a.ndim == 1:
        a = a[None, :]
    if a.ndim != 2:
        raise ValueError(f"{name} must be [B, d] (or [d]), got shape {a.shape}")
    return a


def route(
    features: np.ndarray | torch.Tensor,
    centroids: np.ndarray | torch.Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    min_weight: float = 0.0,
) -> tuple[np.ndarray, np.ndarray]:
    """(expert_weights [B, C] float64, base_weight [B] float64) for features [B, d] (unit norm).

    `top_k` keeps the k largest expert weights and zeroes the rest without renormalising;
    the base adapter keeps its weight (docs/method.md; the paper's Figure 5.3b variant).
    `min_weight` zeroes every weight (experts and base) below it, again without renormalising,
    except a row's largest expert weight, which always stays. A zero weight means the decoder
    does not run that adapter for that prompt, so both knobs trade fidelity to eq. 5.10 for speed.
    If a row's cosines are all equal (std 0), every expert gets 1/C.
    """
    x, c = _as_array(features, "features"), _as_array(centroids, "centroids")
    if x.shape[1] != c.shape[1]:
        raise ValueError(f"features have d={x.shape[1]} but centroids have d={c.shape[1]}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    _check_sparsity(c.shape[0], top_k, min_weight)

    cos = x @ c.T  # [B, C]
    std = cos.std(axis=1, keepdims=True)  # population std (ddof=0)
    # std == 0 (up to rounding): every standardised cosine is 0, so each expert gets 1/C.
    flat = std <= 1e-12
    z = np.where(flat, 0.0, (cos - cos.mean(axis=1, keepdims=True)) / np.where(flat, 1.0, std))
    z = z / temperature
    e = np.exp(z - z.max(axis=1, keepdims=True))
    expert_weights = e / e.sum(axis=1, keepdims=True)
    base_weight = 1.0 - cos.max(axis=1)
    return sparsify(expert_weights, base_weight, top_k, min_weight)


def _check_sparsity(num_clusters: int, top_k: int | None, min_weight: float) -> None:
    if not 0.0 <= min_weight < 1.0:
        raise ValueError(f"min_weight must be in [0, 1), got {min_weight}")
    if top_k is not None and not 1 <= top_k <= num_clusters:
        raise ValueError(f"top_k must be None or in [1, C={num_clusters}], got {top_k}")


def sparsify(
    expert_weights: np.ndarray, base_weight: np.ndarray, top_k: int | None = None, min_weight: float = 0.0
) -> tuple[np.ndarray, np.ndarray]:
    """`route`'s top_k and min_weight applied to dense weights ([B, C] experts, [B] base), from
    the gradient features or from the distilled router (elrea_ray/distill.py); copies, float64."""
    expert_weights = np.array(expert_weights, dtype=np.float64)
    base_weight = np.array(base_weight, dtype=np.float64)
    num_clusters = expert_weights.shape[1]
    _check_sparsity(num_clusters, top_k, min_weight)
    if top_k is not None and top_k < num_clusters:
        # Stable sort so that ties keep the lower expert index, deterministically.
        drop = np.argsort(-expert_weights, axis=1, kind="stable")[:, top_k:]
        np.put_along_axis(expert_weights, drop, 0.0, axis=1)
    if min_weight > 0:
        top = expert_weights.argmax(axis=1)
        keep_top = expert_weights[np.arange(len(top)), top]
        expert_weights = np.where(expert_weights < min_weight, 0.0, expert_weights)
        expert_weights[np.arange(len(top)), top] = keep_top
        base_weight = np.where(base_weight < min_weight, 0.0, base_weight)
    return expert_weights, base_weight


def uniform_weights(batch_size: int, num_clusters: int) -> tuple[np.ndarray, np.ndarray]:
    """The Uniform Weights ablation: every expert and the base get weight 1. ([B, C], [B])."""
    return np.ones((batch_size, num_clusters)), np.ones(batch_size)


def one_hot_weights(batch_size: int, num_clusters: int, index: int) -> tuple[np.ndarray, np.ndarray]:
    """One adapter alone: index -1 is the base (M+Q_base), c in 0..C-1 is expert c. ([B, C], [B])."""
    if not -1 <= index < num_clusters:
        raise ValueError(f"index must be -1 (base) or in [0, C={num_clusters}), got {index}")
    expert_weights, base_weight = np.zeros((batch_size, num_clusters)), np.zeros(batch_size)
    if index == -1:
        base_weight[:] = 1.0
    else:
        expert_weights[:, index] = 1.0
    return expert_weights, base_weight
