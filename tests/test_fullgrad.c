/* tests/test_fullgrad.c — full-parameter backward (issue 15): the gradient of EVERY parameter of
 * the UNet (unet_backward_full), of the CLIP text encoder (clip_text_backward_full) and of the
 * VAE (vae_encode_backward_full / vae_decode_backward_full with the posterior and KL backwards),
 * on very small SD 1.x-topology configs (UNet widths 8/16, CrossAttnDown + Down / Up +
 * CrossAttnUp blocks, 2 resnets per down block, 2 heads, 4 groups, cross-attention width 16;
 * text encoder vocab 64, width 16, 2 heads, 2 layers; AutoencoderKL widths 8/16, 2 layers per
 * block, 4 groups, 4 latent channels). Loss L = sum(R * out), so dout = R (VAE: + 0.25 sum(KL)
 * through encode, posterior sample with given noise, decode). Checked:
 *   - golden: tests/data/fullgrad_golden.safetensors (tools/ref/gen_fullgrad_golden.py: diffusers
 *     0.19.3 UNet2DConditionModel and the transformers 4.31 CLIPTextModel stand-in) and
 *     tests/data/vae_fullgrad_golden.safetensors (tools/ref/gen_vae_fullgrad_golden.py: diffusers
 *     0.19.3 AutoencoderKL, one logvar channel below the clamp), torch autograd in float64, give
 *     the weights, inputs and every parameter's gradient: rel-L2 <= 1e-5 per tensor (the worst
 *     printed); UNet N = 2, non-square 8x12 latent, Tk = 7; text B = 2, T = 9; VAE N = 2, 16x24;
 *   - central differences (STYLE.md §8) of L summed in double on every parameter tensor (12
 *     coordinates per tensor for the UNet and VAE in `make test`, ~200 under MS_TEST_FULL);
 *   - 1 vs 2 threads: every gradient bit-identical; CLIP_TRAIN_KEEP vs CLIP_TRAIN_RECOMPUTE
 *     bit-identical; the LoRA/context gradients unchanged bit for bit when dp is given;
 *   - 16-bit weights are refused (MS_ERR_UNSUPPORTED), a gradient table of another config too.
 * Zero by theory: a key bias (CLIP's k_proj.bias, the VAE attention's to_k.bias) shifts every
 * logit of a query by the same q.b, which the softmax cancels; its gradient is judged as "0 up
 * to rounding" against the largest gradient. */
#include "test.h"

#include "tools/tools.h"

#define GOLDEN "tests/data/fullgrad_golden.safetensors"
#define FD_EPS 3e-2f
#define FD_NOISE_K 500
#define FD_TOL 1e-2
#define GOLD_TOL 1e-5

static StFile G;

static void unet_cfg(UNetConfig *c) {     /* gen_fullgrad_golden.py UNET_CFG */
    ms_unet_config_sd15(c);
    c->sample_size = 8;
    c->n_blocks = 2;
    c->down_block_types[0] = MS_BLOCK_CROSS_ATTN_DOWN; c->down_block_types[1] = MS_BLOCK_DOWN;
    c->up_block_types[0] = MS_BLOCK_UP; c->up_block_types[1] = MS_BLOCK_CROSS_ATTN_UP;
    c->block_out_channels[0] = 8; c->block_out_channels[1] = 16;
    c->attention_head_dim[0] = c->attention_head_dim[1] = 2;
    c->transformer_layers_per_block[0] = c->transformer_layers_per_block[1] = 1;
    c->norm_num_groups = 4;
    c->cross_attention_dim = 16;
}

static void text_cfg(ClipTextConfig *c) { /* gen_fullgrad_golden.py TEXT_CFG */
    ms_clip_text_config_sd15(c);
    c->vocab_size = 64; c->hidden_size = 16; c->intermediate_size = 64; c->num_hidden_layers = 2;
    c->num_attention_heads = 2; c->max_position_embeddings = 12;
}

/* Every parameter of t from the golden file under prefix + name (shape-checked), or all zero. */
static int table_fill(const StFile *f, MsParamTable *t, const char *prefix) {
    if (!check(ms_param_table_alloc(t, NULL) == MS_OK, "allocate a %s table", prefix)) return 0;
    memset(t->mem, 0, t->mem_bytes);
    if (!prefix[0]) return 1;
    for (int i = 0; i < t->n; i++) {
        const MsParam *p = &t->p[i];
        char key[2 * MS_KEY_MAX];
        if (p->flags & MS_PARAM_BUFFER) continue;
        snprintf(key, sizeof key, "%s%s", prefix, p->name);
        if (st_read_f32(f, key, p->f32, p->numel, p->ndim, p->shape)) {
            check(0, "golden %s: %s", key, ms_last_error());
            return 0;
        }
    }
    return 1;
}

/* t (from ms_param_table_*) allocated with every tensor in dtype dt, zeroed */
static int table_alloc_as(MsParamTable *t, MsDtype dt) {
    MsDtype *d = (MsDtype *)calloc((size_t)t->n, sizeof(MsDtype));
    int ok = d != NULL;
    for (int i = 0; ok && i < t->n; i++) d[i] = dt;
    ok = ok && check(ms_param_table_alloc(t, d) == MS_OK, "allocate a 16-bit table: %s", ms_last_error());
    if (ok) memset(t->mem, 0, t->mem_bytes);
    free(d);
    return ok;
}

static float *golden(const StFile *f, const char *key, size_t n) {
    float *x = test_zeros(n);
    if (st_read_f32(f, key, x, n, -1, NULL)) { check(0, "golden %s: %s", key, ms_last_error()); ms_free_aligned(x); return NULL; }
    return x;
}

static double max_abs_table(const MsParamTable *t) {
    double m = 0.0;
    for (int i = 0; i < t->n; i++)
        for (size_t k = 0; t->p[i].f32 && k < t->p[i].numel; k++) m = fmax(m, fabs(t->p[i].f32[k]));
    return m;
}

static int ends_with(const char *s, const char *tail) {
    size_t n = strlen(s), m = strlen(tail);
    return n >= m && !strcmp(s + n - m, tail);
}

/* a key bias shifts every logit of a query by the same q.b: the softmax cancels it */
static int zero_by_theory(const char *name) { return ends_with(name, "k_proj.bias") || ends_with(name, "to_k.bias"); }

/* Every gradient of g against prefix + name; one check per tensor, the worst printed. */
static void cmp_golden(const StFile *f, const char *net, const MsParamTable *g, const char *prefix) {
    double worst = 0.0, gmax = max_abs_table(g);
    const char *wname = "";
    int n = 0;
    for (int i = 0; i < g->n; i++) {
        const MsParam *p = &g->p[i];
        char key[2 * MS_KEY_MAX];
        if (p->flags & MS_PARAM_BUFFER) continue;
        snprintf(key, sizeof key, "%s%s", prefix, p->name);
        float *want = golden(f, key, p->numel);
        if (!want) continue;
        if (zero_by_theory(p->name)) {
            TestErr e = test_err_f(p->f32, want, p->numel);
            check(e.max_abs <= 1e-6 * gmax, "%s %s: 0 up to rounding, max %.2e (largest gradient %.2e)", net, p->name,
                  e.max_abs, gmax);
        } else {
            TestErr e = test_err_f(p->f32, want, p->numel);
            if (e.rel_l2 > worst || !(e.rel_l2 == e.rel_l2)) { worst = e.rel_l2; wname = p->name; }
            char what[2 * MS_KEY_MAX];
            snprintf(what, sizeof what, "%s d%s", net, p->name);
            check_close(what, p->f32, want, p->numel, GOLD_TOL, 0);
            n++;
        }
        ms_free_aligned(want);
    }
    printf("  %s: %d gradient tensors vs torch float64 autograd, worst rel-L2 %.2e (%s; tol %.0e)\n", net, n, worst,
           wname, GOLD_TOL);
}

