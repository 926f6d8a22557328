// Shared helpers of the hxn_ptycho CUDA kernels: complex arithmetic on float2/double2 and a
// block reduction.  Plain CUDA C++ that NVRTC (cupy.RawModule), nvcc and the CPU emulation
// header (tests/cuda_emu/emu.h, which defines HXN_EMULATION) all accept: no includes, no
// warp intrinsics, only __syncthreads and atomicAdd.
//
// Launch convention of every kernel in this folder:
//   blockDim = (T, 1, 1) with T a power of two <= HXN_MAX_BLOCK;
//   gridDim.y strides over the views of a batch (b = blockIdx.y; b < B; b += gridDim.y);
//   gridDim.x strides over the elements of one view.
// So per-view offsets are 64-bit while the index inside a view fits in 32 bits.
#pragma once

#define HXN_MAX_BLOCK 256
#define HXN_TINY 1e-30
// Modes of one view kept in registers by the Fourier constraint (more are re-read from memory).
#define HXN_MODE_CACHE 8

template <typename R> struct hxn_complex;
template <> struct hxn_complex<float> { typedef float2 type; };
template <> struct hxn_complex<double> { typedef double2 type; };

__device__ __forceinline__ float hxn_sqrt(float x) { return sqrtf(x); }
__device__ __forceinline__ double hxn_sqrt(double x) { return sqrt(x); }
__device__ __forceinline__ float hxn_max(float a, float b) { return fmaxf(a, b); }
__device__ __forceinline__ double hxn_max(double a, double b) { return fmax(a, b); }

template <typename C>
__device__ __forceinline__ C hxn_make(decltype(C().x) re, decltype(C().x) im) {
    C r;
    r.x = re;
    r.y = im;
    return r;
}

// a * b
template <typename C>
__device__ __forceinline__ C hxn_mul(C a, C b) {
    return hxn_make<C>(a.x * b.x - a.y * b.y, a.x * b.y + a.y * b.x);
}

// conj(a) * b
template <typename C>
__device__ __forceinline__ C hxn_cmul(C a, C b) {
    return hxn_make<C>(a.x * b.x + a.y * b.y, a.x * b.y - a.y * b.x);
}

template <typename C>
__device__ __forceinline__ decltype(C().x) hxn_abs2(C a) {
    return a.x * a.x + a.y * a.y;
}

// Adds the sums of v[0..N) over the threads of the block to out[0..N) (one atomicAdd per value and
// block); every thread of the block must call it.
template <int N>
__device__ __forceinline__ void hxn_block_sum_add_n(const double* v, double* out) {
    __shared__ double partial[N][HXN_MAX_BLOCK];
    const unsigned t = threadIdx.x;
    for (int i = 0; i < N; ++i) partial[i][t] = v[i];
    __syncthreads();
    for (unsigned half = blockDim.x / 2; half > 0; half >>= 1) {
        if (t < half) {
            for (int i = 0; i < N; ++i) partial[i][t] += partial[i][t + half];
        }
        __syncthreads();
    }
    if (t == 0) {
        for (int i = 0; i < N; ++i) atomicAdd(out + i, partial[i][0]);
    }
    __syncthreads();
}

// Adds the sum of `v` over the threads of the block to *out (one atomicAdd per block).
// Every thread of the block must call it (it holds __syncthreads).
__device__ __forceinline__ void hxn_block_sum_add(double v, double* out) {
    hxn_block_sum_add_n<1>(&v, out);
}

// Loads the M modes of pixel p of one view (mode stride npix) into v[0..min(M, HXN_MODE_CACHE))
// and returns their summed intensity (modes beyond the cache are re-read, not kept).
template <typename C>
__device__ __forceinline__ decltype(C().x) hxn_load_modes(const C* __restrict__ src, int M, int npix, int p,
                                                           C* v) {
    decltype(C().x) intensity = 0;
#pragma unroll
    for (int m = 0; m < HXN_MODE_CACHE; ++m) {
        if (m < M) {
            v[m] = src[(long long)m * npix + p];
            intensity += hxn_abs2(v[m]);
        }
    }
    for (int m = HXN_MODE_CACHE; m < M; ++m) intensity += hxn_abs2(src[(long long)m * npix + p]);
    return intensity;
}

// Writes the M modes of pixel p scaled by the real factor s, dst[m] = s * src[m]: the first
// min(M, HXN_MODE_CACHE) from v (as hxn_load_modes left them), the rest re-read.  dst may be src.
template <typename C>
__device__ __forceinline__ void hxn_store_scaled_modes(const C* src, C* dst, int M, int npix, int p,
                                                       const C* v, decltype(C().x) s) {
#pragma unroll
    for (int m = 0; m < HXN_MODE_CACHE; ++m) {
        if (m < M) dst[(long long)m * npix + p] = hxn_make<C>(v[m].x * s, v[m].y * s);
    }
    for (int m = HXN_MODE_CACHE; m < M; ++m) {
        const C t = src[(long long)m * npix + p];
        dst[(long long)m * npix + p] = hxn_make<C>(t.x * s, t.y * s);
    }
}
