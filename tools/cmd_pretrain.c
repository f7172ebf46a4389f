/* tools/cmd_pretrain.c — `mixshow pretrain` (issue 15): a small model of SD 1.x topology trained
 * from scratch on the procedural world (tools/world.c). This file builds the configs from flags
 * (or a diffusers folder's configs), makes the data (scenes drawn from a seed, their captions,
 * VAE latents cached once per scene), shows progress, writes loss.csv / loss.svg, atomic
 * checkpoints that --resume continues bit-identically, and at the end a diffusers folder that
 * `mixshow sample` loads. The step itself is ms_pretrain_step (mixshow.c, "pretraining").
 *
 * The VAE is frozen for now: a given diffusers VAE folder (--vae; default the embedded tiny
 * model's), latents = posterior mean * scaling_factor. When the VAE is trained too (helper W2's
 * vae_*_backward_full), it plugs in at pre_latent: its own pretraining writes the folder that
 * --vae reads, or the latents are encoded per step instead of cached. */
#if !defined(_WIN32) && !defined(_POSIX_C_SOURCE)
#define _POSIX_C_SOURCE 200809L         /* mkdir, isatty: in the guarded section below */
#endif
#include "tools/tools.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#if !defined(_WIN32)
#include <sys/stat.h>
#include <sys/types.h>
#include <unistd.h>
static int pre_mkdir(const char *p) { struct stat st; mkdir(p, 0777); return stat(p, &st) == 0 && S_ISDIR(st.st_mode); }
#else
#include <direct.h>
static int pre_mkdir(const char *p) { _mkdir(p); return 1; }
#endif

static void pretrain_usage(FILE *f) {
    fprintf(f,
        "usage: mixshow pretrain --out DIR [options]\n"
        "Trains every parameter of a small SD 1.x-topology UNet and CLIP text encoder (real BPE\n"
        "tokenizer, vocab 49408) from scratch on scenes of the procedural world (mixshow world),\n"
        "captions as the text: epsilon objective, DDPM noise of the scheduler config, uniform\n"
        "timesteps, 10%% of captions dropped to \"\" (for classifier-free guidance), AdamW with linear\n"
        "warmup. The VAE is given and frozen (latents = posterior mean * scaling_factor, cached).\n"
        "Writes DIR/loss.csv, DIR/loss.svg, DIR/checkpoint.safetensors (every --checkpoint-every\n"
        "steps; weights, AdamW moments, step, RNG state) and at the end DIR/model/, a diffusers\n"
        "folder (must not exist yet) for `mixshow sample --model DIR/model`.\n\n"
        "data:\n"
        "  --size S              image side, 64 or 128 (default 64)\n"
        "  --scenes N            distinct world scenes, indices 0..N-1 (default 4096)\n"
        "  --world-seed S        the world's seed (default 0)\n"
        "  --vae DIR             diffusers VAE folder (config.json + weights; default the embedded\n"
        "                        models/tiny-sd/vae)\n"
        "  --tokenizer DIR       CLIP vocab.json + merges.txt (default: the shipped files)\n"
        "model (defaults: UNet 32,64,64 channels, DownBlock2D + 2 CrossAttnDownBlock2D, 1 layer\n"
        "per block, heads 2,4,4, 8 groups; text encoder width 64, 2 layers, 2 heads):\n"
        "  --channels A,B,...    UNet block_out_channels (1..4 blocks; the first is a plain block)\n"
        "  --heads A,B,...       attention heads per block (as many as --channels)\n"
        "  --layers N            resnets per down block (default 1)\n"
        "  --groups G            GroupNorm groups (default 8)\n"
        "  --text-width D        text hidden size = cross_attention_dim (default 64)\n"
        "  --text-layers N, --text-heads H   (default 2, 2; intermediate 4 D)\n"
        "  --model-config DIR    take unet/config.json, text_encoder/config.json and\n"
        "                        scheduler/scheduler_config.json from a diffusers folder instead\n"
        "training:\n"
        "  --steps N             optimizer steps (default 1000)\n"
        "  --batch B             (default 8)\n"
        "  --lr X, --warmup N    peak lr (1e-3), linear warmup steps (100)\n"
        "  --weight-decay X      AdamW weight decay on every parameter (0.01)\n"
        "  --uncond P            caption dropout probability (0.1)\n"
        "  --seed S              weights, scene choice, dropout, timesteps, noise (default 0)\n"
        "  --checkpoint-every N  (default 100; 0: none)\n"
        "  --resume FILE         continue from a checkpoint, bit-identically (same options)\n"
        "  --threads N           worker threads (results do not depend on it)\n"
        "  --quiet               no progress\n");
}

