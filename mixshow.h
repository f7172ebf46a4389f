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
/* The team size the load-aware policy picks (tensor.c, "Load-aware team size"): want when other
 * processes keep at most half a core busy on average, else the cores they leave free of ncpu
 * (at least 1). */
int ms_threads_for_load(int want, int ncpu, double others_cores);
int ms_max_threads(void);        /* cores OpenMP would use; 1 without OpenMP */
/* Independent computations side by side (a batch cut into parts, issue 14): ms_run_tasks runs
 * fn(ctx, i) for i in [0, n), task i on thread i of a team of n (fewer if the runtime gives
 * fewer: then a thread runs several, in turn), every op inside a task on its thread alone;
 * sequentially without OpenMP or when called inside a parallel region. Ops are safe to call
 * from concurrent tasks (their scratch is per thread); anything else fn touches must be the
 * task's own. Bits never depend on it: an op computes each element the same way on any
 * thread. ms_task_team: the threads a parallel region would get now (ms_set_threads, lowered
 * while other processes load the machine). */
void ms_run_tasks(int n, void (*fn)(void *ctx, int i), void *ctx);
int ms_task_team(void);
/* Re-executes the program with OMP_WAIT_POLICY=PASSIVE (threads sleep instead of spinning at
 * OpenMP barriers) unless a wait policy is already set; call first thing in main(). Linux with
 * OpenMP only; returns when it did nothing. */
void ms_wait_policy_passive(char **argv);
/* Loops whose work is below w (about elements touched; default 65536) run on one thread: a
 * parallel region costs more than it saves there. 0 makes every loop parallel (tests compare
 * 1 and N threads on small sizes); < 0 restores the default. Results never depend on it. */
void ms_set_parallel_min_work(double w);
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

/* 16-bit weights -> f32 (tensor.c; F16C / AVX-512 / NEON, scalar _ref): exact, NaN payloads and
 * signalling NaNs kept bit for bit, as the scalar definition ms_f16_to_f32_vec_ref. */
void ms_f16_to_f32_vec(float *out, const uint16_t *h, size_t n);
void ms_f16_to_f32_vec_ref(float *out, const uint16_t *h, size_t n);
void ms_bf16_to_f32_vec(float *out, const uint16_t *h, size_t n);
/* The kernels of torch's CPU randn (tensor.c; the generator is MsTorchRng, models/schedulers.c),
 * SIMD paths bit-identical to the scalar _ref definitions:
 *   ms_mt19937_twist: the mt19937 state refill (624 words, in place);
 *   ms_mt_uniform24: n state words -> tempered output -> uniform_real_distribution<float>(0,1);
 *   ms_torch_normal16: normal_fill_16 on nblocks blocks of 16 uniforms in place (Box-Muller,
 *     cos half first); avx_mathfun 1: torch's AVX2 kernel (avx_mathfun.h log/sincos with FMA,
 *     what stock x86-64 torch runs), 0: its default kernel (libm logf/sinf/cosf). */
void ms_mt19937_twist(uint32_t *mt);
void ms_mt19937_twist_ref(uint32_t *mt);
void ms_mt_uniform24(float *out, const uint32_t *state, size_t n);
void ms_mt_uniform24_ref(float *out, const uint32_t *state, size_t n);
void ms_torch_normal16(float *data, size_t nblocks, int avx_mathfun);
void ms_torch_normal16_ref(float *data, size_t nblocks, int avx_mathfun);

/* ==========================================================================================
 * Ops: GEMM, linear, convolution (tensor.c)
 * ======================================================================================== */
/* C (M,N) = alpha * op(A) op(B) + beta * C, row-major with leading dimensions.
 * op(A) is (M,K): A stored (M,K) with lda >= K, or if transA stored (K,M) with lda >= M.
 * op(B) is (K,N): B stored (K,N) with ldb >= N, or if transB stored (N,K) with ldb >= K.
 * beta == 0 overwrites C without reading it (NaNs in C do not propagate). */
void ms_gemm(int transA, int transB, int M, int N, int K, float alpha, const float *A, int lda,
             const float *B, int ldb, float beta, float *C, int ldc);
void ms_gemm_ref(int transA, int transB, int M, int N, int K, float alpha, const float *A, int lda,
                 const float *B, int ldb, float beta, float *C, int ldc);   /* double accumulation */
/* ms_gemm and the convolutions pack into a per-thread workspace that is allocated on first use
 * and grown only when a larger size is first needed; this frees the calling thread's copy and
 * those of ms_run_tasks' task threads. */
void ms_gemm_scratch_free(void);
/* Which fast paths ms_gemm and the convolutions may take (default MS_GEMM_FAST_ALL; 0 = the
 * plain packed driver). Every combination gives the same bits (tests/test_kernels.c); the
 * switch exists for those tests and for `mixshow bench`. Set it outside parallel work. */
enum {
    MS_GEMM_FAST_INPLACE_A = 1,   /* a dense, untransposed A is read where it lies, not packed */
    MS_GEMM_FAST_HALF = 2,        /* half-width register tiles for narrow column tails */
    MS_GEMM_FAST_PACK = 4,        /* SIMD packing: transposed B, stride-1 im2col (AVX-512) */
    MS_GEMM_FAST_SMALL_M = 8,     /* M <= 256, B transposed: C^T = B A^T, the weight read in place */
    MS_GEMM_FAST_SHORT = 16,      /* half-height register tiles for short row tails (AVX-512) */
    MS_GEMM_FAST_ALL = 31
};
void ms_gemm_set_fast(int flags);
/* Matmul FLOP counter (`mixshow bench --nets`: GFLOP/s of whole networks). When enabled, adds
 * 2 M N K for every float GEMM (ms_gemm, linear, convolutions as GEMMs) and, for attention,
 * 2 Dh per visible query-key pair and product (forward QK^T, PV; backward as documented at
 * attention_backward in tensor.c). Counted at each call on the calling thread: the same count
 * for any thread count. Off by default; enable, reset and read outside parallel work. */
void ms_flops_enable(int on);
void ms_flops_reset(void);
double ms_flops_count(void);

/* out (N,O) = x (N,I) @ w^T + b ; w (O,I) PyTorch layout ; b (O) or NULL */
void linear_forward(float *out, const float *x, const float *w, const float *b, int N, int I, int O);
/* dx (N,I) += dout @ w ; dw (O,I) += dout^T @ x ; db (O) += sum_n dout ; NULL grads skipped */
void linear_backward(float *dx, float *dw, float *db, const float *dout, const float *x, const float *w,
                     int N, int I, int O);
void linear_forward_ref(float *out, const float *x, const float *w, const float *b, int N, int I, int O);
void linear_backward_ref(float *dx, float *dw, float *db, const float *dout, const float *x,
                         const float *w, int N, int I, int O);

/* x (N,C,H,W), w (Co,C,k,k), b (Co) or NULL -> out (N,Co,Ho,Wo), stride s, symmetric pad p.
 * Ho = (H + pt + pb - k)/s + 1, Wo = (W + pl + pr - k)/s + 1. */
void conv2d_forward(float *out, const float *x, const float *w, const float *b, int N, int C, int Co,
                    int H, int W, int k, int s, int p);
/* asymmetric padding (top, left, bottom, right). The VAE encoder's F.pad(x, (0,1,0,1)) before
 * its stride-2 conv pads right and bottom by one: pt=0, pl=0, pb=1, pr=1. */
void conv2d_forward_pad(float *out, const float *x, const float *w, const float *b, int N, int C, int Co,
                        int H, int W, int k, int s, int pt, int pl, int pb, int pr);
/* dx (N,C,H,W) += ..., dw (Co,C,k,k) += ..., db (Co) += ... ; NULL grads skipped */
void conv2d_backward(float *dx, float *dw, float *db, const float *dout, const float *x, const float *w,
                     int N, int C, int Co, int H, int W, int k, int s, int pt, int pl, int pb, int pr);
/* Naive definitions (double accumulation), same arguments as the _pad forward and backward. */
void conv2d_forward_ref(float *out, const float *x, const float *w, const float *b, int N, int C, int Co,
                        int H, int W, int k, int s, int pt, int pl, int pb, int pr);
void conv2d_backward_ref(float *dx, float *dw, float *db, const float *dout, const float *x,
                         const float *w, int N, int C, int Co, int H, int W, int k, int s,
                         int pt, int pl, int pb, int pr);

/* ==========================================================================================
 * Ops: normalisation, activations, attention, resampling, losses (tensor.c)
 * ======================================================================================== */
/* All ops: row-major PyTorch shapes (comment on each), backward ACCUMULATES (+=), NULL grads
 * are skipped. Dims are int, flat element counts size_t. Every op with a nontrivial kernel has
 * a scalar _ref twin with the same signature (double arithmetic) that tests compare against.
 * Where "out may alias x" is not said, outputs must not overlap inputs. */

/* GroupNorm (torch.nn.GroupNorm, biased variance): x (N,C,HW) -> out (N,C,HW); G divides C.
 * w, b (C) (NULL: 1, 0). mean, rstd (N,G) are written for backward (NULL: not saved).
 * Group statistics are accumulated in double. out may alias x (in place): each group's
 * statistics are complete before any of its outputs is written (the VAE relies on it). */
void groupnorm_forward(float *out, float *mean, float *rstd, const float *x, const float *w,
                       const float *b, int N, int C, int HW, int G, float eps);
void groupnorm_backward(float *dx, float *dw, float *db, const float *dout, const float *x,
                        const float *mean, const float *rstd, const float *w, int N, int C, int HW, int G);
void groupnorm_forward_ref(float *out, float *mean, float *rstd, const float *x, const float *w,
                           const float *b, int N, int C, int HW, int G, float eps);
void groupnorm_backward_ref(float *dx, float *dw, float *db, const float *dout, const float *x,
                            const float *mean, const float *rstd, const float *w, int N, int C, int HW, int G);

/* LayerNorm over the last dim (torch.nn.LayerNorm(D), biased variance): x (N,D) -> out (N,D);
 * w, b (D) (NULL: 1, 0); mean, rstd (N) saved (NULL: not saved). */
void layernorm_forward(float *out, float *mean, float *rstd, const float *x, const float *w,
                       const float *b, int N, int D, float eps);
void layernorm_backward(float *dx, float *dw, float *db, const float *dout, const float *x,
                        const float *mean, const float *rstd, const float *w, int N, int D);
void layernorm_forward_ref(float *out, float *mean, float *rstd, const float *x, const float *w,
                           const float *b, int N, int D, float eps);
void layernorm_backward_ref(float *dx, float *dw, float *db, const float *dout, const float *x,
                            const float *mean, const float *rstd, const float *w, int N, int D);

/* Elementwise activations, x (n) -> out (n); out may alias x. Backward takes the forward INPUT.
 *   silu(x) = x * sigmoid(x);  gelu(x) = 0.5 x (1 + erf(x / sqrt 2)) (exact, not tanh);
 *   quick_gelu(x) = x * sigmoid(1.702 x) (CLIP);  relu(x) = max(x, 0) (relu'(0) = 0). */
void silu_forward(float *out, const float *x, size_t n);
void silu_backward(float *dx, const float *dout, const float *x, size_t n);
void gelu_forward(float *out, const float *x, size_t n);
void gelu_backward(float *dx, const float *dout, const float *x, size_t n);
void quick_gelu_forward(float *out, const float *x, size_t n);
void quick_gelu_backward(float *dx, const float *dout, const float *x, size_t n);
void relu_forward(float *out, const float *x, size_t n);
void relu_backward(float *dx, const float *dout, const float *x, size_t n);
void silu_forward_ref(float *out, const float *x, size_t n);
/* AdamW's elementwise update with its float constants (ms_adamw_step, models/optim.c, derives
 * them from torch's doubles); fast path and scalar twin equal to the bit. */
typedef struct { float decay, b1, one_b1, b2, one_b2, bc2_sqrt, eps, neg_step; } MsAdamwConst;
void ms_adamw_update(float *p, const float *g, float *m, float *v, size_t n, const MsAdamwConst *k);
void ms_adamw_update_ref(float *p, const float *g, float *m, float *v, size_t n, const MsAdamwConst *k);
void silu_backward_ref(float *dx, const float *dout, const float *x, size_t n);
void gelu_forward_ref(float *out, const float *x, size_t n);
void gelu_backward_ref(float *dx, const float *dout, const float *x, size_t n);
void quick_gelu_forward_ref(float *out, const float *x, size_t n);
void quick_gelu_backward_ref(float *dx, const float *dout, const float *x, size_t n);

/* GEGLU (diffusers attention.py GEGLU after its proj): x (N,2D) -> out (N,D),
 * out[:, j] = x[:, j] * gelu(x[:, D + j])   (hidden, gate = x.chunk(2, -1); hidden * gelu(gate)) */
void geglu_forward(float *out, const float *x, int N, int D);
void geglu_backward(float *dx, const float *dout, const float *x, int N, int D);   /* dx (N,2D) */
void geglu_forward_ref(float *out, const float *x, int N, int D);
void geglu_backward_ref(float *dx, const float *dout, const float *x, int N, int D);

/* Softmax over the last dim: x (N,D) -> out (N,D); out may alias x. Backward takes the OUTPUT. */
void softmax_forward(float *out, const float *x, int N, int D);
void softmax_backward(float *dx, const float *dout, const float *out, int N, int D);
void softmax_forward_ref(float *out, const float *x, int N, int D);
void softmax_backward_ref(float *dx, const float *dout, const float *out, int N, int D);

/* Multi-head scaled dot-product attention, memory-efficient (never holds the (Tq,Tk) matrix):
 *   q (B,Tq,H*Dh), k, v (B,Tk,H*Dh), heads interleaved in the channel dim (head h = channels
 *   h*Dh .. h*Dh+Dh-1, the layout of diffusers' to_q/to_k/to_v outputs) -> out (B,Tq,H*Dh).
 *   out_h = softmax(scale * q_h k_h^T) v_h per (b, h); scale is usually 1/sqrt(Dh).
 *   causal: query i sees keys j <= i (top-left aligned, torch tril; CLIP's mask).
 *   lse (B,H,Tq): per-row log-sum-exp of the scaled logits, saved for backward (NULL: not saved).
 * Uses a grow-once per-thread scratch (see ops_scratch_free). */
void attention_forward(float *out, float *lse, const float *q, const float *k, const float *v,
                       int B, int Tq, int Tk, int H, int Dh, int causal, float scale);
/* dq (B,Tq,H*Dh), dk, dv (B,Tk,H*Dh); recomputes the probabilities from q, k and lse. */
void attention_backward(float *dq, float *dk, float *dv, const float *dout, const float *q,
                        const float *k, const float *v, const float *out, const float *lse,
                        int B, int Tq, int Tk, int H, int Dh, int causal, float scale);
/* Naive definitions in double that materialise the full (Tq,Tk) matrix (tests only). */
void attention_ref(float *out, float *lse, const float *q, const float *k, const float *v,
                   int B, int Tq, int Tk, int H, int Dh, int causal, float scale);
void attention_backward_ref(float *dq, float *dk, float *dv, const float *dout, const float *q,
                            const float *k, const float *v, const float *out, const float *lse,
                            int B, int Tq, int Tk, int H, int Dh, int causal, float scale);
/* Frees the per-thread scratch of attention (it is allocated on first use and grown only when a
 * larger size is first needed; call at exit to keep leak checkers quiet). */
void ops_scratch_free(void);
/* Caps that scratch (bytes per thread; 0 = no cap, the default). Above the cap attention runs a
 * streaming row-at-a-time path that needs no scratch (slower, same results to rounding). */
void ops_scratch_limit(size_t max_bytes_per_thread);
/* y = e^x, elementwise, with the exp of the attention kernels at the current SIMD level
 * (Cody-Waite reduction + degree-6 polynomial, error < 1.5 ulp on [-87.3, 88]; 0 below
 * -87.33654, e^88 above 88). Scalar twin: the same definition without FMA. */
void ms_expf_vec(float *y, const float *x, size_t n);
/* y = erf(x), elementwise, with the erf of GELU / GEGLU at the current SIMD level (two polynomial
 * pieces and this file's exp, error < 2 ulp; NaN stays NaN). Scalar twin: the same definition
 * without FMA. */
void ms_erff_vec(float *y, const float *x, size_t n);
/* y = e^x, elementwise, evaluated in double and rounded once (SiLU's and quick_gelu's exp):
 * correctly rounded but for results within ~1e-13 of a midpoint; 0 below -104, +inf above 89,
 * NaN stays NaN. The same at every SIMD level but for those rare last bits. */
void ms_expf_exact_vec(float *y, const float *x, size_t n);
/* Double-precision accumulations (threads split output rows; results independent of the count):
 *   ms_gram_f64_acc: G (d,d) upper triangle (j >= i) += X^T X, X (rows,d) float, 4 x 16 AVX-512
 *     register tiles == its _ref twin bitwise (the sum order is defined in tensor.c);
 *   ms_gemm_f64_acc: C (M,N) += A (M,K) B (K,N), blocked + SIMD, the bits of its _ref twin
 *     (every element sums over k in order, no FMA). */
void ms_gram_f64_acc(double *G, const float *X, size_t rows, int d);
void ms_gram_f64_acc_ref(double *G, const float *X, size_t rows, int d);
void ms_gemm_f64_acc(double *C, const double *A, const double *B, int M, int N, int K);
void ms_gemm_f64_acc_ref(double *C, const double *A, const double *B, int M, int N, int K);
/* Kernels of the symmetric eigen-solver (mixshow.c ms_sym_eigen); A, Q, Z row-major, vectors
 * indexed absolutely (entries below r0 unused); threads over rows or column chunks:
 *   ms_tridiag_update_f64: rows i >= r0: A[i][j] -= v_i w_j + w_i v_j (j >= r0) when v, then
 *     p_i = sum_{j >= r0} A[i][j] u_j when u (Householder tridiagonalisation's rank-2 update
 *     fused with the next step's matrix-vector product);
 *   ms_house_accumulate_f64: Q <- Q H_{n-3} ... H_0 applied to rows (Q^T's backward
 *     accumulation), H_k = I - beta_k v_k v_k^T on indices > k, v_k = row k of Vh beyond the
 *     diagonal, beta_k = 0 skipped: row i -= beta_k (row i . v_k) v_k over columns > k;
 *   ms_rot_rows_f64: sweeps q = 0 .. n_sweeps-1 in order, each for i = hi_q-1 down to lo_q on
 *     rows (i, i+1) of Z (n_cols used, stride ld) with (c, s) = (c, s)[off_q + i - lo_q]:
 *     row_{i+1} <- s row_i + c row_{i+1}, row_i <- c row_i - s row_{i+1}. */
