/* tests/test_grad.c — central-difference gradient checks of every op with a backward, w.r.t.
 * every input and weight (STYLE.md §8): L = sum_i r_i f(x)_i summed in double with a random r,
 * so the analytic gradient is one backward call with dout = r.
 *
 * Step and tolerance. The forward runs in float32; L is summed in double. With eps = 1e-2:
 *   truncation error of the central difference ~ eps^2 |f'''| / 6 ~ 2e-5 relative (O(1) curvature)
 *   rounding error ~ 2^-24 * sqrt(sum (r f)^2) / (2 eps) ~ 6e-8 * 30 / 2e-2 ~ 1e-4 absolute
 * against gradients of size 0.1..10, so a correct backward stays well below 1e-2 relative and a
 * wrong term (a missing factor, a sign, a wrong index) gives O(1). gradcheck() measures the
 * error relative to |numeric| + |analytic| (floored at 1e-3 of the largest gradient). ReLU
 * inputs are kept at least 0.05 away from its kink (eps = 1e-2 never crosses it). */
#include "tests/test.h"

#include <stdint.h>

#define EPS 1e-2f
#define TOL 1e-2

static MsRng rng;

/* Every test buffer is freed at exit (test_track, tests/test.h). */
static float *randn(size_t n, float std) { return test_track(test_randn(&rng, n, std)); }
static float *zeros(size_t n) { return test_track(test_zeros(n)); }

/* One op under test: fwd() fills y (ny) from the inputs; bwd() adds d(sum r*y)/d(input) into
 * the grads, with r as dout. */
typedef struct Case {
    void (*fwd)(struct Case *);
    void (*bwd)(struct Case *);
    float *y, *r;
    size_t ny;
    int nin;
    float *in[4], *din[4];
    size_t nx[4];
    const char *names[4];
    int d[8];            /* dims, meaning per op */
    float f;             /* a float parameter (eps, scale, s) */
    const void *aux;     /* ids, weights */
    int is_scalar;       /* fwd returns a double in `scalar` instead of filling y (ny = 1) */
    double scalar;
    double floor_frac;   /* 0: test.h gradcheck; else gradcheck_floor with this floor */
} Case;

static double case_loss(void *p) {
    Case *c = (Case *)p;
    double s = 0.0;
    c->fwd(c);
    if (c->is_scalar) return (double)c->r[0] * c->scalar;
    for (size_t i = 0; i < c->ny; i++) s += (double)c->r[i] * c->y[i];
    return s;
}

/* Why attention uses gradcheck_floor (tests/test.h) with a floor of 1e-2, not 1e-3: its
 * outputs are float, and their rounding alone moves a central difference by ~1e-5 absolute
 * at eps = 1e-2 (measured: the double
 * attention_ref with float outputs shows the same), while dK has entries far below 1e-3 of its
 * largest (keys that few queries attend to), so with a 1e-3 floor a CORRECT backward scores up
 * to 3e-2 on some seeds (measured over 20 seeds, shapes down to 8x8x4). With 1e-2 the worst
 * over 20 seeds is 5e-3; a wrong term still scores O(1). */

/* Allocates y, r and the grads, runs fwd + bwd once, then checks every input (with test.h's
 * gradcheck, or gradcheck_floor when c->floor_frac is set). */
static void run_case(const char *op, Case *c) {
    c->r = randn(c->ny, 1.0f);
    for (int k = 0; k < c->nin; k++) c->din[k] = zeros(c->nx[k]);
    c->fwd(c);
    c->bwd(c);
    for (int k = 0; k < c->nin; k++) {
        double worst = c->floor_frac > 0 ? gradcheck_floor(case_loss, c, c->in[k], c->din[k], c->nx[k], EPS, c->floor_frac)
                                          : gradcheck(case_loss, c, c->in[k], c->din[k], c->nx[k], EPS);
        check(worst <= TOL, "gradcheck %-34s d%-6s worst rel err %.2e (tol %.0e)", op, c->names[k], worst, TOL);
    }
}

