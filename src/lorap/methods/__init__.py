"""The methods: what each compression computes, registered by name in registry.py.

Where the paper lives (LoRAP, Li et al. ICML 2024):
    the input statistic s_j       pipeline/statistics.py (ProjectionInputs.norm, InputStatistics.statistic)
    a:1 attention ranks           plan/ranks.py (attention_ranks, reference_square_ranks)
    AWSVD                         factorizations.py (awsvd)
    FFN channel score, 1% rule    ffn_scores.py (lorap_scores), ffn_pruning.py (kept_channels)
    the sequential walk           pipeline/walk.py, pipeline/layer_step.py

    registry.py        every factorization, FFN criterion, FFN update, FFN allocation, rank allocation,
                       head criterion and head update
    presets.py         named combinations: paper, best, the baselines and ablations
    factorizations.py  attention factor pairs
    ffn_scores.py      FFN channel criteria
    ffn_pruning.py     kept channels, slicing, compensation updates
    head_pruning.py    KV groups and their query heads: criteria and slicing (--attention heads)
    allocations.py     adaptive FFN widths (a whole-model pass)
    taylor.py          LLM-Pruner's Taylor scores (a whole-model pass)
"""
