"""Benchmark: a LLaMA-2-7B-shaped checkpoint streamed through lorap's presets on this machine.

Each run generates a random checkpoint with LLaMA-2-7B's shapes (hidden 4096, FFN 11008, 32 heads,
vocabulary 32,000; float16, safetensors shards of at most 2 GiB, the same bytes for every run:
every tensor has its own seed) at the depth asked for, compresses it with `lorap compress --stream`
in a fresh process, checks the output against the plan, and deletes both. Rows accumulate in
runs/scaling-7b-rows.json (--rows; kept with the other benchmark runs, not in the scratch folder WORK);
the docs/records/scaling.md section `scaling-7b` is rewritten from all rows after each run, so presets
may be measured in separate invocations (and commits; each row records its own).

    .venv/bin/python benchmarks/scaling_7b.py --runs paper:4,paper:8,paper:32
    .venv/bin/python benchmarks/scaling_7b.py --runs svd-llm-attention:4,best:4
    .venv/bin/python benchmarks/scaling_7b.py --page-only     # the page from the rows file

The tokenizer is the built-in model's, cut to LLaMA-2's 32,000 entries (tokens above are dropped
with the merges that make them), so token ids fit the 7B embedding. Calibration text is a small
local file (the first documents of the built-in wiki train split), as `--calibration FILE`.
"""
import argparse
import datetime
import hashlib
import json
import math
import shutil
import sys
import time
from pathlib import Path

import torch

from common import CONFIGS, DOCS, RUNS, Load, head_commit, lorap, machine_line, update_section

SECTIONS = {"scaling-7b": "--runs paper:4,paper:8,paper:32,svd-llm-attention:4,best:4"}
CONFIG = CONFIGS / "llama-2-7b.json"
SHARD_BYTES = 2 * 2**30
CORPUS_DOCUMENTS = 200
RATIO = "0.2"
CALIBRATION = {"samples": 16, "seqlen": 128, "batch_size": 8}
GIB = 2**30
PASS_PHASES = ("adaptive_scoring", "gradients")  # the registry's whole-model passes (their report timings)


def model_config(layers: int):
    from transformers import LlamaConfig

    settings = json.loads(CONFIG.read_text())
    settings["num_hidden_layers"] = layers
    return LlamaConfig(**settings)


def truncated_tokenizer(folder: Path, vocab_size: int) -> None:
    """The built-in tokenizer cut to its first `vocab_size` ids, saved in `folder`."""
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    from lorap.io.default_model import default_model_dir

    base = AutoTokenizer.from_pretrained(default_model_dir())
    data = json.loads(base.backend_tokenizer.to_str())
    vocab = {token: i for token, i in data["model"]["vocab"].items() if i < vocab_size}
    data["model"]["vocab"] = vocab
    data["model"]["merges"] = [m for m in data["model"]["merges"] if m[0] in vocab and m[1] in vocab and m[0] + m[1] in vocab]
    data["added_tokens"] = [t for t in data["added_tokens"] if t["id"] < vocab_size]
    fast = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(data)),
                                   bos_token=base.bos_token, eos_token=base.eos_token)
    fast.save_pretrained(folder)


def tensor_shapes(config) -> list:
    """(name, shape) of every tensor, in the order they are written."""
    d, m, vocab = config.hidden_size, config.intermediate_size, config.vocab_size
    names = [("model.embed_tokens.weight", (vocab, d))]
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        names += [(p + f"self_attn.{n}.weight", (d, d)) for n in ("q_proj", "k_proj", "v_proj", "o_proj")]
        names += [(p + "mlp.gate_proj.weight", (m, d)), (p + "mlp.up_proj.weight", (m, d)), (p + "mlp.down_proj.weight", (d, m))]
        names += [(p + "input_layernorm.weight", (d,)), (p + "post_attention_layernorm.weight", (d,))]
    return names + [("model.norm.weight", (d,)), ("lm_head.weight", (vocab, d))]


def random_tensor(name: str, shape: tuple) -> torch.Tensor:
    """Deterministic per name (so a tensor is the same at every depth): norms 1, weights N(0, 0.02)."""
    if len(shape) == 1:
        return torch.ones(shape, dtype=torch.float16)
    seed = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "little") % 2**63
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=generator) * 0.02).to(torch.float16)


