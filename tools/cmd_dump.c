/* tools/cmd_dump.c — `mixshow dump`: run every network whose inputs are present in a
 * safetensors file and write the outputs to another, under fixed names, so that any other
 * implementation can be compared with mixshow on the same inputs (DESIGN.md §5.3).
 *
 *   in.latent [B,4,h,w] + in.timestep [B] (I64 or F32) + in.context [B,77,D]  -> unet.eps
 *   in.cond_sketch [1,1,H,W] / in.cond_openpose [1,3,H,W]     -> adapter.{sketch,openpose}.feat0..3
 *     + in.adapter_scale (scalar) and the UNet inputs         -> unet_adapter.eps
 *       (features x scale, repeated to batch B, added to the down blocks as diffusers'
 *        down_block_additional_residuals; with both conditions, sketch + openpose are summed)
 *   in.image [B,3,H,W] in [-1,1]      -> vae.enc.mean, vae.enc.logvar, vae.enc.std
 *     + in.vae_noise [B,4,H/8,W/8]    -> vae.enc.sample (= mean + std*noise),
 *                                        vae.enc.latent (= sample * scaling_factor)
 *   in.dec_latent [B,4,h,w]           -> vae.dec.image (= decode(in.dec_latent / scaling_factor))
 *   in.input_ids [B,77] (I64 or I32)  -> text.hidden (CLIPTextModel last_hidden_state)
 * Unknown keys are reported on stderr and ignored. All outputs are F32. */
#include "tools/tools.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define DUMP_MAX_OUT 32

typedef struct {
    const char *model, *config, *inputs, *out, *adapter_dir[2];
    StFile in;
    MsModel m;
    int model_loaded;
    Arena ar;
    StEntry out_e[DUMP_MAX_OUT];
    float *out_buf[DUMP_MAX_OUT];
    char out_name[DUMP_MAX_OUT][48];
    int n_out;
} Dump;

static const char *const KNOWN[] = { "in.latent", "in.timestep", "in.context", "in.cond_sketch",
                                     "in.cond_openpose", "in.adapter_scale", "in.image", "in.vae_noise",
                                     "in.dec_latent", "in.input_ids" };
static const char *const ADAPTER_NAME[2] = { "sketch", "openpose" };

static void dump_usage(FILE *f) {
    fprintf(f,
        "usage: mixshow dump [--model PATH] [--config DIR] --inputs IN.safetensors --out OUT.safetensors\n"
        "                    [--adapter-sketch DIR] [--adapter-openpose DIR]\n\n"
        "Runs every network whose inputs are in IN and writes its outputs to OUT (F32), to compare\n"
        "mixshow with another implementation on the same inputs. PATH: diffusers folder or single file\n"
        "(default: models/world, the shipped world model, else models/tiny-sd, the embedded tiny model);\n"
        "--config DIR: a diffusers folder's configs for it (a single file's are otherwise read from its\n"
        "metadata or inferred from its shapes, and printed).\n\n"
        "  in.latent [B,4,h,w] + in.timestep [B] + in.context [B,77,D] -> unet.eps\n"
        "  in.cond_sketch [1,1,H,W], in.cond_openpose [1,3,H,W] in [0,1]\n"
        "                                          -> adapter.sketch.feat0..3, adapter.openpose.feat0..3\n"
        "      (adapters from PATH/t2iadapter_sketch, PATH/t2iadapter_openpose or the options)\n"
        "  + in.adapter_scale [] and the UNet inputs -> unet_adapter.eps (features x scale, repeated\n"
        "      to batch B; sketch + openpose summed when both are given)\n"
        "  in.image [B,3,H,W] in [-1,1]          -> vae.enc.mean, vae.enc.logvar, vae.enc.std\n"
        "  + in.vae_noise [B,4,H/8,W/8]          -> vae.enc.sample (mean + std*noise),\n"
        "                                           vae.enc.latent (sample * scaling_factor)\n"
        "  in.dec_latent [B,4,h,w]               -> vae.dec.image (decode(in.dec_latent / scaling_factor))\n"
        "  in.input_ids [B,77] I64/I32           -> text.hidden (last_hidden_state)\n"
        "Unknown in.* keys are reported and ignored. Shapes need not be square.\n");
}

