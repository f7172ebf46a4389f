/* tools/fuzz_pickle.c — libFuzzer entry: arbitrary bytes through the restricted unpickler
 * (pth_parse_pickle: unpickle, flatten, summarize; no zip). `make fuzz`, then e.g.
 *   build/fuzz/fuzz_pickle -max_total_time=180 corpus_dir
 * Seeds: the data.pkl members of the .pth files in tests/data/pth/. */
#include "mixshow.h"
#include "tools/tools.h"

#include <stdlib.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    for (int flags = 0; flags <= PTH_LENIENT; flags++) {    /* strict, then lenient */
        char *summary = NULL;
        if (pth_parse_pickle(data, size, flags, &summary) == MS_OK && !summary) abort();
        free(summary);
    }
    return 0;
}
