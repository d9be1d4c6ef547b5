#!/usr/bin/env bash
# Prepare the GPU machine's kit (run here, before a `device` call): the wheels its image lacks and ACDC packed to
# one file with 8-bit images and the training slices pre-zoomed to 128x128 as the ACDC-lite loader would (about
# 28 MB: the device call carries at most 64 MiB with the repository, and the whole pack is 52 MB; say "8-bit,
# pre-zoomed" beside numbers made from it), into device_kit/ (git-ignored through
# .git/info/exclude; pass `carry: ["device_kit"]` to the device call). Then run benchmarks/gpu/session.sh there.
#   bash benchmarks/gpu/prepare.sh [../shared/data/ACDC]
set -euo pipefail
cd "$(dirname "$0")/../.."
src=${1:-../shared/data/ACDC}
tools=../shared/tools/device
py=.venv/bin/python; [ -x "$py" ] || py=python3      # pack_h5.py needs h5py: the repository's environment
mkdir -p device_kit/wheels
grep -qx "device_kit" .git/info/exclude 2>/dev/null || echo "device_kit" >> .git/info/exclude
bash "$tools/wheels.sh" device_kit/wheels > /dev/null
cp "$tools/unpack_h5.py" device_kit/
if [ ! -f device_kit/acdc.lzma ]; then      # written under another name first: an interrupted pack is never reused
  "$py" "$tools/pack_h5.py" "$src" device_kit/acdc.lzma.part --resize 128 && mv device_kit/acdc.lzma.part device_kit/acdc.lzma
fi
du -sh device_kit
git ls-files -z | xargs -0 du -cb | tail -1 | awk '{printf "tracked files: %.1f MiB (with device_kit at most 64 MiB)\n", $1 / 2^20}'
