/* tests/test_pipeline.c — the text-to-image pipeline (mixshow.c ms_txt2img), `mixshow sample`,
 * `mixshow dump` and the PIL Lanczos resize, against tests/data/pipeline_golden.safetensors
 * (tools/ref/gen_pipeline_golden.py: diffusers 0.19.3 UNet/VAE/T2I-Adapter/schedulers and HF
 * CLIPTextModel + CLIPTokenizer on the tiny model, the StableDiffusionPipeline loop, torch f32).
 *
 *   full CFG sampling loops (DPM-Solver++ and DDIM, 10 steps, 64x48; batch 2; T2I-Adapter):
 *     latents after every step rel-L2 <= 1e-4, decoded image, uint8 pixels max diff <= 1
 *   `mixshow sample` end to end: PNG on disk == golden pixels (max diff <= 1)
 *   `mixshow dump` end to end: inputs written with st_write, outputs read back (rel-L2 <= 1e-5)
 *   ms_image_resize_lanczos == Pillow 9.4 Image.resize(LANCZOS), bit for bit
 */
#include "test.h"

#include "tools/tools.h"

#define MODEL "models/tiny-sd"

static StFile G;

static float *load(const char *key, size_t n) {
    float *x = NULL;
    size_t got = 0;
    if (st_load_f32(&G, key, &x, &got) || got != n) {
        check(0, "golden %s (%zu values, got %zu): %s", key, n, got, ms_last_error());
        if (x) ms_free_aligned(x);
        return NULL;
    }
    return x;
}

typedef struct { float *traj; size_t n; int steps; } Rec;

static void record(void *ctx, int step, int n_steps, const float *latents, size_t n) {
    Rec *r = (Rec *)ctx;
    if (step < r->steps && n == r->n && n_steps == r->steps) memcpy(r->traj + (size_t)step * n, latents, n * sizeof(float));
}

/* uint8 comparison: max abs difference and how many values differ */
static int check_u8(const char *what, const uint8_t *got, const StTensor *want, size_t n) {
    if (!want || want->numel != n || want->dtype != ST_U8) return check(0, "%s: golden pixels missing", what);
    int maxd = 0;
    size_t ndiff = 0;
    for (size_t i = 0; i < n; i++) {
        int d = abs((int)got[i] - (int)want->data[i]);
        if (d > maxd) maxd = d;
        ndiff += d != 0;
    }
    return check(maxd <= 1, "%-40s uint8 max diff %d (tol 1), %zu of %zu values differ", what, maxd, ndiff, n);
}

static MsSchedKind kind_of(const char *s) {
    return !strcmp(s, "ddim") ? MS_SCHED_DDIM : !strcmp(s, "euler") ? MS_SCHED_EULER : !strcmp(s, "ddpm") ? MS_SCHED_DDPM
                                                                                                         : MS_SCHED_DPMSOLVER;
}

