import pytest
import torch

_THREADS = torch.get_num_threads()


@pytest.fixture(autouse=True)
def _torch_threads_unchanged():
    """No test may leave torch's thread count changed (a 1-thread leak halves the suite's speed)."""
    yield
    leaked = torch.get_num_threads()
    torch.set_num_threads(_THREADS)
    assert leaked == _THREADS, f"the test left torch at {leaked} threads instead of {_THREADS}"
