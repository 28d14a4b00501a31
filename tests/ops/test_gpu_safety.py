"""What a GPU compiles that the interpreter hides: 32-bit address arithmetic, approximate math in the kernels that
promise bit-exact results, and runtime scalars the JIT specializes.

The interpreter computes with numpy at test sizes, so it can neither reach 2**31-element offsets nor show how
Triton lowers ``/``. The offset helpers run here on index values whose products pass 2**31; the kernels themselves
are compiled for sm_90 as the JIT compiles their launches (``peftkern._aot.kernel_specs``), in one subprocess
without ``TRITON_INTERPRET``: their Triton IR must take every runtime product that reaches an address in 64 bits,
and the PTX of the bit-exact kernels must hold only correctly rounded arithmetic.
"""
from __future__ import annotations

import importlib
import json
import os
import re
import subprocess
import sys

import pytest
import torch
import triton
import triton.language as tl

from peftkern.ops.triton_blocks import offsets, tile_offsets
from tests._helpers import DEVICE

pytestmark = [pytest.mark.triton]

# kernels whose results the tests compare bit for bit with torch / bitsandbytes (codes, absmax, two-rounding
# dequantization, a sum rounded once, the dropout mask the other LoRA kernels regenerate)
BIT_EXACT = ("nf4_quantize_kernel", "nf4_quantize_absmax_kernel", "nf4_dequantize_kernel",
             "sparse_scatter_add_kernel", "lora_dropout_mask_kernel")
PER_CALL = {"seed"}  # runtime ints that change every call: a value divisible by 16 would compile another kernel
ARCH = 90


@triton.jit
def _offsets_probe(out_ptr, row0, col0, stride_r, stride_c, BR: tl.constexpr, BC: tl.constexpr):
    """out [BR + 1, BC]: tile_offsets of rows row0 + i and columns col0 + j, then offsets(row0, stride_r)."""
    i, j = tl.arange(0, BR), tl.arange(0, BC)
    tl.store(out_ptr + i[:, None] * BC + j[None, :], tile_offsets(row0 + i, col0 + j, stride_r, stride_c))
    tl.store(out_ptr + BR * BC + j, offsets(row0, stride_r) + tl.zeros((BC,), dtype=tl.int64))


@triton.jit
def _int32_gather_probe(x_ptr, out_ptr, stride, BR: tl.constexpr, BC: tl.constexpr):
    """What the offset check must catch: a row index times a runtime stride in int32, as an address."""
    rows, cols = tl.arange(0, BR), tl.arange(0, BC)
    tile = tl.load(x_ptr + rows[:, None] * stride + cols[None, :])
    tl.store(out_ptr + rows[:, None] * BC + cols[None, :], tile)


@triton.jit
def _division_probe(x_ptr, out_ptr, BLOCK: tl.constexpr):
    """What the PTX check must catch: ``/`` on fp32 (div.full.f32)."""
    offs = tl.arange(0, BLOCK)
    tl.store(out_ptr + offs, 1.0 / tl.load(x_ptr + offs))


# --------------------------------------------------------------------------- the offset helpers, run as written


@pytest.mark.parametrize("row0, col0, stride_r, stride_c", [
    (2**20, 3, 14336, 1),  # a million tokens of Llama-3-8B's down_proj input: 1.5e10
    (5, 2**17, 1, 2**15),  # a transposed view: column index x column stride passes 2**31
    (7, 0, 2**31 + 16, 1),  # a stride of 2**31 or more (the JIT passes it as int64)
    (0, 0, 3, 1),  # small offsets stay exact
])
def test_offset_helpers_are_64_bit(row0, col0, stride_r, stride_c):
    BR, BC = 4, 8
    out = torch.full((BR + 1, BC), -1, dtype=torch.int64, device=DEVICE)
    _offsets_probe[(1,)](out, row0, col0, stride_r, stride_c, BR=BR, BC=BC)
    rows = torch.arange(row0, row0 + BR, dtype=torch.int64)
    cols = torch.arange(col0, col0 + BC, dtype=torch.int64)
    expected = torch.cat([rows[:, None] * stride_r + cols[None, :] * stride_c,
                          torch.full((1, BC), row0 * stride_r, dtype=torch.int64)])
    assert torch.equal(out.cpu(), expected)


# ----------------------------------------------------------------------- the kernels, compiled as the JIT would


def _family_kernels() -> dict:
    """name -> jit kernel of every family's triton_kernels module (the families registered for "triton")."""
    from peftkern import _aot

    kernels = {}
    for impl in _aot.kernel_modules():
        module = importlib.import_module(impl.rsplit(".", 1)[0] + ".triton_kernels")
        kernels.update({name: obj for name, obj in vars(module).items()
                        if name.endswith("_kernel") and hasattr(obj, "fn") and hasattr(obj, "arg_names")})
    return kernels


def _ttir(source, options: dict) -> str:
    """Triton IR after Triton's TTIR passes (inlined, canonicalized): what the backend lowers, in about 30 ms."""
    from triton._C.libtriton import ir
    from triton.backends.compiler import GPUTarget

    target = GPUTarget("cuda", ARCH, 32)
    backend = triton.compiler.make_backend(target)
    opts = backend.parse_options(options)
    context = ir.context()
    ir.load_dialects(context)
    backend.load_dialects(context)
    module = source.make_ir(target, opts, backend.get_codegen_implementation(opts), backend.get_module_map(), context)
    stages = {}
    backend.add_stages(stages, opts, source.language)
    return stages["ttir"](module, {}).str_nodebug()


