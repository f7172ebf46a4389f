/* tests/test_unet.c — models/unet.c (diffusers 0.19.3 UNet2DConditionModel) on tiny-sd.
 *
 * tests/data/unet_golden.safetensors comes from tools/ref/gen_unet_golden.py: torch autograd in
 * float64 on the same float32 inputs and weights (its metadata records what torch float32 itself
 * reaches against float64: ~1e-6 for eps and gradients). Checked here:
 *   - eps for N = 2, a non-square 8x12 latent (12 -> 6 -> 3 -> 2: the up path interpolates to
 *     the skip sizes), timesteps 999 and 423.5; the down/mid/up block outputs; rel-L2 <= 1e-5;
 *   - layer-wise contexts (16 layers, Mix-of-Show order), adapter residuals, LoRA (rank 3,
 *     alpha 0.75) on every to_q/k/v/out.0, and the gradients of L = sum(R * eps) w.r.t. the
 *     context, the 16 layer contexts and every LoRA down/up (rel-L2 <= 1e-4);
 *   - inference mode (reused buffers) gives the training-mode eps bit for bit;
 *   - 1 vs 2 threads: eps and every gradient bit-identical;
 *   - central differences of L for context and LoRA coordinates on a 1x4x4 latent, Tk = 5;
 *   - the planned arena sizes are exactly enough; bad arguments return errors;
 *   - the attention probe (tests/data/probe_golden.safetensors, tools/ref/gen_probe_golden.py):
 *     attn2 probabilities at 3 key columns of all 16 layers and the gradients of
 *     L = sum(R * eps) + sum_l sum(Q_l * probe_l) (layer contexts, LoRA), 16x16 and 8x12.
 */
#include "test.h"

#include "tools/tools.h"

static StFile G;

/* golden tensor as float (F64 references rounded to nearest); NULL + failed check if absent */
static float *golden(const char *key, size_t n) {
    const StTensor *t = st_find(&G, key);
    float *x = NULL;
    if (!t || t->numel != n) { check(0, "golden %s (%zu values) present", key, n); return NULL; }
    x = test_zeros(n);
    if (st_to_f32(&G, t, x, n)) { check(0, "golden %s readable: %s", key, ms_last_error()); return NULL; }
    return x;
}

static void cmp(const char *what, const float *got, const char *key, size_t n, double tol) {
    float *want = golden(key, n);
    if (want) check_close(what, got, want, n, tol, 0);
    ms_free_aligned(want);
}

typedef struct {
    UNetActs a;
    Arena acts, scratch;
} Run;

static int run_init(Run *r, const UNetConfig *c, int N, int h, int w, int Tk, int training) {
    UNetSizes s;
    memset(r, 0, sizeof *r);
    if (!check(unet_sizes(c, N, h, w, Tk, training, &s) == MS_OK, "unet_sizes N=%d %dx%d train=%d", N, h, w, training))
        return 0;
    /* exactly the planned bytes: carving must fit */
    if (arena_init(&r->acts, s.acts_bytes) || arena_init(&r->scratch, s.scratch_bytes)) { printf("no memory\n"); exit(2); }
    MsStatus st = unet_acts_init(&r->a, c, N, h, w, Tk, training, &r->acts, &r->scratch);
    if (!check(st == MS_OK, "unet_acts_init fits the planned %.2f + %.2f MB", s.acts_bytes / 1e6, s.scratch_bytes / 1e6)) {
        printf("      %s\n", ms_last_error());
        return 0;
    }
    return 1;
}
static void run_free(Run *r) { unet_acts_free(&r->a); arena_free(&r->acts); arena_free(&r->scratch); }

static MsStatus lora_from_golden(UNetLora *l, const UNetParams *p) {
    char name[2 * MS_KEY_MAX], key[3 * MS_KEY_MAX];
    for (int a = 0; a < l->n_attn; a++)
        for (int w = 0; w < 4; w++) {
            UNetLoraLinear *x = &l->lin[4 * a + w];
            unet_lora_module_name(p, a, w, name, sizeof name);
            snprintf(key, sizeof key, "lora/%s.lora_down.weight", name);
            int64_t sd[2] = { l->rank, x->in }, su[2] = { x->out, l->rank };
            MsStatus s = st_read_f32(&G, key, x->down, (size_t)l->rank * x->in, 2, sd);
            if (s) return s;
            snprintf(key, sizeof key, "lora/%s.lora_up.weight", name);
            if ((s = st_read_f32(&G, key, x->up, (size_t)x->out * l->rank, 2, su))) return s;
        }
    return MS_OK;
}

