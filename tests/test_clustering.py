"""Clustering: planted clusters on the unit sphere are recovered, balancing re-splits and merges."""

import numpy as np
import pytest

from elrea_ray.clustering import (
    ClusteringResult,
    assign,
    balanced_birch,
    birch_threshold,
    cluster_source_report,
    fit_clusters,
    normalized_centroids,
    spherical_kmeans,
)


def unit(a):
    return a / np.linalg.norm(a, axis=1, keepdims=True)


def planted(sizes, d=256, noise=1.0, seed=0, centers=None):
    """Points mu_k + noise * g / sqrt(d), normalised: within-cluster cos ~ 1 / (1 + noise^2)."""
    rng = np.random.default_rng(seed)
    mus = unit(rng.standard_normal((len(sizes), d))) if centers is None else centers
    X = np.vstack([mus[k] + noise * rng.standard_normal((n, d)) / np.sqrt(d) for k, n in enumerate(sizes)])
    return unit(X).astype(np.float32), np.repeat(np.arange(len(sizes)), sizes)


def nmi(a, b):
    return cluster_source_report(a, b)["nmi"]


def test_planted_clusters_are_recovered_by_balanced_birch():
    X, y = planted([100] * 4, noise=1.0)  # within-cluster cos ~0.5, between ~0
    within = (X[:100] @ X[:100].T)[np.triu_indices(100, 1)].mean()
    assert 0.4 < within < 0.6
    result = balanced_birch(X, initial_clusters=4)
    assert isinstance(result, ClusteringResult) and nmi(result.labels, y) > 0.95
    assert result.sizes == [100] * 4 and result.rounds == []  # balanced from the start
    assert 0 < result.threshold < 0.6  # chosen from the data, not sklearn's 0.5 default


def test_sklearn_default_threshold_fails_where_the_data_driven_one_works():
    # The failure seen on real gradient features, which share a common direction:
    # with sklearn's default 0.5 BIRCH puts everything into one subcluster.
    X, y = planted([100] * 4, noise=1.0, d=512)
    common = unit(np.random.default_rng(1).standard_normal((1, 512)))
    X = unit(X + 2.0 * common).astype(np.float32)  # every pairwise cos > 0.8
    default = balanced_birch(X, initial_clusters=4, threshold=0.5, max_iterations=1)
    assert default.sizes == [400] and nmi(default.labels, y) == 0.0
    assert nmi(balanced_birch(X, initial_clusters=4, max_iterations=1).labels, y) > 0.95


def test_planted_clusters_are_recovered_by_spherical_kmeans():
    X, y = planted([100] * 4, noise=1.0, seed=1)
    result = fit_clusters(X, "kmeans", num_clusters=4, seed=0)
    assert nmi(result.labels, y) > 0.95 and result.threshold is None


def test_oversized_cluster_of_three_blobs_is_re_split():
    # One cluster 10x the others, made of 3 sub-blobs close to each other but apart from the rest.
    rng = np.random.default_rng(2)
    far = unit(rng.standard_normal((3, 256)))
    core = unit(rng.standard_normal((1, 256)))
    blobs = unit(core + 0.3 * unit(rng.standard_normal((3, 256))))  # blob centres at cos ~0.92
    X, y = planted([334, 333, 333, 100, 100, 100], noise=0.3, seed=3, centers=np.vstack([blobs, far]))
    first = balanced_birch(X, initial_clusters=4, max_iterations=1)
    assert first.sizes == [1000, 100, 100, 100]  # plain BIRCH lumps the blobs together
    result = balanced_birch(X, initial_clusters=4, max_ratio=5.0)
    # Round 1: 1000 > 5 x 100, so it is split into min(ceil(1000 / 100), 4 - 1) = 3 parts.
    (split,) = result.rounds[0]["split"]
    assert (split["cluster"], split["size"], split["parts"]) == (0, 1000, 3) and len(result.rounds) == 1
    assert result.sizes == [334, 333, 333, 100, 100, 100] and nmi(result.labels, y) == pytest.approx(1.0)


def test_each_round_targets_fewer_parts():
    # A big diffuse cluster: its first re-split leaves a part still > 5x the smallest, which the
    # next round splits into fewer parts; 5 -> 8 -> 10 clusters, the paper's reported pattern.
    X, _ = planted([1500, 100, 100, 100, 100], d=64, noise=1.0, seed=0)
    result = balanced_birch(X, initial_clusters=5, max_iterations=3)
    assert [[s["parts"] for s in r["split"]] for r in result.rounds] == [[4], [3]]
    assert result.num_clusters == 10 and max(result.sizes) <= 5 * min(result.sizes)


