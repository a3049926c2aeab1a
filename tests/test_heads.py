"""One tester run for every registered segmentation head (FAPM joins automatically once registered)."""

import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dinov3ds.errors import UserError
from dinov3ds.heads import HEADS, SegmentationHead, build_head
from dinov3ds.heads.dpt import resample

# Heads on feature maps; heads that read a ViT's tokens (pmt) have their own tests in test_pmt.py.
PIXEL_HEADS = sorted(name for name, cls in HEADS.items() if not cls.reads_tokens)
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
    "fapm": {"drop_path": 0.0},  # DropPath drops whole residual branches at random: no gradient to them then
    "dpt": {"features": 32, "reassemble_channels": [16, 32, 64, 128]},
    "unet_sum": {"base_channels": 32},
    "unet_adapter": {"decoder_channels": [32, 16, 16, 8], "conv_channels": 16, "drop_path": 0.0},
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
    multiple = HEADS[name].input_multiple  # a head promises only sizes that are multiples of this
    if any(side % multiple for side in size):
        pytest.skip(f"{name} needs sides that are multiples of {multiple}")


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


@pytest.mark.parametrize("name", PIXEL_HEADS)
@pytest.mark.parametrize(("backbone", "size"), CASES)
def test_forward_gives_logits_at_input_resolution(name: str, backbone: str, size: tuple[int, int]) -> None:
    skip_unsupported(name, size)
    head = make_head(name, backbone)
    features, image = make_inputs(backbone, size)
    logits = head(features, image)
    assert logits.shape == (2, 3, *size)
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("name", PIXEL_HEADS)
@pytest.mark.parametrize("backbone", sorted(BACKBONES))
def test_default_options_run(name: str, backbone: str) -> None:
    in_channels, strides = BACKBONES[backbone]
    head = build_head(name, in_channels, strides, 2).eval()
    features, image = make_inputs(backbone, (64, 96), batch=1)
    with torch.no_grad():
        assert head(features, image).shape == (1, 2, 64, 96)


@pytest.mark.parametrize("name", PIXEL_HEADS)
@pytest.mark.parametrize("num_classes", [1, 5])
def test_any_number_of_classes(name: str, num_classes: int) -> None:
    head = make_head(name, "vit_small", num_classes).eval()
    features, image = make_inputs("vit_small", (64, 64), batch=1)
    assert head(features, image).shape == (1, num_classes, 64, 64)


