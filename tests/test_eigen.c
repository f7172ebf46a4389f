/* tests/test_eigen.c — the fast symmetric eigen-solver (mixshow.c ms_sym_eigen: Householder
 * tridiagonalisation + implicit QL) and the double kernels under it (tensor.c):
 *   - ms_gemm_f64_acc and ms_gram_f64_acc == their scalar twins bit for bit (odd sizes across
 *     the blocks, every SIMD level, 1 and 2 threads), and the twins == long-double sums;
 *   - eigenvalues == the Jacobi twin (ms_sym_eigen_ref) to 1e-12 ||A||, ||A - Q L Q^T||_F and
 *     ||Q^T Q - I|| to O(n eps), ascending order, on random symmetric, SPD, rank-deficient
 *     Grams (rows << n, like the cross-attention K/V problems), ill-conditioned (cond 1e9, 1e12),
 *     clustered, diagonal and already-tridiagonal matrices, sizes 1 .. 257 (odd included);
 *   - 1 vs 2 threads and every SIMD level: the same bits;
 *   - the gram solve with one shared decomposition: the minimiser (gradient W G - C ~ 0 on the
 *     range of G) whose change lies in range(G). */
#include "tests/test.h"

#include <float.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static double *dalloc(size_t n) { return (double *)calloc(n ? n : 1, sizeof(double)); }

static void test_gemm(void) {
    static const int sz[][3] = { { 1, 1, 1 }, { 5, 17, 3 }, { 37, 45, 29 }, { 130, 300, 270 }, { 64, 16, 513 } };
    MsRng r;
    ms_rng_seed(&r, 11);
    const MsSimd top = ms_simd_detected();
    for (size_t c = 0; c < sizeof sz / sizeof sz[0]; c++) {
        const int M = sz[c][0], N = sz[c][1], K = sz[c][2];
        double *A = dalloc((size_t)M * K), *B = dalloc((size_t)K * N), *C0 = dalloc((size_t)M * N);
        double *Cr = dalloc((size_t)M * N), *Cf = dalloc((size_t)M * N);
        for (size_t i = 0; i < (size_t)M * K; i++) A[i] = ms_rng_normal(&r);
        for (size_t i = 0; i < (size_t)K * N; i++) B[i] = ms_rng_normal(&r);
        for (size_t i = 0; i < (size_t)M * N; i++) C0[i] = ms_rng_normal(&r);
        memcpy(Cr, C0, sizeof(double) * M * N);
        ms_gemm_f64_acc_ref(Cr, A, B, M, N, K);
        int same = 1;
        for (int lv = 0; lv <= (int)top; lv++)
            for (int t = 1; t <= 2; t++) {
                ms_set_simd((MsSimd)lv);
                ms_set_threads(t);
                memcpy(Cf, C0, sizeof(double) * M * N);
                ms_gemm_f64_acc(Cf, A, B, M, N, K);
                same &= !memcmp(Cf, Cr, sizeof(double) * M * N);
            }
        ms_set_simd(top);
        ms_set_threads(0);
        /* and the twin itself against a sum in long double */
        double worst = 0;
        for (int i = 0; i < M; i++)
            for (int j = 0; j < N; j++) {
                long double s = C0[(size_t)i * N + j], a = 0;
                for (int k = 0; k < K; k++) { s += (long double)A[(size_t)i * K + k] * B[(size_t)k * N + j]; a += fabsl((long double)A[(size_t)i * K + k] * B[(size_t)k * N + j]); }
                worst = fmax(worst, (double)(fabsl(s - Cr[(size_t)i * N + j]) / (a + fabsl((long double)C0[(size_t)i * N + j]))));
            }
        check(same && worst <= K * DBL_EPSILON, "gemm_f64 %dx%dx%d: every SIMD level and 1/2 threads == scalar twin bitwise (%d); "
              "twin vs long double %.2e (<= K eps)", M, N, K, same, worst);
        free(A); free(B); free(C0); free(Cr); free(Cf);
    }
}

/* ms_gram_f64_acc: == its scalar twin bit for bit (the lower triangle untouched), both to the
 * exact sum (long double) within the rows' rounding. */
