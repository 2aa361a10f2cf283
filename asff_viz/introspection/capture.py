"""Observe one forward pass of YOLOv3-ASFF: fusion weights, resized sources, fused maps, raw predictions.

`capture(model)` is a context manager. It registers forward hooks on the named fusion submodules
(`fusion.levels[l].softmax`, `.resize[k]`, `.fused`), on `model.neck` and on the model itself, and removes
every one of them in `finally`. A forward run inside the block fills the yielded `Recorder`.

A cached model may be shared by several threads (app sessions) at once, and a forward hook fires for every
thread's forward. Each hook therefore acts only in the thread that opened the capture: another thread's
forward passes through untouched, neither recorded nor altered by a counterfactual. Nothing but the hooks is
put on the model, and they leave with the block.

Observing never changes the outputs: the hooks store references (detached unless `keep_graph`) and return
nothing, except (a) a counterfactual, which replaces the fusion weights on purpose, and (b) `keep_graph`, where
identity resizes and the neck outputs are returned as views (bit-identical values) so that every resized map
is its own autograd node and gradients at each can be told apart.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from ..models.config import ModelConfig

LEVEL_STRIDES = ModelConfig.strides  # the default pyramid (level 0 is the coarsest), for level names
LEVEL_NAMES = tuple(f"stride {stride}" for stride in LEVEL_STRIDES)
COUNTERFACTUAL_KINDS = ("learned", "uniform", "one_hot", "drop")


@dataclass(frozen=True)
class Counterfactual:
    """A replacement for the learned fusion weights, applied at inference.

    kind:
        "learned": the model's own weights (no change);
        "uniform": 1/3 for every source (plain-sum fusion, scaled by 1/3);
        "one_hot": weight 1 on `source`, 0 on the other two (the level sees only that resized source);
        "drop": weight 0 on `source`, the other two learned weights renormalized to sum to 1.
    source: the source level k (0 = stride 32, 1 = stride 16, 2 = stride 8) for "one_hot" and "drop".
    levels: the target levels it applies to; None for all three.
    """

    kind: str = "learned"
    source: int | None = None
    levels: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if self.kind not in COUNTERFACTUAL_KINDS:
            raise ValueError(f"counterfactual kind must be one of {COUNTERFACTUAL_KINDS}, got {self.kind!r}")
        if self.kind in ("one_hot", "drop"):
            if self.source not in (0, 1, 2):
                raise ValueError(f"counterfactual {self.kind!r} needs source 0, 1 or 2, got {self.source!r}")
        elif self.source is not None:
            raise ValueError(f"counterfactual {self.kind!r} takes no source (got {self.source})")
        if self.levels is not None:
            levels = tuple(int(level) for level in self.levels)
            if not levels or any(level not in (0, 1, 2) for level in levels):
                raise ValueError(f"counterfactual levels must be a non-empty subset of (0, 1, 2), got {self.levels}")
            object.__setattr__(self, "levels", levels)

    @classmethod
    def learned(cls) -> Counterfactual:
        return cls("learned")

    @classmethod
    def uniform(cls, levels: tuple[int, ...] | None = None) -> Counterfactual:
        return cls("uniform", None, levels)

    @classmethod
    def one_hot(cls, source: int, levels: tuple[int, ...] | None = None) -> Counterfactual:
        return cls("one_hot", source, levels)

    @classmethod
    def drop(cls, source: int, levels: tuple[int, ...] | None = None) -> Counterfactual:
        return cls("drop", source, levels)

    @property
    def is_learned(self) -> bool:
        return self.kind == "learned"

    def applies_to(self, level: int) -> bool:
        return not self.is_learned and (self.levels is None or level in self.levels)

    def apply(self, weights: torch.Tensor) -> torch.Tensor:
        """Learned weights (B, 3, H, W) -> the replacement weights (B, 3, H, W), each pixel summing to 1."""
        if self.kind == "learned":
            return weights
        if self.kind == "uniform":
            return torch.full_like(weights, 1.0 / 3.0)
        if self.kind == "one_hot":
            replacement = torch.zeros_like(weights)
            replacement[:, self.source] = 1.0
            return replacement
        keep = torch.ones(3, dtype=weights.dtype, device=weights.device)
        keep[self.source] = 0.0
        kept = weights * keep.view(1, 3, 1, 1)
        # Softmax weights are positive, so the two kept ones never sum to zero; the clamp guards underflow.
        return kept / kept.sum(dim=1, keepdim=True).clamp(min=torch.finfo(weights.dtype).tiny)

    def describe(self) -> str:
        """A short human-readable label, e.g. 'one-hot source stride 16'."""
        if self.kind == "learned":
            text = "learned weights"
        elif self.kind == "uniform":
            text = "uniform weights (plain sum)"
        elif self.kind == "one_hot":
            text = f"one-hot source {LEVEL_NAMES[self.source]}"
        else:
            text = f"drop source {LEVEL_NAMES[self.source]}"
        if self.levels is not None:
            text += " at levels " + ", ".join(LEVEL_NAMES[level] for level in self.levels)
        return text

    def to_dict(self) -> dict:
        return {"kind": self.kind, "source": self.source,
                "levels": None if self.levels is None else list(self.levels)}

    @classmethod
    def from_dict(cls, data: dict | None) -> Counterfactual:
        if not data:
            return cls()
        levels = data.get("levels")
        return cls(data.get("kind", "learned"), data.get("source"), None if levels is None else tuple(levels))


def as_counterfactual(value: Counterfactual | str | dict | None) -> Counterfactual:
    """Accept a Counterfactual, None (learned), a kind name ('uniform') or its dict form."""
    if value is None:
        return Counterfactual()
    if isinstance(value, Counterfactual):
        return value
    if isinstance(value, str):
        return Counterfactual(value)
    if isinstance(value, dict):
        return Counterfactual.from_dict(value)
    raise TypeError(f"counterfactual must be a Counterfactual, a kind name or None, got {type(value).__name__}")


@dataclass
class Recorder:
    """What one forward pass inside `capture` recorded (the latest forward, if several ran).

    fusion_weights: 3 tensors (B, 3, H_l, W_l), level 0 (stride 32) first, channel k = source level k: the
        weights the fusion actually used (the counterfactual's, if one is set).
    learned_weights: the same for the model's own softmax output (equal to fusion_weights without counterfactual).
    resized: resized[l][k] = R_{k->l}(x^k), (B, C_l, H_l, W_l), when `resized=True`.
    fused: fused[l] = sum_k w^l_k R_{k->l}(x^k), (B, C_l, H_l, W_l), the map before `expand`, when `fused=True`.
    sources: the three neck features x^k (B, C_k, H_k, W_k) as the fusion receives them.
    neck_outputs: the neck's own outputs; the same tensors as `sources` except with `keep_graph`, where
        `sources` are views of them (so d/d sources covers only the fusion paths and d/d neck_outputs also the
        neck's top-down path).
    outputs: the model's raw outputs (list of 3 LevelOutput), detached unless keep_graph.
    forward_count: forward passes seen in this thread inside the block.
    """

    counterfactual: Counterfactual = field(default_factory=Counterfactual)
    fusion_weights: list = field(default_factory=lambda: [None, None, None])
    learned_weights: list = field(default_factory=lambda: [None, None, None])
    resized: list = field(default_factory=lambda: [[None] * 3 for _ in range(3)])
    fused: list = field(default_factory=lambda: [None, None, None])
    sources: list = field(default_factory=lambda: [None, None, None])
    neck_outputs: list = field(default_factory=lambda: [None, None, None])
    outputs: list | None = None
    forward_count: int = 0

    def weights_numpy(self, batch_index: int = 0) -> list:
        """The fusion weights of one image as 3 float32 numpy arrays (3, H_l, W_l)."""
        return [w[batch_index].detach().float().cpu().numpy() for w in self.fusion_weights]


def fusion_levels(model: nn.Module) -> list[nn.Module]:
    """The model's three `fusion.levels` modules; a clear error for objects that are not YOLOv3-ASFF models."""
    fusion = getattr(model, "fusion", None)
    levels = getattr(fusion, "levels", None)
    if levels is None or len(levels) != 3:
        raise TypeError(f"{type(model).__name__} has no `fusion.levels` (3 levels): capture needs a model built "
                        "by asff_viz.build_model or asff_viz.load_model.")
    return list(levels)


def has_fusion_weights(model: nn.Module) -> bool:
    """True when the model fuses with learned weights: ASFF's per-pixel maps ('asff') or BiFPN's per-source
    scalars ('weighted', recorded broadcast over the map)."""
    return all(weights_module(level) is not None for level in fusion_levels(model))


def weights_module(level: nn.Module) -> nn.Module | None:
    """The submodule of a fusion level whose output is its weights (B, 3, H, W): `LevelFusion.weights_module`
    (ASFF's `softmax` or the weighted fusion's `normalize`); None for sum, concat and the baseline."""
    return getattr(level, "weights_module", None)


def _is_identity(module: nn.Module) -> bool:
    return isinstance(module, nn.Identity)


class _Hooks:
    """The forward hooks of one `capture`: each records into `recorder`, and only for the thread that opened the
    capture (a model shared by threads, e.g. app sessions, runs other forwards unrecorded)."""

    def __init__(self, recorder: Recorder, counterfactual: Counterfactual, keep_graph: bool) -> None:
        self.recorder, self.counterfactual, self.keep_graph = recorder, counterfactual, keep_graph
        self.owner = threading.get_ident()

    def mine(self) -> bool:
        return threading.get_ident() == self.owner

    def keep(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor if self.keep_graph else tensor.detach()

    def on_model(self, module, inputs, outputs):
        if self.mine():
            self.recorder.forward_count += 1
            self.recorder.outputs = [type(out)(*(self.keep(t) for t in out)) if isinstance(out, tuple)
                                     else self.keep(out) for out in outputs]

    def on_neck(self, module, inputs, outputs):
        if not self.mine():
            return None
        self.recorder.neck_outputs = [self.keep(x) for x in outputs]
        if self.keep_graph:
            views = [x.view_as(x) for x in outputs]
            self.recorder.sources = list(views)
            return views
        self.recorder.sources = list(self.recorder.neck_outputs)
        return None

    def on_softmax(self, level: int):
        def hook(module, inputs, weights):
            if not self.mine():
                return None
            recorder = self.recorder
            recorder.learned_weights[level] = self.keep(weights)
            if self.counterfactual.applies_to(level):
                replacement = self.counterfactual.apply(weights)
                recorder.fusion_weights[level] = self.keep(replacement)
                return replacement
            recorder.fusion_weights[level] = recorder.learned_weights[level]
            return None
        return hook

    def on_resize(self, level: int, source: int, identity: bool):
        def hook(module, inputs, output):
            if not self.mine():
                return None
            if self.keep_graph and identity:
                # An identity returns its input object; a view makes R_{k->l}(x^k) its own autograd node.
                output = output.view_as(output)
                self.recorder.resized[level][source] = output
                return output
            self.recorder.resized[level][source] = self.keep(output)
            return None
        return hook

    def on_fused(self, level: int):
        def hook(module, inputs, output):
            if self.mine():
                self.recorder.fused[level] = self.keep(output)
        return hook


@contextmanager
def capture(model: nn.Module, *, resized: bool = False, fused: bool = False,
            counterfactual: Counterfactual | str | dict | None = None, keep_graph: bool = False,
            sources: bool = False) -> Iterator[Recorder]:
    """Record one forward pass of `model` run inside the block (in the same thread).

    Args:
        model: a YOLOv3-ASFF model (any fusion mode; only 'asff' has weights and accepts a counterfactual).
        resized: also record resized[l][k] = R_{k->l}(x^k) (full tensors: memory grows with the input).
        fused: also record each level's fused map before `expand`.
        counterfactual: replace the learned fusion weights (see `Counterfactual`); None keeps them.
        keep_graph: keep the autograd graph of every recorded tensor (for `torch.autograd.grad`); implies
            recording the neck outputs. Off by default so that inference holds no graph.
        sources: record the neck outputs x^k (always on with keep_graph).
    Yields:
        a `Recorder`, filled when the forward inside the block runs.

    Example:
        with capture(model) as recorder:
            outputs = model(images)
        weights = recorder.fusion_weights  # 3 x (B, 3, H_l, W_l)
    """
    counterfactual = as_counterfactual(counterfactual)
    levels = fusion_levels(model)
    with_weights = has_fusion_weights(model)
    if not counterfactual.is_learned and not with_weights:
        raise ValueError(f"counterfactual {counterfactual.describe()!r} needs an ASFF model; this one fuses by "
                         f"{getattr(model.fusion, 'mode', 'another mode')!r} and has no fusion weights.")
    recorder = Recorder(counterfactual=counterfactual)
    record_sources = sources or keep_graph
    hooks = _Hooks(recorder, counterfactual, keep_graph)
    handles = []
    try:
        handles.append(model.register_forward_hook(hooks.on_model))
        if record_sources:
            handles.append(model.neck.register_forward_hook(hooks.on_neck))
        for level, module in enumerate(levels):
            if with_weights:
                handles.append(weights_module(module).register_forward_hook(hooks.on_softmax(level)))
            if (resized or keep_graph) and hasattr(module, "resize"):
                for source, path in enumerate(module.resize):
                    handles.append(path.register_forward_hook(hooks.on_resize(level, source, _is_identity(path))))
            if (fused or keep_graph) and hasattr(module, "fused"):
                handles.append(module.fused.register_forward_hook(hooks.on_fused(level)))
        yield recorder
    finally:
        for handle in handles:
            handle.remove()


def hook_count(model: nn.Module) -> int:
    """Forward/backward hooks currently registered on any submodule (0 when no capture is open)."""
    total = 0
    for module in model.modules():
        for name in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks",
                     "_forward_hooks_with_kwargs", "_forward_pre_hooks_with_kwargs", "_forward_hooks_always_called"):
            total += len(getattr(module, name, {}) or {})
    return total


@contextmanager
def gradient_through_offsets(model: nn.Module) -> Iterator[None]:
    """Let gradients reach the input through the head's deformable-conv offsets, in this thread only.

    The head computes its offsets from `anchor_logwh.detach()` (a training-time stop-gradient of the
    official design), so autograd's input gradient misses how the input moves the sampling positions, and
    integrated gradients could never be complete. Inside this block a pre-hook hands `conv_offset` the
    same values undetached (the guide's output recorded a moment earlier): outputs stay bit-identical and
    gradients become the true derivative of the score.
    """
    owner = threading.get_ident()
    latest: dict[int, torch.Tensor] = {}
    handles = []

    def record(level: int):
        def hook(_module, _inputs, output):
            if threading.get_ident() == owner:
                latest[level] = output
        return hook

    def substitute(level: int):
        def hook(_module, args):
            if threading.get_ident() != owner or level not in latest:
                return None
            (detached,) = args
            guide = latest.pop(level)
            return (guide,) if guide.shape == detached.shape else None
        return hook

    try:
        for level, head in enumerate(getattr(getattr(model, "head", None), "levels", [])):
            adaption = getattr(head, "adaption", None)
            if hasattr(head, "guide_wh") and hasattr(adaption, "conv_offset"):
                handles.append(head.guide_wh.register_forward_hook(record(level)))
                handles.append(adaption.conv_offset.register_forward_pre_hook(substitute(level)))
        yield
    finally:
        for handle in handles:
            handle.remove()
