/* tests/test_half.c — networks on weights kept 16-bit (F16/BF16), converted when used.
 *
 * Claim: running UNet, VAE, CLIP text encoder and T2I-Adapter on a table that keeps F16 (or
 * BF16) data gives, bit for bit, what the f32 path gives on the same weights rounded through
 * F16 (BF16) and widened back. Both sides come from the tiny model (models/tiny-sd):
 * the 16-bit table is filled with st_f32_to_f16 / st_f32_to_bf16 of the f32 weights, the
 * reference table is the f32 table with every value replaced by its rounded-and-widened value
 * (ms_f16_to_f32 / ms_bf16_to_f32, the loader's own converters). Also: the fast converter
 * ms_half_to_f32 against ms_f16_to_f32 on all 65536 patterns, ms_weight_f32 returns the f32
 * data itself (no copy) for f32 tables, and the UNet allocates no staging for them. */
#include "test.h"

#include "tools/tools.h"

/* A copy of table t: dt == MS_DT_F32 -> f32 data rounded through `round` (F16/BF16) and widened;
 * else 16-bit data of that dtype. */
static int copy_table(MsParamTable *dst, const MsParamTable *t, MsDtype dt, MsDtype round,
                      MsStatus (*make)(const void *, MsParamTable *), const void *cfg) {
    MsDtype *d = (MsDtype *)malloc((size_t)t->n * sizeof *d);
    if (!d || make(cfg, dst)) { free(d); return 0; }
    for (int i = 0; i < t->n; i++) d[i] = dt;
    MsStatus s = ms_param_table_alloc(dst, d);
    free(d);
    if (s) return 0;
    for (int i = 0; i < t->n; i++) {
        const MsParam *p = &t->p[i];
        MsParam *q = &dst->p[i];
        if (p->flags & MS_PARAM_BUFFER) continue;
        for (size_t e = 0; e < p->numel; e++) {
            uint16_t h = round == MS_DT_BF16 ? st_f32_to_bf16(p->f32[e]) : st_f32_to_f16(p->f32[e]);
            if (dt == MS_DT_F32) q->f32[e] = round == MS_DT_BF16 ? ms_bf16_to_f32(h) : ms_f16_to_f32(h);
            else q->half[e] = h;
        }
    }
    return 1;
}
static MsStatus mk_unet(const void *c, MsParamTable *t) { return ms_param_table_unet((const UNetConfig *)c, t); }
static MsStatus mk_vae(const void *c, MsParamTable *t) { return ms_param_table_vae((const VaeConfig *)c, t); }
static MsStatus mk_text(const void *c, MsParamTable *t) { return ms_param_table_text((const ClipTextConfig *)c, t); }
static MsStatus mk_adapter(const void *c, MsParamTable *t) { return ms_param_table_adapter((const AdapterConfig *)c, t); }

static int bitwise(const char *what, const float *a, const float *b, size_t n) {
    size_t bad = 0, first = 0;
    for (size_t i = 0; i < n; i++)
        if (memcmp(&a[i], &b[i], 4)) { if (!bad++) first = i; }
    check(bad == 0, "%-44s bitwise over %zu values (%zu differ, first at %zu)", what, n, bad, first);
    if (bad) { test_print_head("16bit", a + first, n - first); test_print_head("ref", b + first, n - first); }
    return bad == 0;
}

static void fill(float *x, size_t n, uint64_t seed, float sd) { MsRng r; ms_rng_seed(&r, seed); ms_rng_fill_normal(&r, x, n, 0.0f, sd); }

/* Set by run_unet: floats of the staging matrix the run wrote (the last one that lost the
 * sentinel filled in before the run) and the scratch arena's size. */
static size_t g_staged, g_scratch;

