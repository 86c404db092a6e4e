/* y = x @ W^T (+ bias) with W kept quantized: GGUF blocks (Q8_0, Q4_0, Q4_1, Q4_K, Q5_K, Q6_K) or
 * block-scaled FP8 (e4m3), dequantized inside the matmul; fp32 x and y; AVX2/FMA or AVX-512.
 *
 * Exactness. Every output is the same float the fp32 GEMM (cpu_gemm.c) gives over the weights
 * dequantized at load by gguf.quants (or FP8's reference): each weight is dequantized with exactly
 * numpy's operations (a multiply and an add are two roundings: this file is compiled with
 * -ffp-contract=off, so the compiler never fuses them into an FMA, and without -ffast-math), into
 * a 16-row panel block of fp32 laid out like cpu_gemm.c's packed panels, and that block goes
 * through the very same micro-kernel (gemm_micro.h): one chain of FMAs over k, in order, per
 * output, whatever the row count or thread count.
 *
 * Layout. W (N, K) is repacked once from its GGUF rows into panels of 16 rows; a panel is its blocks
 * along k, each block a *record* holding the 16 rows' fields side by side, so that one vector load
 * gives one field for 16 rows (GGUF keeps a row's block together: good for a dot product along k,
 * which would sum in another order). Same fields, same bits; only the K-quants' 6-bit scales are
 * unpacked to bytes (+3% bytes). Per 16 rows (lane r), offsets in bytes:
 *
 *   Q8_0 (32 k)   d fp16[16] @0 | q int8 @32 + kk*16 + r
 *   Q4_0 (32 k)   d @0 | nibble pairs @32 + j*16 + r: q[2j] | q[2j+1] << 4
 *   Q4_1 (32 k)   d @0 | m @32 | pairs @64
 *   Q4_K (256 k)  d @0 | dmin @32 | sc u8 @64 + s*16 | m u8 @192 + s*16 | pairs @320 (128 of them)
 *   Q5_K (256 k)  as Q4_K (low 4 bits) | 5th bits @2368 + o*16 + r: bit t is k = 8o + t
 *   Q6_K (256 k)  d @0 | sc int8 @32 + g*16 | pairs of low nibbles @288 | top 2 bits @2336 + u*16 + r:
 *                 bits 2t..2t+1 are k = 4u + t
 *   FP8  (128 k)  scale f32[16] @0 | q e4m3 @64 + kk*16 + r
 *
 * Rows past N are zeros (their outputs are never stored). Threads share the panels; each panel's k
 * blocks (QKB) are dequantized once into the thread's scratch and used by all M rows of x.
 */
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <string.h>

#include "gemm_micro.h" /* NR, micro, rows_kblock */

#ifndef QKB
#define QKB 256 /* k per dequantized panel block: 16 KB of fp32, L1-resident */
#endif

enum { Q8_0, Q4_0, Q4_1, Q4_K, Q5_K, Q6_K, FP8, NTYPES };

/* Panels go in groups of SP, interleaved by block: a group's SP records of one k block are adjacent,
 * so a thread working through a group (the few-rows path below) reads one sequential stream, which
 * the hardware prefetcher follows (four separate streams measured ~35% slower from L3). */
#if defined(__AVX512F__) && !defined(TANDEM_GEMM_AVX2)
#define SP 4
#else
#define SP 2
#endif
static inline int64_t rec_at(int64_t p, int64_t b, int64_t blocks, int64_t rec_bytes) {
    return ((p / SP * blocks + b) * SP + p % SP) * rec_bytes;
}
static const int64_t BLOCK_K[NTYPES] = {32, 32, 32, 256, 256, 256, 128};
static const int64_t GGUF_BYTES[NTYPES] = {34, 18, 20, 144, 176, 210, 128}; /* FP8: q bytes only */
static const int64_t RECORD[NTYPES] = {544, 288, 320, 2368, 2880, 3360, 2112};

