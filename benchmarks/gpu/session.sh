#!/usr/bin/env bash
# One GPU session (issue 18's figures, then a larger-budget run), on the `device` machine from the repository root:
#   device call: bash benchmarks/gpu/session.sh   with carry ["device_kit"] (benchmarks/gpu/prepare.sh made it)
# Writes results under $OUT (one tarball plus the log). Each part is time-boxed so the whole stays under ~9 min;
# the ACDC data are the 8-bit pack with training slices pre-zoomed to 128x128 (say so beside the numbers; at 256 the
# loader zooms them up, which changes nothing for the speed figures of part 1).
source benchmarks/gpu/setup.sh
python3 -c "import torch, ssmis; print('torch', torch.__version__, 'cuda', torch.version.cuda)" | tee -a "$OUT/res/gpu.txt"

log "1. throughput: bare step vs full iteration (MT, BCP, labels-only), 256x256, 12 + 12, bf16"
timeout 180 python3 benchmarks/throughput.py --device cuda --data /tmp/ACDC --iters 100 --warmup 10 \
  > "$OUT/res/throughput.txt" 2>&1; log "rc $?"

log "2. four ACDC-lite cells side by side vs one (Mean Teacher, 300 steps, no test)"
common="data.root=/tmp/ACDC train.iterations=300 train.eval_every=0 train.threads=4"
timeout 120 python3 -m ssmis train configs/acdc_lite.yaml --set method.name=mean_teacher $common \
  --out /tmp/runs/one > "$OUT/res/one.txt" 2>&1; log "one: rc $?"
for i in 1 2 3 4; do
  timeout 200 python3 -m ssmis train configs/acdc_lite.yaml --set method.name=mean_teacher seed=$i $common \
    --out /tmp/runs/four$i > "$OUT/res/four$i.txt" 2>&1 &
done; wait; log "four: done"
for r in /tmp/runs/one /tmp/runs/four*; do
  python3 -c "import json,sys; d=json.load(open('$r/train_summary.json')); print('$r', d.get('seconds'), d.get('median_step_seconds'))"
done | tee "$OUT/res/side_by_side.txt"

log "3. ACDC 5 % at the literature's batch (12 + 12) on the 128x128 slices, 2000 steps: BCP and ABD side by side"
for m in bcp abd; do
  timeout 280 python3 -m ssmis train configs/acdc_lite.yaml --set method.name=$m data.root=/tmp/ACDC split.labeled=68 \
    train.labeled_bs=12 train.unlabeled_bs=12 train.threads=8 \
    --out /tmp/runs/full_$m > "$OUT/res/full_$m.txt" 2>&1 &
done; wait; log "full: done or stopped (a stopped run's log.txt has its last validation)"
for m in bcp abd; do
  cp /tmp/runs/full_$m/log.txt "$OUT/res/full_${m}_log.txt" 2>/dev/null
  cp /tmp/runs/full_$m/eval/test-best/summary.json "$OUT/res/full_${m}_test_best.json" 2>/dev/null
done
tar czf "$OUT/results.tgz" -C "$OUT" res && log "packed"
