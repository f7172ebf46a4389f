/* tests/test_golden.c — every op of mixshow.h's `ops` and `gemm` sections against PyTorch.
 *
 * tests/data/ops_golden.safetensors comes from tools/ref/gen_ops_golden.py (torch 1.13,
 * float64 autograd from float32 inputs; see its docstring). For each op this test loads the
 * inputs with the safetensors reader (shapes checked against the dims below), runs the fast op
 * and its _ref twin, and compares the output and every gradient key by key:
 *   forward   relative L2 <= 1e-5      gradients   relative L2 <= 1e-4
 * (float32 ops with double reductions land near 1e-7; MS_TEST_VERBOSE=1 prints each error).
 * Backward is run twice into zeroed buffers and compared at half the sum, which also checks
 * that it accumulates (+=).
 */
#include "tests/test.h"
#include "tools/tools.h"

#define TOL_FWD 1e-5
#define TOL_GRAD 1e-4

static StFile G;
static int have_file;

/* Golden tensor '<op>.<name>' with the given shape (ndim < 0: any shape, n elements). */
static float *load(const char *op, const char *name, int ndim, const int64_t *shape) {
    char key[128];
    float *x = NULL;
    size_t n = 0;
    snprintf(key, sizeof key, "%s.%s", op, name);
    MsStatus s = st_load_f32(&G, key, &x, &n);
    if (s == MS_OK && ndim >= 0) s = st_check_shape(&G, st_find(&G, key), ndim, shape);
    if (s != MS_OK) { check(0, "load %s", key); printf("      %s\n", ms_last_error()); ms_free_aligned(x); return NULL; }
    return x;
}
#define SHAPE(...) (sizeof((int64_t[]){ __VA_ARGS__ }) / sizeof(int64_t)), (const int64_t[]){ __VA_ARGS__ }

static size_t numel_of(const char *op, const char *name) {
    char key[128];
    snprintf(key, sizeof key, "%s.%s", op, name);
    const StTensor *t = st_find(&G, key);
    return t ? t->numel : 0;
}

/* Compares got (n) with golden '<op>.<name>'; halve: got holds two accumulated backward passes. */
static void compare_abs(const char *op, const char *name, const char *variant, float *got, size_t n, double tol,
                        double abs_tol, int halve) {
    char what[128];
    float *want = load(op, name, -1, NULL);
    snprintf(what, sizeof what, "%s.%s%s", op, name, variant);
    if (!want) return;
    if (numel_of(op, name) != n) { check(0, "%s: %zu elements, golden has %zu", what, n, numel_of(op, name)); ms_free_aligned(want); return; }
    if (halve) for (size_t i = 0; i < n; i++) got[i] *= 0.5f;
    check_close(what, got, want, n, tol, abs_tol);
    ms_free_aligned(want);
}

static void compare(const char *op, const char *name, const char *variant, float *got, size_t n, double tol, int halve) {
    compare_abs(op, name, variant, got, n, tol, 0.0, halve);
}

static void fill0(float *x, size_t n) { memset(x, 0, n * sizeof *x); }
#define FREE(...) do { float *ptrs_[] = { __VA_ARGS__ }; for (size_t i_ = 0; i_ < sizeof ptrs_ / sizeof ptrs_[0]; i_++) ms_free_aligned(ptrs_[i_]); } while (0)

/* ---------------------------------------------------------------------------------------- */
static void test_gemm(void) {
    const int M = 13, N = 11, K = 17;
    for (int ta = 0; ta < 2; ta++)
        for (int tb = 0; tb < 2; tb++)
            for (int ref = 0; ref < 2; ref++) {
                char op[16];
                snprintf(op, sizeof op, "gemm_%c%c", ta ? 't' : 'n', tb ? 't' : 'n');
                float *a = ta ? load(op, "a", SHAPE(K, M)) : load(op, "a", SHAPE(M, K));
                float *b = tb ? load(op, "b", SHAPE(N, K)) : load(op, "b", SHAPE(K, N));
                float *c = load(op, "c", SHAPE(M, N));
                if (!a || !b || !c) { FREE(a, b, c); return; }
                (ref ? ms_gemm_ref : ms_gemm)(ta, tb, M, N, K, 0.75f, a, ta ? M : K, b, tb ? K : N, -0.5f, c, N);
                compare(op, "out", ref ? " (ref)" : "", c, (size_t)M * N, TOL_FWD, 0);
                FREE(a, b, c);
            }
}

