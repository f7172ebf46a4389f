/* tools/edlora.c — Mix-of-Show ED-LoRA files: read and write (.pth as trainer_edlora.py's
 * delta_state_dict saves it, or .safetensors), map them to the runtime LoRA types, merge them
 * into a model (convert_edlora_to_diffusers.py convert_edlora) and prepare the EDLoRAPipeline
 * prompt binding (pipeline_edlora.py) for ms_txt2img. Mix-of-Show commit 51270fd. Also reads
 * kohya / AUTOMATIC1111-webui LoRA .safetensors (read_kohya: key names, per-module alpha). */
#include "tools/tools.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static const char *const SECTION[3] = { "new_concept_embedding", "text_encoder", "unet" };
#define SUF_DOWN ".lora_down.weight"
#define SUF_UP ".lora_up.weight"

void edlora_free(EdloraFile *f) {
    if (!f) return;
    for (int i = 0; i < f->n_emb; i++) ms_free_aligned(f->emb[i].emb);
    for (int i = 0; i < f->n_te; i++) { ms_free_aligned(f->te[i].down); ms_free_aligned(f->te[i].up); }
    for (int i = 0; i < f->n_unet; i++) { ms_free_aligned(f->unet[i].down); ms_free_aligned(f->unet[i].up); }
    free(f->emb); free(f->te); free(f->unet);
    memset(f, 0, sizeof *f);
}

int edlora_tokens_per_word(const EdloraFile *f) { return f->n_emb ? f->emb[0].T : 0; }

static float *copy_floats(const float *x, size_t n) {
    float *y = (float *)ms_alloc_aligned(n ? n : 1, sizeof(float));
    if (y && x) memcpy(y, x, n * sizeof(float));
    return y;
}

static int ends_with(const char *s, const char *suf) {
    size_t a = strlen(s), b = strlen(suf);
    return a >= b && !strcmp(s + a - b, suf);
}

/* Takes ownership of emb (freed on error). */
static MsStatus add_embedding_own(EdloraFile *f, const char *word, int T, int D, float *emb, const char *origin) {
    if (!*word || strlen(word) >= MS_WORD_MAX) {
        ms_free_aligned(emb);
        return ms_errorf(MS_ERR_FORMAT, "%s: concept word '%.80s' is empty or longer than %d bytes", origin, word, MS_WORD_MAX - 1);
    }
    for (int i = 0; i < f->n_emb; i++)
        if (!strcmp(f->emb[i].word, word)) { ms_free_aligned(emb); return ms_errorf(MS_ERR_FORMAT, "%s: concept word '%s' twice", origin, word); }
    if (T < 1 || D < 1) { ms_free_aligned(emb); return ms_errorf(MS_ERR_SHAPE, "%s: embedding '%s' is (%d, %d)", origin, word, T, D); }
    if (f->n_emb && (f->emb[0].T != T || f->emb[0].D != D)) {
        ms_free_aligned(emb);
        return ms_errorf(MS_ERR_SHAPE, "%s: new_concept_embedding.%s is (%d, %d), but %s is (%d, %d): every word needs the "
                         "same number of tokens (16 ED-LoRA, 1 LoRA) and width", origin, word, T, D, f->emb[0].word, f->emb[0].T, f->emb[0].D);
    }
    if (f->n_emb == f->cap_emb) {
        int cap = f->cap_emb ? 2 * f->cap_emb : 4;
        EdloraEmbedding *e = (EdloraEmbedding *)realloc(f->emb, (size_t)cap * sizeof *e);
        if (!e) { ms_free_aligned(emb); return ms_errorf(MS_ERR_NOMEM, "%s: out of memory", origin); }
        f->emb = e; f->cap_emb = cap;
    }
    EdloraEmbedding *e = &f->emb[f->n_emb++];
    memset(e, 0, sizeof *e);
    strcpy(e->word, word);
    e->T = T; e->D = D; e->emb = emb;
    return MS_OK;
}

MsStatus edlora_add_embedding(EdloraFile *f, const char *word, int T, int D, const float *emb) {
    if (T < 1 || D < 1 || !emb) return ms_errorf(MS_ERR_ARG, "edlora: embedding '%s': bad size (%d, %d)", word, T, D);
    float *c = copy_floats(emb, (size_t)T * D);
    if (!c) return ms_errorf(MS_ERR_NOMEM, "edlora: out of memory");
    return add_embedding_own(f, word, T, D, c, "edlora");
}

/* The module named `name` of a section (created empty when absent); NULL when out of memory. */
static EdloraModule *module_get(EdloraFile *f, int is_unet, const char *name, int create) {
    EdloraModule **arr = is_unet ? &f->unet : &f->te;
    int *n = is_unet ? &f->n_unet : &f->n_te, *cap = is_unet ? &f->cap_unet : &f->cap_te;
    for (int i = *n - 1; i >= 0; i--) if (!strcmp((*arr)[i].name, name)) return &(*arr)[i];
    if (!create) return NULL;
    if (*n == *cap) {
        int c = *cap ? 2 * *cap : 64;
        EdloraModule *m = (EdloraModule *)realloc(*arr, (size_t)c * sizeof *m);
        if (!m) return NULL;
        *arr = m; *cap = c;
    }
    EdloraModule *m = &(*arr)[(*n)++];
    memset(m, 0, sizeof *m);
    snprintf(m->name, sizeof m->name, "%s", name);
    return m;
}

MsStatus edlora_add_module(EdloraFile *f, int is_unet, const char *name, int rank, int in, int out,
                           const float *down, const float *up) {
    if (!*name || strlen(name) + strlen(SUF_DOWN) >= MS_KEY_MAX)
        return ms_errorf(MS_ERR_ARG, "edlora: module name '%.100s' is empty or too long", name);
    if (rank < 1 || in < 1 || out < 1 || !down || !up)
        return ms_errorf(MS_ERR_ARG, "edlora: module '%s': bad sizes (rank %d, in %d, out %d)", name, rank, in, out);
    if (module_get(f, is_unet, name, 0)) return ms_errorf(MS_ERR_ARG, "edlora: module '%s' twice", name);
    float *d = copy_floats(down, (size_t)rank * in), *u = copy_floats(up, (size_t)out * rank);
    EdloraModule *m = d && u ? module_get(f, is_unet, name, 1) : NULL;
    if (!m) { ms_free_aligned(d); ms_free_aligned(u); return ms_errorf(MS_ERR_NOMEM, "edlora: out of memory"); }
    m->rank = rank; m->in = in; m->out = out; m->down = d; m->up = u;
    return MS_OK;
}

