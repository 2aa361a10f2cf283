"""Tests of the YOLOv3 guided-anchor loss (asff_viz.training.loss) on hand-built and random level outputs."""

from __future__ import annotations

import math
from typing import NamedTuple

import pytest
import torch
from torch import nn

from asff_viz.ops.boxes import centered_wh_iou, cxcywh_iou
from asff_viz.training.loss import YOLOv3Loss

ANCHORS = ((10, 13), (16, 30), (33, 23), (30, 61), (62, 45), (42, 119), (116, 90), (156, 198), (121, 240))
MASKS = ((6, 7, 8), (3, 4, 5), (0, 1, 2))
STRIDES = (32, 16, 8)
LOG2 = math.log(2.0)


class LevelOutput(NamedTuple):
    """Stand-in with the model's per-level output shapes."""

    prediction: torch.Tensor  # (B, 4, 5+C, H, W)
    anchor_logwh: torch.Tensor  # (B, 4, 2, H, W)


def zero_outputs(batch_size: int, num_classes: int, size: int) -> list[LevelOutput]:
    outputs = []
    for stride in STRIDES:
        cells = size // stride
        outputs.append(
            LevelOutput(
                torch.zeros(batch_size, 4, 5 + num_classes, cells, cells, requires_grad=True),
                torch.zeros(batch_size, 4, 2, cells, cells, requires_grad=True),
            )
        )
    return outputs


def make_loss(num_classes: int, label_smoothing: bool = False) -> YOLOv3Loss:
    return YOLOv3Loss(num_classes, ANCHORS, MASKS, STRIDES, label_smoothing=label_smoothing)


def one_label(row: list[float], num_rows: int = 50) -> torch.Tensor:
    labels = torch.zeros(1, num_rows, 6)
    labels[0, 0] = torch.tensor(row)
    return labels


def box_iou_by_hand(a, b) -> float:
    ax0, ax1, ay0, ay1 = a[0] - a[2] / 2, a[0] + a[2] / 2, a[1] - a[3] / 2, a[1] + a[3] / 2
    bx0, bx1, by0, by1 = b[0] - b[2] / 2, b[0] + b[2] / 2, b[1] - b[3] / 2, b[1] + b[3] / 2
    inter = max(0.0, min(ax1, bx1) - max(ax0, bx0)) * max(0.0, min(ay1, by1) - max(ay0, by0))
    return inter / (a[2] * a[3] + b[2] * b[3] - inter)


def test_hand_built_anchor_slot_assignment():
    # 64 px input: levels of 2x2, 4x4, 8x8 cells, 4 slots each = 336 positions. All logits 0, so every
    # prediction is the cell centre with its base anchor size, and every BCE term equals log 2.
    # GT 30x60 at (20, 12): best anchor is #3 (30, 61), IoU 1800/1830, in level 1's mask (3, 4, 5) at slot 0;
    # cell (j, i) = (int(12/16), int(20/16)) = (0, 1). The free slot's 64x64 guided anchor has IoU
    # 1800/4096 < 1800/1830, so slot 0 is the positive. No predicted box reaches IoU 0.7 with the GT
    # (the closest, slot 0 at cell (0, 1) = (24, 8, 30, 61), has 0.68).
    outputs = zero_outputs(1, 3, 64)
    terms = make_loss(3)(outputs, one_label([1, 20, 12, 30, 60, 1]))
    scale = 2 - 30 * 60 / 64**2
    expected_anchor = (1 - (1800 / 1830) ** 2) + (1 - (1800 / 4096) ** 2)
    expected_iou = scale * (1 - box_iou_by_hand((24, 8, 30, 61), (20, 12, 30, 60)) ** 2)
    # xy: BCE(0, 0.25) + BCE(0, 0.75) = 2 log 2; wh: |0 - log(30/30)| + |0 - log(60/61)|.
    expected_l1 = scale * (2 * LOG2 + math.log(61 / 60))
    assert terms["anchor"].item() == pytest.approx(expected_anchor, rel=1e-5)
    assert terms["iou"].item() == pytest.approx(expected_iou, rel=1e-5)
    assert terms["l1"].item() == pytest.approx(expected_l1, rel=1e-5)
    assert terms["obj"].item() == pytest.approx(336 * LOG2, rel=1e-5)
    assert terms["cls"].item() == pytest.approx(3 * LOG2, rel=1e-5)
    total = sum(terms[name] for name in ("anchor", "iou", "l1", "obj", "cls"))
    assert terms["total"].item() == pytest.approx(total.item(), rel=1e-6)

    # Gradients land exactly on the assigned places: class logits only at level 1, slot 0, cell (0, 1).
    terms["total"].backward()
    class_grad = outputs[1].prediction.grad[0, :, 5:]  # (4, 3, 4, 4)
    nonzero = class_grad.abs().sum(dim=1).nonzero().tolist()
    assert nonzero == [[0, 0, 1]]
    # The target class gets a negative gradient (pushed up), the others positive.
    assert class_grad[0, 1, 0, 1] < 0 and class_grad[0, 0, 0, 1] > 0
    # The guided anchor of slot 0 and of the free slot at that cell are trained; other cells are not.
    anchor_grad = outputs[1].anchor_logwh.grad[0].abs().sum(dim=1)  # (4, 4, 4)
    assert sorted(anchor_grad.nonzero().tolist()) == [[0, 0, 1], [3, 0, 1]]
    assert outputs[0].anchor_logwh.grad.abs().sum() == 0 and outputs[2].anchor_logwh.grad.abs().sum() == 0


