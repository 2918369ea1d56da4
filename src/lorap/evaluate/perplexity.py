"""Perplexity by the published protocol: non-overlapping windows, PPL = exp(mean token NLL).

Every window predicts its tokens 2..L from the ones before it; the mean is taken over all
predicted tokens of all windows (not a mean of per-window perplexities).
"""
import math

import torch
from tqdm.auto import tqdm

from ..errors import LorapError
from ..io.data import DOCUMENT_SEPARATOR, evaluation_windows

# Tokens per forward pass: on 2 CPU threads about 1k tokens is fastest, and it bounds the
# float32 logits [batch, seqlen, vocab] to well under a GB for 128k-token vocabularies.
TOKENS_PER_BATCH = 1024


def max_context(model) -> int | None:
    return getattr(model.config, "max_position_embeddings", None)


@torch.no_grad()
def window_nll(model, windows: torch.Tensor, desc: str = "perplexity") -> tuple[float, int]:
    """Summed negative log-likelihood (nats, float64) and number of predicted tokens."""
    device = model.get_input_embeddings().weight.device  # where the tokens go in, also when spread over devices
    seqlen = windows.shape[1]
    batch_size = max(1, TOKENS_PER_BATCH // seqlen)
    total_nll, total_tokens = 0.0, 0
    for start in tqdm(range(0, windows.shape[0], batch_size), desc=desc, unit="batch", leave=False):
        batch = windows[start : start + batch_size].to(device)
        logits = model(input_ids=batch, use_cache=False).logits[:, :-1].float()
        targets = batch[:, 1:]
        # Per-token NLL summed in float64: a float32 sum over a batch loses ~1e-6 of the mean.
        token_nll = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none"
        )
        nll = token_nll.double().sum()
        if not torch.isfinite(nll):
            raise LorapError("the model produced non-finite logits during perplexity evaluation")
        total_nll += float(nll.double())
        total_tokens += targets.numel()
    return total_nll, total_tokens


def perplexity(model, tokenizer, dataset: str = "wiki", seqlen: int = 128, max_tokens: int | None = None,
               split: str = "test") -> float:
    """Perplexity on the test split, or on validation when choosing settings (io/data.py)."""
    limit = max_context(model)
    if limit is not None and seqlen > limit:
        raise LorapError(f"window of {seqlen} tokens is longer than the model's context ({limit} positions)")
    windows = evaluation_windows(tokenizer, dataset, seqlen, max_tokens, split)
    nll, count = window_nll(model, windows, desc=f"ppl {dataset}@{seqlen}" + ("" if split == "test" else f" ({split})"))
    return math.exp(nll / count)


def perplexity_table(model, tokenizer, datasets, seqlens, max_tokens=None, split="test") -> dict:
    """{dataset: {seqlen (as a string, as in JSON): perplexity}}."""
    return {
        dataset: {str(seqlen): perplexity(model, tokenizer, dataset, seqlen, max_tokens, split) for seqlen in seqlens}
        for dataset in datasets
    }


def protocol(max_tokens=None, split="test") -> dict:
    """How perplexity was measured, as every report records it."""
    return {
        "split": split,
        "documents_joined_with": DOCUMENT_SEPARATOR,
        "windows": "non-overlapping, tail dropped",
        "perplexity": "exp(mean token NLL over all predicted tokens)",
        "max_tokens": max_tokens,
    }
