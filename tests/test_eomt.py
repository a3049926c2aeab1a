"""The `eomt` head (Encoder-only Mask Transformer) and transformers' EoMT folders read as dinov3ds checkpoints.

Parity: a randomly initialised (and perturbed) transformers `EomtDinov3ForUniversalSegmentation`, saved with
`save_pretrained`, loads as a dinov3ds model with the same class and mask logits (float32) and the same semantic
map as transformers' `post_process_semantic_segmentation`. The counts are the reference's layers (tue-mps/eomt
7bd19dd: query embedding, class linear, 3-layer mask MLP, two up-scaling blocks), checked against transformers'.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers
from torch import nn

from dinov3ds.cli import main
from dinov3ds.config import config_from_dict
from dinov3ds.data.synthetic import make_segmentation_folder
from dinov3ds.errors import UserError
from dinov3ds.heads import TokenSource, build_head
from dinov3ds.heads.pmt import annealed_probability
from dinov3ds.models.checkpoints import read_checkpoint
from dinov3ds.models.tasks import Segmenter, backbone_from_config, load_model
from tests.test_weight_sources import offline_hub, populate_hub_cache  # noqa: F401 - offline_hub is a fixture

VIT = {"S": (384, 6), "B": (768, 12), "L": (1024, 16)}  # width, attention heads
LABELS = {0: "road", 1: "car", 2: "sky"}
SIZE = 64  # transformers' EoMT predicts on its config's image_size only


def hf_eomt(folder: Path, probabilities: tuple[float, ...] = (1.0, 1.0), mean: tuple | None = None) -> nn.Module:
    """A small EoMT-DINOv3 (width 64, 4 blocks, queries in the last 2), perturbed so no weight is at its init."""
    config = transformers.EomtDinov3Config(
        hidden_size=64, num_hidden_layers=4, num_attention_heads=4, intermediate_size=256, num_register_tokens=4,
        num_blocks=2, num_queries=5, image_size=SIZE, id2label=LABELS,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.EomtDinov3ForUniversalSegmentation(config).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.05)
        model.attn_mask_probs.copy_(torch.tensor(probabilities))
    model.save_pretrained(folder)
    if mean is not None:
        transformers.EomtImageProcessor(image_mean=list(mean), image_std=[0.5, 0.5, 0.5]).save_pretrained(folder)
    return model


def tiny_segmenter(depth: int = 3, num_classes: int = 3, **options) -> Segmenter:
    config = config_from_dict({
        "task": "segmentation",
        "backbone": {"name": "vits16", "weights": "random", "overrides": {"depth": depth}},
        "data": {"class_names": [f"c{i}" for i in range(num_classes)]},
        "head": {"name": "eomt", "options": {"num_queries": 6, "num_blocks": 2, **options}},
    })  # fmt: skip
    return Segmenter(backbone_from_config(config), num_classes, config, config.data.class_names)


def dummy_tokens(width: int, heads: int, depth: int = 24) -> TokenSource:
    return TokenSource(num_heads=heads, num_prefix_tokens=5, rotate_half=True, rope=None,
                       blocks=tuple(nn.Identity() for _ in range(depth)), norm=nn.LayerNorm(width))  # fmt: skip


# ------------------------------------------------------------------------------------------------ the head


@pytest.mark.parametrize(("size", "expected"), [("S", 1_728_919), ("B", 6_701_719), ("L", 11_819_159)])
def test_trainable_parameters_are_pinned_and_are_transformers_head(size: str, expected: int) -> None:
    """150 classes, 100 queries (the ADE20K run); transformers' head: everything but the backbone."""
    width, heads = VIT[size]
    head = build_head("eomt", [width] * 4, [16] * 4, 150, dummy_tokens(width, heads))
    assert head.trainable_parameters() == expected
    config = transformers.EomtDinov3Config(hidden_size=width, num_hidden_layers=1, num_attention_heads=heads,
                                           intermediate_size=4, num_blocks=1, num_queries=100, num_labels=150)  # fmt: skip
    reference = transformers.EomtDinov3ForUniversalSegmentation(config)
    parts = ("query.", "class_predictor.", "mask_head.", "upscale_block.")
    assert sum(p.numel() for n, p in reference.named_parameters() if n.startswith(parts)) == expected


def test_convnext_and_bad_options_are_one_line_errors() -> None:
    with pytest.raises(UserError, match="use a ViT backbone"):
        build_head("eomt", [96, 192, 384, 768], [4, 8, 16, 32], 3, None)
    tokens = dummy_tokens(384, 6, depth=5)
    for options, message in (({"num_blocks": 5}, "num_blocks < the backbone's depth"), ({"num_queries": 0}, "num_queries=0"),
                             ({"annealing_start": [0, 0, 0, 0]}, "together"),
                             ({"annealing_start": [0], "annealing_end": [5], "num_blocks": 2}, "2 steps each")):  # fmt: skip
        with pytest.raises(UserError, match=message):
            build_head("eomt", [384] * 4, [16] * 4, 3, tokens, **options)


