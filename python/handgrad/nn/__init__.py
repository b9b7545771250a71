"""Drop-in replacements for torch.nn modules, running on handgrad's ops."""

from .pooling import MaxPool2d

__all__ = ["MaxPool2d"]
