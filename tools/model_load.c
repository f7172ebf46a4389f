/* tools/model_load.c — load Stable Diffusion 1.x weights: a diffusers folder (model_index.json,
 * unet/ vae/ text_encoder/ scheduler/, weights as *.safetensors or *.bin, F32/F16/BF16) or an
 * original single-file checkpoint (LDM layout, .safetensors or .ckpt), and T2I-Adapters
 * (diffusers folder or TencentARC file).
 *
 * Every tensor of the file is matched against the parameter table the config implies
 * (models/weights.c): a missing, extra or mis-shaped tensor is an error naming the key, the
 * file and both shapes; only known non-parameters (position_ids, DDPM schedule buffers,
 * model_ema.*) are skipped. Configs come from config.json (readers below, after diffusers
 * 0.19.3 / transformers defaults) or, for single files, from MsLoadOptions.config_dir or the
 * built-in SD 1.5 values.
 */
#if !defined(_WIN32) && !defined(_POSIX_C_SOURCE)
#define _POSIX_C_SOURCE 200809L         /* readlink (the executable's folder) */
#endif
#include "tools/tools.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#if !defined(_WIN32)
#include <unistd.h>
#endif

/* ---------------------------------------------------------------------------------------- */
/* Config readers                                                                            */
/* ---------------------------------------------------------------------------------------- */
static const char *jorigin(const JsonValue *v) { return v && v->origin ? v->origin : "<json>"; }

static int jnull(const JsonValue *v) { return !v || v->type == JSON_NULL; }

/* key absent or null -> def; otherwise an integer in [lo, hi] */
static MsStatus jint(const JsonValue *j, const char *key, int def, int lo, int hi, int *out) {
    const JsonValue *v = json_get(j, key);
    int64_t x;
    char what[96];
    if (jnull(v)) { *out = def; return MS_OK; }
    snprintf(what, sizeof what, "key '%.80s'", key);
    MsStatus s = json_as_int(v, what, &x);
    if (s) return s;
    if (x < lo || x > hi)
        return ms_errorf(MS_ERR_FORMAT, "%s:%d:%d: key '%s' = %lld, expected %d..%d", jorigin(v), v->line, v->col,
                         key, (long long)x, lo, hi);
    *out = (int)x;
    return MS_OK;
}

static MsStatus jnum(const JsonValue *j, const char *key, double def, double *out) {
    const JsonValue *v = json_get(j, key);
    if (jnull(v)) { *out = def; return MS_OK; }
    if (v->type != JSON_NUMBER)
        return ms_errorf(MS_ERR_FORMAT, "%s:%d:%d: key '%s': expected a number, found %s", jorigin(v), v->line,
                         v->col, key, json_type_name(v->type));
    *out = v->number;
    return MS_OK;
}

static MsStatus jbool(const JsonValue *j, const char *key, int def, int *out) {
    const JsonValue *v = json_get(j, key);
    if (jnull(v)) { *out = def; return MS_OK; }
    if (v->type != JSON_BOOL)
        return ms_errorf(MS_ERR_FORMAT, "%s:%d:%d: key '%s': expected true or false, found %s", jorigin(v),
                         v->line, v->col, key, json_type_name(v->type));
    *out = v->boolean;
    return MS_OK;
}

/* key absent or null -> def (may be NULL); otherwise a string */
static MsStatus jstr(const JsonValue *j, const char *key, const char *def, const char **out) {
    const JsonValue *v = json_get(j, key);
    if (jnull(v)) { *out = def; return MS_OK; }
    if (v->type != JSON_STRING)
        return ms_errorf(MS_ERR_FORMAT, "%s:%d:%d: key '%s': expected a string, found %s", jorigin(v), v->line,
                         v->col, key, json_type_name(v->type));
    *out = v->str;
    return MS_OK;
}

/* An architecture switch mixshow does not implement must be absent, null, or its default. */
static MsStatus junsupported(const JsonValue *j, const char *key, const char *def_str, int def_bool) {
    const JsonValue *v = json_get(j, key);
    if (jnull(v)) return MS_OK;
    if (def_str && v->type == JSON_STRING && !strcmp(v->str, def_str)) return MS_OK;
    if (def_bool >= 0 && v->type == JSON_BOOL && v->boolean == def_bool) return MS_OK;
    if (def_bool >= 0 && v->type == JSON_ARRAY) {       /* per-block list of booleans */
        size_t k;
        for (k = 0; k < v->count; k++)
            if (v->items[k].type != JSON_BOOL || v->items[k].boolean != def_bool) break;
        if (k == v->count) return MS_OK;
    }
    if (def_bool == -2 && v->type == JSON_NUMBER && v->number == 1.0) return MS_OK;   /* a factor of 1 */
    return ms_errorf(MS_ERR_UNSUPPORTED, "%s:%d:%d: key '%s': only %s%s%s is supported (SD 1.x)", jorigin(v),
                     v->line, v->col, key, def_str ? "\"" : "", def_str ? def_str : def_bool == -2 ? "1" :
                     def_bool == 1 ? "true" : def_bool == 0 ? "false" : "null", def_str ? "\"" : "");
}

/* an int or a list of n ints -> out[0..n) */
static MsStatus jint_list(const JsonValue *j, const char *key, int n, int def, int lo, int hi, int *out) {
    const JsonValue *v = json_get(j, key);
    if (v && v->type == JSON_ARRAY) {
        if ((int)v->count != n)
            return ms_errorf(MS_ERR_FORMAT, "%s:%d:%d: key '%s' has %zu entries, expected %d (one per block)",
                             jorigin(v), v->line, v->col, key, v->count, n);
        for (int i = 0; i < n; i++) {
            int64_t x;
            char what[96];
            snprintf(what, sizeof what, "%.80s[%d]", key, i);
            MsStatus s = json_as_int(&v->items[i], what, &x);
            if (s) return s;
            if (x < lo || x > hi)
                return ms_errorf(MS_ERR_FORMAT, "%s:%d:%d: %s = %lld, expected %d..%d", jorigin(v), v->line, v->col,
                                 what, (long long)x, lo, hi);
            out[i] = (int)x;
        }
        return MS_OK;
    }
    int x;
    MsStatus s = jint(j, key, def, lo, hi, &x);
    for (int i = 0; i < n && !s; i++) out[i] = x;
    return s;
}

/* a list of 1..MS_MAX_BLOCKS ints */
static MsStatus jchannels(const JsonValue *j, const char *key, int *out, int *n) {
    const JsonValue *v;
    MsStatus s = json_need(j, key, JSON_ARRAY, &v);
    if (s) return s;
    if (v->count < 1 || v->count > MS_MAX_BLOCKS)
        return ms_errorf(MS_ERR_UNSUPPORTED, "%s:%d:%d: key '%s' has %zu entries, expected 1..%d", jorigin(v),
                         v->line, v->col, key, v->count, MS_MAX_BLOCKS);
    *n = (int)v->count;
    return jint_list(j, key, *n, 0, 1, 1 << 16, out);
}

static MsStatus jblocks(const JsonValue *j, const char *key, int n, MsBlockType *out) {
    const JsonValue *v;
    MsStatus s = json_need(j, key, JSON_ARRAY, &v);
    if (s) return s;
    if ((int)v->count != n)
        return ms_errorf(MS_ERR_FORMAT, "%s:%d:%d: key '%s' has %zu entries, but block_out_channels has %d",
                         jorigin(v), v->line, v->col, key, v->count, n);
    for (int i = 0; i < n; i++) {
        const JsonValue *e = &v->items[i];
        out[i] = e->type == JSON_STRING ? ms_block_type_from_name(e->str) : MS_BLOCK_NONE;
        if (out[i] == MS_BLOCK_NONE)
            return ms_errorf(MS_ERR_UNSUPPORTED, "%s:%d:%d: %s[%d]: unknown or unsupported block type %s%s%s",
                             jorigin(e), e->line, e->col, key, i, e->type == JSON_STRING ? "'" : "",
                             e->type == JSON_STRING ? e->str : json_type_name(e->type), e->type == JSON_STRING ? "'" : "");
    }
    return MS_OK;
}

