"""The training schedule: which examples each optimizer step sees and at what learning rate."""
import math
from dataclasses import dataclass


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
        return self.warmup if self.warmup is not None else min(100, self.total_steps // 10)

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
