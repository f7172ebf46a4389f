/* models/weights.c — SD 1.x configurations, parameter tables and the diffusers <-> original
 * single-file key mapping. Pure logic: no files are read here (tools/model_load.c does that).
 *
 * References (diffusers 0.19.3, which Mix-of-Show pins):
 *   models/unet_2d_condition.py, unet_2d_blocks.py, resnet.py, transformer_2d.py, attention.py
 *   models/vae.py (Encoder, Decoder), autoencoder_kl.py, models/adapter.py (FullAdapter)
 *   pipelines/stable_diffusion/convert_from_ckpt.py: convert_ldm_unet_checkpoint,
 *     convert_ldm_vae_checkpoint, convert_ldm_clip_checkpoint (the LDM names below)
 *   scripts/convert_original_t2i_adapter.py (TencentARC adapter names; added after 0.19.3)
 *   transformers CLIPTextModel (text_model.* names).
 * The tables are checked against the key lists of a real SD 1.5 (tests/test_weights.c).
 */
#include "mixshow.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ---------------------------------------------------------------------------------------- */
/* Names                                                                                     */
/* ---------------------------------------------------------------------------------------- */
static const char *const block_names[] = {
    "", "CrossAttnDownBlock2D", "DownBlock2D", "CrossAttnUpBlock2D", "UpBlock2D",
    "UNetMidBlock2DCrossAttn", "DownEncoderBlock2D", "UpDecoderBlock2D"
};

const char *ms_block_type_name(MsBlockType t) {
    if ((int)t < 0 || (size_t)t >= sizeof block_names / sizeof block_names[0]) return "?";
    return t == MS_BLOCK_NONE ? "(none)" : block_names[t];
}

MsBlockType ms_block_type_from_name(const char *name) {
    for (size_t i = 1; i < sizeof block_names / sizeof block_names[0]; i++)
        if (name && !strcmp(name, block_names[i])) return (MsBlockType)i;
    return MS_BLOCK_NONE;
}

const char *ms_activation_name(MsActivation a) {
    return a == MS_ACT_QUICK_GELU ? "quick_gelu" : a == MS_ACT_GELU ? "gelu" : "?";
}

/* ---------------------------------------------------------------------------------------- */
/* SD 1.5 defaults (the config.json files of runwayml/stable-diffusion-v1-5, as diffusers     */
/* 0.19.3 writes them; ../shared/models/sd15-configs/)                                       */
/* ---------------------------------------------------------------------------------------- */
void ms_unet_config_sd15(UNetConfig *c) {
    static const int ch[4] = { 320, 640, 1280, 1280 };
    memset(c, 0, sizeof *c);
    c->sample_size = 64;
    c->in_channels = 4;
    c->out_channels = 4;
    c->center_input_sample = 0;
    c->flip_sin_to_cos = 1;
    c->freq_shift = 0;
    c->n_blocks = 4;
    for (int i = 0; i < 4; i++) {
        c->down_block_types[i] = i < 3 ? MS_BLOCK_CROSS_ATTN_DOWN : MS_BLOCK_DOWN;
        c->up_block_types[i] = i == 0 ? MS_BLOCK_UP : MS_BLOCK_CROSS_ATTN_UP;
        c->block_out_channels[i] = ch[i];
        c->attention_head_dim[i] = 8;
        c->num_attention_heads[i] = 0;
        c->transformer_layers_per_block[i] = 1;
    }
    c->mid_block_type = MS_BLOCK_MID_CROSS_ATTN;
    c->layers_per_block = 2;
    c->downsample_padding = 1;
    c->mid_block_scale_factor = 1.0f;
    c->norm_num_groups = 32;
    c->norm_eps = 1e-5f;
    c->cross_attention_dim = 768;
    c->use_linear_projection = 0;
    c->upcast_attention = 0;
    c->time_embedding_dim = 0;
    c->conv_in_kernel = 3;
    c->conv_out_kernel = 3;
}

void ms_vae_config_sd15(VaeConfig *c) {
    static const int ch[4] = { 128, 256, 512, 512 };
    memset(c, 0, sizeof *c);
    c->sample_size = 512;
    c->in_channels = 3;
    c->out_channels = 3;
    c->latent_channels = 4;
    c->n_blocks = 4;
    for (int i = 0; i < 4; i++) {
        c->down_block_types[i] = MS_BLOCK_DOWN_ENCODER;
        c->up_block_types[i] = MS_BLOCK_UP_DECODER;
        c->block_out_channels[i] = ch[i];
    }
    c->layers_per_block = 2;
    c->norm_num_groups = 32;
    c->scaling_factor = 0.18215f;
    c->force_upcast = 1;
}

void ms_clip_text_config_sd15(ClipTextConfig *c) {
    memset(c, 0, sizeof *c);
    c->vocab_size = 49408;
    c->hidden_size = 768;
    c->intermediate_size = 3072;
    c->projection_dim = 768;
    c->num_hidden_layers = 12;
    c->num_attention_heads = 12;
    c->max_position_embeddings = 77;
    c->hidden_act = MS_ACT_QUICK_GELU;
    c->layer_norm_eps = 1e-5f;
    c->pad_token_id = 1;
    c->bos_token_id = 0;
    c->eos_token_id = 2;
}

void ms_adapter_config_sd15(AdapterConfig *c, int in_channels) {
    static const int ch[4] = { 320, 640, 1280, 1280 };
    memset(c, 0, sizeof *c);
    c->adapter_type = MS_ADAPTER_FULL;
    c->in_channels = in_channels;
    c->n_channels = 4;
    for (int i = 0; i < 4; i++) c->channels[i] = ch[i];
    c->num_res_blocks = 2;
    c->downscale_factor = 8;
}

void ms_scheduler_config_sd15(SchedulerConfig *c) {
    memset(c, 0, sizeof *c);
    snprintf(c->class_name, sizeof c->class_name, "%s", "PNDMScheduler");
    c->num_train_timesteps = 1000;
    c->beta_start = 0.00085;
    c->beta_end = 0.012;
    c->beta_schedule = MS_BETA_SCALED_LINEAR;
    c->steps_offset = 1;
    c->prediction_type = MS_PRED_EPSILON;
    c->timestep_spacing = MS_SPACING_ABSENT;
    c->set_alpha_to_one = 0;
    c->skip_prk_steps = 1;
    c->clip_sample = 0;
    c->clip_sample_range = 1.0;
}

/* ---------------------------------------------------------------------------------------- */
/* Validation                                                                                */
/* ---------------------------------------------------------------------------------------- */
#define MS_MAX_CHANNELS (1 << 16)     /* keeps every shape product far from overflow */

static MsStatus check_range(const char *what, const char *field, int v, int lo, int hi) {
    if (v < lo || v > hi)
        return ms_errorf(MS_ERR_ARG, "%s config: %s = %d, expected %d..%d", what, field, v, lo, hi);
    return MS_OK;
}

int ms_unet_heads(const UNetConfig *c, int level) {
    if (level < 0 || level >= c->n_blocks) return 0;
    return c->num_attention_heads[level] > 0 ? c->num_attention_heads[level] : c->attention_head_dim[level];
}

int ms_unet_time_embed_dim(const UNetConfig *c) {
    return c->time_embedding_dim > 0 ? c->time_embedding_dim : 4 * c->block_out_channels[0];
}

static int is_cross(MsBlockType t) { return t == MS_BLOCK_CROSS_ATTN_DOWN || t == MS_BLOCK_CROSS_ATTN_UP; }

