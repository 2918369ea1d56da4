"""The training loop: seeded AdamW steps on the schedule, periodic validation and checkpoints,
the time budget and a graceful stop."""
import math
import time

from ..errors import LorapError
from ..log import info
from .config import RecoveryConfig
from .data import RecoveryData, collate
from .interrupt import StopRequest
from .lora import trainable_state
from .schedule import Schedule
from .work_folder import TrainingState, WorkFolder

MAX_GRAD_NORM = 1.0  # as transformers.Trainer (and so LLM-Pruner's post-training) clips


def validation_losses(objective, examples: list, batch_size: int, pad_id: int, device) -> tuple:
    """(the training objective, the next-token loss) per predicted token of the held-out examples."""
    import torch

    model = objective.student
    was_training = model.training
    model.eval()
    total, nll, tokens = 0.0, 0.0, 0
    with torch.no_grad():
        for start in range(0, len(examples), batch_size):
            terms = objective(collate(examples[start : start + batch_size], pad_id), device)
            total += float(terms.total.double())
            nll += terms.nll
            tokens += terms.tokens
    model.train(was_training)
    return total / max(1, tokens), nll / max(1, tokens)


def train(objective, data: RecoveryData, config: RecoveryConfig, schedule: Schedule, work: WorkFolder, pad_id: int,
          device, resume_state=None, progress=True, on_step=None):
    """The training loop over the objective's student. Returns (state, best trainable weights, what
    stopped it)."""
    import torch
    from tqdm.auto import tqdm

    model = objective.student
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=0.0)
    if resume_state == "checkpoint":
        state, best = work.load(model, optimizer)
        info(f"resuming at step {state.step} of {schedule.total_steps} from {work.checkpoint}")
    else:
        state, best = TrainingState(), None
    state.sessions += 1
    total = schedule.total_steps
    budget_s = config.max_minutes * 60 if config.max_minutes is not None else None
    session_start, elapsed_before = time.perf_counter(), state.elapsed_s

    def elapsed():
        return elapsed_before + time.perf_counter() - session_start

    def evaluate():
        loss, nll = validation_losses(objective, data.validation, config.batch_size, pad_id, device)
        state.validation_history.append([state.step, loss, nll])
        nonlocal best
        if state.best_loss is None or loss < state.best_loss:
            state.best_step, state.best_loss, best = state.step, loss, trainable_state(model)
        return loss

    if not state.validation_history:  # the starting point is a candidate too: never end worse
        info(f"validation loss before training: {evaluate():.4f} ({len(data.validation)} held-out examples)")
    stopped_by = "schedule"
    order_cache: dict = {}
    bar = tqdm(total=total, initial=state.step, desc="recovery", unit="step", disable=not progress, dynamic_ncols=True)
    model.train()
    with StopRequest() as stop, bar:
        while state.step < total:
            micro = [collate([data.train[i] for i in indices], pad_id)
                     for indices in schedule.micro_batches(state.step, order_cache)]
            tokens = sum(int((labels[:, 1:] != -100).sum()) for _, _, labels in micro)
            step_loss = 0.0
            for batch in micro:
                terms = objective(batch, device)
                (terms.total / max(1, tokens)).backward()
                step_loss += float(terms.total.detach())
            torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM)
            lr = (schedule.lr_within_budget(state.step, elapsed(), budget_s) if budget_s is not None
                  and config.budget_decay else schedule.lr_at(state.step))
            for group in optimizer.param_groups:
                group["lr"] = lr
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            state.step += 1
            state.tokens_seen += tokens
            state.last_lr = lr
            loss = step_loss / max(1, tokens)
            if not math.isfinite(loss):
                raise LorapError(f"training diverged at step {state.step} (loss {loss}); try a lower --lr")
            state.train_history.append([state.step, loss])
            out_of_time = budget_s is not None and elapsed() >= budget_s and state.step < total
            if state.step % config.eval_every == 0 or state.step == total or out_of_time:
                evaluate()
            state.elapsed_s = elapsed()
            saved = state.step % config.save_every == 0 or out_of_time
            if saved:
                work.save(model, optimizer, state, best)
            recent = [l for _, l in state.train_history[-20:]]
            postfix = {"loss": f"{sum(recent) / len(recent):.4f}", "lr": f"{lr:.2e}"}
            if state.validation_history:
                postfix["val"] = f"{state.validation_history[-1][1]:.4f}"
            bar.set_postfix(postfix, refresh=False)
            bar.update(1)
            if on_step is not None:
                on_step(state.step, loss)
            if stop.requested:
                if not saved:
                    work.save(model, optimizer, state, best)
                info(f"interrupted at step {state.step} of {total}; checkpoint saved in {work.path}. "
                     "Run the same command with --resume to continue.")
                raise KeyboardInterrupt
            if out_of_time:
                stopped_by = "max_minutes"
                info(f"time budget of {config.max_minutes} min reached at step {state.step} of {total}; "
                     f"checkpoint kept in {work.path} (--resume with a larger --max-minutes continues)")
                break
    state.elapsed_s = elapsed()
    return state, best, stopped_by
