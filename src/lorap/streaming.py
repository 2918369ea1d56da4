"""Compress a model larger than memory: one decoder layer at a time, straight from its safetensors shards.

The model is built as an empty skeleton (parameters on the meta device). The embeddings are
loaded to compute the first layer's calibration inputs, then freed; each decoder layer is then
read from the shards, compressed by the same per-layer step as the in-memory walk
(`calibration.process_layer`), written to its own output shard and freed. Host memory holds at
most about two decoder layers (the dense one and its compressed copy) plus the calibration
activations, whatever the depth.

Everything is written into a staging folder beside the output (`.OUT.streaming`), with a
progress file and the activations after the last finished layer, so an interrupted run resumes
there (`resume=True`) and ends with the same bytes as an uninterrupted one. At the end the
index, config, tokenizer, modeling file and report are added and the folder is renamed into place.
"""
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .errors import LorapError
from .log import info

PROGRESS_FILE = "progress.json"
MEMMAP_FILE = "activations.memmap"
ACTIVATION_DTYPES = ("auto", "float16", "bfloat16", "float32")  # auto: the model's own dtype, as in memory
ACTIVATION_STORES = ("memory", "disk")  # disk: a memory-mapped file in the staging folder
RUNTIME_BASELINE_BYTES = 450 * 2**20  # Python + torch + transformers, measured (docs/scaling.md)


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


# ---------------------------------------------------------------- calibration activations on the host


class ActivationStore:
    """The hidden states of every calibration sequence between two layers, in one host tensor
    (in memory or memory-mapped from a file), in a storage dtype that may be narrower than the model's."""

    def __init__(self, shape: tuple, dtype: torch.dtype, path: Path | None = None):
        self.shape, self.dtype, self.path = tuple(shape), dtype, path
        numel = math.prod(shape)
        if path is None:
            self.data = torch.empty(shape, dtype=dtype)
        else:
            with open(path, "wb") as handle:
                handle.truncate(numel * torch.empty((), dtype=dtype).element_size())
            self.data = torch.from_file(str(path), shared=True, size=numel, dtype=dtype).view(shape)

    @property
    def nbytes(self) -> int:
        return self.data.numel() * self.data.element_size()

    def save(self, file: Path) -> None:
        """Raw bytes, one sequence at a time (never a second full copy in memory), written atomically."""
        temporary = file.with_name(f".{file.name}.tmp")
        with open(temporary, "wb") as handle:
            for row in range(self.shape[0]):
                handle.write(self.data[row].contiguous().view(torch.uint8).numpy().tobytes())
        os.replace(temporary, file)

    def load(self, file: Path) -> None:
        row_bytes = self.nbytes // self.shape[0]
        with open(file, "rb") as handle:
            for row in range(self.shape[0]):
                raw = bytearray(handle.read(row_bytes))
                if len(raw) != row_bytes:
                    raise LorapError(f"{file} is truncated; delete the staging folder and start over")
                self.data[row].view(-1).view(torch.uint8).copy_(torch.frombuffer(raw, dtype=torch.uint8))


class StoredBatch:
    """A calibration batch whose hidden states live in an ActivationStore; duck-types CalibrationBatch
    so the shared per-layer step reads and writes it unchanged."""

    def __init__(self, store: ActivationStore, rows: slice, kwargs: dict, device, compute_dtype):
        self.store, self.rows, self.kwargs = store, rows, kwargs
        self.device, self.compute_dtype = device, compute_dtype

    @property
    def hidden(self) -> torch.Tensor:
        return self.store.data[self.rows].to(self.device, self.compute_dtype)

    @hidden.setter
    def hidden(self, value: torch.Tensor) -> None:
        self.store.data[self.rows] = value.to("cpu", self.store.dtype)


def _store_batches(captured: list, dtype_choice: str, store_path: Path | None, device) -> tuple:
    first = captured[0].hidden
    compute_dtype = first.dtype
    storage = compute_dtype if dtype_choice == "auto" else getattr(torch, dtype_choice)
    total = sum(batch.hidden.shape[0] for batch in captured)
    store = ActivationStore((total, *first.shape[1:]), storage, store_path)
    batches, start = [], 0
    for batch in captured:
        rows = slice(start, start + batch.hidden.shape[0])
        stored = StoredBatch(store, rows, batch.kwargs, device, compute_dtype)
        stored.hidden = batch.hidden
        batch.hidden = None  # free the captured copy as soon as it is stored
        batches.append(stored)
        start = rows.stop
    return store, batches


# ---------------------------------------------------------------- when to stream, and how much memory it takes


def available_memory_bytes() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def should_stream(source) -> bool:
    """Stream automatically when the dense checkpoint would not fit in the memory available now."""
    from .shards import ShardReader

    if source.kind not in ("default", "folder"):
        return False
    try:
        size = ShardReader(source.location).total_bytes()
    except LorapError:
        return False
    available = available_memory_bytes()
    return available is not None and 1.2 * size > available


