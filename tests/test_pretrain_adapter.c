/* tests/test_pretrain_adapter.c — T2I-Adapter training (issue 15): ms_adapter_train_step and
 * `mixshow pretrain --stage adapters` on a tiny config (UNet 8/16 channels in SD's order,
 * CrossAttnDownBlock2D + DownBlock2D, 1 layer, 2 heads, 4 groups; text encoder width 16, 1 layer,
 * the real CLIP tokenizer; adapters of channels 8/16, 2 resnets per level, downscale factor 8:
 * 64x64 conditions -> 8x8 latents). Checked:
 *   - one step's update == torch AdamW (ms_adamw_step per tensor, the warmed-up lr) applied to the
 *     gradient of the same draws computed here separately (text forward, adapter_forward_train,
 *     UNet forward with the features, dL/deps = 2 (eps - n) / N, unet_backward's dL/dF,
 *     adapter_backward_full): bitwise, every adapter parameter; the loss equals the mean squared
 *     error computed here; the UNet and text encoder stay as they were, bit for bit;
 *   - 1 vs 2 threads: the adapter after two steps bit-identical;
 *   - the objective falls: 30 steps on one fixed batch and draws (the optimizer descends on the
 *     adapter's parameters through the frozen UNet; numbers printed);
 *   - ms_adapter_fits_unet refuses a DownBlock2D before the last block, other channels, other
 *     level counts; the trainer refuses such a UNet;
 *   - `mixshow pretrain --stage adapters` after 5 unet-stage steps: 8 steps, then --resume of its
 *     checkpoint to 16 == the straight 16-step run (both adapters' weights bitwise, the losses of
 *     steps 9..16); a checkpoint of other options is refused, a missing DIR/model named; the folders load as diffusers
 *     T2IAdapter folders (ms_adapter_load) and `mixshow sample --adapter` draws with each;
 *   - tools/ship_world.sh on that output: the F16 model and adapters (weights the F32 ones rounded,
 *     configs kept), README, --force; samples of the F16 copy within 2 of the F32 folder's pixels;
 *     regional keypose finds DEST/t2iadapter_openpose by default. */
#include "pretrain_util.h"

static const char *const TINY_FLAGS[] = { "--channels", "8,16", "--heads", "2,2", "--groups", "4", "--layers", "1",
                                          "--text-width", "16", "--text-layers", "1", "--text-heads", "2",
                                          "--size", "64", "--batch", "2", "--scenes", "16", "--lr", "3e-3",
                                          "--warmup", "5", "--seed", "7", "--world-seed", "3", "--adapter-batch", "2",
                                          "--adapter-lr", "2e-3", "--adapter-warmup", "5", "-q" };
#define N_TINY ((int)(sizeof TINY_FLAGS / sizeof TINY_FLAGS[0]))

/* mixshow pretrain TINY_FLAGS --out dir --stage stage --steps 5 --adapter-steps n --checkpoint-every 8 or 100
 * [e0 e1 e2 e3] */
static int run_pretrain(const char *dir, const char *stage, int n, const char *e0, const char *e1, const char *e2,
                        const char *e3) {
    char st[16];
    snprintf(st, sizeof st, "%d", n);
    const char *opts[] = { "--stage", stage, "--steps", "5", "--adapter-steps", st, "--checkpoint-every", n >= 16 ? "100" : "8" };
    return pretrain_run(TINY_FLAGS, N_TINY, dir, opts, 8, e0, e1, e2, e3);
}

/* the tiny model (CrossAttnDownBlock2D first) and an adapter of channels 8/16, 2 resnets per level,
 * factor 8, that fits it */
static int tiny_adapter_model(Tiny *t) {
    if (!tiny_model(t, 1)) return 0;
    t->ac.adapter_type = MS_ADAPTER_FULL;
    t->ac.in_channels = 3; t->ac.n_channels = 2; t->ac.channels[0] = 8; t->ac.channels[1] = 16;
    t->ac.num_res_blocks = 2; t->ac.downscale_factor = 8;
    return 1;
}