/* One LoRA tensor of section `is_unet` under `key` (<module>.lora_down.weight / .lora_up.weight);
 * takes ownership of data. shape (a, b) or (a, b, 1, 1). */
static MsStatus add_lora_part(EdloraFile *f, int is_unet, const char *key, int ndim, const int64_t *shape,
                              float *data, const char *origin) {
    const char *sec = SECTION[is_unet ? 2 : 1];
    int down = ends_with(key, SUF_DOWN), up = ends_with(key, SUF_UP);
    char name[MS_KEY_MAX], sh[96];
    MsStatus s = MS_OK;
    ms_shape_str(sh, sizeof sh, ndim, shape);
    if (!down && !up)
        s = ms_errorf(MS_ERR_FORMAT, "%s: %s.%s: expected a key ending in %s or %s", origin, sec, key, SUF_DOWN, SUF_UP);
    else if (!(ndim == 2 || (ndim == 4 && shape[2] == 1 && shape[3] == 1)) || shape[0] < 1 || shape[1] < 1 ||
             shape[0] > (1 << 20) || shape[1] > (1 << 20))
        s = ms_errorf(MS_ERR_SHAPE, "%s: %s.%s has shape %s, expected 2-D (or a 1x1 conv)", origin, sec, key, sh);
    else if (strlen(key) - strlen(down ? SUF_DOWN : SUF_UP) + 1 > sizeof name - strlen(SUF_DOWN))
        s = ms_errorf(MS_ERR_FORMAT, "%s: %s.%.100s...: key too long", origin, sec, key);
    if (s) { ms_free_aligned(data); return s; }
    size_t nl = strlen(key) - strlen(down ? SUF_DOWN : SUF_UP);
    memcpy(name, key, nl);
    name[nl] = '\0';
    EdloraModule *m = module_get(f, is_unet, name, 1);
    if (!m) { ms_free_aligned(data); return ms_errorf(MS_ERR_NOMEM, "%s: out of memory", origin); }
    if ((down && m->down) || (up && m->up)) { ms_free_aligned(data); return ms_errorf(MS_ERR_FORMAT, "%s: %s.%s twice", origin, sec, key); }
    int r = (int)shape[down ? 0 : 1], have = down ? m->up != NULL : m->down != NULL, r_other = m->rank;
    if (down) { m->down = data; m->in = (int)shape[1]; }
    else { m->up = data; m->out = (int)shape[0]; }
    m->rank = r;
    if (have && r != r_other)
        return ms_errorf(MS_ERR_SHAPE, "%s: %s.%s has shape %s: rank %d, but %s%s has rank %d", origin, sec, key, sh, r,
                         name, down ? SUF_UP : SUF_DOWN, r_other);
    return MS_OK;
}

/* After reading: every module has both halves. */
static MsStatus check_pairs(const EdloraFile *f, const char *origin) {
    for (int u = 0; u < 2; u++) {
        const EdloraModule *m = u ? f->unet : f->te;
        for (int i = 0; i < (u ? f->n_unet : f->n_te); i++)
            if (!m[i].down || !m[i].up)
                return ms_errorf(MS_ERR_FORMAT, "%s: %s.%s%s has no %s%s", origin, SECTION[u + 1], m[i].name,
                                 m[i].down ? SUF_DOWN : SUF_UP, m[i].name, m[i].down ? SUF_UP : SUF_DOWN);
    }
    return MS_OK;
}

/* section.key -> the file; data owned. */
static MsStatus add_tensor(EdloraFile *f, const char *section, const char *key, int ndim, const int64_t *shape,
                           float *data, const char *origin) {
    if (!strcmp(section, SECTION[0])) {
        if (ndim != 2) {
            char sh[96];
            ms_free_aligned(data);
            return ms_errorf(MS_ERR_SHAPE, "%s: new_concept_embedding.%s has shape %s, expected (tokens, width)", origin, key,
                             ms_shape_str(sh, sizeof sh, ndim, shape));
        }
        if (shape[0] > (1 << 20) || shape[1] > (1 << 20)) {
            ms_free_aligned(data);
            return ms_errorf(MS_ERR_SHAPE, "%s: new_concept_embedding.%s: %lld x %lld is too large", origin, key,
                             (long long)shape[0], (long long)shape[1]);
        }
        return add_embedding_own(f, key, (int)shape[0], (int)shape[1], data, origin);
    }
    if (!strcmp(section, SECTION[1])) return add_lora_part(f, 0, key, ndim, shape, data, origin);
    if (!strcmp(section, SECTION[2])) return add_lora_part(f, 1, key, ndim, shape, data, origin);
    ms_free_aligned(data);
    return ms_errorf(MS_ERR_FORMAT, "%s: '%s.%.100s': section '%s' is not new_concept_embedding, text_encoder or unet",
                     origin, section, key, section);
}

static int is_st_path(const char *path) { return ends_with(path, ".safetensors"); }

static MsStatus read_pth(const char *path, EdloraFile *f) {
    PthFile pf;
    MsStatus s = pth_open(&pf, path);
    if (s) return s;
    for (size_t i = 0; i < pf.n && !s; i++) {
        const PthTensor *t = &pf.t[i];
        const char *name = t->name, *key = name + t->leaf;
        char sec[64];
        size_t numel = pth_numel(t), pl = t->leaf;
        /* the key is the innermost dict key; what is before it must be [params.]<section>. */
        if (!strncmp(name, "params.", 7) && pl > 7) { name += 7; pl -= 7; }
        if (pl < 2 || pl - 1 >= sizeof sec || memchr(name, '.', pl - 1)) {
            s = ms_errorf(MS_ERR_FORMAT, "%s: tensor '%.200s': expected {'params': {section: {key: tensor}}}", path, t->name);
            break;
        }
        memcpy(sec, name, pl - 1);
        sec[pl - 1] = '\0';
        float *x = (float *)ms_alloc_aligned(numel ? numel : 1, sizeof(float));
        if (!x) { s = ms_errorf(MS_ERR_NOMEM, "%s: out of memory", path); break; }
        if ((s = pth_read_f32(&pf, t, x))) { ms_free_aligned(x); break; }
        s = add_tensor(f, sec, key, t->ndim, t->shape, x, path);
    }
    pth_close(&pf);
    return s;
}

