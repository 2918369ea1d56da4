"""The training loop: seeded AdamW steps on the schedule, periodic validation and checkpoints,
the time budget and a graceful stop."""
import math
import time
from dataclasses import dataclass

from ..errors import LorapError
from ..log import info
from .config import RecoveryConfig
from .data import RecoveryData, collate
from .heldout import HeldOut
from .interrupt import StopRequest
from .lora import trainable_state
from .schedule import Schedule
from .work_folder import TrainingState, WorkFolder

MAX_GRAD_NORM = 1.0  # as transformers.Trainer (and so LLM-Pruner's post-training) clips
M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter (malloc.h)
MMAP_THRESHOLD_BYTES = 2**20


@dataclass
class TrainingJob:
    """What the training loop works on: the loss (student and teacher), the data and its held-out
    scoring, the settings and schedule, where checkpoints go."""

    objective: object
    data: RecoveryData
    held_out: HeldOut
    config: RecoveryConfig
    schedule: Schedule
    work: WorkFolder
    pad_id: int
    device: object
    started: float  # time.perf_counter() when the command began: a time budget counts from there


class Clock:
    """The training time of every session so far, and the time a budget counts."""

    def __init__(self, elapsed_before: float, command_started: float):
        self.before, self.command_started = elapsed_before, command_started
        self.session_started = time.perf_counter()

    def elapsed(self) -> float:
        """Training and held-out evaluation, over all sessions: what the work folder keeps."""
        return self.before + time.perf_counter() - self.session_started

    def spent(self, still_to_come_s: float) -> float:
        """What a budget counts: the sessions before, this command from its start (loading included)
        and `still_to_come_s` that must follow (the last held-out evaluation)."""
        return self.before + time.perf_counter() - self.command_started + still_to_come_s


def train(job: TrainingJob, resume_state=None, progress=True, on_step=None):
    """The training loop over the objective's student. Returns (state, best trainable weights, what
    stopped it: "schedule" or "max_minutes")."""
    from ..devices import release_freed_memory

    release_freed_memory()  # what loading the models and the data freed: training's peak starts from here
    _unmap_large_blocks_when_freed()
    session = _Session(job, resume_state)
    stopped_by = session.run(progress, on_step)
    session.state.elapsed_s = session.clock.elapsed()
    return session.state, session.best, stopped_by


