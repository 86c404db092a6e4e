/* fp32 matrix multiply for the model's projections on an AVX2/FMA or AVX-512 CPU: y = x @ W^T (+ bias).
 *
 * Every output element y[m, n] is one chain of fused multiply-adds over k = 0 .. K-1, in that order,
 * in one vector lane, whatever M, the blocking or the thread count: a row's result never depends on
 * which other rows share the call (batch invariance, tested), so a request's logits are the same in
 * a decode-only step, in a step shared with a prefill chunk, on a prefill worker and on a decode
 * worker.
 *
 * W (N, K) is packed once into panels of NR = 16 outputs: panel p holds W[16p + j][k] at
 * (p*K + k)*16 + j, zero-padded past N, so a panel is one contiguous stream. The AVX2 micro-kernel
 * keeps a 6 x 16 block of y in 12 AVX registers; per k it loads the panel's 16 weights (two vectors)
 * and broadcasts 6 x values: 12 FMAs. Built with AVX-512 (unless TANDEM_CPU_CAPABILITY caps it), a
 * 12 x 16 block in 12 zmm registers instead (below). Blocking (none of it changes any element's
 * chain over k):
 *  - rows in chunks of MC, panels shared among OpenMP threads (torch's own runtime: the object links
 *    libgomp by soname), each thread running every row chunk against one panel before the next;
 *  - k in blocks of KB: a panel's block stays in L1 while the chunk's row blocks reuse it; the
 *    accumulators go to a scratch tile between k blocks;
 *  - the panel DIST ahead is prefetched during the first row block, so a decode step's few rows do
 *    not wait on DRAM for each panel.
 * MC = 48 and KB = 512 measured best of the sizes tried (`tandem bench kernels`, bench model, all
 * 8 layers' projections, weights streamed from DRAM): on 2 AVX2 cores (AMD EPYC, an earlier
 * machine), against torch's prepacked oneDNN 1.43x at 16 rows and 1.08-1.13x at 512; on 2 AVX-512
 * cores (AMD EPYC, Zen 4) see docs/benchmarks.md.
 *
 * Built without -ffast-math: the arithmetic is exactly the intrinsics below.
 */
#include <immintrin.h>
#include <omp.h>
#include <stdint.h>
#include <string.h>

#define NR 16
#define MR 6
#ifndef DIST
#define DIST 2
#endif
#ifndef MC
#define MC 48
#endif
#ifndef KB
#define KB 512
#endif

/* 0: not compiled in (no AVX2/FMA); else the vector width in bits of the micro-kernel built */
int tandem_gemm_supported(void) {
#if defined(__AVX512F__) && !defined(TANDEM_GEMM_AVX2)
    return 512;
#elif defined(__AVX2__) && defined(__FMA__)
    return 256;
#else
    return 0;
#endif
}

/* W (N, K) row-major -> packed (ceil(N/16), K, 16). */
void tandem_gemm_pack_f32(const float *restrict w, int64_t n, int64_t k, float *restrict packed) {
    const int64_t panels = (n + NR - 1) / NR;
    for (int64_t p = 0; p < panels; p++)
        for (int64_t kk = 0; kk < k; kk++)
            for (int j = 0; j < NR; j++) {
                const int64_t row = p * NR + j;
                packed[(p * k + kk) * NR + j] = row < n ? w[row * k + kk] : 0.0f;
            }
}

#if defined(__AVX512F__) && !defined(TANDEM_GEMM_AVX2)
/* AVX-512: one 16-wide zmm holds a panel's row of weights, so a row block is MR512 rows of one
 * accumulator each (12 of the 32 registers), and every broadcast of x folds into its FMA as an
 * embedded-broadcast memory operand: per k, 1 load and 12 FMAs against 2 loads, 6 broadcasts and
 * 12 FMAs of half the width on AVX2. Each output is still one FMA chain over k in order, so both
 * kernels give the same floats (tested). */
#define MR_BLOCK 12
static inline __attribute__((always_inline)) void micro(const float *restrict x, int64_t x_stride,
                                                        const float *restrict panel, int64_t kn,
                                                        float *restrict acc, int first, const int mr,
                                                        const float *restrict ahead) {
    __m512 a[MR_BLOCK];
    for (int i = 0; i < mr; i++) a[i] = first ? _mm512_setzero_ps() : _mm512_loadu_ps(acc + i * NR);
    for (int64_t kk = 0; kk < kn; kk++) {
        if (ahead) _mm_prefetch((const char *)(ahead + kk * NR), _MM_HINT_T0);
        const __m512 w = _mm512_loadu_ps(panel + kk * NR);
        for (int i = 0; i < mr; i++) a[i] = _mm512_fmadd_ps(_mm512_set1_ps(x[i * x_stride + kk]), w, a[i]);
    }
    for (int i = 0; i < mr; i++) _mm512_storeu_ps(acc + i * NR, a[i]);
}
#define HAVE_MICRO 1
#elif defined(__AVX2__) && defined(__FMA__)
#define MR_BLOCK MR
/* rows 0 .. mr-1 (mr <= 6) of x against kn steps of a panel, accumulating into acc (mr rows of 16,
 * read first unless this is the first k block). Storing and reloading a float accumulator does not
 * change it: the chain over k is the same as one unbroken loop. */