void ms_tridiag_update_f64(double *A, int n, int r0, const double *v, const double *w, const double *u, double *p);
void ms_house_accumulate_f64(double *Q, int n, const double *Vh, const double *beta);
void ms_rot_rows_f64(double *Z, int n_cols, int ld, const int *lo, const int *hi, const size_t *off, int n_sweeps,
                     const double *c, const double *s);

/* Attention probabilities at chosen key columns (Mix-of-Show's attention regularisation reads
 * the attn2 maps at the concept tokens), rebuilt from q, k (layout as attention_forward) and
 * the lse (B,H,Tq) that attention_forward saved; cols (B,ncol) key positions in [0, Tk)
 * (repeats allowed) -> p (B,H,Tq,ncol):
 *   p[b,h,i,j] = exp(scale q[b,i,h,:] . k[b,cols[b*ncol+j],h,:] - lse[b,h,i])
 * i.e. diffusers' attention_probs[b*H + h, i, cols[b, j]] (head_to_batch_dim order). */
void attention_probs_cols_forward(float *p, const float *q, const float *k, const float *lse,
                                  const int32_t *cols, int B, int Tq, int Tk, int H, int Dh, int ncol,
                                  float scale);
/* Given dp = dL/dp (B,H,Tq,ncol), ACCUMULATES into dq (B,Tq,H*Dh) and dk (B,Tk,H*Dh) (NULL:
 * skipped), through the softmax (lse counts as the function of q and k it is). Add it to the
 * dq/dk of attention_backward when the loss reads both the output and the probabilities. */
void attention_probs_cols_backward(float *dq, float *dk, const float *dp, const float *q, const float *k,
                                   const float *lse, const int32_t *cols, int B, int Tq, int Tk, int H, int Dh,
                                   int ncol, float scale);
/* Definitions in double (tests only); they ignore lse and rebuild each row's softmax from q, k. */
void attention_probs_cols_forward_ref(float *p, const float *q, const float *k, const float *lse,
                                      const int32_t *cols, int B, int Tq, int Tk, int H, int Dh, int ncol,
                                      float scale);
void attention_probs_cols_backward_ref(float *dq, float *dk, const float *dp, const float *q, const float *k,
                                       const float *lse, const int32_t *cols, int B, int Tq, int Tk, int H,
                                       int Dh, int ncol, float scale);

/* Resampling. x (N,C,H,W). */
void upsample_nearest2x_forward(float *out, const float *x, int N, int C, int H, int W);   /* out (N,C,2H,2W) */
void upsample_nearest2x_backward(float *dx, const float *dout, int N, int C, int H, int W);
void avgpool2x2_forward(float *out, const float *x, int N, int C, int H, int W);   /* H, W even; out (N,C,H/2,W/2) */
void avgpool2x2_backward(float *dx, const float *dout, int N, int C, int H, int W);
/* torch.nn.PixelUnshuffle(r): out (N, C*r*r, H/r, W/r), out[n, c*r*r + dy*r + dx, i, j] =
 * x[n, c, i*r + dy, j*r + dx]; H, W divisible by r. */
void pixel_unshuffle_forward(float *out, const float *x, int N, int C, int H, int W, int r);
void pixel_unshuffle_backward(float *dx, const float *dout, int N, int C, int H, int W, int r);
/* torch.cat([a, b], dim=1): a (N,Ca,HW), b (N,Cb,HW) -> out (N,Ca+Cb,HW). */
void concat_channels_forward(float *out, const float *a, const float *b, int N, int Ca, int Cb, int HW);
void concat_channels_backward(float *da, float *db, const float *dout, int N, int Ca, int Cb, int HW);

/* Elementwise arithmetic on (n) buffers; out may alias an input. */
void add_forward(float *out, const float *a, const float *b, size_t n);        /* out = a + b */
void add_backward(float *da, float *db, const float *dout, size_t n);
void mul_forward(float *out, const float *a, const float *b, size_t n);        /* out = a * b */
void mul_backward(float *da, float *db, const float *dout, const float *a, const float *b, size_t n);
void scale_forward(float *out, const float *x, float s, size_t n);             /* out = s * x */
void scale_backward(float *dx, const float *dout, float s, size_t n);
/* In place x (N,C,HW) += t (N,C) broadcast over HW (ResNet time-embedding add,
 * h + temb[:, :, None, None]). Backward: dt[n,c] += sum_hw dout[n,c,hw] (summed in double);
 * the gradient w.r.t. x is dout itself (the caller passes it on). */
void add_bias_nc(float *x, const float *t, int N, int C, int HW);
void add_bias_nc_backward(float *dt, const float *dout, int N, int C, int HW);

/* Embedding lookup: ids (N) int32 (token ids fit easily; callers convert), table (V,D) ->
 * out (N,D) = table[ids]. ids must lie in [0, V): the caller (tokenizer) guarantees it.
 * Backward scatter-adds dout rows into dtable (V,D); deterministic for any thread count. */
void embedding_forward(float *out, const int32_t *ids, const float *table, int N, int D);
void embedding_backward(float *dtable, const float *dout, const int32_t *ids, int N, int D);

/* Weighted per-sample MSE (Mix-of-Show masked loss):
 *   pred, target (N,C,M) (M = H*W); weight NULL or (N,Cw,M) with Cw == 1 (broadcast over the C
 *   channels, e.g. a (N,1,H,W) mask against (N,4,H,W) latents) or Cw == C.
 *   weight NULL: loss = mean over all N*C*M of (p - t)^2       (F.mse_loss, reduction 'mean')
 *   else:        loss = (1/N) sum_n [ sum_{c,m} w[n,c%Cw,m] (p - t)^2 / sum_{c<Cw,m} w[n,c,m] ]
 *   i.e. torch ((mse(p,t,'none') * w).sum([1,2,3]) / w.sum([1,2,3])).mean() with w broadcast:
 *   the denominator sums the weight AS STORED, so a (N,1,H,W) mask counts each pixel once
 *   while the numerator counts it C times (as in Mix-of-Show). (p - t)^2 is formed in float
 *   (as F.mse_loss does), everything after it in double. A sample whose weights sum to 0
 *   contributes 0. Returns the loss; backward: dpred += dloss * dloss/dpred. */
double mse_forward(const float *pred, const float *target, const float *weight, int N, int C, int M, int Cw);
void mse_backward(float *dpred, const float *pred, const float *target, const float *weight,
                  int N, int C, int M, int Cw, float dloss);
double mse_forward_ref(const float *pred, const float *target, const float *weight, int N, int C, int M, int Cw);

/* Sinusoidal timestep embedding, diffusers 0.19.3 get_timestep_embedding, in float32:
 *   half = dim/2, exponent_i = -ln(max_period) * i / (half - freq_shift), f_i = exp(exponent_i)
 *   emb[n] = [sin(t_n f) | cos(t_n f)], swapped to [cos | sin] when flip_sin_to_cos, zero
 *   column appended when dim is odd. t (N) -> out (N,dim). SD 1.x UNet: dim 320, flip 1,
 *   freq_shift 0, max_period 10000. Forward only (timesteps are not trained). */
void timestep_embedding_forward(float *out, const float *t, int N, int dim, int flip_sin_to_cos,
                                float freq_shift, int max_period);
void timestep_embedding_ref(float *out, const float *t, int N, int dim, int flip_sin_to_cos,
                            float freq_shift, int max_period);    /* double (not bit-exact) */

/* ==========================================================================================
 * Models: weight tables, key mapping (models/weights.c)
 * ======================================================================================== */
/* SD 1.x configurations, parameter tables and the diffusers <-> original-LDM key mapping
 * (models/weights.c; pure logic: tools/model_load.c reads the files and fills these).
 *
 * Config fields are named after the diffusers 0.19.3 / HF transformers config.json keys; the
 * comment gives the SD 1.5 value. A parameter table lists every tensor a config implies, in
 * diffusers' state_dict() order: its diffusers key, shape and the key of the same tensor in an
 * original single-file checkpoint (CompVis LDM: model.diffusion_model.*, first_stage_model.*,
 * cond_stage_model.transformer.*; TencentARC's T2I-Adapter .pth for adapters). The mapping is
 * derived from the config (block counts, channels), after diffusers 0.19.3's
 * convert_from_ckpt.py (convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint,
 * convert_ldm_clip_checkpoint) and scripts/convert_original_t2i_adapter.py. */
#define MS_MAX_BLOCKS 8     /* resolution levels (len(block_out_channels)) */
#define MS_KEY_MAX 128      /* bytes of a key, NUL included */

typedef enum {
    MS_BLOCK_NONE = 0,
    MS_BLOCK_CROSS_ATTN_DOWN,   /* "CrossAttnDownBlock2D" */
    MS_BLOCK_DOWN,              /* "DownBlock2D" */
    MS_BLOCK_CROSS_ATTN_UP,     /* "CrossAttnUpBlock2D" */
    MS_BLOCK_UP,                /* "UpBlock2D" */
    MS_BLOCK_MID_CROSS_ATTN,    /* "UNetMidBlock2DCrossAttn" */
    MS_BLOCK_DOWN_ENCODER,      /* "DownEncoderBlock2D" (VAE) */
    MS_BLOCK_UP_DECODER         /* "UpDecoderBlock2D" (VAE) */
} MsBlockType;
const char *ms_block_type_name(MsBlockType t);            /* "CrossAttnDownBlock2D", ... */
MsBlockType ms_block_type_from_name(const char *name);    /* MS_BLOCK_NONE when unknown */

/* UNet2DConditionModel. Values that SD 1.x never changes and mixshow does not implement
 * (class/addition embeddings, only_cross_attention, dual_cross_attention,
 * resnet_time_scale_shift != "default", act_fn != silu, ...) are rejected by the config
 * reader, so they have no field. */
typedef struct {
    int sample_size;                 /* 64 (latent pixels) */
    int in_channels, out_channels;   /* 4, 4 */
    int center_input_sample;         /* false */
    int flip_sin_to_cos;             /* true: timestep embedding is [cos | sin] */
    int freq_shift;                  /* 0 */
    int n_blocks;                    /* len(block_out_channels): 4 */
    MsBlockType down_block_types[MS_MAX_BLOCKS]; /* CrossAttnDownBlock2D x3, DownBlock2D */
    MsBlockType mid_block_type;                  /* UNetMidBlock2DCrossAttn */
    MsBlockType up_block_types[MS_MAX_BLOCKS];   /* UpBlock2D, CrossAttnUpBlock2D x3 */
    int block_out_channels[MS_MAX_BLOCKS];       /* 320, 640, 1280, 1280 */
    int layers_per_block;            /* 2 (resnets per down block; up blocks have one more) */
    int downsample_padding;          /* 1 */
    float mid_block_scale_factor;    /* 1 */
    int norm_num_groups;             /* 32 (resnets, transformer GroupNorm, conv_norm_out) */
    float norm_eps;                  /* 1e-5 (resnets, conv_norm_out; transformer GroupNorm 1e-6) */
    int cross_attention_dim;         /* 768 */
    int attention_head_dim[MS_MAX_BLOCKS];  /* 8 each. In SD 1.x this is the NUMBER OF HEADS
                                             * (diffusers naming bug); an int or a per-block list */
    int num_attention_heads[MS_MAX_BLOCKS]; /* null in SD 1.x (stored as 0); when set it wins */
    int transformer_layers_per_block[MS_MAX_BLOCKS]; /* 1 each (int or per-block list) */
    int use_linear_projection;       /* false: proj_in/proj_out are 1x1 convs (SD 2.x: Linear) */
    int upcast_attention;            /* false (SD 2.1-v: true; only matters in f16) */
    int time_embedding_dim;          /* null (0): 4 * block_out_channels[0] = 1280 */
    int conv_in_kernel, conv_out_kernel; /* 3, 3 */
} UNetConfig;

/* AutoencoderKL. All its GroupNorms use eps 1e-6; the mid attention has one head. */
typedef struct {
    int sample_size;                 /* 512 (image pixels) */
    int in_channels, out_channels;   /* 3, 3 */
    int latent_channels;             /* 4 */
    int n_blocks;                    /* 4 */
    MsBlockType down_block_types[MS_MAX_BLOCKS]; /* DownEncoderBlock2D x4 */
    MsBlockType up_block_types[MS_MAX_BLOCKS];   /* UpDecoderBlock2D x4 */
    int block_out_channels[MS_MAX_BLOCKS];       /* 128, 256, 512, 512 */
    int layers_per_block;            /* 2 (encoder resnets per level; the decoder has 3) */
    int norm_num_groups;             /* 32 */
    float scaling_factor;            /* 0.18215 */
    int force_upcast;                /* true (meaningless here: we compute in f32) */
} VaeConfig;

typedef enum { MS_ACT_QUICK_GELU = 0, MS_ACT_GELU } MsActivation;
const char *ms_activation_name(MsActivation a);           /* "quick_gelu", "gelu" */

/* HF CLIPTextModel (CLIP ViT-L/14 text tower). */
typedef struct {
    int vocab_size;                  /* 49408 */
    int hidden_size;                 /* 768 */
    int intermediate_size;           /* 3072 */
    int projection_dim;              /* 768 (unused by CLIPTextModel) */
    int num_hidden_layers;           /* 12 */
    int num_attention_heads;         /* 12 (head dim 64) */
    int max_position_embeddings;     /* 77 */
    MsActivation hidden_act;         /* quick_gelu: x * sigmoid(1.702 x) */
    float layer_norm_eps;            /* 1e-5 */
    int pad_token_id, bos_token_id, eos_token_id; /* 1, 0, 2: HF defaults left in the file.
                                      * The tokenizer's real ids are 49407, 49406, 49407. */
} ClipTextConfig;

typedef enum { MS_ADAPTER_FULL = 0, MS_ADAPTER_LIGHT } MsAdapterType;

/* T2IAdapter. */
typedef struct {
    MsAdapterType adapter_type;      /* full_adapter (light_adapter: rejected by the check) */
    int in_channels;                 /* 1 (sketch) / 3 (openpose, keypose) */
    int n_channels;                  /* len(channels): 4 */
    int channels[MS_MAX_BLOCKS];     /* 320, 640, 1280, 1280 (the UNet's block_out_channels) */
    int num_res_blocks;              /* 2 */
    int downscale_factor;            /* 8 (PixelUnshuffle) */
} AdapterConfig;

typedef enum { MS_BETA_LINEAR = 0, MS_BETA_SCALED_LINEAR, MS_BETA_SQUAREDCOS_CAP_V2 } MsBetaSchedule;
typedef enum { MS_PRED_EPSILON = 0, MS_PRED_V, MS_PRED_SAMPLE } MsPrediction;
typedef enum {   /* ABSENT: no key in the file, so each scheduler class uses its own default
                  * (0.19.3: DDIM/PNDM "leading", DPMSolverMultistep "linspace") */
    MS_SPACING_ABSENT = 0, MS_SPACING_LINSPACE, MS_SPACING_LEADING, MS_SPACING_TRAILING
} MsTimestepSpacing;

/* scheduler_config.json (any diffusers scheduler class; the sampler picks the algorithm). */
typedef struct {
    char class_name[48];             /* "PNDMScheduler" (_class_name) */
    int num_train_timesteps;         /* 1000 */
    double beta_start, beta_end;     /* 0.00085, 0.012 */
    MsBetaSchedule beta_schedule;    /* scaled_linear (trained_betas must be null) */
    int steps_offset;                /* 1 */
    MsPrediction prediction_type;    /* absent: epsilon */
    MsTimestepSpacing timestep_spacing; /* absent */
    int set_alpha_to_one;            /* false */
    int skip_prk_steps;              /* true */
    int clip_sample;                 /* false */
    double clip_sample_range;        /* absent: 1.0 */
} SchedulerConfig;

/* Built-in SD 1.5 values (for LDM single files, which carry no config). */
void ms_unet_config_sd15(UNetConfig *c);
void ms_vae_config_sd15(VaeConfig *c);
void ms_clip_text_config_sd15(ClipTextConfig *c);
void ms_adapter_config_sd15(AdapterConfig *c, int in_channels);   /* 1 sketch, 3 openpose */
void ms_scheduler_config_sd15(SchedulerConfig *c);

/* Validation: MS_ERR_ARG / MS_ERR_UNSUPPORTED with a message naming the field, its value and
 * what is required (channels divisible by norm_num_groups and by the number of heads, block
 * types that fit their position, sizes within limits). */
MsStatus ms_unet_config_check(const UNetConfig *c);
MsStatus ms_vae_config_check(const VaeConfig *c);
MsStatus ms_clip_text_config_check(const ClipTextConfig *c);
MsStatus ms_adapter_config_check(const AdapterConfig *c);
MsStatus ms_scheduler_config_check(const SchedulerConfig *c);

/* Derived UNet sizes. Level 0 is the highest resolution; the mid block sits at level n-1 and up
 * block i at level n-1-i (diffusers reverses the per-block lists for the up path). */
int ms_unet_heads(const UNetConfig *c, int level);          /* num_attention_heads or attention_head_dim */
int ms_unet_time_embed_dim(const UNetConfig *c);            /* time_embedding_dim or 4 * channels[0] */
int ms_unet_cross_attn_layers(const UNetConfig *c);         /* 16 in SD 1.x: down 6, mid 1, up 9 */

/* ---- parameter tables ---- */
typedef enum { MS_DT_F32 = 0, MS_DT_F16, MS_DT_BF16 } MsDtype;
#define MS_PARAM_BUFFER 1   /* not a parameter: an integer buffer that may be absent
                             * (text_model.embeddings.position_ids); never holds data */
#define MS_PARAM_1X1    2   /* [C,C] and [C,C,1,1] both accepted (VAE attention: diffusers
                             * Linear vs LDM 1x1 conv; same bytes) */
typedef struct {
    char name[MS_KEY_MAX];     /* diffusers 0.19.3 key, "down_blocks.0.attentions.0.proj_in.weight" */
    char ldm[MS_KEY_MAX];      /* original single-file key, "model.diffusion_model.input_blocks.1.1.proj_in.weight" */
    char alias[MS_KEY_MAX];    /* older diffusers name or "" ("encoder.mid_block.attentions.0.query.weight") */
    int ndim;
    int64_t shape[4];          /* diffusers shape, PyTorch order */
    int ldm_ndim;              /* rank in the LDM layout (4 for the VAE attention convs) */
    int flags;                 /* MS_PARAM_* */
    size_t numel;
    /* data, when loaded (tools/model_load.c): exactly one of f32 / half is set */
    MsDtype dtype;
    float *f32;                /* numel floats */
    uint16_t *half;            /* numel F16 or BF16 bit patterns (kept on request) */
} MsParam;

typedef struct {
    MsParam *p;
    int n, cap;
    void *mem;                 /* data storage (ms_alloc_aligned), owned; NULL before loading */
    size_t mem_bytes;
} MsParamTable;

