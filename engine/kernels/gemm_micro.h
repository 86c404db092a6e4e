/* The fp32 micro-kernel shared by cpu_gemm.c (packed fp32 weights) and cpu_quant_gemm.c (GGUF and
 * FP8 weights dequantized into an fp32 panel block first): the same code, so both give every output
 * as the same chain of FMAs over k in order, and a quantized matmul gives the same floats as the
 * fp32 one over the dequantized weights.
 *
 * A panel block is kn steps of NR = 16 weights (16 output rows at one k). micro() runs mr rows of x
 * against it, accumulating into acc (mr x 16 floats): loaded first unless `first`, stored at the end.
 * Storing and reloading a float accumulator does not change it, so a chain split over k blocks is
 * the chain of one unbroken loop. rows_kblock() runs all m rows of x over one panel block.
 */
#ifndef TANDEM_GEMM_MICRO_H
#define TANDEM_GEMM_MICRO_H
#include <immintrin.h>
#include <stdint.h>

#define NR 16
#define MR 6

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
/* all m rows of x (rows x_stride apart, starting at this k block) against one panel block of kn
 * steps; acc is m x 16 floats; ahead (or NULL) is prefetched during the first row block. */
static inline void rows_kblock(const float *restrict x, int64_t x_stride, int64_t m, const float *restrict pk,
                               int64_t kn, float *restrict acc, int first, const float *restrict ahead) {
    int64_t m0 = 0;
    for (; m0 + MR_BLOCK <= m; m0 += MR_BLOCK, ahead = NULL)
        micro(x + m0 * x_stride, x_stride, pk, kn, acc + m0 * NR, first, MR_BLOCK, ahead);
    const float *xm = x + m0 * x_stride;
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
#endif
#endif