int ms_unet_cross_attn_layers(const UNetConfig *c) {
    int n = 0;
    for (int i = 0; i < c->n_blocks; i++) {
        int lv = c->n_blocks - 1 - i;
        if (is_cross(c->down_block_types[i])) n += c->layers_per_block * c->transformer_layers_per_block[i];
        if (is_cross(c->up_block_types[i])) n += (c->layers_per_block + 1) * c->transformer_layers_per_block[lv];
    }
    if (c->mid_block_type == MS_BLOCK_MID_CROSS_ATTN) n += c->transformer_layers_per_block[c->n_blocks - 1];
    return n;
}

MsStatus ms_unet_config_check(const UNetConfig *c) {
    MsStatus s;
    const char *w = "unet";
    if ((s = check_range(w, "len(block_out_channels)", c->n_blocks, 1, MS_MAX_BLOCKS))) return s;
    if ((s = check_range(w, "in_channels", c->in_channels, 1, MS_MAX_CHANNELS))) return s;
    if ((s = check_range(w, "out_channels", c->out_channels, 1, MS_MAX_CHANNELS))) return s;
    if ((s = check_range(w, "layers_per_block", c->layers_per_block, 1, 64))) return s;
    if ((s = check_range(w, "norm_num_groups", c->norm_num_groups, 1, MS_MAX_CHANNELS))) return s;
    if ((s = check_range(w, "cross_attention_dim", c->cross_attention_dim, 1, MS_MAX_CHANNELS))) return s;
    if ((s = check_range(w, "time_embedding_dim", c->time_embedding_dim, 0, MS_MAX_CHANNELS))) return s;
    if ((s = check_range(w, "downsample_padding", c->downsample_padding, 0, 1))) return s;
    if (c->conv_in_kernel < 1 || c->conv_in_kernel > 7 || c->conv_in_kernel % 2 == 0 ||
        c->conv_out_kernel < 1 || c->conv_out_kernel > 7 || c->conv_out_kernel % 2 == 0)
        return ms_errorf(MS_ERR_UNSUPPORTED, "unet config: conv_in_kernel %d / conv_out_kernel %d: "
                         "expected odd kernels 1..7", c->conv_in_kernel, c->conv_out_kernel);
    if (!(c->norm_eps > 0.0f) || !(c->mid_block_scale_factor > 0.0f))
        return ms_errorf(MS_ERR_ARG, "unet config: norm_eps %g and mid_block_scale_factor %g must be > 0",
                         (double)c->norm_eps, (double)c->mid_block_scale_factor);
    if (c->mid_block_type != MS_BLOCK_MID_CROSS_ATTN)
        return ms_errorf(MS_ERR_UNSUPPORTED, "unet config: mid_block_type %s: only UNetMidBlock2DCrossAttn "
                         "(SD 1.x) is supported", ms_block_type_name(c->mid_block_type));
    for (int i = 0; i < c->n_blocks; i++) {
        int C = c->block_out_channels[i];
        char f[64];
        snprintf(f, sizeof f, "block_out_channels[%d]", i);
        if ((s = check_range(w, f, C, 1, MS_MAX_CHANNELS))) return s;
        if (C % c->norm_num_groups)
            return ms_errorf(MS_ERR_ARG, "unet config: block_out_channels[%d] = %d is not divisible by "
                             "norm_num_groups = %d", i, C, c->norm_num_groups);
        if (c->down_block_types[i] != MS_BLOCK_CROSS_ATTN_DOWN && c->down_block_types[i] != MS_BLOCK_DOWN)
            return ms_errorf(MS_ERR_UNSUPPORTED, "unet config: down_block_types[%d] = %s: expected "
                             "CrossAttnDownBlock2D or DownBlock2D", i, ms_block_type_name(c->down_block_types[i]));
        if (c->up_block_types[i] != MS_BLOCK_CROSS_ATTN_UP && c->up_block_types[i] != MS_BLOCK_UP)
            return ms_errorf(MS_ERR_UNSUPPORTED, "unet config: up_block_types[%d] = %s: expected "
                             "CrossAttnUpBlock2D or UpBlock2D", i, ms_block_type_name(c->up_block_types[i]));
        snprintf(f, sizeof f, "transformer_layers_per_block[%d]", i);
        if ((s = check_range(w, f, c->transformer_layers_per_block[i], 1, 64))) return s;
        /* heads matter where attention sits at this level: down i, up n-1-i, mid at n-1 */
        int attn = is_cross(c->down_block_types[i]) || is_cross(c->up_block_types[c->n_blocks - 1 - i]) ||
                   i == c->n_blocks - 1;
        int h = ms_unet_heads(c, i);
        if (attn && (h < 1 || C % h))
            return ms_errorf(MS_ERR_ARG, "unet config: level %d has %d channels and %d attention heads "
                             "(attention_head_dim / num_attention_heads): channels must be a multiple "
                             "of the head count", i, C, h);
    }
    if ((s = check_range(w, "time embedding dim", ms_unet_time_embed_dim(c), 1, MS_MAX_CHANNELS))) return s;
    return MS_OK;
}

MsStatus ms_vae_config_check(const VaeConfig *c) {
    MsStatus s;
    const char *w = "vae";
    if ((s = check_range(w, "len(block_out_channels)", c->n_blocks, 1, MS_MAX_BLOCKS))) return s;
    if ((s = check_range(w, "in_channels", c->in_channels, 1, MS_MAX_CHANNELS))) return s;
    if ((s = check_range(w, "out_channels", c->out_channels, 1, MS_MAX_CHANNELS))) return s;
    if ((s = check_range(w, "latent_channels", c->latent_channels, 1, MS_MAX_CHANNELS))) return s;
    if ((s = check_range(w, "layers_per_block", c->layers_per_block, 1, 64))) return s;
    if ((s = check_range(w, "norm_num_groups", c->norm_num_groups, 1, MS_MAX_CHANNELS))) return s;
    if (!(c->scaling_factor > 0.0f))
        return ms_errorf(MS_ERR_ARG, "vae config: scaling_factor %g must be > 0", (double)c->scaling_factor);
    for (int i = 0; i < c->n_blocks; i++) {
        int C = c->block_out_channels[i];
        char f[64];
        snprintf(f, sizeof f, "block_out_channels[%d]", i);
        if ((s = check_range(w, f, C, 1, MS_MAX_CHANNELS))) return s;
        if (C % c->norm_num_groups)
            return ms_errorf(MS_ERR_ARG, "vae config: block_out_channels[%d] = %d is not divisible by "
                             "norm_num_groups = %d", i, C, c->norm_num_groups);
        if (c->down_block_types[i] != MS_BLOCK_DOWN_ENCODER)
            return ms_errorf(MS_ERR_UNSUPPORTED, "vae config: down_block_types[%d] = %s: expected "
                             "DownEncoderBlock2D", i, ms_block_type_name(c->down_block_types[i]));
        if (c->up_block_types[i] != MS_BLOCK_UP_DECODER)
            return ms_errorf(MS_ERR_UNSUPPORTED, "vae config: up_block_types[%d] = %s: expected "
                             "UpDecoderBlock2D", i, ms_block_type_name(c->up_block_types[i]));
    }
    return MS_OK;
}