static void test_linear(void) {
    const int N = 5, I = 7, O = 6;
    for (int ref = 0; ref < 2; ref++) {
        float *x = load("linear", "x", SHAPE(N, I)), *w = load("linear", "w", SHAPE(O, I)), *b = load("linear", "b", SHAPE(O));
        float *dout = load("linear", "dout", SHAPE(N, O));
        float *out = test_zeros((size_t)N * O), *dx = test_zeros((size_t)N * I), *dw = test_zeros((size_t)O * I), *db = test_zeros(O);
        if (x && w && b && dout) {
            const char *v = ref ? " (ref)" : "";
            (ref ? linear_forward_ref : linear_forward)(out, x, w, b, N, I, O);
            compare("linear", "out", v, out, (size_t)N * O, TOL_FWD, 0);
            for (int rep = 0; rep < 2; rep++) (ref ? linear_backward_ref : linear_backward)(dx, dw, db, dout, x, w, N, I, O);
            compare("linear", "dx", v, dx, (size_t)N * I, TOL_GRAD, 1);
            compare("linear", "dw", v, dw, (size_t)O * I, TOL_GRAD, 1);
            compare("linear", "db", v, db, O, TOL_GRAD, 1);
        }
        FREE(x, w, b, dout, out, dx, dw, db);
    }
}

typedef struct { const char *op; int N, C, Co, H, W, k, s, pt, pl, pb, pr; } ConvCase;

static void test_conv2d(void) {
    static const ConvCase cases[] = {
        { "conv2d_k3s1p1", 2, 3, 5, 7, 6, 3, 1, 1, 1, 1, 1 },
        { "conv2d_k3s2p1", 2, 4, 3, 9, 8, 3, 2, 1, 1, 1, 1 },
        { "conv2d_pad0101_k3s2", 1, 3, 4, 8, 6, 3, 2, 0, 0, 1, 1 },   /* F.pad(x, (0,1,0,1)), stride 2 */
        { "conv2d_k1", 2, 6, 7, 3, 5, 1, 1, 0, 0, 0, 0 },
    };
    for (size_t ci = 0; ci < sizeof cases / sizeof cases[0]; ci++)
        for (int mode = 0; mode < 3; mode++) {        /* 0: conv2d_forward(_pad), 1: _ref, 2: symmetric entry point */
            const ConvCase *c = &cases[ci];
            int Ho = (c->H + c->pt + c->pb - c->k) / c->s + 1, Wo = (c->W + c->pl + c->pr - c->k) / c->s + 1;
            if (mode == 2 && (c->pt != c->pb || c->pl != c->pr || c->pt != c->pl)) continue;
            size_t nx = (size_t)c->N * c->C * c->H * c->W, nw = (size_t)c->Co * c->C * c->k * c->k, no = (size_t)c->N * c->Co * Ho * Wo;
            float *x = load(c->op, "x", SHAPE(c->N, c->C, c->H, c->W)), *w = load(c->op, "w", SHAPE(c->Co, c->C, c->k, c->k));
            float *b = load(c->op, "b", SHAPE(c->Co)), *dout = load(c->op, "dout", SHAPE(c->N, c->Co, Ho, Wo));
            float *out = test_zeros(no), *dx = test_zeros(nx), *dw = test_zeros(nw), *db = test_zeros(c->Co);
            const char *v = mode == 1 ? " (ref)" : mode == 2 ? " (sym)" : "";
            if (x && w && b && dout) {
                if (mode == 0) conv2d_forward_pad(out, x, w, b, c->N, c->C, c->Co, c->H, c->W, c->k, c->s, c->pt, c->pl, c->pb, c->pr);
                if (mode == 1) conv2d_forward_ref(out, x, w, b, c->N, c->C, c->Co, c->H, c->W, c->k, c->s, c->pt, c->pl, c->pb, c->pr);
                if (mode == 2) conv2d_forward(out, x, w, b, c->N, c->C, c->Co, c->H, c->W, c->k, c->s, c->pt);
                compare(c->op, "out", v, out, no, TOL_FWD, 0);
                if (mode != 2) {
                    for (int rep = 0; rep < 2; rep++)
                        (mode ? conv2d_backward_ref : conv2d_backward)(dx, dw, db, dout, x, w, c->N, c->C, c->Co, c->H, c->W, c->k, c->s,
                                                                        c->pt, c->pl, c->pb, c->pr);
                    compare(c->op, "dx", v, dx, nx, TOL_GRAD, 1);
                    compare(c->op, "dw", v, dw, nw, TOL_GRAD, 1);
                    compare(c->op, "db", v, db, c->Co, TOL_GRAD, 1);
                }
            }
            FREE(x, w, b, dout, out, dx, dw, db);
        }
}

