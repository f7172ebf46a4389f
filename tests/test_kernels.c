/* tests/test_kernels.c — ms_gemm, linear and conv2d against their _ref definitions (double
 * accumulation) at every SIMD level this CPU has, 1 vs 2 threads bitwise, and central-difference
 * gradient checks of the backward passes. */
#include "tests/test.h"

static MsRng rng;

/* ---- GEMM ------------------------------------------------------------------------------ */
/* Pass criterion: the classical forward error bound of a length-K dot product in float,
 *   |C - C_exact| <= (K + 2) u (|alpha| |op(A)| |op(B)| + |beta| |C0|),   u = 2^-24,
 * which holds for any summation order (FMA or not) and stays meaningful under cancellation,
 * where a relative error would not. A wrong or missing term costs about 1/K of the bound's
 * scale, far above (K+2) u for every K tested. rel_l2 and max_abs are printed too. */
typedef struct { double rel_l2, max_abs, ratio; } GemmErr;

static GemmErr gemm_case(int ta, int tb, int M, int N, int K, float alpha, float beta, int pad) {
    int ar = ta ? K : M, ac = ta ? M : K, br = tb ? N : K, bc = tb ? K : N;
    int lda = ac + pad, ldb = bc + pad, ldc = N + pad;
    size_t na = (size_t)ar * lda, nb = (size_t)br * ldb, nc = (size_t)M * ldc;
    float *A = test_randn(&rng, na, 1.0f), *B = test_randn(&rng, nb, 1.0f);
    float *C0 = test_randn(&rng, nc, 1.0f), *C1 = test_zeros(nc), *T = test_zeros(nc);
    float *Aa = test_zeros(na), *Ba = test_zeros(nb);
    for (size_t i = 0; i < na; i++) Aa[i] = fabsf(A[i]);
    for (size_t i = 0; i < nb; i++) Ba[i] = fabsf(B[i]);
    for (size_t i = 0; i < nc; i++) T[i] = fabsf(C0[i]);
    if (beta == 0.0f) for (size_t i = 0; i < nc; i++) C0[i] = NAN;   /* must not be read */
    memcpy(C1, C0, nc * sizeof(float));
    ms_gemm(ta, tb, M, N, K, alpha, A, lda, B, ldb, beta, C0, ldc);
    ms_gemm_ref(ta, tb, M, N, K, alpha, A, lda, B, ldb, beta, C1, ldc);
    ms_gemm_ref(ta, tb, M, N, K, fabsf(alpha), Aa, lda, Ba, ldb, fabsf(beta), T, ldc);
    float *G0 = test_zeros((size_t)M * N), *G1 = test_zeros((size_t)M * N);
    int pad_ok = 1;
    double ratio = 0.0, u = ldexp(1.0, -24);
    for (int i = 0; i < M; i++) {
        memcpy(G0 + (size_t)i * N, C0 + (size_t)i * ldc, (size_t)N * sizeof(float));
        memcpy(G1 + (size_t)i * N, C1 + (size_t)i * ldc, (size_t)N * sizeof(float));
        for (int j = 0; j < N; j++) {
            size_t ij = (size_t)i * ldc + j;
            double bound = (K + 2) * u * T[ij] + u * fabs((double)C1[ij]) + 1e-30;
            double r = fabs((double)C0[ij] - C1[ij]) / bound;
            if (!(r <= ratio)) ratio = r;                 /* NaN counts as a failure */
        }
        /* padding columns (ldc > N) are never written: still the same bits as before */
        if (memcmp(C0 + (size_t)i * ldc + N, C1 + (size_t)i * ldc + N, (size_t)pad * sizeof(float))) pad_ok = 0;
    }
    TestErr e = test_err_f(G0, G1, (size_t)M * N);
    GemmErr g;
    g.rel_l2 = e.rel_l2; g.max_abs = e.max_abs; g.ratio = pad_ok ? ratio : INFINITY;
    ms_free_aligned(A); ms_free_aligned(B); ms_free_aligned(C0); ms_free_aligned(C1); ms_free_aligned(T);
    ms_free_aligned(Aa); ms_free_aligned(Ba); ms_free_aligned(G0); ms_free_aligned(G1);
    return g;
}

