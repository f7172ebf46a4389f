/* tests/test_ops.c — every non-GEMM op of tensor.c: fast path vs its _ref twin (double) or an
 * index formula written here, on odd sizes; 1 vs 2 threads bit-identical; backward
 * accumulation (+=) checked by starting every gradient from the same random values. */
#include "tests/test.h"

#include <stdint.h>

static MsRng rng;

/* Every test buffer is freed at exit (test_track, tests/test.h). */
static float *randn(size_t n, float std) { return test_track(test_randn(&rng, n, std)); }
static float *zeros(size_t n) { return test_track(test_zeros(n)); }

static float *copyf(const float *x, size_t n) {
    float *y = zeros(n);
    memcpy(y, x, n * sizeof(float));
    return y;
}

/* ---- harness: run an op three times (ref; fast on 1 thread; fast on 2 threads) ---- */
typedef struct { float *p; size_t n; const char *name; } Out;

/* run(ctx, ref) computes every output named in outs (re-initialising accumulated gradients
 * itself). Fast vs ref within rel/abs; fast 1 thread vs 2 threads bitwise. */
static void compare_paths(const char *op, void (*run)(void *, int), void *ctx, Out *outs, int nout,
                          double rel, double abs) {
    float *ref[8], *one[8];
    char label[96];
    run(ctx, 1);
    for (int i = 0; i < nout; i++) ref[i] = copyf(outs[i].p, outs[i].n);
    ms_set_threads(1);
    run(ctx, 0);
    for (int i = 0; i < nout; i++) one[i] = copyf(outs[i].p, outs[i].n);
    ms_set_threads(2);
    run(ctx, 0);
    for (int i = 0; i < nout; i++) {
        snprintf(label, sizeof label, "%s %s vs ref", op, outs[i].name);
        check_close(label, outs[i].p, ref[i], outs[i].n, rel, abs);
        snprintf(label, sizeof label, "%s %s 1 vs 2 threads", op, outs[i].name);
        check_bitwise(label, one[i], outs[i].p, outs[i].n);
    }
    ms_set_threads(0);
}

/* ---- GroupNorm ---- */
typedef struct {
    int N, C, HW, G;
    float *x, *w, *b, *dy, *out, *mean, *rstd, *dx, *dw, *db, *dx0, *dw0, *db0;
} GN;

static void gn_run(void *p, int ref) {
    GN *g = (GN *)p;
    size_t n = (size_t)g->N * g->C * g->HW;
    memcpy(g->dx, g->dx0, n * sizeof(float));
    memcpy(g->dw, g->dw0, (size_t)g->C * sizeof(float));
    memcpy(g->db, g->db0, (size_t)g->C * sizeof(float));
    (ref ? groupnorm_forward_ref : groupnorm_forward)(g->out, g->mean, g->rstd, g->x, g->w, g->b, g->N, g->C, g->HW, g->G, 1e-5f);
    (ref ? groupnorm_backward_ref : groupnorm_backward)(g->dx, g->dw, g->db, g->dy, g->x, g->mean, g->rstd, g->w, g->N, g->C, g->HW, g->G);
}

static void test_groupnorm(int N, int C, int HW, int G, float offset) {
    GN g = { N, C, HW, G, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0 };
    size_t n = (size_t)N * C * HW;
    g.x = randn(n, 1.0f);
    for (size_t i = 0; i < n; i++) g.x[i] += offset;
    g.w = randn(C, 1.0f); g.b = randn(C, 1.0f); g.dy = randn(n, 1.0f);
    g.out = zeros(n); g.mean = zeros((size_t)N * G); g.rstd = zeros((size_t)N * G);
    g.dx = zeros(n); g.dw = zeros(C); g.db = zeros(C);
    g.dx0 = randn(n, 1.0f); g.dw0 = randn(C, 1.0f); g.db0 = randn(C, 1.0f);
    Out outs[] = { { g.out, n, "out" }, { g.mean, (size_t)N * G, "mean" }, { g.rstd, (size_t)N * G, "rstd" },
                   { g.dx, n, "dx" }, { g.dw, (size_t)C, "dw" }, { g.db, (size_t)C, "db" } };
    char op[64];
    snprintf(op, sizeof op, "groupnorm %dx%dx%d G%d", N, C, HW, G);
    /* float32 elementwise math after double statistics: a few ulps per element. Like PyTorch's
     * CPU kernel the output is x * scale + shift with a float mean, so a mean of |offset| standard
     * deviations costs ~2 ulp(offset) of absolute error on unit-scale outputs. */
    compare_paths(op, gn_run, &g, outs, 6, 2e-6 + 1.2e-7 * fabs(offset), 0);
}

/* ---- LayerNorm ---- */
typedef struct { int N, D, affine; float *x, *w, *b, *dy, *out, *mean, *rstd, *dx, *dw, *db, *dx0, *dw0, *db0; } LN;

