"""A distilled router: a small head on the prompt's pooled hidden state that predicts the gradient
routing weights (beyond the paper; `routing.method: distilled`).

Gradient routing costs one forward and backward per base-adapter epoch checkpoint per prompt.
The prefill computes the prompt's hidden states anyway, so a head on their mean predicts the
C expert weights (a softmax, fitted to the gradient weights by cross-entropy with soft targets)
and the base weight (1 - max cos, fitted by squared error) from what decoding needs regardless.
It is trained after the experts on the training set's gradient routing weights. The maths here
is plain torch on arrays; no Ray, no model.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch


@dataclass
class DistilledRouter:
    """Standardise the pooled hidden state, then a linear layer (hidden=0) or one ReLU layer,
    then C expert logits and one base-weight output."""

    mean: torch.Tensor  # [H]
    std: torch.Tensor  # [H]
    layers: dict[str, torch.Tensor]  # "w1" [H, k], "b1" [k] (if hidden), "w_out" [k or H, C + 1], "b_out" [C + 1]
    temperature: float = 1.0

    @property
    def num_experts(self) -> int:
        return self.layers["w_out"].shape[1] - 1

    def _out(self, h: torch.Tensor) -> torch.Tensor:
        x = (h.float() - self.mean) / self.std
        if "w1" in self.layers:
            x = torch.relu(x @ self.layers["w1"] + self.layers["b1"])
        return x @ self.layers["w_out"] + self.layers["b_out"]

    def predict(self, h: np.ndarray | torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """(expert_weights [N, C] float64 summing to 1, base_weight [N] float64 in [0, 2]) for
        pooled hidden states h [N, H], the shapes `elrea_ray.routing.route` returns."""
        with torch.no_grad():
            out = self._out(torch.as_tensor(h))
        experts = torch.softmax(out[:, :-1].double() / self.temperature, dim=1)
        base = out[:, -1].double().clamp(0.0, 2.0)
        return experts.numpy(), base.numpy()

    def save(self, folder: str | Path) -> None:
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        save_file({"mean": self.mean, "std": self.std, **self.layers}, str(folder / "router.safetensors"))
        (folder / "router.json").write_text(
            json.dumps(
                {
                    "kind": "distilled-router/1",
                    "temperature": self.temperature,
                    "hidden": int(self.layers["w1"].shape[1]) if "w1" in self.layers else 0,
                }
            )
        )

    @classmethod
    def load(cls, folder: str | Path) -> "DistilledRouter":
        from safetensors.torch import load_file

        folder = Path(folder)
        meta = json.loads((folder / "router.json").read_text())
        if meta.get("kind") != "distilled-router/1":
            raise ValueError(f"{folder / 'router.json'} is not a distilled router (kind {meta.get('kind')!r})")
        t = load_file(str(folder / "router.safetensors"))
        return cls(mean=t.pop("mean"), std=t.pop("std"), layers=t, temperature=float(meta["temperature"]))


def fit_router(
    h: np.ndarray,
    expert_weights: np.ndarray,
    base_weight: np.ndarray,
    hidden: int = 0,
    epochs: int = 300,
    lr: float = 1e-2,
    weight_decay: float = 1e-4,
    seed: int = 0,
) -> DistilledRouter:
    """Fit the head on N prompts: h [N, H] pooled hidden states, the gradient routing weights
    expert_weights [N, C] (rows sum to 1) and base_weight [N]. Full-batch Adam; the loss is the
    cross-entropy of the expert softmax against the soft targets plus the base weight's squared
    error."""
    x = torch.as_tensor(np.asarray(h), dtype=torch.float32)
    target = torch.as_tensor(np.asarray(expert_weights), dtype=torch.float32)
    base = torch.as_tensor(np.asarray(base_weight), dtype=torch.float32)
    n, d = x.shape
    if target.shape[0] != n or base.shape != (n,):
        raise ValueError(f"h has {n} rows but the weights have shapes {tuple(target.shape)} and {tuple(base.shape)}")
    if hidden < 0:
        raise ValueError(f"hidden must be >= 0 (0: a linear head), got {hidden}")
    gen = torch.Generator().manual_seed(seed)
    mean, std = x.mean(0), x.std(0, unbiased=False).clamp_min(1e-6)
    width = hidden or d
    layers = {
        "w_out": torch.randn(width, target.shape[1] + 1, generator=gen) * width**-0.5,
        "b_out": torch.zeros(target.shape[1] + 1),
    }
    if hidden:
        layers["w1"] = torch.randn(d, hidden, generator=gen) * d**-0.5
        layers["b1"] = torch.zeros(hidden)
    for p in layers.values():
        p.requires_grad_(True)
    router = DistilledRouter(mean=mean, std=std, layers=layers)
    opt = torch.optim.AdamW(list(layers.values()), lr=lr, weight_decay=weight_decay)
    for _ in range(epochs):
        out = router._out(x)
        ce = -(target * torch.log_softmax(out[:, :-1], dim=1)).sum(1).mean()
        loss = ce + ((out[:, -1] - base) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    router.layers = {k: v.detach() for k, v in layers.items()}
    return router


def top1_agreement(a: np.ndarray, b: np.ndarray) -> float:
    """Share of rows whose largest expert weight is the same expert in a and b ([N, C] each)."""
    return float((np.asarray(a).argmax(1) == np.asarray(b).argmax(1)).mean())


def pooled_hidden_states(model, prompts: list[list[int]], pad_token_id: int, batch_size: int = 8) -> np.ndarray:
    """[N, H] float32: the mean over each prompt's tokens of the model's last hidden state (the
    active adapter applied, dropout off), what a prefill of the prompt computes."""
    device = next(model.parameters()).device
    out = np.empty((len(prompts), 0), dtype=np.float32)
    rows = []
    was_training = model.training
    model.eval()
    try:
        if any(len(p) == 0 for p in prompts):
            raise ValueError("pooled_hidden_states: a prompt has no tokens")
        with torch.no_grad():
            for lo in range(0, len(prompts), batch_size):
                chunk = prompts[lo : lo + batch_size]
                width = max(len(p) for p in chunk)
                ids = torch.full((len(chunk), width), pad_token_id, dtype=torch.long)
                mask = torch.zeros((len(chunk), width), dtype=torch.long)
                for i, p in enumerate(chunk):  # right padding: positions stay those of the prompt alone
                    ids[i, : len(p)] = torch.tensor(p)
                    mask[i, : len(p)] = 1
                hs = (
                    model(input_ids=ids.to(device), attention_mask=mask.to(device), output_hidden_states=True)
                    .hidden_states[-1]
                    .float()
                )
                m = mask.to(device).unsqueeze(-1).float()
                rows.append(((hs * m).sum(1) / m.sum(1)).cpu().numpy())
    finally:
        model.train(was_training)
    return np.concatenate(rows) if rows else out
