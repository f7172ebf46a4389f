/* tools/cmd_convert.c — `mixshow convert IN OUT`:
 *   a model (diffusers folder, or LDM single file .safetensors/.ckpt) -> a diffusers folder, or
 *   -> an LDM single file when OUT ends in .safetensors;
 *   an image (PNG/JPEG) -> PNG when IN is an image and OUT ends in .png.
 * Outputs appear only when complete: files are written to a temporary name and renamed; a
 * folder is built as OUT.tmp and renamed to OUT (which must not exist yet). */
#if !defined(_WIN32) && !defined(_POSIX_C_SOURCE)
#define _POSIX_C_SOURCE 200809L         /* mkdir */
#endif
#include "tools/tools.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#ifdef _WIN32
#include <direct.h>
static int make_dir(const char *p) { return _mkdir(p); }
#else
#include <sys/stat.h>
#include <sys/types.h>
static int make_dir(const char *p) { return mkdir(p, 0777); }
#endif

static int ends_with(const char *s, const char *suf) {
    size_t a = strlen(s), b = strlen(suf);
    if (a < b) return 0;
    for (size_t i = 0; i < b; i++) {
        char c = s[a - b + i];
        if (c >= 'A' && c <= 'Z') c = (char)(c - 'A' + 'a');
        if (c != suf[i]) return 0;
    }
    return 1;
}

/* ---- configs -> JSON (the keys diffusers 0.19.3 / transformers read back) ---- */
static MsStatus set_num(JsonValue *o, const char *k, double x) {
    JsonValue *v = json_new_number(x);
    return v ? json_set(o, k, v) : MS_ERR_NOMEM;
}
static MsStatus set_bool(JsonValue *o, const char *k, int b) {
    JsonValue *v = json_new_bool(b);
    return v ? json_set(o, k, v) : MS_ERR_NOMEM;
}
static MsStatus set_str(JsonValue *o, const char *k, const char *s) {
    JsonValue *v = json_new_string(s, strlen(s));
    return v ? json_set(o, k, v) : MS_ERR_NOMEM;
}
static MsStatus set_null(JsonValue *o, const char *k) {
    JsonValue *v = json_new(JSON_NULL);
    return v ? json_set(o, k, v) : MS_ERR_NOMEM;
}
static MsStatus set_ints(JsonValue *o, const char *k, const int *x, int n) {
    JsonValue *a = json_new(JSON_ARRAY);
    MsStatus s = a ? MS_OK : MS_ERR_NOMEM;
    for (int i = 0; i < n && !s; i++) { JsonValue *v = json_new_number(x[i]); s = v ? json_push(a, v) : MS_ERR_NOMEM; }
    if (s) { json_free(a); return s; }
    return json_set(o, k, a);
}
static MsStatus set_blocks(JsonValue *o, const char *k, const MsBlockType *b, int n) {
    JsonValue *a = json_new(JSON_ARRAY);
    MsStatus s = a ? MS_OK : MS_ERR_NOMEM;
    for (int i = 0; i < n && !s; i++) {
        const char *nm = ms_block_type_name(b[i]);
        JsonValue *v = json_new_string(nm, strlen(nm));
        s = v ? json_push(a, v) : MS_ERR_NOMEM;
    }
    if (s) { json_free(a); return s; }
    return json_set(o, k, a);
}
/* an int when all blocks agree, else a list */
static MsStatus set_int_or_list(JsonValue *o, const char *k, const int *x, int n) {
    for (int i = 1; i < n; i++) if (x[i] != x[0]) return set_ints(o, k, x, n);
    return set_num(o, k, x[0]);
}

#define OK(x) do { if (!s) s = (x); } while (0)

