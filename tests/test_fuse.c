/* tests/test_fuse.c — gradient fusion (mixshow.c) and L-BFGS (models/optim.c):
 *   - the symmetric eigen-decomposition (reconstruction, orthonormality, order);
 *   - the objective from statistics == from rows; the gram solution is a minimiser (gradient 0)
 *     and the one nearest to W0 (its change lies in range(G));
 *   - against the official update_quasi_newton (tests/data/fuse/lbfgs_golden.safetensors,
 *     tools/ref/gen_fuse_golden.py): our L-BFGS follows its loss trace (first 10 closure values to
 *     rel 1e-4) and ends no worse than 1.01x; gram reaches an objective <= the official one, and
 *     equals its W where the problem is underdetermined. */
#include "tests/test.h"
#include "tools/tools.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define GOLDEN "tests/data/fuse/lbfgs_golden.safetensors"

static double f64_at(const StTensor *t, size_t i) {
    const unsigned char *p = t->data + 8 * i;
    uint64_t u = 0;
    double d;
    for (int k = 7; k >= 0; k--) u = (u << 8) | p[k];
    memcpy(&d, &u, sizeof d);
    return d;
}

static int64_t i64_at(const StTensor *t) {
    int64_t v = 0;
    for (int k = 7; k >= 0; k--) v = (int64_t)(((uint64_t)v << 8) | t->data[k]);
    return v;
}

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

static int run_fuse(const char *method, const char *cfg, const char *out, const char *report) {
    char *argv[] = { "fuse", "--model", "models/tiny-sd", "--concepts", (char *)cfg, "--out", (char *)out,
                     "--method", (char *)method, "--report", (char *)report, "--textenc-iters", "100",
                     "--spatial-size", "16", "--spatial-steps", "4" };   /* spatial stage: a quick run */
    rm_folder(out);
    return cmd_fuse((int)(sizeof argv / sizeof argv[0]), argv);
}

static void test_end_to_end(void) {
    static const char *const meth[3] = { "gram", "lbfgs", "weight" };
    JsonValue *rep[3] = { NULL, NULL, NULL };
    char out[3][256], rp[3][256];
    for (int k = 0; k < 3; k++) {
        snprintf(out[k], sizeof out[k], "/tmp/mixshow_test_fuse_%s", meth[k]);
        snprintf(rp[k], sizeof rp[k], "/tmp/mixshow_test_fuse_%s.json", meth[k]);
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
    /* bad inputs: an error before any work */
    static const char *const bad[][2] = {
        { "[{\"lora_path\": \"nope.pth\", \"unet_alpha\": 1, \"text_encoder_alpha\": 1, \"concept_name\": \"<a1>\"}]", "not found" },
        { "[{\"lora_path\": \"concept_a.pth\", \"unet_alpha\": \"1\", \"text_encoder_alpha\": 1, \"concept_name\": \"<cat1>\"}]", "unet_alpha" },
        { "[{\"lora_path\": \"concept_a.pth\", \"unet_alpha\": 1, \"text_encoder_alpha\": 1, \"concept_name\": \"<zebra1>\"}]", "<zebra1>" },
    };
    for (size_t k = 0; k < sizeof bad / sizeof bad[0]; k++) {
        FILE *f = fopen("tests/data/fuse/bad_tmp.json", "wb");
        if (!f) continue;
        fputs(bad[k][0], f);
        fclose(f);
        ms_clear_error();
        int rc = run_fuse("gram", "tests/data/fuse/bad_tmp.json", "/tmp/mixshow_test_fuse_bad", "/tmp/mixshow_test_fuse_bad.json");
        check(rc != 0 && strstr(ms_last_error(), bad[k][1]) != NULL, "fuse: bad input %zu refused: %s", k, ms_last_error());
    }
    remove("tests/data/fuse/bad_tmp.json");
}

int main(void) {
    test_end_to_end();
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
