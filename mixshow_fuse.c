/* mixshow_fuse.c — Mix-of-Show gradient fusion (arXiv:2305.18292, "Gradient Fusion"; official
 * code: gradient_fusion.py of Mix-of-Show commit 51270fd). A section to be folded into mixshow.c.
 *
 * Every layer W0 (d_out, d_in) that some concept's LoRA touches is replaced by one W that does,
 * on each concept's own recorded inputs, what that concept's merged layer W_i = W0 + a_i up_i down_i
 * does:
 *     f(W) = sum_i ||X_i W^T - V_i||^2 / (n d_out),   V_i = X_i W_i^T  (bias removed),  n = sum n_i
 * f is a convex quadratic in W: with G = sum_i X_i^T X_i and C = sum_i V_i^T X_i,
 *     f(W) = (sum||V||^2 - 2 <W, C> + <W G, W>) / (n d_out),   grad f = 2 (W G - C) / (n d_out).
 * Its minimisers solve W G = C. Three ways to pick W:
 *   gram   (default) the minimiser nearest to W0: W = W0 + (C - W0 G) G+, in double, G+ from a
 *          symmetric eigen-decomposition with eigenvalues below MS_FUSE_RCOND * max dropped;
 *   lbfgs  the official: torch.optim.LBFGS from W0 (history 25, strong Wolfe, lr 1, tolerances
 *          1e-16, max_iter 500 text / 50 UNet), returning the best W seen (the official closure
 *          clones W whenever the loss drops; that W, not the last, is what it saves);
 *   weight the paper's baseline W0 + sum_i a_i up_i down_i.
 * Why gram is the same answer: L-BFGS from W0 only moves W inside W0 + span{rows of gradients}
 * = W0 + (range of G) on the input side, so where it converges it lands on the minimiser whose
 * change lies in range(G): exactly W0 + (C - W0 G) G+. On ill-conditioned layers it stops short.
 *
 * Which inputs are recorded (gradient_fusion.py):
 *   text encoder q/k/v/out_proj: each concept's merged text encoder encodes the 32 bound prompts
 *     of ["photo of a {concept}", "{concept}"] (16 layer variants each, no padding); every token
 *     row that reaches the layer is a row of X (q, k, v share their input layer_norm1(x));
 *   UNet attn2.to_k/to_v of cross-attention layer l: the FUSED text encoder's last_hidden_state
 *     of the two prompts bound for layer l, at the positions whose id >= 49407 (the concept
 *     tokens and EOS), targets from the concept's merged to_k/to_v;
 *   the other UNet attention layers: 20-step DPM-Solver sampling at 512x512 (not done here yet).
 */
#include "mixshow.h"

#include <float.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

const char *ms_fuse_method_name(MsFuseMethod m) {
    return m == MS_FUSE_GRAM ? "gram" : m == MS_FUSE_LBFGS ? "lbfgs" : m == MS_FUSE_WEIGHT ? "weight" : "?";
}

/* ---- recorded rows ---- */
MsStatus ms_fuse_rows_init(MsFuseRows *r, int d_in, int n_concepts) {
    memset(r, 0, sizeof *r);
    if (d_in <= 0 || n_concepts <= 0) return ms_errorf(MS_ERR_ARG, "fuse: rows of width %d for %d concepts", d_in, n_concepts);
    r->end = (size_t *)calloc((size_t)n_concepts, sizeof(size_t));
    if (!r->end) return ms_errorf(MS_ERR_NOMEM, "fuse: out of memory");
    r->d_in = d_in;
    r->n_concepts = n_concepts;
    return MS_OK;
}

MsStatus ms_fuse_rows_add(MsFuseRows *r, int concept, const float *X, size_t n) {
    size_t need, bytes;
    if (concept < 0 || concept >= r->n_concepts) return ms_errorf(MS_ERR_ARG, "fuse: concept %d of %d", concept, r->n_concepts);
    for (int c = concept + 1; c < r->n_concepts; c++)
        if (r->end[c] != r->end[concept]) return ms_errorf(MS_ERR_ARG, "fuse: rows of concept %d after concept %d", concept, c);
    if (!ms_add_ok(r->n, n, &need)) return ms_errorf(MS_ERR_NOMEM, "fuse: row count overflows");
    if (need > r->cap) {
        size_t cap = r->cap ? r->cap : 64;
        while (cap < need) cap *= 2;
        if (!ms_mul_ok(cap, (size_t)r->d_in * sizeof(float), &bytes)) return ms_errorf(MS_ERR_NOMEM, "fuse: rows overflow");
        float *X2 = (float *)realloc(r->X, bytes);
        if (!X2) return ms_errorf(MS_ERR_NOMEM, "fuse: cannot keep %zu rows of %d floats", cap, r->d_in);
        r->X = X2;
        r->cap = cap;
    }
    if (n) memcpy(r->X + r->n * (size_t)r->d_in, X, n * (size_t)r->d_in * sizeof(float));
    r->n = need;
    for (int c = concept; c < r->n_concepts; c++) r->end[c] = need;
    return MS_OK;
}

void ms_fuse_rows_free(MsFuseRows *r) {
    free(r->X);
    free(r->end);
    memset(r, 0, sizeof *r);
}

/* ---- statistics ---- */
MsStatus ms_fuse_stats_init(MsFuseStats *s, int d_in, int d_out) {
    memset(s, 0, sizeof *s);
    s->G = (double *)calloc((size_t)d_in * d_in, sizeof(double));
    s->C = (double *)calloc((size_t)d_out * d_in, sizeof(double));
    if (!s->G || !s->C) { ms_fuse_stats_free(s); return ms_errorf(MS_ERR_NOMEM, "fuse: statistics of a %dx%d layer", d_out, d_in); }
    s->d_in = d_in;
    s->d_out = d_out;
    return MS_OK;
}

void ms_fuse_stats_free(MsFuseStats *s) {
    free(s->G);
    free(s->C);
    memset(s, 0, sizeof *s);
}

void ms_fuse_merged_weight(float *Wc, const float *W0, const MsFuseDelta *d, int d_out, int d_in) {
    const size_t m = (size_t)d_out * d_in;
    if (!d || !d->down || d->rank <= 0) { memcpy(Wc, W0, m * sizeof(float)); return; }
    /* merge_lora_into_weight: original + alpha * (up @ down), the product in float32 */
    ms_gemm_ref(0, 0, d_out, d_in, d->rank, 1.0f, d->up, d->rank, d->down, d_in, 0.0f, Wc, d_in);
    for (size_t k = 0; k < m; k++) Wc[k] = W0[k] + d->alpha * Wc[k];
}

/* G += X^T X, C += V^T X with V = X Wc^T, vv += sum V^2, all in double. */
MsStatus ms_fuse_stats_add(MsFuseStats *s, const float *X, size_t n, const float *Wc) {
    const int di = s->d_in, dout = s->d_out;
    double *v = (double *)malloc((size_t)dout * sizeof(double));
    if (!v) return ms_errorf(MS_ERR_NOMEM, "fuse: out of memory");
    for (size_t r = 0; r < n; r++) {
        const float *x = X + r * (size_t)di;
        for (int i = 0; i < di; i++) {
            double xi = x[i];
            if (xi == 0.0) continue;
            double *g = s->G + (size_t)i * di;
            for (int j = 0; j < di; j++) g[j] += xi * x[j];
        }
        for (int o = 0; o < dout; o++) {
            const float *w = Wc + (size_t)o * di;
            double acc = 0.0;
            for (int i = 0; i < di; i++) acc += (double)w[i] * x[i];
            v[o] = acc;
            s->vv += acc * acc;
            double *c = s->C + (size_t)o * di;
            for (int i = 0; i < di; i++) c[i] += acc * x[i];
        }
    }
    s->n += n;
    free(v);
    return MS_OK;
}