/* every dlora tensor against grad_lora/<module>.lora_{down,up}.weight, as one vector */
static void cmp_lora_grads(const UNetLora *d, const UNetParams *p, double tol) {
    char name[2 * MS_KEY_MAX], key[3 * MS_KEY_MAX];
    float *want = test_zeros(d->n_floats);
    int ok = 1;
    for (int a = 0; a < d->n_attn && ok; a++)
        for (int w = 0; w < 4 && ok; w++) {
            const UNetLoraLinear *x = &d->lin[4 * a + w];
            unet_lora_module_name(p, a, w, name, sizeof name);
            snprintf(key, sizeof key, "grad_lora/%s.lora_down.weight", name);
            const StTensor *t = st_find(&G, key);
            ok = t && !st_to_f32(&G, t, want + (x->down - d->data), (size_t)d->rank * x->in);
            snprintf(key, sizeof key, "grad_lora/%s.lora_up.weight", name);
            t = st_find(&G, key);
            ok = ok && t && !st_to_f32(&G, t, want + (x->up - d->data), (size_t)x->out * d->rank);
        }
    if (check(ok, "golden LoRA gradients present (%zu floats)", d->n_floats)) {
        check_close("d lora (all down/up, vs f64)", d->data, want, d->n_floats, tol, 0);
        /* tensor by tensor (the whole-vector error could hide a small wrong tensor): rel-L2 of
         * each down/up whose norm is at least 1% of the largest one */
        double nmax = 0.0, worst = 0.0;
        const char *wname = "";
        static char wbuf[2 * MS_KEY_MAX];
        for (int pass = 0; pass < 2; pass++)
            for (int k = 0; k < 8 * d->n_attn; k++) {
                const UNetLoraLinear *x = &d->lin[k / 2];
                const float *g = k % 2 ? x->up : x->down;
                size_t m = (size_t)d->rank * (k % 2 ? x->out : x->in), off = (size_t)(g - d->data);
                double num = 0.0, den = 0.0;
                for (size_t i = 0; i < m; i++) {
                    double e = (double)g[i] - want[off + i];
                    num += e * e; den += (double)want[off + i] * want[off + i];
                }
                if (pass == 0) { nmax = fmax(nmax, sqrt(den)); continue; }
                if (sqrt(den) < 1e-2 * nmax) continue;
                if (sqrt(num / den) > worst) {
                    worst = sqrt(num / den);
                    unet_lora_module_name(p, k / 8, k / 2 % 4, wbuf, sizeof wbuf);
                    wname = wbuf;
                }
            }
        check(worst <= 10 * tol, "d lora per tensor: worst rel_l2 %.2e (tol %.0e) at %s", worst, 10 * tol, wname);
    }
    ms_free_aligned(want);
}

static const UNetParams *GP;
static const UNetConfig *GPC;   /* tiny-sd's config (test_plan_sd15) */

