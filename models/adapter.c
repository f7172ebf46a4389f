/* models/adapter.c — T2I-Adapter, full_adapter (diffusers 0.19.3 models/adapter.py T2IAdapter /
 * FullAdapter / AdapterBlock / AdapterResnetBlock; TencentARC ldm/modules/encoders/adapter.py
 * Adapter): forward, and the training forward + full-parameter backward (issue 15).
 *
 *   x = PixelUnshuffle(f)(cond)            (N, Cin*f*f, H/f, W/f), channel c*f*f + dy*f + dx
 *   x = conv_in(x)                         3x3 pad 1 -> channels[0]
 *   block i: [i > 0] x = AvgPool2d(2)(x)   (Downsample2D without conv)
 *            [channels change] x = in_conv(x)   1x1
 *            R times: x = x + conv1x1(relu(conv3x3(x)))
 *            feature i = x                 (N, channels[i], H/f/2^i, W/f/2^i)
 *
 * The condition is an image in [0, 1] (the pipeline resizes and scales it; see tools/).
 * adapter_conditioning_scale is NOT applied here: the caller multiplies each feature by its
 * global (and per-region) weight before adding it to the UNet's down-block outputs.
 */
#include "mixshow.h"

#include <stdio.h>
#include <string.h>

/* A weight as f32 right before its conv: the table's own data (f32), or F16/BF16 converted into
 * staging slot `slot` (0: the weight, 1: its bias) carved from the scratch arena; see ms_weight_f32. */
#define WT(ws, w, slot) ms_stage_f32((ws), (w), (slot))

static MsStatus get_wb(const MsParamTable *t, const char *pre, const char *name, const MsParam **w, const MsParam **b) {
    char k[MS_KEY_MAX];
    for (int wb = 0; wb < 2; wb++) {
        snprintf(k, sizeof k, "%s%s.%s", pre, name, wb ? "bias" : "weight");
        int i = ms_param_find(t, k);
        if (i < 0) return ms_errorf(MS_ERR_FORMAT, "t2iadapter: parameter %s missing from the table", k);
        if (!t->p[i].f32 && !t->p[i].half)
            return ms_errorf(MS_ERR_FORMAT, "t2iadapter: parameter %s holds no data (not loaded)", k);
        *(wb ? b : w) = &t->p[i];
    }
    return MS_OK;
}

static MsStatus adapter_check_config(const AdapterConfig *c) {
    MsStatus s;
    if ((s = ms_adapter_config_check(c))) return s;
    if (c->num_res_blocks > MS_ADAPTER_MAX_RES)
        return ms_errorf(MS_ERR_UNSUPPORTED, "t2iadapter config: num_res_blocks = %d, at most %d supported",
                         c->num_res_blocks, MS_ADAPTER_MAX_RES);
    return MS_OK;
}

MsStatus adapter_params_init(AdapterParams *p, const AdapterConfig *c, const MsParamTable *t) {
    MsStatus s;
    char pre[MS_KEY_MAX];
    memset(p, 0, sizeof *p);
    if ((s = adapter_check_config(c))) return s;
    p->cfg = *c;
    if ((s = get_wb(t, "adapter.", "conv_in", &p->conv_in_w, &p->conv_in_b))) goto fail;
    for (int i = 0; i < c->n_channels; i++) {
        snprintf(pre, sizeof pre, "adapter.body.%d.", i);
        if (i > 0 && c->channels[i - 1] != c->channels[i] &&
            (s = get_wb(t, pre, "in_conv", &p->in_conv_w[i], &p->in_conv_b[i]))) goto fail;
        for (int j = 0; j < c->num_res_blocks; j++) {
            snprintf(pre, sizeof pre, "adapter.body.%d.resnets.%d.", i, j);
            if ((s = get_wb(t, pre, "block1", &p->block1_w[i][j], &p->block1_b[i][j]))) goto fail;
            if ((s = get_wb(t, pre, "block2", &p->block2_w[i][j], &p->block2_b[i][j]))) goto fail;
        }
    }
    return MS_OK;
fail:
    memset(p, 0, sizeof *p);
    return s;
}

