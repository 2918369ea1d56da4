"""Benchmark: lorap's models in llama.cpp (docs/records/serving.md, sections serving-quality and serving-speed).

The built-in model dense, and compressed to exact 20% of its parameters by the serving, best and
paper presets, best with narrowed heads and modegpt (factor pairs are multiplied back for export,
narrowed heads padded back to whole heads with zeros):
  1. `lorap compress` (kept in --work, so a re-run reuses them) and `lorap export --format gguf`;
  2. perplexity at 128 tokens on the first 16,384 wiki test tokens, in lorap (float32, the checkpoint)
     and in llama.cpp (the GGUF file, the same token windows), and the two's difference;
  3. dense and serving quantized by llama.cpp (Q8_0, Q4_K_M): file size and perplexity;
  4. speed in llama.cpp, every model open at once and timed in turn within each repeat (order
     rotating), so machine noise falls on all: prefill of 512 tokens, and decode of 128 greedy tokens
     after a 128-token prompt. Medians, their min-max spread and the 1-minute load average.

    .venv/bin/python benchmarks/serving.py            # about 50 minutes on 2 cores, most of it compressing
    .venv/bin/python benchmarks/serving.py --repeats 9
"""
import argparse
import datetime
import json
import statistics
import sys
import time
from pathlib import Path

from common import DOCS, RUNS, load_average, lorap, machine_line, update_section

SECTIONS = {"serving-quality": "", "serving-speed": ("", "the same run as serving-quality")}
# (row name, `lorap compress` arguments, work folder) of the compressed rows, exact 20%
COMPRESSED = [("serving 20%", ["--preset", "serving"], "serving"),
              ("best 20%", ["--preset", "best"], "best"),
              ("best --attention headdim 20%", ["--preset", "best", "--attention", "headdim"], "best-headdim"),
              ("modegpt 20%", ["--preset", "modegpt"], "modegpt"),
              ("paper 20%", ["--preset", "paper"], "paper")]
QUANTIZED = ("dense", "serving 20%")  # rows also quantized by llama.cpp
SEQLEN, MAX_TOKENS = 128, 16384


def build_models(work: Path, dtype: str) -> dict:
    """{row name: (checkpoint folder or None for dense, GGUF path)}, compressing and exporting what is missing."""
    rows = {"dense": (None, work / f"dense-{dtype}.gguf")}
    arguments = {}
    for name, compress_arguments, stem in COMPRESSED:
        rows[name] = (work / stem, work / f"{stem}-{dtype}.gguf")
        arguments[name] = compress_arguments
    for name, (folder, gguf) in rows.items():
        if folder is not None and not (folder / "config.json").is_file():
            lorap("compress", *arguments[name], "--ratio", "0.2", "--mode", "exact", "--out", str(folder), "--no-speed")
        if not gguf.is_file():
            lorap("export", *([str(folder)] if folder else []), "--format", "gguf", "--dtype", dtype, "--out", str(gguf),
                  "--json", str(gguf.with_suffix(".json")))
    return rows


def lorap_perplexity(folder, windows) -> float:
    import math

    from lorap.evaluate.perplexity import window_nll
    from lorap.io.models import load_model

    model, _, _ = load_model(str(folder) if folder else None)
    nll, count = window_nll(model, windows)
    return math.exp(nll / count)


def quality(rows: dict, work: Path, windows, threads: int) -> tuple[list, dict]:
    from lorap.export import llamacpp

    table, files = [], {}
    for name, (folder, gguf) in rows.items():
        export = json.loads(gguf.with_suffix(".json").read_text())
        ours = lorap_perplexity(folder, windows)
        theirs = llamacpp.perplexity(gguf, windows, threads)
        table.append((name, "f16", export["parameters"]["checkpoint"], export["parameters"]["exported"], gguf.stat().st_size,
                      ours, theirs))
        files[(name, "f16")] = gguf
        if name in QUANTIZED:
            for kind in llamacpp.QUANT_TYPES:
                target = work / f"{gguf.stem}-{kind}.gguf"
                if not target.is_file():
                    llamacpp.quantize(gguf, target, kind, threads)
                table.append((name, kind, None, None, target.stat().st_size, None, llamacpp.perplexity(target, windows, threads)))
                files[(name, kind)] = target
        print(f"{name}: lorap {ours:.3f}, llama.cpp {theirs:.3f}", file=sys.stderr, flush=True)
    return table, files


