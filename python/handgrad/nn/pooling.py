import torch

from .. import ops


class MaxPool2d(torch.nn.MaxPool2d):
    """torch.nn.MaxPool2d computed by handgrad.ops.max_pool2d.

    Same constructor, attributes and repr as torch.nn.MaxPool2d (it is a
    subclass), so it replaces the native module anywhere.
    """

    def forward(self, input):
        return ops.max_pool2d(input, self.kernel_size, self.stride, self.padding, self.dilation,
                              ceil_mode=self.ceil_mode, return_indices=self.return_indices)
