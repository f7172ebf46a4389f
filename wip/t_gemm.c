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
