"""handgrad: hand-written CPU and CUDA kernels with hand-derived gradients.

Every op is a real PyTorch operator (``torch.ops.handgrad.*``) with CPU and
CUDA kernels, a fake implementation for torch.compile and autograd that calls
the op's own backward kernel. Use them through:

* ``handgrad.ops``: functions with the signatures of torch.nn.functional;
* ``handgrad.nn``: drop-in modules for their torch.nn counterparts.
"""

import torch  # noqa: F401  (libtorch must be loaded before the extension)

from . import _C  # noqa: F401  (registers torch.ops.handgrad.*)
from . import cuda_emulation, nn, ops
from ._info import info
from .patch import patch, unpatch

__version__ = _C.build_info()["version"]

__all__ = ["cuda_emulation", "info", "nn", "ops", "patch", "unpatch", "__version__"]
