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
