"""Autograd for handgrad's operators: reverse mode, forward mode, functorch.

``torch.library.register_autograd`` installs an autograd kernel built around
a backward formula only: forward-mode AD (``torch.func.jvp``, ``jacfwd``,
``torch.autograd.forward_ad``) then silently sees a zero or missing tangent.
``register_autograd`` here installs the same kind of kernel -- an
``autograd.Function`` registered on the op's Autograd dispatch key, whose
forward redispatches below autograd to the CPU/CUDA kernel -- with the op's
``jvp`` formula beside its backward, so reverse mode, forward mode and the
functorch transforms (grad, vjp, jacrev, jacfwd, jvp) all use handgrad's own
kernels, and opcheck and torch.compile see an ordinary autograd registration.

An op registered without a jvp raises a clear error under forward-mode AD
instead of producing a zero tangent.
"""

import torch
from torch.autograd import forward_ad as _forward_ad

__all__ = ["register_autograd", "call", "OPS", "NO_JVP"]

_LIBRARY = torch.library.Library("handgrad", "IMPL")
_TENSOR = object()  # marks where a tensor argument goes back in for jvp
_TRANSFORMABLE = {}  # qualname -> the formulas as a functorch-compatible Function


def NO_JVP(reason):
    """A jvp that refuses forward-mode AD with `reason` (instead of a wrong tangent)."""
    def jvp(ctx, *tangents):
        raise NotImplementedError(reason)
    return jvp


def register_autograd(qualname, backward, setup_context, jvp, dispatcher=True):
    """Registers reverse- and forward-mode AD for the op `qualname`.

    backward(ctx, *grad_outputs) -> one gradient (or None) per op argument
    setup_context(ctx, inputs, output): saves what backward needs
    jvp(ctx, inputs, *input_tangents) -> one tangent (or None) per output;
        `inputs` are the op's arguments (tensors are the primal values), a
        tangent is None for an argument without one, and ctx.outputs holds
        the op's outputs (the primal values).

    dispatcher=False leaves the op's Autograd kernel alone (one written in
    C++ for speed, see cross_entropy): call() then takes these formulas
    itself whenever that kernel cannot serve -- under a torch.func
    transform, and while a forward-mode AD level is open.
    """
    namespace, name = qualname.split("::")
    op = getattr(getattr(torch.ops, namespace), name).default
    below_autograd = torch._C._after_autograd_keyset

    # The dispatcher drops trailing arguments equal to their defaults; the
    # formulas always see every argument. (The defaults are read from the
    # schema once: torch's fill_defaults per call cost ~5 us.)
    arguments = op._schema.arguments
    trailing_defaults = []
    for argument in reversed(arguments):
        if not argument.has_default_value() or argument.kwarg_only:
            break
        trailing_defaults.insert(0, argument.default_value)
    first_default = len(arguments) - len(trailing_defaults)

    def all_arguments(args):
        if len(args) == len(arguments):
            return tuple(args)
        if first_default <= len(args) < len(arguments):
            return (*args, *trailing_defaults[len(args) - first_default:])
        filled, _ = torch._library.utils.fill_defaults(op._schema, args, {})
        return tuple(filled)

    def run_op(args, keyset):
        with torch._C._AutoDispatchBelowAutograd():
            if keyset is None:  # applied by call(), not from the dispatcher
                return op(*args)
            return op.redispatch(keyset & below_autograd, *args)

    def setup(ctx, args, output):
        args = all_arguments(args)
        setup_context(ctx, args, output)
        if _forward_ad._current_level < 0:
            return  # no forward-mode AD: jvp cannot be called for this output
        ctx.jvp_arguments = [_TENSOR if isinstance(a, torch.Tensor) else a for a in args]
        # Tensors for jvp (the arguments and the outputs) are kept only
        # while forward-mode AD needs them: autograd drops them once the
        # output tangents are computed.
        outputs = output if isinstance(output, tuple) else (output,)
        ctx.save_for_forward(*[a for a in args if isinstance(a, torch.Tensor)], *outputs)
        # A jvp's None means a zero tangent; autograd wants None only for
        # non-differentiable outputs (and fails on it for the others).
        fixed = getattr(ctx, "non_differentiable", None) or ()
        ctx.differentiable_outputs = [
            o.is_floating_point() and not any(o is n for n in fixed) for o in outputs]

    class Formula(torch.autograd.Function):
        # The dispatch key set travels as the last input, so that argument i
        # of the op stays input i of the Function (needs_input_grad lines up).
        # Forward takes ctx itself (the older Function style): apply then
        # skips binding the arguments to forward's signature with inspect,
        # which cost ~10 us a call (the kernels of small layers take ~5).
        @staticmethod
        def forward(ctx, *inputs):
            *args, keyset = inputs
            output = run_op(args, keyset)
            setup(ctx, args, output)
            return output

        @staticmethod
        def backward(ctx, *grad_outputs):
            needs = ctx.needs_input_grad
            try:
                ctx.needs_input_grad = needs[:-1]
                grads = backward(ctx, *grad_outputs)
            finally:
                ctx.needs_input_grad = needs
            grads = grads if isinstance(grads, tuple) else (grads,)
            return (*grads, *([None] * (len(needs) - len(grads))))

        @staticmethod
        def jvp(ctx, *tangents):
            primals = iter(ctx.saved_tensors)
            args = [next(primals) if a is _TENSOR else a for a in ctx.jvp_arguments]
            ctx.outputs = tuple(primals)
            # (None for the arguments the caller left at their defaults.)
            tangents = (*tangents, *([None] * len(args)))[:len(args)]
            result = jvp(ctx, args, *tangents)
            if not isinstance(result, tuple):
                return _zero_if_none(result, ctx.outputs[0], ctx.differentiable_outputs[0])
            return tuple(_zero_if_none(t, o, d)
                         for t, o, d in zip(result, ctx.outputs, ctx.differentiable_outputs))

    Formula = _named("handgrad_%s_autograd" % name, Formula)

    # The same formulas for the torch.func transforms, applied above the
    # dispatcher by call() (an autograd.Function cannot run under functorch
    # from inside a dispatcher kernel). Batching comes from the op's vmap
    # rule, through generate_vmap_rule.
    class Transformable(torch.autograd.Function):
        generate_vmap_rule = True

        @staticmethod
        def forward(*wrapped):
            return op(*_unwrap(wrapped))

        @staticmethod
        def setup_context(ctx, inputs, output):
            setup(ctx, _unwrap(inputs), output)

        @staticmethod
        def backward(ctx, *grad_outputs):
            return backward(ctx, *grad_outputs)

        @staticmethod
        def jvp(ctx, *tangents):
            return Formula.jvp(ctx, *tangents)

    Transformable = _named("handgrad_%s_transformable" % name, Transformable)
    _TRANSFORMABLE[qualname] = (op, Transformable, None if dispatcher else Formula)
    if not dispatcher:
        return

    # Called from inside the dispatcher (the op's Autograd kernel), below any
    # functorch layer: the plain Function apply, not the functorch-aware
    # one (which would re-enter the transforms through a higher-order op).
    apply = super(torch.autograd.Function, Formula).apply

    def autograd_kernel(keyset, *args):
        if torch._C._are_functorch_transforms_active():
            raise RuntimeError(
                "%s was called through torch.ops under a torch.func transform; handgrad's "
                "formulas reach the transforms through handgrad.ops (or "
                "handgrad.ops._autograd.OPS.%s), not the raw operator" % (qualname, name))
        if _forward_ad._current_level < 0 and not (
                torch.is_grad_enabled()
                and any(isinstance(a, torch.Tensor) and a.requires_grad for a in args)):
            # Nothing to record (no input needs a gradient, or grad mode is
            # off, as in every first-order backward; no forward-mode AD):
            # straight to the kernel, as native ops do.
            return run_op(args, keyset)
        return apply(*args, keyset)

    _LIBRARY.impl(name, autograd_kernel, "Autograd", with_keyset=True)


