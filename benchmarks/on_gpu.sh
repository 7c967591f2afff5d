#!/usr/bin/env bash
# One call on a lent GPU machine (DEVELOPERS.md, "On a GPU"): the CUDA tests, then the suite with
# CUDA tensors, then the whole test suite with CUDA visible, each capped so the call ends in time.
#
#   benchmarks/on_gpu.sh OUT [DEPS]
#
# OUT receives versions.txt, cuda_tests.log, suite.log, cuda.json (rewritten after every part of a
# suite, so a run cut short keeps what it measured) and tests.log.  DEPS (default .device) holds
# what the machine lacks: whl/ (optree wheels for its Python), nyto11/ (pip install --target of
# nytorch 1.1) and td/ (of tensordict), all optional.  Settable: DEVICE (default cuda), SUITES
# (names, as for --only), SIZES (commas between, as for --sizes), QUICK (non-empty: --quick), the
# caps CUDA_TESTS_S, SUITE_S and TESTS_S (seconds; 0 skips the tests), and WORKERS (pytest -n).
# DEVICE=cpu runs the same steps here, to try the script without a GPU.
set -u
out=${1:?usage: benchmarks/on_gpu.sh OUT [DEPS]}
deps=$(cd "${2:-.device}" 2>/dev/null && pwd) || deps=/nonexistent
device=${DEVICE:-cuda}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
site=$(mktemp -d)
trap 'rm -rf "$site"' EXIT
if compgen -G "$deps/whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" "$deps"/whl/*.whl || exit 1
fi
export PYTHONPATH="$PWD:$site${PYTHONPATH:+:$PYTHONPATH}"
[ -d "$deps/td" ] && export PYTHONPATH="$PYTHONPATH:$deps/td"
[ -d "$deps/nyto11/nytorch" ] && export NYTORCH11_PATH="$deps/nyto11"

python3 - <<'EOF' 2>&1 | tee "$out/versions.txt"
import importlib, platform, torch
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda,
      "gpu", torch.cuda.get_device_name() if torch.cuda.is_available() else "none")
for name in ("optree", "numpy", "tensordict", "hypothesis"):
    try:
        print(name, importlib.import_module(name).__version__)
    except ImportError as error:
        print(name, "missing:", error)
EOF
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem,driver_version \
    --format=csv | tee -a "$out/versions.txt"

if [ "${CUDA_TESTS_S:-90}" != 0 ]; then
    echo "== CUDA tests"
    timeout "${CUDA_TESTS_S:-90}" python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py \
        "tests/test_particle.py::test_cuda_mixed_dtypes_and_devices" 2>&1 | tee "$out/cuda_tests.log" | tail -15
fi

echo "== suite on $device"
picked=()  # SIZES: model sizes separated by commas, as for --sizes ("many-small,wide")
[ -n "${SIZES:-}" ] && IFS=, read -ra sizes <<<"$SIZES" && picked=(--sizes "${sizes[@]}")
[ -n "${QUICK:-}" ] && picked+=(--quick)
# shellcheck disable=SC2086  # SUITES is a list of names
timeout "${SUITE_S:-330}" python3 -m benchmarks --device "$device" --only ${SUITES:-bench_core bench_swarm bench_memory} \
    "${picked[@]}" --keep-going --json "$out/$device.json" >"$out/suite.log" 2>&1
echo "suite exit status $?"
tail -25 "$out/suite.log"

[ "${TESTS_S:-100}" = 0 ] && exit 0
echo "== every test, CUDA visible"
parallel=()  # pytest-xdist where it is installed
python3 -c "import xdist" 2>/dev/null && parallel=(-n "${WORKERS:-8}")
timeout "${TESTS_S:-100}" python3 -m pytest -q --maxfail=20 -p no:cacheprovider "${parallel[@]}" 2>&1 \
    | tee "$out/tests.log" | tail -8