double ms_fuse_objective_stats(const MsFuseStats *s, const float *W) {
    const int di = s->d_in;
    double f = s->vv;
    for (int o = 0; o < s->d_out; o++) {
        const float *w = W + (size_t)o * di;
        const double *c = s->C + (size_t)o * di;
        double wc = 0.0, wgw = 0.0;
        for (int i = 0; i < di; i++) {
            const double *g = s->G + (size_t)i * di;
            double gw = 0.0;
            for (int j = 0; j < di; j++) gw += g[j] * w[j];
            wgw += w[i] * gw;
            wc += w[i] * c[i];
        }
        f += wgw - 2.0 * wc;
    }
    return s->n ? f / ((double)s->n * s->d_out) : 0.0;
}

double ms_fuse_objective_rows(const MsFuseRows *r, const float *W0, const MsFuseDelta *d, int d_out, const float *W) {
    const int di = r->d_in;
    const size_t m = (size_t)d_out * di;
    double *D = (double *)malloc(m * sizeof(double));
    float *Wc = (float *)malloc(m * sizeof(float));
    double f = 0.0;
    if (!D || !Wc) { free(D); free(Wc); return NAN; }
    size_t start = 0;
    for (int c = 0; c < r->n_concepts; c++) {
        ms_fuse_merged_weight(Wc, W0, d ? &d[c] : NULL, d_out, di);
        for (size_t k = 0; k < m; k++) D[k] = (double)W[k] - (double)Wc[k];   /* x (W - W_i)^T = x W^T - v */
        for (size_t row = start; row < r->end[c]; row++) {
            const float *x = r->X + row * (size_t)di;
            for (int o = 0; o < d_out; o++) {
                const double *dr = D + (size_t)o * di;
                double acc = 0.0;
                for (int i = 0; i < di; i++) acc += dr[i] * x[i];
                f += acc * acc;
            }
        }
        start = r->end[c];
    }
    free(D); free(Wc);
    return r->n ? f / ((double)r->n * d_out) : 0.0;
}

/* ---- symmetric eigen-decomposition: cyclic Jacobi (Rutishauser's thresholds) ----
 * Each rotation in the (p,q) plane zeroes A[p][q]:
 *   theta = (a_qq - a_pp) / (2 a_pq),  t = sgn(theta) / (|theta| + sqrt(theta^2 + 1)),
 *   c = 1/sqrt(t^2+1), s = t c:  a_pp -= t a_pq, a_qq += t a_pq, other rows/columns rotate.
 * The sum of squares off the diagonal falls quadratically once small; 6-10 sweeps in double.
 * Jacobi is accurate to eps * ||A|| in every eigenvalue, small ones included. */
MsStatus ms_sym_eigen(double *A, int n, double *w, double *V) {
    double *b = (double *)malloc(2 * (size_t)n * sizeof(double)), *z;
    if (!b) return ms_errorf(MS_ERR_NOMEM, "eigen: %d x %d", n, n);
    z = b + n;
#define A_(i, j) A[(size_t)(i) * n + (j)]
#define V_(i, j) V[(size_t)(i) * n + (j)]
    for (int i = 0; i < n; i++) {
        for (int j = 0; j < n; j++) V_(i, j) = i == j;
        b[i] = w[i] = A_(i, i);
        z[i] = 0.0;
    }
    int sweep;
    for (sweep = 1; sweep <= 100; sweep++) {
        double sm = 0.0;
        for (int p = 0; p < n; p++) for (int q = p + 1; q < n; q++) sm += fabs(A_(p, q));
        if (sm == 0.0) break;
        double tresh = sweep < 4 ? 0.2 * sm / ((double)n * n) : 0.0;
        for (int p = 0; p < n; p++) for (int q = p + 1; q < n; q++) {
            double apq = A_(p, q), g = 100.0 * fabs(apq);
            if (sweep > 4 && fabs(w[p]) + g == fabs(w[p]) && fabs(w[q]) + g == fabs(w[q])) { A_(p, q) = 0.0; continue; }
            if (fabs(apq) <= tresh) continue;
            double h = w[q] - w[p], t;
            if (fabs(h) + g == fabs(h)) t = apq / h;
            else {
                double theta = 0.5 * h / apq;
                t = 1.0 / (fabs(theta) + sqrt(1.0 + theta * theta));
                if (theta < 0.0) t = -t;
            }
            double c = 1.0 / sqrt(1.0 + t * t), s = t * c, tau = s / (1.0 + c);
            h = t * apq;
            z[p] -= h; z[q] += h; w[p] -= h; w[q] += h;
            A_(p, q) = 0.0;
#define ROT(M, i, j, k, l) do { double g_ = M(i, j), h_ = M(k, l); \
            M(i, j) = g_ - s * (h_ + g_ * tau); M(k, l) = h_ + s * (g_ - h_ * tau); } while (0)
            for (int j = 0; j < p; j++) ROT(A_, j, p, j, q);
            for (int j = p + 1; j < q; j++) ROT(A_, p, j, j, q);
            for (int j = q + 1; j < n; j++) ROT(A_, p, j, q, j);
            for (int j = 0; j < n; j++) ROT(V_, j, p, j, q);
#undef ROT
        }
        for (int p = 0; p < n; p++) { b[p] += z[p]; w[p] = b[p]; z[p] = 0.0; }
    }
    /* sort ascending (selection sort: n swaps of columns) */
    for (int i = 0; i < n - 1; i++) {
        int k = i;
        for (int j = i + 1; j < n; j++) if (w[j] < w[k]) k = j;
        if (k != i) {
            double t = w[i]; w[i] = w[k]; w[k] = t;
            for (int r = 0; r < n; r++) { t = V_(r, i); V_(r, i) = V_(r, k); V_(r, k) = t; }
        }
    }
#undef A_
#undef V_
    free(b);
    if (sweep > 100) return ms_errorf(MS_ERR_FORMAT, "eigen: Jacobi did not converge in 100 sweeps (n %d)", n);
    return MS_OK;
}

/* ---- solvers ---- */
/* W = W0 + R G+ with R = C - W0 G (d_out, d_in); G = Q diag(l) Q^T, G+ = Q diag(1/l, l > cut) Q^T.
 * Cut-off: G is summed in double from float rows, so its entries carry relative errors of about
 * n_rows * 2^-53 at worst (1e-11 for 1e5 rows, far less in practice), and Jacobi adds eps*||G||:
 * eigenvalues below 1e-12 * max are noise, and inverting them would move W along directions the
 * data does not determine. Dropping a true eigenvalue l changes f by at most l |dW q|^2, a
 * 1e-12 fraction of what that direction can hold. */
