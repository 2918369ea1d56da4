#!/usr/bin/env bash
# Sets everything up, then runs the demo on the built-in default model (SmolLM2-135M-Instruct):
# removes 20% of the whole model's parameters (--mode exact) with the `paper` preset (LoRAP as
# published: the default preset, and quicker to compress than `best`), saves the checkpoint to
# runs/smollm2-lorap-20, and measures perplexity before and after.
# Extra arguments go to `lorap compress` and override these (for example: --ratio 0.5 --out runs/half,
# or --preset best for lorap's most accurate preset).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/setup.sh"
cd "$root"
out=runs/smollm2-lorap-20
previous=""
for argument in "$@"; do  # the folder written, when the extra arguments name another
  if [ "$previous" = "--out" ]; then out="$argument"; fi
  case "$argument" in --out=*) out="${argument#--out=}" ;; esac
  previous="$argument"
done
echo "[run] lorap compress --preset paper --mode exact --ratio 0.2: remove 20% of the built-in model's parameters" \
     "with LoRAP as published, save to $out, then measure perplexity before and after${*:+ (extra arguments: $*)}" >&2
"$root/.venv/bin/lorap" compress --preset paper --mode exact --ratio 0.2 --out runs/smollm2-lorap-20 --overwrite --eval "$@"
cat >&2 <<EOF
[run] done. Where to go next:
  .venv/bin/lorap eval $out                    # full evaluation against the dense model
  .venv/bin/lorap compress --preset best --mode exact --ratio 0.2 --out runs/smollm2-best-20
                                               # lorap's most accurate preset (slower to compress)
  .venv/bin/lorap plan MODEL --ratio 0.2       # what a run would remove from your own model
  README.md, "Quick start" and "Which preset"; docs/getting-started.md
EOF
