"""`lorap eval` with zero-shot, speed, comparison, markdown and charts, on tiny models."""
import json

import pytest

from conftest import build_tiny_model
from lorap.cli import main
from lorap.evaluate import suite
from lorap.evaluate.proxy_tasks import PROXY_TASKS

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def two_dirs(tmp_path_factory, tiny_tokenizer):
    """Two tiny LLaMAs (different seeds, long enough context for whole proxy items)."""
    root = tmp_path_factory.mktemp("eval")
    folders = []
    for name, seed in (("small-a", 0), ("small-b", 1)):
        build_tiny_model("llama_gqa", seed=seed, max_position_embeddings=2048).save_pretrained(root / name)
        tiny_tokenizer.save_pretrained(root / name)
        folders.append(root / name)
    return folders


@pytest.fixture(scope="module")
def full_run(two_dirs, tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    args = ["eval", str(two_dirs[0]), "--against", str(two_dirs[1]), "--seqlen", "32", "--max-tokens", "1000",
            "--tasks", "proxies", "--limit", "3", "--speed", "--json", str(out / "r.json"), "--markdown", str(out / "r.md")]
    assert main(args) == 0
    return json.loads((out / "r.json").read_text()), out


def test_report_has_both_models_and_every_section(full_run):
    report, _ = full_run
    assert report["model"] == "small-a" and report["against"]["model"] == "small-b"
    for entry in (report, report["against"]):
        assert list(entry["perplexity"]["wiki"]) == ["32"]
        assert set(entry["zeroshot"]) == set(PROXY_TASKS) and all(r["n"] == 3 for r in entry["zeroshot"].values())
        assert entry["efficiency"]["macs_agree"] is True
        assert set(entry["efficiency"]["prefill"]) == {"128", "512"}
    assert report["comparison"]["parameters_removed"] == 0
    # The speedups come from the two models timed side by side (lorap bench's code), not from the
    # ratio of each one's own medians, measured minutes apart.
    comparison = report["comparison"]
    assert comparison["speed_timing"].startswith("side by side")
    assert set(comparison["prefill_speedup"]) == {"128", "512"}
    for low_high, speedup in [*((comparison["prefill_speedup_quartiles"][s], comparison["prefill_speedup"][s])
                                for s in ("128", "512")),
                              (comparison["decode_speedup_quartiles"], comparison["decode_speedup"])]:
        assert low_high[0] <= speedup <= low_high[1]
    assert report["versions"]["lm_eval"] and report["versions"]["transformers"] and report["date"]
    assert report["protocol"]["zeroshot"]["num_fewshot"] == 0
    assert report["data"]["perplexity"]["wiki"]["sha256"]
    assert any("PROXIES" in note for note in report["notes"])


def test_markdown_and_charts_are_written(full_run):
    _, out = full_run
    markdown = (out / "r.md").read_text()
    assert "small-a vs small-b" in markdown and "(proxy)" in markdown and "**(quoted)**" in markdown
    assert "not comparable with published" in markdown
    for name in ("perplexity", "zeroshot", "efficiency"):
        assert (out / "r_charts" / f"{name}.png").read_bytes()[:8] == PNG
        assert f"(r_charts/{name}.png)" in markdown


def test_single_model_keeps_the_plain_keys(two_dirs, tmp_path, capsys):
    out = tmp_path / "one.json"
    assert main(["eval", str(two_dirs[0]), "--seqlen", "32", "--max-tokens", "500", "--tasks", "none", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert {"model", "parameters", "perplexity", "protocol", "versions", "device", "date"} <= set(report)
    assert "against" not in report and "zeroshot" not in report and "efficiency" not in report
    assert "perplexity wiki @ 32 tokens:" in capsys.readouterr().out


def test_validation_split_is_measured_and_recorded(two_dirs, tmp_path):
    out = {}
    for split in ("test", "validation"):
        out[split] = tmp_path / f"{split}.json"
        assert main(["eval", str(two_dirs[0]), "--seqlen", "32", "--max-tokens", "500", "--tasks", "none", "--split", split,
                     "--json", str(out[split])]) == 0
    test, validation = (json.loads(out[s].read_text()) for s in ("test", "validation"))
    assert validation["protocol"]["split"] == "validation" and test["protocol"]["split"] == "test"
    assert "validation split" in validation["data"]["perplexity"]["wiki"]["corpus"]
    assert validation["perplexity"]["wiki"]["32"] != test["perplexity"]["wiki"]["32"]  # other tokens


def test_a_device_map_spreads_the_model_and_gives_the_same_perplexity(two_dirs, tmp_path):
    """accelerate's device map (several GPUs where there are some) runs on a CPU-only machine too,
    and the report says where the model went."""
    plain, mapped = tmp_path / "plain.json", tmp_path / "mapped.json"
    common = ["eval", str(two_dirs[0]), "--seqlen", "32", "--max-tokens", "500", "--tasks", "none"]
    assert main([*common, "--json", str(plain)]) == 0
    assert main([*common, "--device-map", "auto", "--json", str(mapped)]) == 0
    plain, mapped = json.loads(plain.read_text()), json.loads(mapped.read_text())
    assert mapped["device_map"]["requested"] == "auto" and mapped["device_map"]["devices"]
    assert "device_map" not in plain
    assert abs(mapped["perplexity"]["wiki"]["32"] - plain["perplexity"]["wiki"]["32"]) < 1e-4


def test_limit_without_tasks_is_a_plain_error(two_dirs, capsys):
    assert main(["eval", str(two_dirs[0]), "--limit", "3", "--tasks", "none"]) == 2
    assert "--limit counts zero-shot examples" in capsys.readouterr().err


def _fake_checkpoint(folder, base):
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "lorap": {"base_model": base}}))
    return folder


