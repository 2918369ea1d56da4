"""Save and load compressed checkpoints: safetensors + config + tokenizer + modeling file.

A checkpoint is written into a temporary folder beside its destination and renamed into
place at the end, so an interrupted run never leaves a half-written model where a good one
is expected, and an existing checkpoint is only replaced once its successor is complete.
"""
import os
import shutil
import tempfile
from pathlib import Path

from .. import modeling_lorap
from ..families import family_of
from ..errors import LorapError
from .files import write_json_atomic

MODELING_FILE = Path(modeling_lorap.__file__).name  # modeling_lorap.py
REPORT_FILE = "compression_report.json"


def check_output_folder(out, overwrite: bool, protected=()) -> Path:
    """Refuse an output that would clobber work: a non-empty folder, or an input model's own folder."""
    out = Path(out).expanduser().resolve()
    for location in protected:
        if location is None:
            continue
        location = Path(location).resolve()
        if out == location or location in out.parents or out in location.parents:
            raise LorapError(f"output {out} overlaps the input model at {location}; choose another --out")
    if out.exists() and not out.is_dir():
        raise LorapError(f"output {out} exists and is a file; choose another --out")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise LorapError(f"output folder {out} exists and is not empty; choose another --out or pass --overwrite")
    return out


def mark_compressed(model, lorap_metadata: dict) -> None:
    """Record the compressed shapes in the config and give the model its lorap class.

    The lorap class is a subclass adding no state, only the ability to rebuild these shapes
    on load, so swapping it in makes the in-memory model the same type as a reloaded one
    (and save_pretrained writes the right `architectures`).
    """
    family = family_of(model.config)
    model.__class__ = getattr(modeling_lorap, family.lorap_class)
    model.config.lorap = lorap_metadata
    model.config.auto_map = {"AutoModelForCausalLM": f"{MODELING_FILE[:-3]}.{family.lorap_class}"}


def new_staging_folder(out: Path) -> Path:
    """A fresh, empty folder beside `out` to write a checkpoint into before it is swapped into place."""
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    os.chmod(staging, 0o755)
    return staging


def finish_checkpoint(staging: Path, out: Path, tokenizer, reports: dict) -> None:
    """Add what every checkpoint has beside its weights and config (tokenizer, modeling file,
    reports: {file name: data}), then swap the staging folder into place: `out` is never half-written."""
    tokenizer.save_pretrained(staging)
    shutil.copyfile(modeling_lorap.__file__, staging / MODELING_FILE)
    for name, data in reports.items():
        write_json_atomic(staging / name, data)
    os.chmod(staging, 0o755)
    swap_into_place(staging, out)


def save_checkpoint(model, tokenizer, out, overwrite: bool = False, reports: dict | None = None) -> Path:
    """Save an in-memory lorap model (and its reports) as a checkpoint folder, atomically."""
    out = check_output_folder(out, overwrite)
    staging = new_staging_folder(out)
    try:
        model.save_pretrained(staging, safe_serialization=True)
        finish_checkpoint(staging, out, tokenizer, reports or {})
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return out


def swap_into_place(staging: Path, out: Path) -> None:
    """Rename a finished folder to `out`; an existing `out` is only removed once it is replaced."""
    if not out.exists():
        os.rename(staging, out)
        return
    retired = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
    os.rename(out, retired / out.name)
    os.rename(staging, out)
    shutil.rmtree(retired, ignore_errors=True)


def load_checkpoint_model(folder, **kwargs):
    """Load a lorap checkpoint with lorap's own classes (no trust_remote_code needed)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(folder)
    if getattr(config, "lorap", None) is None:
        raise LorapError(f"{folder} is not a lorap checkpoint (its config.json has no 'lorap' entry)")
    model_class = getattr(modeling_lorap, family_of(config).lorap_class)
    kwargs.setdefault("dtype", "auto")  # keep the checkpoint's dtype (fp16/bf16 stay so)
    return model_class.from_pretrained(folder, config=config, **kwargs)