/* a fresh adapter table, weights drawn from seed */
static int adapter_table(const AdapterConfig *ac, MsParamTable *w, uint64_t seed) {
    MsTorchRng g;
    ms_torch_seed(&g, seed);
    memset(w, 0, sizeof *w);
    return check(ms_param_table_adapter(ac, w) == MS_OK && ms_param_table_alloc(w, NULL) == MS_OK &&
                 (memset(w->mem, 0, w->mem_bytes), ms_pretrain_init_weights(w, &g)) == MS_OK, "adapter table: %s",
                 ms_last_error());
}

/* world scene i of seed 3 at 64x64: its keypose-like condition (3,64,64) in [0, 1] */
static void pose_cond(float *cond, int i) {
    WorldScene sc;
    uint8_t *pose = (uint8_t *)malloc(64 * 64 * 3);
    world_scene_make(3, i, &sc);
    world_render(&sc, 64, NULL, NULL, pose, NULL);
    for (int p = 0; p < 64 * 64; p++)
        for (int c = 0; c < 3; c++) cond[(size_t)c * 64 * 64 + p] = (float)pose[3 * p + c] / 255.0f;
    free(pose);
}

static void test_step_is_adamw(void) {
    Tiny t;
    MsParamTable w;
    MsPretrainConfig pc;
    MsAdapterTrainer *p = NULL;
    const int B = 2, h = 8, wl = 8, T = 77, H = 64, W = 64;
    const size_t N = (size_t)B * 4 * h * wl, nc = (size_t)3 * H * W;
    if (!tiny_adapter_model(&t) || !adapter_table(&t.ac, &w, 21)) { tiny_free(&t); return; }
    ms_pretrain_config_defaults(&pc);
    pc.warmup = 4;
    pc.lr = 2e-3;
    if (!check(ms_adapter_trainer_create(&p, &t.m, &t.tok, &t.ac, &w, &pc, B, h, wl) == MS_OK, "adapter trainer: %s",
               ms_last_error())) {
        tiny_free(&t);
        return;
    }
    unsigned char *frozen = (unsigned char *)malloc(t.m.unet.mem_bytes + t.m.text.mem_bytes);
    memcpy(frozen, t.m.unet.mem, t.m.unet.mem_bytes);
    memcpy(frozen + t.m.unet.mem_bytes, t.m.text.mem, t.m.text.mem_bytes);
    MsRng r;
    ms_rng_seed(&r, 5);
    float *lat = test_randn(&r, N, 1.0f), *cond = test_zeros((size_t)B * nc);
    pose_cond(cond, 0);
    pose_cond(cond + nc, 1);
    const char *caps[2] = { "two red circles on the left of a blue striped square, on grass", "a green star" };
    MsTorchRng g;
    ms_torch_seed(&g, 99);
    MsPretrainReport rep;
    MsStatus s = ms_adapter_train_step(p, lat, cond, caps, NULL, &g, &rep);   /* step 1 from the generator */
    check(s == MS_OK, "adapter step 1: %s", s ? ms_last_error() : "ok");
    /* the state before step 2, then step 2 with given draws (one caption dropped) */
    MsParamTable w1;
    memset(&w1, 0, sizeof w1);
    ms_param_table_adapter(&t.ac, &w1);
    ms_param_table_alloc(&w1, NULL);
    memcpy(w1.mem, w.mem, w.mem_bytes);
    float *mm, *vv;
    size_t nmom;
    ms_adapter_trainer_moments(p, &mm, &vv, &nmom);
    float *m0, *v0;
    moments_copy(mm, vv, nmom, &m0, &v0);
    unsigned char drop[2] = { 0, 1 };
    int64_t ts[2] = { 17, 903 };
    float *noise = test_randn(&r, N, 1.0f);
    MsPretrainDraws dr = { drop, ts, noise };
    s = ms_adapter_train_step(p, lat, cond, caps, &dr, NULL, &rep);
    check(s == MS_OK, "adapter step 2: %s", s ? ms_last_error() : "ok");
    check(!memcmp(frozen, t.m.unet.mem, t.m.unet.mem_bytes) &&
          !memcmp(frozen + t.m.unet.mem_bytes, t.m.text.mem, t.m.text.mem_bytes),
          "the UNet and the text encoder are unchanged by the adapter's steps");

    {   /* the same step, separately */
        UNetParams up;
        ClipTextParams tp;
        AdapterParams ap, adp;
        AdapterTape tape;
        MsParamTable gw;
        UNetSizes sz;
        UNetActs ua;
        Arena acts, scr, tar, aar;
        ClipTextActs ta;
        MsScheduler *sch = (MsScheduler *)malloc(sizeof *sch);
        int32_t ids[2 * 77];
        size_t ab, nf[MS_MAX_BLOCKS];
        float *noisy = test_zeros(N), *eps = test_zeros(N), *deps = test_zeros(N), *dfeat[2];
        const float *feat[2];
        float tf[2] = { 17.0f, 903.0f };
        memset(&gw, 0, sizeof gw);
        ms_param_table_adapter(&t.ac, &gw); ms_param_table_alloc(&gw, NULL); memset(gw.mem, 0, gw.mem_bytes);
        adapter_params_init(&ap, &t.ac, &w1); adapter_params_init(&adp, &t.ac, &gw);
        adapter_sizes(&t.ac, B, H, W, NULL, nf);
        for (int i = 0; i < 2; i++) dfeat[i] = test_zeros(nf[i]);
        unet_params_init(&up, &t.m.unet_config, &t.m.unet);
        clip_text_params(&tp, &t.m.text, &t.m.text_config);
        unet_sizes(&t.m.unet_config, B, h, wl, T, 1, &sz);
        arena_init(&acts, sz.acts_bytes); arena_init(&scr, sz.scratch_bytes);
        unet_acts_init(&ua, &t.m.unet_config, B, h, wl, T, 1, &acts, &scr);
        ua.dadapter = dfeat;
        arena_init(&tar, clip_text_sizes(&t.m.text_config, B, T, 0, CLIP_INFER));
        clip_text_acts_alloc(&ta, &tar, &t.m.text_config, B, T, 0, CLIP_INFER);
        adapter_train_sizes(&t.ac, B, H, W, &ab);
        arena_init(&aar, ab);
        ms_scheduler_init(sch, MS_SCHED_DDPM, &t.m.scheduler_config, MS_TORCH_CPU_AVX2);
        clip_tokenize(&t.tok, caps[0], strlen(caps[0]), ids, T);
        clip_tokenize(&t.tok, "", 0, ids + T, T);
        check(!memcmp(ids, rep.ids, sizeof ids), "token ids of the step (second caption dropped to \"\")");
        ms_scheduler_add_noise(sch, noisy, lat, noise, ts, B, N / B);
        clip_text_forward(&ta, &tp, NULL, ids, NULL, 0, &t.m.text_config);
        adapter_forward_train(&tape, &aar, &ap, cond, B, H, W);
        for (int i = 0; i < 2; i++) feat[i] = tape.x[i][t.ac.num_res_blocks];
        unet_forward(eps, &ua, noisy, tf, ta.out, NULL, feat, &up, NULL);
        double l = 0.0;
        for (size_t i = 0; i < N; i++) {
            float d = eps[i] - noise[i];
            l += (double)d * d;
            deps[i] = d * (float)(2.0 / (double)N);
        }
        l /= (double)N;
        check(l == rep.loss, "step loss %.9g == mean squared error here %.9g", rep.loss, l);
        unet_backward(&ua, &up, NULL, NULL, deps, NULL, NULL);
        double dn = 0.0;
        for (int i = 0; i < 2; i++)
            for (size_t k = 0; k < nf[i]; k++) dn += (double)dfeat[i][k] * dfeat[i][k];
        check(dn > 0.0, "the UNet passes a gradient to the adapter's features (|dF| %.3e)", sqrt(dn));
        adapter_backward_full(&tape, &adp, NULL, (const float *const *)dfeat);
        /* AdamW per tensor at step 2, lr warmed up: 2e-3 * 2 / 4 */
        int bad = -1;
        for (int i = 0; i < w1.n; i++) {
            MsParam *q = &w1.p[i];
            const size_t off = (size_t)(q->f32 - (float *)w1.mem);
            ms_adamw_step(q->f32, gw.p[i].f32, m0 + off, v0 + off, q->numel, 2, 1e-3, pc.weight_decay, pc.beta1, pc.beta2,
                          pc.adam_eps);
            if (bad < 0 && memcmp(q->f32, w.p[i].f32, q->numel * sizeof(float))) bad = i;
        }
        check(bad < 0, "adapter step 2 == AdamW on the gradient computed here, every parameter bitwise%s%s",
              bad < 0 ? "" : " -- NO: ", bad < 0 ? "" : w1.p[bad].name);
        check(!memcmp(m0, mm, nmom * sizeof(float)) && !memcmp(v0, vv, nmom * sizeof(float)), "AdamW moments bitwise");
        unet_acts_free(&ua);
        unet_params_free(&up);
        arena_free(&acts); arena_free(&scr); arena_free(&tar); arena_free(&aar);
        ms_param_table_free(&gw);
        free(sch);
        for (int i = 0; i < 2; i++) ms_free_aligned(dfeat[i]);
        ms_free_aligned(noisy); ms_free_aligned(eps); ms_free_aligned(deps);
    }

    /* 1 vs 2 threads; then the objective on one fixed batch falls */
    if (ms_max_threads() >= 2) {
        MsParamTable wa, wb;
        MsAdapterTrainer *pa = NULL, *pb = NULL;
        int old = ms_get_threads();
        if (adapter_table(&t.ac, &wa, 21) && adapter_table(&t.ac, &wb, 21) &&
            ms_adapter_trainer_create(&pa, &t.m, &t.tok, &t.ac, &wa, &pc, B, h, wl) == MS_OK &&
            ms_adapter_trainer_create(&pb, &t.m, &t.tok, &t.ac, &wb, &pc, B, h, wl) == MS_OK) {
            MsTorchRng ga, gb;
            ms_torch_seed(&ga, 3); ms_torch_seed(&gb, 3);
            ms_set_threads(1);
            for (int k = 0; k < 2; k++) ms_adapter_train_step(pa, lat, cond, caps, NULL, &ga, &rep);
            ms_set_threads(2);
            for (int k = 0; k < 2; k++) ms_adapter_train_step(pb, lat, cond, caps, NULL, &gb, &rep);
            ms_set_threads(old);
            check(!memcmp(wa.mem, wb.mem, wa.mem_bytes), "adapter after 2 steps bit-identical for 1 and 2 threads");
        } else {
            check(0, "thread trainers: %s", ms_last_error());
        }
        ms_adapter_trainer_free(pa); ms_adapter_trainer_free(pb);
        ms_param_table_free(&wa); ms_param_table_free(&wb);
    }
    {
        double first = 0.0, last = 0.0;
        drop[1] = 0;
        ts[0] = 350; ts[1] = 600;
        for (int k = 0; k < 30; k++) {
            s = ms_adapter_train_step(p, lat, cond, caps, &dr, NULL, &rep);
            if (s) break;
            if (k == 0) first = rep.loss;
            last = rep.loss;
        }
        check(s == MS_OK && last < 0.9 * first, "30 steps on one batch and draws: loss %.4f -> %.4f (ratio %.3f, want < 0.9)",
              first, last, last / first);
        printf("  30 adapter steps on one batch and draws: loss %.4f -> %.4f\n", first, last);
    }

    /* fitting the UNet */
    {
        UNetConfig uc;
        AdapterConfig ac = t.ac;
        MsAdapterTrainer *q = NULL;
        check(ms_adapter_fits_unet(&t.ac, &t.m.unet_config, "test") == MS_OK, "the tiny adapter fits the tiny UNet");
        tiny_unet_cfg(&uc, 1);
        uc.down_block_types[0] = MS_BLOCK_DOWN; uc.down_block_types[1] = MS_BLOCK_CROSS_ATTN_DOWN;
        check(ms_adapter_fits_unet(&ac, &uc, "test") == MS_ERR_SHAPE, "a DownBlock2D first refused: %s", ms_last_error());
        ac.channels[1] = 12;
        check(ms_adapter_fits_unet(&ac, &t.m.unet_config, "test") == MS_ERR_SHAPE, "other channels refused: %s",
              ms_last_error());
        ac = t.ac; ac.n_channels = 3; ac.channels[2] = 16;
        check(ms_adapter_fits_unet(&ac, &t.m.unet_config, "test") == MS_ERR_SHAPE, "other level counts refused: %s",
              ms_last_error());
        UNetConfig keep = t.m.unet_config;
        t.m.unet_config = uc;
        check(ms_adapter_trainer_create(&q, &t.m, &t.tok, &t.ac, &w, &pc, B, h, wl) == MS_ERR_SHAPE && !q,
              "the trainer refuses a UNet the adapter does not fit: %s", ms_last_error());
        t.m.unet_config = keep;
    }
    ms_adapter_trainer_free(p);
    ms_param_table_free(&w); ms_param_table_free(&w1);
    free(frozen); free(m0); free(v0);
    ms_free_aligned(lat); ms_free_aligned(cond); ms_free_aligned(noise);
    tiny_free(&t);
}

