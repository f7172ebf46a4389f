/* tools/eval_world.c — what the alignment stand-ins (models/evalnet.c) learn from and are
 * judged on, and their files (issue 15):
 *   - training batches drawn from the procedural world (tools/world.c), a function of (seed,
 *     step) only, so a resumed run sees the same batches: captioned scenes (base scenes and, every
 *     char_every-th, a creature captioned "a creature, waving, ... on grass") and renders of
 *     creatures with identity labels (per_id renders of each of Bi / per_id identities);
 *   - held-out measurements on data no training batch holds: base scenes of indices >= 2^30,
 *     renders 500..999 of training creatures (training uses 0..499) and creatures of another seed
 *     stream (never trained on);
 *   - the encoders file (safetensors: "image.*", "text_projection.weight", "logit_scale",
 *     "text_encoder.<CLIP key>", F32 or F16; metadata "format", "config" as JSON) and the training
 *     checkpoint (the same in F32 + AdamW moments and the step). */
#include "tools/tools.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define HELD_SCENE0 (1 << 30)          /* held-out base scenes: indices from here */
#define TRAIN_RENDERS 500              /* training renders of a creature: images 0..499 */

/* Identity id of the training pool (unseen = 0) or of the held-out stream (unseen = 1): 16
 * creatures per world seed, each seed derived from (seed, stream, id / 16). */
static void ev_identity(uint64_t seed, int unseen, int id, uint64_t *cseed, int *index, WorldCharacter *ch) {
    *cseed = world_mix64(seed ^ world_mix64(0xC4A2ull + (uint64_t)unseen * 0x1000193ull + ((uint64_t)(id / 16) << 20)));
    *index = id % 16;
    world_character_make(*cseed, *index, ch);
}

void eval_image_from_rgb(float *out, const uint8_t *rgb, int S) {
    const size_t P = (size_t)S * S;
    for (size_t i = 0; i < P; i++)
        for (int ch = 0; ch < 3; ch++) out[ch * P + i] = (float)rgb[3 * i + ch] / 255.0f * 2.0f - 1.0f;
}

MsStatus eval_image_load(const char *path, int S, float *out) {
    MsImage im;
    MsStatus s = ms_image_read(path, 3, &im);
    if (s) return s;
    uint8_t *rgb = (uint8_t *)malloc((size_t)S * S * 3);
    if (!rgb) { ms_image_free(&im); return ms_errorf(MS_ERR_NOMEM, "%s: out of memory", path); }
    s = pil_resize(rgb, S, S, (const uint8_t *)im.data, im.w, im.h, 3, PIL_BILINEAR);
    if (!s) eval_image_from_rgb(out, rgb, S);
    free(rgb);
    ms_image_free(&im);
    return s;
}

/* One creature render (image `img`) into out (3,S,S); its caption with "a creature" into cap. */
static MsStatus ev_creature(uint64_t seed, int unseen, int id, int img, int S, uint8_t *rgb, float *out, char *cap) {
    WorldCharacter ch;
    WorldScene sc;
    uint64_t cs;
    int index;
    MsStatus s;
    ev_identity(seed, unseen, id, &cs, &index, &ch);
    world_character_scene(cs, &ch, index, img, &sc);
    if ((s = world_render(&sc, S, rgb, NULL, NULL, NULL))) return s;
    eval_image_from_rgb(out, rgb, S);
    return cap ? world_character_caption(cs, index, img, &sc, "a creature", cap, EVAL_CAPTION) : MS_OK;
}

static MsStatus ev_scene(uint64_t seed, int index, int S, uint8_t *rgb, float *out, char *cap) {
    WorldScene sc;
    MsStatus s;
    world_scene_make(seed, index, &sc);
    if ((s = world_caption(seed, index, &sc, cap, EVAL_CAPTION)) || (s = world_render(&sc, S, rgb, NULL, NULL, NULL))) return s;
    eval_image_from_rgb(out, rgb, S);
    return MS_OK;
}

