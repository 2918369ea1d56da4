"""Command line: parse, call the API, print. No method logic lives here.

Flags for settings are built from their declarations (options.py): the fields of PlanSettings and
CalibrationSettings, the registered method parts and their options. Nothing heavier than the
standard library, the registry and the plan is imported before arguments are parsed, so help and
argument errors answer at once; each command imports what it runs.
"""
import argparse
import json
import sys
from dataclasses import fields
from pathlib import Path

from .bench.settings import BenchTiming
from .errors import LorapError
from .methods.registry import REGISTRIES, Registry, option_users, part_options
from .options import csv_of, flag_of
from .pipeline.config import CalibrationSettings, CompressionConfig
from .plan.plan import PlanSettings
from .recover.config import RecoveryConfig

def _add_eval(sub):
    p = sub.add_parser(
        "eval",
        help="perplexity, zero-shot accuracy and efficiency of a model, or of two side by side",
        description="Evaluate a model (dense or lorap checkpoint). A lorap checkpoint is compared with the "
        "base model its config names unless --against or --alone says otherwise.",
    )
    p.add_argument("model", nargs="?", help="hub id, model folder, lorap checkpoint or .gguf (default: built-in SmolLM2-135M)")
    others = p.add_mutually_exclusive_group()
    others.add_argument("--against", metavar="MODEL_OR_DIR", help="evaluate this model too and compare ('default': the built-in model)")
    others.add_argument("--alone", action="store_true", help="do not compare a checkpoint with its base model")
    _add_perplexity_windows(p, corpora=["wiki"], seqlens=[128], none=", or 'none'")
    p.add_argument(
        "--tasks",
        type=csv_of(str),
        nargs="?",
        const=["auto"],
        default=["auto"],
        help="zero-shot tasks, comma-separated: lm-eval names, 'standard' (the seven of the published tables), "
        "'proxies' (lorap's offline wiki tasks) or 'none'. Default (or a bare --tasks): the standard seven whose "
        "data can be had, the offline proxies in place of the rest",
    )
    p.add_argument("--limit", type=int, help="at most N examples per zero-shot task (quick runs)")
    p.add_argument("--offline", action="store_true", help="never touch the network: zero-shot uses the local proxy tasks")
    p.add_argument("--batch-size", type=int, default=8, help="zero-shot batch size (default 8)")
    p.add_argument("--speed", action="store_true", help="also measure MACs, prefill latency, decode throughput and peak memory")
    p.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--device-map", help="spread a model too big for one device over all GPUs (and the host): "
                   "'auto', 'balanced', 'sequential' (accelerate's device map); overrides --device")
    p.add_argument("--json", type=Path, help="write the results as JSON here")
    p.add_argument("--markdown", type=Path, help="write a markdown report here (charts go beside it unless --charts)")
    p.add_argument("--charts", type=Path, help="write PNG charts into this folder")
    p.set_defaults(run=_run_eval)


def _run_eval(args):
    from .evaluate.render import format_text
    from .evaluate.suite import EvalRequest, PerplexitySettings, SpeedSettings, ZeroShotSettings, evaluate_suite

    ppl = [] if args.ppl == ["none"] else args.ppl
    tasks = None if args.tasks in (None, ["none"]) else args.tasks
    if args.limit is not None and not tasks:
        raise LorapError("--limit counts zero-shot examples; it needs zero-shot tasks (drop --tasks none)")
    report = evaluate_suite(EvalRequest(
        args.model,
        against=args.against,
        alone=args.alone,
        perplexity=PerplexitySettings(ppl, args.seqlen, args.max_tokens, args.split),
        zeroshot=ZeroShotSettings(tasks, args.limit, args.batch_size),
        speed=SpeedSettings(args.speed),
        device=args.device,
        device_map=args.device_map,
        offline=args.offline,
    ))
    print(format_text(report))
    _write_json(args.json, report)
    _write_report_files(report, args.markdown, args.charts)


