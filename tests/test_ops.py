"""Box conversions, IoU and NMS against brute-force Python references; post-processing; decoded row locations."""

from __future__ import annotations

import itertools

import pytest
import torch

from asff_viz.inference.postprocess import RowLocation, postprocess, row_location
from asff_viz.models import build_model
from asff_viz.models.head import LevelOutput
from asff_viz.ops.boxes import box_area, box_iou, cxcywh_to_xyxy, xywh_to_xyxy, xyxy_to_cxcywh, xyxy_to_xywh
from asff_viz.ops.nms import _greedy_sorted, batched_nms, nms


def random_xyxy(count: int, generator: torch.Generator, extent: float = 100.0, max_size: float = 40.0):
    top_left = torch.rand(count, 2, generator=generator) * extent
    size = torch.rand(count, 2, generator=generator) * max_size
    return torch.cat((top_left, top_left + size), dim=1)


def python_iou(a: list[float], b: list[float]) -> float:
    """IoU of two xyxy boxes in float64 Python, straight from the definition."""
    inter_w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    inter_h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    intersection = inter_w * inter_h
    area_a = max(0.0, a[2] - a[0]) * max(0.0, a[3] - a[1])
    area_b = max(0.0, b[2] - b[0]) * max(0.0, b[3] - b[1])
    union = area_a + area_b - intersection
    return intersection / union if union > 0 else 0.0


def greedy_nms_reference(boxes: list[list[float]], scores: list[float], threshold: float) -> list[int]:
    """Textbook greedy NMS: highest score first (ties: lower index first); drop boxes with IoU > threshold."""
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    kept: list[int] = []
    for i in order:
        if all(python_iou(boxes[i], boxes[k]) <= threshold for k in kept):
            kept.append(i)
    return kept


def per_class_reference(boxes, scores, labels, threshold) -> list[int]:
    kept = []
    for label in sorted(set(labels)):
        members = [i for i in range(len(labels)) if labels[i] == label]
        chosen = greedy_nms_reference([boxes[i] for i in members], [scores[i] for i in members], threshold)
        kept.extend(members[j] for j in chosen)
    return sorted(kept, key=lambda i: (-scores[i], i))


def clustered_boxes(seed: int, count: int = 80):
    """Boxes jittered around a few centres (many overlaps) with scores from a few levels (many ties)."""
    generator = torch.Generator().manual_seed(seed)
    centres = torch.rand(5, 2, generator=generator) * 80 + 10
    pick = torch.randint(0, 5, (count,), generator=generator)
    centre = centres[pick] + torch.randn(count, 2, generator=generator) * 4
    size = 10 + torch.rand(count, 2, generator=generator) * 20
    boxes = cxcywh_to_xyxy(torch.cat((centre, size), dim=1))
    scores = torch.randint(1, 7, (count,), generator=generator).float() / 7
    labels = torch.randint(0, 3, (count,), generator=generator)
    return boxes, scores, labels


def test_box_conversions_round_trip():
    generator = torch.Generator().manual_seed(0)
    boxes = random_xyxy(50, generator)
    torch.testing.assert_close(cxcywh_to_xyxy(xyxy_to_cxcywh(boxes)), boxes)
    torch.testing.assert_close(xywh_to_xyxy(xyxy_to_xywh(boxes)), boxes)
    box = torch.tensor([10.0, 20.0, 40.0, 80.0])
    assert xyxy_to_cxcywh(box).tolist() == [25.0, 50.0, 30.0, 60.0]
    assert xyxy_to_xywh(box).tolist() == [10.0, 20.0, 30.0, 60.0]
    assert box_area(box).item() == 1800.0
    assert box_area(torch.tensor([5.0, 5.0, 2.0, 9.0])).item() == 0.0  # inverted box: area 0, not negative


def test_box_iou_matches_brute_force():
    generator = torch.Generator().manual_seed(1)
    boxes1, boxes2 = random_xyxy(30, generator), random_xyxy(20, generator)
    boxes2[0] = boxes1[0]  # identical pair: IoU exactly 1
    boxes2[1] = torch.tensor([5.0, 5.0, 5.0, 9.0])  # zero-width box
    iou = box_iou(boxes1, boxes2)
    assert iou.shape == (30, 20)
    expected = torch.tensor([[python_iou(a, b) for b in boxes2.tolist()] for a in boxes1.tolist()])
    torch.testing.assert_close(iou, expected, atol=1e-6, rtol=1e-5)
    assert iou[0, 0] == pytest.approx(1.0)
    assert (iou > 0).any() and (iou == 0).any()  # the random boxes both overlap and miss


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("threshold", [0.3, 0.65])
def test_nms_matches_greedy_reference(seed, threshold):
    boxes, scores, _ = clustered_boxes(seed)
    expected = greedy_nms_reference(boxes.tolist(), scores.tolist(), threshold)
    kept = nms(boxes, scores, threshold, use_torchvision=False)
    assert kept.dtype == torch.int64
    assert kept.tolist() == expected
    assert 1 < len(expected) < len(boxes)  # the case really suppresses, and keeps more than one box
    assert nms(boxes, scores, threshold).tolist() == expected  # default path (compiled op when present)


