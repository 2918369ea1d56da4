"""Formatting and writing of results. Numbers are taken as given, never recomputed here."""
import json
import os
import tempfile
from pathlib import Path


def write_json_atomic(path: Path, data: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as handle:
        json.dump(data, handle, indent=2)
        handle.write("\n")
    os.replace(tmp, path)


def format_perplexity(result: dict) -> str:
    lines = [f"model: {result['model']}", f"parameters: {result['parameters']:,}"]
    for dataset, by_seqlen in result["perplexity"].items():
        for seqlen, value in by_seqlen.items():
            lines.append(f"perplexity {dataset} @ {seqlen} tokens: {value:.3f}")
    return "\n".join(lines)
