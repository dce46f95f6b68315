/* Forward and backward of RMSNorm and of SiLU(gate) * up, for training a small float32 model on a CPU
 * (`train_ops.py`). Included by decode_step.c after decode_kernels.c (one translation unit), whose vector helpers
 * (load8, store8, exp8, exp1) these use. float32 only; each row is one pass over memory, where torch's autograd
 * runs 5-10 kernels for an RMSNorm and 3-4 for the SiLU product, each a pass of its own.
 */

/* y = w * (x * rstd), rstd = 1 / sqrt(mean(x^2) + eps), row by row (HF's RMSNorm in float32); rstd (n,) kept for
 * the backward. x, y: (n, d) contiguous. */
void lr_rms_norm_fwd(const float *x, const float *w, float *y, float *rstd, int64_t n, int64_t d, float eps) {
#pragma omp parallel for schedule(static) if (n * d >= 32768)
    for (int64_t i = 0; i < n; ++i) {
        const float *xi = x + i * d;
        float *yi = y + i * d;
        v8 acc = {0};
        int64_t j = 0;
        for (; j + 8 <= d; j += 8) { v8 v = load8(xi + j); acc += v * v; }
        float ss = 0.0f;
        for (; j < d; ++j) ss += xi[j] * xi[j];
        for (int k = 0; k < 8; ++k) ss += acc[k];
        const float r = 1.0f / sqrtf(ss / (float)d + eps);
        rstd[i] = r;
        for (j = 0; j + 8 <= d; j += 8) store8(yi + j, load8(w + j) * (load8(xi + j) * r));
        for (; j < d; ++j) yi[j] = w[j] * (xi[j] * r);
    }
}

/* The RMSNorm's gradients from the output's, g (n, d): with h = x * rstd,
 *   dx = rstd * (g w - h * mean(g w h)),   dw = sum over rows of g h.
 * dw's sum: each thread sums its block of rows (static schedule, so the same rows each call), then the threads'
 * sums are added in thread order: the same result on every call with the same thread count. */
void lr_rms_norm_bwd(const float *x, const float *w, const float *rstd, const float *g, float *dx, float *dw,
                     int64_t n, int64_t d) {
    float *part = NULL;
    int threads = 1;
#pragma omp parallel
    {
#pragma omp single
        {
            threads = omp_get_num_threads();
            part = calloc((size_t)threads * d, sizeof(float));
        }
        float *mine = part + (int64_t)omp_get_thread_num() * d;
#pragma omp for schedule(static)
        for (int64_t i = 0; i < n; ++i) {
            const float *xi = x + i * d, *gi = g + i * d;
            float *dxi = dx + i * d;
            const float r = rstd[i];
            float dot = 0.0f;
            for (int64_t j = 0; j < d; ++j) {
                const float h = xi[j] * r;
                dot += gi[j] * w[j] * h;
                mine[j] += gi[j] * h;
            }
            const float m = dot / (float)d;
            for (int64_t j = 0; j < d; ++j) dxi[j] = r * (gi[j] * w[j] - xi[j] * r * m);
        }
#pragma omp for schedule(static)
        for (int64_t j = 0; j < d; ++j) {
            float s = 0.0f;
            for (int t = 0; t < threads; ++t) s += part[(int64_t)t * d + j];
            dw[j] = s;
        }
    }
    free(part);
}

/* The gradients of out = silu(gate) * up from the output's, g: with s = sigmoid(gate),
 *   dup = g * gate * s,   dgate = g * up * s * (1 + gate * (1 - s))   (torch's silu_backward).
 * All (n,) contiguous. */
void lr_silu_mul_bwd(const float *gate, const float *up, const float *g, float *dgate, float *dup, int64_t n) {
#pragma omp parallel for schedule(static) if (n >= 32768)
    for (int64_t b = 0; b < n; b += 8) {
        if (b + 8 <= n) {
            const v8 z = load8(gate + b), u = load8(up + b), gg = load8(g + b);
            const v8 s = 1.0f / (1.0f + exp8(-z));
            store8(dup + b, gg * (z * s));
            store8(dgate + b, gg * u * (s * (1.0f + z * (1.0f - s))));
        } else {
            for (int64_t j = b; j < n; ++j) {
                const float z = gate[j], s = 1.0f / (1.0f + exp1(-z));
                dup[j] = g[j] * (z * s);
                dgate[j] = g[j] * up[j] * (s * (1.0f + z * (1.0f - s)));
            }
        }
    }
}