def test_hand_built_anchor_free_slot_wins():
    # Same GT, but the free slot's guided anchor at cell (0, 1) of level 1 predicts exactly 30x60 (IoU 1 > the
    # best anchor's 1800/1830): slot 3 becomes the positive; the guided-anchor targets stay at slots 0 and 3.
    outputs = zero_outputs(1, 3, 64)
    with torch.no_grad():
        outputs[1].anchor_logwh[0, 3, :, 0, 1] = torch.tensor([math.log(30 / 64), math.log(60 / 64)])
    terms = make_loss(3)(outputs, one_label([2, 20, 12, 30, 60, 1]))
    scale = 2 - 30 * 60 / 64**2
    assert terms["anchor"].item() == pytest.approx(1 - (1800 / 1830) ** 2, rel=1e-4)
    assert terms["iou"].item() == pytest.approx(scale * (1 - box_iou_by_hand((24, 8, 30, 60), (20, 12, 30, 60)) ** 2),
                                                rel=1e-5)
    assert terms["l1"].item() == pytest.approx(scale * 2 * LOG2, rel=1e-5)  # wh targets log(30/30), log(60/60)
    terms["total"].backward()
    objectness_grad = outputs[1].prediction.grad[0, :, 4]  # (4, 4, 4)
    # Positive (target 1): gradient sigmoid(0) - 1 = -0.5; all other positions are negatives with +0.5.
    assert objectness_grad[3, 0, 1].item() == pytest.approx(-0.5)
    assert objectness_grad[0, 0, 1].item() == pytest.approx(0.5)
    class_grad = outputs[1].prediction.grad[0, :, 5:].abs().sum(dim=1)
    assert class_grad.nonzero().tolist() == [[3, 0, 1]]


def test_zero_labels_give_only_objectness():
    torch.manual_seed(0)
    outputs = zero_outputs(2, 4, 64)
    with torch.no_grad():
        for output in outputs:
            output.prediction.normal_()
            output.anchor_logwh.normal_(std=0.3)
    terms = make_loss(4)(outputs, torch.zeros(2, 50, 6))
    for name in ("anchor", "iou", "l1", "cls"):
        assert terms[name].item() == 0.0
    # Every position is a negative: sum of softplus(objectness logit) / batch size.
    expected = sum(nn.functional.softplus(o.prediction[:, :, 4]).sum() for o in outputs) / 2
    assert terms["obj"].item() == pytest.approx(expected.item(), rel=1e-5)
    assert terms["total"].item() == pytest.approx(expected.item(), rel=1e-5)
    terms["total"].backward()
    # The guided-anchor outputs are still in the graph (needed by DDP), with zero gradient.
    assert all(o.anchor_logwh.grad is not None and o.anchor_logwh.grad.abs().sum() == 0 for o in outputs)