/* ---- kohya / webui LoRA (.safetensors) ---- */
/* kohya-ss sd-scripts networks/lora.py (LoRANetwork.create_modules) names a module
 *     lora_name = prefix + "." + <module path> + "." + <child path>, then '.' -> '_'
 * with prefix "lora_te" (CLIPAttention / CLIPMLP children of the text encoder) or "lora_unet"
 * (every Linear and Conv2d child of each Transformer2DModel; ResnetBlock2D / Downsample2D /
 * Upsample2D convs only with conv_dim, "LoCon"), e.g.
 *     lora_te_text_model_encoder_layers_0_self_attn_q_proj
 *     lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_out_0
 * and saves <lora_name>.lora_down.weight (r, in[, kh, kw]), <lora_name>.lora_up.weight
 * (out, r[, 1, 1]) and <lora_name>.alpha (a scalar). LoRAModule: alpha None or 0 -> alpha = r
 * (lora_dim), scale = alpha / r; merge_to: W + multiplier * (up @ down) * scale. Files without
 * .alpha keys (old kohya) get alpha = r (create_network_from_weights: "support old LoRA without
 * alpha"). AUTOMATIC1111 webui (extensions-builtin/Lora network.py calc_scale, network_lora.py)
 * reads the same keys: scale = alpha / dim, dim = lora_down.shape[0], 1 without alpha (it
 * would give alpha 0 scale 0; kohya never writes 0: it stores the replaced alpha = r).
 * Ranks and alphas may differ between modules:
 * here each module's scale is folded into its up matrix (up *= alpha / r), so that the
 * ED-LoRA machinery's one alpha per network (unet_alpha, text_encoder_alpha) multiplies on top,
 * and differing ranks are zero-padded where one rank per network is needed (edlora_to_*). */
static int eat(const char **p, const char *lit) {
    size_t n = strlen(lit);
    if (strncmp(*p, lit, n)) return 0;
    *p += n;
    return 1;
}

static int eat_index(const char **p, int *v) {           /* 1..6 decimal digits */
    int k = 0, x = 0;
    while (k < 6 && (*p)[k] >= '0' && (*p)[k] <= '9') x = 10 * x + ((*p)[k++] - '0');
    if (!k || ((*p)[k] >= '0' && (*p)[k] <= '9')) return 0;
    *p += k;
    *v = x;
    return 1;
}

/* Returns the first of the n literals that *p equals exactly (to its end), or -1. */
static int eat_last(const char *p, const char *const *lit, int n) {
    for (int i = 0; i < n; i++) if (!strcmp(p, lit[i])) return i;
    return -1;
}

/* kohya module name -> diffusers module path (out, cap bytes); 0 when the name is not one of the
 * supported SD 1.x modules; *why then says what it is. */
static int kohya_module_path(const char *lora_name, int *is_unet, char *out, size_t cap, const char **why) {
    static const char *const te_attn[4] = { "q_proj", "k_proj", "v_proj", "out_proj" };
    static const char *const te_mlp[2] = { "fc1", "fc2" };
    static const char *const un_attn[4] = { "to_q", "to_k", "to_v", "to_out_0" };
    static const char *const un_attn_path[4] = { "to_q", "to_k", "to_v", "to_out.0" };
    static const char *const un_ff[2] = { "ff_net_0_proj", "ff_net_2" };
    static const char *const un_ff_path[2] = { "ff.net.0.proj", "ff.net.2" };
    static const char *const un_proj[2] = { "proj_in", "proj_out" };
    const char *p = lora_name;
    int a, b, k;
    *why = "not a module kohya LoRA puts on an SD 1.x model";
    if (eat(&p, "lora_te1_") || eat(&p, "lora_te2_")) { *why = "an SDXL text encoder (lora_te1_/lora_te2_): SD 1.x has one"; return 0; }
    if (eat(&p, "lora_te_")) {
        *is_unet = 0;
        if (!eat(&p, "text_model_encoder_layers_") || !eat_index(&p, &a) || !eat(&p, "_")) return 0;
        if (eat(&p, "self_attn_") && (k = eat_last(p, te_attn, 4)) >= 0) {
            snprintf(out, cap, "text_model.encoder.layers.%d.self_attn.%s", a, te_attn[k]);
            return 1;
        }
        if (eat(&p, "mlp_") && (k = eat_last(p, te_mlp, 2)) >= 0) {
            snprintf(out, cap, "text_model.encoder.layers.%d.mlp.%s", a, te_mlp[k]);
            return 1;
        }
        return 0;
    }
    if (!eat(&p, "lora_unet_")) { *why = "neither lora_te_ nor lora_unet_"; return 0; }
    *is_unet = 1;
    char blk[64];
    if (eat(&p, "down_blocks_") && eat_index(&p, &a) && eat(&p, "_")) snprintf(blk, sizeof blk, "down_blocks.%d", a);
    else if (eat(&p, "up_blocks_") && eat_index(&p, &a) && eat(&p, "_")) snprintf(blk, sizeof blk, "up_blocks.%d", a);
    else if (eat(&p, "mid_block_")) snprintf(blk, sizeof blk, "mid_block");
    else {
        if (!strncmp(p, "input_blocks_", 13) || !strncmp(p, "middle_block_", 13) || !strncmp(p, "output_blocks_", 14))
            *why = "LDM (compvis) module naming; kohya sd-scripts writes diffusers paths (lora_unet_down_blocks_..)";
        return 0;
    }
    if (strstr(p, "resnets_") == p || strstr(p, "downsamplers_") == p || strstr(p, "upsamplers_") == p) {
        *why = "a ResNet / sampler layer (conv LoRA, LoCon): only transformer layers are supported";
        return 0;
    }
    if (!eat(&p, "attentions_") || !eat_index(&p, &a) || !eat(&p, "_")) return 0;
    if ((k = eat_last(p, un_proj, 2)) >= 0) {
        snprintf(out, cap, "%s.attentions.%d.%s", blk, a, un_proj[k]);
        return 1;
    }
    if (!eat(&p, "transformer_blocks_") || !eat_index(&p, &b) || !eat(&p, "_")) return 0;
    k = eat(&p, "attn1_") ? 1 : eat(&p, "attn2_") ? 2 : 0;
    if (k) {
        int w = eat_last(p, un_attn, 4);
        if (w < 0) return 0;
        snprintf(out, cap, "%s.attentions.%d.transformer_blocks.%d.attn%d.%s", blk, a, b, k, un_attn_path[w]);
        return 1;
    }
    if ((k = eat_last(p, un_ff, 2)) >= 0) {
        snprintf(out, cap, "%s.attentions.%d.transformer_blocks.%d.%s", blk, a, b, un_ff_path[k]);
        return 1;
    }
    return 0;
}

