"""The chat template decides the training and serving format: response = the assistant turn
including its end-of-turn token; instruction = the generation-prompt rendering; decoding stops on
the end-of-turn token as well as eos (real templates of four model families, a tiny tokenizer)."""

import json

import numpy as np
import pytest
import torch

from elrea_ray.config import ModelConfig
from tests.fixtures.chat_templates import TEMPLATES

MESSAGES = [{"role": "user", "content": "What is 3 + 4?"}]
RESPONSE = "7"


def _tokenizer(name):
    from elrea_ray.model import load_tokenizer

    template, bos, eos, eot, others = TEMPLATES[name]
    tok = load_tokenizer(ModelConfig(name_or_path="tiny-random-llama"))
    specials = {"additional_special_tokens": [t for t in [eot, *others] if t not in tok.all_special_tokens]}
    if bos is not None:
        specials["bos_token"] = bos
    specials["eos_token"] = eos
    tok.add_special_tokens(specials)
    tok.chat_template = template
    return tok, eot


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_response_is_assistant_content_and_end_of_turn(name):
    from elrea_ray.data import encode, sft_labels

    tok, eot = _tokenizer(name)
    enc = encode(tok, MESSAGES, RESPONSE, 10**6)
    response_ids = enc["input_ids"][enc["instruction_len"] :]
    eot_id = tok.convert_tokens_to_ids(eot)
    assert response_ids == list(tok(RESPONSE, add_special_tokens=False)["input_ids"]) + [eot_id]
    labels = sft_labels(enc["input_ids"], enc["instruction_len"])
    assert [t for t in labels if t != -100] == response_ids


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_instruction_is_the_generation_prompt_rendering(name):
    from elrea_ray.data import encode, instruction_ids, render_prompt

    tok, _ = _tokenizer(name)
    text = tok.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    want = list(tok(text, add_special_tokens=False)["input_ids"])
    assert render_prompt(tok, MESSAGES) == want
    assert instruction_ids(tok, json.dumps(MESSAGES), 10**6) == want
    enc = encode(tok, MESSAGES, RESPONSE, 10**6)
    assert enc["input_ids"][: enc["instruction_len"]] == want


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_stop_ids_hold_end_of_turn_and_eos(name):
    from elrea_ray.data import stop_ids

    tok, eot = _tokenizer(name)
    ids = stop_ids(tok)
    assert tok.convert_tokens_to_ids(eot) in ids and tok.eos_token_id in ids


def test_long_instruction_keeps_the_assistant_header():
    from elrea_ray.data import encode, instruction_ids, render_prompt

    tok, _ = _tokenizer("llama3")
    long = [{"role": "user", "content": "word " * 200}]
    full = render_prompt(tok, long)
    cut = instruction_ids(tok, json.dumps(long), 16)
    assert len(cut) == 16 and cut == full[-16:]
    assert encode(tok, long, RESPONSE, 16) is None  # a training row that long is dropped


def test_decoder_stops_on_end_of_turn():
    """A tiny model whose first greedy token is the end-of-turn token: with the template's stop
    ids decoding ends there, with eos alone it runs on to max_new_tokens."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from elrea_ray.data import render_prompt, stop_ids
    from elrea_ray.ensemble import ensemble_generate

    tok, eot = _tokenizer("gemma")
    eot_id = tok.convert_tokens_to_ids(eot)
    assert eot_id != tok.eos_token_id
    torch.manual_seed(0)
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(tok),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
            tie_word_embeddings=False,
        )
    ).eval()
    prompt = render_prompt(tok, MESSAGES)
    with torch.no_grad():
        hidden = model.model(torch.tensor([prompt])).last_hidden_state[0, -1]
        model.lm_head.weight.zero_()
        model.lm_head.weight[eot_id] = torch.sign(hidden)  # eot logit = sum |h| > 0, all others 0
    peft = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"]), adapter_name="base")
    weights = np.ones((1, 1))
    stopped = ensemble_generate(peft, [prompt], ["base"], weights, 4, stop_ids(tok), tok.pad_token_id)
    assert stopped == [[]]  # the stop token itself is not part of the output
    ran_on = ensemble_generate(peft, [prompt], ["base"], weights, 4, tok.eos_token_id, tok.pad_token_id)
    assert len(ran_on[0]) == 4 and ran_on[0][0] == eot_id