/* Condition sides must be multiples of f * 2^(n-1) (64 for SD) so every AvgPool sees even sides. */
static MsStatus adapter_check_size(const AdapterConfig *c, int N, int H, int W, const char *what) {
    const int m = c->downscale_factor << (c->n_channels - 1);
    if (N < 1 || H <= 0 || W <= 0 || H % m || W % m || H > 32768 || W > 32768)
        return ms_errorf(MS_ERR_SHAPE, "%s: condition %d x %d x %d: batch >= 1 and sides positive multiples "
                         "of %d (downscale_factor * 2^(levels-1)), at most 32768", what, N, H, W, m);
    return MS_OK;
}

/* 16-bit weight staging (see ms_weight_f32), planned whatever the dtype: the largest weight is
 * (C,C,3,3) for the widest block or conv_in (C0, Cin*f*f, 3, 3); vectors are biases (<= C). */
static void adapter_stage(const AdapterConfig *c, size_t *mat, size_t *vec) {
    size_t C = 0;
    for (int i = 0; i < c->n_channels; i++) if ((size_t)c->channels[i] > C) C = (size_t)c->channels[i];
    size_t in = (size_t)c->channels[0] * c->in_channels * c->downscale_factor * c->downscale_factor * 9;
    *mat = ((C * C * 9 > in ? C * C * 9 : in) + 15) & ~(size_t)15;
    *vec = (C + 15) & ~(size_t)15;
}

MsStatus adapter_sizes(const AdapterConfig *c, int N, int H, int W, size_t *scratch_bytes,
                       size_t feature_floats[MS_MAX_BLOCKS]) {
    MsStatus s;
    size_t mat, vec;
    if ((s = adapter_check_config(c)) || (s = adapter_check_size(c, N, H, W, "adapter_sizes"))) return s;
    adapter_stage(c, &mat, &vec);
    const int f = c->downscale_factor;
    size_t P = (size_t)(H / f) * (W / f), t = (size_t)c->in_channels * f * f * P;
    for (int i = 0; i < c->n_channels; i++) {
        if (i > 0) P /= 4;
        if ((size_t)c->channels[i] * P > t) t = (size_t)c->channels[i] * P;
        if (i > 0 && (size_t)c->channels[i - 1] * P > t) t = (size_t)c->channels[i - 1] * P;
        if (feature_floats) feature_floats[i] = (size_t)N * c->channels[i] * P;
    }
    if (scratch_bytes) *scratch_bytes = 2 * ((size_t)N * t * sizeof(float) + 128) + (mat + vec) * sizeof(float) + 128;
    return MS_OK;
}

/* The forward over the buffers of a tape. Training gives every activation its own buffer;
 * inference (adapter_forward) aliases them: x0, pool and r share one scratch buffer and every
 * x[i][j] is features[i], updated in place. Either way the same ops run on the same values. */