/* UNet forward (inference) and a training forward + backward to the context, on table t. */
static int run_unet(const UNetConfig *c, const MsParamTable *t, float *eps, float *dctx, int training) {
    const int N = 2, h = 8, w = 8, Tk = 7;
    UNetParams p; UNetSizes sz; UNetActs a; Arena ac = { 0 }, sc = { 0 };
    size_t nmat = 0;
    if (unet_params_init(&p, c, t) || unet_sizes(c, N, h, w, Tk, training, &sz) ||
        arena_init(&ac, sz.acts_bytes) || arena_init(&sc, sz.scratch_bytes) ||
        unet_acts_init(&a, c, N, h, w, Tk, training, &ac, &sc)) { printf("  unet setup: %s\n", ms_last_error()); return 0; }
    g_scratch = sz.scratch_bytes;
    ms_weight_stage_floats(t, NULL, &nmat, NULL);
    if (p.ws.mat) memset(p.ws.mat, 0xff, nmat * sizeof(float));     /* NaN patterns the converter never writes here */
    const size_t nx = (size_t)N * c->in_channels * h * w, nc = (size_t)N * Tk * c->cross_attention_dim;
    float *x = (float *)malloc(nx * 4), *ctx = (float *)malloc(nc * 4), *d = (float *)malloc(nx * 4), tt[2] = { 999.0f, 21.0f };
    fill(x, nx, 1, 1.0f); fill(ctx, nc, 2, 1.0f); fill(d, nx, 3, 1.0f);
    MsStatus s = unet_forward(eps, &a, x, tt, ctx, NULL, NULL, &p, NULL);
    g_staged = 0;
    for (size_t i = 0; p.ws.mat && i < nmat; i++)
        if (memcmp(&p.ws.mat[i], &(uint32_t){ 0xffffffffu }, 4)) g_staged = i + 1;
    if (!s && training) { memset(dctx, 0, nc * 4); s = unet_backward(&a, &p, NULL, NULL, d, dctx, NULL); }
    free(x); free(ctx); free(d);
    unet_acts_free(&a); unet_params_free(&p); arena_free(&ac); arena_free(&sc);
    return s == MS_OK;
}

static void test_unet(const MsModel *m, MsDtype dt) {
    const UNetConfig *c = &m->unet_config;
    MsParamTable h = { 0 }, r = { 0 };
    const char *nm = dt == MS_DT_BF16 ? "bf16" : "f16";
    if (!check(copy_table(&h, &m->unet, dt, dt, mk_unet, c) && copy_table(&r, &m->unet, MS_DT_F32, dt, mk_unet, c),
               "unet %s tables", nm)) return;
    {   /* a 16-bit table gets a staging as large as its largest tensor (planned = allocated) */
        UNetParams p;
        size_t mat = 0, vec = 0, big = 0;
        ms_weight_stage_floats(&h, NULL, &mat, &vec);
        for (int i = 0; i < h.n; i++) if (h.p[i].numel > big) big = h.p[i].numel;
        if (check(unet_params_init(&p, c, &h) == MS_OK, "unet_params_init %s", nm))
            check(mat == big && p.ws.mat && p.ws.bytes >= (mat + 2 * vec) * sizeof(float),
                  "unet %s staging: %zu floats for the largest tensor (%zu)", nm, mat, big);
        unet_params_free(&p);
    }
    const size_t ne = (size_t)2 * c->out_channels * 64, nc = (size_t)2 * 7 * c->cross_attention_dim;
    float *e1 = (float *)calloc(ne, 4), *e2 = (float *)calloc(ne, 4), *d1 = (float *)calloc(nc, 4), *d2 = (float *)calloc(nc, 4);
    char what[64];
    if (check(run_unet(c, &h, e1, NULL, 0) && run_unet(c, &r, e2, NULL, 0), "unet %s inference runs", nm)) {
        snprintf(what, sizeof what, "unet %s eps (inference)", nm); bitwise(what, e1, e2, ne);
    }
    if (check(run_unet(c, &h, e1, d1, 1) && run_unet(c, &r, e2, d2, 1), "unet %s training runs", nm)) {
        snprintf(what, sizeof what, "unet %s eps (training)", nm); bitwise(what, e1, e2, ne);
        snprintf(what, sizeof what, "unet %s dctx (backward)", nm); bitwise(what, d1, d2, nc);
    }
    {   /* staging in slices and the feed-forward in row chunks (unet_set_chunks): the same bits.
         * Slices of 1 row (cap below every row), of a few rows with a remainder (700; 3000: 2 rows
         * of the largest conv), and the default;
         * feed-forward chunks of 1 row, 3 rows (128 = 42*3 + 2) and all rows. The staging
         * matrix is written only up to the cap (or one row) and the scratch plan shrinks. */
        size_t mat = 0, big_row = 0;
        ms_weight_stage_floats(&h, NULL, &mat, NULL);
        for (int i = 0; i < h.n; i++)
            if (h.p[i].ndim >= 2 && h.p[i].numel / (size_t)h.p[i].shape[0] > big_row)
                big_row = h.p[i].numel / (size_t)h.p[i].shape[0];
        float *e4 = (float *)calloc(ne, 4), *d4 = (float *)calloc(nc, 4);
        size_t base_scratch = 0;
        run_unet(c, &h, e1, NULL, 0);                           /* default chunks */
        base_scratch = g_scratch;
        check(g_staged == mat, "unet %s default: the largest tensor staged whole (%zu of %zu floats)", nm, g_staged, mat);
        const size_t caps[4][2] = { { 5, 1 }, { 700, 3 }, { 3000, 2 }, { 0, 0 } };
        for (int k = 0; k < 4; k++) {
            size_t stage = caps[k][0], ffrows = caps[k][1];
            for (int tr = 0; tr < 2; tr++) {
                /* ff chunk in floats: ffrows rows at the first level's width (wider levels: fewer, >= 1) */
                unet_set_chunks(stage, ffrows ? ffrows * 8 * (size_t)c->block_out_channels[0] : 0);
                int ok = run_unet(c, &h, e4, tr ? d4 : NULL, tr);
                size_t staged = g_staged, scr = g_scratch;
                unet_set_chunks(0, 0);
                if (!check(ok, "unet %s chunked run (stage %zu, ff %zu rows, training %d)", nm, stage, ffrows, tr)) continue;
                snprintf(what, sizeof what, "unet %s eps, stage %zu ff %zu%s", nm, stage, ffrows, tr ? " train" : "");
                bitwise(what, e4, tr ? e2 : e1, ne);
                if (tr) { snprintf(what, sizeof what, "unet %s dctx, stage %zu ff %zu", nm, stage, ffrows); bitwise(what, d4, d2, nc); }
                if (stage && !tr) {
                    size_t lim = stage > big_row ? stage : big_row;
                    check(staged > 0 && staged <= lim, "unet %s stage %zu: %zu staged floats written (<= %zu)", nm,
                          stage, staged, lim);
                    check(scr < base_scratch, "unet %s ff %zu rows: scratch %zu < %zu bytes", nm, ffrows, scr, base_scratch);
                }
            }
        }
        free(e4); free(d4);
    }
    { /* the f16 result differs from the unrounded f32 one (the test can fail) */
        float *e3 = (float *)calloc(ne, 4);
        if (run_unet(c, &m->unet, e3, NULL, 0)) {
            size_t diff = 0;
            for (size_t i = 0; i < ne; i++) diff += memcmp(&e3[i], &e1[i], 4) != 0;
            check(diff > 0, "unet %s differs from unrounded f32 (%zu of %zu values)", nm, diff, ne);
        }
        free(e3);
    }
    free(e1); free(e2); free(d1); free(d2);
    ms_param_table_free(&h); ms_param_table_free(&r);
}