MsStatus ms_clip_text_config_check(const ClipTextConfig *c) {
    MsStatus s;
    const char *w = "text_encoder";
    if ((s = check_range(w, "vocab_size", c->vocab_size, 1, 1 << 24))) return s;
    if ((s = check_range(w, "hidden_size", c->hidden_size, 1, MS_MAX_CHANNELS))) return s;
    if ((s = check_range(w, "intermediate_size", c->intermediate_size, 1, 4 * MS_MAX_CHANNELS))) return s;
    if ((s = check_range(w, "num_hidden_layers", c->num_hidden_layers, 1, 256))) return s;
    if ((s = check_range(w, "num_attention_heads", c->num_attention_heads, 1, c->hidden_size))) return s;
    if ((s = check_range(w, "max_position_embeddings", c->max_position_embeddings, 1, 1 << 16))) return s;
    if (c->hidden_size % c->num_attention_heads)
        return ms_errorf(MS_ERR_ARG, "text_encoder config: hidden_size %d is not divisible by "
                         "num_attention_heads %d", c->hidden_size, c->num_attention_heads);
    if (c->hidden_act != MS_ACT_QUICK_GELU && c->hidden_act != MS_ACT_GELU)
        return ms_errorf(MS_ERR_UNSUPPORTED, "text_encoder config: hidden_act %d: expected quick_gelu or gelu",
                         (int)c->hidden_act);
    if (!(c->layer_norm_eps > 0.0f))
        return ms_errorf(MS_ERR_ARG, "text_encoder config: layer_norm_eps %g must be > 0", (double)c->layer_norm_eps);
    return MS_OK;
}

MsStatus ms_adapter_config_check(const AdapterConfig *c) {
    MsStatus s;
    const char *w = "t2iadapter";
    if (c->adapter_type != MS_ADAPTER_FULL)
        return ms_errorf(MS_ERR_UNSUPPORTED, "t2iadapter config: adapter_type %s: only full_adapter is supported",
                         c->adapter_type == MS_ADAPTER_LIGHT ? "light_adapter" : "?");
    if ((s = check_range(w, "len(channels)", c->n_channels, 1, MS_MAX_BLOCKS))) return s;
    if ((s = check_range(w, "in_channels", c->in_channels, 1, 64))) return s;
    if ((s = check_range(w, "num_res_blocks", c->num_res_blocks, 1, 64))) return s;
    if ((s = check_range(w, "downscale_factor", c->downscale_factor, 1, 64))) return s;
    for (int i = 0; i < c->n_channels; i++) {
        char f[32];
        snprintf(f, sizeof f, "channels[%d]", i);
        if ((s = check_range(w, f, c->channels[i], 1, MS_MAX_CHANNELS))) return s;
    }
    return MS_OK;
}

MsStatus ms_scheduler_config_check(const SchedulerConfig *c) {
    MsStatus s;
    if ((s = check_range("scheduler", "num_train_timesteps", c->num_train_timesteps, 1, 1 << 20))) return s;
    if ((s = check_range("scheduler", "steps_offset", c->steps_offset, 0, c->num_train_timesteps - 1))) return s;
    if ((int)c->beta_schedule < 0 || c->beta_schedule > MS_BETA_SQUAREDCOS_CAP_V2)
        return ms_errorf(MS_ERR_UNSUPPORTED, "scheduler config: beta_schedule %d unknown", (int)c->beta_schedule);
    if (c->beta_schedule != MS_BETA_SQUAREDCOS_CAP_V2 &&
        !(c->beta_start > 0.0 && c->beta_start <= c->beta_end && c->beta_end < 1.0))
        return ms_errorf(MS_ERR_ARG, "scheduler config: beta_start %g, beta_end %g: expected "
                         "0 < beta_start <= beta_end < 1", c->beta_start, c->beta_end);
    if ((int)c->prediction_type < 0 || c->prediction_type > MS_PRED_SAMPLE)
        return ms_errorf(MS_ERR_UNSUPPORTED, "scheduler config: prediction_type %d unknown", (int)c->prediction_type);
    if ((int)c->timestep_spacing < 0 || c->timestep_spacing > MS_SPACING_TRAILING)
        return ms_errorf(MS_ERR_UNSUPPORTED, "scheduler config: timestep_spacing %d unknown", (int)c->timestep_spacing);
    return MS_OK;
}

/* ---------------------------------------------------------------------------------------- */
/* Parameter tables                                                                          */
/* ---------------------------------------------------------------------------------------- */
void ms_param_table_free(MsParamTable *t) {
    free(t->p);
    ms_free_aligned(t->mem);
    memset(t, 0, sizeof *t);
}

void ms_param_table_release(MsParamTable *t) {
    for (int i = 0; i < t->n; i++) { t->p[i].f32 = NULL; t->p[i].half = NULL; }
    ms_free_aligned(t->mem);
    t->mem = NULL;
    t->mem_bytes = 0;
}

/* Key pieces: vsnprintf into buf[MS_KEY_MAX]. A truncated piece fills the buffer, so the
 * final put() that appends a non-empty name to it always reports the overflow. */
static void keyf(char *buf, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(buf, MS_KEY_MAX, fmt, ap);
    va_end(ap);
}

/* Appends one tensor: diffusers key dpre+dn, LDM key lpre+ln. */
static MsStatus put(MsParamTable *t, const char *dpre, const char *dn, const char *lpre, const char *ln,
                    int ndim, int64_t d0, int64_t d1, int64_t d2, int64_t d3, int flags) {
    if (t->n == t->cap) {
        int cap = t->cap ? 2 * t->cap : 256;
        MsParam *p = (MsParam *)realloc(t->p, (size_t)cap * sizeof *p);
        if (!p) return ms_errorf(MS_ERR_NOMEM, "parameter table: out of memory (%d entries)", cap);
        t->p = p;
        t->cap = cap;
    }
    MsParam *p = &t->p[t->n];
    memset(p, 0, sizeof *p);
    int a = snprintf(p->name, sizeof p->name, "%s%s", dpre, dn);
    int b = snprintf(p->ldm, sizeof p->ldm, "%s%s", lpre, ln);
    if (a < 0 || b < 0 || a >= MS_KEY_MAX || b >= MS_KEY_MAX)
        return ms_errorf(MS_ERR_ARG, "parameter table: key '%s%s' longer than %d bytes", dpre, dn, MS_KEY_MAX - 1);
    int64_t d[4] = { d0, d1, d2, d3 };
    p->ndim = ndim;
    p->numel = 1;
    for (int i = 0; i < ndim; i++) {
        p->shape[i] = d[i];
        p->numel *= (size_t)d[i];          /* dims <= 2^18 after the config checks: no overflow */
    }
    p->ldm_ndim = (flags & MS_PARAM_1X1) ? 4 : ndim;
    p->flags = flags;
    p->dtype = MS_DT_F32;
    t->n++;
    return MS_OK;
}

/* weight [out, in, k, k] (k > 0, a conv) or [out, in] (k == 0, a Linear), then bias [out] */
static MsStatus put_wb(MsParamTable *t, const char *dp, const char *dn, const char *lp, const char *ln,
                       int out, int in, int k) {
    char dw[MS_KEY_MAX], lw[MS_KEY_MAX], db[MS_KEY_MAX], lb[MS_KEY_MAX];
    keyf(dw, "%s.weight", dn); keyf(lw, "%s.weight", ln);
    keyf(db, "%s.bias", dn);   keyf(lb, "%s.bias", ln);
    MsStatus s = k > 0 ? put(t, dp, dw, lp, lw, 4, out, in, k, k, 0) : put(t, dp, dw, lp, lw, 2, out, in, 0, 0, 0);
    return s ? s : put(t, dp, db, lp, lb, 1, out, 0, 0, 0, 0);
}

