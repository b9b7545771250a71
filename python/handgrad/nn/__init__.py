"""Drop-in replacements for torch.nn modules, running on handgrad's ops."""

from .attention import MultiheadAttention
from .conv import Conv2d
from .pooling import MaxPool2d

__all__ = ["Conv2d", "MaxPool2d", "MultiheadAttention"]
