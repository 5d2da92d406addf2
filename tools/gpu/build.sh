#!/usr/bin/env bash
# Builds `sdxl` with CUDA support on a machine with no GPU and no system CUDA toolkit: the
# CUDA compiler, headers and libraries come from NVIDIA's wheels on PyPI, installed into
# target/cuda-toolkit (nothing is installed system-wide).
#
#   tools/gpu/build.sh            release binary → target/gpu/sdxl (stripped) and sdxl.gz, for
#                                 tools/gpu/check.sh on the GPU machine
#   tools/gpu/build.sh --check    type-check the `cuda` and `cudnn` features only (what CI runs),
#                                 in the shared target/ (host build scripts and proc-macros are
#                                 the CPU build's; the CUDA-feature units hash apart from it)
#   … --toolkit-only              install that mode's toolkit and stop (CI fetches it early)
#
# Environment:
#   CUDA_COMPUTE_CAP     GPU architecture the kernels are compiled for (default 90: H100/H200;
#                        80 for A100, 89 for L4/L40/RTX 4090). PTX is JIT-compiled forward, so
#                        a binary for 80 also runs on newer cards, a little slower to start.
#   SDXL_CUDA_FEATURES   cargo features (default `cuda`; add `cudnn` for cuDNN convolutions,
#                        `flash-attn` for flash attention: see docs/gpu.md for what they need)
#
# The toolkit is CUDA 13.0, the version of the driver's CUDA on the machines the check targets:
# PTX from a newer compiler would not load on an older driver.
set -euo pipefail
cd "$(dirname "$0")/../.."

mode=build
toolkit_only=false
for arg in "$@"; do
    case "$arg" in
        --check) mode=check ;;
        --toolkit-only) toolkit_only=true ;;
        *) echo "usage: $0 [--check] [--toolkit-only]" >&2; exit 2 ;;
    esac
done

toolkit="$PWD/target/cuda-toolkit"
cuda_home="$toolkit/python/nvidia/cu13"
# (the type-check covers cuDNN's code too: it needs no cuDNN library, only a link would)
default_features=cuda
[[ "$mode" == check ]] && default_features="cuda cudnn"
features="${SDXL_CUDA_FEATURES:-$default_features}"
export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}"
# candle's kernel build runs nvcc on half the cores unless told otherwise; nothing else is
# compiling by then
export CUDAFORGE_THREADS="${CUDAFORGE_THREADS:-$(nproc)}"

# Compiler and headers; the libraries only where a binary is linked.
packages=(
    nvidia-cuda-nvcc==13.0.88 nvidia-nvvm==13.0.88 nvidia-cuda-crt==13.0.88
    nvidia-cuda-runtime==13.0.96 nvidia-cuda-cccl==13.0.85
)
if [[ "$mode" == build ]]; then
    packages+=(nvidia-cublas==13.1.0.3 nvidia-curand==10.4.0.35 nvidia-cuda-nvrtc==13.0.88)
    [[ "$features" == *cudnn* ]] && packages+=(nvidia-cudnn-cu13==9.13.0.50)
fi

stamp="$toolkit/installed-${mode}-$(echo "${packages[*]}" | sha1sum | cut -c1-12)"
if [[ ! -e "$stamp" ]]; then
    echo "== installing the CUDA toolkit from PyPI into $toolkit"
    python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore --no-deps --only-binary=:all: \
        --upgrade --target "$toolkit/python" "${packages[@]}"
    touch "$stamp"
fi
$toolkit_only && exit 0

export CUDA_HOME="$cuda_home" PATH="$cuda_home/bin:$PATH"
nvcc --version | tail -2

# The wheels ship versioned shared libraries only; the linker looks for the unversioned names.
for lib in "$cuda_home"/lib/lib*.so.[0-9]*; do
    base="${lib%%.so.*}.so"
    [[ -e "$base" ]] || ln -s "$(basename "$lib")" "$base"
done

target_dir=target/cuda
if [[ "$mode" == check ]]; then
    echo "== cargo check --features $features"
    cargo check --locked --workspace --all-targets --features "$features"
    exit 0
fi

# The driver library (libcuda.so.1) comes with the NVIDIA driver on the machine that runs the
# binary; to link here, a stub that defines the driver API's names is made from the bindings
# the binary calls. Like the toolkit's own lib/stubs/libcuda.so, every function answers
# CUDA_ERROR_STUB_LIBRARY (34) should the stub ever be loaded.
stub="$cuda_home/lib/stubs/libcuda.so"
if [[ ! -e "$stub" ]]; then
    cudarc=$(cargo metadata --locked --all-features --format-version 1 | python3 -c '
import json, sys
meta = json.load(sys.stdin)
print(next(p["manifest_path"] for p in meta["packages"] if p["name"] == "cudarc").rsplit("/", 1)[0])')
    mkdir -p "$(dirname "$stub")"
    grep -oE '^pub unsafe fn cu[A-Za-z0-9_]+' "$cudarc/src/driver/sys/mod.rs" | awk '{print $4}' | sort -u | awk '{print "int " $1 "(void) { return 34; }"}' \
        > "$toolkit/libcuda-stub.c"
    cc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$stub" "$toolkit/libcuda-stub.c"
fi

echo "== cargo build --release --features $features (compute capability $CUDA_COMPUTE_CAP)"
cargo build --locked --release --target-dir "$target_dir" -p sdxl-cli --features "$features"

mkdir -p target/gpu
cp "$target_dir/release/sdxl" target/gpu/sdxl
strip target/gpu/sdxl
gzip -9 -c target/gpu/sdxl >target/gpu/sdxl.gz
echo "== target/gpu/sdxl ($(du -h target/gpu/sdxl | cut -f1); sdxl.gz $(du -h target/gpu/sdxl.gz | cut -f1)); needs at run time:"
ldd target/gpu/sdxl | grep -E "cuda|cublas|curand|nvrtc|cudnn" || true
