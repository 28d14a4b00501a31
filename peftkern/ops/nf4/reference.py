"""The literal NF4 / double-quant math, element by element in Python floats rounded to fp32 at each step: the oracle
of the tests (slow: small tensors only). README.md gives the formulas."""
from __future__ import annotations

import numpy as np
import torch

f32 = np.float32


def _scaled_block(block) -> tuple:
    """(absmax, [clamp(x * (1 / absmax), -1, 1) for x in block]) with every step rounded to fp32."""
    am = f32(np.max(np.abs(block)))
    inv = f32(1) / max(am, f32(1e-38))
    return am, [min(max(f32(x * inv), f32(-1)), f32(1)) for x in block]


def nf4_quantize_reference(w: torch.Tensor, code: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(packed uint8 [ceil(n/2), 1], absmax fp32 [ceil(n/b)])."""
    f = w.detach().reshape(-1).float().numpy()
    table = code.float().numpy()
    mids = [(table[k] + table[k + 1]) / f32(2) for k in range(15)]
    n = f.size
    absmax, q = [], []
    for start in range(0, n, blocksize):
        am, scaled = _scaled_block(f[start:start + blocksize])
        absmax.append(am)
        q += [sum(1 for m in mids if m < s) for s in scaled]
    if n % 2:
        q.append(sum(1 for m in mids if m < f32(0)))
    packed = [(q[2 * t] << 4) | q[2 * t + 1] for t in range(len(q) // 2)]
    return torch.tensor(packed, dtype=torch.uint8).view(-1, 1), torch.tensor(np.array(absmax, dtype=f32))


def blockwise8_quantize_reference(a: torch.Tensor, code8: torch.Tensor, blocksize: int = 256):
    """(q uint8 [n], absmax2 fp32 [ceil(n/256)]): exact nearest code, ties to the even index."""
    f = a.reshape(-1).float().numpy()
    table = code8.float().numpy()
    q, absmax2 = [], []
    for start in range(0, f.size, blocksize):
        am, scaled = _scaled_block(f[start:start + blocksize])
        absmax2.append(am)
        for s in scaled:
            dist = [abs(f32(s - c)) for c in table]
            best = min(dist)
            ties = [i for i, d in enumerate(dist) if d == best]
            even = [i for i in ties if i % 2 == 0]
            q.append(even[0] if even else ties[0])
    return torch.tensor(q, dtype=torch.uint8), torch.tensor(np.array(absmax2, dtype=f32))


def nf4_dequantize_reference(packed, absmax, code, blocksize: int, shape, dtype) -> torch.Tensor:
    codes = []
    for byte in packed.reshape(-1).tolist():
        codes += [byte >> 4, byte & 0xF]
    n = int(np.prod(shape))
    table = code.float().numpy()
    am = absmax.float().numpy()
    out = np.array([f32(table[codes[i]] * am[i // blocksize]) for i in range(n)], dtype=f32)
    return torch.from_numpy(out).view(shape).to(dtype)
