/* models/evalnet.c — the alignment stand-ins of `mixshow eval` (issue 15): a small conv image
 * encoder with a text head and an identity head, a CLIP-architecture text tower with a
 * projection, their losses (CLIP's symmetric InfoNCE, supervised contrastive) and the training
 * step. The paper's metrics are CLIP ViT cosines (Mix-of-Show, arXiv:2305.18292v2, Sec. 5);
 * these are the same measurements made by encoders trained on the procedural world only.
 *
 * Every layer is an op of tensor.c with its own checked backward (conv2d, groupnorm, silu,
 * avgpool2x2, linear) or the CLIP text encoder of models/clip.c; what is new here is the
 * composition, the pooling of the text tower and the three losses, each gradchecked in
 * tests/test_evalnet.c. */
#include "mixshow.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define EVAL_GN_EPS 1e-5f          /* torch.nn.GroupNorm's default */
#define EVAL_MAX_LOGIT_SCALE 4.6051702f   /* ln 100: CLIP clamps exp(logit_scale) to 100 */

/* ---- configuration ---- */
void evalnet_config_default(EvalNetConfig *c) {
    memset(c, 0, sizeof *c);
    c->size = 64;
    c->n_levels = 4;
    c->channels[0] = 16; c->channels[1] = 32; c->channels[2] = 64; c->channels[3] = 128;
    c->layers = 0;
    c->groups = 8;
    c->text_pool = 4;
    c->embed_dim = 64;
    c->id_dim = 64;
    ms_clip_text_config_sd15(&c->text);
    c->text.hidden_size = 64;
    c->text.intermediate_size = 256;
    c->text.projection_dim = 64;
    c->text.num_hidden_layers = 2;
    c->text.num_attention_heads = 2;
    c->text.max_position_embeddings = 32;
}

static int is_pow2(int x) { return x > 0 && (x & (x - 1)) == 0; }

MsStatus evalnet_config_check(const EvalNetConfig *c) {
    if (c->n_levels < 1 || c->n_levels > MS_MAX_BLOCKS)
        return ms_errorf(MS_ERR_ARG, "evalnet config: n_levels %d (1..%d)", c->n_levels, MS_MAX_BLOCKS);
    if (c->groups < 1) return ms_errorf(MS_ERR_ARG, "evalnet config: groups %d (>= 1)", c->groups);
    for (int i = 0; i < c->n_levels; i++)
        if (c->channels[i] < 1 || c->channels[i] > 4096 || c->channels[i] % c->groups)
            return ms_errorf(MS_ERR_ARG, "evalnet config: channels[%d] %d: 1..4096 and divisible by groups %d", i,
                             c->channels[i], c->groups);
    if (c->layers < 0 || c->n_levels * (c->layers + 1) - 1 > EVAL_MAX_UNITS)
        return ms_errorf(MS_ERR_ARG, "evalnet config: layers %d (0.., at most %d units in all)", c->layers, EVAL_MAX_UNITS);
    if (c->size < 1 || c->size > 1024 || c->size % (1 << (c->n_levels - 1)) || !is_pow2(c->size >> (c->n_levels - 1)))
        return ms_errorf(MS_ERR_ARG, "evalnet config: size %d: <= 1024, and size / 2^(n_levels-1) a power of 2", c->size);
    if (!is_pow2(c->text_pool) || c->text_pool > (c->size >> (c->n_levels - 1)))
        return ms_errorf(MS_ERR_ARG, "evalnet config: text_pool %d: a power of 2 <= the last map's side %d", c->text_pool,
                         c->size >> (c->n_levels - 1));
    if (c->embed_dim < 1 || c->embed_dim > 4096 || c->id_dim < 1 || c->id_dim > 4096)
        return ms_errorf(MS_ERR_ARG, "evalnet config: embed_dim %d, id_dim %d (1..4096)", c->embed_dim, c->id_dim);
    return ms_clip_text_config_check(&c->text);
}

int evalnet_units(const EvalNetConfig *c, EvalUnit *u) {
    int n = 0;
    for (int i = 0; i < c->n_levels; i++) {
        const int side = c->size >> i, ch = c->channels[i];
        for (int j = 0; j < c->layers; j++) { EvalUnit x = { i, j, ch, ch, 1, side }; u[n++] = x; }
        if (i + 1 < c->n_levels) { EvalUnit x = { i, c->layers, ch, c->channels[i + 1], 2, side }; u[n++] = x; }
    }
    return n;
}

/* ---- parameters ---- */
static MsStatus bind1(float **out, const MsParamTable *t, const char *name) {
    int i = ms_param_find(t, name);
    if (i < 0) return ms_errorf(MS_ERR_ARG, "evalnet: the table has no '%s'", name);
    if (!t->p[i].f32) return ms_errorf(MS_ERR_UNSUPPORTED, "evalnet: '%s' holds no f32 data", name);
    *out = t->p[i].f32;
    return MS_OK;
}

