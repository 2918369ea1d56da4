#!/usr/bin/env bash
# Sets everything up, then runs the whole test suite (tiny models and the real default model), on both
# cores (pytest-xdist; each worker takes its share of the threads, tests/conftest.py; an idle worker
# takes tests queued for the other, as test times range from milliseconds to seconds).
#   bash scripts/test.sh            everything, as CI runs it (.ci/run)
#   bash scripts/test.sh --quick    the tiny-model tests alone (-m "not slow"), without building
#                                   llama.cpp; the GGUF-in-llama.cpp tests run only if the binding is
#                                   already installed
# Any other arguments go to pytest.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
quick=0
args=()
for argument in "$@"; do
  if [ "$argument" = "--quick" ]; then quick=1; else args+=("$argument"); fi
done
bash "$root/scripts/setup.sh"
cd "$root"
if [ "$quick" = 1 ]; then
  exec "$root/.venv/bin/python" -m pytest -m "not slow" -n 2 --dist worksteal ${args[@]+"${args[@]}"}
fi
# The llama.cpp binding, so that the tests run exported GGUF files in llama.cpp itself. It compiles
# llama.cpp (about 10 minutes on 2 cores, once per .venv); lorap does not need it otherwise. The
# multimodal library is left out of the build: nothing here uses it.
if ! .venv/bin/python -c "import llama_cpp" 2>/dev/null; then
  echo "[test] building llama-cpp-python (compiles llama.cpp, about 10 minutes, once)" >&2
  CMAKE_ARGS="-DLLAVA_BUILD=OFF" .venv/bin/python -m pip install -q --disable-pip-version-check \
    -c constraints.txt "llama-cpp-python"
fi
export LORAP_REQUIRE_LLAMACPP=1  # tests/test_export_llamacpp.py fails, not skips, without the binding
exec "$root/.venv/bin/python" -m pytest -n 2 --dist worksteal ${args[@]+"${args[@]}"}
