/* tests/test.h — the tiny test harness every test program includes (header-only).
 *
 * A test program calls check()/check_close() for each claim, and ends with
 *   return test_summary("test_name");
 * which prints "test_name: N passed, N failed" and returns non-zero on any failure.
 * tests/run.sh sums those lines into the final "N passed, N failed".
 *
 * Comparisons print, on failure, the relative L2 error, the max abs error and the first five
 * values of both sides, so a failure says how far off it is, not only that it is.
 */
#ifndef MS_TEST_H
#define MS_TEST_H

#include "mixshow.h"

#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#ifdef _WIN32
#include <process.h>
static inline long test_pid(void) { return (long)_getpid(); }
#else
#include <unistd.h>
static inline long test_pid(void) { return (long)getpid(); }
#endif

static int test_passed, test_failed;
static int test_verbose = -1;

/* Little-endian 8-byte values from a golden file's bytes (byte-wise: big-endian hosts too). */
static inline uint64_t test_le_u64(const unsigned char *p) {
    uint64_t u = 0;
    for (int k = 7; k >= 0; k--) u = (u << 8) | p[k];
    return u;
}
static inline double test_le_f64(const unsigned char *p) {
    uint64_t u = test_le_u64(p);
    double d;
    memcpy(&d, &u, sizeof d);
    return d;
}

static inline int test_is_verbose(void) {
    if (test_verbose < 0) { const char *v = getenv("MS_TEST_VERBOSE"); test_verbose = v && *v && *v != '0'; }
    return test_verbose;
}

/* Full (slow) checks only under `make test-full`. */
static inline int test_full(void) { const char *v = getenv("MS_TEST_FULL"); return v && *v && *v != '0'; }

/* Where ../shared is (tests may read it when it is there). */
static inline const char *test_shared_dir(void) { const char *v = getenv("MS_SHARED"); return v && *v ? v : "../shared"; }

/* The tiny model's diffusers folder: the copy shipped in the repository (models/tiny-sd, the
 * same files as ../shared/models/tiny-sd), so tests need not have ../shared. Run from the
 * repository root. */
static inline const char *test_tiny_dir(void) { return "models/tiny-sd"; }

#if defined(__GNUC__)
__attribute__((format(printf, 2, 3)))
#endif
static inline int check(int ok, const char *fmt, ...) {
    va_list ap;
    if (ok) test_passed++; else test_failed++;
    if (!ok || test_is_verbose()) {
        printf("  %s ", ok ? "ok  " : "FAIL");
        va_start(ap, fmt); vprintf(fmt, ap); va_end(ap);
        printf("\n");
    }
    return ok;
}

typedef struct { double rel_l2, max_abs; size_t worst; } TestErr;

static inline TestErr test_err_f(const float *got, const float *want, size_t n) {
    double num = 0.0, den = 0.0; TestErr e = { 0.0, 0.0, 0 };
    for (size_t i = 0; i < n; i++) {
        double d = (double)got[i] - (double)want[i];
        num += d * d; den += (double)want[i] * want[i];
        if (!(fabs(d) <= e.max_abs)) { e.max_abs = fabs(d); e.worst = i; }   /* NaN counts */
    }
    e.rel_l2 = sqrt(num) / (sqrt(den) > 1e-30 ? sqrt(den) : 1e-30);
    if (num != num) e.rel_l2 = INFINITY;
    return e;
}

static inline void test_print_head(const char *label, const float *x, size_t n) {
    printf("      %-5s", label);
    for (size_t i = 0; i < n && i < 5; i++) printf(" % .8e", (double)x[i]);
    printf("\n");
}

/* Pass when relative L2 error <= rel_tol (and, if abs_tol > 0, max abs error <= abs_tol). */
static inline int check_close(const char *what, const float *got, const float *want, size_t n,
                       double rel_tol, double abs_tol) {
    TestErr e = test_err_f(got, want, n);
    int ok = e.rel_l2 <= rel_tol && (abs_tol <= 0 || e.max_abs <= abs_tol);
    check(ok, "%-40s rel_l2 %.3e (tol %.1e)  max_abs %.3e at %zu (tol %.1e)", what, e.rel_l2,
          rel_tol, e.max_abs, e.worst, abs_tol);
    if (!ok) { test_print_head("got", got, n); test_print_head("want", want, n); }
    return ok;
}

/* Bitwise equality (1 vs N threads). */
static inline int check_bitwise(const char *what, const float *a, const float *b, size_t n) {
    size_t bad = n;
    for (size_t i = 0; i < n; i++) if (memcmp(&a[i], &b[i], sizeof(float))) { bad = i; break; }
    check(bad == n, "%-40s bit-identical%s", what, bad == n ? "" : " -- NO");
    if (bad != n) printf("      first difference at %zu: %.9e vs %.9e\n", bad, (double)a[bad], (double)b[bad]);
    return bad == n;
}

static inline int test_summary(const char *name) {
    printf("%s: %d passed, %d failed\n", name, test_passed, test_failed);
    return test_failed ? 1 : 0;
}

