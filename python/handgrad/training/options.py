"""The named choices of ``handgrad train`` (no torch import: ``--help`` works without it)."""

import math

AUGMENTATIONS = {"none": None, "flip": 0, "crop-flip": 4}  # name -> crop padding (pixels)

# name -> the learning rate's multiplier at `progress` through the run (0 at the
# first step, below 1 at the last): constant, or cosine annealing from 1 towards 0.
LR_SCHEDULES = {
    "constant": lambda progress: 1.0,
    "cosine": lambda progress: 0.5 * (1.0 + math.cos(math.pi * progress)),
}

BACKENDS = ("handgrad", "native")  # handgrad's ops (through handgrad.patch) or native ones
AMP_CHOICES = ("bf16", "fp16")
DEVICE_CHOICES = "auto, cpu, cuda or cuda:N"


def schedule_factor(schedule, progress):
    if schedule not in LR_SCHEDULES:
        raise ValueError("unknown learning-rate schedule %r (have %s)"
                         % (schedule, ", ".join(LR_SCHEDULES)))
    return LR_SCHEDULES[schedule](progress)