/* the bytes of two files equal */
static int same_file(const char *a, const char *b) {
    FILE *fa = fopen(a, "rb"), *fb = fopen(b, "rb");
    int same = fa && fb, ca = 0;
    while (same && ca != EOF) {                 /* both read every time: the lengths must agree too */
        ca = getc(fa);
        same = ca == getc(fb);
    }
    if (fa) fclose(fa);
    if (fb) fclose(fb);
    return same;
}

/* tools/ship_world.sh on the pretrain output dir (DIR/model, DIR/adapters): DEST has the model
 * and both adapters (as t2iadapter_openpose / t2iadapter_sketch) in F16, each weight the F32 one
 * rounded to nearest, the configs unchanged; a README with the recipe; an existing DEST is refused
 * without --force and replaced with it. The F16 copy samples close to the F32 folder, and regional
 * sampling with --keypose_condition and no --adapter-keypose takes DEST/t2iadapter_openpose. */
static char g_build[1024];

static int rounded_f16(const MsParamTable *a, const MsParamTable *b, const char **bad) {
    if (a->n != b->n) { *bad = "(tensor count)"; return 0; }
    for (int i = 0; i < a->n; i++) {
        const MsParam *x = &a->p[i], *y = &b->p[i];
        if (x->flags & MS_PARAM_BUFFER) continue;
        if (strcmp(x->name, y->name) || x->numel != y->numel || !x->f32 || !y->f32) { *bad = x->name; return 0; }
        for (size_t k = 0; k < x->numel; k++)
            if (y->f32[k] != st_f16_to_f32(st_f32_to_f16(x->f32[k]))) { *bad = x->name; return 0; }
    }
    return 1;
}

