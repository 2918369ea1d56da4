"""Benchmark: streamed compression (`lorap compress --stream`) of random LLaMA checkpoints of growing size.

Random LLaMA-architecture checkpoints (float32, sharded safetensors, the built-in model's
tokenizer) are generated on disk one layer at a time, compressed in streaming mode in a fresh
process each, and deleted. For each: checkpoint size, peak host RSS of the compressing process
(its own ru_maxrss, as the report records it), the `lorap plan` estimate, and wall time. Two
series: depth grows at a fixed width, and width grows at a fixed depth. The smallest model is
also compressed in memory, for comparison.

    LORAP_CACHE=/tmp/lorapcache nice -n 19 .venv/bin/python benchmarks/scaling.py   # writes docs/records/scaling.md
"""
import argparse
import datetime
import json
import shutil
import sys
import time
from pathlib import Path

import torch

from common import DOCS, lorap, machine_line, update_section

SECTIONS = {"scaling": ("", "as `LORAP_CACHE=/tmp/lorapcache nice -n 19 ...` on a shared machine")}
SHARD_BYTES = 512 * 2**20
CALIBRATION = ["--samples", "8", "--sample-len", "128", "--batch-size", "8", "--calibration", "CORPUS"]
CORPUS_DOCUMENTS = 200  # the first documents of the wiki train split, enough for 8 x 128 tokens

# (name, hidden, intermediate, heads, layers)
# Wide FFNs and a narrow attention keep the compute (and SVD) per parameter low on a small CPU.
DEPTH_SERIES = [("d512-L6", 512, 8192, 8, 6), ("d512-L24", 512, 8192, 8, 24), ("d512-L48", 512, 8192, 8, 48)]
WIDTH_SERIES = [("d512-L4", 512, 2048, 8, 4), ("d1024-L4", 1024, 4096, 16, 4), ("d2048-L4", 2048, 8192, 16, 4)]


def generate(folder: Path, hidden: int, intermediate: int, heads: int, layers: int, tokenizer) -> int:
    """A random float32 LLaMA checkpoint written shard by shard (never whole in memory); returns its parameters."""
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    folder.mkdir(parents=True)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        tie_word_embeddings=False,
        max_position_embeddings=2048,
        torch_dtype="float32",
    )
    config.architectures = ["LlamaForCausalLM"]
    config.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    generator = torch.Generator().manual_seed(0)

    def normal(*shape):
        return torch.randn(*shape, generator=generator) * 0.02

    def layer_tensors(i):
        p = f"model.layers.{i}."
        return {
            p + "self_attn.q_proj.weight": normal(hidden, hidden),
            p + "self_attn.k_proj.weight": normal(hidden, hidden),
            p + "self_attn.v_proj.weight": normal(hidden, hidden),
            p + "self_attn.o_proj.weight": normal(hidden, hidden),
            p + "mlp.gate_proj.weight": normal(intermediate, hidden),
            p + "mlp.up_proj.weight": normal(intermediate, hidden),
            p + "mlp.down_proj.weight": normal(hidden, intermediate),
            p + "input_layernorm.weight": torch.ones(hidden),
            p + "post_attention_layernorm.weight": torch.ones(hidden),
        }

    groups = [lambda: {"model.embed_tokens.weight": normal(len(tokenizer), hidden), "model.norm.weight": torch.ones(hidden)}]
    groups += [lambda i=i: layer_tensors(i) for i in range(layers)]
    groups += [lambda: {"lm_head.weight": normal(len(tokenizer), hidden)}]
    weight_map, shard, shard_size, files, total = {}, {}, 0, 0, 0

    def flush():
        nonlocal shard, shard_size, files
        if shard:
            files += 1
            name = f"model-{files:05d}.safetensors"
            save_file(shard, folder / name, {"format": "pt"})
            weight_map.update({key: name for key in shard})
            shard, shard_size = {}, 0

    parameters = 0
    for make in groups:
        tensors = make()
        size = sum(t.numel() * 4 for t in tensors.values())
        if shard_size + size > SHARD_BYTES:
            flush()
        shard.update(tensors)
        shard_size += size
        total += size
        parameters += sum(t.numel() for t in tensors.values())
    flush()
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return parameters


