/* A mixture-of-experts layer's routed experts on the CPU, fp32: every active expert's rows in one call.
 *
 * The rows arrive grouped by expert (engine/moe_routing.py: pairs sorted by expert id, counts[e]
 * rows for expert e). Per active expert, one pass over its rows:
 *
 *     gu  (n, 2I) = xs[rows] @ [W_gate; W_up]^T        the packed GEMM of cpu_gemm.c
 *     act (n, I)  = silu(gu[:, :I]) * gu[:, I:]        in place over gu's first half
 *     y   (n, H)  = act @ W_down^T, times each row's routing weight
 *
 * Each row's result is a function of that row alone (the GEMM is batch invariant: one FMA chain per
 * output), so a token's expert outputs do not depend on which tokens share the step, nor on which
 * rank of an expert-parallel worker computes them. The combine (each token's k outputs summed in
 * expert order) is the caller's. Built without -ffast-math and without FMA contraction: the
 * activation and the weight multiply round where torch's expressions do (silu with libm's expf, which
 * may differ from torch's vectorized exp in the last bit).
 */
#include "cpu_gemm.c"

#include <math.h>

int tandem_moe_supported(void) { return tandem_gemm_supported(); }

/* xs (P, H) grouped rows; counts (E,); gate_up[e] / down[e]: packed weights of local expert e (for
 * tandem_gemm_f32: (2I, H) and (H, I)); w (P,) routing weights; y (P, H) out; hbuf: P * 2I floats;
 * scratch: threads * MC * 16 floats. Returns -1 where the GEMM is not compiled in. */
int tandem_moe_f32(const float *restrict xs, int64_t p, int64_t hidden, const int64_t *restrict counts,
                   int64_t experts, const int64_t *restrict gate_up, const int64_t *restrict down, int64_t inter,
                   const float *restrict w, float *restrict y, float *restrict hbuf, float *restrict scratch,
                   int threads) {
    if (!tandem_gemm_supported()) return -1;
    int64_t start = 0;
    for (int64_t e = 0; e < experts; e++) {
        const int64_t n = counts[e];
        if (n == 0) continue;
        if (start + n > p) return -2;
        float *gu = hbuf + start * 2 * inter;
        tandem_gemm_f32(xs + start * hidden, hidden, n, (const float *)(intptr_t)gate_up[e], 2 * inter, hidden,
                        NULL, gu, scratch, threads);
#pragma omp parallel for schedule(static) num_threads(threads)
        for (int64_t i = 0; i < n; i++) {
            float *row = gu + i * 2 * inter;
            for (int64_t j = 0; j < inter; j++) {
                const float g = row[j];
                const float s = g / (1.0f + expf(-g));
                row[j] = s * row[inter + j];
            }
        }
        float *out = y + start * hidden;
        tandem_gemm_f32(gu, 2 * inter, n, (const float *)(intptr_t)down[e], hidden, inter, NULL, out, scratch,
                        threads);
        for (int64_t i = 0; i < n; i++) {
            const float wi = w[start + i];
            float *row = out + i * hidden;
            for (int64_t j = 0; j < hidden; j++) row[j] = row[j] * wi;
        }
        start += n;
    }
    return 0;
}

/* A grouped GEMM: for each group g, y[g] (M, N) = x[g] (M rows, x_row_stride apart) @ W[g]^T, with
 * x[g] at x + g * x_group_stride and y[g] at y + g * M * N. MLA's absorbed projections use it, one
 * group per query head (engine/kernels/cpu_mla.py): the same batch-invariant GEMM as every other
 * projection, for all heads in one call. */
int tandem_grouped_gemm_f32(const float *restrict x, int64_t x_group_stride, int64_t x_row_stride, int64_t m,
                            const int64_t *restrict packed, int64_t groups, int64_t n, int64_t k,
                            float *restrict y, float *restrict scratch, int threads) {
    if (!tandem_gemm_supported()) return -1;
    for (int64_t g = 0; g < groups; g++)
        tandem_gemm_f32(x + g * x_group_stride, x_row_stride, m, (const float *)(intptr_t)packed[g], n, k, NULL,
                        y + g * m * n, scratch, threads);
    return 0;
}
