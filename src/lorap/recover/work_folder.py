"""The resumable work folder of a run: what is being trained (run.json) and the last periodic
checkpoint (adapter, best adapter, optimizer, RNG and counters)."""
import json
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .lora import load_trainable_state, trainable_state

CHECKPOINT_FOLDER = "checkpoint"
RUN_FILE = "run.json"


@dataclass
class TrainingState:
    step: int = 0
    elapsed_s: float = 0.0
    best_step: int | None = None
    best_loss: float | None = None
    train_history: list = field(default_factory=list)  # [step, loss]
    validation_history: list = field(default_factory=list)  # [step, loss]
    sessions: int = 0
    tokens_seen: int = 0  # predicted (supervised) tokens trained on
    last_lr: float | None = None  # the learning rate of the last step taken
    validation_scored: int | None = None  # held-out examples each evaluation scores (heldout.py)
    validation_seconds: float | None = None  # how long the last evaluation took


class WorkFolder:
    """The resumable state of a run: run.json (what is being trained) and checkpoint/ (adapter,
    best adapter, optimizer, RNG and counters), replaced atomically as a whole."""

    def __init__(self, path: Path):
        self.path = Path(path)

    @property
    def checkpoint(self) -> Path:
        return self.path / CHECKPOINT_FOLDER

    def has_checkpoint(self) -> bool:
        return (self.checkpoint / "state.json").is_file()

    def read_run(self) -> dict | None:
        run = self.path / RUN_FILE
        return json.loads(run.read_text()) if run.is_file() else None

    def start(self, run: dict) -> None:
        from ..io.files import write_json_atomic

        self.path.mkdir(parents=True, exist_ok=True)
        write_json_atomic(self.path / RUN_FILE, run)

    def save(self, model, optimizer, state: TrainingState, best: dict) -> None:
        import torch
        from safetensors.torch import save_file

        from ..io.checkpoint import swap_into_place

        staging = Path(tempfile.mkdtemp(prefix=".checkpoint.partial-", dir=self.path))
        try:
            save_file({k: v.contiguous() for k, v in trainable_state(model).items()}, staging / "adapter.safetensors")
            save_file({k: v.contiguous() for k, v in best.items()}, staging / "best.safetensors")
            rng = {"cpu": torch.get_rng_state()}
            if torch.cuda.is_available():
                rng["cuda"] = torch.cuda.get_rng_state_all()
            torch.save({"optimizer": optimizer.state_dict(), "rng": rng}, staging / "optimizer.pt")
            (staging / "state.json").write_text(json.dumps(asdict(state)) + "\n")
            swap_into_place(staging, self.checkpoint)
        finally:
            if staging.exists():
                shutil.rmtree(staging, ignore_errors=True)

    def load(self, model, optimizer):
        import torch
        from safetensors.torch import load_file

        load_trainable_state(model, load_file(self.checkpoint / "adapter.safetensors"))
        best = load_file(self.checkpoint / "best.safetensors")
        saved = torch.load(self.checkpoint / "optimizer.pt", weights_only=True)
        optimizer.load_state_dict(saved["optimizer"])
        torch.set_rng_state(saved["rng"]["cpu"])
        if "cuda" in saved["rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(saved["rng"]["cuda"])
        state = TrainingState(**json.loads((self.checkpoint / "state.json").read_text()))
        return state, best

    def remove(self) -> None:
        """Delete what this run wrote (never anything else a --work-dir may hold), then the folder if empty."""
        shutil.rmtree(self.checkpoint, ignore_errors=True)
        for partial in self.path.glob(".checkpoint.partial-*"):
            shutil.rmtree(partial, ignore_errors=True)
        (self.path / RUN_FILE).unlink(missing_ok=True)
        try:
            self.path.rmdir()
        except OSError:
            pass