static void test_groupnorm(void) {
    static const struct { const char *op; int N, C, H, W, G; float eps; } cases[] = {
        { "groupnorm", 2, 6, 5, 3, 3, 1e-5f }, { "groupnorm_eps6", 1, 8, 3, 7, 4, 1e-6f } };
    for (size_t ci = 0; ci < 2; ci++)
        for (int ref = 0; ref < 2; ref++) {
            const char *op = cases[ci].op, *v = ref ? " (ref)" : "";
            int N = cases[ci].N, C = cases[ci].C, HW = cases[ci].H * cases[ci].W, G = cases[ci].G;
            size_t n = (size_t)N * C * HW;
            float *x = load(op, "x", SHAPE(N, C, cases[ci].H, cases[ci].W)), *w = load(op, "w", SHAPE(C)), *b = load(op, "b", SHAPE(C));
            float *dout = load(op, "dout", SHAPE(N, C, cases[ci].H, cases[ci].W));
            float *out = test_zeros(n), *mean = test_zeros((size_t)N * G), *rstd = test_zeros((size_t)N * G);
            float *dx = test_zeros(n), *dw = test_zeros(C), *db = test_zeros(C);
            if (x && w && b && dout) {
                (ref ? groupnorm_forward_ref : groupnorm_forward)(out, mean, rstd, x, w, b, N, C, HW, G, cases[ci].eps);
                compare(op, "out", v, out, n, TOL_FWD, 0);
                for (int rep = 0; rep < 2; rep++)
                    (ref ? groupnorm_backward_ref : groupnorm_backward)(dx, dw, db, dout, x, mean, rstd, w, N, C, HW, G);
                compare(op, "dx", v, dx, n, TOL_GRAD, 1);
                compare(op, "dw", v, dw, C, TOL_GRAD, 1);
                compare(op, "db", v, db, C, TOL_GRAD, 1);
            }
            FREE(x, w, b, dout, out, mean, rstd, dx, dw, db);
        }
}

static void test_layernorm(void) {
    const int N = 7, D = 10;
    for (int ref = 0; ref < 2; ref++) {
        const char *v = ref ? " (ref)" : "";
        float *x = load("layernorm", "x", SHAPE(N, D)), *w = load("layernorm", "w", SHAPE(D)), *b = load("layernorm", "b", SHAPE(D));
        float *dout = load("layernorm", "dout", SHAPE(N, D));
        float *out = test_zeros((size_t)N * D), *mean = test_zeros(N), *rstd = test_zeros(N);
        float *dx = test_zeros((size_t)N * D), *dw = test_zeros(D), *db = test_zeros(D);
        if (x && w && b && dout) {
            (ref ? layernorm_forward_ref : layernorm_forward)(out, mean, rstd, x, w, b, N, D, 1e-5f);
            compare("layernorm", "out", v, out, (size_t)N * D, TOL_FWD, 0);
            for (int rep = 0; rep < 2; rep++)
                (ref ? layernorm_backward_ref : layernorm_backward)(dx, dw, db, dout, x, mean, rstd, w, N, D);
            compare("layernorm", "dx", v, dx, (size_t)N * D, TOL_GRAD, 1);
            compare("layernorm", "dw", v, dw, D, TOL_GRAD, 1);
            compare("layernorm", "db", v, db, D, TOL_GRAD, 1);
        }
        FREE(x, w, b, dout, out, mean, rstd, dx, dw, db);
    }
}

typedef void (*ActFwd)(float *, const float *, size_t);
typedef void (*ActBwd)(float *, const float *, const float *, size_t);