def memory_estimate(model_config, plan, samples: int = 128, seqlen: int = 128, batch_size: int = 8, dtype_bytes=None,
                    gram_sources=(), streamable=True) -> dict:
    """Peak host memory of a compression run, in bytes, from shapes alone.

    Streamed: the largest of (embeddings + captured activations), (LM head copied to the output),
    (two decoder layers + activations + one batch's float32 working set + float32 copies of the
    largest matrix for SVD / channel scores + the float64 Gram matrices some methods collect, with
    room for their factorisation). In memory: the whole model instead of two layers.
    """
    from .architectures import attention_shapes, ffn_shapes

    if dtype_bytes is None:
        dtype = getattr(model_config, "dtype", None) or getattr(model_config, "torch_dtype", None) or "float32"
        dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
        dtype_bytes = torch.empty((), dtype=dtype).element_size()
    d, m, vocab = model_config.hidden_size, model_config.intermediate_size, model_config.vocab_size
    heads = model_config.num_attention_heads
    matrices = [(o, i) for o, i, _ in attention_shapes(model_config).values()] + [
        (o, i) for o, i, _ in ffn_shapes(model_config).values()
    ]
    layer = sum(o * i for o, i in matrices) + 2 * d
    embed = vocab * d
    head = 0 if getattr(model_config, "tie_word_embeddings", False) else vocab * d
    activations = samples * seqlen * d * dtype_bytes
    working = 4 * min(batch_size, samples) * seqlen * (3 * m + heads * seqlen + 4 * d)
    decompose = 3 * 4 * max(o * i for o, i in matrices)
    gram_inputs = {"q_proj": d, "o_proj": attention_shapes(model_config)["o_proj"][1], "down_proj": m}
    grams = sum(3 * 8 * gram_inputs[name] ** 2 for name in gram_sources)  # the sum, a copy, a factor (float64)
    per_layer = activations + working + decompose + grams
    streamed = RUNTIME_BASELINE_BYTES + max(
        embed * dtype_bytes + 2 * activations, head * dtype_bytes, 2 * layer * dtype_bytes + per_layer
    )
    in_memory = RUNTIME_BASELINE_BYTES + plan.dense_parameters * dtype_bytes + per_layer
    return {
        "checkpoint_bytes": plan.dense_parameters * dtype_bytes,
        "dtype_bytes": dtype_bytes,
        "calibration": {"samples": samples, "seqlen": seqlen},
        "activation_bytes": activations,
        "gram_bytes": grams,
        "in_memory_peak_bytes": in_memory,
        "streaming_peak_bytes": streamed if streamable else None,  # None: these settings cannot stream
    }


def format_memory_estimate(estimate: dict) -> str:
    gib = 2**30
    calibration = estimate["calibration"]
    return (
        f"memory estimate ({estimate['dtype_bytes']}-byte weights, calibration {calibration['samples']} x "
        f"{calibration['seqlen']}): checkpoint {estimate['checkpoint_bytes'] / gib:.1f} GiB; peak host memory "
        f"in memory {estimate['in_memory_peak_bytes'] / gib:.1f} GiB, streamed (--stream) "
        + (f"{estimate['streaming_peak_bytes'] / gib:.1f} GiB" if estimate["streaming_peak_bytes"] is not None
           else "not possible with these settings (adaptive widths or Taylor scores need the whole model)")
    )


# ---------------------------------------------------------------- the streamed run