def generate(folder: Path, layers: int) -> dict:
    """A random float16 checkpoint written shard by shard (never whole in memory)."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    config = model_config(layers)
    config.architectures = ["LlamaForCausalLM"]
    config.save_pretrained(folder)
    truncated_tokenizer(folder, config.vocab_size)
    shards, current, size = [], [], 0
    for name, shape in tensor_shapes(config):
        nbytes = 2 * math.prod(shape)
        if current and size + nbytes > SHARD_BYTES:
            shards.append(current)
            current, size = [], 0
        current.append((name, shape))
        size += nbytes
    shards.append(current)
    weight_map, total, parameters = {}, 0, 0
    for number, shard in enumerate(shards, start=1):
        file = f"model-{number:05d}-of-{len(shards):05d}.safetensors"
        tensors = {name: random_tensor(name, shape) for name, shape in shard}
        save_file(tensors, folder / file, {"format": "pt"})
        for name, tensor in tensors.items():
            weight_map[name] = file
            total += tensor.numel() * 2
            parameters += tensor.numel()
        del tensors
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                      "weight_map": weight_map}, indent=2))
    return {"parameters": parameters, "checkpoint_bytes": sum(p.stat().st_size for p in folder.glob("*.safetensors")),
            "shards": len(shards)}


def counted_parameters(folder: Path) -> int:
    """Parameters in a checkpoint's shards, from their headers."""
    from lorap.io.shards import ShardReader

    return sum(math.prod(shape) for shape in ShardReader(folder).shapes().values())


def compress_args(folder: Path, out: Path, preset: str, corpus: Path) -> list:
    """The arguments of `lorap` that compress one checkpoint."""
    return ["compress", str(folder), "--stream", "--out", str(out),
            "--preset", preset, "--ratio", RATIO, "--device", "cpu", "--samples", str(CALIBRATION["samples"]),
            "--sample-len", str(CALIBRATION["seqlen"]), "--batch-size", str(CALIBRATION["batch_size"]),
            "--calibration", str(corpus)]


def run_one(work: Path, preset: str, layers: int, corpus: Path) -> dict:
    folder, out = work / f"llama2-7b-L{layers}", work / f"llama2-7b-L{layers}-{preset}"
    shutil.rmtree(folder, ignore_errors=True)
    shutil.rmtree(out, ignore_errors=True)
    begin = time.perf_counter()
    checkpoint = generate(folder, layers)
    generated = time.perf_counter() - begin
    with Load() as load:
        wall = lorap(*compress_args(folder, out, preset, corpus), quiet=True)
    report = json.loads((out / "compression_report.json").read_text())
    commit = head_commit()
    row = {
        "preset": preset,
        "layers": layers,
        **checkpoint,
        "generate_s": generated,
        "wall_s": wall,
        "load": load.pair(),
        "peak_rss_mb": report["peak_memory"]["host_rss_mb"],
        "peak_rss_mb_by_phase": report.get("peak_rss_mb_by_phase"),
        "timings": report["timings"],
        "output_bytes": sum(p.stat().st_size for p in out.glob("*.safetensors")),
        "output_parameters": counted_parameters(out),
        "plan_parameters": report["plan"]["totals"]["compressed_parameters"],
        "plan_dense_parameters": report["plan"]["totals"]["dense_parameters"],
        "report_estimate_bytes": report["streaming"]["estimate"]["streaming_peak_bytes"],
        "commit": commit,
        "date": datetime.date.today().isoformat(),
    }
    shutil.rmtree(out)
    shutil.rmtree(folder)
    return row


def estimate_bytes(preset: str, layers: int) -> int:
    """What the current code's memory estimate says for this run (what `lorap plan` prints, at this calibration)."""
    from lorap.methods.presets import config_for
    from lorap.plan.memory import memory_estimate
    from lorap.plan.plan import make_plan

    config = config_for(preset, ratio=float(RATIO))
    model = model_config(layers)
    plan = make_plan(model, config.plan_settings())
    estimate = memory_estimate(model, plan, CALIBRATION["samples"], CALIBRATION["seqlen"], CALIBRATION["batch_size"],
                               gram_sources=config.gram_sources(), whole_model_parts=config.whole_model_parts())
    return estimate["streaming_peak_bytes"]


