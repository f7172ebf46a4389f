/* tests/test_flops.c — the matmul FLOP counter (ms_flops_*, tensor.c) that `mixshow bench
 * --nets` divides by the time. Ops: ms_gemm, linear, convolution, attention forward/backward
 * (causal and not, every SIMD level: the scalar level runs attention's GEMM fallback inside
 * parallel regions, which must not count twice), 1 and 2 threads, against 2 M N K written out
 * by hand. Networks: the tiny model's UNet forward and VAE decode against a count made
 * independently from the parameter table: every weight's 2 x numel x the positions it is applied
 * at (read off its name: block level -> resolution, conv / linear, context or time rows), plus
 * 4 T Tk C per attention. */
#include "tests/test.h"

#include "tools/tools.h"

static MsRng rng;

/* count of one call of fn at the current settings */
typedef void (*OpFn)(void *ctx);
static double count_of(OpFn fn, void *ctx) {
    ms_flops_reset();
    fn(ctx);
    return ms_flops_count();
}

typedef struct { float *a, *b, *c, *d, *e, *f, *g, *h, *l; int causal, which; } Bufs;

static void op_gemm(void *v) { Bufs *u = (Bufs *)v; ms_gemm(0, 1, 37, 29, 13, 1.0f, u->a, 13, u->b, 13, 0.0f, u->c, 29); }
static void op_linear(void *v) { Bufs *u = (Bufs *)v; linear_forward(u->c, u->a, u->b, u->d, 5, 7, 11); }
static void op_conv(void *v) { Bufs *u = (Bufs *)v; conv2d_forward(u->c, u->a, u->b, u->d, 2, 3, 4, 9, 7, 3, 2, 1); }
/* attention B=2 Tq=70 Tk=50 H=3 Dh=16: q a, k b, v d, out c, lse l; backward grads e f g, dout h */
static void op_att(void *v) {
    Bufs *u = (Bufs *)v;
    attention_forward(u->c, u->l, u->a, u->b, u->d, 2, 70, 50, 3, 16, u->causal, 0.25f);
}
static void op_att_bwd(void *v) {
    Bufs *u = (Bufs *)v;
    attention_backward(u->which & 1 ? u->e : NULL, u->which & 2 ? u->f : NULL, u->which & 4 ? u->g : NULL, u->h,
                       u->a, u->b, u->d, u->c, u->l, 2, 70, 50, 3, 16, u->causal, 0.25f);
}

static void test_ops_count(void) {
    Bufs u;
    u.a = test_track(test_randn(&rng, 8192, 1.0f)); u.b = test_track(test_randn(&rng, 8192, 1.0f));
    u.c = test_track(test_zeros(8192)); u.d = test_track(test_randn(&rng, 8192, 0.1f));
    u.e = test_track(test_zeros(8192)); u.f = test_track(test_zeros(8192)); u.g = test_track(test_zeros(8192));
    u.h = test_track(test_randn(&rng, 8192, 1.0f)); u.l = test_track(test_zeros(512));
    u.causal = 0; u.which = 7;
    /* visible pairs per (b, h), by counting */
    double pairs[2] = { 0, 0 };
    for (int i = 0; i < 70; i++)
        for (int j = 0; j < 50; j++) { pairs[0] += 1; pairs[1] += j <= i; }
    ms_flops_enable(0);
    check(count_of(op_gemm, &u) == 0.0, "flops: nothing counted while disabled");
    ms_flops_enable(1);
    MsSimd hw = ms_simd_detected();
    for (int lv = MS_SIMD_SCALAR; lv <= (int)MS_SIMD_AVX512; lv++) {
        ms_set_simd((MsSimd)lv);
        if (ms_simd() != (MsSimd)lv) continue;
        for (int t = 1; t <= 2; t++) {
            ms_set_threads(t);
            const char *sn = ms_simd_name(ms_simd());
            check(count_of(op_gemm, &u) == 2.0 * 37 * 29 * 13, "flops %s threads=%d: gemm 37x29x13", sn, t);
            check(count_of(op_linear, &u) == 2.0 * 5 * 7 * 11, "flops %s threads=%d: linear 5x7->11", sn, t);
            check(count_of(op_conv, &u) == 2.0 * 2 * 4 * 3 * 9 * 5 * 4,
                  "flops %s threads=%d: conv 3x3 stride 2, 2x3x9x7 -> 2x4x5x4", sn, t);
            for (int causal = 0; causal <= 1; causal++) {
                u.causal = causal;
                double pv = 2 * 3 * pairs[causal] * 2 * 16;        /* B H pairs 2 Dh, per product */
                double f = count_of(op_att, &u);
                check(f == 2 * pv, "flops %s threads=%d: attention%s forward %.0f (QK^T, PV: %.0f)", sn, t,
                      causal ? " causal" : "", f, 2 * pv);
                static const int which[4] = { 7, 1, 4, 6 };         /* dq dk dv / dq / dv / dk dv */
                static const int nprod[4] = { 5, 3, 2, 4 };         /* S, dV, dP, dQ, dK as wanted */
                for (int w = 0; w < 4; w++) {
                    u.which = which[w];
                    f = count_of(op_att_bwd, &u);
                    check(f == nprod[w] * pv, "flops %s threads=%d: attention%s backward (dq %d dk %d dv %d) %.0f (%d products)",
                          sn, t, causal ? " causal" : "", which[w] & 1, (which[w] >> 1) & 1, which[w] >> 2, f, nprod[w]);
                }
            }
        }
    }
    ms_set_simd(hw);
    ms_set_threads(0);
    ms_flops_enable(0);
    test_free_tracked();
}

