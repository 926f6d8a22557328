// Real-space kernels: the object windows of a batch (gather), the overlapping accumulation onto
// the object (scatter, equation (6)) and the per-view sums of the object and probe updates.
// complex64: *_c64, complex128: *_c128; real accumulators: *_f32, *_f64.
// Layouts (C order): object (L, H, W), pos (B, 2) int64 (row, col) window corners,
// windows (B, L, n, n), exit waves (B, L, K, n, n), probe (K, n, n).
#include "common.cuh"

// out[b,l,i,j] = obj[l, r_b+i, c_b+j]; pixels outside the object read as 0.
template <typename C>
__device__ void hxn_gather(const C* __restrict__ obj, int L, int H, int W,
                           const long long* __restrict__ pos, int B, int n, C* __restrict__ out) {
    const int nn = n * n, per = L * nn;
    for (int b = blockIdx.y; b < B; b += gridDim.y) {
        const long long r0 = pos[2 * b], c0 = pos[2 * b + 1];
        C* dst = out + (long long)b * per;
        for (int q = blockIdx.x * blockDim.x + threadIdx.x; q < per; q += gridDim.x * blockDim.x) {
            const int l = q / nn, ij = q - l * nn, i = ij / n, j = ij - i * n;
            const long long r = r0 + i, c = c0 + j;
            C v;
            v.x = 0;
            v.y = 0;
            if (r >= 0 && r < H && c >= 0 && c < W) v = obj[((long long)l * H + r) * W + c];
            dst[q] = v;
        }
    }
}

// acc[l, r_b+i, c_b+j, comp] += src[b, l, i, j, comp] on the scalar view of acc (S = float or
// double; ncomp = 2 for interleaved complex, 1 for real).  src strides are in elements (of ncomp
// scalars): stride_b = L*n*n, stride_l = n*n for a (B, L, n, n) source, 0 and 0 for an (n, n)
// window added at every position and object mode.  With use_views, view v of the launch is
// views[v] (one non-overlapping set, so plain adds do not race); else view v is v.
// ATOMIC = true: atomicAdd (any views); false: plain read-add-write (non-overlapping views only).
// Pixels outside the object are skipped.
template <typename S, bool ATOMIC>
__device__ void hxn_scatter_add(S* __restrict__ acc, int L, int H, int W,
                                const long long* __restrict__ pos, const int* __restrict__ views,
                                int use_views, int nviews, int n, const S* __restrict__ src,
                                long long stride_b, long long stride_l, int ncomp) {
    const int nn = n * n, per_l = nn * ncomp, per = L * per_l;
    for (int v = blockIdx.y; v < nviews; v += gridDim.y) {
        const int b = use_views ? views[v] : v;
        const long long r0 = pos[2 * b], c0 = pos[2 * b + 1];
        const S* s = src + (long long)b * stride_b * ncomp;
        for (int q = blockIdx.x * blockDim.x + threadIdx.x; q < per; q += gridDim.x * blockDim.x) {
            const int l = q / per_l, rem = q - l * per_l;
            const int pix = rem / ncomp, comp = rem - pix * ncomp;
            const int i = pix / n, j = pix - i * n;
            const long long r = r0 + i, c = c0 + j;
            if (r < 0 || r >= H || c < 0 || c >= W) continue;
            const S val = s[l * stride_l * ncomp + rem];
            S* t = acc + (((long long)l * H + r) * W + c) * ncomp + comp;
            if (ATOMIC) {
                atomicAdd(t, val);
            } else {
                *t += val;
            }
        }
    }
}

// (6) numerator per view: out[bl, p] = sum_k psi[bl, k, p] * pc[k, p], pc = conj(probe) given.
template <typename C>
__device__ void hxn_object_numerator(const C* __restrict__ psi, const C* __restrict__ pc,
                                     C* __restrict__ out, int BL, int K, int npix) {
    for (int b = blockIdx.y; b < BL; b += gridDim.y) {
        const C* s = psi + (long long)b * K * npix;
        C* dst = out + (long long)b * npix;
        for (int p = blockIdx.x * blockDim.x + threadIdx.x; p < npix; p += gridDim.x * blockDim.x) {
            C acc = hxn_mul(s[p], pc[p]);
            for (int k = 1; k < K; ++k) {
                const C t = hxn_mul(s[(long long)k * npix + p], pc[(long long)k * npix + p]);
                acc.x += t.x;
                acc.y += t.y;
            }
            dst[p] = acc;
        }
    }
}