MsStatus ms_fuse_solve_gram(const MsFuseStats *s, const float *W0, float *W, double rcond, int *rank) {
    const int di = s->d_in, dout = s->d_out;
    const size_t dd = (size_t)di * di;
    if (rcond <= 0.0) rcond = MS_FUSE_RCOND;
    double *A = (double *)malloc((2 * dd + (size_t)di + 2 * (size_t)dout * di) * sizeof(double));
    if (!A) return ms_errorf(MS_ERR_NOMEM, "fuse: gram solve of a %dx%d layer", dout, di);
    double *Q = A + dd, *l = Q + dd, *R = l + di, *P = R + (size_t)dout * di;
    memcpy(A, s->G, dd * sizeof(double));
    MsStatus st = ms_sym_eigen(A, di, l, Q);
    if (st) { free(A); return st; }
    double lmax = di > 0 ? l[di - 1] : 0.0, cut = rcond * lmax;
    int kept = 0;
    /* R = C - W0 G */
    for (int o = 0; o < dout; o++) {
        const float *w0 = W0 + (size_t)o * di;
        for (int j = 0; j < di; j++) {
            double acc = 0.0;
            for (int i = 0; i < di; i++) acc += (double)w0[i] * s->G[(size_t)i * di + j];
            R[(size_t)o * di + j] = s->C[(size_t)o * di + j] - acc;
        }
    }
    /* P = R Q diag(1/l) (kept columns), then W = W0 + P Q^T */
    for (int k = 0; k < di; k++) if (lmax > 0.0 && l[k] > cut) kept++;
    for (int o = 0; o < dout; o++) {
        const double *r = R + (size_t)o * di;
        double *p = P + (size_t)o * di;
        for (int k = 0; k < di; k++) {
            if (!(lmax > 0.0 && l[k] > cut)) { p[k] = 0.0; continue; }
            double acc = 0.0;
            for (int i = 0; i < di; i++) acc += r[i] * Q[(size_t)i * di + k];
            p[k] = acc / l[k];
        }
        for (int j = 0; j < di; j++) {
            double acc = 0.0;
            const double *q = Q + (size_t)j * di;
            for (int k = 0; k < di; k++) acc += p[k] * q[k];
            W[(size_t)o * di + j] = (float)((double)W0[(size_t)o * di + j] + acc);
        }
    }
    if (rank) *rank = kept;
    free(A);
    return MS_OK;
}

/* The official closure on the statistics: f(W) as above and its gradient 2 (W G - C) / (n d_out). */
static double fuse_closure(void *ctx, const float *W, float *grad) {
    const MsFuseStats *s = (const MsFuseStats *)ctx;
    const int di = s->d_in;
    const double scale = s->n ? 1.0 / ((double)s->n * s->d_out) : 0.0;
    double f = s->vv;
    for (int o = 0; o < s->d_out; o++) {
        const float *w = W + (size_t)o * di;
        const double *c = s->C + (size_t)o * di;
        double wgw = 0.0, wc = 0.0;
        for (int j = 0; j < di; j++) {   /* (W G)[o][j], G symmetric */
            const double *g = s->G + (size_t)j * di;
            double gw = 0.0;
            for (int i = 0; i < di; i++) gw += g[i] * w[i];
            wgw += w[j] * gw;
            wc += w[j] * c[j];
            grad[(size_t)o * di + j] = (float)(2.0 * (gw - c[j]) * scale);
        }
        f += wgw - 2.0 * wc;
    }
    return f * scale;
}

MsStatus ms_fuse_solve_lbfgs(const MsFuseStats *s, const float *W0, float *W, int iters, double *trace,
                             int trace_cap, MsLbfgsResult *res) {
    const size_t m = (size_t)s->d_out * s->d_in;
    MsLbfgsOptions o;
    ms_lbfgs_defaults(&o);
    o.max_iter = iters;
    o.max_eval = iters * 5 / 4;
    o.history_size = 25;
    o.tolerance_grad = 1e-16;      /* gradient_fusion.py update_quasi_newton */
    o.tolerance_change = 1e-16;
    o.strong_wolfe = 1;
    float *x = (float *)malloc(m * sizeof(float));
    if (!x) return ms_errorf(MS_ERR_NOMEM, "fuse: lbfgs on a %dx%d layer", s->d_out, s->d_in);
    memcpy(x, W0, m * sizeof(float));
    MsStatus st = ms_lbfgs(x, m, fuse_closure, (void *)s, &o, W, trace, trace_cap, res);
    free(x);
    return st;
}

MsStatus ms_fuse_weight(float *W, const float *W0, const MsFuseDelta *d, int n_concepts, int d_out, int d_in) {
    const size_t m = (size_t)d_out * d_in;
    float *t = (float *)malloc(m * sizeof(float));
    memcpy(W, W0, m * sizeof(float));
    if (!t) return ms_errorf(MS_ERR_NOMEM, "fuse: out of memory");
    for (int c = 0; c < n_concepts; c++) {
        if (!d[c].down || d[c].rank <= 0) continue;
        ms_gemm_ref(0, 0, d_out, d_in, d[c].rank, 1.0f, d[c].up, d[c].rank, d[c].down, d_in, 0.0f, t, d_in);
        for (size_t k = 0; k < m; k++) W[k] += d[c].alpha * t[k];
    }
    free(t);
    return MS_OK;
}

/* ==========================================================================================
 * The per-layer loop over a model: record, solve, write back (text encoder, cross-attention K/V)
 * ======================================================================================== */
#include <stdio.h>

#define FUSE_TEMPLATE "photo of a "          /* TEMPLATE_SIMPLE = 'photo of a {}' */
#define FUSE_EOS 49407                       /* get_text_feature: positions where id >= 49407 */

/* str.replace(word, token) for every bound word in order (bind_concept_prompt, variant i). */
static char *fuse_bind(const char *prompt, const MsFuseTokens *t, int i) {
    size_t cap = strlen(prompt) * 4 + 256;
    char *a = (char *)malloc(cap), *b = (char *)malloc(cap);
    if (!a || !b) { free(a); free(b); return NULL; }
    snprintf(a, cap, "%s", prompt);
    for (int w = 0; w < t->n_bind; w++) {
        const char *word = t->bind_word[w], *tok = t->bind_token[(size_t)w * t->n_layers + i];
        size_t lw = strlen(word), lt = strlen(tok), o = 0;
        if (!lw) continue;
        for (const char *p = a; *p;) {
            if (!strncmp(p, word, lw)) {
                if (o + lt + 1 >= cap) break;
                memcpy(b + o, tok, lt); o += lt; p += lw;
            } else {
                if (o + 2 >= cap) break;
                b[o++] = *p++;
            }
        }
        b[o] = '\0';
        char *sw = a; a = b; b = sw;
    }
    free(b);
    return a;
}

/* tokenizer(text, truncation=True, max_length=77, padding='do_not_pad').input_ids */
static MsStatus fuse_tokens(const ClipTokenizer *tok, const char *text, int32_t *ids, int *T, int max_len) {
    size_t n = 0;
    MsStatus s = clip_tokenize_raw(tok, text, strlen(text), ids + 1, (size_t)max_len - 2, &n);
    if (s) return s;
    if (n > (size_t)max_len - 2) n = (size_t)max_len - 2;
    ids[0] = tok->bos_id;
    ids[n + 1] = tok->eos_id;
    *T = (int)n + 2;
    return MS_OK;
}

