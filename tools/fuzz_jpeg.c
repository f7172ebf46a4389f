/* tools/fuzz_jpeg.c — libFuzzer entry point for the JPEG decoder (`make fuzz`). */
#include "tools/tools.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    MsImage img;
    if (ms_jpeg_decode(data, size, "fuzz", 0, &img) == MS_OK) ms_image_free(&img);
    return 0;
}
