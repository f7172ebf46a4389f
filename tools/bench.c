/* tools/bench.c — `mixshow bench`: the FMA peak of this machine, then GEMM, conv and attention
 * at Stable Diffusion 1.x shapes, each as GFLOP/s and as a share of the peak at the same SIMD
 * level and thread count. Every figure is the median of several timed runs after a warm-up.
 * `--nets` times whole networks instead (SD 1.5 UNet step, VAE decode, CLIP text encoder) with
 * random weights made in memory, and their memory; tools/ref/bench_torch.py times the same
 * cases in PyTorch and prints the same lines. */
#include "mixshow.h"
#include "tools/tools.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

typedef struct { int runs; double peak[2]; int threads[2]; } Bench;

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

/* The kernels a bench case runs: one function per kind, arguments in a small struct. */
typedef struct {
    int kind;                             /* 0 gemm, 1 conv, 2 conv explicit im2col, 3 attention */
    int M, N, K;                          /* gemm */
    int C, Co, H, W;                      /* conv 3x3 stride 1 pad 1, N = 1 */
    int BH, T, Dh;                        /* attention */
    float *a, *b, *c, *d, *e;
} Case;

static void run_case(const Case *c) {
    switch (c->kind) {
    case 0: ms_gemm(0, 1, c->M, c->N, c->K, 1.0f, c->a, c->K, c->b, c->K, 0.0f, c->c, c->N); break;
    case 1: conv2d_forward(c->c, c->a, c->b, c->d, 1, c->C, c->Co, c->H, c->W, 3, 1, 1); break;
    case 2: ms_bench_conv2d_explicit(c->c, c->e, c->a, c->b, 1, c->C, c->Co, c->H, c->W, 3, 1, 1); break;
    case 3: attention_forward(c->c, NULL, c->a, c->b, c->d, 1, c->T, c->T, c->BH, c->Dh, 0, 1.0f / sqrtf((float)c->Dh)); break;
    }
}

static double case_flops(const Case *c) {
    switch (c->kind) {
    case 0: return 2.0 * c->M * c->N * c->K;
    case 1: case 2: return 2.0 * c->Co * c->C * 9.0 * c->H * c->W;
    default: return 4.0 * c->BH * (double)c->T * c->T * c->Dh;   /* q k^T and p v */
    }
}

/* Median seconds of b->runs timed runs after one warm-up, at the current thread count. */
static double time_case(const Bench *b, const Case *c) {
    double t[64];
    int n = b->runs < 64 ? b->runs : 64;
    run_case(c);
    for (int i = 0; i < n; i++) {
        double t0 = ms_time();
        run_case(c);
        t[i] = ms_time() - t0;
    }
    qsort(t, (size_t)n, sizeof t[0], cmp_double);
    return n % 2 ? t[n / 2] : 0.5 * (t[n / 2 - 1] + t[n / 2]);
}

static void report(const Bench *b, const Case *c, const char *label) {
    for (int ti = 0; ti < 2; ti++) {
        if (ti == 1 && b->threads[1] == b->threads[0]) break;
        ms_set_threads(b->threads[ti]);
        double s = time_case(b, c), gf = case_flops(c) / s * 1e-9;
        printf("%s threads=%d: %.1f GFLOP/s = %.1f%% of peak\n", label, b->threads[ti], gf, 100.0 * gf / b->peak[ti]);
        fflush(stdout);
    }
    ms_set_threads(0);
}

static float *bench_buf(MsRng *r, size_t n) {
    float *x = (float *)ms_alloc_aligned(n, sizeof(float));
    if (!x) { fprintf(stderr, "mixshow bench: out of memory (%zu floats)\n", n); exit(1); }
    ms_rng_fill_normal(r, x, n, 0.0f, 1.0f);
    return x;
}