static MsStatus report_add(MsFuseReport *rep, const char *layer, const char *stage, size_t rows, double f0,
                           double fw, double ff, int rank, const double *trace, int n_trace, double sec) {
    if (!rep) return MS_OK;
    if (rep->n == rep->cap) {
        int cap = rep->cap ? 2 * rep->cap : 64;
        MsFuseLayerReport *l = (MsFuseLayerReport *)realloc(rep->l, (size_t)cap * sizeof *l);
        if (!l) return ms_errorf(MS_ERR_NOMEM, "fuse: report");
        rep->l = l; rep->cap = cap;
    }
    MsFuseLayerReport *e = &rep->l[rep->n];
    memset(e, 0, sizeof *e);
    snprintf(e->layer, sizeof e->layer, "%s", layer);
    snprintf(e->stage, sizeof e->stage, "%s", stage);
    e->rows = rows; e->f_w0 = f0; e->f_weight = fw; e->f_fused = ff; e->rank = rank; e->seconds = sec;
    if (n_trace > 0 && trace) {
        e->trace = (double *)malloc((size_t)n_trace * sizeof(double));
        if (!e->trace) return ms_errorf(MS_ERR_NOMEM, "fuse: report");
        memcpy(e->trace, trace, (size_t)n_trace * sizeof(double));
        e->n_trace = n_trace;
    }
    rep->n++;
    return MS_OK;
}

void ms_fuse_report_free(MsFuseReport *rep) {
    for (int i = 0; i < rep->n; i++) free(rep->l[i].trace);
    free(rep->l);
    memset(rep, 0, sizeof *rep);
}

/* One layer: W0 = *param (f32, d_out x d_in), rows of every concept, deltas; solve with the
 * chosen method, report f(W0), f(weight), f(fused) exactly from the rows, write W into param. */
static MsStatus fuse_layer(MsParam *param, const MsFuseRows *R, const MsFuseDelta *d, const MsFuseOptions *o,
                           int iters, const char *stage, MsFuseReport *rep) {
    const int dout = (int)param->shape[0], di = R->d_in;
    const size_t m = (size_t)dout * di;
    double t0 = ms_time();
    if (!param->f32) return ms_errorf(MS_ERR_UNSUPPORTED, "fuse: %s holds no f32 data", param->name);
    if (param->ndim != 2 || param->shape[1] != di)
        return ms_errorf(MS_ERR_SHAPE, "fuse: %s is not a (%d, %d) matrix", param->name, dout, di);
    float *W0 = (float *)malloc(m * sizeof(float)), *Wc = (float *)malloc(m * sizeof(float));
    float *Ww = (float *)malloc(m * sizeof(float)), *W = (float *)malloc(m * sizeof(float));
    double *trace = NULL;
    int n_trace = 0, rank = 0;
    MsFuseStats S;
    MsStatus s = ms_fuse_stats_init(&S, di, dout);
    if (!s && (!W0 || !Wc || !Ww || !W)) s = ms_errorf(MS_ERR_NOMEM, "fuse: %s", param->name);
    if (!s) {
        memcpy(W0, param->f32, m * sizeof(float));
        size_t start = 0;
        for (int c = 0; c < R->n_concepts && !s; c++) {
            ms_fuse_merged_weight(Wc, W0, &d[c], dout, di);
            s = ms_fuse_stats_add(&S, R->X + start * di, R->end[c] - start, Wc);
            start = R->end[c];
        }
    }
    if (!s) s = ms_fuse_weight(Ww, W0, d, R->n_concepts, dout, di);
    if (!s) {
        if (o->method == MS_FUSE_GRAM) s = ms_fuse_solve_gram(&S, W0, W, o->rcond, &rank);
        else if (o->method == MS_FUSE_WEIGHT) memcpy(W, Ww, m * sizeof(float));
        else {
            MsLbfgsResult res;
            int cap = iters * 5 / 4 + 64;
            trace = (double *)malloc((size_t)cap * sizeof(double));
            if (!trace) s = ms_errorf(MS_ERR_NOMEM, "fuse: trace");
            if (!s) s = ms_fuse_solve_lbfgs(&S, W0, W, iters, trace, cap, &res);
            n_trace = res.n_evals < cap ? res.n_evals : cap;
        }
    }
    if (!s) {
        double f0 = ms_fuse_objective_rows(R, W0, d, dout, W0);
        double fw = ms_fuse_objective_rows(R, W0, d, dout, Ww);
        double ff = ms_fuse_objective_rows(R, W0, d, dout, W);
        char key[MS_KEY_MAX];
        snprintf(key, sizeof key, "%s", param->name);
        memcpy(param->f32, W, m * sizeof(float));
        s = report_add(rep, key, stage, R->n, f0, fw, ff, rank, trace, n_trace, ms_time() - t0);
        if (o->verbose)
            fprintf(stderr, "  [%s] %-60s rows %6zu  f(W0) %.4e  weight %.4e  %s %.4e\n", stage, key, R->n, f0, fw,
                    ms_fuse_method_name(o->method), ff);
    }
    free(W0); free(Wc); free(Ww); free(W); free(trace);
    ms_fuse_stats_free(&S);
    return s;
}

static MsParam *find_param(MsParamTable *t, const char *name) {
    int i = ms_param_find(t, name);
    return i < 0 ? NULL : &t->p[i];
}

