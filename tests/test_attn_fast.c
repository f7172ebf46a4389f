/* tests/test_attn_fast.c — the attention fast paths (tensor.c "Attention fast path") at every
 * SIMD level this CPU has: forward and backward against the double definitions
 * (attention_ref / attention_backward_ref), 1 vs 2 threads bitwise (the forward also with a
 * single head, where the query rows of a head are split across tasks), Dh = 8/16/24/32/40/64/80/160,
 * causal and cross shapes (few keys: Tk <= 80), SIMD tails, each gradient alone as in the full call;
 * and ms_expf_vec's, ms_erff_vec's and ms_expf_exact_vec's errors in ulp against exp and erf in double. */
#include "tests/test.h"

static MsRng rng;
static float *randn(size_t n, float std) { return test_track(test_randn(&rng, n, std)); }
static float *zeros(size_t n) { return test_track(test_zeros(n)); }

/* |got - want| in units of the float spacing at want (want rounded to float, > 0). */
static double ulps(float got, double want) {
    float w = (float)want;
    if (w == 0.0f) return got == 0.0f ? 0.0 : INFINITY;
    int e;
    frexpf(w, &e);
    double u = ldexp(1.0, e - 24);                    /* spacing of floats in [2^(e-1), 2^e) */
    if (w < ldexpf(1.0f, -126)) u = ldexp(1.0, -149); /* subnormal results */
    return fabs((double)got - want) / u;
}

static void test_exp(void) {
    const size_t n = 1 << 20;
    float *x = zeros(n), *y = zeros(n);
    for (size_t i = 0; i < n; i++) x[i] = (float)(-87.3 + (88.0 + 87.3) * (double)i / (double)(n - 1));
    ms_expf_vec(y, x, n);
    double worst = 0.0, wx = 0.0;
    for (size_t i = 0; i < n; i++) {
        double u = ulps(y[i], exp((double)x[i]));
        if (u > worst) { worst = u; wx = x[i]; }
    }
    /* near 0, where softmax spends its time: every float in [-1, 0] step 2^-20 */
    for (float t = -1.0f; t <= 0.0f; t += 1.0f / 1048576.0f) {
        float yy;
        ms_expf_vec(&yy, &t, 1);
        double u = ulps(yy, exp((double)t));
        if (u > worst) { worst = u; wx = t; }
    }
    check(worst < 1.5, "exp %s: max error %.3f ulp (at x = %.7g) < 1.5 ulp on [-87.3, 88]", ms_simd_name(ms_simd()), worst, wx);
    float sp[6] = { -87.34f, -100.0f, -INFINITY, 0.0f, 88.0f, 1000.0f }, ys[6];
    ms_expf_vec(ys, sp, 6);
    check(ys[0] == 0.0f && ys[1] == 0.0f && ys[2] == 0.0f && ys[3] == 1.0f && ys[4] == ys[5] && isfinite(ys[5]),
          "exp %s: 0 below -87.33654 and at -inf, e^0 = 1, clamped at 88 (%g %g %g %g %g %g)", ms_simd_name(ms_simd()),
          (double)ys[0], (double)ys[1], (double)ys[2], (double)ys[3], (double)ys[4], (double)ys[5]);
}

/* ms_erff_vec against erf in double: every float of [0, 1] step 2^-22 and of [1, 4.5] step 2^-20
 * (both pieces and their seam), tiny and huge arguments, odd symmetry, and the special values. */
static void test_erf(void) {
    const size_t n1 = (size_t)1 << 22, n2 = (size_t)7 << 19, n = n1 + n2 + 64;
    float *x = zeros(n), *y = zeros(n);
    for (size_t i = 0; i < n1; i++) x[i] = (float)((double)i / (double)n1);
    for (size_t i = 0; i < n2; i++) x[n1 + i] = (float)(1.0 + 3.5 * (double)i / (double)n2);
    for (size_t i = 0; i < 64; i++) x[n1 + n2 + i] = ldexpf(1.0f, -(int)i * 2);   /* 1 down to 2^-126 */
    ms_erff_vec(y, x, n);
    double worst = 0.0, wx = 0.0;
    for (size_t i = 0; i < n; i++) {
        double u = ulps(y[i], erf((double)x[i]));
        if (u > worst) { worst = u; wx = x[i]; }
    }
    for (size_t i = 0; i < n; i++) x[i] = -x[i];
    float *z = zeros(n);
    ms_erff_vec(z, x, n);
    size_t odd = 0;
    for (size_t i = 0; i < n; i++) odd += z[i] != -y[i];
    check(worst < 2.0, "erf %s: max error %.3f ulp (at x = %.9g) < 2 ulp on [0, 4.5]", ms_simd_name(ms_simd()), worst, wx);
    check(odd == 0, "erf %s: erf(-x) == -erf(x) bitwise (%zu differ)", ms_simd_name(ms_simd()), odd);
    float sp[7] = { 0.0f, -0.0f, 4.0f, 1e30f, -INFINITY, INFINITY, NAN }, ys[7];
    ms_erff_vec(ys, sp, 7);
    check(ys[0] == 0.0f && !signbit(ys[0]) && ys[1] == 0.0f && signbit(ys[1]) && ys[2] == 1.0f && ys[3] == 1.0f &&
          ys[4] == -1.0f && ys[5] == 1.0f && isnan(ys[6]),
          "erf %s: +-0 keep their sign, 1 from 4 on, +-1 at +-inf, NaN stays NaN (%g %g %g %g %g %g %g)",
          ms_simd_name(ms_simd()), (double)ys[0], (double)ys[1], (double)ys[2], (double)ys[3], (double)ys[4],
          (double)ys[5], (double)ys[6]);
}

