/* tests/test_fuse.c — gradient fusion (mixshow.c) and L-BFGS (models/optim.c):
 *   - the symmetric eigen-decomposition (reconstruction, orthonormality, order);
 *   - the objective from statistics == from rows; the gram solution is a minimiser (gradient 0)
 *     and the one nearest to W0 (its change lies in range(G));
 *   - against the official update_quasi_newton (tests/data/fuse/lbfgs_golden.safetensors,
 *     tools/ref/gen_fuse_golden.py): our L-BFGS follows its loss trace (first 10 closure values to
 *     rel 1e-4) and ends no worse than 1.01x; gram reaches an objective <= the official one, and
 *     equals its W where the problem is underdetermined;
 *   - gram's trust region: near-identical inputs with different targets (the blow-up) bounded on
 *     its sphere, no worse than weight fusion, == the ridge solution solved independently; not
 *     acting (same bits) on unrelated inputs; `fuse --max-change 2` on the tiny model holds every
 *     layer inside, on the sphere where it acts, elsewhere the unbounded objective exactly;
 *   - kohya / webui LoRA input (tools/ref/gen_kohya_lora.py: concept_a in kohya names, per-module
 *     alphas and ranks): read == the ED-LoRA file's products, merged models equal, MLP / ff /
 *     proj modules == kohya merge_to in torch, bad files refused naming the key; fuse --method
 *     weight / gram from it == from concept_a.pth;
 *   - input validation of fuse (--check): JSON shape, keys and types, files, relative paths,
 *     shapes against the model, each error naming the file, concept and key. */
#if !defined(_WIN32) && !defined(_POSIX_C_SOURCE)
#define _POSIX_C_SOURCE 200809L         /* mkdir */
#endif
#include "tests/test.h"
#include "tools/tools.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#ifdef _WIN32
#include <direct.h>
static int make_dir(const char *p) { return _mkdir(p); }
#else
#include <sys/stat.h>
#include <sys/types.h>
static int make_dir(const char *p) { return mkdir(p, 0777); }
#endif

#define GOLDEN "tests/data/fuse/lbfgs_golden.safetensors"


static double f64_at(const StTensor *t, size_t i) { return test_le_f64(t->data + 8 * i); }
static int64_t i64_at(const StTensor *t) { return (int64_t)test_le_u64(t->data); }

static void test_eigen(void) {
    MsRng r;
    ms_rng_seed(&r, 5);
    const int n = 23;
    double *A = malloc(sizeof(double) * n * n), *A0 = malloc(sizeof(double) * n * n);
    double *Q = malloc(sizeof(double) * n * n), *w = malloc(sizeof(double) * n);
    for (int i = 0; i < n; i++) for (int j = 0; j <= i; j++) A[i * n + j] = A[j * n + i] = ms_rng_normal(&r);
    memcpy(A0, A, sizeof(double) * n * n);
    check(ms_sym_eigen(A, n, w, Q) == MS_OK, "eigen: converges");
    double rec = 0, orth = 0, nrm = 0;
    int sorted = 1;
    for (int i = 0; i < n; i++) {
        if (i && w[i] < w[i - 1]) sorted = 0;
        for (int j = 0; j < n; j++) {
            double a = 0, o = 0;
            for (int k = 0; k < n; k++) { a += Q[i * n + k] * w[k] * Q[j * n + k]; o += Q[k * n + i] * Q[k * n + j]; }
            rec = fmax(rec, fabs(a - A0[i * n + j]));
            orth = fmax(orth, fabs(o - (i == j)));
            nrm = fmax(nrm, fabs(A0[i * n + j]));
        }
    }
    check(rec < 1e-13 * n * nrm && orth < 1e-13 * n && sorted,
          "eigen: |A - Q L Q^T| %.2e, |Q^T Q - I| %.2e, ascending %d", rec, orth, sorted);
    free(A); free(A0); free(Q); free(w);
}

/* one golden case: compare our solvers with the official run */
static void test_case(const StFile *f, const char *name) {
    char key[128];
    const StTensor *tx = st_find(f, (snprintf(key, sizeof key, "%s.X", name), key));
    const StTensor *tw = st_find(f, (snprintf(key, sizeof key, "%s.W0", name), key));
    const StTensor *tt = st_find(f, (snprintf(key, sizeof key, "%s.trace", name), key));
    const StTensor *tb = st_find(f, (snprintf(key, sizeof key, "%s.best_W", name), key));
    const StTensor *tfb = st_find(f, (snprintf(key, sizeof key, "%s.f_best", name), key));
    const StTensor *tf0 = st_find(f, (snprintf(key, sizeof key, "%s.f_W0", name), key));
    const StTensor *ti = st_find(f, (snprintf(key, sizeof key, "%s.iters", name), key));
    if (!check(tx && tw && tt && tb && tfb && tf0 && ti, "%s: golden tensors present", name)) return;
    const int n = (int)tx->shape[0], di = (int)tx->shape[1], dout = (int)tw->shape[0];
    const size_t m = (size_t)dout * di;
    float *X = malloc(sizeof(float) * n * di), *W0 = malloc(sizeof(float) * m), *Wb = malloc(sizeof(float) * m);
    float *Wc = malloc(sizeof(float) * m), *Wg = malloc(sizeof(float) * m), *Wl = malloc(sizeof(float) * m);
    st_to_f32(f, tx, X, (size_t)n * di);
    st_to_f32(f, tw, W0, m);
    st_to_f32(f, tb, Wb, m);
    int iters = (int)i64_at(ti);
    MsFuseStats S;
    ms_fuse_stats_init(&S, di, dout);
    int row = 0;
    for (int c = 0;; c++) {
        const StTensor *tc = st_find(f, (snprintf(key, sizeof key, "%s.Wc.%d", name, c), key));
        const StTensor *tr = st_find(f, (snprintf(key, sizeof key, "%s.rows.%d", name, c), key));
        if (!tc || !tr) break;
        st_to_f32(f, tc, Wc, m);
        int nr = (int)i64_at(tr);
        ms_fuse_stats_add(&S, X + (size_t)row * di, (size_t)nr, Wc);
        row += nr;
    }
    check(row == n, "%s: rows %d of %d", name, row, n);
    double f0 = ms_fuse_objective_stats(&S, W0), f0_ref = f64_at(tf0, 0);
    double fb_ref = f64_at(tfb, 0), fb_ref_ours = ms_fuse_objective_stats(&S, Wb);
    check(fabs(f0 - f0_ref) <= 1e-9 * f0_ref, "%s: f(W0) %.12e vs torch double %.12e", name, f0, f0_ref);
    /* L-BFGS: the official trace */
    int nt = (int)tt->numel;
    double trace[4096];
    MsLbfgsResult res;
    ms_fuse_solve_lbfgs(&S, W0, Wl, iters, trace, 4096, &res);
    int k10 = nt < 10 ? nt : 10, upto = 0;
    double worst = 0;
    for (int k = 0; k < k10 && k < res.n_evals; k++) worst = fmax(worst, fabs(trace[k] - f64_at(tt, k)) / fabs(f64_at(tt, k)));
    for (int k = 0; k < nt && k < res.n_evals; k++, upto++)
        if (fabs(trace[k] - f64_at(tt, k)) > 1e-4 * fabs(f64_at(tt, k)) + 1e-9 * f0) break;
    check(res.n_evals >= k10 && worst <= 1e-4, "%s: lbfgs trace, first %d closure values rel err %.2e "
          "(follows to 1e-4 for %d of %d official evals; ours %d)", name, k10, worst, upto, nt, res.n_evals);
    if (test_is_verbose() || worst > 1e-4)
        for (int k = 0; k < 12 && k < nt; k++) printf("    %2d  ours %.10e  torch %.10e\n", k, k < res.n_evals ? trace[k] : NAN, f64_at(tt, k));
    double fl = ms_fuse_objective_stats(&S, Wl);
    check(fl <= 1.01 * fb_ref + 1e-12 * f0, "%s: lbfgs best f %.6e <= 1.01 x official %.6e", name, fl, fb_ref);
    /* gram */
    int rank = 0;
    check(ms_fuse_solve_gram(&S, W0, Wg, 0, &rank) == MS_OK, "%s: gram solves", name);
    double fg = ms_fuse_objective_stats(&S, Wg);
    check(fg <= fb_ref * (1 + 1e-6) + 1e-12 * f0, "%s: gram f %.6e <= official %.6e (rank %d of %d; f(W0) %.4e)",
          name, fg, fb_ref, rank, di, f0);
    (void)fb_ref_ours;
    if (rank < di) {      /* underdetermined: the official L-BFGS lands on the minimum-change W */
        TestErr e = test_err_f(Wg, Wb, m);
        check(e.rel_l2 <= 1e-4, "%s: gram W == official W (rel-L2 %.2e, max abs %.2e)", name, e.rel_l2, e.max_abs);
    }
    /* weight fusion is worse (it ignores the inputs) */
    free(X); free(W0); free(Wb); free(Wc); free(Wg); free(Wl);
    ms_fuse_stats_free(&S);
}

