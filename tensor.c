/* tensor.c — status/errors, arenas, threads, ops (forward + backward) and their kernels.
 *
 * The ONLY file of mixshow with intrinsics, OpenMP or pthreads. Every fast kernel has a scalar
 * twin named <op>_ref that is the definition (reductions in double) and that tests compare
 * against. Threads split independent outputs only, never a reduction, so results are
 * bit-identical for any thread count.
 */
#if !defined(_WIN32) && !defined(_POSIX_C_SOURCE)
#define _POSIX_C_SOURCE 200809L   /* clock_gettime; the POSIX section below is guarded */
#endif
#include "mixshow.h"

#include <float.h>
#include <limits.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#ifdef _OPENMP
#include <omp.h>
#define MS_PARALLEL_FOR _Pragma("omp parallel for schedule(static)")
#define MS_PARALLEL_FOR_DYN _Pragma("omp parallel for schedule(dynamic, 1)")
#else
#define MS_PARALLEL_FOR
#define MS_PARALLEL_FOR_DYN
#endif

/* ---------------------------------------------------------------------------------------- */
/* Status and errors                                                                         */
/* ---------------------------------------------------------------------------------------- */
#if defined(__STDC_VERSION__) && __STDC_VERSION__ >= 201112L && !defined(__TINYC__)
#define MS_THREAD_LOCAL _Thread_local
#else
#define MS_THREAD_LOCAL
#endif

static MS_THREAD_LOCAL char ms_err_buf[1024];

MsStatus ms_errorf(MsStatus code, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(ms_err_buf, sizeof ms_err_buf, fmt, ap);
    va_end(ap);
    return code;
}

const char *ms_last_error(void) { return ms_err_buf; }
void ms_clear_error(void) { ms_err_buf[0] = '\0'; }

const char *ms_status_name(MsStatus s) {
    switch (s) {
    case MS_OK: return "ok";
    case MS_ERR_IO: return "I/O error";
    case MS_ERR_FORMAT: return "format error";
    case MS_ERR_NOMEM: return "out of memory";
    case MS_ERR_ARG: return "bad argument";
    case MS_ERR_SHAPE: return "shape error";
    case MS_ERR_UNSUPPORTED: return "unsupported";
    }
    return "unknown error";
}

int ms_mul_ok(size_t a, size_t b, size_t *r) {
    if (b && a > SIZE_MAX / b) return 0;
    *r = a * b;
    return 1;
}

int ms_add_ok(size_t a, size_t b, size_t *r) {
    if (a > SIZE_MAX - b) return 0;
    *r = a + b;
    return 1;
}

/* ---------------------------------------------------------------------------------------- */
/* Memory                                                                                    */
/* ---------------------------------------------------------------------------------------- */
/* Aligned by hand (C11 aligned_alloc is missing on MSVC and needs size % align == 0): the
 * pointer malloc returned is stored just below the aligned block. */
void *ms_alloc_aligned(size_t n, size_t size) {
    size_t bytes, total;
    if (!ms_mul_ok(n, size, &bytes) || !ms_add_ok(bytes, 64 + sizeof(void *), &total)) return NULL;
    unsigned char *raw = (unsigned char *)malloc(total);
    if (!raw) return NULL;
    uintptr_t p = ((uintptr_t)(raw + sizeof(void *)) + 63) & ~(uintptr_t)63;
    memcpy((unsigned char *)p - sizeof(void *), &raw, sizeof(void *));
    return (void *)p;
}

void ms_free_aligned(void *p) {
    if (!p) return;
    void *raw;
    memcpy(&raw, (unsigned char *)p - sizeof(void *), sizeof(void *));
    free(raw);
}

MsStatus arena_init(Arena *a, size_t cap_bytes) {
    a->mem = ms_alloc_aligned(cap_bytes ? cap_bytes : 1, 1);
    a->base = (unsigned char *)a->mem;
    a->used = 0;
    a->cap = a->mem ? cap_bytes : 0;
    if (!a->mem) return ms_errorf(MS_ERR_NOMEM, "arena: cannot allocate %zu bytes", cap_bytes);
    return MS_OK;
}

void arena_free(Arena *a) {
    ms_free_aligned(a->mem);
    a->mem = NULL;
    a->base = NULL;
    a->used = a->cap = 0;
}

void *arena_alloc(Arena *a, size_t bytes) {
    size_t off = (a->used + 63) & ~(size_t)63;
    if (off < a->used || off > a->cap || bytes > a->cap - off) return NULL;
    a->used = off + bytes;
    return a->base + off;
}

float *arena_floats(Arena *a, size_t n) {
    if (n > SIZE_MAX / sizeof(float)) return NULL;
    return (float *)arena_alloc(a, n * sizeof(float));
}

size_t arena_mark(const Arena *a) { return a->used; }
void arena_reset(Arena *a, size_t mark) { if (mark <= a->used) a->used = mark; }

size_t tensor_numel(const Tensor *t) {
    size_t n = 1;
    for (int i = 0; i < t->ndim; i++) n *= (size_t)t->shape[i];
    return n;
}

/* ---------------------------------------------------------------------------------------- */
/* Threads and timing                                                                        */
/* ---------------------------------------------------------------------------------------- */
void ms_set_threads(int n) {
#ifdef _OPENMP
    omp_set_num_threads(n > 0 ? n : omp_get_num_procs());
#else
    (void)n;
#endif
}

int ms_get_threads(void) {
#ifdef _OPENMP
    return omp_get_max_threads();
#else
    return 1;
#endif
}

int ms_max_threads(void) {
#ifdef _OPENMP
    return omp_get_num_procs();
#else
    return 1;
#endif
}

/* POSIX section: clock_gettime(CLOCK_MONOTONIC); elsewhere C11 timespec_get or clock(). */
double ms_time(void) {
#if defined(_POSIX_TIMERS) && _POSIX_TIMERS > 0 && defined(CLOCK_MONOTONIC)
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
#elif defined(TIME_UTC)
    struct timespec ts;
    timespec_get(&ts, TIME_UTC);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
#else
    return (double)clock() / CLOCKS_PER_SEC;
#endif
}

/* ---------------------------------------------------------------------------------------- */
/* Deterministic test RNG: splitmix64, Box-Muller in double                                 */
/* ---------------------------------------------------------------------------------------- */
void ms_rng_seed(MsRng *r, uint64_t seed) { r->s = seed; }

uint64_t ms_rng_u64(MsRng *r) {
    uint64_t z = (r->s += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

double ms_rng_uniform(MsRng *r) { return (double)(ms_rng_u64(r) >> 11) * (1.0 / 9007199254740992.0); }

double ms_rng_normal(MsRng *r) {
    double u1 = ms_rng_uniform(r), u2 = ms_rng_uniform(r);
    if (u1 < 1e-300) u1 = 1e-300;
    return sqrt(-2.0 * log(u1)) * cos(2.0 * MS_PI * u2);
}

void ms_rng_fill_normal(MsRng *r, float *x, size_t n, float mean, float std) {
    for (size_t i = 0; i < n; i++) x[i] = (float)(mean + std * ms_rng_normal(r));
}

void ms_rng_fill_uniform(MsRng *r, float *x, size_t n, float lo, float hi) {
    for (size_t i = 0; i < n; i++) x[i] = (float)(lo + (hi - lo) * ms_rng_uniform(r));
}

/* @@SECTION gemm@@ — while several people work at once the sections live in wip/ and are
 * included here; they are pasted in place before the work lands. */
#include "wip/t_gemm.c"

/* @@SECTION ops@@ */
#include "wip/t_ops.c"