def test_queries_train_through_the_frozen_backbone_blocks_which_stay_out_of_the_head() -> None:
    torch.manual_seed(0)
    model = tiny_segmenter().train()
    predictions = model(torch.randn(2, 3, 48, 32))
    assert len(predictions.masks) == 3 and predictions.masks[0].shape == (2, 6, 12, 8)  # before 2 blocks, after
    assert predictions.classes[-1].shape == (2, 6, 4)
    sum(m.sum() for m in predictions.masks).backward()
    assert model.head.queries.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.backbone.parameters())
    assert not any(key.startswith(("tokens", "blocks")) for key in model.head.state_dict())
    assert model.head.trainable_parameters() == sum(p.numel() for p in model.head.parameters())
    model.head.zero_grad()
    last = model.backbone.unfreeze_last_blocks(1)[0]  # a block that trains gets its gradient through the head
    sum(m.sum() for m in model(torch.randn(1, 3, 32, 32)).masks).backward()
    assert all(p.grad is not None for p in last.parameters())


def test_rope_turns_the_patch_tokens_only() -> None:
    model = tiny_segmenter()
    rope = model.head._rope((3, 2))
    half = rope.shape[-1] // 2
    assert rope.shape[0] == 6 + 3 * 2
    assert torch.equal(rope[:6, :half], torch.zeros(6, half)) and torch.equal(rope[:6, half:], torch.ones(6, half))
    assert torch.equal(rope[6:], model.backbone.model.rope.get_embed(shape=(3, 2)))


def test_annealing_per_block_and_evaluation_draws_nothing() -> None:
    model = tiny_segmenter(annealing_start=[0, 6520], annealing_end=[3000, 9780])
    for block in model.backbone.blocks:  # layer scale 1, not timm's 1e-5: attention changes show in the output
        block.gamma_1.data.fill_(1.0)
        block.gamma_2.data.fill_(1.0)
    for step in (0, 1500, 3000, 7000, 9780):
        model.head.set_step(step)
        expected = [annealed_probability(step, 0, 3000, 0.9), annealed_probability(step, 6520, 9780, 0.9)]
        assert model.head.mask_probabilities.tolist() == pytest.approx(expected)
    assert model.head.mask_probabilities.tolist() == [0.0, 0.0]
    model.eval()
    image = torch.randn(1, 3, 32, 48)
    with torch.no_grad():
        plain = model(image)
        model.head.mask_probabilities.fill_(0.5)
        halfway = [model(image) for _ in range(2)]
        model.head.mask_probabilities.fill_(1.0)
        masked = model(image)
    assert torch.equal(halfway[0], halfway[1]) and torch.equal(halfway[0], masked)  # p > 0: every query masked
    assert not torch.allclose(plain, masked, atol=1e-4)


def test_a_bfloat16_backbone_runs_its_blocks_in_bfloat16() -> None:
    torch.manual_seed(0)
    model = tiny_segmenter(depth=2, num_blocks=1).eval()
    image = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        expected = model(image)
        model.backbone.to(torch.bfloat16)
        got = model(image)
    assert got.dtype == torch.float32 and (got.argmax(1) == expected.argmax(1)).float().mean() > 0.9


# ------------------------------------------------------------------------------- transformers' EoMT folders


@pytest.mark.parametrize("probabilities", [(1.0, 1.0), (0.0, 0.0), (0.0, 1.0)], ids=["masked", "annealed", "last"])
def test_transformers_eomt_gives_the_same_logits_and_semantic_map(tmp_path, probabilities) -> None:
    reference = hf_eomt(tmp_path / "hf", probabilities)
    torch.manual_seed(1)
    image = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        expected = reference(pixel_values=image)
    model = load_model(tmp_path / "hf", device="cpu")
    with torch.no_grad():
        got = model.head.decode(model.features(image), image)
        labels = model(image).argmax(1)
    torch.testing.assert_close(got.classes[-1], expected.class_queries_logits, rtol=0, atol=1e-4)
    torch.testing.assert_close(got.masks[-1], expected.masks_queries_logits, rtol=0, atol=1e-4)
    processor = transformers.EomtImageProcessor(size={"shortest_edge": SIZE, "longest_edge": SIZE})
    semantic = processor.post_process_semantic_segmentation(expected, target_sizes=[(SIZE, SIZE)] * 2)
    assert torch.equal(labels, torch.stack(semantic))
    if probabilities == (1.0, 1.0):  # the masks change what the blocks compute: the parity covers them
        model.head.masked_attention = False
        with torch.no_grad():
            plain = model.head.decode(model.features(image), image)
        assert (plain.masks[-1] - got.masks[-1]).abs().max() > 1e-3


