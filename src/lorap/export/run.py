"""`lorap export`: a lorap checkpoint (or the built-in dense model) as a file an engine serves.

The output is written beside its destination under a temporary name and renamed into place only
when complete, so a failed export never leaves a half-written file where a good one is expected;
the input checkpoint is only read.
"""
import os
import shutil
from pathlib import Path

from ..errors import LorapError
from ..log import info

FORMATS = ("gguf", "decilm")


def check_output(out: Path, fmt: str, overwrite: bool, source_location: str) -> Path:
    from ..io.checkpoint import check_output_folder

    out = Path(out).expanduser().resolve()
    if fmt == "decilm":
        return check_output_folder(out, overwrite, protected=(source_location,))
    if out.suffix != ".gguf":
        raise LorapError(f"a GGUF output must be a file ending in .gguf, got {out}")
    if out.is_dir():
        raise LorapError(f"output {out} is a folder; give a .gguf file path")
    if out.exists() and not overwrite:
        raise LorapError(f"output {out} exists; choose another --out or pass --overwrite")
    if Path(source_location).resolve() in out.parents:
        raise LorapError(f"output {out} is inside the input checkpoint {source_location}; choose another --out")
    return out


def exportable_source(spec):
    """The input's ModelSource: a lorap checkpoint, or the built-in dense model (for side-by-side runs)."""
    from ..io.models import resolve_model

    source = resolve_model(spec)
    if source.kind not in ("lorap", "default"):
        raise LorapError(
            f"{source.describe()} is not a lorap checkpoint (its config.json has no 'lorap' entry). `lorap export` "
            "writes checkpoints made by `lorap compress`, or the built-in model when no folder is given; an "
            "unmodified Hugging Face model is converted by the engine's own tools (llama.cpp's convert_hf_to_gguf.py)"
        )
    return source


def pre_tokenizer_for(source, model, tokenizer) -> str | None:
    from ..io.default_model import default_gguf_path
    from .gguf_vocab import guess_pre_tokenizer, source_gguf_pre

    base_is_builtin = source.kind == "default" or (getattr(model.config, "lorap", None) or {}).get("base_model") is None
    if base_is_builtin:  # the built-in model ships as GGUF: take its own pre-tokenizer name
        return source_gguf_pre(default_gguf_path())
    return guess_pre_tokenizer(model.config, tokenizer)


def export_model(spec, fmt: str, out, dtype: str = "f16", ffn_multiple: str = "refuse", overwrite: bool = False,
                 pre_tokenizer: str | None = None) -> dict:
    """Export and return the report (what `lorap export --json` writes)."""
    from ..io.models import load_config, load_model
    from .dense import check_exportable, dense_model, recorded_ffn_widths

    if fmt not in FORMATS:
        raise LorapError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    source = exportable_source(spec)
    out = check_output(Path(out), fmt, overwrite, source.location)
    config = load_config(spec)  # refuse what cannot be exported from the config, before loading any weights
    check_exportable(config)
    if fmt == "decilm":
        from .decilm import engine_widths

        engine_widths(recorded_ffn_widths(config), ffn_multiple)
    model, tokenizer, source = load_model(spec, fuse=False)  # in its own dtype: a 7B fp16 model stays 13 GB
    dense = dense_model(model)
    notes = []
    if dense.padded_layers:
        notes.append(f"the narrowed heads of {dense.padded_layers} layers were padded back with zeros (engines take one "
                     f"head dimension): +{dense.added_by_padding:,} parameters over the checkpoint, the same logits")
    if dense.merged_pairs:
        notes.append(f"{dense.merged_pairs} factor pairs were multiplied back into dense matrices (engines run no "
                     f"factor pairs): +{dense.added_back:,} parameters over the checkpoint")
    pre = None
    if fmt == "gguf":
        pre = pre_tokenizer or pre_tokenizer_for(source, model, tokenizer)
        if pre is None:
            notes.append("llama.cpp's pre-tokenizer for this tokenizer is unknown to lorap: 'default' was written, "
                          "which may split some text differently; give --pre-tokenizer NAME to set it")
    del model
    info(f"exporting {source.name} as {fmt} to {out}")
    written = _write_atomically(out, fmt, dense, tokenizer, source, dtype, ffn_multiple, pre)
    exported = written.pop("parameters", None) or dense.parameters
    return {
        "format": fmt,
        "out": str(out),
        "source": source.describe(),
        "bytes": _size(out),
        **written,
        "parameters": {"checkpoint": dense.source_parameters, "exported": exported,
                       "added_back_by_merging": dense.added_back, "merged_factor_pairs": dense.merged_pairs,
                       "added_by_padding_heads": dense.added_by_padding, "padded_layers": dense.padded_layers},
        "layers": {"ffn_widths": dense.ffn_widths, "heads": dense.head_counts, "kv_heads": dense.kv_head_counts},
        "notes": notes,
    }


def _write_atomically(out: Path, fmt, dense, tokenizer, source, dtype, ffn_multiple, pre) -> dict:
    from ..io.checkpoint import new_staging_folder, swap_into_place

    if fmt == "decilm":
        from .decilm import write_decilm

        staging = new_staging_folder(out)
        try:
            written = write_decilm(dense, tokenizer, staging, dtype, ffn_multiple)
            os.chmod(staging, 0o755)
            swap_into_place(staging, out)
        finally:
            if staging.exists():
                shutil.rmtree(staging, ignore_errors=True)
        return written
    from ..io.files import atomic_file
    from .gguf_file import write_gguf

    with atomic_file(out) as partial:
        return write_gguf(dense, Path(source.location), tokenizer, partial, dtype, pre, source.name)


def _size(path: Path) -> int:
    path = Path(path)
    return path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def render(report: dict) -> str:
    """The report in words, as `lorap export` prints it."""
    counts = report["parameters"]
    lines = [
        f"exported {report['source']}",
        f"  to {report['out']} ({report['format']}"
        + (f", architecture {report['architecture']}" if "architecture" in report else "")
        + f", {report['bytes'] / 2**20:,.1f} MiB)",
        f"  parameters: {counts['exported']:,} exported, {counts['checkpoint']:,} in the checkpoint",
    ]
    widths = report["layers"]["ffn_widths"]
    lines.append(f"  FFN widths {min(widths)}..{max(widths)}" if len(set(widths)) > 1 else f"  FFN width {widths[0]}")
    if report.get("padded_channels"):
        lines.append(f"  {report['padded_channels']} zero FFN channels added to reach multiples of 256")
    if "tokenizer" in report:
        lines.append(f"  tokenizer: {report['tokenizer']['model']}, pre-tokenizer {report['tokenizer']['pre']}")
    lines += [f"  note: {note}" for note in report["notes"]]
    return "\n".join(lines)
