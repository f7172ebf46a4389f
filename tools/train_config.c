/* tools/train_config.c — Mix-of-Show's ED-LoRA training options (.yml) -> TrainDataConfig
 * (tools.h) + MsTrainConfig (mixshow.h).
 *
 * Semantics are those of the official code (commit 51270fd): train_edlora.py reads the file
 * with OmegaConf and passes `models:` to EDLoRATrainer(**models) (trainer_edlora.py),
 * `train.optim_g` to torch.optim.AdamW, `datasets.train` to LoraDataset and
 * `datasets.val_vis` to PromptDataset (mixofshow/data/). Every key of the file must be one
 * this reader knows, so a typo is an error naming the dotted key
 * ("train.optim_g.foo: unknown option"), never a silently ignored option.
 *
 * Keys read but without numeric effect in mixshow (accepted, checked for type):
 *   mixed_precision      we compute in float32 whatever it says (kept in d->mixed_precision)
 *   models.enable_xformers, models.gradient_checkpoint   speed/memory switches of diffusers
 *   train.optim_g.lr     the official comment says "no use": each group has its own lr
 *   val.compose_visualize  the official sampler's image grid (kept in d->compose_visualize)
 *   path.pretrain_network  must be null (resuming from a network is not implemented)
 * Valid values mixshow does not implement are MS_ERR_UNSUPPORTED: gradient_accumulation_steps
 * != 1, optim_g.type != AdamW, optim_g.amsgrad true, train.scheduler != linear,
 * train.unet_kv_drop_rate != 0 (the official trainer never reads these last two either),
 * lora_cfg.where CLIPEncoderLayer / Transformer2DModel, datasets.train.name != LoraDataset,
 * datasets.val_vis.name != PromptDataset, a prompt list instead of a prompt file,
 * share_latent_across_prompt false, transforms outside MsTransformType.
 * Defaults: EDLoRATrainer's keyword defaults (ms_train_config_defaults); where the official
 * code indexes a key that has no default (opt['val']['val_during_save'], logger.print_freq,
 * ...) we take the value of the shipped files instead of failing. */
#include "tools/tools.h"

#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ---- messages: "origin:line:col: dotted.key: ..." ---------------------------------------- */
static MsStatus cerr(MsStatus code, const JsonValue *v, const char *path, const char *fmt, ...) {
    char msg[600];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    if (v && v->origin && v->line > 0) return ms_errorf(code, "%s:%d:%d: %s: %s", v->origin, v->line, v->col, path, msg);
    if (v && !v->origin) return ms_errorf(code, "--set %s: %s", path, msg);
    return ms_errorf(code, "%s: %s", path, msg);
}

/* "a string 'abc'", "a number 3.5", "a boolean true", "null", "a list", "a mapping" */
static const char *found(const JsonValue *v, char *buf, size_t n) {
    switch (v->type) {
    case JSON_NULL: snprintf(buf, n, "null"); break;
    case JSON_BOOL: snprintf(buf, n, "a boolean %s", v->boolean ? "true" : "false"); break;
    case JSON_NUMBER: snprintf(buf, n, "a number %.17g", v->number); break;
    case JSON_STRING: snprintf(buf, n, "a string '%.80s'", v->str); break;
    case JSON_ARRAY: snprintf(buf, n, "a list of %zu items", v->count); break;
    case JSON_OBJECT: snprintf(buf, n, "a mapping"); break;
    }
    return buf;
}

static MsStatus wrong_type(const JsonValue *v, const char *path, const char *expected) {
    char f[128];
    return cerr(MS_ERR_ARG, v, path, "expected %s, found %s", expected, found(v, f, sizeof f));
}

static void join(char *out, size_t n, const char *path, const char *key) {
    if (path && *path) snprintf(out, n, "%.200s.%.100s", path, key);
    else snprintf(out, n, "%.100s", key);
}

/* obj must be a mapping whose keys are all in `known` (NULL-terminated). */
static MsStatus check_keys(const JsonValue *obj, const char *path, const char *const *known) {
    if (obj->type != JSON_OBJECT) return wrong_type(obj, path, "a mapping");
    for (size_t i = 0; i < obj->count; i++) {
        const JsonValue *m = &obj->items[i];
        int ok = 0;
        for (const char *const *k = known; *k && !ok; k++) ok = strlen(*k) == m->key_len && !memcmp(*k, m->key, m->key_len);
        if (!ok) {
            char p[320];
            join(p, sizeof p, path, m->key);
            return cerr(MS_ERR_ARG, m, p, "unknown option");
        }
    }
    return MS_OK;
}

/* The member `key` of obj (NULL if absent); *p gets its dotted path. required: absent is an error. */
static MsStatus member(const JsonValue *obj, const char *path, const char *key, int required, const JsonValue **v, char *p, size_t pn) {
    join(p, pn, path, key);
    *v = json_get(obj, key);
    if (!*v && required) return cerr(MS_ERR_ARG, obj, p, "missing (required by the official code)");
    return MS_OK;
}

#define PATHN 320