static void bench_kernels(Bench *b) {
    MsSimd level = ms_simd();
    double secs = b->runs > 3 ? 0.3 : 0.1;
    printf("mixshow bench: kernels %s (detected %s), threads 1 and %d, median of %d runs\n",
           ms_simd_name(level), ms_simd_name(ms_simd_detected()), b->threads[1], b->runs);
    for (int l = MS_SIMD_SCALAR; l <= (int)MS_SIMD_AVX512; l++) {
        ms_set_simd((MsSimd)l);
        if (ms_simd() != (MsSimd)l) continue;
        for (int ti = 0; ti < 2; ti++) {
            if (ti == 1 && b->threads[1] == b->threads[0]) break;
            double p = ms_bench_fma_peak((MsSimd)l, b->threads[ti], secs);
            printf("peak %-8s threads=%d: %.1f GFLOP/s\n", ms_simd_name((MsSimd)l), b->threads[ti], p);
            if ((MsSimd)l == level) b->peak[ti] = p;
        }
    }
    ms_set_simd(level);
    if (b->threads[1] == b->threads[0]) b->peak[1] = b->peak[0];
    fflush(stdout);

    MsRng r;
    ms_rng_seed(&r, 1);
    static const int gemms[][3] = { { 4096, 320, 320 }, { 4096, 320, 1280 }, { 1024, 640, 640 },
                                    { 77, 768, 768 }, { 4096, 1280, 320 } };
    for (size_t i = 0; i < sizeof gemms / sizeof gemms[0]; i++) {
        Case c;
        memset(&c, 0, sizeof c);
        c.M = gemms[i][0]; c.K = gemms[i][1]; c.N = gemms[i][2];
        c.a = bench_buf(&r, (size_t)c.M * c.K); c.b = bench_buf(&r, (size_t)c.N * c.K); c.c = bench_buf(&r, (size_t)c.M * c.N);
        char label[96];
        snprintf(label, sizeof label, "gemm M=%d K=%d N=%d", c.M, c.K, c.N);
        report(b, &c, label);
        ms_free_aligned(c.a); ms_free_aligned(c.b); ms_free_aligned(c.c);
    }
    static const int convs[][3] = { { 64, 320, 320 }, { 32, 640, 640 } };
    for (size_t i = 0; i < sizeof convs / sizeof convs[0]; i++) {
        Case c;
        memset(&c, 0, sizeof c);
        c.kind = 1; c.H = c.W = convs[i][0]; c.C = convs[i][1]; c.Co = convs[i][2];
        size_t P = (size_t)c.H * c.W;
        c.a = bench_buf(&r, (size_t)c.C * P); c.b = bench_buf(&r, (size_t)c.Co * c.C * 9);
        c.d = bench_buf(&r, (size_t)c.Co); c.c = bench_buf(&r, (size_t)c.Co * P);
        char label[96];
        snprintf(label, sizeof label, "conv3x3 %dx%dx%d->%d", c.H, c.W, c.C, c.Co);
        report(b, &c, label);
        c.e = (float *)ms_alloc_aligned((size_t)c.C * 9 * P, sizeof(float));
        if (c.e) {                          /* the explicit column matrix, for comparison */
            c.kind = 2;
            snprintf(label, sizeof label, "conv3x3 %dx%dx%d->%d explicit-im2col", c.H, c.W, c.C, c.Co);
            report(b, &c, label);
            ms_free_aligned(c.e);
        }
        ms_free_aligned(c.a); ms_free_aligned(c.b); ms_free_aligned(c.c); ms_free_aligned(c.d);
    }
    {
        Case c;
        memset(&c, 0, sizeof c);
        c.kind = 3; c.BH = 8; c.T = 4096; c.Dh = 40;
        size_t n = (size_t)c.T * c.BH * c.Dh;
        c.a = bench_buf(&r, n); c.b = bench_buf(&r, n); c.d = bench_buf(&r, n); c.c = bench_buf(&r, n);
        report(b, &c, "attention B*H=8 T=4096 Dh=40");
        ms_free_aligned(c.a); ms_free_aligned(c.b); ms_free_aligned(c.c); ms_free_aligned(c.d);
    }
    ms_gemm_scratch_free();
}