MsStatus eval_world_batch(const EvalData *d, int S, int64_t step, float *images, char (*captions)[EVAL_CAPTION],
                          int *labels) {
    const size_t px = (size_t)3 * S * S;
    uint8_t *rgb = (uint8_t *)malloc((size_t)S * S * 3);
    MsRng r;
    MsStatus s = MS_OK;
    if (!rgb) return ms_errorf(MS_ERR_NOMEM, "eval data: out of memory");
    if (d->per_id < 2 || d->Bi % d->per_id || d->identities < 1) {
        free(rgb);
        return ms_errorf(MS_ERR_ARG, "eval data: %d identity images in groups of %d (>= 2) from %d identities", d->Bi,
                         d->per_id, d->identities);
    }
    ms_rng_seed(&r, world_mix64(d->seed ^ world_mix64((uint64_t)step)));
    for (int b = 0; b < d->Bt && !s; b++) {
        float *out = images + (size_t)b * px;
        if (d->char_every > 0 && b % d->char_every == d->char_every - 1) {
            const int id = (int)(ms_rng_u64(&r) % (uint64_t)d->identities), img = (int)(ms_rng_u64(&r) % TRAIN_RENDERS);
            s = ev_creature(d->seed, 0, id, img, S, rgb, out, captions[b]);
        } else
            s = ev_scene(d->seed, (int)(ms_rng_u64(&r) % (uint64_t)(d->scenes > 0 && d->scenes < HELD_SCENE0 ? d->scenes : HELD_SCENE0)),
                         S, rgb, out, captions[b]);
    }
    for (int g = 0; g < d->Bi / d->per_id && !s; g++) {
        int id;
        for (;;) {                                 /* distinct identities within the batch */
            int dup = 0;
            id = (int)(ms_rng_u64(&r) % (uint64_t)d->identities);
            for (int q = 0; q < g; q++) dup |= labels[q * d->per_id] == id;
            if (!dup || d->identities < d->Bi / d->per_id) break;
        }
        for (int k = 0; k < d->per_id && !s; k++) {
            const int b = g * d->per_id + k, img = (int)(ms_rng_u64(&r) % TRAIN_RENDERS);
            labels[b] = id;
            s = ev_creature(d->seed, 0, id, img, S, rgb, images + (size_t)(d->Bt + b) * px, NULL);
        }
    }
    free(rgb);
    return s;
}

/* ---- held-out measurements ---- */
static double cosf_(const float *a, const float *b, int E) {     /* rows are unit length */
    double s = 0.0;
    for (int i = 0; i < E; i++) s += (double)a[i] * b[i];
    return s;
}

/* K creatures (seen: the first K of the training pool; unseen: the held-out stream), R reference
 * and Q query renders each from 500.. (never trained on). Identification: a query's nearest
 * creature by mean cosine to its references. Verification: the (query, creature) pairs, same vs
 * different, at threshold thr (thr NaN: the best threshold for these pairs is chosen and stored). */
static MsStatus ev_identity_test(const EvalNet *e, uint64_t seed, int unseen, int K, int R, int Q, double *top1,
                                 double *verif, double *thr) {
    const int S = e->cfg.size, Ei = e->cfg.id_dim, n = K * (R + Q);
    const size_t px = (size_t)3 * S * S;
    float *img = (float *)ms_alloc_aligned((size_t)n * px, sizeof(float)), *z = (float *)malloc((size_t)n * Ei * sizeof(float));
    double *sim = (double *)malloc((size_t)K * Q * K * sizeof(double));
    uint8_t *rgb = (uint8_t *)malloc((size_t)S * S * 3);
    MsStatus s = MS_OK;
    if (!img || !z || !sim || !rgb) { s = ms_errorf(MS_ERR_NOMEM, "eval held-out: out of memory"); goto done; }
    for (int c = 0; c < K && !s; c++)
        for (int k = 0; k < R + Q && !s; k++)
            s = ev_creature(seed, unseen, c, TRAIN_RENDERS + k, S, rgb, img + (size_t)(c * (R + Q) + k) * px, NULL);
    if (s || (s = evalnet_embed_images(e, img, n, NULL, z))) goto done;
    {
        int hits = 0;
        for (int c = 0; c < K; c++)
            for (int q = 0; q < Q; q++) {
                const float *zq = z + (size_t)(c * (R + Q) + R + q) * Ei;
                int best = 0;
                for (int c2 = 0; c2 < K; c2++) {
                    double m = 0.0;
                    for (int r = 0; r < R; r++) m += cosf_(zq, z + (size_t)(c2 * (R + Q) + r) * Ei, Ei) / R;
                    sim[((size_t)c * Q + q) * K + c2] = m;
                    if (m > sim[((size_t)c * Q + q) * K + best]) best = c2;
                }
                hits += best == c;
            }
        *top1 = (double)hits / (K * Q);
    }
    {   /* balanced verification accuracy: (TPR + TNR) / 2 at a threshold */
        double best_acc = -1.0, best_t = 0.0;
        const size_t np = (size_t)K * Q * K;
        for (size_t t = 0; t <= np; t++) {
            const double th = isnan(*thr) ? (t < np ? sim[t] : 2.0) : *thr;
            double tp = 0, tn = 0;
            for (size_t i = 0; i < np; i++) {
                const int same = (int)(i % K) == (int)(i / ((size_t)Q * K)), yes = sim[i] >= th;
                tp += same && yes;
                tn += !same && !yes;
            }
            const double acc = 0.5 * (tp / (K * Q) + tn / ((double)K * Q * (K - 1)));
            if (acc > best_acc) { best_acc = acc; best_t = th; }
            if (!isnan(*thr)) break;
        }
        *verif = best_acc;
        if (isnan(*thr)) *thr = best_t;
    }
done:
    ms_free_aligned(img); free(z); free(sim); free(rgb);
    return s;
}