static void test_gemm_level(MsSimd level) {
    static const int sizes[] = { 1, 3, 7, 17, 33, 65, 100, 129 };
    const int ns = (int)(sizeof sizes / sizeof sizes[0]);
    ms_set_simd(level);
    for (int ta = 0; ta < 2; ta++)
        for (int tb = 0; tb < 2; tb++) {
            GemmErr worst = { 0.0, 0.0, 0.0 };
            double worst_rel = 0.0;
            int cases = 0, wm = 0, wn = 0, wk = 0;
            for (int im = 0; im < ns; im++)
                for (int in = 0; in < ns; in++)
                    for (int ik = 0; ik < ns; ik++) {
                        int c = im * 64 + in * 8 + ik;
                        float beta = c % 3 == 0 ? 0.0f : c % 3 == 1 ? 1.0f : -0.5f;
                        float alpha = c % 2 ? 0.7f : 1.0f;
                        GemmErr e = gemm_case(ta, tb, sizes[im], sizes[in], sizes[ik], alpha, beta, c % 5);
                        cases++;
                        if (!(e.rel_l2 <= worst_rel)) worst_rel = e.rel_l2;
                        if (!(e.ratio <= worst.ratio)) { worst = e; wm = sizes[im]; wn = sizes[in]; wk = sizes[ik]; }
                    }
            check(worst.ratio <= 1.0, "gemm %-8s tA=%d tB=%d %d cases: worst err/bound %.3f (M=%d N=%d K=%d, "
                  "max_abs %.2e); worst rel_l2 %.2e", ms_simd_name(level), ta, tb, cases, worst.ratio, wm, wn, wk,
                  worst.max_abs, worst_rel);
        }
    /* more than one K slice, N block and M block; SD-like shapes */
    static const int big[][3] = { { 200, 700, 800 }, { 77, 768, 768 }, { 16, 320, 1280 }, { 1, 1000, 300 } };
    for (size_t i = 0; i < sizeof big / sizeof big[0]; i++)
        for (int t = 0; t < 4; t++) {
            GemmErr e = gemm_case(t >> 1, t & 1, big[i][0], big[i][1], big[i][2], t == 3 ? 0.5f : 1.0f, t == 2 ? 0.0f : 0.25f, 3);
            check(e.ratio <= 1.0 && e.rel_l2 < 1e-6, "gemm %-8s tA=%d tB=%d M=%d N=%d K=%d: rel_l2 %.2e max_abs %.2e err/bound %.3f",
                  ms_simd_name(level), t >> 1, t & 1, big[i][0], big[i][1], big[i][2], e.rel_l2, e.max_abs, e.ratio);
        }
    /* each loop order of the driver (AVX-512 blocking): B resident (many rows, few columns,
     * several K slices) and blocked (many rows and columns); (200,700,800) is A resident */
    static const int orders[][3] = { { 200, 100, 800 }, { 700, 330, 384 } };
    for (size_t i = 0; i < 2; i++) {
        GemmErr e = gemm_case(0, 1, orders[i][0], orders[i][1], orders[i][2], 1.0f, 0.5f, 2);
        check(e.ratio <= 1.0 && e.rel_l2 < 1e-6, "gemm %-8s tA=0 tB=1 M=%d N=%d K=%d: rel_l2 %.2e max_abs %.2e err/bound %.3f",
              ms_simd_name(level), orders[i][0], orders[i][1], orders[i][2], e.rel_l2, e.max_abs, e.ratio);
    }
    /* K = 0: C = beta C */
    GemmErr e = gemm_case(0, 1, 5, 9, 0, 1.0f, 0.5f, 1);
    check(e.max_abs == 0.0, "gemm %-8s K=0 gives beta*C", ms_simd_name(level));
    ms_set_simd(MS_SIMD_AVX512);
}

/* ---- helpers ----------------------------------------------------------------------------- */
static float *copy_of(const float *x, size_t n) {
    float *y = test_zeros(n);
    memcpy(y, x, n * sizeof(float));
    return y;
}

/* ---- linear ------------------------------------------------------------------------------ */
static void test_linear(int N, int I, int O, int bias) {
    float *x = test_randn(&rng, (size_t)N * I, 1.0f), *w = test_randn(&rng, (size_t)O * I, 0.5f);
    float *b = bias ? test_randn(&rng, (size_t)O, 1.0f) : NULL;
    float *o0 = test_zeros((size_t)N * O), *o1 = test_zeros((size_t)N * O);
    char what[96];
    linear_forward(o0, x, w, b, N, I, O);
    linear_forward_ref(o1, x, w, b, N, I, O);
    snprintf(what, sizeof what, "linear fwd N=%d I=%d O=%d%s", N, I, O, bias ? " +b" : "");
    check_close(what, o0, o1, (size_t)N * O, 1e-6, 0);
    float *g = test_randn(&rng, (size_t)N * O, 1.0f);
    float *dx0 = test_randn(&rng, (size_t)N * I, 1.0f), *dw0 = test_randn(&rng, (size_t)O * I, 1.0f), *db0 = test_randn(&rng, (size_t)O, 1.0f);
    float *dx1 = copy_of(dx0, (size_t)N * I), *dw1 = copy_of(dw0, (size_t)O * I), *db1 = copy_of(db0, (size_t)O);
    linear_backward(dx0, dw0, db0, g, x, w, N, I, O);
    linear_backward_ref(dx1, dw1, db1, g, x, w, N, I, O);
    snprintf(what, sizeof what, "linear bwd dx N=%d I=%d O=%d", N, I, O);
    check_close(what, dx0, dx1, (size_t)N * I, 1e-6, 0);
    snprintf(what, sizeof what, "linear bwd dw N=%d I=%d O=%d", N, I, O);
    check_close(what, dw0, dw1, (size_t)O * I, 1e-6, 0);
    snprintf(what, sizeof what, "linear bwd db N=%d I=%d O=%d", N, I, O);
    check_close(what, db0, db1, (size_t)O, 1e-7, 0);
    ms_free_aligned(x); ms_free_aligned(w); ms_free_aligned(b); ms_free_aligned(o0); ms_free_aligned(o1);
    ms_free_aligned(g); ms_free_aligned(dx0); ms_free_aligned(dw0); ms_free_aligned(db0);
    ms_free_aligned(dx1); ms_free_aligned(dw1); ms_free_aligned(db1);
}

