"""One tester run for every registered segmentation head (FAPM joins automatically once registered)."""

import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dinov3ds.errors import UserError
from dinov3ds.heads import HEADS, SegmentationHead, build_head
from dinov3ds.heads.dpt import resample

# name → (in_channels, strides): a ViT-S with four taps and the four stages of a ConvNeXt-tiny.
BACKBONES = {
    "vit_small": ([384] * 4, [16] * 4),
    "convnext_tiny": ([96, 192, 384, 768], [4, 8, 16, 32]),
}
SIZES = {"vit_small": [(64, 96), (96, 64), (32, 48)], "convnext_tiny": [(64, 96), (96, 64)]}
CASES = [(backbone, size) for backbone, sizes in SIZES.items() for size in sizes]
# Narrow widths keep the shared tester fast on a CPU (DPT's 256-wide 3×3 convs at stride 2 dominate);
# the defaults are exercised by test_default_options_run and the parameter-count tests.
NARROW_OPTIONS = {
    "dpt": {"features": 32, "reassemble_channels": [16, 32, 64, 128]},
    "unet": {"base_channels": 32},
}


@pytest.fixture(autouse=True)
def seeded_single_thread():
    # These tensors are tiny: with several threads on a loaded CPU, OpenMP synchronisation made the
    # overfitting tests 30x slower than on one thread.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    yield
    torch.set_num_threads(threads)


def skip_unsupported(name: str, size: tuple[int, int]) -> None:
    # FAPM's adapter works on a stride-32 grid, so it promises only sizes that are multiples of 32.
    if name == "fapm" and any(side % 32 for side in size):
        pytest.skip("fapm needs sides that are multiples of 32")