MsStatus ms_fuse_text_kv(MsModel *m, const UNetParams *up, const ClipTokenizer *tok, const MsFuseTokens *tk,
                         const MsFuseConcept *cs, int n, const MsFuseOptions *o, MsFuseReport *rep) {
    const ClipTextConfig *tc = &m->text_config;
    const int L = tc->num_hidden_layers, D = tc->hidden_size, P = tc->max_position_embeddings;
    const int NL = ms_unet_cross_attn_layers(&m->unet_config);
    static const char *const proj[4] = { "q_proj", "k_proj", "v_proj", "out_proj" };
    MsFuseRows *rows = NULL;        /* text: [l*2 + 0] layer_norm1 out (q,k,v), [l*2 + 1] attention out; kv: [2L + i] */
    ClipTextParams tp;
    Arena ar = { 0 };
    int32_t *ids = NULL;
    int max_rank = 0, any_te = 0, any_kv = 0;
    MsStatus s = MS_OK;
    if (tk->n_layers != NL) return ms_errorf(MS_ERR_ARG, "fuse: %d token variants per word, the UNet has %d cross-attention layers", tk->n_layers, NL);
    for (int c = 0; c < n; c++) {
        if (cs[c].te && cs[c].te->rank > max_rank) max_rank = cs[c].te->rank;
        for (int k = 0; cs[c].te_has && k < L * 4; k++) any_te |= cs[c].te_has[k];
        for (int i = 0; cs[c].unet_has && i < NL; i++) any_kv |= cs[c].unet_has[4 * (2 * i + 1) + 1] | cs[c].unet_has[4 * (2 * i + 1) + 2];
    }
    rows = (MsFuseRows *)calloc((size_t)(2 * L + NL), sizeof *rows);
    ids = (int32_t *)malloc((size_t)P * sizeof(int32_t));
    if (!rows || !ids) { s = ms_errorf(MS_ERR_NOMEM, "fuse: out of memory"); goto done; }
    for (int k = 0; k < 2 * L + NL && !s; k++) s = ms_fuse_rows_init(&rows[k], k < 2 * L ? D : D, n);
    if (!s) s = clip_text_params(&tp, &m->text, tc);
    if (!s) s = arena_init(&ar, clip_text_sizes(tc, 1, P, max_rank, 1));
    if (s) goto done;

    /* ---- step 4 (merge_text_encoder): record each concept's text-encoder layer inputs ---- */
    double t0 = ms_time();
    for (int c = 0; c < n && any_te && !s; c++) {
        char base[2][1024];
        snprintf(base[0], sizeof base[0], FUSE_TEMPLATE "%s", cs[c].name);
        snprintf(base[1], sizeof base[1], "%s", cs[c].name);
        for (int b = 0; b < 2 && !s; b++)
            for (int i = 0; i < NL && !s; i++) {
                char *p = fuse_bind(base[b], tk, i);
                int T = 0;
                ClipTextActs a;
                if (!p) { s = ms_errorf(MS_ERR_NOMEM, "fuse: prompt"); break; }
                s = fuse_tokens(tok, p, ids, &T, P);
                free(p);
                arena_reset(&ar, 0);
                if (!s) s = clip_text_acts_alloc(&a, &ar, tc, 1, T, max_rank, 1);
                if (!s) s = clip_text_forward(&a, &tp, cs[c].te, ids, tk->new_emb, tk->n_new, tc);
                for (int l = 0; l < L && !s; l++) {     /* the hooks: inputs of q/k/v (shared) and out_proj */
                    s = ms_fuse_rows_add(&rows[2 * l], c, a.l[l].ln1, (size_t)T);
                    if (!s) s = ms_fuse_rows_add(&rows[2 * l + 1], c, a.l[l].attn, (size_t)T);
                }
            }
    }
    /* ---- solve every text-encoder layer some concept's LoRA touches ---- */
    for (int l = 0; l < L && any_te && !s; l++)
        for (int j = 0; j < 4 && !s; j++) {
            int touched = 0;
            MsFuseDelta d[64];
            if (n > 64) { s = ms_errorf(MS_ERR_ARG, "fuse: at most 64 concepts"); break; }
            for (int c = 0; c < n; c++) {
                int has = cs[c].te_has && cs[c].te_has[l * 4 + j] && cs[c].te;
                touched |= has;
                d[c].alpha = has ? cs[c].te->alpha : 0.0f;
                d[c].rank = has ? cs[c].te->rank : 0;
                d[c].down = has ? cs[c].te->down[l][j] : NULL;
                d[c].up = has ? cs[c].te->up[l][j] : NULL;
            }
            if (!touched) continue;
            char key[MS_KEY_MAX];
            snprintf(key, sizeof key, "text_model.encoder.layers.%d.self_attn.%s.weight", l, proj[j]);
            MsParam *W = find_param(&m->text, key);
            if (!W) { s = ms_errorf(MS_ERR_ARG, "fuse: the text encoder has no %s", key); break; }
            s = fuse_layer(W, &rows[2 * l + (j == 3)], d, o, o->te_iters, "te", rep);
        }
    if (rep) rep->seconds[0] = ms_time() - t0;
    for (int k = 0; k < 2 * L; k++) ms_fuse_rows_free(&rows[k]);

    /* ---- step 5 (merge_kv_in_cross_attention): the FUSED text encoder's features at the concept
     * tokens and EOS of the prompts bound for layer i; targets from each concept's to_k/to_v ---- */
    t0 = ms_time();
    for (int c = 0; c < n && any_kv && !s; c++) {
        char base[2][1024];
        snprintf(base[0], sizeof base[0], FUSE_TEMPLATE "%s", cs[c].name);
        snprintf(base[1], sizeof base[1], "%s", cs[c].name);
        for (int i = 0; i < NL && !s; i++)
            for (int b = 0; b < 2 && !s; b++) {
                char *p = fuse_bind(base[b], tk, i);
                int T = 0;
                ClipTextActs a;
                if (!p) { s = ms_errorf(MS_ERR_NOMEM, "fuse: prompt"); break; }
                s = fuse_tokens(tok, p, ids, &T, P);
                free(p);
                arena_reset(&ar, 0);
                if (!s) s = clip_text_acts_alloc(&a, &ar, tc, 1, T, 0, 0);
                if (!s) s = clip_text_forward(&a, &tp, NULL, ids, tk->new_emb, tk->n_new, tc);
                for (int t = 0; t < T && !s; t++)
                    if (ids[t] >= FUSE_EOS) s = ms_fuse_rows_add(&rows[2 * L + i], c, a.out + (size_t)t * D, 1);
            }
    }
    for (int i = 0; i < NL && any_kv && !s; i++)
        for (int w = 1; w <= 2 && !s; w++) {          /* to_k, to_v of attention module 2i+1 (attn2) */
            const int am = 2 * i + 1;
            MsFuseDelta d[64];
            if (n > 64) { s = ms_errorf(MS_ERR_ARG, "fuse: at most 64 concepts"); break; }
            for (int c = 0; c < n; c++) {
                int has = cs[c].unet_has && cs[c].unet_has[4 * am + w] && cs[c].unet;
                const UNetLoraLinear *ll = has ? &cs[c].unet->lin[4 * am + w] : NULL;
                d[c].alpha = has ? cs[c].unet->alpha : 0.0f;
                d[c].rank = has ? cs[c].unet->rank : 0;
                d[c].down = ll ? ll->down : NULL;
                d[c].up = ll ? ll->up : NULL;
            }
            char name[MS_KEY_MAX], key[MS_KEY_MAX + 8];
            unet_lora_module_name(up, am, w, name, sizeof name);
            snprintf(key, sizeof key, "%s.weight", name);
            MsParam *W = find_param(&m->unet, key);
            if (!W) { s = ms_errorf(MS_ERR_ARG, "fuse: the UNet has no %s", key); break; }
            s = fuse_layer(W, &rows[2 * L + i], d, o, o->te_iters, "kv", rep);   /* official: textenc iters */
        }
    if (rep) rep->seconds[1] = ms_time() - t0;
done:
    if (rows) for (int k = 0; k < 2 * L + NL; k++) ms_fuse_rows_free(&rows[k]);
    free(rows);
    free(ids);
    arena_free(&ar);
    return s;
}

/* ==========================================================================================
 * Step 6 (merge_spatial_attention): every other attention Linear of the UNet
 * ==========================================================================================
 * gradient_fusion.py samples each concept once: the prompt "photo of a {concept_name}" bound to
 * the 16 layer tokens, encoded (padded to 77) by the FUSED text encoder, a UNet whose attention
 * layers carry that concept's LoRA merged (attn2 to_k/to_v stay at their fused values: the
 * stage's base state dict is taken after step 5), 20 DPM-Solver++ steps at 512x512, batch 1, no
 * guidance, initial latents torch.randn((1, 4, 64, 64)) from the global generator. Forward hooks
 * keep every input row of the hooked Linears at every step (20 * h*w rows per layer and concept:
 * gigabytes at SD 1.5 sizes: the official memory problem).
 *
 * Here no row is kept. The recorder folds each call into G_c = X_c^T X_c of the current concept
 * (double, one per distinct input: attn1's q, k and v share norm1's output). When concept c is
 * done, every layer that reads that input takes, with D_c = W_c - W0 (the float32 merge minus W0,
 * exactly the change the official targets V_c = X_c W_c^T carry):
 *     B += D_c G_c,   e += <D_c G_c, D_c>,   G += G_c,   n += n_c.
 * The objective in terms of D = W - W0 needs nothing else and keeps no cancellation of W0's size:
 *     f(W) = (<D G, D> - 2 <D, B> + e) / (n d_out),
 * the gram minimiser nearest to W0 is W = W0 + B G+, and the absolute statistics for L-BFGS's
 * closure are C = W0 G + B, sum||V||^2 = <W0 G, W0> + 2 <W0, B> + e.
 *
 * The generator: the reference runs seed torch.manual_seed(S) after loading the pipeline; the
 * official order then draws, for every concept word w = 1, 2, .. (merge_new_concepts_), an
 * nn.Embedding(V0 + 16 w, D) whose init normal_ takes (V0 + 16 w) * D normals, then one
 * torch.randn((1, 4, 64, 64)) per concept in order. We skip the first and draw the second. */
