/* tests/test_sd15.c — the three networks at SD 1.5's real sizes (`make test-full` only).
 *
 * UNet (860M parameters: 320/640/1280/1280 channels, 8 heads, context 768), VAE (84M:
 * 128/256/512/512) and CLIP text encoder (123M: 768 wide, 12 layers, 12 heads, 49408 tokens)
 * with random weights, against diffusers 0.19.3 / transformers 4.31 run in float64 by
 * tools/ref/gen_sd15_golden.py (tests/data/sd15_golden.safetensors). The weights are not stored:
 * both sides draw them from torch's CPU generator (ms_torch_randn is bit-exact with torch's
 * AVX2 kernel), per network from its own seed, parameter by parameter in table order:
 *     1-D ".weight" (norm gamma): randn * 0.1f + 1.0f    1-D (bias): randn * 0.05f
 *     otherwise: randn * (float)(1 / sqrt(numel / shape[0]))          (float32 arithmetic)
 * then the inputs from the same generator. "gen/<net>" holds four values of every generated
 * tensor, so the first check of each network is that we made the same numbers bit for bit.
 *
 * Checked, each against the float64 reference with rel-L2 <= 1e-5, or 3x torch float32's own
 * distance from float64 where that is larger (the UNet gradients; see compare()):
 *   - CLIP last_hidden_state for ids (2,77) (one prompt padded with EOS, one full length);
 *   - VAE decode of a (1,4,16,16) latent to (1,3,128,128); encode of a 128x128 image (mean,
 *     logvar);
 *   - UNet eps for N = 2, 16x16 latent, timesteps 999 / 423.5, context (2,77,768), and the
 *     outputs of every down block, the mid block and up block 0;
 *   - the same with LoRA (rank 4, alpha 1) on to_q/k/v/out.0 of all 32 attentions, and the
 *     backward of L = sum(R * eps): dL/dctx, and per LoRA tensor |dL/dW| and sum(dL/dW * W)
 *     (the full LoRA gradients would take 5 MB).
 * Under `make test` it only prints that it skipped (0 checks).
 */
#include "test.h"

#include "tools/tools.h"

static StFile G;

/* ---- the weights and inputs, as gen_sd15_golden.py makes them ---- */
/* randn(n), scaled by the rule for a parameter of this rank/shape/name; ndim 0: an input, left
 * as drawn. Appends 4 values (at 0, n/3, 2n/3, n-1) to chk. */
static void gen_tensor(MsTorchRng *g, float *x, size_t n, int ndim, const int64_t *shape, const char *name,
                       float *chk, size_t *nchk) {
    ms_torch_randn(g, x, n, MS_TORCH_CPU_AVX2);
    size_t len = strlen(name);
    if (ndim == 1 && len >= 7 && !strcmp(name + len - 7, ".weight")) {
        for (size_t i = 0; i < n; i++) { float y = x[i] * 0.1f; x[i] = y + 1.0f; }
    } else if (ndim == 1) {
        for (size_t i = 0; i < n; i++) x[i] = x[i] * 0.05f;
    } else if (ndim > 1) {
        float s = (float)(1.0 / sqrt((double)(n / (size_t)shape[0])));
        for (size_t i = 0; i < n; i++) x[i] = x[i] * s;
    }
    size_t at[4] = { 0, n / 3, 2 * n / 3, n - 1 };
    for (int k = 0; k < 4; k++) chk[(*nchk)++] = x[at[k]];
}

/* Allocates and fills every parameter of t from seed; returns the generator for the inputs. */
static int gen_table(MsParamTable *t, MsTorchRng *g, uint64_t seed, float *chk, size_t *nchk) {
    if (!check(ms_param_table_alloc(t, NULL) == MS_OK, "allocate %.2f GB of parameters: %s",
               ms_param_table_numel(t) * 4e-9, ms_last_error()))
        return 0;
    ms_torch_seed(g, seed);
    for (int i = 0; i < t->n; i++) {
        MsParam *p = &t->p[i];
        if (p->flags & MS_PARAM_BUFFER) continue;
        gen_tensor(g, p->f32, p->numel, p->ndim, p->shape, p->name, chk, nchk);
    }
    return 1;
}