/* Rounding noise of L (the float32 forward sums thousands of rounded terms into it) as the
 * differences see it (ECnoise, More & Wild 2011): L at x_k + i delta, i = -4..4, along a
 * coordinate; a 6th difference of 7 of those points cancels the smooth part (delta^6 L^(6):
 * nothing at delta = h / 16) and leaves noise of variance C(12,6) sigma^2 = 924 sigma^2.
 * Pooled rms over 2 coordinates of one tensor. It depends on where a coordinate sits: on the
 * UNet the tensors' figures span 7e-7 .. 1.8e-6, and coordinates within a tensor vary too (the
 * differences of down_blocks.0...attn1.to_out.0.weight[55] deviate 4-5 of its tensor's sigma),
 * so fd_all judges every tensor against the LARGEST figure measured over the net. 1-ulp moves
 * (the previous estimate) keep most roundings and under-read it (text encoder: 9.1e-7 against
 * 1.5e-6). */
static double loss_noise(double (*loss)(void *), void *ctx, MsParam *p, float h) {
    const float delta = h / 16.0f;
    double s2 = 0.0;
    int cnt = 0;
    for (int j = 1; j <= 2; j++) {
        const size_t k = p->numel * (size_t)j / 3;
        const float x0 = p->f32[k];
        double l[9];
        for (int i = 0; i < 9; i++) {
            p->f32[k] = x0 + (float)(i - 4) * delta;
            l[i] = loss(ctx);
        }
        p->f32[k] = x0;
        for (int a = 0; a + 6 < 9; a++) {
            if (!isfinite(l[a] + l[a + 1] + l[a + 2] + l[a + 3] + l[a + 4] + l[a + 5] + l[a + 6])) continue;   /* a kink */
            double d6 = l[a] - 6.0 * l[a + 1] + 15.0 * l[a + 2] - 20.0 * l[a + 3] + 15.0 * l[a + 4] - 6.0 * l[a + 5] + l[a + 6];
            s2 += d6 * d6 / 924.0;
            cnt++;
        }
    }
    return cnt ? sqrt(s2 / cnt) : 0.0;
}

/* Central differences (STYLE.md §8) at ~per coordinates of x (stride 1 + n / per), the loss summed
 * in double. D(s) = (L(x + s) - L(x - s)) / 2s = L' + c2 s^2 + c4 s^4 + ..., at s = h/3, h, 2h
 * (noise sigma_L / (sqrt 2 s) each), and Richardson/Romberg from them:
 *   big = (4 D(h) - D(2h)) / 3         truncation -4 c4 h^4,  noise 0.950 sigma_L / h
 *   rom = (36 small - big) / 35         truncation O(h^6),     noise 2.457 sigma_L / h
 *         (small = (9 D(h/3) - D(h)) / 8, truncation -c4 h^4 / 9)
 * The big step lifts the difference far above the rounding noise of L, but where the loss bends
 * strongly within 2h its c4 h^4 term is what remains: a 6e-2 move of one weight of a small conv
 * feeding GroupNorms of 2-channel groups changes their variance a lot. Measured on the UNet
 * (MS_TEST_FULL): up_blocks.1.resnets.0.conv1.weight errs 6.0e-2 with big at h = 3e-2 but
 * 2.2e-3 at h = 1e-2, and every h from 1e-2 down to 3e-4 agrees with the gradient within the
 * noise (smooth: no kink); the torch golden agrees with dx to 2.6e-6 on those tensors.
 * So per coordinate, from the differences alone (never from dx): |big - rom| estimates big's
 * truncation; big is used when that is under a fifth of what the check allows there, else rom
 * with its own (larger) noise floor. Error of a coordinate:
 *   |num - dx| / max(|num| + |dx|, 1e-3 max |dx| (STYLE.md's floor), FD_NOISE_K sigma_num)
 * so a gradient below what the differences can resolve is judged against that resolution (with
 * FD_NOISE_K = 500 and tolerance 1e-2: a 5 sigma deviation) instead of against itself.
 * *resolved counts the coordinates with |dx| above their noise floor, *romberg those using rom.
 * A loss that is not finite at some step marks a kink within it (the adapter's loss returns NaN
 * when a ReLU changes side): the coordinate is skipped and counted in *kinked. */
static double gradcheck_rich(double (*loss)(void *), void *ctx, float *x, const float *dx, size_t n, int per,
                             float h, double sigma_l, size_t *resolved, size_t *romberg, size_t *kinked) {
    const double sig_big = sqrt(8.0 / 9.0 + 1.0 / 72.0) * sigma_l / h;
    /* rom = 81/70 D(h/3) - 1/6 D(h) + 1/105 D(2h) */
    const double sig_rom = sqrt((81.0 * 81.0 / 4900.0 * 9.0 + 1.0 / 36.0 + 1.0 / 105.0 / 105.0 / 4.0) / 2.0) * sigma_l / h;
    double gmax = 1e-12, worst = 0.0;
    for (size_t k = 0; k < n; k++) gmax = fmax(gmax, fabs(dx[k]));
    for (size_t k = 0; k < n; k += 1 + n / (size_t)per) {
        const float x0 = x[k], st[3] = { h / 3.0f, h, 2.0f * h };
        double d[3];
        for (int m = 0; m < 3; m++) {
            const float xp = x0 + st[m], xm = x0 - st[m];
            x[k] = xp; double lp = loss(ctx);
            x[k] = xm; double lm = loss(ctx);
            x[k] = x0;
            d[m] = (lp - lm) / ((double)xp - (double)xm);   /* the steps as rounded to float */
        }
        if (!isfinite(d[0] + d[1] + d[2])) { (*kinked)++; continue; }
        const double big = (4.0 * d[1] - d[2]) / 3.0, rom = (36.0 * (9.0 * d[0] - d[1]) / 8.0 - big) / 35.0;
        const double allow = FD_TOL / 5.0 * fmax(fmax(2.0 * fabs(big), 1e-3 * gmax), FD_NOISE_K * sig_big);
        const int use_rom = fabs(big - rom) > allow;
        const double num = use_rom ? rom : big, floor_abs = FD_NOISE_K * (use_rom ? sig_rom : sig_big);
        double e = fabs(num - dx[k]) / fmax(fmax(fabs(num) + fabs(dx[k]), 1e-3 * gmax), floor_abs);
        if (e > worst && test_is_verbose())
            printf("      k %zu: dx %.6e num %.6e (%s; D(h/3) %.6e D(h) %.6e D(2h) %.6e), tensor max %.3e\n", k, dx[k],
                   num, use_rom ? "romberg" : "big", d[0], d[1], d[2], gmax);
        worst = fmax(worst, e);
        *resolved += fabs(dx[k]) > floor_abs;
        *romberg += use_rom;
    }
    return worst;
}