static void ln_run(void *p, int ref) {
    LN *g = (LN *)p;
    size_t n = (size_t)g->N * g->D;
    const float *w = g->affine ? g->w : NULL, *b = g->affine ? g->b : NULL;
    memcpy(g->dx, g->dx0, n * sizeof(float));
    memcpy(g->dw, g->dw0, (size_t)g->D * sizeof(float));
    memcpy(g->db, g->db0, (size_t)g->D * sizeof(float));
    (ref ? layernorm_forward_ref : layernorm_forward)(g->out, g->mean, g->rstd, g->x, w, b, g->N, g->D, 1e-5f);
    (ref ? layernorm_backward_ref : layernorm_backward)(g->dx, g->dw, g->db, g->dy, g->x, g->mean, g->rstd, w, g->N, g->D);
}

static void test_layernorm(int N, int D, int affine) {
    LN g;
    size_t n = (size_t)N * D;
    memset(&g, 0, sizeof g);
    g.N = N; g.D = D; g.affine = affine;
    g.x = randn(n, 2.0f);
    for (size_t i = 0; i < n; i++) g.x[i] += 0.5f;
    g.w = randn(D, 1.0f); g.b = randn(D, 1.0f); g.dy = randn(n, 1.0f);
    g.out = zeros(n); g.mean = zeros(N); g.rstd = zeros(N);
    g.dx = zeros(n); g.dw = zeros(D); g.db = zeros(D);
    g.dx0 = randn(n, 1.0f); g.dw0 = randn(D, 1.0f); g.db0 = randn(D, 1.0f);
    Out outs[] = { { g.out, n, "out" }, { g.mean, (size_t)N, "mean" }, { g.rstd, (size_t)N, "rstd" },
                   { g.dx, n, "dx" }, { g.dw, (size_t)D, "dw" }, { g.db, (size_t)D, "db" } };
    char op[64];
    snprintf(op, sizeof op, "layernorm %dx%d%s", N, D, affine ? "" : " no-affine");
    compare_paths(op, ln_run, &g, outs, 6, 2e-6, 0);
}

/* ---- activations, GEGLU, softmax ---- */
typedef struct { int which, N, D; float *x, *dy, *out, *dx, *dx0; } Act;
enum { A_SILU, A_GELU, A_QGELU, A_GEGLU, A_SOFTMAX };

static void act_run(void *p, int ref) {
    Act *a = (Act *)p;
    size_t n = (size_t)a->N * a->D, nin = a->which == A_GEGLU ? 2 * n : n;
    memcpy(a->dx, a->dx0, nin * sizeof(float));
    switch (a->which) {
    case A_SILU: (ref ? silu_forward_ref : silu_forward)(a->out, a->x, n);
                 (ref ? silu_backward_ref : silu_backward)(a->dx, a->dy, a->x, n); break;
    case A_GELU: (ref ? gelu_forward_ref : gelu_forward)(a->out, a->x, n);
                 (ref ? gelu_backward_ref : gelu_backward)(a->dx, a->dy, a->x, n); break;
    case A_QGELU: (ref ? quick_gelu_forward_ref : quick_gelu_forward)(a->out, a->x, n);
                  (ref ? quick_gelu_backward_ref : quick_gelu_backward)(a->dx, a->dy, a->x, n); break;
    case A_GEGLU: (ref ? geglu_forward_ref : geglu_forward)(a->out, a->x, a->N, a->D);
                  (ref ? geglu_backward_ref : geglu_backward)(a->dx, a->dy, a->x, a->N, a->D); break;
    case A_SOFTMAX: (ref ? softmax_forward_ref : softmax_forward)(a->out, a->x, a->N, a->D);
                    (ref ? softmax_backward_ref : softmax_backward)(a->dx, a->dy, a->out, a->N, a->D); break;
    }
}

static void test_act(int which, const char *name, int N, int D, float xstd) {
    Act a;
    size_t n = (size_t)N * D, nin = which == A_GEGLU ? 2 * n : n;
    a.which = which; a.N = N; a.D = D;
    a.x = randn(nin, xstd); a.dy = randn(n, 1.0f);
    a.out = zeros(n); a.dx = zeros(nin); a.dx0 = randn(nin, 1.0f);
    Out outs[] = { { a.out, n, "out" }, { a.dx, nin, "dx" } };
    char op[64];
    snprintf(op, sizeof op, "%s %s %dx%d", name, ms_simd_name(ms_simd()), N, D);
    /* exp and erf through double (0.5 ulp; softmax: libm's expf), then a handful of float
     * operations. Gradients start from N(0,1) values and reach |dx| ~ 10, where 4 ulp = 4e-6. */
    compare_paths(op, act_run, &a, outs, 2, 1e-6, 4e-6);
}

static void test_relu(void) {
    size_t n = 100003;
    float *x = randn(n, 1.0f), *dy = randn(n, 1.0f), *out = zeros(n);
    float *dx = randn(n, 1.0f), *want = zeros(n), *dwant = copyf(dx, n);
    x[0] = 0.0f;
    for (size_t i = 0; i < n; i++) { want[i] = x[i] > 0 ? x[i] : 0.0f; if (x[i] > 0) dwant[i] += dy[i]; }
    relu_forward(out, x, n);
    relu_backward(dx, dy, x, n);
    check_bitwise("relu forward = max(x, 0)", out, want, n);
    check_bitwise("relu backward += dout [x > 0]", dx, dwant, n);
    relu_forward(x, x, n);
    check_bitwise("relu in place", x, want, n);
    silu_forward(dy, dy, n);           /* in place must equal out-of-place */
}