/* ------------------------------------------------------------------------------------------ */
/* Networks (--nets): SD 1.5 shapes, random weights made in memory (nothing is downloaded)    */
/* ------------------------------------------------------------------------------------------ */
/* Every tensor of rank >= 2 is drawn from U(-a, a) with a = sqrt(3 / fan_in) (variance
 * 1/fan_in, fan_in = numel / shape[0]: in-features x kernel area); 1-D ".weight" tensors (the
 * GroupNorm/LayerNorm scales) are 1 and 1-D biases 0. Activations then stay O(1) through every
 * layer, so the timings run on ordinary finite numbers, as with real weights (the speed of the
 * kernels does not depend on the values, only NaN/Inf/subnormal paths would). */
static void fill_params(MsParamTable *t, uint64_t seed) {
    MsRng r;
    ms_rng_seed(&r, seed);
    for (int i = 0; i < t->n; i++) {
        MsParam *p = &t->p[i];
        if (!p->f32) continue;                          /* buffers hold no data */
        if (p->ndim >= 2) {
            double fan_in = (double)p->numel / (double)p->shape[0], a = sqrt(3.0 / fan_in);
            ms_rng_fill_uniform(&r, p->f32, p->numel, (float)-a, (float)a);
        } else {
            const char *dot = strrchr(p->name, '.');
            float v = dot && !strcmp(dot, ".weight") ? 1.0f : 0.0f;
            for (size_t k = 0; k < p->numel; k++) p->f32[k] = v;
        }
    }
}

/* Linux only, through plain files (no POSIX header needed; elsewhere fopen fails and the figure
 * is skipped): "5" into /proc/self/clear_refs resets the peak resident set size (Linux >= 4.0),
 * VmHWM in /proc/self/status is that peak, /proc/loadavg the 1-minute load average. */
static void rss_peak_reset(void) {
    FILE *f = fopen("/proc/self/clear_refs", "w");
    if (f) { fputs("5", f); fclose(f); }
}
static double rss_peak_mib(void) {                      /* < 0: not available */
    char line[256];
    double kb = -1.0;
    FILE *f = fopen("/proc/self/status", "r");
    if (!f) return -1.0;
    while (fgets(line, sizeof line, f))
        if (!strncmp(line, "VmHWM:", 6)) { kb = strtod(line + 6, NULL); break; }
    fclose(f);
    return kb < 0 ? -1.0 : kb / 1024.0;
}
static double load_avg1(void) {                         /* < 0: not available */
    double l = -1.0;
    FILE *f = fopen("/proc/loadavg", "r");
    if (f) { if (fscanf(f, "%lf", &l) != 1) l = -1.0; fclose(f); }
    return l;
}

#define MIB(x) ((double)(x) / (1024.0 * 1024.0))

/* One network case: run() does one timed unit (a UNet step, a decode, ...). */
typedef struct {
    const char *label;                  /* "unet sd15 B=2 64x64" */
    const char *unit;                   /* "s/step", "s" */
    MsStatus (*run)(void *ctx);
    void *ctx;
} NetCase;

/* Median of `runs` timed calls at each thread count (no separate warm-up: the first call also
 * touches the fresh arenas, and the median drops it once runs >= 3), wall time and, beside it,
 * the median process CPU time (clock(): all threads), which other work on a shared machine
 * disturbs less. The 1-minute load average when the case started. Progress on stderr. */