/* What a key suffix other than lora_down.weight / lora_up.weight / alpha belongs to. */
static const char *kohya_suffix_kind(const char *suf) {
    if (!strncmp(suf, "hada_", 5)) return "LyCORIS LoHa (hada_*)";
    if (!strncmp(suf, "lokr_", 5)) return "LyCORIS LoKr (lokr_*)";
    if (!strcmp(suf, "lora_mid.weight")) return "LoCon / LyCORIS CP decomposition (lora_mid)";
    if (!strcmp(suf, "dora_scale")) return "DoRA (dora_scale)";
    if (!strcmp(suf, "lora_A.weight") || !strcmp(suf, "lora_B.weight")) return "PEFT naming (lora_A / lora_B)";
    if (!strcmp(suf, "diff") || !strcmp(suf, "diff_b")) return "a full weight difference (diff)";
    if (!strcmp(suf, "on_input") || !strcmp(suf, "weight")) return "LyCORIS IA3 / (IA)^3";
    return "an unknown kind of tensor";
}

#define KOHYA_SUPPORTED "supported: lora_te_text_model_encoder_layers_<i>_{self_attn_{q,k,v,out}_proj,mlp_fc1,mlp_fc2} " \
    "and lora_unet_{down_blocks_<i>,mid_block,up_blocks_<i>}_attentions_<j>_{proj_in,proj_out," \
    "transformer_blocks_<k>_{attn1,attn2}_{to_q,to_k,to_v,to_out_0},transformer_blocks_<k>_{ff_net_0_proj,ff_net_2}}, " \
    "each with .lora_down.weight, .lora_up.weight and optionally .alpha"

static MsStatus read_kohya(const char *path, const StFile *sf, EdloraFile *f) {
    MsStatus s = MS_OK;
    for (int pass = 0; pass < 2 && !s; pass++)          /* lora_down / lora_up, then the alphas */
        for (size_t i = 0; i < sf->count && !s; i++) {
            const StTensor *t = &sf->tensors[i];
            const char *dot = strchr(t->name, '.'), *why;
            char lname[MS_KEY_MAX], mpath[MS_KEY_MAX], key[MS_KEY_MAX + 32], sh[96];
            int is_unet = 0;
            size_t nl = dot ? (size_t)(dot - t->name) : 0;
            ms_shape_str(sh, sizeof sh, t->ndim, t->shape);
            if (!dot || nl >= sizeof lname) {
                s = ms_errorf(MS_ERR_FORMAT, "%s: tensor '%.200s': expected a kohya LoRA key <lora_name>.lora_down.weight, "
                              ".lora_up.weight or .alpha", path, t->name);
                break;
            }
            memcpy(lname, t->name, nl);
            lname[nl] = '\0';
            const int kind = !strcmp(dot + 1, "lora_down.weight") ? 0 : !strcmp(dot + 1, "lora_up.weight") ? 1
                           : !strcmp(dot + 1, "alpha") ? 2 : -1;
            if (kind < 0) {
                s = ms_errorf(MS_ERR_UNSUPPORTED, "%s: tensor '%.200s': %s is not supported (kohya LoRA only: "
                              "<lora_name>.lora_down.weight, .lora_up.weight, .alpha)", path, t->name, kohya_suffix_kind(dot + 1));
                break;
            }
            if (!kohya_module_path(lname, &is_unet, mpath, sizeof mpath, &why)) {
                if (!strncmp(lname, "bundle_emb", 10)) why = "a bundled textual-inversion embedding";
                s = ms_errorf(MS_ERR_UNSUPPORTED, "%s: tensor '%.200s': %s (%s)", path, t->name, why, KOHYA_SUPPORTED);
                break;
            }
            if ((pass == 0) != (kind < 2)) continue;
            if (kind < 2) {
                if (t->ndim == 4 && (t->shape[2] != 1 || t->shape[3] != 1)) {
                    s = ms_errorf(MS_ERR_UNSUPPORTED, "%s: tensor '%.200s' has shape %s: a %lldx%lld conv LoRA (LoCon) is not "
                                  "supported (Linear and 1x1 conv layers only)", path, t->name, sh,
                                  (long long)t->shape[2], (long long)t->shape[3]);
                    break;
                }
                float *x = (float *)ms_alloc_aligned(t->numel ? t->numel : 1, sizeof(float));
                if (!x) { s = ms_errorf(MS_ERR_NOMEM, "%s: out of memory", path); break; }
                if ((s = st_to_f32(sf, t, x, t->numel))) { ms_free_aligned(x); break; }
                snprintf(key, sizeof key, "%s%s", mpath, kind ? SUF_UP : SUF_DOWN);
                s = add_lora_part(f, is_unet, key, t->ndim, t->shape, x, path);
            } else {
                float a = 0.0f;
                EdloraModule *m = module_get(f, is_unet, mpath, 0);
                if (t->numel != 1) s = ms_errorf(MS_ERR_SHAPE, "%s: tensor '%.200s' has shape %s, expected a scalar alpha", path, t->name, sh);
                else if (!(s = st_to_f32(sf, t, &a, 1)) && !isfinite(a))
                    s = ms_errorf(MS_ERR_FORMAT, "%s: tensor '%.200s' is %g, expected a finite alpha", path, t->name, (double)a);
                else if (!s && (!m || !m->up || !m->down))
                    s = ms_errorf(MS_ERR_FORMAT, "%s: tensor '%.200s' has no %s.lora_down.weight / .lora_up.weight", path, t->name, lname);
                /* LoRAModule: alpha 0 (or None) means alpha = rank, scale 1 */
                if (!s && a != 0.0f) {
                    const double sc = (double)a / m->rank;
                    for (size_t k = 0; k < (size_t)m->out * m->rank; k++) m->up[k] = (float)(m->up[k] * sc);
                }
            }
        }
    if (!s && !f->n_te && !f->n_unet) s = ms_errorf(MS_ERR_FORMAT, "%s: no LoRA tensors", path);
    return s;
}

