// Maximum-likelihood refinement kernels (hxn_ptycho/ml.py is the numpy reference): the data term
// and gradient weight of pass 1, the line-search sums of pass 2, for the Poisson model
//   L = sum_good (I_m - I log I_m),  I_m = max(sum_m |F(Phi)|^2, imin),  I = a^2,
// and the amplitude model
//   L = sum_good (A - a)^2,          A = max(sqrt(sum_m |F(Phi)|^2), sqrt(imin)).
// complex64: *_c64 (float2, float), complex128: *_c128 (double2, double).
// Layouts (C order): waves (B, M, npix) with M = L*K modes of a view, diffamp (B, npix) = sqrt(I),
// mask (npix) uint8 (1 = good pixel).  model: 0 = Poisson, 1 = amplitude; imin = the floor of I_m.
#include "common.cuh"

__device__ __forceinline__ float hxn_log(float x) { return logf(x); }
__device__ __forceinline__ double hxn_log(double x) { return log(x); }

// (ML) pass 1, one read of the Fourier exit waves of a view:
//   cost[b] += sum_good L_p,  err[b] += sum_good (sqrt(sum_m |f|^2) - a)^2  (the data error (7)),
//   out[b,m,p] = w_p * f[b,m,p]  with the weight of dL/dPsi* = w * Psi:
//   w = 1 - I / I_m (Poisson), w = 1 - a / A (amplitude); w = 0 on masked pixels.
// out may be fphi itself (in place).  cost and err (B) double must be zeroed by the caller.
template <typename R>
__device__ void hxn_ml_gradient(const typename hxn_complex<R>::type* fphi,
                                typename hxn_complex<R>::type* out,
                                const R* __restrict__ diffamp,
                                const unsigned char* __restrict__ mask, int use_mask,
                                int B, int M, int npix, R imin, int model,
                                double* __restrict__ cost, double* __restrict__ err) {
    typedef typename hxn_complex<R>::type C;
    const R amp_floor = hxn_sqrt(imin);
    for (int b = blockIdx.y; b < B; b += gridDim.y) {
        const C* f = fphi + (long long)b * M * npix;
        C* o = out + (long long)b * M * npix;
        const R* a = diffamp + (long long)b * npix;
        double c = 0, e = 0;
        for (int p = blockIdx.x * blockDim.x + threadIdx.x; p < npix; p += gridDim.x * blockDim.x) {
            C v[HXN_MODE_CACHE];
            R intensity = hxn_load_modes(f, M, npix, p, v);
            R w = 0;
            if (!use_mask || mask[p]) {
                const R amp = a[p];
                const R d = hxn_sqrt(intensity) - amp;
                e += (double)(d * d);
                if (model == 0) {
                    const R im = hxn_max(intensity, imin);
                    const R meas = amp * amp;
                    c += (double)(im - meas * hxn_log(im));
                    w = (R)1 - meas / im;
                } else {
                    const R mod = hxn_max(hxn_sqrt(intensity), amp_floor);
                    const R dev = mod - amp;
                    c += (double)(dev * dev);
                    w = (R)1 - amp / mod;
                }
            }
            hxn_store_scaled_modes(f, o, M, npix, p, v, w);
        }
        hxn_block_sum_add(c, cost + b);
        hxn_block_sum_add(e, err + b);
    }
}

// (ML) pass 2, the line search along the direction: with f0 = F(Phi), f1 = F(A1), f2 = F(A2) the
// model intensity is I_m(alpha) ~ I_m + alpha c1 + alpha^2 c2 per pixel,
//   c1 = 2 sum_m Re(f0* f1),  c2 = sum_m |f1|^2 + 2 Re(f0* f2),  I_m = max(sum_m |f0|^2, imin);
//   Poisson:   L'(0) = (1 - I/I_m) c1,  L''(0) = 2 (1 - I/I_m) c2 + I/I_m^2 c1^2;
//   amplitude: A = sqrt(I_m), A' = c1 / 2A,
//              L'(0) = 2 (A - a) A',  L''(0) ~ 2 A'^2 (Gauss-Newton: the exact curvature's term
//              2 (A - a) A'' is unbounded below where A << a and made the sum negative, ML stalled).
// d1[b] += sum_good L'(0), d2[b] += sum_good L''(0); both (B) double, zeroed by the caller.
// The amplitude model does not read f2.
template <typename R>
__device__ void hxn_ml_line_search(const typename hxn_complex<R>::type* __restrict__ f0,
                                   const typename hxn_complex<R>::type* __restrict__ f1,
                                   const typename hxn_complex<R>::type* __restrict__ f2,
                                   const R* __restrict__ diffamp,
                                   const unsigned char* __restrict__ mask, int use_mask,
                                   int B, int M, int npix, R imin, int model,
                                   double* __restrict__ d1, double* __restrict__ d2) {
    typedef typename hxn_complex<R>::type C;
    for (int b = blockIdx.y; b < B; b += gridDim.y) {
        const long long off = (long long)b * M * npix;
        const R* a = diffamp + (long long)b * npix;
        double s1 = 0, s2 = 0;
        for (int p = blockIdx.x * blockDim.x + threadIdx.x; p < npix; p += gridDim.x * blockDim.x) {
            if (use_mask && !mask[p]) continue;
            R i0 = 0, c1 = 0, c2 = 0;
            for (int m = 0; m < M; ++m) {
                const long long q = off + (long long)m * npix + p;
                const C u = f0[q], g = f1[q];
                i0 += hxn_abs2(u);
                c1 += u.x * g.x + u.y * g.y;
                if (model == 0) {          // f2 is read by the Poisson curvature only
                    const C h = f2[q];
                    c2 += hxn_abs2(g) + 2 * (u.x * h.x + u.y * h.y);
                }
            }
            c1 *= 2;
            i0 = hxn_max(i0, imin);
            const R amp = a[p];
            if (model == 0) {
                const R ratio = amp * amp / i0;
                s1 += (double)((1 - ratio) * c1);
                s2 += (double)(2 * (1 - ratio) * c2 + ratio / i0 * c1 * c1);
            } else {
                const R A = hxn_sqrt(i0);
                const R dA = c1 / (2 * A);
                s1 += (double)(2 * (A - amp) * dA);
                s2 += (double)(2 * dA * dA);
            }
        }
        hxn_block_sum_add(s1, d1 + b);
        hxn_block_sum_add(s2, d2 + b);
    }
}

#define HXN_ML_KERNELS(SUF, R, C)                                                                   \
    extern "C" __global__ void ml_gradient_##SUF(const C* fphi, C* out, const R* diffamp,           \
                                                 const unsigned char* mask, int use_mask, int B,    \
                                                 int M, int npix, R imin, int model,                \
                                                 double* cost, double* err) {                       \
        hxn_ml_gradient<R>(fphi, out, diffamp, mask, use_mask, B, M, npix, imin, model, cost,       \
                           err);                                                                    \
    }                                                                                               \
    extern "C" __global__ void ml_line_search_##SUF(const C* f0, const C* f1, const C* f2,          \
                                                    const R* diffamp, const unsigned char* mask,    \
                                                    int use_mask, int B, int M, int npix, R imin,   \
                                                    int model, double* d1, double* d2) {            \
        hxn_ml_line_search<R>(f0, f1, f2, diffamp, mask, use_mask, B, M, npix, imin, model, d1,     \
                              d2);                                                                  \
    }

HXN_ML_KERNELS(c64, float, float2)
HXN_ML_KERNELS(c128, double, double2)