/* ---- goldens ---- */
static void test_goldens(const UNetParams *p, const UNetConfig *c) {
    const int N = 2, H = 8, W = 12, Tk = 77, D = c->cross_attention_dim, nc = ms_unet_cross_attn_layers(c);
    const size_t nx = (size_t)N * 4 * H * W, nctx = (size_t)N * Tk * D;
    float *x = golden("in/latent", nx), *t = golden("in/t", (size_t)N), *ctx = golden("in/ctx", nctx);
    float *R = golden("in/R", nx), *lctx = golden("in/layer_ctx", (size_t)nc * nctx);
    float *eps = test_zeros(nx), *eps1 = test_zeros(nx);
    if (!x || !t || !ctx || !R || !lctx) return;
    check(nc == 16, "tiny-sd has 16 cross-attention layers (%d)", nc);
    Run r, ri;
    if (!run_init(&r, c, N, H, W, Tk, 1) || !run_init(&ri, c, N, H, W, Tk, 0)) return;

    /* plain */
    check(unet_forward(eps, &r.a, x, t, ctx, NULL, NULL, p, NULL) == MS_OK, "forward");
    cmp("eps (N=2, 8x12, t=999/423.5)", eps, "eps", nx, 1e-5);
    char key[64], what[64];
    for (int i = 0; i < c->n_blocks; i++) {
        int lv = i < c->n_blocks - 1 ? i + 1 : i;
        snprintf(key, sizeof key, "act/down%d", i); snprintf(what, sizeof what, "down block %d output", i);
        cmp(what, r.a.down_out[i], key, (size_t)N * c->block_out_channels[i] * r.a.lh[lv] * r.a.lw[lv], 1e-5);
    }
    int n = c->n_blocks;
    cmp("mid block output", r.a.mid_out, "act/mid", (size_t)N * c->block_out_channels[n - 1] * r.a.lh[n - 1] * r.a.lw[n - 1], 1e-5);
    for (int i = 0; i < n; i++) {
        int lv = n - 1 - i, lo = lv > 0 ? lv - 1 : 0;
        snprintf(key, sizeof key, "act/up%d", i); snprintf(what, sizeof what, "up block %d output", i);
        cmp(what, r.a.up_out[i], key, (size_t)N * c->block_out_channels[lv] * r.a.lh[lo] * r.a.lw[lo], 1e-5);
    }
    check(unet_forward(eps1, &ri.a, x, t, ctx, NULL, NULL, p, NULL) == MS_OK, "forward (inference mode)");
    check_bitwise("inference mode eps == training mode eps", eps1, eps, nx);

    /* adapter residuals */
    const float *ad[MS_MAX_BLOCKS] = { 0 };
    for (int i = 0; i < n; i++) {
        int lv = (c->down_block_types[i] == MS_BLOCK_DOWN && i < n - 1) ? i + 1 : i;
        snprintf(key, sizeof key, "in/adapter/%d", i);
        ad[i] = golden(key, (size_t)N * c->block_out_channels[i] * r.a.lh[lv] * r.a.lw[lv]);
    }
    check(unet_forward(eps, &ri.a, x, t, ctx, NULL, ad, p, NULL) == MS_OK, "forward with adapter");
    cmp("eps with adapter residuals", eps, "eps_adapter", nx, 1e-5);

    /* layer-wise contexts + gradients */
    const float *lc[64];
    float *dl[64], *dlall = test_zeros((size_t)nc * nctx);
    for (int i = 0; i < nc; i++) { lc[i] = lctx + (size_t)i * nctx; dl[i] = dlall + (size_t)i * nctx; }
    check(unet_forward(eps, &r.a, x, t, NULL, lc, NULL, p, NULL) == MS_OK, "forward, layer-wise contexts");
    cmp("eps, 16 layer contexts", eps, "eps_layer", nx, 1e-5);
    check(unet_backward(&r.a, p, NULL, NULL, R, NULL, dl) == MS_OK, "backward to layer contexts");
    cmp("d layer contexts (16,2,77,32)", dlall, "grad_layer/ctx", (size_t)nc * nctx, 1e-4);

    /* LoRA + gradients to context and LoRA */
    Arena tr;
    UNetLora l, dlo;
    size_t lf = unet_lora_floats(c, 3);
    arena_init(&tr, 2 * lf * sizeof(float) + 2 * (size_t)4 * 32 * sizeof(UNetLoraLinear) + 4096);
    if (!check(unet_lora_init(&l, p, 3, 0.75f, &tr) == MS_OK && unet_lora_init(&dlo, p, 3, 0.75f, &tr) == MS_OK,
               "lora init (%zu floats)", lf)) return;
    if (!check(lora_from_golden(&l, p) == MS_OK, "lora values from golden")) { printf("      %s\n", ms_last_error()); return; }
    float *dctx = test_zeros(nctx);
    check(unet_forward(eps, &r.a, x, t, ctx, NULL, NULL, p, &l) == MS_OK, "forward with LoRA");
    cmp("eps with LoRA (rank 3, alpha 0.75)", eps, "eps_lora", nx, 1e-5);
    check(unet_backward(&r.a, p, &l, &dlo, R, dctx, NULL) == MS_OK, "backward with LoRA");
    cmp("d context (LoRA model)", dctx, "grad_lora/ctx", nctx, 1e-4);
    cmp_lora_grads(&dlo, p, 1e-4);
    check(unet_forward(eps1, &ri.a, x, t, ctx, NULL, NULL, p, &l) == MS_OK, "inference forward with LoRA");
    check_bitwise("LoRA: inference eps == training eps", eps1, eps, nx);

    /* 1 vs 2 threads, bitwise */
    if (ms_max_threads() >= 1) {
        float *dctx2 = test_zeros(nctx), *dlo1 = test_zeros(lf);
        memcpy(dlo1, dlo.data, lf * sizeof(float));
        ms_set_threads(2);
        memset(dlo.data, 0, lf * sizeof(float));
        check(unet_forward(eps1, &r.a, x, t, ctx, NULL, NULL, p, &l) == MS_OK, "forward, 2 threads");
        check(unet_backward(&r.a, p, &l, &dlo, R, dctx2, NULL) == MS_OK, "backward, 2 threads");
        ms_set_threads(1);
        check_bitwise("eps: 1 vs 2 threads", eps1, eps, nx);
        check_bitwise("d context: 1 vs 2 threads", dctx2, dctx, nctx);
        check_bitwise("d lora: 1 vs 2 threads", dlo.data, dlo1, lf);
        ms_free_aligned(dctx2); ms_free_aligned(dlo1);
    }

    /* errors */
    check(unet_forward(eps, &r.a, x, t, NULL, NULL, NULL, p, NULL) == MS_ERR_ARG, "no context: MS_ERR_ARG (%s)", ms_last_error());
    check(unet_backward(&ri.a, p, NULL, NULL, R, dctx, NULL) == MS_ERR_ARG, "backward after inference plan: MS_ERR_ARG");
    UNetSizes sz;
    check(unet_sizes(c, 0, 8, 8, 77, 0, &sz) == MS_ERR_ARG, "batch 0: MS_ERR_ARG (%s)", ms_last_error());
    arena_free(&tr);
    run_free(&r); run_free(&ri);
    ms_free_aligned(x); ms_free_aligned(t); ms_free_aligned(ctx); ms_free_aligned(R); ms_free_aligned(lctx);
    ms_free_aligned(eps); ms_free_aligned(eps1); ms_free_aligned(dlall); ms_free_aligned(dctx);
    for (int i = 0; i < n; i++) ms_free_aligned((float *)ad[i]);
}

/* ---- central differences on a small latent ---- */
typedef struct {
    Run r;
    const UNetParams *p;
    UNetLora *l;
    float *x, *t, *ctx, *R, *eps;
    size_t nx;
} GC;

