/* tests/test_pretrain.c — pretraining (issue 15): ms_pretrain_step and `mixshow pretrain` on a
 * tiny config (UNet 8/16 channels, DownBlock2D + CrossAttnDownBlock2D, 1 layer, 2 heads, 4
 * groups; text encoder width 16, 1 layer, the real CLIP tokenizer with vocab 49408; the
 * embedded tiny model's VAE, 64x64 world scenes -> 8x8 latents). Checked:
 *   - one step's update == torch AdamW (ms_adamw_step per tensor, the warmed-up lr) applied to
 *     the gradient of the same draws computed here separately (text forward, UNet forward,
 *     dL/deps = 2 (eps - n) / N, unet_backward_full, clip_text_backward_full): bitwise, every
 *     UNet and text-encoder parameter; the loss equals F.mse_loss of the prediction here;
 *   - 1 vs 2 threads: the parameters after two steps bit-identical;
 *   - `mixshow pretrain` 40 steps at a fixed seed: the mean loss of the last 5 steps is below
 *     that of the first 5 (numbers printed);
 *   - 20 steps, then --resume of its checkpoint to 40 == the straight 40-step run: every weight
 *     of the written folders bitwise, and the losses of steps 21..40; a checkpoint of other
 *     options is refused;
 *   - the written folder loads (ms_model_load) and `mixshow sample` draws a 64x64 PNG from it;
 *   - freeze_text (SD's frozen text encoder): the text weights and moments untouched, step 1's
 *     UNet update equal to the unfrozen one bitwise; the text stage (--text contrastive) writes the
 *     tower the unet stage trains on (the checkpoint's text encoder bitwise), one of 32 positions
 *     is refused. */
#include "pretrain_util.h"

#include <time.h>

static const char *const TINY_FLAGS[] = { "--stage", "unet", "--channels", "8,16", "--heads", "2,2", "--groups", "4", "--layers", "1",
                                          "--text-width", "16", "--text-layers", "1", "--text-heads", "2",
                                          "--size", "64", "--batch", "2", "--scenes", "16", "--lr", "3e-3",
                                          "--warmup", "5", "--seed", "7", "--world-seed", "3", "-q" };
#define N_TINY ((int)(sizeof TINY_FLAGS / sizeof TINY_FLAGS[0]))

static char g_tmp[512];

/* mixshow pretrain TINY_FLAGS --out dir --steps n --checkpoint-every 10 [extra...] */
static int run_pretrain(const char *dir, int steps, const char *e0, const char *e1, const char *e2, const char *e3) {
    char st[16];
    snprintf(st, sizeof st, "%d", steps);
    const char *opts[] = { "--steps", st, "--checkpoint-every", "10" };
    return pretrain_run(TINY_FLAGS, N_TINY, dir, opts, 4, e0, e1, e2, e3);
}

/* ---- the step against AdamW on a separately computed gradient ---- */
static MsParamTable copy_table(const MsParamTable *src, int unet, const MsModel *m) {
    MsParamTable t;
    memset(&t, 0, sizeof t);
    if (unet) ms_param_table_unet(&m->unet_config, &t);
    else ms_param_table_text(&m->text_config, &t);
    ms_param_table_alloc(&t, NULL);
    memcpy(t.mem, src->mem, src->mem_bytes);
    return t;
}