MsStatus evalnet_params_bind(EvalNetParams *p, const MsParamTable *t, const EvalNetConfig *c) {
    EvalUnit u[EVAL_MAX_UNITS];
    char nm[MS_KEY_MAX];
    MsStatus s;
    memset(p, 0, sizeof *p);
    const int n = evalnet_units(c, u);
    if ((s = bind1(&p->conv_in_w, t, "image.conv_in.weight")) || (s = bind1(&p->conv_in_b, t, "image.conv_in.bias")))
        return s;
    for (int k = 0; k < n; k++) {
        static const char *const what[4] = { "norm.weight", "norm.bias", "conv.weight", "conv.bias" };
        float **dst[4] = { &p->norm_w[k], &p->norm_b[k], &p->conv_w[k], &p->conv_b[k] };
        for (int q = 0; q < 4; q++) {
            snprintf(nm, sizeof nm, "image.down.%d.%d.%s", u[k].level, u[k].j, what[q]);
            if ((s = bind1(dst[q], t, nm))) return s;
        }
    }
    if ((s = bind1(&p->norm_out_w, t, "image.norm_out.weight")) || (s = bind1(&p->norm_out_b, t, "image.norm_out.bias")) ||
        (s = bind1(&p->text_proj_w, t, "image.text_proj.weight")) || (s = bind1(&p->id_proj_w, t, "image.id_proj.weight")) ||
        (s = bind1(&p->text_projection_w, t, "text_projection.weight")) || (s = bind1(&p->logit_scale, t, "logit_scale")))
        return s;
    return MS_OK;
}

/* ---- image trunk: activations ---- */
/* One pass over the buffers: carves them from ar, or (ar NULL) only adds up their bytes. */
static int carve(Arena *ar, float **p, size_t n, size_t *bytes) {
    *bytes += (n * sizeof(float) + 63) & ~(size_t)63;
    if (!ar) { *p = NULL; return 1; }
    return (*p = arena_floats(ar, n)) != NULL;
}

static int image_plan(EvalImageActs *a, Arena *ar, const EvalNetConfig *c, int N, size_t *bytes) {
    const int G = c->groups, h = c->size >> (c->n_levels - 1), C = c->channels[c->n_levels - 1];
    size_t big = (size_t)c->channels[0] * c->size * c->size;
    int ok = 1;
    memset(a, 0, sizeof *a);
    *bytes = 0;
    a->N = N;
    a->n_units = evalnet_units(c, a->u);
    ok &= carve(ar, &a->x[0], (size_t)N * big, bytes);
    for (int k = 0; k < a->n_units; k++) {
        const EvalUnit *u = &a->u[k];
        const int ho = u->hin / u->stride;
        const size_t in = (size_t)u->cin * u->hin * u->hin, out = (size_t)u->cout * ho * ho;
        if (in > big) big = in;
        if (out > big) big = out;
        ok &= carve(ar, &a->nrm[k], (size_t)N * in, bytes);
        ok &= carve(ar, &a->mean[k], (size_t)N * G, bytes) && carve(ar, &a->rstd[k], (size_t)N * G, bytes);
        ok &= carve(ar, &a->x[k + 1], (size_t)N * out, bytes);
    }
    const int U = a->n_units;
    ok &= carve(ar, &a->nrm[U], (size_t)N * C * h * h, bytes);
    ok &= carve(ar, &a->mean[U], (size_t)N * G, bytes) && carve(ar, &a->rstd[U], (size_t)N * G, bytes);
    for (int k = 0, side = h; side >= 1; k++, side /= 2) {
        ok &= carve(ar, &a->pool[k], (size_t)N * C * side * side, bytes);
        ok &= carve(ar, &a->dpool[k], (size_t)N * C * side * side, bytes);
        if (side == c->text_pool) a->n_pool = k;
        a->id_pool = k;
    }
    ok &= carve(ar, &a->temb, (size_t)N * c->embed_dim, bytes) && carve(ar, &a->iemb, (size_t)N * c->id_dim, bytes);
    ok &= carve(ar, &a->s, (size_t)N * big, bytes);
    ok &= carve(ar, &a->d0, (size_t)N * big, bytes) && carve(ar, &a->d1, (size_t)N * big, bytes);
    return ok;
}

size_t evalnet_image_sizes(const EvalNetConfig *c, int N) {
    EvalImageActs a;
    size_t bytes;
    image_plan(&a, NULL, c, N, &bytes);
    return bytes + 64;
}

MsStatus evalnet_image_acts_alloc(EvalImageActs *a, Arena *ar, const EvalNetConfig *c, int N) {
    size_t bytes;
    MsStatus s = evalnet_config_check(c);
    if (s) return s;
    if (N < 1) return ms_errorf(MS_ERR_ARG, "evalnet: batch %d", N);
    if (!image_plan(a, ar, c, N, &bytes))
        return ms_errorf(MS_ERR_NOMEM, "evalnet: the arena holds %zu bytes, the image activations need %zu", ar->cap, bytes);
    return MS_OK;
}