int edlora_module_is_attention(int is_unet, const char *name) {
    static const char *const te[4] = { ".self_attn.q_proj", ".self_attn.k_proj", ".self_attn.v_proj", ".self_attn.out_proj" };
    static const char *const un[4] = { ".to_q", ".to_k", ".to_v", ".to_out.0" };
    const char *const *suf = is_unet ? un : te;
    for (int i = 0; i < 4; i++)
        if (ends_with(name, suf[i]) && (!is_unet || strstr(name, ".attn1.") || strstr(name, ".attn2."))) return 1;
    return 0;
}

MsStatus edlora_split_extra(EdloraFile *f, EdloraFile *extra) {
    int cnt[2] = { 0, 0 };
    memset(extra, 0, sizeof *extra);
    for (int u = 0; u < 2; u++)
        for (int i = 0; i < (u ? f->n_unet : f->n_te); i++) cnt[u] += !edlora_module_is_attention(u, (u ? f->unet : f->te)[i].name);
    extra->te = cnt[0] ? (EdloraModule *)malloc((size_t)cnt[0] * sizeof *extra->te) : NULL;
    extra->unet = cnt[1] ? (EdloraModule *)malloc((size_t)cnt[1] * sizeof *extra->unet) : NULL;
    if ((cnt[0] && !extra->te) || (cnt[1] && !extra->unet)) {
        free(extra->te); free(extra->unet);
        memset(extra, 0, sizeof *extra);
        return ms_errorf(MS_ERR_NOMEM, "edlora: out of memory");
    }
    extra->cap_te = cnt[0];
    extra->cap_unet = cnt[1];
    for (int u = 0; u < 2; u++) {                      /* move: the pointers change owner */
        EdloraModule *m = u ? f->unet : f->te, *x = u ? extra->unet : extra->te;
        int *n = u ? &f->n_unet : &f->n_te, *nx = u ? &extra->n_unet : &extra->n_te, k = 0;
        for (int i = 0; i < *n; i++) {
            if (edlora_module_is_attention(u, m[i].name)) m[k++] = m[i];
            else x[(*nx)++] = m[i];
        }
        *n = k;
    }
    return MS_OK;
}

static MsStatus read_st(const char *path, EdloraFile *f) {
    StFile sf;
    JsonValue *order = NULL;
    MsStatus s = st_open(&sf, path);
    if (s) return s;
    for (size_t i = 0; i < sf.count; i++)              /* kohya / webui LoRA: lora_te_.., lora_unet_.. */
        if (!strncmp(sf.tensors[i].name, "lora_", 5)) {
            s = read_kohya(path, &sf, f);
            st_close(&sf);
            return s;
        }
    const char *ord = st_meta(&sf, "order");
    if (ord) {
        char origin[300];
        snprintf(origin, sizeof origin, "%s: metadata 'order'", path);
        if ((s = json_parse(ord, strlen(ord), origin, &order))) { st_close(&sf); return s; }
        if (order->type != JSON_ARRAY || order->count != sf.count)
            s = ms_errorf(MS_ERR_FORMAT, "%s: metadata 'order' must list the %zu tensor names", path, sf.count);
    }
    for (size_t i = 0; i < sf.count && !s; i++) {
        const StTensor *t = &sf.tensors[i];
        if (order) {
            const JsonValue *v = &order->items[i];
            if (v->type != JSON_STRING || !(t = st_find(&sf, v->str))) {
                s = ms_errorf(MS_ERR_FORMAT, "%s: metadata 'order'[%zu] is not a tensor name", path, i);
                break;
            }
        }
        const char *dot = strchr(t->name, '.');
        char sec[64];
        if (!dot || dot == t->name || (size_t)(dot - t->name) >= sizeof sec || !dot[1]) {
            s = ms_errorf(MS_ERR_FORMAT, "%s: tensor '%.200s': expected '<section>.<key>'", path, t->name);
            break;
        }
        memcpy(sec, t->name, (size_t)(dot - t->name));
        sec[dot - t->name] = '\0';
        float *x = (float *)ms_alloc_aligned(t->numel ? t->numel : 1, sizeof(float));
        if (!x) { s = ms_errorf(MS_ERR_NOMEM, "%s: out of memory", path); break; }
        if ((s = st_to_f32(&sf, t, x, t->numel))) { ms_free_aligned(x); break; }
        s = add_tensor(f, sec, dot + 1, t->ndim, t->shape, x, path);
    }
    if (!s && order) {                                  /* every name listed once */
        size_t n = (size_t)f->n_emb + 2 * ((size_t)f->n_te + f->n_unet);
        if (n != sf.count) s = ms_errorf(MS_ERR_FORMAT, "%s: metadata 'order' names a tensor twice", path);
    }
    json_free(order);
    st_close(&sf);
    return s;
}

MsStatus edlora_read(const char *path, EdloraFile *f) {
    memset(f, 0, sizeof *f);
    MsStatus s = is_st_path(path) ? read_st(path, f) : read_pth(path, f);
    if (!s) s = check_pairs(f, path);
    if (s) edlora_free(f);
    return s;
}

