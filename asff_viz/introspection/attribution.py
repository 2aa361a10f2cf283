"""Attributions for one detection (and for one fusion weight) with captum, mapped back to the original image.

The scalar explained for a detection is its pre-NMS score, objectness x class probability of its decoded
row (`row_index` = `DetectionRecord.row_index`). Its gradients follow every path from the input, including
the head's deformable offsets, which the model computes from detached guided anchors (a stop-gradient for
training): `gradient_through_offsets` reconnects them during attribution so that integrated gradients is
complete (sum of attributions = score(image) - score(baseline)). Methods (captum's own implementations):

* `integrated_gradients`: IntegratedGradients on the input pixels (optionally under NoiseTunnel), with
  captum's internal batching so memory stays bounded at large inputs (the full model at 608 px peaks near
  1.9 GiB with internal_batch_size 1 and 5.7 GiB with the default 4, on CPU);
* `saliency`: Saliency (|gradient|), optionally SmoothGrad through NoiseTunnel;
* `grad_cam_per_level`: LayerGradCam on each pyramid level's fused features (only the detection's own level
  is connected to its score), or on the three neck outputs that every level fuses;
* `fusion_weight_attribution`: a neuron attribution (NeuronIntegratedGradients or NeuronGradient) of the
  fusion weight alpha^l_k at one cell: which pixels made this location pick source k.

Layer methods need a module to hook. The model may be shared by several threads, and a hook on one of its
submodules would also see other threads' forwards; so each call routes the observed tensor through a
private `nn.Identity` (a "tap") that only the calling thread's forward passes through, and captum hooks the
tap. The tap's routing hook is removed in `finally`; the model is left as it was.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from captum.attr import (
    IntegratedGradients,
    LayerGradCam,
    NeuronGradient,
    NeuronIntegratedGradients,
    NoiseTunnel,
    Saliency,
)
from torch import nn

from ..inference.postprocess import row_location
from ..inference.transforms import IMAGENET_MEAN, IMAGENET_STD, ImageTransform
from ..models.head import SLOTS
from .capture import LEVEL_NAMES, fusion_levels, gradient_through_offsets, has_fusion_weights, weights_module
from .decomposition import input_batch
from .objectives import row_scores


@dataclass
class Attribution:
    """An attribution map over the model input.

    method: captum method name. target: what was explained. map: (S, S) float32 on the input grid (signed
    for integrated gradients, non-negative for saliency and Grad-CAM). attributions: the raw captum output
    without batch dimension ((3, S, S) for input methods, (H_l, W_l) for Grad-CAM). level: the pyramid level
    for layer methods. grid: (H_l, W_l) Grad-CAM map on the level's own grid. convergence_delta: integrated
    gradients' completeness error sum(attr) - (F(x) - F(baseline)), when computed. connected: False when the
    explained value does not depend on this layer at all (the map is then zero by construction).
    cell: (row, col) on `level`'s grid of the explained fusion weight, for fusion-weight attributions.
    stride: the input pixels per cell of `level` (layer and fusion-weight attributions).
    """

    method: str
    target: str
    map: np.ndarray
    attributions: np.ndarray
    level: int | None = None
    grid: np.ndarray | None = None
    convergence_delta: float | None = None
    connected: bool = True
    cell: tuple[int, int] | None = None
    stride: int | None = None

    @property
    def signed(self) -> bool:
        return bool((self.map < 0).any())

    def to_original(self, transform: ImageTransform, interpolation: str = "linear") -> np.ndarray:
        """(H, W) map over the original image (Grad-CAM: from its level grid, so cells land exactly)."""
        source = self.grid if self.grid is not None else self.map
        return transform.map_to_original(source, interpolation)


# ---------------------------------------------------------------------------------------------- plumbing


class DetectionScoreFunction:
    """Images (B, 3, S, S) -> (B,) pre-NMS score of decoded row `row_index` for class `class_index`.

    With `through_offsets` (the default of every method here) gradients also follow the head's deformable
    offsets (see `gradient_through_offsets`), so they are the true derivative of the score.
    """

    def __init__(self, model: nn.Module, row_index: int, class_index: int, through_offsets: bool = True) -> None:
        self.model, self.row_index, self.class_index = model, int(row_index), int(class_index)
        self.through_offsets = through_offsets

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if self.through_offsets:
            with gradient_through_offsets(self.model):
                outputs = self.model(images)
        else:
            outputs = self.model(images)
        return row_scores(outputs, self.row_index, self.class_index)[0]


def score_function(model: nn.Module, images: torch.Tensor, row_index: int, class_index: int | None = None,
                   through_offsets: bool = True) -> DetectionScoreFunction:
    """The captum forward function for a detection; class_index None = the row's best class on `images`."""
    size = images.shape[-1]
    rows = sum(SLOTS * (size // stride) ** 2 for stride in model.strides)
    if not 0 <= int(row_index) < rows:
        raise IndexError(f"row {row_index} is outside the {rows} decoded rows of a {size} px input")
    if class_index is None:
        with torch.no_grad():
            class_index = row_scores(model(images), int(row_index))[1]
    return DetectionScoreFunction(model, row_index, class_index, through_offsets)


def resolve_baseline(baseline, images: torch.Tensor) -> torch.Tensor:
    """None or "mean": zeros in normalized space (the dataset-mean gray); "black": 0-valued pixels; a tensor."""
    if baseline is None or (isinstance(baseline, str) and baseline == "mean"):
        return torch.zeros_like(images)
    if isinstance(baseline, str) and baseline == "black":
        mean = torch.tensor(IMAGENET_MEAN, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
        return (-mean / std).expand_as(images).clone()
    if isinstance(baseline, str):
        raise ValueError(f"baseline must be None, 'mean', 'black' or a tensor, got {baseline!r}")
    return torch.as_tensor(baseline, dtype=images.dtype, device=images.device).expand_as(images).clone()


@contextmanager
def tapped(module: nn.Module) -> Iterator[nn.Identity]:
    """Route `module`'s output, in this thread only, through a fresh `nn.Identity` for captum to hook."""
    tap, owner = nn.Identity(), threading.get_ident()

    def route(_module, _inputs, output):
        return tap(output) if threading.get_ident() == owner else None

    handle = module.register_forward_hook(route)
    try:
        yield tap
    finally:
        handle.remove()


@contextmanager
def tapped_source(model: nn.Module, source: int) -> Iterator[nn.Identity]:
    """Route neck output x^source, in this thread only, through a fresh `nn.Identity` for captum to hook."""
    tap, owner = nn.Identity(), threading.get_ident()

    def route(_module, _inputs, outputs):
        if threading.get_ident() != owner:
            return None
        outputs = list(outputs)
        outputs[source] = tap(outputs[source])
        return outputs

    handle = model.neck.register_forward_hook(route)
    try:
        yield tap
    finally:
        handle.remove()


def _fused_module(model: nn.Module, level: int, layer: str) -> nn.Module:
    fusion_level = fusion_levels(model)[level]
    if layer == "fused":
        if not hasattr(fusion_level, "fused"):
            raise ValueError(f"fusion level {level} has no `fused` map (fusion mode {model.config.fusion!r})")
        return fusion_level.fused
    if layer == "output":
        return fusion_level
    raise ValueError(f"layer must be 'fused', 'output' or 'source', got {layer!r}")


# ---------------------------------------------------------------------------------------------- methods


def integrated_gradients(model: nn.Module, image_tensor: torch.Tensor, row_index: int, *,
                         class_index: int | None = None, baseline=None, n_steps: int = 32,
                         method: str = "gausslegendre", internal_batch_size: int = 4, noise_tunnel: bool = False,
                         nt_samples: int = 8, nt_samples_batch_size: int = 1, stdevs: float = 0.1,
                         through_offsets: bool = True) -> Attribution:
    """Integrated Gradients of detection row `row_index`'s pre-NMS score w.r.t. the input pixels.

    image_tensor: (3, S, S) normalized. baseline: see `resolve_baseline` (default: the mean image).
    internal_batch_size bounds memory: the model runs at most that many interpolated images at once.
    With `noise_tunnel`, SmoothGrad-averaged IG over `nt_samples` noisy copies (no convergence delta).
    through_offsets: differentiate through the head's deformable offsets (see `gradient_through_offsets`);
    without it the attributions miss that path and are not complete.
    Returns an Attribution with map = (S, S) sum over colour channels (signed).
    """
    images = input_batch(model, image_tensor)
    forward = score_function(model, images, row_index, class_index, through_offsets)
    baselines = resolve_baseline(baseline, images)
    explainer = IntegratedGradients(forward)
    delta = None
    if noise_tunnel:
        attributions = NoiseTunnel(explainer).attribute(
            images, baselines=baselines, nt_type="smoothgrad", nt_samples=nt_samples,
            nt_samples_batch_size=nt_samples_batch_size, stdevs=stdevs, n_steps=n_steps, method=method,
            internal_batch_size=internal_batch_size)
    else:
        attributions, delta_tensor = explainer.attribute(
            images, baselines=baselines, n_steps=n_steps, method=method, internal_batch_size=internal_batch_size,
            return_convergence_delta=True)
        delta = float(delta_tensor.sum())
    raw = attributions[0].detach().float().cpu().numpy()
    return Attribution("integrated_gradients" + ("+noise_tunnel" if noise_tunnel else ""),
                       f"score of row {row_index} (class {forward.class_index})", raw.sum(axis=0), raw,
                       convergence_delta=delta)


def saliency(model: nn.Module, image_tensor: torch.Tensor, row_index: int, *, class_index: int | None = None,
             noise_tunnel: bool = False, nt_samples: int = 8, nt_samples_batch_size: int = 1,
             stdevs: float = 0.1, through_offsets: bool = True) -> Attribution:
    """|d score / d pixel| of detection row `row_index` (SmoothGrad over noisy copies with `noise_tunnel`).

    Returns an Attribution with map = (S, S) maximum over colour channels of the absolute gradient.
    """
    images = input_batch(model, image_tensor)
    forward = score_function(model, images, row_index, class_index, through_offsets)
    explainer = Saliency(forward)
    if noise_tunnel:
        attributions = NoiseTunnel(explainer).attribute(
            images, nt_type="smoothgrad", nt_samples=nt_samples, nt_samples_batch_size=nt_samples_batch_size,
            stdevs=stdevs, abs=True)
    else:
        attributions = explainer.attribute(images, abs=True)
    raw = attributions[0].detach().float().cpu().numpy()
    return Attribution("saliency" + ("+noise_tunnel" if noise_tunnel else ""),
                       f"score of row {row_index} (class {forward.class_index})", raw.max(axis=0), raw)


def grad_cam_per_level(model: nn.Module, image_tensor: torch.Tensor, row_index: int, *,
                       class_index: int | None = None, layer: str = "fused", levels=(0, 1, 2),
                       through_offsets: bool = True) -> list[Attribution]:
    """LayerGradCam of detection row `row_index`'s score on each pyramid level's features.

    layer:
        "fused": each level's ASFF-weighted sum before `expand`;
        "output": each fusion level's output (the head's input);
        "source": the neck output x^k of each level k, the fusion's sources at their own resolution.
    A level's fused map (and output) feeds only that level's head, so for "fused" and "output" only the
    detection's own level is connected to its score; the other levels get an all-zero grid with
    `connected=False` (no backward pass is run for them). All three sources feed every level's fusion.
    Returns one Attribution per level in `levels`: grid (H_l, W_l) ReLU'd Grad-CAM, map (S, S) the grid
    repeated over each cell's stride x stride pixels.
    """
    if layer not in ("fused", "output", "source"):
        raise ValueError(f"layer must be 'fused' (before expand), 'output' (the head's input) or 'source' (the "
                         f"neck outputs), got {layer!r}")
    images = input_batch(model, image_tensor)
    forward = score_function(model, images, row_index, class_index, through_offsets)
    size = images.shape[-1]
    detection_level = row_location(row_index, model.grid_sizes(size)).level
    results = []
    for level in levels:
        stride = model.strides[level]
        target = f"score of row {row_index} (class {forward.class_index}) at {LEVEL_NAMES[level]} {layer} features"
        connected = layer == "source" or level == detection_level
        if connected:
            context = tapped_source(model, level) if layer == "source" else tapped(_fused_module(model, level, layer))
            with context as tap:
                attributions = LayerGradCam(forward, tap).attribute(images, relu_attributions=True)
            grid = attributions[0, 0].detach().float().cpu().numpy()  # (H_l, W_l)
        else:
            grid = np.zeros((size // stride, size // stride), dtype=np.float32)
            target += f" (not connected: the detection comes from {LEVEL_NAMES[detection_level]})"
        results.append(Attribution("layer_grad_cam", target, np.repeat(np.repeat(grid, stride, axis=0), stride, axis=1),
                                   grid, level=level, grid=grid, connected=connected, stride=stride))
    return results


def fusion_weight_attribution(model: nn.Module, image_tensor: torch.Tensor, level: int, row: int, col: int,
                              source: int, *, method: str = "integrated_gradients", baseline=None, n_steps: int = 32,
                              internal_batch_size: int = 4) -> Attribution:
    """Which input pixels drive fusion weight alpha^level_source at cell (row, col).

    method: "integrated_gradients" (captum NeuronIntegratedGradients, signed, from `baseline`) or "gradient"
    (NeuronGradient). Returns an Attribution with map = (S, S) sum over colour channels.
    """
    if not has_fusion_weights(model):
        raise ValueError(f"the {model.config.variant!r} model has no ASFF fusion weights to attribute.")
    images = input_batch(model, image_tensor)
    height = images.shape[-1] // model.strides[level]
    if not (0 <= row < height and 0 <= col < height and source in (0, 1, 2)):
        raise IndexError(f"cell ({row}, {col}) / source {source} is outside level {level}'s {height}x{height} grid")

    def forward(batch: torch.Tensor) -> torch.Tensor:
        # Only the tapped weights matter; the output just has to be a per-image tensor for captum.
        return model(batch)[level].prediction.flatten(1).sum(dim=1)

    selector = (int(source), int(row), int(col))
    with tapped(weights_module(fusion_levels(model)[level])) as tap:
        if method == "integrated_gradients":
            attributions = NeuronIntegratedGradients(forward, tap).attribute(
                images, neuron_selector=selector, baselines=resolve_baseline(baseline, images), n_steps=n_steps,
                internal_batch_size=internal_batch_size)
        elif method == "gradient":
            attributions = NeuronGradient(forward, tap).attribute(images, neuron_selector=selector)
        else:
            raise ValueError(f"method must be 'integrated_gradients' or 'gradient', got {method!r}")
    raw = attributions[0].detach().float().cpu().numpy()
    return Attribution(f"neuron_{method}", f"fusion weight of source {LEVEL_NAMES[source]} at {LEVEL_NAMES[level]} "
                       f"cell ({row}, {col})", raw.sum(axis=0), raw, level=level, cell=(int(row), int(col)),
                       stride=int(model.strides[level]))
