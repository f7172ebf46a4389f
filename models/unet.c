/* models/unet.c — Stable Diffusion 1.x UNet: diffusers 0.19.3 UNet2DConditionModel, forward and
 * backward (to the context(s), to LoRA on every attention and, with unet_backward_full, to every
 * base parameter).
 *
 * Reference modules (diffusers 0.19.3, src/diffusers/models/): unet_2d_condition.py
 * (UNet2DConditionModel.forward), unet_2d_blocks.py (CrossAttnDownBlock2D, DownBlock2D,
 * UNetMidBlock2DCrossAttn, CrossAttnUpBlock2D, UpBlock2D), resnet.py (ResnetBlock2D,
 * Downsample2D, Upsample2D), transformer_2d.py (Transformer2DModel), attention.py
 * (BasicTransformerBlock, FeedForward, GEGLU), attention_processor.py (Attention + AttnProcessor),
 * embeddings.py (get_timestep_embedding, TimestepEmbedding). LoRA as Mix-of-Show's
 * LoRALinearLayer: y = W x + b + alpha * up(down(x)).
 *
 * Memory (STYLE §5): unet_sizes() plans two arenas, unet_acts_init() carves them once.
 *   training = 1: every layer output and what its backward needs is kept in `acts`:
 *     ResnetBlock2D      input (the previous layer's output), h1 = conv1(..) + temb, both
 *                        GroupNorm statistics. Recomputed in backward: norm1/norm2 outputs and
 *                        their SiLU (elementwise, from the input/h1 and the saved statistics).
 *     Transformer2DModel input, GroupNorm statistics, proj_in output. Recomputed: the GroupNorm.
 *     BasicTransformerBlock  h1 = x + attn1, h2 = h1 + attn2, LayerNorm statistics,
 *                        ff.net.0.proj output (GEGLU input); attention q, k, v, output and
 *                        per-row log-sum-exp (never the probabilities). Recomputed: norm1..3
 *                        outputs, LoRA down(x), the attention probabilities (in the op).
 *     conv_norm_out      statistics (the GroupNorm + SiLU are recomputed).
 *   training = 0: only the skip connections (down_block_res_samples) are kept; every other
 *     output lives in one of three rotating buffers, and a layer's internals in shared scratch.
 * No allocation happens in unet_forward/unet_backward.
 */
#include "mixshow.h"

#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define UNET_TF_GN_EPS 1e-6f      /* Transformer2DModel GroupNorm (hard-coded in diffusers) */
#define UNET_LN_EPS 1e-5f         /* BasicTransformerBlock LayerNorms (nn.LayerNorm default) */
#define UNET_MAX_DIM (1 << 16)    /* batch, latent side, context length */

static int is_cross_down(MsBlockType t) { return t == MS_BLOCK_CROSS_ATTN_DOWN; }
static int is_cross_up(MsBlockType t) { return t == MS_BLOCK_CROSS_ATTN_UP; }
static size_t zmax(size_t a, size_t b) { return a > b ? a : b; }
static size_t zmin(size_t a, size_t b) { return a < b ? a : b; }

/* ---------------------------------------------------------------------------------------- */
/* Parameters: every key looked up once                                                      */
/* ---------------------------------------------------------------------------------------- */
typedef struct { const MsParamTable *t; MsStatus st; } Look;

/* The parameter named by fmt, checking it holds numel values (f32, F16 or BF16). */
static const MsParam *look(Look *L, size_t numel, const char *fmt, ...) {
    char key[MS_KEY_MAX];
    va_list ap;
    if (L->st) return NULL;
    va_start(ap, fmt);
    int n = vsnprintf(key, sizeof key, fmt, ap);
    va_end(ap);
    if (n < 0 || (size_t)n >= sizeof key) {
        L->st = ms_errorf(MS_ERR_ARG, "unet: parameter key too long (%s...)", key);
        return NULL;
    }
    int i = ms_param_find(L->t, key);
    if (i < 0) {
        L->st = ms_errorf(MS_ERR_ARG, "unet: parameter '%s' is not in the table", key);
        return NULL;
    }
    const MsParam *p = &L->t->p[i];
    if (!p->f32 && !p->half) {
        L->st = ms_errorf(MS_ERR_ARG, "unet: parameter '%s' holds no data (not loaded)", key);
        return NULL;
    }
    if (p->numel != numel) {
        L->st = ms_errorf(MS_ERR_ARG, "unet: parameter '%s' has %zu values, expected %zu", key, p->numel, numel);
        return NULL;
    }
    return p;
}

static void look_resnet(Look *L, UNetResnetParams *r, const char *pre, int cin, int cout, int E, float osf) {
    r->cin = cin; r->cout = cout; r->out_scale = osf;
    r->norm1_w = look(L, (size_t)cin, "%snorm1.weight", pre);
    r->norm1_b = look(L, (size_t)cin, "%snorm1.bias", pre);
    r->conv1_w = look(L, (size_t)cout * cin * 9, "%sconv1.weight", pre);
    r->conv1_b = look(L, (size_t)cout, "%sconv1.bias", pre);
    r->temb_w = look(L, (size_t)cout * E, "%stime_emb_proj.weight", pre);
    r->temb_b = look(L, (size_t)cout, "%stime_emb_proj.bias", pre);
    r->norm2_w = look(L, (size_t)cout, "%snorm2.weight", pre);
    r->norm2_b = look(L, (size_t)cout, "%snorm2.bias", pre);
    r->conv2_w = look(L, (size_t)cout * cout * 9, "%sconv2.weight", pre);
    r->conv2_b = look(L, (size_t)cout, "%sconv2.bias", pre);
    r->short_w = r->short_b = NULL;
    if (cin != cout) {     /* ResnetBlock2D.use_in_shortcut = in_channels != out_channels */
        r->short_w = look(L, (size_t)cout * cin, "%sconv_shortcut.weight", pre);
        r->short_b = look(L, (size_t)cout, "%sconv_shortcut.bias", pre);
    }
}

static void look_attn(Look *L, UNetAttnParams *a, const char *blk, int which, int C, int Dc) {
    a->q_w = look(L, (size_t)C * C, "%s.attn%d.to_q.weight", blk, which);
    a->k_w = look(L, (size_t)C * Dc, "%s.attn%d.to_k.weight", blk, which);
    a->v_w = look(L, (size_t)C * Dc, "%s.attn%d.to_v.weight", blk, which);
    a->o_w = look(L, (size_t)C * C, "%s.attn%d.to_out.0.weight", blk, which);
    a->o_b = look(L, (size_t)C, "%s.attn%d.to_out.0.bias", blk, which);
}

static void look_transformer(Look *L, UNetParams *P, int it, const char *pre, int C, int heads, int layers) {
    UNetTransformerParams *t = &P->tf[it];
    const size_t C2 = (size_t)C * C;
    t->C = C; t->heads = heads; t->n_layers = layers; t->first_block = P->n_blk;
    t->norm_w = look(L, (size_t)C, "%snorm.weight", pre);
    t->norm_b = look(L, (size_t)C, "%snorm.bias", pre);
    t->proj_in_w = look(L, C2, "%sproj_in.weight", pre);
    t->proj_in_b = look(L, (size_t)C, "%sproj_in.bias", pre);
    t->proj_out_w = look(L, C2, "%sproj_out.weight", pre);
    t->proj_out_b = look(L, (size_t)C, "%sproj_out.bias", pre);
    for (int k = 0; k < layers; k++) {
        UNetBlockParams *b = &P->blk[P->n_blk++];
        const char *bn = b->name;
        snprintf(b->name, sizeof b->name, "%stransformer_blocks.%d", pre, k);
        b->norm1_w = look(L, (size_t)C, "%s.norm1.weight", bn);
        b->norm1_b = look(L, (size_t)C, "%s.norm1.bias", bn);
        b->norm2_w = look(L, (size_t)C, "%s.norm2.weight", bn);
        b->norm2_b = look(L, (size_t)C, "%s.norm2.bias", bn);
        b->norm3_w = look(L, (size_t)C, "%s.norm3.weight", bn);
        b->norm3_b = look(L, (size_t)C, "%s.norm3.bias", bn);
        look_attn(L, &b->attn1, bn, 1, C, C);
        look_attn(L, &b->attn2, bn, 2, C, P->cfg.cross_attention_dim);
        b->ff1_w = look(L, (size_t)8 * C2, "%s.ff.net.0.proj.weight", bn);
        b->ff1_b = look(L, (size_t)8 * C, "%s.ff.net.0.proj.bias", bn);
        b->ff2_w = look(L, (size_t)4 * C2, "%s.ff.net.2.weight", bn);
        b->ff2_b = look(L, (size_t)C, "%s.ff.net.2.bias", bn);
    }
}

MsStatus unet_params_init(UNetParams *P, const UNetConfig *c, const MsParamTable *t) {
    MsStatus s;
    memset(P, 0, sizeof *P);
    if ((s = ms_unet_config_check(c))) return s;
    if (c->mid_block_type != MS_BLOCK_MID_CROSS_ATTN)
        return ms_errorf(MS_ERR_UNSUPPORTED, "unet: mid_block_type %s (only UNetMidBlock2DCrossAttn)",
                         ms_block_type_name(c->mid_block_type));
    P->cfg = *c;
    const int n = c->n_blocks, L = c->layers_per_block, E = ms_unet_time_embed_dim(c);
    const int *ch = c->block_out_channels;
    int n_res = n * L + 2 + n * (L + 1), n_tf = 1, n_blk = c->transformer_layers_per_block[n - 1];
    for (int i = 0; i < n; i++) {
        if (is_cross_down(c->down_block_types[i])) { n_tf += L; n_blk += L * c->transformer_layers_per_block[i]; }
        if (is_cross_up(c->up_block_types[i])) {
            n_tf += L + 1;
            n_blk += (L + 1) * c->transformer_layers_per_block[n - 1 - i];
        }
    }
    size_t bytes = (size_t)n_res * sizeof(UNetResnetParams) + (size_t)n_tf * sizeof(UNetTransformerParams) +
                   (size_t)n_blk * sizeof(UNetBlockParams);
    P->mem = calloc(1, bytes);
    if (!P->mem) return ms_errorf(MS_ERR_NOMEM, "unet: no memory for the parameter index (%zu bytes)", bytes);
    P->res = (UNetResnetParams *)P->mem;
    P->tf = (UNetTransformerParams *)(P->res + n_res);
    P->blk = (UNetBlockParams *)(P->tf + n_tf);

    Look Lk = { t, MS_OK };
    char pre[MS_KEY_MAX];
    P->conv_in_w = look(&Lk, (size_t)ch[0] * c->in_channels * c->conv_in_kernel * c->conv_in_kernel, "conv_in.weight");
    P->conv_in_b = look(&Lk, (size_t)ch[0], "conv_in.bias");
    P->time1_w = look(&Lk, (size_t)E * ch[0], "time_embedding.linear_1.weight");
    P->time1_b = look(&Lk, (size_t)E, "time_embedding.linear_1.bias");
    P->time2_w = look(&Lk, (size_t)E * E, "time_embedding.linear_2.weight");
    P->time2_b = look(&Lk, (size_t)E, "time_embedding.linear_2.bias");
    int cin = ch[0];
    for (int i = 0; i < n; i++) {                         /* down blocks, forward order */
        int C = ch[i], cross = is_cross_down(c->down_block_types[i]);
        for (int j = 0; j < L; j++) {
            snprintf(pre, sizeof pre, "down_blocks.%d.resnets.%d.", i, j);
            look_resnet(&Lk, &P->res[P->n_res++], pre, j == 0 ? cin : C, C, E, 1.0f);
            if (cross) {
                snprintf(pre, sizeof pre, "down_blocks.%d.attentions.%d.", i, j);
                look_transformer(&Lk, P, P->n_tf++, pre, C, ms_unet_heads(c, i), c->transformer_layers_per_block[i]);
            }
        }
        if (i < n - 1) {
            P->down_w[i] = look(&Lk, (size_t)C * C * 9, "down_blocks.%d.downsamplers.0.conv.weight", i);
            P->down_b[i] = look(&Lk, (size_t)C, "down_blocks.%d.downsamplers.0.conv.bias", i);
        }
        cin = C;
    }
    {                                                     /* mid block */
        int C = ch[n - 1];
        look_resnet(&Lk, &P->res[P->n_res++], "mid_block.resnets.0.", C, C, E, c->mid_block_scale_factor);
        look_transformer(&Lk, P, P->n_tf++, "mid_block.attentions.0.", C, ms_unet_heads(c, n - 1),
                         c->transformer_layers_per_block[n - 1]);
        look_resnet(&Lk, &P->res[P->n_res++], "mid_block.resnets.1.", C, C, E, c->mid_block_scale_factor);
    }
    int prev = ch[n - 1];
    for (int i = 0; i < n; i++) {                         /* up blocks */
        int lv = n - 1 - i, C = ch[lv], cskip = ch[lv > 0 ? lv - 1 : 0], cross = is_cross_up(c->up_block_types[i]);
        for (int j = 0; j <= L; j++) {
            snprintf(pre, sizeof pre, "up_blocks.%d.resnets.%d.", i, j);
            look_resnet(&Lk, &P->res[P->n_res++], pre, (j == 0 ? prev : C) + (j == L ? cskip : C), C, E, 1.0f);
            if (cross) {
                snprintf(pre, sizeof pre, "up_blocks.%d.attentions.%d.", i, j);
                look_transformer(&Lk, P, P->n_tf++, pre, C, ms_unet_heads(c, lv), c->transformer_layers_per_block[lv]);
            }
        }
        if (i < n - 1) {
            P->up_w[i] = look(&Lk, (size_t)C * C * 9, "up_blocks.%d.upsamplers.0.conv.weight", i);
            P->up_b[i] = look(&Lk, (size_t)C, "up_blocks.%d.upsamplers.0.conv.bias", i);
        }
        prev = C;
    }
    P->norm_out_w = look(&Lk, (size_t)ch[0], "conv_norm_out.weight");
    P->norm_out_b = look(&Lk, (size_t)ch[0], "conv_norm_out.bias");
    P->conv_out_w = look(&Lk, (size_t)c->out_channels * ch[0] * c->conv_out_kernel * c->conv_out_kernel, "conv_out.weight");
    P->conv_out_b = look(&Lk, (size_t)c->out_channels, "conv_out.bias");
    if (Lk.st) { unet_params_free(P); return Lk.st; }
    if ((s = ms_weight_stage_init(&P->ws, t, NULL))) { unet_params_free(P); return s; }
    for (int i = 0; i < P->n_res; i++) P->res[i].ws = P->ws;      /* the layers read their own copy */
    for (int i = 0; i < P->n_tf; i++) P->tf[i].ws = P->ws;
    for (int i = 0; i < P->n_blk; i++) P->blk[i].ws = P->blk[i].attn1.ws = P->blk[i].attn2.ws = P->ws;
    return MS_OK;
}

void unet_params_free(UNetParams *P) {
    ms_weight_stage_free(&P->ws);
    free(P->mem);
    memset(P, 0, sizeof *P);
}

