/* models/vae.c — AutoencoderKL (diffusers 0.19.3 models/autoencoder_kl.py, vae.py Encoder /
 * Decoder / DiagonalGaussianDistribution, unet_2d_blocks.py DownEncoderBlock2D /
 * UpDecoderBlock2D / UNetMidBlock2D, resnet.py ResnetBlock2D / Downsample2D / Upsample2D,
 * attention_processor.py Attention + AttnProcessor), forward only, inference mode.
 *
 * Facts copied from the reference: every GroupNorm has eps 1e-6; resnets have no time
 * embedding and output_scale_factor 1; the encoder's Downsample2D pads (0,1,0,1) and runs a
 * stride-2 3x3 conv without padding; the mid attention has ONE head of dim C, a GroupNorm in
 * front, the residual added, rescale_output_factor 1; logvar is clamped to [-30, 20];
 * latents = sample * scaling_factor and decode() gets latents / scaling_factor; the decoded
 * image is not clamped.
 *
 * Memory. Samples of a batch go through the network one at a time (nothing mixes them), and
 * one image needs three activation buffers (roles A = the running activation, T, H) plus small
 * ones for the mid attention and for banded upsampling. Buffers are planned by running the
 * same code with plan = 1 (no arithmetic, only sizes recorded per physical buffer), so the plan
 * can never disagree with what runs. Tricks that keep the peak low:
 *   - GroupNorm runs in place (groupnorm_forward reads each element before it writes it);
 *   - a resnet whose channels change computes its shortcut first, then normalises its input
 *     in place, and writes conv2 into the input's buffer: peak (Cin + 2 Cout) * H * W floats;
 *   - Upsample2D (nearest x2, then 3x3 conv) works in bands of VAE_BAND output rows, so the
 *     upsampled (C, 2H, 2W) image never exists whole.
 * An SD 1.5 decode of a 64x64 latent then peaks at 512 MiB of activations (256 channels at
 * 512x512 in A while the 128-channel shortcut and conv1 outputs live; see vae_sizes()).
 *
 * Tiled encode/decode reproduce AutoencoderKL.tiled_encode/tiled_decode exactly (tile order,
 * in-place blending against already blended neighbours, edge tiles, crops); see below.
 */
#include "mixshow.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#if defined(__clang__)
#pragma STDC FP_CONTRACT OFF   /* the tile blend must round each product like torch */
#endif

#define VAE_EPS 1e-6f
#define VAE_BAND 32          /* output rows per band of the decoder's Upsample2D (even) */

/* Physical scratch buffers. Roles A, T, H move between 0..2 (swap_roles). */
enum { VB_0, VB_1, VB_2, VB_K, VB_V, VB_BIN, VB_BOUT, VAE_NBUF };
enum { RA, RT, RH };

typedef struct {
    int plan;                       /* 1: record sizes only, touch no data */
    float *buf[VAE_NBUF];           /* physical buffers (NULL while planning) */
    size_t need[VAE_NBUF];          /* floats each physical buffer needs */
    int role[3];                    /* role -> physical buffer */
    size_t stage_mat, stage_vec;    /* floats of the 16-bit weight staging (planned from the config) */
    MsWeightStage ws;               /* carved with the buffers; unused by f32 tables */
} VaeRun;

/* A weight as f32 right before its op: the table's own data (f32), or F16/BF16 converted into
 * staging slot `slot` (0: the op's matrix, 1: its bias or a norm weight, 2: a norm bias); see
 * ms_weight_f32. The staging is planned always (SD 1.5: one 512x512x3x3 conv, 9.4 MB), so the
 * same arena serves f32 and 16-bit tables. */
#define WT(r, w, slot) ms_stage_f32(&(r)->ws, (w), (slot))

static size_t zmax(size_t a, size_t b) { return a > b ? a : b; }

static float *use_buf(VaeRun *r, int phys, size_t n) {
    if (n > r->need[phys]) r->need[phys] = n;
    return r->buf[phys];
}
static float *use_role(VaeRun *r, int role, size_t n) { return use_buf(r, r->role[role], n); }
static void swap_roles(VaeRun *r, int a, int b) { int t = r->role[a]; r->role[a] = r->role[b]; r->role[b] = t; }

/* ---------------------------------------------------------------------------------------- */
/* Parameters                                                                                */
/* ---------------------------------------------------------------------------------------- */
static MsStatus get_f32(const MsParamTable *t, const char *key, const MsParam **out) {
    int i = ms_param_find(t, key);
    if (i < 0) return ms_errorf(MS_ERR_FORMAT, "vae: parameter %s missing from the table", key);
    if (!t->p[i].f32 && !t->p[i].half)
        return ms_errorf(MS_ERR_FORMAT, "vae: parameter %s holds no data (not loaded)", key);
    *out = &t->p[i];
    return MS_OK;
}

static MsStatus get_wb(const MsParamTable *t, const char *prefix, const char *name, const MsParam **w, const MsParam **b) {
    char k[MS_KEY_MAX];
    MsStatus s;
    snprintf(k, sizeof k, "%s%s.weight", prefix, name);
    if ((s = get_f32(t, k, w))) return s;
    snprintf(k, sizeof k, "%s%s.bias", prefix, name);
    return get_f32(t, k, b);
}

static MsStatus get_resnet(const MsParamTable *t, const char *pre, int cin, int cout, VaeResnetParams *p) {
    MsStatus s;
    memset(p, 0, sizeof *p);
    if ((s = get_wb(t, pre, "norm1", &p->norm1_w, &p->norm1_b))) return s;
    if ((s = get_wb(t, pre, "conv1", &p->conv1_w, &p->conv1_b))) return s;
    if ((s = get_wb(t, pre, "norm2", &p->norm2_w, &p->norm2_b))) return s;
    if ((s = get_wb(t, pre, "conv2", &p->conv2_w, &p->conv2_b))) return s;
    if (cin != cout && (s = get_wb(t, pre, "conv_shortcut", &p->short_w, &p->short_b))) return s;
    return MS_OK;
}

static MsStatus get_mid(const MsParamTable *t, const char *part, int C, VaeResnetParams res[2], VaeAttnParams *a) {
    char pre[MS_KEY_MAX];
    MsStatus s;
    snprintf(pre, sizeof pre, "%s.mid_block.attentions.0.", part);
    if ((s = get_wb(t, pre, "group_norm", &a->norm_w, &a->norm_b))) return s;
    if ((s = get_wb(t, pre, "to_q", &a->q_w, &a->q_b))) return s;
    if ((s = get_wb(t, pre, "to_k", &a->k_w, &a->k_b))) return s;
    if ((s = get_wb(t, pre, "to_v", &a->v_w, &a->v_b))) return s;
    if ((s = get_wb(t, pre, "to_out.0", &a->o_w, &a->o_b))) return s;
    for (int j = 0; j < 2; j++) {
        snprintf(pre, sizeof pre, "%s.mid_block.resnets.%d.", part, j);
        if ((s = get_resnet(t, pre, C, C, &res[j]))) return s;
    }
    return MS_OK;
}

static MsStatus vae_check_config(const VaeConfig *c) {
    MsStatus s;
    if ((s = ms_vae_config_check(c))) return s;
    if (c->layers_per_block > MS_VAE_MAX_LAYERS)
        return ms_errorf(MS_ERR_UNSUPPORTED, "vae config: layers_per_block = %d, at most %d supported",
                         c->layers_per_block, MS_VAE_MAX_LAYERS);
    return MS_OK;
}