@pytest.mark.parametrize("name", PIXEL_HEADS)
@pytest.mark.parametrize("backbone", sorted(BACKBONES))
def test_backward_reaches_every_trainable_parameter(name: str, backbone: str) -> None:
    head = make_head(name, backbone)
    features, image = make_inputs(backbone, (64, 96))
    head(features, image).square().mean().backward()
    missing = [n for n, p in head.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing
    assert all(torch.isfinite(p.grad).all() for p in head.parameters())


@pytest.mark.parametrize("name", PIXEL_HEADS)
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


@pytest.mark.parametrize("name", PIXEL_HEADS)
def test_channels_last_head_gives_the_same_logits_and_gradients(name: str) -> None:
    """What `place_model` does on CUDA: NHWC weights must not change the result (no layout-dependent view).
    In float64, so that a different summation order cannot hide a real difference in float32 noise."""
    head = make_head(name, "vit_small").double().eval()
    features, image = make_inputs("vit_small", (64, 96))
    features, image = [f.double() for f in features], image.double()
    expected = head(features, image)
    expected.square().mean().backward()
    expected_grads = [p.grad.clone() for p in head.parameters()]
    head.zero_grad(set_to_none=True)
    head.to(memory_format=torch.channels_last)
    assert any(p.dim() == 4 and p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous()
               for p in head.parameters()) or name == "linear"  # fmt: skip
    output = head(features, image.contiguous(memory_format=torch.channels_last))
    output.square().mean().backward()
    torch.testing.assert_close(output, expected, rtol=1e-9, atol=1e-10)
    for grad, expected_grad in zip((p.grad for p in head.parameters()), expected_grads):
        torch.testing.assert_close(grad, expected_grad, rtol=1e-7, atol=1e-10)


# Trainable parameters with four ViT taps of width 384 / 768 / 1024 (S / B / L), for 1 and 150 classes.
PARAMETER_COUNTS = {
    "linear": {384: (1_153, 58_518), 768: (2_305, 116_886), 1024: (3_073, 155_798)},
    "segdino": {384: (2_213_793, 2_290_230), 768: (2_766_753, 2_843_190), 1024: (3_135_393, 3_211_830)},
    "dpt": {384: (13_038_817, 13_077_110), 768: (19_730_881, 19_769_174), 1024: (30_611_969, 30_650_262)},
    "unet": {384: (2_377_081, 2_441_598), 768: (9_502_705, 9_631_590), 1024: (16_891_201, 17_062_998)},
    "unet_sum": {384: (790_225, 833_286), 768: (1_186_513, 1_229_574), 1024: (1_450_705, 1_493_766)},
    "unet_adapter": {384: (5_260_849, 5_265_766), 768: (12_536_689, 12_541_606), 1024: (19_664_769, 19_669_686)},
    "fapm": {384: (6_194_527, 6_199_444), 768: (13_181_599, 13_186_516), 1024: (19_969_567, 19_974_484)},
}

def test_every_head_has_pinned_parameter_counts() -> None:
    assert set(PARAMETER_COUNTS) == set(PIXEL_HEADS)


@pytest.mark.parametrize("name", sorted(PARAMETER_COUNTS))
@pytest.mark.parametrize("width", [384, 768, 1024])
def test_parameter_counts_are_pinned(name: str, width: int) -> None:
    counts = tuple(build_head(name, [width] * 4, [16] * 4, k).trainable_parameters() for k in (1, 150))
    assert counts == PARAMETER_COUNTS[name][width]


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
        build_head("unet_sum", [384] * 4, [16] * 4, 2, base_channel=128)
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
    small = build_head("unet_sum", [384] * 4, [16] * 4, 2, base_channels=64)
    assert small.trainable_parameters() < build_head("unet_sum", [384] * 4, [16] * 4, 2).trainable_parameters()
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


# --- values, not only shapes -------------------------------------------------------------------------------


def test_linear_head_output_by_hand() -> None:
    """Eval mode, one pixel: BN((x - mean) / sqrt(var + eps) · γ + β), then w·y + b, broadcast by the up-sampling."""
    head = build_head("linear", [2], [16], 1).eval()
    with torch.no_grad():
        head.norm.running_mean.copy_(torch.tensor([0.5, -1.0]))
        head.norm.running_var.copy_(torch.tensor([4.0, 0.25]))
        head.norm.weight.copy_(torch.tensor([2.0, 1.0]))
        head.norm.bias.copy_(torch.tensor([1.0, 0.0]))
        head.classifier.weight.copy_(torch.tensor([3.0, -2.0]).view(1, 2, 1, 1))
        head.classifier.bias.fill_(0.5)
    features = [torch.tensor([2.5, 0.0]).view(1, 2, 1, 1)]
    eps = head.norm.eps
    y0 = (2.5 - 0.5) / (4.0 + eps) ** 0.5 * 2.0 + 1.0  # ≈ 3
    y1 = (0.0 + 1.0) / (0.25 + eps) ** 0.5  # ≈ 2
    expected = 3.0 * y0 - 2.0 * y1 + 0.5  # ≈ 5.5
    logits = head(features, torch.zeros(1, 3, 16, 16))
    assert logits.shape == (1, 1, 16, 16)
    torch.testing.assert_close(logits, torch.full((1, 1, 16, 16), expected), rtol=0, atol=1e-5)


def test_segdino_output_by_hand() -> None:
    """Widths 1, identity convs, only tap 0 reaches the classifier: the output is tap 0 up-sampled ×16,
    bilinear with half-pixel centres (align_corners=False), computed here pixel by pixel."""
    head = build_head("segdino", [1] * 4, [16] * 4, 1, projection_channels=[1] * 4, hidden_channels=1).eval()
    with torch.no_grad():
        for branch in head.branches:
            branch[0].weight.fill_(1.0)
            branch[0].bias.zero_()
            branch[1].weight.zero_()
            branch[1].weight[0, 0, 1, 1] = 1.0  # 3×3 identity
        head.classifier.weight.copy_(torch.tensor([1.0, 0.0, 0.0, 0.0]).view(1, 4, 1, 1))
        head.classifier.bias.zero_()
    a, b, c, d = 1.0, 3.0, -2.0, 5.0
    tap0 = torch.tensor([[a, b], [c, d]]).view(1, 1, 2, 2)
    features = [tap0] + [torch.randn(1, 1, 2, 2) * 100 for _ in range(3)]
    logits = head(features, torch.zeros(1, 3, 32, 32))[0, 0]

    def weight(index: int) -> float:  # position of output pixel `index` between the two source pixels
        return min(max((index + 0.5) / 16 - 0.5, 0.0), 1.0)

    for i, j in [(0, 0), (31, 31), (15, 0), (8, 8), (16, 23), (23, 8)]:
        wy, wx = weight(i), weight(j)
        expected = (1 - wy) * ((1 - wx) * a + wx * b) + wy * ((1 - wx) * c + wx * d)
        assert abs(logits[i, j].item() - expected) < 1e-5, (i, j, logits[i, j].item(), expected)


def test_segdino_fuses_at_the_first_taps_resolution() -> None:
    """With a ConvNeXt (strides 4…32) the taps meet at stride 4, the finest map, not at stride 32."""
    in_channels, strides = BACKBONES["convnext_tiny"]
    head = build_head("segdino", in_channels, strides, 2).eval()
    seen = []
    head.classifier.register_forward_hook(lambda module, inputs, output: seen.append(tuple(inputs[0].shape[-2:])))
    features, image = make_inputs("convnext_tiny", (64, 96), batch=1)
    with torch.no_grad():
        head(features, image)
    assert seen == [(16, 24)]


@pytest.mark.parametrize("name", PIXEL_HEADS)
def test_zero_weights_give_the_classifier_bias_everywhere(name: str) -> None:
    """Every weight zero, the last layer's bias b: logits are b at every pixel, whatever the input."""
    head = make_head(name, "vit_small", num_classes=3).eval()
    last_bias = [p for n, p in head.named_parameters() if n.endswith("bias")][-1]
    assert last_bias.shape == (3,)
    with torch.no_grad():
        for parameter in head.parameters():
            parameter.zero_()
        last_bias.copy_(torch.tensor([0.25, -1.5, 2.0]))
    features, image = make_inputs("vit_small", (64, 96), batch=1)
    logits = head(features, image)
    torch.testing.assert_close(logits, torch.tensor([0.25, -1.5, 2.0]).view(1, 3, 1, 1).expand(1, 3, 64, 96))


def test_linear_head_is_dropout_then_batchnorm_with_metas_init() -> None:
    """Meta's order: Dropout2d before BatchNorm (in training the BN statistics see the dropped channels), then
    a 1x1 conv initialised N(0, 0.01) with zero bias."""
    torch.manual_seed(0)
    head = build_head("linear", [384], [16], 150)
    assert [type(m) for m in head.children()] == [torch.nn.Dropout2d, torch.nn.BatchNorm2d, torch.nn.Conv2d]
    weight = head.classifier.weight
    assert abs(float(weight.std()) - 0.01) < 0.0005 and abs(float(weight.mean())) < 0.0005
    assert torch.equal(head.classifier.bias, torch.zeros(150))
    head.train()
    features = [torch.randn(4, 384, 6, 6)]
    torch.manual_seed(1)
    got = head(features, torch.zeros(4, 3, 96, 96))
    torch.manual_seed(1)
    dropped = head.dropout(features[0])
    expected = F.interpolate(head.classifier(torch.nn.functional.batch_norm(dropped, None, None, head.norm.weight,
                                                                          head.norm.bias, training=True)),
                             size=(96, 96), mode="bilinear", align_corners=False)  # fmt: skip
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