/* ---- writing ---- */
typedef struct { char name[MS_KEY_MAX + 32]; int ndim; int64_t shape[2]; const float *x; int rg; } WItem;

/* The file's tensors in dict order: section.key names, shapes, data. */
static WItem *items(const EdloraFile *f, size_t *n) {
    size_t cnt = (size_t)f->n_emb + 2 * ((size_t)f->n_te + f->n_unet), k = 0;
    WItem *it = (WItem *)calloc(cnt ? cnt : 1, sizeof *it);
    if (!it) return NULL;
    for (int i = 0; i < f->n_emb; i++, k++) {
        snprintf(it[k].name, sizeof it[k].name, "%s.%s", SECTION[0], f->emb[i].word);
        it[k].ndim = 2; it[k].shape[0] = f->emb[i].T; it[k].shape[1] = f->emb[i].D; it[k].x = f->emb[i].emb;
        it[k].rg = 0;                                   /* learned_embeds.detach().cpu() */
    }
    for (int u = 0; u < 2; u++) {
        const EdloraModule *m = u ? f->unet : f->te;
        for (int i = 0; i < (u ? f->n_unet : f->n_te); i++) {
            snprintf(it[k].name, sizeof it[k].name, "%s.%s%s", SECTION[u + 1], m[i].name, SUF_DOWN);
            it[k].ndim = 2; it[k].shape[0] = m[i].rank; it[k].shape[1] = m[i].in; it[k].x = m[i].down; it[k].rg = 1;
            k++;                                        /* param.cpu().clone(): requires_grad stays True */
            snprintf(it[k].name, sizeof it[k].name, "%s.%s%s", SECTION[u + 1], m[i].name, SUF_UP);
            it[k].ndim = 2; it[k].shape[0] = m[i].out; it[k].shape[1] = m[i].rank; it[k].x = m[i].up; it[k].rg = 1;
            k++;
        }
    }
    *n = cnt;
    return it;
}

MsStatus edlora_write(const char *path, const EdloraFile *f) {
    size_t n;
    MsStatus s = MS_OK;
    WItem *it = items(f, &n);
    if (!it) return ms_errorf(MS_ERR_NOMEM, "%s: out of memory", path);
    if (!n) { free(it); return ms_errorf(MS_ERR_ARG, "%s: nothing to write (no embeddings, no LoRA)", path); }
    if (is_st_path(path)) {
        StEntry *e = (StEntry *)calloc(n, sizeof *e);
        JsonBuf b = { 0 };
        s = e ? jbuf_puts(&b, "[") : ms_errorf(MS_ERR_NOMEM, "%s: out of memory", path);
        for (size_t i = 0; i < n && !s; i++) {
            e[i].name = it[i].name; e[i].dtype = ST_F32; e[i].ndim = it[i].ndim;
            e[i].shape[0] = it[i].shape[0]; e[i].shape[1] = it[i].shape[1]; e[i].f32 = it[i].x;
            if (i) s = jbuf_puts(&b, ",");
            if (!s) s = json_write_string(&b, it[i].name, strlen(it[i].name));
        }
        if (!s) s = jbuf_puts(&b, "]");
        if (!s) {
            const char *meta[4] = { "format", "mixshow-edlora", "order", b.data };
            s = st_write(path, e, n, meta, 2);
        }
        jbuf_free(&b);
        free(e);
    } else {
        PthSaveTensor *t = (PthSaveTensor *)calloc(n, sizeof *t);
        char (*nm)[MS_KEY_MAX + 40] = (char (*)[MS_KEY_MAX + 40])malloc(n * sizeof *nm);
        if (!t || !nm) s = ms_errorf(MS_ERR_NOMEM, "%s: out of memory", path);
        for (size_t i = 0; i < n && !s; i++) {
            snprintf(nm[i], sizeof nm[i], "params.%s", it[i].name);
            t[i].name = nm[i]; t[i].nest = 2; t[i].dtype = PTH_F32; t[i].ndim = it[i].ndim;
            t[i].shape[0] = it[i].shape[0]; t[i].shape[1] = it[i].shape[1]; t[i].data = it[i].x;
            t[i].requires_grad = it[i].rg;
        }
        if (!s) s = pth_save(path, t, n);
        free(t); free(nm);
    }
    free(it);
    return s;
}

/* ---- runtime types ---- */
static const char *const CLIP_PROJ[4] = { "q_proj", "k_proj", "v_proj", "out_proj" };   /* CLIP_Q.. */

/* Modules of one network may have different ranks (kohya files: per-module dims): the runtime
 * types hold one, the largest; a smaller module fills the first rows of down and the first
 * columns of up, the rest stay zero (up @ down unchanged: the extra terms are exact zeros). */
static int max_rank(const EdloraModule *m, int n) {
    int r = 0;
    for (int i = 0; i < n; i++) if (m[i].rank > r) r = m[i].rank;
    return r;
}

static void copy_padded(float *down, float *up, const EdloraModule *m, int rank) {
    memcpy(down, m->down, (size_t)m->rank * m->in * sizeof(float));
    memset(down + (size_t)m->rank * m->in, 0, (size_t)(rank - m->rank) * m->in * sizeof(float));
    for (int o = 0; o < m->out; o++) {
        memcpy(up + (size_t)o * rank, m->up + (size_t)o * m->rank, (size_t)m->rank * sizeof(float));
        memset(up + (size_t)o * rank + m->rank, 0, (size_t)(rank - m->rank) * sizeof(float));
    }
}

