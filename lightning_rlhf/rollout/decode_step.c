/* A whole float32 decode step of a small Llama-family model in one call (see decode_step.py): every layer's
 * RMSNorms, projections, rotary embedding, attention and SiLU, and the lm head, inside one OpenMP parallel
 * region. This file includes decode_kernels.c, whose per-row and per-item functions it calls (one translation
 * unit: the build compiles this file, and the library has both files' functions).
 *
 * A small model's step is mostly the cost of calling kernels, not of the arithmetic: a 1M-parameter Llama's
 * step at 32 rows is about 40 torch and fused kernels of 5-100 us each, each a fork and join of the threads. Here
 * the threads meet at a barrier between phases instead, and the projections are a register-blocked GEMM of our
 * own (`gemm`) over weights stored transposed, (in, out): a tile of GR rows times GC columns of the output is held
 * in registers across the whole input dimension. That GEMM is slower than oneDNN's for large matrices, so the
 * engine uses this step only for small models (`decode_step.SMALL_STEP_BYTES`).
 *
 * The arithmetic is `decode_kernels.c`'s, with the GEMM summing each output over the input dimension in order
 * (float32; differs from MKL's or oneDNN's blocked sums by rounding, about 1e-7 relative).
 */
#include "decode_kernels.c"
#include <omp.h>

#ifdef __AVX512F__
#define GV 4 /* vectors of 8 columns per GEMM tile: GR x GV accumulators of the 32 registers */
#else
#define GV 2 /* 16 registers (AVX2) */
#endif
#define GR 6        /* rows per GEMM tile */
#define GC (8 * GV) /* columns per GEMM tile; the weights' columns are padded to a multiple of it */

/* c[r][j] = bias[j] + sum over k, in order, of a[r][k] * b[k][j], for r < NR and j < nc (nc <= GC; the tile's
 * other columns are computed from b's zero padding and dropped). a: rows lda apart; b: rows ldb apart; c: rows
 * ldc apart; bias: NULL or GC values. */
INLINE void gemm_tile(const float *a, int64_t lda, const float *b, int64_t ldb, const float *bias, int64_t K,
                      float *c, int64_t ldc, int64_t nc, const int NR) {
    v8 acc[GR][GV];
    for (int r = 0; r < NR; ++r)
        for (int i = 0; i < GV; ++i) acc[r][i] = bias ? load8(bias + 8 * i) : (v8){0};
    for (int64_t k = 0; k < K; ++k) {
        v8 w[GV];
        for (int i = 0; i < GV; ++i) w[i] = load8(b + k * ldb + 8 * i);
        for (int r = 0; r < NR; ++r) {
            const float x = a[r * lda + k];
            for (int i = 0; i < GV; ++i) acc[r][i] += w[i] * x;
        }
    }
    for (int r = 0; r < NR; ++r) {
        if (nc == GC) {
            for (int i = 0; i < GV; ++i) store8(c + r * ldc + 8 * i, acc[r][i]);
        } else {
            float t[GC];
            for (int i = 0; i < GV; ++i) store8(t + 8 * i, acc[r][i]);
            memcpy(c + r * ldc, t, sizeof(float) * nc);
        }
    }
}

#define TILE(NR) gemm_tile(a + r * lda, lda, b + j, np, bias ? bias + j : NULL, K, c + r * ldc + j, ldc, nc, NR)

/* c (n, N) = a (n, K) @ b (K, np) + bias, np = N rounded up to GC (b's and bias's extra columns zero). Called
 * inside a parallel region: the threads share out the column blocks, each runs down all n rows of its blocks (the
 * block of b stays in the cache), and all meet at the loop's closing barrier. */
static void gemm(const float *a, int64_t lda, const float *b, const float *bias, int64_t K, int64_t N, float *c,
                 int64_t ldc, int64_t n) {
    const int64_t np = (N + GC - 1) / GC * GC;
#pragma omp for schedule(static)
    for (int64_t j = 0; j < np; j += GC) {
        const int64_t nc = N - j < GC ? N - j : GC;
        int64_t r = 0;
        for (; r + GR <= n; r += GR) TILE(GR);
        switch (n - r) {
            case 1: TILE(1); break;
            case 2: TILE(2); break;
            case 3: TILE(3); break;
            case 4: TILE(4); break;
            case 5: TILE(5); break;
            default: break;
        }
    }
}

/* One layer: RMSNorm weights (D), projections transposed and column-padded (`gemm`'s b) with their biases (NULL,
 * or padded like the columns), and the layer's cache in `lr_attend`'s layout. */
typedef struct {
    const float *ln1, *qkv, *qkv_bias, *o, *o_bias, *ln2, *gate_up, *gate_up_bias, *down, *down_bias;
    const float *pk, *pv; /* the prompt part: (prompts, kv_heads, ...) */
    float *gk, *gv;       /* the generated part: (n, kv_heads, ...) */
} StepLayer;

