"""Perplexity against an independent direct computation, on every tiny architecture."""
import math

import pytest
import torch

from conftest import build_tiny_model
from lorap.io.data import DOCUMENT_SEPARATOR, evaluation_windows, wiki_documents
from lorap.errors import LorapError
from lorap.evaluate import perplexity as ppl_module
from lorap.evaluate.perplexity import perplexity, perplexity_table, window_nll

SEQLEN = 48
MAX_TOKENS = 1000  # 20 windows of 48; the last 40 tokens are dropped
WINDOWS = MAX_TOKENS // SEQLEN


@pytest.fixture(scope="module")
def test_ids(tiny_tokenizer):
    """The wiki test split tokenized here, not through lorap's token_stream."""
    text = DOCUMENT_SEPARATOR.join(wiki_documents("test"))
    return tiny_tokenizer(text)["input_ids"]


@torch.no_grad()
def direct_nll(model, ids, seqlen, stride=None, keep_tail=False):
    """Summed NLL (float64) and count, one window at a time, one token at a time."""
    stride = stride or seqlen
    starts = list(range(0, len(ids) - seqlen + 1, stride))
    if keep_tail and starts[-1] + seqlen < len(ids):
        starts.append(starts[-1] + seqlen)
    total, count = 0.0, 0
    for start in starts:
        window = ids[start : start + seqlen]
        log_probs = model(input_ids=torch.tensor([window])).logits[0].double().log_softmax(dim=-1)
        for position in range(len(window) - 1):
            total -= float(log_probs[position, window[position + 1]])
            count += 1
    return total, count


def test_perplexity_matches_direct_computation(tiny_model, tiny_tokenizer, test_ids):
    ids = test_ids[:MAX_TOKENS]
    total, count = direct_nll(tiny_model, ids, SEQLEN)
    assert count == (MAX_TOKENS // SEQLEN) * (SEQLEN - 1) == WINDOWS * (SEQLEN - 1) == 940
    expected = math.exp(total / count)

    value = perplexity(tiny_model, tiny_tokenizer, "wiki", seqlen=SEQLEN, max_tokens=MAX_TOKENS)
    assert math.isfinite(value)
    assert value == pytest.approx(expected, rel=1e-6)

    # The windows lorap evaluates: consecutive, non-overlapping, tail dropped; and what they sum to.
    windows = evaluation_windows(tiny_tokenizer, "wiki", seqlen=SEQLEN, max_tokens=MAX_TOKENS)
    assert windows.shape == (WINDOWS, SEQLEN)
    for i, window in enumerate(windows):
        assert window.tolist() == test_ids[i * SEQLEN : (i + 1) * SEQLEN]
    nll, predicted = window_nll(tiny_model, windows)
    assert predicted == WINDOWS * (SEQLEN - 1)
    assert isinstance(nll, float)
    assert nll == pytest.approx(total, rel=1e-7)


@torch.no_grad()
def batched_nll(model, ids, seqlen, stride=None, keep_tail=False):
    """The same sum, vectorised (one forward for all full windows): for the variants below only."""
    stride = stride or seqlen
    ids = torch.tensor(ids)
    windows = [ids.unfold(0, seqlen, stride)]
    covered = (windows[0].shape[0] - 1) * stride + seqlen
    if keep_tail and covered < ids.numel():
        windows.append(ids[covered:][None])
    total, count = 0.0, 0
    for batch in windows:
        log_probs = model(input_ids=batch).logits[:, :-1].double().log_softmax(dim=-1)
        total -= float(log_probs.gather(-1, batch[:, 1:, None]).sum())
        count += batch[:, 1:].numel()
    return total, count


def test_the_tolerance_is_meaningful(tiny_tokenizer, test_ids):
    """The usual mistakes move the result by far more than the 1e-6 the test above allows."""
    model = build_tiny_model("llama_mha")
    ids = test_ids[:MAX_TOKENS]
    total, count = batched_nll(model, ids, SEQLEN)
    expected = math.exp(total / count)
    assert perplexity(model, tiny_tokenizer, "wiki", SEQLEN, MAX_TOKENS) == pytest.approx(expected, rel=1e-6)
    for wrong in (
        batched_nll(model, ids, SEQLEN, keep_tail=True),  # a short last window kept
        batched_nll(model, ids, SEQLEN, stride=SEQLEN - 1),  # overlapping windows
        batched_nll(model, test_ids[1 : MAX_TOKENS + 1], SEQLEN),  # off by one token
    ):
        assert abs(math.exp(wrong[0] / wrong[1]) - expected) / expected > 1e-5


def test_batching_does_not_change_the_result(tiny_model, tiny_tokenizer, monkeypatch):
    batched = perplexity(tiny_model, tiny_tokenizer, "wiki", seqlen=16, max_tokens=320)
    monkeypatch.setattr(ppl_module, "TOKENS_PER_BATCH", 48)  # batches of 3 windows: 20 = 6 x 3 + 2
    uneven = perplexity(tiny_model, tiny_tokenizer, "wiki", seqlen=16, max_tokens=320)
    assert uneven == pytest.approx(batched, rel=1e-6)


def test_window_up_to_the_context_is_accepted_beyond_it_refused(tiny_tokenizer):
    model = build_tiny_model("llama_gqa", max_position_embeddings=64)
    assert math.isfinite(perplexity(model, tiny_tokenizer, "wiki", seqlen=64, max_tokens=128))
    with pytest.raises(LorapError, match=r"window of 65 tokens is longer than the model's context \(64 positions\)"):
        perplexity(model, tiny_tokenizer, "wiki", seqlen=65, max_tokens=1000)


@pytest.mark.parametrize(
    "seqlen, max_tokens, message",
    [
        (0, None, "seqlen must be a positive integer, got 0"),
        (-16, None, "seqlen must be a positive integer, got -16"),
        (16, 0, "max tokens must be a positive integer, got 0"),
        (128, 100, "has 100 tokens within --max-tokens 100, fewer than one window of 128"),
    ],
)
def test_bad_windows_are_lorap_errors(tiny_tokenizer, seqlen, max_tokens, message):
    with pytest.raises(LorapError, match=message):
        perplexity(build_tiny_model("llama_gqa"), tiny_tokenizer, "wiki", seqlen=seqlen, max_tokens=max_tokens)


def test_non_finite_logits_are_reported(tiny_tokenizer):
    model = build_tiny_model("llama_gqa")
    with torch.no_grad():
        model.model.norm.weight.fill_(float("nan"))
    with pytest.raises(LorapError, match="non-finite logits"):
        perplexity(model, tiny_tokenizer, "wiki", seqlen=16, max_tokens=64)


def test_perplexity_table_and_public_api(tiny_tokenizer):
    import lorap


    model = build_tiny_model("qwen2")
    table = perplexity_table(model, tiny_tokenizer, ["wiki"], [16, 32], max_tokens=640)
    assert list(table) == ["wiki"] and list(table["wiki"]) == ["16", "32"]
    assert table["wiki"]["16"] == perplexity(model, tiny_tokenizer, "wiki", 16, 640)
    assert table["wiki"]["32"] == perplexity(model, tiny_tokenizer, "wiki", 32, 640)
    assert table["wiki"]["16"] != table["wiki"]["32"]
    assert lorap.perplexity(model, tiny_tokenizer, "wiki", 32, 640) == table["wiki"]["32"]
