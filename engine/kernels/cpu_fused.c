/* The small per-layer operations of the forward pass, fused for the CPU, fp32, bit for bit equal to
 * the torch expressions they replace (engine/model.py, engine/rope.py, engine/attention.py):
 *
 *   tandem_add_rms_norm_f32   x += delta (the residual add), then h = w * (x * rsqrt(mean(x^2) + eps))
 *   tandem_rope_write_kv_f32  q -> rotated copy; k rotated and v copied into the layer's paged pool
 *
 * In a decode step these are ~25 torch calls per layer of 5-80 us each, mostly dispatch and
 * allocation; here they are 3 calls of a few us.
 *
 * Exactness. This file is compiled WITHOUT -ffast-math and with -ffp-contract=off: every product and
 * sum is rounded where torch rounds it (no fused multiply-add, no reassociation). The one reduction,
 * the sum of squares behind the mean, follows torch's own CPU summation order (ATen's SumKernel.cpp:
 * vectorized_inner_sum -> row_sum -> multi_row_sum: W-lane vector accumulators, 4-way ILP, a 4-level
 * cascade of 16-row steps, the scalar tail first and then the lanes in order), so the mean is the
 * same float torch computes. W is the lane count of the sum kernel torch dispatches to, passed in by
 * the caller, which finds it by comparing with torch (8 on x86 under every capability: ATen's sum is
 * not registered for AVX-512, so an AVX-512 torch runs its AVX2 kernel); a row shorter than W takes
 * ATen's scalar path, the same cascade one lane wide. The unit tests compare every output bit with
 * torch's.
 */
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <string.h>

#define MAX_W 16
#define ILP 4
#define LEVELS 4

static int64_t ceil_log2(int64_t x) { /* c10's CeilLog2 */
    if (x <= 2) return 1;
    int64_t last = 63 - __builtin_clzll((unsigned long long)(x - 1)); /* floor(log2(x - 1)) */
    return last + 1;
}

/* torch's sum of the squares x[0]^2 .. x[n-1]^2 (each square rounded, as x.pow(2) materialises). */
static float torch_sum_squares(const float *restrict x, int64_t n, int W) {
    /* a row shorter than one vector takes ATen's scalar_inner_sum: the same cascade, one lane wide
     * (its scalar row_sum is this function with W = 1: no vectors left over, no lane sum) */
    if (n < W) W = 1;
    const int64_t vec_size = n / W;      /* whole W-wide vectors */
    const int64_t size_ilp = vec_size / ILP; /* rows of ILP vectors, cascaded */
    float acc[LEVELS][ILP][MAX_W];
    memset(acc, 0, sizeof acc);
    const int64_t level_power = ceil_log2(size_ilp) / LEVELS > 4 ? ceil_log2(size_ilp) / LEVELS : 4;
    const int64_t level_step = (int64_t)1 << level_power, level_mask = level_step - 1;
    int64_t i = 0;
    while (i + level_step <= size_ilp) {
        for (int64_t j = 0; j < level_step; j++, i++) {
            const float *row = x + i * ILP * W;
            for (int k = 0; k < ILP; k++)
                for (int l = 0; l < W; l++) acc[0][k][l] += row[k * W + l] * row[k * W + l];
        }
        for (int j = 1; j < LEVELS; j++) {
            for (int k = 0; k < ILP; k++)
                for (int l = 0; l < W; l++) {
                    acc[j][k][l] += acc[j - 1][k][l];
                    acc[j - 1][k][l] = 0.0f;
                }
            if ((i & (level_mask << (j * level_power))) != 0) break;
        }
    }
    for (; i < size_ilp; i++) {
        const float *row = x + i * ILP * W;
        for (int k = 0; k < ILP; k++)
            for (int l = 0; l < W; l++) acc[0][k][l] += row[k * W + l] * row[k * W + l];
    }
    for (int j = 1; j < LEVELS; j++)
        for (int k = 0; k < ILP; k++)
            for (int l = 0; l < W; l++) acc[0][k][l] += acc[j][k][l];
    /* row_sum: leftover vectors into partial 0, then partials 1..3 into 0 */
    for (int64_t v = size_ilp * ILP; v < vec_size; v++)
        for (int l = 0; l < W; l++) acc[0][0][l] += x[v * W + l] * x[v * W + l];
    for (int k = 1; k < ILP; k++)
        for (int l = 0; l < W; l++) acc[0][0][l] += acc[0][k][l];
    /* vectorized_inner_sum: scalar tail first, then the lanes in order */
    float total = 0.0f;
    for (int64_t t = vec_size * W; t < n; t++) total += x[t] * x[t];
    for (int l = 0; l < W; l++) total += acc[0][0][l];
    return total;
}

