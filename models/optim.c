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
    const double bc1 = 1.0 - pow(beta1, (double)step), bc2 = 1.0 - pow(beta2, (double)step);
    MsAdamwConst k;
    k.decay = (float)(1.0 - lr * weight_decay);
    k.b1 = (float)beta1; k.one_b1 = (float)(1.0 - beta1);
    k.b2 = (float)beta2; k.one_b2 = (float)(1.0 - beta2);
    k.bc2_sqrt = (float)sqrt(bc2); k.eps = (float)eps; k.neg_step = (float)(-(lr / bc1));
    ms_adamw_update(p, g, m, v, n, &k);   /* tensor.c: the per-element update, in float */
}

/* ------------------------------------------------------------------------------------------
 * L-BFGS: torch.optim.LBFGS.step(closure) of torch 1.13 (torch/optim/lbfgs.py), written from
 * its description and source, one step of the official gradient fusion per call.
 *
 * Vectors are float32 as torch holds them (x, the gradient g, the direction d, the history of
 * steps s and gradient changes y). Scalars follow torch's types exactly, because they decide
 * the path: f is a Python float holding the float32 loss; every dot product (g.d, y.s, ...) is
 * a 0-dim float32 tensor (here: summed in double, then rounded); the step t starts as a Python
 * float (lr, or 1.0) or a float32 tensor (1/sum|g| on the first iteration) and becomes a float32
 * tensor as soon as the cubic interpolation computes it; any operation with a float32 operand
 * is done in float32, the Python operand rounded first (Num below). It matters: the cubic's
 * d2^2 = d1^2 - g1 g2 is a cancellation that in float32 can change sign, sending torch to the
 * interval's midpoint where double arithmetic takes the cubic step (tests/test_fuse_official.c
 * measures how the official traces depend on it).
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

/* A torch scalar: a Python float (t = 0) or a 0-dim float32 tensor (t = 1, v holds a float).
 * An operation with a tensor operand rounds the Python operand to float and computes in float
 * (type promotion: float32 tensor op Python float -> float32); two Python floats give double. */
typedef struct { double v; int t; } Num;
static Num py(double v) { Num r; r.v = v; r.t = 0; return r; }
static Num ft(double v) { Num r; float f = (float)v; r.v = f; r.t = 1; return r; }
static Num n_add(Num a, Num b) { if (a.t || b.t) { float r = (float)a.v + (float)b.v; return ft(r); } return py(a.v + b.v); }
static Num n_sub(Num a, Num b) { if (a.t || b.t) { float r = (float)a.v - (float)b.v; return ft(r); } return py(a.v - b.v); }
static Num n_mul(Num a, Num b) { if (a.t || b.t) { float r = (float)a.v * (float)b.v; return ft(r); } return py(a.v * b.v); }
static Num n_div(Num a, Num b) { if (a.t || b.t) { float r = (float)a.v / (float)b.v; return ft(r); } return py(a.v / b.v); }
static Num n_abs(Num a) { a.v = fabs(a.v); return a; }
/* comparisons: in float when either side is a tensor (NaN compares false, as in both) */
static int n_lt(Num a, Num b) { return (a.t || b.t) ? (float)a.v < (float)b.v : a.v < b.v; }
static int n_le(Num a, Num b) { return (a.t || b.t) ? (float)a.v <= (float)b.v : a.v <= b.v; }
/* Python's min(a, b) / max(a, b): the first argument unless the second is strictly smaller /
 * larger (so a NaN first argument is kept); the object itself, with its type */
static Num n_min(Num a, Num b) { return n_lt(b, a) ? b : a; }
static Num n_max(Num a, Num b) { return n_lt(a, b) ? b : a; }
static Num n_dot(const float *a, const float *b, size_t n) { return ft(lb_dot(a, b, n)); }

/* x + t d as torch's p.add_(d, alpha=t): float32, t rounded to float, one fused multiply-add
 * per element (torch's CPU add with alpha is an FMA) */
static void lb_axpy(float *out, const float *x, Num t, const float *d, size_t n) {
    const float tf = (float)t.v;
    for (size_t i = 0; i < n; i++) out[i] = fmaf(tf, d[i], x[i]);
}
/* One closure call at x; records the trace and the best point (the official closure's
 * `if loss < best_loss: best_W = W.clone()`, a float32 comparison). Returns float(loss). */