/* wraps a config check so its message names the file */
static MsStatus checked(MsStatus s, const JsonValue *j) {
    if (s) {
        char msg[512];
        snprintf(msg, sizeof msg, "%s", ms_last_error());
        return ms_errorf(s, "%s: %s", jorigin(j), msg);
    }
    return MS_OK;
}

#define TRY(x) do { MsStatus s_ = (x); if (s_) return s_; } while (0)

/* UNet2DConditionModel.__init__ defaults (diffusers 0.19.3). */
MsStatus ms_unet_config_from_json(const JsonValue *j, UNetConfig *c) {
    const char *str;
    double x;
    ms_unet_config_sd15(c);
    if (!j || j->type != JSON_OBJECT)
        return ms_errorf(MS_ERR_FORMAT, "%s: unet config: expected a JSON object", jorigin(j));
    static const char *const nulls[] = { "class_embed_type", "addition_embed_type", "encoder_hid_dim",
        "encoder_hid_dim_type", "num_class_embeds", "time_cond_proj_dim", "timestep_post_act",
        "time_embedding_act_fn", "cross_attention_norm", "projection_class_embeddings_input_dim",
        "addition_time_embed_dim" };
    for (size_t i = 0; i < sizeof nulls / sizeof nulls[0]; i++) TRY(junsupported(j, nulls[i], NULL, -1));
    TRY(junsupported(j, "act_fn", "silu", -1));
    TRY(junsupported(j, "time_embedding_type", "positional", -1));
    TRY(junsupported(j, "resnet_time_scale_shift", "default", -1));
    TRY(junsupported(j, "only_cross_attention", NULL, 0));
    TRY(junsupported(j, "mid_block_only_cross_attention", NULL, 0));
    TRY(junsupported(j, "dual_cross_attention", NULL, 0));
    TRY(junsupported(j, "class_embeddings_concat", NULL, 0));
    TRY(junsupported(j, "resnet_skip_time_act", NULL, 0));
    TRY(junsupported(j, "resnet_out_scale_factor", NULL, -2));

    TRY(jint(j, "sample_size", 64, 1, 1 << 16, &c->sample_size));   /* null in diffusers: we keep 64 */
    TRY(jint(j, "in_channels", 4, 1, 1 << 16, &c->in_channels));
    TRY(jint(j, "out_channels", 4, 1, 1 << 16, &c->out_channels));
    TRY(jbool(j, "center_input_sample", 0, &c->center_input_sample));
    TRY(jbool(j, "flip_sin_to_cos", 1, &c->flip_sin_to_cos));
    TRY(jint(j, "freq_shift", 0, -(1 << 16), 1 << 16, &c->freq_shift));
    TRY(jchannels(j, "block_out_channels", c->block_out_channels, &c->n_blocks));
    TRY(jblocks(j, "down_block_types", c->n_blocks, c->down_block_types));
    TRY(jblocks(j, "up_block_types", c->n_blocks, c->up_block_types));
    TRY(jstr(j, "mid_block_type", "UNetMidBlock2DCrossAttn", &str));
    c->mid_block_type = str ? ms_block_type_from_name(str) : MS_BLOCK_NONE;
    if (c->mid_block_type != MS_BLOCK_MID_CROSS_ATTN) {
        const JsonValue *v = json_get(j, "mid_block_type");
        return ms_errorf(MS_ERR_UNSUPPORTED, "%s:%d:%d: mid_block_type %s: only UNetMidBlock2DCrossAttn is supported",
                         jorigin(v), v->line, v->col, str ? str : "null");
    }
    /* layers_per_block: an int or a uniform list */
    int lpb[MS_MAX_BLOCKS];
    TRY(jint_list(j, "layers_per_block", c->n_blocks, 2, 1, 64, lpb));
    for (int i = 1; i < c->n_blocks; i++)
        if (lpb[i] != lpb[0])
            return ms_errorf(MS_ERR_UNSUPPORTED, "%s: layers_per_block differs between blocks", jorigin(j));
    c->layers_per_block = lpb[0];
    TRY(jint(j, "downsample_padding", 1, 0, 1, &c->downsample_padding));
    TRY(jnum(j, "mid_block_scale_factor", 1.0, &x)); c->mid_block_scale_factor = (float)x;
    TRY(jint(j, "norm_num_groups", 32, 1, 1 << 16, &c->norm_num_groups));
    TRY(jnum(j, "norm_eps", 1e-5, &x)); c->norm_eps = (float)x;
    int cad[MS_MAX_BLOCKS];
    TRY(jint_list(j, "cross_attention_dim", c->n_blocks, 1280, 1, 1 << 16, cad));
    for (int i = 1; i < c->n_blocks; i++)
        if (cad[i] != cad[0])
            return ms_errorf(MS_ERR_UNSUPPORTED, "%s: cross_attention_dim differs between blocks", jorigin(j));
    c->cross_attention_dim = cad[0];
    TRY(jint_list(j, "attention_head_dim", c->n_blocks, 8, 1, 1 << 16, c->attention_head_dim));
    TRY(jint_list(j, "num_attention_heads", c->n_blocks, 0, 0, 1 << 16, c->num_attention_heads));
    TRY(jint_list(j, "transformer_layers_per_block", c->n_blocks, 1, 1, 64, c->transformer_layers_per_block));
    TRY(jbool(j, "use_linear_projection", 0, &c->use_linear_projection));
    TRY(jbool(j, "upcast_attention", 0, &c->upcast_attention));
    TRY(jint(j, "time_embedding_dim", 0, 0, 1 << 16, &c->time_embedding_dim));
    TRY(jint(j, "conv_in_kernel", 3, 1, 7, &c->conv_in_kernel));
    TRY(jint(j, "conv_out_kernel", 3, 1, 7, &c->conv_out_kernel));
    return checked(ms_unet_config_check(c), j);
}

/* AutoencoderKL.__init__ defaults. */
MsStatus ms_vae_config_from_json(const JsonValue *j, VaeConfig *c) {
    double x;
    ms_vae_config_sd15(c);
    if (!j || j->type != JSON_OBJECT)
        return ms_errorf(MS_ERR_FORMAT, "%s: vae config: expected a JSON object", jorigin(j));
    TRY(junsupported(j, "act_fn", "silu", -1));
    TRY(jint(j, "sample_size", 32, 1, 1 << 20, &c->sample_size));
    TRY(jint(j, "in_channels", 3, 1, 1 << 16, &c->in_channels));
    TRY(jint(j, "out_channels", 3, 1, 1 << 16, &c->out_channels));
    TRY(jint(j, "latent_channels", 4, 1, 1 << 16, &c->latent_channels));
    TRY(jchannels(j, "block_out_channels", c->block_out_channels, &c->n_blocks));
    TRY(jblocks(j, "down_block_types", c->n_blocks, c->down_block_types));
    TRY(jblocks(j, "up_block_types", c->n_blocks, c->up_block_types));
    TRY(jint(j, "layers_per_block", 1, 1, 64, &c->layers_per_block));
    TRY(jint(j, "norm_num_groups", 32, 1, 1 << 16, &c->norm_num_groups));
    TRY(jnum(j, "scaling_factor", 0.18215, &x)); c->scaling_factor = (float)x;
    TRY(jbool(j, "force_upcast", 1, &c->force_upcast));
    return checked(ms_vae_config_check(c), j);
}

