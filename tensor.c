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
#define MS_PRAGMA_(x) _Pragma(#x)
#define MS_PRAGMA(x) MS_PRAGMA_(x)
#ifndef MS_SCHED
#define MS_SCHED static
#endif
#define MS_PARALLEL_FOR MS_PRAGMA(omp parallel for schedule(MS_SCHED))
#define MS_PARALLEL_FOR_DYN _Pragma("omp parallel for schedule(dynamic, 1)")
/* The same with the loop's work w (elements touched; a transcendental function counts 8):
 * below ms_par_min_work (MS_PAR_MIN_WORK, ms_set_parallel_min_work) the loop runs on the
 * calling thread alone, since waking the team and joining it costs more than the work (tens
 * of microseconds idle, up to a time slice when another process holds a core: issue 14).
 * Which thread runs an iteration never changes its bits. */
#define MS_PARALLEL_FOR_W(w) MS_PRAGMA(omp parallel for schedule(MS_SCHED) if((w) >= ms_par_min_work))
#define MS_PARALLEL_FOR_DYN_W(w) MS_PRAGMA(omp parallel for schedule(dynamic, 1) if((w) >= ms_par_min_work))
#else
#define MS_PARALLEL_FOR
#define MS_PARALLEL_FOR_DYN
#define MS_PARALLEL_FOR_W(w)
#define MS_PARALLEL_FOR_DYN_W(w)
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
#ifndef MS_PAR_MIN_WORK
#define MS_PAR_MIN_WORK 65536.0
#endif
static double ms_par_min_work = MS_PAR_MIN_WORK;   /* see MS_PARALLEL_FOR_W */

void ms_set_parallel_min_work(double w) { ms_par_min_work = w >= 0.0 ? w : MS_PAR_MIN_WORK; }

/* Load-aware team size (issue 14: "under load a 2-thread run is never slower than 1 thread").
 * A thread that shares its core with another process's busy thread gets half of that core, and
 * every parallel region then waits for it: a 2-thread UNet step ran 1.04-1.12x as long as a
 * 1-thread one. So, at most every MS_ADAPT_PERIOD seconds (checked where a GEMM sizes its team),
 * the CPU time the rest of the machine used since the last check is measured: the busy ticks of
 * /proc/stat's "cpu" line minus this process's CPU time; when others kept more than half a core
 * busy on average, the team is the cores they left free (at least 1), else the size asked for
 * (ms_set_threads). Results never depend on the team size (the invariant above); only the time
 * does. Linux only, and only while OpenMP threads wait passively (OMP_WAIT_POLICY=passive, as the
 * mixshow command sets it: spinning threads of ours would count as load), and not when
 * MS_ADAPT_THREADS=0 (tests/run.sh sets it: a test's thread count is the one it asks for).
 * ms_threads_for_load is the policy, alone (tests/test_core.c). */
#define MS_ADAPT_PERIOD 0.1
int ms_threads_for_load(int want, int ncpu, double others_cores) {
    if (want < 1) want = 1;
    if (others_cores <= 0.5) return want;
    int freec = ncpu - (int)(others_cores + 0.5);
    return freec < 1 ? 1 : freec < want ? freec : want;
}

#ifdef _OPENMP
static int ms_threads_user;                      /* what ms_set_threads asked for; 0: not yet */
#endif

void ms_set_threads(int n) {
#ifdef _OPENMP
    ms_threads_user = n > 0 ? n : omp_get_num_procs();
    omp_set_num_threads(ms_threads_user);
#else
    (void)n;
#endif
}

#if defined(_OPENMP) && defined(__linux__)
static int ms_adapt_on = -1;                     /* -1: not decided yet */
static double ms_adapt_t, ms_adapt_cpu, ms_adapt_busy;   /* at the last check: wall, ours, machine busy (s) */

/* the machine's busy CPU seconds so far (user nice system irq softirq steal of /proc/stat), < 0 if unreadable */
static double ms_machine_busy(void) {
    FILE *f = fopen("/proc/stat", "r");
    if (!f) return -1.0;
    unsigned long long v[8] = { 0 };
    int n = fscanf(f, "cpu %llu %llu %llu %llu %llu %llu %llu %llu", &v[0], &v[1], &v[2], &v[3], &v[4], &v[5], &v[6], &v[7]);
    fclose(f);
    if (n < 4) return -1.0;
    return (double)(v[0] + v[1] + v[2] + v[5] + v[6] + v[7]) / 100.0;   /* USER_HZ, 100 on Linux */
}
static double ms_process_cpu(void) {
    struct timespec ts;
    if (clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts)) return -1.0;
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}
static void ms_threads_adapt(void) {
    if (ms_adapt_on < 0) {
        const char *w = getenv("OMP_WAIT_POLICY"), *a = getenv("MS_ADAPT_THREADS");
        ms_adapt_on = w && (!strcmp(w, "passive") || !strcmp(w, "PASSIVE")) && !(a && !strcmp(a, "0"));
        if (!ms_threads_user) ms_threads_user = omp_get_max_threads();
    }
    if (!ms_adapt_on || omp_in_parallel() || ms_threads_user < 2) return;
    double t = ms_time();
    if (t - ms_adapt_t < MS_ADAPT_PERIOD) return;
    double cpu = ms_process_cpu(), busy = ms_machine_busy();
    if (cpu < 0.0 || busy < 0.0) { ms_adapt_on = 0; return; }
    if (ms_adapt_t > 0.0) {
        double others = (busy - ms_adapt_busy - (cpu - ms_adapt_cpu)) / (t - ms_adapt_t);
        omp_set_num_threads(ms_threads_for_load(ms_threads_user, omp_get_num_procs(), others));
    }
    ms_adapt_t = t; ms_adapt_cpu = cpu; ms_adapt_busy = busy;
}
#elif defined(_OPENMP)
static void ms_threads_adapt(void) {}
#endif

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

/* OpenMP runtimes read their wait policy once, when they are loaded: libgomp spins about
 * 300000 times (GOMP_SPINCOUNT) at every barrier and fork before it sleeps, libomp 200 ms
 * (KMP_BLOCKTIME). While another process holds a core, the spinning thread then holds the
 * other one and the thread it waits for gets a time slice at a time: the tiny model's UNet
 * step ran 35x slower on 2 threads than on 1 with a busy process beside it (issue 14). OMP_WAIT_POLICY=PASSIVE makes both runtimes
 * sleep at once; since it is read before main runs, a process that wants it must be started
 * with it: this sets it and execs /proc/self/exe with the same argv when none of those
 * variables is set (an explicit choice is left alone; MS_WAIT_POLICY_KEEP=1 skips the re-exec).
 * Returns only when nothing was done or the exec failed (then with the runtime's default). */
#if defined(_OPENMP) && defined(__linux__)
#include <unistd.h>
#endif
void ms_wait_policy_passive(char **argv) {
#if defined(_OPENMP) && defined(__linux__)
    if (!argv || !argv[0] || getenv("OMP_WAIT_POLICY") || getenv("GOMP_SPINCOUNT") || getenv("KMP_BLOCKTIME") ||
        getenv("MS_WAIT_POLICY_KEEP"))
        return;
    if (setenv("OMP_WAIT_POLICY", "PASSIVE", 1)) return;
    fflush(NULL);
    execv("/proc/self/exe", argv);
    unsetenv("OMP_WAIT_POLICY");
#else
    (void)argv;
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

/* ========================================================================================== */
/* GEMM, linear, conv2d: packed cache-blocked kernels, CPU dispatch, scalar _ref twins        */
/* ========================================================================================== */
/* How the fast kernels are chosen (README: "SIMD and threads")
 *
 *   Every kernel exists as plain C (the scalar path, always compiled, always correct).
 *   x86-64 / i386 with gcc or clang: the AVX2+FMA and AVX-512 micro-kernels are ordinary
 *     functions carrying a per-function `__attribute__((target("avx2,fma")))` or
 *     `target("avx512f")`, so the rest of the file is built for the baseline ISA and no
 *     -mavx flag is needed. At run time ms_simd_detected() asks the CPU (cpuid via
 *     __builtin_cpu_supports, which also checks with xgetbv that the OS saves the AVX / AVX-512
 *     register state) and the GEMM driver picks the best kernel; a binary built here therefore
 *     never executes AVX-512 on a CPU without it.
 *   aarch64: NEON is part of the base ISA, so the NEON kernel is chosen at compile time
 *     (__ARM_NEON && __aarch64__).
 *   -DMS_NO_SIMD compiles none of the above: scalar only. ms_set_simd() caps the level at run
 *     time (tests compare every level the CPU has against the scalar _ref definitions).
 *   All intrinsics and attributes sit inside MS_X86_KERNELS / MS_NEON_KERNELS guards below.
 *
 * GEMM layout (the BLIS scheme): C is cut into NC-wide column blocks and K into KC-deep
 * slices; each slice of op(B) is packed into NR-wide panels (k-major, zero-padded), each MC-row
 * block of op(A) into MR-tall panels. An MR x NR register tile of C is then a run of kc
 * rank-1 updates (broadcast one A value, FMA against NR/16 vectors of B). The packing
 * routines read any of the four transpose combinations and also the implicit im2col matrices
 * of the convolutions, so conv never materialises its column matrix.
 *
 * Determinism: the K slicing depends only on K and the SIMD level, and each C element is
 * computed by the same register kernel on zero-padded panels whether its tile is full or an
 * edge tile, so which thread computes which tile never changes a bit. Threads split C into a
 * grid of parts (see ms_gemm_op); K is never split.
 *
 * Memory: packing buffers come from a per-thread workspace (thread-local), allocated on first
 * use and grown only when a larger size is first needed; nothing is allocated per call after
 * that. ms_gemm_scratch_free() releases the calling thread's workspace.
 */
#if defined(__GNUC__) && !defined(__TINYC__) && (defined(__x86_64__) || defined(__i386__)) && !defined(MS_NO_SIMD)
#define MS_X86_KERNELS 1
#include <immintrin.h>
#define MS_TARGET_AVX2 __attribute__((target("avx2,fma")))
#define MS_TARGET_AVX512 __attribute__((target("avx512f")))
#endif
#if defined(__ARM_NEON) && defined(__aarch64__) && !defined(MS_NO_SIMD)
#define MS_NEON_KERNELS 1
#include <arm_neon.h>
#endif

#ifdef _OPENMP
#define MS_OMP_PARALLEL_FOR_NT _Pragma("omp parallel for schedule(static, 1) num_threads(nt) if(ms_par_)")
static void ms_threads_adapt(void);
static int ms_team_max(void) {
    if (omp_in_parallel()) return 1;
    ms_threads_adapt();
    return omp_get_max_threads();
}
static int ms_par_level(void) { return omp_get_level(); }   /* enclosing regions, active or not */
#else
#define MS_OMP_PARALLEL_FOR_NT
static int ms_team_max(void) { return 1; }
static int ms_par_level(void) { return 0; }
#endif

/* ---- Matmul FLOP counter (mixshow.h: ms_flops_enable) ----
 * Counted per call on the calling thread, before any parallel region: never inside one (the
 * GEMMs some ops run per task) nor inside an op that counted its own products (mute), so the
 * count is the same for every thread count, with and without OpenMP. */
static int ms_flops_on;
static MS_THREAD_LOCAL int ms_flops_mute;
static double ms_flops_n;
static MS_THREAD_LOCAL int ms_task_level;     /* omp_get_level() inside an ms_run_tasks task, else 0 */
static MS_THREAD_LOCAL int ms_task_slot;      /* that task's thread number: its attention scratch slot */
void ms_flops_enable(int on) { ms_flops_on = on; }
void ms_flops_reset(void) { ms_flops_n = 0.0; }
double ms_flops_count(void) { return ms_flops_n; }
static void ms_flops_add(double f) {          /* counts are whole numbers: any order sums exactly */
    if (!ms_flops_on || ms_flops_mute || ms_par_level() != ms_task_level) return;
#ifdef _OPENMP
    if (ms_task_level) {
        _Pragma("omp atomic")
        ms_flops_n += f;
        return;
    }
#endif
    ms_flops_n += f;
}

/* ---- Tasks: whole independent computations side by side (mixshow.h: ms_run_tasks) ----
 * Task i runs on thread i of one team with every op inside it on that thread alone (its
 * nthreads ICV set to 1), so the data a task writes is the data it reads next, in the cache of
 * its own core, and there is one fork and one join for the whole computation instead of one
 * per op. Per-thread state stays apart: GEMM workspaces (ms_work_of: the caller's thread-local
 * ones, a table for the other task threads) and attention scratch (ops_slot) are indexed by
 * ms_task_slot, the FLOP count is added atomically at the task's level. */
static int ops_ws_grow_slots(int n);
#ifdef _OPENMP
static void ms_task_work_grow(int n);
#endif
int ms_task_team(void) { return ms_team_max(); }
void ms_run_tasks(int n, void (*fn)(void *ctx, int i), void *ctx) {
#ifdef _OPENMP
    if (n > 1 && !omp_in_parallel()) {
        (void)ops_ws_grow_slots(n);               /* failing: attention streams (same bits) */
        ms_task_work_grow(n);
        _Pragma("omp parallel num_threads(n)")
        {
            int t = omp_get_thread_num(), nt = omp_get_num_threads();
            ms_task_slot = t;
            ms_task_level = omp_get_level();
            omp_set_num_threads(1);               /* this implicit task's ICV: ops stay on this thread */
            for (int i = t; i < n; i += nt) fn(ctx, i);
            ms_task_slot = 0;
            ms_task_level = 0;
        }
        return;
    }
#endif
    for (int i = 0; i < n; i++) fn(ctx, i);
}

/* ---------------------------------------------------------------------------------------- */
/* CPU features and SIMD dispatch                                                            */
/* ---------------------------------------------------------------------------------------- */
static MsSimd ms_simd_cap = MS_SIMD_AVX512;   /* ms_set_simd() lowers it; read-only otherwise */

MsSimd ms_simd_detected(void) {
#if defined(MS_X86_KERNELS)
    /* libgcc / compiler-rt fill these flags once at start-up from cpuid + xgetbv. */
    if (__builtin_cpu_supports("avx512f")) return MS_SIMD_AVX512;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return MS_SIMD_AVX2;
    return MS_SIMD_SCALAR;
#elif defined(MS_NEON_KERNELS)
    return MS_SIMD_NEON;
#else
    return MS_SIMD_SCALAR;
#endif
}

MsSimd ms_simd(void) {
    MsSimd d = ms_simd_detected(), l = d < ms_simd_cap ? d : ms_simd_cap;
#if defined(MS_X86_KERNELS)
    if (l == MS_SIMD_NEON) l = MS_SIMD_SCALAR;     /* no NEON kernel on x86 */
#endif
    return l;
}

void ms_set_simd(MsSimd level) {
    ms_simd_cap = level < MS_SIMD_SCALAR ? MS_SIMD_SCALAR : level > MS_SIMD_AVX512 ? MS_SIMD_AVX512 : level;
}

const char *ms_simd_name(MsSimd level) {
    switch (level) {
    case MS_SIMD_SCALAR: return "scalar";
    case MS_SIMD_NEON: return "neon";
    case MS_SIMD_AVX2: return "avx2+fma";
    case MS_SIMD_AVX512: return "avx512";
    }
    return "?";
}

/* ---------------------------------------------------------------------------------------- */
/* Per-thread grow-once workspace                                                            */
/* ---------------------------------------------------------------------------------------- */
typedef struct { float *p; size_t cap; } MsWork;
static MS_THREAD_LOCAL MsWork ms_work_gemm;    /* packed B slice + one packed A block per thread */
static MS_THREAD_LOCAL MsWork ms_work_conv;    /* column chunk of the strided conv backward */
static MS_THREAD_LOCAL MsWork ms_work_tr;      /* C^T of the small-M path (ms_gemm_small_m) */

/* MS_GEMM_FAST_* flags (mixshow.h); 0 is the plain packed driver. */
#ifndef MS_GEMM_FAST_DEFAULT
#define MS_GEMM_FAST_DEFAULT MS_GEMM_FAST_ALL
#endif
static int ms_gemm_fast = MS_GEMM_FAST_DEFAULT;
void ms_gemm_set_fast(int flags) { ms_gemm_fast = flags & MS_GEMM_FAST_ALL; }

/* Task threads other than the caller's (ms_run_tasks slot t >= 1) keep theirs in a table,
 * 3 per slot (gemm, conv, tr), grown before the tasks start: an OpenMP runtime may end a pool
 * thread later (libgomp does when a smaller team follows), and a thread-local pointer would
 * be lost with it. */
static MsWork *ms_task_work;                   /* entries: 3 per task slot (ms_task_work_n) */
static int ms_task_work_n;
static MsWork *ms_work_of(int kind) {
    if (ms_task_slot > 0 && 3 * ms_task_slot < ms_task_work_n) return &ms_task_work[3 * ms_task_slot + kind];
    return kind == 0 ? &ms_work_gemm : kind == 1 ? &ms_work_conv : &ms_work_tr;
}

/* A table of workspaces (*t, *n entries) grown to at least n entries, the new ones empty; 1, or
 * 0 when realloc fails (the table is then unchanged). Serial code only: the table moves. */
static int ms_work_table_grow(MsWork **t, int *have, int n) {
    if (n <= *have) return 1;
    MsWork *w = (MsWork *)realloc(*t, (size_t)n * sizeof *w);
    if (!w) return 0;
    for (int i = *have; i < n; i++) { w[i].p = NULL; w[i].cap = 0; }
    *t = w;
    *have = n;
    return 1;
}
#ifdef _OPENMP
static void ms_task_work_grow(int n) {           /* failing: the task threads use thread-local ones */
    (void)ms_work_table_grow(&ms_task_work, &ms_task_work_n, 3 * n);
}
#endif

/* Returns at least n floats (64-byte aligned), reallocating only when n exceeds what this
 * thread has already; NULL when the allocation fails. */
static float *ms_work_get(MsWork *w, size_t n) {
    if (n > w->cap) {
        ms_free_aligned(w->p);
        w->p = (float *)ms_alloc_aligned(n, sizeof(float));
        w->cap = w->p ? n : 0;
    }
    return w->p;
}

static void ms_work_free(MsWork *w) { ms_free_aligned(w->p); w->p = NULL; w->cap = 0; }

/* The calling thread's workspaces and those of the ms_run_tasks task threads (the table). */
void ms_gemm_scratch_free(void) {
    ms_work_free(&ms_work_gemm); ms_work_free(&ms_work_conv); ms_work_free(&ms_work_tr);
    for (int i = 0; i < ms_task_work_n; i++) ms_work_free(&ms_task_work[i]);
    free(ms_task_work);
    ms_task_work = NULL;
    ms_task_work_n = 0;
}

/* ---------------------------------------------------------------------------------------- */
/* Operands: what the packing routines can read                                              */
/* ---------------------------------------------------------------------------------------- */
/* op(A) is (M,K), op(B) is (K,N). Besides dense matrices, the convolutions use implicit ones:
 *   IM2COL   (B)  rows kk = (c,ky,kx), cols j = (oy,ox):  img[c, oy*s-pt+ky, ox*s-pl+kx] or 0
 *   IM2COL_T (B)  rows q = (n,oy,ox), cols kk = (c,ky,kx): the same value from image n
 *   BATCHK   (A)  rows co, cols q = (n,p):                 p[n*nstride + co*ld + p]
 *   WFLIP    (A)  rows c, cols kk = (co,ky,kx):            w[co, c, k-1-ky, k-1-kx]      */
enum { MS_OPD_DENSE, MS_OPD_IM2COL, MS_OPD_IM2COL_T, MS_OPD_BATCHK, MS_OPD_WFLIP };
typedef struct {
    int kind, trans;
    const float *p;
    size_t ld;
    int C, H, W, k, s, pt, pl, Ho, Wo;   /* image geometry (IM2COL*, WFLIP uses C and k) */
    int Co;                              /* WFLIP: output channels of the forward conv */
    int P;                               /* BATCHK: columns per batch item */
    size_t nstride;                      /* BATCHK, IM2COL_T: floats between batch items */
} MsOperand;

static MsOperand ms_dense(const float *p, size_t ld, int trans) {
    MsOperand o;
    memset(&o, 0, sizeof o);
    o.kind = MS_OPD_DENSE; o.p = p; o.ld = ld; o.trans = trans;
    return o;
}

#if defined(MS_X86_KERNELS)
/* Transposes 16 zmm rows r0..r15 in place (64 shuffles): unpack 32-bit and 64-bit pairs within
 * 128-bit lanes, then two rounds of 128-bit lane shuffles. */
#define MS_TR16_PAIR(a, b, x, y) { __m512 u_ = _mm512_unpacklo_ps(a, b), v_ = _mm512_unpackhi_ps(a, b); \
    x = u_; y = v_; }
#define MS_TR16_PD(a, b, x, y) { __m512d a_ = _mm512_castps_pd(a), b_ = _mm512_castps_pd(b); \
    x = _mm512_castpd_ps(_mm512_unpacklo_pd(a_, b_)); y = _mm512_castpd_ps(_mm512_unpackhi_pd(a_, b_)); }
#define MS_TR16(r) { __m512 t_[16]; \
    MS_TR16_PAIR(r[0], r[1], t_[0], t_[1]) MS_TR16_PAIR(r[2], r[3], t_[2], t_[3]) \
    MS_TR16_PAIR(r[4], r[5], t_[4], t_[5]) MS_TR16_PAIR(r[6], r[7], t_[6], t_[7]) \
    MS_TR16_PAIR(r[8], r[9], t_[8], t_[9]) MS_TR16_PAIR(r[10], r[11], t_[10], t_[11]) \
    MS_TR16_PAIR(r[12], r[13], t_[12], t_[13]) MS_TR16_PAIR(r[14], r[15], t_[14], t_[15]) \
    MS_TR16_PD(t_[0], t_[2], r[0], r[1]) MS_TR16_PD(t_[1], t_[3], r[2], r[3]) \
    MS_TR16_PD(t_[4], t_[6], r[4], r[5]) MS_TR16_PD(t_[5], t_[7], r[6], r[7]) \
    MS_TR16_PD(t_[8], t_[10], r[8], r[9]) MS_TR16_PD(t_[9], t_[11], r[10], r[11]) \
    MS_TR16_PD(t_[12], t_[14], r[12], r[13]) MS_TR16_PD(t_[13], t_[15], r[14], r[15]) \
    t_[0] = _mm512_shuffle_f32x4(r[0], r[4], 0x88); t_[1] = _mm512_shuffle_f32x4(r[1], r[5], 0x88); \
    t_[2] = _mm512_shuffle_f32x4(r[2], r[6], 0x88); t_[3] = _mm512_shuffle_f32x4(r[3], r[7], 0x88); \
    t_[4] = _mm512_shuffle_f32x4(r[0], r[4], 0xdd); t_[5] = _mm512_shuffle_f32x4(r[1], r[5], 0xdd); \
    t_[6] = _mm512_shuffle_f32x4(r[2], r[6], 0xdd); t_[7] = _mm512_shuffle_f32x4(r[3], r[7], 0xdd); \
    t_[8] = _mm512_shuffle_f32x4(r[8], r[12], 0x88); t_[9] = _mm512_shuffle_f32x4(r[9], r[13], 0x88); \
    t_[10] = _mm512_shuffle_f32x4(r[10], r[14], 0x88); t_[11] = _mm512_shuffle_f32x4(r[11], r[15], 0x88); \
    t_[12] = _mm512_shuffle_f32x4(r[8], r[12], 0xdd); t_[13] = _mm512_shuffle_f32x4(r[9], r[13], 0xdd); \
    t_[14] = _mm512_shuffle_f32x4(r[10], r[14], 0xdd); t_[15] = _mm512_shuffle_f32x4(r[11], r[15], 0xdd); \
    r[0] = _mm512_shuffle_f32x4(t_[0], t_[8], 0x88); r[1] = _mm512_shuffle_f32x4(t_[1], t_[9], 0x88); \
    r[2] = _mm512_shuffle_f32x4(t_[2], t_[10], 0x88); r[3] = _mm512_shuffle_f32x4(t_[3], t_[11], 0x88); \
    r[4] = _mm512_shuffle_f32x4(t_[4], t_[12], 0x88); r[5] = _mm512_shuffle_f32x4(t_[5], t_[13], 0x88); \
    r[6] = _mm512_shuffle_f32x4(t_[6], t_[14], 0x88); r[7] = _mm512_shuffle_f32x4(t_[7], t_[15], 0x88); \
    r[8] = _mm512_shuffle_f32x4(t_[0], t_[8], 0xdd); r[9] = _mm512_shuffle_f32x4(t_[1], t_[9], 0xdd); \
    r[10] = _mm512_shuffle_f32x4(t_[2], t_[10], 0xdd); r[11] = _mm512_shuffle_f32x4(t_[3], t_[11], 0xdd); \
    r[12] = _mm512_shuffle_f32x4(t_[4], t_[12], 0xdd); r[13] = _mm512_shuffle_f32x4(t_[5], t_[13], 0xdd); \
    r[14] = _mm512_shuffle_f32x4(t_[6], t_[14], 0xdd); r[15] = _mm512_shuffle_f32x4(t_[7], t_[15], 0xdd); }
#define MS_R16(X) X(0) X(1) X(2) X(3) X(4) X(5) X(6) X(7) X(8) X(9) X(10) X(11) X(12) X(13) X(14) X(15)

static __mmask16 ms_mask16(int n) { return n >= 16 ? (__mmask16)0xFFFF : n <= 0 ? (__mmask16)0 : (__mmask16)((1u << n) - 1u); }

/* dst[j*ldd + i] = i < rv ? src[i*lds + j] : 0, for i < rs and j < cols (rv <= rs): a copy,
 * 16 x 16 blocks through registers, masked at the edges (masked-off lanes are never read). */
MS_TARGET_AVX512
static void ms_transpose_avx512(float *dst, size_t ldd, const float *src, size_t lds, int rv, int rs, int cols) {
    for (int i0 = 0; i0 < rs; i0 += 16) {
        int nv = rv - i0;
        __mmask16 sm = ms_mask16(rs - i0);
        for (int j0 = 0; j0 < cols; j0 += 16) {
            int nj = cols - j0;
            __mmask16 jm = ms_mask16(nj);
            __m512 r[16];
#define MS_TR_LD(i) r[i] = (i) < nv ? _mm512_maskz_loadu_ps(jm, src + (size_t)(i0 + (i)) * lds + j0) : _mm512_setzero_ps();
#define MS_TR_ST(i) if ((i) < nj) _mm512_mask_storeu_ps(dst + (size_t)(j0 + (i)) * ldd + i0, sm, r[i]);
            MS_R16(MS_TR_LD)
            MS_TR16(r)
            MS_R16(MS_TR_ST)
#undef MS_TR_LD
#undef MS_TR_ST
        }
    }
}

/* One row (k) of an IM2COL panel, stride 1: dk[c] = img[iy, ix0 + c] or 0 outside the image,
 * for c < n. Masked loads read only pixels inside the row; the expand-load fills the lanes to
 * the right of the left border from the row's first pixel on. */
MS_TARGET_AVX512
static void ms_im2col_run_avx512(float *dk, const float *srow, int W, int ix0, int n) {
    for (int t = 0; t < n; t += 16) {
        int ix = ix0 + t, lo = ix < 0 ? -ix : 0, hi = W - ix;
        int nn = n - t < 16 ? n - t : 16;
        if (hi > nn) hi = nn;
        __m512 v = _mm512_setzero_ps();
        if (lo < hi) {
            __mmask16 m = (__mmask16)(ms_mask16(hi) & ~ms_mask16(lo));
            v = lo ? _mm512_maskz_expandloadu_ps(m, srow) : _mm512_maskz_loadu_ps(m, srow + ix);
        }
        _mm512_mask_storeu_ps(dk + t, ms_mask16(nn), v);
    }
}
#endif /* MS_X86_KERNELS */

#ifndef MS_IM2COL_PF
#define MS_IM2COL_PF 3
#endif
#if defined(MS_X86_KERNELS)
/* An IM2COL panel (stride 1) whose columns lie in one output row: row k of the panel is a
 * shifted piece of one input row, zero outside it. The masks and shifts depend only on kx, so
 * they are set up once; then each row is NR/16 masked loads (+ a lane shift at the left border)
 * and full stores. Returns 0 (nothing written) for other panels. */
MS_TARGET_AVX512
static int ms_im2col_row_avx512(float *d, const MsOperand *B, int k0, int kc, int j0, int nc, int NR) {
    enum { MAXK = 5, MAXV = 4 };
    int oy0 = j0 / B->Wo, ox0 = j0 % B->Wo, nv = NR / 16;
    if (ox0 + nc > B->Wo || B->k > MAXK || nv > MAXV || NR % 16) return 0;
    __mmask16 lm[MAXK][MAXV];
    int off[MAXK][MAXV], sh[MAXK][MAXV];
    for (int kx = 0; kx < B->k; kx++)
        for (int v = 0; v < nv; v++) {
            int ix = ox0 - B->pl + kx + 16 * v, lo = ix < 0 ? -ix : 0, hi = B->W - ix, n = nc - 16 * v;
            if (hi > n) hi = n;
            if (hi > 16) hi = 16;
            if (lo > 16) lo = 16;
            lm[kx][v] = lo < hi ? ms_mask16(hi - lo) : 0;   /* pixels ix+lo .. ix+hi-1 */
            off[kx][v] = lo < hi ? ix + lo : 0;
            sh[kx][v] = lo;                                 /* they go to lanes lo .. hi-1 */
        }
    const __m512i iota = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
    int kk2 = B->k * B->k, ci = k0 / kk2, ky = (k0 % kk2) / B->k, kx = k0 % B->k;
    for (int k = 0; k < kc; k++) {
        float *dk = d + (size_t)k * NR;
        int iy = oy0 - B->pt + ky;
        if (iy < 0 || iy >= B->H) {
            for (int v = 0; v < nv; v++) _mm512_storeu_ps(dk + 16 * v, _mm512_setzero_ps());
        } else {
            const float *srow = B->p + ((size_t)ci * B->H + iy) * B->W;
            for (int v = 0; v < nv; v++) {
                __m512 x = _mm512_maskz_loadu_ps(lm[kx][v], srow + off[kx][v]);
                if (sh[kx][v]) x = _mm512_maskz_permutexvar_ps((__mmask16)(lm[kx][v] << sh[kx][v]),
                                                               _mm512_sub_epi32(iota, _mm512_set1_epi32(sh[kx][v])), x);
                _mm512_storeu_ps(dk + 16 * v, x);
            }
            if (kx == 0 && ci + MS_IM2COL_PF < B->C) {  /* a later channel's row: a jump the
                                                           hardware prefetcher does not follow */
                const char *q = (const char *)(srow + (size_t)MS_IM2COL_PF * B->H * B->W + off[0][0]);
                for (int t = 0; t <= nc; t += 16) _mm_prefetch(q + 4 * t, _MM_HINT_T0);
            }
        }
        if (++kx == B->k) { kx = 0; if (++ky == B->k) { ky = 0; ci++; } }
    }
    return 1;
}
#endif

/* Packs rows i0..i0+mc of op(A), columns k0..k0+kc, into MR-tall k-major panels
 * (dst[panel][k][r]); rows past mc are zero. */
static void ms_pack_a(float *dst, const MsOperand *A, int i0, int mc, int k0, int kc, int MR) {
    for (int ip = 0; ip < mc; ip += MR) {
        int rows = mc - ip < MR ? mc - ip : MR;
        float *d = dst + (size_t)ip * kc;
#if defined(MS_X86_KERNELS)
        /* row-major A (a weight, or the output gradient of a conv's weight GEMM): a transpose of
         * rows x kc into kc x MR, 16 x 16 blocks in registers (rows past `rows` zero) */
        if ((ms_gemm_fast & MS_GEMM_FAST_PACK) && ms_simd() >= MS_SIMD_AVX512) {
            if (A->kind == MS_OPD_DENSE && !A->trans) {
                ms_transpose_avx512(d, (size_t)MR, A->p + (size_t)(i0 + ip) * A->ld + k0, A->ld, rows, MR, kc);
                continue;
            }
            if (A->kind == MS_OPD_BATCHK) {    /* k runs over images n and positions q: one
                                                  transpose per image's run of positions */
                int n = k0 / A->P, q = k0 % A->P;
                for (int k = 0; k < kc;) {
                    int run = A->P - q < kc - k ? A->P - q : kc - k;
                    ms_transpose_avx512(d + (size_t)k * MR, (size_t)MR,
                                        A->p + (size_t)(i0 + ip) * A->ld + (size_t)n * A->nstride + q, A->ld, rows, MR, run);
                    k += run; q = 0; n++;
                }
                continue;
            }
        }
#endif
        if (rows < MR)
            for (int k = 0; k < kc; k++)
                for (int r = rows; r < MR; r++) d[(size_t)k * MR + r] = 0.0f;
        if (A->kind == MS_OPD_DENSE && A->trans) {
            for (int k = 0; k < kc; k++) {
                const float *s = A->p + (size_t)(k0 + k) * A->ld + (i0 + ip);
                for (int r = 0; r < rows; r++) d[(size_t)k * MR + r] = s[r];
            }
        } else if (A->kind == MS_OPD_DENSE) {
            for (int r = 0; r < rows; r++) {
                const float *s = A->p + (size_t)(i0 + ip + r) * A->ld + k0;
                for (int k = 0; k < kc; k++) d[(size_t)k * MR + r] = s[k];
            }
        } else if (A->kind == MS_OPD_BATCHK) {
            for (int r = 0; r < rows; r++) {
                int n = k0 / A->P, q = k0 % A->P;
                const float *row = A->p + (size_t)(i0 + ip + r) * A->ld;
                for (int k = 0; k < kc; k++) {
                    d[(size_t)k * MR + r] = row[(size_t)n * A->nstride + q];
                    if (++q == A->P) { q = 0; n++; }
                }
            }
        } else { /* MS_OPD_WFLIP */
            int kk2 = A->k * A->k;
            for (int r = 0; r < rows; r++) {
                int c = i0 + ip + r, co = k0 / kk2, t = k0 % kk2, ky = t / A->k, kx = t % A->k;
                for (int k = 0; k < kc; k++) {
                    d[(size_t)k * MR + r] = A->p[(((size_t)co * A->C + c) * A->k + (A->k - 1 - ky)) * A->k + (A->k - 1 - kx)];
                    if (++kx == A->k) { kx = 0; if (++ky == A->k) { ky = 0; co++; } }
                }
            }
        }
    }
}

/* One NR-wide panel of op(B): rows k0..k0+kc, columns j0..j0+nc (nc <= NR), dst[k][c],
 * columns past nc are zero. */
static void ms_pack_b(float *d, const MsOperand *B, int k0, int kc, int j0, int nc, int NR) {
#if defined(MS_X86_KERNELS)
    if ((ms_gemm_fast & MS_GEMM_FAST_PACK) && NR % 16 == 0 && ms_simd() >= MS_SIMD_AVX512) {
        if (B->kind == MS_OPD_DENSE && B->trans) {
            ms_transpose_avx512(d, (size_t)NR, B->p + (size_t)j0 * B->ld + k0, B->ld, nc, NR, kc);
            return;
        }
        if (B->kind == MS_OPD_IM2COL && B->s == 1 && ms_im2col_row_avx512(d, B, k0, kc, j0, nc, NR)) return;
        if (B->kind == MS_OPD_IM2COL_T && B->s == 1) {
            /* the weight-gradient GEMM's B: column c = (ci, ky, kx), row k = (n, oy, ox). Walking k
             * along a column reads runs of an input row, so 16 columns at a time are copied as
             * runs into t[c][k] and transposed into the panel (columns past nc zero) */
            enum { TK = 256 };
            float t[16 * TK];
            int kk2 = B->k * B->k, P = B->Ho * B->Wo;
            for (int c0 = 0; c0 < NR; c0 += 16) {
                int ncol = nc - c0 < 16 ? (nc - c0 > 0 ? nc - c0 : 0) : 16;
                for (int kb = 0; kb < kc; kb += TK) {
                    int ke = kc - kb < TK ? kc - kb : TK;
                    for (int c = 0; c < ncol; c++) {
                        int kk = j0 + c0 + c, ci = kk / kk2, ky = (kk % kk2) / B->k, kx = kk % B->k;
                        int q = (k0 + kb) % P, n = (k0 + kb) / P, oy = q / B->Wo, ox = q % B->Wo;
                        float *tc = t + (size_t)c * ke;
                        for (int k = 0; k < ke;) {      /* one output row's run at a time */
                            int run = B->Wo - ox < ke - k ? B->Wo - ox : ke - k, iy = oy - B->pt + ky;
                            if (iy < 0 || iy >= B->H) memset(tc + k, 0, (size_t)run * sizeof(float));
                            else ms_im2col_run_avx512(tc + k, B->p + (size_t)n * B->nstride + ((size_t)ci * B->H + iy) * B->W,
                                                      B->W, ox - B->pl + kx, run);
                            k += run; ox = 0;
                            if (++oy == B->Ho) { oy = 0; n++; }
                        }
                    }
                    ms_transpose_avx512(d + (size_t)kb * NR + c0, (size_t)NR, t, (size_t)ke, ncol, 16, ke);
                }
            }
            return;
        }
        if (B->kind == MS_OPD_IM2COL && B->s == 1) {
            int kk2 = B->k * B->k, ci = k0 / kk2, ky = (k0 % kk2) / B->k, kx = k0 % B->k;
            int oy0 = j0 / B->Wo, ox0 = j0 % B->Wo;
            for (int k = 0; k < kc; k++) {             /* (ci, ky, kx) of row k0 + k */
                const float *plane = B->p + (size_t)ci * B->H * B->W;
                float *dk = d + (size_t)k * NR;
                int oy = oy0, ox = ox0, c = 0;
                while (c < nc) {
                    int run = B->Wo - ox < nc - c ? B->Wo - ox : nc - c, iy = oy - B->pt + ky;
                    if (iy < 0 || iy >= B->H) memset(dk + c, 0, (size_t)run * sizeof(float));
                    else {
                        const float *srow = plane + (size_t)iy * B->W;
                        int ix = ox - B->pl + kx;
                        ms_im2col_run_avx512(dk + c, srow, B->W, ix, run);
                        if (kx == 0 && ci + 1 < B->C) {  /* the next channel's row: a jump the
                                                            hardware prefetcher does not follow */
                            const char *q = (const char *)(srow + (size_t)B->H * B->W + (ix < 0 ? 0 : ix));
                            for (int t = 0; t <= run; t += 16) _mm_prefetch(q + 4 * t, _MM_HINT_T0);
                        }
                    }
                    c += run; ox = 0; oy++;
                }
                if (nc < NR) memset(dk + nc, 0, (size_t)(NR - nc) * sizeof(float));
                if (++kx == B->k) { kx = 0; if (++ky == B->k) { ky = 0; ci++; } }
            }
            return;
        }
    }
#endif
    if (nc < NR)
        for (int k = 0; k < kc; k++)
            for (int c = nc; c < NR; c++) d[(size_t)k * NR + c] = 0.0f;
    if (B->kind == MS_OPD_DENSE && !B->trans) {
        for (int k = 0; k < kc; k++) memcpy(d + (size_t)k * NR, B->p + (size_t)(k0 + k) * B->ld + j0, (size_t)nc * sizeof(float));
    } else if (B->kind == MS_OPD_DENSE) {
        /* a transpose, in chunks of 16 k so that the 16 destination rows stay in L1 */
        for (int kb = 0; kb < kc; kb += 16) {
            int ke = kc - kb < 16 ? kc - kb : 16;
            for (int c = 0; c < nc; c++) {
                const float *s = B->p + (size_t)(j0 + c) * B->ld + k0 + kb;
                float *dc = d + (size_t)kb * NR + c;
                for (int k = 0; k < ke; k++) dc[(size_t)k * NR] = s[k];
            }
        }
    } else if (B->kind == MS_OPD_IM2COL) {
        int kk2 = B->k * B->k;
        for (int k = 0; k < kc; k++) {
            int kk = k0 + k, ci = kk / kk2, ky = (kk % kk2) / B->k, kx = kk % B->k;
            const float *plane = B->p + (size_t)ci * B->H * B->W;
            float *dk = d + (size_t)k * NR;
            int oy = j0 / B->Wo, ox = j0 % B->Wo, c = 0;
            while (c < nc) {                       /* one output row segment at a time */
                int run = B->Wo - ox < nc - c ? B->Wo - ox : nc - c;
                int iy = oy * B->s - B->pt + ky;
                if (iy < 0 || iy >= B->H) {
                    for (int t = 0; t < run; t++) dk[c + t] = 0.0f;
                } else {
                    const float *srow = plane + (size_t)iy * B->W;
                    int ix = ox * B->s - B->pl + kx;
                    if (B->s == 1 && ix >= 0 && ix + run <= B->W) {
                        memcpy(dk + c, srow + ix, (size_t)run * sizeof(float));
                    } else {
                        for (int t = 0; t < run; t++, ix += B->s)
                            dk[c + t] = (ix >= 0 && ix < B->W) ? srow[ix] : 0.0f;
                    }
                }
                c += run; ox = 0; oy++;
            }
        }
    } else { /* MS_OPD_IM2COL_T */
        int kk2 = B->k * B->k, P = B->Ho * B->Wo;
        for (int c = 0; c < nc; c++) {
            int kk = j0 + c, ci = kk / kk2, ky = (kk % kk2) / B->k, kx = kk % B->k;
            int n = k0 / P, q = k0 % P, oy = q / B->Wo, ox = q % B->Wo;
            for (int k = 0; k < kc; k++) {
                int iy = oy * B->s - B->pt + ky, ix = ox * B->s - B->pl + kx;
                d[(size_t)k * NR + c] = (iy >= 0 && iy < B->H && ix >= 0 && ix < B->W)
                    ? B->p[(size_t)n * B->nstride + ((size_t)ci * B->H + iy) * B->W + ix] : 0.0f;
                if (++ox == B->Wo) { ox = 0; if (++oy == B->Ho) { oy = 0; n++; } }
            }
        }
    }
}

/* ---------------------------------------------------------------------------------------- */
/* Register micro-kernels: C[0:MR, 0:NR] = alpha * Apanel Bpanel + beta * C (beta 0: not read)*/
/* ---------------------------------------------------------------------------------------- */
/* Every kernel computes acc = sum_k a[k] * b[k] in k order with one rounding per FMA (scalar:
 * per multiply and add), then C = alpha*acc (beta == 0) or fma(alpha, acc, beta*C). */
typedef void (*MsUkr)(int kc, const float *a, const float *b, float *c, size_t ldc, float alpha, float beta);
/* The same tile with A read where it lies (lda != 0: row i at a + i*lda, k contiguous; no
 * packing), or, for the half-width kernels, from a packed panel when lda == 0. The half-width
 * kernels compute columns 0..NR/2 of the tile (B panels keep their NR stride): narrow tails. */
typedef void (*MsUkrD)(int kc, const float *a, size_t lda, const float *b, float *c, size_t ldc, float alpha, float beta);

#define MS_SC_MR 4
#define MS_SC_NR 16
static void ms_ukr_scalar(int kc, const float *a, const float *b, float *c, size_t ldc, float alpha, float beta) {
    float acc[MS_SC_MR][MS_SC_NR];
    memset(acc, 0, sizeof acc);
    for (int k = 0; k < kc; k++, a += MS_SC_MR, b += MS_SC_NR)
        for (int i = 0; i < MS_SC_MR; i++) {
            float ai = a[i];
            for (int j = 0; j < MS_SC_NR; j++) acc[i][j] += ai * b[j];
        }
    for (int i = 0; i < MS_SC_MR; i++)
        for (int j = 0; j < MS_SC_NR; j++) {
            float *cij = c + (size_t)i * ldc + j;
            *cij = beta == 0.0f ? alpha * acc[i][j] : alpha * acc[i][j] + beta * *cij;
        }
}

#if defined(MS_X86_KERNELS)
/* AVX2 + FMA: 6x16 tile = 12 ymm accumulators + 2 B vectors + 1 broadcast (of 16 registers). */
#define MS_R6(X) X(0) X(1) X(2) X(3) X(4) X(5)
#define MS_A2_DECL(i) __m256 c##i##a = _mm256_setzero_ps(), c##i##b = _mm256_setzero_ps();
#define MS_A2_STEP(i) { __m256 ai = _mm256_broadcast_ss(a + i); \
    c##i##a = _mm256_fmadd_ps(ai, b0, c##i##a); c##i##b = _mm256_fmadd_ps(ai, b1, c##i##b); }
#define MS_A2_ST0(i) { float *ci = c + (size_t)i * ldc; \
    _mm256_storeu_ps(ci, _mm256_mul_ps(va, c##i##a)); _mm256_storeu_ps(ci + 8, _mm256_mul_ps(va, c##i##b)); }
#define MS_A2_ST1(i) { float *ci = c + (size_t)i * ldc; \
    _mm256_storeu_ps(ci, _mm256_fmadd_ps(va, c##i##a, _mm256_mul_ps(vb, _mm256_loadu_ps(ci)))); \
    _mm256_storeu_ps(ci + 8, _mm256_fmadd_ps(va, c##i##b, _mm256_mul_ps(vb, _mm256_loadu_ps(ci + 8)))); }
#define MS_A2_PF(i) _mm_prefetch((const char *)(c + (size_t)i * ldc), _MM_HINT_T0);
MS_TARGET_AVX2
static void ms_ukr_avx2(int kc, const float *a, const float *b, float *c, size_t ldc, float alpha, float beta) {
    MS_R6(MS_A2_DECL)
    MS_R6(MS_A2_PF)
    for (int k = 0; k < kc; k++, a += 6, b += 16) {
        __m256 b0 = _mm256_loadu_ps(b), b1 = _mm256_loadu_ps(b + 8);
        MS_R6(MS_A2_STEP)
    }
    __m256 va = _mm256_set1_ps(alpha), vb = _mm256_set1_ps(beta);
    if (beta == 0.0f) { MS_R6(MS_A2_ST0) } else { MS_R6(MS_A2_ST1) }
}

#define MS_A2_STEPD(i) { __m256 ai = _mm256_broadcast_ss(a + (size_t)(i) * lda); \
    c##i##a = _mm256_fmadd_ps(ai, b0, c##i##a); c##i##b = _mm256_fmadd_ps(ai, b1, c##i##b); }
MS_TARGET_AVX2
static void ms_ukr_avx2_d(int kc, const float *a, size_t lda, const float *b, float *c, size_t ldc, float alpha, float beta) {
    MS_R6(MS_A2_DECL)
    MS_R6(MS_A2_PF)
    for (int k = 0; k < kc; k++, a++, b += 16) {
        __m256 b0 = _mm256_loadu_ps(b), b1 = _mm256_loadu_ps(b + 8);
        MS_R6(MS_A2_STEPD)
    }
    __m256 va = _mm256_set1_ps(alpha), vb = _mm256_set1_ps(beta);
    if (beta == 0.0f) { MS_R6(MS_A2_ST0) } else { MS_R6(MS_A2_ST1) }
}

#define MS_A2H_DECL(i) __m256 c##i##a = _mm256_setzero_ps();
#define MS_A2H_STEP(i) c##i##a = _mm256_fmadd_ps(_mm256_broadcast_ss(a + (i)), b0, c##i##a);
#define MS_A2H_STEPD(i) c##i##a = _mm256_fmadd_ps(_mm256_broadcast_ss(a + (size_t)(i) * lda), b0, c##i##a);
#define MS_A2H_ST0(i) _mm256_storeu_ps(c + (size_t)i * ldc, _mm256_mul_ps(va, c##i##a));
#define MS_A2H_ST1(i) { float *ci = c + (size_t)i * ldc; \
    _mm256_storeu_ps(ci, _mm256_fmadd_ps(va, c##i##a, _mm256_mul_ps(vb, _mm256_loadu_ps(ci)))); }
MS_TARGET_AVX2
static void ms_ukr_avx2_h(int kc, const float *a, size_t lda, const float *b, float *c, size_t ldc, float alpha, float beta) {
    MS_R6(MS_A2H_DECL)
    if (lda) {
        for (int k = 0; k < kc; k++, a++, b += 16) { __m256 b0 = _mm256_loadu_ps(b); MS_R6(MS_A2H_STEPD) }
    } else {
        for (int k = 0; k < kc; k++, a += 6, b += 16) { __m256 b0 = _mm256_loadu_ps(b); MS_R6(MS_A2H_STEP) }
    }
    __m256 va = _mm256_set1_ps(alpha), vb = _mm256_set1_ps(beta);
    if (beta == 0.0f) { MS_R6(MS_A2H_ST0) } else { MS_R6(MS_A2H_ST1) }
}

/* AVX-512: 14x32 tile = 28 zmm accumulators + 2 B vectors + 1 broadcast (of 32 registers);
 * the broadcast folds into the FMA's memory operand ({1to16}). */
#define MS_R14(X) X(0) X(1) X(2) X(3) X(4) X(5) X(6) X(7) X(8) X(9) X(10) X(11) X(12) X(13)
#define MS_A5_DECL(i) __m512 c##i##a = _mm512_setzero_ps(), c##i##b = _mm512_setzero_ps();
#define MS_A5_STEP(i) { __m512 ai = _mm512_set1_ps(a[i]); \
    c##i##a = _mm512_fmadd_ps(ai, b0, c##i##a); c##i##b = _mm512_fmadd_ps(ai, b1, c##i##b); }
#define MS_A5_ST0(i) { float *ci = c + (size_t)i * ldc; \
    _mm512_storeu_ps(ci, _mm512_mul_ps(va, c##i##a)); _mm512_storeu_ps(ci + 16, _mm512_mul_ps(va, c##i##b)); }
#define MS_A5_ST1(i) { float *ci = c + (size_t)i * ldc; \
    _mm512_storeu_ps(ci, _mm512_fmadd_ps(va, c##i##a, _mm512_mul_ps(vb, _mm512_loadu_ps(ci)))); \
    _mm512_storeu_ps(ci + 16, _mm512_fmadd_ps(va, c##i##b, _mm512_mul_ps(vb, _mm512_loadu_ps(ci + 16)))); }
#define MS_A5_PF(i) _mm_prefetch((const char *)(c + (size_t)i * ldc), _MM_HINT_T0); \
    _mm_prefetch((const char *)(c + (size_t)i * ldc + 16), _MM_HINT_T0);
MS_TARGET_AVX512
static void ms_ukr_avx512(int kc, const float *a, const float *b, float *c, size_t ldc, float alpha, float beta) {
    MS_R14(MS_A5_DECL)
    MS_R14(MS_A5_PF)
    for (int k = 0; k < kc; k++, a += 14, b += 32) {
        __m512 b0 = _mm512_loadu_ps(b), b1 = _mm512_loadu_ps(b + 16);
        MS_R14(MS_A5_STEP)
    }
    __m512 va = _mm512_set1_ps(alpha), vb = _mm512_set1_ps(beta);
    if (beta == 0.0f) { MS_R14(MS_A5_ST0) } else { MS_R14(MS_A5_ST1) }
}

#define MS_A5_STEPD(i) { __m512 ai = _mm512_set1_ps(a[(size_t)(i) * lda]); \
    c##i##a = _mm512_fmadd_ps(ai, b0, c##i##a); c##i##b = _mm512_fmadd_ps(ai, b1, c##i##b); }
MS_TARGET_AVX512
static void ms_ukr_avx512_d(int kc, const float *a, size_t lda, const float *b, float *c, size_t ldc, float alpha, float beta) {
    MS_R14(MS_A5_DECL)
    MS_R14(MS_A5_PF)
    for (int k = 0; k < kc; k++, a++, b += 32) {
        __m512 b0 = _mm512_loadu_ps(b), b1 = _mm512_loadu_ps(b + 16);
        MS_R14(MS_A5_STEPD)
    }
    __m512 va = _mm512_set1_ps(alpha), vb = _mm512_set1_ps(beta);
    if (beta == 0.0f) { MS_R14(MS_A5_ST0) } else { MS_R14(MS_A5_ST1) }
}

/* Short tiles: the first 7 rows of a packed 14-row panel (row tails of M = 128, 256, ...). */
#define MS_R7(X) X(0) X(1) X(2) X(3) X(4) X(5) X(6)
MS_TARGET_AVX512
static void ms_ukr_avx512_s(int kc, const float *a, const float *b, float *c, size_t ldc, float alpha, float beta) {
    MS_R7(MS_A5_DECL)
    for (int k = 0; k < kc; k++, a += 14, b += 32) {
        __m512 b0 = _mm512_loadu_ps(b), b1 = _mm512_loadu_ps(b + 16);
        MS_R7(MS_A5_STEP)
    }
    __m512 va = _mm512_set1_ps(alpha), vb = _mm512_set1_ps(beta);
    if (beta == 0.0f) { MS_R7(MS_A5_ST0) } else { MS_R7(MS_A5_ST1) }
}

#define MS_A5H_DECL(i) __m512 c##i##a = _mm512_setzero_ps();
#define MS_A5H_STEP(i) c##i##a = _mm512_fmadd_ps(_mm512_set1_ps(a[i]), b0, c##i##a);
#define MS_A5H_STEPD(i) c##i##a = _mm512_fmadd_ps(_mm512_set1_ps(a[(size_t)(i) * lda]), b0, c##i##a);
#define MS_A5H_ST0(i) _mm512_storeu_ps(c + (size_t)i * ldc, _mm512_mul_ps(va, c##i##a));
#define MS_A5H_ST1(i) { float *ci = c + (size_t)i * ldc; \
    _mm512_storeu_ps(ci, _mm512_fmadd_ps(va, c##i##a, _mm512_mul_ps(vb, _mm512_loadu_ps(ci)))); }
MS_TARGET_AVX512
static void ms_ukr_avx512_h(int kc, const float *a, size_t lda, const float *b, float *c, size_t ldc, float alpha, float beta) {
    MS_R14(MS_A5H_DECL)
    if (lda) {
        for (int k = 0; k < kc; k++, a++, b += 32) { __m512 b0 = _mm512_loadu_ps(b); MS_R14(MS_A5H_STEPD) }
    } else {
        for (int k = 0; k < kc; k++, a += 14, b += 32) { __m512 b0 = _mm512_loadu_ps(b); MS_R14(MS_A5H_STEP) }
    }
    __m512 va = _mm512_set1_ps(alpha), vb = _mm512_set1_ps(beta);
    if (beta == 0.0f) { MS_R14(MS_A5H_ST0) } else { MS_R14(MS_A5H_ST1) }
}
#endif /* MS_X86_KERNELS */

#if defined(MS_NEON_KERNELS)
/* NEON (aarch64): 8x8 tile = 16 q accumulators; A values by lane from two q registers. */
#define MS_R8(X) X(0) X(1) X(2) X(3) X(4) X(5) X(6) X(7)
#define MS_N_DECL(i) float32x4_t c##i##a = vdupq_n_f32(0.0f), c##i##b = vdupq_n_f32(0.0f);
#define MS_N_STEP(i) c##i##a = vfmaq_laneq_f32(c##i##a, b0, (i) < 4 ? a0 : a1, (i) & 3); \
    c##i##b = vfmaq_laneq_f32(c##i##b, b1, (i) < 4 ? a0 : a1, (i) & 3);
#define MS_N_ST0(i) { float *ci = c + (size_t)i * ldc; \
    vst1q_f32(ci, vmulq_n_f32(c##i##a, alpha)); vst1q_f32(ci + 4, vmulq_n_f32(c##i##b, alpha)); }
#define MS_N_ST1(i) { float *ci = c + (size_t)i * ldc; \
    vst1q_f32(ci, vfmaq_n_f32(vmulq_n_f32(vld1q_f32(ci), beta), c##i##a, alpha)); \
    vst1q_f32(ci + 4, vfmaq_n_f32(vmulq_n_f32(vld1q_f32(ci + 4), beta), c##i##b, alpha)); }
static void ms_ukr_neon(int kc, const float *a, const float *b, float *c, size_t ldc, float alpha, float beta) {
    MS_R8(MS_N_DECL)
    for (int k = 0; k < kc; k++, a += 8, b += 8) {
        float32x4_t b0 = vld1q_f32(b), b1 = vld1q_f32(b + 4), a0 = vld1q_f32(a), a1 = vld1q_f32(a + 4);
        MS_R8(MS_N_STEP)
    }
    if (beta == 0.0f) { MS_R8(MS_N_ST0) } else { MS_R8(MS_N_ST1) }
}
#endif /* MS_NEON_KERNELS */

/* ---------------------------------------------------------------------------------------- */
/* The blocked driver                                                                        */
/* ---------------------------------------------------------------------------------------- */
/* mr x nr register tile; mc rows of A per packed block (multiple of mr), kc = deepest K slice,
 * nc = columns of B per packed slice (multiple of nr): kc*nc floats stay in L2 while the
 * mr*kc A panel in use stays in L1 (loop order ir outer, jr inner). */
typedef struct { int mr, nr, mc, kc, nc; MsUkr ukr, uks; MsUkrD ukd, ukh; MsSimd level; } MsGemmKernel;

#ifndef MS_MC5
#define MS_MC5 (14 * 12)
#endif
#ifndef MS_KC5
#define MS_KC5 384
#endif
#ifndef MS_NC5
#define MS_NC5 320
#endif
static MsGemmKernel ms_gemm_kernel(void) {
    MsGemmKernel g;
    MsSimd l = ms_simd();
    g.level = MS_SIMD_SCALAR; g.mr = MS_SC_MR; g.nr = MS_SC_NR; g.mc = 64; g.kc = 256; g.nc = 512; g.ukr = ms_ukr_scalar;
    g.ukd = g.ukh = NULL;
    g.uks = NULL;
#if defined(MS_X86_KERNELS)
    if (l >= MS_SIMD_AVX512) {
        g.level = MS_SIMD_AVX512; g.mr = 14; g.nr = 32; g.mc = MS_MC5; g.kc = MS_KC5; g.nc = MS_NC5; g.ukr = ms_ukr_avx512;
        g.ukd = ms_ukr_avx512_d; g.ukh = ms_ukr_avx512_h; g.uks = ms_ukr_avx512_s;
    } else if (l >= MS_SIMD_AVX2) {
        g.level = MS_SIMD_AVX2; g.mr = 6; g.nr = 16; g.mc = 6 * 24; g.kc = 384; g.nc = 320; g.ukr = ms_ukr_avx2;
        g.ukd = ms_ukr_avx2_d; g.ukh = ms_ukr_avx2_h;
    }
#elif defined(MS_NEON_KERNELS)
    if (l >= MS_SIMD_NEON) {
        g.level = MS_SIMD_NEON; g.mr = 8; g.nr = 8; g.mc = 8 * 16; g.kc = 256; g.nc = 512; g.ukr = ms_ukr_neon;
    }
#endif
    (void)l;
    if (!(ms_gemm_fast & MS_GEMM_FAST_INPLACE_A)) g.ukd = NULL;
    if (!(ms_gemm_fast & MS_GEMM_FAST_HALF)) g.ukh = NULL;
    if (!(ms_gemm_fast & MS_GEMM_FAST_SHORT)) g.uks = NULL;
    return g;
}

/* The register tiles of rows [ic, ic+mc) x columns [jc, jc+nc) for one K slice. A comes packed
 * (Ap: mc x kc) or, when Ad is set, in place (row ic+ir at Ad + ir*lda; a partial last row
 * panel is still packed, at Ap); B packed (Bp: kc x nc). Every C element gets the same FMA
 * sequence whichever kernel (full, in-place A, half width) or edge copy computes it. */
static void ms_gemm_tiles(const MsGemmKernel *g, int ic, int mc, int jc, int nc, int kc, float alpha,
                          float beta_k, float *C, size_t ldc, const float *Ap, const float *Ad, size_t lda,
                          const float *Bp, float *tile) {
    const int MR = g->mr, NR = g->nr, njr = (nc + NR - 1) / NR;
    for (int ir = 0; ir < mc; ir += MR) {
        int rows = mc - ir < MR ? mc - ir : MR;
        size_t ld = Ad && rows == MR ? lda : 0;
        const float *ap = ld ? Ad + (size_t)ir * lda : Ad ? Ap : Ap + (size_t)ir * kc;
        /* A in place with rows of exactly kc floats (K in one slice): the next row panel is one
         * contiguous block, usually in memory (large M); it is prefetched a few rows per column
         * tile while this panel runs (measured, 4096x320x320: 80 -> 85% of peak; no gain where
         * the panel's rows are apart) */
        int pf_rows = Ad && lda == (size_t)kc ? (mc - ir - MR < MR ? mc - ir - MR : MR) : 0;
        for (int jr = 0, t = 0; jr < nc; jr += NR, t++) {
#if defined(__GNUC__)
            for (int r = t * pf_rows / njr; r < (t + 1) * pf_rows / njr; r++) {
                const char *q = (const char *)(Ad + (size_t)(ir + MR + r) * lda);
                for (int off = 0; off < kc * 4; off += 64) __builtin_prefetch(q + off, 0, 2);
            }
#endif
            int cols = nc - jr < NR ? nc - jr : NR;
            int shrt = g->uks && !ld && rows <= MR / 2;         /* rows of a packed panel */
            int half = !shrt && g->ukh && cols <= NR / 2, w = half ? NR / 2 : NR, h = shrt ? MR / 2 : MR;
            float *c = C + (size_t)(ic + ir) * ldc + jc + jr, *cc = c;
            const float *bp = Bp + (size_t)jr * kc;
            size_t ldcc = ldc;
            if (rows < h || cols < w) {          /* edge: the same kernel on a copy, same bits */
                if (beta_k != 0.0f)
                    for (int r = 0; r < rows; r++) memcpy(tile + r * NR, c + (size_t)r * ldc, (size_t)cols * sizeof(float));
                cc = tile; ldcc = (size_t)NR;
            }
            if (shrt) g->uks(kc, ap, bp, cc, ldcc, alpha, beta_k);
            else if (half) g->ukh(kc, ap, ld, bp, cc, ldcc, alpha, beta_k);
            else if (ld) g->ukd(kc, ap, ld, bp, cc, ldcc, alpha, beta_k);
            else g->ukr(kc, ap, bp, cc, ldcc, alpha, beta_k);
            if (cc == tile)
                for (int r = 0; r < rows; r++) memcpy(c + (size_t)r * ldc, tile + r * NR, (size_t)cols * sizeof(float));
        }
    }
}

/* A's rows [ic, ic+mc), columns [k0, k0+kc) for ms_gemm_tiles: packed into Ap, or (in place)
 * only the partial last row panel packed, and *Ad set to A[ic][k0]. */
static void ms_gemm_prep_a(const MsGemmKernel *g, int inplace, float *Ap, const float **Ad, const MsOperand *A,
                           int ic, int mc, int k0, int kc) {
    if (!inplace) { ms_pack_a(Ap, A, ic, mc, k0, kc, g->mr); *Ad = NULL; return; }
    int full = mc / g->mr * g->mr;
    if (full < mc) ms_pack_a(Ap, A, ic + full, mc - full, k0, kc, g->mr);
    *Ad = A->p + (size_t)ic * A->ld + k0;
}

static void ms_pack_b_slice(float *Bp, const MsOperand *B, int k0, int kc, int jc, int nc, int NR) {
    for (int p = 0; p * NR < nc; p++)
        ms_pack_b(Bp + (size_t)p * NR * kc, B, k0, kc, jc + p * NR, nc - p * NR < NR ? nc - p * NR : NR, NR);
}

/* Loop orders of one thread's part (all give the same bits: each C element sees the same K
 * slices in the same order through the same kernel):
 *   MS_ORD_BLOCKED   jc (NC cols) > K slice > ic (MC rows) > ir > jr: packed B slice in L2,
 *                    A repacked per column block (the general case)
 *   MS_ORD_A_RESIDENT K slice > all rows of A packed once > jc > ic: few rows, many columns
 *                    (convolutions: Co rows x H*W columns), so A is not repacked per block
 *   MS_ORD_B_RESIDENT all of op(B) packed once > ic > K slice: few columns, deep K (GEMMs
 *                    with K=1280, N=320), so a C block stays in cache across the K slices */
enum { MS_ORD_BLOCKED, MS_ORD_A_RESIDENT, MS_ORD_B_RESIDENT };

/* One thread's share: the C rows [i0, i1) x columns [j0, j1). inplace: A is read where it lies
 * (dense, not transposed; never with MS_ORD_A_RESIDENT). */
static void ms_gemm_part(const MsGemmKernel *g, int order, int inplace, int i0, int i1, int j0, int j1, int K, int kcb,
                         float alpha, const MsOperand *A, const MsOperand *B, float beta,
                         float *C, size_t ldc, float *Ap, float *Bp) {
    float tile[32 * 32];                          /* edge tiles: MR*NR <= 14*32 */
    const float *Ad = NULL;
    memset(tile, 0, sizeof tile);
    if (order == MS_ORD_B_RESIDENT) {             /* j1 - j0 <= nc */
        for (int k0 = 0; k0 < K; k0 += kcb)
            ms_pack_b_slice(Bp + (size_t)k0 * (j1 - j0 + g->nr), B, k0, K - k0 < kcb ? K - k0 : kcb, j0, j1 - j0, g->nr);
        for (int ic = i0; ic < i1; ic += g->mc) {
            int mc = i1 - ic < g->mc ? i1 - ic : g->mc;
            for (int k0 = 0; k0 < K; k0 += kcb) {
                int kc = K - k0 < kcb ? K - k0 : kcb;
                ms_gemm_prep_a(g, inplace, Ap, &Ad, A, ic, mc, k0, kc);
                ms_gemm_tiles(g, ic, mc, j0, j1 - j0, kc, alpha, k0 == 0 ? beta : 1.0f, C, ldc, Ap, Ad, A->ld,
                              Bp + (size_t)k0 * (j1 - j0 + g->nr), tile);
            }
        }
        return;
    }
    if (order == MS_ORD_A_RESIDENT) {
        for (int k0 = 0; k0 < K; k0 += kcb) {
            int kc = K - k0 < kcb ? K - k0 : kcb;
            ms_pack_a(Ap, A, i0, i1 - i0, k0, kc, g->mr);
            for (int jc = j0; jc < j1; jc += g->nc) {
                int nc = j1 - jc < g->nc ? j1 - jc : g->nc;
                ms_pack_b_slice(Bp, B, k0, kc, jc, nc, g->nr);
                for (int ic = i0; ic < i1; ic += g->mc) {
                    int mc = i1 - ic < g->mc ? i1 - ic : g->mc;
                    ms_gemm_tiles(g, ic, mc, jc, nc, kc, alpha, k0 == 0 ? beta : 1.0f, C, ldc,
                                  Ap + (size_t)(ic - i0) * kc, NULL, 0, Bp, tile);
                }
            }
        }
        return;
    }
    for (int jc = j0; jc < j1; jc += g->nc) {
        int nc = j1 - jc < g->nc ? j1 - jc : g->nc;
        for (int k0 = 0; k0 < K; k0 += kcb) {
            int kc = K - k0 < kcb ? K - k0 : kcb;
            float beta_k = k0 == 0 ? beta : 1.0f;  /* later slices accumulate onto C */
            ms_pack_b_slice(Bp, B, k0, kc, jc, nc, g->nr);
            for (int ic = i0; ic < i1; ic += g->mc) {
                int mc = i1 - ic < g->mc ? i1 - ic : g->mc;
                ms_gemm_prep_a(g, inplace, Ap, &Ad, A, ic, mc, k0, kc);
                ms_gemm_tiles(g, ic, mc, jc, nc, kc, alpha, beta_k, C, ldc, Ap, Ad, A->ld, Bp, tile);
            }
        }
    }
}

/* C (M,N) = alpha op(A) op(B) + beta C for operands of any kind. Returns 0 when the workspace
 * cannot be allocated (C untouched), 1 otherwise.
 * Threads: C is cut into a tr x tc grid of MR/NR-aligned parts, one per thread, and each thread
 * runs the whole blocked algorithm on its part with its own packing buffers: one fork and one
 * join per call, no barrier inside (a shared machine deschedules threads; barriers then cost
 * a time slice each). Packing is duplicated across the grid (B tr times, A tc times); the grid
 * minimises the larger part's compute plus packing. */
static int ms_gemm_op(int M, int N, int K, float alpha, const MsOperand *A, const MsOperand *B,
                      float beta, float *C, size_t ldc) {
    if (M <= 0 || N <= 0) return 1;
    if (K <= 0) {
        for (int i = 0; i < M; i++)
            for (int j = 0; j < N; j++) {
                float *c = C + (size_t)i * ldc + j;
                *c = beta == 0.0f ? 0.0f : beta * *c;
            }
        return 1;
    }
    MsGemmKernel g = ms_gemm_kernel();
    const int MR = g.mr, NR = g.nr;
    int nkb = (K + g.kc - 1) / g.kc;              /* K slices: a function of K only */
    int kcb = (K + nkb - 1) / nkb;
    int ru = (M + MR - 1) / MR, cu = (N + NR - 1) / NR;   /* row panels, column panels */
    int nt = ms_team_max();
    if (2.0 * M * N * K < 4e6) nt = 1;            /* a parallel region costs more than it saves */
    if (nt > ru * cu) nt = ru * cu;
    int tr = 1, tc = nt;
    double best = -1.0;
    for (int r = 1; r <= nt; r++) {
        if (nt % r) continue;
        int c = nt / r;
        if (r > ru || c > cu) continue;
        double mr = (double)((ru + r - 1) / r) * MR, nc = (double)((cu + c - 1) / c) * NR;
        double cost = mr * nc + 8.0 * (mr + nc);  /* per-thread FMAs per k, plus packing */
        if (best < 0 || cost < best) { best = cost; tr = r; tc = c; }
    }
    nt = tr * tc;
    if (nt < 1) { nt = 1; tr = tc = 1; }
    int mcmax = M < g.mc ? ru * MR : g.mc;
    int ncmax = N < g.nc ? cu * NR : g.nc;
    size_t bsize = (size_t)kcb * ncmax, asize = (size_t)mcmax * kcb;
    /* the loop order (ms_gemm_part) from the largest part's shape */
    int prow = (ru + tr - 1) / tr * MR, pcol = (cu + tc - 1) / tc * NR, order = MS_ORD_BLOCKED;
    int inplace = g.ukd && A->kind == MS_OPD_DENSE && !A->trans && A->ld > 0;   /* A read where it lies */
    if (prow > g.mc && pcol <= g.nc && nkb > 1 && (size_t)K * (pcol + NR) <= ((size_t)1 << 19)) {
        order = MS_ORD_B_RESIDENT;                /* <= 2 MB of packed B */
        bsize = (size_t)K * (pcol + NR);
    } else if (!inplace && pcol > g.nc && (size_t)prow * kcb <= ((size_t)1 << 18)) {
        order = MS_ORD_A_RESIDENT;                /* <= 1 MB of packed A */
        asize = (size_t)prow * kcb;
    }
    bsize = (bsize + 15) / 16 * 16;
    asize = (asize + 15) / 16 * 16;
    float *work = ms_work_get(ms_work_of(0), (bsize + asize) * (size_t)nt);
    if (!work) return 0;
    ms_flops_add(2.0 * M * N * K);
    int ms_par_ = nt > 1;
    (void)ms_par_;
    MS_OMP_PARALLEL_FOR_NT
    for (int t = 0; t < nt; t++) {
        int r = t / tc, c = t % tc;
        int i0 = (int)((int64_t)ru * r / tr) * MR, i1 = (int)((int64_t)ru * (r + 1) / tr) * MR;
        int j0 = (int)((int64_t)cu * c / tc) * NR, j1 = (int)((int64_t)cu * (c + 1) / tc) * NR;
        if (i1 > M) i1 = M;
        if (j1 > N) j1 = N;
        float *Bp = work + (bsize + asize) * (size_t)t, *Ap = Bp + bsize;
        if (i0 < i1 && j0 < j1) ms_gemm_part(&g, order, inplace, i0, i1, j0, j1, K, kcb, alpha, A, B, beta, C, ldc, Ap, Bp);
    }
    return 1;
}

/* ---------------------------------------------------------------------------------------- */
/* ms_gemm and its definition                                                                */
/* ---------------------------------------------------------------------------------------- */
void ms_gemm_ref(int transA, int transB, int M, int N, int K, float alpha, const float *A, int lda,
                 const float *B, int ldb, float beta, float *C, int ldc) {
    for (int i = 0; i < M; i++)
        for (int j = 0; j < N; j++) {
            double acc = 0.0;
            for (int k = 0; k < K; k++) {
                double a = transA ? A[(size_t)k * lda + i] : A[(size_t)i * lda + k];
                double b = transB ? B[(size_t)j * ldb + k] : B[(size_t)k * ldb + j];
                acc += a * b;
            }
            float *c = &C[(size_t)i * ldc + j];
            *c = (float)(alpha * acc + (beta == 0.0f ? 0.0 : (double)beta * *c));
        }
}

#if defined(MS_X86_KERNELS)
/* 65..80 rows of A (CLIP's 77 tokens): each C^T tile is 5 weight rows x the whole 80-lane
 * width (5 zmm per row: 25 accumulators + 5 B vectors + 1 broadcast), so the 77 columns take
 * 5 vectors with one masked, every FMA's B operand sits in a register and each k costs 10
 * loads for 25 FMAs (the 14x32 + 14x32 + 14x16 tiles of the general path: 47 loads for 70
 * FMAs, and the 14 in-place weight rows of a 4-KiB-multiple stride share one L1 set).
 * w: row r of the tile at w + r*ldw (rows < 5: the missing rows repeat row 0 and are not
 * stored); b: the packed slice, kc x 80; c: C^T rows of m (65..80) floats. acc, alpha, beta
 * as every kernel: the bits of the general path. */
#define MS_R5(X) X(0) X(1) X(2) X(3) X(4)
#define MS_W5_DECL(i) __m512 c##i##0 = _mm512_setzero_ps(), c##i##1 = c##i##0, c##i##2 = c##i##0, \
    c##i##3 = c##i##0, c##i##4 = c##i##0;
#define MS_W5_STEP(i) { __m512 ai = _mm512_set1_ps(w##i[k]); \
    c##i##0 = _mm512_fmadd_ps(ai, b0, c##i##0); c##i##1 = _mm512_fmadd_ps(ai, b1, c##i##1); \
    c##i##2 = _mm512_fmadd_ps(ai, b2, c##i##2); c##i##3 = _mm512_fmadd_ps(ai, b3, c##i##3); \
    c##i##4 = _mm512_fmadd_ps(ai, b4, c##i##4); }
#define MS_W5_ST(i) if ((i) < rows) { float *ci = c + (size_t)(i) * ldc; \
    if (beta == 0.0f) { \
        _mm512_storeu_ps(ci, _mm512_mul_ps(va, c##i##0)); _mm512_storeu_ps(ci + 16, _mm512_mul_ps(va, c##i##1)); \
        _mm512_storeu_ps(ci + 32, _mm512_mul_ps(va, c##i##2)); _mm512_storeu_ps(ci + 48, _mm512_mul_ps(va, c##i##3)); \
        _mm512_mask_storeu_ps(ci + 64, lm, _mm512_mul_ps(va, c##i##4)); \
    } else { \
        _mm512_storeu_ps(ci, _mm512_fmadd_ps(va, c##i##0, _mm512_mul_ps(vb, _mm512_loadu_ps(ci)))); \
        _mm512_storeu_ps(ci + 16, _mm512_fmadd_ps(va, c##i##1, _mm512_mul_ps(vb, _mm512_loadu_ps(ci + 16)))); \
        _mm512_storeu_ps(ci + 32, _mm512_fmadd_ps(va, c##i##2, _mm512_mul_ps(vb, _mm512_loadu_ps(ci + 32)))); \
        _mm512_storeu_ps(ci + 48, _mm512_fmadd_ps(va, c##i##3, _mm512_mul_ps(vb, _mm512_loadu_ps(ci + 48)))); \
        _mm512_mask_storeu_ps(ci + 64, lm, _mm512_fmadd_ps(va, c##i##4, \
                              _mm512_mul_ps(vb, _mm512_maskz_loadu_ps(lm, ci + 64)))); } }
MS_TARGET_AVX512
static void ms_ukr_avx512_w5(int kc, const float *w, size_t ldw, int rows, const float *b, float *c, size_t ldc,
                             int m, float alpha, float beta, const float *pf, int pfr, int pkc) {
    const float *w0 = w, *w1 = rows > 1 ? w + ldw : w, *w2 = rows > 2 ? w + 2 * ldw : w;
    const float *w3 = rows > 3 ? w + 3 * ldw : w, *w4 = rows > 4 ? w + 4 * ldw : w;
    MS_R5(MS_W5_DECL)
    for (int k1 = 0; k1 < kc; k1 += 16) {
        if (k1 < pkc)
            for (int r = 0; r < pfr; r++) _mm_prefetch((const char *)(pf + (size_t)r * ldw + k1), _MM_HINT_T1);
        for (int k = k1, ke = kc - k1 < 16 ? kc : k1 + 16; k < ke; k++, b += 80) {
            __m512 b0 = _mm512_loadu_ps(b), b1 = _mm512_loadu_ps(b + 16), b2 = _mm512_loadu_ps(b + 32);
            __m512 b3 = _mm512_loadu_ps(b + 48), b4 = _mm512_loadu_ps(b + 64);
            MS_R5(MS_W5_STEP)
        }
    }
    __m512 va = _mm512_set1_ps(alpha), vb = _mm512_set1_ps(beta);
    __mmask16 lm = ms_mask16(m - 64);
    MS_R5(MS_W5_ST)
}

/* C (M,N) = alpha A B^T + beta C through C^T = B A^T when M's 80-column blocks are all 65..80
 * wide (M = 77, 154, 231, ...): A^T packed once (K x 80 per block, zero columns past M), the
 * weight B read in place, 5 rows at a time. The weight rows go in groups of MS_W5_GROUP: for
 * each group the K slices of the general path (a function of K only) in order, each 5-row tile
 * against every column block (its rows then come from L1), then the group's C^T block (in a
 * per-thread buffer, still in cache) is transposed into C. The next tile's weight rows are
 * prefetched into L2 while a tile runs. Threads take contiguous runs of 5-row tiles. */
#ifndef MS_W5_GROUP
#define MS_W5_GROUP 160
#endif
static int ms_gemm_small_m80(int M, int N, int K, float alpha, const float *A, int lda, const float *B, int ldb,
                             float beta, float *C, int ldc) {
    int nkb = (K + MS_KC5 - 1) / MS_KC5, kcb = (K + nkb - 1) / nkb, np = (N + 4) / 5, nb = (M + 79) / 80;
    int nt = ms_team_max();
    if (2.0 * M * N * K < 4e6) nt = 1;
    if (nt > np) nt = np;
    float *bp = ms_work_get(ms_work_of(0), (size_t)K * 80 * nb), *ctw = ms_work_get(ms_work_of(2), (size_t)nt * MS_W5_GROUP * M);
    if (!bp || !ctw) return 0;
    for (int cb = 0; cb < nb; cb++) {
        int m = M - cb * 80 < 80 ? M - cb * 80 : 80;
        ms_transpose_avx512(bp + (size_t)cb * K * 80, 80, A + (size_t)cb * 80 * lda, (size_t)lda, m, 80, K);
    }
    ms_flops_add(2.0 * M * N * K);
    int ms_par_ = nt > 1;
    (void)ms_par_;
    MS_OMP_PARALLEL_FOR_NT
    for (int t = 0; t < nt; t++) {
        int p0 = (int)((int64_t)np * t / nt), p1 = (int)((int64_t)np * (t + 1) / nt), gp = MS_W5_GROUP / 5;
        int r1 = p1 * 5 < N ? p1 * 5 : N;         /* this thread's weight rows end */
        float *ct = ctw + (size_t)t * MS_W5_GROUP * M;
        for (int g0 = p0; g0 < p1; g0 += gp) {
            int i0 = g0 * 5, i1 = (g0 + gp) * 5 < r1 ? (g0 + gp) * 5 : r1, n = i1 - i0;
            if (beta != 0.0f) ms_transpose_avx512(ct, (size_t)M, C + i0, (size_t)ldc, M, M, n);
            for (int k0 = 0; k0 < K; k0 += kcb) {
                int kc = K - k0 < kcb ? K - k0 : kcb;
                for (int i = i0; i < i1; i += 5) {
                    /* the next tile in this order: the next rows, else the next slice's first
                     * rows, else the next group's */
                    int pi = i + 5, pk = k0, pe = i1;
                    if (pi >= i1) {
                        if (k0 + kc < K) { pi = i0; pk = k0 + kc; }
                        else { pi = i1; pk = 0; pe = i1 + 5 < r1 ? i1 + 5 : r1; }
                    }
                    int pfr = pe - pi < 5 ? pe - pi : 5, pkc = K - pk < kcb ? K - pk : kcb;
                    for (int cb = 0; cb < nb; cb++)
                        ms_ukr_avx512_w5(kc, B + (size_t)i * ldb + k0, (size_t)ldb, i1 - i < 5 ? i1 - i : 5,
                                         bp + ((size_t)cb * K + k0) * 80, ct + (size_t)(i - i0) * M + cb * 80, (size_t)M,
                                         M - cb * 80 < 80 ? M - cb * 80 : 80, alpha, k0 == 0 ? beta : 1.0f,
                                         pfr > 0 ? B + (size_t)pi * ldb + pk : B, cb == 0 && pfr > 0 ? pfr : 0, pkc);
                }
            }
            ms_transpose_avx512(C + i0, (size_t)ldc, ct, (size_t)M, n, n, M);
        }
    }
    return 1;
}
#endif

/* Small M with B transposed (linear_forward on a few tokens: CLIP's 77, the cross-attention
 * K/V of the context): C^T (N,M) = B (N,K) A^T (K,M). B (the weight) is then read in place by
 * the in-place-A kernels instead of being repacked per call, and only the few rows of A are
 * packed. C^T lives in a per-thread workspace; the two transposes are copies and the kernels
 * give each element the FMA sequence of the direct product, so the bits are those of the plain
 * path. M = 77, 154 (all 80-column blocks 65..80 wide) take ms_gemm_small_m80 instead. Returns 0
 * (C untouched) when this path does not apply or has no memory. */
#ifndef MS_SMALL_M
#define MS_SMALL_M 256
#endif
static int ms_gemm_small_m(int M, int N, int K, float alpha, const float *A, int lda, const float *B, int ldb,
                           float beta, float *C, int ldc) {
#if defined(MS_X86_KERNELS)
    if (!(ms_gemm_fast & MS_GEMM_FAST_SMALL_M) || ms_simd() < MS_SIMD_AVX512 || M > MS_SMALL_M || N < M || K < 16) return 0;
    if ((M - 1) % 80 >= 64) return ms_gemm_small_m80(M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
    float *ct = ms_work_get(ms_work_of(2), (size_t)N * M);
    if (!ct) return 0;
    if (beta != 0.0f) ms_transpose_avx512(ct, (size_t)M, C, (size_t)ldc, M, M, N);
    MsOperand a = ms_dense(B, (size_t)ldb, 0), b = ms_dense(A, (size_t)lda, 1);
    if (!ms_gemm_op(N, M, K, alpha, &a, &b, beta, ct, (size_t)M)) return 0;
    ms_transpose_avx512(C, (size_t)ldc, ct, (size_t)M, N, N, M);
    return 1;
#else
    (void)M; (void)N; (void)K; (void)alpha; (void)A; (void)lda; (void)B; (void)ldb; (void)beta; (void)C; (void)ldc;
    return 0;
#endif
}

void ms_gemm(int transA, int transB, int M, int N, int K, float alpha, const float *A, int lda,
             const float *B, int ldb, float beta, float *C, int ldc) {
    if (!transA && transB && ms_gemm_small_m(M, N, K, alpha, A, lda, B, ldb, beta, C, ldc)) return;
    MsOperand a = ms_dense(A, (size_t)lda, transA), b = ms_dense(B, (size_t)ldb, transB);
    if (!ms_gemm_op(M, N, K, alpha, &a, &b, beta, C, (size_t)ldc)) {   /* out of memory: slow but right */
        ms_flops_add(2.0 * M * N * K);
        ms_gemm_ref(transA, transB, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
    }
}

/* ---------------------------------------------------------------------------------------- */
/* Linear                                                                                    */
/* ---------------------------------------------------------------------------------------- */
/* out (N,O) = x (N,I) @ w^T + b. The bias is written first and the GEMM accumulates onto it
 * (beta = 1), which rounds acc + b once, like a separate add. */
void linear_forward(float *out, const float *x, const float *w, const float *b, int N, int I, int O) {
    float beta = 0.0f;
    if (b) {
        for (int n = 0; n < N; n++) memcpy(out + (size_t)n * O, b, (size_t)O * sizeof(float));
        beta = 1.0f;
    }
    ms_gemm(0, 1, N, O, I, 1.0f, x, I, w, I, beta, out, O);
}

/* Column sums in double: db[o] += sum_n d[n*ld + o] (o in blocks, so threads split outputs). */
static void ms_colsum_add(float *db, const float *d, int N, int O, size_t ld) {
    int nblk = (O + 63) / 64;
    MS_PARALLEL_FOR_W((double)N * O)
    for (int bk = 0; bk < nblk; bk++) {
        double acc[64];
        int o0 = bk * 64, no = O - o0 < 64 ? O - o0 : 64;
        for (int o = 0; o < no; o++) acc[o] = 0.0;
        for (int n = 0; n < N; n++)
            for (int o = 0; o < no; o++) acc[o] += d[(size_t)n * ld + o0 + o];
        for (int o = 0; o < no; o++) db[o0 + o] = (float)((double)db[o0 + o] + acc[o]);
    }
}

/* y = x w^T + b, so with g = dL/dy (N,O):
 *   dx (N,I) += g @ w          dL/dx[n,i] = sum_o g[n,o] w[o,i]
 *   dw (O,I) += g^T @ x        dL/dw[o,i] = sum_n g[n,o] x[n,i]
 *   db (O)   += sum_n g[n,:]                                  [tests/test_kernels.c: gradcheck] */
void linear_backward(float *dx, float *dw, float *db, const float *dout, const float *x, const float *w, int N, int I, int O) {
    if (dx) ms_gemm(0, 0, N, I, O, 1.0f, dout, O, w, I, 1.0f, dx, I);
    if (dw) ms_gemm(1, 0, O, I, N, 1.0f, dout, O, x, I, 1.0f, dw, I);
    if (db) ms_colsum_add(db, dout, N, O, (size_t)O);
}

void linear_forward_ref(float *out, const float *x, const float *w, const float *b, int N, int I, int O) {
    for (int n = 0; n < N; n++)
        for (int o = 0; o < O; o++) {
            double acc = b ? (double)b[o] : 0.0;
            for (int i = 0; i < I; i++) acc += (double)x[(size_t)n * I + i] * w[(size_t)o * I + i];
            out[(size_t)n * O + o] = (float)acc;
        }
}

void linear_backward_ref(float *dx, float *dw, float *db, const float *dout, const float *x, const float *w, int N, int I, int O) {
    if (dx)
        for (int n = 0; n < N; n++)
            for (int i = 0; i < I; i++) {
                double acc = 0.0;
                for (int o = 0; o < O; o++) acc += (double)dout[(size_t)n * O + o] * w[(size_t)o * I + i];
                dx[(size_t)n * I + i] = (float)(dx[(size_t)n * I + i] + acc);
            }
    if (dw)
        for (int o = 0; o < O; o++)
            for (int i = 0; i < I; i++) {
                double acc = 0.0;
                for (int n = 0; n < N; n++) acc += (double)dout[(size_t)n * O + o] * x[(size_t)n * I + i];
                dw[(size_t)o * I + i] = (float)(dw[(size_t)o * I + i] + acc);
            }
    if (db)
        for (int o = 0; o < O; o++) {
            double acc = 0.0;
            for (int n = 0; n < N; n++) acc += dout[(size_t)n * O + o];
            db[o] = (float)(db[o] + acc);
        }
}

/* ---------------------------------------------------------------------------------------- */
/* Conv2d (cross-correlation, PyTorch's nn.Conv2d), implicit im2col                          */
/* ---------------------------------------------------------------------------------------- */
/* out[n,co,oy,ox] = b[co] + sum_{c,ky,kx} w[co,c,ky,kx] x[n,c, oy*s-pt+ky, ox*s-pl+kx]
 * (zero outside the image). Per image this is the GEMM out_n (Co, Ho*Wo) = w (Co, C*k*k) @
 * cols (C*k*k, Ho*Wo); the packing routine reads cols straight from x (MS_OPD_IM2COL), so the
 * column matrix (C*k*k*Ho*Wo floats: 47 MB for 320 channels at 64x64) never exists. A 1x1,
 * stride-1, unpadded conv is the plain GEMM out_n = w @ x_n. Measured (`mixshow bench`, AVX-512,
 * 1 thread, 3x3 pad 1): 64x64x320->320 101 GFLOP/s implicit vs 90 through an explicit column
 * matrix (ms_bench_conv2d_explicit); 32x32x640->640 99 vs 93. Implicit wins by 6-12% and needs
 * no scratch. */
static MsOperand ms_im2col_op(int kind, const float *img, int C, int H, int W, int k, int s, int pt, int pl, int Ho, int Wo) {
    MsOperand o;
    memset(&o, 0, sizeof o);
    o.kind = kind; o.p = img; o.C = C; o.H = H; o.W = W; o.k = k; o.s = s; o.pt = pt; o.pl = pl; o.Ho = Ho; o.Wo = Wo;
    o.nstride = (size_t)C * H * W;
    return o;
}

static void ms_conv_gemm(int M, int N, int K, const MsOperand *A, const MsOperand *B, float beta, float *C, size_t ldc) {
    if (!ms_gemm_op(M, N, K, 1.0f, A, B, beta, C, ldc)) {
        /* out of memory for the packing workspace: element by element (slow, never wrong) */
        ms_flops_add(2.0 * M * N * K);
        for (int i = 0; i < M; i++)
            for (int j = 0; j < N; j++) {
                float acc = 0.0f, av, bv;
                for (int k = 0; k < K; k++) {
                    ms_pack_a(&av, A, i, 1, k, 1, 1);
                    ms_pack_b(&bv, B, k, 1, j, 1, 1);
                    acc += av * bv;
                }
                float *c = C + (size_t)i * ldc + j;
                *c = beta == 0.0f ? acc : acc + beta * *c;
            }
    }
}

void conv2d_forward_pad(float *out, const float *x, const float *w, const float *b, int N, int C, int Co,
                        int H, int W, int k, int s, int pt, int pl, int pb, int pr) {
    int Ho = (H + pt + pb - k) / s + 1, Wo = (W + pl + pr - k) / s + 1, P = Ho * Wo, CKK = C * k * k;
    MsOperand A = ms_dense(w, (size_t)CKK, 0);
    for (int n = 0; n < N; n++) {
        float *o = out + (size_t)n * Co * P;
        const float *xn = x + (size_t)n * C * H * W;
        float beta = 0.0f;
        if (b) {
            MS_PARALLEL_FOR_W((double)Co * P)
            for (int co = 0; co < Co; co++)
                for (int p = 0; p < P; p++) o[(size_t)co * P + p] = b[co];
            beta = 1.0f;
        }
        MsOperand B = (k == 1 && s == 1 && !pt && !pl && !pb && !pr)
            ? ms_dense(xn, (size_t)P, 0)
            : ms_im2col_op(MS_OPD_IM2COL, xn, C, H, W, k, s, pt, pl, Ho, Wo);
        ms_conv_gemm(Co, P, CKK, &A, &B, beta, o, (size_t)P);
    }
}

void conv2d_forward(float *out, const float *x, const float *w, const float *b, int N, int C, int Co,
                    int H, int W, int k, int s, int p) {
    conv2d_forward_pad(out, x, w, b, N, C, Co, H, W, k, s, p, p, p, p);
}

/* Conv2d backward. With g = dL/dout and the forward sum above:
 *   db[co]          += sum_{n,oy,ox} g[n,co,oy,ox]
 *   dw[co,c,ky,kx]  += sum_{n,oy,ox} g[n,co,oy,ox] x[n,c,oy*s-pt+ky,ox*s-pl+kx]
 *                      = (g as (Co, N*Ho*Wo)) @ (cols as (N*Ho*Wo, C*k*k)): ONE GEMM whose K
 *                        runs over every image and position, so each dw element is a single
 *                        reduction (thread-count invariant).
 *   dx[n,c,y,x]     += sum_{co,ky,kx} w[co,c,ky,kx] g[n,co,(y+pt-ky)/s,(x+pl-kx)/s]
 *                      (terms where the division is exact and the index is in range)
 *     stride 1: that is a convolution of g (zero-padded by k-1-pt, k-1-pl, k-1-pb, k-1-pr)
 *       with the flipped, channel-transposed kernel w'[c,co,ky,kx] = w[co,c,k-1-ky,k-1-kx]:
 *       again an implicit-im2col GEMM, dx_n (C, H*W) += w' (C, Co*k*k) @ cols(g_n).
 *     otherwise: dcols (C*k*k, P) = w^T @ g_n (in column chunks from the workspace), then
 *       col2im adds each column entry back to the pixel it was read from (threads split c).
 *                                                  [tests/test_kernels.c: backward vs _ref, gradcheck] */
void conv2d_backward(float *dx, float *dw, float *db, const float *dout, const float *x, const float *w,
                     int N, int C, int Co, int H, int W, int k, int s, int pt, int pl, int pb, int pr) {
    int Ho = (H + pt + pb - k) / s + 1, Wo = (W + pl + pr - k) / s + 1, P = Ho * Wo, CKK = C * k * k;
    if (db) {
        MS_PARALLEL_FOR_W((double)N * Co * P)
        for (int co = 0; co < Co; co++) {
            double acc = 0.0;
            for (int n = 0; n < N; n++) {
                const float *g = dout + ((size_t)n * Co + co) * P;
                for (int p = 0; p < P; p++) acc += g[p];
            }
            db[co] = (float)(db[co] + acc);
        }
    }
    if (dw) {
        MsOperand A, B = ms_im2col_op(MS_OPD_IM2COL_T, x, C, H, W, k, s, pt, pl, Ho, Wo);
        memset(&A, 0, sizeof A);
        A.kind = MS_OPD_BATCHK; A.p = dout; A.ld = (size_t)P; A.P = P; A.nstride = (size_t)Co * P;
        if (N == 1) A = ms_dense(dout, (size_t)P, 0);
        if (N == 1 && k == 1 && s == 1 && !pt && !pl && !pb && !pr) B = ms_dense(x, (size_t)P, 1);
        ms_conv_gemm(Co, CKK, N * P, &A, &B, 1.0f, dw, (size_t)CKK);
    }
    if (!dx) return;
    int qt = k - 1 - pt, ql = k - 1 - pl, qb = k - 1 - pb, qr = k - 1 - pr;
    if (s == 1 && qt >= 0 && ql >= 0 && qb >= 0 && qr >= 0) {
        MsOperand A;
        memset(&A, 0, sizeof A);
        A.kind = MS_OPD_WFLIP; A.p = w; A.C = C; A.Co = Co; A.k = k;
        if (k == 1) A = ms_dense(w, (size_t)C, 1);
        float *wf = k > 1 ? ms_work_get(ms_work_of(1), (size_t)C * Co * k * k) : NULL;
        if (wf) {   /* the flipped kernel once as a dense (C, Co*k*k) matrix, not gathered again
                       for every image and column block: the same values in the same k order, the
                       same bits (WFLIP gathers it in place only if the workspace is not there) */
            const int kk = k * k, ck = Co * kk;
            MS_PARALLEL_FOR_W((double)C * ck)
            for (int c = 0; c < C; c++)
                for (int co = 0; co < Co; co++) {
                    const float *src = w + ((size_t)co * C + c) * kk;
                    float *dst = wf + (size_t)c * ck + (size_t)co * kk;
                    for (int t = 0; t < kk; t++) dst[t] = src[kk - 1 - t];
                }
            A = ms_dense(wf, (size_t)ck, 0);
        }
        for (int n = 0; n < N; n++) {
            const float *gn = dout + (size_t)n * Co * P;
            MsOperand B = k == 1 ? ms_dense(gn, (size_t)P, 0)
                                 : ms_im2col_op(MS_OPD_IM2COL, gn, Co, Ho, Wo, k, 1, qt, ql, H, W);
            ms_conv_gemm(C, H * W, Co * k * k, &A, &B, 1.0f, dx + (size_t)n * C * H * W, (size_t)H * W);
        }
        return;
    }
    /* strided (or over-padded) conv: column chunks of at most ~4M floats */
    int pc = P;
    if ((size_t)CKK * pc > ((size_t)1 << 22)) pc = (int)(((size_t)1 << 22) / (size_t)CKK);
    if (pc < 1) pc = 1;
    float *cols = ms_work_get(ms_work_of(1), (size_t)CKK * pc);
    if (!cols) pc = 0;
    MsOperand A = ms_dense(w, (size_t)CKK, 1);
    for (int n = 0; n < N; n++) {
        const float *gn = dout + (size_t)n * Co * P;
        float *dxn = dx + (size_t)n * C * H * W;
        if (!pc) {   /* no workspace: gather per pixel, same sum in a different order */
            for (int c = 0; c < C; c++)
                for (int y = 0; y < H; y++)
                    for (int xx = 0; xx < W; xx++) {
                        float acc = 0.0f;
                        for (int co = 0; co < Co; co++)
                            for (int ky = 0; ky < k; ky++)
                                for (int kx = 0; kx < k; kx++) {
                                    int ty = y + pt - ky, tx = xx + pl - kx;
                                    if (ty < 0 || tx < 0 || ty % s || tx % s || ty / s >= Ho || tx / s >= Wo) continue;
                                    acc += w[(((size_t)co * C + c) * k + ky) * k + kx] * gn[(size_t)co * P + (size_t)(ty / s) * Wo + tx / s];
                                }
                        dxn[((size_t)c * H + y) * W + xx] += acc;
                    }
            continue;
        }
        for (int p0 = 0; p0 < P; p0 += pc) {
            int np = P - p0 < pc ? P - p0 : pc;
            MsOperand B = ms_dense(gn + p0, (size_t)P, 0);
            ms_conv_gemm(CKK, np, Co, &A, &B, 0.0f, cols, (size_t)np);
            MS_PARALLEL_FOR_W((double)C * k * k * np)
            for (int c = 0; c < C; c++)
                for (int ky = 0; ky < k; ky++)
                    for (int kx = 0; kx < k; kx++) {
                        const float *col = cols + ((size_t)(c * k + ky) * k + kx) * np;
                        int oy = p0 / Wo, ox = p0 % Wo;
                        for (int q = 0; q < np; q++) {
                            int iy = oy * s - pt + ky, ix = ox * s - pl + kx;
                            if (iy >= 0 && iy < H && ix >= 0 && ix < W) dxn[((size_t)c * H + iy) * W + ix] += col[q];
                            if (++ox == Wo) { ox = 0; oy++; }
                        }
                    }
        }
    }
}

void conv2d_forward_ref(float *out, const float *x, const float *w, const float *b, int N, int C, int Co,
                        int H, int W, int k, int s, int pt, int pl, int pb, int pr) {
    int Ho = (H + pt + pb - k) / s + 1, Wo = (W + pl + pr - k) / s + 1;
    for (int n = 0; n < N; n++)
        for (int co = 0; co < Co; co++)
            for (int oy = 0; oy < Ho; oy++)
                for (int ox = 0; ox < Wo; ox++) {
                    double acc = b ? (double)b[co] : 0.0;
                    for (int c = 0; c < C; c++)
                        for (int ky = 0; ky < k; ky++)
                            for (int kx = 0; kx < k; kx++) {
                                int iy = oy * s - pt + ky, ix = ox * s - pl + kx;
                                if (iy < 0 || iy >= H || ix < 0 || ix >= W) continue;
                                acc += (double)w[(((size_t)co * C + c) * k + ky) * k + kx] * x[(((size_t)n * C + c) * H + iy) * W + ix];
                            }
                    out[(((size_t)n * Co + co) * Ho + oy) * Wo + ox] = (float)acc;
                }
}

void conv2d_backward_ref(float *dx, float *dw, float *db, const float *dout, const float *x, const float *w,
                         int N, int C, int Co, int H, int W, int k, int s, int pt, int pl, int pb, int pr) {
    int Ho = (H + pt + pb - k) / s + 1, Wo = (W + pl + pr - k) / s + 1;
#define MS_G(n, co, oy, ox) dout[(((size_t)(n) * Co + (co)) * Ho + (oy)) * Wo + (ox)]
    if (db)
        for (int co = 0; co < Co; co++) {
            double acc = 0.0;
            for (int n = 0; n < N; n++)
                for (int oy = 0; oy < Ho; oy++)
                    for (int ox = 0; ox < Wo; ox++) acc += MS_G(n, co, oy, ox);
            db[co] = (float)(db[co] + acc);
        }
    if (dw)
        for (int co = 0; co < Co; co++)
            for (int c = 0; c < C; c++)
                for (int ky = 0; ky < k; ky++)
                    for (int kx = 0; kx < k; kx++) {
                        double acc = 0.0;
                        for (int n = 0; n < N; n++)
                            for (int oy = 0; oy < Ho; oy++)
                                for (int ox = 0; ox < Wo; ox++) {
                                    int iy = oy * s - pt + ky, ix = ox * s - pl + kx;
                                    if (iy < 0 || iy >= H || ix < 0 || ix >= W) continue;
                                    acc += (double)MS_G(n, co, oy, ox) * x[(((size_t)n * C + c) * H + iy) * W + ix];
                                }
                        float *d = &dw[(((size_t)co * C + c) * k + ky) * k + kx];
                        *d = (float)(*d + acc);
                    }
    if (dx)
        for (int n = 0; n < N; n++)
            for (int c = 0; c < C; c++)
                for (int y = 0; y < H; y++)
                    for (int xx = 0; xx < W; xx++) {
                        double acc = 0.0;
                        for (int co = 0; co < Co; co++)
                            for (int ky = 0; ky < k; ky++)
                                for (int kx = 0; kx < k; kx++) {
                                    int ty = y + pt - ky, tx = xx + pl - kx;
                                    if (ty < 0 || tx < 0 || ty % s || tx % s || ty / s >= Ho || tx / s >= Wo) continue;
                                    acc += (double)w[(((size_t)co * C + c) * k + ky) * k + kx] * MS_G(n, co, ty / s, tx / s);
                                }
                        float *d = &dx[(((size_t)n * C + c) * H + y) * W + xx];
                        *d = (float)(*d + acc);
                    }
#undef MS_G
}

/* ---------------------------------------------------------------------------------------- */
/* Benchmark helpers (mixshow bench)                                                         */
/* ---------------------------------------------------------------------------------------- */
/* FMA peak: 12 independent accumulator chains (more than latency x throughput = 4 x 2 on
 * current cores), operands only in registers. Returns a value derived from the accumulators
 * so the loop cannot be removed; flops per iteration are 12 * 2 * lanes. */
static float ms_peak_scalar(int64_t iters) {
    float c[12], a = 1.0f + 1e-7f, b = 1e-7f;
    for (int i = 0; i < 12; i++) c[i] = (float)i;
    for (int64_t n = 0; n < iters; n++)
        for (int i = 0; i < 12; i++) c[i] = c[i] * a + b;
    float s = 0.0f;
    for (int i = 0; i < 12; i++) s += c[i];
    return s;
}
#define MS_R12(X) X(0) X(1) X(2) X(3) X(4) X(5) X(6) X(7) X(8) X(9) X(10) X(11)
#if defined(MS_X86_KERNELS)
#define MS_PK2_DECL(i) __m256 p##i = _mm256_set1_ps((float)i);
#define MS_PK2_STEP(i) p##i = _mm256_fmadd_ps(p##i, va, vb);
#define MS_PK2_SUM(i) s = _mm256_add_ps(s, p##i);
MS_TARGET_AVX2
static float ms_peak_avx2(int64_t iters) {
    __m256 va = _mm256_set1_ps(1.0f + 1e-7f), vb = _mm256_set1_ps(1e-7f), s = _mm256_setzero_ps();
    MS_R12(MS_PK2_DECL)
    for (int64_t n = 0; n < iters; n++) { MS_R12(MS_PK2_STEP) }
    MS_R12(MS_PK2_SUM)
    float t[8];
    _mm256_storeu_ps(t, s);
    return t[0] + t[7];
}
#define MS_PK5_DECL(i) __m512 p##i = _mm512_set1_ps((float)i);
#define MS_PK5_STEP(i) p##i = _mm512_fmadd_ps(p##i, va, vb);
#define MS_PK5_SUM(i) s = _mm512_add_ps(s, p##i);
MS_TARGET_AVX512
static float ms_peak_avx512(int64_t iters) {
    __m512 va = _mm512_set1_ps(1.0f + 1e-7f), vb = _mm512_set1_ps(1e-7f), s = _mm512_setzero_ps();
    MS_R12(MS_PK5_DECL)
    for (int64_t n = 0; n < iters; n++) { MS_R12(MS_PK5_STEP) }
    MS_R12(MS_PK5_SUM)
    float t[16];
    _mm512_storeu_ps(t, s);
    return t[0] + t[15];
}
#endif
#if defined(MS_NEON_KERNELS)
#define MS_PKN_DECL(i) float32x4_t p##i = vdupq_n_f32((float)i);
#define MS_PKN_STEP(i) p##i = vfmaq_f32(vb, p##i, va);
#define MS_PKN_SUM(i) s = vaddq_f32(s, p##i);
static float ms_peak_neon(int64_t iters) {
    float32x4_t va = vdupq_n_f32(1.0f + 1e-7f), vb = vdupq_n_f32(1e-7f), s = vdupq_n_f32(0.0f);
    MS_R12(MS_PKN_DECL)
    for (int64_t n = 0; n < iters; n++) { MS_R12(MS_PKN_STEP) }
    MS_R12(MS_PKN_SUM)
    return vgetq_lane_f32(s, 0) + vgetq_lane_f32(s, 3);
}
#endif

static float ms_peak_run(MsSimd level, int64_t iters, int *lanes) {
#if defined(MS_X86_KERNELS)
    if (level >= MS_SIMD_AVX512) { *lanes = 16; return ms_peak_avx512(iters); }
    if (level >= MS_SIMD_AVX2) { *lanes = 8; return ms_peak_avx2(iters); }
#elif defined(MS_NEON_KERNELS)
    if (level >= MS_SIMD_NEON) { *lanes = 4; return ms_peak_neon(iters); }
#endif
    (void)level;
    *lanes = 1;
    return ms_peak_scalar(iters);
}

static volatile float ms_bench_sink;

double ms_bench_fma_peak(MsSimd level, int threads, double seconds) {
    if (level > ms_simd()) level = ms_simd();
    int lanes = 1;
    int64_t iters = 1 << 16;
    double t = 0.0;
    for (;;) {                                   /* grow until one run takes >= seconds / 4 */
        double t0 = ms_time();
        ms_bench_sink = ms_peak_run(level, iters, &lanes);
        t = ms_time() - t0;
        if (t >= seconds / 4 || iters > ((int64_t)1 << 40)) break;
        iters *= 2;
    }
    if (t > 0 && t < seconds) iters = (int64_t)((double)iters * seconds / t);
    /* the best of five runs: other work on the machine only ever makes a run slower */
    int ms_par_ = threads > 1, nt = 1;
    double best = 1e30;
    (void)ms_par_;
    iters = iters / 5 + 1;
    for (int rep = 0; rep < 5; rep++) {
#ifdef _OPENMP
        nt = threads < 1 ? 1 : threads;
        double t0 = ms_time();
        _Pragma("omp parallel num_threads(nt) if(ms_par_)")
        {
            int ln = 1;
            float v = ms_peak_run(level, iters, &ln);
            _Pragma("omp critical")
            ms_bench_sink += v;
        }
        t = ms_time() - t0;
#else
        double t0 = ms_time();
        ms_bench_sink = ms_peak_run(level, iters, &lanes);
        t = ms_time() - t0;
#endif
        if (t < best) best = t;
    }
    t = best;
    return (double)nt * iters * 12.0 * 2.0 * lanes / t * 1e-9;
}

/* The explicit alternative measured against the implicit im2col: write the column matrix
 * (C*k*k, Ho*Wo) of each image into cols, then one dense GEMM. */
void ms_bench_conv2d_explicit(float *out, float *cols, const float *x, const float *w, int N, int C, int Co,
                              int H, int W, int k, int s, int p) {
    int Ho = (H + 2 * p - k) / s + 1, Wo = (W + 2 * p - k) / s + 1, P = Ho * Wo, CKK = C * k * k;
    for (int n = 0; n < N; n++) {
        MsOperand B = ms_im2col_op(MS_OPD_IM2COL, x + (size_t)n * C * H * W, C, H, W, k, s, p, p, Ho, Wo);
        MS_PARALLEL_FOR_W((double)CKK * P)
        for (int kk = 0; kk < CKK; kk++) {       /* row kk of cols, one output row at a time */
            for (int j = 0; j < P; j += Wo) ms_pack_b(cols + (size_t)kk * P + j, &B, kk, 1, j, Wo, Wo);
        }
        ms_gemm(0, 0, Co, P, CKK, 1.0f, w, CKK, cols, P, 0.0f, out + (size_t)n * Co * P, P);
    }
}


/* ---------------------------------------------------------------------------------------- */
/* Ops: normalisation, activations, attention, resampling, losses                            */
/* ---------------------------------------------------------------------------------------- */
/* References: torch.nn.GroupNorm / LayerNorm / SiLU / GELU / Softmax / PixelUnshuffle,
 * HF CLIP quick_gelu, diffusers 0.19.3 (attention.py GEGLU, attention_processor.py
 * AttnProcessor, embeddings.py get_timestep_embedding), Mix-of-Show's masked MSE loss.
 *
 * Plain C loops that the compiler vectorises; threads split independent outputs only (rows,
 * (n, group), channels, heads, column chunks, element chunks), so every result is
 * bit-identical for any thread count. Reductions that feed a normalisation accumulate in
 * double. Each nontrivial op has a _ref twin computed entirely in double. */

#define OPS_CHUNK 16384          /* elements per parallel task in elementwise loops */
#define OPS_COLS 64              /* columns per parallel task in column reductions */
#define OPS_MIN(a, b) ((a) < (b) ? (a) : (b))

/* The attention scratch slot of the calling thread: its number in the op's team, after the
 * slots of the ms_run_tasks task it belongs to. */
static int ops_slot(void) {
#ifdef _OPENMP
    return ms_task_slot + (omp_get_level() > ms_task_level ? omp_get_thread_num() : 0);
#else
    return 0;
#endif
}

/* Sum of x[0..n) and of x^2 in double, with 8 independent partial sums combined in a fixed
 * order (vectorisable without reassociation; the result does not depend on threads). */
static void ops_sum_sumsq(const float *x, size_t n, double *sum, double *sumsq) {
    double s[8] = { 0 }, q[8] = { 0 };
    size_t i = 0;
    for (; i + 8 <= n; i += 8)
        for (int j = 0; j < 8; j++) { double v = x[i + j]; s[j] += v; q[j] += v * v; }
    for (; i < n; i++) { double v = x[i]; s[0] += v; q[0] += v * v; }
    *sum = ((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7]));
    *sumsq = ((q[0] + q[1]) + (q[2] + q[3])) + ((q[4] + q[5]) + (q[6] + q[7]));
}

/* Sums over i of g_i = dy_i * wc and of g_i * xhat_i, xhat_i = (x_i - mu) * rstd, in double. */
/* Sums over i of dy_i and of dy_i * xhat_i, xhat_i = (x_i - mu) * rstd, in double. */
static void ops_sum_dy_dyxhat(const float *dy, const float *x, size_t n, float mu, float rstd,
                              double *sdy, double *sdyx) {
    double a[8] = { 0 }, b[8] = { 0 };
    size_t i = 0;
    for (; i + 8 <= n; i += 8)
        for (int j = 0; j < 8; j++) { float xh = (x[i + j] - mu) * rstd; a[j] += dy[i + j]; b[j] += (double)dy[i + j] * xh; }
    for (; i < n; i++) { float xh = (x[i] - mu) * rstd; a[0] += dy[i]; b[0] += (double)dy[i] * xh; }
    *sdy = ((a[0] + a[1]) + (a[2] + a[3])) + ((a[4] + a[5]) + (a[6] + a[7]));
    *sdyx = ((b[0] + b[1]) + (b[2] + b[3])) + ((b[4] + b[5]) + (b[6] + b[7]));
}

static void ops_sum_g_gxhat(const float *dy, const float *x, size_t n, float wc, float mu, float rstd,
                            double *sg, double *sgx) {
    double a[8] = { 0 }, b[8] = { 0 };
    size_t i = 0;
    for (; i + 8 <= n; i += 8)
        for (int j = 0; j < 8; j++) {
            float g = dy[i + j] * wc, xh = (x[i + j] - mu) * rstd;
            a[j] += g; b[j] += (double)g * xh;
        }
    for (; i < n; i++) { float g = dy[i] * wc, xh = (x[i] - mu) * rstd; a[0] += g; b[0] += (double)g * xh; }
    *sg += ((a[0] + a[1]) + (a[2] + a[3])) + ((a[4] + a[5]) + (a[6] + a[7]));
    *sgx += ((b[0] + b[1]) + (b[2] + b[3])) + ((b[4] + b[5]) + (b[6] + b[7]));
}

/* ---- GroupNorm --------------------------------------------------------------------------- */
/* Per (n, g) over M = (C/G)*HW contiguous elements: mu = mean x, var = mean x^2 - mu^2 (biased,
 * sums in double), rstd = 1/sqrt(var + eps); y = x * (rstd w_c) + (b_c - mu rstd w_c), the
 * same per-channel scale/shift form as PyTorch's CPU kernel. */
void groupnorm_forward(float *out, float *mean, float *rstd, const float *x, const float *w,
                       const float *b, int N, int C, int HW, int G, float eps) {
    int Cg = C / G;
    size_t M = (size_t)Cg * HW;
    MS_PARALLEL_FOR_W((double)N * G * M)
    for (int ng = 0; ng < N * G; ng++) {
        const float *xg = x + (size_t)ng * M;
        float *og = out + (size_t)ng * M;
        double s, ss;
        ops_sum_sumsq(xg, M, &s, &ss);
        double mu = s / (double)M, var = ss / (double)M - mu * mu;
        if (var < 0.0) var = 0.0;
        float fmu = (float)mu, frs = (float)(1.0 / sqrt(var + (double)eps));
        if (mean) mean[ng] = fmu;
        if (rstd) rstd[ng] = frs;
        for (int cc = 0; cc < Cg; cc++) {
            int c = (ng % G) * Cg + cc;
            float sc = frs * (w ? w[c] : 1.0f), sh = (b ? b[c] : 0.0f) - fmu * sc;
            const float *xc = xg + (size_t)cc * HW;
            float *oc = og + (size_t)cc * HW;
            for (int i = 0; i < HW; i++) oc[i] = xc[i] * sc + sh;
        }
    }
}

void groupnorm_forward_ref(float *out, float *mean, float *rstd, const float *x, const float *w,
                           const float *b, int N, int C, int HW, int G, float eps) {
    int Cg = C / G;
    size_t M = (size_t)Cg * HW;
    for (int ng = 0; ng < N * G; ng++) {
        const float *xg = x + (size_t)ng * M;
        double mu = 0.0, var = 0.0;
        for (size_t i = 0; i < M; i++) mu += xg[i];
        mu /= (double)M;
        for (size_t i = 0; i < M; i++) var += ((double)xg[i] - mu) * ((double)xg[i] - mu);
        var /= (double)M;
        double rs = 1.0 / sqrt(var + (double)eps);
        if (mean) mean[ng] = (float)mu;
        if (rstd) rstd[ng] = (float)rs;
        for (size_t i = 0; i < M; i++) {
            int c = (ng % G) * Cg + (int)(i / (size_t)HW);
            out[(size_t)ng * M + i] = (float)(((double)xg[i] - mu) * rs * (w ? w[c] : 1.0) + (b ? b[c] : 0.0));
        }
    }
}

/* GroupNorm backward, per (n, group) over M = (C/G)*HW elements:
 *   xhat = (x - mu) * rstd,  y = w_c * xhat + b_c,  g = dy * w_c
 *   db_c += sum_{n,hw} dy,   dw_c += sum_{n,hw} dy * xhat
 *   dx   += rstd * (g - mean(g) - xhat * mean(g * xhat))          [tests/test_grad.c: groupnorm]
 * (from dmu, dvar of the biased statistics; mean() is over the M elements of the group) */
void groupnorm_backward(float *dx, float *dw, float *db, const float *dout, const float *x,
                        const float *mean, const float *rstd, const float *w, int N, int C, int HW, int G) {
    int Cg = C / G;
    size_t M = (size_t)Cg * HW;
    if (dx) {
        MS_PARALLEL_FOR_W((double)N * G * M)
        for (int ng = 0; ng < N * G; ng++) {
            size_t off = (size_t)ng * M;
            float mu = mean[ng], rs = rstd[ng];
            double sg = 0.0, sgx = 0.0;
            for (int cc = 0; cc < Cg; cc++) {
                int c = (ng % G) * Cg + cc;
                ops_sum_g_gxhat(dout + off + (size_t)cc * HW, x + off + (size_t)cc * HW, (size_t)HW,
                                w ? w[c] : 1.0f, mu, rs, &sg, &sgx);
            }
            float mg = (float)(sg / (double)M), mgx = (float)(sgx / (double)M);
            for (int cc = 0; cc < Cg; cc++) {
                int c = (ng % G) * Cg + cc;
                float wc = w ? w[c] : 1.0f;
                const float *dy = dout + off + (size_t)cc * HW, *xc = x + off + (size_t)cc * HW;
                float *d = dx + off + (size_t)cc * HW;
                for (int i = 0; i < HW; i++) {
                    float xh = (xc[i] - mu) * rs;
                    d[i] += rs * (dy[i] * wc - mg - xh * mgx);
                }
            }
        }
    }
    if (dw || db) {
        MS_PARALLEL_FOR_W((double)N * C * HW)
        for (int c = 0; c < C; c++) {
            double sw = 0.0, sb = 0.0;
            for (int n = 0; n < N; n++) {
                int ng = n * G + c / Cg;
                size_t off = ((size_t)n * C + c) * HW;
                double s1, s2;
                ops_sum_dy_dyxhat(dout + off, x + off, (size_t)HW, mean[ng], rstd[ng], &s1, &s2);
                sb += s1; sw += s2;
            }
            if (dw) dw[c] += (float)sw;
            if (db) db[c] += (float)sb;
        }
    }
}

void groupnorm_backward_ref(float *dx, float *dw, float *db, const float *dout, const float *x,
                            const float *mean, const float *rstd, const float *w, int N, int C, int HW, int G) {
    int Cg = C / G;
    size_t M = (size_t)Cg * HW;
    for (int ng = 0; ng < N * G && dx; ng++) {
        size_t off = (size_t)ng * M;
        double mu = mean[ng], rs = rstd[ng], sg = 0.0, sgx = 0.0;
        for (size_t i = 0; i < M; i++) {
            int c = (ng % G) * Cg + (int)(i / (size_t)HW);
            double g = (double)dout[off + i] * (w ? w[c] : 1.0), xh = ((double)x[off + i] - mu) * rs;
            sg += g; sgx += g * xh;
        }
        for (size_t i = 0; i < M; i++) {
            int c = (ng % G) * Cg + (int)(i / (size_t)HW);
            double g = (double)dout[off + i] * (w ? w[c] : 1.0), xh = ((double)x[off + i] - mu) * rs;
            dx[off + i] += (float)(rs * (g - sg / (double)M - xh * sgx / (double)M));
        }
    }
    for (int c = 0; c < C; c++) {
        double sw = 0.0, sb = 0.0;
        for (int n = 0; n < N; n++) {
            int ng = n * G + c / Cg;
            for (int i = 0; i < HW; i++) {
                size_t k = ((size_t)n * C + c) * HW + i;
                sb += dout[k];
                sw += (double)dout[k] * (((double)x[k] - mean[ng]) * rstd[ng]);
            }
        }
        if (dw) dw[c] += (float)sw;
        if (db) db[c] += (float)sb;
    }
}

/* ---- LayerNorm --------------------------------------------------------------------------- */
/* Per row of D: mu, var (biased, sums in double), rstd = 1/sqrt(var + eps),
 * y = (x - mu) * rstd * w + b. */
void layernorm_forward(float *out, float *mean, float *rstd, const float *x, const float *w,
                       const float *b, int N, int D, float eps) {
    MS_PARALLEL_FOR_W((double)N * D)
    for (int n = 0; n < N; n++) {
        const float *xr = x + (size_t)n * D;
        float *o = out + (size_t)n * D;
        double s, ss;
        ops_sum_sumsq(xr, (size_t)D, &s, &ss);
        double mu = s / D, var = ss / D - mu * mu;
        if (var < 0.0) var = 0.0;
        float fmu = (float)mu, frs = (float)(1.0 / sqrt(var + (double)eps));
        if (mean) mean[n] = fmu;
        if (rstd) rstd[n] = frs;
        for (int i = 0; i < D; i++) o[i] = (xr[i] - fmu) * frs * (w ? w[i] : 1.0f) + (b ? b[i] : 0.0f);
    }
}

void layernorm_forward_ref(float *out, float *mean, float *rstd, const float *x, const float *w,
                           const float *b, int N, int D, float eps) {
    for (int n = 0; n < N; n++) {
        const float *xr = x + (size_t)n * D;
        double mu = 0.0, var = 0.0;
        for (int i = 0; i < D; i++) mu += xr[i];
        mu /= D;
        for (int i = 0; i < D; i++) var += ((double)xr[i] - mu) * ((double)xr[i] - mu);
        var /= D;
        double rs = 1.0 / sqrt(var + (double)eps);
        if (mean) mean[n] = (float)mu;
        if (rstd) rstd[n] = (float)rs;
        for (int i = 0; i < D; i++)
            out[(size_t)n * D + i] = (float)(((double)xr[i] - mu) * rs * (w ? w[i] : 1.0) + (b ? b[i] : 0.0));
    }
}

/* LayerNorm backward, per row over D elements (same algebra as GroupNorm with one group):
 *   xhat = (x - mu) * rstd,  g = dy * w
 *   db += sum_rows dy,  dw += sum_rows dy * xhat
 *   dx += rstd * (g - mean(g) - xhat * mean(g * xhat))              [tests/test_grad.c: layernorm]
 * dw, db: one task per chunk of OPS_COLS columns, rows summed in order in double. */
void layernorm_backward(float *dx, float *dw, float *db, const float *dout, const float *x,
                        const float *mean, const float *rstd, const float *w, int N, int D) {
    if (dx) {
        MS_PARALLEL_FOR_W((double)N * D)
        for (int n = 0; n < N; n++) {
            const float *dy = dout + (size_t)n * D, *xr = x + (size_t)n * D;
            float *d = dx + (size_t)n * D, mu = mean[n], rs = rstd[n];
            double sg = 0.0, sgx = 0.0;
            if (w) {
                for (int i = 0; i < D; i++) {     /* w varies per element: plain double loop */
                    float g = dy[i] * w[i], xh = (xr[i] - mu) * rs;
                    sg += g; sgx += (double)g * xh;
                }
            } else {
                ops_sum_g_gxhat(dy, xr, (size_t)D, 1.0f, mu, rs, &sg, &sgx);
            }
            float mg = (float)(sg / D), mgx = (float)(sgx / D);
            for (int i = 0; i < D; i++) {
                float xh = (xr[i] - mu) * rs;
                d[i] += rs * (dy[i] * (w ? w[i] : 1.0f) - mg - xh * mgx);
            }
        }
    }
    if (dw || db) {
        int nchunk = (D + OPS_COLS - 1) / OPS_COLS;
        MS_PARALLEL_FOR_W((double)N * D)
        for (int ch = 0; ch < nchunk; ch++) {
            int i0 = ch * OPS_COLS, i1 = OPS_MIN(D, i0 + OPS_COLS);
            double sw[OPS_COLS] = { 0 }, sb[OPS_COLS] = { 0 };
            for (int n = 0; n < N; n++) {
                const float *dy = dout + (size_t)n * D, *xr = x + (size_t)n * D;
                float mu = mean[n], rs = rstd[n];
                for (int i = i0; i < i1; i++) {
                    sb[i - i0] += dy[i];
                    sw[i - i0] += (double)dy[i] * ((xr[i] - mu) * rs);
                }
            }
            for (int i = i0; i < i1; i++) {
                if (dw) dw[i] += (float)sw[i - i0];
                if (db) db[i] += (float)sb[i - i0];
            }
        }
    }
}

void layernorm_backward_ref(float *dx, float *dw, float *db, const float *dout, const float *x,
                            const float *mean, const float *rstd, const float *w, int N, int D) {
    for (int n = 0; n < N && dx; n++) {
        size_t o = (size_t)n * D;
        double mu = mean[n], rs = rstd[n], sg = 0.0, sgx = 0.0;
        for (int i = 0; i < D; i++) {
            double g = (double)dout[o + i] * (w ? w[i] : 1.0), xh = ((double)x[o + i] - mu) * rs;
            sg += g; sgx += g * xh;
        }
        for (int i = 0; i < D; i++) {
            double g = (double)dout[o + i] * (w ? w[i] : 1.0), xh = ((double)x[o + i] - mu) * rs;
            dx[o + i] += (float)(rs * (g - sg / D - xh * sgx / D));
        }
    }
    for (int i = 0; i < D; i++) {
        double sw = 0.0, sb = 0.0;
        for (int n = 0; n < N; n++) {
            size_t k = (size_t)n * D + i;
            sb += dout[k];
            sw += (double)dout[k] * (((double)x[k] - mean[n]) * rstd[n]);
        }
        if (dw) dw[i] += (float)sw;
        if (db) db[i] += (float)sb;
    }
}

/* ---- Elementwise activations --------------------------------------------------------------- */
/* Elementwise loops run as parallel tasks of OPS_CHUNK consecutive elements:
 *   for (int64_t c = 0; c < ops_nchunks(n); c++) elements [c*OPS_CHUNK, min(n, (c+1)*OPS_CHUNK)) */
static int64_t ops_nchunks(size_t n) { return (int64_t)((n + OPS_CHUNK - 1) / OPS_CHUNK); }

#define OPS_SQRT1_2 0.70710678118654752440      /* 1/sqrt(2) */
#define OPS_INV_SQRT_2PI 0.39894228040143267794 /* 1/sqrt(2 pi) */

/* e^(k x[i]) for a span, through double and rounded once (ops_expf_exact_vec, with the erf
 * kernels below): libm's expf called per element was the costliest part of SiLU. OPS_EXP_SPAN
 * values at a time on the stack; the arithmetic around it stays the scalar expressions. */
#define OPS_EXP_SPAN 256
static void ops_expf_exact_vec(float *y, const float *x, float k, size_t n);

/* silu(x) = x * s, s = sigmoid(x) = 1/(1 + e^-x) (torch: x / (1 + exp(-x))) */
void silu_forward(float *out, const float *x, size_t n) {
    int64_t nch = ops_nchunks(n);
    MS_PARALLEL_FOR_W(8.0 * n)
    for (int64_t c = 0; c < nch; c++) {
        size_t a = (size_t)c * OPS_CHUNK, e = OPS_MIN(n, a + OPS_CHUNK);
        float t[OPS_EXP_SPAN];
        for (size_t i0 = a; i0 < e; i0 += OPS_EXP_SPAN) {
            size_t m = OPS_MIN(OPS_EXP_SPAN, e - i0);
            ops_expf_exact_vec(t, x + i0, -1.0f, m);
            for (size_t i = 0; i < m; i++) out[i0 + i] = x[i0 + i] / (1.0f + t[i]);
        }
    }
}
/* silu'(x) = s + x s (1 - s) = s (1 + x (1 - s));  dx += dout * silu'(x) */
void silu_backward(float *dx, const float *dout, const float *x, size_t n) {
    int64_t nch = ops_nchunks(n);
    MS_PARALLEL_FOR_W(8.0 * n)
    for (int64_t c = 0; c < nch; c++) {
        size_t a = (size_t)c * OPS_CHUNK, e = OPS_MIN(n, a + OPS_CHUNK);
        float t[OPS_EXP_SPAN];
        for (size_t i0 = a; i0 < e; i0 += OPS_EXP_SPAN) {
            size_t m = OPS_MIN(OPS_EXP_SPAN, e - i0);
            ops_expf_exact_vec(t, x + i0, -1.0f, m);
            for (size_t i = 0; i < m; i++) {
                float s = 1.0f / (1.0f + t[i]), xi = x[i0 + i];
                dx[i0 + i] += dout[i0 + i] * (s * (1.0f + xi * (1.0f - s)));
            }
        }
    }
}
void silu_forward_ref(float *out, const float *x, size_t n) {
    for (size_t i = 0; i < n; i++) out[i] = (float)((double)x[i] / (1.0 + exp(-(double)x[i])));
}
void silu_backward_ref(float *dx, const float *dout, const float *x, size_t n) {
    for (size_t i = 0; i < n; i++) {
        double s = 1.0 / (1.0 + exp(-(double)x[i]));
        dx[i] += (float)((double)dout[i] * s * (1.0 + x[i] * (1.0 - s)));
    }
}

/* One AdamW update of n parameters (models/optim.c ms_adamw_step computes the float constants
 * from torch's doubles): per element, in this order, each operation rounded to float,
 *   p *= decay;  m = fma(g, 1-b1, b1 m);  v = fma((1-b2) g, g, b2 v);
 *   p += neg_step m / (sqrt(v) / sqrt(bc2) + eps)
 * The AVX-512 path does the same correctly rounded operations 16 lanes at a time (sqrt and
 * division are IEEE in both), so it equals the scalar twin to the bit, for any thread count. */
void ms_adamw_update_ref(float *p, const float *g, float *m, float *v, size_t n, const MsAdamwConst *k) {
    for (size_t i = 0; i < n; i++) {
        float pi = p[i] * k->decay;
        float gi = g[i];
        float mi = fmaf(gi, k->one_b1, m[i] * k->b1);
        float vi = fmaf(k->one_b2 * gi, gi, v[i] * k->b2);
        float den = sqrtf(vi) / k->bc2_sqrt + k->eps;
        p[i] = pi + (k->neg_step * mi) / den;
        m[i] = mi;
        v[i] = vi;
    }
}
#if defined(MS_X86_KERNELS)
MS_TARGET_AVX512
static void ms_adamw_update_avx512(float *p, const float *g, float *m, float *v, size_t n, const MsAdamwConst *k) {
    const __m512 decay = _mm512_set1_ps(k->decay), b1 = _mm512_set1_ps(k->b1), one_b1 = _mm512_set1_ps(k->one_b1);
    const __m512 b2 = _mm512_set1_ps(k->b2), one_b2 = _mm512_set1_ps(k->one_b2), bc2 = _mm512_set1_ps(k->bc2_sqrt);
    const __m512 eps = _mm512_set1_ps(k->eps), neg_step = _mm512_set1_ps(k->neg_step);
    size_t i = 0;
    for (; i + 16 <= n; i += 16) {
        __m512 pi = _mm512_mul_ps(_mm512_loadu_ps(p + i), decay), gi = _mm512_loadu_ps(g + i);
        __m512 mi = _mm512_fmadd_ps(gi, one_b1, _mm512_mul_ps(_mm512_loadu_ps(m + i), b1));
        __m512 vi = _mm512_fmadd_ps(_mm512_mul_ps(one_b2, gi), gi, _mm512_mul_ps(_mm512_loadu_ps(v + i), b2));
        __m512 den = _mm512_add_ps(_mm512_div_ps(_mm512_sqrt_ps(vi), bc2), eps);
        _mm512_storeu_ps(p + i, _mm512_add_ps(pi, _mm512_div_ps(_mm512_mul_ps(neg_step, mi), den)));
        _mm512_storeu_ps(m + i, mi);
        _mm512_storeu_ps(v + i, vi);
    }
    ms_adamw_update_ref(p + i, g + i, m + i, v + i, n - i, k);
}
#endif
void ms_adamw_update(float *p, const float *g, float *m, float *v, size_t n, const MsAdamwConst *k) {
    int64_t nch = ops_nchunks(n);
    MS_PARALLEL_FOR_W(8.0 * n)
    for (int64_t c = 0; c < nch; c++) {
        size_t a = (size_t)c * OPS_CHUNK, e = OPS_MIN(n, a + OPS_CHUNK);
#if defined(MS_X86_KERNELS)
        if (ms_simd() >= MS_SIMD_AVX512) { ms_adamw_update_avx512(p + a, g + a, m + a, v + a, e - a, k); continue; }
#endif
        ms_adamw_update_ref(p + a, g + a, m + a, v + a, e - a, k);
    }
}

/* gelu(x) = x Phi(x), Phi(x) = 0.5 (1 + erf(x / sqrt 2)) (torch: x * 0.5 * (1 + erf(x * M_SQRT1_2)));
 * gelu'(x) = Phi(x) + x phi(x), phi(x) = exp(-x^2/2) / sqrt(2 pi). erf and exp are this file's
 * (ops_erf_poly, ops_expf_poly below; vectors of them at the SIMD levels): glibc's erff, called
 * once per element, took 12% of an ED-LoRA step. The spans (below, after the exp kernels):
 *   ops_gelu_span:  out[i] = gelu(x[i]), or h[i] gelu(x[i]) when h (GEGLU)
 *   ops_gelu_bwd_span: dx[i] += dy[i] gelu'(x[i]); with h (GEGLU): dh[i] += dy[i] gelu(x[i]),
 *                      dx[i] += (dy[i] h[i]) gelu'(x[i])
 * each element's operations in the order written, at every SIMD level (FMA only inside erf
 * and exp). */
static void ops_gelu_span(float *out, const float *x, const float *h, size_t n);
static void ops_gelu_bwd_span(float *dx, float *dh, const float *dy, const float *x, const float *h, size_t n);
static double ops_gelu_d(double x) { return 0.5 * x * (1.0 + erf(x * OPS_SQRT1_2)); }
static double ops_gelu_grad_d(double x) { return 0.5 * (1.0 + erf(x * OPS_SQRT1_2)) + x * OPS_INV_SQRT_2PI * exp(-0.5 * x * x); }

void gelu_forward(float *out, const float *x, size_t n) {
    int64_t nch = ops_nchunks(n);
    MS_PARALLEL_FOR_W(8.0 * n)
    for (int64_t c = 0; c < nch; c++) {
        size_t a = (size_t)c * OPS_CHUNK, e = OPS_MIN(n, a + OPS_CHUNK);
        ops_gelu_span(out + a, x + a, NULL, e - a);
    }
}
void gelu_backward(float *dx, const float *dout, const float *x, size_t n) {
    int64_t nch = ops_nchunks(n);
    MS_PARALLEL_FOR_W(8.0 * n)
    for (int64_t c = 0; c < nch; c++) {
        size_t a = (size_t)c * OPS_CHUNK, e = OPS_MIN(n, a + OPS_CHUNK);
        ops_gelu_bwd_span(dx + a, NULL, dout + a, x + a, NULL, e - a);
    }
}
void gelu_forward_ref(float *out, const float *x, size_t n) {
    for (size_t i = 0; i < n; i++) out[i] = (float)ops_gelu_d(x[i]);
}
void gelu_backward_ref(float *dx, const float *dout, const float *x, size_t n) {
    for (size_t i = 0; i < n; i++) dx[i] += (float)((double)dout[i] * ops_gelu_grad_d(x[i]));
}

/* quick_gelu(x) = x s, s = sigmoid(1.702 x) (HF CLIP: input * torch.sigmoid(1.702 * input));
 * derivative s + 1.702 x s (1 - s). */
void quick_gelu_forward(float *out, const float *x, size_t n) {
    int64_t nch = ops_nchunks(n);
    MS_PARALLEL_FOR_W(8.0 * n)
    for (int64_t c = 0; c < nch; c++) {
        size_t a = (size_t)c * OPS_CHUNK, e = OPS_MIN(n, a + OPS_CHUNK);
        float t[OPS_EXP_SPAN];
        for (size_t i0 = a; i0 < e; i0 += OPS_EXP_SPAN) {
            size_t m = OPS_MIN(OPS_EXP_SPAN, e - i0);
            ops_expf_exact_vec(t, x + i0, -1.702f, m);
            for (size_t i = 0; i < m; i++) out[i0 + i] = x[i0 + i] * (1.0f / (1.0f + t[i]));
        }
    }
}
void quick_gelu_backward(float *dx, const float *dout, const float *x, size_t n) {
    int64_t nch = ops_nchunks(n);
    MS_PARALLEL_FOR_W(8.0 * n)
    for (int64_t c = 0; c < nch; c++) {
        size_t a = (size_t)c * OPS_CHUNK, e = OPS_MIN(n, a + OPS_CHUNK);
        float t[OPS_EXP_SPAN];
        for (size_t i0 = a; i0 < e; i0 += OPS_EXP_SPAN) {
            size_t m = OPS_MIN(OPS_EXP_SPAN, e - i0);
            ops_expf_exact_vec(t, x + i0, -1.702f, m);
            for (size_t i = 0; i < m; i++) {
                float s = 1.0f / (1.0f + t[i]), xi = x[i0 + i];
                dx[i0 + i] += dout[i0 + i] * (s + 1.702f * xi * s * (1.0f - s));
            }
        }
    }
}
void quick_gelu_forward_ref(float *out, const float *x, size_t n) {
    for (size_t i = 0; i < n; i++) out[i] = (float)((double)x[i] / (1.0 + exp(-1.702 * (double)x[i])));
}
void quick_gelu_backward_ref(float *dx, const float *dout, const float *x, size_t n) {
    for (size_t i = 0; i < n; i++) {
        double s = 1.0 / (1.0 + exp(-1.702 * (double)x[i]));
        dx[i] += (float)((double)dout[i] * (s + 1.702 * x[i] * s * (1.0 - s)));
    }
}

/* relu(x) = max(x, 0) (NaN passes through, as in torch); relu'(x) = [x > 0]. */
void relu_forward(float *out, const float *x, size_t n) {
    int64_t nch = ops_nchunks(n);
    MS_PARALLEL_FOR_W((double)n)
    for (int64_t c = 0; c < nch; c++) {
        size_t a = (size_t)c * OPS_CHUNK, e = OPS_MIN(n, a + OPS_CHUNK);
        for (size_t i = a; i < e; i++) out[i] = x[i] < 0.0f ? 0.0f : x[i];
    }
}
void relu_backward(float *dx, const float *dout, const float *x, size_t n) {
    int64_t nch = ops_nchunks(n);
    MS_PARALLEL_FOR_W((double)n)
    for (int64_t c = 0; c < nch; c++) {
        size_t a = (size_t)c * OPS_CHUNK, e = OPS_MIN(n, a + OPS_CHUNK);
        for (size_t i = a; i < e; i++) dx[i] += x[i] > 0.0f ? dout[i] : 0.0f;
    }
}

/* ---- GEGLU ------------------------------------------------------------------------------- */
/* out[n, j] = h * gelu(g), h = x[n, j], g = x[n, D + j]
 * backward: dh += dout * gelu(g),  dg += dout * h * gelu'(g) */
void geglu_forward(float *out, const float *x, int N, int D) {
    MS_PARALLEL_FOR_W(8.0 * N * D)
    for (int n = 0; n < N; n++) {
        const float *h = x + (size_t)n * 2 * D, *g = h + D;
        ops_gelu_span(out + (size_t)n * D, g, h, (size_t)D);
    }
}
void geglu_backward(float *dx, const float *dout, const float *x, int N, int D) {
    MS_PARALLEL_FOR_W(8.0 * N * D)
    for (int n = 0; n < N; n++) {
        const float *h = x + (size_t)n * 2 * D, *g = h + D, *dy = dout + (size_t)n * D;
        float *dh = dx + (size_t)n * 2 * D, *dg = dh + D;
        ops_gelu_bwd_span(dg, dh, dy, g, h, (size_t)D);
    }
}
void geglu_forward_ref(float *out, const float *x, int N, int D) {
    for (int n = 0; n < N; n++)
        for (int j = 0; j < D; j++) {
            size_t r = (size_t)n * 2 * D;
            out[(size_t)n * D + j] = (float)((double)x[r + j] * ops_gelu_d(x[r + D + j]));
        }
}
void geglu_backward_ref(float *dx, const float *dout, const float *x, int N, int D) {
    for (int n = 0; n < N; n++)
        for (int j = 0; j < D; j++) {
            size_t r = (size_t)n * 2 * D;
            double dy = dout[(size_t)n * D + j], h = x[r + j], g = x[r + D + j];
            dx[r + j] += (float)(dy * ops_gelu_d(g));
            dx[r + D + j] += (float)(dy * h * ops_gelu_grad_d(g));
        }
}

/* ---- Softmax ----------------------------------------------------------------------------- */
/* y_i = exp(x_i - max) / sum_j exp(x_j - max); the sum in double, then multiplied by 1/sum. */
static void ops_softmax_row(float *o, const float *x, int D) {
    float m = -INFINITY;
    for (int i = 0; i < D; i++) m = x[i] > m ? x[i] : m;
    double s = 0.0;
    for (int i = 0; i < D; i++) { o[i] = expf(x[i] - m); s += o[i]; }
    float inv = (float)(1.0 / s);
    for (int i = 0; i < D; i++) o[i] *= inv;
}

void softmax_forward(float *out, const float *x, int N, int D) {
    MS_PARALLEL_FOR_W(8.0 * N * D)
    for (int n = 0; n < N; n++) ops_softmax_row(out + (size_t)n * D, x + (size_t)n * D, D);
}

/* Softmax backward, per row: dx_i += y_i (dy_i - sum_j dy_j y_j). */
void softmax_backward(float *dx, const float *dout, const float *out, int N, int D) {
    MS_PARALLEL_FOR_W((double)N * D)
    for (int n = 0; n < N; n++) {
        const float *y = out + (size_t)n * D, *dy = dout + (size_t)n * D;
        float *d = dx + (size_t)n * D;
        double s = 0.0;
        for (int i = 0; i < D; i++) s += (double)dy[i] * y[i];
        float fs = (float)s;
        for (int i = 0; i < D; i++) d[i] += y[i] * (dy[i] - fs);
    }
}

void softmax_forward_ref(float *out, const float *x, int N, int D) {
    for (int n = 0; n < N; n++) {
        const float *xr = x + (size_t)n * D;
        double m = -INFINITY, s = 0.0;
        for (int i = 0; i < D; i++) m = xr[i] > m ? xr[i] : m;
        for (int i = 0; i < D; i++) s += exp((double)xr[i] - m);
        for (int i = 0; i < D; i++) out[(size_t)n * D + i] = (float)(exp((double)xr[i] - m) / s);
    }
}

void softmax_backward_ref(float *dx, const float *dout, const float *out, int N, int D) {
    for (int n = 0; n < N; n++) {
        size_t o = (size_t)n * D;
        double s = 0.0;
        for (int i = 0; i < D; i++) s += (double)dout[o + i] * out[o + i];
        for (int i = 0; i < D; i++) dx[o + i] += (float)((double)out[o + i] * ((double)dout[o + i] - s));
    }
}

/* ---- Attention --------------------------------------------------------------------------- */
/* Memory-efficient scaled dot-product attention (the FlashAttention recipe, Dao et al. 2022,
 * without the online rescaling: a block of OPS_ATT_BLOCK query rows sees all its keys at once).
 * Per (b, h) and block of query rows Q (rows, Dh), keys K, values V (Tk, Dh):
 *   S = scale Q K^T  (rows, Tk), causal entries j > i set to -inf
 *   m_i = max_j S_ij,  l_i = sum_j exp(S_ij - m_i),  P = exp(S - m) / l,  O = P V
 *   lse_i = m_i + log l_i  (saved: backward rebuilds P = exp(S - lse) without m or l)
 * Scratch is (rows, Tk) per thread, never (Tq, Tk). */
#define OPS_ATT_BLOCK 64

/* Per-thread scratch: slot t belongs to OpenMP thread t (inside an ms_run_tasks task: slot
 * task thread + t, ops_slot). Allocated on first use and grown only when a larger size is first
 * needed (always in serial code, before the parallel region), so steady-state calls never
 * allocate. One caller at a time, or one per ms_run_tasks task: attention is not to be called
 * from threads of one's own. When the scratch cannot be had (allocation failure or ops_scratch_limit),
 * attention runs a streaming row-at-a-time path that needs no scratch at all. */
static MsWork *ops_ws;
static int ops_ws_slots;
static size_t ops_ws_limit;                            /* bytes per thread; 0 = no limit */

void ops_scratch_limit(size_t max_bytes_per_thread) { ops_ws_limit = max_bytes_per_thread; }

void ops_scratch_free(void) {
    for (int t = 0; t < ops_ws_slots; t++) ms_work_free(&ops_ws[t]);
    free(ops_ws);
    ops_ws = NULL;
    ops_ws_slots = 0;
}

/* At least n slots in the table (1), else 0. Outside ms_run_tasks only: the table moves. */
static int ops_ws_grow_slots(int n) { return ms_work_table_grow(&ops_ws, &ops_ws_slots, n); }

/* 1 when the calling thread's slots (ops_slot of its team's threads 0..nthreads-1) each hold
 * >= nfloats floats, else 0 (use the streaming path). Inside a task only the task's own slots
 * are touched (ms_run_tasks grew the table first). */
static int ops_ws_reserve(int nthreads, size_t nfloats) {
    if (nfloats > SIZE_MAX / sizeof(float)) return 0;
    if (ops_ws_limit && nfloats * sizeof(float) > ops_ws_limit) return 0;
    int t0 = ms_task_slot;
    if (t0 + nthreads > ops_ws_slots && (ms_task_level || !ops_ws_grow_slots(t0 + nthreads))) return 0;
    for (int t = t0; t < t0 + nthreads; t++)
        if (!ms_work_get(&ops_ws[t], nfloats)) return 0;
    return 1;
}

/* Keys visible to query row i: all Tk, or j <= i when causal. */
static int ops_att_visible(int i, int Tk, int causal) { return causal ? OPS_MIN(Tk, i + 1) : Tk; }

/* One block of query rows i0 .. i0+rows-1 of one (b, h). q, out point at row i0 of the head,
 * k, v at row 0; lse at row i0 (or NULL); S is (rows, Tk) scratch. Row stride of q,k,v,out: HD. */
static void ops_att_fwd_block(float *out, float *lse, const float *q, const float *k, const float *v,
                              float *S, int i0, int rows, int Tk, int HD, int Dh, int causal, float scale) {
    int tk = causal ? OPS_MIN(Tk, i0 + rows) : Tk;       /* columns any row of the block sees */
    ms_gemm(0, 1, rows, tk, Dh, scale, q, HD, k, HD, 0.0f, S, tk);
    for (int r = 0; r < rows; r++) {
        float *s = S + (size_t)r * tk, m = -INFINITY;
        int vis = ops_att_visible(i0 + r, tk, causal);
        for (int j = 0; j < vis; j++) m = s[j] > m ? s[j] : m;
        double l = 0.0;
        for (int j = 0; j < vis; j++) { s[j] = expf(s[j] - m); l += s[j]; }
        float inv = (float)(1.0 / l);
        for (int j = 0; j < vis; j++) s[j] *= inv;
        for (int j = vis; j < tk; j++) s[j] = 0.0f;
        if (lse) lse[r] = (float)((double)m + log(l));
    }
    ms_gemm(0, 0, rows, Dh, tk, 1.0f, S, tk, v, HD, 0.0f, out, HD);
}

/* Streaming path for one query row (no scratch): online softmax (Milakov & Gimelshein 2018),
 * accumulating the unnormalised output in o and rescaling when the running max grows. */
static void ops_att_fwd_row(float *o, float *lse, const float *qi, const float *k, const float *v,
                            int vis, int HD, int Dh, float scale) {
    float m = -INFINITY;
    double l = 0.0;
    for (int d = 0; d < Dh; d++) o[d] = 0.0f;
    for (int j = 0; j < vis; j++) {
        const float *kj = k + (size_t)j * HD, *vj = v + (size_t)j * HD;
        float s = 0.0f;
        for (int d = 0; d < Dh; d++) s += qi[d] * kj[d];
        s *= scale;
        if (s > m) {
            float c = expf(m - s);                        /* 0 on the first key */
            for (int d = 0; d < Dh; d++) o[d] *= c;
            l *= c;
            m = s;
        }
        float p = expf(s - m);
        l += p;
        for (int d = 0; d < Dh; d++) o[d] += p * vj[d];
    }
    float inv = (float)(1.0 / l);
    for (int d = 0; d < Dh; d++) o[d] *= inv;
    if (lse) *lse = (float)((double)m + log(l));
}

/* ---- Attention fast path (x86 AVX2+FMA / AVX-512) ---------------------------------------- */
/* The algorithm of ops_att_fwd_block / ops_att_bwd_block, laid out so that every step is a
 * register-tiled loop and the softmax runs DOWN the columns of a transposed score block, one
 * query per SIMD lane (vertical max/exp/sum: no horizontal reductions, and each query's sum
 * runs over its keys in key order, in double, whatever the thread count):
 *   per (b, h): K packed once into MR_S-key panels (and, backward, V likewise and K into
 *   MR_D-channel panels); forward: V packed once into MR_D-channel panels;
 *   per block of NQ query rows (NQ = 2 vectors):
 *     S^T = scale K Q^T                   (tk, NQ)   ms_ukr_* (MR_S keys x NQ queries, depth Dh)
 *     m = max_j S^T[j,:],  P^T = exp(S^T - m),  l = sum_j P^T[j,:]  (lane-wise)
 *     O^T = (V^T P^T) / l                 (Dh, NQ)   MR_D channels x NQ queries, depth tk
 *   backward, query blocks in order (dK, dV sum over them):
 *     S^T as above, dP^T = V dO^T, P^T = exp(S^T - lse), dS^T = P^T o (dP^T - D)
 *     dV += P^T dO,  dK += scale dS^T Q  (vectors along Dh, MR_K keys x up to 3 vectors)
 *     dQ^T += scale K^T dS^T             (as O^T)
 * Dh is tiled by MR_D = 8 (AVX-512) / 5 (AVX2) channels: 40, 80, 160 without padding.
 * exp: Cody-Waite range reduction (n = floor(x log2e + 1/2), r = x - n ln2 in two parts, |r| <=
 * ln2/2) and the degree-6 polynomial of Cephes expf, times 2^n through the exponent bits;
 * x < -87.33654 (below the smallest normal result) gives 0, x > 88 is taken as 88. Error
 * against the exact e^x: < 1.5 ulp over [-87.3, 88] (tests/test_attn_fast.c; measured 1.005
 * ulp with FMA, 1.0 without). The scalar
 * ops_expf_poly is the same definition with separate multiplies and adds. */
#define OPS_EXP_LO (-87.33654f)
#define OPS_EXP_HI 88.0f
#define OPS_LOG2E 1.44269504088896341f
#define OPS_LN2_HI 0.693359375f
#define OPS_LN2_LO (-2.12194440e-4f)
#define OPS_EXP_C0 1.9875691500e-4f
#define OPS_EXP_C1 1.3981999507e-3f
#define OPS_EXP_C2 8.3334519073e-3f
#define OPS_EXP_C3 4.1665795894e-2f
#define OPS_EXP_C4 1.6666665459e-1f
#define OPS_EXP_C5 5.0000001201e-1f

static float ops_expf_poly(float x) {
    if (!(x >= OPS_EXP_LO)) return 0.0f;                 /* also -inf (and NaN) */
    if (x > OPS_EXP_HI) x = OPS_EXP_HI;
    float n = floorf(x * OPS_LOG2E + 0.5f);
    float r = x - n * OPS_LN2_HI;
    r = r - n * OPS_LN2_LO;
    float p = OPS_EXP_C0;
    p = p * r + OPS_EXP_C1; p = p * r + OPS_EXP_C2; p = p * r + OPS_EXP_C3;
    p = p * r + OPS_EXP_C4; p = p * r + OPS_EXP_C5;
    float y = p * (r * r) + r + 1.0f;
    union { uint32_t u; float f; } e;
    e.u = (uint32_t)((int32_t)n + 127) << 23;
    return y * e.f;
}

#if defined(MS_X86_KERNELS)
MS_TARGET_AVX512
static inline __m512 ops_exp_avx512(__m512 x) {
    __mmask16 ok = _mm512_cmp_ps_mask(x, _mm512_set1_ps(OPS_EXP_LO), _CMP_GE_OQ);
    x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(OPS_EXP_LO)), _mm512_set1_ps(OPS_EXP_HI));
    __m512 n = _mm512_roundscale_ps(_mm512_fmadd_ps(x, _mm512_set1_ps(OPS_LOG2E), _mm512_set1_ps(0.5f)),
                                    _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(OPS_LN2_HI), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(OPS_LN2_LO), r);
    __m512 p = _mm512_set1_ps(OPS_EXP_C0);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(OPS_EXP_C1)); p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(OPS_EXP_C2));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(OPS_EXP_C3)); p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(OPS_EXP_C4));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(OPS_EXP_C5));
    __m512 y = _mm512_add_ps(_mm512_fmadd_ps(p, _mm512_mul_ps(r, r), r), _mm512_set1_ps(1.0f));
    __m512i e = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23);
    return _mm512_maskz_mul_ps(ok, y, _mm512_castsi512_ps(e));
}

MS_TARGET_AVX2
static inline __m256 ops_exp_avx2(__m256 x) {
    __m256 ok = _mm256_cmp_ps(x, _mm256_set1_ps(OPS_EXP_LO), _CMP_GE_OQ);
    x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(OPS_EXP_LO)), _mm256_set1_ps(OPS_EXP_HI));
    __m256 n = _mm256_floor_ps(_mm256_fmadd_ps(x, _mm256_set1_ps(OPS_LOG2E), _mm256_set1_ps(0.5f)));
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(OPS_LN2_HI), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(OPS_LN2_LO), r);
    __m256 p = _mm256_set1_ps(OPS_EXP_C0);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(OPS_EXP_C1)); p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(OPS_EXP_C2));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(OPS_EXP_C3)); p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(OPS_EXP_C4));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(OPS_EXP_C5));
    __m256 y = _mm256_add_ps(_mm256_fmadd_ps(p, _mm256_mul_ps(r, r), r), _mm256_set1_ps(1.0f));
    __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_and_ps(ok, _mm256_mul_ps(y, _mm256_castsi256_ps(e)));
}

MS_TARGET_AVX512
static void ops_expf_vec_avx512(float *y, const float *x, size_t n) {
    size_t i = 0;
    for (; i + 16 <= n; i += 16) _mm512_storeu_ps(y + i, ops_exp_avx512(_mm512_loadu_ps(x + i)));
    if (i < n) {
        __mmask16 m = (__mmask16)((1u << (n - i)) - 1u);
        _mm512_mask_storeu_ps(y + i, m, ops_exp_avx512(_mm512_maskz_loadu_ps(m, x + i)));
    }
}
MS_TARGET_AVX2
static void ops_expf_vec_avx2(float *y, const float *x, size_t n) {
    size_t i = 0;
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(y + i, ops_exp_avx2(_mm256_loadu_ps(x + i)));
    for (; i < n; i++) {
        float t[8] = { 0 };
        t[0] = x[i];
        _mm256_storeu_ps(t, ops_exp_avx2(_mm256_loadu_ps(t)));
        y[i] = t[0];
    }
}
#endif

/* ---------------------------------------------------------------------------------------- */
/* Double-precision accumulations (gradient fusion's streamed statistics)                   */
/* ---------------------------------------------------------------------------------------- */
/* G (d,d), upper triangle j >= i, += X^T X for X (rows, d) float (products of floats are exact
 * in double). The order of the sums is the definition: rows in chunks of 128; within a chunk,
 * groups of four rows r..r+3 add g += (x_r,i x_r,j + x_r+1,i x_r+1,j) + (x_r+2,i x_r+2,j +
 * x_r+3,i x_r+3,j), the chunk's last rows (fewer than four) one at a time. ms_gram_f64_acc_ref
 * is that loop; the fast path below gives the same bits for any thread count. */
#define GRAM_CH 128
static void gram_rows_ref(double *G, const float *X, size_t rows, int d, int i) {
    double *g = G + (size_t)i * d;
    for (size_t r0 = 0; r0 < rows; r0 += GRAM_CH) {
        const size_t r1 = r0 + GRAM_CH < rows ? r0 + GRAM_CH : rows;
        size_t r = r0;
        for (; r + 4 <= r1; r += 4) {
            const float *x0 = X + r * (size_t)d, *x1 = x0 + d, *x2 = x1 + d, *x3 = x2 + d;
            const double a0 = x0[i], a1 = x1[i], a2 = x2[i], a3 = x3[i];
            for (int j = i; j < d; j++)
                g[j] += (a0 * x0[j] + a1 * x1[j]) + (a2 * x2[j] + a3 * x3[j]);
        }
        for (; r < r1; r++) {
            const float *x0 = X + r * (size_t)d;
            const double a0 = x0[i];
            for (int j = i; j < d; j++) g[j] += a0 * x0[j];
        }
    }
}

void ms_gram_f64_acc_ref(double *G, const float *X, size_t rows, int d) {
    for (int i = 0; i < d; i++) gram_rows_ref(G, X, rows, d, i);
}

#if defined(MS_X86_KERNELS)
/* Rows i0..i0+3 x columns j0..j0+15 of G over the rows [r0, r1) of one chunk (Xd: X in double),
 * 8 accumulators; lanes with j < i or j >= d are computed on zeros and never stored. */
MS_TARGET_AVX512
static void gram_tile_avx512(double *G, int d, const double *Xd, size_t r0, size_t r1, int i0, int j0) {
    __mmask8 mb[2], m[4][2];
    __m512d acc[4][2];
    for (int h = 0; h < 2; h++) {
        unsigned lb = 0;
        for (int l = 0; l < 8; l++) lb |= (unsigned)(j0 + 8 * h + l < d) << l;
        mb[h] = (__mmask8)lb;
        for (int q = 0; q < 4; q++) {
            unsigned lm = 0;
            for (int l = 0; l < 8; l++) lm |= (unsigned)(j0 + 8 * h + l >= i0 + q && j0 + 8 * h + l < d) << l;
            m[q][h] = (__mmask8)lm;
            acc[q][h] = _mm512_maskz_loadu_pd(m[q][h], G + (size_t)(i0 + q) * d + j0 + 8 * h);
        }
    }
    size_t r = r0;
    for (; r + 4 <= r1; r += 4) {
        const double *x0 = Xd + r * (size_t)d, *x1 = x0 + d, *x2 = x1 + d, *x3 = x2 + d;
        __m512d b[4][2];
        for (int h = 0; h < 2; h++) {
            b[0][h] = _mm512_maskz_loadu_pd(mb[h], x0 + j0 + 8 * h);
            b[1][h] = _mm512_maskz_loadu_pd(mb[h], x1 + j0 + 8 * h);
            b[2][h] = _mm512_maskz_loadu_pd(mb[h], x2 + j0 + 8 * h);
            b[3][h] = _mm512_maskz_loadu_pd(mb[h], x3 + j0 + 8 * h);
        }
        for (int q = 0; q < 4; q++) {
            const __m512d a0 = _mm512_set1_pd(x0[i0 + q]), a1 = _mm512_set1_pd(x1[i0 + q]);
            const __m512d a2 = _mm512_set1_pd(x2[i0 + q]), a3 = _mm512_set1_pd(x3[i0 + q]);
            for (int h = 0; h < 2; h++) {
                const __m512d t = _mm512_add_pd(_mm512_add_pd(_mm512_mul_pd(a0, b[0][h]), _mm512_mul_pd(a1, b[1][h])),
                                                _mm512_add_pd(_mm512_mul_pd(a2, b[2][h]), _mm512_mul_pd(a3, b[3][h])));
                acc[q][h] = _mm512_add_pd(acc[q][h], t);
            }
        }
    }
    for (; r < r1; r++) {
        const double *x0 = Xd + r * (size_t)d;
        const __m512d b0 = _mm512_maskz_loadu_pd(mb[0], x0 + j0), b1 = _mm512_maskz_loadu_pd(mb[1], x0 + j0 + 8);
        for (int q = 0; q < 4; q++) {
            const __m512d a = _mm512_set1_pd(x0[i0 + q]);
            acc[q][0] = _mm512_add_pd(acc[q][0], _mm512_mul_pd(a, b0));
            acc[q][1] = _mm512_add_pd(acc[q][1], _mm512_mul_pd(a, b1));
        }
    }
    for (int q = 0; q < 4; q++)
        for (int h = 0; h < 2; h++) _mm512_mask_storeu_pd(G + (size_t)(i0 + q) * d + j0 + 8 * h, m[q][h], acc[q][h]);
}
#endif

/* Fast path: X converted to double once, then per chunk of rows every 4-row block of G (threads
 * take blocks round-robin, the same blocks in every chunk) in 4 x 16 register tiles: the
 * chunk's X (128 x d doubles) stays in L2 across the tiles. */
void ms_gram_f64_acc(double *G, const float *X, size_t rows, int d) {
    double *Xd = NULL;
    const size_t n = rows * (size_t)d;
#if defined(MS_X86_KERNELS)
    if (ms_simd() >= MS_SIMD_AVX512 && d >= 16 && rows > 0) Xd = (double *)malloc(n * sizeof(double));
#else
    (void)n;                                  /* the scalar path only */
#endif
    if (!Xd) {
#ifdef _OPENMP
#pragma omp parallel for schedule(dynamic, 4) if (d >= 64)
#endif
        for (int i = 0; i < d; i++) gram_rows_ref(G, X, rows, d, i);
        return;
    }
#if defined(MS_X86_KERNELS)
    const int nb = (d + 3) / 4;
#ifdef _OPENMP
#pragma omp parallel if ((double)rows * d * d >= 4e6)
#endif
    {
#ifdef _OPENMP
#pragma omp for schedule(static)
#endif
        for (long long q = 0; q < (long long)n; q++) Xd[q] = X[q];
        for (size_t r0 = 0; r0 < rows; r0 += GRAM_CH) {
            const size_t r1 = r0 + GRAM_CH < rows ? r0 + GRAM_CH : rows;
#ifdef _OPENMP
#pragma omp for schedule(static, 1) nowait
#endif
            for (int bi = 0; bi < nb; bi++) {
                const int i0 = 4 * bi;
                if (i0 + 4 <= d) {
                    for (int j0 = i0 & ~15; j0 < d; j0 += 16) gram_tile_avx512(G, d, Xd, r0, r1, i0, j0);
                } else {                               /* the last rows: the definition's loop, this chunk */
                    for (int i = i0; i < d; i++) gram_rows_ref(G, X + r0 * (size_t)d, r1 - r0, d, i);
                }
            }
        }
    }
    free(Xd);
#endif
}

/* C (M,N) += A (M,K) B (K,N), all double, row-major. Every C element sums c += a_ik b_kj over k
 * in ascending order, one rounding per product and per sum (no FMA): the blocked and SIMD paths
 * give the bits of ms_gemm_f64_acc_ref whatever the blocking, SIMD level or thread count.
 * Blocking: B in KC x NC panels (256 x 256 doubles = 512 KiB, the L2), C in 4 x 16 register
 * tiles (8 AVX-512 accumulators); threads take 4-row blocks of C. */
void ms_gemm_f64_acc_ref(double *C, const double *A, const double *B, int M, int N, int K) {
    for (int o = 0; o < M; o++) {
        const double *ar = A + (size_t)o * K;
        double *c = C + (size_t)o * N;
        for (int i = 0; i < K; i++) {
            const double a = ar[i], *b = B + (size_t)i * N;
            for (int j = 0; j < N; j++) c[j] += a * b[j];
        }
    }
}

#define F64_MR 4
#define F64_NR 16
#define F64_KC 256
#define F64_NC 256

/* C[0..mr)[0..nr) += A[0..mr)[k0..k1) B[k0..k1)[0..nr): the scalar tile (edges, no SIMD). */
static void f64_tile_ref(double *C, int ldc, const double *A, int lda, const double *B, int ldb,
                         int mr, int nr, int k0, int k1) {
    for (int r = 0; r < mr; r++)
        for (int j = 0; j < nr; j++) {
            double c = C[(size_t)r * ldc + j];
            for (int k = k0; k < k1; k++) c += A[(size_t)r * lda + k] * B[(size_t)k * ldb + j];
            C[(size_t)r * ldc + j] = c;
        }
}

#if defined(MS_X86_KERNELS)
MS_TARGET_AVX512
static void f64_tile_avx512(double *C, int ldc, const double *A, int lda, const double *B, int ldb, int k0, int k1) {
    __m512d c00 = _mm512_loadu_pd(C), c01 = _mm512_loadu_pd(C + 8);
    __m512d c10 = _mm512_loadu_pd(C + ldc), c11 = _mm512_loadu_pd(C + ldc + 8);
    __m512d c20 = _mm512_loadu_pd(C + 2 * (size_t)ldc), c21 = _mm512_loadu_pd(C + 2 * (size_t)ldc + 8);
    __m512d c30 = _mm512_loadu_pd(C + 3 * (size_t)ldc), c31 = _mm512_loadu_pd(C + 3 * (size_t)ldc + 8);
    for (int k = k0; k < k1; k++) {
        const double *b = B + (size_t)k * ldb;
        const __m512d b0 = _mm512_loadu_pd(b), b1 = _mm512_loadu_pd(b + 8);
        __m512d a = _mm512_set1_pd(A[k]);
        c00 = _mm512_add_pd(c00, _mm512_mul_pd(a, b0)); c01 = _mm512_add_pd(c01, _mm512_mul_pd(a, b1));
        a = _mm512_set1_pd(A[(size_t)lda + k]);
        c10 = _mm512_add_pd(c10, _mm512_mul_pd(a, b0)); c11 = _mm512_add_pd(c11, _mm512_mul_pd(a, b1));
        a = _mm512_set1_pd(A[2 * (size_t)lda + k]);
        c20 = _mm512_add_pd(c20, _mm512_mul_pd(a, b0)); c21 = _mm512_add_pd(c21, _mm512_mul_pd(a, b1));
        a = _mm512_set1_pd(A[3 * (size_t)lda + k]);
        c30 = _mm512_add_pd(c30, _mm512_mul_pd(a, b0)); c31 = _mm512_add_pd(c31, _mm512_mul_pd(a, b1));
    }
    _mm512_storeu_pd(C, c00); _mm512_storeu_pd(C + 8, c01);
    _mm512_storeu_pd(C + ldc, c10); _mm512_storeu_pd(C + ldc + 8, c11);
    _mm512_storeu_pd(C + 2 * (size_t)ldc, c20); _mm512_storeu_pd(C + 2 * (size_t)ldc + 8, c21);
    _mm512_storeu_pd(C + 3 * (size_t)ldc, c30); _mm512_storeu_pd(C + 3 * (size_t)ldc + 8, c31);
}

MS_TARGET_AVX2
static void f64_tile_avx2(double *C, int ldc, const double *A, int lda, const double *B, int ldb, int k0, int k1) {
    for (int h = 0; h < F64_NR; h += 8) {        /* two 4 x 8 halves: 8 accumulators each */
        __m256d c[4][2];
        for (int r = 0; r < 4; r++) {
            c[r][0] = _mm256_loadu_pd(C + (size_t)r * ldc + h);
            c[r][1] = _mm256_loadu_pd(C + (size_t)r * ldc + h + 4);
        }
        for (int k = k0; k < k1; k++) {
            const double *b = B + (size_t)k * ldb + h;
            const __m256d b0 = _mm256_loadu_pd(b), b1 = _mm256_loadu_pd(b + 4);
            for (int r = 0; r < 4; r++) {
                const __m256d a = _mm256_set1_pd(A[(size_t)r * lda + k]);
                c[r][0] = _mm256_add_pd(c[r][0], _mm256_mul_pd(a, b0));
                c[r][1] = _mm256_add_pd(c[r][1], _mm256_mul_pd(a, b1));
            }
        }
        for (int r = 0; r < 4; r++) {
            _mm256_storeu_pd(C + (size_t)r * ldc + h, c[r][0]);
            _mm256_storeu_pd(C + (size_t)r * ldc + h + 4, c[r][1]);
        }
    }
}
#endif

void ms_gemm_f64_acc(double *C, const double *A, const double *B, int M, int N, int K) {
    int level = 0;
#if defined(MS_X86_KERNELS)
    level = ms_simd() >= MS_SIMD_AVX512 ? 5 : ms_simd() >= MS_SIMD_AVX2 ? 2 : 0;
#endif
    const int nblk = (M + F64_MR - 1) / F64_MR;
    for (int jc = 0; jc < N; jc += F64_NC) {
        const int jn = N - jc < F64_NC ? N - jc : F64_NC;
        for (int kc = 0; kc < K; kc += F64_KC) {
            const int k1 = K - kc < F64_KC ? K : kc + F64_KC;
#ifdef _OPENMP
#pragma omp parallel for schedule(static) if (M >= 32 && (double)M * N * K >= 1e6)
#endif
            for (int bi = 0; bi < nblk; bi++) {
                const int i0 = bi * F64_MR, mr = M - i0 < F64_MR ? M - i0 : F64_MR;
                double *c = C + (size_t)i0 * N + jc;
                const double *a = A + (size_t)i0 * K;
                int j = 0;
                for (; level && mr == F64_MR && j + F64_NR <= jn; j += F64_NR) {
#if defined(MS_X86_KERNELS)
                    if (level == 5) f64_tile_avx512(c + j, N, a, K, B + jc + j, N, kc, k1);
                    else f64_tile_avx2(c + j, N, a, K, B + jc + j, N, kc, k1);
#endif
                }
                if (j < jn) f64_tile_ref(c + j, N, a, K, B + jc + j, N, mr, jn - j, kc, k1);
            }
        }
    }
}

/* ---- kernels of the symmetric eigen-solver (mixshow.c, ms_sym_eigen) ----
 * All loops in a fixed order per output; threads take whole rows or whole column chunks, and
 * the AVX-512 paths do the scalar operations lane by lane (separate multiply and add): every
 * path and thread count gives the same bits. Parallel regions are few and large: on a loaded
 * machine every barrier may wait for a time slice. */

/* sum_j x[j] y[j] for j in [0, n): eight partial sums (j mod 8) in order, then combined as
 * ((s0+s4)+(s2+s6))+((s1+s5)+(s3+s7)); the same order on every path. */
static double f64_dot8_combine(const double s[8]) {
    return ((s[0] + s[4]) + (s[2] + s[6])) + ((s[1] + s[5]) + (s[3] + s[7]));
}
static double f64_dot(const double *x, const double *y, int n) {
    double s[8] = { 0, 0, 0, 0, 0, 0, 0, 0 };
    int j = 0;
    for (; j + 8 <= n; j += 8)
        for (int q = 0; q < 8; q++) s[q] += x[j + q] * y[j + q];
    for (; j < n; j++) s[j & 7] += x[j] * y[j];
    return f64_dot8_combine(s);
}
/* a[j] -= vi w[j] + wi v[j] (when v), then returns sum_j a[j] u[j] (when u; else 0). */
static double f64_rank2_dot(double *a, int n, double vi, double wi, const double *v, const double *w, const double *u) {
    if (v) for (int j = 0; j < n; j++) a[j] -= vi * w[j] + wi * v[j];
    return u ? f64_dot(a, u, n) : 0.0;
}
/* q[j] -= t v[j] with t = beta (q . v). */
static void f64_house_row(double *q, int n, const double *v, double beta) {
    const double t = beta * f64_dot(q, v, n);
    for (int j = 0; j < n; j++) q[j] -= t * v[j];
}
#if defined(MS_X86_KERNELS)
MS_TARGET_AVX512
static double f64_dot_avx512(const double *x, const double *y, int n) {
    __m512d acc = _mm512_setzero_pd();
    int j = 0;
    for (; j + 8 <= n; j += 8) acc = _mm512_add_pd(acc, _mm512_mul_pd(_mm512_loadu_pd(x + j), _mm512_loadu_pd(y + j)));
    if (j < n) {
        const __mmask8 m = (__mmask8)((1u << (n - j)) - 1u);
        acc = _mm512_mask_add_pd(acc, m, acc, _mm512_mul_pd(_mm512_maskz_loadu_pd(m, x + j), _mm512_maskz_loadu_pd(m, y + j)));
    }
    double s[8];
    _mm512_storeu_pd(s, acc);
    return f64_dot8_combine(s);
}
MS_TARGET_AVX512
static double f64_rank2_dot_avx512(double *a, int n, double vi, double wi, const double *v, const double *w, const double *u) {
    if (v) {
        const __m512d bv = _mm512_set1_pd(vi), bw = _mm512_set1_pd(wi);
        int j = 0;
        for (; j + 8 <= n; j += 8) {
            const __m512d t = _mm512_add_pd(_mm512_mul_pd(bv, _mm512_loadu_pd(w + j)), _mm512_mul_pd(bw, _mm512_loadu_pd(v + j)));
            _mm512_storeu_pd(a + j, _mm512_sub_pd(_mm512_loadu_pd(a + j), t));
        }
        for (; j < n; j++) a[j] -= vi * w[j] + wi * v[j];
    }
    return u ? f64_dot_avx512(a, u, n) : 0.0;
}
MS_TARGET_AVX512
static void f64_house_row_avx512(double *q, int n, const double *v, double beta) {
    const double t = beta * f64_dot_avx512(q, v, n);
    const __m512d bt = _mm512_set1_pd(t);
    int j = 0;
    for (; j + 8 <= n; j += 8) _mm512_storeu_pd(q + j, _mm512_sub_pd(_mm512_loadu_pd(q + j), _mm512_mul_pd(bt, _mm512_loadu_pd(v + j))));
    for (; j < n; j++) q[j] -= t * v[j];
}
#endif
static int f64_avx512(void) {
#if defined(MS_X86_KERNELS)
    return ms_simd() >= MS_SIMD_AVX512;
#else
    return 0;
#endif
}

void ms_tridiag_update_f64(double *A, int n, int r0, const double *v, const double *w, const double *u, double *p) {
    const int len = n - r0, simd = f64_avx512();
    (void)simd;
#ifdef _OPENMP
#pragma omp parallel for schedule(static) if ((double)len * len >= 409600.0)
#endif
    for (int i = r0; i < n; i++) {
        double *a = A + (size_t)i * n + r0;
        const double vi = v ? v[i] : 0.0, wi = v ? w[i] : 0.0;
        double d;
#if defined(MS_X86_KERNELS)
        if (simd) d = f64_rank2_dot_avx512(a, len, vi, wi, v ? v + r0 : NULL, w + r0, u ? u + r0 : NULL);
        else
#endif
        d = f64_rank2_dot(a, len, vi, wi, v ? v + r0 : NULL, w + r0, u ? u + r0 : NULL);
        if (u) p[i] = d;
    }
}

/* Rows of Q in blocks of 16 (they stay in L2 while every v_k streams past once per block);
 * each row takes the reflectors k = n-3 .. 0 in order. */
void ms_house_accumulate_f64(double *Q, int n, const double *Vh, const double *beta) {
    const int nb = (n + 15) / 16, simd = f64_avx512();
    (void)simd;
#ifdef _OPENMP
#pragma omp parallel for schedule(dynamic, 1) if (n >= 128)
#endif
    for (int b = nb - 1; b >= 0; b--) {
        const int i0 = b * 16, i1 = i0 + 16 < n ? i0 + 16 : n;
        for (int k = n - 3; k >= 0; k--) {
            if (beta[k] == 0.0) continue;
            const int r0 = k + 1, len = n - r0;
            const double *v = Vh + (size_t)k * n + r0;
            for (int i = i0 > r0 ? i0 : r0; i < i1; i++) {
#if defined(MS_X86_KERNELS)
                if (simd) { f64_house_row_avx512(Q + (size_t)i * n + r0, len, v, beta[k]); continue; }
#endif
                f64_house_row(Q + (size_t)i * n + r0, len, v, beta[k]);
            }
        }
    }
}

/* Plane rotations of rows, sweep after sweep (see mixshow.h). Columns are independent: threads
 * take chunks of 64 columns and run every sweep on them; the chunk of all rows (n x 512 B)
 * stays in L2 across the sweeps. */
#define ROT_CH 64
static void f64_rot_sweep(double *Z, size_t ld, int k0, int k1, int lo, int hi, const double *c, const double *s) {
    for (int i = hi - 1; i >= lo; i--) {
        double *restrict zi = Z + (size_t)i * ld, *restrict z1 = zi + ld;
        const double ci = c[i - lo], si = s[i - lo];
        for (int k = k0; k < k1; k++) {
            const double h = z1[k];
            z1[k] = si * zi[k] + ci * h;
            zi[k] = ci * zi[k] - si * h;
        }
    }
}
#if defined(MS_X86_KERNELS)
MS_TARGET_AVX512
static void f64_rot_sweep_avx512(double *Z, size_t ld, int k0, int lo, int hi, const double *c, const double *s) {
    for (int i = hi - 1; i >= lo; i--) {
        double *zi = Z + (size_t)i * ld + k0, *z1 = zi + ld;
        const __m512d ci = _mm512_set1_pd(c[i - lo]), si = _mm512_set1_pd(s[i - lo]);
        for (int k = 0; k < ROT_CH; k += 8) {
            const __m512d h = _mm512_loadu_pd(z1 + k), x = _mm512_loadu_pd(zi + k);
            _mm512_storeu_pd(z1 + k, _mm512_add_pd(_mm512_mul_pd(si, x), _mm512_mul_pd(ci, h)));
            _mm512_storeu_pd(zi + k, _mm512_sub_pd(_mm512_mul_pd(ci, x), _mm512_mul_pd(si, h)));
        }
    }
}
#endif

void ms_rot_rows_f64(double *Z, int n_cols, int ld, const int *lo, const int *hi, const size_t *off, int n_sweeps,
                     const double *c, const double *s) {
    const int nch = (n_cols + ROT_CH - 1) / ROT_CH, simd = f64_avx512();
    size_t work = 0;
    (void)simd;
    for (int q = 0; q < n_sweeps; q++) work += (size_t)(hi[q] - lo[q]);
    (void)work;                                            /* (no OpenMP: unused) */
#ifdef _OPENMP
#pragma omp parallel for schedule(static) if ((double)work * n_cols >= 131072.0)
#endif
    for (int ch = 0; ch < nch; ch++) {
        const int k0 = ch * ROT_CH, k1 = n_cols - k0 < ROT_CH ? n_cols : k0 + ROT_CH;
        for (int q = 0; q < n_sweeps; q++) {
#if defined(MS_X86_KERNELS)
            if (simd && k1 - k0 == ROT_CH) { f64_rot_sweep_avx512(Z, (size_t)ld, k0, lo[q], hi[q], c + off[q], s + off[q]); continue; }
#endif
            f64_rot_sweep(Z, (size_t)ld, k0, k1, lo[q], hi[q], c + off[q], s + off[q]);
        }
    }
}

void ms_expf_vec(float *y, const float *x, size_t n) {
#if defined(MS_X86_KERNELS)
    MsSimd l = ms_simd();
    if (l >= MS_SIMD_AVX512) { ops_expf_vec_avx512(y, x, n); return; }
    if (l >= MS_SIMD_AVX2) { ops_expf_vec_avx2(y, x, n); return; }
#endif
    for (size_t i = 0; i < n; i++) y[i] = ops_expf_poly(x[i]);
}

/* ---- erf and GELU ------------------------------------------------------------------------ */
/* erf(x) for float x, evaluated in double and rounded once to float, a = |x|:
 *   a < 1:   erf = a P(a^2)                          P of degree 7
 *   a >= 1:  erf = 1 - exp(-c^2) Q(1/c), c = min(a, 4)  Q of degree 11 (erf(4) rounds to 1)
 * then the sign of x; NaN stays NaN, erf(+-inf) = +-1. P and Q: weighted least squares (Lawson
 * iterations towards the minimax) to erf(a)/a on [0, 1] and erfc(a) e^(a^2) on [1, 4], relative
 * error 3.4e-11 and 1.8e-10; exp in double by Cody-Waite reduction and the Taylor polynomial of
 * degree 10 (error ~1e-13). The double result is within ~2e-10 relative of erf, so its rounding
 * to float is erf's correct rounding but for results that close to a midpoint between floats
 * (measured: 26 of 286001 sampled, each 1 ulp off): error <= 0.5 ulp + 2e-10 relative
 * (tests/test_attn_fast.c at every SIMD level). Why so exact: a fused model (tests/test_fuse_load.c
 * case c) amplifies GELU's error near 1 + erf = 0, where one ulp of erf is a large share of the
 * result: with an erf of 1.0 ulp in float its UNet eps moved from 4.5e-6 to 4.3e-5 rel-L2
 * against diffusers. The AVX kernels use FMA in the Horner steps; ops_erf_poly, the scalar
 * twin, separate multiplies and adds (the bits may differ in the last place of the double,
 * rarely in the float). */
static const double ops_erf_a[8] = { 1.1283791670570977, -0.37612638426102923, 0.11283781841360008,
                                     -0.026865392257861109, 0.0052209235916380464, -0.00084825131892947436,
                                     0.00011254680066978551, -9.6351028260749372e-06 };
static const double ops_erf_b[12] = { -1.2395851895154775e-05, 0.56458902197349681, -0.0057293521159322292,
                                      -0.23373447332881053, -0.26614825188604407, 1.414132470987878,
                                      -2.4623708927291719, 2.6181045922568686, -1.8509482468373506,
                                      0.85618756735434232, -0.23595797644704511, 0.029471512857190151 };
#define OPS_EXPD_LOG2E 1.4426950408889634
#define OPS_EXPD_LN2_HI 6.93147180369123816490e-01       /* fdlibm's split of ln 2 */
#define OPS_EXPD_LN2_LO 1.90821492927058770002e-10
static const double ops_expd_c[11] = { 1.0, 1.0, 1.0 / 2, 1.0 / 6, 1.0 / 24, 1.0 / 120, 1.0 / 720, 1.0 / 5040,
                                       1.0 / 40320, 1.0 / 362880, 1.0 / 3628800 };

/* e^x in double for x in [-104, 89] (erf's exp(-c^2), and ops_expf_exact: SiLU, quick_gelu) */
static double ops_expd_poly(double x) {
    double n = nearbyint(x * OPS_EXPD_LOG2E), r = x - n * OPS_EXPD_LN2_HI;
    r = r - n * OPS_EXPD_LN2_LO;
    double p = ops_expd_c[10];
    for (int k = 9; k >= 0; k--) p = p * r + ops_expd_c[k];
    return ldexp(p, (int)n);
}
static float ops_erf_poly(float x) {
    if (x != x) return x;
    double a = fabs((double)x), r;
    if (a < 1.0) {
        double t = a * a, p = ops_erf_a[7];
        for (int k = 6; k >= 0; k--) p = p * t + ops_erf_a[k];
        r = a * p;
    } else {
        double c = a < 4.0 ? a : 4.0, u = 1.0 / c, q = ops_erf_b[11];
        for (int k = 10; k >= 0; k--) q = q * u + ops_erf_b[k];
        r = 1.0 - ops_expd_poly(-(c * c)) * q;
    }
    return copysignf((float)r, x);
}

static float ops_gelu(float x) { return x * 0.5f * (1.0f + ops_erf_poly(x * (float)OPS_SQRT1_2)); }
static float ops_gelu_grad(float x) {
    return 0.5f * (1.0f + ops_erf_poly(x * (float)OPS_SQRT1_2)) + x * (float)OPS_INV_SQRT_2PI * ops_expf_poly(-0.5f * x * x);
}
static void ops_gelu_span_ref(float *out, const float *x, const float *h, size_t n) {
    for (size_t i = 0; i < n; i++) out[i] = h ? h[i] * ops_gelu(x[i]) : ops_gelu(x[i]);
}
static void ops_gelu_bwd_span_ref(float *dx, float *dh, const float *dy, const float *x, const float *h, size_t n) {
    for (size_t i = 0; i < n; i++) {
        if (h) {
            dh[i] += dy[i] * ops_gelu(x[i]);
            dx[i] += dy[i] * h[i] * ops_gelu_grad(x[i]);
        } else {
            dx[i] += dy[i] * ops_gelu_grad(x[i]);
        }
    }
}

#if defined(MS_X86_KERNELS)
/* ops_expd_poly's steps on vectors of doubles, x in [-104, 89] (2^n by scalef / exponent bits) */
MS_TARGET_AVX512
static inline __m512d ops_expd_avx512(__m512d x) {
    __m512d n = _mm512_roundscale_pd(_mm512_mul_pd(x, _mm512_set1_pd(OPS_EXPD_LOG2E)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512d r = _mm512_fnmadd_pd(n, _mm512_set1_pd(OPS_EXPD_LN2_HI), x);
    r = _mm512_fnmadd_pd(n, _mm512_set1_pd(OPS_EXPD_LN2_LO), r);
    __m512d e = _mm512_set1_pd(ops_expd_c[10]);
    for (int k = 9; k >= 0; k--) e = _mm512_fmadd_pd(e, r, _mm512_set1_pd(ops_expd_c[k]));
    return _mm512_scalef_pd(e, n);
}
MS_TARGET_AVX2
static inline __m256d ops_expd_avx2(__m256d x) {
    __m256d n = _mm256_round_pd(_mm256_mul_pd(x, _mm256_set1_pd(OPS_EXPD_LOG2E)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256d r = _mm256_fnmadd_pd(n, _mm256_set1_pd(OPS_EXPD_LN2_HI), x);
    r = _mm256_fnmadd_pd(n, _mm256_set1_pd(OPS_EXPD_LN2_LO), r);
    __m256d e = _mm256_set1_pd(ops_expd_c[10]);
    for (int k = 9; k >= 0; k--) e = _mm256_fmadd_pd(e, r, _mm256_set1_pd(ops_expd_c[k]));
    __m256i ni = _mm256_cvtepi32_epi64(_mm256_cvtpd_epi32(n));                              /* n in [-150, 129] */
    return _mm256_mul_pd(e, _mm256_castsi256_pd(_mm256_slli_epi64(_mm256_add_epi64(ni, _mm256_set1_epi64x(1023)), 52)));
}
/* e^v for float v, through double: NaN stays NaN, v clamped to [-104, 89] (0 and +inf after
 * the rounding to float). The spans compute v = k x in float first, as the scalar expressions do. */
MS_TARGET_AVX512
static inline __m512 ops_expf_exact_avx512(__m512 v) {
    __m512 c = _mm512_min_ps(_mm512_max_ps(v, _mm512_set1_ps(-104.0f)), _mm512_set1_ps(89.0f));
    __m256 a = _mm512_cvtpd_ps(ops_expd_avx512(_mm512_cvtps_pd(_mm512_castps512_ps256(c))));
    __m256 b = _mm512_cvtpd_ps(ops_expd_avx512(_mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(c), 1)))));
    __m512 r = _mm512_castpd_ps(_mm512_insertf64x4(_mm512_castpd256_pd512(_mm256_castps_pd(a)), _mm256_castps_pd(b), 1));
    return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), r, v);
}
MS_TARGET_AVX2
static inline __m256 ops_expf_exact_avx2(__m256 v) {
    __m256 c = _mm256_min_ps(_mm256_max_ps(v, _mm256_set1_ps(-104.0f)), _mm256_set1_ps(89.0f));
    __m128 a = _mm256_cvtpd_ps(ops_expd_avx2(_mm256_cvtps_pd(_mm256_castps256_ps128(c))));
    __m128 b = _mm256_cvtpd_ps(ops_expd_avx2(_mm256_cvtps_pd(_mm256_extractf128_ps(c, 1))));
    __m256 r = _mm256_insertf128_ps(_mm256_castps128_ps256(a), b, 1);
    return _mm256_blendv_ps(r, v, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
}
MS_TARGET_AVX512
static void ops_expf_exact_vec_avx512(float *y, const float *x, float k, size_t n) {
    const __m512 kv = _mm512_set1_ps(k);
    for (size_t i = 0; i < n; i += 16) {
        __mmask16 m = n - i >= 16 ? (__mmask16)0xFFFF : ms_mask16((int)(n - i));
        _mm512_mask_storeu_ps(y + i, m, ops_expf_exact_avx512(_mm512_mul_ps(kv, _mm512_maskz_loadu_ps(m, x + i))));
    }
}
MS_TARGET_AVX2
static void ops_expf_exact_vec_avx2(float *y, const float *x, float k, size_t n) {
    const __m256 kv = _mm256_set1_ps(k);
    size_t i = 0;
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(y + i, ops_expf_exact_avx2(_mm256_mul_ps(kv, _mm256_loadu_ps(x + i))));
    if (i < n) {                                         /* the tail through a padded vector */
        float t[8] = { 0 };
        memcpy(t, x + i, (n - i) * sizeof(float));
        _mm256_storeu_ps(t, ops_expf_exact_avx2(_mm256_mul_ps(kv, _mm256_loadu_ps(t))));
        memcpy(y + i, t, (n - i) * sizeof(float));
    }
}

MS_TARGET_AVX512
static inline __m512d ops_erf_pd_avx512(__m512d a) {     /* a = |x| >= 0, in double */
    const __m512d one = _mm512_set1_pd(1.0);
    __m512d t = _mm512_mul_pd(a, a), p = _mm512_set1_pd(ops_erf_a[7]);
    for (int k = 6; k >= 0; k--) p = _mm512_fmadd_pd(p, t, _mm512_set1_pd(ops_erf_a[k]));
    __m512d ra = _mm512_mul_pd(a, p);
    __m512d c = _mm512_min_pd(a, _mm512_set1_pd(4.0)), u = _mm512_div_pd(one, c), q = _mm512_set1_pd(ops_erf_b[11]);
    for (int k = 10; k >= 0; k--) q = _mm512_fmadd_pd(q, u, _mm512_set1_pd(ops_erf_b[k]));
    __m512d rb = _mm512_fnmadd_pd(ops_expd_avx512(_mm512_sub_pd(_mm512_setzero_pd(), _mm512_mul_pd(c, c))), q, one);
    return _mm512_mask_blend_pd(_mm512_cmp_pd_mask(a, one, _CMP_LT_OQ), rb, ra);
}
MS_TARGET_AVX512
static inline __m512 ops_erf_avx512(__m512 x) {
    __m512 a = _mm512_abs_ps(x);
    __m256 lo = _mm512_cvtpd_ps(ops_erf_pd_avx512(_mm512_cvtps_pd(_mm512_castps512_ps256(a))));
    __m256 hi = _mm512_cvtpd_ps(ops_erf_pd_avx512(_mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(a), 1)))));
    __m512 r = _mm512_castpd_ps(_mm512_insertf64x4(_mm512_castpd256_pd512(_mm256_castps_pd(lo)), _mm256_castps_pd(hi), 1));
    r = _mm512_castsi512_ps(_mm512_or_si512(_mm512_castps_si512(r),
                                            _mm512_and_si512(_mm512_castps_si512(x), _mm512_set1_epi32(INT32_MIN))));
    return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q), r, x);
}
MS_TARGET_AVX2
static inline __m256d ops_erf_pd_avx2(__m256d a) {
    const __m256d one = _mm256_set1_pd(1.0);
    __m256d t = _mm256_mul_pd(a, a), p = _mm256_set1_pd(ops_erf_a[7]);
    for (int k = 6; k >= 0; k--) p = _mm256_fmadd_pd(p, t, _mm256_set1_pd(ops_erf_a[k]));
    __m256d ra = _mm256_mul_pd(a, p);
    __m256d c = _mm256_min_pd(a, _mm256_set1_pd(4.0)), u = _mm256_div_pd(one, c), q = _mm256_set1_pd(ops_erf_b[11]);
    for (int k = 10; k >= 0; k--) q = _mm256_fmadd_pd(q, u, _mm256_set1_pd(ops_erf_b[k]));
    __m256d rb = _mm256_fnmadd_pd(ops_expd_avx2(_mm256_sub_pd(_mm256_setzero_pd(), _mm256_mul_pd(c, c))), q, one);
    return _mm256_blendv_pd(rb, ra, _mm256_cmp_pd(a, one, _CMP_LT_OQ));
}
MS_TARGET_AVX2
static inline __m256 ops_erf_avx2(__m256 x) {
    const __m256 sign = _mm256_set1_ps(-0.0f);
    __m256 a = _mm256_andnot_ps(sign, x);
    __m128 lo = _mm256_cvtpd_ps(ops_erf_pd_avx2(_mm256_cvtps_pd(_mm256_castps256_ps128(a))));
    __m128 hi = _mm256_cvtpd_ps(ops_erf_pd_avx2(_mm256_cvtps_pd(_mm256_extractf128_ps(a, 1))));
    __m256 r = _mm256_insertf128_ps(_mm256_castps128_ps256(lo), hi, 1);
    r = _mm256_or_ps(r, _mm256_and_ps(x, sign));
    return _mm256_blendv_ps(r, x, _mm256_cmp_ps(x, x, _CMP_UNORD_Q));
}

/* The spans at AVX-512 / AVX2: the scalar twins' operations, lane by lane (erf and exp above). */
MS_TARGET_AVX512
static inline __m512 ops_gelu_avx512(__m512 x) {
    __m512 e = ops_erf_avx512(_mm512_mul_ps(x, _mm512_set1_ps((float)OPS_SQRT1_2)));
    return _mm512_mul_ps(_mm512_mul_ps(x, _mm512_set1_ps(0.5f)), _mm512_add_ps(_mm512_set1_ps(1.0f), e));
}
MS_TARGET_AVX512
static inline __m512 ops_gelu_grad_avx512(__m512 x) {
    __m512 e = ops_erf_avx512(_mm512_mul_ps(x, _mm512_set1_ps((float)OPS_SQRT1_2)));
    __m512 g = ops_exp_avx512(_mm512_mul_ps(_mm512_mul_ps(_mm512_set1_ps(-0.5f), x), x));
    return _mm512_add_ps(_mm512_mul_ps(_mm512_set1_ps(0.5f), _mm512_add_ps(_mm512_set1_ps(1.0f), e)),
                         _mm512_mul_ps(_mm512_mul_ps(x, _mm512_set1_ps((float)OPS_INV_SQRT_2PI)), g));
}
MS_TARGET_AVX512
static void ops_gelu_span_avx512(float *out, const float *x, const float *h, size_t n) {
    for (size_t i = 0; i < n; i += 16) {
        __mmask16 m = n - i >= 16 ? (__mmask16)0xFFFF : ms_mask16((int)(n - i));
        __m512 y = ops_gelu_avx512(_mm512_maskz_loadu_ps(m, x + i));
        if (h) y = _mm512_mul_ps(_mm512_maskz_loadu_ps(m, h + i), y);
        _mm512_mask_storeu_ps(out + i, m, y);
    }
}
MS_TARGET_AVX512
static void ops_gelu_bwd_span_avx512(float *dx, float *dh, const float *dy, const float *x, const float *h, size_t n) {
    for (size_t i = 0; i < n; i += 16) {
        __mmask16 m = n - i >= 16 ? (__mmask16)0xFFFF : ms_mask16((int)(n - i));
        __m512 xv = _mm512_maskz_loadu_ps(m, x + i), d = _mm512_maskz_loadu_ps(m, dy + i);
        if (h) {
            _mm512_mask_storeu_ps(dh + i, m, _mm512_add_ps(_mm512_maskz_loadu_ps(m, dh + i), _mm512_mul_ps(d, ops_gelu_avx512(xv))));
            d = _mm512_mul_ps(d, _mm512_maskz_loadu_ps(m, h + i));
        }
        _mm512_mask_storeu_ps(dx + i, m, _mm512_add_ps(_mm512_maskz_loadu_ps(m, dx + i), _mm512_mul_ps(d, ops_gelu_grad_avx512(xv))));
    }
}
MS_TARGET_AVX2
static inline __m256 ops_gelu_avx2(__m256 x) {
    __m256 e = ops_erf_avx2(_mm256_mul_ps(x, _mm256_set1_ps((float)OPS_SQRT1_2)));
    return _mm256_mul_ps(_mm256_mul_ps(x, _mm256_set1_ps(0.5f)), _mm256_add_ps(_mm256_set1_ps(1.0f), e));
}
MS_TARGET_AVX2
static inline __m256 ops_gelu_grad_avx2(__m256 x) {
    __m256 e = ops_erf_avx2(_mm256_mul_ps(x, _mm256_set1_ps((float)OPS_SQRT1_2)));
    __m256 g = ops_exp_avx2(_mm256_mul_ps(_mm256_mul_ps(_mm256_set1_ps(-0.5f), x), x));
    return _mm256_add_ps(_mm256_mul_ps(_mm256_set1_ps(0.5f), _mm256_add_ps(_mm256_set1_ps(1.0f), e)),
                         _mm256_mul_ps(_mm256_mul_ps(x, _mm256_set1_ps((float)OPS_INV_SQRT_2PI)), g));
}
MS_TARGET_AVX2
static void ops_gelu_span_avx2(float *out, const float *x, const float *h, size_t n) {
    size_t i = 0;
    for (; i + 8 <= n; i += 8) {
        __m256 y = ops_gelu_avx2(_mm256_loadu_ps(x + i));
        if (h) y = _mm256_mul_ps(_mm256_loadu_ps(h + i), y);
        _mm256_storeu_ps(out + i, y);
    }
    if (i < n) {                                         /* the tail through a padded vector */
        float t[8] = { 0 }, u[8] = { 0 };
        memcpy(t, x + i, (n - i) * sizeof(float));
        if (h) memcpy(u, h + i, (n - i) * sizeof(float));
        __m256 y = ops_gelu_avx2(_mm256_loadu_ps(t));
        if (h) y = _mm256_mul_ps(_mm256_loadu_ps(u), y);
        _mm256_storeu_ps(t, y);
        memcpy(out + i, t, (n - i) * sizeof(float));
    }
}
/* 8 values of the backward span in place (full vectors: loads and stores straight to memory) */
MS_TARGET_AVX2
static inline void ops_gelu_bwd8_avx2(float *dx, float *dh, const float *dy, const float *x, const float *h) {
    __m256 xv = _mm256_loadu_ps(x), d = _mm256_loadu_ps(dy);
    if (h) {
        _mm256_storeu_ps(dh, _mm256_add_ps(_mm256_loadu_ps(dh), _mm256_mul_ps(d, ops_gelu_avx2(xv))));
        d = _mm256_mul_ps(d, _mm256_loadu_ps(h));
    }
    _mm256_storeu_ps(dx, _mm256_add_ps(_mm256_loadu_ps(dx), _mm256_mul_ps(d, ops_gelu_grad_avx2(xv))));
}
MS_TARGET_AVX2
static void ops_gelu_bwd_span_avx2(float *dx, float *dh, const float *dy, const float *x, const float *h, size_t n) {
    size_t i = 0;
    for (; i + 8 <= n; i += 8) ops_gelu_bwd8_avx2(dx + i, h ? dh + i : NULL, dy + i, x + i, h ? h + i : NULL);
    if (i < n) {                                         /* the tail through padded copies */
        size_t k = n - i;
        float tx[8] = { 0 }, td[8] = { 0 }, th[8] = { 0 }, tdh[8] = { 0 }, tdx[8] = { 0 };
        memcpy(tx, x + i, k * sizeof(float));
        memcpy(td, dy + i, k * sizeof(float));
        memcpy(tdx, dx + i, k * sizeof(float));
        if (h) { memcpy(th, h + i, k * sizeof(float)); memcpy(tdh, dh + i, k * sizeof(float)); }
        ops_gelu_bwd8_avx2(tdx, h ? tdh : NULL, td, tx, h ? th : NULL);
        memcpy(dx + i, tdx, k * sizeof(float));
        if (h) memcpy(dh + i, tdh, k * sizeof(float));
    }
}
MS_TARGET_AVX512
static void ops_erff_vec_avx512(float *y, const float *x, size_t n) {
    for (size_t i = 0; i < n; i += 16) {
        __mmask16 m = n - i >= 16 ? (__mmask16)0xFFFF : ms_mask16((int)(n - i));
        _mm512_mask_storeu_ps(y + i, m, ops_erf_avx512(_mm512_maskz_loadu_ps(m, x + i)));
    }
}
MS_TARGET_AVX2
static void ops_erff_vec_avx2(float *y, const float *x, size_t n) {
    size_t i = 0;
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(y + i, ops_erf_avx2(_mm256_loadu_ps(x + i)));
    if (i < n) {                                         /* the tail through a padded vector */
        float t[8] = { 0 };
        memcpy(t, x + i, (n - i) * sizeof(float));
        _mm256_storeu_ps(t, ops_erf_avx2(_mm256_loadu_ps(t)));
        memcpy(y + i, t, (n - i) * sizeof(float));
    }
}
#endif

static void ops_gelu_span(float *out, const float *x, const float *h, size_t n) {
#if defined(MS_X86_KERNELS)
    MsSimd l = ms_simd();
    if (l >= MS_SIMD_AVX512) { ops_gelu_span_avx512(out, x, h, n); return; }
    if (l >= MS_SIMD_AVX2) { ops_gelu_span_avx2(out, x, h, n); return; }
#endif
    ops_gelu_span_ref(out, x, h, n);
}
static void ops_gelu_bwd_span(float *dx, float *dh, const float *dy, const float *x, const float *h, size_t n) {
#if defined(MS_X86_KERNELS)
    MsSimd l = ms_simd();
    if (l >= MS_SIMD_AVX512) { ops_gelu_bwd_span_avx512(dx, dh, dy, x, h, n); return; }
    if (l >= MS_SIMD_AVX2) { ops_gelu_bwd_span_avx2(dx, dh, dy, x, h, n); return; }
#endif
    ops_gelu_bwd_span_ref(dx, dh, dy, x, h, n);
}

static float ops_expf_exact(float v) {
    if (v != v) return v;
    return (float)ops_expd_poly(v < -104.0f ? -104.0 : v > 89.0f ? 89.0 : (double)v);
}
static void ops_expf_exact_vec(float *y, const float *x, float k, size_t n) {
#if defined(MS_X86_KERNELS)
    MsSimd l = ms_simd();
    if (l >= MS_SIMD_AVX512) { ops_expf_exact_vec_avx512(y, x, k, n); return; }
    if (l >= MS_SIMD_AVX2) { ops_expf_exact_vec_avx2(y, x, k, n); return; }
#endif
    for (size_t i = 0; i < n; i++) y[i] = ops_expf_exact(k * x[i]);
}
void ms_expf_exact_vec(float *y, const float *x, size_t n) { ops_expf_exact_vec(y, x, 1.0f, n); }

void ms_erff_vec(float *y, const float *x, size_t n) {
#if defined(MS_X86_KERNELS)
    MsSimd l = ms_simd();
    if (l >= MS_SIMD_AVX512) { ops_erff_vec_avx512(y, x, n); return; }
    if (l >= MS_SIMD_AVX2) { ops_erff_vec_avx2(y, x, n); return; }
#endif
    for (size_t i = 0; i < n; i++) y[i] = ops_erf_poly(x[i]);
}

#if defined(MS_X86_KERNELS)
/* Tile geometry per SIMD level: NQ queries per block (2 vectors), MR_S keys per score panel
 * (the GEMM micro-kernel's MR), MR_D channels per output panel, MR_K keys per dK/dV tile. */
typedef struct { int level, nq, mrs, mrd, mrk; MsUkr ukr; } OpsAttGeom;

static int ops_att_geom(OpsAttGeom *g) {
    MsSimd l = ms_simd();
    if (l >= MS_SIMD_AVX512) { g->level = 5; g->nq = 32; g->mrs = 14; g->mrd = 8; g->mrk = 8; g->ukr = ms_ukr_avx512; return 1; }
    if (l >= MS_SIMD_AVX2) { g->level = 2; g->nq = 16; g->mrs = 6; g->mrd = 5; g->mrk = 4; g->ukr = ms_ukr_avx2; return 1; }
    return 0;
}

/* Lanes c of a block starting at query i0 that see key j (causal: j <= i0 + c), as bits. */
static uint32_t ops_att_lanes(int j, int i0, int causal) {
    int k = j - i0;
    if (!causal || k <= 0) return 0xFFFFFFFFu;
    return k >= 32 ? 0u : 0xFFFFFFFFu << k;
}

/* Forward softmax down the columns of S (tk rows x 32 lanes): S <- exp(S - m) (0 where causal
 * hides the key), inv[c] = 1 / l_c, lse[c] = m_c + log l_c (lsel NULL: not wanted, no log). */
MS_TARGET_AVX512
static void ops_att_softmax_avx512(float *S, int tk, int i0, int causal, float *inv, float *lsel) {
    __m512 m0 = _mm512_set1_ps(-INFINITY), m1 = m0;
    int jf = causal ? OPS_MIN(tk, i0 + 1) : tk;          /* rows every lane sees */
    if (jf < 0) jf = 0;
    for (int j = 0; j < jf; j++) {
        m0 = _mm512_max_ps(m0, _mm512_loadu_ps(S + (size_t)j * 32));
        m1 = _mm512_max_ps(m1, _mm512_loadu_ps(S + (size_t)j * 32 + 16));
    }
    for (int j = jf; j < tk; j++) {
        uint32_t b = ops_att_lanes(j, i0, causal);
        m0 = _mm512_mask_max_ps(m0, (__mmask16)b, m0, _mm512_loadu_ps(S + (size_t)j * 32));
        m1 = _mm512_mask_max_ps(m1, (__mmask16)(b >> 16), m1, _mm512_loadu_ps(S + (size_t)j * 32 + 16));
    }
    __m512d l0 = _mm512_setzero_pd(), l1 = l0, l2 = l0, l3 = l0;
    for (int j = 0; j < tk; j++) {
        float *s = S + (size_t)j * 32;
        __m512 p0 = ops_exp_avx512(_mm512_sub_ps(_mm512_loadu_ps(s), m0));
        __m512 p1 = ops_exp_avx512(_mm512_sub_ps(_mm512_loadu_ps(s + 16), m1));
        if (j >= jf) {
            uint32_t b = ops_att_lanes(j, i0, causal);
            p0 = _mm512_maskz_mov_ps((__mmask16)b, p0);
            p1 = _mm512_maskz_mov_ps((__mmask16)(b >> 16), p1);
        }
        _mm512_storeu_ps(s, p0);
        _mm512_storeu_ps(s + 16, p1);
        l0 = _mm512_add_pd(l0, _mm512_cvtps_pd(_mm512_castps512_ps256(p0)));
        l1 = _mm512_add_pd(l1, _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(p0), 1))));
        l2 = _mm512_add_pd(l2, _mm512_cvtps_pd(_mm512_castps512_ps256(p1)));
        l3 = _mm512_add_pd(l3, _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(p1), 1))));
    }
    double l[32];
    float m[32];
    _mm512_storeu_pd(l, l0); _mm512_storeu_pd(l + 8, l1); _mm512_storeu_pd(l + 16, l2); _mm512_storeu_pd(l + 24, l3);
    _mm512_storeu_ps(m, m0); _mm512_storeu_ps(m + 16, m1);
    for (int c = 0; c < 32; c++) inv[c] = l[c] > 0.0 ? (float)(1.0 / l[c]) : 0.0f;
    if (lsel) for (int c = 0; c < 32; c++) lsel[c] = (float)((double)m[c] + log(l[c]));
}

MS_TARGET_AVX2
static void ops_att_softmax_avx2(float *S, int tk, int i0, int causal, float *inv, float *lsel) {
    __m256 m0 = _mm256_set1_ps(-INFINITY), m1 = m0;
    const __m256 io0 = _mm256_setr_ps(0, 1, 2, 3, 4, 5, 6, 7), io1 = _mm256_setr_ps(8, 9, 10, 11, 12, 13, 14, 15);
    int jf = causal ? OPS_MIN(tk, i0 + 1) : tk;
    if (jf < 0) jf = 0;
    for (int j = 0; j < jf; j++) {
        m0 = _mm256_max_ps(m0, _mm256_loadu_ps(S + (size_t)j * 16));
        m1 = _mm256_max_ps(m1, _mm256_loadu_ps(S + (size_t)j * 16 + 8));
    }
    for (int j = jf; j < tk; j++) {                     /* lane c sees j when c >= j - i0 */
        __m256 k = _mm256_set1_ps((float)(j - i0));
        __m256 v0 = _mm256_cmp_ps(io0, k, _CMP_GE_OQ), v1 = _mm256_cmp_ps(io1, k, _CMP_GE_OQ);
        m0 = _mm256_blendv_ps(m0, _mm256_max_ps(m0, _mm256_loadu_ps(S + (size_t)j * 16)), v0);
        m1 = _mm256_blendv_ps(m1, _mm256_max_ps(m1, _mm256_loadu_ps(S + (size_t)j * 16 + 8)), v1);
    }
    __m256d l0 = _mm256_setzero_pd(), l1 = l0, l2 = l0, l3 = l0;
    for (int j = 0; j < tk; j++) {
        float *s = S + (size_t)j * 16;
        __m256 p0 = ops_exp_avx2(_mm256_sub_ps(_mm256_loadu_ps(s), m0));
        __m256 p1 = ops_exp_avx2(_mm256_sub_ps(_mm256_loadu_ps(s + 8), m1));
        if (j >= jf) {
            __m256 k = _mm256_set1_ps((float)(j - i0));
            p0 = _mm256_and_ps(p0, _mm256_cmp_ps(io0, k, _CMP_GE_OQ));
            p1 = _mm256_and_ps(p1, _mm256_cmp_ps(io1, k, _CMP_GE_OQ));
        }
        _mm256_storeu_ps(s, p0);
        _mm256_storeu_ps(s + 8, p1);
        l0 = _mm256_add_pd(l0, _mm256_cvtps_pd(_mm256_castps256_ps128(p0)));
        l1 = _mm256_add_pd(l1, _mm256_cvtps_pd(_mm256_extractf128_ps(p0, 1)));
        l2 = _mm256_add_pd(l2, _mm256_cvtps_pd(_mm256_castps256_ps128(p1)));
        l3 = _mm256_add_pd(l3, _mm256_cvtps_pd(_mm256_extractf128_ps(p1, 1)));
    }
    double l[16];
    float m[16];
    _mm256_storeu_pd(l, l0); _mm256_storeu_pd(l + 4, l1); _mm256_storeu_pd(l + 8, l2); _mm256_storeu_pd(l + 12, l3);
    _mm256_storeu_ps(m, m0); _mm256_storeu_ps(m + 8, m1);
    for (int c = 0; c < 16; c++) inv[c] = l[c] > 0.0 ? (float)(1.0 / l[c]) : 0.0f;
    if (lsel) for (int c = 0; c < 16; c++) lsel[c] = (float)((double)m[c] + log(l[c]));
}

/* Backward, down the columns: S <- P = exp(S - lse) (0 where hidden), dP <- dS = P (dP - D). */
MS_TARGET_AVX512
static void ops_att_dsoftmax_avx512(float *S, float *dP, int tk, int i0, int causal, const float *lsel, const float *D) {
    __m512 e0 = _mm512_loadu_ps(lsel), e1 = _mm512_loadu_ps(lsel + 16), d0 = _mm512_loadu_ps(D), d1 = _mm512_loadu_ps(D + 16);
    for (int j = 0; j < tk; j++) {
        float *s = S + (size_t)j * 32, *dp = dP + (size_t)j * 32;
        __m512 p0 = ops_exp_avx512(_mm512_sub_ps(_mm512_loadu_ps(s), e0));
        __m512 p1 = ops_exp_avx512(_mm512_sub_ps(_mm512_loadu_ps(s + 16), e1));
        if (causal && j > i0) {
            uint32_t b = ops_att_lanes(j, i0, causal);
            p0 = _mm512_maskz_mov_ps((__mmask16)b, p0);
            p1 = _mm512_maskz_mov_ps((__mmask16)(b >> 16), p1);
        }
        _mm512_storeu_ps(s, p0);
        _mm512_storeu_ps(s + 16, p1);
        _mm512_storeu_ps(dp, _mm512_mul_ps(p0, _mm512_sub_ps(_mm512_loadu_ps(dp), d0)));
        _mm512_storeu_ps(dp + 16, _mm512_mul_ps(p1, _mm512_sub_ps(_mm512_loadu_ps(dp + 16), d1)));
    }
}

MS_TARGET_AVX2
static void ops_att_dsoftmax_avx2(float *S, float *dP, int tk, int i0, int causal, const float *lsel, const float *D) {
    __m256 e0 = _mm256_loadu_ps(lsel), e1 = _mm256_loadu_ps(lsel + 8), d0 = _mm256_loadu_ps(D), d1 = _mm256_loadu_ps(D + 8);
    const __m256 io0 = _mm256_setr_ps(0, 1, 2, 3, 4, 5, 6, 7), io1 = _mm256_setr_ps(8, 9, 10, 11, 12, 13, 14, 15);
    for (int j = 0; j < tk; j++) {
        float *s = S + (size_t)j * 16, *dp = dP + (size_t)j * 16;
        __m256 p0 = ops_exp_avx2(_mm256_sub_ps(_mm256_loadu_ps(s), e0));
        __m256 p1 = ops_exp_avx2(_mm256_sub_ps(_mm256_loadu_ps(s + 8), e1));
        if (causal && j > i0) {
            __m256 k = _mm256_set1_ps((float)(j - i0));
            p0 = _mm256_and_ps(p0, _mm256_cmp_ps(io0, k, _CMP_GE_OQ));
            p1 = _mm256_and_ps(p1, _mm256_cmp_ps(io1, k, _CMP_GE_OQ));
        }
        _mm256_storeu_ps(s, p0);
        _mm256_storeu_ps(s + 8, p1);
        _mm256_storeu_ps(dp, _mm256_mul_ps(p0, _mm256_sub_ps(_mm256_loadu_ps(dp), d0)));
        _mm256_storeu_ps(dp + 8, _mm256_mul_ps(p1, _mm256_sub_ps(_mm256_loadu_ps(dp + 8), d1)));
    }
}

/* Long-depth tile: c (MR_D x NQ) = sum_j a[j*MR_D + i] b[j*NQ + lane], j < kc, in j order;
 * acc: the sums continue from c (a tile split over key chunks gives the bits of one call). */
#define OPS_R8(X) X(0) X(1) X(2) X(3) X(4) X(5) X(6) X(7)
#define OPS_R5(X) X(0) X(1) X(2) X(3) X(4)
#define OPS_PV5_DECL(i) __m512 c##i##a = acc ? _mm512_loadu_ps(c + i * 32) : _mm512_setzero_ps(), \
    c##i##b = acc ? _mm512_loadu_ps(c + i * 32 + 16) : _mm512_setzero_ps();
#define OPS_PV5_STEP(i) { __m512 ai = _mm512_set1_ps(a[i]); \
    c##i##a = _mm512_fmadd_ps(ai, b0, c##i##a); c##i##b = _mm512_fmadd_ps(ai, b1, c##i##b); }
#define OPS_PV5_ST(i) _mm512_storeu_ps(c + i * 32, c##i##a); _mm512_storeu_ps(c + i * 32 + 16, c##i##b);
MS_TARGET_AVX512
static void ops_att_pv_avx512(int kc, const float *a, const float *b, float *c, int acc) {
    OPS_R8(OPS_PV5_DECL)
    for (int k = 0; k < kc; k++, a += 8, b += 32) {
        __m512 b0 = _mm512_loadu_ps(b), b1 = _mm512_loadu_ps(b + 16);
        OPS_R8(OPS_PV5_STEP)
    }
    OPS_R8(OPS_PV5_ST)
}
#define OPS_PV2_DECL(i) __m256 c##i##a = acc ? _mm256_loadu_ps(c + i * 16) : _mm256_setzero_ps(), \
    c##i##b = acc ? _mm256_loadu_ps(c + i * 16 + 8) : _mm256_setzero_ps();
#define OPS_PV2_STEP(i) { __m256 ai = _mm256_broadcast_ss(a + i); \
    c##i##a = _mm256_fmadd_ps(ai, b0, c##i##a); c##i##b = _mm256_fmadd_ps(ai, b1, c##i##b); }
#define OPS_PV2_ST(i) _mm256_storeu_ps(c + i * 16, c##i##a); _mm256_storeu_ps(c + i * 16 + 8, c##i##b);
MS_TARGET_AVX2
static void ops_att_pv_avx2(int kc, const float *a, const float *b, float *c, int acc) {
    OPS_R5(OPS_PV2_DECL)
    for (int k = 0; k < kc; k++, a += 5, b += 16) {
        __m256 b0 = _mm256_loadu_ps(b), b1 = _mm256_loadu_ps(b + 8);
        OPS_R5(OPS_PV2_STEP)
    }
    OPS_R5(OPS_PV2_ST)
}

/* Rank-nr update of nk (<= MR_K) rows of C (row stride ldc), nd (<= 48 / 16) columns:
 *   C[j][d] += alpha * sum_{r < nr} A[j*NQ + r] B[r*ldb + d]    (r in order, then one FMA).
 * Rows of A past nk are read but not used. */
#define OPS_RK5_DECL(i) __m512 c##i##0 = _mm512_setzero_ps(), c##i##1 = c##i##0, c##i##2 = c##i##0;
#define OPS_RK5_STEP(i) { __m512 ai = _mm512_set1_ps(A[(size_t)i * 32 + r]); \
    c##i##0 = _mm512_fmadd_ps(ai, b0, c##i##0); c##i##1 = _mm512_fmadd_ps(ai, b1, c##i##1); \
    c##i##2 = _mm512_fmadd_ps(ai, b2, c##i##2); }
#define OPS_RK5_ST(i) if (i < nk) { float *ci = C + (size_t)i * ldc; \
    _mm512_mask_storeu_ps(ci, k0, _mm512_fmadd_ps(va, c##i##0, _mm512_maskz_loadu_ps(k0, ci))); \
    _mm512_mask_storeu_ps(ci + 16, k1, _mm512_fmadd_ps(va, c##i##1, _mm512_maskz_loadu_ps(k1, ci + 16))); \
    _mm512_mask_storeu_ps(ci + 32, k2, _mm512_fmadd_ps(va, c##i##2, _mm512_maskz_loadu_ps(k2, ci + 32))); }
static __mmask16 ops_mask16(int n) { return n >= 16 ? (__mmask16)0xFFFF : n <= 0 ? (__mmask16)0 : (__mmask16)((1u << n) - 1u); }
MS_TARGET_AVX512
static void ops_att_rk_avx512(int nk, int nr, const float *A, const float *B, size_t ldb, float *C, size_t ldc,
                              int nd, float alpha) {
    __mmask16 k0 = ops_mask16(nd), k1 = ops_mask16(nd - 16), k2 = ops_mask16(nd - 32);
    OPS_R8(OPS_RK5_DECL)
    if (nd > 32) {
        for (int r = 0; r < nr; r++) {
            const float *br = B + (size_t)r * ldb;
            __m512 b0 = _mm512_loadu_ps(br), b1 = _mm512_loadu_ps(br + 16), b2 = _mm512_maskz_loadu_ps(k2, br + 32);
            OPS_R8(OPS_RK5_STEP)
        }
    } else {                                             /* 2 vectors: skip the third's FMAs */
        for (int r = 0; r < nr; r++) {
            const float *br = B + (size_t)r * ldb;
            __m512 b0 = _mm512_maskz_loadu_ps(k0, br), b1 = _mm512_maskz_loadu_ps(k1, br + 16), b2 = _mm512_setzero_ps();
            OPS_R8(OPS_RK5_STEP)
        }
    }
    __m512 va = _mm512_set1_ps(alpha);
    OPS_R8(OPS_RK5_ST)
}
#define OPS_R4(X) X(0) X(1) X(2) X(3)
#define OPS_RK2_DECL(i) __m256 c##i##0 = _mm256_setzero_ps(), c##i##1 = c##i##0;
#define OPS_RK2_STEP(i) { __m256 ai = _mm256_broadcast_ss(A + (size_t)i * 16 + r); \
    c##i##0 = _mm256_fmadd_ps(ai, b0, c##i##0); c##i##1 = _mm256_fmadd_ps(ai, b1, c##i##1); }
#define OPS_RK2_ST(i) if (i < nk) { float *ci = C + (size_t)i * ldc; \
    _mm256_maskstore_ps(ci, m0, _mm256_fmadd_ps(va, c##i##0, _mm256_maskload_ps(ci, m0))); \
    _mm256_maskstore_ps(ci + 8, m1, _mm256_fmadd_ps(va, c##i##1, _mm256_maskload_ps(ci + 8, m1))); }
MS_TARGET_AVX2
static void ops_att_rk_avx2(int nk, int nr, const float *A, const float *B, size_t ldb, float *C, size_t ldc,
                            int nd, float alpha) {
    const __m256i io = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    __m256i m0 = _mm256_cmpgt_epi32(_mm256_set1_epi32(nd), io), m1 = _mm256_cmpgt_epi32(_mm256_set1_epi32(nd - 8), io);
    OPS_R4(OPS_RK2_DECL)
    for (int r = 0; r < nr; r++) {
        const float *br = B + (size_t)r * ldb;
        __m256 b0 = _mm256_maskload_ps(br, m0), b1 = _mm256_maskload_ps(br + 8, m1);
        OPS_R4(OPS_RK2_STEP)
    }
    __m256 va = _mm256_set1_ps(alpha);
    OPS_R4(OPS_RK2_ST)
}

static void ops_att_softmax_v(const OpsAttGeom *g, float *S, int tk, int i0, int causal, float *inv, float *lsel) {
    if (g->level == 5) ops_att_softmax_avx512(S, tk, i0, causal, inv, lsel);
    else ops_att_softmax_avx2(S, tk, i0, causal, inv, lsel);
}
static void ops_att_dsoftmax_v(const OpsAttGeom *g, float *S, float *dP, int tk, int i0, int causal,
                               const float *lsel, const float *D) {
    if (g->level == 5) ops_att_dsoftmax_avx512(S, dP, tk, i0, causal, lsel, D);
    else ops_att_dsoftmax_avx2(S, dP, tk, i0, causal, lsel, D);
}
static void ops_att_pv_v(const OpsAttGeom *g, int kc, const float *a, const float *b, float *c, int acc) {
    if (g->level == 5) ops_att_pv_avx512(kc, a, b, c, acc);
    else ops_att_pv_avx2(kc, a, b, c, acc);
}
/* C (tk, Dh) += alpha A^T B: A (tk rows x NQ) the column block, B (nr rows, stride ldb, Dh). */
static void ops_att_rank_update(const OpsAttGeom *g, int tk, int nr, const float *A, const float *B, size_t ldb,
                                float *C, size_t ldc, int Dh, float alpha) {
    int dstep = g->level == 5 ? 48 : 16;
    for (int j0 = 0; j0 < tk; j0 += g->mrk) {
        int nk = OPS_MIN(g->mrk, tk - j0);
        for (int d0 = 0; d0 < Dh; d0 += dstep) {
            int nd = OPS_MIN(dstep, Dh - d0);
            if (g->level == 5) ops_att_rk_avx512(nk, nr, A + (size_t)j0 * 32, B + d0, ldb, C + (size_t)j0 * ldc + d0, ldc, nd, alpha);
            else ops_att_rk_avx2(nk, nr, A + (size_t)j0 * 16, B + d0, ldb, C + (size_t)j0 * ldc + d0, ldc, nd, alpha);
        }
    }
}

static size_t ops_up(size_t n, size_t m) { return (n + m - 1) / m * m; }

/* D[c] = (float) sum_d (double)a[d*NQ + c] b[d*NQ + c], d < Dh in order, one lane per query:
 * the products of floats are exact in double, so each lane is the scalar loop's sum. */
#define OPS_LO8(x) _mm512_cvtps_pd(_mm512_castps512_ps256(x))
#define OPS_HI8(x) _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(x), 1)))
MS_TARGET_AVX512
static void ops_att_lanedot_avx512(float *D, const float *a, const float *b, int Dh) {
    __m512d s0 = _mm512_setzero_pd(), s1 = s0, s2 = s0, s3 = s0;
    for (int d = 0; d < Dh; d++, a += 32, b += 32) {
        __m512 x0 = _mm512_loadu_ps(a), x1 = _mm512_loadu_ps(a + 16), y0 = _mm512_loadu_ps(b), y1 = _mm512_loadu_ps(b + 16);
        s0 = _mm512_add_pd(s0, _mm512_mul_pd(OPS_LO8(x0), OPS_LO8(y0)));
        s1 = _mm512_add_pd(s1, _mm512_mul_pd(OPS_HI8(x0), OPS_HI8(y0)));
        s2 = _mm512_add_pd(s2, _mm512_mul_pd(OPS_LO8(x1), OPS_LO8(y1)));
        s3 = _mm512_add_pd(s3, _mm512_mul_pd(OPS_HI8(x1), OPS_HI8(y1)));
    }
    _mm256_storeu_ps(D, _mm512_cvtpd_ps(s0)); _mm256_storeu_ps(D + 8, _mm512_cvtpd_ps(s1));
    _mm256_storeu_ps(D + 16, _mm512_cvtpd_ps(s2)); _mm256_storeu_ps(D + 24, _mm512_cvtpd_ps(s3));
}
MS_TARGET_AVX2
static void ops_att_lanedot_avx2(float *D, const float *a, const float *b, int Dh) {
    __m256d s0 = _mm256_setzero_pd(), s1 = s0, s2 = s0, s3 = s0;
    for (int d = 0; d < Dh; d++, a += 16, b += 16) {
        __m256 x0 = _mm256_loadu_ps(a), x1 = _mm256_loadu_ps(a + 8), y0 = _mm256_loadu_ps(b), y1 = _mm256_loadu_ps(b + 8);
        s0 = _mm256_add_pd(s0, _mm256_mul_pd(_mm256_cvtps_pd(_mm256_castps256_ps128(x0)), _mm256_cvtps_pd(_mm256_castps256_ps128(y0))));
        s1 = _mm256_add_pd(s1, _mm256_mul_pd(_mm256_cvtps_pd(_mm256_extractf128_ps(x0, 1)), _mm256_cvtps_pd(_mm256_extractf128_ps(y0, 1))));
        s2 = _mm256_add_pd(s2, _mm256_mul_pd(_mm256_cvtps_pd(_mm256_castps256_ps128(x1)), _mm256_cvtps_pd(_mm256_castps256_ps128(y1))));
        s3 = _mm256_add_pd(s3, _mm256_mul_pd(_mm256_cvtps_pd(_mm256_extractf128_ps(x1, 1)), _mm256_cvtps_pd(_mm256_extractf128_ps(y1, 1))));
    }
    _mm_storeu_ps(D, _mm256_cvtpd_ps(s0)); _mm_storeu_ps(D + 4, _mm256_cvtpd_ps(s1));
    _mm_storeu_ps(D + 8, _mm256_cvtpd_ps(s2)); _mm_storeu_ps(D + 12, _mm256_cvtpd_ps(s3));
}

/* Back to row layout: dst[r][d] = f[r] T[d][r] (add 0) or dst[r][d] += f[r] T[d][r] (add 1) for
 * r < nq, d < Dh; T is (Dh rows x NQ lanes) and is overwritten by f T. AVX-512: f T lane-wise,
 * then 16 x 16 register transposes (into tmp, NQ x Dh, when adding); AVX2: one scalar loop. */
MS_TARGET_AVX512
static void ops_att_put_rows_avx512(float *dst, size_t ldd, float *T, int Dh, int nq, const float *f, int add, float *tmp) {
    __m512 f0 = _mm512_loadu_ps(f), f1 = _mm512_loadu_ps(f + 16);
    for (int d = 0; d < Dh; d++) {
        float *t = T + (size_t)d * 32;
        _mm512_storeu_ps(t, _mm512_mul_ps(_mm512_loadu_ps(t), f0));
        _mm512_storeu_ps(t + 16, _mm512_mul_ps(_mm512_loadu_ps(t + 16), f1));
    }
    if (!add) { ms_transpose_avx512(dst, ldd, T, 32, Dh, Dh, nq); return; }
    ms_transpose_avx512(tmp, (size_t)Dh, T, 32, Dh, Dh, nq);
    for (int r = 0; r < nq; r++) {
        float *o = dst + (size_t)r * ldd;
        const float *t = tmp + (size_t)r * Dh;
        for (int d0 = 0; d0 < Dh; d0 += 16) {
            __mmask16 m = ms_mask16(Dh - d0);
            _mm512_mask_storeu_ps(o + d0, m, _mm512_add_ps(_mm512_maskz_loadu_ps(m, o + d0), _mm512_maskz_loadu_ps(m, t + d0)));
        }
    }
}
static void ops_att_put_rows(const OpsAttGeom *g, float *dst, size_t ldd, float *T, int Dh, int nq, const float *f,
                             int add, float *tmp) {
    if (g->level == 5) { ops_att_put_rows_avx512(dst, ldd, T, Dh, nq, f, add, tmp); return; }
    for (int r = 0; r < nq; r++) {
        float *o = dst + (size_t)r * ldd;
        for (int d = 0; d < Dh; d++) {
            float t = T[(size_t)d * g->nq + r] * f[r];
            o[d] = add ? o[d] + t : t;
        }
    }
}

/* Keys per chunk of the backward (a multiple of MR_S): the chunk's S^T and dP^T (2 x 252 x 32
 * floats = 63 KiB at AVX-512) stay in L2 while they are rewritten and reread five ways. Their
 * scratch has 16 rows more: the dK/dV tiles read (and do not use) up to MR_K - 1 rows past. */
#define OPS_ATT_KCH 256
static int ops_att_chunk(const OpsAttGeom *g) { return g->mrs * (OPS_ATT_KCH / g->mrs); }

/* The few-keys forward (below): query rows per tile, key vectors (Tk <= 80). */
#define OPS_FK_ROWS 8
#define OPS_FK_HALF 4                                   /* rows per register tile of S, plain PV */
#define OPS_FK_MAXV 5                                   /* key vectors: Tk <= 80 */
#define OPS_FK_PF 8                                     /* prefetch distance in rows */

/* Scratch floats per thread. Forward: K key panels, V channel panels, S, the Q^T panel, O^T.
 * Backward: K and V key panels, K channel panels, S and dP (one key chunk each), the Q^T, dO^T
 * and O^T panels, dQ^T, its row copy, and dK, dV of the head. */
static size_t ops_att_ws_floats(const OpsAttGeom *g, int Tk, int Dh, int backward) {
    size_t tkp = ops_up((size_t)Tk, (size_t)g->mrs) + 16, dhp = ops_up((size_t)Dh, (size_t)g->mrd);
    size_t kp = ops_up(tkp * Dh, 16), vp = ops_up(dhp * (size_t)Tk, 16), qp = ops_up((size_t)Dh * g->nq, 16);
    size_t ot = ops_up(dhp * g->nq, 16), kv = ops_up((size_t)Tk * Dh, 16);
    if (!backward) {
        size_t few = (size_t)ops_up((size_t)Tk, 16) * (Dh + OPS_FK_ROWS) + (size_t)Tk * 2 * Dh;   /* fwd_few: Kt, S, Vd */
        size_t all = kp + vp + ops_up(tkp * g->nq, 16) + qp + ot;
        return few > all ? few : all;
    }
    size_t ks = ops_up((size_t)Tk, 16), few = ks * (4 * (size_t)Dh + 2 * (size_t)g->nq) + (size_t)Tk * 2 * Dh; /* bwd_few */
    size_t all = 2 * kp + vp + 2 * ops_up(((size_t)ops_att_chunk(g) + 16) * g->nq, 16) + 4 * qp + ot + 2 * kv;
    return few > all ? few : all;
}

/* ---- Few keys (cross-attention: Tk <= 80, non-causal), AVX-512 --------------------------- */
/* With 77 keys the transposes of the path below (Q^T in, O^T out) cost about as much as the
 * products. Here the keys lie in the vector lanes and query rows stay rows, so nothing is
 * transposed but K, once per task:
 *   Kt[d][j] = k_j[d], NK = ceil(Tk / 16) vectors per channel, zero past Tk;
 *   per tile of OPS_FK_ROWS query rows r:
 *     S[r][j] = scale sum_d q_r[d] Kt[d][j]   d in order, one FMA each from 0, then the scale
 *                                              (the bits of the S^T tiles of the path below)
 *     m_r = max_{j<Tk} S[r][j],  P[r][j] = exp(S[r][j] - m_r) (0 past Tk)
 *     l_r = sum_j P[r][j] in double: lane c of 8 sums keys c, c+8, c+16, ... in order, then the
 *           8 lanes as f64_dot8_combine does
 *     o_r = (sum_j P[r][j] v_j) / l_r          j in order, one FMA each; v_j read in place, or
 *                                              for Dh = 8, 24, 40 two rows per 2 Dh lanes
 *                                              (ops_fk_pv_pairs: no idle lanes at Dh = 40)
 * S and the plain PV in register tiles of OPS_FK_HALF rows, the row pairs OPS_FK_ROWS at once.
 * Only l's summation order differs from the path below, and it is exact in double while a
 * row's probabilities span less than 2^29 (out and lse bitwise equal to the path below at the
 * bench shapes); each row is its own, so the bits do not depend on the thread count. */
static int ops_att_few(const OpsAttGeom *g, int Tk, int causal) { return g->level == 5 && !causal && Tk <= 16 * OPS_FK_MAXV; }

/* S rows (OPS_FK_HALF x 16 NK, row stride 16 NK) of the query rows qr[r]; NK a constant after
 * inlining, so the 4 x NK accumulators live in registers. */
MS_TARGET_AVX512 __attribute__((always_inline))
static inline void ops_fk_scores(float *S, const float *const *qr, const float *Kt, int Dh, float scale, int NK) {
    __m512 c[OPS_FK_HALF][OPS_FK_MAXV], kv[OPS_FK_MAXV];
#pragma GCC unroll 8
    for (int r = 0; r < OPS_FK_HALF; r++)
#pragma GCC unroll 8
        for (int v = 0; v < NK; v++) c[r][v] = _mm512_setzero_ps();
    for (int d = 0; d < Dh; d++, Kt += 16 * NK) {
#pragma GCC unroll 8
        for (int v = 0; v < NK; v++) kv[v] = _mm512_loadu_ps(Kt + 16 * v);
#pragma GCC unroll 8
        for (int r = 0; r < OPS_FK_HALF; r++) {
            __m512 b = _mm512_set1_ps(qr[r][d]);
#pragma GCC unroll 8
            for (int v = 0; v < NK; v++) c[r][v] = _mm512_fmadd_ps(b, kv[v], c[r][v]);
        }
    }
    __m512 vs = _mm512_set1_ps(scale);
#pragma GCC unroll 8
    for (int r = 0; r < OPS_FK_HALF; r++)
#pragma GCC unroll 8
        for (int v = 0; v < NK; v++) _mm512_storeu_ps(S + (size_t)(r * NK + v) * 16, _mm512_mul_ps(vs, c[r][v]));
}

/* o_r[0..16 NV) (the last vector masked by lm) = f[r] sum_{j<Tk} P[r][j] v_j[c0..] (add: o_r +=
 * that, the product rounded first): rows of P have stride ks, v rows stride ldv; NV a constant
 * after inlining. */
MS_TARGET_AVX512 __attribute__((always_inline))
static inline void ops_fk_pv(float *const *orow, const float *P, int ks, const float *v, size_t ldv, int Tk,
                             const float *f, __mmask16 lm, int NV, int add) {
    __m512 c[OPS_FK_HALF][OPS_FK_MAXV], vv[OPS_FK_MAXV];
#pragma GCC unroll 8
    for (int r = 0; r < OPS_FK_HALF; r++)
#pragma GCC unroll 8
        for (int u = 0; u < NV; u++) c[r][u] = _mm512_setzero_ps();
    for (int j = 0; j < Tk; j++, v += ldv) {
#pragma GCC unroll 8
        for (int u = 0; u < NV; u++) vv[u] = u < NV - 1 ? _mm512_loadu_ps(v + 16 * u) : _mm512_maskz_loadu_ps(lm, v + 16 * u);
#pragma GCC unroll 8
        for (int r = 0; r < OPS_FK_HALF; r++) {
            __m512 b = _mm512_set1_ps(P[(size_t)r * ks + j]);
#pragma GCC unroll 8
            for (int u = 0; u < NV; u++) c[r][u] = _mm512_fmadd_ps(b, vv[u], c[r][u]);
        }
    }
#pragma GCC unroll 8
    for (int r = 0; r < OPS_FK_HALF; r++) {
        if (!orow[r]) continue;
        __m512 fr = _mm512_set1_ps(f[r]);
#pragma GCC unroll 8
        for (int u = 0; u < NV; u++) {
            __mmask16 m = u < NV - 1 ? (__mmask16)0xFFFF : lm;
            __m512 x = _mm512_mul_ps(c[r][u], fr);
            if (add) x = _mm512_add_ps(_mm512_maskz_loadu_ps(m, orow[r] + 16 * u), x);
            _mm512_mask_storeu_ps(orow[r] + 16 * u, m, x);
        }
    }
}

/* Row pairs, for Dh = 16 h + 8 (8, 24, 40): o_r ++ o_r+1 (2 Dh floats = NV = 2h+1 vectors, none
 * of them partly idle) = sum_j (P[r][j] in the lanes of o_r, P[r+1][j] in those of o_r+1) Vd[j],
 * Vd[j] = v_j ++ v_j; then f[r], f[r+1] likewise (add: added to the rows). The sums are those of
 * ops_fk_pv, element by element (j in order, one FMA each): only the lanes are arranged differently. */
MS_TARGET_AVX512 __attribute__((always_inline))
static inline void ops_fk_pv_pairs(float *const *orow, const float *P, int ks, const float *Vd, int Tk, const float *f, int NV,
                                   int add) {
    const int h = NV / 2;
    const __mmask16 hi = (__mmask16)0xFF00;
    __m512 c[OPS_FK_ROWS / 2][OPS_FK_MAXV], vv[OPS_FK_MAXV];
#pragma GCC unroll 8
    for (int p = 0; p < OPS_FK_ROWS / 2; p++)
#pragma GCC unroll 8
        for (int u = 0; u < NV; u++) c[p][u] = _mm512_setzero_ps();
    for (int j = 0; j < Tk; j++, Vd += 16 * NV) {
#pragma GCC unroll 8
        for (int u = 0; u < NV; u++) vv[u] = _mm512_loadu_ps(Vd + 16 * u);
#pragma GCC unroll 8
        for (int p = 0; p < OPS_FK_ROWS / 2; p++) {
            __m512 a = _mm512_set1_ps(P[(size_t)(2 * p) * ks + j]), b = _mm512_set1_ps(P[(size_t)(2 * p + 1) * ks + j]);
            __m512 m = _mm512_mask_blend_ps(hi, a, b);
#pragma GCC unroll 8
            for (int u = 0; u < NV; u++) c[p][u] = _mm512_fmadd_ps(u < h ? a : u == h ? m : b, vv[u], c[p][u]);
        }
    }
#pragma GCC unroll 8
    for (int p = 0; p < OPS_FK_ROWS / 2; p++) {
        float *o0 = orow[2 * p], *o1 = orow[2 * p + 1];
        __m512 a = _mm512_set1_ps(f[2 * p]), b = _mm512_set1_ps(f[2 * p + 1]), m = _mm512_mask_blend_ps(hi, a, b);
#pragma GCC unroll 8
        for (int u = 0; u < NV; u++) {
            __m512 x = _mm512_mul_ps(c[p][u], u < h ? a : u == h ? m : b), y;
            if (u < h) { if (o0) _mm512_storeu_ps(o0 + 16 * u, add ? _mm512_add_ps(_mm512_loadu_ps(o0 + 16 * u), x) : x); }
            else if (u > h) {
                float *w = o1 ? o1 + 16 * u - 16 * h - 8 : NULL;
                if (w) _mm512_storeu_ps(w, add ? _mm512_add_ps(_mm512_loadu_ps(w), x) : x);
            } else {
                const __mmask16 lo = (__mmask16)0x00FF;
                y = _mm512_shuffle_f32x4(x, x, 0xEE);
                if (o0) _mm512_mask_storeu_ps(o0 + 16 * h, lo, add ? _mm512_add_ps(_mm512_maskz_loadu_ps(lo, o0 + 16 * h), x) : x);
                if (o1) _mm512_mask_storeu_ps(o1, lo, add ? _mm512_add_ps(_mm512_maskz_loadu_ps(lo, o1), y) : y);
            }
        }
    }
}

MS_TARGET_AVX512
static void ops_fk_scores_n(float *S, const float *const *qr, const float *Kt, int Dh, float scale, int NK) {
    switch (NK) {
    case 1: ops_fk_scores(S, qr, Kt, Dh, scale, 1); break;
    case 2: ops_fk_scores(S, qr, Kt, Dh, scale, 2); break;
    case 3: ops_fk_scores(S, qr, Kt, Dh, scale, 3); break;
    case 4: ops_fk_scores(S, qr, Kt, Dh, scale, 4); break;
    default: ops_fk_scores(S, qr, Kt, Dh, scale, 5); break;
    }
}
MS_TARGET_AVX512
static void ops_fk_pv_n(float *const *orow, const float *P, int ks, const float *v, size_t ldv, int Tk,
                        const float *f, __mmask16 lm, int NV, int add) {
    switch (NV) {
    case 1: ops_fk_pv(orow, P, ks, v, ldv, Tk, f, lm, 1, add); break;
    case 2: ops_fk_pv(orow, P, ks, v, ldv, Tk, f, lm, 2, add); break;
    case 3: ops_fk_pv(orow, P, ks, v, ldv, Tk, f, lm, 3, add); break;
    case 4: ops_fk_pv(orow, P, ks, v, ldv, Tk, f, lm, 4, add); break;
    default: ops_fk_pv(orow, P, ks, v, ldv, Tk, f, lm, 5, add); break;
    }
}
MS_TARGET_AVX512
static void ops_fk_pv_pairs_n(float *const *orow, const float *P, int ks, const float *Vd, int Tk, const float *f, int NV,
                              int add) {
    switch (NV) {
    case 1: ops_fk_pv_pairs(orow, P, ks, Vd, Tk, f, 1, add); break;
    case 3: ops_fk_pv_pairs(orow, P, ks, Vd, Tk, f, 3, add); break;
    default: ops_fk_pv_pairs(orow, P, ks, Vd, Tk, f, 5, add); break;
    }
}

/* Softmax of the tile's S rows (NK vectors each, row stride 16 NK; keys past Tk ignored) in
 * place: P, and per row 1 / l and (lse not NULL) m + log l. The rows go side by side: each
 * row's max and sum are chains of dependent operations. */
MS_TARGET_AVX512
static void ops_fk_softmax(float *S, int NK, int Tk, float *inv, float *lse, int nq) {
    const __mmask16 last = ms_mask16(Tk - 16 * (NK - 1));
    __m512 m[OPS_FK_ROWS];
    __m512d l[OPS_FK_ROWS];
    float mx[OPS_FK_ROWS];
#pragma GCC unroll 8
    for (int r = 0; r < OPS_FK_ROWS; r++) { m[r] = _mm512_set1_ps(-INFINITY); l[r] = _mm512_setzero_pd(); }
    for (int v = 0; v < NK; v++) {
        __mmask16 k = v < NK - 1 ? (__mmask16)0xFFFF : last;
#pragma GCC unroll 8
        for (int r = 0; r < OPS_FK_ROWS; r++) m[r] = _mm512_mask_max_ps(m[r], k, m[r], _mm512_loadu_ps(S + (size_t)(r * NK + v) * 16));
    }
#pragma GCC unroll 8
    for (int r = 0; r < OPS_FK_ROWS; r++) { mx[r] = _mm512_reduce_max_ps(m[r]); m[r] = _mm512_set1_ps(mx[r]); }
    for (int v = 0; v < NK; v++) {
        __mmask16 k = v < NK - 1 ? (__mmask16)0xFFFF : last;
#pragma GCC unroll 8
        for (int r = 0; r < OPS_FK_ROWS; r++) {
            float *s = S + (size_t)(r * NK + v) * 16;
            __m512 p = _mm512_maskz_mov_ps(k, ops_exp_avx512(_mm512_sub_ps(_mm512_loadu_ps(s), m[r])));
            _mm512_storeu_ps(s, p);
            l[r] = _mm512_add_pd(_mm512_add_pd(l[r], OPS_LO8(p)), OPS_HI8(p));
        }
    }
#pragma GCC unroll 8
    for (int r = 0; r < OPS_FK_ROWS; r++) {
        double ls[8];
        _mm512_storeu_pd(ls, l[r]);
        double sum = f64_dot8_combine(ls);
        inv[r] = sum > 0.0 ? (float)(1.0 / sum) : 0.0f;
        if (lse && r < nq) lse[r] = (float)((double)mx[r] + log(sum));
    }
}

/* Prefetches the Dh-float pieces of n rows (row stride ld; none when n <= 0). A head's pieces
 * of the query and output rows lie H Dh floats apart, a pattern the hardware prefetchers do
 * not follow; fetched on demand, their misses (the output's above all) stall the tile. */
static void ops_att_prefetch_rows(const float *p, size_t ld, int n, int Dh) {
    for (int r = 0; r < n; r++) {
        const char *a = (const char *)(p + (size_t)r * ld);
        for (int t = 0; t < Dh; t += 16) _mm_prefetch(a + 4 * t, _MM_HINT_T0);
        _mm_prefetch(a + 4 * (Dh - 1), _MM_HINT_T0);
    }
}

/* dst[j] = src_j ++ src_j (2 Dh floats) for the Tk rows of src (row stride ld): the operand of
 * ops_fk_pv_pairs. */
static void ops_fk_rows_twice(float *dst, const float *src, int Tk, size_t ld, int Dh) {
    for (int j = 0; j < Tk; j++) {
        memcpy(dst + (size_t)j * 2 * Dh, src + (size_t)j * ld, (size_t)Dh * sizeof(float));
        memcpy(dst + (size_t)j * 2 * Dh + Dh, src + (size_t)j * ld, (size_t)Dh * sizeof(float));
    }
}

/* Query rows [r0, r1) of one (b, h), as ops_att_fwd_fast (below) but for few keys; the rows
 * of the tile OPS_FK_PF rows ahead are prefetched. */
MS_TARGET_AVX512
static void ops_att_fwd_few(float *out, float *lse, const float *q, const float *k, const float *v, int r0, int r1,
                            int Tk, int HD, int Dh, float scale, float *ws) {
    const int NK = (Tk + 15) / 16, KS = 16 * NK;
    const int pairs = Dh % 16 == 8 && Dh <= 40;          /* Dh = 8, 24, 40: row pairs fill the vectors */
    float *Kt = ws, *S = Kt + (size_t)Dh * KS, *Vd = S + (size_t)OPS_FK_ROWS * KS, inv[OPS_FK_ROWS];
    for (int d = 0; d < Dh; d++)
        for (int j = 0; j < KS; j++) Kt[(size_t)d * KS + j] = j < Tk ? k[(size_t)j * HD + d] : 0.0f;
    if (pairs) ops_fk_rows_twice(Vd, v, Tk, HD, Dh);
    for (int i0 = r0; i0 < r1; i0 += OPS_FK_ROWS) {
        int nq = OPS_MIN(OPS_FK_ROWS, r1 - i0);
        const float *qr[OPS_FK_ROWS];
        float *orow[OPS_FK_ROWS];
        for (int r = 0; r < OPS_FK_ROWS; r++) {            /* a short tile repeats its first row */
            qr[r] = q + (size_t)(i0 + (r < nq ? r : 0)) * HD;
            orow[r] = r < nq ? out + (size_t)(i0 + r) * HD : NULL;
        }
        int pf = i0 + OPS_FK_PF, npf = OPS_MIN(OPS_FK_ROWS, r1 - pf);   /* a later tile's rows */
        ops_att_prefetch_rows(q + (size_t)pf * HD, (size_t)HD, npf, Dh);
        ops_att_prefetch_rows(out + (size_t)pf * HD, (size_t)HD, npf, Dh);
        for (int h = 0; h < OPS_FK_ROWS; h += OPS_FK_HALF) ops_fk_scores_n(S + (size_t)h * KS, qr + h, Kt, Dh, scale, NK);
        ops_fk_softmax(S, NK, Tk, inv, lse ? lse + i0 : NULL, nq);
        if (pairs) { ops_fk_pv_pairs_n(orow, S, KS, Vd, Tk, inv, Dh / 8, 0); continue; }
        for (int c0 = 0; c0 < Dh; c0 += 16 * OPS_FK_MAXV) {
            int nc = OPS_MIN(16 * OPS_FK_MAXV, Dh - c0), nv = (nc + 15) / 16;
            float *oc[OPS_FK_ROWS];
            for (int r = 0; r < OPS_FK_ROWS; r++) oc[r] = orow[r] ? orow[r] + c0 : NULL;
            for (int h = 0; h < OPS_FK_ROWS; h += OPS_FK_HALF)
                ops_fk_pv_n(oc + h, S + (size_t)h * KS, KS, v + c0, (size_t)HD, Tk, inv + h, ms_mask16(nc - 16 * (nv - 1)), nv, 0);
        }
    }
}

/* Backward for few keys (Tk <= 80, non-causal), AVX-512, all query rows of one (b, h): keys in
 * the lanes as in ops_att_fwd_few, nothing transposed but K, V (in) and dK, dV (out, once per
 * task), and the bits of ops_att_bwd_fast (below), whose blocks of NQ query rows it keeps:
 *   per tile of OPS_FK_ROWS rows r of the block:
 *     S[r][j]  = scale sum_d q_r[d] Kt[d][j],  dP[r][j] = sum_d do_r[d] Vt[d][j]   (the S^T, dP^T tiles)
 *     D_r = (float) sum_d (double) do_r[d] o_r[d]      (ops_fb_rowdot: 8 lanes of channels, then
 *                                        f64_dot8_combine's order; the path below sums d in order)
 *     P = exp(S - lse_r),  dS = P (dP - D_r)                        (ops_att_dsoftmax; 0 past Tk)
 *     dq_r += scale sum_j dS[r][j] k_j   j in order, one FMA each from 0, the product rounded,
 *                                        then added (ops_att_pv + ops_att_put_rows)
 *   then, over the block's rows r in order, one FMA each from 0, and one FMA into the total:
 *     dVt[d][j] += sum_r do_r[d] P[r][j],   dKt[d][j] += scale sum_r q_r[d] dS[r][j]
 *                                        (ops_att_rank_update, block by block)
 * dVt and dKt (channels x key lanes) start as dv, dk transposed and go back at the end. */
#define OPS_FB_D 4                                      /* channels per register tile of dK, dV */
/* Up to Dh = 80: the task's Kt, Vt, dKt, dVt (4 Dh x 80 floats) stay in L2 beside the rows. Measured
 * (B*H = 16, Tk = 77, 1 thread, Zen 5): Dh 40 57% of peak against 47% for the path below, Dh 80
 * 63% / 62%, Dh 160 56% / 66%: there the path below. */
#define OPS_FB_MAXDH 80

/* acc[d][j] = sum_{r<nr} B[r][d0+d] A[r][j] over the tile's OPS_FB_D channels (nd of them
 * real), then Ct[d][j] = alpha acc + Ct[d][j] (one FMA): A rows stride KS, B rows stride ldb. */
MS_TARGET_AVX512 __attribute__((always_inline))
static inline void ops_fb_rank(float *Ct, int KS, const float *A, const float *B, size_t ldb, int nr, int nd,
                               float alpha, int NK) {
    __m512 c[OPS_FB_D][OPS_FK_MAXV], a[OPS_FK_MAXV];
#pragma GCC unroll 8
    for (int d = 0; d < OPS_FB_D; d++)
#pragma GCC unroll 8
        for (int v = 0; v < NK; v++) c[d][v] = _mm512_setzero_ps();
    for (int r = 0; r < nr; r++, A += KS, B += ldb) {
#pragma GCC unroll 8
        for (int v = 0; v < NK; v++) a[v] = _mm512_loadu_ps(A + 16 * v);
#pragma GCC unroll 8
        for (int d = 0; d < OPS_FB_D; d++) {
            __m512 b = _mm512_set1_ps(B[d < nd ? d : 0]);
#pragma GCC unroll 8
            for (int v = 0; v < NK; v++) c[d][v] = _mm512_fmadd_ps(b, a[v], c[d][v]);
        }
    }
    __m512 va = _mm512_set1_ps(alpha);
#pragma GCC unroll 8
    for (int d = 0; d < OPS_FB_D; d++) {
        if (d >= nd) break;
#pragma GCC unroll 8
        for (int v = 0; v < NK; v++) {
            float *t = Ct + (size_t)d * KS + 16 * v;
            _mm512_storeu_ps(t, _mm512_fmadd_ps(va, c[d][v], _mm512_loadu_ps(t)));
        }
    }
}
MS_TARGET_AVX512
static void ops_fb_rank_n(float *Ct, int KS, const float *A, const float *B, size_t ldb, int nr, int nd, float alpha, int NK) {
    switch (NK) {
    case 1: ops_fb_rank(Ct, KS, A, B, ldb, nr, nd, alpha, 1); break;
    case 2: ops_fb_rank(Ct, KS, A, B, ldb, nr, nd, alpha, 2); break;
    case 3: ops_fb_rank(Ct, KS, A, B, ldb, nr, nd, alpha, 3); break;
    case 4: ops_fb_rank(Ct, KS, A, B, ldb, nr, nd, alpha, 4); break;
    default: ops_fb_rank(Ct, KS, A, B, ldb, nr, nd, alpha, 5); break;
    }
}

/* (float) sum_d (double) a[d] b[d]: lane c of 8 sums d = c, c+8, c+16, ... in order, then the
 * lanes as f64_dot8_combine does. */
MS_TARGET_AVX512
static inline float ops_fb_rowdot(const float *a, const float *b, int Dh) {
    __m512d s = _mm512_setzero_pd();
    for (int d0 = 0; d0 < Dh; d0 += 16) {
        __mmask16 m = ms_mask16(Dh - d0);
        __m512 x = _mm512_maskz_loadu_ps(m, a + d0), y = _mm512_maskz_loadu_ps(m, b + d0);
        s = _mm512_add_pd(s, _mm512_mul_pd(OPS_LO8(x), OPS_LO8(y)));
        if (Dh - d0 > 8) s = _mm512_add_pd(s, _mm512_mul_pd(OPS_HI8(x), OPS_HI8(y)));
    }
    __m256d t = _mm256_add_pd(_mm512_castpd512_pd256(s), _mm512_extractf64x4_pd(s, 1));   /* s_c + s_c+4 */
    __m128d u = _mm_add_pd(_mm256_castpd256_pd128(t), _mm256_extractf128_pd(t, 1));        /* + the pair 2 apart */
    return (float)(_mm_cvtsd_f64(u) + _mm_cvtsd_f64(_mm_unpackhi_pd(u, u)));
}

MS_TARGET_AVX512
static void ops_att_bwd_few(float *dq, float *dk, float *dv, const float *dout, const float *q, const float *k,
                            const float *v, const float *out, const float *lse, int Tq, int Tk, int HD, int Dh,
                            int NQ, float scale, float *ws) {
    const int NK = (Tk + 15) / 16, KS = 16 * NK;
    const int pairs = Dh % 16 == 8 && Dh <= 40;
    const __mmask16 last = ms_mask16(Tk - 16 * (NK - 1));
    float *Kt = ws, *Vt = Kt + (size_t)Dh * KS, *dKt = Vt + (size_t)Dh * KS, *dVt = dKt + (size_t)Dh * KS;
    float *S = dVt + (size_t)Dh * KS, *dP = S + (size_t)NQ * KS, *Kd = dP + (size_t)NQ * KS;
    float sc[OPS_FK_ROWS];
    for (int r = 0; r < OPS_FK_ROWS; r++) sc[r] = scale;
    for (int d = 0; d < Dh; d++)
        for (int j = 0; j < KS; j++) {
            size_t t = (size_t)d * KS + j, o = (size_t)j * HD + d;
            Kt[t] = j < Tk ? k[o] : 0.0f;
            Vt[t] = j < Tk ? v[o] : 0.0f;
            dKt[t] = j < Tk && dk ? dk[o] : 0.0f;
            dVt[t] = j < Tk && dv ? dv[o] : 0.0f;
        }
    if (pairs && dq) ops_fk_rows_twice(Kd, k, Tk, HD, Dh);
    for (int i0 = 0; i0 < Tq; i0 += NQ) {
        int nq = OPS_MIN(NQ, Tq - i0), npf = OPS_MIN(NQ, Tq - i0 - NQ);
        for (int t0 = 0; t0 < nq; t0 += OPS_FK_ROWS) {
            int nt = OPS_MIN(OPS_FK_ROWS, nq - t0);
            for (int r = t0; r < OPS_MIN(t0 + OPS_FK_ROWS, npf); r++) {   /* this tile's rows of the next block */
                size_t o = (size_t)(i0 + NQ + r) * HD;
                for (int t = 0; t < Dh + 15; t += 16) {
                    int c = OPS_MIN(t, Dh - 1);
                    _mm_prefetch((const char *)(q + o + c), _MM_HINT_T1);
                    _mm_prefetch((const char *)(dout + o + c), _MM_HINT_T1);
                    _mm_prefetch((const char *)(out + o + c), _MM_HINT_T1);
                    if (dq) _mm_prefetch((const char *)(dq + o + c), _MM_HINT_T1);
                }
            }
            const float *qr[OPS_FK_ROWS], *dr[OPS_FK_ROWS];
            float *qo[OPS_FK_ROWS], *Sr = S + (size_t)t0 * KS, *dPr = dP + (size_t)t0 * KS;
            for (int r = 0; r < OPS_FK_ROWS; r++) {         /* a short tile repeats its first row */
                size_t o = (size_t)(i0 + t0 + (r < nt ? r : 0)) * HD;
                qr[r] = q + o;
                dr[r] = dout + o;
                qo[r] = dq && r < nt ? dq + o : NULL;
            }
            for (int h = 0; h < OPS_FK_ROWS; h += OPS_FK_HALF) {
                ops_fk_scores_n(Sr + (size_t)h * KS, qr + h, Kt, Dh, scale, NK);
                ops_fk_scores_n(dPr + (size_t)h * KS, dr + h, Vt, Dh, 1.0f, NK);
            }
            for (int r = 0; r < nt; r++) {
                __m512 e = _mm512_set1_ps(lse[i0 + t0 + r]);
                __m512 dd = _mm512_set1_ps(ops_fb_rowdot(dr[r], out + (size_t)(i0 + t0 + r) * HD, Dh));
                for (int u = 0; u < NK; u++) {
                    float *s = Sr + (size_t)r * KS + 16 * u, *dp = dPr + (size_t)r * KS + 16 * u;
                    __m512 p = _mm512_maskz_mov_ps(u < NK - 1 ? (__mmask16)0xFFFF : last,
                                                   ops_exp_avx512(_mm512_sub_ps(_mm512_loadu_ps(s), e)));
                    _mm512_storeu_ps(s, p);
                    _mm512_storeu_ps(dp, _mm512_mul_ps(p, _mm512_sub_ps(_mm512_loadu_ps(dp), dd)));
                }
            }
            if (!dq) continue;
            if (pairs) { ops_fk_pv_pairs_n(qo, dPr, KS, Kd, Tk, sc, Dh / 8, 1); continue; }
            for (int c0 = 0; c0 < Dh; c0 += 16 * OPS_FK_MAXV) {
                int nc = OPS_MIN(16 * OPS_FK_MAXV, Dh - c0), nv = (nc + 15) / 16;
                float *oc[OPS_FK_ROWS];
                for (int r = 0; r < OPS_FK_ROWS; r++) oc[r] = qo[r] ? qo[r] + c0 : NULL;
                for (int h = 0; h < OPS_FK_ROWS; h += OPS_FK_HALF)
                    ops_fk_pv_n(oc + h, dPr + (size_t)h * KS, KS, k + c0, (size_t)HD, Tk, sc, ms_mask16(nc - 16 * (nv - 1)), nv, 1);
            }
        }
        for (int d0 = 0; d0 < Dh; d0 += OPS_FB_D) {
            int nd = OPS_MIN(OPS_FB_D, Dh - d0);
            const float *rq = q + (size_t)i0 * HD + d0, *rd = dout + (size_t)i0 * HD + d0;
            if (dv) ops_fb_rank_n(dVt + (size_t)d0 * KS, KS, S, rd, (size_t)HD, nq, nd, 1.0f, NK);
            if (dk) ops_fb_rank_n(dKt + (size_t)d0 * KS, KS, dP, rq, (size_t)HD, nq, nd, scale, NK);
        }
    }
    for (int j = 0; j < Tk; j++)
        for (int d = 0; d < Dh; d++) {
            size_t t = (size_t)d * KS + j, o = (size_t)j * HD + d;
            if (dk) dk[o] = dKt[t];
            if (dv) dv[o] = dVt[t];
        }
}

/* Query rows [r0, r1) (r0 a multiple of NQ) of one (b, h): q, out at row 0 of the head, k, v at
 * row 0, lse at row 0 of the head (or NULL); row stride HD. */
static void ops_att_fwd_fast(const OpsAttGeom *g, float *out, float *lse, const float *q, const float *k,
                             const float *v, int r0, int r1, int Tk, int HD, int Dh, int causal, float scale, float *ws) {
    const int NQ = g->nq, MRS = g->mrs, MRD = g->mrd;
    size_t tkp = ops_up((size_t)Tk, (size_t)MRS) + 16, dhp = ops_up((size_t)Dh, (size_t)MRD);
    float *Kp = ws, *Vp = Kp + ops_up(tkp * Dh, 16), *S = Vp + ops_up(dhp * (size_t)Tk, 16), *Qp = S + ops_up(tkp * NQ, 16);
    float *Ot = Qp + ops_up((size_t)Dh * NQ, 16);
    float inv[32], lsel[32];
    if (ops_att_few(g, Tk, causal)) { ops_att_fwd_few(out, lse, q, k, v, r0, r1, Tk, HD, Dh, scale, ws); return; }
    MsOperand K = ms_dense(k, (size_t)HD, 0), V = ms_dense(v, (size_t)HD, 1), Q = ms_dense(q, (size_t)HD, 1);
    ms_pack_a(Kp, &K, 0, Tk, 0, Dh, MRS);                /* [panel][d][key] */
    ms_pack_a(Vp, &V, 0, Dh, 0, Tk, MRD);                /* [panel][key][channel] */
    for (int i0 = r0; i0 < r1; i0 += NQ) {
        int nq = OPS_MIN(NQ, r1 - i0), tk = causal ? OPS_MIN(Tk, i0 + nq) : Tk;
        ms_pack_b(Qp, &Q, 0, Dh, i0, nq, NQ);            /* [d][query] */
        for (int p = 0; p * MRS < tk; p++)
            g->ukr(Dh, Kp + (size_t)p * MRS * Dh, Qp, S + (size_t)p * MRS * NQ, (size_t)NQ, scale, 0.0f);
        ops_att_softmax_v(g, S, tk, i0, causal, inv, lse ? lsel : NULL);
        for (int d0 = 0; d0 < Dh; d0 += MRD) ops_att_pv_v(g, tk, Vp + (size_t)d0 * Tk, S, Ot + (size_t)d0 * NQ, 0);
        ops_att_put_rows(g, out + (size_t)i0 * HD, (size_t)HD, Ot, Dh, nq, inv, 0, NULL);
        if (lse) for (int r = 0; r < nq; r++) lse[i0 + r] = lsel[r];
    }
}

/* All query rows of one (b, h), blocks in order; dq, dk, dv (each may be NULL) accumulate.
 * Keys in chunks of ops_att_chunk (dQ^T's sums continue across them: the bits of one pass).
 * dK, dV sum in the thread's own (Tk, Dh) copies, added to dk, dv at the end: neighbouring
 * heads of other threads share cache lines of every dk, dv row. */
static void ops_att_bwd_fast(const OpsAttGeom *g, float *dq, float *dk, float *dv, const float *dout,
                             const float *q, const float *k, const float *v, const float *out, const float *lse,
                             int Tq, int Tk, int HD, int Dh, int causal, float scale, float *ws) {
    const int NQ = g->nq, MRS = g->mrs, MRD = g->mrd, CH = ops_att_chunk(g);
    size_t tkp = ops_up((size_t)Tk, (size_t)MRS) + 16, dhp = ops_up((size_t)Dh, (size_t)MRD);
    size_t kp = ops_up(tkp * Dh, 16), sp = ops_up(((size_t)CH + 16) * NQ, 16), qp = ops_up((size_t)Dh * NQ, 16);
    float *Kp = ws, *Vk = Kp + kp, *Kd = Vk + kp, *S = Kd + ops_up(dhp * (size_t)Tk, 16), *dP = S + sp;
    float *Qp = dP + sp, *dOp = Qp + qp, *Op = dOp + qp, *row = Op + qp, *dQt = row + qp;
    float *dKa = dQt + ops_up(dhp * NQ, 16), *dVa = dKa + ops_up((size_t)Tk * Dh, 16);
    float lsel[32], D[32], sc[32];
    if (ops_att_few(g, Tk, causal) && Tk <= CH && Dh <= OPS_FB_MAXDH) {
        ops_att_bwd_few(dq, dk, dv, dout, q, k, v, out, lse, Tq, Tk, HD, Dh, NQ, scale, ws);
        return;
    }
    MsOperand K = ms_dense(k, (size_t)HD, 0), Vo = ms_dense(v, (size_t)HD, 0), KT = ms_dense(k, (size_t)HD, 1);
    MsOperand Q = ms_dense(q, (size_t)HD, 1), dO = ms_dense(dout, (size_t)HD, 1), O = ms_dense(out, (size_t)HD, 1);
    ms_pack_a(Kp, &K, 0, Tk, 0, Dh, MRS);
    ms_pack_a(Vk, &Vo, 0, Tk, 0, Dh, MRS);
    if (dq) ms_pack_a(Kd, &KT, 0, Dh, 0, Tk, MRD);
    for (int j = 0; j < Tk; j++) {
        if (dk) memcpy(dKa + (size_t)j * Dh, dk + (size_t)j * HD, (size_t)Dh * sizeof(float));
        if (dv) memcpy(dVa + (size_t)j * Dh, dv + (size_t)j * HD, (size_t)Dh * sizeof(float));
    }
    for (int r = 0; r < NQ; r++) sc[r] = scale;
    for (int i0 = 0; i0 < Tq; i0 += NQ) {
        int nq = OPS_MIN(NQ, Tq - i0), tk = causal ? OPS_MIN(Tk, i0 + nq) : Tk;
        ms_pack_b(Qp, &Q, 0, Dh, i0, nq, NQ);
        ms_pack_b(dOp, &dO, 0, Dh, i0, nq, NQ);
        ms_pack_b(Op, &O, 0, Dh, i0, nq, NQ);
        if (g->level == 5) ops_att_lanedot_avx512(D, dOp, Op, Dh);      /* D = rowsum(dO o O) */
        else ops_att_lanedot_avx2(D, dOp, Op, Dh);
        for (int r = 0; r < NQ; r++) lsel[r] = r < nq ? lse[i0 + r] : 0.0f;
        for (int c0 = 0; c0 < tk; c0 += CH) {
            int kc = OPS_MIN(CH, tk - c0);
            for (int p = 0; p * MRS < kc; p++) {
                size_t a = (size_t)(c0 + p * MRS) * Dh, o = (size_t)p * MRS * NQ;
                g->ukr(Dh, Kp + a, Qp, S + o, (size_t)NQ, scale, 0.0f);
                g->ukr(Dh, Vk + a, dOp, dP + o, (size_t)NQ, 1.0f, 0.0f);
            }
            ops_att_dsoftmax_v(g, S, dP, kc, i0 - c0, causal, lsel, D);
            if (dv) ops_att_rank_update(g, kc, nq, S, dout + (size_t)i0 * HD, (size_t)HD, dVa + (size_t)c0 * Dh, (size_t)Dh, Dh, 1.0f);
            if (dk) ops_att_rank_update(g, kc, nq, dP, q + (size_t)i0 * HD, (size_t)HD, dKa + (size_t)c0 * Dh, (size_t)Dh, Dh, scale);
            if (dq)
                for (int d0 = 0; d0 < Dh; d0 += MRD)
                    ops_att_pv_v(g, kc, Kd + (size_t)d0 * Tk + (size_t)c0 * MRD, dP, dQt + (size_t)d0 * NQ, c0 > 0);
        }
        if (dq) ops_att_put_rows(g, dq + (size_t)i0 * HD, (size_t)HD, dQt, Dh, nq, sc, 1, row);
    }
    for (int j = 0; j < Tk; j++) {
        if (dk) memcpy(dk + (size_t)j * HD, dKa + (size_t)j * Dh, (size_t)Dh * sizeof(float));
        if (dv) memcpy(dv + (size_t)j * HD, dVa + (size_t)j * Dh, (size_t)Dh * sizeof(float));
    }
}
#endif /* MS_X86_KERNELS */

static void ops_att_forward(float *out, float *lse, const float *q, const float *k, const float *v,
                            int B, int Tq, int Tk, int H, int Dh, int causal, float scale) {
    int HD = H * Dh, nblk = (Tq + OPS_ATT_BLOCK - 1) / OPS_ATT_BLOCK;
#if defined(MS_X86_KERNELS)
    OpsAttGeom g;
    if (Tq > 0 && Tk > 0 && ops_att_geom(&g) && ops_ws_reserve(ms_get_threads(), ops_att_ws_floats(&g, Tk, Dh, 0))) {
        /* one task per (b, h) and share of its query blocks: K, V packed once per task; the
         * shares only serve load balance (rows are independent: the bits do not depend on them) */
        int nb = (Tq + g.nq - 1) / g.nq, BH = B * H, nt = ms_get_threads();
        int split = BH >= 2 * nt ? 1 : (2 * nt + BH - 1) / BH;
        if (split > nb) split = nb;
        int64_t nfast = (int64_t)BH * split;
        MS_PARALLEL_FOR_DYN_W((double)BH * Tq * Tk * Dh)
        for (int64_t t = 0; t < nfast; t++) {
            int bh = (int)(t / split), s = (int)(t % split), b = bh / H, h = bh % H;
            int r0 = (int)((int64_t)nb * s / split) * g.nq, r1 = OPS_MIN(Tq, (int)((int64_t)nb * (s + 1) / split) * g.nq);
            size_t qo = (size_t)b * Tq * HD + (size_t)h * Dh, ko = (size_t)b * Tk * HD + (size_t)h * Dh;
            ops_att_fwd_fast(&g, out + qo, lse ? lse + (size_t)bh * Tq : NULL, q + qo, k + ko, v + ko, r0, r1, Tk, HD, Dh,
                             causal, scale, ops_ws[ops_slot()].p);
        }
        return;
    }
#endif
    int64_t ntask = (int64_t)B * H * nblk;
    int tiled = ops_ws_reserve(ms_get_threads(), (size_t)OPS_ATT_BLOCK * Tk);
    MS_PARALLEL_FOR_W((double)B * H * Tq * Tk * Dh)
    for (int64_t t = 0; t < ntask; t++) {                /* one task per (b, h, query block) */
        int b = (int)(t / ((int64_t)H * nblk)), h = (int)(t / nblk % H), i0 = (int)(t % nblk) * OPS_ATT_BLOCK;
        int rows = OPS_MIN(OPS_ATT_BLOCK, Tq - i0);
        size_t qo = ((size_t)b * Tq + i0) * HD + (size_t)h * Dh, ko = (size_t)b * Tk * HD + (size_t)h * Dh;
        float *l = lse ? lse + ((size_t)b * H + h) * Tq + i0 : NULL;
        if (tiled) {
            ops_att_fwd_block(out + qo, l, q + qo, k + ko, v + ko, ops_ws[ops_slot()].p, i0, rows,
                              Tk, HD, Dh, causal, scale);
        } else {
            for (int r = 0; r < rows; r++)
                ops_att_fwd_row(out + qo + (size_t)r * HD, l ? l + r : NULL, q + qo + (size_t)r * HD, k + ko,
                                v + ko, ops_att_visible(i0 + r, Tk, causal), HD, Dh, scale);
        }
    }
}

/* Query-key pairs the products see: Tq Tk per (b, h), or those with j <= i when causal. */
static double ops_att_pairs(int B, int Tq, int Tk, int H, int causal) {
    double m = OPS_MIN(Tq, Tk), pairs = causal ? m * (m + 1) / 2 + (double)(Tq - m) * Tk : (double)Tq * Tk;
    return (double)B * H * pairs;
}

/* FLOPs counted: QK^T and PV, 2 Dh each per visible pair (the GEMMs of the fallback paths not
 * again). */
void attention_forward(float *out, float *lse, const float *q, const float *k, const float *v,
                       int B, int Tq, int Tk, int H, int Dh, int causal, float scale) {
    ms_flops_add(4.0 * Dh * ops_att_pairs(B, Tq, Tk, H, causal));
    ms_flops_mute++;
    ops_att_forward(out, lse, q, k, v, B, Tq, Tk, H, Dh, causal, scale);
    ms_flops_mute--;
}

/* Attention backward (FlashAttention-2 style recomputation), per (b, h), O = P V:
 *   P_ij = exp(scale q_i.k_j - lse_i)           (0 where causal hides j)
 *   dV  += P^T dO
 *   dP   = dO V^T,   D_i = sum_d dO_id O_id  (= sum_j P_ij dP_ij)
 *   dS   = P o (dP - D)                          (softmax backward, row by row)
 *   dQ  += scale dS K,   dK += scale dS^T Q       [tests/test_grad.c: attention]
 * dK, dV sum over all query rows: one task per (b, h) walks its query blocks in order, so the
 * sums do not depend on the thread count. Scratch per thread: P and dP, (block, Tk) each. */
static void ops_att_bwd_block(float *dq, float *dk, float *dv, const float *dout, const float *q,
                              const float *k, const float *v, const float *out, const float *lse,
                              float *P, float *dP, int i0, int rows, int Tk, int HD, int Dh, int causal,
                              float scale) {
    int tk = causal ? OPS_MIN(Tk, i0 + rows) : Tk;
    ms_gemm(0, 1, rows, tk, Dh, scale, q, HD, k, HD, 0.0f, P, tk);
    for (int r = 0; r < rows; r++) {
        float *p = P + (size_t)r * tk;
        int vis = ops_att_visible(i0 + r, tk, causal);
        for (int j = 0; j < vis; j++) p[j] = expf(p[j] - lse[r]);
        for (int j = vis; j < tk; j++) p[j] = 0.0f;
    }
    if (dv) ms_gemm(1, 0, tk, Dh, rows, 1.0f, P, tk, dout, HD, 1.0f, dv, HD);
    if (!dq && !dk) return;
    ms_gemm(0, 1, rows, tk, Dh, 1.0f, dout, HD, v, HD, 0.0f, dP, tk);
    for (int r = 0; r < rows; r++) {
        const float *dor = dout + (size_t)r * HD, *orow = out + (size_t)r * HD;
        double D = 0.0;
        for (int d = 0; d < Dh; d++) D += (double)dor[d] * orow[d];
        float fD = (float)D, *p = P + (size_t)r * tk, *ds = dP + (size_t)r * tk;
        for (int j = 0; j < tk; j++) ds[j] = p[j] * (ds[j] - fD);
    }
    if (dq) ms_gemm(0, 0, rows, Dh, tk, scale, dP, tk, k, HD, 1.0f, dq, HD);
    if (dk) ms_gemm(1, 0, tk, Dh, rows, scale, dP, tk, q, HD, 1.0f, dk, HD);
}

/* Streaming path, one query row, no scratch: the same formulas entry by entry. */
static void ops_att_bwd_row(float *dqi, float *dk, float *dv, const float *doi, const float *qi,
                            const float *k, const float *v, const float *oi, float lse, int vis, int HD,
                            int Dh, float scale) {
    double D = 0.0;
    for (int d = 0; d < Dh; d++) D += (double)doi[d] * oi[d];
    for (int j = 0; j < vis; j++) {
        const float *kj = k + (size_t)j * HD, *vj = v + (size_t)j * HD;
        float s = 0.0f, dp = 0.0f;
        for (int d = 0; d < Dh; d++) { s += qi[d] * kj[d]; dp += doi[d] * vj[d]; }
        float p = expf(s * scale - lse), ds = p * (dp - (float)D) * scale;
        if (dv) for (int d = 0; d < Dh; d++) dv[(size_t)j * HD + d] += p * doi[d];
        if (dqi) for (int d = 0; d < Dh; d++) dqi[d] += ds * kj[d];
        if (dk) for (int d = 0; d < Dh; d++) dk[(size_t)j * HD + d] += ds * qi[d];
    }
}

static void ops_att_backward(float *dq, float *dk, float *dv, const float *dout, const float *q,
                             const float *k, const float *v, const float *out, const float *lse,
                             int B, int Tq, int Tk, int H, int Dh, int causal, float scale) {
    int HD = H * Dh;
#if defined(MS_X86_KERNELS)
    OpsAttGeom g;
    if (Tq > 0 && Tk > 0 && ops_att_geom(&g) && ops_ws_reserve(ms_get_threads(), ops_att_ws_floats(&g, Tk, Dh, 1))) {
        MS_PARALLEL_FOR_DYN_W((double)B * H * Tq * Tk * Dh)
        for (int bh = 0; bh < B * H; bh++) {        /* one task per (b, h): dK, dV sum in block order */
            int b = bh / H, h = bh % H;
            size_t qo = (size_t)b * Tq * HD + (size_t)h * Dh, ko = (size_t)b * Tk * HD + (size_t)h * Dh;
            ops_att_bwd_fast(&g, dq ? dq + qo : NULL, dk ? dk + ko : NULL, dv ? dv + ko : NULL, dout + qo, q + qo, k + ko,
                             v + ko, out + qo, lse + (size_t)bh * Tq, Tq, Tk, HD, Dh, causal, scale, ops_ws[ops_slot()].p);
        }
        return;
    }
#endif
    int tiled = ops_ws_reserve(ms_get_threads(), (size_t)2 * OPS_ATT_BLOCK * Tk);
    MS_PARALLEL_FOR_W((double)B * H * Tq * Tk * Dh)
    for (int bh = 0; bh < B * H; bh++) {
        int b = bh / H, h = bh % H;
        size_t qo = (size_t)b * Tq * HD + (size_t)h * Dh, ko = (size_t)b * Tk * HD + (size_t)h * Dh;
        const float *l = lse + (size_t)bh * Tq;
        float *dkh = dk ? dk + ko : NULL, *dvh = dv ? dv + ko : NULL;
        for (int i0 = 0; i0 < Tq; i0 += OPS_ATT_BLOCK) {
            int rows = OPS_MIN(OPS_ATT_BLOCK, Tq - i0);
            size_t ro = qo + (size_t)i0 * HD;
            if (tiled) {
                float *P = ops_ws[ops_slot()].p, *dP = P + (size_t)OPS_ATT_BLOCK * Tk;
                ops_att_bwd_block(dq ? dq + ro : NULL, dkh, dvh, dout + ro, q + ro, k + ko, v + ko, out + ro,
                                  l + i0, P, dP, i0, rows, Tk, HD, Dh, causal, scale);
            } else {
                for (int r = 0; r < rows; r++) {
                    size_t o = ro + (size_t)r * HD;
                    ops_att_bwd_row(dq ? dq + o : NULL, dkh, dvh, dout + o, q + o, k + ko, v + ko, out + o,
                                    l[i0 + r], ops_att_visible(i0 + r, Tk, causal), HD, Dh, scale);
                }
            }
        }
    }
}

/* FLOPs counted, 2 Dh per visible pair each: S = QK^T again, dV (when wanted), dP (when dQ or
 * dK is wanted), dQ, dK (when wanted). */
void attention_backward(float *dq, float *dk, float *dv, const float *dout, const float *q,
                        const float *k, const float *v, const float *out, const float *lse,
                        int B, int Tq, int Tk, int H, int Dh, int causal, float scale) {
    if (!dq && !dk && !dv) return;
    int products = 1 + (dv != NULL) + (dq || dk) + (dq != NULL) + (dk != NULL);
    ms_flops_add(2.0 * products * Dh * ops_att_pairs(B, Tq, Tk, H, causal));
    ms_flops_mute++;
    ops_att_backward(dq, dk, dv, dout, q, k, v, out, lse, B, Tq, Tk, H, Dh, causal, scale);
    ms_flops_mute--;
}

/* The definitions, in double, materialising the (Tq, Tk) matrix per (b, h). Tests only: they
 * allocate, and do nothing if that fails (the comparison then fails). */
void attention_ref(float *out, float *lse, const float *q, const float *k, const float *v,
                   int B, int Tq, int Tk, int H, int Dh, int causal, float scale) {
    int HD = H * Dh;
    double *P = (double *)malloc((size_t)Tq * Tk * sizeof(double));
    if (!P) return;
    for (int b = 0; b < B; b++)
        for (int h = 0; h < H; h++) {
            const float *qh = q + (size_t)b * Tq * HD + (size_t)h * Dh;
            const float *kh = k + (size_t)b * Tk * HD + (size_t)h * Dh, *vh = v + (size_t)b * Tk * HD + (size_t)h * Dh;
            for (int i = 0; i < Tq; i++) {
                double m = -INFINITY, l = 0.0, *p = P + (size_t)i * Tk;
                int vis = ops_att_visible(i, Tk, causal);
                for (int j = 0; j < vis; j++) {
                    double s = 0.0;
                    for (int d = 0; d < Dh; d++) s += (double)qh[(size_t)i * HD + d] * kh[(size_t)j * HD + d];
                    p[j] = s * scale;
                    m = p[j] > m ? p[j] : m;
                }
                for (int j = 0; j < vis; j++) { p[j] = exp(p[j] - m); l += p[j]; }
                for (int j = 0; j < vis; j++) p[j] /= l;
                if (lse) lse[((size_t)b * H + h) * Tq + i] = (float)(m + log(l));
                for (int d = 0; d < Dh; d++) {
                    double o = 0.0;
                    for (int j = 0; j < vis; j++) o += p[j] * vh[(size_t)j * HD + d];
                    out[(size_t)b * Tq * HD + (size_t)i * HD + (size_t)h * Dh + d] = (float)o;
                }
            }
        }
    free(P);
}

/* Ignores out and lse: P is recomputed from q and k, and D_i = sum_j P_ij dP_ij. */
void attention_backward_ref(float *dq, float *dk, float *dv, const float *dout, const float *q,
                            const float *k, const float *v, const float *out, const float *lse,
                            int B, int Tq, int Tk, int H, int Dh, int causal, float scale) {
    int HD = H * Dh;
    size_t TT = (size_t)Tq * Tk;
    double *P = (double *)malloc(2 * TT * sizeof(double));
    (void)out; (void)lse;
    if (!P) return;
    double *dS = P + TT;
    for (int b = 0; b < B; b++)
        for (int h = 0; h < H; h++) {
            size_t qo = (size_t)b * Tq * HD + (size_t)h * Dh, ko = (size_t)b * Tk * HD + (size_t)h * Dh;
            for (int i = 0; i < Tq; i++) {
                double m = -INFINITY, l = 0.0, D = 0.0, *p = P + (size_t)i * Tk, *ds = dS + (size_t)i * Tk;
                int vis = ops_att_visible(i, Tk, causal);
                for (int j = 0; j < Tk; j++) {
                    double s = 0.0, dp = 0.0;
                    for (int d = 0; d < Dh; d++) {
                        s += (double)q[qo + (size_t)i * HD + d] * k[ko + (size_t)j * HD + d];
                        dp += (double)dout[qo + (size_t)i * HD + d] * v[ko + (size_t)j * HD + d];
                    }
                    p[j] = j < vis ? s * scale : -INFINITY;
                    ds[j] = dp;
                    m = p[j] > m ? p[j] : m;
                }
                for (int j = 0; j < Tk; j++) { p[j] = exp(p[j] - m); l += p[j]; }
                for (int j = 0; j < Tk; j++) { p[j] /= l; D += p[j] * ds[j]; }
                for (int j = 0; j < Tk; j++) ds[j] = p[j] * (ds[j] - D);
            }
            for (int i = 0; i < Tq; i++)
                for (int d = 0; d < Dh; d++) {
                    double a = 0.0;
                    for (int j = 0; j < Tk; j++) a += dS[(size_t)i * Tk + j] * k[ko + (size_t)j * HD + d];
                    if (dq) dq[qo + (size_t)i * HD + d] += (float)(scale * a);
                }
            for (int j = 0; j < Tk; j++)
                for (int d = 0; d < Dh; d++) {
                    double a = 0.0, c = 0.0;
                    for (int i = 0; i < Tq; i++) {
                        a += dS[(size_t)i * Tk + j] * q[qo + (size_t)i * HD + d];
                        c += P[(size_t)i * Tk + j] * dout[qo + (size_t)i * HD + d];
                    }
                    if (dk) dk[ko + (size_t)j * HD + d] += (float)(scale * a);
                    if (dv) dv[ko + (size_t)j * HD + d] += (float)c;
                }
        }
    free(P);
}

/* ---- Attention probabilities at chosen key columns (Mix-of-Show attention regularisation) -- */
/* The official ED-LoRA trainer (trainer_edlora.py cal_attn_reg, edlora.py
 * EDLoRA_Control_AttnProcessor) regularises the cross-attention probabilities of every attn2 at
 * the concept token positions. Memory-efficient attention keeps no probabilities, so the few
 * columns needed are rebuilt from q, k and the saved log-sum-exp:
 *   p[b,h,i,j] = P_bh[i, cols[b,j]],   P_bh[i,t] = exp(scale q_bih . k_bth - lse[b,h,i])
 * Forward: one task per (b, h), ncol dot products per query row. */
void attention_probs_cols_forward(float *p, const float *q, const float *k, const float *lse,
                                  const int32_t *cols, int B, int Tq, int Tk, int H, int Dh, int ncol,
                                  float scale) {
    int HD = H * Dh;
    ms_flops_add(2.0 * B * H * Tq * ncol * Dh);          /* the ncol dot products per query */
    MS_PARALLEL_FOR_W((double)B * H * Tq * ncol * Dh)
    for (int bh = 0; bh < B * H; bh++) {
        int b = bh / H, h = bh % H;
        const float *qh = q + (size_t)b * Tq * HD + (size_t)h * Dh, *kh = k + (size_t)b * Tk * HD + (size_t)h * Dh;
        const float *l = lse + (size_t)bh * Tq;
        const int32_t *cb = cols + (size_t)b * ncol;
        float *ph = p + (size_t)bh * Tq * ncol;
        for (int i = 0; i < Tq; i++) {
            const float *qi = qh + (size_t)i * HD;
            for (int j = 0; j < ncol; j++) {
                const float *kt = kh + (size_t)cb[j] * HD;
                float s = 0.0f;
                for (int d = 0; d < Dh; d++) s += qi[d] * kt[d];
                ph[(size_t)i * ncol + j] = expf(s * scale - l[i]);
            }
        }
    }
}

/* Backward, per (b, h); with L depending on P only through p (columns of P, possibly repeated):
 *   g_t   = sum_{j: cols[j] = t} dp_ij             (a repeated column sums its gradients)
 *   dL/dP_it = g_t;  softmax backward of the row (P_i = softmax(S_i), S = scale Q K^T):
 *   s_i   = sum_t g_t P_it  (= sum_j dp_ij p_ij)
 *   dS_it = P_it (g_t - s_i)
 *   dQ_i += scale sum_t dS_it K_t,   dK_t += scale sum_i dS_it Q_i      [tests/test_grad.c: probs_cols]
 * lse is treated as the function of q and k it is (its gradient is the -s_i term), not as an input.
 * Tiled path (scratch (OPS_ATT_BLOCK + 1) Tk per thread): P = exp(scale Q K^T - lse) for a block
 * of query rows by GEMM, dS in place, two GEMMs. Streaming path (no scratch), one query row:
 *   dQ_i += scale (sum_j dp_ij p_ij K_cols[j] - s_i sum_t P_it K_t)
 *   dK_t += scale (sum_{j: cols[j] = t} dp_ij p_ij - s_i P_it) Q_i
 * One task per (b, h) walks its query blocks in order: dK sums do not depend on the thread count. */
static void ops_pc_bwd_block(float *dq, float *dk, const float *dp, const float *q, const float *k,
                             const float *lse, const int32_t *cb, float *P, float *g, int rows, int Tk,
                             int HD, int Dh, int ncol, float scale) {
    ms_gemm(0, 1, rows, Tk, Dh, scale, q, HD, k, HD, 0.0f, P, Tk);
    for (int r = 0; r < rows; r++) {
        float *pr = P + (size_t)r * Tk;
        const float *dpr = dp + (size_t)r * ncol;
        for (int t = 0; t < Tk; t++) { pr[t] = expf(pr[t] - lse[r]); g[t] = 0.0f; }
        for (int j = 0; j < ncol; j++) g[cb[j]] += dpr[j];
        double s = 0.0;
        for (int j = 0; j < ncol; j++) s += (double)dpr[j] * pr[cb[j]];
        float fs = (float)s;
        for (int t = 0; t < Tk; t++) pr[t] *= g[t] - fs;
    }
    if (dq) ms_gemm(0, 0, rows, Dh, Tk, scale, P, Tk, k, HD, 1.0f, dq, HD);
    if (dk) ms_gemm(1, 0, Tk, Dh, rows, scale, P, Tk, q, HD, 1.0f, dk, HD);
}

static float ops_dot(const float *a, const float *b, int n) {
    float s = 0.0f;
    for (int d = 0; d < n; d++) s += a[d] * b[d];
    return s;
}

static void ops_pc_bwd_row(float *dqi, float *dk, const float *dpi, const float *qi, const float *k, float lse,
                           const int32_t *cb, int Tk, int HD, int Dh, int ncol, float scale) {
    double s = 0.0;
    for (int j = 0; j < ncol; j++)
        s += (double)dpi[j] * expf(ops_dot(qi, k + (size_t)cb[j] * HD, Dh) * scale - lse);
    float fs = (float)s;
    for (int t = 0; t < Tk; t++) {                                  /* the -s_i P_it term */
        const float *kt = k + (size_t)t * HD;
        float c = -fs * expf(ops_dot(qi, kt, Dh) * scale - lse) * scale;
        if (dqi) for (int d = 0; d < Dh; d++) dqi[d] += c * kt[d];
        if (dk) for (int d = 0; d < Dh; d++) dk[(size_t)t * HD + d] += c * qi[d];
    }
    for (int j = 0; j < ncol; j++) {                                /* the g_t P_it term */
        const float *kt = k + (size_t)cb[j] * HD;
        float c = dpi[j] * expf(ops_dot(qi, kt, Dh) * scale - lse) * scale;
        if (dqi) for (int d = 0; d < Dh; d++) dqi[d] += c * kt[d];
        if (dk) for (int d = 0; d < Dh; d++) dk[(size_t)cb[j] * HD + d] += c * qi[d];
    }
}

static void ops_pc_backward(float *dq, float *dk, const float *dp, const float *q, const float *k,
                            const float *lse, const int32_t *cols, int B, int Tq, int Tk, int H, int Dh,
                            int ncol, float scale) {
    int HD = H * Dh;
    int tiled = ops_ws_reserve(ms_get_threads(), (size_t)(OPS_ATT_BLOCK + 1) * Tk);
    MS_PARALLEL_FOR_W((double)B * H * Tq * ncol * Dh)
    for (int bh = 0; bh < B * H; bh++) {
        int b = bh / H, h = bh % H;
        size_t qo = (size_t)b * Tq * HD + (size_t)h * Dh, ko = (size_t)b * Tk * HD + (size_t)h * Dh;
        const float *l = lse + (size_t)bh * Tq, *dph = dp + (size_t)bh * Tq * ncol;
        const int32_t *cb = cols + (size_t)b * ncol;
        float *dkh = dk ? dk + ko : NULL;
        for (int i0 = 0; i0 < Tq; i0 += OPS_ATT_BLOCK) {
            int rows = OPS_MIN(OPS_ATT_BLOCK, Tq - i0);
            size_t ro = qo + (size_t)i0 * HD;
            if (tiled) {
                float *P = ops_ws[ops_slot()].p, *g = P + (size_t)OPS_ATT_BLOCK * Tk;
                ops_pc_bwd_block(dq ? dq + ro : NULL, dkh, dph + (size_t)i0 * ncol, q + ro, k + ko, l + i0, cb, P, g,
                                 rows, Tk, HD, Dh, ncol, scale);
            } else {
                for (int r = 0; r < rows; r++) {
                    size_t o = ro + (size_t)r * HD;
                    ops_pc_bwd_row(dq ? dq + o : NULL, dkh, dph + (size_t)(i0 + r) * ncol, q + o, k + ko, l[i0 + r],
                                   cb, Tk, HD, Dh, ncol, scale);
                }
            }
        }
    }
}

/* FLOPs counted, 2 Dh per (query, key) each: P = QK^T, dQ, dK (when wanted). */
void attention_probs_cols_backward(float *dq, float *dk, const float *dp, const float *q, const float *k,
                                   const float *lse, const int32_t *cols, int B, int Tq, int Tk, int H, int Dh,
                                   int ncol, float scale) {
    if (!dq && !dk) return;
    ms_flops_add(2.0 * (1 + (dq != NULL) + (dk != NULL)) * Dh * ops_att_pairs(B, Tq, Tk, H, 0));
    ms_flops_mute++;
    ops_pc_backward(dq, dk, dp, q, k, lse, cols, B, Tq, Tk, H, Dh, ncol, scale);
    ms_flops_mute--;
}

/* The definitions in double: P rebuilt row by row from q and k with its own max and sum (lse
 * is not read), g and dS as above. Tests only: they allocate, and do nothing if that fails. */
void attention_probs_cols_forward_ref(float *p, const float *q, const float *k, const float *lse,
                                      const int32_t *cols, int B, int Tq, int Tk, int H, int Dh, int ncol,
                                      float scale) {
    int HD = H * Dh;
    double *P = (double *)malloc((size_t)Tk * sizeof(double));
    (void)lse;
    if (!P) return;
    for (int b = 0; b < B; b++)
        for (int h = 0; h < H; h++)
            for (int i = 0; i < Tq; i++) {
                const float *qi = q + ((size_t)b * Tq + i) * HD + (size_t)h * Dh;
                double m = -INFINITY, l = 0.0;
                for (int t = 0; t < Tk; t++) {
                    const float *kt = k + ((size_t)b * Tk + t) * HD + (size_t)h * Dh;
                    double s = 0.0;
                    for (int d = 0; d < Dh; d++) s += (double)qi[d] * kt[d];
                    P[t] = s * scale;
                    m = P[t] > m ? P[t] : m;
                }
                for (int t = 0; t < Tk; t++) { P[t] = exp(P[t] - m); l += P[t]; }
                for (int j = 0; j < ncol; j++)
                    p[(((size_t)b * H + h) * Tq + i) * ncol + j] = (float)(P[cols[(size_t)b * ncol + j]] / l);
            }
    free(P);
}

void attention_probs_cols_backward_ref(float *dq, float *dk, const float *dp, const float *q, const float *k,
                                       const float *lse, const int32_t *cols, int B, int Tq, int Tk, int H,
                                       int Dh, int ncol, float scale) {
    int HD = H * Dh;
    double *P = (double *)malloc(((size_t)2 * Tk + Dh + (size_t)Tk * Dh) * sizeof(double));
    (void)lse;
    if (!P) return;
    double *g = P + Tk, *aq = g + Tk, *ak = aq + Dh;     /* g (Tk), dq row (Dh), dk of the head (Tk,Dh) */
    for (int b = 0; b < B; b++)
        for (int h = 0; h < H; h++) {
            const float *kh = k + (size_t)b * Tk * HD + (size_t)h * Dh;
            for (size_t x = 0; x < (size_t)Tk * Dh; x++) ak[x] = 0.0;
            for (int i = 0; i < Tq; i++) {
                const float *qi = q + ((size_t)b * Tq + i) * HD + (size_t)h * Dh;
                const float *dpi = dp + (((size_t)b * H + h) * Tq + i) * ncol;
                double m = -INFINITY, l = 0.0, s = 0.0;
                for (int t = 0; t < Tk; t++) {
                    double x = 0.0;
                    for (int d = 0; d < Dh; d++) x += (double)qi[d] * kh[(size_t)t * HD + d];
                    P[t] = x * scale;
                    m = P[t] > m ? P[t] : m;
                    g[t] = 0.0;
                }
                for (int t = 0; t < Tk; t++) { P[t] = exp(P[t] - m); l += P[t]; }
                for (int j = 0; j < ncol; j++) g[cols[(size_t)b * ncol + j]] += dpi[j];
                for (int t = 0; t < Tk; t++) { P[t] /= l; s += g[t] * P[t]; }
                for (int d = 0; d < Dh; d++) aq[d] = 0.0;
                for (int t = 0; t < Tk; t++) {
                    double ds = P[t] * (g[t] - s) * scale;
                    for (int d = 0; d < Dh; d++) {
                        aq[d] += ds * kh[(size_t)t * HD + d];
                        ak[(size_t)t * Dh + d] += ds * qi[d];
                    }
                }
                if (dq) for (int d = 0; d < Dh; d++) dq[((size_t)b * Tq + i) * HD + (size_t)h * Dh + d] += (float)aq[d];
            }
            if (dk)
                for (int t = 0; t < Tk; t++)
                    for (int d = 0; d < Dh; d++) dk[((size_t)b * Tk + t) * HD + (size_t)h * Dh + d] += (float)ak[(size_t)t * Dh + d];
        }
    free(P);
}

/* ---- Resampling -------------------------------------------------------------------------- */
/* Nearest 2x: out[n,c,y,x] = x[n,c,y/2,x/2] (F.interpolate(scale_factor=2, mode="nearest")).
 * Backward: each input pixel receives the sum of its 2x2 output block. One task per (n,c). */
void upsample_nearest2x_forward(float *out, const float *x, int N, int C, int H, int W) {
    MS_PARALLEL_FOR_W(4.0 * N * C * H * W)
    for (int nc = 0; nc < N * C; nc++) {
        const float *xi = x + (size_t)nc * H * W;
        float *o = out + (size_t)nc * 4 * H * W;
        for (int y = 0; y < H; y++) {
            float *r0 = o + (size_t)(2 * y) * 2 * W, *r1 = r0 + 2 * W;
            for (int j = 0; j < W; j++) r0[2 * j] = r0[2 * j + 1] = xi[(size_t)y * W + j];
            memcpy(r1, r0, (size_t)2 * W * sizeof(float));
        }
    }
}
void upsample_nearest2x_backward(float *dx, const float *dout, int N, int C, int H, int W) {
    MS_PARALLEL_FOR_W(4.0 * N * C * H * W)
    for (int nc = 0; nc < N * C; nc++) {
        const float *d = dout + (size_t)nc * 4 * H * W;
        float *g = dx + (size_t)nc * H * W;
        for (int y = 0; y < H; y++) {
            const float *r0 = d + (size_t)(2 * y) * 2 * W, *r1 = r0 + 2 * W;
            for (int j = 0; j < W; j++)
                g[(size_t)y * W + j] += (r0[2 * j] + r0[2 * j + 1]) + (r1[2 * j] + r1[2 * j + 1]);
        }
    }
}

/* AvgPool2d(2, stride 2): out = (x00 + x01 + x10 + x11) * 0.25; backward: each of the four
 * inputs gets dout * 0.25. */
void avgpool2x2_forward(float *out, const float *x, int N, int C, int H, int W) {
    int Ho = H / 2, Wo = W / 2;
    MS_PARALLEL_FOR_W((double)N * C * H * W)
    for (int nc = 0; nc < N * C; nc++) {
        const float *xi = x + (size_t)nc * H * W;
        float *o = out + (size_t)nc * Ho * Wo;
        for (int y = 0; y < Ho; y++) {
            const float *r0 = xi + (size_t)(2 * y) * W, *r1 = r0 + W;
            for (int j = 0; j < Wo; j++)
                o[(size_t)y * Wo + j] = ((r0[2 * j] + r0[2 * j + 1]) + (r1[2 * j] + r1[2 * j + 1])) * 0.25f;
        }
    }
}
void avgpool2x2_backward(float *dx, const float *dout, int N, int C, int H, int W) {
    int Ho = H / 2, Wo = W / 2;
    MS_PARALLEL_FOR_W((double)N * C * H * W)
    for (int nc = 0; nc < N * C; nc++) {
        const float *d = dout + (size_t)nc * Ho * Wo;
        float *g = dx + (size_t)nc * H * W;
        for (int y = 0; y < H; y++)
            for (int j = 0; j < W; j++) g[(size_t)y * W + j] += d[(size_t)(y / 2) * Wo + j / 2] * 0.25f;
    }
}

/* PixelUnshuffle(r): out[n, c*r*r + dy*r + dx, i, j] = x[n, c, i*r + dy, j*r + dx]. A pure
 * permutation, so backward is the inverse gather. One task per output channel. */
void pixel_unshuffle_forward(float *out, const float *x, int N, int C, int H, int W, int r) {
    int Ho = H / r, Wo = W / r, Co = C * r * r;
    MS_PARALLEL_FOR_W((double)N * C * H * W)
    for (int no = 0; no < N * Co; no++) {
        int n = no / Co, co = no % Co, c = co / (r * r), dy = co / r % r, dx = co % r;
        const float *xi = x + ((size_t)n * C + c) * H * W;
        float *o = out + (size_t)no * Ho * Wo;
        for (int i = 0; i < Ho; i++)
            for (int j = 0; j < Wo; j++) o[(size_t)i * Wo + j] = xi[(size_t)(i * r + dy) * W + j * r + dx];
    }
}
void pixel_unshuffle_backward(float *dx, const float *dout, int N, int C, int H, int W, int r) {
    int Ho = H / r, Wo = W / r, Co = C * r * r;
    MS_PARALLEL_FOR_W((double)N * C * H * W)
    for (int nc = 0; nc < N * C; nc++) {              /* one task per INPUT channel: no races */
        int n = nc / C, c = nc % C;
        float *g = dx + (size_t)nc * H * W;
        for (int y = 0; y < H; y++)
            for (int xx = 0; xx < W; xx++) {
                int co = c * r * r + (y % r) * r + xx % r;
                g[(size_t)y * W + xx] += dout[(((size_t)n * Co + co) * Ho + y / r) * Wo + xx / r];
            }
    }
}

/* torch.cat([a, b], 1) and its split. */
void concat_channels_forward(float *out, const float *a, const float *b, int N, int Ca, int Cb, int HW) {
    size_t sa = (size_t)Ca * HW, sb = (size_t)Cb * HW;
    for (int n = 0; n < N; n++) {
        memcpy(out + (size_t)n * (sa + sb), a + (size_t)n * sa, sa * sizeof(float));
        memcpy(out + (size_t)n * (sa + sb) + sa, b + (size_t)n * sb, sb * sizeof(float));
    }
}
void concat_channels_backward(float *da, float *db, const float *dout, int N, int Ca, int Cb, int HW) {
    size_t sa = (size_t)Ca * HW, sb = (size_t)Cb * HW;
    for (int n = 0; n < N; n++) {
        const float *d = dout + (size_t)n * (sa + sb);
        if (da) for (size_t i = 0; i < sa; i++) da[(size_t)n * sa + i] += d[i];
        if (db) for (size_t i = 0; i < sb; i++) db[(size_t)n * sb + i] += d[sa + i];
    }
}

/* ---- Elementwise arithmetic -------------------------------------------------------------- */
/* out = a + b: da += dout, db += dout.  out = a * b: da += dout * b, db += dout * a.
 * out = s x: dx += s dout. */
void add_forward(float *out, const float *a, const float *b, size_t n) {
    int64_t nch = ops_nchunks(n);
    MS_PARALLEL_FOR_W((double)n)
    for (int64_t c = 0; c < nch; c++) {
        size_t i0 = (size_t)c * OPS_CHUNK, i1 = OPS_MIN(n, i0 + OPS_CHUNK);
        for (size_t i = i0; i < i1; i++) out[i] = a[i] + b[i];
    }
}
void add_backward(float *da, float *db, const float *dout, size_t n) {
    int64_t nch = ops_nchunks(n);
    MS_PARALLEL_FOR_W((double)n)
    for (int64_t c = 0; c < nch; c++) {
        size_t i0 = (size_t)c * OPS_CHUNK, i1 = OPS_MIN(n, i0 + OPS_CHUNK);
        if (da) for (size_t i = i0; i < i1; i++) da[i] += dout[i];
        if (db) for (size_t i = i0; i < i1; i++) db[i] += dout[i];
    }
}
void mul_forward(float *out, const float *a, const float *b, size_t n) {
    int64_t nch = ops_nchunks(n);
    MS_PARALLEL_FOR_W((double)n)
    for (int64_t c = 0; c < nch; c++) {
        size_t i0 = (size_t)c * OPS_CHUNK, i1 = OPS_MIN(n, i0 + OPS_CHUNK);
        for (size_t i = i0; i < i1; i++) out[i] = a[i] * b[i];
    }
}
void mul_backward(float *da, float *db, const float *dout, const float *a, const float *b, size_t n) {
    int64_t nch = ops_nchunks(n);
    MS_PARALLEL_FOR_W((double)n)
    for (int64_t c = 0; c < nch; c++) {
        size_t i0 = (size_t)c * OPS_CHUNK, i1 = OPS_MIN(n, i0 + OPS_CHUNK);
        if (da) for (size_t i = i0; i < i1; i++) da[i] += dout[i] * b[i];
        if (db) for (size_t i = i0; i < i1; i++) db[i] += dout[i] * a[i];
    }
}
void scale_forward(float *out, const float *x, float s, size_t n) {
    int64_t nch = ops_nchunks(n);
    MS_PARALLEL_FOR_W((double)n)
    for (int64_t c = 0; c < nch; c++) {
        size_t i0 = (size_t)c * OPS_CHUNK, i1 = OPS_MIN(n, i0 + OPS_CHUNK);
        for (size_t i = i0; i < i1; i++) out[i] = s * x[i];
    }
}
void scale_backward(float *dx, const float *dout, float s, size_t n) {
    int64_t nch = ops_nchunks(n);
    MS_PARALLEL_FOR_W((double)n)
    for (int64_t c = 0; c < nch; c++) {
        size_t i0 = (size_t)c * OPS_CHUNK, i1 = OPS_MIN(n, i0 + OPS_CHUNK);
        for (size_t i = i0; i < i1; i++) dx[i] += s * dout[i];
    }
}

/* x[n,c,:] += t[n,c]; backward dt[n,c] += sum_hw dout[n,c,hw] (double). One task per (n,c). */
void add_bias_nc(float *x, const float *t, int N, int C, int HW) {
    MS_PARALLEL_FOR_W((double)N * C * HW)
    for (int nc = 0; nc < N * C; nc++) {
        float *xr = x + (size_t)nc * HW, tv = t[nc];
        for (int i = 0; i < HW; i++) xr[i] += tv;
    }
}
void add_bias_nc_backward(float *dt, const float *dout, int N, int C, int HW) {
    MS_PARALLEL_FOR_W((double)N * C * HW)
    for (int nc = 0; nc < N * C; nc++) {
        double s, unused;
        ops_sum_sumsq(dout + (size_t)nc * HW, (size_t)HW, &s, &unused);
        dt[nc] += (float)s;
    }
}

/* ---- Embedding --------------------------------------------------------------------------- */
/* out[n] = table[ids[n]]; backward dtable[ids[n]] += dout[n]. The scatter-add is split over
 * chunks of OPS_COLS columns; each chunk walks n in order, so repeated ids add up the same way
 * for any thread count. */
void embedding_forward(float *out, const int32_t *ids, const float *table, int N, int D) {
    for (int n = 0; n < N; n++)
        memcpy(out + (size_t)n * D, table + (size_t)ids[n] * D, (size_t)D * sizeof(float));
}
void embedding_backward(float *dtable, const float *dout, const int32_t *ids, int N, int D) {
    int nchunk = (D + OPS_COLS - 1) / OPS_COLS;
    MS_PARALLEL_FOR_W((double)N * D)
    for (int ch = 0; ch < nchunk; ch++) {
        int d0 = ch * OPS_COLS, d1 = OPS_MIN(D, d0 + OPS_COLS);
        for (int n = 0; n < N; n++) {
            float *g = dtable + (size_t)ids[n] * D;
            const float *d = dout + (size_t)n * D;
            for (int i = d0; i < d1; i++) g[i] += d[i];
        }
    }
}

/* ---- MSE loss ---------------------------------------------------------------------------- */
/* See mixshow.h. With e = p - t (float) and S_n = sum of sample n's stored weights:
 *   L = (1/N) sum_n sum_{c,m} w e^2 / S_n        dL/dp = 2 w e / (N S_n)
 *   weight NULL: L = sum e^2 / (N C M)          dL/dp = 2 e / (N C M) */
static double ops_mse_wsum(const float *weight, int n, int C, int M, int Cw) {
    double s = 0.0;
    (void)C;
    for (size_t i = 0; i < (size_t)Cw * M; i++) s += weight[(size_t)n * Cw * M + i];
    return s;
}

double mse_forward(const float *pred, const float *target, const float *weight, int N, int C, int M, int Cw) {
    double loss = 0.0;
    for (int n = 0; n < N; n++) {
        double num = 0.0;
        for (int c = 0; c < C; c++) {
            size_t o = ((size_t)n * C + c) * M;
            const float *w = weight ? weight + ((size_t)n * Cw + (Cw == 1 ? 0 : c)) * M : NULL;
            double a[4] = { 0 };
            int i = 0;
            for (; i + 4 <= M; i += 4)
                for (int j = 0; j < 4; j++) {
                    float e = pred[o + i + j] - target[o + i + j], e2 = e * e;
                    a[j] += w ? (double)e2 * w[i + j] : (double)e2;
                }
            for (; i < M; i++) {
                float e = pred[o + i] - target[o + i], e2 = e * e;
                a[0] += w ? (double)e2 * w[i] : (double)e2;
            }
            num += (a[0] + a[1]) + (a[2] + a[3]);
        }
        double S = weight ? ops_mse_wsum(weight, n, C, M, Cw) : (double)C * M;
        if (S != 0.0) loss += num / S;
    }
    return loss / N;
}

double mse_forward_ref(const float *pred, const float *target, const float *weight, int N, int C, int M, int Cw) {
    double loss = 0.0;
    for (int n = 0; n < N; n++) {
        double num = 0.0, S = 0.0;
        for (int c = 0; c < C; c++)
            for (int i = 0; i < M; i++) {
                size_t k = ((size_t)n * C + c) * M + i;
                double e = (double)pred[k] - target[k];
                double w = weight ? weight[((size_t)n * Cw + (Cw == 1 ? 0 : c)) * M + i] : 1.0;
                num += w * e * e;
                if (!weight || c < Cw) S += w;
            }
        if (S != 0.0) loss += num / S;
    }
    return loss / N;
}

void mse_backward(float *dpred, const float *pred, const float *target, const float *weight,
                  int N, int C, int M, int Cw, float dloss) {
    for (int n = 0; n < N; n++) {
        double S = weight ? ops_mse_wsum(weight, n, C, M, Cw) : (double)C * M;
        if (S == 0.0) continue;
        float k = (float)(2.0 * dloss / ((double)N * S));
        MS_PARALLEL_FOR_W((double)C * M)
        for (int c = 0; c < C; c++) {
            size_t o = ((size_t)n * C + c) * M;
            const float *w = weight ? weight + ((size_t)n * Cw + (Cw == 1 ? 0 : c)) * M : NULL;
            for (int i = 0; i < M; i++) {
                float e = pred[o + i] - target[o + i];
                dpred[o + i] += k * (w ? w[i] * e : e);
            }
        }
    }
}

/* ---- Timestep embedding ------------------------------------------------------------------ */
/* diffusers 0.19.3 get_timestep_embedding, the same float32 operations in the same order:
 *   exponent = -math.log(max_period) * arange(half)     python double rounded to float, times i
 *   exponent = exponent / (half - freq_shift)           a true float division (not 1/x times)
 *   emb = t[:, None] * exp(exponent)[None, :]  -> cat(sin(emb), cos(emb)) (flipped if asked)
 * Every step but exp/sin/cos is bit-exact. torch 1.13 evaluates those three with SLEEF
 * vectorised kernels (<= 1 ulp, not always correctly rounded) and we call libm's expf/sinf/cosf.
 * Measured against torch 1.13 CPU for t = 0..999, dim 320: 16 of the 160 frequencies differ by
 * one ulp, which t (up to 999) turns into up to 1.2e-4 in the argument, so 12% of the entries
 * differ, by at most 6.1e-5; with equal arguments sin/cos differ by <= 1 ulp (6e-8). */
void timestep_embedding_forward(float *out, const float *t, int N, int dim, int flip_sin_to_cos,
                                float freq_shift, int max_period) {
    int half = dim / 2;
    float neg_log = (float)-log((double)max_period);
    float denom = (float)((double)half - (double)freq_shift);
    for (int n = 0; n < N; n++) {
        float *o = out + (size_t)n * dim;
        for (int i = 0; i < half; i++) {
            float e = neg_log * (float)i;
            e = e / denom;
            float arg = t[n] * expf(e);
            o[flip_sin_to_cos ? half + i : i] = sinf(arg);
            o[flip_sin_to_cos ? i : half + i] = cosf(arg);
        }
        if (dim % 2) o[dim - 1] = 0.0f;
    }
}

void timestep_embedding_ref(float *out, const float *t, int N, int dim, int flip_sin_to_cos,
                            float freq_shift, int max_period) {
    int half = dim / 2;
    for (int n = 0; n < N; n++)
        for (int i = 0; i < half; i++) {
            double arg = (double)t[n] * exp(-log((double)max_period) * i / ((double)half - freq_shift));
            out[(size_t)n * dim + (flip_sin_to_cos ? half + i : i)] = (float)sin(arg);
            out[(size_t)n * dim + (flip_sin_to_cos ? i : half + i)] = (float)cos(arg);
        }
    for (int n = 0; n < N && dim % 2; n++) out[(size_t)n * dim + dim - 1] = 0.0f;
}


/* ========================================================================================== */
/* 16-bit weights -> f32; torch-identical uniform and normal fills (F16C / AVX2 / AVX-512 / NEON) */
/* ========================================================================================== */
/* F16 -> f32 is exact (every binary16 value is a binary32 value), so every path gives the bits
 * of the scalar definition ms_f16_to_f32_vec_ref, signalling NaNs included: the hardware
 * converters (VCVTPH2PS, FCVTL) quiet them (set the f32 quiet bit 22), the definition keeps
 * the payload as it is (m << 13), and the fast paths clear bit 22 again in those lanes.
 * Signalling NaN in binary16: exponent 31, quiet bit 9 clear, payload bits 0..8 not all zero. */
void ms_f16_to_f32_vec_ref(float *out, const uint16_t *h, size_t n) {
    for (size_t i = 0; i < n; i++) {
        uint32_t sign = (uint32_t)(h[i] & 0x8000u) << 16, e = (h[i] >> 10) & 0x1fu, m = h[i] & 0x3ffu, bits;
        if (e == 0x1f) bits = sign | 0x7f800000u | (m << 13);                 /* inf, NaN */
        else if (e != 0) bits = sign | ((e + 112) << 23) | (m << 13);         /* normal: bias 15 -> 127 */
        else if (m == 0) bits = sign;                                         /* +-0 */
        else {                                                                /* subnormal: m 2^-24 */
            e = 113;
            while (!(m & 0x400u)) { m <<= 1; e--; }
            bits = sign | (e << 23) | ((m & 0x3ffu) << 13);
        }
        memcpy(&out[i], &bits, 4);
    }
}

/* Scalar fast path, branch-free: the 15 magnitude bits shifted into an f32's exponent/mantissa
 * give 2^-112 times the value (normal and subnormal alike; the product by 2^112 below is exact),
 * exponent 31 (inf, NaN) maps to 255 with the payload kept, the sign is copied. */
static void f16_to_f32_scalar(float *out, const uint16_t *h, size_t n) {
    const float two112 = 5.192296858534828e33f;    /* 2^112, exact */
    for (size_t i = 0; i < n; i++) {
        uint32_t x = h[i], mag = (x & 0x7fffu) << 13, b;
        uint32_t special = 0u - (uint32_t)((x & 0x7c00u) == 0x7c00u);   /* all ones for inf, NaN */
        float f;
        memcpy(&f, &mag, 4);
        f *= two112;
        memcpy(&b, &f, 4);
        b = (b & ~special) | ((0x7f800000u | mag) & special);
        b |= (x & 0x8000u) << 16;
        memcpy(&out[i], &b, 4);
    }
}

#if defined(MS_X86_KERNELS)
#include <cpuid.h>
/* 16 values: VCVTPH2PS, then bit 22 cleared again in the signalling-NaN lanes. */
MS_TARGET_AVX512
static __m512 f16x16_avx512(__m256i x) {
    __m512i w = _mm512_cvtepu16_epi32(x), f = _mm512_castps_si512(_mm512_cvtph_ps(x));
    __mmask16 snan = _mm512_cmpeq_epi32_mask(_mm512_and_epi32(w, _mm512_set1_epi32(0x7e00)), _mm512_set1_epi32(0x7c00)) &
                     _mm512_test_epi32_mask(w, _mm512_set1_epi32(0x1ff));
    return _mm512_castsi512_ps(_mm512_mask_and_epi32(f, snan, f, _mm512_set1_epi32(~0x00400000)));
}
/* Outputs larger than the caches (a big weight staged right before its GEMM) go out with
 * streaming stores: no read-for-ownership of lines that are overwritten whole. */
#define F16_STREAM_MIN ((size_t)4 << 20)
MS_TARGET_AVX512
static void f16_to_f32_avx512(float *out, const uint16_t *h, size_t n) {
    size_t i = 0;
    if (n >= F16_STREAM_MIN) {
        for (; i < n && ((uintptr_t)(out + i) & 63); i++) f16_to_f32_scalar(out + i, h + i, 1);
        for (; i + 16 <= n; i += 16)
            _mm512_stream_ps(out + i, f16x16_avx512(_mm256_loadu_si256((const __m256i *)(const void *)(h + i))));
        _mm_sfence();
    }
    for (; i + 16 <= n; i += 16)
        _mm512_storeu_ps(out + i, f16x16_avx512(_mm256_loadu_si256((const __m256i *)(const void *)(h + i))));
    if (i < n) {                                    /* the tail, zero-padded */
        uint16_t t[16] = { 0 };
        memcpy(t, h + i, (n - i) * sizeof *t);
        __mmask16 m = (__mmask16)((1u << (n - i)) - 1u);
        _mm512_mask_storeu_ps(out + i, m, f16x16_avx512(_mm256_loadu_si256((const __m256i *)(const void *)t)));
    }
}
#define MS_TARGET_F16C __attribute__((target("avx2,f16c")))
MS_TARGET_F16C
static void f16_to_f32_f16c(float *out, const uint16_t *h, size_t n) {
    const __m256i e31 = _mm256_set1_epi32(0x7c00), qmask = _mm256_set1_epi32(0x7e00), pay = _mm256_set1_epi32(0x1ff);
    const __m256i zero = _mm256_setzero_si256(), quiet = _mm256_set1_epi32(0x00400000);
    size_t i = 0;
    int stream = n >= F16_STREAM_MIN;
    if (stream) for (; i < n && ((uintptr_t)(out + i) & 31); i++) f16_to_f32_scalar(out + i, h + i, 1);
    for (; i + 8 <= n; i += 8) {
        __m128i x = _mm_loadu_si128((const __m128i *)(const void *)(h + i));
        __m256i w = _mm256_cvtepu16_epi32(x);
        __m256i f = _mm256_castps_si256(_mm256_cvtph_ps(x));
        __m256i snan = _mm256_andnot_si256(_mm256_cmpeq_epi32(_mm256_and_si256(w, pay), zero),
                                           _mm256_cmpeq_epi32(_mm256_and_si256(w, qmask), e31));
        f = _mm256_andnot_si256(_mm256_and_si256(snan, quiet), f);
        if (stream) _mm256_stream_si256((__m256i *)(void *)(out + i), f);
        else _mm256_storeu_si256((__m256i *)(void *)(out + i), f);
    }
    if (stream) _mm_sfence();
    f16_to_f32_scalar(out + i, h + i, n - i);
}
/* F16C: CPUID leaf 1, ECX bit 29 (every AVX2 CPU made has it; asked anyway). clang 14's
 * __builtin_cpu_supports does not know "f16c". The AVX state is checked with the AVX2 level. */
static int ms_has_f16c(void) {
    unsigned a, b, c, d;
    return __get_cpuid(1, &a, &b, &c, &d) && ((c >> 29) & 1u);
}
#endif

#if defined(MS_NEON_KERNELS)
static void f16_to_f32_neon(float *out, const uint16_t *h, size_t n) {
    const uint32x4_t e31 = vdupq_n_u32(0x7c00), qmask = vdupq_n_u32(0x7e00), pay = vdupq_n_u32(0x1ff);
    const uint32x4_t quiet = vdupq_n_u32(0x00400000);
    size_t i = 0;
    for (; i + 4 <= n; i += 4) {
        uint16x4_t x = vld1_u16(h + i);
        uint32x4_t w = vmovl_u16(x);
        uint32x4_t f = vreinterpretq_u32_f32(vcvt_f32_f16(vreinterpret_f16_u16(x)));
        uint32x4_t snan = vandq_u32(vceqq_u32(vandq_u32(w, qmask), e31), vtstq_u32(w, pay));
        f = vbicq_u32(f, vandq_u32(snan, quiet));
        vst1q_u32((uint32_t *)(void *)(out + i), f);
    }
    f16_to_f32_scalar(out + i, h + i, n - i);
}
#endif

void ms_f16_to_f32_vec(float *out, const uint16_t *h, size_t n) {
#if defined(MS_X86_KERNELS)
    MsSimd l = ms_simd();
    if (l >= MS_SIMD_AVX512) { f16_to_f32_avx512(out, h, n); return; }
    if (l >= MS_SIMD_AVX2 && ms_has_f16c()) { f16_to_f32_f16c(out, h, n); return; }
#elif defined(MS_NEON_KERNELS)
    if (ms_simd() >= MS_SIMD_NEON) { f16_to_f32_neon(out, h, n); return; }
#endif
    f16_to_f32_scalar(out, h, n);
}

void ms_bf16_to_f32_vec(float *out, const uint16_t *h, size_t n) {
    for (size_t i = 0; i < n; i++) {                 /* a shift: compilers vectorize it */
        uint32_t b = (uint32_t)h[i] << 16;
        memcpy(&out[i], &b, 4);
    }
}

/* --- torch.randn on the CPU: mt19937 words -> uniforms -> Box-Muller in blocks of 16 ------- */
/* (torch 1.13 aten/src/ATen/core/{MT19937RNGEngine.h, TransformationHelper.h},
 * native/cpu/DistributionTemplates.h normal_fill / normal_fill_16_AVX2, native/cpu/avx_mathfun.h;
 * the generator itself, seeding and the n < 16 path are in models/schedulers.c.)
 * Every function here is elementwise: the SIMD paths run the scalar definition's operations lane
 * by lane (the same roundings, the same FMAs), so they give its bits. No a*b+c may become an
 * FMA behind our back (the Makefile passes -ffp-contract=off; this covers builds without it). */
#if defined(__clang__)
#pragma STDC FP_CONTRACT OFF
#endif

/* One mt19937 state word -> the generator's output (the standard tempering) -> torch's
 * uniform_real_distribution<float>(0, 1): the low 24 bits times 2^-24 (exact, in [0, 1)). */
void ms_mt_uniform24_ref(float *out, const uint32_t *state, size_t n) {
    for (size_t i = 0; i < n; i++) {
        uint32_t y = state[i];
        y ^= y >> 11;
        y ^= (y << 7) & 0x9d2c5680u;
        y ^= (y << 15) & 0xefc60000u;
        y ^= y >> 18;
        out[i] = (float)(y & 0xffffffu) * (1.0f / 16777216.0f);
    }
}

/* MT19937 state refill (Matsumoto & Nishimura 1998; at::mt19937::next_state): word k becomes
 * mt[k + M] ^ (y >> 1) ^ (y odd ? 0x9908b0df : 0), y = upper bit of mt[k] | lower 31 of mt[k + 1],
 * indices mod N, in increasing k (so for k >= N - M, mt[k + M - N] is already the new word). */
void ms_mt19937_twist_ref(uint32_t *mt) {
    for (int k = 0; k < 624; k++) {
        uint32_t y = (mt[k] & 0x80000000u) | (mt[(k + 1) % 624] & 0x7fffffffu);
        mt[k] = mt[(k + 397) % 624] ^ (y >> 1) ^ ((y & 1u) ? 0x9908b0dfu : 0u);
    }
}

/* avx_mathfun.h's log256_ps (Pommier's sse_mathfun after Cephes logf) one lane at a time: x =
 * m 2^e with m in [sqrt(1/2), sqrt(2)), log1p(m - 1) by the degree-9 polynomial x - x^2/2 +
 * x^3 P(x), plus e ln 2 with ln 2 = 0.693359375 - 2.12194440e-4. Debian's libtorch builds its
 * AVX2 kernels with -mfma and contraction on: gcc fuses every multiply whose only use is an add
 * into an FMA, marked fmaf here (without them 1% of the values move by 1-2 ulp). */
static float rn_bits_f(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }
static uint32_t rn_f_bits(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }

static float cephes_logf_lane(float x) {
    int invalid = x <= 0.0f;                              /* _CMP_LE_OS; NaN compares false */
    if (!(x >= 1.17549435e-38f)) x = 1.17549435e-38f;    /* max_ps(x, min_norm_pos) */
    uint32_t bits = rn_f_bits(x);
    int32_t imm0 = (int32_t)(bits >> 23) - 0x7f;
    x = rn_bits_f((bits & ~0x7f800000u) | rn_f_bits(0.5f));
    float e = (float)imm0 + 1.0f;
    float tmp = x < 0.707106781186547524f ? x : 0.0f;
    float one_m = x < 0.707106781186547524f ? 1.0f : 0.0f;
    x = x - 1.0f;
    e = e - one_m;
    x = x + tmp;
    float z = x * x;
    float y = 7.0376836292E-2f;
    y = fmaf(y, x, -1.1514610310E-1f);
    y = fmaf(y, x, 1.1676998740E-1f);
    y = fmaf(y, x, -1.2420140846E-1f);
    y = fmaf(y, x, 1.4249322787E-1f);
    y = fmaf(y, x, -1.6668057665E-1f);
    y = fmaf(y, x, 2.0000714765E-1f);
    y = fmaf(y, x, -2.4999993993E-1f);
    y = fmaf(y, x, 3.3333331174E-1f);
    y = y * x;
    tmp = e * -2.12194440e-4f;
    y = fmaf(y, z, tmp);
    y = fmaf(-z, 0.5f, y);                                /* z * 0.5 is exact: fused or not */
    x = x + y;
    x = fmaf(e, 0.693359375f, x);
    return invalid ? rn_bits_f(0xffffffffu) : x;          /* or_ps with an all-ones mask: NaN */
}

/* sincos256_ps: |x| reduced by j pi/4 (j even, pi/4 in three parts), then Cephes' sin and cos
 * polynomials on [-pi/4, pi/4]; bit 2 of j swaps them, bits 4 and (j-2)&4 set the signs. */
static void cephes_sincosf_lane(float x, float *s, float *c) {
    uint32_t sign_sin = rn_f_bits(x) & 0x80000000u;
    x = rn_bits_f(rn_f_bits(x) & 0x7fffffffu);
    float y = x * 1.27323954473516f;                      /* 4 / pi */
    int32_t j = (int32_t)y;                               /* cvttps: truncate */
    j = (j + 1) & ~1;
    y = (float)j;
    uint32_t swap_sin = ((uint32_t)j & 4u) << 29;
    int poly_sin = (j & 2) == 0;                          /* first polynomial for sin? */
    x = fmaf(y, -0.78515625f, x);                         /* extended-precision reduction */
    x = fmaf(y, -2.4187564849853515625e-4f, x);
    x = fmaf(y, -3.77489497744594108e-8f, x);
    uint32_t sign_cos = ((uint32_t)~(j - 2) & 4u) << 29;
    sign_sin ^= swap_sin;
    float z = x * x;
    float yc = 2.443315711809948E-005f;                   /* cos polynomial on [0, pi/4] */
    yc = fmaf(yc, z, -1.388731625493765E-003f);
    yc = fmaf(yc, z, 4.166664568298827E-002f);
    yc = yc * z;
    yc = fmaf(yc, z, -(z * 0.5f));
    yc = yc + 1.0f;
    float ys = -1.9515295891E-4f;                         /* sin polynomial on [0, pi/4] */
    ys = fmaf(ys, z, 8.3321608736E-3f);
    ys = fmaf(ys, z, -1.6666654611E-1f);
    ys = ys * z;
    ys = fmaf(ys, x, x);
    float sv = poly_sin ? ys : yc, cv = poly_sin ? yc : ys;
    *s = rn_bits_f(rn_f_bits(sv) ^ sign_sin);
    *c = rn_bits_f(rn_f_bits(cv) ^ sign_cos);
}

/* normal_fill_16: eight Box-Muller pairs from 16 uniforms, u1 = 1 - d[j] (log never sees 0),
 * u2 = d[j + 8]; the cos half to j, the sin half to j + 8. avx_mathfun: the AVX2 kernel
 * (avx_mathfun log/sincos, theta = (float)(2 pi) * u2 in float); else the default kernel (libm
 * logf/cosf/sinf, theta = 2 pi u2 in double rounded to float). `* 1 + 0` is torch's
 * `* std + mean` (it turns -0 into +0). */
void ms_torch_normal16_ref(float *data, size_t nblocks, int avx_mathfun) {
    for (size_t b = 0; b < nblocks; b++) {
        float *d = data + 16 * b;
        for (int j = 0; j < 8; j++) {
            float u1 = 1.0f - d[j], u2 = d[j + 8], radius, s, c;
            if (avx_mathfun) {
                radius = sqrtf(-2.0f * cephes_logf_lane(u1));
                cephes_sincosf_lane((float)(2.0 * MS_PI) * u2, &s, &c);
            } else {
                radius = sqrtf(-2.0f * logf(u1));
                float theta = (float)(2.0 * MS_PI * (double)u2);
                c = cosf(theta);
                s = sinf(theta);
            }
            d[j] = radius * c * 1.0f + 0.0f;
            d[j + 8] = radius * s * 1.0f + 0.0f;
        }
    }
}

#if defined(MS_X86_KERNELS)
/* The same lanes, eight at a time: this is normal_fill_16_AVX2 itself. */
MS_TARGET_AVX2
static __m256 rn_log_avx2(__m256 x) {
    const __m256 one = _mm256_set1_ps(1.0f);
    __m256 invalid = _mm256_cmp_ps(x, _mm256_setzero_ps(), _CMP_LE_OS);
    x = _mm256_max_ps(x, _mm256_set1_ps(1.17549435e-38f));
    __m256i imm0 = _mm256_sub_epi32(_mm256_srli_epi32(_mm256_castps_si256(x), 23), _mm256_set1_epi32(0x7f));
    x = _mm256_or_ps(_mm256_and_ps(x, _mm256_castsi256_ps(_mm256_set1_epi32(~0x7f800000))), _mm256_set1_ps(0.5f));
    __m256 e = _mm256_add_ps(_mm256_cvtepi32_ps(imm0), one);
    __m256 mask = _mm256_cmp_ps(x, _mm256_set1_ps(0.707106781186547524f), _CMP_LT_OS);
    __m256 tmp = _mm256_and_ps(x, mask);
    x = _mm256_sub_ps(x, one);
    e = _mm256_sub_ps(e, _mm256_and_ps(one, mask));
    x = _mm256_add_ps(x, tmp);
    __m256 z = _mm256_mul_ps(x, x);
    __m256 y = _mm256_set1_ps(7.0376836292E-2f);
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(-1.1514610310E-1f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.1676998740E-1f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(-1.2420140846E-1f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.4249322787E-1f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(-1.6668057665E-1f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(2.0000714765E-1f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(-2.4999993993E-1f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(3.3333331174E-1f));
    y = _mm256_mul_ps(y, x);
    tmp = _mm256_mul_ps(e, _mm256_set1_ps(-2.12194440e-4f));
    y = _mm256_fmadd_ps(y, z, tmp);
    y = _mm256_fnmadd_ps(z, _mm256_set1_ps(0.5f), y);
    x = _mm256_add_ps(x, y);
    x = _mm256_fmadd_ps(e, _mm256_set1_ps(0.693359375f), x);
    return _mm256_or_ps(x, invalid);
}

MS_TARGET_AVX2
static void rn_sincos_avx2(__m256 x, __m256 *s, __m256 *c) {
    const __m256i i4 = _mm256_set1_epi32(4), i2 = _mm256_set1_epi32(2);
    __m256i sign_sin = _mm256_and_si256(_mm256_castps_si256(x), _mm256_set1_epi32((int)0x80000000u));
    x = _mm256_and_ps(x, _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff)));
    __m256 y = _mm256_mul_ps(x, _mm256_set1_ps(1.27323954473516f));
    __m256i j = _mm256_cvttps_epi32(y);
    j = _mm256_and_si256(_mm256_add_epi32(j, _mm256_set1_epi32(1)), _mm256_set1_epi32(~1));
    y = _mm256_cvtepi32_ps(j);
    __m256i swap_sin = _mm256_slli_epi32(_mm256_and_si256(j, i4), 29);
    __m256 poly_sin = _mm256_castsi256_ps(_mm256_cmpeq_epi32(_mm256_and_si256(j, i2), _mm256_setzero_si256()));
    x = _mm256_fmadd_ps(y, _mm256_set1_ps(-0.78515625f), x);
    x = _mm256_fmadd_ps(y, _mm256_set1_ps(-2.4187564849853515625e-4f), x);
    x = _mm256_fmadd_ps(y, _mm256_set1_ps(-3.77489497744594108e-8f), x);
    __m256i sign_cos = _mm256_slli_epi32(_mm256_andnot_si256(_mm256_sub_epi32(j, i2), i4), 29);
    sign_sin = _mm256_xor_si256(sign_sin, swap_sin);
    __m256 z = _mm256_mul_ps(x, x);
    __m256 yc = _mm256_set1_ps(2.443315711809948E-005f);
    yc = _mm256_fmadd_ps(yc, z, _mm256_set1_ps(-1.388731625493765E-003f));
    yc = _mm256_fmadd_ps(yc, z, _mm256_set1_ps(4.166664568298827E-002f));
    yc = _mm256_mul_ps(yc, z);
    yc = _mm256_fmsub_ps(yc, z, _mm256_mul_ps(z, _mm256_set1_ps(0.5f)));
    yc = _mm256_add_ps(yc, _mm256_set1_ps(1.0f));
    __m256 ys = _mm256_set1_ps(-1.9515295891E-4f);
    ys = _mm256_fmadd_ps(ys, z, _mm256_set1_ps(8.3321608736E-3f));
    ys = _mm256_fmadd_ps(ys, z, _mm256_set1_ps(-1.6666654611E-1f));
    ys = _mm256_mul_ps(ys, z);
    ys = _mm256_fmadd_ps(ys, x, x);
    __m256 sv = _mm256_blendv_ps(yc, ys, poly_sin), cv = _mm256_blendv_ps(ys, yc, poly_sin);
    *s = _mm256_xor_ps(sv, _mm256_castsi256_ps(sign_sin));
    *c = _mm256_xor_ps(cv, _mm256_castsi256_ps(sign_cos));
}

MS_TARGET_AVX2
static void torch_normal16_avx2(float *data, size_t nblocks) {
    const __m256 one = _mm256_set1_ps(1.0f), zero = _mm256_setzero_ps();
    for (size_t b = 0; b < nblocks; b++) {
        float *d = data + 16 * b;
        __m256 u1 = _mm256_sub_ps(one, _mm256_loadu_ps(d)), u2 = _mm256_loadu_ps(d + 8), s, c;
        __m256 radius = _mm256_sqrt_ps(_mm256_mul_ps(_mm256_set1_ps(-2.0f), rn_log_avx2(u1)));
        rn_sincos_avx2(_mm256_mul_ps(_mm256_set1_ps((float)(2.0 * MS_PI)), u2), &s, &c);
        _mm256_storeu_ps(d, _mm256_add_ps(_mm256_mul_ps(_mm256_mul_ps(radius, c), one), zero));
        _mm256_storeu_ps(d + 8, _mm256_add_ps(_mm256_mul_ps(_mm256_mul_ps(radius, s), one), zero));
    }
}

MS_TARGET_AVX2
static void mt_uniform24_avx2(float *out, const uint32_t *state, size_t n) {
    const __m256i m1 = _mm256_set1_epi32((int)0x9d2c5680u), m2 = _mm256_set1_epi32((int)0xefc60000u);
    const __m256i low = _mm256_set1_epi32(0xffffff);
    const __m256 scale = _mm256_set1_ps(1.0f / 16777216.0f);
    size_t i = 0;
    for (; i + 8 <= n; i += 8) {
        __m256i y = _mm256_loadu_si256((const __m256i *)(const void *)(state + i));
        y = _mm256_xor_si256(y, _mm256_srli_epi32(y, 11));
        y = _mm256_xor_si256(y, _mm256_and_si256(_mm256_slli_epi32(y, 7), m1));
        y = _mm256_xor_si256(y, _mm256_and_si256(_mm256_slli_epi32(y, 15), m2));
        y = _mm256_xor_si256(y, _mm256_srli_epi32(y, 18));
        _mm256_storeu_ps(out + i, _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_and_si256(y, low)), scale));
    }
    ms_mt_uniform24_ref(out + i, state + i, n - i);
}

/* The refill eight words at a time where the words read are all old (k + 8 <= 227: mt[k + 397]
 * not yet rewritten) or all new (k >= 227: mt[k - 227] rewritten at least 8 words earlier);
 * the words in between and the last one (which reads the new mt[0]) one at a time. */
MS_TARGET_AVX2
static void mt19937_twist_avx2(uint32_t *mt) {
    const __m256i up = _mm256_set1_epi32((int)0x80000000u), lo = _mm256_set1_epi32(0x7fffffff);
    const __m256i one = _mm256_set1_epi32(1), mag = _mm256_set1_epi32((int)0x9908b0dfu);
    int k = 0;
    for (;;) {
        int stop = k < 227 ? 227 : 623;                   /* blocks must not straddle 227 or reach 623 */
        for (; k + 8 <= stop; k += 8) {
            __m256i a = _mm256_loadu_si256((const __m256i *)(const void *)(mt + k));
            __m256i b = _mm256_loadu_si256((const __m256i *)(const void *)(mt + k + 1));
            __m256i c = _mm256_loadu_si256((const __m256i *)(const void *)(mt + (k < 227 ? k + 397 : k - 227)));
            __m256i y = _mm256_or_si256(_mm256_and_si256(a, up), _mm256_and_si256(b, lo));
            __m256i odd = _mm256_cmpeq_epi32(_mm256_and_si256(y, one), one);
            __m256i r = _mm256_xor_si256(_mm256_xor_si256(c, _mm256_srli_epi32(y, 1)), _mm256_and_si256(odd, mag));
            _mm256_storeu_si256((__m256i *)(void *)(mt + k), r);
        }
        for (; k < stop; k++) {
            uint32_t y = (mt[k] & 0x80000000u) | (mt[k + 1] & 0x7fffffffu);
            mt[k] = mt[k < 227 ? k + 397 : k - 227] ^ (y >> 1) ^ ((y & 1u) ? 0x9908b0dfu : 0u);
        }
        if (stop == 623) break;
    }
    uint32_t y = (mt[623] & 0x80000000u) | (mt[0] & 0x7fffffffu);
    mt[623] = mt[396] ^ (y >> 1) ^ ((y & 1u) ? 0x9908b0dfu : 0u);
}
#endif

void ms_mt_uniform24(float *out, const uint32_t *state, size_t n) {
#if defined(MS_X86_KERNELS)
    if (ms_simd() >= MS_SIMD_AVX2) { mt_uniform24_avx2(out, state, n); return; }
#endif
    ms_mt_uniform24_ref(out, state, n);
}

void ms_mt19937_twist(uint32_t *mt) {
#if defined(MS_X86_KERNELS)
    if (ms_simd() >= MS_SIMD_AVX2) { mt19937_twist_avx2(mt); return; }
#endif
    ms_mt19937_twist_ref(mt);
}

void ms_torch_normal16(float *data, size_t nblocks, int avx_mathfun) {
#if defined(MS_X86_KERNELS)
    if (avx_mathfun && ms_simd() >= MS_SIMD_AVX2) { torch_normal16_avx2(data, nblocks); return; }
#endif
    ms_torch_normal16_ref(data, nblocks, avx_mathfun);
}
