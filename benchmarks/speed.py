"""Benchmark: how much faster compressed models run, and what aligning their shapes costs.

Section `speed`: `lorap bench` (dense and compressed timed interleaved, random weights in the
plan's shapes) on LLaMA-2-7B and LLaMA-3-8B shapes (the first decoder layer plus embeddings and LM
head, as the whole model does not fit in this machine's memory in fp32) and on the built-in
SmolLM2-135M shapes: the paper's method at 20% and 50% with and without --align, best (aligned by
default), with lorap's runtime for factor pairs and with the pairs as saved, fp32 and bf16; beside each fp32 row, what `lorap plan`
predicted.

Section `runtime`: the rows issue #12's CPU targets name (LLaMA-2-7B paper 20% and 50% aligned, the
built-in model's best at exact 20%), each with lorap's runtime for factor pairs and with the pairs as
saved, prefill 512 and decode.

Section `align-quality`: perplexity of the built-in model at exact 20% of the whole model, with and
without --align, paper and best presets (real compression, wiki calibration, wiki test tokens).

Section `real`: those checkpoints timed against the dense model by plain transformers, lorap not
importable (benchmarks/plain_transformers_speed.py).

Section `headdim`: narrowed heads (`--attention headdim`, and MoDeGPT's preset) against factor pairs at
20%: `lorap bench` on LLaMA-2-7B and SmolLM2-135M shapes with the KV cache per token, then the
built-in model's real checkpoints (perplexity, KV cache) timed by plain transformers as in `real`.

    .venv/bin/python benchmarks/speed.py                      # every section into docs/records/speed.md
    .venv/bin/python benchmarks/speed.py --only speed         # one section
    python benchmarks/speed.py --only speed-cuda              # on a machine with a GPU: section speed-cuda

Section `speed-cuda`: the same comparison on a GPU, whole models in bf16 (LLaMA-2-7B and
LLaMA-3-8B fit there), prefill at 512 and 2048 tokens (batch 1 and 8) and decode, and for the rows
that ask for it (factor pairs against narrowed heads) decode compiled as engines run it (`--rows
compiled`: a static KV cache, each token one CUDA graph), each row in its own process; the section
is rewritten after every row, so a run cut short keeps what it measured.
The multiple --align defaults to is chosen by benchmarks/align_choice.py (same page).
"""
import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from common import BENCHMARKS, CONFIGS, DOCS, RUNS, evaluate, lorap, lorap_output, machine_line, run, update_section

SECTIONS = {
    "speed": "--only speed --repeats 7",
    "runtime": "--only runtime --repeats 9",
    "align-quality": "--only align-quality",
    "real": ("--only real --repeats 9", "after --only align-quality, whose checkpoints it times"),
    "headdim": "--only headdim --repeats 9",
    "speed-cuda": ("--only speed-cuda --repeats 3", "on a machine with a CUDA GPU, as `bash benchmarks/gpu.sh` runs it"),
}