static void test_vae(const MsModel *m, MsDtype dt) {
    const VaeConfig *c = &m->vae_config;
    const int f = 1 << (c->n_blocks - 1), H = 2 * f, W = 3 * f, h = H / f, w = W / f, L = c->latent_channels;
    MsParamTable ht = { 0 }, rt = { 0 };
    const char *nm = dt == MS_DT_BF16 ? "bf16" : "f16";
    if (!check(copy_table(&ht, &m->vae, dt, dt, mk_vae, c) && copy_table(&rt, &m->vae, MS_DT_F32, dt, mk_vae, c),
               "vae %s tables", nm)) return;
    VaeSizes vz; Arena ar = { 0 };
    VaeParams *ph = (VaeParams *)malloc(sizeof *ph), *pr = (VaeParams *)malloc(sizeof *pr);
    const size_t ni = (size_t)c->in_channels * H * W, nl = (size_t)L * h * w, no = (size_t)c->out_channels * H * W;
    float *img = (float *)malloc(ni * 4), *lat = (float *)malloc(nl * 4);
    float *o[2], *mu[2], *lv[2];
    for (int k = 0; k < 2; k++) { o[k] = (float *)malloc(no * 4); mu[k] = (float *)malloc(nl * 4); lv[k] = (float *)malloc(nl * 4); }
    fill(img, ni, 4, 0.5f); fill(lat, nl, 5, 0.2f);
    int ok = vae_sizes(c, H, W, -1, &vz) == MS_OK && arena_init(&ar, vz.encode_bytes > vz.decode_bytes ? vz.encode_bytes : vz.decode_bytes) == MS_OK &&
             vae_params_init(ph, c, &ht) == MS_OK && vae_params_init(pr, c, &rt) == MS_OK;
    for (int k = 0; ok && k < 2; k++)
        ok = vae_decode(k ? pr : ph, &ar, o[k], lat, 1, h, w) == MS_OK && vae_encode(k ? pr : ph, &ar, mu[k], lv[k], img, 1, H, W) == MS_OK;
    if (check(ok, "vae %s decode + encode run: %s", nm, ok ? "" : ms_last_error())) {
        char what[64];
        snprintf(what, sizeof what, "vae %s decode", nm); bitwise(what, o[0], o[1], no);
        snprintf(what, sizeof what, "vae %s encode mean", nm); bitwise(what, mu[0], mu[1], nl);
        snprintf(what, sizeof what, "vae %s encode logvar", nm); bitwise(what, lv[0], lv[1], nl);
    }
    for (int k = 0; k < 2; k++) { free(o[k]); free(mu[k]); free(lv[k]); }
    free(img); free(lat); free(ph); free(pr); arena_free(&ar);
    ms_param_table_free(&ht); ms_param_table_free(&rt);
}