#if !defined(_WIN32)
static int stderr_tty(void) { return isatty(2); }
#else
static int stderr_tty(void) { return 0; }
#endif

typedef struct {
    const char *out, *vae_dir, *tok_dir, *model_config, *resume;
    int64_t steps, ckpt_every;
    int batch, size, scenes, quiet, threads;
    uint64_t seed, world_seed;
    MsPretrainConfig pc;
    int n_ch, ch[MS_MAX_BLOCKS], n_heads, heads[MS_MAX_BLOCKS], layers, groups;
    int text_width, text_layers, text_heads;
} PreArgs;

/* "32,64,64" -> v (1..MS_MAX_BLOCKS positive ints) */
static int parse_list(const char *s, int *v, int *n) {
    *n = 0;
    while (*s) {
        char *end;
        long x = strtol(s, &end, 10);
        if (end == s || x < 1 || x > 100000 || *n == MS_MAX_BLOCKS) return 0;
        v[(*n)++] = (int)x;
        s = end;
        if (*s == ',') s++;
        else if (*s) return 0;
    }
    return *n > 0;
}

static MsStatus read_json_config(const char *dir, const char *file, JsonValue **j) {
    char p[2300];
    snprintf(p, sizeof p, "%s/%s", dir, file);
    return json_parse_file(p, j);
}

/* The model's configs: from --model-config, or from the flags. latent: the latent side. */
static MsStatus pre_configs(const PreArgs *a, const VaeConfig *vc, int latent, MsModel *m) {
    MsStatus s;
    ms_scheduler_config_sd15(&m->scheduler_config);
    if (a->model_config) {
        JsonValue *j = NULL;
        if ((s = read_json_config(a->model_config, "unet/config.json", &j))) return s;
        s = ms_unet_config_from_json(j, &m->unet_config);
        json_free(j);
        if (s) return s;
        if ((s = read_json_config(a->model_config, "text_encoder/config.json", &j))) return s;
        s = ms_clip_text_config_from_json(j, &m->text_config);
        json_free(j);
        if (s) return s;
        if (!read_json_config(a->model_config, "scheduler/scheduler_config.json", &j)) {
            s = ms_scheduler_config_from_json(j, &m->scheduler_config);
            json_free(j);
            if (s) return s;
        }
    } else {
        UNetConfig *c = &m->unet_config;
        ClipTextConfig *t = &m->text_config;
        if (a->n_heads != a->n_ch)
            return ms_errorf(MS_ERR_ARG, "pretrain: --heads has %d values, --channels %d", a->n_heads, a->n_ch);
        ms_unet_config_sd15(c);
        c->n_blocks = a->n_ch;
        for (int i = 0; i < a->n_ch; i++) {
            c->block_out_channels[i] = a->ch[i];
            c->attention_head_dim[i] = a->heads[i];
            c->num_attention_heads[i] = 0;
            c->transformer_layers_per_block[i] = 1;
            c->down_block_types[i] = i == 0 && a->n_ch > 1 ? MS_BLOCK_DOWN : MS_BLOCK_CROSS_ATTN_DOWN;
            c->up_block_types[i] = i == a->n_ch - 1 && a->n_ch > 1 ? MS_BLOCK_UP : MS_BLOCK_CROSS_ATTN_UP;
        }
        c->layers_per_block = a->layers;
        c->norm_num_groups = a->groups;
        c->cross_attention_dim = a->text_width;
        ms_clip_text_config_sd15(t);
        t->hidden_size = a->text_width;
        t->intermediate_size = 4 * a->text_width;
        t->projection_dim = a->text_width;
        t->num_hidden_layers = a->text_layers;
        t->num_attention_heads = a->text_heads;
    }
    m->unet_config.sample_size = latent;
    m->unet_config.in_channels = m->unet_config.out_channels = vc->latent_channels;
    if ((s = ms_unet_config_check(&m->unet_config)) || (s = ms_clip_text_config_check(&m->text_config)) ||
        (s = ms_scheduler_config_check(&m->scheduler_config)))
        return s;
    if (m->text_config.vocab_size != 49408)
        return ms_errorf(MS_ERR_ARG, "pretrain: text vocab_size %d: the CLIP BPE tokenizer has 49408", m->text_config.vocab_size);
    return MS_OK;
}

