"""The settings of one recovery run and their validation."""
from dataclasses import asdict, dataclass

from ..errors import LorapError
from ..options import require_positive_int, setting

# How sources pooled with '+' share the training data: "equal" gives each the same number of
# examples (recover/data.py: equal_shares), as calibration gives each the same number of windows;
# "size" keeps every example of each, so a large corpus dominates. Equal is the default because it
# measured better in and out of domain (docs/records/recovery.md, "recovered 30 minutes ... on two domains").
DATA_MIXES = ("equal", "size")
# The peak learning rate when none is given. LoRA keeps the paper's 1e-4. Full fine-tuning takes the
# rate that left the lowest held-out loss (windows of the training text's own train split) at both
# 20% and 50% of the default model, among 5e-5, 2e-4 and 8e-4 (docs/records/recovery.md: recovery-lr-20,
# recovery-lr-50). On a second domain's validation split (pydocs) it tied 5e-5 at 20% and won at 50%.
# Judged, it beat 5e-5 on every corpus at 50%, and at 20% only in domain.
LORA_LR = 1e-4
FULL_LR = 2e-4


@dataclass
class RecoveryConfig:
    """One recovery run; `lorap recover` offers every field as a flag. The LoRA defaults (rank, alpha,
    dropout, rate, epochs, cutoff) are the paper's."""

    data: str | None = setting(
        None, "Alpaca-style instructions (.json/.jsonl with instruction/input/output, or a hub id; 'alpaca' = "
        "yahma/alpaca-cleaned) or plain text ('wiki' train split, a .txt/.jsonl file) (default: alpaca when the "
        "hub can be reached, else wiki); several joined by '+' are pooled (e.g. wiki+notes.txt)")
    data_mix: str = setting(
        "equal", "with sources pooled by '+': 'equal' gives each source the same share of the training and held-out "
        "examples (a small one repeated, a large one sampled; the total stays the same); 'size' trains on every "
        "example of each, so a large corpus dominates", choices=DATA_MIXES)
    epochs: int = setting(2, "passes over the training data")
    max_steps: int | None = setting(
        None, "end the schedule after N optimizer steps; held-out evaluation is sized to the steps, so it adds at most "
        "about a sixth of the training time (under 16 steps of 4 examples: about 2.5 steps)", parse=int)
    max_minutes: float | None = setting(
        None, "stop training when this many minutes (all resumptions together, loading and held-out evaluation "
        "included) would be passed by the final evaluation; the command ends at most one step, plus merging and "
        "saving, later", parse=float)
    decay_steps: int | None = setting(
        None, "the learning rate reaches zero at step N (default: at the last step); training never runs past it, and "
        "stops before it when --max-steps or --max-minutes is reached first", parse=int)
    # Off by default: at 430 steps of the 50% run, decaying to zero did no better on held-out text
    # than a rate that barely decays (docs/records/recovery.md, the schedule control).
    budget_decay: bool = setting(
        False, "with --max-minutes, also hold the rate to the peak times the share of the budget left, so it reaches "
        "zero as the budget runs out (default: the step schedule alone)")
    lr: float | None = setting(
        None, f"peak learning rate (default: {LORA_LR:g} for LoRA, {FULL_LR:g} with --full, chosen on held-out text)",
        parse=float)
    lora_r: int = setting(8, "LoRA rank")
    lora_alpha: float = setting(16.0, "LoRA alpha")
    lora_dropout: float = setting(0.05, "LoRA dropout")
    cutoff: int = setting(256, "tokens per example (a text window, or a truncated instruction)")
    batch_size: int = setting(4, "examples per forward pass")
    grad_accum: int = setting(1, "forward passes per optimizer step")
    val_size: int | None = setting(
        None, "held-out examples, every one scored at each evaluation (default: min(2000, 5% of the data) held out, "
        "of which each evaluation scores one per 4 examples trained since the last, at least 16; with --max-minutes "
        "at most a tenth of the budget's worth)", parse=int)
    max_examples: int | None = setting(None, "train on at most N examples", parse=int)
    warmup_steps: int | None = setting(None, "linear warmup (default: min(100, 10% of the steps))", parse=int)
    eval_every: int = setting(100, "held-out loss every N steps")
    save_every: int = setting(50, "resumable checkpoint every N steps")
    seed: int = setting(0, "seed of the held-out split, the example order and LoRA's initialisation")
    device: str | None = setting(None, "cpu, cuda, cuda:1 ... (default: cuda if available)")
    full: bool = setting(False, "train every compressed weight (factors, kept FFN channels, norms) instead of LoRA")
    train_embeddings: bool = setting(False, "with --full: also train the embeddings and LM head")
    teacher: str | None = setting(
        None, "distil from this model: 'base' (the model the checkpoint was compressed from), a folder or hub id, or "
        "'none' (default: none)")
    kd_weight: float = setting(1.0, "share of the distillation loss, the rest next-token loss (1: distillation only)")
    kd_temperature: float = setting(1.0, "distillation temperature")
    kd_hidden_weight: float = setting(0.0, "weight of a loss matching each layer's output to the teacher's (0: off)")

    def __post_init__(self):
        # Resolved here, so the recorded settings (and a resumption's comparison with them) hold the rate used.
        if self.lr is None:
            self.lr = FULL_LR if self.full else LORA_LR

    @property
    def distills(self) -> bool:
        return self.teacher not in (None, "none")

    def validate(self) -> None:
        positive = {
            "epochs": self.epochs,
            "lora_r": self.lora_r,
            "cutoff": self.cutoff,
            "batch_size": self.batch_size,
            "grad_accum": self.grad_accum,
            "eval_every": self.eval_every,
            "save_every": self.save_every,
        }
        for name in ("max_steps", "decay_steps", "val_size", "max_examples"):
            if getattr(self, name) is not None:
                positive[name] = getattr(self, name)
        for name, value in positive.items():
            require_positive_int(name.replace("_", " "), value)
        if self.warmup_steps is not None and (not isinstance(self.warmup_steps, int) or self.warmup_steps < 0):
            raise LorapError(f"warmup steps must be a non-negative integer, got {self.warmup_steps!r}")
        if not self.lr > 0:
            raise LorapError(f"learning rate must be positive, got {self.lr}")
        if not 0 <= self.lora_dropout < 1:
            raise LorapError(f"LoRA dropout must be in [0, 1), got {self.lora_dropout}")
        if not self.lora_alpha > 0:
            raise LorapError(f"LoRA alpha must be positive, got {self.lora_alpha}")
        if self.max_minutes is not None and not self.max_minutes > 0:
            raise LorapError(f"--max-minutes must be positive, got {self.max_minutes}")
        if not 0 <= self.kd_weight <= 1:
            raise LorapError(f"--kd-weight must lie in [0, 1] (the distillation share of the loss), got {self.kd_weight}")
        if not self.kd_temperature > 0:
            raise LorapError(f"--kd-temperature must be positive, got {self.kd_temperature}")
        if not self.kd_hidden_weight >= 0:
            raise LorapError(f"--kd-hidden-weight must be zero or positive, got {self.kd_hidden_weight}")
        if not self.distills and (self.kd_hidden_weight > 0 or self.kd_weight != 1.0 or self.kd_temperature != 1.0):
            raise LorapError("--kd-weight, --kd-temperature and --kd-hidden-weight need a teacher: add --teacher base "
                             "(the model this checkpoint was compressed from) or --teacher MODEL")
        if self.data_mix not in DATA_MIXES:
            raise LorapError(f"--data-mix must be one of {', '.join(DATA_MIXES)}, got {self.data_mix!r}")
        if self.train_embeddings and not self.full:
            raise LorapError("--train-embeddings needs --full (LoRA never targets the embeddings or the LM head)")

    def to_dict(self) -> dict:
        return asdict(self)
