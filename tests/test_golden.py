"""Golden outputs: what each preset computes on the tiny models, pinned tensor for tensor.

The hashes in tests/golden/ were recorded by this file's `--record` mode, one file per platform
(torch version and CPU capability: AVX2 and AVX512 kernels round differently). A change that alters
a compression fails here; if the change is meant, re-record every platform's file
(`.venv/bin/python tests/test_golden.py --record`, or `--record llama_gqa/serving` for one new case)
and say why in the commit message.

A case is checked against the first file that holds it, this platform's first; re-recording a case
drops it from the other platforms' files, whose recording of it no longer holds.
Exact bytes are compared where the case was recorded on this platform; elsewhere each tensor's
float64 sum and sum of squares must agree to 1e-5 of the scale rounding works at (the sum of
squares, and for the sum the tensor's norm times the square root of its size), which still
catches any changed rank, width, channel choice or factor.
"""
import hashlib
import json
import math
import sys
from pathlib import Path

import pytest
import torch

GOLDEN_FOLDER = Path(__file__).parent / "golden"
# How many threads the cases run with, when recorded and when checked: the count changes how float sums
# are split, so the exact bytes (a test runner's parallel workers may run the rest with fewer).
RECORDED_THREADS = 2
CALIBRATION = dict(calibration_samples=16, calibration_seqlen=32, batch_size=8)
PERPLEXITY = dict(dataset="wiki", seqlen=32, max_tokens=2048)
# Every architecture with the paper's method and lorap's best, factor pairs and narrowed heads; every
# preset on one GQA model. A case names a preset, or one of these settings of one.
VARIANTS = {"best-headdim": dict(preset="best", attention="headdim")}
PRESETS_ON_EVERY_ARCHITECTURE = ("paper", "best", "best-headdim")
EVERY_PRESET_ON = "llama_gqa"
# The serving preset's FFN widths are multiples of 256: the tiny FFN (160) would keep every channel.
# The head-pruning baselines: with 2 KV groups, 20% rounds to keeping both; with 4, one goes.
FOUR_GROUPS = dict(num_attention_heads=8, num_key_value_heads=4)
# ShortGPT removes whole layers: 20% of 2 layers rounds to none, of 4 to one.
MODEL_OVERRIDES = {"serving": dict(intermediate_size=1024), "wanda-sp": FOUR_GROUPS, "flap": FOUR_GROUPS,
                   "llm-pruner-l2": FOUR_GROUPS, "llm-pruner-taylor": FOUR_GROUPS, "shortgpt": dict(num_hidden_layers=4)}


def golden_cases() -> list:
    from lorap.methods.presets import METHODS
    from conftest import TINY_ARCHITECTURES

    cases = [(arch, preset) for arch in sorted(TINY_ARCHITECTURES) for preset in PRESETS_ON_EVERY_ARCHITECTURE]
    cases += [(EVERY_PRESET_ON, preset) for preset in METHODS if preset not in PRESETS_ON_EVERY_ARCHITECTURE]
    return cases


