"""Metrics against independent NumPy references (mmsegmentation's definition; argsort top-k)."""

import csv
import math

import numpy as np
import pytest
import torch

from dinov3ds.errors import UserError
from dinov3ds.metrics import (
    ClassificationMetric,
    SegmentationMetric,
    dice_and_iou,
    format_per_class_table,
    write_per_class_csv,
)

IGNORE = 255


def reference_segmentation(pairs, num_classes, ignore_index=IGNORE):
    """mmseg-style: per image, drop ignored pixels, histogram the areas, sum over the dataset, then divide."""
    total = np.zeros((4, num_classes))
    bins, value_range = num_classes, (0, num_classes)
    for pred, label in pairs:
        pred, label = np.asarray(pred).ravel(), np.asarray(label).ravel()
        mask = label != ignore_index
        pred, label = pred[mask], label[mask]
        intersect = np.histogram(pred[pred == label], bins=bins, range=value_range)[0]
        area_pred = np.histogram(pred, bins=bins, range=value_range)[0]
        area_label = np.histogram(label, bins=bins, range=value_range)[0]
        total += [intersect, area_pred + area_label - intersect, area_pred, area_label]
    intersect, union, area_pred, area_label = total
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = intersect / union
        acc = intersect / area_label
        dice = 2 * intersect / (area_pred + area_label)
        return {
            "IoU": iou,
            "Acc": acc,
            "Dice": dice,
            "mIoU": np.nanmean(iou),
            "mAcc": np.nanmean(acc),
            "mDice": np.nanmean(dice),
            "aAcc": intersect.sum() / area_label.sum(),
        }


def assert_matches_reference(result, expected):
    for key in ("mIoU", "mAcc", "mDice", "aAcc"):
        assert isinstance(result[key], float)
        assert result[key] == pytest.approx(expected[key], abs=1e-6), key
    for key in ("IoU", "Acc", "Dice"):
        np.testing.assert_allclose(result[key].numpy(), expected[key], atol=1e-6, equal_nan=True, err_msg=key)


def random_batches(seed=0):
    """6 classes: 3 is never predicted, 4 never in the labels, 5 in neither; ~15% ignored pixels."""
    rng = np.random.default_rng(seed)
    shapes = [(2, 7, 9), (1, 5, 4), (11, 13), (3, 6, 6)]
    batches = []
    for shape in shapes:
        label = rng.choice([0, 1, 2, 3], size=shape)
        label[rng.random(shape) < 0.15] = IGNORE
        pred = rng.choice([0, 1, 2, 4], size=shape)
        # make predictions better than chance so IoUs are not all similar
        agree = rng.random(shape) < 0.5
        pred[agree & (label < 3)] = label[agree & (label < 3)]
        batches.append((torch.from_numpy(pred), torch.from_numpy(label).to(torch.uint8)))
    return batches


def test_segmentation_matches_mmseg_reference():
    batches = random_batches()
    metric = SegmentationMetric(num_classes=6)
    for pred, label in batches:
        metric.update(pred, label)
    result = metric.compute()
    expected = reference_segmentation([(p.numpy(), t.numpy()) for p, t in batches], 6)
    assert_matches_reference(result, expected)
    assert math.isnan(result["IoU"][5]) and math.isnan(result["Acc"][4])
    assert result["IoU"][3] == 0 and result["IoU"][4] == 0
    assert "Dice_foreground" not in result


def test_segmentation_is_dataset_level():
    batches = random_batches(seed=1)
    per_batch = SegmentationMetric(num_classes=6)
    for pred, label in batches:
        per_batch.update(pred, label)
    one_shot = SegmentationMetric(num_classes=6)
    one_shot.update(
        torch.cat([p.reshape(-1) for p, _ in batches]), torch.cat([t.reshape(-1) for _, t in batches])
    )
    a, b = per_batch.compute(), one_shot.compute()
    for key in ("mIoU", "mAcc", "aAcc", "mDice"):
        assert a[key] == pytest.approx(b[key], abs=1e-12)


def test_segmentation_is_not_a_mean_of_batch_scores():
    # batch 1: one perfect pixel of class 0; batch 2: three class-1 pixels, one predicted right.
    batches = [
        (torch.tensor([[0]]), torch.tensor([[0]])),
        (torch.tensor([[0, 0, 1]]), torch.tensor([[1, 1, 1]])),
    ]
    metric = SegmentationMetric(num_classes=2)
    batch_mious = []
    for pred, label in batches:
        single = SegmentationMetric(num_classes=2)
        single.update(pred, label)
        batch_mious.append(single.compute()["mIoU"])
        metric.update(pred, label)
    result = metric.compute()
    expected = reference_segmentation([(p.numpy(), t.numpy()) for p, t in batches], 2)
    assert result["mIoU"] == pytest.approx(expected["mIoU"], abs=1e-6)
    assert abs(result["mIoU"] - np.mean(batch_mious)) > 0.1
    assert result["Dice_foreground"] == pytest.approx(expected["Dice"][1], abs=1e-6)