LLAMA2, LLAMA3 = str(CONFIGS / "llama-2-7b.json"), str(CONFIGS / "llama-3-8b.json")
SMOLLM2 = str(CONFIGS / "smollm2-135m.json")  # the built-in model's shapes, for machines without its weights
ONE_LAYER = ["--layers", "1"]
# (label, model argument, plan arguments, extra bench arguments)
SPEED_ROWS = [
    ("LLaMA-2-7B, paper 20%", LLAMA2, ["--ratio", "0.2"], ONE_LAYER),
    ("LLaMA-2-7B, paper 20%, --align auto", LLAMA2, ["--ratio", "0.2", "--align", "auto"], ONE_LAYER),
    ("LLaMA-2-7B, paper 20%, --align auto, bf16", LLAMA2, ["--ratio", "0.2", "--align", "auto"],
     [*ONE_LAYER, "--dtype", "bfloat16"]),
    ("LLaMA-2-7B, paper 50%, --align auto", LLAMA2, ["--ratio", "0.5", "--align", "auto"], ONE_LAYER),
    ("LLaMA-2-7B, best 20% (aligned by default)", LLAMA2, ["--ratio", "0.2", "--preset", "best"], ONE_LAYER),
    ("LLaMA-3-8B (GQA), paper 20%, --align auto", LLAMA3, ["--ratio", "0.2", "--align", "auto"], ONE_LAYER),
    ("SmolLM2-135M, paper exact 20%", None, ["--ratio", "0.2", "--mode", "exact"], []),
    ("SmolLM2-135M, paper exact 20%, --align auto", None, ["--ratio", "0.2", "--mode", "exact", "--align", "auto"], []),
    ("SmolLM2-135M, best exact 20% (aligned by default)", None, ["--ratio", "0.2", "--mode", "exact", "--preset", "best"], []),
    ("SmolLM2-135M, best exact 20%, factor pairs as saved", None,
     ["--ratio", "0.2", "--mode", "exact", "--preset", "best"], ["--unfused"]),
    ("SmolLM2-135M, best exact 20%, bf16", None, ["--ratio", "0.2", "--mode", "exact", "--preset", "best"],
     ["--dtype", "bfloat16"]),
]
# Section `runtime`: the CPU rows that issue #12's targets name, with lorap's runtime for factor pairs
# (optimize_for_inference) and with the pairs as saved, prefill 512 and decode only (no prediction),
# so that the runtime's gain is measured in one shorter run. (label, model, plan arguments, extra bench arguments)
AS_SAVED = "factor pairs as saved"
RUNTIME_ROWS = [
    (label + suffix, model, plan_args, bench_args + extra)
    for label, model, plan_args, bench_args in [
        ("LLaMA-2-7B, paper 20%, --align auto", LLAMA2, ["--ratio", "0.2", "--align", "auto"], ONE_LAYER),
        ("LLaMA-2-7B, paper 50%, --align auto", LLAMA2, ["--ratio", "0.5", "--align", "auto"], ONE_LAYER),
        ("SmolLM2-135M, best exact 20%", None, ["--ratio", "0.2", "--mode", "exact", "--preset", "best"], []),
    ]
    for suffix, extra in (("", []), (f", {AS_SAVED}", ["--unfused"]))
]
# On a GPU: whole models, bf16. The alignment is written out in each label, so that a row says what it
# ran whatever the default of the day. (label, model, plan arguments, extra bench arguments)
CUDA_ROWS = [
    ("LLaMA-2-7B, paper 20%", LLAMA2, ["--ratio", "0.2"], []),
    ("LLaMA-2-7B, paper 20%, --align 64", LLAMA2, ["--ratio", "0.2", "--align", "64"], []),
    ("LLaMA-2-7B, paper 20%, --align 64, factor pairs unfused", LLAMA2, ["--ratio", "0.2", "--align", "64"], ["--unfused"]),
    ("LLaMA-2-7B, paper 50%, --align 64", LLAMA2, ["--ratio", "0.5", "--align", "64"], []),
    ("LLaMA-2-7B, best 20%, --align 64", LLAMA2, ["--ratio", "0.2", "--preset", "best", "--align", "64"], []),
    ("LLaMA-3-8B (GQA), paper 20%, --align 64", LLAMA3, ["--ratio", "0.2", "--align", "64"], []),
    ("SmolLM2-135M shapes, best exact 20%", SMOLLM2, ["--ratio", "0.2", "--mode", "exact", "--preset", "best"], []),
    ("LLaMA-2-7B, paper 20%, --align 8", LLAMA2, ["--ratio", "0.2", "--align", "8"], []),
    ("LLaMA-2-7B, best 20%, --align auto (CUDA: 8 and its pair limit)", LLAMA2, ["--ratio", "0.2", "--preset", "best"], []),
    # Factor pairs against narrowed heads, decoding also as engines do (CUDA graphs): first in
    # benchmarks/gpu.sh, as a borrowed GPU's minutes are few.
    *[(f"LLaMA-2-7B, {label} 20%, decode also compiled", LLAMA2, ["--ratio", "0.2", *arguments], ["--compiled-decode"])
      for label, arguments in (("best", ["--preset", "best"]),
                               ("best --attention headdim", ["--preset", "best", "--attention", "headdim"]),
                               ("modegpt", ["--preset", "modegpt"]))],
]
# The rows benchmarks/gpu.sh measures first: factor pairs against narrowed heads, with compiled decode.
COMPILED_CUDA_ROWS = [index for index, row in enumerate(CUDA_ROWS) if "--compiled-decode" in row[3]]
# 64 new tokens, not 128: a borrowed GPU's minutes are few, and eager decode on a GPU is steady
CUDA_TIMING = ["--device", "cuda", "--dtype", "bfloat16", "--prefill", "512,2048", "--batch", "1,8", "--warmup", "1",
               "--new-tokens", "64"]
