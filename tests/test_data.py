"""Image I/O, transforms, datasets and synthetic data, on tiny files generated in tmp_path."""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import v2 as torchvision_v2

from dinov3ds.data import transforms as transforms_module
from dinov3ds.data.classification import IMAGENETTE_CLASSES, ImageFolderDataset
from dinov3ds.data.io import find_images, load_image, load_mask
from dinov3ds.data.layout import MaskLabels, SegmentationLayout
from dinov3ds.data.segmentation import (
    ADE20K_CLASSES,
    ADE20K_PALETTE,
    SegmentationFolderDataset,
    ade20k_dataset,
)
from dinov3ds.data.synthetic import make_classification_folder, make_segmentation_folder
from dinov3ds.data.transforms import (
    SegmentationEvalTransform,
    SegmentationTrainTransform,
    classification_eval_transform,
    classification_train_transform,
    denormalize,
)
from dinov3ds.errors import UserError
from dinov3ds.viz import default_palette

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def identity_pair(image, mask):
    """A transform that keeps the loaded image and processed mask, so tests see the raw labels."""
    return image, torch.as_tensor(mask)


def save(image: Image.Image, path: Path, **kwargs) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, **kwargs)
    return path


# ----------------------------------------------------------------------------------------------- io


def test_load_image_grayscale_becomes_rgb(tmp_path):
    gray = np.arange(64, dtype=np.uint8).reshape(8, 8) * 3
    image = load_image(save(Image.fromarray(gray), tmp_path / "g.png"))
    assert image.mode == "RGB"
    pixels = np.asarray(image)
    for channel in range(3):
        np.testing.assert_array_equal(pixels[..., channel], gray)


def test_load_image_rgba_composites_on_black(tmp_path):
    rgba = np.zeros((2, 2, 4), dtype=np.uint8)
    rgba[..., :3] = (200, 100, 50)
    rgba[..., 3] = [[0, 255], [128, 255]]
    pixels = np.asarray(load_image(save(Image.fromarray(rgba), tmp_path / "a.png")))
    assert pixels[0, 0].tolist() == [0, 0, 0]
    assert pixels[0, 1].tolist() == [200, 100, 50]
    assert abs(int(pixels[1, 0, 0]) - 100) <= 1


def test_load_image_palette_gives_palette_colours(tmp_path):
    palette_image = Image.fromarray(np.array([[0, 1], [1, 0]], dtype=np.uint8), mode="P")
    palette_image.putpalette([10, 20, 30, 250, 0, 0] + [0] * 762)
    pixels = np.asarray(load_image(save(palette_image, tmp_path / "p.png")))
    assert pixels[0, 1].tolist() == [250, 0, 0]
    assert pixels[0, 0].tolist() == [10, 20, 30]


def test_load_image_16bit_scales_value_range(tmp_path):
    gradient = np.tile(np.linspace(0, 4000, 33).astype(np.uint16), (4, 1))
    path = save(Image.fromarray(gradient), tmp_path / "deep.png")
    assert Image.open(path).mode.startswith("I")
    pixels = np.asarray(load_image(path))[0, :, 0]
    assert pixels.min() == 0 and pixels.max() == 255
    assert abs(int(pixels[16]) - 128) <= 1  # clipping at 255 would give 255 here
    assert (np.diff(pixels.astype(int)) >= 0).all()


def test_load_image_cmyk_jpeg(tmp_path):
    path = save(Image.new("CMYK", (8, 8), (0, 255, 255, 0)), tmp_path / "cmyk.jpg", quality=95)
    image = load_image(path)
    red, green, blue = np.asarray(image).reshape(-1, 3).mean(0)
    assert image.mode == "RGB" and red > 200 and green < 60 and blue < 60


def test_load_image_applies_exif_orientation(tmp_path):
    image = Image.new("RGB", (20, 10), (0, 128, 0))
    exif = image.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    path = save(image, tmp_path / "phone.jpg", exif=exif)
    assert Image.open(path).size == (20, 10)
    assert load_image(path).size == (10, 20)


def zero_byte_file(folder: Path) -> Path:
    (folder / "empty.jpg").write_bytes(b"")
    return folder / "empty.jpg"


def truncated_jpeg(folder: Path) -> Path:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(
        buffer, "JPEG"
    )
    (folder / "cut.jpg").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    return folder / "cut.jpg"


def text_named_png(folder: Path) -> Path:
    (folder / "notes.png").write_text("not an image")
    return folder / "notes.png"


@pytest.mark.parametrize("make", [zero_byte_file, truncated_jpeg, text_named_png])
def test_load_image_unreadable_file_is_user_error(tmp_path, make):
    path = make(tmp_path)
    with pytest.raises(UserError, match="cannot read image") as error:
        load_image(path)
    assert str(path) in str(error.value) and "\n" not in str(error.value)


