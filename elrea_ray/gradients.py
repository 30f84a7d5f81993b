"""ELREA gradient features (paper step 2, eq. 5.5-5.7), batched.

For an instruction x (its chat-formatted prompt tokens only; the response is never seen):

    g_e(x)   = grad over the LoRA A/B parameters of L(x) at epoch checkpoint e, where L(x) is
               the mean next-token cross-entropy over x's own tokens
    gamma_e  = m' / (sqrt(v') + eps),  m' = (b1 m + (1-b1) g) / (1-b1^t),
               v' = (b2 v + (1-b2) g^2) / (1-b2^t),  t = step_e + 1      (eq. 5.5, Adam state of e)
    delta'   = sum_e w_e R gamma_e        (eq. 5.6-5.7; w_e normalised to sum 1, e.g. mean LR)
    delta    = delta' / ||delta'||

The per-example gradients of a whole batch come from ONE backward (`per_example_grads`): a
forward hook on every lora_A / lora_B `nn.Linear` keeps its input a [B, T, d_in], a hook on its
output receives the output gradient g [B, T, d_out], and the per-example weight gradient is
sum_t g_t a_t^T, a batched matmul (Opacus' Linear grad sampler). PEFT applies the scale
alpha/r after lora_B, so the hooks see exactly the factors of d loss / d weight.
The backward asks only for d loss / d embeddings, so autograd never
forms the (unused) batch-summed LoRA weight gradients.

The E epoch checkpoints share that one pass: the batch is replicated E times along the batch
dimension and copy e goes through epoch e's LoRA weights, held stacked as [E, *shape] per LoRA
parameter, one bmm per LoRA module (`per_example_grads(copies=...)`). So a batch costs ONE
forward+backward over E x B rows (the same flops as E passes, without E passes' per-op overhead
or weight copies between them) plus 2*T*D flops per example and epoch; `batch_size` counts those
rows. The Adam transform then runs in place on each epoch's rows, the epochs are summed into
the first epoch's rows and projected once (R is linear), so per-example gradients never outlive
their batch.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.profiler import record_function

from elrea_ray.checkpoints import check_epoch_checkpoint, load_adam_state, parameter_layout, unwrap
from elrea_ray.config import ModelConfig
from elrea_ray.model import load_adapters, lora_parameters
from elrea_ray.projection import ProjectorSpec, make_projector

_ADAPTER = "default"  # the name every epoch adapter is loaded under (and the layout refers to)
_BLOCK = 1 << 20  # columns of the Adam transform done at once (keeps its scratch at B x 1M floats)


def _hook_plan(model, params) -> list[tuple[torch.nn.Linear, int]]:
    """(module, flat offset) of every LoRA parameter, in layout order; each must be a Linear weight."""
    owner = {id(m.weight): m for m in model.modules() if isinstance(m, torch.nn.Linear)}
    plan, offset = [], 0
    for name, p in params:
        m = owner.get(id(p))
        if m is None or m.bias is not None:
            raise NotImplementedError(
                f"per-example gradients support LoRA A/B weights of nn.Linear modules without bias; "
                f"{name} is not one (DoRA, embedding LoRA and LoRA biases are not supported)"
            )
        plan.append((m, offset))
        offset += p.numel()
    return plan


def stack_lora_weights(peft_model, flat_weights: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """E flat LoRA weight vectors [D] (layout order) -> one [E, *shape] tensor per LoRA parameter,
    in the parameter's dtype and device: the `copies` argument of `per_example_grads`."""
    params = lora_parameters(unwrap(peft_model))
    d = sum(p.numel() for _, p in params)
    for e, w in enumerate(flat_weights):
        if w.shape != (d,):
            raise ValueError(f"flat_weights[{e}] has shape {list(w.shape)}, expected [{d}]")
    out, offset = [], 0
    for _, p in params:
        n = p.numel()
        out.append(torch.stack([w[offset : offset + n].view_as(p) for w in flat_weights]).to(p.device, p.dtype))
        offset += n
    return out