static void init_case(Case *c, size_t ny) { memset(c, 0, sizeof *c); c->ny = ny; c->y = zeros(ny); }
static void add_input(Case *c, const char *name, size_t n, float std) {
    c->in[c->nin] = randn(n, std);
    c->nx[c->nin] = n;
    c->names[c->nin++] = name;
}

/* ---- GroupNorm: inputs x, w, b; saved mean/rstd live in aux buffers ---- */
static float gn_mean[64], gn_rstd[64];
static void gn_fwd(Case *c) { groupnorm_forward(c->y, gn_mean, gn_rstd, c->in[0], c->in[1], c->in[2], c->d[0], c->d[1], c->d[2], c->d[3], c->f); }
static void gn_bwd(Case *c) { groupnorm_backward(c->din[0], c->din[1], c->din[2], c->r, c->in[0], gn_mean, gn_rstd, c->in[1], c->d[0], c->d[1], c->d[2], c->d[3]); }
static void test_groupnorm(int N, int C, int HW, int G) {
    Case c;
    char op[64];
    init_case(&c, (size_t)N * C * HW);
    add_input(&c, "x", c.ny, 1.0f); add_input(&c, "w", C, 1.0f); add_input(&c, "b", C, 1.0f);
    c.d[0] = N; c.d[1] = C; c.d[2] = HW; c.d[3] = G; c.f = 1e-5f;
    c.fwd = gn_fwd; c.bwd = gn_bwd;
    snprintf(op, sizeof op, "groupnorm %dx%dx%d G%d", N, C, HW, G);
    run_case(op, &c);
}

static void ln_fwd(Case *c) { layernorm_forward(c->y, gn_mean, gn_rstd, c->in[0], c->in[1], c->in[2], c->d[0], c->d[1], c->f); }
static void ln_bwd(Case *c) { layernorm_backward(c->din[0], c->din[1], c->din[2], c->r, c->in[0], gn_mean, gn_rstd, c->in[1], c->d[0], c->d[1]); }
static void test_layernorm(int N, int D) {
    Case c;
    init_case(&c, (size_t)N * D);
    add_input(&c, "x", c.ny, 1.0f); add_input(&c, "w", D, 1.0f); add_input(&c, "b", D, 1.0f);
    c.d[0] = N; c.d[1] = D; c.f = 1e-5f;
    c.fwd = ln_fwd; c.bwd = ln_bwd;
    run_case("layernorm 5x19", &c);
}

/* ---- activations ---- */
static void silu_f(Case *c) { silu_forward(c->y, c->in[0], c->ny); }
static void silu_b(Case *c) { silu_backward(c->din[0], c->r, c->in[0], c->ny); }
static void gelu_f(Case *c) { gelu_forward(c->y, c->in[0], c->ny); }
static void gelu_b(Case *c) { gelu_backward(c->din[0], c->r, c->in[0], c->ny); }
static void qg_f(Case *c) { quick_gelu_forward(c->y, c->in[0], c->ny); }
static void qg_b(Case *c) { quick_gelu_backward(c->din[0], c->r, c->in[0], c->ny); }
static void relu_f(Case *c) { relu_forward(c->y, c->in[0], c->ny); }
static void relu_b(Case *c) { relu_backward(c->din[0], c->r, c->in[0], c->ny); }
static void test_act(const char *op, void (*f)(Case *), void (*b)(Case *), int kinked) {
    Case c;
    init_case(&c, 301);
    add_input(&c, "x", c.ny, 2.0f);
    if (kinked)
        for (size_t i = 0; i < c.ny; i++) c.in[0][i] += c.in[0][i] < 0 ? -0.05f : 0.05f;
    c.fwd = f; c.bwd = b;
    run_case(op, &c);
}