/* ---- conv2d ------------------------------------------------------------------------------ */
typedef struct { int N, C, Co, H, W, k, s, pt, pl, pb, pr; } ConvCase;

static int conv_ho(const ConvCase *c) { return (c->H + c->pt + c->pb - c->k) / c->s + 1; }
static int conv_wo(const ConvCase *c) { return (c->W + c->pl + c->pr - c->k) / c->s + 1; }

static void test_conv(const ConvCase *c, const char *tag) {
    int Ho = conv_ho(c), Wo = conv_wo(c);
    size_t nx = (size_t)c->N * c->C * c->H * c->W, nw = (size_t)c->Co * c->C * c->k * c->k, no = (size_t)c->N * c->Co * Ho * Wo;
    float *x = test_randn(&rng, nx, 1.0f), *w = test_randn(&rng, nw, 0.3f), *b = test_randn(&rng, (size_t)c->Co, 1.0f);
    float *o0 = test_zeros(no), *o1 = test_zeros(no);
    char what[128], geo[96];
    snprintf(geo, sizeof geo, "%s N%d C%d>%d %dx%d k%d s%d p(%d,%d,%d,%d)", tag, c->N, c->C, c->Co, c->H, c->W,
             c->k, c->s, c->pt, c->pl, c->pb, c->pr);
    conv2d_forward_pad(o0, x, w, b, c->N, c->C, c->Co, c->H, c->W, c->k, c->s, c->pt, c->pl, c->pb, c->pr);
    conv2d_forward_ref(o1, x, w, b, c->N, c->C, c->Co, c->H, c->W, c->k, c->s, c->pt, c->pl, c->pb, c->pr);
    snprintf(what, sizeof what, "conv fwd %s", geo);
    check_close(what, o0, o1, no, 1e-6, 0);
    float *g = test_randn(&rng, no, 1.0f);
    float *dx0 = test_randn(&rng, nx, 1.0f), *dw0 = test_randn(&rng, nw, 1.0f), *db0 = test_randn(&rng, (size_t)c->Co, 1.0f);
    float *dx1 = copy_of(dx0, nx), *dw1 = copy_of(dw0, nw), *db1 = copy_of(db0, (size_t)c->Co);
    conv2d_backward(dx0, dw0, db0, g, x, w, c->N, c->C, c->Co, c->H, c->W, c->k, c->s, c->pt, c->pl, c->pb, c->pr);
    conv2d_backward_ref(dx1, dw1, db1, g, x, w, c->N, c->C, c->Co, c->H, c->W, c->k, c->s, c->pt, c->pl, c->pb, c->pr);
    snprintf(what, sizeof what, "conv dx %s", geo);
    check_close(what, dx0, dx1, nx, 1e-6, 0);
    snprintf(what, sizeof what, "conv dw %s", geo);
    check_close(what, dw0, dw1, nw, 1e-6, 0);
    snprintf(what, sizeof what, "conv db %s", geo);
    check_close(what, db0, db1, (size_t)c->Co, 1e-7, 0);
    ms_free_aligned(x); ms_free_aligned(w); ms_free_aligned(b); ms_free_aligned(o0); ms_free_aligned(o1);
    ms_free_aligned(g); ms_free_aligned(dx0); ms_free_aligned(dw0); ms_free_aligned(db0);
    ms_free_aligned(dx1); ms_free_aligned(dw1); ms_free_aligned(db1);
}

