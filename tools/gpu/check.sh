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
set -uo pipefail
cd "$(dirname "$0")/../.."

results="${1:-${OUT:-target/gpu-check}}"
mkdir -p "$results"
python="${PYTHON:-python3}"
runs=5
warmup=2

bin="${SDXL_BIN:-target/gpu/sdxl}"
if [[ ! -x "$bin" && -e target/gpu/sdxl.gz ]]; then
    bin=/tmp/sdxl-gpu
    gunzip -c target/gpu/sdxl.gz >"$bin" && chmod +x "$bin"
fi
[[ -x "$bin" ]] || { echo "no binary: run tools/gpu/build.sh first (or set SDXL_BIN)"; exit 1; }

# cuBLAS, cuRAND, NVRTC and the CUDA runtime (CUDA 13): a system toolkit's, or the NVIDIA wheels
# PyTorch brings.
wheel_libs=$("$python" - <<'EOF' 2>/dev/null
import glob, os, sys
dirs = set()
for root in sys.path:
    dirs.update(glob.glob(os.path.join(root, "nvidia", "*", "lib")))
print(":".join(sorted(dirs)))
EOF
)
export LD_LIBRARY_PATH="${wheel_libs:+$wheel_libs:}/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}"
if ldd "$bin" | grep -q "not found"; then
    echo "the binary's libraries are missing:"; ldd "$bin" | grep "not found"; exit 1
fi

gpu=$(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | head -1)
echo "== $gpu"
nvidia-smi >"$results/nvidia-smi.txt" 2>&1

status=0
for dtype in f32 f16; do
    echo "== parity, cuda, $dtype"
    "$python" tools/gpu/parity.py --sdxl "$bin" --device cuda --dtype "$dtype" | tee "$results/parity-$dtype.txt" | tail -1
    [[ ${PIPESTATUS[0]} -eq 0 ]] || status=1
done

components=(--component image_4step --component unet_step --component vae_decode --resolution 1024)
echo "== sdxl bench, cuda, f16"
"$bin" bench --device cuda --dtype f16 "${components[@]}" --runs $runs --warmup $warmup --json \
    | tee "$results/sdxl-bench.jsonl"

wheels="${SDXL_WHEELS:-.whl}"
if ! "$python" -c "import diffusers" 2>/dev/null && ls "$wheels"/*.whl >/dev/null 2>&1; then
    "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/sdxl-site \
        "$wheels"/*.whl && export PYTHONPATH="/tmp/sdxl-site${PYTHONPATH:+:$PYTHONPATH}"
fi
if "$python" -c "import torch, diffusers, transformers" 2>/dev/null; then
    echo "== diffusers/PyTorch, cuda, float16"
    "$python" tools/bench/torch_reference.py --device cuda --dtype float16 "${components[@]}" \
        --runs $runs --warmup $warmup --threads "$(nproc)" --json | tee "$results/torch-bench.jsonl"
else
    echo "== diffusers/PyTorch: not installed here, skipped"
fi

"$python" - "$results" "$gpu" <<'EOF' | tee "$results/summary.txt"
import json, sys
from pathlib import Path
results, gpu = Path(sys.argv[1]), sys.argv[2]
def load(name):
    path = results / name
    if not path.exists():
        return {}
    lines = [json.loads(line) for line in path.read_text().splitlines() if line.startswith("{")]
    return {(m["component"], m["resolution"]): m["median_s"] for m in lines}
ours, torch = load("sdxl-bench.jsonl"), load("torch-bench.jsonl")
print(f"\n{gpu}; f16 (VAE in f32), median of the timed runs")
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
