"""Label colouring, overlays, PCA maps, plots and label PNGs."""

import numpy as np
import pytest
import torch
from PIL import Image

from dinov3ds.errors import UserError
from dinov3ds.viz import (
    colorize,
    default_palette,
    overlay,
    pca_image,
    plot_confusion_matrix,
    plot_curves,
    prediction_grid,
    save_color_png,
    save_label_png,
    save_pca_image,
)

PALETTE = np.array([[0, 0, 0], [255, 0, 0], [0, 255, 0], [0, 0, 255]], dtype=np.uint8)


def assert_real_picture(path, min_size=(100, 100)) -> np.ndarray:
    picture = np.asarray(Image.open(path).convert("RGB"))
    assert picture.shape[0] >= min_size[0] and picture.shape[1] >= min_size[1]
    assert len(np.unique(picture.reshape(-1, 3), axis=0)) > 2, "picture is one flat colour"
    return picture


def random_labels(shape, num_classes, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, num_classes, size=shape)


def random_image(shape, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(*shape, 3), dtype=np.uint8)


def test_colorize_maps_ids_to_palette_rows_and_ignore_to_black():
    labels = np.array([[0, 1], [3, 255]])
    colours = colorize(labels, PALETTE)
    assert colours.dtype == np.uint8 and colours.shape == (2, 2, 3)
    assert (colours[0, 1] == PALETTE[1]).all() and (colours[1, 0] == PALETTE[3]).all()
    assert (colours[1, 1] == 0).all()


def test_colorize_rejects_ids_beyond_palette():
    with pytest.raises(UserError):
        colorize(np.array([[4]]), PALETTE)


def test_default_palette_is_distinct_and_deterministic():
    palette = default_palette(300)
    assert palette.shape == (300, 3) and palette.dtype == np.uint8
    assert len(np.unique(palette[:256], axis=0)) == 256
    assert (palette == default_palette(300)).all()


def test_overlay_alpha_extremes():
    image, labels = random_image((16, 20)), random_labels((16, 20), 4)
    labels[0, 0] = 255
    assert (overlay(image, labels, PALETTE, alpha=0.0) == image).all()
    painted = overlay(Image.fromarray(image), labels, PALETTE, alpha=1.0)
    foreground = (labels != 0) & (labels != 255)
    assert (painted[foreground] == PALETTE[labels[foreground]]).all()
    assert (painted[~foreground] == image[~foreground]).all()
    with_background = overlay(image, labels, PALETTE, alpha=1.0, skip_background=False)
    assert (with_background[labels == 0] == 0).all()


@pytest.mark.parametrize("alpha", [0.3, 0.5, 0.77])
def test_overlay_blend_is_the_float_blend_within_one_grey_level(alpha):
    image, labels = random_image((32, 40)), random_labels((32, 40), 4)
    painted = (labels != 0) & (labels != 255)
    exact = image.astype(np.float64)
    exact[painted] = (1 - alpha) * exact[painted] + alpha * PALETTE[labels[painted]]
    blended = overlay(image, labels, PALETTE, alpha=alpha).astype(int)
    assert np.abs(blended - exact).max() <= 1.0 and (blended[~painted] == image[~painted]).all()


def test_overlay_rejects_mismatched_sizes():
    with pytest.raises(UserError):
        overlay(random_image((16, 20)), random_labels((8, 10), 4))


def planted_tokens(height=24, width=24, channels=32, seed=0):
    """Tokens that are a mixture of three uncorrelated spatial maps with distinct variances, plus noise."""
    generator = torch.Generator().manual_seed(seed)
    sources = torch.randn(height * width, 3, generator=generator, dtype=torch.float64)
    sources, _ = torch.linalg.qr(sources - sources.mean(0))  # zero-mean, exactly uncorrelated
    directions, _ = torch.linalg.qr(torch.randn(channels, 3, generator=generator, dtype=torch.float64))
    mixture = (sources * torch.tensor([3.0, 2.0, 1.0], dtype=torch.float64)) @ directions.T
    tokens = mixture + 0.002 * torch.randn(height * width, channels, generator=generator, dtype=torch.float64)
    return tokens.T.reshape(channels, height, width).float(), sources.T.reshape(3, height, width).numpy()


def test_pca_image_recovers_planted_components():
    tokens, sources = planted_tokens()
    picture = pca_image(tokens)
    assert picture.shape == (24, 24, 3) and picture.dtype == np.uint8
    for channel in range(3):
        assert picture[..., channel].std() > 0
        best = max(abs(np.corrcoef(picture[..., channel].ravel(), s.ravel())[0, 1]) for s in sources)
        assert best > 0.95


def test_pca_image_batch_shares_one_projection():
    tokens, _ = planted_tokens()
    batch = torch.stack([tokens, tokens])
    pictures = pca_image(batch)
    assert pictures.shape == (2, 24, 24, 3)
    assert (pictures[0] == pictures[1]).all()