# (preset, --align): the built-in model at exact 20%, unaligned and at the device's default ("auto", which
# also keeps dense a factor pair too large to run faster; best's default, not the paper's)
QUALITY_ROWS = [("paper", "1"), ("paper", "auto"), ("best", "1"), ("best", "auto")]
# Section `headdim`: narrowed heads against factor pairs at 20%, each preset at its default alignment.
# (label, method arguments): the methods compared, as `lorap bench` shapes and as real checkpoints
# (best's narrowed heads keep query/key and value heads of one size; -a 3 keeps more value than query/key
# dimensions, two sizes, which PyTorch's fused CPU attention kernel cannot run at decode)
HEADDIM_METHODS = [("best (factor pairs)", ["--preset", "best"]),
                   ("best, --attention headdim", ["--preset", "best", "--attention", "headdim"]),
                   ("best, --attention headdim -a 3", ["--preset", "best", "--attention", "headdim", "-a", "3"]),
                   ("modegpt", ["--preset", "modegpt"])]
# (label, model, plan arguments, extra bench arguments) for `lorap bench` on random weights
HEADDIM_BENCH_ROWS = [
    (f"{name}, {label}", model, [*ratio, *method], bench_args)
    for name, model, ratio, bench_args in [
        ("LLaMA-2-7B", LLAMA2, ["--ratio", "0.2"], ONE_LAYER),
        ("SmolLM2-135M", None, ["--ratio", "0.2", "--mode", "exact"], []),
    ]
    for label, method in HEADDIM_METHODS
]


def _predicted(model, plan_args: list, work: Path, index) -> dict:
    """What `lorap plan` predicts for the whole model (its micro-benchmark of the plan's layers)."""
    out = work / f"plan-{index}.json"
    printed = lorap_output("plan", *([model] if model else []), *plan_args, "--json")
    out.write_text(printed)
    return json.loads(printed)["predicted_speed"]


def _cell(row: dict) -> str:
    """'**1.20x** [1.17-1.24] (layers 1.25x [1.21-1.28]; whole model extrapolated 1.24x)' from a bench row."""
    from lorap.bench.run import paired_speedup_text

    whole = row.get("whole_model_speedup_extrapolated")
    extra = ([f"layers {paired_speedup_text(row, 'layers_speedup')}"] if "layers_speedup" in row else []) + (
        [f"whole model extrapolated {whole:.2f}x"] if whole else [])
    speedup, quartiles = paired_speedup_text(row).split(" ", 1)
    return f"**{speedup}** {quartiles}" + (f" ({'; '.join(extra)})" if extra else "")


def runtime_section(work: Path, repeats: int) -> str:
    lines = [
        "## What lorap's runtime for factor pairs gains on the CPU",
        "",
        "Written by `benchmarks/speed.py --only runtime` (`lorap bench`, random weights in the plan's shapes, batch 1, "
        f"fp32, {repeats} rounds after one warm-up, dense and compressed interleaved and paired as in the table above; "
        "LLaMA rows time the first decoder layer plus embeddings and LM head, `layers` the decoder layer alone). Each "
        "configuration is timed twice: as checkpoints load (`optimize_for_inference`: q/k/v's right factors in one "
        "GEMM, each left factor stored column by column) and with its factor pairs as saved (`--unfused`: each pair's "
        "two GEMMs on row-major weights, the runtime before the column-major layout). Load is the 1-minute load "
        "average before and after.",
        "",
        machine_line(),
        "",
    ]
    return "\n".join(lines + _bench_table(work, "runtime", RUNTIME_ROWS, repeats, kv_cache=False))


def _bench_table(work: Path, prefix: str, rows: list, repeats: int, kv_cache: bool, reuse: bool = False) -> list:
    """`lorap bench` of each (label, model, plan arguments, bench arguments) row at prefill 512 and decode:
    the table's lines (with the KV cache a token needs, from `lorap plan`, if `kv_cache`). With `reuse`, a
    row whose record is already in `work` is not timed again (each row is its own paired run)."""
    timing = ["--prefill", "512", "--batch", "1", "--repeats", str(repeats), "--warmup", "1"]
    cache_head = " KV cache per token (fp32) |" if kv_cache else ""
    lines = [f"| model and method | parameters timed, dense -> compressed |{cache_head} prefill 512 | "
             "decode (128 after 128) | load |",
             "|---|---|" + "---|" * (4 if kv_cache else 3)]
    for index, (label, model, plan_args, bench_args) in enumerate(rows):
        out = work / f"{prefix}-{index}.json"
        if not (reuse and out.is_file()):
            lorap("bench", *([model] if model else []), *plan_args, *bench_args, *timing, "--json", out)
        report = json.loads(out.read_text())
        params, load = report["parameters"], report["load_average"]
        cache = f" {_kv_cache(model, plan_args, work / f'{prefix}-plan-{index}.json')} |" if kv_cache else ""
        prefill = next(row for row in report["prefill"].values() if row["batch"] == 1 and row["tokens"] == 512)
        lines.append(f"| {label} | {params['dense'] / 1e6:.1f}M -> {params['compressed'] / 1e6:.1f}M "
                     f"({params['dense'] / params['compressed']:.2f}x fewer) |{cache} {_cell(prefill)} | "
                     f"{_cell(report['decode'])} | {load['before']:.1f} / {load['after']:.1f} |")
    return lines


