// Fourier-space and element-wise DM kernels (equations (2), (3), (4) of the paper).
// complex64: *_c64 (float2, float), complex128: *_c128 (double2, double).
// Layouts (C order): waves (B, M, npix) with M = L*K modes of a view and npix = n*n,
// diffamp (B, npix) = sqrt(I), mask (npix) uint8 (1 = good pixel).
#include "common.cuh"

// (4) the fused Fourier constraint, all modes of a view in one pass:
//   I = sum_m |w[b,m,p]|^2, mod = sqrt(I);
//   good pixels: err[b] += (mod - a)^2 and, if apply, w[b,m,p] *= t / max(mod, tiny) with the
//   target modulus t = a, or with use_relax (the power bound) t = a + (mod - a) * relax[b];
//   masked pixels: untouched and not counted.
// err (B) double must be zeroed by the caller; apply = 0 only measures the error.
// Unnormalised FFTs: the orthonormal waves are in_scale * waves (in_scale = 1/n after a raw
// forward cuFFT of n x n), and every written value is also multiplied by out_scale (1/n folds the orthonormal scaling of the following raw inverse cuFFT
// in), so a raw FFT -> this kernel -> raw inverse FFT needs no separate scaling passes.  Masked
// pixels are then scaled by in_scale * out_scale (and left untouched when that is 1).
template <typename R>
__device__ void hxn_fourier_projection(typename hxn_complex<R>::type* __restrict__ waves,
                                       const R* __restrict__ diffamp,
                                       const unsigned char* __restrict__ mask, int use_mask,
                                       int B, int M, int npix, int apply, R in_scale,
                                       R out_scale, const R* __restrict__ relax, int use_relax,
                                       double* __restrict__ err) {
    typedef typename hxn_complex<R>::type C;
    for (int b = blockIdx.y; b < B; b += gridDim.y) {
        C* w = waves + (long long)b * M * npix;
        const R* a = diffamp + (long long)b * npix;
        const R rx = use_relax ? relax[b] : (R)0;
        R e = 0;
        for (int p = blockIdx.x * blockDim.x + threadIdx.x; p < npix; p += gridDim.x * blockDim.x) {
            C v[HXN_MODE_CACHE];
            R intensity = hxn_load_modes(w, M, npix, p, v);
            if (use_mask && !mask[p]) {
                const R g = in_scale * out_scale;
                if (apply && g != (R)1) hxn_store_scaled_modes(w, w, M, npix, p, v, g);
                continue;
            }
            const R mod = in_scale * hxn_sqrt(intensity);
            const R amp = a[p];
            const R d = mod - amp;
            e += d * d;
            if (apply) {
                const R target = amp + d * rx;
                const R f = target / hxn_max(mod, (R)HXN_TINY) * (in_scale * out_scale);
                hxn_store_scaled_modes(w, w, M, npix, p, v, f);
            }
        }
        hxn_block_sum_add((double)e, err + b);
    }
}

// (2) exit waves: out[b,k,p] = scale * win[b,p] * probe[k,p] for the BL = B*L object windows of a
// batch (out is (B, L, K, npix), win is (B, L, npix), probe is (K, npix)); scale = 1/n makes a
// following raw cuFFT orthonormal.
template <typename R>
__device__ void hxn_exit_waves(const typename hxn_complex<R>::type* __restrict__ probe,
                               const typename hxn_complex<R>::type* __restrict__ win,
                               typename hxn_complex<R>::type* __restrict__ out,
                               int BL, int K, int npix, R scale) {
    const int per = K * npix;
    for (int b = blockIdx.y; b < BL; b += gridDim.y) {
        const typename hxn_complex<R>::type* o = win + (long long)b * npix;
        typename hxn_complex<R>::type* dst = out + (long long)b * per;
        for (int q = blockIdx.x * blockDim.x + threadIdx.x; q < per; q += gridDim.x * blockDim.x) {
            const int p = q % npix;
            const typename hxn_complex<R>::type v = hxn_mul(o[p], probe[q]);
            dst[q] = hxn_make<typename hxn_complex<R>::type>(v.x * scale, v.y * scale);
        }
    }
}