static double gc_loss(void *v) {
    GC *g = (GC *)v;
    unet_forward(g->eps, &g->r.a, g->x, g->t, g->ctx, NULL, NULL, g->p, g->l);
    double s = 0.0;
    for (size_t i = 0; i < g->nx; i++) s += (double)g->R[i] * g->eps[i];
    return s;
}

static void test_gradcheck(const UNetParams *p, const UNetConfig *c) {
    const int N = 1, H = 4, W = 4, Tk = 5, D = c->cross_attention_dim;
    GC g;
    MsRng rng;
    ms_rng_seed(&rng, 7);
    g.p = p;
    g.nx = (size_t)N * 4 * H * W;
    g.x = test_randn(&rng, g.nx, 1.0f);
    g.t = test_zeros(1); g.t[0] = 511.25f;
    g.ctx = test_randn(&rng, (size_t)N * Tk * D, 1.0f);
    g.R = test_randn(&rng, g.nx, 1.0f);
    g.eps = test_zeros(g.nx);
    if (!run_init(&g.r, c, N, H, W, Tk, 1)) return;
    Arena tr;
    UNetLora l, dl;
    size_t lf = unet_lora_floats(c, 2);
    arena_init(&tr, 2 * lf * sizeof(float) + (size_t)64 * 32 * sizeof(UNetLoraLinear) + 4096);
    unet_lora_init(&l, p, 2, 1.0f, &tr);
    unet_lora_init(&dl, p, 2, 1.0f, &tr);
    ms_rng_fill_normal(&rng, l.data, l.n_floats, 0.0f, 0.2f);
    g.l = &l;
    float *dctx = test_zeros((size_t)N * Tk * D);
    gc_loss(&g);
    unet_backward(&g.r.a, p, &l, &dl, g.R, dctx, NULL);
    double w = gradcheck_top(gc_loss, &g, g.ctx, dctx, (size_t)N * Tk * D, 5e-2f, test_is_verbose());
    check(w < 1e-2, "central differences d context (1x4x4, Tk 5): worst rel %.2e", w);
    /* LoRA tensors (attention module, q/k/v/out, down/up): the first block's attn1 and attn2;
     * the mid block's attn1 to_q, whose gradient is exactly 0 (one pixel at 1x1: softmax over one
     * key is 1 whatever q is); down_blocks.0.attentions.1 attn2 to_q; up_blocks.3. Blocks at
     * 1x1 (mid, up_blocks.0/1) have gradients ~1e-3..1e-2 here, too close to the float32 noise
     * of the differences (~2e-5); the per-tensor golden comparison covers them. */
    int picks[][3] = { { 0, 0, 0 }, { 0, 3, 1 }, { 1, 1, 0 }, { 1, 2, 1 },
                       { 2 * 1 + 1, 0, 1 }, { 2 * 14, 1, 0 }, { l.n_attn - 1, 3, 1 }, { l.n_attn - 2, 2, 0 } };
    {   /* mid attn1 to_q: exactly 0 in exact arithmetic, float noise here. Judged against the
         * scale of the whole backward (max |d context|), not against itself. */
        const UNetLoraLinear *dq = &dl.lin[4 * (2 * 6) + 0];
        double zmax = 0.0, cmax = 0.0;
        for (size_t k = 0; k < (size_t)l.rank * dq->in; k++) zmax = fmax(zmax, fabs(dq->down[k]));
        for (size_t k = 0; k < (size_t)N * Tk * D; k++) cmax = fmax(cmax, fabs(dctx[k]));
        check(zmax <= 1e-4 * cmax, "mid attn1 to_q lora_down gradient is 0 up to rounding: max %.2e (d context max %.2e)",
              zmax, cmax);
    }
    for (size_t k = 0; k < sizeof picks / sizeof picks[0]; k++) {
        UNetLoraLinear *x = &l.lin[4 * picks[k][0] + picks[k][1]], *dx = &dl.lin[4 * picks[k][0] + picks[k][1]];
        float *v = picks[k][2] ? x->up : x->down, *dv = picks[k][2] ? dx->up : dx->down;
        size_t m = (size_t)l.rank * (picks[k][2] ? x->out : x->in);
        char name[2 * MS_KEY_MAX];
        unet_lora_module_name(p, picks[k][0], picks[k][1], name, sizeof name);
        w = gradcheck_top(gc_loss, &g, v, dv, m, 5e-2f, test_is_verbose());
        check(w < 1e-2, "central differences %s.lora_%s: worst rel %.2e", name, picks[k][2] ? "up" : "down", w);
    }
    arena_free(&tr);
    run_free(&g.r);
    ms_free_aligned(g.x); ms_free_aligned(g.t); ms_free_aligned(g.ctx); ms_free_aligned(g.R);
    ms_free_aligned(g.eps); ms_free_aligned(dctx);
}

/* ---- attention probe (UNetActs.probe*): Mix-of-Show's attention maps, against
 * tests/data/probe_golden.safetensors (tools/ref/gen_probe_golden.py: diffusers 0.19.3 with an
 * attn2 processor that stores attention_probs as EDLoRA_Control_AttnProcessor does, float64).
 * N = 2, latents 16x16 and 8x12, 16 layer contexts, LoRA (rank 2, alpha 0.75) everywhere,
 * L = sum(R * eps) + sum_l sum(Q_l * probe_l), 3 key columns per sample (one repeated). ---- */