int tandem_quant_supported(void) {
#if defined(HAVE_MICRO) && defined(__F16C__)
#if defined(__AVX512F__) && !defined(TANDEM_GEMM_AVX2)
    return 512;
#else
    return 256;
#endif
#else
    return 0;
#endif
}

int64_t tandem_quant_packed_bytes(int t, int64_t n, int64_t k) {
    if (t < 0 || t >= NTYPES || k % BLOCK_K[t]) return -1;
    return ((n + NR - 1) / NR + SP - 1) / SP * SP * (k / BLOCK_K[t]) * RECORD[t];
}

/* ---- repacking (once, at load) ---------------------------------------------------------------- */

/* One GGUF block of one row -> its quants q[0..qk) (unsigned, as stored: Q8_0 and FP8 as raw
 * bytes), fp16 d and m/dmin bits, and per-sub-block scales sc / mins mn. */
static void unpack_block(int t, const uint8_t *b, uint8_t *q, uint16_t *d, uint16_t *mm, uint8_t *sc,
                         uint8_t *mn) {
    switch (t) {
    case Q8_0:
        memcpy(d, b, 2);
        memcpy(q, b + 2, 32);
        break;
    case Q4_0:
    case Q4_1: {
        const uint8_t *qs = b + (t == Q4_0 ? 2 : 4);
        memcpy(d, b, 2);
        if (t == Q4_1) memcpy(mm, b + 2, 2);
        for (int i = 0; i < 16; i++) q[i] = qs[i] & 15, q[i + 16] = qs[i] >> 4;
        break;
    }
    case Q4_K:
    case Q5_K: {
        memcpy(d, b, 2);
        memcpy(mm, b + 2, 2);
        const uint8_t *s = b + 4;
        for (int j = 0; j < 4; j++) {
            sc[j] = s[j] & 63, mn[j] = s[j + 4] & 63;
            sc[j + 4] = (s[j + 8] & 15) | ((s[j] >> 6) << 4);
            mn[j + 4] = (s[j + 8] >> 4) | ((s[j + 4] >> 6) << 4);
        }
        const uint8_t *qs = b + (t == Q4_K ? 16 : 48), *qh = b + 16;
        for (int c = 0; c < 4; c++)
            for (int i = 0; i < 32; i++) q[c * 64 + i] = qs[c * 32 + i] & 15, q[c * 64 + 32 + i] = qs[c * 32 + i] >> 4;
        if (t == Q5_K)
            for (int j = 0; j < 8; j++)
                for (int i = 0; i < 32; i++) q[j * 32 + i] |= ((qh[i] >> j) & 1) << 4;
        break;
    }
    case Q6_K: {
        const uint8_t *ql = b, *qh = b + 128;
        memcpy(sc, b + 192, 16);
        memcpy(d, b + 208, 2);
        for (int h = 0; h < 2; h++)
            for (int i = 0; i < 64; i++) {
                q[h * 128 + i] = ql[h * 64 + i] & 15;
                q[h * 128 + 64 + i] = ql[h * 64 + i] >> 4;
            }
        for (int h = 0; h < 2; h++)
            for (int s = 0; s < 4; s++)
                for (int i = 0; i < 32; i++) q[h * 128 + s * 32 + i] |= ((qh[h * 32 + i] >> (2 * s)) & 3) << 4;
        break;
    }
    default:
        break;
    }
}