MsStatus eval_heldout(const EvalNet *e, const ClipTokenizer *tok, uint64_t seed, int n_scenes, int n_chars, EvalHeldout *h) {
    const int S = e->cfg.size, E = e->cfg.embed_dim, n = n_scenes;
    const size_t px = (size_t)3 * S * S;
    float *img = (float *)ms_alloc_aligned((size_t)n * px, sizeof(float)), *u = (float *)malloc((size_t)n * E * sizeof(float));
    float *v = (float *)malloc((size_t)n * E * sizeof(float));
    char (*caps)[EVAL_CAPTION] = (char (*)[EVAL_CAPTION])malloc((size_t)n * EVAL_CAPTION);
    const char **cp = (const char **)malloc((size_t)n * sizeof(char *));
    uint8_t *rgb = (uint8_t *)malloc((size_t)S * S * 3);
    MsStatus s = MS_OK;
    memset(h, 0, sizeof *h);
    if (n < 2 || n_chars < 2) { s = ms_errorf(MS_ERR_ARG, "eval held-out: %d scenes, %d creatures (>= 2 each)", n, n_chars); goto done; }
    if (!img || !u || !v || !caps || !cp || !rgb) { s = ms_errorf(MS_ERR_NOMEM, "eval held-out: out of memory"); goto done; }
    for (int i = 0; i < n && !s; i++) {
        s = ev_scene(seed, HELD_SCENE0 + i, S, rgb, img + (size_t)i * px, caps[i]);
        cp[i] = caps[i];
    }
    if (s || (s = evalnet_embed_images(e, img, n, u, NULL)) || (s = evalnet_embed_texts(e, tok, cp, n, v))) goto done;
    h->n_scenes = n;
    {
        int i2t = 0, t2i = 0;
        double cm = 0.0, cx = 0.0;
        for (int i = 0; i < n; i++) {
            int bi = 0, bt = 0;
            double si = -2.0, st = -2.0;
            for (int j = 0; j < n; j++) {
                const double a = cosf_(u + (size_t)i * E, v + (size_t)j * E, E), b = cosf_(u + (size_t)j * E, v + (size_t)i * E, E);
                if (a > si) { si = a; bi = j; }
                if (b > st) { st = b; bt = j; }
                if (i == j) cm += a; else cx += a;
            }
            i2t += !strcmp(caps[bi], caps[i]);        /* an identical caption counts as right */
            t2i += !strcmp(caps[bt], caps[i]);
        }
        h->i2t_top1 = (double)i2t / n;
        h->t2i_top1 = (double)t2i / n;
        h->cos_match = cm / n;
        h->cos_mismatch = cx / ((double)n * (n - 1));
    }
    h->n_chars = n_chars;
    h->threshold = NAN;
    if ((s = ev_identity_test(e, seed, 0, n_chars, 4, 4, &h->id_top1_seen, &h->verif_seen, &h->threshold)) ||
        (s = ev_identity_test(e, seed, 1, n_chars, 4, 4, &h->id_top1_unseen, &h->verif_unseen, &h->threshold)))
        goto done;
done:
    ms_free_aligned(img); free(u); free(v); free(caps); free(cp); free(rgb);
    return s;
}

/* ---- files ---- */
static const char *const EV_FORMAT = "mixshow eval encoders 1";

