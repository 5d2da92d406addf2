#!/usr/bin/env bash
# The GPU check, for a machine with an NVIDIA GPU and its driver but no Rust toolchain: run it
# from the repository root there, with the binary tools/gpu/build.sh made (target/gpu/sdxl, or
# target/gpu/sdxl.gz, the compressed copy that is smaller to carry).
#
#   tools/gpu/check.sh [RESULTS_DIR]      (default: $OUT where set, else target/gpu-check)
#
# 1. the tiny-model parity cases on the GPU (tools/gpu/parity.py): f32 at the CPU's bounds,
#    f16 at its looser one (docs/gpu.md);
# 2. `sdxl bench --device cuda` on the full-size architecture with random weights, f16: a
#    4-step 1024² image, one UNet step, one VAE decode;
# 3. the same through diffusers/PyTorch fp16 (tools/bench/torch_reference.py), when torch,
#    diffusers and transformers import (wheels in $SDXL_WHEELS, default .whl, are installed
#    first where diffusers is missing);
# 4. a table of both, last.
# About 3–5 minutes on an H200. Exits 1 if a parity case fails or the binary cannot run.
#
# SDXL_CHECK_DEVICE=cpu SDXL_CHECK_RESOLUTION=256 runs the same steps on the CPU in f32, small,
# to try the script itself on a machine without a GPU.
set -uo pipefail
cd "$(dirname "$0")/../.." || exit 1

results="${1:-${OUT:-target/gpu-check}}"
mkdir -p "$results"
python="${PYTHON:-python3}"
device="${SDXL_CHECK_DEVICE:-cuda}"
resolution="${SDXL_CHECK_RESOLUTION:-1024}"
runs=5
warmup=2
if [[ "$device" == cpu ]]; then
    dtype=f32 torch_dtype=float32 parity_dtypes=(f32) runs=1 warmup=1
else
    dtype=f16 torch_dtype=float16 parity_dtypes=(f32 f16)
fi

bin="${SDXL_BIN:-target/gpu/sdxl}"
if [[ ! -x "$bin" && -e target/gpu/sdxl.gz ]]; then
    bin=/tmp/sdxl-gpu
    gunzip -c target/gpu/sdxl.gz >"$bin" && chmod +x "$bin"
fi
[[ -x "$bin" ]] || { echo "no binary: run tools/gpu/build.sh first (or set SDXL_BIN)"; exit 1; }

# cuBLAS, cuRAND and the CUDA runtime (CUDA 13): a system toolkit's, or the NVIDIA wheels
# PyTorch brings; the driver's libcuda where container runtimes mount it.
wheel_libs=$("$python" - <<'EOF' 2>/dev/null
import glob, os, sys
dirs = set()
for root in sys.path:
    dirs.update(glob.glob(os.path.join(root, "nvidia", "*", "lib")))
print(":".join(sorted(dirs)))
EOF
)
export LD_LIBRARY_PATH="${wheel_libs:+$wheel_libs:}/usr/local/cuda/lib64:/usr/local/nvidia/lib64:${LD_LIBRARY_PATH:-}"
if ldd "$bin" | grep -q "not found"; then
    echo "the binary's libraries are missing:"; ldd "$bin" | grep "not found"; exit 1
fi

if [[ "$device" == cpu ]]; then
    machine="CPU: $(nproc) threads"
else
    machine=$(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | head -1)
    nvidia-smi >"$results/nvidia-smi.txt" 2>&1
fi
echo "== $machine"

status=0
for parity_dtype in "${parity_dtypes[@]}"; do
    echo "== parity, $device, $parity_dtype"
    "$python" tools/gpu/parity.py --sdxl "$bin" --device "$device" --dtype "$parity_dtype" \
        | tee "$results/parity-$parity_dtype.txt" | tail -1
    [[ ${PIPESTATUS[0]} -eq 0 ]] || status=1
done

components=(--component image_4step --component unet_step --component vae_decode --resolution "$resolution")
echo "== sdxl bench, $device, $dtype"
"$bin" bench --device "$device" --dtype "$dtype" "${components[@]}" --runs $runs --warmup $warmup --json \
    | tee "$results/sdxl-bench.jsonl"
[[ ${PIPESTATUS[0]} -eq 0 ]] || status=1

wheels="${SDXL_WHEELS:-.whl}"
if ! "$python" -c "import diffusers" 2>/dev/null && ls "$wheels"/*.whl >/dev/null 2>&1; then
    "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/sdxl-site \
        "$wheels"/*.whl && export PYTHONPATH="/tmp/sdxl-site${PYTHONPATH:+:$PYTHONPATH}"
fi
if "$python" -c "import torch, diffusers, transformers" 2>/dev/null; then
    echo "== diffusers/PyTorch, $device, $torch_dtype"
    "$python" tools/bench/torch_reference.py --device "$device" --dtype "$torch_dtype" "${components[@]}" \
        --runs $runs --warmup $warmup --threads "$(nproc)" --json | tee "$results/torch-bench.jsonl"
else
    echo "== diffusers/PyTorch: not installed here, skipped"
fi

"$python" - "$results" "$machine" "$dtype" <<'EOF' | tee "$results/summary.txt"
import json, sys
from pathlib import Path
results, machine, dtype = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
def load(name):
    path = results / name
    if not path.exists():
        return {}
    lines = [json.loads(line) for line in path.read_text().splitlines() if line.startswith("{")]
    return {(m["component"], m["resolution"]): m["median_s"] for m in lines}
ours, torch = load("sdxl-bench.jsonl"), load("torch-bench.jsonl")
print(f"\n{machine}; {dtype} (VAE in f32), median of the timed runs")
print(f"{'component':<13} {'size':>6} {'sdxl s':>9} {'diffusers s':>12} {'diffusers/sdxl':>15}")
for key, s in ours.items():
    t = torch.get(key)
    print(f"{key[0]:<13} {str(key[1]) + '²':>6} {s:>9.4f} {f'{t:.4f}' if t else '-':>12} "
          f"{f'{t / s:.2f}' if t else '-':>15}")
for name in ("f32", "f16"):
    path = results / f"parity-{name}.txt"
    lines = path.read_text().strip().splitlines() if path.exists() else []
    print(lines[-1] if lines else f"parity {name}: no result")
EOF
exit $status
