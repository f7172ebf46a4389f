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
static int ms_team_max(void) { return omp_in_parallel() ? 1 : omp_get_max_threads(); }
#else
#define MS_OMP_PARALLEL_FOR_NT
static int ms_team_max(void) { return 1; }
#endif

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

void ms_gemm_scratch_free(void) {
    ms_free_aligned(ms_work_gemm.p); ms_work_gemm.p = NULL; ms_work_gemm.cap = 0;
    ms_free_aligned(ms_work_conv.p); ms_work_conv.p = NULL; ms_work_conv.cap = 0;
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

/* Packs rows i0..i0+mc of op(A), columns k0..k0+kc, into MR-tall k-major panels
 * (dst[panel][k][r]); rows past mc are zero. */
static void ms_pack_a(float *dst, const MsOperand *A, int i0, int mc, int k0, int kc, int MR) {
    for (int ip = 0; ip < mc; ip += MR) {
        int rows = mc - ip < MR ? mc - ip : MR;
        float *d = dst + (size_t)ip * kc;
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
typedef struct { int mr, nr, mc, kc, nc; MsUkr ukr; MsSimd level; } MsGemmKernel;

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
#if defined(MS_X86_KERNELS)
    if (l >= MS_SIMD_AVX512) {
        g.level = MS_SIMD_AVX512; g.mr = 14; g.nr = 32; g.mc = MS_MC5; g.kc = MS_KC5; g.nc = MS_NC5; g.ukr = ms_ukr_avx512;
    } else if (l >= MS_SIMD_AVX2) {
        g.level = MS_SIMD_AVX2; g.mr = 6; g.nr = 16; g.mc = 6 * 24; g.kc = 384; g.nc = 320; g.ukr = ms_ukr_avx2;
    }
#elif defined(MS_NEON_KERNELS)
    if (l >= MS_SIMD_NEON) {
        g.level = MS_SIMD_NEON; g.mr = 8; g.nr = 8; g.mc = 8 * 16; g.kc = 256; g.nc = 512; g.ukr = ms_ukr_neon;
    }
#endif
    (void)l;
    return g;
}

/* The register tiles of rows [ic, ic+mc) x columns [jc, jc+nc) for one K slice, from packed
 * A (Ap: mc x kc) and packed B (Bp: kc x nc). */
static void ms_gemm_tiles(const MsGemmKernel *g, int ic, int mc, int jc, int nc, int kc, float alpha,
                          float beta_k, float *C, size_t ldc, const float *Ap, const float *Bp, float *tile) {
    const int MR = g->mr, NR = g->nr;
    for (int ir = 0; ir < mc; ir += MR) {
        const float *ap = Ap + (size_t)ir * kc;
        int rows = mc - ir < MR ? mc - ir : MR;
        for (int jr = 0; jr < nc; jr += NR) {
            int cols = nc - jr < NR ? nc - jr : NR;
            float *c = C + (size_t)(ic + ir) * ldc + jc + jr;
            const float *bp = Bp + (size_t)jr * kc;
            if (rows == MR && cols == NR) {
                g->ukr(kc, ap, bp, c, ldc, alpha, beta_k);
            } else {                             /* same kernel on a copy: same bits */
                if (beta_k != 0.0f)
                    for (int r = 0; r < rows; r++) memcpy(tile + r * NR, c + (size_t)r * ldc, (size_t)cols * sizeof(float));
                g->ukr(kc, ap, bp, tile, (size_t)NR, alpha, beta_k);
                for (int r = 0; r < rows; r++) memcpy(c + (size_t)r * ldc, tile + r * NR, (size_t)cols * sizeof(float));
            }
        }
    }
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

/* One thread's share: the C rows [i0, i1) x columns [j0, j1). */
static void ms_gemm_part(const MsGemmKernel *g, int order, int i0, int i1, int j0, int j1, int K, int kcb,
                         float alpha, const MsOperand *A, const MsOperand *B, float beta,
                         float *C, size_t ldc, float *Ap, float *Bp) {
    float tile[32 * 32];                          /* edge tiles: MR*NR <= 14*32 */
    memset(tile, 0, sizeof tile);
    if (order == MS_ORD_B_RESIDENT) {             /* j1 - j0 <= nc */
        for (int k0 = 0; k0 < K; k0 += kcb)
            ms_pack_b_slice(Bp + (size_t)k0 * (j1 - j0 + g->nr), B, k0, K - k0 < kcb ? K - k0 : kcb, j0, j1 - j0, g->nr);
        for (int ic = i0; ic < i1; ic += g->mc) {
            int mc = i1 - ic < g->mc ? i1 - ic : g->mc;
            for (int k0 = 0; k0 < K; k0 += kcb) {
                int kc = K - k0 < kcb ? K - k0 : kcb;
                ms_pack_a(Ap, A, ic, mc, k0, kc, g->mr);
                ms_gemm_tiles(g, ic, mc, j0, j1 - j0, kc, alpha, k0 == 0 ? beta : 1.0f, C, ldc, Ap,
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
                                  Ap + (size_t)(ic - i0) * kc, Bp, tile);
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
                ms_pack_a(Ap, A, ic, mc, k0, kc, g->mr);
                ms_gemm_tiles(g, ic, mc, jc, nc, kc, alpha, beta_k, C, ldc, Ap, Bp, tile);
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
    if (prow > g.mc && pcol <= g.nc && nkb > 1 && (size_t)K * (pcol + NR) <= ((size_t)1 << 19)) {
        order = MS_ORD_B_RESIDENT;                /* <= 2 MB of packed B */
        bsize = (size_t)K * (pcol + NR);
    } else if (pcol > g.nc && (size_t)prow * kcb <= ((size_t)1 << 18)) {
        order = MS_ORD_A_RESIDENT;                /* <= 1 MB of packed A */
        asize = (size_t)prow * kcb;
    }
    bsize = (bsize + 15) / 16 * 16;
    asize = (asize + 15) / 16 * 16;
    float *work = ms_work_get(&ms_work_gemm, (bsize + asize) * (size_t)nt);
    if (!work) return 0;
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
        if (i0 < i1 && j0 < j1) ms_gemm_part(&g, order, i0, i1, j0, j1, K, kcb, alpha, A, B, beta, C, ldc, Ap, Bp);
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

void ms_gemm(int transA, int transB, int M, int N, int K, float alpha, const float *A, int lda,
             const float *B, int ldb, float beta, float *C, int ldc) {
    MsOperand a = ms_dense(A, (size_t)lda, transA), b = ms_dense(B, (size_t)ldb, transB);
    if (!ms_gemm_op(M, N, K, alpha, &a, &b, beta, C, (size_t)ldc))   /* out of memory: slow but right */
        ms_gemm_ref(transA, transB, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
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
    MS_PARALLEL_FOR
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
            MS_PARALLEL_FOR
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
        MS_PARALLEL_FOR
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
    float *cols = ms_work_get(&ms_work_conv, (size_t)CKK * pc);
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
            MS_PARALLEL_FOR
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
        MS_PARALLEL_FOR
        for (int kk = 0; kk < CKK; kk++) {       /* row kk of cols, one output row at a time */
            for (int j = 0; j < P; j += Wo) ms_pack_b(cols + (size_t)kk * P + j, &B, kk, 1, j, Wo, Wo);
        }
        ms_gemm(0, 0, Co, P, CKK, 1.0f, w, CKK, cols, P, 0.0f, out + (size_t)n * Co * P, P);
    }
}