/* ---- image trunk: forward and backward ---- */
void evalnet_image_forward(EvalImageActs *a, const EvalNetParams *p, const float *img, const EvalNetConfig *c) {
    const int N = a->N, G = c->groups, U = a->n_units, h = c->size >> (c->n_levels - 1);
    const int C = c->channels[c->n_levels - 1], P = c->text_pool;
    conv2d_forward(a->x[0], img, p->conv_in_w, p->conv_in_b, N, 3, c->channels[0], c->size, c->size, 3, 1, 1);
    for (int k = 0; k < U; k++) {              /* GroupNorm -> SiLU -> conv 3x3 (stride 1 or 2) */
        const EvalUnit *u = &a->u[k];
        const size_t n = (size_t)N * u->cin * u->hin * u->hin;
        groupnorm_forward(a->nrm[k], a->mean[k], a->rstd[k], a->x[k], p->norm_w[k], p->norm_b[k], N, u->cin,
                          u->hin * u->hin, G, EVAL_GN_EPS);
        silu_forward(a->s, a->nrm[k], n);
        conv2d_forward(a->x[k + 1], a->s, p->conv_w[k], p->conv_b[k], N, u->cin, u->cout, u->hin, u->hin, 3, u->stride, 1);
    }
    groupnorm_forward(a->nrm[U], a->mean[U], a->rstd[U], a->x[U], p->norm_out_w, p->norm_out_b, N, C, h * h, G, EVAL_GN_EPS);
    silu_forward(a->pool[0], a->nrm[U], (size_t)N * C * h * h);
    for (int k = 1, side = h; k <= a->id_pool; k++, side /= 2)    /* (N,C,side,side) -> side/2 */
        avgpool2x2_forward(a->pool[k], a->pool[k - 1], N, C, side, side);
    linear_forward(a->temb, a->pool[a->n_pool], p->text_proj_w, NULL, N, C * P * P, c->embed_dim);
    linear_forward(a->iemb, a->pool[a->id_pool], p->id_proj_w, NULL, N, C, c->id_dim);
}

/* The forward's calls in reverse. d0 / d1 alternate as "gradient of the current unit's output"
 * and "of its input"; the SiLU output each conv read is recomputed from the saved norm output. */
void evalnet_image_backward(const EvalNetParams *dp, const float *dtemb, const float *diemb, EvalImageActs *a,
                            const EvalNetParams *p, const float *img, const EvalNetConfig *c) {
    const int N = a->N, G = c->groups, U = a->n_units, h = c->size >> (c->n_levels - 1);
    const int C = c->channels[c->n_levels - 1], P = c->text_pool;
    for (int k = 0, side = h; k <= a->id_pool; k++, side /= 2) memset(a->dpool[k], 0, (size_t)N * C * side * side * sizeof(float));
    if (dtemb) linear_backward(a->dpool[a->n_pool], dp->text_proj_w, NULL, dtemb, a->pool[a->n_pool], p->text_proj_w, N,
                               C * P * P, c->embed_dim);
    if (diemb) linear_backward(a->dpool[a->id_pool], dp->id_proj_w, NULL, diemb, a->pool[a->id_pool], p->id_proj_w, N, C,
                               c->id_dim);
    for (int k = a->id_pool; k >= 1; k--) {
        const int side = h >> (k - 1);
        avgpool2x2_backward(a->dpool[k - 1], a->dpool[k], N, C, side, side);
    }
    float *dcur = a->d0, *dother = a->d1;
    size_t n = (size_t)N * C * h * h;
    memset(dother, 0, n * sizeof(float));
    silu_backward(dother, a->dpool[0], a->nrm[U], n);
    memset(dcur, 0, n * sizeof(float));
    groupnorm_backward(dcur, dp->norm_out_w, dp->norm_out_b, dother, a->x[U], a->mean[U], a->rstd[U], p->norm_out_w, N, C,
                       h * h, G);
    for (int k = U - 1; k >= 0; k--) {           /* dcur = dL/d(unit k output) */
        const EvalUnit *u = &a->u[k];
        n = (size_t)N * u->cin * u->hin * u->hin;
        silu_forward(a->s, a->nrm[k], n);
        memset(dother, 0, n * sizeof(float));
        conv2d_backward(dother, dp->conv_w[k], dp->conv_b[k], dcur, a->s, p->conv_w[k], N, u->cin, u->cout, u->hin, u->hin,
                        3, u->stride, 1, 1, 1, 1);
        memset(dcur, 0, n * sizeof(float));
        silu_backward(dcur, dother, a->nrm[k], n);
        memset(dother, 0, n * sizeof(float));
        groupnorm_backward(dother, dp->norm_w[k], dp->norm_b[k], dcur, a->x[k], a->mean[k], a->rstd[k], p->norm_w[k], N,
                           u->cin, u->hin * u->hin, G);
        float *t = dcur; dcur = dother; dother = t;
    }
    conv2d_backward(NULL, dp->conv_in_w, dp->conv_in_b, dcur, img, p->conv_in_w, N, 3, c->channels[0], c->size, c->size, 3,
                    1, 1, 1, 1, 1);
}

/* ---- text tower pooling ---- */
static int first_eos(const int32_t *ids, int eos_id, int T) {
    for (int t = 0; t < T; t++) if (ids[t] == eos_id) return t;
    return T - 1;
}

void evalnet_text_pool_forward(float *pooled, const float *out, const int32_t *ids, int eos_id, int B, int T, int D) {
    for (int b = 0; b < B; b++)
        memcpy(pooled + (size_t)b * D, out + ((size_t)b * T + first_eos(ids + (size_t)b * T, eos_id, T)) * D,
               (size_t)D * sizeof(float));
}

void evalnet_text_pool_backward(float *dout, const float *dpooled, const int32_t *ids, int eos_id, int B, int T, int D) {
    for (int b = 0; b < B; b++) {
        float *d = dout + ((size_t)b * T + first_eos(ids + (size_t)b * T, eos_id, T)) * D;
        for (int i = 0; i < D; i++) d[i] += dpooled[(size_t)b * D + i];
    }
}

/* ---- losses ---- */
void l2norm_forward(float *y, float *norm, const float *x, int N, int D) {
    for (int n = 0; n < N; n++) {
        const float *xi = x + (size_t)n * D;
        double ss = 0.0;
        for (int i = 0; i < D; i++) ss += (double)xi[i] * xi[i];
        const double r = sqrt(ss) > 1e-12 ? sqrt(ss) : 1e-12;
        norm[n] = (float)r;
        for (int i = 0; i < D; i++) y[(size_t)n * D + i] = (float)(xi[i] / r);
    }
}