static void geglu_f(Case *c) { geglu_forward(c->y, c->in[0], c->d[0], c->d[1]); }
static void geglu_b(Case *c) { geglu_backward(c->din[0], c->r, c->in[0], c->d[0], c->d[1]); }
static void sm_f(Case *c) { softmax_forward(c->y, c->in[0], c->d[0], c->d[1]); }
static void sm_b(Case *c) { softmax_backward(c->din[0], c->r, c->y, c->d[0], c->d[1]); }
static void test_geglu_softmax(void) {
    Case c;
    init_case(&c, 7 * 13);
    add_input(&c, "x", 2 * c.ny, 1.5f);
    c.d[0] = 7; c.d[1] = 13; c.fwd = geglu_f; c.bwd = geglu_b;
    run_case("geglu 7x(2*13)", &c);
    init_case(&c, 6 * 17);
    add_input(&c, "x", c.ny, 2.0f);
    c.d[0] = 6; c.d[1] = 17; c.fwd = sm_f; c.bwd = sm_b;
    run_case("softmax 6x17", &c);
}

/* ---- attention: inputs q, k, v; d = B, Tq, Tk, H, Dh, causal ---- */
static float att_lse[4096];
static void att_f(Case *c) { attention_forward(c->y, att_lse, c->in[0], c->in[1], c->in[2], c->d[0], c->d[1], c->d[2], c->d[3], c->d[4], c->d[5], c->f); }
static void att_b(Case *c) {
    attention_backward(c->din[0], c->din[1], c->din[2], c->r, c->in[0], c->in[1], c->in[2], c->y, att_lse,
                       c->d[0], c->d[1], c->d[2], c->d[3], c->d[4], c->d[5], c->f);
}
static void test_attention(int B, int Tq, int Tk, int H, int Dh, int causal, int streaming) {
    Case c;
    char op[64];
    init_case(&c, (size_t)B * Tq * H * Dh);
    add_input(&c, "q", c.ny, 1.0f);
    add_input(&c, "k", (size_t)B * Tk * H * Dh, 1.0f);
    add_input(&c, "v", (size_t)B * Tk * H * Dh, 1.0f);
    c.d[0] = B; c.d[1] = Tq; c.d[2] = Tk; c.d[3] = H; c.d[4] = Dh; c.d[5] = causal;
    c.f = (float)(1.0 / sqrt((double)Dh));
    c.fwd = att_f; c.bwd = att_b;
    c.floor_frac = 1e-2;
    snprintf(op, sizeof op, "attention %d,%d,%d,%d,%d%s%s", B, Tq, Tk, H, Dh, causal ? " causal" : "", streaming ? " stream" : "");
    if (streaming) ops_scratch_limit(1);
    run_case(op, &c);
    ops_scratch_limit(0);
}

/* ---- attention probabilities at key columns: inputs q, k; d = B, Tq, Tk, H, Dh, ncol; aux = cols.
 * The loss is evaluated in double from its definition, L(q, k) = sum R * softmax(scale q k^T)[cols]
 * per (b, h) (a scalar case: y = L, dout = r[0]), so lse is recomputed from q and k inside it and
 * a backward that treated lse as a constant (missing the -s_i term) fails. In double because
 * float probabilities carry lse's rounding (|lse| * 2^-24 relative, ~3e-7): at eps 1e-2 that
 * noise alone scores 1e-2..6e-2 on dK's small entries, while the double loss scores < 1e-3
 * (measured; the error then falls as eps^2, as a correct derivative does). ---- */