static MsStatus get_bool(const JsonValue *obj, const char *path, const char *key, int required, int *out) {
    const JsonValue *v; char p[PATHN];
    MsStatus s = member(obj, path, key, required, &v, p, sizeof p);
    if (s != MS_OK || !v) return s;
    if (v->type != JSON_BOOL) return wrong_type(v, p, "a boolean (true/false)");
    *out = v->boolean;
    return MS_OK;
}

static MsStatus get_num(const JsonValue *obj, const char *path, const char *key, int required, double *out) {
    const JsonValue *v; char p[PATHN];
    MsStatus s = member(obj, path, key, required, &v, p, sizeof p);
    if (s != MS_OK || !v) return s;
    if (v->type != JSON_NUMBER) return wrong_type(v, p, "a number");
    if (!isfinite(v->number)) return cerr(MS_ERR_ARG, v, p, "expected a finite number, found %g", v->number);
    *out = v->number;
    return MS_OK;
}

/* number or null: *has = 0 for null */
static MsStatus get_num_or_null(const JsonValue *obj, const char *path, const char *key, int *has, double *out) {
    const JsonValue *v; char p[PATHN];
    MsStatus s = member(obj, path, key, 0, &v, p, sizeof p);
    if (s != MS_OK || !v) return s;
    if (v->type == JSON_NULL) { *has = 0; return MS_OK; }
    if (v->type != JSON_NUMBER || !isfinite(v->number)) return wrong_type(v, p, "a number or null");
    *has = 1; *out = v->number;
    return MS_OK;
}

static MsStatus as_int_range(const JsonValue *v, const char *p, int64_t lo, int64_t hi, int64_t *out) {
    if (v->type != JSON_NUMBER || v->number != floor(v->number) || !(fabs(v->number) <= 9007199254740992.0))
        return wrong_type(v, p, "an integer");
    if (v->number < (double)lo || v->number > (double)hi)
        return cerr(MS_ERR_ARG, v, p, "%.17g is out of range [%lld, %lld]", v->number, (long long)lo, (long long)hi);
    *out = (int64_t)v->number;
    return MS_OK;
}

static MsStatus get_int(const JsonValue *obj, const char *path, const char *key, int required, int64_t lo, int64_t hi, int64_t *out) {
    const JsonValue *v; char p[PATHN];
    MsStatus s = member(obj, path, key, required, &v, p, sizeof p);
    if (s != MS_OK || !v) return s;
    return as_int_range(v, p, lo, hi, out);
}

static MsStatus get_int32(const JsonValue *obj, const char *path, const char *key, int required, int lo, int hi, int *out) {
    int64_t x = *out;
    MsStatus s = get_int(obj, path, key, required, lo, hi, &x);
    *out = (int)x;
    return s;
}

/* string into buf[cap]; *present set when given. null_ok: null leaves buf as it is. */
static MsStatus get_str(const JsonValue *obj, const char *path, const char *key, int required, int null_ok, char *buf, size_t cap,
                        const JsonValue **where) {
    const JsonValue *v; char p[PATHN];
    MsStatus s = member(obj, path, key, required, &v, p, sizeof p);
    if (where) *where = v;
    if (s != MS_OK || !v) return s;
    if (null_ok && v->type == JSON_NULL) return MS_OK;
    if (v->type != JSON_STRING) return wrong_type(v, p, null_ok ? "a string or null" : "a string");
    if (v->len >= cap || memchr(v->str, '\0', v->len))
        return cerr(MS_ERR_ARG, v, p, "'%.60s...' is longer than %zu bytes (or holds a NUL)", v->str, cap - 1);
    memcpy(buf, v->str, v->len + 1);
    return MS_OK;
}

/* a list of numbers, n_min..n_max long */
static MsStatus get_nums(const JsonValue *obj, const char *path, const char *key, int required, size_t n_min, size_t n_max,
                         double *out, int *n_out) {
    const JsonValue *v; char p[PATHN];
    MsStatus s = member(obj, path, key, required, &v, p, sizeof p);
    if (s != MS_OK || !v) return s;
    if (v->type != JSON_ARRAY || v->count < n_min || v->count > n_max) {
        char want[64];
        if (n_min == n_max) snprintf(want, sizeof want, "a list of %zu numbers", n_min);
        else snprintf(want, sizeof want, "a list of %zu to %zu numbers", n_min, n_max);
        return wrong_type(v, p, want);
    }
    for (size_t i = 0; i < v->count; i++) {
        char pi[PATHN + 16];
        snprintf(pi, sizeof pi, "%.200s[%zu]", p, i);
        if (v->items[i].type != JSON_NUMBER || !isfinite(v->items[i].number)) return wrong_type(&v->items[i], pi, "a number");
        out[i] = v->items[i].number;
    }
    if (n_out) *n_out = (int)v->count;
    return MS_OK;
}

