"""One dataclass for a compression run: what the CLI fills in and what the checkpoint records."""
from dataclasses import asdict, dataclass, field

from .allocate import SUBLAYERS, PlanSettings
from .choices import FACTORIZATIONS, FFN_ALLOCATIONS, FFN_SCORES, FFN_UPDATES
from .errors import LorapError


@dataclass
class CompressionConfig:
    ratio: float = 0.2
    mode: str = "reference"  # "reference" (ratio per layer, as the paper) or "exact" (ratio of the whole model)
    allocation_a: float = 3.0
    bottom_keep: float = 0.01
    sublayers: tuple = SUBLAYERS
    factorization: str = "awsvd"  # attention: factorize.FACTORIZERS
    ffn_score: str = "lorap"  # FFN channel criterion: prune.CHANNEL_SCORERS
    ffn_update: str = "none"  # compensation of removed FFN channels: prune.FFN_UPDATES
    # uniform: every layer keeps the plan's FFN width; adaptive: the same total is removed, the
    # channels chosen across layers by their scores standardised per layer (FLAP's AL rule)
    ffn_allocation: str = "uniform"
    attention_scale: float = 1.0  # attention's per-layer ratio relative to the FFN's (paper: 1)
    preset: str = "paper"  # the named method (methods.py) these settings started from
    calibration_source: str = "wiki"
    calibration_samples: int = 128
    calibration_seqlen: int = 128
    seed: int = 0
    batch_size: int = 8  # calibration sequences per forward pass
    device: str | None = None  # compute device for the layer being processed; None: cuda if available
    svd_dtype: str = "float32"  # float32 or float64; never the model's fp16/bf16
    extra: dict = field(default_factory=dict)

    def plan_settings(self) -> PlanSettings:
        return PlanSettings(self.ratio, self.mode, self.allocation_a, self.bottom_keep, tuple(self.sublayers),
                            self.ffn_update, self.attention_scale)

    def validate(self) -> None:
        self.plan_settings().validate()
        if self.factorization not in FACTORIZATIONS:
            raise LorapError(f"unknown factorization {self.factorization!r}; choose from {', '.join(FACTORIZATIONS)}")
        if self.ffn_score not in FFN_SCORES:
            raise LorapError(f"unknown FFN channel criterion {self.ffn_score!r}; choose from {', '.join(FFN_SCORES)}")
        if self.ffn_update not in FFN_UPDATES:
            raise LorapError(f"unknown FFN update {self.ffn_update!r}; choose from {', '.join(FFN_UPDATES)}")
        if self.ffn_allocation not in FFN_ALLOCATIONS:
            raise LorapError(f"unknown FFN allocation {self.ffn_allocation!r}; choose from {', '.join(FFN_ALLOCATIONS)}")
        if self.svd_dtype not in ("float32", "float64"):
            raise LorapError(f"svd dtype must be float32 or float64, got {self.svd_dtype!r}")
        for name in ("calibration_samples", "calibration_seqlen", "batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise LorapError(f"{name.replace('_', ' ')} must be a positive integer, got {value!r}")

    @property
    def needs_whole_model(self) -> bool:
        """Settings that look at every layer before compressing any (so cannot be streamed)."""
        return self.ffn_allocation == "adaptive" or self.ffn_score == "llm-pruner-taylor"

    def to_dict(self) -> dict:
        return {**asdict(self), "sublayers": list(self.sublayers)}