static MsStatus unet_json(const UNetConfig *c, JsonValue *o) {
    MsStatus s = MS_OK;
    OK(set_str(o, "_class_name", "UNet2DConditionModel"));
    OK(set_str(o, "_diffusers_version", "0.19.3"));
    OK(set_str(o, "act_fn", "silu"));
    OK(set_int_or_list(o, "attention_head_dim", c->attention_head_dim, c->n_blocks));
    OK(set_ints(o, "block_out_channels", c->block_out_channels, c->n_blocks));
    OK(set_bool(o, "center_input_sample", c->center_input_sample));
    OK(set_num(o, "conv_in_kernel", c->conv_in_kernel));
    OK(set_num(o, "conv_out_kernel", c->conv_out_kernel));
    OK(set_num(o, "cross_attention_dim", c->cross_attention_dim));
    OK(set_blocks(o, "down_block_types", c->down_block_types, c->n_blocks));
    OK(set_num(o, "downsample_padding", c->downsample_padding));
    OK(set_bool(o, "flip_sin_to_cos", c->flip_sin_to_cos));
    OK(set_num(o, "freq_shift", c->freq_shift));
    OK(set_num(o, "in_channels", c->in_channels));
    OK(set_num(o, "layers_per_block", c->layers_per_block));
    OK(set_num(o, "mid_block_scale_factor", c->mid_block_scale_factor));
    OK(set_str(o, "mid_block_type", ms_block_type_name(c->mid_block_type)));
    OK(set_num(o, "norm_eps", c->norm_eps));
    OK(set_num(o, "norm_num_groups", c->norm_num_groups));
    if (c->num_attention_heads[0] > 0) OK(set_int_or_list(o, "num_attention_heads", c->num_attention_heads, c->n_blocks));
    else OK(set_null(o, "num_attention_heads"));
    OK(set_num(o, "out_channels", c->out_channels));
    OK(set_num(o, "sample_size", c->sample_size));
    if (c->time_embedding_dim > 0) OK(set_num(o, "time_embedding_dim", c->time_embedding_dim));
    OK(set_int_or_list(o, "transformer_layers_per_block", c->transformer_layers_per_block, c->n_blocks));
    OK(set_blocks(o, "up_block_types", c->up_block_types, c->n_blocks));
    OK(set_bool(o, "upcast_attention", c->upcast_attention));
    OK(set_bool(o, "use_linear_projection", c->use_linear_projection));
    return s;
}

static MsStatus vae_json(const VaeConfig *c, JsonValue *o) {
    MsStatus s = MS_OK;
    OK(set_str(o, "_class_name", "AutoencoderKL"));
    OK(set_str(o, "_diffusers_version", "0.19.3"));
    OK(set_str(o, "act_fn", "silu"));
    OK(set_ints(o, "block_out_channels", c->block_out_channels, c->n_blocks));
    OK(set_blocks(o, "down_block_types", c->down_block_types, c->n_blocks));
    OK(set_bool(o, "force_upcast", c->force_upcast));
    OK(set_num(o, "in_channels", c->in_channels));
    OK(set_num(o, "latent_channels", c->latent_channels));
    OK(set_num(o, "layers_per_block", c->layers_per_block));
    OK(set_num(o, "norm_num_groups", c->norm_num_groups));
    OK(set_num(o, "out_channels", c->out_channels));
    OK(set_num(o, "sample_size", c->sample_size));
    OK(set_num(o, "scaling_factor", c->scaling_factor));
    OK(set_blocks(o, "up_block_types", c->up_block_types, c->n_blocks));
    return s;
}

static MsStatus adapter_json(const AdapterConfig *c, JsonValue *o) {
    MsStatus s = MS_OK;
    OK(set_str(o, "_class_name", "T2IAdapter"));
    OK(set_str(o, "_diffusers_version", "0.19.3"));
    OK(set_str(o, "adapter_type", "full_adapter"));
    OK(set_ints(o, "channels", c->channels, c->n_channels));
    OK(set_num(o, "downscale_factor", c->downscale_factor));
    OK(set_num(o, "in_channels", c->in_channels));
    OK(set_num(o, "num_res_blocks", c->num_res_blocks));
    return s;
}

static MsStatus text_json(const ClipTextConfig *c, JsonValue *o) {
    MsStatus s = MS_OK;
    JsonValue *arch = json_new(JSON_ARRAY), *v = json_new_string("CLIPTextModel", 13);
    if (!arch || !v || json_push(arch, v) || json_set(o, "architectures", arch)) return MS_ERR_NOMEM;
    OK(set_num(o, "bos_token_id", c->bos_token_id));
    OK(set_num(o, "eos_token_id", c->eos_token_id));
    OK(set_str(o, "hidden_act", ms_activation_name(c->hidden_act)));
    OK(set_num(o, "hidden_size", c->hidden_size));
    OK(set_num(o, "intermediate_size", c->intermediate_size));
    OK(set_num(o, "layer_norm_eps", c->layer_norm_eps));
    OK(set_num(o, "max_position_embeddings", c->max_position_embeddings));
    OK(set_str(o, "model_type", "clip_text_model"));
    OK(set_num(o, "num_attention_heads", c->num_attention_heads));
    OK(set_num(o, "num_hidden_layers", c->num_hidden_layers));
    OK(set_num(o, "pad_token_id", c->pad_token_id));
    OK(set_num(o, "projection_dim", c->projection_dim));
    OK(set_str(o, "torch_dtype", "float32"));
    OK(set_num(o, "vocab_size", c->vocab_size));
    return s;
}