def _kv_cache(model, plan_args: list, out: Path) -> str:
    """'46,080 -> 36,864 B (-20%)': the key and value bytes a token caches, from `lorap plan` (fp32)."""
    printed = lorap_output("plan", *([model] if model else []), *plan_args, "--json", "--no-speed")
    out.write_text(printed)
    values = json.loads(printed)["totals"]["kv_cache_values_per_token"]
    dense, compressed = 4 * values["dense"], 4 * values["compressed"]
    return f"{dense:,} -> {compressed:,} B ({compressed / dense - 1:+.0%})"


def speed_section(work: Path, timing: list, rows: list) -> str:
    repeats = timing[timing.index("--repeats") + 1]
    lines = [
        "## Dense vs compressed, timed side by side",
        "",
        "Written by `benchmarks/speed.py --only speed` (`lorap bench`, random weights in the plan's shapes: speed "
        "depends on shapes, not values). Dense and compressed are timed interleaved in one process, "
        f"{repeats} rounds after one warm-up, batch 1, fp32 unless said. A speedup is paired: the median over rounds "
        "of dense time / compressed time measured back to back (decode: over the 128 x "
        f"{repeats} tokens, the two models generating in lockstep, a token each in turn), with the quartiles of "
        "those ratios in brackets. Compressed models run as checkpoints load (`optimize_for_inference`: q/k/v's right "
        "factors in one GEMM, left factors stored column by column) unless a row says `as saved` (each pair's two "
        "GEMMs on its weights as saved, `--unfused`). LLaMA rows time the first decoder layer plus embeddings and LM head (`--layers 1`, the whole "
        "model does not fit in memory here): the bold figure is that model's, diluted by the LM head that "
        "compression never touches; `layers` is the decoder layer alone (timed by forward hooks in the same "
        "runs), and `whole model extrapolated` adds the measured time outside the layers to the layer's time "
        "scaled to all 32 layers. `predicted` is what `lorap plan` says before compressing (a micro-benchmark "
        "of one layer of each shape, prefill 512 / decode). Load is the 1-minute load average before and after.",
        "",
        machine_line(),
        "",
        "| model and method | parameters timed, dense -> compressed | prefill 128 | prefill 512 | decode (128 after 128) "
        "| predicted | load |",
        "|---|---|---|---|---|---|---|",
    ]
    for index, (label, model, plan_args, bench_args) in enumerate(SPEED_ROWS):
        if index not in rows:
            continue
        out = work / f"speed-{index}.json"
        dtype = bench_args[bench_args.index("--dtype") + 1] if "--dtype" in bench_args else "float32"
        predicted = _predicted(model, plan_args, work, index) if dtype == "float32" else None
        lorap("bench", *([model] if model else []), *plan_args, *bench_args, *timing, "--json", out)
        report = json.loads(out.read_text())
        params = report["parameters"]
        prefill = {row["tokens"]: row for row in report["prefill"].values() if row["batch"] == 1}
        cells = []
        for tokens in (128, 512):
            row = prefill.get(tokens)
            cells.append(_cell(row) if row else "-")
        decode = report["decode"]
        load = report["load_average"]
        guess = (f"{predicted['prefill']['speedup']:.2f}x / {predicted['decode']['speedup']:.2f}x"
                 if predicted and "skipped" not in predicted else "-")
        lines.append(
            f"| {label} | {params['dense'] / 1e6:.1f}M -> {params['compressed'] / 1e6:.1f}M "
            f"({params['dense'] / params['compressed']:.2f}x fewer) | {cells[0]} | {cells[1]} | "
            f"{_cell(decode)} "
            f"| {guess} | {load['before']:.1f} / {load['after']:.1f} |"
        )
    return "\n".join(lines)


