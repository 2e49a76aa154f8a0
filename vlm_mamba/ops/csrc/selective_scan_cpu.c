/* Mamba-1 selective scan on the CPU: forward and backward fused over time, W channels at a time (one
 * SIMD lane per channel), so no (l, b, e, n) tensor is ever written to memory.
 *
 * Built on first use by vlm_mamba/ops/cpu_kernels.py with the system C compiler and loaded with
 * ctypes (no Python or torch headers: it compiles in well under a second). fp32, contiguous.
 *
 mamba_ssm's selective_scan_fn, per channel e and state n:
 *   dt_t = softplus(delta_t + delta_bias)        (softplus and the bias optional)
 *   h_t  = exp(dt_t * A) * h_{t-1} + dt_t * u_t * B_t
 *   y_t  = (sum_n C_t[n] * h_t[n] + D * u_t) * silu(z_t)        (D and z optional)
 *
 * Layouts, channels last so that W neighbouring channels fill a vector:
 *   u, delta, z, y and their gradients (b,l,e);  A, dA (n,e);  D, delta_bias (e);
 *   B, C, dB, dC (b,g,l,n);  h0, h_last, dh0, dh_last (b,e,n).
 * E and E / G must be multiples of W (the caller checks). Channel e reads group e / (E / G). Each call
 * handles batch rows [b0, b1): the caller runs disjoint row ranges on separate threads. dB and dC are
 * per row; dA, dD and d(delta_bias) are sums over rows, so each thread gets its own (n + 2, e) buffer.
 *
 * The lanes are GCC/Clang vector extensions (W floats: one AVX-512 register, two AVX2 ones, ...), so
 * the code is vectorised whatever the auto-vectoriser decides. exp and log are Cephes' polynomials
 * (relative error ~2e-7) rather than libm's, for the same reason and without -ffast-math (whose
 * crtfastmath.o would turn on flush-to-zero for the whole process).
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define W 16
typedef float vf __attribute__((vector_size(W * sizeof(float))));
typedef int32_t vi __attribute__((vector_size(W * sizeof(int32_t))));

static inline vf vload(const float *p) {
    vf v;
    memcpy(&v, p, sizeof v);
    return v;
}

static inline void vstore(float *p, vf v) { memcpy(p, &v, sizeof v); }

static inline vf vsplat(float x) { return (vf){0} + x; }

static inline float vsum(vf v) {
    float s = 0.0f;
    for (int j = 0; j < W; ++j) s += v[j];
    return s;
}

static inline vf vselect(vi mask, vf a, vf b) { return (vf)(((vi)a & mask) | ((vi)b & ~mask)); }

static inline vf vexp(vf x) {
    x = vselect(x < -87.0f, vsplat(-87.0f), x);
    x = vselect(x > 88.0f, vsplat(88.0f), x);
    const vf fx = x * 1.44269504088896341f + 0.5f;
    vf kf = __builtin_convertvector(__builtin_convertvector(fx, vi), vf); /* truncation ... */
    kf += __builtin_convertvector(kf > fx, vf);                          /* ... to floor */
    const vf r = x - kf * 0.693359375f + kf * 2.12194440e-4f;
    vf p = vsplat(1.9875691500e-4f);
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    return p * (vf)((__builtin_convertvector(kf, vi) + 127) << 23);
}

/* natural log for x > 0 (Cephes logf) */
static inline vf vlog(vf x) {
    const vi bits = (vi)x;
    vf e = __builtin_convertvector(((bits >> 23) & 0xff) - 126, vf);
    vf m = (vf)((bits & 0x807fffff) | 0x3f000000); /* mantissa in [0.5, 1) */
    const vi small = m < 0.707106781186547524f;
    e -= __builtin_convertvector(small, vf) * -1.0f;
    m = vselect(small, m + m, m) - 1.0f;
    const vf z = m * m;
    vf y = vsplat(7.0376836292e-2f);
    y = y * m - 1.1514610310e-1f;
    y = y * m + 1.1676998740e-1f;
    y = y * m - 1.2420140846e-1f;
    y = y * m + 1.4249322787e-1f;
    y = y * m - 1.6668057665e-1f;
    y = y * m + 2.0000714765e-1f;
    y = y * m - 2.4999993993e-1f;
    y = y * m + 3.3333331174e-1f;
    y = y * m * z + e * -2.12194440e-4f - 0.5f * z;
    return m + y + e * 0.693359375f;
}

/* below -80 both softplus and sigmoid are < 2e-35: exactly 0 here, so padding steps (dt = softplus(-1e4))
 * are exact identity steps and no denormal ever enters the arithmetic */
#define UNDERFLOW -80.0f

