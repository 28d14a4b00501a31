import os

import torch

# Triton kernels run on the CPU interpreter where no GPU exists; this must precede any triton import.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from peftkern import backend  # noqa: E402


@pytest.fixture(autouse=True)
def _reset_backend():
    """Each test starts with no explicit backend (environment or auto decides)."""
    backend._state.__dict__.clear()
    yield
    backend._state.__dict__.clear()


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread per test: the tests' tensors are too small to split, and a second OpenMP thread waiting
    for a core another process holds stalls every op (measured on 2 busy cores: a real-model QLoRA step 10x slower
    in wall time, and 10x the CPU time, on 2 threads than on 1; on a quiet machine 2 threads gain ~1.2x)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def aot_rows() -> list[dict]:
    """Every Triton kernel compiled ahead of time for sm_80 and sm_90 (``peftkern._aot.report``, ~15-30 s), once a
    session: the kernels gate (tests/test_kernels_aot.py) and ``peftkern kernels`` (tests/test_cli.py) read them."""
    from peftkern import _aot

    return _aot.report((80, 90), timeout=480)
