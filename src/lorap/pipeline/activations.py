"""Calibration activations between two layers of a streamed run, kept on the host.

One tensor holds the hidden states of every calibration sequence, in memory or memory-mapped from
a file, in a storage dtype that may be narrower than the model's; the batches the walk sees are
windows onto it, so the shared per-layer step reads and writes them as ordinary batches.
"""
import math
import os
from pathlib import Path

import torch

from ..errors import LorapError

ACTIVATION_DTYPES = ("auto", "float16", "bfloat16", "float32")  # auto: the model's own dtype, as in memory
ACTIVATION_STORES = ("memory", "disk")  # disk: a memory-mapped file in the staging folder



class ActivationStore:
    """The hidden states of every calibration sequence between two layers, in one host tensor
    (in memory or memory-mapped from a file), in a storage dtype that may be narrower than the model's."""

    def __init__(self, shape: tuple, dtype: torch.dtype, path: Path | None = None):
        self.shape, self.dtype, self.path = tuple(shape), dtype, path
        numel = math.prod(shape)
        if path is None:
            self.data = torch.empty(shape, dtype=dtype)
        else:
            with open(path, "wb") as handle:
                handle.truncate(numel * torch.empty((), dtype=dtype).element_size())
            self.data = torch.from_file(str(path), shared=True, size=numel, dtype=dtype).view(shape)

    @property
    def nbytes(self) -> int:
        return self.data.numel() * self.data.element_size()

    def save(self, file: Path) -> None:
        """Raw bytes, one sequence at a time (never a second full copy in memory), written atomically."""
        temporary = file.with_name(f".{file.name}.tmp")
        with open(temporary, "wb") as handle:
            for row in range(self.shape[0]):
                handle.write(self.data[row].contiguous().view(torch.uint8).numpy().tobytes())
        os.replace(temporary, file)

    def load(self, file: Path) -> None:
        row_bytes = self.nbytes // self.shape[0]
        with open(file, "rb") as handle:
            for row in range(self.shape[0]):
                raw = bytearray(handle.read(row_bytes))
                if len(raw) != row_bytes:
                    raise LorapError(f"{file} is truncated; delete the staging folder and start over")
                self.data[row].view(-1).view(torch.uint8).copy_(torch.frombuffer(raw, dtype=torch.uint8))


class StoredBatch:
    """A calibration batch whose hidden states live in an ActivationStore; duck-types CalibrationBatch
    so the shared per-layer step reads and writes it unchanged."""

    def __init__(self, store: ActivationStore, rows: slice, kwargs: dict, device, compute_dtype):
        self.store, self.rows, self.kwargs = store, rows, kwargs
        self.device, self.compute_dtype = device, compute_dtype

    @property
    def hidden(self) -> torch.Tensor:
        return self.store.data[self.rows].to(self.device, self.compute_dtype)

    @hidden.setter
    def hidden(self, value: torch.Tensor) -> None:
        self.store.data[self.rows] = value.to("cpu", self.store.dtype)


def store_batches(captured: list, dtype_choice: str, store_path: Path | None, device) -> tuple:
    first = captured[0].hidden
    compute_dtype = first.dtype
    storage = compute_dtype if dtype_choice == "auto" else getattr(torch, dtype_choice)
    total = sum(batch.hidden.shape[0] for batch in captured)
    store = ActivationStore((total, *first.shape[1:]), storage, store_path)
    batches, start = [], 0
    for batch in captured:
        rows = slice(start, start + batch.hidden.shape[0])
        stored = StoredBatch(store, rows, batch.kwargs, device, compute_dtype)
        stored.hidden = batch.hidden
        batch.hidden = None  # free the captured copy as soon as it is stored
        batches.append(stored)
        start = rows.stop
    return store, batches