/* The frozen VAE from a diffusers folder: DIR/config.json + weights. */
static MsStatus pre_load_vae(const char *dir, MsModel *m) {
    static const char *const names[] = { "diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin" };
    JsonValue *j = NULL;
    char p[2300];
    MsStatus s = read_json_config(dir, "config.json", &j);
    if (s) return s;
    s = ms_vae_config_from_json(j, &m->vae_config);
    json_free(j);
    if (s) return s;
    if ((s = ms_param_table_vae(&m->vae_config, &m->vae))) return s;
    for (size_t i = 0; i < sizeof names / sizeof names[0]; i++) {
        FILE *f;
        snprintf(p, sizeof p, "%s/%s", dir, names[i]);
        if (!(f = fopen(p, "rb"))) continue;
        fclose(f);
        return ms_table_fill_file(&m->vae, p, 0, "vae", NULL);
    }
    return ms_errorf(MS_ERR_IO, "%s: no diffusion_pytorch_model.safetensors or .bin", dir);
}

/* ---- data: world scenes, captions, cached latents ---- */
typedef struct {
    uint64_t seed;
    int S, n, lat_n;                /* image side, scenes, floats per latent */
    float scale;                    /* the VAE's scaling_factor */
    VaeParams vp;
    Arena ar;
    float *cache;                   /* (n, lat_n) */
    unsigned char *have;            /* (n) */
    uint8_t *rgb;                   /* (S,S,3) */
    float *img, *mean, *logvar;     /* (3,S,S), (lat_n) x2 */
} PreData;

static MsStatus pre_data_init(PreData *d, const MsModel *m, const PreArgs *a, int latent) {
    VaeSizes vz;
    MsStatus s;
    memset(d, 0, sizeof *d);
    d->seed = a->world_seed; d->S = a->size; d->n = a->scenes;
    d->lat_n = m->vae_config.latent_channels * latent * latent;
    d->scale = m->vae_config.scaling_factor;
    if ((s = vae_params_init(&d->vp, &m->vae_config, &m->vae)) || (s = vae_sizes(&m->vae_config, d->S, d->S, -1, &vz)) ||
        (s = arena_init(&d->ar, vz.encode_bytes)))
        return s;
    d->cache = (float *)malloc((size_t)d->n * d->lat_n * sizeof(float));
    d->have = (unsigned char *)calloc((size_t)d->n, 1);
    d->rgb = (uint8_t *)malloc((size_t)d->S * d->S * 3);
    d->img = (float *)ms_alloc_aligned((size_t)3 * d->S * d->S, sizeof(float));
    d->mean = (float *)ms_alloc_aligned((size_t)d->lat_n, sizeof(float));
    d->logvar = (float *)ms_alloc_aligned((size_t)d->lat_n, sizeof(float));
    if (!d->cache || !d->have || !d->rgb || !d->img || !d->mean || !d->logvar)
        return ms_errorf(MS_ERR_NOMEM, "pretrain: out of memory for %d cached latents", d->n);
    return MS_OK;
}

static void pre_data_free(PreData *d) {
    arena_free(&d->ar);
    free(d->cache); free(d->have); free(d->rgb);
    ms_free_aligned(d->img); ms_free_aligned(d->mean); ms_free_aligned(d->logvar);
}

/* Scene idx: its caption into cap, its latent into lat (computed once, then from the cache).
 * The trained VAE (W2) plugs in here: encode with the current weights instead of the cache. */
static MsStatus pre_latent(PreData *d, int idx, float *lat, char *cap, size_t capn) {
    WorldScene sc;
    MsStatus s;
    world_scene_make(d->seed, idx, &sc);
    if ((s = world_caption(d->seed, idx, &sc, cap, capn))) return s;
    if (!d->have[idx]) {
        const size_t P = (size_t)d->S * d->S;
        if ((s = world_render(&sc, d->S, d->rgb, NULL, NULL, NULL))) return s;
        for (size_t i = 0; i < P; i++)                      /* ToTensor + Normalize(0.5, 0.5) */
            for (int ch = 0; ch < 3; ch++) d->img[ch * P + i] = (float)d->rgb[3 * i + ch] / 255.0f * 2.0f - 1.0f;
        arena_reset(&d->ar, 0);
        if ((s = vae_encode(&d->vp, &d->ar, d->mean, d->logvar, d->img, 1, d->S, d->S))) return s;
        for (int i = 0; i < d->lat_n; i++) d->cache[(size_t)idx * d->lat_n + i] = d->mean[i] * d->scale;
        d->have[idx] = 1;
    }
    memcpy(lat, d->cache + (size_t)idx * d->lat_n, (size_t)d->lat_n * sizeof(float));
    return MS_OK;
}

