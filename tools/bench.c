/* tools/bench.c — `mixshow bench`: the FMA peak of this machine, then GEMM, conv and attention
 * at Stable Diffusion 1.x shapes, each as GFLOP/s and as a share of the peak at the same SIMD
 * level and thread count. Every figure is the median of several timed runs after a warm-up.
 * `--nets` times whole networks instead (SD 1.5 UNet step, VAE decode, CLIP text encoder) with
 * random weights made in memory, and their memory; tools/ref/bench_torch.py times the same
 * cases in PyTorch and prints the same lines. */
#if !defined(_WIN32) && !defined(_POSIX_C_SOURCE)
#define _POSIX_C_SOURCE 200809L   /* fork, kill, waitpid: the busy process of --under-load */
#endif
#include "mixshow.h"
#include "tools/tools.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#if defined(__unix__) || defined(__APPLE__)
#include <signal.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>
#define MS_BENCH_FORK 1
#endif

typedef struct { int runs; double peak[2]; int threads[2]; int attention_only, gemm_only, split; } Bench;

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

/* The kernels a bench case runs: one function per kind, arguments in a small struct. */
typedef struct {
    int kind;                             /* 0 gemm, 1 conv, 2 conv explicit im2col, 3 attention,
                                             4 attention backward */
    int M, N, K;                          /* gemm */
    int C, Co, H, W;                      /* conv 3x3 stride 1 pad 1, N = 1 */
    int BH, T, Tk, Dh;                    /* attention: BH heads, T queries, Tk keys */
    float *a, *b, *c, *d, *e;
    float *lse, *dout, *dq, *dk, *dv;     /* attention backward */
} Case;

static void run_case(const Case *c) {
    switch (c->kind) {
    case 0: ms_gemm(0, 1, c->M, c->N, c->K, 1.0f, c->a, c->K, c->b, c->K, 0.0f, c->c, c->N); break;
    case 1: conv2d_forward(c->c, c->a, c->b, c->d, 1, c->C, c->Co, c->H, c->W, 3, 1, 1); break;
    case 2: ms_bench_conv2d_explicit(c->c, c->e, c->a, c->b, 1, c->C, c->Co, c->H, c->W, 3, 1, 1); break;
    case 3: attention_forward(c->c, NULL, c->a, c->b, c->d, 1, c->T, c->Tk, c->BH, c->Dh, 0, 1.0f / sqrtf((float)c->Dh)); break;
    case 4: attention_backward(c->dq, c->dk, c->dv, c->dout, c->a, c->b, c->d, c->c, c->lse, 1, c->T, c->Tk, c->BH,
                               c->Dh, 0, 1.0f / sqrtf((float)c->Dh)); break;
    }
}