/* ---- networks: the count from the parameter table ---- */
static int has(const char *s, const char *sub) { return strstr(s, sub) != NULL; }
static int level_after(const char *name, const char *prefix) {     /* "up_blocks.2." -> 2 */
    const char *p = strstr(name, prefix);
    return p ? atoi(p + strlen(prefix)) : -1;
}

/* UNet: level l has (h >> l) x (w >> l) positions (h, w multiples of 2^(levels-1)). */
static double unet_count(const MsParamTable *t, const UNetConfig *c, int N, int h, int w, int Tk) {
    const int top = c->n_blocks - 1;
    double f = 0.0;
    for (int i = 0; i < t->n; i++) {
        const MsParam *p = &t->p[i];
        const char *n = p->name;
        if (p->ndim < 2) continue;
        int lv = 0;
        if (has(n, "down_blocks.")) lv = level_after(n, "down_blocks.") + has(n, "downsamplers.");
        else if (has(n, "up_blocks.")) lv = top - level_after(n, "up_blocks.") - has(n, "upsamplers.");
        else if (has(n, "mid_block.")) lv = top;
        double T = (double)(h >> lv) * (w >> lv), rows = N * T;
        if (has(n, "time_embedding.") || has(n, "time_emb_proj")) rows = N;
        if (has(n, "attn2.to_k.") || has(n, "attn2.to_v.")) rows = (double)N * Tk;
        f += 2.0 * (double)p->numel * rows;                            /* conv: numel = Co C k k */
        double C = (double)p->shape[0];
        if (has(n, "attn1.to_q.weight")) f += 4.0 * N * T * T * C;   /* QK^T, PV over all heads */
        if (has(n, "attn2.to_q.weight")) f += 4.0 * N * T * Tk * C;
    }
    return f;
}

/* VAE decode: decoder.up_blocks.i runs at the latent size times 2^i, its upsampler's conv at
 * 2^(i+1); post_quant_conv, conv_in and the mid block at the latent size. */
static double vae_decode_count(const MsParamTable *t, int N, int h, int w) {
    double f = 0.0;
    for (int i = 0; i < t->n; i++) {
        const MsParam *p = &t->p[i];
        const char *n = p->name;
        if (p->ndim < 2 || !(strncmp(n, "decoder.", 8) == 0 || strncmp(n, "post_quant_conv.", 16) == 0)) continue;
        int s = 0;
        if (has(n, "up_blocks.")) s = level_after(n, "up_blocks.") + has(n, "upsamplers.");
        else if (has(n, "conv_out.")) s = -1;                          /* the image size */
        double T = s < 0 ? 0 : (double)(h << s) * (w << s);
        if (s < 0) {
            int lv = 0;
            for (int j = 0; j < t->n; j++)
                if (has(t->p[j].name, "decoder.up_blocks.") && level_after(t->p[j].name, "up_blocks.") > lv)
                    lv = level_after(t->p[j].name, "up_blocks.");
            T = (double)(h << lv) * (w << lv);
        }
        f += 2.0 * (double)p->numel * N * T;
        if (has(n, "attentions.0.to_q.weight") || has(n, "attentions.0.query.weight"))
            f += 4.0 * N * T * T * (double)p->shape[0];              /* one head */
    }
    return f;
}