/* ---- checkpoints ---- */
/* Everything a resumed run must agree on, as one string (stored in the checkpoint). */
static void pre_recipe(char *buf, size_t cap, const PreArgs *a, const MsModel *m) {
    uint64_t h = 1469598103934665603ull;      /* FNV-1a of the parameter names and shapes */
    const MsParamTable *t[2] = { &m->unet, &m->text };
    for (int k = 0; k < 2; k++)
        for (int i = 0; i < t[k]->n; i++) {
            const MsParam *p = &t[k]->p[i];
            for (const char *c = p->name; *c; c++) h = (h ^ (unsigned char)*c) * 1099511628211ull;
            for (int d = 0; d < p->ndim; d++) h = (h ^ (uint64_t)p->shape[d]) * 1099511628211ull;
        }
    const UNetConfig *u = &m->unet_config;
    const ClipTextConfig *tc = &m->text_config;
    snprintf(buf, cap, "size=%d batch=%d scenes=%d world_seed=%llu seed=%llu lr=%.17g warmup=%lld betas=%.17g,%.17g "
             "eps=%.17g wd=%.17g uncond=%.17g params=%016llx groups=%d heads=%d,%d,%d,%d text_heads=%d vae_scale=%.9g",
             a->size, a->batch, a->scenes, (unsigned long long)a->world_seed, (unsigned long long)a->seed, a->pc.lr,
             (long long)a->pc.warmup, a->pc.beta1, a->pc.beta2, a->pc.adam_eps, a->pc.weight_decay, a->pc.uncond_p,
             (unsigned long long)h, u->norm_num_groups, ms_unet_heads(u, 0), u->n_blocks > 1 ? ms_unet_heads(u, 1) : 0,
             u->n_blocks > 2 ? ms_unet_heads(u, 2) : 0, u->n_blocks > 3 ? ms_unet_heads(u, 3) : 0,
             tc->num_attention_heads, (double)m->vae_config.scaling_factor);
}

static MsStatus add_entry(StEntry **e, size_t *n, size_t *cap, const char *name, StDtype dt, int64_t len,
                          const float *f32, const void *raw) {
    if (*n == *cap) {
        size_t c = *cap ? 2 * *cap : 256;
        StEntry *x = (StEntry *)realloc(*e, c * sizeof *x);
        if (!x) return ms_errorf(MS_ERR_NOMEM, "checkpoint: out of memory");
        *e = x; *cap = c;
    }
    StEntry *x = &(*e)[(*n)++];
    memset(x, 0, sizeof *x);
    x->name = name; x->dtype = dt; x->ndim = 1; x->shape[0] = len; x->f32 = f32; x->raw = raw;
    return MS_OK;
}

/* weights ("unet.<key>", "text_encoder.<key>"), AdamW moments, the step and the generator */
static MsStatus pre_save(const char *path, MsPretrainer *p, const MsModel *m, const MsTorchRng *g, const char *recipe) {
    const MsParamTable *t[2] = { &m->unet, &m->text };
    static const char *const pre[2] = { "unet.", "text_encoder." };
    StEntry *e = NULL;
    size_t n = 0, cap = 0, nmom;
    char (*names)[MS_KEY_MAX + 16] = (char (*)[MS_KEY_MAX + 16])malloc((size_t)(m->unet.n + m->text.n) * sizeof *names);
    float *mm, *vv;
    uint32_t mt[624];
    int64_t ints[4] = { ms_pretrainer_step_count(p), g->next, (int64_t)g->seed, g->has_normal };
    double gn = g->normal;
    MsStatus s = names ? MS_OK : ms_errorf(MS_ERR_NOMEM, "checkpoint: out of memory");
    int k = 0;
    for (int i = 0; i < 624; i++) mt[i] = g->mt[i];
    for (int j = 0; !s && j < 2; j++)
        for (int i = 0; !s && i < t[j]->n; i++) {
            const MsParam *q = &t[j]->p[i];
            if (q->flags & MS_PARAM_BUFFER) continue;
            snprintf(names[k], sizeof names[k], "%s%s", pre[j], q->name);
            s = add_entry(&e, &n, &cap, names[k++], ST_F32, (int64_t)q->numel, q->f32, NULL);
        }
    ms_pretrainer_moments(p, &mm, &vv, &nmom);
    if (!s) s = add_entry(&e, &n, &cap, "adam.m", ST_F32, (int64_t)nmom, mm, NULL);
    if (!s) s = add_entry(&e, &n, &cap, "adam.v", ST_F32, (int64_t)nmom, vv, NULL);
    if (!s) s = add_entry(&e, &n, &cap, "torch_rng.mt", ST_U32, 624, NULL, mt);
    if (!s) s = add_entry(&e, &n, &cap, "torch_rng.normal", ST_F64, 1, NULL, &gn);
    if (!s) s = add_entry(&e, &n, &cap, "ints", ST_I64, 4, NULL, ints);
    if (!s) {
        const char *meta[4] = { "format", "mixshow pretrain checkpoint 1", "recipe", recipe };
        s = st_write(path, e, n, meta, 2);             /* path.tmp, then renamed */
    }
    free(e); free(names);
    return s;
}