static void test_clip(const MsModel *m, MsDtype dt) {
    const ClipTextConfig *c = &m->text_config;
    const char *nm = dt == MS_DT_BF16 ? "bf16" : "f16";
    MsParamTable ht = { 0 }, rt = { 0 };
    if (!check(copy_table(&ht, &m->text, dt, dt, mk_text, c) && copy_table(&rt, &m->text, MS_DT_F32, dt, mk_text, c),
               "text %s tables", nm)) return;
    const int B = 2, T = 9, D = c->hidden_size, r = 2;
    int32_t ids[18];
    for (int i = 0; i < B * T; i++) ids[i] = (int32_t)((i * 7919 + 3) % c->vocab_size);
    ids[5] = c->vocab_size;                                  /* one new (added-token) embedding */
    float *nemb = (float *)malloc((size_t)D * 4), *out[2], *dout = (float *)malloc((size_t)B * T * D * 4), *dn[2];
    fill(nemb, (size_t)D, 6, 0.02f); fill(dout, (size_t)B * T * D, 7, 1.0f);
    float *lmem = (float *)malloc(clip_lora_numel(c, r) * 4);
    fill(lmem, clip_lora_numel(c, r), 8, 0.05f);
    ClipLora lora; clip_lora_bind(&lora, lmem, c, r, 1.0f);
    int ok = 1;
    for (int k = 0; k < 2; k++) {
        ClipTextParams *p = (ClipTextParams *)malloc(sizeof *p);
        ClipTextActs a; Arena ar = { 0 };
        out[k] = (float *)malloc((size_t)B * T * D * 4);
        dn[k] = (float *)calloc((size_t)D, 4);
        ok = ok && p && clip_text_params(p, k ? &rt : &ht, c) == MS_OK &&
             arena_init(&ar, clip_text_sizes(c, B, T, r, 1)) == MS_OK && clip_text_acts_alloc(&a, &ar, c, B, T, r, 1) == MS_OK &&
             clip_text_forward(&a, p, &lora, ids, nemb, 1, c) == MS_OK;
        if (ok) {
            memcpy(out[k], a.out, (size_t)B * T * D * 4);
            clip_text_backward(NULL, dn[k], dout, &a, p, &lora, ids, 1, c);
        }
        free(p); arena_free(&ar);
    }
    if (check(ok, "text %s forward + backward run: %s", nm, ok ? "" : ms_last_error())) {
        char what[64];
        snprintf(what, sizeof what, "text %s last_hidden_state", nm); bitwise(what, out[0], out[1], (size_t)B * T * D);
        snprintf(what, sizeof what, "text %s d(new embedding)", nm); bitwise(what, dn[0], dn[1], (size_t)D);
    }
    for (int k = 0; k < 2; k++) { free(out[k]); free(dn[k]); }
    free(nemb); free(dout); free(lmem);
    ms_param_table_free(&ht); ms_param_table_free(&rt);
}

