"""The public Python surface: evaluate(), compress(), plan(), load()."""
from dataclasses import dataclass
from pathlib import Path

from .counting import count_parameters
from .models import load_model
from .provenance import environment


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def perplexity(model, tokenizer, dataset="wiki", seqlen=128, max_tokens=None) -> float:
    from .evaluate.perplexity import perplexity as _perplexity

    return _perplexity(model, tokenizer, dataset, seqlen, max_tokens)


def evaluate(model=None, ppl=("wiki",), seqlens=(128,), max_tokens=None, device=None, **options) -> dict:
    """The report `lorap eval --json` writes, for a model given by name or path.

    `options` are those of lorap.evaluate.suite.evaluate_suite: against, alone, tasks (None:
    perplexity only), limit, offline, speed, batch_size.
    """
    from .evaluate.suite import evaluate_suite

    return evaluate_suite(model, ppl=ppl, seqlens=seqlens, max_tokens=max_tokens, device=device, **options)


def protocol(max_tokens=None) -> dict:
    from .data import DOCUMENT_SEPARATOR

    return {
        "split": "test",
        "documents_joined_with": DOCUMENT_SEPARATOR,
        "windows": "non-overlapping, tail dropped",
        "perplexity": "exp(mean token NLL over all predicted tokens)",
        "max_tokens": max_tokens,
    }


def plan(model=None, preset="paper", **settings):
    """The compression plan from shapes alone (a config.json, a folder or a hub id): no weights loaded.

    `settings` are CompressionConfig fields over those of the named preset (methods.py). With
    adaptive FFN allocation the real per-layer widths depend on calibration data; the plan shows
    the uniform widths, whose total the adaptive run keeps.
    """
    from .allocate import make_plan
    from .methods import config_for
    from .models import load_config

    return make_plan(load_config(model), config_for(preset, **settings).plan_settings())


def peak_memory(device) -> dict:
    import resource

    import torch

    memory = {"host_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if str(device).startswith("cuda"):
        memory["device_allocated_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return memory


@dataclass
class Compressed:
    """What compress() returns: the compressed model, its tokenizer and the report (as saved)."""

    model: object
    tokenizer: object
    report: dict


def compress(
    model=None,
    out=None,
    config=None,
    evaluate_ppl=(),
    eval_seqlens=(128,),
    eval_max_tokens=None,
    overwrite=False,
    progress=True,
    stream=None,
    resume=False,
    activation_dtype="auto",
    activation_store="memory",
    **settings,
) -> Compressed:
    """Load a model, compress it by LoRAP, save it to `out` (if given) and report what was done.

    `settings` are a `preset` name (methods.py, default "paper") and CompressionConfig fields
    over it (ratio, mode, allocation_a, ...). With
    `evaluate_ppl` (corpus names), perplexity is measured before and after, same protocol.
    """
    import time

    from .architectures import architecture_of
    from .checkpoint import REPORT_FILE, check_output_folder, mark_compressed, save_checkpoint
    from .compression import compress_model, resolve_device
    from .evaluate.perplexity import perplexity_table
    from .methods import config_for
    from .models import resolve_model
    from .report import write_json_atomic

    config = config or config_for(settings.pop("preset", "paper"), **settings)
    config.validate()
    # Streamed (stream=True, resume=True, or stream=None and the model would not fit in memory): the
    # model is read layer by layer from its shards and never held whole; Compressed.model is None.
    if stream or resume or (stream is None and _would_not_fit(model)):
        from .errors import LorapError
        from .streaming import StreamOptions, compress_streamed

        if evaluate_ppl:
            raise LorapError("a streamed run never holds the whole model, so it cannot --eval; run `lorap eval OUT` after it")
        options = StreamOptions(resume, activation_dtype, activation_store)
        return compress_streamed(model, out, config, overwrite, progress, options)
    started = time.perf_counter()
    source = resolve_model(model)
    if out is not None:  # fail before the long work, not after it
        check_output_folder(out, overwrite, protected=[source.location] if source.kind != "hub" else [])
    loaded, tokenizer, source = load_model(model)
    timings = {"load": time.perf_counter() - started}
    device = resolve_device(config.device)
    base_architecture = architecture_of(loaded.config).base_class

    def measure(label):
        begin = time.perf_counter()
        loaded.to(device)
        result = {
            "model": f"{source.name} ({label})",
            "parameters": count_parameters(loaded),
            "perplexity": perplexity_table(loaded, tokenizer, evaluate_ppl, eval_seqlens, eval_max_tokens),
        }
        loaded.to("cpu")
        timings[f"eval_{label}"] = time.perf_counter() - begin
        return result

    evaluation = {"dense": measure("dense")} if evaluate_ppl else None
    result = compress_model(loaded, tokenizer, config, progress)
    timings.update(result.timings)
    if evaluation is not None:
        evaluation["compressed"] = measure("compressed")
        evaluation["protocol"] = protocol(eval_max_tokens)

    # How the checkpoint names its base model: None means lorap's built-in default.
    base_model = None if source.kind == "default" else source.location
    mark_compressed(loaded, checkpoint_metadata(result, base_model, base_architecture))
    report = {
        "model": source.name,
        "base_model": base_model,
        "output": str(Path(out).resolve()) if out is not None else None,
        "settings": config.to_dict(),
        "plan": result.plan.to_dict(),
        "timings": timings,
        "peak_memory": peak_memory(device),
        "evaluation": evaluation,
        **environment(str(device)),
    }
    if out is not None:
        begin = time.perf_counter()
        save_checkpoint(loaded, tokenizer, out, overwrite, {REPORT_FILE: report})
        timings["save"] = time.perf_counter() - begin
    timings["total"] = time.perf_counter() - started
    if out is not None:  # the report in the checkpoint includes the save and total times too
        write_json_atomic(Path(out) / REPORT_FILE, report)
    return Compressed(loaded, tokenizer, report)


def _would_not_fit(model) -> bool:
    from .models import resolve_model
    from .streaming import should_stream

    return should_stream(resolve_model(model))


def checkpoint_metadata(result, base_model, base_architecture) -> dict:
    """What config.json records under `lorap`: enough to rebuild the shapes and redo the run."""
    from . import __version__

    config = result.config
    return {
        "version": __version__,
        "base_model": base_model,
        "base_architecture": base_architecture,
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


def load(folder, **kwargs):
    """Load a lorap checkpoint (model, tokenizer) with lorap's classes."""
    from transformers import AutoTokenizer

    from .checkpoint import load_checkpoint_model

    return load_checkpoint_model(folder, **kwargs), AutoTokenizer.from_pretrained(folder)
