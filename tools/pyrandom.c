/* tools/pyrandom.c — CPython 3.11's `random` module, the draws the official Mix-of-Show data
 * pipeline makes: random.seed(int), random(), getrandbits(k), randrange/randint (_randbelow via
 * getrandbits), uniform, shuffle, choice. References: Lib/random.py and
 * Modules/_randommodule.c of CPython 3.11 (mt19937ar by Matsumoto and Nishimura, with
 * init_by_array seeding). tests/test_data.c compares thousands of draws with Python. */
#include "tools/tools.h"

#include <string.h>

#define PY_N 624
#define PY_M 397

static void py_init_genrand(PyRandom *r, uint32_t s) {          /* _randommodule.c init_genrand */
    r->mt[0] = s;
    for (int i = 1; i < PY_N; i++)
        r->mt[i] = 1812433253u * (r->mt[i - 1] ^ (r->mt[i - 1] >> 30)) + (uint32_t)i;
    r->index = PY_N;
}

static void py_init_by_array(PyRandom *r, const uint32_t *key, int len) {
    int i = 1, j = 0, k;
    py_init_genrand(r, 19650218u);
    for (k = PY_N > len ? PY_N : len; k; k--) {
        r->mt[i] = (r->mt[i] ^ ((r->mt[i - 1] ^ (r->mt[i - 1] >> 30)) * 1664525u)) + key[j] + (uint32_t)j;
        i++; j++;
        if (i >= PY_N) { r->mt[0] = r->mt[PY_N - 1]; i = 1; }
        if (j >= len) j = 0;
    }
    for (k = PY_N - 1; k; k--) {
        r->mt[i] = (r->mt[i] ^ ((r->mt[i - 1] ^ (r->mt[i - 1] >> 30)) * 1566083941u)) - (uint32_t)i;
        i++;
        if (i >= PY_N) { r->mt[0] = r->mt[PY_N - 1]; i = 1; }
    }
    r->mt[0] = 0x80000000u;                                    /* MSB is 1: non-zero initial array */
}

/* random.seed(n) for an int n: the 32-bit words of |n|, least significant first (one zero
 * word for n == 0), through init_by_array. */
void py_random_seed(PyRandom *r, uint64_t n) {
    uint32_t key[2];
    int len = 1;
    key[0] = (uint32_t)n;
    key[1] = (uint32_t)(n >> 32);
    if (key[1]) len = 2;
    py_init_by_array(r, key, len);
}

void py_random_seed_i64(PyRandom *r, int64_t n) {
    py_random_seed(r, n < 0 ? (uint64_t)0 - (uint64_t)n : (uint64_t)n);
}

uint32_t py_random_u32(PyRandom *r) {                           /* genrand_uint32 */
    static const uint32_t mag01[2] = { 0u, 0x9908b0dfu };
    uint32_t y;
    if (r->index >= PY_N) {
        int kk;
        for (kk = 0; kk < PY_N - PY_M; kk++) {
            y = (r->mt[kk] & 0x80000000u) | (r->mt[kk + 1] & 0x7fffffffu);
            r->mt[kk] = r->mt[kk + PY_M] ^ (y >> 1) ^ mag01[y & 1u];
        }
        for (; kk < PY_N - 1; kk++) {
            y = (r->mt[kk] & 0x80000000u) | (r->mt[kk + 1] & 0x7fffffffu);
            r->mt[kk] = r->mt[kk + (PY_M - PY_N)] ^ (y >> 1) ^ mag01[y & 1u];
        }
        y = (r->mt[PY_N - 1] & 0x80000000u) | (r->mt[0] & 0x7fffffffu);
        r->mt[PY_N - 1] = r->mt[PY_M - 1] ^ (y >> 1) ^ mag01[y & 1u];
        r->index = 0;
    }
    y = r->mt[r->index++];
    y ^= (y >> 11);
    y ^= (y << 7) & 0x9d2c5680u;
    y ^= (y << 15) & 0xefc60000u;
    y ^= (y >> 18);
    return y;
}

/* random(): 53 bits from two words, (a*2^26 + b) / 2^53 with a = w1 >> 5, b = w2 >> 6. */
double py_random_random(PyRandom *r) {
    uint32_t a = py_random_u32(r) >> 5, b = py_random_u32(r) >> 6;
    return ((double)a * 67108864.0 + (double)b) * (1.0 / 9007199254740992.0);
}

/* getrandbits(k), 0 <= k <= 64: words fill from the least significant end; the last (most
 * significant) word keeps its top bits only. */
uint64_t py_random_getrandbits(PyRandom *r, int k) {
    if (k <= 0) return 0;
    if (k > 64) k = 64;
    if (k <= 32) return py_random_u32(r) >> (32 - k);
    uint64_t lo = py_random_u32(r);
    uint64_t hi = py_random_u32(r) >> (64 - k);
    return lo | hi << 32;
}

/* _randbelow_with_getrandbits(n), n >= 1: k = n.bit_length(), draw until below n. */
uint64_t py_random_randbelow(PyRandom *r, uint64_t n) {
    int k = 0;
    uint64_t v;
    if (n == 0) return 0;                    /* Python raises; callers check ranges first */
    while (k < 64 && (n >> k)) k++;
    do v = py_random_getrandbits(r, k); while (v >= n);
    return v;
}

/* randint(a, b) == randrange(a, b + 1) == a + _randbelow(b - a + 1). a <= b. */
int64_t py_random_randint(PyRandom *r, int64_t a, int64_t b) {
    uint64_t width = (uint64_t)b - (uint64_t)a + 1u;
    return (int64_t)((uint64_t)a + py_random_randbelow(r, width));
}

double py_random_uniform(PyRandom *r, double a, double b) { return a + (b - a) * py_random_random(r); }

/* shuffle(x) (3.11): for i in reversed(range(1, n)): j = _randbelow(i + 1); swap x[i], x[j]. */
void py_random_shuffle(PyRandom *r, void *items, size_t n, size_t elem_size) {
    unsigned char *p = (unsigned char *)items, tmp[256];
    if (n < 2) return;
    for (size_t i = n - 1; i >= 1; i--) {
        size_t j = (size_t)py_random_randbelow(r, (uint64_t)i + 1u);
        if (j != i) {
            unsigned char *a = p + i * elem_size, *b = p + j * elem_size;
            for (size_t off = 0; off < elem_size; off += sizeof tmp) {   /* swap in chunks */
                size_t m = elem_size - off < sizeof tmp ? elem_size - off : sizeof tmp;
                memcpy(tmp, a + off, m); memcpy(a + off, b + off, m); memcpy(b + off, tmp, m);
            }
        }
    }
}

/* choice(seq): seq[_randbelow(len(seq))]; returns the index. n >= 1. */
size_t py_random_choice(PyRandom *r, size_t n) { return (size_t)py_random_randbelow(r, (uint64_t)n); }
