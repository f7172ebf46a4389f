/* tools/cmd_train.c — `mixshow train`: ED-LoRA training, the single-client stage of Mix-of-Show,
 * as the official train_edlora.py runs it (the step itself is ms_trainer_step in mixshow.c; this
 * file reads the options, the data and the replay dump, shows progress, writes checkpoints,
 * traces and the ED-LoRA file).
 *
 * --replay DUMP.safetensors / --trace OUT.safetensors: the fixed verification interface of
 * issue 10 (keys in train_usage below), driven by tools/ref/gen_train_golden.py's dumps. */
#include "tools/tools.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static void train_usage(FILE *f) {
    fprintf(f,
        "usage: mixshow train --config X.yml [options]\n"
        "Trains one concept as ED-LoRA (layer-wise token embeddings + rank-4 LoRA on every attention\n"
        "Linear of text encoder and UNet), exactly as Mix-of-Show's train_edlora.py does with the same\n"
        "options file (float32 everywhere; mixed_precision is read and ignored).\n\n"
        "options:\n"
        "  --config X.yml        official training options (options/train/EDLoRA/...)\n"
        "  --model PATH          base model (diffusers folder or single file); overrides\n"
        "                        models.pretrained_path\n"
        "  --set key.sub=VALUE   override any option (VALUE in YAML flow syntax); repeatable\n"
        "  --out DIR             output folder (default experiments/<name>/)\n"
        "  --seed S              manual_seed (default: the config's)\n"
        "  --steps N             stop after N steps (default: the config's length)\n"
        "  --checkpoint-every N  write DIR/checkpoint.safetensors every N steps (default 100)\n"
        "  --resume FILE         continue from a checkpoint, bit-identically\n"
        "  --threads N           worker threads (results do not depend on it)\n"
        "  --replay DUMP         take every random draw, the data and the initial parameters from\n"
        "                        DUMP (keys step1.param_in.<name>, step{k}.images [B,3,H,W],\n"
        "                        step{k}.masks / step{k}.img_masks [B,1,H/8,W/8] F64,\n"
        "                        step{k}.input_ids [B*16,77] I64, step{k}.vae_eps, step{k}.noise_randn\n"
        "                        [B,4,h,w], step{k}.noise_offset_randn [B,4,1,1], step{k}.timesteps [B]\n"
        "                        I64); runs as many steps as DUMP has. The options come from --config,\n"
        "                        else from DUMP's metadata \"config\".\n"
        "  --trace OUT           write step{k}.loss, .loss_mse, .loss_attn (F64 [1]), step{k}.lr [3],\n"
        "                        step{k}.norm_mean (F64 [1]), step{k}.stop_emb_update (I64 [1]),\n"
        "                        step{k}.model_pred, step1.grad.<name>, final.<name>\n"
        "  --quiet               no progress bar\n"
        "Parameter names: token_embedding.concept [T,D]; text_encoder.<module>.lora_down.weight /\n"
        ".lora_up.weight; unet.<module>.lora_down.weight / .lora_up.weight (official .pth keys).\n");
}

/* ---- reading the dump ---- */
static uint64_t le_u64(const unsigned char *p) {
    uint64_t v = 0;
    for (int i = 7; i >= 0; i--) v = v << 8 | p[i];
    return v;
}

/* A tensor of the dump with dtype and numel checked. */
static MsStatus dump_tensor(const StFile *f, const char *name, StDtype dt, size_t n, const StTensor **out) {
    const StTensor *t = st_find(f, name);
    if (!t) return ms_errorf(MS_ERR_FORMAT, "%s: no tensor '%s'", f->origin, name);
    if (t->dtype != dt)
        return ms_errorf(MS_ERR_FORMAT, "%s: '%s' is %s, expected %s", f->origin, name, st_dtype_name(t->dtype), st_dtype_name(dt));
    if (t->numel != n)
        return ms_errorf(MS_ERR_FORMAT, "%s: '%s' has %zu values, expected %zu", f->origin, name, t->numel, n);
    *out = t;
    return MS_OK;
}
static MsStatus dump_f64(const StFile *f, const char *name, double *out, size_t n) {
    const StTensor *t;
    MsStatus s = dump_tensor(f, name, ST_F64, n, &t);
    if (s) return s;
    for (size_t i = 0; i < n; i++) { uint64_t u = le_u64(t->data + 8 * i); memcpy(&out[i], &u, 8); }
    return MS_OK;
}
static MsStatus dump_i64(const StFile *f, const char *name, int64_t *out, size_t n) {
    const StTensor *t;
    MsStatus s = dump_tensor(f, name, ST_I64, n, &t);
    if (s) return s;
    for (size_t i = 0; i < n; i++) out[i] = (int64_t)le_u64(t->data + 8 * i);
    return MS_OK;
}
static MsStatus dump_f32(const StFile *f, const char *name, float *out, size_t n) {
    return st_read_f32(f, name, out, n, -1, NULL);
}