static const ConvCase conv_cases[] = {
    { 2, 3, 5, 7, 9, 3, 1, 1, 1, 1, 1 },       /* odd, non-square, pad 1 */
    { 1, 4, 6, 9, 7, 3, 2, 1, 1, 1, 1 },       /* stride 2, pad 1 (UNet downsample) */
    { 2, 3, 4, 8, 10, 3, 2, 0, 0, 1, 1 },      /* VAE: F.pad (0,1,0,1) = bottom/right, stride 2 */
    { 1, 3, 4, 9, 8, 3, 2, 0, 1, 0, 1 },       /* (top,left,bottom,right) = (0,1,0,1) literally */
    { 2, 5, 7, 6, 11, 1, 1, 0, 0, 0, 0 },      /* 1x1: plain GEMM */
    { 1, 5, 3, 7, 6, 1, 2, 0, 0, 0, 0 },       /* 1x1 stride 2 */
    { 1, 2, 3, 5, 4, 3, 1, 3, 2, 3, 2 },       /* pad > k-1: general dx path at stride 1 */
    { 1, 50, 20, 9, 13, 3, 1, 1, 1, 1, 1 },    /* C*k*k = 450: two K slices */
    { 3, 4, 33, 5, 5, 3, 1, 0, 0, 0, 0 },      /* unpadded, Co > one register tile */
};

/* ---- threads: 1 vs 2, bitwise ------------------------------------------------------------ */
static void test_threads(void) {
    int M = 301, N = 333, K = 405;
    float *A = test_randn(&rng, (size_t)M * K, 1.0f), *B = test_randn(&rng, (size_t)K * N, 1.0f);
    float *C1 = test_zeros((size_t)M * N), *C2 = test_zeros((size_t)M * N);
    for (int t = 0; t < 4; t++) {
        int ta = t >> 1, tb = t & 1;
        char what[64];
        ms_set_threads(1);
        ms_gemm(ta, tb, M, N, K, 1.0f, A, ta ? M : K, B, tb ? K : N, 0.0f, C1, N);
        ms_set_threads(2);
        ms_gemm(ta, tb, M, N, K, 1.0f, A, ta ? M : K, B, tb ? K : N, 0.0f, C2, N);
        snprintf(what, sizeof what, "gemm 1 vs 2 threads tA=%d tB=%d", ta, tb);
        check_bitwise(what, C1, C2, (size_t)M * N);
    }
    /* the other loop orders: B resident, blocked */
    static const int sh[][3] = { { 600, 200, 800 }, { 700, 330, 384 } };
    for (int i = 0; i < 2; i++) {
        char what[64];
        float *a2 = test_randn(&rng, (size_t)sh[i][0] * sh[i][2], 1.0f), *b2 = test_randn(&rng, (size_t)sh[i][1] * sh[i][2], 1.0f);
        float *c1 = test_zeros((size_t)sh[i][0] * sh[i][1]), *c2 = test_zeros((size_t)sh[i][0] * sh[i][1]);
        ms_set_threads(1); ms_gemm(0, 1, sh[i][0], sh[i][1], sh[i][2], 1.0f, a2, sh[i][2], b2, sh[i][2], 0.0f, c1, sh[i][1]);
        ms_set_threads(2); ms_gemm(0, 1, sh[i][0], sh[i][1], sh[i][2], 1.0f, a2, sh[i][2], b2, sh[i][2], 0.0f, c2, sh[i][1]);
        snprintf(what, sizeof what, "gemm 1 vs 2 threads M=%d N=%d K=%d", sh[i][0], sh[i][1], sh[i][2]);
        check_bitwise(what, c1, c2, (size_t)sh[i][0] * sh[i][1]);
        ms_free_aligned(a2); ms_free_aligned(b2); ms_free_aligned(c1); ms_free_aligned(c2);
    }
    /* small M: parallel over column panels instead of row blocks */
    ms_set_threads(1); ms_gemm(0, 1, 9, N, K, 1.0f, A, K, B, K, 0.0f, C1, N);
    ms_set_threads(2); ms_gemm(0, 1, 9, N, K, 1.0f, A, K, B, K, 0.0f, C2, N);
    check_bitwise("gemm 1 vs 2 threads M=9", C1, C2, (size_t)9 * N);

    /* linear forward + backward (all three grads) */
    int Nl = 150, I = 200, O = 170;
    float *x = test_randn(&rng, (size_t)Nl * I, 1.0f), *w = test_randn(&rng, (size_t)O * I, 1.0f), *b = test_randn(&rng, (size_t)O, 1.0f);
    float *g = test_randn(&rng, (size_t)Nl * O, 1.0f);
    float *r[2][4];
    for (int th = 0; th < 2; th++) {
        ms_set_threads(th + 1);
        r[th][0] = test_zeros((size_t)Nl * O); r[th][1] = test_zeros((size_t)Nl * I);
        r[th][2] = test_zeros((size_t)O * I); r[th][3] = test_zeros((size_t)O);
        linear_forward(r[th][0], x, w, b, Nl, I, O);
        linear_backward(r[th][1], r[th][2], r[th][3], g, x, w, Nl, I, O);
    }
    check_bitwise("linear fwd 1 vs 2 threads", r[0][0], r[1][0], (size_t)Nl * O);
    check_bitwise("linear dx 1 vs 2 threads", r[0][1], r[1][1], (size_t)Nl * I);
    check_bitwise("linear dw 1 vs 2 threads", r[0][2], r[1][2], (size_t)O * I);
    check_bitwise("linear db 1 vs 2 threads", r[0][3], r[1][3], (size_t)O);
    for (int th = 0; th < 2; th++) for (int i = 0; i < 4; i++) ms_free_aligned(r[th][i]);

    /* conv: stride 1 (implicit transposed conv for dx) and stride 2 (col2im path) */
    static const ConvCase cc[] = { { 2, 16, 24, 19, 21, 3, 1, 1, 1, 1, 1 }, { 2, 16, 24, 19, 21, 3, 2, 0, 0, 1, 1 } };
    for (int ci = 0; ci < 2; ci++) {
        const ConvCase *c = &cc[ci];
        int Ho = conv_ho(c), Wo = conv_wo(c);
        size_t nx = (size_t)c->N * c->C * c->H * c->W, nw = (size_t)c->Co * c->C * 9, no = (size_t)c->N * c->Co * Ho * Wo;
        float *cx = test_randn(&rng, nx, 1.0f), *cw = test_randn(&rng, nw, 1.0f), *cb = test_randn(&rng, (size_t)c->Co, 1.0f);
        float *cg = test_randn(&rng, no, 1.0f);
        float *q[2][4];
        for (int th = 0; th < 2; th++) {
            ms_set_threads(th + 1);
            q[th][0] = test_zeros(no); q[th][1] = test_zeros(nx); q[th][2] = test_zeros(nw); q[th][3] = test_zeros((size_t)c->Co);
            conv2d_forward_pad(q[th][0], cx, cw, cb, c->N, c->C, c->Co, c->H, c->W, 3, c->s, c->pt, c->pl, c->pb, c->pr);
            conv2d_backward(q[th][1], q[th][2], q[th][3], cg, cx, cw, c->N, c->C, c->Co, c->H, c->W, 3, c->s, c->pt, c->pl, c->pb, c->pr);
        }
        static const char *names[4] = { "fwd", "dx", "dw", "db" };
        static const size_t dummy = 0; (void)dummy;
        size_t sz[4] = { no, nx, nw, (size_t)c->Co };
        for (int i = 0; i < 4; i++) {
            char what[64];
            snprintf(what, sizeof what, "conv s%d %s 1 vs 2 threads", c->s, names[i]);
            check_bitwise(what, q[0][i], q[1][i], sz[i]);
        }
        for (int th = 0; th < 2; th++) for (int i = 0; i < 4; i++) ms_free_aligned(q[th][i]);
        ms_free_aligned(cx); ms_free_aligned(cw); ms_free_aligned(cb); ms_free_aligned(cg);
    }
    ms_set_threads(0);
    ms_free_aligned(A); ms_free_aligned(B); ms_free_aligned(C1); ms_free_aligned(C2);
    ms_free_aligned(x); ms_free_aligned(w); ms_free_aligned(b); ms_free_aligned(g);
}

