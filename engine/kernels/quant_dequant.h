/* The dequantization of cpu_quant_gemm.c's records: 16 lanes of fp32 (one zmm, or two ymm on AVX2)
 * and, per GGUF type and FP8, the weights of 16 rows at two k at a time, with numpy's operations
 * (see EXACT below). Included by cpu_quant_gemm.c after its type enum and record layout; not a
 * library of its own.
 */
#ifndef TANDEM_QUANT_DEQUANT_H
#define TANDEM_QUANT_DEQUANT_H
#ifdef HAVE_MICRO
/* ---- 16 lanes of fp32, as one zmm or two ymm ---------------------------------------------------- */
#if defined(__AVX512F__) && !defined(TANDEM_GEMM_AVX2)
typedef __m512 vf;
typedef __m512i vi;
static inline vf ld_f16(const uint8_t *p) { return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)p)); }
static inline vf ld_f32(const uint8_t *p) { return _mm512_loadu_ps((const float *)p); }
static inline vi ld_u8(const uint8_t *p) { return _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)p)); }
static inline vi ld_s8(const uint8_t *p) { return _mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)p)); }
static inline vi iand(vi a, int c) { return _mm512_and_si512(a, _mm512_set1_epi32(c)); }
static inline vi ior(vi a, vi b) { return _mm512_or_si512(a, b); }
static inline vi isrl(vi a, int c) { return _mm512_srlv_epi32(a, _mm512_set1_epi32(c)); }
static inline vi isll(vi a, int c) { return _mm512_sllv_epi32(a, _mm512_set1_epi32(c)); }
static inline vi isub(vi a, int c) { return _mm512_sub_epi32(a, _mm512_set1_epi32(c)); }
static inline vf cvt(vi a) { return _mm512_cvtepi32_ps(a); }
static inline vf fmul(vf a, vf b) { return _mm512_mul_ps(a, b); }
static inline vf fadd(vf a, vf b) { return _mm512_add_ps(a, b); }
static inline vf fsub(vf a, vf b) { return _mm512_sub_ps(a, b); }
static inline vf ffma(vf a, vf b, vf c) { return _mm512_fmadd_ps(a, b, c); }
static inline vf ffms(vf a, vf b, vf c) { return _mm512_fmsub_ps(a, b, c); }
static inline void st(float *p, vf a) { _mm512_storeu_ps(p, a); }
/* e4m3 byte -> fp32: the 7 value bits shifted into an fp16 (same mantissa, exponent bias 15
 * against 7) times 2^8, exact for normals and subnormals alike; 0x7F / 0xFF are NaN */