def test_a_folder_reads_as_a_checkpoint_with_its_classes_and_preprocessing(tmp_path) -> None:
    hf_eomt(tmp_path / "hf", mean=(0.5, 0.4, 0.3))
    checkpoint = read_checkpoint(tmp_path / "hf", expected_task="segmentation")
    assert checkpoint.class_names == ["road", "car", "sky"] and checkpoint.num_classes == 3
    config = checkpoint.config
    assert config["head"] == {**config["head"], "name": "eomt", "options": {"num_queries": 5, "num_blocks": 2}}
    assert config["data"]["image_size"] == SIZE and config["inference"] == {**config["inference"], "mode": "slide", "crop": SIZE}
    assert checkpoint.backbone["source"] == "transformers-eomt" and checkpoint.backbone_state_dict == {}
    assert checkpoint.backbone["overrides"] == {"embed_dim": 64, "depth": 4, "num_heads": 4, "mlp_ratio": 4.0}
    model = load_model(tmp_path / "hf", device="cpu")
    assert model.backbone.mean == (0.5, 0.4, 0.3) and model.backbone.std == (0.5, 0.5, 0.5)
    assert model.backbone.model.norm.eps == 1e-6  # transformers' EoMT default; timm's DINOv3 has 1e-5


def test_a_hub_id_in_the_cache_loads_like_its_folder(tmp_path, offline_hub) -> None:  # noqa: F811
    hf_eomt(tmp_path / "hf")
    populate_hub_cache(offline_hub, "tue-mps/tiny_eomt", {name: tmp_path / "hf" / name
                                                          for name in ("config.json", "model.safetensors")})  # fmt: skip
    image = torch.randn(1, 3, SIZE, SIZE)
    with torch.no_grad():
        expected, got = load_model(tmp_path / "hf", device="cpu")(image), load_model("hf-hub:tue-mps/tiny_eomt", device="cpu")(image)
    assert torch.equal(expected, got)


def test_a_dinov2_eomt_folder_is_a_one_line_error(tmp_path) -> None:
    (tmp_path / "v2").mkdir()
    (tmp_path / "v2" / "config.json").write_text(json.dumps({"model_type": "eomt"}))
    with pytest.raises(UserError, match="EoMT on DINOv2"):
        read_checkpoint(tmp_path / "v2")


def test_predict_eval_and_export_take_the_folder(tmp_path, capsys) -> None:
    hf_eomt(tmp_path / "hf")
    data = make_segmentation_folder(tmp_path / "data", train=1, val=2, size=(SIZE, 80))
    image = next((data / "images" / "val").glob("*.png"))
    assert main(["predict", "--checkpoint", str(tmp_path / "hf"), str(image), "--out", str(tmp_path / "pred")]) == 0
    assert (tmp_path / "pred" / f"{image.name}.labels.png").is_file()
    assert main(["eval", "--checkpoint", str(tmp_path / "hf"), "--out", str(tmp_path / "eval"), f"data.root={data}"]) == 0
    assert "mIoU" in json.loads((tmp_path / "eval" / "eval_metrics.json").read_text())
    assert main(["export", "--checkpoint", str(tmp_path / "hf"), "--out", str(tmp_path / "onnx" / "eomt.onnx")]) == 0
    assert max(float(row.split()[2]) for row in capsys.readouterr().out.splitlines() if "  probabilities " in row) < 1e-4


def test_head_weights_start_a_run_from_the_folder(tmp_path) -> None:
    reference = hf_eomt(tmp_path / "hf")
    tree = {"task": "segmentation", "data": {"class_names": ["a", "b", "c", "d"]},
            "head": {"name": "eomt", "weights": str(tmp_path / "hf"), "options": {"num_queries": 5, "num_blocks": 2}},
            "backbone": {"name": "vits16", "overrides": {"embed_dim": 64, "depth": 4, "num_heads": 4, "mlp_ratio": 4.0}}}  # fmt: skip
    config = config_from_dict(tree)
    model = Segmenter(backbone_from_config(config), 4, config, config.data.class_names)
    assert config.backbone.weights == str(tmp_path / "hf")  # the folder's backbone is the run's (checkpoints say so)
    assert torch.equal(model.head.queries.weight, reference.query.weight)
    assert torch.equal(model.backbone.model.cls_token, reference.embeddings.cls_token)
    assert model.head.classifier.weight.shape == (5, 64)  # 4 classes here, 3 there: the class layer starts fresh
    for key, value, wanted in (("head.name", "pmt", '"eomt"'), ("backbone.name", "vitb16", '"vits16"'),
                               ("head.options.num_queries", 100, "5")):  # fmt: skip
        section, name, *rest = key.split(".")
        changed = json.loads(json.dumps(tree))
        if rest:
            changed[section][name][rest[0]] = value
        else:
            changed[section][name] = value
        with pytest.raises(UserError, match=f"set {key}={wanted}"):
            backbone_from_config(config_from_dict(changed))
    with pytest.raises(UserError, match="is not a transformers EoMT-DINOv3 folder"):
        backbone_from_config(config_from_dict({**tree, "head": {**tree["head"], "weights": str(tmp_path)}}))


