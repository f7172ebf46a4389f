/* tests/test_vae.c — models/vae.c (AutoencoderKL) and models/adapter.c (T2I-Adapter) against
 * diffusers 0.19.3 on the tiny random-weight model.
 *
 * tests/data/vae_golden.safetensors and adapter_golden.safetensors come from
 * tools/ref/gen_vae_golden.py: torch float32 results ("out/...") and the same computed in
 * float64 ("f64/..."). Each comparison prints our distance to the f64 result next to torch
 * float32's own, so the tolerance (rel-L2 1e-5) can be judged against what f32 can reach.
 */
#include "test.h"

#include "tools/tools.h"

static StFile VG, AG;

static float *load(const StFile *f, const char *key, size_t n) {
    float *x = NULL;
    size_t got = 0;
    if (st_load_f32(f, key, &x, &got) || got != n) {
        check(0, "golden %s (%zu values): %s", key, n, ms_last_error());
        if (x) ms_free_aligned(x);
        return NULL;
    }
    return x;
}

/* ours vs torch f32 golden (the tolerance), and both vs torch f64 (information). */
static void compare(const StFile *f, const char *what, const float *got, const char *name, size_t n, double tol) {
    char k32[96], k64[96];
    snprintf(k32, sizeof k32, "out/%s", name);
    snprintf(k64, sizeof k64, "f64/%s", name);
    float *w = load(f, k32, n), *w64 = load(f, k64, n);
    if (!w || !w64) { ms_free_aligned(w); ms_free_aligned(w64); return; }
    TestErr a = test_err_f(got, w64, n), b = test_err_f(w, w64, n);
    TestErr e = test_err_f(got, w, n);
    int ok = check_close(what, got, w, n, tol, 0);
    if (ok && !test_is_verbose())
        printf("  ok   %-38s rel_l2 %.2e (tol %.0e); vs f64: ours %.2e, torch f32 %.2e\n", what, e.rel_l2, tol,
               a.rel_l2, b.rel_l2);
    else printf("      vs f64: ours %.2e, torch f32 %.2e\n", a.rel_l2, b.rel_l2);
    ms_free_aligned(w);
    ms_free_aligned(w64);
}