MsStatus vae_params_init(VaeParams *p, const VaeConfig *c, const MsParamTable *t) {
    MsStatus s;
    char pre[MS_KEY_MAX];
    memset(p, 0, sizeof *p);
    if ((s = vae_check_config(c))) return s;
    p->cfg = *c;
    const int n = c->n_blocks, L = c->layers_per_block, *ch = c->block_out_channels;
    if ((s = get_wb(t, "encoder.", "conv_in", &p->enc_conv_in_w, &p->enc_conv_in_b))) goto fail;
    for (int i = 0, cin = ch[0]; i < n; cin = ch[i], i++) {
        for (int j = 0; j < L; j++) {
            snprintf(pre, sizeof pre, "encoder.down_blocks.%d.resnets.%d.", i, j);
            if ((s = get_resnet(t, pre, j ? ch[i] : cin, ch[i], &p->enc_res[i][j]))) goto fail;
        }
        snprintf(pre, sizeof pre, "encoder.down_blocks.%d.downsamplers.0.", i);
        if (i < n - 1 && (s = get_wb(t, pre, "conv", &p->enc_down_w[i], &p->enc_down_b[i]))) goto fail;
    }
    if ((s = get_mid(t, "encoder", ch[n - 1], p->enc_mid_res, &p->enc_mid_attn))) goto fail;
    if ((s = get_wb(t, "encoder.", "conv_norm_out", &p->enc_norm_out_w, &p->enc_norm_out_b))) goto fail;
    if ((s = get_wb(t, "encoder.", "conv_out", &p->enc_conv_out_w, &p->enc_conv_out_b))) goto fail;
    if ((s = get_wb(t, "", "quant_conv", &p->quant_w, &p->quant_b))) goto fail;
    if ((s = get_wb(t, "", "post_quant_conv", &p->post_quant_w, &p->post_quant_b))) goto fail;
    if ((s = get_wb(t, "decoder.", "conv_in", &p->dec_conv_in_w, &p->dec_conv_in_b))) goto fail;
    if ((s = get_mid(t, "decoder", ch[n - 1], p->dec_mid_res, &p->dec_mid_attn))) goto fail;
    for (int i = 0, prev = ch[n - 1]; i < n; prev = ch[n - 1 - i], i++) {
        int cout = ch[n - 1 - i];
        for (int j = 0; j <= L; j++) {
            snprintf(pre, sizeof pre, "decoder.up_blocks.%d.resnets.%d.", i, j);
            if ((s = get_resnet(t, pre, j ? cout : prev, cout, &p->dec_res[i][j]))) goto fail;
        }
        snprintf(pre, sizeof pre, "decoder.up_blocks.%d.upsamplers.0.", i);
        if (i < n - 1 && (s = get_wb(t, pre, "conv", &p->dec_up_w[i], &p->dec_up_b[i]))) goto fail;
    }
    if ((s = get_wb(t, "decoder.", "conv_norm_out", &p->dec_norm_out_w, &p->dec_norm_out_b))) goto fail;
    if ((s = get_wb(t, "decoder.", "conv_out", &p->dec_conv_out_w, &p->dec_conv_out_b))) goto fail;
    return MS_OK;
fail:
    memset(p, 0, sizeof *p);
    return s;
}

/* ---------------------------------------------------------------------------------------- */
/* Blocks. x lives in role A; each block leaves its output in role A.                        */
/* ---------------------------------------------------------------------------------------- */
/* ResnetBlock2D (resnet.py), no time embedding, output_scale_factor 1. x (Ci,H,W) -> (Co,H,W):
 *   h = conv1(silu(norm1(x)));  h = conv2(silu(norm2(h)));  out = shortcut(x) + h
 * shortcut = identity when Ci == Co, else the 1x1 conv_shortcut. */
static void vae_resnet(VaeRun *r, const VaeResnetParams *p, int Ci, int Co, int G, int H, int W) {
    const size_t P = (size_t)H * W;
    if (Ci == Co) {
        float *x = use_role(r, RA, (size_t)Ci * P), *t = use_role(r, RT, (size_t)Ci * P);
        float *h = use_role(r, RH, (size_t)Co * P);
        if (r->plan) return;
        groupnorm_forward(t, NULL, NULL, x, WT(r, p->norm1_w, 1), WT(r, p->norm1_b, 2), 1, Ci, (int)P, G, VAE_EPS);
        silu_forward(t, t, (size_t)Ci * P);
        conv2d_forward(h, t, WT(r, p->conv1_w, 0), WT(r, p->conv1_b, 1), 1, Ci, Co, H, W, 3, 1, 1);
        groupnorm_forward(h, NULL, NULL, h, WT(r, p->norm2_w, 1), WT(r, p->norm2_b, 2), 1, Co, (int)P, G,
                          VAE_EPS);                                                      /* in place */
        silu_forward(h, h, (size_t)Co * P);
        conv2d_forward(t, h, WT(r, p->conv2_w, 0), WT(r, p->conv2_b, 1), 1, Co, Co, H, W, 3, 1, 1);
        add_forward(x, x, t, (size_t)Co * P);
        return;
    }
    /* channels change: shortcut -> T first; then x is only needed normalised (in place), and
     * after conv1 its buffer takes conv2's output; the sum lands in T, which becomes A. */
    float *x = use_role(r, RA, zmax((size_t)Ci, (size_t)Co) * P), *s = use_role(r, RT, (size_t)Co * P);
    float *h = use_role(r, RH, (size_t)Co * P);
    if (!r->plan) {
        conv2d_forward(s, x, WT(r, p->short_w, 0), WT(r, p->short_b, 1), 1, Ci, Co, H, W, 1, 1, 0);
        groupnorm_forward(x, NULL, NULL, x, WT(r, p->norm1_w, 1), WT(r, p->norm1_b, 2), 1, Ci, (int)P, G, VAE_EPS);
        silu_forward(x, x, (size_t)Ci * P);
        conv2d_forward(h, x, WT(r, p->conv1_w, 0), WT(r, p->conv1_b, 1), 1, Ci, Co, H, W, 3, 1, 1);
        groupnorm_forward(h, NULL, NULL, h, WT(r, p->norm2_w, 1), WT(r, p->norm2_b, 2), 1, Co, (int)P, G, VAE_EPS);
        silu_forward(h, h, (size_t)Co * P);
        conv2d_forward(x, h, WT(r, p->conv2_w, 0), WT(r, p->conv2_b, 1), 1, Co, Co, H, W, 3, 1, 1);
        add_forward(s, s, x, (size_t)Co * P);
    }
    swap_roles(r, RA, RT);
}

/* out (T,C) = x^T W^T + b for x (C,T) channel-major: a Linear on the tokens of a feature map. */
static void tokens_linear(float *out, const float *x, const float *w, const float *b, int C, int T) {
    for (int t = 0; t < T; t++) memcpy(out + (size_t)t * C, b, (size_t)C * sizeof(float));
    ms_gemm(1, 1, T, C, C, 1.0f, x, T, w, C, 1.0f, out, C);
}

/* Attention (attention_processor.py, AttnProcessor) as UNetMidBlock2D builds it for the VAE:
 * heads 1, dim_head C, GroupNorm(G, eps 1e-6) first, residual, rescale_output_factor 1.
 *   t = norm(x) as tokens (T = H*W, C);  q, k, v = t Wq^T + bq, t Wk^T + bk, t Wv^T + bv
 *   o = softmax(q k^T * C^-0.5) v;       x += (o Wo^T + bo)^T                       */
static void vae_attention(VaeRun *r, const VaeAttnParams *p, int C, int G, int H, int W) {
    const int T = H * W;
    const size_t n = (size_t)C * T;
    float *x = use_role(r, RA, n), *t = use_role(r, RT, n), *q = use_role(r, RH, n);
    float *k = use_buf(r, VB_K, n), *v = use_buf(r, VB_V, n);
    if (r->plan) return;
    groupnorm_forward(t, NULL, NULL, x, WT(r, p->norm_w, 1), WT(r, p->norm_b, 2), 1, C, T, G, VAE_EPS);
    tokens_linear(q, t, WT(r, p->q_w, 0), WT(r, p->q_b, 1), C, T);
    tokens_linear(k, t, WT(r, p->k_w, 0), WT(r, p->k_b, 1), C, T);
    tokens_linear(v, t, WT(r, p->v_w, 0), WT(r, p->v_b, 1), C, T);
    attention_forward(t, NULL, q, k, v, 1, T, T, 1, C, 0, (float)pow((double)C, -0.5));   /* o (T,C) */
    const float *ob = WT(r, p->o_b, 1);
    for (int c = 0; c < C; c++)                                       /* q <- (C,T) = Wo o^T + bo */
        for (int i = 0; i < T; i++) q[(size_t)c * T + i] = ob[c];
    ms_gemm(0, 1, C, T, C, 1.0f, WT(r, p->o_w, 0), C, t, C, 1.0f, q, T);
    add_forward(x, q, x, n);                                          /* hidden + residual */
}

/* UNetMidBlock2D: resnet, attention, resnet (C channels throughout). */
static void vae_mid(VaeRun *r, const VaeResnetParams res[2], const VaeAttnParams *a, int C, int G, int H, int W) {
    vae_resnet(r, &res[0], C, C, G, H, W);
    vae_attention(r, a, C, G, H, W);
    vae_resnet(r, &res[1], C, C, G, H, W);
}

/* Upsample2D: F.interpolate(scale_factor=2, mode="nearest"), then conv 3x3 pad 1. A (C,H,W) ->
 * A (C,2H,2W). Output rows [r0, r1) need upsampled rows r0-1 .. r1 (inside the image), which are
 * input rows (r0-1)/2 .. r1/2 repeated: they are built in BIN, convolved with padding only at
 * the image's top/bottom edges, and copied from BOUT into place. */
