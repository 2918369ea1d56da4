"""One compression run, whatever the layer source: plan, checks, whole-model passes, the layer walk,
metadata, report and the atomic write of the checkpoint.

    compress_layers(source, tokenizer, config)   the compression itself (source: sources.py)
    compress_model(model, tokenizer, config)     the same on a model in memory (tests, compare)
    compress_checkpoint(job)                     the whole job behind `lorap compress` / lorap.compress()
"""
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

from ..architectures import Architecture
from ..devices import peak_memory, phase_peak_rss_mb, resolve_device
from ..errors import LorapError
from ..evaluate.suite import PerplexitySettings
from ..io.checkpoint import REPORT_FILE, check_output_folder, finish_checkpoint, new_staging_folder
from ..io.data import calibration_samples
from ..io.models import load_config, load_model, own_weights, resolve_model
from ..log import info
from ..plan.plan import Plan, make_plan
from ..provenance import environment
from .config import CompressionConfig
from .layer_step import LayerCompressor
from .sharded import ShardedLayers, StreamOptions, should_stream
from .sources import InMemoryLayers


@dataclass
class CompressionResult:
    model: object  # the compressed model, or None when it was streamed
    plan: Plan
    config: CompressionConfig
    timings: dict = field(default_factory=dict)  # phase -> seconds
    peak_rss_mb: dict = field(default_factory=dict)  # phase -> its own peak resident set (None: not measurable)

    @property
    def parameters(self) -> int:
        return self.plan.compressed_parameters


@dataclass
class PreparedRun:
    """What a registered part's whole-model pass (its `prepare` hook) sees and may change.

    A pass reads the dense model through its layer source: `dense_walk` visits every dense layer in
    order with its input statistics, in memory or streamed from the shards, so a pass that needs
    only per-layer scores runs the same way on both.
    """

    source: object  # the layer source (sources.py, sharded.py)
    samples: object  # calibration token windows [samples, seqlen]
    config: CompressionConfig
    plan: Plan  # a pass may replace it (adaptive FFN widths)
    device: object
    progress: bool
    channel_scores: list | None = None  # per-layer FFN scores, for a criterion scored before the walk
    head_scores: list | None = None  # per-layer query-channel scores, for a head criterion scored before the walk

    @property
    def model(self):
        """The whole dense model, or None when the run streams."""
        return self.source.whole_model()

    def dense_walk(self, visit, desc: str) -> None:
        """visit(index, layer, stats) for every layer of the dense model, in order (nothing is changed)."""
        self.source.dense_walk(self.samples, visit, self.device, self.progress, self.config.batch_size, desc)


@dataclass
class Compressed:
    """What compress() returns: the compressed model (None when streamed), its tokenizer and the report."""

    model: object
    tokenizer: object
    report: dict


def timed_calibration_samples(tokenizer, config: CompressionConfig, timings: dict):
    """The run's calibration token windows; the seconds spent go into timings["calibration_data"]."""
    started = time.perf_counter()
    samples = calibration_samples(
        tokenizer, config.calibration_source, config.calibration_samples, config.calibration_seqlen, config.seed
    )
    timings["calibration_data"] = time.perf_counter() - started
    return samples


def compress_layers(source, tokenizer, config: CompressionConfig, progress: bool = True, device=None) -> CompressionResult:
    """Compress every decoder layer of `source` by `config` (validated by the caller, before anything
    loaded) on `device` (None: the config's); returns the plan followed and timings per phase."""
    plan = make_plan(source.model_config, config.plan_settings())
    # The multiple and the factor-pair limit used ("auto" resolves in the plan), as recorded
    config = replace(config, align=plan.settings.align, pair_limit=plan.settings.pair_limit)
    dense = source.dense_parameters()
    if dense != plan.dense_parameters:
        raise RuntimeError(f"plan counts {plan.dense_parameters} dense parameters, the model has {dense}")
    source.check_room(plan)
    device = device or resolve_device(config.device)
    timings = {}
    samples = timed_calibration_samples(tokenizer, config, timings)
    info(source.describe(config, device))
    # Each phase's own peak: a streamed run's scoring passes and its compressing walk are reported apart.
    peaks = {"before_passes": phase_peak_rss_mb()}

    run = PreparedRun(source, samples, config, plan, device, progress)
    for spec in config.whole_model_specs().values():
        started = time.perf_counter()
        spec.prepare_function()(run)
        # one phase may serve two parts (Taylor gradients for FFN channels and heads, in one pass)
        timings[spec.prepare_phase] = timings.get(spec.prepare_phase, 0.0) + time.perf_counter() - started
        peaks[spec.prepare_phase] = phase_peak_rss_mb()

    step = LayerCompressor(config, run.plan, source.architecture, run.channel_scores, run.head_scores)
    source.walk(samples, step, device, timings, progress, config.batch_size)
    if run.plan.removed_layers:
        source.remove_layers(run.plan.removed_layers)
    peaks["layer_walk"] = phase_peak_rss_mb()
    counted = source.compressed_parameters()
    if counted != run.plan.compressed_parameters:
        raise RuntimeError(f"compressed model has {counted} parameters, the plan says {run.plan.compressed_parameters}")
    return CompressionResult(source.whole_model(), run.plan, config, timings, peaks)