def _add_perplexity_windows(p, corpora: list, seqlens: list, prefix: str = "", split: bool = True, none: str = ""):
    """The perplexity protocol's flags, the same for every command that measures it (`prefix`: compress's
    --eval-*, beside its calibration flags)."""
    p.add_argument(f"--{prefix}ppl", type=csv_of(str), default=corpora,
                   help=f"perplexity corpora, comma-separated{none} (default: {','.join(corpora)})")
    p.add_argument(f"--{prefix}seqlen", type=csv_of(int), default=seqlens,
                   help=f"perplexity window lengths, comma-separated (default: {','.join(map(str, seqlens))})")
    p.add_argument(f"--{prefix}max-tokens", type=int, help="use only the first N test tokens of each corpus")
    if split:
        p.add_argument(f"--{prefix}split", choices=("test", "validation"), default="test",
                       help="held-out text for perplexity: test (what reports quote) or validation (for choosing "
                       "settings, never the test tokens; io/data.py says what each corpus holds)")


def _write_report_files(report: dict, markdown: Path | None, charts: Path | None) -> None:
    import os

    from .evaluate.charts import write_charts
    from .evaluate.render import to_markdown

    if charts is None and markdown is not None:
        charts = markdown.parent / f"{markdown.stem}_charts"
    written = write_charts(report, charts) if charts is not None else {}
    for path in written.values():
        print(f"wrote {path}", file=sys.stderr)
    if markdown is not None:
        links = {name: os.path.relpath(Path(path).resolve(), markdown.parent.resolve()) for name, path in written.items()}
        markdown.parent.mkdir(parents=True, exist_ok=True)
        markdown.write_text(to_markdown(report, links), encoding="utf-8")
        print(f"wrote {markdown}", file=sys.stderr)


def _add_analyze(sub):
    p = sub.add_parser("analyze", help="singular-value spectra and low-rank degree of every projection (PNG + JSON)")
    p.add_argument("model", nargs="?", help="hub id, model folder, lorap checkpoint or .gguf (default: built-in SmolLM2-135M)")
    p.add_argument("--out", type=Path, required=True, help="folder for lowrank_*.png and lowrank_analysis.json")
    # Spectra settle on fewer sequences than a compression needs.
    _add_settings(p, CalibrationSettings, skip=("batch_size",), defaults={"calibration_samples": 16})
    p.add_argument("--energy", type=float, default=0.9, help="share of spectral energy the low-rank degree keeps (default 0.9)")
    p.set_defaults(run=_run_analyze)


def _run_analyze(args):
    from .analyze.run import analyze, format_analysis

    result = analyze(args.model, args.out, args.calibration_source, args.calibration_samples, args.calibration_seqlen,
                     args.energy, args.seed, args.device)
    print(format_analysis(result))
    for path in result["files"].values():
        print(f"wrote {path}", file=sys.stderr)


def _write_json(path: Path | None, data: dict) -> None:
    if path is None:
        return
    from .io.files import write_json_atomic

    write_json_atomic(path, data)
    print(f"wrote {path}", file=sys.stderr)


def _add_settings(p, settings_class, *, from_preset: bool = False, skip=(), only=None, defaults=None) -> None:
    """A flag for each field of `settings_class` declared with options.setting. `from_preset`: the flag
    defaults to None, so that the preset's value holds unless given, and its help names the paper's."""
    for field in fields(settings_class):
        meta = field.metadata
        if "help" not in meta or field.name in skip or (only is not None and field.name not in only):
            continue
        default = (defaults or {}).get(field.name, field.default)
        shown = ",".join(map(str, default)) if isinstance(default, tuple) else default
        help_text = meta["help"] + ("" if default is None else f" ({'paper' if from_preset else 'default'}: {shown})")
        flag = meta["flag"] or flag_of(field.name)
        names = [flag, *([meta["short"]] if meta["short"] else [])]
        if isinstance(default, bool):  # a switch: given or not
            p.add_argument(*names, dest=field.name, action="store_true", help=meta["help"].replace("%", "%%"))
            continue
        p.add_argument(*names, dest=field.name, type=meta["parse"] or (str if default is None else type(default)),
                       choices=meta["choices"], default=None if from_preset else default,
                       metavar=None if meta["choices"] else flag.lstrip("-").replace("-", "_").upper(),
                       help=help_text.replace("%", "%%"))


def _add_registry_option(p, registry: Registry) -> None:
    """An option whose choices and help are the registered parts (methods/registry.py)."""
    paper = f"paper: {registry.paper}" if registry.paper else f"default: {registry.default}"
    p.add_argument(registry.option, choices=list(registry.names()), metavar="{" + ",".join(registry.names()) + "}",
                   help=f"{registry.kind}{registry.when} ({paper}): {registry.help()}".replace("%", "%%"))