/* The step's sizes, model, inputs and scratch (all float32, rows contiguous). x, tmp: (n, D); h: (n, D); qkv: (n,
 * (H + 2 Hk) hd), the stacked q, k, v projection; q: (n, H, hd); knew: (n, Hk, hd); att: (n, H hd); gu: (n, 2F),
 * gate then up; act: (n, F); logits: (n, V). cos_, sin_: (n, H + Hk, hd) as `lr_rope` takes them, or with pos
 * (n,) tables by position, row i rotated by their row pos[i]; tokens: (n,);
 * pbias, prompt_of, plen, pcols, cols, width: as `lr_attend` takes them. T: tokens per cache row (n / T cache
 * rows; row r of the inputs is cache row r / T's token at column width - 1 + r % T, which attends to the columns
 * before it: a teacher-forced pass, or a prompt run as generated tokens); masked: NULL, or per cache row the
 * leading generated columns it does not attend (`attend_item`'s `masked`). */
typedef struct {
    int64_t n, D, H, Hk, hd, F, V, layers, plen, pcols, cols, width, T;
    float eps;
    const float *embed, *norm, *head, *head_bias, *pbias, *cos_, *sin_;
    const int64_t *tokens, *prompt_of, *masked, *pos;
    float *x, *h, *qkv, *q, *knew, *att, *tmp, *gu, *act, *logits;
    const StepLayer *layer;
} Step;

/* logits = lm_head(norm(the decoder over one new token per row)): what `lr_add_rms_norm`, the projections,
 * `lr_rope`, `lr_attend` (which writes each new key and value into the cache) and `lr_silu_mul` do in
 * `LeanLlama._decode_fused`, phase after phase, each phase's rows or items shared out among the threads. */
void lr_decode_step(const Step *s) {
    const int64_t n = s->n, T = s->T, D = s->D, hd = s->hd, H = s->H, Hk = s->Hk, F = s->F;
    const int64_t nqkv = (H + 2 * Hk) * hd;
#pragma omp parallel
    {
        float *scores = malloc(sizeof(float) * QB * SCORE_STRIDE(s->pcols + s->cols));
#pragma omp for schedule(static)
        for (int64_t i = 0; i < n; ++i) memcpy(s->x + i * D, s->embed + s->tokens[i] * D, sizeof(float) * D);
        for (int64_t l = 0; l < s->layers; ++l) {
            const StepLayer *y = s->layer + l;
#pragma omp for schedule(static)
            for (int64_t i = 0; i < n; ++i) add_rms_norm_row(s->x, l ? s->tmp : NULL, y->ln1, s->h, i, D, s->eps, 0);
            gemm(s->h, D, y->qkv, y->qkv_bias, D, nqkv, s->qkv, nqkv, n);
#pragma omp for schedule(static)
            for (int64_t i = 0; i < n; ++i)
                rope_row_at(s->qkv, nqkv, s->cos_, s->sin_, s->q, s->knew, i, s->pos ? s->pos[i] : i, H, Hk, hd, 0);
#pragma omp for schedule(static)
            for (int64_t item = 0; item < (n / T) * Hk; ++item) {
                const int64_t i = item / Hk, h = item % Hk;  /* cache row i, kv head h: its T positions in order */
                float *gk = y->gk + i * Hk * hd * s->cols, *gv = y->gv + i * Hk * hd * s->cols;
                const int64_t masked = s->masked ? s->masked[i] : 0;
                for (int64_t t = 0, r = i * T; t < T; ++t, ++r)
                    attend_item(s->q + r * H * hd, y->pk, y->pv, s->pbias, s->prompt_of + i, s->plen, s->pcols, gk,
                                gv, s->knew + r * Hk * hd, s->qkv + r * nqkv + (H + Hk) * hd, nqkv, s->cols,
                                s->width + t, s->att + r * H * hd, h, Hk, H / Hk, hd, scores, masked, 0);
            }
            gemm(s->att, H * hd, y->o, y->o_bias, H * hd, D, s->tmp, D, n);
#pragma omp for schedule(static)
            for (int64_t i = 0; i < n; ++i) add_rms_norm_row(s->x, s->tmp, y->ln2, s->h, i, D, s->eps, 0);
            gemm(s->h, D, y->gate_up, y->gate_up_bias, D, 2 * F, s->gu, 2 * F, n);
#pragma omp for schedule(static)
            for (int64_t i = 0; i < n; ++i) silu_mul_row(s->gu, 2 * F, s->gu + F, 2 * F, s->act, i, F, 0);
            gemm(s->act, F, y->down, y->down_bias, F, D, s->tmp, D, n);
        }
#pragma omp for schedule(static)
        for (int64_t i = 0; i < n; ++i)
            add_rms_norm_row(s->x, s->layers ? s->tmp : NULL, s->norm, s->h, i, D, s->eps, 0);
        gemm(s->h, D, s->head, s->head_bias, D, s->V, s->logits, s->V, n);
        free(scores);
    }
}

/* The columns the weights passed to `lr_decode_step` are padded to a multiple of. */
int lr_step_columns(void) { return GC; }

#include "train_kernels.c" /* the training kernels: one library, one build */
