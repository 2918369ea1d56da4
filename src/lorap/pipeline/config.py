"""One dataclass for a compression run: what the CLI fills in and what the checkpoint records."""
from dataclasses import asdict, dataclass, field

from ..errors import LorapError
from ..methods.registry import LSTSQ_RIDGE, REGISTRIES, MethodSpec
from ..plan.plan import SUBLAYERS, PlanSettings


@dataclass
class CompressionConfig:
    ratio: float = 0.2
    mode: str = "reference"  # "reference" (ratio per layer, as the paper) or "exact" (ratio of the whole model)
    allocation_a: float = 3.0
    bottom_keep: float = 0.01
    sublayers: tuple = SUBLAYERS
    # The method parts, each a name in its registry (methods/registry.py)
    factorization: str = "awsvd"  # attention factor pairs: FACTORIZATIONS
    ffn_score: str = "lorap"  # FFN channel criterion: FFN_SCORES
    ffn_update: str = "none"  # compensation of removed FFN channels: FFN_UPDATES
    # uniform: every layer keeps the plan's FFN width; adaptive: the same total is removed, the
    # channels chosen across layers by their scores standardised per layer (FLAP's AL rule)
    ffn_allocation: str = "uniform"
    # rule: the plan's a:1 ranks from shapes; adaptive: each layer's pair budget shared by the
    # projections' spectra (methods/rank_allocation.py)
    rank_allocation: str = "rule"
    # "lowrank": attention projections become factor pairs (the paper); "heads": whole KV groups
    # are removed with their query heads, chosen by `head_score`, compensated by `head_update`
    attention: str = "lowrank"
    head_score: str = "flap"  # HEAD_SCORES
    head_update: str = "none"  # HEAD_UPDATES
    attention_scale: float = 1.0  # attention's per-layer ratio relative to the FFN's (paper: 1)
    # Strengths of two parts that fit the calibration text (a part reads those it names in its registry
    # entry's `options`): svdllm whitens by (1 - s) Gram + s diag(Gram), so 1 is AWSVD's scaling; the
    # least-squares refit adds this ridge relative to the kept inputs' mean variance (large: bias-like)
    whitening_shrink: float = 0.0
    lstsq_ridge: float = LSTSQ_RIDGE
    # Every rank and FFN width a multiple of this (1: the paper's integers; "auto": this device's
    # multiple, plan/alignment.py, which the run resolves and records)
    align: int | str = 1
    # Whose measured limits keep dense a factor pair too large to run faster than its matrix
    # ("none": only a pair that is not smaller, the paper's rule; "auto" alignment sets the
    # device's, plan/alignment.py, recorded here)
    pair_limit: str = "none"
    preset: str = "paper"  # the named method (methods/presets.py) these settings started from
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
                            self.ffn_update, self.attention_scale, self.align, self.pair_limit, self.attention,
                            self.head_update)

    def validate(self) -> None:
        self.plan_settings().validate()
        self.specs()  # every part is a registered name
        if self.attention == "heads" and REGISTRIES["rank_allocation"][self.rank_allocation].needs_whole_model:
            raise LorapError(f"--rank-allocation {self.rank_allocation} shares ranks between factor pairs; "
                             "with --attention heads there are none (use --rank-allocation rule)")
        if not 0 <= self.whitening_shrink <= 1:
            raise LorapError(f"--whitening-shrink must be in [0, 1] (0: SVD-LLM whitening, 1: AWSVD's scaling), "
                             f"got {self.whitening_shrink}")
        if not self.lstsq_ridge > 0:
            raise LorapError(f"--lstsq-ridge must be positive (it keeps the refit well posed), got {self.lstsq_ridge}")
        if self.svd_dtype not in ("float32", "float64"):
            raise LorapError(f"svd dtype must be float32 or float64, got {self.svd_dtype!r}")
        for name in ("calibration_samples", "calibration_seqlen", "batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise LorapError(f"{name.replace('_', ' ')} must be a positive integer, got {value!r}")

    def specs(self) -> dict:
        """{part: its registered MethodSpec}, in the order their whole-model passes run."""
        return {part: registry[getattr(self, part)] for part, registry in REGISTRIES.items()}

    def active_parts(self) -> dict:
        """{part: the sublayer it compresses}, for the parts this run uses: the attention parts of the
        chosen attention method (factor pairs or heads), the FFN parts where the FFN is compressed."""
        attention = ("head_score", "head_update") if self.attention == "heads" else ("factorization", "rank_allocation")
        parts = {part: "attention" for part in attention}
        parts.update({part: "ffn" for part in ("ffn_score", "ffn_update", "ffn_allocation")})
        return {part: sublayer for part, sublayer in parts.items() if sublayer in self.sublayers}

    def options_of(self, part: str) -> dict:
        """The keyword arguments the chosen `part`'s function takes ({} for most)."""
        return {name: getattr(self, name) for name in self.specs()[part].options}

    def whole_model_specs(self) -> dict:
        """{part: spec} of the parts this run uses that look at every layer before compressing any, in
        the order their passes run. A chosen criterion of a part the run does not use (a head score
        with low-rank attention) costs no pass. FLAP's joint allocation of heads and channels is the
        FFN allocation's pass, so with head pruning it serves the attention as well."""
        used = set(self.active_parts())
        if self.attention == "heads" and "attention" in self.sublayers:
            used.add("ffn_allocation")
        return {part: spec for part, spec in self.specs().items() if part in used and spec.needs_whole_model}

    @property
    def needs_whole_model(self) -> bool:
        """Settings that look at every layer before compressing any (a streamed run scores the shards first)."""
        return bool(self.whole_model_specs())

    def whole_model_parts(self) -> list:
        return [f"{part.replace('_', ' ')} {spec.name}" for part, spec in self.whole_model_specs().items()]

    def gram_sources(self) -> tuple:
        """The input sources whose Gram matrices the chosen parts read (pipeline/statistics.py)."""
        from ..architectures import SHARED_INPUTS

        sources = set()
        for part in self.active_parts():
            spec: MethodSpec = self.specs()[part]
            if spec.needs_gram:
                sources |= {source for source, served in SHARED_INPUTS.items() if set(served) & set(spec.reads)}
        return tuple(sorted(sources))

    def to_dict(self) -> dict:
        return {**asdict(self), "sublayers": list(self.sublayers)}