static inline vf e4m3(vi b) {
    const vi h = ior(isll(iand(b, 0x80), 8), isll(iand(b, 0x7F), 7));
    const vf v = fmul(_mm512_cvtph_ps(_mm512_cvtepi32_epi16(h)), _mm512_set1_ps(256.0f));
    const __mmask16 nan = _mm512_cmpeq_epi32_mask(iand(b, 0x7F), _mm512_set1_epi32(0x7F));
    return _mm512_mask_mov_ps(v, nan, _mm512_set1_ps(NAN));
}
#else
typedef struct {
    __m256 a, b;
} vf;
typedef struct {
    __m256i a, b;
} vi;
static inline vf ld_f16(const uint8_t *p) {
    return (vf){_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p)),
                _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(p + 16)))};
}
static inline vf ld_f32(const uint8_t *p) {
    return (vf){_mm256_loadu_ps((const float *)p), _mm256_loadu_ps((const float *)p + 8)};
}
static inline vi ld_u8(const uint8_t *p) {
    return (vi){_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)p)),
                _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(p + 8)))};
}
static inline vi ld_s8(const uint8_t *p) {
    return (vi){_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)p)),
                _mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(p + 8)))};
}
static inline vi iand(vi x, int c) {
    const __m256i m = _mm256_set1_epi32(c);
    return (vi){_mm256_and_si256(x.a, m), _mm256_and_si256(x.b, m)};
}
static inline vi ior(vi x, vi y) { return (vi){_mm256_or_si256(x.a, y.a), _mm256_or_si256(x.b, y.b)}; }
static inline vi isrl(vi x, int c) {
    const __m256i s = _mm256_set1_epi32(c);
    return (vi){_mm256_srlv_epi32(x.a, s), _mm256_srlv_epi32(x.b, s)};
}
static inline vi isll(vi x, int c) {
    const __m256i s = _mm256_set1_epi32(c);
    return (vi){_mm256_sllv_epi32(x.a, s), _mm256_sllv_epi32(x.b, s)};
}
static inline vi isub(vi x, int c) {
    const __m256i m = _mm256_set1_epi32(c);
    return (vi){_mm256_sub_epi32(x.a, m), _mm256_sub_epi32(x.b, m)};
}
static inline vf cvt(vi x) { return (vf){_mm256_cvtepi32_ps(x.a), _mm256_cvtepi32_ps(x.b)}; }
static inline vf fmul(vf x, vf y) { return (vf){_mm256_mul_ps(x.a, y.a), _mm256_mul_ps(x.b, y.b)}; }
static inline vf fadd(vf x, vf y) { return (vf){_mm256_add_ps(x.a, y.a), _mm256_add_ps(x.b, y.b)}; }
static inline vf fsub(vf x, vf y) { return (vf){_mm256_sub_ps(x.a, y.a), _mm256_sub_ps(x.b, y.b)}; }
static inline vf ffma(vf x, vf y, vf z) { return (vf){_mm256_fmadd_ps(x.a, y.a, z.a), _mm256_fmadd_ps(x.b, y.b, z.b)}; }
static inline vf ffms(vf x, vf y, vf z) { return (vf){_mm256_fmsub_ps(x.a, y.a, z.a), _mm256_fmsub_ps(x.b, y.b, z.b)}; }
static inline void st(float *p, vf x) { _mm256_storeu_ps(p, x.a), _mm256_storeu_ps(p + 8, x.b); }
static inline __m256 e4m3_8(__m256i b) {
    const __m256i h = _mm256_or_si256(_mm256_slli_epi32(_mm256_and_si256(b, _mm256_set1_epi32(0x80)), 8),
                                      _mm256_slli_epi32(_mm256_and_si256(b, _mm256_set1_epi32(0x7F)), 7));
    /* the 8 low halves of h, packed to 8 x fp16 */
    const __m128i h16 = _mm_packus_epi32(_mm256_castsi256_si128(h), _mm256_extracti128_si256(h, 1));
    const __m256 v = _mm256_mul_ps(_mm256_cvtph_ps(h16), _mm256_set1_ps(256.0f));
    const __m256i nan = _mm256_cmpeq_epi32(_mm256_and_si256(b, _mm256_set1_epi32(0x7F)), _mm256_set1_epi32(0x7F));
    return _mm256_blendv_ps(v, _mm256_set1_ps(NAN), _mm256_castsi256_ps(nan));
}
static inline vf e4m3(vi x) { return (vf){e4m3_8(x.a), e4m3_8(x.b)}; }
#endif

/* ---- dequantizing records into a panel block (kk * 16 + r), numpy's operations ------------------
 *
 * EXACT: where numpy rounds a product and then a sum (Q4_1: d * q + m; Q4_K, Q5_K: ds * q - dm), the
 * product is exact in fp32, so a fused multiply-add rounds once to the same float: d is an fp16
 * (11 significant bits, >= 2^-24), ds = d * sc with a 6-bit sc (17 bits, computed as its own
 * exact product), q has 4 or 5 bits, so d * q has at most 15 and ds * q at most 22 significant
 * bits, never past fp32's 24 nor below its normal range. These use explicit FMAs (one instruction
 * instead of two); everywhere else a product that may round stays its own instruction, and
 * -ffp-contract=off keeps the compiler from fusing any. Tested bit for bit against gguf.quants. */

/* Q4_0 / Q4_1 / K-quant nibble pairs: 2 k per 16 bytes */
static inline void pairs(const uint8_t *p, vi *lo, vi *hi) {
    const vi b = ld_u8(p);
    *lo = iand(b, 15), *hi = isrl(b, 4);
}

/* Weights k = 32 s + 2 j and 32 s + 2 j + 1 of one record's 16 rows (j < 16; s = 0 for the 32-k
 * types). The scales are loaded here each time: inlined into a loop over j the compiler hoists
 * them (the pointers are restrict). */
