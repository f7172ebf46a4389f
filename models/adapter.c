/* models/adapter.c — T2I-Adapter, full_adapter (diffusers 0.19.3 models/adapter.py T2IAdapter /
 * FullAdapter / AdapterBlock / AdapterResnetBlock; TencentARC ldm/modules/encoders/adapter.py
 * Adapter), forward only.
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
    const int f = c->downscale_factor, R = c->num_res_blocks;
    int h = H / f, w = W / f;
    pixel_unshuffle_forward(t, cond, N, c->in_channels, H, W, f);
    conv2d_forward(features[0], t, WT(&ws, p->conv_in_w, 0), WT(&ws, p->conv_in_b, 1), N, c->in_channels * f * f,
                   c->channels[0], h, w, 3, 1, 1);
    for (int i = 0; i < c->n_channels; i++) {
        const int C = c->channels[i];
        float *x = features[i];                         /* (N, C, h, w), updated in place */
        if (i > 0) {
            const int Cp = c->channels[i - 1];
            avgpool2x2_forward(p->in_conv_w[i] ? t : x, features[i - 1], N, Cp, h, w);
            h /= 2; w /= 2;
            if (p->in_conv_w[i])
                conv2d_forward(x, t, WT(&ws, p->in_conv_w[i], 0), WT(&ws, p->in_conv_b[i], 1), N, Cp, C, h, w, 1, 1, 0);
        }
        const size_t nx = (size_t)N * C * h * w;
        for (int j = 0; j < R; j++) {                   /* AdapterResnetBlock: h = block2(relu(block1(x))); x + h */
            conv2d_forward(t, x, WT(&ws, p->block1_w[i][j], 0), WT(&ws, p->block1_b[i][j], 1), N, C, C, h, w, 3, 1, 1);
            relu_forward(t, t, nx);
            conv2d_forward(u, t, WT(&ws, p->block2_w[i][j], 0), WT(&ws, p->block2_b[i][j], 1), N, C, C, h, w, 1, 1, 0);
            add_forward(x, u, x, nx);
        }
    }
    arena_reset(scratch, mark);
    return MS_OK;
}