/* lane r of a record from one row's unpacked block */
static void put_lane(int t, uint8_t *rec, int r, const uint8_t *q, uint16_t d, uint16_t mm, const uint8_t *sc,
                     const uint8_t *mn) {
    uint16_t *h = (uint16_t *)rec;
    switch (t) {
    case Q8_0:
        h[r] = d;
        for (int kk = 0; kk < 32; kk++) rec[32 + kk * 16 + r] = q[kk];
        break;
    case Q4_0:
    case Q4_1: {
        const int at = t == Q4_0 ? 32 : 64;
        h[r] = d;
        if (t == Q4_1) h[16 + r] = mm;
        for (int j = 0; j < 16; j++) rec[at + j * 16 + r] = q[2 * j] | q[2 * j + 1] << 4;
        break;
    }
    case Q4_K:
    case Q5_K:
        h[r] = d, h[16 + r] = mm;
        for (int s = 0; s < 8; s++) rec[64 + s * 16 + r] = sc[s], rec[192 + s * 16 + r] = mn[s];
        for (int j = 0; j < 128; j++) rec[320 + j * 16 + r] = (q[2 * j] & 15) | (q[2 * j + 1] & 15) << 4;
        if (t == Q5_K)
            for (int o = 0; o < 32; o++) {
                uint8_t bits = 0;
                for (int i = 0; i < 8; i++) bits |= ((q[8 * o + i] >> 4) & 1) << i;
                rec[2368 + o * 16 + r] = bits;
            }
        break;
    case Q6_K:
        h[r] = d;
        for (int g = 0; g < 16; g++) rec[32 + g * 16 + r] = sc[g];
        for (int j = 0; j < 128; j++) rec[288 + j * 16 + r] = (q[2 * j] & 15) | (q[2 * j + 1] & 15) << 4;
        for (int u = 0; u < 64; u++) {
            uint8_t bits = 0;
            for (int i = 0; i < 4; i++) bits |= ((q[4 * u + i] >> 4) & 3) << (2 * i);
            rec[2336 + u * 16 + r] = bits;
        }
        break;
    default:
        break;
    }
}

/* GGUF rows w (N rows of K / qk blocks, rows `stride` bytes apart) -> panels. FP8 instead takes the
 * e4m3 bytes (N, K) in w and the fp32 scales (ceil(N / bn), K / 128) in `scales`, block rows bn. */
int tandem_quant_pack(int t, const uint8_t *w, int64_t stride, int64_t n, int64_t k, const float *scales,
                      int64_t bn, uint8_t *out) {
    if (tandem_quant_packed_bytes(t, n, k) < 0) return -1;
    const int64_t qk = BLOCK_K[t], blocks = k / qk, rec_bytes = RECORD[t];
    const int64_t panels = (n + NR - 1) / NR;
    memset(out, 0, (size_t)tandem_quant_packed_bytes(t, n, k));
#pragma omp parallel for schedule(static)
    for (int64_t p = 0; p < panels; p++) {
        uint8_t q[256], sc[16] = {0}, mn[8] = {0};
        for (int64_t b = 0; b < blocks; b++) {
            uint8_t *rec = out + rec_at(p, b, blocks, rec_bytes);
            for (int r = 0; r < NR && p * NR + r < n; r++) {
                const int64_t row = p * NR + r;
                if (t == FP8) {
                    memcpy((float *)rec + r, scales + (row / bn) * blocks + b, 4);
                    for (int kk = 0; kk < 128; kk++) rec[64 + kk * 16 + r] = w[row * stride + b * 128 + kk];
                    continue;
                }
                uint16_t d = 0, mm = 0;
                unpack_block(t, w + row * stride + b * GGUF_BYTES[t], q, &d, &mm, sc, mn);
                put_lane(t, rec, r, q, d, mm, sc, mn);
            }
        }
    }
    return 0;
}

#include "quant_dequant.h" /* vf / vi lanes, dq_pair, dq_sub, dq_record */

#ifdef HAVE_MICRO
/* ---- few rows: several panels at once ------------------------------------------------------------
 * With one row of x (a decode step of one stream) a panel is one chain of FMAs, each waiting on the
 * last (4 cycles): the dequantization finishes long before the chain. So up to SM rows go through
 * SP panels at a time: 32 k of each panel dequantized into L1, then SP * rows independent chains,
 * kept in registers over all of k. Each output is still one chain over k in order, the same
 * floats as rows_kblock gives. */