/* transformers CLIPTextConfig defaults. */
MsStatus ms_clip_text_config_from_json(const JsonValue *j, ClipTextConfig *c) {
    double x;
    const char *act;
    ms_clip_text_config_sd15(c);
    if (!j || j->type != JSON_OBJECT)
        return ms_errorf(MS_ERR_FORMAT, "%s: text_encoder config: expected a JSON object", jorigin(j));
    TRY(jint(j, "vocab_size", 49408, 1, 1 << 24, &c->vocab_size));
    TRY(jint(j, "hidden_size", 512, 1, 1 << 16, &c->hidden_size));
    TRY(jint(j, "intermediate_size", 2048, 1, 1 << 18, &c->intermediate_size));
    TRY(jint(j, "projection_dim", 512, 0, 1 << 16, &c->projection_dim));
    TRY(jint(j, "num_hidden_layers", 12, 1, 256, &c->num_hidden_layers));
    TRY(jint(j, "num_attention_heads", 8, 1, 1 << 16, &c->num_attention_heads));
    TRY(jint(j, "max_position_embeddings", 77, 1, 1 << 16, &c->max_position_embeddings));
    TRY(jstr(j, "hidden_act", "quick_gelu", &act));
    if (!strcmp(act, "quick_gelu")) c->hidden_act = MS_ACT_QUICK_GELU;
    else if (!strcmp(act, "gelu")) c->hidden_act = MS_ACT_GELU;
    else {
        const JsonValue *v = json_get(j, "hidden_act");
        return ms_errorf(MS_ERR_UNSUPPORTED, "%s:%d:%d: hidden_act '%s': expected quick_gelu or gelu", jorigin(v),
                         v->line, v->col, act);
    }
    TRY(jnum(j, "layer_norm_eps", 1e-5, &x)); c->layer_norm_eps = (float)x;
    TRY(jint(j, "pad_token_id", 1, -1, 1 << 24, &c->pad_token_id));
    TRY(jint(j, "bos_token_id", 0, -1, 1 << 24, &c->bos_token_id));
    TRY(jint(j, "eos_token_id", 2, -1, 1 << 24, &c->eos_token_id));
    return checked(ms_clip_text_config_check(c), j);
}

/* HF CLIPConfig (config.json of a CLIPModel): text_config (CLIPTextConfig defaults), vision_config
 * (CLIPVisionConfig defaults), projection_dim; an absent sub-config takes its defaults, and the
 * older *_config_dict names are read when *_config is absent (as CLIPConfig.__init__ does). */
MsStatus ms_clip_model_config_from_json(const JsonValue *j, ClipModelConfig *c) {
    double x;
    const char *act;
    ms_clip_model_config_b32(c);
    if (!j || j->type != JSON_OBJECT)
        return ms_errorf(MS_ERR_FORMAT, "%s: CLIP config: expected a JSON object", jorigin(j));
    const JsonValue *t = json_get(j, "text_config"), *v = json_get(j, "vision_config");
    if (jnull(t)) t = json_get(j, "text_config_dict");
    if (jnull(v)) v = json_get(j, "vision_config_dict");
    if (!jnull(t)) TRY(ms_clip_text_config_from_json(t, &c->text));
    TRY(jint(j, "projection_dim", 512, 1, 1 << 16, &c->projection_dim));
    if (!jnull(v)) {
        if (v->type != JSON_OBJECT)
            return ms_errorf(MS_ERR_FORMAT, "%s:%d:%d: vision_config: expected a JSON object", jorigin(v), v->line, v->col);
        TRY(jint(v, "hidden_size", 768, 1, 1 << 16, &c->vision.hidden_size));
        TRY(jint(v, "intermediate_size", 3072, 1, 1 << 18, &c->vision.intermediate_size));
        TRY(jint(v, "num_hidden_layers", 12, 0, CLIP_MAX_LAYERS, &c->vision.num_hidden_layers));
        TRY(jint(v, "num_attention_heads", 12, 1, 1 << 16, &c->vision.num_attention_heads));
        TRY(jint(v, "num_channels", 3, 1, 64, &c->vision.num_channels));
        TRY(jint(v, "image_size", 224, 1, 1 << 14, &c->vision.image_size));
        TRY(jint(v, "patch_size", 32, 1, 1 << 14, &c->vision.patch_size));
        TRY(jstr(v, "hidden_act", "quick_gelu", &act));
        if (!strcmp(act, "quick_gelu")) c->vision.hidden_act = MS_ACT_QUICK_GELU;
        else if (!strcmp(act, "gelu")) c->vision.hidden_act = MS_ACT_GELU;
        else {
            const JsonValue *h = json_get(v, "hidden_act");
            return ms_errorf(MS_ERR_UNSUPPORTED, "%s:%d:%d: vision_config hidden_act '%s': expected quick_gelu or gelu",
                             jorigin(h), h->line, h->col, act);
        }
        TRY(jnum(v, "layer_norm_eps", 1e-5, &x)); c->vision.layer_norm_eps = (float)x;
    }
    return checked(ms_clip_model_config_check(c), j);
}

/* T2IAdapter.__init__ defaults. */
MsStatus ms_adapter_config_from_json(const JsonValue *j, AdapterConfig *c) {
    const char *type;
    ms_adapter_config_sd15(c, 3);
    if (!j || j->type != JSON_OBJECT)
        return ms_errorf(MS_ERR_FORMAT, "%s: adapter config: expected a JSON object", jorigin(j));
    TRY(jstr(j, "adapter_type", "full_adapter", &type));
    if (!strcmp(type, "full_adapter")) c->adapter_type = MS_ADAPTER_FULL;
    else if (!strcmp(type, "light_adapter")) c->adapter_type = MS_ADAPTER_LIGHT;
    else {
        const JsonValue *v = json_get(j, "adapter_type");
        return ms_errorf(MS_ERR_UNSUPPORTED, "%s:%d:%d: adapter_type '%s' unknown", jorigin(v), v->line, v->col, type);
    }
    TRY(jint(j, "in_channels", 3, 1, 64, &c->in_channels));
    if (json_get(j, "channels")) TRY(jchannels(j, "channels", c->channels, &c->n_channels));
    TRY(jint(j, "num_res_blocks", 2, 1, 64, &c->num_res_blocks));
    TRY(jint(j, "downscale_factor", 8, 1, 64, &c->downscale_factor));
    return checked(ms_adapter_config_check(c), j);
}