static MsStatus sched_json(const SchedulerConfig *c, JsonValue *o) {
    static const char *const bs[] = { "linear", "scaled_linear", "squaredcos_cap_v2" };
    static const char *const pt[] = { "epsilon", "v_prediction", "sample" };
    static const char *const sp[] = { "", "linspace", "leading", "trailing" };
    MsStatus s = MS_OK;
    OK(set_str(o, "_class_name", c->class_name[0] ? c->class_name : "PNDMScheduler"));
    OK(set_num(o, "beta_end", c->beta_end));
    OK(set_str(o, "beta_schedule", bs[c->beta_schedule]));
    OK(set_num(o, "beta_start", c->beta_start));
    OK(set_bool(o, "clip_sample", c->clip_sample));
    OK(set_num(o, "num_train_timesteps", c->num_train_timesteps));
    OK(set_str(o, "prediction_type", pt[c->prediction_type]));
    OK(set_bool(o, "set_alpha_to_one", c->set_alpha_to_one));
    OK(set_bool(o, "skip_prk_steps", c->skip_prk_steps));
    OK(set_num(o, "steps_offset", c->steps_offset));
    if (c->timestep_spacing != MS_SPACING_ABSENT) OK(set_str(o, "timestep_spacing", sp[c->timestep_spacing]));
    OK(set_null(o, "trained_betas"));
    return s;
}

static MsStatus index_json(JsonValue *o) {
    static const char *const comp[][3] = {
        { "scheduler", "diffusers", "PNDMScheduler" }, { "text_encoder", "transformers", "CLIPTextModel" },
        { "tokenizer", "transformers", "CLIPTokenizer" }, { "unet", "diffusers", "UNet2DConditionModel" },
        { "vae", "diffusers", "AutoencoderKL" } };
    MsStatus s = MS_OK;
    OK(set_str(o, "_class_name", "StableDiffusionPipeline"));
    OK(set_str(o, "_diffusers_version", "0.19.3"));
    OK(set_bool(o, "requires_safety_checker", 0));
    for (size_t i = 0; i < sizeof comp / sizeof comp[0] && !s; i++) {
        JsonValue *a = json_new(JSON_ARRAY), *x = json_new_string(comp[i][1], strlen(comp[i][1])),
                  *y = json_new_string(comp[i][2], strlen(comp[i][2]));
        if (!a || !x || !y) { json_free(a); json_free(x); json_free(y); return MS_ERR_NOMEM; }
        if ((s = json_push(a, x))) { json_free(a); json_free(y); return s; }
        if ((s = json_push(a, y))) { json_free(a); return s; }
        s = json_set(o, comp[i][0], a);
    }
    return s;
}

static MsStatus write_json(const char *path, MsStatus (*fill)(const void *, JsonValue *), const void *cfg) {
    JsonValue *o = json_new(JSON_OBJECT);
    if (!o) return ms_errorf(MS_ERR_NOMEM, "%s: out of memory", path);
    MsStatus s = fill(cfg, o);
    if (!s) s = json_write_file(path, o, 2);
    else s = ms_errorf(s, "%s: cannot build the JSON", path);
    json_free(o);
    return s;
}
static MsStatus unet_cb(const void *c, JsonValue *o) { return unet_json((const UNetConfig *)c, o); }
static MsStatus vae_cb(const void *c, JsonValue *o) { return vae_json((const VaeConfig *)c, o); }
static MsStatus adapter_cb(const void *c, JsonValue *o) { return adapter_json((const AdapterConfig *)c, o); }
static MsStatus text_cb(const void *c, JsonValue *o) { return text_json((const ClipTextConfig *)c, o); }
static MsStatus sched_cb(const void *c, JsonValue *o) { return sched_json((const SchedulerConfig *)c, o); }
static MsStatus index_cb(const void *c, JsonValue *o) { (void)c; return index_json(o); }

