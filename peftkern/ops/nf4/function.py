"""The NF4 functional API and :class:`NF4Tensor`, the bitsandbytes-compatible container (``pk.nf4``)."""
from __future__ import annotations

import json
import math
from typing import Optional

import torch

from torch import Tensor

from ... import _validate as V
from ...backend import get_backend, resolve, run
from .. import custom_op as custom_ops
from ..custom_op import custom_op, rows, unrows
from ..lora.function import check_adapter_args, new_seed, seed_int
from . import torch_impl
from .torch_impl import NESTED_BLOCKSIZE, dynamic_code, nf4_code

BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class NF4Tensor:
    """A weight quantized to NF4, in bitsandbytes' layout.

    ``packed`` uint8 [ceil(n/2), 1] (two codes per byte, high nibble first); ``blocksize``; ``shape`` and ``dtype``
    of the original. Without double quantization ``absmax`` fp32 [blocks]; with it ``qabsmax`` uint8 [blocks],
    ``absmax2`` fp32 [ceil(blocks/256)] and ``offset`` fp32 0-d. ``code`` / ``code8`` are the 4-bit and nested 8-bit
    tables (bitsandbytes' by default; a loaded state keeps its own).
    """

    def __init__(self, packed: torch.Tensor, shape, dtype: torch.dtype, blocksize: int, *,
                 absmax: Optional[torch.Tensor] = None, qabsmax: Optional[torch.Tensor] = None,
                 absmax2: Optional[torch.Tensor] = None, offset: Optional[torch.Tensor] = None,
                 code: Optional[torch.Tensor] = None, code8: Optional[torch.Tensor] = None,
                 nested_blocksize: int = NESTED_BLOCKSIZE):
        self.packed = packed
        self.shape = torch.Size(shape)
        self.dtype = dtype
        self.blocksize = int(blocksize)
        self.absmax, self.qabsmax, self.absmax2, self.offset = absmax, qabsmax, absmax2, offset
        self.code = code if code is not None else nf4_code(packed.device)
        self.code8 = code8 if code8 is not None or qabsmax is None else dynamic_code(packed.device)
        self.nested_blocksize = int(nested_blocksize)
        V.checked(_check_state, self.packed, self.shape, self.blocksize, self.absmax, self.qabsmax, self.absmax2,
                  self.offset, self.code8, self.nested_blocksize)

    @property
    def double_quant(self) -> bool:
        return self.qabsmax is not None

    @property
    def device(self) -> torch.device:
        return self.packed.device

    def numel(self) -> int:
        return self.shape.numel()

    def block_absmax(self) -> torch.Tensor:
        """The fp32 absmax of every block (decoded from the 8-bit state with double quantization)."""
        if not self.double_quant:
            return self.absmax
        # a few plain torch ops on 1/16 of the weight's bytes: any device, and torch.compile traces them
        return torch_impl.dequantize_absmax(self.qabsmax, self.absmax2, self.offset, self.code8,
                                            self.nested_blocksize)

    def dequantize(self) -> torch.Tensor:
        _, impl = resolve("nf4_dequantize", self.device)
        return impl(self)

    def storage_bytes(self) -> int:
        """Bytes of the quantized weight and its scales (the shared code tables excluded)."""
        parts = (self.packed, self.absmax, self.qabsmax, self.absmax2, self.offset)
        return sum(t.numel() * t.element_size() for t in parts if t is not None)

    def bits_per_parameter(self) -> float:
        return 8.0 * self.storage_bytes() / self.numel()

    def to(self, device) -> "NF4Tensor":
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return NF4Tensor(move(self.packed), self.shape, self.dtype, self.blocksize, absmax=move(self.absmax),
                         qabsmax=move(self.qabsmax), absmax2=move(self.absmax2), offset=move(self.offset),
                         code=move(self.code), code8=move(self.code8), nested_blocksize=self.nested_blocksize)

    def to_bnb(self):
        """(packed, bitsandbytes ``QuantState``) holding the same bits (needs bitsandbytes)."""
        from bitsandbytes.functional import QuantState

        if not self.double_quant:
            return self.packed, QuantState(absmax=self.absmax, shape=self.shape, code=self.code,
                                           blocksize=self.blocksize, quant_type="nf4", dtype=self.dtype)
        state2 = QuantState(absmax=self.absmax2, code=self.code8, blocksize=self.nested_blocksize,
                            dtype=torch.float32)
        return self.packed, QuantState(absmax=self.qabsmax, shape=self.shape, code=self.code,
                                       blocksize=self.blocksize, quant_type="nf4", dtype=self.dtype,
                                       offset=self.offset, state2=state2)

    @classmethod
    def from_bnb(cls, packed: torch.Tensor, quant_state) -> "NF4Tensor":
        """The NF4Tensor of a bitsandbytes (packed, QuantState) pair, losslessly; fp4 states are refused."""
        qs = quant_state
        if getattr(qs, "quant_type", None) != "nf4":
            raise ValueError(f"quant_state.quant_type must be 'nf4', got {getattr(qs, 'quant_type', None)!r} "
                             f"(fp4 and 8-bit states are not NF4)")
        packed = packed.view(torch.uint8).reshape(-1, 1)
        if qs.nested:
            return cls(packed, qs.shape, qs.dtype, qs.blocksize, qabsmax=qs.absmax.reshape(-1),
                       absmax2=qs.state2.absmax.float().reshape(-1), offset=torch.as_tensor(qs.offset).float(),
                       code=qs.code.float(), code8=qs.state2.code.float(), nested_blocksize=qs.state2.blocksize)
        return cls(packed, qs.shape, qs.dtype, qs.blocksize, absmax=qs.absmax.float().reshape(-1), code=qs.code.float())

    def state_dict_items(self) -> dict:
        """The bitsandbytes / transformers 4-bit checkpoint entries, keys relative to the weight's name: ``""`` (the
        packed codes), ``absmax``, ``quant_map``, [``nested_absmax``, ``nested_quant_map``],
        ``quant_state.bitsandbytes__nf4`` (the other fields as JSON bytes, in bitsandbytes' order)."""
        meta = {"quant_type": "nf4", "blocksize": self.blocksize, "dtype": _dtype_name(self.dtype),
                "shape": list(self.shape)}
        items = {"": self.packed, "absmax": self.qabsmax if self.double_quant else self.absmax, "quant_map": self.code}
        if self.double_quant:
            items.update({"nested_absmax": self.absmax2, "nested_quant_map": self.code8})
            meta.update({"nested_blocksize": self.nested_blocksize, "nested_dtype": "float32",
                         "nested_offset": self.offset.item()})
        items["quant_state.bitsandbytes__nf4"] = torch.tensor(list(json.dumps(meta).encode("utf-8")),
                                                              dtype=torch.uint8)
        return items

    @classmethod
    def from_state_dict_items(cls, items: dict, device=None) -> "NF4Tensor":
        """The inverse of :meth:`state_dict_items` (a bitsandbytes Linear4bit's entries load too)."""
        key = next((k for k in items if k.startswith("quant_state.bitsandbytes__")), None)
        if key is None:
            raise ValueError(f"no quant_state.bitsandbytes__nf4 entry among {sorted(items)}")
        if key != "quant_state.bitsandbytes__nf4":
            raise ValueError(f"only NF4 checkpoints load, got {key!r} (fp4 is not NF4)")
        meta = json.loads(bytes(items[key].cpu().tolist()).decode("utf-8"))
        device = device if device is not None else items[""].device
        get = lambda k: items[k].to(device)  # noqa: E731
        common = dict(code=get("quant_map").float())
        dtype = getattr(torch, meta["dtype"])
        # the codes in any quant_storage dtype, without the padding to whole storage elements
        packed = get("").view(-1).view(torch.uint8)[: (torch.Size(meta["shape"]).numel() + 1) // 2].view(-1, 1)
        if "nested_absmax" in items:
            return cls(packed, meta["shape"], dtype, meta["blocksize"],
                       qabsmax=get("absmax").reshape(-1), absmax2=get("nested_absmax").float().reshape(-1),
                       offset=torch.tensor(float(meta["nested_offset"]), device=device),
                       code8=get("nested_quant_map").float(), nested_blocksize=meta["nested_blocksize"], **common)
        return cls(packed, meta["shape"], dtype, meta["blocksize"], absmax=get("absmax").float().reshape(-1), **common)

    def __repr__(self) -> str:
        return (f"NF4Tensor(shape={tuple(self.shape)}, dtype={self.dtype}, blocksize={self.blocksize}, "
                f"double_quant={self.double_quant}, {self.bits_per_parameter():.3f} bits/parameter)")


def _check_state(packed, shape, blocksize, absmax, qabsmax, absmax2, offset, code8, nested_blocksize) -> None:
    """An NF4Tensor's tensors fit its shape and blocksizes (an NF4Linear builds one every call: checked once).
    Blocksizes are powers of two, as bitsandbytes' (the CUDA kernels find an element's block by a shift)."""
    for name, size in (("blocksize", blocksize), ("nested_blocksize", nested_blocksize)):
        if size < 2 or size & (size - 1):
            raise ValueError(f"{name} must be a power of two >= 2, got {size}")
    n = shape.numel()
    blocks = -(-n // blocksize)
    V.shape("packed", packed, ((n + 1) // 2, 1), "[ceil(n/2), 1] uint8")
    if packed.dtype != torch.uint8:
        raise TypeError(f"packed must be uint8, got {packed.dtype}")
    if qabsmax is not None:
        V.shape("qabsmax", qabsmax, (blocks,), "[blocks] uint8")
        V.shape("absmax2", absmax2, (-(-blocks // nested_blocksize),), "[ceil(blocks/256)] fp32")
        if offset is None or code8 is None:
            raise ValueError("double quantization needs offset and code8")
    elif absmax is None:
        raise ValueError("an NF4Tensor needs absmax, or qabsmax + absmax2 + offset (double quantization)")
    else:
        V.shape("absmax", absmax, (blocks,), "[blocks] fp32")


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def quantize(w: torch.Tensor, blocksize: int = 64, double_quant: bool = True) -> NF4Tensor:
    """NF4-quantize ``w`` (any shape, fp32/fp16/bf16) in blocks of ``blocksize`` over the flat tensor, bit-exact with
    bitsandbytes' ``quantize_4bit(quant_type="nf4", compress_statistics=double_quant)``."""
    V.tensor("w", w)
    if w.dtype not in _DTYPES:
        raise TypeError(f"w must be float32, float16 or bfloat16, got {w.dtype}")
    if w.numel() == 0:
        raise ValueError("w is empty: nothing to quantize")
    if isinstance(blocksize, bool) or blocksize not in BLOCKSIZES:
        raise ValueError(f"blocksize must be one of {BLOCKSIZES}, got {blocksize!r}")
    if not isinstance(double_quant, bool):
        raise TypeError(f"double_quant must be a bool, got {type(double_quant).__name__}")
    code = nf4_code(w.device)
    _, impl = resolve("nf4_quantize", w.device)
    packed, absmax = impl(w, blocksize, code)
    # every implementation gives a block holding NaN or Inf a non-finite absmax: one cheap check on [blocks]
    if not torch.isfinite(absmax).all():
        raise ValueError("w contains NaN or Inf values; NF4 cannot represent them")
    if not double_quant:
        return NF4Tensor(packed, w.shape, w.dtype, blocksize, absmax=absmax, code=code)
    code8 = dynamic_code(w.device)
    _, impl = resolve("nf4_quantize_absmax", w.device)
    qabsmax, absmax2, offset = impl(absmax, code8)
    return NF4Tensor(packed, w.shape, w.dtype, blocksize, qabsmax=qabsmax, absmax2=absmax2, offset=offset,
                     code=code, code8=code8)


def dequantize(q: NF4Tensor) -> torch.Tensor:
    """The weight ``q`` stands for, in its original shape and dtype (bit-exact with bitsandbytes)."""
    if not isinstance(q, NF4Tensor):
        raise TypeError(f"q must be an NF4Tensor, got {type(q).__name__}")
    return q.dequantize()


# ----------------------------------------------------------------------------------- ops over an NF4 weight
# The NF4 state travels as tensors: packed uint8 [ceil(n/2), 1], absmax fp32 [blocks] (decoded once per call when
# double-quantized: 1/16 of the packed bytes), code fp32 [16]; plus blocksize, [out, in] and the weight's dtype.


@custom_op("peftkern::nf4_matmul")
def nf4_matmul(a: Tensor, packed: Tensor, absmax: Tensor, code: Tensor, blocksize: int, shape: list[int],
               weight_dtype: torch.dtype, transpose_w: bool, bias: Optional[Tensor], backend: str) -> Tensor:
    """``a deq(W)^T + bias`` (``transpose_w``) or ``a deq(W)``, a [..., in] (or [..., out])."""
    y = run("nf4_matmul", backend, a.device, rows(a), packed, absmax, code, blocksize, shape, weight_dtype,
            transpose_w, bias)
    return unrows(y, a)


@nf4_matmul.register_fake
def _(a, packed, absmax, code, blocksize, shape, weight_dtype, transpose_w, bias, backend):
    return a.new_empty(*a.shape[:-1], shape[0] if transpose_w else shape[1])


def _nf4_matmul_setup(ctx, inputs, output):
    _, packed, absmax, code, blocksize, shape, weight_dtype, transpose_w, bias, backend = inputs
    ctx.save_for_backward(packed, absmax, code)
    ctx.meta = (blocksize, shape, weight_dtype, transpose_w, backend)


def _nf4_matmul_backward(ctx, grad):
    packed, absmax, code = ctx.saved_tensors
    blocksize, shape, weight_dtype, transpose_w, backend = ctx.meta
    da = None
    if ctx.needs_input_grad[0]:
        da = nf4_matmul(grad.contiguous(), packed, absmax, code, blocksize, shape, weight_dtype, not transpose_w, None,
                        backend)
    db = rows(grad).sum(0) if ctx.needs_input_grad[8] else None
    return da, None, None, None, None, None, None, None, db, None


nf4_matmul.register_autograd(_nf4_matmul_backward, setup_context=_nf4_matmul_setup)
# the NF4 scales and code table stay fp32: the weight decodes in fp32, then rounds once to the compute dtype
nf4_matmul.register_autocast(("a", "bias"))


def _check_nf4_weight(q, x) -> None:
    if not isinstance(q, NF4Tensor):
        raise TypeError(f"weight must be an NF4Tensor (pk.nf4.quantize), got {type(q).__name__}")
    if len(q.shape) != 2:
        raise ValueError(f"weight must be a 2-D [out, in] NF4Tensor, got shape {tuple(q.shape)}")
    V.tensor("x", x, min_ndim=1)
    if x.dtype == torch.float64:
        raise TypeError("x must be float32, float16 or bfloat16 (the NF4 weight dequantizes to those), got float64")
    if x.shape[-1] != q.shape[1]:
        raise ValueError(f"x has {x.shape[-1]} features in its last dim but weight expects {q.shape[1]} "
                         f"([out, in] = {tuple(q.shape)})")
    if x.device != q.device:
        raise ValueError(f"weight is on {q.device} but x is on {x.device}")


def _state(q: NF4Tensor) -> tuple:
    return q.packed, q.block_absmax(), q.code, q.blocksize, list(q.shape), q.dtype


def _token(direct: bool, x: Tensor, q: NF4Tensor, bias: Optional[Tensor], lora=None):
    """An eager CPU inference call of one token under "auto" (``direct``: what the check said of x's signature)
    by :func:`torch_impl.nf4_token` on the weight's own (nested) state: no op, no decoded block scales. None where
    that does not apply."""
    if not (direct and x.numel() == x.shape[-1] > 0 and get_backend() == "auto"
            and custom_ops.eager(x)):
        return None
    nested = (q.qabsmax, q.absmax2, q.offset, q.code8, q.nested_blocksize) if q.double_quant else None
    out = torch_impl.nf4_token(rows(x), q.packed, q.absmax, q.code, q.blocksize, q.shape, q.dtype, bias, lora,
                               nested=nested, need_h=False)
    return None if out is None else unrows(out if lora is None else out[0], x)


def nf4_linear(x: Tensor, weight: NF4Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """``y = x dequant(weight)^T + bias`` with ``weight`` an NF4Tensor [out, in]; x has any leading shape. Gradients
    reach x (``dx = dy dequant(weight)``) and a trainable bias; the 4-bit weight is frozen."""
    y = _token(V.checked(_check_nf4_linear, x, weight, bias), x, weight, bias)
    return y if y is not None else nf4_matmul(x, *_state(weight), True, bias, get_backend())


def _check_nf4_linear(x, weight, bias) -> bool:
    _check_nf4_weight(weight, x)
    if bias is not None:
        V.tensor("bias", bias, ndim=1)
        V.shape("bias", bias, (weight.shape[0],), "[out]")
        V.same_dtype("x", x, autocast=True, bias=bias)
        V.same_device("x", x, bias=bias)
    return custom_ops.cpu_inference(x)


@custom_op("peftkern::qlora_forward")
def qlora_forward(x: Tensor, packed: Tensor, absmax: Tensor, code: Tensor, blocksize: int, shape: list[int],
                  weight_dtype: torch.dtype, bias: Optional[Tensor], lora_A: Tensor, lora_B: Tensor,
                  rank_scale: Optional[Tensor], scaling: float, dropout_p: float,
                  seed: Optional[Tensor], backend: str) -> tuple[Tensor, Tensor]:
    """x [..., in] -> (y [..., out], h [N, r]) for the N rows of x."""
    y, h = run("qlora_forward", backend, x.device, rows(x), packed, absmax, code, blocksize, shape, weight_dtype,
               bias, lora_A, lora_B, rank_scale, scaling, dropout_p, seed_int(seed))
    return unrows(y, x), h


@qlora_forward.register_fake
def _(x, packed, absmax, code, blocksize, shape, weight_dtype, bias, lora_A, lora_B, rank_scale, scaling, dropout_p,
      seed, backend):
    return (x.new_empty(*x.shape[:-1], shape[0]),
            x.new_empty(math.prod(x.shape[:-1]), lora_A.shape[0], dtype=torch.promote_types(x.dtype, lora_A.dtype)))


@custom_op("peftkern::qlora_backward")
def qlora_backward(grad_y: Tensor, x: Tensor, packed: Tensor, absmax: Tensor, code: Tensor, blocksize: int,
                   shape: list[int], weight_dtype: torch.dtype, lora_A: Tensor, lora_B: Tensor,
                   rank_scale: Optional[Tensor], h: Tensor, scaling: float, dropout_p: float, seed: Optional[Tensor],
                   compute_dx: bool, backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    dx, dA, dB, de = run("qlora_backward", backend, x.device, rows(grad_y).contiguous(), rows(x), packed, absmax,
                         code, blocksize, shape, weight_dtype, lora_A, lora_B, rank_scale, h, scaling, dropout_p,
                         seed_int(seed), compute_dx)
    # custom ops return tensors only: empty ones stand for "not computed"
    return (unrows(dx, x) if dx is not None else x.new_empty(0), dA, dB,
            de if de is not None else lora_A.new_empty(0))


@qlora_backward.register_fake
def _(grad_y, x, packed, absmax, code, blocksize, shape, weight_dtype, lora_A, lora_B, rank_scale, h, scaling,
      dropout_p, seed, compute_dx, backend):
    return (torch.empty_like(x) if compute_dx else x.new_empty(0), torch.empty_like(lora_A),
            torch.empty_like(lora_B), torch.empty_like(rank_scale) if rank_scale is not None else lora_A.new_empty(0))


def _qlora_setup(ctx, inputs, output):
    (x, packed, absmax, code, blocksize, shape, weight_dtype, bias, lora_A, lora_B, rank_scale, scaling, dropout_p,
     seed, backend) = inputs
    # the 4-bit state is saved, never the dequantized weight
    ctx.save_for_backward(x, packed, absmax, code, lora_A, lora_B, rank_scale, output[1], seed)
    ctx.meta = (blocksize, shape, weight_dtype, scaling, dropout_p, backend)


def _qlora_backward(ctx, grad_y, _grad_h):
    x, packed, absmax, code, lora_A, lora_B, rank_scale, h, seed = ctx.saved_tensors
    blocksize, shape, weight_dtype, scaling, dropout_p, backend = ctx.meta
    need = ctx.needs_input_grad
    dx, dA, dB, de = qlora_backward(grad_y, x, packed, absmax, code, blocksize, shape, weight_dtype, lora_A, lora_B,
                                    rank_scale, h, scaling, dropout_p, seed, need[0], backend)
    db = rows(grad_y).sum(0) if need[7] else None
    return (dx if need[0] else None, None, None, None, None, None, None, db, dA, dB,
            de if need[10] else None, None, None, None, None)


qlora_forward.register_autograd(_qlora_backward, setup_context=_qlora_setup)
qlora_forward.register_autocast(("x", "bias", "lora_A", "lora_B", "rank_scale"))


def qlora_linear(x: Tensor, weight: NF4Tensor, bias: Optional[Tensor], lora_A: Tensor, lora_B: Tensor,
                 scaling: float, *, dropout_p: float = 0.0, training: bool = False,
                 rank_scale: Optional[Tensor] = None) -> Tensor:
    """QLoRA: ``y = x dequant(weight)^T + b + scaling * (dropout(x) A^T * rank_scale) B^T`` over an NF4 base.

    As :func:`peftkern.lora_linear`, with ``weight`` an NF4Tensor [out, in]: what autograd keeps for backward is x,
    the rank-sized h, a dropout seed and the 4-bit state, never a dequantized weight.
    """
    direct = V.checked(_check_qlora, x, weight, bias, lora_A, lora_B, scaling, dropout_p, rank_scale)
    p = float(dropout_p) if training else 0.0
    y = _token(direct, x, weight, bias, (lora_A, lora_B, rank_scale, float(scaling))) if p == 0.0 else None
    if y is not None:
        return y
    return qlora_forward(x, *_state(weight), bias, lora_A, lora_B, rank_scale, float(scaling), p,
                         new_seed() if p > 0.0 else None, get_backend())[0]


def _check_qlora(x, weight, bias, lora_A, lora_B, scaling, dropout_p, rank_scale) -> bool:
    _check_nf4_weight(weight, x)
    check_adapter_args(x, tuple(weight.shape), bias, lora_A, lora_B, scaling, dropout_p, rank_scale)
    return custom_ops.cpu_inference(x)


__all__ = ["NF4Tensor", "quantize", "dequantize", "nf4_linear", "qlora_linear", "BLOCKSIZES"]