// (3) DM update: psi += beta * (proj - phi), element-wise over `count` complex values.
template <typename R>
__device__ void hxn_dm_update(typename hxn_complex<R>::type* __restrict__ psi,
                              const typename hxn_complex<R>::type* __restrict__ phi,
                              const typename hxn_complex<R>::type* __restrict__ proj,
                              long long count, R beta) {
    const long long stride = (long long)gridDim.x * blockDim.x * gridDim.y;
    for (long long i = ((long long)blockIdx.y * gridDim.x + blockIdx.x) * blockDim.x + threadIdx.x;
         i < count; i += stride) {
        typename hxn_complex<R>::type s = psi[i];
        const typename hxn_complex<R>::type f = phi[i], g = proj[i];
        s.x += beta * (g.x - f.x);
        s.y += beta * (g.y - f.y);
        psi[i] = s;
    }
}

// (3) input of the Fourier projection: out = 2*phi - psi, element-wise.
template <typename R>
__device__ void hxn_reflect(const typename hxn_complex<R>::type* __restrict__ phi,
                            const typename hxn_complex<R>::type* __restrict__ psi,
                            typename hxn_complex<R>::type* __restrict__ out, long long count) {
    const long long stride = (long long)gridDim.x * blockDim.x * gridDim.y;
    for (long long i = ((long long)blockIdx.y * gridDim.x + blockIdx.x) * blockDim.x + threadIdx.x;
         i < count; i += stride) {
        const typename hxn_complex<R>::type f = phi[i], s = psi[i];
        out[i] = hxn_make<typename hxn_complex<R>::type>(2 * f.x - s.x, 2 * f.y - s.y);
    }
}

// (3)+(4)+(7) fused, in Fourier space (F is linear), without storing the reflected waves:
//   w = 2*fphi - fpsi (all M modes of view b, pixel p), mod_w = sqrt(sum_m |w|^2);
//   good pixels: t = a (+ (mod_w - a) * relax[b] with use_relax), f = t / max(mod_w, tiny);
//   masked pixels: f = 1;   fpsi += beta * (f * w - fphi);
//   model_err[b] += sum_good (sqrt(sum_m |fphi|^2) - a)^2  (the data error of the model, (7)).
template <typename R>
__device__ void hxn_fourier_update(typename hxn_complex<R>::type* __restrict__ fpsi,
                                   const typename hxn_complex<R>::type* __restrict__ fphi,
                                   const R* __restrict__ diffamp,
                                   const unsigned char* __restrict__ mask, int use_mask,
                                   int B, int M, int npix, const R* __restrict__ relax,
                                   int use_relax, R beta, double* __restrict__ model_err) {
    typedef typename hxn_complex<R>::type C;
    for (int b = blockIdx.y; b < B; b += gridDim.y) {
        C* s = fpsi + (long long)b * M * npix;
        const C* f = fphi + (long long)b * M * npix;
        const R* a = diffamp + (long long)b * npix;
        const R rx = use_relax ? relax[b] : (R)0;
        R e = 0;
        for (int p = blockIdx.x * blockDim.x + threadIdx.x; p < npix; p += gridDim.x * blockDim.x) {
            C vs[HXN_MODE_CACHE], vf[HXN_MODE_CACHE];
            R iw = 0, iphi = 0;
#pragma unroll
            for (int m = 0; m < HXN_MODE_CACHE; ++m) {
                if (m < M) {
                    vs[m] = s[(long long)m * npix + p];
                    vf[m] = f[(long long)m * npix + p];
                    iw += hxn_abs2(hxn_make<C>(2 * vf[m].x - vs[m].x, 2 * vf[m].y - vs[m].y));
                    iphi += hxn_abs2(vf[m]);
                }
            }
            for (int m = HXN_MODE_CACHE; m < M; ++m) {
                const C ts = s[(long long)m * npix + p], tf = f[(long long)m * npix + p];
                iw += hxn_abs2(hxn_make<C>(2 * tf.x - ts.x, 2 * tf.y - ts.y));
                iphi += hxn_abs2(tf);
            }
            R fac = 1;
            if (!use_mask || mask[p]) {
                const R amp = a[p];
                const R dphi = hxn_sqrt(iphi) - amp;
                e += dphi * dphi;
                const R mod = hxn_sqrt(iw);
                fac = (amp + (mod - amp) * rx) / hxn_max(mod, (R)HXN_TINY);
            }
#pragma unroll
            for (int m = 0; m < HXN_MODE_CACHE; ++m) {
                if (m < M) {
                    const R wx = 2 * vf[m].x - vs[m].x, wy = 2 * vf[m].y - vs[m].y;
                    s[(long long)m * npix + p] = hxn_make<C>(vs[m].x + beta * (fac * wx - vf[m].x),
                                                             vs[m].y + beta * (fac * wy - vf[m].y));
                }
            }
            for (int m = HXN_MODE_CACHE; m < M; ++m) {
                const C ts = s[(long long)m * npix + p], tf = f[(long long)m * npix + p];
                const R wx = 2 * tf.x - ts.x, wy = 2 * tf.y - ts.y;
                s[(long long)m * npix + p] = hxn_make<C>(ts.x + beta * (fac * wx - tf.x),
                                                         ts.y + beta * (fac * wy - tf.y));
            }
        }
        hxn_block_sum_add((double)e, model_err + b);
    }
}

