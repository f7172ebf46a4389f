/* tests/test_pretrain_vae.c — the VAE stage of pretraining (issue 15): ms_vae_pretrain_step and
 * `mixshow pretrain --stage vae|all` on a tiny AutoencoderKL (2 blocks of 8, 16 channels = factor
 * 2, 1 layer per block, 4 groups, 4 latent channels). Checked:
 *   - one step's update == torch AdamW (ms_adamw_step per tensor, the warmed-up lr) applied to the
 *     gradient of the same noise computed here separately (encoder tape, posterior sample, decoder
 *     tape, the loss's gradient, decoder / posterior / KL / encoder backwards): bitwise, every
 *     parameter and moment, for the L1 and the MSE objective; the loss == its definition here;
 *   - 1 vs 2 threads: the parameters after two steps bit-identical;
 *   - `mixshow pretrain --stage vae` 40 steps: the mean loss of the last 5 steps below that of
 *     the first 5; 20 steps + --resume to 40 == the straight run (losses of steps 21..40, every
 *     weight of the written folders and the scaling_factor bitwise); other options refused;
 *   - scaling_factor == 1 / std of the posterior samples of the training scenes, recomputed here
 *     from the folder's weights and the generator state of the final checkpoint;
 *   - `--stage all`: the unet stage takes DIR/vae (latent 32x32 of 64x64 scenes), DIR/model/vae
 *     holds its weights, and `mixshow sample` draws a 64x64 PNG from DIR/model. */
#include "pretrain_util.h"

static const char *const TINY_FLAGS[] = { "--vae-channels", "8,16", "--vae-groups", "4", "--vae-layers", "1",
                                          "--size", "64", "--vae-batch", "2", "--scenes", "4", "--vae-lr", "1e-2",
                                          "--vae-warmup", "5", "--seed", "7", "--world-seed", "3", "-q",
                                          /* the unet stage of --stage all */
                                          "--channels", "8,16", "--heads", "2,2", "--groups", "4", "--text-width", "16",
                                          "--text-layers", "1", "--text-heads", "2", "--batch", "2",
                                          /* and its adapters stage */
                                          "--adapter-steps", "3", "--adapter-batch", "2" };
#define N_TINY ((int)(sizeof TINY_FLAGS / sizeof TINY_FLAGS[0]))

/* mixshow pretrain TINY_FLAGS --out dir --stage stage --vae-steps n --steps 4 --checkpoint-every 10 [extra...] */
static int run_pretrain(const char *dir, const char *stage, int steps, const char *e0, const char *e1, const char *e2,
                        const char *e3) {
    char st[16];
    snprintf(st, sizeof st, "%d", steps);
    const char *opts[] = { "--stage", stage, "--vae-steps", st, "--steps", "4", "--checkpoint-every", "10" };
    return pretrain_run(TINY_FLAGS, N_TINY, dir, opts, 8, e0, e1, e2, e3);
}

static void tiny_cfg(VaeConfig *c) {
    ms_vae_config_sd15(c);
    c->sample_size = 16;
    c->n_blocks = 2;
    c->block_out_channels[0] = 8; c->block_out_channels[1] = 16;
    c->layers_per_block = 1;
    c->norm_num_groups = 4;
}

static MsParamTable table_copy(const VaeConfig *c, const MsParamTable *src) {
    MsParamTable t;
    memset(&t, 0, sizeof t);
    ms_param_table_vae(c, &t);
    ms_param_table_alloc(&t, NULL);
    memcpy(t.mem, src->mem, src->mem_bytes);
    return t;
}

