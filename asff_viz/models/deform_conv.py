"""Deformable convolution (DCNv1, no modulation) in pure PyTorch: CPU and GPU, differentiable.

Semantics follow the official CUDA extension (and `torchvision.ops.deform_conv2d`): the offset tensor
(B, 2 * groups * kh * kw, H_out, W_out) holds, for deformable group g and kernel tap k = i * kw + j, dy at
channel g * 2 * kh * kw + 2k and dx at the next channel. Tap k of output (h, w) samples the input at
(h * stride - pad + i * dilation + dy, w * stride - pad + j * dilation + dx) bilinearly; corners outside the
input count as zero, so a sample is zero once it is a full pixel outside.

Two implementations compute this:

* `deform_conv2d` (used by `DeformConv2d`): bilinear sampling as one `F.embedding_bag` over the input read as
  a table of per-pixel channel vectors (NHWC), each sample a bag of its four corners weighted by the bilinear
  coefficients; then one matrix product. Sampling reads contiguous channel vectors instead of gathering one
  value per channel, the sampling coordinates are computed in float32 whatever the compute dtype (a bf16 pixel
  coordinate would be off by up to a pixel), and the output keeps the input's memory format, so a
  channels-last model stays channels-last with no copy of the weight.
* `deform_conv2d_grid_sample`: one `grid_sample` over all taps and groups (NCHW). Kept as a second, independent
  implementation for tests and benchmarks.

`deform_conv2d` differentiates the sampling itself: the features' gradient is added into the table corner by
corner, a few MB of samples at a time (`_SampleColumns`); the offsets' gradient is a separate node
(`_CornerWeights`) that a backward for the features alone never runs. In CPU inference it samples and multiplies
`CHUNK_PIXELS` output pixels at a time.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def _output_size(height: int, width: int, kernel_h: int, kernel_w: int, stride: int, padding: int,
                 dilation: int) -> tuple[int, int]:
    out_h = (height + 2 * padding - dilation * (kernel_h - 1) - 1) // stride + 1
    out_w = (width + 2 * padding - dilation * (kernel_w - 1) - 1) // stride + 1
    return out_h, out_w


def _check_shapes(input: torch.Tensor, offset: torch.Tensor, weight: torch.Tensor, stride: int, padding: int,
                  dilation: int) -> tuple[int, int, int]:
    """Validate the shapes; returns (deformable groups, H_out, W_out)."""
    _, channels, height, width = input.shape
    _, weight_channels, kernel_h, kernel_w = weight.shape
    if weight_channels != channels:
        raise ValueError(f"weight expects {weight_channels} input channels, input has {channels}")
    taps = kernel_h * kernel_w
    groups = offset.shape[1] // (2 * taps)
    if groups == 0 or groups * 2 * taps != offset.shape[1] or channels % groups != 0:
        raise ValueError(f"offset channels {offset.shape[1]} do not fit {taps} taps and {channels} channels")
    out_h, out_w = _output_size(height, width, kernel_h, kernel_w, stride, padding, dilation)
    if tuple(offset.shape[-2:]) != (out_h, out_w):
        raise ValueError(f"offset spatial size {tuple(offset.shape[-2:])} != output size {(out_h, out_w)}")
    return groups, out_h, out_w


def _sampling_corners(offset: torch.Tensor, height: int, width: int, kernel_h: int, kernel_w: int, stride: int,
                      padding: int, dilation: int, groups: int, coordinate_dtype: torch.dtype
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """Table rows and bilinear weights of the four corners of every sample, for the padded table.

    The table (see `_padded_table`) holds the input with one zero row/column before and two after, so every
    corner of a sample whose position is clamped to [-1, size] is addressable and corners outside the input
    read zeros; a sample further out is clamped onto zeros too, and the clamp zeroes its offset gradient.
    Returns index (B * H_out * W_out * taps * G, 4) int64 rows of the (B * (H + 3) * (W + 3) * G, C / G) table and
    weights of the same shape, samples ordered (b, h_out, w_out, tap, group), corners (y0, x0), (y0, x1),
    (y1, x0), (y1, x1).
    """
    batch, _, out_h, out_w = offset.shape
    taps = kernel_h * kernel_w
    device = offset.device
    rows = torch.arange(out_h, device=device, dtype=coordinate_dtype) * stride - padding
    cols = torch.arange(out_w, device=device, dtype=coordinate_dtype) * stride - padding
    tap_i = (torch.arange(kernel_h, device=device, dtype=coordinate_dtype) * dilation).repeat_interleave(kernel_w)
    tap_j = (torch.arange(kernel_w, device=device, dtype=coordinate_dtype) * dilation).repeat(kernel_h)
    # (B, G, taps, 2, H_out, W_out) -> (B, H_out, W_out, taps, G, 2), the order of the columns (a free view for a
    # channels-last offset tensor).
    offset = offset.view(batch, groups, taps, 2, out_h, out_w).permute(0, 4, 5, 2, 1, 3)
    offset = offset.contiguous().to(coordinate_dtype)
    y = (offset[..., 0] + (rows.view(out_h, 1, 1, 1) + tap_i.view(1, 1, taps, 1))).clamp(-1, height)
    x = (offset[..., 1] + (cols.view(1, out_w, 1, 1) + tap_j.view(1, 1, taps, 1))).clamp(-1, width)
    y0, x0 = torch.floor(y), torch.floor(x)
    frac_y, frac_x = y - y0, x - x0  # (B, H_out, W_out, taps, G)
    rest_y, rest_x = 1 - frac_y, 1 - frac_x
    # The four corners' products one by one: a broadcast over (2, 1) x (1, 2) inner dims runs ~5x slower.
    weights = torch.stack((rest_y * rest_x, rest_y * frac_x, frac_y * rest_x, frac_y * frac_x), dim=-1)
    padded_width = width + 3
    # Integer clamps also catch NaN offsets, whose conversion is undefined.
    top = y0.long().clamp_(-1, height) + 1 + torch.arange(batch, device=device).view(batch, 1, 1, 1, 1) * (height + 3)
    left = x0.long().clamp_(-1, width) + 1
    first = (top * padded_width + left) * groups + torch.arange(groups, device=device)
    # Row steps to the four corners, (0, 1, W + 3, W + 4) x G, built on the device (no host-to-device copy).
    steps = torch.arange(2, device=device)
    corners = (steps.view(2, 1) * padded_width + steps.view(1, 2)).view(4) * groups
    index = first.unsqueeze(-1) + corners
    return index.view(-1, 4), weights.view(-1, 4)


def _padded_table(input: torch.Tensor, groups: int) -> torch.Tensor:
    """The input as a table of channel vectors: (B * (H + 3) * (W + 3) * G, C / G), row (b, y + 1, x + 1, group),
    zero rows around the image (one before, two after, see `_sampling_corners`)."""
    batch, channels, height, width = input.shape
    table = input.new_zeros(batch, height + 3, width + 3, channels)
    table[:, 1:height + 1, 1:width + 1] = input.permute(0, 2, 3, 1)
    return table.view(batch * (height + 3) * (width + 3) * groups, channels // groups)


BACKWARD_CHUNK_BYTES = 2 << 20  # samples' gradient handled at a time by the sampling backward (see `_backward_chunks`)


def _backward_chunks(grad_columns: torch.Tensor) -> list[slice]:
    """Row ranges of `grad_columns` (N, C / G) of about `BACKWARD_CHUNK_BYTES` each."""
    rows = max(1, BACKWARD_CHUNK_BYTES // max(1, grad_columns.shape[1] * grad_columns.element_size()))
    return [slice(start, start + rows) for start in range(0, grad_columns.shape[0], rows)]


class _SampleColumns(torch.autograd.Function):
    """`F.embedding_bag(index, table, mode="sum", per_sample_weights=weights)` differentiated with respect to the
    table only, with a backward that adds each corner's weighted output gradient into its table rows
    (`index_add_`, four calls) instead of `embedding_bag`'s dense backward, which sorts every sample index first
    (a fifth of a training step, a third of a gradient-flow pass). The weights' gradient is `_CornerWeights`'."""

    @staticmethod
    def forward(ctx, table: torch.Tensor, index: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(index, weights)
        ctx.table_shape = table.shape
        # Detached, embedding_bag runs its forward-only kernel (with a table that requires grad it also builds
        # the bookkeeping of its own backward, which is never used here: 3x the time).
        return F.embedding_bag(index, table.detach(), mode="sum", per_sample_weights=weights)

    @staticmethod
    def backward(ctx, grad_columns: torch.Tensor):
        index, weights = ctx.saved_tensors
        grad_table = grad_columns.new_zeros(ctx.table_shape)
        # A few MB of samples at a time: each corner's weighted gradient stays in cache for its index_add_
        # (whole, at 416 batch 8, the stride-8 head's are 50-200 MB per corner; 1.6-2.4x faster in chunks).
        for rows in _backward_chunks(grad_columns):
            for corner in range(index.shape[1]):
                grad_table.index_add_(0, index[rows, corner], grad_columns[rows] * weights[rows, corner:corner + 1])
        return grad_table, None, None


class _CornerWeights(torch.autograd.Function):
    """Zero in the forward; in the backward, the gradient of the samples with respect to their corner weights,
    d columns[n] / d weights[n, c] = table[index[n, c]]. A node of its own, so that a backward that needs no
    offset gradient (the analyses, with respect to features) never runs it."""

    @staticmethod
    def forward(ctx, table: torch.Tensor, index: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(table, index)
        return table.new_zeros(()).expand(index.shape[0], table.shape[1])

    @staticmethod
    def backward(ctx, grad_columns: torch.Tensor):
        table, index = ctx.saved_tensors
        grad_weights = grad_columns.new_empty(index.shape, dtype=torch.promote_types(table.dtype, grad_columns.dtype))
        for rows in _backward_chunks(grad_columns):  # as `_SampleColumns.backward`
            for corner in range(index.shape[1]):
                grad_weights[rows, corner] = (table.index_select(0, index[rows, corner])
                                              * grad_columns[rows]).sum(dim=1)
        return None, None, grad_weights


def _sample_columns(table: torch.Tensor, index: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """The bilinear samples: rows of `table` summed over the four corners with `weights`, (N, C / G)."""
    if not table.requires_grad:  # inference, or a gradient for the offsets only
        return F.embedding_bag(index, table, mode="sum", per_sample_weights=weights)
    columns = _SampleColumns.apply(table, index, weights.detach())
    if weights.requires_grad:
        columns = columns + _CornerWeights.apply(table.detach(), index, weights)
    return columns


CHUNK_PIXELS = 1024  # output pixels sampled at a time in CPU inference (see `deform_conv2d`)


def deform_conv2d(
    input: torch.Tensor,
    offset: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    stride: int = 1,
    padding: int = 0,
    dilation: int = 1,
    *,
    packed_kernel: torch.Tensor | None = None,
) -> torch.Tensor:
    """Deformable convolution of `input` (B, C, H, W) with `weight` (O, C, kh, kw) at `offset`.

    All taps of all groups are sampled with one `embedding_bag` (no Python loop over positions), giving the
    columns (B * H_out * W_out, kh * kw * C), which one matrix product turns into the output.
    `packed_kernel`, for CPU inference on a channels-last input: `weight` as oneDNN's packed (O, kh * kw * C)
    linear weight (`torch.ops.mkldnn._reorder_linear_weight`, taps then channels), used for that product when
    the columns have its dtype (`asff_viz.inference.fast.PackedDeformConv2d`).
    Returns (B, O, H_out, W_out), channels-last when `input` is channels-last.
    """
    batch, channels, height, width = input.shape
    out_channels, _, kernel_h, kernel_w = weight.shape
    groups, out_h, out_w = _check_shapes(input, offset, weight, stride, padding, dilation)
    taps = kernel_h * kernel_w
    coordinate_dtype = torch.float64 if torch.float64 in (input.dtype, offset.dtype) else torch.float32
    index, corner_weights = _sampling_corners(offset, height, width, kernel_h, kernel_w, stride, padding, dilation,
                                              groups, coordinate_dtype)
    table = _padded_table(input, groups)
    corner_weights = corner_weights.to(table.dtype)
    # Weight in (O, tap, channel) order: a free view when the weight is channels-last (NHWC parameters).
    kernel = weight.permute(0, 2, 3, 1).reshape(out_channels, taps * channels)
    autocast = torch.is_autocast_enabled(input.device.type)
    if not autocast and bias is not None:
        bias = bias.to(kernel.dtype)
    per_pixel = taps * groups  # rows of `index` per output pixel

    def columns_of(start: int, stop: int) -> torch.Tensor:
        """The sampled columns of output pixels start..stop, (stop - start, taps * C): row (b, h_out, w_out)."""
        columns = _sample_columns(table, index[start * per_pixel:stop * per_pixel],
                                  corner_weights[start * per_pixel:stop * per_pixel])
        # Mixed dtypes outside autocast (e.g. bf16 features, float32 weight): compute in the weight's dtype.
        return columns.view(stop - start, taps * channels).to(columns.dtype if autocast else kernel.dtype)

    def product(columns: torch.Tensor) -> torch.Tensor:
        if packed_kernel is not None and columns.dtype == packed_kernel.dtype:
            return torch.ops.mkldnn._linear_pointwise(
                columns, packed_kernel, None if bias is None else bias.to(columns.dtype), "none", [], "")
        return torch.addmm(bias, columns, kernel.t()) if bias is not None else torch.mm(columns, kernel.t())

    pixels = batch * out_h * out_w
    if input.is_contiguous(memory_format=torch.channels_last) and not input.is_contiguous():
        # (B * H_out * W_out, O): output pixels as rows, which is the channels-last layout, written directly.
        needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad
                                                     for t in (input, offset, weight, bias))
        if input.device.type != "cpu" or needs_grad or pixels <= CHUNK_PIXELS:
            out = product(columns_of(0, pixels))
        else:
            # Without autograd on a CPU, a chunk of output pixels at a time: its columns stay in cache for the
            # product (at 608, batch 8 the stride-8 head's columns alone are 426 MB; 1.3x faster in chunks).
            out = None
            for start in range(0, pixels, CHUNK_PIXELS):
                stop = min(pixels, start + CHUNK_PIXELS)
                chunk = product(columns_of(start, stop))
                if out is None:
                    out = chunk.new_empty(pixels, out_channels)
                out[start:stop] = chunk
        return out.view(batch, out_h, out_w, out_channels).permute(0, 3, 1, 2)
    columns = columns_of(0, pixels)
    out = torch.matmul(kernel, columns.view(batch, out_h * out_w, taps * channels).transpose(1, 2))  # (B, O, HW)
    out = out.view(batch, out_channels, out_h, out_w)
    if bias is not None:
        out = out + bias.view(1, -1, 1, 1)
    return out


def deform_conv2d_grid_sample(
    input: torch.Tensor,
    offset: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    stride: int = 1,
    padding: int = 0,
    dilation: int = 1,
) -> torch.Tensor:
    """`deform_conv2d` through `grid_sample` (NCHW): an independent implementation, for tests and benchmarks.

    All taps of all groups are sampled with one `grid_sample` call (no Python loop over positions), then the
    sampled columns (B, C * kh * kw, H_out * W_out) are multiplied with the flattened weight.
    Returns (B, O, H_out, W_out).
    """
    batch, channels, height, width = input.shape
    out_channels, _, kernel_h, kernel_w = weight.shape
    groups, out_h, out_w = _check_shapes(input, offset, weight, stride, padding, dilation)
    taps = kernel_h * kernel_w
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