/* Linear weight [out, in] without bias */
static MsStatus put_w(MsParamTable *t, const char *dp, const char *dn, const char *lp, const char *ln,
                      int out, int in) {
    char dw[MS_KEY_MAX], lw[MS_KEY_MAX];
    keyf(dw, "%s.weight", dn); keyf(lw, "%s.weight", ln);
    return put(t, dp, dw, lp, lw, 2, out, in, 0, 0, 0);
}

/* GroupNorm / LayerNorm affine: weight [C], bias [C] */
static MsStatus put_norm(MsParamTable *t, const char *dp, const char *dn, const char *lp, const char *ln, int C) {
    char dw[MS_KEY_MAX], lw[MS_KEY_MAX], db[MS_KEY_MAX], lb[MS_KEY_MAX];
    keyf(dw, "%s.weight", dn); keyf(lw, "%s.weight", ln);
    keyf(db, "%s.bias", dn);   keyf(lb, "%s.bias", ln);
    MsStatus s = put(t, dp, dw, lp, lw, 1, C, 0, 0, 0, 0);
    return s ? s : put(t, dp, db, lp, lb, 1, C, 0, 0, 0, 0);
}

/* ResnetBlock2D (resnet.py). UNet: LDM ResBlock names (in_layers = [GroupNorm, SiLU, conv],
 * emb_layers = [SiLU, Linear], out_layers = [GroupNorm, SiLU, Dropout, conv]); temb = 0 for the
 * VAE, whose LDM ResnetBlock keeps norm1/conv1/norm2/conv2 and calls the shortcut nin_shortcut.
 * The 1x1 shortcut exists when in != out (use_in_shortcut default). */
static MsStatus put_resnet(MsParamTable *t, const char *dp, const char *lp, int cin, int cout, int temb) {
    MsStatus s;
    int unet = temb > 0;
    if ((s = put_norm(t, dp, "norm1", lp, unet ? "in_layers.0" : "norm1", cin))) return s;
    if ((s = put_wb(t, dp, "conv1", lp, unet ? "in_layers.2" : "conv1", cout, cin, 3))) return s;
    if (unet && (s = put_wb(t, dp, "time_emb_proj", lp, "emb_layers.1", cout, temb, 0))) return s;
    if ((s = put_norm(t, dp, "norm2", lp, unet ? "out_layers.0" : "norm2", cout))) return s;
    if ((s = put_wb(t, dp, "conv2", lp, unet ? "out_layers.3" : "conv2", cout, cout, 3))) return s;
    if (cin != cout && (s = put_wb(t, dp, "conv_shortcut", lp, unet ? "skip_connection" : "nin_shortcut", cout, cin, 1)))
        return s;
    return MS_OK;
}

/* Transformer2DModel (transformer_2d.py) with `depth` BasicTransformerBlocks: LDM's
 * SpatialTransformer uses the same names. inner dim = heads * (C / heads) = C; GEGLU FF with
 * inner 4C (ff.net.0.proj: C -> 8C, value and gate halves). */
static MsStatus put_transformer(MsParamTable *t, const char *dp, const char *lp, int C, int ctx, int depth,
                                int linear_proj) {
    MsStatus s;
    if ((s = put_norm(t, dp, "norm", lp, "norm", C))) return s;
    if ((s = put_wb(t, dp, "proj_in", lp, "proj_in", C, C, linear_proj ? 0 : 1))) return s;
    for (int d = 0; d < depth; d++) {
        char p1[MS_KEY_MAX], p2[MS_KEY_MAX];
        keyf(p1, "%stransformer_blocks.%d.", dp, d);
        keyf(p2, "%stransformer_blocks.%d.", lp, d);
        if ((s = put_norm(t, p1, "norm1", p2, "norm1", C))) return s;
        if ((s = put_w(t, p1, "attn1.to_q", p2, "attn1.to_q", C, C))) return s;
        if ((s = put_w(t, p1, "attn1.to_k", p2, "attn1.to_k", C, C))) return s;
        if ((s = put_w(t, p1, "attn1.to_v", p2, "attn1.to_v", C, C))) return s;
        if ((s = put_wb(t, p1, "attn1.to_out.0", p2, "attn1.to_out.0", C, C, 0))) return s;
        if ((s = put_norm(t, p1, "norm2", p2, "norm2", C))) return s;
        if ((s = put_w(t, p1, "attn2.to_q", p2, "attn2.to_q", C, C))) return s;
        if ((s = put_w(t, p1, "attn2.to_k", p2, "attn2.to_k", C, ctx))) return s;
        if ((s = put_w(t, p1, "attn2.to_v", p2, "attn2.to_v", C, ctx))) return s;
        if ((s = put_wb(t, p1, "attn2.to_out.0", p2, "attn2.to_out.0", C, C, 0))) return s;
        if ((s = put_norm(t, p1, "norm3", p2, "norm3", C))) return s;
        if ((s = put_wb(t, p1, "ff.net.0.proj", p2, "ff.net.0.proj", 8 * C, C, 0))) return s;
        if ((s = put_wb(t, p1, "ff.net.2", p2, "ff.net.2", C, 4 * C, 0))) return s;
    }
    return put_wb(t, dp, "proj_out", lp, "proj_out", C, C, linear_proj ? 0 : 1);
}

/* UNet2DConditionModel <-> LDM openaimodel.UNetModel. With L = layers_per_block:
 *   down block i, layer j   <-> input_blocks.{1 + i(L+1) + j}.0 (resnet) / .1 (transformer)
 *   down block i downsample <-> input_blocks.{1 + i(L+1) + L}.0.op
 *   up block i, layer j     <-> output_blocks.{i(L+1) + j}.0 / .1
 *   up block i upsample     <-> output_blocks.{i(L+1) + L}.{1, or 2 after a transformer}.conv
 *   mid resnets 0, 1 / attention <-> middle_block.0, .2 / .1
 * Order: conv_in, time_embedding, down_blocks, up_blocks, mid_block, conv_norm_out, conv_out
 * (module registration order; each block registers attentions before resnets). */
