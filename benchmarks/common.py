"""What every benchmark shares: the repository's paths, the one way to run a `lorap` command, the
machine's load around a measurement, perplexity by `lorap eval` or on validation text in memory, the stored record a section is
written from, and the marked docs sections the tables go into.

Each script declares the sections it writes in a module-level literal, `SECTIONS = {section: the
script's arguments that re-measure it}` (or `(arguments, note)`); benchmarks/index.py reads those
declarations, without importing the scripts, into docs/records/README.md. Every page a script writes is
a record under docs/records/ (RECORDS); the guides in docs/ link to them and hold no marked section.

Only the standard library is imported here at the top: benchmarks/index.py and its test import this
module, and must stay quick."""
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS = ROOT / "benchmarks"
DOCS = ROOT / "docs"
RECORDS = DOCS / "records"  # the pages the benchmarks write; the guides in docs/ link to them
RUNS = ROOT / "runs"
CONFIGS = BENCHMARKS / "configs"
LORAP = [sys.executable, "-m", "lorap.cli"]


def run(command: list, quiet: bool = False) -> float:
    """Run `command` from the repository root, echoed to stderr, and return its wall seconds; a
    non-zero exit raises. `quiet` discards its standard output."""
    command = [str(part) for part in command]
    print("$", " ".join(command), file=sys.stderr, flush=True)
    started = time.perf_counter()
    subprocess.run(command, check=True, cwd=ROOT, stdout=subprocess.DEVNULL if quiet else None)
    return time.perf_counter() - started


def lorap(*args, quiet: bool = False) -> float:
    """`lorap ARGS` in a fresh process, so that its peak memory and time are its own; its wall seconds."""
    return run([*LORAP, *args], quiet=quiet)


def lorap_output(*args) -> str:
    """The standard output of `lorap ARGS` (for `--json` printed rather than written)."""
    command = [*LORAP, *map(str, args)]
    print("$", " ".join(command), file=sys.stderr, flush=True)
    return subprocess.run(command, check=True, cwd=ROOT, capture_output=True, text=True).stdout


def validation_perplexity(model, tokenizer, max_tokens: int, corpora: tuple, seqlen: int) -> dict:
    """{corpus: perplexity at `seqlen` tokens on the first `max_tokens` tokens of its validation split}, as the
    benchmarks that choose settings score a model in memory (never on test tokens)."""
    from lorap import api

    return {corpus: api.perplexity(model, tokenizer, corpus, seqlen, max_tokens, "validation") for corpus in corpora}


def evaluate(model: list, out: Path, ppl: str = "wiki", seqlens: str = "128", max_tokens: int = 0,
             split: str | None = None, reuse: bool = False) -> dict:
    """The report of `lorap eval MODEL --ppl PPL --seqlen SEQLENS --tasks none --json OUT`: perplexity
    only, in a fresh process. `model` is lorap eval's model arguments ([] for the built-in model,
    [FOLDER, "--alone"] for a checkpoint without the dense model beside it); max_tokens 0 reads the
    whole split; with `reuse` an existing `out` is read instead of measured again."""
    if not (reuse and out.is_file()):
        lorap("eval", *model, "--ppl", ppl, *(["--split", split] if split else []), "--seqlen", seqlens,
              *(["--max-tokens", str(max_tokens)] if max_tokens else []), "--tasks", "none", "--json", out)
    return json.loads(out.read_text())


def load_average() -> float:
    """The machine's 1-minute load average: on a shared machine, how much other work competed."""
    return os.getloadavg()[0]


class Load:
    """The load average before and after a measurement: `with Load() as load: ...`, then
    `load.before` and `load.after` (records keep them as `load.pair()` or `load.record()`)."""

    def __enter__(self):
        self.before, self.after = load_average(), None
        return self

    def __exit__(self, *exc) -> None:
        self.after = load_average()

    def pair(self) -> list:
        return [self.before, self.after]

    def record(self) -> dict:
        return {"before": self.before, "after": self.after}