def compress(folder: Path, out: Path, stream: bool, corpus: Path) -> dict:
    calibration = [str(corpus) if item == "CORPUS" else item for item in CALIBRATION]
    wall = lorap("compress", folder, "--out", out, "--ratio", "0.2", "--device", "cpu", *calibration,
                 *(["--stream"] if stream else []), quiet=True)
    report = json.loads((out / "compression_report.json").read_text())
    report["wall_s"] = wall
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("/tmp/lorap-scaling"))
    parser.add_argument("--page", type=Path, default=DOCS / "records/scaling.md")
    parser.add_argument("--quick", action="store_true", help="only the first model of each series")
    args = parser.parse_args()
    from lorap.io.default_model import default_model_dir
    from transformers import AutoTokenizer

    from lorap.io.data import DOCUMENT_SEPARATOR, wiki_documents

    tokenizer = AutoTokenizer.from_pretrained(default_model_dir())
    shutil.rmtree(args.work, ignore_errors=True)
    args.work.mkdir(parents=True)
    # A small local corpus: tokenizing the whole built-in wiki split costs about 0.6 GiB of peak memory
    # by itself, the same for every model, which would hide what this benchmark measures.
    corpus = args.work / "calibration.txt"
    corpus.write_text(DOCUMENT_SEPARATOR.join(wiki_documents("train")[:CORPUS_DOCUMENTS]))
    rows = []
    started = time.perf_counter()
    for series, models in (("depth", DEPTH_SERIES), ("width", WIDTH_SERIES)):
        for number, (name, hidden, intermediate, heads, layers) in enumerate(models[:1] if args.quick else models):
            folder, out = args.work / name, args.work / f"{name}-lorap"
            begin = time.perf_counter()
            parameters = generate(folder, hidden, intermediate, heads, layers, tokenizer)
            generated = time.perf_counter() - begin
            size = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
            shards = len(list(folder.glob("*.safetensors")))
            report = compress(folder, out, stream=True, corpus=corpus)
            row = {
                "series": series,
                "name": name,
                "hidden": hidden,
                "intermediate": intermediate,
                "layers": layers,
                "parameters": parameters,
                "checkpoint_bytes": size,
                "shards": shards,
                "generate_s": generated,
                "stream_rss_mb": report["peak_memory"]["host_rss_mb"],
                "stream_wall_s": report["wall_s"],
                "walk_s": report["timings"]["layer_walk"],
                "estimate_mb": report["streaming"]["estimate"]["streaming_peak_bytes"] / 2**20,
                "output_bytes": report["streaming"]["output_bytes"],
            }
            shutil.rmtree(out)
            if series == "depth" and number == 0:
                in_memory = compress(folder, out, stream=False, corpus=corpus)
                row["memory_rss_mb"] = in_memory["peak_memory"]["host_rss_mb"]
                row["memory_wall_s"] = in_memory["wall_s"]
                shutil.rmtree(out)
            shutil.rmtree(folder)
            rows.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
    (args.work / "rows.json").write_text(json.dumps(rows, indent=2))
    write_page(args.page, rows, time.perf_counter() - started)


