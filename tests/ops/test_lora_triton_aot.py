"""Every LoRA kernel in ``triton_impl.KERNELS`` compiles ahead of time for sm_80 and sm_90, without spills.

No GPU is needed: Triton compiles to PTX and a cubin for a named target, and its bundled ``ptxas -v`` reports
registers and spills. The jit functions are interpreter objects under TRITON_INTERPRET=1, so the compilation
runs in a subprocess with it unset (``peftkern._aot.report``).
"""
from __future__ import annotations

import inspect

import pytest

from tests._helpers import requires_triton

pytestmark = [requires_triton, pytest.mark.triton]

ARCHS = (80, 90)


@pytest.fixture(scope="module")
def compiled() -> list[dict]:
    from peftkern import _aot

    return _aot.report(ARCHS, timeout=300)


def _jit_kernels() -> set[str]:
    from peftkern.ops.lora import triton_kernels

    return {name for name, obj in vars(triton_kernels).items()
            if name.endswith("_kernel") and not inspect.isfunction(obj) and hasattr(obj, "fn")}


def test_kernel_list_covers_every_kernel():
    from peftkern.ops.lora.triton_impl import KERNELS

    listed = {spec.name for spec in KERNELS}
    assert listed == _jit_kernels()
    assert all(name.startswith("lora_") for name in listed)


def test_every_kernel_compiles_for_sm80_and_sm90_without_spills(compiled):
    from peftkern import _aot
    from peftkern.ops.lora.triton_impl import KERNELS

    table = _aot.format_table(compiled)
    expected = {(spec.name, spec.variant, arch) for spec in KERNELS for arch in ARCHS}
    assert {(r["kernel"], r["variant"], r["arch"]) for r in compiled} == expected, table
    for r in compiled:
        assert 0 < r["registers"] <= 255, table
        assert r["spill_store_bytes"] == 0 and r["spill_load_bytes"] == 0, f"{r['kernel']} spills\n{table}"
        assert r["gpu"].startswith(f"sm_{r['arch']}"), table
