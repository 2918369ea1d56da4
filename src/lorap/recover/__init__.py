"""`lorap recover`: LoRA fine-tuning of a compressed checkpoint that stays compressed."""