static double case_flops(const Case *c) {
    switch (c->kind) {
    case 0: return 2.0 * c->M * c->N * c->K;
    case 1: case 2: return 2.0 * c->Co * c->C * 9.0 * c->H * c->W;
    case 3: return 4.0 * c->BH * (double)c->T * c->Tk * c->Dh;   /* q k^T and p v */
    default: return 10.0 * c->BH * (double)c->T * c->Tk * c->Dh;  /* q k^T again, dV, dP, dQ, dK */
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

/* Median seconds of b->runs calls of fn(ctx) after one warm-up, at the SIMD level given. */
static double time_fn(const Bench *b, MsSimd level, void (*fn)(void *), void *ctx) {
    double t[64];
    int n = b->runs < 64 ? b->runs : 64;
    MsSimd keep = ms_simd();
    ms_set_simd(level);
    fn(ctx);
    for (int i = 0; i < n; i++) {
        double t0 = ms_time();
        fn(ctx);
        t[i] = ms_time() - t0;
    }
    ms_set_simd(keep);
    qsort(t, (size_t)n, sizeof t[0], cmp_double);
    return n % 2 ? t[n / 2] : 0.5 * (t[n / 2 - 1] + t[n / 2]);
}

typedef struct { MsTorchRng g; float *x; size_t n; uint16_t *h; } RandnCase;
static void run_randn(void *v) {
    RandnCase *c = (RandnCase *)v;
    ms_torch_randn(&c->g, c->x, c->n, MS_TORCH_CPU_AVX2);
}
static void run_f16(void *v) {
    RandnCase *c = (RandnCase *)v;
    ms_f16_to_f32_vec(c->x, c->h, c->n);
}

/* torch.randn of SD 1.5's initial latents (1x4x64x64, torch's AVX2 kernel, as `sample` draws
 * them) and the f16 -> f32 staging of the largest SD 1.5 UNet weight (1280x2560x3x3), one
 * thread, each at the kernel level in use and at the scalar level (the _ref definitions, the
 * previous code), same run:
 *   "randn 1x4x64x64 <level>: X ns/value (scalar Y ns/value: Z x)"
 *   "f16-staging 29491200 <level>: X GB/s of f32 written, X ns/value (scalar ...: Z x)" */
static void bench_randn_f16(const Bench *b, MsSimd level) {
    RandnCase c;
    memset(&c, 0, sizeof c);
    ms_set_threads(1);
    c.n = 4 * 64 * 64;
    if ((c.x = (float *)ms_alloc_aligned(c.n, sizeof(float))) != NULL) {
        ms_torch_seed(&c.g, 0);
        double tf = time_fn(b, level, run_randn, &c), ts = time_fn(b, MS_SIMD_SCALAR, run_randn, &c);
        printf("randn 1x4x64x64 %s: %.2f ns/value (scalar %.2f ns/value: %.1fx)\n", ms_simd_name(level),
               tf / (double)c.n * 1e9, ts / (double)c.n * 1e9, ts / tf);
        ms_free_aligned(c.x);
    }
    c.n = (size_t)1280 * 2560 * 9;
    c.x = (float *)ms_alloc_aligned(c.n, sizeof(float));
    c.h = (uint16_t *)ms_alloc_aligned(c.n, sizeof(uint16_t));
    if (c.x && c.h) {
        MsRng r;
        ms_rng_seed(&r, 3);
        for (size_t i = 0; i < c.n; i++) c.h[i] = (uint16_t)(0x2000u + (ms_rng_u64(&r) % 0x3000u) + (i & 1) * 0x8000u);
        double tf = time_fn(b, level, run_f16, &c), ts = time_fn(b, MS_SIMD_SCALAR, run_f16, &c);
        printf("f16-staging %zu %s: %.1f GB/s of f32 written, %.3f ns/value (scalar %.3f ns/value: %.1fx)\n", c.n,
               ms_simd_name(level), (double)c.n * 4.0 / tf * 1e-9, tf / (double)c.n * 1e9, ts / (double)c.n * 1e9, ts / tf);
    }
    ms_free_aligned(c.x);
    ms_free_aligned(c.h);
    ms_set_threads(0);
    fflush(stdout);
}

/* "peak <level> threads=N: X GFLOP/s" for every SIMD level and both thread counts; b->peak
 * gets those of the level in use. */
static void bench_peaks(Bench *b) {
    MsSimd level = ms_simd();
    double secs = b->runs > 3 ? 0.3 : 0.1;
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
}

static void bench_kernels(Bench *b) {
    MsSimd level = ms_simd();
    printf("mixshow bench: kernels %s (detected %s), threads 1 and %d, median of %d runs\n",
           ms_simd_name(level), ms_simd_name(ms_simd_detected()), b->threads[1], b->runs);
    bench_peaks(b);

    MsRng r;
    ms_rng_seed(&r, 1);
    if (!b->attention_only && !b->gemm_only) bench_randn_f16(b, level);
    static const int gemms[][3] = { { 4096, 320, 320 }, { 4096, 320, 1280 }, { 1024, 640, 640 },
                                    { 77, 768, 768 }, { 77, 768, 3072 }, { 77, 1024, 320 }, { 4096, 1280, 320 } };
    for (size_t i = 0; i < sizeof gemms / sizeof gemms[0] && !b->attention_only; i++) {
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
    for (size_t i = 0; i < sizeof convs / sizeof convs[0] && !b->attention_only; i++) {
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
    /* SD 1.5 attention at 64x64 latents: self (T = Tk = 4096) and cross (Tk = 77), B*H = 16 (a CFG
     * batch of 2 x 8 heads), Dh = 40; then the UNet's two lower levels (32x32: Dh = 80, 16x16:
     * Dh = 160); forward, then backward (dq, dk, dv; FLOPs of its 5 products) */
    static const int atts[][3] = { { 4096, 4096, 40 }, { 4096, 77, 40 }, { 1024, 1024, 80 }, { 1024, 77, 80 },
                                   { 256, 256, 160 }, { 256, 77, 160 } };
    for (size_t i = 0; i < sizeof atts / sizeof atts[0] && !b->gemm_only; i++) {
        Case c;
        memset(&c, 0, sizeof c);
        c.kind = 3; c.BH = 16; c.T = atts[i][0]; c.Tk = atts[i][1]; c.Dh = atts[i][2];
        size_t nq = (size_t)c.T * c.BH * c.Dh, nk = (size_t)c.Tk * c.BH * c.Dh;
        c.a = bench_buf(&r, nq); c.b = bench_buf(&r, nk); c.d = bench_buf(&r, nk); c.c = bench_buf(&r, nq);
        c.lse = bench_buf(&r, (size_t)c.BH * c.T); c.dout = bench_buf(&r, nq);
        c.dq = bench_buf(&r, nq); c.dk = bench_buf(&r, nk); c.dv = bench_buf(&r, nk);
        char label[96];
        if (c.Tk == c.T) snprintf(label, sizeof label, "attention B*H=%d T=%d Dh=%d", c.BH, c.T, c.Dh);
        else snprintf(label, sizeof label, "attention B*H=%d T=%dx%d Dh=%d", c.BH, c.T, c.Tk, c.Dh);
        report(b, &c, label);
        attention_forward(c.c, c.lse, c.a, c.b, c.d, 1, c.T, c.Tk, c.BH, c.Dh, 0, 1.0f / sqrtf((float)c.Dh));
        c.kind = 4;
        if (c.Tk == c.T) snprintf(label, sizeof label, "attention-backward B*H=%d T=%d Dh=%d", c.BH, c.T, c.Dh);
        else snprintf(label, sizeof label, "attention-backward B*H=%d T=%dx%d Dh=%d", c.BH, c.T, c.Tk, c.Dh);
        report(b, &c, label);
        ms_free_aligned(c.a); ms_free_aligned(c.b); ms_free_aligned(c.c); ms_free_aligned(c.d);
        ms_free_aligned(c.lse); ms_free_aligned(c.dout); ms_free_aligned(c.dq); ms_free_aligned(c.dk); ms_free_aligned(c.dv);
    }
    ops_scratch_free();
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
static void fill_params_rng(MsParamTable *t, MsRng *rp) {
    for (int i = 0; i < t->n; i++) {
        MsParam *p = &t->p[i];
        if (!p->f32) continue;                          /* buffers hold no data */
        if (p->ndim >= 2) {
            double fan_in = (double)p->numel / (double)p->shape[0], a = sqrt(3.0 / fan_in);
            ms_rng_fill_uniform(rp, p->f32, p->numel, (float)-a, (float)a);
        } else {
            const char *dot = strrchr(p->name, '.');
            float v = dot && !strcmp(dot, ".weight") ? 1.0f : 0.0f;
            for (size_t k = 0; k < p->numel; k++) p->f32[k] = v;
        }
    }
}
static void fill_params(MsParamTable *t, uint64_t seed) {
    MsRng r;
    ms_rng_seed(&r, seed);
    fill_params_rng(t, &r);
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

/* Median of `runs` timed calls at each thread count after `warmup` untimed ones (0 for the
 * inference cases: the first call also touches the fresh arenas, and the median drops it once
 * runs >= 3; med_out[thread index] gets the median, med_out[2 + index] that of the CPU time, when
 * not NULL), wall time and, beside it,
 * the median process CPU time (clock(): all threads), which other work on a shared machine
 * disturbs less. The 1-minute load average when the case started. Then the matmul FLOPs of one
 * call (ms_flops_count: GEMMs, convolutions, attention products) and their rate at the median
 * wall time against the peak of the same thread count. Progress on stderr. */
static int net_report(const Bench *b, const NetCase *nc, int warmup, double med_out[4]) {
    for (int ti = 0; ti < 2; ti++) {
        if (ti == 1 && b->threads[1] == b->threads[0]) break;
        double t[64], cpu[64], load = load_avg1();
        int n = b->runs < 64 ? b->runs : 64;
        ms_set_threads(b->threads[ti]);
        for (int i = 0; i < warmup; i++) {              /* untimed: fresh arenas, thread pool */
            double t0 = ms_time();
            MsStatus s = nc->run(nc->ctx);
            if (s) { fprintf(stderr, "mixshow bench: %s: %s\n", nc->label, ms_last_error()); ms_set_threads(0); return 1; }
            fprintf(stderr, "  %s threads=%d warm-up: %.3f s\n", nc->label, b->threads[ti], ms_time() - t0);
        }
        double flops = 0.0;
        ms_flops_enable(1);
        for (int i = 0; i < n; i++) {
            ms_flops_reset();
            double t0 = ms_time();
            clock_t c0 = clock();
            MsStatus s = nc->run(nc->ctx);
            t[i] = ms_time() - t0;
            cpu[i] = (double)(clock() - c0) / CLOCKS_PER_SEC;
            flops = ms_flops_count();
            if (s) {
                fprintf(stderr, "mixshow bench: %s: %s\n", nc->label, ms_last_error());
                ms_flops_enable(0);
                ms_set_threads(0);
                return 1;
            }
            fprintf(stderr, "  %s threads=%d run %d/%d: %.3f s (cpu %.3f s)\n", nc->label, b->threads[ti], i + 1, n, t[i], cpu[i]);
        }
        ms_flops_enable(0);
        qsort(t, (size_t)n, sizeof t[0], cmp_double);
        qsort(cpu, (size_t)n, sizeof cpu[0], cmp_double);
        double med = n % 2 ? t[n / 2] : 0.5 * (t[n / 2 - 1] + t[n / 2]);
        double cmed = n % 2 ? cpu[n / 2] : 0.5 * (cpu[n / 2 - 1] + cpu[n / 2]);
        if (med_out) { med_out[ti] = med; med_out[2 + ti] = cmed; }
        printf("%s threads=%d: %.3f %s  (%d runs %.3f..%.3f, cpu %.3f s", nc->label, b->threads[ti], med, nc->unit, n,
               t[0], t[n - 1], cmed);
        if (load >= 0) printf(", load %.2f", load);
        if (flops > 0) {
            double gf = flops * 1e-9 / med;
            printf(", %.1f GFLOP, %.1f GFLOP/s", flops * 1e-9, gf);
            if (b->peak[ti] > 0) printf(" = %.1f%% of peak", 100.0 * gf / b->peak[ti]);
        }
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

/* IEEE binary16 nearest to f, ties to even (overflow to infinity, NaN kept quiet). */
static uint16_t f32_to_f16(float f) {
    uint32_t x, m, h, rem;
    memcpy(&x, &f, 4);
    uint16_t sign = (uint16_t)((x >> 16) & 0x8000u);
    int e = (int)((x >> 23) & 0xFFu) - 127 + 15;
    m = x & 0x7FFFFFu;
    if (((x >> 23) & 0xFFu) == 0xFFu) return (uint16_t)(sign | 0x7C00u | (m ? 0x200u : 0u));
    if (e >= 31) return (uint16_t)(sign | 0x7C00u);
    if (e <= 0) {                                       /* subnormal half (or zero) */
        if (e < -10) return sign;
        m |= 0x800000u;
        int shift = 14 - e;
        h = m >> shift; rem = m & ((1u << shift) - 1u);
        uint32_t half = 1u << (shift - 1);
        if (rem > half || (rem == half && (h & 1u))) h++;
        return (uint16_t)(sign | h);
    }
    h = ((uint32_t)e << 10) | (m >> 13); rem = m & 0x1FFFu;
    if (rem > 0x1000u || (rem == 0x1000u && (h & 1u))) h++;   /* a carry into the exponent is right */
    return (uint16_t)(sign | h);
}

/* The same random values (fill_params), kept as F16 in the table (MsParam.half), as
 * MsLoadOptions.keep_half keeps a 16-bit checkpoint: 2 bytes per weight, converted when used. */
static MsStatus table_random_f16(MsParamTable *t, uint64_t seed) {
    MsParamTable f;
    MsDtype *dt = (MsDtype *)malloc((size_t)(t->n ? t->n : 1) * sizeof *dt);
    MsStatus s;
    if (!dt) return ms_errorf(MS_ERR_NOMEM, "bench: out of memory");
    for (int i = 0; i < t->n; i++) dt[i] = MS_DT_F16;
    s = ms_param_table_alloc(t, dt);
    free(dt);
    if (s) return s;
    /* one f32 tensor at a time: a table of the same layout whose data pointers are redirected */
    f = *t;
    f.p = (MsParam *)malloc((size_t)(t->n ? t->n : 1) * sizeof *f.p);
    if (!f.p) return ms_errorf(MS_ERR_NOMEM, "bench: out of memory");
    memcpy(f.p, t->p, (size_t)t->n * sizeof *f.p);
    size_t big = 0;
    for (int i = 0; i < t->n; i++) if (t->p[i].half && t->p[i].numel > big) big = t->p[i].numel;
    float *tmp = (float *)malloc((big ? big : 1) * sizeof(float));
    if (!tmp) { free(f.p); return ms_errorf(MS_ERR_NOMEM, "bench: out of memory"); }
    MsRng r;
    ms_rng_seed(&r, seed);
    for (int i = 0; i < t->n; i++) {                    /* fill_params' draws, tensor by tensor */
        MsParam *p = &t->p[i];
        if (!p->half) continue;
        MsParamTable one = f;
        one.p = &f.p[i]; one.n = 1;
        f.p[i].f32 = tmp;
        fill_params_rng(&one, &r);
        for (size_t k = 0; k < p->numel; k++) p->half[k] = f32_to_f16(tmp[k]);
    }
    free(tmp); free(f.p);
    return MS_OK;
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
    u.a.split = b->split;                               /* the CFG batch in parts, one per thread, as sample */
    if (!(u.x = net_buf(r, nx, 1.0f)) || !(u.eps = net_buf(r, ne, 0.0f)) || !(u.ctx = net_buf(r, nc, 1.0f)) ||
        !(u.t = net_buf(r, (size_t)N, 0.0f)))
        goto done;
    u.t[0] = 999.0f; u.t[1] = 999.0f;                   /* the first step of a sampler */
    NetCase nc_ = { label, "s/step", run_unet, &u };
    if (net_report(b, &nc_, 0, NULL) || !check_finite(label, u.eps, ne)) goto done;
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

/* --- Under load (--under-load): the tiny model's CFG UNet step (models/tiny-sd, B = 2 at its
 * sample size, then 4x that) at 1 and all threads, first alone, then while a child process
 * spins on a core for the whole measurement (not pinned: the scheduler places it), the same
 * lines with "s/step (loaded)", and the loaded ratio all threads / 1 thread (target: <= 1,
 * issue 14). --- */
#ifdef MS_BENCH_FORK
static pid_t busy_start(void) {
    fflush(stdout);
    fflush(stderr);
    pid_t pid = fork();
    if (pid == 0) {                                     /* the busy process: spins until killed */
        volatile unsigned long k = 0;
        for (;;) k++;
    }
    return pid;                                         /* < 0: fork failed */
}
static void busy_stop(pid_t pid) {
    if (pid <= 0) return;
    kill(pid, SIGKILL);
    waitpid(pid, NULL, 0);
}
#endif

static int bench_under_load_one(const Bench *b, MsRng *r, int scale) {
    const int N = 2, Tk = 77;
    char label[96];
    MsModel m;
    UNetParams p;
    UNetSizes sz;
    UNetCtx u;
    Arena acts, scratch;
    int ok = 0, p_ok = 0;
    double idle[4], loaded[4];
    char tiny_dir[4200] = "";
    MsOpenOptions oo;
    memset(&m, 0, sizeof m); memset(&p, 0, sizeof p); memset(&u, 0, sizeof u);
    memset(&acts, 0, sizeof acts); memset(&scratch, 0, sizeof scratch); memset(&oo, 0, sizeof oo);
    oo.quiet = 1;
    if (!ms_find_tiny_model(tiny_dir, sizeof tiny_dir)) {
        fprintf(stderr, "mixshow bench: --under-load: the tiny model models/tiny-sd was not found\n");
        return 0;
    }
    if (ms_open_model(tiny_dir, &oo, &m, NULL, NULL, 0)) {
        fprintf(stderr, "mixshow bench: --under-load: the tiny model: %s\n", ms_last_error());
        return 0;
    }
    const UNetConfig *c = &m.unet_config;
    const int h = c->sample_size * scale, w = c->sample_size * scale;
    snprintf(label, sizeof label, "unet tiny B=%d %dx%d", N, h, w);
    if (unet_params_init(&p, c, &m.unet)) { fprintf(stderr, "mixshow bench: %s: %s\n", label, ms_last_error()); goto done; }
    p_ok = 1;
    if (unet_sizes(c, N, h, w, Tk, 0, &sz) || arena_init(&acts, sz.acts_bytes) || arena_init(&scratch, sz.scratch_bytes) ||
        unet_acts_init(&u.a, c, N, h, w, Tk, 0, &acts, &scratch)) {
        fprintf(stderr, "mixshow bench: %s: %s\n", label, ms_last_error());
        goto done;
    }
    const size_t nx = (size_t)N * c->in_channels * h * w, ne = (size_t)N * c->out_channels * h * w;
    const size_t nc = (size_t)N * Tk * c->cross_attention_dim;
    u.p = &p;
    u.a.split = b->split;                               /* the CFG batch in parts, one per thread, as sample */
    if (!(u.x = net_buf(r, nx, 1.0f)) || !(u.eps = net_buf(r, ne, 0.0f)) || !(u.ctx = net_buf(r, nc, 1.0f)) ||
        !(u.t = net_buf(r, (size_t)N, 0.0f)))
        goto done;
    u.t[0] = u.t[1] = 999.0f;
    NetCase nc_idle = { label, "s/step", run_unet, &u }, nc_load = { label, "s/step (loaded)", run_unet, &u };
    if (net_report(b, &nc_idle, 1, idle) || !check_finite(label, u.eps, ne)) goto done;
#ifdef MS_BENCH_FORK
    {
        pid_t busy = busy_start();
        if (busy < 0) { fprintf(stderr, "mixshow bench: --under-load: fork failed\n"); goto done; }
        int bad = net_report(b, &nc_load, 1, loaded);
        busy_stop(busy);
        if (bad) goto done;
    }
    if (b->threads[1] != b->threads[0])
        printf("%s loaded: threads=%d / threads=1 = %.3f wall, %.3f cpu (idle %.3f wall; target: loaded <= 1)\n", label,
               b->threads[1], loaded[1] / loaded[0], loaded[3] / loaded[2], idle[1] / idle[0]);
#else
    (void)loaded;
    printf("%s loaded: not available (no fork on this platform)\n", label);
#endif
    fflush(stdout);
    ok = 1;
done:
    ms_free_aligned(u.x); ms_free_aligned(u.eps); ms_free_aligned(u.ctx); ms_free_aligned(u.t);
    unet_acts_free(&u.a);
    arena_free(&acts); arena_free(&scratch);
    if (p_ok) unet_params_free(&p);
    ms_model_free(&m);
    return ok;
}

static int bench_under_load(const Bench *b, MsRng *r) {
    return bench_under_load_one(b, r, 1) && bench_under_load_one(b, r, 4);
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
    if (net_report(b, &nc_, 0, NULL) || !check_finite(label, u.img, ni)) goto done;
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
        if (net_report(b, &nc_, 0, NULL) || !check_finite(label, u.a.out, N * D) ||
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

/* --- ED-LoRA training: one optimizer step of `mixshow train` (ms_trainer_step) with the
 * models: and train: options of the official 8101 potter config (two concept words <potter1>
 * +<potter2>, 16 layer-wise tokens each; rank-4 LoRA (alpha 1) on to_q/to_k/to_v/to_out.0 of
 * every UNet attention and q/k/v/out_proj of every text-encoder layer; noise_offset 0.01,
 * attn_reg_weight 0.01, reg_full_identity false, mask loss; AdamW lr 1e-3 / 1e-5 / 1e-4, weight
 * decay 0.01). The draws are fixed (MsStepDraws: t = 500, the prompt "a photo of a <potter1>
 * <potter2>" bound x16), the mask is a centred 48x32 latent-pixel rectangle. Both words start
 * from <rand-0.013> (the config's second initializer, "man", needs the real vocabulary; the
 * initial values do not change the time). Then the same step in parts, each timed on its own
 * with the same shapes (VAE encode, text encoder forward + backward over the B x 16 prompts,
 * UNet forward, UNet backward, AdamW over every trainable float); "rest" is the step minus the
 * parts (posterior sample, noise, copies, losses, the attention regulariser, the gradient
 * finiteness checks, per-tensor AdamW calls instead of one). --- */

/* A CLIP tokenizer made in memory with the real tokenizer's size and special ids: the 256 byte
 * symbols of bytes_to_unicode (GPT-2/CLIP), the same with "</w>", fillers up to id 49405,
 * <|startoftext|> 49406, <|endoftext|> 49407; no merges. The trainer only adds its concept
 * tokens to it (the step's ids come from MsStepDraws). */
static MsStatus bench_tokenizer(ClipTokenizer *tok, int n_vocab) {
    char *mem = (char *)malloc((size_t)n_vocab * 24);
    const char **toks = (const char **)malloc((size_t)n_vocab * sizeof *toks);
    size_t *lens = (size_t *)malloc((size_t)n_vocab * sizeof *lens);
    int64_t *ids = (int64_t *)malloc((size_t)n_vocab * sizeof *ids);
    static const char merges[] = "#version: 0.2\n";
    MsStatus s;
    if (!mem || !toks || !lens || !ids || n_vocab < 514) {
        s = ms_errorf(MS_ERR_NOMEM, "bench: tokenizer of %d tokens: out of memory", n_vocab);
        goto done;
    }
    for (int i = 0, extra = 0; i < 256; i++) {        /* bytes_to_unicode: printable bytes keep */
        int keep = (i >= '!' && i <= '~') || (i >= 0xA1 && i <= 0xAC) || (i >= 0xAE && i <= 0xFF);
        unsigned cp = keep ? (unsigned)i : 256u + (unsigned)extra++;   /* their code point */
        char *a = mem + (size_t)i * 24, *w = mem + (size_t)(256 + i) * 24;
        size_t k = 0;
        if (cp < 0x80) a[k++] = (char)cp;
        else { a[k++] = (char)(0xC0 | (cp >> 6)); a[k++] = (char)(0x80 | (cp & 0x3F)); }
        memcpy(w, a, k); memcpy(w + k, "</w>", 4);
        toks[i] = a; lens[i] = k; toks[256 + i] = w; lens[256 + i] = k + 4;
    }
    for (int i = 512; i < n_vocab; i++) {
        char *a = mem + (size_t)i * 24;
        if (i == n_vocab - 2) snprintf(a, 24, "<|startoftext|>");
        else if (i == n_vocab - 1) snprintf(a, 24, "<|endoftext|>");
        else snprintf(a, 24, "<|bench%d|>", i);
        toks[i] = a; lens[i] = strlen(a);
    }
    for (int i = 0; i < n_vocab; i++) ids[i] = i;
    s = clip_tokenizer_init(tok, toks, lens, ids, n_vocab, merges, sizeof merges - 1, NULL, "bench tokenizer");
done:
    free(mem); free(toks); free(lens); free(ids);
    return s;
}

typedef struct {
    MsTrainer *tr;
    MsTrainBatch bt;
    MsStepDraws dr;
    MsStepReport rep;
} TrainCtx;
static MsStatus run_train(void *v) {
    TrainCtx *u = (TrainCtx *)v;
    MsStatus s = ms_trainer_step(u->tr, &u->bt, &u->dr, NULL, &u->rep);
    if (!s) fprintf(stderr, "    step %lld: loss %.6g (mse %.6g, attn %.6g)\n", (long long)ms_trainer_step_count(u->tr),
                    u->rep.loss, u->rep.loss_mse, u->rep.loss_attn);
    return s;
}

/* The host: CPU model and cpuid family/model (Linux /proc/cpuinfo; skipped elsewhere), the
 * kernels' SIMD level and the one-thread FMA peak of AVX2 and AVX-512: about 2x apart on cores
 * with two 512-bit FMA ports ("full-rate"), about equal where AVX-512 runs at half rate. */
static void host_line(void) {
    char line[256], model[128] = "?";
    int fam = -1, mod = -1;
    FILE *f = fopen("/proc/cpuinfo", "r");
    if (f) {
        while (fgets(line, sizeof line, f)) {
            const char *c = strchr(line, ':');
            if (!c) continue;
            if (!strncmp(line, "model name", 10) && model[0] == '?') {
                snprintf(model, sizeof model, "%s", c + 2);
                model[strcspn(model, "\n")] = 0;
            } else if (!strncmp(line, "cpu family", 10) && fam < 0) fam = atoi(c + 1);
            else if (!strncmp(line, "model\t", 6) && mod < 0) mod = atoi(c + 1);
            if (fam >= 0 && mod >= 0 && model[0] != '?') break;
        }
        fclose(f);
    }
    MsSimd lv = ms_simd();
    printf("host: %s, cpuid family %d model %d, kernels %s (detected %s)", model, fam, mod, ms_simd_name(lv),
           ms_simd_name(ms_simd_detected()));
    if (ms_simd_detected() >= MS_SIMD_AVX512) {
        double p2 = ms_bench_fma_peak(MS_SIMD_AVX2, 1, 0.2), p5 = ms_bench_fma_peak(MS_SIMD_AVX512, 1, 0.2);
        printf(", FMA peak 1 thread avx2 %.1f / avx512 %.1f GFLOP/s (AVX-512 %s-rate)", p2, p5,
               p5 > 1.5 * p2 ? "full" : "half");
    }
    printf("\n");
    fflush(stdout);
}

/* The parts of the step, on buffers of their own (allocated here, after the trainer is freed). */
typedef struct {
    const MsModel *m;
    int B, L, n_tok;
    VaeParams *vp;
    UNetParams up;
    UNetActs ua;
    UNetLora lora, dlora;
    ClipTextParams *tp;
    ClipTextActs ta;
    ClipLora tl, dtl;
    Arena vae_ar, uacts, uscr, lora_ar, text_ar;
    float *img, *mean, *logvar, *x, *t, *eps, *deps, *ctx, *dctx, *tmem, *dtmem, *emb, *demb, *tdout;
    float *ap, *ag, *am, *av;
    const float *lctx[16];
    float *ldctx[16];
    int32_t *ids;
    size_t n_train;
    int up_ok, ua_ok;
} Parts;

static void parts_free(Parts *q) {
    if (q->ua_ok) unet_acts_free(&q->ua);
    if (q->up_ok) unet_params_free(&q->up);
    arena_free(&q->vae_ar); arena_free(&q->uacts); arena_free(&q->uscr); arena_free(&q->lora_ar); arena_free(&q->text_ar);
    float *bufs[] = { q->img, q->mean, q->logvar, q->x, q->t, q->eps, q->deps, q->ctx, q->dctx, q->tmem, q->dtmem,
                      q->emb, q->demb, q->tdout, q->ap, q->ag, q->am, q->av };
    for (size_t i = 0; i < sizeof bufs / sizeof bufs[0]; i++) ms_free_aligned(bufs[i]);
    free(q->ids); free(q->vp); free(q->tp);
}

static MsStatus parts_init(Parts *q, const MsModel *m, int B, int L, int n_tok, int rank, MsRng *r) {
    const UNetConfig *uc = &m->unet_config;
    const ClipTextConfig *tc = &m->text_config;
    const int H = 512, W = 512, h = 64, w = 64, T = 77, D = tc->hidden_size, nc = ms_unet_cross_attn_layers(uc);
    const size_t nlat = (size_t)B * uc->in_channels * h * w, nout = (size_t)B * uc->out_channels * h * w;
    const size_t nctx = (size_t)B * T * D, nte = clip_lora_numel(tc, rank), nul = unet_lora_floats(uc, rank);
    VaeSizes vz;
    UNetSizes us;
    MsStatus s;
    memset(q, 0, sizeof *q);
    q->m = m; q->B = B; q->L = L; q->n_tok = n_tok;
    if (nc > 16) return ms_errorf(MS_ERR_UNSUPPORTED, "bench: %d cross-attention layers (16 expected)", nc);
    q->vp = (VaeParams *)malloc(sizeof *q->vp);
    q->tp = (ClipTextParams *)malloc(sizeof *q->tp);
    q->ids = (int32_t *)malloc((size_t)B * L * T * sizeof(int32_t));
    if (!q->vp || !q->tp || !q->ids) return ms_errorf(MS_ERR_NOMEM, "bench: out of memory");
    if ((s = vae_params_init(q->vp, &m->vae_config, &m->vae)) || (s = vae_sizes(&m->vae_config, H, W, -1, &vz)) ||
        (s = arena_init(&q->vae_ar, vz.encode_bytes)))
        return s;
    if ((s = unet_params_init(&q->up, uc, &m->unet))) return s;
    q->up_ok = 1;
    size_t lin = (size_t)2 * q->up.n_blk * 4 * sizeof(UNetLoraLinear);
    if ((s = arena_init(&q->lora_ar, 2 * (lin + 128) + 2 * (nul * sizeof(float) + 128))) ||
        (s = unet_lora_init(&q->lora, &q->up, rank, 1.0f, &q->lora_ar)) ||
        (s = unet_lora_init(&q->dlora, &q->up, rank, 1.0f, &q->lora_ar)))
        return s;
    ms_rng_fill_normal(r, q->lora.data, q->lora.n_floats, 0.0f, 0.02f);
    if ((s = unet_sizes(uc, B, h, w, T, 1, &us)) || (s = arena_init(&q->uacts, us.acts_bytes)) ||
        (s = arena_init(&q->uscr, us.scratch_bytes)) || (s = unet_acts_init(&q->ua, uc, B, h, w, T, 1, &q->uacts, &q->uscr)))
        return s;
    q->ua_ok = 1;
    if ((s = clip_text_params(q->tp, &m->text, tc))) return s;
    if ((s = arena_init(&q->text_ar, clip_text_sizes(tc, B * L, T, rank, CLIP_TRAIN_RECOMPUTE))) ||
        (s = clip_text_acts_alloc(&q->ta, &q->text_ar, tc, B * L, T, rank, CLIP_TRAIN_RECOMPUTE)))
        return s;
    q->n_train = (size_t)n_tok * D + nte + nul;
    if (!(q->img = net_buf(r, (size_t)B * 3 * H * W, 0.5f)) || !(q->mean = net_buf(r, nlat, 0.0f)) ||
        !(q->logvar = net_buf(r, nlat, 0.0f)) || !(q->x = net_buf(r, nlat, 1.0f)) || !(q->t = net_buf(r, (size_t)B, 0.0f)) ||
        !(q->eps = net_buf(r, nout, 0.0f)) || !(q->deps = net_buf(r, nout, 1e-3f)) ||
        !(q->ctx = net_buf(r, (size_t)nc * nctx, 1.0f)) || !(q->dctx = net_buf(r, (size_t)nc * nctx, 0.0f)) ||
        !(q->tmem = net_buf(r, nte, 0.02f)) || !(q->dtmem = net_buf(r, nte, 0.0f)) ||
        !(q->emb = net_buf(r, (size_t)n_tok * D, 0.013f)) || !(q->demb = net_buf(r, (size_t)n_tok * D, 0.0f)) ||
        !(q->tdout = net_buf(r, (size_t)B * L * T * D, 1e-3f)) || !(q->ap = net_buf(r, q->n_train, 0.02f)) ||
        !(q->ag = net_buf(r, q->n_train, 1e-3f)) || !(q->am = net_buf(r, q->n_train, 0.0f)) ||
        !(q->av = net_buf(r, q->n_train, 0.0f)))
        return ms_errorf(MS_ERR_NOMEM, "bench: out of memory");
    for (int b = 0; b < B; b++) q->t[b] = 500.0f;
    for (int i = 0; i < nc; i++) { q->lctx[i] = q->ctx + (size_t)i * nctx; q->ldctx[i] = q->dctx + (size_t)i * nctx; }
    clip_lora_bind(&q->tl, q->tmem, tc, rank, 1.0f);
    clip_lora_bind(&q->dtl, q->dtmem, tc, rank, 1.0f);
    for (int p = 0; p < B * L; p++)
        for (int j = 0; j < T; j++) {
            static const int32_t head[5] = { 49406, 320, 1125, 539, 320 };    /* <bos> a photo of a */
            int32_t id = j < 5 ? head[j] : j == 5 ? tc->vocab_size + p % L : j == 6 ? tc->vocab_size + L + p % L : 49407;
            q->ids[(size_t)p * T + j] = id;
        }
    return MS_OK;
}

/* Times the parts once: wall seconds in sec[0..4], process CPU seconds (all threads) in sec[5..9]. */
static MsStatus parts_run(Parts *q, double sec[10], int64_t step) {
    const ClipTextConfig *tc = &q->m->text_config;
    const size_t nc = (size_t)ms_unet_cross_attn_layers(&q->m->unet_config), nctx = (size_t)q->B * 77 * tc->hidden_size;
    MsStatus s;
    clock_t c[6];
    c[0] = clock();
    double t0 = ms_time();
    if ((s = vae_encode(q->vp, &q->vae_ar, q->mean, q->logvar, q->img, q->B, 512, 512))) return s;
    double t1 = ms_time();
    c[1] = clock();
    if ((s = clip_text_forward(&q->ta, q->tp, &q->tl, q->ids, q->emb, q->n_tok, tc))) return s;
    memset(q->dtmem, 0, clip_lora_numel(tc, q->tl.rank) * sizeof(float));
    memset(q->demb, 0, (size_t)q->n_tok * tc->hidden_size * sizeof(float));
    clip_text_backward(&q->dtl, q->demb, q->tdout, &q->ta, q->tp, &q->tl, q->ids, q->n_tok, tc);
    double t2 = ms_time();
    c[2] = clock();
    if ((s = unet_forward(q->eps, &q->ua, q->x, q->t, NULL, q->lctx, NULL, &q->up, &q->lora))) return s;
    double t3 = ms_time();
    c[3] = clock();
    memset(q->dlora.data, 0, q->dlora.n_floats * sizeof(float));
    memset(q->dctx, 0, nc * nctx * sizeof(float));
    if ((s = unet_backward(&q->ua, &q->up, &q->lora, &q->dlora, q->deps, NULL, q->ldctx))) return s;
    double t4 = ms_time();
    c[4] = clock();
    ms_adamw_step(q->ap, q->ag, q->am, q->av, q->n_train, step, 1e-4, 0.01, 0.9, 0.999, 1e-8);
    double t5 = ms_time();
    c[5] = clock();
    for (int k = 0; k < 5; k++) sec[5 + k] = (double)(c[k + 1] - c[k]) / CLOCKS_PER_SEC;
    sec[0] = t1 - t0; sec[1] = t2 - t1; sec[2] = t3 - t2; sec[3] = t4 - t3; sec[4] = t5 - t4;
    return MS_OK;
}

static int bench_train_parts(const Bench *b, const MsModel *m, int B, int L, int n_tok, const double step_med[4],
                             const char *label, MsRng *r) {
    static const char *const name[5] = { "vae-encode", "text fwd+bwd", "unet fwd", "unet bwd", "adamw" };
    Parts q;
    int ok = 0;
    MsStatus s = parts_init(&q, m, B, L, n_tok, 4, r);
    if (s) { fprintf(stderr, "mixshow bench: %s parts: %s\n", label, ms_last_error()); goto done; }
    for (int ti = 0; ti < 2; ti++) {
        if (ti == 1 && b->threads[1] == b->threads[0]) break;
        int n = b->runs < 64 ? b->runs : 64;
        double sec[64][10], med[10], sum = 0.0, csum = 0.0, col[64];
        ms_set_threads(b->threads[ti]);
        for (int i = -1; i < n; i++) {                  /* i = -1: warm-up */
            double tmp[10];
            if ((s = parts_run(&q, i < 0 ? tmp : sec[i], (int64_t)i + 2))) {
                fprintf(stderr, "mixshow bench: %s parts: %s\n", label, ms_last_error());
                goto done;
            }
            if (i >= 0)
                fprintf(stderr, "  %s parts threads=%d run %d/%d: %.2f %.2f %.2f %.2f %.3f s (cpu %.2f %.2f %.2f %.2f %.3f s)\n",
                        label, b->threads[ti], i + 1, n, sec[i][0], sec[i][1], sec[i][2], sec[i][3], sec[i][4], sec[i][5],
                        sec[i][6], sec[i][7], sec[i][8], sec[i][9]);
        }
        for (int k = 0; k < 10; k++) {
            for (int i = 0; i < n; i++) col[i] = sec[i][k];
            qsort(col, (size_t)n, sizeof col[0], cmp_double);
            med[k] = n % 2 ? col[n / 2] : 0.5 * (col[n / 2 - 1] + col[n / 2]);
            if (k < 5) sum += med[k]; else csum += med[k];
        }
        printf("%s threads=%d parts:", label, b->threads[ti]);
        for (int k = 0; k < 5; k++) printf(" %s %.3f s (cpu %.3f)%s", name[k], med[k], med[5 + k], k < 4 ? "," : "");
        printf("; sum %.3f s (cpu %.3f)", sum, csum);
        if (step_med[ti] > 0) printf(", the step's rest %.3f s (cpu %.3f)", step_med[ti] - sum, step_med[2 + ti] - csum);
        printf("\n");
        fflush(stdout);
    }
    if (!check_finite("unet fwd (parts)", q.eps, (size_t)B * m->unet_config.out_channels * 64 * 64)) goto done;
    ok = 1;
done:
    ms_set_threads(0);
    parts_free(&q);
    return ok;
}

static int bench_train(const Bench *b, MsRng *r, int B, int f16) {
    const int H = 512, W = 512, h = 64, w = 64, L = 16, T = 77, rank = 4;
    char label[64];
    MsModel m;
    ClipTokenizer tok;
    MsTrainConfig cfg;
    MsTrainer *tr = NULL;
    TrainCtx u;
    float *img = NULL, *eps = NULL;
    double *mask = NULL, *ones = NULL, step_med[4] = { 0, 0, 0, 0 };
    int32_t *ids = NULL;
    int64_t ts[64];
    int ok = 0, tok_ok = 0;
    snprintf(label, sizeof label, "train sd15 B=%d 64x64%s", B, f16 ? " f16-weights" : "");
    memset(&m, 0, sizeof m); memset(&u, 0, sizeof u);
    host_line();
    ms_unet_config_sd15(&m.unet_config);
    ms_vae_config_sd15(&m.vae_config);
    ms_clip_text_config_sd15(&m.text_config);
    ms_scheduler_config_sd15(&m.scheduler_config);
    fprintf(stderr, "%s: random weights...\n", label);
    if (ms_param_table_unet(&m.unet_config, &m.unet) || (f16 ? table_random_f16 : table_random)(&m.unet, 15) ||
        ms_param_table_vae(&m.vae_config, &m.vae) || (f16 ? table_random_f16 : table_random)(&m.vae, 16) ||
        ms_param_table_text(&m.text_config, &m.text) || (f16 ? table_random_f16 : table_random)(&m.text, 17) ||
        bench_tokenizer(&tok, m.text_config.vocab_size)) {
        fprintf(stderr, "mixshow bench: %s: %s\n", label, ms_last_error());
        goto done;
    }
    tok_ok = 1;
    /* 8101_EDLoRA_potter_Cmix_B4_Repeat500.yml, models: and train: */
    ms_train_config_defaults(&cfg);
    cfg.n_words = 2;
    snprintf(cfg.words[0], MS_WORD_MAX, "<potter1>"); snprintf(cfg.words[1], MS_WORD_MAX, "<potter2>");
    snprintf(cfg.init[0], MS_WORD_MAX, "<rand-0.013>"); snprintf(cfg.init[1], MS_WORD_MAX, "<rand-0.013>");
    cfg.has_noise_offset = 1; cfg.noise_offset = 0.01;
    cfg.has_attn_reg = 1; cfg.attn_reg_weight = 0.01;
    cfg.reg_full_identity = 0;
    cfg.total_iter = 3500.0;                            /* 14 images x 500 / batch 2 */
    const size_t nlat = (size_t)B * 4 * h * w;
    rss_peak_reset();
    {
        MsTorchRng g;
        ms_torch_seed(&g, 0);
        if (ms_trainer_create(&tr, &m, &tok, &cfg, B, H, W, &g)) {
            fprintf(stderr, "mixshow bench: %s: %s\n", label, ms_last_error());
            goto done;
        }
    }
    int first_id = 0;
    ms_trainer_tokens(tr, &first_id);
    if (!(img = net_buf(r, (size_t)B * 3 * H * W, 0.0f)) || !(eps = net_buf(r, 3 * nlat + (size_t)B * 4, 1.0f)) ||
        !(mask = (double *)malloc(2 * (size_t)B * h * w * sizeof(double))) ||
        !(ids = (int32_t *)malloc((size_t)B * L * T * sizeof(int32_t))))
        goto done;
    ms_rng_fill_uniform(r, img, (size_t)B * 3 * H * W, -1.0f, 1.0f);
    ones = mask + (size_t)B * h * w;
    for (int b = 0; b < B; b++)
        for (int y = 0; y < h; y++)
            for (int x = 0; x < w; x++) {
                mask[((size_t)b * h + y) * w + x] = y >= 8 && y < 56 && x >= 16 && x < 48;
                ones[((size_t)b * h + y) * w + x] = 1.0;
            }
    for (int p = 0; p < B * L; p++)                     /* <bos> a photo of a <potter1> <potter2> <eos> */
        for (int j = 0; j < T; j++) {
            static const int32_t head[5] = { 49406, 320, 1125, 539, 320 };
            int32_t id = j < 5 ? head[j] : j == 5 ? first_id + p % L : j == 6 ? first_id + L + p % L : 49407;
            ids[(size_t)p * T + j] = id;
        }
    for (int i = 0; i < B; i++) ts[i] = 500;
    u.tr = tr;
    u.bt.B = B; u.bt.H = H; u.bt.W = W; u.bt.images = img; u.bt.masks = mask; u.bt.img_masks = ones;
    u.dr.input_ids = ids; u.dr.vae_eps = eps; u.dr.noise_randn = eps + nlat; u.dr.noise_offset_randn = eps + 2 * nlat;
    u.dr.timesteps = ts;
    {
        NetCase nc_ = { label, "s/step", run_train, &u };
        if (net_report(b, &nc_, 1, step_med) || !check_finite(label, u.rep.model_pred, nlat)) goto done;
    }
    {
        const ClipTextConfig *tc = &m.text_config;
        UNetSizes us;
        VaeSizes vz;
        size_t text = clip_text_sizes(tc, B * L, T, rank, CLIP_TRAIN_RECOMPUTE), train = 0;   /* as the trainer */
        if (unet_sizes(&m.unet_config, B, h, w, T, 1, &us) || vae_sizes(&m.vae_config, H, W, -1, &vz)) {
            fprintf(stderr, "mixshow bench: %s: %s\n", label, ms_last_error());
            goto done;
        }
        for (int i = 0; i < ms_trainer_n_params(tr); i++) {
            int64_t sh[2];
            ms_trainer_param(tr, i, NULL, NULL, NULL, sh);
            train += (size_t)sh[0] * (size_t)sh[1];
        }
        /* the trainer's own buffers: parameters, gradients, AdamW moments (4 per float);
         * latents, noise, prediction; the (B*16,77,D) text gradient and 16 contexts + their
         * gradients; ids */
        size_t io = 4 * train * sizeof(float) +
                    ((size_t)7 * nlat + (size_t)B * L * T * tc->hidden_size + 2 * 16 * (size_t)B * T * tc->hidden_size) * sizeof(float);
        /* the trainer lends the UNet activation arena to the VAE encode when it is large enough */
        const size_t vae_own = us.acts_bytes >= vz.encode_bytes ? 0 : vz.encode_bytes;
        net_memory(label, m.unet.mem_bytes + m.vae.mem_bytes + m.text.mem_bytes, us.acts_bytes + text,
                   us.scratch_bytes + vae_own, io);
        printf("%s memory parts: weights unet %.1f + vae %.1f + text %.1f; unet training acts %.1f + scratch %.1f; "
               "text encoder acts [%dx77] %.1f; vae encode scratch %.1f (%s); trainable floats %zu (x4: %.1f) MiB\n",
               label, MIB(m.unet.mem_bytes), MIB(m.vae.mem_bytes), MIB(m.text.mem_bytes), MIB(us.acts_bytes),
               MIB(us.scratch_bytes), B * L, MIB(text), MIB(vz.encode_bytes), vae_own ? "own arena" : "in the unet acts arena",
               train, MIB(4 * train * sizeof(float)));
        fflush(stdout);
    }
    ms_trainer_free(tr);
    tr = NULL;
    ms_gemm_scratch_free();
    ops_scratch_free();
    ok = bench_train_parts(b, &m, B, L, 2 * L, step_med, label, r);
done:
    ms_trainer_free(tr);
    if (tok_ok) clip_tokenizer_free(&tok);
    ms_free_aligned(img); ms_free_aligned(eps);
    free(mask); free(ids);
    ms_param_table_free(&m.unet); ms_param_table_free(&m.vae); ms_param_table_free(&m.text);
    return ok;
}

/* --- Regional sampling (issue 12, Speed; only when named): one CFG UNet step (B = 2: uncond +
 * cond) at 64x64 latents with 16 layer-wise contexts (as Mix-of-Show binds concepts), plain and
 * with 3 overlapping regions (UNetRegions: each region its own 16 layer-wise contexts), timed
 * interleaved (plain, regional, ...: a loaded machine drifts less between the two); the ratio
 * is regional / plain of the medians. Peak RSS of one step of each (scratch freed and the peak
 * reset before both; the region contexts and work are live only for the second), so the
 * difference is what the regions cost. Then two emulations: the extra work they would do on top
 * of the regional step, per attn2 layer at its shape (random data: the kernels' time does not
 * depend on the values), timed alone and added to the regional median:
 *   official: pipeline_regionally_t2iadapter.py region_rewrite (51270fd) computes the global
 *     attention for every query and then overwrites the ones inside boxes (each region attends
 *     only with its box's queries, as here): + the global attention of the covered queries, and
 *     the zeros_like + masked copies (a clear and a copy of the layer's (N,T,C) output);
 *   full-per-region: the cost model "one full attention pass per region" (every region attends
 *     with all queries, then masks): + the queries outside each box as well.
 * Boxes (top, left, bottom, right) in pixels of 512x512: three figures side by side, 40 px
 * overlaps. The tiny model (models/tiny-sd, its own weights, 32x32 latents) runs first: a quick
 * check. Each thread count as the other cases (1 and all). --- */
typedef struct {
    UNetActs a;
    const UNetParams *p;
    const float *x, *t;
    float *eps;
    const float **lctx;
    const UNetRegions *reg;             /* NULL: plain */
    int emulate;                        /* for reg_emulate: 1 official, 2 full-per-region */
    float *q, *k, *v, *o;               /* emulation buffers, the largest layer's size */
    int Tk;
} RegCtx;

static void reg_emulate(void *v, int layer, int which, const float *x, size_t rows, int C) {
    RegCtx *u = (RegCtx *)v;
    int heads, h, w;
    (void)x; (void)rows;
    if (which != 3 || unet_probe_shape(&u->a, layer, &heads, &h, &w)) return;
    const size_t T = (size_t)h * w, N = 2;
    const int Dh = C / heads;
    size_t covered = 0, extra;
    unsigned char *in = (unsigned char *)calloc(T, 1);
    if (!in) return;
    size_t outside = 0;
    for (int r = 0; r < u->reg->n; r++) {
        int r0, c0, r1, c1;
        unet_region_rows(u->reg->box[r], h, w, &r0, &c0, &r1, &c1);
        for (int y = r0; y < r1; y++)
            for (int xx = c0; xx < c1; xx++) in[(size_t)y * w + xx] = 1;
        outside += T - (size_t)(r1 - r0) * (size_t)(c1 - c0);
    }
    for (size_t t = 0; t < T; t++) covered += in[t];
    free(in);
    extra = covered + (u->emulate == 2 ? outside : 0);
    for (size_t done = 0; done < extra; done += T) {     /* chunks of at most T queries */
        size_t nq = extra - done < T ? extra - done : T;
        attention_forward(u->o, NULL, u->q, u->k, u->v, (int)N, (int)nq, u->Tk, heads, Dh, 0,
                          1.0f / sqrtf((float)Dh));
    }
    memset(u->o, 0, N * T * (size_t)C * sizeof(float)); /* new_hidden_state = zeros_like(...) */
    memcpy(u->o, u->q, N * T * (size_t)C * sizeof(float));   /* ... [mask == 0] = hidden[mask == 0] */
}

static MsStatus run_reg(void *v) {
    RegCtx *u = (RegCtx *)v;
    u->a.regions = u->reg;
    return unet_forward(u->eps, &u->a, u->x, u->t, NULL, (const float *const *)u->lctx, NULL, u->p, NULL);
}

static double median_of(double *x, int n) {
    qsort(x, (size_t)n, sizeof x[0], cmp_double);
    return n % 2 ? x[n / 2] : 0.5 * (x[n / 2 - 1] + x[n / 2]);
}

/* One step of the current variant for the memory figure: scratch freed, peak reset. */
static double reg_peak(RegCtx *u) {
    ms_gemm_scratch_free();
    ops_scratch_free();
    rss_peak_reset();
    if (run_reg(u)) return -2.0;
    return rss_peak_mib();
}

static int bench_regional(const Bench *b, MsRng *r, int tiny) {
    enum { R = 3, NV = 4 };
    static const double px[R][4] = { { 16, 8, 512, 200 }, { 24, 160, 512, 360 }, { 40, 320, 512, 504 } };
    static const char *const vname[NV] = { "plain", "regional", "official (emulated)", "full-per-region (emulated)" };
    const int N = 2, h = tiny ? 32 : 64, w = h, Tk = 77;
    const char *mname = tiny ? "tiny" : "sd15";
    char label[96];
    MsModel m;
    UNetConfig c;
    MsParamTable t;
    UNetParams p;
    UNetSizes sz;
    UNetRegions reg;
    RegCtx u;
    Arena acts, scratch;
    double box[R][4];
    float *ctx = NULL, *rctx = NULL, *work = NULL, *eps_plain = NULL, *x = NULL, *tt = NULL;
    const float **lctx = NULL, **rptr = NULL;
    int ok = 0, p_ok = 0, a_ok = 0;
    memset(&m, 0, sizeof m); memset(&t, 0, sizeof t); memset(&p, 0, sizeof p); memset(&u, 0, sizeof u);
    memset(&acts, 0, sizeof acts); memset(&scratch, 0, sizeof scratch); memset(&reg, 0, sizeof reg);
    snprintf(label, sizeof label, "regional %s B=2 %dx%d regions=%d", mname, h, w, R);
    if (tiny) {
        MsOpenOptions oo;
        char tiny_dir[4200];
        memset(&oo, 0, sizeof oo);
        oo.quiet = 1;
        if (!ms_find_tiny_model(tiny_dir, sizeof tiny_dir)) {
            fprintf(stderr, "mixshow bench: %s: models/tiny-sd not found\n", label);
            return 0;
        }
        if (ms_open_model(tiny_dir, &oo, &m, NULL, NULL, 0)) {
            fprintf(stderr, "mixshow bench: %s: %s\n", label, ms_last_error());
            return 0;
        }
        c = m.unet_config;
    } else {
        ms_unet_config_sd15(&c);
        fprintf(stderr, "%s: random weights...\n", label);
        if (ms_param_table_unet(&c, &t) || table_random(&t, 15)) {
            fprintf(stderr, "mixshow bench: %s: %s\n", label, ms_last_error());
            goto done;
        }
    }
    const MsParamTable *pt = tiny ? &m.unet : &t;
    const int L = ms_unet_cross_attn_layers(&c), D = c.cross_attention_dim;
    if (unet_params_init(&p, &c, pt)) { fprintf(stderr, "mixshow bench: %s: %s\n", label, ms_last_error()); goto done; }
    p_ok = 1;
    if (unet_sizes(&c, N, h, w, Tk, 0, &sz) || arena_init(&acts, sz.acts_bytes) || arena_init(&scratch, sz.scratch_bytes) ||
        unet_acts_init(&u.a, &c, N, h, w, Tk, 0, &acts, &scratch)) {
        fprintf(stderr, "mixshow bench: %s: %s\n", label, ms_last_error());
        goto done;
    }
    a_ok = 1;
    const size_t nx = (size_t)N * c.in_channels * h * w, ne = (size_t)N * c.out_channels * h * w;
    const size_t one = (size_t)N * Tk * D, nwork = unet_regions_work_floats(&c, N, h, w, Tk);
    if (!(x = net_buf(r, nx, 1.0f)) || !(u.eps = net_buf(r, ne, 0.0f)) || !(eps_plain = net_buf(r, ne, 0.0f)) ||
        !(tt = net_buf(r, (size_t)N, 0.0f)) || !(ctx = net_buf(r, (size_t)L * one, 1.0f)) ||
        !(lctx = (const float **)malloc((size_t)L * sizeof *lctx)))
        goto done;
    tt[0] = tt[1] = 999.0f;                             /* the first step of a sampler */
    for (int i = 0; i < L; i++) lctx[i] = ctx + (size_t)i * one;
    u.p = &p; u.x = x; u.t = tt; u.lctx = lctx; u.Tk = Tk;
    u.a.split = b->split;                               /* as regional sampling: the CFG batch in parts */

    /* plain: its peak first, while no region buffer exists */
    double rss_plain = reg_peak(&u), rss_reg;
    if (rss_plain < -1.5) { fprintf(stderr, "mixshow bench: %s: %s\n", label, ms_last_error()); goto done; }
    memcpy(eps_plain, u.eps, ne * sizeof(float));
    /* the regions: R x L contexts (N,Tk,D), boxes as fractions, the work */
    if (!(rctx = net_buf(r, (size_t)R * L * one, 1.0f)) || !(rptr = (const float **)malloc((size_t)R * L * sizeof *rptr)) ||
        !(work = (float *)ms_alloc_aligned(nwork, sizeof(float))))
        goto done;
    for (int k = 0; k < R * L; k++) rptr[k] = rctx + (size_t)k * one;
    for (int k = 0; k < R; k++)
        for (int j = 0; j < 4; j++) box[k][j] = px[k][j] / 512.0;
    reg.n = R; reg.box = (const double (*)[4])box; reg.n_layer_ctx = L; reg.ctx = rptr; reg.work = work;
    u.reg = &reg;
    rss_reg = reg_peak(&u);
    if (rss_reg < -1.5) { fprintf(stderr, "mixshow bench: %s: %s\n", label, ms_last_error()); goto done; }
    {
        double d = 0.0;
        for (size_t k = 0; k < ne; k++) d += fabs((double)u.eps[k] - eps_plain[k]);
        if (!check_finite(label, u.eps, ne) || !check_finite("plain", eps_plain, ne)) goto done;
        fprintf(stderr, "  %s: mean |eps_regional - eps_plain| %.4g (the regions are in effect)\n", label, d / (double)ne);
        if (!(d > 0.0)) { fprintf(stderr, "mixshow bench: %s: the regions changed nothing\n", label); goto done; }
    }
    /* the emulation buffers (after the memory figures): the largest layer's (N,T,C) and (N,Tk,C) */
    {
        size_t big = 0, kbig = 0;
        const int pad = c.downsample_padding, ex = pad == 0 ? 1 : 2 * pad;   /* as unet_regions_work_floats */
        for (int i = 0, lh = h, lw = w; i < c.n_blocks; i++) {
            size_t T = (size_t)lh * lw, C = (size_t)c.block_out_channels[i];
            if ((size_t)N * T * C > big) big = (size_t)N * T * C;
            if ((size_t)N * Tk * C > kbig) kbig = (size_t)N * Tk * C;
            lh = (lh + ex - 3) / 2 + 1; lw = (lw + ex - 3) / 2 + 1;
        }
        if (!(u.q = net_buf(r, big, 1.0f)) || !(u.o = net_buf(r, big, 0.0f)) || !(u.k = net_buf(r, kbig, 1.0f)) ||
            !(u.v = net_buf(r, kbig, 1.0f)))
            goto done;
    }

    /* timing, per thread count: b->runs rounds of (plain, regional), then the emulated extras
     * alone (every cross-attention layer's extra work, rounds of both kinds) */
    for (int ti = 0; ti < 2; ti++) {
        if (ti == 1 && b->threads[1] == b->threads[0]) break;
        const int th = b->threads[ti], n = b->runs < 64 ? b->runs : 64;
        double sec[NV][64], cpu[NV][64], med[NV], cmed[NV], lo[NV], hi[NV], load = load_avg1();
        ms_set_threads(th);
        for (int i = tiny ? -1 : 0; i < n; i++)         /* tiny: one untimed round first */
            for (int vi = 0; vi < NV; vi++) {
                double t0 = ms_time();
                clock_t c0 = clock();
                if (vi < 2) {
                    u.reg = vi ? &reg : NULL;
                    if (run_reg(&u)) { fprintf(stderr, "mixshow bench: %s: %s\n", label, ms_last_error()); ms_set_threads(0); goto done; }
                } else {
                    u.reg = &reg; u.emulate = vi - 1;
                    for (int l = 0; l < L; l++) {
                        int heads, lh, lw, C = 0;
                        if (unet_probe_shape(&u.a, l, &heads, &lh, &lw)) { ms_set_threads(0); goto done; }
                        for (int k = 0; k < c.n_blocks; k++) if (u.a.lh[k] == lh && u.a.lw[k] == lw) { C = c.block_out_channels[k]; break; }
                        reg_emulate(&u, l, 3, NULL, (size_t)N * lh * lw, C);
                    }
                }
                double s = ms_time() - t0, cs = (double)(clock() - c0) / CLOCKS_PER_SEC;
                if (i >= 0) { sec[vi][i] = s; cpu[vi][i] = cs; }
                fprintf(stderr, "  %s threads=%d %s%s %s: %.3f s (cpu %.3f s)\n", label, th, vname[vi], vi >= 2 ? " extra" : "",
                        i < 0 ? "warm-up" : "run", s, cs);
            }
        ms_set_threads(0);
        for (int vi = 0; vi < NV; vi++) {
            med[vi] = median_of(sec[vi], n); lo[vi] = sec[vi][0]; hi[vi] = sec[vi][n - 1];
            cmed[vi] = median_of(cpu[vi], n);
        }
        printf("%s threads=%d: %.3f s/step (plain %.3f s/step, ratio %.3f)  (%d runs %.3f..%.3f, plain %.3f..%.3f; "
               "cpu %.3f / %.3f s, ratio %.3f", label, th, med[1], med[0], med[1] / med[0], n, lo[1], hi[1], lo[0],
               hi[0], cmed[1], cmed[0], cmed[1] / cmed[0]);
        if (load >= 0) printf("; load %.2f", load);
        printf(")\n");
        for (int vi = 2; vi < NV; vi++)
            printf("%s threads=%d %s: %.3f s/step (regional + %.3f s; ratio %.3f, cpu ratio %.3f)\n", label, th,
                   vname[vi], med[1] + med[vi], med[vi], (med[1] + med[vi]) / med[0], (cmed[1] + cmed[vi]) / cmed[0]);
        fflush(stdout);
    }
    {
        const size_t extra = ((size_t)R * L * one + nwork) * sizeof(float);
        printf("%s memory: regions' contexts %d x %d x (2,77,%d) %.1f + work %.1f = %.1f MiB planned on top of plain "
               "(weights %.1f + acts %.1f + scratch %.1f + contexts %.1f MiB)", label, R, L, D, MIB((size_t)R * L * one * sizeof(float)),
               MIB(nwork * sizeof(float)), MIB(extra), MIB(pt->mem_bytes), MIB(sz.acts_bytes), MIB(sz.scratch_bytes),
               MIB((size_t)L * one * sizeof(float)));
        if (rss_plain >= 0 && rss_reg >= 0)
            printf(", peak RSS %.1f MiB (plain %.1f, +%.1f)", rss_reg, rss_plain, rss_reg - rss_plain);
        printf("\n");
        fflush(stdout);
    }
    ok = 1;
done:
    ms_free_aligned(x); ms_free_aligned(u.eps); ms_free_aligned(eps_plain); ms_free_aligned(tt);
    ms_free_aligned(ctx); ms_free_aligned(rctx); ms_free_aligned(work);
    ms_free_aligned(u.q); ms_free_aligned(u.k); ms_free_aligned(u.v); ms_free_aligned(u.o);
    free(lctx); free(rptr);
    if (a_ok) unet_acts_free(&u.a);
    arena_free(&acts); arena_free(&scratch);
    if (p_ok) unet_params_free(&p);
    ms_param_table_free(&t);
    ms_model_free(&m);
    return ok;
}

/* --nets=fuse (only when named; SD 1.5 shapes: minutes to hours): `mixshow fuse` of N random
 * rank-4 ED-LoRAs (text encoder q/k/v/out + every UNet attention to_q/k/v/out.0, alpha 1, 16
 * tokens per concept word, 2 words per concept as the official configs) on random SD 1.5
 * weights, through ms_fuse_text_kv + ms_fuse_spatial as cmd_fuse calls them (the official
 * prompts, 20 DPM-Solver++ steps at 512x512 unless --fuse-size/--fuse-steps say less). One
 * run per case (a case is minutes long), all threads. Per case: seconds per stage (te, kv, sp;
 * sp split into UNet sampling, of it the Gram accumulation, folding, solving), total, peak RSS
 * beyond what was resident before (weights, LoRAs, tokenizer), and the official code's memory
 * model: gradient_fusion.py's forward hooks keep input AND output (float32, .cpu()) of every
 * hooked Linear for every recorded row of every concept until the stage solves:
 *     bytes = 4 * sum over fused layers of rows_l * (d_in,l + d_out,l),
 * rows_l = all concepts' recorded rows; for the spatial layers counted at the official 512x512
 * and 20 steps (N * 20 * h_l * w_l rows: 4096 / 1024 / 256 / 64 tokens per step at the four
 * levels), whatever size this run sampled at. */
typedef struct { const char *list; int lbfgs_n, size, steps, te_iters, unet_iters, words; } FuseBenchCfg;
static FuseBenchCfg fuse_cfg = { "2,5,14", 2, 512, 20, 500, 50, 2 };

static double rss_now_mib(void) {                       /* < 0: not available */
    char line[256];
    double kb = -1.0;
    FILE *f = fopen("/proc/self/status", "r");
    if (!f) return -1.0;
    while (fgets(line, sizeof line, f))
        if (!strncmp(line, "VmRSS:", 6)) { kb = strtod(line + 6, NULL); break; }
    fclose(f);
    return kb < 0 ? -1.0 : kb / 1024.0;
}

static const MsParam *fuse_param(const MsModel *m, const char *key) {
    int i = ms_param_find(&m->text, key);
    if (i >= 0) return &m->text.p[i];
    i = ms_param_find(&m->unet, key);
    return i >= 0 ? &m->unet.p[i] : NULL;
}

static int bench_fuse_one(int n, MsFuseMethod method, MsRng *r) {
    const FuseBenchCfg *fc = &fuse_cfg;
    const int rank = 4, nw = n * fc->words;
    char label[96];
    MsModel m;
    ClipTokenizer tok;
    UNetParams up;
    MsFuseReport rep;
    int ok = 0, tok_ok = 0, up_ok = 0, T = 0;
    MsFuseConcept cs[64];
    ClipLora te[64];
    UNetLora un[64];
    Arena un_ar[64];
    float *te_mem[64], *new_emb = NULL;
    char (*words)[40] = NULL, (*tnames)[24] = NULL, (*cname)[512] = NULL;
    const char **wptr = NULL, **tptr = NULL;
    unsigned char *has = NULL;
    memset(&m, 0, sizeof m); memset(&rep, 0, sizeof rep); memset(un_ar, 0, sizeof un_ar); memset(te_mem, 0, sizeof te_mem);
    snprintf(label, sizeof label, "fuse sd15 %s N=%d %dx%d %d steps", ms_fuse_method_name(method), n, fc->size, fc->size, fc->steps);
    if (n < 1 || n > 64) { fprintf(stderr, "mixshow bench: %s: 1..64 concepts\n", label); return 0; }
    ms_unet_config_sd15(&m.unet_config);
    ms_clip_text_config_sd15(&m.text_config);
    ms_scheduler_config_sd15(&m.scheduler_config);
    const ClipTextConfig *tc = &m.text_config;
    const int D = tc->hidden_size;
    fprintf(stderr, "%s: random weights...\n", label);
    if (ms_param_table_unet(&m.unet_config, &m.unet) || table_random(&m.unet, 15) ||
        ms_param_table_text(tc, &m.text) || table_random(&m.text, 17) ||
        unet_params_init(&up, &m.unet_config, &m.unet)) {
        fprintf(stderr, "mixshow bench: %s: %s\n", label, ms_last_error());
        goto done;
    }
    up_ok = 1;
    T = ms_unet_cross_attn_layers(&m.unet_config);
    /* the real CLIP BPE when the tiny model's tokenizer is at hand (official prompts tokenize as
     * in the official run), else the bytes-only bench tokenizer (more tokens per prompt) */
    MsStatus ts = ms_clip_tokenizer_load("models/tiny-sd/tokenizer", &tok);
    if (!ts && tok.n_vocab == tc->vocab_size) tok_ok = 1;
    else {
        if (!ts) clip_tokenizer_free(&tok);
        fprintf(stderr, "%s: models/tiny-sd/tokenizer not found: byte-level bench tokenizer\n", label);
        if (bench_tokenizer(&tok, tc->vocab_size)) { fprintf(stderr, "mixshow bench: %s: %s\n", label, ms_last_error()); goto done; }
        tok_ok = 1;
    }
    words = calloc((size_t)nw, sizeof *words); wptr = calloc((size_t)nw, sizeof *wptr);
    tnames = calloc((size_t)nw * T, sizeof *tnames); tptr = calloc((size_t)nw * T, sizeof *tptr);
    cname = calloc((size_t)n, sizeof *cname);
    has = malloc((size_t)tc->num_hidden_layers * 4 + (size_t)up.n_blk * 8);
    new_emb = net_buf(r, (size_t)nw * T * D, 0.014f);
    if (!words || !wptr || !tnames || !tptr || !cname || !has || !new_emb) { fprintf(stderr, "mixshow bench: %s: out of memory\n", label); goto done; }
    memset(has, 1, (size_t)tc->num_hidden_layers * 4 + (size_t)up.n_blk * 8);
    for (int w = 0; w < nw; w++) {
        snprintf(words[w], sizeof words[w], "<concept%d_%d>", w / fc->words, w % fc->words + 1);
        wptr[w] = words[w];
        for (int i = 0; i < T; i++) {
            int na = 0;
            snprintf(tnames[(size_t)w * T + i], sizeof tnames[0], "<new%d>", w * T + i);
            tptr[(size_t)w * T + i] = tnames[(size_t)w * T + i];
            if (clip_tokenizer_add_tokens(&tok, &tptr[(size_t)w * T + i], 1, &na) || na != 1) {
                fprintf(stderr, "mixshow bench: %s: token %s: %s\n", label, tptr[(size_t)w * T + i], ms_last_error());
                goto done;
            }
        }
    }
    for (int c = 0; c < n; c++) {
        size_t l = 0;
        for (int k = 0; k < fc->words; k++)
            l += (size_t)snprintf(cname[c] + l, sizeof cname[c] - l, "%s%s", k ? " " : "", words[c * fc->words + k]);
        const size_t nl = clip_lora_numel(tc, rank);
        if (!(te_mem[c] = net_buf(r, nl, 0.02f))) goto done;
        clip_lora_bind(&te[c], te_mem[c], tc, rank, 1.0f);
        if (arena_init(&un_ar[c], unet_lora_floats(&m.unet_config, rank) * sizeof(float) + 65536 +
                                      (size_t)up.n_blk * 8 * sizeof(UNetLoraLinear)) ||
            unet_lora_init(&un[c], &up, rank, 1.0f, &un_ar[c])) {
            fprintf(stderr, "mixshow bench: %s: %s\n", label, ms_last_error());
            goto done;
        }
        for (size_t k = 0; k < un[c].n_floats; k++) un[c].data[k] = 0.02f * (float)ms_rng_normal(r);
        cs[c].name = cname[c];
        cs[c].te = &te[c];
        cs[c].te_has = has;
        cs[c].unet = &un[c];
        cs[c].unet_has = has + (size_t)tc->num_hidden_layers * 4;
    }
    {
        MsFuseTokens tk = { nw, T, wptr, tptr, new_emb, nw * T };
        MsFuseOptions o;
        memset(&o, 0, sizeof o);
        o.method = method; o.te_iters = fc->te_iters; o.unet_iters = fc->unet_iters; o.verbose = 1;
        o.seed = 0; o.sp_size = fc->size; o.sp_steps = fc->steps;
        const double weights = MIB(m.unet.mem_bytes + m.text.mem_bytes);
        rss_peak_reset();
        const double base = rss_now_mib();
        const double load = load_avg1();
        double t0 = ms_time();
        clock_t c0 = clock();
        MsStatus s = ms_fuse_text_kv(&m, &up, &tok, &tk, cs, n, &o, &rep);
        if (!s) s = ms_fuse_spatial(&m, &up, &tok, &tk, cs, n, &o, &rep);
        const double total = ms_time() - t0, cpu = (double)(clock() - c0) / CLOCKS_PER_SEC, peak = rss_peak_mib();
        if (s) { fprintf(stderr, "mixshow bench: %s: %s\n", label, ms_last_error()); goto done; }
        /* the official memory model, from the layers fused and their recorded rows */
        double off[3] = { 0, 0, 0 }, f0 = 0, ff = 0;
        const double sp_scale = (512.0 / 8) * (512.0 / 8) / ((double)(fc->size / 8) * (fc->size / 8)) * 20.0 / fc->steps;
        int bad = 0, nl_st[3] = { 0, 0, 0 };
        for (int i = 0; i < rep.n; i++) {
            const MsFuseLayerReport *e = &rep.l[i];
            const MsParam *p = fuse_param(&m, e->layer);
            const int st = !strcmp(e->stage, "te") ? 0 : !strcmp(e->stage, "kv") ? 1 : 2;
            if (!p || p->ndim != 2) { bad = 1; continue; }
            off[st] += 4.0 * (double)e->rows * (st == 2 ? sp_scale : 1.0) * (double)(p->shape[0] + p->shape[1]);
            nl_st[st]++;
            f0 += e->f_w0; ff += e->f_fused;
            bad |= !(e->f_fused <= e->f_w0 * (1 + 1e-9)) || !isfinite(e->f_fused);
        }
        const double GiB = 1024.0 * 1024.0 * 1024.0;
        printf("%s threads=%d: te %.1f s, kv %.1f s, sp %.1f s (UNet sampling %d x %d steps %.1f s = %.2f s/step, of it "
               "Gram accumulation %.1f s = %.1f%%; fold %.1f s; solve %.1f s), total %.1f s = %.2f min (cpu %.1f s)",
               label, ms_get_threads(), rep.seconds[0], rep.seconds[1], rep.seconds[2], n, fc->steps, rep.sp_sample,
               rep.sp_sample / ((double)n * fc->steps), rep.sp_gram, rep.sp_sample > 0 ? 100.0 * rep.sp_gram / rep.sp_sample : 0.0,
               rep.sp_fold, rep.sp_solve, total, total / 60.0, cpu);
        if (load >= 0) printf("; load %.2f", load);
        printf("\n");
        printf("%s memory: peak RSS %.1f MiB beyond the %.1f MiB resident before (weights %.1f MiB f32 + LoRAs, tokenizer); "
               "official model %.2f GiB (te %.3f + kv %.4f + sp %.2f GiB = 4 B x sum over %d + %d + %d layers of rows x "
               "(d_in + d_out), sp rows at 512x512 x 20 steps)\n",
               label, peak >= 0 && base >= 0 ? peak - base : -1.0, base, weights, (off[0] + off[1] + off[2]) / GiB, off[0] / GiB,
               off[1] / GiB, off[2] / GiB, nl_st[0], nl_st[1], nl_st[2]);
        printf("%s objective: sum over %d layers f(W0) %.4e, fused %.4e%s\n", label, rep.n, f0, ff,
               bad ? " (SOME LAYER NOT <= f(W0) OR NOT FINITE)" : " (every layer <= f(W0))");
        fflush(stdout);
        ok = !bad;
    }
done:
    ms_fuse_report_free(&rep);
    for (int c = 0; c < n && c < 64; c++) { ms_free_aligned(te_mem[c]); arena_free(&un_ar[c]); }
    ms_free_aligned(new_emb);
    free(words); free(wptr); free(tnames); free(tptr); free(cname); free(has);
    if (tok_ok) clip_tokenizer_free(&tok);
    if (up_ok) unet_params_free(&up);
    ms_model_free(&m);
    return ok;
}

static int bench_fuse(MsRng *r) {
    int ok = 1;
    host_line();
    printf("fuse: SD 1.5 shapes, random weights, random rank-4 ED-LoRAs (%d words x 16 tokens per concept), gram for "
           "N in {%s}, lbfgs (%d text / %d UNet iterations) for N = %d; one run each, threads=%d\n", fuse_cfg.words,
           fuse_cfg.list, fuse_cfg.te_iters, fuse_cfg.unet_iters, fuse_cfg.lbfgs_n, ms_get_threads());
    fflush(stdout);
    for (const char *s = fuse_cfg.list; *s;) {
        int n = atoi(s);
        if (n > 0) ok &= bench_fuse_one(n, MS_FUSE_GRAM, r);
        s += strcspn(s, ",");
        s += *s == ',';
    }
    if (fuse_cfg.lbfgs_n > 0) ok &= bench_fuse_one(fuse_cfg.lbfgs_n, MS_FUSE_LBFGS, r);
    return ok;
}

enum { NET_TEXT = 1, NET_VAE = 2, NET_UNET = 4, NET_ALL = 7, NET_TRAIN = 8,   /* train: only when named */
       NET_REGIONAL_TINY = 16, NET_REGIONAL = 32, NET_FUSE = 64 };               /* regional, fuse: likewise */

/* Smallest first, so each case's peak RSS is its own (the reset cannot go below what is live). */
static int bench_nets(Bench *b, int which, int train_batch, int train_f16) {
    MsRng r;
    int ok = 1;
    ms_rng_seed(&r, 2305);
    printf("mixshow bench: networks, SD 1.5 shapes, random weights, threads 1 and %d, median of %d runs\n",
           b->threads[1], b->runs);
    if (!(b->peak[0] > 0)) bench_peaks(b);            /* --nets alone: the peaks the %% refer to */
    fflush(stdout);
    const int order[6] = { NET_TEXT, NET_VAE, NET_UNET, NET_TRAIN, NET_REGIONAL_TINY, NET_REGIONAL };
    for (int i = 0; i < 6; i++) {
        if (!(which & order[i])) continue;
        ms_gemm_scratch_free();
        ops_scratch_free();
        rss_peak_reset();
        if (order[i] >= NET_REGIONAL_TINY) { ok &= bench_regional(b, &r, order[i] == NET_REGIONAL_TINY); continue; }
        ok &= order[i] == NET_TEXT ? bench_text(b, &r) : order[i] == NET_VAE ? bench_vae(b, &r) :
              order[i] == NET_UNET ? bench_unet(b, &r) : bench_train(b, &r, train_batch, train_f16);
    }
    ms_gemm_scratch_free();
    ops_scratch_free();
    return ok;
}

static void usage(FILE *f) {
    fprintf(f, "usage: mixshow bench [--quick] [--attention | --gemm] [--runs K] [--nets[=unet,vae,text,train] | --all] [--train-batch B]\n"
               "                     [--under-load]\n"
               "                     [--train-weights f32|f16] [--compare-blas]\n\n"
               "Measures the FMA peak of this machine (register-only loop, per SIMD level, 1 thread\n"
               "and all threads), then prints one line per case and thread count:\n"
               "  gemm M=4096 K=320 N=320 threads=1: 183.2 GFLOP/s = 84.1%% of peak\n"
               "GEMM cases are C = A B^T (the layout of linear_forward); conv3x3 is stride 1, pad 1,\n"
               "batch 1; attention runs over B*H = 16 heads, self (T=4096, 1024, 256 at Dh = 40, 80, 160:\n"
               "the UNet's levels at 512x512) and cross (Tx77), forward and backward (FLOPs: QK^T and\n"
               "PV; backward S, dV, dP, dQ, dK). Each figure is the median of\n"
               "%d timed runs after one warm-up; the peak is that of the SIMD level in use.\n\n"
               "--nets times whole SD 1.5 networks with random weights made in memory (slow: minutes):\n"
               "  text-encoder sd15 [16,77] forward / forward+backward (ED-LoRA: rank-4 LoRA, 2 new tokens)\n"
               "  vae-decode sd15 512x512 (one 64x64 latent)\n"
               "  unet sd15 B=2 64x64 threads=1: 27.588 s/step  (3 runs 27.1..28.5, cpu 27.5 s, load 1.10,\n"
               "    1606.5 GFLOP, 58.2 GFLOP/s = 27.6%% of peak)\n"
               "    (one classifier-free-guidance step, inference: wall time, min..max, process CPU\n"
               "    time, 1-minute load average at the start; the matmul FLOPs of one call, as counted\n"
               "    by ms_flops_count: 2 M N K per GEMM and convolution, 2 Dh per query-key pair and\n"
               "    attention product; their rate at the median wall time and its share of the peak\n"
               "    measured first at that thread count), then a memory line: planned weight and\n"
               "arena bytes, and the peak resident set size (Linux /proc; omitted elsewhere).\n"
               "--nets=train (only when named; about 15 minutes): one ED-LoRA optimizer step of `mixshow\n"
               "train` (ms_trainer_step) with the 8101 potter config's options at 512x512, batch 1 (or\n"
               "--train-batch B): a host line (CPU, AVX-512 full or half rate), then\n"
               "  train sd15 B=1 64x64 threads=1: 40.123 s/step  (3 runs ..., after one warm-up step)\n"
               "a memory line, and the step's parts timed alone (VAE encode, text encoder forward +\n"
               "backward over 16 prompts, UNet forward, UNet backward, AdamW; rest = step - parts).\n"
               "Median of 3 runs unless --runs is given.\n"
               "--nets=regional (only when named; minutes): one CFG UNet step with 16 layer-wise contexts, plain\n"
               "and with 3 overlapping regions (issue 12), interleaved, at all threads; tiny model first:\n"
               "  regional sd15 B=2 64x64 regions=3 threads=2: 9.9 s/step (plain 9.5 s/step, ratio 1.04)  (...)\n"
               "then the official region_rewrite (global attention for every query) and 'one full attention\n"
               "pass per region' emulated on top, and a memory line (planned extra, peak RSS of each).\n"
               "--nets=regional-tiny: the tiny model only (seconds).\n"
               "--nets=fuse (only when named; SD 1.5: about an hour for the default set): `mixshow fuse` of\n"
               "N random rank-4 ED-LoRAs (2 words x 16 tokens, text encoder + UNet attention) on random SD 1.5\n"
               "weights, gram for N = 2, 5, 14 and lbfgs (500 / 50 iterations) for N = 2, one run each:\n"
               "  fuse sd15 gram N=2 512x512 20 steps threads=2: te .. s, kv .. s, sp .. s (UNet sampling ..,\n"
               "  Gram accumulation .., fold .., solve ..), total ..\n"
               "and a memory line (peak RSS beyond the weights; the official code's memory model: 4 B x\n"
               "rows x (d_in + d_out) summed over the fused layers, spatial rows at 512x512 x 20 steps).\n"
               "  --fuse-n 2,5,14  gram cases; --fuse-lbfgs N (0: none); --fuse-size S (multiple of 64) and\n"
               "  --fuse-steps K  for a quick run; --fuse-te-iters / --fuse-unet-iters; --fuse-words W\n"
               "tools/ref/bench_torch.py prints the same lines for PyTorch.\n\n"
               "  --quick         3 runs per kernel case (smoke test)\n", 7);
    fprintf(f, 
               "  --attention     the peak and the attention cases only\n"
               "  --gemm          the peak, GEMM and conv cases only (tools/ref/bench_openblas.py runs it)\n"
               "  --runs K        K timed runs per case (kernels: after a warm-up)\n"
               "  --nets          the network cases only; --nets=unet,vae,text,train picks some\n"
               "  --train-batch B batch size of the train case (1..8; the official configs use 2)\n"
               "  --train-weights f16  the train case with 16-bit weights kept in memory (the same\n"
               "                  random values rounded to F16, as --weights f16 keeps a 16-bit file)\n"
               "  --all           kernels, then networks, then --under-load\n"
               "  --under-load    the tiny model's CFG UNet step (models/tiny-sd; its latent size and 4x it)\n"
               "                  at 1 and all threads, alone and then while a child process spins on a\n"
               "                  core (lines end 's/step (loaded)'), and the loaded ratio all threads /\n"
               "                  1 thread (target <= 1)\n"
               "  --no-split      UNet steps with the CFG batch whole, every op split over the threads (the\n"
               "                  default, as sample: one part of the batch per thread when they divide it)\n"
               "  --compare-blas  not available (it would need dlopen): tools/ref/bench_openblas.py\n"
               "                  --mixshow ./mixshow prints OpenBLAS's sgemm beside these lines\n"
               "  --help          this text\n\n"
               "OMP_NUM_THREADS sets 'all threads'; timings are noisy while other work shares the cores.\n");
}

int cmd_bench(int argc, char **argv) {
    Bench b;
    int runs = 0, kernels = 1, nets = 0, train_batch = 1, train_f16 = 0, under_load = 0;
    b.runs = 7;
    b.peak[0] = b.peak[1] = 0.0;
    b.attention_only = 0;
    b.gemm_only = 0;
    b.split = 1;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--help") || !strcmp(argv[i], "-h")) { usage(stdout); return 0; }
        else if (!strcmp(argv[i], "--quick")) b.runs = 3;
        else if (!strcmp(argv[i], "--no-split")) b.split = 0;
        else if (!strcmp(argv[i], "--attention")) b.attention_only = 1;
        else if (!strcmp(argv[i], "--gemm")) b.gemm_only = 1;
        else if (!strcmp(argv[i], "--all")) { kernels = 1; nets = NET_ALL; under_load = 1; }
        else if (!strcmp(argv[i], "--under-load")) { under_load = 1; if (!nets) kernels = 0; }
        else if (!strcmp(argv[i], "--nets")) { kernels = 0; nets = NET_ALL; }
        else if (!strncmp(argv[i], "--nets=", 7)) {
            const char *s = argv[i] + 7;
            kernels = 0; nets = 0;
            while (*s) {
                size_t n = strcspn(s, ",");
                if (n == 4 && !strncmp(s, "unet", 4)) nets |= NET_UNET;
                else if (n == 3 && !strncmp(s, "vae", 3)) nets |= NET_VAE;
                else if (n == 4 && !strncmp(s, "text", 4)) nets |= NET_TEXT;
                else if (n == 5 && !strncmp(s, "train", 5)) nets |= NET_TRAIN;
                else if (n == 8 && !strncmp(s, "regional", 8)) nets |= NET_REGIONAL_TINY | NET_REGIONAL;
                else if (n == 13 && !strncmp(s, "regional-tiny", 13)) nets |= NET_REGIONAL_TINY;
                else if (n == 4 && !strncmp(s, "fuse", 4)) nets |= NET_FUSE;
                else { fprintf(stderr, "mixshow bench: --nets: unknown network '%.*s' (unet, vae, text, train, regional, regional-tiny, fuse)\n", (int)n, s); return 2; }
                s += n + (s[n] == ',');
            }
        } else if (!strcmp(argv[i], "--runs")) {
            if (i + 1 == argc) { fprintf(stderr, "mixshow bench: --runs wants a number (1..64)\n"); return 2; }
            const char *s = argv[++i];
            int k = 0;
            while (*s >= '0' && *s <= '9' && k <= 64) k = 10 * k + (*s++ - '0');
            if (*s || k < 1 || k > 64) { fprintf(stderr, "mixshow bench: --runs wants 1..64, got '%s'\n", argv[i]); return 2; }
            runs = k;
        } else if (!strcmp(argv[i], "--train-batch")) {
            if (i + 1 == argc || argv[i + 1][0] < '1' || argv[i + 1][0] > '8' || argv[i + 1][1]) {
                fprintf(stderr, "mixshow bench: --train-batch wants 1..8\n");
                return 2;
            }
            train_batch = argv[++i][0] - '0';
        } else if (!strcmp(argv[i], "--train-weights")) {
            if (i + 1 == argc || (strcmp(argv[i + 1], "f16") && strcmp(argv[i + 1], "f32"))) {
                fprintf(stderr, "mixshow bench: --train-weights wants f32 or f16\n");
                return 2;
            }
            train_f16 = !strcmp(argv[++i], "f16");
        } else if (!strcmp(argv[i], "--fuse-n")) {
            const char *v = i + 1 < argc ? argv[i + 1] : "";
            int good = *v != 0;
            for (const char *q = v; *q; q++) good &= (*q >= '0' && *q <= '9') || (*q == ',' && q[1] && q != v);
            for (const char *q = v; good && *q; q += strcspn(q, ","), q += *q == ',') good &= atoi(q) >= 1 && atoi(q) <= 64;
            if (!good) { fprintf(stderr, "mixshow bench: --fuse-n wants a list of concept counts 1..64 (e.g. 2,5,14)\n"); return 2; }
            fuse_cfg.list = argv[++i];
        } else if (!strcmp(argv[i], "--fuse-lbfgs") || !strcmp(argv[i], "--fuse-size") || !strcmp(argv[i], "--fuse-steps") ||
                   !strcmp(argv[i], "--fuse-te-iters") || !strcmp(argv[i], "--fuse-unet-iters") || !strcmp(argv[i], "--fuse-words")) {
            const char *opt = argv[i], *v = i + 1 < argc ? argv[i + 1] : "";
            char *end = NULL;
            long k = strtol(v, &end, 10);
            int lo = !strcmp(opt, "--fuse-lbfgs") ? 0 : !strcmp(opt, "--fuse-size") ? 64 : 1;
            long hi = !strcmp(opt, "--fuse-size") ? 2048 : !strcmp(opt, "--fuse-words") ? 4 : !strcmp(opt, "--fuse-lbfgs") ? 64 : 100000;
            if (!*v || *end || k < lo || k > hi || (!strcmp(opt, "--fuse-size") && k % 64)) {
                fprintf(stderr, "mixshow bench: %s wants %d..%ld%s, got '%s'\n", opt, lo, hi,
                        !strcmp(opt, "--fuse-size") ? " (a multiple of 64)" : "", v);
                return 2;
            }
            i++;
            if (!strcmp(opt, "--fuse-lbfgs")) fuse_cfg.lbfgs_n = (int)k;
            else if (!strcmp(opt, "--fuse-size")) fuse_cfg.size = (int)k;
            else if (!strcmp(opt, "--fuse-steps")) fuse_cfg.steps = (int)k;
            else if (!strcmp(opt, "--fuse-te-iters")) fuse_cfg.te_iters = (int)k;
            else if (!strcmp(opt, "--fuse-unet-iters")) fuse_cfg.unet_iters = (int)k;
            else fuse_cfg.words = (int)k;
        } else if (!strcmp(argv[i], "--compare-blas")) {
            fprintf(stderr, "mixshow bench: --compare-blas is not available (it would need dlopen; mixshow "
                            "depends on libc, libm and OpenMP only): tools/ref/bench_openblas.py --mixshow "
                            "./mixshow runs OpenBLAS's sgemm and this bench side by side\n");
            return 2;
        } else { fprintf(stderr, "mixshow bench: unknown option '%s'\n\n", argv[i]); usage(stderr); return 2; }
    }
    b.threads[0] = 1;
    b.threads[1] = ms_get_threads();
    if (kernels) {
        if (runs) b.runs = runs;
        bench_kernels(&b);
    }
    if (nets & ~NET_FUSE) {
        b.runs = runs ? runs : 3;
        if (!bench_nets(&b, nets & ~NET_FUSE, train_batch, train_f16)) return 1;
    }
    if (under_load) {
        MsRng r;
        ms_rng_seed(&r, 2305);
        b.runs = runs ? runs : 7;
        ms_gemm_scratch_free();
        ops_scratch_free();
        if (!bench_under_load(&b, &r)) return 1;
    }
    if (nets & NET_FUSE) {
        MsRng r;
        ms_rng_seed(&r, 2305);
        ms_gemm_scratch_free();
        ops_scratch_free();
        if (!bench_fuse(&r)) return 1;
    }
    return 0;
}
