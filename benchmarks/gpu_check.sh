#!/usr/bin/env bash
# One prepared GPU check for kanimg (about 5 minutes on one recent GPU, at most 8):
#   1. the CUDA tests: Triton kernels compiled on CUDA against Cox–de Boor, the layer on the
#      Triton path, torch.compile with the kernel inside;
#   2. ms/step, saved bytes and peak memory per sample of the paper network at batch 4,096 and
#      65,536: fused (Triton), PyTorch path, compiled, TF32, bf16, against a ReLU MLP of equal
#      parameters and the matmul floor; and at batch 4,096 the PSNR each costs after 2,000 steps;
#   3. the wall time of a bare `kanimg fit` of the bundled photograph.
# Writes JSON and logs under OUT (default benchmarks/results/gpu):
#     bash benchmarks/gpu_check.sh [OUT]
set -uo pipefail
OUT="${1:-benchmarks/results/gpu}"
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'gpu_check: PyTorch sees no CUDA GPU here')" || exit 2
# a machine with no package registry: install what is missing by hand (or put kanimg on PYTHONPATH) first
python -c "import kanimg, png, constriction" 2>/dev/null ||
    python -m pip install -q -e ".[test]" > "$OUT/install.log" 2>&1 || { echo "gpu_check: install failed (see $OUT/install.log)"; exit 2; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.txt" 2>&1
status=0

echo "== CUDA tests"
timeout 150 python -m pytest -q tests/test_triton_kan.py 2>&1 | tee "$OUT/tests.log" | tail -5
[ "${PIPESTATUS[0]}" = 0 ] || status=1

echo "== step time, batch 4,096 (+ PSNR after 2,000 steps)"
timeout 200 python benchmarks/bench_kan.py --device cuda --threads 8 --batch 4096 --psnr-steps 2000 \
    --json "$OUT/bench_kan_4096.json" 2>&1 | tee "$OUT/bench_4096.log" | grep -v Warning
[ "${PIPESTATUS[0]}" = 0 ] || status=1

echo "== step time, batch 65,536"
timeout 120 python benchmarks/bench_kan.py --device cuda --threads 8 --batch 65536 --rounds 8 \
    --json "$OUT/bench_kan_65536.json" 2>&1 | tee "$OUT/bench_65536.log" | grep -v Warning
[ "${PIPESTATUS[0]}" = 0 ] || status=1

echo "== bare kanimg fit"
start=$(date +%s.%N)
timeout 120 python -m kanimg fit -o "$OUT/fit" --force -q 2>&1 | tee "$OUT/fit.log"
fit_status=${PIPESTATUS[0]}
end=$(date +%s.%N)
python - "$OUT" "$start" "$end" "$fit_status" <<'EOF'
import json, sys
from pathlib import Path
out, start, end, code = Path(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4])
metrics = json.loads((out / "fit" / "metrics.json").read_text()) if code == 0 else {}
summary = {"exit_code": code, "wall_seconds": round(end - start, 1), "train_seconds": metrics.get("train_seconds"),
           "psnr": metrics.get("metrics", {}).get("psnr"), "steps": metrics.get("steps_done"),
           "batch_size": metrics.get("config", {}).get("train", {}).get("batch_size")}
(out / "fit.json").write_text(json.dumps(summary, indent=2))
print(json.dumps(summary))
EOF
[ "$fit_status" = 0 ] || status=1
echo "gpu_check: done (status $status); results in $OUT"
exit $status