def test_pca_image_foreground_threshold_blacks_out_background():
    channels, size = 16, 20
    generator = torch.Generator().manual_seed(0)
    tokens = 0.1 * torch.randn(channels, size, size, generator=generator)
    tokens[:, 6:14, 6:14] += 5 * torch.randn(channels, 1, 1, generator=generator)  # a distinct object
    picture = pca_image(tokens, foreground_threshold=0.5)
    inside = np.zeros((size, size), dtype=bool)
    inside[6:14, 6:14] = True
    assert (picture[~inside] == 0).all()
    assert picture[inside].any()


def test_save_pca_image_upscales(tmp_path):
    tokens, _ = planted_tokens()
    path = tmp_path / "pca.png"
    save_pca_image(tokens, path, upscale_to=(96, 120))
    assert Image.open(path).size == (120, 96)


SPARSE_CSV = """epoch,step,lr-AdamW,train/loss,val/loss,val/mIoU,val/top1
0,9,0.001,2.1,,,
0,19,0.001,1.7,,,
0,19,,,1.9,0.21,0.40
1,29,0.0009,1.3,,,
1,39,0.0009,1.1,,,
1,39,,,1.4,0.35,0.55
"""


def test_plot_curves_handles_sparse_rows(tmp_path):
    metrics = tmp_path / "metrics.csv"
    metrics.write_text(SPARSE_CSV)
    out = tmp_path / "curves.png"
    plot_curves(metrics, out)
    assert_real_picture(out)
    plot_curves(metrics, tmp_path / "some.png", keys=["val/mIoU", "not/logged"])
    assert_real_picture(tmp_path / "some.png")


def test_plot_curves_without_data_says_so(tmp_path):
    metrics = tmp_path / "metrics.csv"
    metrics.write_text("epoch,step,train/loss\n")
    plot_curves(metrics, tmp_path / "empty.png")
    assert_real_picture(tmp_path / "empty.png")


def test_plot_curves_missing_file(tmp_path):
    with pytest.raises(UserError):
        plot_curves(tmp_path / "nope.csv", tmp_path / "x.png")


@pytest.mark.parametrize(("classes", "named"), [(10, True), (150, False)])
def test_plot_confusion_matrix(tmp_path, classes, named):
    rng = np.random.default_rng(0)
    cm = rng.integers(0, 50, size=(classes, classes)) + np.diag(rng.integers(100, 500, size=classes))
    names = [f"class {i}" for i in range(classes)] if named else None
    out = tmp_path / "cm.png"
    plot_confusion_matrix(torch.from_numpy(cm), names, out)
    assert_real_picture(out, min_size=(300, 300))


def test_plot_confusion_matrix_rejects_wrong_names(tmp_path):
    with pytest.raises(UserError):
        plot_confusion_matrix(np.eye(3), ["a", "b"], tmp_path / "cm.png")


def test_prediction_grid_rows_and_columns(tmp_path):
    images = [random_image((32, 40), seed=i) for i in range(10)]
    predictions = [random_labels((32, 40), 4, seed=i) for i in range(10)]
    targets = [random_labels((32, 40), 4, seed=i + 10) for i in range(10)]
    prediction_grid(images, predictions, targets, PALETTE, tmp_path / "with.png", max_rows=3)
    prediction_grid(images[:2], predictions[:2], None, None, tmp_path / "without.png")
    with_targets = assert_real_picture(tmp_path / "with.png")
    without = assert_real_picture(tmp_path / "without.png")
    assert with_targets.shape[1] > without.shape[1]  # a third column
    assert with_targets.shape[0] > without.shape[0]  # three rows against two


def test_save_label_png_round_trips(tmp_path):
    small = random_labels((12, 16), 150)
    small[0, 0] = 255
    save_label_png(small, tmp_path / "small.png")
    loaded = Image.open(tmp_path / "small.png")
    assert loaded.mode == "L" and (np.asarray(loaded) == small).all()

    large = random_labels((12, 16), 1000)
    save_label_png(large, tmp_path / "large.png")
    loaded = Image.open(tmp_path / "large.png")
    assert loaded.mode.startswith("I") and (np.asarray(loaded) == large).all()


def test_save_label_png_uses_16_bit_for_many_classes(tmp_path):
    save_label_png(random_labels((4, 4), 3), tmp_path / "ids.png", num_classes=300)
    assert Image.open(tmp_path / "ids.png").mode.startswith("I")


def test_save_color_png(tmp_path):
    labels = random_labels((12, 16), 4)
    save_color_png(labels, tmp_path / "colour.png", PALETTE)
    assert (np.asarray(Image.open(tmp_path / "colour.png")) == PALETTE[labels]).all()
    image = random_image((12, 16))
    save_color_png(labels, tmp_path / "overlay.png", PALETTE, image=image, alpha=0.0)
    assert (np.asarray(Image.open(tmp_path / "overlay.png")) == image).all()