/* SchedulerMixin configs: the keys of DDPM/DDIM/PNDM/DPMSolverMultistep/Euler (0.19.3). */
MsStatus ms_scheduler_config_from_json(const JsonValue *j, SchedulerConfig *c) {
    const char *str;
    memset(c, 0, sizeof *c);
    if (!j || j->type != JSON_OBJECT)
        return ms_errorf(MS_ERR_FORMAT, "%s: scheduler config: expected a JSON object", jorigin(j));
    const JsonValue *tb = json_get(j, "trained_betas");
    if (!jnull(tb) && !(tb->type == JSON_ARRAY && tb->count == 0))
        return ms_errorf(MS_ERR_UNSUPPORTED, "%s:%d:%d: trained_betas: only null is supported", jorigin(tb),
                         tb->line, tb->col);
    TRY(jstr(j, "_class_name", "", &str));
    snprintf(c->class_name, sizeof c->class_name, "%s", str);
    TRY(jint(j, "num_train_timesteps", 1000, 1, 1 << 20, &c->num_train_timesteps));
    TRY(jnum(j, "beta_start", 0.0001, &c->beta_start));
    TRY(jnum(j, "beta_end", 0.02, &c->beta_end));
    TRY(jstr(j, "beta_schedule", "linear", &str));
    if (!strcmp(str, "linear")) c->beta_schedule = MS_BETA_LINEAR;
    else if (!strcmp(str, "scaled_linear")) c->beta_schedule = MS_BETA_SCALED_LINEAR;
    else if (!strcmp(str, "squaredcos_cap_v2")) c->beta_schedule = MS_BETA_SQUAREDCOS_CAP_V2;
    else return ms_errorf(MS_ERR_UNSUPPORTED, "%s: beta_schedule '%s': expected linear, scaled_linear or "
                          "squaredcos_cap_v2", jorigin(j), str);
    TRY(jint(j, "steps_offset", 0, 0, 1 << 20, &c->steps_offset));
    TRY(jstr(j, "prediction_type", "epsilon", &str));
    if (!strcmp(str, "epsilon")) c->prediction_type = MS_PRED_EPSILON;
    else if (!strcmp(str, "v_prediction")) c->prediction_type = MS_PRED_V;
    else if (!strcmp(str, "sample")) c->prediction_type = MS_PRED_SAMPLE;
    else return ms_errorf(MS_ERR_UNSUPPORTED, "%s: prediction_type '%s': expected epsilon, v_prediction or sample",
                          jorigin(j), str);
    TRY(jstr(j, "timestep_spacing", NULL, &str));
    if (!str) c->timestep_spacing = MS_SPACING_ABSENT;
    else if (!strcmp(str, "linspace")) c->timestep_spacing = MS_SPACING_LINSPACE;
    else if (!strcmp(str, "leading")) c->timestep_spacing = MS_SPACING_LEADING;
    else if (!strcmp(str, "trailing")) c->timestep_spacing = MS_SPACING_TRAILING;
    else return ms_errorf(MS_ERR_UNSUPPORTED, "%s: timestep_spacing '%s': expected linspace, leading or trailing",
                          jorigin(j), str);
    TRY(jbool(j, "set_alpha_to_one", 0, &c->set_alpha_to_one));
    TRY(jbool(j, "skip_prk_steps", 0, &c->skip_prk_steps));
    TRY(jbool(j, "clip_sample", 0, &c->clip_sample));
    TRY(jnum(j, "clip_sample_range", 1.0, &c->clip_sample_range));
    return checked(ms_scheduler_config_check(c), j);
}

/* ---------------------------------------------------------------------------------------- */
/* Tensor sources: the tensors of one file, whatever its format                              */
/* ---------------------------------------------------------------------------------------- */
typedef struct {
    const char *name;               /* the key (inside "state_dict" for .ckpt files) */
    StDtype dtype;
    int ndim;
    const int64_t *shape;
    size_t numel;
    const unsigned char *data;      /* safetensors: numel little-endian values, contiguous */
    const PthTensor *pt;            /* PyTorch pickles: read on demand (any strides) */
    const StTensor *st;             /* safetensors: the entry (to release its pages after use) */
} SrcTensor;

typedef struct {
    char origin[1024];
    SrcTensor *t;
    size_t n;
    StFile st;
    PthFile pf;
    int is_st, is_pth;
} Source;

static void src_close(Source *s) {
    free(s->t);
    if (s->is_st) st_close(&s->st);
    if (s->is_pth) pth_close(&s->pf);
    memset(s, 0, sizeof *s);
}

static int file_exists(const char *path) {
    FILE *f = fopen(path, "rb");
    if (f) fclose(f);
    return f != NULL;
}

/* The tensor list of an opened safetensors file. */
static MsStatus src_from_st(Source *s) {
    s->t = (SrcTensor *)calloc(s->st.count ? s->st.count : 1, sizeof *s->t);
    if (!s->t) { src_close(s); return ms_errorf(MS_ERR_NOMEM, "%s: out of memory", s->origin); }
    for (size_t i = 0; i < s->st.count; i++) {
        const StTensor *t = &s->st.tensors[i];
        SrcTensor *o = &s->t[i];
        o->name = t->name; o->dtype = t->dtype; o->ndim = t->ndim; o->shape = t->shape;
        o->numel = t->numel; o->data = t->data; o->st = t;
    }
    s->n = s->st.count;
    return MS_OK;
}

static StDtype st_of_pth(PthDtype d) {
    switch (d) {
    case PTH_F32: return ST_F32;
    case PTH_F16: return ST_F16;
    case PTH_BF16: return ST_BF16;
    case PTH_F64: return ST_F64;
    case PTH_I64: return ST_I64;
    case PTH_I32: return ST_I32;
    case PTH_I16: return ST_I16;
    case PTH_I8: return ST_I8;
    case PTH_U8: return ST_U8;
    default: return ST_BOOL;
    }
}

/* The tensors of a torch.save file. A Lightning/LDM .ckpt holds the weights under
 * "state_dict" (next to global_step, optimizer states, ...): then only those count. */
static MsStatus src_from_pth(Source *s) {
    int has_sd = 0;
    for (size_t i = 0; i < s->pf.n; i++)
        if (!strncmp(s->pf.t[i].name, "state_dict.", 11)) has_sd = 1;
    s->t = (SrcTensor *)calloc(s->pf.n ? s->pf.n : 1, sizeof *s->t);
    if (!s->t) { src_close(s); return ms_errorf(MS_ERR_NOMEM, "%s: out of memory", s->origin); }
    for (size_t i = 0; i < s->pf.n; i++) {
        const PthTensor *t = &s->pf.t[i];
        if (has_sd && (strncmp(t->name, "state_dict.", 11) || t->leaf != 11)) continue;
        SrcTensor *o = &s->t[s->n++];
        o->name = t->name + t->leaf; o->dtype = st_of_pth(t->dtype); o->ndim = t->ndim; o->shape = t->shape;
        o->numel = pth_numel(t); o->pt = t;
    }
    return MS_OK;
}

static MsStatus src_open(Source *s, const char *path) {
    unsigned char head[8] = { 0 };
    memset(s, 0, sizeof *s);
    snprintf(s->origin, sizeof s->origin, "%s", path);
    FILE *f = fopen(path, "rb");
    if (!f) return ms_errorf(MS_ERR_IO, "%s: cannot open", path);
    size_t got = fread(head, 1, 8, f);
    fclose(f);
    if (got >= 4 && head[0] == 'P' && head[1] == 'K') {
        MsStatus st = pth_open(&s->pf, path);
        s->is_pth = 1;
        return st ? (src_close(s), st) : src_from_pth(s);
    }
    if (got >= 2 && head[0] == 0x80)
        return ms_errorf(MS_ERR_UNSUPPORTED, "%s: a legacy (pre-1.6, non-zip) PyTorch pickle: re-save it with "
                         "torch.save or convert it to .safetensors", path);
    MsStatus st = st_open(&s->st, path);
    s->is_st = 1;
    return st ? (src_close(s), st) : src_from_st(s);
}

static MsStatus src_open_memory(Source *s, const void *data, size_t size, const char *origin) {
    memset(s, 0, sizeof *s);
    snprintf(s->origin, sizeof s->origin, "%s", origin);
    MsStatus st = st_open_memory(&s->st, data, size, origin);
    s->is_st = 1;
    return st ? (src_close(s), st) : src_from_st(s);
}

