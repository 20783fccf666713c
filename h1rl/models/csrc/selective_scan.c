/* h1rl selective scan kernel, built and called by h1rl/models/scan_kernel.py (which documents it).
   Layouts (all contiguous float32):
   x, dt, y, dx, ddt: (B, T, H, P); A: (H, P, N); Bm, Cm, dB, dC: (B, T, H, N);
   s0, sT, ds0, dsT, dA_b: (B, H, P, N); ck: (B, nck, H, P, N), the state before each chunk of K steps.
   One OpenMP work item is one batch row b and a block of hb consecutive heads [h0, h1); time is the outer
   loop, so every step reads one contiguous run of hb * P (or hb * N) floats from each tensor. Walking time
   inside one head instead strides H * P floats per step, which defeats the hardware prefetcher and the TLB
   once the tensors outgrow the last-level cache (measured: 2x slower at 16 MiB per tensor). */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__SSE__)
#include <xmmintrin.h>
#define FTZ_BEGIN unsigned int saved_csr = _mm_getcsr(); _mm_setcsr(saved_csr | 0x8040);
#define FTZ_END _mm_setcsr(saved_csr);
#else
#define FTZ_BEGIN
#define FTZ_END
#endif
#define INLINE static inline __attribute__((always_inline))

/* exp(z), z clamped to [-87, 88]; Cephes expf polynomial (about 1 ulp). The clamps are integer minimums on the
   bit patterns (negative floats order by magnitude as unsigned ints), so the loops vectorise without fast-math. */
INLINE float h1_exp(float z) {
    union { float f; int32_t i; uint32_t u; } v = {z};
    v.u = v.u < 0xC2AE0000u ? v.u : 0xC2AE0000u; /* z >= -87 */
    v.i = v.i < 0x42B00000 ? v.i : 0x42B00000;   /* z <= 88 */
    z = v.f;
    const int32_t k = (int32_t)(z * 1.44269504088896341f + 128.5f) - 128; /* round(z / ln 2); casts a positive */
    const float fk = (float)k;
    const float r = z - fk * 0.693359375f + fk * 2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    v.i = (k + 127) << 23; /* 2^k */
    return p * v.f;
}

/* One time step of one head: s_out (P, N) = exp(dt A) s_in + dt x B, y (P) = s_out C if yt is not NULL,
   decays into e (P, N) if e is not NULL. N is a compile-time constant where the caller can make it one. */
INLINE void step(const float *xt, const float *dtt, const float *A, const float *bt, const float *ct,
                 const float *s_in, float *s_out, float *e, float *yt, int64_t P, const int64_t N) {
    for (int64_t p = 0; p < P; ++p) {
        const float d = dtt[p], u = d * xt[p];
        const float *a = A + p * N, *si = s_in + p * N;
        float *so = s_out + p * N, acc = 0.0f;
#pragma omp simd reduction(+ : acc)
        for (int64_t n = 0; n < N; ++n) {
            const float decay = h1_exp(d * a[n]);
            so[n] = decay * si[n] + u * bt[n];
            acc += ct[n] * so[n];
            if (e) e[p * N + n] = decay;
        }
        if (yt) yt[p] = acc;
    }
}

INLINE void fwd_block(const float *x, const float *dt, const float *A, const float *Bm, const float *Cm,
                      const float *s0, float *y, float *sT, float *ck, int64_t b, int64_t h0, int64_t h1,
                      int64_t T, int64_t H, int64_t P, const int64_t N, int64_t K, float *s) {
    const int64_t nck = (T + K - 1) / K, PN = P * N, span = (h1 - h0) * PN, blk = (b * H + h0) * PN;
    if (s0) memcpy(s, s0 + blk, span * sizeof(float));
    else memset(s, 0, span * sizeof(float));
    for (int64_t t = 0; t < T; ++t) {
        if (ck && t % K == 0) memcpy(ck + ((b * nck + t / K) * H + h0) * PN, s, span * sizeof(float));
        for (int64_t h = h0; h < h1; ++h) {
            const int64_t xi = ((b * T + t) * H + h) * P, bi = ((b * T + t) * H + h) * N;
            float *sh = s + (h - h0) * PN;
            step(x + xi, dt + xi, A + h * PN, Bm + bi, Cm + bi, sh, sh, NULL, y + xi, P, N);
        }
    }
    memcpy(sT + blk, s, span * sizeof(float));
}

/* Backward of one block. Per chunk in reverse: recompute decays E and states S from the checkpoint, then run
   the reverse scan g_t = C_t dy_t + a_{t+1} g_{t+1} (g: dL/ds_t) and form the gradients.
   work holds (2K + 3) * (h1 - h0) * P * N floats. */