static int png_max_diff(const char *p1, const char *p2) {
    MsImage a, b;
    int d = -1;
    if (ms_image_read(p1, 3, &a) != MS_OK) return -1;
    if (ms_image_read(p2, 3, &b) == MS_OK) {
        if (a.w == b.w && a.h == b.h) {
            d = 0;
            for (size_t i = 0; i < (size_t)a.w * a.h * 3; i++) {
                const int e = abs((int)((const uint8_t *)a.data)[i] - (int)((const uint8_t *)b.data)[i]);
                if (e > d) d = e;
            }
        }
        ms_image_free(&b);
    }
    ms_image_free(&a);
    return d;
}

static void test_ship(const char *dir) {
#if defined(_WIN32)
    (void)dir;
    printf("  skip tools/ship_world.sh: not on Windows\n");
#else
    char dest[600], cmd[4000], log[700], p[800], q[800];
    if (!g_build[0]) { printf("  skip tools/ship_world.sh: cannot tell the build folder\n"); return; }
    test_tmp(dest, sizeof dest, "ship/world");
    snprintf(log, sizeof log, "%s.log", dest);
    snprintf(cmd, sizeof cmd, "rm -rf '%.*s' && mkdir -p '%.*s'", (int)(strlen(dest) - 6), dest, (int)(strlen(dest) - 6), dest);
    if (system(cmd)) {}
    const char *fmt = "MIXSHOW='%s/mixshow' sh tools/ship_world.sh %s--recipe '--size 64 (test)' --dest '%s' '%s' > '%s' 2>&1";
    snprintf(cmd, sizeof cmd, fmt, g_build, "", dest, dir, log);
    double t0 = ms_time();
    int rc = system(cmd);
    snprintf(p, sizeof p, "%s/t2iadapter_sketch/config.json", dest);
    FILE *f = fopen(p, "rb");
    if (!check(rc == 0 && f, "tools/ship_world.sh %s -> %s (%.1f s; log %s)", dir, dest, ms_time() - t0, log)) { if (f) fclose(f); return; }
    fclose(f);
    rc = system(cmd);
    char text[8192] = "";
    if ((f = fopen(log, "rb"))) { size_t n = fread(text, 1, sizeof text - 1, f); text[n] = 0; fclose(f); }
    check(rc != 0 && strstr(text, "--force"), "an existing DEST is refused without --force: %.120s", text);
    snprintf(cmd, sizeof cmd, fmt, g_build, "--force ", dest, dir, log);
    check(system(cmd) == 0, "and replaced with --force");
    snprintf(p, sizeof p, "%s/README.md", dest);
    text[0] = 0;
    if ((f = fopen(p, "rb"))) { size_t n = fread(text, 1, sizeof text - 1, f); text[n] = 0; fclose(f); }
    check(strstr(text, "mixshow pretrain --out DIR --size 64 (test)") && strstr(text, "non-zero token rows of 49408") &&
          strstr(text, "adapters: 16 steps"), "README.md: the recipe, the token rows, each stage's steps");
    /* weights: F16 rounding of the F32 ones; configs as they were */
    MsModel m32, m16;
    snprintf(p, sizeof p, "%s/model", dir);
    if (check(ms_model_load(p, NULL, &m32) == MS_OK, "load %s: %s", p, ms_last_error())) {
        if (check(ms_model_load(dest, NULL, &m16) == MS_OK, "load %s: %s", dest, ms_last_error())) {
            const char *bad = "";
            check(rounded_f16(&m32.unet, &m16.unet, &bad) && rounded_f16(&m32.vae, &m16.vae, &bad) &&
                  rounded_f16(&m32.text, &m16.text, &bad), "shipped model: every weight == the F32 one rounded to F16 (%s)", bad);
            check(!memcmp(&m32.unet_config, &m16.unet_config, sizeof m32.unet_config) &&
                  !memcmp(&m32.vae_config, &m16.vae_config, sizeof m32.vae_config) &&
                  !memcmp(&m32.text_config, &m16.text_config, sizeof m32.text_config) &&
                  !memcmp(&m32.scheduler_config, &m16.scheduler_config, sizeof m32.scheduler_config),
                  "shipped model: the UNet, VAE, text encoder and scheduler configs of the pretrain folder");
            ms_model_free(&m16);
        }
        ms_model_free(&m32);
    }
    static const char *const from[2] = { "pose", "sketch" }, *const to[2] = { "t2iadapter_openpose", "t2iadapter_sketch" };
    for (int k = 0; k < 2; k++) {
        AdapterConfig c32, c16;
        MsParamTable t32, t16;
        const char *bad = "";
        snprintf(p, sizeof p, "%s/adapters/%s", dir, from[k]);
        snprintf(q, sizeof q, "%s/%s", dest, to[k]);
        if (!check(ms_adapter_load(p, NULL, &c32, &t32) == MS_OK, "load %s: %s", p, ms_last_error())) continue;
        if (check(ms_adapter_load(q, NULL, &c16, &t16) == MS_OK, "load %s: %s", q, ms_last_error())) {
            check(rounded_f16(&t32, &t16, &bad) && !memcmp(&c32, &c16, sizeof c32), "%s: config kept, weights rounded to F16 (%s)",
                  to[k], bad);
            ms_param_table_free(&t16);
        }
        ms_param_table_free(&t32);
    }
    /* samples: the F16 copy against the F32 folder */
    char m32p[700], o32[700], o16[700], cond[700], rw[] = "--prompt_rewrite=[a red circle]-*-[]-*-[0, 0, 32, 64]";
    snprintf(m32p, sizeof m32p, "%s/model", dir);
    snprintf(o32, sizeof o32, "%s/f32.png", dir);
    snprintf(o16, sizeof o16, "%s/f16.png", dir);
    snprintf(cond, sizeof cond, "%s/cond_pose.png", dir);
    {
        char *a1[] = { "sample", "--model", m32p, "-p", "a red circle above a blue square", "--steps", "3", "--seed", "1", "-o", o32, NULL };
        char *a2[] = { "sample", "--model", dest, "-p", "a red circle above a blue square", "--steps", "3", "--seed", "1", "-o", o16, NULL };
        const int d = cmd_sample(11, a1) == 0 && cmd_sample(11, a2) == 0 ? png_max_diff(o32, o16) : -1;
        printf("  sample, F16 copy vs F32 folder (3 steps, 64x64): max pixel difference %d\n", d);
        check(d >= 0 && d <= 2, "sample from the F16 copy: max pixel difference %d from the F32 folder (<= 2)", d);
    }
    {   /* regional keypose without --adapter-keypose: DEST/t2iadapter_openpose, as given explicitly */
        char pm[700], kc[800], ak[800], r1[700], r2[700], r3[700];
        snprintf(pm, sizeof pm, "--pretrained_model=%s", dest);
        snprintf(kc, sizeof kc, "--keypose_condition=%s", cond);
        snprintf(ak, sizeof ak, "--adapter-keypose=%s/t2iadapter_openpose", dest);
        snprintf(r1, sizeof r1, "%s/r1.png", dir); snprintf(r2, sizeof r2, "%s/r2.png", dir); snprintf(r3, sizeof r3, "%s/r3.png", dir);
        char *b1[] = { "sample", pm, "--prompt=a red circle", rw, kc, "--steps=3", "--seed=1", "-o", r1, NULL };
        char *b2[] = { "sample", pm, "--prompt=a red circle", rw, kc, ak, "--steps=3", "--seed=1", "-o", r2, NULL };
        char *b3[] = { "sample", pm, "--prompt=a red circle", rw, "--steps=3", "--seed=1", "-o", r3, NULL };
        const int ok = cmd_sample(9, b1) == 0 && cmd_sample(10, b2) == 0 && cmd_sample(8, b3) == 0;
        const int d12 = ok ? png_max_diff(r1, r2) : -1, d13 = ok ? png_max_diff(r1, r3) : -1;
        check(ok && d12 == 0 && d13 > 0, "regional keypose on the shipped folder: the default adapter == --adapter-keypose "
              "DEST/t2iadapter_openpose (max difference %d), and it acts (%d without the condition)", d12, d13);
    }
    snprintf(cmd, sizeof cmd, "rm -rf '%.*s'", (int)(strlen(dest) - 6), dest);
    if (system(cmd)) {}
#endif
}