/* Little-endian values -> float (F32/F16/BF16 exact, F64 rounded to nearest). */
static void to_f32(const SrcTensor *t, float *out) {
    const unsigned char *p = t->data;
    size_t n = t->numel;
    switch (t->dtype) {
    case ST_F32:
        for (size_t i = 0; i < n; i++, p += 4) {
            uint32_t b = p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
            memcpy(&out[i], &b, 4);
        }
        break;
    case ST_F16:
        for (size_t i = 0; i < n; i++, p += 2) out[i] = st_f16_to_f32((uint16_t)(p[0] | p[1] << 8));
        break;
    case ST_BF16:
        for (size_t i = 0; i < n; i++, p += 2) out[i] = st_bf16_to_f32((uint16_t)(p[0] | p[1] << 8));
        break;
    case ST_F64:
        for (size_t i = 0; i < n; i++, p += 8) {
            uint64_t b = 0;
            double d;
            for (int k = 7; k >= 0; k--) b = b << 8 | p[k];
            memcpy(&d, &b, 8);
            out[i] = (float)d;
        }
        break;
    default:
        break;   /* excluded by the dtype check */
    }
}

static MsStatus src_read_f32(Source *s, const SrcTensor *x, float *out) {
    if (x->pt) return pth_read_f32(&s->pf, x->pt, out);
    to_f32(x, out);
    return MS_OK;
}

/* F16/BF16 bit patterns in host order */
static MsStatus src_read_half(Source *s, const SrcTensor *x, uint16_t *out) {
    if (x->pt) return pth_read_raw(&s->pf, x->pt, out);
    for (size_t e = 0; e < x->numel; e++) out[e] = (uint16_t)(x->data[2 * e] | x->data[2 * e + 1] << 8);
    return MS_OK;
}

static int float_dtype(StDtype d) { return d == ST_F32 || d == ST_F16 || d == ST_BF16 || d == ST_F64; }

/* ---------------------------------------------------------------------------------------- */
/* Matching a source against parameter tables                                                */
/* ---------------------------------------------------------------------------------------- */
typedef struct {
    MsParamTable *t;
    const char *what;      /* "unet", ... for messages */
    int *src;              /* per table entry: source tensor index or -1 */
} Target;

/* Matches every tensor of s against the targets (LDM keys when ldm), checks shapes and dtypes,
 * then allocates and fills each table. */
static MsStatus fill(Source *s, Target *tg, int ntg, int ldm, const MsLoadOptions *opt) {
    MsStatus st = MS_OK;
    char sh1[96], sh2[96], key[MS_KEY_MAX + 32];
    size_t n_extra = 0, n_missing = 0;
    char first_extra[512] = "", first_missing[512] = "";
    MsDtype *dt = NULL;

    for (int k = 0; k < ntg; k++) {
        tg[k].src = (int *)malloc((size_t)(tg[k].t->n ? tg[k].t->n : 1) * sizeof(int));
        if (!tg[k].src) { st = ms_errorf(MS_ERR_NOMEM, "%s: out of memory", s->origin); goto done; }
        for (int i = 0; i < tg[k].t->n; i++) tg[k].src[i] = -1;
    }
    for (size_t i = 0; i < s->n; i++) {
        const SrcTensor *x = &s->t[i];
        int k, idx = -1;
        if (ldm) {
            if (ms_ldm_key_normalize(x->name, key, sizeof key) < 0) key[0] = '\0';
        } else {
            snprintf(key, sizeof key, "%s", x->name);
        }
        for (k = 0; k < ntg && idx < 0; k++)
            idx = ldm ? ms_param_find_ldm(tg[k].t, key) : ms_param_find(tg[k].t, key);
        k--;
        if (idx < 0) {
            if (ldm && ms_ldm_key_is_harmless(x->name)) continue;
            if (!n_extra++)
                snprintf(first_extra, sizeof first_extra, "'%.200s' %s", x->name,
                         ms_shape_str(sh1, sizeof sh1, x->ndim, x->shape));
            continue;
        }
        const MsParam *p = &tg[k].t->p[idx];
        if (tg[k].src[idx] >= 0) {
            st = ms_errorf(MS_ERR_FORMAT, "%s: tensors '%s' and '%s' both hold %s parameter '%s'", s->origin,
                           s->t[tg[k].src[idx]].name, x->name, tg[k].what, p->name);
            goto done;
        }
        if (!ms_param_shape_ok(p, x->ndim, x->shape)) {
            st = ms_errorf(MS_ERR_SHAPE, "%s: tensor '%s' has shape %s, expected %s (%s parameter '%s')", s->origin,
                           x->name, ms_shape_str(sh1, sizeof sh1, x->ndim, x->shape),
                           ms_shape_str(sh2, sizeof sh2, ldm ? p->ldm_ndim : p->ndim, p->shape), tg[k].what, p->name);
            goto done;
        }
        if (!(p->flags & MS_PARAM_BUFFER) && !float_dtype(x->dtype)) {
            st = ms_errorf(MS_ERR_FORMAT, "%s: tensor '%s' has dtype %s, expected F32, F16, BF16 or F64", s->origin,
                           x->name, st_dtype_name(x->dtype));
            goto done;
        }
        tg[k].src[idx] = (int)i;
    }
    for (int k = 0; k < ntg; k++)
        for (int i = 0; i < tg[k].t->n; i++) {
            const MsParam *p = &tg[k].t->p[i];
            if (tg[k].src[i] >= 0 || (p->flags & MS_PARAM_BUFFER)) continue;
            if (!n_missing++)
                snprintf(first_missing, sizeof first_missing, "'%s' %s (%s parameter '%s')", ldm ? p->ldm : p->name,
                         ms_shape_str(sh1, sizeof sh1, ldm ? p->ldm_ndim : p->ndim, p->shape), tg[k].what, p->name);
        }
    if (n_missing) {
        st = ms_errorf(MS_ERR_FORMAT, "%s: missing tensor %s (%zu missing in all)", s->origin, first_missing, n_missing);
        goto done;
    }
    if (n_extra) {
        st = ms_errorf(MS_ERR_FORMAT, "%s: unexpected tensor %s: not a parameter of the configured %s%s (%zu "
                       "unexpected in all)", s->origin, first_extra, ntg == 1 ? tg[0].what : "model",
                       ldm ? " (original LDM layout)" : "", n_extra);
        goto done;
    }
    /* allocate (16-bit where asked and stored so) and convert */
    for (int k = 0; k < ntg; k++) {
        MsParamTable *t = tg[k].t;
        free(dt);
        dt = (MsDtype *)malloc((size_t)(t->n ? t->n : 1) * sizeof *dt);
        if (!dt) { st = ms_errorf(MS_ERR_NOMEM, "%s: out of memory", s->origin); goto done; }
        for (int i = 0; i < t->n; i++) {
            StDtype d = tg[k].src[i] >= 0 ? s->t[tg[k].src[i]].dtype : ST_F32;
            dt[i] = opt && opt->keep_half && d == ST_F16 ? MS_DT_F16 : opt && opt->keep_half && d == ST_BF16 ? MS_DT_BF16
                  : MS_DT_F32;
        }
        if ((st = ms_param_table_alloc(t, dt))) goto done;
        for (int i = 0; i < t->n; i++) {
            MsParam *p = &t->p[i];
            if (tg[k].src[i] < 0 || (p->flags & MS_PARAM_BUFFER)) continue;
            const SrcTensor *x = &s->t[tg[k].src[i]];
            if ((st = p->f32 ? src_read_f32(s, x, p->f32) : src_read_half(s, x, p->half))) goto done;
            if (x->st) st_release(&s->st, x->st);
        }
    }
done:
    free(dt);
    for (int k = 0; k < ntg; k++) { free(tg[k].src); tg[k].src = NULL; }
    return st;
}

MsStatus ms_table_fill_file(MsParamTable *t, const char *path, int ldm, const char *what, const MsLoadOptions *opt) {
    Source s;
    Target tg = { t, what, NULL };
    MsStatus st = src_open(&s, path);
    if (st) return st;
    st = fill(&s, &tg, 1, ldm, opt);
    src_close(&s);
    return st;
}