def tiny_run(root: Path, output: str, epochs: int, *extra: str) -> Path:
    """Train the eomt head on a random 2-block ViT-S over 8 generated 64 px images (2 steps per epoch)."""
    data = root / "data"
    if not data.is_dir():
        make_segmentation_folder(data, train=8, val=4, size=(64, 64))
    args = ["train", "task=segmentation", "backbone.weights=random", "backbone.overrides={depth: 2}", "data.num_workers=0",
            "trainer.progress_bar=false", "data.image_size=64", "data.scale_range=[1.0, 1.0]", "data.photometric=false",
            "data.dataset=segmentation_folder", f"data.root={data}", "data.num_classes=3", "data.batch_size=4",
            "head.name=eomt", "head.options={num_queries: 8, num_blocks: 1, annealing_start: [0], annealing_end: [12]}",
            "loss.mask={num_points: 256}", "optim.lr=3e-3", "optim.scheduler=constant", "trainer.check_val_every_n_epoch=100",
            "trainer.log_every_n_steps=1", f"trainer.max_epochs={epochs}", f"output_dir={root / output}", *extra]  # fmt: skip
    assert main(args) == 0
    return root / output


@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory) -> Path:
    """A folder holding the generated data and an uninterrupted 16-step run in `straight`."""
    root = tmp_path_factory.mktemp("eomt_runs")
    threads = torch.get_num_threads()
    with pytest.MonkeyPatch.context() as patch:  # as conftest's isolated_environment, which runs after this fixture
        patch.setenv("DINOV3DS_CACHE", str(root / "cache"))
        patch.setenv("DINOV3DS_CHECKPOINTS", str(root / "no_checkpoints"))
        torch.set_num_threads(1)  # the resumed run has one thread too: the same sums, bit for bit
        tiny_run(root, "straight", 8)
    torch.set_num_threads(threads)
    return root


def test_a_tiny_run_learns_and_its_checkpoint_evaluates_the_same(tiny_runs, tmp_path) -> None:
    """16 steps on the generated shapes: the training loss falls, the masks beat all-background, and `eval` of
    last.ckpt (the head rebuilt from the file) repeats the last validation."""
    run = tiny_runs / "straight"
    rows = (run / "metrics.csv").read_text().splitlines()
    column = rows[0].split(",").index("train/loss")
    losses = [float(row.split(",")[column]) for row in rows[1:] if row.split(",")[column]]
    assert len(losses) == 16 and sum(losses[-4:]) < 0.6 * sum(losses[:4]), losses
    val = json.loads((run / "val_metrics.json").read_text())["mIoU"]
    assert val > 0.4, val  # background everywhere: 0.29 on this data
    assert main(["eval", "--checkpoint", str(run / "checkpoints" / "last.ckpt"), "--out", str(tmp_path / "eval")]) == 0
    assert json.loads((tmp_path / "eval" / "eval_metrics.json").read_text())["mIoU"] == pytest.approx(val, abs=1e-6)


def test_a_resumed_run_ends_with_the_head_of_one_that_never_stopped(tiny_runs) -> None:
    """Stopped at step 8, mid-annealing, and resumed: the same head at step 16, annealing state included."""
    resumed = tiny_run(tiny_runs, "resumed", 4)
    stopped = torch.load(resumed / "checkpoints" / "last.ckpt", weights_only=True)
    assert 0 < stopped["state_dict"]["model.head.mask_probabilities"].item() < 1
    tiny_run(tiny_runs, "resumed", 8, "--resume")
    a, b = (torch.load(run / "checkpoints" / "last.ckpt", weights_only=True) for run in (resumed, tiny_runs / "straight"))
    assert a["global_step"] == b["global_step"] == 16 and a["state_dict"].keys() == b["state_dict"].keys()
    assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"]), "resume changed the run"
    assert a["state_dict"]["model.head.mask_probabilities"].tolist() == [0.0]