static inline __attribute__((always_inline)) void micro(const float *restrict x, int64_t x_stride,
                                                        const float *restrict panel, int64_t kn,
                                                        float *restrict acc, int first, const int mr,
                                                        const float *restrict ahead) {
    __m256 a0[MR], a1[MR];
    for (int i = 0; i < mr; i++) {
        a0[i] = first ? _mm256_setzero_ps() : _mm256_loadu_ps(acc + i * NR);
        a1[i] = first ? _mm256_setzero_ps() : _mm256_loadu_ps(acc + i * NR + 8);
    }
    for (int64_t kk = 0; kk < kn; kk++) {
        if (ahead) _mm_prefetch((const char *)(ahead + kk * NR), _MM_HINT_T0);
        const __m256 w0 = _mm256_loadu_ps(panel + kk * NR);
        const __m256 w1 = _mm256_loadu_ps(panel + kk * NR + 8);
        for (int i = 0; i < mr; i++) {
            const __m256 xv = _mm256_broadcast_ss(x + i * x_stride + kk);
            a0[i] = _mm256_fmadd_ps(xv, w0, a0[i]);
            a1[i] = _mm256_fmadd_ps(xv, w1, a1[i]);
        }
    }
    for (int i = 0; i < mr; i++) {
        _mm256_storeu_ps(acc + i * NR, a0[i]);
        _mm256_storeu_ps(acc + i * NR + 8, a1[i]);
    }
}
#define HAVE_MICRO 1
#endif

#ifdef HAVE_MICRO

/* all m rows of x against one panel, k in blocks of KB so the panel's block stays in L1 while the
 * row blocks reuse it; acc is m x 16 floats of scratch. */
static void panel_rows(const float *restrict x, int64_t x_stride, int64_t m, const float *restrict panel,
                       int64_t k, const float *restrict next, float *restrict acc) {
    for (int64_t k0 = 0; k0 < k; k0 += KB) {
        const int64_t kn = k - k0 < KB ? k - k0 : KB;
        const int first = k0 == 0;
        const float *ahead = next ? next + k0 * NR : NULL;
        const float *pk = panel + k0 * NR;
        int64_t m0 = 0;
        for (; m0 + MR_BLOCK <= m; m0 += MR_BLOCK, ahead = NULL)
            micro(x + m0 * x_stride + k0, x_stride, pk, kn, acc + m0 * NR, first, MR_BLOCK, ahead);
        const float *xm = x + m0 * x_stride + k0;
        float *am = acc + m0 * NR;
        switch (m - m0) { /* a constant row count per case, so each unrolls into registers */
#if MR_BLOCK > 6
        case 11: micro(xm, x_stride, pk, kn, am, first, 11, ahead); break;
        case 10: micro(xm, x_stride, pk, kn, am, first, 10, ahead); break;
        case 9: micro(xm, x_stride, pk, kn, am, first, 9, ahead); break;
        case 8: micro(xm, x_stride, pk, kn, am, first, 8, ahead); break;
        case 7: micro(xm, x_stride, pk, kn, am, first, 7, ahead); break;
        case 6: micro(xm, x_stride, pk, kn, am, first, 6, ahead); break;
#endif
        case 5: micro(xm, x_stride, pk, kn, am, first, 5, ahead); break;
        case 4: micro(xm, x_stride, pk, kn, am, first, 4, ahead); break;
        case 3: micro(xm, x_stride, pk, kn, am, first, 3, ahead); break;
        case 2: micro(xm, x_stride, pk, kn, am, first, 2, ahead); break;
        case 1: micro(xm, x_stride, pk, kn, am, first, 1, ahead); break;
        default: break;
        }
    }
}
#endif

/* y (M, N) = x (M, K; rows x_stride apart) @ W^T + bias; packed from tandem_gemm_pack_f32; bias
 * NULL or N floats; scratch: threads * MC * 16 floats. Returns -1 where the CPU path is not compiled
 * in. */
int tandem_gemm_f32(const float *restrict x, int64_t x_stride, int64_t m, const float *restrict packed,
                    int64_t n, int64_t k, const float *restrict bias, float *restrict y, float *restrict scratch,
                    int threads) {
#ifdef HAVE_MICRO
    const int64_t panels = (n + NR - 1) / NR, chunks = (m + MC - 1) / MC;
    /* work item: (panel, row chunk), panel outer: each panel streams from DRAM once and serves every
     * row chunk while it sits in L2, and the rows (a few MB at most) come from L3. Row chunks outer
     * read all the weights once per chunk: 64 rows took 25-30 ms against 18-20 (bench model, 2
     * AVX-512 cores); 16 and 512 rows unchanged. */
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t item = 0; item < chunks * panels; item++) {
        const int64_t p = item / chunks, c = item % chunks;
        const float *next = c == 0 && p + DIST < panels ? packed + (p + DIST) * k * NR : NULL;
        const int64_t r0 = c * MC, rows = m - r0 < MC ? m - r0 : MC;
        float *acc = scratch + (int64_t)omp_get_thread_num() * MC * NR;
        panel_rows(x + r0 * x_stride, x_stride, rows, packed + p * k * NR, k, next, acc);
        const int64_t c0 = p * NR, cols = n - c0 < NR ? n - c0 : NR;
        for (int64_t i = 0; i < rows; i++)
            for (int64_t j = 0; j < cols; j++)
                y[(r0 + i) * n + c0 + j] = bias ? acc[i * NR + j] + bias[c0 + j] : acc[i * NR + j];
    }
    return 0;
#else
    (void)x, (void)x_stride, (void)m, (void)packed, (void)n, (void)k, (void)bias, (void)y, (void)scratch,
        (void)threads;
    return -1;
#endif
}