def _add_ratio_options(p, ratio_required: bool = True):
    """What to remove and how: the ratio, the preset, the plan's settings, the method parts and their options."""
    from .methods.presets import METHODS

    ratio = next(field for field in fields(PlanSettings) if field.name == "ratio")
    p.add_argument("--ratio", type=float, required=ratio_required, help=ratio.metadata["help"])
    p.add_argument(
        "--preset",
        choices=list(METHODS),
        default=CompressionConfig.preset,
        help="named method: 'paper' (LoRAP as published, the default), 'best' (lorap's best measured combination), "
        "or a baseline/ablation (docs/records/benchmarks.md); the options below override its settings",
    )
    _add_settings(p, PlanSettings, from_preset=True, skip=("ratio",))
    for registry in REGISTRIES.values():
        _add_registry_option(p, registry)
    for option in part_options().values():
        p.add_argument(option.flag, dest=option.name, type=option.type,
                       help=(f"with {', '.join(option_users(option.name))}: {option.help} "
                             f"(default {option.default:g}; a preset may set its own)").replace("%", "%%"))


def _method_settings(args) -> dict:
    """The settings given on the command line, by their config names (None: not given, the preset's)."""
    names = [field.name for field in fields(CompressionConfig) if field.name != "options"] + list(part_options())
    return {name: getattr(args, name) for name in names if hasattr(args, name) and name != "preset"}


def _add_compress(sub):
    p = sub.add_parser("compress", help="compress a model with LoRAP and save a reloadable checkpoint")
    p.add_argument("model", nargs="?", help="hub id, model folder or .gguf (default: built-in SmolLM2-135M)")
    p.add_argument("--out", type=Path, required=True, help="checkpoint folder to write")
    _add_ratio_options(p)
    _add_settings(p, CalibrationSettings)
    _add_settings(p, CompressionConfig, only=("svd_dtype",))
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out (only once the new one is complete)")
    p.add_argument("--eval", action="store_true", help="measure perplexity before and after, on these windows:")
    _add_perplexity_windows(p, corpora=["wiki"], seqlens=[128], prefix="eval-", split=False)
    p.add_argument("--json", type=Path, help="also write the report here (it is always saved in --out)")
    p.add_argument(
        "--stream",
        action="store_const",
        const=True,
        help="read, compress and write one decoder layer at a time from the safetensors shards, never holding the "
        "whole model (default: only when the model would not fit in the memory available)",
    )
    p.add_argument("--resume", action="store_true", help="continue an interrupted --stream run from its last finished layer")
    p.add_argument(
        "--activation-dtype",
        choices=["auto", "float16", "bfloat16", "float32"],
        default="auto",
        help="storage dtype of the calibration activations between layers in a streamed run (default: the model's)",
    )
    p.add_argument(
        "--activation-store",
        choices=["memory", "disk"],
        default="memory",
        help="keep the streamed run's calibration activations in memory or in a memory-mapped file beside --out",
    )
    _add_no_speed(p)
    p.set_defaults(run=_run_compress)


def _run_compress(args):
    from .api import compress
    from .methods.presets import config_for
    from .report import format_compression

    config = config_for(args.preset, **_method_settings(args))
    result = compress(
        args.model,
        args.out,
        config,
        evaluate_ppl=args.eval_ppl if args.eval else (),
        eval_seqlens=args.eval_seqlen,
        eval_max_tokens=args.eval_max_tokens,
        overwrite=args.overwrite,
        stream=args.stream,
        resume=args.resume,
        activation_dtype=args.activation_dtype,
        activation_store=args.activation_store,
        predict_speed=not args.no_speed,
    )
    print(format_compression(result.report))
    _write_json(args.json, result.report)


def _add_plan(sub):
    p = sub.add_parser("plan", help="print the compression plan from shapes alone (no weights are loaded)")
    p.add_argument("model", nargs="?", help="config.json, model folder, .gguf or hub id (default: built-in model)")
    _add_ratio_options(p)
    p.add_argument("--json", action="store_true", help="print the plan as JSON instead of a table")
    _add_no_speed(p)
    p.set_defaults(run=_run_plan)


def _add_no_speed(p):
    p.add_argument("--no-speed", action="store_true",
                   help="skip the predicted speedup (a micro-benchmark of the plan's layers on this machine, seconds)")


def _run_plan(args):
    from .api import plan
    from .report import format_plan_report

    report = plan(args.model, args.preset, predict_speed=not args.no_speed, **_method_settings(args))
    print(json.dumps(report, indent=2) if args.json else format_plan_report(report))