static void adapter_run(const AdapterParams *p, const MsWeightStage *ws, const AdapterTape *t, const float *cond) {
    const AdapterConfig *c = &p->cfg;
    const int f = c->downscale_factor, R = c->num_res_blocks, N = t->N;
    int h = t->H / f, w = t->W / f;
    pixel_unshuffle_forward(t->x0, cond, N, c->in_channels, t->H, t->W, f);
    conv2d_forward(t->x[0][0], t->x0, WT(ws, p->conv_in_w, 0), WT(ws, p->conv_in_b, 1), N, c->in_channels * f * f,
                   c->channels[0], h, w, 3, 1, 1);
    for (int i = 0; i < c->n_channels; i++) {
        const int C = c->channels[i];
        if (i > 0) {                                    /* Downsample2D without conv: AvgPool2d(2) */
            const int Cp = c->channels[i - 1];
            avgpool2x2_forward(p->in_conv_w[i] ? t->pool[i] : t->x[i][0], t->x[i - 1][R], N, Cp, h, w);
            h /= 2; w /= 2;
            if (p->in_conv_w[i])
                conv2d_forward(t->x[i][0], t->pool[i], WT(ws, p->in_conv_w[i], 0), WT(ws, p->in_conv_b[i], 1), N, Cp, C,
                               h, w, 1, 1, 0);
        }
        const size_t nx = (size_t)N * C * h * w;
        for (int j = 0; j < R; j++) {                   /* AdapterResnetBlock: x + block2(relu(block1(x))) */
            conv2d_forward(t->r[i][j], t->x[i][j], WT(ws, p->block1_w[i][j], 0), WT(ws, p->block1_b[i][j], 1), N, C, C,
                           h, w, 3, 1, 1);
            relu_forward(t->r[i][j], t->r[i][j], nx);
            conv2d_forward(t->u, t->r[i][j], WT(ws, p->block2_w[i][j], 0), WT(ws, p->block2_b[i][j], 1), N, C, C, h, w,
                           1, 1, 0);
            add_forward(t->x[i][j + 1], t->u, t->x[i][j], nx);
        }
    }
}

MsStatus adapter_forward(const AdapterParams *p, Arena *scratch, float *const *features, const float *cond,
                         int N, int H, int W) {
    const AdapterConfig *c = &p->cfg;
    MsStatus s;
    size_t bytes, mat, vec;
    if ((s = adapter_sizes(c, N, H, W, &bytes, NULL))) return s;
    adapter_stage(c, &mat, &vec);
    const size_t mark = arena_mark(scratch), n = ((bytes - (mat + vec) * sizeof(float) - 128) / 2 - 128) / sizeof(float);
    float *t = arena_floats(scratch, n), *u = arena_floats(scratch, n);
    MsWeightStage ws = { NULL, { NULL, NULL }, NULL, 0 };   /* weights as f32 right before each conv */
    ws.mat = arena_floats(scratch, mat + vec);
    if (!t || !u || !ws.mat) {
        arena_reset(scratch, mark);
        return ms_errorf(MS_ERR_NOMEM, "adapter_forward: scratch arena too small (%zu bytes needed)", bytes);
    }
    ws.vec[0] = ws.mat + mat;
    AdapterTape a;                                      /* the aliased buffers (see adapter_run) */
    memset(&a, 0, sizeof a);
    a.N = N; a.H = H; a.W = W; a.x0 = t; a.u = u;
    for (int i = 0; i < c->n_channels; i++) {
        a.pool[i] = t;
        for (int j = 0; j <= c->num_res_blocks; j++) a.x[i][j] = features[i];
        for (int j = 0; j < c->num_res_blocks; j++) a.r[i][j] = t;
    }
    adapter_run(p, &ws, &a, cond);
    arena_reset(scratch, mark);
    return MS_OK;
}

/* ---------------------------------------------------------------------------------------- */
/* Training (issue 15): the forward on a tape, full-parameter backward                       */
/* ---------------------------------------------------------------------------------------- */
/* Carves the tape's buffers from ar (NULL: only counts *bytes, the planned size). */
static MsStatus adapter_tape_carve(AdapterTape *t, Arena *ar, const AdapterConfig *c, int N, int H, int W,
                                   size_t *bytes) {
    const int f = c->downscale_factor, R = c->num_res_blocks;
    size_t P = (size_t)(H / f) * (W / f), big = (size_t)N * c->in_channels * f * f * P, feat = 0;
    for (int i = 0; i < c->n_channels; i++) {           /* the largest activation (gradient buffers) */
        const size_t n = (size_t)N * c->channels[i] * (P >> 2 * i);
        big = n > big ? n : big;
        feat = n > feat ? n : feat;
    }
    int ok = 1;
    *bytes = 64;                                        /* the arena's first alignment */
#define CARVE(dst, n) do { size_t n_ = (n); *bytes += (n_ * sizeof(float) + 63) & ~(size_t)63; \
                           if (ar) { (dst) = arena_floats(ar, n_); ok = ok && (dst) != NULL; } } while (0)
    CARVE(t->x0, (size_t)N * c->in_channels * f * f * P);
    for (int i = 0; i < c->n_channels; i++) {
        const size_t Pi = P >> 2 * i, n = (size_t)N * c->channels[i] * Pi;
        if (i > 0 && c->channels[i - 1] != c->channels[i]) CARVE(t->pool[i], (size_t)N * c->channels[i - 1] * Pi);
        for (int j = 0; j <= R; j++) CARVE(t->x[i][j], n);
        for (int j = 0; j < R; j++) CARVE(t->r[i][j], n);
    }
    CARVE(t->u, feat);
    for (int k = 0; k < 3; k++) CARVE(t->g[k], big);
