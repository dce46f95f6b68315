/* Fused float32 kernels for the static engine's decode step on a CPU (see cpu_kernels.py, which compiles this
 * file once per machine and calls it through ctypes). Plain C with GCC/Clang vector extensions and OpenMP: no
 * torch headers, so it builds in about a second with the system's C compiler.
 *
 * Each function does what a handful of torch kernels do in `lean_llama.py`'s eager decode, in one pass over
 * memory. The arithmetic is the same; the order of some sums differs (float32 rounding, about 1e-7 relative),
 * and exp is a degree-6 polynomial after range reduction (Cephes' expf: within 2 ulp), `exp8`.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>

typedef float v8 __attribute__((vector_size(32)));

static inline v8 load8(const float *p) { v8 v; memcpy(&v, p, sizeof v); return v; }
static inline void store8(float *p, v8 v) { memcpy(p, &v, sizeof v); }

typedef int32_t v8i __attribute__((vector_size(32)));

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
 * next RMSNorm in one pass. x, y, out: (n, d) rows of `d` floats, contiguous; w: (d,). */
void lr_add_rms_norm(float *x, const float *y, const float *w, float *out, int64_t n, int64_t d, float eps) {
#pragma omp parallel for schedule(static) if (n * d >= 32768)
    for (int64_t i = 0; i < n; ++i) {
        float *xi = x + i * d;
        float *oi = out + i * d;
        if (y) {
            const float *yi = y + i * d;
            for (int64_t j = 0; j < d; ++j) xi[j] += yi[j];
        }
        v8 acc = {0};
        int64_t j = 0;
        for (; j + 8 <= d; j += 8) { v8 v = load8(xi + j); acc += v * v; }
        float ss = 0.0f;
        for (; j < d; ++j) ss += xi[j] * xi[j];
        for (int k = 0; k < 8; ++k) ss += acc[k];
        const float inv = 1.0f / sqrtf(ss / (float)d + eps);
        for (j = 0; j < d; ++j) oi[j] = w[j] * (xi[j] * inv);
    }
}

/* out = silu(g) * u = g / (1 + exp(-g)) * u. g, u: rows of m floats, `g_stride` / `u_stride` floats apart (a
 * stacked gate-up output is one tensor with both halves in a row); out: (n, m) contiguous. */
void lr_silu_mul(const float *g, int64_t g_stride, const float *u, int64_t u_stride, float *out, int64_t n,
                 int64_t m) {
#pragma omp parallel for schedule(static) if (n * m >= 32768)
    for (int64_t i = 0; i < n; ++i) {
        const float *gi = g + i * g_stride, *ui = u + i * u_stride;
        float *oi = out + i * m;
        int64_t j = 0;
        for (; j + 8 <= m; j += 8) {
            v8 g8 = load8(gi + j);
            store8(oi + j, g8 / (1.0f + exp8(-g8)) * load8(ui + j));
        }
        for (; j < m; ++j) oi[j] = gi[j] / (1.0f + exp1(-gi[j])) * ui[j];
    }
}

/* Rotate the new token's queries and keys (RoPE), write the rotated queries to q_out (n, heads, hd) and the
 * keys and values into the cache at `column`.
 * qk: per row, heads + kv_heads vectors of hd floats (queries, then keys), rows `qk_stride` floats apart;
 * v: per row kv_heads vectors of hd floats, rows `v_stride` apart;
 * cos, sin: (n, heads + kv_heads, hd), the signed sin (first half negated) as `LeanLlama.rope` makes them, so that
 * rotated = x * cos + roll(x, hd / 2) * sin;
 * kc: (n, kv_heads, hd, cols), keys stored transposed; vc: (n, kv_heads, cols, hd). */