def release_freed_memory() -> None:
    """Give freed heap memory back to the OS. Without this, glibc keeps the fragments of every freed
    layer and the resident set grows by a fraction of a layer per layer (measured: about 16 MiB per
    layer of 54 MB), which defeats streaming."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to do
        pass


def staging_folder(out: Path) -> Path:
    return out.parent / f".{out.name}.streaming"


def compress_streamed(model=None, out=None, config=None, overwrite=False, progress=True, options=None):
    """Compress `model` (a safetensors folder) into `out` layer by layer; returns api.Compressed with
    model=None (the whole model is never in memory: load it with lorap.load(out))."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from .allocate import make_plan
    from .api import Compressed, checkpoint_metadata, peak_memory
    from .architectures import architecture_of
    from .calibration import capture_first_layer_inputs, process_layer
    from .checkpoint import MODELING_FILE, REPORT_FILE, _swap_into_place, check_output_folder, mark_compressed
    from .compression import CompressionResult, LayerCompressor, gram_sources, resolve_device, timed_calibration_samples
    from .models import _check_tokenizer_files, resolve_model
    from .provenance import environment
    from .report import write_json_atomic
    from .shards import ShardReader, shard_contents, shard_name, write_index, write_shard

    options = options or StreamOptions()
    options.validate()
    config.validate()
    if config.needs_whole_model:
        raise LorapError(
            "adaptive FFN allocation and Taylor scores look at every layer before compressing any, so they need "
            "the whole model in memory, and this run streams (--stream, --resume, or the model would not fit in "
            "memory); use --ffn-allocation uniform and an --ffn-score other than llm-pruner-taylor"
        )
    started = time.perf_counter()
    if out is None:
        raise LorapError("a streamed run writes its checkpoint as it goes: give an output folder (--out)")
    source = resolve_model(model)
    if source.kind not in ("default", "folder"):
        raise LorapError(f"streaming reads a local safetensors model folder; {source.describe()} is not one")
    out = check_output_folder(out, overwrite, protected=[source.location])
    folder = Path(source.location)
    _check_tokenizer_files(folder)
    reader = ShardReader(folder)
    model_config = AutoConfig.from_pretrained(folder)
    architecture = architecture_of(model_config)
    plan = make_plan(model_config, config.plan_settings())
    n_layers = model_config.num_hidden_layers
    tied = bool(getattr(model_config, "tie_word_embeddings", False))

    # What is copied as is: everything outside the layers (a tied LM head is not stored, as save_pretrained does).
    other = [n for n in reader.other_names() if not (tied and n.startswith("lm_head."))]
    head_names = [n for n in other if n.startswith("lm_head.")]
    first_names = [n for n in other if n not in head_names]
    shapes = reader.shapes()
    dense = sum(math.prod(shapes[n]) for n in other) + sum(
        math.prod(s) for n, s in shapes.items() if n not in reader.other_names()
    )
    if dense != plan.dense_parameters:
        raise RuntimeError(f"plan counts {plan.dense_parameters} dense parameters, the checkpoint has {dense}")
    total_shards = 1 + n_layers + (1 if head_names else 0)
    layer_shard = {index: shard_name(index + 2, total_shards) for index in range(n_layers)}

    device = resolve_device(config.device)
    staging = staging_folder(out)
    identity = json.loads(
        json.dumps(
            {
                "source": str(folder),
                "checkpoint": reader.fingerprint(),
                "settings": config.to_dict(),
                "activations": {"dtype": options.activation_dtype, "store": options.activation_store},
            }
        )
    )
    finished = _open_staging(staging, identity, options.resume, n_layers)
    resumed_from = finished

    tokenizer = AutoTokenizer.from_pretrained(folder)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    timings = {}
    samples = timed_calibration_samples(tokenizer, config, timings)
    info(
        f"streaming {n_layers} layers from {folder} ({reader.total_bytes() / 2**30:.2f} GiB); calibration "
        f"{config.calibration_samples} x {config.calibration_seqlen} tokens from '{config.calibration_source}', "
        f"seed {config.seed}; compute device {device}"
        + (f"; resuming after layer {finished - 1}" if finished else "")
    )

    begin = time.perf_counter()
    embed_names = [n for n in first_names if n.startswith("model.embed_tokens.")]
    embedding = reader.read(embed_names)
    dtype = embedding["model.embed_tokens.weight"].dtype
    with init_empty_weights():  # parameters on the meta device, buffers (rotary frequencies) real
        skeleton = AutoModelForCausalLM.from_config(model_config, dtype=dtype)
    skeleton.eval()
    inner = skeleton.model
    inner.embed_tokens.load_state_dict({k.removeprefix("model.embed_tokens."): v for k, v in embedding.items()}, assign=True)
    del embedding
    captured = capture_first_layer_inputs(skeleton, samples, config.batch_size, device)
    inner.embed_tokens.to("meta")
    release_freed_memory()
    store_path = staging / MEMMAP_FILE if options.activation_store == "disk" else None
    store, batches = _store_batches(captured, options.activation_dtype, store_path, device)
    del captured
    if finished:
        store.load(staging / _activations_file(finished))
    timings["embeddings"] = time.perf_counter() - begin

    begin = time.perf_counter()
    for number, names in ((1, first_names), (total_shards, head_names)):
        if names and not (staging / shard_name(number, total_shards)).exists():
            write_shard(staging, shard_name(number, total_shards), reader.read(names))
            release_freed_memory()
    timings["copy_embeddings_and_head"] = time.perf_counter() - begin

    begin = time.perf_counter()
    compress_layer = LayerCompressor(config, plan)
    layers = inner.layers
    for index in tqdm(range(finished, n_layers), desc="compressing layers (streamed)", unit="layer", disable=not progress):
        prefix = f"model.layers.{index}."
        layer = layers[index]
        layer.load_state_dict({k.removeprefix(prefix): v for k, v in reader.read(reader.layer_names(index)).items()}, assign=True)
        process_layer(index, layer, batches, device, compress_layer)
        write_shard(staging, layer_shard[index], {prefix + k: v for k, v in layer.state_dict().items()})
        layer.to("meta")
        store.save(staging / _activations_file(index + 1))
        _write_progress(staging, identity, index + 1)
        previous = staging / _activations_file(index)
        if previous.exists():
            previous.unlink()
        release_freed_memory()
    timings["layer_walk"] = time.perf_counter() - begin

    weight_map, total_size, compressed = {}, 0, 0
    for number in range(1, total_shards + 1):
        name = shard_name(number, total_shards)
        if not (staging / name).exists():
            continue
        for tensor, (shape, size) in shard_contents(staging, name).items():
            weight_map[tensor] = name
            total_size += size
            compressed += math.prod(shape)
    if compressed != plan.compressed_parameters:
        raise RuntimeError(f"compressed checkpoint has {compressed} parameters, the plan says {plan.compressed_parameters}")
    write_index(staging, weight_map, total_size)

    result = CompressionResult(None, plan, config, timings)
    base_model = None if source.kind == "default" else source.location
    mark_compressed(skeleton, checkpoint_metadata(result, base_model, architecture.base_class))
    skeleton.config.architectures = [type(skeleton).__name__]  # as save_pretrained records it
    skeleton.config.dtype = str(dtype).split(".")[1]
    skeleton.config.save_pretrained(staging)
    generation = _generation_config(folder, skeleton)
    if generation is not None:
        generation.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    from . import modeling_lorap

    (staging / MODELING_FILE).write_bytes(Path(modeling_lorap.__file__).read_bytes())

    estimate = memory_estimate(model_config, plan, config.calibration_samples, config.calibration_seqlen, config.batch_size,
                               gram_sources=gram_sources(config))
    report = {
        "model": source.name,
        "base_model": base_model,
        "output": str(out),
        "settings": config.to_dict(),
        "plan": plan.to_dict(),
        "timings": timings,
        "peak_memory": peak_memory(device),
        "evaluation": None,
        **environment(str(device)),
        "streaming": {
            "checkpoint_bytes": reader.total_bytes(),
            "output_bytes": total_size,
            "layers": n_layers,
            "resumed_after_layers": resumed_from,
            "activations": {
                "dtype": str(store.dtype).split(".")[1],
                "model_dtype": str(dtype).split(".")[1],
                "store": options.activation_store,
                "bytes": store.nbytes,
            },
            "estimate": estimate,
        },
    }
    for leftover in staging.iterdir():
        if leftover.name == PROGRESS_FILE or leftover.name.startswith("activations"):
            leftover.unlink()
    write_json_atomic(staging / REPORT_FILE, report)
    os.chmod(staging, 0o755)
    _swap_into_place(staging, out)
    timings["total"] = time.perf_counter() - started
    report["peak_memory"] = peak_memory(device)
    write_json_atomic(out / REPORT_FILE, report)
    return Compressed(None, tokenizer, report)