/* ---- gram's trust region (ms_fuse_solve_gram_eig with cap > 0) ----
 * Two concepts on nearly the same rows (X + eps E_c, eps = 1e-3, X of rank 4 < 12 inputs) with
 * different changes: the exact
 * minimiser tells them apart through eps E and moves far (the case that blew a world model's
 * fused weights up). With cap = max(2 rho, ||weight fusion's change||) the change lands on the
 * sphere ||W - W0|| = cap, fits no worse than weight fusion, and equals the ridge solution
 * W0 + R (G + lam I)^-1 solved here independently (Gaussian elimination in double). With
 * unrelated rows (eps = 1) the region is not needed: lam 0 and the same bits as without it. */
static double frob_diff(const float *a, const float *b, size_t m) {
    double s = 0.0;
    for (size_t i = 0; i < m; i++) s += ((double)a[i] - b[i]) * ((double)a[i] - b[i]);
    return sqrt(s);
}

static void trust_case(double eps, int expect_active) {
    enum { DI = 12, DO = 6, N = 40, RK = 2 };
    const size_t m = (size_t)DO * DI;
    MsRng r;
    ms_rng_seed(&r, 31);
    /* the shared rows span 4 of the 12 input directions: the others are seen only through eps E_c */
    float *Z = test_randn(&r, (size_t)N * 4, 1.0f), *Bz = test_randn(&r, (size_t)4 * DI, 1.0f);
    float *X = test_zeros((size_t)N * DI), *W0 = test_randn(&r, m, 0.3f);
    for (int i = 0; i < N; i++)
        for (int j = 0; j < DI; j++)
            for (int k = 0; k < 4; k++) X[i * DI + j] += Z[i * 4 + k] * Bz[k * DI + j];
    ms_free_aligned(Z); ms_free_aligned(Bz);
    float *Xc[2], *Wc[2], *dW[2], *up[2], *down[2];
    float Ww[DO * DI], Wu[DO * DI], Wg[DO * DI];
    double rho2 = 0.0;
    MsFuseStats S;
    ms_fuse_stats_init(&S, DI, DO);
    memcpy(Ww, W0, sizeof Ww);
    for (int c = 0; c < 2; c++) {
        float *E = test_randn(&r, (size_t)N * DI, 1.0f);
        Xc[c] = test_zeros((size_t)N * DI);
        for (size_t i = 0; i < (size_t)N * DI; i++) Xc[c][i] = eps < 1.0 ? X[i] + (float)eps * E[i] : E[i];
        up[c] = test_randn(&r, (size_t)DO * RK, 0.2f); down[c] = test_randn(&r, (size_t)RK * DI, 0.2f);
        MsFuseDelta d = { 1.0f, RK, down[c], up[c] };
        Wc[c] = test_zeros(m); dW[c] = test_zeros(m);
        ms_fuse_merged_weight(Wc[c], W0, &d, DO, DI);
        for (size_t i = 0; i < m; i++) {
            dW[c][i] = Wc[c][i] - W0[i];
            rho2 += (double)dW[c][i] * dW[c][i];
            Ww[i] += dW[c][i];
        }
        ms_fuse_stats_add(&S, Xc[c], N, Wc[c]);
        ms_free_aligned(E);
    }
    const double rho = sqrt(rho2), cap = fmax(2.0 * rho, frob_diff(Ww, W0, m));
    MsSymEig e;
    int rank = 0, rank2 = 0;
    double lam = -1.0, lam0 = -1.0;
    if (!check(ms_sym_eig_init(&e, S.G, DI) == MS_OK, "trust region: eigen-decomposition")) return;
    check(ms_fuse_solve_gram_eig(&e, &S, W0, Wu, 0.0, 0.0, &rank, &lam0) == MS_OK && lam0 == 0.0, "trust region eps %g: "
          "the unbounded solve (ridge %g)", eps, lam0);
    check(ms_fuse_solve_gram_eig(&e, &S, W0, Wg, 0.0, cap, &rank2, &lam) == MS_OK, "trust region eps %g: the bounded solve", eps);
    const double nu = frob_diff(Wu, W0, m), ng = frob_diff(Wg, W0, m);
    const double fu = ms_fuse_objective_stats(&S, Wu), fg = ms_fuse_objective_stats(&S, Wg), fw = ms_fuse_objective_stats(&S, Ww);
    printf("  eps %g: exact change %.3g x rho, bounded %.3g x rho (cap %.3g x rho), ridge %.3g; f exact %.3e, bounded %.3e, "
           "weight %.3e\n", eps, nu / rho, ng / rho, cap / rho, lam, fu, fg, fw);
    if (expect_active) {
        check(nu > 10.0 * cap, "eps %g: the exact minimiser moves far (%.3g x the cap): the case is the blow-up", eps, nu / cap);
        check(lam > 0.0 && fabs(ng - cap) <= 1e-6 * cap, "eps %g: the bounded change lies on the sphere (%.9g vs cap %.9g)", eps,
              ng, cap);
        check(fg <= fw, "eps %g: fits no worse than weight fusion (f %.6e <= %.6e)", eps, fg, fw);
        /* the ridge solution, independently: A = G + lam I, W = W0 + (C - W0 G) A^-1 (rows solved) */
        double A[DI][2 * DI];
        for (int i = 0; i < DI; i++)
            for (int j = 0; j < 2 * DI; j++) A[i][j] = j < DI ? S.G[i * DI + j] + (i == j ? lam : 0.0) : (j - DI == i);
        for (int col = 0; col < DI; col++) {     /* Gauss-Jordan with partial pivoting: A^-1 */
            int piv = col;
            for (int i = col + 1; i < DI; i++) if (fabs(A[i][col]) > fabs(A[piv][col])) piv = i;
            for (int j = 0; j < 2 * DI; j++) { double t = A[col][j]; A[col][j] = A[piv][j]; A[piv][j] = t; }
            const double p = A[col][col];
            for (int j = 0; j < 2 * DI; j++) A[col][j] /= p;
            for (int i = 0; i < DI; i++)
                if (i != col) { const double f = A[i][col]; for (int j = 0; j < 2 * DI; j++) A[i][j] -= f * A[col][j]; }
        }
        double worst = 0.0, scale = 0.0;
        for (int o = 0; o < DO; o++) {
            double R[DI];
            for (int j = 0; j < DI; j++) {
                double a = S.C[o * DI + j];
                for (int i = 0; i < DI; i++) a -= (double)W0[o * DI + i] * S.G[i * DI + j];
                R[j] = a;
            }
            for (int j = 0; j < DI; j++) {
                double w = W0[o * DI + j];
                for (int i = 0; i < DI; i++) w += R[i] * A[i][DI + j];
                worst = fmax(worst, fabs(w - Wg[o * DI + j]));
                scale = fmax(scale, fabs(w - W0[o * DI + j]));
            }
        }
        check(worst <= 1e-5 * scale, "eps %g: == the ridge solution W0 + R (G + lam I)^-1 (max diff %.2e of a change %.2e)", eps,
              worst, scale);
    } else {
        check(nu <= cap && lam == 0.0 && !memcmp(Wg, Wu, sizeof Wg), "eps %g: unrelated rows: the region not needed "
              "(change %.3g x rho <= cap), ridge 0, the same bits", eps, nu / rho);
    }
    ms_sym_eig_free(&e);
    ms_fuse_stats_free(&S);
    for (int c = 0; c < 2; c++) {
        ms_free_aligned(Xc[c]); ms_free_aligned(Wc[c]); ms_free_aligned(dW[c]); ms_free_aligned(up[c]); ms_free_aligned(down[c]);
    }
    ms_free_aligned(X); ms_free_aligned(W0);
}