static void test_gram_acc(void) {
    static const int sz[][2] = { { 1, 1 }, { 5, 3 }, { 17, 130 }, { 67, 257 }, { 131, 129 }, { 40, 1000 } };
    MsRng r;
    ms_rng_seed(&r, 13);
    const MsSimd top = ms_simd_detected();
    for (size_t c = 0; c < sizeof sz / sizeof sz[0]; c++) {
        const int d = sz[c][0], rows = sz[c][1];
        float *X = (float *)malloc(sizeof(float) * rows * d);
        double *G0 = dalloc((size_t)d * d), *Gr = dalloc((size_t)d * d), *Gf = dalloc((size_t)d * d);
        for (int i = 0; i < rows * d; i++) X[i] = (float)ms_rng_normal(&r);
        for (int i = 0; i < d * d; i++) G0[i] = ms_rng_normal(&r);
        memcpy(Gr, G0, sizeof(double) * d * d);
        ms_gram_f64_acc_ref(Gr, X, (size_t)rows, d);
        int same = 1;
        for (int lv = 0; lv <= (int)top; lv++)
            for (int t = 1; t <= 2; t++) {
                ms_set_simd((MsSimd)lv);
                ms_set_threads(t);
                memcpy(Gf, G0, sizeof(double) * d * d);
                ms_gram_f64_acc(Gf, X, (size_t)rows, d);
                same &= !memcmp(Gf, Gr, sizeof(double) * d * d);
            }
        ms_set_simd(top);
        ms_set_threads(0);
        double worst = 0;
        int lower = 1;
        for (int i = 0; i < d; i++)
            for (int j = 0; j < d; j++) {
                if (j < i) { lower &= Gr[(size_t)i * d + j] == G0[(size_t)i * d + j]; continue; }
                long double e = G0[(size_t)i * d + j], a = fabs(G0[(size_t)i * d + j]);
                for (int k = 0; k < rows; k++) {
                    long double p = (long double)X[(size_t)k * d + i] * X[(size_t)k * d + j];
                    e += p; a += fabsl(p);
                }
                worst = fmax(worst, (double)(fabsl(e - Gr[(size_t)i * d + j]) / a));
            }
        check(same && lower && worst <= rows * DBL_EPSILON, "gram_f64 d %d rows %d: every SIMD level and 1/2 threads == scalar twin "
              "bitwise (%d), lower triangle untouched (%d); twin vs long double %.2e (<= rows eps)", d, rows, same, lower, worst);
        free(X); free(G0); free(Gr); free(Gf);
    }
}

/* Q (n,n) random orthogonal: a product of n random reflectors applied to I. */
static void rand_orth(MsRng *r, double *Q, int n) {
    double *u = dalloc((size_t)n);
    memset(Q, 0, sizeof(double) * n * n);
    for (int i = 0; i < n; i++) Q[(size_t)i * n + i] = 1.0;
    for (int h = 0; h < n; h++) {
        double uu = 0;
        for (int i = 0; i < n; i++) { u[i] = ms_rng_normal(r); uu += u[i] * u[i]; }
        for (int j = 0; j < n; j++) {          /* Q <- (I - 2 u u^T / u^T u) Q, column j */
            double t = 0;
            for (int i = 0; i < n; i++) t += u[i] * Q[(size_t)i * n + j];
            t *= 2.0 / uu;
            for (int i = 0; i < n; i++) Q[(size_t)i * n + j] -= t * u[i];
        }
    }
    free(u);
}

/* A = Q diag(lam) Q^T, symmetrised exactly. */
static void from_spectrum(MsRng *r, double *A, const double *lam, int n) {
    double *Q = dalloc((size_t)n * n);
    rand_orth(r, Q, n);
    for (int i = 0; i < n; i++)
        for (int j = 0; j <= i; j++) {
            double s = 0;
            for (int k = 0; k < n; k++) s += Q[(size_t)i * n + k] * lam[k] * Q[(size_t)j * n + k];
            A[(size_t)i * n + j] = A[(size_t)j * n + i] = s;
        }
    free(Q);
}

/* G = X^T X for X (rows, n) normal. */
static void gram(MsRng *r, double *A, int rows, int n) {
    double *X = dalloc((size_t)rows * n);
    for (size_t i = 0; i < (size_t)rows * n; i++) X[i] = ms_rng_normal(r);
    for (int i = 0; i < n; i++)
        for (int j = 0; j <= i; j++) {
            double s = 0;
            for (int k = 0; k < rows; k++) s += X[(size_t)k * n + i] * X[(size_t)k * n + j];
            A[(size_t)i * n + j] = A[(size_t)j * n + i] = s;
        }
    free(X);
}

