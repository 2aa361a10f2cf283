"""The models a benchmark times: the full-size model with BatchNorm calibrated on noise, its fast paths, the same
network without deformation, and analytic FLOP counts."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from ..inference.fast import optimize_for_inference
from ..models import build_model
from ..models.config import ModelConfig
from ..models.deform_conv import DeformConv2d


def sample_image(size: int, device: torch.device) -> torch.Tensor:
    """A bundled sample image preprocessed to (3, size, size), or noise if the samples are missing."""
    try:
        from ..inference.transforms import preprocess, read_image
        from ..samples import list_samples, sample_path

        tensor, _ = preprocess(read_image(sample_path(list_samples()[0])), size)
    except Exception:  # the benchmark does not depend on the samples; noise times the same
        tensor = torch.randn(3, size, size, generator=torch.Generator().manual_seed(2))
    return tensor.to(device)


OBJECTNESS_PRIOR = 0.01  # the calibrated random model's objectness (as a trained model, few rows pass 0.01)


@torch.no_grad()
def calibrated_model(config: ModelConfig | None = None, *, size: int = 256, seed: int = 0) -> nn.Module:
    """The model of `config` (full-size ASFF by default) with random weights, made to behave like a trained one
    where speed is concerned: BatchNorm statistics computed on a sample image and a noise image, so activations
    keep realistic magnitudes for images and noise alike (no decay into denormals, which would slow a CPU down,
    and no overflowing box sizes), and objectness biased to 0.01 (few candidates above the display threshold,
    as for a trained model). Eval mode, on the CPU.
    """
    from ..training.params import set_objectness_prior

    torch.manual_seed(seed)
    model = build_model(config)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.momentum = None  # cumulative average: one batch sets the statistics
            module.reset_running_stats()
    model.train()
    model(torch.stack([sample_image(size, torch.device("cpu")), torch.randn(3, size, size)]))
    set_objectness_prior(model, OBJECTNESS_PRIOR)
    return model.eval()


class PlainConvInsteadOfDeform(nn.Module):
    """A deformable conv's weights used as a plain 3x3 conv (offsets ignored): the issue-2 comparison."""

    def __init__(self, deform: DeformConv2d) -> None:
        super().__init__()
        self.weight, self.bias = deform.weight, deform.bias
        self.stride, self.padding, self.dilation = deform.stride, deform.padding, deform.dilation

    def forward(self, x: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation)


def without_deformation(model: nn.Module) -> nn.Module:
    """A copy of `model` whose head convs ignore their offsets (same FLOPs, no sampling)."""
    if any(level.adaption is None for level in model.head.levels):
        raise ValueError(f"the {model.config.variant} model has no deformable conv (no feature adaption)")
    copied = copy.deepcopy(model)
    for level in copied.head.levels:
        level.adaption.dconv = PlainConvInsteadOfDeform(level.adaption.dconv)
    return copied


def model_flops(model: nn.Module, size: int) -> dict:
    """FLOPs of one forward at batch 1: conv and matmul (MACs x 2, counted by FlopCounterMode on the model as
    built) plus the deformable convs' bilinear sampling (4 corners x 2 per sampled value)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(torch.zeros(1, 3, size, size, device=next(model.parameters()).device))
    counts = {str(op): int(n) for op, n in counter.get_flop_counts().get("Global", {}).items()}
    # The MobileNetV2 heads have no feature adaption, hence no deformable conv.
    deformable = [(level.adaption.dconv, stride) for level, stride in zip(model.head.levels, model.strides, strict=True)
                  if level.adaption is not None]
    sampling = 0
    for dconv, stride in deformable:
        _, channels, kernel_h, kernel_w = dconv.weight.shape
        sampling += 8 * channels * kernel_h * kernel_w * (size // stride) ** 2
    matmul = sum(n for op, n in counts.items() if "mm" in op)
    deform_matmul = sum(2 * dconv.weight.numel() * (size // stride) ** 2 for dconv, stride in deformable)
    total = sum(counts.values()) + sampling
    return {"gflop": total / 1e9, "conv_gflop": counts.get("aten.convolution", 0) / 1e9, "matmul_gflop": matmul / 1e9,
            "deform_sampling_gflop": sampling / 1e9, "deform_share_of_flops": (deform_matmul + sampling) / total}


def inference_variants(model: nn.Module, device: torch.device, *, with_bf16: bool,
                       compile: bool | str) -> dict:
    """The model as built and its fast paths (`asff_viz.inference.fast`), on `device`."""
    variants = {"eager_fp32": model.to(device), "fast_fp32": optimize_for_inference(model).to(device)}
    if compile:
        variants["fast_fp32_compiled"] = optimize_for_inference(model, compile=compile).to(device)
    if with_bf16:
        variants["fast_bf16"] = optimize_for_inference(model, dtype=torch.bfloat16).to(device)
        if compile:
            variants["fast_bf16_compiled"] = optimize_for_inference(model, dtype=torch.bfloat16,
                                                                    compile=compile).to(device)
    return variants