#undef CARVE
    if (!ok) return ms_errorf(MS_ERR_NOMEM, "adapter training: arena too small (%zu bytes planned, %zu free)", *bytes,
                              ar->cap - ar->used);
    return MS_OK;
}

MsStatus adapter_train_sizes(const AdapterConfig *c, int N, int H, int W, size_t *bytes) {
    MsStatus s;
    AdapterTape t;
    *bytes = 0;
    if ((s = adapter_check_config(c)) || (s = adapter_check_size(c, N, H, W, "adapter_train_sizes"))) return s;
    return adapter_tape_carve(&t, NULL, c, N, H, W, bytes);
}

/* Every parameter of p is an f32 buffer (what: "weights" or "gradients", for the message). */
static MsStatus adapter_check_f32(const AdapterParams *p, const char *fn, const char *what) {
    const AdapterConfig *c = &p->cfg;
    const MsParam *q[2 + 2 * MS_MAX_BLOCKS * (1 + 2 * MS_ADAPTER_MAX_RES)];
    int n = 0;
    q[n++] = p->conv_in_w; q[n++] = p->conv_in_b;
    for (int i = 0; i < c->n_channels; i++) {
        if (p->in_conv_w[i]) { q[n++] = p->in_conv_w[i]; q[n++] = p->in_conv_b[i]; }
        for (int j = 0; j < c->num_res_blocks; j++) {
            q[n++] = p->block1_w[i][j]; q[n++] = p->block1_b[i][j];
            q[n++] = p->block2_w[i][j]; q[n++] = p->block2_b[i][j];
        }
    }
    for (int k = 0; k < n; k++)
        if (!q[k] || !q[k]->f32)
            return ms_errorf(MS_ERR_UNSUPPORTED, "%s: %s %s is not f32 (full-parameter training needs f32 %s; load the "
                             "table as f32)", fn, what, q[k] ? q[k]->name : "(missing)", what);
    return MS_OK;
}

MsStatus adapter_forward_train(AdapterTape *t, Arena *ar, const AdapterParams *p, const float *cond, int N, int H, int W) {
    MsStatus s;
    size_t bytes;
    memset(t, 0, sizeof *t);
    if (!ar || !p) return ms_errorf(MS_ERR_ARG, "adapter_forward_train: no arena or parameters");
    if ((s = adapter_check_config(&p->cfg)) || (s = adapter_check_size(&p->cfg, N, H, W, "adapter_forward_train")) ||
        (s = adapter_check_f32(p, "adapter_forward_train", "weights")))
        return s;
    if ((s = adapter_tape_carve(t, ar, &p->cfg, N, H, W, &bytes))) { memset(t, 0, sizeof *t); return s; }
    t->cfg = p->cfg; t->N = N; t->H = H; t->W = W;
    const MsWeightStage none = { NULL, { NULL, NULL }, NULL, 0 };   /* f32 weights: no staging */
    adapter_run(p, &none, t, cond);
    t->p = p;
    return MS_OK;
}