static void vae_upsample(VaeRun *r, const float *w, const float *b, int C, int H, int W) {
    const int H2 = 2 * H, W2 = 2 * W, R = H2 < VAE_BAND ? H2 : VAE_BAND;
    float *x = use_role(r, RA, (size_t)C * H * W), *out = use_role(r, RT, (size_t)C * H2 * W2);
    float *bin = use_buf(r, VB_BIN, (size_t)C * (R + 2) * W2), *bout = use_buf(r, VB_BOUT, (size_t)C * R * W2);
    if (!r->plan) {
        for (int r0 = 0; r0 < H2; r0 += R) {
            int r1 = r0 + R < H2 ? r0 + R : H2;
            int u0 = r0 > 0 ? r0 - 1 : 0, u1 = r1 < H2 ? r1 + 1 : H2, rows = u1 - u0;
            for (int c = 0; c < C; c++)
                for (int u = u0; u < u1; u++) {
                    const float *src = x + ((size_t)c * H + u / 2) * W;
                    float *dst = bin + ((size_t)c * rows + (u - u0)) * W2;
                    for (int j = 0; j < W; j++) dst[2 * j] = dst[2 * j + 1] = src[j];
                }
            conv2d_forward_pad(bout, bin, w, b, 1, C, C, rows, W2, 3, 1, r0 == 0, 1, r1 == H2, 1);
            for (int c = 0; c < C; c++)
                memcpy(out + ((size_t)c * H2 + r0) * W2, bout + (size_t)c * (r1 - r0) * W2,
                       (size_t)(r1 - r0) * W2 * sizeof(float));
        }
    }
    swap_roles(r, RA, RT);
}

/* Encoder (vae.py) + quant_conv: img (Cin,H,W) -> moments (2*lat, H/f, W/f). */
static void vae_encoder(VaeRun *r, const VaeConfig *c, const VaeParams *p, float *moments, const float *img,
                        int H, int W) {
    const int n = c->n_blocks, L = c->layers_per_block, G = c->norm_num_groups, lat = c->latent_channels;
    const int *ch = c->block_out_channels;
    float *a = use_role(r, RA, (size_t)ch[0] * H * W);
    if (!r->plan)
        conv2d_forward(a, img, WT(r, p->enc_conv_in_w, 0), WT(r, p->enc_conv_in_b, 1), 1, c->in_channels, ch[0], H, W,
                       3, 1, 1);
    for (int i = 0, cin = ch[0]; i < n; cin = ch[i], i++) {
        for (int j = 0; j < L; j++) vae_resnet(r, &p->enc_res[i][j], j ? ch[i] : cin, ch[i], G, H, W);
        if (i < n - 1) {   /* Downsample2D: F.pad(x, (0,1,0,1)), conv 3x3 stride 2, no padding */
            float *x = use_role(r, RA, (size_t)ch[i] * H * W), *o = use_role(r, RT, (size_t)ch[i] * (H / 2) * (W / 2));
            if (!r->plan)
                conv2d_forward_pad(o, x, WT(r, p->enc_down_w[i], 0), WT(r, p->enc_down_b[i], 1), 1, ch[i], ch[i], H, W,
                                   3, 2, 0, 0, 1, 1);
            swap_roles(r, RA, RT);
            H /= 2; W /= 2;
        }
    }
    const int C = ch[n - 1];
    const size_t P = (size_t)H * W;
    vae_mid(r, p->enc_mid_res, &p->enc_mid_attn, C, G, H, W);
    float *x = use_role(r, RA, (size_t)C * P), *t = use_role(r, RT, (size_t)2 * lat * P);
    if (r->plan) return;
    groupnorm_forward(x, NULL, NULL, x, WT(r, p->enc_norm_out_w, 1), WT(r, p->enc_norm_out_b, 2), 1, C, (int)P, G,
                      VAE_EPS);
    silu_forward(x, x, (size_t)C * P);
    conv2d_forward(t, x, WT(r, p->enc_conv_out_w, 0), WT(r, p->enc_conv_out_b, 1), 1, C, 2 * lat, H, W, 3, 1, 1);
    conv2d_forward(moments, t, WT(r, p->quant_w, 0), WT(r, p->quant_b, 1), 1, 2 * lat, 2 * lat, H, W, 1, 1, 0);
}

/* z / scaling_factor -> post_quant_conv -> Decoder (vae.py): latents (lat,h,w) -> img (Cout,h*f,w*f). */
static void vae_decoder(VaeRun *r, const VaeConfig *c, const VaeParams *p, float *img, const float *latents,
                        int H, int W) {
    const int n = c->n_blocks, L = c->layers_per_block, G = c->norm_num_groups, lat = c->latent_channels;
    const int *ch = c->block_out_channels;
    size_t P = (size_t)H * W;
    float *z = use_role(r, RT, (size_t)lat * P), *zq = use_role(r, RH, (size_t)lat * P);
    float *a = use_role(r, RA, (size_t)ch[n - 1] * P);
    if (!r->plan) {
        for (size_t i = 0; i < (size_t)lat * P; i++) z[i] = latents[i] / c->scaling_factor;
        conv2d_forward(zq, z, WT(r, p->post_quant_w, 0), WT(r, p->post_quant_b, 1), 1, lat, lat, H, W, 1, 1, 0);
        conv2d_forward(a, zq, WT(r, p->dec_conv_in_w, 0), WT(r, p->dec_conv_in_b, 1), 1, lat, ch[n - 1], H, W, 3, 1, 1);
    }
    vae_mid(r, p->dec_mid_res, &p->dec_mid_attn, ch[n - 1], G, H, W);
    for (int i = 0, prev = ch[n - 1]; i < n; prev = ch[n - 1 - i], i++) {
        const int cout = ch[n - 1 - i];
        for (int j = 0; j <= L; j++) vae_resnet(r, &p->dec_res[i][j], j ? cout : prev, cout, G, H, W);
        if (i < n - 1) {
            vae_upsample(r, WT(r, p->dec_up_w[i], 0), WT(r, p->dec_up_b[i], 1), cout, H, W);
            H *= 2; W *= 2;
        }
    }
    P = (size_t)H * W;
    float *x = use_role(r, RA, (size_t)ch[0] * P);
    if (r->plan) return;
    groupnorm_forward(x, NULL, NULL, x, WT(r, p->dec_norm_out_w, 1), WT(r, p->dec_norm_out_b, 2), 1, ch[0], (int)P, G,
                      VAE_EPS);
    silu_forward(x, x, (size_t)ch[0] * P);
    conv2d_forward(img, x, WT(r, p->dec_conv_out_w, 0), WT(r, p->dec_conv_out_b, 1), 1, ch[0], c->out_channels, H, W,
                   3, 1, 1);
}

/* ---------------------------------------------------------------------------------------- */
/* Planning                                                                                  */
/* ---------------------------------------------------------------------------------------- */
static int vae_factor(const VaeConfig *c) { return 1 << (c->n_blocks - 1); }

/* Image sides: positive multiples of the latent factor 2^(n_blocks-1) (8 for SD), at most 2^15. */
static MsStatus vae_check_image(const VaeConfig *c, int H, int W, const char *what) {
    const int f = vae_factor(c);
    if (H <= 0 || W <= 0 || H % f || W % f || H > 32768 || W > 32768)
        return ms_errorf(MS_ERR_SHAPE, "%s: image %d x %d: sides must be positive multiples of %d "
                         "(2^(levels-1)) and at most 32768", what, H, W, f);
    return MS_OK;
}

static const VaeParams vae_no_params;   /* planning reads no weight */

static void vae_plan(VaeRun *r, const VaeConfig *c, int encode, int H, int W) {
    memset(r, 0, sizeof *r);
    r->plan = 1;
    int M = c->in_channels > c->out_channels ? c->in_channels : c->out_channels;   /* widest layer */
    if (2 * c->latent_channels > M) M = 2 * c->latent_channels;
    for (int i = 0; i < c->n_blocks; i++) if (c->block_out_channels[i] > M) M = c->block_out_channels[i];
    r->stage_mat = ((size_t)M * M * 9 + 15) & ~(size_t)15;     /* every weight is at most (M,M,3,3) */
    r->stage_vec = ((size_t)M + 15) & ~(size_t)15;
    r->role[RA] = VB_0; r->role[RT] = VB_1; r->role[RH] = VB_2;
    if (encode) vae_encoder(r, c, &vae_no_params, NULL, NULL, H, W);
    else vae_decoder(r, c, &vae_no_params, NULL, NULL, H / vae_factor(c), W / vae_factor(c));
}

static size_t plan_bytes(const VaeRun *r) {
    size_t b = ((r->stage_mat + 2 * r->stage_vec) * sizeof(float) + 63) / 64 * 64 + 64;
    for (int i = 0; i < VAE_NBUF; i++) b += (r->need[i] * sizeof(float) + 63) / 64 * 64 + 64;
    return b;
}

static MsStatus plan_alloc(VaeRun *r, Arena *a, const char *what) {
    r->plan = 0;
    r->role[RA] = VB_0; r->role[RT] = VB_1; r->role[RH] = VB_2;
    for (int i = 0; i < VAE_NBUF; i++) {
        r->buf[i] = arena_floats(a, r->need[i] ? r->need[i] : 1);
        if (!r->buf[i])
            return ms_errorf(MS_ERR_NOMEM, "%s: scratch arena too small (%zu of %zu bytes free, %zu needed)", what,
                             a->cap - a->used, a->cap, plan_bytes(r));
    }
    memset(&r->ws, 0, sizeof r->ws);
    if (!(r->ws.mat = arena_floats(a, r->stage_mat + 2 * r->stage_vec)))
        return ms_errorf(MS_ERR_NOMEM, "%s: scratch arena too small for the weight staging", what);
    r->ws.vec[0] = r->ws.mat + r->stage_mat;
    r->ws.vec[1] = r->ws.vec[0] + r->stage_vec;
    return MS_OK;
}