static void test_inplace(void) {
    size_t n = 40001;
    float *x = randn(n, 2.0f), *y = zeros(n), *z = copyf(x, n);
    silu_forward(y, x, n); silu_forward(z, z, n); check_bitwise("silu in place", z, y, n);
    memcpy(z, x, n * sizeof(float));
    gelu_forward(y, x, n); gelu_forward(z, z, n); check_bitwise("gelu in place", z, y, n);
    memcpy(z, x, n * sizeof(float));
    softmax_forward(y, x, 401, 99); softmax_forward(z, z, 401, 99); check_bitwise("softmax in place", z, y, 401 * 99);
    softmax_forward(y, x, 3, 1);
    check(y[0] == 1.0f && y[1] == 1.0f && y[2] == 1.0f, "softmax of one column is 1");
    /* known values: silu(0) = 0, gelu(0) = 0, gelu(1) = Phi(1) = 0.841344746..., silu(1) = 1/(1+e^-1) */
    float v[2] = { 0.0f, 1.0f }, o[2];
    gelu_forward(o, v, 2);
    check(o[0] == 0.0f && fabs(o[1] - 0.8413447460685429) < 1e-7, "gelu(1) = Phi(1) = 0.8413447 (got %.9f)", (double)o[1]);
    silu_forward(o, v, 2);
    check(o[0] == 0.0f && fabs(o[1] - 0.7310585786300049) < 1e-7, "silu(1) = 0.7310586 (got %.9f)", (double)o[1]);
    quick_gelu_forward(o, v, 2);
    check(fabs(o[1] - 1.0 / (1.0 + exp(-1.702))) < 1e-7, "quick_gelu(1) = sigmoid(1.702) (got %.9f)", (double)o[1]);
}

/* ---- attention ---- */
typedef struct {
    int B, Tq, Tk, H, Dh, causal;
    float scale, *q, *k, *v, *dy, *out, *lse, *dq, *dk, *dv, *dq0, *dk0, *dv0;
} Att;

static void att_run(void *p, int ref) {
    Att *a = (Att *)p;
    size_t nq = (size_t)a->B * a->Tq * a->H * a->Dh, nk = (size_t)a->B * a->Tk * a->H * a->Dh;
    memcpy(a->dq, a->dq0, nq * sizeof(float));
    memcpy(a->dk, a->dk0, nk * sizeof(float));
    memcpy(a->dv, a->dv0, nk * sizeof(float));
    (ref ? attention_ref : attention_forward)(a->out, a->lse, a->q, a->k, a->v, a->B, a->Tq, a->Tk, a->H, a->Dh, a->causal, a->scale);
    (ref ? attention_backward_ref : attention_backward)(a->dq, a->dk, a->dv, a->dy, a->q, a->k, a->v, a->out, a->lse,
                                                      a->B, a->Tq, a->Tk, a->H, a->Dh, a->causal, a->scale);
}

static void test_attention(int B, int Tq, int Tk, int H, int Dh, int causal, int streaming) {
    Att a;
    size_t nq = (size_t)B * Tq * H * Dh, nk = (size_t)B * Tk * H * Dh;
    a.B = B; a.Tq = Tq; a.Tk = Tk; a.H = H; a.Dh = Dh; a.causal = causal;
    a.scale = (float)(1.0 / sqrt((double)Dh));
    a.q = randn(nq, 1.0f); a.k = randn(nk, 1.0f); a.v = randn(nk, 1.0f);
    a.dy = randn(nq, 1.0f); a.out = zeros(nq); a.lse = zeros((size_t)B * H * Tq);
    a.dq = zeros(nq); a.dk = zeros(nk); a.dv = zeros(nk);
    a.dq0 = randn(nq, 1.0f); a.dk0 = randn(nk, 1.0f); a.dv0 = randn(nk, 1.0f);
    Out outs[] = { { a.out, nq, "out" }, { a.lse, (size_t)B * H * Tq, "lse" }, { a.dq, nq, "dq" },
                   { a.dk, nk, "dk" }, { a.dv, nk, "dv" } };
    char op[96];
    snprintf(op, sizeof op, "attention B%d Tq%d Tk%d H%d Dh%d%s%s", B, Tq, Tk, H, Dh, causal ? " causal" : "",
             streaming ? " streaming" : "");
    if (streaming) ops_scratch_limit(1);
    /* float32 dot products of length <= 150 and expf on values of size <= ~5: relative error
     * ~1e-7 * sqrt(length), absolute a few ulp(5) * sqrt(length) */
    compare_paths(op, att_run, &a, outs, 5, 1e-5, 2e-5);
    ops_scratch_limit(0);
}