/* Every tensor of the component, in diffusers' state_dict() order (the text encoder: the order
 * of shared/models/sd15-configs/diffusers-keys.txt, q before k, v; transformers' own
 * state_dict() lists k_proj, v_proj, q_proj). The table is malloc'ed;
 * release it with ms_param_table_free (also frees loaded data). */
MsStatus ms_param_table_unet(const UNetConfig *c, MsParamTable *t);
MsStatus ms_param_table_vae(const VaeConfig *c, MsParamTable *t);
MsStatus ms_param_table_text(const ClipTextConfig *c, MsParamTable *t);
MsStatus ms_param_table_adapter(const AdapterConfig *c, MsParamTable *t);
void ms_param_table_free(MsParamTable *t);
/* Frees the data of every parameter (f32 / half set to NULL: "no data loaded"), keeps the names
 * and shapes; ms_param_table_free still applies. */
void ms_param_table_release(MsParamTable *t);

int ms_param_find(const MsParamTable *t, const char *name);     /* diffusers key or alias; -1 */
int ms_param_find_ldm(const MsParamTable *t, const char *key);  /* full LDM key; -1 */
size_t ms_param_table_numel(const MsParamTable *t);             /* parameters (buffers excluded) */
/* Does a file tensor of rank ndim / shape fit p? (MS_PARAM_1X1 admits [C,C,1,1] for [C,C].) */
int ms_param_shape_ok(const MsParam *p, int ndim, const int64_t *shape);
/* "[320, 4, 3, 3]" into buf (cap >= 8); returns buf. */
char *ms_shape_str(char *buf, size_t cap, int ndim, const int64_t *shape);

/* Allocates storage for every parameter of t (f32, or 16-bit where half_dtype[i] says so; pass
 * NULL for all f32) in one block, 64-byte aligned per tensor. */
MsStatus ms_param_table_alloc(MsParamTable *t, const MsDtype *dtypes);
/* The values of p as f32 (converts kept F16/BF16 exactly). MS_ERR_ARG when p holds no data. */
MsStatus ms_param_get_f32(const MsParam *p, float *out);
float ms_f16_to_f32(uint16_t h);          /* exact */
float ms_bf16_to_f32(uint16_t h);         /* exact */

/* 16-bit weights, converted when used. The networks (UNet, VAE, CLIP text, T2I-Adapter) hold
 * their weights as `const MsParam *` into the loaded table and ask for f32 values right before
 * the op that reads them: ms_weight_f32 returns p->f32 itself for an f32 table (no copy, so
 * the f32 path costs one branch per op), or converts the kept F16/BF16 values exactly into buf.
 * Results are therefore bit for bit those of the f32 path on the 16-bit-rounded weights
 * (tests/test_half.c). Memory: the table's 2 bytes per weight plus one staging buffer the size
 * of the largest 16-bit tensor (SD 1.5 UNet: up_blocks.0.resnets.0.conv1, 29.5M floats). */
const float *ms_weight_f32(const MsParam *p, float *buf);   /* p NULL: NULL */
/* n values of F16 (dtype MS_DT_F16) or BF16 bit patterns -> f32, exactly (fast path of the above). */
void ms_half_to_f32(float *out, const uint16_t *h, size_t n, MsDtype dtype);
/* Staging for one network: mat holds its largest 16-bit tensor, vec[0], vec[1] its largest
 * 16-bit vectors (a bias and a norm weight are in use together with a matrix). Allocated only
 * when the table keeps 16-bit data (all NULL for f32 tables); `skip` (or NULL) names a tensor
 * that is never converted whole (CLIP's token embedding: only looked-up rows are). A staged
 * network must not run on two threads at once. */
typedef struct { float *mat, *vec[2]; void *mem; size_t bytes; } MsWeightStage;
MsStatus ms_weight_stage_init(MsWeightStage *s, const MsParamTable *t, const char *skip);
/* w as f32 through slot 0 (mat: the op's matrix), 1 (vec[0]: its bias, or a norm weight) or 2
 * (vec[1]: a norm bias) of s. */
const float *ms_stage_f32(const MsWeightStage *s, const MsParam *w, int slot);
void ms_weight_stage_free(MsWeightStage *s);
/* Planning without data: the largest parameter (*mat) and the largest vector (*vec) of a table
 * whatever its dtypes; returns the floats of a full stage (mat + 2 vec, each rounded up to 16).
 * vae_sizes, adapter_sizes and clip_text_sizes plan this always (it is small: SD 1.5 VAE
 * 2.4M floats), so 16-bit and f32 tables run from the same arena. */
size_t ms_weight_stage_floats(const MsParamTable *t, const char *skip, size_t *mat, size_t *vec);

/* Keys of original single files that are not model parameters and are skipped: the DDPM
 * schedule buffers (betas, alphas_cumprod, posterior_*, ...), model_ema.*, logvar. */
int ms_ldm_key_is_harmless(const char *key);
/* Older LDM files name the text encoder cond_stage_model.transformer.{embeddings,encoder,
 * final_layer_norm}.* (transformers < 4.22, without text_model.). Writes the current form to
 * out; returns 1 when key was rewritten, 0 when copied unchanged, -1 when it does not fit. */
int ms_ldm_key_normalize(const char *key, char *out, size_t cap);

/* A Stable Diffusion 1.x model: configs and the parameters of its three networks. */
typedef struct {
    UNetConfig unet_config;
    VaeConfig vae_config;
    ClipTextConfig text_config;
    SchedulerConfig scheduler_config;
    MsParamTable unet, vae, text;
} MsModel;
void ms_model_free(MsModel *m);             /* frees the tables; m is zeroed */

/* ==========================================================================================
 * Models: torch-identical RNG and the diffusers 0.19.3 schedulers (models/schedulers.c)
 * ======================================================================================== */
/* torch's CPU kernels come in builds per instruction set, and two of those we mirror give
 * different last bits: torch.randn (normal_fill: libm log/sin/cos vs avx_mathfun polynomials)
 * and torch.linspace (which makes the betas). MS_TORCH_CPU_AVX2 is what stock x86-64 torch runs
 * on any AVX2 or AVX-512 CPU (its normal kernel has no AVX-512 version); MS_TORCH_CPU_DEFAULT
 * is ATEN_CPU_CAPABILITY=default, older x86 and (for randn) ARM builds. */
typedef enum { MS_TORCH_CPU_DEFAULT = 0, MS_TORCH_CPU_AVX2 = 1 } MsTorchCpu;

/* torch.Generator on the CPU (CPUGeneratorImpl): mt19937 + the cached second Box-Muller
 * sample of normal_distribution<double>. ms_torch_seed(g, s) == torch.manual_seed(s) (only
 * the low 32 bits of s count) or torch.Generator().manual_seed(s). */
typedef struct {
    uint32_t mt[624];
    int next;            /* next state word; 624: twist first */
    uint64_t seed;
    int has_normal;      /* a cached N(0,1) sample (tensors under 16 elements draw pairs) */
    double normal;
} MsTorchRng;
void ms_torch_seed(MsTorchRng *g, uint64_t seed);
uint32_t ms_torch_random(MsTorchRng *g);        /* generator.random(): one mt19937 word */
uint64_t ms_torch_random64(MsTorchRng *g);      /* two words, the first is the high half */
/* torch.randn(n) (any shape with n elements, float32, contiguous), bit-exact; advances g
 * exactly as torch does. ms_torch_randn_skip advances g the same way without the math. */
void ms_torch_randn(MsTorchRng *g, float *out, size_t n, MsTorchCpu cpu);
void ms_torch_randn_skip(MsTorchRng *g, size_t n);

/* Schedulers: diffusers 0.19.3 DDPMScheduler, DDIMScheduler (eta 0), EulerDiscreteScheduler
 * and DPMSolverMultistepScheduler (DPM-Solver++ 2M: dpmsolver++, midpoint, solver_order 2,
 * lower_order_final), each built by `Cls.from_config(<the model's scheduler_config.json>)`,
 * prediction_type "epsilon". */
typedef enum { MS_SCHED_DDPM, MS_SCHED_DDIM, MS_SCHED_EULER, MS_SCHED_DPMSOLVER } MsSchedKind;

#define MS_SCHED_MAX_T 1000       /* num_train_timesteps (SD 1.x: 1000) */
typedef struct {
    MsSchedKind kind;
    SchedulerConfig cfg;                         /* the file's keys (models/weights.c) */
    MsTorchCpu torch_cpu;                        /* which torch kernels to mirror */
    MsTimestepSpacing spacing;                   /* cfg's, or this class's default if absent:
                                                  * DDPM, DDIM "leading"; Euler, DPM "linspace" */
    int T;                                       /* num_train_timesteps */
    float betas[MS_SCHED_MAX_T];                 /* (T) float32, as torch holds them */
    float alphas_cumprod[MS_SCHED_MAX_T];        /* (T) */
    float alpha_t[MS_SCHED_MAX_T], sigma_t[MS_SCHED_MAX_T], lambda_t[MS_SCHED_MAX_T]; /* DPM */
    float final_alpha_cumprod;                   /* DDIM */
    int num_inference_steps;                     /* what set_timesteps was given */
    int num_steps;                               /* len(timesteps) */
    double timesteps[MS_SCHED_MAX_T + 1];        /* integers except Euler's (float64 there) */
    float sigmas[MS_SCHED_MAX_T + 2];            /* Euler: (num_steps + 1), last 0 */
    float init_noise_sigma;                      /* multiply the initial noise by this */
    int lower_order_nums;                        /* DPM-Solver: model outputs seen (<= 2) */
} MsScheduler;

/* `Cls.from_config(cfg)`: keys the class does not know are ignored (DPM-Solver and Euler
 * ignore set_alpha_to_one and clip_sample); prediction_type must be epsilon. */
MsStatus ms_scheduler_init(MsScheduler *s, MsSchedKind kind, const SchedulerConfig *cfg, MsTorchCpu cpu);
MsStatus ms_scheduler_set_timesteps(MsScheduler *s, int num_inference_steps);
/* Sampling loop, step i = 0 .. num_steps-1 in order, x (n floats) starting as
 * init_noise_sigma * noise:
 *   ms_scheduler_scale_model_input(s, i, in, x, n);  eps = unet(in, s->timesteps[i]);
 *   ms_scheduler_step(s, i, eps, x, work, n, rng);   x is updated in place.
 * work (n floats, kept by the caller for the whole loop): DPM-Solver keeps the previous data
 * prediction there; DDPM draws its noise into it; DDIM and Euler may pass NULL. rng: DDPM draws
 * N(0,1) noise from it for t > 0; Euler draws (and, with s_churn 0, discards) noise each step as
 * diffusers does, so a shared generator stays in step; NULL is allowed for all but DDPM. */
void ms_scheduler_scale_model_input(const MsScheduler *s, int i, float *out, const float *x, size_t n);
MsStatus ms_scheduler_step(MsScheduler *s, int i, const float *eps, float *x, float *work, size_t n,
                           MsTorchRng *rng);
/* Training (DDPMScheduler.add_noise): out[b] = sqrt(ac[t_b]) * x0[b] + sqrt(1 - ac[t_b]) * noise[b]
 * for B samples of m floats each; t_b in [0, T). out may alias x0 or noise. */
MsStatus ms_scheduler_add_noise(const MsScheduler *s, float *out, const float *x0, const float *noise,
                                const int64_t *t, int B, size_t m);

/* ==========================================================================================
 * Models: AutoencoderKL (models/vae.c) and T2I-Adapter (models/adapter.c), forward
 * ======================================================================================== */
/* Parameters of a loaded MsParamTable (f32, or F16/BF16 converted when used: the staging comes from
 * the scratch arena, planned by vae_sizes), looked up once by vae_params_init. f = 2^(levels-1)
 * is the latent factor (8 for SD); images are (B, in_channels, H, W) with H, W multiples of f,
 * latents (B, latent_channels, H/f, W/f). */
#define MS_VAE_MAX_LAYERS 8                 /* layers_per_block supported (SD: 2) */
typedef struct {                            /* ResnetBlock2D without time embedding */
    const MsParam *norm1_w, *norm1_b;         /* (Ci)       ...resnets.j.norm1.{weight,bias} */
    const MsParam *conv1_w, *conv1_b;         /* (Co,Ci,3,3), (Co) ...conv1 */
    const MsParam *norm2_w, *norm2_b;         /* (Co)       ...norm2 */
    const MsParam *conv2_w, *conv2_b;         /* (Co,Co,3,3), (Co) ...conv2 */
    const MsParam *short_w, *short_b;         /* (Co,Ci,1,1), (Co) ...conv_shortcut; NULL if Ci == Co */
} VaeResnetParams;
typedef struct {                            /* mid_block.attentions.0 (one head) */
    const MsParam *norm_w, *norm_b;           /* (C) group_norm */
    const MsParam *q_w, *q_b, *k_w, *k_b, *v_w, *v_b;  /* (C,C), (C) to_q / to_k / to_v */
    const MsParam *o_w, *o_b;                 /* (C,C), (C) to_out.0 */
} VaeAttnParams;
typedef struct {
    VaeConfig cfg;
    const MsParam *enc_conv_in_w, *enc_conv_in_b;                      /* encoder.conv_in */
    VaeResnetParams enc_res[MS_MAX_BLOCKS][MS_VAE_MAX_LAYERS];       /* encoder.down_blocks.i.resnets.j */
    const MsParam *enc_down_w[MS_MAX_BLOCKS], *enc_down_b[MS_MAX_BLOCKS]; /* ...downsamplers.0.conv */
    VaeResnetParams enc_mid_res[2];                                  /* encoder.mid_block.resnets.r */
    VaeAttnParams enc_mid_attn;
    const MsParam *enc_norm_out_w, *enc_norm_out_b, *enc_conv_out_w, *enc_conv_out_b;
    const MsParam *quant_w, *quant_b, *post_quant_w, *post_quant_b;   /* (2L,2L,1,1), (L,L,1,1) */
    const MsParam *dec_conv_in_w, *dec_conv_in_b;                      /* decoder.conv_in */
    VaeResnetParams dec_mid_res[2];
    VaeAttnParams dec_mid_attn;
    VaeResnetParams dec_res[MS_MAX_BLOCKS][MS_VAE_MAX_LAYERS + 1];   /* decoder.up_blocks.i.resnets.j */
    const MsParam *dec_up_w[MS_MAX_BLOCKS], *dec_up_b[MS_MAX_BLOCKS];  /* ...upsamplers.0.conv */
    const MsParam *dec_norm_out_w, *dec_norm_out_b, *dec_conv_out_w, *dec_conv_out_b;
} VaeParams;
/* MS_ERR_FORMAT naming a missing key, MS_ERR_UNSUPPORTED for > MS_VAE_MAX_LAYERS. */
MsStatus vae_params_init(VaeParams *p, const VaeConfig *c, const MsParamTable *t);

/* Scratch-arena bytes for one call on images of H x W (batch does not matter: samples run one
 * after another). tile_sample: tile side in pixels for the tiled calls (0: cfg.sample_size;
 * < 0: tiled sizes not computed). decode_act_bytes: the three activation buffers of a decode
 * (the peak; SD 1.5 at 512x512: 512 MiB). */
typedef struct {
    size_t encode_bytes, decode_bytes, encode_tiled_bytes, decode_tiled_bytes, decode_act_bytes;
} VaeSizes;
MsStatus vae_sizes(const VaeConfig *c, int H, int W, int tile_sample, VaeSizes *s);

/* x (B,Cin,H,W) -> mean, logvar (B,L,H/f,W/f); logvar clamped to [-30, 20]
 * (Encoder, quant_conv, DiagonalGaussianDistribution). */
MsStatus vae_encode(const VaeParams *p, Arena *scratch, float *mean, float *logvar, const float *x,
                    int B, int H, int W);
/* latents = (mean + exp(0.5 logvar) * noise) * scale over n floats (scale = scaling_factor for
 * the UNet's latents, 1 for the posterior sample itself); std (n) or NULL. out may alias. */
void vae_posterior_sample(float *latents, float *std, const float *mean, const float *logvar, const float *noise,
                          size_t n, float scale);
/* latents (B,L,h,w), already multiplied by scaling_factor -> img (B,Cout,h*f,w*f), not clamped:
 * decode(latents / scaling_factor) = Decoder(post_quant_conv(z)). */
MsStatus vae_decode(const VaeParams *p, Arena *scratch, float *img, const float *latents, int B, int h, int w);
/* AutoencoderKL.enable_tiling() equivalents, the same numbers as diffusers 0.19.3's
 * tiled_decode / tiled_encode: tiles of tile_sample pixels (0: cfg.sample_size; 512 for SD) =
 * tile_sample/f latents, 25% overlap, each tile blended in place with the (already blended)
 * tile above then the one to its left by a linear ramp over the overlap, then cropped to
 * 75%. Inputs no larger than one tile take the untiled path, as in diffusers. */
MsStatus vae_decode_tiled(const VaeParams *p, Arena *scratch, float *img, const float *latents, int B, int h, int w,
                          int tile_sample);
MsStatus vae_encode_tiled(const VaeParams *p, Arena *scratch, float *mean, float *logvar, const float *x,
                          int B, int H, int W, int tile_sample);

/* Full-parameter training (issue 15). The training forwards run the whole batch at once and
 * keep on a tape (in the arena, sized by vae_train_sizes; H, W = image sides for the encoder,
 * latent sides for the decoder) every activation and a gradient buffer beside it; the tape
 * lives until the caller resets the arena. Weights must be f32 (MS_ERR_UNSUPPORTED otherwise).
 *   vae_encode_train: x (N,Cin,H,W) -> mean, logvar (N,lat,H/f,W/f) (as vae_encode);
 *   vae_decode_train: z (N,lat,h,w) -> img (N,Cout,h f,w f) = AutoencoderKL.decode(z): z is the
 *     posterior sample itself (no scaling_factor, unlike vae_decode's latents).
 * The backwards ACCUMULATE (+=) the gradient of every parameter into dp (a VaeParams over an
 * f32 table of ms_param_table_vae, zeroed by the caller) and dL/dinput into dx / dz (NULL: not
 * wanted). dlogvar is the gradient w.r.t. the clamped logvar; it passes the clamp where
 * -30 <= logvar <= 20, as torch.clamp's. dmean / dlogvar NULL: zero. */
