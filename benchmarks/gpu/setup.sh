# Sourced by the GPU session scripts (from the repository root on the `device` machine): $OUT/res, `log`, the kit's
# wheels on PYTHONPATH, ACDC unpacked to /tmp/ACDC, and the GPU's name in $OUT/res/gpu.txt.
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT/res"
log() { echo "== $(date +%T) $*" | tee -a "$OUT/res/session.log"; }
python3 -m pip install -q --no-index --no-deps --target .site device_kit/wheels/*.whl
export PYTHONPATH=$PWD/.site:$PWD/src
python3 device_kit/unpack_h5.py device_kit/acdc.lzma /tmp/ACDC > /dev/null
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/res/gpu.txt"