def test_label_smoothing_targets():
    outputs = zero_outputs(1, 4, 64)
    logits = torch.tensor([0.3, -1.2, 2.0, 0.5])
    with torch.no_grad():
        outputs[1].prediction[0, 0, 5:, 0, 1] = logits
    labels = one_label([2, 20, 12, 30, 60, 1])

    def bce(logit, target):
        return float(nn.functional.binary_cross_entropy_with_logits(torch.tensor(logit), torch.tensor(target)))

    smoothed = make_loss(4, label_smoothing=True)(outputs, labels)["cls"].item()
    expected = sum(bce(float(z), 0.75 if c == 2 else 0.25) for c, z in enumerate(logits))
    assert smoothed == pytest.approx(expected, rel=1e-5)
    plain = make_loss(4)(outputs, labels)["cls"].item()
    expected_plain = sum(bce(float(z), 1.0 if c == 2 else 0.0) for c, z in enumerate(logits))
    assert plain == pytest.approx(expected_plain, rel=1e-5)
    assert plain != pytest.approx(smoothed)


def test_mixup_ratio_weights_positive_objectness():
    outputs = zero_outputs(1, 3, 64)
    full = make_loss(3)(outputs, one_label([1, 20, 12, 30, 60, 1.0]))["obj"].item()
    mixed = make_loss(3)(outputs, one_label([1, 20, 12, 30, 60, 0.25]))["obj"].item()
    assert full - mixed == pytest.approx(0.75 * LOG2, rel=1e-4)


def test_per_level_terms_sum_to_total():
    torch.manual_seed(1)
    outputs, labels = random_case(2, 3, 96, 6)
    criterion = make_loss(3)
    per_level = criterion.loss_per_level(outputs, labels)
    summed = criterion(outputs, labels)
    assert len(per_level) == 3
    for name in summed:
        assert summed[name].item() == pytest.approx(sum(t[name].item() for t in per_level), rel=1e-6)
    # The 6 GTs are spread over levels by size: more than one level has positives.
    assert sum(t["cls"].item() > 0 for t in per_level) >= 2


def test_rejects_out_of_range_class():
    with pytest.raises(ValueError, match="classes"):
        make_loss(3)(zero_outputs(1, 3, 64), one_label([3, 20, 12, 30, 60, 1]))


# --- A direct port of the official per-GT loop, as an independent reference for random cases. ---


