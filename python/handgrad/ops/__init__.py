"""handgrad's operators, with the signatures of torch.nn.functional.

Each op has one module here holding its fake (meta) kernel for torch.compile,
its autograd registration (which calls the op's own backward kernel) and its
public function. Adding an op adds one line to this list.
"""

from .attention import scaled_dot_product_attention
from .conv2d import conv2d
from .cross_entropy import cross_entropy
from .lstm import lstm_cell, lstm_layer
from .max_pool2d import max_pool2d
from . import _autocast  # noqa: E402,F401  (autocast kernels for the ops above)

__all__ = ["conv2d", "cross_entropy", "lstm_cell", "lstm_layer", "max_pool2d",
           "scaled_dot_product_attention"]