/* Central differences of every parameter tensor of w (gradients in g); one check per tensor. */
static void fd_all(const char *net, MsParamTable *w, const MsParamTable *g, double (*loss)(void *), void *ctx, int per,
                   float h) {
    double worst = 0.0, gmax = max_abs_table(g), t0 = ms_time();
    double sig_lo = HUGE_VAL, sig_hi = 0.0;
    for (int i = 0; i < w->n; i++) {
        MsParam *p = &w->p[i];
        if ((p->flags & MS_PARAM_BUFFER) || !p->f32) continue;
        const double sg = loss_noise(loss, ctx, p, h);
        sig_lo = fmin(sig_lo, sg); sig_hi = fmax(sig_hi, sg);
    }
    const double sigma_l = sig_hi;
    const char *wname = "";
    int n = 0;
    size_t coords = 0, resolved = 0, small = 0, kinked = 0;
    for (int i = 0; i < w->n; i++) {
        MsParam *p = &w->p[i];
        const MsParam *d = &g->p[i];
        if (p->flags & MS_PARAM_BUFFER) continue;
        if (zero_by_theory(p->name)) {   /* FD of a constant: noise; the golden check covers it */
            double m = 0.0;
            for (size_t k = 0; k < d->numel; k++) m = fmax(m, fabs(d->f32[k]));
            check(m <= 1e-6 * gmax, "%s d%s is 0 up to rounding: max %.2e", net, p->name, m);
            continue;
        }
        double e = gradcheck_rich(loss, ctx, p->f32, d->f32, p->numel, per, h, sigma_l, &resolved, &small, &kinked);
        coords += (p->numel + p->numel / (size_t)per) / (1 + p->numel / (size_t)per);
        if (e > worst) { worst = e; wname = p->name; }
        check(e <= FD_TOL, "%s central differences d%s: worst rel err %.2e", net, p->name, e);
        n++;
    }
    check(2 * kinked <= coords, "%s central differences: %zu of %zu coordinates skipped at a kink", net, kinked, coords);
    printf("  %s: central differences (Richardson at h %.0e; Romberg with h/3 where its truncation shows: %zu) on %d tensors, %zu "
           "coordinates (%zu above the noise floor, %zu skipped at a kink, %d sigma of sigma_L = the largest of the tensors' %.1e .. "
           "%.1e; largest gradient %.2e): worst rel err %.2e (%s; tol %.0e), %.1f s\n", net, (double)h, small, n, coords,
           resolved, kinked, FD_NOISE_K, sig_lo, sig_hi, gmax, worst, wname, FD_TOL, ms_time() - t0);
}

/* ---------------------------------------------------------------------------------------- */
/* UNet                                                                                      */
/* ---------------------------------------------------------------------------------------- */
typedef struct {
    UNetActs a;
    Arena acts, scratch;
    UNetConfig c;
    UNetParams p, dp;
    MsParamTable w, g;
    float *x, *t, *ctx, *R, *eps, *dctx;
    size_t nx, nc;
} UNetRun;

static double unet_loss(void *v) {
    UNetRun *u = (UNetRun *)v;
    unet_forward(u->eps, &u->a, u->x, u->t, u->ctx, NULL, NULL, &u->p, NULL);
    double s = 0.0;
    for (size_t i = 0; i < u->nx; i++) s += (double)u->R[i] * u->eps[i];
    return s;
}

/* forward, zero the gradients, full backward */
static MsStatus unet_step(UNetRun *u) {
    unet_loss(u);
    memset(u->g.mem, 0, u->g.mem_bytes);
    memset(u->dctx, 0, u->nc * sizeof(float));
    return unet_backward_full(&u->a, &u->p, NULL, NULL, &u->dp, u->R, u->dctx, NULL);
}

static void test_unet(void) {
    const int N = 2, H = 8, W = 12, Tk = 7;
    UNetRun u;
    UNetSizes sz;
    memset(&u, 0, sizeof u);
    unet_cfg(&u.c);
    if (!check(ms_param_table_unet(&u.c, &u.w) == MS_OK && ms_param_table_unet(&u.c, &u.g) == MS_OK, "unet tables"))
        return;
    if (!table_fill(&G, &u.w, "unet/w/") || !table_fill(&G, &u.g, "")) return;
    if (!check(unet_params_init(&u.p, &u.c, &u.w) == MS_OK && unet_params_init(&u.dp, &u.c, &u.g) == MS_OK,
               "unet params: %s", ms_last_error()))
        return;
    u.nx = (size_t)N * 4 * H * W;
    u.nc = (size_t)N * Tk * u.c.cross_attention_dim;
    u.x = golden(&G, "unet/in/x", u.nx); u.t = golden(&G, "unet/in/t", N); u.ctx = golden(&G, "unet/in/ctx", u.nc);
    u.R = golden(&G, "unet/in/R", u.nx);
    u.eps = test_zeros(u.nx); u.dctx = test_zeros(u.nc);
    if (!u.x || !u.t || !u.ctx || !u.R) return;
    if (unet_sizes(&u.c, N, H, W, Tk, 1, &sz) || arena_init(&u.acts, sz.acts_bytes) ||
        arena_init(&u.scratch, sz.scratch_bytes) || unet_acts_init(&u.a, &u.c, N, H, W, Tk, 1, &u.acts, &u.scratch)) {
        check(0, "unet activations: %s", ms_last_error());
        return;
    }

    /* golden */
    MsStatus s = unet_step(&u);
    check(s == MS_OK, "unet_backward_full: %s", s ? ms_last_error() : "ok");
    float *eps_ref = golden(&G, "unet/eps", u.nx);
    if (eps_ref) check_close("unet eps (forward)", u.eps, eps_ref, u.nx, GOLD_TOL, 0);
    ms_free_aligned(eps_ref);
    cmp_golden(&G, "unet", &u.g, "unet/g/");

    /* the context gradient is the LoRA path's, bit for bit */
    {
        float *dctx0 = test_zeros(u.nc);
        unet_loss(&u);
        unet_backward(&u.a, &u.p, NULL, NULL, u.R, dctx0, NULL);
        check_bitwise("unet d context with and without dp", u.dctx, dctx0, u.nc);
        ms_free_aligned(dctx0);
    }

    /* 1 vs 2 threads */
    if (ms_max_threads() >= 2) {
        unsigned char *g1 = (unsigned char *)malloc(u.g.mem_bytes);
        int old = ms_get_threads();
        ms_set_threads(1);
        unet_step(&u);
        memcpy(g1, u.g.mem, u.g.mem_bytes);
        ms_set_threads(2);
        unet_step(&u);
        ms_set_threads(old);
        int bad = -1;
        for (int i = 0; i < u.g.n && bad < 0; i++)
            if (u.g.p[i].f32 && memcmp(u.g.p[i].f32, g1 + ((unsigned char *)u.g.p[i].f32 - (unsigned char *)u.g.mem),
                                       u.g.p[i].numel * sizeof(float)))
                bad = i;
        check(bad < 0, "unet: every parameter gradient bit-identical for 1 and 2 threads%s%s", bad < 0 ? "" : " -- NO: ",
              bad < 0 ? "" : u.g.p[bad].name);
        free(g1);
    } else {
        printf("  (one core: the 1 vs 2 thread check needs two)\n");
    }

    /* central differences: N = 1, an 8x8 latent, Tk = 5 (cheaper forwards); ~12 coordinates per tensor
     * in `make test` (every tensor; a minute of forwards otherwise), ~200 under MS_TEST_FULL */
    unet_acts_free(&u.a);
    arena_free(&u.acts); arena_free(&u.scratch);
    {
        const int n1 = 1, h1 = 8, w1 = 8, tk1 = 5;
        MsRng rng;
        ms_rng_seed(&rng, 15);
        u.nx = (size_t)n1 * 4 * h1 * w1;
        u.nc = (size_t)n1 * tk1 * u.c.cross_attention_dim;
        ms_rng_fill_normal(&rng, u.x, u.nx, 0.0f, 1.0f);
        ms_rng_fill_normal(&rng, u.R, u.nx, 0.0f, 1.0f);
        ms_rng_fill_normal(&rng, u.ctx, u.nc, 0.0f, 1.0f);
        u.t[0] = 511.25f;
        if (unet_sizes(&u.c, n1, h1, w1, tk1, 1, &sz) || arena_init(&u.acts, sz.acts_bytes) ||
            arena_init(&u.scratch, sz.scratch_bytes) ||
            unet_acts_init(&u.a, &u.c, n1, h1, w1, tk1, 1, &u.acts, &u.scratch)) {
            check(0, "unet activations: %s", ms_last_error());
            return;
        }
        unet_step(&u);
        fd_all("unet", &u.w, &u.g, unet_loss, &u, test_full() ? 200 : 12, FD_EPS);
    }

    /* refusals */
    {
        UNetParams p16;
        MsParamTable w16;
        ms_param_table_unet(&u.c, &w16);
        table_alloc_as(&w16, MS_DT_F16);
        unet_loss(&u);
        if (check(unet_params_init(&p16, &u.c, &w16) == MS_OK, "f16 unet params")) {
            s = unet_backward_full(&u.a, &p16, NULL, NULL, &u.dp, u.R, NULL, NULL);
            check(s == MS_ERR_UNSUPPORTED, "f16 weights refused: %s", ms_last_error());
            s = unet_backward_full(&u.a, &u.p, NULL, NULL, &p16, u.R, NULL, NULL);
            check(s == MS_ERR_UNSUPPORTED, "f16 gradients refused: %s", ms_last_error());
            unet_params_free(&p16);
        }
        ms_param_table_free(&w16);
        UNetConfig c2 = u.c;
        UNetParams p2;
        MsParamTable t2;
        c2.block_out_channels[1] = 24; c2.norm_num_groups = 4;
        if (ms_param_table_unet(&c2, &t2) == MS_OK && table_fill(&G, &t2, "") && unet_params_init(&p2, &c2, &t2) == MS_OK) {
            s = unet_backward_full(&u.a, &u.p, NULL, NULL, &p2, u.R, NULL, NULL);
            check(s == MS_ERR_ARG, "gradients of another config refused: %s", ms_last_error());
            unet_params_free(&p2);
        }
        ms_param_table_free(&t2);
    }

    unet_acts_free(&u.a);
    arena_free(&u.acts); arena_free(&u.scratch);
    unet_params_free(&u.p); unet_params_free(&u.dp);
    ms_param_table_free(&u.w); ms_param_table_free(&u.g);
    ms_free_aligned(u.x); ms_free_aligned(u.t); ms_free_aligned(u.ctx); ms_free_aligned(u.R);
    ms_free_aligned(u.eps); ms_free_aligned(u.dctx);
}