/* Central-difference gradient check (STYLE.md §8). loss() must sum in double. Returns the
 * worst relative error over ~200 coordinates: |num - dx| / max(|num| + |dx|, floor_frac * the
 * largest |dx|), so that tiny gradients (where float rounding of the forward dominates the
 * finite difference) are judged against the scale of the tensor, not against themselves. */
static inline double gradcheck_floor(double (*loss)(void *), void *ctx, float *x, const float *dx,
                                     size_t n, float eps, double floor_frac) {
    double gmax = 1e-12, worst = 0.0;
    for (size_t k = 0; k < n; k++) gmax = fmax(gmax, fabs(dx[k]));
    for (size_t k = 0; k < n; k += 1 + n / 200) {
        float x0 = x[k];
        x[k] = x0 + eps; double lp = loss(ctx);
        x[k] = x0 - eps; double lm = loss(ctx);
        x[k] = x0;
        double num = (lp - lm) / (2.0 * (double)eps);
        worst = fmax(worst, fabs(num - dx[k]) / fmax(fabs(num) + fabs(dx[k]), floor_frac * gmax));
    }
    return worst;
}

/* The usual floor: 1e-3 of the largest gradient. */
static inline double gradcheck(double (*loss)(void *), void *ctx, float *x, const float *dx, size_t n, float eps) {
    return gradcheck_floor(loss, ctx, x, dx, n, eps, 1e-3);
}

/* For deep networks, whose float32 forward puts noise of ~1e-6 relative into the loss:
 * central differences at the 8 coordinates where the analytic gradient is largest (where that
 * noise matters least) plus a stride of 4 more over the rest; error relative to
 * max(|num|, |analytic|, max|analytic| / 10). verbose prints each coordinate. */
static inline double gradcheck_top(double (*loss)(void *), void *ctx, float *x, const float *dx, size_t n, float eps,
                       int verbose) {
    double gmax = 1e-30, worst = 0.0;
    size_t pick[12];
    int np = 0;
    for (size_t k = 0; k < n; k++) gmax = fmax(gmax, fabs(dx[k]));
    for (int r = 0; r < 8 && r < (int)n; r++) {               /* the 8 largest |dx| */
        size_t best = n;
        for (size_t k = 0; k < n; k++) {
            int used = 0;
            for (int q = 0; q < np; q++) used |= pick[q] == k;
            if (!used && (best == n || fabs(dx[k]) > fabs(dx[best]))) best = k;
        }
        pick[np++] = best;
    }
    for (size_t k = n / 5; k < n && np < 12; k += n / 5 + 1) pick[np++] = k;
    for (int q = 0; q < np; q++) {
        size_t k = pick[q];
        float x0 = x[k];
        x[k] = x0 + eps; double lp = loss(ctx);
        x[k] = x0 - eps; double lm = loss(ctx);
        x[k] = x0;
        double num = (lp - lm) / (2.0 * (double)eps);
        double e = fabs(num - dx[k]) / fmax(fmax(fabs(num), fabs(dx[k])), 0.1 * gmax);
        if (verbose) printf("        [%zu] analytic % .6e numeric % .6e  (max|g| %.3e)\n", k, (double)dx[k], num, gmax);
        worst = fmax(worst, e);
    }
    return worst;
}

/* Random buffers that tests free at exit (no bookkeeping: tests are short). */
static inline float *test_randn(MsRng *r, size_t n, float std) {
    float *x = (float *)ms_alloc_aligned(n ? n : 1, sizeof(float));
    if (!x) { printf("out of memory\n"); exit(2); }
    ms_rng_fill_normal(r, x, n, 0.0f, std);
    return x;
}

static inline float *test_zeros(size_t n) {
    float *x = (float *)ms_alloc_aligned(n ? n : 1, sizeof(float));
    if (!x) { printf("out of memory\n"); exit(2); }
    memset(x, 0, (n ? n : 1) * sizeof(float));
    return x;
}

/* Buffers a test wants freed at exit (keeps LeakSanitizer quiet without bookkeeping). */
static void *test_tracked[8192];
static int test_ntracked;
static inline float *test_track(float *p) {
    if (test_ntracked < (int)(sizeof test_tracked / sizeof test_tracked[0])) test_tracked[test_ntracked++] = p;
    return p;
}
static inline void test_free_tracked(void) { while (test_ntracked > 0) ms_free_aligned(test_tracked[--test_ntracked]); }

/* A path for a temporary file or folder of this run: $TMPDIR (else /tmp) + "/mixshow_<pid>_<name>",
 * so that the test programs of several build folders can run at the same time. */
static inline const char *test_tmp(char *buf, size_t cap, const char *name) {
    const char *dir = getenv("TMPDIR");
    if (!dir || !*dir) dir = "/tmp";
    snprintf(buf, cap, "%s/mixshow_%ld_%s", dir, test_pid(), name);
    return buf;
}

#endif /* MS_TEST_H */
