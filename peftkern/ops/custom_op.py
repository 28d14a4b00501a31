"""Custom ops whose eager calls skip the dispatcher.

A Python ``torch.library`` custom op costs ~10 us per eager call on a CPU before any arithmetic (boxing the
arguments, the autocast and autograd kernels it registers, its Python kernel), several times that with autograd: as
long as a whole decode-sized layer's arithmetic (``peftkern bench overhead``). :func:`custom_op` registers the op as
before, so ``torch.compile`` and ``torch.export`` see one op (fake tensors, the autocast rule, the autograd formula);
the :class:`Op` it returns runs eager calls through the same function, the same ``setup_context`` / ``backward`` (an
``autograd.Function`` made of them) and the same autocast casts, without the dispatcher: the same arithmetic by the
same code.

A call is eager when nothing traces it: not under ``torch.compile`` / ``torch.export``, no ``TorchDispatchMode``
(fake tensors, ``make_fx``, a FLOP counter...) and a plain tensor first (not a tensor subclass such as a FakeTensor,
FunctionalTensor or DTensor); anything else gets the registered op.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from . import autocast

_PLAIN = (torch.Tensor, torch.nn.Parameter)


def custom_op(name: str) -> Callable[[Callable], "Op"]:
    """Decorator: ``torch.library.custom_op(name, mutates_args=())`` (schema from the annotations), as an :class:`Op`."""
    def wrap(fn: Callable) -> Op:
        return Op(name, fn)

    return wrap


def eager(first) -> bool:
    """True when a call whose first argument is ``first`` runs eagerly on plain tensors (see the module docstring).

    ``is_compiling`` is read first: under ``torch.compile`` Dynamo reads it as a constant and traces nothing else.
    """
    return not torch.compiler.is_compiling() and type(first) in _PLAIN and not torch._C._len_torch_dispatch_stack()


class Op:
    """A registered custom op (``.op``) and the eager path of its calls (``op(*args)``)."""

    def __init__(self, name: str, fn: Callable):
        self.name = name
        self.fn = fn
        self.op = torch.library.custom_op(name, mutates_args=())(fn)
        self._function: Optional[type] = None
        self._cast: tuple[int, ...] = ()

    def register_fake(self, fn: Callable) -> Callable:
        return self.op.register_fake(fn)

    def register_autograd(self, backward: Callable, setup_context: Callable) -> None:
        """The op's autograd formula, for the registered op and (as an ``autograd.Function``) for eager calls."""
        self.op.register_autograd(backward, setup_context=setup_context)
        self._function = _function(self.fn, setup_context, backward, self.name)

    def register_autocast(self, cast: tuple[str, ...]) -> None:
        """Under ``torch.autocast`` the arguments named in ``cast`` are cast (:mod:`peftkern.ops.autocast`)."""
        self._cast = tuple(autocast.register_autocast(self.name.split("::")[-1], cast))

    def __call__(self, *args):
        if not eager(args[0]):
            return self.op(*args)
        if self._cast and torch._C._is_any_autocast_enabled():
            args, excluded = autocast.eager_cast(args, self._cast)
            if excluded is not None:
                with torch._C._ExcludeDispatchKeyGuard(excluded):
                    return self._run(*args)
        return self._run(*args)

    def _run(self, *args):
        if self._function is not None and torch.is_grad_enabled():
            return self._function.apply(*args)
        return self.fn(*args)


def _function(fn: Callable, setup: Callable, backward: Callable, name: str) -> type:
    """An ``autograd.Function`` computing ``fn`` whose context and gradients are those the custom op registers."""

    class EagerFunction(torch.autograd.Function):
        # forward takes ctx: with a separate setup_context, apply binds the arguments through inspect.signature on
        # every call (~25 us)
        @staticmethod
        def forward(ctx, *args):
            output = fn(*args)
            setup(ctx, args, output)
            return output

        @staticmethod
        def backward(ctx, *grads):
            return backward(ctx, *grads)

    EagerFunction.__name__ = EagerFunction.__qualname__ = f"{name.split('::')[-1]}_eager"
    return EagerFunction
