"""Custom ops whose eager calls skip the dispatcher.

A Python ``torch.library`` custom op costs ~10 us per eager call on a CPU before any arithmetic (boxing the
arguments, the autocast and autograd kernels it registers, its Python kernel), and with autograd a LoRA layer's
forward and backward at 16 x 64 spent ~135 us of its ~280 there (measured here). :func:`custom_op` registers the op as
before, so ``torch.compile`` and ``torch.export`` see one op (fake tensors, the autocast rule, the autograd formula);
the :class:`Op` it returns runs eager calls through the same function, the same ``setup_context`` / ``backward`` (an
``autograd.Function`` made of them) and the same autocast casts, without the dispatcher: the same arithmetic by the
same code.

A call is eager when nothing traces or transforms it: not under ``torch.compile`` / ``torch.export``, no
``TorchDispatchMode`` (fake tensors, ``make_fx``, a FLOP counter...), no functorch transform (``vmap``, ``grad``) and a
plain tensor first (not a tensor subclass such as a FakeTensor, FunctionalTensor or DTensor); anything else gets the
registered op.
"""
from __future__ import annotations

from contextlib import nullcontext
from typing import Callable, Optional

import torch

from . import autocast

_PLAIN = (torch.Tensor, torch.nn.Parameter)


def custom_op(name: str) -> Callable[[Callable], "Op"]:
    """Decorator: ``torch.library.custom_op(name, mutates_args=())`` (its schema from the annotations) as an
    :class:`Op`."""
    def wrap(fn: Callable) -> Op:
        return Op(name, fn)

    return wrap


def eager(first) -> bool:
    """True when a call whose first argument is ``first`` runs eagerly on plain tensors (see the module docstring).

    ``is_compiling`` is read first: under ``torch.compile`` Dynamo reads it as a constant and traces nothing else.
    """
    return (not torch.compiler.is_compiling() and type(first) in _PLAIN and not torch._C._len_torch_dispatch_stack()
            and not torch._C._are_functorch_transforms_active())


def cpu_inference(x: torch.Tensor) -> bool:
    """True where a call on x needs neither autograd nor autocast and x is on the CPU, whose backend under "auto" is
    torch: an eager call there (:func:`eager`, backend "auto") can run the torch implementation itself, with no
    autograd node, op or backend lookup around it (a third of a decode-sized LoRA call). Checks return it, so
    :func:`peftkern._validate.checked` decides it once per signature (grad and autocast modes are in its key)."""
    return not torch.is_grad_enabled() and not torch._C._is_any_autocast_enabled() and x.device.type == "cpu"


def cpu_form(x: torch.Tensor) -> Optional[str]:
    """What an eager call on x under "auto" may run instead of its op on the CPU: ``"direct"`` where
    :func:`cpu_inference`; ``"composite"`` with autograd in fp32 / fp64 without autocast (a family's own PyTorch-op
    form of the call under PyTorch's autograd, where it gives the op's bits: C++ autograd nodes instead of the op's
    Python backward); else None. Returned by checks, as :func:`cpu_inference`."""
    if cpu_inference(x):
        return "direct"
    if (x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64)
            and not torch._C._is_any_autocast_enabled()):
        return "composite"
    return None


def as_dtype(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t.to(dtype)`` without the call where ``t`` has that dtype already (a no-op ``.to`` costs ~1 us; decode-sized
    calls count several)."""
    return t if t.dtype == dtype else t.to(dtype)


def rows(t: torch.Tensor) -> torch.Tensor:
    """``t`` [..., k] as [N, k] (the ops take any leading dims and flatten them inside: as an eager call's own
    reshape and view, each would be an autograd node forward and backward, ~5 us a layer at decode sizes)."""
    return t if t.dim() == 2 else t.reshape(-1, t.shape[-1])


def unrows(y: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``y`` [N, k] with the leading dims of ``like`` [..., j]: [..., k]."""
    return y if like.dim() == 2 else y.view(*like.shape[:-1], y.shape[-1])


class Op:
    """A registered custom op (``.op``) and the eager path of its calls (``op(*args)``)."""

    def __init__(self, name: str, fn: Callable):
        self.name = name
        self.fn = fn
        self.op = torch.library.custom_op(name, mutates_args=())(fn)
        self._apply: Optional[Callable] = None
        self._cast: tuple[int, ...] = ()

    def register_fake(self, fn: Callable) -> Callable:
        return self.op.register_fake(fn)

    def register_autograd(self, backward: Callable, setup_context: Callable) -> None:
        """The op's autograd formula, for the registered op and (as an ``autograd.Function``) for eager calls."""
        self.op.register_autograd(backward, setup_context=setup_context)
        function = _function(self.fn, setup_context, backward, self.name)
        # autograd's own apply, without Function.apply's Python wrapper (~2.5 us a call): that one binds arguments
        # for a setup_context (none here) and unwraps functorch tensors (never here: eager() ruled transforms out)
        self._apply = super(torch.autograd.Function, function).apply

    def register_autocast(self, cast: tuple[str, ...]) -> None:
        """Under ``torch.autocast`` the arguments named in ``cast`` are cast (:mod:`peftkern.ops.autocast`)."""
        self._cast = tuple(autocast.register_autocast(self.name.split("::")[-1], cast))

    def __call__(self, *args):
        if not eager(args[0]):
            return self.op(*args)
        if self._cast and torch._C._is_any_autocast_enabled():
            return self._autocast(args)
        return self._call(args)

    def _call(self, args: tuple):
        if self._apply is not None and torch.is_grad_enabled():
            return self._apply(*args)
        return self.fn(*args)

    def _autocast(self, args: tuple):
        """An eager call under autocast: the arguments cast by the op's rule, the op run with autocast off."""
        args, excluded = autocast.eager_cast(args, self._cast)
        with torch._C._ExcludeDispatchKeyGuard(excluded) if excluded is not None else nullcontext():
            return self._call(args)


def _function(fn: Callable, setup: Callable, backward: Callable, name: str) -> type:
    """An ``autograd.Function`` computing ``fn`` whose context and gradients are those the custom op registers."""

    class EagerFunction(torch.autograd.Function):
        # forward takes ctx: with a separate setup_context, apply binds the arguments through inspect.signature on
        # every call (~25 us)
        @staticmethod
        def forward(ctx, *args):
            output = fn(*args)
            setup(ctx, args, output)
            if isinstance(output, tuple):
                # the outputs after the first are what the op saves for its backward (h, z, lse), which callers
                # drop: no gradient flows into them, so none is made of zeros for the backward (which ignores it)
                ctx.mark_non_differentiable(*output[1:])
                ctx.set_materialize_grads(False)
            return output

    EagerFunction.backward = staticmethod(backward)
    EagerFunction.__name__ = EagerFunction.__qualname__ = f"{name.split('::')[-1]}_eager"
    return EagerFunction