#if defined(__AVX512F__) && !defined(TANDEM_GEMM_AVX2)
#define SM 4
static inline vf vzero(void) { return _mm512_setzero_ps(); }
static inline vf vfma_x(const float *x, vf w, vf a) { return _mm512_fmadd_ps(_mm512_set1_ps(*x), w, a); }
#else
#define SM 2
static inline vf vzero(void) { return (vf){_mm256_setzero_ps(), _mm256_setzero_ps()}; }
static inline vf vfma_x(const float *x, vf w, vf a) {
    const __m256 xv = _mm256_broadcast_ss(x);
    return (vf){_mm256_fmadd_ps(xv, w.a, a.a), _mm256_fmadd_ps(xv, w.b, a.b)};
}
#endif

static inline __attribute__((always_inline)) void few_rows(const int t, const float *restrict x, int64_t x_stride,
                                                           const int mr, const uint8_t *restrict src, const int np,
                                                           int64_t k, float *restrict out) {
    vf acc[SP][SM];
    for (int p = 0; p < np; p++)
        for (int i = 0; i < mr; i++) acc[p][i] = vzero();
    const int64_t qk = BLOCK_K[t], rec_bytes = RECORD[t];
    for (int64_t k0 = 0; k0 < k; k0 += 32) {
        const uint8_t *rec = src + (k0 / qk) * SP * rec_bytes; /* the group's records of this block */
        const int s = (int)(k0 % qk / 32);
        for (int j = 0; j < 16; j++)
            for (int p = 0; p < np; p++) {
                vf w0, w1;
                dq_pair(t, rec + p * rec_bytes, s, j, &w0, &w1); /* dequantized in registers */
                for (int i = 0; i < mr; i++) acc[p][i] = vfma_x(x + i * x_stride + k0 + 2 * j, w0, acc[p][i]);
                for (int i = 0; i < mr; i++) acc[p][i] = vfma_x(x + i * x_stride + k0 + 2 * j + 1, w1, acc[p][i]);
            }
    }
    for (int p = 0; p < np; p++)
        for (int i = 0; i < mr; i++) st(out + (i * SP + p) * NR, acc[p][i]);
}

/* the (type, panels, rows) combination as constants, so every loop above unrolls into registers */
#define FEW(T, NP, MR) few_rows(T, x, x_stride, MR, src, NP, k, out)
#define FEW_ROWS(T, NP)                                                                                    \
    switch (mr) {                                                                                          \
    case 1: FEW(T, NP, 1); break;                                                                          \
    case 2: FEW(T, NP, 2); break;                                                                          \
    SM_CASES(T, NP)                                                                                        \
    default: break;                                                                                        \
    }
#if SM > 2
#define SM_CASES(T, NP)                                                                                    \
    case 3: FEW(T, NP, 3); break;                                                                          \
    case 4: FEW(T, NP, 4); break;
#define SP_CASES(T)                                                                                        \
    case 3: FEW_ROWS(T, 3); break;                                                                         \
    case 4: FEW_ROWS(T, 4); break;
#else
#define SM_CASES(T, NP)
#define SP_CASES(T)
#endif
#define FEW_PANELS(T)                                                                                      \
    switch (np) {                                                                                          \
    case 1: FEW_ROWS(T, 1); break;                                                                         \
    case 2: FEW_ROWS(T, 2); break;                                                                         \
    SP_CASES(T)                                                                                            \
    default: break;                                                                                        \
    }

static void few_rows_any(int t, const float *x, int64_t x_stride, int mr, const uint8_t *src, int np, int64_t k,
                         float *out) {
    switch (t) {
    case Q8_0: FEW_PANELS(Q8_0); break;
    case Q4_0: FEW_PANELS(Q4_0); break;
    case Q4_1: FEW_PANELS(Q4_1); break;
    case Q4_K: FEW_PANELS(Q4_K); break;
    case Q5_K: FEW_PANELS(Q5_K); break;
    case Q6_K: FEW_PANELS(Q6_K); break;
    case FP8: FEW_PANELS(FP8); break;
    default: break;
    }
}
#endif

/* The dequantized panels themselves ((ceil(N/16), K, 16) fp32, cpu_gemm.c's packed layout): what
 * the kernel multiplies by, for tests. */