def write_page(page: Path, rows: list, total_s: float, note: str = "") -> None:
    gib, mib = 2**30, 2**20
    lines = [
        "## Streamed compression of random LLaMA checkpoints",
        "",
        f"Written by `benchmarks/scaling.py` on {datetime.date.today().isoformat()} ({total_s / 60:.0f} min in all). "
        + machine_line()
        + " The machine was shared with other jobs and this ran under `nice -n 19`, so wall times are upper bounds.",
        "",
        "Command (each model is generated, compressed in a fresh process, and deleted):",
        "",
        "```",
        "LORAP_CACHE=/tmp/lorapcache nice -n 19 .venv/bin/python benchmarks/scaling.py",
        "# each compression is:",
        "python -m lorap.cli compress MODEL --stream --out OUT --ratio 0.2 --device cpu "
        + " ".join(CALIBRATION).replace("CORPUS", "calibration.txt"),
        "```",
        "",
        "Random float32 LLaMA checkpoints (MHA, untied LM head, vocabulary 49,152 of the built-in tokenizer), "
        f"saved as safetensors shards of at most 512 MiB. Calibration: 8 x 128 tokens from `calibration.txt`, the "
        f"first {CORPUS_DOCUMENTS} documents of the built-in wiki train split (calibrating on the whole built-in "
        "corpus adds about 0.6 GiB to every run's peak, the cost of tokenizing it at once). Peak RSS is the compressing process's own maximum "
        "resident set (`ru_maxrss`, as `compression_report.json` records it); the estimate is what "
        "`lorap plan` prints for the same shapes and calibration.",
        "",
        "| series | model | layers | hidden / FFN | parameters | checkpoint | peak RSS, streamed | checkpoint / peak | estimate | wall time | peak RSS, in memory |",
        "|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        in_memory = f"{r['memory_rss_mb'] / 1024:.2f} GiB ({r['memory_wall_s']:.0f} s)" if "memory_rss_mb" in r else ""
        lines.append(
            f"| {r['series']} | {r['name']} | {r['layers']} | {r['hidden']} / {r['intermediate']} | "
            f"{r['parameters'] / 1e9:.2f} B | {r['checkpoint_bytes'] / gib:.2f} GiB | {r['stream_rss_mb'] / 1024:.2f} GiB | "
            f"{r['checkpoint_bytes'] / mib / r['stream_rss_mb']:.1f}x | {r['estimate_mb'] / 1024:.2f} GiB | "
            f"{r['stream_wall_s']:.0f} s | {in_memory} |"
        )
    depth = [r for r in rows if r["series"] == "depth"]
    width = [r for r in rows if r["series"] == "width"]
    lines += [""]
    if len(depth) > 1:
        growth = (depth[-1]["stream_rss_mb"] - depth[0]["stream_rss_mb"]) / (depth[-1]["layers"] - depth[0]["layers"])
        lines.append(
            f"Depth: from {depth[0]['layers']} to {depth[-1]['layers']} layers the checkpoint grows "
            f"{depth[-1]['checkpoint_bytes'] / depth[0]['checkpoint_bytes']:.1f}x and the streamed peak RSS by "
            f"{growth:.2f} MiB per layer ({depth[0]['stream_rss_mb']:.0f} -> {depth[-1]['stream_rss_mb']:.0f} MiB): "
            "nearly flat, as the walk holds one dense layer and its compressed copy whatever the depth."
        )
    if len(width) > 1:
        lines.append(
            f"Width: at {width[0]['layers']} layers, hidden size {width[0]['hidden']} -> {width[-1]['hidden']} "
            f"({width[-1]['hidden'] / width[0]['hidden']:.0f}x) raises the streamed peak RSS "
            f"{width[0]['stream_rss_mb']:.0f} -> {width[-1]['stream_rss_mb']:.0f} MiB. Above the runtime's fixed "
            "cost (about 0.45 GiB for Python, torch and transformers), peak memory grows with the square of the "
            "width (two decoder layers plus float32 copies of the largest matrix for SVD and channel scores) and "
            "linearly with vocabulary x width (the embeddings while the first layer's inputs are computed, the LM "
            "head while it is copied) and with samples x tokens x width (the activations)."
        )
    if note:
        lines += ["", note]
    if not page.exists():
        page.write_text("# Scaling: compressing models larger than memory\n\nWritten by `benchmarks/scaling.py`; re-run it to refresh.\n")
    update_section(page, "scaling", "\n".join(lines))


if __name__ == "__main__":
    main()