typedef struct { float *v, *g; int C, H, W; } VaeTapeTensor;     /* value, gradient (N,C,H,W) */
typedef struct {
    int kind, x, y, out, k, s, pad[4];  /* op, input tensors (y: second input), output; conv geometry */
    size_t w, b;                        /* byte offsets of its MsParam pointers in VaeParams (attention:
                                         * of q_w; (size_t)-1 none): the same field of the gradients */
    float *save;                        /* GroupNorm: mean, rstd; attention: q, k, v, o, lse + backward's */
} VaeTapeOp;
typedef struct {
    VaeConfig cfg;
    const VaeParams *p;
    Arena *ar;
    VaeTapeOp *op;
    VaeTapeTensor *t;
    int plan, encode, N, H, W, n_ops, n_t, cap, in, out;
    size_t bytes;                       /* arena bytes taken (planned) */
    MsStatus st;
} VaeTape;
MsStatus vae_train_sizes(const VaeConfig *c, int encode, int N, int H, int W, size_t *bytes);
MsStatus vae_encode_train(VaeTape *t, Arena *ar, const VaeParams *p, float *mean, float *logvar, const float *x,
                          int N, int H, int W);
MsStatus vae_encode_backward_full(VaeTape *t, const VaeParams *dp, float *dx, const float *dmean, const float *dlogvar);
MsStatus vae_decode_train(VaeTape *t, Arena *ar, const VaeParams *p, float *img, const float *z, int N, int h, int w);
MsStatus vae_decode_backward_full(VaeTape *t, const VaeParams *dp, float *dz, const float *dimg);
/* Backward of vae_posterior_sample (latents = (mean + exp(logvar/2) noise) * scale):
 * dmean += scale dlat, dlogvar += scale dlat noise exp(logvar/2) / 2 (NULL: skipped). */
void vae_posterior_sample_backward(float *dmean, float *dlogvar, const float *dlatents, const float *logvar,
                                   const float *noise, size_t n, float scale);
/* DiagonalGaussianDistribution.kl() of B samples of m values each: kl[b] = 0.5 sum(mean^2 +
 * exp(logvar) - 1 - logvar) (summed in double); backward += dkl[b] (mean, (exp(logvar) - 1) / 2). */
void vae_kl(float *kl, const float *mean, const float *logvar, int B, size_t m);
void vae_kl_backward(float *dmean, float *dlogvar, const float *dkl, const float *mean, const float *logvar, int B,
                     size_t m);

#define MS_ADAPTER_MAX_RES 4                /* num_res_blocks supported (SD: 2) */
typedef struct {
    AdapterConfig cfg;
    const MsParam *conv_in_w, *conv_in_b;     /* (C0, Cin*f*f, 3, 3) adapter.conv_in */
    const MsParam *in_conv_w[MS_MAX_BLOCKS], *in_conv_b[MS_MAX_BLOCKS];  /* (Ci, Ci-1, 1, 1) adapter.body.i.in_conv; NULL if equal */
    const MsParam *block1_w[MS_MAX_BLOCKS][MS_ADAPTER_MAX_RES], *block1_b[MS_MAX_BLOCKS][MS_ADAPTER_MAX_RES]; /* (C,C,3,3) */
    const MsParam *block2_w[MS_MAX_BLOCKS][MS_ADAPTER_MAX_RES], *block2_b[MS_MAX_BLOCKS][MS_ADAPTER_MAX_RES]; /* (C,C,1,1) */
} AdapterParams;
MsStatus adapter_params_init(AdapterParams *p, const AdapterConfig *c, const MsParamTable *t);
/* Condition (N,Cin,H,W), sides multiples of f*2^(levels-1) (64 for SD). scratch_bytes: arena
 * bytes adapter_forward needs; feature_floats[i] = N * channels[i] * H/f/2^i * W/f/2^i. */
MsStatus adapter_sizes(const AdapterConfig *c, int N, int H, int W, size_t *scratch_bytes,
                       size_t feature_floats[MS_MAX_BLOCKS]);
/* T2IAdapter(full_adapter) forward: cond in [0, 1] -> features[i] (N, channels[i], H/f/2^i, W/f/2^i).
 * No adapter_conditioning_scale here: the caller scales the features. */
MsStatus adapter_forward(const AdapterParams *p, Arena *scratch, float *const *features, const float *cond,
                         int N, int H, int W);
/* Full-parameter training (issue 15, `mixshow pretrain --stage adapters`). adapter_forward_train
 * runs the same forward as adapter_forward (one code path; bit-identical features) but keeps
 * every activation on a tape carved from the arena (adapter_train_sizes bytes; it lives until the
 * caller resets the arena). Weights must be f32 (MS_ERR_UNSUPPORTED otherwise).
 * adapter_backward_full, given dfeat[i] = dL/dfeature i (NULL array or entries: 0), ACCUMULATES
 * (+=) the gradient of every parameter into dp (an AdapterParams made by adapter_params_init
 * over an f32 table of ms_param_table_adapter + ms_param_table_alloc, zeroed by the caller) and
 * dL/dcond into dcond (NULL: not wanted). The tape's gradient buffers are reused: one backward
 * per forward. */
typedef struct {
    AdapterConfig cfg;
    const AdapterParams *p;                   /* the weights of the forward (NULL: no forward yet) */
    int N, H, W;
    float *x0;                                /* (N, Cin*f*f, H/f, W/f) PixelUnshuffle(cond): conv_in's input */
    float *pool[MS_MAX_BLOCKS];               /* (N, C_{i-1}, h_i, w_i) AvgPool output, in_conv's input
                                               * (NULL: block i has no in_conv, pools straight into x[i][0]) */
    float *x[MS_MAX_BLOCKS][MS_ADAPTER_MAX_RES + 1];  /* (N, C_i, h_i, w_i) x[i][j]: input of resnet j;
                                               * x[i][R] = feature i (R = num_res_blocks) */
    float *r[MS_MAX_BLOCKS][MS_ADAPTER_MAX_RES];      /* relu(block1(x[i][j])): block2's input */
    float *u;                                 /* block2's output before the residual add (scratch) */
    float *g[3];                              /* backward's gradient buffers, the largest activation each */
} AdapterTape;
MsStatus adapter_train_sizes(const AdapterConfig *c, int N, int H, int W, size_t *bytes);
MsStatus adapter_forward_train(AdapterTape *t, Arena *ar, const AdapterParams *p, const float *cond, int N, int H, int W);
MsStatus adapter_backward_full(AdapterTape *t, const AdapterParams *dp, float *dcond, const float *const *dfeat);

/* ==========================================================================================
 * Models: CLIP tokenizer and text encoder (models/clip.c)
 * ======================================================================================== */
/* Tokenizer: HF CLIPTokenizer (slow) of transformers 4.31 without ftfy: BasicTokenizer cleanup
 * (drop control chars, whitespace -> ' ', spaces around CJK ideographs, NFC, str.split, str.lower
 * with its final-sigma rule), CLIP's regex pre-split, byte-level BPE with </w>, added tokens
 * matched first as whole units (case-sensitive, Trie.split: leftmost, then longest). Unicode
 * tables in models/clip_unicode.h are generated (tools/ref/gen_clip_unicode.py).
 * `a photo of a cat` -> 49406 320 1125 539 320 2368 49407, padded with pad_id to 77. */
typedef struct { uint32_t cp; int final, first, next; } ClipTrieNode;   /* first child, next sibling */
typedef struct {
    int n_vocab;                 /* entries of vocab.json (49408); ids 0..n_vocab-1 */
    int n_added;                 /* added tokens, ids n_vocab .. n_vocab+n_added-1, in order added */
    int bos_id, eos_id, pad_id, unk_id;   /* 49406, 49407, pad_token's id (SD 1.x: 49407), 49407 */
    int n_merges;                /* merges.txt lines used (48894) */
    /* internals */
    char **tok; size_t *tok_len; int n_tok, cap_tok;  /* id -> UTF-8 string (vocab, then added) */
    int32_t *vhash; size_t vhash_cap;                 /* open addressing: string -> vocab id */
    uint64_t *mkey; int32_t *mrank, *mres; size_t mhash_cap; /* (id a, id b) -> rank, merged id */
    int32_t byte_id[256], byte_id_w[256];             /* bytes_to_unicode symbol, plain and +</w> */
    ClipTrieNode *trie; int n_trie, cap_trie;         /* no-split tokens by code point; node 0 root */
    int32_t *nosplit; int n_nosplit;                  /* ids of the no-split tokens */
} ClipTokenizer;

/* vocab.json as n (token, byte length, id) triples (ids a permutation of 0..n-1), merges.txt as
 * text (the first line is a header; at most 48894 merges are used, as HF does). pad_token: the
 * tokenizer config's pad_token (NULL: <|endoftext|>). origin names the folder in messages.
 * MS_ERR_FORMAT when a merge's parts or result are not in the vocabulary. */
MsStatus clip_tokenizer_init(ClipTokenizer *t, const char *const *tokens, const size_t *lens,
                             const int64_t *ids, int n, const char *merges, size_t merges_len,
                             const char *pad_token, const char *origin);
void clip_tokenizer_free(ClipTokenizer *t);
/* tokenizer.add_tokens([...]) (4.31): each new string gets the next id, unless it is
 * <|endoftext|> or already has one; *n_added (may be NULL) counts the new ids. */
MsStatus clip_tokenizer_add_tokens(ClipTokenizer *t, const char *const *tokens, int n, int *n_added);
int clip_tokenizer_find(const ClipTokenizer *t, const char *s, size_t len);   /* id or -1 */
/* Token ids of UTF-8 text without BOS/EOS/padding: *n_ids gets the count, at most cap ids are
 * written. MS_ERR_ARG for invalid UTF-8. */
MsStatus clip_tokenize_raw(const ClipTokenizer *t, const char *text, size_t len, int32_t *ids,
                           size_t cap, size_t *n_ids);
/* tokenizer(text, padding="max_length", max_length=max_len, truncation=True).input_ids:
 * BOS, the first max_len-2 ids, EOS, then pad_id up to max_len (77). */
MsStatus clip_tokenize(const ClipTokenizer *t, const char *text, size_t len, int32_t *ids, int max_len);

/* Text encoder: HF CLIPTextModel (transformers 4.31) -> last_hidden_state, any ClipTextConfig.
 *   x = token_embedding[ids] + position_embedding[0..T)
 *   per layer: h = x + out_proj(attn(q_proj(ln1(x)), k_proj(..), v_proj(..)))   causal, scale Dh^-0.5
 *              x = h + fc2(quick_gelu(fc1(ln2(h))))
 *   out = final_layer_norm(x)
 * ids >= vocab_size select rows of a separate table of new (added-token) embeddings, so the
 * frozen model table is never resized. LoRA (Mix-of-Show): on q/k/v/out_proj of every layer,
 * y = W x + b + alpha * up(down(x)), down (r, D), up (D, r); base weights are frozen. */
#define CLIP_MAX_LAYERS 48
typedef struct {
    const MsParam *q_w, *q_b;      /* text_model.encoder.layers.{l}.self_attn.q_proj.weight (D,D), .bias (D) */
    const MsParam *k_w, *k_b;      /* ...self_attn.k_proj */
    const MsParam *v_w, *v_b;      /* ...self_attn.v_proj */
    const MsParam *o_w, *o_b;      /* ...self_attn.out_proj */
    const MsParam *ln1_w, *ln1_b;  /* ...layer_norm1 (D) */
    const MsParam *fc1_w, *fc1_b;  /* ...mlp.fc1 (I,D), (I) */
    const MsParam *fc2_w, *fc2_b;  /* ...mlp.fc2 (D,I), (D) */
    const MsParam *ln2_w, *ln2_b;  /* ...layer_norm2 (D) */
} ClipLayerParams;
typedef struct {
    const MsParam *tok_emb;        /* text_model.embeddings.token_embedding.weight (V,D) */
    const MsParam *pos_emb;        /* text_model.embeddings.position_embedding.weight (P,D) */
    ClipLayerParams layers[CLIP_MAX_LAYERS];
    const MsParam *lnf_w, *lnf_b;  /* text_model.final_layer_norm (D) */
} ClipTextParams;
/* Parameters of a loaded `text` table (f32, or F16/BF16 converted when used into staging carved
 * from the activation arena; clip_text_sizes plans it; MS_ERR_ARG names a key without data). */
MsStatus clip_text_params(ClipTextParams *p, const MsParamTable *t, const ClipTextConfig *c);

/* LoRA of the text encoder; the same type holds gradients. proj 0..3 = q, k, v, out. */
enum { CLIP_Q = 0, CLIP_K, CLIP_V, CLIP_O };
typedef struct {
    int n_layers, rank, dim;
    float alpha;                               /* 1 in Mix-of-Show (no 1/rank factor) */
    float *down[CLIP_MAX_LAYERS][4];           /* ...self_attn.{q,k,v,out}_proj.lora_down.weight (r, D) */
    float *up[CLIP_MAX_LAYERS][4];             /* ...lora_up.weight (D, r) */
} ClipLora;
size_t clip_lora_numel(const ClipTextConfig *c, int rank);    /* 8 * layers * rank * D */
/* Points l into mem (clip_lora_numel floats, contiguous: layer, proj, down then up). */
void clip_lora_bind(ClipLora *l, float *mem, const ClipTextConfig *c, int rank, float alpha);

/* Activations. Training keeps per layer what backward needs (attention keeps out + lse only);
 * inference keeps one layer's buffers and reuses them. N = B*T rows. */
typedef struct {
    float *x;                    /* (N,D) layer input (residual stream) */
    float *ln1, *ln1_mean, *ln1_rstd;   /* (N,D), (N), (N) */
    float *q, *k, *v, *attn;     /* (N,D) projections and attention output */
    float *lse;                  /* (B,H,T) */
    float *u[4];                 /* (N,r) LoRA down outputs of q, k, v, out (NULL: rank 0) */
    float *h;                    /* (N,D) x + attention branch (layer_norm2 input) */
    float *ln2_mean, *ln2_rstd;  /* (N) */
    float *fc1;                  /* (N,I) fc1 output (quick_gelu input) */
} ClipLayerActs;
typedef struct {
    int B, T, rank, training, n_layers;
    int causal;                         /* 1: the text tower's causal mask (0: image tower) */
    MsActivation act;                   /* the MLP's activation (hidden_act) */
    ClipLayerActs l[CLIP_MAX_LAYERS];   /* inference: every entry is l[0] */
    float *xf, *lnf_mean, *lnf_rstd;    /* (N,D) final_layer_norm input, (N), (N) */
    float *out;                         /* (N,D) last_hidden_state */
    float *ln2, *gelu, *tmp;            /* scratch (N,D), (N,I), (N,D) */
    float *dx, *dt, *dq, *dk, *dv;      /* backward scratch (N,D) (training only) */
    float *dg, *df, *du;                /* (N,I), (N,I), (N,r) */
    MsWeightStage ws;                   /* f32 staging of 16-bit weights (carved here always) */
} ClipTextActs;
/* Bytes of arena the activations need (alignment included): plan, then allocate once. */
size_t clip_text_sizes(const ClipTextConfig *c, int B, int T, int rank, int training);
MsStatus clip_text_acts_alloc(ClipTextActs *a, Arena *ar, const ClipTextConfig *c, int B, int T,
                              int rank, int training);
/* training: the mode of the activations.
 *   CLIP_INFER            one layer's buffers, reused (no backward)
 *   CLIP_TRAIN_KEEP       every layer's activations kept: a->l[l] all valid after the forward
 *   CLIP_TRAIN_RECOMPUTE  only each layer's input a->l[l].x kept (the rest of a->l[l] is one set
 *                         that all layers share); clip_text_backward recomputes each layer from
 *                         it (one more forward, without fc2); gradients bit-identical to KEEP.
 *                         SD 1.5 at 16x77 rows, rank 4: KEEP 549 MiB, RECOMPUTE 150 MiB. */
enum { CLIP_INFER = 0, CLIP_TRAIN_KEEP = 1, CLIP_TRAIN_RECOMPUTE = 2 };
/* ids (B,T) in [0, vocab_size + n_new); new_emb (n_new, D) holds the rows of ids >= vocab_size.
 * lora NULL: plain model. Result in a->out (B,T,D). MS_ERR_ARG for an id out of range. */
MsStatus clip_text_forward(ClipTextActs *a, const ClipTextParams *p, const ClipLora *lora,
                           const int32_t *ids, const float *new_emb, int n_new, const ClipTextConfig *c);
/* Gradients of a training-mode forward, ACCUMULATED: dlora (NULL: skipped) and dnew_emb (n_new, D)
 * (NULL: skipped; rows of ids < vocab_size get none: the model table is frozen). dout (B,T,D). */
void clip_text_backward(ClipLora *dlora, float *dnew_emb, const float *dout, ClipTextActs *a,
                        const ClipTextParams *p, const ClipLora *lora, const int32_t *ids, int n_new,
                        const ClipTextConfig *c);
/* Full-parameter training (issue 15): clip_text_backward, and in addition, when dp is not NULL,
 * the gradient of every parameter ACCUMULATED into dp: a ClipTextParams made by clip_text_params
 * from a gradient table in the weights' own layout (ms_param_table_text + ms_param_table_alloc,
 * f32, zeroed by the caller). Token-embedding rows of ids < vocab_size and position rows get
 * their gradients there (ids >= vocab_size still go to dnew_emb). Works with both training modes
 * (the weight gradients recompute fc1's and fc2's inputs; no extra activation memory).
 * MS_ERR_UNSUPPORTED when weights or gradients are not f32; MS_ERR_ARG for a mismatched dp. */
MsStatus clip_text_backward_full(ClipLora *dlora, float *dnew_emb, const ClipTextParams *dp, const float *dout,
                                 ClipTextActs *a, const ClipTextParams *p, const ClipLora *lora, const int32_t *ids,
                                 int n_new, const ClipTextConfig *c);

/* ---- CLIPModel: the image tower and the two projections (issue 15: the paper's CLIP metrics) ----
 * HF CLIPModel (modeling_clip.py, get_image_features / get_text_features; transformers 4.26 to 4.31
 * agree on all of it but the pooling rule below and LayerNorm eps, which 4.26 leaves at torch's 1e-5
 * whatever layer_norm_eps says; every CLIP checkpoint says 1e-5; we use the config's, as 4.31):
 *   image: patches = Conv2d(C, D, P, stride P, no bias)(pixels), flattened to (B, N, D), N = (S/P)^2
 *          x = [class_embedding; patches] + position_embedding[0..N]             (B, N+1, D)
 *          x = pre_layrnorm(x), then the encoder layers of the text tower without the causal mask,
 *          MLP activation hidden_act (quick_gelu or gelu); last_hidden_state = x
 *          pooled = post_layernorm(x[:, 0]);  image_embeds = visual_projection(pooled)  (no bias)
 *   text:  pooled = last_hidden_state[b, e_b] (after final_layer_norm), e_b = argmax(ids[b]) when
 *          eos_token_id == 2 (every config written before transformers PR #24773, 4.31), else the
 *          first position of eos_token_id;  text_embeds = text_projection(pooled)       (no bias)
 * The paper's image and text alignment are cosines of these embeddings. */