static void test_step_is_adamw(void) {
    Tiny t;
    MsPretrainConfig pc;
    MsPretrainer *p = NULL;
    const int B = 2, h = 8, w = 8, T = 77, D = 16;
    const size_t N = (size_t)B * 4 * h * w;
    if (!tiny_model(&t, 0)) { tiny_free(&t); return; }
    ms_pretrain_config_defaults(&pc);
    pc.warmup = 4;
    pc.lr = 2e-3;
    if (!check(ms_pretrainer_create(&p, &t.m, &t.tok, &pc, B, h, w) == MS_OK, "pretrainer: %s", ms_last_error())) {
        tiny_free(&t);
        return;
    }
    MsRng r;
    ms_rng_seed(&r, 5);
    float *lat = test_randn(&r, N, 1.0f);
    const char *caps[2] = { "two red circles on the left of a blue striped square, on grass", "a green star" };
    MsTorchRng g;
    ms_torch_seed(&g, 99);
    MsPretrainReport rep;
    /* step 1 from the generator; step 2 with given draws (one drop) */
    MsStatus s = ms_pretrain_step(p, lat, caps, NULL, &g, &rep);
    check(s == MS_OK, "pretrain step 1: %s", s ? ms_last_error() : "ok");
    /* state before step 2: weights after step 1 are the pretrainer's; recompute step 2 here */
    MsParamTable w1u = copy_table(&t.m.unet, 1, &t.m), w1t = copy_table(&t.m.text, 0, &t.m);
    float *mm, *vv;
    size_t nmom;
    ms_pretrainer_moments(p, &mm, &vv, &nmom);
    float *m0, *v0;
    moments_copy(mm, vv, nmom, &m0, &v0);
    unsigned char drop[2] = { 0, 1 };
    int64_t ts[2] = { 17, 903 };
    float *noise = test_randn(&r, N, 1.0f);
    MsPretrainDraws dr = { drop, ts, noise };
    s = ms_pretrain_step(p, lat, caps, &dr, NULL, &rep);
    check(s == MS_OK, "pretrain step 2: %s", s ? ms_last_error() : "ok");

    /* the same step, separately: forward, loss, full backward, AdamW per tensor */
    {
        UNetParams up, dup;
        ClipTextParams tp, dtp;
        MsParamTable gu, gt;
        UNetSizes sz;
        UNetActs ua;
        Arena acts, scr, tar;
        ClipTextActs ta;
        MsScheduler *sch = (MsScheduler *)malloc(sizeof *sch);
        int32_t ids[2 * 77];
        float *noisy = test_zeros(N), *eps = test_zeros(N), *deps = test_zeros(N), *dctx = test_zeros((size_t)B * T * D);
        float tf[2] = { 17.0f, 903.0f };
        ms_param_table_unet(&t.m.unet_config, &gu); ms_param_table_alloc(&gu, NULL); memset(gu.mem, 0, gu.mem_bytes);
        ms_param_table_text(&t.m.text_config, &gt); ms_param_table_alloc(&gt, NULL); memset(gt.mem, 0, gt.mem_bytes);
        unet_params_init(&up, &t.m.unet_config, &w1u); unet_params_init(&dup, &t.m.unet_config, &gu);
        clip_text_params(&tp, &w1t, &t.m.text_config); clip_text_params(&dtp, &gt, &t.m.text_config);
        unet_sizes(&t.m.unet_config, B, h, w, T, 1, &sz);
        arena_init(&acts, sz.acts_bytes); arena_init(&scr, sz.scratch_bytes);
        unet_acts_init(&ua, &t.m.unet_config, B, h, w, T, 1, &acts, &scr);
        arena_init(&tar, clip_text_sizes(&t.m.text_config, B, T, 0, CLIP_TRAIN_KEEP));
        clip_text_acts_alloc(&ta, &tar, &t.m.text_config, B, T, 0, CLIP_TRAIN_KEEP);
        ms_scheduler_init(sch, MS_SCHED_DDPM, &t.m.scheduler_config, MS_TORCH_CPU_AVX2);
        clip_tokenize(&t.tok, caps[0], strlen(caps[0]), ids, T);
        clip_tokenize(&t.tok, "", 0, ids + T, T);
        check(!memcmp(ids, rep.ids, sizeof ids), "token ids of the step (second caption dropped to \"\")");
        ms_scheduler_add_noise(sch, noisy, lat, noise, ts, B, N / B);
        clip_text_forward(&ta, &tp, NULL, ids, NULL, 0, &t.m.text_config);
        unet_forward(eps, &ua, noisy, tf, ta.out, NULL, NULL, &up, NULL);
        double l = 0.0;
        for (size_t i = 0; i < N; i++) {
            float d = eps[i] - noise[i];
            l += (double)d * d;
            deps[i] = d * (float)(2.0 / (double)N);
        }
        l /= (double)N;
        check(l == rep.loss, "loss %.9g == mean (eps - n)^2 here %.9g", rep.loss, l);
        unet_backward_full(&ua, &up, NULL, NULL, &dup, deps, dctx, NULL);
        clip_text_backward_full(NULL, NULL, &dtp, dctx, &ta, &tp, NULL, ids, 0, &t.m.text_config);
        const double lr = pc.lr * 2.0 / 4.0;
        check(rep.lr == lr, "step 2 lr %.9g == lr * 2 / warmup %.9g", rep.lr, lr);
        const MsParamTable *W[2] = { &w1u, &w1t }, *Gt[2] = { &gu, &gt };
        const MsParamTable *after[2] = { &t.m.unet, &t.m.text };
        int bad = 0, n = 0;
        const char *badname = "";
        for (int k = 0; k < 2; k++) {
            const size_t base = k == 0 ? 0 : t.m.unet.mem_bytes / sizeof(float);
            for (int i = 0; i < W[k]->n; i++) {
                const MsParam *q = &W[k]->p[i];
                if (q->flags & MS_PARAM_BUFFER) continue;
                size_t off = base + (size_t)((const unsigned char *)q->f32 - (const unsigned char *)W[k]->mem) / sizeof(float);
                ms_adamw_step(q->f32, Gt[k]->p[i].f32, m0 + off, v0 + off, q->numel, 2, lr, pc.weight_decay, pc.beta1,
                              pc.beta2, pc.adam_eps);
                if (memcmp(q->f32, after[k]->p[i].f32, q->numel * sizeof(float)) ||
                    memcmp(m0 + off, mm + off, q->numel * sizeof(float)) || memcmp(v0 + off, vv + off, q->numel * sizeof(float))) {
                    if (!bad) badname = q->name;
                    bad++;
                }
                n++;
            }
        }
        check(bad == 0, "step 2: all %d parameters (and moments) == AdamW on the separately computed gradient, "
              "bitwise%s%s", n, bad ? "; first mismatch " : "", badname);
        unet_acts_free(&ua); unet_params_free(&up); unet_params_free(&dup);
        arena_free(&acts); arena_free(&scr); arena_free(&tar);
        ms_param_table_free(&gu); ms_param_table_free(&gt);
        free(sch);
        ms_free_aligned(noisy); ms_free_aligned(eps); ms_free_aligned(deps); ms_free_aligned(dctx);
    }
    /* 1 vs 2 threads: two more steps from the same state */
    if (ms_max_threads() >= 2) {
        unsigned char *after1 = (unsigned char *)malloc(t.m.unet.mem_bytes + t.m.text.mem_bytes);
        MsParamTable su = copy_table(&t.m.unet, 1, &t.m), st = copy_table(&t.m.text, 0, &t.m);
        float *sm = (float *)malloc(nmom * sizeof(float)), *sv = (float *)malloc(nmom * sizeof(float));
        memcpy(sm, mm, nmom * sizeof(float)); memcpy(sv, vv, nmom * sizeof(float));
        int old = ms_get_threads();
        for (int th = 1; th <= 2; th++) {
            MsTorchRng g2;
            ms_torch_seed(&g2, 5);
            memcpy(t.m.unet.mem, su.mem, su.mem_bytes); memcpy(t.m.text.mem, st.mem, st.mem_bytes);
            memcpy(mm, sm, nmom * sizeof(float)); memcpy(vv, sv, nmom * sizeof(float));
            ms_pretrainer_set_step(p, 2);
            ms_set_threads(th);
            ms_pretrain_step(p, lat, caps, NULL, &g2, &rep);
            ms_pretrain_step(p, lat, caps, NULL, &g2, &rep);
            if (th == 1) {
                memcpy(after1, t.m.unet.mem, t.m.unet.mem_bytes);
                memcpy(after1 + t.m.unet.mem_bytes, t.m.text.mem, t.m.text.mem_bytes);
            } else {
                check(!memcmp(after1, t.m.unet.mem, t.m.unet.mem_bytes) &&
                      !memcmp(after1 + t.m.unet.mem_bytes, t.m.text.mem, t.m.text.mem_bytes),
                      "two steps: every parameter bit-identical for 1 and 2 threads");
            }
        }
        ms_set_threads(old);
        ms_param_table_free(&su); ms_param_table_free(&st);
        free(sm); free(sv); free(after1);
    } else {
        printf("  (one core: the 1 vs 2 thread check needs two)\n");
    }
    {   /* refusals */
        MsPretrainer *q = NULL;
        MsPretrainConfig bad = pc;
        bad.uncond_p = 2.0;
        check(ms_pretrainer_create(&q, &t.m, &t.tok, &bad, B, h, w) == MS_ERR_ARG, "uncond_p 2 refused: %s", ms_last_error());
        t.m.unet_config.cross_attention_dim = 24;
        check(ms_pretrainer_create(&q, &t.m, &t.tok, &pc, B, h, w) == MS_ERR_SHAPE, "cross_attention_dim != text width "
              "refused: %s", ms_last_error());
        t.m.unet_config.cross_attention_dim = 16;
    }
    ms_pretrainer_free(p);
    ms_param_table_free(&w1u); ms_param_table_free(&w1t);
    free(m0); free(v0);
    ms_free_aligned(lat); ms_free_aligned(noise);
    tiny_free(&t);
}