static void test_activations(void) {
    static const struct { const char *op; ActFwd f, fr; ActBwd b, br; } acts[] = {
        { "silu", silu_forward, silu_forward_ref, silu_backward, silu_backward_ref },
        { "gelu", gelu_forward, gelu_forward_ref, gelu_backward, gelu_backward_ref },
        { "quick_gelu", quick_gelu_forward, quick_gelu_forward_ref, quick_gelu_backward, quick_gelu_backward_ref },
        { "relu", relu_forward, NULL, relu_backward, NULL },
    };
    const size_t n = 37;
    for (size_t i = 0; i < sizeof acts / sizeof acts[0]; i++)
        for (int ref = 0; ref < 2; ref++) {
            ActFwd f = ref ? acts[i].fr : acts[i].f;
            ActBwd b = ref ? acts[i].br : acts[i].b;
            if (!f) continue;
            const char *v = ref ? " (ref)" : "";
            float *x = load(acts[i].op, "x", SHAPE((int64_t)n)), *dout = load(acts[i].op, "dout", SHAPE((int64_t)n));
            float *out = test_zeros(n), *dx = test_zeros(n);
            if (x && dout) {
                f(out, x, n);
                compare(acts[i].op, "out", v, out, n, TOL_FWD, 0);
                for (int rep = 0; rep < 2; rep++) b(dx, dout, x, n);
                compare(acts[i].op, "dx", v, dx, n, TOL_GRAD, 1);
                memcpy(out, x, n * sizeof *x);                    /* documented: out may alias x */
                f(out, out, n);
                compare(acts[i].op, "out", ref ? " (ref, in place)" : " (in place)", out, n, TOL_FWD, 0);
            }
            FREE(x, dout, out, dx);
        }
}

static void test_geglu_softmax(void) {
    const int N = 5, D = 6, SN = 4, SD = 9;
    for (int ref = 0; ref < 2; ref++) {
        const char *v = ref ? " (ref)" : "";
        float *x = load("geglu", "x", SHAPE(N, 2 * D)), *dout = load("geglu", "dout", SHAPE(N, D));
        float *out = test_zeros((size_t)N * D), *dx = test_zeros((size_t)N * 2 * D);
        if (x && dout) {
            (ref ? geglu_forward_ref : geglu_forward)(out, x, N, D);
            compare("geglu", "out", v, out, (size_t)N * D, TOL_FWD, 0);
            for (int rep = 0; rep < 2; rep++) (ref ? geglu_backward_ref : geglu_backward)(dx, dout, x, N, D);
            compare("geglu", "dx", v, dx, (size_t)N * 2 * D, TOL_GRAD, 1);
        }
        FREE(x, dout, out, dx);
        x = load("softmax", "x", SHAPE(SN, SD)); dout = load("softmax", "dout", SHAPE(SN, SD));
        out = test_zeros((size_t)SN * SD); dx = test_zeros((size_t)SN * SD);
        if (x && dout) {
            (ref ? softmax_forward_ref : softmax_forward)(out, x, SN, SD);
            compare("softmax", "out", v, out, (size_t)SN * SD, TOL_FWD, 0);
            for (int rep = 0; rep < 2; rep++) (ref ? softmax_backward_ref : softmax_backward)(dx, dout, out, SN, SD);
            compare("softmax", "dx", v, dx, (size_t)SN * SD, TOL_GRAD, 1);
        }
        FREE(x, dout, out, dx);
    }
}

static void test_attention(void) {
    static const struct { const char *op; int B, Tq, Tk, H, Dh, causal; } cases[] = {
        { "attention", 2, 5, 7, 3, 4, 0 }, { "attention_causal", 2, 6, 6, 2, 5, 1 } };
    for (size_t ci = 0; ci < 2; ci++)
        for (int ref = 0; ref < 2; ref++) {
            const char *op = cases[ci].op, *v = ref ? " (ref)" : "";
            int B = cases[ci].B, Tq = cases[ci].Tq, Tk = cases[ci].Tk, H = cases[ci].H, Dh = cases[ci].Dh, causal = cases[ci].causal;
            float scale = 1.0f / sqrtf((float)Dh);
            size_t nq = (size_t)B * Tq * H * Dh, nk = (size_t)B * Tk * H * Dh, nl = (size_t)B * H * Tq;
            float *q = load(op, "q", SHAPE(B, Tq, H * Dh)), *k = load(op, "k", SHAPE(B, Tk, H * Dh)), *vv = load(op, "v", SHAPE(B, Tk, H * Dh));
            float *dout = load(op, "dout", SHAPE(B, Tq, H * Dh));
            float *out = test_zeros(nq), *lse = test_zeros(nl), *dq = test_zeros(nq), *dk = test_zeros(nk), *dv = test_zeros(nk);
            if (q && k && vv && dout) {
                (ref ? attention_ref : attention_forward)(out, lse, q, k, vv, B, Tq, Tk, H, Dh, causal, scale);
                compare(op, "out", v, out, nq, TOL_FWD, 0);
                compare(op, "lse", v, lse, nl, TOL_FWD, 0);
                for (int rep = 0; rep < 2; rep++)
                    (ref ? attention_backward_ref : attention_backward)(dq, dk, dv, dout, q, k, vv, out, lse, B, Tq, Tk, H, Dh, causal, scale);
                compare(op, "dq", v, dq, nq, TOL_GRAD, 1);
                compare(op, "dk", v, dk, nk, TOL_GRAD, 1);
                compare(op, "dv", v, dv, nk, TOL_GRAD, 1);
            }
            FREE(q, k, vv, dout, out, lse, dq, dk, dv);
        }
}

