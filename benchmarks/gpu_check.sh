#!/usr/bin/env bash
# GPU check: the step benchmarks (score, f-distill, DPO, digits U-Net) on one GPU, with MFU.
#
#     bash benchmarks/gpu_check.sh            # from anywhere; results in benchmarks/gpu_results/
#
# 1. Installs the CUDA build of JAX at the installed JAX version (JAX_CUDA_EXTRA=cuda13 for CUDA 13
#    drivers; SKIP_INSTALL=1, or a JAX that already sees a GPU, skips the install: offline machines).
# 2. Runs benchmarks/step_throughput.py --sizes gpu for the score, f-distill and DPO steps in float32
#    (TF32 matmuls under JAX's default precision) and, in bfloat16, the same steps plus the digits
#    U-Net score step. Each row prints MFLOP/step (XLA cost analysis), steps/s, achieved GFLOP/s, the
#    fraction of a same-run 8192^2 matmul, and MFU = achieved FLOP/s / the GPU's dense peak for the
#    dtype (PEAK_TFLOPS in step_throughput.py: H100/H200 SXM 989 bf16, 494 TF32; A100 312 / 156;
#    override with PEAK_BF16=<TFLOP/s> PEAK_FP32=<TFLOP/s> for other GPUs).
# 3. Times the CIFAR-10-size f-distill step (ml_collections_configs/cifar10_fdistill.py on random
#    images, benchmarks/fsdp_memory.py --device) in bfloat16: steps/s, MFU, memory per device.
# 4. Prints the GPU model and writes everything to benchmarks/gpu_results/ (JSON + the log) for
#    benchmarks/RESULTS.md.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-benchmarks/gpu_results}"
SECONDS_PER_ROW="${SECONDS_PER_ROW:-5}"
mkdir -p "$OUT"
exec > >(tee "$OUT/gpu_check.log") 2>&1

echo "== $(date -u +%FT%TZ) $(hostname)"
if command -v nvidia-smi >/dev/null; then
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
else
  echo "nvidia-smi not found: is this a GPU machine?" >&2
fi

has_gpu() { python - <<'EOF' 2>/dev/null
import jax, sys
sys.exit(0 if any(d.platform == "gpu" for d in jax.devices()) else 1)
EOF
}

if [[ "${SKIP_INSTALL:-0}" != "1" ]] && ! has_gpu; then
  JAX_VERSION="$(python -c 'import jax; print(jax.__version__)')"
  EXTRA="${JAX_CUDA_EXTRA:-cuda12}"
  echo "== installing jax[$EXTRA]==$JAX_VERSION"
  pip install -U "jax[$EXTRA]==$JAX_VERSION" || pip install -U "jax[$EXTRA]"
  pip install -e . >/dev/null
fi
unset JAX_PLATFORMS XLA_FLAGS  # one real device, no simulated CPU devices
if ! has_gpu; then
  echo "JAX sees no GPU: $(python -c 'import jax; print(jax.devices())')" >&2
  exit 1
fi
python -c 'import jax; d = jax.devices()[0]; print(f"== JAX {jax.__version__} on {d.device_kind} ({d.platform}), {jax.device_count()} device(s)")'

peak() {  # --peak_tflops for a dtype: PEAK_BF16 / PEAK_FP32 overrides, else the known-GPU table
  local v="$1"
  if [[ -n "$v" ]]; then echo "$v"; else echo auto; fi
}

echo "== (a) steps in float32 (TF32 matmuls)"
python benchmarks/step_throughput.py --steps score,distill,po --sizes gpu --dtype float32 \
  --seconds "$SECONDS_PER_ROW" --peak_tflops "$(peak "${PEAK_FP32:-}")" --json "$OUT/float32.json"

echo "== (a) steps and the digits U-Net step in bfloat16"
python benchmarks/step_throughput.py --steps score,distill,po,unet --sizes gpu --dtype bfloat16 \
  --seconds "$SECONDS_PER_ROW" --peak_tflops "$(peak "${PEAK_BF16:-}")" --json "$OUT/bfloat16.json"

echo "== (b) the CIFAR-10-size f-distill step (fdistill/placement, 82.8M-parameter U-Nets) in bfloat16"
python benchmarks/fsdp_memory.py --device --dtype bfloat16 --batch "${CIFAR_BATCH:-64}" \
  --seconds "$SECONDS_PER_ROW" --json "$OUT/cifar10_fdistill_bf16.json"

echo "== done: $OUT/gpu_check.log, $OUT/float32.json, $OUT/bfloat16.json, $OUT/cifar10_fdistill_bf16.json"