int tandem_quant_unpack(int t, const uint8_t *packed, int64_t n, int64_t k, float *out) {
#ifdef HAVE_MICRO
    if (tandem_quant_packed_bytes(t, n, k) < 0) return -1;
    const int64_t blocks = k / BLOCK_K[t], panels = (n + NR - 1) / NR;
    for (int64_t p = 0; p < panels; p++)
        for (int64_t b = 0; b < blocks; b++)
            dq_record(t, packed + rec_at(p, b, blocks, RECORD[t]), out + (p * k + b * BLOCK_K[t]) * NR);
    return 0;
#else
    (void)t, (void)packed, (void)n, (void)k, (void)out;
    return -1;
#endif
}

/* y (M, N) = x (M, K; rows x_stride apart) @ W^T + bias, W packed by tandem_quant_pack; bias NULL or
 * N floats; scratch: threads * (QKB + M) * 16 floats. Returns -1 where the kernel is not compiled in. */
int tandem_quant_gemm(int t, const float *restrict x, int64_t x_stride, int64_t m, const uint8_t *restrict packed,
                      int64_t n, int64_t k, const float *restrict bias, float *restrict y, float *restrict scratch,
                      int threads) {
#ifdef HAVE_MICRO
    if (tandem_quant_packed_bytes(t, n, k) < 0) return -1;
    const int64_t qk = BLOCK_K[t], blocks = k / qk, rec_bytes = RECORD[t];
    const int64_t panels = (n + NR - 1) / NR, per_thread = (QKB + m) * NR;
    if (m <= SM) {
        /* every row of x at once, up to SP panels at a time; each thread takes an equal run of
         * panels (whole groups where it can, a part of one at either end), so a projection of 36
         * panels splits 18 / 18 rather than 5 groups / 4 */
#pragma omp parallel num_threads(threads)
        {
            const int nt = omp_get_num_threads(), tid = omp_get_thread_num();
            float *out = scratch + (int64_t)tid * per_thread;
            const int64_t p1 = panels * (tid + 1) / nt;
            for (int64_t p = panels * tid / nt; p < p1;) {
                const int64_t g = p / SP, o = p % SP;
                const int np = (int)(SP - o < p1 - p ? SP - o : p1 - p);
                /* panel o of group g: the group's records of a block are SP apart */
                few_rows_any(t, x, x_stride, (int)m, packed + (g * SP * blocks + o) * rec_bytes, np, k, out);
                for (int64_t i = 0; i < m; i++)
                    for (int64_t c = p * NR; c < n && c < (p + np) * NR; c++) {
                        const float a = out[i * SP * NR + (c - p * NR)];
                        y[i * n + c] = bias ? a + bias[c] : a;
                    }
                p += np;
            }
        }
        return 0;
    }
    const int64_t step = QKB / qk * qk; /* k per panel block: whole records */
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t p = 0; p < panels; p++) {
        float *w = scratch + (int64_t)omp_get_thread_num() * per_thread, *acc = w + QKB * NR;
        for (int64_t k0 = 0; k0 < k; k0 += step) {
            const int64_t kn = k - k0 < step ? k - k0 : step;
            for (int64_t b = 0; b < kn / qk; b++)
                dq_record(t, packed + rec_at(p, k0 / qk + b, blocks, rec_bytes), w + b * qk * NR);
            rows_kblock(x + k0, x_stride, m, w, kn, acc, k0 == 0, NULL);
        }
        const int64_t c0 = p * NR, cols = n - c0 < NR ? n - c0 : NR;
        for (int64_t i = 0; i < m; i++)
            for (int64_t j = 0; j < cols; j++)
                y[i * n + c0 + j] = bias ? acc[i * NR + j] + bias[c0 + j] : acc[i * NR + j];
    }
    return 0;
#else
    (void)t, (void)x, (void)x_stride, (void)m, (void)packed, (void)n, (void)k, (void)bias, (void)y, (void)scratch,
        (void)threads;
    return -1;
#endif
}