static void test_nets(void) {
    MsModel m;
    if (ms_model_load(test_tiny_dir(), NULL, &m)) { printf("  skip: %s (%s)\n", test_tiny_dir(), ms_last_error()); return; }
    const UNetConfig *c = &m.unet_config;
    const int N = 2, h = 16, w = 8, Tk = 77;
    UNetParams p;
    UNetSizes sz;
    UNetActs a;
    Arena acts, scratch;
    memset(&acts, 0, sizeof acts); memset(&scratch, 0, sizeof scratch);
    if (!check(unet_params_init(&p, c, &m.unet) == MS_OK && unet_sizes(c, N, h, w, Tk, 0, &sz) == MS_OK &&
               arena_init(&acts, sz.acts_bytes) == MS_OK && arena_init(&scratch, sz.scratch_bytes) == MS_OK &&
               unet_acts_init(&a, c, N, h, w, Tk, 0, &acts, &scratch) == MS_OK, "tiny UNet ready: %s", ms_last_error())) {
        ms_model_free(&m);
        return;
    }
    const size_t nx = (size_t)N * c->in_channels * h * w;
    float *x = test_track(test_randn(&rng, nx, 1.0f)), *eps = test_track(test_zeros(nx));
    float *ctx = test_track(test_randn(&rng, (size_t)N * Tk * c->cross_attention_dim, 1.0f));
    float tt[2] = { 999.0f, 10.0f };
    double want = unet_count(&m.unet, c, N, h, w, Tk);
    ms_flops_enable(1);
    for (int t = 1; t <= 2; t++) {
        ms_set_threads(t);
        ms_flops_reset();
        MsStatus s = unet_forward(eps, &a, x, tt, ctx, NULL, NULL, &p, NULL);
        double got = ms_flops_count();
        check(s == MS_OK && got == want, "flops threads=%d: tiny UNet forward B=%d %dx%d: %.0f counted, %.0f from the "
              "parameter table", t, N, h, w, got, want);
    }
    unet_acts_free(&a);
    unet_params_free(&p);
    arena_free(&acts); arena_free(&scratch);

    /* VAE decode of a B=1 latent */
    VaeParams vp;
    VaeSizes vs;
    Arena vsc;
    memset(&vsc, 0, sizeof vsc);
    const int lh = 8, lw = 4, f = 1 << (m.vae_config.n_blocks - 1);
    if (check(vae_params_init(&vp, &m.vae_config, &m.vae) == MS_OK &&
              vae_sizes(&m.vae_config, lh * f, lw * f, -1, &vs) == MS_OK && arena_init(&vsc, vs.decode_bytes) == MS_OK,
              "tiny VAE ready: %s", ms_last_error())) {
        float *lat = test_track(test_randn(&rng, (size_t)m.vae_config.latent_channels * lh * lw, 1.0f));
        float *img = test_track(test_zeros((size_t)m.vae_config.out_channels * lh * f * lw * f));
        double vw = vae_decode_count(&m.vae, 1, lh, lw);
        for (int t = 1; t <= 2; t++) {
            ms_set_threads(t);
            ms_flops_reset();
            MsStatus s = vae_decode(&vp, &vsc, img, lat, 1, lh, lw);
            double got = ms_flops_count();
            check(s == MS_OK && got == vw, "flops threads=%d: tiny VAE decode %dx%d latent: %.0f counted, %.0f from the "
                  "parameter table", t, lh, lw, got, vw);
        }
    }
    arena_free(&vsc);
    ms_flops_enable(0);
    ms_set_threads(0);
    ms_model_free(&m);
    test_free_tracked();
}

int main(void) {
    ms_rng_seed(&rng, 1414);
    ms_set_parallel_min_work(0.0);    /* every loop parallel: nested GEMMs run inside regions */
    test_ops_count();
    test_nets();
    ms_gemm_scratch_free();
    ops_scratch_free();
    return test_summary("test_flops");
}