static MsStatus pre_raw(const StFile *f, const char *name, StDtype dt, size_t n, const StTensor **out) {
    const StTensor *x = st_find(f, name);
    if (!x) return ms_errorf(MS_ERR_FORMAT, "%s: no tensor '%s'", f->origin, name);
    if (x->dtype != dt || x->numel != n)
        return ms_errorf(MS_ERR_FORMAT, "%s: '%s' is %s x %zu, expected %s x %zu", f->origin, name, st_dtype_name(x->dtype),
                         x->numel, st_dtype_name(dt), n);
    *out = x;
    return MS_OK;
}

static uint64_t le64(const unsigned char *p) {
    uint64_t v = 0;
    for (int i = 7; i >= 0; i--) v = v << 8 | p[i];
    return v;
}

static MsStatus pre_load(const char *path, MsPretrainer *p, MsModel *m, MsTorchRng *g, const char *recipe) {
    MsParamTable *t[2] = { &m->unet, &m->text };
    static const char *const pre[2] = { "unet.", "text_encoder." };
    StFile f;
    const StTensor *x;
    float *mm, *vv;
    size_t nmom;
    char key[MS_KEY_MAX + 16];
    MsStatus s = st_open(&f, path);
    if (s) return s;
    const char *fmt = st_meta(&f, "format"), *rec = st_meta(&f, "recipe");
    if (!fmt || strcmp(fmt, "mixshow pretrain checkpoint 1")) {
        s = ms_errorf(MS_ERR_FORMAT, "%s: not a mixshow pretrain checkpoint (metadata format '%s')", path, fmt ? fmt : "");
        goto done;
    }
    if (!rec || strcmp(rec, recipe)) {
        s = ms_errorf(MS_ERR_ARG, "%s: written with other options:\n  checkpoint: %s\n  this run:   %s", path,
                      rec ? rec : "(none)", recipe);
        goto done;
    }
    for (int j = 0; j < 2; j++)
        for (int i = 0; i < t[j]->n; i++) {
            MsParam *q = &t[j]->p[i];
            if (q->flags & MS_PARAM_BUFFER) continue;
            snprintf(key, sizeof key, "%s%s", pre[j], q->name);
            if ((s = st_read_f32(&f, key, q->f32, q->numel, -1, NULL))) goto done;
        }
    ms_pretrainer_moments(p, &mm, &vv, &nmom);
    if ((s = st_read_f32(&f, "adam.m", mm, nmom, -1, NULL)) || (s = st_read_f32(&f, "adam.v", vv, nmom, -1, NULL))) goto done;
    if ((s = pre_raw(&f, "torch_rng.mt", ST_U32, 624, &x))) goto done;
    for (int i = 0; i < 624; i++)
        g->mt[i] = (uint32_t)x->data[4 * i] | (uint32_t)x->data[4 * i + 1] << 8 | (uint32_t)x->data[4 * i + 2] << 16 |
                   (uint32_t)x->data[4 * i + 3] << 24;
    if ((s = pre_raw(&f, "torch_rng.normal", ST_F64, 1, &x))) goto done;
    {
        uint64_t b = le64(x->data);
        memcpy(&g->normal, &b, sizeof b);
    }
    if ((s = pre_raw(&f, "ints", ST_I64, 4, &x))) goto done;
    {
        int64_t step = (int64_t)le64(x->data), next = (int64_t)le64(x->data + 8);
        if (step < 0 || next < 0 || next > 624) { s = ms_errorf(MS_ERR_FORMAT, "%s: ints: step %lld, rng index %lld", path, (long long)step, (long long)next); goto done; }
        ms_pretrainer_set_step(p, step);
        g->next = (int)next;
        g->seed = le64(x->data + 16);
        g->has_normal = le64(x->data + 24) != 0;
    }
done:
    st_close(&f);
    return s;
}

/* loss.csv of a resumed run: the rows up to step k0 are kept (their losses into loss[]), later
 * ones (written after the checkpoint by the interrupted run) are dropped. */
static MsStatus pre_csv_resume(const char *path, int64_t k0, double *loss) {
    FILE *f = fopen(path, "r");
    char line[512], tmp[2600];
    if (!f) return ms_errorf(MS_ERR_IO, "%s: cannot read (resuming at step %lld)", path, (long long)k0);
    snprintf(tmp, sizeof tmp, "%s.tmp", path);
    FILE *o = fopen(tmp, "w");
    if (!o) { fclose(f); return ms_errorf(MS_ERR_IO, "%s: cannot open for writing", tmp); }
    int64_t got = 0;
    while (fgets(line, sizeof line, f)) {
        long long k;
        double l;
        if (sscanf(line, "%lld,%lf", &k, &l) == 2) {
            if (k < 1 || k > k0) continue;
            loss[k - 1] = l;
            got++;
        }
        fputs(line, o);
    }
    fclose(f);
    if (fclose(o) != 0 || rename(tmp, path) != 0) { remove(tmp); return ms_errorf(MS_ERR_IO, "%s: cannot rewrite", path); }
    if (got != k0) fprintf(stderr, "pretrain: %s has %lld of the %lld steps before the checkpoint\n", path, (long long)got, (long long)k0);
    return MS_OK;
}

