"""Drop-in replacements for torch.nn modules, running on handgrad's ops."""

from .conv import Conv2d
from .loss import CrossEntropyLoss
from .pooling import MaxPool2d

__all__ = ["Conv2d", "CrossEntropyLoss", "MaxPool2d"]