static int net_report(const Bench *b, const NetCase *nc) {
    for (int ti = 0; ti < 2; ti++) {
        if (ti == 1 && b->threads[1] == b->threads[0]) break;
        double t[64], cpu[64], load = load_avg1();
        int n = b->runs < 64 ? b->runs : 64;
        ms_set_threads(b->threads[ti]);
        for (int i = 0; i < n; i++) {
            double t0 = ms_time();
            clock_t c0 = clock();
            MsStatus s = nc->run(nc->ctx);
            t[i] = ms_time() - t0;
            cpu[i] = (double)(clock() - c0) / CLOCKS_PER_SEC;
            if (s) { fprintf(stderr, "mixshow bench: %s: %s\n", nc->label, ms_last_error()); ms_set_threads(0); return 1; }
            fprintf(stderr, "  %s threads=%d run %d/%d: %.3f s (cpu %.3f s)\n", nc->label, b->threads[ti], i + 1, n, t[i], cpu[i]);
        }
        qsort(t, (size_t)n, sizeof t[0], cmp_double);
        qsort(cpu, (size_t)n, sizeof cpu[0], cmp_double);
        double med = n % 2 ? t[n / 2] : 0.5 * (t[n / 2 - 1] + t[n / 2]);
        double cmed = n % 2 ? cpu[n / 2] : 0.5 * (cpu[n / 2 - 1] + cpu[n / 2]);
        printf("%s threads=%d: %.3f %s  (%d runs %.3f..%.3f, cpu %.3f s", nc->label, b->threads[ti], med, nc->unit, n,
               t[0], t[n - 1], cmed);
        if (load >= 0) printf(", load %.2f", load);
        printf(")\n");
        fflush(stdout);
    }
    ms_set_threads(0);
    return 0;
}

/* "<label> memory: weights W + acts A + scratch S + io I = P MiB planned, peak RSS R MiB" */
static void net_memory(const char *label, size_t weights, size_t acts, size_t scratch, size_t io) {
    double rss = rss_peak_mib();
    printf("%s memory: weights %.1f + acts %.1f + scratch %.1f + io %.1f = %.1f MiB planned", label,
           MIB(weights), MIB(acts), MIB(scratch), MIB(io), MIB(weights) + MIB(acts) + MIB(scratch) + MIB(io));
    if (rss >= 0) printf(", peak RSS %.1f MiB", rss);
    printf("\n");
    fflush(stdout);
}

/* Finite outputs, or the weights were wrong for the timing to mean anything. */
static int check_finite(const char *label, const float *x, size_t n) {
    double s = 0.0;
    for (size_t i = 0; i < n; i++) {
        if (!(x[i] - x[i] == 0.0f)) { fprintf(stderr, "mixshow bench: %s: non-finite output at %zu\n", label, i); return 0; }
        s += fabs(x[i]);
    }
    fprintf(stderr, "  %s: output finite, mean |y| %.4g\n", label, s / (double)n);
    return 1;
}

static float *net_buf(MsRng *r, size_t n, float std) {  /* N(0, std^2), or zeros for std 0 */
    float *x = (float *)ms_alloc_aligned(n ? n : 1, sizeof(float));
    if (!x) { fprintf(stderr, "mixshow bench: out of memory (%zu floats)\n", n); return NULL; }
    if (std > 0) ms_rng_fill_normal(r, x, n, 0.0f, std);
    else memset(x, 0, n * sizeof(float));
    return x;
}

static MsStatus table_random(MsParamTable *t, uint64_t seed) {
    MsStatus s = ms_param_table_alloc(t, NULL);
    if (s == MS_OK) fill_params(t, seed);
    return s;
}

/* --- UNet: one denoising step = one unet_forward, inference mode, B = 2 (the CFG batch) --- */
typedef struct {
    UNetActs a;
    const UNetParams *p;
    float *eps, *x, *t, *ctx;
} UNetCtx;
static MsStatus run_unet(void *v) {
    UNetCtx *u = (UNetCtx *)v;
    return unet_forward(u->eps, &u->a, u->x, u->t, u->ctx, NULL, NULL, u->p, NULL);
}

