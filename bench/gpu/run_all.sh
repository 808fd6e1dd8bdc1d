#!/usr/bin/env bash
# One device call: environment, GPU tests, the engine benchmark, the training smoke run.
# Usage (on the GPU machine, repo root): OUT=/some/dir bash bench/gpu/run_all.sh [steps]
# steps: any of env tests bench smoke zoo half (default: all but zoo and half). Results land in $OUT.
# half: the half-precision GPU tests (and test_gpu.py), then bench/engine_gpu_half.py (HALF_ARGS).
# zoo: the new-op GPU tests, the torchvision registry sweep and bench/zoo_sweep.py (needs the
# av wheel on PYTHONPATH for compressed footage, see the device README).
set -u
OUT=${OUT:-/tmp/gpu_out}
mkdir -p "$OUT"
export PYTHONPATH=src PYTHONUNBUFFERED=1
STEPS=${*:-env tests bench smoke}
BENCH_ARGS=${BENCH_ARGS:---tf32x3 --profile}
T0=$(date +%s)
for s in $STEPS; do
  echo "### $s at +$(( $(date +%s) - T0 ))s"
  case $s in
    env)
      { nvidia-smi -L; python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"; } > "$OUT/env.txt" 2>&1
      cat "$OUT/env.txt" ;;
    tests)
      timeout "${TEST_TIMEOUT:-240}" python3 -m pytest -q -p no:cacheprovider tests/engine/test_gpu.py \
        2>&1 | tee "$OUT/test_gpu.log" | tail -25 ;;
    bench)
      timeout "${BENCH_TIMEOUT:-300}" python3 bench/engine_gpu.py $BENCH_ARGS --out "$OUT/engine_gpu.json" \
        2>&1 | tee "$OUT/bench.log" | tail -60 ;;
    zoo)
      timeout "${ZOO_TEST_TIMEOUT:-200}" python3 -m pytest -q -p no:cacheprovider tests/engine/test_modern_ops.py \
        tests/test_models.py 2>&1 | tee "$OUT/gpu_zoo_tests.log" | tail -5
      timeout "${ZOO_TIMEOUT:-300}" python3 bench/zoo_sweep.py --out "$OUT/zoo_sweep.json" 2> "$OUT/zoo.log"
      timeout 70 python3 bench/gpu/dense_step_profile.py --out "$OUT/dense_step_profile.json" | tail -4 ;;
    half)
      timeout "${TEST_TIMEOUT:-300}" python3 -m pytest -q -p no:cacheprovider tests/engine/test_half.py \
        tests/engine/test_gpu.py 2>&1 | tee "$OUT/gpu_half_tests.log" | tail -25
      timeout "${HALF_TIMEOUT:-300}" python3 bench/engine_gpu_half.py ${HALF_ARGS:-} \
        --out "$OUT/engine_gpu_half.json" 2>&1 | tee "$OUT/half.log" | tail -40 ;;
    smoke)
      rm -rf /tmp/gpu_smoke
      t1=$(date +%s.%N)
      timeout "${SMOKE_TIMEOUT:-200}" python3 -m deltasparse.cli train --phase delta_scratch --data synthetic \
        --device cuda --amp bf16 --epochs 2 --synthetic-videos 200 --resolution 64 --batch-size 32 \
        --out /tmp/gpu_smoke --no-progress > "$OUT/smoke.log" 2>&1
      rc=$?
      t2=$(date +%s.%N)
      python3 - "$rc" "$t1" "$t2" "$OUT" <<'PY'
import json, os, subprocess, sys
rc, t1, t2, out = int(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
import torch
d = "/tmp/gpu_smoke"
res = {
    "command": "python3 -m deltasparse.cli train --phase delta_scratch --data synthetic --device cuda "
               "--amp bf16 --epochs 2 --synthetic-videos 200 --resolution 64 --batch-size 32 "
               "--out $OUT/gpu_smoke --no-progress",
    "exit_code": rc, "wall_s": t2 - t1,
    "nvidia_smi_L": subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True).stdout.strip(),
    "torch": torch.__version__, "cuda": torch.version.cuda,
    "files": sorted(os.listdir(d)) if os.path.isdir(d) else [],
}
for name in ("eval.json", "metrics.json"):
    p = os.path.join(d, name)
    if os.path.exists(p):
        with open(p) as f:
            res[name.split(".")[0]] = json.load(f)
log = open(os.path.join(out, "smoke.log")).read()
res["log_tail"] = log[-3000:]
with open(os.path.join(out, "gpu_train_smoke.json"), "w") as f:
    json.dump(res, f, indent=1)
print("smoke rc", rc, "wall", round(t2 - t1, 1), "files", res["files"])
PY
      tail -5 "$OUT/smoke.log" ;;
  esac
done
echo "### done at +$(( $(date +%s) - T0 ))s"