/* y = x / r, r = ||x||:  dy/dx = (I - y y^T) / r,  so dx = (dy - y (y . dy)) / r. */
void l2norm_backward(float *dx, const float *dy, const float *y, const float *norm, int N, int D) {
    for (int n = 0; n < N; n++) {
        const float *yi = y + (size_t)n * D, *gi = dy + (size_t)n * D;
        double dot = 0.0;
        for (int i = 0; i < D; i++) dot += (double)yi[i] * gi[i];
        for (int i = 0; i < D; i++) dx[(size_t)n * D + i] += (float)((gi[i] - yi[i] * dot) / norm[n]);
    }
}

static double dot_f(const float *a, const float *b, int E) {
    double s = 0.0;
    for (int i = 0; i < E; i++) s += (double)a[i] * b[i];
    return s;
}

/* logits l (B,B) = s u v^T in double; returns the loss and, when pr / pc are given, the row and
 * column softmaxes (B,B). */
static double clip_logits(double *l, double *pr, double *pc, const float *u, const float *v, float logit_scale, int B,
                          int E, int *correct) {
    const double s = exp((double)logit_scale);
    double loss = 0.0;
    int hits = 0;
    for (int i = 0; i < B; i++)
        for (int j = 0; j < B; j++) l[(size_t)i * B + j] = s * dot_f(u + (size_t)i * E, v + (size_t)j * E, E);
    for (int pass = 0; pass < 2; pass++)          /* 0: rows (image -> text), 1: columns */
        for (int i = 0; i < B; i++) {
            double mx = -INFINITY, z = 0.0;
            int arg = 0;
            for (int j = 0; j < B; j++) {
                const double x = pass ? l[(size_t)j * B + i] : l[(size_t)i * B + j];
                if (x > mx) { mx = x; arg = j; }
            }
            for (int j = 0; j < B; j++) z += exp((pass ? l[(size_t)j * B + i] : l[(size_t)i * B + j]) - mx);
            loss += -(l[(size_t)i * B + i] - mx - log(z));
            if (!pass && arg == i) hits++;
            double *pm = pass ? pc : pr;
            if (pm)
                for (int j = 0; j < B; j++) {
                    const size_t at = pass ? (size_t)j * B + i : (size_t)i * B + j;
                    pm[at] = exp(l[at] - mx) / z;
                }
        }
    if (correct) *correct = hits;
    return loss / (2.0 * B);
}

double clip_loss_forward(const float *u, const float *v, float logit_scale, int B, int E, int *correct, double *work) {
    return clip_logits(work, NULL, NULL, u, v, logit_scale, B, E, correct);
}

void clip_loss_backward(float *du, float *dv, float *dlogit_scale, const float *u, const float *v, float logit_scale,
                        int B, int E, float dloss, double *work) {
    double *l = work, *pr = l + (size_t)B * B, *pc = pr + (size_t)B * B, ds = 0.0;
    const double s = exp((double)logit_scale);
    clip_logits(l, pr, pc, u, v, logit_scale, B, E, NULL);
    for (int i = 0; i < B; i++)
        for (int j = 0; j < B; j++) {
            const size_t at = (size_t)i * B + j;
            const double g = (pr[at] + pc[at] - 2.0 * (i == j)) / (2.0 * B) * dloss;
            ds += g * l[at];
            for (int e = 0; e < E; e++) {
                if (du) du[(size_t)i * E + e] += (float)(s * g * v[(size_t)j * E + e]);
                if (dv) dv[(size_t)j * E + e] += (float)(s * g * u[(size_t)i * E + e]);
            }
        }
    if (dlogit_scale) *dlogit_scale += (float)ds;
}

/* One pass for forward (g NULL) and backward: per anchor the softmax over a != i, the loss terms
 * and, with g, the per-pair gradients g (N,N) of L with respect to z_i . z_a / tau. */
static double supcon_pass(double *g, double *q, const float *z, const int *labels, float tau, int N, int E) {
    double loss = 0.0;
    int anchors = 0;
    for (int i = 0; i < N; i++) {
        int np = 0;
        for (int a = 0; a < N; a++) np += a != i && labels[a] == labels[i];
        anchors += np > 0;
    }
    for (int i = 0; i < N; i++) {
        int np = 0;
        double mx = -INFINITY, zs = 0.0, pos = 0.0;
        for (int a = 0; a < N; a++) {
            q[a] = a == i ? -INFINITY : dot_f(z + (size_t)i * E, z + (size_t)a * E, E) / tau;
            if (q[a] > mx) mx = q[a];
            np += a != i && labels[a] == labels[i];
        }
        if (!np) { if (g) for (int a = 0; a < N; a++) g[(size_t)i * N + a] = 0.0; continue; }
        for (int a = 0; a < N; a++) if (a != i) zs += exp(q[a] - mx);
        const double lse = mx + log(zs);
        for (int a = 0; a < N; a++)
            if (a != i && labels[a] == labels[i]) pos += q[a] - lse;
        loss += -pos / np;
        if (g)
            for (int a = 0; a < N; a++)
                g[(size_t)i * N + a] = a == i ? 0.0 : (exp(q[a] - lse) - (labels[a] == labels[i] ? 1.0 / np : 0.0)) / anchors;
    }
    return anchors ? loss / anchors : 0.0;
}

