#!/usr/bin/env bash
# The --device cuda check, as one prepared command for a session lent a GPU machine (the `device` tool).
#
# That machine has torch (CUDA), transformers, safetensors, numpy, scikit-learn, scipy, peft, pyyaml, rich, pytest
# and hypothesis, but not gguf or google-re2, and nothing can be fetched there. So, here, before the call, from the
# repository root (the wheels travel in the ignored folder .whl, named in the call's `carry`):
#
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#       -d .whl gguf google-re2
#
# then:  run(command="bash bench/gpu_check.sh", carry=[".whl"], timeout_s=560)
#
# It prints the GPU, runs the fingerprint tests (tests/fingerprint/test_responses.py's
# test_fingerprint_on_cuda_matches_the_cpus runs only where CUDA is), and bench/fingerprint_speed.py on the 1.1B
# shape with the fingerprint steps on the GPU; logs go to $OUT. GPU_CHECK_PARAMS=3e8 makes the bench quicker;
# PYTHON=.venv/bin/python GPU_CHECK_DEVICE=cpu rehearses the script here, without a GPU.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$(mktemp -d)}"
PY="${PYTHON:-python3}"
if compgen -G ".whl/*.whl" > /dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
  export PYTHONPATH="/tmp/site:$PWD"
else
  export PYTHONPATH="$PWD"
fi
export PYTHONUNBUFFERED=1
"$PY" - <<'EOF' 2>&1 | tee "$OUT/device.txt"
import torch, transformers
print("torch", torch.__version__, "cuda", torch.cuda.is_available(),
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "-", "transformers", transformers.__version__)
EOF
timeout 240 "$PY" -m pytest -q -p no:cacheprovider -o addopts="" -rs tests/fingerprint 2>&1 | tee "$OUT/tests.log" \
  | tail -15
tests=$?
timeout 270 "$PY" bench/fingerprint_speed.py --skip-baseline --rounds 3 --device "${GPU_CHECK_DEVICE:-cuda}" \
  --params "${GPU_CHECK_PARAMS:-1.1e9}" 2>&1 | tee "$OUT/speed.log"
speed=$?
echo "gpu_check: tests exit $tests, speed exit $speed (logs in $OUT)"
exit $(( tests != 0 || speed != 0 ))