def test_two_ranks_merge_like_one():
    batches = random_batches(seed=2)
    rank0, rank1, single = (SegmentationMetric(num_classes=6) for _ in range(3))
    for i, (pred, label) in enumerate(batches):
        (rank0 if i % 2 == 0 else rank1).update(pred, label)
        single.update(pred, label)
    rank0.merge_state(rank1)
    merged, expected = rank0.compute(), single.compute()
    for key in ("mIoU", "mAcc", "aAcc", "mDice"):
        assert merged[key] == pytest.approx(expected[key], abs=1e-12)
    for name in ("area_intersect", "area_union", "area_pred", "area_label"):
        assert torch.equal(getattr(rank0, name), getattr(single, name))


def test_ignore_index_zero_and_reset():
    pred = torch.tensor([[0, 1, 2, 2]])
    label = torch.tensor([[0, 1, 2, 1]])
    metric = SegmentationMetric(num_classes=3, ignore_index=0)
    metric.update(pred, label)
    assert_matches_reference(metric.compute(), reference_segmentation([(pred.numpy(), label.numpy())], 3, 0))
    metric.reset()
    assert int(metric.area_label.sum()) == 0


@pytest.mark.parametrize("bad", [3, -1, 254])
def test_out_of_range_label_raises(bad):
    metric = SegmentationMetric(num_classes=3)
    with pytest.raises(UserError, match=str(bad)):
        metric.update(torch.tensor([[0, 1]]), torch.tensor([[0, bad]]))


def test_out_of_range_prediction_and_float_input_raise():
    metric = SegmentationMetric(num_classes=3)
    with pytest.raises(UserError):
        metric.update(torch.tensor([[0, 3]]), torch.tensor([[0, 1]]))
    with pytest.raises(UserError, match="argmax"):
        metric.update(torch.zeros(1, 2), torch.tensor([[0, 1]]))
    with pytest.raises(UserError, match="shape"):
        metric.update(torch.zeros(1, 3, dtype=torch.long), torch.tensor([[0, 1]]))


def test_table_and_csv(tmp_path):
    batches = random_batches(seed=3)
    metric = SegmentationMetric(num_classes=6)
    for pred, label in batches:
        metric.update(pred, label)
    result = metric.compute()
    names = ["road", "sky", "tree", "car", "person", "a_long_class_name"]
    table = format_per_class_table(result, names).splitlines()
    assert len(table) == 1 + 5 + 1  # header, the 5 classes that occur (class 5 is in neither), the means line
    assert len({len(line) for line in table[:-1]}) == 1 and not any(line.startswith("a_long") for line in table)
    assert f"{100 * float(result['IoU'][1]):.2f}" in table[2]
    path = tmp_path / "per_class.csv"
    write_per_class_csv(result, names, path)
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [row["class"] for row in rows] == names
    for row, iou in zip(rows, result["IoU"], strict=True):
        assert float(row["IoU"]) == pytest.approx(100 * float(iou), abs=1e-3, nan_ok=True)
    with pytest.raises(UserError, match="class names"):
        format_per_class_table(result, names[:2])


def reference_classification(batches, num_classes, top_k):
    logits = np.concatenate([b[0] for b in batches])
    target = np.concatenate([b[1] for b in batches])
    order = np.argsort(-logits, axis=1)
    top = {f"top{k}": np.mean([t in row[:k] for row, t in zip(order, target, strict=True)]) for k in top_k}
    matrix = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(matrix, (target, logits.argmax(axis=1)), 1)
    with np.errstate(invalid="ignore"):
        per_class = np.diag(matrix) / matrix.sum(axis=1)
    return top, matrix, per_class


def test_classification_matches_reference():
    rng = np.random.default_rng(0)
    num_classes, top_k = 7, (1, 3, 5)
    batches = []
    for size in (5, 8, 3):
        logits = rng.normal(size=(size, num_classes)).astype(np.float32)
        target = rng.integers(0, num_classes - 1, size=size)  # class 6 never occurs
        logits[np.arange(size) % 2 == 0, target[np.arange(size) % 2 == 0]] += 1.5
        batches.append((logits, target))
    metric = ClassificationMetric(num_classes, top_k)
    for logits, target in batches:
        metric.update(torch.from_numpy(logits), torch.from_numpy(target))
    result = metric.compute()
    top, matrix, per_class = reference_classification(batches, num_classes, top_k)
    for key, value in top.items():
        assert result[key] == pytest.approx(value, abs=1e-12)
    assert np.array_equal(result["confusion_matrix"].numpy(), matrix)
    np.testing.assert_allclose(result["per_class_accuracy"].numpy(), per_class, equal_nan=True)
    assert math.isnan(result["per_class_accuracy"][6])
    assert result["mean_class_accuracy"] == pytest.approx(np.nanmean(per_class), abs=1e-12)