def test_iterations_count_the_first_fit_as_the_paper_does():
    # "Up to 3 iterations ... 8 clusters after 2 iterations, 10 after 3": the first BIRCH fit is
    # iteration 1, so the default allows two re-split rounds. This cluster is still > 5x the
    # smallest after two, so a fourth iteration would split again.
    X, _ = planted([3000, 100, 100, 100, 100], d=64, noise=1.0, seed=0)
    parts = lambda r: [[s["parts"] for s in x["split"]] for x in r.rounds]  # noqa: E731
    assert balanced_birch(X, initial_clusters=5, max_iterations=1).num_clusters == 5  # the fit alone
    assert parts(balanced_birch(X, initial_clusters=5, max_iterations=2)) == [[4]]
    default = balanced_birch(X, initial_clusters=5)
    assert parts(default) == [[4], [3, 3, 3]] and default.num_clusters == 14
    assert max(default.sizes) > 5 * min(default.sizes)  # unbalanced, but out of iterations
    assert parts(balanced_birch(X, initial_clusters=5, max_iterations=4)) == [[4], [3, 3, 3], [2, 2]]


def test_part_cap_initial_keeps_the_first_target_in_every_round():
    X, _ = planted([1500, 100, 100, 100, 100], d=64, noise=1.0, seed=0)
    result = balanced_birch(X, initial_clusters=5, part_cap="initial")
    assert result.rounds[0]["split"][0]["parts"] == 5  # min(ceil(1500 / 100), 5), not 5 - 1
    with pytest.raises(ValueError, match="part_cap"):
        balanced_birch(X, part_cap="largest")


def test_old_max_rounds_key_names_its_replacement():
    from elrea_ray.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=r"clustering\.max_rounds .*clustering\.max_iterations"):
        load_config(None, ["clustering.max_rounds=2"])
    assert load_config(None, ["clustering.max_iterations=2"]).clustering.max_iterations == 2
    with pytest.raises(ConfigError, match=r"clustering\.max_iterations must be >= 1"):
        load_config(None, ["clustering.max_iterations=0"])


def test_small_clusters_are_merged_into_their_nearest_neighbour():
    X, y = planted([150, 150, 150], noise=0.8, seed=4)
    outliers = unit(np.random.default_rng(5).standard_normal((3, 256))).astype(np.float32)
    near_first = unit(X[:1] + 0.05 * outliers[:1]).astype(np.float32)  # an outlier close to cluster 0
    X = np.vstack([X, outliers, near_first])
    plain = balanced_birch(X, initial_clusters=4, max_iterations=1)
    assert min(plain.sizes) <= 3  # BIRCH gives the outliers a cluster of their own
    merged = balanced_birch(X, initial_clusters=4, min_cluster_size=10)
    assert min(merged.sizes) >= 10 and merged.num_clusters == 3
    merges = [m for r in merged.rounds for m in r["merged"]]
    assert merges and all(m["size"] < 10 for m in merges)
    assert merged.labels[-1] == merged.labels[0]  # the close outlier went to its neighbour
    assert nmi(merged.labels[:450], y) == pytest.approx(1.0)


def test_centroids_are_unit_normalised_member_means():
    X, _ = planted([60, 40], seed=6)
    result = balanced_birch(X, initial_clusters=2)
    assert result.centroids.dtype == np.float32 and result.centroids.shape == (2, 256)
    assert np.allclose(np.linalg.norm(result.centroids, axis=1), 1.0, atol=1e-6)
    mean = X[result.labels == 1].mean(axis=0)
    assert np.allclose(result.centroids[1], mean / np.linalg.norm(mean), atol=1e-6)
    assert np.allclose(normalized_centroids(X, result.labels, 2), result.centroids)
    assert result.sizes == sorted(result.sizes, reverse=True)  # ids ordered by size
    assert result.labels.dtype == np.int64 and set(result.labels) == {0, 1}