/* ---------------------------------------------------------------------------------------- */
/* CLIP text encoder                                                                         */
/* ---------------------------------------------------------------------------------------- */
typedef struct {
    ClipTextConfig c;
    ClipTextActs a;
    Arena ar;
    ClipTextParams p, dp;
    MsParamTable w, g;
    int32_t *ids;
    float *R;
    size_t no;
} TextRun;

static double text_loss(void *v) {
    TextRun *r = (TextRun *)v;
    clip_text_forward(&r->a, &r->p, NULL, r->ids, NULL, 0, &r->c);
    double s = 0.0;
    for (size_t i = 0; i < r->no; i++) s += (double)r->R[i] * r->a.out[i];
    return s;
}

static MsStatus text_step(TextRun *r) {
    text_loss(r);
    memset(r->g.mem, 0, r->g.mem_bytes);
    return clip_text_backward_full(NULL, NULL, &r->dp, r->R, &r->a, &r->p, NULL, r->ids, 0, &r->c);
}

static int text_acts(TextRun *r, int B, int T, int mode) {
    arena_free(&r->ar);
    return check(arena_init(&r->ar, clip_text_sizes(&r->c, B, T, 0, mode)) == MS_OK &&
                 clip_text_acts_alloc(&r->a, &r->ar, &r->c, B, T, 0, mode) == MS_OK, "text acts mode %d", mode);
}

static void test_text(void) {
    const int B = 2, T = 9;
    TextRun r;
    memset(&r, 0, sizeof r);
    text_cfg(&r.c);
    if (!check(ms_param_table_text(&r.c, &r.w) == MS_OK && ms_param_table_text(&r.c, &r.g) == MS_OK, "text tables"))
        return;
    if (!table_fill(&G, &r.w, "text/w/") || !table_fill(&G, &r.g, "")) return;
    if (!check(clip_text_params(&r.p, &r.w, &r.c) == MS_OK && clip_text_params(&r.dp, &r.g, &r.c) == MS_OK,
               "text params: %s", ms_last_error()))
        return;
    r.no = (size_t)B * T * r.c.hidden_size;
    r.R = golden(&G, "text/in/R", r.no);
    float *idf = golden(&G, "text/in/ids", (size_t)B * T);
    if (!r.R || !idf) return;
    r.ids = (int32_t *)malloc((size_t)B * T * sizeof(int32_t));
    for (int i = 0; i < B * T; i++) r.ids[i] = (int32_t)idf[i];
    ms_free_aligned(idf);

    unsigned char *keep = (unsigned char *)malloc(r.g.mem_bytes);
    for (int mode = CLIP_TRAIN_KEEP; mode <= CLIP_TRAIN_RECOMPUTE; mode++) {
        if (!text_acts(&r, B, T, mode)) return;
        MsStatus s = text_step(&r);
        check(s == MS_OK, "clip_text_backward_full (mode %d): %s", mode, s ? ms_last_error() : "ok");
        if (mode == CLIP_TRAIN_KEEP) {
            float *out_ref = golden(&G, "text/out", r.no);
            if (out_ref) check_close("text out (forward)", r.a.out, out_ref, r.no, GOLD_TOL, 0);
            ms_free_aligned(out_ref);
            cmp_golden(&G, "text", &r.g, "text/g/");
            memcpy(keep, r.g.mem, r.g.mem_bytes);
        } else {
            check(!memcmp(keep, r.g.mem, r.g.mem_bytes), "text: CLIP_TRAIN_RECOMPUTE gradients bit-identical to KEEP");
        }
    }
    if (ms_max_threads() >= 2) {
        int old = ms_get_threads();
        ms_set_threads(1);
        text_step(&r);
        memcpy(keep, r.g.mem, r.g.mem_bytes);
        ms_set_threads(2);
        text_step(&r);
        ms_set_threads(old);
        check(!memcmp(keep, r.g.mem, r.g.mem_bytes), "text: every parameter gradient bit-identical for 1 and 2 threads");
    }
    free(keep);

    text_step(&r);
    fd_all("text", &r.w, &r.g, text_loss, &r, 200, FD_EPS);

    {   /* refusals: 16-bit weights */
        MsParamTable w16;
        ClipTextParams p16;
        ms_param_table_text(&r.c, &w16);
        table_alloc_as(&w16, MS_DT_BF16);
        if (check(clip_text_params(&p16, &w16, &r.c) == MS_OK, "bf16 text params")) {
            MsStatus s = clip_text_backward_full(NULL, NULL, &r.dp, r.R, &r.a, &p16, NULL, r.ids, 0, &r.c);
            check(s == MS_ERR_UNSUPPORTED, "bf16 text weights refused: %s", ms_last_error());
        }
        ms_param_table_free(&w16);
    }
    arena_free(&r.ar);
    ms_param_table_free(&r.w); ms_param_table_free(&r.g);
    ms_free_aligned(r.R);
    free(r.ids);
}

/* ---------------------------------------------------------------------------------------- */
/* VAE (AutoencoderKL): encoder, posterior, KL, decoder                                      */
/* ---------------------------------------------------------------------------------------- */
#define VAE_GOLDEN "tests/data/vae_fullgrad_golden.safetensors"
#define VAE_KL_W 0.25f   /* gen_vae_fullgrad_golden.py KL_W */

static StFile GV;

static void vae_cfg(VaeConfig *c) {   /* gen_vae_fullgrad_golden.py CFG */
    ms_vae_config_sd15(c);
    c->sample_size = 16;
    c->n_blocks = 2;
    c->block_out_channels[0] = 8; c->block_out_channels[1] = 16;
    c->layers_per_block = 2;
    c->norm_num_groups = 4;
    c->latent_channels = 4;
}

typedef struct {
    VaeConfig c;
    VaeParams p, dp;
    MsParamTable w, g;
    VaeTape te, td;
    Arena ar;
    int N, H, W;
    size_t nx, nl;
    float *x, *eps, *R, *mean, *logvar, *z, *img, *kl, *dx, *dz, *dmean, *dlogvar;
} VaeTrainRun;

/* forward: encode, z = mean + std eps, decode; loss summed in double, computed here from the
 * outputs (the KL too, independently of vae_kl) */
