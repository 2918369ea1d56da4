"""Command line: parse, call the API, print. No method logic lives here."""
import argparse
import json
import sys
from pathlib import Path

from .errors import LorapError


def _csv(kind):
    def parse(text: str):
        try:
            return [kind(item) for item in text.split(",") if item.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list, got {text!r}")

    return parse


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
    p.add_argument("--ppl", type=_csv(str), default=["wiki"], help="corpora, comma-separated, or 'none' (default: wiki)")
    p.add_argument("--seqlen", type=_csv(int), default=[128], help="window lengths, comma-separated (default: 128)")
    p.add_argument("--max-tokens", type=int, help="use only the first N test tokens of each corpus")
    p.add_argument(
        "--tasks",
        type=_csv(str),
        nargs="?",
        const=["auto"],
        help="zero-shot tasks, comma-separated: lm-eval names, 'standard' (the seven of the published tables) or "
        "'proxies' (lorap's offline wiki tasks). Bare --tasks: the standard seven when the hub can be reached, "
        "else the proxies. Without --tasks no zero-shot runs",
    )
    p.add_argument("--limit", type=int, help="at most N examples per zero-shot task (quick runs)")
    p.add_argument("--offline", action="store_true", help="never touch the network: zero-shot uses the local proxy tasks")
    p.add_argument("--batch-size", type=int, default=8, help="zero-shot batch size (default 8)")
    p.add_argument("--speed", action="store_true", help="also measure MACs, prefill latency, decode throughput and peak memory")
    p.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--json", type=Path, help="write the results as JSON here")
    p.add_argument("--markdown", type=Path, help="write a markdown report here (charts go beside it unless --charts)")
    p.add_argument("--charts", type=Path, help="write PNG charts into this folder")
    p.set_defaults(run=_run_eval)


def _run_eval(args):
    from .evaluate.render import format_text
    from .evaluate.suite import evaluate_suite

    if args.limit is not None and not args.tasks:
        raise LorapError("--limit counts zero-shot examples; add --tasks (or drop --limit)")
    ppl = [] if args.ppl == ["none"] else args.ppl
    tasks = None if args.tasks in (None, ["none"]) else args.tasks
    report = evaluate_suite(
        args.model,
        against=args.against,
        alone=args.alone,
        ppl=ppl,
        seqlens=args.seqlen,
        max_tokens=args.max_tokens,
        tasks=tasks,
        limit=args.limit,
        offline=args.offline,
        speed=args.speed,
        device=args.device,
        batch_size=args.batch_size,
    )
    print(format_text(report))
    _write_json(args.json, report)
    _write_report_files(report, args.markdown, args.charts)


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


def _write_json(path: Path | None, data: dict) -> None:
    if path is None:
        return
    from .report import write_json_atomic

    write_json_atomic(path, data)
    print(f"wrote {path}", file=sys.stderr)


def _add_ratio_options(p):
    from .allocate import SUBLAYERS

    p.add_argument("--ratio", type=float, required=True, help="fraction of parameters to remove, in (0, 0.9]")
    p.add_argument(
        "--mode",
        choices=["reference", "exact"],
        default="reference",
        help="reference: RATIO of every layer's attention and FFN, as in the paper (the whole model loses a bit "
        "less); exact: RATIO of the whole model's parameters, within 0.2 points",
    )
    p.add_argument("-a", "--allocation-a", type=float, default=3.0, help="kept (v+o):(q+k) parameters (default 3)")
    p.add_argument("--bottom-keep", type=float, default=0.01, help="lowest-scoring FFN channels kept anyway (default 0.01)")
    p.add_argument("--sublayers", type=_csv(str), default=list(SUBLAYERS), help="attention,ffn (default both)")


def _add_compress(sub):
    p = sub.add_parser("compress", help="compress a model with LoRAP and save a reloadable checkpoint")
    p.add_argument("model", nargs="?", help="hub id, model folder or .gguf (default: built-in SmolLM2-135M)")
    p.add_argument("--out", type=Path, required=True, help="checkpoint folder to write")
    _add_ratio_options(p)
    p.add_argument("--factorization", default="awsvd", help="attention factorization: awsvd (default) or svd")
    p.add_argument("--calibration", default="wiki", help="calibration corpus (default: wiki train split)")
    p.add_argument("--samples", type=int, default=128, help="calibration sequences (default 128)")
    p.add_argument("--sample-len", type=int, default=128, help="tokens per calibration sequence (default 128)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=8, help="calibration sequences per forward pass")
    p.add_argument("--device", help="compute device for the layer being processed (default: cuda if available)")
    p.add_argument("--svd-dtype", choices=["float32", "float64"], default="float32")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out (only once the new one is complete)")
    p.add_argument("--eval", action="store_true", help="measure perplexity before and after")
    p.add_argument("--eval-ppl", type=_csv(str), default=["wiki"], help="corpora for --eval (default wiki)")
    p.add_argument("--eval-seqlen", type=_csv(int), default=[128], help="windows for --eval (default 128)")
    p.add_argument("--eval-max-tokens", type=int, help="only the first N test tokens in --eval")
    p.add_argument("--json", type=Path, help="also write the report here (it is always saved in --out)")
    p.set_defaults(run=_run_compress)


def _run_compress(args):
    from .api import compress
    from .config import CompressionConfig
    from .report import format_compression

    config = CompressionConfig(
        ratio=args.ratio,
        mode=args.mode,
        allocation_a=args.allocation_a,
        bottom_keep=args.bottom_keep,
        sublayers=tuple(args.sublayers),
        factorization=args.factorization,
        calibration_source=args.calibration,
        calibration_samples=args.samples,
        calibration_seqlen=args.sample_len,
        seed=args.seed,
        batch_size=args.batch_size,
        device=args.device,
        svd_dtype=args.svd_dtype,
    )
    result = compress(
        args.model,
        args.out,
        config,
        evaluate_ppl=args.eval_ppl if args.eval else (),
        eval_seqlens=args.eval_seqlen,
        eval_max_tokens=args.eval_max_tokens,
        overwrite=args.overwrite,
    )
    print(format_compression(result.report))
    _write_json(args.json, result.report)


def _add_plan(sub):
    p = sub.add_parser("plan", help="print the compression plan from shapes alone (no weights are loaded)")
    p.add_argument("model", nargs="?", help="config.json, model folder, .gguf or hub id (default: built-in model)")
    _add_ratio_options(p)
    p.add_argument("--json", action="store_true", help="print the plan as JSON instead of a table")
    p.set_defaults(run=_run_plan)


def _run_plan(args):
    from .api import plan
    from .report import format_plan

    result = plan(
        args.model,
        ratio=args.ratio,
        mode=args.mode,
        allocation_a=args.allocation_a,
        bottom_keep=args.bottom_keep,
        sublayers=tuple(args.sublayers),
    ).to_dict()
    print(json.dumps(result, indent=2) if args.json else format_plan(result))


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(prog="lorap", description="LoRAP compression for LLaMA-family models")
    parser.add_argument("--version", action="version", version=f"lorap {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_compress(sub)
    _add_plan(sub)
    _add_eval(sub)
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