/* diffusers' tiling numbers for tile_sample pixels: tile_latent_min_size = int(ts / f),
 * overlap 25%. Decode: latent tiles start every int(tl * 0.75) latents, blend int(ts * 0.25)
 * pixels, keep ts - blend. Encode: image tiles start every int(ts * 0.75) pixels, blend
 * int(tl * 0.25) latents, keep tl - blend. */
typedef struct { int ts, tl, dec_step, dec_blend, dec_keep, enc_step, enc_blend, enc_keep; } VaeTiles;

static MsStatus vae_tiles(const VaeConfig *c, int tile_sample, VaeTiles *t) {
    const int f = vae_factor(c);
    t->ts = tile_sample > 0 ? tile_sample : c->sample_size;
    t->tl = (int)((double)t->ts / f);
    t->dec_step = (int)(t->tl * (1.0 - 0.25));
    t->dec_blend = (int)(t->ts * 0.25);
    t->dec_keep = t->ts - t->dec_blend;
    t->enc_step = (int)(t->ts * (1.0 - 0.25));
    t->enc_blend = (int)(t->tl * 0.25);
    t->enc_keep = t->tl - t->enc_blend;
    if (t->ts <= 0 || t->ts > 32768 || t->ts % f || t->dec_step < 1 || t->dec_step * f != t->dec_keep ||
        t->enc_step != t->enc_keep * f)
        return ms_errorf(MS_ERR_UNSUPPORTED, "vae tiling: tile of %d pixels (latent %d): needs a multiple of %d "
                         "whose 75%% step equals the kept part (e.g. a multiple of %d)", t->ts, t->tl, f, 4 * f);
    return MS_OK;
}

static size_t al(size_t bytes) { return (bytes + 63) / 64 * 64 + 64; }

/* Scratch of one tiling pass over an input Win wide: the network at tile size, two rows of
 * finished tiles, one input tile (the same allocations vae_tiled makes). */
static size_t tiled_bytes(const VaeConfig *c, const VaeTiles *t, int encode, int Win) {
    VaeRun r;
    const int step = encode ? t->enc_step : t->dec_step, tin = encode ? t->ts : t->tl, tout = encode ? t->tl : t->ts;
    const int Ci = encode ? c->in_channels : c->latent_channels, Co = encode ? 2 * c->latent_channels : c->out_channels;
    const size_t nx = (size_t)(Win + step - 1) / step;
    vae_plan(&r, c, encode, t->ts, t->ts);
    return plan_bytes(&r) + al(2 * nx * Co * tout * tout * sizeof(float)) + al((size_t)Ci * tin * tin * sizeof(float));
}

MsStatus vae_sizes(const VaeConfig *c, int H, int W, int tile_sample, VaeSizes *s) {
    MsStatus st;
    VaeRun r;
    VaeTiles t;
    memset(s, 0, sizeof *s);
    if ((st = vae_check_config(c)) || (st = vae_check_image(c, H, W, "vae_sizes"))) return st;
    const int f = vae_factor(c);
    const size_t mom = al((size_t)2 * c->latent_channels * (H / f) * (W / f) * sizeof(float));
    vae_plan(&r, c, 1, H, W);
    s->encode_bytes = plan_bytes(&r) + mom;
    vae_plan(&r, c, 0, H, W);
    s->decode_bytes = plan_bytes(&r);
    s->decode_act_bytes = (r.need[VB_0] + r.need[VB_1] + r.need[VB_2]) * sizeof(float);
    if (tile_sample >= 0) {
        if ((st = vae_tiles(c, tile_sample, &t))) return st;
        s->decode_tiled_bytes = tiled_bytes(c, &t, 0, W / f);
        s->encode_tiled_bytes = tiled_bytes(c, &t, 1, W) + mom;
    }
    return MS_OK;
}

/* ---------------------------------------------------------------------------------------- */
/* Encode, posterior, decode                                                                 */
/* ---------------------------------------------------------------------------------------- */
/* DiagonalGaussianDistribution: mean, logvar = moments.chunk(2, dim=1); logvar.clamp(-30, 20). */
static void split_moments(float *mean, float *logvar, const float *m, int lat, size_t P) {
    memcpy(mean, m, (size_t)lat * P * sizeof(float));
    for (size_t i = 0; i < (size_t)lat * P; i++) {
        float v = m[(size_t)lat * P + i];
        logvar[i] = v < -30.0f ? -30.0f : v > 20.0f ? 20.0f : v;
    }
}

MsStatus vae_encode(const VaeParams *p, Arena *scratch, float *mean, float *logvar, const float *x,
                    int B, int H, int W) {
    const VaeConfig *c = &p->cfg;
    MsStatus s;
    VaeRun r;
    if ((s = vae_check_config(c)) || (s = vae_check_image(c, H, W, "vae_encode"))) return s;
    if (B < 1) return ms_errorf(MS_ERR_SHAPE, "vae_encode: batch %d < 1", B);
    const int f = vae_factor(c), lat = c->latent_channels;
    const size_t P = (size_t)(H / f) * (W / f), mark = arena_mark(scratch);
    vae_plan(&r, c, 1, H, W);
    const size_t nmom = (size_t)2 * lat * P;
    float *mom = arena_floats(scratch, nmom);
    if (!mom || (s = plan_alloc(&r, scratch, "vae_encode"))) {
        arena_reset(scratch, mark);
        return mom ? s : ms_errorf(MS_ERR_NOMEM, "vae_encode: scratch arena too small");
    }
    for (int b = 0; b < B; b++) {
        r.role[RA] = VB_0; r.role[RT] = VB_1; r.role[RH] = VB_2;
        vae_encoder(&r, c, p, mom, x + (size_t)b * c->in_channels * H * W, H, W);
        split_moments(mean + (size_t)b * lat * P, logvar + (size_t)b * lat * P, mom, lat, P);
    }
    arena_reset(scratch, mark);
    return MS_OK;
}

void vae_posterior_sample(float *latents, float *std, const float *mean, const float *logvar, const float *noise,
                          size_t n, float scale) {
    for (size_t i = 0; i < n; i++) {
        float sd = expf(0.5f * logvar[i]);
        float e = sd * noise[i];
        float smp = mean[i] + e;
        if (std) std[i] = sd;
        latents[i] = smp * scale;
    }
}

MsStatus vae_decode(const VaeParams *p, Arena *scratch, float *img, const float *latents, int B, int h, int w) {
    const VaeConfig *c = &p->cfg;
    MsStatus s;
    VaeRun r;
    if ((s = vae_check_config(c))) return s;
    const int f = vae_factor(c);
    if (h <= 0 || w <= 0 || h > 32768 / f || w > 32768 / f)
        return ms_errorf(MS_ERR_SHAPE, "vae_decode: latent %d x %d: sides must be in 1..%d", h, w, 32768 / f);
    if (B < 1) return ms_errorf(MS_ERR_SHAPE, "vae_decode: batch %d < 1", B);
    const size_t mark = arena_mark(scratch);
    vae_plan(&r, c, 0, h * f, w * f);
    if ((s = plan_alloc(&r, scratch, "vae_decode"))) { arena_reset(scratch, mark); return s; }
    for (int b = 0; b < B; b++) {
        r.role[RA] = VB_0; r.role[RT] = VB_1; r.role[RH] = VB_2;
        vae_decoder(&r, c, p, img + (size_t)b * c->out_channels * h * f * w * f,
                    latents + (size_t)b * c->latent_channels * h * w, h, w);
    }
    arena_reset(scratch, mark);
    return MS_OK;
}

/* ---------------------------------------------------------------------------------------- */
/* Tiled decode / encode (AutoencoderKL.tiled_decode / tiled_encode, diffusers 0.19.3)       */
/* ---------------------------------------------------------------------------------------- */
/* Tiles are visited row by row, left to right; tile (i, j) covers latent rows
 * [i*step, i*step + tl) (cut at the edge, so the last tiles may be smaller). Each decoded tile
 * is blended IN PLACE, first with the tile above (blend_v), then with the tile to its left
 * (blend_h), both of which were blended before; with e = min(extent, both sizes):
 *   b[y] = a[len_a - e + y] * (1 - y/e) + b[y] * (y/e),   y = 0 .. e-1
 * (each product rounded to float, then the sum: torch's tensor * python-float). Then
 * tile[:keep, :keep] goes to output position (i*keep, j*keep). So only the first rows/columns
 * of a tile change, each seam is a linear ramp over `extent` pixels from the neighbour's tail to
 * this tile, and corner pixels are blended twice. We keep the previous row of finished tiles
 * (for blend_v) and the current row (for blend_h and next row). */