/* ---- fast paths vs the plain packed driver, bitwise ---------------------------------------- */
/* ms_gemm_set_fast() turns each fast path on alone (in-place A, half-width tails, SIMD packing,
 * the transposed small-M path, half-height row tails) and all together; every result must have
 * the bits of the plain driver: same K slices, same FMA sequence per element. Shapes: odd sizes
 * and tails of every tile (MR 14/7/6, NR 32/16), small M (1, 13, 77, 154; the 80-wide path: 66, 77,
 * 80, 150, 154, N not a multiple of its 5 rows, K = 1024: 4-KiB rows) with N >= M, padded
 * leading dimensions, beta 0 (C is NaN and must not be read) and 0.5; convs whose panels lie
 * in one output row (Wo 32, 64) or straddle rows, with borders, asymmetric padding and k = 1. */
static int fast_gemm_same(int flags, int ta, int tb, int M, int N, int K, float alpha, float beta, int pad) {
    int ar = ta ? K : M, ac = ta ? M : K, br = tb ? N : K, bc = tb ? K : N;
    int lda = ac + pad, ldb = bc + pad, ldc = N + pad;
    size_t nc = (size_t)M * ldc;
    float *A = test_randn(&rng, (size_t)ar * lda, 1.0f), *B = test_randn(&rng, (size_t)br * ldb, 1.0f);
    float *C0 = test_randn(&rng, nc, 1.0f), *C1 = test_zeros(nc);
    if (beta == 0.0f) for (size_t i = 0; i < nc; i++) C0[i] = NAN;
    memcpy(C1, C0, nc * sizeof(float));
    ms_gemm_set_fast(0);
    ms_gemm(ta, tb, M, N, K, alpha, A, lda, B, ldb, beta, C0, ldc);
    ms_gemm_set_fast(flags);
    ms_gemm(ta, tb, M, N, K, alpha, A, lda, B, ldb, beta, C1, ldc);
    ms_gemm_set_fast(MS_GEMM_FAST_ALL);
    int same = !memcmp(C0, C1, nc * sizeof(float));
    ms_free_aligned(A); ms_free_aligned(B); ms_free_aligned(C0); ms_free_aligned(C1);
    return same;
}

