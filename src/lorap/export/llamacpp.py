"""Run an exported GGUF file in llama.cpp (through the llama-cpp-python binding): perplexity on the
same token windows lorap scores, greedy generation, prefill and decode timing, and quantization.

The binding is optional (`pip install llama-cpp-python`, which builds llama.cpp from source); every
function here says so clearly when it is missing.
"""
import math
import time
from pathlib import Path

import numpy as np

from ..errors import LorapError

QUANT_TYPES = ("q8_0", "q4_k_m")


def binding():
    """The llama_cpp module, or a clear error that says how to install it."""
    try:
        import llama_cpp
    except ImportError as err:
        raise LorapError("running a GGUF file needs llama-cpp-python: `pip install llama-cpp-python` "
                         "(it builds llama.cpp from source, several minutes)") from err
    return llama_cpp


def open_model(path: Path, context: int, threads: int = 2, all_logits: bool = False):
    """A llama.cpp model and context; with `all_logits`, every position's logits are kept (perplexity)."""
    llama_cpp = binding()
    return llama_cpp.Llama(model_path=str(path), n_ctx=context, n_batch=context, n_ubatch=context, n_threads=threads,
                           n_threads_batch=threads, logits_all=all_logits, verbose=False)


def window_nll(model, window: list) -> float:
    """Summed NLL (nats, float64) of tokens 2..L of one window, each predicted from those before it."""
    model.reset()
    model.eval(window)
    logits = np.asarray(model.scores[: len(window) - 1], dtype=np.float64)
    top = logits.max(axis=1, keepdims=True)
    log_normaliser = np.log(np.exp(logits - top).sum(axis=1)) + top[:, 0]
    return float((log_normaliser - logits[np.arange(len(window) - 1), window[1:]]).sum())


def perplexity(path: Path, windows, threads: int = 2) -> float:
    """exp(mean token NLL) over the windows (a [n, L] tensor of token ids): lorap's protocol, in llama.cpp."""
    seqlen = windows.shape[1]
    model = open_model(path, seqlen, threads, all_logits=True)
    try:
        total = sum(window_nll(model, window) for window in windows.tolist())
    finally:
        model.close()  # free llama.cpp's memory now, not at interpreter exit (where it raises)
    return math.exp(total / (windows.shape[0] * (seqlen - 1)))


def greedy_tokens(model, count: int) -> list:
    """`count` greedy tokens after what the model has evaluated, each fed back in."""
    tokens = []
    for _ in range(count):
        tokens.append(int(np.argmax(model.scores[model.n_tokens - 1])))
        model.eval(tokens[-1:])
    return tokens


def generate(path: Path, prompt: list, new_tokens: int, threads: int = 2) -> list:
    """Greedy continuation of `prompt` (token ids)."""
    model = open_model(path, len(prompt) + new_tokens, threads)
    try:
        model.reset()
        model.eval(prompt)
        return greedy_tokens(model, new_tokens)
    finally:
        model.close()


class Timer:
    """Prefill and decode timing of one model, kept open so that runs of several models can interleave."""

    def __init__(self, path: Path, prompt: list, new_tokens: int, threads: int = 2):
        self.model = open_model(path, len(prompt) + new_tokens, threads)
        self.prompt, self.new_tokens = prompt, new_tokens

    def prefill_seconds(self) -> float:
        self.model.reset()
        started = time.perf_counter()
        self.model.eval(self.prompt)
        return time.perf_counter() - started

    def decode_seconds(self) -> float:
        """Seconds for `new_tokens` greedy tokens after the prompt (the prompt itself not timed)."""
        self.model.reset()
        self.model.eval(self.prompt)
        started = time.perf_counter()
        greedy_tokens(self.model, self.new_tokens)
        return time.perf_counter() - started

    def close(self) -> None:
        self.model.close()


def quantize(source: Path, target: Path, kind: str, threads: int = 2) -> Path:
    """llama.cpp's own quantizer (as llama-quantize runs it): `kind` is one of QUANT_TYPES."""
    llama_cpp = binding()
    if kind not in QUANT_TYPES:
        raise LorapError(f"quantization must be one of {', '.join(QUANT_TYPES)}, got {kind!r}")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = {"q8_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0, "q4_k_m": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M}[kind]
    params.nthread = threads
    status = llama_cpp.llama_model_quantize(str(source).encode(), str(target).encode(), params)
    if status != 0:
        raise LorapError(f"llama.cpp could not quantize {source} to {kind} (status {status})")
    return target
