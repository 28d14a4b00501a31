"""Every Triton kernel of every family compiles ahead of time for sm_80 and sm_90, without spills.

No GPU is needed: Triton compiles to PTX and a cubin for a named target, and its bundled ``ptxas -v`` reports
registers and spills. The jit functions are interpreter objects under TRITON_INTERPRET=1, so the compilation
runs in a subprocess with it unset (``peftkern._aot.report``). The kernel list comes from the backend registry:
each family whose ops are registered for "triton" lists its kernels in ``triton_impl.KERNELS``.
"""
from __future__ import annotations

import importlib
import inspect

import pytest


pytestmark = [pytest.mark.triton]

ARCHS = (80, 90)
FAMILIES = ["peftkern.ops.lora.triton_impl", "peftkern.ops.multi_lora.triton_impl", "peftkern.ops.nf4.triton_impl",
            "peftkern.ops.prefix_attention.triton_impl", "peftkern.ops.sparse.triton_impl",
            "peftkern.ops.adapter.triton_impl"]


@pytest.fixture(scope="module")
def compiled() -> list[dict]:
    from peftkern import _aot

    return _aot.report(ARCHS, timeout=480)


def _jit_kernels(impl_module: str) -> set[str]:
    kernels = importlib.import_module(impl_module.rsplit(".", 1)[0] + ".triton_kernels")
    return {name for name, obj in vars(kernels).items()
            if name.endswith("_kernel") and not inspect.isfunction(obj) and hasattr(obj, "fn")}


def test_registry_finds_every_family():
    from peftkern import _aot

    assert set(FAMILIES) <= set(_aot.kernel_modules())


@pytest.mark.parametrize("impl_module", FAMILIES)
def test_kernel_list_covers_every_kernel(impl_module):
    family = impl_module.split(".")[2]
    listed = {spec.name for spec in importlib.import_module(impl_module).KERNELS}
    assert listed == _jit_kernels(impl_module)
    assert all(name.startswith(family + "_") for name in listed)


def test_every_kernel_compiles_for_sm80_and_sm90_without_spills(compiled):
    from peftkern import _aot

    table = _aot.format_table(compiled)
    expected = {(spec.name, spec.variant, arch) for spec in _aot.kernel_specs() for arch in ARCHS}
    assert {(r["kernel"], r["variant"], r["arch"]) for r in compiled} == expected, table
    for r in compiled:
        assert 0 < r["registers"] <= 255, table
        assert r["spill_store_bytes"] == 0 and r["spill_load_bytes"] == 0, f"{r['kernel']} spills\n{table}"
        assert r["gpu"].startswith(f"sm_{r['arch']}"), table