static void pre_progress(int64_t k, int64_t k0, int64_t n, double loss, double t0, int tty) {
    double el = ms_time() - t0, per = el / (double)(k - k0), eta = per * (double)(n - k);
    char bar[31];
    int fill = n > 0 ? (int)(30 * k / n) : 30;
    for (int i = 0; i < 30; i++) bar[i] = i < fill ? '#' : '.';
    bar[30] = '\0';
    fprintf(stderr, "%s[%s] %lld/%lld loss %.4f (mean of the last 20) %.3f s/step ETA %02d:%02d:%02d%s", tty ? "\r" : "",
            bar, (long long)k, (long long)n, loss, per, (int)(eta / 3600), (int)(eta / 60) % 60, (int)eta % 60, tty ? "" : "\n");
    fflush(stderr);
}

static MsStatus pretrain_run(const PreArgs *a) {
    MsModel m;
    ClipTokenizer tok;
    MsPretrainer *p = NULL;
    PreData d;
    MsTorchRng *g = (MsTorchRng *)malloc(sizeof *g);
    char vae_dir[2048], tok_dir[2048], path[2400], recipe[1024];
    char **caps = NULL;
    float *lat = NULL;
    double *losses = NULL;
    FILE *csv = NULL;
    int tok_ok = 0, shipped = 0;
    MsStatus s = MS_OK;
    memset(&m, 0, sizeof m);
    memset(&d, 0, sizeof d);
    if (!g) return ms_errorf(MS_ERR_NOMEM, "pretrain: out of memory");
    if (a->vae_dir) snprintf(vae_dir, sizeof vae_dir, "%s", a->vae_dir);
    else if (!ms_find_data("models/tiny-sd/vae", vae_dir, sizeof vae_dir)) {
        s = ms_errorf(MS_ERR_IO, "pretrain: no --vae and the embedded models/tiny-sd/vae was not found"); goto done;
    }
    if ((s = ms_find_tokenizer(NULL, a->tok_dir, tok_dir, sizeof tok_dir, &shipped))) goto done;
    if ((s = ms_clip_tokenizer_load(tok_dir, &tok))) goto done;
    tok_ok = 1;
    if ((s = pre_load_vae(vae_dir, &m))) goto done;
    {
        const int f = 1 << (m.vae_config.n_blocks - 1);
        if (a->size % f) { s = ms_errorf(MS_ERR_ARG, "pretrain: --size %d is not a multiple of the VAE's factor %d", a->size, f); goto done; }
        if ((s = pre_configs(a, &m.vae_config, a->size / f, &m))) goto done;
    }
    if ((s = ms_param_table_unet(&m.unet_config, &m.unet)) || (s = ms_param_table_alloc(&m.unet, NULL)) ||
        (s = ms_param_table_text(&m.text_config, &m.text)) || (s = ms_param_table_alloc(&m.text, NULL)))
        goto done;
    memset(m.unet.mem, 0, m.unet.mem_bytes);
    memset(m.text.mem, 0, m.text.mem_bytes);
    /* weights first, then everything else draws from the same generator */
    ms_torch_seed(g, a->seed);
    if ((s = ms_pretrain_init_weights(&m.unet, g)) || (s = ms_pretrain_init_weights(&m.text, g))) goto done;
    {
        const int latent = m.unet_config.sample_size;
        if ((s = ms_pretrainer_create(&p, &m, &tok, &a->pc, a->batch, latent, latent))) goto done;
        if ((s = pre_data_init(&d, &m, a, latent))) goto done;
    }
    pre_recipe(recipe, sizeof recipe, a, &m);
    lat = (float *)ms_alloc_aligned((size_t)a->batch * d.lat_n, sizeof(float));
    caps = (char **)calloc((size_t)a->batch, sizeof(char *));
    losses = (double *)calloc((size_t)a->steps + 1, sizeof(double));
    if (!lat || !caps || !losses) { s = ms_errorf(MS_ERR_NOMEM, "pretrain: out of memory"); goto done; }
    for (int b = 0; b < a->batch; b++)
        if (!(caps[b] = (char *)malloc(1024))) { s = ms_errorf(MS_ERR_NOMEM, "pretrain: out of memory"); goto done; }
    snprintf(path, sizeof path, "%s/loss.csv", a->out);
    if (a->resume) {
        if ((s = pre_load(a->resume, p, &m, g, recipe))) goto done;
        if (ms_pretrainer_step_count(p) > a->steps) {
            s = ms_errorf(MS_ERR_ARG, "pretrain: %s is at step %lld, beyond --steps %lld", a->resume,
                          (long long)ms_pretrainer_step_count(p), (long long)a->steps);
            goto done;
        }
        fprintf(stderr, "pretrain: resumed at step %lld from %s\n", (long long)ms_pretrainer_step_count(p), a->resume);
        FILE *f = fopen(path, "r");
        if (f) { fclose(f); if ((s = pre_csv_resume(path, ms_pretrainer_step_count(p), losses))) goto done; }
    }
    csv = fopen(path, ms_pretrainer_step_count(p) > 0 ? "a" : "w");
    if (!csv) { s = ms_errorf(MS_ERR_IO, "%s: cannot open for writing", path); goto done; }
    if (ms_pretrainer_step_count(p) == 0) fprintf(csv, "step,loss,lr,seconds\n");
    if (!a->quiet) {
        const UNetConfig *u = &m.unet_config;
        fprintf(stderr, "pretrain: UNet %zu parameters (%d blocks, %d..%d channels, latent %dx%d), text encoder %zu "
                "(width %d, %d layers), VAE %s (frozen); %d scenes %dx%d of world seed %llu, batch %d, %lld steps, "
                "output %s\n", ms_param_table_numel(&m.unet), u->n_blocks, u->block_out_channels[0],
                u->block_out_channels[u->n_blocks - 1], u->sample_size, u->sample_size, ms_param_table_numel(&m.text),
                m.text_config.hidden_size, m.text_config.num_hidden_layers, vae_dir, a->scenes, a->size, a->size,
                (unsigned long long)a->world_seed, a->batch, (long long)a->steps, a->out);
    }
    {
        const double t0 = ms_time();
        const int64_t k0 = ms_pretrainer_step_count(p);
        const int tty = !a->quiet && stderr_tty();
        while (ms_pretrainer_step_count(p) < a->steps) {
            MsPretrainReport rep;
            const double ts = ms_time();
            for (int b = 0; b < a->batch; b++) {         /* the scenes of this batch */
                int idx = (int)(ms_torch_random(g) % (uint32_t)a->scenes);
                if ((s = pre_latent(&d, idx, lat + (size_t)b * d.lat_n, caps[b], 1024))) goto done;
            }
            if ((s = ms_pretrain_step(p, lat, (const char *const *)caps, NULL, g, &rep))) goto done;
            const int64_t k = ms_pretrainer_step_count(p);
            losses[k - 1] = rep.loss;
            fprintf(csv, "%lld,%.9g,%.9g,%.4f\n", (long long)k, rep.loss, rep.lr, ms_time() - ts);
            fflush(csv);
            if (!a->quiet && (tty || k % 10 == 0 || k == a->steps)) {
                double mean = 0.0;
                int64_t j0 = k > 20 ? k - 20 : 0;
                for (int64_t j = j0; j < k; j++) mean += losses[j];
                pre_progress(k, k0, a->steps, mean / (double)(k - j0), t0, tty);
            }
            if (a->ckpt_every > 0 && k % a->ckpt_every == 0 && k < a->steps) {
                char cp[2400];
                snprintf(cp, sizeof cp, "%s/checkpoint.safetensors", a->out);
                if ((s = pre_save(cp, p, &m, g, recipe))) goto done;
            }
        }
        if (tty) fprintf(stderr, "\n");
    }
    fclose(csv);
    csv = NULL;
    snprintf(path, sizeof path, "%s/checkpoint.safetensors", a->out);
    if (a->ckpt_every > 0 && (s = pre_save(path, p, &m, g, recipe))) goto done;
    snprintf(path, sizeof path, "%s/loss.svg", a->out);
    if ((s = ms_write_loss_svg(path, losses, ms_pretrainer_step_count(p)))) goto done;
    snprintf(path, sizeof path, "%s/model", a->out);
    if ((s = ms_write_model_folder(&m, tok_dir, path, 0))) goto done;
    if (!a->quiet) fprintf(stderr, "pretrain: wrote %s/loss.csv, loss.svg and %s (sample it with mixshow sample --model %s)\n",
                           a->out, path, path);
done:
    if (csv) fclose(csv);
    if (caps) for (int b = 0; b < a->batch; b++) free(caps[b]);
    free(caps);
    ms_free_aligned(lat);
    free(losses);
    pre_data_free(&d);
    ms_pretrainer_free(p);
    ms_model_free(&m);
    if (tok_ok) clip_tokenizer_free(&tok);
    free(g);
    return s;
}

