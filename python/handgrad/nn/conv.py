import torch
import torch.nn.functional as F

from .. import ops


class Conv2d(torch.nn.Conv2d):
    """torch.nn.Conv2d computed by handgrad.ops.conv2d.

    Same constructor, initialization, attributes, repr and state_dict keys as
    torch.nn.Conv2d (it is a subclass). padding_mode 'reflect', 'replicate'
    and 'circular' pad the input with F.pad first, as torch.nn.Conv2d does,
    then run the handgrad convolution without padding.
    """

    def forward(self, input):
        if self.padding_mode != "zeros":
            input = F.pad(input, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            padding = 0
        else:
            padding = self.padding
        return ops.conv2d(input, self.weight, self.bias, self.stride, padding, self.dilation,
                          self.groups)