/* ms_expf_exact_vec against exp in double: every float step 2^-12 on [-103.9, 88.7] (normal and
 * subnormal results, overflow's edge), and the special values. */
static void test_expf_exact(void) {
    const size_t n = (size_t)((88.7 + 103.9) * 4096.0);
    float *x = zeros(n), *y = zeros(n);
    for (size_t i = 0; i < n; i++) x[i] = (float)(-103.9 + (double)i / 4096.0);
    ms_expf_exact_vec(y, x, n);
    double worst = 0.0, wx = 0.0;
    for (size_t i = 0; i < n; i++) {
        double u = ulps(y[i], exp((double)x[i]));
        if (u > worst) { worst = u; wx = x[i]; }
    }
    check(worst < 0.501, "exp (exact) %s: max error %.4f ulp (at x = %.9g) < 0.501 ulp on [-103.9, 88.7]",
          ms_simd_name(ms_simd()), worst, wx);
    float sp[7] = { -INFINITY, -200.0f, 0.0f, 88.8f, 200.0f, INFINITY, NAN }, ys[7];
    ms_expf_exact_vec(ys, sp, 7);
    check(ys[0] == 0.0f && ys[1] == 0.0f && ys[2] == 1.0f && isinf(ys[3]) && isinf(ys[4]) && isinf(ys[5]) && isnan(ys[6]),
          "exp (exact) %s: 0 at -inf and far below, e^0 = 1, +inf from 88.73 on, NaN stays NaN (%g %g %g %g %g %g %g)",
          ms_simd_name(ms_simd()), (double)ys[0], (double)ys[1], (double)ys[2], (double)ys[3], (double)ys[4], (double)ys[5],
          (double)ys[6]);
}

static void run_att(int ref, int B, int Tq, int Tk, int H, int Dh, int causal, float scale, const float *q, const float *k,
                    const float *v, const float *dy, float *out, float *lse, float *dq, float *dk, float *dv,
                    const float *d0, size_t nq, size_t nk) {
    memcpy(dq, d0, nq * sizeof(float));
    memcpy(dk, d0, nk * sizeof(float));
    memcpy(dv, d0, nk * sizeof(float));
    (ref ? attention_ref : attention_forward)(out, lse, q, k, v, B, Tq, Tk, H, Dh, causal, scale);
    (ref ? attention_backward_ref : attention_backward)(dq, dk, dv, dy, q, k, v, out, lse, B, Tq, Tk, H, Dh, causal, scale);
}

static void test_att(int B, int Tq, int Tk, int H, int Dh, int causal) {
    size_t nq = (size_t)B * Tq * H * Dh, nk = (size_t)B * Tk * H * Dh, nl = (size_t)B * H * Tq;
    size_t nmax = nq > nk ? nq : nk;
    float scale = (float)(1.0 / sqrt((double)Dh));
    float *q = randn(nq, 1.0f), *k = randn(nk, 1.0f), *v = randn(nk, 1.0f), *dy = randn(nq, 1.0f), *d0 = randn(nmax, 1.0f);
    float *o[3], *l[3], *gq[3], *gk[3], *gv[3];
    for (int i = 0; i < 3; i++) { o[i] = zeros(nq); l[i] = zeros(nl); gq[i] = zeros(nq); gk[i] = zeros(nk); gv[i] = zeros(nk); }
    run_att(1, B, Tq, Tk, H, Dh, causal, scale, q, k, v, dy, o[0], l[0], gq[0], gk[0], gv[0], d0, nq, nk);
    for (int t = 1; t <= 2; t++) {
        ms_set_threads(t);
        run_att(0, B, Tq, Tk, H, Dh, causal, scale, q, k, v, dy, o[t], l[t], gq[t], gk[t], gv[t], d0, nq, nk);
    }
    ms_set_threads(0);
    char op[128], lb[160];
    snprintf(op, sizeof op, "attention %s B%d Tq%d Tk%d H%d Dh%d%s", ms_simd_name(ms_simd()), B, Tq, Tk, H, Dh, causal ? " causal" : "");
    const char *names[5] = { "out", "lse", "dq", "dk", "dv" };
    float *got[5] = { o[1], l[1], gq[1], gk[1], gv[1] }, *two[5] = { o[2], l[2], gq[2], gk[2], gv[2] };
    float *want[5] = { o[0], l[0], gq[0], gk[0], gv[0] };
    size_t ns[5] = { nq, nl, nq, nk, nk };
    for (int i = 0; i < 5; i++) {
        /* as tests/test_ops.c: float32 dot products of length <= 160 (Tk <= 300), relative
         * error ~1e-7 sqrt(length), absolute a few ulp(5) sqrt(length) */
        snprintf(lb, sizeof lb, "%s %s vs ref", op, names[i]);
        check_close(lb, got[i], want[i], ns[i], 1e-5, 2e-5);
        snprintf(lb, sizeof lb, "%s %s 1 vs 2 threads", op, names[i]);
        check_bitwise(lb, got[i], two[i], ns[i]);
    }
}