static MsStatus vae_fwd(VaeTrainRun *v, double *loss) {
    MsStatus s;
    arena_reset(&v->ar, 0);
    if ((s = vae_encode_train(&v->te, &v->ar, &v->p, v->mean, v->logvar, v->x, v->N, v->H, v->W))) return s;
    vae_posterior_sample(v->z, NULL, v->mean, v->logvar, v->eps, v->nl, 1.0f);
    if ((s = vae_decode_train(&v->td, &v->ar, &v->p, v->img, v->z, v->N, v->H / 2, v->W / 2))) return s;
    double l = 0.0;
    for (size_t i = 0; i < v->nx; i++) l += (double)v->R[i] * v->img[i];
    for (size_t i = 0; i < v->nl; i++)
        l += VAE_KL_W * 0.5 * ((double)v->mean[i] * v->mean[i] + exp((double)v->logvar[i]) - 1.0 - v->logvar[i]);
    *loss = l;
    return MS_OK;
}

static double vae_loss(void *ctx) {
    double l = 0.0;
    vae_fwd((VaeTrainRun *)ctx, &l);
    return l;
}

/* forward, zero the gradients, backward through decoder, posterior, KL, encoder */
static MsStatus vae_step(VaeTrainRun *v) {
    MsStatus s;
    double l;
    if ((s = vae_fwd(v, &l))) return s;
    memset(v->g.mem, 0, v->g.mem_bytes);
    memset(v->dx, 0, v->nx * sizeof(float));
    memset(v->dz, 0, v->nl * sizeof(float));
    memset(v->dmean, 0, v->nl * sizeof(float));
    memset(v->dlogvar, 0, v->nl * sizeof(float));
    if ((s = vae_decode_backward_full(&v->td, &v->dp, v->dz, v->R))) return s;
    vae_posterior_sample_backward(v->dmean, v->dlogvar, v->dz, v->logvar, v->eps, v->nl, 1.0f);
    const float dkl[2] = { VAE_KL_W, VAE_KL_W };
    vae_kl_backward(v->dmean, v->dlogvar, dkl, v->mean, v->logvar, v->N, v->nl / (size_t)v->N);
    return vae_encode_backward_full(&v->te, &v->dp, v->dx, v->dmean, v->dlogvar);
}

static void test_vae(void) {
    VaeTrainRun v;
    memset(&v, 0, sizeof v);
    vae_cfg(&v.c);
    v.N = 2; v.H = 16; v.W = 24;
    const int lat = v.c.latent_channels;
    v.nx = (size_t)v.N * 3 * v.H * v.W;
    v.nl = (size_t)v.N * lat * (v.H / 2) * (v.W / 2);
    if (!check(ms_param_table_vae(&v.c, &v.w) == MS_OK && ms_param_table_vae(&v.c, &v.g) == MS_OK, "vae tables")) return;
    if (!table_fill(&GV, &v.w, "w/") || !table_fill(&GV, &v.g, "")) return;
    if (!check(vae_params_init(&v.p, &v.c, &v.w) == MS_OK && vae_params_init(&v.dp, &v.c, &v.g) == MS_OK,
               "vae params: %s", ms_last_error()))
        return;
    size_t be = 0, bd = 0;
    if (!check(vae_train_sizes(&v.c, 1, v.N, v.H, v.W, &be) == MS_OK &&
               vae_train_sizes(&v.c, 0, v.N, v.H / 2, v.W / 2, &bd) == MS_OK && arena_init(&v.ar, be + bd) == MS_OK,
               "vae training sizes: %s", ms_last_error()))
        return;
    printf("  vae: training tapes of %zu + %zu bytes (N %d, %dx%d)\n", be, bd, v.N, v.H, v.W);
    v.x = golden(&GV, "in/x", v.nx); v.eps = golden(&GV, "in/eps", v.nl); v.R = golden(&GV, "in/R", v.nx);
    if (!v.x || !v.eps || !v.R) return;
    v.mean = test_zeros(v.nl); v.logvar = test_zeros(v.nl); v.z = test_zeros(v.nl); v.img = test_zeros(v.nx);
    v.kl = test_zeros((size_t)v.N); v.dx = test_zeros(v.nx); v.dz = test_zeros(v.nl);
    v.dmean = test_zeros(v.nl); v.dlogvar = test_zeros(v.nl);

    /* golden */
    MsStatus s = vae_step(&v);
    if (!check(s == MS_OK, "vae training step: %s", s ? ms_last_error() : "ok")) return;
    check(arena_mark(&v.ar) <= be + bd && arena_mark(&v.ar) + 2 * 64 * (size_t)(v.te.n_t + v.td.n_t + v.te.n_ops +
                                                                             v.td.n_ops) >= be + bd,
          "vae: the tapes take the planned %zu bytes (took %zu)", be + bd, arena_mark(&v.ar));
    vae_kl(v.kl, v.mean, v.logvar, v.N, v.nl / (size_t)v.N);
    {
        const char *keys[5] = { "out/mean", "out/logvar", "out/img", "out/kl", "dx" };
        const float *got[5] = { v.mean, v.logvar, v.img, v.kl, v.dx };
        const size_t nn[5] = { v.nl, v.nl, v.nx, (size_t)v.N, v.nx };
        for (int i = 0; i < 5; i++) {
            float *want = golden(&GV, keys[i], nn[i]);
            char what[64];
            snprintf(what, sizeof what, "vae %s", keys[i]);
            if (want) check_close(what, got[i], want, nn[i], GOLD_TOL, 0);
            ms_free_aligned(want);
        }
        /* the last logvar channel lies below the clamp: no gradient reaches its moments */
        const MsParam *qb = v.dp.quant_b;
        int clamped = 1;
        for (size_t i = 0; i < v.nl; i++)
            if ((i / (v.nl / (size_t)v.N / (size_t)lat)) % (size_t)lat == (size_t)lat - 1) clamped &= v.logvar[i] == -30.0f;
        check(clamped && qb->f32[2 * lat - 1] == 0.0f, "vae: clamped logvar channel %d at -30 and its quant_conv.bias "
              "gradient exactly 0 (%.3e)", lat - 1, qb->f32[2 * lat - 1]);
    }
    cmp_golden(&GV, "vae", &v.g, "g/");

    /* inference and training forwards agree */
    {
        VaeSizes vs;
        Arena sc;
        float *m2 = test_zeros(v.nl), *l2 = test_zeros(v.nl), *img2 = test_zeros(v.nx), *lat2 = test_zeros(v.nl);
        if (vae_sizes(&v.c, v.H, v.W, -1, &vs) == MS_OK && arena_init(&sc, vs.encode_bytes + vs.decode_bytes) == MS_OK) {
            vae_encode(&v.p, &sc, m2, l2, v.x, v.N, v.H, v.W);
            /* scaling factor 1 here: the training step decodes the sample itself, and (z s) / s is
             * not z in float (that round trip alone moved the decode by ~1e-6) */
            VaeParams p1 = v.p;
            p1.cfg.scaling_factor = 1.0f;
            vae_posterior_sample(lat2, NULL, v.mean, v.logvar, v.eps, v.nl, 1.0f);
            vae_decode(&p1, &sc, img2, lat2, v.N, v.H / 2, v.W / 2);
            check_close("vae training vs inference mean", v.mean, m2, v.nl, 1e-6, 0);
            check_close("vae training vs inference logvar", v.logvar, l2, v.nl, 1e-6, 0);
            check_close("vae training vs inference decode", v.img, img2, v.nx, 1e-6, 0);
            arena_free(&sc);
        }
        ms_free_aligned(m2); ms_free_aligned(l2); ms_free_aligned(img2); ms_free_aligned(lat2);
    }

    /* 1 vs 2 threads */
    if (ms_max_threads() >= 2) {
        unsigned char *g1 = (unsigned char *)malloc(v.g.mem_bytes);
        float *dx1 = test_zeros(v.nx);
        int old = ms_get_threads();
        ms_set_threads(1);
        vae_step(&v);
        memcpy(g1, v.g.mem, v.g.mem_bytes);
        memcpy(dx1, v.dx, v.nx * sizeof(float));
        ms_set_threads(2);
        vae_step(&v);
        ms_set_threads(old);
        check(!memcmp(g1, v.g.mem, v.g.mem_bytes) && !memcmp(dx1, v.dx, v.nx * sizeof(float)),
              "vae: every parameter gradient and dx bit-identical for 1 and 2 threads");
        free(g1);
        ms_free_aligned(dx1);
    } else {
        printf("  (one core: the 1 vs 2 thread check needs two)\n");
    }

    vae_step(&v);
    fd_all("vae", &v.w, &v.g, vae_loss, &v, test_full() ? 200 : 12, FD_EPS);

    /* refusals */
    {
        VaeParams p16;
        MsParamTable w16;
        ms_param_table_vae(&v.c, &w16);
        table_alloc_as(&w16, MS_DT_F16);
        if (check(vae_params_init(&p16, &v.c, &w16) == MS_OK, "f16 vae params")) {
            arena_reset(&v.ar, 0);
            s = vae_encode_train(&v.te, &v.ar, &p16, v.mean, v.logvar, v.x, v.N, v.H, v.W);
            check(s == MS_ERR_UNSUPPORTED, "vae: f16 weights refused: %s", ms_last_error());
            vae_step(&v);
            s = vae_decode_backward_full(&v.td, &p16, v.dz, v.R);
            check(s == MS_ERR_UNSUPPORTED, "vae: f16 gradients refused: %s", ms_last_error());
        }
        ms_param_table_free(&w16);
        VaeConfig c2 = v.c;
        VaeParams p2;
        MsParamTable t2;
        c2.block_out_channels[1] = 24;
        if (ms_param_table_vae(&c2, &t2) == MS_OK && table_fill(&GV, &t2, "") && vae_params_init(&p2, &c2, &t2) == MS_OK) {
            s = vae_encode_backward_full(&v.te, &p2, NULL, v.dmean, v.dlogvar);
            check(s == MS_ERR_ARG, "vae: gradients of another config refused: %s", ms_last_error());
        }
        ms_param_table_free(&t2);
        arena_reset(&v.ar, 0);
        s = vae_encode_train(&v.te, &v.ar, &v.p, v.mean, v.logvar, v.x, v.N, v.H + 1, v.W);
        check(s == MS_ERR_SHAPE, "vae: odd image side refused: %s", ms_last_error());
        Arena small;
        if (arena_init(&small, be / 2) == MS_OK) {
            s = vae_encode_train(&v.te, &small, &v.p, v.mean, v.logvar, v.x, v.N, v.H, v.W);
            check(s == MS_ERR_NOMEM, "vae: an arena too small refused: %s", ms_last_error());
            arena_free(&small);
        }
    }

    arena_free(&v.ar);
    ms_param_table_free(&v.w); ms_param_table_free(&v.g);
    float *bufs[] = { v.x, v.eps, v.R, v.mean, v.logvar, v.z, v.img, v.kl, v.dx, v.dz, v.dmean, v.dlogvar };
    for (size_t i = 0; i < sizeof bufs / sizeof bufs[0]; i++) ms_free_aligned(bufs[i]);
}