/* A new F32 output (B x ... floats, zeroed); NULL (status recorded) when out of memory. */
static float *add_output(Dump *d, const char *name, int ndim, const int64_t *shape) {
    size_t n = 1;
    if (d->n_out >= DUMP_MAX_OUT) { ms_errorf(MS_ERR_ARG, "dump: too many outputs"); return NULL; }
    for (int i = 0; i < ndim; i++)
        if (shape[i] < 0 || !ms_mul_ok(n, (size_t)shape[i], &n)) { ms_errorf(MS_ERR_SHAPE, "dump: %s: size overflows", name); return NULL; }
    float *x = (float *)ms_alloc_aligned(n ? n : 1, sizeof(float));
    if (!x) { ms_errorf(MS_ERR_NOMEM, "dump: %s: out of memory (%zu floats)", name, n); return NULL; }
    memset(x, 0, (n ? n : 1) * sizeof(float));
    StEntry *e = &d->out_e[d->n_out];
    snprintf(d->out_name[d->n_out], sizeof d->out_name[0], "%s", name);
    memset(e, 0, sizeof *e);
    e->name = d->out_name[d->n_out];
    e->dtype = ST_F32;
    e->ndim = ndim;
    for (int i = 0; i < ndim; i++) e->shape[i] = shape[i];
    e->f32 = x;
    d->out_buf[d->n_out++] = x;
    return x;
}

/* An input as floats (ms_alloc_aligned), its shape checked: ndim and every dim given >= 0. */
static MsStatus input_f32(Dump *d, const char *name, int ndim, const int64_t *want, float **out, const StTensor **tt) {
    const StTensor *t = st_find(&d->in, name);
    *out = NULL;
    if (!t) return ms_errorf(MS_ERR_ARG, "%s: no tensor '%s'", d->inputs, name);
    if (t->ndim != ndim) return ms_errorf(MS_ERR_SHAPE, "%s: '%s' has %d dims, expected %d", d->inputs, name, t->ndim, ndim);
    for (int i = 0; i < ndim; i++)
        if (want[i] >= 0 && t->shape[i] != want[i]) {
            char a[96];
            return ms_errorf(MS_ERR_SHAPE, "%s: '%s' has shape %s: dim %d must be %lld", d->inputs, name,
                             ms_shape_str(a, sizeof a, t->ndim, t->shape), i, (long long)want[i]);
        }
    for (int i = 0; i < ndim; i++)
        if (t->shape[i] <= 0 || t->shape[i] > (1 << 20))
            return ms_errorf(MS_ERR_SHAPE, "%s: '%s' dim %d is %lld (expected 1..2^20)", d->inputs, name, i, (long long)t->shape[i]);
    float *x = (float *)ms_alloc_aligned(t->numel ? t->numel : 1, sizeof(float));
    if (!x) return ms_errorf(MS_ERR_NOMEM, "%s: '%s': out of memory", d->inputs, name);
    MsStatus s = st_to_f32(&d->in, t, x, t->numel);
    if (s) { ms_free_aligned(x); return s; }
    if (tt) *tt = t;
    *out = x;
    return MS_OK;
}

static MsStatus need_model(Dump *d) {
    if (d->model_loaded) return MS_OK;
    MsOpenOptions o = { NULL, d->config, 0, 0 };    /* no --model: models/world, else models/tiny-sd */
    MsStatus s = ms_open_model(d->model, &o, &d->m, NULL, NULL, 0);
    if (!s) d->model_loaded = 1;
    return s;
}

/* The scratch arena: grown (reallocated empty) when a network needs more than it holds. */
static MsStatus need_arena(Dump *d, size_t bytes) {
    if (d->ar.cap >= bytes) { arena_reset(&d->ar, 0); return MS_OK; }
    arena_free(&d->ar);
    return arena_init(&d->ar, bytes);
}

