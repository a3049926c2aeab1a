"""3D metrics against a brute-force reference (float64, surfaces found voxel by voxel, every pair of surface
voxels measured) and against MONAI's functions, on crafted masks with anisotropic spacing; empty masks."""

from __future__ import annotations

import math

import numpy as np
import pytest

from dinov3ds.metrics.volumes import (
    binary_metrics,
    case_metrics,
    format_summary,
    summarise,
    write_reports,
)

SPACING = (0.8, 1.3, 2.5)


def brute_surface(mask: np.ndarray) -> np.ndarray:
    """Voxels of the mask with one of their 6 face neighbours outside it (outside the volume counts as out)."""
    padded = np.pad(mask, 1)
    out = np.zeros_like(mask)
    for index in zip(*np.nonzero(mask)):
        centre = tuple(i + 1 for i in index)
        for axis in range(3):
            for step in (-1, 1):
                neighbour = list(centre)
                neighbour[axis] += step
                if not padded[tuple(neighbour)]:
                    out[index] = True
    return out


def brute_metrics(prediction: np.ndarray, reference: np.ndarray, tolerance: float) -> dict[str, float]:
    sp, sr = brute_surface(prediction), brute_surface(reference)
    points_p = np.argwhere(sp) * np.array(SPACING)
    points_r = np.argwhere(sr) * np.array(SPACING)
    pairwise = np.sqrt(((points_p[:, None, :] - points_r[None, :, :]) ** 2).sum(-1))
    p_to_r, r_to_p = pairwise.min(1), pairwise.min(0)
    intersection, total = (prediction & reference).sum(), prediction.sum() + reference.sum()
    return {
        "dice": 2 * intersection / total,
        "iou": intersection / (total - intersection),
        "hd95": max(np.percentile(p_to_r, 95), np.percentile(r_to_p, 95)),
        "nsd": ((p_to_r <= tolerance).sum() + (r_to_p <= tolerance).sum()) / (len(p_to_r) + len(r_to_p)),
    }


def crafted() -> list[tuple[str, np.ndarray, np.ndarray]]:
    shape = (18, 16, 10)
    z, y, x = np.indices(shape)
    ball = (((z - 8) * 0.8) ** 2 + ((y - 7) * 1.3) ** 2 + ((x - 4) * 2.5) ** 2) <= 36
    shifted = np.roll(ball, (2, -1, 1), axis=(0, 1, 2))
    box = np.zeros(shape, bool)
    box[3:12, 2:9, 1:7] = True
    rng = np.random.default_rng(0)
    noisy = ball ^ (rng.random(shape) < 0.03)
    border = np.zeros(shape, bool)
    border[0:5, 0:4, 0:3] = True  # touches the volume's first faces
    islands = ball.copy()
    islands[0, 0, 0] = islands[17, 15, 9] = True  # lone voxels past a gap: the crop must keep first and last slabs
    return [("ball-vs-shifted", ball, shifted), ("ball-vs-box", ball, box), ("ball-vs-noisy", noisy, ball),
            ("border-vs-box", border, box), ("islands-vs-ball", islands, ball), ("identical", box, box)]  # fmt: skip


@pytest.mark.parametrize(("name", "prediction", "reference"), crafted(), ids=[c[0] for c in crafted()])
@pytest.mark.parametrize("tolerance", [1.0, 2.7])  # not on a distance that occurs (ties round either way)
def test_metrics_equal_the_brute_force_definitions(name, prediction, reference, tolerance) -> None:
    ours = binary_metrics(prediction, reference, SPACING, tolerance)
    expected = brute_metrics(prediction, reference, tolerance)
    for key, value in expected.items():
        assert ours[key] == pytest.approx(value, abs=1e-9), key