def platform() -> dict:
    return {"torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability()}


def golden_file(recorded_platform: dict) -> Path:
    name = "tiny_compressions" + ("" if recorded_platform["cpu_capability"] == "AVX2" else
                                  "." + recorded_platform["cpu_capability"].lower())
    return GOLDEN_FOLDER / f"{name}.json"


def recordings() -> list:
    """Every recorded platform's file, this platform's first where there is one."""
    found = [json.loads(path.read_text()) for path in sorted(GOLDEN_FOLDER.glob("tiny_compressions*.json"))]
    return sorted(found, key=lambda recorded: recorded["platform"] != platform())


def fingerprint(folder: Path) -> dict:
    """{tensor name: {sha256, sum, sum of squares, shape}} of every tensor a checkpoint saved."""
    from safetensors import safe_open

    tensors = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(file, "pt") as handle:
            for name in handle.keys():
                tensor = handle.get_tensor(name).contiguous()
                wide = tensor.double()
                tensors[name] = {
                    "sha256": hashlib.sha256(tensor.view(torch.uint8).numpy().tobytes()).hexdigest(),
                    "sum": wide.sum().item(),
                    "sum_squares": wide.pow(2).sum().item(),
                    "shape": list(tensor.shape),
                }
    return dict(sorted(tensors.items()))


def compress_case(arch: str, preset: str, tokenizer, root: Path) -> dict:
    from conftest import build_tiny_model
    from lorap import api

    overrides = MODEL_OVERRIDES.get(preset, {})
    source = root / (f"{arch}-dense" + "".join(f"-{key}{value}" for key, value in overrides.items()))
    if not source.exists():
        build_tiny_model(arch, vocab_size=len(tokenizer), **overrides).save_pretrained(source)
        tokenizer.save_pretrained(source)
    out = root / f"{arch}-{preset}"
    settings = VARIANTS.get(preset, dict(preset=preset))
    result = api.compress(str(source), str(out), **settings, ratio=0.2, progress=False, stream=False, **CALIBRATION)
    return {
        "tensors": fingerprint(out),
        "perplexity": api.perplexity(result.model, tokenizer, **PERPLEXITY),
        "compressed_parameters": result.report["plan"]["totals"]["compressed_parameters"],
    }


def _close(a: float, b: float, scale: float) -> bool:
    return abs(a - b) <= 1e-5 * max(scale, 1e-12)


def _same_sums(have: dict, want: dict) -> bool:
    """Sums agree to rounding: a sum that nearly cancels is judged against its tensor's norm, not itself."""
    size = math.prod(want["shape"]) or 1
    return (_close(have["sum"], want["sum"], math.sqrt(want["sum_squares"] * size))
            and _close(have["sum_squares"], want["sum_squares"], want["sum_squares"]))


@pytest.fixture(scope="module")
def golden():
    return recordings()


def recorded_case(files: list, case: str) -> tuple:
    """(the case's recording, the platform it was recorded on), from the first file that holds it."""
    for recorded in files:
        if case in recorded["cases"]:
            return recorded["cases"][case], recorded["platform"]
    raise AssertionError(f"{case} was never recorded: run `.venv/bin/python tests/test_golden.py --record {case}`")


@pytest.fixture
def recorded_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(RECORDED_THREADS)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("arch,preset", golden_cases())
def test_presets_compute_what_they_computed_when_recorded(arch, preset, golden, tiny_tokenizer, tmp_path,
                                                         recorded_threads):
    expected, recorded_on = recorded_case(golden, f"{arch}/{preset}")
    got = compress_case(arch, preset, tiny_tokenizer, tmp_path)
    assert got["compressed_parameters"] == expected["compressed_parameters"]
    assert sorted(got["tensors"]) == sorted(expected["tensors"])
    for name, want in expected["tensors"].items():
        have = got["tensors"][name]
        assert have["shape"] == want["shape"], name
    if platform() == recorded_on:
        changed = [name for name, want in expected["tensors"].items() if got["tensors"][name]["sha256"] != want["sha256"]]
        assert not changed, f"{arch}/{preset}: tensors changed: {changed[:5]}"
        assert got["perplexity"] == expected["perplexity"]
    else:
        for name, want in expected["tensors"].items():
            assert _same_sums(got["tensors"][name], want), name
        assert _close(got["perplexity"], expected["perplexity"], expected["perplexity"])


def record(only: list) -> None:
    """Re-record every case, or only the `arch/preset` cases named (merged into the file, which must have
    been recorded on this platform: a partial re-record must not mix kernels)."""
    import tempfile

    sys.path.insert(0, str(Path(__file__).parent))
    from conftest import tiny_tokenizer  # the fixture's function, called directly

    torch.set_num_threads(RECORDED_THREADS)
    tokenizer = tiny_tokenizer.__wrapped__()
    path = golden_file(platform())
    if only and not path.exists():
        sys.exit(f"{path} does not exist: record every case on this platform first")
    existing = json.loads(path.read_text()) if only else {"platform": platform(), "cases": {}}
    if existing["platform"] != platform():
        sys.exit(f"{path} was recorded on {existing['platform']}, this is {platform()}: re-record every case")
    wanted = [(arch, preset) for arch, preset in golden_cases() if not only or f"{arch}/{preset}" in only]
    unknown = set(only) - {f"{arch}/{preset}" for arch, preset in wanted}
    if unknown:
        sys.exit(f"no such golden cases: {sorted(unknown)}")
    cases = existing["cases"]
    with tempfile.TemporaryDirectory() as root:
        for arch, preset in wanted:
            cases[f"{arch}/{preset}"] = compress_case(arch, preset, tokenizer, Path(root))
            print(f"recorded {arch}/{preset}", file=sys.stderr)
    ordered = {f"{arch}/{preset}": cases[f"{arch}/{preset}"] for arch, preset in golden_cases()}
    path.write_text(json.dumps({"platform": platform(), "cases": ordered}, indent=1) + "\n")
    recorded = {f"{arch}/{preset}" for arch, preset in wanted}
    for other in GOLDEN_FOLDER.glob("tiny_compressions*.json"):
        if other != path:  # its recordings of these cases are stale now
            kept = json.loads(other.read_text())
            kept["cases"] = {case: value for case, value in kept["cases"].items() if case not in recorded}
            other.write_text(json.dumps(kept, indent=1) + "\n")


if __name__ == "__main__":
    if sys.argv[1:2] != ["--record"]:
        sys.exit("usage: python tests/test_golden.py --record [ARCH/PRESET ...]")
    record(sys.argv[2:])
