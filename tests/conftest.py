"""Shared test set-up, and how the suite stays machine-independent.

CI runs on whichever CPU is at hand (an Intel Xeon with AMX, an AMD EPYC with AVX-512 but no AMX, ...), and
oneDNN picks its kernels by CPU, batch size, layout and grad mode. So:

- Bit-identity is asserted only between computations that run the same kernels on the same inputs: the same
  model, batch, dtype and grad mode (a capture hook against a plain forward, a save/load round trip, a resumed run
  against an uninterrupted one, two DDP ranks on one machine). Never across grad modes, batch sizes, layouts or
  fast paths.
- Across kernels (BatchNorm folding, channels-last, batched vs single, no_grad vs autograd), float32 results are
  compared with tolerances taken from the dtype and the network's conditioning: relative to each output's own
  scale, or measured against a float64 forward of the same network (a fast path may be off by a few times the
  plain float32 path's own error from float64; see `test_fast.py`). bf16 results are held to plain autocast's error.
- Ties that round-off can break (equal scores in NMS order) are compared as sets, not positions.
- Timings are measured and reported, never asserted against a bound.
- Tests run on one thread (below): fewer sources of reduction-order nondeterminism, and no oversubscription.

Whether a change holds on a machine without AMX can be checked here with `ONEDNN_MAX_CPU_ISA=AVX512_CORE_BF16`
(or `AVX2`) in the environment, which makes oneDNN use the kernels such a CPU has.
"""

import pytest
import torch

# Tests use tiny models: one thread avoids oversubscribing the shared cores and is faster for them.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def calibrate_batchnorm(model: torch.nn.Module, batches, momentum_after: float | None = None) -> torch.nn.Module:
    """BatchNorm statistics that match the activations: reset, then a cumulative average over `batches` (train
    mode, no gradients). A freshly built network's statistics (mean 0, var 1) let its activations shrink or grow
    layer by layer, so weights and scores of a random tiny model would be degenerate. The model is left in train
    mode; `momentum_after` restores a running-average momentum for later training steps."""
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.momentum = None
            module.reset_running_stats()
    model.train()
    with torch.no_grad():
        for batch in batches:
            model(batch)
    if momentum_after is not None:
        for module in model.modules():
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                module.momentum = momentum_after
    return model