void lr_rope_store(const float *qk, int64_t qk_stride, const float *v, int64_t v_stride, const float *cos_,
                   const float *sin_, float *q_out, float *kc, float *vc, int64_t n, int64_t heads,
                   int64_t kv_heads, int64_t hd, int64_t cols, int64_t column) {
    const int64_t half = hd / 2, all = heads + kv_heads;
#pragma omp parallel for schedule(static) if (n * all * hd >= 32768)
    for (int64_t i = 0; i < n; ++i) {
        for (int64_t h = 0; h < all; ++h) {
            const float *x = qk + i * qk_stride + h * hd;
            const float *c = cos_ + (i * all + h) * hd, *s = sin_ + (i * all + h) * hd;
            if (h < heads) {
                float *o = q_out + (i * heads + h) * hd;
                for (int64_t j = 0; j < half; ++j) o[j] = x[j] * c[j] + x[j + half] * s[j];
                for (int64_t j = half; j < hd; ++j) o[j] = x[j] * c[j] + x[j - half] * s[j];
            } else {
                float *k = kc + (i * kv_heads + (h - heads)) * hd * cols + column;
                for (int64_t j = 0; j < half; ++j) k[j * cols] = x[j] * c[j] + x[j + half] * s[j];
                for (int64_t j = half; j < hd; ++j) k[j * cols] = x[j] * c[j] + x[j - half] * s[j];
            }
        }
        for (int64_t h = 0; h < kv_heads; ++h)
            memcpy(vc + ((i * kv_heads + h) * cols + column) * hd, v + i * v_stride + h * hd, hd * sizeof(float));
    }
}

#define QB 4  /* query heads per pass over a key/value head's cache */

/* Attention of one new query per head over the first `width` cache columns:
 * out = softmax(q k^T + bias) v, per row and query head, the queries already scaled.
 * q, out: (n, kv_heads, rep, hd): the rep query heads that share a key/value head are adjacent;
 * kc: (n, kv_heads, hd, cols), vc: (n, kv_heads, cols, hd); bias: (n, cols), 0 or -inf, or NULL.
 * hd must be a multiple of 16. Each (row, kv head) reads its keys and values once for all its query heads. */
void lr_attend(const float *q, const float *kc, const float *vc, const float *bias, float *out, int64_t n,
               int64_t kv_heads, int64_t rep, int64_t hd, int64_t cols, int64_t width) {
#pragma omp parallel
    {
        float *scores = malloc(sizeof(float) * QB * (width + 8));
        float *qbuf = malloc(sizeof(float) * QB * hd);
#pragma omp for schedule(static)
        for (int64_t item = 0; item < n * kv_heads; ++item) {
            const float *keys = kc + item * hd * cols, *values = vc + item * cols * hd;
            const float *b = bias ? bias + (item / kv_heads) * cols : NULL;
            for (int64_t r0 = 0; r0 < rep; r0 += QB) {
                const int64_t nr = rep - r0 < QB ? rep - r0 : QB;
                memset(qbuf, 0, sizeof(float) * QB * hd);
                memcpy(qbuf, q + (item * rep + r0) * hd, sizeof(float) * nr * hd);
                /* scores, row by row of the transposed keys (a sequential read of the cache): 8 columns at a
                 * time for each query head, summed over the head dimension in order */
                const int64_t wide = width - width % 8;
                for (int64_t r = 0; r < QB; ++r) memset(scores + r * (width + 8), 0, sizeof(float) * width);
                for (int64_t e = 0; e < hd; ++e) {
                    const float *k = keys + e * cols;
                    const float q0 = qbuf[e], q1 = qbuf[hd + e], q2 = qbuf[2 * hd + e], q3 = qbuf[3 * hd + e];
                    float *s0 = scores, *s1 = s0 + (width + 8), *s2 = s1 + (width + 8), *s3 = s2 + (width + 8);
                    for (int64_t j = 0; j < wide; j += 8) {
                        v8 kj = load8(k + j);
                        store8(s0 + j, load8(s0 + j) + kj * q0);
                        store8(s1 + j, load8(s1 + j) + kj * q1);
                        store8(s2 + j, load8(s2 + j) + kj * q2);
                        store8(s3 + j, load8(s3 + j) + kj * q3);
                    }
                    for (int64_t j = wide; j < width; ++j) {
                        s0[j] += k[j] * q0;
                        s1[j] += k[j] * q1;
                        s2[j] += k[j] * q2;
                        s3[j] += k[j] * q3;
                    }
                }
                /* softmax of each query head's scores (bias added first), in place */
                for (int64_t r = 0; r < nr; ++r) {
                    float *s = scores + r * (width + 8);
                    if (b)
                        for (int64_t c = 0; c < width; ++c) s[c] += b[c];
                    float top = -INFINITY;
                    for (int64_t c = 0; c < width; ++c) top = s[c] > top ? s[c] : top;
                    const v8 none = {-INFINITY, -INFINITY, -INFINITY, -INFINITY, -INFINITY, -INFINITY, -INFINITY,
                                     -INFINITY};
                    int64_t c = 0;
                    for (; c + 8 <= width; c += 8) {  /* exp(s - top), exactly 0 where the bias is -inf */
                        v8 v = load8(s + c);
                        store8(s + c, (v8)((v8i)exp8(v - top) & (v > none)));
                    }
                    for (; c < width; ++c) s[c] = s[c] == -INFINITY ? 0.0f : exp1(s[c] - top);
                    float total = 0.0f;
                    for (c = 0; c < width; ++c) total += s[c];
                    const float inv = 1.0f / total;
                    for (int64_t c = 0; c < width; ++c) s[c] *= inv;
                }
                /* out = weights @ values, row by row of the cache (a sequential read), summed over the columns
                 * in order */
                float *o = out + (item * rep + r0) * hd;
                memset(o, 0, sizeof(float) * nr * hd);
                for (int64_t c = 0; c < width; ++c) {
                    const float *v = values + c * hd;
                    for (int64_t r = 0; r < nr; ++r) {
                        const float p = scores[r * (width + 8) + c];
                        float *orow = o + r * hd;
                        for (int64_t e = 0; e < hd; e += 8) store8(orow + e, load8(orow + e) + load8(v + e) * p);
                    }
                }
            }
        }
        free(scores);
        free(qbuf);
    }
}