MsStatus ms_write_model_configs(const MsModel *m, const char *dir) {
    char p[4300];
    MsStatus s = MS_OK;
    snprintf(p, sizeof p, "%s/model_index.json", dir);                if (!s) s = write_json(p, index_cb, NULL);
    snprintf(p, sizeof p, "%s/unet/config.json", dir);                if (!s) s = write_json(p, unet_cb, &m->unet_config);
    snprintf(p, sizeof p, "%s/vae/config.json", dir);                 if (!s) s = write_json(p, vae_cb, &m->vae_config);
    snprintf(p, sizeof p, "%s/text_encoder/config.json", dir);        if (!s) s = write_json(p, text_cb, &m->text_config);
    snprintf(p, sizeof p, "%s/scheduler/scheduler_config.json", dir); if (!s) s = write_json(p, sched_cb, &m->scheduler_config);
    return s;
}

/* ---- tensors -> safetensors ---- */
typedef struct { StEntry *e; size_t n, cap; int64_t *ids; } Entries;

static MsStatus add_table(Entries *E, const MsParamTable *t, int ldm, int half) {
    for (int i = 0; i < t->n; i++) {
        const MsParam *p = &t->p[i];
        if (E->n == E->cap) {
            size_t cap = E->cap ? 2 * E->cap : 1024;
            StEntry *e = (StEntry *)realloc(E->e, cap * sizeof *e);
            if (!e) return ms_errorf(MS_ERR_NOMEM, "convert: out of memory");
            E->e = e; E->cap = cap;
        }
        StEntry *e = &E->e[E->n++];
        memset(e, 0, sizeof *e);
        e->name = ldm ? p->ldm : p->name;
        e->ndim = ldm ? p->ldm_ndim : p->ndim;
        for (int d = 0; d < e->ndim; d++) e->shape[d] = d < p->ndim ? p->shape[d] : 1;
        if (p->flags & MS_PARAM_BUFFER) {        /* position_ids: arange, int64 */
            size_t m = p->numel;
            if (!E->ids) {
                E->ids = (int64_t *)malloc((m ? m : 1) * sizeof(int64_t));
                if (!E->ids) return ms_errorf(MS_ERR_NOMEM, "convert: out of memory");
                for (size_t k = 0; k < m; k++) E->ids[k] = (int64_t)k;
            }
            e->dtype = ST_I64;
            e->raw = E->ids;
        } else if (p->f32) {
            e->dtype = half ? ST_F16 : ST_F32;
            e->f32 = p->f32;
        } else {                                  /* kept 16-bit: written as stored */
            e->dtype = p->dtype == MS_DT_BF16 ? ST_BF16 : ST_F16;
            e->raw = p->half;
        }
    }
    return MS_OK;
}

static MsStatus write_table(const char *path, const MsParamTable *t, int half) {
    Entries E = { NULL, 0, 0, NULL };
    static const char *const meta[2] = { "format", "pt" };
    MsStatus s = add_table(&E, t, 0, half);
    if (!s) s = st_write(path, E.e, E.n, meta, 1);
    free(E.e); free(E.ids);
    return s;
}

/* Byte copy of a file (tokenizer and config files of written model folders). */
MsStatus ms_copy_file(const char *from, const char *to) {
    FILE *a = fopen(from, "rb"), *b = a ? fopen(to, "wb") : NULL;
    unsigned char buf[65536];
    size_t n;
    int ok = a && b;
    while (ok && (n = fread(buf, 1, sizeof buf, a)) > 0) ok = fwrite(buf, 1, n, b) == n;
    if (a && ferror(a)) ok = 0;
    if (a) fclose(a);
    if (b && fclose(b)) ok = 0;
    return ok ? MS_OK : ms_errorf(MS_ERR_IO, "cannot copy %s to %s", from, to);
}