MsStatus ms_table_fill_memory(MsParamTable *t, const void *data, size_t size, const char *origin, int ldm,
                              const char *what, const MsLoadOptions *opt) {
    Source s;
    Target tg = { t, what, NULL };
    MsStatus st = src_open_memory(&s, data, size, origin);
    if (st) return st;
    st = fill(&s, &tg, 1, ldm, opt);
    src_close(&s);
    return st;
}

/* ---------------------------------------------------------------------------------------- */
/* Diffusers folders and single files                                                        */
/* ---------------------------------------------------------------------------------------- */
static MsStatus read_json(const char *dir, const char *sub, const char *file, JsonValue **j) {
    char path[2048];
    snprintf(path, sizeof path, "%s/%s%s%s", dir, sub, *sub ? "/" : "", file);
    return json_parse_file(path, j);
}

/* The configs of a diffusers folder (any of unet, vae, text may be NULL). */
static MsStatus read_configs(const char *dir, UNetConfig *u, VaeConfig *v, ClipTextConfig *t, SchedulerConfig *sc) {
    JsonValue *j = NULL;
    MsStatus s = MS_OK;
    if (u && !(s = read_json(dir, "unet", "config.json", &j))) s = ms_unet_config_from_json(j, u);
    json_free(j); j = NULL;
    if (!s && v && !(s = read_json(dir, "vae", "config.json", &j))) s = ms_vae_config_from_json(j, v);
    json_free(j); j = NULL;
    if (!s && t && !(s = read_json(dir, "text_encoder", "config.json", &j))) s = ms_clip_text_config_from_json(j, t);
    json_free(j); j = NULL;
    if (!s && sc && !(s = read_json(dir, "scheduler", "scheduler_config.json", &j)))
        s = ms_scheduler_config_from_json(j, sc);
    json_free(j);
    return s;
}

/* dir/sub/<first existing candidate> */
static MsStatus find_weights(const char *dir, const char *sub, char *out, size_t cap) {
    static const char *const names[] = {
        "diffusion_pytorch_model.safetensors", "model.safetensors", "diffusion_pytorch_model.bin",
        "pytorch_model.bin", "diffusion_pytorch_model.fp16.safetensors", "model.fp16.safetensors",
        "diffusion_pytorch_model.fp16.bin", "pytorch_model.fp16.bin"
    };
    for (size_t i = 0; i < sizeof names / sizeof names[0]; i++) {
        snprintf(out, cap, "%s/%s/%s", dir, sub, names[i]);
        if (file_exists(out)) return MS_OK;
    }
    return ms_errorf(MS_ERR_IO, "%s/%s: no weights file (diffusion_pytorch_model.safetensors, model.safetensors, "
                     "*.bin)", dir, sub);
}

static int is_dir_model(const char *path) {
    char p[2048];
    snprintf(p, sizeof p, "%s/model_index.json", path);
    return file_exists(p);
}

static MsStatus build_tables(MsModel *m) {
    MsStatus s;
    if ((s = ms_param_table_unet(&m->unet_config, &m->unet))) return s;
    if ((s = ms_param_table_vae(&m->vae_config, &m->vae))) return s;
    return ms_param_table_text(&m->text_config, &m->text);
}

/* The configs of a single file, when no --config is given: the JSON configs `mixshow convert`
 * stores in a safetensors file's metadata (mixshow.unet_config, ...: all four, or none used),
 * else what the tensor shapes say (tools/model_infer.c). */
static const char *const META_KEYS[4] = { "mixshow.unet_config", "mixshow.vae_config", "mixshow.text_encoder_config",
                                          "mixshow.scheduler_config" };

static MsStatus single_file_configs(Source *src, MsModel *m, char *notes, size_t cap) {
    MsStatus s = MS_OK;
    if (src->is_st && st_meta(&src->st, META_KEYS[0])) {
        for (int k = 0; k < 4 && !s; k++) {
            const char *txt = st_meta(&src->st, META_KEYS[k]);
            char origin[1200];
            JsonValue *j = NULL;
            snprintf(origin, sizeof origin, "%s: metadata %s", src->origin, META_KEYS[k]);
            if (!txt) return ms_errorf(MS_ERR_FORMAT, "%s: metadata has %s but no %s", src->origin, META_KEYS[0],
                                       META_KEYS[k]);
            if ((s = json_parse(txt, strlen(txt), origin, &j))) return s;
            s = k == 0 ? ms_unet_config_from_json(j, &m->unet_config)
              : k == 1 ? ms_vae_config_from_json(j, &m->vae_config)
              : k == 2 ? ms_clip_text_config_from_json(j, &m->text_config)
                       : ms_scheduler_config_from_json(j, &m->scheduler_config);
            json_free(j);
        }
        if (!s && notes && cap) snprintf(notes, cap, "configs from the file's metadata (written by mixshow convert).\n");
        return s;
    }
    /* shapes, text-encoder keys in their current form */
    MsShapeEntry *e = (MsShapeEntry *)calloc(src->n ? src->n : 1, sizeof *e);
    char *names = (char *)malloc((src->n ? src->n : 1) * (MS_KEY_MAX + 32));
    if (!e || !names) { free(e); free(names); return ms_errorf(MS_ERR_NOMEM, "%s: out of memory", src->origin); }
    size_t n = 0;
    for (size_t i = 0; i < src->n; i++) {
        char *k = names + i * (MS_KEY_MAX + 32);
        if (ms_ldm_key_normalize(src->t[i].name, k, MS_KEY_MAX + 32) < 0) continue;   /* too long: no parameter */
        e[n].name = k; e[n].ndim = src->t[i].ndim; e[n].shape = src->t[i].shape;
        n++;
    }
    s = ms_infer_ldm_configs(e, n, src->origin, m, notes, cap);
    free(e); free(names);
    return s;
}

static MsStatus model_load(const char *path, const MsLoadOptions *opt, MsModel *m, int infer, char *notes,
                           size_t cap) {
    MsStatus s;
    memset(m, 0, sizeof *m);
    if (is_dir_model(path)) {
        static const char *const sub[3] = { "unet", "vae", "text_encoder" };
        JsonValue *idx = NULL;
        if ((s = read_json(path, "", "model_index.json", &idx))) return s;
        for (int k = 0; k < 3 && !s; k++)
            if (!json_get(idx, sub[k]))
                s = ms_errorf(MS_ERR_FORMAT, "%s/model_index.json: no '%s' component", path, sub[k]);
        json_free(idx);
        if (s) return s;
        const char *cdir = infer && opt && opt->config_dir ? opt->config_dir : path;   /* --config wins */
        if ((s = read_configs(cdir, &m->unet_config, &m->vae_config, &m->text_config, &m->scheduler_config)) ||
            (s = build_tables(m)))
            goto fail;
        MsParamTable *tabs[3] = { &m->unet, &m->vae, &m->text };
        for (int k = 0; k < 3; k++) {
            char w[2048];
            if ((s = find_weights(path, sub[k], w, sizeof w)) || (s = ms_table_fill_file(tabs[k], w, 0, sub[k], opt)))
                goto fail;
        }
        return MS_OK;
    }
    /* a single file in the original LDM layout */
    {
        Source src;
        Target tg[3] = { { &m->unet, "unet", NULL }, { &m->vae, "vae", NULL }, { &m->text, "text_encoder", NULL } };
        if ((s = src_open(&src, path))) goto fail;
        if (opt && opt->config_dir) {
            s = read_configs(opt->config_dir, &m->unet_config, &m->vae_config, &m->text_config, &m->scheduler_config);
            if (!s && notes && cap) snprintf(notes, cap, "configs from %s (--config).\n", opt->config_dir);
        } else if (!infer) {
            ms_unet_config_sd15(&m->unet_config);
            ms_vae_config_sd15(&m->vae_config);
            ms_clip_text_config_sd15(&m->text_config);
            ms_scheduler_config_sd15(&m->scheduler_config);
        } else {
            s = single_file_configs(&src, m, notes, cap);
        }
        if (!s) s = build_tables(m);
        if (!s) s = fill(&src, tg, 3, 1, opt);
        src_close(&src);
        if (s) goto fail;
    }
    return MS_OK;
fail:
    ms_model_free(m);
    return s;
}