static void test_resampling(void) {
    {   /* nearest x2 */
        const int N = 2, C = 3, H = 3, W = 5;
        size_t nx = (size_t)N * C * H * W, no = nx * 4;
        float *x = load("upsample_nearest2x", "x", SHAPE(N, C, H, W)), *dout = load("upsample_nearest2x", "dout", SHAPE(N, C, 2 * H, 2 * W));
        float *out = test_zeros(no), *dx = test_zeros(nx);
        if (x && dout) {
            upsample_nearest2x_forward(out, x, N, C, H, W);
            compare("upsample_nearest2x", "out", "", out, no, TOL_FWD, 0);
            for (int rep = 0; rep < 2; rep++) upsample_nearest2x_backward(dx, dout, N, C, H, W);
            compare("upsample_nearest2x", "dx", "", dx, nx, TOL_GRAD, 1);
        }
        FREE(x, dout, out, dx);
    }
    {   /* avg pool 2x2 */
        const int N = 2, C = 3, H = 4, W = 6;
        size_t nx = (size_t)N * C * H * W, no = nx / 4;
        float *x = load("avgpool2x2", "x", SHAPE(N, C, H, W)), *dout = load("avgpool2x2", "dout", SHAPE(N, C, H / 2, W / 2));
        float *out = test_zeros(no), *dx = test_zeros(nx);
        if (x && dout) {
            avgpool2x2_forward(out, x, N, C, H, W);
            compare("avgpool2x2", "out", "", out, no, TOL_FWD, 0);
            for (int rep = 0; rep < 2; rep++) avgpool2x2_backward(dx, dout, N, C, H, W);
            compare("avgpool2x2", "dx", "", dx, nx, TOL_GRAD, 1);
        }
        FREE(x, dout, out, dx);
    }
    {   /* PixelUnshuffle(8) */
        const int N = 1, C = 3, H = 16, W = 24, r = 8;
        size_t n = (size_t)N * C * H * W;
        float *x = load("pixel_unshuffle", "x", SHAPE(N, C, H, W)), *dout = load("pixel_unshuffle", "dout", SHAPE(N, C * r * r, H / r, W / r));
        float *out = test_zeros(n), *dx = test_zeros(n);
        if (x && dout) {
            pixel_unshuffle_forward(out, x, N, C, H, W, r);
            compare("pixel_unshuffle", "out", "", out, n, 0.0, 0);          /* a permutation: exact */
            for (int rep = 0; rep < 2; rep++) pixel_unshuffle_backward(dx, dout, N, C, H, W, r);
            compare("pixel_unshuffle", "dx", "", dx, n, 0.0, 1);
        }
        FREE(x, dout, out, dx);
    }
    {   /* torch.cat dim 1 */
        const int N = 2, Ca = 3, Cb = 4, HW = 5;
        size_t na = (size_t)N * Ca * HW, nb = (size_t)N * Cb * HW;
        float *a = load("concat_channels", "a", SHAPE(N, Ca, HW)), *b = load("concat_channels", "b", SHAPE(N, Cb, HW));
        float *dout = load("concat_channels", "dout", SHAPE(N, Ca + Cb, HW));
        float *out = test_zeros(na + nb), *da = test_zeros(na), *db = test_zeros(nb);
        if (a && b && dout) {
            concat_channels_forward(out, a, b, N, Ca, Cb, HW);
            compare("concat_channels", "out", "", out, na + nb, 0.0, 0);
            for (int rep = 0; rep < 2; rep++) concat_channels_backward(da, db, dout, N, Ca, Cb, HW);
            compare("concat_channels", "da", "", da, na, 0.0, 1);
            compare("concat_channels", "db", "", db, nb, 0.0, 1);
        }
        FREE(a, b, dout, out, da, db);
    }
}