MsStatus ms_write_model_folder(const MsModel *m, const char *tokdir, const char *out, int half) {
    char tmp[2048], p[2300], q[4300];
    static const char *const subs[] = { "unet", "vae", "text_encoder", "scheduler", "tokenizer" };
    static const char *const tok[] = { "vocab.json", "merges.txt", "special_tokens_map.json", "tokenizer_config.json" };
    MsStatus s;
    FILE *f = fopen(out, "rb");
    if (f) { fclose(f); return ms_errorf(MS_ERR_ARG, "%s already exists", out); }
    snprintf(tmp, sizeof tmp, "%s.tmp", out);
    if (make_dir(tmp)) return ms_errorf(MS_ERR_IO, "%s: cannot create the folder (remove a stale one?)", tmp);
    for (size_t i = 0; i < sizeof subs / sizeof subs[0]; i++) {
        snprintf(p, sizeof p, "%s/%s", tmp, subs[i]);
        if (make_dir(p)) return ms_errorf(MS_ERR_IO, "%s: cannot create", p);
    }
#define W(expr) do { if ((s = (expr))) return s; } while (0)
    W(ms_write_model_configs(m, tmp));
    snprintf(p, sizeof p, "%s/unet/diffusion_pytorch_model.safetensors", tmp); W(write_table(p, &m->unet, half));
    snprintf(p, sizeof p, "%s/vae/diffusion_pytorch_model.safetensors", tmp);  W(write_table(p, &m->vae, half));
    snprintf(p, sizeof p, "%s/text_encoder/model.safetensors", tmp);           W(write_table(p, &m->text, half));
    for (size_t i = 0; i < sizeof tok / sizeof tok[0]; i++) {      /* the model's, or the shipped one */
        snprintf(q, sizeof q, "%s/%s", tokdir, tok[i]);
        if (!(f = fopen(q, "rb"))) continue;
        fclose(f);
        snprintf(p, sizeof p, "%s/tokenizer/%s", tmp, tok[i]);
        W(ms_copy_file(q, p));
    }
#undef W
    if (rename(tmp, out)) return ms_errorf(MS_ERR_IO, "cannot rename %s to %s", tmp, out);
    return MS_OK;
}

/* One diffusers model folder at out (written as out.tmp, renamed; out must not exist):
 * config.json from cfg through cb, diffusion_pytorch_model.safetensors (f32, or f16 when half). */
static MsStatus write_component_folder(MsStatus (*cb)(const void *, JsonValue *), const void *cfg, const MsParamTable *t,
                                       const char *out, int half) {
    char tmp[2048], p[2300];
    MsStatus s;
    FILE *f = fopen(out, "rb");
    if (f) { fclose(f); return ms_errorf(MS_ERR_ARG, "%s already exists", out); }
    snprintf(tmp, sizeof tmp, "%s.tmp", out);
    if (make_dir(tmp)) return ms_errorf(MS_ERR_IO, "%s: cannot create the folder (remove a stale one?)", tmp);
    snprintf(p, sizeof p, "%s/config.json", tmp);
    if ((s = write_json(p, cb, cfg))) return s;
    snprintf(p, sizeof p, "%s/diffusion_pytorch_model.safetensors", tmp);
    if ((s = write_table(p, t, half))) return s;
    if (rename(tmp, out)) return ms_errorf(MS_ERR_IO, "cannot rename %s to %s", tmp, out);
    return MS_OK;
}

MsStatus ms_write_vae_folder(const VaeConfig *c, const MsParamTable *t, const char *out) {
    return write_component_folder(vae_cb, c, t, out, 0);
}

MsStatus ms_write_adapter_folder(const AdapterConfig *c, const MsParamTable *t, const char *out) {
    return write_component_folder(adapter_cb, c, t, out, 0);
}

MsStatus ms_write_adapter_folder_half(const AdapterConfig *c, const MsParamTable *t, const char *out, int half) {
    return write_component_folder(adapter_cb, c, t, out, half);
}

/* The configs as compact JSON in the file's metadata (mixshow.unet_config, ...), so that the
 * file loads with exactly these configs (a single file has no config.json, and heads or
 * GroupNorm groups cannot be read off tensor shapes). Other readers ignore metadata. */
static MsStatus config_text(MsStatus (*fill)(const void *, JsonValue *), const void *cfg, JsonBuf *b) {
    JsonValue *o = json_new(JSON_OBJECT);
    if (!o) return ms_errorf(MS_ERR_NOMEM, "convert: out of memory");
    MsStatus s = fill(cfg, o);
    if (!s) s = json_write(b, o, 0);
    json_free(o);
    return s ? ms_errorf(s, "convert: cannot build the config metadata") : MS_OK;
}

