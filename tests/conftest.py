
import pytest
import torch

# Tests use tiny models: one thread avoids oversubscribing the shared cores and is faster for them.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