MsStatus ms_model_load(const char *path, const MsLoadOptions *opt, MsModel *m) {
    return model_load(path, opt, m, 0, NULL, 0);
}

MsStatus ms_model_load_ex(const char *path, const MsLoadOptions *opt, MsModel *m, char *notes, size_t cap) {
    if (notes && cap) notes[0] = 0;
    return model_load(path, opt, m, 1, notes, cap);
}

MsStatus ms_adapter_load(const char *path, const MsLoadOptions *opt, AdapterConfig *c, MsParamTable *t) {
    MsStatus s;
    JsonValue *j = NULL;
    char w[2048];
    memset(t, 0, sizeof *t);
    snprintf(w, sizeof w, "%s/config.json", path);
    if (file_exists(w)) {            /* a diffusers T2IAdapter folder */
        if ((s = json_parse_file(w, &j))) return s;
        s = ms_adapter_config_from_json(j, c);
        json_free(j);
        if (s) return s;
        if ((s = ms_param_table_adapter(c, t))) return s;
        if ((s = find_weights(path, ".", w, sizeof w))) goto fail;
        if ((s = ms_table_fill_file(t, w, 0, "t2iadapter", opt))) goto fail;
        return MS_OK;
    }
    /* a TencentARC file: widths from the shapes (body.k.block1 [C,C,3,3], k = level * R + j),
     * in_channels from conv_in [C0, cin*64, 3, 3]; num_res_blocks 2 (SD 1.x), and when the body
     * holds no multiple of 2 entries, one per level */
    Source src;
    if ((s = src_open(&src, path))) return s;
    int cin = 3, width[64], nb = 0;
    for (size_t i = 0; i < src.n; i++)
        if (!strcmp(src.t[i].name, "conv_in.weight") && src.t[i].ndim == 4 && src.t[i].shape[1] % 64 == 0 &&
            src.t[i].shape[1] / 64 >= 1 && src.t[i].shape[1] / 64 <= 64)
            cin = (int)(src.t[i].shape[1] / 64);
    for (int k = 0; k < 64; k++) {
        char key[64];
        size_t i;
        snprintf(key, sizeof key, "body.%d.block1.weight", k);
        for (i = 0; i < src.n && strcmp(src.t[i].name, key); i++) {}
        if (i == src.n || src.t[i].ndim != 4 || src.t[i].shape[0] < 1 || src.t[i].shape[0] > (1 << 16)) break;
        width[nb++] = (int)src.t[i].shape[0];
    }
    ms_adapter_config_sd15(c, cin);
    if (nb > 0) {
        int R = nb % 2 == 0 && nb / 2 <= MS_MAX_BLOCKS ? 2 : 1;
        for (int j = 0; j < nb && R == 2; j += 2) if (width[j] != width[j + 1]) R = 1;
        if (nb / R <= MS_MAX_BLOCKS) {
            c->num_res_blocks = R;
            c->n_channels = nb / R;
            for (int i = 0; i < c->n_channels; i++) c->channels[i] = width[i * R];
        }
    }
    if (!(s = ms_param_table_adapter(c, t))) {
        Target tg = { t, "t2iadapter", NULL };
        s = fill(&src, &tg, 1, 1, opt);
    }
    src_close(&src);
    if (s) goto fail;
    return MS_OK;
fail:
    ms_param_table_free(t);
    return s;
}

/* ---------------------------------------------------------------------------------------- */
/* Data roots, the shipped tokenizer, and ms_open_model                                      */
/* ---------------------------------------------------------------------------------------- */
static char g_argv0[2048];

void ms_set_argv0(const char *argv0) { snprintf(g_argv0, sizeof g_argv0, "%s", argv0 ? argv0 : ""); }

/* The folder of the running executable into buf ("" when unknown). */
static void exe_dir(char *buf, size_t cap) {
    buf[0] = 0;
#if defined(__linux__)
    ssize_t n = readlink("/proc/self/exe", buf, cap - 1);
    if (n > 0) {
        buf[n] = 0;
        char *slash = strrchr(buf, '/');
        if (slash) { *slash = 0; return; }
    }
    buf[0] = 0;
#endif
    if (!g_argv0[0]) return;
    if (strchr(g_argv0, '/')) {                       /* a path: its folder */
        snprintf(buf, cap, "%s", g_argv0);
        char *slash = strrchr(buf, '/');
        if (slash == buf) slash[1] = 0; else *slash = 0;
        return;
    }
    const char *path = getenv("PATH");                /* a bare name: the first PATH entry holding it */
    while (path && *path) {
        const char *colon = strchr(path, ':');
        size_t len = colon ? (size_t)(colon - path) : strlen(path);
        char probe[4200];
        snprintf(probe, sizeof probe, "%.*s/%s", (int)(len < 2048 ? len : 2048), path, g_argv0);
        if (len && file_exists(probe)) { snprintf(buf, cap, "%.*s", (int)(len < cap - 1 ? len : cap - 1), path); return; }
        path = colon ? colon + 1 : NULL;
    }
}

int ms_find_data(const char *rel, char *out, size_t cap) {
    char dir[2048], root[2300], probe[4700];
    exe_dir(dir, sizeof dir);
    if (dir[0]) {
        static const char *const up[4] = { "", "/..", "/../..", "/../../.." };
        for (int k = 0; k < 4; k++)
            for (int inst = 0; inst < 2; inst++) {
                snprintf(root, sizeof root, "%s%s%s", dir, up[k], inst ? "/share/mixshow" : "");
                snprintf(probe, sizeof probe, "%s/%s", root, rel);
                if (file_exists(probe)) { snprintf(out, cap, "%s", probe); return 1; }
            }
    }
#ifdef MS_DATADIR
    snprintf(probe, sizeof probe, "%s/%s", MS_DATADIR, rel);
    if (file_exists(probe)) { snprintf(out, cap, "%s", probe); return 1; }
#endif
    if (file_exists(rel)) { snprintf(out, cap, "%s", rel); return 1; }
    return 0;
}

/* rel names a file; out gets its folder */
static int find_data_dir(const char *rel_file, char *out, size_t cap) {
    if (!ms_find_data(rel_file, out, cap)) return 0;
    char *slash = strrchr(out, '/');
    if (slash) *slash = 0;
    return 1;
}

const char *ms_default_model(char *out, size_t cap) {
    if (find_data_dir("models/world/model_index.json", out, cap)) return "models/world";
    if (find_data_dir("models/tiny-sd/model_index.json", out, cap)) return "models/tiny-sd";
    return NULL;
}

int ms_find_tiny_model(char *out, size_t cap) { return find_data_dir("models/tiny-sd/model_index.json", out, cap); }

