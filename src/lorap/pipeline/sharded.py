"""A layer source for models larger than memory: one decoder layer at a time from safetensors shards.

The model is built as an empty skeleton (parameters on the meta device). The embeddings are
loaded to compute the first layer's calibration inputs, then freed; each decoder layer is then
read from the shards, compressed by the run's per-layer step (`walk.process_layer`, as in
memory), written to its own output shard and freed. Host memory holds at most about two decoder
layers (the dense one and its compressed copy) plus the calibration activations, whatever the depth.

Whole-model decisions (adaptive FFN widths, Taylor scores) are made first, in a scoring pass over
the same shards that keeps only per-layer scores (`dense_walk`; Taylor's gradients walk the
layers forward, then backward: methods/taylor.py); the compressing walk is a second pass.

Everything is written into a staging folder beside the output (staging.py), with a progress file
and the activations after the last finished layer, so an interrupted run resumes there and ends
with the same bytes as an uninterrupted one. The run adds config, tokenizer, modeling file and
report and renames the folder into place.
"""
import json
import math
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..architectures import Architecture
from ..devices import available_memory_bytes, release_freed_memory
from ..errors import LorapError
from ..io.checkpoint import check_output_folder, mark_compressed
from ..io.models import check_tokenizer_files
from ..io.shards import ShardReader, shard_contents, shard_name, write_index, write_shard
from ..modeling_lorap import SAVED_BUFFERS
from ..plan.memory import memory_estimate
from .activations import ACTIVATION_DTYPES, ACTIVATION_STORES, store_batches
from .staging import activations_file, open_staging, remove_run_state, staging_folder, write_progress
from .walk import capture_first_layer_inputs, compute_dtype, process_layer

MEMMAP_FILE = "activations.memmap"
SCORING_MEMMAP_FILE = "scoring-activations.memmap"


@dataclass
class StreamOptions:
    resume: bool = False
    activation_dtype: str = "auto"
    activation_store: str = "memory"

    def validate(self) -> None:
        if self.activation_dtype not in ACTIVATION_DTYPES:
            raise LorapError(f"activation dtype must be one of {', '.join(ACTIVATION_DTYPES)}, got {self.activation_dtype!r}")
        if self.activation_store not in ACTIVATION_STORES:
            raise LorapError(f"activation store must be one of {', '.join(ACTIVATION_STORES)}, got {self.activation_store!r}")


def should_stream(source) -> bool:
    """Stream automatically when the dense checkpoint would not fit in the memory available now."""
    if source.kind not in ("default", "folder"):
        return False
    try:
        size = ShardReader(source.location).total_bytes()
    except LorapError:
        return False
    available = available_memory_bytes()
    return available is not None and 1.2 * size > available