static void test_trust_region(void) {
    trust_case(1e-3, 1);
    trust_case(1.0, 0);
}

/* ---- end to end on the tiny model: mixshow fuse with the three methods ---- */
static void rm_folder(const char *d) {
    static const char *const f[] = { "model_index.json", "new_concept_cfg.json", "unet/config.json",
        "unet/diffusion_pytorch_model.safetensors", "vae/config.json", "vae/diffusion_pytorch_model.safetensors",
        "text_encoder/config.json", "text_encoder/model.safetensors", "scheduler/scheduler_config.json",
        "tokenizer/vocab.json", "tokenizer/merges.txt", "tokenizer/special_tokens_map.json",
        "tokenizer/tokenizer_config.json", "tokenizer/added_tokens.json" };
    static const char *const sub[] = { "unet", "vae", "text_encoder", "scheduler", "tokenizer", "" };
    char p[512];
    for (size_t i = 0; i < sizeof f / sizeof f[0]; i++) { snprintf(p, sizeof p, "%s/%s", d, f[i]); remove(p); }
    for (size_t i = 0; i < sizeof sub / sizeof sub[0]; i++) { snprintf(p, sizeof p, "%s/%s", d, sub[i]); remove(p); }
}

static int run_fuse_x(const char *method, const char *cfg, const char *out, const char *report, const char *x0,
                      const char *x1) {
    char *argv[] = { "fuse", "-q", "--model", "models/tiny-sd", "--concepts", (char *)cfg, "--out", (char *)out,
                     "--method", (char *)method, "--report", (char *)report, "--textenc-iters", "100",
                     "--spatial-size", "16", "--spatial-steps", "4", (char *)x0, (char *)x1 };   /* spatial stage: a quick run */
    rm_folder(out);
    return cmd_fuse((int)(sizeof argv / sizeof argv[0]) - (x0 ? 0 : 2), argv);
}
static int run_fuse(const char *method, const char *cfg, const char *out, const char *report) {
    return run_fuse_x(method, cfg, out, report, NULL, NULL);
}

/* gram --max-change 2 against the unbounded gram report g (the same problems): every layer's
 * change within max(2 rho, weight fusion's change); where the ridge acted, on that sphere and no
 * worse than weight fusion; before the first layer it held (later ones record features of the
 * fused layers before them) the unbounded objective exactly. */
static void test_max_change(const JsonValue *g) {
    char out[256], rp[300];
    JsonValue *t = NULL;
    test_tmp(out, sizeof out, "fuse_maxchange");
    snprintf(rp, sizeof rp, "%.255s.json", out);
    if (!check(run_fuse_x("gram", "tests/data/fuse/multi.json", out, rp, "--max-change", "2") == 0 &&
               json_parse_file(rp, &t) == MS_OK, "fuse gram --max-change 2: %s", ms_last_error()))
        return;
    const JsonValue *L = json_get(t, "layers"), *G = json_get(g, "layers");
    const size_t n = json_len(L);
    int held = 0, bad_in = 0, bad_sphere = 0, bad_free = 0, free_n = 0;
    double most = 0.0;
    for (size_t i = 0; i < n && i < json_len(G); i++) {
        const JsonValue *l = json_at(L, i), *u = json_at(G, i);
        const double ch = json_get_number(l, "change", NAN), rho = json_get_number(l, "concepts_change", NAN);
        const double wc = json_get_number(l, "weight_change", NAN), lam = json_get_number(l, "ridge", NAN);
        const double cap = fmax(2.0 * rho, wc), f = json_get_number(json_get(l, "objective"), "fused", NAN);
        const double fw = json_get_number(json_get(l, "objective"), "weight", NAN);
        const double fu = json_get_number(json_get(u, "objective"), "fused", NAN), chu = json_get_number(u, "change", NAN);
        bad_in += !(ch <= cap * (1 + 1e-5) + 1e-12);
        if (lam > 0) {
            held++;
            bad_sphere += !(fabs(ch - cap) <= 1e-5 * cap) || !(f <= fw * (1 + 1e-9)) || !(chu > cap);
            most = fmax(most, chu / cap);
        } else if (!held) {          /* later layers record features of the layers fused before them */
            bad_free += !(f == fu) || !(lam == 0.0);
            free_n++;
        }
    }
    check(n > 0 && bad_in == 0, "--max-change 2: every one of %zu layers' change <= max(2 rho, weight fusion's) (%d bad)", n, bad_in);
    check(held > 0 && bad_sphere == 0, "--max-change 2: where the ridge acted (%d layers; the exact change was up to %.3g x "
          "the cap) the change is on the sphere and f <= weight fusion's (%d bad)", held, most, bad_sphere);
    check(free_n > 0 && bad_free == 0, "--max-change 2: the %d layers before the first it held have the unbounded gram objective "
          "exactly (%d bad)", free_n, bad_free);
    json_free(t);
    rm_folder(out);
    remove(rp);
}