/* ---- VAE ---- */
static MsStatus dump_vae(Dump *d) {
    const StTensor *ti = st_find(&d->in, "in.image"), *tl = st_find(&d->in, "in.dec_latent");
    if (!ti && !tl) return MS_OK;
    MsStatus s = need_model(d);
    if (s) return s;
    const VaeConfig *c = &d->m.vae_config;
    const int f = 1 << (c->n_blocks - 1), L = c->latent_channels;
    VaeParams *p = (VaeParams *)malloc(sizeof *p);
    float *x = NULL, *noise = NULL, *lat = NULL;
    if (!p) return ms_errorf(MS_ERR_NOMEM, "dump: out of memory");
    if ((s = vae_params_init(p, c, &d->m.vae))) goto done;
    if (ti) {
        int64_t want[4] = { -1, c->in_channels, -1, -1 };
        if ((s = input_f32(d, "in.image", 4, want, &x, &ti))) goto done;
        const int B = (int)ti->shape[0], H = (int)ti->shape[2], W = (int)ti->shape[3];
        if (H % f || W % f) { s = ms_errorf(MS_ERR_SHAPE, "%s: 'in.image' is %d x %d: sides must be multiples of %d", d->inputs, H, W, f); goto done; }
        int64_t ls[4] = { B, L, H / f, W / f };
        VaeSizes z;
        if ((s = vae_sizes(c, H, W, -1, &z)) || (s = need_arena(d, z.encode_bytes))) goto done;
        float *mean = add_output(d, "vae.enc.mean", 4, ls), *logvar = add_output(d, "vae.enc.logvar", 4, ls);
        float *sd = add_output(d, "vae.enc.std", 4, ls);
        if (!mean || !logvar || !sd) { s = MS_ERR_NOMEM; goto done; }
        if ((s = vae_encode(p, &d->ar, mean, logvar, x, B, H, W))) goto done;
        const size_t nl = (size_t)B * L * (H / f) * (W / f);
        if (st_find(&d->in, "in.vae_noise")) {
            if ((s = input_f32(d, "in.vae_noise", 4, ls, &noise, NULL))) goto done;
            float *smp = add_output(d, "vae.enc.sample", 4, ls), *lz = add_output(d, "vae.enc.latent", 4, ls);
            if (!smp || !lz) { s = MS_ERR_NOMEM; goto done; }
            vae_posterior_sample(smp, sd, mean, logvar, noise, nl, 1.0f);
            vae_posterior_sample(lz, NULL, mean, logvar, noise, nl, c->scaling_factor);
        } else {
            /* std alone (exp(0.5 logvar), DiagonalGaussianDistribution.std) via a zero noise */
            float *zero = add_output(d, "vae.enc.mean_copy", 4, ls);
            if (!zero) { s = MS_ERR_NOMEM; goto done; }
            vae_posterior_sample(zero, sd, mean, logvar, zero, nl, 1.0f);   /* zero <- mean + std*0 */
            d->n_out--;                                                     /* not an output */
            ms_free_aligned(zero);
            fprintf(stderr, "mixshow dump: in.image without in.vae_noise: vae.enc.sample/latent not written\n");
        }
    }
    if (tl) {
        int64_t want[4] = { -1, L, -1, -1 };
        if ((s = input_f32(d, "in.dec_latent", 4, want, &lat, &tl))) goto done;
        const int B = (int)tl->shape[0], h = (int)tl->shape[2], w = (int)tl->shape[3];
        int64_t is[4] = { B, c->out_channels, (int64_t)h * f, (int64_t)w * f };
        VaeSizes z;
        if ((s = vae_sizes(c, h * f, w * f, -1, &z)) || (s = need_arena(d, z.decode_bytes))) goto done;
        float *img = add_output(d, "vae.dec.image", 4, is);
        if (!img) { s = MS_ERR_NOMEM; goto done; }
        s = vae_decode(p, &d->ar, img, lat, B, h, w);
    }
done:
    ms_free_aligned(x); ms_free_aligned(noise); ms_free_aligned(lat);
    free(p);
    return s;
}

/* ---- T2I-Adapters ---- */
typedef struct {
    int present, n;              /* a condition was given; number of features */
    int64_t shape[MS_MAX_BLOCKS][4];
    float *feat[MS_MAX_BLOCKS];  /* outputs (owned by the output list) */
} AdapterOut;

