"""The staging folder of a streamed run: where its shards accumulate, and how it resumes.

Everything a streamed run writes goes into `.OUT.streaming` beside the output, with a progress
file naming what the run was made from (`identity`) and how many layers are finished, and the
activations after the last finished layer; `--resume` continues there and ends with the same bytes.
"""
import json
import shutil
from pathlib import Path

from ..errors import LorapError
from ..io.files import write_json_atomic
from ..log import info

PROGRESS_FILE = "progress.json"


def staging_folder(out: Path) -> Path:
    return out.parent / f".{out.name}.streaming"


def activations_file(finished: int) -> str:
    return f"activations-after-{finished:05d}-layers.bin"


def write_progress(staging: Path, identity: dict, finished: int) -> None:
    write_json_atomic(staging / PROGRESS_FILE, {"identity": identity, "finished_layers": finished})


def open_staging(staging: Path, identity: dict, resume: bool, n_layers: int) -> int:
    """Layers already finished in the staging folder (0 for a fresh run)."""
    progress_file = staging / PROGRESS_FILE
    if staging.exists():
        state = json.loads(progress_file.read_text()) if progress_file.is_file() else None
        done = state["finished_layers"] if state else 0
        if not resume:
            raise LorapError(
                f"an interrupted streamed run is in {staging} ({done} of {n_layers} layers done); "
                "pass --resume (resume=True) to continue it, or delete that folder to start over"
            )
        if state is None:
            info(f"{staging} holds no finished layer; starting over")
            shutil.rmtree(staging)
        elif state["identity"] != identity:
            changed = sorted(k for k in identity if identity[k] != state["identity"].get(k))
            raise LorapError(
                f"the interrupted run in {staging} was made with another {', '.join(changed)}; "
                "resume with the same model and settings, or delete that folder to start over"
            )
        else:
            return done
    elif resume:
        info(f"nothing to resume at {staging}; starting a fresh streamed run")
    staging.mkdir(parents=True)
    write_progress(staging, identity, 0)
    return 0


def remove_run_state(staging: Path) -> None:
    """Drop the progress file and activations once every layer is written."""
    for leftover in staging.iterdir():
        if leftover.name == PROGRESS_FILE or leftover.name.startswith("activations"):
            leftover.unlink()