double supcon_loss_forward(const float *z, const int *labels, float tau, int N, int E, double *work) {
    return supcon_pass(NULL, work, z, labels, tau, N, E);
}

void supcon_loss_backward(float *dz, const float *z, const int *labels, float tau, int N, int E, float dloss,
                          double *work) {
    double *g = work + N;
    supcon_pass(g, work, z, labels, tau, N, E);
    for (int i = 0; i < N; i++)
        for (int a = 0; a < N; a++) {
            const double w = g[(size_t)i * N + a] * dloss / tau;
            if (w == 0.0) continue;
            for (int e = 0; e < E; e++) {
                dz[(size_t)i * E + e] += (float)(w * z[(size_t)a * E + e]);
                dz[(size_t)a * E + e] += (float)(w * z[(size_t)i * E + e]);
            }
        }
}

/* ---- the encoders ---- */
MsStatus evalnet_create(EvalNet *e, const EvalNetConfig *c) {
    MsStatus s;
    memset(e, 0, sizeof *e);
    e->cfg = *c;
    if ((s = ms_param_table_evalnet(c, &e->net)) || (s = ms_param_table_alloc(&e->net, NULL)) ||
        (s = ms_param_table_text(&c->text, &e->text)) || (s = ms_param_table_alloc(&e->text, NULL)))
        goto fail;
    memset(e->net.mem, 0, e->net.mem_bytes);
    memset(e->text.mem, 0, e->text.mem_bytes);
    if ((s = evalnet_params_bind(&e->p, &e->net, c)) || (s = clip_text_params(&e->tp, &e->text, &c->text))) goto fail;
    return MS_OK;
fail:
    evalnet_free(e);
    return s;
}

void evalnet_free(EvalNet *e) {
    ms_param_table_free(&e->net);
    ms_param_table_free(&e->text);
    memset(e, 0, sizeof *e);
}

#define EVAL_CHUNK 16   /* images or texts per inference pass */

MsStatus evalnet_embed_images(const EvalNet *e, const float *img, int N, float *temb, float *iemb) {
    const EvalNetConfig *c = &e->cfg;
    const int B = N < EVAL_CHUNK ? N : EVAL_CHUNK;
    const size_t px = (size_t)3 * c->size * c->size;
    Arena ar;
    EvalImageActs a;
    float *norm = (float *)malloc((size_t)B * sizeof(float));
    MsStatus s;
    if (N < 1) { free(norm); return MS_OK; }
    if (!norm) return ms_errorf(MS_ERR_NOMEM, "evalnet: out of memory");
    if ((s = arena_init(&ar, evalnet_image_sizes(c, B)))) { free(norm); return s; }
    for (int i0 = 0; i0 < N && !s; i0 += B) {
        const int n = N - i0 < B ? N - i0 : B;
        arena_reset(&ar, 0);
        if ((s = evalnet_image_acts_alloc(&a, &ar, c, n))) break;
        evalnet_image_forward(&a, &e->p, img + (size_t)i0 * px, c);
        if (temb) l2norm_forward(temb + (size_t)i0 * c->embed_dim, norm, a.temb, n, c->embed_dim);
        if (iemb) l2norm_forward(iemb + (size_t)i0 * c->id_dim, norm, a.iemb, n, c->id_dim);
    }
    arena_free(&ar);
    free(norm);
    return s;
}

MsStatus evalnet_embed_texts(const EvalNet *e, const ClipTokenizer *tok, const char *const *texts, int N, float *tvec) {
    const EvalNetConfig *c = &e->cfg;
    const int B = N < EVAL_CHUNK ? N : EVAL_CHUNK, T = c->text.max_position_embeddings, D = c->text.hidden_size;
    Arena ar;
    ClipTextActs ta;
    int32_t *ids = (int32_t *)malloc((size_t)B * T * sizeof(int32_t));
    float *pooled = (float *)malloc((size_t)B * D * sizeof(float)), *proj = (float *)malloc((size_t)B * c->embed_dim * sizeof(float));
    float *norm = (float *)malloc((size_t)B * sizeof(float));
    MsStatus s = MS_OK;
    if (N < 1) goto done;
    if (!ids || !pooled || !proj || !norm) { s = ms_errorf(MS_ERR_NOMEM, "evalnet: out of memory"); goto done; }
    if ((s = arena_init(&ar, clip_text_sizes(&c->text, B, T, 0, CLIP_INFER)))) goto done;
    for (int i0 = 0; i0 < N && !s; i0 += B) {
        const int n = N - i0 < B ? N - i0 : B;
        arena_reset(&ar, 0);
        if ((s = clip_text_acts_alloc(&ta, &ar, &c->text, n, T, 0, CLIP_INFER))) break;
        for (int b = 0; b < n && !s; b++)
            s = clip_tokenize(tok, texts[i0 + b], strlen(texts[i0 + b]), ids + (size_t)b * T, T);
        if (s || (s = clip_text_forward(&ta, &e->tp, NULL, ids, NULL, 0, &c->text))) break;
        evalnet_text_pool_forward(pooled, ta.out, ids, tok->eos_id, n, T, D);
        linear_forward(proj, pooled, e->p.text_projection_w, NULL, n, D, c->embed_dim);
        l2norm_forward(tvec + (size_t)i0 * c->embed_dim, norm, proj, n, c->embed_dim);
    }
    arena_free(&ar);
done:
    free(ids); free(pooled); free(proj); free(norm);
    return s;
}