static MsStatus dump_adapter(Dump *d, int k, AdapterOut *o) {
    char key[32], dir[2048], name[48];
    snprintf(key, sizeof key, "in.cond_%s", ADAPTER_NAME[k]);
    memset(o, 0, sizeof *o);
    if (!st_find(&d->in, key)) return MS_OK;
    if (d->adapter_dir[k]) snprintf(dir, sizeof dir, "%s", d->adapter_dir[k]);
    else if (d->model) snprintf(dir, sizeof dir, "%s/t2iadapter_%s", d->model, ADAPTER_NAME[k]);
    else return ms_errorf(MS_ERR_ARG, "dump: %s needs --model PATH or --adapter-%s DIR", key, ADAPTER_NAME[k]);
    AdapterConfig c;
    MsParamTable t;
    AdapterParams p;
    const StTensor *tc = NULL;
    float *cond = NULL;
    MsStatus s = ms_adapter_load(dir, NULL, &c, &t);
    if (s) return s;
    if ((s = adapter_params_init(&p, &c, &t))) goto done;
    int64_t want[4] = { -1, c.in_channels, -1, -1 };
    if ((s = input_f32(d, key, 4, want, &cond, &tc))) goto done;
    const int N = (int)tc->shape[0], H = (int)tc->shape[2], W = (int)tc->shape[3];
    size_t bytes, nf[MS_MAX_BLOCKS];
    if ((s = adapter_sizes(&c, N, H, W, &bytes, nf)) || (s = need_arena(d, bytes))) goto done;
    o->n = c.n_channels;
    for (int i = 0; i < c.n_channels; i++) {
        int sc = c.downscale_factor << i;
        int64_t sh[4] = { N, c.channels[i], H / sc, W / sc };
        snprintf(name, sizeof name, "adapter.%s.feat%d", ADAPTER_NAME[k], i);
        memcpy(o->shape[i], sh, sizeof sh);
        if (!(o->feat[i] = add_output(d, name, 4, sh))) { s = MS_ERR_NOMEM; goto done; }
    }
    if ((s = adapter_forward(&p, &d->ar, o->feat, cond, N, H, W))) goto done;
    o->present = 1;
done:
    ms_free_aligned(cond);
    ms_param_table_free(&t);
    return s;
}

/* ---- CLIP text encoder ---- */
static MsStatus dump_text(Dump *d) {
    const StTensor *t = st_find(&d->in, "in.input_ids");
    if (!t) return MS_OK;
    MsStatus s = need_model(d);
    if (s) return s;
    const ClipTextConfig *c = &d->m.text_config;
    if (t->dtype != ST_I64 && t->dtype != ST_I32)
        return ms_errorf(MS_ERR_FORMAT, "%s: 'in.input_ids' is %s, expected I64 or I32", d->inputs, st_dtype_name(t->dtype));
    int64_t want[2] = { -1, -1 };
    float *idf = NULL;
    int32_t *ids = NULL;
    if ((s = input_f32(d, "in.input_ids", 2, want, &idf, &t))) return s;
    const int B = (int)t->shape[0], T = (int)t->shape[1];
    if (T > c->max_position_embeddings) {
        s = ms_errorf(MS_ERR_SHAPE, "%s: 'in.input_ids' has %d tokens, the text encoder at most %d", d->inputs, T,
                      c->max_position_embeddings);
        goto done;
    }
    ids = (int32_t *)malloc(t->numel * sizeof *ids);
    if (!ids) { s = ms_errorf(MS_ERR_NOMEM, "dump: out of memory"); goto done; }
    for (size_t i = 0; i < t->numel; i++) {   /* ids are < 2^24: exact in float */
        if (!(idf[i] >= 0.0f && idf[i] < (float)c->vocab_size)) {
            s = ms_errorf(MS_ERR_ARG, "%s: 'in.input_ids'[%zu] = %.0f is outside [0, %d)", d->inputs, i, (double)idf[i], c->vocab_size);
            goto done;
        }
        ids[i] = (int32_t)idf[i];
    }
    ClipTextParams p;
    ClipTextActs a;
    int64_t hs[3] = { B, T, c->hidden_size };
    float *out = NULL;
    if ((s = clip_text_params(&p, &d->m.text, c))) goto done;
    if ((s = need_arena(d, clip_text_sizes(c, B, T, 0, 0)))) goto done;
    if ((s = clip_text_acts_alloc(&a, &d->ar, c, B, T, 0, 0))) goto done;
    if ((s = clip_text_forward(&a, &p, NULL, ids, NULL, 0, c))) goto done;
    if (!(out = add_output(d, "text.hidden", 3, hs))) { s = MS_ERR_NOMEM; goto done; }
    memcpy(out, a.out, (size_t)B * T * c->hidden_size * sizeof(float));
done:
    ms_free_aligned(idf);
    free(ids);
    return s;
}

/* ---- UNet ---- */
/* eps = unet(in.latent, in.timestep, in.context); with adapters and in.adapter_scale also
 * unet_adapter.eps with down_block_additional_residuals = sum of the adapters' features x scale,
 * each repeated to batch B (feature batch 1) or taken as is (feature batch B). */