@pytest.mark.parametrize(("name", "prediction", "reference"), crafted(), ids=[c[0] for c in crafted()])
def test_hd95_and_nsd_agree_with_monai(name, prediction, reference) -> None:
    torch = pytest.importorskip("torch")
    monai_metrics = pytest.importorskip("monai.metrics", reason="MONAI is in the dev extra")
    as_batch = [torch.from_numpy(np.stack([~m, m])[None].astype(np.float32)) for m in (prediction, reference)]
    hd95 = monai_metrics.compute_hausdorff_distance(*as_batch, percentile=95, spacing=SPACING).item()
    nsd = monai_metrics.compute_surface_dice(*as_batch, class_thresholds=[1.0], spacing=SPACING).item()
    ours = binary_metrics(prediction, reference, SPACING, 1.0)
    assert ours["hd95"] == pytest.approx(hd95, abs=1e-5)  # MONAI measures in float32
    assert ours["nsd"] == pytest.approx(nsd, abs=1e-6)


def test_absent_classes_follow_monai_for_hd95_and_nsd_and_nnunet_for_dice() -> None:
    """A class missing from the prediction printed HD95 = the volume's diagonal (357 mm on the 1 mm MNI head);
    now HD95 and NSD are what MONAI returns, checked against MONAI itself, and Dice / IoU what nnU-Net's
    evaluation returns (NaN only when there is nothing to compare)."""
    torch = pytest.importorskip("torch")
    monai_metrics = pytest.importorskip("monai.metrics", reason="MONAI is in the dev extra")
    empty = np.zeros((6, 7, 8), bool)
    full = empty.copy()
    full[2:4, 2:4, 2:4] = True
    both_empty = binary_metrics(empty, empty, SPACING)
    assert all(math.isnan(value) for value in both_empty.values())
    for prediction, reference in ((empty, full), (full, empty)):
        ours = binary_metrics(prediction, reference, SPACING)
        assert ours["dice"] == ours["iou"] == ours["nsd"] == 0.0 and math.isnan(ours["hd95"])
    for prediction, reference in ((empty, empty), (empty, full), (full, empty)):
        as_batch = [torch.from_numpy(np.stack([~m, m])[None].astype(np.float32)) for m in (prediction, reference)]
        with pytest.warns(UserWarning):  # MONAI warns about the empty mask
            hd95 = monai_metrics.compute_hausdorff_distance(*as_batch, percentile=95, spacing=SPACING).item()
            nsd = monai_metrics.compute_surface_dice(*as_batch, class_thresholds=[1.0], spacing=SPACING).item()
        ours = binary_metrics(prediction, reference, SPACING)
        assert math.isnan(ours["hd95"]) and math.isnan(hd95)
        assert ours["nsd"] == pytest.approx(nsd, nan_ok=True)


def test_undefined_values_are_left_out_of_the_means_and_printed_as_n_a(tmp_path) -> None:
    import json

    reference = np.zeros((8, 8, 8), np.uint8)
    reference[1:5, 1:5, 1:5] = 1
    missed = np.zeros_like(reference)
    names = ["background", "liver", "tumour"]  # no tumour anywhere: nothing to score
    cases = {"found": case_metrics(reference, reference, SPACING, names), "missed": case_metrics(missed, reference, SPACING, names)}
    summary = write_reports(cases, tmp_path)
    liver = summary["per_class"]["liver"]
    assert liver["dice"] == 0.5 and liver["nsd"] == 0.5 and liver["hd95"] == 0.0  # HD95 over the one found case
    assert summary["scored"]["liver"] == {"dice": 2, "iou": 2, "hd95": 1, "nsd": 2}
    assert summary["per_class"]["tumour"] == dict.fromkeys(("dice", "iou", "hd95", "nsd"))
    assert json.loads((tmp_path / "metrics.json").read_text())["per_class"]["tumour"]["hd95"] is None
    assert summary["mean"]["dice"] == 0.5  # the mean over the classes that have one
    assert format_summary(summary).splitlines()[2] == "tumour               n/a     n/a       n/a     n/a"
    assert "357" not in format_summary(summary) and "nan" in (tmp_path / "per_case.csv").read_text()