static void blend_v(float *b, const float *a, int C, int ha, int hb, int w, int extent) {
    int e = extent < ha ? extent : ha;
    if (hb < e) e = hb;
    for (int c = 0; c < C; c++)
        for (int y = 0; y < e; y++) {
            const float wa = (float)(1.0 - (double)y / e), wb = (float)((double)y / e);
            const float *ar = a + ((size_t)c * ha + (ha - e + y)) * w;
            float *br = b + ((size_t)c * hb + y) * w;
            for (int x = 0; x < w; x++) { float pa = ar[x] * wa, pb = br[x] * wb; br[x] = pa + pb; }
        }
}

static void blend_h(float *b, const float *a, int C, int h, int wa_, int wb_, int extent) {
    int e = extent < wa_ ? extent : wa_;
    if (wb_ < e) e = wb_;
    for (int x = 0; x < e; x++) {
        const float wa = (float)(1.0 - (double)x / e), wb = (float)((double)x / e);
        for (int c = 0; c < C; c++)
            for (int y = 0; y < h; y++) {
                float pa = a[((size_t)c * h + y) * wa_ + (wa_ - e + x)] * wa;
                float *pb = &b[((size_t)c * h + y) * wb_ + x];
                float q = *pb * wb;
                *pb = pa + q;
            }
    }
}

/* One tiling pass over a (C_in, Hin, Win) input into a (C_out, Hout, Wout) output, where an
 * input tile of side `tin` maps to an output tile of side `tout` (scale s = tout/tin):
 * tile_fn computes one tile. Shared by decode (latent -> image) and encode (image -> moments). */
typedef struct {
    const VaeParams *p;
    VaeRun *r;
    int encode;
} TileCtx;

static void run_tile(TileCtx *t, float *out, const float *in, int th, int tw) {
    VaeRun *r = t->r;
    r->role[RA] = VB_0; r->role[RT] = VB_1; r->role[RH] = VB_2;
    if (t->encode) vae_encoder(r, &t->p->cfg, t->p, out, in, th, tw);
    else vae_decoder(r, &t->p->cfg, t->p, out, in, th, tw);
}

static MsStatus vae_tiled(const VaeParams *p, Arena *scratch, float *out, const float *in, int B, int Hin, int Win,
                          int encode, const VaeTiles *tl, const char *what) {
    const VaeConfig *c = &p->cfg;
    const int f = vae_factor(c);
    const int Ci = encode ? c->in_channels : c->latent_channels, Co = encode ? 2 * c->latent_channels : c->out_channels;
    const int tin = encode ? tl->ts : tl->tl, tout = encode ? tl->tl : tl->ts;
    const int step = encode ? tl->enc_step : tl->dec_step, extent = encode ? tl->enc_blend : tl->dec_blend;
    const int keep = encode ? tl->enc_keep : tl->dec_keep;
    const int Hout = encode ? Hin / f : Hin * f, Wout = encode ? Win / f : Win * f;
    const int ny = (Hin + step - 1) / step, nx = (Win + step - 1) / step;
    const size_t tile_n = (size_t)Co * tout * tout, mark = arena_mark(scratch);
    VaeRun r;
    MsStatus s;
    vae_plan(&r, c, encode, tl->ts, tl->ts);
    float *rows = arena_floats(scratch, 2 * (size_t)nx * tile_n);
    float *tin_buf = arena_floats(scratch, (size_t)Ci * tin * tin);
    if (!rows || !tin_buf) {
        arena_reset(scratch, mark);
        return ms_errorf(MS_ERR_NOMEM, "%s: scratch arena too small for %d tile columns", what, nx);
    }
    if ((s = plan_alloc(&r, scratch, what))) { arena_reset(scratch, mark); return s; }
    TileCtx tc = { p, &r, encode };
    int th_prev[2] = { 0, 0 };
    for (int b = 0; b < B; b++) {
        const float *inb = in + (size_t)b * Ci * Hin * Win;
        float *outb = out + (size_t)b * Co * Hout * Wout;
        for (int i = 0; i < ny; i++) {
            float *cur = rows + (size_t)(i & 1) * nx * tile_n, *prev = rows + (size_t)((i + 1) & 1) * nx * tile_n;
            const int y0 = i * step, hi = Hin - y0 < tin ? Hin - y0 : tin;
            const int ho = encode ? hi / f : hi * f;
            for (int j = 0; j < nx; j++) {
                const int x0 = j * step, wi = Win - x0 < tin ? Win - x0 : tin;
                const int wo = encode ? wi / f : wi * f;
                const int wl = Win - (x0 - step) < tin ? Win - (x0 - step) : tin;   /* left tile (may be cut too) */
                const int wo_left = encode ? wl / f : wl * f;
                float *tile = cur + (size_t)j * tile_n;
                for (int ch = 0; ch < Ci; ch++)
                    for (int y = 0; y < hi; y++)
                        memcpy(tin_buf + ((size_t)ch * hi + y) * wi, inb + ((size_t)ch * Hin + y0 + y) * Win + x0,
                               (size_t)wi * sizeof(float));
                run_tile(&tc, tile, tin_buf, hi, wi);
                if (i > 0) blend_v(tile, prev + (size_t)j * tile_n, Co, th_prev[(i + 1) & 1], ho, wo, extent);
                if (j > 0) blend_h(tile, cur + (size_t)(j - 1) * tile_n, Co, ho, wo_left, wo, extent);
                const int kh = ho < keep ? ho : keep, kw = wo < keep ? wo : keep;
                for (int ch = 0; ch < Co; ch++)
                    for (int y = 0; y < kh; y++)
                        memcpy(outb + ((size_t)ch * Hout + (size_t)i * keep + y) * Wout + (size_t)j * keep,
                               tile + ((size_t)ch * ho + y) * wo, (size_t)kw * sizeof(float));
            }
            th_prev[i & 1] = ho;
        }
    }
    arena_reset(scratch, mark);
    return MS_OK;
}

MsStatus vae_decode_tiled(const VaeParams *p, Arena *scratch, float *img, const float *latents, int B, int h, int w,
                          int tile_sample) {
    const VaeConfig *c = &p->cfg;
    MsStatus s;
    VaeTiles t;
    if ((s = vae_check_config(c)) || (s = vae_tiles(c, tile_sample, &t))) return s;
    if (h <= t.tl && w <= t.tl) return vae_decode(p, scratch, img, latents, B, h, w);   /* as diffusers */
    const int f = vae_factor(c);
    if (h <= 0 || w <= 0 || h > 32768 / f || w > 32768 / f)
        return ms_errorf(MS_ERR_SHAPE, "vae_decode_tiled: latent %d x %d: sides must be in 1..%d", h, w, 32768 / f);
    if (B < 1) return ms_errorf(MS_ERR_SHAPE, "vae_decode_tiled: batch %d < 1", B);
    return vae_tiled(p, scratch, img, latents, B, h, w, 0, &t, "vae_decode_tiled");
}

MsStatus vae_encode_tiled(const VaeParams *p, Arena *scratch, float *mean, float *logvar, const float *x,
                          int B, int H, int W, int tile_sample) {
    const VaeConfig *c = &p->cfg;
    MsStatus s;
    VaeTiles t;
    if ((s = vae_check_config(c)) || (s = vae_tiles(c, tile_sample, &t))) return s;
    if (H <= t.ts && W <= t.ts) return vae_encode(p, scratch, mean, logvar, x, B, H, W);
    if ((s = vae_check_image(c, H, W, "vae_encode_tiled"))) return s;
    if (B < 1) return ms_errorf(MS_ERR_SHAPE, "vae_encode_tiled: batch %d < 1", B);
    const int f = vae_factor(c), lat = c->latent_channels;
    const size_t P = (size_t)(H / f) * (W / f), mark = arena_mark(scratch);
    float *mom = arena_floats(scratch, (size_t)2 * lat * P);
    if (!mom) return ms_errorf(MS_ERR_NOMEM, "vae_encode_tiled: scratch arena too small");
    for (int b = 0; b < B; b++) {
        if ((s = vae_tiled(p, scratch, mom, x + (size_t)b * c->in_channels * H * W, 1, H, W, 1, &t, "vae_encode_tiled"))) {
            arena_reset(scratch, mark);
            return s;
        }
        split_moments(mean + (size_t)b * lat * P, logvar + (size_t)b * lat * P, mom, lat, P);
    }
    arena_reset(scratch, mark);
    return MS_OK;
}


/* ---------------------------------------------------------------------------------------- */
/* Training (issue 15): encoder and decoder forward on a tape, full-parameter backward       */
/* ---------------------------------------------------------------------------------------- */
/* The training forward runs the whole batch through each op at once and records every op on a
 * tape (VaeTape, mixshow.h): its kind, its tensors (values kept, gradient buffers beside them),
 * where its weight and bias sit in VaeParams (byte offsets, so that backward finds the same
 * fields in the gradient VaeParams dp) and what it saved (GroupNorm mean/rstd, attention
 * q/k/v/o/lse). Nothing runs in place, so backward reads every op's input as it was. Backward is
 * one loop over the tape in reverse, so the encoder and decoder cannot disagree with their
 * forwards. The same builder runs with plan = 1 (shapes only, no data) to size the arena.
 * Memory: values + gradients of every activation, meant for the small VAEs of `mixshow
 * pretrain` (SD 1.5's VAE at 512^2 would need tens of GB this way). */