static void test_cli(void) {
    static const char *const names[2] = { "pose", "sketch" };
    char a[600], b[600], c[600], ck[700], pa[700], pc[700];
    double la[16], lc[16];
    test_tmp(a, sizeof a, "adapters_a"); test_tmp(b, sizeof b, "adapters_b"); test_tmp(c, sizeof c, "adapters_c");
    int rc = run_pretrain(a, "adapters", 16, NULL, NULL, NULL, NULL);
    check(rc != 0 && strstr(ms_last_error(), "unet stage") != NULL, "the adapters stage without DIR/model refused: %s",
          ms_last_error());
    const char *dirs[3] = { a, b, c };
    for (int i = 0; i < 3; i++) {
        rc = run_pretrain(dirs[i], "unet", 16, NULL, NULL, NULL, NULL);
        check(rc == 0, "unet stage 5 steps in %s: exit status %d", dirs[i], rc);
    }
    double t0 = ms_time();
    rc = run_pretrain(a, "adapters", 16, NULL, NULL, NULL, NULL);
    if (!check(rc == 0, "adapters stage 16 steps: exit status %d (%s)", rc, rc ? ms_last_error() : "")) return;
    printf("  16 adapter steps of the tiny config (both adapters, batch 2): %.1f s\n", ms_time() - t0);
    check(read_losses(a, "adapters_loss.csv", la, 16) == 16, "adapters_loss.csv has 16 rows");
    rc = run_pretrain(b, "adapters", 8, NULL, NULL, NULL, NULL);
    check(rc == 0, "adapters stage 8 steps: exit status %d", rc);
    snprintf(ck, sizeof ck, "%s/adapters_checkpoint.safetensors", b);
    rc = run_pretrain(c, "adapters", 16, "--resume", ck, "--adapter-lr", "1e-3");
    check(rc != 0 && strstr(ms_last_error(), "other options") != NULL, "resume with another lr refused: %s", ms_last_error());
    rc = run_pretrain(c, "adapters", 16, "--resume", ck, NULL, NULL);
    check(rc == 0, "adapters stage --resume to 16: exit status %d (%s)", rc, rc ? ms_last_error() : "");
    if (check(read_losses(c, "adapters_loss.csv", lc, 16) == 8, "the resumed adapters_loss.csv has steps 9..16")) {
        int same = 1;
        for (int i = 8; i < 16; i++) same = same && la[i] == lc[i];
        check(same, "losses of steps 9..16 identical to the straight run");
    }
    for (int k = 0; k < 2; k++) {
        AdapterConfig ac;
        MsParamTable t;
        snprintf(pa, sizeof pa, "%s/adapters/%s/diffusion_pytorch_model.safetensors", a, names[k]);
        snprintf(pc, sizeof pc, "%s/adapters/%s/diffusion_pytorch_model.safetensors", c, names[k]);
        check(same_file(pa, pc), "%s adapter: 8 steps + resume to 16 == 16 steps, bitwise", names[k]);
        snprintf(pa, sizeof pa, "%s/adapters/%s", a, names[k]);
        if (check(ms_adapter_load(pa, NULL, &ac, &t) == MS_OK, "load %s: %s", pa, ms_last_error())) {
            check(ac.in_channels == (k ? 1 : 3) && ac.n_channels == 2 && ac.channels[1] == 16 && ac.downscale_factor == 8 &&
                  ac.num_res_blocks == 2, "%s config: in %d, %d levels, factor %d", names[k], ac.in_channels, ac.n_channels,
                  ac.downscale_factor);
            ms_param_table_free(&t);
        }
        /* mixshow sample with it, on a condition of the world */
        char model[700], cond[700], out[700];
        WorldScene sc;
        uint8_t *img = (uint8_t *)malloc(64 * 64 * 3);
        world_scene_make(3, 5, &sc);
        world_render(&sc, 64, NULL, NULL, k ? NULL : img, k ? img : NULL);
        snprintf(cond, sizeof cond, "%s/cond_%s.png", a, names[k]);
        check(ms_png_write(cond, img, 64, 64, 3) == MS_OK, "write %s", cond);
        free(img);
        snprintf(model, sizeof model, "%s/model", a);
        snprintf(out, sizeof out, "%s/sample_%s.png", a, names[k]);
        char *argv[] = { "sample", "--model", model, "-p", "a red circle above a blue square", "--steps", "3", "--seed", "1",
                         "--adapter", pa, "--cond", cond, "-o", out, NULL };
        rc = cmd_sample((int)(sizeof argv / sizeof argv[0]) - 1, argv);
        FILE *f = fopen(out, "rb");
        check(rc == 0 && f != NULL, "mixshow sample --adapter %s: exit status %d, %s", names[k], rc, f ? "PNG written" : "no PNG");
        if (f) fclose(f);
    }
    test_ship(a);
}

int main(int argc, char **argv) {
    (void)argc;
    if (argv[0] && strstr(argv[0], "/tests/test_pretrain_adapter")) {     /* <BUILD>/tests/test_pretrain_adapter */
        snprintf(g_build, sizeof g_build, "%s", argv[0]);
        *strstr(g_build, "/tests/test_pretrain_adapter") = 0;
    }
    test_step_is_adamw();
    test_cli();
    ms_gemm_scratch_free();
    ops_scratch_free();
    return test_summary("test_pretrain_adapter");
}