/* Per row i of x (n, v): z = x * inv_t - m, with m the row's largest scaled value (0 when that is not finite, as
 * in `functional.logprobs`), ls = log sum exp(z), so log softmax(x * inv_t) = z - ls. Writes
 *   stats[2i] = m, stats[2i + 1] = ls            (kept for the backward),
 *   logp[i] = z[tok[i]] - ls,
 *   entropy[i] = ls - sum_j p_j z_j  with p = exp(z - ls), entries of -inf adding 0   (when entropy is not NULL).
 * Two passes over each row (max; exp and sums), where torch's chunked path takes about ten. */
void lr_token_logprobs_fwd(const float *x, const int64_t *tok, float *stats, float *logp, float *entropy,
                           int64_t n, int64_t v, float inv_t) {
#pragma omp parallel for schedule(static) if (n * v >= 32768)
    for (int64_t i = 0; i < n; ++i) {
        const float *xi = x + i * v;
        v8 top8 = -INFINITY - (v8){0};
        int64_t j = 0;
        for (; j + 8 <= v; j += 8) {
            const v8 a = load8(xi + j);
            const v8i more = a > top8;
            top8 = (v8)(((v8i)a & more) | ((v8i)top8 & ~more));
        }
        float top = -INFINITY;
        for (int k = 0; k < 8; ++k) top = top8[k] > top ? top8[k] : top;
        for (; j < v; ++j) top = xi[j] > top ? xi[j] : top;
        float m = top * inv_t; /* inv_t > 0: the largest scaled value is the scaled largest */
        if (!isfinite(m)) m = 0.0f;
        const v8 mm = m - (v8){0}, t8 = inv_t - (v8){0}, ninf = -INFINITY - (v8){0};
        v8 s8 = {0}, ez8 = {0};
        for (j = 0; j + 8 <= v; j += 8) {
            const v8 z = load8(xi + j) * t8 - mm, e = exp8(z);
            const v8i keep = ~(z == ninf); /* exp8 clamps: -inf entries add exactly 0 (NaNs propagate) */
            s8 += (v8)((v8i)e & keep);
            ez8 += (v8)((v8i)(e * z) & keep);
        }
        float s = 0.0f, ez = 0.0f;
        for (int k = 0; k < 8; ++k) { s += s8[k]; ez += ez8[k]; }
        for (; j < v; ++j) {
            const float z = xi[j] * inv_t - m;
            if (z != -INFINITY) { const float e = exp1(z); s += e; ez += e * z; }
        }
        const float ls = logf(s);
        stats[2 * i] = m;
        stats[2 * i + 1] = ls;
        logp[i] = (xi[tok[i]] * inv_t - m) - ls;
        if (entropy) entropy[i] = ls - ez / s;
    }
}

/* The gradient of logp (above) from g (n,): dx_ij = inv_t * g_i * ([j == tok_i] - exp(z_ij - ls_i)). */
void lr_token_logprobs_bwd(const float *x, const int64_t *tok, const float *stats, const float *g, float *dx,
                           int64_t n, int64_t v, float inv_t) {
#pragma omp parallel for schedule(static) if (n * v >= 32768)
    for (int64_t i = 0; i < n; ++i) {
        const float *xi = x + i * v;
        float *di = dx + i * v;
        const float m = stats[2 * i], ls = stats[2 * i + 1], gi = g[i];
        const v8 mm = m - (v8){0}, lsv = ls - (v8){0}, t8 = inv_t - (v8){0}, ninf = -INFINITY - (v8){0};
        const v8 scale = -(gi * inv_t) - (v8){0};
        int64_t j = 0;
        for (; j + 8 <= v; j += 8) {
            const v8 z = load8(xi + j) * t8 - mm;
            const v8 p = (v8)((v8i)exp8(z - lsv) & ~(z == ninf));
            store8(di + j, p * scale);
        }
        for (; j < v; ++j) {
            const float z = xi[j] * inv_t - m;
            di[j] = z != -INFINITY ? exp1(z - ls) * -(gi * inv_t) : 0.0f;
        }
        di[tok[i]] += gi * inv_t;
    }
}