/* ---- freeze_text: SD's frozen text encoder ----
 * Two pretrainers on copies of the same tiny model, the same two steps (given draws), one with
 * freeze_text: its text encoder is bitwise unchanged and its text moments stay 0; the other's
 * text encoder moves. Step 1's UNet update is the same bits in both (the UNet's gradient does not
 * depend on whether the context's gradient is formed); after step 2 the UNets differ (their
 * contexts do). */
static void test_frozen_text(void) {
    Tiny a, b;
    MsPretrainConfig pc;
    MsPretrainer *pa = NULL, *pb = NULL;
    const int B = 2, h = 8, w = 8;
    const size_t N = (size_t)B * 4 * h * w;
    if (!tiny_model(&a, 0) || !tiny_model(&b, 0)) { tiny_free(&a); tiny_free(&b); return; }
    ms_pretrain_config_defaults(&pc);
    pc.warmup = 0;
    pc.lr = 2e-3;
    MsPretrainConfig pf = pc;
    pf.freeze_text = 1;
    MsParamTable t0 = copy_table(&a.m.text, 0, &a.m);
    if (check(ms_pretrainer_create(&pa, &a.m, &a.tok, &pf, B, h, w) == MS_OK &&
              ms_pretrainer_create(&pb, &b.m, &b.tok, &pc, B, h, w) == MS_OK, "pretrainers: %s", ms_last_error())) {
        MsRng r;
        ms_rng_seed(&r, 8);
        float *lat = test_randn(&r, N, 1.0f), *noise = test_randn(&r, N, 1.0f);
        const char *caps[2] = { "a red circle above a blue square", "three green stars, on grass" };
        unsigned char drop[2] = { 0, 0 };
        int64_t ts[2] = { 500, 40 };
        MsPretrainDraws dr = { drop, ts, noise };
        MsPretrainReport ra, rb;
        const char *bad = NULL;
        int ok = ms_pretrain_step(pa, lat, caps, &dr, NULL, &ra) == MS_OK && ms_pretrain_step(pb, lat, caps, &dr, NULL, &rb) == MS_OK;
        check(ok && ra.loss == rb.loss, "step 1: the same loss (%.9g, %.9g)", ra.loss, rb.loss);
        check(ok && tables_equal(&a.m.unet, &b.m.unet, &bad), "step 1: the UNet updates bitwise equal, frozen text or not%s%s",
              bad ? "; first mismatch " : "", bad ? bad : "");
        ok = ok && ms_pretrain_step(pa, lat, caps, &dr, NULL, &ra) == MS_OK && ms_pretrain_step(pb, lat, caps, &dr, NULL, &rb) == MS_OK;
        bad = NULL;
        check(ok && tables_equal(&a.m.text, &t0, &bad), "two steps with freeze_text: the text encoder bitwise unchanged%s%s",
              bad ? "; first change " : "", bad ? bad : "");
        check(ok && !tables_equal(&b.m.text, &t0, NULL), "without it the text encoder moves");
        check(ok && !tables_equal(&a.m.unet, &b.m.unet, NULL), "step 2: the UNets differ (their contexts do)");
        float *mm, *vv;
        size_t nm, nz = 0;
        ms_pretrainer_moments(pa, &mm, &vv, &nm);
        const size_t nu = a.m.unet.mem_bytes / sizeof(float);
        for (size_t i = nu; i < nm; i++) nz += mm[i] != 0.0f || vv[i] != 0.0f;
        check(nm > nu && nz == 0, "freeze_text: the text encoder's %zu moments stay 0 (%zu non-zero)", nm - nu, nz);
        ms_free_aligned(lat); ms_free_aligned(noise);
    }
    ms_pretrainer_free(pa); ms_pretrainer_free(pb);
    ms_param_table_free(&t0);
    tiny_free(&a); tiny_free(&b);
}

