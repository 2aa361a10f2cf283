"""Deformable convolution (DCNv1, no modulation) in pure PyTorch: CPU and GPU, differentiable.

Semantics follow the official CUDA extension (and `torchvision.ops.deform_conv2d`): the offset tensor
(B, 2 * groups * kh * kw, H_out, W_out) holds, for deformable group g and kernel tap k = i * kw + j, dy at
channel g * 2 * kh * kw + 2k and dx at the next channel. Tap k of output (h, w) samples the input at
(h * stride - pad + i * dilation + dy, w * stride - pad + j * dilation + dx) bilinearly; corners outside the
input count as zero, so a sample is zero once it is a full pixel outside.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def deform_conv2d(
    input: torch.Tensor,
    offset: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    stride: int = 1,
    padding: int = 0,
    dilation: int = 1,
) -> torch.Tensor:
    """Deformable convolution of `input` (B, C, H, W) with `weight` (O, C, kh, kw) at `offset`.

    All taps of all groups are sampled with one `grid_sample` call (no Python loop over positions), then the
    sampled columns (B, C * kh * kw, H_out * W_out) are multiplied with the flattened weight.
    Returns (B, O, H_out, W_out).
    """
    batch, channels, height, width = input.shape
    out_channels, weight_channels, kernel_h, kernel_w = weight.shape
    if weight_channels != channels:
        raise ValueError(f"weight expects {weight_channels} input channels, input has {channels}")
    taps = kernel_h * kernel_w
    groups = offset.shape[1] // (2 * taps)
    if groups * 2 * taps != offset.shape[1] or channels % groups != 0:
        raise ValueError(f"offset channels {offset.shape[1]} do not fit {taps} taps and {channels} channels")
    out_h = (height + 2 * padding - dilation * (kernel_h - 1) - 1) // stride + 1
    out_w = (width + 2 * padding - dilation * (kernel_w - 1) - 1) // stride + 1
    if offset.shape[-2:] != (out_h, out_w):
        raise ValueError(f"offset spatial size {tuple(offset.shape[-2:])} != output size {(out_h, out_w)}")

    dtype, device = offset.dtype, offset.device
    # Regular sampling grid of every tap, (taps, H_out, W_out) for y and x.
    rows = torch.arange(out_h, device=device, dtype=dtype) * stride - padding
    cols = torch.arange(out_w, device=device, dtype=dtype) * stride - padding
    tap_i = (torch.arange(kernel_h, device=device, dtype=dtype) * dilation).repeat_interleave(kernel_w)
    tap_j = (torch.arange(kernel_w, device=device, dtype=dtype) * dilation).repeat(kernel_h)
    base_y = tap_i[:, None, None] + rows[None, :, None]
    base_x = tap_j[:, None, None] + cols[None, None, :]

    offset = offset.view(batch, groups, taps, 2, out_h, out_w)
    y = offset[:, :, :, 0] + base_y  # (B, G, taps, H_out, W_out)
    x = offset[:, :, :, 1] + base_x
    # grid_sample with align_corners=False places pixel p at normalized (2p + 1) / size - 1; zero padding then
    # gives exactly the DCN boundary rule (out-of-range corners are zero).
    grid = torch.stack(((2 * x + 1) / width - 1, (2 * y + 1) / height - 1), dim=-1)
    grid = grid.view(batch * groups, taps * out_h, out_w, 2)
    sampled = F.grid_sample(
        input.reshape(batch * groups, channels // groups, height, width).to(grid.dtype),
        grid,
        mode="bilinear",
        padding_mode="zeros",
        align_corners=False,
    )  # (B * G, C / G, taps * H_out, W_out)
    columns = sampled.view(batch, channels * taps, out_h * out_w).to(weight.dtype)
    out = torch.matmul(weight.reshape(out_channels, channels * taps), columns)  # (B, O, H_out * W_out)
    out = out.view(batch, out_channels, out_h, out_w)
    if bias is not None:
        out = out + bias.view(1, -1, 1, 1)
    return out


def _torchvision_deform_conv2d():
    """torchvision's compiled op when it imports (a fast path on GPU machines), else None."""
    try:
        from torchvision.ops import deform_conv2d as op  # noqa: PLC0415
    except Exception:  # torchvision absent, or a build that does not match this torch
        return None
    return op


class DeformConv2d(nn.Module):
    """3x3 deformable convolution with bias, `groups` deformable groups (official `DeformConv2d`, DCNv1).

    `use_torchvision=True` routes to `torchvision.ops.deform_conv2d` when it imports; results are equal to
    the pure-PyTorch path up to float round-off (tested where torchvision is present).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        stride: int = 1,
        padding: int = 1,
        dilation: int = 1,
        groups: int = 4,
        bias: bool = True,
    ) -> None:
        super().__init__()
        self.stride, self.padding, self.dilation, self.groups = stride, padding, dilation, groups
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, kernel_size, kernel_size))
        self.bias = nn.Parameter(torch.empty(out_channels)) if bias else None
        self.use_torchvision = False
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            fan_in = self.weight.shape[1] * self.weight.shape[2] * self.weight.shape[3]
            bound = 1 / math.sqrt(fan_in)
            nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
        if self.use_torchvision:
            op = _torchvision_deform_conv2d()
            if op is not None:
                return op(x, offset, self.weight, self.bias, stride=self.stride, padding=self.padding,
                          dilation=self.dilation)
        return deform_conv2d(x, offset, self.weight, self.bias, self.stride, self.padding, self.dilation)

    def extra_repr(self) -> str:
        out_channels, in_channels, kh, _ = self.weight.shape
        return (f"{in_channels}, {out_channels}, kernel_size={kh}, stride={self.stride}, padding={self.padding}, "
                f"groups={self.groups}")
