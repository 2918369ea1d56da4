"""Write one benchmark's table into its own marked section of a docs page, leaving the rest alone."""
import json
import os
import platform
import re
import subprocess
from pathlib import Path


def head_commit(cwd=None) -> str:
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
    """Where a table was measured: CPU model, cores, and the versions that matter."""
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
    begin, end = f"<!-- BEGIN {name} -->", f"<!-- END {name} -->"
    block = f"{begin}\n{body.rstrip()}\n{end}"
    text = page.read_text() if page.exists() else "# Results\n\nEvery table below is written by a script in `benchmarks/`; each says how to re-run it.\n"
    pattern = re.compile(re.escape(begin) + ".*?" + re.escape(end), re.S)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip() + "\n\n" + block + "\n"
    page.parent.mkdir(parents=True, exist_ok=True)
    page.write_text(text)


def device_sweep(parser, name: str, repeats: int, measure) -> tuple:
    """(record, record file, args) of a benchmark that sweeps shapes on one device.

    Adds --dtype, --repeats, --page, --record and --page-only to `parser`, which already has
    --device, and parses it. The record is `measure(device, dtype, repeats)`'s, stored first in
    runs/bench-align/NAME-DEVICE.json. With --page-only it is the one an earlier run stored there, so
    a section can be rewritten without measuring again (a borrowed GPU's minutes are few)."""
    import torch

    root = Path(__file__).resolve().parent.parent
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--repeats", type=int, default=repeats)
    parser.add_argument("--page", type=Path, default=root / "docs" / "speed.md")
    parser.add_argument("--record", type=Path, help=f"the measured record (default: runs/bench-align/{name}-DEVICE.json)")
    parser.add_argument("--page-only", action="store_true",
                        help="rewrite the section from the record of an earlier run instead of measuring")
    args = parser.parse_args()
    record_file = args.record or root / "runs" / "bench-align" / f"{name}-{args.device}.json"
    if args.page_only:
        if not record_file.exists():
            raise SystemExit(f"--page-only needs the record of an earlier run: {record_file} is missing")
        return json.loads(record_file.read_text()), record_file, args
    torch.manual_seed(0)
    record = measure(torch.device(args.device), getattr(torch, args.dtype), args.repeats)
    record_file.parent.mkdir(parents=True, exist_ok=True)
    record_file.write_text(json.dumps(record, indent=1))
    return record, record_file, args