/* ---- the trace: entries with owned data ---- */
typedef struct {
    StEntry *e;
    void **own;
    char **names;
    size_t n, cap;
} Trace;

static MsStatus trace_add(Trace *tr, const char *name, StDtype dt, int ndim, const int64_t *shape, const void *data,
                          size_t bytes) {
    if (tr->n == tr->cap) {
        size_t cap = tr->cap ? 2 * tr->cap : 64;
        StEntry *e = (StEntry *)realloc(tr->e, cap * sizeof *e);
        if (!e) return ms_errorf(MS_ERR_NOMEM, "trace: out of memory");
        tr->e = e;
        void **o = (void **)realloc(tr->own, cap * sizeof *o);
        if (!o) return ms_errorf(MS_ERR_NOMEM, "trace: out of memory");
        tr->own = o;
        char **nm = (char **)realloc(tr->names, cap * sizeof *nm);
        if (!nm) return ms_errorf(MS_ERR_NOMEM, "trace: out of memory");
        tr->names = nm;
        tr->cap = cap;
    }
    void *copy = malloc(bytes ? bytes : 1);
    char *nm = (char *)malloc(strlen(name) + 1);
    if (!copy || !nm) { free(copy); free(nm); return ms_errorf(MS_ERR_NOMEM, "trace: out of memory"); }
    memcpy(copy, data, bytes);
    strcpy(nm, name);
    StEntry *e = &tr->e[tr->n];
    memset(e, 0, sizeof *e);
    e->name = nm; e->dtype = dt; e->ndim = ndim;
    for (int i = 0; i < ndim; i++) e->shape[i] = shape[i];
    if (dt == ST_F32) e->f32 = (const float *)copy; else e->raw = copy;
    tr->own[tr->n] = copy;
    tr->names[tr->n] = nm;
    tr->n++;
    return MS_OK;
}
static MsStatus trace_f64(Trace *tr, const char *name, const double *v, int64_t n) {
    return trace_add(tr, name, ST_F64, 1, &n, v, (size_t)n * sizeof(double));
}
static MsStatus trace_params(Trace *tr, const MsTrainer *t, const char *prefix, int grads) {
    for (int i = 0; i < ms_trainer_n_params(t); i++) {
        const char *nm;
        float *d, *g;
        int64_t sh[2];
        char key[512];
        ms_trainer_param(t, i, &nm, &d, &g, sh);
        snprintf(key, sizeof key, "%s%s", prefix, nm);
        MsStatus s = trace_add(tr, key, ST_F32, 2, sh, grads ? g : d, (size_t)sh[0] * sh[1] * sizeof(float));
        if (s) return s;
    }
    return MS_OK;
}
static void trace_free(Trace *tr) {
    for (size_t i = 0; i < tr->n; i++) { free(tr->own[i]); free(tr->names[i]); }
    free(tr->e); free(tr->own); free(tr->names);
    memset(tr, 0, sizeof *tr);
}

/* ---- options ---- */
typedef struct {
    const char *config, *model, *out, *replay, *trace, *resume;
    const char *sets[64];
    int n_sets;
    int has_seed, quiet, threads;
    uint64_t seed;
    int64_t max_steps, checkpoint_every;
} TrainArgs;