/* ---------------------------------------------------------------------------------------- */
/* LoRA                                                                                      */
/* ---------------------------------------------------------------------------------------- */
size_t unet_lora_floats(const UNetConfig *c, int rank) {
    const int n = c->n_blocks, L = c->layers_per_block, D = c->cross_attention_dim;
    size_t total = 0;     /* walk the config as unet_params_init does */
    for (int part = 0; part < 3; part++)
        for (int i = 0; i < (part == 1 ? 1 : n); i++) {
            int lv = part == 0 ? i : part == 1 ? n - 1 : n - 1 - i;
            int cross = part == 0 ? is_cross_down(c->down_block_types[i]) : part == 1 ? 1 : is_cross_up(c->up_block_types[i]);
            int ntf = part == 0 ? L : part == 1 ? 1 : L + 1;
            if (!cross) continue;
            size_t C = (size_t)c->block_out_channels[lv];
            size_t per_block = (size_t)rank * ((C + C) * 4          /* attn1: q, k, v, out */
                                               + (C + C) * 2 + (D + C) * 2);  /* attn2: q, out; k, v */
            total += (size_t)ntf * c->transformer_layers_per_block[lv] * per_block;
        }
    return total;
}

MsStatus unet_lora_init(UNetLora *l, const UNetParams *P, int rank, float alpha, Arena *train) {
    memset(l, 0, sizeof *l);
    if (rank < 1) return ms_errorf(MS_ERR_ARG, "unet lora: rank %d must be >= 1", rank);
    l->n_attn = 2 * P->n_blk;
    l->rank = rank;
    l->alpha = alpha;
    l->n_floats = unet_lora_floats(&P->cfg, rank);
    l->lin = (UNetLoraLinear *)arena_alloc(train, (size_t)l->n_attn * 4 * sizeof(UNetLoraLinear));
    l->data = arena_floats(train, l->n_floats);
    if (!l->lin || !l->data)
        return ms_errorf(MS_ERR_NOMEM, "unet lora: the train arena has no room for %zu floats", l->n_floats);
    memset(l->data, 0, l->n_floats * sizeof(float));
    float *d = l->data;
    for (int t = 0; t < P->n_tf; t++)
        for (int k = 0; k < P->tf[t].n_layers; k++) {
            int b = P->tf[t].first_block + k, C = P->tf[t].C;
            for (int m = 0; m < 8; m++) {         /* attn1 q k v out, attn2 q k v out */
                UNetLoraLinear *x = &l->lin[8 * b + m];
                x->out = C;
                x->in = (m == 5 || m == 6) ? P->cfg.cross_attention_dim : C;
                x->down = d; d += (size_t)rank * x->in;
                x->up = d; d += (size_t)x->out * rank;
            }
        }
    if ((size_t)(d - l->data) != l->n_floats)
        return ms_errorf(MS_ERR_ARG, "unet lora: %zu floats laid out, %zu planned", (size_t)(d - l->data), l->n_floats);
    return MS_OK;
}

void unet_lora_module_name(const UNetParams *P, int a, int which, char *buf, size_t cap) {
    static const char *const nm[4] = { "to_q", "to_k", "to_v", "to_out.0" };
    if (a < 0 || a >= 2 * P->n_blk || which < 0 || which > 3) { if (cap) buf[0] = '\0'; return; }
    snprintf(buf, cap, "%s.attn%d.%s", P->blk[a / 2].name, a % 2 + 1, nm[which]);
}

/* ---------------------------------------------------------------------------------------- */
/* 16-bit weights, converted when used                                                       */
/* ---------------------------------------------------------------------------------------- */
/* Design (issue: "weights may be kept in f16 in memory, converted when used"). Each layer reads
 * its weights through WT(p, field, slot) right before the op: for an f32 table that is the
 * table's own pointer (no copy; one branch per op), for F16/BF16 the values are converted
 * exactly into staging slot `slot` of p->ws (0: the op's matrix, 1: its bias or a norm weight,
 * 2: a norm bias) and the op runs on those f32 values, so results equal the f32 path on the
 * 16-bit-rounded weights bit for bit (tests/test_half.c). Only one matrix is live at a time,
 * so the staging is one largest tensor (SD 1.5: up_blocks.0.resnets.0.conv1, 29.5M floats,
 * 118 MB) instead of per-block f32 copies (a whole up resnet: 49M floats). Converting costs one
 * pass over the 16-bit weights per forward (860M values in SD 1.5, about 1 s on one core of a
 * 2020 laptop, against a UNet forward of tens of seconds at 512x512). */
#define WT(p, field, slot) ms_stage_f32(&(p)->ws, (p)->field, (slot))

/* The forward stages a large 16-bit matrix in slices (issue 14, peak memory): at most
 * unet_stage_slice floats of it (whole rows of W) are converted at a time, and the op runs per
 * slice on the matching output channels (conv, proj_out: rows of the GEMM) or output columns
 * (linear, proj_in: columns, through the GEMM's ldc). Each output element is still one GEMM sum
 * over the same K in the same order (ms_gemm_op's K slices are a function of K alone; the bias
 * is written first exactly as in linear_forward / conv2d_forward_pad), so the bits are those of
 * the unsliced op (tests/test_half.c forces tiny slices). Only the first slice's floats of the
 * staging buffer are ever written in inference: SD 1.5 touches 32 MiB of it instead of 112.5
 * (the backward still stages whole tensors). A conv slice repacks the image columns, so slices
 * are not smaller: measured 1 thread (host Xeon 6/207, loaded), 16 MiB slices cost 4-20% on the
 * 1280-channel 3x3 convs at 8x8..32x32, 32 MiB ones 0-9%. unet_ff_chunk: floats of the GEGLU
 * input g (rows of N*HW, 8C) computed at a time in inference, planned into the scratch by
 * unet_sizes; 24 MiB leaves SD 1.5's 16x16 and 8x8 levels whole (4 chunks at 64x64, 2 at 32x32). */
#define UNET_STAGE_SLICE ((size_t)8 << 20)
#define UNET_FF_CHUNK ((size_t)6 << 20)
static size_t unet_stage_slice = UNET_STAGE_SLICE;
static size_t unet_ff_chunk = UNET_FF_CHUNK;
void unet_set_chunks(size_t stage_floats, size_t ff_floats) {
    unet_stage_slice = stage_floats ? stage_floats : UNET_STAGE_SLICE;
    unet_ff_chunk = ff_floats ? ff_floats : UNET_FF_CHUNK;
}

/* Rows of `row` floats per slice of a staged 16-bit matrix of `rows` rows; rows when the table
 * is f32 or the matrix fits one slice. */
static int stage_rows(const MsParam *w, size_t row, int rows) {
    if (!w || w->f32 || !w->half || w->numel <= unet_stage_slice) return rows;
    size_t r = unet_stage_slice / row;
    return r < 1 ? 1 : r < (size_t)rows ? (int)r : rows;
}
/* Rows r0.. of the 16-bit matrix w (rows of `row` floats) into the staging matrix slot. */
static const float *stage_slice(const MsWeightStage *ws, const MsParam *w, size_t row, int r0, int nr) {
    ms_half_to_f32(ws->mat, w->half + (size_t)r0 * row, (size_t)nr * row, w->dtype);
    return ws->mat;
}

/* linear_forward(y, x, w, b, M, I, O) with w (O,I) and b from the table through ws. */
static void linear_fwd(const MsWeightStage *ws, float *y, const float *x, const MsParam *w, const MsParam *b,
                       int M, int I, int O) {
    int cols = stage_rows(w, (size_t)I, O);
    if (cols == O) { linear_forward(y, x, ms_stage_f32(ws, w, 0), ms_stage_f32(ws, b, 1), M, I, O); return; }
    const float *bf = ms_stage_f32(ws, b, 1);
    for (int o0 = 0; o0 < O; o0 += cols) {
        int no = O - o0 < cols ? O - o0 : cols;
        const float *ws0 = stage_slice(ws, w, (size_t)I, o0, no);
        if (bf)
            for (int r = 0; r < M; r++) memcpy(y + (size_t)r * O + o0, bf + o0, (size_t)no * sizeof(float));
        ms_gemm(0, 1, M, no, I, 1.0f, x, I, ws0, I, bf ? 1.0f : 0.0f, y + o0, O);
    }
}

/* conv2d_forward_pad with w (Co,Ci,k,k) and b from the table through ws. */
static void conv_fwd(const MsWeightStage *ws, float *out, const float *x, const MsParam *w, const MsParam *b,
                     int N, int Ci, int Co, int H, int W, int k, int s, int pt, int pl, int pb, int pr) {
    const size_t row = (size_t)Ci * k * k;
    int rows = stage_rows(w, row, Co);
    if (rows == Co) {
        conv2d_forward_pad(out, x, ms_stage_f32(ws, w, 0), ms_stage_f32(ws, b, 1), N, Ci, Co, H, W, k, s, pt, pl, pb, pr);
        return;
    }
    const size_t P = (size_t)((H + pt + pb - k) / s + 1) * ((W + pl + pr - k) / s + 1);
    const float *bf = ms_stage_f32(ws, b, 1);
    for (int c0 = 0; c0 < Co; c0 += rows) {             /* per image: conv2d_forward_pad's own loop */
        int nc = Co - c0 < rows ? Co - c0 : rows;
        const float *ws0 = stage_slice(ws, w, row, c0, nc);
        for (int n = 0; n < N; n++)
            conv2d_forward_pad(out + ((size_t)n * Co + c0) * P, x + (size_t)n * Ci * H * W, ws0, bf ? bf + c0 : NULL,
                               1, Ci, nc, H, W, k, s, pt, pl, pb, pr);
    }
}

/* The gradient buffer of a parameter in the gradient UNetParams dp (unet_backward_full: the same
 * type as the weights, f32); NULL when dp is NULL (frozen) or the layer has no such tensor. */
#define DW(dp, field) ((dp) && (dp)->field ? (dp)->field->f32 : NULL)

/* ---------------------------------------------------------------------------------------- */
/* Small pieces                                                                              */
/* ---------------------------------------------------------------------------------------- */
static void zero(float *x, size_t n) { memset(x, 0, n * sizeof(float)); }

/* The 1x1 projections of Transformer2DModel, with the NCHW <-> tokens permute folded in:
 *   proj_in:  tok[n] (P,C) = x[n]^T (P,Ci) W^T + b     (1x1 conv then permute(0,2,3,1), or
 *             permute then Linear with use_linear_projection: the same sums)
 *   proj_out: y[n] (C,P) = W (C,Ci) tok[n]^T + b        (Linear/1x1 conv, then back to NCHW) */
static void proj_in_forward(float *tok, const float *x, const MsWeightStage *ws, const MsParam *w, const MsParam *b,
                            int N, int Ci, int C, int P) {
    const int cols = stage_rows(w, (size_t)Ci, C);     /* output columns per staged slice of W */
    const float *bf = ms_stage_f32(ws, b, 1);
    for (int c0 = 0; c0 < C; c0 += cols) {
        int nc = C - c0 < cols ? C - c0 : cols;
        const float *wf = cols == C ? ms_stage_f32(ws, w, 0) : stage_slice(ws, w, (size_t)Ci, c0, nc);
        for (int n = 0; n < N; n++) {
            float *t = tok + (size_t)n * P * C + c0;
            ms_gemm(1, 1, P, nc, Ci, 1.0f, x + (size_t)n * Ci * P, P, wf, Ci, 0.0f, t, C);
            for (int r = 0; r < P; r++)
                for (int j = 0; j < nc; j++) t[(size_t)r * C + j] += bf[c0 + j];
        }
    }
}
/* dx[n] (Ci,P) += W^T (Ci,C) dtok[n]^T (C,P) */
static void proj_in_backward(float *dx, const float *dtok, const float *w, int N, int Ci, int C, int P) {
    for (int n = 0; n < N; n++)
        ms_gemm(1, 1, Ci, P, C, 1.0f, w, Ci, dtok + (size_t)n * P * C, C, 1.0f, dx + (size_t)n * Ci * P, P);
}
static void proj_out_forward(float *y, const float *tok, const MsWeightStage *ws, const MsParam *w, const MsParam *b,
                             int N, int Ci, int C, int P) {
    const int rows = stage_rows(w, (size_t)Ci, C);     /* output channels per staged slice of W */
    const float *bf = ms_stage_f32(ws, b, 1);
    for (int c0 = 0; c0 < C; c0 += rows) {
        int nc = C - c0 < rows ? C - c0 : rows;
        const float *wf = rows == C ? ms_stage_f32(ws, w, 0) : stage_slice(ws, w, (size_t)Ci, c0, nc);
        for (int n = 0; n < N; n++) {
            float *yn = y + ((size_t)n * C + c0) * P;
            ms_gemm(0, 1, nc, P, Ci, 1.0f, wf, Ci, tok + (size_t)n * P * Ci, Ci, 0.0f, yn, P);
            for (int c = 0; c < nc; c++)
                for (int q = 0; q < P; q++) yn[(size_t)c * P + q] += bf[c0 + c];
        }
    }
}
/* dtok[n] (P,Ci) += dy[n]^T (P,C) W (C,Ci) */
static void proj_out_backward(float *dtok, const float *dy, const float *w, int N, int Ci, int C, int P) {
    for (int n = 0; n < N; n++)
        ms_gemm(1, 0, P, Ci, C, 1.0f, dy + (size_t)n * C * P, P, w, Ci, 1.0f, dtok + (size_t)n * P * Ci, Ci);
}
/* Weight gradients (samples added in order n = 0..N-1; each GEMM splits outputs over threads):
 *   proj_in:  dW (C,Ci) += sum_n dtok[n]^T (C,P) x[n]^T (P,Ci),   db (C) += sum_{n,p} dtok[n,p,:]
 *   proj_out: dW (C,Ci) += sum_n dy[n] (C,P) tok[n] (P,Ci),       db (C) += sum_{n,p} dy[n,:,p] */
static void proj_in_wgrad(float *dw, float *db, const float *dtok, const float *x, int N, int Ci, int C, int P) {
    for (int n = 0; n < N; n++)
        ms_gemm(1, 1, C, Ci, P, 1.0f, dtok + (size_t)n * P * C, C, x + (size_t)n * Ci * P, P, 1.0f, dw, Ci);
    linear_backward(NULL, NULL, db, dtok, NULL, NULL, N * P, Ci, C);               /* column sums in double */
}
static void proj_out_wgrad(float *dw, float *db, const float *dy, const float *tok, int N, int Ci, int C, int P) {
    for (int n = 0; n < N; n++)
        ms_gemm(0, 0, C, Ci, P, 1.0f, dy + (size_t)n * C * P, P, tok + (size_t)n * P * Ci, Ci, 1.0f, dw, Ci);
    conv2d_backward(NULL, NULL, db, dy, NULL, NULL, N, Ci, C, P, 1, 1, 1, 0, 0, 0, 0);   /* per-channel sums */
}

/* torch nearest interpolation (upsample_nearest2d, size given, scales None), one axis:
 * src = min(floor(dst * (float)in / out), in - 1); exact shortcuts for out == in and 2 in. */
static int nearest_src(int dst, int in, int out) {
    if (out == in) return dst;
    if (out == 2 * in) return dst >> 1;
    float scale = (float)in / (float)out;
    int s = (int)floorf((float)dst * scale);
    return s < in - 1 ? s : in - 1;
}
/* Upsample2D's F.interpolate: x (N,C,H,W) -> out (N,C,Ho,Wo). diffusers passes the size of the
 * next skip tensor when the latent is not divisible by 2^upsamplers, else scale_factor 2. */