static float pc_lse[4096], pc_out[8192], *pc_R;
static void pc_f(Case *c) {
    const float *q = c->in[0], *k = c->in[1];
    const int32_t *cols = (const int32_t *)c->aux;
    int B = c->d[0], Tq = c->d[1], Tk = c->d[2], H = c->d[3], Dh = c->d[4], ncol = c->d[5], HD = H * Dh;
    double P[128], L = 0.0;
    for (int b = 0; b < B; b++)
        for (int h = 0; h < H; h++)
            for (int i = 0; i < Tq; i++) {
                double m = -INFINITY, l = 0.0;
                for (int t = 0; t < Tk; t++) {
                    double x = 0.0;
                    for (int d = 0; d < Dh; d++)
                        x += (double)q[((size_t)b * Tq + i) * HD + (size_t)h * Dh + d] * k[((size_t)b * Tk + t) * HD + (size_t)h * Dh + d];
                    P[t] = x * c->f;
                    m = fmax(m, P[t]);
                }
                for (int t = 0; t < Tk; t++) { P[t] = exp(P[t] - m); l += P[t]; }
                for (int j = 0; j < ncol; j++) L += pc_R[(((size_t)b * H + h) * Tq + i) * ncol + j] * P[cols[b * ncol + j]] / l;
            }
    c->scalar = L;
}
static void pc_b(Case *c) {        /* lse from the float forward, as the UNet has it */
    int B = c->d[0], Tq = c->d[1], Tk = c->d[2], H = c->d[3], Dh = c->d[4], ncol = c->d[5];
    size_t np = (size_t)B * H * Tq * ncol;
    float *dp = zeros(np);
    for (size_t x = 0; x < np; x++) dp[x] = c->r[0] * pc_R[x];
    attention_forward(pc_out, pc_lse, c->in[0], c->in[1], c->in[1], B, Tq, Tk, H, Dh, 0, c->f);
    attention_probs_cols_backward(c->din[0], c->din[1], dp, c->in[0], c->in[1], pc_lse, (const int32_t *)c->aux,
                                  B, Tq, Tk, H, Dh, ncol, c->f);
}
static void test_probs_cols(int B, int Tq, int Tk, int H, int Dh, const int32_t *cols, int ncol, int streaming) {
    Case c;
    char op[64];
    init_case(&c, 1);
    c.is_scalar = 1;
    add_input(&c, "q", (size_t)B * Tq * H * Dh, 1.5f);
    add_input(&c, "k", (size_t)B * Tk * H * Dh, 1.5f);
    pc_R = randn((size_t)B * H * Tq * ncol, 1.0f);
    c.d[0] = B; c.d[1] = Tq; c.d[2] = Tk; c.d[3] = H; c.d[4] = Dh; c.d[5] = ncol;
    c.f = (float)(1.0 / sqrt((double)Dh));
    c.aux = cols;
    c.fwd = pc_f; c.bwd = pc_b;
    snprintf(op, sizeof op, "probs_cols %d,%d,%d,%d,%d ncol %d%s", B, Tq, Tk, H, Dh, ncol, streaming ? " stream" : "");
    if (streaming) ops_scratch_limit(1);
    run_case(op, &c);
    ops_scratch_limit(0);
}

/* ---- resampling and layout ---- */
static void up_f(Case *c) { upsample_nearest2x_forward(c->y, c->in[0], c->d[0], c->d[1], c->d[2], c->d[3]); }
static void up_b(Case *c) { upsample_nearest2x_backward(c->din[0], c->r, c->d[0], c->d[1], c->d[2], c->d[3]); }
static void pool_f(Case *c) { avgpool2x2_forward(c->y, c->in[0], c->d[0], c->d[1], c->d[2], c->d[3]); }
static void pool_b(Case *c) { avgpool2x2_backward(c->din[0], c->r, c->d[0], c->d[1], c->d[2], c->d[3]); }
static void pu_f(Case *c) { pixel_unshuffle_forward(c->y, c->in[0], c->d[0], c->d[1], c->d[2], c->d[3], c->d[4]); }
static void pu_b(Case *c) { pixel_unshuffle_backward(c->din[0], c->r, c->d[0], c->d[1], c->d[2], c->d[3], c->d[4]); }
static void cat_f(Case *c) { concat_channels_forward(c->y, c->in[0], c->in[1], c->d[0], c->d[1], c->d[2], c->d[3]); }
static void cat_b(Case *c) { concat_channels_backward(c->din[0], c->din[1], c->r, c->d[0], c->d[1], c->d[2], c->d[3]); }
static void test_layout(void) {
    Case c;
    int N = 2, C = 3, H = 6, W = 4;
    size_t n = (size_t)N * C * H * W;
    init_case(&c, 4 * n); add_input(&c, "x", n, 1.0f);
    c.d[0] = N; c.d[1] = C; c.d[2] = H; c.d[3] = W; c.fwd = up_f; c.bwd = up_b;
    run_case("upsample_nearest2x", &c);
    init_case(&c, n / 4); add_input(&c, "x", n, 1.0f);
    c.d[0] = N; c.d[1] = C; c.d[2] = H; c.d[3] = W; c.fwd = pool_f; c.bwd = pool_b;
    run_case("avgpool2x2", &c);
    init_case(&c, n); add_input(&c, "x", n, 1.0f);
    c.d[0] = N; c.d[1] = C; c.d[2] = H; c.d[3] = W; c.d[4] = 2; c.fwd = pu_f; c.bwd = pu_b;
    run_case("pixel_unshuffle r2", &c);
    init_case(&c, (size_t)N * (3 + 2) * 7); add_input(&c, "a", (size_t)N * 3 * 7, 1.0f); add_input(&c, "b", (size_t)N * 2 * 7, 1.0f);
    c.d[0] = N; c.d[1] = 3; c.d[2] = 2; c.d[3] = 7; c.fwd = cat_f; c.bwd = cat_b;
    run_case("concat_channels", &c);
}