def make_inputs(
    backbone: str, size: tuple[int, int], batch: int = 2
) -> tuple[list[torch.Tensor], torch.Tensor]:
    in_channels, strides = BACKBONES[backbone]
    height, width = size
    features = [
        torch.randn(batch, channels, height // stride, width // stride)
        for channels, stride in zip(in_channels, strides, strict=True)
    ]
    return features, torch.randn(batch, 3, height, width)


def make_head(name: str, backbone: str, num_classes: int = 3) -> nn.Module:
    in_channels, strides = BACKBONES[backbone]
    return build_head(name, in_channels, strides, num_classes, **NARROW_OPTIONS.get(name, {}))


@pytest.mark.parametrize("name", sorted(HEADS))
@pytest.mark.parametrize(("backbone", "size"), CASES)
def test_forward_gives_logits_at_input_resolution(name: str, backbone: str, size: tuple[int, int]) -> None:
    skip_unsupported(name, size)
    head = make_head(name, backbone)
    features, image = make_inputs(backbone, size)
    logits = head(features, image)
    assert logits.shape == (2, 3, *size)
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("name", sorted(HEADS))
@pytest.mark.parametrize("backbone", sorted(BACKBONES))
def test_default_options_run(name: str, backbone: str) -> None:
    in_channels, strides = BACKBONES[backbone]
    head = build_head(name, in_channels, strides, 2).eval()
    features, image = make_inputs(backbone, (64, 96), batch=1)
    with torch.no_grad():
        assert head(features, image).shape == (1, 2, 64, 96)


@pytest.mark.parametrize("name", sorted(HEADS))
@pytest.mark.parametrize("num_classes", [1, 5])
def test_any_number_of_classes(name: str, num_classes: int) -> None:
    head = make_head(name, "vit_small", num_classes).eval()
    features, image = make_inputs("vit_small", (64, 64), batch=1)
    assert head(features, image).shape == (1, num_classes, 64, 64)


@pytest.mark.parametrize("name", sorted(HEADS))
@pytest.mark.parametrize("backbone", sorted(BACKBONES))
def test_backward_reaches_every_trainable_parameter(name: str, backbone: str) -> None:
    head = make_head(name, backbone)
    features, image = make_inputs(backbone, (64, 96))
    head(features, image).square().mean().backward()
    missing = [n for n, p in head.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing
    assert all(torch.isfinite(p.grad).all() for p in head.parameters())


@pytest.mark.parametrize("name", sorted(HEADS))
def test_state_dict_round_trip_gives_identical_output(name: str, tmp_path) -> None:
    head = make_head(name, "vit_small")
    features, image = make_inputs("vit_small", (64, 96))
    for _ in range(2):  # move BatchNorm running statistics away from their initial values
        head(features, image)
    torch.save(head.state_dict(), tmp_path / "head.pt")
    torch.manual_seed(1)
    restored = make_head(name, "vit_small")
    restored.load_state_dict(torch.load(tmp_path / "head.pt", weights_only=True))
    with torch.no_grad():
        expected = head.eval()(features, image)
        assert torch.equal(restored.eval()(features, image), expected)


@pytest.mark.parametrize("name", sorted(HEADS))
def test_channels_last_head_gives_the_same_logits_and_gradients(name: str) -> None:
    """What `place_model` does on CUDA: NHWC weights must not change the result (no layout-dependent view)."""
    head = make_head(name, "vit_small").eval()
    features, image = make_inputs("vit_small", (64, 96))
    expected = head(features, image)
    expected.square().mean().backward()
    expected_grads = [p.grad.clone() for p in head.parameters()]
    head.zero_grad(set_to_none=True)
    head.to(memory_format=torch.channels_last)
    assert any(p.dim() == 4 and p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous()
               for p in head.parameters()) or name == "linear"  # fmt: skip
    output = head(features, image.contiguous(memory_format=torch.channels_last))
    output.square().mean().backward()
    torch.testing.assert_close(output, expected, rtol=1e-4, atol=1e-5)
    for grad, expected_grad in zip((p.grad for p in head.parameters()), expected_grads):
        torch.testing.assert_close(grad, expected_grad, rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("name", sorted(HEADS))
def test_overfits_one_small_batch(name: str) -> None:
    in_channels, strides = [64] * 4, [16] * 4
    features = [torch.randn(2, 64, 2, 4) for _ in strides]
    image = torch.randn(2, 3, 32, 64)
    # Labels are a fixed function of the features: the sign of one channel of the last tap.
    labels = F.interpolate((features[-1][:, :1] > 0).float(), size=(32, 64)).squeeze(1).long()
    head = build_head(name, in_channels, strides, num_classes=2, **NARROW_OPTIONS.get(name, {}))
    optimizer = torch.optim.Adam(head.parameters(), lr=1e-3)

    def eval_loss() -> float:
        with torch.no_grad():
            return F.cross_entropy(head.eval()(features, image), labels).item()

    initial = eval_loss()
    for step in range(1, 61):
        optimizer.zero_grad()
        F.cross_entropy(head.train()(features, image), labels).backward()
        optimizer.step()
        if step % 10 == 0 and eval_loss() <= 0.5 * initial:
            return
    pytest.fail(f"{name}: loss {eval_loss():.3f} after 60 steps, started at {initial:.3f}")


def test_segdino_has_the_papers_parameter_count() -> None:
    assert build_head("segdino", [384] * 4, [16] * 4, 1).trainable_parameters() == 2_213_793


def test_parameter_counts_for_vit_small_ade20k(capsys) -> None:
    counts = {name: build_head(name, [384] * 4, [16] * 4, 150).trainable_parameters() for name in HEADS}
    with capsys.disabled():
        print()
        for name, count in counts.items():
            print(f"{name:>8}: {count:>12,} trainable parameters (ViT-S, 150 classes)")
    assert counts["linear"] == 2 * 384 + 384 * 150 + 150  # BatchNorm affine + 1×1 conv
    assert counts["unet"] < 3_000_000


def test_build_head_logs_trainable_parameters(caplog) -> None:
    with caplog.at_level(logging.INFO, logger="dinov3ds"):
        build_head("linear", [384], [16], 150)
    assert "58,518 trainable parameters" in caplog.text


def test_unknown_head_lists_valid_names() -> None:
    with pytest.raises(UserError, match="segdino") as error:
        build_head("segformer", [384] * 4, [16] * 4, 2)
    assert "\n" not in str(error.value)


def test_unknown_option_lists_valid_options() -> None:
    with pytest.raises(UserError, match="base_channels"):
        build_head("unet", [384] * 4, [16] * 4, 2, base_channel=128)
    with pytest.raises(UserError, match="none|dropout"):
        build_head("linear", [384] * 4, [16] * 4, 2, features=128)


def test_base_rejects_forwarded_unknown_options_and_zero_classes() -> None:
    class ForwardingHead(HEADS["linear"]):
        def __init__(self, in_channels, strides, num_classes, **options) -> None:
            super().__init__(in_channels, strides, num_classes)
            SegmentationHead.__init__(self, in_channels, strides, num_classes, **options)

    with pytest.raises(UserError, match="colour"):
        ForwardingHead([384], [16], 2, colour="red")
    with pytest.raises(UserError, match="num_classes"):
        build_head("linear", [384] * 4, [16] * 4, 0)


def test_options_reach_the_head() -> None:
    small = build_head("unet", [384] * 4, [16] * 4, 2, base_channels=64)
    assert small.trainable_parameters() < build_head("unet", [384] * 4, [16] * 4, 2).trainable_parameters()
    with pytest.raises(UserError, match="projection_channels"):
        build_head("segdino", [384] * 4, [16] * 4, 2, projection_channels=[96, 192])


@pytest.mark.parametrize(
    ("from_stride", "to_stride", "module"),
    [(16, 4, nn.ConvTranspose2d), (16, 16, nn.Identity), (16, 32, nn.Conv2d), (8, 8, nn.Identity)],
)
def test_resample_picks_up_down_or_identity(from_stride: int, to_stride: int, module: type) -> None:
    layer = resample(8, from_stride, to_stride)
    assert isinstance(layer, module)
    x = torch.randn(1, 8, 96 // from_stride, 64 // from_stride)
    assert layer(x).shape[-2:] == (96 // to_stride, 64 // to_stride)