MsStatus edlora_to_clip_lora(const EdloraFile *f, const ClipTextConfig *c, float alpha, ClipLora *l, float **mem) {
    const int rank = max_rank(f->te, f->n_te);
    MsStatus s = MS_OK;
    *mem = NULL;
    if (!rank) return ms_errorf(MS_ERR_ARG, "edlora: the file has no text encoder LoRA");
    size_t n = clip_lora_numel(c, rank);
    if (!(*mem = (float *)ms_alloc_aligned(n, sizeof(float)))) return ms_errorf(MS_ERR_NOMEM, "edlora: out of memory");
    memset(*mem, 0, n * sizeof(float));
    clip_lora_bind(l, *mem, c, rank, alpha);
    const int D = c->hidden_size;
    for (int i = 0; i < f->n_te && !s; i++) {
        const EdloraModule *m = &f->te[i];
        int found = 0;
        for (int L = 0; L < c->num_hidden_layers && !found; L++)
            for (int p = 0; p < 4 && !found; p++) {
                char want[MS_KEY_MAX];
                snprintf(want, sizeof want, "text_model.encoder.layers.%d.self_attn.%s", L, CLIP_PROJ[p]);
                if (strcmp(want, m->name)) continue;
                found = 1;
                if (m->in != D || m->out != D)
                    s = ms_errorf(MS_ERR_SHAPE, "edlora: text_encoder.%s maps %d -> %d, the model's %s is %d -> %d", m->name,
                                  m->in, m->out, CLIP_PROJ[p], D, D);
                else copy_padded(l->down[L][p], l->up[L][p], m, rank);
            }
        if (!found && !s)
            s = ms_errorf(MS_ERR_ARG, "edlora: text_encoder.%s: the model has no such LoRA module (expected "
                          "text_model.encoder.layers.<0..%d>.self_attn.{q,k,v,out}_proj)", m->name, c->num_hidden_layers - 1);
    }
    if (s) { ms_free_aligned(*mem); *mem = NULL; }
    return s;
}

MsStatus edlora_to_unet_lora(const EdloraFile *f, const UNetParams *p, float alpha, Arena *train, UNetLora *l) {
    const int rank = max_rank(f->unet, f->n_unet);
    MsStatus s = MS_OK;
    if (!rank) return ms_errorf(MS_ERR_ARG, "edlora: the file has no UNet LoRA");
    if ((s = unet_lora_init(l, p, rank, alpha, train))) return s;
    for (int i = 0; i < f->n_unet && !s; i++) {
        const EdloraModule *m = &f->unet[i];
        int found = 0;
        for (int a = 0; a < l->n_attn && !found; a++)
            for (int w = 0; w < 4 && !found; w++) {
                char want[MS_KEY_MAX];
                unet_lora_module_name(p, a, w, want, sizeof want);
                if (strcmp(want, m->name)) continue;
                found = 1;
                UNetLoraLinear *x = &l->lin[4 * a + w];
                if (m->in != x->in || m->out != x->out)
                    s = ms_errorf(MS_ERR_SHAPE, "edlora: unet.%s maps %d -> %d, the model's layer is %d -> %d", m->name,
                                  m->in, m->out, x->in, x->out);
                else copy_padded(x->down, x->up, m, rank);
            }
        if (!found && !s)
            s = ms_errorf(MS_ERR_ARG, "edlora: unet.%s: the model has no such LoRA module (LoRA sits on "
                          "to_q/to_k/to_v/to_out.0 of every attn1/attn2)", m->name);
    }
    return s;
}

MsStatus edlora_from_lora(EdloraFile *f, int n_words, const char (*words)[MS_WORD_MAX], int T, int D,
                          const float *emb, const ClipLora *te, const UNetParams *up, const UNetLora *unet) {
    MsStatus s = MS_OK;
    memset(f, 0, sizeof *f);
    for (int w = 0; w < n_words && !s; w++) s = edlora_add_embedding(f, words[w], T, D, emb + (size_t)w * T * D);
    if (te) {
        static const int order[4] = { CLIP_K, CLIP_V, CLIP_Q, CLIP_O };   /* CLIPAttention.__init__ order */
        for (int L = 0; L < te->n_layers && !s; L++)
            for (int k = 0; k < 4 && !s; k++) {
                char nm[MS_KEY_MAX];
                snprintf(nm, sizeof nm, "text_model.encoder.layers.%d.self_attn.%s", L, CLIP_PROJ[order[k]]);
                s = edlora_add_module(f, 0, nm, te->rank, te->dim, te->dim, te->down[L][order[k]], te->up[L][order[k]]);
            }
    }
    if (unet && up) {
        /* named_modules(): down_blocks, up_blocks, mid_block (registration order in diffusers
         * 0.19.3 UNet2DConditionModel.__init__: both ModuleLists are created before mid_block) */
        static const char *const part[3] = { "down_blocks.", "up_blocks.", "mid_block." };
        for (int q = 0; q < 3 && !s; q++)
            for (int a = 0; a < unet->n_attn && !s; a++)
                for (int w = 0; w < 4 && !s; w++) {
                    char nm[MS_KEY_MAX];
                    unet_lora_module_name(up, a, w, nm, sizeof nm);
                    if (strncmp(nm, part[q], strlen(part[q]))) continue;
                    const UNetLoraLinear *x = &unet->lin[4 * a + w];
                    s = edlora_add_module(f, 1, nm, unet->rank, x->in, x->out, x->down, x->up);
                }
    }
    if (s) edlora_free(f);
    return s;
}

/* ---- convert_edlora ---- */
/* merge_lora_into_weight: new = original + alpha * (lora_up @ lora_down), each product in float32
 * (torch.mm of an (out, r) and an (r, in) float tensor), then alpha * it, then the sum. All
 * modules are checked before any weight changes, so a failed merge leaves the model as it was. */
static MsStatus merge_table(MsParamTable *t, const EdloraModule *m, int n, float alpha, const char *sec, int apply) {
    for (int i = 0; i < n; i++) {
        char key[MS_KEY_MAX + 16], sh[96];
        snprintf(key, sizeof key, "%s.weight", m[i].name);
        int k = ms_param_find(t, key);
        if (k < 0) return ms_errorf(MS_ERR_ARG, "edlora: %s.%s: the model has no weight '%s'", sec, m[i].name, key);
        MsParam *p = &t->p[k];
        if (!p->f32)
            return ms_errorf(MS_ERR_UNSUPPORTED, "edlora: %s '%s' is held in 16 bits: merging LoRA needs f32 weights "
                             "(load without --weights f16)", sec, key);
        int ok = (p->ndim == 2 || (p->ndim == 4 && p->shape[2] == 1 && p->shape[3] == 1)) &&
                 p->shape[0] == m[i].out && p->shape[1] == m[i].in;
        if (!ok)
            return ms_errorf(MS_ERR_SHAPE, "edlora: %s.%s: LoRA (%d <- %d, rank %d) does not fit '%s' of shape %s", sec,
                             m[i].name, m[i].out, m[i].in, m[i].rank, key, ms_shape_str(sh, sizeof sh, p->ndim, p->shape));
        if (!apply) continue;
        const int O = m[i].out, I = m[i].in, R = m[i].rank;
        for (int o = 0; o < O; o++)
            for (int j = 0; j < I; j++) {
                float acc = 0.0f;
                for (int r = 0; r < R; r++) acc += m[i].up[(size_t)o * R + r] * m[i].down[(size_t)r * I + j];
                float *w = &p->f32[(size_t)o * I + j];
                *w = *w + alpha * acc;
            }
    }
    return MS_OK;
}