def speed(files: dict, repeats: int, threads: int, tokenizer_prompt: list) -> dict:
    from lorap.export import llamacpp

    prefill_prompt = (tokenizer_prompt * 8)[:512]
    timers = {key: (llamacpp.Timer(path, prefill_prompt, 0, threads), llamacpp.Timer(path, tokenizer_prompt[:128], 128, threads))
              for key, path in files.items()}
    times = {key: {"prefill": [], "decode": []} for key in files}
    loads = [load_average()]
    keys = list(files)
    for repeat in range(repeats + 1):  # the first round warms up and is not kept
        order = keys[repeat % len(keys):] + keys[: repeat % len(keys)]
        for key in order:
            prefill, decode = timers[key]
            seconds = (prefill.prefill_seconds(), decode.decode_seconds())
            if repeat:
                times[key]["prefill"].append(seconds[0])
                times[key]["decode"].append(seconds[1])
        loads.append(load_average())
        print(f"speed round {repeat}/{repeats}", file=sys.stderr, flush=True)
    for timer in (timer for pair in timers.values() for timer in pair):
        timer.close()
    return {"times": times, "load": (min(loads), max(loads))}


def render(table: list, timing: dict, repeats: int, threads: int, seconds: float) -> tuple[str, str]:
    quality_lines = [
        "## Perplexity in lorap and in llama.cpp", "",
        f"Measured {datetime.date.today().isoformat()} by `.venv/bin/python benchmarks/serving.py` ({seconds / 60:.0f} min "
        "in all). Built-in model; compressed rows at exact 20% of its parameters (`lorap compress --preset P --ratio 0.2 "
        "--mode exact`), exported with `lorap export --format gguf --dtype f16`; Q8_0 and Q4_K_M made from that file by "
        "llama.cpp's quantizer. Perplexity at 128 tokens on the first 16,384 wiki test tokens, the same token windows in "
        "both: lorap runs the checkpoint in float32, llama.cpp the file.", "", machine_line(), "",
        "| model | weights | parameters (checkpoint) | parameters (file) | file MiB | PPL lorap | PPL llama.cpp | difference |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, kind, checkpoint, exported, size, ours, theirs in table:
        difference = f"{100 * (theirs / ours - 1):+.2f}%" if ours else ""
        quality_lines.append(
            f"| {name} | {kind} | {f'{checkpoint:,}' if checkpoint else ''} | {f'{exported:,}' if exported else ''} | "
            f"{size / 2**20:,.1f} | {f'{ours:.2f}' if ours else ''} | {theirs:.2f} | {difference} |")
    times = timing["times"]
    dense = {kind: times[("dense", kind)] for kind in ("f16", "q8_0", "q4_k_m")}
    speed_lines = [
        "## Speed in llama.cpp", "",
        f"Same run. Every file open at once in llama.cpp ({threads} threads), timed in turn within each of {repeats} "
        "repeats with the order rotating (one warm-up round not kept): prefill of 512 tokens, and decode of 128 greedy "
        "tokens after a 128-token prompt. Medians, [min-max] in brackets; the speedup is the dense file's median over "
        f"this file's, dense of the same weight type. 1-minute load average {timing['load'][0]:.1f}-{timing['load'][1]:.1f}.",
        "", machine_line(), "",
        "| model | weights | prefill 512, tokens/s | decode, tokens/s | prefill speedup | decode speedup |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for (name, kind), runs in times.items():
        prefill, decode = statistics.median(runs["prefill"]), statistics.median(runs["decode"])
        base = dense[kind]

        def rate(tokens, values):
            return f"{tokens / statistics.median(values):,.0f} [{tokens / max(values):,.0f}-{tokens / min(values):,.0f}]"

        speed_lines.append(
            f"| {name} | {kind} | {rate(512, runs['prefill'])} | {rate(128, runs['decode'])} | "
            f"{statistics.median(base['prefill']) / prefill:.2f}x | {statistics.median(base['decode']) / decode:.2f}x |")
    return "\n".join(quality_lines), "\n".join(speed_lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--work", type=Path, default=RUNS / "bench-serving")
    parser.add_argument("--page", type=Path, default=DOCS / "records/serving.md")
    args = parser.parse_args()
    started = time.perf_counter()
    args.work.mkdir(parents=True, exist_ok=True)
    from lorap.io.data import evaluation_windows
    from lorap.io.models import load_model

    rows = build_models(args.work, "f16")
    _, tokenizer, _ = load_model(None)
    windows = evaluation_windows(tokenizer, "wiki", SEQLEN, MAX_TOKENS)
    table, files = quality(rows, args.work, windows, args.threads)
    timing = speed(files, args.repeats, args.threads, windows[:8].flatten().tolist())
    quality_text, speed_text = render(table, timing, args.repeats, args.threads, time.perf_counter() - started)
    update_section(args.page, "serving-quality", quality_text)
    update_section(args.page, "serving-speed", speed_text)
    print(quality_text + "\n\n" + speed_text)


if __name__ == "__main__":
    main()