def test_a_checkpoint_is_compared_with_its_base_by_default(tmp_path, two_dirs):
    checkpoint = _fake_checkpoint(tmp_path / "ckpt", str(two_dirs[1]))
    assert suite.base_model_of(str(checkpoint)) == (True, str(two_dirs[1]))
    notes = []
    assert suite._resolve_against(str(checkpoint), None, False, notes) == str(two_dirs[1])
    assert suite._resolve_against(str(checkpoint), None, True, notes) is False  # --alone
    assert suite._resolve_against(str(checkpoint), "other", False, notes) == "other"
    assert suite._resolve_against(str(two_dirs[0]), None, False, notes) is False  # a dense model: alone
    assert notes == []


def test_a_missing_base_is_said_and_skipped(tmp_path):
    checkpoint = _fake_checkpoint(tmp_path / "ckpt", str(tmp_path / "gone"))
    notes = []
    assert suite._resolve_against(str(checkpoint), None, False, notes) is False
    assert "not compared with the base model" in notes[0] and "gone" in notes[0]
    assert suite.base_model_of(str(_fake_checkpoint(tmp_path / "c2", None))) == (True, None)  # None: built-in default


def test_a_real_checkpoint_is_compared_with_its_base(two_dirs, tmp_path, capsys):
    """End to end: compress a tiny model, then `lorap eval` the checkpoint with no --against."""
    from lorap.api import compress
    from lorap.evaluate.efficiency import counted_macs_per_token, macs_per_token
    from lorap.io.models import load_model

    checkpoint = tmp_path / "ckpt"
    compress(str(two_dirs[0]), checkpoint, ratio=0.3, calibration_samples=4, calibration_seqlen=32, progress=False)
    out = tmp_path / "r.json"
    assert main(["eval", str(checkpoint), "--seqlen", "32", "--max-tokens", "500", "--tasks", "none", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["against"]["model"] == "small-a"
    assert 0 < report["comparison"]["parameters_removed"] < 0.3
    model, _, _ = load_model(str(checkpoint))
    assert counted_macs_per_token(model, 48) == macs_per_token(model, 48)["total"]  # factorized shapes too


def test_models_too_big_to_time_together_are_timed_apart_and_the_report_says_so(two_dirs, tmp_path, monkeypatch):
    from lorap.evaluate import speed_comparison

    monkeypatch.setattr(speed_comparison, "free_memory_bytes", lambda device: 1000)
    assert speed_comparison.fits_together([400, 400], "cpu") == (False, "0.0 GiB needed for both, 0.0 GiB available")
    out = tmp_path / "apart.json"
    assert main(["eval", str(two_dirs[0]), "--against", str(two_dirs[1]), "--seqlen", "32", "--max-tokens", "500",
                 "--tasks", "none", "--speed", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    comparison = report["comparison"]
    assert comparison["speed_timing"].startswith("separately")
    mine, theirs = report["efficiency"], report["against"]["efficiency"]
    assert comparison["decode_speedup"] == pytest.approx(
        mine["decode"]["median_tokens_per_s"] / theirs["decode"]["median_tokens_per_s"])
    assert any("timed minutes apart" in note for note in report["notes"])


def test_speed_verdict_says_plainly_when_not_faster():
    from lorap.evaluate.render import speed_verdict

    report = {
        "model": "small",
        "against": {"model": "big"},
        "comparison": {"prefill_speedup": {"128": 0.8, "512": 1.25}, "decode_speedup": 1.0},
    }
    lines = speed_verdict(report)
    assert lines[0].startswith("prefill 128 tokens: small is NOT faster (slower) than big (0.80x")
    assert "small is faster than big (1.25x" in lines[1]
    assert "exactly as fast" in lines[2]
    assert speed_verdict({"model": "x"}) == []
