"""The distilled router: a head on pooled hidden states that reproduces gradient routing weights."""

import numpy as np
import pytest
import torch

from elrea_ray.config import ModelConfig
from elrea_ray.distill import DistilledRouter, fit_router, pooled_hidden_states, top1_agreement
from elrea_ray.routing import route


def _planted(n: int, seed: int, H: int = 32, C: int = 4):
    """Hidden states of C groups, and gradient features that follow the same groups with a
    per-prompt spread that the hidden state also shows (as when an instruction's kind and how
    typical it is decide both), routed by the real routing rule."""
    rng = np.random.default_rng(seed)
    group = rng.integers(0, C, n)
    spread = rng.uniform(0.1, 0.6, n)
    centres_h = np.random.default_rng(100).normal(size=(C, H))
    h = centres_h[group] + 0.6 * rng.normal(size=(n, H))
    h[:, 0] = 4 * spread + 0.05 * rng.normal(size=n)
    centres_f = np.linalg.qr(np.random.default_rng(101).normal(size=(64, C)))[0].T  # C orthonormal [C, 64]
    f = centres_f[group] + spread[:, None] * rng.normal(size=(n, 64)) / 8
    f /= np.linalg.norm(f, axis=1, keepdims=True)
    experts, base = route(f, centres_f)
    return h.astype(np.float32), experts, base


@pytest.mark.parametrize("hidden", [0, 64])
def test_the_head_reproduces_the_gradient_routing_on_held_out_prompts(hidden):
    h, w, b = _planted(600, seed=0)
    router = fit_router(h, w, b, hidden=hidden, seed=0)
    h2, w2, b2 = _planted(300, seed=1)
    pw, pb = router.predict(h2)
    assert pw.shape == w2.shape and pb.shape == b2.shape
    np.testing.assert_allclose(pw.sum(1), 1.0, atol=1e-9)
    assert top1_agreement(pw, w2) >= 0.95
    if hidden == 0:  # the default head; the ReLU layer overfits the base weight on 600 prompts
        assert np.abs(pb - b2).mean() < 0.5 * np.abs(b2 - np.median(b)).mean()


def test_shuffled_targets_do_not_give_agreement():
    # the test above can fail: a head fitted to targets unrelated to the inputs does not agree
    h, w, b = _planted(600, seed=0)
    perm = np.random.default_rng(0).permutation(len(w))
    router = fit_router(h, w[perm], b[perm], seed=0)
    h2, w2, _ = _planted(300, seed=1)
    assert top1_agreement(router.predict(h2)[0], w2) < 0.6


def test_save_and_load_give_the_same_weights(tmp_path):
    h, w, b = _planted(200, seed=0)
    router = fit_router(h, w, b, hidden=16, epochs=20)
    router.save(tmp_path / "router")
    again = DistilledRouter.load(tmp_path / "router")
    for a, c in zip(router.predict(h), again.predict(h)):
        np.testing.assert_array_equal(a, c)
    (tmp_path / "router" / "router.json").write_text('{"kind": "other"}')
    with pytest.raises(ValueError, match="is not a distilled router"):
        DistilledRouter.load(tmp_path / "router")


def test_bad_shapes_are_named():
    with pytest.raises(ValueError, match="h has 5 rows"):
        fit_router(np.zeros((5, 3)), np.zeros((4, 2)), np.zeros(4))


def test_pooled_hidden_states_do_not_depend_on_the_batch():
    from elrea_ray.model import new_lora_model

    model = new_lora_model(ModelConfig(name_or_path="tiny-random-llama", lora_dropout=0.0), seed=0)
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 200, (n,), generator=gen).tolist() for n in (5, 9, 3, 12)]
    together = pooled_hidden_states(model, prompts, pad_token_id=0, batch_size=4)
    alone = np.concatenate([pooled_hidden_states(model, [p], pad_token_id=0) for p in prompts])
    assert together.shape == (4, model.config.hidden_size)
    np.testing.assert_allclose(together, alone, rtol=1e-4, atol=1e-5)


def test_a_bundle_that_routes_by_a_router_it_lacks_is_refused(tmp_path):
    import json

    from elrea_ray.bundle import BundleError, load_bundle

    (tmp_path / "centroids.safetensors").write_bytes(b"")
    bundle = {
        "format_version": 1,
        "adapters": {},
        "epoch_checkpoints": [],
        "centroids": "centroids.safetensors",
        "routing": {"method": "distilled"},
    }
    (tmp_path / "bundle.json").write_text(json.dumps(bundle))
    with pytest.raises(BundleError, match="routing.method is distilled but the bundle has no router"):
        load_bundle(tmp_path)
    (tmp_path / "bundle.json").write_text(json.dumps({**bundle, "router": "router"}))
    with pytest.raises(BundleError, match="lists router, which does not exist"):
        load_bundle(tmp_path)
    (tmp_path / "router").mkdir()
    assert load_bundle(tmp_path)[1]["router"] == "router"
    (tmp_path / "bundle.json").write_text(json.dumps({**bundle, "routing": {}}))  # older bundles: gradient
    assert "router" not in load_bundle(tmp_path)[1]