static void resize_nearest_forward(float *out, const float *x, int N, int C, int H, int W, int Ho, int Wo) {
    if (Ho == 2 * H && Wo == 2 * W) { upsample_nearest2x_forward(out, x, N, C, H, W); return; }
    for (size_t nc = 0; nc < (size_t)N * C; nc++)
        for (int y = 0; y < Ho; y++) {
            const float *xr = x + (nc * H + nearest_src(y, H, Ho)) * W;
            float *o = out + (nc * Ho + y) * Wo;
            for (int j = 0; j < Wo; j++) o[j] = xr[nearest_src(j, W, Wo)];
        }
}
/* dx[src] += dout[dst] over every dst that read src */
static void resize_nearest_backward(float *dx, const float *dout, int N, int C, int H, int W, int Ho, int Wo) {
    if (Ho == 2 * H && Wo == 2 * W) { upsample_nearest2x_backward(dx, dout, N, C, H, W); return; }
    for (size_t nc = 0; nc < (size_t)N * C; nc++)
        for (int y = 0; y < Ho; y++) {
            float *d = dx + (nc * H + nearest_src(y, H, Ho)) * W;
            const float *g = dout + (nc * Ho + y) * Wo;
            for (int j = 0; j < Wo; j++) d[nearest_src(j, W, Wo)] += g[j];
        }
}

/* LoRA on one Linear (Mix-of-Show LoRALinearLayer), x (M,I) -> y (M,O):
 *   u = x down^T (M,r),   y += alpha u up^T                       (u: scratch (M,r)) */
static void lora_forward(float *y, float *u, const float *x, const UNetLoraLinear *l, float alpha, int r, int M) {
    linear_forward(u, x, l->down, NULL, M, l->in, r);
    ms_gemm(0, 1, M, l->out, r, alpha, u, r, l->up, r, 1.0f, y, l->out);
}
/* Backward (u recomputed):
 *   dup   += alpha dy^T u          (O,r)
 *   du     = alpha dy up           (M,r)
 *   ddown += du^T x                (r,I)
 *   dx    += du down               (M,I)                          (NULL dx / dl: skipped) */
static void lora_backward(float *dx, UNetLoraLinear *dl, const float *dy, const float *x, const UNetLoraLinear *l,
                          float alpha, int r, int M, float *u, float *du) {
    if (dl) {
        linear_forward(u, x, l->down, NULL, M, l->in, r);
        ms_gemm(1, 0, l->out, r, M, alpha, dy, l->out, u, r, 1.0f, dl->up, r);
    }
    ms_gemm(0, 0, M, r, l->out, alpha, dy, l->out, l->up, r, 0.0f, du, r);
    if (dl) ms_gemm(1, 0, r, l->in, M, 1.0f, du, r, x, l->in, 1.0f, dl->down, l->in);
    if (dx) ms_gemm(0, 0, M, l->in, r, 1.0f, du, r, l->down, l->in, 1.0f, dx, l->in);
}

/* ---------------------------------------------------------------------------------------- */
/* ResnetBlock2D (resnet.py, time_embedding_norm "default", pre_norm, SiLU, no dropout)      */
/* ---------------------------------------------------------------------------------------- */
/* x (N,Cin,H,W), temb (N,E) = silu(time embedding) -> out (N,Co,H,W).
 * Scratch: s (N*max(Cin,Co)*H*W), tp (N*Co). */
static void unet_resnet_forward(float *out, UNetResnetActs *a, const float *x, const float *temb,
                                const UNetResnetParams *p, int N, int H, int W, int E, int G, float eps,
                                float *s, float *tp) {
    const int Ci = p->cin, Co = p->cout, P = H * W;
    groupnorm_forward(s, a->mean1, a->rstd1, x, WT(p, norm1_w, 1), WT(p, norm1_b, 2), N, Ci, P, G, eps);
    silu_forward(s, s, (size_t)N * Ci * P);
    conv_fwd(&p->ws, a->h1, s, p->conv1_w, p->conv1_b, N, Ci, Co, H, W, 3, 1, 1, 1, 1, 1);
    linear_fwd(&p->ws, tp, temb, p->temb_w, p->temb_b, N, E, Co);
    add_bias_nc(a->h1, tp, N, Co, P);                       /* h1 + temb[:, :, None, None] */
    groupnorm_forward(s, a->mean2, a->rstd2, a->h1, WT(p, norm2_w, 1), WT(p, norm2_b, 2), N, Co, P, G, eps);
    silu_forward(s, s, (size_t)N * Co * P);
    conv_fwd(&p->ws, out, s, p->conv2_w, p->conv2_b, N, Co, Co, H, W, 3, 1, 1, 1, 1, 1);
    if (p->short_w) {
        conv_fwd(&p->ws, s, x, p->short_w, p->short_b, N, Ci, Co, H, W, 1, 1, 0, 0, 0, 0);
        add_forward(out, s, out, (size_t)N * Co * P);       /* (shortcut(x) + h) */
    } else {
        add_forward(out, x, out, (size_t)N * Co * P);
    }
    if (p->out_scale != 1.0f)                               /* / output_scale_factor */
        for (size_t i = 0; i < (size_t)N * Co * P; i++) out[i] /= p->out_scale;
    a->x = x;
}

/* Backward, g = dout / osf, n1 = norm1(x), s1 = silu(n1), n2 = norm2(h1), s2 = silu(n2):
 *   dx += shortcut^T g  (or g)                      dW_short += g x^T, db_short += sum g
 *   ds2 = conv2^T g;  dn2 = ds2 * silu'(n2)          dW_conv2 += g s2^T, db_conv2 += sum g
 *   dh1 = GN2^T dn2                                  (dnorm2 weight/bias: groupnorm_backward)
 *   dtp[n,c] = sum_hw dh1;  dtemb += dtp W_temb      dW_temb += dtp^T temb, db_temb += sum_n dtp
 *   ds1 = conv1^T dh1; dn1 = ds1 * silu'(n1)         dW_conv1 += dh1 s1^T, db_conv1 += sum dh1
 *   dx += GN1^T dn1                                  (dnorm1 weight/bias)
 * dp NULL: weights frozen, no weight or time-embedding gradients (dtemb, temb, dtp unused).
 * n1, n2 (and s1, s2 for the weight gradients) are recomputed. Scratch s0, s1, s2
 * (N*max(Cin,Co)*H*W); dtp (N*Co). */
static void unet_resnet_backward(float *dx, const float *dout, const UNetResnetActs *a, const UNetResnetParams *p,
                                 const UNetResnetParams *dp, float *dtemb, const float *temb, float *dtp,
                                 int N, int H, int W, int E, int G, float eps, float *s0, float *s1, float *s2) {
    const int Ci = p->cin, Co = p->cout, P = H * W;
    const size_t no = (size_t)N * Co * P, ni = (size_t)N * Ci * P;
    const float *g = dout;
    if (p->out_scale != 1.0f) {                              /* d/dout of out = (.)/osf */
        for (size_t i = 0; i < no; i++) s2[i] = dout[i] / p->out_scale;
        g = s2;
    }
    if (p->short_w) conv2d_backward(dx, DW(dp, short_w), DW(dp, short_b), g, a->x, WT(p, short_w, 0), N, Ci, Co, H, W,
                                    1, 1, 0, 0, 0, 0);
    else add_forward(dx, dx, g, no);
    groupnorm_forward(s1, NULL, NULL, a->h1, WT(p, norm2_w, 1), WT(p, norm2_b, 2), N, Co, P, G, eps);         /* n2 */
    if (dp) {
        silu_forward(s0, s1, no);                                                              /* s2 */
        conv2d_backward(NULL, DW(dp, conv2_w), DW(dp, conv2_b), g, s0, NULL, N, Co, Co, H, W, 3, 1, 1, 1, 1, 1);
    }
    zero(s0, no);
    conv2d_backward(s0, NULL, NULL, g, NULL, WT(p, conv2_w, 0), N, Co, Co, H, W, 3, 1, 1, 1, 1, 1);   /* ds2 */
    zero(s2, no);
    silu_backward(s2, s0, s1, no);                                                             /* dn2 */
    zero(s0, no);
    groupnorm_backward(s0, DW(dp, norm2_w), DW(dp, norm2_b), s2, a->h1, a->mean2, a->rstd2, WT(p, norm2_w, 1),
                       N, Co, P, G);                                                           /* dh1 */
    groupnorm_forward(s2, NULL, NULL, a->x, WT(p, norm1_w, 1), WT(p, norm1_b, 2), N, Ci, P, G, eps);         /* n1 */
    if (dp) {
        zero(dtp, (size_t)N * Co);
        add_bias_nc_backward(dtp, s0, N, Co, P);
        linear_backward(dtemb, DW(dp, temb_w), DW(dp, temb_b), dtp, temb, WT(p, temb_w, 0), N, E, Co);
        silu_forward(s1, s2, ni);                                                              /* s1 */
        conv2d_backward(NULL, DW(dp, conv1_w), DW(dp, conv1_b), s0, s1, NULL, N, Ci, Co, H, W, 3, 1, 1, 1, 1, 1);
    }
    zero(s1, ni);
    conv2d_backward(s1, NULL, NULL, s0, NULL, WT(p, conv1_w, 0), N, Ci, Co, H, W, 3, 1, 1, 1, 1, 1);  /* ds1 */
    zero(s0, ni);
    silu_backward(s0, s1, s2, ni);                                                             /* dn1 */
    groupnorm_backward(dx, DW(dp, norm1_w), DW(dp, norm1_b), s0, a->x, a->mean1, a->rstd1, WT(p, norm1_w, 1),
                       N, Ci, P, G);
}

/* ---------------------------------------------------------------------------------------- */
/* Attention (attention_processor.Attention with AttnProcessor), LoRA on its four Linears    */
/* ---------------------------------------------------------------------------------------- */
/* x (N,Tq,C), c (N,Tk,Dc) -> y (N,Tq,C):
 *   q = x Wq^T, k = c Wk^T, v = c Wv^T (each + alpha up(down(.)) with LoRA),
 *   o = softmax(q_h k_h^T / sqrt(Dh)) v_h per head h (Dh = C / heads),  y = o Wo^T + bo (+ LoRA).
 * lora: NULL or lin[0..3] = to_q, to_k, to_v, to_out.0. u: scratch (N*max(Tq,Tk)*rank). */
static void unet_attention_forward(float *y, UNetAttnActs *sv, const float *x, const float *c,
                                   const UNetAttnParams *p, const UNetLoraLinear *lora, float alpha, int rank,
                                   float *u, int N, int Tq, int Tk, int C, int Dc, int heads) {
    const int Mq = N * Tq, Mk = N * Tk, Dh = C / heads;
    linear_fwd(&p->ws, sv->q, x, p->q_w, NULL, Mq, C, C);
    linear_fwd(&p->ws, sv->k, c, p->k_w, NULL, Mk, Dc, C);
    linear_fwd(&p->ws, sv->v, c, p->v_w, NULL, Mk, Dc, C);
    if (lora) {
        lora_forward(sv->q, u, x, &lora[0], alpha, rank, Mq);
        lora_forward(sv->k, u, c, &lora[1], alpha, rank, Mk);
        lora_forward(sv->v, u, c, &lora[2], alpha, rank, Mk);
    }
    attention_forward(sv->o, sv->lse, sv->q, sv->k, sv->v, N, Tq, Tk, heads, Dh, 0, (float)(1.0 / sqrt((double)Dh)));
    linear_fwd(&p->ws, y, sv->o, p->o_w, p->o_b, Mq, C, C);
    if (lora) lora_forward(y, u, sv->o, &lora[3], alpha, rank, Mq);
}

/* Backward, dy (N,Tq,C):
 *   do = dy Wo (+ LoRA),  (dq, dk, dv) = attention^T(do) (probabilities recomputed from lse),
 *   (dq, dk) += probs_cols^T(dprobe)  when the loss also read the probabilities (the probe),
 *   dx += dq Wq (+ LoRA),  dc += dk Wk + dv Wv (+ LoRA),  LoRA grads as lora_backward;
 *   dp (full-parameter training; NULL: frozen): dWo += dy^T o, dbo += sum dy, dWq += dq^T x,
 *   dWk += dk^T c, dWv += dv^T c.
 * dx and dc may be the same buffer (self-attention, c == x); dc NULL: not wanted.
 * dprobe (N,heads,Tq,ncol) at key positions cols (N,ncol), or NULL.
 * Scratch: sdo, sdq (N*Tq*C), sdk, sdv (N*Tk*C), u, du (N*max(Tq,Tk)*rank). */
static void unet_attention_backward(float *dx, float *dc, UNetLoraLinear *dlora, const UNetAttnParams *dp, const float *dy,
                                    const UNetAttnActs *sv, const float *x, const float *c,
                                    const UNetAttnParams *p, const UNetLoraLinear *lora, float alpha, int rank,
                                    int N, int Tq, int Tk, int C, int Dc, int heads,
                                    const float *dprobe, const int32_t *cols, int ncol,
                                    float *sdo, float *sdq, float *sdk, float *sdv, float *u, float *du) {
    const int Mq = N * Tq, Mk = N * Tk, Dh = C / heads;
    const int want_kv = dc || dlora || dp;
    zero(sdo, (size_t)Mq * C);
    linear_backward(sdo, DW(dp, o_w), DW(dp, o_b), dy, sv->o, WT(p, o_w, 0), Mq, C, C);
    if (lora) lora_backward(sdo, dlora ? &dlora[3] : NULL, dy, sv->o, &lora[3], alpha, rank, Mq, u, du);
    zero(sdq, (size_t)Mq * C);
    if (want_kv) { zero(sdk, (size_t)Mk * C); zero(sdv, (size_t)Mk * C); }
    attention_backward(sdq, want_kv ? sdk : NULL, want_kv ? sdv : NULL, sdo, sv->q, sv->k, sv->v, sv->o, sv->lse,
                       N, Tq, Tk, heads, Dh, 0, (float)(1.0 / sqrt((double)Dh)));
    if (dprobe)
        attention_probs_cols_backward(sdq, want_kv ? sdk : NULL, dprobe, sv->q, sv->k, sv->lse, cols, N, Tq, Tk,
                                      heads, Dh, ncol, (float)(1.0 / sqrt((double)Dh)));
    linear_backward(dx, DW(dp, q_w), NULL, sdq, x, WT(p, q_w, 0), Mq, C, C);
    if (lora) lora_backward(dx, dlora ? &dlora[0] : NULL, sdq, x, &lora[0], alpha, rank, Mq, u, du);
    if (!want_kv) return;
    if (dc || dp) {
        linear_backward(dc, DW(dp, k_w), NULL, sdk, c, WT(p, k_w, 0), Mk, Dc, C);
        linear_backward(dc, DW(dp, v_w), NULL, sdv, c, WT(p, v_w, 0), Mk, Dc, C);
    }
    if (lora) {
        lora_backward(dc, dlora ? &dlora[1] : NULL, sdk, c, &lora[1], alpha, rank, Mk, u, du);
        lora_backward(dc, dlora ? &dlora[2] : NULL, sdv, c, &lora[2], alpha, rank, Mk, u, du);
    }
}

