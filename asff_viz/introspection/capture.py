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
    """True when the model fuses with learned ASFF weights (fusion mode 'asff')."""
    return all(hasattr(level, "softmax") for level in fusion_levels(model))


def _is_identity(module: nn.Module) -> bool:
    return isinstance(module, nn.Identity)


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
    owner = threading.get_ident()
    recorder = Recorder(counterfactual=counterfactual)
    keep = (lambda tensor: tensor) if keep_graph else (lambda tensor: tensor.detach())
    record_sources = sources or keep_graph

    def mine() -> bool:
        return threading.get_ident() == owner

    def on_model(module, inputs, outputs):
        if mine():
            recorder.forward_count += 1
            recorder.outputs = [type(out)(*(keep(t) for t in out)) if isinstance(out, tuple) else keep(out)
                                for out in outputs]

    def on_neck(module, inputs, outputs):
        if not mine():
            return None
        recorder.neck_outputs = [keep(x) for x in outputs]
        if keep_graph:
            views = [x.view_as(x) for x in outputs]
            recorder.sources = list(views)
            return views
        if record_sources:
            recorder.sources = list(recorder.neck_outputs)
        return None

    def on_softmax(level: int):
        def hook(module, inputs, weights):
            if not mine():
                return None
            recorder.learned_weights[level] = keep(weights)
            if counterfactual.applies_to(level):
                replacement = counterfactual.apply(weights)
                recorder.fusion_weights[level] = keep(replacement)
                return replacement
            recorder.fusion_weights[level] = recorder.learned_weights[level]
            return None
        return hook

    def on_resize(level: int, source: int, identity: bool):
        def hook(module, inputs, output):
            if not mine():
                return None
            if keep_graph and identity:
                # An identity returns its input object; a view makes R_{k->l}(x^k) its own autograd node.
                output = output.view_as(output)
                recorder.resized[level][source] = output
                return output
            recorder.resized[level][source] = keep(output)
            return None
        return hook

    def on_fused(level: int):
        def hook(module, inputs, output):
            if mine():
                recorder.fused[level] = keep(output)
        return hook

    handles = []
    try:
        handles.append(model.register_forward_hook(on_model))
        if record_sources:
            handles.append(model.neck.register_forward_hook(on_neck))
        for level, module in enumerate(levels):
            if with_weights:
                handles.append(module.softmax.register_forward_hook(on_softmax(level)))
            if (resized or keep_graph) and hasattr(module, "resize"):
                for source, path in enumerate(module.resize):
                    handles.append(path.register_forward_hook(on_resize(level, source, _is_identity(path))))
            if (fused or keep_graph) and hasattr(module, "fused"):
                handles.append(module.fused.register_forward_hook(on_fused(level)))
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


def measure_capture_overhead(model: nn.Module, size: int = 416, repeats: int = 7, warmup: int = 1,
                             batch_size: int = 1) -> dict:
    """Time inference with and without capturing the fusion weights, interleaved, and compare medians.

    Plain and captured forwards alternate (and swap order every repeat: `asff_viz.utils.timing.run_interleaved`) so
    that load from other processes hits both alike. Runs under `torch.no_grad` on the model's device with random
    input. Each forward is timed by the wall clock and, on CPU, by this process's CPU time, which other processes
    competing for the cores disturb less (though not at all only on an idle machine).
    Returns {"size", "repeats", "clock" ("process_cpu" on CPU, else "wall"), "plain_seconds",
    "captured_seconds" (medians by that clock), "ratio" (captured / plain), "wall_ratio", "paired_ratio"
    (median of the ratios of adjacent runs), "best_ratio" (fastest captured / fastest plain), and the
    per-repeat lists "plain_all", "captured_all", "plain_wall", "captured_wall"}.
    """
    import time

    from ..utils.timing import median, paired_ratio, run_interleaved, synchronize

    device = next(model.parameters()).device
    images = torch.randn(batch_size, 3, size, size, device=device)
    on_cpu = device.type == "cpu"

    def case(captured: bool):
        def run() -> dict[str, float]:
            synchronize(device)
            wall, cpu = time.perf_counter(), time.process_time()
            if captured:
                with capture(model) as recorder:
                    model(images)
                weights = recorder.fusion_weights  # noqa: F841  (kept alive until the timer stops)
            else:
                model(images)
            synchronize(device)
            return {"wall": time.perf_counter() - wall, "cpu": time.process_time() - cpu}

        return run

    with torch.no_grad():
        times = run_interleaved({"plain": case(False), "captured": case(True)}, repeats=repeats, warmup=warmup,
                                device=device)
    key = "cpu" if on_cpu else "wall"
    plain_times, captured_times = times["plain"][key], times["captured"][key]
    plain_wall, captured_wall = times["plain"]["wall"], times["captured"]["wall"]
    plain_median, captured_median = median(plain_times), median(captured_times)
    return {"size": size, "repeats": repeats, "clock": "process_cpu" if on_cpu else "wall",
            "plain_seconds": plain_median, "captured_seconds": captured_median,
            "ratio": captured_median / plain_median,
            "wall_ratio": median(captured_wall) / median(plain_wall),
            # Each captured run sits next to a plain one: the median of those pairs' ratios cancels slow drifts
            # of the machine's load.
            "paired_ratio": paired_ratio(captured_times, plain_times),
            # The least-disturbed run of each kind (what `timeit` reports) on a machine shared with others.
            "best_ratio": min(captured_times) / min(plain_times),
            "plain_all": plain_times, "captured_all": captured_times,
            "plain_wall": plain_wall, "captured_wall": captured_wall}


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