/* ---- training ---- */
/* A max-norm constraint on the token table (V, D): every row longer than X is scaled by
 * X / (|row| + 1e-7), torch.nn.Embedding(max_norm=X)'s renormalisation (which torch applies to the
 * rows a batch looks up, before the lookup; here to every row, after the update: the same bound,
 * and no row depends on the batch order). Why: a text encoder trained on the world lets its token
 * rows grow (0.79 on average after 2000 contrastive steps, 1.0 after 14000 steps with the UNet)
 * where Mix-of-Show's emb_norm_threshold 0.55 presumes a table whose class words lie below it:
 * concept rows initialised from such a word then start above the threshold and never train. */
void evalnet_token_max_norm(float *tok, int V, int D, double x) {
    for (int r = 0; r < V; r++) {
        float *row = tok + (size_t)r * D;
        double n2 = 0.0;
        for (int d = 0; d < D; d++) n2 += (double)row[d] * row[d];
        const double n = sqrt(n2);
        if (n > x) {
            const float sc = (float)(x / (n + 1e-7));
            for (int d = 0; d < D; d++) row[d] *= sc;
        }
    }
}

void evalnet_train_config_default(EvalTrainConfig *c) {
    memset(c, 0, sizeof *c);
    c->lr = 2e-3;
    c->warmup = 50;
    c->weight_decay = 0.01;
    c->beta1 = 0.9; c->beta2 = 0.999; c->adam_eps = 1e-8;
    c->tau = 0.1f;
}

struct EvalTrainer {
    EvalTrainConfig cfg;
    EvalNet *e;
    const ClipTokenizer *tok;
    int Bt, Bi, N, T;
    MsParamTable gnet, gtext;          /* gradients, the weights' layout */
    EvalNetParams dp;
    ClipTextParams dtp;
    float *mom_m, *mom_v;              /* AdamW moments: net block, then text block */
    size_t nn, nt;
    Arena iar, tar;
    EvalImageActs ia;
    ClipTextActs ta;
    int32_t *ids;                      /* (Bt,T) */
    float *pooled, *proj, *u, *v, *z;  /* (Bt,D), (Bt,E), (Bt,E), (Bt,E), (Bi,id) */
    float *unorm, *vnorm, *znorm;      /* (Bt), (Bt), (Bi) */
    float *du, *dv, *dz, *dproj, *dpooled, *dout;  /* (Bt,E) x3 .. (Bt,T,D) */
    float *dtemb, *diemb;              /* (N,E), (N,id) */
    double *work;                      /* the losses' pair matrices: max(3 Bt^2, Bi^2 + Bi) */
    int64_t step;
};

void evalnet_trainer_free(EvalTrainer *t) {
    if (!t) return;
    ms_param_table_free(&t->gnet); ms_param_table_free(&t->gtext);
    arena_free(&t->iar); arena_free(&t->tar);
    ms_free_aligned(t->mom_m); ms_free_aligned(t->mom_v);
    free(t->ids);
    ms_free_aligned(t->pooled); ms_free_aligned(t->proj); ms_free_aligned(t->u); ms_free_aligned(t->v); ms_free_aligned(t->z);
    ms_free_aligned(t->unorm); ms_free_aligned(t->vnorm); ms_free_aligned(t->znorm);
    ms_free_aligned(t->du); ms_free_aligned(t->dv); ms_free_aligned(t->dz); ms_free_aligned(t->dproj);
    ms_free_aligned(t->dpooled); ms_free_aligned(t->dout); ms_free_aligned(t->dtemb); ms_free_aligned(t->diemb);
    free(t->work);
    free(t);
}

