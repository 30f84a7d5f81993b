"""`elrea-ray export`: the run's adapters as PEFT folders and vLLM's layout, loaded back with PEFT."""

import json

import pytest
import torch

from elrea_ray.cli import main


def _logits(model, adapter: str, ids: torch.Tensor) -> torch.Tensor:
    model.set_adapter(adapter)
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.fixture(scope="module")
def exported(smoke_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("export")
    assert main(["export", str(smoke_run.root), "--format", "peft", "--out", str(out / "peft")]) == 0
    assert main(["export", str(smoke_run.root), "--format", "vllm", "--out", str(out / "vllm")]) == 0
    return smoke_run.root, out


def test_exported_peft_folders_give_the_bundles_logits(exported):
    from peft import PeftModel

    from elrea_ray.bundle import load_bundle
    from elrea_ray.config import ModelConfig
    from elrea_ray.model import load_adapters, load_backbone

    run, out = exported
    root, bundle = load_bundle(run)
    cfg = ModelConfig(**bundle["model"])
    ours = load_adapters(cfg, {n: str(root / p) for n, p in bundle["adapters"].items()})
    ids = torch.tensor([[1, 5, 9, 22, 7, 3]])
    for layout, folder in (("peft", lambda n: out / "peft" / "adapters" / n), ("vllm", lambda n: out / "vllm" / n)):
        names = list(bundle["adapters"])
        theirs = PeftModel.from_pretrained(load_backbone(cfg), str(folder(names[0])), adapter_name=names[0])
        for n in names[1:]:
            theirs.load_adapter(str(folder(n)), adapter_name=n)
        theirs.eval()
        for n in names:
            conf = json.loads((folder(n) / "adapter_config.json").read_text())
            assert conf["base_model_name_or_path"] == bundle["model"]["name_or_path"], layout
            torch.testing.assert_close(_logits(theirs, n, ids), _logits(ours, n, ids), rtol=0, atol=0)


def test_routing_state_and_readmes_describe_what_to_load(exported):
    from safetensors.numpy import load_file

    from elrea_ray.bundle import load_bundle

    run, out = exported
    root, bundle = load_bundle(run)
    routing = json.loads((out / "peft" / "routing" / "routing.json").read_text())
    assert routing["adapters"] == list(bundle["adapters"]) and routing["routing"] == bundle["routing"]
    assert routing["features"]["projector"] == bundle["projector"]
    cents = load_file(str(out / "peft" / routing["centroids"]))["centroids"]
    assert cents.shape == (bundle["num_clusters"], bundle["projector"]["d_proj"])
    for e in routing["features"]["epoch_checkpoints"]:
        assert (out / "peft" / e / "adam_state.safetensors").exists()
    modules = json.loads((out / "vllm" / "lora_modules.json").read_text())
    assert [m["name"] for m in modules] == list(bundle["adapters"])
    assert "--lora-modules base=base" in (out / "vllm" / "README.md").read_text()
    assert "PeftModel.from_pretrained" in (out / "peft" / "README.md").read_text()


def test_export_refuses_a_used_folder_and_pushing_without_a_token(exported, tmp_path, monkeypatch, capsys):
    run, out = exported
    assert main(["export", str(run), "--out", str(out / "peft")]) == 2
    assert "exists and is not an empty folder" in capsys.readouterr().err
    assert main(["export", str(tmp_path), "--out", str(tmp_path / "x")]) == 2
    assert "bundle.json" in capsys.readouterr().err
    monkeypatch.setenv("HF_TOKEN", "")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    assert main(["export", str(run), "--out", str(tmp_path / "y"), "--push-to-hub", "me/elrea"]) == 2
    assert "needs a Hugging Face token" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["export", str(run), "--format", "onnx", "--out", str(tmp_path / "z")])
    assert e.value.code == 2