enum { VT_CONV, VT_GN, VT_SILU, VT_ADD, VT_UP, VT_ATTN };
#define VT_NONE ((size_t)-1)

static const MsParam *vt_field(const VaeParams *p, size_t off) {
    return off == VT_NONE ? NULL : *(const MsParam *const *)(const void *)((const char *)p + off);
}

static size_t vt_off(const VaeTape *t, const MsParam *const *field) {
    return (size_t)((const char *)field - (const char *)t->p);
}

static void vt_fail(VaeTape *t, MsStatus s) { if (!t->st) t->st = s; }

static int vt_live(const VaeTape *t) { return !t->plan && !t->st; }

static void *vt_alloc(VaeTape *t, size_t bytes) {
    t->bytes += al(bytes);
    if (t->plan) return NULL;
    void *m = arena_alloc(t->ar, bytes ? bytes : 1);
    if (!m) vt_fail(t, ms_errorf(MS_ERR_NOMEM, "vae training: activation arena too small (%zu of %zu bytes free)",
                                 t->ar->cap - t->ar->used, t->ar->cap));
    return m;
}

/* a new tensor (N, C, H, W): value and gradient */
static int vt_new(VaeTape *t, int C, int H, int W) {
    if (t->n_t >= t->cap) { vt_fail(t, ms_errorf(MS_ERR_ARG, "vae training: tape overflow (%d tensors)", t->cap)); return 0; }
    const int id = t->n_t++;
    const size_t n = (size_t)t->N * C * H * W;
    VaeTapeTensor *x = &t->t[id];
    x->C = C; x->H = H; x->W = W;
    x->v = (float *)vt_alloc(t, n * sizeof(float));
    x->g = (float *)vt_alloc(t, n * sizeof(float));
    return id;
}

static VaeTapeOp *vt_op(VaeTape *t, int kind, int x, int y, int out) {
    static VaeTapeOp sink;
    if (t->n_ops >= t->cap) {
        vt_fail(t, ms_errorf(MS_ERR_ARG, "vae training: tape overflow (%d ops)", t->cap));
        return memset(&sink, 0, sizeof sink);
    }
    VaeTapeOp *o = &t->op[t->n_ops++];
    memset(o, 0, sizeof *o);
    o->kind = kind; o->x = x; o->y = y; o->out = out; o->w = o->b = VT_NONE;
    return o;
}

/* the f32 data of the weight at offset off (NULL while planning or for VT_NONE) */
static const float *vt_weight(VaeTape *t, size_t off) {
    const MsParam *m = vt_field(t->p, off);
    if (t->plan || !m) return NULL;
    if (!m->f32) vt_fail(t, ms_errorf(MS_ERR_UNSUPPORTED, "vae training: %s is not f32 (full-parameter training needs "
                                     "f32 weights; load the table as f32)", m->name));
    return m->f32;
}

/* conv k x k, stride s, pads top, left, bottom, right */
static int vt_conv(VaeTape *t, int x, const MsParam *const *w, const MsParam *const *b, int Co, int k, int s,
                   int pt, int pl, int pb, int pr) {
    const int C = t->t[x].C, H = t->t[x].H, W = t->t[x].W;
    const int y = vt_new(t, Co, (H + pt + pb - k) / s + 1, (W + pl + pr - k) / s + 1);
    VaeTapeOp *o = vt_op(t, VT_CONV, x, -1, y);
    o->w = vt_off(t, w); o->b = vt_off(t, b);
    o->k = k; o->s = s; o->pad[0] = pt; o->pad[1] = pl; o->pad[2] = pb; o->pad[3] = pr;
    const float *wf = vt_weight(t, o->w), *bf = vt_weight(t, o->b);
    if (vt_live(t)) conv2d_forward_pad(t->t[y].v, t->t[x].v, wf, bf, t->N, C, Co, H, W, k, s, pt, pl, pb, pr);
    return y;
}

static int vt_gn(VaeTape *t, int x, const MsParam *const *w, const MsParam *const *b) {
    const int C = t->t[x].C, H = t->t[x].H, W = t->t[x].W, G = t->cfg.norm_num_groups;
    const int y = vt_new(t, C, H, W);
    float *save = (float *)vt_alloc(t, 2 * (size_t)t->N * G * sizeof(float));
    VaeTapeOp *o = vt_op(t, VT_GN, x, -1, y);
    o->w = vt_off(t, w); o->b = vt_off(t, b); o->save = save;
    const float *wf = vt_weight(t, o->w), *bf = vt_weight(t, o->b);
    if (vt_live(t))
        groupnorm_forward(t->t[y].v, save, save + (size_t)t->N * G, t->t[x].v, wf, bf, t->N, C, H * W, G, VAE_EPS);
    return y;
}

static int vt_silu(VaeTape *t, int x) {
    const int y = vt_new(t, t->t[x].C, t->t[x].H, t->t[x].W);
    vt_op(t, VT_SILU, x, -1, y);
    if (vt_live(t)) silu_forward(t->t[y].v, t->t[x].v, (size_t)t->N * t->t[x].C * t->t[x].H * t->t[x].W);
    return y;
}

static int vt_add(VaeTape *t, int a, int b) {
    const int y = vt_new(t, t->t[a].C, t->t[a].H, t->t[a].W);
    vt_op(t, VT_ADD, a, b, y);
    if (vt_live(t)) add_forward(t->t[y].v, t->t[a].v, t->t[b].v, (size_t)t->N * t->t[a].C * t->t[a].H * t->t[a].W);
    return y;
}

static int vt_up(VaeTape *t, int x) {
    const int C = t->t[x].C, H = t->t[x].H, W = t->t[x].W;
    const int y = vt_new(t, C, 2 * H, 2 * W);
    vt_op(t, VT_UP, x, -1, y);
    if (vt_live(t)) upsample_nearest2x_forward(t->t[y].v, t->t[x].v, t->N, C, H, W);
    return y;
}

/* The attention of vae_attention after its GroupNorm, on x (N,C,T): q, k, v, o (N,T,C) and
 * lse (N,T) saved; out (N,C,T) = Wo o^T + bo (the residual is a VT_ADD of its own). */
static int vt_attn(VaeTape *t, int x, const VaeAttnParams *a) {
    const int C = t->t[x].C, H = t->t[x].H, W = t->t[x].W, T = H * W, N = t->N;
    const size_t n = (size_t)C * T;
    const int y = vt_new(t, C, H, W);
    float *save = (float *)vt_alloc(t, (8 * n + (size_t)T) * N * sizeof(float));   /* + backward's do/dq/dk/dv */
    VaeTapeOp *o = vt_op(t, VT_ATTN, x, -1, y);
    o->w = vt_off(t, &a->q_w); o->save = save;
    const float *wq = vt_weight(t, vt_off(t, &a->q_w)), *bq = vt_weight(t, vt_off(t, &a->q_b));
    const float *wk = vt_weight(t, vt_off(t, &a->k_w)), *bk = vt_weight(t, vt_off(t, &a->k_b));
    const float *wv = vt_weight(t, vt_off(t, &a->v_w)), *bv = vt_weight(t, vt_off(t, &a->v_b));
    const float *wo = vt_weight(t, vt_off(t, &a->o_w)), *bo = vt_weight(t, vt_off(t, &a->o_b));
    if (!vt_live(t)) return y;
    float *q = save, *k = q + N * n, *v = k + N * n, *ob = v + N * n, *lse = ob + N * n;
    for (int b = 0; b < N; b++) {
        const float *xb = t->t[x].v + b * n;
        tokens_linear(q + b * n, xb, wq, bq, C, T);
        tokens_linear(k + b * n, xb, wk, bk, C, T);
        tokens_linear(v + b * n, xb, wv, bv, C, T);
    }
    attention_forward(ob, lse, q, k, v, N, T, T, 1, C, 0, (float)pow((double)C, -0.5));
    for (int b = 0; b < N; b++) {
        float *yb = t->t[y].v + b * n;
        for (int c = 0; c < C; c++)
            for (int i = 0; i < T; i++) yb[(size_t)c * T + i] = bo[c];
        ms_gemm(0, 1, C, T, C, 1.0f, wo, C, ob + b * n, C, 1.0f, yb, T);
    }
    return y;
}

/* ResnetBlock2D as vae_resnet: out = shortcut(x) + conv2(silu(norm2(conv1(silu(norm1(x)))))) */
static int vt_resnet(VaeTape *t, int x, const VaeResnetParams *p, int Co) {
    const int Ci = t->t[x].C;
    int h = vt_conv(t, vt_silu(t, vt_gn(t, x, &p->norm1_w, &p->norm1_b)), &p->conv1_w, &p->conv1_b, Co, 3, 1, 1, 1, 1, 1);
    h = vt_conv(t, vt_silu(t, vt_gn(t, h, &p->norm2_w, &p->norm2_b)), &p->conv2_w, &p->conv2_b, Co, 3, 1, 1, 1, 1, 1);
    const int s = Ci == Co ? x : vt_conv(t, x, &p->short_w, &p->short_b, Co, 1, 1, 0, 0, 0, 0);
    return vt_add(t, s, h);
}