def write_page(page: Path, rows: list) -> None:
    lines = [
        "## A LLaMA-2-7B-shaped checkpoint, streamed",
        "",
        f"Written by `benchmarks/scaling_7b.py` (rows measured {min(r['date'] for r in rows)} to "
        f"{max(r['date'] for r in rows)}, at the commits listed). " + machine_line(),
        "",
        "Command (each checkpoint is generated, compressed in a fresh process, checked and deleted):",
        "",
        "```",
        ".venv/bin/python benchmarks/scaling_7b.py --runs paper:4,paper:8,paper:32,svd-llm-attention:4,best:4",
        "# each compression is:",
        " ".join(["lorap", *compress_args(Path("MODEL"), Path("OUT"), "PRESET", Path("calibration.txt"))]),
        "```",
        "",
        "Random float16 checkpoints with LLaMA-2-7B's shapes (hidden 4096, FFN 11008, 32 heads, vocabulary 32,000, "
        "untied LM head) in safetensors shards of at most 2 GiB; the full depth is 6.74 B parameters, 12.6 GiB. "
        f"Calibration {CALIBRATION['samples']} x {CALIBRATION['seqlen']} tokens from the first {CORPUS_DOCUMENTS} "
        "documents of the built-in wiki train split. Layers are computed in float32 on the CPU and stored in float16. "
        "Peak RSS is the compressing process's own maximum resident set, as `compression_report.json` records it "
        "(Linux's VmHWM: `ru_maxrss` would also count this script's own peak, carried into the child through "
        "fork and exec). The estimate is the current code's `lorap.plan.memory.memory_estimate` for the same shapes, "
        "preset and calibration (what `lorap plan` prints). Load is the 1-minute load average before and after the run.",
        "",
        "| preset | layers | checkpoint | parameters | peak RSS | checkpoint / peak | estimate (vs peak) | time per layer "
        "| wall time | output | output parameters (plan) | load | commit |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    for r in sorted(rows, key=lambda r: (r["preset"] != "paper", r["preset"], r["layers"])):
        peak = r["peak_rss_mb"] * 2**20
        estimate = estimate_bytes(r["preset"], r["layers"])
        estimated = f"{estimate / GIB:.2f} GiB ({100 * (estimate / peak - 1):+.0f}%)" if estimate else "none"
        walk = r["timings"].get("layer_walk", 0.0)
        scoring = sum(r["timings"].get(phase, 0.0) for phase in PASS_PHASES)
        per_layer = f"{walk / r['layers']:.0f} s" + (f" + {scoring / r['layers']:.0f} s scoring" if scoring else "")
        match = "=" if r["output_parameters"] == r["plan_parameters"] else "MISMATCH"
        lines.append(
            f"| {r['preset']} | {r['layers']} | {r['checkpoint_bytes'] / GIB:.2f} GiB | {r['parameters'] / 1e9:.2f} B | "
            f"{peak / GIB:.2f} GiB | {r['checkpoint_bytes'] / peak:.1f}x | {estimated} | {per_layer} | {r['wall_s'] / 60:.1f} min | "
            f"{r['output_bytes'] / GIB:.2f} GiB | {r['output_parameters'] / 1e9:.3f} B {match} "
            f"({r['plan_parameters'] / 1e9:.3f} B) | {r['load'][0]:.1f} / {r['load'][1]:.1f} | {r['commit']} |"
        )
    lines += ["", *findings(rows)]
    update_section(page, "scaling-7b", "\n".join(lines))


def findings(rows: list) -> list:
    """What the rows show, in words (only what they contain)."""
    said = []
    paper = sorted((r for r in rows if r["preset"] == "paper"), key=lambda r: r["layers"])
    if len(paper) > 1:
        peaks = ", ".join(f"{r['peak_rss_mb'] / 1024:.2f} GiB at {r['layers']} layers" for r in paper)
        growth = (paper[-1]["peak_rss_mb"] - paper[0]["peak_rss_mb"]) / (paper[-1]["layers"] - paper[0]["layers"])
        said.append(f"Depth (paper preset): peak RSS {peaks} ({growth:+.1f} MiB per layer): nearly flat, as the walk "
                    "holds one layer at a time, so the other presets were measured at 4 layers.")
    for r in rows:
        phases = r.get("peak_rss_mb_by_phase") or {}
        if len(phases) > 2:
            said.append(f"{r['preset']} at {r['layers']} layers, each phase's own peak: " + ", ".join(
                f"{name} {mb / 1024:.2f} GiB" for name, mb in phases.items() if mb) + ".")
    said.append(
        f"Time per layer is for {CALIBRATION['samples']} x {CALIBRATION['seqlen']} calibration tokens. With the default "
        "128 x 128 (8x the tokens), the forward passes of each layer (statistics and propagation; for best also the "
        "scoring pass) take up to 8x longer, while the factorizations (one SVD per attention projection, at 4096 x 4096 "
        "about 17 s each on this CPU) do not grow with the tokens; so a 128 x 128 run takes less than 8x these times.")
    return said


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", default="paper:4,paper:8,paper:32,svd-llm-attention:4,best:4",
                        help="PRESET:LAYERS, comma-separated")
    parser.add_argument("--work", type=Path, default=Path("/tmp/lorap-7b"), help="scratch folder for the checkpoints")
    parser.add_argument("--rows", type=Path, default=RUNS / "scaling-7b-rows.json", help="the measured rows, kept")
    parser.add_argument("--page", type=Path, default=DOCS / "records/scaling.md")
    parser.add_argument("--page-only", action="store_true", help="rewrite the page from the rows file")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    rows_file = args.rows
    rows_file.parent.mkdir(parents=True, exist_ok=True)
    rows = json.loads(rows_file.read_text()) if rows_file.exists() else []
    if not args.page_only:
        from lorap.io.data import DOCUMENT_SEPARATOR, wiki_documents

        corpus = args.work / "calibration.txt"
        corpus.write_text(DOCUMENT_SEPARATOR.join(wiki_documents("train")[:CORPUS_DOCUMENTS]))
        for item in args.runs.split(","):
            preset, layers = item.split(":")
            row = run_one(args.work, preset, int(layers), corpus)
            print(json.dumps(row), file=sys.stderr, flush=True)
            rows = [r for r in rows if (r["preset"], r["layers"]) != (row["preset"], row["layers"])] + [row]
            rows_file.write_text(json.dumps(rows, indent=2))
            write_page(args.page, rows)
    write_page(args.page, rows)


if __name__ == "__main__":
    main()
