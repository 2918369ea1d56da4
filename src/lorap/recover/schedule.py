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

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(self.train_examples / (self.batch_size * self.grad_accum))

    @property
    def total_steps(self) -> int:
        total = self.epochs * self.steps_per_epoch
        return min(total, self.max_steps) if self.max_steps is not None else total

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
        """Linear warmup to lr, then linear decay to zero at the last step (0-based step)."""
        warmup, total = self.warmup_steps, self.total_steps
        if step < warmup:
            return self.lr * (step + 1) / warmup
        return self.lr * max(0.0, (total - step) / max(1, total - warmup))
