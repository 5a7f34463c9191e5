#!/usr/bin/env bash
# Builds the `cuda` feature on a machine without a GPU or a system CUDA toolkit: nvcc 13.0 and the
# CUDA libraries come from PyPI wheels in a throwaway venv, and a stub libcuda.so (the driver
# library, present only where a GPU is) satisfies the linker. The binary it produces runs where
# the NVIDIA driver and the CUDA 13 libraries are installed.
#   scripts/check-cuda-build.sh [target-dir]      (default: target/cuda)
# It also builds the CUDA test binary (tests/cuda.rs) and prints its path; with NCCL=1, also the
# NCCL smoke test (tests/nccl.rs, `--features nccl`: Open MPI's libmpi must be installed).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
target="${1:-$root/target/cuda}"
venv="${CUDA_VENV:-/tmp/peft-cuda-venv}"
if [ ! -x "$venv/bin/pip" ]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q "nvidia-cuda-nvcc==13.0.*" "nvidia-cuda-crt==13.0.*" "nvidia-nvvm==13.0.*" \
    "nvidia-cuda-runtime==13.0.*" "nvidia-cuda-cccl==13.0.*" "nvidia-cuda-nvrtc==13.0.*" \
    "nvidia-cublas==13.0.*" nvidia-curand
fi
if [ "${NCCL:-0}" = 1 ] && ! "$venv/bin/python" -c 'import nvidia.nccl' 2>/dev/null; then
  "$venv/bin/pip" install -q nvidia-nccl-cu13
fi
cuda="$("$venv/bin/python" -c 'import nvidia, os; print(os.path.join(list(nvidia.__path__)[0], "cu13"))')"
stub="$target/cuda-link-stubs"
mkdir -p "$stub"
# Every driver-API symbol cudarc can call; generated from cudarc's bindings on first build.
if [ ! -f "$stub/libcuda.so" ]; then
  src="$(find "${CARGO_HOME:-$HOME/.cargo}/registry/src" -path '*cudarc-0.19*/src/driver/sys/mod.rs' | head -1)"
  grep -oE 'fn cu[A-Z][A-Za-z0-9_]*' "$src" | awk '{print "void " $2 "(void) {}"}' | sort -u > "$stub/stub.c"
  cc -shared -fPIC -o "$stub/libcuda.so" "$stub/stub.c" -Wl,-soname,libcuda.so.1
fi
for lib in cublas.so.13 cublasLt.so.13 cudart.so.13 curand.so.10 nvrtc.so.13; do
  ln -sf "$cuda/lib/lib$lib" "$stub/lib${lib%%.so*}.so"
done
if [ "${NCCL:-0}" = 1 ]; then
  nccl="$("$venv/bin/python" -c 'import nvidia.nccl, os; print(os.path.join(list(nvidia.nccl.__path__)[0], "lib"))')"
  ln -sf "$nccl/libnccl.so.2" "$stub/libnccl.so"
fi
export PATH="$cuda/bin:$PATH" CUDA_ROOT="$cuda" CUDA_PATH="$cuda" CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}"
export LIBRARY_PATH="$stub${LIBRARY_PATH:+:$LIBRARY_PATH}"
cargo build --release --features cuda -p peft-cli --target-dir "$target"
echo "built $target/release/peft with the cuda feature"
# The CUDA tests (crates/peft/tests/cuda.rs) compare the GPU path with the fixtures; they run where
# a GPU is: copy the binary printed here there and run it from the crate directory
# (crates/peft), which holds the fixtures.
cuda_tests=$(cargo test --release --features cuda -p peft --test cuda --no-run --target-dir "$target" 2>&1 |
  grep -o "$target/release/deps/cuda-[0-9a-f]*" | sort -u | tail -1)
echo "cuda tests: $cuda_tests"
cargo build --release --features cuda -p peft --example sd_bench --target-dir "$target"
nccl_test=""
if [ "${NCCL:-0}" = 1 ]; then
  nccl_test=$(cargo test --release --features nccl -p peft --test nccl --no-run --target-dir "$target" 2>&1 |
    grep -o "$target/release/deps/nccl-[0-9a-f]*" | sort -u | tail -1)
  echo "nccl test: $nccl_test"
fi
# What tools/gpu_check.sh runs on the GPU machine, stripped and compressed (a few tens of MB).
bundle="$target/gpu-bundle"
rm -rf "$bundle" && mkdir -p "$bundle"
strip -o "$bundle/peft" "$target/release/peft"
strip -o "$bundle/cuda-tests" "$cuda_tests"
strip -o "$bundle/sd_bench" "$target/release/examples/sd_bench"
[ -n "$nccl_test" ] && strip -o "$bundle/nccl-test" "$nccl_test"
# The test binaries find the fixtures by this checkout's absolute path, compiled in.
echo "$root" > "$bundle/built-in"
xz -T0 -6 "$bundle"/peft "$bundle"/cuda-tests "$bundle"/sd_bench ${nccl_test:+"$bundle/nccl-test"}
echo "bundle for tools/gpu_check.sh: $bundle ($(du -sh "$bundle" | cut -f1))"