/* Independent check of the convention: one head, Tq = 1, two keys, hand-computed. */
static void test_attention_tiny(void) {
    float q[2] = { 1.0f, 0.0f }, k[4] = { 1.0f, 0.0f, 0.0f, 1.0f }, v[4] = { 1.0f, 2.0f, 3.0f, 4.0f }, o[2], lse;
    attention_forward(o, &lse, q, k, v, 1, 1, 2, 1, 2, 0, 1.0f);
    double p0 = exp(1.0) / (exp(1.0) + 1.0), p1 = 1.0 - p0;
    check(fabs(o[0] - (p0 * 1 + p1 * 3)) < 1e-6 && fabs(o[1] - (p0 * 2 + p1 * 4)) < 1e-6 &&
          fabs(lse - log(exp(1.0) + 1.0)) < 1e-6, "attention 1x2 by hand: out %.7f %.7f lse %.7f", (double)o[0], (double)o[1], (double)lse);
    attention_forward(o, &lse, q, k, v, 1, 1, 2, 1, 2, 1, 1.0f);   /* causal: query 0 sees key 0 only */
    check(o[0] == 1.0f && o[1] == 2.0f && fabs(lse - 1.0) < 1e-6, "causal query 0 sees key 0 only");
}

/* ---- attention probabilities at key columns (attention_probs_cols_*) ---- */
typedef struct {
    int B, Tq, Tk, H, Dh, ncol;
    float scale, *q, *k, *v, *out, *lse, *p, *dp, *dq, *dk, *dq0, *dk0;
    int32_t *cols;
} PCols;

static void pc_run(void *v, int ref) {
    PCols *a = (PCols *)v;
    size_t nq = (size_t)a->B * a->Tq * a->H * a->Dh, nk = (size_t)a->B * a->Tk * a->H * a->Dh;
    memcpy(a->dq, a->dq0, nq * sizeof(float));
    memcpy(a->dk, a->dk0, nk * sizeof(float));
    (ref ? attention_probs_cols_forward_ref : attention_probs_cols_forward)(a->p, a->q, a->k, a->lse, a->cols, a->B,
                                                                          a->Tq, a->Tk, a->H, a->Dh, a->ncol, a->scale);
    (ref ? attention_probs_cols_backward_ref : attention_probs_cols_backward)(a->dq, a->dk, a->dp, a->q, a->k, a->lse,
                                                                            a->cols, a->B, a->Tq, a->Tk, a->H, a->Dh,
                                                                            a->ncol, a->scale);
}

/* cols: per sample, ncol positions drawn from [0, Tk) with a repeat when ncol >= 3 */
static void test_probs_cols(int B, int Tq, int Tk, int H, int Dh, int ncol, int streaming) {
    PCols a;
    size_t nq = (size_t)B * Tq * H * Dh, nk = (size_t)B * Tk * H * Dh, np = (size_t)B * H * Tq * ncol;
    a.B = B; a.Tq = Tq; a.Tk = Tk; a.H = H; a.Dh = Dh; a.ncol = ncol;
    a.scale = (float)(1.0 / sqrt((double)Dh));
    a.q = randn(nq, 2.0f); a.k = randn(nk, 1.0f); a.v = randn(nk, 1.0f);
    a.out = zeros(nq); a.lse = zeros((size_t)B * H * Tq); a.p = zeros(np); a.dp = randn(np, 1.0f);
    /* small starting gradients: += is checked without drowning the probe's own (small) gradients */
    a.dq = zeros(nq); a.dk = zeros(nk); a.dq0 = randn(nq, 1e-3f); a.dk0 = randn(nk, 1e-3f);
    a.cols = (int32_t *)test_track(test_zeros((size_t)B * ncol));
    for (int i = 0; i < B * ncol; i++) a.cols[i] = (int32_t)((7 * i + 3 * (i / ncol) + 1) % Tk);
    if (ncol >= 3) for (int b = 0; b < B; b++) a.cols[b * ncol + 2] = a.cols[b * ncol];
    attention_forward(a.out, a.lse, a.q, a.k, a.v, B, Tq, Tk, H, Dh, 0, a.scale);
    Out outs[] = { { a.p, np, "p" }, { a.dq, nq, "dq" }, { a.dk, nk, "dk" } };
    char op[96];
    snprintf(op, sizeof op, "probs_cols B%d Tq%d Tk%d H%d Dh%d ncol%d%s", B, Tq, Tk, H, Dh, ncol,
             streaming ? " streaming" : "");
    if (streaming) ops_scratch_limit(1);
    /* as attention: float32 dot products and expf, lse rounded to float */
    compare_paths(op, pc_run, &a, outs, 3, 1e-5, 2e-5);
    ops_scratch_limit(0);
    /* the columns are columns of the full softmax: with every key as a column, rows sum to 1 */
    if (Tk <= 100) {
        int32_t *all = (int32_t *)test_track(test_zeros((size_t)B * Tk));
        float *pall = zeros((size_t)B * H * Tq * Tk);
        double worst = 0.0;
        for (int b = 0; b < B; b++) for (int t = 0; t < Tk; t++) all[b * Tk + t] = t;
        attention_probs_cols_forward(pall, a.q, a.k, a.lse, all, B, Tq, Tk, H, Dh, Tk, a.scale);
        for (size_t r = 0; r < (size_t)B * H * Tq; r++) {
            double s = 0.0;
            for (int t = 0; t < Tk; t++) s += pall[r * Tk + t];
            worst = fmax(worst, fabs(s - 1.0));
        }
        check(worst < 1e-5, "%s: all %d columns sum to 1 per row (worst |sum - 1| %.2e)", op, Tk, worst);
    }
}

