"""Whole-image, sliding-window and TTA inference against straightforward reference computations."""

import math
from functools import partial

import pytest
import torch
import torch.nn.functional as F

from dinov3ds.errors import UserError
from dinov3ds.models import inference
from dinov3ds.models.inference import (
    InferenceOptions,
    argmax_classes,
    labels_at_size,
    predict_slide,
    predict_tta,
    predict_whole,
    run_inference,
)

NUM_CLASSES = 4


class ConvLogits:
    """A fixed random 3×3 conv with zero padding: its output depends on where the window borders are."""

    def __init__(self, symmetric: bool = False, seed: int = 0) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.weight = torch.randn(NUM_CLASSES, 3, 3, 3, generator=generator, dtype=torch.float64)
        if symmetric:  # mirror-symmetric kernel: the conv commutes with a horizontal flip
            self.weight = (self.weight + self.weight.flip(-1)) / 2
        self.bias = torch.randn(NUM_CLASSES, generator=generator, dtype=torch.float64)
        self.batch_sizes: list[int] = []
        self.input_sizes: list[tuple[int, int]] = []

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.batch_sizes.append(x.shape[0])
        self.input_sizes.append(tuple(x.shape[-2:]))
        return F.conv2d(x, self.weight, self.bias, padding=1)


def images(batch: int, height: int, width: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(
        batch, 3, height, width, generator=torch.Generator().manual_seed(seed), dtype=torch.float64
    )


def window_starts(length: int, crop: int, stride: int) -> list[int]:
    """Written from the definition, not from the code under test: step by `stride` while the window stays
    inside, then one last window flush with the far border (the whole axis if it is shorter than the crop)."""
    if length <= crop:
        return [0]
    starts = list(range(0, length - crop, stride))
    return starts + [length - crop]


def reference_slide(fn, x, crop, stride):
    """Enumerate every window, run it alone and average the overlaps; checks every pixel is covered."""
    batch, _, height, width = x.shape
    (crop_h, crop_w), (stride_h, stride_w) = crop, stride
    pad_h, pad_w = max(height, crop_h), max(width, crop_w)
    padded = torch.zeros(batch, 3, pad_h, pad_w, dtype=x.dtype)
    padded[..., :height, :width] = x
    total = torch.zeros(batch, NUM_CLASSES, pad_h, pad_w, dtype=x.dtype)
    count = torch.zeros(pad_h, pad_w, dtype=x.dtype)
    for y in window_starts(pad_h, crop_h, stride_h):
        for x0 in window_starts(pad_w, crop_w, stride_w):
            for b in range(batch):
                window = padded[b : b + 1, :, y : y + crop_h, x0 : x0 + crop_w]
                total[b : b + 1, :, y : y + crop_h, x0 : x0 + crop_w] += fn(window)
            count[y : y + crop_h, x0 : x0 + crop_w] += 1
    assert count.min() >= 1, "the reference's windows leave a pixel uncovered"
    return (total / count)[..., :height, :width]


@pytest.mark.parametrize(("length", "crop", "stride", "starts"),
                         [(80, 48, 32, [0, 32]), (100, 48, 32, [0, 32, 52]), (112, 48, 32, [0, 32, 64]),
                          (48, 48, 16, [0]), (20, 48, 32, [0]), (97, 32, 32, [0, 32, 64, 65])])  # fmt: skip
def test_reference_window_starts_by_hand(length, crop, stride, starts):
    assert window_starts(length, crop, stride) == starts


def coverage(windows, height: int, width: int, crop: tuple[int, int]) -> torch.Tensor:
    """How many of the windows (top-left corners) cover each pixel."""
    count = torch.zeros(height, width)
    for y, x in windows:
        count[y : y + crop[0], x : x + crop[1]] += 1
    return count


class PositionLogits:
    """Logits that encode where a window came from: channel 0 holds the pixel's row, 1 its column, both
    relative to the window; a pixel then averages, over the windows covering it, its in-window position."""

    def __call__(self, crops: torch.Tensor) -> torch.Tensor:
        batch, _, height, width = crops.shape
        rows = torch.arange(height, dtype=crops.dtype).view(1, 1, height, 1).expand(batch, 1, height, width)
        cols = torch.arange(width, dtype=crops.dtype).view(1, 1, 1, width).expand(batch, 1, height, width)
        return torch.cat([rows, cols, crops[:, :1], torch.ones_like(rows)], dim=1)


@pytest.mark.parametrize(("size", "crop", "stride"), [((80, 112), (48, 48), (32, 32)), ((64, 150), (32, 64), (16, 40)),
                                                      ((97, 65), (32, 32), (32, 32))])  # fmt: skip
def test_every_pixel_is_covered_and_averaged_over_its_windows(size, crop, stride):
    """Per pixel: the mean in-window row/column over exactly the windows that contain it."""
    x = images(1, *size)
    result = predict_slide(PositionLogits(), x, crop=crop, stride=stride, num_classes=NUM_CLASSES)
    assert torch.isfinite(result).all()
    windows = [(y, x0) for y in window_starts(size[0], crop[0], stride[0])
               for x0 in window_starts(size[1], crop[1], stride[1])]  # fmt: skip
    count = coverage(windows, *size, crop)
    assert count.min() >= 1
    row_sum = torch.zeros(size, dtype=torch.float64)
    for y, x0 in windows:
        row_sum[y : y + crop[0], x0 : x0 + crop[1]] += torch.arange(crop[0], dtype=torch.float64)[:, None]
    torch.testing.assert_close(result[0, 0], row_sum / count.double(), rtol=0, atol=1e-12)
    torch.testing.assert_close(result[0, 2], x[0, 0], rtol=0, atol=1e-12)  # the image itself, averaged


def test_slide_with_crop_equal_to_image_equals_whole():
    fn, x = ConvLogits(), images(2, 48, 64)
    slide = predict_slide(fn, x, crop=(48, 64), stride=(32, 32), num_classes=NUM_CLASSES)
    assert torch.allclose(slide, predict_whole(fn, x), rtol=0, atol=1e-12)


@pytest.mark.parametrize("size", [(80, 80), (80, 112), (100, 70)])
def test_slide_matches_reference_loop(size):
    fn, x = ConvLogits(), images(2, *size)
    result = predict_slide(fn, x, crop=48, stride=32, num_classes=NUM_CLASSES, window_batch=3)
    assert result.shape == (2, NUM_CLASSES, *size)
    assert torch.allclose(result, reference_slide(fn, x, (48, 48), (32, 32)), rtol=0, atol=1e-12)
    # The overlaps matter: the conv's zero padding at window borders makes this differ from one pass.
    assert not torch.allclose(result, predict_whole(fn, x), atol=1e-3)


def test_slide_non_square_crop_and_stride():
    fn, x = ConvLogits(), images(1, 80, 112)
    result = predict_slide(fn, x, crop=(32, 64), stride=(16, 40), num_classes=NUM_CLASSES)
    assert torch.allclose(result, reference_slide(fn, x, (32, 64), (16, 40)), rtol=0, atol=1e-12)


@pytest.mark.parametrize("size", [(20, 30), (40, 112)])
def test_image_smaller_than_crop_is_padded_and_cut(size):
    fn, x = ConvLogits(), images(1, *size)
    result = predict_slide(fn, x, crop=48, stride=32, num_classes=NUM_CLASSES)
    assert result.shape == (1, NUM_CLASSES, *size)
    assert set(fn.input_sizes) == {(48, 48)}
    assert torch.allclose(result, reference_slide(fn, x, (48, 48), (32, 32)), rtol=0, atol=1e-12)


def test_window_batch_does_not_change_the_result():
    x = images(2, 80, 112)
    one = predict_slide(ConvLogits(), x, crop=48, stride=32, num_classes=NUM_CLASSES, window_batch=1)
    eight = predict_slide(ConvLogits(), x, crop=48, stride=32, num_classes=NUM_CLASSES, window_batch=8)
    assert torch.allclose(one, eight, rtol=0, atol=1e-12)


@pytest.mark.parametrize(("batch", "window_batch"), [(1, 4), (2, 5), (2, 1), (1, 100)])
def test_windows_are_processed_in_bounded_batches(batch, window_batch):
    fn = ConvLogits()
    predict_slide(
        fn, images(batch, 80, 112), crop=48, stride=32, num_classes=NUM_CLASSES, window_batch=window_batch
    )
    windows = batch * 2 * 3  # rows start at 0, 32; columns at 0, 32, 64
    assert len(fn.batch_sizes) == math.ceil(windows / window_batch)
    assert max(fn.batch_sizes) <= window_batch
    assert sum(fn.batch_sizes) == windows


def test_slide_accumulates_on_the_requested_device():
    """The sum buffers live where asked ("cpu" for a huge image on a GPU); the meta device shows it here."""
    x = images(1, 64, 64)
    assert predict_slide(ConvLogits(), x, crop=48, stride=32, num_classes=NUM_CLASSES).device.type == "cpu"
    result = predict_slide(ConvLogits(), x, crop=48, stride=32, num_classes=NUM_CLASSES, accumulate_device="meta")
    assert result.device.type == "meta"
    options = InferenceOptions(mode="slide", crop=48, stride=32, accumulate_device="meta")
    assert run_inference(ConvLogits(), x, options, NUM_CLASSES).device.type == "meta"


@pytest.mark.parametrize(
    "kwargs",
    [
        {"crop": 50, "stride": 32},
        {"crop": (48, 40), "stride": 32},
        {"crop": 48, "stride": 64},
        {"crop": 48, "stride": (32, 64)},  # too large on the width only: columns no window covers
        {"crop": 48, "stride": (64, 32)},
        {"crop": 48, "stride": 0},
        {"crop": 48, "stride": 32, "window_batch": 0},
        {"crop": 48, "stride": 32, "num_classes": NUM_CLASSES + 1},
    ],
)
def test_slide_rejects_bad_settings(kwargs):
    kwargs = {"num_classes": NUM_CLASSES, **kwargs}
    with pytest.raises(UserError):
        predict_slide(ConvLogits(), images(1, 64, 64), **kwargs)


def test_whole_resizes_non_multiples_and_back():
    fn = ConvLogits()
    result = predict_whole(fn, images(1, 40, 50))
    assert fn.input_sizes == [(48, 48)]  # 40 → 48 (ties round up), 50 → 48
    assert result.shape == (1, NUM_CLASSES, 40, 50)
    x = images(1, 32, 48)
    assert torch.equal(predict_whole(fn, x), fn(x))  # multiples go in untouched


def test_flip_tta_on_flip_equivariant_function_equals_no_tta():
    fn, x = ConvLogits(symmetric=True), images(2, 48, 64)
    plain = predict_whole(fn, x).softmax(dim=1)
    assert torch.allclose(predict_tta(partial(predict_whole, fn), x, flip=True), plain, rtol=0, atol=1e-12)


def test_flip_tta_averages_unflipped_probabilities():
    fn, x = ConvLogits(), images(1, 48, 64)
    expected = (fn(x).softmax(dim=1) + fn(x.flip(-1)).flip(-1).softmax(dim=1)) / 2
    result = predict_tta(partial(predict_whole, fn), x, flip=True)
    assert torch.allclose(result, expected, rtol=0, atol=1e-12)
    assert not torch.allclose(result, fn(x).softmax(dim=1), atol=1e-3)


def test_multi_scale_tta_shape_sizes_and_probabilities():
    fn = ConvLogits()
    result = predict_tta(partial(predict_whole, fn), images(2, 40, 56), flip=True, scales=(0.5, 1.0, 1.5))
    assert result.shape == (2, NUM_CLASSES, 40, 56)
    assert torch.allclose(result.sum(dim=1), torch.ones(2, 40, 56, dtype=result.dtype))
    # 0.5: 20×28 → 16×32; 1.0: 40×56 → predict_whole's own 48×64; 1.5: 60×84 → 64×80; each also flipped.
    assert fn.input_sizes == [(16, 32)] * 2 + [(48, 64)] * 2 + [(64, 80)] * 2


def test_tta_rejects_empty_scales():
    with pytest.raises(UserError):
        predict_tta(partial(predict_whole, ConvLogits()), images(1, 32, 32), scales=())


def test_run_inference_dispatches():
    x = images(1, 80, 112)
    slide = run_inference(ConvLogits(), x, InferenceOptions(mode="slide", crop=48, stride=32), NUM_CLASSES)
    expected = predict_slide(ConvLogits(), x, crop=48, stride=32, num_classes=NUM_CLASSES).softmax(dim=1)
    assert torch.allclose(slide, expected, rtol=0, atol=1e-12)
    whole = run_inference(ConvLogits(), x, InferenceOptions(), NUM_CLASSES)
    assert torch.allclose(whole, predict_whole(ConvLogits(), x).softmax(dim=1), rtol=0, atol=1e-12)


def test_run_inference_default_stride_is_two_thirds_of_crop():
    fn = ConvLogits()
    run_inference(fn, images(1, 48, 96), InferenceOptions(mode="slide", crop=48, window_batch=1), NUM_CLASSES)
    assert len(fn.batch_sizes) == 3  # stride 32: columns start at 0, 32, 48


def test_run_inference_default_stride_follows_each_side_of_a_non_square_crop():
    """Crop 32×64 → stride 21×42 (two thirds of each side), never the height's two thirds on both axes."""
    x = images(1, 64, 150)
    result = run_inference(ConvLogits(), x, InferenceOptions(mode="slide", crop=(32, 64)), NUM_CLASSES)
    expected = reference_slide(ConvLogits(), x, (32, 64), (21, 42)).softmax(dim=1)
    torch.testing.assert_close(result, expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("scale", [0.5, 1.5])
def test_multi_scale_tta_resizes_logits_then_takes_the_softmax(scale):
    """mmseg's order: logits of the scaled view, resized back to the image, then softmax."""
    fn, x = ConvLogits(), images(1, 48, 64)
    size = tuple(int(side * scale / 16 + 0.5) * 16 for side in (48, 64))  # 24×32 → 32×32; 72×96 → 80×96
    logits = fn(F.interpolate(x, size=size, mode="bilinear", align_corners=False))
    expected = F.interpolate(logits, size=(48, 64), mode="bilinear", align_corners=False).softmax(dim=1)
    result = predict_tta(partial(predict_whole, fn), x, scales=(scale,))
    torch.testing.assert_close(result, expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("kwargs", [{"mode": "tile"}, {"mode": "slide"}])
def test_inference_options_reject_bad_values(kwargs):
    with pytest.raises(UserError):
        InferenceOptions(**kwargs)


def test_run_inference_uses_the_configured_stride_flip_and_scales():
    x = images(1, 48, 96)
    fn = ConvLogits()
    run_inference(fn, x, InferenceOptions(mode="slide", crop=48, stride=16, window_batch=1), NUM_CLASSES)
    assert len(fn.batch_sizes) == 4  # columns start at 0, 16, 32, 48 (the default stride 32 gives 3)
    options = InferenceOptions(flip=True, scales=(0.5, 1.0))
    expected = predict_tta(partial(predict_whole, ConvLogits()), x, flip=True, scales=(0.5, 1.0))
    torch.testing.assert_close(run_inference(ConvLogits(), x, options, NUM_CLASSES), expected, rtol=0, atol=0)


@pytest.mark.parametrize("crop, message", [(0, r"crop=0 must be a positive int"), ((48, 48, 48), r"crop=\(48, 48, 48\)"),
                                           (48.0, r"crop=48.0 must be")])  # fmt: skip
def test_bad_crop_is_named(crop, message):
    with pytest.raises(UserError, match=message):
        run_inference(ConvLogits(), images(1, 48, 48), InferenceOptions(mode="slide", crop=crop), NUM_CLASSES)


def test_a_one_pixel_window_side_is_valid():
    assert inference._pair(1, "crop") == (1, 1) and inference._pair((1, 3), "stride") == (1, 3)


def test_labels_at_size_resizes_probabilities_bilinearly_then_takes_the_argmax():
    """Two classes whose probabilities cross between the coarse pixels: the label boundary follows the
    interpolated scores (align_corners=False), at a finer place than nearest-neighbour labels would put it."""
    foreground = torch.tensor([0.0, 0.2, 0.55, 1.0], dtype=torch.float64).view(1, 1, 1, 4)
    probabilities = torch.cat([1 - foreground, foreground], dim=1)
    labels = labels_at_size(probabilities, (2, 16))
    expected = F.interpolate(probabilities, size=(2, 16), mode="bilinear", align_corners=False).argmax(1)
    assert torch.equal(labels, expected) and labels.shape == (1, 2, 16)
    # p crosses 0.5 at 6/7 of the way from 0.2 to 0.55: output pixel 9 (nearest labels: 8; align_corners: 10).
    assert labels[0, 0].tolist() == [0] * 9 + [1] * 7
    same = torch.tensor([[[[0.1, 0.7]], [[0.6, 0.2]], [[0.3, 0.1]]]])  # [1, 3, 1, 2]: no resize, argmax over classes
    assert labels_at_size(same, (1, 2)).tolist() == [[[1, 0]]]


@pytest.mark.parametrize("shape, size", [((2, 9, 7, 5), (61, 43)), ((1, 4, 32, 48), (500, 750)), ((1, 3, 10, 10), (5, 3))])
def test_labels_in_bands_equal_one_full_resize(shape, size):
    probabilities = torch.randn(*shape, generator=torch.Generator().manual_seed(0)).softmax(1)
    expected = F.interpolate(probabilities, size=size, mode="bilinear", align_corners=False).argmax(1)
    for band in (1 << 24, shape[0] * shape[1] * size[1] * 3, 1):  # one band, bands of 3 rows, one row at a time
        assert torch.equal(labels_at_size(probabilities, size, max_band_elements=band), expected)


def test_a_huge_label_map_never_holds_every_class_at_full_size(monkeypatch):
    """150 classes at 6000x4000 would be 14.4 GB of float32; no interpolation may produce more than a band."""
    largest = []
    real = F.interpolate

    def watched(*args, **kwargs):
        out = real(*args, **kwargs)
        largest.append(out.numel())
        return out

    monkeypatch.setattr(inference.F, "interpolate", watched)
    labels = labels_at_size(torch.rand(1, 150, 40, 60), (600, 900), max_band_elements=1 << 20)
    assert labels.shape == (1, 600, 900) and max(largest) <= 1 << 20 < 150 * 600 * 900


def test_argmax_classes_is_argmax_ties_and_nan_included():
    scores = torch.randint(0, 3, (2, 5, 16, 20)).float()  # many ties: the first largest wins in both
    scores[0, 2, 3, 4] = float("nan")
    assert torch.equal(argmax_classes(scores), scores.argmax(dim=1))
    assert torch.equal(argmax_classes(scores.bfloat16()), scores.bfloat16().argmax(dim=1))