MsStatus ms_write_ldm(const MsModel *m, const char *out, int half, int with_configs, const char *const *extra,
                      int n_extra) {
    Entries E = { NULL, 0, 0, NULL };
    JsonBuf jb[4];
    const char *meta[10 + 2 * MS_LDM_EXTRA_META] = { "format", "pt", "mixshow.unet_config", NULL, "mixshow.vae_config", NULL,
                                                     "mixshow.text_encoder_config", NULL, "mixshow.scheduler_config", NULL };
    MsStatus (*const cb[4])(const void *, JsonValue *) = { unet_cb, vae_cb, text_cb, sched_cb };
    const void *cfg[4] = { &m->unet_config, &m->vae_config, &m->text_config, &m->scheduler_config };
    int n_meta = with_configs ? 5 : 1;
    if (n_extra < 0 || n_extra > MS_LDM_EXTRA_META) return ms_errorf(MS_ERR_ARG, "%s: %d extra metadata entries", out, n_extra);
    for (int k = 0; k < n_extra; k++, n_meta++) { meta[2 * n_meta] = extra[2 * k]; meta[2 * n_meta + 1] = extra[2 * k + 1]; }
    memset(jb, 0, sizeof jb);
    MsStatus s = add_table(&E, &m->unet, 1, half);
    if (!s) s = add_table(&E, &m->vae, 1, half);
    if (!s) s = add_table(&E, &m->text, 1, half);
    for (int k = 0; k < 4 && !s && with_configs; k++)
        if (!(s = config_text(cb[k], cfg[k], &jb[k]))) meta[3 + 2 * k] = jb[k].data;
    if (!s) s = st_write(out, E.e, E.n, meta, n_meta);
    for (int k = 0; k < 4; k++) jbuf_free(&jb[k]);
    free(E.e); free(E.ids);
    return s;
}

static int convert_image(const char *in, const char *out) {
    MsImage img;
    memset(&img, 0, sizeof img);
    MsStatus s = ms_image_read(in, 0, &img);
    if (!s && img.depth != 8) s = ms_errorf(MS_ERR_UNSUPPORTED, "%s: 16-bit images are not converted", in);
    if (!s) s = ms_png_write(out, (const uint8_t *)img.data, img.w, img.h, img.channels);
    ms_image_free(&img);
    if (s) { fprintf(stderr, "mixshow convert: %s\n", ms_last_error()); return 1; }
    return 0;
}

/* A T2I-Adapter folder (config.json, no model_index.json) -> a new adapter folder. */
static int convert_adapter(const char *in, const char *out, int half) {
    AdapterConfig c;
    MsParamTable t;
    MsStatus s = ms_adapter_load(in, NULL, &c, &t);
    if (!s) {
        s = ms_write_adapter_folder_half(&c, &t, out, half);
        ms_param_table_free(&t);
    }
    if (s) { fprintf(stderr, "mixshow convert: %s\n", ms_last_error()); return 1; }
    printf("%s -> %s (T2I-Adapter%s)\n", in, out, half ? ", F16" : "");
    return 0;
}

/* A `mixshow eval` encoders file (or its training checkpoint: the state is dropped) -> an encoders
 * file, its metadata (recipe, held-out numbers) kept. */
static int convert_encoders(const char *in, const char *out, int half) {
    EvalNet e;
    StFile f;
    const char **meta = NULL;
    int n = 0;
    MsStatus s = st_open(&f, in);
    if (s) { fprintf(stderr, "mixshow convert: %s\n", ms_last_error()); return 1; }
    if (!(meta = (const char **)malloc((f.meta_count + 1) * 2 * sizeof *meta))) s = ms_errorf(MS_ERR_NOMEM, "convert: out of memory");
    for (size_t i = 0; !s && i < f.meta_count; i++)
        if (strcmp(f.meta_keys[i], "format") && strcmp(f.meta_keys[i], "config")) {   /* the writer sets these two */
            meta[2 * n] = f.meta_keys[i]; meta[2 * n + 1] = f.meta_vals[i]; n++;
        }
    if (!s && !(s = evalnet_load(in, &e, NULL, NULL))) {
        s = evalnet_save_encoders(out, &e, half, meta, n);
        evalnet_free(&e);
    }
    free(meta);
    st_close(&f);
    if (s) { fprintf(stderr, "mixshow convert: %s\n", ms_last_error()); return 1; }
    printf("%s -> %s (mixshow eval encoders%s)\n", in, out, half ? ", F16" : "");
    return 0;
}