def cuda_section(work: Path, repeats: int, page: Path, rows: list) -> None:
    """Section speed-cuda, rewritten after every row (a failed row says so and the rest go on); a row
    not in `rows` is shown from the record an earlier run left in `work`, if any."""
    import torch

    if not torch.cuda.is_available():
        raise SystemExit("--only speed-cuda needs a machine with a CUDA GPU")
    head = [
        "## Dense vs compressed on a GPU, whole models, bf16",
        "",
        "Written by `benchmarks/speed.py --only speed-cuda` (`lorap bench --device cuda --dtype bfloat16`, random "
        "weights in the plan's shapes, every decoder layer: the whole model is timed). Dense and compressed are "
        f"timed interleaved in one process, {repeats} rounds after one warm-up, by CUDA events; speedups are paired "
        "as in the CPU table above, with the quartiles of the per-round ratios in brackets, and `layers` is the "
        "decoder layers alone (CUDA events recorded by forward hooks, no synchronisation inside the forward). "
        "Runtime: plain transformers eager mode (no CUDA graphs, no compilation), q/k/v's right factors fused "
        "unless a row says unfused; `decode compiled` decodes as serving engines do, from transformers' static KV "
        "cache with the forward compiled by `torch.compile(mode=\"reduce-overhead\")`, each token one CUDA graph "
        "replayed (`lorap bench --compiled-decode`), where a row asks for it. `predicted` is `lorap plan`'s "
        "micro-benchmark on the same GPU (prefill 512 / decode).",
        "",
        machine_line(),
        "",
        "| model and method | parameters, dense -> compressed | prefill 512 | prefill 2048 | prefill 8 x 2048 "
        "| decode (64 after 128) | decode compiled | predicted |",
        "|---|---|---|---|---|---|---|---|",
    ]
    lines = []
    for index, (label, model, plan_args, bench_args) in enumerate(CUDA_ROWS):
        out, planned = work / f"speed-cuda-{index}.json", work / f"plan-cuda-{index}.json"
        if index not in rows:
            if not (out.is_file() and planned.is_file()):
                continue
            predicted = json.loads(planned.read_text())["predicted_speed"]
        else:
            try:
                predicted = _predicted(model, plan_args, work, f"cuda-{index}")
                lorap("bench", model, *plan_args, *bench_args, *CUDA_TIMING, "--repeats", repeats, "--json", out)
            except subprocess.CalledProcessError as error:
                print(error.stderr or "", file=sys.stderr)
                lines.append(f"| {label} | failed (exit status {error.returncode}); see the run's log | | | | | | |")
                update_section(page, "speed-cuda", "\n".join(head + lines))
                continue
        report = json.loads(out.read_text())
        params = report["parameters"]
        cells = [_cell(report["prefill"][key]) if key in report["prefill"] else "-" for key in ("1x512", "1x2048", "8x2048")]
        guess = (f"{predicted['prefill']['speedup']:.2f}x / {predicted['decode']['speedup']:.2f}x"
                 if "skipped" not in predicted else "-")
        lines.append(
            f"| {label} | {params['dense'] / 1e6:.1f}M -> {params['compressed'] / 1e6:.1f}M "
            f"({params['dense'] / params['compressed']:.2f}x fewer) | {' | '.join(cells)} | {_cell(report['decode'])} "
            f"| {_cell(report['decode_compiled']) if 'decode_compiled' in report else '-'} | {guess} |"
        )
        update_section(page, "speed-cuda", "\n".join(head + lines))


def real_section(work: Path, repeats: int) -> str:
    """The built-in model's real checkpoints (from the align-quality section), timed by plain transformers."""
    rows = [(f"{preset}, --align {align}", work / f"quality-{preset}-{align}") for preset, align in QUALITY_ROWS]
    missing = [str(folder) for _, folder in rows if not folder.exists()]
    if missing:
        raise SystemExit(f"run the align-quality section first; missing {', '.join(missing)}")
    lines = [
        "## The built-in model's real checkpoints, run by plain transformers",
        "",
        "Written by `benchmarks/speed.py --only real` (after `--only align-quality`, whose exact-20% checkpoints "
        f"it times): {PLAIN_TRANSFORMERS_PROTOCOL.format(repeats=repeats)}",
        "",
        machine_line(),
        "",
    ]
    return "\n".join(lines + _plain_transformers_tables(work / "plain-transformers.json", rows, repeats))


