/* A decode step's layer in one call: the kernels the model's forward runs for one layer, called
 * in the same order with the same arguments, from C instead of from Python.
 *
 * A decode step of SmolLM2 (30 layers, hidden 576) spent ~28% of its wall time in Python and torch
 * glue around its ~13 kernel calls per layer (argument checks, tensor allocations, ctypes, one
 * OpenMP fork per call with the worker idle in between). Here each layer is one ctypes call; only
 * the SwiGLU activation stays in torch (its exp is Sleef's: no C expression here gives the same
 * floats), between this layer's gate/up projection and the next call's down projection:
 *
 *   tandem_decode_layer(l):  [delta = down_{l-1}(act)]  x, h = add_rms_norm(x, delta, in_norm_l)
 *                            q, k, v = qkv_l(h)          q' = rope(q); k' = rope(k); kv_l[slots] = k', v
 *                            o = attention(q', kv_l)     x, h = add_rms_norm(x, o_proj_l(o), post_norm_l)
 *                            gate_up = gate_up_l(h)
 *   (torch)                  act = silu(gate) * up
 *   tandem_decode_final:     delta = down_{L-1}(act)     _, out = add_rms_norm(x, delta, final_norm)
 *
 * This file does no arithmetic of its own: every kernel is the very function the torch-driven path
 * calls (cpu_fused.c, cpu_gemm.c, cpu_quant_gemm.c, cpu_paged_decode.c), passed in as a pointer
 * from its own loaded library, so the hidden states and the KV cache are the same floats bit for
 * bit (tested against the regular forward).
 */
#include <stdint.h>
#include <string.h>

typedef int (*gemm_f32_fn)(const float *, int64_t, int64_t, const float *, int64_t, int64_t, const float *, float *,
                           float *, int);
typedef int (*gemm_q_fn)(int, const float *, int64_t, int64_t, const uint8_t *, int64_t, int64_t, const float *,
                         float *, float *, int);
typedef void (*norm_fn)(float *, const float *, const float *, float *, int64_t, int64_t, float, int, int);
typedef void (*rope_fn)(const float *, int64_t, const float *, int64_t, const float *, int64_t, const int64_t *,
                        const float *, const float *, float *, float *, const int64_t *, int64_t, int, int, int, int,
                        int);
typedef void (*attn_fn)(const float *, const float *, const int32_t *, int64_t, const int32_t *, float *, float *,
                        int64_t, int, int, int, int, float, int, int, int);

typedef struct {
    int kind;  /* 0: fp32 panels (cpu_gemm.c), 1: quantized panels (cpu_quant_gemm.c) */
    int qtype; /* cpu_quant_gemm.c's type code */
    const void *packed;
    int64_t n, k;
    const float *bias; /* NULL or n floats */
} tandem_linear;

typedef struct {
    gemm_f32_fn gemm_f32;
    gemm_q_fn gemm_q;
    norm_fn norm;
    rope_fn rope;
    attn_fn attn;
    int sum_width, threads, attn_threads, attn_split;
    float eps, scale;
    int H, H_kv, D, B;
    int64_t hidden;
    const float *cos, *sin;
    /* this step */
    int64_t T;
    const int64_t *positions, *slots;
    const int32_t *tables, *seq_lens;
    int64_t table_stride, attn_scratch_stride;
    float *x, *h, *q_rot, *attn_out, *scratch, *attn_scratch;
    /* the projections' outputs, shared by every layer: q/k/v (one (T, n) block each when not fused),
     * o, gate/up (likewise), down */
    float *qkv_out, *o_out, *gu_out, *down_out;
} tandem_step;

typedef struct {
    const float *input_norm, *post_norm;
    float *kv_layer;
    int n_qkv, n_gate_up; /* 1 (fused) or 3 / 2 */
    tandem_linear qkv[3], o, gate_up[2], down;
} tandem_layer;

static int linear(const tandem_step *s, const tandem_linear *l, const float *x, int64_t x_stride, float *out) {
    if (l->kind == 0)
        return s->gemm_f32(x, x_stride, s->T, (const float *)l->packed, l->n, l->k, l->bias, out, s->scratch,
                           s->threads);
    return s->gemm_q(l->qtype, x, x_stride, s->T, (const uint8_t *)l->packed, l->n, l->k, l->bias, out, s->scratch,
                     s->threads);
}

/* One layer; `prev` and `act` (T rows, act_stride apart) are the previous layer's down projection
 * and its input (NULL for layer 0). Returns nonzero if a kernel refused. */
int tandem_decode_layer(const tandem_step *s, const tandem_layer *prev, const float *act, int64_t act_stride,
                        const tandem_layer *l) {
    const int64_t T = s->T;
    const float *delta = NULL;
    if (prev) {
        if (linear(s, &prev->down, act, act_stride, s->down_out)) return 1;
        delta = s->down_out;
    }
    s->norm(s->x, delta, l->input_norm, s->h, T, s->hidden, s->eps, s->sum_width, s->threads);
    /* q, k, v: column ranges of the fused output, or three (T, n) blocks one after another */
    const int64_t qn = (int64_t)s->H * s->D, kn = (int64_t)s->H_kv * s->D;
    const float *q = s->qkv_out, *k, *v;
    int64_t qs, ks, vs;
    if (l->n_qkv == 1) {
        if (linear(s, &l->qkv[0], s->h, s->hidden, s->qkv_out)) return 1;
        k = q + qn, v = q + qn + kn;
        qs = ks = vs = l->qkv[0].n;
    } else {
        float *out = s->qkv_out;
        for (int i = 0; i < 3; out += T * l->qkv[i].n, i++)
            if (linear(s, &l->qkv[i], s->h, s->hidden, out)) return 1;
        k = q + T * qn, v = q + T * (qn + kn);
        qs = qn, ks = vs = kn;
    }
    s->rope(q, qs, k, ks, v, vs, s->positions, s->cos, s->sin, s->q_rot, l->kv_layer, s->slots, T, s->H, s->H_kv,
            s->D, s->B, s->threads);
    s->attn(s->q_rot, l->kv_layer, s->tables, s->table_stride, s->seq_lens, s->attn_out, s->attn_scratch,
            s->attn_scratch_stride, s->H, s->H_kv, s->B, s->D, s->scale, (int)(T * s->H_kv) * s->attn_split,
            s->attn_split, s->attn_threads);
    if (linear(s, &l->o, s->attn_out, qn, s->o_out)) return 1;
    s->norm(s->x, s->o_out, l->post_norm, s->h, T, s->hidden, s->eps, s->sum_width, s->threads);
    float *out = s->gu_out;
    for (int i = 0; i < l->n_gate_up; out += T * l->gate_up[i].n, i++)
        if (linear(s, &l->gate_up[i], s->h, s->hidden, out)) return 1;
    return 0;
}

/* After the last layer: its down projection, the residual add and the final norm into out (T, hidden). */
int tandem_decode_final(const tandem_step *s, const tandem_layer *last, const float *act, int64_t act_stride,
                        const float *norm, float *out) {
    if (linear(s, &last->down, act, act_stride, s->down_out)) return 1;
    s->norm(s->x, s->down_out, norm, out, s->T, s->hidden, s->eps, s->sum_width, s->threads);
    return 0;
}