class ShardedLayers:
    """Decoder layers read one at a time from a safetensors model folder and written, compressed,
    to their own shards in the staging folder (the layer-source interface of sources.py)."""

    def __init__(self, source, out, config, overwrite: bool = False, options: StreamOptions | None = None):
        from transformers import AutoConfig, AutoTokenizer

        self.options = options or StreamOptions()
        self.options.validate()
        if out is None:
            raise LorapError("a streamed run writes its checkpoint as it goes: give an output folder (--out)")
        if source.kind not in ("default", "folder"):
            raise LorapError(f"streaming reads a local safetensors model folder; {source.describe()} is not one")
        self.out = check_output_folder(out, overwrite, protected=[source.location])
        self.folder = Path(source.location)
        check_tokenizer_files(self.folder)
        self.model_config = AutoConfig.from_pretrained(self.folder)
        self.architecture = Architecture(self.model_config)
        self.reader = ShardReader(self.folder, self.architecture.state_prefix)
        self.reader.check_complete()
        self.n_layers = self.model_config.num_hidden_layers
        tied = bool(getattr(self.model_config, "tie_word_embeddings", False))
        # What is copied as is: everything outside the layers (a tied LM head is not stored, as save_pretrained does).
        self.other = [n for n in self.reader.other_names() if not (tied and n.startswith("lm_head."))]
        self.head_names = [n for n in self.other if n.startswith("lm_head.")]
        self.first_names = [n for n in self.other if n not in self.head_names]
        self.total_shards = 1 + self.n_layers + (1 if self.head_names else 0)
        self.staging = staging_folder(self.out)
        self.identity = json.loads(
            json.dumps(
                {
                    "source": str(self.folder),
                    "checkpoint": self.reader.fingerprint(),
                    "settings": config.to_dict(),
                    "activations": {"dtype": self.options.activation_dtype, "store": self.options.activation_store},
                }
            )
        )
        self.finished = open_staging(self.staging, self.identity, self.options.resume, self.n_layers)
        self.resumed_from = self.finished
        self.tokenizer = AutoTokenizer.from_pretrained(self.folder)
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.skeleton = self.store = self.dtype = None
        self.output_bytes = 0

    def whole_model(self):
        return None

    def dense_parameters(self) -> int:
        shapes = self.reader.shapes()
        layer_names = set(shapes) - set(self.reader.other_names())
        return sum(math.prod(shapes[n]) for n in self.other) + sum(math.prod(shapes[n]) for n in layer_names)

    def describe(self, config, device) -> str:
        return (
            f"streaming {self.n_layers} layers from {self.folder} ({self.reader.total_bytes() / 2**30:.2f} GiB); "
            f"calibration {config.calibration_samples} x {config.calibration_seqlen} tokens from "
            f"'{config.calibration_source}', seed {config.seed}; compute device {device}"
            + (f"; resuming after layer {self.finished - 1}" if self.finished else "")
        )

    def first_layer_inputs(self, samples, batch_size: int, device, store_path: Path | None) -> tuple:
        """The skeleton (built on first use) and the first layer's calibration inputs, from the embeddings alone:
        (the activation store, its batches)."""
        from accelerate import init_empty_weights
        from transformers import AutoModelForCausalLM

        embedding_prefix = self.architecture.embedding + "."
        embedding = self.reader.read([n for n in self.first_names if n.startswith(embedding_prefix)])
        if self.skeleton is None:
            self.dtype = embedding[embedding_prefix + "weight"].dtype
            with init_empty_weights():  # parameters on the meta device, buffers (rotary frequencies) real
                self.skeleton = AutoModelForCausalLM.from_config(self.model_config, dtype=self.dtype)
            self.skeleton.eval()
        embed_module = self.architecture.before_layers(self.skeleton)[0]
        embed_module.load_state_dict({k.removeprefix(embedding_prefix): v for k, v in embedding.items()}, assign=True)
        del embedding
        captured = capture_first_layer_inputs(self.skeleton, samples, batch_size, device)
        embed_module.to("meta")
        release_freed_memory()
        return store_batches(captured, self.options.activation_dtype, store_path, device)

    @contextmanager
    def dense_layer(self, index: int):
        """Decoder layer `index` of the skeleton holding its dense weights from the shards; freed on exit."""
        prefix = f"{self.architecture.state_prefix}{index}."
        layer = self.architecture.decoder_layers(self.skeleton)[index]
        dense = self.reader.read(self.reader.layer_names(index))
        layer.load_state_dict({k.removeprefix(prefix): v for k, v in dense.items()}, assign=True)
        del dense
        try:
            yield layer
        finally:
            layer.to("meta")
            release_freed_memory()

    @contextmanager
    def loss_head(self, device):
        """loss(hidden, ids): the model's own language-modelling loss of the last decoder layer's output
        (final norm, LM head, any logit scaling, the shifted cross-entropy), computed by the skeleton's
        forward with its decoder layers bypassed; the head's weights are loaded here and freed on exit."""
        tied = bool(getattr(self.model_config, "tie_word_embeddings", False))
        embedding_prefix = self.architecture.embedding + "."
        # the final norm and the LM head (the embedding matrix, when tied)
        names = self.other if tied else [n for n in self.other if not n.startswith(embedding_prefix)]
        dtype = compute_dtype(self.dtype, device)
        tensors = {name: tensor.to(device, dtype) for name, tensor in self.reader.read(names).items()}
        self.skeleton.load_state_dict(tensors, strict=False, assign=True)
        del tensors
        if tied:
            self.skeleton.tie_weights()
        loaded = [module for module in self.skeleton.modules()
                  if any(not p.is_meta for p in module.parameters(recurse=False))]
        rotary = self.architecture.before_layers(self.skeleton)[1:]
        for module in rotary:
            module.to(device)
        layers = self.architecture.decoder_layers(self.skeleton)
        dense_layers = list(layers)
        bypasses = [_Bypass(layer) for layer in dense_layers]
        last = bypasses[-1]
        for index, bypass in enumerate(bypasses):
            layers[index] = bypass

        def loss(hidden, ids):
            last.hidden = hidden
            placeholder = torch.zeros(hidden.shape, dtype=dtype, device=hidden.device)  # what the bypassed layers get
            return self.skeleton(inputs_embeds=placeholder, labels=ids, use_cache=False).loss

        loss.dtype = dtype
        try:
            yield loss
        finally:
            for index, layer in enumerate(dense_layers):
                layers[index] = layer
            for module in loaded + rotary:
                module.to("cpu" if module in rotary else "meta")
            release_freed_memory()

    def check_room(self, plan) -> None:
        """Refuse, before any pass, an output disk without room for the compressed shards (from the plan)."""
        import shutil

        bytes_per_parameter = self.reader.total_bytes() / plan.dense_parameters  # as stored now
        needed = plan.compressed_parameters * bytes_per_parameter - self._written_bytes()
        free = shutil.disk_usage(self.staging).free
        if needed > free:
            if self.finished == 0:  # nothing to resume: leave no staging folder behind
                shutil.rmtree(self.staging, ignore_errors=True)
            raise LorapError(
                f"the compressed checkpoint needs about {needed / 2**30:.2f} GiB more at {self.out.parent}, which has "
                f"{free / 2**30:.2f} GiB free; free some space or choose another --out"
            )

    def _written_bytes(self) -> int:
        return sum(path.stat().st_size for path in self.staging.glob("*.safetensors"))

    def dense_walk(self, samples, visit, device, progress: bool, batch_size: int, desc: str) -> None:
        """One walk over the shards with the dense layers: statistics and visit(index, layer, stats), nothing written."""
        store_path = self.staging / SCORING_MEMMAP_FILE if self.options.activation_store == "disk" else None
        store, batches = self.first_layer_inputs(samples, batch_size, device, store_path)
        for index in tqdm(range(self.n_layers), desc=f"{desc} (streamed)", unit="layer", disable=not progress):
            with self.dense_layer(index) as layer:
                process_layer(index, layer, batches, device, visit, self.architecture, dense=True)
        del store, batches
        if store_path is not None:
            store_path.unlink(missing_ok=True)
        release_freed_memory()

    def walk(self, samples, step, device, timings: dict, progress: bool, batch_size: int) -> None:
        begin = time.perf_counter()
        store_path = self.staging / MEMMAP_FILE if self.options.activation_store == "disk" else None
        self.store, batches = self.first_layer_inputs(samples, batch_size, device, store_path)
        if self.finished:
            self.store.load(self.staging / activations_file(self.finished))
        timings["embeddings"] = time.perf_counter() - begin

        # Layers removed whole (ShortGPT) are neither read nor written; the kept ones are renumbered.
        removed = getattr(step, "removed_layers", frozenset())
        numbers = {index: number for number, index in enumerate(i for i in range(self.n_layers) if i not in removed)}
        self.total_shards = 1 + len(numbers) + (1 if self.head_names else 0)
        begin = time.perf_counter()
        for number, names in ((1, self.first_names), (self.total_shards, self.head_names)):
            if names and not (self.staging / shard_name(number, self.total_shards)).exists():
                write_shard(self.staging, shard_name(number, self.total_shards), self.reader.read(names))
                release_freed_memory()
        timings["copy_embeddings_and_head"] = time.perf_counter() - begin

        begin = time.perf_counter()
        for index in tqdm(range(self.finished, self.n_layers), desc="compressing layers (streamed)", unit="layer",
                          disable=not progress):
            if index in numbers:
                number = numbers[index]
                prefix = f"{self.architecture.state_prefix}{number}."
                with self.dense_layer(index) as layer:
                    process_layer(index, layer, batches, device, step, self.architecture)
                    write_shard(self.staging, shard_name(number + 2, self.total_shards),
                                {prefix + k: v for k, v in layer.state_dict().items()})
            self.store.save(self.staging / activations_file(index + 1))
            write_progress(self.staging, self.identity, index + 1)
            previous = self.staging / activations_file(index)
            if previous.exists():
                previous.unlink()
            release_freed_memory()
        timings["layer_walk"] = time.perf_counter() - begin

    def compressed_parameters(self) -> int:
        """Counted from the written shards (whose index is written here too)."""
        weight_map, total_size, compressed = {}, 0, 0
        for number in range(1, self.total_shards + 1):
            name = shard_name(number, self.total_shards)
            if not (self.staging / name).exists():
                continue
            for tensor, (shape, size) in shard_contents(self.staging, name).items():
                weight_map[tensor] = name
                total_size += size
                if not tensor.endswith(SAVED_BUFFERS):
                    compressed += math.prod(shape)
        write_index(self.staging, weight_map, total_size)
        self.output_bytes = total_size
        return compressed

    def remove_layers(self, removed: list) -> None:
        """The shards hold only the kept layers already (walk); the skeleton and its config follow."""
        self.architecture.remove_layers(self.skeleton, removed)

    def mark_compressed(self, metadata: dict) -> None:
        mark_compressed(self.skeleton, metadata)

    def write_weights(self, staging) -> None:
        """The shards are there already; add config and generation config as save_pretrained would."""
        skeleton = self.skeleton
        skeleton.config.architectures = [type(skeleton).__name__]
        skeleton.config.dtype = str(self.dtype).split(".")[1]
        skeleton.config.save_pretrained(staging)
        generation = _generation_config(self.folder, skeleton)
        if generation is not None:
            generation.save_pretrained(staging)
        remove_run_state(staging)

    def report_section(self, result) -> dict:
        config = result.config
        estimate = memory_estimate(self.model_config, result.plan, config.calibration_samples,
                                   config.calibration_seqlen, config.batch_size, gram_sources=config.gram_sources())
        return {
            "checkpoint_bytes": self.reader.total_bytes(),
            "output_bytes": self.output_bytes,
            "layers": self.n_layers,
            "resumed_after_layers": self.resumed_from,
            "activations": {
                "dtype": str(self.store.dtype).split(".")[1],
                "model_dtype": str(self.dtype).split(".")[1],
                "store": self.options.activation_store,
                "bytes": self.store.nbytes,
            },
            "estimate": estimate,
        }


class _Bypass(torch.nn.Module):
    """A decoder layer that returns its input, or, once given `hidden`, that instead (loss_head)."""

    hidden = None

    def __init__(self, layer):
        super().__init__()
        if hasattr(layer, "attention_type"):  # what Qwen2's model reads of each layer (full or sliding window)
            self.attention_type = layer.attention_type

    def forward(self, hidden_states, *args, **kwargs):
        # transformers 4.57's LLaMA-family models take a decoder layer's output as a tensor
        return hidden_states if self.hidden is None else self.hidden


def _generation_config(folder: Path, skeleton):
    """What from_pretrained + save_pretrained would write: the folder's generation config, else the model's."""
    from transformers import GenerationConfig

    if (folder / "generation_config.json").is_file():
        return GenerationConfig.from_pretrained(folder)
    return skeleton.generation_config if skeleton.can_generate() else None