INLINE void bwd_block(const float *x, const float *dt, const float *A, const float *Bm, const float *Cm,
                      const float *ck, const float *dy, const float *dsT, float *dx, float *ddt, float *dA_b,
                      float *dB, float *dC, float *ds0, int64_t b, int64_t h0, int64_t h1, int64_t T, int64_t H,
                      int64_t P, const int64_t N, int64_t K, float *work) {
    const int64_t nck = (T + K - 1) / K, PN = P * N, span = (h1 - h0) * PN, blk = (b * H + h0) * PN;
    float *g = work, *dacc = work + span; /* (hb, P, N) each */
    float *S = dacc + span;               /* (K + 1, hb, P, N): S[0] the chunk's start state, S[i + 1] after step i */
    float *E = S + (K + 1) * span;        /* (K, hb, P, N): decays exp(dt A) */
    if (dsT) memcpy(g, dsT + blk, span * sizeof(float));
    else memset(g, 0, span * sizeof(float));
    memset(dacc, 0, span * sizeof(float));
    for (int64_t c = nck - 1; c >= 0; --c) {
        const int64_t t0 = c * K, L = T - t0 < K ? T - t0 : K;
        memcpy(S, ck + ((b * nck + c) * H + h0) * PN, span * sizeof(float));
        for (int64_t i = 0; i < L; ++i) {
            for (int64_t h = h0; h < h1; ++h) {
                const int64_t xi = ((b * T + t0 + i) * H + h) * P, bi = ((b * T + t0 + i) * H + h) * N;
                const int64_t o = (h - h0) * PN;
                step(x + xi, dt + xi, A + h * PN, Bm + bi, Cm + bi, S + i * span + o, S + (i + 1) * span + o,
                     E + i * span + o, NULL, P, N);
            }
        }
        for (int64_t i = L - 1; i >= 0; --i) {
            for (int64_t h = h0; h < h1; ++h) {
                const int64_t xi = ((b * T + t0 + i) * H + h) * P, bi = ((b * T + t0 + i) * H + h) * N;
                const int64_t o = (h - h0) * PN;
                const float *bt = Bm + bi, *ct = Cm + bi;
                float *dbt = dB + bi, *dct = dC + bi;
                memset(dbt, 0, N * sizeof(float));
                memset(dct, 0, N * sizeof(float));
                for (int64_t p = 0; p < P; ++p) {
                    const float d = dt[xi + p], xv = x[xi + p], u = d * xv, dyv = dy[xi + p];
                    const int64_t q = o + p * N;
                    const float *a = A + h * PN + p * N, *e = E + i * span + q;
                    const float *sp = S + i * span + q, *sn = S + (i + 1) * span + q;
                    float *gp = g + q, *dap = dacc + q, gb = 0.0f, gz = 0.0f;
#pragma omp simd reduction(+ : gb, gz)
                    for (int64_t n = 0; n < N; ++n) {
                        const float gn = gp[n] + ct[n] * dyv; /* dL/ds_t */
                        const float z = gn * sp[n] * e[n];    /* dL/d(dt A) */
                        dct[n] += sn[n] * dyv;
                        dbt[n] += gn * u;
                        gb += gn * bt[n];
                        gz += z * a[n];
                        dap[n] += z * d;
                        gp[n] = gn * e[n];                    /* dL/ds_{t-1} through the decay */
                    }
                    dx[xi + p] = d * gb;
                    ddt[xi + p] = gz + xv * gb;
                }
            }
        }
    }
    if (ds0) memcpy(ds0 + blk, g, span * sizeof(float));
    memcpy(dA_b + blk, dacc, span * sizeof(float));
}

/* Work items: (b, block of hb heads). Both entry points return nonzero if a thread could not allocate its
   work buffer. */
int h1_scan_fwd(const float *x, const float *dt, const float *A, const float *Bm, const float *Cm,
                const float *s0, float *y, float *sT, float *ck, int64_t Bsz, int64_t T, int64_t H,
                int64_t P, int64_t N, int64_t K, int64_t hb, int nthreads) {
    const int64_t nhb = (H + hb - 1) / hb;
    int failed = 0;
#pragma omp parallel num_threads(nthreads)
    {
        FTZ_BEGIN
        float *work = (float *)malloc((size_t)(hb * P * N) * sizeof(float));
        if (!work) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(dynamic, 1)
        for (int64_t item = 0; item < Bsz * nhb; ++item) {
            if (!work) continue;
            const int64_t b = item / nhb, h0 = (item % nhb) * hb, h1 = h0 + hb < H ? h0 + hb : H;
            if (N == 16) fwd_block(x, dt, A, Bm, Cm, s0, y, sT, ck, b, h0, h1, T, H, P, 16, K, work);
            else fwd_block(x, dt, A, Bm, Cm, s0, y, sT, ck, b, h0, h1, T, H, P, N, K, work);
        }
        free(work);
        FTZ_END
    }
    return failed;
}

int h1_scan_bwd(const float *x, const float *dt, const float *A, const float *Bm, const float *Cm,
                const float *ck, const float *dy, const float *dsT, float *dx, float *ddt, float *dA_b,
                float *dB, float *dC, float *ds0, int64_t Bsz, int64_t T, int64_t H, int64_t P, int64_t N,
                int64_t K, int64_t hb, int nthreads) {
    const int64_t nhb = (H + hb - 1) / hb;
    int failed = 0;
#pragma omp parallel num_threads(nthreads)
    {
        FTZ_BEGIN
        float *work = (float *)malloc((size_t)((2 * K + 3) * hb * P * N) * sizeof(float));
        if (!work) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(dynamic, 1)
        for (int64_t item = 0; item < Bsz * nhb; ++item) {
            if (!work) continue;
            const int64_t b = item / nhb, h0 = (item % nhb) * hb, h1 = h0 + hb < H ? h0 + hb : H;
            if (N == 16)
                bwd_block(x, dt, A, Bm, Cm, ck, dy, dsT, dx, ddt, dA_b, dB, dC, ds0, b, h0, h1, T, H, P, 16, K, work);
            else
                bwd_block(x, dt, A, Bm, Cm, ck, dy, dsT, dx, ddt, dA_b, dB, dC, ds0, b, h0, h1, T, H, P, N, K, work);
        }
        free(work);
        FTZ_END
    }
    return failed;
}
