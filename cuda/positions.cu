// Position-refinement kernels (hxn_ptycho/positions.py is the numpy reference): the per-view
// Gauss-Newton normal equations, the per-view data error of the search method, and the object
// gradient.  complex64: *_c64 (float2, float), complex128: *_c128 (double2, double).
#include "common.cuh"

// Gauss-Newton 2x2 system of every view b, with dPhi_a = P * dO_a summed over the probe modes:
//   A_ab = sum_{l,p} Re(conj(g_a) g_b) * pint[p],   b_a = sum_{l,p} Re(conj(g_a) q),
// g_r = gr[b,l,p], g_c = gc[b,l,p] the gathered dO/drow, dO/dcol, pint = sum_k |P_k|^2 (npix) and
// q = sum_k conj(P_k) R_k (B, L, npix) with the residual R = Pi_F(Phi) - Phi.
// out (B, 5) double = (A_rr, A_cc, A_rc, b_r, b_c), zeroed by the caller.
template <typename R>
__device__ void hxn_position_normal(const typename hxn_complex<R>::type* __restrict__ gr,
                                    const typename hxn_complex<R>::type* __restrict__ gc,
                                    const typename hxn_complex<R>::type* __restrict__ q,
                                    const R* __restrict__ pint, int B, int L, int npix,
                                    double* __restrict__ out) {
    typedef typename hxn_complex<R>::type C;
    const int per = L * npix;
    for (int b = blockIdx.y; b < B; b += gridDim.y) {
        const long long off = (long long)b * per;
        double s[5] = {0, 0, 0, 0, 0};
        for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < per; i += gridDim.x * blockDim.x) {
            const int p = i % npix;
            const C u = gr[off + i], v = gc[off + i], w = q[off + i];
            const R pi = pint[p];
            s[0] += (double)(hxn_abs2(u) * pi);
            s[1] += (double)(hxn_abs2(v) * pi);
            s[2] += (double)((u.x * v.x + u.y * v.y) * pi);
            s[3] += (double)(u.x * w.x + u.y * w.y);
            s[4] += (double)(v.x * w.x + v.y * w.y);
        }
        hxn_block_sum_add_n<5>(s, out + 5 * (long long)b);
    }
}

// err[b] += sum_good (sqrt(sum_m |w[b,m,p]|^2) - a[b,p])^2 for the search method: the data error of
// each view of a batch (waves (B, M, npix) orthonormal).  amp_stride = npix reads one diffamp per
// view, 0 one diffamp for every view (a grid of candidate positions of one view).
// err (B) double must be zeroed by the caller.
template <typename R>
__device__ void hxn_view_errors(const typename hxn_complex<R>::type* __restrict__ waves,
                                const R* __restrict__ diffamp, long long amp_stride,
                                const unsigned char* __restrict__ mask, int use_mask,
                                int B, int M, int npix, double* __restrict__ err) {
    typedef typename hxn_complex<R>::type C;
    for (int b = blockIdx.y; b < B; b += gridDim.y) {
        const C* w = waves + (long long)b * M * npix;
        const R* a = diffamp + (long long)b * amp_stride;
        double e = 0;
        for (int p = blockIdx.x * blockDim.x + threadIdx.x; p < npix; p += gridDim.x * blockDim.x) {
            if (use_mask && !mask[p]) continue;
            R intensity = 0;
            for (int m = 0; m < M; ++m) intensity += hxn_abs2(w[(long long)m * npix + p]);
            const R d = hxn_sqrt(intensity) - a[p];
            e += (double)(d * d);
        }
        hxn_block_sum_add(e, err + b);
    }
}

// dO/drow and dO/dcol of the object (L, H, W) by central differences, one-sided at the edges
// (H, W >= 2): d[i] = (o[i+1] - o[i-1]) / 2 inside, o[1] - o[0] and o[H-1] - o[H-2] at the edges.
// gridDim.y strides over the object modes, gridDim.x over the pixels of one mode.
template <typename R>
__device__ void hxn_object_gradient(const typename hxn_complex<R>::type* __restrict__ obj,
                                    int L, int H, int W,
                                    typename hxn_complex<R>::type* __restrict__ drow,
                                    typename hxn_complex<R>::type* __restrict__ dcol) {
    typedef typename hxn_complex<R>::type C;
    const int per = H * W;
    for (int l = blockIdx.y; l < L; l += gridDim.y) {
        const long long off = (long long)l * per;
        const C* o = obj + off;
        for (int q = blockIdx.x * blockDim.x + threadIdx.x; q < per; q += gridDim.x * blockDim.x) {
            const int i = q / W, j = q - i * W;
            const int i0 = i > 0 ? i - 1 : 0, i1 = i < H - 1 ? i + 1 : H - 1;
            const int j0 = j > 0 ? j - 1 : 0, j1 = j < W - 1 ? j + 1 : W - 1;
            const R sr = (i1 - i0 == 2) ? (R)0.5 : (R)1;
            const R sc = (j1 - j0 == 2) ? (R)0.5 : (R)1;
            const C a = o[i1 * W + j], b = o[i0 * W + j], c = o[i * W + j1], d = o[i * W + j0];
            drow[off + q] = hxn_make<C>(sr * (a.x - b.x), sr * (a.y - b.y));
            dcol[off + q] = hxn_make<C>(sc * (c.x - d.x), sc * (c.y - d.y));
        }
    }
}

#define HXN_POSITION_KERNELS(SUF, R, C)                                                             \
    extern "C" __global__ void position_normal_##SUF(const C* gr, const C* gc, const C* q,         \
                                                     const R* pint, int B, int L, int npix,        \
                                                     double* out) {                                \
        hxn_position_normal<R>(gr, gc, q, pint, B, L, npix, out);                                  \
    }                                                                                               \
    extern "C" __global__ void view_errors_##SUF(const C* waves, const R* diffamp,                 \
                                                 long long amp_stride, const unsigned char* mask,  \
                                                 int use_mask, int B, int M, int npix,             \
                                                 double* err) {                                    \
        hxn_view_errors<R>(waves, diffamp, amp_stride, mask, use_mask, B, M, npix, err);           \
    }                                                                                               \
    extern "C" __global__ void object_gradient_##SUF(const C* obj, int L, int H, int W, C* drow,   \
                                                     C* dcol) {                                    \
        hxn_object_gradient<R>(obj, L, H, W, drow, dcol);                                          \
    }

HXN_POSITION_KERNELS(c64, float, float2)
HXN_POSITION_KERNELS(c128, double, double2)
