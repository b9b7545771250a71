"""handgrad.patch(model): run an existing torch.nn model on handgrad's ops.

Every torch.nn.Conv2d, MaxPool2d, CrossEntropyLoss, LSTM, LSTMCell and
MultiheadAttention inside the model (the model itself included) becomes its
handgrad drop-in, in place. The handgrad modules are subclasses of the native
ones that only replace forward, so the swap changes the module's class and
nothing else: the same object keeps the same parameters, buffers, hooks and
state_dict keys, and every other reference to it sees the change.

Only modules whose type is exactly the native class are swapped (a user
subclass may have its own forward). A module whose configuration handgrad
does not support stays native; patch says which, with the reason, in a
warning (or raises with strict=True).
"""

import warnings
from typing import Optional, Type

import torch

from . import nn as hgnn

# native class -> name of its handgrad drop-in in handgrad.nn
DROP_INS = {
    torch.nn.Conv2d: "Conv2d",
    torch.nn.MaxPool2d: "MaxPool2d",
    torch.nn.CrossEntropyLoss: "CrossEntropyLoss",
    torch.nn.LSTM: "LSTM",
    torch.nn.LSTMCell: "LSTMCell",
    torch.nn.MultiheadAttention: "MultiheadAttention",
}


class PatchReport(list):
    """The modules patch left native: (qualified name, class name, reason)."""


def unsupported_reason(module: torch.nn.Module, drop_in: Type[torch.nn.Module]) -> Optional[str]:
    """Why drop_in cannot run this module's configuration, or None."""
    check = getattr(drop_in, "handgrad_unsupported_reason", None)
    return check(module) if check is not None else None


def patch(model: torch.nn.Module, strict: bool = False) -> torch.nn.Module:
    """Swaps every supported native module in `model` for its handgrad drop-in, in place.

    Args:
        model: any torch.nn.Module, on any device (the drop-ins run where the
            model's tensors are: handgrad's CPU kernels, or its CUDA kernels).
        strict: raise ValueError instead of warning when a module's
            configuration is unsupported (a drop-in's
            ``handgrad_unsupported_reason``; none refuses one at present).

    Returns:
        The same model object. Modules left native are listed, with the
        reason, in a warning and in ``model.handgrad_patch_report`` (a list
        of ``(qualified name, class name, reason)``).
    """
    left_native = PatchReport()
    for name, module in model.named_modules():
        drop_in_name = DROP_INS.get(type(module))
        if drop_in_name is None:
            continue
        drop_in = getattr(hgnn, drop_in_name, None)
        reason = ("handgrad has no %s yet" % drop_in_name if drop_in is None
                  else unsupported_reason(module, drop_in))
        if reason is not None:
            left_native.append((name or type(model).__name__, type(module).__name__, reason))
            continue
        module.__class__ = drop_in
    if left_native:
        lines = ["  %s (%s): %s" % entry for entry in left_native]
        message = "handgrad.patch left %d module(s) native:\n%s" % (len(left_native), "\n".join(lines))
        if strict:
            raise ValueError(message)
        warnings.warn(message, stacklevel=2)
    try:
        model.handgrad_patch_report = left_native
    except AttributeError:
        pass
    return model


def unpatch(model: torch.nn.Module) -> torch.nn.Module:
    """Turns handgrad drop-ins back into their native classes (the inverse of
    :func:`patch`), in place; returns the model."""
    natives = {getattr(hgnn, name, None): native for native, name in DROP_INS.items()}
    for module in model.modules():
        native = natives.get(type(module))
        if native is not None:
            module.__class__ = native
    return model