static void test_vae(const MsModel *m, Arena *ar) {
    VaeParams *p = (VaeParams *)malloc(sizeof *p);
    if (!p) { printf("out of memory\n"); exit(2); }
    MsStatus s = vae_params_init(p, &m->vae_config, &m->vae);
    if (!check(s == MS_OK, "vae_params_init: %s", ms_last_error())) { free(p); return; }
    const int B = 2, H = 48, W = 64, L = 4, h = H / 8, w = W / 8;
    const size_t ni = (size_t)B * 3 * H * W, nl = (size_t)B * L * h * w;
    float *x = load(&VG, "in/image", ni), *noise = load(&VG, "in/noise", nl), *lat = load(&VG, "in/latents", nl);
    if (!x || !noise || !lat) { free(p); return; }
    float *mean = test_zeros(nl), *logvar = test_zeros(nl), *sd = test_zeros(nl), *smp = test_zeros(nl);
    float *lz = test_zeros(nl), *img = test_zeros(ni), *img2 = test_zeros(ni);

    s = vae_encode(p, ar, mean, logvar, x, B, H, W);
    check(s == MS_OK && ar->used == 0, "vae_encode 2x3x48x64: %s", ms_last_error());
    compare(&VG, "encode mean (2,4,6,8)", mean, "mean", nl, 1e-5);
    compare(&VG, "encode logvar (clamped)", logvar, "logvar", nl, 1e-5);
    vae_posterior_sample(smp, sd, mean, logvar, noise, nl, 1.0f);
    vae_posterior_sample(lz, NULL, mean, logvar, noise, nl, m->vae_config.scaling_factor);
    compare(&VG, "posterior std", sd, "std", nl, 1e-5);
    compare(&VG, "posterior sample (given noise)", smp, "sample", nl, 1e-5);
    compare(&VG, "latents = sample * 0.18215", lz, "latents", nl, 1e-5);

    s = vae_decode(p, ar, img, lat, B, h, w);
    check(s == MS_OK && ar->used == 0, "vae_decode 2x4x6x8: %s", ms_last_error());
    compare(&VG, "decode(latents / sf) (2,3,48,64)", img, "decoded", ni, 1e-5);

    /* 1 vs 2 threads, bit for bit */
    {   /* (the rest of the test runs on one thread: OpenMP barriers crawl on a loaded machine) */
        float *mean1 = test_zeros(nl), *lv1 = test_zeros(nl);
        ms_set_threads(1);
        vae_decode(p, ar, img2, lat, B, h, w);
        vae_encode(p, ar, mean1, lv1, x, B, H, W);
        ms_set_threads(2);
        vae_decode(p, ar, img, lat, B, h, w);
        vae_encode(p, ar, mean, logvar, x, B, H, W);
        ms_set_threads(1);
        check_bitwise("vae_decode 1 vs 2 threads", img2, img, ni);
        check_bitwise("vae_encode mean 1 vs 2 threads", mean1, mean, nl);
        check_bitwise("vae_encode logvar 1 vs 2 threads", lv1, logvar, nl);
        ms_free_aligned(mean1); ms_free_aligned(lv1);
    }

    /* tiled decode / encode: tiles of 64 px = 8 latents (the tiny config's sample_size) */
    {
        const int th = 14, tw = 20, TH = 112, TW = 160;
        const size_t ntl = (size_t)L * th * tw, nti = (size_t)3 * TH * TW, ntm = (size_t)L * (TH / 8) * (TW / 8);
        float *tl = load(&VG, "in/tile_latents", ntl), *ti = load(&VG, "in/tile_image", nti);
        float *out = test_zeros(nti), *tm = test_zeros(ntm), *tv = test_zeros(ntm);
        if (tl && ti) {
            s = vae_decode_tiled(p, ar, out, tl, 1, th, tw, 0);
            check(s == MS_OK && ar->used == 0, "vae_decode_tiled 1x4x14x20: %s", ms_last_error());
            compare(&VG, "tiled decode (3x4 tiles, cut edges)", out, "tiled_decoded", nti, 1e-5);
            s = vae_encode_tiled(p, ar, tm, tv, ti, 1, TH, TW, 0);
            check(s == MS_OK && ar->used == 0, "vae_encode_tiled 1x3x112x160: %s", ms_last_error());
            compare(&VG, "tiled encode mean", tm, "tiled_mean", ntm, 1e-5);
            compare(&VG, "tiled encode logvar", tv, "tiled_logvar", ntm, 1e-5);
            /* the untiled decode differs (seams): the tiling really happened */
            float *full = test_zeros(nti);
            vae_decode(p, ar, full, tl, 1, th, tw);
            TestErr e = test_err_f(out, full, nti);
            check(e.rel_l2 > 1e-3, "tiled decode differs from untiled (rel %.2e)", e.rel_l2);
            ms_free_aligned(full);
        }
        ms_free_aligned(tl); ms_free_aligned(ti); ms_free_aligned(out); ms_free_aligned(tm); ms_free_aligned(tv);
    }

    /* bad sizes and configs: clear statuses, nothing written past the arena */
    s = vae_encode(p, ar, mean, logvar, x, B, 50, 64);
    check(s == MS_ERR_SHAPE, "encode 50x64 -> shape error: %s", ms_last_error());
    s = vae_decode(p, ar, img, lat, 0, h, w);
    check(s == MS_ERR_SHAPE, "decode batch 0 -> shape error: %s", ms_last_error());
    {
        Arena small;
        arena_init(&small, 4096);
        s = vae_decode(p, &small, img, lat, B, h, w);
        check(s == MS_ERR_NOMEM && small.used == 0, "decode in a 4 KiB arena -> out of memory: %s", ms_last_error());
        arena_free(&small);
    }
    {
        VaeConfig bad = m->vae_config;
        bad.norm_num_groups = 7;
        VaeParams *q = (VaeParams *)malloc(sizeof *q);
        s = vae_params_init(q, &bad, &m->vae);
        check(s == MS_ERR_ARG, "norm_num_groups 7 -> bad argument: %s", ms_last_error());
        bad = m->vae_config;
        bad.layers_per_block = MS_VAE_MAX_LAYERS + 1;
        s = vae_params_init(q, &bad, &m->vae);
        check(s == MS_ERR_UNSUPPORTED, "layers_per_block %d -> unsupported: %s", bad.layers_per_block, ms_last_error());
        MsParamTable empty = { 0 };
        s = vae_params_init(q, &m->vae_config, &empty);
        check(s == MS_ERR_FORMAT, "empty table -> format error: %s", ms_last_error());
        free(q);
    }
    {
        VaeSizes z;
        check(vae_sizes(&m->vae_config, 48, 64, 3, &z) == MS_ERR_UNSUPPORTED, "tile of 3 px -> unsupported: %s",
              ms_last_error());
    }
    ms_free_aligned(x); ms_free_aligned(noise); ms_free_aligned(lat);
    ms_free_aligned(mean); ms_free_aligned(logvar); ms_free_aligned(sd); ms_free_aligned(smp);
    ms_free_aligned(lz); ms_free_aligned(img); ms_free_aligned(img2);
    free(p);
}

/* The size plan for SD 1.5 at 512x512 (no weights needed): the decoder's peak is the first
 * resnet of the last up block, 256 -> 128 channels at 512x512: input (256) + shortcut (128) +
 * conv1 output (128) channels = 512 MiB. */