/* The text stage and a frozen text encoder: `pretrain --stage text --text contrastive` (2 steps of
 * `eval --train-encoders` with the tiny text config: width 16, 1 layer, 2 heads, 77 positions),
 * then `--stage unet --text contrastive` (6 steps): the checkpoint's text encoder is DIR/text's
 * text tower bitwise, the recipe names it; --text contrastive with --text-encoder is refused, and
 * so is `--text-encoder FILE` of a tower with 32 positions. */
static void test_text_stage(void) {
    char out[700], te32[700], enc[760], ck[760], cmd[1600];
    snprintf(out, sizeof out, "%s_ts", g_tmp); snprintf(te32, sizeof te32, "%s_te32", g_tmp);
    const char *opts[] = { "--steps", "6", "--checkpoint-every", "3", "--text", "contrastive", "--text-steps", "2" };
    int rc = pretrain_run(TINY_FLAGS, N_TINY, out, opts, 8, "--stage", "text", "--text-token-max-norm", "0.07");
    if (!check(rc == 0, "pretrain --stage text --text contrastive (2 steps): %s", rc ? ms_last_error() : "ok")) return;
    {
        StFile f;
        snprintf(ck, sizeof ck, "%s/text/checkpoint.safetensors", out);
        if (check(st_open(&f, ck) == MS_OK, "open %s", ck)) {
            const char *rec = st_meta(&f, "recipe");
            check(rec && strstr(rec, "text=16,64,1,2,77") && strstr(rec, "token_max_norm=0.07"), "the text stage's recipe: the "
                  "tiny text config, 77 positions, --text-token-max-norm passed on: %s", rec ? rec : "(none)");
            st_close(&f);
        }
    }
    rc = pretrain_run(TINY_FLAGS, N_TINY, out, opts, 8, "--stage", "unet", NULL, NULL);
    if (check(rc == 0, "pretrain --stage unet --text contrastive (6 steps on the text stage's encoder): %s",
              rc ? ms_last_error() : "ok")) {
        EvalNet e;
        StFile f;
        snprintf(enc, sizeof enc, "%s/text/encoders.safetensors", out);
        snprintf(ck, sizeof ck, "%s/checkpoint.safetensors", out);
        if (check(evalnet_load(enc, &e, NULL, NULL) == MS_OK && st_open(&f, ck) == MS_OK, "load: %s", ms_last_error())) {
            int same = 1, n = 0;
            for (int i = 0; i < e.text.n; i++) {
                const MsParam *q = &e.text.p[i];
                char key[MS_KEY_MAX + 16];
                float *x = NULL;
                size_t nx = 0;
                if (q->flags & MS_PARAM_BUFFER) continue;
                snprintf(key, sizeof key, "text_encoder.%s", q->name);
                same = same && st_load_f32(&f, key, &x, &nx) == MS_OK && nx == q->numel &&
                       !memcmp(x, q->f32, nx * sizeof(float));
                ms_free_aligned(x);
                n++;
            }
            check(same && n > 10 && e.cfg.text.max_position_embeddings == 77 && e.cfg.text.hidden_size == 16,
                  "after 6 steps the checkpoint's text encoder is the text stage's tower (%d tensors, width %d, %d positions) "
                  "bitwise", n, e.cfg.text.hidden_size, e.cfg.text.max_position_embeddings);
            const char *rec = st_meta(&f, "recipe");
            check(rec && strstr(rec, " text=frozen:") != NULL, "the recipe records the frozen text encoder: %s", rec ? rec : "(none)");
            st_close(&f);
            evalnet_free(&e);
        }
        rc = pretrain_run(TINY_FLAGS, N_TINY, out, opts, 8, "--text-encoder", enc, NULL, NULL);
        check(rc == 2, "--text contrastive with --text-encoder refused (exit %d)", rc);
    }
    char *args[] = { "eval", "--train-encoders", te32, "--steps", "2", "--checkpoint-every", "0", "--batch-text", "4", "--batch-id", "4",
                     "--per-id", "2", "--identities", "8", "--size", "32", "--channels", "8,16,32", "--text-width", "16",
                     "--text-layers", "1", "--text-heads", "2", "--text-tokens", "32", "--seed", "3", "-q", NULL };
    if (check(cmd_eval(30, args) == 0, "eval --train-encoders, 32 positions: %s", ms_last_error())) {
        snprintf(enc, sizeof enc, "%s/encoders.safetensors", te32);
        const char *o2[] = { "--steps", "6", "--checkpoint-every", "3" };
        rc = pretrain_run(TINY_FLAGS, N_TINY, out, o2, 4, "--text-encoder", enc, NULL, NULL);
        check(rc != 0 && strstr(ms_last_error(), "77") != NULL, "a text tower of 32 positions refused: %s", ms_last_error());
    }
#if !defined(_WIN32)
    snprintf(cmd, sizeof cmd, "rm -rf '%s' '%s'", out, te32);
    if (system(cmd) != 0) printf("  (could not remove %s)\n", out);
#else
    (void)cmd;
#endif
}

