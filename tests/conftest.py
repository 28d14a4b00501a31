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
