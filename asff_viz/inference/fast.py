"""Inference fast paths: BatchNorm folding, channels-last, bf16 autocast and `torch.compile`, each an option.

    from asff_viz.inference.fast import optimize_for_inference
    fast_model = optimize_for_inference(model, dtype=torch.bfloat16)
    with torch.inference_mode():
        outputs = fast_model(images)          # the same list of `LevelOutput` as `model(images)`
    decoded = fast_model.decode(outputs)      # float32 rows, as for the original model

`optimize_for_inference` returns a new module (a deep copy) and never touches the model it is given, so a model
shared by the app keeps its BatchNorm layers, dtype and memory format. The copy is still a `YOLOv3ASFF` with the
same state_dict keys and every named submodule that hooks observe (`fusion.levels[l].softmax`, `.fused`,
`.resize[k]`, `neck`), so `asff_viz.capture` works on it unchanged.

What each option does and why the result stays equal (or close):

* `fold_bn`: in eval mode BatchNorm is an affine map per channel, y = (x - mean) / sqrt(var + eps) * gamma +
  beta, so it folds into the preceding bias-free conv: W' = W * s, b' = beta - mean * s with s = gamma /
  sqrt(var + eps). The BN module becomes an `nn.Identity`. Equal up to float round-off.
* `fuse_activation` (CPU, needs `fold_bn`): conv + bias + LeakyReLU(0.1) (ReLU6 in the MobileNetV2 models) as
  one oneDNN primitive
  (`torch.ops.mkldnn._convolution_pointwise`, the kernel `torch.compile` uses for the same fusion), so the
  activation is applied while the conv output is still in registers instead of in a second pass over memory.
  Used only on CPU tensors without autograd; anywhere else the module computes conv, then activation.
* `channels_last`: parameters and the input in NHWC layout, the layout oneDNN (CPU) and cuDNN (GPU) convolve
  fastest; the deformable conv then reads its input and weight with no copy. Same numbers, another memory order.
* `dtype=torch.bfloat16` (or float16): the forward runs under `torch.autocast(device, dtype)`, so ops that
  autocast keeps in float32 stay there, and the parameters are stored in that dtype once (autocast would
  otherwise cast all 79M of them again on every call, which costs as much as the bf16 convolutions of a small
  input on CPU). The anchor sizes stay float32, `decode` computes in float32, and the deformable conv computes
  its sampling positions in float32 (a bf16 pixel coordinate would be off by up to a pixel). Fast where the
  hardware has bf16 units (CPUs with AVX512-BF16 / AMX, Ampere or newer GPUs), slower elsewhere.
* `compile`: `torch.compile` of the forward (the first calls compile; each new input shape recompiles). While
  any submodule carries a hook (fusion capture, attributions) the forward runs eagerly instead, because a
  compiled graph would not call hooks registered after it was traced.

Always applied, exact: the SPP block's 9x9 and 13x13 stride-1 max pools become two and three chained 5x5 pools
(a max over a 9-window is the max of the 5-window maxima inside it), which is what YOLOv5's SPPF does.
"""

from __future__ import annotations

import copy
import functools

import torch
import torch.nn.functional as F
from torch import nn

from ..models.blocks import SPP, ConvBNAct
from ..models.detector import YOLOv3ASFF
from ..models.mobilenet import InvertedResidual


