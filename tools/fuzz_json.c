/* tools/fuzz_json.c — libFuzzer entry point for the JSON reader and writer (`make fuzz`).
 * Every accepted input must write out, parse back, and write out again to the same bytes
 * (compact and indented). */
#include "tools/tools.h"

#include <stdlib.h>
#include <string.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    JsonValue *v = NULL, *w = NULL;
    if (json_parse((const char *)data, size, "fuzz", &v) != MS_OK) return 0;
    for (int indent = 0; indent <= 2; indent += 2) {
        JsonBuf a = { NULL, 0, 0 }, b = { NULL, 0, 0 };
        if (json_write(&a, v, indent) == MS_OK) {
            if (json_parse(a.data, a.len, "fuzz-rewritten", &w) != MS_OK) abort();
            if (json_write(&b, w, indent) != MS_OK || a.len != b.len || memcmp(a.data, b.data, a.len)) abort();
            json_free(w);
            w = NULL;
        }
        jbuf_free(&a); jbuf_free(&b);
    }
    json_get(v, "a");
    json_at(v, 0);
    json_free(v);
    return 0;
}