static MsStatus dump_unet(Dump *d, const AdapterOut *ad) {
    int has = !!st_find(&d->in, "in.latent") + !!st_find(&d->in, "in.timestep") + !!st_find(&d->in, "in.context");
    if (!has) return MS_OK;
    if (has != 3) return ms_errorf(MS_ERR_ARG, "%s: the UNet needs in.latent, in.timestep and in.context together", d->inputs);
    MsStatus s = need_model(d);
    if (s) return s;
    const UNetConfig *c = &d->m.unet_config;
    const StTensor *tl, *tt, *tc;
    float *x = NULL, *t = NULL, *ctx = NULL, *eps, *scale = NULL, *res[MS_MAX_BLOCKS] = { 0 };
    UNetParams p;
    UNetActs a;
    Arena acts = { 0 };
    int p_ok = 0, a_ok = 0;
    int64_t wl[4] = { -1, c->in_channels, -1, -1 };
    if ((s = input_f32(d, "in.latent", 4, wl, &x, &tl))) goto done;
    const int B = (int)tl->shape[0], h = (int)tl->shape[2], w = (int)tl->shape[3];
    tt = st_find(&d->in, "in.timestep");
    if (tt->numel != 1 && tt->numel != (size_t)B) {
        s = ms_errorf(MS_ERR_SHAPE, "%s: 'in.timestep' has %zu values, expected %d (or 1)", d->inputs, tt->numel, B);
        goto done;
    }
    if (!(t = (float *)ms_alloc_aligned((size_t)B, sizeof(float)))) { s = ms_errorf(MS_ERR_NOMEM, "dump: out of memory"); goto done; }
    if ((s = st_to_f32(&d->in, tt, t, tt->numel))) goto done;
    for (int b = 1; b < B; b++) if (tt->numel == 1) t[b] = t[0];    /* timesteps.expand(B) */
    int64_t wc[3] = { B, -1, c->cross_attention_dim };
    if ((s = input_f32(d, "in.context", 3, wc, &ctx, &tc))) goto done;
    const int Tk = (int)tc->shape[1];
    if ((s = unet_params_init(&p, c, &d->m.unet))) goto done;
    p_ok = 1;
    UNetSizes z;
    if ((s = unet_sizes(c, B, h, w, Tk, 0, &z)) || (s = need_arena(d, z.scratch_bytes)) ||
        (s = arena_init(&acts, z.acts_bytes)))
        goto done;
    if ((s = unet_acts_init(&a, c, B, h, w, Tk, 0, &acts, &d->ar))) goto done;
    a_ok = 1;
    int64_t es[4] = { B, c->out_channels, h, w };
    if (!(eps = add_output(d, "unet.eps", 4, es))) { s = MS_ERR_NOMEM; goto done; }
    if ((s = unet_forward(eps, &a, x, t, ctx, NULL, NULL, &p, NULL))) goto done;

    if ((ad[0].present || ad[1].present) && st_find(&d->in, "in.adapter_scale")) {
        const StTensor *ts = st_find(&d->in, "in.adapter_scale");
        float sc;
        if (ts->numel != 1) { s = ms_errorf(MS_ERR_SHAPE, "%s: 'in.adapter_scale' must be a scalar", d->inputs); goto done; }
        if ((s = st_to_f32(&d->in, ts, &sc, 1))) goto done;
        for (int i = 0; i < c->n_blocks; i++) {
            for (int k = 0; k < 2; k++) {
                if (!ad[k].present) continue;
                if (i >= ad[k].n || ad[k].shape[i][1] != c->block_out_channels[i] || ad[k].shape[i][2] != a.lh[i] ||
                    ad[k].shape[i][3] != a.lw[i] || (ad[k].shape[i][0] != 1 && ad[k].shape[i][0] != B)) {
                    char sh[96];
                    s = ms_errorf(MS_ERR_SHAPE, "dump: adapter.%s.feat%d %s does not fit UNet block %d (%d x %d x %d, batch %d)",
                                  ADAPTER_NAME[k], i, ms_shape_str(sh, sizeof sh, 4, ad[k].shape[i]), i,
                                  c->block_out_channels[i], a.lh[i], a.lw[i], B);
                    goto done;
                }
                const size_t per = (size_t)c->block_out_channels[i] * a.lh[i] * a.lw[i];
                if (!res[i]) {
                    if (!(res[i] = (float *)ms_alloc_aligned(per * B, sizeof(float)))) { s = ms_errorf(MS_ERR_NOMEM, "dump: out of memory"); goto done; }
                    memset(res[i], 0, per * B * sizeof(float));
                }
                for (int b = 0; b < B; b++) {      /* v * scale, then .repeat(B, 1, 1, 1) */
                    const float *f = ad[k].feat[i] + (ad[k].shape[i][0] == 1 ? 0 : (size_t)b * per);
                    float *r = res[i] + (size_t)b * per;
                    for (size_t j = 0; j < per; j++) r[j] += f[j] * sc;
                }
            }
        }
        float *ea = add_output(d, "unet_adapter.eps", 4, es);
        if (!ea) { s = MS_ERR_NOMEM; goto done; }
        s = unet_forward(ea, &a, x, t, ctx, NULL, (const float *const *)res, &p, NULL);
    }
done:
    if (a_ok) unet_acts_free(&a);
    if (p_ok) unet_params_free(&p);
    arena_free(&acts);
    for (int i = 0; i < MS_MAX_BLOCKS; i++) ms_free_aligned(res[i]);
    ms_free_aligned(x); ms_free_aligned(t); ms_free_aligned(ctx); ms_free_aligned(scale);
    return s;
}