@torch.no_grad()
def fold_batchnorm(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> None:
    """Fold eval-mode `bn` into `conv` in place: the new conv(x) equals the old bn(conv(x))."""
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError("cannot fold a BatchNorm without running statistics (track_running_stats=False)")
    scale = (bn.running_var.double() + bn.eps).rsqrt()
    if bn.weight is not None:
        scale = scale * bn.weight.double()
    shift = -bn.running_mean.double() * scale
    if bn.bias is not None:
        shift = shift + bn.bias.double()
    if conv.bias is not None:
        shift = shift + conv.bias.double() * scale
    dtype = conv.weight.dtype
    conv.weight.copy_((conv.weight.double() * scale.view(-1, 1, 1, 1)).to(dtype))
    conv.bias = nn.Parameter(shift.to(dtype), requires_grad=conv.weight.requires_grad)


def fold_all_batchnorms(model: nn.Module) -> int:
    """Fold the BN of every `ConvBNAct` in `model` into its conv (BN replaced by Identity); returns the count.

    Only valid for inference (it uses the running statistics); the model is modified in place.
    """
    count = 0
    for module in model.modules():
        if isinstance(module, ConvBNAct) and isinstance(module.bn, nn.BatchNorm2d):
            fold_batchnorm(module.conv, module.bn)
            module.bn = nn.Identity()
            count += 1
        elif isinstance(module, InvertedResidual) and isinstance(module.project_bn, nn.BatchNorm2d):
            fold_batchnorm(module.project, module.project_bn)  # MobileNetV2's linear projection
            module.project_bn = nn.Identity()
            count += 1
    return count


def fused_conv_activation_available() -> bool:
    """True when this PyTorch has oneDNN's fused conv + pointwise op (CPU builds with mkldnn)."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_convolution_pointwise")


def _pointwise(act: nn.Module) -> tuple[str, list[float]]:
    """The oneDNN post-op of an activation: LeakyReLU(a) is leaky_relu [a], ReLU6 is hardtanh [0, 6]."""
    if isinstance(act, nn.LeakyReLU):
        return "leaky_relu", [act.negative_slope]
    if isinstance(act, nn.ReLU6):
        return "hardtanh", [0.0, 6.0]
    raise TypeError(f"no fused kernel for {type(act).__name__}")


class FusedConvAct(ConvBNAct):
    """A `ConvBNAct` whose BN is folded, computed as one oneDNN conv + bias + activation (LeakyReLU or ReLU6)
    on CPU.

    Same submodules (`conv`, `bn` = Identity, `act`) and parameters as the ConvBNAct it replaces; falls back to
    conv then activation on other devices, other dtypes, or when autograd records the forward.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        conv = self.conv
        weight = conv.weight
        if (x.device.type != "cpu" or weight.dtype not in (torch.float32, torch.bfloat16)
                or (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))):
            return self.act(self.bn(conv(x)))
        # Outside autocast the first layer receives the float32 image while the weights may be bf16.
        return torch.ops.mkldnn._convolution_pointwise(
            x.to(weight.dtype), weight, conv.bias, list(conv.padding), list(conv.stride), list(conv.dilation),
            conv.groups, *_pointwise(self.act), "")


