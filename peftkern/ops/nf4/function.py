"""The NF4 functional API and :class:`NF4Tensor`, the bitsandbytes-compatible container (``pk.nf4``)."""
from __future__ import annotations

from typing import Optional

import torch

from ... import _validate as V
from ...backend import resolve
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
        self._check()

    def _check(self) -> None:
        n = self.shape.numel()
        blocks = -(-n // self.blocksize)
        V.shape("packed", self.packed, ((n + 1) // 2, 1), "[ceil(n/2), 1] uint8")
        if self.packed.dtype != torch.uint8:
            raise TypeError(f"packed must be uint8, got {self.packed.dtype}")
        if self.double_quant:
            V.shape("qabsmax", self.qabsmax, (blocks,), "[blocks] uint8")
            V.shape("absmax2", self.absmax2, (-(-blocks // self.nested_blocksize),), "[ceil(blocks/256)] fp32")
            if self.offset is None or self.code8 is None:
                raise ValueError("double quantization needs offset and code8")
        elif self.absmax is None:
            raise ValueError("an NF4Tensor needs absmax, or qabsmax + absmax2 + offset (double quantization)")
        else:
            V.shape("absmax", self.absmax, (blocks,), "[blocks] fp32")

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
        _, impl = resolve("nf4_dequantize_absmax", self.device)
        return impl(self.qabsmax, self.absmax2, self.offset, self.code8, self.nested_blocksize)

    def dequantize(self) -> torch.Tensor:
        _, impl = resolve("nf4_dequantize", self.device)
        return impl(self.packed, self.block_absmax(), self.blocksize, self.code, tuple(self.shape), self.dtype)

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

    def __repr__(self) -> str:
        return (f"NF4Tensor(shape={tuple(self.shape)}, dtype={self.dtype}, blocksize={self.blocksize}, "
                f"double_quant={self.double_quant}, {self.bits_per_parameter():.3f} bits/parameter)")


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
    if not torch.isfinite(w).all():
        raise ValueError("w contains NaN or Inf values; NF4 cannot represent them")
    code = nf4_code(w.device)
    _, impl = resolve("nf4_quantize", w.device)
    packed, absmax = impl(w, blocksize, code)
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


__all__ = ["NF4Tensor", "quantize", "dequantize", "BLOCKSIZES", "torch_impl"]