static int bench_unet(const Bench *b, MsRng *r) {
    const int N = 2, h = 64, w = 64, Tk = 77;
    const char *label = "unet sd15 B=2 64x64";
    UNetConfig c;
    MsParamTable t;
    UNetParams p;
    UNetSizes sz;
    UNetCtx u;
    Arena acts, scratch;
    int ok = 0;
    memset(&t, 0, sizeof t); memset(&p, 0, sizeof p); memset(&u, 0, sizeof u);
    memset(&acts, 0, sizeof acts); memset(&scratch, 0, sizeof scratch);
    ms_unet_config_sd15(&c);
    fprintf(stderr, "%s: random weights...\n", label);
    if (ms_param_table_unet(&c, &t) || table_random(&t, 15) || unet_params_init(&p, &c, &t) ||
        unet_sizes(&c, N, h, w, Tk, 0, &sz) || arena_init(&acts, sz.acts_bytes) ||
        arena_init(&scratch, sz.scratch_bytes) || unet_acts_init(&u.a, &c, N, h, w, Tk, 0, &acts, &scratch)) {
        fprintf(stderr, "mixshow bench: %s: %s\n", label, ms_last_error());
        goto done;
    }
    const size_t nx = (size_t)N * c.in_channels * h * w, ne = (size_t)N * c.out_channels * h * w;
    const size_t nc = (size_t)N * Tk * c.cross_attention_dim;
    u.p = &p;
    if (!(u.x = net_buf(r, nx, 1.0f)) || !(u.eps = net_buf(r, ne, 0.0f)) || !(u.ctx = net_buf(r, nc, 1.0f)) ||
        !(u.t = net_buf(r, (size_t)N, 0.0f)))
        goto done;
    u.t[0] = 999.0f; u.t[1] = 999.0f;                   /* the first step of a sampler */
    NetCase nc_ = { label, "s/step", run_unet, &u };
    if (net_report(b, &nc_) || !check_finite(label, u.eps, ne)) goto done;
    net_memory(label, t.mem_bytes, sz.acts_bytes, sz.scratch_bytes, (nx + ne + nc + N) * sizeof(float));
    ok = 1;
done:
    ms_free_aligned(u.x); ms_free_aligned(u.eps); ms_free_aligned(u.ctx); ms_free_aligned(u.t);
    unet_acts_free(&u.a);
    arena_free(&acts); arena_free(&scratch);
    unet_params_free(&p);
    ms_param_table_free(&t);
    return ok;
}

/* --- VAE: decode one 64x64 latent to a 512x512 image --- */
typedef struct {
    const VaeParams *p;
    Arena *scratch;
    float *img, *lat;
} VaeCtx;
static MsStatus run_vae(void *v) {
    VaeCtx *u = (VaeCtx *)v;
    return vae_decode(u->p, u->scratch, u->img, u->lat, 1, 64, 64);
}

static int bench_vae(const Bench *b, MsRng *r) {
    const char *label = "vae-decode sd15 512x512";
    VaeConfig c;
    MsParamTable t;
    VaeSizes sz;
    VaeCtx u;
    Arena scratch;
    VaeParams *p = (VaeParams *)malloc(sizeof *p);
    int ok = 0;
    memset(&t, 0, sizeof t); memset(&u, 0, sizeof u); memset(&scratch, 0, sizeof scratch);
    ms_vae_config_sd15(&c);
    fprintf(stderr, "%s: random weights...\n", label);
    if (!p) { fprintf(stderr, "mixshow bench: out of memory\n"); return 0; }
    if (ms_param_table_vae(&c, &t) || table_random(&t, 16) || vae_params_init(p, &c, &t) ||
        vae_sizes(&c, 512, 512, -1, &sz) || arena_init(&scratch, sz.decode_bytes)) {
        fprintf(stderr, "mixshow bench: %s: %s\n", label, ms_last_error());
        goto done;
    }
    const size_t nl = (size_t)c.latent_channels * 64 * 64, ni = (size_t)c.out_channels * 512 * 512;
    u.p = p; u.scratch = &scratch;
    if (!(u.lat = net_buf(r, nl, 1.0f)) || !(u.img = net_buf(r, ni, 0.0f))) goto done;
    NetCase nc_ = { label, "s", run_vae, &u };
    if (net_report(b, &nc_) || !check_finite(label, u.img, ni)) goto done;
    /* the table holds the encoder too (all of AutoencoderKL); the decode reads only the decoder */
    net_memory(label, t.mem_bytes, 0, sz.decode_bytes, (nl + ni) * sizeof(float));
    ok = 1;
done:
    ms_free_aligned(u.lat); ms_free_aligned(u.img);
    arena_free(&scratch);
    ms_param_table_free(&t);
    free(p);
    return ok;
}