def _add_recover(sub):
    p = sub.add_parser(
        "recover",
        help="fine-tune a lorap checkpoint (LoRA or every weight, optionally distilled), save it as small as before",
        description="Recovery after compression: LoRA on every linear layer of the decoder (dense projections and "
        "both factors of each factorized one), or every weight with --full; next-token loss, or distillation from "
        "the dense model with --teacher base. The best state by held-out loss is saved. "
        "The LoRA defaults below are the paper's.",
    )
    p.add_argument("checkpoint", type=Path, help="lorap checkpoint folder (from `lorap compress`)")
    p.add_argument("--out", type=Path, required=True, help="recovered checkpoint folder to write")
    _add_settings(p, RecoveryConfig)
    p.add_argument("--work-dir", type=Path, help="periodic checkpoints (default: .OUT.recovery beside --out)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run from its last checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out (only once the new one is complete)")
    p.add_argument("--keep-adapter", action="store_true", help="also save the unmerged adapter in OUT/adapter")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--json", type=Path, help="also write the report here (it is always saved in --out)")
    p.set_defaults(run=_run_recover)


def _run_recover(args):
    from .recover.run import format_recovery, recover

    config = RecoveryConfig(**{field.name: getattr(args, field.name) for field in fields(RecoveryConfig)})
    result = recover(
        args.checkpoint,
        args.out,
        config,
        work_dir=args.work_dir,
        resume=args.resume,
        overwrite=args.overwrite,
        keep_adapter=args.keep_adapter,
        progress=not args.no_progress,
    )
    print(format_recovery(result.report))
    _write_json(args.json, result.report)


def _add_compare(sub):
    from .methods.presets import DEFAULT_COMPARISON, METHODS

    p = sub.add_parser(
        "compare",
        help="several compression methods side by side under one parameter budget (table + plot)",
        description="Compress the same model with each method at each ratio (share of the whole model's parameters, "
        "exact mode), on the same calibration samples, and evaluate every result the same way. Methods: "
        + ", ".join(METHODS),
    )
    p.add_argument("model", nargs="?", help="hub id, model folder or .gguf (default: built-in SmolLM2-135M)")
    p.add_argument("--out", type=Path, required=True, help="folder for rows/, comparison.json, comparison.md, comparison.png")
    p.add_argument("--methods", type=csv_of(str), default=list(DEFAULT_COMPARISON),
                   help=f"comma-separated (default: {','.join(DEFAULT_COMPARISON)}; 'all' for every one)")
    p.add_argument("--ratios", type=csv_of(float), default=[0.2, 0.5], help="shares of the whole model to remove (default 0.2,0.5)")
    # Rows rank by perplexity relative to dense, the geometric mean over the corpora: by default the
    # calibration domain and one never calibrated on.
    _add_perplexity_windows(p, corpora=["wiki", "pydocs"], seqlens=[128, 2048])
    p.add_argument("--tasks", type=csv_of(str), default=["proxies"], help="zero-shot tasks (default: proxies; 'none')")
    p.add_argument("--limit", type=int, help="at most N zero-shot items per task")
    _add_settings(p, CalibrationSettings)
    p.add_argument("--fresh", action="store_true", help="redo rows already saved in OUT/rows")
    p.set_defaults(run=_run_compare)


def _run_compare(args):
    from .compare.run import ComparisonSettings, compare
    from .methods.presets import METHODS

    settings = ComparisonSettings(
        methods=tuple(METHODS) if args.methods == ["all"] else tuple(args.methods),
        ratios=tuple(args.ratios),
        seqlens=tuple(args.seqlen),
        max_tokens=args.max_tokens,
        datasets=tuple(args.ppl),
        split=args.split,
        tasks=() if args.tasks == ["none"] else tuple(args.tasks),
        limit=args.limit,
        **{field.name: getattr(args, field.name) for field in fields(CalibrationSettings)},
    )
    compare(args.model, args.out, settings, fresh=args.fresh)
    print((args.out / "comparison.md").read_text())
    print(f"wrote {args.out / 'comparison.json'}, {args.out / 'comparison.md'}, {args.out / 'comparison.png'}", file=sys.stderr)