static void test_elementwise(void) {
    const size_t n = 23;
    float *a = load("add", "a", SHAPE(23)), *b = load("add", "b", SHAPE(23)), *dout = load("add", "dout", SHAPE(23));
    float *out = test_zeros(n), *da = test_zeros(n), *db = test_zeros(n);
    if (a && b && dout) {
        add_forward(out, a, b, n);
        compare("add", "out", "", out, n, TOL_FWD, 0);
        for (int rep = 0; rep < 2; rep++) add_backward(da, db, dout, n);
        compare("add", "da", "", da, n, TOL_GRAD, 1);
        compare("add", "db", "", db, n, TOL_GRAD, 1);
    }
    FREE(a, b, dout);
    fill0(da, n); fill0(db, n);
    a = load("mul", "a", SHAPE(23)); b = load("mul", "b", SHAPE(23)); dout = load("mul", "dout", SHAPE(23));
    if (a && b && dout) {
        mul_forward(out, a, b, n);
        compare("mul", "out", "", out, n, TOL_FWD, 0);
        for (int rep = 0; rep < 2; rep++) mul_backward(da, db, dout, a, b, n);
        compare("mul", "da", "", da, n, TOL_GRAD, 1);
        compare("mul", "db", "", db, n, TOL_GRAD, 1);
    }
    FREE(a, b, dout);
    fill0(da, n);
    a = load("scale", "x", SHAPE(23)); dout = load("scale", "dout", SHAPE(23));
    if (a && dout) {
        scale_forward(out, a, 0.3f, n);
        compare("scale", "out", "", out, n, TOL_FWD, 0);
        for (int rep = 0; rep < 2; rep++) scale_backward(da, dout, 0.3f, n);
        compare("scale", "dx", "", da, n, TOL_GRAD, 1);
    }
    FREE(a, dout, out, da, db);
    {   /* x (N,C,HW) += t (N,C) */
        const int N = 2, C = 3, HW = 4;
        float *x = load("add_bias_nc", "x", SHAPE(N, C, HW)), *t = load("add_bias_nc", "t", SHAPE(N, C));
        float *d = load("add_bias_nc", "dout", SHAPE(N, C, HW)), *dt = test_zeros((size_t)N * C);
        if (x && t && d) {
            add_bias_nc(x, t, N, C, HW);
            compare("add_bias_nc", "out", "", x, (size_t)N * C * HW, TOL_FWD, 0);
            for (int rep = 0; rep < 2; rep++) add_bias_nc_backward(dt, d, N, C, HW);
            compare("add_bias_nc", "dt", "", dt, (size_t)N * C, TOL_GRAD, 1);
            compare("add_bias_nc", "dx", " (= dout)", d, (size_t)N * C * HW, 0.0, 0);
        }
        FREE(x, t, d, dt);
    }
}

static void test_embedding(void) {
    const int N = 6, V = 10, D = 4;
    float *idf = load("embedding", "ids", SHAPE(N)), *table = load("embedding", "table", SHAPE(V, D));
    float *dout = load("embedding", "dout", SHAPE(N, D)), *out = test_zeros((size_t)N * D), *dt = test_zeros((size_t)V * D);
    int32_t ids[6];
    if (idf && table && dout) {
        for (int i = 0; i < N; i++) ids[i] = (int32_t)idf[i];
        embedding_forward(out, ids, table, N, D);
        compare("embedding", "out", "", out, (size_t)N * D, 0.0, 0);          /* a copy: exact */
        for (int rep = 0; rep < 2; rep++) embedding_backward(dt, dout, ids, N, D);
        compare("embedding", "dtable", "", dt, (size_t)V * D, TOL_GRAD, 1);
    }
    FREE(idf, table, dout, out, dt);
}

static double load_scalar64(const char *key) {            /* F64 scalar, read as raw bytes */
    const StTensor *t = st_find(&G, key);
    if (!check(t && t->dtype == ST_F64 && t->numel == 1, "F64 scalar %s", key)) return NAN;
    uint64_t u = 0;
    for (int i = 7; i >= 0; i--) u = u << 8 | t->data[i];
    double d;
    memcpy(&d, &u, 8);
    return d;
}