int cmd_pretrain(int argc, char **argv) {
    PreArgs a;
    memset(&a, 0, sizeof a);
    ms_pretrain_config_defaults(&a.pc);
    a.steps = 1000; a.ckpt_every = 100; a.batch = 8; a.size = 64; a.scenes = 4096;
    a.n_ch = 3; a.ch[0] = 32; a.ch[1] = 64; a.ch[2] = 64;
    a.n_heads = 3; a.heads[0] = 2; a.heads[1] = 4; a.heads[2] = 4;
    a.layers = 1; a.groups = 8; a.text_width = 64; a.text_layers = 2; a.text_heads = 2;
    for (int i = 1; i < argc; i++) {
        const char *o = argv[i];
        if (!strcmp(o, "--help") || !strcmp(o, "-h")) { pretrain_usage(stdout); return 0; }
        if (!strcmp(o, "--quiet") || !strcmp(o, "-q")) { a.quiet = 1; continue; }
        if (i + 1 >= argc) { fprintf(stderr, "mixshow pretrain: %s needs a value (see --help)\n", o); return 2; }
        const char *v = argv[++i];
        char *end = NULL;
        long long n = 0;
        double x = 0.0;
        int ok = 1;
        if (!strcmp(o, "--out")) a.out = v;
        else if (!strcmp(o, "--vae")) a.vae_dir = v;
        else if (!strcmp(o, "--tokenizer")) a.tok_dir = v;
        else if (!strcmp(o, "--model-config")) a.model_config = v;
        else if (!strcmp(o, "--resume")) a.resume = v;
        else if (!strcmp(o, "--channels")) ok = parse_list(v, a.ch, &a.n_ch);
        else if (!strcmp(o, "--heads")) ok = parse_list(v, a.heads, &a.n_heads);
        else if (!strcmp(o, "--lr") || !strcmp(o, "--weight-decay") || !strcmp(o, "--uncond")) {
            x = strtod(v, &end);
            ok = end != v && !*end && x >= 0 && x <= 10;
            if (!strcmp(o, "--lr")) a.pc.lr = x;
            else if (!strcmp(o, "--weight-decay")) a.pc.weight_decay = x;
            else { a.pc.uncond_p = x; ok = ok && x <= 1; }
        } else {
            n = strtoll(v, &end, 10);
            ok = end != v && !*end && n >= 0;
            if (!strcmp(o, "--steps")) a.steps = n;
            else if (!strcmp(o, "--checkpoint-every")) a.ckpt_every = n;
            else if (!strcmp(o, "--warmup")) a.pc.warmup = n;
            else if (!strcmp(o, "--seed")) a.seed = (uint64_t)n;
            else if (!strcmp(o, "--world-seed")) a.world_seed = (uint64_t)n;
            else if (!strcmp(o, "--batch")) { a.batch = (int)n; ok = ok && n >= 1 && n <= 64; }
            else if (!strcmp(o, "--size")) { a.size = (int)n; ok = ok && (n == 64 || n == 128); }
            else if (!strcmp(o, "--scenes")) { a.scenes = (int)n; ok = ok && n >= 1 && n <= 1000000; }
            else if (!strcmp(o, "--layers")) { a.layers = (int)n; ok = ok && n >= 1 && n <= 4; }
            else if (!strcmp(o, "--groups")) { a.groups = (int)n; ok = ok && n >= 1; }
            else if (!strcmp(o, "--text-width")) { a.text_width = (int)n; ok = ok && n >= 1 && n <= 4096; }
            else if (!strcmp(o, "--text-layers")) { a.text_layers = (int)n; ok = ok && n >= 1 && n <= 48; }
            else if (!strcmp(o, "--text-heads")) { a.text_heads = (int)n; ok = ok && n >= 1; }
            else if (!strcmp(o, "--threads")) { a.threads = (int)n; ok = ok && n >= 1 && n <= 1024; }
            else { fprintf(stderr, "mixshow pretrain: unknown option %s (see --help)\n", o); return 2; }
        }
        if (!ok) { fprintf(stderr, "mixshow pretrain: %s %s: not a valid value (see --help)\n", o, v); return 2; }
    }
    if (!a.out) { fprintf(stderr, "mixshow pretrain: --out DIR is required (see --help)\n"); return 2; }
    if (a.threads > 0) ms_set_threads(a.threads);
    if (!pre_mkdir(a.out)) { fprintf(stderr, "mixshow pretrain: %s: cannot create the folder\n", a.out); return 1; }
    MsStatus s = pretrain_run(&a);
    if (s) { fprintf(stderr, "mixshow pretrain: %s\n", ms_last_error()); return 1; }
    return 0;
}