static void test_end_to_end(void) {
    static const char *const meth[3] = { "gram", "lbfgs", "weight" };
    JsonValue *rep[3] = { NULL, NULL, NULL };
    char out[3][256], rp[3][256];
    for (int k = 0; k < 3; k++) {
        char nm[32];
        snprintf(nm, sizeof nm, "fuse_%s", meth[k]);
        test_tmp(out[k], sizeof out[k], nm);
        snprintf(rp[k], sizeof rp[k], "%.200s.json", out[k]);
        double t0 = ms_time();
        int rc = run_fuse(meth[k], "tests/data/fuse/multi.json", out[k], rp[k]);
        check(rc == 0 && json_parse_file(rp[k], &rep[k]) == MS_OK, "fuse %s: 3 tiny ED-LoRAs fused in %.2f s", meth[k], ms_time() - t0);
    }
    if (rep[0] && rep[1] && rep[2]) {
        const JsonValue *L[3] = { json_get(rep[0], "layers"), json_get(rep[1], "layers"), json_get(rep[2], "layers") };
        size_t n = json_len(L[0]);
        int n_te = 0, n_kv = 0, bad_te = 0, bad_kv = 0, bad_w = 0, bad_trace = 0, n_sp = 0, bad_sp = 0;
        double worst_kv = 0;
        for (size_t i = 0; i < n; i++) {
            const JsonValue *g = json_at(L[0], i), *l = json_at(L[1], i), *w = json_at(L[2], i);
            const char *st = json_get_string(g, "stage", "");
            double g0 = json_get_number(json_get(g, "objective"), "W0", NAN), gf = json_get_number(json_get(g, "objective"), "fused", NAN);
            double gw = json_get_number(json_get(g, "objective"), "weight", NAN);
            double lf = json_get_number(json_get(l, "objective"), "fused", NAN);
            double wf = json_get_number(json_get(w, "objective"), "fused", NAN);
            if (!strcmp(st, "te")) {     /* same inputs for all methods: gram <= lbfgs, gram <= weight */
                n_te++;
                bad_te += !(gf <= lf * (1 + 1e-9) + 1e-15 * g0);
                bad_w += !(gf <= gw) || !(fabs(wf - gw) <= 1e-12 * gw);
            } else if (!strcmp(st, "sp")) {   /* gram minimises its own statistics */
                n_sp++;
                bad_sp += !(gf <= gw * (1 + 1e-9)) || !(gf <= g0 * (1 + 1e-9));
            } else if (!strcmp(st, "kv")) {   /* underdetermined: exact interpolation */
                n_kv++;
                worst_kv = fmax(worst_kv, gf / g0);
                bad_kv += !(gf <= 1e-10 * g0);
            }
            bad_trace += json_len(json_get(l, "loss_trace")) < 2;
        }
        check(n_te == 8 && n_kv == 32, "fuse: %d text-encoder and %d K/V layers reported (want 8, 32)", n_te, n_kv);
        check(bad_te == 0 && bad_w == 0, "fuse: text encoder, gram <= lbfgs and <= weight on every layer (%d, %d bad)", bad_te, bad_w);
        check(bad_kv == 0, "fuse: K/V gram reaches f/f(W0) <= 1e-10 on every layer (worst %.2e)", worst_kv);
        check(bad_trace == 0, "fuse: lbfgs reports a loss trace per layer");
        check(n_sp == 96 && bad_sp == 0, "fuse: %d spatial layers reported (want 96), gram f <= f(W0) and <= weight on each (%d bad)",
              n_sp, bad_sp);
    }
    if (rep[0]) test_max_change(rep[0]);
    /* the folder loads, with the stacked embeddings */
    MsModel m;
    EdloraFile fa;
    memset(&fa, 0, sizeof fa);
    if (check(ms_model_load(out[0], NULL, &m) == MS_OK, "fused folder loads (%s)", ms_last_error())) {
        int V = m.text_config.vocab_size, ie = ms_param_find(&m.text, "text_model.embeddings.token_embedding.weight");
        check(V == 49408 + 6 * 16, "fused vocab_size %d == 49408 + 96", V);
        if (ie >= 0 && edlora_read("tests/data/fuse/concept_b.pth", &fa) == MS_OK) {
            const float *row = m.text.p[ie].f32 + (size_t)(49408 + 2 * 16) * m.text_config.hidden_size;   /* <dog1> <new32> */
            check(fa.n_emb == 2 && !memcmp(row, fa.emb[0].emb, sizeof(float) * m.text_config.hidden_size),
                  "fused <new32> row == concept_b's <dog1>[0]");
        }
        ms_model_free(&m);
    }
    edlora_free(&fa);
    for (int k = 0; k < 3; k++) { json_free(rep[k]); rm_folder(out[k]); remove(rp[k]); }
    /* bad inputs: an error before any work (the JSON beside the files: lora_path from its folder) */
    char bad_cfg[64], bad_out[256], bad_rp[300];
    snprintf(bad_cfg, sizeof bad_cfg, "tests/data/fuse/bad_tmp_%ld.json", test_pid());
    test_tmp(bad_out, sizeof bad_out, "fuse_bad");
    snprintf(bad_rp, sizeof bad_rp, "%.255s.json", bad_out);
    static const char *const bad[][2] = {
        { "[{\"lora_path\": \"nope.pth\", \"unet_alpha\": 1, \"text_encoder_alpha\": 1, \"concept_name\": \"<a1>\"}]", "not found" },
        { "[{\"lora_path\": \"concept_a.pth\", \"unet_alpha\": \"1\", \"text_encoder_alpha\": 1, \"concept_name\": \"<cat1>\"}]", "unet_alpha" },
        { "[{\"lora_path\": \"concept_a.pth\", \"unet_alpha\": 1, \"text_encoder_alpha\": 1, \"concept_name\": \"<zebra1>\"}]", "<zebra1>" },
    };
    for (size_t k = 0; k < sizeof bad / sizeof bad[0]; k++) {
        FILE *f = fopen(bad_cfg, "wb");
        if (!f) continue;
        fputs(bad[k][0], f);
        fclose(f);
        ms_clear_error();
        int rc = run_fuse("gram", bad_cfg, bad_out, bad_rp);
        check(rc != 0 && strstr(ms_last_error(), bad[k][1]) != NULL, "fuse: bad input %zu refused: %s", k, ms_last_error());
    }
    remove(bad_cfg);
}

/* ---- kohya / webui LoRA input (tools/edlora.c read_kohya; tools/ref/gen_kohya_lora.py) ---- */

#define KOHYA "tests/data/fuse/concept_a_kohya.safetensors"
#define KOHYA_EXTRA "tests/data/fuse/concept_a_kohya_extra.safetensors"
#define KOHYA_GOLDEN "tests/data/fuse/kohya_extra_golden.safetensors"

/* rel-L2 of up_a @ down_a against up_b @ down_b, in double */
static double product_err(const EdloraModule *a, const EdloraModule *b) {
    double num = 0, den = 0;
    for (int o = 0; o < a->out; o++)
        for (int i = 0; i < a->in; i++) {
            double x = 0, y = 0;
            for (int r = 0; r < a->rank; r++) x += (double)a->up[(size_t)o * a->rank + r] * a->down[(size_t)r * a->in + i];
            for (int r = 0; r < b->rank; r++) y += (double)b->up[(size_t)o * b->rank + r] * b->down[(size_t)r * b->in + i];
            num += (x - y) * (x - y);
            den += y * y;
        }
    return den > 0 ? sqrt(num / den) : sqrt(num);
}

/* one network of f (0 text encoder, 1 UNet) merged with alpha */
static MsStatus merge_part(MsModel *m, const EdloraFile *f, int unet, float alpha) {
    EdloraFile x = *f;
    if (unet) x.n_te = 0; else x.n_unet = 0;
    return edlora_merge(m, &x, alpha);
}

static void test_kohya_read(void) {
    EdloraFile a, k, ke, ex;
    memset(&ex, 0, sizeof ex);
    if (!check(edlora_read("tests/data/fuse/concept_a.pth", &a) == MS_OK, "kohya: concept_a.pth reads")) return;
    if (!check(edlora_read(KOHYA, &k) == MS_OK, "kohya: %s reads (%s)", KOHYA, ms_last_error())) { edlora_free(&a); return; }
    /* every module of the ED-LoRA file, under kohya's name, with its alpha / rank folded in */
    int missing = 0, r5 = 0;
    double worst = 0;
    for (int u = 0; u < 2; u++) {
        const EdloraModule *ma = u ? a.unet : a.te, *mk = u ? k.unet : k.te;
        int na = u ? a.n_unet : a.n_te, nk = u ? k.n_unet : k.n_te;
        for (int i = 0; i < na; i++) {
            const EdloraModule *hit = NULL;
            for (int j = 0; j < nk; j++) if (!strcmp(ma[i].name, mk[j].name)) hit = &mk[j];
            if (!hit || hit->in != ma[i].in || hit->out != ma[i].out) { missing++; continue; }
            r5 += hit->rank == 5;
            worst = fmax(worst, product_err(hit, &ma[i]));
        }
    }
    check(k.n_emb == 0 && k.n_te == a.n_te && k.n_unet == a.n_unet && missing == 0,
          "kohya: %d + %d modules under their diffusers names (want %d + %d), no embeddings, %d missing", k.n_te, k.n_unet,
          a.n_te, a.n_unet, missing);
    check(worst <= 1e-6 && r5 > 0, "kohya: up @ down * alpha/rank == ED-LoRA up @ down (worst rel-L2 %.2e; %d modules of rank 5)",
          worst, r5);
    /* extra modules split off; the rest equals the plain kohya file */
    if (check(edlora_read(KOHYA_EXTRA, &ke) == MS_OK && edlora_split_extra(&ke, &ex) == MS_OK, "kohya: extra file reads, splits")) {
        check(ex.n_te == 2 && ex.n_unet == 4 && ke.n_te == k.n_te && ke.n_unet == k.n_unet,
              "kohya: %d text-encoder and %d UNet modules outside attention (want 2, 4)", ex.n_te, ex.n_unet);
    }
    /* sample --edlora loads through edlora_read + edlora_merge: the merged models agree, and the
     * extra modules equal kohya's merge_to (torch, KOHYA_GOLDEN) */
    MsModel m1, m2;
    StFile g;
    if (check(ms_model_load("models/tiny-sd", NULL, &m1) == MS_OK && ms_model_load("models/tiny-sd", NULL, &m2) == MS_OK,
              "kohya: tiny model loads twice")) {
        EdloraFile kx;
        memset(&kx, 0, sizeof kx);
        MsStatus s = merge_part(&m1, &a, 0, 0.9f);
        if (!s) s = merge_part(&m1, &a, 1, 0.7f);
        if (!s && (s = edlora_read(KOHYA_EXTRA, &kx)) == MS_OK) {
            s = merge_part(&m2, &kx, 0, 0.9f);
            if (!s) s = merge_part(&m2, &kx, 1, 0.7f);
        }
        if (check(s == MS_OK && st_open(&g, KOHYA_GOLDEN) == MS_OK, "kohya: merged (%s)", ms_last_error())) {
            double w_same = 0, w_gold = 0;
            int n_gold = 0;
            for (int t = 0; t < 2; t++) {
                const MsParamTable *p1 = t ? &m1.unet : &m1.text, *p2 = t ? &m2.unet : &m2.text;
                for (int i = 0; i < p1->n; i++) {
                    const MsParam *x = &p1->p[i], *y = &p2->p[i];
                    if (!x->f32 || !y->f32) continue;
                    const StTensor *gt = st_find(&g, x->name);
                    if (gt) {
                        float *w = malloc(sizeof(float) * x->numel);
                        if (w && gt->numel == x->numel && st_to_f32(&g, gt, w, x->numel) == MS_OK) {
                            w_gold = fmax(w_gold, test_err_f(y->f32, w, x->numel).rel_l2);
                            n_gold++;
                        }
                        free(w);
                    } else w_same = fmax(w_same, test_err_f(y->f32, x->f32, x->numel).rel_l2);
                }
            }
            check(w_same <= 1e-6, "kohya: edlora_merge of the kohya file == of concept_a.pth on every other weight (worst rel-L2 %.2e)",
                  w_same);
            check(n_gold == 6 && w_gold <= 1e-6, "kohya: %d extra weights == kohya merge_to in torch (worst rel-L2 %.2e)", n_gold, w_gold);
            st_close(&g);
        }
        edlora_free(&kx);
        ms_model_free(&m1);
        ms_model_free(&m2);
    }
    edlora_free(&a); edlora_free(&k); edlora_free(&ke); edlora_free(&ex);
}