static void test_runs(const MsModel *m, const ClipTokenizer *tok, const JsonValue *runs) {
    for (size_t r = 0; r < json_len(runs); r++) {
        const JsonValue *j = json_at(runs, r);
        const char *name = json_get_string(j, "name", "?");
        const JsonValue *neg = json_get(j, "negative"), *asc = json_get(j, "adapter_scale");
        MsTxt2ImgOptions o;
        memset(&o, 0, sizeof o);
        o.prompt = json_get_string(j, "prompt", "");
        o.negative = neg && neg->type == JSON_STRING ? neg->str : NULL;
        o.width = (int)json_get_int(j, "width", 0);
        o.height = (int)json_get_int(j, "height", 0);
        o.steps = (int)json_get_int(j, "steps", 0);
        o.batch = (int)json_get_int(j, "batch", 1);
        o.guidance_scale = (float)json_get_number(j, "cfg", 1.0);
        o.seed = (uint64_t)json_get_int(j, "seed", 0);
        o.sampler = kind_of(json_get_string(j, "sampler", "dpm"));
        o.torch_cpu = MS_TORCH_CPU_AVX2;
        const int B = o.batch, h = o.height / 8, w = o.width / 8;
        const size_t nl = (size_t)B * 4 * h * w, ni = (size_t)B * 3 * o.height * o.width;
        char key[96], what[96];
        AdapterConfig ac;
        MsParamTable at;
        AdapterParams ap;
        int have_ad = 0;
        float *cond = NULL;
        if (asc && asc->type == JSON_NUMBER) {
            if (!check(ms_adapter_load(MODEL "/t2iadapter_sketch", NULL, &ac, &at) == MS_OK, "load sketch adapter: %s", ms_last_error()))
                continue;
            have_ad = 1;
            snprintf(key, sizeof key, "%s/cond", name);
            cond = load(key, (size_t)o.height * o.width);
            if (!cond || !check(adapter_params_init(&ap, &ac, &at) == MS_OK, "adapter params: %s", ms_last_error())) {
                ms_param_table_free(&at); ms_free_aligned(cond); continue;
            }
            o.adapter = &ap;
            o.cond = cond;
            o.adapter_scale = (float)asc->number;
        }
        Rec rec = { test_zeros(nl * o.steps), nl, o.steps };
        o.progress = record;
        o.progress_ctx = &rec;
        float *img = test_zeros(ni);
        uint8_t *px = (uint8_t *)malloc(ni);
        double t0 = ms_time();
        MsStatus s = ms_txt2img(m, tok, &o, img);
        double dt = ms_time() - t0;
        check(s == MS_OK, "%s: ms_txt2img %dx%d batch %d, %d steps: %s (%.2f s)", name, o.width, o.height, B, o.steps,
              ms_last_error(), dt);
        snprintf(key, sizeof key, "%s/latents", name);
        float *want = load(key, nl * o.steps);
        if (want && s == MS_OK) {
            double worst = 0.0;
            int worst_i = 0, ok = 1;
            for (int i = 0; i < o.steps; i++) {
                TestErr e = test_err_f(rec.traj + (size_t)i * nl, want + (size_t)i * nl, nl);
                if (!(e.rel_l2 <= worst)) { worst = e.rel_l2; worst_i = i; }
                if (!(e.rel_l2 <= 1e-4)) {
                    snprintf(what, sizeof what, "%s latents after step %d", name, i);
                    ok = check_close(what, rec.traj + (size_t)i * nl, want + (size_t)i * nl, nl, 1e-4, 0) && ok;
                }
            }
            check(ok, "%-40s worst rel_l2 %.3e at step %d (tol 1e-4)", name, worst, worst_i);
            printf("  ...  %s: latents rel_l2 step 0 %.2e, last %.2e\n", name,
                   test_err_f(rec.traj, want, nl).rel_l2,
                   test_err_f(rec.traj + (size_t)(o.steps - 1) * nl, want + (size_t)(o.steps - 1) * nl, nl).rel_l2);
        }
        snprintf(key, sizeof key, "%s/image", name);
        float *wimg = load(key, ni);
        snprintf(what, sizeof what, "%s decoded image", name);
        if (wimg && s == MS_OK) check_close(what, img, wimg, ni, 1e-4, 0);
        snprintf(key, sizeof key, "%s/u8", name);
        const size_t per = ni / B;
        for (int b = 0; b < B && s == MS_OK; b++) ms_image_to_u8(px + per * b, img + per * b, 3, o.height, o.width);
        snprintf(what, sizeof what, "%s image uint8", name);
        if (s == MS_OK) check_u8(what, px, st_find(&G, key), ni);
        ms_free_aligned(want); ms_free_aligned(wimg); ms_free_aligned(rec.traj); ms_free_aligned(img); free(px);
        ms_free_aligned(cond);
        if (have_ad) ms_param_table_free(&at);
    }
}

/* `mixshow sample` writes the dpm run's image: same pixels as diffusers' PIL image. */
static void test_cmd_sample(const JsonValue *runs) {
    const JsonValue *j = json_at(runs, 0);
    char steps[16], seed[32], cfg[32], W[16], H[16];
    snprintf(steps, sizeof steps, "%d", (int)json_get_int(j, "steps", 0));
    snprintf(seed, sizeof seed, "%lld", (long long)json_get_int(j, "seed", 0));
    snprintf(cfg, sizeof cfg, "%.17g", json_get_number(j, "cfg", 0));
    snprintf(W, sizeof W, "%d", (int)json_get_int(j, "width", 0));
    snprintf(H, sizeof H, "%d", (int)json_get_int(j, "height", 0));
    const char *out = "build/test_pipeline_sample.png";
    char *argv[] = { "sample", "--model", MODEL, "-p", (char *)json_get_string(j, "prompt", ""),
                     "-n", (char *)json_get_string(j, "negative", ""), "--steps", steps, "--seed", seed,
                     "--cfg", cfg, "-W", W, "-H", H, "--sampler", "dpm++2m", "-o", (char *)out };
    int rc = cmd_sample((int)(sizeof argv / sizeof argv[0]), argv);
    check(rc == 0, "mixshow sample (dpm run) exit status %d", rc);
    MsImage img;
    if (rc == 0 && check(ms_image_read(out, 3, &img) == MS_OK, "read %s: %s", out, ms_last_error())) {
        check_u8("mixshow sample PNG vs diffusers pixels", (const uint8_t *)img.data, st_find(&G, "dpm/u8"),
                 (size_t)img.w * img.h * 3);
        ms_image_free(&img);
    }
    remove(out);
    /* bad options: an error status, no crash */
    char *bad1[] = { "sample", "--model", MODEL, "-p", "x", "-W", "60", "-o", (char *)out };
    check(cmd_sample(9, bad1) != 0, "sample -W 60 (not a multiple of 8) fails");
    char *bad2[] = { "sample", "--model", MODEL, "-p", "x", "--sampler", "pndm", "-o", (char *)out };
    check(cmd_sample(9, bad2) != 0, "sample --sampler pndm fails");
    char *bad3[] = { "sample", "--model", "/nonexistent", "-p", "x", "-o", (char *)out };
    check(cmd_sample(7, bad3) != 0, "sample --model /nonexistent fails");
}