static int fast_conv_same(int flags, const ConvCase *c) {
    int Ho = conv_ho(c), Wo = conv_wo(c), same = 1;
    size_t nx = (size_t)c->N * c->C * c->H * c->W, nw = (size_t)c->Co * c->C * c->k * c->k, no = (size_t)c->N * c->Co * Ho * Wo;
    float *x = test_randn(&rng, nx, 1.0f), *w = test_randn(&rng, nw, 1.0f), *b = test_randn(&rng, (size_t)c->Co, 1.0f);
    float *g = test_randn(&rng, no, 1.0f), *q[2][3];
    for (int f = 0; f < 2; f++) {
        ms_gemm_set_fast(f ? flags : 0);
        q[f][0] = test_zeros(no); q[f][1] = test_zeros(nx); q[f][2] = test_zeros(nw);
        conv2d_forward_pad(q[f][0], x, w, b, c->N, c->C, c->Co, c->H, c->W, c->k, c->s, c->pt, c->pl, c->pb, c->pr);
        conv2d_backward(q[f][1], q[f][2], NULL, g, x, w, c->N, c->C, c->Co, c->H, c->W, c->k, c->s, c->pt, c->pl, c->pb, c->pr);
    }
    ms_gemm_set_fast(MS_GEMM_FAST_ALL);
    same = !memcmp(q[0][0], q[1][0], no * sizeof(float)) && !memcmp(q[0][1], q[1][1], nx * sizeof(float)) &&
           !memcmp(q[0][2], q[1][2], nw * sizeof(float));
    for (int f = 0; f < 2; f++) for (int i = 0; i < 3; i++) ms_free_aligned(q[f][i]);
    ms_free_aligned(x); ms_free_aligned(w); ms_free_aligned(b); ms_free_aligned(g);
    return same;
}

static void test_fast_paths(MsSimd level) {
    static const int flag_sets[] = { MS_GEMM_FAST_INPLACE_A, MS_GEMM_FAST_HALF, MS_GEMM_FAST_PACK,
                                     MS_GEMM_FAST_SMALL_M, MS_GEMM_FAST_SHORT, MS_GEMM_FAST_ALL };
    static const int sizes[] = { 1, 6, 13, 14, 15, 16, 17, 31, 32, 33, 48, 77, 100 };
    static const int small[][3] = { { 1, 40, 33 }, { 13, 16, 16 }, { 77, 320, 768 }, { 77, 97, 130 },
                                    { 154, 160, 400 }, { 77, 1280, 800 }, { 77, 203, 1024 }, { 66, 66, 17 },
                                    { 80, 81, 800 }, { 150, 171, 1030 } };
    static const ConvCase convs[] = {
        { 1, 5, 7, 64, 64, 3, 1, 1, 1, 1, 1 },     /* panels in one output row, both borders */
        { 2, 9, 20, 32, 32, 3, 1, 1, 1, 1, 1 },    /* one panel per row */
        { 1, 6, 16, 20, 40, 3, 1, 0, 2, 1, 0 },    /* Wo 40: straddling panels, asymmetric pad */
        { 1, 41, 30, 8, 8, 3, 1, 1, 1, 1, 1 },     /* 4 output rows per panel, C*9 = 369: 2 K slices */
        { 3, 5, 6, 11, 13, 3, 1, 1, 0, 1, 2 },     /* 3 images of 11x13 outputs: weight-gradient K slices
                                                      start mid-row and cross images */
        { 1, 7, 9, 33, 64, 1, 1, 0, 0, 0, 0 },     /* 1x1 */
        { 1, 4, 5, 17, 64, 3, 2, 1, 1, 1, 1 },     /* stride 2 */
    };
    ms_set_simd(level);
    for (size_t f = 0; f < sizeof flag_sets / sizeof flag_sets[0]; f++) {
        int fl = flag_sets[f], bad = 0, n = 0;
        for (int t = 0; t < 4; t++)
            for (size_t im = 0; im < sizeof sizes / sizeof sizes[0]; im++)
                for (size_t in = 0; in < sizeof sizes / sizeof sizes[0]; in += 2) {
                    int M = sizes[im], N = sizes[in], K = sizes[(im + in) % 13] * 5 + 3;
                    if (!fast_gemm_same(fl, t >> 1, t & 1, M, N, K, n % 3 ? 1.0f : 0.75f, n % 2 ? 0.5f : 0.0f, n % 3)) bad++;
                    n++;
                }
        for (size_t i = 0; i < sizeof small / sizeof small[0]; i++, n++)
            if (!fast_gemm_same(fl, 0, 1, small[i][0], small[i][1], small[i][2], 1.0f, i % 2 ? 1.0f : 0.0f, (int)i % 2)) bad++;
        for (size_t i = 0; i < sizeof convs / sizeof convs[0]; i++, n++)
            if (!fast_conv_same(fl, &convs[i])) bad++;
        check(bad == 0, "gemm/conv %-8s fast paths 0x%x vs plain driver: %d of %d cases bitwise equal",
              ms_simd_name(level), fl, n - bad, n);
    }
    /* the small-M path threads over C^T's grid: 1 vs 2 threads */
    int M = 77, N = 700, K = 768;
    float *A = test_randn(&rng, (size_t)M * K, 1.0f), *B = test_randn(&rng, (size_t)N * K, 1.0f);
    float *C1 = test_zeros((size_t)M * N), *C2 = test_zeros((size_t)M * N);
    ms_set_threads(1); ms_gemm(0, 1, M, N, K, 1.0f, A, K, B, K, 0.0f, C1, N);
    ms_set_threads(2); ms_gemm(0, 1, M, N, K, 1.0f, A, K, B, K, 0.0f, C2, N);
    ms_set_threads(0);
    char what[64];
    snprintf(what, sizeof what, "gemm %s small M=77 1 vs 2 threads", ms_simd_name(level));
    check_bitwise(what, C1, C2, (size_t)M * N);
    ms_free_aligned(A); ms_free_aligned(B); ms_free_aligned(C1); ms_free_aligned(C2);
}