static Num lb_call(LbfgsEval *E, const float *x, float *g) {
    double f = E->f(E->ctx, x, g);
    Num r = py((double)(float)f);      /* loss = float(closure()): the float32 loss as a Python float */
    if (E->evals < E->trace_cap && E->trace) E->trace[E->evals] = r.v;
    E->evals++;
    if (r.v < E->best_f) {
        E->best_f = r.v;
        if (E->best_x) memcpy(E->best_x, x, E->n * sizeof(float));
    }
    return r;
}
static Num lb_phi(LbfgsEval *E, const float *x, Num t, const float *d, float *g) {
    lb_axpy(E->xt, x, t, d, E->n);
    return lb_call(E, E->xt, g);
}
/* torch's _cubic_interpolate: minimiser of the cubic through (x1,f1,g1), (x2,f2,g2), clamped to
 * [lo, hi] (bounds: the given ones, else the two points); the midpoint when it has no real
 * minimiser. */
static Num lb_cubic(Num x1, Num f1, Num g1, Num x2, Num f2, Num g2, const Num *bounds) {
    Num lo, hi;
    if (bounds) { lo = bounds[0]; hi = bounds[1]; }
    else if (n_le(x1, x2)) { lo = x1; hi = x2; }
    else { lo = x2; hi = x1; }
    /* d1 = g1 + g2 - 3 * (f1 - f2) / (x1 - x2);  d2_square = d1**2 - g1 * g2 */
    Num d1 = n_sub(n_add(g1, g2), n_div(n_mul(py(3.0), n_sub(f1, f2)), n_sub(x1, x2)));
    Num d2sq = n_sub(n_mul(d1, d1), n_mul(g1, g2));
    if (n_le(py(0.0), d2sq)) {
        Num d2 = d2sq.t ? ft(sqrtf((float)d2sq.v)) : py(sqrt(d2sq.v)), mp;
        if (n_le(x1, x2)) mp = n_sub(x2, n_mul(n_sub(x2, x1), n_div(n_sub(n_add(g2, d2), d1), n_add(n_sub(g2, g1), n_mul(py(2.0), d2)))));
        else              mp = n_sub(x1, n_mul(n_sub(x1, x2), n_div(n_sub(n_add(g1, d2), d1), n_add(n_sub(g1, g2), n_mul(py(2.0), d2)))));
        return n_min(n_max(mp, lo), hi);
    }
    return n_div(n_add(lo, hi), py(2.0));
}

/* _strong_wolfe. g_io: in, the gradient at x; out, the gradient at the accepted point.
 * w: 4 work vectors of n floats. Returns f at the accepted point, *t_io its step. */
