/* tools/fuzz_zip.c — libFuzzer entry: arbitrary bytes as a torch.save zip file held in memory
 * (pth_open_mem), then every tensor read as float32. `make fuzz`, then e.g.
 *   build/fuzz/fuzz_zip -max_total_time=180 corpus_dir
 * Seeds: the .pth files in tests/data/pth/. */
#include "mixshow.h"
#include "tools/tools.h"

#include <stdlib.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    PthFile f;
    if (pth_open_mem(&f, data, size, "fuzz", (size & 1) ? PTH_LENIENT : 0) != MS_OK) return 0;
    for (size_t i = 0; i < f.n; i++) {
        float *buf = (float *)malloc(pth_numel(&f.t[i]) * sizeof(float) + 4);
        if (!buf) abort();
        (void)pth_read_f32(&f, &f.t[i], buf);
        free(buf);
    }
    pth_close(&f);
    return 0;
}
