import dataclasses
from pathlib import Path

import pytest

from elrea_ray.config import ClusteringConfig, Config, ConfigError, EvalConfig, ModelConfig, TrainConfig, load_config

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "jobs" / "configs").glob("*.yaml"))


def test_defaults_are_the_papers():
    c = Config()
    assert (c.model.lora_r, c.model.lora_alpha, c.model.lora_dropout) == (8, 32, 0.1)
    assert (c.train.lr, c.train.epochs, c.train.batch_size) == (5e-5, 2, 16)
    assert c.experts.lr == 2e-5 and c.gradients.d_proj == 8192
    assert (
        c.clustering.method,
        c.clustering.initial_clusters,
        c.clustering.fit_sample,
        c.clustering.max_ratio,
        c.clustering.max_iterations,
    ) == ("balanced_birch", 5, 5000, 5.0, 3)
    assert c.routing.temperature == 1.0 and c.routing.top_k is None
    assert c.routing.method == "gradient"  # the distilled router is beyond the paper


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_shipped_yaml_loads(path):
    assert isinstance(load_config(path), Config)


def test_expected_configs_ship():
    assert {p.name for p in CONFIGS} >= {"default.yaml", "smoke.yaml", "paper.yaml"}


def test_overrides_parse_yaml_values(tmp_path):
    c = load_config(
        None,
        ["experts.lr=1e-4", "data.sources=[chain_sum,products]", "routing.top_k=2", "run.run_dir=" + str(tmp_path)],
    )
    assert c.experts.lr == 1e-4 and c.data.sources == ("chain_sum", "products")
    assert c.routing.top_k == 2 and c.run.run_dir == str(tmp_path)


@pytest.mark.parametrize(
    "override,needle",
    [
        (["experts.lrr=1"], "experts.lrr"),
        (["nosuch.x=1"], "nosuch"),
        (["train.lr=-1"], "train.lr"),
        (["train.epochs=two"], "train.epochs"),
        (["clustering.method=dbscan"], "clustering.method"),
        (["routing.temperature=0"], "routing.temperature"),
        (["eval.methods=[elrea,magic]"], "eval.methods"),
        (["badoverride"], "section.key=value"),
        (["model.attn_implementation=flash"], "model.attn_implementation"),
        (["model.gradient_checkpointing=maybe"], "model.gradient_checkpointing"),
        (["routing.method=learned"], "routing.method must be gradient or distilled"),
        (["routing.distill_hidden=-1"], "routing.distill_hidden"),
        (["routing.distill_epochs=0"], "routing.distill_epochs"),
    ],
)
def test_bad_config_names_the_key(override, needle):
    with pytest.raises(ConfigError, match=needle.replace(".", r"\.")):
        load_config(None, override)


def test_missing_config_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="nope.yaml"):
        load_config(tmp_path / "nope.yaml")


def test_serve_config_args_validate():
    import yaml

    from serve_apps.elrea_app import AppArgs

    cfg = yaml.safe_load((Path(__file__).resolve().parents[1] / "serve_apps" / "serve_config.yaml").read_text())
    app = cfg["applications"][0]
    assert app["import_path"] == "serve_apps.elrea_app:build_app"
    assert AppArgs(**app["args"]).run_dir


def test_flash_attention_needs_flash_attn():
    import importlib.util

    if importlib.util.find_spec("flash_attn") is not None:
        pytest.skip("flash_attn is installed here")
    with pytest.raises(ConfigError, match=r"model\.attn_implementation.*flash_attn"):
        load_config(None, ["model.attn_implementation=flash_attention_2"])


def test_every_config_built_anywhere_is_checked():
    # A section built directly (a worker rebuilding it from a dict, a test, dataclasses.replace)
    # checks itself, with the same dotted name the loader's messages use.
    with pytest.raises(ConfigError, match=r"train\.lr must be > 0"):
        TrainConfig(lr=-1.0)
    with pytest.raises(ConfigError, match=r"model\.lora_r must be >= 1"):
        ModelConfig(**{**dataclasses.asdict(ModelConfig()), "lora_r": 0})
    with pytest.raises(ConfigError, match=r"clustering\.method"):
        dataclasses.replace(ClusteringConfig(), method="dbscan")
    with pytest.raises(ConfigError, match=r"eval\.methods"):
        Config(eval=EvalConfig(methods=("elrea", "magic")))
    with pytest.raises(ConfigError, match=r"config section train must be a TrainConfig"):
        Config(train={"lr": 1e-4})