def test_assign_agrees_with_the_fit_on_well_separated_data():
    X, y = planted([80, 80, 80], noise=0.5, seed=7)
    for result in (balanced_birch(X, initial_clusters=3), spherical_kmeans(X, 3)):
        assert np.array_equal(assign(X, result.centroids), result.labels)
    # Points outside the fitting sample land in the cluster of their own planted centre.
    fit = balanced_birch(X[::2], initial_clusters=3)
    rest = assign(X[1::2], fit.centroids)
    assert nmi(rest, y[1::2]) == pytest.approx(1.0)


def test_same_seed_same_clusters():
    X, _ = planted([120, 60, 30, 200], noise=1.2, seed=8)
    for method, kw in (("balanced_birch", {"initial_clusters": 3}), ("kmeans", {"num_clusters": 4})):
        a, b = fit_clusters(X, method, seed=3, **kw), fit_clusters(X, method, seed=3, **kw)
        assert np.array_equal(a.labels, b.labels) and np.array_equal(a.centroids, b.centroids)
        assert a.rounds == b.rounds and a.threshold == b.threshold


def test_fewer_distinct_labels_than_asked_is_handled():
    X, _ = planted([5, 5], noise=0.01, seed=9)  # 2 tight groups, 6 clusters asked
    result = balanced_birch(X, initial_clusters=6, threshold=0.3)
    assert result.num_clusters == 2 and result.sizes == [5, 5]
    assert sorted(set(result.labels)) == [0, 1]


def test_threshold_rule_and_argument_errors():
    X, _ = planted([100] * 4, noise=1.0, seed=10)
    sims = X @ X.T
    np.fill_diagonal(sims, -1)
    nn = np.sqrt(2 - 2 * sims.max(axis=1))
    assert birch_threshold(X, sample=len(X)) == pytest.approx(0.5 * np.quantile(nn, 0.1), rel=1e-5)
    with pytest.raises(ValueError, match="method"):
        fit_clusters(X, "dbscan")
    with pytest.raises(ValueError, match="num_clusters"):
        spherical_kmeans(X, 0)
    with pytest.raises(ValueError, match="min_cluster_size"):
        balanced_birch(X, min_cluster_size=0)


def test_cluster_source_report():
    labels = np.array([0, 0, 1, 1, 2])
    sources = np.array(["a", "a", "b", "b", "c"])
    report = cluster_source_report(labels, sources)
    assert report["nmi"] == pytest.approx(1.0) and report["ari"] == pytest.approx(1.0)
    assert report["purity"] == 1.0 and report["counts"] == {0: {"a": 2}, 1: {"b": 2}, 2: {"c": 1}}
    mixed = cluster_source_report(np.array([0, 0, 0, 1]), np.array(["a", "b", "a", "b"]))
    assert mixed["purity"] == 0.75 and mixed["counts"][0] == {"a": 2, "b": 1}