def _ptx(source, options: dict) -> str:
    from triton.backends.compiler import GPUTarget

    return triton.compile(source, target=GPUTarget("cuda", ARCH, 32), options=options).asm["ptx"]


def compile_for_checks() -> dict:
    """Run without TRITON_INTERPRET: the TTIR of every kernel launch of ``peftkern._aot.kernel_specs``, the PTX of
    the bit-exact ones (with their launchers' options, FP fusion included), the probes, the JIT's parameters."""
    from peftkern import _aot

    ASTSource = triton.compiler.ASTSource
    ttir, ptx = [], []
    for spec in _aot.kernel_specs(ARCH):
        source = ASTSource(spec.fn, spec.signature, spec.constexprs, spec.attrs)
        ttir.append({"kernel": spec.name, "variant": spec.variant, "text": _ttir(source, spec.options)})
        if spec.name in BIT_EXACT:
            ptx.append({"kernel": spec.name, "variant": spec.variant, "text": _ptx(source, spec.options)})
    gather = ASTSource(_int32_gather_probe, {"x_ptr": "*fp32", "out_ptr": "*fp32", "stride": "i32",
                                             "BR": "constexpr", "BC": "constexpr"}, {"BR": 16, "BC": 16})
    division = ASTSource(_division_probe, {"x_ptr": "*fp32", "out_ptr": "*fp32", "BLOCK": "constexpr"},
                         {"BLOCK": 128})
    params = {name: {"params": [p.name for p in k.params], "unspecialized": [p.name for p in k.params
                                                                            if p.do_not_specialize]}
              for name, k in _family_kernels().items()}
    return {"ttir": ttir, "ptx": ptx, "probe_ttir": _ttir(gather, {}), "probe_ptx": _ptx(division, {}),
            "params": params}


@pytest.fixture(scope="module")
def compiled() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    code = f"import json, {__name__} as t; print(json.dumps(t.compile_for_checks()))"
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    done = subprocess.run([sys.executable, "-c", code], env=env, cwd=root, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


_DEF = re.compile(r"^\s*(%[\w.]+)(?::\d+)? = ([\w.]+) (.*)$")
_I32 = re.compile(r":\s*(?:tensor<[\dx]*xi32>|i32)\s*$")


def int32_address_products(ttir: str) -> list[str]:
    """The int32 products of two runtime values that reach an address (the offset of a ``tt.addptr``), found by
    walking each offset's definitions back to loads and arguments. Products with a constant (``pid * BLOCK``)
    stay: their range is the grid's."""
    defs = {}
    for line in ttir.splitlines():
        m = _DEF.match(line)
        if m:
            name, op, rest = m.groups()
            defs[name] = (op, re.findall(r"%[\w.]+", rest.split(" : ")[0]), line.strip())

    def constant(v: str) -> bool:
        op, args, _ = defs.get(v, ("", [], ""))
        return op == "arith.constant" or (op in ("tt.splat", "tt.broadcast", "tt.expand_dims") and constant(args[0]))

    found, seen = [], set()

    def walk(v: str) -> None:
        if v in seen or v not in defs:
            return
        seen.add(v)
        op, args, line = defs[v]
        if op == "tt.load":
            return
        if op == "arith.muli" and _I32.search(line) and not any(constant(a) for a in args):
            found.append(line)
        for a in args:
            walk(a)

    for op, args, _ in list(defs.values()):
        if op == "tt.addptr":
            walk(args[1])
    return found


def test_offset_check_catches_an_int32_row_times_stride(compiled):
    assert int32_address_products(compiled["probe_ttir"])


def test_every_kernel_takes_runtime_address_products_in_64_bits(compiled):
    checked = {r["kernel"] for r in compiled["ttir"]}
    assert checked == set(compiled["params"]), "a kernel no scenario of peftkern._aot launches goes unchecked"
    bad = {f"{r['kernel']} ({r['variant']})": products for r in compiled["ttir"]
           if (products := int32_address_products(r["text"]))}
    assert not bad, json.dumps(bad, indent=1)


_INSTR = re.compile(r"^\s*(?:@!?%\w+\s+)?([a-z][\w.]*)", re.M)


def inexact_instructions(ptx: str) -> set[str]:
    """fp instructions whose result is not the correctly rounded one torch computes: approximate ones
    (``div.full``, ``div.approx``, ``rcp.approx``, ``ex2.approx``, ...), flush-to-zero ones, and contracted
    multiply-adds (one rounding where torch rounds twice)."""
    return {op for op in _INSTR.findall(ptx)
            if re.search(r"\.(approx|full|ftz)\b", op) or op.startswith("fma.")}


def test_ptx_check_catches_division(compiled):
    assert "div.full.f32" in inexact_instructions(compiled["probe_ptx"])


def test_bit_exact_kernels_compile_to_correctly_rounded_ptx(compiled):
    assert {r["kernel"] for r in compiled["ptx"]} == set(BIT_EXACT)
    bad = {f"{r['kernel']} ({r['variant']})": sorted(ops) for r in compiled["ptx"]
           if (ops := inexact_instructions(r["text"]))}
    assert not bad, bad


def test_per_call_scalars_are_not_specialized(compiled):
    """A seed divisible by 16 (1 in 16 calls) or equal to 1 would otherwise compile and cache another kernel."""
    per_call = {name: PER_CALL & set(k["params"]) for name, k in compiled["params"].items()}
    assert any(per_call.values()), "no kernel takes a seed: PER_CALL names nothing the kernels have"
    specialized = {name: sorted(left) for name, names in per_call.items()
                   if (left := names - set(compiled["params"][name]["unspecialized"]))}
    assert not specialized, specialized