/* ---- the step against AdamW on a separately computed gradient ---- */
static void step_is_adamw(int mse) {
    VaeConfig c;
    MsParamTable w;
    MsVaePretrainConfig pc;
    MsVaePretrainer *p = NULL;
    MsVaePretrainReport rep;
    MsTorchRng g;
    MsRng r;
    const int B = 2, H = 16, W = 16, h = 8, wl = 8;
    const size_t nx = (size_t)B * 3 * H * W, nl = (size_t)B * 4 * h * wl;
    tiny_cfg(&c);
    memset(&w, 0, sizeof w);
    ms_torch_seed(&g, 11);
    if (!check(ms_param_table_vae(&c, &w) == MS_OK && ms_param_table_alloc(&w, NULL) == MS_OK &&
               ms_pretrain_init_weights(&w, &g) == MS_OK, "tiny vae table: %s", ms_last_error()))
        return;
    ms_vae_pretrain_config_defaults(&pc);
    pc.warmup = 4; pc.lr = 2e-3; pc.mse = mse;
    pc.kl_weight = 0.05;                /* large enough that the KL's gradient shows in every bit */
    if (!check(ms_vae_pretrainer_create(&p, &c, &w, &pc, B, H, W) == MS_OK, "vae pretrainer: %s", ms_last_error())) {
        ms_param_table_free(&w);
        return;
    }
    ms_rng_seed(&r, 5);
    float *x = test_randn(&r, nx, 0.5f);
    for (size_t i = 0; i < nx; i++) x[i] = x[i] > 1.0f ? 1.0f : x[i] < -1.0f ? -1.0f : x[i];
    ms_torch_seed(&g, 99);
    MsStatus s = ms_vae_pretrain_step(p, x, NULL, &g, &rep);
    check(s == MS_OK, "vae pretrain step 1 (%s): %s", mse ? "mse" : "l1", s ? ms_last_error() : "ok");
    MsParamTable w1 = table_copy(&c, &w);
    float *mm, *vv;
    size_t nmom;
    ms_vae_pretrainer_moments(p, &mm, &vv, &nmom);
    float *m0, *v0;
    moments_copy(mm, vv, nmom, &m0, &v0);
    float *noise = test_randn(&r, nl, 1.0f);
    s = ms_vae_pretrain_step(p, x, noise, NULL, &rep);
    check(s == MS_OK, "vae pretrain step 2: %s", s ? ms_last_error() : "ok");

    /* the same step, separately */
    {
        MsParamTable gt;
        VaeParams vp, dp;
        VaeTape te, td;
        Arena ar;
        size_t be = 0, bd = 0;
        float *mean = test_zeros(nl), *logvar = test_zeros(nl), *z = test_zeros(nl), *img = test_zeros(nx),
              *dimg = test_zeros(nx), *dz = test_zeros(nl), *dmean = test_zeros(nl), *dlogvar = test_zeros(nl);
        float kl[2], dkl[2];
        ms_param_table_vae(&c, &gt); ms_param_table_alloc(&gt, NULL); memset(gt.mem, 0, gt.mem_bytes);
        vae_params_init(&vp, &c, &w1); vae_params_init(&dp, &c, &gt);
        vae_train_sizes(&c, 1, B, H, W, &be); vae_train_sizes(&c, 0, B, h, wl, &bd);
        arena_init(&ar, be + bd);
        vae_encode_train(&te, &ar, &vp, mean, logvar, x, B, H, W);
        for (size_t i = 0; i < nl; i++) z[i] = mean[i] + expf(0.5f * logvar[i]) * noise[i];
        vae_decode_train(&td, &ar, &vp, img, z, B, h, wl);
        double rec = 0.0, kls = 0.0;
        for (size_t i = 0; i < nx; i++) {
            const float d = img[i] - x[i];
            rec += mse ? (double)d * d : fabs((double)d);
            dimg[i] = mse ? d * (2.0f / (float)nx) : (float)((d > 0) - (d < 0)) / (float)nx;
        }
        for (int b = 0; b < B; b++) {       /* the KL from its definition, in double */
            double k = 0.0;
            for (size_t i = 0; i < nl / 2; i++) {
                const double m = mean[b * nl / 2 + i], lv = logvar[b * nl / 2 + i];
                k += 0.5 * (m * m + exp(lv) - 1.0 - lv);
            }
            kls += k;
            dkl[b] = (float)(pc.kl_weight / (double)nx);
        }
        const double loss = (rec + pc.kl_weight * kls) / (double)nx;
        check(fabs(loss - rep.loss) <= 1e-6 * fabs(loss), "%s: loss %.9g == (rec + kl_weight KL) / numel here %.9g",
              mse ? "mse" : "l1", rep.loss, loss);
        vae_kl(kl, mean, logvar, B, nl / 2);
        vae_decode_backward_full(&td, &dp, dz, dimg);
        vae_posterior_sample_backward(dmean, dlogvar, dz, logvar, noise, nl, 1.0f);
        vae_kl_backward(dmean, dlogvar, dkl, mean, logvar, B, nl / 2);
        vae_encode_backward_full(&te, &dp, NULL, dmean, dlogvar);
        const double lr = pc.lr * 2.0 / 4.0;
        check(rep.lr == lr, "step 2 lr %.9g == lr * 2 / warmup %.9g", rep.lr, lr);
        int bad = 0, n = 0;
        const char *badname = "";
        for (int i = 0; i < w1.n; i++) {
            const MsParam *q = &w1.p[i];
            size_t off = (size_t)((const unsigned char *)q->f32 - (const unsigned char *)w1.mem) / sizeof(float);
            ms_adamw_step(q->f32, gt.p[i].f32, m0 + off, v0 + off, q->numel, 2, lr, pc.weight_decay, pc.beta1, pc.beta2,
                          pc.adam_eps);
            if (memcmp(q->f32, w.p[i].f32, q->numel * sizeof(float)) || memcmp(m0 + off, mm + off, q->numel * sizeof(float)) ||
                memcmp(v0 + off, vv + off, q->numel * sizeof(float))) {
                if (!bad) badname = q->name;
                bad++;
            }
            n++;
        }
        check(bad == 0, "%s step 2: all %d VAE parameters (and moments) == AdamW on the separately computed gradient, "
              "bitwise%s%s", mse ? "mse" : "l1", n, bad ? "; first mismatch " : "", badname);
        arena_free(&ar);
        ms_param_table_free(&gt);
        ms_free_aligned(mean); ms_free_aligned(logvar); ms_free_aligned(z); ms_free_aligned(img);
        ms_free_aligned(dimg); ms_free_aligned(dz); ms_free_aligned(dmean); ms_free_aligned(dlogvar);
    }
    /* 1 vs 2 threads: two more steps from the same state */
    if (!mse && ms_max_threads() >= 2) {
        MsParamTable s0 = table_copy(&c, &w);
        float *sm = (float *)malloc(nmom * sizeof(float)), *sv = (float *)malloc(nmom * sizeof(float));
        unsigned char *after1 = (unsigned char *)malloc(w.mem_bytes);
        memcpy(sm, mm, nmom * sizeof(float)); memcpy(sv, vv, nmom * sizeof(float));
        int old = ms_get_threads();
        for (int th = 1; th <= 2; th++) {
            MsTorchRng g2;
            ms_torch_seed(&g2, 5);
            memcpy(w.mem, s0.mem, w.mem_bytes);
            memcpy(mm, sm, nmom * sizeof(float)); memcpy(vv, sv, nmom * sizeof(float));
            ms_vae_pretrainer_set_step(p, 2);
            ms_set_threads(th);
            ms_vae_pretrain_step(p, x, NULL, &g2, &rep);
            ms_vae_pretrain_step(p, x, NULL, &g2, &rep);
            if (th == 1) memcpy(after1, w.mem, w.mem_bytes);
            else check(!memcmp(after1, w.mem, w.mem_bytes), "two VAE steps: every parameter bit-identical for 1 and 2 threads");
        }
        ms_set_threads(old);
        ms_param_table_free(&s0);
        free(sm); free(sv); free(after1);
    } else if (!mse) {
        printf("  (one core: the 1 vs 2 thread check needs two)\n");
    }
    {   /* refusals */
        MsVaePretrainer *q = NULL;
        MsVaePretrainConfig bad = pc;
        bad.kl_weight = -1.0;
        check(ms_vae_pretrainer_create(&q, &c, &w, &pc, B, 15, W) == MS_ERR_ARG, "15x16 images (factor 2) refused: %s",
              ms_last_error());
        check(ms_vae_pretrainer_create(&q, &c, &w, &bad, B, H, W) == MS_ERR_ARG, "kl_weight -1 refused: %s", ms_last_error());
    }
    ms_vae_pretrainer_free(p);
    ms_param_table_free(&w); ms_param_table_free(&w1);
    free(m0); free(v0);
    ms_free_aligned(x); ms_free_aligned(noise);
}