/* ---- resampling, concat, elementwise, bias, embedding (checked against index formulas) ---- */
static void test_layout_ops(void) {
    int N = 2, C = 3, H = 6, W = 10, r = 2;
    size_t n = (size_t)N * C * H * W;
    float *x = randn(n, 1.0f), *up = zeros(4 * n), *want = zeros(4 * n);
    float *dy = randn(4 * n, 1.0f), *dx = randn(n, 1.0f), *dwant = copyf(dx, n);
    upsample_nearest2x_forward(up, x, N, C, H, W);
    for (int nc = 0; nc < N * C; nc++)
        for (int y = 0; y < 2 * H; y++)
            for (int j = 0; j < 2 * W; j++) {
                size_t o = ((size_t)nc * 2 * H + y) * 2 * W + j;
                want[o] = x[((size_t)nc * H + y / 2) * W + j / 2];
                dwant[((size_t)nc * H + y / 2) * W + j / 2] += dy[o];
            }
    check_bitwise("upsample_nearest2x forward", up, want, 4 * n);
    upsample_nearest2x_backward(dx, dy, N, C, H, W);
    check_close("upsample_nearest2x backward", dx, dwant, n, 1e-6, 1e-6);

    float *pool = zeros(n / 4), *pw = zeros(n / 4), *dp = randn(n / 4, 1.0f);
    memcpy(dx, dwant, n * sizeof(float));
    for (int nc = 0; nc < N * C; nc++)
        for (int y = 0; y < H / 2; y++)
            for (int j = 0; j < W / 2; j++) {
                size_t o = ((size_t)nc * (H / 2) + y) * (W / 2) + j;
                double s = 0.0;
                for (int u = 0; u < 2; u++)
                    for (int t = 0; t < 2; t++) {
                        size_t i = ((size_t)nc * H + 2 * y + u) * W + 2 * j + t;
                        s += x[i];
                        dwant[i] += 0.25f * dp[o];
                    }
                pw[o] = (float)(s / 4);
            }
    avgpool2x2_forward(pool, x, N, C, H, W);
    avgpool2x2_backward(dx, dp, N, C, H, W);
    check_close("avgpool2x2 forward", pool, pw, n / 4, 1e-6, 1e-6);
    check_close("avgpool2x2 backward", dx, dwant, n, 1e-6, 1e-6);

    /* PixelUnshuffle, r = 2 and 3 (H = 6, W = 12 divisible by both) */
    for (r = 2; r <= 3; r++) {
        int W2 = 12;
        size_t m = (size_t)N * C * H * W2;
        float *xs = randn(m, 1.0f), *ps = zeros(m), *pwnt = zeros(m);
        float *g = randn(m, 1.0f), *gw = copyf(g, m), *d = randn(m, 1.0f);
        int Ho = H / r, Wo = W2 / r;
        for (int nn = 0; nn < N; nn++)
            for (int c = 0; c < C; c++)
                for (int y = 0; y < H; y++)
                    for (int j = 0; j < W2; j++) {
                        size_t o = (((size_t)nn * C * r * r + c * r * r + (y % r) * r + j % r) * Ho + y / r) * Wo + j / r;
                        size_t i = (((size_t)nn * C + c) * H + y) * W2 + j;
                        pwnt[o] = xs[i];
                        gw[i] += d[o];
                    }
        pixel_unshuffle_forward(ps, xs, N, C, H, W2, r);
        pixel_unshuffle_backward(g, d, N, C, H, W2, r);
        check_bitwise(r == 2 ? "pixel_unshuffle r2 forward" : "pixel_unshuffle r3 forward", ps, pwnt, m);
        check_bitwise(r == 2 ? "pixel_unshuffle r2 backward" : "pixel_unshuffle r3 backward", g, gw, m);
    }

    /* concat */
    {
        int Ca = 3, Cb = 5, HW = 7;
        float *a = randn((size_t)N * Ca * HW, 1.0f), *b = randn((size_t)N * Cb * HW, 1.0f);
        float *o = zeros((size_t)N * (Ca + Cb) * HW), *ow = zeros((size_t)N * (Ca + Cb) * HW);
        float *da = randn((size_t)N * Ca * HW, 1.0f), *db = randn((size_t)N * Cb * HW, 1.0f);
        float *daw = copyf(da, (size_t)N * Ca * HW), *dbw = copyf(db, (size_t)N * Cb * HW);
        float *d = randn((size_t)N * (Ca + Cb) * HW, 1.0f);
        for (int nn = 0; nn < N; nn++)
            for (int c = 0; c < Ca + Cb; c++)
                for (int i = 0; i < HW; i++) {
                    size_t oo = ((size_t)nn * (Ca + Cb) + c) * HW + i;
                    if (c < Ca) { ow[oo] = a[((size_t)nn * Ca + c) * HW + i]; daw[((size_t)nn * Ca + c) * HW + i] += d[oo]; }
                    else { ow[oo] = b[((size_t)nn * Cb + c - Ca) * HW + i]; dbw[((size_t)nn * Cb + c - Ca) * HW + i] += d[oo]; }
                }
        concat_channels_forward(o, a, b, N, Ca, Cb, HW);
        concat_channels_backward(da, db, d, N, Ca, Cb, HW);
        check_bitwise("concat_channels forward", o, ow, (size_t)N * (Ca + Cb) * HW);
        check_bitwise("concat_channels backward da", da, daw, (size_t)N * Ca * HW);
        check_bitwise("concat_channels backward db", db, dbw, (size_t)N * Cb * HW);
    }
}

