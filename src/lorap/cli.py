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
    p = sub.add_parser("eval", help="measure perplexity of a model (dense or lorap checkpoint)")
    p.add_argument("model", nargs="?", help="hub id, model folder, lorap checkpoint or .gguf (default: built-in SmolLM2-135M)")
    p.add_argument("--ppl", type=_csv(str), default=["wiki"], help="corpora, comma-separated (default: wiki)")
    p.add_argument("--seqlen", type=_csv(int), default=[128], help="window lengths, comma-separated (default: 128)")
    p.add_argument("--max-tokens", type=int, help="use only the first N test tokens of each corpus")
    p.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--json", type=Path, help="write the results as JSON here")
    p.set_defaults(run=_run_eval)


def _run_eval(args):
    from .api import evaluate

    result = evaluate(args.model, ppl=args.ppl, seqlens=args.seqlen, max_tokens=args.max_tokens, device=args.device)
    from .report import format_perplexity

    print(format_perplexity(result))
    _write_json(args.json, result)


def _write_json(path: Path | None, data: dict) -> None:
    if path is None:
        return
    from .report import write_json_atomic

    write_json_atomic(path, data)
    print(f"wrote {path}", file=sys.stderr)


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(prog="lorap", description="LoRAP compression for LLaMA-family models")
    parser.add_argument("--version", action="version", version=f"lorap {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
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