typedef struct {
    int hidden_size;                 /* 768 (ViT-B/32) */
    int intermediate_size;           /* 3072 */
    int num_hidden_layers;           /* 12 (0 allowed: the embeddings after pre_layrnorm) */
    int num_attention_heads;         /* 12 */
    int num_channels;                /* 3 */
    int image_size;                  /* 224 */
    int patch_size;                  /* 32 */
    MsActivation hidden_act;         /* quick_gelu */
    float layer_norm_eps;            /* 1e-5 */
} ClipVisionConfig;
typedef struct {
    ClipTextConfig text;             /* text_config (ViT-B/32: 512 wide, 8 heads, 12 layers) */
    ClipVisionConfig vision;         /* vision_config */
    int projection_dim;              /* 512 */
} ClipModelConfig;
/* transformers' CLIPConfig defaults, which are openai/clip-vit-base-patch32's values. */
void ms_clip_model_config_b32(ClipModelConfig *c);
MsStatus ms_clip_model_config_check(const ClipModelConfig *c);
/* Every tensor of a CLIPModel checkpoint: text_model.* (those of ms_param_table_text),
 * vision_model.*, visual_projection.weight, text_projection.weight, logit_scale, and the
 * optional position_ids buffers (models/weights.c). */
MsStatus ms_param_table_clip(const ClipModelConfig *c, MsParamTable *t);

typedef struct {
    const MsParam *patch_w;          /* vision_model.embeddings.patch_embedding.weight (D,C,P,P) */
    const MsParam *class_emb;        /* vision_model.embeddings.class_embedding (D) */
    const MsParam *pos_emb;          /* vision_model.embeddings.position_embedding.weight (N+1,D) */
    const MsParam *pre_w, *pre_b;    /* vision_model.pre_layrnorm (D) */
    ClipLayerParams layers[CLIP_MAX_LAYERS];   /* vision_model.encoder.layers.{l}.* */
    const MsParam *post_w, *post_b;  /* vision_model.post_layernorm (D) */
    const MsParam *proj;             /* visual_projection.weight (E,D) */
} ClipVisionParams;
/* The image tower's parameters of a loaded CLIPModel table (f32 only: MS_ERR_UNSUPPORTED for
 * 16-bit data; MS_ERR_ARG names a missing key). */
MsStatus clip_vision_params(ClipVisionParams *p, const MsParamTable *t, const ClipModelConfig *c);
typedef struct {
    int B, T;                        /* images, tokens per image (N + 1) */
    ClipTextActs enc;                /* encoder activations (inference); enc.xf: last_hidden_state (B,T,D) */
    float *patches;                  /* (B*N, C*P*P) pixels of each patch in (c, ky, kx) order */
    float *x;                        /* (B*N, D) patch embeddings */
    float *cls;                      /* (B, D) x[:, 0] of the last layer */
    float *pooled;                   /* (B, D) pooler_output */
    float *embeds;                   /* (B, E) image_embeds */
} ClipVisionActs;
size_t clip_vision_sizes(const ClipModelConfig *c, int B);
MsStatus clip_vision_acts_alloc(ClipVisionActs *a, Arena *ar, const ClipModelConfig *c, int B);
/* pixels (B, C, S, S), as CLIPImageProcessor gives them -> a->enc.xf, a->pooled, a->embeds. */
MsStatus clip_vision_forward(ClipVisionActs *a, const ClipVisionParams *p, const float *pixels,
                             const ClipModelConfig *c);
/* After clip_text_forward (no LoRA) on ids (B,T) = a->B x a->T: pooled (B, D) (may be NULL) and
 * text_embeds (B, E) through proj = text_projection.weight (E, D), f32. */
MsStatus clip_text_project(float *pooled, float *embeds, const ClipTextActs *a, const MsParam *proj,
                           const int32_t *ids, const ClipModelConfig *c);

/* ==========================================================================================
 * Models: UNet2DConditionModel, forward and backward (models/unet.c)
 * ======================================================================================== */
/* diffusers 0.19.3 UNet2DConditionModel (unet_2d_condition.py, unet_2d_blocks.py, resnet.py,
 * transformer_2d.py, attention.py, attention_processor.py AttnProcessor, embeddings.py) for the
 * SD 1.x family: any UNetConfig that ms_unet_config_check accepts with a UNetMidBlock2DCrossAttn,
 * any batch N and latent size (non-square, sizes not divisible by 2^levels as diffusers does
 * with forward_upsample_size), context length Tk.
 *
 * Usage:
 *   UNetParams p;   unet_params_init(&p, &model.unet_config, &model.unet);      (pointers, once)
 *   UNetSizes s;    unet_sizes(cfg, N, h, w, Tk, training, &s);                (plan)
 *   arena_init(&acts, s.acts_bytes); arena_init(&scratch, s.scratch_bytes);   (allocate once)
 *   UNetActs a;     unet_acts_init(&a, cfg, N, h, w, Tk, training, &acts, &scratch);
 *   loop: unet_forward(eps, &a, latent, t, ctx, NULL, NULL, &p, lora);
 *         (training) zero grads; unet_backward(&a, &p, lora, dlora, deps, dctx, NULL);
 * Inference (training = 0) keeps only the skip connections and reuses every other buffer;
 * training keeps what backward needs (see unet.c: LayerNorm/GroupNorm/SiLU outputs and LoRA
 * intermediates are recomputed in backward, attention keeps q, k, v, out and lse only).
 *
 * Cross-attention layers are numbered in the order Mix-of-Show uses for layer-wise (P+)
 * embeddings: down blocks, mid block, up blocks (16 in SD 1.x). Attention modules (for LoRA)
 * are numbered 2*b (attn1, self) and 2*b + 1 (attn2, cross) for BasicTransformerBlock b in the
 * same order, so cross-attention layer i is attention module 2*i + 1. */

/* ResnetBlock2D: out = (shortcut(x) + conv2(silu(norm2(conv1(silu(norm1(x))) + temb_proj(silu(temb))))))
 *                      / output_scale_factor.  <p> = "down_blocks.0.resnets.0." etc. */
typedef struct {
    const MsParam *norm1_w, *norm1_b;     /* <p>norm1.weight, .bias (Cin) */
    const MsParam *conv1_w, *conv1_b;     /* <p>conv1.weight (Co,Cin,3,3), .bias (Co) */
    const MsParam *temb_w, *temb_b;       /* <p>time_emb_proj.weight (Co,E), .bias (Co) */
    const MsParam *norm2_w, *norm2_b;     /* <p>norm2.weight, .bias (Co) */
    const MsParam *conv2_w, *conv2_b;     /* <p>conv2.weight (Co,Co,3,3), .bias (Co) */
    const MsParam *short_w, *short_b;     /* <p>conv_shortcut.weight (Co,Cin,1,1), .bias; NULL if Cin == Co */
    int cin, cout;
    float out_scale;                    /* output_scale_factor: mid_block_scale_factor in the mid block, else 1 */
    MsWeightStage ws;                   /* a copy of UNetParams.ws (16-bit tables) */
} UNetResnetParams;

/* attention_processor.Attention: to_q/to_k/to_v without bias, to_out.0 with. <a> = "<b>attn1." */
typedef struct {
    const MsParam *q_w;                   /* <a>to_q.weight (C,C) */
    const MsParam *k_w, *v_w;             /* <a>to_k.weight, to_v.weight (C,Dc): Dc = C (attn1) or cross_attention_dim */
    const MsParam *o_w, *o_b;             /* <a>to_out.0.weight (C,C), .bias (C) */
    MsWeightStage ws;                   /* a copy of UNetParams.ws */
} UNetAttnParams;

/* BasicTransformerBlock. <b> = "<t>transformer_blocks.k." */
typedef struct {
    const MsParam *norm1_w, *norm1_b;     /* <b>norm1 (C) LayerNorm eps 1e-5 */
    UNetAttnParams attn1;               /* <b>attn1. (self) */
    const MsParam *norm2_w, *norm2_b;     /* <b>norm2 (C) */
    UNetAttnParams attn2;               /* <b>attn2. (cross) */
    const MsParam *norm3_w, *norm3_b;     /* <b>norm3 (C) */
    const MsParam *ff1_w, *ff1_b;         /* <b>ff.net.0.proj.weight (8C,C), .bias (8C): GEGLU */
    const MsParam *ff2_w, *ff2_b;         /* <b>ff.net.2.weight (C,4C), .bias (C) */
    char name[MS_KEY_MAX];              /* "<b>" without the trailing dot, for LoRA keys */
    MsWeightStage ws;                   /* a copy of UNetParams.ws */
} UNetBlockParams;

/* Transformer2DModel (continuous input). <t> = "down_blocks.0.attentions.0." etc. */
typedef struct {
    const MsParam *norm_w, *norm_b;       /* <t>norm (C) GroupNorm, eps 1e-6 */
    const MsParam *proj_in_w, *proj_in_b; /* <t>proj_in.weight (C,C,1,1) or (C,C) with use_linear_projection */
    const MsParam *proj_out_w, *proj_out_b; /* <t>proj_out.weight, .bias */
    int C, heads, n_layers;             /* channels, heads (head dim C/heads), transformer_blocks */
    int first_block;                    /* index of its transformer_blocks.0 in UNetParams.blk */
    MsWeightStage ws;                   /* a copy of UNetParams.ws */
} UNetTransformerParams;

/* Every parameter of the UNet, looked up once (pointers into MsModel.unet, f32 or F16/BF16;
 * 16-bit weights are converted when used into `ws`, which unet_params_init allocates only
 * for a 16-bit table: one UNetParams then runs on one thread at a time). Layers are stored in forward order: resnets down (block i, layer j), mid 0,
 * mid 1, up (block i, layer j); transformers down, mid, up; blk[] the BasicTransformerBlocks. */
typedef struct {
    UNetConfig cfg;
    const MsParam *conv_in_w, *conv_in_b;   /* conv_in.weight (C0,in,k,k), .bias */
    const MsParam *time1_w, *time1_b;       /* time_embedding.linear_1.weight (E,C0), .bias */
    const MsParam *time2_w, *time2_b;       /* time_embedding.linear_2.weight (E,E), .bias */
    const MsParam *down_w[MS_MAX_BLOCKS], *down_b[MS_MAX_BLOCKS]; /* down_blocks.i.downsamplers.0.conv (C,C,3,3) */
    const MsParam *up_w[MS_MAX_BLOCKS], *up_b[MS_MAX_BLOCKS];     /* up_blocks.i.upsamplers.0.conv (C,C,3,3) */
    const MsParam *norm_out_w, *norm_out_b; /* conv_norm_out (C0) GroupNorm eps norm_eps */
    const MsParam *conv_out_w, *conv_out_b; /* conv_out.weight (out,C0,k,k), .bias */
    UNetResnetParams *res;                /* n_res */
    UNetTransformerParams *tf;            /* n_tf */
    UNetBlockParams *blk;                 /* n_blk (= cross-attention layers) */
    int n_res, n_tf, n_blk;
    void *mem;                            /* the three arrays (one malloc) */
    MsWeightStage ws;                     /* 16-bit tables: f32 staging (ms_weight_f32), owned here;
                                           * every sub-struct holds a copy of these pointers */
} UNetParams;

/* MS_ERR_ARG naming the key when a parameter is missing or holds no data; MS_ERR_UNSUPPORTED
 * for a config without UNetMidBlock2DCrossAttn. */
MsStatus unet_params_init(UNetParams *p, const UNetConfig *c, const MsParamTable *t);
void unet_params_free(UNetParams *p);

/* LoRA on to_q, to_k, to_v, to_out.0 of every attention module (Mix-of-Show LoRALinearLayer):
 *   y = W x (+ b) + alpha * up(down(x)),  down (r, in), up (out, r), no 1/r factor.
 * The same type holds gradients. All floats are contiguous in `data` (one flat optimizer loop). */
typedef struct {
    float *down;        /* (rank, in)   <module>.lora_down.weight */
    float *up;          /* (out, rank)  <module>.lora_up.weight */
    int in, out;
} UNetLoraLinear;
typedef struct {
    int n_attn;         /* 2 * number of BasicTransformerBlocks (32 in SD 1.x) */
    int rank;
    float alpha;
    UNetLoraLinear *lin; /* (n_attn * 4): lin[4a + 0..3] = to_q, to_k, to_v, to_out.0 of module a */
    float *data;        /* n_floats: every down then up, module by module */
    size_t n_floats;
} UNetLora;
size_t unet_lora_floats(const UNetConfig *c, int rank);
/* Carves lin[] and data from `train` (zeroed). MS_ERR_NOMEM when it does not fit. */
MsStatus unet_lora_init(UNetLora *l, const UNetParams *p, int rank, float alpha, Arena *train);
/* "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q" for lin[4a + which]. */
void unet_lora_module_name(const UNetParams *p, int a, int which, char *buf, size_t cap);

/* Activations. Saved fields are kept per layer in training mode; in inference mode they point
 * into shared scratch and are overwritten by the next layer. */
/* ---- regional cross-attention (helper "regional") ----
 * Mix-of-Show pipeline_regionally_t2iadapter.py RegionT2I_AttnProcessor in every attn2 layer:
 *   o = softmax(q k^T * scale) v            global attention (all queries, the layer's context)
 *   per layer the box [t, l, b, r] (fractions of the image) covers rows ceil(t*fh) .. floor(b*fh)-1
 *   and columns ceil(l*fw) .. floor(r*fw)-1 of the fh x fw query grid; cnt(pixel) = boxes over it;
 *   inside any box: o = sum over regions, in order, of softmax(q_box k_r^T * scale) v_r / cnt,
 *   with k_r, v_r from region r's context (its keys and values). The official code also attends
 *   each region with its box's queries only, but computes the global attention for every query
 *   and then overwrites the boxes; here the global attention skips queries inside boxes.
 * Then to_out as usual. Both CFG halves: sample n of the batch uses row n of each region context. */
typedef struct UNetRegions {
    int n;                           /* regions (>= 1) */
    const double (*box)[4];          /* (n) top, left, bottom, right as fractions of the image size */
    int n_layer_ctx;                 /* 0: ctx[r] serves every layer; else ms_unet_cross_attn_layers() */
    const float *const *ctx;         /* region r, layer i: ctx[r * n_layer_ctx + i] (or ctx[r]), (N,Tk,D) */
    float *work;                     /* unet_regions_work_floats() floats */
} UNetRegions;
/* Floats of UNetRegions.work for batch N, latent h x w, context length Tk. */
size_t unet_regions_work_floats(const UNetConfig *c, int N, int h, int w, int Tk);
/* (top, left, bottom, right) fractions -> rows [*r0, *r1), columns [*c0, *c1) of an fh x fw grid,
 * math.ceil(t * fh), math.ceil(l * fw), math.floor(b * fh), math.floor(r * fw), clamped to the
 * grid as Python slicing does (empty when r1 <= r0 or c1 <= c0). */
void unet_region_rows(const double box[4], int fh, int fw, int *r0, int *c0, int *r1, int *c1);

typedef struct {            /* ResnetBlock2D */
    const float *x;         /* (N,Cin,H,W) input (a buffer of some other layer) */
    float *h1;              /* (N,Co,H,W) conv1(silu(norm1 x)) + temb_proj */
    float *mean1, *rstd1;   /* (N,G) norm1 statistics */
    float *mean2, *rstd2;   /* (N,G) norm2 statistics */
    float *out;             /* (N,Co,H,W) */
    int H, W;
} UNetResnetActs;
typedef struct {            /* Attention */
    float *q, *o;           /* (N,Tq,C) to_q output, attention output (input of to_out.0) */
    float *k, *v;           /* (N,Tk,C) */
    float *lse;             /* (N,heads,Tq) log-sum-exp of the scaled logits */
} UNetAttnActs;
typedef struct {            /* BasicTransformerBlock */
    const float *x;         /* (N,T,C) input */
    float *h1, *h2;         /* (N,T,C) x + attn1, h1 + attn2 */
    float *mean[3], *rstd[3]; /* (N*T) norm1..3 statistics */
    UNetAttnActs a1, a2;
    float *g;               /* (N,T,8C) ff.net.0.proj output (GEGLU input); shared scratch, not
                             * kept: training recomputes it in backward */
    float *out;             /* (N,T,C) h2 + ff */
} UNetBlockActs;
typedef struct {            /* Transformer2DModel */
    const float *x;         /* (N,C,H,W) input */
    float *mean, *rstd;     /* (N,G) norm statistics */
    float *tok;             /* (N,HW,C) proj_in output */
    float *out;             /* (N,C,H,W) */
    int H, W;
} UNetTfActs;

typedef struct {
    size_t acts_bytes;      /* arena bytes for unet_acts_init's `acts` (all alignment included) */
    size_t scratch_bytes;   /* ... and for `scratch` */
} UNetSizes;