static StFile PG;
static void cmp_pg(const char *what, const float *got, const char *key, size_t n, double tol);

static float *pg_read(const char *key, size_t n) {
    const StTensor *t = st_find(&PG, key);
    float *x;
    if (!t || t->numel != n) { check(0, "probe golden %s (%zu values) present", key, n); return NULL; }
    x = test_zeros(n);
    if (st_to_f32(&PG, t, x, n)) { check(0, "probe golden %s readable: %s", key, ms_last_error()); ms_free_aligned(x); return NULL; }
    return x;
}

/* every LoRA down/up from "<pre><module>.lora_{down,up}.weight" into one flat vector laid out as l->data */
static int pg_lora(float *dst, const UNetLora *l, const UNetParams *p, const char *pre) {
    char name[2 * MS_KEY_MAX], key[3 * MS_KEY_MAX];
    for (int a = 0; a < l->n_attn; a++)
        for (int w = 0; w < 4; w++) {
            const UNetLoraLinear *x = &l->lin[4 * a + w];
            unet_lora_module_name(p, a, w, name, sizeof name);
            snprintf(key, sizeof key, "%s%s.lora_down.weight", pre, name);
            const StTensor *t = st_find(&PG, key);
            if (!t || st_to_f32(&PG, t, dst + (x->down - l->data), (size_t)l->rank * x->in)) return 0;
            snprintf(key, sizeof key, "%s%s.lora_up.weight", pre, name);
            t = st_find(&PG, key);
            if (!t || st_to_f32(&PG, t, dst + (x->up - l->data), (size_t)x->out * l->rank)) return 0;
        }
    return 1;
}