def _named(name, function):
    """`function` created again under `name`: autograd names the backward
    node class when the Function class is created, so renaming it afterwards
    would leave grad_fn showing a generic name."""
    members = {k: v for k, v in vars(function).items()
               if k in ("forward", "setup_context", "backward", "jvp", "generate_vmap_rule")}
    return type(name, (torch.autograd.Function,), members)


def _zero_if_none(tangent, output, differentiable):
    if tangent is None and differentiable:
        return torch.zeros_like(output)
    return tangent


class _Static:
    """A non-tensor argument, kept whole: the transforms flatten their inputs
    as pytrees, and a stride list must stay one input, not several."""

    __slots__ = ("value",)

    def __init__(self, value):
        self.value = value


def _unwrap(args):
    return tuple(a.value if isinstance(a, _Static) else a for a in args)


def call(qualname, *args):
    """Calls the op; under a torch.func transform (grad, vjp, jacrev, jacfwd,
    jvp, vmap), through its formulas as a functorch-compatible Function."""
    op, transformable, formula = _TRANSFORMABLE[qualname]
    if torch._C._are_functorch_transforms_active():
        return transformable.apply(*(a if isinstance(a, torch.Tensor) else _Static(a)
                                     for a in args))
    if _forward_ad._current_level >= 0:
        if formula is not None:
            # An op whose Autograd kernel has no jvp (dispatcher=False), while
            # forward-mode AD is on: the formulas, applied here.
            return formula.apply(*args, None)
    elif not torch.is_grad_enabled():
        # Nothing to record (a first-order backward calling a backward op):
        # past the Autograd kernel straight to the device kernel.
        with torch._C._AutoDispatchBelowAutograd():
            return op(*args)
    return op(*args)


class _Ops:
    """torch.ops.handgrad through call(): what formulas use to call ops, so
    that a backward or jvp formula also works under torch.func transforms."""

    def __getattr__(self, name):
        qualname = "handgrad::" + name
        if qualname not in _TRANSFORMABLE:
            return getattr(torch.ops.handgrad, name)
        return lambda *args: call(qualname, *args)


OPS = _Ops()
