"""Weights from every source a DINOv3 user has: Meta's .pth, timm safetensors, transformers folders, Hub ids.

Each file is written here from small random models, so the parity checks run without network: timm's own
forward and transformers' own forward are the references for their files, and one set of random weights
written in all three formats must give identical dinov3ds outputs.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file

from dinov3ds.cli import main
from dinov3ds.errors import UserError
from dinov3ds.models.backbones import load_backbone
from dinov3ds.models.variants import get_spec
from tests.checkpoints import source_backbone, timm_to_official

transformers = pytest.importorskip("transformers", reason="transformers is a test dependency ([dev])")

X = torch.rand(2, 3, 160, 240, generator=torch.Generator().manual_seed(3))  # non-square: 10 x 15 patches


def outputs(backbone) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        out = backbone(X)
    return {"cls": out.cls, "registers": out.registers, "patches": out.patches}


def perturb(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every parameter non-trivial (default inits leave biases at 0 and layer scales equal, hiding mix-ups)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in model.named_parameters():
            shape = tensor.shape
            if tensor.ndim >= 2 and "token" not in name:
                tensor.copy_(torch.randn(shape, generator=generator) / math.sqrt(math.prod(shape[1:])))
            elif name.endswith(("lambda1", "gamma")):
                tensor.copy_(torch.empty(shape).uniform_(0.1, 1.0, generator=generator))
            elif name.endswith("weight"):
                tensor.copy_(1 + 0.3 * torch.randn(shape, generator=generator))
            else:
                tensor.copy_(0.3 * torch.randn(shape, generator=generator))
    return model.eval()


# ------------------------------------------------------------------------------------------------ timm


@pytest.mark.parametrize("timm_name, variant", [("vit_small_patch16_dinov3_qkvb", "vits16"),
                                                ("vit_small_patch16_dinov3", "vits16"),  # hub files without q/v bias
                                                ("vit_small_plus_patch16_dinov3_qkvb", "vits16plus")])  # fmt: skip
def test_timm_safetensors_match_timms_own_forward(tmp_path, timm_name, variant):
    model = perturb(timm.create_model(timm_name, pretrained=False, num_classes=0, depth=2))
    path = tmp_path / "model.safetensors"
    save_file(model.state_dict(), path)
    ours = load_backbone(variant, path, depth=2)
    with torch.no_grad():
        tokens = model.forward_features(X)
    got = outputs(ours)
    torch.testing.assert_close(got["cls"], tokens[:, 0], rtol=0, atol=1e-5)
    torch.testing.assert_close(got["registers"], tokens[:, 1:5], rtol=0, atol=1e-5)
    torch.testing.assert_close(got["patches"].flatten(2).transpose(1, 2), tokens[:, 5:], rtol=0, atol=1e-5)
    assert ours.identity["source"] == "timm" and ours.identity["weights"] == "model.safetensors"


def test_timm_convnext_safetensors_match_timms_own_forward(tmp_path):
    model = perturb(timm.create_model("convnext_tiny", pretrained=False, num_classes=0, depths=(1, 1, 1, 1)))
    save_file(model.state_dict(), tmp_path / "convnext.safetensors")
    ours = load_backbone("convnext_tiny", tmp_path / "convnext.safetensors", depth=1)
    with torch.no_grad():
        final = model.forward_features(X)
        expected_cls = model.forward_head(final, pre_logits=True)
    torch.testing.assert_close(outputs(ours)["cls"], expected_cls, rtol=0, atol=1e-5)


# ------------------------------------------------------------------------------------------ transformers


def hf_vit(gated: bool = False, query_bias: bool = True) -> torch.nn.Module:
    config = transformers.DINOv3ViTConfig(
        hidden_size=384, num_hidden_layers=2, num_attention_heads=6, intermediate_size=1536, num_register_tokens=4,
        rope_theta=100.0, layer_norm_eps=1e-5, query_bias=query_bias, value_bias=query_bias, key_bias=False,
        use_gated_mlp=gated, hidden_act="silu" if gated else "gelu",
    )  # fmt: skip
    return perturb(transformers.DINOv3ViTModel(config))


@pytest.mark.parametrize("gated, variant", [(False, "vits16"), (True, "vits16plus")])
@pytest.mark.parametrize("as_folder", [True, False], ids=["folder", "model.safetensors"])
def test_transformers_vit_matches_transformers_own_forward(tmp_path, gated, variant, as_folder):
    model = hf_vit(gated)
    model.save_pretrained(tmp_path / "hf")
    source = tmp_path / "hf" if as_folder else tmp_path / "hf" / "model.safetensors"
    ours = load_backbone(variant, source, depth=2)
    with torch.no_grad():
        tokens = model(pixel_values=X).last_hidden_state
    got = outputs(ours)
    torch.testing.assert_close(got["cls"], tokens[:, 0], rtol=0, atol=1e-4)
    torch.testing.assert_close(got["registers"], tokens[:, 1:5], rtol=0, atol=1e-4)
    torch.testing.assert_close(got["patches"].flatten(2).transpose(1, 2), tokens[:, 5:], rtol=0, atol=1e-4)
    assert ours.identity["source"] == "transformers"


def test_transformers_vit_without_qv_bias_like_the_7b(tmp_path):
    model = hf_vit(query_bias=False)
    model.save_pretrained(tmp_path / "hf")
    spec_overrides = {"depth": 2, "embed_dim": 384, "num_heads": 6, "mlp_ratio": 4.0, "swiglu_mlp": False}
    ours = load_backbone("vit7b16", tmp_path / "hf", **spec_overrides)
    with torch.no_grad():
        tokens = model(pixel_values=X).last_hidden_state
    torch.testing.assert_close(outputs(ours)["cls"], tokens[:, 0], rtol=0, atol=1e-4)


def test_transformers_convnext_matches_transformers_own_forward(tmp_path):
    config = transformers.DINOv3ConvNextConfig(hidden_sizes=[96, 192, 384, 768], depths=[1, 1, 1, 1])
    model = perturb(transformers.DINOv3ConvNextModel(config))
    model.save_pretrained(tmp_path / "hf")
    ours = load_backbone("convnext_tiny", tmp_path / "hf", depth=1)
    with torch.no_grad():
        tokens = model(pixel_values=X).last_hidden_state
    got = outputs(ours)
    torch.testing.assert_close(got["cls"], tokens[:, 0], rtol=0, atol=1e-4)
    torch.testing.assert_close(got["patches"].flatten(2).transpose(1, 2), tokens[:, 1:], rtol=0, atol=1e-4)


# ------------------------------------------------------------------------------------ one set, three formats


def meta_to_transformers(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Meta's ViT keys → transformers', written from the reference fixtures' README (k bias dropped)."""
    out = {
        "embeddings.cls_token": state["cls_token"],
        "embeddings.register_tokens": state["storage_tokens"],
        "embeddings.mask_token": state["mask_token"].reshape(1, 1, -1),
        "embeddings.patch_embeddings.weight": state["patch_embed.proj.weight"],
        "embeddings.patch_embeddings.bias": state["patch_embed.proj.bias"],
        "norm.weight": state["norm.weight"],
        "norm.bias": state["norm.bias"],
    }
    renames = {"norm1": "norm1", "norm2": "norm2", "attn.proj": "attention.o_proj", "mlp.fc1": "mlp.up_proj",
               "mlp.fc2": "mlp.down_proj"}  # fmt: skip
    for key, value in state.items():
        match = re.match(r"^blocks\.(\d+)\.(.+)\.(weight|bias|gamma)$", key)
        if not match:
            continue
        block, name, kind = match.groups()
        prefix = f"model.layer.{block}."
        if name in ("ls1", "ls2"):
            out[f"{prefix}layer_scale{name[-1]}.lambda1"] = value
        elif name == "attn.qkv":
            for part, chunk in zip("qkv", value.chunk(3)):
                if not (kind == "bias" and part == "k"):
                    out[f"{prefix}attention.{part}_proj.{kind}"] = chunk
        elif name in renames:
            out[f"{prefix}{renames[name]}.{kind}"] = value
    return out