static void test_probe_size(const UNetParams *p, const UNetConfig *c, int H, int W, int threads_check) {
    const int N = 2, Tk = 77, D = c->cross_attention_dim, nc = ms_unet_cross_attn_layers(c), ncol = 3;
    const size_t nx = (size_t)N * 4 * H * W, nctx = (size_t)N * Tk * D;
    char s[16], key[128], what[128];
    snprintf(s, sizeof s, "%dx%d", H, W);
    snprintf(key, sizeof key, "in/%s/latent", s); float *x = pg_read(key, nx);
    snprintf(key, sizeof key, "in/%s/R", s); float *R = pg_read(key, nx);
    float *t = pg_read("in/t", (size_t)N), *lctx = pg_read("in/layer_ctx", (size_t)nc * nctx);
    float *colsf = pg_read("in/cols", (size_t)N * ncol);
    if (!x || !R || !t || !lctx || !colsf || nc > 64) return;
    int32_t cols[6];
    for (int i = 0; i < N * ncol; i++) cols[i] = (int32_t)colsf[i];
    Run r;
    if (!run_init(&r, c, N, H, W, Tk, 1)) return;
    /* probe buffers, all layers in one block; offsets from unet_probe_shape */
    size_t off[65], total = 0;
    for (int l = 0; l < nc; l++) {
        int hd, h, w;
        off[l] = total;
        if (!check(unet_probe_shape(&r.a, l, &hd, &h, &w) == MS_OK, "unet_probe_shape layer %d", l)) return;
        total += (size_t)N * hd * h * w * ncol;
    }
    off[nc] = total;
    float *pr = test_zeros(total), *Q = test_zeros(total), *want = test_zeros(total);
    float *probe[64];
    const float *dprobe[64];
    int ok = 1;
    for (int l = 0; l < nc && ok; l++) {
        float *v;
        probe[l] = pr + off[l]; dprobe[l] = Q + off[l];
        snprintf(key, sizeof key, "in/%s/Q/%d", s, l);
        ok = (v = pg_read(key, off[l + 1] - off[l])) != NULL;
        if (ok) { memcpy(Q + off[l], v, (off[l + 1] - off[l]) * sizeof(float)); ms_free_aligned(v); }
        snprintf(key, sizeof key, "%s/probe/%d", s, l);
        ok = ok && (v = pg_read(key, off[l + 1] - off[l])) != NULL;
        if (ok) { memcpy(want + off[l], v, (off[l + 1] - off[l]) * sizeof(float)); ms_free_aligned(v); }
    }
    if (!check(ok, "probe golden %s: Q and probes of the %d layers, shapes from unet_probe_shape", s, nc)) return;

    Arena tr;
    UNetLora l, dl;
    size_t lf = unet_lora_floats(c, 2);
    arena_init(&tr, 2 * lf * sizeof(float) + (size_t)64 * 32 * sizeof(UNetLoraLinear) + 4096);
    if (!check(unet_lora_init(&l, p, 2, 0.75f, &tr) == MS_OK && unet_lora_init(&dl, p, 2, 0.75f, &tr) == MS_OK &&
               pg_lora(l.data, &l, p, "lora/"), "probe: LoRA rank 2 from the golden file")) return;
    const float *lc[64];
    float *dlc[64], *dlall = test_zeros((size_t)nc * nctx), *eps = test_zeros(nx), *eps0 = test_zeros(nx);
    for (int i = 0; i < nc; i++) { lc[i] = lctx + (size_t)i * nctx; dlc[i] = dlall + (size_t)i * nctx; }

    /* without the probe first: the forward must not change when it is switched on */
    check(unet_forward(eps0, &r.a, x, t, NULL, lc, NULL, p, &l) == MS_OK, "probe %s: forward, probe off", s);
    r.a.probe_ncol = ncol; r.a.probe_cols = cols; r.a.probe = probe; r.a.dprobe = dprobe;
    check(unet_forward(eps, &r.a, x, t, NULL, lc, NULL, p, &l) == MS_OK, "probe %s: forward, probe on", s);
    check_bitwise("probe on: eps unchanged", eps, eps0, nx);
    snprintf(key, sizeof key, "%s/eps", s); snprintf(what, sizeof what, "probe %s: eps (LoRA, 16 contexts)", s);
    cmp_pg(what, eps, key, nx, 1e-5);
    snprintf(what, sizeof what, "probe %s: all 16 layers' attention probs", s);
    check_close(what, pr, want, total, 1e-5, 0);
    double worst = 0.0;
    int wl = 0;
    for (int k = 0; k < nc; k++) {
        TestErr e = test_err_f(pr + off[k], want + off[k], off[k + 1] - off[k]);
        if (e.rel_l2 > worst) { worst = e.rel_l2; wl = k; }
    }
    /* layer by layer (a wrong layer could hide in the whole): torch's own float32 reaches 5.9e-6
     * on its worst layer here (golden metadata), mixshow 8.1e-6 (8x12, layer 5, at 2x3) */
    check(worst <= 3e-5, "probe %s: per layer worst rel_l2 %.2e (tol 3e-5) at layer %d", s, worst, wl);

    check(unet_backward(&r.a, p, &l, &dl, R, NULL, dlc) == MS_OK, "probe %s: backward", s);
    snprintf(key, sizeof key, "%s/grad/layer_ctx", s); snprintf(what, sizeof what, "probe %s: d layer contexts", s);
    cmp_pg(what, dlall, key, (size_t)nc * nctx, 1e-5);
    float *gw = test_zeros(lf);
    snprintf(key, sizeof key, "%s/grad_lora/", s);
    if (check(pg_lora(gw, &dl, p, key), "probe %s: golden LoRA gradients present", s)) {
        snprintf(what, sizeof what, "probe %s: d lora (all down/up)", s);
        check_close(what, dl.data, gw, lf, 1e-5, 0);
    }

    if (threads_check) {   /* 1 vs 2 threads, bitwise, probes and gradients */
        float *pr1 = test_zeros(total), *dl1 = test_zeros(lf), *dc1 = test_zeros((size_t)nc * nctx);
        memcpy(pr1, pr, total * sizeof(float)); memcpy(dl1, dl.data, lf * sizeof(float));
        memcpy(dc1, dlall, (size_t)nc * nctx * sizeof(float));
        memset(dl.data, 0, lf * sizeof(float)); memset(dlall, 0, (size_t)nc * nctx * sizeof(float));
        ms_set_threads(2);
        check(unet_forward(eps, &r.a, x, t, NULL, lc, NULL, p, &l) == MS_OK &&
              unet_backward(&r.a, p, &l, &dl, R, NULL, dlc) == MS_OK, "probe %s: forward + backward, 2 threads", s);
        ms_set_threads(1);
        check_bitwise("probe: probes 1 vs 2 threads", pr, pr1, total);
        check_bitwise("probe: d lora 1 vs 2 threads", dl.data, dl1, lf);
        check_bitwise("probe: d layer contexts 1 vs 2 threads", dlall, dc1, (size_t)nc * nctx);
        ms_free_aligned(pr1); ms_free_aligned(dl1); ms_free_aligned(dc1);

        /* errors: a column outside the context, the probe on inference activations, a bad layer */
        int hd, h, w;
        cols[4] = 77;
        check(unet_forward(eps, &r.a, x, t, NULL, lc, NULL, p, &l) == MS_ERR_ARG, "probe_cols out of range: MS_ERR_ARG (%s)",
              ms_last_error());
        cols[4] = (int32_t)colsf[4];
        check(unet_probe_shape(&r.a, nc, &hd, &h, &w) == MS_ERR_ARG, "unet_probe_shape(layer %d): MS_ERR_ARG (%s)", nc,
              ms_last_error());
        Run ri;
        if (run_init(&ri, c, N, H, W, Tk, 0)) {
            ri.a.probe_ncol = ncol; ri.a.probe_cols = cols; ri.a.probe = probe;
            check(unet_forward(eps, &ri.a, x, t, NULL, lc, NULL, p, &l) == MS_ERR_ARG,
                  "probe on inference activations: MS_ERR_ARG (%s)", ms_last_error());
            run_free(&ri);
        }
    }
    arena_free(&tr);
    run_free(&r);
    ms_free_aligned(x); ms_free_aligned(R); ms_free_aligned(t); ms_free_aligned(lctx); ms_free_aligned(colsf);
    ms_free_aligned(pr); ms_free_aligned(Q); ms_free_aligned(want); ms_free_aligned(dlall); ms_free_aligned(eps);
    ms_free_aligned(eps0); ms_free_aligned(gw);
}