static void test_elementwise(void) {
    size_t n = 50021;                    /* several OPS_CHUNK tasks and a tail */
    float *a = randn(n, 1.0f), *b = randn(n, 1.0f), *d = randn(n, 1.0f);
    float *o = zeros(n), *w = zeros(n), *da = randn(n, 1.0f), *db = randn(n, 1.0f);
    float *daw = copyf(da, n), *dbw = copyf(db, n);
    size_t i;
    add_forward(o, a, b, n);
    for (i = 0; i < n; i++) w[i] = a[i] + b[i];
    check_bitwise("add forward", o, w, n);
    mul_forward(o, a, b, n);
    for (i = 0; i < n; i++) w[i] = a[i] * b[i];
    check_bitwise("mul forward", o, w, n);
    const float s037 = 0.37f;   /* a float variable, not a literal: no excess precision */
    scale_forward(o, a, s037, n);
    for (i = 0; i < n; i++) w[i] = s037 * a[i];
    check_bitwise("scale forward", o, w, n);
    add_backward(da, db, d, n);
    mul_backward(da, db, d, a, b, n);
    scale_backward(da, d, s037, n);
    for (i = 0; i < n; i++) {   /* float temporaries: one rounding per op even where
                                 * FLT_EVAL_METHOD != 0 (s390x, x87) */
        float db_i = d[i] * b[i], da_i = d[i] * a[i], ds_i = s037 * d[i];
        daw[i] += d[i]; dbw[i] += d[i];
        daw[i] += db_i; dbw[i] += da_i;
        daw[i] += ds_i;
    }
    check_bitwise("add/mul/scale backward da", da, daw, n);
    check_bitwise("add/mul backward db", db, dbw, n);
    add_backward(NULL, db, d, n);          /* NULL gradients are skipped */
    mul_backward(NULL, NULL, d, a, b, n);
    for (i = 0; i < n; i++) dbw[i] += d[i];
    check_bitwise("add backward with NULL da", db, dbw, n);

    /* add_bias_nc */
    int N = 2, C = 5, HW = 333;
    size_t m = (size_t)N * C * HW;
    float *x = randn(m, 1.0f), *xw = copyf(x, m), *t = randn((size_t)N * C, 1.0f);
    float *dt = randn((size_t)N * C, 1.0f), *dtw = copyf(dt, (size_t)N * C);
    for (i = 0; i < m; i++) xw[i] += t[i / HW];
    add_bias_nc(x, t, N, C, HW);
    check_bitwise("add_bias_nc x[n,c,:] += t[n,c]", x, xw, m);
    for (int nc = 0; nc < N * C; nc++) {
        double s = 0.0;
        for (int j = 0; j < HW; j++) s += x[(size_t)nc * HW + j];
        dtw[nc] = (float)((double)dtw[nc] + s);
    }
    add_bias_nc_backward(dt, x, N, C, HW);
    check_close("add_bias_nc backward dt += sum_hw", dt, dtw, (size_t)N * C, 1e-6, 1.2e-4);  /* 2 ulp of |dt| < 1024 */
}

static void test_embedding(void) {
    int V = 11, D = 150, N = 9;                     /* D spans 3 column chunks */
    int32_t ids[9] = { 3, 0, 10, 3, 3, 7, 0, 5, 10 };
    float *table = randn((size_t)V * D, 1.0f), *o = zeros((size_t)N * D), *ow = zeros((size_t)N * D);
    float *dout = randn((size_t)N * D, 1.0f), *dt = randn((size_t)V * D, 1.0f);
    float *dtw = copyf(dt, (size_t)V * D), *dt1;
    for (int n = 0; n < N; n++)
        for (int d = 0; d < D; d++) {
            ow[(size_t)n * D + d] = table[(size_t)ids[n] * D + d];
            dtw[(size_t)ids[n] * D + d] += dout[(size_t)n * D + d];
        }
    embedding_forward(o, ids, table, N, D);
    check_bitwise("embedding forward", o, ow, (size_t)N * D);
    dt1 = copyf(dt, (size_t)V * D);
    ms_set_threads(1);
    embedding_backward(dt1, dout, ids, N, D);
    ms_set_threads(2);
    embedding_backward(dt, dout, ids, N, D);
    ms_set_threads(0);
    check_bitwise("embedding backward (repeated ids, in order)", dt, dtw, (size_t)V * D);
    check_bitwise("embedding backward 1 vs 2 threads", dt1, dt, (size_t)V * D);
}

