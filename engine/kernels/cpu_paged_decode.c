/* Paged decode attention for the CPU, fp32: one query token per sequence against its blocks of the
 * layer's KV pool, read in place (no gather), in one pass over K and one over V.
 *
 * Layout (engine/kv_layout.py): a layer's pool is (N, 2, H_kv, B, D), so block n's keys for KV head
 * h are the B*D floats at ((n*2 + 0)*H_kv + h)*B*D, its values at ((n*2 + 1)*H_kv + h)*B*D.
 * Query heads h*g .. h*g+g-1 read KV head h (GQA, as transformers' repeat_kv).
 *
 * Compiled on first use by engine/kernels/cpu_attention.py with the machine's C compiler
 * (-O3 -march=native -fopenmp); called through ctypes. Work item i covers sequence i / (H_kv * split),
 * KV head (i / split) % H_kv and the part i % split of that head's g query heads; the items are
 * shared among OpenMP threads. A head's numbers do not depend on which heads share its item, so
 * `split` (more, smaller items when few sequences would leave a thread idle) never changes a result.
 *
 * Softmax: scores of one (sequence, query head) are kept in scratch (ctx floats), the max is
 * subtracted before exp, and the output is divided by the sum once at the end, as SDPA's math path
 * does. The dot products and the exp are vectorised, so the summation order differs from SDPA's and
 * results agree to rounding (checked against the torch reference in tests).
 */
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <string.h>

static inline float dot(const float *restrict a, const float *restrict b, int d) {
    float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
    for (int i = 0; i < d; i++) acc += a[i] * b[i];
    return acc;
}

/* One work item: sequence s, KV head h, query heads j0 .. j1-1 of its g; scratch holds g * ctx floats. */
static void decode_item(const float *restrict q, const float *restrict kv, const int32_t *restrict tables,
                        int64_t table_stride, const int32_t *restrict seq_lens, float *restrict out,
                        float *restrict scratch, int H_q, int H_kv, int B, int D, float scale, int item, int split) {
    const int g = H_q / H_kv;
    const int64_t head_stride = (int64_t)B * D;
    const int64_t block_stride = 2 * (int64_t)H_kv * head_stride;
    const int s = item / (H_kv * split), h = item / split % H_kv, part = item % split;
    const int j0 = part * g / split, j1 = (part + 1) * g / split;
    const int ctx = seq_lens[s];
    const int32_t *table = tables + (int64_t)s * table_stride;
    const float *qh = q + ((int64_t)s * H_q + (int64_t)h * g) * D; /* g query rows */
    float *oh = out + ((int64_t)s * H_q + (int64_t)h * g) * D;
    /* scores, block by block: each K row is read once for all g query heads */
    for (int t0 = 0; t0 < ctx; t0 += B) {
        const float *kb = kv + (int64_t)table[t0 / B] * block_stride + (int64_t)h * head_stride;
        const int n = ctx - t0 < B ? ctx - t0 : B;
        for (int t = 0; t < n; t++) {
            const float *krow = kb + (int64_t)t * D;
            for (int j = j0; j < j1; j++) scratch[(int64_t)j * ctx + t0 + t] = dot(qh + j * D, krow, D) * scale;
        }
    }
    float inv_sum[64];
    for (int j = j0; j < j1; j++) {
        float *sc = scratch + (int64_t)j * ctx;
        float m = sc[0]; /* ctx >= 1: the query token's own key */
        for (int t = 1; t < ctx; t++) m = sc[t] > m ? sc[t] : m;
        float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
        for (int t = 0; t < ctx; t++) {
            sc[t] = expf(sc[t] - m);
            sum += sc[t];
        }
        inv_sum[j] = 1.0f / sum;
        for (int i = 0; i < D; i++) oh[j * D + i] = 0.0f;
    }
    /* values, block by block: each V row is read once for all g query heads */
    for (int t0 = 0; t0 < ctx; t0 += B) {
        const float *vb = kv + (int64_t)table[t0 / B] * block_stride + (int64_t)(H_kv + h) * head_stride;
        const int n = ctx - t0 < B ? ctx - t0 : B;
        for (int t = 0; t < n; t++) {
            const float *vrow = vb + (int64_t)t * D;
            for (int j = j0; j < j1; j++) {
                const float p = scratch[(int64_t)j * ctx + t0 + t];
                float *o = oh + j * D;
#pragma omp simd
                for (int i = 0; i < D; i++) o[i] += p * vrow[i];
            }
        }
    }
    for (int j = j0; j < j1; j++) {
        float *o = oh + j * D;
#pragma omp simd
        for (int i = 0; i < D; i++) o[i] *= inv_sum[j];
    }
}

/* All S * H_kv items on ``threads`` OpenMP threads. The shared object links libgomp by its soname,
 * so inside a process that imported torch it joins torch's own OpenMP runtime and thread pool (no
 * second pool spinning against torch's on the same cores). scratch: threads * g * max_ctx floats. */
void tandem_paged_decode_f32(const float *restrict q, /* (S, H_q, D) */
                             const float *restrict kv, /* (N, 2, H_kv, B, D) */
                             const int32_t *restrict tables, int64_t table_stride, /* (S, >= nb) */
                             const int32_t *restrict seq_lens, /* (S,) */
                             float *restrict out,              /* (S, H_q, D) */
                             float *restrict scratch, int64_t scratch_stride, int H_q, int H_kv, int B,
                             int D, float scale, int num_items, int split, int threads) {
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
    for (int item = 0; item < num_items; item++)
        decode_item(q, kv, tables, table_stride, seq_lens, out, scratch + omp_get_thread_num() * scratch_stride,
                    H_q, H_kv, B, D, scale, item, split);
}