MsStatus evalnet_trainer_create(EvalTrainer **out, EvalNet *e, const ClipTokenizer *tok, const EvalTrainConfig *c,
                                int Bt, int Bi) {
    const EvalNetConfig *ec = &e->cfg;
    EvalTrainer *t;
    MsStatus s;
    *out = NULL;
    if (Bt < 2 || Bi < 0 || Bt + Bi > 4096)
        return ms_errorf(MS_ERR_ARG, "evalnet trainer: %d captioned (>= 2) and %d identity images", Bt, Bi);
    if (!(c->lr >= 0) || c->warmup < 0 || !(c->tau > 0))
        return ms_errorf(MS_ERR_ARG, "evalnet trainer: lr %g, warmup %lld, tau %g", c->lr, (long long)c->warmup, (double)c->tau);
    if (!(t = (EvalTrainer *)calloc(1, sizeof *t))) return ms_errorf(MS_ERR_NOMEM, "evalnet trainer: out of memory");
    t->cfg = *c; t->e = e; t->tok = tok; t->Bt = Bt; t->Bi = Bi; t->N = Bt + Bi; t->T = ec->text.max_position_embeddings;
    const int E = ec->embed_dim, Ei = ec->id_dim, D = ec->text.hidden_size, N = t->N;
    t->nn = e->net.mem_bytes / sizeof(float);
    t->nt = e->text.mem_bytes / sizeof(float);
    if ((s = ms_param_table_evalnet(ec, &t->gnet)) || (s = ms_param_table_alloc(&t->gnet, NULL)) ||
        (s = ms_param_table_text(&ec->text, &t->gtext)) || (s = ms_param_table_alloc(&t->gtext, NULL)))
        goto fail;
    if (t->gnet.mem_bytes != e->net.mem_bytes || t->gtext.mem_bytes != e->text.mem_bytes) {
        s = ms_errorf(MS_ERR_SHAPE, "evalnet trainer: the encoders' tables are not those of their config"); goto fail;
    }
    memset(t->gnet.mem, 0, t->gnet.mem_bytes);
    memset(t->gtext.mem, 0, t->gtext.mem_bytes);
    if ((s = evalnet_params_bind(&t->dp, &t->gnet, ec)) || (s = clip_text_params(&t->dtp, &t->gtext, &ec->text))) goto fail;
    if ((s = arena_init(&t->iar, evalnet_image_sizes(ec, N))) || (s = evalnet_image_acts_alloc(&t->ia, &t->iar, ec, N)) ||
        (s = arena_init(&t->tar, clip_text_sizes(&ec->text, Bt, t->T, 0, CLIP_TRAIN_KEEP))) ||
        (s = clip_text_acts_alloc(&t->ta, &t->tar, &ec->text, Bt, t->T, 0, CLIP_TRAIN_KEEP)))
        goto fail;
    t->mom_m = (float *)ms_alloc_aligned(t->nn + t->nt, sizeof(float));
    t->mom_v = (float *)ms_alloc_aligned(t->nn + t->nt, sizeof(float));
    t->ids = (int32_t *)malloc((size_t)Bt * t->T * sizeof(int32_t));
    t->pooled = (float *)ms_alloc_aligned((size_t)Bt * D, sizeof(float));
    t->dpooled = (float *)ms_alloc_aligned((size_t)Bt * D, sizeof(float));
    t->dout = (float *)ms_alloc_aligned((size_t)Bt * t->T * D, sizeof(float));
    t->proj = (float *)ms_alloc_aligned((size_t)Bt * E, sizeof(float));
    t->u = (float *)ms_alloc_aligned((size_t)Bt * E, sizeof(float));
    t->v = (float *)ms_alloc_aligned((size_t)Bt * E, sizeof(float));
    t->du = (float *)ms_alloc_aligned((size_t)Bt * E, sizeof(float));
    t->dv = (float *)ms_alloc_aligned((size_t)Bt * E, sizeof(float));
    t->dproj = (float *)ms_alloc_aligned((size_t)Bt * E, sizeof(float));
    t->z = (float *)ms_alloc_aligned((size_t)(Bi ? Bi : 1) * Ei, sizeof(float));
    t->dz = (float *)ms_alloc_aligned((size_t)(Bi ? Bi : 1) * Ei, sizeof(float));
    t->unorm = (float *)ms_alloc_aligned((size_t)Bt, sizeof(float));
    t->vnorm = (float *)ms_alloc_aligned((size_t)Bt, sizeof(float));
    t->znorm = (float *)ms_alloc_aligned((size_t)(Bi ? Bi : 1), sizeof(float));
    t->dtemb = (float *)ms_alloc_aligned((size_t)N * E, sizeof(float));
    t->diemb = (float *)ms_alloc_aligned((size_t)N * Ei, sizeof(float));
    {
        const size_t wc = (size_t)3 * Bt * Bt, wi = (size_t)Bi * Bi + (size_t)Bi;
        t->work = (double *)malloc((wc > wi ? wc : wi) * sizeof(double));
    }
    if (!t->work || !t->mom_m || !t->mom_v || !t->ids || !t->pooled || !t->dpooled || !t->dout || !t->proj || !t->u || !t->v || !t->du ||
        !t->dv || !t->dproj || !t->z || !t->dz || !t->unorm || !t->vnorm || !t->znorm || !t->dtemb || !t->diemb) {
        s = ms_errorf(MS_ERR_NOMEM, "evalnet trainer: out of memory"); goto fail;
    }
    memset(t->mom_m, 0, (t->nn + t->nt) * sizeof(float));
    memset(t->mom_v, 0, (t->nn + t->nt) * sizeof(float));
    *out = t;
    return MS_OK;
fail:
    evalnet_trainer_free(t);
    return s;
}

static int all_finite(const float *x, size_t n) {
    for (size_t i = 0; i < n; i++) if (!(x[i] - x[i] == 0.0f)) return 0;
    return 1;
}

/* One step, read top to bottom:
 *   1. trunk on all N images -> text head rows 0..Bt-1 (u after L2), identity rows Bt.. (z)
 *   2. text tower on the Bt captions -> first-EOS state -> text_projection -> v after L2
 *   3. loss = CLIP(u, v; logit_scale) + SupCon(z; labels, tau)
 *   4. backward through the same calls; AdamW per table block; logit_scale clamped. */
