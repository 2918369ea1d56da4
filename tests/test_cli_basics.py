"""The command line: `lorap eval` output, and one clear message (exit 2, no traceback) for bad input."""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import build_tiny_model
from lorap import __version__
from lorap.cli import main
from lorap.plan.counting import count_parameters
from lorap.evaluate.perplexity import perplexity

SHORT_TEXT = "Only a few words of text here, nothing more.\n"


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory, tiny_tokenizer):
    """One tiny GQA Llama saved as a folder (context 512), for the error cases."""
    folder = tmp_path_factory.mktemp("cli") / "tiny-llama"
    build_tiny_model("llama_gqa").save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def short_corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "short.txt"
    path.write_text(SHORT_TEXT, encoding="utf-8")
    return path


def _assert_one_clear_error(stderr: str, *fragments: str) -> str:
    assert "Traceback" not in stderr, stderr
    errors = [line for line in stderr.splitlines() if line.startswith("lorap: error:")]
    assert len(errors) == 1, stderr
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    return errors[0]


def test_eval_writes_json(tiny_model_dir, tiny_arch, tiny_tokenizer, tmp_path, capsys):
    out = tmp_path / "results" / "out.json"
    code = main(
        ["eval", str(tiny_model_dir), "--ppl", "wiki", "--seqlen", "16", "--max-tokens", "2000", "--tasks", "none", "--json", str(out)]
    )
    captured = capsys.readouterr()
    assert code == 0, captured.err
    result = json.loads(out.read_text())
    reference = build_tiny_model(tiny_arch)
    assert result["model"] == tiny_model_dir.name
    assert isinstance(result["parameters"], int) and result["parameters"] == count_parameters(reference)
    assert list(result["perplexity"]) == ["wiki"] and list(result["perplexity"]["wiki"]) == ["16"]
    value = result["perplexity"]["wiki"]["16"]
    assert value == pytest.approx(perplexity(reference, tiny_tokenizer, "wiki", 16, 2000), rel=1e-5)
    assert result["protocol"]["max_tokens"] == 2000
    assert f"perplexity wiki @ 16 tokens: {value:.3f}" in captured.out
    assert "Traceback" not in captured.err


@pytest.mark.parametrize(
    "arguments, fragments",
    [
        (["nobody/no-such-model-xyz"], ["'nobody/no-such-model-xyz'", "hub cannot be reached"]),
        (["{tmp}/missing-folder"], ["model folder not found", "missing-folder"]),
        (["{model}", "--seqlen", "0"], ["seqlen must be a positive integer, got 0"]),
        (["{model}", "--seqlen", "-16"], ["seqlen must be a positive integer, got -16"]),
        (["{model}", "--seqlen", "16", "--max-tokens", "0"], ["max tokens must be a positive integer, got 0"]),
        (["{model}", "--seqlen", "1024"], ["window of 1024 tokens is longer than the model's context (512 positions)"]),
        (["{model}", "--ppl", "nosuch"], ["unknown corpus 'nosuch'"]),
        (["{model}", "--ppl", "{tmp}/absent.txt"], ["corpus file not found", "absent.txt"]),
        (["{model}", "--ppl", "{short}", "--seqlen", "128"], ["(test) has {tokens} tokens", "fewer than one window of 128"]),
    ],
    ids=[
        "unknown-hub-id-offline",
        "missing-folder",
        "zero-window",
        "negative-window",
        "zero-max-tokens",
        "window-beyond-context",
        "unknown-corpus",
        "missing-corpus-file",
        "corpus-shorter-than-a-window",
    ],
)
def test_eval_bad_input(llama_dir, short_corpus, tiny_tokenizer, tmp_path, capsys, arguments, fragments):
    tokens = len(tiny_tokenizer(SHORT_TEXT)["input_ids"])
    fill = dict(tmp=tmp_path, model=llama_dir, short=short_corpus, tokens=tokens)
    code = main(["eval", "--tasks", "none", *(argument.format(**fill) for argument in arguments)])
    captured = capsys.readouterr()
    assert code == 2
    _assert_one_clear_error(captured.err, *(fragment.format(**fill) for fragment in fragments))
    assert captured.out == ""


def test_calibration_corpus_too_short(llama_dir, short_corpus, tiny_tokenizer, tmp_path, capsys):
    """`compress` asks for calibration samples; a corpus too short says how many tokens it has and needs."""
    tokens = len(tiny_tokenizer(SHORT_TEXT)["input_ids"])
    out = tmp_path / "out"
    code = main(
        ["compress", str(llama_dir), "--out", str(out), "--ratio", "0.2",
         "--calibration", str(short_corpus), "--samples", "4", "--sample-len", "64"]
    )  # fmt: skip
    captured = capsys.readouterr()
    assert code == 2
    _assert_one_clear_error(captured.err, f"has {tokens} tokens", "4 x 64 = 256 tokens were asked for")
    assert not out.exists() or not any(out.iterdir())  # nothing half-written


@pytest.mark.parametrize("arguments", [[], ["eval", "--seqlen", "abc"], ["eval", "--max-tokens", "many"], ["frobnicate"]])
def test_usage_errors_exit_2(arguments, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(arguments)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "usage: lorap" in err and "Traceback" not in err


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"lorap {__version__}"


def test_installed_command_reports_an_error_without_traceback(tmp_path):
    """The real entry point, in its own process: exit status 2 and one message, quickly."""
    executable = Path(sys.executable).with_name("lorap")
    assert executable.is_file(), f"no lorap entry point next to {sys.executable} (pip install -e .)"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    started = time.perf_counter()
    run = subprocess.run(
        [str(executable), "eval", "nobody/no-such-model-xyz", "--json", str(tmp_path / "out.json")],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert run.returncode == 2, run.stderr
    _assert_one_clear_error(run.stderr, "'nobody/no-such-model-xyz'", "hub cannot be reached")
    assert run.stdout == ""
    assert not (tmp_path / "out.json").exists()
    assert time.perf_counter() - started < 60
