"""Argument normalization shared by the public op functions.

torch.nn.functional accepts an int or a 1- or 2-element sequence wherever a
2-D op takes a pair; the C++ schemas take exactly two values.
"""

import numbers


def pair(value, name):
    """An int or a 1-/2-element sequence of ints as a 2-tuple of ints."""
    if isinstance(value, bool):
        raise TypeError("%s must be an int or a tuple of two ints, not a bool" % name)
    if isinstance(value, numbers.Integral):
        return (int(value), int(value))
    try:
        values = tuple(value)
    except TypeError:
        raise TypeError("%s must be an int or a tuple of two ints, but got %r"
                        % (name, value)) from None
    if len(values) == 1:
        values = values * 2
    if len(values) != 2 or not all(isinstance(v, numbers.Integral) and not isinstance(v, bool)
                                   for v in values):
        raise ValueError("%s must be an int or a tuple of two ints, but got %r" % (name, value))
    return tuple(int(v) for v in values)