/* chk against gen/<net>: bit for bit; on a difference, names the first tensor that differs. */
static void check_gen(const char *net, const MsParamTable *t, const float *chk, size_t nchk) {
    char key[64];
    snprintf(key, sizeof key, "gen/%s", net);
    const StTensor *st = st_find(&G, key);
    if (!check(st && st->numel == nchk, "%s present with %zu values", key, nchk)) return;
    float *want = test_zeros(nchk);
    st_to_f32(&G, st, want, nchk);
    size_t bad = nchk;
    for (size_t i = 0; i < nchk && bad == nchk; i++) if (memcmp(&want[i], &chk[i], 4)) bad = i;
    check(bad == nchk, "%s: the %zu generated tensors are torch's, bit for bit (4 values each)", net, nchk / 4);
    if (bad != nchk) {
        int k = (int)(bad / 4), j = 0;
        const char *name = "(an input)";
        for (int i = 0; i < t->n; i++) {
            if (t->p[i].flags & MS_PARAM_BUFFER) continue;
            if (j++ == k) { name = t->p[i].name; break; }
        }
        printf("      first difference: tensor %d %s: %.9e vs torch %.9e\n", k, name, (double)chk[bad], (double)want[bad]);
    }
    ms_free_aligned(want);
}

/* ours vs the float64 reference <key> (stored rounded to float32); prints torch float32's own
 * distance (metadata f32_vs_f64/<key>) and, where stored, ours vs torch float32.
 * Tolerance: rel-L2 <= max(1e-5, 3 x torch float32's own distance). Without LoRA torch f32 is
 * within 2.4e-6 of float64 everywhere, so 1e-5 holds; eps with LoRA: 4.2e-6 (tol 1.3e-5); the
 * UNet gradients run through the network twice and torch f32 itself is 1.2e-5 (dL/dctx) and
 * 1.6e-5 (LoRA dots) away (ours: 1.9e-5, 2.8e-5). */
static void compare(const char *what, const float *got, const char *key, size_t n, double tol) {
    float *want = NULL;
    size_t m = 0;
    if (st_load_f32(&G, key, &want, &m) || m != n) {
        check(0, "golden %s (%zu values): %s", key, n, ms_last_error());
        ms_free_aligned(want);
        return;
    }
    char mk[96], fk[96];
    snprintf(mk, sizeof mk, "f32_vs_f64/%s", key);
    snprintf(fk, sizeof fk, "f32/%s", key);
    const char *tf = st_meta(&G, mk);
    if (tf && 3.0 * atof(tf) > tol) tol = 3.0 * atof(tf);
    int ok = check_close(what, got, want, n, tol, 0);
    TestErr e = test_err_f(got, want, n);
    if (ok && !test_is_verbose()) printf("  ok   %-40s rel_l2 %.2e (tol %.1e)", what, e.rel_l2, tol);
    else printf("     ");
    printf("  torch f32: %s", tf ? tf : "?");
    const StTensor *t32 = st_find(&G, fk);
    if (t32 && t32->numel == n) {
        float *w32 = test_zeros(n);
        st_to_f32(&G, t32, w32, n);
        printf(", ours vs torch f32 %.2e", test_err_f(got, w32, n).rel_l2);
        ms_free_aligned(w32);
    }
    printf("\n");
    ms_free_aligned(want);
}

/* ---- CLIP text encoder ---- */
static void test_text(void) {
    double t0 = ms_time();
    ClipTextConfig c;
    ms_clip_text_config_sd15(&c);
    MsParamTable t;
    MsTorchRng g;
    if (!check(ms_param_table_text(&c, &t) == MS_OK, "text table: %s", ms_last_error())) return;
    const int B = 2, T = 77, D = c.hidden_size;
    float *chk = test_zeros(4 * (size_t)t.n);
    size_t nchk = 0;
    if (!gen_table(&t, &g, 1503, chk, &nchk)) { ms_param_table_free(&t); return; }
    check_gen("text", &t, chk, nchk);
    double t1 = ms_time();

    int32_t ids[2 * 77];
    float idf[2 * 77];
    int64_t shape[2] = { B, T };
    int ok = check(st_read_f32(&G, "text/ids", idf, (size_t)B * T, 2, shape) == MS_OK, "text/ids: %s", ms_last_error());
    for (int i = 0; i < B * T; i++) ids[i] = (int32_t)idf[i];
    ClipTextParams p;
    Arena ar = { 0 };
    ClipTextActs a;
    if (ok && check(clip_text_params(&p, &t, &c) == MS_OK, "clip_text_params: %s", ms_last_error()) &&
        check(arena_init(&ar, clip_text_sizes(&c, B, T, 0, 0)) == MS_OK, "arena") &&
        check(clip_text_acts_alloc(&a, &ar, &c, B, T, 0, 0) == MS_OK, "clip_text_acts_alloc: %s", ms_last_error())) {
        MsStatus s = clip_text_forward(&a, &p, NULL, ids, NULL, 0, &c);
        check(s == MS_OK, "clip_text_forward (2,77): %s", ms_last_error());
        compare("CLIP last_hidden_state (2,77,768)", a.out, "text/out", (size_t)B * T * D, 1e-5);
    }
    printf("  text encoder: %.1f s generating %.0fM weights, %.1f s forward\n", t1 - t0,
           ms_param_table_numel(&t) / 1e6, ms_time() - t1);
    arena_free(&ar);
    ms_free_aligned(chk);
    ms_param_table_free(&t);
}