def per_example_grads(
    peft_model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    labels: torch.Tensor,
    out: torch.Tensor | None = None,
    autocast: torch.dtype | None = None,
    copies: Sequence[torch.Tensor] | None = None,
) -> torch.Tensor:
    """Per-example gradients [B, D] float32 of loss_i = mean NTP cross-entropy over example i's
    labelled tokens (labels -100 are ignored), flattened in `lora_parameters` order.

    One forward and one backward for the whole batch; the model's `.grad`s are left untouched.
    Position ids follow the attention mask, so left or right padding both work. `out`, if given,
    is a [>=rows, D] float32 buffer on the model's device that receives the result. `autocast`
    (e.g. torch.bfloat16) runs the forward under torch.autocast; the per-example outer products
    are still summed in float32.

    `copies` (from `stack_lora_weights`): E sets of LoRA weights, one [E, *shape] tensor per
    LoRA parameter. The batch then goes through all E in the SAME forward and backward: it is
    replicated E times along the batch dimension and copy e's rows use LoRA weights e in every
    LoRA module (the model's own LoRA weights are ignored). The result is [E * B, D], copy-major:
    row e * B + i is example i under weights e, equal to a separate pass with weights e loaded.
    """
    model = unwrap(peft_model)
    params = lora_parameters(model)
    if not params:
        raise ValueError(
            "per_example_grads: the model has no trainable LoRA parameters (load the adapter with is_trainable=True)"
        )
    if model.training:
        raise ValueError("per_example_grads needs model.eval() (dropout off, as in LESS)")
    plan = _hook_plan(model, params)
    n_copies = 1 if copies is None else _copies_count(params, copies)
    if copies is not None:
        input_ids, attention_mask, labels = (t.repeat(n_copies, 1) for t in (input_ids, attention_mask, labels))
    batch, d = input_ids.shape[0], sum(p.numel() for _, p in params)
    device = params[0][1].device
    grads = _grad_buffer(out, batch, d, device)
    input_ids, attention_mask, labels = (t.to(device) for t in (input_ids, attention_mask, labels))
    targets, counts = _next_token_targets(labels, attention_mask)
    keep = attention_mask.bool().unsqueeze(-1)  # [B, T, 1]; pads contribute nothing, by construction
    fired = [0] * len(plan)
    hooks = [
        m.register_forward_hook(_lora_hook(i, m, off, grads, keep, fired, copies, n_copies))
        for i, (m, off) in enumerate(plan)
    ]
    embedded: list[torch.Tensor] = []
    hooks.append(model.get_input_embeddings().register_forward_hook(_embedding_leaf(embedded)))
    try:
        _loss_backward(model, input_ids, attention_mask, targets, counts, embedded, autocast, device)
    finally:
        for h in hooks:
            h.remove()
    if fired != [1] * len(plan):
        missing = [params[i][0] for i, f in enumerate(fired) if f != 1]
        raise RuntimeError(f"per_example_grads: no gradient reached {missing[:3]} (inactive adapter?)")
    return grads


def _copies_count(params, copies: Sequence[torch.Tensor]) -> int:
    """E of `copies`, after checking there is one [E, *shape] tensor per LoRA parameter."""
    n_copies = copies[0].shape[0] if len(copies) else 0
    bad = [
        name for (name, p), w in zip(params, copies) if w.dim() != 3 or w.shape[0] != n_copies or w.shape[1:] != p.shape
    ]
    if len(copies) != len(params) or bad or n_copies < 1:
        raise ValueError(
            f"copies must hold one [E, *shape] tensor per LoRA parameter ({len(params)}), "
            f"E >= 1; got {len(copies)} tensors, mismatched: {bad[:3]}"
        )
    return n_copies


def _grad_buffer(out: torch.Tensor | None, batch: int, d: int, device) -> torch.Tensor:
    if out is None:
        return torch.empty(batch, d, dtype=torch.float32, device=device)
    if out.shape[0] < batch or out.shape[1] != d or out.dtype != torch.float32:
        raise ValueError(f"out must be float32 [>= {batch}, {d}], got {out.dtype} {list(out.shape)}")
    return out[:batch]


