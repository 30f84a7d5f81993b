import pytest
import torch

from elrea_ray.config import ModelConfig
from elrea_ray.model import load_adapters, load_tokenizer, lora_parameters, new_lora_model

TINY = ModelConfig(name_or_path="tiny-random-llama", lora_dropout=0.0)


def test_tiny_model_has_lora_on_every_linear_layer():
    model = new_lora_model(TINY)
    names = {n.split(".lora_")[0].rsplit(".", 1)[-1] for n, _ in lora_parameters(model)}
    assert names == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    # LoRA B starts at zero: the adapted model equals the backbone at initialisation
    assert all(p.abs().sum() == 0 for n, p in lora_parameters(model) if "lora_B" in n)


def test_tokenizer_has_chat_template_and_pad():
    tok = load_tokenizer(TINY)
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert text.endswith("<|im_start|>assistant\n") and "system" in text
    assert tok.pad_token_id is not None and tok.eos_token == "<|im_end|>"


def test_saved_adapters_load_side_by_side(tmp_path):
    a = new_lora_model(TINY, seed=1)
    with torch.no_grad():
        for _, p in lora_parameters(a):
            p.add_(0.01)
    a.save_pretrained(tmp_path / "a")
    new_lora_model(TINY, seed=2).save_pretrained(tmp_path / "b")
    m = load_adapters(TINY, {"base": str(tmp_path / "a"), "expert-00": str(tmp_path / "b")})
    assert set(m.peft_config) == {"base", "expert-00"}
    with pytest.raises(FileNotFoundError, match="expert-01"):
        load_adapters(TINY, {"expert-01": str(tmp_path / "missing")})


def test_4bit_on_cpu_is_a_clear_error():
    with pytest.raises(ValueError, match="load_in_4bit"):
        new_lora_model(ModelConfig(name_or_path="tiny-random-llama", load_in_4bit=True))


@pytest.mark.smollm2
def test_smollm2_loads_from_the_wheel_and_answers():
    cfg = ModelConfig(name_or_path="smollm2-135m-instruct")
    tok = load_tokenizer(cfg)
    model = new_lora_model(cfg)
    assert sum(p.numel() for _, p in lora_parameters(model)) > 1_000_000
    ids = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    out = model.generate(**ids, max_new_tokens=12, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)


def test_response_loss_runs_the_head_only_where_a_response_token_is_predicted():
    """The sliced-head loss equals the full-logits loss, and so do its LoRA gradients; a model
    that is handed the mask really gets fewer head rows (the class is recorded as slicing)."""
    from elrea_ray.data import collate
    from elrea_ray.train import _HEAD_SLICING, response_cross_entropy

    model = new_lora_model(TINY, seed=3)
    with torch.no_grad():
        for n, p in lora_parameters(model):
            if "lora_B" in n:
                p.normal_(0, 0.02)
    g = torch.Generator().manual_seed(0)
    ids = [torch.randint(3, 200, (n,), generator=g).tolist() for n in (9, 14, 6)]
    labels = [[-100] * (len(x) - k) + x[-k:] for x, k in zip(ids, (3, 5, 1))]
    b = collate(ids, labels, pad_id=0)
    params = [p for _, p in lora_parameters(model)]

    sliced = response_cross_entropy(model, b)
    g_sliced = torch.autograd.grad(sliced, params)
    logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
    full = torch.nn.functional.cross_entropy(
        logits[:, :-1].flatten(0, 1), b["labels"][:, 1:].flatten(), ignore_index=-100, reduction="sum"
    )
    g_full = torch.autograd.grad(full, params)
    assert _HEAD_SLICING[type(model.get_base_model())] is True
    torch.testing.assert_close(sliced, full, rtol=1e-5, atol=1e-5)
    for a, c in zip(g_sliced, g_full):
        torch.testing.assert_close(a, c, rtol=1e-4, atol=1e-5)
    # 3 + 5 + 1 response tokens are predicted, so the head saw 9 rows, not 3 x 14
    keep = torch.zeros_like(b["labels"], dtype=torch.bool)
    keep[:, :-1] = b["labels"][:, 1:] != -100
    out = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], logits_to_keep=keep).logits
    assert out.shape[0] == 9 and out.dim() == 2


def test_random_shapes_have_the_published_sizes_and_load_with_lora(tmp_path):
    """`random:<shape>` has its model's parameter count (SmolLM2-135M: 134.5 M, gemma-2b: 2.506 B,
    counted on the meta device) and a one-layer build of it loads and trains like any folder."""
    from transformers import AutoModelForCausalLM

    from elrea_ray.model import _build_random, random_config, resolve_model_path

    sizes = {}
    for shape in ("smollm2-135m", "gemma-2b"):
        with torch.device("meta"):
            sizes[shape] = sum(p.numel() for p in AutoModelForCausalLM.from_config(random_config(shape)).parameters())
    assert round(sizes["smollm2-135m"] / 1e6, 1) == 134.5 and round(sizes["gemma-2b"] / 1e9, 3) == 2.506
    with pytest.raises(ValueError, match="unknown random model shape 'gemma-7b'; known: gemma-2b, smollm2-135m"):
        resolve_model_path("random:gemma-7b")
    _build_random(
        "gemma-2b",
        tmp_path,
        num_hidden_layers=1,
        hidden_size=64,
        intermediate_size=128,
        num_attention_heads=2,
        head_dim=32,
        vocab_size=1024,
    )
    cfg = ModelConfig(name_or_path=str(tmp_path))
    model = new_lora_model(cfg)
    assert type(model.get_base_model()).__name__ == "GemmaForCausalLM"
    ids = load_tokenizer(cfg).apply_chat_template(
        [{"role": "user", "content": "What is 3 + 4?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )["input_ids"]
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    assert torch.isfinite(loss) and all(p.grad is not None for _, p in lora_parameters(model))


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_attn_implementation_is_what_the_model_reports(attn):
    model = new_lora_model(ModelConfig(name_or_path="tiny-random-llama", attn_implementation=attn))
    assert model.get_base_model().config._attn_implementation == attn


def test_gradient_checkpointing_gives_the_same_loss_and_lora_grads():
    """Recomputing activations in the backward changes memory, not maths: loss and every LoRA
    gradient agree with the plain run (fp32, dropout off), and checkpointing really is on."""
    tok = load_tokenizer(TINY)
    batch = tok(["the cat sat on the mat", "a b c d e f g h"], return_tensors="pt", padding=True)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    results = []
    for gc in (False, True):
        cfg = ModelConfig(name_or_path="tiny-random-llama", lora_dropout=0.0, gradient_checkpointing=gc)
        model = new_lora_model(cfg, seed=3)
        with torch.no_grad():  # B != 0 so that gradients reach the A factors as well
            for n, p in lora_parameters(model):
                if "lora_B" in n:
                    p.normal_(0, 0.02, generator=torch.Generator().manual_seed(len(n)))
        model.train()
        assert model.get_base_model().is_gradient_checkpointing == gc
        loss = model(**batch, labels=labels).loss
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for _, p in lora_parameters(model)]))
    (l0, g0), (l1, g1) = results
    torch.testing.assert_close(l1, l0)
    assert len(g0) == len(g1) and all(g.abs().sum() > 0 for g in g0)
    for a, b in zip(g0, g1):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-7)