/* ---- VAE ---- */
static void test_vae(void) {
    double t0 = ms_time();
    VaeConfig c;
    ms_vae_config_sd15(&c);
    MsParamTable t;
    MsTorchRng g;
    if (!check(ms_param_table_vae(&c, &t) == MS_OK, "vae table: %s", ms_last_error())) return;
    const int h = 16, w = 16, H = 8 * h, W = 8 * w, L = c.latent_channels;
    const size_t nl = (size_t)L * h * w, ni = (size_t)3 * H * W;
    float *chk = test_zeros(4 * ((size_t)t.n + 2));
    size_t nchk = 0;
    if (!gen_table(&t, &g, 1502, chk, &nchk)) { ms_param_table_free(&t); return; }
    float *lat = test_zeros(nl), *img = test_zeros(ni), *x = test_zeros(ni), *mean = test_zeros(nl), *logvar = test_zeros(nl);
    gen_tensor(&g, lat, nl, 0, NULL, "latents", chk, &nchk);
    gen_tensor(&g, x, ni, 0, NULL, "image", chk, &nchk);
    check_gen("vae", &t, chk, nchk);
    double t1 = ms_time(), t2 = t1;

    VaeParams *p = (VaeParams *)malloc(sizeof *p);
    VaeSizes s;
    Arena ar = { 0 };
    if (p && check(vae_params_init(p, &c, &t) == MS_OK, "vae_params_init: %s", ms_last_error()) &&
        check(vae_sizes(&c, H, W, -1, &s) == MS_OK, "vae_sizes") &&
        check(arena_init(&ar, s.decode_bytes > s.encode_bytes ? s.decode_bytes : s.encode_bytes) == MS_OK,
              "arena %.0f MB", (s.decode_bytes > s.encode_bytes ? s.decode_bytes : s.encode_bytes) / 1e6)) {
        MsStatus st = vae_decode(p, &ar, img, lat, 1, h, w);
        check(st == MS_OK, "vae_decode 1x4x16x16: %s", ms_last_error());
        t2 = ms_time();
        compare("VAE decode (1,3,128,128)", img, "vae/decoded", ni, 1e-5);
        st = vae_encode(p, &ar, mean, logvar, x, 1, H, W);
        check(st == MS_OK, "vae_encode 1x3x128x128: %s", ms_last_error());
        compare("VAE encode mean (1,4,16,16)", mean, "vae/mean", nl, 1e-5);
        compare("VAE encode logvar", logvar, "vae/logvar", nl, 1e-5);
    }
    printf("  vae: %.1f s generating %.0fM weights, %.1f s decode, %.1f s encode\n", t1 - t0,
           ms_param_table_numel(&t) / 1e6, t2 - t1, ms_time() - t2);
    arena_free(&ar);
    free(p);
    ms_free_aligned(lat); ms_free_aligned(img); ms_free_aligned(x); ms_free_aligned(mean); ms_free_aligned(logvar);
    ms_free_aligned(chk);
    ms_param_table_free(&t);
}