static inline vf vsigmoid(vf x) { return vselect(x < UNDERFLOW, vsplat(0.0f), 1.0f / (1.0f + vexp(-x))); }

/* softplus as torch computes it: x above 20, else log1p(exp(x)) (log1p by Goldberg's correction) */
static inline vf vsoftplus(vf x) {
    const vf y = vexp(x), u = 1.0f + y;
    const vi exact = u == 1.0f;
    const vf l1p = vselect(exact, y, vlog(u) * (y / vselect(exact, vsplat(1.0f), u - 1.0f)));
    return vselect(x > 20.0f, x, vselect(x < UNDERFLOW, vsplat(0.0f), l1p));
}

/* the step sizes of one time step: softplus(delta + bias) or delta as given */
static inline vf step_dt(const float *delta, const float *bias, int softplus, int64_t off, int64_t e0,
                         vf *raw) {
    vf d = vload(delta + off);
    if (bias) d += vload(bias + e0);
    *raw = d;
    return softplus ? vsoftplus(d) : d;
}

/* h[n] (W lanes) <- h0 rows e0..e0+W of batch b, or zeros */
static void load_state(vf *h, const float *h0, int64_t b, int64_t e0, int64_t E, int64_t N) {
    for (int64_t n = 0; n < N; ++n)
        for (int j = 0; j < W; ++j) h[n][j] = h0 ? h0[(b * E + e0 + j) * N + n] : 0.0f;
}

static void store_state(float *dst, const vf *h, int64_t b, int64_t e0, int64_t E, int64_t N) {
    for (int64_t n = 0; n < N; ++n)
        for (int j = 0; j < W; ++j) dst[(b * E + e0 + j) * N + n] = h[n][j];
}

int vlm_scan_fwd(const float *u, const float *delta, const float *A, const float *B, const float *C,
                 const float *D, const float *z, const float *delta_bias, int64_t softplus, const float *h0,
                 float *y, float *h_last, int64_t E, int64_t L, int64_t N, int64_t G, int64_t b0,
                 int64_t b1) {
    vf *h = (vf *)aligned_alloc(sizeof(vf), sizeof(vf) * (size_t)N);
    if (!h) return 1;
    const int64_t per_group = E / G;
    for (int64_t b = b0; b < b1; ++b) {
        for (int64_t e0 = 0; e0 < E; e0 += W) {
            const int64_t grp = b * G + e0 / per_group;
            const vf Dv = D ? vload(D + e0) : vsplat(0.0f);
            load_state(h, h0, b, e0, E, N);
            for (int64_t t = 0; t < L; ++t) {
                const int64_t off = (b * L + t) * E + e0;
                const float *Bt = B + (grp * L + t) * N, *Ct = C + (grp * L + t) * N;
                vf raw;
                const vf dt = step_dt(delta, delta_bias, (int)softplus, off, e0, &raw), ut = vload(u + off);
                const vf du = dt * ut;
                vf acc = Dv * ut;
                for (int64_t n = 0; n < N; ++n) {
                    h[n] = vexp(dt * vload(A + n * E + e0)) * h[n] + du * Bt[n];
                    acc += h[n] * Ct[n];
                }
                if (z) {
                    const vf zt = vload(z + off);
                    acc *= zt * vsigmoid(zt);
                }
                vstore(y + off, acc);
            }
            if (h_last) store_state(h_last, h, b, e0, E, N);
        }
    }
    free(h);
    return 0;
}

/* dB, dC: zeroed by the caller (accumulated over the channels of a group). acc (n + 2, e), zeroed by
 * the caller, one per thread: rows 0..n-1 dA, row n dD, row n+1 d(delta_bias). h0, dh_last, dh0, D,
 * z, dz, delta_bias may be NULL (dz is written when z is given). */
