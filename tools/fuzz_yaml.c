/* tools/fuzz_yaml.c — libFuzzer entry point for the YAML subset reader, --set and the training
 * config reader (`make fuzz`). An accepted document must write out as JSON that json.c reads
 * back to the same tree; when the YAML reader also accepts that JSON (YAML flow syntax is
 * nearly a superset of JSON), it must give the same tree again. */
#include "tools/tools.h"

#include <stdlib.h>
#include <string.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

/* Same tree; numbers compare by value (JSON writes -0.0 as "-0", which YAML reads as the int 0). */
static void same_tree(const JsonValue *a, const JsonValue *b) {
    if (a->type != b->type || a->count != b->count || a->key_len != b->key_len || (a->key_len && memcmp(a->key, b->key, a->key_len)))
        abort();
    if (a->type == JSON_BOOL && a->boolean != b->boolean) abort();
    if (a->type == JSON_NUMBER && a->number != b->number) abort();
    if (a->type == JSON_STRING && (a->len != b->len || memcmp(a->str, b->str, a->len))) abort();
    for (size_t i = 0; i < a->count; i++) same_tree(&a->items[i], &b->items[i]);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    JsonValue *v = NULL, *w = NULL;
    JsonBuf a = { NULL, 0, 0 };
    TrainDataConfig d;
    MsTrainConfig m;
    if (yaml_parse((const char *)data, size, "fuzz", &v) != MS_OK) {
        if (yaml_parse_value((const char *)data, size, "fuzz-value", &v) == MS_OK) json_free(v);
        return 0;
    }
    if (json_write(&a, v, 0) == MS_OK) {                   /* fails only for .inf / .nan */
        if (json_parse(a.data, a.len, "fuzz-json", &w) != MS_OK) abort();
        same_tree(v, w);
        json_free(w); w = NULL;
        if (yaml_parse(a.data, a.len, "fuzz-json-as-yaml", &w) == MS_OK) same_tree(v, w);
        json_free(w);
    }
    jbuf_free(&a);
    (void)train_config_from_yaml(v, &d, &m);
    if (v->type == JSON_OBJECT) {
        static const char *const sets[] = { "models.noise_offset=0.02", "a.b.c=[1, {x: y}]", "train=", "name=!!str 1" };
        for (size_t i = 0; i < sizeof sets / sizeof *sets; i++) (void)yaml_apply_set(v, sets[i]);
        (void)train_config_from_yaml(v, &d, &m);
    }
    json_free(v);
    return 0;
}