/* ---- elementwise ---- */
static void add_f(Case *c) { add_forward(c->y, c->in[0], c->in[1], c->ny); }
static void add_b(Case *c) { add_backward(c->din[0], c->din[1], c->r, c->ny); }
static void mul_f(Case *c) { mul_forward(c->y, c->in[0], c->in[1], c->ny); }
static void mul_b(Case *c) { mul_backward(c->din[0], c->din[1], c->r, c->in[0], c->in[1], c->ny); }
static void scl_f(Case *c) { scale_forward(c->y, c->in[0], c->f, c->ny); }
static void scl_b(Case *c) { scale_backward(c->din[0], c->r, c->f, c->ny); }
/* add_bias_nc is in place: y = copy of x, then y += t; backward: dx += dout, dt += sum_hw. */
static void bias_f(Case *c) {
    memcpy(c->y, c->in[0], c->ny * sizeof(float));
    add_bias_nc(c->y, c->in[1], c->d[0], c->d[1], c->d[2]);
}
static void bias_b(Case *c) {
    add_backward(c->din[0], NULL, c->r, c->ny);
    add_bias_nc_backward(c->din[1], c->r, c->d[0], c->d[1], c->d[2]);
}
static void test_elementwise(void) {
    Case c;
    init_case(&c, 203); add_input(&c, "a", 203, 1.0f); add_input(&c, "b", 203, 1.0f);
    c.fwd = add_f; c.bwd = add_b; run_case("add", &c);
    init_case(&c, 203); add_input(&c, "a", 203, 1.0f); add_input(&c, "b", 203, 1.0f);
    c.fwd = mul_f; c.bwd = mul_b; run_case("mul", &c);
    init_case(&c, 203); add_input(&c, "x", 203, 1.0f); c.f = -0.7f;
    c.fwd = scl_f; c.bwd = scl_b; run_case("scale", &c);
    init_case(&c, 2 * 5 * 9); add_input(&c, "x", c.ny, 1.0f); add_input(&c, "t", 2 * 5, 1.0f);
    c.d[0] = 2; c.d[1] = 5; c.d[2] = 9; c.fwd = bias_f; c.bwd = bias_b; run_case("add_bias_nc", &c);
}

/* ---- embedding: repeated ids ---- */
static const int32_t emb_ids[7] = { 2, 0, 2, 5, 2, 1, 0 };
static void emb_f(Case *c) { embedding_forward(c->y, emb_ids, c->in[0], 7, c->d[0]); }
static void emb_b(Case *c) { embedding_backward(c->din[0], c->r, emb_ids, 7, c->d[0]); }
static void test_embedding(void) {
    Case c;
    init_case(&c, 7 * 9); add_input(&c, "table", 6 * 9, 1.0f);
    c.d[0] = 9; c.fwd = emb_f; c.bwd = emb_b;
    run_case("embedding (repeated ids)", &c);
}

