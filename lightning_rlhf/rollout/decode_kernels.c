/* Fused kernels for the static engine's decode step on a CPU (see cpu_kernels.py, which compiles this file once
 * per machine and calls it through ctypes). Plain C with GCC/Clang vector extensions and OpenMP: no torch
 * headers, so it builds in about a second with the system's C compiler.
 *
 * Each function does what a handful of torch kernels do in `lean_llama.py`'s eager decode, in one pass over
 * memory. The arithmetic is the same; the order of some sums differs (float32 rounding, about 1e-7 relative),
 * and exp is a degree-6 polynomial after range reduction (Cephes' expf: within 2 ulp), `exp8`.
 *
 * Tensors are float32, or bfloat16 where a function's name ends in _bf16 (the model's activations, the key/value
 * cache). bfloat16 values are widened to float32 on load, all arithmetic is float32, and results are rounded to
 * the nearest bfloat16 (ties to even) on store: the same roundings as torch's bfloat16 kernels where the eager
 * step rounds; inside the attention, fewer (its queries and weights stay float32), or with AVX512_BF16 the same
 * (`lr_attend_bf16` then uses the bfloat16 dot products). NaNs are not kept apart when rounding.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>

typedef float v8 __attribute__((vector_size(32)));

static inline v8 load8(const float *p) { v8 v; memcpy(&v, p, sizeof v); return v; }
static inline void store8(float *p, v8 v) { memcpy(p, &v, sizeof v); }

typedef int32_t v8i __attribute__((vector_size(32)));
typedef uint32_t v8u __attribute__((vector_size(32)));
typedef uint16_t v8h __attribute__((vector_size(16)));

/* bfloat16 is the top half of a float32: widening is a shift; narrowing rounds to nearest, ties to even. */
static inline v8 load8h(const uint16_t *p) {
    v8h h;
    memcpy(&h, p, sizeof h);
    return (v8)(__builtin_convertvector(h, v8u) << 16);
}
static inline v8u round_bits(v8 x) {
    v8u u = (v8u)x;
    return (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
}
static inline void store8h(uint16_t *p, v8 x) {
    v8h h = __builtin_convertvector(round_bits(x), v8h);
    memcpy(p, &h, sizeof h);
}

/* Loads and stores of 8 values, or one, at element i of a float32 (bf = 0) or bfloat16 (bf = 1) array; `rnd`
 * rounds float32 values to what a bfloat16 store keeps (nothing when bf = 0). Each kernel's work on one row is
 * written once over these, inlined with a constant bf into each exported function's own OpenMP loop (a loop
 * inside the shared function would be outlined once, with bf a variable tested in every inner loop). */
#define INLINE static inline __attribute__((always_inline))
#define KB 32 /* key cache columns per block: each block holds its keys transposed, (hd, KB) */
INLINE v8 ld8(const void *p, int64_t i, const int bf) {
    return bf ? load8h((const uint16_t *)p + i) : load8((const float *)p + i);
}
INLINE void st8(void *p, int64_t i, v8 x, const int bf) {
    if (bf) store8h((uint16_t *)p + i, x); else store8((float *)p + i, x);
}
INLINE float ld1(const void *p, int64_t i, const int bf) {
    if (!bf) return ((const float *)p)[i];
    uint32_t u = (uint32_t)((const uint16_t *)p)[i] << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}
INLINE void st1(void *p, int64_t i, float x, const int bf) {
    if (!bf) { ((float *)p)[i] = x; return; }
    v8 v = {x};
    ((uint16_t *)p)[i] = (uint16_t)round_bits(v)[0];
}
/* x, kept in a register: the compiler would otherwise fold a float32 load into each FMA that uses it, loading the
 * same vector once per query head (the attention's blocks then wait on loads, not on FMAs: 10% slower). */
INLINE v8 in_register(v8 x) {
    __asm__("" : "+v"(x));
    return x;
}
INLINE v8 rnd8(v8 x, const int bf) { return bf ? (v8)(round_bits(x) << 16) : x; }
INLINE float rnd1(float x, const int bf) { v8 v = {x}; return bf ? rnd8(v, 1)[0] : x; }

/* exp(x) of 8 floats: 2^k exp(r), k = round(x / ln 2), |r| <= ln(2) / 2, exp(r) by Cephes' expf polynomial
 * (within 2 ulp). Vector arithmetic and bit moves only. Inputs are clamped to [-87, 88], where 2^k stays a normal
 * float: below -87 gives exp(-87) (about 1.6e-38), above 88 exp(88) (about 1.7e38). */
static inline v8 exp8(v8 x) {
    const v8 lo = {-87.0f, -87.0f, -87.0f, -87.0f, -87.0f, -87.0f, -87.0f, -87.0f};
    const v8 hi = {88.0f, 88.0f, 88.0f, 88.0f, 88.0f, 88.0f, 88.0f, 88.0f};
    v8i below = x < lo, above = x > hi;
    x = (v8)(((v8i)x & ~below) | ((v8i)lo & below));
    x = (v8)(((v8i)x & ~above) | ((v8i)hi & above));
    const float magic = 12582912.0f; /* 1.5 * 2^23: adding and subtracting it rounds to an integer */
    v8 k = (x * 1.44269504088896341f + magic) - magic;
    v8 r = x - k * 0.693359375f;
    r = r + k * 2.12194440e-4f;
    v8 p = r * 1.9875691500e-4f + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    v8i bits = (__builtin_convertvector(k, v8i) + 127) << 23;
    return p * (v8)bits;
}

static inline float exp1(float x) {
    v8 v = {x};
    return exp8(v)[0];
}

/* x += y (when y is not NULL), then out = w * x / sqrt(mean(x^2) + eps), row by row: a residual add and the
 * next RMSNorm in one pass. x, y, out: (n, d) rows of `d` values, contiguous; w: (d,). In bfloat16 the sum is
 * rounded as it is stored, and x / sqrt(...) before it is times w, as HF's RMSNorm rounds. */
INLINE void add_rms_norm_row(void *x, const void *y, const void *w, void *out, int64_t i, int64_t d, float eps,
                             const int bf) {
    const int64_t row = i * d;
    if (y) {
        int64_t j = 0;
        for (; j + 8 <= d; j += 8) st8(x, row + j, ld8(x, row + j, bf) + ld8(y, row + j, bf), bf);
        for (; j < d; ++j) st1(x, row + j, ld1(x, row + j, bf) + ld1(y, row + j, bf), bf);
    }
    v8 acc = {0};
    int64_t j = 0;
    for (; j + 8 <= d; j += 8) { v8 v = ld8(x, row + j, bf); acc += v * v; }
    float ss = 0.0f;
    for (; j < d; ++j) ss += ld1(x, row + j, bf) * ld1(x, row + j, bf);
    for (int k = 0; k < 8; ++k) ss += acc[k];
    const float inv = 1.0f / sqrtf(ss / (float)d + eps);
    for (j = 0; j + 8 <= d; j += 8) st8(out, row + j, ld8(w, j, bf) * rnd8(ld8(x, row + j, bf) * inv, bf), bf);
    for (; j < d; ++j) st1(out, row + j, ld1(w, j, bf) * rnd1(ld1(x, row + j, bf) * inv, bf), bf);
}

void lr_add_rms_norm(float *x, const float *y, const float *w, float *out, int64_t n, int64_t d, float eps) {
#pragma omp parallel for schedule(static) if (n * d >= 32768)
    for (int64_t i = 0; i < n; ++i) add_rms_norm_row(x, y, w, out, i, d, eps, 0);
}

void lr_add_rms_norm_bf16(uint16_t *x, const uint16_t *y, const uint16_t *w, uint16_t *out, int64_t n, int64_t d,
                          float eps) {
#pragma omp parallel for schedule(static) if (n * d >= 32768)
    for (int64_t i = 0; i < n; ++i) add_rms_norm_row(x, y, w, out, i, d, eps, 1);
}

/* out = silu(g) * u = g / (1 + exp(-g)) * u. g, u: rows of m values, `g_stride` / `u_stride` apart (a stacked
 * gate-up output is one tensor with both halves in a row); out: (n, m) contiguous. In bfloat16, silu(g) is
 * rounded before the product, as torch's two kernels round. */
INLINE void silu_mul_row(const void *g, int64_t g_stride, const void *u, int64_t u_stride, void *out, int64_t i,
                         int64_t m, const int bf) {
    const int64_t gi = i * g_stride, ui = i * u_stride, oi = i * m;
    int64_t j = 0;
    for (; j + 8 <= m; j += 8) {
        v8 g8 = ld8(g, gi + j, bf);
        st8(out, oi + j, rnd8(g8 / (1.0f + exp8(-g8)), bf) * ld8(u, ui + j, bf), bf);
    }
    for (; j < m; ++j) {
        const float g1 = ld1(g, gi + j, bf);
        st1(out, oi + j, rnd1(g1 / (1.0f + exp1(-g1)), bf) * ld1(u, ui + j, bf), bf);
    }
}

void lr_silu_mul(const float *g, int64_t g_stride, const float *u, int64_t u_stride, float *out, int64_t n,
                 int64_t m) {
#pragma omp parallel for schedule(static) if (n * m >= 32768)
    for (int64_t i = 0; i < n; ++i) silu_mul_row(g, g_stride, u, u_stride, out, i, m, 0);
}

void lr_silu_mul_bf16(const uint16_t *g, int64_t g_stride, const uint16_t *u, int64_t u_stride, uint16_t *out,
                      int64_t n, int64_t m) {
#pragma omp parallel for schedule(static) if (n * m >= 32768)
    for (int64_t i = 0; i < n; ++i) silu_mul_row(g, g_stride, u, u_stride, out, i, m, 1);
}

/* Rotate the new token's queries and keys (RoPE): the queries to q_out (n, heads, hd), float32, the keys to
 * k_out (n, kv_heads, hd) in qk's dtype (`lr_attend` writes them into the cache).
 * qk: per row, heads + kv_heads vectors of hd values (queries, then keys), rows `qk_stride` values apart;
 * cos, sin: (n, heads + kv_heads, hd) float32, the signed sin (first half negated) as `LeanLlama.rope` makes
 * them, so that rotated = x * cos + roll(x, hd / 2) * sin. qk and k_out: float32, or both bfloat16 (the rotation
 * in float32, the keys rounded once as they are stored). Row i is rotated by row `at` of cos and sin: i itself
 * (`rope_row`), or its position when cos and sin are tables by position (the one-call step's `pos`). */
INLINE void rope_row_at(const void *qk, int64_t qk_stride, const float *cos_, const float *sin_, float *q_out,
                        void *k_out, int64_t i, int64_t at, int64_t heads, int64_t kv_heads, int64_t hd,
                        const int bf) {
    const int64_t half = hd / 2, all = heads + kv_heads;
    for (int64_t h = 0; h < all; ++h) {
        const int64_t x = i * qk_stride + h * hd;
        const float *c = cos_ + (at * all + h) * hd, *s = sin_ + (at * all + h) * hd;
        if (h < heads) {
            float *o = q_out + (i * heads + h) * hd;
            for (int64_t j = 0; j < half; ++j) o[j] = ld1(qk, x + j, bf) * c[j] + ld1(qk, x + j + half, bf) * s[j];
            for (int64_t j = half; j < hd; ++j) o[j] = ld1(qk, x + j, bf) * c[j] + ld1(qk, x + j - half, bf) * s[j];
        } else {
            const int64_t k = (i * kv_heads + (h - heads)) * hd;
            for (int64_t j = 0; j < half; ++j)
                st1(k_out, k + j, ld1(qk, x + j, bf) * c[j] + ld1(qk, x + j + half, bf) * s[j], bf);
            for (int64_t j = half; j < hd; ++j)
                st1(k_out, k + j, ld1(qk, x + j, bf) * c[j] + ld1(qk, x + j - half, bf) * s[j], bf);
        }
    }
}

/* `rope_row_at` with cos and sin given per row. */
INLINE void rope_row(const void *qk, int64_t qk_stride, const float *cos_, const float *sin_, float *q_out,
                     void *k_out, int64_t i, int64_t heads, int64_t kv_heads, int64_t hd, const int bf) {
    rope_row_at(qk, qk_stride, cos_, sin_, q_out, k_out, i, i, heads, kv_heads, hd, bf);
}

void lr_rope(const float *qk, int64_t qk_stride, const float *cos_, const float *sin_, float *q_out, float *k_out,
             int64_t n, int64_t heads, int64_t kv_heads, int64_t hd) {
#pragma omp parallel for schedule(static) if (n * (heads + kv_heads) * hd >= 32768)
    for (int64_t i = 0; i < n; ++i) rope_row(qk, qk_stride, cos_, sin_, q_out, k_out, i, heads, kv_heads, hd, 0);
}

void lr_rope_bf16(const uint16_t *qk, int64_t qk_stride, const float *cos_, const float *sin_, float *q_out,
                  uint16_t *k_out, int64_t n, int64_t heads, int64_t kv_heads, int64_t hd) {
#pragma omp parallel for schedule(static) if (n * (heads + kv_heads) * hd >= 32768)
    for (int64_t i = 0; i < n; ++i) rope_row(qk, qk_stride, cos_, sin_, q_out, k_out, i, heads, kv_heads, hd, 1);
}

#define QB 4  /* query heads per pass over a key/value head's cache */
#ifdef __AVX512F__
#define VB 4    /* score columns per register block, in vectors of 8: 32 registers hold QB x 4 accumulators */
#define ACC 24  /* accumulators a block of the weighted sum may hold */
#else
#define VB 2    /* 16 registers (AVX2) */
#define ACC 8
#endif
/* floats between the rows of a query head's scores: blocks of 8 x VB columns may run past `width` */
#define SCORE_STRIDE(width) ((width) + 8 * VB)

/* One register block of scores: s[r][j + 8i] (i < VECS) = sum over e, in order, of q[r][e] * key e of column
 * j + 8i, the keys of the block holding column j starting at element `base` of `keys`. */
INLINE void score_block(const void *keys, int64_t base, const float *q, int64_t hd, int64_t j, float *scores,
                        int64_t stride, const int NR, const int VECS, const int bf) {
    v8 a[QB][VB] = {{{0}}};
    for (int64_t e = 0; e < hd; ++e) {
        v8 k[VB];
        for (int i = 0; i < VECS; ++i) k[i] = in_register(ld8(keys, base + e * KB + 8 * i, bf));
        for (int r = 0; r < NR; ++r)
            for (int i = 0; i < VECS; ++i) a[r][i] += k[i] * q[r * hd + e];
    }
    for (int r = 0; r < NR; ++r)
        for (int i = 0; i < VECS; ++i) store8(scores + r * stride + j + 8 * i, a[r][i]);
}

/* scores[r][j] = sum over e, in order, of q[r][e] * key e of column j, for the NR query heads q (NR rows of hd
 * floats) and the first `width` columns of keys stored in blocks of KB columns, each block (hd, KB): key e of
 * column c at (c / KB) * hd * KB + e * KB + c % KB. So the 8 x VB columns held in registers across the whole
 * head dimension are read from one contiguous stretch of memory, and each key is loaded once for all NR heads.
 * The last block runs past `width` (the keys are allocated in whole blocks; those scores are never read). NR is
 * a constant in each caller (1 to QB), so no lanes are spent on absent heads. `scores` rows are `stride` floats
 * apart, stride >= width rounded up to KB. */
INLINE void scores_nr(const void *keys, const float *q, int64_t hd, int64_t width, float *scores, int64_t stride,
                      const int NR, const int bf) {
    for (int64_t j = 0; j < width; j += 8 * VB)
        score_block(keys, j / KB * hd * KB + j % KB, q, hd, j, scores, stride, NR, VB, bf);
}

/* One register block of the output: out[r][e + 8i] (i < VECS) = sum over the two segments s (prompt, generated)
 * and their columns c < width[s], in order, of p[s][r][c] * values[s][c][e + 8i]. */
INLINE void weighted_block(const void *const values[2], const float *const p[2], const int64_t width[2],
                           int64_t stride, int64_t hd, int64_t e, void *out, const int NR, const int VECS,
                           const int bf) {
    v8 a[QB][8] = {{{0}}};
    for (int s = 0; s < 2; ++s)
        for (int64_t c = 0; c < width[s]; ++c) {
            v8 v[8];
            for (int i = 0; i < VECS; ++i) v[i] = in_register(ld8(values[s], c * hd + e + 8 * i, bf));
            for (int r = 0; r < NR; ++r)
                for (int i = 0; i < VECS; ++i) a[r][i] += v[i] * p[s][r * stride + c];
        }
    for (int r = 0; r < NR; ++r)
        for (int i = 0; i < VECS; ++i) st8(out, r * hd + e + 8 * i, a[r][i], bf);
}

/* out[r][e] = the weighted sum of both segments' values for NR query heads, in register blocks of the head
 * dimension as wide as the registers allow (ACC accumulators): a whole head of 64 for up to three query heads
 * with AVX-512, so the values are then read once, in their order in memory. hd is a multiple of 16. */
INLINE void weighted_nr(const void *const values[2], const float *const p[2], const int64_t width[2],
                        int64_t stride, int64_t hd, void *out, const int NR, const int bf) {
    const int most = ACC / NR;
    int64_t e = 0;
    if (most >= 8)
        for (; e + 64 <= hd; e += 64) weighted_block(values, p, width, stride, hd, e, out, NR, 8, bf);
    if (most >= 4)
        for (; e + 32 <= hd; e += 32) weighted_block(values, p, width, stride, hd, e, out, NR, 4, bf);
    for (; e < hd; e += 16) weighted_block(values, p, width, stride, hd, e, out, NR, 2, bf);
}

/* softmax of `width` scores in place; exactly 0 where a score is -inf (a masked column). The maximum and the
 * total are taken 8 lanes at a time, then across the lanes. */
static void softmax_row(float *s, int64_t width) {
    const v8 none = {-INFINITY, -INFINITY, -INFINITY, -INFINITY, -INFINITY, -INFINITY, -INFINITY, -INFINITY};
    v8 tops = none;
    int64_t c = 0;
    for (; c + 8 <= width; c += 8) {
        v8 v = load8(s + c);
        v8i up = v > tops;
        tops = (v8)(((v8i)v & up) | ((v8i)tops & ~up));
    }
    float top = -INFINITY;
    for (int k = 0; k < 8; ++k) top = tops[k] > top ? tops[k] : top;
    for (; c < width; ++c) top = s[c] > top ? s[c] : top;
    v8 totals = {0};
    for (c = 0; c + 8 <= width; c += 8) {  /* exp(s - top), exactly 0 where s is -inf */
        v8 v = load8(s + c);
        v = (v8)((v8i)exp8(v - top) & (v > none));
        store8(s + c, v);
        totals += v;
    }
    float total = 0.0f;
    for (; c < width; ++c) total += s[c] = s[c] == -INFINITY ? 0.0f : exp1(s[c] - top);
    for (int k = 0; k < 8; ++k) total += totals[k];
    const float inv = 1.0f / total;
    for (c = 0; c < width; ++c) s[c] *= inv;
}

#define ATTEND_NR(NR)                                                                                     \
    do {                                                                                                  \
        scores_nr(keys[0], qh, hd, plen, scores, stride, NR, bf);                                         \
        scores_nr(keys[1], qh, hd, width, scores + plen, stride, NR, bf);                                 \
        for (int r = 0; r < NR; ++r) {                                                                    \
            float *s = scores + r * stride;                                                               \
            if (b)                                                                                        \
                for (int64_t c = 0; c < plen; ++c) s[c] += b[c];                                          \
            for (int64_t c = 0; c < hidden; ++c) s[plen + c] = -INFINITY;                                 \
            softmax_row(s, plen + width);                                                                 \
        }                                                                                                 \
        weighted_nr(values, p, widths, stride, hd, o, NR, bf);                                            \
    } while (0)

/* Attention of one new query per head over a row's prompt and the tokens it generated so far, the new token's
 * key and value first written into the cache at column width - 1 (there, the lines they go to are about to be
 * read anyway; written apart, each key lane was a cache line fetched from memory):
 * out = softmax(q k^T + bias) v, per row and query head, the queries already scaled. The prompt's keys and values
 * are stored once per prompt and read by every row sampled from it (`prompt_of[row]`); each row's own are in
 * the generated part, of which the first `width` columns are attended.
 * q: (n, kv_heads, rep, hd) float32: the rep query heads that share a key/value head are adjacent;
 * pk: (prompts, kv_heads, pcols / KB, hd, KB), pv: (prompts, kv_heads, pcols, hd), pcols >= plen; pbias:
 * (prompts, plen) float32, 0 or -inf, or NULL; gk: (n, kv_heads, cols / KB, hd, KB), gv: (n, kv_heads, cols, hd);
 * new_k: (n, kv_heads, hd); new_v:
 * per row kv_heads vectors of hd values, rows `v_stride` apart; out: like q. The caches and out are float32,
 * or all bfloat16 (then the weights stay float32 and out is rounded once). hd must be a multiple of 16. Each
 * (row, kv head) reads its keys and values once for up to QB of its query heads at a time; the rows of a prompt
 * are adjacent items, so after the first its prompt block comes from the cache, not from memory. pcols and cols
 * are multiples of KB. Key columns past the prompt and past `width` may hold anything: the score blocks run into
 * them, and those scores are overwritten (the prompt's, by the generated part's, computed after) or never read.
 * `masked`: the first `masked` generated columns are not attended, but for the new token's own (a left-padded
 * prompt run as generated tokens: its padding; 0 when decoding). */
INLINE void attend_item(const float *q, const void *pk, const void *pv, const float *pbias, const int64_t *prompt_of,
                        int64_t plen, int64_t pcols, void *gk, void *gv, const void *new_k, const void *new_v,
                        int64_t v_stride, int64_t cols, int64_t width, void *out, int64_t item, int64_t kv_heads,
                        int64_t rep, int64_t hd, float *scores, int64_t masked, const int bf) {
    const int64_t stride = SCORE_STRIDE(pcols + cols), size = bf ? 2 : 4, col = width - 1;
    const int64_t hidden = masked < col ? masked : col; /* leading generated columns not attended */
    const int64_t prompt = prompt_of[item / kv_heads] * kv_heads + item % kv_heads;
    char *key = (char *)gk + (item * hd * cols + col / KB * hd * KB + col % KB) * size;
    for (int64_t e = 0; e < hd; ++e) memcpy(key + e * KB * size, (const char *)new_k + (item * hd + e) * size, size);
    memcpy((char *)gv + (item * cols + col) * hd * size,
           (const char *)new_v + ((item / kv_heads) * v_stride + (item % kv_heads) * hd) * size, hd * size);
    const void *keys[2] = {(const char *)pk + prompt * hd * pcols * size, (const char *)gk + item * hd * cols * size};
    const void *values[2] = {(const char *)pv + prompt * pcols * hd * size,
                             (const char *)gv + item * cols * hd * size};
    const float *b = pbias ? pbias + (prompt / kv_heads) * plen : NULL;
    const int64_t widths[2] = {plen, width};
    for (int64_t r0 = 0; r0 < rep; r0 += QB) {
        const float *qh = q + (item * rep + r0) * hd;
        const float *p[2] = {scores, scores + plen};
        void *o = (char *)out + (item * rep + r0) * hd * size;
        switch (rep - r0 < QB ? rep - r0 : QB) {
            case 1: ATTEND_NR(1); break;
            case 2: ATTEND_NR(2); break;
            case 3: ATTEND_NR(3); break;
            default: ATTEND_NR(4); break;
        }
    }
}

#define ATTEND(NAME, T, BF)                                                                                       \
    void NAME(const float *q, const T *pk, const T *pv, const float *pbias, const int64_t *prompt_of, T *gk, T *gv, \
              const T *new_k, const T *new_v, T *out, int64_t v_stride, int64_t plen, int64_t pcols, int64_t cols,  \
              int64_t width, int64_t n, int64_t kv_heads, int64_t rep, int64_t hd) {                              \
        _Pragma("omp parallel") {                                                                                 \
            float *scores = malloc(sizeof(float) * QB * SCORE_STRIDE(pcols + cols));                              \
            _Pragma("omp for schedule(static)") for (int64_t item = 0; item < n * kv_heads; ++item)               \
                attend_item(q, pk, pv, pbias, prompt_of, plen, pcols, gk, gv, new_k, new_v, v_stride, cols,       \
                            width, out, item, kv_heads, rep, hd, scores, 0, BF);                                \
            free(scores);                                                                                         \
        }                                                                                                         \
    }
ATTEND(lr_attend, float, 0)

#ifdef __AVX512BF16__
#include <immintrin.h>
/* bfloat16 attention with the CPU's bfloat16 dot products (AVX512_BF16: vdpbf16ps multiplies two pairs of
 * bfloat16 per float32 lane and adds both products to it). The queries and the attention weights are rounded to
 * bfloat16 first, as the eager bfloat16 step rounds them; sums stay float32. The caches are in the "pairs" layout
 * (`lr_bf16_pairs` returns 1): per (row or prompt, kv head), keys in blocks of KB columns, each block (hd / 2, KB,
 * 2): the keys of head dimensions 2i and 2i + 1 side by side in each column; values (cols / 2, hd, 2): the values
 * of columns 2j and 2j + 1 side by side in each head dimension. Value columns past those attended must be finite
 * (the engine allocates them zeroed): their weight is 0, and 0 x NaN would not be. */
int lr_bf16_pairs(void) { return 1; }

static inline uint32_t bf16_bits(float x) {
    uint32_t u;
    memcpy(&u, &x, sizeof u);
    return (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
}
static inline uint32_t pair_bits(float lo, float hi) { return bf16_bits(lo) | bf16_bits(hi) << 16; }

/* s[r][j .. j + 32) = q[r] . keys of those columns, the block's keys starting at element `base`. */
INLINE void score_block_pairs(const uint16_t *keys, int64_t base, const uint32_t *qp, int64_t hd, int64_t j,
                              float *scores, int64_t stride, const int NR) {
    __m512 a[QB][2];
    for (int r = 0; r < NR; ++r) a[r][0] = a[r][1] = _mm512_setzero_ps();
    for (int64_t e2 = 0; e2 < hd / 2; ++e2) {
        const __m512bh k0 = (__m512bh)_mm512_loadu_si512(keys + base + e2 * 2 * KB);
        const __m512bh k1 = (__m512bh)_mm512_loadu_si512(keys + base + e2 * 2 * KB + 32);
        for (int r = 0; r < NR; ++r) {
            const __m512bh qq = (__m512bh)_mm512_set1_epi32((int)qp[r * (hd / 2) + e2]);
            a[r][0] = _mm512_dpbf16_ps(a[r][0], k0, qq);
            a[r][1] = _mm512_dpbf16_ps(a[r][1], k1, qq);
        }
    }
    for (int r = 0; r < NR; ++r) {
        _mm512_storeu_ps(scores + r * stride + j, a[r][0]);
        _mm512_storeu_ps(scores + r * stride + j + 16, a[r][1]);
    }
}

/* out[r][e0 .. e0 + 16 VECS) = sum over both segments' column pairs of the weight pairs times the value pairs. */
INLINE void weighted_block_pairs(const uint16_t *const values[2], const uint32_t *const wp[2], const int64_t pairs[2],
                                 int64_t wstride, int64_t hd, int64_t e0, uint16_t *out, const int NR,
                                 const int VECS) {
    __m512 a[QB][4];
    for (int r = 0; r < NR; ++r)
        for (int i = 0; i < VECS; ++i) a[r][i] = _mm512_setzero_ps();
    for (int s = 0; s < 2; ++s)
        for (int64_t c2 = 0; c2 < pairs[s]; ++c2) {
            __m512bh v[4];
            for (int i = 0; i < VECS; ++i)
                v[i] = (__m512bh)_mm512_loadu_si512(values[s] + c2 * 2 * hd + (e0 + 16 * i) * 2);
            for (int r = 0; r < NR; ++r) {
                const __m512bh w = (__m512bh)_mm512_set1_epi32((int)wp[s][r * wstride + c2]);
                for (int i = 0; i < VECS; ++i) a[r][i] = _mm512_dpbf16_ps(a[r][i], v[i], w);
            }
        }
    for (int r = 0; r < NR; ++r)
        for (int i = 0; i < VECS; ++i) {
            const __m256i h = (__m256i)_mm512_cvtneps_pbh(a[r][i]);
            memcpy(out + r * hd + e0 + 16 * i, &h, sizeof h);
        }
}

#define ATTEND_PAIRS_NR(NR)                                                                                \
    do {                                                                                                   \
        for (int r = 0; r < NR; ++r)                                                                       \
            for (int64_t e2 = 0; e2 < hd / 2; ++e2)                                                        \
                qp[r * (hd / 2) + e2] = pair_bits(qh[r * hd + 2 * e2], qh[r * hd + 2 * e2 + 1]);           \
        for (int64_t j = 0; j < plen; j += KB)                                                             \
            score_block_pairs(keys[0], j / KB * hd * KB, qp, hd, j, scores, stride, NR);                   \
        for (int64_t j = 0; j < width; j += KB)                                                            \
            score_block_pairs(keys[1], j / KB * hd * KB, qp, hd, j, scores + plen, stride, NR);            \
        for (int r = 0; r < NR; ++r) {                                                                     \
            float *s = scores + r * stride;                                                                \
            if (b)                                                                                         \
                for (int64_t c = 0; c < plen; ++c) s[c] += b[c];                                           \
            softmax_row(s, plen + width);                                                                  \
            for (int64_t c2 = 0; c2 < pairs[0]; ++c2)                                                      \
                wp[0][r * wstride + c2] = pair_bits(s[2 * c2], 2 * c2 + 1 < plen ? s[2 * c2 + 1] : 0.0f);  \
            for (int64_t c2 = 0; c2 < pairs[1]; ++c2)                                                      \
                wp[1][r * wstride + c2] =                                                                  \
                    pair_bits(s[plen + 2 * c2], 2 * c2 + 1 < width ? s[plen + 2 * c2 + 1] : 0.0f);         \
        }                                                                                                  \
        int64_t e0 = 0;                                                                                    \
        for (; e0 + 64 <= hd; e0 += 64) weighted_block_pairs(values, cwp, pairs, wstride, hd, e0, o, NR, 4); \
        for (; e0 < hd; e0 += 16) weighted_block_pairs(values, cwp, pairs, wstride, hd, e0, o, NR, 1);       \
    } while (0)

/* `lr_attend_bf16` in the pairs layout; the arguments as `attend_item`'s. `work`: per-thread scratch of
 * QB x (stride floats + hd / 2 + pairs words). */
static void attend_item_pairs(const float *q, const uint16_t *pk, const uint16_t *pv, const float *pbias,
                              const int64_t *prompt_of, int64_t plen, int64_t pcols, uint16_t *gk, uint16_t *gv,
                              const uint16_t *new_k, const uint16_t *new_v, int64_t v_stride, int64_t cols,
                              int64_t width, uint16_t *out, int64_t item, int64_t kv_heads, int64_t rep, int64_t hd,
                              float *scores) {
    const int64_t stride = SCORE_STRIDE(pcols + cols), col = width - 1, row = item / kv_heads;
    const int64_t prompt = prompt_of[row] * kv_heads + item % kv_heads;
    uint16_t *key = gk + item * hd * cols + col / KB * hd * KB + col % KB * 2;
    for (int64_t e = 0; e < hd; ++e) key[e / 2 * 2 * KB + e % 2] = new_k[item * hd + e];
    uint16_t *value = gv + item * cols * hd + col / 2 * 2 * hd + col % 2;
    for (int64_t e = 0; e < hd; ++e) value[2 * e] = new_v[row * v_stride + (item % kv_heads) * hd + e];
    const uint16_t *keys[2] = {pk + prompt * hd * pcols, gk + item * hd * cols};
    const uint16_t *values[2] = {pv + prompt * pcols * hd, gv + item * cols * hd};
    const float *b = pbias ? pbias + (prompt / kv_heads) * plen : NULL;
    const int64_t pairs[2] = {(plen + 1) / 2, (width + 1) / 2}, wstride = pairs[0] + pairs[1];
    uint32_t *qp = (uint32_t *)(scores + QB * stride), *wp[2] = {qp + QB * hd / 2, qp + QB * hd / 2 + pairs[0]};
    const uint32_t *cwp[2] = {wp[0], wp[1]};
    for (int64_t r0 = 0; r0 < rep; r0 += QB) {
        const float *qh = q + (item * rep + r0) * hd;
        uint16_t *o = out + (item * rep + r0) * hd;
        switch (rep - r0 < QB ? rep - r0 : QB) {
            case 1: ATTEND_PAIRS_NR(1); break;
            case 2: ATTEND_PAIRS_NR(2); break;
            case 3: ATTEND_PAIRS_NR(3); break;
            default: ATTEND_PAIRS_NR(4); break;
        }
    }
}

void lr_attend_bf16(const float *q, const uint16_t *pk, const uint16_t *pv, const float *pbias,
                    const int64_t *prompt_of, uint16_t *gk, uint16_t *gv, const uint16_t *new_k,
                    const uint16_t *new_v, uint16_t *out, int64_t v_stride, int64_t plen, int64_t pcols, int64_t cols,
                    int64_t width, int64_t n, int64_t kv_heads, int64_t rep, int64_t hd) {
#pragma omp parallel
    {
        const int64_t stride = SCORE_STRIDE(pcols + cols);
        float *scores = malloc(sizeof(float) * QB * stride + sizeof(uint32_t) * QB * (hd / 2 + pcols + cols));
#pragma omp for schedule(static)
        for (int64_t item = 0; item < n * kv_heads; ++item)
            attend_item_pairs(q, pk, pv, pbias, prompt_of, plen, pcols, gk, gv, new_k, new_v, v_stride, cols, width,
                              out, item, kv_heads, rep, hd, scores);
        free(scores);
    }
}
#else
int lr_bf16_pairs(void) { return 0; }
ATTEND(lr_attend_bf16, uint16_t, 1)
#endif

#define BLOCK 256 /* vocabulary entries per block of the sampler's first level */

/* Sample one token per row of logits (n, V) from softmax(logits / temperature) with banned tokens' weights
 * zeroed, by inverting the cumulative distribution at u[i] (in (0, 1]) of the row's kept mass: the first token
 * whose cumulative weight reaches u * total. Two levels: float64 sums of blocks of BLOCK weights pick the block,
 * a running float64 sum inside it the token (rounding may leave the block's end a hair below the target: then its
 * last token of weight > 0). logps[i]: the chosen token's log-prob under the unbanned distribution.
 * tokens[i] = -1 where the banned tokens held all but 1e-20 of the mass (exp8's floor at exp(-87) would then
 * distort what is left; the caller decides what to do). Logits float32, or bfloat16 (`lr_sample_bf16`: widened on
 * load, so the lm head's output is never copied to float32). */
INLINE void sample_row(const void *logits, int64_t i, int64_t V, float temperature, const double *u,
                       const int64_t *banned, int64_t n_banned, int64_t *tokens, float *logps, float *e, double *sums,
                       const int bf) {
    const int64_t blocks = (V + BLOCK - 1) / BLOCK, row = i * V;
    const v8 none = {-INFINITY, -INFINITY, -INFINITY, -INFINITY, -INFINITY, -INFINITY, -INFINITY, -INFINITY};
    v8 tops = none;
    int64_t j = 0;
    for (; j + 8 <= V; j += 8) {  /* scaled logits into e, and their maximum (8 lanes, then across) */
        v8 s = temperature == 1.0f ? ld8(logits, row + j, bf) : ld8(logits, row + j, bf) / temperature;
        store8(e + j, s);
        v8i up = s > tops;
        tops = (v8)(((v8i)s & up) | ((v8i)tops & ~up));
    }
    float top = -INFINITY;
    for (int k = 0; k < 8; ++k) top = tops[k] > top ? tops[k] : top;
    for (; j < V; ++j) {
        e[j] = temperature == 1.0f ? ld1(logits, row + j, bf) : ld1(logits, row + j, bf) / temperature;
        top = e[j] > top ? e[j] : top;
    }
    j = 0;
    for (; j + 8 <= V; j += 8) store8(e + j, exp8(load8(e + j) - top));
    for (; j < V; ++j) e[j] = exp1(e[j] - top);
    double dropped = 0.0;
    for (int64_t b = 0; b < n_banned; ++b) {
        dropped += e[banned[b]];
        e[banned[b]] = 0.0f;
    }
    double kept = 0.0;
    for (int64_t b = 0; b < blocks; ++b) {
        const int64_t end = (b + 1) * BLOCK < V ? (b + 1) * BLOCK : V;
        double lanes[4] = {0.0, 0.0, 0.0, 0.0};
        int64_t c = b * BLOCK;
        for (; c + 4 <= end; c += 4)
            for (int k = 0; k < 4; ++k) lanes[k] += (double)e[c + k];
        double sum = (lanes[0] + lanes[1]) + (lanes[2] + lanes[3]);
        for (; c < end; ++c) sum += (double)e[c];
        sums[b] = sum;
        kept += sum;
    }
    if (!(kept > 1e-20 * (kept + dropped))) {  /* (nearly) all the mass was banned: exp(-87) floors */
        tokens[i] = -1;
        logps[i] = 0.0f;
        return;
    }
    const double target = u[i] * kept;
    double before = 0.0;
    int64_t b = 0;
    while (b + 1 < blocks && before + sums[b] < target) before += sums[b++];
    const int64_t end = (b + 1) * BLOCK < V ? (b + 1) * BLOCK : V;
    int64_t pick = -1;
    double run = before;
    for (int64_t c = b * BLOCK; c < end; ++c) {
        if (e[c] > 0.0f) pick = c;
        run += (double)e[c];
        if (run >= target && e[c] > 0.0f) break;
    }
    for (int64_t c = b * BLOCK - 1; pick < 0 && c >= 0; --c)  /* a last block left with no weight */
        if (e[c] > 0.0f) pick = c;
    tokens[i] = pick;
    const float s = temperature == 1.0f ? ld1(logits, row + pick, bf) : ld1(logits, row + pick, bf) / temperature;
    logps[i] = (float)((double)(s - top) - log(kept + dropped));
}

#define SAMPLE(NAME, T, BF)                                                                                       \
    void NAME(const T *logits, int64_t n, int64_t V, float temperature, const double *u, const int64_t *banned,   \
              int64_t n_banned, int64_t *tokens, float *logps) {                                                  \
        _Pragma("omp parallel") {                                                                                 \
            float *e = malloc(sizeof(float) * V);                                                                 \
            double *sums = malloc(sizeof(double) * ((V + BLOCK - 1) / BLOCK));                                    \
            _Pragma("omp for schedule(static)") for (int64_t i = 0; i < n; ++i)                                   \
                sample_row(logits, i, V, temperature, u, banned, n_banned, tokens, logps, e, sums, BF);           \
            free(e);                                                                                              \
            free(sums);                                                                                           \
        }                                                                                                         \
    }
SAMPLE(lr_sample, float, 0)
SAMPLE(lr_sample_bf16, uint16_t, 1)