/* The forward's ops in reverse. With g the gradient of x[i][j+1] = x[i][j] + block2(relu(block1(x[i][j]))):
 *   dW2 += g r^T, db2 += sum g, dr = W2^T g       (1x1 conv; r = relu(block1(x)), the tape's)
 *   da = dr * [r > 0]                             (relu' from its output: r > 0 iff its input > 0)
 *   dW1 += da (*) x, db1 += sum da, dx[i][j] = g + conv1^T(da)        (the skip passes g on)
 * dfeat[i] joins g at x[i][R]; in_conv (1x1) and AvgPool2d(2) (each input gets 1/4 of its output's
 * gradient) carry it to level i-1; conv_in and PixelUnshuffle (a permutation) to the condition. */
MsStatus adapter_backward_full(AdapterTape *t, const AdapterParams *dp, float *dcond, const float *const *dfeat) {
    MsStatus s;
    if (!t->p) return ms_errorf(MS_ERR_ARG, "adapter_backward_full: no complete forward pass on this tape");
    if (!dp) return ms_errorf(MS_ERR_ARG, "adapter_backward_full: no gradient parameters");
    if (memcmp(&dp->cfg, &t->cfg, sizeof t->cfg))
        return ms_errorf(MS_ERR_ARG, "adapter_backward_full: the gradients belong to a different config");
    if ((s = adapter_check_f32(dp, "adapter_backward_full", "gradients"))) return s;
    const AdapterParams *p = t->p;
    const AdapterConfig *c = &t->cfg;
    const int f = c->downscale_factor, R = c->num_res_blocks, N = t->N, n = c->n_channels;
    int h = t->H / f >> (n - 1), w = t->W / f >> (n - 1);
    float *g = t->g[0], *dr = t->g[1], *da = t->g[2];
    memset(g, 0, (size_t)N * c->channels[n - 1] * h * w * sizeof(float));
    for (int i = n - 1; i >= 0; i--) {
        const int C = c->channels[i];
        const size_t nx = (size_t)N * C * h * w;
        if (dfeat && dfeat[i]) add_forward(g, g, dfeat[i], nx);
        for (int j = R - 1; j >= 0; j--) {
            memset(dr, 0, nx * sizeof(float));
            conv2d_backward(dr, dp->block2_w[i][j]->f32, dp->block2_b[i][j]->f32, g, t->r[i][j], p->block2_w[i][j]->f32,
                            N, C, C, h, w, 1, 1, 0, 0, 0, 0);
            memset(da, 0, nx * sizeof(float));
            relu_backward(da, dr, t->r[i][j], nx);
            conv2d_backward(g, dp->block1_w[i][j]->f32, dp->block1_b[i][j]->f32, da, t->x[i][j], p->block1_w[i][j]->f32,
                            N, C, C, h, w, 3, 1, 1, 1, 1, 1);
        }
        if (i > 0) {                                    /* g: dL/dx[i][0] -> dL/dx[i-1][R] */
            const int Cp = c->channels[i - 1];
            const float *dpool = g;
            if (p->in_conv_w[i]) {
                memset(dr, 0, (size_t)N * Cp * h * w * sizeof(float));
                conv2d_backward(dr, dp->in_conv_w[i]->f32, dp->in_conv_b[i]->f32, g, t->pool[i], p->in_conv_w[i]->f32,
                                N, Cp, C, h, w, 1, 1, 0, 0, 0, 0);
                dpool = dr;
            }
            h *= 2; w *= 2;
            memset(da, 0, (size_t)N * Cp * h * w * sizeof(float));
            avgpool2x2_backward(da, dpool, N, Cp, h, w);
            float *tmp = g; g = da; da = tmp;
        } else {                                        /* conv_in, PixelUnshuffle */
            const int Ci = c->in_channels * f * f;
            if (dcond) memset(dr, 0, (size_t)N * Ci * h * w * sizeof(float));
            conv2d_backward(dcond ? dr : NULL, dp->conv_in_w->f32, dp->conv_in_b->f32, g, t->x0,
                            dcond ? p->conv_in_w->f32 : NULL, N, Ci, c->channels[0], h, w, 3, 1, 1, 1, 1, 1);
            if (dcond) pixel_unshuffle_backward(dcond, dr, N, c->in_channels, t->H, t->W, f);
        }
    }
    return MS_OK;
}