/* ---- a quantized pool (engine/kv_quant.py): rows of D one-byte codes and an fp32 scale --------------
 * The same computation as decode_item, each block's rows of head h dequantized first (code * scale,
 * one rounding: what the torch reference reads) into the thread's block buffer (B * D floats). */
static float e4m3_lut[256];
static int e4m3_ready;

static void e4m3_init(void) { /* sign, 4 exponent bits (bias 7), 3 mantissa bits; no infinities */
    for (int b = 0; b < 256; b++) {
        const int e = (b >> 3) & 15, m = b & 7;
        float v = e ? ldexpf(1.0f + m / 8.0f, e - 7) : ldexpf((float)m, -9);
        e4m3_lut[b] = (b & 128) ? -v : v;
    }
    e4m3_ready = 1;
}

static void dequant_block(const uint8_t *restrict rows, int n, int D, int kind, float *restrict out) {
    const int R = D + 4;
    for (int t = 0; t < n; t++) {
        const uint8_t *row = rows + (int64_t)t * R;
        float s;
        memcpy(&s, row + D, 4);
        if (kind == 0)
            for (int i = 0; i < D; i++) out[t * D + i] = e4m3_lut[row[i]] * s;
        else
            for (int i = 0; i < D; i++) out[t * D + i] = (float)(int8_t)row[i] * s;
    }
}

static void decode_item_q(const float *restrict q, const uint8_t *restrict kv, const int32_t *restrict tables,
                          int64_t table_stride, const int32_t *restrict seq_lens, float *restrict out,
                          float *restrict scratch, int64_t score_stride, int H_q, int H_kv, int B, int D,
                          float scale, int item, int split, int kind) {
    const int g = H_q / H_kv, R = D + 4;
    const int64_t head_stride = (int64_t)B * R;
    const int64_t block_stride = 2 * (int64_t)H_kv * head_stride;
    const int s = item / (H_kv * split), h = item / split % H_kv, part = item % split;
    const int j0 = part * g / split, j1 = (part + 1) * g / split;
    const int ctx = seq_lens[s];
    const int32_t *table = tables + (int64_t)s * table_stride;
    const float *qh = q + ((int64_t)s * H_q + (int64_t)h * g) * D;
    float *oh = out + ((int64_t)s * H_q + (int64_t)h * g) * D;
    float *blk = scratch + score_stride; /* B * D floats after the scores */
    for (int t0 = 0; t0 < ctx; t0 += B) {
        const int n = ctx - t0 < B ? ctx - t0 : B;
        dequant_block(kv + (int64_t)table[t0 / B] * block_stride + (int64_t)h * head_stride, n, D, kind, blk);
        for (int t = 0; t < n; t++)
            for (int j = j0; j < j1; j++) scratch[(int64_t)j * ctx + t0 + t] = dot(qh + j * D, blk + t * D, D) * scale;
    }
    float inv_sum[64];
    for (int j = j0; j < j1; j++) {
        float *sc = scratch + (int64_t)j * ctx;
        float m = sc[0];
        for (int t = 1; t < ctx; t++) m = sc[t] > m ? sc[t] : m;
        float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
        for (int t = 0; t < ctx; t++) {
            sc[t] = expf(sc[t] - m);
            sum += sc[t];
        }
        inv_sum[j] = 1.0f / sum;
        for (int i = 0; i < D; i++) oh[j * D + i] = 0.0f;
    }
    for (int t0 = 0; t0 < ctx; t0 += B) {
        const int n = ctx - t0 < B ? ctx - t0 : B;
        dequant_block(kv + (int64_t)table[t0 / B] * block_stride + (int64_t)(H_kv + h) * head_stride, n, D, kind, blk);
        for (int t = 0; t < n; t++) {
            const float *vrow = blk + t * D;
            for (int j = j0; j < j1; j++) {
                const float p = scratch[(int64_t)j * ctx + t0 + t];
                float *o = oh + j * D;
#pragma omp simd
                for (int i = 0; i < D; i++) o[i] += p * vrow[i];
            }
        }
    }
    for (int j = j0; j < j1; j++) {
        float *o = oh + j * D;
#pragma omp simd
        for (int i = 0; i < D; i++) o[i] *= inv_sum[j];
    }
}

/* As tandem_paged_decode_f32 over a quantized pool (N, 2, H_kv, B, D + 4) uint8; kind 0: e4m3,
 * 1: int8. scratch: threads * (g * max_ctx + B * D) floats, scratch_stride = g * max_ctx. */
void tandem_paged_decode_q(const float *restrict q, const uint8_t *restrict kv, const int32_t *restrict tables,
                           int64_t table_stride, const int32_t *restrict seq_lens, float *restrict out,
                           float *restrict scratch, int64_t scratch_stride, int H_q, int H_kv, int B, int D,
                           float scale, int num_items, int split, int threads, int kind) {
    if (!e4m3_ready) e4m3_init();
    const int64_t per_thread = scratch_stride + (int64_t)B * D;
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
    for (int item = 0; item < num_items; item++)
        decode_item_q(q, kv, tables, table_stride, seq_lens, out, scratch + omp_get_thread_num() * per_thread,
                      scratch_stride, H_q, H_kv, B, D, scale, item, split, kind);
}