MsStatus evalnet_train_step(EvalTrainer *t, const float *images, const char *const *captions, const int *labels,
                            EvalStepReport *rep) {
    EvalNet *e = t->e;
    const EvalNetConfig *c = &e->cfg;
    const int Bt = t->Bt, Bi = t->Bi, N = t->N, T = t->T, E = c->embed_dim, Ei = c->id_dim, D = c->text.hidden_size;
    const int64_t k = t->step + 1;
    const EvalTrainConfig *tc = &t->cfg;
    MsStatus s;
    memset(rep, 0, sizeof *rep);
    /* 1-2. forward */
    evalnet_image_forward(&t->ia, &e->p, images, c);
    l2norm_forward(t->u, t->unorm, t->ia.temb, Bt, E);
    if (Bi) l2norm_forward(t->z, t->znorm, t->ia.iemb + (size_t)Bt * Ei, Bi, Ei);
    for (int b = 0; b < Bt; b++)
        if ((s = clip_tokenize(t->tok, captions[b], strlen(captions[b]), t->ids + (size_t)b * T, T))) return s;
    if ((s = clip_text_forward(&t->ta, &e->tp, NULL, t->ids, NULL, 0, &c->text))) return s;
    evalnet_text_pool_forward(t->pooled, t->ta.out, t->ids, t->tok->eos_id, Bt, T, D);
    linear_forward(t->proj, t->pooled, e->p.text_projection_w, NULL, Bt, D, E);
    l2norm_forward(t->v, t->vnorm, t->proj, Bt, E);
    /* 3. losses */
    rep->clip = clip_loss_forward(t->u, t->v, e->p.logit_scale[0], Bt, E, &rep->clip_correct, t->work);
    rep->supcon = Bi ? supcon_loss_forward(t->z, labels, tc->tau, Bi, Ei, t->work) : 0.0;
    rep->loss = rep->clip + rep->supcon;
    if (!(rep->loss - rep->loss == 0.0))
        return ms_errorf(MS_ERR_FORMAT, "evalnet step %lld: the loss is not finite (%g)", (long long)k, rep->loss);
    /* 4. backward */
    memset(t->gnet.mem, 0, t->gnet.mem_bytes);
    memset(t->gtext.mem, 0, t->gtext.mem_bytes);
    memset(t->du, 0, (size_t)Bt * E * sizeof(float));
    memset(t->dv, 0, (size_t)Bt * E * sizeof(float));
    memset(t->dtemb, 0, (size_t)N * E * sizeof(float));
    memset(t->diemb, 0, (size_t)N * Ei * sizeof(float));
    clip_loss_backward(t->du, t->dv, t->dp.logit_scale, t->u, t->v, e->p.logit_scale[0], Bt, E, 1.0f, t->work);
    l2norm_backward(t->dtemb, t->du, t->u, t->unorm, Bt, E);
    if (Bi) {
        memset(t->dz, 0, (size_t)Bi * Ei * sizeof(float));
        supcon_loss_backward(t->dz, t->z, labels, tc->tau, Bi, Ei, 1.0f, t->work);
        l2norm_backward(t->diemb + (size_t)Bt * Ei, t->dz, t->z, t->znorm, Bi, Ei);
    }
    evalnet_image_backward(&t->dp, t->dtemb, Bi ? t->diemb : NULL, &t->ia, &e->p, images, c);
    memset(t->dproj, 0, (size_t)Bt * E * sizeof(float));
    memset(t->dpooled, 0, (size_t)Bt * D * sizeof(float));
    memset(t->dout, 0, (size_t)Bt * T * D * sizeof(float));
    l2norm_backward(t->dproj, t->dv, t->v, t->vnorm, Bt, E);
    linear_backward(t->dpooled, t->dp.text_projection_w, NULL, t->dproj, t->pooled, e->p.text_projection_w, Bt, D, E);
    evalnet_text_pool_backward(t->dout, t->dpooled, t->ids, t->tok->eos_id, Bt, T, D);
    if ((s = clip_text_backward_full(NULL, NULL, &t->dtp, t->dout, &t->ta, &e->tp, NULL, t->ids, 0, &c->text))) return s;
    if (!all_finite((const float *)t->gnet.mem, t->nn) || !all_finite((const float *)t->gtext.mem, t->nt))
        return ms_errorf(MS_ERR_FORMAT, "evalnet step %lld: a gradient is not finite (loss %g)", (long long)k, rep->loss);
    /* AdamW, one flat loop per table (the gaps between tensors are 0 and stay 0) */
    rep->lr = tc->warmup > 0 && k < tc->warmup ? tc->lr * (double)k / (double)tc->warmup : tc->lr;
    ms_adamw_step((float *)e->net.mem, (const float *)t->gnet.mem, t->mom_m, t->mom_v, t->nn, k, rep->lr, tc->weight_decay,
                  tc->beta1, tc->beta2, tc->adam_eps);
    ms_adamw_step((float *)e->text.mem, (const float *)t->gtext.mem, t->mom_m + t->nn, t->mom_v + t->nn, t->nt, k, rep->lr,
                  tc->weight_decay, tc->beta1, tc->beta2, tc->adam_eps);
    if (tc->token_max_norm > 0.0) evalnet_token_max_norm(e->tp.tok_emb->f32, c->text.vocab_size, c->text.hidden_size, tc->token_max_norm);
    if (e->p.logit_scale[0] < 0.0f) e->p.logit_scale[0] = 0.0f;
    if (e->p.logit_scale[0] > EVAL_MAX_LOGIT_SCALE) e->p.logit_scale[0] = EVAL_MAX_LOGIT_SCALE;
    rep->temperature = (float)exp(-(double)e->p.logit_scale[0]);
    t->step = k;
    return MS_OK;
}

int64_t evalnet_trainer_step_count(const EvalTrainer *t) { return t->step; }
void evalnet_trainer_set_step(EvalTrainer *t, int64_t step) { t->step = step; }
void evalnet_trainer_moments(EvalTrainer *t, float **m, float **v, size_t *n) {
    *m = t->mom_m; *v = t->mom_v; *n = t->nn + t->nt;
}
void evalnet_trainer_grads(EvalTrainer *t, MsParamTable **net, MsParamTable **text) {
    *net = &t->gnet; *text = &t->gtext;
}