/* DIR/vae (config.json + weights) into c, t */
static int load_vae(const char *dir, VaeConfig *c, MsParamTable *t) {
    char p[800];
    JsonValue *j = NULL;
    snprintf(p, sizeof p, "%s/config.json", dir);
    MsStatus s = json_parse_file(p, &j);
    if (!s) { s = ms_vae_config_from_json(j, c); json_free(j); }
    if (!s) s = ms_param_table_vae(c, t);
    snprintf(p, sizeof p, "%s/diffusion_pytorch_model.safetensors", dir);
    if (!s) s = ms_table_fill_file(t, p, 0, "vae", NULL);
    return check(s == MS_OK, "load %s: %s", dir, s ? ms_last_error() : "ok");
}

/* The generator state a pretrain checkpoint stores (torch_rng.mt, torch_rng.normal, ints). */
static int ckpt_rng(const char *path, MsTorchRng *g) {
    StFile f;
    if (!check(st_open(&f, path) == MS_OK, "open %s: %s", path, ms_last_error())) return 0;
    const StTensor *mt = st_find(&f, "torch_rng.mt"), *nr = st_find(&f, "torch_rng.normal"), *in = st_find(&f, "ints");
    int ok = check(mt && nr && in && mt->numel == 624 && nr->numel == 1 && in->numel == 4, "%s: generator tensors", path);
    if (ok) {
        uint64_t b = test_le_u64(nr->data);
        for (int i = 0; i < 624; i++)
            g->mt[i] = (uint32_t)mt->data[4 * i] | (uint32_t)mt->data[4 * i + 1] << 8 |
                       (uint32_t)mt->data[4 * i + 2] << 16 | (uint32_t)mt->data[4 * i + 3] << 24;
        memcpy(&g->normal, &b, sizeof b);
        g->next = (int)test_le_u64(in->data + 8);
        g->seed = test_le_u64(in->data + 16);
        g->has_normal = test_le_u64(in->data + 24) != 0;
    }
    st_close(&f);
    return ok;
}

