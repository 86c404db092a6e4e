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
#include <omp.h>
#include <stdint.h>
#include <string.h>

#include "gemm_micro.h" /* NR, the micro-kernels, rows_kblock */
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

#ifdef HAVE_MICRO

/* all m rows of x against one panel, k in blocks of KB so the panel's block stays in L1 while the
 * row blocks reuse it; acc is m x 16 floats of scratch. */
static void panel_rows(const float *restrict x, int64_t x_stride, int64_t m, const float *restrict panel,
                       int64_t k, const float *restrict next, float *restrict acc) {
    for (int64_t k0 = 0; k0 < k; k0 += KB) {
        const int64_t kn = k - k0 < KB ? k - k0 : KB;
        rows_kblock(x + k0, x_stride, m, panel + k0 * NR, kn, acc, k0 == 0, next ? next + k0 * NR : NULL);
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