def test_per_class_per_case_and_their_means(tmp_path) -> None:
    reference = np.zeros((8, 8, 8), np.uint8)
    reference[1:5, 1:5, 1:5] = 1
    reference[5:7, 5:7, 5:7] = 2
    perfect, missed = reference.copy(), reference.copy()
    missed[missed == 2] = 0  # class 2 not found
    names = ["background", "liver", "tumour"]
    cases = {"a": case_metrics(perfect, reference, SPACING, names), "b": case_metrics(missed, reference, SPACING, names)}
    assert cases["a"]["tumour"]["dice"] == 1.0 and cases["b"]["tumour"]["dice"] == 0.0
    assert set(cases["a"]) == {"liver", "tumour"}  # background is not scored
    summary = write_reports(cases, tmp_path, prefix="eval_")
    assert summary["per_class"]["tumour"]["dice"] == 0.5 and summary["per_class"]["liver"]["dice"] == 1.0
    assert summary["mean"]["dice"] == 0.75 and summary["cases"] == 2
    rows = (tmp_path / "eval_per_case.csv").read_text().splitlines()
    assert rows[0] == "case,class,dice,iou,hd95,nsd" and len(rows) == 5
    assert summarise({})["cases"] == 0


def test_report_files_and_summary_text(tmp_path) -> None:
    """metrics.json (2-space JSON with the tolerance and the definitions), per_case.csv, no temporary files left,
    and the printed table, character for character."""
    import json

    cases = {"c1": {"liver": {"dice": 1.0, "iou": 1.0, "hd95": 0.0, "nsd": 1.0}},
             "c2": {"liver": {"dice": 0.5, "iou": 0.25, "hd95": 3.0, "nsd": 0.5}}}  # fmt: skip
    summary = write_reports(cases, tmp_path)
    text = (tmp_path / "metrics.json").read_text()
    assert text.startswith('{\n  "cases": 2,') and json.loads(text) == summary
    assert summary["tolerance_mm"] == 1.0 and "HD95 and NSD" in summary["definitions"] and "(MONAI)" in summary["definitions"]
    assert (tmp_path / "per_case.csv").read_text().splitlines() == [
        "case,class,dice,iou,hd95,nsd", "c1,liver,1.000000,1.000000,0.000000,1.000000",
        "c2,liver,0.500000,0.250000,3.000000,0.500000"]  # fmt: skip
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json", "per_case.csv"]
    assert format_summary(summary).splitlines() == [
        "class               Dice     IoU   HD95 mm     NSD   (2 cases)",
        "liver             0.7500  0.6250     1.500  0.7500",
        "mean              0.7500  0.6250     1.500  0.7500",
    ]
    assert format_summary(summarise({})).splitlines() == ["class               Dice     IoU   HD95 mm     NSD   (0 cases)"]
    assert write_reports(cases, tmp_path, tolerance_mm=2.5)["tolerance_mm"] == 2.5


def test_label_masks_and_tolerances_reach_every_metric() -> None:
    """0/1 uint8 masks score as booleans; the default tolerance is 1 mm; case_metrics passes its own on."""
    _, ball, shifted = crafted()[0]
    as_bool = binary_metrics(ball, shifted, SPACING)
    assert binary_metrics(ball.astype(np.uint8), shifted.astype(np.uint8), SPACING) == as_bool
    assert as_bool == binary_metrics(ball, shifted, SPACING, tolerance_mm=1.0)
    labels_p, labels_r = ball.astype(np.uint8), shifted.astype(np.uint8)
    wide = case_metrics(labels_p, labels_r, SPACING, ["background", "ball"], tolerance_mm=2.7)["ball"]
    assert wide == binary_metrics(ball, shifted, SPACING, tolerance_mm=2.7) and wide["nsd"] > as_bool["nsd"]