PLAIN_TRANSFORMERS_PROTOCOL = (
    "`benchmarks/plain_transformers_speed.py` loads each with `from_pretrained(..., "
    "trust_remote_code=True)` in a process where lorap cannot be imported, calls `model.optimize_for_inference()`, "
    "and times the dense model and every checkpoint interleaved (medians of {repeats} repeats after a warm-up, "
    "batch 1, fp32, min-max in round brackets; decode with the models generating in lockstep, a token each in "
    "turn). `prefill N` is one pass over N tokens without a cache, logits at every position (as a scoring pass "
    "computes them, and as `lorap bench` times prefill); `first token after N` is the prompt's pass as "
    "`generate()` runs it, the KV cache filled and the vocabulary projected at the last position only "
    "(`logits_to_keep=1`). Speedups are paired: the median over rounds (decode: over tokens) of the dense time "
    "over the checkpoint's, measured back to back, with the quartiles of those ratios in square brackets.")


def _plain_transformers_tables(out: Path, rows: list, repeats: int) -> list:
    """The dense model and each (label, checkpoint folder) timed by plain_transformers_speed.py into `out`:
    the timing table, the load and where a decode token's time goes."""
    from lorap.io.default_model import default_model_dir

    run([sys.executable, BENCHMARKS / "plain_transformers_speed.py", default_model_dir(), *[folder for _, folder in rows],
         "--repeats", repeats, "--json", out])
    report = json.loads(out.read_text())
    lines = [
        "| model | parameters | prefill 128 | prefill 512 | first token after 128 | first token after 512 | "
        "decode tokens/s (128 after 128) |",
        "|---|---:|---|---|---|---|---|",
    ]
    dense_label = next(iter(report["parameters"]))
    labelled = [("dense", dense_label), *[(name, str(folder)) for name, folder in rows]]

    def speedup(key, *where) -> str:
        if key == dense_label:
            return ""
        ratio = report["speedup"][key]
        for step in where:
            ratio = ratio[step]
        return f", **{ratio['median']:.2f}x** [{ratio['low_quartile']:.2f}-{ratio['high_quartile']:.2f}]"

    for label, key in labelled:
        cells = []
        for kind in ("prefill", "first_token"):
            for length in ("128", "512"):
                mine = report[kind][length][key]
                cells.append(f"{mine['median']:.0f} ms ({mine['min']:.0f}-{mine['max']:.0f})" + speedup(key, kind, length))
        rate = report["decode"][key]
        cells.append(f"{rate['median']:.1f} ({rate['min']:.1f}-{rate['max']:.1f})" + speedup(key, "decode"))
        lines.append(f"| {label} | {report['parameters'][key]:,} | {' | '.join(cells)} |")
    return lines + ["", f"Load average (1 minute): {report['load_before']:.1f} before, {report['load_after']:.1f} after.",
                    "", *_decode_shares(report, labelled)]


def headdim_section(work: Path, repeats: int, max_tokens: int, samples: int, reuse: bool) -> str:
    """Narrowed heads against factor pairs: `lorap bench` on the plans' shapes, then the built-in model's
    real checkpoints (their perplexity and KV cache) timed by plain transformers."""
    lines = [
        "## Narrowed heads against factor pairs, timed",
        "",
        "Written by `benchmarks/speed.py --only headdim`. `best` compresses attention into factor pairs; with "
        "`--attention headdim` its attention keeps plain matrices with fewer query/key and value dimensions per "
        "head (and a smaller KV cache); `modegpt` is MoDeGPT as published (narrowed heads, its own FFN and layer "
        "allocation). First `lorap bench` on random weights in each plan's shapes (batch 1, fp32, "
        f"{repeats} rounds after one warm-up, dense and compressed interleaved and paired as in the tables above; "
        "LLaMA rows time the first decoder layer plus embeddings and LM head, `layers` the decoder layer alone; "
        "the KV cache from `lorap plan`).",
        "",
        machine_line(),
        "",
        *_bench_table(work, "headdim-bench", HEADDIM_BENCH_ROWS, repeats, kv_cache=True, reuse=reuse),
        "",
        f"Then the built-in model compressed to exact 20% ({samples} x 128 calibration tokens of the `wiki` train "
        f"split), perplexity at 128 tokens on the first {max_tokens:,} test tokens of `wiki` and `pydocs`, and "
        f"the KV cache a token needs (fp32), from `lorap eval`:",
        "",
        "| checkpoint | parameters | removed | attention | wiki @ 128 | pydocs @ 128 | KV cache per token |",
        "|---|---:|---:|---|---:|---:|---:|",
    ]
    rows = []
    for label, arguments in HEADDIM_METHODS:  # the real checkpoints, exact 20%, calibrated on wiki
        folder = work / f"headdim-{'-'.join(arguments).replace('--', '')}"
        if not (reuse and (folder / "compression_report.json").is_file()):
            lorap("compress", *arguments, "--ratio", "0.2", "--mode", "exact", "--out", folder, "--overwrite",
                  "--samples", samples)
        evaluation = evaluate([folder, "--alone"], folder.with_suffix(".eval.json"), ppl="wiki,pydocs",
                              max_tokens=max_tokens, reuse=reuse)
        totals = json.loads((folder / "compression_report.json").read_text())["plan"]["totals"]
        values = totals["kv_cache_values_per_token"]
        perplexity = evaluation["perplexity"]
        lines.append(f"| {label} | {totals['compressed_parameters']:,} | {totals['removed_fraction']:.2%} | "
                     f"{_attention_shape(folder)} | {perplexity['wiki']['128']:.2f} | {perplexity['pydocs']['128']:.2f} | "
                     f"{4 * values['compressed']:,} B ({values['compressed'] / values['dense'] - 1:+.0%}) |")
        rows.append((label, folder))
    lines += ["", f"Those checkpoints and the dense model, run by plain transformers: "
              f"{PLAIN_TRANSFORMERS_PROTOCOL.format(repeats=repeats)}", "",
              *_plain_transformers_tables(work / "headdim-plain-transformers.json", rows, repeats)]
    return "\n".join(lines)