static void check_eigen(const char *what, const double *A0, int n) {
    const size_t nn = (size_t)n * n;
    double *A = dalloc(nn), *V = dalloc(nn), *w = dalloc((size_t)n), *Vr = dalloc(nn), *wr = dalloc((size_t)n);
    double *V2 = dalloc(nn), *w2 = dalloc((size_t)n);
    memcpy(A, A0, nn * sizeof(double));
    ms_set_threads(1);
    MsStatus s1 = ms_sym_eigen(A, n, w, V);
    memcpy(A, A0, nn * sizeof(double));
    ms_set_threads(2);
    MsStatus s2 = ms_sym_eigen(A, n, w2, V2);
    int same = !s1 && !s2 && !memcmp(w, w2, (size_t)n * sizeof(double)) && !memcmp(V, V2, nn * sizeof(double));
    const MsSimd top = ms_simd_detected();
    for (int lv = 0; lv < (int)top && same; lv++) {      /* lower SIMD levels, 2 threads */
        ms_set_simd((MsSimd)lv);
        memcpy(A, A0, nn * sizeof(double));
        same &= ms_sym_eigen(A, n, w2, V2) == MS_OK && !memcmp(w, w2, (size_t)n * sizeof(double)) && !memcmp(V, V2, nn * sizeof(double));
    }
    ms_set_simd(top);
    ms_set_threads(0);
    memcpy(A, A0, nn * sizeof(double));
    MsStatus sr = ms_sym_eigen_ref(A, n, wr, Vr);
    double nrm = 0, fro = 0, ev = 0, rec = 0, orth = 0;
    int sorted = 1;
    for (int i = 0; i < n; i++) nrm = fmax(nrm, fabs(wr[i]));
    for (size_t i = 0; i < nn; i++) fro += A0[i] * A0[i];
    fro = sqrt(fro);
    for (int i = 0; i < n; i++) {
        ev = fmax(ev, fabs(w[i] - wr[i]));
        if (i && w[i] < w[i - 1]) sorted = 0;
        for (int j = 0; j < n; j++) {
            double a = 0, o = 0;
            for (int k = 0; k < n; k++) { a += V[(size_t)i * n + k] * w[k] * V[(size_t)j * n + k]; o += V[(size_t)k * n + i] * V[(size_t)k * n + j]; }
            rec += (a - A0[(size_t)i * n + j]) * (a - A0[(size_t)i * n + j]);
            orth = fmax(orth, fabs(o - (i == j)));
        }
    }
    rec = fro > 0 ? sqrt(rec) / fro : sqrt(rec);
    ev = nrm > 0 ? ev / nrm : ev;
    const double tol = 2.0 * (n + 1) * DBL_EPSILON;
    check(!s1 && !sr && ev <= 1e-12 && rec <= tol && orth <= tol && sorted && same,
          "eigen %-34s n %3d: |w - w_jacobi| %.1e ||A||, ||A - QLQ^T||_F %.1e, |Q^TQ - I| %.1e (<= %.1e), ascending %d, "
          "1/2 threads + SIMD levels bitwise %d", what, n, ev, rec, orth, tol, sorted, same);
    free(A); free(V); free(w); free(Vr); free(wr); free(V2); free(w2);
}

static void test_eigen(void) {
    MsRng r;
    ms_rng_seed(&r, 7);
    static const int sizes[] = { 1, 2, 3, 23, 64, 101, 257 };
    for (size_t si = 0; si < sizeof sizes / sizeof sizes[0]; si++) {
        const int n = sizes[si];
        const size_t nn = (size_t)n * n;
        double *A = dalloc(nn), *lam = dalloc((size_t)n);
        char what[64];
        for (int i = 0; i < n; i++) for (int j = 0; j <= i; j++) A[(size_t)i * n + j] = A[(size_t)j * n + i] = ms_rng_normal(&r);
        check_eigen("random symmetric (indefinite)", A, n);
        gram(&r, A, 2 * n + 3, n);
        check_eigen("SPD Gram, 2n+3 rows", A, n);
        if (n >= 23) {
            gram(&r, A, 5, n);
            check_eigen("rank 5 Gram (under-determined)", A, n);
            for (int e = 9; e <= 12; e += 3) {
                for (int i = 0; i < n; i++) lam[i] = pow(10.0, -(double)e * i / (n - 1));
                from_spectrum(&r, A, lam, n);
                snprintf(what, sizeof what, "SPD, cond 1e%d", e);
                check_eigen(what, A, n);
            }
            for (int i = 0; i < n; i++) lam[i] = (double)(i % 3) - 1.0 + (i % 5 == 0 ? 1e-10 : 0.0);
            from_spectrum(&r, A, lam, n);
            check_eigen("clustered (-1, 0, 1 +- 1e-10)", A, n);
            memset(A, 0, nn * sizeof(double));
            for (int i = 0; i < n; i++) A[(size_t)i * n + i] = ms_rng_normal(&r);
            check_eigen("diagonal", A, n);
            for (int i = 0; i + 1 < n; i++) A[(size_t)i * n + i + 1] = A[(size_t)(i + 1) * n + i] = (i % 7 == 3) ? 0.0 : ms_rng_normal(&r);
            check_eigen("tridiagonal (with splits)", A, n);
        }
        free(A); free(lam);
    }
    /* the empty matrix and a zero one */
    double z[9] = { 0 }, w[3], V[9];
    check(ms_sym_eigen(z, 0, w, V) == MS_OK && ms_sym_eigen(z, 3, w, V) == MS_OK && w[0] == 0 && w[2] == 0 && V[0] * V[0] + V[3] * V[3] + V[6] * V[6] == 1.0,
          "eigen: n 0 and the zero 3x3 (eigenvalues 0, orthonormal V)");
}

