/* models/optim.c — optimizers of the method: AdamW as torch.optim.AdamW computes it (torch 1.13,
 * _single_tensor_adamw, the CPU default: foreach and fused are off there).
 *
 * For one parameter tensor p with gradient g and state (m, v, step), after step += 1:
 *   p    = p * (1 - lr * wd)                        decoupled weight decay (Loshchilov & Hutter)
 *   m    = fma(g, 1 - b1, m * b1)                   exp_avg.mul_(b1).add_(g, alpha=1-b1)
 *   v    = fma((1 - b2) * g, g, v * b2)             exp_avg_sq.mul_(b2).addcmul_(g, g, value=1-b2)
 *   bc1  = 1 - b1^step,  bc2 = 1 - b2^step          (Python floats: double)
 *   den  = sqrt(v) / sqrt(bc2) + eps                (exp_avg_sq.sqrt() / bc2_sqrt).add_(eps)
 *   p    = p + ((-lr / bc1) * m) / den              param.addcdiv_(m, den, value=-step_size)
 * Every scalar is computed in double as Python does and rounded to float where torch's CPU
 * kernels take it (a Python scalar meets a float32 tensor as a float32 value); each tensor op is
 * one rounding in float32 in the order written above. torch's CPU kernels (the AVX2 build that
 * stock x86-64 torch runs) compute add(alpha) and addcmul with a fused multiply-add, at every
 * element (measured: 4162 of 100003 elements differ from the unfused formula, 0 from fmaf),
 * so those two are fmaf here; the result is torch's to the bit (tests/test_train.c). */
#include "mixshow.h"

#include <math.h>

void ms_adamw_step(float *p, const float *g, float *m, float *v, size_t n, int64_t step, double lr,
                   double weight_decay, double beta1, double beta2, double eps) {
    const float decay = (float)(1.0 - lr * weight_decay);
    const float b1 = (float)beta1, one_b1 = (float)(1.0 - beta1);
    const float b2 = (float)beta2, one_b2 = (float)(1.0 - beta2);
    const double bc1 = 1.0 - pow(beta1, (double)step), bc2 = 1.0 - pow(beta2, (double)step);
    const float bc2_sqrt = (float)sqrt(bc2), feps = (float)eps, neg_step = (float)(-(lr / bc1));
    for (size_t i = 0; i < n; i++) {
        float pi = p[i] * decay;
        float gi = g[i];
        float mi = fmaf(gi, one_b1, m[i] * b1);
        float vi = fmaf(one_b2 * gi, gi, v[i] * b2);
        float den = sqrtf(vi) / bc2_sqrt + feps;
        p[i] = pi + (neg_step * mi) / den;
        m[i] = mi;
        v[i] = vi;
    }
}