/* --- CLIP text encoder on [16, 77] ids: the 16 layer-wise prompts of one ED-LoRA concept.
 * Forward (inference), then forward + backward as in ED-LoRA training: LoRA rank 4 (alpha 1) on
 * q/k/v/out of every layer and 2 new token rows, gradients to both (the base is frozen). --- */
typedef struct {
    ClipTextActs a;
    const ClipTextParams *p;
    const ClipTextConfig *c;
    const ClipLora *lora;
    ClipLora *dlora;
    float *dlora_mem, *new_emb, *dnew, *dout;
    size_t n_lora;
    int32_t *ids;
    int n_new, backward;
} ClipCtx;
static MsStatus run_clip(void *v) {
    ClipCtx *u = (ClipCtx *)v;
    MsStatus s = clip_text_forward(&u->a, u->p, u->lora, u->ids, u->new_emb, u->n_new, u->c);
    if (s || !u->backward) return s;
    memset(u->dlora_mem, 0, u->n_lora * sizeof(float));     /* backward accumulates */
    memset(u->dnew, 0, (size_t)u->n_new * u->c->hidden_size * sizeof(float));
    clip_text_backward(u->dlora, u->dnew, u->dout, &u->a, u->p, u->lora, u->ids, u->n_new, u->c);
    return MS_OK;
}