def _add_bench(sub):
    p = sub.add_parser(
        "bench",
        help="time the dense and the compressed model side by side (prefill and decode)",
        description="Time prefill and decode of the dense model and its compressed form, interleaved (decode in "
        "lockstep, a token each in turn), and report medians, their spread and paired speedups: the median of "
        "dense / compressed over timings taken back to back, with its quartiles. MODEL given by shapes (config.json, folder, hub id, nothing for the "
        "built-in model) builds both with random weights by the plan of --ratio/--preset; a lorap checkpoint is "
        "timed with its real weights against the base model it names.",
    )
    p.add_argument("model", nargs="?", help="config.json, model folder, hub id or lorap checkpoint (default: built-in model)")
    _add_ratio_options(p, ratio_required=False)
    p.add_argument("--layers", type=int, help="time only the first N decoder layers (plus embeddings and LM head)")
    p.add_argument("--dtype", default="float32", help="float32 (default), bfloat16 or float16")
    p.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    _add_settings(p, BenchTiming)
    p.add_argument("--unfused", action="store_true",
                   help="time the compressed model's factor pairs as saved: no fused q/k/v right factors, no column-major "
                   "left factors (shows that runtime's gain)")
    p.add_argument("--json", type=Path, help="write the report as JSON here")
    p.add_argument("--markdown", type=Path, help="write the table as markdown here")
    p.set_defaults(run=_run_bench)


def _run_bench(args):
    from .bench.run import bench, bench_markdown, format_bench
    from .methods.presets import config_for

    # No --ratio: a lorap checkpoint's own shapes (refused when timing from shapes alone)
    config = config_for(args.preset, **_method_settings(args)) if args.ratio is not None else None
    timing = BenchTiming(**{field.name: getattr(args, field.name) for field in fields(BenchTiming)})
    report = bench(args.model, config, timing, args.layers, args.dtype, args.device, fuse=not args.unfused)
    print(format_bench(report))
    _write_json(args.json, report)
    if args.markdown is not None:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(bench_markdown(report) + "\n", encoding="utf-8")
        print(f"wrote {args.markdown}", file=sys.stderr)


def _add_export(sub):
    from .export.choices import FFN_CHOICES, WEIGHT_DTYPE_NAMES

    p = sub.add_parser(
        "export",
        help="write a compressed model for a serving engine: GGUF (llama.cpp) or the DeciLM layout (vLLM)",
        description="Export a lorap checkpoint (or, with no DIR, the built-in dense model) for an engine. Factor pairs "
        "are multiplied back into dense matrices (engines run none), which the report counts; FFN widths stay as "
        "compressed. gguf: one file, architecture `llama` when every layer has the same shapes, `deci` when they "
        "differ. decilm: a Hugging Face folder with per-layer `block_configs` (vLLM's DeciLMForCausalLM).",
    )
    p.add_argument("model", nargs="?", help="a lorap checkpoint folder (default: the built-in dense model)")
    p.add_argument("--format", required=True, choices=("gguf", "decilm"), help="gguf (llama.cpp) or decilm (vLLM)")
    p.add_argument("--out", type=Path, required=True, help="a .gguf file, or a folder for decilm")
    p.add_argument("--dtype", default="f16", choices=WEIGHT_DTYPE_NAMES, help="weight dtype (default f16; norms stay f32)")
    p.add_argument("--ffn-multiple", default="refuse", choices=FFN_CHOICES,
                   help="decilm: FFN widths that are not multiples of 256 are refused (default), padded with zero "
                   "channels (same outputs), or written as intermediate_size (vLLM only)")
    p.add_argument("--pre-tokenizer", help="gguf: llama.cpp's pre-tokenizer name (default: lorap's guess)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    p.add_argument("--json", type=Path, help="write the report as JSON here")
    p.set_defaults(run=_run_export)


def _run_export(args):
    from .export.run import export_model, render

    report = export_model(args.model, args.format, args.out, args.dtype, args.ffn_multiple, args.overwrite,
                          args.pre_tokenizer)
    print(render(report))
    _write_json(args.json, report)


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(prog="lorap", description="LoRAP compression for LLaMA-family models")
    parser.add_argument("--version", action="version", version=f"lorap {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_compress(sub)
    _add_plan(sub)
    _add_recover(sub)
    _add_eval(sub)
    _add_analyze(sub)
    _add_compare(sub)
    _add_bench(sub)
    _add_export(sub)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.run(args)
    except LorapError as err:
        print(f"lorap: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("lorap: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