/* ---- the command: loss falls, resume, folder ---- */
/* The written model's token table (dir/model) against the run's final checkpoint: the rows of ids
 * that no caption of scenes 0..15 (world seed 3, TINY_FLAGS) nor "" tokenizes to are zero, every
 * other row and every other tensor equal the checkpoint's bitwise. Independently of how the
 * command chose them: a row whose AdamW second moment is non-zero had a gradient, and must be
 * among the kept rows; a zeroed row's moment is exactly 0 (it never had one). */
static void test_token_rows(const char *dir) {
    char path[700], cap[1024], tokdir[1024];
    MsModel m;
    ClipTokenizer tok;
    StFile f;
    MsParamTable tu, tt;
    int shipped;
    memset(&tu, 0, sizeof tu); memset(&tt, 0, sizeof tt);
    snprintf(path, sizeof path, "%s/model", dir);
    if (!check(ms_model_load(path, NULL, &m) == MS_OK, "load %s: %s", path, ms_last_error())) return;
    snprintf(path, sizeof path, "%s/checkpoint.safetensors", dir);
    if (!check(st_open(&f, path) == MS_OK, "open %s: %s", path, ms_last_error())) { ms_model_free(&m); return; }
    if (!check(ms_find_tokenizer(NULL, NULL, tokdir, sizeof tokdir, &shipped) == MS_OK && ms_clip_tokenizer_load(tokdir, &tok) == MS_OK,
               "tokenizer: %s", ms_last_error())) { st_close(&f); ms_model_free(&m); return; }
    const int V = m.text_config.vocab_size, D = m.text_config.hidden_size;
    unsigned char *want = (unsigned char *)calloc((size_t)V, 1);
    for (int idx = -1; want && idx < 16; idx++) {             /* "" and the 16 scenes' captions */
        WorldScene sc;
        int32_t ids[77];
        cap[0] = 0;
        if (idx >= 0) { world_scene_make(3, idx, &sc); world_caption(3, idx, &sc, cap, sizeof cap); }
        if (clip_tokenize(&tok, cap, strlen(cap), ids, 77) == MS_OK)
            for (int k = 0; k < 77; k++) want[ids[k]] = 1;
    }
    /* the checkpoint's weights of both tables, and the moments' offset of the token table */
    float *ck = NULL, *v = NULL;
    size_t nck = 0, nv = 0;
    const int it = ms_param_find(&m.text, "text_model.embeddings.token_embedding.weight");
    int ok = want && it >= 0 && ms_param_table_unet(&m.unet_config, &tu) == MS_OK && ms_param_table_alloc(&tu, NULL) == MS_OK &&
             ms_param_table_text(&m.text_config, &tt) == MS_OK && ms_param_table_alloc(&tt, NULL) == MS_OK &&
             st_load_f32(&f, "adam.v", &v, &nv) == MS_OK && nv == (tu.mem_bytes + tt.mem_bytes) / sizeof(float);
    if (!check(ok, "token table, checkpoint moments (%zu values): %s", nv, ms_last_error())) goto done;
    {
        const MsParam *q = &m.text.p[it];
        const int jt = ms_param_find(&tt, q->name);
        const float *vt = v + tu.mem_bytes / sizeof(float) + (tt.p[jt].f32 - (float *)tt.mem);
        if (!check(st_load_f32(&f, "text_encoder.text_model.embeddings.token_embedding.weight", &ck, &nck) == MS_OK &&
                   nck == (size_t)V * D, "checkpoint token table: %s", ms_last_error())) goto done;
        int kept = 0, zero_ok = 1, kept_ok = 1, grad_kept = 1, nonzero_before = 0, with_grad = 0;
        for (int id = 0; id < V; id++) {
            const float *row = q->f32 + (size_t)id * D, *crow = ck + (size_t)id * D;
            int zero = 1, had_grad = 0;
            for (int d = 0; d < D; d++) { zero &= row[d] == 0.0f; had_grad |= vt[(size_t)id * D + d] != 0.0f; }
            if (want[id]) { kept++; kept_ok &= !memcmp(row, crow, (size_t)D * sizeof(float)); }
            else {
                zero_ok &= zero && !had_grad;
                for (int d = 0; d < D; d++) nonzero_before |= crow[d] != 0.0f;
            }
            grad_kept &= !had_grad || want[id];
            with_grad += had_grad;
        }
        check(zero_ok && kept_ok && nonzero_before, "written token table: the %d rows of the captions' ids == the checkpoint's "
              "bitwise, the other %d zero (they were not in the checkpoint; their AdamW moments are 0)", kept, V - kept);
        check(grad_kept, "every row with a gradient (non-zero AdamW second moment: %d rows) is kept", with_grad);
        printf("  token rows: %d of %d kept (%d of them had a gradient in 40 steps)\n", kept, V, with_grad);
    }
    {   /* every other tensor as in the checkpoint */
        const MsParamTable *tab[2] = { &m.unet, &m.text };
        const char *pre[2] = { "unet.", "text_encoder." }, *bad = NULL;
        for (int j = 0; j < 2; j++)
            for (int i = 0; i < tab[j]->n; i++) {
                const MsParam *q = &tab[j]->p[i];
                char key[MS_KEY_MAX + 16];
                float *x = NULL;
                size_t nx = 0;
                if ((q->flags & MS_PARAM_BUFFER) || (j == 1 && i == it)) continue;
                snprintf(key, sizeof key, "%s%s", pre[j], q->name);
                if (st_load_f32(&f, key, &x, &nx) || nx != q->numel || memcmp(x, q->f32, nx * sizeof(float))) bad = q->name;
                ms_free_aligned(x);
            }
        check(!bad, "every other UNet and text-encoder tensor == the checkpoint's bitwise%s%s", bad ? " -- NO: " : "", bad ? bad : "");
    }
done:
    ms_free_aligned(ck); ms_free_aligned(v);
    ms_param_table_free(&tu); ms_param_table_free(&tt);
    free(want);
    clip_tokenizer_free(&tok);
    st_close(&f);
    ms_model_free(&m);
}