/* replace_mapping: {from: to, ...} in file order */
static MsStatus get_mapping(const JsonValue *obj, const char *path, int *n, char from[][64], char to[][256]) {
    const JsonValue *v; char p[PATHN];
    MsStatus s = member(obj, path, "replace_mapping", 0, &v, p, sizeof p);
    if (s != MS_OK || !v) return s;
    if (v->type != JSON_OBJECT) return wrong_type(v, p, "a mapping of strings");
    if (v->count > MS_MAX_REPLACE) return cerr(MS_ERR_UNSUPPORTED, v, p, "more than %d entries", MS_MAX_REPLACE);
    *n = 0;
    for (size_t i = 0; i < v->count; i++) {
        const JsonValue *m = &v->items[i];
        char pk[PATHN + 80];
        snprintf(pk, sizeof pk, "%.200s.%.64s", p, m->key);
        if (m->key_len == 0 || m->key_len >= 64 || memchr(m->key, '\0', m->key_len))
            return cerr(MS_ERR_ARG, m, pk, "key must be 1 to 63 bytes");
        if (m->type != JSON_STRING) return wrong_type(m, pk, "a string");
        if (m->len >= 256 || memchr(m->str, '\0', m->len)) return cerr(MS_ERR_ARG, m, pk, "longer than 255 bytes");
        memcpy(from[*n], m->key, m->key_len + 1);
        memcpy(to[*n], m->str, m->len + 1);
        (*n)++;
    }
    return MS_OK;
}

/* ---- datasets ------------------------------------------------------------------------------ */
static MsStatus read_transform(const JsonValue *t, const char *path, MsTransformSpec *sp) {
    static const char *const k_resize_v3[] = { "type", "size", "crop_p", NULL };
    static const char *const k_fill[] = { "type", "size", "crop_p", "scale_ratio", NULL };
    static const char *const k_type[] = { "type", NULL };
    static const char *const k_norm[] = { "type", "mean", "std", NULL };
    static const char *const k_shuffle[] = { "type", "keep_token_num", NULL };
    static const char *const k_enhance[] = { "type", "enhance_type", NULL };
    static const char *const k_flip[] = { "type", "p", NULL };
    static const char *const other_registered[] = { "Resize", "RandomHorizontalFlip", "CenterCrop", "RandomCrop",
                                                    "BILINEARResize", "PairRandomCrop", "PairResize", NULL };
    char type[64], p[PATHN];
    const JsonValue *tv;
    MsStatus s;
    memset(sp, 0, sizeof *sp);
    if (t->type != JSON_OBJECT) return wrong_type(t, path, "a mapping with a 'type'");
    if ((s = get_str(t, path, "type", 1, 0, type, sizeof type, &tv)) != MS_OK) return s;
    /* HumanResizeCropPlace / ResizeFillMaskPlace (mixshow): the official transforms placing on
     * their own size x size canvas instead of the hard-coded 512 (world images of 64, 128 px) */
    sp->place = !strcmp(type, "HumanResizeCropPlace") || !strcmp(type, "ResizeFillMaskPlace");
    if (!strcmp(type, "HumanResizeCropFinalV3") || !strcmp(type, "HumanResizeCropPlace")) {
        sp->type = MS_TF_HUMAN_RESIZE_CROP_V3;
        sp->crop_p = 0.5;
        if ((s = check_keys(t, path, k_resize_v3)) != MS_OK) return s;
        if ((s = get_int32(t, path, "size", 1, 8, 8192, &sp->size)) != MS_OK) return s;
        if ((s = get_num(t, path, "crop_p", 0, &sp->crop_p)) != MS_OK) return s;
    } else if (!strcmp(type, "ResizeFillMaskNew") || !strcmp(type, "ResizeFillMaskPlace")) {
        sp->type = MS_TF_RESIZE_FILL_MASK_NEW;
        if ((s = check_keys(t, path, k_fill)) != MS_OK) return s;
        if ((s = get_int32(t, path, "size", 1, 8, 8192, &sp->size)) != MS_OK) return s;
        if ((s = get_num(t, path, "crop_p", 1, &sp->crop_p)) != MS_OK) return s;
        if ((s = get_nums(t, path, "scale_ratio", 1, 2, 2, sp->scale_ratio, NULL)) != MS_OK) return s;
    } else if (!strcmp(type, "ToTensor")) {
        sp->type = MS_TF_TO_TENSOR;
        if ((s = check_keys(t, path, k_type)) != MS_OK) return s;
    } else if (!strcmp(type, "Normalize")) {
        int nm = 0, ns = 0;
        sp->type = MS_TF_NORMALIZE;
        if ((s = check_keys(t, path, k_norm)) != MS_OK) return s;
        if ((s = get_nums(t, path, "mean", 1, 1, 3, sp->mean, &nm)) != MS_OK) return s;
        if ((s = get_nums(t, path, "std", 1, 1, 3, sp->std, &ns)) != MS_OK) return s;
        if (nm == 2 || ns == 2 || nm != ns) {
            snprintf(p, sizeof p, "%.200s.std", path);
            return cerr(MS_ERR_ARG, json_get(t, "std"), p, "mean and std must both hold 1 or both hold 3 numbers (found %d and %d)", nm, ns);
        }
        for (int i = 0; i < ns; i++) if (!(sp->std[i] != 0)) {
            snprintf(p, sizeof p, "%.200s.std", path);
            return cerr(MS_ERR_ARG, json_get(t, "std"), p, "std must not be 0");
        }
        sp->n_mean = nm;
    } else if (!strcmp(type, "ShuffleCaption")) {
        sp->type = MS_TF_SHUFFLE_CAPTION;
        if ((s = check_keys(t, path, k_shuffle)) != MS_OK) return s;
        if ((s = get_int32(t, path, "keep_token_num", 1, 0, 1 << 20, &sp->keep_token_num)) != MS_OK) return s;
    } else if (!strcmp(type, "EnhanceText")) {
        const JsonValue *ev;
        sp->type = MS_TF_ENHANCE_TEXT;
        strcpy(sp->enhance_type, "object");
        if ((s = check_keys(t, path, k_enhance)) != MS_OK) return s;
        if ((s = get_str(t, path, "enhance_type", 0, 0, sp->enhance_type, sizeof sp->enhance_type, &ev)) != MS_OK) return s;
        if (strcmp(sp->enhance_type, "object") && strcmp(sp->enhance_type, "human") && strcmp(sp->enhance_type, "style")) {
            snprintf(p, sizeof p, "%.200s.enhance_type", path);
            return cerr(MS_ERR_ARG, ev, p, "expected object, human or style, found '%s'", sp->enhance_type);
        }
    } else if (!strcmp(type, "PairRandomHorizontalFlip")) {
        sp->type = MS_TF_PAIR_RANDOM_HFLIP;
        sp->p = 0.5;
        if ((s = check_keys(t, path, k_flip)) != MS_OK) return s;
        if ((s = get_num(t, path, "p", 0, &sp->p)) != MS_OK) return s;
    } else {
        int registered = 0;
        for (const char *const *k = other_registered; *k; k++) registered |= !strcmp(*k, type);
        snprintf(p, sizeof p, "%.200s.type", path);
        return cerr(registered ? MS_ERR_UNSUPPORTED : MS_ERR_ARG, tv, p, "%s transform '%s' (mixshow has HumanResizeCropFinalV3, "
                    "ResizeFillMaskNew, ToTensor, Normalize, ShuffleCaption, EnhanceText, PairRandomHorizontalFlip; "
                    "HumanResizeCropPlace, ResizeFillMaskPlace)",
                    registered ? "unsupported" : "unknown", type);
    }
    return MS_OK;
}