static inline __attribute__((always_inline)) void dq_pair(const int t, const uint8_t *restrict rec, int s, int j,
                                                          vf *restrict w0, vf *restrict w1) {
    vi lo, hi;
    switch (t) {
    case Q8_0: {
        const vf d = ld_f16(rec);
        *w0 = fmul(cvt(ld_s8(rec + 32 + (2 * j) * 16)), d); /* x * d */
        *w1 = fmul(cvt(ld_s8(rec + 32 + (2 * j + 1) * 16)), d);
        break;
    }
    case Q4_0: {
        const vf d = ld_f16(rec);
        pairs(rec + 32 + j * 16, &lo, &hi);
        *w0 = fmul(d, cvt(isub(lo, 8))); /* d * (q - 8) */
        *w1 = fmul(d, cvt(isub(hi, 8)));
        break;
    }
    case Q4_1: {
        const vf d = ld_f16(rec), m = ld_f16(rec + 32);
        pairs(rec + 64 + j * 16, &lo, &hi);
        *w0 = ffma(d, cvt(lo), m); /* (d * q) + m: d * q is exact (see EXACT) */
        *w1 = ffma(d, cvt(hi), m);
        break;
    }
    case Q4_K:
    case Q5_K: {
        const vf ds = fmul(ld_f16(rec), cvt(ld_u8(rec + 64 + s * 16)));      /* d * sc */
        const vf dm = fmul(ld_f16(rec + 32), cvt(ld_u8(rec + 192 + s * 16))); /* dmin * m */
        const int kk = s * 32 + 2 * j;
        pairs(rec + 320 + (kk / 2) * 16, &lo, &hi);
        if (t == Q5_K) {
            const vi bits = ld_u8(rec + 2368 + (kk / 8) * 16);
            lo = ior(lo, isll(iand(isrl(bits, kk % 8), 1), 4));
            hi = ior(hi, isll(iand(isrl(bits, kk % 8 + 1), 1), 4));
        }
        *w0 = ffms(ds, cvt(lo), dm); /* (ds * q) - dm: ds * q is exact (see EXACT) */
        *w1 = ffms(ds, cvt(hi), dm);
        break;
    }
    case Q6_K: {
        const int kk = s * 32 + 2 * j;
        const vf ds = fmul(ld_f16(rec), cvt(ld_s8(rec + 32 + (kk / 16) * 16))); /* d * sc of this 16-k group */
        pairs(rec + 288 + (kk / 2) * 16, &lo, &hi);
        const vi bits = ld_u8(rec + 2336 + (kk / 4) * 16);
        lo = isub(ior(lo, isll(iand(isrl(bits, 2 * (kk % 4)), 3), 4)), 32);
        hi = isub(ior(hi, isll(iand(isrl(bits, 2 * (kk % 4) + 2), 3), 4)), 32);
        *w0 = fmul(ds, cvt(lo)); /* ds * (q - 32) */
        *w1 = fmul(ds, cvt(hi));
        break;
    }
    default: { /* FP8 */
        const vf sc = ld_f32(rec);
        *w0 = fmul(e4m3(ld_u8(rec + 64 + (32 * s + 2 * j) * 16)), sc); /* q * s */
        *w1 = fmul(e4m3(ld_u8(rec + 64 + (32 * s + 2 * j + 1) * 16)), sc);
        break;
    }
    }
}

/* k = 32 s .. 32 s + 31 of one record into w (32 x 16 floats) */
static inline __attribute__((always_inline)) void dq_sub(const int t, const uint8_t *restrict rec, int s,
                                                         float *restrict w) {
    for (int j = 0; j < 16; j++) {
        vf w0, w1;
        dq_pair(t, rec, s, j, &w0, &w1);
        st(w + (2 * j) * NR, w0);
        st(w + (2 * j + 1) * NR, w1);
    }
}

static void dq_record(const int t, const uint8_t *rec, float *w) {
    for (int s = 0; s < BLOCK_K[t] / 32; s++) dq_sub(t, rec, s, w + s * 32 * NR);
}
#endif
#endif
