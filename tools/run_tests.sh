#!/usr/bin/env bash
# Set up one virtualenv per supported Megatron-Core release and run the whole test suite in each.
#   .venv     megatron-core 0.16.1, the newest wheel for Python 3.11 (+ triton, imported by Megatron-LM's
#             megatron.training through Megatron-Core's batch-invariant kernels; tests/megatron_lm)
#   .venv019  megatron-core 0.19.2 (what current GPU images get), built from its sdist: it declares Python >= 3.12
#             but runs on 3.11; its import needs triton, which it does not declare
# Both suites run even if the first fails; the exit status is non-zero if either failed.
set -uo pipefail
cd "$(dirname "$0")/.."

setup_016() {
    python3 -m venv .venv && .venv/bin/pip install -q torch==2.13.0 megatron-core==0.16.1 triton==3.9.0 &&
        .venv/bin/pip install -q -e ".[test]"
}

setup_019() {
    python3 -m venv .venv019 &&
        .venv019/bin/pip install -q torch==2.13.0 numpy "packaging>=24.2" pybind11 setuptools wheel triton==3.9.0 &&
        .venv019/bin/pip install -q --no-deps --no-build-isolation --ignore-requires-python megatron-core==0.19.2 &&
        .venv019/bin/pip install -q -e ".[test]"
}

setup_016 || { echo "setting up .venv (megatron-core 0.16.1) failed" >&2; exit 1; }
setup_019 || { echo "setting up .venv019 (megatron-core 0.19.2) failed" >&2; exit 1; }
# The cross-release checkpoint test runs each suite's interpreter against the other's.
export MEGATRON_MTP_TEST_PYTHONS="$PWD/.venv/bin/python:$PWD/.venv019/bin/python"

status=0
for venv in .venv .venv019; do
    release=$("$venv/bin/python" -c "import megatron.core; print(megatron.core.__version__.split('+')[0])")
    echo "=== megatron-core $release ($venv) ==="
    start=$SECONDS
    "$venv/bin/python" -m pytest -q -p no:warnings || status=1
    echo "=== megatron-core $release: suite took $((SECONDS - start)) s ==="
done
exit $status
