"""The settings of a compression run: what the CLI fills in and what the checkpoint records."""
from dataclasses import asdict, dataclass, field, fields

from ..errors import LorapError
from ..families import ATTENTION_PROJECTIONS, FFN_PROJECTIONS, PROJECTIONS
from ..methods.registry import (FACTORIZATIONS, FFN_ALLOCATIONS, FFN_SCORES, HEAD_DIM_SCORES, HEAD_DIM_UPDATES,
                                HEAD_SCORES, REGISTRIES, MethodSpec, part_options)
from ..options import require_positive_int, setting
from ..plan.plan import PlanSettings

SVD_DTYPES = ("float32", "float64")


@dataclass
class CalibrationSettings:
    """The calibration text and compute of a run that looks at activations; `compress`, `compare`
    and `analyze` offer the same flags from these fields."""

    calibration_source: str = setting(
        "wiki", "calibration corpus (a named corpus's train split, or a file); several joined by '+' are pooled "
        "(wiki+notes.txt)",
        flag="--calibration")
    calibration_samples: int = setting(128, "calibration sequences", flag="--samples")
    calibration_seqlen: int = setting(128, "tokens per calibration sequence", flag="--sample-len")
    seed: int = setting(0, "seed of the calibration sample")
    batch_size: int = setting(8, "calibration sequences per forward pass")
    device: str | None = setting(None, "compute device for the layer being processed: cpu, cuda, cuda:1 ... "
                                 "(default: cuda if available)")

    def calibration(self) -> dict:
        """These settings alone, by name (a comparison hands them to every row's config)."""
        return {field.name: getattr(self, field.name) for field in fields(CalibrationSettings)}

    def validate_calibration(self) -> None:
        for name in ("calibration_samples", "calibration_seqlen", "batch_size"):
            require_positive_int(name.replace("_", " "), getattr(self, name))


@dataclass
class CompressionConfig(PlanSettings, CalibrationSettings):
    """A compression run: the plan's settings (whose defaults are the paper's), the method parts, their
    options, and the calibration."""

    # The method parts, each a name in its registry (methods/registry.py); the default is the first,
    # the paper's where it has one. ffn_update and head_update (they add biases), rank_allocation (its
    # `share` rule) and layer_allocation (it may remove layers) are PlanSettings', which shape the plan.
    factorization: str = FACTORIZATIONS.default  # factor pairs (attention's; the FFN's with --ffn lowrank)
    ffn_score: str = FFN_SCORES.default  # FFN channel criterion
    # uniform: every layer keeps the plan's FFN width; adaptive: the same total is removed, the
    # channels chosen across layers by their scores standardised per layer (FLAP's AL rule)
    ffn_allocation: str = FFN_ALLOCATIONS.default
    head_score: str = HEAD_SCORES.default  # with attention "heads": which KV groups go
    head_dim_score: str = HEAD_DIM_SCORES.default  # with attention "headdim": which dimensions each head keeps
    head_dim_update: str = HEAD_DIM_UPDATES.default  # with attention "headdim": what o_proj becomes
    # The chosen parts' options (options.Option, declared on their registry entries), where given;
    # the rest take their declared defaults
    options: dict = field(default_factory=dict)
    preset: str = "paper"  # the named method (methods/presets.py) these settings started from
    svd_dtype: str = setting("float32", "precision of the factorizations' SVDs (never the model's fp16/bf16)",
                             choices=SVD_DTYPES)

    def plan_settings(self) -> PlanSettings:
        """The plan's fields of this config, as the plan records them."""
        return PlanSettings(**{f.name: getattr(self, f.name) for f in fields(PlanSettings)} | {
            "sublayers": tuple(self.sublayers)})

    def option(self, name: str):
        """The value of a part option: as given, else its declared default."""
        return self.options.get(name, part_options()[name].default)

    def validate(self) -> None:
        PlanSettings.validate(self)
        self.validate_calibration()
        self.specs()  # every part is a registered name
        if self.attention != "lowrank" and REGISTRIES["rank_allocation"][self.rank_allocation].needs_whole_model:
            raise LorapError(f"--rank-allocation {self.rank_allocation} shares ranks between factor pairs; "
                             f"with --attention {self.attention} there are none (use --rank-allocation rule)")
        if (self.layer_allocation != "uniform" and not self.removes_layers
                and "adaptive" in (self.ffn_allocation, self.rank_allocation)):
            raise LorapError(f"--layer-allocation {self.layer_allocation} sets each layer's budget; adaptive FFN "
                             "widths or ranks would spread it again (use uniform ones with it)")
        known = part_options()
        unknown = set(self.options) - set(known)
        if unknown:
            raise LorapError(f"unknown method options {sorted(unknown)}; known: {', '.join(sorted(known))}")
        for name, value in self.options.items():
            known[name].check(value)
        if self.svd_dtype not in SVD_DTYPES:
            raise LorapError(f"svd dtype must be float32 or float64, got {self.svd_dtype!r}")

    def specs(self) -> dict:
        """{part: its registered MethodSpec}, in the order their whole-model passes run."""
        return {part: registry[getattr(self, part)] for part, registry in REGISTRIES.items()}

    def active_parts(self) -> dict:
        """{part: the logical projections it compresses}, for the parts this run uses: the attention parts
        of the chosen attention method (factor pairs or heads) where attention is compressed, the FFN's
        (channel parts, or the factorization with --ffn lowrank) where the FFN is. Removing whole layers
        uses the layer allocation alone: the kept layers stay as they are."""
        if self.removes_layers:
            return {"layer_allocation": PROJECTIONS}
        attention = {"heads": ("head_score", "head_update"), "headdim": ("head_dim_score", "head_dim_update")}.get(
            self.attention, ("factorization", "rank_allocation"))
        ffn = ("factorization",) if self.ffn == "lowrank" else ("ffn_score", "ffn_update", "ffn_allocation")
        active = {}
        for sublayer, parts, projections in (("attention", attention, ATTENTION_PROJECTIONS),
                                             ("ffn", ffn, FFN_PROJECTIONS)):
            if sublayer in self.sublayers:
                for part in parts:
                    active[part] = active.get(part, ()) + projections
        return {"layer_allocation": PROJECTIONS, **active}

    def options_of(self, part: str) -> dict:
        """The keyword arguments the chosen `part`'s function takes ({} for most)."""
        return {option.name: self.option(option.name) for option in self.specs()[part].options}

    def whole_model_specs(self) -> dict:
        """{part: spec} of the parts this run uses that look at every layer before compressing any, in
        the order their passes run. A chosen criterion of a part the run does not use (a head score
        with low-rank attention) costs no pass. FLAP's joint allocation of heads and channels is the
        FFN allocation's pass, so with head pruning it serves the attention as well."""
        used = set(self.active_parts())
        if self.attention == "heads" and "attention" in self.sublayers and self.ffn == "channels" and not self.removes_layers:
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
        from ..families import SHARED_INPUTS

        sources = set()
        for part, projections in self.active_parts().items():
            spec: MethodSpec = self.specs()[part]
            if spec.needs_gram:
                read = set(spec.reads) & set(projections)
                sources |= {source for source, served in SHARED_INPUTS.items() if set(served) & read}
        return tuple(sorted(sources))

    def to_dict(self) -> dict:
        """What a checkpoint records: every setting, each part option at its value in this run."""
        settings = asdict(self)
        del settings["options"]
        return {**settings, "sublayers": list(self.sublayers),
                **{name: self.option(name) for name in part_options()}}
