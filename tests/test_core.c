/* tests/test_core.c — errors, checked size arithmetic, arenas, aligned allocation, test RNG, the
 * load-aware team size's policy. */
#include "tests/test.h"

#include <stdint.h>

static void test_errors(void) {
    MsStatus s = ms_errorf(MS_ERR_FORMAT, "%s: key '%s' expected %d dims", "f.safetensors", "w", 4);
    check(s == MS_ERR_FORMAT, "ms_errorf returns its code");
    check(strcmp(ms_last_error(), "f.safetensors: key 'w' expected 4 dims") == 0, "ms_errorf formats the message");
    check(strcmp(ms_status_name(MS_ERR_IO), "I/O error") == 0, "status names");
    ms_clear_error();
    check(ms_last_error()[0] == '\0', "ms_clear_error empties the message");
}

static void test_sizes(void) {
    size_t r = 0;
    check(ms_mul_ok(3, 5, &r) && r == 15, "mul_ok small");
    check(!ms_mul_ok(SIZE_MAX / 2 + 1, 2, &r), "mul_ok detects overflow");
    check(ms_mul_ok(SIZE_MAX, 0, &r) && r == 0, "mul_ok by zero");
    check(ms_add_ok(SIZE_MAX - 1, 1, &r) && r == SIZE_MAX, "add_ok edge");
    check(!ms_add_ok(SIZE_MAX, 1, &r), "add_ok detects overflow");
}

static void test_arena(void) {
    Arena a;
    check(arena_init(&a, 1000) == MS_OK, "arena_init");
    float *x = arena_floats(&a, 10);
    check(x && ((uintptr_t)x & 63) == 0, "arena_floats 64-byte aligned");
    size_t m = arena_mark(&a);
    float *y = arena_floats(&a, 100);
    check(y && ((uintptr_t)y & 63) == 0 && (unsigned char *)y >= (unsigned char *)(x + 10), "second block after first");
    check(arena_floats(&a, 1000) == NULL, "arena refuses what does not fit");
    check(arena_floats(&a, SIZE_MAX / 2) == NULL, "arena refuses an overflowing request");
    arena_reset(&a, m);
    float *z = arena_floats(&a, 100);
    check(z == y, "arena_reset reuses the space");
    arena_free(&a);
    void *p = ms_alloc_aligned(SIZE_MAX / 4, 8);
    check(p == NULL, "ms_alloc_aligned refuses n*size overflow");
    p = ms_alloc_aligned(3, 7);
    check(p && ((uintptr_t)p & 63) == 0, "ms_alloc_aligned aligned");
    ms_free_aligned(p);
}

static void test_rng(void) {
    MsRng r; double s = 0, s2 = 0; int n = 100000;
    ms_rng_seed(&r, 42);
    for (int i = 0; i < n; i++) { double v = ms_rng_normal(&r); s += v; s2 += v * v; }
    check(fabs(s / n) < 0.02 && fabs(s2 / n - 1.0) < 0.02, "normal mean %.4f var %.4f", s / n, s2 / n);
    MsRng a, b; ms_rng_seed(&a, 7); ms_rng_seed(&b, 7);
    check(ms_rng_u64(&a) == ms_rng_u64(&b), "rng deterministic");
}

/* ms_threads_for_load: the size asked for while others use <= half a core, else the cores they
 * leave (at least 1), never more than asked. */
static void test_threads_for_load(void) {
    int ok = ms_threads_for_load(2, 2, 0.0) == 2 && ms_threads_for_load(2, 2, 0.5) == 2 &&
             ms_threads_for_load(2, 2, 0.51) == 1 && ms_threads_for_load(2, 2, 1.0) == 1 &&
             ms_threads_for_load(2, 2, 3.0) == 1 && ms_threads_for_load(8, 8, 1.2) == 7 &&
             ms_threads_for_load(8, 8, 2.6) == 5 && ms_threads_for_load(4, 8, 2.0) == 4 &&
             ms_threads_for_load(0, 4, 0.0) == 1 && ms_threads_for_load(1, 2, 1.0) == 1;
    check(ok, "load-aware team size: asked-for size up to half a core of other load, then the free cores (>= 1)");
}

int main(void) {
    test_errors();
    test_sizes();
    test_arena();
    test_rng();
    test_threads_for_load();
    return test_summary("test_core");
}
