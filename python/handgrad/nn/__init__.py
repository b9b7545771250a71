"""Drop-in replacements for torch.nn modules, running on handgrad's ops."""

from .attention import MultiheadAttention
from .conv import Conv2d
from .loss import CrossEntropyLoss
from .pooling import MaxPool2d
from .rnn import LSTM, LSTMCell

__all__ = ["Conv2d", "CrossEntropyLoss", "LSTM", "LSTMCell", "MaxPool2d", "MultiheadAttention"]