/* ---- regional cross-attention (Mix-of-Show RegionT2I_AttnProcessor.region_rewrite; see
 * UNetRegions in mixshow.h). Work: cnt (T), done (T), k_r, v_r (N*Tk*C), gathered q, o (N*T*C). */
/* One part's work (batch parts, UNetActs.split: part g at g * part_floats, 16-float multiples). */
static size_t regions_work_part(const UNetConfig *c, int N, int h, int w, int Tk) {
    size_t best = 0;
    int lh = h, lw = w, pad = c->downsample_padding, extra = pad == 0 ? 1 : 2 * pad;
    for (int i = 0; i < c->n_blocks && lh > 0 && lw > 0; i++) {
        size_t T = (size_t)lh * lw, C = (size_t)c->block_out_channels[i];
        size_t need = 2 * T + 2 * (size_t)N * Tk * C + 2 * (size_t)N * T * C + 64;
        if (need > best) best = need;
        lh = (lh + extra - 3) / 2 + 1;
        lw = (lw + extra - 3) / 2 + 1;
    }
    return (best + 15) / 16 * 16;
}

/* The batch's need, or G parts' of N/G samples each for every G | N if more. */
size_t unet_regions_work_floats(const UNetConfig *c, int N, int h, int w, int Tk) {
    size_t best = regions_work_part(c, N, h, w, Tk);
    for (int G = 2; G <= N; G++)
        if (N % G == 0 && (size_t)G * regions_work_part(c, N / G, h, w, Tk) > best)
            best = (size_t)G * regions_work_part(c, N / G, h, w, Tk);
    return best;
}

void unet_region_rows(const double box[4], int fh, int fw, int *r0, int *c0, int *r1, int *c1) {
    double v[4] = { ceil(box[0] * fh), ceil(box[1] * fw), floor(box[2] * fh), floor(box[3] * fw) };
    const int lim[4] = { fh, fw, fh, fw };
    int o[4];
    for (int i = 0; i < 4; i++) o[i] = v[i] < 0 ? 0 : v[i] > lim[i] ? lim[i] : (int)v[i];   /* slice clamping */
    *r0 = o[0]; *c0 = o[1]; *r1 = o[2] > o[0] ? o[2] : o[0]; *c1 = o[3] > o[1] ? o[3] : o[1];
}

/* q (N,T,C) of the layer; o (N,T,C) receives the attention output (the input of to_out.0):
 *   pixels outside every box: the global attention of those queries with (k, v);
 *   inside: sum over regions r (in order) of attention(q_box, k_r, v_r) / cnt. */
static void unet_regional_attention(float *o, float *lse, const float *q, const float *k, const float *v,
                                    const UNetRegions *reg, const UNetAttnParams *p, const UNetLoraLinear *lora,
                                    float alpha, int rank, float *u, int N, int h, int w, int Tk, int C, int Dc,
                                    int heads, int layer) {
    const size_t T = (size_t)h * w;
    const int Dh = C / heads;
    const float scale = (float)(1.0 / sqrt((double)Dh));
    float *cnt = reg->work, *done = cnt + T, *kr = done + T, *vr = kr + (size_t)N * Tk * C;
    float *qg = vr + (size_t)N * Tk * C, *og = qg + (size_t)N * T * C;
    size_t covered = 0;
    zero(cnt, T);
    for (int r = 0; r < reg->n; r++) {
        int r0, c0, r1, c1;
        unet_region_rows(reg->box[r], h, w, &r0, &c0, &r1, &c1);
        for (int y = r0; y < r1; y++)
            for (int x = c0; x < c1; x++) cnt[(size_t)y * w + x] += 1.0f;
    }
    for (size_t t = 0; t < T; t++) covered += cnt[t] != 0.0f;
    /* global attention, only for the queries no box covers (the official one multiplies the
     * others by 1 - replace_ratio = 0) */
    if (covered == 0) {
        attention_forward(o, lse, q, k, v, N, (int)T, Tk, heads, Dh, 0, scale);
        return;
    }
    if (covered < T) {
        const size_t nu = T - covered;
        for (int n = 0; n < N; n++) {
            size_t j = 0;
            for (size_t t = 0; t < T; t++)
                if (cnt[t] == 0.0f) memcpy(qg + ((size_t)n * nu + j++) * C, q + ((size_t)n * T + t) * C, (size_t)C * sizeof(float));
        }
        attention_forward(og, NULL, qg, k, v, N, (int)nu, Tk, heads, Dh, 0, scale);
        for (int n = 0; n < N; n++) {
            size_t j = 0;
            for (size_t t = 0; t < T; t++)
                if (cnt[t] == 0.0f) memcpy(o + ((size_t)n * T + t) * C, og + ((size_t)n * nu + j++) * C, (size_t)C * sizeof(float));
        }
    }
    zero(done, T);
    for (int r = 0; r < reg->n; r++) {
        int r0, c0, r1, c1;
        unet_region_rows(reg->box[r], h, w, &r0, &c0, &r1, &c1);
        const int bh = r1 - r0, bw = c1 - c0, Mk = N * Tk;
        if (bh <= 0 || bw <= 0) continue;
        const size_t nb = (size_t)bh * bw;
        const float *cr = reg->ctx[reg->n_layer_ctx ? (size_t)r * reg->n_layer_ctx + layer : (size_t)r];
        linear_fwd(&p->ws, kr, cr, p->k_w, NULL, Mk, Dc, C);         /* region_key = attn.to_k(region) */
        linear_fwd(&p->ws, vr, cr, p->v_w, NULL, Mk, Dc, C);
        if (lora) {
            lora_forward(kr, u, cr, &lora[1], alpha, rank, Mk);
            lora_forward(vr, u, cr, &lora[2], alpha, rank, Mk);
        }
        for (int n = 0; n < N; n++)
            for (int y = 0; y < bh; y++)
                memcpy(qg + ((size_t)n * nb + (size_t)y * bw) * C, q + ((size_t)n * T + (size_t)(y + r0) * w + c0) * C,
                       (size_t)bw * C * sizeof(float));
        attention_forward(og, NULL, qg, kr, vr, N, (int)nb, Tk, heads, Dh, 0, scale);
        for (int n = 0; n < N; n++)
            for (int y = 0; y < bh; y++)
                for (int x = 0; x < bw; x++) {
                    const size_t t = (size_t)(y + r0) * w + x + c0;
                    const float *src = og + ((size_t)n * nb + (size_t)y * bw + x) * C;
                    float *dst = o + ((size_t)n * T + t) * C, c = cnt[t];
                    if (done[t] == 0.0f) for (int j = 0; j < C; j++) dst[j] = src[j] / c;   /* 0 * h + r / cnt */
                    else for (int j = 0; j < C; j++) dst[j] = dst[j] + src[j] / c;
                }
        for (int y = r0; y < r1; y++)
            for (int x = c0; x < c1; x++) done[(size_t)y * w + x] = 1.0f;
    }
}

/* The hook for regionally controllable sampling: every attn2 of the UNet is computed here. */
void unet_cross_attention(float *y, UNetAttnActs *sv, const float *x, const float *ctx,
                          const UNetAttnParams *p, const UNetLoraLinear *lora, float alpha, int rank,
                          float *u, int N, int h, int w, int Tk, int C, int Dc, int heads, int layer,
                          const UNetRegions *reg) {
    if (!reg || reg->n <= 0) {
        unet_attention_forward(y, sv, x, ctx, p, lora, alpha, rank, u, N, h * w, Tk, C, Dc, heads);
        return;
    }
    const int Mq = N * h * w, Mk = N * Tk;        /* unet_attention_forward with the regional step */
    linear_fwd(&p->ws, sv->q, x, p->q_w, NULL, Mq, C, C);
    linear_fwd(&p->ws, sv->k, ctx, p->k_w, NULL, Mk, Dc, C);
    linear_fwd(&p->ws, sv->v, ctx, p->v_w, NULL, Mk, Dc, C);
    if (lora) {
        lora_forward(sv->q, u, x, &lora[0], alpha, rank, Mq);
        lora_forward(sv->k, u, ctx, &lora[1], alpha, rank, Mk);
        lora_forward(sv->v, u, ctx, &lora[2], alpha, rank, Mk);
    }
    unet_regional_attention(sv->o, sv->lse, sv->q, sv->k, sv->v, reg, p, lora, alpha, rank, u, N, h, w, Tk, C, Dc,
                            heads, layer);
    linear_fwd(&p->ws, y, sv->o, p->o_w, p->o_b, Mq, C, C);
    if (lora) lora_forward(y, u, sv->o, &lora[3], alpha, rank, Mq);
}

/* Rows of the feed-forward computed at a time at width C: ff_chunk floats of g (N*HW, 8C) in
 * inference (at least one row), all M rows in training (g is kept whole for the backward). */
static int ff_rows(const UNetActs *a, int M, int C) {
    if (!a->ff_chunk) return M;
    size_t r = a->ff_chunk / ((size_t)8 * C);
    return r < 1 ? 1 : r < (size_t)M ? (int)r : M;
}

/* ---------------------------------------------------------------------------------------- */
/* BasicTransformerBlock (attention.py; norm_type "layer_norm", GEGLU feed-forward)          */
/* ---------------------------------------------------------------------------------------- */
/* x (N,T,C) -> a->out (N,T,C):
 *   h1 = x + attn1(norm1 x);  h2 = h1 + attn2(norm2 h1, ctx);  out = h2 + ff(norm3 h2),
 *   ff(n) = ff.net.2( GEGLU(ff.net.0.proj n) ),  GEGLU(g) = g[:, :4C] * gelu(g[:, 4C:]).
 * lora: NULL or the 8 adapters of this block (attn1 q k v out, attn2 q k v out).
 * Scratch: S->st[0] (norm outputs), S->sf1 (GEGLU output), S->su; in inference the
 * feed-forward runs in chunks of ff_rows() rows (its g and GEGLU output are per-chunk scratch). */
static void unet_block_forward(UNetBlockActs *a, const float *x, const float *ctx, const UNetBlockParams *p,
                               const UNetLoraLinear *lora, float alpha, int rank, int N, int h, int w, int Tk,
                               int C, int D, int heads, int layer, const UNetActs *S) {
    const int T = h * w, M = N * T;
    const size_t n = (size_t)M * C;
    float *nrm = S->st[0];
    layernorm_forward(nrm, a->mean[0], a->rstd[0], x, WT(p, norm1_w, 1), WT(p, norm1_b, 2), M, C, UNET_LN_EPS);
    if (S->record) S->record(S->record_ctx, layer, 0, nrm, (size_t)M, C);   /* gradient fusion's hooks */
    unet_attention_forward(a->h1, &a->a1, nrm, nrm, &p->attn1, lora, alpha, rank, S->su, N, T, T, C, C, heads);
    if (S->record) S->record(S->record_ctx, layer, 1, a->a1.o, (size_t)M, C);
    add_forward(a->h1, a->h1, x, n);                       /* attn_output + hidden_states */
    layernorm_forward(nrm, a->mean[1], a->rstd[1], a->h1, WT(p, norm2_w, 1), WT(p, norm2_b, 2), M, C, UNET_LN_EPS);
    if (S->record) S->record(S->record_ctx, layer, 2, nrm, (size_t)M, C);
    unet_cross_attention(a->h2, &a->a2, nrm, ctx, &p->attn2, lora ? lora + 4 : NULL, alpha, rank, S->su,
                         N, h, w, Tk, C, D, heads, layer, S->regions);
    if (S->record) S->record(S->record_ctx, layer, 3, a->a2.o, (size_t)M, C);
    if (S->probe_ncol > 0 && S->probe && S->probe[layer])  /* the softmax at the probed keys (training) */
        attention_probs_cols_forward(S->probe[layer], a->a2.q, a->a2.k, a->a2.lse, S->probe_cols, N, T, Tk, heads,
                                     C / heads, S->probe_ncol, (float)(1.0 / sqrt((double)(C / heads))));
    add_forward(a->h2, a->h2, a->h1, n);
    layernorm_forward(nrm, a->mean[2], a->rstd[2], a->h2, WT(p, norm3_w, 1), WT(p, norm3_b, 2), M, C, UNET_LN_EPS);
    const int R = ff_rows(S, M, C);                        /* rows per chunk (inference); M in training */
    for (int r0 = 0; r0 < M; r0 += R) {                    /* row by row ops: the same bits in any chunks */
        int nr = M - r0 < R ? M - r0 : R;
        linear_fwd(&p->ws, a->g, nrm + (size_t)r0 * C, p->ff1_w, p->ff1_b, nr, C, 8 * C);
        geglu_forward(S->sf1, a->g, nr, 4 * C);
        linear_fwd(&p->ws, a->out + (size_t)r0 * C, S->sf1, p->ff2_w, p->ff2_b, nr, 4 * C, C);
    }
    add_forward(a->out, a->out, a->h2, n);                 /* ff_output + hidden_states */
}

/* Backward along the residual stream R (dout -> dh2 -> dh1 -> dx), dx += R at the end:
 *   ff:    dg = GEGLU^T(ff.net.2^T dout),   R += LN3^T(ff.net.0.proj^T dg)
 *   attn2: R += LN2^T(attn2^T_x R)          (dctx += attn2^T_ctx R, LoRA grads)
 *   attn1: R += LN1^T(attn1^T_x R)          (x feeds q, k and v)
 * norm1..3 outputs are recomputed from x, h1, h2 and the saved statistics; so is the GEGLU
 * input g = ff.net.0.proj(norm3 h2) (not kept: the forward's own ops, so bit-identical).
 * dp (NULL: frozen): every weight gradient of the block; ff.net.2's input GEGLU(g) is recomputed.
 * Scratch: st[0] = R, st[1] = d(norm output), st[2] = norm output, sg = g, sf0/sf1, so/sq/sk/sv, su/sdu. */