def test_load_mask_keeps_palette_indices(tmp_path):
    ids = np.array([[0, 3], [7, 3]], dtype=np.uint8)
    mask = Image.fromarray(ids, mode="P")
    mask.putpalette([channel for index in range(256) for channel in (255 - index, index, 100)])
    loaded = load_mask(save(mask, tmp_path / "m.png"))
    assert loaded.dtype == np.int64
    np.testing.assert_array_equal(loaded, ids)


def test_load_mask_truncated_png_is_user_error(tmp_path):
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 9, (64, 64), dtype=np.uint8)).save(buffer, "PNG")
    path = tmp_path / "cut_mask.png"
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    with pytest.raises(UserError, match="cut_mask.png"):
        load_mask(path)


def test_load_mask_16bit_keeps_large_ids(tmp_path):
    ids = np.array([[0, 300], [1000, 2]], dtype=np.uint16)
    np.testing.assert_array_equal(load_mask(save(Image.fromarray(ids), tmp_path / "m16.png")), ids)


def test_load_mask_rejects_colour_masks(tmp_path):
    colour = np.zeros((4, 4, 3), dtype=np.uint8)
    colour[0, 0] = (255, 0, 0)
    path = save(Image.fromarray(colour), tmp_path / "colour.png")
    with pytest.raises(UserError, match="class id"):
        load_mask(path)
    gray_rgb = np.repeat(np.array([[0, 2], [1, 2]], dtype=np.uint8)[..., None], 3, axis=2)
    np.testing.assert_array_equal(
        load_mask(save(Image.fromarray(gray_rgb), tmp_path / "g.png")), gray_rgb[..., 0]
    )


def test_find_images_recursive_sorted_skips_hidden(tmp_path):
    for name in ["b/2.PNG", "a.jpg", "b/1.webp", ".hidden.jpg", ".cache/x.jpg", "notes.txt", "c/d/e.TIFF"]:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    found = [p.relative_to(tmp_path).as_posix() for p in find_images(tmp_path)]
    assert found == ["a.jpg", "b/1.webp", "b/2.PNG", "c/d/e.TIFF"]
    with pytest.raises(UserError, match="missing"):
        find_images(tmp_path / "missing")


# --------------------------------------------------------------------------------------- transforms


def test_classification_transforms_output_size():
    image = Image.new("RGB", (50, 30), (10, 200, 30))
    assert classification_eval_transform(24, MEAN, STD)(image).shape == (3, 24, 24)
    out = classification_train_transform(16, MEAN, STD)(image)
    assert out.shape == (3, 16, 16) and out.dtype == torch.float32


def test_classification_eval_transform_resizes_then_center_crops():
    # A 64x32 image whose left half is black: resized to short side 32 (crop 28 / 0.875) and
    # centre-cropped to 28, the left edge stays black and the right edge stays white.
    pixels = np.full((32, 64, 3), 255, dtype=np.uint8)
    pixels[:, :32] = 0
    out = denormalize(classification_eval_transform(28, MEAN, STD)(Image.fromarray(pixels)), MEAN, STD)
    assert out.shape == (28, 28, 3)
    assert out[:, 0].max() < 10 and out[:, -1].min() > 245


def test_classification_eval_transform_resizes_to_size_over_crop_ratio_first():
    """The 256 → 224 protocol: a 256² image with a 16-pixel red frame loses the whole frame to the centre crop
    (resized straight to 224, a 14-pixel frame would survive)."""
    pixels = np.zeros((256, 256, 3), dtype=np.uint8)
    pixels[..., 0] = 255
    pixels[16:-16, 16:-16] = (0, 255, 0)
    out = denormalize(classification_eval_transform(224, MEAN, STD)(Image.fromarray(pixels)), MEAN, STD)
    assert out.shape == (224, 224, 3)
    assert out[..., 0].max() < 8 and out[..., 1].min() > 247  # green edge to edge, no red left


def test_photometric_jitter_runs_before_normalisation():
    """The distortion works on 8-bit pixels: the transform's output is normalise(distort(image)), never a
    distortion of normalised values (which would clip every negative one)."""
    image = noise_image(32, 32, seed=3)
    transform = SegmentationTrainTransform(32, MEAN, STD, scale_range=(1.0, 1.0), hflip=False)
    for seed in range(5):
        torch.manual_seed(seed)
        out_image, _ = transform(image, np.zeros((32, 32), dtype=np.int64))
        torch.manual_seed(seed)
        _uniform_ratio = transforms_module._uniform(1.0, 1.0)  # the scale draw comes first
        transforms_module._randint(0), transforms_module._randint(0)  # then the crop's two draws
        distorted = transforms_module.PhotoMetricDistortion()(torchvision_v2.functional.to_image(image))
        expected = torchvision_v2.functional.normalize(distorted.float() / 255, list(MEAN), list(STD))
        torch.testing.assert_close(out_image, expected, rtol=0, atol=1e-5)


