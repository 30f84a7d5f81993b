"""Random projections: defined by the spec alone, batch-independent, O(D) tables, JL-faithful."""

import math

import numpy as np
import pytest
import torch

import elrea_ray.projection as projection
from elrea_ray.projection import KINDS, ProjectorSpec, make_projector

MASK = (1 << 64) - 1


def unit_rows(n, d, seed=0):
    x = torch.randn(n, d, generator=torch.Generator().manual_seed(seed))
    return x / x.norm(dim=1, keepdim=True)


def planted(n_per, centers, d, seed=0):
    """Vectors around `centers` random directions, so that true cosines span ~0 to ~0.5."""
    g = torch.Generator().manual_seed(seed)
    mus = torch.randn(centers, d, generator=g)
    mus = mus / mus.norm(dim=1, keepdim=True)
    x = mus.repeat_interleave(n_per, 0) + torch.randn(centers * n_per, d, generator=g) / math.sqrt(d)
    return x / x.norm(dim=1, keepdim=True)


def pairwise_cos(x):
    x = x / x.norm(dim=1, keepdim=True)
    iu = torch.triu_indices(len(x), len(x), 1)
    return (x @ x.T)[iu[0], iu[1]]


def reference_hash(key, index):
    """SplitMix64 output `index` for state `key`, in plain Python integers (no torch)."""
    z = (key + (index + 1) * 0x9E3779B97F4A7C15) & MASK
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK
    return z ^ (z >> 31)


def test_hash_matches_a_plain_integer_reference():
    # torch int64 wraparound must equal arithmetic mod 2^64: that is what makes the projection
    # independent of device and torch version.
    key = projection.stream_key(7, "rademacher")
    index = [0, 1, 2, 12345, 2**40 + 7, 2**62 - 1]
    got = projection.hash64(key, torch.tensor(index))
    assert [int(h) & MASK for h in got] == [reference_hash(key & MASK, i) for i in index]