static MsStatus read_train_set(const JsonValue *t, const char *path, TrainDataConfig *d) {
    static const char *const known[] = { "name", "concept_list", "use_caption", "use_mask", "instance_transform", "replace_mapping",
                                         "batch_size_per_gpu", "dataset_enlarge_ratio", NULL };
    char name[64] = "LoraDataset", p[PATHN];
    const JsonValue *v;
    MsStatus s;
    if ((s = check_keys(t, path, known)) != MS_OK) return s;
    if ((s = get_str(t, path, "name", 0, 0, name, sizeof name, &v)) != MS_OK) return s;
    if (strcmp(name, "LoraDataset"))
        return cerr(MS_ERR_UNSUPPORTED, v, "datasets.train.name", "dataset '%s' is not supported (only LoraDataset)", name);
    if ((s = get_str(t, path, "concept_list", 1, 0, d->concept_list, sizeof d->concept_list, NULL)) != MS_OK) return s;
    if ((s = get_bool(t, path, "use_caption", 0, &d->use_caption)) != MS_OK) return s;
    if ((s = get_bool(t, path, "use_mask", 0, &d->use_mask)) != MS_OK) return s;
    if ((s = member(t, path, "instance_transform", 1, &v, p, sizeof p)) != MS_OK) return s;
    if (v->type != JSON_ARRAY) return wrong_type(v, p, "a list of transforms");
    if (v->count > MS_MAX_TRANSFORMS) return cerr(MS_ERR_UNSUPPORTED, v, p, "more than %d transforms", MS_MAX_TRANSFORMS);
    d->n_transforms = 0;
    for (size_t i = 0; i < v->count; i++) {
        char pi[PATHN + 16];
        snprintf(pi, sizeof pi, "%.200s[%zu]", p, i);
        if ((s = read_transform(&v->items[i], pi, &d->transforms[i])) != MS_OK) return s;
        d->n_transforms++;
    }
    if ((s = get_mapping(t, path, &d->n_replace, d->replace_from, d->replace_to)) != MS_OK) return s;
    if ((s = get_int32(t, path, "batch_size_per_gpu", 1, 1, 1 << 16, &d->batch_size)) != MS_OK) return s;
    return get_int32(t, path, "dataset_enlarge_ratio", 1, 1, 1 << 24, &d->enlarge_ratio);
}

