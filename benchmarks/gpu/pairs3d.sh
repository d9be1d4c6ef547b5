#!/usr/bin/env bash
# One GPU session for the 3D cells a CPU cannot finish in a session (issue 20: C3S3 3D is ~6 h at one CPU thread),
# on the `device` machine from the repository root, after benchmarks/gpu/prepare.sh made device_kit/ here:
#   device call: bash benchmarks/gpu/pairs3d.sh   with carry ["device_kit"], timeout ~560 s
# Trains labels-only, Mean Teacher, C3S3 and MEDL on ACDC-3D (configs/acdc3d.yaml, 400 steps, seed 0) side by side
# on the one GPU, so the four are comparable with each other: the data are the 8-bit pack with the training slices
# pre-zoomed to 128x128 (say "8-bit, pre-zoomed" beside the numbers; the CPU cells in benchmarks/results/acdc3d read
# the original files). Writes each cell folder without checkpoints, and the logs, to $OUT/res.
source benchmarks/gpu/setup.sh
[ -e ../shared/data/ACDC ] || { mkdir -p ../shared/data && ln -s /tmp/ACDC ../shared/data/ACDC; }   # the configs' data.root
log "ACDC-3D cells, four side by side"
for job in "acdc3d supervised-l136-s0" "acdc3d mean_teacher-l136-s0" "acdc3d_pairs c3s3-l136-s0" "acdc3d_pairs medl-l136-s0"; do
  set -- $job
  timeout 480 python3 -m ssmis bench benchmarks/$1.yaml --out /tmp/gpu/$1 --only $2 --threads 4 \
    > "$OUT/res/$2.txt" 2>&1 &
done; wait; log "cells done or stopped (a stopped cell's log.txt has its last validation)"
tar czf "$OUT/cells.tgz" --exclude=checkpoints -C /tmp gpu && log "packed"
