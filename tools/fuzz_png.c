/* tools/fuzz_png.c — libFuzzer entry point for the PNG decoder (`make fuzz`). Every input must
 * decode or fail with a message; sanitizers catch the rest. The input is decoded as is, then
 * again with every chunk CRC recomputed (otherwise almost every mutation stops at the CRC
 * check), natively at 8 bits and as 16-bit RGBA; a successful decode is re-encoded and must
 * round-trip. */
#include "tools/tools.h"

#include <stdlib.h>
#include <string.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static void decode(const uint8_t *data, size_t size) {
    MsImage img;
    if (ms_png_decode(data, size, "fuzz", 0, 8, &img) == MS_OK) {
        if (img.channels >= 1 && img.channels <= 4 && (size_t)img.w * img.h <= 4096) {
            uint8_t *png;
            size_t n;
            MsImage back;
            if (ms_png_encode((const uint8_t *)img.data, img.w, img.h, img.channels, &png, &n) == MS_OK) {
                if (ms_png_decode(png, n, "fuzz-reencoded", 0, 8, &back) != MS_OK ||
                    memcmp(back.data, img.data, (size_t)img.w * img.h * img.channels) != 0)
                    abort();   /* our own encoder's output must decode to the same pixels */
                ms_image_free(&back);
                free(png);
            }
        }
        ms_image_free(&img);
    }
    if (ms_png_decode(data, size, "fuzz", 4, 16, &img) == MS_OK) ms_image_free(&img);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    decode(data, size);
    uint8_t *fixed = (uint8_t *)malloc(size ? size : 1);
    if (!fixed) return 0;
    if (size) memcpy(fixed, data, size);
    for (size_t pos = 8; pos + 12 <= size;) {
        size_t len = (size_t)fixed[pos] << 24 | (size_t)fixed[pos + 1] << 16 | (size_t)fixed[pos + 2] << 8 | fixed[pos + 3];
        if (len > size - pos - 12) break;
        uint32_t crc = ms_crc32(0, fixed + pos + 4, len + 4);
        for (int k = 0; k < 4; k++) fixed[pos + 8 + len + (size_t)k] = (uint8_t)(crc >> (24 - 8 * k));
        pos += len + 12;
    }
    decode(fixed, size);
    free(fixed);
    return 0;
}