static MsStatus read_val_set(const JsonValue *t, const char *path, TrainDataConfig *d) {
    static const char *const known[] = { "name", "prompts", "num_samples_per_prompt", "latent_size", "replace_mapping",
                                         "batch_size_per_gpu", "share_latent_across_prompt", NULL };
    char name[64] = "PromptDataset", p[PATHN];
    const JsonValue *v;
    double ls[3];
    int share = 1;
    MsStatus s;
    if ((s = check_keys(t, path, known)) != MS_OK) return s;
    if ((s = get_str(t, path, "name", 0, 0, name, sizeof name, &v)) != MS_OK) return s;
    if (strcmp(name, "PromptDataset"))
        return cerr(MS_ERR_UNSUPPORTED, v, "datasets.val_vis.name", "dataset '%s' is not supported (only PromptDataset)", name);
    if ((s = member(t, path, "prompts", 1, &v, p, sizeof p)) != MS_OK) return s;
    if (v->type == JSON_ARRAY) return cerr(MS_ERR_UNSUPPORTED, v, p, "a list of prompts is not supported: give a prompt file");
    if ((s = get_str(t, path, "prompts", 1, 0, d->val_prompts, sizeof d->val_prompts, NULL)) != MS_OK) return s;
    if ((s = get_int32(t, path, "num_samples_per_prompt", 1, 1, 1 << 16, &d->val_samples_per_prompt)) != MS_OK) return s;
    if ((s = get_nums(t, path, "latent_size", 1, 3, 3, ls, NULL)) != MS_OK) return s;
    for (int i = 0; i < 3; i++) {
        if (ls[i] != floor(ls[i]) || ls[i] < 1 || ls[i] > 4096) {
            snprintf(p, sizeof p, "%.200s.latent_size", path);
            return cerr(MS_ERR_ARG, json_get(t, "latent_size"), p, "expected 3 positive integers (C, h, w), found %g at [%d]", ls[i], i);
        }
        d->val_latent_size[i] = (int)ls[i];
    }
    if ((s = get_mapping(t, path, &d->n_val_replace, d->val_replace_from, d->val_replace_to)) != MS_OK) return s;
    if ((s = get_int32(t, path, "batch_size_per_gpu", 1, 1, 1 << 16, &d->val_batch_size)) != MS_OK) return s;
    if ((s = get_bool(t, path, "share_latent_across_prompt", 0, &share)) != MS_OK) return s;
    if (!share) return cerr(MS_ERR_UNSUPPORTED, json_get(t, "share_latent_across_prompt"), "datasets.val_vis.share_latent_across_prompt",
                            "false (random latents per prompt) is not supported");
    return MS_OK;
}

/* ---- models ---------------------------------------------------------------------------------- */
/* finetune_cfg.<part>: enable_tuning, lr, lora_cfg {rank, alpha, where}, weight_decay (text_embedding) */
static MsStatus read_part(const JsonValue *f, const char *key, const char *where_ok, const char *where_alt, int *tune, double *lr,
                          int *rank, double *alpha, double *wd) {
    static const char *const k_emb[] = { "enable_tuning", "lr", "weight_decay", NULL };
    static const char *const k_net[] = { "enable_tuning", "lr", "lora_cfg", NULL };
    static const char *const k_lora[] = { "rank", "alpha", "where", NULL };
    char path[PATHN], p[PATHN];
    const JsonValue *part, *lora;
    MsStatus s;
    if ((s = member(f, "models.finetune_cfg", key, 1, &part, path, sizeof path)) != MS_OK) return s;
    if ((s = check_keys(part, path, where_ok ? k_net : k_emb)) != MS_OK) return s;
    if ((s = get_bool(part, path, "enable_tuning", 1, tune)) != MS_OK) return s;
    if ((s = get_num(part, path, "lr", *tune, lr)) != MS_OK) return s;
    if (!where_ok) return get_num(part, path, "weight_decay", 0, wd);
    if ((s = member(part, path, "lora_cfg", 0, &lora, p, sizeof p)) != MS_OK) return s;
    /* EDLoRATrainer: `enable_tuning and finetune_cfg[...].get('lora_cfg')`: absent, null or {} is off */
    if (!lora || lora->type == JSON_NULL || (lora->type == JSON_OBJECT && lora->count == 0)) { *tune = 0; return MS_OK; }
    if ((s = check_keys(lora, p, k_lora)) != MS_OK) return s;
    char where[64];
    const JsonValue *wv;
    int64_t r = *rank;
    if ((s = get_str(lora, p, "where", 1, 0, where, sizeof where, &wv)) != MS_OK) return s;
    if (strcmp(where, where_ok)) {
        char pw[PATHN + 8];
        snprintf(pw, sizeof pw, "%.200s.where", p);
        if (!strcmp(where, where_alt))
            return cerr(MS_ERR_UNSUPPORTED, wv, pw, "'%s' is not supported (mixshow puts LoRA on %s only)", where, where_ok);
        return cerr(MS_ERR_ARG, wv, pw, "expected %s (or %s), found '%s'", where_ok, where_alt, where);
    }
    if ((s = get_int(lora, p, "rank", 0, 1, 1024, &r)) != MS_OK) return s;
    *rank = (int)r;
    return get_num(lora, p, "alpha", 0, alpha);
}

