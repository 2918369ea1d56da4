"""What the calibration tokens look like at the inputs of one decoder layer's projections.

The paper's statistic (per-channel L2 norm) and what the baselines read (mean, mean |x|, variance,
and on request the Gram matrix) are accumulated by forward pre-hooks while the layer walk runs the
calibration batch through the layer (walk.py).
"""
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from ..families import SHARED_INPUTS
from ..errors import LorapError


GRAM_ROWS_AT_ONCE = 1024
# A Gram matrix is symmetric, so only its blocks on and above the diagonal are multiplied (the rest is
# mirrored once, after the last batch): with 4 column blocks that is 10 of 16 block products. Each entry
# is the same sum over the batch's tokens as in the whole product (on the CPU, bit for bit: the golden
# compressions did not change). Blocks narrower than this cost more in kernel overhead than they save.
GRAM_BLOCKS, GRAM_MIN_BLOCK_WIDTH = 4, 128


def _add_in_rows(total: torch.Tensor, product: torch.Tensor) -> None:
    """total += product (float64 += float32), a block of rows at a time: the float32 -> float64 cast of
    the whole product would be a temporary as large as the sum (0.9 GiB at LLaMA-7B's FFN width)."""
    for start in range(0, product.shape[0], GRAM_ROWS_AT_ONCE):
        total[start : start + GRAM_ROWS_AT_ONCE].add_(product[start : start + GRAM_ROWS_AT_ONCE])