def _attention_shape(folder: Path) -> str:
    """'head dims q/k 32 / v 64' or 'ranks q / k / v / o 96 / dense / dense / dense': what a checkpoint
    kept of attention."""
    layers = json.loads((folder / "config.json").read_text())["lorap"]["layers"]
    if any(layer.get("qk_head_dim") for layer in layers):
        return "head dims q/k " + " / v ".join(_ranks(layers, key) for key in ("qk_head_dim", "v_head_dim"))
    return "ranks q / k / v / o " + " / ".join(_ranks(layers, name) for name in ("q_proj", "k_proj", "v_proj", "o_proj"))


DECODE_PARTS = ("attention", "FFN", "LM head", "rest")


def _decode_shares(report: dict, labelled: list) -> list:
    """Where a decode token's time goes, by model, and what a parameter cut could give at most."""
    shares, params = report["decode_shares"], report["part_parameters"]
    dense_label = labelled[0][1]
    dense = shares[dense_label]
    lines = [
        f"Where a decode token's time goes, in ms a token (means over the {report['new_tokens']} tokens of one more "
        "lockstep decode, after the timed ones, with forward hooks on every layer's attention block and FFN block "
        "and on the LM head; `rest` is the embeddings, norms, residual adds, the layer loop and picking the token: "
        "the step's time less the parts). In brackets, the dense model's time for that part over the checkpoint's. `if parts "
        "scaled` is the speedup the whole token would get if the attention and FFN blocks ran faster by exactly "
        "their parameter cut (dense parameters over the checkpoint's) and the LM head and the rest did not change.",
        "",
        "| model | " + " | ".join(DECODE_PARTS) + " | total | parameters attention / FFN | if parts scaled |",
        "|---|" + "---:|" * (len(DECODE_PARTS) + 3),
    ]
    for name, key in labelled:
        mine = shares[key]
        cells = [f"{mine[part]:.1f}" + ("" if key == dense_label else f" ({dense[part] / mine[part]:.2f}x)")
                 for part in DECODE_PARTS]
        cells.append(f"{mine['total']:.1f}" + ("" if key == dense_label else f" ({dense['total'] / mine['total']:.2f}x)"))
        cells.append(f"{params[key]['attention'] / 1e6:.1f}M / {params[key]['FFN'] / 1e6:.1f}M")
        scaled = dense["LM head"] + dense["rest"] + sum(
            dense[part] * params[key][part] / params[dense_label][part] for part in ("attention", "FFN"))
        cells.append("" if key == dense_label else f"{dense['total'] / scaled:.2f}x")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def quality_section(work: Path, max_tokens: int, samples: int) -> str:
    lines = [
        "## What aligning costs in perplexity",
        "",
        f"Written by `benchmarks/speed.py --only align-quality`: the built-in model compressed to exact 20% of its "
        f"parameters ({samples} x 128 calibration tokens from the wiki train split), perplexity at 128 tokens on "
        f"the first {max_tokens:,} wiki test tokens.",
        "",
        machine_line(),
        "",
        "| preset | --align | parameters | removed | ranks q / k / v / o | FFN widths | PPL @ 128 |",
        "|---|---:|---:|---:|---|---|---:|",
    ]
    for preset, align in QUALITY_ROWS:
        folder = work / f"quality-{preset}-{align}"
        lorap("compress", "--preset", preset, "--ratio", "0.2", "--mode", "exact", "--out", folder, "--overwrite",
              "--samples", samples, "--align", align)
        evaluation = evaluate([folder, "--alone"], folder.with_suffix(".eval.json"), max_tokens=max_tokens)
        config = json.loads((folder / "config.json").read_text())["lorap"]
        totals = json.loads((folder / "compression_report.json").read_text())["plan"]["totals"]
        ranks = " / ".join(_ranks(config["layers"], name) for name in ("q_proj", "k_proj", "v_proj", "o_proj"))
        used = config["compression"]["align"]
        align_used = f"auto ({used})" if align == "auto" else align
        widths = [layer["intermediate_size"] for layer in config["layers"]]
        lines.append(
            f"| {preset} | {align_used} | "
            f"{totals['compressed_parameters']:,} | {totals['removed_fraction']:.2%} | {ranks} | {min(widths)}-{max(widths)} | "
            f"{evaluation['perplexity']['wiki']['128']:.2f} |"
        )
    return "\n".join(lines)