/* kohya-like files the reader must refuse, naming the key */
static void test_kohya_bad(void) {
    static float d4[4 * 32 * 9], u4[32 * 4], al[2] = { 2.0f, 3.0f }, nan_al;
    nan_al = NAN;
    struct { const char *name; int ndim; int64_t shape[4]; const float *x; const char *want; } bad[] = {
        { "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.hada_w1_a", 2, { 32, 4 }, u4, "LoHa" },
        { "lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight", 2, { 4, 32 }, d4, "SDXL" },
        { "lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight", 4, { 4, 32, 3, 3 }, d4, "LoCon" },
        { "lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight", 4, { 4, 32, 3, 3 }, d4, "3x3 conv" },
        { "lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q.lora_down.weight", 2, { 4, 32 }, d4, "compvis" },
        { "lora_te_text_model_encoder_layers_0_self_attn_q_proj.alpha", 1, { 2 }, al, "expected a scalar alpha" },
        { "lora_te_text_model_encoder_layers_0_self_attn_q_proj.alpha", 0, { 0 }, &nan_al, "finite alpha" },
        { "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_A.weight", 2, { 4, 32 }, d4, "PEFT" },
    };
    for (size_t b = 0; b < sizeof bad / sizeof bad[0]; b++) {
        StEntry e[3];
        memset(e, 0, sizeof e);
        e[0].name = "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight";
        e[0].dtype = ST_F32; e[0].ndim = 2; e[0].shape[0] = 4; e[0].shape[1] = 32; e[0].f32 = d4;
        e[1].name = "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight";
        e[1].dtype = ST_F32; e[1].ndim = 2; e[1].shape[0] = 32; e[1].shape[1] = 4; e[1].f32 = u4;
        e[2].name = bad[b].name; e[2].dtype = ST_F32; e[2].ndim = bad[b].ndim; e[2].f32 = bad[b].x;
        for (int d = 0; d < bad[b].ndim; d++) e[2].shape[d] = bad[b].shape[d];
        char path[256];
        test_tmp(path, sizeof path, "kohya_bad.safetensors");
        EdloraFile f;
        if (st_write(path, e, 3, NULL, 0) != MS_OK) { check(0, "kohya bad %zu: written", b); continue; }
        ms_clear_error();
        MsStatus s = edlora_read(path, &f);
        check(s != MS_OK && strstr(ms_last_error(), bad[b].want) && strstr(ms_last_error(), path) &&
              strstr(ms_last_error(), bad[b].name),
              "kohya: bad file %zu refused naming the key: %s", b, ms_last_error());
        if (!s) edlora_free(&f);
        remove(path);
    }
}

/* ---- mixshow fuse with kohya input: the same fused weights as from the ED-LoRA file ---- */
static int write_text(const char *path, const char *text) {
    FILE *f = fopen(path, "wb");
    if (!f) return 0;
    int ok = fputs(text, f) >= 0;
    return fclose(f) == 0 && ok;
}

static int fuse_argv(const char *cfg, const char *out, const char *method, const char *extra1, const char *extra2) {
    char *argv[24] = { "fuse", "-q", "--model", "models/tiny-sd", "--concepts", (char *)cfg, "--out", (char *)out, "--method",
                       (char *)method, "--textenc-iters", "100", "--spatial-size", "16", "--spatial-steps", "4" };
    int argc = 16;
    char rp[512];
    snprintf(rp, sizeof rp, "%s.json", out);
    argv[argc++] = "--report";
    argv[argc++] = rp;
    if (extra1) argv[argc++] = (char *)extra1;
    if (extra2) argv[argc++] = (char *)extra2;
    rm_folder(out);
    ms_clear_error();
    return cmd_fuse(argc, argv);
}

/* worst rel-L2 over the weights of two fused folders, apart from the golden ones (compared with
 * KOHYA_GOLDEN instead, in *gold); -1 when a folder does not load */
static double folder_err(const char *da, const char *db, int skip_sp, double *gold, int *n_gold) {
    MsModel a, b;
    StFile g;
    double worst = 0;
    *gold = 0; *n_gold = 0;
    if (ms_model_load(da, NULL, &a) != MS_OK) return -1;
    if (ms_model_load(db, NULL, &b) != MS_OK) { ms_model_free(&a); return -1; }
    if (st_open(&g, KOHYA_GOLDEN) != MS_OK) { ms_model_free(&a); ms_model_free(&b); return -1; }
    for (int t = 0; t < 2; t++) {
        const MsParamTable *pa = t ? &a.unet : &a.text, *pb = t ? &b.unet : &b.text;
        for (int i = 0; i < pa->n; i++) {
            int j = ms_param_find(pb, pa->p[i].name);
            if (!pa->p[i].f32) continue;                 /* position_ids */
            const char *nm = pa->p[i].name;
            if (skip_sp && t && (strstr(nm, ".attn1.") || strstr(nm, ".attn2.")) && !strstr(nm, ".attn2.to_k.") &&
                !strstr(nm, ".attn2.to_v."))
                continue;                               /* spatial layers: compared by objective */
            if (j < 0 || !pb->p[j].f32 || pb->p[j].numel != pa->p[i].numel) { worst = 1e30; continue; }
            const StTensor *gt = st_find(&g, pa->p[i].name);
            if (gt) {
                float *w = malloc(sizeof(float) * gt->numel);
                if (w && gt->numel == pb->p[j].numel && st_to_f32(&g, gt, w, gt->numel) == MS_OK) {
                    *gold = fmax(*gold, test_err_f(pb->p[j].f32, w, gt->numel).rel_l2);
                    ++*n_gold;
                } else *gold = 1e30;
                free(w);
            } else worst = fmax(worst, test_err_f(pb->p[j].f32, pa->p[i].f32, pa->p[i].numel).rel_l2);
        }
    }
    st_close(&g);
    ms_model_free(&a);
    ms_model_free(&b);
    return worst;
}