def test_photometric_distortion_keeps_mmsegs_ranges_and_8_bits():
    """Each step within mmseg's range: a flat grey image moves by at most ±32 brightness, ×0.5-1.5 contrast, and
    stays on whole 8-bit levels; over many draws each step is sometimes applied and sometimes not."""
    distortion = transforms_module.PhotoMetricDistortion()
    grey = torch.full((3, 4, 4), 100, dtype=torch.uint8)
    torch.manual_seed(0)
    values = {int(distortion(grey)[0, 0, 0]) for _ in range(300)}
    assert 100 in values and min(values) >= (100 - 32) * 0.5 - 1 and max(values) <= (100 + 32) * 1.5
    assert len(values) > 50
    colour = torch.tensor([200, 50, 50], dtype=torch.uint8).view(3, 1, 1).expand(3, 4, 4).contiguous()
    outputs = [distortion(colour) for _ in range(100)]
    assert all(out.dtype == torch.uint8 for out in outputs)
    assert any(int(out[1, 0, 0]) != int(out[2, 0, 0]) for out in outputs)  # hue moved: G and B no longer equal


def test_hsv_round_trip():
    rgb = torch.randint(0, 256, (3, 8, 8)).float()
    torch.testing.assert_close(transforms_module._hsv_to_rgb(transforms_module._rgb_to_hsv(rgb)), rgb, rtol=0, atol=1e-3)


def test_crops_are_redrawn_while_one_class_dominates():
    """mmseg's cat_max_ratio 0.75: a crop where one class covers 75 % or more is drawn again, up to 10 times.
    Here 18 of 33 crop positions are such crops: drawn once, about half the crops are; redrawn, almost none
    (only when 10 draws in a row miss, 0.55^10)."""
    mask = np.zeros((64, 64), dtype=np.int64)
    mask[:, 40:] = 1
    image = Image.new("RGB", (64, 64))

    def dominated_share(ratio: float) -> float:
        transform = SegmentationTrainTransform(32, MEAN, STD, scale_range=(1.0, 1.0), base_size=64, photometric=False,
                                               hflip=False, cat_max_ratio=ratio)  # fmt: skip
        torch.manual_seed(0)
        dominated = 0
        for _ in range(200):
            _, labels = transform(image, mask)
            counts = torch.bincount(labels.flatten(), minlength=2).float()
            dominated += bool(counts.max() / counts.sum() >= 0.75)
        return dominated / 200

    assert dominated_share(0.75) <= 0.05
    assert dominated_share(1.0) >= 0.35


def test_default_base_size_is_the_crops_shorter_side():
    """Crop 32×64 and ratio 1 on a 64×128 image: base 32 scales it to exactly the crop, every quadrant kept."""
    mask = np.zeros((64, 128), dtype=np.int64)
    mask[:32, 64:], mask[32:, :64], mask[32:, 64:] = 1, 2, 3
    image = Image.fromarray((mask * 60).astype(np.uint8)).convert("RGB")
    transform = SegmentationTrainTransform((32, 64), MEAN, STD, scale_range=(1.0, 1.0), photometric=False, hflip=False)
    _, out_mask = transform(image, mask)
    expected = np.zeros((32, 64), dtype=np.int64)
    expected[:16, 32:], expected[16:, :32], expected[16:, 32:] = 1, 2, 3
    np.testing.assert_array_equal(out_mask.numpy(), expected)


def test_segmentation_train_transform_nearest_only_and_sizes():
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    mask = rng.choice([0, 3, 10], size=(37, 53))  # fine-grained: any interpolation would mix values
    image = Image.fromarray(rng.integers(0, 255, (37, 53, 3), dtype=np.uint8))
    transform = SegmentationTrainTransform((32, 48), MEAN, STD, scale_range=(0.7, 1.9))
    for _ in range(10):
        out_image, out_mask = transform(image, mask)
        assert out_image.shape == (3, 32, 48) and out_image.dtype == torch.float32
        assert out_mask.shape == (32, 48) and out_mask.dtype == torch.int64
        assert type(out_mask) is torch.Tensor
        assert set(out_mask.unique().tolist()) <= {0, 3, 10, 255}


def test_segmentation_train_transform_pads_with_ignore():
    mask = np.ones((20, 30), dtype=np.int64)
    image = Image.new("RGB", (30, 20), (255, 255, 255))
    transform = SegmentationTrainTransform(
        40, MEAN, STD, scale_range=(1.0, 1.0), base_size=20, photometric=False
    )
    out_image, out_mask = transform(image, mask)
    assert out_image.shape == (3, 40, 40) and out_mask.shape == (40, 40)
    assert (out_mask[:20, :30] == 1).all()
    assert (out_mask[20:] == 255).all() and (out_mask[:, 30:] == 255).all()
    assert (out_image[:, 20:] == 0).all() and (out_image[:, :20, :30] > 1).all()