def _unmap_large_blocks_when_freed() -> None:
    """Have glibc map every block over MMAP_THRESHOLD_BYTES by itself, and unmap it when freed.

    By default its threshold rises to the largest block freed (up to 32 MiB), and blocks under it
    come from the heap, which keeps what is freed: a step's activations and logits chunks (1-64 MiB
    each) then stayed resident after the step, a gigabyte of the built-in model's distillation run,
    and the next step's were placed beside them. A fixed threshold stops that rise. It holds for the
    rest of the process; on other C libraries this does nothing."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)
    except (OSError, AttributeError):
        pass


class _Session:
    """One command's share of a run: from a fresh start or the work folder's checkpoint to the end
    of the schedule, the time budget or a stop request."""

    def __init__(self, job: TrainingJob, resume_state):
        import torch

        self.job, self.config = job, job.config
        self.model = job.objective.student
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=self.config.lr, weight_decay=0.0)
        if resume_state == "checkpoint":
            self.state, self.best = job.work.load(self.model, self.optimizer)
            info(f"resuming at step {self.state.step} of {job.schedule.total_steps} from {job.work.checkpoint}")
        else:
            self.state, self.best = TrainingState(), None
        self.state.sessions += 1
        if self.state.validation_scored is not None:  # a resumed run scores what it scored before
            job.held_out.count = self.state.validation_scored
        elif self.state.validation_history:  # started before the count was kept: it scored every example
            job.held_out.count = len(job.data.validation)
        job.held_out.seconds = self.state.validation_seconds
        self.budget_s = self.config.max_minutes * 60 if self.config.max_minutes is not None else None
        self.clock = Clock(self.state.elapsed_s, job.started)
        self.order_cache: dict = {}

    def run(self, progress: bool, on_step) -> str:
        from tqdm.auto import tqdm

        state, total = self.state, self.job.schedule.total_steps
        if not state.validation_history:  # the starting point is a candidate too: never end worse
            loss = self.evaluate()
            info(f"validation loss before training: {loss:.4f} ({self.job.held_out.count} of "
                 f"{len(self.job.data.validation)} held-out examples scored)")
        bar = tqdm(total=total, initial=state.step, desc="recovery", unit="step", disable=not progress, dynamic_ncols=True)
        self.model.train()
        with StopRequest() as stop, bar:
            while state.step < total:
                loss = self.step()
                out_of_time = self.out_of_time()
                if state.step % self.config.eval_every == 0 or state.step == total or out_of_time:
                    self.evaluate()
                state.elapsed_s = self.clock.elapsed()
                saved = state.step % self.config.save_every == 0 or out_of_time
                if saved:
                    self.save()
                self.show(bar)
                if on_step is not None:
                    on_step(state.step, loss)
                if stop.requested:
                    self.stop_now(saved)
                if out_of_time:
                    info(f"time budget of {self.config.max_minutes} min reached at step {state.step} of {total}; "
                         f"checkpoint kept in {self.job.work.path} (--resume with a larger --max-minutes continues)")
                    return "max_minutes"
        return "schedule"

    def step(self) -> float:
        """One optimizer step over its micro-batches; returns its loss per predicted token."""
        import torch

        job, state = self.job, self.state
        micro = [collate([job.data.train[i] for i in indices], job.pad_id)
                 for indices in job.schedule.micro_batches(state.step, self.order_cache)]
        tokens = sum(int((labels[:, 1:] != -100).sum()) for _, _, labels in micro)
        step_loss = 0.0
        for batch in micro:
            terms = job.objective(batch, job.device)
            (terms.total / max(1, tokens)).backward()
            step_loss += float(terms.total.detach())
        torch.nn.utils.clip_grad_norm_(self.params, MAX_GRAD_NORM)
        lr = self.learning_rate()
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        state.step += 1
        state.tokens_seen += tokens
        state.last_lr = lr
        loss = step_loss / max(1, tokens)
        if not math.isfinite(loss):
            raise LorapError(f"training diverged at step {state.step} (loss {loss}); try a lower --lr")
        state.train_history.append([state.step, loss])
        return loss

    def learning_rate(self) -> float:
        schedule, step = self.job.schedule, self.state.step
        if self.budget_s is not None and self.config.budget_decay:
            return schedule.lr_within_budget(step, self.clock.spent(self._final_evaluation_s()), self.budget_s)
        return schedule.lr_at(step)

    def out_of_time(self) -> bool:
        """Whether the budget is spent, counting the held-out evaluation that ends the run."""
        return (self.budget_s is not None and self.state.step < self.job.schedule.total_steps
                and self.clock.spent(self._final_evaluation_s()) >= self.budget_s)

    def _final_evaluation_s(self) -> float:
        return self.job.held_out.seconds or 0.0  # the last evaluation's time (the first one, without the teacher's cache, is longer)

    def evaluate(self) -> float:
        """Score the held-out examples, keep the state if it is the best so far; returns the loss."""
        state, held_out = self.state, self.job.held_out
        fit_to = self.budget_s if not state.validation_history and self.config.val_size is None else None
        loss, nll = held_out.score(self.job.objective, fit_to)
        state.validation_scored, state.validation_seconds = held_out.count, held_out.seconds
        state.validation_history.append([state.step, loss, nll])
        if state.best_loss is None or loss < state.best_loss:
            state.best_step, state.best_loss, self.best = state.step, loss, trainable_state(self.model)
        return loss

    def save(self) -> None:
        self.job.work.save(self.model, self.optimizer, self.state, self.best)

    def show(self, bar) -> None:
        recent = [l for _, l in self.state.train_history[-20:]]
        postfix = {"loss": f"{sum(recent) / len(recent):.4f}", "lr": f"{self.state.last_lr:.2e}"}
        if self.state.validation_history:
            postfix["val"] = f"{self.state.validation_history[-1][1]:.4f}"
        bar.set_postfix(postfix, refresh=False)
        bar.update(1)

    def stop_now(self, saved: bool) -> None:
        """Ctrl-C or SIGTERM: keep this very step in the work folder, then stop."""
        if not saved:
            self.save()
        info(f"interrupted at step {self.state.step} of {self.job.schedule.total_steps}; checkpoint saved in "
             f"{self.job.work.path}. Run the same command with --resume to continue.")
        raise KeyboardInterrupt