def test_rademacher_entries_follow_the_documented_formula():
    spec = ProjectorSpec("rademacher", d_in=50, d_proj=100, seed=3)
    rows = make_projector(spec).project(torch.eye(50))  # row i = R[i, :] / sqrt(d_proj)
    assert torch.equal(rows.abs(), torch.full_like(rows, 1 / math.sqrt(100)))
    key, words = projection.stream_key(3, "rademacher") & MASK, math.ceil(100 / 64)
    for i, j in [(0, 0), (0, 63), (0, 64), (7, 99), (49, 42)]:
        bit = (reference_hash(key, i * words + j // 64) >> (j % 64)) & 1
        assert rows[i, j].item() == pytest.approx((1 - 2 * bit) / math.sqrt(100))


@pytest.mark.parametrize("kind", KINDS)
def test_same_spec_same_output_across_constructions_and_batch_splits(kind):
    spec = ProjectorSpec(kind, d_in=30_000, d_proj=512, seed=1)
    x = torch.randn(7, spec.d_in)
    a = make_projector(spec).project(x)
    b = make_projector(spec).project(x)
    split = torch.cat([make_projector(spec).project(part) for part in (x[:3], x[3:4], x[4:])])
    assert a.shape == (7, 512) and a.dtype == torch.float32
    assert torch.equal(a, b) and torch.equal(a, split)
    assert torch.equal(make_projector(spec).project(x[5]), a[5])  # a single [D] vector


@pytest.mark.parametrize("kind", KINDS)
def test_different_seed_gives_a_different_projection(kind):
    x = torch.randn(2, 5_000)
    a = make_projector(ProjectorSpec(kind, 5_000, 256, seed=0)).project(x)
    b = make_projector(ProjectorSpec(kind, 5_000, 256, seed=1)).project(x)
    assert not torch.allclose(a, b)


def test_uncached_rademacher_is_tiled_and_equals_the_cached_matrix(monkeypatch):
    spec = ProjectorSpec("rademacher", d_in=3_000, d_proj=300, seed=2, block_size=128)
    x = torch.randn(3, spec.d_in, dtype=torch.float64)
    cached = make_projector(spec)
    assert cached._cached is not None  # 0.9M entries: below the cache limit
    monkeypatch.setattr(projection, "_CACHE_LIMIT", 0)
    monkeypatch.setattr(projection, "_TILE_ENTRIES_CPU", 128 * 500)
    tiled = make_projector(spec)
    shapes = []
    signs = tiled.signs
    monkeypatch.setattr(tiled, "signs", lambda *a: shapes.append(tuple(signs(*a).shape)) or signs(*a))
    out = tiled.project(x)
    assert tiled._cached is None and max(r * c for r, c in shapes) <= 128 * 500
    assert torch.allclose(out, cached.project(x), atol=1e-5)
    # block_size changes the tiling, never the matrix.
    wide = make_projector(ProjectorSpec("rademacher", 3_000, 300, seed=2, block_size=300))
    assert torch.allclose(out, wide.project(x), atol=1e-5)


def test_countsketch_tables_are_linear_in_d_for_a_huge_gradient():
    # D x d_proj would be 4.1e11 entries (1.6 TB as float32); the tables are 8 bytes per coordinate.
    spec = ProjectorSpec("countsketch", d_in=50_000_000, d_proj=8192)
    proj = make_projector(spec)
    ((buckets, signs),) = proj.tables
    assert buckets.numel() * buckets.element_size() + signs.numel() * signs.element_size() == 8 * spec.d_in
    assert int(buckets.min()) >= 0 and int(buckets.max()) < 8192
    counts = torch.bincount(buckets[:1_000_000].long(), minlength=8192).double()
    assert abs(counts.mean().item() - 1e6 / 8192) < 1e-6 and counts.std().item() < 1.3 * math.sqrt(1e6 / 8192)


@pytest.mark.parametrize("kind", KINDS)
def test_inner_products_are_preserved_within_the_jl_bound(kind):
    x = unit_rows(24, 20_000, seed=4)
    y = make_projector(ProjectorSpec(kind, 20_000, 2048, seed=5)).project(x)
    # Each inner product has std ~ sqrt(2 / d_proj) = 0.031; 5 std over 276 pairs.
    assert (y @ y.T - x @ x.T).abs().max() < 0.16
    assert ((y.norm(dim=1) - 1).abs() < 0.1).all()


@pytest.mark.parametrize("kind", ["countsketch", "sparse_jl"])
def test_sketches_are_unbiased(kind):
    x, y = unit_rows(2, 2_000, seed=6)
    xy = torch.stack([x, y])
    pairs = [make_projector(ProjectorSpec(kind, 2_000, 64, seed=s)).project(xy) for s in range(300)]
    estimate = torch.tensor([float(p[0] @ p[1]) for p in pairs])
    # 300 draws of an estimator with std ~ sqrt(2 / 64) = 0.18: the mean has std 0.01; allow 3.5 std.
    assert abs(estimate.mean().item() - float(x @ y)) < 0.035


def test_countsketch_cosines_track_the_dense_projection():
    x = planted(10, 4, 20_000, seed=7)  # 40 vectors, true cosines from ~0 to ~0.5
    dense = make_projector(ProjectorSpec("rademacher", 20_000, 2048, seed=0)).project(x)
    sketch = make_projector(ProjectorSpec("countsketch", 20_000, 2048, seed=0)).project(x)
    r = np.corrcoef(pairwise_cos(dense).numpy(), pairwise_cos(sketch).numpy())[0, 1]
    assert r > 0.9


def test_spec_round_trips_and_validates():
    spec = ProjectorSpec("sparse_jl", 100, 16, seed=9, nnz=2)
    assert ProjectorSpec.from_dict(spec.to_dict()) == spec
    with pytest.raises(ValueError, match="kind"):
        ProjectorSpec("gaussian", 100, 16)
    with pytest.raises(ValueError, match="d_proj"):
        ProjectorSpec("countsketch", 100, 0)
    with pytest.raises(ValueError, match="unknown keys"):
        ProjectorSpec.from_dict({**spec.to_dict(), "model_id": 0})
    with pytest.raises(ValueError, match="grads"):
        make_projector(spec).project(torch.zeros(2, 99))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="device check: needs CUDA")
@pytest.mark.parametrize("kind", KINDS)
def test_cpu_and_cuda_give_the_same_projection(kind):
    spec = ProjectorSpec(kind, d_in=200_000, d_proj=1024, seed=11)
    x = torch.randn(5, spec.d_in)
    cpu = make_projector(spec, "cpu").project(x)
    gpu = make_projector(spec, "cuda").project(x.cuda())
    assert gpu.device.type == "cuda"
    # Same matrix; only float summation order differs (atomics / GEMM on the GPU).
    assert torch.allclose(gpu.cpu(), cpu, rtol=1e-4, atol=1e-4 * cpu.abs().max().item())
    if kind != "rademacher":
        cpu_tables, gpu_tables = make_projector(spec, "cpu").tables, make_projector(spec, "cuda").tables
        for (b0, s0), (b1, s1) in zip(cpu_tables, gpu_tables):
            assert torch.equal(b0, b1.cpu()) and torch.equal(s0, s1.cpu())
    else:
        p_cpu, p_gpu = make_projector(spec, "cpu"), make_projector(spec, "cuda")
        assert torch.equal(
            p_cpu.signs(1000, 1100, 0, 1024, torch.device("cpu")),
            p_gpu.signs(1000, 1100, 0, 1024, torch.device("cuda")).cpu(),
        )


@pytest.mark.parametrize("kind", KINDS)
def test_same_projection_with_one_or_two_threads(kind):
    # The CPU-side analogue of the device check: thread count changes how work is split, never R.
    spec = ProjectorSpec(kind, d_in=100_000, d_proj=512, seed=12)
    x = torch.randn(3, spec.d_in, generator=torch.Generator().manual_seed(0))
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = make_projector(spec).project(x)
        torch.set_num_threads(2)
        two_proj = make_projector(spec)
        two = two_proj.project(x)
    finally:
        torch.set_num_threads(before)
    if kind == "rademacher":
        # Same signs; a GEMV may split its sum over threads differently (float rounding only).
        assert torch.allclose(one, two, rtol=1e-5, atol=1e-5 * one.abs().max().item())
    else:
        assert torch.equal(one, two)


@pytest.mark.parametrize("kind", KINDS)
def test_inner_product_errors_have_the_jl_variance(kind):
    # For unit x, y spread over many coordinates, <Px, Py> - <x, y> has variance ~(1 + <x,y>^2) / d_proj
    # for each kind (dense JL and sketches alike). 190 pairs of 20 random vectors: the sample sd of
    # the standardised errors is ~1 +- 0.05; a wrong scale or a biased sketch lands far outside.
    x = unit_rows(20, 20_000, seed=8)
    d_proj = 1024
    y = make_projector(ProjectorSpec(kind, 20_000, d_proj, seed=9)).project(x)
    iu = torch.triu_indices(20, 20, 1)
    true, est = (x @ x.T)[iu[0], iu[1]], (y @ y.T)[iu[0], iu[1]]
    z = (est - true) / torch.sqrt((1 + true**2) / d_proj)
    assert abs(z.mean().item()) < 0.3  # no bias (sd of the mean ~ 0.07)
    assert 0.75 < z.std().item() < 1.25