def test_classification_top_k_clipped_and_bad_label():
    metric = ClassificationMetric(num_classes=3)
    metric.update(torch.tensor([[3.0, 2.0, 1.0], [0.0, 1.0, 2.0]]), torch.tensor([2, 2]))
    result = metric.compute()
    assert result["top1"] == 0.5 and result["top5"] == 1.0
    with pytest.raises(UserError, match="3"):
        metric.update(torch.zeros(1, 3), torch.tensor([3]))


def test_classification_two_ranks_merge_like_one():
    generator = torch.Generator().manual_seed(4)
    batches = [(torch.randn(6, 5, generator=generator), torch.randint(0, 5, (6,), generator=generator)) for _ in range(4)]
    rank0, rank1, single = (ClassificationMetric(5, (1, 3)) for _ in range(3))
    for i, (logits, target) in enumerate(batches):
        (rank0 if i % 2 == 0 else rank1).update(logits, target)
        single.update(logits, target)
    rank0.merge_state(rank1)
    merged, expected = rank0.compute(), single.compute()
    assert merged["top1"] == expected["top1"] and merged["top3"] == expected["top3"]
    assert torch.equal(merged["confusion_matrix"], expected["confusion_matrix"])
    assert int(merged["confusion_matrix"].sum()) == 24


@pytest.mark.parametrize(("logits", "target"), [(torch.zeros(3), torch.zeros(3)), (torch.zeros(2, 4), torch.zeros(2)),
                                                (torch.zeros(2, 3), torch.zeros(3)), (torch.zeros(2, 3, 1), torch.zeros(2))])  # fmt: skip
def test_classification_rejects_each_bad_shape(logits, target):
    metric = ClassificationMetric(num_classes=3)
    with pytest.raises(UserError, match=r"expected logits \[B,3\] and targets \[B\]"):
        metric.update(logits, target.long())


@pytest.mark.parametrize("num_classes", [0, -2, 2.5, "3", None])
def test_num_classes_must_be_a_positive_int(num_classes):
    for metric in (SegmentationMetric, ClassificationMetric):
        with pytest.raises(UserError, match="num_classes must be a positive integer"):
            metric(num_classes)


@pytest.mark.parametrize("top_k", [(), (0,), (1, -1)])
def test_top_k_must_be_positive(top_k):
    with pytest.raises(UserError, match="top_k must be positive"):
        ClassificationMetric(3, top_k)
    assert ClassificationMetric(1, (1,)).top_k == (1,)


def test_counts_are_exact_integers():
    metric = SegmentationMetric(num_classes=2)
    metric.update(torch.tensor([[0, 1, 1]]), torch.tensor([[0, 1, 0]]))
    for name in ("area_intersect", "area_union", "area_pred", "area_label"):
        assert getattr(metric, name).dtype == torch.int64, name
    assert metric.area_union.tolist() == [2, 2] and metric.area_intersect.tolist() == [1, 1]
    classification = ClassificationMetric(2, (1,))
    classification.update(torch.tensor([[1.0, 0.0]]), torch.tensor([0]))
    assert classification.confusion_matrix.dtype == torch.int64 and classification.correct_top_k.dtype == torch.int64