MsStatus ms_param_table_unet(const UNetConfig *c, MsParamTable *t) {
    MsStatus s;
    memset(t, 0, sizeof *t);
    if ((s = ms_unet_config_check(c))) return s;
    const char *M = "model.diffusion_model.";
    const int n = c->n_blocks, L = c->layers_per_block, temb = ms_unet_time_embed_dim(c);
    const int *ch = c->block_out_channels;
    const int ctx = c->cross_attention_dim, lin = c->use_linear_projection;
    char dp[MS_KEY_MAX], lp[MS_KEY_MAX];

    if ((s = put_wb(t, "", "conv_in", M, "input_blocks.0.0", ch[0], c->in_channels, c->conv_in_kernel))) goto fail;
    if ((s = put_wb(t, "", "time_embedding.linear_1", M, "time_embed.0", temb, ch[0], 0))) goto fail;
    if ((s = put_wb(t, "", "time_embedding.linear_2", M, "time_embed.2", temb, temb, 0))) goto fail;

    int cin = ch[0];
    for (int i = 0; i < n; i++) {
        int cout = ch[i];
        if (c->down_block_types[i] == MS_BLOCK_CROSS_ATTN_DOWN)
            for (int j = 0; j < L; j++) {
                keyf(dp, "down_blocks.%d.attentions.%d.", i, j);
                keyf(lp, "%sinput_blocks.%d.1.", M, 1 + i * (L + 1) + j);
                if ((s = put_transformer(t, dp, lp, cout, ctx, c->transformer_layers_per_block[i], lin))) goto fail;
            }
        for (int j = 0; j < L; j++) {
            keyf(dp, "down_blocks.%d.resnets.%d.", i, j);
            keyf(lp, "%sinput_blocks.%d.0.", M, 1 + i * (L + 1) + j);
            if ((s = put_resnet(t, dp, lp, j == 0 ? cin : cout, cout, temb))) goto fail;
        }
        if (i < n - 1) {
            keyf(dp, "down_blocks.%d.downsamplers.0.", i);
            keyf(lp, "%sinput_blocks.%d.0.", M, 1 + i * (L + 1) + L);
            if ((s = put_wb(t, dp, "conv", lp, "op", cout, cout, 3))) goto fail;
        }
        cin = cout;
    }

    int prev = ch[n - 1];
    for (int i = 0; i < n; i++) {
        int lv = n - 1 - i, cout = ch[lv], cskip = ch[lv > 0 ? lv - 1 : 0];
        int cross = c->up_block_types[i] == MS_BLOCK_CROSS_ATTN_UP;
        if (cross)
            for (int j = 0; j <= L; j++) {
                keyf(dp, "up_blocks.%d.attentions.%d.", i, j);
                keyf(lp, "%soutput_blocks.%d.1.", M, i * (L + 1) + j);
                if ((s = put_transformer(t, dp, lp, cout, ctx, c->transformer_layers_per_block[lv], lin))) goto fail;
            }
        for (int j = 0; j <= L; j++) {
            /* input = previous output ++ skip; the last resnet's skip comes from the level below */
            int rin = (j == 0 ? prev : cout) + (j == L ? cskip : cout);
            keyf(dp, "up_blocks.%d.resnets.%d.", i, j);
            keyf(lp, "%soutput_blocks.%d.0.", M, i * (L + 1) + j);
            if ((s = put_resnet(t, dp, lp, rin, cout, temb))) goto fail;
        }
        if (i < n - 1) {
            keyf(dp, "up_blocks.%d.upsamplers.0.", i);
            keyf(lp, "%soutput_blocks.%d.%d.", M, i * (L + 1) + L, cross ? 2 : 1);
            if ((s = put_wb(t, dp, "conv", lp, "conv", cout, cout, 3))) goto fail;
        }
        prev = cout;
    }

    keyf(lp, "%smiddle_block.1.", M);
    if ((s = put_transformer(t, "mid_block.attentions.0.", lp, ch[n - 1], ctx,
                             c->transformer_layers_per_block[n - 1], lin))) goto fail;
    keyf(lp, "%smiddle_block.0.", M);
    if ((s = put_resnet(t, "mid_block.resnets.0.", lp, ch[n - 1], ch[n - 1], temb))) goto fail;
    keyf(lp, "%smiddle_block.2.", M);
    if ((s = put_resnet(t, "mid_block.resnets.1.", lp, ch[n - 1], ch[n - 1], temb))) goto fail;

    if ((s = put_norm(t, "", "conv_norm_out", M, "out.0", ch[0]))) goto fail;
    if ((s = put_wb(t, "", "conv_out", M, "out.2", c->out_channels, ch[0], c->conv_out_kernel))) goto fail;
    return MS_OK;
fail:
    ms_param_table_free(t);
    return s;
}

/* VAE mid-block attention (attention_processor.Attention with one head): diffusers 0.19.3
 * to_q/to_k/to_v/to_out.0 Linears; older diffusers query/key/value/proj_attn; LDM AttnBlock
 * q/k/v/proj_out 1x1 convs [C, C, 1, 1]. */
static MsStatus put_vae_attn(MsParamTable *t, const char *dp, const char *lp, int C) {
    static const char *const dn[4] = { "to_q", "to_k", "to_v", "to_out.0" };
    static const char *const ln[4] = { "q", "k", "v", "proj_out" };
    static const char *const an[4] = { "query", "key", "value", "proj_attn" };
    MsStatus s;
    if ((s = put_norm(t, dp, "group_norm", lp, "norm", C))) return s;
    for (int k = 0; k < 4; k++) {
        char d[MS_KEY_MAX], l[MS_KEY_MAX];
        for (int wb = 0; wb < 2; wb++) {
            const char *suf = wb ? "bias" : "weight";
            keyf(d, "%s.%s", dn[k], suf);
            keyf(l, "%s.%s", ln[k], suf);
            if ((s = wb ? put(t, dp, d, lp, l, 1, C, 0, 0, 0, 0) : put(t, dp, d, lp, l, 2, C, C, 0, 0, MS_PARAM_1X1)))
                return s;
            keyf(t->p[t->n - 1].alias, "%s%s.%s", dp, an[k], suf);
        }
    }
    return MS_OK;
}

/* VAE mid block: attention, then resnets 0, 1 <-> mid.attn_1, mid.block_1, mid.block_2. */
static MsStatus put_vae_mid(MsParamTable *t, const char *part, const char *F, int C) {
    char dp[MS_KEY_MAX], lp[MS_KEY_MAX];
    MsStatus s;
    keyf(dp, "%s.mid_block.attentions.0.", part);
    keyf(lp, "%s%s.mid.attn_1.", F, part);
    if ((s = put_vae_attn(t, dp, lp, C))) return s;
    for (int r = 0; r < 2; r++) {
        keyf(dp, "%s.mid_block.resnets.%d.", part, r);
        keyf(lp, "%s%s.mid.block_%d.", F, part, r + 1);
        if ((s = put_resnet(t, dp, lp, C, C, 0))) return s;
    }
    return MS_OK;
}

/* AutoencoderKL <-> LDM AutoencoderKL (first_stage_model.*):
 *   encoder.down_blocks.i.resnets.j <-> encoder.down.i.block.j, downsamplers.0 <-> downsample
 *   decoder.up_blocks.i.resnets.j   <-> decoder.up.{n-1-i}.block.j (LDM counts up levels from
 *                                       the lowest resolution), upsamplers.0 <-> upsample
 *   conv_norm_out <-> norm_out. */
MsStatus ms_param_table_vae(const VaeConfig *c, MsParamTable *t) {
    MsStatus s;
    memset(t, 0, sizeof *t);
    if ((s = ms_vae_config_check(c))) return s;
    const char *F = "first_stage_model.";
    const int n = c->n_blocks, L = c->layers_per_block, lat = c->latent_channels;
    const int *ch = c->block_out_channels;
    char dp[MS_KEY_MAX], lp[MS_KEY_MAX];

    if ((s = put_wb(t, "", "encoder.conv_in", F, "encoder.conv_in", ch[0], c->in_channels, 3))) goto fail;
    int cin = ch[0];
    for (int i = 0; i < n; i++) {
        for (int j = 0; j < L; j++) {
            keyf(dp, "encoder.down_blocks.%d.resnets.%d.", i, j);
            keyf(lp, "%sencoder.down.%d.block.%d.", F, i, j);
            if ((s = put_resnet(t, dp, lp, j == 0 ? cin : ch[i], ch[i], 0))) goto fail;
        }
        if (i < n - 1) {
            keyf(dp, "encoder.down_blocks.%d.downsamplers.0.", i);
            keyf(lp, "%sencoder.down.%d.downsample.", F, i);
            if ((s = put_wb(t, dp, "conv", lp, "conv", ch[i], ch[i], 3))) goto fail;
        }
        cin = ch[i];
    }
    if ((s = put_vae_mid(t, "encoder", F, ch[n - 1]))) goto fail;
    if ((s = put_norm(t, "", "encoder.conv_norm_out", F, "encoder.norm_out", ch[n - 1]))) goto fail;
    if ((s = put_wb(t, "", "encoder.conv_out", F, "encoder.conv_out", 2 * lat, ch[n - 1], 3))) goto fail;

    if ((s = put_wb(t, "", "decoder.conv_in", F, "decoder.conv_in", ch[n - 1], lat, 3))) goto fail;
    int prev = ch[n - 1];
    for (int i = 0; i < n; i++) {
        int lv = n - 1 - i, cout = ch[lv];
        for (int j = 0; j <= L; j++) {
            keyf(dp, "decoder.up_blocks.%d.resnets.%d.", i, j);
            keyf(lp, "%sdecoder.up.%d.block.%d.", F, lv, j);
            if ((s = put_resnet(t, dp, lp, j == 0 ? prev : cout, cout, 0))) goto fail;
        }
        if (i < n - 1) {
            keyf(dp, "decoder.up_blocks.%d.upsamplers.0.", i);
            keyf(lp, "%sdecoder.up.%d.upsample.", F, lv);
            if ((s = put_wb(t, dp, "conv", lp, "conv", cout, cout, 3))) goto fail;
        }
        prev = cout;
    }
    if ((s = put_vae_mid(t, "decoder", F, ch[n - 1]))) goto fail;
    if ((s = put_norm(t, "", "decoder.conv_norm_out", F, "decoder.norm_out", ch[0]))) goto fail;
    if ((s = put_wb(t, "", "decoder.conv_out", F, "decoder.conv_out", c->out_channels, ch[0], 3))) goto fail;
    if ((s = put_wb(t, "", "quant_conv", F, "quant_conv", 2 * lat, 2 * lat, 1))) goto fail;
    if ((s = put_wb(t, "", "post_quant_conv", F, "post_quant_conv", lat, lat, 1))) goto fail;
    return MS_OK;
fail:
    ms_param_table_free(t);
    return s;
}