static void test_kohya_fuse(void) {
    /* concept_a as ED-LoRA .pth (its embeddings unused: "cat" has no <word>) and as the kohya
     * file with extra modules (ranks 4 and 5 against concept_b's 4); paths from the working dir */
    static const char *const jsn[2] = {
        "[{\"lora_path\": \"tests/data/fuse/concept_a.pth\", \"unet_alpha\": 0.7, \"text_encoder_alpha\": 0.9, \"concept_name\": \"cat\"},"
        " {\"lora_path\": \"tests/data/fuse/concept_b.pth\", \"unet_alpha\": 0.7, \"text_encoder_alpha\": 1.0, \"concept_name\": \"<dog1> <dog2>\"}]",
        "[{\"lora_path\": \"" KOHYA_EXTRA "\", \"unet_alpha\": 0.7, \"text_encoder_alpha\": 0.9, \"concept_name\": \"cat\"},"
        " {\"lora_path\": \"tests/data/fuse/concept_b.pth\", \"unet_alpha\": 0.7, \"text_encoder_alpha\": 1.0, \"concept_name\": \"<dog1> <dog2>\"}]" };
    static const char *const nm[6] = { "kohya_a.json", "kohya_k.json", "kohya_wa", "kohya_wk", "kohya_ga", "kohya_gk" };
    char cfg[2][256], out[4][256];
    char rp[4][300];
    for (int k = 0; k < 2; k++) test_tmp(cfg[k], sizeof cfg[k], nm[k]);
    for (int k = 0; k < 4; k++) {
        test_tmp(out[k], sizeof out[k], nm[k + 2]);
        snprintf(rp[k], sizeof rp[k], "%.255s.json", out[k]);
    }
    if (!check(write_text(cfg[0], jsn[0]) && write_text(cfg[1], jsn[1]), "kohya: JSON written")) return;
    /* gradient fusion does not cover MLP / ff / proj: an error before any work, naming the module */
    int rc = fuse_argv(cfg[1], out[3], "gram", NULL, NULL);
    check(rc != 0 && strstr(ms_last_error(), "--extra-modules") && strstr(ms_last_error(), "mlp.fc1") &&
          strstr(ms_last_error(), "concept 0 ('cat'"), "kohya: gram with MLP modules refused: %s", ms_last_error());
    static const char *const meth[2] = { "weight", "gram" };
    for (int k = 0; k < 2; k++) {
        double t0 = ms_time();
        int ra = fuse_argv(cfg[0], out[2 * k], meth[k], NULL, NULL);
        int rk = fuse_argv(cfg[1], out[2 * k + 1], meth[k], k ? "--extra-modules" : NULL, k ? "weight" : NULL);
        double gold = 0;
        int n_gold = 0;
        double e = ra == 0 && rk == 0 ? folder_err(out[2 * k], out[2 * k + 1], k, &gold, &n_gold) : -1;
        /* weight: every weight; gram: text encoder and K/V (the spatial layers below) */
        check(e >= 0 && e <= (k ? 1e-4 : 1e-6), "kohya: fuse --method %s from the kohya file == from concept_a.pth on every "
              "%s weight (worst rel-L2 %.2e; %.1f s)", meth[k], k ? "text-encoder and K/V" : "fused", e, ms_time() - t0);
        check(n_gold == 6 && gold <= 1e-6, "kohya: fuse --method %s: %d extra weights == W0 + alpha dW by kohya merge_to "
              "(worst rel-L2 %.2e)", meth[k], n_gold, gold);
        /* gram's spatial layers: as many rows as inputs (the 16x16 quick run), exactly solvable and
         * ill-conditioned, so rounding-level differences of the recorded inputs move W far while
         * both runs reach f ~ 0: compare the objectives (f(W0), f(weight): the recorded inputs
         * and targets agree; f(fused): both solve the problem) */
        JsonValue *ja = NULL, *jk = NULL;
        if (k && json_parse_file(rp[2], &ja) == MS_OK && json_parse_file(rp[3], &jk) == MS_OK) {
            const JsonValue *la = json_get(ja, "layers"), *lk = json_get(jk, "layers");
            int n_sp = 0, bad = 0;
            double worst_in = 0, worst_f = 0;
            for (size_t i = 0; i < json_len(la) && i < json_len(lk); i++) {
                const JsonValue *a = json_get(json_at(la, i), "objective"), *b = json_get(json_at(lk, i), "objective");
                if (strcmp(json_get_string(json_at(la, i), "stage", ""), "sp")) continue;
                double a0 = json_get_number(a, "W0", NAN), b0 = json_get_number(b, "W0", NAN);
                double aw = json_get_number(a, "weight", NAN), bw = json_get_number(b, "weight", NAN);
                double af = json_get_number(a, "fused", NAN), bf = json_get_number(b, "fused", NAN);
                worst_in = fmax(worst_in, fmax(fabs(b0 - a0) / a0, fabs(bw - aw) / aw));
                worst_f = fmax(worst_f, fabs(bf - af) / a0);
                bad += strcmp(json_get_string(json_at(la, i), "layer", "a"), json_get_string(json_at(lk, i), "layer", "b")) != 0;
                n_sp++;
            }
            check(n_sp == 96 && !bad && worst_in <= 1e-5 && worst_f <= 1e-6,
                  "kohya: gram, %d spatial layers: f(W0) and f(weight) agree to rel %.2e, f(fused) to %.2e x f(W0)", n_sp,
                  worst_in, worst_f);
        } else if (k) check(0, "kohya: gram reports read");
        json_free(ja);
        json_free(jk);
        for (int q = 0; q < 2; q++) { rm_folder(out[2 * k + q]); remove(rp[2 * k + q]); }
    }
    remove(rp[3]);
    remove(cfg[0]);
    remove(cfg[1]);
}

/* ---- plain LoRA (1 token per word, the paper's LoRA + weight fusion baseline) ---- */

/* One regional sample (64x64, 4 steps, one region) of m with tok and the concept fields of b. */
static MsStatus plain_sample(const MsModel *m, const ClipTokenizer *tok, MsTxt2ImgOptions b, float *image) {
    static const MsRegion reg = { "a <cat1> <cat2> sitting", "", { 0.0, 0.0, 1.0, 0.5 } };
    MsRegionalOptions o;
    memset(&o, 0, sizeof o);
    o.base = b;
    o.base.prompt = "a <cat1> <cat2> on grass"; o.base.negative = ""; o.base.width = o.base.height = 64;
    o.base.steps = 4; o.base.guidance_scale = 7.5f; o.base.seed = 3; o.base.sampler = MS_SCHED_DPMSOLVER;
    o.base.torch_cpu = MS_TORCH_CPU_AVX2; o.base.batch = 1;
    o.n_regions = 1;
    o.regions = &reg;
    return ms_regional_sample(m, tok, &o, image);
}

/* concept_a.pth made plain (row 0 of each word, its modules); fused alone with --method weight
 * at alphas 1, sampled from the folder as `mixshow sample --pretrained_model DIR` does == the base
 * sampled with the file merged as `--edlora FILE:1.0` does (weights to float rounding: the fused
 * product sums in double, the merge in float) */