int vlm_scan_bwd(const float *u, const float *delta, const float *A, const float *B, const float *C,
                 const float *D, const float *z, const float *delta_bias, int64_t softplus, const float *h0,
                 const float *dy, const float *dh_last, float *du, float *ddelta, float *dz, float *acc,
                 float *dB, float *dC, float *dh0, int64_t E, int64_t L, int64_t N, int64_t G, int64_t b0,
                 int64_t b1) {
    /* hs[t * N + n]: the state before step t (t = 0: h0) up to the last (t = L); as[t * N + n] decays;
     * ys[t]: the output before the gate; dBv, dCv: dB, dC per lane, summed over the lanes once per
     * (row, group) rather than once per block of W channels */
    vf *hs = (vf *)aligned_alloc(sizeof(vf), sizeof(vf) * (size_t)((L + 1) * N));
    vf *as = (vf *)aligned_alloc(sizeof(vf), sizeof(vf) * (size_t)(L * N));
    vf *ys = (vf *)aligned_alloc(sizeof(vf), sizeof(vf) * (size_t)L);
    vf *g = (vf *)aligned_alloc(sizeof(vf), sizeof(vf) * (size_t)N);
    vf *dBv = (vf *)aligned_alloc(sizeof(vf), sizeof(vf) * (size_t)(L * N));
    vf *dCv = (vf *)aligned_alloc(sizeof(vf), sizeof(vf) * (size_t)(L * N));
    int status = 1; /* 1: a buffer could not be allocated */
    if (!hs || !as || !ys || !g || !dBv || !dCv) goto done;
    const int64_t per_group = E / G;
    float *dD_acc = acc + N * E, *dbias_acc = acc + (N + 1) * E;
    for (int64_t b = b0; b < b1; ++b) {
        for (int64_t e0 = 0; e0 < E; e0 += W) {
            const int64_t grp = b * G + e0 / per_group;
            const float *Bg = B + grp * L * N, *Cg = C + grp * L * N;
            if (e0 % per_group == 0) { /* a new group: fresh lane accumulators */
                memset(dBv, 0, sizeof(vf) * (size_t)(L * N));
                memset(dCv, 0, sizeof(vf) * (size_t)(L * N));
            }
            const vf Dv = D ? vload(D + e0) : vsplat(0.0f);
            vf dD = vsplat(0.0f), dbias = vsplat(0.0f);
            load_state(hs, h0, b, e0, E, N);
            for (int64_t t = 0; t < L; ++t) { /* recompute the states, keep the decays */
                const int64_t off = (b * L + t) * E + e0;
                vf raw;
                const vf dt = step_dt(delta, delta_bias, (int)softplus, off, e0, &raw), ut = vload(u + off);
                const vf dux = dt * ut;
                vf yt = Dv * ut;
                for (int64_t n = 0; n < N; ++n) {
                    const vf a = vexp(dt * vload(A + n * E + e0));
                    const vf hn = a * hs[t * N + n] + dux * Bg[t * N + n];
                    as[t * N + n] = a;
                    hs[(t + 1) * N + n] = hn;
                    yt += hn * Cg[t * N + n];
                }
                ys[t] = yt;
            }
            if (dh_last) load_state(g, dh_last, b, e0, E, N);
            else memset(g, 0, sizeof(vf) * (size_t)N);
            for (int64_t t = L - 1; t >= 0; --t) { /* g = dL/dh_t, walking back in time */
                const int64_t off = (b * L + t) * E + e0;
                vf raw;
                const vf dt = step_dt(delta, delta_bias, (int)softplus, off, e0, &raw), ut = vload(u + off);
                vf gy = vload(dy + off); /* dL/d(output before the gate) below */
                if (z) {
                    const vf zt = vload(z + off), sg = vsigmoid(zt);
                    vstore(dz + off, gy * ys[t] * sg * (1.0f + zt * (1.0f - sg)));
                    gy *= zt * sg;
                }
                dD += gy * ut;
                const vf dtu = dt * ut;
                vf acc_d = vsplat(0.0f), acc_u = vsplat(0.0f);
                for (int64_t n = 0; n < N; ++n) {
                    const vf An = vload(A + n * E + e0), a = as[t * N + n];
                    const float bn = Bg[t * N + n], cn = Cg[t * N + n];
                    const vf gj = g[n] + gy * cn;
                    const vf gah = gj * a * hs[t * N + n]; /* dL/d(dt A) */
                    dCv[t * N + n] += gy * hs[(t + 1) * N + n];
                    dBv[t * N + n] += gj * dtu;
                    acc_d += gah * An + gj * ut * bn;
                    acc_u += gj * bn;
                    vstore(acc + n * E + e0, vload(acc + n * E + e0) + gah * dt);
                    g[n] = gj * a;
                }
                if (softplus) acc_d *= vsigmoid(raw);
                dbias += acc_d;
                vstore(ddelta + off, acc_d);
                vstore(du + off, acc_u * dt + gy * Dv);
            }
            vstore(dD_acc + e0, vload(dD_acc + e0) + dD);
            vstore(dbias_acc + e0, vload(dbias_acc + e0) + dbias);
            if (dh0) store_state(dh0, g, b, e0, E, N);
            if ((e0 + W) % per_group == 0) { /* the group's last block: sum the lanes */
                float *dBg = dB + grp * L * N, *dCg = dC + grp * L * N;
                for (int64_t i = 0; i < L * N; ++i) {
                    dBg[i] += vsum(dBv[i]);
                    dCg[i] += vsum(dCv[i]);
                }
            }
        }
    }
    status = 0;
done:
    free(hs);
    free(as);
    free(ys);
    free(g);
    free(dBv);
    free(dCv);
    return status;
}