def _gram_blocks(width: int) -> list:
    """The column ranges a Gram matrix of `width` channels is cut into (one range: not cut)."""
    blocks = max(1, min(GRAM_BLOCKS, width // GRAM_MIN_BLOCK_WIDTH))
    edges = [round(i * width / blocks) for i in range(blocks + 1)]
    return list(zip(edges[:-1], edges[1:]))


def add_upper_gram(total: torch.Tensor, flat: torch.Tensor) -> None:
    """total's blocks on and above the diagonal += those of flat^T flat (float32 products, added in float64);
    the blocks below are left for mirror_gram."""
    for start, end in _gram_blocks(flat.shape[1]):
        _add_in_rows(total[start:end, start:], flat[:, start:end].T @ flat[:, start:])


def mirror_gram(total: torch.Tensor) -> None:
    """Fill the blocks below the diagonal from those above it (add_upper_gram's sums)."""
    for start, end in _gram_blocks(total.shape[0]):
        total[end:, start:end] = total[start:end, end:].T


@dataclass
class ProjectionInputs:
    """What the calibration tokens looked like at one projection's input, per input channel.

    `norm` is the paper's statistic sqrt(sum x_j^2 / n_sequences); the others serve the
    baselines (ASVD: mean |x|; FLAP: mean and variance; SVD-LLM whitening and least-squares
    FFN updates: the Gram matrix sum x x^T, only collected when a method asks for it).
    """

    norm: torch.Tensor
    mean: torch.Tensor | None = None
    mean_abs: torch.Tensor | None = None
    variance: torch.Tensor | None = None
    gram: torch.Tensor | None = None  # float64 [in, in], sum over tokens of x x^T
    tokens: int = 0

    @classmethod
    def from_norm(cls, norm: torch.Tensor) -> "ProjectionInputs":
        return cls(norm=norm)

    def take_gram(self) -> torch.Tensor | None:
        """The Gram matrix, handed over: this record forgets it, so the taker can hold its last reference
        and free it as soon as it has read what it needs (0.9 GiB at LLaMA-7B's FFN width)."""
        gram, self.gram = self.gram, None
        return gram


class AllInputsSeen(Exception):
    """Raised by the last projection-input hook a forward pass reaches, when the pass was started only to
    record inputs (InputStatistics.recording(stop_when_all_seen=True))."""


class InputStatistics:
    """Per-channel sums over the calibration tokens at the inputs of the seven projections of one layer.

    Accumulated in float64 so long calibration runs never overflow or lose precision. Gram
    matrices (in x in) are collected only for the input sources named in `gram_sources`
    (q_proj, o_proj, gate_proj, down_proj), as they cost memory and time.
    """

    def __init__(self, input_modules: dict, gram_sources=()):
        """`input_modules`: {input source: module}, from Architecture.input_modules(layer)."""
        self._modules = dict(input_modules)
        unknown = set(gram_sources) - set(self._modules)
        if unknown:
            raise ValueError(f"no input source named {sorted(unknown)}")
        self.gram_sources = set(gram_sources)
        self.sum_squares: dict = {}
        self.sums: dict = {}
        self.sum_abs: dict = {}
        self.grams: dict = {}
        self.tokens: dict = {}
        self.sequences = 0
        self._handles = []

    @staticmethod
    def _add(table: dict, name: str, value: torch.Tensor) -> None:
        if name in table:
            table[name] += value
        else:
            table[name] = value

    @contextmanager
    def recording(self, stop_when_all_seen: bool = False):
        """Record while the layer runs. `stop_when_all_seen`: once a forward pass has reached every input
        this object records, its hook raises AllInputsSeen instead of letting that projection run; for a
        caller that discards the layer's output, the pass then skips the last projection's product (the
        FFN's down projection, about a fifth of a LLaMA layer's arithmetic). Every statistic is the same."""
        seen = set()

        def hook_for(name):
            def hook(module, args):
                x = args[0].detach()
                flat = x.reshape(-1, x.shape[-1]).float()
                self._add(self.sum_squares, name, flat.pow(2).sum(0).double())
                self._add(self.sums, name, flat.sum(0).double())
                self._add(self.sum_abs, name, flat.abs().sum(0).double())
                self.tokens[name] = self.tokens.get(name, 0) + flat.shape[0]
                if name in self.gram_sources:
                    # float32 products per batch (exact enough over ~1k tokens), float64 across batches
                    if name not in self.grams:
                        width = flat.shape[1]
                        self.grams[name] = torch.zeros(width, width, dtype=torch.float64, device=flat.device)
                    add_upper_gram(self.grams[name], flat)
                if name == "q_proj":
                    self.sequences += x.shape[0] if x.dim() == 3 else 1
                if stop_when_all_seen:
                    if name == "q_proj":  # a layer's first input: a new pass
                        seen.clear()
                    seen.add(name)
                    if len(seen) == len(self._modules):
                        raise AllInputsSeen

            return hook

        self._handles = [m.register_forward_pre_hook(hook_for(n)) for n, m in self._modules.items()]
        try:
            yield self
        finally:
            for handle in self._handles:
                handle.remove()
        for gram in self.grams.values():
            mirror_gram(gram)

    def release_grams(self) -> None:
        """Forget the Gram matrices: from here on, the ProjectionInputs read from this object are their
        only holders (so a method that takes one frees it when done)."""
        self.grams = {}

    def check_finite(self, layer_index: int) -> None:
        for name, squares in self.sum_squares.items():
            if not torch.isfinite(squares).all():
                raise LorapError(
                    f"non-finite activations (NaN or Inf) at the input of layer {layer_index} {name}; "
                    "the model or its dtype overflows on the calibration data (compress computes in the "
                    "checkpoint's own dtype, half precision on a CPU in float32: try --device cpu, or a "
                    "float32 copy of the model)"
                )

    @staticmethod
    def source_of(projection: str) -> str:
        for source, served in SHARED_INPUTS.items():
            if projection in served:
                return source
        raise KeyError(projection)

    def statistic(self, projection: str) -> torch.Tensor:
        """The paper's per-channel statistic s_j of this projection's input (float32)."""
        source = self.source_of(projection)
        return (self.sum_squares[source] / max(self.sequences, 1)).sqrt().float()

    def inputs(self, projection: str) -> ProjectionInputs:
        source = self.source_of(projection)
        tokens = max(self.tokens.get(source, 0), 1)
        mean = self.sums[source] / tokens
        # Sample variance over tokens, as FLAP's fluctuation; clamped against rounding below zero.
        variance = ((self.sum_squares[source] - tokens * mean.pow(2)) / max(tokens - 1, 1)).clamp_min(0)
        return ProjectionInputs(
            norm=self.statistic(projection),
            mean=mean,
            mean_abs=self.sum_abs[source] / tokens,
            variance=variance,
            gram=self.grams.get(source),
            tokens=tokens,
        )