static int vt_mid(VaeTape *t, int x, const VaeResnetParams res[2], const VaeAttnParams *a) {
    const int C = t->t[x].C;
    x = vt_resnet(t, x, &res[0], C);
    x = vt_add(t, vt_attn(t, vt_gn(t, x, &a->norm_w, &a->norm_b), a), x);
    return vt_resnet(t, x, &res[1], C);
}

/* vae_encoder: img -> moments (N, 2 lat, H/f, W/f) */
static int vt_encoder(VaeTape *t, const VaeParams *p, int x) {
    const VaeConfig *c = &t->cfg;
    const int n = c->n_blocks, L = c->layers_per_block, *ch = c->block_out_channels;
    int a = vt_conv(t, x, &p->enc_conv_in_w, &p->enc_conv_in_b, ch[0], 3, 1, 1, 1, 1, 1);
    for (int i = 0; i < n; i++) {
        for (int j = 0; j < L; j++) a = vt_resnet(t, a, &p->enc_res[i][j], ch[i]);
        if (i < n - 1) a = vt_conv(t, a, &p->enc_down_w[i], &p->enc_down_b[i], ch[i], 3, 2, 0, 0, 1, 1);
    }
    a = vt_mid(t, a, p->enc_mid_res, &p->enc_mid_attn);
    a = vt_silu(t, vt_gn(t, a, &p->enc_norm_out_w, &p->enc_norm_out_b));
    a = vt_conv(t, a, &p->enc_conv_out_w, &p->enc_conv_out_b, 2 * c->latent_channels, 3, 1, 1, 1, 1, 1);
    return vt_conv(t, a, &p->quant_w, &p->quant_b, 2 * c->latent_channels, 1, 1, 0, 0, 0, 0);
}

/* AutoencoderKL.decode(z) = Decoder(post_quant_conv(z)): z (N, lat, h, w) -> img */
static int vt_decoder(VaeTape *t, const VaeParams *p, int z) {
    const VaeConfig *c = &t->cfg;
    const int n = c->n_blocks, L = c->layers_per_block, *ch = c->block_out_channels;
    int a = vt_conv(t, z, &p->post_quant_w, &p->post_quant_b, c->latent_channels, 1, 1, 0, 0, 0, 0);
    a = vt_conv(t, a, &p->dec_conv_in_w, &p->dec_conv_in_b, ch[n - 1], 3, 1, 1, 1, 1, 1);
    a = vt_mid(t, a, p->dec_mid_res, &p->dec_mid_attn);
    for (int i = 0; i < n; i++) {
        for (int j = 0; j <= L; j++) a = vt_resnet(t, a, &p->dec_res[i][j], ch[n - 1 - i]);
        if (i < n - 1) a = vt_conv(t, vt_up(t, a), &p->dec_up_w[i], &p->dec_up_b[i], ch[n - 1 - i], 3, 1, 1, 1, 1, 1);
    }
    a = vt_silu(t, vt_gn(t, a, &p->dec_norm_out_w, &p->dec_norm_out_b));
    return vt_conv(t, a, &p->dec_conv_out_w, &p->dec_conv_out_b, c->out_channels, 3, 1, 1, 1, 1, 1);
}

/* at least the tensors and ops of either builder: a resnet makes 8, the mid block 19 */
static int vt_cap(const VaeConfig *c) { return 40 + 8 * c->n_blocks * (c->layers_per_block + 1) + 2 * c->n_blocks; }

/* Checks, then builds the tape: with ar NULL only plans (t->bytes); else allocates from ar and
 * runs. The input (N, Cin, H, W) is copied onto the tape. */
static MsStatus vt_build(VaeTape *t, Arena *ar, const VaeConfig *c, const VaeParams *p, int encode, const float *in,
                         int N, int H, int W, const char *what) {
    MsStatus s;
    const int f = vae_factor(c);
    memset(t, 0, sizeof *t);
    if ((s = vae_check_config(c))) return s;
    if (encode && (s = vae_check_image(c, H, W, what))) return s;
    if (!encode && (H <= 0 || W <= 0 || H > 32768 / f || W > 32768 / f))
        return ms_errorf(MS_ERR_SHAPE, "%s: latent %d x %d: sides must be in 1..%d", what, H, W, 32768 / f);
    int wide = (int)zmax(zmax((size_t)c->in_channels, (size_t)c->out_channels), 2 * (size_t)c->latent_channels);
    for (int i = 0; i < c->n_blocks; i++) wide = c->block_out_channels[i] > wide ? c->block_out_channels[i] : wide;
    const double Hi = encode ? H : (double)H * f, Wi = encode ? W : (double)W * f;
    if (N < 1 || (double)N * wide * Hi * Wi > 2147483647.0)
        return ms_errorf(MS_ERR_SHAPE, "%s: batch %d of %.0f x %.0f images: needs >= 1 and every tensor below 2^31 "
                         "values", what, N, Hi, Wi);
    if (p && memcmp(&p->cfg, c, sizeof *c)) return ms_errorf(MS_ERR_ARG, "%s: the parameters belong to another config", what);
    t->cfg = *c; t->N = N; t->encode = encode; t->H = H; t->W = W; t->p = p ? p : &vae_no_params;
    t->plan = !ar; t->ar = ar; t->cap = vt_cap(c);
    const size_t arrays = (size_t)t->cap * (sizeof(VaeTapeOp) + sizeof(VaeTapeTensor));
    if (t->plan) {   /* shapes need somewhere to live while planning */
        if (!(t->op = (VaeTapeOp *)malloc(arrays))) return ms_errorf(MS_ERR_NOMEM, "%s: out of memory", what);
        t->t = (VaeTapeTensor *)(void *)(t->op + t->cap);
        t->bytes = al(arrays);
    } else {
        t->op = (VaeTapeOp *)vt_alloc(t, arrays);
        if (t->st) return t->st;
        t->t = (VaeTapeTensor *)(void *)(t->op + t->cap);
    }
    const int Ci = encode ? c->in_channels : c->latent_channels;
    t->in = vt_new(t, Ci, H, W);
    if (vt_live(t)) memcpy(t->t[t->in].v, in, (size_t)N * Ci * H * W * sizeof(float));
    t->out = encode ? vt_encoder(t, t->p, t->in) : vt_decoder(t, t->p, t->in);
    if (t->plan) { free(t->op); t->op = NULL; t->t = NULL; }
    return t->st;
}

MsStatus vae_train_sizes(const VaeConfig *c, int encode, int N, int H, int W, size_t *bytes) {
    VaeTape t;
    MsStatus s = vt_build(&t, NULL, c, NULL, encode, NULL, N, H, W, "vae_train_sizes");
    *bytes = s ? 0 : t.bytes;
    return s;
}

MsStatus vae_encode_train(VaeTape *t, Arena *ar, const VaeParams *p, float *mean, float *logvar, const float *x,
                          int N, int H, int W) {
    MsStatus s;
    if (!ar || !p) return ms_errorf(MS_ERR_ARG, "vae_encode_train: no arena or parameters");
    if ((s = vt_build(t, ar, &p->cfg, p, 1, x, N, H, W, "vae_encode_train"))) return s;
    const int lat = p->cfg.latent_channels;
    const size_t P = (size_t)t->t[t->out].H * t->t[t->out].W;
    for (int b = 0; b < N; b++)
        split_moments(mean + (size_t)b * lat * P, logvar + (size_t)b * lat * P, t->t[t->out].v + (size_t)b * 2 * lat * P,
                      lat, P);
    return MS_OK;
}

MsStatus vae_decode_train(VaeTape *t, Arena *ar, const VaeParams *p, float *img, const float *z, int N, int h, int w) {
    MsStatus s;
    if (!ar || !p) return ms_errorf(MS_ERR_ARG, "vae_decode_train: no arena or parameters");
    if ((s = vt_build(t, ar, &p->cfg, p, 0, z, N, h, w, "vae_decode_train"))) return s;
    const VaeTapeTensor *o = &t->t[t->out];
    memcpy(img, o->v, (size_t)N * o->C * o->H * o->W * sizeof(float));
    return MS_OK;
}

/* the gradient buffer of the weight at offset off in dp (NULL for VT_NONE) */
static float *vt_grad(const VaeParams *dp, size_t off) {
    const MsParam *m = vt_field(dp, off);
    return m ? m->f32 : NULL;
}

