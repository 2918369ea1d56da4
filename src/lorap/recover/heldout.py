"""The held-out evaluation of a recovery run: how many held-out examples each evaluation scores,
and the teacher's outputs on them, computed once.

A run scores held-out examples before training, every --eval-every steps and at its last step, so
their number is sized to the training between two evaluations: one example per
TRAINED_PER_SCORED examples trained, at least MIN_SCORED, at most the held-out set. The held-out
set itself (and so the training set) does not depend on that size; --val-size sets both. A time
budget also caps one evaluation at BUDGET_SHARE_PER_EVALUATION of the budget, timed on its first
batch, and the count chosen is kept in the work folder, so a resumed run compares like with like.

The teacher is frozen, so its final hidden states on the held-out batches are the same at every
evaluation: they are kept (up to TEACHER_CACHE_BYTES) and only the student runs again.
"""
import time

from .config import RecoveryConfig
from .data import collate

TRAINED_PER_SCORED = 4
MIN_SCORED = 16
BUDGET_SHARE_PER_EVALUATION = 0.1
TEACHER_CACHE_BYTES = 128 * 2**20


def scored_count(config: RecoveryConfig, held_out: int, total_steps: int) -> int:
    """How many of the `held_out` examples each evaluation scores (before any time cap)."""
    if config.val_size is not None:
        return held_out
    trained_between = min(config.eval_every, total_steps) * config.batch_size * config.grad_accum
    return min(held_out, max(MIN_SCORED, trained_between // TRAINED_PER_SCORED))


class HeldOut:
    """Scores the student's objective on the first `count` held-out examples."""

    def __init__(self, examples: list, count: int, batch_size: int, pad_id: int, device):
        self.examples, self.count = examples, count
        self.batch_size, self.pad_id, self.device = batch_size, pad_id, device
        self.seconds = None  # how long the last evaluation took
        self._teacher_states: dict = {}  # batch start -> the teacher's (final hidden, layer outputs)
        self._cached_bytes = 0

    def fit_to_budget(self, budget_s: float, seconds_per_example: float, scored: int) -> None:
        """Score no more examples than BUDGET_SHARE_PER_EVALUATION of `budget_s` allows (at least
        MIN_SCORED, and never fewer than the `scored` already)."""
        affordable = int(BUDGET_SHARE_PER_EVALUATION * budget_s / max(seconds_per_example, 1e-9))
        self.count = min(self.count, max(MIN_SCORED, scored, affordable))

    def score(self, objective, budget_s: float | None = None) -> tuple:
        """(the training objective, the next-token loss) per predicted token of the scored examples.
        With `budget_s`, the count is first fitted to it, from the time of the first batch."""
        import torch

        model = objective.student
        was_training = model.training
        model.eval()
        started = time.perf_counter()
        total, nll, tokens = 0.0, 0.0, 0
        with torch.no_grad():
            start = 0
            while start < self.count:
                batch = collate(self.examples[start : min(start + self.batch_size, self.count)], self.pad_id)
                terms = objective(batch, self.device, self._teacher(objective, start, batch))
                total += float(terms.total.double())
                nll += terms.nll
                tokens += terms.tokens
                start += len(batch[0])
                if budget_s is not None and start == len(batch[0]):
                    self.fit_to_budget(budget_s, (time.perf_counter() - started) / start, start)
        model.train(was_training)
        self.seconds = time.perf_counter() - started
        return total / max(1, tokens), nll / max(1, tokens)

    def _teacher(self, objective, start: int, batch):
        """The teacher's outputs on the batch at `start`: kept from the first evaluation while they fit."""
        if objective.teacher is None:
            return None
        if start in self._teacher_states:
            return self._teacher_states[start]
        states = objective.teacher_states(batch, self.device)
        size = sum(t.numel() * t.element_size() for t in _tensors(states))
        if self._cached_bytes + size <= TEACHER_CACHE_BYTES:
            self._teacher_states[start] = states
            self._cached_bytes += size
        return states


def _tensors(states) -> list:
    hidden, layers = states
    return [hidden, *(layers or ())]