static int bench_text(const Bench *b, MsRng *r) {
    const int B = 16, T = 77, rank = 4, n_new = 2;
    ClipTextConfig c;
    MsParamTable t;
    ClipTextParams *p = (ClipTextParams *)malloc(sizeof *p);
    ClipLora lora, dlora;
    ClipCtx u;
    Arena ar;
    float *lora_mem = NULL;
    int ok = 0;
    memset(&t, 0, sizeof t); memset(&u, 0, sizeof u); memset(&ar, 0, sizeof ar);
    ms_clip_text_config_sd15(&c);
    fprintf(stderr, "text-encoder sd15: random weights...\n");
    if (!p) { fprintf(stderr, "mixshow bench: out of memory\n"); return 0; }
    if (ms_param_table_text(&c, &t) || table_random(&t, 17) || clip_text_params(p, &t, &c)) {
        fprintf(stderr, "mixshow bench: text encoder: %s\n", ms_last_error());
        goto done;
    }
    const size_t N = (size_t)B * T, D = (size_t)c.hidden_size, nl = clip_lora_numel(&c, rank);
    if (!(u.ids = (int32_t *)malloc(N * sizeof(int32_t))) || !(lora_mem = net_buf(r, nl, 0.02f)) ||
        !(u.dlora_mem = net_buf(r, nl, 0.0f)) || !(u.new_emb = net_buf(r, (size_t)n_new * D, 0.02f)) ||
        !(u.dnew = net_buf(r, (size_t)n_new * D, 0.0f)) || !(u.dout = net_buf(r, N * D, 1.0f)))
        goto done;
    /* "<bos> a photo of <new_i> <new_j> ... <eos> <pad>...": random words, then EOS padding */
    for (int i = 0; i < B; i++)
        for (int j = 0; j < T; j++) {
            int32_t id = j == 0 ? 49406 : j < 12 ? (int32_t)(ms_rng_u64(r) % 49406u) : 49407;
            if (j == 4) id = c.vocab_size;
            if (j == 5) id = c.vocab_size + 1;
            u.ids[(size_t)i * T + j] = id;
        }
    clip_lora_bind(&lora, lora_mem, &c, rank, 1.0f);
    clip_lora_bind(&dlora, u.dlora_mem, &c, rank, 1.0f);
    u.p = p; u.c = &c; u.n_lora = nl; u.dlora = &dlora; u.n_new = n_new;
    for (int pass = 0; pass < 2; pass++) {
        const char *label = pass ? "text-encoder sd15 [16,77] forward+backward" : "text-encoder sd15 [16,77] forward";
        size_t bytes = clip_text_sizes(&c, B, T, pass ? rank : 0, pass);
        rss_peak_reset();
        if (arena_init(&ar, bytes) || clip_text_acts_alloc(&u.a, &ar, &c, B, T, pass ? rank : 0, pass)) {
            fprintf(stderr, "mixshow bench: %s: %s\n", label, ms_last_error());
            goto done;
        }
        u.backward = pass;
        u.lora = pass ? &lora : NULL;
        NetCase nc_ = { label, "s", run_clip, &u };
        if (net_report(b, &nc_) || !check_finite(label, u.a.out, N * D) ||
            (pass && !check_finite("d new embeddings", u.dnew, (size_t)n_new * D)))
            goto done;
        net_memory(label, t.mem_bytes, bytes, 0,
                   (pass ? 2 * nl + 2 * (size_t)n_new * D + N * D : 0) * sizeof(float) + N * sizeof(int32_t));
        arena_free(&ar);
    }
    ok = 1;
done:
    arena_free(&ar);
    free(u.ids);
    ms_free_aligned(lora_mem); ms_free_aligned(u.dlora_mem); ms_free_aligned(u.new_emb);
    ms_free_aligned(u.dnew); ms_free_aligned(u.dout);
    ms_param_table_free(&t);
    free(p);
    return ok;
}

enum { NET_TEXT = 1, NET_VAE = 2, NET_UNET = 4, NET_ALL = 7 };

/* Smallest first, so each case's peak RSS is its own (the reset cannot go below what is live). */
static int bench_nets(const Bench *b, int which) {
    MsRng r;
    int ok = 1;
    ms_rng_seed(&r, 2305);
    printf("mixshow bench: networks, SD 1.5 shapes, random weights, threads 1 and %d, median of %d runs\n",
           b->threads[1], b->runs);
    fflush(stdout);
    const int order[3] = { NET_TEXT, NET_VAE, NET_UNET };
    for (int i = 0; i < 3; i++) {
        if (!(which & order[i])) continue;
        ms_gemm_scratch_free();
        ops_scratch_free();
        rss_peak_reset();
        ok &= order[i] == NET_TEXT ? bench_text(b, &r) : order[i] == NET_VAE ? bench_vae(b, &r) : bench_unet(b, &r);
    }
    ms_gemm_scratch_free();
    ops_scratch_free();
    return ok;
}