/* The replay run: data, draws and initial parameters from the dump. */
static MsStatus train_replay(const TrainArgs *a, MsTrainConfig *mc, MsModel *m, ClipTokenizer *tok) {
    StFile f;
    MsStatus s = st_open(&f, a->replay);
    MsTrainer *t = NULL;
    Trace tr;
    float *images = NULL, *eps = NULL, *noise = NULL, *off = NULL;
    double *masks = NULL, *img_masks = NULL;
    int64_t *ids64 = NULL, ts[64];
    int32_t *ids = NULL;
    memset(&tr, 0, sizeof tr);
    if (s) return s;
    const StTensor *im = st_find(&f, "step1.images");
    if (!im || im->ndim != 4 || im->shape[1] != 3) {
        s = ms_errorf(MS_ERR_FORMAT, "%s: no step1.images of shape [B,3,H,W]", a->replay);
        goto done;
    }
    const int B = (int)im->shape[0], H = (int)im->shape[2], W = (int)im->shape[3];
    int S = 0;
    for (;;) {
        char key[64];
        snprintf(key, sizeof key, "step%d.images", S + 1);
        if (!st_find(&f, key)) break;
        S++;
    }
    if (B < 1 || B > 64) { s = ms_errorf(MS_ERR_FORMAT, "%s: batch %d (expected 1..64)", a->replay, B); goto done; }
    if (mc->total_iter <= 0) mc->total_iter = S;
    if ((s = ms_trainer_create(&t, m, tok, mc, B, H, W, NULL))) goto done;
    /* initial parameters */
    for (int i = 0; i < ms_trainer_n_params(t); i++) {
        const char *nm;
        float *d;
        int64_t sh[2];
        char key[512];
        ms_trainer_param(t, i, &nm, &d, NULL, sh);
        snprintf(key, sizeof key, "step1.param_in.%s", nm);
        if ((s = st_read_f32(&f, key, d, (size_t)sh[0] * sh[1], 2, sh))) goto done;
    }
    {
        const int L = ms_trainer_tokens(t, NULL), f8 = 1 << (m->vae_config.n_blocks - 1);
        const int h = H / f8, w = W / f8, C = m->unet_config.in_channels;
        const size_t ni = (size_t)B * 3 * H * W, nm = (size_t)B * h * w, nl = (size_t)B * C * h * w;
        images = (float *)malloc(ni * sizeof(float));
        eps = (float *)malloc(nl * sizeof(float));
        noise = (float *)malloc(nl * sizeof(float));
        off = (float *)malloc((size_t)B * C * sizeof(float));
        masks = (double *)malloc(nm * sizeof(double));
        img_masks = (double *)malloc(nm * sizeof(double));
        ids64 = (int64_t *)malloc((size_t)B * L * 77 * sizeof(int64_t));
        ids = (int32_t *)malloc((size_t)B * L * 77 * sizeof(int32_t));
        if (!images || !eps || !noise || !off || !masks || !img_masks || !ids64 || !ids) {
            s = ms_errorf(MS_ERR_NOMEM, "train: out of memory"); goto done;
        }
        for (int k = 1; k <= S; k++) {
            char key[96];
            MsTrainBatch bt;
            MsStepDraws dr;
            MsStepReport rep;
            const char *prompts[64];
            memset(&bt, 0, sizeof bt); memset(&dr, 0, sizeof dr);
            for (int b = 0; b < B; b++) prompts[b] = "";
#define KEY(x) (snprintf(key, sizeof key, "step%d." x, k), key)
            if ((s = dump_f32(&f, KEY("images"), images, ni))) goto done;
            if ((s = dump_f64(&f, KEY("masks"), masks, nm))) goto done;
            if (st_find(&f, KEY("img_masks"))) { if ((s = dump_f64(&f, key, img_masks, nm))) goto done; }
            else memcpy(img_masks, masks, nm * sizeof(double));
            if ((s = dump_i64(&f, KEY("input_ids"), ids64, (size_t)B * L * 77))) goto done;
            for (size_t i = 0; i < (size_t)B * L * 77; i++) {
                if (ids64[i] < 0 || ids64[i] > INT32_MAX) { s = ms_errorf(MS_ERR_FORMAT, "%s: %s holds id %lld", a->replay, key, (long long)ids64[i]); goto done; }
                ids[i] = (int32_t)ids64[i];
            }
            if ((s = dump_f32(&f, KEY("vae_eps"), eps, nl))) goto done;
            if ((s = dump_f32(&f, KEY("noise_randn"), noise, nl))) goto done;
            if (mc->has_noise_offset && (s = dump_f32(&f, KEY("noise_offset_randn"), off, (size_t)B * C))) goto done;
            if ((s = dump_i64(&f, KEY("timesteps"), ts, (size_t)B))) goto done;
#undef KEY
            bt.B = B; bt.H = H; bt.W = W; bt.images = images; bt.masks = masks; bt.img_masks = img_masks;
            bt.prompts = prompts;
            dr.input_ids = ids; dr.vae_eps = eps; dr.noise_randn = noise; dr.noise_offset_randn = off; dr.timesteps = ts;
            if ((s = ms_trainer_step(t, &bt, &dr, NULL, &rep))) goto done;
            if (!a->quiet)
                fprintf(stderr, "step %d/%d: loss %.8g (mse %.8g, attn %.8g), lr %.3g %.3g %.3g\n", k, S, rep.loss,
                        rep.loss_mse, rep.loss_attn, rep.lr[0], rep.lr[1], rep.lr[2]);
            if (a->trace) {
                int64_t sh[4] = { B, m->unet_config.out_channels, h, w };
                snprintf(key, sizeof key, "step%d.loss", k);
                if ((s = trace_f64(&tr, key, &rep.loss, 1))) goto done;
                snprintf(key, sizeof key, "step%d.loss_mse", k);
                if ((s = trace_f64(&tr, key, &rep.loss_mse, 1))) goto done;
                snprintf(key, sizeof key, "step%d.loss_attn", k);
                if ((s = trace_f64(&tr, key, &rep.loss_attn, 1))) goto done;
                snprintf(key, sizeof key, "step%d.lr", k);
                if ((s = trace_f64(&tr, key, rep.lr, 3))) goto done;
                snprintf(key, sizeof key, "step%d.norm_mean", k);
                if ((s = trace_f64(&tr, key, &rep.emb_norm_mean, 1))) goto done;
                {
                    int64_t one = 1, fz = rep.emb_frozen;
                    snprintf(key, sizeof key, "step%d.stop_emb_update", k);
                    if ((s = trace_add(&tr, key, ST_I64, 1, &one, &fz, sizeof fz))) goto done;
                }
                snprintf(key, sizeof key, "step%d.model_pred", k);
                if ((s = trace_add(&tr, key, ST_F32, 4, sh, rep.model_pred, (size_t)B * sh[1] * h * w * sizeof(float)))) goto done;
                if (k == 1 && (s = trace_params(&tr, t, "step1.grad.", 1))) goto done;
            }
        }
    }
    if (a->trace) {
        const char *meta[4] = { "format", "mixshow train --trace", "steps", NULL };
        char nsteps[32];
        snprintf(nsteps, sizeof nsteps, "%d", S);
        meta[3] = nsteps;
        if ((s = trace_params(&tr, t, "final.", 0))) goto done;
        if ((s = st_write(a->trace, tr.e, tr.n, meta, 2))) goto done;
    }
done:
    trace_free(&tr);
    free(images); free(eps); free(noise); free(off); free(masks); free(img_masks); free(ids64); free(ids);
    ms_trainer_free(t);
    st_close(&f);
    return s;
}

