"""Where a compression run's decoder layers come from: the layer sources.

A layer source gives the run (run.py) what differs between a model held in memory and one
streamed from its shards; everything else (plan, checks, whole-model passes, the per-layer step,
metadata, report, the atomic write) is the run's, once. A source has:

  model_config, architecture     the dense model's config and its family adapter
  whole_model()                  the whole model (None when streamed)
  dense_walk(samples, visit, device, progress, batch_size, desc)
                                 visit(index, layer, stats) every dense layer in order, nothing
                                 changed: the scoring pass of whole-model decisions (run.py)
  dense_parameters()             counted from what is really there, checked against the plan
  describe(config, device)       one line for the log
  check_room(plan)               refuse before any pass what cannot be written (a streamed output's disk)
  walk(samples, step, device, timings, progress)
                                 run `step` on every layer in order (walk.process_layer)
  remove_layers(removed)         drop the layers the plan removed whole (after the walk), renumbering the rest
  compressed_parameters()        counted afterwards, checked against the plan
  mark_compressed(metadata)      give the model its lorap class and config entry
  staging                        the folder it writes into before the swap, or None for a fresh one
  write_weights(staging)         weights and config into the staging folder
  report_section(result)         what the report says about this source, or None
"""
import time

from ..architectures import Architecture
from ..io.checkpoint import mark_compressed
from ..plan.counting import count_parameters
from .walk import capture_first_layer_inputs, walk_layers


class InMemoryLayers:
    """The whole model in memory: the walk visits its layers in place."""

    staging = None

    def __init__(self, model):
        self.model = model
        self.model_config = model.config
        self.architecture = Architecture(model.config)

    def whole_model(self):
        return self.model

    def dense_parameters(self) -> int:
        return count_parameters(self.model)

    def compressed_parameters(self) -> int:
        return count_parameters(self.model)

    def check_room(self, plan) -> None:
        """Nothing to check before the passes: the output is written at the end, by save_pretrained."""

    def describe(self, config, device) -> str:
        return (
            f"calibration: {config.calibration_samples} x {config.calibration_seqlen} tokens from "
            f"'{config.calibration_source}' (train), seed {config.seed}; compute device {device}"
        )

    def dense_walk(self, samples, visit, device, progress: bool, batch_size: int, desc: str) -> None:
        batches = capture_first_layer_inputs(self.model, samples, batch_size, device)
        walk_layers(self.model, batches, device, visit, progress, desc, dense=True)

    def walk(self, samples, step, device, timings: dict, progress: bool, batch_size: int) -> None:
        started = time.perf_counter()
        batches = capture_first_layer_inputs(self.model, samples, batch_size, device)
        walk_layers(self.model, batches, device, step, progress)
        timings["layer_walk"] = time.perf_counter() - started

    def remove_layers(self, removed: list) -> None:
        self.architecture.remove_layers(self.model, removed)

    def mark_compressed(self, metadata: dict) -> None:
        mark_compressed(self.model, metadata)

    def write_weights(self, staging) -> None:
        self.model.save_pretrained(staging, safe_serialization=True)

    def report_section(self, result):
        return None