static void test_adapter(const char *dir, MsDtype dt) {   /* dir: < 1024 bytes */
    char path[1100];
    AdapterConfig c; MsParamTable t = { 0 }, ht = { 0 }, rt = { 0 };
    const char *nm = dt == MS_DT_BF16 ? "bf16" : "f16";
    snprintf(path, sizeof path, "%s/t2iadapter_openpose", dir);
    if (!check(ms_adapter_load(path, NULL, &c, &t) == MS_OK, "load %s: %s", path, ms_last_error())) return;
    if (check(copy_table(&ht, &t, dt, dt, mk_adapter, &c) && copy_table(&rt, &t, MS_DT_F32, dt, mk_adapter, &c),
              "adapter %s tables", nm)) {
        const int N = 1, m = c.downscale_factor << (c.n_channels - 1), H = m, W = 2 * m;
        size_t bytes, nf[MS_MAX_BLOCKS], tot = 0;
        adapter_sizes(&c, N, H, W, &bytes, nf);
        for (int i = 0; i < c.n_channels; i++) tot += nf[i];
        float *cond = (float *)malloc((size_t)N * c.in_channels * H * W * 4), *fe[2][MS_MAX_BLOCKS];
        MsRng r; ms_rng_seed(&r, 9); ms_rng_fill_uniform(&r, cond, (size_t)N * c.in_channels * H * W, 0.0f, 1.0f);
        int ok = 1;
        for (int k = 0; k < 2; k++) {
            AdapterParams p; Arena ar = { 0 };
            float *all = (float *)malloc(tot * 4), *q = all;
            for (int i = 0; i < c.n_channels; i++) { fe[k][i] = q; q += nf[i]; }
            ok = ok && all && adapter_params_init(&p, &c, k ? &rt : &ht) == MS_OK && arena_init(&ar, bytes) == MS_OK &&
                 adapter_forward(&p, &ar, fe[k], cond, N, H, W) == MS_OK;
            arena_free(&ar);
        }
        if (check(ok, "adapter %s forward runs: %s", nm, ok ? "" : ms_last_error())) {
            char what[64];
            snprintf(what, sizeof what, "adapter %s features", nm); bitwise(what, fe[0][0], fe[1][0], tot);
        }
        free(fe[0][0]); free(fe[1][0]); free(cond);
    }
    ms_param_table_free(&t); ms_param_table_free(&ht); ms_param_table_free(&rt);
}

/* Bits of a float, with the quiet bit set on NaNs: the i386 ABI returns floats in an x87
 * register, which quiets a signalling NaN on the way (ms_f16_to_f32 returns by value;
 * ms_half_to_f32 writes memory and keeps it). Payload and sign must still agree. */
static uint32_t bits_q(float f) {
    uint32_t b;
    memcpy(&b, &f, 4);
    if ((b & 0x7f800000u) == 0x7f800000u && (b & 0x7fffffu)) b |= 0x400000u;
    return b;
}

static void test_convert(void) {
    size_t bad = 0;
    float x;
    for (uint32_t v = 0; v < 65536; v++) {
        uint16_t h = (uint16_t)v;
        float ref = ms_f16_to_f32(h), bref = ms_bf16_to_f32(h);
        ms_half_to_f32(&x, &h, 1, MS_DT_F16);
        bad += bits_q(x) != bits_q(ref);
        ms_half_to_f32(&x, &h, 1, MS_DT_BF16);
        bad += bits_q(x) != bits_q(bref);
    }
    check(bad == 0, "ms_half_to_f32 == ms_f16_to_f32 / ms_bf16_to_f32 on all 65536 patterns (%zu differ)", bad);
    /* f32 tables: the data itself, no staging */
    float data[3] = { 1, 2, 3 };
    MsParam p;
    memset(&p, 0, sizeof p);
    p.f32 = data; p.numel = 3;
    check(ms_weight_f32(&p, NULL) == data, "ms_weight_f32 returns the f32 data itself");
}

/* The vectorised converter (F16C / AVX-512 / NEON / branch-free scalar) against its definition
 * ms_f16_to_f32_vec_ref, bit for bit in memory (signalling NaNs too: the hardware quiets them,
 * the fast paths must undo that), at every SIMD level this CPU has, over all 65536 patterns at
 * several start offsets (unaligned loads) and lengths (vector tails); the definition against the
 * loader's ms_f16_to_f32 (quiet bit aside, see bits_q). */