/* ------------------------------------------------------------------------------------------
 * L-BFGS: torch.optim.LBFGS.step(closure) of torch 1.13 (torch/optim/lbfgs.py), written from
 * its description and source, one step of the official gradient fusion per call.
 *
 * Vectors are float32 as torch holds them (x, the gradient g, the direction d, the history of
 * steps s and gradient changes y); dot products are summed in double and every scalar is a
 * double (torch keeps some as 0-dim float32 tensors: the difference is in the last bits).
 *
 * 1. Evaluate f(x), g. Stop at once if max|g| <= tolerance_grad.
 * 2. Each iteration k:
 *    a. Direction. k = 1: d = -g (steepest descent), H_diag = 1. Later: with the last step
 *       s = t d and y = g - g_prev, if y.s > 1e-10 push (y, s, rho = 1/y.s) into the history
 *       (dropping the oldest beyond history_size) and set H_diag = y.s / y.y (Shanno's scaling
 *       of the initial inverse Hessian). Then the two-loop recursion (Nocedal & Wright,
 *       Algorithm 7.4) gives d = -H g:
 *         q = -g;  for i = newest..oldest: al_i = rho_i s_i.q;  q -= al_i y_i
 *         d = H_diag q;  for i = oldest..newest: be = rho_i y_i.d;  d += (al_i - be) s_i
 *    b. Step length guess: t = min(1, 1/sum|g|) * lr on the first iteration, else lr.
 *    c. gtd = g.d; if gtd > -tolerance_change the direction no longer descends: stop.
 *    d. Strong Wolfe line search along d from t (below), or a fixed step x += t d.
 *    e. Stop after max_iter iterations, max_eval closure calls, max|g| <= tolerance_grad,
 *       max|t d| <= tolerance_change, or |f - f_prev| < tolerance_change.
 *
 * Strong Wolfe line search (torch's _strong_wolfe, after minFunc / torch7 lswolfe.lua), with
 * c1 = 1e-4 (sufficient decrease), c2 = 0.9 (curvature), at most 25 trials, and a bracket
 * tolerance of 1e-9 whatever the optimizer's tolerance_change (torch does not pass it on):
 *    Bracketing: evaluate phi(t) = f(x + t d). The bracket [t_prev, t] holds a Wolfe point when
 *      phi(t) > f + c1 t gtd (Armijo fails), or phi(t) >= phi(t_prev) after two trials, or
 *      phi'(t) >= 0 (we passed a minimum). If |phi'(t)| <= -c2 gtd, t itself is accepted.
 *      Otherwise extrapolate: t = cubic minimiser of (t_prev, t) clamped to
 *      [t + 0.01 (t - t_prev), 10 t].
 *    Zoom: while the bracket is wider than 1e-9 / max|d|: try the cubic minimiser inside it,
 *      moved 10% of the width away from an end when it falls too close to one twice running
 *      (or onto it); a trial that fails Armijo or is not below the low end replaces the high
 *      end; otherwise it becomes the low end (the old low end becomes the high end when the
 *      slope says the minimum lies on the other side) and Wolfe success stops the search.
 *    The result is the low end of the bracket (its f and g; x moves by t d afterwards).
 * ---------------------------------------------------------------------------------------- */
#include <stdlib.h>
#include <string.h>

void ms_lbfgs_defaults(MsLbfgsOptions *o) {
    o->lr = 1.0;
    o->max_iter = 20;
    o->max_eval = 20 * 5 / 4;
    o->history_size = 100;
    o->tolerance_grad = 1e-7;
    o->tolerance_change = 1e-9;
    o->strong_wolfe = 0;
}

typedef struct {
    MsLbfgsClosure f;
    void *ctx;
    size_t n;
    float *xt;                   /* trial point x + t d */
    float *best_x;               /* NULL: not tracked */
    double best_f;
    double *trace;
    int trace_cap, evals;
} LbfgsEval;

static double lb_dot(const float *a, const float *b, size_t n) {
    double s = 0.0;
    for (size_t i = 0; i < n; i++) s += (double)a[i] * b[i];
    return s;
}
static double lb_absmax(const float *a, size_t n) {
    double m = 0.0;
    for (size_t i = 0; i < n; i++) if (fabs((double)a[i]) > m) m = fabs((double)a[i]);
    return m;
}
/* x + t d as torch's p.add_(d, alpha=t) (float32, t rounded to float) */
static void lb_axpy(float *out, const float *x, double t, const float *d, size_t n) {
    const float tf = (float)t;
    for (size_t i = 0; i < n; i++) out[i] = fmaf(tf, d[i], x[i]);
}
/* One closure call at x; records the trace and the best point (the official closure's
 * `if loss < best_loss: best_W = W.clone()`). */
static double lb_call(LbfgsEval *E, const float *x, float *g) {
    double f = E->f(E->ctx, x, g);
    if (E->evals < E->trace_cap && E->trace) E->trace[E->evals] = f;
    E->evals++;
    if (E->best_x && f < E->best_f) { E->best_f = f; memcpy(E->best_x, x, E->n * sizeof(float)); }
    else if (!E->best_x && f < E->best_f) E->best_f = f;
    return f;
}
static double lb_phi(LbfgsEval *E, const float *x, double t, const float *d, float *g) {
    lb_axpy(E->xt, x, t, d, E->n);
    return lb_call(E, E->xt, g);
}
/* Python's min(max(a, lo), hi): NaN in a propagates as there. */
static double py_clamp(double a, double lo, double hi) {
    double m = lo > a ? lo : a;
    return hi < m ? hi : m;
}
/* torch's _cubic_interpolate: minimiser of the cubic through (x1,f1,g1), (x2,f2,g2), clamped
 * to [lo, hi]; the midpoint when the cubic has no real minimiser. */
