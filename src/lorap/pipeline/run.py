"""One compression run, whatever the layer source: plan, checks, whole-model passes, the layer walk,
metadata, report and the atomic write of the checkpoint.

    compress_layers(source, tokenizer, config)   the compression itself (source: sources.py)
    compress_model(model, tokenizer, config)     the same on a model in memory (tests, compare)
    compress_checkpoint(model, out, config, ...) the whole job behind `lorap compress` / lorap.compress()
"""
import shutil
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from ..architectures import Architecture
from ..devices import peak_memory, phase_peak_rss_mb, resolve_device
from ..errors import LorapError
from ..io.checkpoint import REPORT_FILE, check_output_folder, finish_checkpoint, new_staging_folder
from ..io.data import calibration_samples
from ..io.files import write_json_atomic
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


def compress_layers(source, tokenizer, config: CompressionConfig, progress: bool = True) -> CompressionResult:
    """Compress every decoder layer of `source` by `config`; returns the plan followed and timings per phase."""
    config.validate()
    plan = make_plan(source.model_config, config.plan_settings())
    # The multiple and the factor-pair limit used ("auto" resolves in the plan), as recorded
    config = replace(config, align=plan.settings.align, pair_limit=plan.settings.pair_limit)
    dense = source.dense_parameters()
    if dense != plan.dense_parameters:
        raise RuntimeError(f"plan counts {plan.dense_parameters} dense parameters, the model has {dense}")
    source.check_room(plan)
    device = resolve_device(config.device)
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
    peaks["layer_walk"] = phase_peak_rss_mb()
    counted = source.compressed_parameters()
    if counted != run.plan.compressed_parameters:
        raise RuntimeError(f"compressed model has {counted} parameters, the plan says {run.plan.compressed_parameters}")
    return CompressionResult(source.whole_model(), run.plan, config, timings, peaks)


def compress_model(model, tokenizer, config: CompressionConfig, progress: bool = True) -> CompressionResult:
    """Compress `model` in place by `config`."""
    return compress_layers(InMemoryLayers(model), tokenizer, config, progress)


def checkpoint_metadata(result: CompressionResult, base_model, architecture: Architecture) -> dict:
    """What config.json records under `lorap`: enough to rebuild the shapes and redo the run."""
    from .. import __version__

    config = result.config
    return {
        "version": __version__,
        "base_model": base_model,
        "base_architecture": architecture.family.base_class,
        "architecture": architecture.record(),
        "layers": result.plan.layout(),
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


def _perplexity_record(model, tokenizer, label: str, name: str, device, datasets, seqlens, max_tokens) -> dict:
    from ..evaluate.perplexity import perplexity_table
    from ..plan.counting import count_parameters

    model.to(device)
    record = {
        "model": f"{name} ({label})",
        "parameters": count_parameters(model),
        "perplexity": perplexity_table(model, tokenizer, datasets, seqlens, max_tokens),
    }
    model.to("cpu")
    return record


def compress_checkpoint(
    model=None,
    out=None,
    config: CompressionConfig | None = None,
    evaluate_ppl=(),
    eval_seqlens=(128,),
    eval_max_tokens=None,
    overwrite: bool = False,
    progress: bool = True,
    stream: bool | None = None,
    stream_options: StreamOptions | None = None,
    predict_speed: bool = True,
) -> Compressed:
    """Load (or stream) a model, compress it, save it to `out` (if given) and report what was done.

    With `predict_speed`, the report gains the speedup predicted by a micro-benchmark of the plan's
    layers (bench/predict.py), measured after the peak memory; never in a streamed run, whose point
    is to hold no more than one layer.

    Streamed when `stream` is true, when resuming, or (stream None) when the model would not fit in
    memory: the model is then read layer by layer from its shards and never held whole.
    """
    from ..evaluate.perplexity import protocol

    config.validate()
    stream_options = stream_options or StreamOptions()
    started = time.perf_counter()
    spec = resolve_model(model)
    timings = {}
    if stream or stream_options.resume or (stream is None and should_stream(spec)):
        if evaluate_ppl:
            raise LorapError("a streamed run never holds the whole model, so it cannot --eval; run `lorap eval OUT` after it")
        source = ShardedLayers(spec, out, config, overwrite, stream_options)
        tokenizer = source.tokenizer
    else:
        if out is not None:  # fail before the long work, not after it
            check_output_folder(out, overwrite, protected=[spec.location] if spec.kind != "hub" else [])
        loaded, tokenizer, spec = load_model(model)
        own_weights(loaded, spec.location if spec.kind in ("default", "folder", "lorap") else None)
        timings["load"] = time.perf_counter() - started
        source = InMemoryLayers(loaded)
    device = resolve_device(config.device)

    def measure(label):
        begin = time.perf_counter()
        record = _perplexity_record(source.model, tokenizer, label, spec.name, device, evaluate_ppl, eval_seqlens,
                                    eval_max_tokens)
        timings[f"eval_{label}"] = time.perf_counter() - begin
        return record

    evaluation = {"dense": measure("dense")} if evaluate_ppl else None
    result = compress_layers(source, tokenizer, config, progress)
    timings.update(result.timings)
    if evaluation is not None:
        evaluation["compressed"] = measure("compressed")
        evaluation["protocol"] = protocol(eval_max_tokens)

    # How the checkpoint names its base model: None means lorap's built-in default.
    base_model = None if spec.kind == "default" else spec.location
    source.mark_compressed(checkpoint_metadata(result, base_model, source.architecture))
    report = {
        "model": spec.name,
        "base_model": base_model,
        "output": str(Path(out).resolve()) if out is not None else None,
        "settings": config.to_dict(),
        "plan": result.plan.to_dict(),
        "timings": timings,
        "peak_memory": peak_memory(device),
        "peak_rss_mb_by_phase": result.peak_rss_mb,
        "evaluation": evaluation,
        **environment(str(device)),
    }
    streaming = source.report_section(result)
    if streaming is not None:
        report["streaming"] = streaming
    if out is not None:
        out = Path(out).resolve()
        begin = time.perf_counter()
        _write_checkpoint(source, out, tokenizer, report)
        timings["save"] = time.perf_counter() - begin
    timings["total"] = time.perf_counter() - started
    report["peak_memory"] = peak_memory(device)
    if predict_speed:
        report["predicted_speed"] = _predicted_speed(model, result.plan, config, streamed=streaming is not None)
    if out is not None:  # the report in the checkpoint includes the save and total times too
        write_json_atomic(out / REPORT_FILE, report)
    return Compressed(result.model, tokenizer, report)


def _predicted_speed(model, plan, config, streamed: bool) -> dict:
    from ..bench.predict import predict_speedup

    if streamed:
        return {"skipped": "a streamed run holds one layer at a time; run `lorap plan` for the prediction"}
    return predict_speedup(load_config(model), plan, config.device)


def _write_checkpoint(source, out: Path, tokenizer, report: dict) -> None:
    """Weights and config by the source, the rest as every checkpoint, then the swap into place.
    A fresh staging folder is removed if writing fails; a streamed run's stays, to resume."""
    fresh = source.staging is None
    staging = new_staging_folder(out) if fresh else source.staging
    try:
        source.write_weights(staging)
        finish_checkpoint(staging, out, tokenizer, {REPORT_FILE: report})
    finally:
        if fresh and staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
