"""SliceGPT (`--preset slicegpt`) as a compression job: it rotates the whole residual stream, so it
runs apart from the layer walk, on the model held in memory (methods/slicegpt.py).

What it computes and saves: the model sliced to the asked share of ALL its parameters (embeddings,
head and the shortcut matrices counted), a checkpoint whose modeling_sliced.py rebuilds it where
lorap is not installed, and a report whose `plan` has the same totals as a LoRAP plan's, so that
`lorap compress` and `lorap compare` print and rank it like any other row.
"""
import time

from ..devices import peak_memory_during, resolve_device
from ..errors import LorapError
from ..log import info

PRESET = "slicegpt"


def refuse_streaming(job) -> None:
    if job.stream or job.stream_options.resume:
        raise LorapError("SliceGPT rotates the residual stream of the whole model at once and cannot stream it layer "
                         "by layer; run without --stream / --resume, on a machine with room for the model")


def plan_totals(config, report: dict) -> dict:
    """The totals a LoRAP plan reports (parameters, share removed, KV cache), for the sliced model."""
    from ..families import attention_shapes, head_dim

    shapes = attention_shapes(config)
    kv = 2 * shapes["k_proj"][0] * config.num_hidden_layers  # slicing leaves heads and their cache whole
    dense, kept = report["dense_parameters"], report["sliced_parameters"]
    return {"dense_parameters": dense, "compressed_parameters": kept, "removed_parameters": dense - kept,
            "removed_fraction": 1 - kept / dense, "kv_cache_values_per_token": {"dense": kv, "compressed": kv},
            "head_dim": head_dim(config)}


def slice_in_memory(model, tokenizer, config, progress: bool = False) -> dict:
    """Slice `model` in place by `config` (its ratio: the share of all parameters removed); the report."""
    from ..io.data import calibration_samples
    from ..methods.slicegpt import describe_share, slice_model

    dense_config = model.config.to_dict()
    started = time.perf_counter()
    samples = calibration_samples(tokenizer, config.calibration_source, config.calibration_samples,
                                  config.calibration_seqlen, config.seed)
    sliced = slice_model(model, list(samples.split(config.batch_size)), ratio=config.ratio, progress=progress)
    seconds = time.perf_counter() - started
    info(describe_share(type(model.config).from_dict(dense_config), sliced["kept_dim"]))
    return {"preset": PRESET, "settings": config.to_dict(), "slicegpt": sliced,
            "plan": {"totals": plan_totals(model.config, sliced)}, "timings": {"slice": seconds}}


def slice_checkpoint(job) -> tuple:
    """`lorap compress --preset slicegpt`: load, slice, report, save (atomically, as every checkpoint);
    (model, tokenizer, report)."""
    from ..io.checkpoint import REPORT_FILE, check_output_folder
    from ..io.models import load_model
    from ..methods.slicegpt import save_sliced_checkpoint

    refuse_streaming(job)
    job.config.validate()
    if job.out is not None:
        check_output_folder(job.out, job.overwrite)  # before anything loads
    started = time.perf_counter()
    device = resolve_device(job.config.device)
    model, tokenizer, _ = load_model(job.model)
    model.to(device)
    peak = {}
    with peak_memory_during(device, peak):
        report = slice_in_memory(model, tokenizer, job.config, job.progress)
    report["timings"]["total"] = time.perf_counter() - started
    report["peak_memory"] = peak
    if job.out is not None:
        save_sliced_checkpoint(model.cpu(), tokenizer, job.out, job.overwrite, {REPORT_FILE: report})
    return model, tokenizer, report