static void test_command(void) {
    char a[600], b[600], c[600], path[700], ck[700];
    double la[40], lc[40];
    const char *dir = getenv("TMPDIR");
    if (!dir || !*dir) dir = "/tmp";
    snprintf(g_tmp, sizeof g_tmp, "%s/mixshow_test_pretrain_%lu_%lu", dir, (unsigned long)time(NULL),
             (unsigned long)(clock() & 0xffffff));
    snprintf(a, sizeof a, "%s_a", g_tmp); snprintf(b, sizeof b, "%s_b", g_tmp); snprintf(c, sizeof c, "%s_c", g_tmp);

    double t0 = ms_time();
    int rc = run_pretrain(a, 40, NULL, NULL, NULL, NULL);
    if (!check(rc == 0, "mixshow pretrain 40 steps: exit status %d", rc)) return;
    printf("  40 steps of the tiny config: %.1f s\n", ms_time() - t0);
    if (check(read_losses(a, "loss.csv", la, 40) == 40, "loss.csv has 40 rows")) {
        double f5 = 0, l5 = 0;
        for (int i = 0; i < 5; i++) { f5 += la[i] / 5; l5 += la[35 + i] / 5; }
        check(l5 < 0.8 * f5, "loss falls: mean of steps 1-5 %.4f, of steps 36-40 %.4f (ratio %.3f, want < 0.8)", f5, l5,
              l5 / f5);
    }
    snprintf(path, sizeof path, "%s/loss.svg", a);
    FILE *f = fopen(path, "r");
    check(f != NULL, "loss.svg written");
    if (f) fclose(f);
    test_token_rows(a);

    /* 20 steps, then resume to 40 */
    rc = run_pretrain(b, 20, NULL, NULL, NULL, NULL);
    check(rc == 0, "mixshow pretrain 20 steps: exit status %d", rc);
    snprintf(ck, sizeof ck, "%s/checkpoint.safetensors", b);
    rc = run_pretrain(c, 40, "--resume", ck, NULL, NULL);
    check(rc == 0, "mixshow pretrain --resume to 40: exit status %d", rc);
    rc = run_pretrain(c, 40, "--resume", ck, "--lr", "1e-3");
    check(rc != 0 && strstr(ms_last_error(), "other options") != NULL, "resume with another lr refused: %s",
          ms_last_error());
    if (check(read_losses(c, "loss.csv", lc, 40) == 20, "resumed loss.csv has steps 21..40")) {
        int same = 1;
        for (int i = 20; i < 40; i++) same = same && la[i] == lc[i];
        check(same, "losses of steps 21..40 identical to the straight run");
    }
    {
        MsModel ma, mc;
        char pa[700], pc[700];
        const char *bad = "";
        snprintf(pa, sizeof pa, "%s/model", a); snprintf(pc, sizeof pc, "%s/model", c);
        if (check(ms_model_load(pa, NULL, &ma) == MS_OK, "load %s: %s", pa, ms_last_error())) {
            if (check(ms_model_load(pc, NULL, &mc) == MS_OK, "load %s: %s", pc, ms_last_error())) {
                check(tables_equal(&ma.unet, &mc.unet, &bad) && tables_equal(&ma.text, &mc.text, &bad),
                      "resumed run's folder == straight run's, every UNet and text-encoder weight bitwise%s%s",
                      *bad ? " -- NO: " : "", bad);
                check(ma.text_config.vocab_size == 49408 && ma.unet_config.block_out_channels[1] == 16 &&
                      ma.unet_config.sample_size == 8, "folder configs: vocab %d, channels %d, sample_size %d",
                      ma.text_config.vocab_size, ma.unet_config.block_out_channels[1], ma.unet_config.sample_size);
                ms_model_free(&mc);
            }
            ms_model_free(&ma);
        }
        /* it samples */
        char png[700];
        snprintf(png, sizeof png, "%s/s.png", a);
        check_sample_64(pa, "<pretrained folder>", png, "3");
    }
    /* --decay 4 of 10 steps: lr of steps 7..10 = lr * (11 - k) / 4 in loss.csv; a constant-lr
     * checkpoint of step 6 resumes into the decay (== the straight run's losses), one of step 8
     * (after the decay's start) is refused */
    {
        char d[600], e[600], g[600];
        double ld[10], le[10];
        snprintf(d, sizeof d, "%s_dd", g_tmp); snprintf(e, sizeof e, "%s_de", g_tmp); snprintf(g, sizeof g, "%s_dg", g_tmp);
        rc = run_pretrain(d, 10, "--decay", "4", NULL, NULL);
        if (check(rc == 0, "--steps 10 --decay 4: exit status %d (%s)", rc, rc ? ms_last_error() : "")) {
            char path2[700], line[512];
            int ok = 1, rows = 0;
            snprintf(path2, sizeof path2, "%s/loss.csv", d);
            FILE *fl = fopen(path2, "r");
            while (fl && fgets(line, sizeof line, fl)) {
                long long k;
                double l, lr;
                if (sscanf(line, "%lld,%lf,%lf", &k, &l, &lr) != 3) continue;
                const double want = k > 6 ? 3e-3 * (double)(11 - k) / 4.0 : k < 5 ? 3e-3 * (double)k / 5.0 : 3e-3;
                ok &= fabs(lr - want) <= 1e-12 * 3e-3;
                rows++;
            }
            if (fl) fclose(fl);
            check(ok && rows == 10, "loss.csv lr column: warmup 5, constant, then 3e-3 * (11 - k) / 4 at steps 7..10 (%d rows)", rows);
        }
        rc = run_pretrain(e, 6, NULL, NULL, NULL, NULL);
        snprintf(ck, sizeof ck, "%s/checkpoint.safetensors", e);
        rc = rc || run_pretrain(g, 10, "--resume", ck, "--decay", "4");
        if (check(rc == 0, "6 constant-lr steps, then --resume --steps 10 --decay 4: exit status %d (%s)", rc,
                  rc ? ms_last_error() : "") &&
            check(read_losses(d, "loss.csv", ld, 10) == 10 && read_losses(g, "loss.csv", le, 10) == 4, "both loss.csv read")) {
            int same = 1;
            for (int i = 6; i < 10; i++) same &= ld[i] == le[i];
            check(same, "resumed into the decay: losses of steps 7..10 == the straight --decay run's");
        }
        char h[600];
        snprintf(h, sizeof h, "%s_dh", g_tmp);
        rc = run_pretrain(h, 8, NULL, NULL, NULL, NULL);
        snprintf(ck, sizeof ck, "%s/checkpoint.safetensors", h);
        snprintf(g, sizeof g, "%s_dg2", g_tmp);
        rc = rc || run_pretrain(g, 10, "--resume", ck, "--decay", "4");
        check(rc != 0 && strstr(ms_last_error(), "the decay starts after step 6") != NULL,
              "a constant-lr checkpoint of step 8 does not resume into a decay from step 7: %s", ms_last_error());
#if !defined(_WIN32)
        char cmd[3200];
        snprintf(cmd, sizeof cmd, "rm -rf '%s' '%s' '%s_dg' '%s' '%s'", d, e, g_tmp, g, h);
        if (system(cmd) != 0) printf("  (could not remove the decay test folders)\n");
#endif
    }

    /* --creatures 8 (two creatures, 4 renders each) join the 16 scenes, captioned "a creature, ...":
     * the written model keeps the token row of "creature", which no scene caption has (run a's
     * model zeroed it), and a checkpoint of it does not resume without --creatures */
    {
        char d[600], e[600], tokdir[1024];
        ClipTokenizer tok;
        int32_t ids[77];
        int shipped = 0;
        snprintf(d, sizeof d, "%s_d", g_tmp); snprintf(e, sizeof e, "%s_e", g_tmp);
        rc = run_pretrain(d, 10, "--creatures", "8", NULL, NULL);
        if (check(rc == 0, "mixshow pretrain --creatures 8, 10 steps: exit status %d (%s)", rc, rc ? ms_last_error() : "") &&
            check(ms_find_tokenizer(NULL, NULL, tokdir, sizeof tokdir, &shipped) == MS_OK &&
                  ms_clip_tokenizer_load(tokdir, &tok) == MS_OK, "tokenizer: %s", ms_last_error())) {
            MsModel ma, md;
            char pa[700], pd[700];
            snprintf(pa, sizeof pa, "%s/model", a); snprintf(pd, sizeof pd, "%s/model", d);
            if (check(clip_tokenize(&tok, "creature", 8, ids, 77) == MS_OK && ids[2] == ids[3], "tokenize \"creature\": one token") &&
                check(ms_model_load(pa, NULL, &ma) == MS_OK, "load %s: %s", pa, ms_last_error())) {
                if (check(ms_model_load(pd, NULL, &md) == MS_OK, "load %s: %s", pd, ms_last_error())) {
                    const int i = ms_param_find(&ma.text, "text_model.embeddings.token_embedding.weight");
                    const int D = ma.text_config.hidden_size;
                    const float *ra = ma.text.p[i].f32 + (size_t)ids[1] * D, *rd = md.text.p[i].f32 + (size_t)ids[1] * D;
                    int za = 1, zd = 1;
                    for (int k = 0; k < D; k++) { za &= ra[k] == 0.0f; zd &= rd[k] == 0.0f; }
                    check(za && !zd, "token %d \"creature\": zero in the scenes-only model, kept with --creatures", ids[1]);
                    ms_model_free(&md);
                }
                ms_model_free(&ma);
            }
            clip_tokenizer_free(&tok);
        }
        snprintf(ck, sizeof ck, "%s/checkpoint.safetensors", d);
        rc = run_pretrain(e, 20, "--resume", ck, NULL, NULL);
        check(rc != 0 && strstr(ms_last_error(), "other options") != NULL, "a --creatures checkpoint resumed without it refused: %s",
              ms_last_error());
#if !defined(_WIN32)
        char cmd[1400];
        snprintf(cmd, sizeof cmd, "rm -rf '%s' '%s'", d, e);
        if (system(cmd) != 0) printf("  (could not remove %s)\n", d);
#endif
    }
#if !defined(_WIN32)
    {
        char cmd[2000];
        snprintf(cmd, sizeof cmd, "rm -rf '%s' '%s' '%s'", a, b, c);
        if (system(cmd) != 0) printf("  (could not remove %s_*)\n", g_tmp);
    }
#endif
}

int main(void) {
    test_step_is_adamw();
    test_frozen_text();
    test_command();
    test_text_stage();
    return test_summary("test_pretrain");
}