/* "<a>+<b>" -> words; each 1..MS_WORD_MAX-1 bytes */
static MsStatus split_plus(const JsonValue *v, const char *p, const char *s, char out[][MS_WORD_MAX], int *n) {
    *n = 0;
    for (;;) {
        const char *e = strchr(s, '+');
        size_t len = e ? (size_t)(e - s) : strlen(s);
        if (*n == MS_MAX_CONCEPT_WORDS) return cerr(MS_ERR_UNSUPPORTED, v, p, "more than %d words", MS_MAX_CONCEPT_WORDS);
        if (len == 0 || len >= MS_WORD_MAX) return cerr(MS_ERR_ARG, v, p, "word %d of '%.100s' is empty or longer than %d bytes", *n + 1, v->str, MS_WORD_MAX - 1);
        memcpy(out[*n], s, len);
        out[*n][len] = '\0';
        (*n)++;
        if (!e) return MS_OK;
        s = e + 1;
    }
}

static MsStatus read_models(const JsonValue *mo, TrainDataConfig *d, MsTrainConfig *m) {
    static const char *const known[] = { "pretrained_path", "enable_edlora", "finetune_cfg", "new_concept_token", "initializer_token",
                                         "noise_offset", "attn_reg_weight", "reg_full_identity", "use_mask_loss", "gradient_checkpoint",
                                         "enable_xformers", NULL };
    static const char *const k_ft[] = { "text_embedding", "text_encoder", "unet", NULL };
    const char *path = "models";
    const JsonValue *v, *iv, *ft;
    char p[PATHN];
    int dummy = 0;
    MsStatus s;
    if ((s = check_keys(mo, path, known)) != MS_OK) return s;
    if ((s = get_str(mo, path, "pretrained_path", 1, 0, d->pretrained_path, sizeof d->pretrained_path, NULL)) != MS_OK) return s;
    if ((s = get_bool(mo, path, "enable_edlora", 1, &m->enable_edlora)) != MS_OK) return s;
    /* finetune_cfg: without it EDLoRATrainer builds no optimizer groups (and the script fails) */
    if ((s = member(mo, path, "finetune_cfg", 1, &ft, p, sizeof p)) != MS_OK) return s;
    if ((s = check_keys(ft, p, k_ft)) != MS_OK) return s;
    if ((s = read_part(ft, "text_embedding", NULL, NULL, &m->tune_emb, &m->lr_emb, NULL, NULL, &m->wd_emb)) != MS_OK) return s;
    if ((s = read_part(ft, "text_encoder", "CLIPAttention", "CLIPEncoderLayer", &m->tune_te, &m->lr_te, &m->te_rank, &m->te_alpha, NULL)) != MS_OK) return s;
    if ((s = read_part(ft, "unet", "Attention", "Transformer2DModel", &m->tune_unet, &m->lr_unet, &m->unet_rank, &m->unet_alpha, NULL)) != MS_OK) return s;
    /* new_concept_token.split('+'); initializer_token None -> '<rand-0.017>' per word */
    if ((s = member(mo, path, "new_concept_token", 1, &v, p, sizeof p)) != MS_OK) return s;
    if (v->type != JSON_STRING) return wrong_type(v, p, "a string such as <potter1>+<potter2>");
    if ((s = split_plus(v, p, v->str, m->words, &m->n_words)) != MS_OK) return s;
    if ((s = member(mo, path, "initializer_token", 1, &iv, p, sizeof p)) != MS_OK) return s;
    if (iv->type == JSON_NULL) {
        for (int i = 0; i < m->n_words; i++) strcpy(m->init[i], "<rand-0.017>");
    } else {
        int n_init = 0;
        if (iv->type != JSON_STRING) return wrong_type(iv, p, "a string such as <rand-0.013>+man, or null");
        if ((s = split_plus(iv, p, iv->str, m->init, &n_init)) != MS_OK) return s;
        if (n_init != m->n_words)
            return cerr(MS_ERR_ARG, iv, p, "%d initializer words for %d concept words (new_concept_token '%.100s'): they must match",
                        n_init, m->n_words, v->str);
        for (int i = 0; i < n_init; i++) {
            /* init_token.startswith('<rand'): float(re.findall(r'<rand-(.*)>', init_token)[0]) */
            const char *w = m->init[i];
            if (strncmp(w, "<rand", 5)) continue;
            size_t L = strlen(w);
            char *end = NULL;
            double sigma = L > 7 && !strncmp(w, "<rand-", 6) && w[L - 1] == '>' ? strtod(w + 6, &end) : NAN;
            if (!end || end != w + L - 1 || !isfinite(sigma))
                return cerr(MS_ERR_ARG, iv, p, "'%s': expected <rand-SIGMA> with a number SIGMA, e.g. <rand-0.013>", w);
        }
    }
    if ((s = get_num_or_null(mo, path, "noise_offset", &m->has_noise_offset, &m->noise_offset)) != MS_OK) return s;
    if ((s = get_num_or_null(mo, path, "attn_reg_weight", &m->has_attn_reg, &m->attn_reg_weight)) != MS_OK) return s;
    if ((s = get_bool(mo, path, "reg_full_identity", 0, &m->reg_full_identity)) != MS_OK) return s;
    if ((s = get_bool(mo, path, "use_mask_loss", 0, &m->use_mask_loss)) != MS_OK) return s;
    if ((s = get_bool(mo, path, "gradient_checkpoint", 0, &dummy)) != MS_OK) return s;   /* no numeric effect */
    return get_bool(mo, path, "enable_xformers", 0, &dummy);                             /* no numeric effect */
}