/* HF CLIPTextModel; LDM's FrozenCLIPEmbedder holds the same module as cond_stage_model.transformer. */
MsStatus ms_param_table_text(const ClipTextConfig *c, MsParamTable *t) {
    MsStatus s;
    memset(t, 0, sizeof *t);
    if ((s = ms_clip_text_config_check(c))) return s;
    const char *T = "cond_stage_model.transformer.";
    const int D = c->hidden_size, I = c->intermediate_size;
    static const char *const proj[4] = { "q_proj", "k_proj", "v_proj", "out_proj" };
    char p[MS_KEY_MAX], lp[MS_KEY_MAX];

    if ((s = put(t, "", "text_model.embeddings.token_embedding.weight", T,
                 "text_model.embeddings.token_embedding.weight", 2, c->vocab_size, D, 0, 0, 0))) goto fail;
    if ((s = put(t, "", "text_model.embeddings.position_embedding.weight", T,
                 "text_model.embeddings.position_embedding.weight", 2, c->max_position_embeddings, D, 0, 0, 0)))
        goto fail;
    if ((s = put(t, "", "text_model.embeddings.position_ids", T, "text_model.embeddings.position_ids", 2, 1,
                 c->max_position_embeddings, 0, 0, MS_PARAM_BUFFER))) goto fail;
    for (int l = 0; l < c->num_hidden_layers; l++) {
        keyf(p, "text_model.encoder.layers.%d.", l);
        keyf(lp, "%s%s", T, p);
        for (int k = 0; k < 4; k++) {
            char nm[32];
            keyf(nm, "self_attn.%s", proj[k]);
            if ((s = put_wb(t, p, nm, lp, nm, D, D, 0))) goto fail;
        }
        if ((s = put_norm(t, p, "layer_norm1", lp, "layer_norm1", D))) goto fail;
        if ((s = put_wb(t, p, "mlp.fc1", lp, "mlp.fc1", I, D, 0))) goto fail;
        if ((s = put_wb(t, p, "mlp.fc2", lp, "mlp.fc2", D, I, 0))) goto fail;
        if ((s = put_norm(t, p, "layer_norm2", lp, "layer_norm2", D))) goto fail;
    }
    if ((s = put_norm(t, "", "text_model.final_layer_norm", T, "text_model.final_layer_norm", D))) goto fail;
    return MS_OK;
fail:
    ms_param_table_free(t);
    return s;
}

/* transformers CLIPConfig() defaults: CLIPTextConfig(), CLIPVisionConfig(), projection_dim 512 —
 * openai/clip-vit-base-patch32. */
void ms_clip_model_config_b32(ClipModelConfig *c) {
    memset(c, 0, sizeof *c);
    ms_clip_text_config_sd15(&c->text);
    c->text.hidden_size = 512;
    c->text.intermediate_size = 2048;
    c->text.projection_dim = 512;
    c->text.num_attention_heads = 8;
    c->vision.hidden_size = 768;
    c->vision.intermediate_size = 3072;
    c->vision.num_hidden_layers = 12;
    c->vision.num_attention_heads = 12;
    c->vision.num_channels = 3;
    c->vision.image_size = 224;
    c->vision.patch_size = 32;
    c->vision.hidden_act = MS_ACT_QUICK_GELU;
    c->vision.layer_norm_eps = 1e-5f;
    c->projection_dim = 512;
}

MsStatus ms_clip_model_config_check(const ClipModelConfig *c) {
    MsStatus s;
    const ClipVisionConfig *v = &c->vision;
    const char *w = "vision_config";
    if ((s = ms_clip_text_config_check(&c->text))) return s;
    if ((s = check_range(w, "hidden_size", v->hidden_size, 1, MS_MAX_CHANNELS))) return s;
    if ((s = check_range(w, "intermediate_size", v->intermediate_size, 1, 4 * MS_MAX_CHANNELS))) return s;
    if ((s = check_range(w, "num_hidden_layers", v->num_hidden_layers, 0, CLIP_MAX_LAYERS))) return s;
    if ((s = check_range(w, "num_attention_heads", v->num_attention_heads, 1, v->hidden_size))) return s;
    if ((s = check_range(w, "num_channels", v->num_channels, 1, 64))) return s;
    if ((s = check_range(w, "image_size", v->image_size, 1, 1 << 14))) return s;
    if ((s = check_range(w, "patch_size", v->patch_size, 1, v->image_size))) return s;
    if ((s = check_range("clip", "projection_dim", c->projection_dim, 1, MS_MAX_CHANNELS))) return s;
    if (v->hidden_size % v->num_attention_heads)
        return ms_errorf(MS_ERR_ARG, "vision_config: hidden_size %d is not divisible by num_attention_heads %d",
                         v->hidden_size, v->num_attention_heads);
    if (v->hidden_act != MS_ACT_QUICK_GELU && v->hidden_act != MS_ACT_GELU)
        return ms_errorf(MS_ERR_UNSUPPORTED, "vision_config: hidden_act %d: expected quick_gelu or gelu", (int)v->hidden_act);
    if (!(v->layer_norm_eps > 0.0f))
        return ms_errorf(MS_ERR_ARG, "vision_config: layer_norm_eps %g must be > 0", (double)v->layer_norm_eps);
    return MS_OK;
}

/* HF CLIPModel: the text tower's table, then vision_model.* in state_dict() order, the two
 * projections and logit_scale (a 0-d tensor). No LDM layout: both names are the same. */
