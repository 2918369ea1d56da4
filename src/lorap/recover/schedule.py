"""The training schedule: which examples each optimizer step sees and at what learning rate."""
import math
from dataclasses import dataclass

WARMUP_SHARE = 0.1  # the default warmup's share of the steps, and of a time budget


@dataclass(frozen=True)
class Schedule:
    """Which examples each optimizer step sees and at what learning rate: pure functions of the
    step number, so a resumed run continues exactly where its checkpoint stopped."""

    train_examples: int
    batch_size: int
    grad_accum: int
    epochs: int
    max_steps: int | None
    warmup: int | None
    lr: float
    seed: int
    decay_steps: int | None = None  # where the learning rate reaches zero; None: at the last step

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(self.train_examples / (self.batch_size * self.grad_accum))

    @property
    def total_steps(self) -> int:
        ends = [self.epochs * self.steps_per_epoch, self.max_steps, self.decay_steps]
        return min(end for end in ends if end is not None)  # a step past the decay's end would train at rate 0

    @property
    def horizon(self) -> int:
        """The step at which the learning rate reaches zero: the last step unless --decay-steps sets
        a later one (training then stops, by --max-steps or the time budget, before the decay ends)."""
        return self.decay_steps if self.decay_steps is not None else self.total_steps

    @property
    def warmup_steps(self) -> int:
        return self.warmup if self.warmup is not None else min(100, int(self.total_steps * WARMUP_SHARE))

    def epoch_order(self, epoch: int) -> list:
        import torch

        generator = torch.Generator().manual_seed(self.seed * 100_003 + epoch + 1)
        return torch.randperm(self.train_examples, generator=generator).tolist()

    def micro_batches(self, step: int, order_cache: dict) -> list:
        """Example indices of each micro-batch of optimizer step `step` (0-based)."""
        epoch, position = divmod(step, self.steps_per_epoch)
        if epoch not in order_cache:
            order_cache.clear()
            order_cache[epoch] = self.epoch_order(epoch)
        per_step = self.batch_size * self.grad_accum
        chosen = order_cache[epoch][position * per_step : (position + 1) * per_step]
        return [chosen[i : i + self.batch_size] for i in range(0, len(chosen), self.batch_size)]

    def lr_at(self, step: int) -> float:
        """Linear warmup to lr, then linear decay to zero at the horizon (0-based step)."""
        warmup, horizon = self.warmup_steps, self.horizon
        if step < warmup:
            return self.lr * (step + 1) / warmup
        return self.lr * max(0.0, (horizon - step) / max(1, horizon - warmup))

    def lr_within_budget(self, step: int, elapsed_s: float, budget_s: float) -> float:
        """The rate of a run with a time budget: the step schedule's, but never above the peak times
        the share of the budget left. So the rate reaches zero as the budget runs out, however far
        away the schedule's own end is; when the steps end first, their decay governs. The default
        warmup (10% of the steps, at most 100) also ends once 10% of the budget is spent."""
        rate = self.lr_at(step)
        if self.warmup is None and step < self.warmup_steps:
            rate = self.lr * max((step + 1) / self.warmup_steps, min(1.0, elapsed_s / (WARMUP_SHARE * budget_s)))
        return min(rate, self.lr * max(0.0, 1.0 - elapsed_s / budget_s))
