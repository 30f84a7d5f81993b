"""Epoch checkpoints and ELREA gradient features (paper eq. 5.5-5.7) on the tiny random Llama."""

from __future__ import annotations

import dataclasses
import json
import shutil

import numpy as np
import pytest
import torch

from elrea_ray.checkpoints import load_adam_state, parameter_layout, save_epoch_checkpoint
from elrea_ray.config import ModelConfig
from elrea_ray.gradients import FeatureExtractor, per_example_grads
from elrea_ray.model import load_adapters, load_tokenizer, lora_parameters, new_lora_model
from elrea_ray.projection import ProjectorSpec, make_projector

CFG = ModelConfig(name_or_path="tiny-random-llama", lora_dropout=0.0)
D_PROJ = 512


def train_epochs(folder, epochs=2, steps_per_epoch=3, seed=0, cfg=CFG):
    """A few Adam steps on random tokens per "epoch", so LoRA B != 0 and Adam moments exist;
    an epoch checkpoint after each. Returns the folders and the optimizer state at each."""
    model = new_lora_model(cfg, seed=seed)
    params = [p for _, p in lora_parameters(model)]
    opt = torch.optim.Adam(params, lr=1e-2)
    gen = torch.Generator().manual_seed(seed)
    folders, snapshots, step = [], [], 0
    for epoch in range(1, epochs + 1):
        for _ in range(steps_per_epoch):
            ids = torch.randint(3, model.config.vocab_size, (4, 12), generator=gen)
            model(input_ids=ids, labels=ids).loss.backward()
            opt.step()
            opt.zero_grad()
            step += 1
        f = folder / f"epoch-{epoch}"
        save_epoch_checkpoint(f, model, opt, step=step, lr=1e-2 / epoch, mean_lr=1e-2 / (epoch + 1), epoch=epoch)
        folders.append(f)
        snapshots.append({n: {k: v.clone() for k, v in opt.state[p].items()} for n, p in lora_parameters(model)})
    return model, folders, snapshots


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    model, folders, snapshots = train_epochs(tmp_path_factory.mktemp("ckpt"))
    return {"model": model, "folders": folders, "snapshots": snapshots}


def random_batch(lengths, vocab, seed=1, left=False):
    gen = torch.Generator().manual_seed(seed)
    seqs = [torch.randint(3, vocab, (n,), generator=gen) for n in lengths]
    t = max(lengths)
    ids = torch.zeros(len(seqs), t, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, s in enumerate(seqs):
        sl = slice(t - len(s), t) if left else slice(0, len(s))
        ids[i, sl], mask[i, sl] = s, 1
    return seqs, ids, mask, ids.masked_fill(mask == 0, -100)


def flat_grad(model):
    return torch.cat([p.grad.reshape(-1) for _, p in lora_parameters(model)])


@pytest.fixture(scope="module")
def grad_model(trained):
    return load_adapters(CFG, {"default": str(trained["folders"][1])}, is_trainable=True).eval()


@pytest.mark.parametrize("left", [False, True])
def test_per_example_grads_equal_an_autograd_loop(grad_model, left):
    lengths = [5, 12, 3, 9]
    seqs, ids, mask, labels = random_batch(lengths, grad_model.config.vocab_size, left=left)
    batched = per_example_grads(grad_model, ids, mask, labels)
    assert batched.shape == (4, sum(p.numel() for _, p in lora_parameters(grad_model)))
    for i, s in enumerate(seqs):
        grad_model.zero_grad()
        # HF's loss for one unpadded example is its own mean over its labelled tokens.
        grad_model(input_ids=s[None], labels=s[None]).loss.backward()
        ref = flat_grad(grad_model)
        assert ref.abs().max() > 0
        rel = (batched[i] - ref).norm() / ref.norm()
        assert rel < 1e-5, f"example {i} (length {lengths[i]}): relative error {rel:.2e}"
    grad_model.zero_grad()


def test_per_example_grads_leave_the_model_grads_alone(grad_model):
    grad_model.zero_grad(set_to_none=True)
    _, ids, mask, labels = random_batch([4, 6], grad_model.config.vocab_size)
    per_example_grads(grad_model, ids, mask, labels)
    assert all(p.grad is None for _, p in lora_parameters(grad_model))


def adam_transform(g, state, names_shapes):
    """Eq. 5.5 with bias correction, no LR factor, written out plainly."""
    m = torch.cat([state.exp_avg[n].reshape(-1) for n, _ in names_shapes])
    v = torch.cat([state.exp_avg_sq[n].reshape(-1) for n, _ in names_shapes])
    t = state.step + 1
    m2 = (state.beta1 * m + (1 - state.beta1) * g) / (1 - state.beta1**t)
    v2 = (state.beta2 * v + (1 - state.beta2) * g * g) / (1 - state.beta2**t)
    return m2 / (torch.sqrt(v2) + state.eps)


@pytest.fixture(scope="module")
def extractor(trained):
    f1, f2 = trained["folders"]
    return FeatureExtractor(CFG, [str(f1), str(f2)], [3.0, 1.0], "countsketch", d_proj=D_PROJ, batch_size=4)


def some_instructions(n=7, seed=3):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 500, (int(k),), generator=gen).tolist() for k in torch.randint(2, 20, (n,), generator=gen)]