static void usage(FILE *f) {
    fprintf(f, "usage: mixshow bench [--quick] [--runs K] [--nets[=unet,vae,text] | --all] [--compare-blas]\n\n"
               "Measures the FMA peak of this machine (register-only loop, per SIMD level, 1 thread\n"
               "and all threads), then prints one line per case and thread count:\n"
               "  gemm M=4096 K=320 N=320 threads=1: 183.2 GFLOP/s = 84.1%% of peak\n"
               "GEMM cases are C = A B^T (the layout of linear_forward); conv3x3 is stride 1, pad 1,\n"
               "batch 1; attention is self-attention over B*H heads. Each figure is the median of\n"
               "%d timed runs after one warm-up; the peak is that of the SIMD level in use.\n\n"
               "--nets times whole SD 1.5 networks with random weights made in memory (slow: minutes):\n"
               "  text-encoder sd15 [16,77] forward / forward+backward (ED-LoRA: rank-4 LoRA, 2 new tokens)\n"
               "  vae-decode sd15 512x512 (one 64x64 latent)\n"
               "  unet sd15 B=2 64x64 threads=1: 27.588 s/step  (3 runs 27.1..28.5, cpu 27.5 s, load 1.10)\n"
               "    (one classifier-free-guidance step, inference: wall time, min..max, process CPU\n"
               "    time, 1-minute load average at the start), then a memory line: planned weight and\n"
               "arena bytes, and the peak resident set size (Linux /proc; omitted elsewhere).\n"
               "Median of 3 runs unless --runs is given.\n"
               "tools/ref/bench_torch.py prints the same lines for PyTorch.\n\n"
               "  --quick         3 runs per kernel case (smoke test)\n"
               "  --runs K        K timed runs per case (kernels: after a warm-up)\n"
               "  --nets          the network cases only; --nets=unet,vae,text picks some\n"
               "  --all           kernels, then networks\n"
               "  --compare-blas  not available: it would need dlopen, which mixshow does not use\n"
               "  --help          this text\n\n"
               "OMP_NUM_THREADS sets 'all threads'; timings are noisy while other work shares the cores.\n", 7);
}

int cmd_bench(int argc, char **argv) {
    Bench b;
    int runs = 0, kernels = 1, nets = 0;
    b.runs = 7;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--help") || !strcmp(argv[i], "-h")) { usage(stdout); return 0; }
        else if (!strcmp(argv[i], "--quick")) b.runs = 3;
        else if (!strcmp(argv[i], "--all")) { kernels = 1; nets = NET_ALL; }
        else if (!strcmp(argv[i], "--nets")) { kernels = 0; nets = NET_ALL; }
        else if (!strncmp(argv[i], "--nets=", 7)) {
            const char *s = argv[i] + 7;
            kernels = 0; nets = 0;
            while (*s) {
                size_t n = strcspn(s, ",");
                if (n == 4 && !strncmp(s, "unet", 4)) nets |= NET_UNET;
                else if (n == 3 && !strncmp(s, "vae", 3)) nets |= NET_VAE;
                else if (n == 4 && !strncmp(s, "text", 4)) nets |= NET_TEXT;
                else { fprintf(stderr, "mixshow bench: --nets: unknown network '%.*s' (unet, vae, text)\n", (int)n, s); return 2; }
                s += n + (s[n] == ',');
            }
        } else if (!strcmp(argv[i], "--runs")) {
            if (i + 1 == argc) { fprintf(stderr, "mixshow bench: --runs wants a number (1..64)\n"); return 2; }
            const char *s = argv[++i];
            int k = 0;
            while (*s >= '0' && *s <= '9' && k <= 64) k = 10 * k + (*s++ - '0');
            if (*s || k < 1 || k > 64) { fprintf(stderr, "mixshow bench: --runs wants 1..64, got '%s'\n", argv[i]); return 2; }
            runs = k;
        } else if (!strcmp(argv[i], "--compare-blas")) {
            fprintf(stderr, "mixshow bench: --compare-blas is not available (it would need dlopen; mixshow "
                            "depends on libc, libm and OpenMP only)\n");
            return 2;
        } else { fprintf(stderr, "mixshow bench: unknown option '%s'\n\n", argv[i]); usage(stderr); return 2; }
    }
    b.threads[0] = 1;
    b.threads[1] = ms_get_threads();
    if (kernels) {
        if (runs) b.runs = runs;
        bench_kernels(&b);
    }
    if (nets) {
        b.runs = runs ? runs : 3;
        if (!bench_nets(&b, nets)) return 1;
    }
    return 0;
}