def _activations_file(finished: int) -> str:
    return f"activations-after-{finished:05d}-layers.bin"


def _write_progress(staging: Path, identity: dict, finished: int) -> None:
    from .report import write_json_atomic

    write_json_atomic(staging / PROGRESS_FILE, {"identity": identity, "finished_layers": finished})


def _open_staging(staging: Path, identity: dict, resume: bool, n_layers: int) -> int:
    """Layers already finished in the staging folder (0 for a fresh run)."""
    import shutil

    progress_file = staging / PROGRESS_FILE
    if staging.exists():
        state = json.loads(progress_file.read_text()) if progress_file.is_file() else None
        done = state["finished_layers"] if state else 0
        if not resume:
            raise LorapError(
                f"an interrupted streamed run is in {staging} ({done} of {n_layers} layers done); "
                "pass --resume (resume=True) to continue it, or delete that folder to start over"
            )
        if state is None:
            info(f"{staging} holds no finished layer; starting over")
            shutil.rmtree(staging)
        elif state["identity"] != identity:
            changed = sorted(k for k in identity if identity[k] != state["identity"].get(k))
            raise LorapError(
                f"the interrupted run in {staging} was made with another {', '.join(changed)}; "
                "resume with the same model and settings, or delete that folder to start over"
            )
        else:
            return done
    elif resume:
        info(f"nothing to resume at {staging}; starting a fresh streamed run")
    staging.mkdir(parents=True)
    _write_progress(staging, identity, 0)
    return 0


def _generation_config(folder: Path, skeleton):
    """What from_pretrained + save_pretrained would write: the folder's generation config, else the model's."""
    from transformers import GenerationConfig

    if (folder / "generation_config.json").is_file():
        return GenerationConfig.from_pretrained(folder)
    return skeleton.generation_config if skeleton.can_generate() else None
