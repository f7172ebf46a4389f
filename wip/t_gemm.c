/* ---------------------------------------------------------------------------------------- */
/* CPU features and SIMD dispatch (placeholder: scalar only until the kernels land)          */
/* ---------------------------------------------------------------------------------------- */
static MsSimd ms_simd_level = MS_SIMD_SCALAR;
MsSimd ms_simd_detected(void) { return MS_SIMD_SCALAR; }
MsSimd ms_simd(void) { return ms_simd_level; }
void ms_set_simd(MsSimd level) { if (level < ms_simd_detected()) ms_simd_level = level; else ms_simd_level = ms_simd_detected(); }
const char *ms_simd_name(MsSimd level) {
    switch (level) {
    case MS_SIMD_SCALAR: return "scalar";
    case MS_SIMD_NEON: return "neon";
    case MS_SIMD_AVX2: return "avx2+fma";
    case MS_SIMD_AVX512: return "avx512";
    }
    return "?";
}

/* Placeholder GEMM (naive, correct) until the packed kernels land. */
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
    ms_gemm_ref(transA, transB, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
}