/* scaling_factor recomputed: posterior samples of the 4 training scenes (the world's own
 * renderer, ToTensor + Normalize) with the noise of the final checkpoint's generator */
static void check_scale(const char *dir) {
    char vd[700], ck[700];
    VaeConfig c;
    MsParamTable t;
    MsTorchRng g;
    memset(&t, 0, sizeof t);
    snprintf(vd, sizeof vd, "%s/vae", dir);
    snprintf(ck, sizeof ck, "%s/vae_checkpoint.safetensors", dir);
    if (!load_vae(vd, &c, &t) || !ckpt_rng(ck, &g)) { ms_param_table_free(&t); return; }
    VaeParams vp;
    VaeSizes vz;
    Arena ar;
    const int S = 64, n = 4;
    const size_t nl = (size_t)4 * 32 * 32, P = (size_t)S * S;
    float *x = test_zeros(3 * P), *mean = test_zeros(nl), *lv = test_zeros(nl), *noise = test_zeros(nl);
    double *z = (double *)malloc(n * nl * sizeof(double));
    uint8_t *rgb = (uint8_t *)malloc(3 * P);
    vae_params_init(&vp, &c, &t);
    vae_sizes(&c, S, S, -1, &vz);
    arena_init(&ar, vz.encode_bytes);
    for (int i = 0; i < n; i++) {
        WorldScene sc;
        world_scene_make(3, i, &sc);
        world_render(&sc, S, rgb, NULL, NULL, NULL);
        for (size_t k = 0; k < P; k++)
            for (int ch = 0; ch < 3; ch++) x[ch * P + k] = (float)rgb[3 * k + ch] / 255.0f * 2.0f - 1.0f;
        arena_reset(&ar, 0);
        vae_encode(&vp, &ar, mean, lv, x, 1, S, S);
        ms_torch_randn(&g, noise, nl, MS_TORCH_CPU_AVX2);
        for (size_t k = 0; k < nl; k++) z[i * nl + k] = (double)(mean[k] + expf(0.5f * lv[k]) * noise[k]);
    }
    double m = 0.0, v = 0.0;
    for (size_t k = 0; k < n * nl; k++) m += z[k];
    m /= (double)(n * nl);
    for (size_t k = 0; k < n * nl; k++) v += (z[k] - m) * (z[k] - m);
    const double want = 1.0 / sqrt(v / (double)(n * nl - 1));
    check(fabs(c.scaling_factor - want) <= 1e-5 * want, "scaling_factor %.7g == 1 / std of the 4 training scenes' "
          "posterior samples recomputed here %.7g", (double)c.scaling_factor, want);
    arena_free(&ar);
    ms_param_table_free(&t);
    ms_free_aligned(x); ms_free_aligned(mean); ms_free_aligned(lv); ms_free_aligned(noise);
    free(z); free(rgb);
}