typedef struct UNetActs {
    UNetConfig cfg;
    int N, H, W, Tk, training;
    int lh[MS_MAX_BLOCKS], lw[MS_MAX_BLOCKS];   /* latent size at each level */
    int n_skip;
    float *temb;            /* (N,E) silu(time_embedding(t)): what every resnet projects */
    float *x0;              /* (N,C0,H,W) conv_in output */
    float **skip;           /* n_skip: diffusers' down_block_res_samples, in push order */
    float *down_out[MS_MAX_BLOCKS];  /* (N,C_i,..) output of down block i (after the downsampler) */
    float *mid_out;                  /* (N,C_{n-1},..) */
    float *up_out[MS_MAX_BLOCKS];    /* output of up block i (after the upsampler); up_out[n-1] is
                                      * the input of conv_norm_out (stats in out_mean/out_rstd) */
    float *out_mean, *out_rstd;      /* (N,G) conv_norm_out statistics */
    float **cat;                     /* per up resnet: (N,Ch+Cs,H,W) torch.cat([h, skip], 1) */
    UNetResnetActs *res;
    UNetTfActs *tf;
    UNetBlockActs *blk;
    /* what the last forward was given (backward reads them; unet_backward_full also xin, tin) */
    const float *ctx;
    const float *const *layer_ctx;
    const float *xin, *tin;          /* (N,in,h,w) latent, (N) timesteps */
    /* shared scratch (see unet.c) */
    float *sx[3], *st[3], *sq, *sk, *sv, *so, *sf0, *sf1, *su, *sdu, *stime, *sstat[4], *rot[3];
    float *sg;                       /* training: (N,HW,8C) GEGLU input, recomputed in backward */
    size_t ff_chunk;                 /* inference: floats of the GEGLU input per chunk of rows (0: all) */
    float **dskip;                   /* training: gradient of each skip tensor */
    void *mem;                       /* res, tf, blk, skip, cat, dskip arrays (one malloc) */
    /* Attention probe (Mix-of-Show's attention regularisation, trainer_edlora.py cal_attn_reg),
     * set by the caller after unet_acts_init (which zeroes it: off); training mode only.
     * When probe_ncol > 0, unet_forward writes for every cross-attention layer l with probe[l]:
     *   probe[l] (N, heads_l, h_l*w_l, ncol) = the attn2 softmax at key positions probe_cols
     *   (diffusers' attention_probs (N*heads, h*w, Tk) of that layer, [:, :, cols[n]] per sample)
     * and unet_backward adds dL/dprobe[l] = dprobe[l] (same shape; NULL array or entry: none)
     * into that layer's q and k gradients, so dlora, dctx and dlayer_ctx include it. */
    int probe_ncol;
    const int32_t *probe_cols;       /* (N, probe_ncol) key positions in [0, Tk); kept until backward */
    float *const *probe;             /* ms_unet_cross_attn_layers() entries (NULL entries skipped) */
    const float *const *dprobe;      /* the same shapes; read by unet_backward */
    /* T2I-Adapter training, set by the caller after unet_acts_init (which zeroes it: off): NULL or
     * n_blocks pointers (NULL entries: not wanted); unet_backward ACCUMULATES into dadapter[i]
     * dL/d(adapter residual i), the shape unet_forward's adapter[i] has: the gradient arriving
     * where the residual was added (whether or not the forward had one). Training mode only. */
    float *const *dadapter;
    /* Regionally controllable sampling (Mix-of-Show RegionT2I_AttnProcessor), inference mode
     * only; NULL (unet_acts_init's value): plain cross-attention. See UNetRegions. */
    const struct UNetRegions *regions;
    /* Gradient fusion's recorder (mixshow.c, gradient fusion), inference or training; NULL (unet_acts_init's
     * value): off. In every BasicTransformerBlock `block` (0.. in named_modules order) it is
     * handed the input rows x (rows = N*h*w, C) of the attention Linears: which 0 = norm1
     * output (attn1.to_q/to_k/to_v), 1 = attn1's attention output (attn1.to_out.0), 2 = norm2
     * output (attn2.to_q), 3 = attn2's attention output (attn2.to_out.0). x is valid only
     * during the call. */
    void (*record)(void *ctx, int block, int which, const float *x, size_t rows, int C);
    void *record_ctx;
    /* Batch parts (issue 14), inference only; 0 (unet_acts_init's value): off. When set by the
     * caller, and the team has T >= 2 threads (ms_task_team) with N % T == 0, unet_forward runs
     * the batch as T parts of N/T samples side by side, one per thread (ms_run_tasks): each
     * thread's data stays in its own core's caches and the whole step forks once. eps is bit
     * for bit the batched forward's; the activation fields above are then not the batch's (the
     * parts' activations share their memory). Regions too (UNetRegions.work is sized for the
     * parts by unet_regions_work_floats). Not with record or 16-bit weights. */
    int split;
    /* internal (unet.c): the parts' activations, laid out in this layout's arena ranges */
    int nparts, is_part;
    struct UNetActs *parts;
    void *parts_mem;
    unsigned char *range[2];         /* acts, scratch: where this layout starts, */
    size_t range_len[2];             /* and the bytes it reserved there (the parts' need included) */
} UNetActs;

/* Peak-memory knobs of the forward (bit-identical results at any setting): 16-bit weights are
 * staged stage_floats at a time (whole rows), the feed-forward runs ff_floats of its GEGLU input
 * at a time (inference; read when activations are planned/initialised). 0: the defaults, 8Mi
 * and 6Mi floats (32 and 24 MiB). Tests force tiny values; not for use while a UNet runs. */
void unet_set_chunks(size_t stage_floats, size_t ff_floats);
/* Plans arena sizes for batch N, latent h x w, context length Tk; training 0 or 1. */
MsStatus unet_sizes(const UNetConfig *c, int N, int h, int w, int Tk, int training, UNetSizes *s);
/* Carves every buffer from the two arenas (sizes from unet_sizes). */
MsStatus unet_acts_init(UNetActs *a, const UNetConfig *c, int N, int h, int w, int Tk, int training,
                        Arena *acts, Arena *scratch);
void unet_acts_free(UNetActs *a);   /* the malloc'ed arrays; the arenas belong to the caller */
/* Shape of cross-attention layer `layer`'s probe: (N, *heads, *h * *w, probe_ncol), h x w the
 * latent size at its level. MS_ERR_ARG for a layer outside [0, ms_unet_cross_attn_layers()). */
MsStatus unet_probe_shape(const UNetActs *a, int layer, int *heads, int *h, int *w);

/* eps (N,out,h,w) = UNet(x (N,in,h,w), t (N) float timesteps, context).
 * ctx (N,Tk,D) serves every cross-attention layer, unless layer_ctx (an array of
 * ms_unet_cross_attn_layers() pointers, each (N,Tk,D)) is given: layer i then uses layer_ctx[i].
 * adapter: NULL, or n_blocks pointers (NULL entries allowed) of T2I-Adapter features, added as
 * diffusers 0.19.3 does with down_block_additional_residuals and no mid residual: for a
 * CrossAttnDownBlock2D to the output of its last resnet+attention, before the downsampler (so
 * the skip connection sees it), shape (N,C_i,lh[i],lw[i]); for a DownBlock2D to the block's
 * output (after its downsampler if it has one; in place, so its last skip sees it too).
 * lora: NULL or adapters on every attention. The pointers ctx/layer_ctx must stay valid until
 * unet_backward. MS_ERR_ARG on a NULL context. */
MsStatus unet_forward(float *eps, UNetActs *a, const float *x, const float *t, const float *ctx,
                      const float *const *layer_ctx, const float *const *adapter,
                      const UNetParams *p, const UNetLora *lora);
/* After a training-mode unet_forward: given deps = dL/deps (N,out,h,w), ACCUMULATES
 *   dctx (N,Tk,D)           += dL/dctx (summed over the layers that used ctx), or
 *   dlayer_ctx[i] (N,Tk,D)  += dL/dlayer_ctx[i] when the forward had layer_ctx,
 *   dlora                   += dL/d(down, up) (same rank as lora; NULL: not wanted).
 * Any of them may be NULL. Base weights are frozen (no weight gradients); the latent and the
 * timestep get no gradient. */
MsStatus unet_backward(UNetActs *a, const UNetParams *p, const UNetLora *lora, UNetLora *dlora,
                       const float *deps, float *dctx, float *const *dlayer_ctx);
/* Full-parameter training (issue 15): unet_backward, and in addition, when dp is not NULL, the
 * gradient of every base parameter ACCUMULATED (+=) into dp: a UNetParams of the same config made
 * by unet_params_init from a gradient table in the weights' own layout (ms_param_table_unet +
 * ms_param_table_alloc, all f32, zeroed by the caller), so gradient k sits where weight k sits.
 * The same code as unet_backward (which is this with dp NULL): the weight gradients read what the
 * LoRA path keeps (layer inputs, h1, tokens, q/k/v/o/lse, statistics) and recompute the rest (norm
 * and SiLU outputs, GEGLU(g), the resized upsampler input, the time MLP); no extra activation
 * memory beyond a few (N,E) time buffers in the scratch. The latent x and timesteps t given to
 * unet_forward must still be valid. MS_ERR_UNSUPPORTED when the weights or gradients are not f32. */
MsStatus unet_backward_full(UNetActs *a, const UNetParams *p, const UNetLora *lora, UNetLora *dlora,
                            const UNetParams *dp, const float *deps, float *dctx, float *const *dlayer_ctx);

/* The one place every cross-attention (attn2) goes through, so that regionally controllable
 * sampling can replace it: y (N,T,C) = Attention(x (N,T,C) queries at h*w pixels in row-major
 * order, ctx (N,Tk,Dc)) of cross-attention layer `layer`. Saves q, k, v, o (and lse when not
 * NULL) in sv. With reg (inference only), the regional attention above. */
void unet_cross_attention(float *y, UNetAttnActs *sv, const float *x, const float *ctx,
                          const UNetAttnParams *p, const UNetLoraLinear *lora, float alpha, int rank,
                          float *u, int N, int h, int w, int Tk, int C, int Dc, int heads, int layer,
                          const UNetRegions *reg);   /* NULL: plain attention */

/* ==========================================================================================
 * Models: the alignment stand-ins of `mixshow eval` (models/evalnet.c; issue 15)
 * ======================================================================================== */
/* Two small encoders trained in C on the procedural world, in place of the paper's CLIP metrics
 * (Mix-of-Show, arXiv:2305.18292v2, Sec. 5: text alignment = CLIP image-text cosine; image
 * alignment = CLIP image-image cosine to the concept's reference images):
 *   image trunk   conv_in 3x3 -> units (GroupNorm, SiLU, conv 3x3 stride 1 or 2) -> GroupNorm,
 *                 SiLU -> average pooling (2x2 steps) to text_pool x text_pool cells
 *   text head     flatten the cells (C*P*P) -> linear (no bias) -> E   (the cells keep "where")
 *   identity head the cells averaged to one (global average pool, C) -> linear -> id_dim
 *   text tower    CLIP text encoder (real BPE tokenizer, max_position_embeddings tokens), the
 *                 final-LayerNorm state at the first EOS -> text_projection (E, D), no bias
 * Embeddings are compared after L2 normalisation (cosine). Training (evalnet_train_step):
 * CLIP's symmetric InfoNCE with a learned temperature (Radford et al. 2021) between the text
 * head and the text tower, plus supervised contrastive loss (Khosla et al. 2020, L^sup_out,
 * temperature 0.1) on the identity head over renders of world characters. Units per level:
 * `layers` stride-1 units (c_i -> c_i), then one stride-2 unit to the next level (c_i -> c_i+1). */
#define EVAL_MAX_UNITS 40
typedef struct {
    int size;                        /* input side in pixels (64); images are resized to it */
    int n_levels;                    /* resolution levels (4); the last map is size >> (n_levels-1) */
    int channels[MS_MAX_BLOCKS];     /* per level (16, 32, 64, 128) */
    int layers;                      /* stride-1 units per level (0) */
    int groups;                      /* GroupNorm groups (8; divides every channel count) */
    int text_pool;                   /* P: cells per side of the text head (4; a power of 2) */
    int embed_dim;                   /* E: the joint image-text space (64) */
    int id_dim;                      /* the identity space (64) */
    ClipTextConfig text;             /* the text tower; max_position_embeddings = tokens (32) */
} EvalNetConfig;
void evalnet_config_default(EvalNetConfig *c);
MsStatus evalnet_config_check(const EvalNetConfig *c);   /* MS_ERR_ARG naming the field */
typedef struct { int level, j, cin, cout, stride, hin; } EvalUnit;   /* image.down.{level}.{j}; hin: input side */
int evalnet_units(const EvalNetConfig *c, EvalUnit *u);    /* fills u[EVAL_MAX_UNITS], returns count */

/* Parameters: `net` holds the image trunk, both heads, text_projection and logit_scale under
 * the names of ms_param_table_evalnet ("image.conv_in.weight", "image.down.{i}.{j}.norm.weight",
 * "image.down.{i}.{j}.conv.weight", "image.norm_out.weight", "image.text_proj.weight",
 * "image.id_proj.weight", "text_projection.weight", "logit_scale"); `text` is a CLIP text table
 * (ms_param_table_text). Both f32 in one block each. A gradient table of the same layout binds
 * to the same struct. */
MsStatus ms_param_table_evalnet(const EvalNetConfig *c, MsParamTable *t);
typedef struct {
    float *conv_in_w, *conv_in_b;                  /* image.conv_in (c0,3,3,3), (c0) */
    float *norm_w[EVAL_MAX_UNITS], *norm_b[EVAL_MAX_UNITS];   /* image.down.{i}.{j}.norm (cin) */
    float *conv_w[EVAL_MAX_UNITS], *conv_b[EVAL_MAX_UNITS];   /* image.down.{i}.{j}.conv (cout,cin,3,3) */
    float *norm_out_w, *norm_out_b;                /* image.norm_out (C) */
    float *text_proj_w;                            /* image.text_proj (E, C*P*P) */
    float *id_proj_w;                              /* image.id_proj (id_dim, C) */
    float *text_projection_w;                      /* text_projection (E, D) */
    float *logit_scale;                            /* (1): log of the inverse temperature */
} EvalNetParams;
MsStatus evalnet_params_bind(EvalNetParams *p, const MsParamTable *t, const EvalNetConfig *c);

/* Image-trunk activations for N images (training keeps every unit's input and norm output; the
 * SiLU outputs are recomputed in backward). Plan with evalnet_image_sizes, then allocate once. */
typedef struct {
    int N, n_units;
    EvalUnit u[EVAL_MAX_UNITS];
    float *x[EVAL_MAX_UNITS + 1];      /* x[0] conv_in output, x[k+1] unit k output (N,C,h,h) */
    float *nrm[EVAL_MAX_UNITS + 1];    /* GroupNorm outputs (N,C,h,h); [n_units]: norm_out */
    float *mean[EVAL_MAX_UNITS + 1], *rstd[EVAL_MAX_UNITS + 1];   /* (N,G) */
    float *pool[MS_MAX_BLOCKS + 8];    /* pool[0] SiLU(norm_out) (N,C,h,h), pool[k] side h>>k */
    float *dpool[MS_MAX_BLOCKS + 8];   /* their gradients (backward) */
    int n_pool, id_pool;               /* pool[n_pool] side P (text head), pool[id_pool] side 1 */
    float *temb, *iemb;                /* (N,E), (N,id_dim) head outputs, not normalised */
    float *s, *d0, *d1;                /* scratch: SiLU recompute and gradients, the largest map */
} EvalImageActs;
size_t evalnet_image_sizes(const EvalNetConfig *c, int N);
MsStatus evalnet_image_acts_alloc(EvalImageActs *a, Arena *ar, const EvalNetConfig *c, int N);
/* img (N,3,size,size) in [-1, 1] -> a->temb, a->iemb. */
void evalnet_image_forward(EvalImageActs *a, const EvalNetParams *p, const float *img, const EvalNetConfig *c);
/* ACCUMULATES into dp (every trunk and head tensor) given dtemb (N,E) and diemb (N,id_dim)
 * (either may be NULL: no gradient from that head). */
void evalnet_image_backward(const EvalNetParams *dp, const float *dtemb, const float *diemb, EvalImageActs *a,
                            const EvalNetParams *p, const float *img, const EvalNetConfig *c);
/* The text tower's pooled output: row b of out (B,T,D) at the first EOS of ids (B,T) (the
 * last position when there is none) -> pooled (B,D); backward scatters dpooled into dout. */
void evalnet_text_pool_forward(float *pooled, const float *out, const int32_t *ids, int eos_id, int B, int T, int D);
void evalnet_text_pool_backward(float *dout, const float *dpooled, const int32_t *ids, int eos_id, int B, int T, int D);

/* Losses (forward in double; backward ACCUMULATES, scaled by dloss; work: caller's doubles,
 * 3 B*B for the CLIP loss, N*N + N for the supervised contrastive loss):
 * L2 normalisation of rows: y = x / max(||x||, 1e-12), x (N,D); backward
 *   dx += (dy - y (y . dy)) / ||x||. */
void l2norm_forward(float *y, float *norm, const float *x, int N, int D);     /* norm (N) saved */
void l2norm_backward(float *dx, const float *dy, const float *y, const float *norm, int N, int D);
/* CLIP loss: u (B,E) image and v (B,E) text embeddings, unit rows; s = exp(logit_scale);
 *   l_ij = s u_i . v_j,  L = (1/2B) sum_i [ -log softmax_j(l_i.)_i - log softmax_j(l_.i)_i ]
 * backward: g_ij = (softmax_row_ij + softmax_col_ij - 2 [i == j]) / 2B
 *   du_i += s sum_j g_ij v_j,  dv_j += s sum_i g_ij u_i,  dlogit_scale += sum_ij g_ij l_ij.
 * *correct (may be NULL): rows whose largest l_ij is on the diagonal (image -> text top-1). */
double clip_loss_forward(const float *u, const float *v, float logit_scale, int B, int E, int *correct, double *work);
void clip_loss_backward(float *du, float *dv, float *dlogit_scale, const float *u, const float *v, float logit_scale,
                        int B, int E, float dloss, double *work);
/* Supervised contrastive loss (Khosla et al. 2020, Eq. 2, L^sup_out) on unit rows z (N,E) with
 * labels (N), temperature tau: for anchors i with positives P(i) = {p != i: label p == label i},
 *   L = (1/|A|) sum_{i in A} -1/|P(i)| sum_{p in P(i)} log( exp(z_i.z_p/tau) / sum_{a != i} exp(z_i.z_a/tau) )
 * (A: anchors with at least one positive). backward with q_ia = softmax_{a != i}(z_i.z_a / tau):
 *   g_ia = (q_ia - [a in P(i)] / |P(i)|) / |A|,  dz_i += g_ia z_a / tau,  dz_a += g_ia z_i / tau. */
double supcon_loss_forward(const float *z, const int *labels, float tau, int N, int E, double *work);
void supcon_loss_backward(float *dz, const float *z, const int *labels, float tau, int N, int E, float dloss,
                          double *work);

/* The encoders: configs, tables and their bound parameters (f32). */
typedef struct {
    EvalNetConfig cfg;
    MsParamTable net, text;
    EvalNetParams p;
    ClipTextParams tp;
} EvalNet;
MsStatus evalnet_create(EvalNet *e, const EvalNetConfig *c);   /* tables allocated and zeroed */
void evalnet_free(EvalNet *e);
/* Unit-length embeddings for inference: images (N,3,size,size) in [-1,1] -> temb (N,E), iemb
 * (N,id_dim) (either may be NULL); texts (N) -> tvec (N,E). Batches of any N (planned inside). */
MsStatus evalnet_embed_images(const EvalNet *e, const float *img, int N, float *temb, float *iemb);
MsStatus evalnet_embed_texts(const EvalNet *e, const ClipTokenizer *tok, const char *const *texts, int N, float *tvec);

/* Training: each step takes Bt captioned images (CLIP loss) followed by Bi images of
 * characters with identity labels (supervised contrastive), one trunk pass for all of them;
 * loss = clip + supcon; AdamW (torch's, ms_adamw_step) over each table's block as one flat
 * loop, lr warmed up linearly over `warmup` steps; logit_scale clamped to [0, ln 100] as CLIP. */