def test_one_set_of_weights_in_three_formats_gives_identical_outputs(tmp_path):
    source = source_backbone("vits16", depth=2, seed=5)
    state = source.model.state_dict()
    meta = timm_to_official(state, get_spec("vits16"), num_heads=6)
    torch.save(meta, tmp_path / "meta.pth")
    save_file(state, tmp_path / "timm.safetensors")
    folder = tmp_path / "transformers"
    transformers.DINOv3ViTModel(transformers.DINOv3ViTConfig(
        hidden_size=384, num_hidden_layers=2, num_attention_heads=6, intermediate_size=1536, num_register_tokens=4,
    )).save_pretrained(folder)  # fmt: skip
    save_file({k: v.contiguous() for k, v in meta_to_transformers(meta).items()}, folder / "model.safetensors")
    results = {name: outputs(load_backbone("vits16", path, depth=2))
               for name, path in [("meta", tmp_path / "meta.pth"), ("timm", tmp_path / "timm.safetensors"),
                                  ("transformers", folder)]}  # fmt: skip
    for name in ("timm", "transformers"):
        for key in ("cls", "registers", "patches"):
            torch.testing.assert_close(results[name][key], results["meta"][key], rtol=0, atol=1e-6, msg=f"{name} {key}")


# ------------------------------------------------------------------------------------------------- errors