MsStatus ms_find_tokenizer(const char *model_path, const char *tokenizer_dir, char *out, size_t cap, int *shipped) {
    char p[4200];
    if (shipped) *shipped = 0;
    if (tokenizer_dir) {
        snprintf(p, sizeof p, "%s/vocab.json", tokenizer_dir);
        if (file_exists(p)) { snprintf(out, cap, "%s", tokenizer_dir); return MS_OK; }
        snprintf(p, sizeof p, "%s/tokenizer/vocab.json", tokenizer_dir);
        if (file_exists(p)) { snprintf(out, cap, "%s/tokenizer", tokenizer_dir); return MS_OK; }
        return ms_errorf(MS_ERR_IO, "--tokenizer %s: no vocab.json there (nor in its tokenizer/)", tokenizer_dir);
    }
    if (model_path) {
        snprintf(p, sizeof p, "%s/tokenizer/vocab.json", model_path);
        if (file_exists(p)) { snprintf(out, cap, "%s/tokenizer", model_path); return MS_OK; }
        snprintf(p, sizeof p, "%s/vocab.json", model_path);
        if (file_exists(p)) { snprintf(out, cap, "%s", model_path); return MS_OK; }
    }
    if (find_data_dir("models/tiny-sd/tokenizer/vocab.json", out, cap)) {
        if (shipped) *shipped = 1;
        return MS_OK;
    }
    return ms_errorf(MS_ERR_IO, "%s%shas no tokenizer/, and the CLIP BPE files mixshow ships "
                     "(models/tiny-sd/tokenizer/vocab.json) are neither next to the executable, nor in %s, nor "
                     "here: give --tokenizer DIR", model_path ? model_path : "", model_path ? " " : "",
#ifdef MS_DATADIR
                     MS_DATADIR
#else
                     "an install prefix"
#endif
                     );
}

static MsStatus added_tokens_add(const JsonValue *add, const char *path, ClipTokenizer *t) {
    MsStatus s = MS_OK;
    if (add->type != JSON_OBJECT) return ms_errorf(MS_ERR_FORMAT, "%s: expected an object {token: id}", path);
    for (size_t j = 0; j < add->count && !s; j++) {          /* every id an integer first */
        int64_t id;
        char what[300];
        snprintf(what, sizeof what, "%.200s: token '%.60s'", path, add->items[j].key);
        s = json_as_int(&add->items[j], what, &id);
    }
    for (size_t k = 0; k < add->count && !s; k++) {          /* id order: n_vocab, n_vocab + 1, ... */
        const int64_t want = (int64_t)t->n_vocab + (int64_t)k;
        const JsonValue *e = NULL;
        for (size_t j = 0; j < add->count && !e; j++) {
            int64_t id = 0;
            json_as_int(&add->items[j], "", &id);
            if (id == want) e = &add->items[j];
        }
        if (!e) { s = ms_errorf(MS_ERR_FORMAT, "%s: non-consecutive added tokens: none has id %lld (ids must follow the "
                                "vocabulary of %d)", path, (long long)want, t->n_vocab); break; }
        size_t len = strlen(e->key);
        int have = clip_tokenizer_find(t, e->key, len);
        if (have == want) continue;                            /* read before */
        if (have >= 0 || want != (int64_t)t->n_vocab + t->n_added) {
            s = ms_errorf(MS_ERR_FORMAT, "%s: token '%s' (id %lld) is already in the tokenizer as id %d", path, e->key,
                          (long long)want, have >= 0 ? have : t->n_vocab + t->n_added);
            break;
        }
        const char *one = e->key;
        s = clip_tokenizer_add_tokens(t, &one, 1, NULL);
    }
    return s;
}

MsStatus ms_clip_added_tokens_json(const char *path, ClipTokenizer *t) {
    JsonValue *add = NULL;
    MsStatus s = json_parse_file(path, &add);
    if (!s) s = added_tokens_add(add, path, t);
    json_free(add);
    return s;
}

static void add_note(char *notes, size_t cap, size_t *len, const char *path, const char *text) {
    /* one "path: " prefix per line */
    while (notes && *text && *len + 1 < cap) {
        const char *nl = strchr(text, '\n');
        size_t n = nl ? (size_t)(nl - text) : strlen(text);
        int k = snprintf(notes + *len, cap - *len, "%s: %.*s\n", path, (int)n, text);
        if (k < 0) return;
        *len += (size_t)k < cap - *len ? (size_t)k : cap - *len - 1;
        text += n + (nl ? 1 : 0);
    }
}

/* A fused model's added tokens: a folder's tokenizer/added_tokens.json is read with the tokenizer
 * (ms_clip_tokenizer_load); a single .safetensors file (`mixshow fuse --ldm-out`) carries them as
 * metadata mixshow.added_tokens (the same JSON object), since an LDM file has no tokenizer. */
static MsStatus added_tokens_of(const char *path, ClipTokenizer *tok) {
    char p[4300];
    MsStatus s = MS_OK;
    if (strlen(path) > 12 && !strcmp(path + strlen(path) - 12, ".safetensors") && file_exists(path)) {
        StFile f;
        const char *txt;
        if ((s = st_open(&f, path))) { clip_tokenizer_free(tok); return s; }
        if ((txt = st_meta(&f, "mixshow.added_tokens"))) {
            JsonValue *j = NULL;
            snprintf(p, sizeof p, "%.4000s: metadata mixshow.added_tokens", path);
            s = json_parse(txt, strlen(txt), p, &j);
            if (!s) s = added_tokens_add(j, p, tok);
            json_free(j);
        }
        st_close(&f);
    }
    if (s) clip_tokenizer_free(tok);
    return s;
}

MsStatus ms_open_model(const char *path, const MsOpenOptions *o, MsModel *m, ClipTokenizer *tok, char *notes,
                       size_t cap) {
    static const MsOpenOptions none = { NULL, NULL, 0, 0 };
    char def[4200], tdir[4200], buf[4600], own[4096];
    size_t len = 0;
    int shipped = 0;
    MsStatus s;
    if (!o) o = &none;
    if (!notes || !cap) { notes = own; cap = sizeof own; }
    notes[0] = 0;
    if (m) memset(m, 0, sizeof *m);
    if (tok) memset(tok, 0, sizeof *tok);
    if (!path) {
        const char *name = ms_default_model(def, sizeof def);
        if (!name)
            return ms_errorf(MS_ERR_IO, "no model given, and neither the shipped models/world nor the embedded "
                             "models/tiny-sd is next to the executable, in the install prefix or here: give --model PATH");
        path = def;
        add_note(notes, cap, &len, path, strcmp(name, "models/world") ? "no --model: the embedded random-weight tiny model "
                 "(models/world, the shipped world model, was not found)." : "no --model: the shipped world model.");
    }
    if (m) {
        MsLoadOptions lo = { o->keep_half, o->config_dir };
        if ((s = ms_model_load_ex(path, &lo, m, buf, sizeof buf))) return s;
        add_note(notes, cap, &len, path, buf);
    }
    if (tok) {
        if ((s = ms_find_tokenizer(path, o->tokenizer_dir, tdir, sizeof tdir, &shipped)) ||
            (s = ms_clip_tokenizer_load(tdir, tok)) ||
            (s = added_tokens_of(path, tok))) {
            if (m) ms_model_free(m);
            return s;
        }
        if (shipped) {
            snprintf(buf, sizeof buf, "no tokenizer/: the CLIP BPE files shipped with mixshow (%s); --tokenizer "
                     "DIR overrides.", tdir);
            add_note(notes, cap, &len, path, buf);
        }
    }
    if (!o->quiet && notes[0]) {
        for (const char *l = notes; *l;) {
            const char *nl = strchr(l, '\n');
            size_t n = nl ? (size_t)(nl - l) : strlen(l);
            fprintf(stderr, "mixshow: %.*s\n", (int)n, l);
            l += n + (nl ? 1 : 0);
        }
    }
    return MS_OK;
}