static void test_plain_lora(void) {
    char dir[256], lp[300], cfg[300], cfg2[300], out[300], p[400];
    EdloraFile a, pl;
    memset(&a, 0, sizeof a);
    memset(&pl, 0, sizeof pl);
    test_tmp(dir, sizeof dir, "fuse_plain");
    make_dir(dir);
    snprintf(lp, sizeof lp, "%s/plain.safetensors", dir);
    snprintf(cfg, sizeof cfg, "%s/cfg.json", dir);
    snprintf(cfg2, sizeof cfg2, "%s/mixed.json", dir);
    snprintf(out, sizeof out, "%s/out", dir);
    MsStatus s = edlora_read("tests/data/fuse/concept_a.pth", &a);
    for (int w = 0; w < a.n_emb && !s; w++) s = edlora_add_embedding(&pl, a.emb[w].word, 1, a.emb[w].D, a.emb[w].emb);
    for (int k = 0; k < a.n_te && !s; k++)
        s = edlora_add_module(&pl, 0, a.te[k].name, a.te[k].rank, a.te[k].in, a.te[k].out, a.te[k].down, a.te[k].up);
    for (int k = 0; k < a.n_unet && !s; k++)
        s = edlora_add_module(&pl, 1, a.unet[k].name, a.unet[k].rank, a.unet[k].in, a.unet[k].out, a.unet[k].down, a.unet[k].up);
    if (!s) s = edlora_write(lp, &pl);
    char js[1024];
    snprintf(js, sizeof js, "[{\"lora_path\": \"plain.safetensors\", \"unet_alpha\": 1, \"text_encoder_alpha\": 1, "
             "\"concept_name\": \"<cat1> <cat2>\"}]");
    if (!s && !write_text(cfg, js)) s = MS_ERR_IO;
    snprintf(js, sizeof js, "[{\"lora_path\": \"plain.safetensors\", \"unet_alpha\": 1, \"text_encoder_alpha\": 1, "
             "\"concept_name\": \"<cat1> <cat2>\"}, {\"lora_path\": \"tests/data/fuse/concept_b.pth\", \"unet_alpha\": 1, "
             "\"text_encoder_alpha\": 1, \"concept_name\": \"<dog1>\"}]");
    if (!s && !write_text(cfg2, js)) s = MS_ERR_IO;
    if (!check(!s && edlora_tokens_per_word(&pl) == 1, "plain: a 1-token LoRA of concept_a written (%s)", s ? ms_last_error() : "")) goto done;
    /* refused: gradient fusion (no layer-wise tokens), plain and ED-LoRA together */
    int rc = fuse_argv(cfg, out, "gram", NULL, NULL);
    check(rc != 0 && strstr(ms_last_error(), "plain LoRA") && strstr(ms_last_error(), "--method weight"),
          "plain: --method gram refused: %s", ms_last_error());
    rc = fuse_argv(cfg2, out, "weight", NULL, NULL);
    check(rc != 0 && strstr(ms_last_error(), "not fused together") && strstr(ms_last_error(), "concept 1 ('<dog1>'"),
          "plain: plain + ED-LoRA refused: %s", ms_last_error());
    double t0 = ms_time();
    rc = fuse_argv(cfg, out, "weight", NULL, NULL);
    if (!check(rc == 0, "plain: fuse --method weight of a plain LoRA (%.2f s): %s", ms_time() - t0, rc ? ms_last_error() : "ok"))
        goto done;
    /* the folder: <new0> <new1> with the file's rows, no new_concept_cfg entry */
    JsonValue *ncfg = NULL, *add = NULL;
    snprintf(p, sizeof p, "%s/new_concept_cfg.json", out);
    if (json_parse_file(p, &ncfg) == MS_OK)
        check(ncfg->type == JSON_OBJECT && ncfg->count == 0, "plain: new_concept_cfg.json is {} (%zu entries)", ncfg->count);
    else check(0, "plain: new_concept_cfg.json read: %s", ms_last_error());
    snprintf(p, sizeof p, "%s/tokenizer/added_tokens.json", out);
    if (json_parse_file(p, &add) == MS_OK)
        check(add->count == 2 && json_get_number(add, "<new0>", 0) == 49408 && json_get_number(add, "<new1>", 0) == 49409,
              "plain: added_tokens.json {<new0>: 49408, <new1>: 49409} (%zu tokens)", add->count);
    else check(0, "plain: added_tokens.json read: %s", ms_last_error());
    json_free(ncfg);
    json_free(add);
    /* both ways of sampling */
    MsModel mf, mb;
    ClipTokenizer tf, tb;
    RegionalConcepts rcs;
    EdloraPrompt ep;
    MsTxt2ImgOptions bf, bb;
    memset(&bf, 0, sizeof bf); memset(&bb, 0, sizeof bb); memset(&ep, 0, sizeof ep); memset(&rcs, 0, sizeof rcs);
    const size_t npx = (size_t)3 * 64 * 64;
    float *img[3] = { malloc(npx * sizeof(float)), malloc(npx * sizeof(float)), malloc(npx * sizeof(float)) };
    int hf = 0, hb = 0;
    s = img[0] && img[1] && img[2] ? MS_OK : MS_ERR_NOMEM;
    if (!s) { s = ms_open_model(out, NULL, &mf, &tf, NULL, 0); hf = !s; }
    if (!s) s = regional_concepts_load(out, &tf, ms_unet_cross_attn_layers(&mf.unet_config), &rcs);
    if (!s) s = plain_sample(&mf, &tf, bf, img[0]);
    if (!s) { s = ms_open_model("models/tiny-sd", NULL, &mb, &tb, NULL, 0); hb = !s; }
    if (!s) s = plain_sample(&mb, &tb, bb, img[2]);                /* the base alone: the control */
    if (!s) s = edlora_merge(&mb, &pl, 1.0f);
    if (!s) s = edlora_prepare(&pl, &tb, &mb, &ep, &bb);
    if (!s) s = plain_sample(&mb, &tb, bb, img[1]);
    if (check(!s, "plain: sampled the fused folder and the base with --edlora FILE:1.0 (%s)", s ? ms_last_error() : "ok")) {
        const int V = mb.text_config.vocab_size, D = mb.text_config.hidden_size;
        check(rcs.n_words == 0 && ep.n_new == 2 && mf.text_config.vocab_size == V + 2 && tf.n_added == 2 && tb.n_added == 2,
              "plain: no bound words; vocab %d == %d + the 2 added tokens", mf.text_config.vocab_size, V);
        /* weights: LoRA layers to float rounding, every other weight and the token rows bitwise */
        double worst = 0;
        int n_diff = 0, n_same = 0, bad = 0;
        for (int t = 0; t < 2; t++) {
            const MsParamTable *pa = t ? &mf.unet : &mf.text, *pb = t ? &mb.unet : &mb.text;
            for (int i = 0; i < pa->n; i++) {
                int j = ms_param_find(pb, pa->p[i].name);
                if (!pa->p[i].f32) continue;                 /* position_ids */
                if (!t && !strcmp(pa->p[i].name, "text_model.embeddings.token_embedding.weight"))   /* the new rows */
                    bad += pa->p[i].numel != (size_t)(V + 2) * D ||
                           memcmp(pa->p[i].f32 + (size_t)V * D, ep.new_emb, (size_t)2 * D * sizeof(float)) ||
                           memcmp(pa->p[i].f32, pb->p[j].f32, (size_t)V * D * sizeof(float));
                if (!t && !strcmp(pa->p[i].name, "text_model.embeddings.token_embedding.weight")) continue;
                if (j < 0 || pb->p[j].numel != pa->p[i].numel) { bad++; continue; }
                if (!memcmp(pa->p[i].f32, pb->p[j].f32, pa->p[i].numel * sizeof(float))) { n_same++; continue; }
                n_diff++;
                worst = fmax(worst, test_err_f(pa->p[i].f32, pb->p[j].f32, pa->p[i].numel).rel_l2);
            }
        }
        check(!bad && n_diff + n_same > 0 && worst <= 1e-6, "plain: fused weights == base + 1.0 LoRA merge (%d layers equal to "
              "rounding, worst rel-L2 %.2e; %d bitwise)", n_diff, worst, n_same);
        TestErr e = test_err_f(img[0], img[1], npx), c = test_err_f(img[2], img[1], npx);
        check(e.max_abs <= 1e-4 && c.max_abs > 1e-2, "plain: fused-folder sample == --edlora FILE:1.0 sample (max |d| %.2e, "
              "rel-L2 %.2e; without the LoRA: max |d| %.2e)", e.max_abs, e.rel_l2, c.max_abs);
    }
    edlora_prompt_free(&ep);
    regional_concepts_free(&rcs);
    if (hf) { ms_model_free(&mf); clip_tokenizer_free(&tf); }
    if (hb) { ms_model_free(&mb); clip_tokenizer_free(&tb); }
    for (int k = 0; k < 3; k++) free(img[k]);
done:
    rm_folder(out);
    snprintf(p, sizeof p, "%s.json", out); remove(p);
    remove(lp); remove(cfg); remove(cfg2); remove(dir);
    edlora_free(&a);
    edlora_free(&pl);
}