/* ---- MSE: y is the scalar loss, inputs pred and target (target's gradient is -dpred, which
 * mse_backward does not produce: checked through pred only) ---- */
static void mse_f(Case *c) {
    c->scalar = mse_forward(c->in[0], c->in[1], (const float *)c->aux, c->d[0], c->d[1], c->d[2], c->d[3]);
}
static void mse_b(Case *c) {
    mse_backward(c->din[0], c->in[0], c->in[1], (const float *)c->aux, c->d[0], c->d[1], c->d[2], c->d[3], c->r[0]);
}
static void test_mse(int Cw, int weighted) {
    Case c;
    int N = 2, C = 4, M = 13;
    char op[64];
    float *w = zeros((size_t)N * C * M);
    ms_rng_fill_uniform(&rng, w, (size_t)N * C * M, 0.0f, 1.0f);
    init_case(&c, 1);
    c.is_scalar = 1;
    add_input(&c, "pred", (size_t)N * C * M, 1.0f);
    c.in[1] = randn((size_t)N * C * M, 1.0f);    /* target: not a checked input */
    c.d[0] = N; c.d[1] = C; c.d[2] = M; c.d[3] = Cw; c.aux = weighted ? w : NULL;
    c.fwd = mse_f; c.bwd = mse_b;
    snprintf(op, sizeof op, "mse %s", weighted ? (Cw == 1 ? "mask (N,1,M)" : "weight (N,C,M)") : "plain");
    run_case(op, &c);
}

int main(void) {
    ms_rng_seed(&rng, 777);
    test_groupnorm(2, 6, 7, 3);
    test_groupnorm(1, 4, 9, 1);
    test_groupnorm(2, 4, 5, 4);
    test_layernorm(5, 19);
    test_act("silu", silu_f, silu_b, 0);
    test_act("gelu", gelu_f, gelu_b, 0);
    test_act("quick_gelu", qg_f, qg_b, 0);
    test_act("relu (no kinks)", relu_f, relu_b, 1);
    test_geglu_softmax();
    /* Few keys in the multi-block cases keep dK's range narrow (FD noise grows with the number
     * of outputs a key moves); test_ops compares long-key shapes with the double reference. */
    test_attention(1, 70, 9, 2, 8, 0, 0);      /* two query blocks, Tq != Tk */
    test_attention(2, 70, 8, 2, 8, 1, 0);      /* causal, Tq > Tk: rows >= 8 see every key */
    test_attention(1, 24, 24, 2, 8, 1, 0);     /* causal, square */
    test_attention(1, 20, 9, 3, 5, 0, 1);      /* streaming path */
    test_attention(1, 17, 17, 1, 4, 1, 1);
    {   /* per sample: a repeated column (positions 3, 5, 3) and the last key */
        static const int32_t c77[6] = { 3, 5, 3, 76, 0, 76 }, c9[4] = { 2, 8, 2, 2 }, c5[2] = { 4, 1 };
        test_probs_cols(2, 10, 77, 2, 4, c77, 3, 0);   /* Tk = 77 (CLIP's context length) */
        test_probs_cols(1, 70, 9, 2, 8, c9, 4, 0);     /* two query blocks, column repeated 3 times */
        test_probs_cols(2, 7, 5, 3, 3, c5, 1, 0);
        test_probs_cols(2, 10, 77, 2, 4, c77, 3, 1);   /* streaming path */
        test_probs_cols(1, 70, 9, 2, 8, c9, 4, 1);
    }
    test_layout();
    test_elementwise();
    test_embedding();
    test_mse(1, 0);
    test_mse(1, 1);
    test_mse(4, 1);
    ops_scratch_free();
    test_free_tracked();
    return test_summary("test_grad");
}