static Num lb_strong_wolfe(LbfgsEval *E, const float *x, Num *t_io, const float *d, Num f, float *g_io,
                           Num gtd, float *w, int *ls_evals) {
    const Num c1 = py(1e-4), c2 = py(0.9), tol = py(1e-9);
    const int max_ls = 25;
    const size_t n = E->n;
    float *g_new = w, *g_prev = w + n, *bg[2] = { w + 2 * n, w + 3 * n };
    Num t = *t_io, d_norm = ft(lb_absmax(d, n));
    Num f_new = lb_phi(E, x, t, d, g_new), gtd_new = n_dot(g_new, d, n);
    int evals = 1, ls_iter = 0, done = 0, nb = 0;
    Num t_prev = py(0.0), f_prev = f, gtd_prev = gtd;
    Num b[2] = { py(0), py(0) }, bf[2] = { py(0), py(0) }, bgtd[2] = { py(0), py(0) };
    const Num neg_c2_gtd = n_mul(py(-c2.v), gtd);                  /* -c2 * gtd */
    memcpy(g_prev, g_io, n * sizeof(float));
    /* bracketing phase */
    while (ls_iter < max_ls) {
        /* f_new > f + c1 * t * gtd  or  (ls_iter > 1 and f_new >= f_prev): Armijo fails */
        if (n_lt(n_add(f, n_mul(n_mul(c1, t), gtd)), f_new) || (ls_iter > 1 && n_le(f_prev, f_new))) {
            nb = 2;
            break;
        }
        if (n_le(n_abs(gtd_new), neg_c2_gtd)) {                        /* strong Wolfe holds */
            nb = 1; done = 1;
            break;
        }
        if (n_le(py(0.0), gtd_new)) {                                   /* passed a minimum */
            nb = 2;
            break;
        }
        /* extrapolate: cubic step, at least 1% beyond t and at most 10 t */
        Num bounds[2] = { n_add(t, n_mul(py(0.01), n_sub(t, t_prev))), n_mul(t, py(10.0)) }, tmp = t;
        t = lb_cubic(t_prev, f_prev, gtd_prev, t, f_new, gtd_new, bounds);
        t_prev = tmp; f_prev = f_new; memcpy(g_prev, g_new, n * sizeof(float)); gtd_prev = gtd_new;
        f_new = lb_phi(E, x, t, d, g_new);
        evals++;
        gtd_new = n_dot(g_new, d, n);
        ls_iter++;
    }
    if (ls_iter == max_ls) {   /* no bracket found in 25 trials: [0, t] (the zoom does not run) */
        b[0] = py(0.0); bf[0] = f; memcpy(bg[0], g_io, n * sizeof(float));
        b[1] = t;       bf[1] = f_new; memcpy(bg[1], g_new, n * sizeof(float));
        nb = 2;
    } else if (nb == 1) {      /* [t] */
        b[0] = t; bf[0] = f_new; memcpy(bg[0], g_new, n * sizeof(float));
    } else {                   /* [t_prev, t] */
        b[0] = t_prev; bf[0] = f_prev; memcpy(bg[0], g_prev, n * sizeof(float)); bgtd[0] = gtd_prev;
        b[1] = t;      bf[1] = f_new;  memcpy(bg[1], g_new, n * sizeof(float));  bgtd[1] = gtd_new;
    }
    /* zoom phase */
    int insuf = 0;
    int lo = (nb == 1 || n_le(bf[0], bf[nb - 1])) ? 0 : 1, hi = 1 - lo;
    while (!done && ls_iter < max_ls) {
        if (n_lt(n_mul(n_abs(n_sub(b[1], b[0])), d_norm), tol)) break;
        t = lb_cubic(b[0], bf[0], bgtd[0], b[1], bf[1], bgtd[1], NULL);
        Num bmax = n_max(b[0], b[1]), bmin = n_min(b[0], b[1]);
        Num eps = n_mul(py(0.1), n_sub(bmax, bmin));
        if (n_lt(n_min(n_sub(bmax, t), n_sub(t, bmin)), eps)) {
            if (insuf || n_le(bmax, t) || n_le(t, bmin)) {
                t = n_lt(n_abs(n_sub(t, bmax)), n_abs(n_sub(t, bmin))) ? n_sub(bmax, eps) : n_add(bmin, eps);
                insuf = 0;
            } else insuf = 1;
        } else insuf = 0;
        f_new = lb_phi(E, x, t, d, g_new);
        evals++;
        gtd_new = n_dot(g_new, d, n);
        ls_iter++;
        if (n_lt(n_add(f, n_mul(n_mul(c1, t), gtd)), f_new) || n_le(bf[lo], f_new)) {
            b[hi] = t; bf[hi] = f_new; memcpy(bg[hi], g_new, n * sizeof(float)); bgtd[hi] = gtd_new;
            lo = n_le(bf[0], bf[1]) ? 0 : 1; hi = 1 - lo;
        } else {
            if (n_le(n_abs(gtd_new), neg_c2_gtd)) done = 1;
            else if (n_le(py(0.0), n_mul(gtd_new, n_sub(b[hi], b[lo])))) {   /* old low end becomes the high end */
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
    Num *rho = (Num *)malloc((size_t)H * 2 * sizeof(Num));
    if (!mem || !rho) {
        ms_free_aligned(mem); free(rho);
        return ms_errorf(MS_ERR_NOMEM, "lbfgs: cannot allocate %zu floats of history", n * nvec);
    }
    Num *al = rho + H;
    float *g = mem, *d = mem + n, *prev_g = mem + 2 * n, *xt = mem + 3 * n, *w = mem + 4 * n;  /* w: 4n */
    float *ys_y = mem + 8 * n;          /* H vectors y (gradient changes) */
    float *ys_s = ys_y + (size_t)H * n; /* H vectors s (steps) */
    float *tmp = ys_s + (size_t)H * n;  /* one vector */
    int head = 0, nh = 0;               /* ring buffer of the history: oldest at head */
    LbfgsEval E = { f, ctx, n, xt, best_x, INFINITY, trace, trace_cap, 0 };
    Num H_diag = py(1.0), t = py(0.0), prev_loss, loss;
    memset(res, 0, sizeof *res);

    loss = lb_call(&E, x, g);
    res->f_first = loss.v;
    int n_iter = 0, current_evals = 1;
    int opt_cond = lb_absmax(g, n) <= (float)o->tolerance_grad;
    while (!opt_cond && n_iter < o->max_iter) {
        n_iter++;
        /* a. direction */
        if (n_iter == 1) {
            for (size_t i = 0; i < n; i++) d[i] = -g[i];
            nh = 0; head = 0; H_diag = py(1.0);
        } else {
            float *y = tmp;
            const float tf = (float)t.v;
            for (size_t i = 0; i < n; i++) y[i] = g[i] - prev_g[i];
            for (size_t i = 0; i < n; i++) d[i] = d[i] * tf;              /* s = d.mul(t) */
            Num ys = n_dot(y, d, n);
            if (n_lt(py(1e-10), ys)) {
                int slot;
                if (nh == H) { slot = head; head = (head + 1) % H; }
                else slot = (head + nh++) % H;
                memcpy(ys_y + (size_t)slot * n, y, n * sizeof(float));
                memcpy(ys_s + (size_t)slot * n, d, n * sizeof(float));
                rho[slot] = n_div(py(1.0), ys);
                H_diag = n_div(ys, n_dot(y, y, n));
            }
            float *q = d;                                    /* two-loop recursion in place */
            for (size_t i = 0; i < n; i++) q[i] = -g[i];
            for (int k = nh - 1; k >= 0; k--) {
                int sl = (head + k) % H;
                const float *sk = ys_s + (size_t)sl * n, *yk = ys_y + (size_t)sl * n;
                al[k] = n_mul(n_dot(sk, q, n), rho[sl]);
                float a = (float)-al[k].v;                   /* q.add_(y, alpha=-al) */
                for (size_t i = 0; i < n; i++) q[i] = fmaf(a, yk[i], q[i]);
            }
            if (H_diag.t || H_diag.v != 1.0) {               /* d = q * H_diag */
                float hd = (float)H_diag.v;
                for (size_t i = 0; i < n; i++) d[i] = q[i] * hd;
            }
            for (int k = 0; k < nh; k++) {
                int sl = (head + k) % H;
                const float *sk = ys_s + (size_t)sl * n, *yk = ys_y + (size_t)sl * n;
                Num be = n_mul(n_dot(yk, d, n), rho[sl]);
                float a = (float)n_sub(al[k], be).v;          /* d.add_(s, alpha=al - be) */
                for (size_t i = 0; i < n; i++) d[i] = fmaf(a, sk[i], d[i]);
            }
        }
        memcpy(prev_g, g, n * sizeof(float));
        prev_loss = loss;
        /* b. step length guess: min(1., 1. / g.abs().sum()) * lr, then lr */
        if (n_iter == 1) {
            double s1 = 0.0;
            for (size_t i = 0; i < n; i++) s1 += fabs((double)g[i]);
            t = n_mul(n_min(py(1.0), n_div(py(1.0), ft(s1))), py(o->lr));
        } else t = py(o->lr);
        /* c. directional derivative */
        Num gtd = n_dot(g, d, n);
        if (n_lt(py(-o->tolerance_change), gtd)) break;
        /* d. line search or fixed step */
        int ls_evals = 0;
        if (o->strong_wolfe) {
            /* trials go to E.xt, so x itself is torch's x_init */
            loss = lb_strong_wolfe(&E, x, &t, d, loss, g, gtd, w, &ls_evals);
            lb_axpy(x, x, t, d, n);
            opt_cond = lb_absmax(g, n) <= (float)o->tolerance_grad;
        } else {
            lb_axpy(x, x, t, d, n);
            if (n_iter != o->max_iter) {
                loss = lb_call(&E, x, g);
                opt_cond = lb_absmax(g, n) <= (float)o->tolerance_grad;
                ls_evals = 1;
            }
        }
        current_evals += ls_evals;
        /* e. stopping rules */
        if (n_iter == o->max_iter) break;
        if (current_evals >= o->max_eval) break;
        if (opt_cond) break;
        const float tf = (float)t.v;                          /* d.mul(t).abs().max() <= tolerance_change */
        double dmax = 0.0;
        for (size_t i = 0; i < n; i++) { float v = fabsf(d[i] * tf); if (v > dmax) dmax = v; }
        if (dmax <= (float)o->tolerance_change) break;
        if (fabs(loss.v - prev_loss.v) < o->tolerance_change) break;
    }
    res->n_iter = n_iter;
    res->n_evals = E.evals;
    res->f_last = loss.v;
    res->best_f = E.best_f;
    ms_free_aligned(mem);
    free(rho);
    return MS_OK;
}