int cmd_train(int argc, char **argv) {
    TrainArgs a;
    TrainDataConfig dc;
    MsTrainConfig mc;
    MsModel m;
    ClipTokenizer tok;
    MsStatus s;
    int have_model = 0, have_tok = 0;
    memset(&a, 0, sizeof a);
    a.checkpoint_every = 100;
    a.threads = -1;
    for (int i = 1; i < argc; i++) {
        const char *o = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        char *end = NULL;
        if (!strcmp(o, "--help") || !strcmp(o, "-h")) { train_usage(stdout); return 0; }
        if (!strcmp(o, "--quiet")) { a.quiet = 1; continue; }
        if (!v) { fprintf(stderr, "mixshow train: %s needs a value (or is unknown; see --help)\n", o); return 2; }
        i++;
        if (!strcmp(o, "--config")) a.config = v;
        else if (!strcmp(o, "--model")) a.model = v;
        else if (!strcmp(o, "--out")) a.out = v;
        else if (!strcmp(o, "--replay")) a.replay = v;
        else if (!strcmp(o, "--trace")) a.trace = v;
        else if (!strcmp(o, "--resume")) a.resume = v;
        else if (!strcmp(o, "--set")) {
            if (a.n_sets == 64) { fprintf(stderr, "mixshow train: more than 64 --set\n"); return 2; }
            a.sets[a.n_sets++] = v;
        }
        else if (!strcmp(o, "--seed")) { a.seed = strtoull(v, &end, 10); a.has_seed = 1; }
        else if (!strcmp(o, "--steps")) a.max_steps = strtoll(v, &end, 10);
        else if (!strcmp(o, "--checkpoint-every")) a.checkpoint_every = strtoll(v, &end, 10);
        else if (!strcmp(o, "--threads")) a.threads = (int)strtol(v, &end, 10);
        else { fprintf(stderr, "mixshow train: unknown option '%s'\n\n", o); train_usage(stderr); return 2; }
        if (end && (*end || end == v)) { fprintf(stderr, "mixshow train: %s %s: not a number\n", o, v); return 2; }
    }
    if (a.threads > 0) ms_set_threads(a.threads);
    memset(&m, 0, sizeof m);
    memset(&tok, 0, sizeof tok);

    /* options: the .yml, else (replay) the dump's metadata "config" */
    if (a.config) {
        if ((s = train_config_load(a.config, a.sets, a.n_sets, &dc, &mc))) goto fail;
    } else if (a.replay) {
        StFile f;
        JsonValue *root = NULL;
        const char *cfg;
        if ((s = st_open(&f, a.replay))) goto fail;
        cfg = st_meta(&f, "config");
        if (!cfg) { st_close(&f); s = ms_errorf(MS_ERR_ARG, "%s: no --config and no metadata \"config\"", a.replay); goto fail; }
        s = json_parse(cfg, strlen(cfg), a.replay, &root);
        /* a dump carries the options that shape the step (models:, train:); the data came with
         * it, so the dataset part is a placeholder here */
        if (!s && !json_get(root, "name")) s = yaml_apply_set(root, "name=replay");
        if (!s && !json_get(root, "datasets"))
            s = yaml_apply_set(root, "datasets.train={name: LoraDataset, concept_list: (replay), "
                                     "instance_transform: [], batch_size_per_gpu: 1, dataset_enlarge_ratio: 1}");
        for (int i = 0; !s && i < a.n_sets; i++) s = yaml_apply_set(root, a.sets[i]);
        if (!s) s = train_config_from_yaml(root, &dc, &mc);
        if (!s && st_meta(&f, "total_iter")) mc.total_iter = strtod(st_meta(&f, "total_iter"), NULL);
        json_free(root);
        st_close(&f);
        if (s) goto fail;
    } else {
        fprintf(stderr, "mixshow train: --config X.yml is required (see --help)\n");
        return 2;
    }
    if (a.has_seed) mc.seed = a.seed;
    {
        const char *path = a.model ? a.model : dc.pretrained_path;
        if (!path[0]) { s = ms_errorf(MS_ERR_ARG, "train: no model (--model or models.pretrained_path)"); goto fail; }
        if ((s = ms_model_load(path, NULL, &m))) goto fail;
        have_model = 1;
        if ((s = ms_clip_tokenizer_load(path, &tok))) goto fail;
        have_tok = 1;
    }
    if (a.replay) s = train_replay(&a, &mc, &m, &tok);
    else s = ms_errorf(MS_ERR_UNSUPPORTED, "train: only --replay runs are wired so far");
    if (s) goto fail;
    if (have_tok) clip_tokenizer_free(&tok);
    ms_model_free(&m);
    return 0;
fail:
    fprintf(stderr, "mixshow train: %s\n", ms_last_error());
    if (have_tok) clip_tokenizer_free(&tok);
    if (have_model) ms_model_free(&m);
    return 1;
}