def test_table_and_csv_exact_text(tmp_path):
    metric = SegmentationMetric(num_classes=3)
    metric.update(torch.tensor([[0, 0, 1, 1]]), torch.tensor([[0, 1, 1, 1]]))  # class 2 absent everywhere
    result = metric.compute()
    assert format_per_class_table(result, ["sky", "road", "a"]).splitlines() == [
        "class      IoU      Acc     Dice",
        "sky      50.00   100.00    66.67",
        "road     66.67    66.67    80.00",
        "mIoU 58.33 (mmseg: mean over the 2 classes in the labels or predictions); "
        "mIoU_gt 58.33 (mean over the 2 classes in the labels); 1 classes in neither are not listed",
    ]
    path = tmp_path / "per_class.csv"
    write_per_class_csv(result, ["sky", "road", "a"], path)
    assert path.read_text().splitlines() == [
        "class,IoU,Acc,Dice", "sky,50.0000,100.0000,66.6667", "road,66.6667,66.6667,80.0000", "a,nan,nan,nan"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["per_class.csv"]  # no temporary left behind


def test_dice_and_iou_known_values() -> None:
    prediction = np.array([[1, 1, 0, 0], [0, 2, 0, 0]])
    label = np.array([[1, 0, 0, 0], [1, 2, 2, 0]])
    assert dice_and_iou(prediction, label) == {"dice": pytest.approx(2 * 1 / 4), "iou": pytest.approx(1 / 3)}
    assert dice_and_iou(prediction, label, foreground=2) == {
        "dice": pytest.approx(2 / 3),
        "iou": pytest.approx(1 / 2),
    }
    empty = np.zeros((3, 3), np.uint8)
    assert dice_and_iou(empty, empty) == {"dice": 1.0, "iou": 1.0}
    assert dice_and_iou(empty, np.ones_like(empty)) == {"dice": 0.0, "iou": 0.0}
    with pytest.raises(ValueError, match=r"prediction shape \(3, 3\) != label shape \(2, 4\)"):
        dice_and_iou(empty, label)


def test_range_errors_name_the_value_and_the_fix():
    """The one-line errors a user sees: what is out of range, the valid range, and what to change."""
    segmentation = SegmentationMetric(num_classes=3)
    with pytest.raises(UserError, match=r"^mask value 7 is outside 0\.\.2; fix the mask values or set num_classes / ignore_index in the config$"):
        segmentation.update(torch.tensor([[0, 1]]), torch.tensor([[0, 7]]))
    with pytest.raises(UserError, match=r"^predicted label value 3 is outside 0\.\.2; the model's num_classes must match the data$"):
        segmentation.update(torch.tensor([[0, 3]]), torch.tensor([[0, 1]]))
    classification = ClassificationMetric(num_classes=3)
    with pytest.raises(UserError, match=r"^class label value 4 is outside 0\.\.2; fix the labels or num_classes in the config$"):
        classification.update(torch.zeros(1, 3), torch.tensor([4]))


def test_miou_over_the_ground_truth_classes_beside_mmsegs():
    """Few classes present, many predicted: mmseg's mIoU counts every predicted-only class as IoU 0 (the
    headline, as published results do); mIoU_gt averages the classes in the labels only."""
    metric = SegmentationMetric(num_classes=6)
    label = torch.tensor([[0, 0, 0, 1, 1, 1]])
    metric.update(torch.tensor([[0, 0, 4, 1, 1, 5]]), label)
    result = metric.compute()
    iou0, iou1 = 2 / 3, 2 / 3  # each class: 2 of its 3 pixels found, nothing else predicted as it
    assert result["mIoU"] == pytest.approx((iou0 + iou1 + 0 + 0) / 4)
    assert result["mIoU_gt"] == pytest.approx((iou0 + iou1) / 2)
    table = format_per_class_table(result, ["a", "b", "c", "d", "e", "f"])
    assert "mean over the 4 classes in the labels or predictions" in table and "over the 2 classes in the labels" in table
    empty = SegmentationMetric(num_classes=2).compute()
    assert math.isnan(empty["mIoU_gt"])


def test_images_are_counted_once_each():
    """`images` is what eval prints next to the scores: a batch [B, H, W] is B images, a map [H, W] one."""
    metric = SegmentationMetric(num_classes=2)
    metric.update(torch.zeros(3, 4, 5, dtype=torch.long), torch.zeros(3, 4, 5, dtype=torch.long))
    metric.update(torch.zeros(4, 5, dtype=torch.long), torch.ones(4, 5, dtype=torch.long))
    assert metric.compute()["images"] == 4
    classification = ClassificationMetric(3, (1,))
    classification.update(torch.randn(7, 3), torch.tensor([0, 1, 2, 0, 1, 2, 0]))
    assert classification.compute()["images"] == 7


def test_table_of_every_class_present_and_of_none():
    metric = SegmentationMetric(num_classes=2)
    metric.update(torch.tensor([[0, 1]]), torch.tensor([[0, 1]]))
    table = format_per_class_table(metric.compute(), ["background", "x"]).splitlines()
    assert table[-1] == ("mIoU 100.00 (mmseg: mean over the 2 classes in the labels or predictions); "
                         "mIoU_gt 100.00 (mean over the 2 classes in the labels)")  # fmt: skip
    assert table[0] == "class           IoU      Acc     Dice"  # as wide as "background"
    nothing = format_per_class_table(SegmentationMetric(num_classes=2).compute(), ["a", "b"]).splitlines()
    assert nothing[0] == "class      IoU      Acc     Dice" and len(nothing) == 2
    assert nothing[1].endswith("; 2 classes in neither are not listed")