class CascadedSPP(SPP):
    """`SPP` with its k x k pools computed as chained 5 x 5 pools: exactly equal, fewer comparisons."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(self.kernel_sizes) != (5, 9, 13):
            return super().forward(x)
        pooled, current = [], x
        for _ in range(3):
            current = F.max_pool2d(current, 5, stride=1, padding=2)
            pooled.append(current)
        return torch.cat([x, *pooled], dim=1)


def hooks_registered(modules: list[nn.Module]) -> bool:
    """True when any of `modules` (or the global registry) has a forward hook or pre-hook."""
    from torch.nn.modules import module as module_registry

    if module_registry._global_forward_hooks or module_registry._global_forward_pre_hooks:
        return True
    return any(m._forward_hooks or m._forward_pre_hooks for m in modules)


@functools.cache
def _optimized_class(base: type) -> type:
    """A subclass of `base` whose forward applies the inference settings; same state_dict and module names."""

    class Optimized(base):
        inference_base_class = base
        inference_channels_last: bool = False
        inference_dtype: torch.dtype | None = None

        def forward(self, images: torch.Tensor):  # type: ignore[override]
            compiled = self.__dict__.get("_compiled_forward")
            # A compiled graph does not see hooks added after it was traced, so while any module is hooked
            # (fusion capture, attributions) the forward runs eagerly and the hooks fire as usual.
            if compiled is not None and not hooks_registered(self.__dict__["_all_modules"]):
                return compiled(images)
            return self.inference_forward(images)

        def inference_forward(self, images: torch.Tensor):
            if self.inference_channels_last and images.dim() == 4:
                images = images.contiguous(memory_format=torch.channels_last)
            if self.inference_dtype is None:
                return super().forward(images)
            with torch.autocast(images.device.type, dtype=self.inference_dtype):
                return super().forward(images)

    Optimized.__name__ = Optimized.__qualname__ = f"Optimized{base.__name__}"
    return Optimized


def optimize_for_inference(model: nn.Module, *, fold_bn: bool = True, channels_last: bool = True,
                           dtype: torch.dtype | None = None, compile: bool | str = False,
                           fuse_activation: bool | None = None) -> nn.Module:
    """A new eval-mode copy of `model` that computes the same outputs faster (see the module docstring).

    Args:
        model: a YOLOv3-ASFF model (`build_model` / `load_model`); left untouched.
        fold_bn: fold every ConvBNAct's BatchNorm into its conv.
        channels_last: NHWC parameters and inputs.
        dtype: None for float32, or torch.bfloat16 / torch.float16 (autocast, parameters stored in that dtype).
        compile: run the forward through `torch.compile` (the first calls compile; pays off on long runs); a
            string is the compile mode, e.g. "reduce-overhead" (CUDA graphs: the lowest batch-1 latency on a
            GPU, but each call's outputs are overwritten by the next call, so clone what you keep).
        fuse_activation: one oneDNN conv + LeakyReLU on CPU; None = whenever available (needs `fold_bn`).
    Returns:
        the optimized copy (a subclass of the model's class): `optimized(images)` returns the same list of
        `LevelOutput` (raw outputs in the compute dtype), `optimized.decode` float32 rows, and
        `optimized.inference_settings` says what was applied.
    """
    if not isinstance(model, YOLOv3ASFF):
        raise TypeError(f"optimize_for_inference expects a YOLOv3ASFF model, got {type(model).__name__}")
    if dtype not in (None, torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"dtype must be None, torch.float32, torch.bfloat16 or torch.float16, got {dtype}")
    if fuse_activation and not fold_bn:
        raise ValueError("fuse_activation needs fold_bn=True (the fused op has no BatchNorm step)")
    if fuse_activation is None:
        # oneDNN runs bf16 convs only on CPUs with AVX-512 (or AMX); elsewhere the plain conv path is used.
        fuse_activation = fold_bn and fused_conv_activation_available() and (
            dtype != torch.bfloat16 or torch.ops.mkldnn._is_mkldnn_bf16_supported())
    elif fuse_activation and not fused_conv_activation_available():
        raise RuntimeError("fuse_activation=True needs a PyTorch build with oneDNN (torch.backends.mkldnn)")
    optimized = copy.deepcopy(model).eval()
    for name in ("_compiled_forward", "_all_modules"):  # an already optimized model: start from its eager copy
        optimized.__dict__.pop(name, None)
    folded = fold_all_batchnorms(optimized) if fold_bn else 0
    for module in optimized.modules():
        if type(module) is SPP:
            module.__class__ = CascadedSPP
        elif fuse_activation and type(module) is ConvBNAct and isinstance(module.act, (nn.LeakyReLU, nn.ReLU6)):
            module.__class__ = FusedConvAct
    fused = sum(isinstance(module, FusedConvAct) for module in optimized.modules())
    if channels_last:
        optimized = optimized.to(memory_format=torch.channels_last)
    compute_dtype = None if dtype in (None, torch.float32) else dtype
    if compute_dtype is not None:
        anchor_bases = optimized.anchor_bases
        optimized = optimized.to(compute_dtype)
        optimized.anchor_bases = anchor_bases  # decoding stays float32
    optimized.__class__ = _optimized_class(getattr(type(model), "inference_base_class", type(model)))
    optimized.inference_channels_last = bool(channels_last)
    optimized.inference_dtype = compute_dtype
    optimized.inference_settings = {
        "fold_bn": bool(fold_bn), "folded_batchnorms": folded, "fused_conv_activations": fused,
        "channels_last": bool(channels_last), "dtype": str(compute_dtype or torch.float32).replace("torch.", ""),
        "compile": compile if isinstance(compile, str) else bool(compile),
    }
    if compile:
        # Set through __dict__: nn.Module would otherwise try to register the list as submodules.
        optimized.__dict__["_all_modules"] = list(optimized.modules())
        mode = compile if isinstance(compile, str) else None
        optimized.__dict__["_compiled_forward"] = torch.compile(optimized.inference_forward, mode=mode)
    return optimized


__all__ = ["CascadedSPP", "FusedConvAct", "fold_all_batchnorms", "fold_batchnorm", "fused_conv_activation_available",
           "optimize_for_inference"]