/* ---------------------------------------------------------------------------------------- */
/* T2I-Adapter (adapter_backward_full) and the UNet's residual gradients (UNetActs.dadapter)   */
/* ---------------------------------------------------------------------------------------- */
#define AD_GOLDEN "tests/data/adapter_fullgrad_golden.safetensors"

static StFile GA;

/* gen_adapter_fullgrad_golden.py UNET_A (which 0) / UNET_B (which 1) */
static void ad_unet_cfg(UNetConfig *c, int which) {
    ms_unet_config_sd15(c);
    c->sample_size = 8;
    c->n_blocks = 3;
    for (int i = 0; i < 3; i++) {
        c->attention_head_dim[i] = 2;
        c->transformer_layers_per_block[i] = 1;
        c->down_block_types[i] = (which ? i < 2 : i > 0) ? MS_BLOCK_CROSS_ATTN_DOWN : MS_BLOCK_DOWN;
        c->up_block_types[2 - i] = c->down_block_types[i] == MS_BLOCK_DOWN ? MS_BLOCK_UP : MS_BLOCK_CROSS_ATTN_UP;
    }
    c->block_out_channels[0] = 4;
    c->block_out_channels[1] = which ? 8 : 4;
    c->block_out_channels[2] = 8;
    c->layers_per_block = which ? 2 : 1;
    c->norm_num_groups = 2;
    c->cross_attention_dim = 16;
}

static void ad_cfg(AdapterConfig *c) {   /* gen_adapter_fullgrad_golden.py ADAPTER */
    memset(c, 0, sizeof *c);
    c->adapter_type = MS_ADAPTER_FULL;
    c->in_channels = 2;
    c->n_channels = 3;
    c->channels[0] = 4; c->channels[1] = 8; c->channels[2] = 8;
    c->num_res_blocks = 2;
    c->downscale_factor = 4;
}

typedef struct {
    UNetConfig c;
    UNetActs a;
    Arena acts, scratch;
    UNetParams p;
    MsParamTable w;
    float *x, *t, *ctx, *R, *eps;
    size_t nx, nres[3];
    float *res[3], *dres[3];         /* residuals (part a: golden inputs; part b: the adapter's features) */
    /* part b */
    AdapterConfig ac;
    MsParamTable aw, ag;
    AdapterParams ap, adp;
    AdapterTape tape;
    Arena ar;
    float *cond, *dcond;
    size_t ncond;
    /* the adapter alone: L = sum_i sum(Rf_i * feature_i); guard: NaN when a ReLU input changed side */
    int pure, guard;
    float *Rf[3];
    uint64_t sig0;
} AdRun;

/* Which ReLU inputs are positive (r > 0 iff its input is), hashed (FNV-1a over the bits). */
static uint64_t ad_relu_signature(const AdapterTape *t) {
    uint64_t h = 1469598103934665603ull;
    const int f = t->cfg.downscale_factor;
    for (int i = 0; i < t->cfg.n_channels; i++) {
        const size_t n = (size_t)t->N * t->cfg.channels[i] * (t->H / f >> i) * (t->W / f >> i);
        for (int j = 0; j < t->cfg.num_res_blocks; j++)
            for (size_t k = 0; k < n; k++) h = (h ^ (uint64_t)(t->r[i][j][k] > 0.0f)) * 1099511628211ull;
    }
    return h;
}

static int ad_unet_setup(AdRun *u, int which, const char *wprefix, const char *inprefix) {
    const int N = 2, H = 8, W = 12, Tk = 5;
    UNetSizes sz;
    char key[64];
    ad_unet_cfg(&u->c, which);
    if (!check(ms_param_table_unet(&u->c, &u->w) == MS_OK, "adapter test unet table: %s", ms_last_error()) ||
        !table_fill(&GA, &u->w, wprefix) ||
        !check(unet_params_init(&u->p, &u->c, &u->w) == MS_OK, "adapter test unet params: %s", ms_last_error()))
        return 0;
    u->nx = (size_t)N * 4 * H * W;
    snprintf(key, sizeof key, "%sx", inprefix); u->x = golden(&GA, key, u->nx);
    snprintf(key, sizeof key, "%st", inprefix); u->t = golden(&GA, key, N);
    snprintf(key, sizeof key, "%sctx", inprefix); u->ctx = golden(&GA, key, (size_t)N * Tk * 16);
    snprintf(key, sizeof key, "%sR", inprefix); u->R = golden(&GA, key, u->nx);
    u->eps = test_zeros(u->nx);
    if (!u->x || !u->t || !u->ctx || !u->R) return 0;
    if (!check(unet_sizes(&u->c, N, H, W, Tk, 1, &sz) == MS_OK && arena_init(&u->acts, sz.acts_bytes) == MS_OK &&
               arena_init(&u->scratch, sz.scratch_bytes) == MS_OK &&
               unet_acts_init(&u->a, &u->c, N, H, W, Tk, 1, &u->acts, &u->scratch) == MS_OK,
               "adapter test unet activations: %s", ms_last_error()))
        return 0;
    for (int i = 0; i < 3; i++) {   /* residual i: the shape of down block i's output (unet_forward) */
        const int lv = i + (u->c.down_block_types[i] == MS_BLOCK_DOWN && i < 2);
        u->nres[i] = (size_t)N * u->c.block_out_channels[i] * u->a.lh[lv] * u->a.lw[lv];
        u->dres[i] = test_zeros(u->nres[i]);
    }
    u->a.dadapter = u->dres;
    return 1;
}