MsStatus ms_param_table_clip(const ClipModelConfig *c, MsParamTable *t) {
    MsStatus s;
    if ((s = ms_clip_model_config_check(c)) || (s = ms_param_table_text(&c->text, t))) return s;
    const ClipVisionConfig *v = &c->vision;
    const int D = v->hidden_size, I = v->intermediate_size, P = v->patch_size;
    const int64_t npos = (int64_t)(v->image_size / P) * (v->image_size / P) + 1;
    static const char *const proj[4] = { "k_proj", "v_proj", "q_proj", "out_proj" };
    char p[MS_KEY_MAX];
    const char *E = "vision_model.embeddings.";
    if ((s = put(t, E, "class_embedding", E, "class_embedding", 1, D, 0, 0, 0, 0)) ||
        (s = put(t, E, "patch_embedding.weight", E, "patch_embedding.weight", 4, D, v->num_channels, P, P, 0)) ||
        (s = put(t, E, "position_embedding.weight", E, "position_embedding.weight", 2, npos, D, 0, 0, 0)) ||
        (s = put(t, E, "position_ids", E, "position_ids", 2, 1, npos, 0, 0, MS_PARAM_BUFFER)) ||
        (s = put_norm(t, "", "vision_model.pre_layrnorm", "", "vision_model.pre_layrnorm", D)))
        goto fail;
    for (int l = 0; l < v->num_hidden_layers; l++) {
        keyf(p, "vision_model.encoder.layers.%d.", l);
        for (int k = 0; k < 4; k++) {
            char nm[32];
            keyf(nm, "self_attn.%s", proj[k]);
            if ((s = put_wb(t, p, nm, p, nm, D, D, 0))) goto fail;
        }
        if ((s = put_norm(t, p, "layer_norm1", p, "layer_norm1", D)) ||
            (s = put_wb(t, p, "mlp.fc1", p, "mlp.fc1", I, D, 0)) || (s = put_wb(t, p, "mlp.fc2", p, "mlp.fc2", D, I, 0)) ||
            (s = put_norm(t, p, "layer_norm2", p, "layer_norm2", D)))
            goto fail;
    }
    if ((s = put_norm(t, "", "vision_model.post_layernorm", "", "vision_model.post_layernorm", D)) ||
        (s = put_w(t, "", "visual_projection", "", "visual_projection", c->projection_dim, D)) ||
        (s = put_w(t, "", "text_projection", "", "text_projection", c->projection_dim, c->text.hidden_size)) ||
        (s = put(t, "", "logit_scale", "", "logit_scale", 0, 0, 0, 0, 0, 0)))
        goto fail;
    return MS_OK;
fail:
    ms_param_table_free(t);
    return s;
}

/* T2IAdapter full_adapter <-> TencentARC Adapter (R = num_res_blocks):
 *   adapter.body.i.resnets.j.block{1,2} <-> body.{iR + j}.block{1,2}
 *   adapter.body.i.in_conv              <-> body.{iR}.in_conv (only where channels change). */
MsStatus ms_param_table_adapter(const AdapterConfig *c, MsParamTable *t) {
    MsStatus s;
    memset(t, 0, sizeof *t);
    if ((s = ms_adapter_config_check(c))) return s;
    const int R = c->num_res_blocks, f = c->downscale_factor;
    char dp[MS_KEY_MAX], lp[MS_KEY_MAX];
    if ((s = put_wb(t, "adapter.", "conv_in", "", "conv_in", c->channels[0], c->in_channels * f * f, 3))) goto fail;
    for (int i = 0; i < c->n_channels; i++) {
        int C = c->channels[i], Cin = i > 0 ? c->channels[i - 1] : C;
        if (Cin != C) {
            keyf(dp, "adapter.body.%d.", i);
            keyf(lp, "body.%d.", i * R);
            if ((s = put_wb(t, dp, "in_conv", lp, "in_conv", C, Cin, 1))) goto fail;
        }
        for (int j = 0; j < R; j++) {
            keyf(dp, "adapter.body.%d.resnets.%d.", i, j);
            keyf(lp, "body.%d.", i * R + j);
            if ((s = put_wb(t, dp, "block1", lp, "block1", C, C, 3))) goto fail;
            if ((s = put_wb(t, dp, "block2", lp, "block2", C, C, 1))) goto fail;
        }
    }
    return MS_OK;
fail:
    ms_param_table_free(t);
    return s;
}

/* The alignment stand-ins of `mixshow eval` (models/evalnet.c): image trunk, its two heads, the
 * text tower's projection and CLIP's logit scale. No LDM layout: both names are the same. */
MsStatus ms_param_table_evalnet(const EvalNetConfig *c, MsParamTable *t) {
    MsStatus s;
    EvalUnit u[EVAL_MAX_UNITS];
    memset(t, 0, sizeof *t);
    if ((s = evalnet_config_check(c))) return s;
    const int n = evalnet_units(c, u), C = c->channels[c->n_levels - 1], P = c->text_pool;
    char dp[MS_KEY_MAX];
    if ((s = put_wb(t, "image.", "conv_in", "image.", "conv_in", c->channels[0], 3, 3))) goto fail;
    for (int k = 0; k < n; k++) {
        keyf(dp, "image.down.%d.%d.", u[k].level, u[k].j);
        if ((s = put_norm(t, dp, "norm", dp, "norm", u[k].cin)) || (s = put_wb(t, dp, "conv", dp, "conv", u[k].cout, u[k].cin, 3)))
            goto fail;
    }
    if ((s = put_norm(t, "image.", "norm_out", "image.", "norm_out", C)) ||
        (s = put_w(t, "image.", "text_proj", "image.", "text_proj", c->embed_dim, C * P * P)) ||
        (s = put_w(t, "image.", "id_proj", "image.", "id_proj", c->id_dim, C)) ||
        (s = put_w(t, "", "text_projection", "", "text_projection", c->embed_dim, c->text.hidden_size)) ||
        (s = put(t, "", "logit_scale", "", "logit_scale", 1, 1, 0, 0, 0, 0)))
        goto fail;
    return MS_OK;
fail:
    ms_param_table_free(t);
    return s;
}

/* ---------------------------------------------------------------------------------------- */
/* Lookups                                                                                   */
/* ---------------------------------------------------------------------------------------- */
/* Linear scans: tables hold < 1300 entries, a whole checkpoint is matched in milliseconds. */
static int find_in(const MsParamTable *t, const char *key, int ldm) {
    if (!key) return -1;
    for (int i = 0; i < t->n; i++) {
        const MsParam *p = &t->p[i];
        if (ldm ? !strcmp(p->ldm, key) : (!strcmp(p->name, key) || (p->alias[0] && !strcmp(p->alias, key))))
            return i;
    }
    return -1;
}

int ms_param_find(const MsParamTable *t, const char *name) { return find_in(t, name, 0); }
int ms_param_find_ldm(const MsParamTable *t, const char *key) { return find_in(t, key, 1); }

size_t ms_param_table_numel(const MsParamTable *t) {
    size_t n = 0;
    for (int i = 0; i < t->n; i++)
        if (!(t->p[i].flags & MS_PARAM_BUFFER)) n += t->p[i].numel;
    return n;
}

int ms_param_shape_ok(const MsParam *p, int ndim, const int64_t *shape) {
    if (ndim == p->ndim) {
        for (int i = 0; i < ndim; i++)
            if (shape[i] != p->shape[i]) return 0;
        return 1;
    }
    return (p->flags & MS_PARAM_1X1) && ndim == 4 && p->ndim == 2 && shape[0] == p->shape[0] &&
           shape[1] == p->shape[1] && shape[2] == 1 && shape[3] == 1;
}

char *ms_shape_str(char *buf, size_t cap, int ndim, const int64_t *shape) {
    size_t k = 0;
    if (!cap) return buf;
    buf[0] = '\0';
    k += (size_t)snprintf(buf, cap, "[");
    for (int i = 0; i < ndim && k < cap; i++)
        k += (size_t)snprintf(buf + k, cap - k, "%s%lld", i ? ", " : "", (long long)shape[i]);
    if (k < cap) snprintf(buf + k, cap - k, "]");
    return buf;
}