def _next_token_targets(labels: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(targets [B, T-1], labelled-token counts [B]): position t predicts token t+1, and a
    prediction made from a pad position (left padding) is void."""
    targets = labels[:, 1:].masked_fill(attention_mask[:, :-1] == 0, -100)
    counts = (targets != -100).sum(1)
    if bool((counts == 0).any()):
        bad = (counts == 0).nonzero().flatten().tolist()
        raise ValueError(f"examples {bad} have no labelled token after the first; an instruction needs >= 2 tokens")
    return targets, counts


def _lora_hook(
    i: int,
    module: torch.nn.Linear,
    offset: int,
    grads: torch.Tensor,
    keep: torch.Tensor,
    fired: list[int],
    copies: Sequence[torch.Tensor] | None,
    n_copies: int,
):
    """Forward hook of LoRA factor i: registers a hook on its output's gradient that writes the
    per-example outer products sum_t g_t a_t^T into grads[:, offset:offset + n]."""
    batch = grads.shape[0]
    calls = [0]

    def hook(_module, inputs, output):
        act = inputs[0]
        if copies is not None:
            # Copy e's rows through weights e: one bmm over [E, B*T, d_in]. The module's own
            # output (its weights times all rows, about 1% of the forward) is discarded.
            x = act.reshape(n_copies, -1, act.shape[-1])
            output = torch.bmm(x, copies[i].transpose(1, 2)).reshape(*act.shape[:-1], -1)
        # Mask the factor that carries the rank dimension: it is the smaller of the two.
        mask_out = module.out_features <= module.in_features

        def grad_hook(g: torch.Tensor) -> None:
            with torch.no_grad(), record_function("features.outer"):
                go, a = g.float(), act.float()
                if mask_out:
                    go = go.masked_fill(~keep, 0.0)
                else:
                    a = a.masked_fill(~keep, 0.0)
                w = torch.bmm(go.transpose(1, 2), a)  # [B, d_out, d_in] = sum_t g_t a_t^T
                n = w.shape[1] * w.shape[2]
                grads[:, offset : offset + n].view(batch, w.shape[1], w.shape[2]).copy_(w)
                fired[i] += 1

        calls[0] += 1
        if calls[0] > 1 or output.grad_fn is None:
            raise RuntimeError("per_example_grads: a LoRA module ran twice or without autograd")
        output.register_hook(grad_hook)
        return output if copies is not None else None

    return hook


def _embedding_leaf(embedded: list[torch.Tensor]):
    """The backward is asked for d loss / d (token embeddings) only, not for the LoRA weights:
    every LoRA module lies on the path from the loss to the embeddings, so each output-gradient
    hook fires, while autograd skips the weight gradients (the batch sums of what the hooks
    compute per example). The frozen embedding's output is a leaf, made to require grad here."""

    def hook(_module, _inputs, output):
        leaf = output.detach().requires_grad_(True)
        embedded.append(leaf)
        return leaf

    return hook


def _loss_backward(model, input_ids, attention_mask, targets, counts, embedded, autocast, device) -> None:
    """One forward of the batch and one backward of sum_i mean_t CE_i to the embeddings."""
    amp = torch.autocast(device.type, dtype=autocast) if autocast is not None else contextlib.nullcontext()
    batch = input_ids.shape[0]
    with torch.enable_grad():
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)
        with amp, record_function("features.forward"):
            logits = model(
                input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
            ).logits
        with record_function("features.forward"):
            ce = F.cross_entropy(
                logits[:, :-1].float().reshape(-1, logits.shape[-1]),
                targets.reshape(-1),
                ignore_index=-100,
                reduction="none",
            ).view(batch, -1)
            # Per-example normalisation (ELREA eq. 5.5): sum_i mean_t CE_i, not HF's batch mean.
            loss = (ce.sum(1) / counts).sum()
        del logits, ce
        if len(embedded) != 1:
            raise RuntimeError(f"per_example_grads: the input embedding ran {len(embedded)} times; expected once")
        with record_function("features.backward"):
            torch.autograd.grad(loss, embedded)


@dataclass
class _Epoch:
    """What one epoch checkpoint contributes, flattened in layout order on the model's device."""

    folder: str
    weight: float
    params: torch.Tensor  # [D] adapter weights of this epoch
    m_hat: torch.Tensor  # [D] b1 * m / (1 - b1^t)
    v_hat: torch.Tensor  # [D] b2 * v / (1 - b2^t)
    c1: float  # (1 - b1) / (1 - b1^t)
    c2: float  # (1 - b2) / (1 - b2^t)
    eps: float


def _saved_key(name: str) -> str:
    """Parameter name -> key in adapter_model.safetensors (PEFT drops the adapter name)."""
    return re.sub(rf"\.(lora_[A-Za-z_]+)\.{_ADAPTER}\.", r".\1.", name)


def _adapter_shape(folder: Path) -> dict:
    cfg = json.loads((folder / "adapter_config.json").read_text())
    return {k: cfg.get(k) for k in ("r", "lora_alpha", "use_rslora", "target_modules", "peft_type")}