static void unet_block_backward(float *dx, float *dctx, UNetLoraLinear *dlora, const UNetBlockParams *dp, const float *dout,
                                const UNetBlockActs *a, const float *ctx, const UNetBlockParams *p,
                                const UNetLoraLinear *lora, float alpha, int rank, int N, int T, int Tk,
                                int C, int D, int heads, int layer, const UNetActs *S) {
    const int M = N * T;
    const size_t n = (size_t)M * C;
    float *R = S->st[0], *dn = S->st[1], *nrm = S->st[2];
    memcpy(R, dout, n * sizeof(float));
    layernorm_forward(nrm, NULL, NULL, a->h2, WT(p, norm3_w, 1), WT(p, norm3_b, 2), M, C, UNET_LN_EPS);
    linear_forward(a->g, nrm, WT(p, ff1_w, 0), WT(p, ff1_b, 1), M, C, 8 * C);    /* g, as the forward made it */
    if (dp) {
        geglu_forward(S->sf1, a->g, M, 4 * C);
        linear_backward(NULL, DW(dp, ff2_w), DW(dp, ff2_b), dout, S->sf1, NULL, M, 4 * C, C);
    }
    zero(S->sf1, (size_t)M * 4 * C);
    linear_backward(S->sf1, NULL, NULL, dout, NULL, WT(p, ff2_w, 0), M, 4 * C, C);
    zero(S->sf0, (size_t)M * 8 * C);
    geglu_backward(S->sf0, S->sf1, a->g, M, 4 * C);
    zero(dn, n);
    linear_backward(dn, DW(dp, ff1_w), DW(dp, ff1_b), S->sf0, nrm, WT(p, ff1_w, 0), M, C, 8 * C);
    layernorm_backward(R, DW(dp, norm3_w), DW(dp, norm3_b), dn, a->h2, a->mean[2], a->rstd[2], WT(p, norm3_w, 1), M, C);

    layernorm_forward(nrm, NULL, NULL, a->h1, WT(p, norm2_w, 1), WT(p, norm2_b, 2), M, C, UNET_LN_EPS);
    zero(dn, n);
    const float *dprobe = S->probe_ncol > 0 && S->dprobe ? S->dprobe[layer] : NULL;
    unet_attention_backward(dn, dctx, dlora ? dlora + 4 : NULL, dp ? &dp->attn2 : NULL, R, &a->a2, nrm, ctx, &p->attn2,
                            lora ? lora + 4 : NULL, alpha, rank, N, T, Tk, C, D, heads,
                            dprobe, S->probe_cols, S->probe_ncol, S->so, S->sq, S->sk, S->sv, S->su, S->sdu);
    layernorm_backward(R, DW(dp, norm2_w), DW(dp, norm2_b), dn, a->h1, a->mean[1], a->rstd[1], WT(p, norm2_w, 1), M, C);

    layernorm_forward(nrm, NULL, NULL, a->x, WT(p, norm1_w, 1), WT(p, norm1_b, 2), M, C, UNET_LN_EPS);
    zero(dn, n);
    unet_attention_backward(dn, dn, dlora, dp ? &dp->attn1 : NULL, R, &a->a1, nrm, nrm, &p->attn1, lora, alpha, rank,
                            N, T, T, C, C,
                            heads, NULL, NULL, 0, S->so, S->sq, S->sk, S->sv, S->su, S->sdu);
    layernorm_backward(R, DW(dp, norm1_w), DW(dp, norm1_b), dn, a->x, a->mean[0], a->rstd[0], WT(p, norm1_w, 1), M, C);
    add_forward(dx, dx, R, n);
}

/* ---------------------------------------------------------------------------------------- */
/* Transformer2DModel (transformer_2d.py, continuous input)                                  */
/* ---------------------------------------------------------------------------------------- */
/* The context of cross-attention layer `layer`. */
static const float *layer_context(const float *ctx, const float *const *layer_ctx, int layer) {
    return layer_ctx ? layer_ctx[layer] : ctx;
}

/* x (N,C,H,W) -> a->out = x + proj_out(blocks(proj_in(GroupNorm(x)))), blocks on tokens (N,HW,C).
 * ba: the acts of its p->n_layers blocks; bp: their params. */
static void unet_transformer_forward(UNetTfActs *a, UNetBlockActs *ba, const float *x, const float *ctx,
                                     const float *const *layer_ctx, const UNetTransformerParams *p,
                                     const UNetBlockParams *bp, const UNetLora *lora, int N, int G, int Tk,
                                     int D, const UNetActs *S) {
    const int H = a->H, W = a->W, P = H * W, C = p->C;
    float *gn = S->sx[0];
    a->x = x;
    groupnorm_forward(gn, a->mean, a->rstd, x, WT(p, norm_w, 1), WT(p, norm_b, 2), N, C, P, G, UNET_TF_GN_EPS);
    proj_in_forward(a->tok, gn, &p->ws, p->proj_in_w, p->proj_in_b, N, C, C, P);
    const float *h = a->tok;
    for (int k = 0; k < p->n_layers; k++) {
        int b = p->first_block + k;
        unet_block_forward(&ba[k], h, layer_context(ctx, layer_ctx, b), &bp[k], lora ? &lora->lin[8 * b] : NULL,
                           lora ? lora->alpha : 0.0f, lora ? lora->rank : 0, N, H, W, Tk, C, D, p->heads, b, S);
        h = ba[k].out;
    }
    proj_out_forward(a->out, h, &p->ws, p->proj_out_w, p->proj_out_b, N, C, C, P);
    add_forward(a->out, a->out, x, (size_t)N * C * P);     /* output = hidden_states + residual */
}

/* dx += dout + GN^T(proj_in^T(blocks^T(proj_out^T dout))). dp, dbp (NULL: frozen): the weight
 * gradients of the transformer and of its blocks; proj_out's input is the last block's output
 * (kept), proj_in's the GroupNorm output (recomputed). Scratch: sx[0..2] (and the blocks'). */
static void unet_transformer_backward(float *dx, float *dctx, float *const *dlayer_ctx, UNetLora *dlora,
                                      const UNetTransformerParams *dp, const UNetBlockParams *dbp,
                                      const float *dout, const UNetTfActs *a, const UNetBlockActs *ba,
                                      const float *ctx, const float *const *layer_ctx,
                                      const UNetTransformerParams *p, const UNetBlockParams *bp,
                                      const UNetLora *lora, int N, int G, int Tk, int D, const UNetActs *S) {
    const int P = a->H * a->W, C = p->C;
    const size_t n = (size_t)N * C * P;
    float *dt = S->sx[1], *dt2 = S->sx[2];
    add_forward(dx, dx, dout, n);
    zero(dt, n);
    proj_out_backward(dt, dout, WT(p, proj_out_w, 0), N, C, C, P);
    if (dp) proj_out_wgrad(DW(dp, proj_out_w), DW(dp, proj_out_b), dout, ba[p->n_layers - 1].out, N, C, C, P);
    for (int k = p->n_layers - 1; k >= 0; k--) {
        int b = p->first_block + k;
        zero(dt2, n);
        unet_block_backward(dt2, dlayer_ctx ? dlayer_ctx[b] : dctx, dlora ? &dlora->lin[8 * b] : NULL,
                            dbp ? &dbp[k] : NULL, dt, &ba[k],
                            layer_context(ctx, layer_ctx, b), &bp[k], lora ? &lora->lin[8 * b] : NULL,
                            lora ? lora->alpha : 0.0f, lora ? lora->rank : 0, N, P, Tk, C, D, p->heads, b, S);
        float *tmp = dt; dt = dt2; dt2 = tmp;
    }
    float *dgn = S->sx[0];
    zero(dgn, n);
    proj_in_backward(dgn, dt, WT(p, proj_in_w, 0), N, C, C, P);
    if (dp) {
        groupnorm_forward(dt2, NULL, NULL, a->x, WT(p, norm_w, 1), WT(p, norm_b, 2), N, C, P, G, UNET_TF_GN_EPS);
        proj_in_wgrad(DW(dp, proj_in_w), DW(dp, proj_in_b), dt, dt2, N, C, C, P);
    }
    groupnorm_backward(dx, DW(dp, norm_w), DW(dp, norm_b), dgn, a->x, a->mean, a->rstd, WT(p, norm_w, 1), N, C, P, G);
}

/* ---------------------------------------------------------------------------------------- */
/* Planning and carving the activations                                                      */
/* ---------------------------------------------------------------------------------------- */
typedef struct { Arena *a; size_t bytes; int fail; } Carve;   /* a == NULL: count only */

static float *carve(Carve *c, size_t n) {
    size_t b;
    if (n == 0) n = 1;
    if (!ms_mul_ok(n, sizeof(float), &b) || !ms_add_ok(b, 63, &b) || !ms_add_ok(c->bytes, b & ~(size_t)63, &c->bytes)) {
        c->fail = 1;
        return NULL;
    }
    if (!c->a) return NULL;
    float *p = arena_floats(c->a, n);
    if (!p) c->fail = 1;
    return p;
}

/* Floats in skip tensor k (push order: conv_in output, then per down block i its L layer
 * outputs at level i and, except for the last block, its downsampler output at level i + 1). */
static size_t skip_numel(const UNetActs *a, int k) {
    const int L = a->cfg.layers_per_block;
    if (k == 0) return (size_t)a->N * a->cfg.block_out_channels[0] * a->lh[0] * a->lw[0];
    int i = (k - 1) / (L + 1), j = (k - 1) % (L + 1), lv = j < L ? i : i + 1;
    return (size_t)a->N * a->cfg.block_out_channels[i] * a->lh[lv] * a->lw[lv];
}

typedef struct {
    UNetActs *a;
    Carve *keep;     /* the acts arena */
    int r;           /* next rotating buffer (inference) */
} Lay;
/* A layer output: kept (training, or a skip connection) or the next rotating buffer. */
static float *lay_out(Lay *L, size_t n, int skip) {
    if (L->a->training || skip) return carve(L->keep, n);
    return L->a->rot[L->r++ % 3];
}
/* Saved for backward in training; shared scratch in inference. */
static float *lay_save(Lay *L, size_t n, float *shared) { return L->a->training ? carve(L->keep, n) : shared; }

static void lay_resnet(Lay *L, UNetResnetActs *r, int cout, int H, int W, int skip) {
    UNetActs *a = L->a;
    size_t N = (size_t)a->N, G = (size_t)a->cfg.norm_num_groups;
    r->H = H; r->W = W;
    r->h1 = lay_save(L, N * cout * H * W, a->sx[1]);
    r->mean1 = lay_save(L, N * G, a->sstat[0]); r->rstd1 = lay_save(L, N * G, a->sstat[1]);
    r->mean2 = lay_save(L, N * G, a->sstat[2]); r->rstd2 = lay_save(L, N * G, a->sstat[3]);
    r->out = lay_out(L, N * cout * H * W, skip);
}

static void lay_attn(Lay *L, UNetAttnActs *s, size_t M, size_t Mk, int C, int heads) {
    UNetActs *a = L->a;
    s->q = lay_save(L, M * C, a->sq); s->k = lay_save(L, Mk * C, a->sk);
    s->v = lay_save(L, Mk * C, a->sv); s->o = lay_save(L, M * C, a->so);
    s->lse = a->training ? carve(L->keep, M * heads) : NULL;
}

static void lay_transformer(Lay *L, UNetTfActs *t, UNetBlockActs *ba, int C, int heads, int layers, int H, int W,
                            int skip) {
    UNetActs *a = L->a;
    size_t N = (size_t)a->N, G = (size_t)a->cfg.norm_num_groups, M = N * H * W, n = M * C;
    t->H = H; t->W = W;
    t->mean = lay_save(L, N * G, a->sstat[0]); t->rstd = lay_save(L, N * G, a->sstat[1]);
    t->tok = lay_save(L, n, a->st[1]);
    const float *x = t->tok;
    for (int k = 0; k < layers; k++) {
        UNetBlockActs *b = &ba[k];
        /* inference: tokens alternate between st[1] and st[2] (h1 and out in the other one) */
        float *xs = (x == a->st[1] || x == a->st[2]) ? (float *)x : a->st[1];
        float *other = xs == a->st[1] ? a->st[2] : a->st[1];
        b->x = x;
        b->h1 = lay_save(L, n, other);
        b->h2 = lay_save(L, n, xs);
        for (int m = 0; m < 3; m++) { b->mean[m] = lay_save(L, M, a->sstat[m]); b->rstd[m] = lay_save(L, M, a->sstat[m] + M); }
        lay_attn(L, &b->a1, M, M, C, heads);
        lay_attn(L, &b->a2, M, N * a->Tk, C, heads);
        b->g = a->training ? a->sg : a->sf0;      /* training: recomputed in backward, not kept */
        b->out = lay_save(L, n, other);
        x = b->out;
    }
    t->out = lay_out(L, n, skip);
}

/* Sizes of the shared scratch, from the config (every site that uses them is covered):
 * X  = largest (N,C,H,W) activation incl. up-block concatenations and conv_in/conv_out;
 * XT = largest (N,HW,C) token tensor; QKV = largest (N,max(HW,Tk),C); F = largest (N,HW,8C),
 * in inference the largest (ff_rows,8C) chunk of it. */
typedef struct { size_t X, XT, QKV, F, stat, time; } ScratchPlan;

static int plan_scratch(const UNetActs *a, ScratchPlan *sp) {
    const UNetConfig *c = &a->cfg;
    const int n = c->n_blocks, L = c->layers_per_block, *ch = c->block_out_channels;
    const size_t N = (size_t)a->N;
    size_t P0 = (size_t)a->lh[0] * a->lw[0], cmax = 0;
    memset(sp, 0, sizeof *sp);
    sp->X = N * P0 * zmax((size_t)ch[0], zmax((size_t)c->in_channels, (size_t)c->out_channels));
    for (int i = 0; i < n; i++) {
        size_t P = (size_t)a->lh[i] * a->lw[i], C = (size_t)ch[i], cin = (size_t)ch[i > 0 ? i - 1 : 0];
        cmax = zmax(cmax, C);
        sp->X = zmax(sp->X, N * P * zmax(C, cin));
        if (i < n - 1) sp->X = zmax(sp->X, N * (size_t)a->lh[i + 1] * a->lw[i + 1] * C);
        int lv = n - 1 - i;
        size_t Pl = (size_t)a->lh[lv] * a->lw[lv], Cl = (size_t)ch[lv], prev = (size_t)ch[lv < n - 1 ? lv + 1 : n - 1];
        size_t cskip = (size_t)ch[lv > 0 ? lv - 1 : 0];
        for (int j = 0; j <= L; j++)
            sp->X = zmax(sp->X, N * Pl * ((j == 0 ? prev : Cl) + (j == L ? cskip : Cl)));
        if (lv > 0) sp->X = zmax(sp->X, N * (size_t)a->lh[lv - 1] * a->lw[lv - 1] * Cl);
        int attn = is_cross_down(c->down_block_types[i]) || is_cross_up(c->up_block_types[n - 1 - i]) || i == n - 1;
        if (attn) {
            sp->XT = zmax(sp->XT, N * P * C);
            sp->QKV = zmax(sp->QKV, N * zmax(P, (size_t)a->Tk) * C);
            sp->F = zmax(sp->F, (size_t)ff_rows(a, (int)zmin(N * P, 0x7fffffff), (int)C) * 8 * C);
        }
    }
    sp->stat = zmax(N * (size_t)c->norm_num_groups, 2 * N * P0);
    /* forward: e0 (C0), e1 (E), tp (cmax); training also the time backward (unet_time_backward) */
    sp->time = N * ((size_t)ch[0] + (a->training ? 6 : 2) * (size_t)ms_unet_time_embed_dim(c) + cmax);
    /* every element count must fit the ops' int arguments */
    size_t lim = (size_t)0x7fffffff;
    return sp->X < lim && sp->F < lim && sp->QKV < lim;
}

static MsStatus unet_acts_setup(UNetActs *a, const UNetConfig *c, int N, int h, int w, int Tk, int training);
static MsStatus unet_layout(UNetActs *a, Arena *acts, Arena *scratch, size_t *acts_bytes, size_t *scratch_bytes);

/* Batch parts (UNetActs.split): the activations of N/G samples, G of them side by side from
 * the start of the batch's ranges. A part's feed-forward chunk is the batch's / G, so that G
 * parts need about what the batch does (its other buffers scale with N). */
