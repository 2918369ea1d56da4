"""`lorap compare`: several methods, one model, one parameter budget, one evaluation.

Every row starts from the same dense model, calibrates on the same samples (same corpus, count,
length and seed), removes the same share of the whole model's parameters (exact mode: within
0.2 points, every row's count is printed), and is evaluated on the same windows and tasks, in
two domains by default: rows are ranked by their perplexity relative to the dense model's,
averaged (geometrically) over the corpora, so a method that only wins where it was calibrated
does not rank first (compare/report.py).
Each finished row is saved under OUT/rows/, so an interrupted comparison resumes where it
stopped; a row is redone when any of its settings differ.
"""
import hashlib
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..errors import LorapError
from ..evaluate.efficiency import kv_cache_bytes_per_token
from ..evaluate.suite import PerplexitySettings, ZeroShotSettings, measure_quality, release_model
from ..log import info
from ..methods.presets import DEFAULT_COMPARISON, config_for, method
from ..pipeline.config import CalibrationSettings
from ..io.files import write_json_atomic

RESULT_FILE = "comparison.json"
TABLE_FILE = "comparison.md"
PLOT_FILE = "comparison.png"


@dataclass
class ComparisonSettings(CalibrationSettings):
    """Which methods at which ratios, evaluated how; every row calibrates alike (CalibrationSettings)."""

    methods: tuple = DEFAULT_COMPARISON
    ratios: tuple = (0.2, 0.5)
    seqlens: tuple = (128, 2048)
    max_tokens: int | None = None  # test tokens per window length; None: the whole split
    # Ranked on both: the calibration domain and one nothing is calibrated on (io/data.py).
    datasets: tuple = ("wiki", "pydocs")
    split: str = "test"  # "validation" when the comparison chooses settings (io/data.py)
    tasks: tuple = ("proxies",)  # zero-shot; () for none
    limit: int | None = None  # zero-shot items per task
    extra_settings: dict = field(default_factory=dict)  # CompressionConfig fields applied to every method

    def validate(self) -> None:
        self.validate_calibration()
        if not self.methods or not self.ratios or not self.datasets:
            raise LorapError("give at least one method, one ratio and one perplexity corpus")
        for name in self.methods:
            method(name)
        for ratio in self.ratios:
            if not 0 < ratio < 1:
                raise LorapError(f"ratios are shares of the whole model's parameters in (0, 1), got {ratio}")
        if self.split == "validation" and self.tasks:
            # The offline proxies are built from the wiki test split: choosing on them would see test text.
            raise LorapError("a comparison on the validation split chooses settings, and the zero-shot tasks are "
                             "measured on test items: add --tasks none")


def _key(data: dict) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _evaluate(model, tokenizer, settings: ComparisonSettings, tasks, manager) -> dict:
    """The same measurements `lorap eval` makes of a model's quality, on the comparison's windows and tasks."""
    windows = PerplexitySettings(settings.datasets, settings.seqlens, settings.max_tokens, settings.split)
    return measure_quality(model, tokenizer, windows, ZeroShotSettings(tasks, settings.limit, settings.batch_size), manager)


def _dense_row(spec, settings, tasks, manager, device) -> dict:
    from ..plan.counting import count_parameters
    from ..io.models import load_model

    model, tokenizer, source = load_model(spec, device=device)
    row = {"method": "dense", "label": "dense", "parameters": count_parameters(model), "removed_fraction": 0.0,
           "kv_cache_bytes_per_token": kv_cache_bytes_per_token(model), **_evaluate(model, tokenizer, settings, tasks, manager)}
    release_model(model)
    return row


def _compressed_fields(name, model, tokenizer, config, progress) -> dict:
    """Compress `model` in place by `config`; the row's fields on what was removed (LorapError where it cannot)."""
    from ..pipeline.run import compress_model
    from ..pipeline.sliced import PRESET as SLICEGPT, slice_in_memory

    if name == SLICEGPT:  # a job of its own: the sliced model's totals, as a plan's
        totals = slice_in_memory(model, tokenizer, config, progress)["plan"]["totals"]
        return {"parameters": totals["compressed_parameters"], "removed_parameters": totals["removed_parameters"],
                "removed_fraction": totals["removed_fraction"], "plan_totals": totals}
    result = compress_model(model, tokenizer, config, progress)
    plan = result.plan
    return {"timings": result.timings, "parameters": plan.compressed_parameters,
            "removed_parameters": plan.dense_parameters - plan.compressed_parameters,
            "removed_fraction": plan.removed_fraction, "plan_totals": plan.to_dict()["totals"],
            "ffn_widths": [layer.ffn_width for layer in plan.layers if not layer.removed]}