static int file_there(const char *dir, const char *name) {
    char p[4200];
    snprintf(p, sizeof p, "%s/%s", dir, name);
    FILE *f = fopen(p, "rb");
    if (f) fclose(f);
    return f != NULL;
}

int cmd_convert(int argc, char **argv) {
    const char *in = NULL, *out = NULL;
    MsOpenOptions opt = { NULL, NULL, 0, 0 };
    int half = 0, with_configs = 1;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--config") && i + 1 < argc) opt.config_dir = argv[++i];
        else if (!strcmp(argv[i], "--tokenizer") && i + 1 < argc) opt.tokenizer_dir = argv[++i];
        else if (!strcmp(argv[i], "--half")) half = 1;
        else if (!strcmp(argv[i], "--no-config-metadata")) with_configs = 0;
        else if (!strcmp(argv[i], "--help") || !strcmp(argv[i], "-h")) {
            printf("usage: mixshow convert IN OUT [--config DIR] [--tokenizer DIR] [--half] [--no-config-metadata]\n"
                   "  IN   a diffusers folder (model_index.json), or an original LDM single file\n"
                   "       (.safetensors / .ckpt); or a PNG/JPEG image; or a T2I-Adapter folder (config.json,\n"
                   "       no model_index.json) -> a new adapter folder; or a `mixshow eval` encoders file\n"
                   "       -> OUT.safetensors (metadata kept; a checkpoint's training state dropped)\n"
                   "  OUT  *.safetensors: an LDM single file; *.png: an image; else a new diffusers folder\n"
                   "  --config DIR     configs for IN (a diffusers folder). Without it a single file's configs\n"
                   "                   come from its metadata (files mixshow wrote) or its tensor shapes, with\n"
                   "                   SD 1.x heads, GroupNorm groups and scheduler assumed (printed)\n"
                   "  --tokenizer DIR  tokenizer files for a folder OUT (default: IN's tokenizer/, else the CLIP\n"
                   "                   BPE files shipped with mixshow)\n"
                   "  --half           write F16 tensors (default F32)\n"
                   "  --no-config-metadata  a single-file OUT without mixshow's configs in its metadata\n");
            return 0;
        } else if (!in) in = argv[i];
        else if (!out) out = argv[i];
        else { fprintf(stderr, "mixshow convert: unexpected argument '%s'\n", argv[i]); return 2; }
    }
    if (!in || !out) { fprintf(stderr, "usage: mixshow convert IN OUT [--config DIR] [--tokenizer DIR] [--half]\n"); return 2; }
    if (ends_with(out, ".png")) return convert_image(in, out);
    if (!file_there(in, "model_index.json") && file_there(in, "config.json")) return convert_adapter(in, out, half);
    if (ends_with(in, ".safetensors") && ends_with(out, ".safetensors")) {
        StFile f;
        int enc = 0;
        if (!st_open(&f, in)) {
            const char *fmt = st_meta(&f, "format");
            enc = fmt && !strncmp(fmt, "mixshow eval encoders", 21);
            st_close(&f);
        }
        ms_clear_error();
        if (enc) return convert_encoders(in, out, half);
    }
    MsModel m;
    char tokdir[4200];
    int folder = !ends_with(out, ".safetensors");
    MsStatus s = ms_open_model(in, &opt, &m, NULL, NULL, 0);
    if (!s && folder) {
        int shipped = 0;
        s = ms_find_tokenizer(in, opt.tokenizer_dir, tokdir, sizeof tokdir, &shipped);
        if (!s && shipped) fprintf(stderr, "mixshow: %s: no tokenizer/: %s/tokenizer gets the CLIP BPE files shipped "
                                   "with mixshow (%s)\n", in, out, tokdir);
    }
    if (!s) s = folder ? ms_write_model_folder(&m, tokdir, out, half) : ms_write_ldm(&m, out, half, with_configs, NULL, 0);
    ms_model_free(&m);                          /* zeroed when the load failed: a no-op */
    if (s) { fprintf(stderr, "mixshow convert: %s\n", ms_last_error()); return 1; }
    printf("%s -> %s\n", in, out);
    return 0;
}