static MsStatus part_setup(UNetActs *q, const UNetActs *a, int G) {
    MsStatus s = unet_acts_setup(q, &a->cfg, a->N / G, a->H, a->W, a->Tk, 0);
    if (s) return s;
    q->is_part = 1;
    q->ff_chunk = a->ff_chunk ? (a->ff_chunk / (size_t)G ? a->ff_chunk / (size_t)G : 1) : 0;
    return MS_OK;
}

/* need[k]: bytes of range k (acts, scratch) that every split G | N, G >= 2, needs: G parts. */
static MsStatus parts_need(const UNetActs *a, size_t need[2]) {
    need[0] = need[1] = 0;
    for (int G = 2; G <= a->N; G++) {
        if (a->N % G) continue;
        UNetActs q;
        MsStatus s = part_setup(&q, a, G);
        if (!s) s = unet_layout(&q, NULL, NULL, NULL, NULL);
        for (int k = 0; k < 2 && !s; k++) {
            size_t b;
            if (!ms_mul_ok(q.range_len[k], (size_t)G, &b)) s = ms_errorf(MS_ERR_ARG, "unet: batch %d is too large", a->N);
            else if (b > need[k]) need[k] = b;
        }
        unet_acts_free(&q);
        if (s) return s;
    }
    return MS_OK;
}

static MsStatus unet_layout(UNetActs *a, Arena *acts, Arena *scratch, size_t *acts_bytes, size_t *scratch_bytes) {
    const UNetConfig *c = &a->cfg;
    const int n = c->n_blocks, L = c->layers_per_block, *ch = c->block_out_channels;
    const size_t N = (size_t)a->N;
    ScratchPlan sp;
    if (!plan_scratch(a, &sp))
        return ms_errorf(MS_ERR_ARG, "unet: batch %d at %dx%d is too large (a tensor exceeds 2^31 elements)",
                         a->N, a->H, a->W);
    Carve ks = { scratch, 0, 0 }, ka = { acts, 0, 0 };
    for (int k = 0; k < 3; k++) { a->sx[k] = carve(&ks, sp.X); a->st[k] = carve(&ks, sp.XT); a->rot[k] = carve(&ks, sp.X); }
    a->sq = carve(&ks, sp.QKV); a->sk = carve(&ks, sp.QKV); a->sv = carve(&ks, sp.QKV); a->so = carve(&ks, sp.QKV);
    a->su = carve(&ks, sp.QKV); a->sdu = carve(&ks, sp.QKV);
    a->sf0 = carve(&ks, sp.F); a->sf1 = carve(&ks, sp.F / 2);
    a->sg = a->training ? carve(&ks, sp.F) : NULL;          /* the GEGLU input, recomputed in backward */
    a->stime = carve(&ks, sp.time);
    for (int k = 0; k < 4; k++) a->sstat[k] = carve(&ks, sp.stat);

    Lay Ly = { a, &ka, 0 };
    Lay *Lp = &Ly;
    int ir = 0, it = 0, ib = 0, s = 0, ic = 0;
    a->temb = carve(&ka, N * (size_t)ms_unet_time_embed_dim(c));
    a->x0 = carve(&ka, N * ch[0] * a->lh[0] * a->lw[0]);
    a->skip[s++] = a->x0;
    for (int i = 0; i < n; i++) {
        int cross = is_cross_down(c->down_block_types[i]), H = a->lh[i], W = a->lw[i];
        for (int j = 0; j < L; j++) {
            lay_resnet(Lp, &a->res[ir], ch[i], H, W, !cross);
            a->skip[s] = a->res[ir++].out;
            if (cross) {
                int layers = c->transformer_layers_per_block[i];
                lay_transformer(Lp, &a->tf[it], &a->blk[ib], ch[i], ms_unet_heads(c, i), layers, H, W, 1);
                a->skip[s] = a->tf[it++].out;
                ib += layers;
            }
            s++;
        }
        if (i < n - 1) a->skip[s++] = carve(&ka, N * ch[i] * a->lh[i + 1] * a->lw[i + 1]);
        a->down_out[i] = a->skip[s - 1];
    }
    {
        int H = a->lh[n - 1], W = a->lw[n - 1], layers = c->transformer_layers_per_block[n - 1];
        lay_resnet(Lp, &a->res[ir++], ch[n - 1], H, W, 0);
        lay_transformer(Lp, &a->tf[it++], &a->blk[ib], ch[n - 1], ms_unet_heads(c, n - 1), layers, H, W, 0);
        ib += layers;
        lay_resnet(Lp, &a->res[ir], ch[n - 1], H, W, 0);
        a->mid_out = a->res[ir++].out;
    }
    int prev = ch[n - 1];
    for (int i = 0; i < n; i++) {
        int lv = n - 1 - i, C = ch[lv], H = a->lh[lv], W = a->lw[lv], cross = is_cross_up(c->up_block_types[i]);
        int cskip = ch[lv > 0 ? lv - 1 : 0];
        float *h = NULL;
        for (int j = 0; j <= L; j++) {
            a->cat[ic++] = lay_out(Lp, N * (size_t)((j == 0 ? prev : C) + (j == L ? cskip : C)) * H * W, 0);
            lay_resnet(Lp, &a->res[ir], C, H, W, 0);
            h = a->res[ir++].out;
            if (cross) {
                int layers = c->transformer_layers_per_block[lv];
                lay_transformer(Lp, &a->tf[it], &a->blk[ib], C, ms_unet_heads(c, lv), layers, H, W, 0);
                h = a->tf[it++].out;
                ib += layers;
            }
        }
        a->up_out[i] = i < n - 1 ? lay_out(Lp, N * C * a->lh[lv - 1] * a->lw[lv - 1], 0) : h;
        prev = C;
    }
    a->out_mean = lay_save(Lp, N * c->norm_num_groups, a->sstat[0]);
    a->out_rstd = lay_save(Lp, N * c->norm_num_groups, a->sstat[1]);
    if (a->training)     /* the gradient of each skip tensor */
        for (int k = 0; k < a->n_skip; k++) a->dskip[k] = carve(&ka, skip_numel(a, k));
    if (!a->training && !a->is_part && a->N >= 2 && !ka.fail && !ks.fail) {
        size_t need[2];                                    /* batch parts: room for the largest split */
        MsStatus s2 = parts_need(a, need);
        if (s2) return s2;
        if (need[0] > ka.bytes) carve(&ka, (need[0] - ka.bytes) / sizeof(float));
        if (need[1] > ks.bytes) carve(&ks, (need[1] - ks.bytes) / sizeof(float));
    }
    a->range[0] = (unsigned char *)a->temb;                /* the first carve of each arena */
    a->range[1] = (unsigned char *)a->sx[0];
    a->range_len[0] = ka.bytes;
    a->range_len[1] = ks.bytes;
    if (acts_bytes) *acts_bytes = ka.bytes + 64;
    if (scratch_bytes) *scratch_bytes = ks.bytes + 64;
    if (ka.fail || ks.fail)
        return ms_errorf(MS_ERR_NOMEM, "unet: activations need %zu + %zu bytes; the arenas (%zu, %zu free) are "
                         "too small (plan them with unet_sizes)", ka.bytes + 64, ks.bytes + 64,
                         acts ? acts->cap - acts->used : 0, scratch ? scratch->cap - scratch->used : 0);
    return MS_OK;
}

/* Fills the dims and the malloc'ed arrays of a (no arena yet). */
static MsStatus unet_acts_setup(UNetActs *a, const UNetConfig *c, int N, int h, int w, int Tk, int training) {
    MsStatus s;
    memset(a, 0, sizeof *a);
    if ((s = ms_unet_config_check(c))) return s;
    if (c->mid_block_type != MS_BLOCK_MID_CROSS_ATTN)
        return ms_errorf(MS_ERR_UNSUPPORTED, "unet: mid_block_type %s (only UNetMidBlock2DCrossAttn)",
                         ms_block_type_name(c->mid_block_type));
    if (N < 1 || N > UNET_MAX_DIM || h < 1 || h > UNET_MAX_DIM || w < 1 || w > UNET_MAX_DIM || Tk < 1 || Tk > UNET_MAX_DIM)
        return ms_errorf(MS_ERR_ARG, "unet: batch %d, latent %dx%d, context length %d: each must be in [1, %d]",
                         N, h, w, Tk, UNET_MAX_DIM);
    a->cfg = *c;
    a->N = N; a->H = h; a->W = w; a->Tk = Tk; a->training = training ? 1 : 0;
    a->ff_chunk = a->training ? 0 : unet_ff_chunk;
    const int n = c->n_blocks, L = c->layers_per_block;
    /* Downsample2D: 3x3 stride 2, padding p (p == 0: F.pad (0,1,0,1) first) */
    int pad = c->downsample_padding, extra = pad == 0 ? 1 : 2 * pad;
    a->lh[0] = h; a->lw[0] = w;
    for (int i = 1; i < n; i++) {
        a->lh[i] = (a->lh[i - 1] + extra - 3) / 2 + 1;
        a->lw[i] = (a->lw[i - 1] + extra - 3) / 2 + 1;
        if (a->lh[i] < 1 || a->lw[i] < 1)
            return ms_errorf(MS_ERR_ARG, "unet: latent %dx%d is too small for %d levels", h, w, n);
    }
    int n_res = n * L + 2 + n * (L + 1), n_tf = 1, n_blk = c->transformer_layers_per_block[n - 1];
    for (int i = 0; i < n; i++) {
        if (is_cross_down(c->down_block_types[i])) { n_tf += L; n_blk += L * c->transformer_layers_per_block[i]; }
        if (is_cross_up(c->up_block_types[i])) { n_tf += L + 1; n_blk += (L + 1) * c->transformer_layers_per_block[n - 1 - i]; }
    }
    a->n_skip = n * (L + 1);
    size_t bytes = (size_t)n_res * sizeof(UNetResnetActs) + (size_t)n_tf * sizeof(UNetTfActs) +
                   (size_t)n_blk * sizeof(UNetBlockActs) + (size_t)(3 * a->n_skip + 1) * sizeof(float *);
    a->mem = calloc(1, bytes);
    if (!a->mem) return ms_errorf(MS_ERR_NOMEM, "unet: no memory for the activation index (%zu bytes)", bytes);
    a->res = (UNetResnetActs *)a->mem;
    a->tf = (UNetTfActs *)(a->res + n_res);
    a->blk = (UNetBlockActs *)(a->tf + n_tf);
    a->skip = (float **)(a->blk + n_blk);
    a->cat = a->skip + a->n_skip;
    a->dskip = a->cat + a->n_skip;
    return MS_OK;
}

MsStatus unet_sizes(const UNetConfig *c, int N, int h, int w, int Tk, int training, UNetSizes *sz) {
    UNetActs a;
    MsStatus s = unet_acts_setup(&a, c, N, h, w, Tk, training);
    memset(sz, 0, sizeof *sz);
    if (!s) s = unet_layout(&a, NULL, NULL, &sz->acts_bytes, &sz->scratch_bytes);
    unet_acts_free(&a);
    return s;
}

MsStatus unet_acts_init(UNetActs *a, const UNetConfig *c, int N, int h, int w, int Tk, int training,
                        Arena *acts, Arena *scratch) {
    MsStatus s = unet_acts_setup(a, c, N, h, w, Tk, training);
    if (!s) s = unet_layout(a, acts, scratch, NULL, NULL);
    if (s) unet_acts_free(a);
    return s;
}

static void parts_free(UNetActs *a);
void unet_acts_free(UNetActs *a) {
    parts_free(a);
    free(a->mem);
    memset(a, 0, sizeof *a);
}

/* Cross-attention layers in Mix-of-Show's order: down blocks (L transformers each), the mid
 * block, up blocks (L + 1 each), transformer_layers_per_block[level] layers per transformer. */
MsStatus unet_probe_shape(const UNetActs *a, int layer, int *heads, int *h, int *w) {
    const UNetConfig *c = &a->cfg;
    const int n = c->n_blocks, L = c->layers_per_block;
    int k = 0;
    for (int part = 0; part < 3; part++)
        for (int i = 0; i < (part == 1 ? 1 : n); i++) {
            int lv = part == 0 ? i : part == 1 ? n - 1 : n - 1 - i;
            int cross = part == 0 ? is_cross_down(c->down_block_types[i]) : part == 1 ? 1 : is_cross_up(c->up_block_types[i]);
            int m = !cross ? 0 : (part == 0 ? L : part == 1 ? 1 : L + 1) * c->transformer_layers_per_block[lv];
            if (layer >= k && layer < k + m) {
                *heads = ms_unet_heads(c, lv); *h = a->lh[lv]; *w = a->lw[lv];
                return MS_OK;
            }
            k += m;
        }
    return ms_errorf(MS_ERR_ARG, "unet_probe_shape: layer %d outside [0, %d)", layer, k);
}

/* The probe settings the forward/backward will read (UNetActs.probe_*). */
static MsStatus check_probe(const UNetActs *a, const char *fn) {
    if (a->probe_ncol <= 0) return MS_OK;
    if (!a->training)
        return ms_errorf(MS_ERR_ARG, "%s: the attention probe needs training-mode activations (probe_ncol %d)", fn,
                         a->probe_ncol);
    if (a->probe_ncol > a->Tk)
        return ms_errorf(MS_ERR_ARG, "%s: probe_ncol %d exceeds the context length %d", fn, a->probe_ncol, a->Tk);
    if (!a->probe_cols) return ms_errorf(MS_ERR_ARG, "%s: probe_ncol %d but probe_cols is NULL", fn, a->probe_ncol);
    for (int i = 0; i < a->N * a->probe_ncol; i++)
        if (a->probe_cols[i] < 0 || a->probe_cols[i] >= a->Tk)
            return ms_errorf(MS_ERR_ARG, "%s: probe_cols[%d][%d] = %d, expected a key position in [0, %d)", fn,
                             i / a->probe_ncol, i % a->probe_ncol, (int)a->probe_cols[i], a->Tk);
    return MS_OK;
}

/* ---------------------------------------------------------------------------------------- */
/* UNet2DConditionModel.forward                                                              */
/* ---------------------------------------------------------------------------------------- */
static MsStatus check_lora(const UNetLora *l, const UNetParams *p, const char *what) {
    if (!l) return MS_OK;
    if (l->n_attn != 2 * p->n_blk || !l->lin)
        return ms_errorf(MS_ERR_ARG, "unet: %s has %d attention modules, the model %d", what, l->n_attn, 2 * p->n_blk);
    for (int t = 0; t < p->n_tf; t++)
        if (l->rank > p->tf[t].C)
            return ms_errorf(MS_ERR_ARG, "unet: %s rank %d exceeds the width %d of %s", what, l->rank, p->tf[t].C,
                             p->blk[p->tf[t].first_block].name);
    return MS_OK;
}

/* ---- Batch parts (UNetActs.split) --------------------------------------------------------
 * T threads, N % T == 0: part g is samples [g N/T, (g+1) N/T) of every input and of eps, run
 * by unet_forward itself on the part's activations (a->parts[g]) in task g (ms_run_tasks).
 * Every op computes each element in the same order for any batch size, so eps is the batched
 * forward's bit for bit (tests/test_unet.c checks it). */
