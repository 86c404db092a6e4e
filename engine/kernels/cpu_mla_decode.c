/* MLA decode attention in the latent space for the CPU, fp32: one absorbed query per (sequence,
 * head) against the sequence's latent rows, read in place from the paged pool.
 *
 * Layout (engine/kv_layout.py, latent): a layer's pool is (N, 1, 1, B, L) with L = kv_lora_rank +
 * qk_rope_head_dim, so token t of block n is the L floats at (n*B + t)*L. Every query head reads
 * the same latent rows (one "KV head" for all of them), as keys over all L values and as values
 * over the first R = kv_lora_rank (engine/mla.py):
 *
 *     score[h, t] = (q[h] . lat[t]) * scale          q[h] = [W_UK[h]^T q_nope[h], q_rope[h]]
 *     out[h]      = sum_t softmax(score[h])[t] * lat[t, :R]
 *
 * Work item: a sequence and a group of heads (all heads, or fewer when there are fewer sequences
 * than threads); each latent row is read once per item for all its heads. An (sequence, head)'s
 * arithmetic is the same whatever the other sequences of the step or the grouping, so a request's
 * output does not depend on its batch (the torch path's batched matmuls do, in the last bits).
 * Built like cpu_paged_decode.c (-ffast-math: vectorised dot products, a fixed order per build).
 */
#include <math.h>
#include <omp.h>
#include <stdint.h>

static inline float dot(const float *restrict a, const float *restrict b, int d) {
    float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
    for (int i = 0; i < d; i++) acc += a[i] * b[i];
    return acc;
}

static void mla_item(const float *restrict q, const float *restrict lat, const int32_t *restrict tables,
                     int64_t table_stride, const int32_t *restrict seq_lens, float *restrict out,
                     float *restrict scratch, int H, int B, int L, int R, float scale, int s, int h0, int hn) {
    const int ctx = seq_lens[s];
    const int64_t rs = (int64_t)ctx + 1; /* a head's scores, then its 1 / sum */
    const int32_t *table = tables + (int64_t)s * table_stride;
    const float *qs = q + ((int64_t)s * H + h0) * L;
    float *os = out + ((int64_t)s * H + h0) * R;
    for (int t0 = 0; t0 < ctx; t0 += B) {
        const float *block = lat + (int64_t)table[t0 / B] * B * L;
        const int n = ctx - t0 < B ? ctx - t0 : B;
        for (int t = 0; t < n; t++) {
            const float *row = block + (int64_t)t * L;
            for (int j = 0; j < hn; j++) scratch[j * rs + t0 + t] = dot(qs + (int64_t)j * L, row, L) * scale;
        }
    }
    for (int j = 0; j < hn; j++) {
        float *sc = scratch + j * rs;
        float m = sc[0];
        for (int t = 1; t < ctx; t++) m = sc[t] > m ? sc[t] : m;
        float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
        for (int t = 0; t < ctx; t++) {
            sc[t] = expf(sc[t] - m);
            sum += sc[t];
        }
        sc[ctx] = 1.0f / sum;
        for (int i = 0; i < R; i++) os[(int64_t)j * R + i] = 0.0f;
    }
    for (int t0 = 0; t0 < ctx; t0 += B) {
        const float *block = lat + (int64_t)table[t0 / B] * B * L;
        const int n = ctx - t0 < B ? ctx - t0 : B;
        for (int t = 0; t < n; t++) {
            const float *row = block + (int64_t)t * L;
            for (int j = 0; j < hn; j++) {
                const float p = scratch[j * rs + t0 + t];
                float *o = os + (int64_t)j * R;
#pragma omp simd
                for (int i = 0; i < R; i++) o[i] += p * row[i];
            }
        }
    }
    for (int j = 0; j < hn; j++) {
        const float inv = scratch[j * rs + ctx];
        float *o = os + (int64_t)j * R;
#pragma omp simd
        for (int i = 0; i < R; i++) o[i] *= inv;
    }
}

/* q (S, H, L), lat (N, B, L), tables (S, >= blocks) int32, seq_lens (S,), out (S, H, R); heads in
 * groups of ``group``; scratch: threads * scratch_stride floats, scratch_stride >= group * (max_ctx + 1). */
void tandem_mla_decode_f32(const float *restrict q, const float *restrict lat, const int32_t *restrict tables,
                           int64_t table_stride, const int32_t *restrict seq_lens, float *restrict out,
                           float *restrict scratch, int64_t scratch_stride, int S, int H, int B, int L, int R,
                           float scale, int group, int threads) {
    const int groups = (H + group - 1) / group;
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
    for (int item = 0; item < S * groups; item++) {
        const int s = item / groups, h0 = (item % groups) * group;
        const int hn = H - h0 < group ? H - h0 : group;
        mla_item(q, lat, tables, table_stride, seq_lens, out, scratch + omp_get_thread_num() * scratch_stride, H,
                 B, L, R, scale, s, h0, hn);
    }
}