def _method_row(spec, name, ratio, settings, tasks, manager, device, progress) -> dict:
    from ..io.models import load_model

    chosen = method(name)
    config = config_for(name, ratio=ratio, mode="exact", **settings.calibration(), **settings.extra_settings)
    row = {"method": name, "label": chosen.label, "attention": chosen.attention, "ffn": chosen.ffn,
           "ratio": ratio, "settings": config.to_dict()}
    model, tokenizer, _ = load_model(spec)
    started = time.perf_counter()
    try:
        fields = _compressed_fields(name, model, tokenizer, config, progress)
    except LorapError as err:  # e.g. attention alone cannot remove half of the model
        row["error"] = str(err)
        release_model(model)
        return row
    row["compress_seconds"] = time.perf_counter() - started
    row.update(fields)
    row["kv_cache_bytes_per_token"] = kv_cache_bytes_per_token(model)
    model.to(device)
    row.update(_evaluate(model, tokenizer, settings, tasks, manager))
    release_model(model)
    return row


def compare(model=None, out=None, settings: ComparisonSettings | None = None, fresh: bool = False, progress: bool = True) -> dict:
    """Run every method at every ratio (and the dense model once); write OUT/comparison.{json,md,png}."""
    from ..devices import default_device
    from ..io.models import resolve_model
    from ..provenance import environment

    settings = settings or ComparisonSettings()
    settings.validate()
    if out is None:
        raise LorapError("give an output folder (--out) for the comparison's rows, table and plot")
    out = Path(out)
    source = resolve_model(model)
    device = settings.device or default_device()
    tasks, manager = _chosen_tasks(settings)
    evaluation = {"datasets": list(settings.datasets), "seqlens": list(settings.seqlens), "max_tokens": settings.max_tokens,
                  "tasks": tasks, "limit": settings.limit}
    if settings.split != "test":  # only then, so that rows measured on test before splits were named stay cached
        evaluation["split"] = settings.split
    base = {"model": source.location, "evaluation": evaluation}
    reused = []  # the rows an earlier run had measured, as paths under OUT

    def cached(path: Path, key_data: dict, run):
        key = _key({**base, **key_data})
        if path.exists() and not fresh:
            saved = json.loads(path.read_text())
            if saved.get("key") == key:
                info(f"reusing {path} (same settings)")
                reused.append(path.relative_to(out).as_posix())
                return saved
        row = {**run(), "key": key}
        write_json_atomic(path, row)
        return row

    rows_dir = out / "rows"
    dense = cached(rows_dir / "dense.json", {"dense": True}, lambda: _dense_row(model, settings, tasks, manager, device))
    rows = []
    for ratio in settings.ratios:
        for name in settings.methods:
            info(f"--- {name} at {ratio:.0%} of the whole model's parameters")
            key_data = {"method": name, "ratio": ratio,
                        "settings": config_for(name, ratio=ratio, mode="exact", **settings.extra_settings).to_dict(),
                        "calibration": [settings.calibration_source, settings.calibration_samples,
                                        settings.calibration_seqlen, settings.seed]}
            rows.append(cached(rows_dir / f"r{ratio}" / f"{name}.json", key_data,
                               lambda: _method_row(model, name, ratio, settings, tasks, manager, device, progress)))
    result = {
        "model": source.name,
        "source": source.describe(),
        "settings": {**asdict(settings), "methods": list(settings.methods), "ratios": list(settings.ratios),
                     "datasets": list(settings.datasets)},
        "evaluation": evaluation,
        "dense": dense,
        "rows": rows,
        "reused_rows": reused,
        **environment(device),
    }
    _write_outputs(out, result)
    return result


def _chosen_tasks(settings: ComparisonSettings) -> tuple[list, object]:
    """(the zero-shot task names to run, lm-eval's task manager holding them); ([], None) for none."""
    if not settings.tasks:
        return [], None
    from ..evaluate.zeroshot import choose_tasks, prepare

    tasks, _, replace = choose_tasks(list(settings.tasks))
    manager, tasks, _ = prepare(tasks, replace)
    return tasks, manager


def _write_outputs(out: Path, result: dict) -> None:
    from .report import comparison_markdown, comparison_plot

    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / RESULT_FILE, result)
    comparison_plot(result, out / PLOT_FILE)
    (out / TABLE_FILE).write_text(comparison_markdown(result, PLOT_FILE), encoding="utf-8")