/* ---- UNet ---- */
static void test_unet(void) {
    double t0 = ms_time();
    UNetConfig c;
    ms_unet_config_sd15(&c);
    MsParamTable t;
    MsTorchRng g;
    if (!check(ms_param_table_unet(&c, &t) == MS_OK, "unet table: %s", ms_last_error())) return;
    const int N = 2, h = 16, w = 16, Tk = 77, D = c.cross_attention_dim, n = c.n_blocks;
    const size_t nx = (size_t)N * c.in_channels * h * w, nctx = (size_t)N * Tk * D;
    float *chk = test_zeros(4 * ((size_t)t.n + 3 + 8 * 2 * (size_t)ms_unet_cross_attn_layers(&c)));
    size_t nchk = 0;
    if (!gen_table(&t, &g, 1501, chk, &nchk)) { ms_param_table_free(&t); return; }
    float *x = test_zeros(nx), *ctx = test_zeros(nctx), *eps = test_zeros(nx), *R = test_zeros(nx);
    float *dctx = test_zeros(nctx);
    const float ts[2] = { 999.0f, 423.5f };
    gen_tensor(&g, x, nx, 0, NULL, "latent", chk, &nchk);
    gen_tensor(&g, ctx, nctx, 0, NULL, "ctx", chk, &nchk);
    gen_tensor(&g, R, nx, 0, NULL, "R", chk, &nchk);
    double t1 = ms_time(), t2 = t1, t3 = t1;

    UNetParams p;
    UNetSizes s;
    UNetActs a;
    UNetLora lora, dlora;
    Arena acts = { 0 }, scratch = { 0 }, train = { 0 };
    memset(&p, 0, sizeof p);
    memset(&a, 0, sizeof a);
    const int rank = 4, n_attn = 2 * ms_unet_cross_attn_layers(&c);
    const size_t lora_bytes = unet_lora_floats(&c, rank) * sizeof(float) + (size_t)n_attn * 4 * sizeof(UNetLoraLinear) + 256;
    /* training-mode activations: every block output is kept for the checks below */
    if (check(unet_params_init(&p, &c, &t) == MS_OK, "unet_params_init: %s", ms_last_error()) &&
        check(arena_init(&train, 2 * lora_bytes) == MS_OK, "lora arena") &&
        check(unet_lora_init(&lora, &p, rank, 1.0f, &train) == MS_OK && unet_lora_init(&dlora, &p, rank, 1.0f, &train) == MS_OK,
              "unet_lora_init rank %d: %s", rank, ms_last_error()) &&
        check(unet_sizes(&c, N, h, w, Tk, 1, &s) == MS_OK, "unet_sizes") &&
        check(arena_init(&acts, s.acts_bytes) == MS_OK && arena_init(&scratch, s.scratch_bytes) == MS_OK,
              "arenas %.0f + %.0f MB", s.acts_bytes / 1e6, s.scratch_bytes / 1e6) &&
        check(unet_acts_init(&a, &c, N, h, w, Tk, 1, &acts, &scratch) == MS_OK, "unet_acts_init: %s", ms_last_error())) {
        /* LoRA weights: after the inputs, module by module (q, k, v, out), down then up */
        for (int k = 0; k < 4 * n_attn; k++) {
            UNetLoraLinear *l = &lora.lin[k];
            int64_t sd[2] = { rank, l->in }, su[2] = { l->out, rank };
            gen_tensor(&g, l->down, (size_t)rank * l->in, 2, sd, "lora_down", chk, &nchk);
            gen_tensor(&g, l->up, (size_t)l->out * rank, 2, su, "lora_up", chk, &nchk);
        }
        check_gen("unet", &t, chk, nchk);
        MsStatus st = unet_forward(eps, &a, x, ts, ctx, NULL, NULL, &p, NULL);
        check(st == MS_OK, "unet_forward N=2 16x16: %s", ms_last_error());
        t2 = ms_time();
        compare("UNet eps (2,4,16,16), t=999/423.5", eps, "unet/eps", nx, 1e-5);
        char key[64], what[64];
        for (int i = 0; i < n; i++) {
            int lv = i < n - 1 ? i + 1 : i;
            snprintf(key, sizeof key, "unet/act/down%d", i);
            snprintf(what, sizeof what, "UNet down block %d output", i);
            compare(what, a.down_out[i], key, (size_t)N * c.block_out_channels[i] * a.lh[lv] * a.lw[lv], 1e-5);
        }
        compare("UNet mid block output", a.mid_out, "unet/act/mid",
                (size_t)N * c.block_out_channels[n - 1] * a.lh[n - 1] * a.lw[n - 1], 1e-5);
        compare("UNet up block 0 output", a.up_out[0], "unet/act/up0",
                (size_t)N * c.block_out_channels[n - 1] * a.lh[n - 2] * a.lw[n - 2], 1e-5);

        /* LoRA (rank 4, alpha 1) on every to_q/k/v/out.0; L = sum(R * eps) */
        t2 = ms_time();
        st = unet_forward(eps, &a, x, ts, ctx, NULL, NULL, &p, &lora);
        check(st == MS_OK, "unet_forward with LoRA: %s", ms_last_error());
        st = unet_backward(&a, &p, &lora, &dlora, R, dctx, NULL);
        check(st == MS_OK, "unet_backward: %s", ms_last_error());
        t3 = ms_time();
        compare("UNet eps with LoRA", eps, "unet/eps_lora", nx, 1e-5);
        compare("UNet dL/dctx (2,77,768)", dctx, "unet/grad/ctx", nctx, 1e-5);
        /* per LoRA tensor (256): |dL/dW| and sum(dL/dW * W), in double */
        float *gn = test_zeros(8 * (size_t)n_attn), *gd = test_zeros(8 * (size_t)n_attn);
        for (int k = 0; k < 8 * n_attn; k++) {
            const UNetLoraLinear *l = &lora.lin[k / 2], *dl = &dlora.lin[k / 2];
            const float *wv = k % 2 ? l->up : l->down, *gv = k % 2 ? dl->up : dl->down;
            size_t m = (size_t)rank * (k % 2 ? l->out : l->in);
            double nn = 0.0, dd = 0.0;
            for (size_t i = 0; i < m; i++) { nn += (double)gv[i] * gv[i]; dd += (double)gv[i] * wv[i]; }
            gn[k] = (float)sqrt(nn);
            gd[k] = (float)dd;
        }
        compare("UNet |dL/d lora| per tensor (256)", gn, "unet/grad/lora_norm", 8 * (size_t)n_attn, 1e-5);
        compare("UNet sum(dL/d lora * lora) per tensor", gd, "unet/grad/lora_dot", 8 * (size_t)n_attn, 1e-5);
        /* up(down(x)) is linear in each: <dL/d down, down> == <dL/d up, up> for every module */
        double worst = 0.0, dmax = 1e-30;
        for (int k = 0; k < 4 * n_attn; k++) dmax = fmax(dmax, fabs(gd[2 * k]));
        for (int k = 0; k < 4 * n_attn; k++) worst = fmax(worst, fabs((double)gd[2 * k] - gd[2 * k + 1]) / dmax);
        check(worst <= 1e-5, "UNet <dL/d down, down> == <dL/d up, up> per module: worst %.2e of max (tol 1e-5)", worst);
        ms_free_aligned(gn); ms_free_aligned(gd);
    }
    printf("  unet: %.1f s generating %.0fM weights, %.1f s forward, %.1f s LoRA forward + backward\n", t1 - t0,
           ms_param_table_numel(&t) / 1e6, t2 - t1, t3 - t2);
    unet_acts_free(&a);
    unet_params_free(&p);
    arena_free(&acts);
    arena_free(&scratch);
    arena_free(&train);
    ms_free_aligned(x); ms_free_aligned(ctx); ms_free_aligned(eps); ms_free_aligned(R); ms_free_aligned(dctx);
    ms_free_aligned(chk);
    ms_param_table_free(&t);
}

int main(void) {
    if (!test_full()) {
        printf("test_sd15: SD 1.5-sized checks skipped (they run under `make test-full`)\n");
        return test_summary("test_sd15");
    }
    double t0 = ms_time();
    if (!check(st_open(&G, "tests/data/sd15_golden.safetensors") == MS_OK, "golden: %s", ms_last_error()))
        return test_summary("test_sd15");
    printf("  threads %d, SIMD %s; reference: torch %s float64 (seeds %s)\n", ms_get_threads(), ms_simd_name(ms_simd()),
           st_meta(&G, "torch") ? st_meta(&G, "torch") : "?", st_meta(&G, "seeds") ? st_meta(&G, "seeds") : "?");
    test_text();
    test_vae();
    test_unet();
    printf("  total %.1f s\n", ms_time() - t0);
    st_close(&G);
    ops_scratch_free();
    ms_gemm_scratch_free();
    return test_summary("test_sd15");
}
