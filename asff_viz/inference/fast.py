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
* `pack_weights` (CPU, on when oneDNN runs the dtype, off with `compile`): every conv (and, in bf16, the
  deformable convs' matrix product) uses oneDNN's blocked copy of its weight, packed once per weight version and
  input shape (`PackedWeight`) instead of reordered on every call; the same arithmetic up to round-off (on a
  Xeon with AMX bit-identical in fp32, and in bf16 at 416 and 608; 2e-4 of the outputs' scale in bf16 at 320).
  Used only without autograd; the plain weight stays the parameter, so state_dict, hooks and gradients are unchanged.
* `cpu_chunk_pixels` (CPU inference without hooks or autograd): a batch runs a few images at a time (at most
  this many pixels per chunk: two 416-px images in float32, two 608-px ones in bf16, by default) and the
  outputs are concatenated, so that each chunk's activations stay nearer the cache; on large batches of large
  images the whole batch at once runs 1.1-1.5x slower. Each image's outputs are its own either way.
* `compile`: `torch.compile` of the forward (the first calls compile; each new input shape recompiles). While
  any submodule carries a hook (fusion capture, attributions) the forward runs eagerly instead, because a
  compiled graph would not call hooks registered after it was traced.

Always applied, exact: the SPP block's 9x9 and 13x13 stride-1 max pools become two and three chained 5x5 pools
(a max over a 9-window is the max of the 5-window maxima inside it), which is what YOLOv5's SPPF does; and
without autograd a residual block adds its input into its last conv's output in place (`InPlaceResidual`; the
same sum, one pass over memory fewer), unless a hook observes that conv.
"""

from __future__ import annotations

import copy
import functools

import torch
import torch.nn.functional as F
from torch import nn

from ..models.blocks import SPP, Bottleneck, ConvBNAct
from ..models.deform_conv import DeformConv2d, deform_conv2d
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


def weight_packing_available() -> bool:
    """True when this PyTorch can pack weights for oneDNN ahead of time (`PackedWeight`)."""
    return fused_conv_activation_available() and all(
        hasattr(torch.ops.mkldnn, op) for op in ("_reorder_convolution_weight", "_reorder_linear_weight",
                                                 "_linear_pointwise"))


def _pointwise(act: nn.Module) -> tuple[str, list[float]]:
    """The oneDNN post-op of an activation: LeakyReLU(a) is leaky_relu [a], ReLU6 is hardtanh [0, 6]."""
    if isinstance(act, nn.LeakyReLU):
        return "leaky_relu", [act.negative_slope]
    if isinstance(act, nn.ReLU6):
        return "hardtanh", [0.0, 6.0]
    raise TypeError(f"no fused kernel for {type(act).__name__}")


class PackedWeight:
    """oneDNN's blocked copy of a weight for one input shape, made on first use and made again whenever the
    weight or the input shape changes.

    oneDNN convolves (and, with AMX, multiplies) in a blocked weight layout chosen for the shapes at hand; given
    a plain weight it reorders it on every call, which costs as much as the convolution itself where the weights
    are large and the map small (a 512 -> 1024 3x3 conv at 13 x 13: 2.6 ms in bf16, 1.0 ms with the weight
    packed once). The layout is chosen for the input shape (a layout chosen without one made a 2048 -> 512 1x1
    float32 conv 20x slower), so the copy is keyed by it and by the weight's storage, version, dtype and shape:
    an in-place update, `.to()` or `load_state_dict` makes a new one. It is a cache: one entry, never copied (a
    deep copy starts empty) nor pickled.
    """

    __slots__ = ("entry",)

    def __init__(self) -> None:
        self.entry: tuple[tuple, torch.Tensor] | None = None

    def __reduce__(self):  # copy.deepcopy and pickle both rebuild it empty
        return PackedWeight, ()

    def get(self, weight: torch.Tensor, input_shape: tuple[int, ...], pack) -> torch.Tensor:
        """The packed weight for inputs of `input_shape`; `pack(weight, input_shape)` makes it."""
        key = (weight.data_ptr(), weight._version, weight.dtype, tuple(weight.shape), weight.stride(), input_shape)
        entry = self.entry  # one read: another thread may replace it meanwhile
        if entry is None or entry[0] != key:
            entry = (key, pack(weight, input_shape))
            self.entry = entry
        return entry[1]


def _packing_possible(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """A oneDNN packed weight serves this call: CPU inference (no autograd), float32 or bf16, no compile trace,
    and a weight that is not an inference tensor (those keep no version to key the packed copy on)."""
    return (not torch.compiler.is_compiling() and x.device.type == "cpu" and weight.device.type == "cpu"
            and weight.dtype in (torch.float32, torch.bfloat16) and not weight.is_inference()
            and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)))


def _packed(module: nn.Module, weight: torch.Tensor, input_shape: tuple[int, ...], pack) -> torch.Tensor:
    cache = module.__dict__.get("_packed_weight")
    if cache is None:  # the class was swapped in (no __init__): the cache is made on first use
        cache = module.__dict__["_packed_weight"] = PackedWeight()
    return cache.get(weight, input_shape, pack)


class PackedConv2d(nn.Conv2d):
    """An `nn.Conv2d` that, in CPU inference, convolves with oneDNN's packed copy of its weight (`PackedWeight`);
    otherwise (autograd, GPU, a compile trace) the plain `nn.Conv2d` forward. Same parameters and results."""

    def can_pack(self, x: torch.Tensor) -> bool:
        """The packed weight can serve this input (`_packing_possible`, zero padding given as numbers)."""
        return (_packing_possible(x, self.weight) and self.padding_mode == "zeros"
                and not isinstance(self.padding, str))

    def packs_for(self, x: torch.Tensor) -> bool:
        """`can_pack`, and the input is computed in the weight's dtype, as autocast (the fast bf16 model) or no
        cast would."""
        weight = self.weight
        return self.can_pack(x) and (x.dtype == weight.dtype or (torch.is_autocast_enabled("cpu")
                                                                 and torch.get_autocast_dtype("cpu") == weight.dtype))

    def packed_forward(self, x: torch.Tensor, attr: str = "none", scalars: list[float] | None = None) -> torch.Tensor:
        """oneDNN conv + bias (+ the pointwise `attr`, e.g. leaky_relu) with the packed weight."""
        weight = self.weight
        packed = _packed(self, weight, tuple(x.shape), self._pack)
        return torch.ops.mkldnn._convolution_pointwise(
            x.to(weight.dtype), packed, self.bias, list(self.padding), list(self.stride), list(self.dilation),
            self.groups, attr, scalars or [], "")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.packs_for(x):
            return self.packed_forward(x)
        return super().forward(x)

    def _pack(self, weight: torch.Tensor, input_shape: tuple[int, ...]) -> torch.Tensor:
        return torch.ops.mkldnn._reorder_convolution_weight(weight, list(self.padding), list(self.stride),
                                                            list(self.dilation), self.groups, list(input_shape))


class PackedDeformConv2d(DeformConv2d):
    """A `DeformConv2d` whose bf16 CPU inference multiplies the sampled columns with oneDNN's packed copy of its
    (O, 9 C) kernel (AMX's layout, made once, `PackedWeight`): the same products, 10-25 % faster on the model's
    shapes. float32 keeps `torch.addmm`, whose BLAS is as fast there."""

    def forward(self, x: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
        weight = self.weight
        if self.use_torchvision or weight.dtype != torch.bfloat16 or not _packing_possible(x, weight):
            return super().forward(x, offset)
        kernel = _packed(self, weight, (), _pack_deform_kernel)
        return deform_conv2d(x, offset, weight, self.bias, self.stride, self.padding, self.dilation,
                             packed_kernel=kernel)


def _pack_deform_kernel(weight: torch.Tensor, _input_shape: tuple[int, ...]) -> torch.Tensor:
    """(O, C, kh, kw) -> oneDNN's packed (O, kh * kw * C) linear weight, in the columns' (tap, channel) order."""
    kernel = weight.permute(0, 2, 3, 1).reshape(weight.shape[0], -1).contiguous()
    return torch.ops.mkldnn._reorder_linear_weight(kernel)


class FusedConvAct(ConvBNAct):
    """A `ConvBNAct` whose BN is folded, computed as one oneDNN conv + bias + activation (LeakyReLU or ReLU6)
    on CPU, with the conv's packed weight (`PackedConv2d`) where it has one.

    Same submodules (`conv`, `bn` = Identity, `act`) and parameters as the ConvBNAct it replaces; falls back to
    conv then activation on other devices, other dtypes, or when autograd records the forward.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        conv = self.conv
        weight = conv.weight
        if (x.device.type != "cpu" or weight.dtype not in (torch.float32, torch.bfloat16)
                or (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))):
            return self.act(self.bn(conv(x)))
        attr, scalars = _pointwise(self.act)
        # Outside autocast the first layer receives the float32 image while the weights may be bf16.
        if isinstance(conv, PackedConv2d) and conv.can_pack(x):
            return conv.packed_forward(x, attr, scalars)
        return torch.ops.mkldnn._convolution_pointwise(
            x.to(weight.dtype), weight, conv.bias, list(conv.padding), list(conv.stride), list(conv.dilation),
            conv.groups, attr, scalars, "")


class InPlaceResidual(Bottleneck):
    """A residual `Bottleneck` that, without autograd, adds its input into the output of its last conv in place
    instead of into a new tensor: the same sum, one allocation and one pass over memory fewer (in bf16 the
    residual adds were a tenth of a forward). Out of place while anything hooks the last conv, whose output a
    hook may have kept."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.expand(self.reduce(x))
        if not self.shortcut:
            return out
        recorded = torch.is_grad_enabled() and (x.requires_grad or out.requires_grad)
        same_result = out.shape == x.shape and out.dtype == torch.promote_types(out.dtype, x.dtype)
        if recorded or not same_result or hooks_registered(list(self.expand.modules())):
            return x + out
        return out.add_(x)


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
        inference_chunk_pixels: int = 0

        def forward(self, images: torch.Tensor):  # type: ignore[override]
            compiled = self.__dict__.get("_compiled_forward")
            # A compiled graph does not see hooks added after it was traced, so while any module is hooked
            # (fusion capture, attributions) the forward runs eagerly and the hooks fire as usual.
            if compiled is not None and not hooks_registered(self.__dict__["_all_modules"]):
                return compiled(images)
            # Hooked modules (capture, attributions) and autograd see whole batches, as on the model as built.
            recorded = torch.is_grad_enabled() or hooks_registered(self.__dict__["_all_modules"])
            per_chunk = None if recorded else self.images_per_chunk(images)
            if per_chunk is None:
                return self.inference_forward(images)
            chunks = [self.inference_forward(chunk) for chunk in images.split(per_chunk)]
            # Level by level, field by field (prediction, anchor shapes): the chunks' outputs in batch order.
            return [type(outputs[0])(*(torch.cat(field) for field in zip(*outputs, strict=True)))
                    for outputs in zip(*chunks, strict=True)]

        def images_per_chunk(self, images: torch.Tensor) -> int | None:
            """How many images of this CPU batch run at a time, or None for the whole batch at once: chunks of
            at most `inference_chunk_pixels` pixels (at least one image), whose activations stay nearer the
            cache. The forward applies it without autograd and hooks; callers that hook the model (the dataset
            traces) split their batches by it themselves."""
            budget = self.inference_chunk_pixels
            if not budget or images.dim() != 4 or images.device.type != "cpu":
                return None
            per_chunk = max(1, budget // (images.shape[-2] * images.shape[-1]))
            return per_chunk if per_chunk < images.shape[0] else None

        def inference_forward(self, images: torch.Tensor):
            if self.inference_channels_last and images.dim() == 4:
                images = images.contiguous(memory_format=torch.channels_last)
            if self.inference_dtype is None:
                return super().forward(images)
            with torch.autocast(images.device.type, dtype=self.inference_dtype):
                return super().forward(images)

    Optimized.__name__ = Optimized.__qualname__ = f"Optimized{base.__name__}"
    return Optimized


# Pixels per chunk of a CPU batch (`cpu_chunk_pixels`). Measured on a 2-core Xeon with AMX at batch 8: one or
# two 416-px images at a time run 1.2x faster than the whole batch in float32 (one 608-px image: 1.3x); in bf16,
# four 416-px images (1.1x) or two 608-px ones (1.5x); single images are slower in bf16 (0.84x at 416).
CHUNK_PIXELS = {torch.float32: 2 * 416 * 416, torch.bfloat16: 2 * 608 * 608, torch.float16: 2 * 608 * 608}


def optimize_for_inference(model: nn.Module, *, fold_bn: bool = True, channels_last: bool = True,
                           dtype: torch.dtype | None = None, compile: bool | str = False,
                           fuse_activation: bool | None = None, pack_weights: bool | None = None,
                           cpu_chunk_pixels: int | None = None) -> nn.Module:
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
        pack_weights: in CPU inference, convolve (and, in bf16, multiply the deformable convs' columns) with
            oneDNN's packed copies of the weights, made once; None = whenever oneDNN runs this dtype here and
            the forward is not compiled (inductor lays out the weights of a compiled graph itself).
        cpu_chunk_pixels: in CPU inference without hooks, a batch runs in chunks of images of at most this many
            pixels in all (at least one image), whose activations stay nearer the cache; the outputs are the
            whole batch's. None = `CHUNK_PIXELS` of the dtype (2 x 416^2 in float32, 2 x 608^2 in bf16); 0 = whole
            batches. Not with `compile`.
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
    if pack_weights is None:
        pack_weights = not compile and weight_packing_available() and (
            dtype != torch.bfloat16 or torch.ops.mkldnn._is_mkldnn_bf16_supported())
    elif pack_weights and compile:
        raise ValueError("pack_weights=True does not go with compile: a compiled graph takes its weights as they are")
    elif pack_weights and not weight_packing_available():
        raise RuntimeError("pack_weights=True needs a PyTorch build with oneDNN (torch.backends.mkldnn)")
    if cpu_chunk_pixels is None:
        chunk_pixels = 0 if compile else CHUNK_PIXELS[dtype or torch.float32]
    elif cpu_chunk_pixels < 0 or (cpu_chunk_pixels and compile):
        raise ValueError(f"cpu_chunk_pixels must be 0 (whole batches) or positive, and 0 with compile; got "
                         f"{cpu_chunk_pixels}")
    else:
        chunk_pixels = int(cpu_chunk_pixels)
    optimized = copy.deepcopy(model).eval()
    for name in ("_compiled_forward", "_all_modules"):  # an already optimized model: start from its eager copy
        optimized.__dict__.pop(name, None)
    folded = fold_all_batchnorms(optimized) if fold_bn else 0
    for module in optimized.modules():
        if type(module) is SPP:
            module.__class__ = CascadedSPP
        elif type(module) is Bottleneck:
            module.__class__ = InPlaceResidual
        elif fuse_activation and type(module) is ConvBNAct and isinstance(module.act, (nn.LeakyReLU, nn.ReLU6)):
            module.__class__ = FusedConvAct
        elif pack_weights and type(module) is nn.Conv2d:
            module.__class__ = PackedConv2d
        elif pack_weights and type(module) is DeformConv2d:
            module.__class__ = PackedDeformConv2d
    fused = sum(isinstance(module, FusedConvAct) for module in optimized.modules())
    packed = sum(isinstance(module, (PackedConv2d, PackedDeformConv2d)) for module in optimized.modules())
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
    optimized.inference_chunk_pixels = chunk_pixels
    optimized.__dict__["_all_modules"] = list(optimized.modules())  # for the hook checks; no submodule registered
    optimized.inference_settings = {
        "fold_bn": bool(fold_bn), "folded_batchnorms": folded, "fused_conv_activations": fused,
        "packed_weights": packed,
        "channels_last": bool(channels_last), "dtype": str(compute_dtype or torch.float32).replace("torch.", ""),
        "compile": compile if isinstance(compile, str) else bool(compile), "cpu_chunk_pixels": chunk_pixels,
    }
    if compile:
        mode = compile if isinstance(compile, str) else None
        optimized.__dict__["_compiled_forward"] = torch.compile(optimized.inference_forward, mode=mode)
    return optimized


__all__ = ["CascadedSPP", "FusedConvAct", "InPlaceResidual", "PackedConv2d", "PackedDeformConv2d", "PackedWeight",
           "fold_all_batchnorms", "fold_batchnorm", "fused_conv_activation_available", "optimize_for_inference",
           "weight_packing_available"]
