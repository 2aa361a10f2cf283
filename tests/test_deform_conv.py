"""Deformable convolution: equal to plain convolution for integer offsets, to a direct reference otherwise."""

import pytest
import torch
import torch.nn.functional as F

from asff_viz.models.deform_conv import DeformConv2d, _torchvision_deform_conv2d, deform_conv2d


def direct_reference(x, offset, weight, bias, padding=1):
    """Slow loop-by-loop DCNv1 straight from the definition (bilinear, zero outside)."""
    batch, channels, height, width = x.shape
    out_channels, _, kh, kw = weight.shape
    groups = offset.shape[1] // (2 * kh * kw)
    per_group = channels // groups
    out = torch.zeros(batch, out_channels, height, width, dtype=torch.float64)

    def pixel(b, c, y, x_):
        if 0 <= y < height and 0 <= x_ < width:
            return float(x[b, c, y, x_])
        return 0.0

    for b in range(batch):
        for h in range(height):
            for w in range(width):
                column = torch.zeros(channels, kh, kw, dtype=torch.float64)
                for c in range(channels):
                    g = c // per_group
                    for i in range(kh):
                        for j in range(kw):
                            k = i * kw + j
                            y = h - padding + i + float(offset[b, g * 2 * kh * kw + 2 * k, h, w])
                            xx = w - padding + j + float(offset[b, g * 2 * kh * kw + 2 * k + 1, h, w])
                            if not (-1 < y < height and -1 < xx < width):
                                continue
                            y0, x0 = int(torch.floor(torch.tensor(y))), int(torch.floor(torch.tensor(xx)))
                            ly, lx = y - y0, xx - x0
                            column[c, i, j] = ((1 - ly) * (1 - lx) * pixel(b, c, y0, x0)
                                               + (1 - ly) * lx * pixel(b, c, y0, x0 + 1)
                                               + ly * (1 - lx) * pixel(b, c, y0 + 1, x0)
                                               + ly * lx * pixel(b, c, y0 + 1, x0 + 1))
                out[b, :, h, w] = (weight.double() * column).sum(dim=(1, 2, 3)) + bias.double()
    return out


def test_zero_offset_equals_conv2d():
    x = torch.randn(2, 8, 9, 7)
    weight, bias = torch.randn(6, 8, 3, 3), torch.randn(6)
    offset = torch.zeros(2, 4 * 18, 9, 7)
    expected = F.conv2d(x, weight, bias, padding=1)
    torch.testing.assert_close(deform_conv2d(x, offset, weight, bias, padding=1), expected, atol=1e-5, rtol=1e-5)


def test_integer_offsets_equal_shifted_conv2d():
    x = torch.randn(1, 8, 10, 10)
    weight, bias = torch.randn(4, 8, 3, 3), torch.randn(4)
    dy, dx = 2, -1  # every tap of every group moves by the same whole pixels: a conv of the shifted input
    offset = torch.zeros(1, 4, 9, 2, 10, 10)
    offset[:, :, :, 0], offset[:, :, :, 1] = dy, dx
    # Tap (i, j) of output (h, w) reads x[h - 1 + i + dy, w - 1 + j + dx]: a plain conv over a zero-padded
    # input, read out at the shifted position.
    full = F.conv2d(F.pad(x, (4, 4, 4, 4)), weight, bias)
    expected = full[:, :, 3 + dy: 13 + dy, 3 + dx: 13 + dx]
    result = deform_conv2d(x, offset.view(1, 72, 10, 10), weight, bias, padding=1)
    torch.testing.assert_close(result, expected, atol=1e-5, rtol=1e-5)


def test_fractional_offsets_match_direct_reference():
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(1, 8, 5, 6, generator=generator)
    weight, bias = torch.randn(3, 8, 3, 3, generator=generator), torch.randn(3, generator=generator)
    # Offsets up to +-3 px send many samples across the border, exercising the zero-padding rule.
    offset = (torch.rand(1, 72, 5, 6, generator=generator) - 0.5) * 6
    expected = direct_reference(x, offset, weight, bias)
    torch.testing.assert_close(deform_conv2d(x, offset, weight, bias, padding=1).double(), expected,
                               atol=1e-4, rtol=1e-4)


def test_gradients_flow_to_input_offset_and_weight():
    x = torch.randn(1, 8, 6, 6, requires_grad=True)
    offset = (torch.randn(1, 72, 6, 6) * 0.7).requires_grad_()
    module = DeformConv2d(8, 4, 3, padding=1, groups=4)
    module(x, offset).square().sum().backward()
    for tensor in (x.grad, offset.grad, module.weight.grad, module.bias.grad):
        assert tensor is not None and torch.isfinite(tensor).all() and tensor.abs().sum() > 0


def test_offset_gradient_matches_finite_differences():
    x = torch.randn(1, 4, 5, 5, dtype=torch.float64)
    weight, bias = torch.randn(2, 4, 3, 3, dtype=torch.float64), torch.randn(2, dtype=torch.float64)
    # Keep samples away from integer positions, where bilinear interpolation has kinks.
    offset = (torch.rand(1, 72, 5, 5, dtype=torch.float64) * 0.6 + 0.2).requires_grad_()
    assert torch.autograd.gradcheck(lambda o: deform_conv2d(x, o, weight, bias, padding=1), (offset,))