def test_segmentation_train_transform_flips_image_and_mask_together():
    mask = np.zeros((16, 24), dtype=np.int64)
    mask[:, :5] = 1
    image = Image.fromarray((mask * 255).astype(np.uint8)).convert("RGB")
    transform = SegmentationTrainTransform(
        (16, 24), MEAN, STD, scale_range=(1.0, 1.0), base_size=16, photometric=False
    )
    torch.manual_seed(1)
    seen = set()
    for _ in range(12):
        out_image, out_mask = transform(image, mask)
        picture = denormalize(out_image, MEAN, STD)[..., 0]
        np.testing.assert_array_equal(picture > 127, out_mask.numpy() == 1)
        seen.add(bool(out_mask[0, 0] == 1))
    assert seen == {True, False}


def test_segmentation_eval_transform_multiple_of_16_keeps_mask():
    image, mask = Image.new("RGB", (70, 50)), np.zeros((50, 70), dtype=np.int64)
    out_image, out_mask = SegmentationEvalTransform(None, MEAN, STD)(image, mask)
    assert out_image.shape == (3, 48, 64) and out_mask.shape == (50, 70)
    out_image, _ = SegmentationEvalTransform(32, MEAN, STD)(image, mask)
    assert out_image.shape == (3, 32, 48)
    assert SegmentationEvalTransform(32, MEAN, STD)(image)[1] is None


def test_denormalize_round_trip():
    pixels = np.random.default_rng(0).integers(0, 255, (12, 20, 3), dtype=np.uint8)
    tensor = classification_eval_transform(12, MEAN, STD, crop_ratio=1.0)(Image.fromarray(pixels[:, 4:16]))
    np.testing.assert_array_equal(denormalize(tensor, MEAN, STD), pixels[:, 4:16])