def reference_level_loss(output, labels, level, num_classes, label_smoothing, ignore_threshold=0.7):
    prediction, anchor_logwh = output.prediction, output.anchor_logwh
    batch_size, _, channels, size, _ = prediction.shape
    stride = STRIDES[level]
    image_size = size * stride
    out = prediction.permute(0, 1, 3, 4, 2)
    base = torch.tensor([ANCHORS[i] for i in MASKS[level]] + [(4 * stride, 4 * stride)], dtype=torch.float32)
    anchor_wh = anchor_logwh.exp().permute(0, 1, 3, 4, 2) * base.view(1, 4, 1, 1, 2)
    shift_x = torch.arange(size, dtype=torch.float32).view(1, 1, 1, size)
    shift_y = torch.arange(size, dtype=torch.float32).view(1, 1, size, 1)
    pred_boxes = torch.stack(
        [
            (out[..., 0].sigmoid() + shift_x) * stride,
            (out[..., 1].sigmoid() + shift_y) * stride,
            out[..., 2].exp() * anchor_wh[..., 0],
            out[..., 3].exp() * anchor_wh[..., 1],
        ],
        dim=-1,
    )
    target = torch.zeros(batch_size, 4, size, size, channels)
    l1_target = torch.zeros(batch_size, 4, size, size, 4)
    scale = torch.zeros(batch_size, 4, size, size)
    obj_mask = torch.ones(batch_size, 4, size, size)
    cls_mask = torch.zeros(batch_size, 4, size, size)
    coord_mask = torch.zeros(batch_size, 4, size, size, dtype=torch.bool)
    anchor_mask = torch.zeros(batch_size, 4, size, size, dtype=torch.bool)
    all_anchors = torch.tensor(ANCHORS, dtype=torch.float32)
    for b in range(batch_size):
        rows = [t for t in range(labels.shape[1]) if labels[b, t, 3] > 0]
        if not rows:
            continue
        gts = labels[b, rows]
        ious = pairwise_cxcywh_iou(pred_boxes[b].detach().reshape(-1, 4), gts[:, 1:5])
        obj_mask[b] = (~(ious.max(dim=1).values > ignore_threshold)).float().view(4, size, size)
        for gt in gts:
            anchor_ious = [float(centered_wh_iou(gt[3:5], a)) for a in all_anchors]
            best = max(range(9), key=lambda k: anchor_ious[k])
            if best not in MASKS[level]:
                continue
            a = best % 3
            i, j = int(gt[1] / image_size * size), int(gt[2] / image_size * size)
            free_iou = float(centered_wh_iou(gt[3:5], anchor_wh[b, 3, j, i].detach()))
            aa = 3 if free_iou > anchor_ious[best] else a
            cls_mask[b, aa, j, i] = 1
            coord_mask[b, aa, j, i] = True
            anchor_mask[b, a, j, i] = anchor_mask[b, 3, j, i] = True
            obj_mask[b, aa, j, i] = gt[5]
            target[b, a, j, i, :4] = gt[1:5]
            target[b, 3, j, i, :4] = gt[1:5]
            l1_target[b, aa, j, i, 0] = gt[1] / image_size * size - i
            l1_target[b, aa, j, i, 1] = gt[2] / image_size * size - j
            l1_target[b, aa, j, i, 2] = torch.log(gt[3] / anchor_wh[b, aa, j, i, 0] + 1e-12)
            l1_target[b, aa, j, i, 3] = torch.log(gt[4] / anchor_wh[b, aa, j, i, 1] + 1e-12)
            target[b, aa, j, i, 4] = 1
            if label_smoothing:
                target[b, aa, j, i, 5:] = 1 / num_classes
                target[b, aa, j, i, 5 + int(gt[0])] = 1 - 1 / num_classes
            else:
                target[b, aa, j, i, 5 + int(gt[0])] = 1
            scale[b, aa, j, i] = 2 - gt[3] * gt[4] / image_size**2
    bce = nn.functional.binary_cross_entropy_with_logits
    anchor = (1 - centered_wh_iou(anchor_wh[anchor_mask], target[..., 2:4][anchor_mask]) ** 2).sum()
    iou = (scale[coord_mask] * (1 - cxcywh_iou(pred_boxes[coord_mask], target[..., :4][coord_mask]) ** 2)).sum()
    xy = (scale[..., None] * bce(out[..., :2], l1_target[..., :2], reduction="none")).sum()
    wh = (scale[..., None] * (out[..., 2:4] - l1_target[..., 2:4]).abs()).sum()
    obj = (obj_mask * bce(out[..., 4], target[..., 4], reduction="none")).sum()
    cls = (cls_mask[..., None] * bce(out[..., 5:], target[..., 5:], reduction="none")).sum()
    terms = {"anchor": anchor, "iou": iou, "l1": xy + wh, "obj": obj, "cls": cls}
    return {name: value / batch_size for name, value in terms.items()}


def pairwise_cxcywh_iou(a, b):
    return cxcywh_iou(a[:, None, :], b[None, :, :])


def random_case(batch_size, num_classes, size, num_boxes, duplicates=False):
    outputs = zero_outputs(batch_size, num_classes, size)
    with torch.no_grad():
        for output in outputs:
            output.prediction.normal_(std=0.5)
            output.anchor_logwh.normal_(std=0.3)
    labels = torch.zeros(batch_size, 50, 6)
    for b in range(batch_size):
        for t in range(num_boxes):
            w, h = torch.empty(2).uniform_(6, size * 0.9).tolist()
            cx, cy = torch.empty(2).uniform_(0, size - 1).tolist()
            labels[b, t] = torch.tensor([t % num_classes, cx, cy, w, h, torch.rand(1).item()])
        if duplicates:
            # Two more GTs in the same cell with nearly the same size: they compete for the same slots.
            labels[b, num_boxes] = labels[b, 0].clone()
            labels[b, num_boxes, 0] = (labels[b, 0, 0] + 1) % num_classes
            labels[b, num_boxes, 3] *= 1.02
            labels[b, num_boxes + 1] = labels[b, 1].clone()
            labels[b, num_boxes + 1, 0] = (labels[b, 1, 0] + 2) % num_classes
    # A padding hole in the middle must be skipped, not end the list.
    labels[0, 2] = 0
    return outputs, labels