static void ad_unet_free(AdRun *u) {
    unet_acts_free(&u->a);
    arena_free(&u->acts); arena_free(&u->scratch);
    unet_params_free(&u->p);
    ms_param_table_free(&u->w);
    float *b[] = { u->x, u->t, u->ctx, u->R, u->eps, u->dres[0], u->dres[1], u->dres[2] };
    for (size_t i = 0; i < sizeof b / sizeof b[0]; i++) ms_free_aligned(b[i]);
}

/* sum(R * UNet(x, t, ctx, residuals)) in double; part b runs the adapter first */
static double ad_loss(void *v) {
    AdRun *u = (AdRun *)v;
    if (u->cond) {
        arena_reset(&u->ar, 0);
        if (adapter_forward_train(&u->tape, &u->ar, &u->ap, u->cond, 2, 32, 48)) return NAN;
        for (int i = 0; i < 3; i++) u->res[i] = u->tape.x[i][u->ac.num_res_blocks];
        if (u->pure) {
            if (u->guard && ad_relu_signature(&u->tape) != u->sig0) return NAN;
            double s = 0.0;
            for (int i = 0; i < 3; i++)
                for (size_t k = 0; k < u->nres[i]; k++) s += (double)u->Rf[i][k] * u->res[i][k];
            return s;
        }
    }
    unet_forward(u->eps, &u->a, u->x, u->t, u->ctx, NULL, (const float *const *)u->res, &u->p, NULL);
    double s = 0.0;
    for (size_t i = 0; i < u->nx; i++) s += (double)u->R[i] * u->eps[i];
    return s;
}

/* forward, zero the gradients, UNet backward (residual gradients), then the adapter's */
static MsStatus ad_step(AdRun *u) {
    MsStatus s = MS_OK;
    ad_loss(u);
    for (int i = 0; i < 3; i++) memset(u->dres[i], 0, u->nres[i] * sizeof(float));
    if (!u->pure && ((s = unet_backward(&u->a, &u->p, NULL, NULL, u->R, NULL, NULL)) || !u->cond)) return s;
    memset(u->ag.mem, 0, u->ag.mem_bytes);
    memset(u->dcond, 0, u->ncond * sizeof(float));
    return adapter_backward_full(&u->tape, &u->adp, u->dcond, (const float *const *)(u->pure ? u->Rf : u->dres));
}

/* the residual gradients and dcond bit-identical for 1 and 2 threads (and the adapter's table) */
static void ad_threads(AdRun *u, const char *what) {
    if (ms_max_threads() < 2) { printf("  (one core: the 1 vs 2 thread check needs two)\n"); return; }
    float *keep[3];
    unsigned char *g1 = u->cond ? (unsigned char *)malloc(u->ag.mem_bytes) : NULL;
    float *dc1 = u->cond ? test_zeros(u->ncond) : NULL;
    int old = ms_get_threads(), same = 1;
    ms_set_threads(1);
    ad_step(u);
    for (int i = 0; i < 3; i++) { keep[i] = test_zeros(u->nres[i]); memcpy(keep[i], u->dres[i], u->nres[i] * sizeof(float)); }
    if (u->cond) { memcpy(g1, u->ag.mem, u->ag.mem_bytes); memcpy(dc1, u->dcond, u->ncond * sizeof(float)); }
    ms_set_threads(2);
    ad_step(u);
    ms_set_threads(old);
    for (int i = 0; i < 3; i++) { same &= !memcmp(keep[i], u->dres[i], u->nres[i] * sizeof(float)); ms_free_aligned(keep[i]); }
    if (u->cond) same &= !memcmp(g1, u->ag.mem, u->ag.mem_bytes) && !memcmp(dc1, u->dcond, u->ncond * sizeof(float));
    check(same, "%s: every gradient bit-identical for 1 and 2 threads", what);
    free(g1);
    ms_free_aligned(dc1);
}

/* part a: unet_backward's dL/d(residual i), a UNet whose first block is a DownBlock2D with a
 * downsampler (its residual after it) and whose last is a CrossAttnDownBlock2D */
static void test_unet_residuals(void) {
    AdRun u;
    char key[64];
    memset(&u, 0, sizeof u);
    if (!ad_unet_setup(&u, 0, "a/w/", "a/in/")) { ad_unet_free(&u); return; }
    for (int i = 0; i < 3; i++) {
        snprintf(key, sizeof key, "a/in/res/%d", i);
        u.res[i] = golden(&GA, key, u.nres[i]);
        if (!u.res[i]) { ad_unet_free(&u); return; }
    }
    MsStatus s = ad_step(&u);
    check(s == MS_OK, "unet_backward with residual gradients: %s", s ? ms_last_error() : "ok");
    float *want = golden(&GA, "a/eps", u.nx);
    if (want) check_close("unet (a) eps with residuals", u.eps, want, u.nx, GOLD_TOL, 0);
    ms_free_aligned(want);
    for (int i = 0; i < 3; i++) {
        char what[64];
        snprintf(key, sizeof key, "a/dres/%d", i);
        snprintf(what, sizeof what, "unet (a) d residual %d (%s)", i,
                 u.c.down_block_types[i] == MS_BLOCK_DOWN ? "DownBlock2D" : "CrossAttnDownBlock2D");
        if ((want = golden(&GA, key, u.nres[i]))) check_close(what, u.dres[i], want, u.nres[i], GOLD_TOL, 0);
        ms_free_aligned(want);
    }
    ad_threads(&u, "unet (a) residuals");
    {   /* central differences on the residuals themselves */
        MsParam rp[3], dp[3];
        MsParamTable rt, dt;
        memset(rp, 0, sizeof rp); memset(dp, 0, sizeof dp);
        for (int i = 0; i < 3; i++) {
            snprintf(rp[i].name, sizeof rp[i].name, "residual.%d", i);
            rp[i].f32 = u.res[i]; rp[i].numel = u.nres[i];
            dp[i] = rp[i]; dp[i].f32 = u.dres[i];
        }
        rt.p = rp; dt.p = dp; rt.n = dt.n = 3;
        ad_step(&u);
        fd_all("unet (a) residuals", &rt, &dt, ad_loss, &u, 60, FD_EPS);
    }
    for (int i = 0; i < 3; i++) ms_free_aligned(u.res[i]);
    ad_unet_free(&u);
}