/* ---------------------------------------------------------------------------------------- */
/* Storage                                                                                   */
/* ---------------------------------------------------------------------------------------- */
MsStatus ms_param_table_alloc(MsParamTable *t, const MsDtype *dtypes) {
    size_t total = 0, off;
    ms_free_aligned(t->mem);
    t->mem = NULL;
    t->mem_bytes = 0;
    for (int i = 0; i < t->n; i++) {
        MsParam *p = &t->p[i];
        size_t esz = (dtypes && dtypes[i] != MS_DT_F32) ? 2 : 4, bytes;
        p->f32 = NULL;
        p->half = NULL;
        p->dtype = dtypes ? dtypes[i] : MS_DT_F32;
        if (p->flags & MS_PARAM_BUFFER) continue;
        if (!ms_mul_ok(p->numel, esz, &bytes) || !ms_add_ok(bytes, 63, &bytes) ||
            !ms_add_ok(total, bytes & ~(size_t)63, &total))
            return ms_errorf(MS_ERR_NOMEM, "parameter table: size overflows at '%s'", p->name);
    }
    unsigned char *mem = (unsigned char *)ms_alloc_aligned(total ? total : 1, 1);
    if (!mem) return ms_errorf(MS_ERR_NOMEM, "parameter table: cannot allocate %zu bytes", total);
    off = 0;
    for (int i = 0; i < t->n; i++) {
        MsParam *p = &t->p[i];
        if (p->flags & MS_PARAM_BUFFER) continue;
        size_t esz = p->dtype != MS_DT_F32 ? 2 : 4;
        if (esz == 4) p->f32 = (float *)(void *)(mem + off);
        else p->half = (uint16_t *)(void *)(mem + off);
        off += (p->numel * esz + 63) & ~(size_t)63;
    }
    t->mem = mem;
    t->mem_bytes = total;
    return MS_OK;
}

float ms_f16_to_f32(uint16_t h) {              /* the definition lives with the SIMD paths */
    float f;
    ms_f16_to_f32_vec_ref(&f, &h, 1);
    return f;
}

float ms_bf16_to_f32(uint16_t h) {
    uint32_t bits = (uint32_t)h << 16;
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

MsStatus ms_param_get_f32(const MsParam *p, float *out) {
    if (p->f32) { memcpy(out, p->f32, p->numel * sizeof(float)); return MS_OK; }
    if (!p->half) return ms_errorf(MS_ERR_ARG, "'%s': no data loaded", p->name);
    ms_half_to_f32(out, p->half, p->numel, p->dtype);
    return MS_OK;
}

/* ---------------------------------------------------------------------------------------- */
/* Keys of original single files                                                             */
/* ---------------------------------------------------------------------------------------- */
int ms_ldm_key_is_harmless(const char *key) {
    static const char *const names[] = {   /* LatentDiffusion / DDPM registered buffers */
        "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
        "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod",
        "sqrt_recipm1_alphas_cumprod", "posterior_variance", "posterior_log_variance_clipped",
        "posterior_mean_coef1", "posterior_mean_coef2", "logvar", "lvlb_weights"
    };
    for (size_t i = 0; i < sizeof names / sizeof names[0]; i++)
        if (!strcmp(key, names[i])) return 1;
    return !strncmp(key, "model_ema.", 10);
}

int ms_ldm_key_normalize(const char *key, char *out, size_t cap) {
    static const char *const T = "cond_stage_model.transformer.";
    static const char *const old[] = { "embeddings.", "encoder.", "final_layer_norm." };
    size_t tl = strlen(T);
    int rewrite = 0;
    if (!strncmp(key, T, tl))
        for (size_t i = 0; i < 3; i++)
            if (!strncmp(key + tl, old[i], strlen(old[i]))) rewrite = 1;
    int n = rewrite ? snprintf(out, cap, "%stext_model.%s", T, key + tl) : snprintf(out, cap, "%s", key);
    if (n < 0 || (size_t)n >= cap) return -1;
    return rewrite;
}

void ms_model_free(MsModel *m) {
    ms_param_table_free(&m->unet);
    ms_param_table_free(&m->vae);
    ms_param_table_free(&m->text);
    memset(m, 0, sizeof *m);
}

/* ---------------------------------------------------------------------------------------- */
/* 16-bit weights for every network (used by the UNet, VAE, CLIP and adapter)                  */
/* ---------------------------------------------------------------------------------------- */
/* F16 -> f32 exactly: the SIMD converter of tensor.c (F16C / AVX-512 / NEON, branch-free
 * scalar elsewhere), bit-identical to ms_f16_to_f32 on all 65536 patterns (tests/test_half.c). */
void ms_half_to_f32(float *out, const uint16_t *h, size_t n, MsDtype dtype) {
    if (dtype == MS_DT_BF16) ms_bf16_to_f32_vec(out, h, n);
    else ms_f16_to_f32_vec(out, h, n);
}

const float *ms_weight_f32(const MsParam *p, float *buf) {
    if (!p || p->f32) return p ? p->f32 : NULL;       /* f32 table: the data itself, no copy */
    if (!p->half || !buf) return NULL;                /* not loaded / no staging: a bug upstream */
    ms_half_to_f32(buf, p->half, p->numel, p->dtype);
    return buf;
}

const float *ms_stage_f32(const MsWeightStage *s, const MsParam *w, int slot) {
    return ms_weight_f32(w, slot == 0 ? s->mat : s->vec[slot - 1]);
}

static size_t round16(size_t n) { return (n + 15) & ~(size_t)15; }   /* keeps each slot 64-byte aligned */

size_t ms_weight_stage_floats(const MsParamTable *t, const char *skip, size_t *mat, size_t *vec) {
    size_t m = 0, v = 0;
    for (int i = 0; i < t->n; i++) {
        const MsParam *p = &t->p[i];
        if ((p->flags & MS_PARAM_BUFFER) || (skip && !strcmp(p->name, skip))) continue;
        if (p->numel > m) m = p->numel;
        if (p->ndim == 1 && p->numel > v) v = p->numel;
    }
    if (mat) *mat = m;
    if (vec) *vec = v;
    return round16(m) + 2 * round16(v);
}

MsStatus ms_weight_stage_init(MsWeightStage *s, const MsParamTable *t, const char *skip) {
    size_t m = 0, v = 0, bytes;
    memset(s, 0, sizeof *s);
    for (int i = 0; i < t->n; i++) {                  /* only what will be converted */
        const MsParam *p = &t->p[i];
        if (!p->half || p->f32 || (skip && !strcmp(p->name, skip))) continue;
        if (p->numel > m) m = p->numel;
        if (p->ndim == 1 && p->numel > v) v = p->numel;
    }
    if (!m) return MS_OK;                             /* all f32: no staging */
    if (!ms_add_ok(round16(m), 2 * round16(v), &bytes) || !ms_mul_ok(bytes, sizeof(float), &bytes) ||
        !(s->mem = ms_alloc_aligned(bytes, 1)))
        return ms_errorf(MS_ERR_NOMEM, "weights: no memory for the f32 staging of 16-bit weights (%zu floats)", m);
    s->bytes = bytes;
    s->mat = (float *)s->mem;
    s->vec[0] = s->mat + round16(m);
    s->vec[1] = s->vec[0] + round16(v);
    return MS_OK;
}

void ms_weight_stage_free(MsWeightStage *s) {
    ms_free_aligned(s->mem);
    memset(s, 0, sizeof *s);
}
