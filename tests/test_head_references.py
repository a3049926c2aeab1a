"""One test class per segmentation head (as segmentation_models.pytorch tests each architecture): the
trainable-parameter counts of the reference code for ViT-S / B / L taps, the shape of the output and the
stride of the classifier's map on odd patch grids, and a small learnable task.

Reference counts and where they come from are in docs/heads.md; the contract every head shares (any number
of classes, ConvNeXt taps, gradients, channels_last, state dicts) is in test_heads.py.
"""

from __future__ import annotations

from typing import ClassVar

import pytest
import torch
import torch.nn.functional as F

from dinov3ds.heads import HEADS, build_head

WIDTHS = {"S": 384, "B": 768, "L": 1024}  # four ViT taps of these widths, all at stride 16


class HeadReference:
    """What one head must match. Subclasses fill in the class attributes."""

    name: ClassVar[str]
    options: ClassVar[dict] = {}
    classes: ClassVar[int] = 1  # the class count the reference's numbers were given for
    counts: ClassVar[dict[str, int]]  # trainable parameters with ViT-S / B / L taps
    classifier_stride: ClassVar[int]  # stride (in input pixels) of the map the last layer predicts on
    narrow: ClassVar[dict] = {}  # smaller widths for the learning test on this CPU

    @pytest.mark.parametrize("size", list(WIDTHS))
    def test_trainable_parameters_match_the_reference(self, size: str) -> None:
        head = build_head(self.name, [WIDTHS[size]] * 4, [16] * 4, self.classes, **self.options)
        assert head.trainable_parameters() == self.counts[size]

    @pytest.mark.parametrize("grid", [(5, 7), (7, 3), (1, 9)])
    def test_odd_grids_give_full_size_logits_from_the_references_stride(self, grid: tuple[int, int]) -> None:
        multiple = HEADS[self.name].input_multiple // 16 or 1  # patches per head input multiple
        rows, cols = (side * multiple for side in grid)
        head = build_head(self.name, [32] * 4, [16] * 4, 3, **{**self.options, **self.narrow}).eval()
        seen: list[tuple[int, int]] = []
        head.classifier.register_forward_hook(
            lambda module, inputs, output: seen.append(tuple(output.shape[-2:]))
        )
        features = [torch.randn(1, 32, rows, cols) for _ in range(4)]
        image = torch.randn(1, 3, rows * 16, cols * 16)
        with torch.no_grad():
            logits = head(features, image)
        assert logits.shape == (1, 3, rows * 16, cols * 16)
        assert seen == [(rows * 16 // self.classifier_stride, cols * 16 // self.classifier_stride)]

    def test_learns_a_pattern_that_only_the_features_carry(self) -> None:
        """Labels are the sign of one feature channel of the last tap: the loss must halve within 60 steps."""
        torch.manual_seed(0)
        multiple = max(HEADS[self.name].input_multiple // 16, 1)
        rows, cols = 2 * multiple, 4 * multiple
        features = [torch.randn(2, 64, rows, cols) for _ in range(4)]
        image = torch.randn(2, 3, rows * 16, cols * 16)
        labels = F.interpolate((features[-1][:, :1] > 0).float(), size=image.shape[-2:]).squeeze(1).long()
        head = build_head(self.name, [64] * 4, [16] * 4, 2, **{**self.options, **self.narrow})
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
        pytest.fail(
            f"{self.name} {self.options}: loss {eval_loss():.3f} after 60 steps, started at {initial:.3f}"
        )


class TestLinear(HeadReference):
    # Meta's LinearHead: BatchNorm (2·D) + 1x1 conv (D·K + K).
    name, counts, classifier_stride = "linear", {"S": 1_153, "B": 2_305, "L": 3_073}, 16


class TestSegDINOPaper(HeadReference):
    # script-Yang/segdino abf68e9, the paper's version; the paper gives ViT-S only.
    name, classifier_stride = "segdino", 16
    counts = {"S": 2_213_793, "B": 2_766_753, "L": 3_135_393}


class TestSegDINOUpstream(HeadReference):
    # script-Yang/segdino e383124: ×4 transposed conv on the first tap, fusion at stride 4.
    name, options, classifier_stride = "segdino", {"variant": "upstream"}, 4
    counts = {"S": 2_475_937, "B": 3_028_897, "L": 3_397_537}


class TestDPT(HeadReference):
    # DINOv3's DPT head + isl-org/DPT's segmentation head; reassembly widths 96-768 (B), 256-1024 (L), D/8-D (S).
    name, classifier_stride = "dpt", 2
    counts = {"S": 13_038_817, "B": 19_730_881, "L": 30_611_969}
    narrow = {"features": 16, "reassemble_channels": [8, 16, 32, 32]}


class TestUNet(HeadReference):
    # The seed's DinoV3_UNet (downstream-dinov3 b246721, models/dinov3_unet.py).
    name, classifier_stride = "unet", 1
    counts = {"S": 2_377_081, "B": 9_502_705, "L": 16_891_201}


class TestUNetSum(HeadReference):
    # Ours (no reference): BN + 1x1 to 256 per tap, summed at stride 16, four up blocks.
    name, classifier_stride = "unet_sum", 1
    counts = {"S": 790_225, "B": 1_186_513, "L": 1_450_705}
    narrow = {"base_channels": 32}


class TestUNetAdapter(HeadReference):
    # The seed's DinoV3_UNetWithAdapter (models/dinov3_unet_with_adapter.py): its decoder on the adapter that
    # TestFAPM checks against DinoUNet's released count.
    name, classifier_stride = "unet_adapter", 4
    counts = {"S": 5_260_849, "B": 12_536_689, "L": 19_664_769}
    narrow = {"decoder_channels": [32, 16, 16, 8], "conv_channels": 16, "drop_path": 0.0, "num_heads": 4}


class TestFAPM(HeadReference):
    # yifangao112/DinoUNet 8cb6c9f with 2 classes: 6,194,948 / 13,182,020 / 19,969,988 minus the two
    # deep-supervision output layers its decoder never calls (128·K + K + 64·K + K = 388 with K = 2).
    name, classes, classifier_stride = "fapm", 2, 1
    counts = {"S": 6_194_948 - 388, "B": 13_182_020 - 388, "L": 19_969_988 - 388}
    narrow = {"adapter_dim": 32, "conv_channels": 16, "rank": 16, "num_heads": 4, "drop_path": 0.0}


def test_every_head_has_a_reference_class() -> None:
    tested = {cls.name for cls in HeadReference.__subclasses__()}
    token_heads = {name for name, cls in HEADS.items() if cls.reads_tokens}  # test_pmt.py, test_eomt.py
    assert tested | token_heads == set(HEADS) and token_heads == {"pmt", "eomt"}