/* The gram solve with one decomposition shared by three layers (as attn1 q, k, v): each W is the
 * minimiser (gradient W G - C vanishes) and W - W0 lies in range(G). */
static void test_gram_shared(void) {
    MsRng r;
    ms_rng_seed(&r, 3);
    const int di = 67, dout[3] = { 67, 40, 91 }, rows = 30;   /* rank 30 < 67: under-determined */
    float *X = (float *)malloc(sizeof(float) * rows * di);
    for (int i = 0; i < rows * di; i++) X[i] = (float)ms_rng_normal(&r);
    MsSymEig e;
    int ok = 1;
    for (int L = 0; L < 3; L++) {
        const size_t m = (size_t)dout[L] * di;
        float *W0 = (float *)malloc(sizeof(float) * m), *Wc = (float *)malloc(sizeof(float) * m), *W = (float *)malloc(sizeof(float) * m);
        for (size_t i = 0; i < m; i++) { W0[i] = (float)ms_rng_normal(&r); Wc[i] = W0[i] + 0.1f * (float)ms_rng_normal(&r); }
        MsFuseStats S;
        ms_fuse_stats_init(&S, di, dout[L]);
        ms_fuse_stats_add(&S, X, (size_t)rows, Wc);
        if (L == 0) ok &= ms_sym_eig_init(&e, S.G, di) == MS_OK;
        int rank = 0;
        ok &= ms_fuse_solve_gram_eig(&e, &S, W0, W, 0, 0.0, &rank, NULL) == MS_OK;
        /* gradient (W G - C) relative to |C|, and the change's part outside range(G) */
        double g = 0, c = 0, out = 0, dn = 0;
        for (int o = 0; o < dout[L]; o++) {
            for (int j = 0; j < di; j++) {
                double a = 0;
                for (int i = 0; i < di; i++) a += (double)W[(size_t)o * di + i] * S.G[(size_t)i * di + j];
                g = fmax(g, fabs(a - S.C[(size_t)o * di + j]));
                c = fmax(c, fabs(S.C[(size_t)o * di + j]));
            }
            for (int k = 0; k < di - rank; k++) {     /* null-space eigenvectors: columns 0 .. di-rank-1 */
                double a = 0;
                for (int i = 0; i < di; i++) a += ((double)W[(size_t)o * di + i] - W0[(size_t)o * di + i]) * e.V[(size_t)i * di + k];
                out = fmax(out, fabs(a));
            }
            for (int i = 0; i < di; i++) dn = fmax(dn, fabs((double)W[(size_t)o * di + i] - W0[(size_t)o * di + i]));
        }
        check(ok && rank == rows && g <= 1e-5 * c && out <= 1e-6 * dn,
              "gram, shared decomposition, layer %d (%dx%d): rank %d (rows %d), |W G - C| %.1e |C|, change outside range(G) %.1e |change|",
              L, dout[L], di, rank, rows, g / c, out / dn);
        ms_fuse_stats_free(&S);
        free(W0); free(Wc); free(W);
    }
    ms_sym_eig_free(&e);
    free(X);
}

int main(void) {
    test_gemm();
    test_gram_acc();
    test_eigen();
    test_gram_shared();
    return test_summary("test_eigen");
}
