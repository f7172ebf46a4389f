/* mixshow.h — the one public header of mixshow: Mix-of-Show (Gu et al., NeurIPS 2023,
 * arXiv:2305.18292) on Stable Diffusion 1.x in plain C11.
 *
 * Layers, bottom up (dependencies point down only):
 *   tools/      CLI, image/config/checkpoint codecs, PyTorch reference scripts (tools/ref/)
 *   mixshow.c   the method: ED-LoRA step, gradient fusion + L-BFGS, regional sampling
 *   models/     CLIP text encoder + tokenizer, UNet, VAE, T2I-Adapter, schedulers, weights
 *   tensor.c    status/errors, arenas, threads, ops (forward + backward), SIMD kernels
 *
 * Conventions (see README.md "How we verify numbers"):
 *   - Shapes are row-major in PyTorch order (N,C,H,W; N,T,D) and written in comments.
 *   - Ops come in pairs <op>_forward / <op>_backward. Forward: outputs, saved buffers, inputs,
 *     weights, dims. Backward: input grads, weight grads, dout, saved values, weights, dims.
 *     Backward ACCUMULATES (+=) into every gradient it is given; a NULL gradient is skipped.
 *   - Every fast kernel has a scalar twin <op>_ref (the definition; reductions in double).
 *   - Results are bit-identical for any thread count: threads split outputs, never a sum.
 */
#ifndef MIXSHOW_H
#define MIXSHOW_H

#include <stddef.h>
#include <stdint.h>

#define MS_VERSION "0.1.0"
#define MS_PI 3.14159265358979323846

const char *ms_version(void);      /* MS_VERSION */

/* ------------------------------------------------------------------------------------------
 * Status and errors. Anything touching files, options or user shapes returns MsStatus and
 * records a message with ms_errorf(); only main() exits.
 * ---------------------------------------------------------------------------------------- */
typedef enum {
    MS_OK = 0,
    MS_ERR_IO,          /* open/read/write/rename failed */
    MS_ERR_FORMAT,      /* a file is malformed: wrong magic, bad length, bad value */
    MS_ERR_NOMEM,       /* allocation failed or an arena is full */
    MS_ERR_ARG,         /* bad option or argument */
    MS_ERR_SHAPE,       /* tensor shapes do not fit */
    MS_ERR_UNSUPPORTED  /* valid input we do not handle (say what) */
} MsStatus;

/* Records a printf-style message (thread-local when the compiler has C11 _Thread_local) and
 * returns code, so `return ms_errorf(MS_ERR_FORMAT, "%s: ...", path);` is the idiom. */
MsStatus ms_errorf(MsStatus code, const char *fmt, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 2, 3)))
#endif
    ;
const char *ms_last_error(void);          /* "" when none */
const char *ms_status_name(MsStatus s);   /* "format error", ... */
void ms_clear_error(void);

/* Overflow-checked size arithmetic: return 1 and store the result, or 0 on overflow. */
int ms_mul_ok(size_t a, size_t b, size_t *r);
int ms_add_ok(size_t a, size_t b, size_t *r);

/* ------------------------------------------------------------------------------------------
 * Memory. Plan sizes with *_sizes() functions, then allocate once. Four arenas by role:
 * weights (frozen), train (LoRA, embeddings, grads, Adam moments), acts (saved for backward,
 * reset per step), scratch (im2col, attention tiles).
 * ---------------------------------------------------------------------------------------- */
typedef struct {
    unsigned char *base;   /* 64-byte aligned view into mem */
    size_t used, cap;
    void *mem;             /* what malloc returned (NULL for a borrowed buffer) */
} Arena;

MsStatus arena_init(Arena *a, size_t cap_bytes);            /* MS_ERR_NOMEM on failure */
void arena_free(Arena *a);
void *arena_alloc(Arena *a, size_t bytes);                  /* 64-byte aligned; NULL if full */
float *arena_floats(Arena *a, size_t n);                     /* 64-byte aligned; NULL if full */
size_t arena_mark(const Arena *a);
void arena_reset(Arena *a, size_t mark);                     /* free everything after mark */

