import os

import torch

# Triton kernels run on the CPU interpreter where no GPU exists; this must precede any triton import.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import peftkern as pk  # noqa: E402


@pytest.fixture(autouse=True)
def _reset_backend():
    pk.set_backend("auto")
    yield
    pk.set_backend("auto")
