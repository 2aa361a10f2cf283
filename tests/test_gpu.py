"""CUDA paths against the CPU: the model, the deformable conv (and torchvision's op when it imports), capture,
the gradient decomposition and the fast paths. Run by `make gpu-check`; skipped without a CUDA device."""

from __future__ import annotations

import pytest
import torch

from asff_viz import capture
from asff_viz.introspection.decomposition import decompose_gradients
from asff_viz.introspection.objectives import SumOfScores
from asff_viz.models import build_model
from asff_viz.models.deform_conv import deform_conv2d
from tests.conftest import calibrate_batchnorm

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

SIZE = 128


@pytest.fixture(autouse=True)
def _exact_float32():
    """TF32 would round float32 matmuls and convs to 10-bit mantissas: compare in true float32."""
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn


def calibrated(backbone: str = "darknet53") -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_model(backbone=backbone, width=0.25, depth=0.33, num_classes=8)
    return calibrate_batchnorm(model, [torch.randn(2, 3, SIZE, SIZE)]).eval()


@pytest.mark.parametrize("backbone", ["darknet53", "mobilenet_v2"])
def test_the_model_on_cuda_equals_the_cpu(backbone):
    model = calibrated(backbone)
    images = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        cpu = model.decode(model(images))
        cuda = model.to("cuda").decode(model(images.cuda())).cpu()
    scale = cpu[..., 4:].abs().max()
    torch.testing.assert_close(cuda[..., 4:], cpu[..., 4:], rtol=0, atol=1e-4 * scale)
    torch.testing.assert_close(cuda[..., :2], cpu[..., :2], rtol=1e-4, atol=1e-3)


def test_deform_conv_on_cuda_equals_the_cpu_and_torchvision():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 16, 20, 24, generator=generator, dtype=torch.float64)
    weight = torch.randn(8, 4, 3, 3, generator=generator, dtype=torch.float64)
    offset = 2.0 * torch.randn(2, 4 * 18, 20, 24, generator=generator, dtype=torch.float64)
    bias = torch.randn(8, generator=generator, dtype=torch.float64)
    cpu = deform_conv2d(x, offset, weight, bias, padding=1)
    cuda = deform_conv2d(x.cuda(), offset.cuda(), weight.cuda(), bias.cuda(), padding=1).cpu()
    torch.testing.assert_close(cuda, cpu, rtol=1e-10, atol=1e-10)
    try:
        import torchvision.ops
    except Exception:  # a torchvision that does not import next to this torch: ours alone is checked
        pytest.skip("torchvision does not import here")
    reference = torchvision.ops.deform_conv2d(x.cuda(), offset.cuda(), weight.cuda(), bias.cuda(), padding=1)
    torch.testing.assert_close(cuda, reference.cpu(), rtol=1e-10, atol=1e-10)


def test_capture_on_cuda_records_what_the_cpu_records():
    model = calibrated()
    images = torch.randn(1, 3, SIZE, SIZE)
    with capture(model) as recorder, torch.no_grad():
        model(images)
    cpu = [w.clone() for w in recorder.fusion_weights]
    model.cuda()
    with capture(model) as recorder, torch.no_grad():
        model(images.cuda())
    for level in range(3):
        torch.testing.assert_close(recorder.fusion_weights[level].cpu(), cpu[level], rtol=1e-4, atol=1e-5)


def test_gradient_decomposition_on_cuda_equals_the_cpu():
    model = calibrated().double()
    image = torch.randn(3, SIZE, SIZE, dtype=torch.float64)
    cpu = decompose_gradients(model, image, SumOfScores())
    cuda = decompose_gradients(model.cuda(), image.cuda(), SumOfScores())
    for level in range(3):
        for source in range(3):
            torch.testing.assert_close(cuda.value[level][source].cpu(), cpu.value[level][source],
                                       rtol=1e-8, atol=1e-10)


def test_the_fast_paths_on_cuda():
    from asff_viz.inference.fast import optimize_for_inference

    model = calibrated()
    images = torch.randn(4, 3, SIZE, SIZE)
    with torch.no_grad():
        reference = model.decode(model(images))
        for dtype, tolerance in ((None, 1e-3), (torch.bfloat16, 0.1)):
            fast = optimize_for_inference(model, dtype=dtype).cuda()
            scores = fast.decode(fast(images.cuda())).cpu()[..., 4]
            assert (scores - reference[..., 4]).abs().max() < tolerance, dtype
