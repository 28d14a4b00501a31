"""Triton ``@triton.jit`` building blocks shared by the families' kernels (``ops/<family>/triton_kernels.py``).

Element offsets: every product that lands in an address is taken in int64 through :func:`offsets` or
:func:`tile_offsets`. Indices and strides arrive as int32 (the JIT types ints below 2**31 as i32), and their int32
product wraps once a tensor spans 2**31 elements: tokens x features does at ~150k tokens of a 14336-wide layer.
The widening costs one 64-bit multiply per row and column, hoisted out of the reduction loops.
"""
import triton
import triton.language as tl


@triton.jit
def offsets(index, stride):
    """``index * stride`` in int64: one index (a scalar, a loop counter) or a tensor of them, along one dimension of
    stride ``stride``."""
    return tl.cast(index, tl.int64) * stride


@triton.jit
def tile_offsets(rows, cols, stride_r, stride_c):
    """[len(rows), len(cols)] int64 element offsets ``rows * stride_r + cols * stride_c`` of a 2-D tile."""
    return offsets(rows, stride_r)[:, None] + offsets(cols, stride_c)[None, :]