typedef struct {
    double lr;                      /* 2e-3 */
    int64_t warmup;                 /* 50 */
    double weight_decay;            /* 0.01 */
    double beta1, beta2, adam_eps;  /* 0.9, 0.999, 1e-8 */
    float tau;                      /* supervised contrastive temperature (0.1) */
    double token_max_norm;          /* > 0: after each update, token rows longer than this are scaled
                                     * back to it (0: none) */
} EvalTrainConfig;
void evalnet_train_config_default(EvalTrainConfig *c);
/* token_max_norm's constraint on a token table (V, D) (models/evalnet.c says why) */
void evalnet_token_max_norm(float *tok, int V, int D, double x);
typedef struct {
    double loss, clip, supcon, lr;  /* before the update */
    int clip_correct;               /* image -> text top-1 hits within the batch (of Bt) */
    float temperature;              /* 1 / exp(logit_scale) after the update */
} EvalStepReport;
typedef struct EvalTrainer EvalTrainer;
MsStatus evalnet_trainer_create(EvalTrainer **out, EvalNet *e, const ClipTokenizer *tok, const EvalTrainConfig *c,
                                int Bt, int Bi);
/* images ((Bt+Bi),3,size,size) in [-1,1]; captions (Bt); labels (Bi). */
MsStatus evalnet_train_step(EvalTrainer *t, const float *images, const char *const *captions, const int *labels,
                            EvalStepReport *rep);
int64_t evalnet_trainer_step_count(const EvalTrainer *t);
void evalnet_trainer_set_step(EvalTrainer *t, int64_t step);
/* AdamW moments, n floats each (net block, then text block), for checkpoints. */
void evalnet_trainer_moments(EvalTrainer *t, float **m, float **v, size_t *n);
/* The last step's gradients, in the layouts of e->net and e->text (tests). */
void evalnet_trainer_grads(EvalTrainer *t, MsParamTable **net, MsParamTable **text);
void evalnet_trainer_free(EvalTrainer *t);

/* ==========================================================================================
 * The method (mixshow.c): text-to-image sampling; ED-LoRA, fusion and regional sampling to come
 * ======================================================================================== */
typedef struct {
    const char *prompt, *negative;   /* UTF-8; negative NULL: "" (diffusers' uncond_tokens) */
    int width, height;               /* pixels, multiples of 8 (diffusers: unet.sample_size * 8) */
    int steps;                       /* num_inference_steps */
    float guidance_scale;            /* CFG when > 1 (diffusers' do_classifier_free_guidance) */
    uint64_t seed;                   /* torch.Generator().manual_seed(seed) */
    MsSchedKind sampler;             /* built from the model's scheduler_config */
    MsTorchCpu torch_cpu;            /* which torch randn kernel to mirror (MS_TORCH_CPU_AVX2) */
    int batch;                       /* num_images_per_prompt, 1..64 */
    const float *init_noise;         /* (batch,4,h,w) instead of randn (still x init_noise_sigma); NULL */
    const AdapterParams *adapter;    /* T2I-Adapter or NULL */
    const float *cond;               /* (1,Cin,height,width) in [0,1] (preprocessed) */
    float adapter_scale;             /* adapter_conditioning_scale */
    /* called after each scheduler step with the latents (n floats); NULL: none */
    void (*progress)(void *ctx, int step, int n_steps, const float *latents, size_t n);
    void *progress_ctx;
    /* ED-LoRA sampling (Mix-of-Show EDLoRAPipeline; tools/edlora.c fills these from a file).
     * All 0/NULL: the plain pipeline above, bit for bit. */
    const float *new_emb;            /* (n_new, D) token-embedding rows of ids vocab_size.. (added tokens) */
    int n_new;
    int n_layer_ctx;                 /* 0: one context. Else ms_unet_cross_attn_layers(): the prompt is
                                      * bound n_layer_ctx times (bind_concept_prompt) and
                                      * cross-attention layer i gets the i-th encoding; the negative
                                      * prompt is encoded once, unbound, for every layer (as there) */
    int n_bind;                      /* concept words, replaced in this order */
    const char *const *bind_word;    /* (n_bind) "<potter1>" */
    const char *const *bind_token;   /* (n_bind * n_layer_ctx) token of word w for layer i at
                                      * [w * n_layer_ctx + i]: "<new0>".. */
    MsModel *release;                /* NULL, or the model m itself in a one-shot run (`mixshow
                                      * sample`): each network's weights are freed as soon as the
                                      * pipeline is done with them (the text encoder's once the prompts
                                      * are encoded, the UNet's before the VAE decode), so the peak
                                      * holds neither with the decode; m is then only good for
                                      * ms_model_free. Same image. */
} MsTxt2ImgOptions;
/* StableDiffusion(Adapter)Pipeline.__call__ of diffusers 0.19.3 up to the VAE decode:
 * image (batch,3,height,width), not clamped (what vae.decode returns). */
MsStatus ms_txt2img(const MsModel *m, const ClipTokenizer *tok, const MsTxt2ImgOptions *o, float *image);
/* VaeImageProcessor.postprocess + numpy_to_pil: img (C,H,W) -> out (H,W,C) uint8,
 * round(clamp(x / 2 + 0.5, 0, 1) * 255) in float32, round half to even (numpy). */
void ms_image_to_u8(uint8_t *out, const float *img, int C, int H, int W);

/* ==========================================================================================
 * The method: regionally controllable sampling (mixshow.c).
 * Mix-of-Show regionally_controlable_sampling.py + RegionallyT2IAdapterPipeline (commit 51270fd):
 * a global prompt and per region a prompt, a negative prompt and a box; every cross-attention
 * layer runs the regional attention of UNetRegions; T2I-Adapter features (keypose, sketch) are
 * scaled by a spatial weight map (global weight, per-region weights inside boxes), summed and
 * added to the down blocks for both CFG halves.
 * ======================================================================================== */
#define MS_REGION_MAX 32
typedef struct {
    const char *prompt, *negative;   /* region prompt (concept words are bound as the global one) and
                                      * its negative prompt (used for the unconditional half, unbound) */
    double box[4];                   /* top, left, bottom, right as fractions: prepare_text's pos
                                      * (pixels / height, / width; [] -> [0, 0, 1, 1]) */
} MsRegion;
typedef struct {
    const AdapterParams *adapter;    /* NULL: this adapter is not used */
    const float *cond;               /* (1,Cin,height,width) in [0,1] (preprocessed) */
    float weight;                    /* keypose_adaptor_weight / sketch_adaptor_weight (1.0) */
    int n_box;                       /* region_*_adaptor_weight "[t, l, b, r]-w|...": boxes in pixels */
    const double (*box)[4];
    const float *box_weight;         /* (n_box); a later box overwrites an earlier one where they overlap */
} MsRegionalAdapter;
typedef struct {
    /* prompt, negative, width, height, steps, guidance_scale (> 1: the official pipeline always
     * builds both halves), seed, sampler, torch_cpu, init_noise, progress and the ED-LoRA fields
     * (new_emb, n_layer_ctx, bind_*) as for ms_txt2img; batch must be 1; adapter fields unused. */
    MsTxt2ImgOptions base;
    int n_regions;                   /* 0 .. MS_REGION_MAX */
    const MsRegion *regions;
    MsRegionalAdapter keypose, sketch;   /* features: keypose * wmap_k + sketch * wmap_s */
    /* trace: latents_init (1,4,h,w); step{i}.eps (2,4,h,w) (uncond, cond); step{i}.latents. NULL: none */
    void (*trace)(void *ctx, const char *name, const float *x, int ndim, const int64_t *shape);
    void *trace_ctx;
    double *unet_seconds;            /* out: seconds spent in the UNet (benchmarks); NULL: not wanted */
} MsRegionalOptions;
/* image (1,3,height,width), not clamped. MS_ERR_ARG for boxes outside [0,1] or empty, a batch != 1,
 * guidance <= 1, adapters whose input channels (keypose 3, sketch 1) or feature channels do not
 * fit, a size whose layers the official box mapping cannot reach. */
MsStatus ms_regional_sample(const MsModel *m, const ClipTokenizer *tok, const MsRegionalOptions *o, float *image);
/* The spatial weight map of one adapter level (fh x fw): weight everywhere, box_weight inside each
 * box (pixels / height|width, then ceil/floor as the official pipeline). */
void ms_regional_weight_map(float *map, int fh, int fw, int height, int width, const MsRegionalAdapter *a);

/* ==========================================================================================
 * The method: ED-LoRA training (mixshow.c). Options are those of Mix-of-Show's EDLoRATrainer
 * and train_edlora.py (options/train/EDLoRA/...yml, `models:` and `train:`), read by
 * tools/train_config.c; the data side (datasets:) lives in tools/ (TrainDataConfig).
 * ======================================================================================== */
#define MS_MAX_CONCEPT_WORDS 8      /* words of one concept ("<potter1>+<potter2>": 2) */
#define MS_WORD_MAX 64              /* bytes of a concept word or initializer, NUL included */
typedef struct {
    /* models: */
    int enable_edlora;              /* true: 16 tokens per word (ED-LoRA); false: 1 (plain LoRA) */
    int n_words;                    /* new_concept_token split on '+' */
    char words[MS_MAX_CONCEPT_WORDS][MS_WORD_MAX];  /* "<potter1>", "<potter2>" */
    char init[MS_MAX_CONCEPT_WORDS][MS_WORD_MAX];   /* initializer_token split on '+': "<rand-0.013>",
                                                     * "man"; null in the file: "<rand-0.017>" each */
    int tune_emb;                   /* finetune_cfg.text_embedding.enable_tuning */
    int tune_te, tune_unet;         /* finetune_cfg.{text_encoder,unet}.enable_tuning AND lora_cfg given */
    double lr_emb, lr_te, lr_unet;  /* finetune_cfg.*.lr (1e-3, 1e-5, 1e-4) */
    double wd_emb;                  /* finetune_cfg.text_embedding.weight_decay; NaN: absent (use weight_decay) */
    int te_rank, unet_rank;         /* lora_cfg.rank (4) */
    double te_alpha, unet_alpha;    /* lora_cfg.alpha (1.0) */
    int has_noise_offset;           /* noise_offset given and not null */
    double noise_offset;            /* 0.01 */
    int has_attn_reg;               /* attn_reg_weight given and not null (0 still runs the term) */
    double attn_reg_weight;         /* 0.01 */
    int reg_full_identity;          /* EDLoRATrainer default true; shipped configs false */
    int use_mask_loss;              /* EDLoRATrainer default true */
    /* train: */
    double weight_decay;            /* optim_g.weight_decay (torch AdamW default 0.01) */
    double beta1, beta2;            /* optim_g.betas (0.9, 0.999) */
    double adam_eps;                /* optim_g.eps (1e-8) */
    double emb_norm_threshold;      /* train.emb_norm_threshold (0.55) */
    double total_iter;              /* len(dataset) / batch_size, a float as in train_edlora.py:
                                     * steps run while step < total_iter; linear decay over it */
    uint64_t seed;                  /* manual_seed */
} MsTrainConfig;
void ms_train_config_defaults(MsTrainConfig *c);   /* EDLoRATrainer / torch AdamW defaults */

/* AdamW, torch.optim.AdamW (torch 1.13, single-tensor path) to the bit, on n floats of one
 * parameter with gradient g and moments m, v; `step` counts this update (1 for the first).
 * models/optim.c. */
void ms_adamw_step(float *p, const float *g, float *m, float *v, size_t n, int64_t step, double lr,
                   double weight_decay, double beta1, double beta2, double eps);

/* ---- L-BFGS (helper "fuse"): torch.optim.LBFGS (torch 1.13) from scratch, models/optim.c ---- */
/* f(x) at x (n floats); writes the gradient (n floats) into grad. ctx is the caller's. */
typedef double (*MsLbfgsClosure)(void *ctx, const float *x, float *grad);
typedef struct {
    double lr;                 /* 1 */
    int max_iter;              /* 20 */
    int max_eval;              /* max_iter * 5 / 4 */
    int history_size;          /* 100 (gradient fusion: 25) */
    double tolerance_grad;     /* 1e-7 (max |g| <= this: optimal) */
    double tolerance_change;   /* 1e-9 (the line search always uses 1e-9, as torch's) */
    int strong_wolfe;          /* line_search_fn='strong_wolfe' (1) or None (0) */
} MsLbfgsOptions;
void ms_lbfgs_defaults(MsLbfgsOptions *o);    /* torch.optim.LBFGS defaults (max_iter 20) */
typedef struct {
    int n_iter, n_evals;       /* iterations and closure calls */
    double f_first, f_last;    /* f at the start; f at the returned x */
    double best_f;             /* the lowest closure value seen (its point is best_x) */
} MsLbfgsResult;
/* One optimizer.step(closure): x (n) is updated in place as torch leaves the parameter. When
 * best_x is not NULL it receives the point of the lowest closure value seen (initial point and
 * line-search trials included; ties keep the earlier). trace (trace_cap) receives every closure
 * value in evaluation order (res->n_evals of them; extra values are dropped). MS_ERR_NOMEM. */
MsStatus ms_lbfgs(float *x, size_t n, MsLbfgsClosure f, void *ctx, const MsLbfgsOptions *o,
                  float *best_x, double *trace, int trace_cap, MsLbfgsResult *res);

/* One batch as the official trainer receives it (after the transforms). */
typedef struct {
    int B, H, W;                    /* images (B,3,H,W) */
    const float *images;            /* after ToTensor + Normalize */
    const double *masks;            /* (B,1,H/8,W/8) the dataset's masks; NULL: it has none */
    const double *img_masks;        /* (B,1,H/8,W/8) valid pixels of the resize/pad transform */
    const char *const *prompts;     /* B prompts with the concept words (replace_mapping done) */
} MsTrainBatch;
/* The random draws of one step, in place of the generator (--replay). */
typedef struct {
    const int32_t *input_ids;       /* (B*L, 77) bound prompts, sample-major; NULL: tokenize */
    const float *vae_eps;           /* (B,4,h,w) the posterior sample's N(0,1) */
    const float *noise_randn;       /* (B,4,h,w) noise before the offset */
    const float *noise_offset_randn;/* (B,4,1,1) */
    const int64_t *timesteps;       /* (B) */
} MsStepDraws;
typedef struct {
    double loss, loss_mse, loss_attn;   /* total; epsilon MSE; regulariser (NaN: off or left out) */
    double lr[3];                       /* lr used: embedding, text-encoder LoRA, UNet LoRA */
    double emb_norm_mean;               /* mean L2 norm of the concept rows after the step */
    int emb_frozen;                     /* stop_emb_update */
    const float *model_pred;            /* (B,4,h,w); valid until the next step */
} MsStepReport;
typedef struct MsTrainer MsTrainer;
/* Plans and allocates everything for batches of B images of H x W. Adds the concept tokens
 * (<new0>.. : 16 per word for ED-LoRA, 1 for plain LoRA) to tok. g: the torch generator for the
 * initial values, drawn in the official order (NULL: all zero; set them with ms_trainer_param). */
MsStatus ms_trainer_create(MsTrainer **out, const MsModel *m, ClipTokenizer *tok, const MsTrainConfig *c,
                           int B, int H, int W, MsTorchRng *g);
/* The loss of one batch and, with want_grad, every gradient (ms_trainer_param's grad); nothing
 * moves. Draws as ms_trainer_step. */
MsStatus ms_trainer_loss(MsTrainer *t, const MsTrainBatch *b, const MsStepDraws *dr, MsTorchRng *g,
                         MsStepReport *rep, int want_grad);
/* One optimizer step. dr: replayed draws, or NULL to draw from g in the official order. */
MsStatus ms_trainer_step(MsTrainer *t, const MsTrainBatch *b, const MsStepDraws *dr, MsTorchRng *g,
                         MsStepReport *rep);
void ms_trainer_free(MsTrainer *t);
/* The trainable tensors under their official names ("token_embedding.concept" (T,D);
 * "text_encoder.<module>.lora_down.weight", ".lora_up.weight"; "unet.<module>..."), in the
 * official module order; grad holds the last step's gradient. */
int ms_trainer_n_params(const MsTrainer *t);
MsStatus ms_trainer_param(const MsTrainer *t, int i, const char **name, float **data, float **grad,
                          int64_t shape[2]);
int ms_trainer_find_param(const MsTrainer *t, const char *name);   /* index or -1 */
int ms_trainer_tokens(const MsTrainer *t, int *first_id);          /* tokens per word; id of <new0> */
int64_t ms_trainer_step_count(const MsTrainer *t);
/* Checkpoint state: parameters, AdamW moments, the frozen rows, the step and the freeze flag. */
size_t ms_trainer_state_floats(const MsTrainer *t);
void ms_trainer_state_io(MsTrainer *t, float *buf, int store, int64_t *step, int *stop_emb);

/* ---- pretraining (issue 15): every parameter of a small UNet + CLIP text encoder ----
 * The usual latent-diffusion objective (mixshow.c, section "pretraining"): for latents z0
 * (B,C,h,w) of a frozen VAE and captions, per step
 *   drop_b = u_b < uncond_p (caption -> "", for classifier-free guidance), t_b uniform in [0, T),
 *   n ~ N(0, 1), z_t = sqrt(ac_t) z0 + sqrt(1 - ac_t) n (the model's scheduler config, DDPM),
 *   L = mean (UNet(z_t, t, TextEncoder(ids)) - n)^2,
 * then AdamW (torch.optim.AdamW, to the bit) on every UNet and text-encoder parameter (the UNet's
 * only with freeze_text, as SD trains on a frozen CLIP), one flat loop per table, lr warmed up linearly: lr_k = lr * min(1, k / warmup), and optionally decayed
 * linearly over the last steps (an annealed end in place of an average of the weights). */
typedef struct {
    double lr;                      /* 1e-3 (peak) */
    int64_t warmup;                 /* 100 steps (0: none) */
    double beta1, beta2, adam_eps;  /* 0.9, 0.999, 1e-8 */
    double weight_decay;            /* 0.01 (every parameter) */
    double uncond_p;                /* 0.1 */
    int64_t decay, steps;           /* decay > 0: the last `decay` of `steps` steps decay linearly,
                                     * lr_k = lr * (steps - k + 1) / decay for k > steps - decay (0: none) */
    int freeze_text;                /* 1: the text encoder is fixed, as SD's CLIP (no gradient, no update) */
} MsPretrainConfig;
void ms_pretrain_config_defaults(MsPretrainConfig *c);
/* Fresh weights for every f32 parameter of a table made by ms_param_table_unet / _text / _vae
 * and ms_param_table_alloc, drawn from g in table order: 1-D "norm" weights 1 and their biases 0,
 * other biases 0, token / position embeddings N(0, 0.02^2) / N(0, 0.01^2) (CLIP's init), other
 * weights U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (torch's default for Linear and Conv2d weights). */