static double lb_cubic(double x1, double f1, double g1, double x2, double f2, double g2, double lo, double hi) {
    double d1 = g1 + g2 - 3.0 * (f1 - f2) / (x1 - x2);
    double d2sq = d1 * d1 - g1 * g2;
    if (d2sq >= 0.0) {
        double d2 = sqrt(d2sq), mp;
        if (x1 <= x2) mp = x2 - (x2 - x1) * ((g2 + d2 - d1) / (g2 - g1 + 2.0 * d2));
        else          mp = x1 - (x1 - x2) * ((g1 + d2 - d1) / (g1 - g2 + 2.0 * d2));
        return py_clamp(mp, lo, hi);
    }
    return (lo + hi) / 2.0;
}

/* _strong_wolfe. g_io: in, the gradient at x; out, the gradient at the accepted point.
 * w: 4 work vectors of n floats. Returns f at the accepted point, *t_io its step. */
static double lb_strong_wolfe(LbfgsEval *E, const float *x, double *t_io, const float *d, double f, float *g_io,
                              double gtd, float *w, int *ls_evals) {
    const double c1 = 1e-4, c2 = 0.9, tol = 1e-9;
    const int max_ls = 25;
    const size_t n = E->n;
    float *g_new = w, *g_prev = w + n, *bg[2] = { w + 2 * n, w + 3 * n };
    double t = *t_io, d_norm = lb_absmax(d, n);
    double f_new = lb_phi(E, x, t, d, g_new), gtd_new = lb_dot(g_new, d, n);
    int evals = 1, ls_iter = 0, done = 0, nb = 0;
    double t_prev = 0.0, f_prev = f, gtd_prev = gtd;
    double b[2] = { 0, 0 }, bf[2] = { 0, 0 }, bgtd[2] = { 0, 0 };
    memcpy(g_prev, g_io, n * sizeof(float));
    /* bracketing phase */
    while (ls_iter < max_ls) {
        if (f_new > f + c1 * t * gtd || (ls_iter > 1 && f_new >= f_prev)) {   /* Armijo fails */
            nb = 2;
            break;
        }
        if (fabs(gtd_new) <= -c2 * gtd) {                                  /* strong Wolfe holds */
            nb = 1; done = 1;
            break;
        }
        if (gtd_new >= 0.0) {                                               /* passed a minimum */
            nb = 2;
            break;
        }
        /* extrapolate: cubic step, at least 1% beyond t and at most 10 t */
        double min_step = t + 0.01 * (t - t_prev), max_step = t * 10.0, tmp = t;
        t = lb_cubic(t_prev, f_prev, gtd_prev, t, f_new, gtd_new, min_step, max_step);
        t_prev = tmp; f_prev = f_new; memcpy(g_prev, g_new, n * sizeof(float)); gtd_prev = gtd_new;
        f_new = lb_phi(E, x, t, d, g_new);
        evals++;
        gtd_new = lb_dot(g_new, d, n);
        ls_iter++;
    }
    if (ls_iter == max_ls) {   /* no bracket found in 25 trials: [0, t] (the zoom does not run) */
        b[0] = 0.0; bf[0] = f; memcpy(bg[0], g_io, n * sizeof(float));
        b[1] = t;   bf[1] = f_new; memcpy(bg[1], g_new, n * sizeof(float));
        nb = 2;
    } else if (nb == 1) {      /* [t] */
        b[0] = t; bf[0] = f_new; memcpy(bg[0], g_new, n * sizeof(float));
    } else {                   /* [t_prev, t] */
        b[0] = t_prev; bf[0] = f_prev; memcpy(bg[0], g_prev, n * sizeof(float)); bgtd[0] = gtd_prev;
        b[1] = t;      bf[1] = f_new;  memcpy(bg[1], g_new, n * sizeof(float));  bgtd[1] = gtd_new;
    }
    /* zoom phase */
    int insuf = 0;
    int lo = (nb == 1 || bf[0] <= bf[1]) ? 0 : 1, hi = 1 - lo;
    while (!done && ls_iter < max_ls) {
        if (fabs(b[1] - b[0]) * d_norm < tol) break;
        double bmin = b[0] < b[1] ? b[0] : b[1], bmax = b[0] < b[1] ? b[1] : b[0];
        t = lb_cubic(b[0], bf[0], bgtd[0], b[1], bf[1], bgtd[1], bmin, bmax);
        double eps = 0.1 * (bmax - bmin);
        double near = (bmax - t) < (t - bmin) ? (bmax - t) : (t - bmin);
        if (near < eps) {
            if (insuf || t >= bmax || t <= bmin) {
                t = fabs(t - bmax) < fabs(t - bmin) ? bmax - eps : bmin + eps;
                insuf = 0;
            } else insuf = 1;
        } else insuf = 0;
        f_new = lb_phi(E, x, t, d, g_new);
        evals++;
        gtd_new = lb_dot(g_new, d, n);
        ls_iter++;
        if (f_new > f + c1 * t * gtd || f_new >= bf[lo]) {
            b[hi] = t; bf[hi] = f_new; memcpy(bg[hi], g_new, n * sizeof(float)); bgtd[hi] = gtd_new;
            lo = bf[0] <= bf[1] ? 0 : 1; hi = 1 - lo;
        } else {
            if (fabs(gtd_new) <= -c2 * gtd) done = 1;
            else if (gtd_new * (b[hi] - b[lo]) >= 0.0) {   /* old low end becomes the high end */
                b[hi] = b[lo]; bf[hi] = bf[lo]; memcpy(bg[hi], bg[lo], n * sizeof(float)); bgtd[hi] = bgtd[lo];
            }
            b[lo] = t; bf[lo] = f_new; memcpy(bg[lo], g_new, n * sizeof(float)); bgtd[lo] = gtd_new;
        }
    }
    *t_io = b[lo];
    memcpy(g_io, bg[lo], n * sizeof(float));
    *ls_evals = evals;
    return bf[lo];
}

