/* tools/fuzz_inflate.c — libFuzzer entry point for inflate/deflate (`make fuzz`). The first
 * byte picks raw deflate or zlib; the rest is inflated (capped at 1 MiB, into a growing and a
 * fixed buffer, which must agree), and whatever inflates is deflated again and must round-trip. */
#include "tools/tools.h"

#include <stdlib.h>
#include <string.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    if (size < 1) return 0;
    int zl = data[0] & 1, level = (data[0] >> 1) % 10;
    uint8_t *out, *z, *back;
    size_t n, zn, bn;
    MsStatus st = ms_inflate(data + 1, size - 1, zl, (size_t)1 << 20, &out, &n);
    static uint8_t fixed[1 << 20];
    size_t fn;
    MsStatus st2 = ms_inflate_into(data + 1, size - 1, zl, fixed, sizeof fixed, &fn);
    if ((st == MS_OK) != (st2 == MS_OK)) abort();
    if (st != MS_OK) return 0;
    if (fn != n || memcmp(fixed, out, n) != 0) abort();
    if (ms_deflate(out, n, zl, level, &z, &zn) == MS_OK) {
        if (ms_inflate(z, zn, zl, n, &back, &bn) != MS_OK || bn != n || memcmp(back, out, n) != 0) abort();
        free(back);
        free(z);
    }
    free(out);
    return 0;
}