static MsStatus dump_run(Dump *d) {
    MsStatus s;
    AdapterOut ad[2];
    memset(ad, 0, sizeof ad);
    if ((s = st_open(&d->in, d->inputs))) return s;
    for (size_t i = 0; i < d->in.count; i++) {
        size_t k = 0;
        while (k < sizeof KNOWN / sizeof KNOWN[0] && strcmp(KNOWN[k], d->in.tensors[i].name)) k++;
        if (k == sizeof KNOWN / sizeof KNOWN[0])
            fprintf(stderr, "mixshow dump: %s: ignoring unknown input '%s'\n", d->inputs, d->in.tensors[i].name);
    }
    if ((s = dump_vae(d))) return s;
    for (int k = 0; k < 2; k++)
        if ((s = dump_adapter(d, k, &ad[k]))) return s;
    if ((s = dump_text(d))) return s;
    if ((s = dump_unet(d, ad))) return s;
    if (d->n_out == 0) return ms_errorf(MS_ERR_ARG, "%s: no known inputs (see mixshow dump --help)", d->inputs);
    char ver[64];
    snprintf(ver, sizeof ver, "mixshow %s", MS_VERSION);
    const char *meta[6] = { "producer", ver, "inputs", d->inputs, "model", d->model ? d->model : "" };
    return st_write(d->out, d->out_e, (size_t)d->n_out, meta, 3);
}

int cmd_dump(int argc, char **argv) {
    Dump *d = (Dump *)calloc(1, sizeof *d);
    if (!d) { fprintf(stderr, "mixshow dump: out of memory\n"); return 1; }
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (!strcmp(a, "--help") || !strcmp(a, "-h")) { dump_usage(stdout); free(d); return 0; }
        const char **dst = !strcmp(a, "--model") ? &d->model : !strcmp(a, "--config") ? &d->config
                         : !strcmp(a, "--inputs") ? &d->inputs
                         : !strcmp(a, "--out") ? &d->out : !strcmp(a, "--adapter-sketch") ? &d->adapter_dir[0]
                         : !strcmp(a, "--adapter-openpose") ? &d->adapter_dir[1] : NULL;
        if (!dst) { fprintf(stderr, "mixshow dump: unknown option '%s'\n\n", a); dump_usage(stderr); free(d); return 2; }
        if (!v) { fprintf(stderr, "mixshow dump: %s needs a value\n", a); free(d); return 2; }
        *dst = argv[++i];
    }
    if (!d->inputs || !d->out) { fprintf(stderr, "mixshow dump: --inputs and --out are required\n\n"); dump_usage(stderr); free(d); return 2; }
    MsStatus s = dump_run(d);
    if (s) fprintf(stderr, "mixshow dump: %s\n", ms_last_error());
    else fprintf(stderr, "mixshow dump: wrote %d tensors to %s\n", d->n_out, d->out);
    for (int i = 0; i < d->n_out; i++) ms_free_aligned(d->out_buf[i]);
    st_close(&d->in);
    if (d->model_loaded) ms_model_free(&d->m);
    arena_free(&d->ar);
    free(d);
    return s ? 1 : 0;
}