static void test_mse(void) {
    /* by hand: p = {1, 2}, t = 0, w = {1, 3}: (1*1 + 3*4) / 4 = 3.25; no weight: (1 + 4)/2 */
    float p[2] = { 1.0f, 2.0f }, t[2] = { 0.0f, 0.0f }, w[2] = { 1.0f, 3.0f };
    check(mse_forward(p, t, w, 1, 1, 2, 1) == 3.25, "mse weighted by hand = 3.25");
    check(mse_forward(p, t, NULL, 1, 1, 2, 1) == 2.5, "mse plain by hand = 2.5");
    /* broadcast mask: C = 2 channels, one mask channel: numerator counts the pixel twice,
     * denominator once (torch semantics of ((l*m).sum([1,2,3]) / m.sum([1,2,3]))) */
    float p2[4] = { 1.0f, 2.0f, 1.0f, 2.0f }, t2[4] = { 0 };
    check(mse_forward(p2, t2, w, 1, 2, 2, 1) == 6.5, "mse broadcast mask by hand = 6.5");

    int N = 3, C = 4, M = 37;
    size_t n = (size_t)N * C * M;
    float *pr = randn(n, 1.0f), *tg = randn(n, 1.0f);
    float *wf = zeros(n), *w1 = zeros((size_t)N * M);
    ms_rng_fill_uniform(&rng, wf, n, 0.0f, 1.0f);
    ms_rng_fill_uniform(&rng, w1, (size_t)N * M, 0.0f, 1.0f);
    for (int i = 0; i < M; i++) w1[(size_t)1 * M + i] = 0.0f;    /* sample 1 fully masked out */
    double l0 = mse_forward(pr, tg, NULL, N, C, M, 1), r0 = mse_forward_ref(pr, tg, NULL, N, C, M, 1);
    double l1 = mse_forward(pr, tg, w1, N, C, M, 1), r1 = mse_forward_ref(pr, tg, w1, N, C, M, 1);
    double lc = mse_forward(pr, tg, wf, N, C, M, C), rc = mse_forward_ref(pr, tg, wf, N, C, M, C);
    /* fast path squares in float (as F.mse_loss), ref in double: relative ~1e-7 */
    check(fabs(l0 - r0) <= 1e-6 * r0, "mse no weight vs ref: %.9g vs %.9g", l0, r0);
    check(fabs(l1 - r1) <= 1e-6 * r1, "mse (N,1,M) mask vs ref: %.9g vs %.9g", l1, r1);
    check(fabs(lc - rc) <= 1e-6 * rc, "mse (N,C,M) weight vs ref: %.9g vs %.9g", lc, rc);
    /* backward vs a double formula; samples with zero weight get no gradient */
    float *dp = randn(n, 1.0f), *dpw = copyf(dp, n);
    mse_backward(dp, pr, tg, w1, N, C, M, 1, 0.5f);
    for (int nn = 0; nn < N; nn++) {
        double S = 0.0;
        for (int i = 0; i < M; i++) S += w1[(size_t)nn * M + i];
        for (int c = 0; c < C && S > 0; c++)
            for (int i = 0; i < M; i++) {
                size_t k = ((size_t)nn * C + c) * M + i;
                dpw[k] = (float)(dpw[k] + 0.5 * 2.0 * w1[(size_t)nn * M + i] * ((double)pr[k] - tg[k]) / (N * S));
            }
    }
    check_close("mse backward (N,1,M) mask", dp, dpw, n, 1e-6, 1e-6);
}

static void test_timestep(void) {
    int N = 5, dim = 320;
    float t[5] = { 0.0f, 1.0f, 17.5f, 500.0f, 999.0f };
    float *o = zeros((size_t)N * 321), *r = zeros((size_t)N * 321);
    timestep_embedding_forward(o, t, N, dim, 1, 0.0f, 10000);
    timestep_embedding_ref(r, t, N, dim, 1, 0.0f, 10000);
    /* the float argument t*f carries up to ~1 ulp(999) = 6e-5 of rounding, so sin/cos can move
     * by that much; the double ref has none */
    check_close("timestep_embedding 320 flip vs double", o, r, (size_t)N * dim, 1e-5, 1.2e-4);
    check(o[0] == 1.0f && o[159] == 1.0f && o[160] == 0.0f && o[319] == 0.0f, "t = 0: [cos | sin] = [1.. | 0..]");
    timestep_embedding_forward(o, t, N, 7, 0, 1.0f, 10000);     /* odd dim, [sin | cos], shift 1 */
    timestep_embedding_ref(r, t, N, 7, 0, 1.0f, 10000);
    check_close("timestep_embedding dim 7 shift 1 vs double", o, r, (size_t)N * 7, 1e-5, 1.2e-4);
    check(o[6] == 0.0f && o[13] == 0.0f && o[34] == 0.0f, "odd dim: zero last column");
    /* freq_i = exp(-ln(10000) i / 160): at i = 1, t = 1, sin(f_1) */
    timestep_embedding_forward(o, t, N, dim, 0, 0.0f, 10000);
    check(fabs(o[320 + 1] - sin(exp(-log(10000.0) / 160.0))) < 1e-7, "sin(t f_1) at t = 1");
}