def head_commit(cwd=ROOT) -> str:
    """The short hash of the checked-out commit: $LORAP_COMMIT where set (a copy of the tree without
    its git folder, as on a borrowed GPU machine), else git's answer ('' outside a git checkout)."""
    if os.environ.get("LORAP_COMMIT"):
        return os.environ["LORAP_COMMIT"]
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=cwd).stdout.strip()
    except OSError:  # no git on this machine
        return ""


def machine_line() -> str:
    """Where a table was measured: CPU model, threads, GPU, and the versions that matter."""
    import torch
    import transformers

    from lorap import __version__

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    commit = head_commit()
    gpu = f"GPU {torch.cuda.get_device_name(0)}, CUDA {torch.version.cuda}" if torch.cuda.is_available() else "no GPU"
    return (
        f"Machine: {cpu}, {torch.get_num_threads()} threads, {gpu}. lorap {__version__} (commit {commit or 'unknown'}), "
        f"torch {torch.__version__}, transformers {transformers.__version__}, Python {platform.python_version()}."
    )


def update_section(page: Path, name: str, body: str) -> None:
    """Write `body` between the page's markers of section `name` (appended if the page has none),
    leaving the rest of the page alone."""
    begin, end = f"<!-- BEGIN {name} -->", f"<!-- END {name} -->"
    block = f"{begin}\n{body.rstrip()}\n{end}"
    text = page.read_text() if page.exists() else "# Results\n\nEvery table below is written by a script in `benchmarks/`; each says how to re-run it.\n"
    pattern = re.compile(re.escape(begin) + ".*?" + re.escape(end), re.S)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip() + "\n\n" + block + "\n"
    page.parent.mkdir(parents=True, exist_ok=True)
    page.write_text(text)


def stored_or_measured(record: Path, page_only: bool, measure) -> dict:
    """The record a section is written from. With `page_only`, the one an earlier run stored in
    `record`, so that a section can be rewritten without measuring again (a borrowed GPU's minutes
    are few, a recovery's hours many); else `measure()`'s, stored there first."""
    if page_only:
        if not record.is_file():
            raise SystemExit(f"--page-only needs the record of an earlier run: {record} is missing")
        return json.loads(record.read_text())
    measured = measure()
    record.parent.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps(measured, indent=1))
    return measured


def device_sweep(parser, name: str, repeats: int, measure) -> tuple:
    """(record, record file, args) of a benchmark that sweeps shapes on one device.

    Adds --dtype, --repeats, --page, --record and --page-only to `parser`, which already has
    --device, and parses it. The record holds what ran where, the machine line, the load average
    around the sweep and the rows `measure(device, dtype, repeats)` returns; it is stored in
    runs/bench-align/NAME-DEVICE.json (see stored_or_measured)."""
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--repeats", type=int, default=repeats)
    parser.add_argument("--page", type=Path, default=RECORDS / "speed.md")
    parser.add_argument("--record", type=Path, help=f"the measured record (default: runs/bench-align/{name}-DEVICE.json)")
    parser.add_argument("--page-only", action="store_true",
                        help="rewrite the section from the record of an earlier run instead of measuring")
    args = parser.parse_args()
    record_file = args.record or RUNS / "bench-align" / f"{name}-{args.device}.json"

    def measured() -> dict:
        import torch

        torch.manual_seed(0)
        device, dtype = torch.device(args.device), getattr(torch, args.dtype)
        with Load() as load:
            rows = measure(device, dtype, args.repeats)
        return {"device": device.type, "dtype": str(dtype).removeprefix("torch."), "repeats": args.repeats,
                "machine": machine_line(), "load_average": load.pair(), "rows": rows}

    return stored_or_measured(record_file, args.page_only, measured), record_file, args


def debian_text(name: str) -> str:
    """The path of one of the benchmarks' extra corpora, a text file that get_debian_text.sh builds
    once from a Debian package into lorap's cache (fetched first if it is not there yet): `perldoc`
    (Perl's documentation, a second domain to calibrate or recover on) or `fortunes` (quotations,
    jokes and verse, a judge nothing trains on)."""
    script = BENCHMARKS / "get_debian_text.sh"
    return subprocess.run(["bash", str(script), name], check=True, capture_output=True, text=True).stdout.strip()
