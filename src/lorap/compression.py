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
from .factorize import factorized_linear
from .log import info
from .prune import channel_scores, kept_channels, prune_ffn


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
        from .errors import LorapError

        raise LorapError(f"device {device} requested but CUDA is not available; use --device cpu")
    return torch.device(device)


def compress_layer_lorap(config: CompressionConfig, plan: Plan):
    """The per-layer step of LoRAP: AWSVD of attention projections, scored FFN channel removal."""
    svd_dtype = getattr(torch, config.svd_dtype)

    def compress_layer(index, layer, stats):
        layer_plan = plan.layers[index]
        attention = attention_module(layer)
        for name in ATTENTION_PROJECTIONS:
            rank = layer_plan.ranks[name]
            if rank is not None:
                dense = getattr(attention, name)
                setattr(attention, name, factorized_linear(dense, stats.statistic(name), rank, config.factorization, svd_dtype))
        mlp = ffn_module(layer)
        if layer_plan.ffn_width != mlp.gate_proj.out_features:
            scores = channel_scores(mlp, {n: stats.statistic(n) for n in ("gate_proj", "up_proj", "down_proj")})
            prune_ffn(mlp, kept_channels(scores, layer_plan.ffn_width, config.bottom_keep))

    return compress_layer


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

    started = time.perf_counter()
    samples = calibration_samples(
        tokenizer, config.calibration_source, config.calibration_samples, config.calibration_seqlen, config.seed
    )
    timings["calibration_data"] = time.perf_counter() - started
    info(
        f"calibration: {config.calibration_samples} x {config.calibration_seqlen} tokens from "
        f"'{config.calibration_source}' (train), seed {config.seed}; compute device {device}"
    )

    started = time.perf_counter()
    batches = capture_first_layer_inputs(model, samples, config.batch_size, device)
    walk_layers(model, batches, device, compress_layer_lorap(config, plan), progress)
    timings["layer_walk"] = time.perf_counter() - started

    counted = count_parameters(model)
    if counted != plan.compressed_parameters:
        raise RuntimeError(f"compressed model has {counted} parameters, the plan says {plan.compressed_parameters}")
    return CompressionResult(model, plan, config, timings)
