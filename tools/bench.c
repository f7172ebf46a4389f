/* tools/bench.c — `mixshow bench`: the FMA peak of this machine, then GEMM, conv and attention
 * at Stable Diffusion 1.x shapes, each as GFLOP/s and as a share of the peak at the same SIMD
 * level and thread count. Every figure is the median of several timed runs after a warm-up. */
#include "mixshow.h"
#include "tools/tools.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

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

static void usage(FILE *f) {
    fprintf(f, "usage: mixshow bench [--quick] [--compare-blas]\n\n"
               "Measures the FMA peak of this machine (register-only loop, per SIMD level, 1 thread\n"
               "and all threads), then prints one line per case and thread count:\n"
               "  gemm M=4096 K=320 N=320 threads=1: 183.2 GFLOP/s = 84.1%% of peak\n"
               "GEMM cases are C = A B^T (the layout of linear_forward); conv3x3 is stride 1, pad 1,\n"
               "batch 1; attention is self-attention over B*H heads. Each figure is the median of\n"
               "%d timed runs after one warm-up; the peak is that of the SIMD level in use.\n\n"
               "  --quick         3 runs per case (smoke test)\n"
               "  --compare-blas  not available: it would need dlopen, which mixshow does not use\n"
               "  --help          this text\n\n"
               "OMP_NUM_THREADS sets 'all threads'; timings are noisy while other work shares the cores.\n", 7);
}

int cmd_bench(int argc, char **argv) {
    Bench b;
    b.runs = 7;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--help") || !strcmp(argv[i], "-h")) { usage(stdout); return 0; }
        else if (!strcmp(argv[i], "--quick")) b.runs = 3;
        else if (!strcmp(argv[i], "--compare-blas")) {
            fprintf(stderr, "mixshow bench: --compare-blas is not available (it would need dlopen; mixshow "
                            "depends on libc, libm and OpenMP only)\n");
            return 2;
        } else { fprintf(stderr, "mixshow bench: unknown option '%s'\n\n", argv[i]); usage(stderr); return 2; }
    }
    b.threads[0] = 1;
    b.threads[1] = ms_get_threads();
    MsSimd level = ms_simd();
    double secs = b.runs > 3 ? 0.3 : 0.1;
    printf("mixshow bench: kernels %s (detected %s), threads 1 and %d, median of %d runs\n",
           ms_simd_name(level), ms_simd_name(ms_simd_detected()), b.threads[1], b.runs);
    for (int l = MS_SIMD_SCALAR; l <= (int)MS_SIMD_AVX512; l++) {
        ms_set_simd((MsSimd)l);
        if (ms_simd() != (MsSimd)l) continue;
        for (int ti = 0; ti < 2; ti++) {
            if (ti == 1 && b.threads[1] == b.threads[0]) break;
            double p = ms_bench_fma_peak((MsSimd)l, b.threads[ti], secs);
            printf("peak %-8s threads=%d: %.1f GFLOP/s\n", ms_simd_name((MsSimd)l), b.threads[ti], p);
            if ((MsSimd)l == level) b.peak[ti] = p;
        }
    }
    ms_set_simd(level);
    if (b.threads[1] == b.threads[0]) b.peak[1] = b.peak[0];
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
        report(&b, &c, label);
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
        report(&b, &c, label);
        c.e = (float *)ms_alloc_aligned((size_t)c.C * 9 * P, sizeof(float));
        if (c.e) {                          /* the explicit column matrix, for comparison */
            c.kind = 2;
            snprintf(label, sizeof label, "conv3x3 %dx%dx%d->%d explicit-im2col", c.H, c.W, c.C, c.Co);
            report(&b, &c, label);
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
        report(&b, &c, "attention B*H=8 T=4096 Dh=40");
        ms_free_aligned(c.a); ms_free_aligned(c.b); ms_free_aligned(c.c); ms_free_aligned(c.d);
    }
    ms_gemm_scratch_free();
    return 0;
}