def test_a_file_of_another_variant_says_what_it_holds(tmp_path):
    model = perturb(timm.create_model("vit_base_patch16_dinov3_qkvb", pretrained=False, num_classes=0, depth=1))
    save_file(model.state_dict(), tmp_path / "base.safetensors")
    with pytest.raises(UserError, match=r"holds a DINOv3 ViT of width 768, depth 1, MLP FFN \(timm format\), but "
                                        r"backbone 'vits16' expects a vit of width 384"):  # fmt: skip
        load_backbone("vits16", tmp_path / "base.safetensors")


def test_safetensors_of_something_else_are_refused(tmp_path):
    save_file({"encoder.weight": torch.zeros(2, 2)}, tmp_path / "other.safetensors")
    with pytest.raises(UserError, match=r"other\.safetensors holds no DINOv3 backbone weights"):
        load_backbone("vits16", tmp_path / "other.safetensors")
    (tmp_path / "broken.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(UserError, match=r"cannot read .*broken\.safetensors: truncated or not a safetensors file"):
        load_backbone("vits16", tmp_path / "broken.safetensors")
    (tmp_path / "empty_folder").mkdir()
    with pytest.raises(UserError, match=r"empty_folder holds no model\.safetensors"):
        load_backbone("vits16", tmp_path / "empty_folder")


# ------------------------------------------------------------------------------------------------ the Hub


def populate_hub_cache(hub_cache: Path, repo_id: str, files: dict[str, Path]) -> Path:
    """huggingface_hub's cache layout: blobs by hash, a snapshot folder of links, refs/main naming it."""
    import hashlib

    repo = hub_cache / f"models--{repo_id.replace('/', '--')}"
    commit = hashlib.sha1(repo_id.encode()).hexdigest()
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (repo / "blobs").mkdir()
    for name, source in files.items():
        data = source.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snapshot / name).symlink_to(Path("../../blobs") / blob.name)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    return snapshot


