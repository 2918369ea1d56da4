"""`lorap recover`: LoRA fine-tuning of a compressed checkpoint that stays compressed (run.py)."""
from .run import Recovered, RecoveryConfig, format_recovery, recover

__all__ = ["Recovered", "RecoveryConfig", "format_recovery", "recover"]