/* 1 vs 2 threads for the ops checked above against index formulas. */
static void test_threads_misc(void) {
    int N = 2, C = 5, H = 16, W = 24;
    size_t n = (size_t)N * C * H * W;
    float *x = randn(4 * n, 1.0f), *o[2], *g[2];
    for (int t = 0; t < 2; t++) {
        ms_set_threads(t + 1);
        o[t] = zeros(4 * n + n / 4 + n + (size_t)N * C);
        g[t] = zeros(3 * n + (size_t)N * C + n);
        float *po = o[t], *pg = g[t];
        upsample_nearest2x_forward(po, x, N, C, H, W);
        upsample_nearest2x_backward(pg, x, N, C, H, W);
        avgpool2x2_forward(po + 4 * n, x, N, C, H, W);
        avgpool2x2_backward(pg + n, x, N, C, H, W);
        pixel_unshuffle_forward(po + 4 * n + n / 4, x, N, C, H, W, 4);
        pixel_unshuffle_backward(pg + 2 * n, x, N, C, H, W, 4);
        add_bias_nc_backward(pg + 3 * n, x, N, C, H * W);
        mse_backward(pg + 3 * n + (size_t)N * C, x, x + n, x + 2 * n, N, C, H * W, 1, 1.0f);
    }
    ms_set_threads(0);
    check_bitwise("resampling forwards 1 vs 2 threads", o[0], o[1], 4 * n + n / 4 + n);
    check_bitwise("resampling/bias/mse backwards 1 vs 2 threads", g[0], g[1], 3 * n + (size_t)N * C + n);
}

int main(void) {
    ms_rng_seed(&rng, 1234);
    ms_set_parallel_min_work(0.0);   /* every loop parallel at these small sizes: 1 vs 2 threads compares schedules */
    test_groupnorm(2, 12, 37, 4, 0.0f);
    test_groupnorm(1, 6, 5, 6, -2.0f);
    test_groupnorm(3, 8, 33, 1, 1.0f);
    test_groupnorm(1, 32, 1280, 4, 100.0f);        /* 10240-element groups, large mean */
    test_layernorm(7, 33, 1);
    test_layernorm(5, 768, 1);
    test_layernorm(3, 130, 0);
    {                                /* every SIMD level this CPU has: the spans' vector paths and tails */
        MsSimd hw = ms_simd_detected();
        for (int lv = MS_SIMD_SCALAR; lv <= (int)MS_SIMD_AVX512; lv++) {
            ms_set_simd((MsSimd)lv);
            if (ms_simd() != (MsSimd)lv) continue;
            test_act(A_SILU, "silu", 7, 4099, 3.0f);
            test_act(A_GELU, "gelu", 7, 4099, 3.0f);
            test_act(A_QGELU, "quick_gelu", 7, 4099, 3.0f);
            test_act(A_GEGLU, "geglu", 13, 37, 2.0f);
        }
        ms_set_simd(hw);
    }
    test_act(A_SOFTMAX, "softmax", 13, 77, 5.0f);
    test_act(A_SOFTMAX, "softmax", 3, 1000, 20.0f);
    test_relu();
    test_inplace();
    test_attention_tiny();
    test_attention(2, 70, 70, 3, 16, 1, 0);          /* CLIP-like causal self-attention */
    test_attention(1, 77, 77, 2, 40, 1, 0);
    test_attention(2, 65, 100, 2, 64, 0, 0);         /* Tq != Tk, Tk not a multiple of 64 */
    test_attention(1, 130, 77, 2, 40, 0, 0);         /* cross-attention shape */
    test_attention(1, 130, 50, 2, 16, 1, 0);         /* causal with Tq > Tk */
    test_attention(1, 40, 150, 1, 64, 0, 0);
    test_attention(2, 70, 70, 3, 16, 1, 1);          /* the no-scratch streaming path */
    test_attention(1, 65, 100, 2, 40, 0, 1);
    test_probs_cols(2, 70, 77, 3, 16, 3, 0);         /* Tk = 77, a repeated column, two query blocks */
    test_probs_cols(1, 130, 77, 2, 40, 2, 0);        /* cross-attention shape */
    test_probs_cols(3, 17, 9, 1, 5, 4, 0);           /* odd sizes */
    test_probs_cols(2, 70, 77, 3, 16, 3, 1);         /* the no-scratch streaming path */
    test_probs_cols(1, 5, 130, 2, 8, 1, 1);
    test_layout_ops();
    test_elementwise();
    test_embedding();
    test_mse();
    test_timestep();
    test_threads_misc();
    ops_scratch_free();
    test_free_tracked();
    return test_summary("test_ops");
}