@pytest.fixture
def offline_hub(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return tmp_path / "hf_home" / "hub"


def test_a_hub_id_resolves_offline_from_the_cache_and_reloads_with_its_head(tmp_path, offline_hub):
    model = perturb(timm.create_model("vit_small_patch16_dinov3_qkvb", pretrained=False, num_classes=0, depth=1))
    save_file(model.state_dict(), tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps({"architecture": "vit_small_patch16_dinov3_qkvb"}))
    repo = "timm/vit_small_patch16_dinov3_qkvb.lvd1689m"
    populate_hub_cache(offline_hub, repo, {"model.safetensors": tmp_path / "model.safetensors",
                                           "config.json": tmp_path / "config.json"})  # fmt: skip
    backbone = load_backbone("vits16", f"hf-hub:{repo}", depth=1)
    assert backbone.identity["weights"] == f"hf-hub:{repo}" and backbone.identity["source"] == "timm"
    with torch.no_grad():
        torch.testing.assert_close(outputs(backbone)["cls"], model.forward_features(X)[:, 0], rtol=0, atol=1e-5)
    # No weights named: Meta's file is absent, so the variant's timm repo in the cache is used.
    assert load_backbone("vits16", None, depth=1).identity["weights"] == f"hf-hub:{repo}"


def test_an_uncached_hub_id_offline_is_one_line_and_exit_2(tmp_path, offline_hub, capsys):
    from tests.conftest import tiny

    root = tmp_path / "data"
    from dinov3ds.data.synthetic import make_classification_folder

    make_classification_folder(root, num_classes=2, train_per_class=1, val_per_class=1, size=32)
    code = main(["train", *tiny(), "backbone.weights=hf-hub:facebook/dinov3-vits16-pretrain-lvd1689m",
                 f"data.root={root}", f"output_dir={tmp_path / 'run'}"])  # fmt: skip
    error = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in error
    assert "facebook/dinov3-vits16-pretrain-lvd1689m is not in the Hugging Face cache" in error
    assert "hf download facebook/dinov3-vits16-pretrain-lvd1689m" in error


def test_missing_default_weights_name_every_source(monkeypatch, tmp_path, offline_hub):
    monkeypatch.setenv("DINOV3DS_CHECKPOINTS", str(tmp_path / "none"))
    with pytest.raises(UserError) as error:
        load_backbone("vits16")
    message = str(error.value)
    assert "hf-hub:timm/vit_small_patch16_dinov3_qkvb.lvd1689m" in message
    assert "hf-hub:facebook/dinov3-vits16-pretrain-lvd1689m" in message and "dinov3_vits16_pretrain" in message


def test_backbones_command_lists_the_sources_found(tmp_path, offline_hub, monkeypatch, capsys):
    checkpoints = tmp_path / "checkpoints"
    checkpoints.mkdir()
    (checkpoints / get_spec("vits16").weight_file).write_bytes(b"")  # listed by name; loading checks the hash
    monkeypatch.setenv("DINOV3DS_CHECKPOINTS", str(checkpoints))
    (tmp_path / "model.safetensors").write_bytes(b"")
    populate_hub_cache(offline_hub, "facebook/dinov3-convnext-tiny-pretrain-lvd1689m",
                       {"model.safetensors": tmp_path / "model.safetensors"})  # fmt: skip
    assert main(["backbones"]) == 0
    rows = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()[1:]}
    assert rows["vits16"].rstrip().endswith("meta")
    assert rows["convnext_tiny"].rstrip().endswith("transformers")
    assert rows["vitb16"].rstrip().endswith("-")


def test_a_head_trained_on_timm_weights_finds_them_again_and_refuses_others(tmp_path):
    from dinov3ds.data.synthetic import make_classification_folder
    from dinov3ds.models.tasks import Classifier
    from tests.conftest import tiny

    weights = tmp_path / "timm.safetensors"
    save_file(perturb(timm.create_model("vit_small_patch16_dinov3_qkvb", pretrained=False, num_classes=0,
                                        depth=1)).state_dict(), weights)  # fmt: skip
    root = make_classification_folder(tmp_path / "data", num_classes=2, train_per_class=2, val_per_class=1, size=32)
    run = tmp_path / "run"
    assert main(["train", *tiny("trainer.max_epochs=1"), f"backbone.weights={weights}", f"data.root={root}",
                 f"output_dir={run}"]) == 0  # fmt: skip
    best = run / "checkpoints" / "best.ckpt"
    identity = torch.load(best, weights_only=True)["dinov3ds"]["backbone"]
    assert identity["source"] == "timm" and identity["weights"] == "timm.safetensors" and len(identity["sha256"]) == 64
    assert Classifier.from_checkpoint(best).backbone.identity["sha256"] == identity["sha256"]
    save_file(perturb(timm.create_model("vit_small_patch16_dinov3_qkvb", pretrained=False, num_classes=0, depth=1),
                      seed=1).state_dict(), weights)  # fmt: skip
    with pytest.raises(UserError, match=r"was trained on backbone weights timm\.safetensors .* but .*timm\.safetensors has sha256"):
        Classifier.from_checkpoint(best)