static void test_sizes(void) {
    VaeConfig c;
    VaeSizes z;
    ms_vae_config_sd15(&c);
    MsStatus s = vae_sizes(&c, 512, 512, 0, &z);
    const size_t MiB = (size_t)1 << 20;
    check(s == MS_OK && z.decode_act_bytes == 512 * MiB, "SD 1.5 512x512 decode activations %zu MiB (expect 512)",
          z.decode_act_bytes / MiB);
    printf("      SD 1.5 512x512 scratch: decode %.1f MiB, encode %.1f MiB, tiled (512 px tiles) decode %.1f MiB\n",
           (double)z.decode_bytes / MiB, (double)z.encode_bytes / MiB, (double)z.decode_tiled_bytes / MiB);
    s = vae_sizes(&c, 1024, 1536, 0, &z);
    check(s == MS_OK && z.decode_tiled_bytes < z.decode_bytes / 3, "1024x1536 tiled decode %.0f MiB < untiled %.0f MiB / 3",
          (double)z.decode_tiled_bytes / MiB, (double)z.decode_bytes / MiB);
}

static void test_adapter(const char *dir, Arena *ar) {
    static const char *names[2] = { "sketch", "openpose" };
    static const int shapes[2][4] = { { 1, 1, 128, 192 }, { 2, 3, 64, 128 } };
    for (int k = 0; k < 2; k++) {
        char path[1200], what[96];
        AdapterConfig c;
        MsParamTable t;
        AdapterParams p;
        snprintf(path, sizeof path, "%s/t2iadapter_%s", dir, names[k]);
        MsStatus s = ms_adapter_load(path, NULL, &c, &t);
        if (!check(s == MS_OK, "load %s: %s", path, ms_last_error())) continue;
        s = adapter_params_init(&p, &c, &t);
        check(s == MS_OK, "adapter_params_init %s: %s", names[k], ms_last_error());
        const int N = shapes[k][0], Ci = shapes[k][1], H = shapes[k][2], W = shapes[k][3];
        size_t bytes, nf[MS_MAX_BLOCKS];
        adapter_sizes(&c, N, H, W, &bytes, nf);
        snprintf(what, sizeof what, "in/%s", names[k]);
        float *cond = load(&AG, what, (size_t)N * Ci * H * W);
        float *f[MS_MAX_BLOCKS], *f1[MS_MAX_BLOCKS];
        for (int i = 0; i < c.n_channels; i++) { f[i] = test_zeros(nf[i]); f1[i] = test_zeros(nf[i]); }
        if (cond) {
            s = adapter_forward(&p, ar, f, cond, N, H, W);
            check(s == MS_OK && ar->used == 0, "adapter_forward %s %dx%dx%dx%d: %s", names[k], N, Ci, H, W, ms_last_error());
            for (int i = 0; i < c.n_channels; i++) {
                char key[64], lab[64];
                snprintf(key, sizeof key, "%s/%d", names[k], i);
                snprintf(lab, sizeof lab, "adapter %s feature %d", names[k], i);
                compare(&AG, lab, f[i], key, nf[i], 1e-5);
            }
            ms_set_threads(2);
            adapter_forward(&p, ar, f1, cond, N, H, W);
            ms_set_threads(1);
            for (int i = 0; i < c.n_channels; i++) {
                snprintf(what, sizeof what, "adapter %s feature %d 1 vs 2 threads", names[k], i);
                check_bitwise(what, f1[i], f[i], nf[i]);
            }
            s = adapter_forward(&p, ar, f, cond, N, H - 8, W);
            check(s == MS_ERR_SHAPE, "adapter condition %d x %d -> shape error: %s", H - 8, W, ms_last_error());
        }
        for (int i = 0; i < c.n_channels; i++) { ms_free_aligned(f[i]); ms_free_aligned(f1[i]); }
        ms_free_aligned(cond);
        ms_param_table_free(&t);
    }
}

int main(void) {
    char dir[1024];
    MsModel m;
    Arena ar;
    snprintf(dir, sizeof dir, "%s", test_tiny_dir());
    double t0 = ms_time();
    test_sizes();
    if (st_open(&VG, "tests/data/vae_golden.safetensors") || st_open(&AG, "tests/data/adapter_golden.safetensors")) {
        check(0, "open goldens: %s", ms_last_error());
        return test_summary("test_vae");
    }
    if (ms_model_load(dir, NULL, &m)) {
        printf("  skip: %s (%s)\n", dir, ms_last_error());
        return test_summary("test_vae");
    }
    VaeSizes z;
    vae_sizes(&m.vae_config, 112, 160, 0, &z);
    size_t cap = z.encode_tiled_bytes;
    if (z.decode_bytes > cap) cap = z.decode_bytes;
    if (z.decode_tiled_bytes > cap) cap = z.decode_tiled_bytes;
    if (z.encode_bytes > cap) cap = z.encode_bytes;
    arena_init(&ar, cap + ((size_t)8 << 20));
    ms_set_threads(1);
    double t1 = ms_time();
    test_vae(&m, &ar);
    double t2 = ms_time();
    test_adapter(dir, &ar);
    printf("  time: load %.2f s, vae %.2f s, adapter %.2f s\n", t1 - t0, t2 - t1, ms_time() - t2);
    arena_free(&ar);
    ms_model_free(&m);
    st_close(&VG);
    st_close(&AG);
    ops_scratch_free();
    ms_gemm_scratch_free();
    return test_summary("test_vae");
}