/* ---- input validation (fuse --check: everything read and checked, no work) ---- */
static void test_validation(void) {
    char dir[256], cfg[300], p[512], outd[300];
    test_tmp(dir, sizeof dir, "fuse_val");
    snprintf(cfg, sizeof cfg, "%s/cfg.json", dir);
    snprintf(outd, sizeof outd, "%s/out", dir);
    make_dir(dir);
    /* a decoy under the JSON's folder with the same relative path as a file in the working
     * directory (the working directory wins), a file only in the JSON's folder, garbage */
    snprintf(p, sizeof p, "%s/tests", dir); make_dir(p);
    snprintf(p, sizeof p, "%s/tests/data", dir); make_dir(p);
    snprintf(p, sizeof p, "%s/tests/data/fuse", dir); make_dir(p);
    snprintf(p, sizeof p, "%s/tests/data/fuse/concept_b.pth", dir); write_text(p, "not a pth");
    snprintf(p, sizeof p, "%s/garbage.pth", dir); write_text(p, "not a pth");
    /* LoRA files: one whose width does not fit (48 wide), one with a layer the model lacks, one
     * with a text-encoder LoRA only, one for the JSON folder (concept_a's LoRA, rank 4) */
    static float z[48 * 48];
    EdloraFile f;
    memset(&f, 0, sizeof f);
    edlora_add_module(&f, 0, "text_model.encoder.layers.0.self_attn.q_proj", 4, 48, 48, z, z);
    edlora_add_module(&f, 1, "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q", 4, 32, 32, z, z);
    snprintf(p, sizeof p, "%s/wide.safetensors", dir); edlora_write(p, &f); edlora_free(&f);
    edlora_add_module(&f, 1, "down_blocks.0.attentions.0.transformer_blocks.5.attn1.to_q", 4, 32, 32, z, z);
    snprintf(p, sizeof p, "%s/nolayer.safetensors", dir); edlora_write(p, &f); edlora_free(&f);
    edlora_add_module(&f, 0, "text_model.encoder.layers.1.self_attn.v_proj", 2, 32, 32, z, z);
    snprintf(p, sizeof p, "%s/te_only.safetensors", dir); edlora_write(p, &f); edlora_free(&f);
    if (edlora_read("tests/data/fuse/concept_a.pth", &f) == MS_OK) {
        snprintf(p, sizeof p, "%s/only_here.safetensors", dir); edlora_write(p, &f); edlora_free(&f);
    }
#define E(path, ua, ta, name) "{\"lora_path\": \"" path "\", \"unet_alpha\": " ua ", \"text_encoder_alpha\": " ta ", \"concept_name\": \"" name "\"}"
#define B E("tests/data/fuse/concept_b.pth", "1", "1", "<dog1> <dog2>")
    static const struct { const char *json; const char *want[3]; } cases[] = {
        { "{\"lora_path\": \"x\"}", { "cfg.json", "expected a JSON array", "found an object" } },
        { "[]", { "cfg.json", "expected a JSON array", "found 0 entries" } },
        { "[" B ", 3]", { "cfg.json", "concept 1", "expected an object" } },
        { "[{\"lora_path\": \"tests/data/fuse/concept_b.pth\", \"unet_alpha\": 1, \"concept_name\": \"<dog1> <dog2>\"}]",
          { "concept 0 ('<dog1> <dog2>')", "missing key 'text_encoder_alpha'", "cfg.json" } },
        { "[" B ", " E("tests/data/fuse/concept_a.pth", "null", "1", "<cat1> <cat2>") "]",
          { "concept 1 ('<cat1> <cat2>')", "'unet_alpha' is null, expected a number", "cfg.json" } },
        { "[" B ", " E("tests/data/fuse/concept_a.pth", "1", "\"0.5\"", "<cat1> <cat2>") "]",
          { "concept 1 ('<cat1> <cat2>')", "'text_encoder_alpha' is a string", "cfg.json" } },
        { "[{\"lora_path\": 5, \"unet_alpha\": 1, \"text_encoder_alpha\": 1, \"concept_name\": \"x\"}]",
          { "concept 0 ('x')", "'lora_path' is a number, expected a string", "cfg.json" } },
        { "[" B ", " E("nope.pth", "1", "1", "<cat1>") "]",
          { "concept 1 ('<cat1>')", "lora_path 'nope.pth' not found", "fuse_val/nope.pth" } },
        { "[" B ", " E("garbage.pth", "1", "1", "cat") "]", { "concept 1 ('cat', ", "fuse_val/garbage.pth)", "cfg.json" } },
        { "[" B ", " E("wide.safetensors", "1", "1", "cat") "]",
          { "concept 1 ('cat', ", "fuse_val/wide.safetensors)", "maps 48 -> 48" } },
        { "[" B ", " E("nolayer.safetensors", "1", "1", "cat") "]",
          { "concept 1 ('cat'", "transformer_blocks.5.attn1.to_q", "no such LoRA module" } },
        { "[" B ", " E("te_only.safetensors", "1", "1", "cat") "]", { "concept 1 ('cat'", "has no UNet LoRA", "--no-spatial" } },
        { "[" B ", " E("tests/data/fuse/concept_a.pth", "1", "1", "<zebra1>") "]",
          { "concept 1 ('<zebra1>'", "<zebra1> is not in the file", "concept_a.pth" } },
        /* accepted: unknown key (a warning), the working directory before the JSON's folder, a file
         * only in the JSON's folder, a LoRA without words or UNet part with --no-spatial, ranks 2 vs 4 */
        { "[" B ", {\"lora_path\": \"only_here.safetensors\", \"unet_alpha\": 1, \"text_encoder_alpha\": 1, \"concept_name\": \"<cat1>\", \"comment\": 1}]", { NULL } },
        { "[" B ", " E("te_only.safetensors", "1", "1", "a cat") "]", { NULL } },
    };
    for (size_t k = 0; k < sizeof cases / sizeof cases[0]; k++) {
        if (!write_text(cfg, cases[k].json)) { check(0, "validation %zu: JSON written", k); continue; }
        int last = k + 1 == sizeof cases / sizeof cases[0];
        int rc = fuse_argv(cfg, outd, "gram", "--check", last ? "--no-spatial" : NULL);
        const char *msg = ms_last_error();
        if (!cases[k].want[0]) { check(rc == 0, "validation %zu: accepted (rc %d) %s", k, rc, rc ? msg : ""); continue; }
        int ok = rc != 0;
        for (int w = 0; w < 3; w++) ok &= strstr(msg, cases[k].want[w]) != NULL;
        check(ok, "validation %zu: refused before any work (rc %d): %s", k, rc, msg);
    }
#undef B
#undef E
    static const char *const files[] = { "cfg.json", "tests/data/fuse/concept_b.pth", "garbage.pth", "wide.safetensors",
                                         "nolayer.safetensors", "te_only.safetensors", "only_here.safetensors",
                                         "tests/data/fuse", "tests/data", "tests", "" };
    for (size_t k = 0; k < sizeof files / sizeof files[0]; k++) { snprintf(p, sizeof p, "%s/%s", dir, files[k]); remove(p); }
}

int main(void) {
    test_trust_region();
    test_end_to_end();
    test_kohya_read();
    test_kohya_bad();
    test_kohya_fuse();
    test_plain_lora();
    test_validation();
    test_eigen();
    StFile f;
    if (check(st_open(&f, GOLDEN) == MS_OK, "open %s", GOLDEN)) {
        test_case(&f, "under");
        test_case(&f, "illcond");
        test_case(&f, "over");
        st_close(&f);
    }
    return test_summary("test_fuse");
}