static void cmp_pg(const char *what, const float *got, const char *key, size_t n, double tol) {
    float *want = pg_read(key, n);
    if (want) check_close(what, got, want, n, tol, 0);
    ms_free_aligned(want);
}

static void test_probe(const UNetParams *p, const UNetConfig *c) {
    if (st_open(&PG, "tests/data/probe_golden.safetensors")) { check(0, "open probe golden: %s", ms_last_error()); return; }
    test_probe_size(p, c, 16, 16, 1);
    test_probe_size(p, c, 8, 12, 0);
    st_close(&PG);
}

/* The training plan at SD 1.5 shapes (512², batch 1): the GEGLU input g (8C per token) is
 * recomputed in backward, so every block shares one scratch g and the acts stay under budget. */
static void test_plan_sd15(void) {
    UNetConfig c;
    UNetSizes s, si;
    ms_unet_config_sd15(&c);
    if (!check(unet_sizes(&c, 1, 64, 64, 77, 1, &s) == MS_OK && unet_sizes(&c, 1, 64, 64, 77, 0, &si) == MS_OK,
               "unet_sizes SD 1.5 512² (training, inference)"))
        return;
    printf("  SD 1.5 512² batch 1: training acts %.1f MiB + scratch %.1f MiB (inference %.1f + %.1f)\n",
           s.acts_bytes / 1048576.0, s.scratch_bytes / 1048576.0, si.acts_bytes / 1048576.0, si.scratch_bytes / 1048576.0);
    check(s.acts_bytes < (size_t)700 << 20, "SD 1.5 training acts under 700 MiB (g not kept: 1047 MiB when it was)");
    /* tiny-sd: every block's g is the one recomputation buffer (training), sf0 (inference) */
    Run r, ri;
    if (!run_init(&r, GPC, 1, 8, 8, 77, 1) || !run_init(&ri, GPC, 1, 8, 8, 77, 0)) return;
    int shared = r.a.sg != NULL && ri.a.sg == NULL, nb = ms_unet_cross_attn_layers(GPC);
    for (int b = 0; b < nb; b++) shared &= r.a.blk[b].g == r.a.sg && ri.a.blk[b].g == ri.a.sf0;
    check(shared, "GEGLU input: one shared buffer per mode (%d blocks)", nb);
    run_free(&r); run_free(&ri);
}

/* Batch parts (UNetActs.split, issue 14): with T threads and N % T == 0 the forward runs N/T
 * samples per thread; eps must be the batched 1-thread forward's bit for bit, with a context,
 * with layer-wise contexts + adapter residuals + LoRA, and the FLOP count the same. The parts
 * must really run (nparts); with 3 threads (4 % 3 != 0) the batch runs whole. */