MsStatus ms_lbfgs(float *x, size_t n, MsLbfgsClosure f, void *ctx, const MsLbfgsOptions *o,
                  float *best_x, double *trace, int trace_cap, MsLbfgsResult *res) {
    const int H = o->history_size > 0 ? o->history_size : 1;
    size_t nvec = (size_t)(2 * H + 9), bytes;
    if (!ms_mul_ok(n, nvec, &bytes) || !ms_mul_ok(bytes, sizeof(float), &bytes))
        return ms_errorf(MS_ERR_NOMEM, "lbfgs: %zu parameters overflow", n);
    float *mem = (float *)ms_alloc_aligned(n * nvec, sizeof(float));
    double *rho = (double *)malloc((size_t)H * 2 * sizeof(double));
    if (!mem || !rho) {
        ms_free_aligned(mem); free(rho);
        return ms_errorf(MS_ERR_NOMEM, "lbfgs: cannot allocate %zu floats of history", n * nvec);
    }
    double *al = rho + H;
    float *g = mem, *d = mem + n, *prev_g = mem + 2 * n, *xt = mem + 3 * n, *w = mem + 4 * n;  /* w: 4n */
    float *ys_y = mem + 8 * n;          /* H vectors y (gradient changes) */
    float *ys_s = ys_y + (size_t)H * n; /* H vectors s (steps) */
    float *tmp = ys_s + (size_t)H * n;  /* one vector */
    int head = 0, nh = 0;               /* ring buffer of the history: oldest at head */
    LbfgsEval E = { f, ctx, n, xt, best_x, INFINITY, trace, trace_cap, 0 };
    double H_diag = 1.0, t = 0.0, prev_loss;
    memset(res, 0, sizeof *res);

    double loss = lb_call(&E, x, g);
    res->f_first = loss;
    int n_iter = 0, current_evals = 1;
    int opt_cond = lb_absmax(g, n) <= o->tolerance_grad;
    while (!opt_cond && n_iter < o->max_iter) {
        n_iter++;
        /* a. direction */
        if (n_iter == 1) {
            for (size_t i = 0; i < n; i++) d[i] = -g[i];
            nh = 0; head = 0; H_diag = 1.0;
        } else {
            float *y = tmp;
            for (size_t i = 0; i < n; i++) y[i] = g[i] - prev_g[i];
            for (size_t i = 0; i < n; i++) d[i] = (float)((double)d[i] * t);     /* s = d * t */
            double ys = lb_dot(y, d, n);
            if (ys > 1e-10) {
                int slot;
                if (nh == H) { slot = head; head = (head + 1) % H; }
                else slot = (head + nh++) % H;
                memcpy(ys_y + (size_t)slot * n, y, n * sizeof(float));
                memcpy(ys_s + (size_t)slot * n, d, n * sizeof(float));
                rho[slot] = 1.0 / ys;
                H_diag = ys / lb_dot(y, y, n);
            }
            float *q = d;                                    /* two-loop recursion in place */
            for (size_t i = 0; i < n; i++) q[i] = -g[i];
            for (int k = nh - 1; k >= 0; k--) {
                int sl = (head + k) % H;
                const float *sk = ys_s + (size_t)sl * n, *yk = ys_y + (size_t)sl * n;
                al[k] = lb_dot(sk, q, n) * rho[sl];
                float a = (float)-al[k];
                for (size_t i = 0; i < n; i++) q[i] = fmaf(a, yk[i], q[i]);
            }
            float hd = (float)H_diag;
            for (size_t i = 0; i < n; i++) d[i] = q[i] * hd;
            for (int k = 0; k < nh; k++) {
                int sl = (head + k) % H;
                const float *sk = ys_s + (size_t)sl * n, *yk = ys_y + (size_t)sl * n;
                double be = lb_dot(yk, d, n) * rho[sl];
                float a = (float)(al[k] - be);
                for (size_t i = 0; i < n; i++) d[i] = fmaf(a, sk[i], d[i]);
            }
        }
        memcpy(prev_g, g, n * sizeof(float));
        prev_loss = loss;
        /* b. step length guess */
        if (n_iter == 1) {
            double s1 = 0.0;
            for (size_t i = 0; i < n; i++) s1 += fabs((double)g[i]);
            t = (1.0 / s1 < 1.0 ? 1.0 / s1 : 1.0) * o->lr;
        } else t = o->lr;
        /* c. directional derivative */
        double gtd = lb_dot(g, d, n);
        if (gtd > -o->tolerance_change) break;
        /* d. line search or fixed step */
        int ls_evals = 0;
        if (o->strong_wolfe) {
            /* trials go to E.xt, so x itself is torch's x_init */
            loss = lb_strong_wolfe(&E, x, &t, d, loss, g, gtd, w, &ls_evals);
            lb_axpy(x, x, t, d, n);
            opt_cond = lb_absmax(g, n) <= o->tolerance_grad;
        } else {
            lb_axpy(x, x, t, d, n);
            if (n_iter != o->max_iter) {
                loss = lb_call(&E, x, g);
                opt_cond = lb_absmax(g, n) <= o->tolerance_grad;
                ls_evals = 1;
            }
        }
        current_evals += ls_evals;
        /* e. stopping rules */
        if (n_iter == o->max_iter) break;
        if (current_evals >= o->max_eval) break;
        if (opt_cond) break;
        double dmax = 0.0;
        for (size_t i = 0; i < n; i++) { double v = fabs((double)d[i] * t); if (v > dmax) dmax = v; }
        if (dmax <= o->tolerance_change) break;
        if (fabs(loss - prev_loss) < o->tolerance_change) break;
    }
    res->n_iter = n_iter;
    res->n_evals = E.evals;
    res->f_last = loss;
    res->best_f = E.best_f;
    ms_free_aligned(mem);
    free(rho);
    return MS_OK;
}