static MsStatus ev_config_json(const EvalNetConfig *c, char *buf, size_t cap) {
    const ClipTextConfig *t = &c->text;
    int n = snprintf(buf, cap, "{\"size\":%d,\"channels\":[", c->size);
    for (int i = 0; i < c->n_levels && n > 0 && (size_t)n < cap; i++)
        n += snprintf(buf + n, cap - (size_t)n, "%s%d", i ? "," : "", c->channels[i]);
    if (n > 0 && (size_t)n < cap)
        n += snprintf(buf + n, cap - (size_t)n, "],\"layers\":%d,\"groups\":%d,\"text_pool\":%d,\"embed_dim\":%d,\"id_dim\":%d,"
                      "\"text\":{\"vocab_size\":%d,\"hidden_size\":%d,\"intermediate_size\":%d,\"projection_dim\":%d,"
                      "\"num_hidden_layers\":%d,\"num_attention_heads\":%d,\"max_position_embeddings\":%d,\"hidden_act\":\"%s\","
                      "\"layer_norm_eps\":%.9g}}", c->layers, c->groups, c->text_pool, c->embed_dim, c->id_dim, t->vocab_size,
                      t->hidden_size, t->intermediate_size, t->projection_dim, t->num_hidden_layers, t->num_attention_heads,
                      t->max_position_embeddings, ms_activation_name(t->hidden_act), (double)t->layer_norm_eps);
    if (n < 0 || (size_t)n >= cap) return ms_errorf(MS_ERR_ARG, "eval encoders: config longer than %zu bytes", cap);
    return MS_OK;
}

static MsStatus ev_config_parse(const char *text, const char *origin, EvalNetConfig *c) {
    JsonValue *j = NULL;
    const JsonValue *ch, *tx;
    int64_t v;
    MsStatus s = json_parse(text, strlen(text), origin, &j);
    if (s) return s;
    evalnet_config_default(c);
    static const char *const keys[6] = { "size", "layers", "groups", "text_pool", "embed_dim", "id_dim" };
    int *dst[6] = { &c->size, &c->layers, &c->groups, &c->text_pool, &c->embed_dim, &c->id_dim };
    for (int k = 0; k < 6 && !s; k++) {
        if (!(s = json_need_int(j, keys[k], &v))) {
            if (v < 0 || v > 1 << 20) s = ms_errorf(MS_ERR_FORMAT, "%s: config '%s' %lld out of range", origin, keys[k], (long long)v);
            else *dst[k] = (int)v;
        }
    }
    if (!s && !(s = json_need(j, "channels", JSON_ARRAY, &ch))) {
        c->n_levels = (int)json_len(ch);
        if (c->n_levels < 1 || c->n_levels > MS_MAX_BLOCKS)
            s = ms_errorf(MS_ERR_FORMAT, "%s: config 'channels' has %d values (1..%d)", origin, c->n_levels, MS_MAX_BLOCKS);
        for (int i = 0; i < c->n_levels && !s; i++)
            if (!(s = json_as_int(json_at(ch, (size_t)i), "channels", &v))) c->channels[i] = v > 0 && v <= 4096 ? (int)v : -1;
    }
    if (!s && !(s = json_need(j, "text", JSON_OBJECT, &tx))) s = ms_clip_text_config_from_json(tx, &c->text);
    if (!s) s = evalnet_config_check(c);
    json_free(j);
    return s;
}