static void test_convert_simd(void) {
    uint16_t *h = (uint16_t *)malloc((65536 + 64) * sizeof *h);
    float *ref = (float *)malloc((65536 + 64) * sizeof *ref), *got = (float *)malloc((65536 + 64) * sizeof *got);
    if (!check(h && ref && got, "memory")) { free(h); free(ref); free(got); return; }
    for (uint32_t v = 0; v < 65536 + 64; v++) h[v] = (uint16_t)(v * 40503u);   /* odd multiplier: all patterns */
    ms_f16_to_f32_vec_ref(ref, h, 65536 + 64);
    size_t bad = 0;
    for (uint32_t v = 0; v < 65536; v++) bad += bits_q(ref[v]) != bits_q(ms_f16_to_f32(h[v]));
    check(bad == 0, "ms_f16_to_f32_vec_ref == ms_f16_to_f32 on all 65536 patterns (%zu differ)", bad);
    size_t nsnan = 0;
    for (uint32_t v = 0; v < 65536; v++) nsnan += (h[v] & 0x7e00u) == 0x7c00u && (h[v] & 0x1ffu);
    check(nsnan == 1022, "the patterns include the 1022 signalling NaNs");
    MsSimd top = ms_simd();
    for (int l = MS_SIMD_SCALAR; l <= (int)top; l++) {
        ms_set_simd((MsSimd)l);
        if (ms_simd() != (MsSimd)l) continue;
        static const size_t offs[] = { 0, 1, 3, 7, 8, 15, 17 }, lens[] = { 65536, 65535, 1, 7, 8, 9, 15, 16, 17, 33 };
        bad = 0;
        for (size_t a = 0; a < sizeof offs / sizeof offs[0]; a++)
            for (size_t b = 0; b < sizeof lens / sizeof lens[0]; b++) {
                size_t o = offs[a], n = lens[b] >= 65535 ? lens[b] : lens[b] + 1000 * a;
                memset(got, 0xff, (65536 + 64) * sizeof *got);      /* NaN all around */
                ms_f16_to_f32_vec(got + o, h + o, n);
                bad += memcmp(got + o, ref + o, n * sizeof *got) != 0;
                bad += got[o + n] == got[o + n] || (o && got[o - 1] == got[o - 1]);  /* untouched around */
            }
        check(bad == 0, "ms_f16_to_f32_vec at %s == _ref bitwise, all patterns, offsets and tails (%zu runs differ)",
              ms_simd_name((MsSimd)l), bad);
    }
    ms_set_simd(top);
    free(h); free(ref); free(got);
    /* large outputs take the streaming-store path (4 Mi values and more): 4 Mi + 37 from an
     * odd start, every pattern 64 times */
    const size_t nbig = ((size_t)4 << 20) + 37;
    h = (uint16_t *)malloc((nbig + 1) * sizeof *h);
    ref = (float *)malloc((nbig + 1) * sizeof *ref);
    got = (float *)malloc((nbig + 1) * sizeof *got);
    if (!check(h && ref && got, "memory")) { free(h); free(ref); free(got); return; }
    for (size_t v = 0; v <= nbig; v++) h[v] = (uint16_t)(v * 40503u);
    ms_f16_to_f32_vec_ref(ref + 1, h + 1, nbig);
    for (int l = MS_SIMD_SCALAR; l <= (int)top; l++) {
        ms_set_simd((MsSimd)l);
        if (ms_simd() != (MsSimd)l) continue;
        ms_f16_to_f32_vec(got + 1, h + 1, nbig);
        check(!memcmp(got + 1, ref + 1, nbig * sizeof *got), "ms_f16_to_f32_vec at %s == _ref bitwise on %zu values (streaming stores)",
              ms_simd_name((MsSimd)l), nbig);
    }
    ms_set_simd(top);
    free(h); free(ref); free(got);
}

int main(void) {
    char dir[1024];
    MsModel m;
    snprintf(dir, sizeof dir, "%s", test_tiny_dir());
    test_convert();
    test_convert_simd();
    if (!check(ms_model_load(dir, NULL, &m) == MS_OK, "load %s: %s", dir, ms_last_error())) return test_summary("test_half");
    {
        UNetParams p;
        if (check(unet_params_init(&p, &m.unet_config, &m.unet) == MS_OK, "unet_params_init f32"))
            check(p.ws.mem == NULL && p.ws.mat == NULL, "f32 table: no staging allocated");
        unet_params_free(&p);
    }
    for (int k = 0; k < 2; k++) {
        MsDtype dt = k ? MS_DT_BF16 : MS_DT_F16;
        test_unet(&m, dt);
        test_vae(&m, dt);
        test_clip(&m, dt);
        test_adapter(dir, dt);
    }
    ms_model_free(&m);
    ms_gemm_scratch_free();
    ops_scratch_free();
    return test_summary("test_half");
}