def write_shards(folder, X, ids, sources, rows_per_shard, seed=0):
    """Feature shards in the gradient stage's layout (example_id, source, feature: fixed list of
    float32), in a shuffled row order as Ray Data writes them."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder.mkdir(parents=True)
    order = np.random.default_rng(seed).permutation(len(X))
    for k, i in enumerate(range(0, len(X), rows_per_shard)):
        rows = order[i : i + rows_per_shard]
        pq.write_table(
            pa.table(
                {
                    "example_id": [ids[r] for r in rows],
                    "source": [sources[r] for r in rows],
                    "feature": pa.FixedSizeListArray.from_arrays(pa.array(X[rows].reshape(-1)), X.shape[1]),
                }
            ),
            folder / f"shard-{k:03d}.parquet",
        )


def test_streamed_stage_equals_the_in_memory_fit_when_the_sample_covers_all_rows(tmp_path):
    from elrea_ray.stages.clusters import cluster_streamed
    from elrea_ray.stages.gradients import read_features

    X, y = planted([100] * 4, d=64, noise=1.0, seed=11)
    ids, sources = [f"ex-{i}" for i in range(len(X))], [f"src{k}" for k in y]
    write_shards(tmp_path / "train", X, ids, sources, rows_per_shard=130)
    kw = {"initial_clusters": 4, "seed": 0}
    res = cluster_streamed(
        tmp_path / "train",
        ids,
        fit_sample=5000,
        seed=0,
        fit=lambda Xs: fit_clusters(Xs, "balanced_birch", **kw),
        batch_rows=48,
    )

    # The in-memory stage: whole table in data order, fit on every row, assign, eq. 5.8 centroids.
    _, src_mem, Xm = read_features(tmp_path / "train", order=ids)
    fit = fit_clusters(Xm, "balanced_birch", **kw)
    labels = assign(Xm, fit.centroids)
    used = sorted(set(labels.tolist()))
    labels = np.searchsorted(used, labels)
    assert res.fit_sample == len(X) and res.ids == ids and res.sources == src_mem
    assert np.array_equal(res.labels, labels)
    np.testing.assert_allclose(res.centroids, normalized_centroids(Xm, labels, len(used)), atol=1e-6)
    assert nmi(res.labels, y) > 0.95


def test_streamed_stage_fits_a_bounded_sample_and_assigns_every_row(tmp_path):
    from elrea_ray.stages.clusters import cluster_streamed

    X, y = planted([150, 100, 100, 50], d=64, noise=1.0, seed=12)
    ids, sources = [f"ex-{i}" for i in range(len(X))], [f"src{k}" for k in y]
    write_shards(tmp_path / "train", X, ids, sources, rows_per_shard=100, seed=1)
    seen = []

    def fit(Xs):
        seen.append(Xs.shape)
        return fit_clusters(Xs, "balanced_birch", initial_clusters=4, seed=0)

    res = cluster_streamed(tmp_path / "train", ids, fit_sample=80, seed=3, fit=fit, batch_rows=32)
    assert seen == [(80, 64)] and res.fit_sample == 80  # the fit saw the sample only
    assert len(res.labels) == len(X) and nmi(res.labels, y) > 0.9
    assert sorted(set(res.labels.tolist())) == list(range(len(res.centroids)))
    np.testing.assert_allclose(np.linalg.norm(res.centroids, axis=1), 1.0, atol=1e-5)
    # Centroids are the means over ALL members, not over the sample's.
    np.testing.assert_allclose(res.centroids, normalized_centroids(X, res.labels, len(res.centroids)), atol=1e-6)


def test_pca_variant_clusters_in_the_reduced_space_and_keeps_full_space_centroids(tmp_path):
    from elrea_ray.clustering import PcaReducer
    from elrea_ray.stages.clusters import cluster_streamed

    X, y = planted([120, 80, 80, 60], d=128, noise=1.0, seed=13)
    ids, sources = [f"ex-{i}" for i in range(len(X))], [f"src{k}" for k in y]
    write_shards(tmp_path / "train", X, ids, sources, rows_per_shard=90, seed=2)
    seen = []

    def fit(Z):
        seen.append(Z.shape)
        return fit_clusters(Z, "balanced_birch", initial_clusters=4, seed=0)

    res = cluster_streamed(tmp_path / "train", ids, fit_sample=200, seed=0, fit=fit, batch_rows=50, pca_dim=8)
    assert seen == [(200, 8)]  # the fit saw 8 principal components of the 200-row sample
    assert nmi(res.labels, y) > 0.9 and res.centroids.shape == (len(set(res.labels.tolist())), 128)
    np.testing.assert_allclose(res.centroids, normalized_centroids(X, res.labels, len(res.centroids)), atol=1e-6)
    pca = PcaReducer.fit(X[:200], 8)
    Z = pca.transform(X)
    np.testing.assert_allclose(np.linalg.norm(Z, axis=1), 1.0, atol=1e-5)
    assert PcaReducer.fit(X[:5], 8).components.shape == (5, 128)  # at most as many as the sample has rows


def test_streamed_stage_names_rows_that_do_not_match_the_data(tmp_path):
    from elrea_ray.artifacts import ArtifactError
    from elrea_ray.stages.clusters import cluster_streamed

    X, y = planted([20, 20], d=16, seed=13)
    ids = [f"ex-{i}" for i in range(len(X))]
    write_shards(tmp_path / "train", X, ids, ["s"] * len(X), rows_per_shard=15)
    fit = lambda Xs: fit_clusters(Xs, "kmeans", num_clusters=2, seed=0)  # noqa: E731
    with pytest.raises(ArtifactError, match="ex-39"):
        cluster_streamed(tmp_path / "train", ids[:-1], 100, 0, fit)  # a shard row not in the data
    with pytest.raises(ArtifactError, match="missing e.g. ex-extra"):
        cluster_streamed(tmp_path / "train", ids + ["ex-extra"], 100, 0, fit)
    with pytest.raises(ArtifactError, match="missing gradient features"):
        cluster_streamed(tmp_path / "nothing", ids, 100, 0, fit)