/* ---- train, val, logger, path, top level ------------------------------------------------------- */
static MsStatus read_train(const JsonValue *t, MsTrainConfig *m) {
    static const char *const known[] = { "optim_g", "unet_kv_drop_rate", "scheduler", "emb_norm_threshold", NULL };
    static const char *const k_opt[] = { "type", "lr", "weight_decay", "betas", "eps", "amsgrad", NULL };
    const JsonValue *o, *v;
    char p[PATHN], type[64], sched[64] = "linear";
    double lr_unused = 0, betas[2], drop = 0;
    int amsgrad = 0;
    MsStatus s;
    if ((s = check_keys(t, "train", known)) != MS_OK) return s;
    if ((s = member(t, "train", "optim_g", 1, &o, p, sizeof p)) != MS_OK) return s;
    if ((s = check_keys(o, p, k_opt)) != MS_OK) return s;
    if ((s = get_str(o, p, "type", 1, 0, type, sizeof type, &v)) != MS_OK) return s;
    if (strcmp(type, "AdamW")) return cerr(MS_ERR_UNSUPPORTED, v, "train.optim_g.type", "optimizer '%s' is not supported (only AdamW, as the official script)", type);
    if ((s = get_num(o, p, "lr", 0, &lr_unused)) != MS_OK) return s;   /* "no use": each parameter group sets its lr */
    if ((s = get_num(o, p, "weight_decay", 0, &m->weight_decay)) != MS_OK) return s;
    if (json_get(o, "betas")) {
        if ((s = get_nums(o, p, "betas", 1, 2, 2, betas, NULL)) != MS_OK) return s;
        m->beta1 = betas[0]; m->beta2 = betas[1];
    }
    if ((s = get_num(o, p, "eps", 0, &m->adam_eps)) != MS_OK) return s;
    if ((s = get_bool(o, p, "amsgrad", 0, &amsgrad)) != MS_OK) return s;
    if (amsgrad) return cerr(MS_ERR_UNSUPPORTED, json_get(o, "amsgrad"), "train.optim_g.amsgrad", "AMSGrad is not supported");
    if ((s = get_num(t, "train", "unet_kv_drop_rate", 0, &drop)) != MS_OK) return s;
    if (drop != 0) return cerr(MS_ERR_UNSUPPORTED, json_get(t, "unet_kv_drop_rate"), "train.unet_kv_drop_rate", "%g: K/V dropout is not supported (only 0)", drop);
    if ((s = get_str(t, "train", "scheduler", 0, 0, sched, sizeof sched, &v)) != MS_OK) return s;
    if (strcmp(sched, "linear")) return cerr(MS_ERR_UNSUPPORTED, v, "train.scheduler", "'%s' is not supported (only linear, as the official script)", sched);
    return get_num(t, "train", "emb_norm_threshold", 0, &m->emb_norm_threshold);
}

static MsStatus read_val(const JsonValue *t, TrainDataConfig *d) {
    static const char *const known[] = { "val_during_save", "compose_visualize", "alpha_list", "sample", NULL };
    static const char *const k_sample[] = { "num_inference_steps", "guidance_scale", NULL };
    const JsonValue *sm;
    char p[PATHN];
    MsStatus s;
    if ((s = check_keys(t, "val", known)) != MS_OK) return s;
    if ((s = get_bool(t, "val", "val_during_save", 0, &d->val_during_save)) != MS_OK) return s;
    if ((s = get_bool(t, "val", "compose_visualize", 0, &d->compose_visualize)) != MS_OK) return s;
    if ((s = get_nums(t, "val", "alpha_list", 0, 0, 8, d->alpha_list, &d->n_alpha)) != MS_OK) return s;
    if ((s = member(t, "val", "sample", 0, &sm, p, sizeof p)) != MS_OK || !sm) return s;
    if ((s = check_keys(sm, p, k_sample)) != MS_OK) return s;
    if ((s = get_int32(sm, p, "num_inference_steps", 0, 1, 1000, &d->val_steps)) != MS_OK) return s;
    return get_num(sm, p, "guidance_scale", 0, &d->val_guidance);
}

void train_config_defaults_data(TrainDataConfig *d) {
    memset(d, 0, sizeof *d);
    d->batch_size = 1; d->enlarge_ratio = 1;
    d->val_samples_per_prompt = 1; d->val_batch_size = 1;
    d->val_latent_size[0] = 4; d->val_latent_size[1] = 64; d->val_latent_size[2] = 64;
    d->val_during_save = 1;                                /* the shipped files' values */
    d->n_alpha = 3; d->alpha_list[0] = 0.0; d->alpha_list[1] = 0.7; d->alpha_list[2] = 1.0;
    d->val_steps = 50; d->val_guidance = 7.5;              /* test_edlora.py .get defaults */
    d->print_freq = 10; d->save_checkpoint_freq = 10000;
    strcpy(d->mixed_precision, "no");
}