/* ---- gradient checks: L = sum(r * f(x)) in double ------------------------------------------ */
/* linear and conv are linear in each of x, w, b, so the central difference is exact for any
 * step; a large step keeps the float rounding of f (about 1e-7 |f| per output) small next to
 * the change in L. */
#define EPS 0.5f
typedef struct {
    int is_conv;
    ConvCase c;             /* conv geometry */
    int N, I, O;            /* linear dims */
    float *x, *w, *b, *r, *out;
    size_t nout;
} GradCtx;

static double grad_loss(void *p) {
    GradCtx *g = (GradCtx *)p;
    if (g->is_conv)
        conv2d_forward_pad(g->out, g->x, g->w, g->b, g->c.N, g->c.C, g->c.Co, g->c.H, g->c.W, g->c.k, g->c.s,
                           g->c.pt, g->c.pl, g->c.pb, g->c.pr);
    else
        linear_forward(g->out, g->x, g->w, g->b, g->N, g->I, g->O);
    double L = 0.0;
    for (size_t i = 0; i < g->nout; i++) L += (double)g->r[i] * g->out[i];
    return L;
}

static void gradcheck_case(GradCtx *g, size_t nx, size_t nw, size_t nb, const char *tag) {
    float *dx = test_zeros(nx), *dw = test_zeros(nw), *db = test_zeros(nb);
    if (g->is_conv)
        conv2d_backward(dx, dw, db, g->r, g->x, g->w, g->c.N, g->c.C, g->c.Co, g->c.H, g->c.W, g->c.k, g->c.s,
                        g->c.pt, g->c.pl, g->c.pb, g->c.pr);
    else
        linear_backward(dx, dw, db, g->r, g->x, g->w, g->N, g->I, g->O);
    double ex = gradcheck(grad_loss, g, g->x, dx, nx, EPS);
    double ew = gradcheck(grad_loss, g, g->w, dw, nw, EPS);
    double eb = gradcheck(grad_loss, g, g->b, db, nb, EPS);
    check(ex < 1e-3, "gradcheck %s d/dx: worst rel err %.2e", tag, ex);
    check(ew < 1e-3, "gradcheck %s d/dw: worst rel err %.2e", tag, ew);
    check(eb < 1e-3, "gradcheck %s d/db: worst rel err %.2e", tag, eb);
    ms_free_aligned(dx); ms_free_aligned(dw); ms_free_aligned(db);
}