def test_features_are_unit_norm_and_deterministic(trained, extractor):
    x = some_instructions()
    a = extractor.features(x)
    assert a.shape == (len(x), D_PROJ) and a.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(a, axis=1), 1.0, atol=1e-5)
    f1, f2 = trained["folders"]
    again = FeatureExtractor(CFG, [str(f1), str(f2)], [3.0, 1.0], "countsketch", d_proj=D_PROJ, batch_size=4)
    np.testing.assert_array_equal(again.features(x), a)


def test_feature_does_not_depend_on_batch(trained, extractor):
    x = some_instructions()
    together = extractor.features(x)
    alone = np.concatenate([extractor.features([xi]) for xi in x])
    np.testing.assert_allclose(together, alone, atol=1e-5)
    f1, f2 = trained["folders"]
    small = FeatureExtractor(CFG, [str(f1), str(f2)], [3.0, 1.0], "countsketch", d_proj=D_PROJ, batch_size=3)
    np.testing.assert_allclose(small.features(x[::-1])[::-1], together, atol=1e-5)


def test_response_tokens_do_not_change_the_feature(extractor):
    tok = load_tokenizer(CFG)

    def encode(prompt, response):
        """The pipeline's split: instruction = the chat prompt up to the assistant turn."""
        instr = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True)["input_ids"]
        full = tok.apply_chat_template(
            [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
        )["input_ids"]
        assert full[: len(instr)] == instr
        return full, len(instr)

    rows = [
        encode("What is 3 + 4?", "7"),
        encode("What is 3 + 4?", "The answer is 12 * 7 = 84."),
        encode("Spell this word backward: hello", "olleh"),
    ]
    feats = extractor.features([ids[:n] for ids, n in rows])
    np.testing.assert_allclose(feats[0], feats[1], atol=1e-6)
    assert float(feats[0] @ feats[2]) < 0.99


def test_one_hot_epoch_weights_give_that_epoch_alone(trained):
    f1, f2 = trained["folders"]
    only1 = FeatureExtractor(CFG, [str(f1), str(f2)], [1.0, 0.0], "countsketch", d_proj=D_PROJ)
    x = some_instructions(4)
    got = only1.features(x)

    model = load_adapters(CFG, {"default": str(f1)}, is_trainable=True).eval()
    layout = parameter_layout(model)
    assert layout == only1.layout == parameter_layout(trained["model"])
    spec = ProjectorSpec(kind="countsketch", d_in=sum(int(np.prod(s)) for _, s in layout), d_proj=D_PROJ)
    assert only1.projector_spec == spec
    state = load_adam_state(f1)
    lengths = [len(xi) for xi in x]
    ids = torch.zeros(len(x), max(lengths), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, xi in enumerate(x):
        ids[i, : len(xi)], mask[i, : len(xi)] = torch.tensor(xi), 1
    g = per_example_grads(model, ids, mask, ids.masked_fill(mask == 0, -100))
    proj = make_projector(spec).project(adam_transform(g, state, layout))
    want = (proj / proj.norm(dim=1, keepdim=True)).numpy()
    np.testing.assert_allclose(got, want, atol=1e-5)

    only2 = FeatureExtractor(CFG, [str(f1), str(f2)], [0.0, 1.0], "countsketch", d_proj=D_PROJ)
    assert np.abs(only2.features(x) - got).max() > 1e-3


def test_adam_state_round_trips(trained):
    for epoch, (folder, snap) in enumerate(zip(trained["folders"], trained["snapshots"]), start=1):
        state = load_adam_state(folder)
        assert (state.step, state.epoch) == (3 * epoch, epoch)
        assert state.lr == pytest.approx(1e-2 / epoch) and state.mean_lr == pytest.approx(1e-2 / (epoch + 1))
        assert (state.beta1, state.beta2, state.eps) == (0.9, 0.999, 1e-8)
        assert set(state.exp_avg) == set(state.exp_avg_sq) == set(snap)  # safetensors sorts keys
        for name, s in snap.items():
            torch.testing.assert_close(state.exp_avg[name], s["exp_avg"], rtol=0, atol=0)
            torch.testing.assert_close(state.exp_avg_sq[name], s["exp_avg_sq"], rtol=0, atol=0)
    assert (trained["folders"][0] / "adapter_config.json").exists()
    assert (trained["folders"][0] / "adapter_model.safetensors").exists()


def test_incomplete_checkpoint_names_the_missing_file(trained, tmp_path):
    broken = tmp_path / "epoch-1"
    shutil.copytree(trained["folders"][0], broken)
    (broken / "adam_state.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"epoch-1.*adam_state\.safetensors"):
        load_adam_state(broken)
    with pytest.raises(FileNotFoundError, match="adam_state.safetensors"):
        FeatureExtractor(CFG, [str(broken)], [1.0], d_proj=D_PROJ)
    shutil.copy(trained["folders"][0] / "adam_state.safetensors", broken)
    meta = json.loads((broken / "optimizer_state.json").read_text())
    del meta["step"]
    (broken / "optimizer_state.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"optimizer_state\.json lacks step"):
        load_adam_state(broken)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_adam_state(tmp_path / "nowhere")


def test_projecting_the_preconditioned_gradients_gives_the_features(extractor):
    # R is linear: R(sum_e w_e gamma_e) is eq. 5.7's sum_e w_e R gamma_e (two epochs here).
    x = some_instructions(5)
    g = extractor.preconditioned_gradients(x)
    assert g.shape == (5, extractor.d_in)
    want = extractor.projector.project(g)
    np.testing.assert_allclose(extractor.features(x), (want / want.norm(dim=1, keepdim=True)).numpy(), atol=1e-5)


def test_a_variant_shares_the_model_and_matches_a_fresh_extractor(trained, extractor):
    x = some_instructions(5)
    v = extractor.variant(projector="sparse_jl", batch_size=2)
    assert v.model is extractor.model and v.projector_spec.kind == "sparse_jl"
    f1, f2 = trained["folders"]
    fresh = FeatureExtractor(CFG, [str(f1), str(f2)], [3.0, 1.0], "sparse_jl", d_proj=D_PROJ, batch_size=5)
    np.testing.assert_allclose(v.features(x), fresh.features(x), atol=1e-5)
    np.testing.assert_allclose(extractor.features(x), extractor.variant().features(x), atol=0)


def test_bf16_autocast_features_stay_close_to_fp32(extractor):
    x = some_instructions(6)
    full = extractor.features(x)
    mixed = extractor.variant(mixed_precision=True).features(x)
    cos = (full * mixed).sum(1)
    assert (cos > 0.99).all(), cos
    assert np.abs(full - mixed).max() > 0  # autocast did change the arithmetic


def test_a_shared_model_gives_the_same_features_and_decodes_its_own_adapters(trained, extractor):
    """Serving puts the epoch adapter on the ensemble's own backbone (one copy per replica): the
    features equal a standalone extractor's, before and after the ensemble decodes."""
    from elrea_ray.ensemble import ensemble_generate
    from elrea_ray.model import load_adapters

    f1, f2 = trained["folders"]
    ensemble = load_adapters(CFG, {"base": str(f2), "expert-00": str(f1)})
    shared = FeatureExtractor(
        CFG, [str(f1), str(f2)], [3.0, 1.0], "countsketch", d_proj=D_PROJ, batch_size=4, model=ensemble
    )
    assert shared.model is ensemble and shared.layout == extractor.layout
    x = some_instructions()
    want = extractor.features(x)
    np.testing.assert_allclose(shared.features(x), want, rtol=0, atol=1e-6)
    w = np.array([[0.5, 0.5]] * 2)
    alone = load_adapters(CFG, {"base": str(f2), "expert-00": str(f1)})
    assert ensemble_generate(ensemble, x[:2], ["base", "expert-00"], w, 4, None, 0) == ensemble_generate(
        alone, x[:2], ["base", "expert-00"], w, 4, None, 0
    )
    ensemble.set_adapter("base")  # whatever another caller left active
    np.testing.assert_allclose(shared.features(x), want, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="already has an adapter"):
        FeatureExtractor(CFG, [str(f1)], [1.0], d_proj=D_PROJ, model=ensemble)


def test_stacked_copies_equal_one_pass_per_weight_set(trained):
    """`copies`: the batch under E weight sets in one pass equals E passes with each loaded."""
    from elrea_ray.gradients import stack_lora_weights

    f1, f2 = trained["folders"]
    model = load_adapters(CFG, {"default": str(f1)}, is_trainable=True).eval()
    flat = []
    for f in (f1, f2):
        m = load_adapters(CFG, {"default": str(f)}, is_trainable=True).eval()
        flat.append(torch.cat([p.detach().reshape(-1) for _, p in lora_parameters(m)]))
    _, ids, mask, labels = random_batch([6, 11, 2, 8], model.config.vocab_size, seed=5)
    stacked = per_example_grads(model, ids, mask, labels, copies=stack_lora_weights(model, flat))
    assert stacked.shape == (8, flat[0].numel())
    for e, f in enumerate((f1, f2)):
        alone = load_adapters(CFG, {"default": str(f)}, is_trainable=True).eval()
        want = per_example_grads(alone, ids, mask, labels)
        rel = (stacked[e * 4 : (e + 1) * 4] - want).norm(dim=1) / want.norm(dim=1)
        assert (rel < 1e-5).all(), f"weights {e}: relative errors {rel.tolist()}"
    assert (stacked[:4] - stacked[4:]).abs().max() > 1e-4  # the two weight sets differ
    with pytest.raises(ValueError, match="copies must hold one"):
        per_example_grads(model, ids, mask, labels, copies=stack_lora_weights(model, flat)[1:])
    with pytest.raises(ValueError, match=r"flat_weights\[1\]"):
        stack_lora_weights(model, [flat[0], flat[1][:-1]])


def write_bundle(root, cfg, folders, epoch_weights, d_proj, centroids):
    """A serving bundle of the pipeline's format: base = the last epoch, one expert per centroid."""
    from safetensors.numpy import save_file

    from elrea_ray.bundle import BUNDLE_FORMAT_VERSION
    from elrea_ray.config import RoutingConfig

    rel = lambda p: str(p.relative_to(root))  # noqa: E731
    model = load_adapters(cfg, {"default": str(folders[-1])}, is_trainable=True)
    layout = parameter_layout(model)
    save_file({"centroids": centroids.astype(np.float32)}, str(root / "centroids.safetensors"))
    bundle = {
        "format_version": BUNDLE_FORMAT_VERSION,
        "model": dataclasses.asdict(cfg),
        "adapters": {
            "base": rel(folders[-1]),
            **{f"expert-{c:02d}": rel(folders[c % len(folders)]) for c in range(len(centroids))},
        },
        "epoch_checkpoints": [rel(f) for f in folders],
        "epoch_weights": list(epoch_weights),
        "projector": ProjectorSpec(
            kind="countsketch", d_in=sum(int(np.prod(s)) for _, s in layout), d_proj=d_proj
        ).to_dict(),
        "parameter_layout": layout,
        "centroids": "centroids.safetensors",
        "num_clusters": len(centroids),
        "routing": dataclasses.asdict(RoutingConfig()),
        "keys": {},
    }
    (root / "bundle.json").write_text(json.dumps(bundle))
    return bundle


def test_engine_route_equals_a_plain_autograd_loop(tmp_path):
    """Served routing weights (both epoch checkpoints in one stacked pass, batched prompts of
    different lengths, LoRA dropout 0.1 in the adapter config) equal the paper's recipe done
    one prompt and one epoch at a time: HF loss.backward(), flattened .grad, eq. 5.5, R, mean
    over epochs, L2 norm, eqs. 5.9-5.10."""
    from elrea_ray.routing import route
    from elrea_ray.serving import Engine

    cfg = ModelConfig(name_or_path="tiny-random-llama", lora_dropout=0.1, dtype="float32")
    _, folders, _ = train_epochs(tmp_path / "adapters", seed=4, cfg=cfg)
    assert json.loads((folders[0] / "adapter_config.json").read_text())["lora_dropout"] == 0.1
    weights = [3.0, 1.0]
    prompts = [
        torch.randint(3, 500, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (7, 2, 19, 4, 12)
    ]

    # The reference, one prompt and one epoch at a time.
    layout, per_epoch = None, []
    for f in folders:
        model = load_adapters(cfg, {"default": str(f)}, is_trainable=True).eval()
        layout = parameter_layout(model)
        state, rows = load_adam_state(f), []
        for x in prompts:
            model.zero_grad()
            model(input_ids=torch.tensor([x]), labels=torch.tensor([x])).loss.backward()
            rows.append(adam_transform(flat_grad(model), state, layout))
        per_epoch.append(torch.stack(rows))
    mixed = (weights[0] * per_epoch[0] + weights[1] * per_epoch[1]) / sum(weights)
    spec = ProjectorSpec(kind="countsketch", d_in=mixed.shape[1], d_proj=D_PROJ)
    want_feats = make_projector(spec).project(mixed)
    want_feats = (want_feats / want_feats.norm(dim=1, keepdim=True)).numpy()
    # Centroids near the prompts' own features, so the cosines spread and the weights are not flat.
    rng = np.random.default_rng(0)
    centroids = want_feats[[0, 2, 4]] + 0.5 * rng.standard_normal((3, D_PROJ)) / np.sqrt(D_PROJ)
    centroids /= np.linalg.norm(centroids, axis=1, keepdims=True)
    ew, bw = route(want_feats, centroids)
    want = np.concatenate([bw[:, None], ew], axis=1)
    assert want[:, 1:].max() > 0.5 and want[:, 0].min() > 0.01  # routing is neither flat nor trivial

    write_bundle(tmp_path, cfg, folders, weights, D_PROJ, centroids)
    engine = Engine(tmp_path)
    assert engine.fx._copies is not None  # the stacked path is the one under test
    got = engine.route(prompts, [None] * len(prompts))
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
    np.testing.assert_allclose(engine.fx.features(prompts), want_feats, rtol=0, atol=1e-5)
    one = np.concatenate([engine.route([x], [None]) for x in prompts])  # batch of 1 as served alone
    np.testing.assert_allclose(one, want, rtol=0, atol=1e-5)
