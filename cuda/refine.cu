// Sub-pixel windows (position refinement): bilinear gather and its adjoint, the bilinear scatter.
// A window at corner p = (r0 + fr, c0 + fc), r0 = floor(p_row), reads
//   out[b,l,i,j] = sum_{a,c in {0,1}} w_ac * obj[l, r0+i+a, c0+j+c],
//   w_00 = (1-fr)(1-fc), w_01 = (1-fr) fc, w_10 = fr (1-fc), w_11 = fr fc
// (hxn_ptycho/geometry.py is the numpy reference); pixels outside the object read as 0 and are
// skipped by the scatter.  pos is (B, 2) double (row, col).
#include "common.cuh"

__device__ __forceinline__ void hxn_bilinear(const double* pos, int b, long long* r0, long long* c0,
                                             double* w) {
    const double pr = pos[2 * b], pc = pos[2 * b + 1];
    const double fr0 = floor(pr), fc0 = floor(pc);
    const double fr = pr - fr0, fc = pc - fc0;
    *r0 = (long long)fr0;
    *c0 = (long long)fc0;
    w[0] = (1.0 - fr) * (1.0 - fc);
    w[1] = (1.0 - fr) * fc;
    w[2] = fr * (1.0 - fc);
    w[3] = fr * fc;
}

template <typename C>
__device__ void hxn_gather_bilinear(const C* __restrict__ obj, int L, int H, int W,
                                    const double* __restrict__ pos, int B, int n, C* __restrict__ out) {
    const int nn = n * n, per = L * nn;
    for (int b = blockIdx.y; b < B; b += gridDim.y) {
        long long r0, c0;
        double w[4];
        hxn_bilinear(pos, b, &r0, &c0, w);
        C* dst = out + (long long)b * per;
        for (int q = blockIdx.x * blockDim.x + threadIdx.x; q < per; q += gridDim.x * blockDim.x) {
            const int l = q / nn, ij = q - l * nn, i = ij / n, j = ij - i * n;
            double re = 0, im = 0;
            for (int t = 0; t < 4; ++t) {
                const long long r = r0 + i + (t >> 1), c = c0 + j + (t & 1);
                if (w[t] != 0 && r >= 0 && r < H && c >= 0 && c < W) {
                    const C v = obj[((long long)l * H + r) * W + c];
                    re += w[t] * v.x;
                    im += w[t] * v.y;
                }
            }
            C o;
            o.x = re;
            o.y = im;
            dst[q] = o;
        }
    }
}

// acc[l, r0+i+a, c0+j+c, comp] += w_ac * src[b, l, i, j, comp] (atomics: windows overlap).
// src strides in elements of ncomp scalars: stride_b = L*n*n, stride_l = n*n for (B, L, n, n);
// stride_l = 0 adds one (B, 1, n, n) window to every object mode; stride_b = 0 one (n, n) window.
template <typename S>
__device__ void hxn_scatter_bilinear(S* __restrict__ acc, int L, int H, int W, const double* __restrict__ pos,
                                     int B, int n, const S* __restrict__ src, long long stride_b,
                                     long long stride_l, int ncomp) {
    const int nn = n * n, per_l = nn * ncomp, per = L * per_l;
    for (int b = blockIdx.y; b < B; b += gridDim.y) {
        long long r0, c0;
        double w[4];
        hxn_bilinear(pos, b, &r0, &c0, w);
        const S* s = src + (long long)b * stride_b * ncomp;
        for (int q = blockIdx.x * blockDim.x + threadIdx.x; q < per; q += gridDim.x * blockDim.x) {
            const int l = q / per_l, rem = q - l * per_l;
            const int pix = rem / ncomp, comp = rem - pix * ncomp;
            const int i = pix / n, j = pix - i * n;
            const S val = s[l * stride_l * ncomp + rem];
            for (int t = 0; t < 4; ++t) {
                const long long r = r0 + i + (t >> 1), c = c0 + j + (t & 1);
                if (w[t] == 0 || r < 0 || r >= H || c < 0 || c >= W) continue;
                atomicAdd(acc + (((long long)l * H + r) * W + c) * ncomp + comp, (S)(w[t] * val));
            }
        }
    }
}

#define HXN_REFINE_COMPLEX(SUF, C)                                                                  \
    extern "C" __global__ void gather_bilinear_##SUF(const C* obj, int L, int H, int W,            \
                                                     const double* pos, int B, int n, C* out) {    \
        hxn_gather_bilinear<C>(obj, L, H, W, pos, B, n, out);                                      \
    }

#define HXN_REFINE_SCALAR(SUF, S)                                                                   \
    extern "C" __global__ void scatter_bilinear_##SUF(S* acc, int L, int H, int W,                 \
                                                      const double* pos, int B, int n,             \
                                                      const S* src, long long stride_b,            \
                                                      long long stride_l, int ncomp) {             \
        hxn_scatter_bilinear<S>(acc, L, H, W, pos, B, n, src, stride_b, stride_l, ncomp);          \
    }

HXN_REFINE_COMPLEX(c64, float2)
HXN_REFINE_COMPLEX(c128, double2)
HXN_REFINE_SCALAR(f32, float)
HXN_REFINE_SCALAR(f64, double)