/* Each gradient asked for alone (the others NULL) has the bits it has when all three are asked
 * for: the paths skip work for a NULL output, never change how the others are summed. */
static void test_att_subsets(int B, int Tq, int Tk, int H, int Dh) {
    size_t nq = (size_t)B * Tq * H * Dh, nk = (size_t)B * Tk * H * Dh, nl = (size_t)B * H * Tq;
    float scale = (float)(1.0 / sqrt((double)Dh));
    float *q = randn(nq, 1.0f), *k = randn(nk, 1.0f), *v = randn(nk, 1.0f), *dy = randn(nq, 1.0f);
    float *o = zeros(nq), *l = zeros(nl), *all[3] = { randn(nq, 1.0f), randn(nk, 1.0f), randn(nk, 1.0f) }, *one[3];
    size_t n[3] = { nq, nk, nk };
    for (int i = 0; i < 3; i++) { one[i] = zeros(n[i]); memcpy(one[i], all[i], n[i] * sizeof(float)); }
    attention_forward(o, l, q, k, v, B, Tq, Tk, H, Dh, 0, scale);
    attention_backward(all[0], all[1], all[2], dy, q, k, v, o, l, B, Tq, Tk, H, Dh, 0, scale);
    const char *names[3] = { "dq", "dk", "dv" };
    for (int i = 0; i < 3; i++) {
        attention_backward(i == 0 ? one[0] : NULL, i == 1 ? one[1] : NULL, i == 2 ? one[2] : NULL, dy, q, k, v, o, l,
                           B, Tq, Tk, H, Dh, 0, scale);
        char lb[160];
        snprintf(lb, sizeof lb, "attention backward %s B%d Tq%d Tk%d H%d Dh%d: %s alone == %s of all three",
                 ms_simd_name(ms_simd()), B, Tq, Tk, H, Dh, names[i], names[i]);
        check_bitwise(lb, one[i], all[i], n[i]);
    }
}

int main(void) {
    MsSimd hw = ms_simd_detected();
    ms_rng_seed(&rng, 14);
    ms_set_parallel_min_work(0.0);   /* every loop parallel at these small sizes: 1 vs 2 threads compares schedules */
    printf("test_attn_fast: SIMD detected %s\n", ms_simd_name(hw));
    for (int lv = MS_SIMD_SCALAR; lv <= (int)MS_SIMD_AVX512; lv++) {
        ms_set_simd((MsSimd)lv);
        if (ms_simd() != (MsSimd)lv) continue;
        test_exp();
        test_erf();
        test_expf_exact();
        test_att(1, 130, 77, 2, 40, 0);      /* cross-attention: Tk = 77 (a tail of every key panel) */
        test_att(2, 70, 70, 3, 16, 1);       /* causal, Tq not a multiple of the query block */
        test_att(1, 77, 77, 2, 64, 1);       /* CLIP's heads */
        test_att(1, 33, 150, 1, 80, 0);      /* Dh 80: 48 + 32 channels in dK/dV */
        test_att(1, 40, 45, 1, 160, 0);      /* Dh 160 */
        test_att(1, 200, 90, 1, 40, 0);      /* one head: the forward splits its rows across tasks */
        test_att(1, 130, 50, 2, 16, 1);      /* causal with Tq > Tk */
        test_att(2, 1, 3, 1, 8, 0);          /* one query, three keys */
        test_att(1, 37, 20, 3, 24, 0);       /* few keys: Dh 24 in row pairs, a short last tile */
        test_att(1, 70, 600, 2, 40, 0);      /* backward: keys in 3 chunks (252, 252, 96) */
        test_att(1, 600, 600, 1, 16, 1);     /* causal: chunks end at the block's last query */
        test_att(1, 45, 77, 2, 80, 0);       /* few keys, Dh 80: the backward's widest few-key case */
        test_att(2, 70, 77, 2, 32, 0);       /* few keys, Dh 32: dQ in plain rows, a short last block */
        test_att(1, 40, 16, 2, 8, 0);        /* one key vector, Dh 8 in row pairs */
        test_att_subsets(1, 100, 77, 2, 40); /* few keys */
        test_att_subsets(1, 70, 300, 1, 80); /* the general path */
    }
    ms_set_simd(hw);
    test_free_tracked();
    ops_scratch_free();
    return test_summary("test_attn_fast");
}