def compress_model(model, tokenizer, config: CompressionConfig, progress: bool = True) -> CompressionResult:
    """Compress `model` in place by `config`."""
    from .sliced import PRESET as SLICEGPT

    if config.preset == SLICEGPT:
        raise LorapError("SliceGPT is not a layer walk: slice a model with pipeline.sliced.slice_in_memory, or "
                         "lorap.compress(preset='slicegpt')")
    config.validate()
    return compress_layers(InMemoryLayers(model), tokenizer, config, progress)


def checkpoint_metadata(result: CompressionResult, base_model, architecture: Architecture) -> dict:
    """What config.json records under `lorap`: enough to rebuild the shapes and redo the run."""
    from .. import __version__

    config = result.config
    removed = {"removed_layers": result.plan.removed_layers} if result.plan.removed_layers else {}
    return {
        "version": __version__,
        "base_model": base_model,
        "base_architecture": architecture.family.base_class,
        "architecture": architecture.record(),
        "layers": result.plan.layout(),
        **removed,  # the dense model's layers removed whole: `layers` lists the others, renumbered
        "compression": config.to_dict(),
        "calibration": {
            "source": config.calibration_source,
            "split": "train",
            "samples": config.calibration_samples,
            "seqlen": config.calibration_seqlen,
            "seed": config.seed,
        },
        "parameters": {"dense": result.plan.dense_parameters, "compressed": result.plan.compressed_parameters},
    }


@dataclass
class CompressionJob:
    """Everything `lorap compress` is asked: the model, where to save it, how to compress it, and what
    else to do. Streamed when `stream` is true, when resuming, or (stream None) when the model would
    not fit in memory: the model is then read layer by layer from its shards and never held whole."""

    model: object = None  # hub id, folder, .gguf; None: the built-in model
    out: Path | None = None  # None: nothing is saved (the result's model is the compressed one)
    config: CompressionConfig = field(default_factory=CompressionConfig)
    evaluate: PerplexitySettings | None = None  # perplexity before and after, on these windows
    overwrite: bool = False
    progress: bool = True
    stream: bool | None = None
    stream_options: StreamOptions = field(default_factory=StreamOptions)
    # the speedup a micro-benchmark of the plan's layers predicts (bench/predict.py); never in a
    # streamed run, whose point is to hold no more than one layer
    predict_speed: bool = True

    def streams(self, spec) -> bool:
        """Whether this job reads `spec` (the resolved model, io.models.ModelSpec) layer by layer."""
        return bool(self.stream or self.stream_options.resume or (self.stream is None and should_stream(spec)))


@dataclass
class _Loaded:
    source: object  # the layer source (sources.py, sharded.py)
    tokenizer: object
    spec: object  # io.models.ModelSpec of what was loaded


def _load(job: CompressionJob, timings: dict) -> _Loaded:
    """The layer source: the model's shards for a streamed run, else the whole model in memory."""
    started = time.perf_counter()
    spec = resolve_model(job.model)
    if job.streams(spec):
        if job.evaluate is not None:
            raise LorapError("a streamed run never holds the whole model, so it cannot --eval; run `lorap eval OUT` after it")
        source = ShardedLayers(spec, job.out, job.config, job.overwrite, job.stream_options)
        return _Loaded(source, source.tokenizer, spec)
    if job.out is not None:  # fail before the long work, not after it
        check_output_folder(job.out, job.overwrite, protected=[spec.location] if spec.kind != "hub" else [])
    model, tokenizer, spec = load_model(job.model)
    own_weights(model, spec.location if spec.kind in ("default", "folder", "lorap") else None)
    timings["load"] = time.perf_counter() - started
    return _Loaded(InMemoryLayers(model), tokenizer, spec)