def _ranks(layers: list, name: str) -> str:
    """A projection's ranks (or head dims) over the layers: '96', '96-112', or 'dense'."""
    ranks = sorted({layer.get(name) for layer in layers} - {None, True})
    if not ranks:
        return "dense"
    return str(ranks[0]) if len(ranks) == 1 else f"{ranks[0]}-{ranks[-1]}"


def _rows(text: str) -> list:
    """--rows: indices, comma-separated, or the CUDA rows that decode compiled too (`compiled`) or not (`eager`)."""
    if text in ("compiled", "eager"):
        return [index for index in range(len(CUDA_ROWS)) if (index in COMPILED_CUDA_ROWS) == (text == "compiled")]
    return [int(index) for index in text.split(",")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=["speed", "runtime", "align-quality", "real", "headdim", "speed-cuda"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--max-tokens", type=int, default=16384)
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--rows", type=_rows,
                        help="which rows to measure, by index in SPEED_ROWS (or CUDA_ROWS with --only speed-cuda, "
                        "whose other rows are shown from earlier records; there `compiled` names the rows that also "
                        "decode compiled, `eager` the others) (default: all)")
    parser.add_argument("--work", type=Path, help="where records go (default: runs/bench-speed, or "
                        "runs/bench-speed-cuda with --only speed-cuda)")
    parser.add_argument("--page", type=Path, default=DOCS / "records/speed.md")
    parser.add_argument("--reuse", action="store_true", help="with --only headdim: keep the `lorap bench` rows, "
                        "checkpoints and perplexities already in the work folder (a run cut short resumes; the "
                        "checkpoints are timed again)")
    args = parser.parse_args()
    args.work = args.work or RUNS / ("bench-speed-cuda" if args.only == "speed-cuda" else "bench-speed")
    args.work.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.only in (None, "align-quality"):
        update_section(args.page, "align-quality", quality_section(args.work, args.max_tokens, args.samples))
    if args.only in (None, "real"):
        update_section(args.page, "real", real_section(args.work, args.repeats))
    if args.only in (None, "headdim"):
        update_section(args.page, "headdim", headdim_section(args.work, args.repeats, args.max_tokens, args.samples,
                                                             args.reuse))
    if args.only in (None, "runtime"):
        update_section(args.page, "runtime", runtime_section(args.work, args.repeats))
    if args.only == "speed-cuda":  # never part of a run of every section: it needs a GPU
        cuda_section(args.work, args.repeats, args.page,
                     args.rows if args.rows is not None else list(range(len(CUDA_ROWS))))
    if args.only in (None, "speed"):
        timing = ["--prefill", "128,512", "--batch", "1", "--repeats", str(args.repeats), "--warmup", "1"]
        update_section(args.page, "speed", speed_section(args.work, timing,
                                                         args.rows if args.rows is not None else range(len(SPEED_ROWS))))
    print(f"wrote {args.page}", file=sys.stderr)


if __name__ == "__main__":
    main()