MsStatus train_config_from_yaml(const JsonValue *root, TrainDataConfig *d, MsTrainConfig *m) {
    static const char *const known[] = { "name", "manual_seed", "mixed_precision", "gradient_accumulation_steps", "datasets", "models",
                                         "path", "train", "val", "logger", NULL };
    static const char *const k_data[] = { "train", "val_vis", NULL };
    static const char *const k_path[] = { "pretrain_network", NULL };
    static const char *const k_logger[] = { "print_freq", "save_checkpoint_freq", NULL };
    const JsonValue *v, *ds;
    char p[PATHN];
    int64_t x = 0;
    MsStatus s;
    train_config_defaults_data(d);
    ms_train_config_defaults(m);
    if (!root) return ms_errorf(MS_ERR_ARG, "train config: no tree");
    if ((s = check_keys(root, "", known)) != MS_OK) return s;
    if ((s = get_str(root, "", "name", 1, 0, d->name, sizeof d->name, &v)) != MS_OK) return s;
    if (!d->name[0] || strchr(d->name, '/') || strchr(d->name, '\\') || !strcmp(d->name, ".") || !strcmp(d->name, ".."))
        return cerr(MS_ERR_ARG, v, "name", "'%s' must be a plain folder name (experiments/<name>/)", d->name);
    if ((v = json_get(root, "manual_seed")) != NULL && v->type != JSON_NULL) {   /* numpy seeds are 0..2^32-1 */
        if ((s = as_int_range(v, "manual_seed", 0, 4294967295LL, &x)) != MS_OK) return s;
        m->seed = (uint64_t)x;
    }
    if ((s = get_str(root, "", "mixed_precision", 0, 1, d->mixed_precision, sizeof d->mixed_precision, &v)) != MS_OK) return s;
    if (strcmp(d->mixed_precision, "no") && strcmp(d->mixed_precision, "fp16") && strcmp(d->mixed_precision, "bf16") && strcmp(d->mixed_precision, "fp8"))
        return cerr(MS_ERR_ARG, v, "mixed_precision", "expected no, fp16, bf16 or fp8, found '%s'", d->mixed_precision);
    x = 1;
    if ((s = get_int(root, "", "gradient_accumulation_steps", 0, 1, 1 << 20, &x)) != MS_OK) return s;
    if (x != 1) return cerr(MS_ERR_UNSUPPORTED, json_get(root, "gradient_accumulation_steps"), "gradient_accumulation_steps",
                            "%lld: gradient accumulation is not supported (only 1)", (long long)x);
    if ((s = member(root, "", "datasets", 1, &ds, p, sizeof p)) != MS_OK) return s;
    if ((s = check_keys(ds, "datasets", k_data)) != MS_OK) return s;
    if ((s = member(ds, "datasets", "train", 1, &v, p, sizeof p)) != MS_OK) return s;
    if ((s = read_train_set(v, p, d)) != MS_OK) return s;
    if ((v = json_get(ds, "val_vis")) != NULL && (s = read_val_set(v, "datasets.val_vis", d)) != MS_OK) return s;
    if ((s = member(root, "", "models", 1, &v, p, sizeof p)) != MS_OK) return s;
    if ((s = read_models(v, d, m)) != MS_OK) return s;
    if ((v = json_get(root, "path")) != NULL) {
        const JsonValue *pn;
        if ((s = check_keys(v, "path", k_path)) != MS_OK) return s;
        if ((pn = json_get(v, "pretrain_network")) != NULL && pn->type != JSON_NULL)
            return cerr(MS_ERR_UNSUPPORTED, pn, "path.pretrain_network", "resuming from a pretrained network is not supported (use ~)");
    }
    if ((s = member(root, "", "train", 1, &v, p, sizeof p)) != MS_OK) return s;
    if ((s = read_train(v, m)) != MS_OK) return s;
    if ((v = json_get(root, "val")) != NULL && (s = read_val(v, d)) != MS_OK) return s;
    if ((v = json_get(root, "logger")) != NULL) {
        if ((s = check_keys(v, "logger", k_logger)) != MS_OK) return s;
        if ((s = get_int32(v, "logger", "print_freq", 0, 1, 1 << 30, &d->print_freq)) != MS_OK) return s;
        if ((s = get_int(v, "logger", "save_checkpoint_freq", 0, 1, (int64_t)1 << 53, &d->save_checkpoint_freq)) != MS_OK) return s;
    }
    return MS_OK;
}

MsStatus train_config_load(const char *path, const char *const *sets, int n_sets, TrainDataConfig *d, MsTrainConfig *m) {
    JsonValue *root = NULL;
    MsStatus s = yaml_parse_file(path, &root);
    for (int i = 0; s == MS_OK && i < n_sets; i++) s = yaml_apply_set(root, sets[i]);
    if (s == MS_OK) s = train_config_from_yaml(root, d, m);
    json_free(root);
    return s;
}
