"""One dataclass for a compression run: what the CLI fills in and what the checkpoint records."""
from dataclasses import asdict, dataclass, field

from .allocate import SUBLAYERS, PlanSettings
from .errors import LorapError
from .factorize import FACTORIZERS


@dataclass
class CompressionConfig:
    ratio: float = 0.2
    mode: str = "reference"  # "reference" (ratio per layer, as the paper) or "exact" (ratio of the whole model)
    allocation_a: float = 3.0
    bottom_keep: float = 0.01
    sublayers: tuple = SUBLAYERS
    factorization: str = "awsvd"
    calibration_source: str = "wiki"
    calibration_samples: int = 128
    calibration_seqlen: int = 128
    seed: int = 0
    batch_size: int = 8  # calibration sequences per forward pass
    device: str | None = None  # compute device for the layer being processed; None: cuda if available
    svd_dtype: str = "float32"  # float32 or float64; never the model's fp16/bf16
    extra: dict = field(default_factory=dict)

    def plan_settings(self) -> PlanSettings:
        return PlanSettings(self.ratio, self.mode, self.allocation_a, self.bottom_keep, tuple(self.sublayers))

    def validate(self) -> None:
        self.plan_settings().validate()
        if self.factorization not in FACTORIZERS:
            raise LorapError(f"unknown factorization {self.factorization!r}; choose from {', '.join(FACTORIZERS)}")
        if self.svd_dtype not in ("float32", "float64"):
            raise LorapError(f"svd dtype must be float32 or float64, got {self.svd_dtype!r}")
        for name in ("calibration_samples", "calibration_seqlen", "batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise LorapError(f"{name.replace('_', ' ')} must be a positive integer, got {value!r}")

    def to_dict(self) -> dict:
        return {**asdict(self), "sublayers": list(self.sublayers)}