static void test_gradchecks(void) {
    GradCtx g;
    memset(&g, 0, sizeof g);
    g.N = 5; g.I = 7; g.O = 6; g.nout = (size_t)g.N * g.O;
    g.x = test_randn(&rng, (size_t)g.N * g.I, 1.0f); g.w = test_randn(&rng, (size_t)g.O * g.I, 1.0f);
    g.b = test_randn(&rng, (size_t)g.O, 1.0f); g.r = test_randn(&rng, g.nout, 1.0f); g.out = test_zeros(g.nout);
    gradcheck_case(&g, (size_t)g.N * g.I, (size_t)g.O * g.I, (size_t)g.O, "linear 5x7->6");
    ms_free_aligned(g.x); ms_free_aligned(g.w); ms_free_aligned(g.b); ms_free_aligned(g.r); ms_free_aligned(g.out);

    static const ConvCase cc[] = { { 2, 3, 4, 6, 5, 3, 1, 1, 1, 1, 1 }, { 1, 3, 4, 7, 6, 3, 2, 0, 0, 1, 1 }, { 2, 3, 2, 4, 5, 1, 1, 0, 0, 0, 0 } };
    for (int i = 0; i < 3; i++) {
        memset(&g, 0, sizeof g);
        g.is_conv = 1; g.c = cc[i];
        size_t nx = (size_t)g.c.N * g.c.C * g.c.H * g.c.W, nw = (size_t)g.c.Co * g.c.C * g.c.k * g.c.k;
        g.nout = (size_t)g.c.N * g.c.Co * conv_ho(&g.c) * conv_wo(&g.c);
        g.x = test_randn(&rng, nx, 1.0f); g.w = test_randn(&rng, nw, 1.0f);
        g.b = test_randn(&rng, (size_t)g.c.Co, 1.0f); g.r = test_randn(&rng, g.nout, 1.0f); g.out = test_zeros(g.nout);
        char tag[64];
        snprintf(tag, sizeof tag, "conv k%d s%d p(%d,%d,%d,%d)", g.c.k, g.c.s, g.c.pt, g.c.pl, g.c.pb, g.c.pr);
        gradcheck_case(&g, nx, nw, (size_t)g.c.Co, tag);
        ms_free_aligned(g.x); ms_free_aligned(g.w); ms_free_aligned(g.b); ms_free_aligned(g.r); ms_free_aligned(g.out);
    }
}

/* AdamW's elementwise update: the SIMD level's path vs the scalar twin, and 1 vs 2 threads, to
 * the bit (n spans several parallel chunks and a ragged tail; zero gradients and moments, tiny
 * v near eps, large steps), after a few steps so that the moments matter. */
static void test_adamw(MsSimd level) {
    const size_t n = 3 * 16384 + 37;             /* 3 parallel chunks (OPS_CHUNK) and a tail */
    const int threads = ms_get_threads();
    float *p[3], *m[3], *v[3], *g = test_randn(&rng, n, 1.0f);
    for (size_t i = 0; i < n; i += 7) g[i] = 0.0f;
    for (size_t i = 3; i < n; i += 11) g[i] *= 1e-6f;
    for (int r = 0; r < 3; r++) { p[r] = test_randn(&rng, n, 1.0f); m[r] = test_zeros(n); v[r] = test_zeros(n); }
    memcpy(p[1], p[0], n * sizeof(float)); memcpy(p[2], p[0], n * sizeof(float));
    ms_set_simd(level);
    for (int step = 1; step <= 3; step++) {
        MsAdamwConst k = { (float)(1.0 - 1e-3 * 0.01), 0.9f, (float)(1.0 - 0.9), 0.999f, (float)(1.0 - 0.999),
                           (float)sqrt(1.0 - pow(0.999, step)), 1e-8f, (float)(-(1e-3 / (1.0 - pow(0.9, step)))) };
        ms_adamw_update_ref(p[0], g, m[0], v[0], n, &k);
        ms_set_threads(1); ms_adamw_update(p[1], g, m[1], v[1], n, &k);
        ms_set_threads(2); ms_adamw_update(p[2], g, m[2], v[2], n, &k);
    }
    char what[64];
    snprintf(what, sizeof what, "adamw %s 1 thread vs _ref", ms_simd_name(level));
    check_bitwise(what, p[1], p[0], n);
    check_bitwise("  ... its moments m", m[1], m[0], n);
    check_bitwise("  ... its moments v", v[1], v[0], n);
    snprintf(what, sizeof what, "adamw %s 2 threads vs 1", ms_simd_name(level));
    check_bitwise(what, p[2], p[1], n);
    ms_set_threads(threads);
    for (int r = 0; r < 3; r++) { ms_free_aligned(p[r]); ms_free_aligned(m[r]); ms_free_aligned(v[r]); }
    ms_free_aligned(g);
}

int main(void) {
    ms_rng_seed(&rng, 1234);
    MsSimd hw = ms_simd_detected();
    printf("test_kernels: SIMD detected %s, threads %d\n", ms_simd_name(hw), ms_get_threads());
    static const MsSimd levels[] = { MS_SIMD_SCALAR, MS_SIMD_NEON, MS_SIMD_AVX2, MS_SIMD_AVX512 };
    for (int i = 0; i < 4; i++) {
        MsSimd l = levels[i];
        if (l > hw) continue;
        ms_set_simd(l);
        if (ms_simd() != l) continue;               /* not a level of this architecture */
        test_gemm_level(l);
        ms_set_simd(l);
        for (size_t c = 0; c < sizeof conv_cases / sizeof conv_cases[0]; c++) test_conv(&conv_cases[c], ms_simd_name(l));
        test_linear(33, 65, 17, l & 1);
        test_linear(1, 100, 129, 1);
        test_fast_paths(l);
        test_adamw(l);
        ms_set_simd(MS_SIMD_AVX512);
    }
    test_linear(77, 768, 320, 1);
    test_threads();
    test_gradchecks();
    ms_gemm_scratch_free();
    return test_summary("test_kernels");
}