/* part b: adapter -> UNet (SD's block order), every adapter parameter and the condition */
static void test_adapter_backward(void) {
    AdRun u;
    char key[64];
    memset(&u, 0, sizeof u);
    if (!ad_unet_setup(&u, 1, "b/unet/", "b/in/")) { ad_unet_free(&u); return; }
    ad_cfg(&u.ac);
    u.ncond = (size_t)2 * 2 * 32 * 48;
    size_t bytes = 0;
    if (!check(ms_param_table_adapter(&u.ac, &u.aw) == MS_OK && ms_param_table_adapter(&u.ac, &u.ag) == MS_OK,
               "adapter tables: %s", ms_last_error()) ||
        !table_fill(&GA, &u.aw, "b/w/") || !table_fill(&GA, &u.ag, "") ||
        !check(adapter_params_init(&u.ap, &u.ac, &u.aw) == MS_OK && adapter_params_init(&u.adp, &u.ac, &u.ag) == MS_OK,
               "adapter params: %s", ms_last_error()) ||
        !check(adapter_train_sizes(&u.ac, 2, 32, 48, &bytes) == MS_OK && arena_init(&u.ar, bytes) == MS_OK,
               "adapter training arena: %s", ms_last_error()) ||
        !(u.cond = golden(&GA, "b/in/cond", u.ncond))) {
        ad_unet_free(&u);
        return;
    }
    u.dcond = test_zeros(u.ncond);

    MsStatus s = ad_step(&u);
    check(s == MS_OK, "adapter_backward_full: %s", s ? ms_last_error() : "ok");
    check(arena_mark(&u.ar) <= bytes && arena_mark(&u.ar) + 64 >= bytes, "adapter: the tape takes the planned %zu bytes "
          "(took %zu)", bytes, arena_mark(&u.ar));
    float *want = golden(&GA, "b/eps", u.nx);
    if (want) check_close("adapter -> unet (b) eps", u.eps, want, u.nx, GOLD_TOL, 0);
    ms_free_aligned(want);
    for (int i = 0; i < 3; i++) {
        char what[64];
        snprintf(key, sizeof key, "b/feat/%d", i);
        snprintf(what, sizeof what, "adapter feature %d (training forward)", i);
        if ((want = golden(&GA, key, u.nres[i]))) check_close(what, u.res[i], want, u.nres[i], GOLD_TOL, 0);
        ms_free_aligned(want);
        snprintf(key, sizeof key, "b/dfeat/%d", i);
        snprintf(what, sizeof what, "unet (b) d residual %d = d feature %d", i, i);
        if ((want = golden(&GA, key, u.nres[i]))) check_close(what, u.dres[i], want, u.nres[i], GOLD_TOL, 0);
        ms_free_aligned(want);
    }
    if ((want = golden(&GA, "b/dcond", u.ncond))) check_close("adapter d cond", u.dcond, want, u.ncond, GOLD_TOL, 0);
    ms_free_aligned(want);
    cmp_golden(&GA, "adapter", &u.ag, "b/g/");

    {   /* the training forward's features are adapter_forward's, bit for bit */
        size_t sb, nf[MS_MAX_BLOCKS];
        Arena sc;
        float *f[3];
        int same = adapter_sizes(&u.ac, 2, 32, 48, &sb, nf) == MS_OK && arena_init(&sc, sb) == MS_OK;
        for (int i = 0; i < 3; i++) f[i] = test_zeros(nf[i]);
        same = same && adapter_forward(&u.ap, &sc, f, u.cond, 2, 32, 48) == MS_OK;
        for (int i = 0; i < 3; i++) { same = same && !memcmp(f[i], u.res[i], nf[i] * sizeof(float)); ms_free_aligned(f[i]); }
        check(same, "adapter: training and inference forwards give the same features bitwise");
        arena_free(&sc);
    }
    ad_threads(&u, "adapter");

    /* Central differences of the adapter alone, L = sum_i sum(Rf_i * feature_i) (Rf random): its
     * ReLUs make L piecewise smooth, so the steps are small (h 1e-3) and a coordinate whose steps
     * move any ReLU input across 0 is skipped (the loss reads NaN there). The chain through the
     * UNet is the golden check above plus the residual differences of part a. */
    {
        MsRng rng;
        ms_rng_seed(&rng, 1517);
        for (int i = 0; i < 3; i++) u.Rf[i] = test_randn(&rng, u.nres[i], 1.0f);
        u.pure = 1;
        ad_step(&u);
        u.sig0 = ad_relu_signature(&u.tape);
        u.guard = 1;
        fd_all("adapter", &u.aw, &u.ag, ad_loss, &u, test_full() ? 200 : 80, 3e-3f);
        MsParam cp, dc;
        MsParamTable ct, dt;
        memset(&cp, 0, sizeof cp);
        snprintf(cp.name, sizeof cp.name, "cond");
        cp.f32 = u.cond; cp.numel = u.ncond;
        dc = cp; dc.f32 = u.dcond;
        ct.p = &cp; dt.p = &dc; ct.n = dt.n = 1;
        fd_all("adapter cond", &ct, &dt, ad_loss, &u, 100, 1e-2f);
        u.pure = u.guard = 0;
        for (int i = 0; i < 3; i++) ms_free_aligned(u.Rf[i]);
    }

    /* refusals */
    {
        MsParamTable w16;
        AdapterParams p16;
        ms_param_table_adapter(&u.ac, &w16);
        table_alloc_as(&w16, MS_DT_BF16);
        if (check(adapter_params_init(&p16, &u.ac, &w16) == MS_OK, "bf16 adapter params")) {
            arena_reset(&u.ar, 0);
            s = adapter_forward_train(&u.tape, &u.ar, &p16, u.cond, 2, 32, 48);
            check(s == MS_ERR_UNSUPPORTED, "adapter: bf16 weights refused: %s", ms_last_error());
            s = adapter_backward_full(&u.tape, &u.adp, NULL, NULL);
            check(s == MS_ERR_ARG, "adapter: backward after a failed forward refused: %s", ms_last_error());
            ad_step(&u);
            s = adapter_backward_full(&u.tape, &p16, NULL, (const float *const *)u.dres);
            check(s == MS_ERR_UNSUPPORTED, "adapter: bf16 gradients refused: %s", ms_last_error());
        }
        ms_param_table_free(&w16);
        AdapterConfig c2 = u.ac;
        MsParamTable t2;
        AdapterParams p2;
        c2.channels[2] = 12;
        if (ms_param_table_adapter(&c2, &t2) == MS_OK && table_fill(&GA, &t2, "") && adapter_params_init(&p2, &c2, &t2) == MS_OK) {
            s = adapter_backward_full(&u.tape, &p2, NULL, (const float *const *)u.dres);
            check(s == MS_ERR_ARG, "adapter: gradients of another config refused: %s", ms_last_error());
        }
        ms_param_table_free(&t2);
        arena_reset(&u.ar, 0);
        s = adapter_forward_train(&u.tape, &u.ar, &u.ap, u.cond, 2, 32, 40);
        check(s == MS_ERR_SHAPE, "adapter: a side not a multiple of 16 refused: %s", ms_last_error());
        Arena small;
        if (arena_init(&small, bytes / 2) == MS_OK) {
            s = adapter_forward_train(&u.tape, &small, &u.ap, u.cond, 2, 32, 48);
            check(s == MS_ERR_NOMEM, "adapter: an arena too small refused: %s", ms_last_error());
            arena_free(&small);
        }
    }
    arena_free(&u.ar);
    ms_param_table_free(&u.aw); ms_param_table_free(&u.ag);
    ms_free_aligned(u.cond); ms_free_aligned(u.dcond);
    ad_unet_free(&u);
}

int main(void) {
    if (!check(st_open(&G, GOLDEN) == MS_OK, "open %s: %s", GOLDEN, ms_last_error())) return test_summary("test_fullgrad");
    double t0 = ms_time();
    ms_set_threads(1);   /* the central differences are many tiny forwards: threads only add overhead */
    test_text();
    double t1 = ms_time();
    test_unet();
    double t2 = ms_time();
    if (check(st_open(&GV, VAE_GOLDEN) == MS_OK, "open %s: %s", VAE_GOLDEN, ms_last_error())) {
        test_vae();
        st_close(&GV);
    }
    double t3 = ms_time();
    if (check(st_open(&GA, AD_GOLDEN) == MS_OK, "open %s: %s", AD_GOLDEN, ms_last_error())) {
        test_unet_residuals();
        test_adapter_backward();
        st_close(&GA);
    }
    printf("  time: text %.1f s, unet %.1f s, vae %.1f s, adapter %.1f s\n", t1 - t0, t2 - t1, t3 - t2, ms_time() - t3);
    st_close(&G);
    ms_gemm_scratch_free();
    ops_scratch_free();
    return test_summary("test_fullgrad");
}