def noise_image(height: int, width: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def test_downscaling_is_antialiased_like_pil():
    """Shrinking without antialiasing samples a few source pixels and aliases fine texture; every resize here
    must average like PIL's reducing filter does."""
    image = noise_image(256, 256)
    expected = np.asarray(image.resize((64, 64), Image.Resampling.BILINEAR), dtype=np.float64)

    def close_to_pil(tensor: torch.Tensor) -> None:
        ours = denormalize(tensor, MEAN, STD).astype(np.float64)
        assert np.abs(ours - expected).mean() < 2.0, np.abs(ours - expected).mean()

    close_to_pil(classification_eval_transform(64, MEAN, STD, crop_ratio=1.0)(image))
    close_to_pil(SegmentationEvalTransform(64, MEAN, STD)(image)[0])
    train = SegmentationTrainTransform(64, MEAN, STD, scale_range=(1.0, 1.0), photometric=False, hflip=False)
    close_to_pil(train(image, np.zeros((256, 256), dtype=np.uint8))[0])


def test_random_resized_crop_is_antialiased():
    """Same seed, same crops: ours varies as little as an antialiased crop, far less than an aliased one."""
    image = noise_image(256, 256)
    tensor = torchvision_v2.functional.to_image(image)

    def spread(antialias: bool | None) -> float:
        torch.manual_seed(0)
        if antialias is None:
            crops = [classification_train_transform(32, MEAN, STD)(image) for _ in range(8)]
        else:
            crop = torchvision_v2.RandomResizedCrop(32, antialias=antialias)
            crops = [crop(tensor).float() for _ in range(8)]
        return float(torch.stack([c.std() for c in crops]).mean())

    assert spread(None) * 0.226 * 255 < 0.7 * spread(False)  # normalised std back to pixel levels


def test_train_resize_scales_the_base_size_by_the_ratio():
    """ratio 2 on base 16: a 16x16 image becomes 32x32 (valid labels) inside a 64x64 crop (the rest ignored)."""
    transform = SegmentationTrainTransform(64, MEAN, STD, scale_range=(2.0, 2.0), base_size=16, photometric=False,
                                           hflip=False)  # fmt: skip
    _, labels = transform(Image.new("RGB", (16, 16)), np.zeros((16, 16), dtype=np.uint8))
    assert int((labels == 0).sum()) == 32 * 32 and labels.dtype == torch.int64


@pytest.mark.parametrize("height, width", [(4, 400), (400, 4)])
def test_train_resize_keeps_a_one_pixel_side(height, width):
    """Base 1 on a 4x400 strip: the short side becomes exactly one pixel, never rounded up to two."""
    transform = SegmentationTrainTransform((8, 128), MEAN, STD, scale_range=(1.0, 1.0), base_size=1, photometric=False,
                                           hflip=False) if height < width else SegmentationTrainTransform(
        (128, 8), MEAN, STD, scale_range=(1.0, 1.0), base_size=1, photometric=False, hflip=False)  # fmt: skip
    _, labels = transform(Image.new("RGB", (width, height)), np.zeros((height, width), dtype=np.uint8))
    assert int((labels == 0).sum()) == 100


def test_scale_ratios_are_drawn_across_the_whole_range():
    torch.manual_seed(0)
    draws = [transforms_module._uniform(0.5, 2.0) for _ in range(400)]
    assert 0.5 <= min(draws) < 0.6 and 1.9 < max(draws) <= 2.0
    assert 1.1 < sum(draws) / len(draws) < 1.4  # uniform: mean 1.25


def test_photometric_distortion_is_on_by_default():
    assert isinstance(SegmentationTrainTransform(32, MEAN, STD).distortion, transforms_module.PhotoMetricDistortion)
    assert SegmentationTrainTransform(32, MEAN, STD, photometric=False).distortion is None


def test_eval_masks_come_back_as_int64_whatever_their_stored_type():
    mask = np.full((20, 30), 7, dtype=np.uint8)
    _, labels = SegmentationEvalTransform(None, MEAN, STD)(Image.new("RGB", (30, 20)), mask)
    assert labels.dtype == torch.int64 and int(labels[0, 0]) == 7


def test_denormalize_clamps_out_of_range_values_to_uint8():
    mean, std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
    tensor = torch.tensor([-4.0, -2.0, 0.0, 2.0, 6.0]).view(1, 1, 5).expand(3, 1, 5)  # pixels -0.5, 0, .5, 1, 2
    out = denormalize(tensor, mean, std)
    assert out.dtype == np.uint8 and out[0, :, 0].tolist() == [0, 0, 128, 255, 255]


# ----------------------------------------------------------------------------------------- datasets


@pytest.fixture(scope="module")
def imagenette(tmp_path_factory) -> Path:
    return make_classification_folder(
        tmp_path_factory.mktemp("cls"), train_per_class=3, val_per_class=2, size=16
    )


def test_image_folder_dataset_classes_and_names(imagenette):
    dataset = ImageFolderDataset(
        imagenette, "val", classification_eval_transform(16, MEAN, STD), IMAGENETTE_CLASSES
    )
    assert len(dataset) == 20
    assert dataset.classes == sorted(IMAGENETTE_CLASSES)
    assert dataset.class_names[0] == "tench" and dataset.class_names[-1] == "parachute"
    image, label = dataset[5]
    assert image.shape == (3, 16, 16) and label == 2
    assert dataset.samples[5][0].parent.name == dataset.classes[2]
    plain = ImageFolderDataset(imagenette, "train", classification_eval_transform(16, MEAN, STD))
    assert plain.class_names == plain.classes and len(plain) == 30


def test_image_folder_dataset_errors(tmp_path):
    make_classification_folder(tmp_path, num_classes=2, train_per_class=1, val_per_class=1, size=8)
    with pytest.raises(UserError, match="test"):
        ImageFolderDataset(tmp_path, "test", lambda image: image)
    (tmp_path / "train" / "zebra").mkdir()
    with pytest.raises(UserError, match="zebra"):
        ImageFolderDataset(tmp_path, "train", lambda image: image)
    with pytest.warns(UserWarning, match="zebra"):
        dataset = ImageFolderDataset(tmp_path, "train", lambda image: image, on_bad_sample="warn")
    assert dataset.classes == ["class_00", "class_01", "zebra"] and len(dataset) == 2
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no class"):
        ImageFolderDataset(tmp_path, "empty", lambda image: image)


def test_unreadable_samples_are_replaced_under_warn_and_a_run_of_them_stops(tmp_path):
    make_classification_folder(tmp_path, num_classes=1, train_per_class=12, val_per_class=1, size=8)
    paths = sorted((tmp_path / "train" / "class_00").iterdir())
    paths[1].write_bytes(b"not an image")
    with pytest.raises(UserError, match=paths[1].name):
        ImageFolderDataset(tmp_path, "train", lambda image: image)[1]
    dataset = ImageFolderDataset(tmp_path, "train", lambda image: image, on_bad_sample="warn")
    with pytest.warns(UserWarning, match=f"{paths[1].name}.*skipped"):
        image, label = dataset[1]
    assert image.size == load_image(paths[2]).size and label == 0  # the next readable sample
    for path in paths[:11]:
        path.write_bytes(b"")
    with pytest.warns(UserWarning), pytest.raises(UserError, match="10 unreadable samples in a row"):
        dataset[0]
    assert dataset[11][1] == 0  # the one good file is still read


@pytest.fixture
def segmentation_root(tmp_path) -> Path:
    return make_segmentation_folder(tmp_path, train=4, val=2, size=(16, 24))


def test_segmentation_folder_dataset_pairs_and_transforms(segmentation_root):
    dataset = SegmentationFolderDataset(
        SegmentationLayout(segmentation_root), "train", SegmentationEvalTransform(None, MEAN, STD)
    )
    assert len(dataset) == 4
    image, mask = dataset[0]
    assert image.shape == (3, 16, 32) and mask.shape == (16, 24) and mask.dtype == torch.int64
    assert set(mask.unique().tolist()) <= {0, 1, 2}


def test_segmentation_folder_dataset_nested_folders_and_array_loader(segmentation_root):
    for kind in ("images", "annotations"):
        nested = segmentation_root / kind / "train" / "patient_1"
        nested.mkdir()
        (segmentation_root / kind / "train" / "img_00000000.png").rename(nested / "img_00000000.png")
    dataset = SegmentationFolderDataset(
        SegmentationLayout(segmentation_root), "train", identity_pair,
        image_loader=lambda path: np.asarray(load_image(path)),
    )
    assert len(dataset) == 4 and dataset.samples[-1][1].parent.name == "patient_1"
    image, mask = dataset[3]
    assert image.shape == (16, 24, 3) and mask.shape == (16, 24)


def test_segmentation_folder_dataset_missing_files(segmentation_root):
    (segmentation_root / "annotations" / "train" / "img_00000001.png").unlink()
    (segmentation_root / "images" / "train" / "img_00000002.png").unlink()
    with pytest.raises(UserError) as error:
        SegmentationFolderDataset(SegmentationLayout(segmentation_root), "train", identity_pair)
    message = str(error.value)
    assert "img_00000001.png" in message and "img_00000002.png" in message and "\n" not in message
    with pytest.warns(UserWarning, match="skipping"):
        dataset = SegmentationFolderDataset(SegmentationLayout(segmentation_root), "train", identity_pair,
                                            on_bad_sample="warn")
    assert [image.name for image, _ in dataset.samples] == ["img_00000000.png", "img_00000003.png"]


def test_segmentation_folder_dataset_size_mismatch(segmentation_root):
    Image.new("L", (5, 5)).save(segmentation_root / "annotations" / "val" / "img_00000001.png")
    dataset = SegmentationFolderDataset(SegmentationLayout(segmentation_root), "val", identity_pair)
    dataset[0]
    with pytest.raises(UserError, match="img_00000001.png.*images/val/img_00000001.png"):
        dataset[1]


def test_label_map_reduce_zero_label_and_range_check(tmp_path):
    save(Image.new("RGB", (4, 1)), tmp_path / "images" / "train" / "a.jpg")
    save(
        Image.fromarray(np.array([[0, 255, 0, 255]], dtype=np.uint8)),
        tmp_path / "masks" / "train" / "a_seg.png",
    )
    def dataset(labels: MaskLabels) -> SegmentationFolderDataset:
        layout = SegmentationLayout(tmp_path, annotations_dir="masks", mask_suffix="_seg.png", labels=labels)
        return SegmentationFolderDataset(layout, "train", identity_pair)

    binary = dataset(MaskLabels(label_map={255: 1}))
    assert binary[0][1].tolist() == [[0, 1, 0, 1]]
    reduced = dataset(MaskLabels(reduce_zero_label=True))
    raw = np.array([[0, 1, 2, 255]])
    assert reduced.labels.prepare(raw, Path("x.png")).tolist() == [[255, 0, 1, 255]]
    checked = dataset(MaskLabels(num_classes=2, ignore_index=254))
    with pytest.raises(UserError, match=r"a_seg\.png.*\[255\]"):
        checked[0]


def test_masks_beside_images_in_one_folder(tmp_path):
    for name in ("a", "b"):
        save(Image.new("RGB", (3, 2)), tmp_path / "data" / "train" / f"{name}.jpg")
        save(Image.new("L", (3, 2), 1), tmp_path / "data" / "train" / f"{name}_mask.png")
    layout = SegmentationLayout(tmp_path, images_dir="data", annotations_dir="data", mask_suffix="_mask.png")
    dataset = SegmentationFolderDataset(layout, "train", identity_pair)
    assert [(image.name, mask.name) for image, mask in dataset.samples] == [
        ("a.jpg", "a_mask.png"),
        ("b.jpg", "b_mask.png"),
    ]


def test_ade20k_layout_reduce_zero_label_recovers_classes(tmp_path):
    folder = make_segmentation_folder(tmp_path / "f", train=3, val=2, size=(16, 16), seed=4)
    ade = make_segmentation_folder(tmp_path / "a", layout="ade20k", train=3, val=2, size=(16, 16), seed=4)
    assert ade == tmp_path / "a" / "ADEChallengeData2016"
    assert (ade / "images" / "validation" / "ADE_val_00000001.jpg").is_file()
    assert (ade / "annotations" / "training" / "ADE_train_00000003.png").is_file()
    plain = SegmentationFolderDataset(SegmentationLayout(folder), "val", identity_pair)
    for root in (ade, tmp_path / "a"):
        dataset = ade20k_dataset(root, "validation", identity_pair)
        assert len(dataset) == 2
        for index in range(2):
            assert torch.equal(dataset[index][1], plain[index][1])
    assert ade20k_dataset(tmp_path / "a", "val", identity_pair).samples == dataset.samples  # the usual alias
    with pytest.raises(UserError, match="ADE20K split 'test' does not exist; use 'training' or 'validation'"):
        ade20k_dataset(tmp_path / "a", "test", identity_pair)


def test_ade20k_metadata_and_default_palette():
    assert len(ADE20K_CLASSES) == 150 and len(set(ADE20K_CLASSES)) == 150
    assert ADE20K_CLASSES[0] == "wall" and ADE20K_CLASSES[12] == "person" and ADE20K_CLASSES[-1] == "flag"
    assert ADE20K_PALETTE.shape == (150, 3) and ADE20K_PALETTE.dtype == np.uint8
    assert ADE20K_PALETTE[0].tolist() == [120, 120, 120] and ADE20K_PALETTE[-1].tolist() == [92, 0, 255]
    palette = default_palette(300)
    assert palette.shape == (300, 3) and palette[0].tolist() == [0, 0, 0]
    assert len({tuple(colour) for colour in palette.tolist()}) == 300


# ---------------------------------------------------------------------------------------- synthetic


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_synthetic_generators_are_deterministic(tmp_path):
    first = tree_bytes(make_segmentation_folder(tmp_path / "1", train=2, val=1, size=(16, 16)))
    again = tree_bytes(make_segmentation_folder(tmp_path / "2", train=2, val=1, size=(16, 16)))
    other = tree_bytes(make_segmentation_folder(tmp_path / "3", train=2, val=1, size=(16, 16), seed=1))
    assert first == again and first != other
    assert sorted(first) == [
        "annotations/train/img_00000000.png",
        "annotations/train/img_00000001.png",
        "annotations/val/img_00000000.png",
        "images/train/img_00000000.png",
        "images/train/img_00000001.png",
        "images/val/img_00000000.png",
    ]
    kwargs = {"num_classes": 2, "train_per_class": 1, "val_per_class": 1, "size": 8}
    cls_a = tree_bytes(make_classification_folder(tmp_path / "c1", **kwargs))
    cls_b = tree_bytes(make_classification_folder(tmp_path / "c2", **kwargs))
    assert cls_a == cls_b and "val/class_01/class_01_00000.JPEG" in cls_a


def test_synthetic_classes_separable_by_colour_statistics(imagenette):
    def features(split):
        dataset = ImageFolderDataset(imagenette, split, lambda image: np.asarray(image, dtype=np.float64))
        return np.stack([np.concatenate([x.mean((0, 1)), x.std((0, 1))]) for x, _ in dataset]), np.array(
            [label for _, label in dataset.samples]
        )

    train_x, train_y = features("train")
    val_x, val_y = features("val")
    centroids = np.stack([train_x[train_y == c].mean(0) for c in range(10)])
    predicted = np.argmin(((val_x[:, None] - centroids[None]) ** 2).sum(-1), axis=1)
    assert (predicted == val_y).mean() >= 0.9


def test_synthetic_segmentation_masks_hold_shapes(tmp_path):
    root = make_segmentation_folder(tmp_path, num_classes=4, train=6, val=0, size=(32, 48))
    masks = [load_mask(p) for p in find_images(root / "annotations" / "train")]
    assert all(m.shape == (32, 48) for m in masks)
    values = set(np.unique(np.stack(masks)).tolist())
    assert 0 in values and values <= {0, 1, 2, 3} and len(values) >= 3
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load_image(root / "images" / "train" / "img_00000000.png").size == (48, 32)


# --- scripted random draws: every decision of the crop and the colour distortion checked exactly ----------


class Script:
    """Stands in for `_randint` / `_uniform`: returns the scripted values and checks each call's arguments."""

    def __init__(self, calls: list[tuple[tuple, float]]) -> None:
        self.calls = list(calls)

    def __call__(self, *args):
        assert self.calls, f"an unscripted draw {args}"
        expected, value = self.calls.pop(0)
        assert args == expected, (args, expected)
        return value


def crop_labels() -> torch.Tensor:
    """10 x 10: class 0, class 1 in the bottom-right 4 x 4 block, rows 0-1 ignored (255)."""
    labels = torch.zeros(10, 10, dtype=torch.long)
    labels[6:, 6:] = 1
    labels[:2] = 255
    return labels


@pytest.mark.parametrize(
    ("ratio", "draws", "expected"),
    [
        (0.75, [0, 0, 5, 5], (5, 5)),  # (0, 0): class 0 only (ignore left out) → drawn again; (5, 5): 9 of 16 class 1
        (0.75, [0, 0] * 10, (0, 0)),  # never accepted: exactly 10 draws, the last kept
        (1.0, [3, 4], (3, 4)),  # no constraint: one draw, whatever it holds
        (0.95, [3, 3], (3, 3)),  # (3, 3): 15 class 0 + 1 class 1 → 15/16 < 0.95 accepted
    ],
)
def test_crop_box_draws_as_mmseg(monkeypatch, ratio, draws, expected):
    script = Script([((6,), value) for value in draws])
    monkeypatch.setattr(transforms_module, "_randint", script)
    assert transforms_module._crop_box(crop_labels(), (4, 4), ratio, 255) == expected
    assert not script.calls  # every scripted draw used, no more


def hsv_oracle(rgb: tuple[float, float, float], saturation: float | None, hue_shift: float | None) -> tuple[float, ...]:
    """Python's colorsys (an independent HSV) on 0-255 values: saturation scaled and clipped, hue shifted."""
    import colorsys

    h, s, v = colorsys.rgb_to_hsv(*(c / 255 for c in rgb))
    if saturation is not None:
        s = min(max(s * saturation, 0.0), 1.0)
    if hue_shift is not None:
        h = (h + hue_shift) % 1
    return tuple(c * 255 for c in colorsys.hsv_to_rgb(h, s, v))


PIXELS = [(0, 0, 0), (1, 0, 0), (10, 9, 9), (128, 128, 128), (255, 255, 255), (250, 20, 20), (20, 250, 20),
          (20, 20, 250), (200, 200, 20), (20, 200, 200), (200, 20, 200), (255, 128, 0), (3, 1, 2), (90, 60, 30)]  # fmt: skip


@pytest.mark.parametrize("contrast_first", [True, False])
def test_photometric_distortion_step_by_step_against_colorsys(monkeypatch, contrast_first):
    """Every step applied, each draw scripted: brightness +20, contrast ×1.3 (first or last), saturation ×1.4,
    hue +12/180; the result is the oracle's, floored and clipped to 8 bits after each step as mmseg does."""
    image = torch.tensor(PIXELS, dtype=torch.uint8).T.reshape(3, 1, len(PIXELS))
    randints = [((1,), 1), ((1,), int(contrast_first))] + ([((1,), 1)] if contrast_first else [])
    randints += [((1,), 1), ((1,), 1), ((36,), 30)] + ([] if contrast_first else [((1,), 1)])
    uniforms = [((-32, 32), 20.0), ((0.5, 1.5), 1.3), ((0.5, 1.5), 1.4)] if contrast_first else \
        [((-32, 32), 20.0), ((0.5, 1.5), 1.4), ((0.5, 1.5), 1.3)]  # fmt: skip
    monkeypatch.setattr(transforms_module, "_randint", Script(randints))
    monkeypatch.setattr(transforms_module, "_uniform", Script(uniforms))
    out = transforms_module.PhotoMetricDistortion()(image)

    def eight_bits(values):
        return [float(np.floor(min(max(v, 0.0), 255.0))) for v in values]

    exact = 0
    for index, pixel in enumerate(PIXELS):
        value = eight_bits([c + 20.0 for c in pixel])
        if contrast_first:
            value = eight_bits([c * 1.3 for c in value])
        value = eight_bits(hsv_oracle(value, 1.4, None))
        value = eight_bits(hsv_oracle(value, None, 12 / 180))
        if not contrast_first:
            value = eight_bits([c * 1.3 for c in value])
        got = out[:, 0, index].tolist()
        # float32 here, float64 in colorsys: a value on a floor boundary may land one level off, and carry on
        assert all(abs(g - e) <= 2 for g, e in zip(got, value)), (pixel, got, value)
        exact += sum(g == e for g, e in zip(got, value))
    assert exact >= 0.75 * 3 * len(PIXELS) and out.dtype == torch.uint8  # measured: 35 of 42


def test_photometric_distortion_skips_every_step_when_no_coin_says_so(monkeypatch):
    image = torch.tensor(PIXELS, dtype=torch.uint8).T.reshape(3, 1, len(PIXELS))
    monkeypatch.setattr(transforms_module, "_randint", Script([((1,), 0)] * 5))
    monkeypatch.setattr(transforms_module, "_uniform", Script([]))
    assert torch.equal(transforms_module.PhotoMetricDistortion()(image), image)


def test_segmentation_eval_transform_takes_arrays_as_it_takes_images():
    """Volume slices arrive as H x W x 3 uint8 arrays: the PIL image's tensor, up to one grey level (PIL's and
    torch's antialiased bilinear filters differ by that much)."""
    pixels = np.random.default_rng(0).integers(0, 256, (40, 56, 3), dtype=np.uint8)
    transform = SegmentationEvalTransform(32, MEAN, STD, multiple_of=16)
    from_array, _ = transform(pixels)
    from_image, _ = transform(Image.fromarray(pixels))
    assert from_array.shape == (3, 32, 48)
    torch.testing.assert_close(from_array, from_image, rtol=0, atol=1.01 / 255 / min(STD))
    torch.testing.assert_close(transform.image_only(pixels), from_array, rtol=0, atol=0)