#define BLOCK 256 /* vocabulary entries per block of the sampler's first level */

/* Sample one token per row of logits (n, V) from softmax(logits / temperature) with banned tokens' weights
 * zeroed, by inverting the cumulative distribution at u[i] (in (0, 1]) of the row's kept mass: the first token
 * whose cumulative weight reaches u * total. Two levels: float64 sums of blocks of BLOCK weights pick the block,
 * a running float64 sum inside it the token (rounding may leave the block's end a hair below the target: then its
 * last token of weight > 0). logps[i]: the chosen token's log-prob under the unbanned distribution.
 * tokens[i] = -1 where the banned tokens held all but 1e-20 of the mass (exp8's floor at exp(-87) would then
 * distort what is left; the caller decides what to do). */
void lr_sample(const float *logits, int64_t n, int64_t V, float temperature, const double *u,
               const int64_t *banned, int64_t n_banned, int64_t *tokens, float *logps) {
    const int64_t blocks = (V + BLOCK - 1) / BLOCK;
#pragma omp parallel
    {
        float *e = malloc(sizeof(float) * V);
        double *sums = malloc(sizeof(double) * blocks);
#pragma omp for schedule(static)
        for (int64_t i = 0; i < n; ++i) {
            const float *l = logits + i * V;
            const v8 none = {-INFINITY, -INFINITY, -INFINITY, -INFINITY, -INFINITY, -INFINITY, -INFINITY,
                             -INFINITY};
            v8 tops = none;
            int64_t j = 0;
            for (; j + 8 <= V; j += 8) {  /* scaled logits into e, and their maximum (8 lanes, then across) */
                v8 s = temperature == 1.0f ? load8(l + j) : load8(l + j) / temperature;
                store8(e + j, s);
                v8i up = s > tops;
                tops = (v8)(((v8i)s & up) | ((v8i)tops & ~up));
            }
            float top = -INFINITY;
            for (int k = 0; k < 8; ++k) top = tops[k] > top ? tops[k] : top;
            for (; j < V; ++j) {
                e[j] = temperature == 1.0f ? l[j] : l[j] / temperature;
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
                continue;
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
            const float s = temperature == 1.0f ? l[pick] : l[pick] / temperature;
            logps[i] = (float)((double)(s - top) - log(kept + dropped));
        }
        free(e);
        free(sums);
    }
}
