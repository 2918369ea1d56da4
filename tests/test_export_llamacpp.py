"""Exported GGUF files run in llama.cpp itself (llama-cpp-python) and compute what lorap computes.

CI installs the binding (scripts/test.sh) and sets LORAP_REQUIRE_LLAMACPP=1, so there these tests
fail rather than skip when it is missing: a test that is always skipped proves nothing.
"""
import math
import os

import pytest
import torch

from lorap import api
from lorap.cli import main
from lorap.export import llamacpp
from test_export import IDS

if os.environ.get("LORAP_REQUIRE_LLAMACPP") != "1":
    pytest.importorskip("llama_cpp")


def lorap_nll(folder, windows) -> float:
    model, _ = api.load(folder, fuse=False)
    with torch.no_grad():
        logits = model(windows).logits[:, :-1].double()
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), windows[:, 1:].reshape(-1),
                                             reduction="sum").item()


@pytest.mark.parametrize("name", ["best", "paper", "ffn-only", "lstsq", "qwen2-best", "heads", "heads-bias", "headdim", "qwen2-headdim"])
def test_llamacpp_scores_the_windows_as_lorap_does(compressed_dirs, tmp_path, name):
    out = tmp_path / f"{name}.gguf"
    assert main(["export", str(compressed_dirs[name]), "--format", "gguf", "--out", str(out), "--dtype", "f32"]) == 0
    model = llamacpp.open_model(out, IDS.shape[1], all_logits=True)  # loads: `deci` for best's uneven widths
    got = sum(llamacpp.window_nll(model, window) for window in IDS.tolist())
    model.close()
    assert math.isclose(got, lorap_nll(compressed_dirs[name], IDS), rel_tol=1e-4)
    tokens = llamacpp.generate(out, IDS[0, :8].tolist(), 4)
    assert len(tokens) == 4 and all(0 <= t < 512 for t in tokens)


@pytest.mark.slow  # exports the real default model
def test_llamacpp_tokenizes_text_as_the_builtin_tokenizer(tmp_path):
    from lorap.io.data import wiki_documents
    from lorap.io.models import load_model

    out = tmp_path / "dense.gguf"
    assert main(["export", "--format", "gguf", "--out", str(out)]) == 0
    _, tokenizer, _ = load_model(None)
    vocab = llamacpp.binding().Llama(model_path=str(out), vocab_only=True, verbose=False)
    for text in wiki_documents("test")[:20]:
        assert vocab.tokenize(text.encode(), add_bos=False, special=False) == tokenizer(text)["input_ids"]
    vocab.close()


def test_quantized_file_loads_and_is_smaller(compressed_dirs, tmp_path):
    source = tmp_path / "f32.gguf"
    assert main(["export", str(compressed_dirs["paper"]), "--format", "gguf", "--out", str(source), "--dtype", "f32"]) == 0
    target = llamacpp.quantize(source, tmp_path / "q8.gguf", "q8_0")
    assert target.stat().st_size < 0.5 * source.stat().st_size
    model = llamacpp.open_model(target, IDS.shape[1], all_logits=True)
    assert math.isfinite(llamacpp.window_nll(model, IDS[0].tolist()))
    model.close()


@pytest.mark.parametrize("dtype", ["f16", "bf16"])
def test_half_precision_files_score_close_to_lorap(compressed_dirs, tmp_path, dtype):
    out = tmp_path / f"{dtype}.gguf"
    assert main(["export", str(compressed_dirs["best"]), "--format", "gguf", "--out", str(out), "--dtype", dtype]) == 0
    model = llamacpp.open_model(out, IDS.shape[1], all_logits=True)
    got = sum(llamacpp.window_nll(model, window) for window in IDS.tolist())
    model.close()
    assert math.isclose(got, lorap_nll(compressed_dirs["best"], IDS), rel_tol=1e-2)