def _perplexity_record(loaded: _Loaded, label: str, windows: PerplexitySettings, device, timings: dict) -> dict:
    from ..evaluate.perplexity import perplexity_table
    from ..plan.counting import count_parameters

    started = time.perf_counter()
    model = loaded.source.model.to(device)
    record = {
        "model": f"{loaded.spec.name} ({label})",
        "parameters": count_parameters(model),
        "perplexity": perplexity_table(model, loaded.tokenizer, windows.datasets, windows.seqlens, windows.max_tokens),
    }
    model.to("cpu")
    timings[f"eval_{label}"] = time.perf_counter() - started
    return record


def _report(job: CompressionJob, loaded: _Loaded, result: CompressionResult, evaluation: dict | None,
            timings: dict, device) -> dict:
    """What the checkpoint's compression_report.json and `lorap compress --json` hold."""
    base_model = _base_model(loaded.spec)
    report = {
        "model": loaded.spec.name,
        "base_model": base_model,
        "output": str(Path(job.out).resolve()) if job.out is not None else None,
        "settings": result.config.to_dict(),
        "plan": result.plan.to_dict(),
        "timings": timings,
        "peak_memory": peak_memory(device),
        "peak_rss_mb_by_phase": result.peak_rss_mb,
        "evaluation": evaluation,
        **environment(str(device)),
    }
    streaming = loaded.source.report_section(result)
    if streaming is not None:
        report["streaming"] = streaming
    if job.predict_speed:  # after the peak memory, which its micro-benchmark would raise
        report["predicted_speed"] = _predicted_speed(job.model, result.plan, result.config,
                                                     streamed=streaming is not None)
    return report


def _base_model(spec):
    """How the checkpoint names its base model: None means lorap's built-in default."""
    return None if spec.kind == "default" else spec.location


def compress_checkpoint(job: CompressionJob) -> Compressed:
    """Load (or stream) a model, compress it, report what was done and save it to `job.out` (if given):
    load -> compress -> report -> save, the report written once, into the checkpoint before it is
    swapped into place."""
    from ..evaluate.perplexity import protocol
    from .sliced import PRESET as SLICEGPT, slice_checkpoint

    if job.config.preset == SLICEGPT:  # it rotates the whole stream: a job of its own
        return Compressed(*slice_checkpoint(job))
    job.config.validate()  # before anything loads
    _check_plan(job)
    started = time.perf_counter()
    timings = {}
    device = resolve_device(job.config.device)
    loaded = _load(job, timings)
    evaluation = None
    if job.evaluate is not None:
        evaluation = {"dense": _perplexity_record(loaded, "dense", job.evaluate, device, timings)}
    result = compress_layers(loaded.source, loaded.tokenizer, job.config, job.progress, device)
    timings.update(result.timings)
    if evaluation is not None:
        evaluation["compressed"] = _perplexity_record(loaded, "compressed", job.evaluate, device, timings)
        evaluation["protocol"] = protocol(job.evaluate.max_tokens)
    loaded.source.mark_compressed(checkpoint_metadata(result, _base_model(loaded.spec), loaded.source.architecture))
    if job.out is None:
        timings["total"] = time.perf_counter() - started
        return Compressed(result.model, loaded.tokenizer, _report(job, loaded, result, evaluation, timings, device))
    with _staging(loaded.source, Path(job.out).resolve()) as staging:
        saving = time.perf_counter()
        loaded.source.write_weights(staging)
        timings["save"] = time.perf_counter() - saving  # the weights; the small files and the swap follow
        timings["total"] = time.perf_counter() - started
        report = _report(job, loaded, result, evaluation, timings, device)
        finish_checkpoint(staging, Path(job.out).resolve(), loaded.tokenizer, {REPORT_FILE: report})
    return Compressed(result.model, loaded.tokenizer, report)


def _check_plan(job: CompressionJob) -> None:
    """Refuse a budget the model's shapes cannot meet (the plan's LorapError) from its config alone, before
    any weight loads. A config that cannot be read here is left to the load, which says what is wrong."""
    try:
        model_config = load_config(job.model)
    except (OSError, ValueError, LorapError):
        return
    make_plan(model_config, job.config.plan_settings())


def _predicted_speed(model, plan, config, streamed: bool) -> dict:
    from ..bench.predict import predict_speedup

    if streamed:
        return {"skipped": "a streamed run holds one layer at a time; run `lorap plan` for the prediction"}
    return predict_speedup(load_config(model), plan, config.device)


@contextmanager
def _staging(source, out: Path):
    """The folder the checkpoint is written in before the swap into place: the streamed run's own
    (kept if writing fails, to resume), or a fresh one (removed if writing fails)."""
    fresh = source.staging is None
    staging = new_staging_folder(out) if fresh else source.staging
    try:
        yield staging
    finally:
        if fresh and staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
