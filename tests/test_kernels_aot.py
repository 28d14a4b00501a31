"""Every Triton kernel compiles ahead of time for sm_80 and sm_90, as the JIT would compile it, without spills.

No GPU is needed: Triton compiles to PTX and a cubin for a named target, and its bundled ``ptxas -v`` reports
registers and spills. The launches come from each family's ``triton_impl.AOT_SCENARIOS``: its launchers called on
aligned CPU tensors of model sizes, every ``kernel[grid](...)`` recorded, then specialized by Triton's own JIT
binder (16-divisibility of pointers, sizes and strides; ints equal to 1 as constants). The jit functions are
interpreter objects under TRITON_INTERPRET=1, so the compilation runs in a subprocess with it unset
(``peftkern._aot.report``); the family list comes from the backend registry.
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
def compiled(aot_rows) -> list[dict]:
    assert {r["arch"] for r in aot_rows} == set(ARCHS)
    return aot_rows


def _jit_kernels(impl_module: str) -> set[str]:
    kernels = importlib.import_module(impl_module.rsplit(".", 1)[0] + ".triton_kernels")
    return {name for name, obj in vars(kernels).items()
            if name.endswith("_kernel") and not inspect.isfunction(obj) and hasattr(obj, "fn")}


def _jit_marks(kernel, args: tuple, kwargs: dict) -> tuple[frozenset, frozenset]:
    """(runtime arguments marked divisible by 16, {argument: constant} the JIT fixes) of ``kernel[grid](*args,
    **kwargs)``, argument by argument with Triton's own ``KernelParam`` and ``specialize_impl`` (``kernel`` is the
    interpreter's object here, so this is not the gate's path through the JIT binder)."""
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.nvidia.compiler import CUDABackend
    from triton.runtime.jit import KernelParam

    sig = inspect.signature(kernel.fn)
    bound = sig.bind(*args, **{k: v for k, v in kwargs.items() if k in sig.parameters})
    bound.apply_defaults()
    off = {key: set(kernel.kwargs.get(key) or ()) for key in ("do_not_specialize", "do_not_specialize_on_alignment")}
    divisible, fixed = set(), set()
    for i, (name, value) in enumerate(bound.arguments.items()):
        param = KernelParam(i, sig.parameters[name], *(bool({i, name} & off[key]) for key in off))
        if param.is_constexpr:
            continue
        kind, mark = native_specialize_impl(CUDABackend, value, param.is_const, not param.do_not_specialize,
                                            not param.do_not_specialize_on_alignment)
        if kind == "constexpr":
            fixed.add((name, mark))
        elif mark == "D":
            divisible.add(name)
    return frozenset(divisible), frozenset(fixed)


def test_registry_finds_every_family():
    from peftkern import _aot

    assert set(FAMILIES) <= set(_aot.kernel_modules())


@pytest.mark.parametrize("impl_module", FAMILIES)
def test_launchers_leave_the_interpreter_to_block_config(impl_module):
    """The launchers the gate compiles carry no interpreter branch: what the interpreter changes (tiles, bf16
    rounding) is decided in triton_launch (block_config, bf16_cast_truncates), so the code read here is the code a
    GPU runs."""
    source = inspect.getsource(importlib.import_module(impl_module))
    assert "interpret_mode" not in source and "TRITON_INTERPRET" not in source


@pytest.mark.parametrize("impl_module", FAMILIES)
def test_scenarios_launch_every_kernel(impl_module, compiled):
    family = impl_module.split(".")[2]
    for arch in ARCHS:
        launched = {r["kernel"] for r in compiled if r["arch"] == arch and r["kernel"].startswith(family + "_")}
        assert launched == _jit_kernels(impl_module), arch


def test_every_kernel_compiles_for_sm80_and_sm90_without_spills(compiled):
    from peftkern import _aot

    table = _aot.format_table(compiled)
    assert {r["arch"] for r in compiled} == set(ARCHS)
    for r in compiled:
        assert 0 < r["registers"] <= 255, table
        assert r["spill_store_bytes"] == 0 and r["spill_load_bytes"] == 0, f"{r['kernel']} spills\n{table}"
        assert r["gpu"].startswith(f"sm_{r['arch']}"), table


def test_gate_compiles_the_specializations_the_jit_makes(compiled, monkeypatch):
    """The scenarios' launches, recorded here with the interpreter's switch off (the launchers take their GPU
    configurations; nothing runs), marked argument by argument as the JIT marks them, are exactly what the gate
    compiled for sm_80; the spilling kernel of issue 14 among them with its aligned pointers, sizes and strides."""
    from peftkern import _aot

    with monkeypatch.context() as env:
        env.delenv("TRITON_INTERPRET")
        launches = _aot.scenario_launches(80)
    expected = {(launch.kernel.__name__, *_jit_marks(launch.kernel, launch.args, launch.kwargs))
                for _, launch in launches}
    rows = [r for r in compiled if r["arch"] == 80]
    assert {(r["kernel"], frozenset(r["divisible"]), frozenset(r["specialized"].items())) for r in rows} == expected
    dq = [set(r["divisible"]) for r in rows if r["kernel"] == "prefix_attention_bwd_dq_kernel"]
    assert dq and all({"q_ptr", "k_ptr", "do_ptr", "lse_ptr", "delta_ptr", "dq_ptr", "S", "P", "D", "Hq", "stride_qb",
                       "stride_qh", "stride_qs", "stride_ks", "stride_pkp"} <= d for d in dq)