/* dL/d(attention input) and the projections' weight gradients of a VT_ATTN op */
static void vt_attn_backward(const VaeTape *t, const VaeTapeOp *o, const VaeParams *dp) {
    const VaeTapeTensor *x = &t->t[o->x], *y = &t->t[o->out];
    const int C = x->C, T = x->H * x->W, N = t->N;
    const size_t n = (size_t)C * T;
    const VaeAttnParams *a = (const VaeAttnParams *)(const void *)((const char *)t->p + o->w - offsetof(VaeAttnParams, q_w));
    const VaeAttnParams *da = (const VaeAttnParams *)(const void *)((const char *)dp + o->w - offsetof(VaeAttnParams, q_w));
    const float *q = o->save, *k = q + N * n, *v = k + N * n, *ob = v + N * n, *lse = ob + N * n;
    float *d = (float *)lse + (size_t)N * T;   /* do, dq, dk, dv (planned with the op) */
    float *dob = d, *dq = d + N * n, *dk = dq + N * n, *dv = dk + N * n;
    memset(d, 0, 4 * N * n * sizeof(float));
    for (int b = 0; b < N; b++) {   /* y (C,T) = Wo o^T + bo */
        const float *dy = y->g + b * n;
        ms_gemm(0, 0, C, C, T, 1.0f, dy, T, ob + b * n, C, 1.0f, da->o_w->f32, C);        /* dWo += dy o */
        for (int c = 0; c < C; c++) {
            double s = 0.0;
            for (int i = 0; i < T; i++) s += dy[(size_t)c * T + i];
            da->o_b->f32[c] += (float)s;
        }
        ms_gemm(1, 0, T, C, C, 1.0f, dy, T, a->o_w->f32, C, 0.0f, dob + b * n, C);       /* do = dy^T Wo */
    }
    attention_backward(dq, dk, dv, dob, q, k, v, ob, lse, N, T, T, 1, C, 0, (float)pow((double)C, -0.5));
    const float *dp3[3] = { dq, dk, dv };
    const MsParam *w3[3] = { a->q_w, a->k_w, a->v_w };
    float *dw3[3] = { da->q_w->f32, da->k_w->f32, da->v_w->f32 }, *db3[3] = { da->q_b->f32, da->k_b->f32, da->v_b->f32 };
    for (int j = 0; j < 3; j++)
        for (int b = 0; b < N; b++) {   /* q (T,C) = x^T Wq^T + bq */
            const float *g = dp3[j] + b * n;
            ms_gemm(1, 1, C, C, T, 1.0f, g, C, x->v + b * n, T, 1.0f, dw3[j], C);          /* dWq += dq^T x^T */
            for (int c = 0; c < C; c++) {
                double s = 0.0;
                for (int i = 0; i < T; i++) s += g[(size_t)i * C + c];
                db3[j][c] += (float)s;
            }
            ms_gemm(1, 1, C, T, C, 1.0f, w3[j]->f32, C, g, C, 1.0f, x->g + b * n, T);      /* dx += Wq^T dq^T */
        }
}

/* Backward of the whole tape from the output gradient already in t->t[t->out].g. */
static MsStatus vt_backward(VaeTape *t, const VaeParams *dp, float *din, const char *what) {
    if (!t->ar || !t->op || t->plan || t->st)
        return ms_errorf(MS_ERR_ARG, "%s: no complete forward pass on this tape", what);
    if (!dp) return ms_errorf(MS_ERR_ARG, "%s: no gradient parameters", what);
    if (memcmp(&dp->cfg, &t->cfg, sizeof t->cfg))
        return ms_errorf(MS_ERR_ARG, "%s: the gradients belong to a different config", what);
    for (int i = 0; i < t->n_ops; i++) {   /* every gradient an f32 buffer (an attention op: all 8 tensors) */
        const VaeTapeOp *o = &t->op[i];
        static const size_t af[8] = { offsetof(VaeAttnParams, q_w), offsetof(VaeAttnParams, q_b),
                                      offsetof(VaeAttnParams, k_w), offsetof(VaeAttnParams, k_b),
                                      offsetof(VaeAttnParams, v_w), offsetof(VaeAttnParams, v_b),
                                      offsetof(VaeAttnParams, o_w), offsetof(VaeAttnParams, o_b) };
        const int nf = o->kind == VT_ATTN ? 8 : 2;
        for (int j = 0; j < nf; j++) {
            const size_t off = o->kind == VT_ATTN ? o->w - af[0] + af[j] : j ? o->b : o->w;
            const MsParam *m = vt_field(dp, off);
            if (off != VT_NONE && (!m || !m->f32))
                return ms_errorf(MS_ERR_UNSUPPORTED, "%s: the gradient of %s is not an f32 buffer", what,
                                 m ? m->name : "(missing)");
        }
    }
    for (int i = 0; i < t->n_t; i++)
        if (i != t->out) memset(t->t[i].g, 0, (size_t)t->N * t->t[i].C * t->t[i].H * t->t[i].W * sizeof(float));
    const int G = t->cfg.norm_num_groups, N = t->N;
    for (int i = t->n_ops - 1; i >= 0; i--) {
        const VaeTapeOp *o = &t->op[i];
        const VaeTapeTensor *x = &t->t[o->x], *y = &t->t[o->out];
        const size_t nx = (size_t)N * x->C * x->H * x->W;
        switch (o->kind) {
        case VT_CONV:
            conv2d_backward(x->g, vt_grad(dp, o->w), vt_grad(dp, o->b), y->g, x->v, vt_field(t->p, o->w)->f32, N, x->C,
                            y->C, x->H, x->W, o->k, o->s, o->pad[0], o->pad[1], o->pad[2], o->pad[3]);
            break;
        case VT_GN:
            groupnorm_backward(x->g, vt_grad(dp, o->w), vt_grad(dp, o->b), y->g, x->v, o->save, o->save + (size_t)N * G,
                               vt_field(t->p, o->w)->f32, N, x->C, x->H * x->W, G);
            break;
        case VT_SILU: silu_backward(x->g, y->g, x->v, nx); break;
        case VT_ADD: add_backward(x->g, t->t[o->y].g, y->g, nx); break;
        case VT_UP: upsample_nearest2x_backward(x->g, y->g, N, x->C, x->H, x->W); break;
        case VT_ATTN: vt_attn_backward(t, o, dp); break;
        }
    }
    const VaeTapeTensor *in = &t->t[t->in];
    if (din) add_forward(din, din, in->g, (size_t)N * in->C * in->H * in->W);
    return MS_OK;
}

MsStatus vae_encode_backward_full(VaeTape *t, const VaeParams *dp, float *dx, const float *dmean, const float *dlogvar) {
    if (!t->encode || !t->op) return ms_errorf(MS_ERR_ARG, "vae_encode_backward_full: the tape holds no encoder forward");
    const VaeTapeTensor *m = &t->t[t->out];
    const int lat = t->cfg.latent_channels;
    const size_t P = (size_t)m->H * m->W, nl = (size_t)lat * P;
    for (int b = 0; b < t->N; b++) {   /* moments = [mean; logvar before the clamp] */
        const float *mv = m->v + (size_t)b * 2 * nl;
        float *g = m->g + (size_t)b * 2 * nl;
        for (size_t i = 0; i < nl; i++) g[i] = dmean ? dmean[(size_t)b * nl + i] : 0.0f;
        for (size_t i = 0; i < nl; i++) {   /* torch.clamp passes the gradient where min <= v <= max */
            const float v = mv[nl + i];
            g[nl + i] = dlogvar && v >= -30.0f && v <= 20.0f ? dlogvar[(size_t)b * nl + i] : 0.0f;
        }
    }
    return vt_backward(t, dp, dx, "vae_encode_backward_full");
}

MsStatus vae_decode_backward_full(VaeTape *t, const VaeParams *dp, float *dz, const float *dimg) {
    if (t->encode || !t->op) return ms_errorf(MS_ERR_ARG, "vae_decode_backward_full: the tape holds no decoder forward");
    const VaeTapeTensor *o = &t->t[t->out];
    memcpy(o->g, dimg, (size_t)t->N * o->C * o->H * o->W * sizeof(float));
    return vt_backward(t, dp, dz, "vae_decode_backward_full");
}

void vae_posterior_sample_backward(float *dmean, float *dlogvar, const float *dlatents, const float *logvar,
                                   const float *noise, size_t n, float scale) {
    for (size_t i = 0; i < n; i++) {
        const float g = dlatents[i] * scale;
        if (dmean) dmean[i] += g;
        if (dlogvar) dlogvar[i] += g * noise[i] * 0.5f * expf(0.5f * logvar[i]);
    }
}

void vae_kl(float *kl, const float *mean, const float *logvar, int B, size_t m) {
    for (int b = 0; b < B; b++) {
        double s = 0.0;
        for (size_t i = (size_t)b * m; i < (size_t)(b + 1) * m; i++)
            s += (double)mean[i] * mean[i] + exp((double)logvar[i]) - 1.0 - logvar[i];
        kl[b] = (float)(0.5 * s);
    }
}

void vae_kl_backward(float *dmean, float *dlogvar, const float *dkl, const float *mean, const float *logvar, int B,
                     size_t m) {
    for (int b = 0; b < B; b++)
        for (size_t i = (size_t)b * m; i < (size_t)(b + 1) * m; i++) {
            if (dmean) dmean[i] += dkl[b] * mean[i];
            if (dlogvar) dlogvar[i] += dkl[b] * 0.5f * (expf(logvar[i]) - 1.0f);
        }
}