#define FUSE_SP_STEPS 20

typedef struct {
    int C, need;
    size_t n_cur, n;
    double *Gc, *G;          /* (C,C): current concept (upper triangle while recording); sum */
} FuseSpInput;
typedef struct {
    int blk, am, w;          /* transformer block, attention module (2 blk + 0|1), Linear (0..3) */
    int input;               /* index into the inputs: 4 blk + which */
    MsParam *W;
    int d_out, d_in;
    double *B, e;            /* sum_c D_c G_c (d_out,d_in); sum_c <D_c G_c, D_c> */
} FuseSpLayer;

/* G (upper triangle) += X^T X for rows of X (rows, d); rows in chunks that stay in cache, four
 * at a time (products of floats are exact in double). Each G row belongs to one thread and sums
 * in row order: the result does not depend on the thread count. */
static void fuse_gram_add(double *G, const float *X, size_t rows, int d) {
    const size_t CH = 128;
    for (size_t r0 = 0; r0 < rows; r0 += CH) {
        const size_t r1 = r0 + CH < rows ? r0 + CH : rows;
#ifdef _OPENMP
#pragma omp parallel for schedule(dynamic, 4) if (d >= 64)
#endif
        for (int i = 0; i < d; i++) {
            double *g = G + (size_t)i * d;
            size_t r = r0;
            for (; r + 4 <= r1; r += 4) {
                const float *x0 = X + r * (size_t)d, *x1 = x0 + d, *x2 = x1 + d, *x3 = x2 + d;
                const double a0 = x0[i], a1 = x1[i], a2 = x2[i], a3 = x3[i];
                for (int j = i; j < d; j++)
                    g[j] += (a0 * x0[j] + a1 * x1[j]) + (a2 * x2[j] + a3 * x3[j]);
            }
            for (; r < r1; r++) {
                const float *x0 = X + r * (size_t)d;
                const double a0 = x0[i];
                for (int j = i; j < d; j++) g[j] += a0 * x0[j];
            }
        }
    }
}

typedef struct { FuseSpInput *in; int n_in; } FuseSpRec;

static void fuse_sp_record(void *ctx, int block, int which, const float *x, size_t rows, int C) {
    FuseSpRec *r = (FuseSpRec *)ctx;
    int k = 4 * block + which;
    if (k < 0 || k >= r->n_in || !r->in[k].need || r->in[k].C != C) return;
    fuse_gram_add(r->in[k].Gc, x, rows, C);
    r->in[k].n_cur += rows;
}

/* f(W) from the delta statistics (D = W - W0 in double). */
static double fuse_sp_objective(const FuseSpLayer *L, const FuseSpInput *in, const float *W0, const float *W) {
    const int di = L->d_in;
    double *d = (double *)malloc((size_t)di * sizeof(double)), f = L->e;
    if (!d) return NAN;
    for (int o = 0; o < L->d_out; o++) {
        const float *w = W + (size_t)o * di, *w0 = W0 + (size_t)o * di;
        const double *b = L->B + (size_t)o * di;
        double dgd = 0.0, db = 0.0;
        for (int i = 0; i < di; i++) d[i] = (double)w[i] - (double)w0[i];
        for (int i = 0; i < di; i++) {
            if (d[i] == 0.0) continue;
            const double *g = in->G + (size_t)i * di;
            double gd = 0.0;
            for (int j = 0; j < di; j++) gd += g[j] * d[j];
            dgd += d[i] * gd;
            db += d[i] * b[i];
        }
        f += dgd - 2.0 * db;
    }
    free(d);
    return in->n ? f / ((double)in->n * L->d_out) : 0.0;
}

/* Folds concept c's G_c into every layer reading input k (see above), then into G. */
static MsStatus fuse_sp_fold(FuseSpInput *in, FuseSpLayer *ls, int nl, int k, const MsFuseConcept *c) {
    const int d = in->C;
    for (int i = 0; i < d; i++)
        for (int j = 0; j < i; j++) in->Gc[(size_t)i * d + j] = in->Gc[(size_t)j * d + i];
    for (int l = 0; l < nl; l++) {
        FuseSpLayer *L = &ls[l];
        if (L->input != k) continue;
        int has = c->unet && c->unet_has && c->unet_has[4 * L->am + L->w];
        if (!has) continue;
        const size_t m = (size_t)L->d_out * d;
        const UNetLoraLinear *ll = &c->unet->lin[4 * L->am + L->w];
        MsFuseDelta dl = { c->unet->alpha, c->unet->rank, ll->down, ll->up };
        float *Wc = (float *)malloc(m * sizeof(float));
        double *D = (double *)malloc(m * sizeof(double)), *t = (double *)malloc((size_t)d * sizeof(double));
        if (!Wc || !D || !t) { free(Wc); free(D); free(t); return ms_errorf(MS_ERR_NOMEM, "fuse: spatial statistics"); }
        ms_fuse_merged_weight(Wc, L->W->f32, &dl, L->d_out, d);
        for (size_t q = 0; q < m; q++) D[q] = (double)Wc[q] - (double)L->W->f32[q];
#ifdef _OPENMP
#pragma omp parallel for schedule(static) if (L->d_out >= 64)
#endif
        for (int o = 0; o < L->d_out; o++) {          /* B[o] += D[o] G_c; e += D[o] G_c D[o]^T */
            const double *dr = D + (size_t)o * d;
            double *b = L->B + (size_t)o * d;
            for (int i = 0; i < d; i++) {
                const double a = dr[i];
                if (a == 0.0) continue;
                const double *g = in->Gc + (size_t)i * d;
                for (int j = 0; j < d; j++) b[j] += a * g[j];
            }
        }
        double e = 0.0;                                /* in row order, independent of threads */
        for (int o = 0; o < L->d_out; o++) {
            const double *dr = D + (size_t)o * d;
            for (int j = 0; j < d; j++) {
                const double *g = in->Gc + (size_t)j * d;
                double acc = 0.0;
                for (int i = 0; i < d; i++) acc += g[i] * dr[i];
                t[j] = acc;
            }
            for (int j = 0; j < d; j++) e += t[j] * dr[j];
        }
        L->e += e;
        free(Wc); free(D); free(t);
    }
    const size_t dd = (size_t)d * d;
    for (size_t q = 0; q < dd; q++) { in->G[q] += in->Gc[q]; in->Gc[q] = 0.0; }
    in->n += in->n_cur;
    in->n_cur = 0;
    return MS_OK;
}

static void fuse_eta(const char *stage, int done, int total, double t0, const char *what) {
    double el = ms_time() - t0, eta = done > 0 ? el / done * (total - done) : 0.0;
    fprintf(stderr, "\r  [%s] %d/%d %-48.48s %6.1f s elapsed, ETA %6.1f s ", stage, done, total, what, el, eta);
    if (done == total) fputc('\n', stderr);
    fflush(stderr);
}