/* `mixshow dump` end to end. */
static void test_dump(void) {
    static const char *const ins[] = { "in.latent", "in.timestep", "in.context", "in.cond_sketch", "in.adapter_scale",
                                       "in.image", "in.vae_noise", "in.dec_latent", "in.input_ids" };
    static const char *const outs[] = { "unet.eps", "adapter.sketch.feat0", "adapter.sketch.feat1", "adapter.sketch.feat2",
                                        "adapter.sketch.feat3", "unet_adapter.eps", "vae.enc.mean", "vae.enc.logvar",
                                        "vae.enc.std", "vae.enc.sample", "vae.enc.latent", "vae.dec.image", "text.hidden" };
    const size_t n_in = sizeof ins / sizeof ins[0];
    StEntry e[16];
    void *buf[16] = { 0 };     /* float inputs, or int64 ids */
    float bogus[3] = { 1, 2, 3 };
    size_t k = 0;
    for (size_t i = 0; i < n_in; i++) {
        char key[64];
        snprintf(key, sizeof key, "dump/%s", ins[i]);
        const StTensor *t = st_find(&G, key);
        if (!check(t != NULL, "golden %s", key)) return;
        memset(&e[k], 0, sizeof e[k]);
        e[k].name = ins[i];
        e[k].dtype = t->dtype;
        e[k].ndim = t->ndim;
        memcpy(e[k].shape, t->shape, sizeof t->shape);
        if (t->dtype == ST_F32) {
            buf[k] = ms_alloc_aligned(t->numel ? t->numel : 1, sizeof(float));
            st_to_f32(&G, t, buf[k], t->numel);
            e[k].f32 = buf[k];
        } else {                     /* I64: st_write takes host-order values, the file has LE */
            int64_t *v = (int64_t *)ms_alloc_aligned(t->numel ? t->numel : 1, sizeof(int64_t));
            for (size_t q = 0; q < t->numel; q++) {
                uint64_t u = 0;
                for (int b = 7; b >= 0; b--) u = u << 8 | t->data[8 * q + (size_t)b];
                v[q] = (int64_t)u;
            }
            buf[k] = v;
            e[k].raw = v;
        }
        k++;
    }
    memset(&e[k], 0, sizeof e[k]);
    e[k].name = "in.bogus"; e[k].dtype = ST_F32; e[k].ndim = 1; e[k].shape[0] = 3; e[k].f32 = bogus;
    k++;
    const char *in_path = "build/test_pipeline_dump_in.safetensors", *out_path = "build/test_pipeline_dump_out.safetensors";
    MsStatus s = st_write(in_path, e, k, NULL, 0);
    check(s == MS_OK, "write dump inputs: %s", ms_last_error());
    char *argv[] = { "dump", "--model", MODEL, "--inputs", (char *)in_path, "--out", (char *)out_path };
    double t0 = ms_time();
    int rc = cmd_dump(7, argv);
    check(rc == 0, "mixshow dump exit status %d (%.2f s)", rc, ms_time() - t0);
    StFile o;
    if (rc == 0 && check(st_open(&o, out_path) == MS_OK, "open %s: %s", out_path, ms_last_error())) {
        check(o.count == sizeof outs / sizeof outs[0], "dump wrote %zu tensors (expect %zu)", o.count, sizeof outs / sizeof outs[0]);
        for (size_t i = 0; i < sizeof outs / sizeof outs[0]; i++) {
            char key[64];
            snprintf(key, sizeof key, "dump/%s", outs[i]);
            const StTensor *w = st_find(&G, key), *g = st_find(&o, outs[i]);
            if (!check(w && g && w->numel == g->numel && w->ndim == g->ndim && !memcmp(w->shape, g->shape, sizeof w->shape),
                       "dump output %s present with the golden's shape", outs[i]))
                continue;
            float *gv = (float *)ms_alloc_aligned(g->numel, sizeof(float)), *wv = load(key, w->numel);
            st_to_f32(&o, g, gv, g->numel);
            snprintf(key, sizeof key, "dump %s", outs[i]);
            if (wv) check_close(key, gv, wv, g->numel, 1e-5, 0);
            ms_free_aligned(gv); ms_free_aligned(wv);
        }
        st_close(&o);
    }
    /* errors: a shape that does not fit, no known inputs */
    e[0].shape[1] = 3;                                  /* in.latent with 3 channels */
    st_write(in_path, e, 3, NULL, 0);                   /* in.latent, in.timestep, in.context */
    check(cmd_dump(7, argv) != 0, "dump in.latent with 3 channels -> error: %s", ms_last_error());
    st_write(in_path, &e[k - 1], 1, NULL, 0);
    check(cmd_dump(7, argv) != 0, "dump with only unknown inputs -> error");
    remove(in_path); remove(out_path);
    for (size_t i = 0; i < 16; i++) ms_free_aligned(buf[i]);
}