static MsStatus ev_save(const char *path, const EvalNet *e, EvalTrainer *t, StDtype dt, const char *const *meta, int n_meta) {
    const MsParamTable *tab[2] = { &e->net, &e->text };
    static const char *const pre[2] = { "", "text_encoder." };
    const int nt = e->net.n + e->text.n;
    StEntry *en = (StEntry *)calloc((size_t)nt + 3, sizeof *en);
    char (*names)[MS_KEY_MAX + 16] = (char (*)[MS_KEY_MAX + 16])malloc((size_t)nt * sizeof *names);
    const char **md = (const char **)malloc((size_t)(n_meta + 2) * 2 * sizeof(char *));
    char cfg[2048];
    size_t n = 0;
    int64_t step = 0;
    MsStatus s = en && names && md ? MS_OK : ms_errorf(MS_ERR_NOMEM, "%s: out of memory", path);
    if (!s) s = ev_config_json(&e->cfg, cfg, sizeof cfg);
    for (int j = 0; j < 2 && !s; j++)
        for (int i = 0; i < tab[j]->n; i++) {
            const MsParam *q = &tab[j]->p[i];
            if (q->flags & MS_PARAM_BUFFER) continue;
            snprintf(names[n], sizeof names[n], "%s%s", pre[j], q->name);
            en[n].name = names[n]; en[n].dtype = dt; en[n].ndim = q->ndim; en[n].f32 = q->f32;
            for (int d = 0; d < q->ndim; d++) en[n].shape[d] = q->shape[d];
            n++;
        }
    if (!s && t) {                   /* the training state */
        float *m, *v;
        size_t nm;
        evalnet_trainer_moments(t, &m, &v, &nm);
        step = evalnet_trainer_step_count(t);
        en[n].name = "adam.m"; en[n].dtype = ST_F32; en[n].ndim = 1; en[n].shape[0] = (int64_t)nm; en[n].f32 = m; n++;
        en[n].name = "adam.v"; en[n].dtype = ST_F32; en[n].ndim = 1; en[n].shape[0] = (int64_t)nm; en[n].f32 = v; n++;
        en[n].name = "step"; en[n].dtype = ST_I64; en[n].ndim = 1; en[n].shape[0] = 1; en[n].raw = &step; n++;
    }
    if (!s) {
        md[0] = "format"; md[1] = EV_FORMAT; md[2] = "config"; md[3] = cfg;
        for (int k = 0; k < 2 * n_meta; k++) md[4 + k] = meta[k];
        s = st_write(path, en, n, md, (size_t)n_meta + 2);
    }
    free(en); free(names); free(md);
    return s;
}

MsStatus evalnet_save(const char *path, const EvalNet *e, EvalTrainer *t, const char *const *meta, int n_meta) {
    return ev_save(path, e, t, ST_F32, meta, n_meta);
}

MsStatus evalnet_save_encoders(const char *path, const EvalNet *e, int half, const char *const *meta, int n_meta) {
    return ev_save(path, e, NULL, half ? ST_F16 : ST_F32, meta, n_meta);
}

MsStatus evalnet_load(const char *path, EvalNet *e, EvalTrainer *t, const char *recipe) {
    StFile f;
    char key[MS_KEY_MAX + 16];
    EvalNetConfig c;
    MsStatus s = st_open(&f, path);
    if (s) return s;
    const char *fmt = st_meta(&f, "format"), *cfg = st_meta(&f, "config"), *rec = st_meta(&f, "recipe");
    if (!fmt || strcmp(fmt, EV_FORMAT) || !cfg) {
        s = ms_errorf(MS_ERR_FORMAT, "%s: not a mixshow eval encoders file (metadata format '%s')", path, fmt ? fmt : "");
        goto done;
    }
    if (t) {                          /* resuming: e is the run's own, the file must match it */
        if (!rec || strcmp(rec, recipe)) {
            s = ms_errorf(MS_ERR_ARG, "%s: written with other options:\n  checkpoint: %s\n  this run:   %s", path,
                          rec ? rec : "(none)", recipe);
            goto done;
        }
    } else {
        if ((s = ev_config_parse(cfg, path, &c)) || (s = evalnet_create(e, &c))) goto done;
    }
    {
        MsParamTable *tab[2] = { &e->net, &e->text };
        static const char *const pre[2] = { "", "text_encoder." };
        for (int j = 0; j < 2 && !s; j++)
            for (int i = 0; i < tab[j]->n && !s; i++) {
                MsParam *q = &tab[j]->p[i];
                if (q->flags & MS_PARAM_BUFFER) continue;
                snprintf(key, sizeof key, "%s%s", pre[j], q->name);
                s = st_read_f32(&f, key, q->f32, q->numel, q->ndim, q->shape);
            }
    }
    if (!s && t) {
        float *m, *v;
        size_t nm;
        const StTensor *x = st_find(&f, "step");
        evalnet_trainer_moments(t, &m, &v, &nm);
        if ((s = st_read_f32(&f, "adam.m", m, nm, -1, NULL)) || (s = st_read_f32(&f, "adam.v", v, nm, -1, NULL))) goto done;
        if (!x || x->dtype != ST_I64 || x->numel != 1) { s = ms_errorf(MS_ERR_FORMAT, "%s: no I64 'step'", path); goto done; }
        uint64_t k = 0;
        for (int b = 7; b >= 0; b--) k = k << 8 | x->data[b];
        if (k > (uint64_t)1 << 40) { s = ms_errorf(MS_ERR_FORMAT, "%s: step %llu", path, (unsigned long long)k); goto done; }
        evalnet_trainer_set_step(t, (int64_t)k);
    }
done:
    if (s && !t) evalnet_free(e);
    st_close(&f);
    return s;
}