/* Aligned heap allocation for long-lived buffers (64-byte aligned, NULL on failure or on
 * overflow of n*size). Free with ms_free_aligned. */
void *ms_alloc_aligned(size_t n, size_t size);
void ms_free_aligned(void *p);

/* A dense float tensor view (no ownership). */
#define MS_MAX_DIMS 8
typedef struct {
    float *data;
    int ndim;
    int64_t shape[MS_MAX_DIMS];
} Tensor;
size_t tensor_numel(const Tensor *t);

/* ------------------------------------------------------------------------------------------
 * Threads, timing, CPU features.
 * ---------------------------------------------------------------------------------------- */
void ms_set_threads(int n);      /* <= 0: all cores. No-op without OpenMP. */
int ms_get_threads(void);
int ms_max_threads(void);        /* cores OpenMP would use; 1 without OpenMP */
double ms_time(void);            /* seconds, monotonic where available */

/* SIMD level of the kernels in use. Chosen at run time on x86 (cpuid), at compile time
 * elsewhere; MS_NO_SIMD builds are always MS_SIMD_SCALAR. ms_set_simd() lowers the level
 * (tests compare paths; it never raises past what the CPU has). */
typedef enum { MS_SIMD_SCALAR = 0, MS_SIMD_NEON = 1, MS_SIMD_AVX2 = 2, MS_SIMD_AVX512 = 3 } MsSimd;
MsSimd ms_simd_detected(void);
MsSimd ms_simd(void);
void ms_set_simd(MsSimd level);
const char *ms_simd_name(MsSimd level);

/* A small deterministic RNG for tests and benchmarks (splitmix64 + Box-Muller in double).
 * Not torch's generator: the torch-compatible mt19937 lives with the schedulers. */
typedef struct { uint64_t s; } MsRng;
void ms_rng_seed(MsRng *r, uint64_t seed);
uint64_t ms_rng_u64(MsRng *r);
double ms_rng_uniform(MsRng *r);                 /* [0, 1) */
double ms_rng_normal(MsRng *r);
void ms_rng_fill_normal(MsRng *r, float *x, size_t n, float mean, float std);
void ms_rng_fill_uniform(MsRng *r, float *x, size_t n, float lo, float hi);

/* ==========================================================================================
 * Ops: GEMM, linear, convolution (tensor.c)
 * ======================================================================================== */
/* @@SECTION gemm@@ (declarations added by the kernel work) */
/* C (M,N) = alpha * op(A) op(B) + beta * C, row-major with leading dimensions.
 * op(A) is (M,K): A stored (M,K) with lda >= K, or if transA stored (K,M) with lda >= M.
 * op(B) is (K,N): B stored (K,N) with ldb >= N, or if transB stored (N,K) with ldb >= K.
 * beta == 0 overwrites C without reading it (NaNs in C do not propagate). */
void ms_gemm(int transA, int transB, int M, int N, int K, float alpha, const float *A, int lda,
             const float *B, int ldb, float beta, float *C, int ldc);
void ms_gemm_ref(int transA, int transB, int M, int N, int K, float alpha, const float *A, int lda,
                 const float *B, int ldb, float beta, float *C, int ldc);   /* double accumulation */

/* ==========================================================================================
 * Ops: normalisation, activations, attention, resampling, losses (tensor.c)
 * ======================================================================================== */
/* @@SECTION ops@@ (declarations added by the ops work) */

/* ==========================================================================================
 * Models: weight tables, key mapping (models/weights.c)
 * ======================================================================================== */
/* @@SECTION weights@@ */

/* ==========================================================================================
 * Benchmarks (tensor.c): kernels measured by `mixshow bench`
 * ======================================================================================== */
/* @@SECTION bench@@ */

#endif /* MIXSHOW_H */
