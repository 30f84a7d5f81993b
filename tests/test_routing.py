"""Routing weights (ELREA eqs. 5.9-5.10) against numbers worked out by hand."""

import numpy as np
import pytest
import torch

from elrea_ray.routing import one_hot_weights, route, sparsify, uniform_weights

# Three centroids e1, e2, e3 and the feature x = (0.8, 0.6, 0):
#   cos = (0.8, 0.6, 0.0); mean = 1.4 / 3 = 0.466667
#   population std = sqrt((0.333333^2 + 0.133333^2 + 0.466667^2) / 3) = sqrt(0.115556) = 0.339935
#   standardised = (0.980581, 0.392232, -1.372813)
#   exp = (2.666004, 1.480281, 0.253393), sum 4.399678
#   softmax = (0.605954, 0.336452, 0.057594); base weight = 1 - 0.8 = 0.2
CENTROIDS = np.eye(3)
X = np.array([[0.8, 0.6, 0.0]])
HAND = [0.6059542412, 0.3364521932, 0.0575935655]


def test_hand_computed_example():
    experts, base = route(X, CENTROIDS)
    assert experts.shape == (1, 3) and base.shape == (1,) and experts.dtype == np.float64
    assert experts[0] == pytest.approx(HAND, abs=1e-9)
    assert base[0] == pytest.approx(0.2, abs=1e-12)  # raw cosine, not standardised


def test_torch_float32_input_gives_the_same_weights():
    experts, base = route(torch.tensor(X, dtype=torch.float32), torch.tensor(CENTROIDS, dtype=torch.float32))
    assert experts[0] == pytest.approx(HAND, abs=1e-6) and base[0] == pytest.approx(0.2, abs=1e-6)


def test_temperature_divides_the_standardised_cosines():
    # tau = 0.5: exp(2 z) = (7.107577, 2.191233, 0.064208) -> (0.759112, 0.234031, 0.006858)
    sharp, base = route(X, CENTROIDS, temperature=0.5)
    assert sharp[0] == pytest.approx([0.7591117103, 0.2340306610, 0.0068576287], abs=1e-9)
    # tau = 2: exp(z / 2) = (1.632790, 1.216668, 0.503382) -> (0.486987, 0.362877, 0.150136)
    flat, _ = route(X, CENTROIDS, temperature=2.0)
    assert flat[0] == pytest.approx([0.4869871932, 0.3628768871, 0.1501359196], abs=1e-9)
    assert base[0] == pytest.approx(0.2)  # the base weight ignores the temperature


def test_top_k_zeroes_the_rest_without_renormalising():
    experts, base = route(X, CENTROIDS, top_k=2)
    assert experts[0] == pytest.approx([HAND[0], HAND[1], 0.0], abs=1e-9)
    assert experts.sum() == pytest.approx(HAND[0] + HAND[1]) and base[0] == pytest.approx(0.2)
    top1, _ = route(X, CENTROIDS, top_k=1)
    assert top1[0] == pytest.approx([HAND[0], 0.0, 0.0], abs=1e-9)
    assert np.array_equal(route(X, CENTROIDS, top_k=3)[0], route(X, CENTROIDS)[0])


def test_equal_cosines_give_equal_expert_weights():
    x = np.array([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    centroids = np.array([[0.0, 1.0, 0.0], [0.0, -1.0, 0.0]])  # both orthogonal to x: std = 0
    experts, base = route(x, centroids)
    assert np.array_equal(experts, np.full((2, 2), 0.5)) and np.allclose(base, 1.0)


def test_rows_are_independent_and_weights_sum_to_one():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((5, 16))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    c = rng.standard_normal((4, 16))
    c /= np.linalg.norm(c, axis=1, keepdims=True)
    experts, base = route(x, c)
    assert np.allclose(experts.sum(axis=1), 1.0)
    assert np.allclose(base, 1 - (x @ c.T).max(axis=1))
    single, _ = route(x[2], c)  # a [d] feature is one row
    assert np.allclose(single[0], experts[2])


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"temperature": 0.0}, "temperature"),
        ({"temperature": -1.0}, "temperature"),
        ({"top_k": 0}, "top_k"),
        ({"top_k": 4}, "top_k"),
    ],
)
def test_bad_arguments_name_themselves(kwargs, name):
    with pytest.raises(ValueError, match=name):
        route(X, CENTROIDS, **kwargs)


def test_mismatched_dimensions_are_rejected():
    with pytest.raises(ValueError, match="centroids"):
        route(X, np.eye(4))


def test_uniform_and_one_hot_weights():
    experts, base = uniform_weights(2, 3)
    assert np.array_equal(experts, np.ones((2, 3))) and np.array_equal(base, np.ones(2))
    experts, base = one_hot_weights(2, 3, -1)  # the base adapter alone
    assert not experts.any() and np.array_equal(base, np.ones(2))
    experts, base = one_hot_weights(2, 3, 1)  # expert 1 alone
    assert np.array_equal(experts, [[0, 1, 0], [0, 1, 0]]) and not base.any()
    with pytest.raises(ValueError, match="index"):
        one_hot_weights(2, 3, 3)


def test_min_weight_zeroes_small_weights_but_keeps_the_top_expert():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((6, 16))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    c = rng.standard_normal((4, 16))
    c /= np.linalg.norm(c, axis=1, keepdims=True)
    dense_e, dense_b = route(x, c)
    e, b = route(x, c, min_weight=0.3)
    kept = dense_e >= 0.3
    kept[np.arange(6), dense_e.argmax(1)] = True
    assert np.array_equal(e, np.where(kept, dense_e, 0.0))  # survivors keep their exact weight
    assert np.array_equal(b, np.where(dense_b >= 0.3, dense_b, 0.0))
    assert (e > 0).sum(1).min() >= 1 and (e == 0).any()
    e_all, _ = route(x, c, min_weight=0.99)  # nothing reaches it: only each row's top expert runs
    assert np.array_equal((e_all > 0).sum(1), np.ones(6))
    with pytest.raises(ValueError, match="min_weight"):
        route(x, c, min_weight=1.0)


def test_sparsify_applies_top_k_and_min_weight_as_route_does():
    # the distilled router's dense weights go through the same rule as the gradient router's
    rng = np.random.default_rng(4)
    x = rng.standard_normal((6, 16))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    c = rng.standard_normal((4, 16))
    c /= np.linalg.norm(c, axis=1, keepdims=True)
    dense = route(x, c)
    for kw in ({"top_k": 2}, {"min_weight": 0.3}, {"top_k": 1, "min_weight": 0.5}):
        for a, b in zip(sparsify(*dense, **kw), route(x, c, **kw)):
            assert np.array_equal(a, b), kw
    before = dense[0].copy()
    e, _ = sparsify(*dense, top_k=2)
    assert (e == 0).any() and np.array_equal(dense[0], before)  # a copy: the dense weights stay
    with pytest.raises(ValueError, match="top_k"):
        sparsify(*dense, top_k=5)