@pytest.mark.parametrize("label_smoothing", [False, True])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_official_loop_values_and_gradients(label_smoothing, seed):
    torch.manual_seed(seed)
    num_classes = 5
    outputs, labels = random_case(3, num_classes, 96, 8, duplicates=True)
    criterion = make_loss(num_classes, label_smoothing)
    per_level = criterion.loss_per_level(outputs, labels)
    expected = [reference_level_loss(o, labels, level, num_classes, label_smoothing) for level, o in enumerate(outputs)]
    for level in range(3):
        for name in ("anchor", "iou", "l1", "obj", "cls"):
            assert per_level[level][name].item() == pytest.approx(expected[level][name].item(), rel=1e-5, abs=1e-6), (
                level, name)
    inputs = [t for o in outputs for t in o]
    ours = torch.autograd.grad(sum(t["total"] for t in per_level), inputs)
    theirs = torch.autograd.grad(sum(sum(t.values()) for t in expected), inputs)
    for mine, reference in zip(ours, theirs, strict=True):
        torch.testing.assert_close(mine, reference, rtol=1e-4, atol=1e-6)


class TinyHead(nn.Module):
    """1x1 convolutions from fixed features to the level outputs: enough to check the loss trains."""

    def __init__(self, num_classes: int, channels: int = 8):
        super().__init__()
        self.predict = nn.ModuleList(nn.Conv2d(channels, 4 * (5 + num_classes), 1) for _ in STRIDES)
        self.guide = nn.ModuleList(nn.Conv2d(channels, 8, 1) for _ in STRIDES)
        self.num_classes = num_classes

    def forward(self, features):
        outputs = []
        for feature, predict, guide in zip(features, self.predict, self.guide, strict=True):
            b, _, h, w = feature.shape
            outputs.append(LevelOutput(predict(feature).view(b, 4, 5 + self.num_classes, h, w),
                                       guide(feature).view(b, 4, 2, h, w)))
        return outputs


def test_loss_decreases_under_sgd_on_fixed_batch():
    torch.manual_seed(0)
    head = TinyHead(3)
    features = [torch.randn(2, 8, 64 // s, 64 // s) for s in STRIDES]
    labels = torch.zeros(2, 50, 6)
    labels[0, :2] = torch.tensor([[0, 20, 20, 30, 40, 1], [1, 44, 40, 12, 14, 1]])
    labels[1, :1] = torch.tensor([[2, 32, 32, 50, 50, 1]])
    criterion = make_loss(3)
    optimizer = torch.optim.SGD(head.parameters(), lr=0.01, momentum=0.9)
    history = []
    for _ in range(15):
        terms = criterion(head(features), labels)
        optimizer.zero_grad()
        terms["total"].backward()
        optimizer.step()
        history.append(terms["total"].item())
    assert all(math.isfinite(v) for v in history)
    assert history[-1] < 0.7 * history[0]


def test_target_assignment_alone_last_writer_wins_and_the_anchor_free_slot_competes():
    from asff_viz.training.assignment import LevelGrid, assign_targets

    grid = LevelGrid(batch_size=1, slots=4, height=4, width=4, stride=8)
    labels = torch.tensor([[[0.0, 12, 12, 8, 8], [1.0, 13, 13, 8, 8]]])  # both in cell (row 1, col 1)
    valid = torch.tensor([[True, True]])
    best_anchor, best_iou = torch.tensor([[0, 0]]), torch.tensor([[0.5, 0.5]])
    anchor_wh = torch.zeros(grid.locations, 2)
    cell = 1 * 4 + 1

    targets = assign_targets(labels, valid, best_anchor, best_iou, (0, 1, 2), anchor_wh, grid)
    assert targets.positive_writes.tolist() == [cell, cell]  # slot 0: location (0 * 4 + 0) * 16 + cell
    assert targets.positive_gt.tolist() == [1]  # the later label overwrites the earlier one
    assert sorted(targets.anchor_locations.tolist()) == [cell, 3 * 16 + cell]  # slot a and the anchor-free slot
    assert targets.anchor_gt.tolist() == [1, 1]
    assert targets.box_target_gt[cell] == 1 and (targets.box_target_gt >= 0).sum() == 2

    anchor_wh[3 * 16 + cell] = torch.tensor([8.0, 8.0])  # slot 3's guided anchor fits the GTs exactly
    targets = assign_targets(labels, valid, best_anchor, best_iou, (0, 1, 2), anchor_wh, grid)
    assert targets.positive_locations.tolist() == [3 * 16 + cell]
    # Another level's anchors: nothing is assigned here.
    other = assign_targets(labels, valid, best_anchor, best_iou, (3, 4, 5), anchor_wh, grid)
    assert other.gt.shape[0] == 0 and other.positive_locations.numel() == 0