MsStatus ms_pretrain_init_weights(MsParamTable *t, MsTorchRng *g);
/* The random draws of one step (in place of the generator; tests). */
typedef struct {
    const unsigned char *drop;      /* (B) 1: empty caption */
    const int64_t *timesteps;       /* (B) in [0, T) */
    const float *noise;             /* (B,C,h,w) */
} MsPretrainDraws;
typedef struct {
    double loss, lr;                /* the step's loss (before the update) and lr */
    MsPretrainDraws used;           /* what the step drew; valid until the next step */
    const int32_t *ids;             /* (B, 77) the token ids of the step */
} MsPretrainReport;
typedef struct MsPretrainer MsPretrainer;
/* Plans everything for batches of B latents of h x w. m's unet and text tables must be f32 in
 * one block each (ms_param_table_alloc); the pretrainer trains them in place (m and tok must
 * outlive it). The gaps between tensors in those blocks are set to 0. */
MsStatus ms_pretrainer_create(MsPretrainer **out, MsModel *m, const ClipTokenizer *tok, const MsPretrainConfig *c,
                              int B, int h, int w);
/* One optimizer step on latents (B,C,h,w) (already * scaling_factor) and B captions. Draws in
 * this order from g unless dr is given: B words for the drops (u = (word & 2^24-1) / 2^24),
 * B words for the timesteps (word % T), then torch.randn of the noise. */
MsStatus ms_pretrain_step(MsPretrainer *p, const float *latents, const char *const *captions,
                          const MsPretrainDraws *dr, MsTorchRng *g, MsPretrainReport *rep);
int64_t ms_pretrainer_step_count(const MsPretrainer *p);
/* AdamW moments: *m and *v, n floats each (the UNet's block, then the text encoder's, in their
 * tables' layout), for checkpoints; the step count is set with the moments on resume. */
void ms_pretrainer_moments(MsPretrainer *p, float **m, float **v, size_t *n);
void ms_pretrainer_set_step(MsPretrainer *p, int64_t step);
void ms_pretrainer_free(MsPretrainer *p);

/* The VAE stage: every parameter of an AutoencoderKL (ms_param_table_vae, ms_param_table_alloc,
 * fresh from ms_pretrain_init_weights) trained on images x (B,Cin,H,W) in [-1, 1]. Per step:
 *   n ~ N(0, 1) (B,L,H/f,W/f) (torch.randn of g), mean, logvar = Encoder(x),
 *   z = mean + exp(logvar / 2) n (the reparameterisation), x' = Decoder(z),
 *   L = (sum |x' - x| + kl_weight sum_b KL_b) / numel(x)     (mse: (x' - x)^2 in place of |x' - x|),
 * LDM's autoencoder objective without its LPIPS and GAN terms (reconstruction summed per image +
 * kl_weight * KL per image), divided by the constant C H W so that it reads as a per-pixel error;
 * then AdamW as ms_pretrain_step (one flat loop over the table's block, linear warmup). */
typedef struct {
    double lr;                      /* 5e-4 (peak) */
    int64_t warmup;                 /* 100 steps (0: none) */
    double beta1, beta2, adam_eps;  /* 0.9, 0.999, 1e-8 */
    double weight_decay;            /* 0.01 (every parameter) */
    double kl_weight;               /* 1e-6 (LDM's kl-f8 / SD's VAE) */
    int mse;                        /* 1: squared error (default, measured), 0: L1 (LDM's) */
} MsVaePretrainConfig;
void ms_vae_pretrain_config_defaults(MsVaePretrainConfig *c);
typedef struct {
    double loss, lr;                /* the step's objective (before the update) and lr */
    double rec, kl;                 /* its terms: mean |x' - x| (or (x' - x)^2), mean KL per image */
    const float *noise;             /* (B,L,h,w) the posterior noise used; valid until the next step */
} MsVaePretrainReport;
typedef struct MsVaePretrainer MsVaePretrainer;
/* Plans the tapes for batches of B images of H x W (multiples of the VAE's factor). w must be
 * f32 in one block (as for ms_pretrainer_create); it is trained in place and must outlive p. */
MsStatus ms_vae_pretrainer_create(MsVaePretrainer **out, const VaeConfig *vc, MsParamTable *w,
                                  const MsVaePretrainConfig *c, int B, int H, int W);
/* One optimizer step on images x; noise given (tests) or drawn from g (torch.randn). */
MsStatus ms_vae_pretrain_step(MsVaePretrainer *p, const float *x, const float *noise, MsTorchRng *g,
                              MsVaePretrainReport *rep);
int64_t ms_vae_pretrainer_step_count(const MsVaePretrainer *p);
void ms_vae_pretrainer_moments(MsVaePretrainer *p, float **m, float **v, size_t *n);   /* the table's layout */
void ms_vae_pretrainer_set_step(MsVaePretrainer *p, int64_t step);
void ms_vae_pretrainer_free(MsVaePretrainer *p);

/* T2I-Adapter training (the adapters stage, after the UNet's): every parameter of one adapter
 * on a frozen UNet + text encoder (mixshow.c, section "pretraining"). One step:
 *   draws as ms_pretrain_step (caption drop, t uniform, n); z_t = sqrt(ac_t) z0 + sqrt(1 - ac_t) n;
 *   ctx = TextEncoder(captions); F = Adapter(cond) (scale 1);
 *   eps = UNet(z_t, t, ctx, down-block residuals F) exactly as sampling adds them;
 *   L = mean (eps - n)^2; dF from the UNet's backward (UNetActs.dadapter) -> every adapter
 *   parameter (adapter_backward_full); AdamW over the adapter's block, lr warmed up.
 * The adapter must fit the UNet (ms_adapter_fits_unet). */
typedef struct MsAdapterTrainer MsAdapterTrainer;
/* m: the frozen model (f32 UNet and text encoder; kept, not changed); w: the adapter's table, f32
 * in one block (ms_param_table_adapter + ms_param_table_alloc), trained in place. Batches of B
 * latents (m's UNet sample size h x w) with conditions (B, in_channels, H, W), H = h * f. m, tok
 * and w must outlive the trainer. */
MsStatus ms_adapter_trainer_create(MsAdapterTrainer **out, const MsModel *m, const ClipTokenizer *tok,
                                   const AdapterConfig *ac, MsParamTable *w, const MsPretrainConfig *c, int B,
                                   int h, int wl);
/* latents (B,C,h,w) * scaling_factor, cond (B,Cin,H,W) in [0, 1], B captions; draws dr (or from
 * g in ms_pretrain_step's order). rep->used: this step's draws (valid until the next step). */
MsStatus ms_adapter_train_step(MsAdapterTrainer *p, const float *latents, const float *cond,
                               const char *const *captions, const MsPretrainDraws *dr, MsTorchRng *g,
                               MsPretrainReport *rep);
int64_t ms_adapter_trainer_step_count(const MsAdapterTrainer *p);
void ms_adapter_trainer_set_step(MsAdapterTrainer *p, int64_t step);
void ms_adapter_trainer_moments(MsAdapterTrainer *p, float **m, float **v, size_t *n);   /* the table's layout */
void ms_adapter_trainer_free(MsAdapterTrainer *p);
/* Whether T2I-Adapter features (levels of side (h >> i) x (w >> i), h x w the latent) are residuals
 * this UNet takes as diffusers 0.19.3 adds them: as many levels as down blocks, channels[i] ==
 * block_out_channels[i], and no DownBlock2D before the last block (it would take its residual
 * after its downsampler, one level down). MS_ERR_SHAPE naming the mismatch. */
MsStatus ms_adapter_fits_unet(const AdapterConfig *ac, const UNetConfig *uc, const char *what);

/* ==========================================================================================
 * The method: gradient fusion (mixshow.c).
 * For a linear layer with base weight W0 (d_out, d_in) and concepts i = 1..N with merged
 * weights W_i = W0 + a_i up_i down_i, recorded input rows X_i (n_i, d_in) and targets
 * V_i = X_i W_i^T (bias removed), find W minimising
 *     f(W) = sum_i ||X_i W^T - V_i||^2 / (n * d_out),    n = sum_i n_i
 * (torch's F.mse_loss over all rows: the official objective).
 * ======================================================================================== */
typedef enum { MS_FUSE_GRAM = 0, MS_FUSE_LBFGS, MS_FUSE_WEIGHT } MsFuseMethod;
const char *ms_fuse_method_name(MsFuseMethod m);      /* "gram", "lbfgs", "weight" */
/* One concept's change of one layer: W_i = W0 + alpha * up @ down (down NULL: W_i = W0). */
typedef struct { float alpha; int rank; const float *down /* (rank,d_in) */, *up /* (d_out,rank) */; } MsFuseDelta;
/* Recorded input rows of one layer input, concept by concept (rows of concept c are
 * [end[c-1], end[c]) ). */
typedef struct {
    int d_in, n_concepts;
    size_t n, cap;
    float *X;                  /* (n, d_in) */
    size_t *end;               /* (n_concepts) */
} MsFuseRows;
MsStatus ms_fuse_rows_init(MsFuseRows *r, int d_in, int n_concepts);
MsStatus ms_fuse_rows_add(MsFuseRows *r, int concept, const float *X, size_t n);  /* concepts in order */
void ms_fuse_rows_free(MsFuseRows *r);
/* Statistics of one layer problem, in double: G = sum X^T X (d_in,d_in), C = sum V^T X
 * (d_out,d_in), vv = sum ||V||^2, n rows. Streamed: no row is kept. */
typedef struct { int d_in, d_out; size_t n; double *G, *C, vv; } MsFuseStats;
MsStatus ms_fuse_stats_init(MsFuseStats *s, int d_in, int d_out);
void ms_fuse_stats_free(MsFuseStats *s);
/* Adds n rows X of one concept with targets X Wc^T (Wc (d_out,d_in) its merged weight). */
MsStatus ms_fuse_stats_add(MsFuseStats *s, const float *X, size_t n, const float *Wc);
/* W_i = W0 + alpha up down into Wc (float32, as the official merge). */
void ms_fuse_merged_weight(float *Wc, const float *W0, const MsFuseDelta *d, int d_out, int d_in);
/* f(W) from the statistics: (vv - 2<W,C> + <W G, W>) / (n d_out). */
double ms_fuse_objective_stats(const MsFuseStats *s, const float *W);
/* f(W) exactly from rows (double): sum over rows of concept i of ||x (W - W_i)^T||^2 / (n d_out). */
double ms_fuse_objective_rows(const MsFuseRows *r, const float *W0, const MsFuseDelta *d, int d_out, const float *W);
/* Symmetric eigen-decomposition (double): A (n,n) symmetric is destroyed; w (n) eigenvalues
 * ascending, V (n,n) row-major with eigenvector k in column k. ms_sym_eigen: Householder
 * tridiagonalisation + implicit QL (tred2/tql2), threaded, bits independent of the thread
 * count; ms_sym_eigen_ref: cyclic Jacobi, the slow accurate twin the tests compare with. */
MsStatus ms_sym_eigen(double *A, int n, double *w, double *V);
MsStatus ms_sym_eigen_ref(double *A, int n, double *w, double *V);
/* One decomposition G = V diag(l) V^T kept for every layer that reads the same G:
 * l ascending, V (n,n) eigenvectors in columns, Vt = V^T (eigenvectors in rows). */
typedef struct { int n; double *l, *V, *Vt; } MsSymEig;
MsStatus ms_sym_eig_init(MsSymEig *e, const double *G, int n);     /* G is not modified */
void ms_sym_eig_free(MsSymEig *e);
#define MS_FUSE_RCOND 1e-12             /* eigenvalues below this * max: noise */
#define MS_FUSE_RCOND_AUTO (-1.0)        /* rcond: the determined directions (see mixshow.c) */
#define MS_FUSE_RCOND_DETERMINED 1e-6    /* AUTO may drop directions below this * max ... */
#define MS_FUSE_GAIN_KEEP 1e-3           /* ... holding at most this part of the decrease */
/* gram: W = W0 + (C - W0 G) G+, G+ the pseudo-inverse with eigenvalues <= rcond * max dropped
 * (rcond == 0: MS_FUSE_RCOND): the minimiser of f nearest to W0. rcond == MS_FUSE_RCOND_AUTO
 * (any negative value): also drops the directions the float32 features do not determine, within
 * 0.1% of the minimum (mixshow.c explains the choice). *rank (NULL ok): directions kept.
 * ms_fuse_solve_gram_eig: the same with e = the decomposition of s->G made once; W0 NULL
 * means W0 = 0 (then W is the change (C) G+ alone); cap > 0: a trust region, the minimiser of f
 * over ||W - W0||_F <= cap (a ridge lam >= 0 on the kept directions, *ridge; 0 when the
 * minimiser lies inside; mixshow.c, fuse_trust_ridge). */
MsStatus ms_fuse_solve_gram(const MsFuseStats *s, const float *W0, float *W, double rcond, int *rank);
MsStatus ms_fuse_solve_gram_eig(const MsSymEig *e, const MsFuseStats *s, const float *W0, float *W, double rcond,
                                double cap, int *rank, double *ridge);
/* lbfgs: the official update_quasi_newton on the same objective (gradient 2 (W G - C)/(n d_out)),
 * torch.optim.LBFGS(lr 1, max_iter iters, history 25, strong Wolfe, tolerances 1e-16), returning
 * the best W seen. trace: closure values (trace_cap; res->n_evals written). */
MsStatus ms_fuse_solve_lbfgs(const MsFuseStats *s, const float *W0, float *W, int iters, double *trace,
                             int trace_cap, MsLbfgsResult *res);
/* weight: W = W0 + sum_i alpha_i up_i down_i. */
MsStatus ms_fuse_weight(float *W, const float *W0, const MsFuseDelta *d, int n_concepts, int d_out, int d_in);
/* The model-level loop (gradient_fusion.py steps 4-5). Tokens: every concept word's n_layers
 * token names (bind_concept_prompt order) and the stacked new embedding rows. */
typedef struct {
    int n_bind, n_layers;            /* words; token variants per word (16) */
    const char *const *bind_word;    /* (n_bind) "<potter1>" */
    const char *const *bind_token;   /* (n_bind * n_layers) "<new0>".. at [w * n_layers + i] */
    const float *new_emb;            /* (n_new, D) rows of ids vocab_size.. */
    int n_new;
} MsFuseTokens;
typedef struct {
    const char *name;                /* concept_name with its words: "<potter1> <potter2>" */
    const ClipLora *te;              /* alpha = text_encoder_alpha; NULL: none */
    const unsigned char *te_has;     /* (layers * 4) modules the file has (q, k, v, out) */
    const UNetLora *unet;            /* alpha = unet_alpha; NULL: none */
    const unsigned char *unet_has;   /* (n_attn * 4) */
} MsFuseConcept;
typedef struct {
    MsFuseMethod method;
    int te_iters, unet_iters;        /* lbfgs: 500, 50 */
    double rcond;                    /* gram cut-off (0: MS_FUSE_RCOND; MS_FUSE_RCOND_AUTO) */
    double max_change;               /* gram trust region (<= 0: none): ||W - W0|| <= max(max_change *
                                      * sqrt(sum_i ||dW_i||^2), ||weight fusion's change||) */
    int verbose;                     /* one line per layer on stderr */
    /* spatial stage (ms_fuse_spatial) */
    uint64_t seed;                   /* torch.manual_seed(seed) before the official draws */
    int sp_size, sp_steps;           /* sampling size and steps (<= 0: 512, 20 as the official) */
    /* called for every concept c and recorded input (block, which as UNetActs.record) with
     * G_c = X_c^T X_c (C,C) of its rows; NULL: none (tests compare it with the official X) */
    void (*on_gram)(void *ctx, int concept, int block, int which, const double *G, size_t rows, int C);
    void *on_gram_ctx;
    /* called after the text-encoder layers are fused, before the K/V stage records its inputs
     * (NULL: none): `fuse --te-kv-from` puts another run's text encoder there, so that the K/V
     * and spatial stages record the features that run recorded */
    MsStatus (*after_te)(void *ctx, MsModel *m);
    void *after_te_ctx;
} MsFuseOptions;
typedef struct {
    char layer[MS_KEY_MAX];          /* state-dict key */
    char stage[4];                   /* "te", "kv", "sp" */
    size_t rows;
    double f_w0, f_weight, f_fused;  /* f (double, exact from the rows) */
    int rank;                        /* gram: eigenvalues kept */
    double *trace; int n_trace;      /* lbfgs: closure values */
    double seconds;
    double change;                   /* ||W - W0||_F of the result */
    double concepts_change;          /* sqrt(sum_i ||alpha_i up_i down_i||_F^2) */
    double weight_change;            /* ||weight fusion's W - W0||_F */
    double ridge;                    /* gram: the trust region's lam (0: the region was not needed) */
} MsFuseLayerReport;
typedef struct {
    MsFuseLayerReport *l; int n, cap;
    double seconds[3];               /* te, kv, sp */
    /* sp split: sampling (UNet + scheduler, recorder included), of it the Gram accumulation in
     * the recorder, folding each concept's G_c into the layer statistics, solving the layers */
    double sp_sample, sp_gram, sp_fold, sp_solve;
} MsFuseReport;
void ms_fuse_report_free(MsFuseReport *rep);
/* Text encoder q/k/v/out_proj, then cross-attention to_k/to_v; fused weights are written into
 * m's f32 tables in place. up: UNetParams of m (module names). tok must hold the added tokens. */
MsStatus ms_fuse_text_kv(MsModel *m, const UNetParams *up, const ClipTokenizer *tok, const MsFuseTokens *tk,
                         const MsFuseConcept *cs, int n, const MsFuseOptions *o, MsFuseReport *rep);
/* Step 6 after ms_fuse_text_kv (m holds the fused text encoder and K/V): every other attention
 * Linear some concept's UNet LoRA touches, from the inputs recorded while sampling each concept
 * (20 DPM-Solver++ steps at 512x512, no guidance, latents from the generator seeded with
 * o->seed in the official order), streamed into Gram statistics (no row is kept). */
MsStatus ms_fuse_spatial(MsModel *m, const UNetParams *up, const ClipTokenizer *tok, const MsFuseTokens *tk,
                         const MsFuseConcept *cs, int n, const MsFuseOptions *o, MsFuseReport *rep);

/* ==========================================================================================
 * Benchmarks (tensor.c): kernels measured by `mixshow bench`
 * ======================================================================================== */
/* GFLOP/s of a register-only FMA loop (12 independent chains) at `level` (capped at ms_simd())
 * on `threads` threads, each running the loop; the run lasts about `seconds`. The denominator
 * of every "% of peak" that `mixshow bench` prints. */
double ms_bench_fma_peak(MsSimd level, int threads, double seconds);
/* conv2d_forward without bias through an explicit column matrix: cols holds C*k*k*Ho*Wo
 * floats. Only for `mixshow bench`, to compare with the implicit im2col of conv2d_forward. */
void ms_bench_conv2d_explicit(float *out, float *cols, const float *x, const float *w, int N, int C,
                              int Co, int H, int W, int k, int s, int p);

#endif /* MIXSHOW_H */