class FeatureExtractor:
    """Unit-norm gradient features [N, d_proj] float32 of instructions, from the base adapter's
    epoch checkpoints (written by `checkpoints.save_epoch_checkpoint`).

    The backbone is loaded once; the adapter of each epoch is copied into the same LoRA
    parameters before that epoch's pass. Train and test instructions go through exactly this
    code (the paper applies the Adam transform to test features as well).
    """

    def __init__(
        self,
        model_cfg: ModelConfig,
        epoch_checkpoints: Sequence[str | Path],
        epoch_weights: Sequence[float],
        projector: str | ProjectorSpec = "countsketch",
        d_proj: int = 8192,
        projector_seed: int = 0,
        device: torch.device | str = "cpu",
        batch_size: int = 8,
        mixed_precision: bool = False,
        model=None,
    ) -> None:
        """`model`: an already loaded PEFT model of the same backbone (e.g. the served ensemble's)
        to add the epoch adapter to, instead of loading a second backbone."""
        if len(epoch_checkpoints) == 0 or len(epoch_checkpoints) != len(epoch_weights):
            raise ValueError(
                f"need one weight per epoch checkpoint and at least one checkpoint, got "
                f"{len(epoch_checkpoints)} checkpoints and {len(epoch_weights)} weights"
            )
        w = np.asarray(epoch_weights, dtype=np.float64)
        if not np.all(np.isfinite(w)) or np.any(w < 0) or w.sum() <= 0:
            raise ValueError(f"epoch weights must be non-negative with a positive sum, got {list(epoch_weights)}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        w = w / w.sum()
        self.batch_size = batch_size
        self.device = torch.device(device)
        # bf16 autocast of the forward (and so of the backward's matmuls); the Adam transform
        # and the projection stay float32. Off by default: fp32 is what the tests compare.
        self.autocast = torch.bfloat16 if mixed_precision else None
        folders = [check_epoch_checkpoint(f) for f in epoch_checkpoints]
        first = _adapter_shape(folders[0])
        for f in folders[1:]:
            if _adapter_shape(f) != first:
                raise ValueError(
                    f"epoch checkpoint {f} has adapter config {_adapter_shape(f)}, unlike {folders[0]} ({first})"
                )
        if model is None:
            self.model = load_adapters(model_cfg, {_ADAPTER: str(folders[0])}, self.device, is_trainable=True).eval()
        else:
            if _ADAPTER in model.peft_config:
                raise ValueError(f"the shared model already has an adapter named {_ADAPTER!r}")
            model.load_adapter(str(folders[0]), adapter_name=_ADAPTER, is_trainable=True)
            self.model = model.eval()  # new adapter modules start in training mode (dropout on)
        # Gradient checkpointing re-runs the forward inside the backward, which would fire the
        # per-example input hooks twice; features never use it (the eval-mode forward skips it
        # anyway, this makes the choice explicit for a shared model too).
        base = self.model.get_base_model()
        if getattr(base, "is_gradient_checkpointing", False):
            base.gradient_checkpointing_disable()
        # Active adapter = the epoch adapter; PEFT also makes it the only one with requires_grad,
        # so the parameter layout below is its alone even in a shared model.
        self.model.set_adapter(_ADAPTER)
        self._params = [p for _, p in lora_parameters(self.model)]
        self.layout: list[tuple[str, list[int]]] = parameter_layout(self.model)
        self.d_in = sum(p.numel() for p in self._params)
        if isinstance(projector, ProjectorSpec):
            if projector.d_in != self.d_in:
                raise ValueError(
                    f"projector spec has d_in={projector.d_in} but the adapter has D={self.d_in} LoRA parameters"
                )
            self.projector_spec = projector
        else:
            self.projector_spec = ProjectorSpec(kind=projector, d_in=self.d_in, d_proj=d_proj, seed=projector_seed)
        self.projector = make_projector(self.projector_spec, self.device)
        # Epochs with weight 0 are checked but not computed (they add nothing to eq. 5.7).
        self.epochs = [self._load_epoch(f, float(we)) for f, we in zip(folders, w) if we > 0]
        # With several epochs, all of them run in ONE forward+backward, each on its own copy of
        # the batch through its own LoRA weights (`per_example_grads(copies=...)`): one pass per
        # batch instead of E, with no weight copies between them. One epoch uses the model's own
        # LoRA parameters, loaded once.
        self._copies = stack_lora_weights(self.model, [e.params for e in self.epochs]) if len(self.epochs) > 1 else None
        self._loaded = {"epoch": None}  # which epoch the (possibly shared) model holds now
        self._allocate()

    def _allocate(self) -> None:
        """Buffers for one pass: `batch_size` rows (examples x stacked epoch copies)."""
        rows = self._per_pass() * len(self.epochs)
        self._grads = torch.empty(rows, self.d_in, dtype=torch.float32, device=self.device)
        self._scratch = torch.empty(rows, min(_BLOCK, self.d_in), dtype=torch.float32, device=self.device)

    def _per_pass(self) -> int:
        """Examples per forward+backward: `batch_size` rows hold batch_size // E examples, each
        replicated once per epoch checkpoint (at least one example), so a pass costs what
        batch_size examples of one epoch would."""
        return max(1, self.batch_size // len(self.epochs))

    def variant(
        self,
        projector: str | ProjectorSpec | None = None,
        batch_size: int | None = None,
        mixed_precision: bool | None = None,
    ) -> "FeatureExtractor":
        """The same model and epoch checkpoints with another projector (same d_proj and seed when
        given by kind), batch size or precision; the backbone is shared, not reloaded."""
        other = copy.copy(self)
        if projector is not None:
            spec = (
                projector
                if isinstance(projector, ProjectorSpec)
                else dataclasses.replace(self.projector_spec, kind=projector)
            )
            if spec.d_in != self.d_in:
                raise ValueError(f"projector spec has d_in={spec.d_in} but the adapter has D={self.d_in}")
            other.projector_spec, other.projector = spec, make_projector(spec, self.device)
        if batch_size is not None:
            if batch_size < 1:
                raise ValueError(f"batch_size must be >= 1, got {batch_size}")
            other.batch_size = batch_size
            other._allocate()
        if mixed_precision is not None:
            other.autocast = torch.bfloat16 if mixed_precision else None
        return other

    def _load_epoch(self, folder: Path, weight: float) -> _Epoch:
        from safetensors.torch import load_file

        saved = load_file(str(folder / "adapter_model.safetensors"))
        state = load_adam_state(folder)
        names = [n for n, _ in self.layout]
        if set(state.exp_avg) != set(names):
            extra, lack = set(state.exp_avg) - set(names), set(names) - set(state.exp_avg)
            raise ValueError(
                f"epoch checkpoint {folder}: Adam state does not match the adapter's parameters "
                f"(missing {sorted(lack)[:3]}, unexpected {sorted(extra)[:3]})"
            )
        flat = {k: [] for k in ("params", "m", "v")}
        for name, shape in self.layout:
            key = _saved_key(name)
            if key not in saved:
                raise ValueError(f"epoch checkpoint {folder}: adapter_model.safetensors lacks {key}")
            for k, t in (("params", saved[key]), ("m", state.exp_avg[name]), ("v", state.exp_avg_sq[name])):
                if list(t.shape) != shape:
                    raise ValueError(
                        f"epoch checkpoint {folder}: {k} of {name} has shape {list(t.shape)}, expected {shape}"
                    )
                flat[k].append(t.reshape(-1).float())
        params, m, v = (torch.cat(flat[k]).to(self.device) for k in ("params", "m", "v"))
        t = state.step + 1  # the feature is the update Adam would take next (eq. 5.5)
        bc1, bc2 = 1.0 - state.beta1**t, 1.0 - state.beta2**t
        return _Epoch(
            folder=str(folder),
            weight=weight,
            params=params,
            m_hat=m.mul_(state.beta1 / bc1),
            v_hat=v.mul_(state.beta2 / bc2),
            c1=(1.0 - state.beta1) / bc1,
            c2=(1.0 - state.beta2) / bc2,
            eps=state.eps,
        )

    @torch.no_grad()
    @record_function("features.swap")
    def _set_epoch(self, i: int) -> None:
        if self._loaded["epoch"] == i:
            return
        flat, offset = self.epochs[i].params, 0
        for p in self._params:
            p.copy_(flat[offset : offset + p.numel()].view_as(p))
            offset += p.numel()
        self._loaded["epoch"] = i

    @torch.no_grad()
    @record_function("features.precondition")
    def _adam(self, g: torch.Tensor, e: _Epoch) -> torch.Tensor:
        """In place: g [B, D] -> gamma = m' / (sqrt(v') + eps), column block by column block."""
        for lo in range(0, g.shape[1], _BLOCK):
            hi = min(lo + _BLOCK, g.shape[1])
            gb, s = g[:, lo:hi], self._scratch[: g.shape[0], : hi - lo]
            torch.mul(gb, gb, out=s)
            s.mul_(e.c2).add_(e.v_hat[lo:hi]).sqrt_().add_(e.eps)  # sqrt(v') + eps
            gb.mul_(e.c1).add_(e.m_hat[lo:hi]).div_(s)  # m' / (sqrt(v') + eps)
        return g

    def _preconditioned(self, ids: list[list[int]]) -> torch.Tensor:
        """sum_e w_e gamma_e(x) [B, D] for one batch: the unprojected eq. 5.7 (R is linear, so
        projecting this sum once equals eq. 5.7's sum of projections). A view of a reused buffer."""
        b, t = len(ids), max(len(x) for x in ids)
        input_ids = torch.zeros(b, t, dtype=torch.long)  # right padding; the pad id is never seen
        mask = torch.zeros(b, t, dtype=torch.long)
        for i, x in enumerate(ids):
            input_ids[i, : len(x)] = torch.as_tensor(x, dtype=torch.long)
            mask[i, : len(x)] = 1
        labels = input_ids.masked_fill(mask == 0, -100)  # loss on every instruction token
        if self._copies is None:  # one epoch, its weight is 1 after normalisation
            self._set_epoch(0)
            g = per_example_grads(self.model, input_ids, mask, labels, out=self._grads, autocast=self.autocast)
            return self._adam(g, self.epochs[0])
        # Rows e*b .. (e+1)*b - 1 are the batch under epoch e's weights.
        g = per_example_grads(
            self.model, input_ids, mask, labels, out=self._grads, autocast=self.autocast, copies=self._copies
        )
        acc = self._adam(g[:b], self.epochs[0]).mul_(self.epochs[0].weight)
        for i, e in enumerate(self.epochs[1:], start=1):
            acc.add_(self._adam(g[i * b : (i + 1) * b], e), alpha=e.weight)
        return acc

    def _batch(self, ids: list[list[int]]) -> torch.Tensor:
        g = self._preconditioned(ids)
        with record_function("features.project"):
            acc = self.projector.project(g)
        norms = acc.norm(dim=1, keepdim=True)
        if not bool(torch.isfinite(norms).all()) or bool((norms == 0).any()):
            raise FloatingPointError("a gradient feature is zero or not finite; check the epoch checkpoints")
        return acc.div_(norms)

    def preconditioned_gradients(self, instruction_ids: Sequence[Sequence[int]]) -> torch.Tensor:
        """[N, D] float32 sum_e w_e gamma_e, unprojected and unnormalised (for projector studies:
        N x D floats, so only for small N)."""
        ids = [list(map(int, x)) for x in instruction_ids]
        out = torch.empty(len(ids), self.d_in, dtype=torch.float32)
        n = self._per_pass()
        for lo in range(0, len(ids), n):
            out[lo : lo + n] = self._preconditioned(ids[lo : lo + n]).cpu()
        return out

    def features(self, instruction_ids: Sequence[Sequence[int]]) -> np.ndarray:
        """[N, d_proj] float32 unit-norm features (eq. 5.7) of N instructions (token id lists).

        Instructions are grouped by length into batches of `batch_size` rows (less padding;
        with E epoch checkpoints a batch holds batch_size // E instructions, each run through
        every epoch in the same pass); an example's feature does not depend on the others in its
        batch.
        """
        if self.model.active_adapter != _ADAPTER:  # a shared model may have switched since
            self.model.set_adapter(_ADAPTER)
        ids = [list(map(int, x)) for x in instruction_ids]
        for i, x in enumerate(ids):
            if len(x) < 2:
                raise ValueError(f"instruction {i} has {len(x)} tokens; a gradient feature needs >= 2")
        out = np.empty((len(ids), self.projector_spec.d_proj), dtype=np.float32)
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
        n = self._per_pass()
        for lo in range(0, len(order), n):
            chunk = order[lo : lo + n]
            out[chunk] = self._batch([ids[i] for i in chunk]).cpu().numpy()
        return out
