"""The names of the registered method parts, without importing torch (the CLI builds its parser
from these before any heavy import). Each registry asserts at import that its keys match."""

FACTORIZATIONS = ("awsvd", "svd", "asvd", "svdllm")  # factorize.FACTORIZERS
FFN_SCORES = ("lorap", "magnitude", "wanda-sp", "flap", "llm-pruner-l2", "llm-pruner-taylor")  # prune.CHANNEL_SCORERS
FFN_UPDATES = ("none", "bias", "lstsq")  # prune.prune_ffn
FFN_ALLOCATIONS = ("uniform", "adaptive")  # adaptive.py