MsStatus ms_fuse_spatial(MsModel *m, const UNetParams *up, const ClipTokenizer *tok, const MsFuseTokens *tk,
                         const MsFuseConcept *cs, int n, const MsFuseOptions *o, MsFuseReport *rep) {
    const UNetConfig *uc = &m->unet_config;
    const ClipTextConfig *tc = &m->text_config;
    const int NB = up->n_blk, NL = ms_unet_cross_attn_layers(uc), D = tc->hidden_size, T = 77;
    const int size = o->sp_size > 0 ? o->sp_size : 512, steps = o->sp_steps > 0 ? o->sp_steps : FUSE_SP_STEPS;
    const int h = size / 8, w = size / 8, Lc = uc->in_channels;      /* the official: height // 8 */
    const size_t nl = (size_t)Lc * h * w;
    FuseSpInput *in = NULL;
    FuseSpLayer *ls = NULL;
    int n_layers = 0;
    MsStatus s = MS_OK;
    double t_start = ms_time();
    if (tk->n_layers != NL || NB != NL) return ms_errorf(MS_ERR_ARG, "fuse: %d token variants, %d blocks, %d cross-attention layers", tk->n_layers, NB, NL);
    if (size % 8 || size < 8) return ms_errorf(MS_ERR_ARG, "fuse: spatial sampling size %d (a multiple of 8)", size);
    /* the layers: every attention Linear but attn2 to_k/to_v that some concept's LoRA touches */
    in = (FuseSpInput *)calloc((size_t)4 * NB, sizeof *in);
    ls = (FuseSpLayer *)calloc((size_t)6 * NB, sizeof *ls);
    if (!in || !ls) { free(in); free(ls); return ms_errorf(MS_ERR_NOMEM, "fuse: out of memory"); }
    for (int b = 0; b < NB && !s; b++)
        for (int am = 2 * b; am <= 2 * b + 1 && !s; am++)
            for (int wi = 0; wi < 4 && !s; wi++) {
                if ((am & 1) && (wi == 1 || wi == 2)) continue;     /* cross K/V: step 5 */
                int touched = 0;
                for (int c = 0; c < n; c++) touched |= cs[c].unet && cs[c].unet_has && cs[c].unet_has[4 * am + wi];
                if (!touched) continue;
                FuseSpLayer *L = &ls[n_layers++];
                char name[MS_KEY_MAX], key[MS_KEY_MAX + 8];
                unet_lora_module_name(up, am, wi, name, sizeof name);
                snprintf(key, sizeof key, "%s.weight", name);
                int pi = ms_param_find(&m->unet, key);
                if (pi < 0 || !m->unet.p[pi].f32 || m->unet.p[pi].ndim != 2) { s = ms_errorf(MS_ERR_ARG, "fuse: the UNet has no f32 matrix %s", key); break; }
                L->blk = b; L->am = am; L->w = wi; L->W = &m->unet.p[pi];
                L->input = 4 * b + ((am & 1) ? 2 : 0) + (wi == 3);
                L->d_out = (int)L->W->shape[0]; L->d_in = (int)L->W->shape[1];
                FuseSpInput *x = &in[L->input];
                if (!x->need) {
                    x->need = 1; x->C = L->d_in;
                    x->Gc = (double *)calloc((size_t)x->C * x->C, sizeof(double));
                    x->G = (double *)calloc((size_t)x->C * x->C, sizeof(double));
                    if (!x->Gc || !x->G) { s = ms_errorf(MS_ERR_NOMEM, "fuse: statistics of %s", key); break; }
                } else if (x->C != L->d_in) { s = ms_errorf(MS_ERR_SHAPE, "fuse: %s has %d inputs, expected %d", key, L->d_in, x->C); break; }
                L->B = (double *)calloc((size_t)L->d_out * L->d_in, sizeof(double));
                if (!L->B) { s = ms_errorf(MS_ERR_NOMEM, "fuse: statistics of %s", key); break; }
            }
    if (!s && n_layers == 0) goto done;
    for (int c = 0; c < n && !s; c++)
        if (!cs[c].unet) s = ms_errorf(MS_ERR_ARG, "fuse: concept %d (%s) has no UNet LoRA; the spatial stage samples every concept with its own", c, cs[c].name);
    if (s) goto done;

    /* ---- sampling with the hooks, concept by concept ---- */
    {
        MsScheduler *sch = (MsScheduler *)malloc(sizeof *sch);
        MsTorchRng *rng = (MsTorchRng *)malloc(sizeof *rng);
        ClipTextParams tp;
        Arena ar = { 0 }, acts = { 0 };
        UNetActs ua;
        int ua_ok = 0;
        float *lat = (float *)ms_alloc_aligned(nl, sizeof(float)), *xin = (float *)ms_alloc_aligned(nl, sizeof(float));
        float *eps = (float *)ms_alloc_aligned(nl, sizeof(float)), *work = (float *)ms_alloc_aligned(nl, sizeof(float));
        float *ctx = (float *)ms_alloc_aligned((size_t)NL * T * D, sizeof(float));
        const float **lctx = (const float **)malloc((size_t)NL * sizeof *lctx);
        UNetLoraLinear *lin = (UNetLoraLinear *)malloc((size_t)8 * NB * sizeof *lin);
        float *zero_up = NULL;
        FuseSpRec rec = { in, 4 * NB };
        if (!sch || !rng || !lat || !xin || !eps || !work || !ctx || !lctx || !lin) s = ms_errorf(MS_ERR_NOMEM, "fuse: out of memory");
        if (!s) s = ms_scheduler_init(sch, MS_SCHED_DPMSOLVER, &m->scheduler_config, MS_TORCH_CPU_AVX2);
        if (!s) s = clip_text_params(&tp, &m->text, tc);
        if (!s) {
            UNetSizes us;
            s = unet_sizes(uc, 1, h, w, T, 0, &us);
            size_t need = clip_text_sizes(tc, 1, T, 0, 0);
            if (!s && us.scratch_bytes > need) need = us.scratch_bytes;
            if (!s) s = arena_init(&ar, need);
            if (!s) s = arena_init(&acts, us.acts_bytes);
        }
        /* the official order of draws: the resized embeddings, then one randn per concept */
        if (!s) {
            ms_torch_seed(rng, o->seed);
            for (int wd = 1; wd <= tk->n_bind; wd++)
                ms_torch_randn_skip(rng, ((size_t)tc->vocab_size + (size_t)tk->n_layers * wd) * D);
        }
        double t0 = ms_time();
        for (int c = 0; c < n && !s; c++) {
            /* the prompt bound for every layer, encoded by the fused text encoder */
            char base[1200];
            snprintf(base, sizeof base, FUSE_TEMPLATE "%s", cs[c].name);
            for (int i = 0; i < NL && !s; i++) {
                char *p = fuse_bind(base, tk, i);
                int32_t ids[77];
                ClipTextActs a;
                if (!p) { s = ms_errorf(MS_ERR_NOMEM, "fuse: prompt"); break; }
                s = clip_tokenize(tok, p, strlen(p), ids, T);
                free(p);
                arena_reset(&ar, 0);
                if (!s) s = clip_text_acts_alloc(&a, &ar, tc, 1, T, 0, 0);
                if (!s) s = clip_text_forward(&a, &tp, NULL, ids, tk->new_emb, tk->n_new, tc);
                if (!s) memcpy(ctx + (size_t)i * T * D, a.out, (size_t)T * D * sizeof(float));
                lctx[i] = ctx + (size_t)i * T * D;
            }
            arena_reset(&ar, 0);
            /* this concept's LoRA on the spatial layers only (cross K/V are fused already) */
            UNetLora lora = *cs[c].unet;
            if (!s && !zero_up) {
                size_t mx = 0;
                for (int b = 0; b < NB; b++) for (int k = 1; k <= 2; k++) {
                    size_t q = (size_t)cs[c].unet->lin[4 * (2 * b + 1) + k].out * cs[c].unet->rank;
                    if (q > mx) mx = q;
                }
                zero_up = (float *)calloc(mx ? mx : 1, sizeof(float));
                if (!zero_up) s = ms_errorf(MS_ERR_NOMEM, "fuse: out of memory");
            }
            if (s) break;
            if (lora.rank <= 0 || lora.n_attn != 2 * NB) { s = ms_errorf(MS_ERR_SHAPE, "fuse: %s: UNet LoRA of %d modules, rank %d", cs[c].name, lora.n_attn, lora.rank); break; }
            memcpy(lin, cs[c].unet->lin, (size_t)8 * NB * sizeof *lin);
            for (int b = 0; b < NB; b++) for (int k = 1; k <= 2; k++) lin[4 * (2 * b + 1) + k].up = zero_up;
            for (int am = 0; am < 2 * NB; am++)      /* modules the file lacks add nothing */
                for (int k = 0; k < 4; k++)
                    if (!cs[c].unet_has || !cs[c].unet_has[4 * am + k]) lin[4 * am + k].up = zero_up;
            lora.lin = lin;
            /* the latents and the loop */
            ms_torch_randn(rng, lat, nl, MS_TORCH_CPU_AVX2);
            if (!s) s = ms_scheduler_set_timesteps(sch, steps);
            if (s) break;
            for (size_t k = 0; k < nl; k++) lat[k] = lat[k] * sch->init_noise_sigma;
            if (!ua_ok) { s = unet_acts_init(&ua, uc, 1, h, w, T, 0, &acts, &ar); ua_ok = !s; }
            ua.record = fuse_sp_record;
            ua.record_ctx = &rec;
            for (int i = 0; i < sch->num_steps && !s; i++) {
                float t = (float)sch->timesteps[i];
                ms_scheduler_scale_model_input(sch, i, xin, lat, nl);
                s = unet_forward(eps, &ua, xin, &t, NULL, (const float *const *)lctx, NULL, up, &lora);
                if (!s) s = ms_scheduler_step(sch, i, eps, lat, work, nl, NULL);
                if (o->verbose) {
                    char what[64];
                    snprintf(what, sizeof what, "concept %d/%d step %d/%d", c + 1, n, i + 1, sch->num_steps);
                    fuse_eta("sp", c * sch->num_steps + i + 1, n * sch->num_steps, t0, what);
                }
            }
            for (int k = 0; k < 4 * NB && !s; k++) {
                if (!in[k].need) continue;
                if (o->on_gram) {
                    for (int i = 0; i < in[k].C; i++)
                        for (int j = 0; j < i; j++) in[k].Gc[(size_t)i * in[k].C + j] = in[k].Gc[(size_t)j * in[k].C + i];
                    o->on_gram(o->on_gram_ctx, c, k / 4, k % 4, in[k].Gc, in[k].n_cur, in[k].C);
                }
                s = fuse_sp_fold(&in[k], ls, n_layers, k, &cs[c]);
            }
        }
        if (ua_ok) unet_acts_free(&ua);
        arena_free(&ar); arena_free(&acts);
        ms_free_aligned(lat); ms_free_aligned(xin); ms_free_aligned(eps); ms_free_aligned(work); ms_free_aligned(ctx);
        free(lctx); free(lin); free(zero_up); free(sch); free(rng);
    }

    /* ---- solve every layer ---- */
    double t1 = ms_time();
    for (int l = 0; l < n_layers && !s; l++) {
        FuseSpLayer *L = &ls[l];
        FuseSpInput *x = &in[L->input];
        const size_t m = (size_t)L->d_out * L->d_in;
        const float *W0 = L->W->f32;
        float *W = (float *)malloc(m * sizeof(float)), *Ww = (float *)malloc(m * sizeof(float));
        double *trace = NULL, lt0 = ms_time();
        int rank = 0, n_trace = 0;
        MsFuseDelta d[64];
        if (!W || !Ww) s = ms_errorf(MS_ERR_NOMEM, "fuse: %s", L->W->name);
        if (n > 64) s = ms_errorf(MS_ERR_ARG, "fuse: at most 64 concepts");
        for (int c = 0; c < n && !s; c++) {
            int has = cs[c].unet && cs[c].unet_has && cs[c].unet_has[4 * L->am + L->w];
            const UNetLoraLinear *ll = has ? &cs[c].unet->lin[4 * L->am + L->w] : NULL;
            d[c].alpha = has ? cs[c].unet->alpha : 0.0f;
            d[c].rank = has ? cs[c].unet->rank : 0;
            d[c].down = ll ? ll->down : NULL;
            d[c].up = ll ? ll->up : NULL;
        }
        if (!s) s = ms_fuse_weight(Ww, W0, d, n, L->d_out, L->d_in);
        if (!s && o->method == MS_FUSE_WEIGHT) memcpy(W, Ww, m * sizeof(float));
        else if (!s && o->method == MS_FUSE_GRAM) {
            MsFuseStats S = { L->d_in, L->d_out, x->n, x->G, L->B, L->e };
            float *Z = (float *)calloc(m, sizeof(float));
            if (!Z) s = ms_errorf(MS_ERR_NOMEM, "fuse: %s", L->W->name);
            if (!s) s = ms_fuse_solve_gram(&S, Z, W, o->rcond, &rank);     /* W = B G+ = the change */
            for (size_t q = 0; q < m && !s; q++) W[q] = W0[q] + W[q];
            free(Z);
        } else if (!s) {
            const int di = L->d_in;
            double *Cabs = (double *)malloc(m * sizeof(double)), vv = L->e;
            int cap = o->unet_iters * 5 / 4 + 64;
            trace = (double *)malloc((size_t)cap * sizeof(double));
            if (!Cabs || !trace) s = ms_errorf(MS_ERR_NOMEM, "fuse: %s", L->W->name);
            for (int oo = 0; oo < L->d_out && !s; oo++) {
                const float *w0 = W0 + (size_t)oo * di;
                for (int j = 0; j < di; j++) {
                    double acc = 0.0;
                    for (int i = 0; i < di; i++) acc += (double)w0[i] * x->G[(size_t)i * di + j];
                    Cabs[(size_t)oo * di + j] = acc + L->B[(size_t)oo * di + j];
                    vv += acc * w0[j] + 2.0 * (double)w0[j] * L->B[(size_t)oo * di + j];
                }
            }
            if (!s) {
                MsFuseStats S = { di, L->d_out, x->n, x->G, Cabs, vv };
                MsLbfgsResult res;
                s = ms_fuse_solve_lbfgs(&S, W0, W, o->unet_iters, trace, cap, &res);
                n_trace = res.n_evals < cap ? res.n_evals : cap;
            }
            free(Cabs);
        }
        if (!s) {
            double f0 = fuse_sp_objective(L, x, W0, W0), fw = fuse_sp_objective(L, x, W0, Ww), ff = fuse_sp_objective(L, x, W0, W);
            char key[MS_KEY_MAX];
            snprintf(key, sizeof key, "%s", L->W->name);
            memcpy(L->W->f32, W, m * sizeof(float));
            s = report_add(rep, key, "sp", x->n, f0, fw, ff, rank, trace, n_trace, ms_time() - lt0);
            if (o->verbose) fuse_eta("sp", l + 1, n_layers, t1, key);
        }
        free(W); free(Ww); free(trace);
    }
done:
    if (rep) rep->seconds[2] = ms_time() - t_start;
    for (int k = 0; in && k < 4 * NB; k++) { free(in[k].Gc); free(in[k].G); }
    for (int l = 0; ls && l < 6 * NB; l++) free(ls[l].B);
    free(in); free(ls);
    return s;
}