@pytest.mark.parametrize("stride, channels_last", [(1, False), (2, True)])
def test_input_gradient_at_fixed_offsets(stride, channels_last, monkeypatch):
    from asff_viz.models import deform_conv

    # The features' gradient takes its own sampling backward (index_add_ per corner): it must be the derivative,
    # at offsets inside, on the edge and far outside the input (clamped, zero rows).
    generator = torch.Generator().manual_seed(5)
    x = torch.randn(2, 8, 6, 7, dtype=torch.float64, generator=generator)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    weight = torch.randn(3, 8, 3, 3, dtype=torch.float64, generator=generator)
    out_h, out_w = (6 - 1) // stride + 1, (7 - 1) // stride + 1
    offset = torch.rand(2, 4 * 18, out_h, out_w, dtype=torch.float64, generator=generator) * 6 - 3
    offset[:, :4] = 40.0  # taps far outside the input
    x.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda i: deform_conv2d(i, offset, weight, None, stride=stride, padding=1), (x,))
    # The same gradient as embedding_bag's own backward (summed in another order: double round-off).
    upstream = torch.randn(2, 3, out_h, out_w, dtype=torch.float64, generator=generator)
    ours = torch.autograd.grad(deform_conv2d(x, offset, weight, stride=stride, padding=1), x, upstream)[0]
    monkeypatch.setattr(deform_conv, "_sample_columns", lambda table, index, weights: F.embedding_bag(
        index, table, mode="sum", per_sample_weights=weights))
    theirs = torch.autograd.grad(deform_conv2d(x, offset, weight, stride=stride, padding=1), x, upstream)[0]
    torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-12)


def test_input_and_offset_gradients_together(monkeypatch):
    # Training differentiates both: the features through the index_add_ backward, the offsets through the
    # corner weights' own node; both against finite differences and the independent grid_sample implementation.
    from asff_viz.models import deform_conv
    from asff_viz.models.deform_conv import deform_conv2d_grid_sample

    generator = torch.Generator().manual_seed(8)
    x = torch.randn(1, 8, 5, 6, dtype=torch.float64, generator=generator).requires_grad_()
    weight = torch.randn(3, 8, 3, 3, dtype=torch.float64, generator=generator).requires_grad_()
    offset = (torch.rand(1, 36, 5, 6, dtype=torch.float64, generator=generator) * 0.6 + 0.2).requires_grad_()
    assert torch.autograd.gradcheck(lambda i, o, w: deform_conv2d(i, o, w, None, padding=1), (x, offset, weight))
    upstream = torch.randn(1, 3, 5, 6, dtype=torch.float64, generator=generator)
    ours = torch.autograd.grad(deform_conv2d(x, offset, weight, padding=1), (x, offset, weight), upstream)
    theirs = torch.autograd.grad(deform_conv2d_grid_sample(x, offset, weight, padding=1), (x, offset, weight),
                                 upstream)
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)

    # A backward for the features only never runs the corner weights' node (the analyses' case).
    def refuse(ctx, grad):
        raise AssertionError("the offsets' gradient was computed though not asked for")

    monkeypatch.setattr(deform_conv._CornerWeights, "backward", staticmethod(refuse))
    torch.autograd.grad(deform_conv2d(x, offset, weight, padding=1), x, upstream)


@pytest.mark.skipif(_torchvision_deform_conv2d() is None, reason="torchvision does not import here")
def test_torchvision_fast_path_equal():
    x, offset = torch.randn(1, 8, 7, 7), torch.randn(1, 72, 7, 7)
    module = DeformConv2d(8, 8, 3, padding=1, groups=4)
    ours = module(x, offset)
    module.use_torchvision = True
    torch.testing.assert_close(module(x, offset), ours, atol=1e-4, rtol=1e-4)


def test_sampling_backward_in_chunks_equals_whole(monkeypatch):
    # The sampling backward handles a few MB of samples at a time; split into many small chunks (a chunk boundary
    # inside a pixel's taps and corners), both gradients stay those of the whole: features and offsets, float64.
    from asff_viz.models import deform_conv

    generator = torch.Generator().manual_seed(11)
    x = torch.randn(2, 8, 5, 6, dtype=torch.float64, generator=generator).requires_grad_()
    weight = torch.randn(3, 8, 3, 3, dtype=torch.float64, generator=generator)
    offset = (torch.rand(2, 72, 5, 6, dtype=torch.float64, generator=generator) * 4 - 2).requires_grad_()
    upstream = torch.randn(2, 3, 5, 6, dtype=torch.float64, generator=generator)
    whole = torch.autograd.grad(deform_conv2d(x, offset, weight, padding=1), (x, offset), upstream)
    chunks = []
    split = deform_conv._backward_chunks
    monkeypatch.setattr(deform_conv, "BACKWARD_CHUNK_BYTES", 7 * 2 * 8)  # 7 samples of 2 channels per group
    monkeypatch.setattr(deform_conv, "_backward_chunks", lambda grad: chunks.append(split(grad)) or chunks[-1])
    chunked = torch.autograd.grad(deform_conv2d(x, offset, weight, padding=1), (x, offset), upstream)
    assert [len(c) for c in chunks] == [-(-2 * 30 * 9 * 4 // 7)] * 2  # both nodes ran in chunks of 7 samples
    for a, b in zip(chunked, whole, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(whole[0], torch.autograd.grad(
        deform_conv.deform_conv2d_grid_sample(x, offset, weight, padding=1), x, upstream)[0], rtol=1e-9, atol=1e-9)