static void test_parts(const UNetParams *p, const UNetConfig *c) {
    const int N = 4, h = 16, w = 20, Tk = 77, n = c->n_blocks, nc = ms_unet_cross_attn_layers(c);   /* above UNET_SPLIT_MIN_WORK */
    const size_t nx = (size_t)N * c->in_channels * h * w, nctx = (size_t)N * Tk * c->cross_attention_dim;
    Run r;
    if (!run_init(&r, c, N, h, w, Tk, 0)) return;
    MsRng g;
    ms_rng_seed(&g, 77);
    float *x = test_randn(&g, nx, 1.0f), *ctx = test_randn(&g, nctx, 1.0f), *lall = test_randn(&g, (size_t)nc * nctx, 1.0f);
    float *e0 = test_zeros(nx), *e1 = test_zeros(nx), *e2 = test_zeros(nx), t[4] = { 999.0f, 501.0f, 20.0f, 1.0f };
    const float *lc[64], *ad[MS_MAX_BLOCKS] = { 0 };
    float *adm[MS_MAX_BLOCKS] = { 0 };
    for (int i = 0; i < nc; i++) lc[i] = lall + (size_t)i * nctx;
    for (int i = 0; i < n; i++) {
        int lv = (c->down_block_types[i] == MS_BLOCK_DOWN && i < n - 1) ? i + 1 : i;
        if (i == 1) continue;                             /* one level without a residual */
        ad[i] = adm[i] = test_randn(&g, (size_t)N * c->block_out_channels[i] * r.a.lh[lv] * r.a.lw[lv], 0.5f);
    }
    Arena tr;
    UNetLora l;
    size_t lf = unet_lora_floats(c, 2);
    arena_init(&tr, lf * sizeof(float) + (size_t)4 * 32 * sizeof(UNetLoraLinear) + 4096);
    if (!check(unet_lora_init(&l, p, 2, 1.0f, &tr) == MS_OK, "parts: lora init")) { run_free(&r); return; }
    for (size_t k = 0; k < l.n_floats; k++) l.data[k] = 0.05f * (float)ms_rng_normal(&g);
    /* two overlapping regions, each with its own context, and a box past the image edge */
    const double box[3][4] = { { 0.0, 0.0, 0.6, 0.5 }, { 0.3, 0.4, 1.0, 1.0 }, { 0.9, 0.9, 1.2, 1.3 } };
    float *rc = test_randn(&g, 3 * nctx, 1.0f), *work = test_zeros(unet_regions_work_floats(c, N, h, w, Tk));
    const float *rcp[3] = { rc, rc + nctx, rc + 2 * nctx };
    UNetRegions reg;
    memset(&reg, 0, sizeof reg);
    reg.n = 3; reg.box = box; reg.n_layer_ctx = 0; reg.ctx = rcp; reg.work = work;
    for (int cs = 0; cs < 3; cs++) {
        const char *what = cs == 1 ? "layer contexts + adapter + LoRA" : cs == 2 ? "3 regions" : "one context";
        const float *const *lcp = cs == 1 ? lc : NULL, *const *adp = cs == 1 ? ad : NULL;
        const UNetLora *lp = cs == 1 ? &l : NULL;
        r.a.regions = cs == 2 ? &reg : NULL;
        ms_set_threads(1);
        r.a.split = 0;
        ms_flops_enable(1); ms_flops_reset();
        check(unet_forward(e1, &r.a, x, t, cs == 1 ? NULL : ctx, lcp, adp, p, lp) == MS_OK, "parts, %s: batched, 1 thread", what);
        double f1 = ms_flops_count();
        if (cs == 0) memcpy(e0, e1, nx * sizeof(float));
        if (cs == 2) check(memcmp(e0, e1, nx * sizeof(float)) != 0, "parts: the regions change eps");
        r.a.split = 1;
        const int team[3] = { 2, 4, 3 };
        for (int k = 0; k < 3; k++) {
            memset(e2, 0, nx * sizeof(float));
            ms_set_threads(team[k]);
            ms_flops_reset();
            MsStatus st = unet_forward(e2, &r.a, x, t, cs == 1 ? NULL : ctx, lcp, adp, p, lp);
            int T = ms_task_team(), want = T >= 2 && N % T == 0 ? T : 0;   /* 1 without OpenMP */
            check(st == MS_OK, "parts, %s, %d threads: forward (%s)", what, team[k], st ? ms_last_error() : "ok");
            if (want) check(r.a.nparts == want, "parts, %s, %d threads: %d parts ran (%d)", what, team[k], want, r.a.nparts);
            check_bitwise(what, e2, e1, nx);
            check(ms_flops_count() == f1, "parts, %s, %d threads: FLOPs %.0f == batched %.0f", what, team[k], ms_flops_count(), f1);
        }
        ms_flops_enable(0);
    }
    r.a.regions = NULL;
    ms_free_aligned(rc); ms_free_aligned(work);
    /* a small step (below UNET_SPLIT_MIN_WORK) runs whole */
    Run q;
    if (run_init(&q, c, 2, 8, 8, Tk, 0)) {
        q.a.split = 1;
        ms_set_threads(2);
        check(unet_forward(e2, &q.a, x, t, ctx, NULL, NULL, p, NULL) == MS_OK && q.a.nparts == 0,
              "parts: a 2x8x8 step runs whole (%d parts)", q.a.nparts);
        run_free(&q);
    }
    ms_set_threads(1);
    arena_free(&tr);
    run_free(&r);
    ms_free_aligned(x); ms_free_aligned(ctx); ms_free_aligned(lall); ms_free_aligned(e0); ms_free_aligned(e1); ms_free_aligned(e2);
    for (int i = 0; i < n; i++) ms_free_aligned(adm[i]);
}

int main(void) {
    char dir[1024];
    MsModel m;
    UNetParams p;
    snprintf(dir, sizeof dir, "%s", test_tiny_dir());
    double t0 = ms_time();
    if (st_open(&G, "tests/data/unet_golden.safetensors")) {
        check(0, "open golden: %s", ms_last_error());
        return test_summary("test_unet");
    }
    if (ms_model_load(dir, NULL, &m)) {
        printf("  skip: %s (%s)\n", dir, ms_last_error());
        st_close(&G);
        return test_summary("test_unet");
    }
    if (!check(unet_params_init(&p, &m.unet_config, &m.unet) == MS_OK, "unet_params_init")) {
        printf("      %s\n", ms_last_error());
        return test_summary("test_unet");
    }
    GP = &p;
    ms_set_threads(1);
    double t1 = ms_time();
    test_goldens(&p, &m.unet_config);
    double t2 = ms_time();
    test_gradcheck(&p, &m.unet_config);
    double t3 = ms_time();
    test_probe(&p, &m.unet_config);
    test_parts(&p, &m.unet_config);
    GPC = &m.unet_config;
    test_plan_sd15();
    printf("  time: load %.2f s, goldens %.2f s, gradcheck %.2f s, probe %.2f s\n", t1 - t0, t2 - t1, t3 - t2, ms_time() - t3);
    unet_params_free(&p);
    ms_model_free(&m);
    st_close(&G);
    ms_gemm_scratch_free();
    ops_scratch_free();
    return test_summary("test_unet");
}