static void test_resize(void) {
    static const char *const names[] = { "L_96x80_to_64x48", "RGB_40x30_to_64x48", "RGB_200x150_to_64x64", "L_64x48_to_64x96" };
    for (size_t i = 0; i < sizeof names / sizeof names[0]; i++) {
        char ki[96], ko[96];
        snprintf(ki, sizeof ki, "resize/%s/in", names[i]);
        snprintf(ko, sizeof ko, "resize/%s/out", names[i]);
        const StTensor *a = st_find(&G, ki), *b = st_find(&G, ko);
        if (!check(a && b && a->ndim == 3 && b->ndim == 3, "golden %s", ki)) continue;
        const int h = (int)a->shape[0], w = (int)a->shape[1], C = (int)a->shape[2], oh = (int)b->shape[0], ow = (int)b->shape[1];
        uint8_t *out = (uint8_t *)malloc(b->numel);
        MsStatus s = ms_image_resize_lanczos(out, ow, oh, a->data, w, h, C);
        size_t ndiff = 0;
        for (size_t j = 0; j < b->numel; j++) ndiff += out[j] != b->data[j];
        check(s == MS_OK && ndiff == 0, "resize %-22s == PIL LANCZOS bit for bit (%zu of %zu differ)", names[i], ndiff, b->numel);
        free(out);
    }
    uint8_t px[4];
    check(ms_image_resize_lanczos(px, 0, 2, px, 2, 2, 1) == MS_ERR_ARG, "resize to width 0 -> %s", ms_last_error());
}

/* postprocess rounding: exact cases of round(clamp(x/2 + 0.5) * 255), half to even */
static void test_to_u8(void) {
    /* expected values from torch/numpy: (x/2+0.5).clamp(0,1) * 255 = 0 255 127.5 255 0 nan 0.49999997,
     * .round() -> 0 255 128 (half to even) 255 0 (nan: 0 here) 0 */
    float img[7] = { -1.0f, 1.0f, 0.0f, 3.0f, -7.0f, NAN, 2.0f * (0.5f / 255.0f) - 1.0f };
    uint8_t out[7];
    ms_image_to_u8(out, img, 1, 1, 7);
    check(out[0] == 0 && out[1] == 255 && out[2] == 128 && out[3] == 255 && out[4] == 0 && out[5] == 0 && out[6] == 0,
          "ms_image_to_u8: -1 1 0 3 -7 nan 0.5/255 -> %d %d %d %d %d %d %d (expect 0 255 128 255 0 0 0)", out[0], out[1],
          out[2], out[3], out[4], out[5], out[6]);
}

int main(void) {
    MsModel m;
    ClipTokenizer tok;
    JsonValue *runs = NULL;
    double t0 = ms_time();
    if (st_open(&G, "tests/data/pipeline_golden.safetensors")) {
        check(0, "open golden: %s", ms_last_error());
        return test_summary("test_pipeline");
    }
    const char *rj = st_meta(&G, "runs");
    if (!rj || json_parse(rj, strlen(rj), "pipeline_golden runs", &runs) || runs->type != JSON_ARRAY) {
        check(0, "golden metadata 'runs': %s", ms_last_error());
        return test_summary("test_pipeline");
    }
    test_resize();
    test_to_u8();
    if (ms_model_load(MODEL, NULL, &m) || ms_clip_tokenizer_load(MODEL, &tok)) {
        check(0, "load %s: %s", MODEL, ms_last_error());
        return test_summary("test_pipeline");
    }
    ms_set_threads(1);
    double t1 = ms_time();
    test_runs(&m, &tok, runs);
    double t2 = ms_time();
    test_cmd_sample(runs);
    double t3 = ms_time();
    test_dump();
    printf("  time: load %.2f s, sampling runs %.2f s, mixshow sample %.2f s, dump %.2f s\n", t1 - t0, t2 - t1, t3 - t2,
           ms_time() - t3);
    json_free(runs);
    clip_tokenizer_free(&tok);
    ms_model_free(&m);
    st_close(&G);
    ops_scratch_free();
    ms_gemm_scratch_free();
    return test_summary("test_pipeline");
}