// dev_err[b] += sum_good (|2*fphi - fpsi|_modes - a)^2: the per-view deviation the power bound
// of hxn_fourier_update needs (its first pass; only run when the bound is on).
template <typename R>
__device__ void hxn_reflect_error(const typename hxn_complex<R>::type* __restrict__ fpsi,
                                  const typename hxn_complex<R>::type* __restrict__ fphi,
                                  const R* __restrict__ diffamp,
                                  const unsigned char* __restrict__ mask, int use_mask,
                                  int B, int M, int npix, double* __restrict__ dev_err) {
    typedef typename hxn_complex<R>::type C;
    for (int b = blockIdx.y; b < B; b += gridDim.y) {
        const C* s = fpsi + (long long)b * M * npix;
        const C* f = fphi + (long long)b * M * npix;
        const R* a = diffamp + (long long)b * npix;
        R e = 0;
        for (int p = blockIdx.x * blockDim.x + threadIdx.x; p < npix; p += gridDim.x * blockDim.x) {
            if (use_mask && !mask[p]) continue;
            R iw = 0;
            for (int m = 0; m < M; ++m) {
                const C ts = s[(long long)m * npix + p], tf = f[(long long)m * npix + p];
                iw += hxn_abs2(hxn_make<C>(2 * tf.x - ts.x, 2 * tf.y - ts.y));
            }
            const R d = hxn_sqrt(iw) - a[p];
            e += d * d;
        }
        hxn_block_sum_add((double)e, dev_err + b);
    }
}

#define HXN_FOURIER_KERNELS(SUF, R, C)                                                               \
    extern "C" __global__ void fourier_projection_##SUF(C* waves, const R* diffamp,                 \
                                                        const unsigned char* mask, int use_mask,    \
                                                        int B, int M, int npix, int apply,          \
                                                        R in_scale, R out_scale, const R* relax,    \
                                                        int use_relax, double* err) {               \
        hxn_fourier_projection<R>(waves, diffamp, mask, use_mask, B, M, npix, apply, in_scale,      \
                                  out_scale, relax, use_relax, err);                                \
    }                                                                                                \
    extern "C" __global__ void exit_waves_##SUF(const C* probe, const C* win, C* out, int BL,       \
                                                int K, int npix, R scale) {                         \
        hxn_exit_waves<R>(probe, win, out, BL, K, npix, scale);                                     \
    }                                                                                                \
    extern "C" __global__ void dm_update_##SUF(C* psi, const C* phi, const C* proj,                 \
                                               long long count, R beta) {                           \
        hxn_dm_update<R>(psi, phi, proj, count, beta);                                              \
    }                                                                                                \
    extern "C" __global__ void reflect_##SUF(const C* phi, const C* psi, C* out, long long count) { \
        hxn_reflect<R>(phi, psi, out, count);                                                       \
    }                                                                                                \
    extern "C" __global__ void fourier_update_##SUF(C* fpsi, const C* fphi, const R* diffamp,       \
                                                    const unsigned char* mask, int use_mask, int B, \
                                                    int M, int npix, const R* relax, int use_relax, \
                                                    R beta, double* model_err) {                    \
        hxn_fourier_update<R>(fpsi, fphi, diffamp, mask, use_mask, B, M, npix, relax, use_relax,    \
                              beta, model_err);                                                     \
    }                                                                                                \
    extern "C" __global__ void reflect_error_##SUF(const C* fpsi, const C* fphi, const R* diffamp,  \
                                                   const unsigned char* mask, int use_mask, int B,  \
                                                   int M, int npix, double* dev_err) {              \
        hxn_reflect_error<R>(fpsi, fphi, diffamp, mask, use_mask, B, M, npix, dev_err);             \
    }

HXN_FOURIER_KERNELS(c64, float, float2)
HXN_FOURIER_KERNELS(c128, double, double2)
