"""Are two checkpoints tensor-for-tensor identical? For refactors that must not change any output.

    .venv/bin/python benchmarks/same_checkpoint.py OLD_DIR NEW_DIR

Prints each tensor that differs (or exists on one side only) and exits 1 if any does. To check a
refactor on the real default model, compress with the old and the new tree, same settings:
    PYTHONPATH=OLD_CHECKOUT/src .venv/bin/lorap compress --preset best --ratio 0.2 --out /tmp/old
    .venv/bin/lorap compress --preset best --ratio 0.2 --out /tmp/new
"""
import hashlib
import sys
from pathlib import Path

import torch
from safetensors import safe_open


def tensor_hashes(folder: Path) -> dict:
    hashes = {}
    for file in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(file, "pt") as handle:
            for name in handle.keys():
                data = handle.get_tensor(name).contiguous().view(torch.uint8).numpy().tobytes()
                hashes[name] = hashlib.sha256(data).hexdigest()
    return hashes


def main() -> int:
    if len(sys.argv) != 3:
        print(__doc__, file=sys.stderr)
        return 2
    old, new = (tensor_hashes(Path(arg)) for arg in sys.argv[1:])
    differing = sorted(name for name in old.keys() | new.keys() if old.get(name) != new.get(name))
    for name in differing:
        print(f"differs: {name}")
    print(f"{len(old)} and {len(new)} tensors; {len(differing)} differ")
    return 1 if differing or not old else 0


if __name__ == "__main__":
    sys.exit(main())
