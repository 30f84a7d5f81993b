"""The GPU path's config-to-loader mapping (model.load_in_4bit -> QLoRA NF4 with bf16 compute),
checked on CPU; and a real 4-bit load of the tiny model wherever CUDA and bitsandbytes exist."""

import importlib.util

import pytest
import torch

from elrea_ray.config import ModelConfig
from elrea_ray.model import quantization_kwargs

QLORA = ModelConfig(name_or_path="tiny-random-llama", load_in_4bit=True, dtype="bfloat16")
HAVE_GPU_STACK = torch.cuda.is_available() and importlib.util.find_spec("bitsandbytes") is not None


def test_4bit_maps_to_nf4_with_bf16_compute_on_the_workers_gpu(monkeypatch):
    # Only the presence check of bitsandbytes is bypassed; BitsAndBytesConfig is transformers' own.
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: object() if name == "bitsandbytes" else real(name, *a)
    )
    kw = quantization_kwargs(QLORA, torch.device("cuda", 1))
    q = kw["quantization_config"]
    assert q.load_in_4bit and not q.load_in_8bit
    assert q.bnb_4bit_quant_type == "nf4" and q.bnb_4bit_compute_dtype == torch.bfloat16
    assert q.bnb_4bit_use_double_quant
    assert kw["device_map"] == {"": 1}  # the Ray worker's own GPU, not always cuda:0


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is not None, reason="bitsandbytes is installed")
def test_4bit_without_bitsandbytes_names_the_extra():
    with pytest.raises(ValueError, match=r"elrea-ray\[gpu\]"):
        quantization_kwargs(QLORA, torch.device("cuda", 0))


def test_4bit_on_cpu_names_cuda():
    with pytest.raises(ValueError, match="needs a CUDA device"):
        quantization_kwargs(QLORA, torch.device("cpu"))


@pytest.mark.skipif(not HAVE_GPU_STACK, reason="needs CUDA and bitsandbytes (GPU machines only)")
def test_tiny_model_really_loads_in_4_bits_and_trains_bf16_adapters():
    from elrea_ray.model import lora_parameters, new_lora_model

    model = new_lora_model(QLORA, torch.device("cuda", 0))
    linear4 = [m for m in model.modules() if type(m).__name__ == "Linear4bit"]
    assert linear4, "no 4-bit linear layers in the backbone"
    assert all(p.requires_grad for _, p in lora_parameters(model))
    ids = torch.tensor([[1, 2, 3, 4]], device="cuda")
    model(input_ids=ids).logits.float().sum().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for _, p in lora_parameters(model))
