"""The plan: ranks, FFN widths and parameter counts from shapes alone, before any weight is loaded.

    ranks.py     LoRAP's two rules (a:1 attention ranks, FFN kept widths)
    plan.py      the per-layer plan, reference and exact modes, the one table of counts
    counting.py  the one place parameters are counted
    memory.py    the peak host memory a run will need
"""