static void test_mse(void) {
    const int N = 2, C = 4, H = 5, W = 3, M = H * W;
    for (int masked = 0; masked < 2; masked++) {
        const char *op = masked ? "mse_masked" : "mse";
        size_t n = (size_t)N * C * M;
        float *p = load(op, "pred", SHAPE(N, C, H, W)), *t = load(op, "target", SHAPE(N, C, H, W));
        float *w = masked ? load(op, "weight", SHAPE(N, 1, H, W)) : NULL, *dl = load(op, "dloss", 0, NULL), *dp = test_zeros(n);
        char what[64];
        if (p && t && dl && (w || !masked)) {
            double want = load_scalar64(masked ? "mse_masked.loss" : "mse.loss");
            double want64 = load_scalar64(masked ? "mse_masked.loss64" : "mse.loss64");
            double got = mse_forward(p, t, w, N, C, M, 1), got_ref = mse_forward_ref(p, t, w, N, C, M, 1);
            /* masked: the formula of the header and of Mix-of-Show ((p-t)^2 in float32, the rest
             * in float64 because the mask is float64): only the summation order differs.
             * unmasked: F.mse_loss reduces in float32 and returns a float32, so torch's value
             * carries float32 summation and rounding error (~1e-7 relative); allow 1e-6. */
            double tol = masked ? 1e-12 : 1e-6;
            snprintf(what, sizeof what, "%s.loss", op);
            check(fabs(got - want) <= tol * fabs(want), "%-40s %.17g vs torch %.17g (rel %.1e, tol %.0e)", what, got, want,
                  fabs(got - want) / fabs(want), tol);
            /* mse_forward_ref works in double throughout: the float64 loss of the float32 inputs. */
            snprintf(what, sizeof what, "%s.loss (ref)", op);
            check(fabs(got_ref - want64) <= 1e-12 * fabs(want64), "%-40s %.17g vs float64 torch %.17g", what, got_ref, want64);
            /* rounding each (p-t)^2 to float moves the loss by at most 2^-24 relative */
            snprintf(what, sizeof what, "%s.loss vs float64", op);
            check(fabs(got - want64) <= 6e-8 * fabs(want64), "%-40s %.17g vs %.17g", what, got, want64);
            for (int rep = 0; rep < 2; rep++) mse_backward(dp, p, t, w, N, C, M, 1, dl[0]);
            compare(op, "dpred", "", dp, n, TOL_GRAD, 1);
        }
        FREE(p, t, w, dl, dp);
    }
}

static void test_timestep_embedding(void) {
    static const struct { const char *op; int N, dim, flip; float shift; } cases[] = {
        { "timestep_embedding", 6, 320, 1, 0.0f }, { "timestep_embedding_odd", 2, 7, 0, 1.0f } };
    for (size_t ci = 0; ci < 2; ci++)
        for (int ref = 0; ref < 2; ref++) {
            const char *op = cases[ci].op;
            int N = cases[ci].N, dim = cases[ci].dim;
            float *t = load(op, "t", SHAPE(N)), *out = test_zeros((size_t)N * dim);
            if (t) {
                (ref ? timestep_embedding_ref : timestep_embedding_forward)(out, t, N, dim, cases[ci].flip, cases[ci].shift, 10000);
                /* diffusers forms t*f_i in float32; one ulp of f_i moves the argument by up to
                 * t*f_i*2^-24 (6e-5 rad at t = 999), so sin/cos of two correct float32
                 * evaluations may differ that much. rel L2 1e-5 and max abs 2e-4 cover it. */
                compare_abs(op, "out", ref ? " (ref)" : "", out, (size_t)N * dim, TOL_FWD, 2e-4, 0);
            }
            FREE(t, out);
        }
}

int main(void) {
    const char *path = "tests/data/ops_golden.safetensors";
    MsStatus s = st_open(&G, path);
    have_file = s == MS_OK;
    if (!check(have_file, "open %s", path)) { printf("      %s\n", ms_last_error()); return test_summary("test_golden"); }
    if (test_is_verbose())
        printf("  %s: %zu tensors, torch %s, seed %s\n", path, G.count, st_meta(&G, "torch"), st_meta(&G, "seed"));
    test_gemm();
    test_linear();
    test_conv2d();
    test_groupnorm();
    test_layernorm();
    test_activations();
    test_geglu_softmax();
    test_attention();
    test_resampling();
    test_elementwise();
    test_embedding();
    test_mse();
    test_timestep_embedding();
    st_close(&G);
    ops_scratch_free();
    ms_gemm_scratch_free();
    return test_summary("test_golden");
}