/* ---- the command: loss falls, resume, scaling_factor, --stage all ---- */
static void test_command(void) {
    char a[600], b[600], c[600], d[600], ck[700], pa[700], pc[700];
    double la[40], lc[40];
    test_tmp(a, sizeof a, "pretrain_vae_a"); test_tmp(b, sizeof b, "pretrain_vae_b");
    test_tmp(c, sizeof c, "pretrain_vae_c"); test_tmp(d, sizeof d, "pretrain_vae_d");
    double t0 = ms_time();
    int rc = run_pretrain(a, "vae", 40, NULL, NULL, NULL, NULL);
    if (!check(rc == 0, "mixshow pretrain --stage vae 40 steps: exit status %d", rc)) return;
    printf("  40 VAE steps of the tiny config: %.1f s\n", ms_time() - t0);
    if (check(read_losses(a, "vae_loss.csv", la, 40) == 40, "vae_loss.csv has 40 rows")) {
        double f5 = 0, l5 = 0;
        for (int i = 0; i < 5; i++) { f5 += la[i] / 5; l5 += la[35 + i] / 5; }
        check(l5 < 0.8 * f5, "vae loss falls: mean of steps 1-5 %.4f, of steps 36-40 %.4f (ratio %.3f, want < 0.8)", f5,
              l5, l5 / f5);
    }
    check_scale(a);

    /* 20 steps, then resume to 40 */
    rc = run_pretrain(b, "vae", 20, NULL, NULL, NULL, NULL);
    check(rc == 0, "--stage vae 20 steps: exit status %d", rc);
    snprintf(ck, sizeof ck, "%s/vae_checkpoint.safetensors", b);
    rc = run_pretrain(c, "vae", 40, "--resume", ck, "--kl-weight", "1e-3");
    check(rc != 0 && strstr(ms_last_error(), "other options") != NULL, "resume with another kl_weight refused: %s",
          ms_last_error());
    rc = run_pretrain(c, "unet", 40, "--resume", ck, NULL, NULL);
    check(rc != 0 && strstr(ms_last_error(), "vae stage") != NULL, "a vae checkpoint with --stage unet refused: %s",
          ms_last_error());
    rc = run_pretrain(c, "vae", 40, "--resume", ck, NULL, NULL);
    check(rc == 0, "--stage vae --resume to 40: exit status %d", rc);
    if (check(read_losses(c, "vae_loss.csv", lc, 40) == 20, "resumed vae_loss.csv has steps 21..40")) {
        int same = 1;
        for (int i = 20; i < 40; i++) same = same && la[i] == lc[i];
        check(same, "losses of steps 21..40 identical to the straight run");
    }
    {
        VaeConfig ca, cc;
        MsParamTable ta, tc;
        memset(&ta, 0, sizeof ta); memset(&tc, 0, sizeof tc);
        snprintf(pa, sizeof pa, "%s/vae", a); snprintf(pc, sizeof pc, "%s/vae", c);
        if (load_vae(pa, &ca, &ta) && load_vae(pc, &cc, &tc))
            check(tables_equal(&ta, &tc, NULL) && ca.scaling_factor == cc.scaling_factor && ca.n_blocks == 2 &&
                  ca.block_out_channels[1] == 16 && ca.norm_num_groups == 4 && ca.sample_size == 64,
                  "resumed run's DIR/vae == straight run's (every weight bitwise, scaling_factor %.7g, configs)",
                  (double)cc.scaling_factor);
        ms_param_table_free(&ta); ms_param_table_free(&tc);
    }
    rc = run_pretrain(a, "vae", 40, NULL, NULL, NULL, NULL);
    check(rc != 0 && strstr(ms_last_error(), "already exists") != NULL, "a second vae stage into DIR refused: %s",
          ms_last_error());

    /* --vae-crop: random 32x32 windows of the 64x64 scenes; straight == 6 steps + resume; bad sides refused */
    {
        char e[600], f[600], g[600];
        double le[12], lg[12];
        test_tmp(e, sizeof e, "pretrain_vae_e"); test_tmp(f, sizeof f, "pretrain_vae_f"); test_tmp(g, sizeof g, "pretrain_vae_g");
        rc = run_pretrain(e, "vae", 12, "--vae-crop", "33", NULL, NULL);
        check(rc != 0 && strstr(ms_last_error(), "--vae-crop 33") != NULL, "--vae-crop 33 (not a multiple of 2) refused: %s",
              ms_last_error());
        rc = run_pretrain(e, "vae", 12, "--vae-crop", "96", NULL, NULL);
        check(rc != 0 && strstr(ms_last_error(), "at most --size") != NULL, "--vae-crop 96 > --size 64 refused: %s",
              ms_last_error());
        rc = run_pretrain(e, "vae", 12, "--vae-crop", "32", NULL, NULL);
        check(rc == 0, "--vae-crop 32, 12 steps: exit status %d (%s)", rc, rc ? ms_last_error() : "");
        rc = run_pretrain(f, "vae", 6, "--vae-crop", "32", NULL, NULL);
        snprintf(ck, sizeof ck, "%s/vae_checkpoint.safetensors", f);
        rc = rc || run_pretrain(g, "vae", 12, "--resume", ck, NULL, NULL);
        check(rc != 0 && strstr(ms_last_error(), "other options") != NULL, "resuming a cropped run without --vae-crop refused: %s",
              ms_last_error());
        rc = run_pretrain(g, "vae", 12, "--resume", ck, "--vae-crop", "32");
        if (check(rc == 0, "--vae-crop 32: 6 steps, then --resume to 12: exit status %d", rc) &&
            check(read_losses(e, "vae_loss.csv", le, 12) == 12 && read_losses(g, "vae_loss.csv", lg, 12) == 6,
                  "both vae_loss.csv read")) {
            int same = 1, fin = 1;
            for (int i = 6; i < 12; i++) same = same && le[i] == lg[i];   /* rows by step */
            for (int i = 0; i < 12; i++) fin = fin && isfinite(le[i]) && le[i] > 0;
            check(same && fin, "cropped run: losses of steps 7..12 identical after resume, all finite and positive (step 12 %.5f)",
                  le[11]);
            check(le[0] != la[0], "the windows are not the whole scenes: step 1 loss %.6f != uncropped %.6f", le[0], la[0]);
        }
        /* windows around objects: other windows than uniform ones (step 1 differs), still deterministic */
        {
            char h[600], i2[600];
            double lh[12], li[12];
            test_tmp(h, sizeof h, "pretrain_vae_h"); test_tmp(i2, sizeof i2, "pretrain_vae_i");
            rc = run_pretrain(h, "vae", 3, "--vae-crop", "32", "--vae-crop-at", "objects");
            rc = rc || run_pretrain(i2, "vae", 3, "--vae-crop", "32", "--vae-crop-at", "objects");
            if (check(rc == 0, "--vae-crop 32 --vae-crop-at objects, twice 3 steps: exit status %d", rc) &&
                check(read_losses(h, "vae_loss.csv", lh, 12) == 3 && read_losses(i2, "vae_loss.csv", li, 12) == 3,
                      "both vae_loss.csv read"))
                check(lh[0] != le[0] && lh[0] == li[0] && lh[2] == li[2], "object windows: step 1 loss %.6f != uniform windows' "
                      "%.6f; two runs identical", lh[0], le[0]);
#if !defined(_WIN32)
            char cmd[1400];
            snprintf(cmd, sizeof cmd, "rm -rf '%s' '%s'", h, i2);
            if (system(cmd) != 0) printf("  (could not remove %s)\n", h);
#endif
        }
#if !defined(_WIN32)
        char cmd[2000];
        snprintf(cmd, sizeof cmd, "rm -rf '%s' '%s' '%s'", e, f, g);
        if (system(cmd) != 0) printf("  (could not remove the crop test folders)\n");
#endif
    }

    /* --stage all: vae, then the unet stage on DIR/vae, then the adapters on DIR/model; the folder samples */
    rc = run_pretrain(d, "all", 6, NULL, NULL, NULL, NULL);
    if (check(rc == 0, "mixshow pretrain --stage all (6 vae + 4 unet + 3 adapter steps): exit status %d", rc)) {
        MsModel m;
        VaeConfig cv;
        MsParamTable tv;
        memset(&tv, 0, sizeof tv);
        snprintf(pa, sizeof pa, "%s/model", d); snprintf(pc, sizeof pc, "%s/vae", d);
        if (load_vae(pc, &cv, &tv) && check(ms_model_load(pa, NULL, &m) == MS_OK, "load %s: %s", pa, ms_last_error())) {
            check(tables_equal(&m.vae, &tv, NULL) && m.vae_config.scaling_factor == cv.scaling_factor &&
                  m.unet_config.sample_size == 32, "DIR/model has DIR/vae (weights bitwise, scaling_factor %.7g) and "
                  "its UNet 32x32 latents (got %d)", (double)m.vae_config.scaling_factor, m.unet_config.sample_size);
            ms_model_free(&m);
        }
        ms_param_table_free(&tv);
        for (int k = 0; k < 2; k++) {
            snprintf(pc, sizeof pc, "%s/adapters/%s/config.json", d, k ? "sketch" : "pose");
            FILE *f = fopen(pc, "r");
            check(f != NULL, "--stage all ends with the adapters stage: %s", pc);
            if (f) fclose(f);
        }
        char png[700];
        snprintf(png, sizeof png, "%s/s.png", d);
        check_sample_64(pa, "DIR/model", png, "2");
    }
#if !defined(_WIN32)
    {
        char cmd[3000];
        snprintf(cmd, sizeof cmd, "rm -rf '%s' '%s' '%s' '%s'", a, b, c, d);
        if (system(cmd) != 0) printf("  (could not remove the test folders)\n");
    }
#endif
}

int main(void) {
    step_is_adamw(0);
    step_is_adamw(1);
    test_command();
    return test_summary("test_pretrain_vae");
}
