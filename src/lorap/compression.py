"""Compress an in-memory model: plan, calibrate, walk the layers, check the result.

(Named `compression`, not `compress`, so that it never shadows the `lorap.compress()` function.)
"""
import time
from dataclasses import dataclass, field

import torch

from .allocate import ATTENTION_PROJECTIONS, Plan, make_plan
from .architectures import architecture_of, attention_module, ffn_module
from .calibration import capture_first_layer_inputs, walk_layers
from .config import CompressionConfig
from .counting import count_parameters
from .data import calibration_samples
from .errors import LorapError
from .factorize import NEEDS_GRAM, factorized_linear
from .log import info
from .prune import PRECOMPUTED_SCORERS, channel_scores, kept_channels, prune_ffn

FFN_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


@dataclass
class CompressionResult:
    model: object
    plan: Plan
    config: CompressionConfig
    timings: dict = field(default_factory=dict)  # phase -> seconds

    @property
    def parameters(self) -> int:
        return self.plan.compressed_parameters


def resolve_device(device: str | None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise LorapError(f"device {device} requested but CUDA is not available; use --device cpu")
    return torch.device(device)


def timed_calibration_samples(tokenizer, config: CompressionConfig, timings: dict):
    """The run's calibration token windows; the seconds spent go into timings["calibration_data"]."""
    started = time.perf_counter()
    samples = calibration_samples(
        tokenizer, config.calibration_source, config.calibration_samples, config.calibration_seqlen, config.seed
    )
    timings["calibration_data"] = time.perf_counter() - started
    return samples


def gram_sources(config: CompressionConfig) -> tuple:
    """The projection inputs whose Gram matrices the configured methods need (calibration.InputStatistics)."""
    sources = set()
    if config.factorization in NEEDS_GRAM and "attention" in config.sublayers:
        sources |= {"q_proj", "o_proj"}
    if config.ffn_update == "lstsq" and "ffn" in config.sublayers:
        sources.add("down_proj")
    return tuple(sorted(sources))


class LayerCompressor:
    """The per-layer step of the walk: factorize attention projections, remove FFN channels.

    With the paper's settings this is LoRAP (AWSVD, the paper's channel score, nothing
    compensated); the config chooses the registered alternatives. `gram_sources` tells the walk
    which input Gram matrices to collect (only the methods that use them pay for them).
    """

    def __init__(self, config: CompressionConfig, plan: Plan, precomputed_scores: list | None = None):
        self.config, self.plan, self.precomputed_scores = config, plan, precomputed_scores
        self.svd_dtype = getattr(torch, config.svd_dtype)
        if config.ffn_score in PRECOMPUTED_SCORERS and precomputed_scores is None:
            raise LorapError(f"the {config.ffn_score} criterion needs scores computed before the layer walk")
        self.gram_sources = gram_sources(config)

    def __call__(self, index, layer, stats) -> None:
        self.compress_attention(index, layer, stats)
        self.compress_ffn(index, layer, stats)

    def compress_attention(self, index, layer, stats) -> None:
        attention = attention_module(layer)
        for name in ATTENTION_PROJECTIONS:
            rank = self.plan.layers[index].ranks[name]
            if rank is not None:
                dense = getattr(attention, name)
                factorized = factorized_linear(dense, stats.inputs(name), rank, self.config.factorization, self.svd_dtype)
                setattr(attention, name, factorized)

    def compress_ffn(self, index, layer, stats) -> None:
        mlp = ffn_module(layer)
        width = self.plan.layers[index].ffn_width
        if width == mlp.gate_proj.out_features:
            return
        inputs = {name: stats.inputs(name) for name in FFN_PROJECTIONS}
        if self.precomputed_scores is not None:
            scores = self.precomputed_scores[index]
        else:
            scores = channel_scores(mlp, inputs, self.config.ffn_score)
        keep = kept_channels(scores, width, self.config.bottom_keep)
        prune_ffn(mlp, keep, self.config.ffn_update, inputs["down_proj"])


def _adapted_plan(model, plan: Plan, config: CompressionConfig, samples, device, precomputed, progress) -> Plan:
    """The plan with FFN widths spread over layers by standardised channel scores (adaptive.py)."""
    from .adaptive import adaptive_widths, dense_channel_scores

    if "ffn" not in config.sublayers:
        return plan
    scores = precomputed
    if scores is None:
        batches = capture_first_layer_inputs(model, samples, config.batch_size, device)
        scores = dense_channel_scores(model, batches, device, config.ffn_score, progress)
    removed = sum(plan.intermediate_size - layer.ffn_width for layer in plan.layers)
    widths = adaptive_widths(scores, removed, config.bottom_keep)
    info(f"adaptive FFN widths: {min(widths)} to {max(widths)} channels kept per layer (uniform: {plan.layers[0].ffn_width})")
    return plan.with_ffn_widths(widths)


def compress_model(model, tokenizer, config: CompressionConfig, progress: bool = True) -> CompressionResult:
    """Compress `model` in place by `config`; returns the plan it followed and timings per phase."""
    config.validate()
    architecture_of(model.config)
    plan = make_plan(model.config, config.plan_settings())
    dense_counted = count_parameters(model)
    if dense_counted != plan.dense_parameters:
        raise RuntimeError(f"plan counts {plan.dense_parameters} dense parameters, the model has {dense_counted}")
    device = resolve_device(config.device)
    timings = {}
    samples = timed_calibration_samples(tokenizer, config, timings)
    info(
        f"calibration: {config.calibration_samples} x {config.calibration_seqlen} tokens from "
        f"'{config.calibration_source}' (train), seed {config.seed}; compute device {device}"
    )

    precomputed = None
    if config.ffn_score in PRECOMPUTED_SCORERS and "ffn" in config.sublayers:
        from .gradients import taylor_channel_scores

        started = time.perf_counter()
        precomputed = taylor_channel_scores(model, samples, config.batch_size, device, progress)
        timings["gradients"] = time.perf_counter() - started
    if config.ffn_allocation == "adaptive":
        started = time.perf_counter()
        plan = _adapted_plan(model, plan, config, samples, device, precomputed, progress)
        timings["adaptive_scoring"] = time.perf_counter() - started

    started = time.perf_counter()
    batches = capture_first_layer_inputs(model, samples, config.batch_size, device)
    walk_layers(model, batches, device, LayerCompressor(config, plan, precomputed), progress)
    timings["layer_walk"] = time.perf_counter() - started

    counted = count_parameters(model)
    if counted != plan.compressed_parameters:
        raise RuntimeError(f"compressed model has {counted} parameters, the plan says {plan.compressed_parameters}")
    return CompressionResult(model, plan, config, timings)
