"""The export options' choices, as names only: the CLI offers them before torch is imported."""

WEIGHT_DTYPE_NAMES = ("f32", "f16", "bf16")  # export/dense.py maps each to its torch dtype
FFN_CHOICES = ("refuse", "pad", "intermediate-size")  # decilm: FFN widths that are not multiples of 256
