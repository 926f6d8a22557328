# Sourced by .ci/run before the tests: compile every CUDA kernel for sm_80 and sm_90 with nvcc,
# failing CI on any error or warning. Skipped (with a note) only where nvcc is absent.
_hxn_nvcc="${NVCC:-/usr/local/cuda/bin/nvcc}"
if [ -x "$_hxn_nvcc" ]; then
    _hxn_cubins="$(mktemp -d)"
    for _hxn_src in cuda/*.cu; do
        for _hxn_arch in sm_80 sm_90; do
            echo "nvcc -cubin -arch=$_hxn_arch $_hxn_src"
            "$_hxn_nvcc" -cubin -arch="$_hxn_arch" -std=c++17 -Werror all-warnings -I cuda \
                -o "$_hxn_cubins/$(basename "$_hxn_src" .cu).$_hxn_arch.cubin" "$_hxn_src" \
                || { echo "CUDA kernel $_hxn_src does not compile for $_hxn_arch" >&2; exit 1; }
        done
    done
    rm -rf "$_hxn_cubins"
    unset _hxn_cubins _hxn_src _hxn_arch
else
    echo "nvcc not found at $_hxn_nvcc: CUDA kernels not compiled by this step (tests/test_cuda_compile.py fails in CI)"
fi
unset _hxn_nvcc