MsStatus edlora_merge_check(MsModel *m, const EdloraFile *f) {
    MsStatus s = merge_table(&m->unet, f->unet, f->n_unet, 0.0f, "unet", 0);
    return s ? s : merge_table(&m->text, f->te, f->n_te, 0.0f, "text_encoder", 0);
}

MsStatus edlora_merge(MsModel *m, const EdloraFile *f, float alpha) {
    MsStatus s = MS_OK;
    for (int apply = 0; apply < 2 && !s; apply++) {     /* check everything, then change the model */
        s = merge_table(&m->unet, f->unet, f->n_unet, alpha, "unet", apply);
        if (!s) s = merge_table(&m->text, f->te, f->n_te, alpha, "text_encoder", apply);
    }
    return s;
}

void edlora_prompt_free(EdloraPrompt *p) {
    if (!p) return;
    ms_free_aligned(p->new_emb);
    free(p->tok); free(p->word); free(p->token);
    memset(p, 0, sizeof *p);
}

int edlora_fit_layers(EdloraFile *f, int n_layers) {
    const int T = edlora_tokens_per_word(f);
    if (T <= 1 || T <= n_layers) return T;
    for (int i = 0; i < f->n_emb; i++) f->emb[i].T = n_layers;   /* the first rows: emb is (T, D) row-major */
    return n_layers;
}

MsStatus edlora_prepare(const EdloraFile *f, ClipTokenizer *tok, const MsModel *m, EdloraPrompt *p,
                        MsTxt2ImgOptions *o) {
    const int n_layers = ms_unet_cross_attn_layers(&m->unet_config), Tf = edlora_tokens_per_word(f);
    const int T = Tf > 1 && Tf > n_layers ? n_layers : Tf, D = m->text_config.hidden_size;   /* edlora_fit_layers */
    MsStatus s = MS_OK;
    memset(p, 0, sizeof *p);
    if (!f->n_emb) return MS_OK;                       /* LoRA weights only: nothing to add */
    if (f->emb[0].D != D)
        return ms_errorf(MS_ERR_SHAPE, "edlora: new_concept_embedding.%s is %d wide, the text encoder's hidden_size is %d",
                         f->emb[0].word, f->emb[0].D, D);
    if (T != 1 && T != n_layers)
        return ms_errorf(MS_ERR_SHAPE, "edlora: %d tokens per concept word: expected %d (ED-LoRA, one per cross-attention "
                         "layer) or 1 (LoRA)", T, n_layers);
    for (int k = 0; k < f->n_emb * T; k++) {          /* load_new_concept's assert comes first */
        char nm[24];
        snprintf(nm, sizeof nm, "<new%d>", k);
        if (clip_tokenizer_find(tok, nm, strlen(nm)) >= 0)
            return ms_errorf(MS_ERR_ARG, "edlora: token %s is already in the tokenizer (load_new_concept: 'some token is "
                             "already in tokenizer')", nm);
    }
    if (tok->n_vocab + tok->n_added != m->text_config.vocab_size)
        return ms_errorf(MS_ERR_ARG, "edlora: the tokenizer has %d ids, the text encoder %d rows: new tokens would not "
                         "follow the embedding table", tok->n_vocab + tok->n_added, m->text_config.vocab_size);
    const int n = f->n_emb * T;
    p->n_new = n;
    p->new_emb = (float *)ms_alloc_aligned((size_t)n * D, sizeof(float));
    p->tok = (char (*)[24])malloc((size_t)n * sizeof *p->tok);
    p->word = (const char **)malloc((size_t)f->n_emb * sizeof *p->word);
    p->token = (const char **)malloc((size_t)n * sizeof *p->token);
    if (!p->new_emb || !p->tok || !p->word || !p->token) { edlora_prompt_free(p); return ms_errorf(MS_ERR_NOMEM, "edlora: out of memory"); }
    for (int w = 0; w < f->n_emb; w++) {
        p->word[w] = f->emb[w].word;
        memcpy(p->new_emb + (size_t)w * T * D, f->emb[w].emb, (size_t)T * D * sizeof(float));   /* its first T rows */
        for (int i = 0; i < T; i++) {
            int k = w * T + i;
            snprintf(p->tok[k], sizeof p->tok[k], "<new%d>", k);   /* load_new_concept: f'<new{idx * n + layer_id}>' */
            p->token[k] = p->tok[k];
        }
    }
    int added = 0;
    if ((s = clip_tokenizer_add_tokens(tok, p->token, n, &added))) { edlora_prompt_free(p); return s; }
    for (int k = 0; k < n; k++)
        if (clip_tokenizer_find(tok, p->tok[k], strlen(p->tok[k])) != m->text_config.vocab_size + k) {
            s = ms_errorf(MS_ERR_ARG, "edlora: token %s did not get id %d", p->tok[k], m->text_config.vocab_size + k);
            edlora_prompt_free(p);
            return s;
        }
    o->new_emb = p->new_emb;
    o->n_new = n;
    if (T > 1) {                                       /* EDLoRAPipeline: bind x n_layers */
        o->n_layer_ctx = T;
        o->n_bind = f->n_emb;
        o->bind_word = p->word;
        o->bind_token = p->token;
    } else {                                           /* StableDiffusionPipeline: prompt as given */
        o->n_layer_ctx = 0;
        o->n_bind = 0;
    }
    return MS_OK;
}