typedef struct {
    const float **lctx, **adapter;      /* the part's pointers into layer_ctx and adapter */
    UNetRegions reg;                    /* regions: the part's contexts and work */
    const float **rctx;                 /* reg.ctx (rcap pointers, grown in serial code) */
    size_t rcap;
    MsStatus s;
    char err[256];                      /* ms_last_error() of the task's thread */
} UNetPartIO;

typedef struct {
    UNetActs *a;
    float *eps;
    const float *x, *t, *ctx;
    const float *const *layer_ctx, *const *adapter;
    const UNetParams *p;
    const UNetLora *lora;
    int G;
} UNetSplit;

/* Steps smaller than this (N x latent pixels x block_out_channels[0]^2; a step is about 2000
 * FLOPs per unit: tiny-sd at 8x8 131k, at 32x32 2.1M, SD 1.5 at 64x64 839M) run whole: there
 * the ops are mostly too small to split, which also keeps a step off a core another process
 * holds; a step in parts would put half of it there before the load check (every 0.1 s)
 * notices (bench --under-load, tiny 8x8: 1.5x the 1-thread time). */
#define UNET_SPLIT_MIN_WORK 1e6

/* The number of parts for this call: T when the caller allows it, the step is large enough,
 * and nothing shared is written. */
static int split_parts(const UNetActs *a, const UNetParams *p) {
    if (!a->split || a->is_part || a->training || a->record || a->N < 2 || p->ws.mem) return 1;
    const double c0 = a->cfg.block_out_channels[0];
    if ((double)a->N * a->H * a->W * c0 * c0 < UNET_SPLIT_MIN_WORK) return 1;
    int T = ms_task_team();
    return T >= 2 && a->N % T == 0 ? T : 1;
}

/* Floats per sample of T2I-Adapter residual i (where unet_forward adds it). */
static size_t adapter_per_sample(const UNetActs *a, int i) {
    const UNetConfig *c = &a->cfg;
    int n = c->n_blocks, lv = is_cross_down(c->down_block_types[i]) ? i : i + (i < n - 1);
    return (size_t)c->block_out_channels[i] * a->lh[lv] * a->lw[lv];
}

static void parts_free(UNetActs *a) {
    for (int g = 0; g < a->nparts; g++) free(((UNetPartIO *)a->parts_mem)[g].rctx);
    for (int g = 0; g < a->nparts; g++) unet_acts_free(&a->parts[g]);
    free(a->parts);
    free(a->parts_mem);
    a->parts = NULL; a->parts_mem = NULL; a->nparts = 0;
}

/* a->parts: G part layouts, part g at offset g * (its bytes) of each of a's ranges. */
static MsStatus parts_prepare(UNetActs *a, int G) {
    if (a->nparts == G) return MS_OK;
    parts_free(a);
    const int nl = ms_unet_cross_attn_layers(&a->cfg), nb = a->cfg.n_blocks;
    UNetActs *q = (UNetActs *)calloc((size_t)G, sizeof *q);
    UNetPartIO *io = (UNetPartIO *)calloc((size_t)G, sizeof *io + (size_t)(nl + nb) * sizeof(float *));
    if (!q || !io) { free(q); free(io); return ms_errorf(MS_ERR_NOMEM, "unet: no memory for %d batch parts", G); }
    a->parts = q; a->parts_mem = io; a->nparts = G;
    const float **ptr = (const float **)(io + G);
    MsStatus s = MS_OK;
    for (int g = 0; g < G && !s; g++) {
        io[g].lctx = ptr + (size_t)g * (nl + nb);
        io[g].adapter = io[g].lctx + nl;
        if ((s = part_setup(&q[g], a, G)) || (s = unet_layout(&q[g], NULL, NULL, NULL, NULL))) break;
        Arena v[2];
        for (int k = 0; k < 2; k++) {
            size_t len = q[g].range_len[k];
            if (len > a->range_len[k] / (size_t)G) {
                s = ms_errorf(MS_ERR_ARG, "unet: %d batch parts need %zu bytes, the layout has %zu", G,
                              len * (size_t)G, a->range_len[k]);
                break;
            }
            v[k].base = a->range[k] + (size_t)g * len;
            v[k].used = 0; v[k].cap = len; v[k].mem = NULL;
        }
        if (!s) s = unet_layout(&q[g], &v[0], &v[1], NULL, NULL);
    }
    if (s) parts_free(a);
    return s;
}

/* Room for the regions' context pointers in every part (before the tasks: they only fill it). */
static MsStatus parts_regions(UNetActs *a) {
    if (!a->regions) return MS_OK;
    size_t nr = (size_t)a->regions->n * (a->regions->n_layer_ctx ? (size_t)a->regions->n_layer_ctx : 1);
    for (int g = 0; g < a->nparts; g++) {
        UNetPartIO *io = (UNetPartIO *)a->parts_mem + g;
        if (io->rcap >= nr) continue;
        const float **r = (const float **)realloc((void *)io->rctx, (nr ? nr : 1) * sizeof *r);
        if (!r) return ms_errorf(MS_ERR_NOMEM, "unet: no memory for %zu region contexts", nr);
        io->rctx = r;
        io->rcap = nr;
    }
    return MS_OK;
}

static void unet_part_task(void *v, int g) {
    UNetSplit *u = (UNetSplit *)v;
    UNetActs *a = u->a;
    UNetPartIO *io = (UNetPartIO *)a->parts_mem + g;
    const UNetConfig *c = &a->cfg;
    const size_t off = (size_t)g * (size_t)(a->N / u->G), hw = (size_t)a->H * a->W;
    const size_t nctx = (size_t)a->Tk * c->cross_attention_dim;
    const int nl = ms_unet_cross_attn_layers(c);
    if (u->layer_ctx)
        for (int l = 0; l < nl; l++) io->lctx[l] = u->layer_ctx[l] ? u->layer_ctx[l] + off * nctx : NULL;
    if (u->adapter)
        for (int i = 0; i < c->n_blocks; i++) io->adapter[i] = u->adapter[i] ? u->adapter[i] + off * adapter_per_sample(a, i) : NULL;
    a->parts[g].regions = NULL;
    if (a->regions) {                                   /* the same boxes; the part's contexts and work */
        const UNetRegions *R = a->regions;
        size_t nr = (size_t)R->n * (R->n_layer_ctx ? (size_t)R->n_layer_ctx : 1);
        for (size_t k = 0; k < nr; k++) io->rctx[k] = R->ctx[k] ? R->ctx[k] + off * nctx : NULL;
        io->reg = *R;
        io->reg.ctx = io->rctx;
        io->reg.work = R->work + (size_t)g * regions_work_part(c, a->N / u->G, a->H, a->W, a->Tk);
        a->parts[g].regions = &io->reg;
    }
    io->s = unet_forward(u->eps + off * c->out_channels * hw, &a->parts[g], u->x + off * c->in_channels * hw, u->t + off,
                         u->ctx ? u->ctx + off * nctx : NULL, u->layer_ctx ? (const float *const *)io->lctx : NULL,
                         u->adapter ? (const float *const *)io->adapter : NULL, u->p, u->lora);
    if (io->s) snprintf(io->err, sizeof io->err, "%s", ms_last_error());
}

MsStatus unet_forward(float *eps, UNetActs *a, const float *x, const float *t, const float *ctx,
                      const float *const *layer_ctx, const float *const *adapter,
                      const UNetParams *p, const UNetLora *lora) {
    const UNetConfig *c = &a->cfg;
    const int n = c->n_blocks, L = c->layers_per_block, N = a->N, G = c->norm_num_groups, Tk = a->Tk;
    const int E = ms_unet_time_embed_dim(c), D = c->cross_attention_dim, *ch = c->block_out_channels;
    const float eps_n = c->norm_eps;
    MsStatus s;
    if (!ctx && !layer_ctx) return ms_errorf(MS_ERR_ARG, "unet_forward: no context (ctx and layer_ctx are NULL)");
    if (!a->mem || memcmp(&a->cfg, &p->cfg, sizeof a->cfg))
        return ms_errorf(MS_ERR_ARG, "unet_forward: activations and parameters belong to different configs");
    if ((s = check_lora(lora, p, "lora"))) return s;
    if ((s = check_probe(a, "unet_forward"))) return s;
    if (a->regions && (a->training || !a->regions->work || !a->regions->box || !a->regions->ctx || a->regions->n < 0 ||
                       (a->regions->n_layer_ctx && a->regions->n_layer_ctx != ms_unet_cross_attn_layers(c))))
        return ms_errorf(MS_ERR_ARG, "unet_forward: regional attention needs inference-mode activations, work, boxes, "
                         "and contexts for 0 or %d layers", ms_unet_cross_attn_layers(c));
    a->ctx = ctx;
    a->layer_ctx = layer_ctx;
    a->xin = x;
    a->tin = t;
    {
        const int G = split_parts(a, p);
        if (G > 1) {
            UNetSplit u = { a, eps, x, t, ctx, layer_ctx, adapter, p, lora, G };
            if ((s = parts_prepare(a, G)) || (s = parts_regions(a))) return s;
            ms_run_tasks(G, unet_part_task, &u);
            for (int g = 0; g < G; g++) {
                const UNetPartIO *io = (const UNetPartIO *)a->parts_mem + g;
                if (io->s) return ms_errorf(io->s, "%s", io->err);
            }
            return MS_OK;
        }
    }

    /* time: [cos | sin] sinusoidal embedding (float32) -> linear_1 -> SiLU -> linear_2; every
     * resnet then applies its own SiLU before time_emb_proj, done once here */
    float *e0 = a->stime, *e1 = a->stime + (size_t)N * ch[0];
    timestep_embedding_forward(e0, t, N, ch[0], c->flip_sin_to_cos, (float)c->freq_shift, 10000);
    linear_fwd(&p->ws, e1, e0, p->time1_w, p->time1_b, N, ch[0], E);
    silu_forward(e1, e1, (size_t)N * E);
    linear_fwd(&p->ws, a->temb, e1, p->time2_w, p->time2_b, N, E, E);
    silu_forward(a->temb, a->temb, (size_t)N * E);
    float *tp = e1 + (size_t)N * E;                       /* (N, Co) time projections */

    const float *in = x;
    if (c->center_input_sample) {                          /* sample = 2 * sample - 1.0 */
        size_t m = (size_t)N * c->in_channels * a->H * a->W;
        for (size_t i = 0; i < m; i++) a->sx[1][i] = 2.0f * x[i] - 1.0f;
        in = a->sx[1];
    }
    const int pin = (c->conv_in_kernel - 1) / 2, pout = (c->conv_out_kernel - 1) / 2;
    conv_fwd(&p->ws, a->x0, in, p->conv_in_w, p->conv_in_b, N, c->in_channels, ch[0], a->H, a->W, c->conv_in_kernel, 1,
             pin, pin, pin, pin);

    int ir = 0, it = 0, s_i = 1, ic = 0;
    const float *h = a->x0;
    for (int i = 0; i < n; i++) {                          /* down blocks */
        int H = a->lh[i], W = a->lw[i], C = ch[i], cross = is_cross_down(c->down_block_types[i]);
        for (int j = 0; j < L; j++) {
            unet_resnet_forward(a->res[ir].out, &a->res[ir], h, a->temb, &p->res[ir], N, H, W, E, G, eps_n, a->sx[0], tp);
            h = a->res[ir++].out;
            if (cross) {
                unet_transformer_forward(&a->tf[it], &a->blk[p->tf[it].first_block], h, ctx, layer_ctx, &p->tf[it],
                                         &p->blk[p->tf[it].first_block], lora, N, G, Tk, D, a);
                h = a->tf[it++].out;
                if (j == L - 1 && adapter && adapter[i])   /* T2I-Adapter: before the downsampler */
                    add_forward(a->tf[it - 1].out, h, adapter[i], (size_t)N * C * H * W);
            }
            s_i++;
        }
        if (i < n - 1) {
            int pad = c->downsample_padding;
            float *o = a->skip[s_i++];
            conv_fwd(&p->ws, o, h, p->down_w[i], p->down_b[i], N, C, C, H, W, 3, 2, pad, pad, pad ? pad : 1, pad ? pad : 1);
            h = o;
        }
        if (!cross && adapter && adapter[i])              /* DownBlock2D: sample += residual, in place */
            add_forward(a->skip[s_i - 1], h, adapter[i], (size_t)N * C * a->lh[i + (i < n - 1)] * a->lw[i + (i < n - 1)]);
    }

    {                                                      /* mid block: resnet, attention, resnet */
        int H = a->lh[n - 1], W = a->lw[n - 1];
        unet_resnet_forward(a->res[ir].out, &a->res[ir], h, a->temb, &p->res[ir], N, H, W, E, G, eps_n, a->sx[0], tp);
        h = a->res[ir++].out;
        unet_transformer_forward(&a->tf[it], &a->blk[p->tf[it].first_block], h, ctx, layer_ctx, &p->tf[it],
                                 &p->blk[p->tf[it].first_block], lora, N, G, Tk, D, a);
        h = a->tf[it++].out;
        unet_resnet_forward(a->res[ir].out, &a->res[ir], h, a->temb, &p->res[ir], N, H, W, E, G, eps_n, a->sx[0], tp);
        h = a->res[ir++].out;
    }

    int prev = ch[n - 1];
    for (int i = 0; i < n; i++) {                          /* up blocks */
        int lv = n - 1 - i, C = ch[lv], H = a->lh[lv], W = a->lw[lv], cross = is_cross_up(c->up_block_types[i]);
        for (int j = 0; j <= L; j++) {
            int Ch = j == 0 ? prev : C;
            const float *sk = a->skip[--s_i];              /* res_hidden_states_tuple[-1] */
            int Cs = p->res[ir].cin - Ch;
            concat_channels_forward(a->cat[ic], h, sk, N, Ch, Cs, H * W);
            unet_resnet_forward(a->res[ir].out, &a->res[ir], a->cat[ic++], a->temb, &p->res[ir], N, H, W, E, G,
                                eps_n, a->sx[0], tp);
            h = a->res[ir++].out;
            if (cross) {
                unet_transformer_forward(&a->tf[it], &a->blk[p->tf[it].first_block], h, ctx, layer_ctx, &p->tf[it],
                                         &p->blk[p->tf[it].first_block], lora, N, G, Tk, D, a);
                h = a->tf[it++].out;
            }
        }
        if (i < n - 1) {                                   /* Upsample2D: nearest to the next skip's size, conv */
            int Ho = a->lh[lv - 1], Wo = a->lw[lv - 1];
            resize_nearest_forward(a->sx[0], h, N, C, H, W, Ho, Wo);
            conv_fwd(&p->ws, a->up_out[i], a->sx[0], p->up_w[i], p->up_b[i], N, C, C, Ho, Wo, 3, 1, 1, 1, 1, 1);
            h = a->up_out[i];
        }
        prev = C;
    }

    /* conv_norm_out -> SiLU -> conv_out */
    const size_t n0 = (size_t)N * ch[0] * a->H * a->W;
    groupnorm_forward(a->sx[0], a->out_mean, a->out_rstd, h, WT(p, norm_out_w, 1), WT(p, norm_out_b, 2), N, ch[0],
                      a->H * a->W, G, eps_n);
    silu_forward(a->sx[0], a->sx[0], n0);
    conv_fwd(&p->ws, eps, a->sx[0], p->conv_out_w, p->conv_out_b, N, ch[0], c->out_channels, a->H, a->W,
             c->conv_out_kernel, 1, pout, pout, pout, pout);
    return MS_OK;
}