// (5) probe sums over a batch: num[k, p] += sum_{b,l} conj(win[b,l,p]) * psi[b,l,k,p] and, with
// with_den, den[p] += sum_{b,l} |win[b,l,p]|^2.  blockIdx.x strides over (k, p) (one owner per output),
// blockIdx.y over chunks of `chunk` views, each chunk adding its partial sum atomically
// (gridDim.y = 1 and chunk >= B gives plain, deterministic sums).
template <typename R>
__device__ void hxn_probe_sums(const typename hxn_complex<R>::type* __restrict__ psi,
                               const typename hxn_complex<R>::type* __restrict__ win,
                               R* __restrict__ num, R* __restrict__ den, int with_den,
                               int B, int L, int K, int npix, int chunk) {
    typedef typename hxn_complex<R>::type C;
    const int per = K * npix;
    const int nchunks = (B + chunk - 1) / chunk;
    for (int ch = blockIdx.y; ch < nchunks; ch += gridDim.y) {
        const int b0 = ch * chunk, b1 = min(B, b0 + chunk);
        for (int q = blockIdx.x * blockDim.x + threadIdx.x; q < per; q += gridDim.x * blockDim.x) {
            const int k = q / npix, p = q - k * npix;
            C acc;
            acc.x = 0;
            acc.y = 0;
            R d = 0;
            for (int b = b0; b < b1; ++b) {
                for (int l = 0; l < L; ++l) {
                    const long long bl = (long long)b * L + l;
                    const C o = win[bl * npix + p];
                    const C t = hxn_cmul(o, psi[(bl * K + k) * npix + p]);
                    acc.x += t.x;
                    acc.y += t.y;
                    d += hxn_abs2(o);
                }
            }
            if (gridDim.y == 1) {
                num[2 * q] += acc.x;
                num[2 * q + 1] += acc.y;
                if (with_den && k == 0) den[p] += d;
            } else {
                atomicAdd(num + 2 * q, acc.x);
                atomicAdd(num + 2 * q + 1, acc.y);
                if (with_den && k == 0) atomicAdd(den + p, d);
            }
        }
    }
}

#define HXN_OVERLAP_COMPLEX(SUF, R, C)                                                              \
    extern "C" __global__ void gather_##SUF(const C* obj, int L, int H, int W,                     \
                                            const long long* pos, int B, int n, C* out) {          \
        hxn_gather<C>(obj, L, H, W, pos, B, n, out);                                               \
    }                                                                                               \
    extern "C" __global__ void object_numerator_##SUF(const C* psi, const C* pc, C* out, int BL,   \
                                                      int K, int npix) {                           \
        hxn_object_numerator<C>(psi, pc, out, BL, K, npix);                                        \
    }                                                                                               \
    extern "C" __global__ void probe_sums_##SUF(const C* psi, const C* win, R* num, R* den,        \
                                                int with_den, int B, int L, int K, int npix,       \
                                                int chunk) {                                       \
        hxn_probe_sums<R>(psi, win, num, den, with_den, B, L, K, npix, chunk);                     \
    }

#define HXN_OVERLAP_SCALAR(SUF, S)                                                                  \
    extern "C" __global__ void scatter_add_atomic_##SUF(                                           \
        S* acc, int L, int H, int W, const long long* pos, const int* views, int use_views,        \
        int nviews, int n, const S* src, long long stride_b, long long stride_l, int ncomp) {      \
        hxn_scatter_add<S, true>(acc, L, H, W, pos, views, use_views, nviews, n, src, stride_b,    \
                                 stride_l, ncomp);                                                 \
    }                                                                                               \
    extern "C" __global__ void scatter_add_sets_##SUF(                                             \
        S* acc, int L, int H, int W, const long long* pos, const int* views, int use_views,        \
        int nviews, int n, const S* src, long long stride_b, long long stride_l, int ncomp) {      \
        hxn_scatter_add<S, false>(acc, L, H, W, pos, views, use_views, nviews, n, src, stride_b,   \
                                  stride_l, ncomp);                                                \
    }

HXN_OVERLAP_COMPLEX(c64, float, float2)
HXN_OVERLAP_COMPLEX(c128, double, double2)
HXN_OVERLAP_SCALAR(f32, float)
HXN_OVERLAP_SCALAR(f64, double)