/* For each of the T rows of x (T, n): x += delta (if delta is not NULL), then
 * h = w * (x * (1 / sqrt(sum(x^2) / n + eps))) -- transformers' LlamaRMSNorm in fp32. */
void tandem_add_rms_norm_f32(float *restrict x, const float *restrict delta, const float *restrict w,
                             float *restrict h, int64_t T, int64_t n, float eps, int W, int threads) {
#pragma omp parallel for schedule(static) num_threads(threads) if (T * n >= 65536)
    for (int64_t t = 0; t < T; t++) {
        float *xr = x + t * n;
        float *hr = h + t * n;
        if (delta) {
            const float *dr = delta + t * n;
            for (int64_t i = 0; i < n; i++) xr[i] = xr[i] + dr[i];
        }
        const float mean = torch_sum_squares(xr, n, W) / (float)n;
        const float r = 1.0f / sqrtf(mean + eps);
        for (int64_t i = 0; i < n; i++) hr[i] = w[i] * (xr[i] * r);
    }
}

/* x (D) rotated by the angles of one position into y: rotate_half (the two halves swap, the first
 * negated), x * cos + rotate_half(x) * sin with cos/sin = cat(c, c), cat(s, s). */
static inline void rotate(const float *restrict x, const float *restrict c, const float *restrict s,
                          float *restrict y, int half) {
    for (int i = 0; i < half; i++) {
        y[i] = x[i] * c[i] + (-x[i + half]) * s[i];
        y[i + half] = x[i + half] * c[i] + x[i] * s[i];
    }
}

/* For each of the T tokens: q (H heads of D, row t at q + t*q_stride) rotated into q_out (T, H, D);
 * k (H_kv heads) rotated and v copied into the layer pool kv (N, 2, H_kv, B, D) at the token's slot
 * (block slot / B, offset slot % B); a negative slot is padding and writes nothing. cos/sin are the
 * half tables (P, D/2) indexed by positions[t]. */
void tandem_rope_write_kv_f32(const float *restrict q, int64_t q_stride, const float *restrict k,
                              int64_t k_stride, const float *restrict v, int64_t v_stride,
                              const int64_t *restrict positions, const float *restrict cos_half,
                              const float *restrict sin_half, float *restrict q_out, float *restrict kv,
                              const int64_t *restrict slots, int64_t T, int H, int H_kv, int D, int B,
                              int threads) {
    const int half = D / 2;
    const int64_t head_stride = (int64_t)B * D;
    const int64_t block_stride = 2 * (int64_t)H_kv * head_stride;
#pragma omp parallel for schedule(static) num_threads(threads) if (T >= 64)
    for (int64_t t = 0; t < T; t++) {
        const float *c = cos_half + positions[t] * half;
        const float *s = sin_half + positions[t] * half;
        for (int hq = 0; hq < H; hq++) rotate(q + t * q_stride + hq * D, c, s, q_out + (t * H + hq) * D, half);
        const int64_t slot = slots[t];
        if (slot < 0) continue;
        float *dst = kv + (slot / B) * block_stride + (slot % B) * D;
        for (int hk = 0; hk < H_kv; hk++) {
            rotate(k + t * k_stride + hk * D, c, s, dst + hk * head_stride, half);
            memcpy(dst + (H_kv + hk) * head_stride, v + t * v_stride + hk * D, sizeof(float) * D);
        }
    }
}