/* ---------------------------------------------------------------------------------------- */
/* Backward: the forward's layer list in reverse                                             */
/* ---------------------------------------------------------------------------------------- */
/* The next of the three rotating gradient buffers, zeroed for n floats. */
static float *grad_next(UNetActs *a, int *g, size_t n) {
    float *d = a->rot[(*g)++ % 3];
    zero(d, n);
    return d;
}

/* The time embedding's backward (full-parameter training). dtemb (N,E) = dL/dtemb summed over
 * every resnet's time_emb_proj; with e0 = emb(t), e1 = linear_1(e0), s = silu(e1), u = linear_2(s),
 * temb = silu(u) (recomputed: the forward's own ops):
 *   du = dtemb * silu'(u);  dW2 += du^T s, db2 += sum du;  ds = du W2
 *   de1 = ds * silu'(e1);   dW1 += de1^T e0, db1 += sum de1          (t gets no gradient)
 * w: the scratch after dtemb (4 (N,E) buffers and one (N,C0)). */
static void unet_time_backward(const UNetParams *p, const UNetParams *dp, const float *dtemb, const float *t,
                               float *w, int N, int C0, int E, const UNetConfig *c) {
    const size_t ne = (size_t)N * E;
    float *e0 = w, *e1 = e0 + (size_t)N * C0, *sl = e1 + ne, *u = sl + ne, *du = u + ne;
    timestep_embedding_forward(e0, t, N, C0, c->flip_sin_to_cos, (float)c->freq_shift, 10000);
    linear_forward(e1, e0, WT(p, time1_w, 0), WT(p, time1_b, 1), N, C0, E);
    silu_forward(sl, e1, ne);
    linear_forward(u, sl, WT(p, time2_w, 0), WT(p, time2_b, 1), N, E, E);
    zero(du, ne);
    silu_backward(du, dtemb, u, ne);
    float *ds = u;                                       /* u is not needed any more */
    linear_backward(NULL, DW(dp, time2_w), DW(dp, time2_b), du, sl, NULL, N, E, E);
    zero(ds, ne);
    linear_backward(ds, NULL, NULL, du, NULL, WT(p, time2_w, 0), N, E, E);
    zero(du, ne);
    silu_backward(du, ds, e1, ne);                       /* de1 */
    linear_backward(NULL, DW(dp, time1_w), DW(dp, time1_b), du, e0, NULL, N, C0, E);
}

/* T2I-Adapter training: dadapter[i] += dh, the gradient where unet_forward added adapter[i] (n floats). */
static void adapter_grad(const UNetActs *a, int i, const float *dh, size_t n) {
    if (a->dadapter && a->dadapter[i]) add_forward(a->dadapter[i], a->dadapter[i], dh, n);
}

/* Whether a residual gradient is wanted for a down block below i (the backward must go on). */
static int adapter_grad_below(const UNetActs *a, int i) {
    for (int k = 0; a->dadapter && k < i; k++)
        if (a->dadapter[k]) return 1;
    return 0;
}

MsStatus unet_backward(UNetActs *a, const UNetParams *p, const UNetLora *lora, UNetLora *dlora,
                       const float *deps, float *dctx, float *const *dlayer_ctx) {
    return unet_backward_full(a, p, lora, dlora, NULL, deps, dctx, dlayer_ctx);
}

MsStatus unet_backward_full(UNetActs *a, const UNetParams *p, const UNetLora *lora, UNetLora *dlora,
                            const UNetParams *dp, const float *deps, float *dctx, float *const *dlayer_ctx) {
    const UNetConfig *c = &a->cfg;
    const int n = c->n_blocks, L = c->layers_per_block, N = a->N, G = c->norm_num_groups, Tk = a->Tk;
    const int D = c->cross_attention_dim, *ch = c->block_out_channels;
    const float eps_n = c->norm_eps;
    const float *ctx = a->ctx;
    const float *const *layer_ctx = a->layer_ctx;
    MsStatus s;
    if (!a->training) return ms_errorf(MS_ERR_ARG, "unet_backward: the activations were planned for inference");
    if (!a->ctx && !a->layer_ctx) return ms_errorf(MS_ERR_ARG, "unet_backward: no forward pass to go back through");
    if (dlayer_ctx && !layer_ctx) return ms_errorf(MS_ERR_ARG, "unet_backward: dlayer_ctx given, but the forward had one context");
    if (dctx && layer_ctx) return ms_errorf(MS_ERR_ARG, "unet_backward: dctx given, but the forward had layer-wise contexts");
    if (dlora && !lora) return ms_errorf(MS_ERR_ARG, "unet_backward: dlora given without lora");
    if ((s = check_lora(dlora, p, "dlora"))) return s;
    if (dlora && dlora->rank != lora->rank) return ms_errorf(MS_ERR_ARG, "unet_backward: dlora rank %d != lora rank %d", dlora->rank, lora->rank);
    if ((s = check_probe(a, "unet_backward"))) return s;
    if (dp && (memcmp(&dp->cfg, &p->cfg, sizeof p->cfg) || dp->n_res != p->n_res || dp->n_blk != p->n_blk))
        return ms_errorf(MS_ERR_ARG, "unet_backward_full: the gradients belong to a different config");
    if (dp && (p->ws.mem || dp->ws.mem))
        return ms_errorf(MS_ERR_UNSUPPORTED, "unet_backward_full: full-parameter training needs f32 %s (this table "
                         "keeps F16/BF16 values; load it as f32)", p->ws.mem ? "weights" : "gradients");
    if (dp && (!a->xin || !a->tin))
        return ms_errorf(MS_ERR_ARG, "unet_backward_full: the forward's latent and timesteps are gone");

    /* full-parameter training: dL/dtemb (N,E) gathered from every resnet, then the time MLP */
    const int E = ms_unet_time_embed_dim(c);
    int cmax = 0;
    for (int i = 0; i < n; i++) cmax = ch[i] > cmax ? ch[i] : cmax;
    float *dtemb = a->stime, *dtp = dtemb + (size_t)N * E, *tw = dtp + (size_t)N * cmax;
    if (dp) zero(dtemb, (size_t)N * E);

    int g = 0, ir = p->n_res, it = p->n_tf;
    /* skip gradients start at zero; the up blocks fill them, the down blocks read them */
    for (int k = 0; k < a->n_skip; k++) zero(a->dskip[k], skip_numel(a, k));

    /* conv_out <- SiLU <- conv_norm_out */
    const int P0 = a->H * a->W;
    const size_t n0 = (size_t)N * ch[0] * P0;
    const float *hl = a->up_out[n - 1];
    const int ko = c->conv_out_kernel, po = (ko - 1) / 2;
    groupnorm_forward(a->sx[1], NULL, NULL, hl, WT(p, norm_out_w, 1), WT(p, norm_out_b, 2), N, ch[0], P0, G, eps_n);
    if (dp) {                                            /* conv_out's input silu(norm_out(h)) */
        silu_forward(a->sx[2], a->sx[1], n0);
        conv2d_backward(NULL, DW(dp, conv_out_w), DW(dp, conv_out_b), deps, a->sx[2], NULL, N, ch[0], c->out_channels,
                        a->H, a->W, ko, 1, po, po, po, po);
    }
    zero(a->sx[0], n0);
    conv2d_backward(a->sx[0], NULL, NULL, deps, NULL, WT(p, conv_out_w, 0), N, ch[0], c->out_channels, a->H, a->W,
                    ko, 1, po, po, po, po);
    zero(a->sx[2], n0);
    silu_backward(a->sx[2], a->sx[0], a->sx[1], n0);
    float *dh = grad_next(a, &g, n0);
    groupnorm_backward(dh, DW(dp, norm_out_w), DW(dp, norm_out_b), a->sx[2], hl, a->out_mean, a->out_rstd,
                       WT(p, norm_out_w, 1), N, ch[0], P0, G);

    for (int i = n - 1; i >= 0; i--) {                     /* up blocks, last first */
        int lv = n - 1 - i, C = ch[lv], H = a->lh[lv], W = a->lw[lv], P = H * W, cross = is_cross_up(c->up_block_types[i]);
        if (i < n - 1) {
            int Ho = a->lh[lv - 1], Wo = a->lw[lv - 1];
            if (dp)                                      /* the conv's input: the block output, resized */
                resize_nearest_forward(a->sx[1], cross ? a->tf[it - 1].out : a->res[ir - 1].out, N, C, H, W, Ho, Wo);
            zero(a->sx[0], (size_t)N * C * Ho * Wo);
            conv2d_backward(a->sx[0], DW(dp, up_w[i]), DW(dp, up_b[i]), dh, a->sx[1], WT(p, up_w[i], 0), N, C, C, Ho, Wo,
                            3, 1, 1, 1, 1, 1);
            dh = grad_next(a, &g, (size_t)N * C * P);
            resize_nearest_backward(dh, a->sx[0], N, C, H, W, Ho, Wo);
        }
        for (int j = L; j >= 0; j--) {
            if (cross) {
                it--;
                float *d = grad_next(a, &g, (size_t)N * C * P);
                unet_transformer_backward(d, dctx, dlayer_ctx, dlora, dp ? &dp->tf[it] : NULL,
                                          dp ? &dp->blk[p->tf[it].first_block] : NULL, dh, &a->tf[it],
                                          &a->blk[p->tf[it].first_block], ctx, layer_ctx, &p->tf[it],
                                          &p->blk[p->tf[it].first_block], lora, N, G, Tk, D, a);
                dh = d;
            }
            ir--;
            const UNetResnetParams *rp = &p->res[ir];
            int Ch = j == 0 ? (i == 0 ? ch[n - 1] : ch[lv + 1]) : C, Cs = rp->cin - Ch;
            float *dcat = grad_next(a, &g, (size_t)N * rp->cin * P);
            unet_resnet_backward(dcat, dh, &a->res[ir], rp, dp ? &dp->res[ir] : NULL, dtemb, a->temb, dtp, N, H, W, E,
                                 G, eps_n, a->sx[0], a->sx[1], a->sx[2]);
            dh = grad_next(a, &g, (size_t)N * Ch * P);
            /* the forward popped skip n_skip - 1 - (i (L+1) + j) for this resnet */
            concat_channels_backward(dh, a->dskip[a->n_skip - 1 - (i * (L + 1) + j)], dcat, N, Ch, Cs, P);
        }
    }

    {                                                      /* mid block, reversed */
        int H = a->lh[n - 1], W = a->lw[n - 1];
        size_t m = (size_t)N * ch[n - 1] * H * W;
        float *d;
        ir--;
        d = grad_next(a, &g, m);
        unet_resnet_backward(d, dh, &a->res[ir], &p->res[ir], dp ? &dp->res[ir] : NULL, dtemb, a->temb, dtp, N, H, W, E,
                             G, eps_n, a->sx[0], a->sx[1], a->sx[2]);
        dh = d;
        it--;
        d = grad_next(a, &g, m);
        unet_transformer_backward(d, dctx, dlayer_ctx, dlora, dp ? &dp->tf[it] : NULL,
                                  dp ? &dp->blk[p->tf[it].first_block] : NULL, dh, &a->tf[it],
                                  &a->blk[p->tf[it].first_block], ctx, layer_ctx, &p->tf[it],
                                  &p->blk[p->tf[it].first_block], lora, N, G, Tk, D, a);
        dh = d;
        ir--;
        d = grad_next(a, &g, m);
        unet_resnet_backward(d, dh, &a->res[ir], &p->res[ir], dp ? &dp->res[ir] : NULL, dtemb, a->temb, dtp, N, H, W, E,
                             G, eps_n, a->sx[0], a->sx[1], a->sx[2]);
        dh = d;
    }

    for (int i = n - 1; i >= 0; i--) {                     /* down blocks, last first */
        int C = ch[i], H = a->lh[i], W = a->lw[i], P = H * W, cross = is_cross_down(c->down_block_types[i]);
        if (i < n - 1) {
            int Ho = a->lh[i + 1], Wo = a->lw[i + 1], pad = c->downsample_padding;
            add_forward(dh, dh, a->dskip[1 + i * (L + 1) + L], (size_t)N * C * Ho * Wo);  /* its skip */
            if (!cross) adapter_grad(a, i, dh, (size_t)N * C * Ho * Wo);   /* DownBlock2D: after its downsampler */
            float *d = grad_next(a, &g, (size_t)N * C * P);
            conv2d_backward(d, DW(dp, down_w[i]), DW(dp, down_b[i]), dh, a->skip[i * (L + 1) + L], WT(p, down_w[i], 0),
                            N, C, C, H, W, 3, 2, pad, pad, pad ? pad : 1, pad ? pad : 1);   /* input: the last layer's output */
            dh = d;
        }
        for (int j = L - 1; j >= 0; j--) {
            add_forward(dh, dh, a->dskip[1 + i * (L + 1) + j], (size_t)N * C * P);
            if (j == L - 1 && (cross || i == n - 1)) adapter_grad(a, i, dh, (size_t)N * C * P);   /* the block's output */
            if (cross) {
                it--;
                float *d = grad_next(a, &g, (size_t)N * C * P);
                unet_transformer_backward(d, dctx, dlayer_ctx, dlora, dp ? &dp->tf[it] : NULL,
                                          dp ? &dp->blk[p->tf[it].first_block] : NULL, dh, &a->tf[it],
                                          &a->blk[p->tf[it].first_block], ctx, layer_ctx, &p->tf[it],
                                          &p->blk[p->tf[it].first_block], lora, N, G, Tk, D, a);
                dh = d;
            }
            ir--;
            if (it == 0 && !dp && !adapter_grad_below(a, i)) return MS_OK;   /* nothing trainable feeds this resnet's input */
            const UNetResnetParams *rp = &p->res[ir];
            float *d = grad_next(a, &g, (size_t)N * rp->cin * P);
            unet_resnet_backward(d, dh, &a->res[ir], rp, dp ? &dp->res[ir] : NULL, dtemb, a->temb, dtp, N, H, W, E, G,
                                 eps_n, a->sx[0], a->sx[1], a->sx[2]);
            dh = d;
        }
    }
    if (!dp) return MS_OK;
    /* conv_in (its output x0 is also skip 0), then the time embedding */
    const size_t nin = (size_t)N * c->in_channels * P0;
    const float *in = a->xin;
    add_forward(dh, dh, a->dskip[0], n0);
    if (c->center_input_sample) {                          /* the forward's 2 * sample - 1 */
        for (size_t i = 0; i < nin; i++) a->sx[1][i] = 2.0f * a->xin[i] - 1.0f;
        in = a->sx[1];
    }
    const int ki = c->conv_in_kernel, pi = (ki - 1) / 2;
    conv2d_backward(NULL, DW(dp, conv_in_w), DW(dp, conv_in_b), dh, in, NULL, N, c->in_channels, ch[0], a->H, a->W,
                    ki, 1, pi, pi, pi, pi);
    unet_time_backward(p, dp, dtemb, a->tin, tw, N, ch[0], E, c);
    return MS_OK;
}