@pytest.mark.parametrize("block", [1, 7, 64, 4096])
def test_blockwise_nms_is_exact_across_blocks(block):
    # 600 clustered boxes over several blocks, plus a sliding-window chain (each box suppresses the next),
    # the worst case for the in-block fixed-point iteration.
    boxes, scores, _ = clustered_boxes(5, count=600)
    chain = torch.tensor([[2.0 * i, 0.0, 2.0 * i + 10.0, 10.0] for i in range(40)])
    boxes = torch.cat((boxes, chain + 200.0))
    scores = torch.cat((scores, torch.linspace(0.9, 0.1, 40)))
    expected = greedy_nms_reference(boxes.tolist(), scores.tolist(), 0.5)
    order = torch.sort(scores, descending=True, stable=True).indices
    kept = order[_greedy_sorted(boxes[order], 0.5, block=block)]
    assert kept.tolist() == expected
    assert sum(i >= 600 for i in expected) == 20  # the chain keeps every other box


@pytest.mark.parametrize("seed", range(4))
def test_batched_nms_matches_per_class_reference(seed):
    boxes, scores, labels = clustered_boxes(seed)
    expected = per_class_reference(boxes.tolist(), scores.tolist(), labels.tolist(), 0.5)
    kept = batched_nms(boxes, scores, labels, 0.5, use_torchvision=False)
    assert kept.tolist() == expected
    # Classes never suppress each other: more boxes survive than with class-agnostic NMS.
    assert len(expected) > len(greedy_nms_reference(boxes.tolist(), scores.tolist(), 0.5))


def test_postprocess_matches_reference_with_conf_threshold():
    generator = torch.Generator().manual_seed(3)
    count, num_classes, conf = 120, 4, 0.2
    boxes, _, _ = clustered_boxes(7, count)
    decoded = torch.cat((xyxy_to_cxcywh(boxes), torch.rand(count, 1 + num_classes, generator=generator)), 1)
    decoded[5, 4:] = 0.0  # a row with zero score, below any threshold
    (result,) = postprocess(decoded.unsqueeze(0), conf_threshold=conf, nms_threshold=0.5)

    class_conf, labels = decoded[:, 5:].max(dim=1)
    scores = (decoded[:, 4] * class_conf).tolist()
    candidates = [i for i in range(count) if scores[i] >= conf]
    kept_local = per_class_reference([boxes[i].tolist() for i in candidates], [scores[i] for i in candidates],
                                     [int(labels[i]) for i in candidates], 0.5)
    expected = [candidates[j] for j in kept_local]
    assert result.indices.tolist() == expected
    assert 0 < len(expected) < len(candidates) < count
    torch.testing.assert_close(result.boxes, boxes[expected])
    torch.testing.assert_close(result.scores, torch.tensor([scores[i] for i in expected]))
    assert result.labels.tolist() == labels[expected].tolist()
    torch.testing.assert_close(result.objectness * result.class_confidence, result.scores)
    assert all(a >= b for a, b in itertools.pairwise(result.scores.tolist()))


def test_empty_inputs():
    empty_boxes = torch.zeros(0, 4)
    assert nms(empty_boxes, torch.zeros(0), 0.5).shape == (0,)
    assert nms(empty_boxes, torch.zeros(0), 0.5, use_torchvision=False).dtype == torch.int64
    assert batched_nms(empty_boxes, torch.zeros(0), torch.zeros(0, dtype=torch.int64), 0.5).shape == (0,)
    assert box_iou(empty_boxes, random_xyxy(3, torch.Generator().manual_seed(0))).shape == (0, 3)
    # Nothing above the threshold, and an image with no rows at all.
    decoded = torch.cat((torch.rand(2, 10, 4) * 50, torch.full((2, 10, 4), 0.01)), dim=2)
    for result in postprocess(decoded, conf_threshold=0.5) + postprocess(torch.zeros(1, 0, 8)):
        assert len(result) == 0
        assert result.boxes.shape == (0, 4) and result.indices.dtype == torch.int64


def test_single_box_is_kept():
    box = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    assert nms(box, torch.tensor([0.5]), 0.5, use_torchvision=False).tolist() == [0]


def test_row_location_inverts_the_decode_order():
    """Zero raw outputs decode to cell centres and base anchor sizes, so every row says where it comes from."""
    model = build_model(width=0.125, depth=0.33, num_classes=2)
    size = 96
    grids = model.grid_sizes(size)
    outputs = [LevelOutput(torch.zeros(1, 4, 7, h, w), torch.zeros(1, 4, 2, h, w)) for h, w in grids]
    decoded = model.decode(outputs)[0]
    assert decoded.shape[0] == 4 * sum(h * w for h, w in grids)
    seen = set()
    for index in range(decoded.shape[0]):
        location = row_location(index, grids)
        stride = model.strides[location.level]
        cx, cy, w, h = decoded[index, :4].tolist()
        assert cx == pytest.approx((location.col + 0.5) * stride)
        assert cy == pytest.approx((location.row + 0.5) * stride)
        assert [w, h] == pytest.approx(model.base_anchors(location.level)[location.slot].tolist())
        seen.add((location.level, location.slot, location.row, location.col))
    assert len(seen) == decoded.shape[0]
    assert row_location(0, grids) == RowLocation(level=0, slot=0, row=0, col=0)
    last = row_location(decoded.shape[0] - 1, grids)
    assert (last.level, last.slot, last.row, last.col) == (2, 3, grids[2][0] - 1, grids[2][1] - 1)
    with pytest.raises(IndexError):
        row_location(decoded.shape[0], grids)
