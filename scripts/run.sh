#!/usr/bin/env bash
# Sets everything up, then runs the main job on the built-in default model (SmolLM2-135M):
# compress 20% of its parameters with LoRAP, save it to runs/, and measure perplexity before and after.
# Extra arguments go to `lorap compress` (for example: --ratio 0.5 --out runs/half).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/setup.sh"
cd "$root"
exec "$root/.venv/bin/lorap" compress --ratio 0.2 --out runs/smollm2-lorap-20 --overwrite --eval "$@"
