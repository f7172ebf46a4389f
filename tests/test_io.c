/* tests/test_io.c — JSON and safetensors codecs (tools/json.c, tools/safetensors.c).
 *
 * Independent references: PyTorch's own float16/bfloat16 conversions and a pure-Python
 * safetensors writer (tests/data/io_reference.safetensors from tools/ref/gen_bad_files.py),
 * the byte layouts of the huggingface/safetensors writer, round-to-nearest-even computed in
 * double with rint(), the C compiler's own reading of decimal literals, and tests/data/bad/
 * (hostile files that must fail with a message). Also run under ASan/UBSan.
 */
#include "tests/test.h"
#include "tools/tools.h"

#include <locale.h>
#include <time.h>

#define REF_FILE "tests/data/io_reference.safetensors"
#define BAD_DIR "tests/data/bad/"

static uint32_t f2u(float x) { uint32_t u; memcpy(&u, &x, 4); return u; }
static float u2f(uint32_t u) { float x; memcpy(&x, &u, 4); return x; }
static uint64_t d2u(double x) { uint64_t u; memcpy(&u, &x, 8); return u; }
static int same_float(float a, float b) { return (a != a && b != b) || f2u(a) == f2u(b); }   /* NaN == NaN */

static uint64_t le(const unsigned char *p, size_t n) { uint64_t v = 0; while (n--) v = v << 8 | p[n]; return v; }

/* A scratch path no other test run uses (several builds run tests in the same checkout). */
static const char *tmp_path(const char *suffix) {
    static char buf[512];
    static unsigned counter;
    const char *dir = getenv("TMPDIR");
    if (!dir || !*dir) dir = getenv("TEMP");
    if (!dir || !*dir) dir = "/tmp";
    snprintf(buf, sizeof buf, "%s/mixshow_test_io_%lu_%lu_%u%s", dir, (unsigned long)time(NULL),
             (unsigned long)(clock() & 0xffffff), counter++, suffix);
    return buf;
}

static int file_exists(const char *path) { FILE *f = fopen(path, "rb"); if (f) fclose(f); return f != NULL; }

/* ---------------------------------------------------------------------------------------- */
/* JSON                                                                                      */
/* ---------------------------------------------------------------------------------------- */
static JsonValue *parse(const char *text, size_t len) {
    JsonValue *v = NULL;
    if (json_parse(text, len, "t.json", &v) != MS_OK) printf("      parse failed: %s\n", ms_last_error());
    return v;
}

static void expect_json_error(const char *what, const char *text, size_t len, const char *word) {
    JsonValue *v = NULL;
    MsStatus s = json_parse(text, len, "t.json", &v);
    check(s == MS_ERR_FORMAT && !v && strstr(ms_last_error(), word), "%s rejected: %s", what, ms_last_error());
    json_free(v);
}

static void test_json_values(void) {
    const char *text = "{\"a\": [1, 2.5, -0, true, false, null, \"x\"], \"b\": {\"c\": \"d\"}, \"n\": 42}";
    JsonValue *v = parse(text, strlen(text));
    if (!check(v != NULL, "parse an object")) return;
    const JsonValue *a = json_get(v, "a");
    check(v->type == JSON_OBJECT && json_len(v) == 3 && a && a->type == JSON_ARRAY && json_len(a) == 7, "object with 3 keys, array of 7");
    check(json_at(a, 0)->number == 1.0 && json_at(a, 1)->number == 2.5 && json_at(a, 2)->number == 0.0 &&
          d2u(json_at(a, 2)->number) == d2u(-0.0), "numbers 1, 2.5, -0 (sign kept)");
    check(json_at(a, 3)->type == JSON_BOOL && json_at(a, 3)->boolean == 1 && json_at(a, 4)->boolean == 0 &&
          json_at(a, 5)->type == JSON_NULL && !strcmp(json_at(a, 6)->str, "x") && json_at(a, 7) == NULL, "true false null \"x\", index past end");
    check(!strcmp(json_get_string(json_get(v, "b"), "c", "?"), "d") && json_get_int(v, "n", -1) == 42 &&
          json_get_int(v, "missing", -1) == -1 && json_get_number(v, "b", 7.0) == 7.0 && json_get_bool(v, "n", 3) == 3,
          "getters and defaults");
    const char *s = NULL; int64_t i = 0; double d = 0;
    MsStatus st = json_need_string(v, "n", &s);
    check(st == MS_ERR_FORMAT && strstr(ms_last_error(), "t.json:1:") && strstr(ms_last_error(), "key 'n': expected a string, found a number"),
          "json_need_string on a number: %s", ms_last_error());
    st = json_need_int(a, "x", &i);
    check(st == MS_ERR_FORMAT && strstr(ms_last_error(), "expected an object"), "json_need on an array: %s", ms_last_error());
    st = json_need_number(v, "zzz", &d);
    check(st == MS_ERR_FORMAT && strstr(ms_last_error(), "missing key 'zzz'"), "missing key: %s", ms_last_error());
    check(json_as_int(json_at(a, 1), "a[1]", &i) == MS_ERR_FORMAT && strstr(ms_last_error(), "non-integral"), "2.5 is not an integer: %s", ms_last_error());
    check(json_need_int(v, "n", &i) == MS_OK && i == 42, "json_need_int 42");
    json_free(v);

    /* error positions: line:col of the offending byte */
    const char *bad = "{\n  \"a\": 1,\n  \"b\": x\n}";
    expect_json_error("bad value", bad, strlen(bad), "t.json:3:8: expected a value, found 'x'");
    const char *dup = "{\n  \"lr\": 1,\n  \"steps\": 2,\n  \"lr\": 3\n}";
    expect_json_error("duplicate key", dup, strlen(dup), "t.json:4:3: duplicate key 'lr'");
    const char *bom = "\xEF\xBB\xBF[1]";
    v = parse(bom, strlen(bom));
    check(v && json_len(v) == 1, "a UTF-8 byte order mark is skipped");
    json_free(v);
}

static void test_json_strings(void) {
    const char *text = "[\"\\\"\\\\\\/\\b\\f\\n\\r\\t\", \"\\u00e9\\u20AC\\ud83d\\ude00\", \"a\\u0000b\", \"\xc3\xa9\xe2\x82\xac\xf0\x9f\x98\x80\", \"\"]";
    JsonValue *v = parse(text, strlen(text));
    if (!check(v && json_len(v) == 5, "parse 5 strings")) { json_free(v); return; }
    check(json_at(v, 0)->len == 8 && !memcmp(json_at(v, 0)->str, "\"\\/\b\f\n\r\t", 8), "simple escapes");
    check(json_at(v, 1)->len == 9 && !memcmp(json_at(v, 1)->str, "\xc3\xa9\xe2\x82\xac\xf0\x9f\x98\x80", 9), "\\u escapes incl. a surrogate pair -> UTF-8");
    check(json_at(v, 2)->len == 3 && !memcmp(json_at(v, 2)->str, "a\0b", 3), "\\u0000 kept, len counts it");
    check(json_at(v, 3)->len == 9 && !memcmp(json_at(v, 3)->str, json_at(v, 1)->str, 9), "raw UTF-8 passes through");
    check(json_at(v, 4)->len == 0 && json_at(v, 4)->str && json_at(v, 4)->str[0] == '\0', "empty string");
    json_free(v);

    /* writer: serde_json's escaping; every byte 1..127 and some UTF-8 survive a round trip */
    JsonBuf b = { NULL, 0, 0 };
    json_write_string(&b, "q\"b\\s/\x01\x1f\n\t\x7f\xc3\xa9", 13);
    check(b.data && !strcmp(b.data, "\"q\\\"b\\\\s/\\u0001\\u001f\\n\\t\x7f\xc3\xa9\""), "escaped as serde_json: %s", b.data ? b.data : "");
    jbuf_free(&b);
    char all[200];
    size_t n = 0;
    for (int c = 1; c < 128; c++) all[n++] = (char)c;
    memcpy(all + n, "\xf0\x9f\x98\x80\xe2\x82\xac", 7); n += 7;
    all[n++] = '\0'; all[n++] = 'z';
    json_write_string(&b, all, n);
    v = parse(b.data, b.len);
    check(v && v->type == JSON_STRING && v->len == n && !memcmp(v->str, all, n), "string round trip (bytes 0..127 + UTF-8)");
    json_free(v); jbuf_free(&b);

    expect_json_error("lone high surrogate", "[\"\\ud800\"]", 10, "surrogate");
    expect_json_error("lone low surrogate", "[\"\\udfff\"]", 10, "surrogate");
    expect_json_error("overlong UTF-8", "[\"\xc0\xaf\"]", 6, "UTF-8");
    expect_json_error("UTF-8 surrogate", "[\"\xed\xb0\x80\"]", 7, "UTF-8");
    expect_json_error("above U+10FFFF", "[\"\xf4\x90\x80\x80\"]", 8, "UTF-8");
    expect_json_error("raw tab", "[\"a\tb\"]", 7, "control");
    expect_json_error("NUL outside a string", "[1]\0", 4, "end of input");
}

static void test_json_numbers(void) {
    static const struct { const char *text; double want; } cases[] = {
        { "1e308", 1e308 }, { "-0", -0.0 }, { "5e-324", 4.9406564584124654e-324 }, { "0.1", 0.1 },
        { "2.2250738585072014e-308", 2.2250738585072014e-308 }, { "1.7976931348623157e308", 1.7976931348623157e308 },
        { "123456789012345678901234567890", 123456789012345678901234567890.0 }, { "-1.5E-3", -1.5e-3 },
        { "1E+2", 100.0 }, { "0", 0.0 }, { "9007199254740993", 9007199254740992.0 }, { "2.4703282292062328e-324", 4.9406564584124654e-324 },
        { "0.30000000000000004", 0.30000000000000004 }, { "1e-400", 0.0 },
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        JsonValue *v = parse(cases[i].text, strlen(cases[i].text));
        check(v && v->type == JSON_NUMBER && d2u(v->number) == d2u(cases[i].want), "number %s -> %.17g", cases[i].text, v ? v->number : 0.0);
        json_free(v);
    }
    static const struct { double x; const char *want; } out[] = {
        { 0.1, "0.1" }, { 1e308, "1e+308" }, { -0.0, "-0" }, { 4.9406564584124654e-324, "5e-324" }, { 1.0 / 3, "0.3333333333333333" },
        { 100.0, "100" }, { 9007199254740992.0, "9007199254740992" }, { 1e20, "1e+20" }, { -2.5e-7, "-2.5e-07" }, { 0.30000000000000004, "0.30000000000000004" },
    };
    for (size_t i = 0; i < sizeof out / sizeof out[0]; i++) {
        JsonBuf b = { NULL, 0, 0 };
        MsStatus s = json_write_number(&b, out[i].x);
        check(s == MS_OK && !strcmp(b.data, out[i].want), "write %.17g -> %s (want %s)", out[i].x, b.data ? b.data : "", out[i].want);
        jbuf_free(&b);
    }
    JsonBuf b = { NULL, 0, 0 };
    check(json_write_number(&b, INFINITY) == MS_ERR_ARG && json_write_number(&b, NAN) == MS_ERR_ARG, "inf/nan have no JSON form");
    jbuf_free(&b);

    /* round trip: write -> parse is bit-exact for random finite doubles and floats */
    MsRng r;
    ms_rng_seed(&r, 99);
    int bad = 0, tried = 0;
    for (int i = 0; i < 20000; i++) {
        uint64_t u = ms_rng_u64(&r);
        double x;
        if (i % 2) x = (double)u2f((uint32_t)u); else memcpy(&x, &u, 8);
        if (!isfinite(x)) continue;
        tried++;
        b.len = 0;
        json_write_number(&b, x);
        JsonValue *v = NULL;
        if (json_parse(b.data, b.len, "rt", &v) != MS_OK || d2u(v->number) != d2u(x)) { if (!bad++) printf("      %.17g -> %s\n", x, b.data); }
        json_free(v);
    }
    jbuf_free(&b);
    check(bad == 0, "%d random doubles/floats survive write -> parse bit-exactly (%d failed)", tried, bad);

    /* a locale with a decimal comma changes neither reading nor writing */
    const char *loc = setlocale(LC_NUMERIC, "de_DE.UTF-8");
    if (!loc) loc = setlocale(LC_NUMERIC, "fr_FR.UTF-8");
    if (loc && localeconv()->decimal_point[0] == ',') {
        JsonValue *v = parse("[0.5, 1.25e3]", 13);
        JsonBuf w = { NULL, 0, 0 };
        if (v) json_write(&w, v, 0);
        check(v && json_at(v, 0)->number == 0.5 && json_at(v, 1)->number == 1250.0 && w.data && !strcmp(w.data, "[0.5,1250]"),
              "numbers under locale %s", loc);
        w.len = 0;
        json_write_number(&w, 0.1);
        check(!strcmp(w.data, "0.1"), "writes '.' under locale %s: %s", loc, w.data);
        json_free(v); jbuf_free(&w);
    } else if (test_is_verbose()) {
        printf("  (no decimal-comma locale installed: locale test skipped)\n");
    }
    setlocale(LC_NUMERIC, "C");
}

static void test_json_limits(void) {
    char deep[2 * (JSON_MAX_DEPTH + 1) + 1];
    for (int d = JSON_MAX_DEPTH; d <= JSON_MAX_DEPTH + 1; d++) {
        for (int i = 0; i < d; i++) { deep[i] = '['; deep[2 * d - 1 - i] = ']'; }
        JsonValue *v = NULL;
        MsStatus s = json_parse(deep, (size_t)(2 * d), "deep.json", &v);
        if (d == JSON_MAX_DEPTH) check(s == MS_OK, "nesting %d accepted", d);
        else check(s == MS_ERR_FORMAT && strstr(ms_last_error(), "nesting deeper than 256"), "nesting %d refused: %s", d, ms_last_error());
        json_free(v);
    }
    /* duplicates in a big object (the sorted check) */
    JsonBuf b = { NULL, 0, 0 };
    jbuf_puts(&b, "{");
    for (int i = 0; i < 1000; i++) { char k[32]; snprintf(k, sizeof k, "%s\"key%d\":%d", i ? "," : "", i, i); jbuf_puts(&b, k); }
    jbuf_puts(&b, ",\"key777\":0}");
    expect_json_error("duplicate among 1001 keys", b.data, b.len, "duplicate key 'key777'");
    jbuf_free(&b);
    /* value budget: [0,0,...] with JSON_MAX_VALUES zeros is one value too many (the array) */
    size_t n = JSON_MAX_VALUES, len = 2 * n + 1;
    char *big = (char *)malloc(len);
    if (big) {
        big[0] = '[';
        for (size_t i = 0; i < n; i++) { big[1 + 2 * i] = '0'; big[2 + 2 * i] = i + 1 < n ? ',' : ']'; }
        expect_json_error("value budget", big, len, "more than 4194304 values");
        free(big);
    }
}

static void test_json_build(void) {
    JsonValue *o = json_new(JSON_OBJECT), *arr = json_new(JSON_ARRAY), *inner = json_new(JSON_OBJECT);
    check(json_set(o, "name", json_new_string("<new0>", 6)) == MS_OK && json_set(o, "lr", json_new_number(1e-4)) == MS_OK,
          "json_set string and number");
    for (int i = 1; i <= 3; i++) json_push(arr, json_new_number(i));
    json_set(o, "list", arr);
    json_set(inner, "ok", json_new_bool(1));
    json_set(inner, "none", json_new(JSON_NULL));
    json_set(o, "inner", inner);
    json_set(o, "lr", json_new_number(2e-4));                 /* replaces, keeps the position */
    check(json_push(o, json_new_number(1)) == MS_ERR_ARG, "json_push on an object is refused");
    JsonBuf c = { NULL, 0, 0 }, p = { NULL, 0, 0 };
    json_write(&c, o, 0);
    const char *want = "{\"name\":\"<new0>\",\"lr\":0.0002,\"list\":[1,2,3],\"inner\":{\"ok\":true,\"none\":null}}";
    check(c.data && !strcmp(c.data, want), "compact writer: %s", c.data ? c.data : "");
    json_write(&p, o, 2);
    JsonValue *back = parse(p.data, p.len);
    JsonBuf c2 = { NULL, 0, 0 };
    if (back) json_write(&c2, back, 0);
    check(back && c2.data && !strcmp(c2.data, want), "indented output parses back to the same tree");
    check(p.data && strstr(p.data, "\n  \"list\": [\n    1,\n"), "indented layout");
    const char *path = tmp_path(".json");
    JsonValue *f = NULL;
    check(json_write_file(path, o, 2) == MS_OK && json_parse_file(path, &f) == MS_OK && json_get_number(f, "lr", 0) == (double)2e-4,
          "json_write_file + json_parse_file");
    char tmp[600];
    snprintf(tmp, sizeof tmp, "%s.tmp", path);
    check(!file_exists(tmp), "no .tmp file left behind");
    remove(path);
    JsonValue *g = NULL;
    check(json_parse_file(path, &g) == MS_ERR_IO && !g && strstr(ms_last_error(), path), "missing file: %s", ms_last_error());
    /* a parsed tree moved into a built one keeps working after its root is gone */
    JsonValue *parsed = parse("{\"k\": [1, 2]}", 13);
    check(json_set(o, "parsed", parsed) == MS_OK && json_len(json_get(json_get(o, "parsed"), "k")) == 2, "adopt a parsed tree");
    json_free(f); json_free(back); json_free(o);
    jbuf_free(&c); jbuf_free(&p); jbuf_free(&c2);
}

/* ---------------------------------------------------------------------------------------- */
/* float16 / bfloat16                                                                        */
/* ---------------------------------------------------------------------------------------- */
/* Nearest with ties to even, in double: units of 2^(e - p) where p = significand bits - 1,
 * never finer than the smallest subnormal; overflow past max goes to inf. */
static float round_ref(float x, int mant_bits, int min_exp, double max_finite) {
    if (x != x || isinf(x) || x == 0) return x;
    int e;
    frexp((double)x, &e);                                 /* |x| = m 2^e, m in [0.5, 1) */
    int ue = e - 1 - mant_bits;
    if (ue < min_exp - mant_bits) ue = min_exp - mant_bits;
    double ulp = ldexp(1.0, ue), y = rint((double)x / ulp) * ulp;
    if (fabs(y) > max_finite) return x > 0 ? INFINITY : -INFINITY;
    return (float)y;
}

static void test_half_conversions(void) {
    int bad16 = 0, badbf = 0, n = 0;
    for (uint64_t u = 0; u < 0x100000000ull; u += 4099) {     /* ~1M float bit patterns */
        float x = u2f((uint32_t)u);
        float h = st_f16_to_f32(st_f32_to_f16(x)), hr = round_ref(x, 10, -14, 65504.0);
        float bf = st_bf16_to_f32(st_f32_to_bf16(x)), bfr = round_ref(x, 7, -126, 3.3895313892515355e38);
        if (!same_float(h, hr) || (x != x && !(st_f32_to_f16(x) & 0x200))) { if (!bad16++) printf("      f16 %a: %a vs %a\n", x, h, hr); }
        if (!same_float(bf, bfr) || (x != x && !(st_f32_to_bf16(x) & 0x40))) { if (!badbf++) printf("      bf16 %a: %a vs %a\n", x, bf, bfr); }
        n++;
    }
    check(bad16 == 0, "f32 -> f16 round to nearest even on %d bit patterns (%d wrong)", n, bad16);
    check(badbf == 0, "f32 -> bf16 round to nearest even on %d bit patterns (%d wrong)", n, badbf);
    /* hand-picked: max, overflow threshold, ties, subnormals */
    check(st_f32_to_f16(65504.0f) == 0x7bff && st_f32_to_f16(65519.996f) == 0x7bff && st_f32_to_f16(65520.0f) == 0x7c00 &&
          st_f32_to_f16(-INFINITY) == 0xfc00, "f16 max and overflow to inf at 65520");
    check(st_f32_to_f16(1.0f + 0x1p-11f) == 0x3c00 && st_f32_to_f16(1.0f + 3 * 0x1p-11f) == 0x3c02, "f16 ties go to even");
    check(st_f32_to_f16(0x1p-24f) == 0x0001 && st_f32_to_f16(0x1p-25f) == 0x0000 && st_f32_to_f16(0x1.8p-25f) == 0x0001 &&
          st_f32_to_f16(-0x1p-25f) == 0x8000 && st_f32_to_f16(0x1.ffap-15f) == 0x03ff && st_f32_to_f16(0x1.ffcp-15f) == 0x0400,
          "f16 subnormals, the tie at 2^-25 and the carry into the smallest normal");
    check(st_f32_to_bf16(1.0f + 0x1p-8f) == 0x3f80 && st_f32_to_bf16(1.0f + 3 * 0x1p-8f) == 0x3f82 &&
          st_f32_to_bf16(3.4028235e38f) == 0x7f80, "bf16 ties to even, FLT_MAX rounds to inf");
    check(st_f16_to_f32(0x0001) == 0x1p-24f && st_f16_to_f32(0x7bff) == 65504.0f && st_f16_to_f32(0x8000) == 0.0f &&
          (f2u(st_f16_to_f32(0x8000)) >> 31) && isinf(st_f16_to_f32(0x7c00)) && st_f16_to_f32(0x7e00) != st_f16_to_f32(0x7e00),
          "f16 -> f32 specials");
}

/* ---------------------------------------------------------------------------------------- */
/* safetensors                                                                               */
/* ---------------------------------------------------------------------------------------- */
static void le_to_host(void *dst, const unsigned char *src, size_t numel, size_t sz) {
    for (size_t i = 0; i < numel; i++) {
        uint64_t v = le(src + i * sz, sz);
        unsigned char *d = (unsigned char *)dst + i * sz;
        if (sz == 1) { uint8_t w = (uint8_t)v; memcpy(d, &w, 1); }
        if (sz == 2) { uint16_t w = (uint16_t)v; memcpy(d, &w, 2); }
        if (sz == 4) { uint32_t w = (uint32_t)v; memcpy(d, &w, 4); }
        if (sz == 8) memcpy(d, &v, 8);
    }
}

static const float *tensor_f32(const StFile *f, const char *name, size_t *n, float **own) {
    *own = NULL; *n = 0;
    if (st_load_f32(f, name, own, n) != MS_OK) { check(0, "read %s: %s", name, ms_last_error()); return NULL; }
    return *own;
}

static void test_reference_file(void) {
    StFile f;
    if (!check(st_open(&f, REF_FILE) == MS_OK, "open %s", REF_FILE)) { printf("      %s\n", ms_last_error()); return; }
    check(f.count == 19 && st_meta(&f, "format") && !strcmp(st_meta(&f, "format"), "pt"), "19 tensors, metadata format=pt");
    const char *note = st_meta(&f, "note");
    check(note && !strcmp(note, "\xc3\xbcn\xc3\xaf \"quoted\" \\ \n\t \x01 \x7f \xf0\x9f\x98\x80 /"), "metadata string with escapes and UTF-8");

    /* every f16 bit pattern -> f32 equals torch's .float() */
    const StTensor *all = st_find(&f, "f16_all");
    size_t n = 0; float *want = NULL, *got = NULL;
    tensor_f32(&f, "f16_all.f32", &n, &want);
    if (all && want && n == 65536) {
        int bad = 0;
        for (size_t i = 0; i < n; i++) if (!same_float(st_f16_to_f32((uint16_t)le(all->data + 2 * i, 2)), want[i])) bad++;
        check(bad == 0, "all 65536 f16 -> f32 equal torch (%d differ)", bad);
        tensor_f32(&f, "f16_all", &n, &got);
        int bad2 = 0;
        for (size_t i = 0; got && i < n; i++) if (!same_float(got[i], want[i])) bad2++;
        check(got && bad2 == 0, "st_to_f32(F16) equals torch on all patterns (%d differ)", bad2);
    }
    ms_free_aligned(want); ms_free_aligned(got);

    /* f32 -> f16 / bf16 equal torch's .half() / .bfloat16() bit for bit (NaN: both NaN) */
    const StTensor *e16 = st_find(&f, "f32_edges.f16"), *ebf = st_find(&f, "f32_edges.bf16");
    float *edges = NULL;
    tensor_f32(&f, "f32_edges", &n, &edges);
    if (edges && e16 && ebf && e16->numel == n && ebf->numel == n) {
        int bad16 = 0, badbf = 0;
        for (size_t i = 0; i < n; i++) {
            uint16_t t16 = (uint16_t)le(e16->data + 2 * i, 2), tbf = (uint16_t)le(ebf->data + 2 * i, 2);
            uint16_t m16 = st_f32_to_f16(edges[i]), mbf = st_f32_to_bf16(edges[i]);
            if (edges[i] != edges[i]) {
                if (!isnan(st_f16_to_f32(m16)) || !isnan(st_f16_to_f32(t16))) bad16++;
                if (!isnan(st_bf16_to_f32(mbf)) || !isnan(st_bf16_to_f32(tbf))) badbf++;
                continue;
            }
            if (m16 != t16) { if (!bad16++) printf("      f16 of %a: %04x, torch %04x\n", edges[i], m16, t16); }
            if (mbf != tbf) { if (!badbf++) printf("      bf16 of %a: %04x, torch %04x\n", edges[i], mbf, tbf); }
        }
        check(bad16 == 0, "f32 -> f16 equals torch .half() on %zu edge values", n);
        check(badbf == 0, "f32 -> bf16 equals torch .bfloat16() on %zu edge values", n);
    }
    ms_free_aligned(edges);

    /* other dtypes -> f32 equal torch's .float() */
    static const char *const conv[] = { "f64", "i64", "i32" };
    for (int c = 0; c < 3; c++) {
        char key[32];
        snprintf(key, sizeof key, "%s.f32", conv[c]);
        float *a = NULL, *b = NULL; size_t na = 0, nb = 0;
        tensor_f32(&f, conv[c], &na, &a);
        tensor_f32(&f, key, &nb, &b);
        int bad = !a || !b || na != nb;
        for (size_t i = 0; !bad && i < na; i++) bad = !same_float(a[i], b[i]);
        check(!bad, "%s -> f32 equals torch .float() (%zu values)", conv[c], na);
        ms_free_aligned(a); ms_free_aligned(b);
    }
    float v4[4], v5[5], v256[256];
    check(st_read_f32(&f, "i16", v4, 4, 1, (const int64_t[]){ 4 }) == MS_OK && v4[0] == -32768 && v4[1] == -1 && v4[3] == 32767, "I16 values");
    check(st_read_f32(&f, "i8", v4, 4, 1, (const int64_t[]){ 4 }) == MS_OK && v4[0] == -128 && v4[1] == -1 && v4[3] == 127, "I8 values");
    check(st_read_f32(&f, "bool", v5, 5, -1, NULL) == MS_OK && v5[0] == 1 && v5[1] == 0 && v5[2] == 0 && v5[3] == 1 && v5[4] == 1, "BOOL values");
    int u8ok = st_read_f32(&f, "u8", v256, 256, 1, (const int64_t[]){ 256 }) == MS_OK;
    for (int i = 0; u8ok && i < 256; i++) u8ok = v256[i] == (float)i;
    check(u8ok, "U8 values 0..255");
    const StTensor *sc = st_find(&f, "scalar"), *em = st_find(&f, "empty");
    check(sc && sc->ndim == 0 && sc->numel == 1 && st_read_f32(&f, "scalar", v4, 1, 0, NULL) == MS_OK && v4[0] == 2.5f, "0-dim scalar");
    check(em && em->ndim == 2 && em->shape[0] == 0 && em->shape[1] == 3 && em->numel == 0 && em->nbytes == 0, "empty (0,3) tensor");
    check(st_find(&f, "\xc3\xbcn\xc3\xaf\x63\xc3\xb8\x64\xc3\xa9.w\xc3\xa9ight") && st_find(&f, "we\"ird\\name\n\t\x01/"), "UTF-8 and escaped names");
    check(st_find(&f, "nope") == NULL && st_read_f32(&f, "nope", v4, 1, -1, NULL) == MS_ERR_FORMAT && strstr(ms_last_error(), "no tensor named 'nope'"),
          "missing name: %s", ms_last_error());
    check(st_read_f32(&f, "i16", v4, 4, 2, (const int64_t[]){ 2, 2 }) == MS_ERR_SHAPE && strstr(ms_last_error(), "has shape (4), expected (2,2)"),
          "shape mismatch: %s", ms_last_error());
    check(st_read_f32(&f, "i16", v4, 3, -1, NULL) == MS_ERR_SHAPE, "element count mismatch: %s", ms_last_error());

    /* write the same tensors and metadata back: byte-identical to the Python writer */
    StEntry *e = (StEntry *)calloc(f.count, sizeof *e);
    void **bufs = (void **)calloc(f.count, sizeof *bufs);
    const char **meta = (const char **)calloc(2 * f.meta_count + 1, sizeof *meta);
    for (size_t i = 0; i < f.meta_count; i++) { meta[2 * i] = f.meta_keys[i]; meta[2 * i + 1] = f.meta_vals[i]; }
    for (size_t i = 0; i < f.count; i++) {
        const StTensor *t = &f.tensors[i];
        e[i].name = t->name; e[i].dtype = t->dtype; e[i].ndim = t->ndim;
        memcpy(e[i].shape, t->shape, sizeof e[i].shape);
        bufs[i] = malloc(t->nbytes + 1);
        le_to_host(bufs[i], t->data, t->numel, st_dtype_size(t->dtype));
        e[i].raw = bufs[i];
    }
    unsigned char *img = NULL; size_t size = 0;
    MsStatus s = st_write_memory(e, f.count, meta, f.meta_count, &img, &size);
    check(s == MS_OK && size == f.size && !memcmp(img, f.buf, size), "rewritten file is byte-identical to the Python writer's (%zu bytes)", size);
    free(img);
    for (size_t i = 0; i < f.count; i++) free(bufs[i]);
    free(bufs); free(e); free(meta);
    st_close(&f);
}

/* Byte layouts produced by the reference writer (huggingface/safetensors serialize()). */
static void expect_image(const char *what, const StEntry *e, size_t n, const char *const *meta, size_t nm, const char *header,
                         const float *data, size_t nf) {
    unsigned char *img = NULL; size_t size = 0;
    size_t hl = strlen(header), padded = (hl + 7) / 8 * 8, ok;
    MsStatus s = st_write_memory(e, n, meta, nm, &img, &size);
    ok = s == MS_OK && size == 8 + padded + 4 * nf && le(img, 8) == padded && !memcmp(img + 8, header, hl);
    for (size_t i = hl; ok && i < padded; i++) ok = img[8 + i] == ' ';
    for (size_t i = 0; ok && i < nf; i++) ok = le(img + 8 + padded + 4 * i, 4) == f2u(data[i]);
    check(ok, "%s: %s", what, s == MS_OK ? "" : ms_last_error());
    if (!ok && img) printf("      got %.*s\n", (int)(size > 8 ? (size - 8 < 300 ? size - 8 : 300) : 0), (const char *)img + 8);
    free(img);
}

static void test_layout(void) {
    const float six[6] = { 0, 1, 2, 3, 4, 5 };
    StEntry a = { "attn.0", ST_F32, 3, { 1, 2, 3 }, six, NULL };
    expect_image("serialize {attn.0: F32 (1,2,3)}", &a, 1, NULL, 0, "{\"attn.0\":{\"dtype\":\"F32\",\"shape\":[1,2,3],\"data_offsets\":[0,24]}}", six, 6);
    StEntry b = { "attn0", ST_F32, 4, { 1, 1, 2, 3 }, six, NULL };
    expect_image("header padded with spaces to 8 bytes", &b, 1, NULL, 0, "{\"attn0\":{\"dtype\":\"F32\",\"shape\":[1,1,2,3],\"data_offsets\":[0,24]}}", six, 6);
    expect_image("empty file", NULL, 0, NULL, 0, "{}", NULL, 0);
    const char *fw[2] = { "framework", "pt" };
    expect_image("metadata only", NULL, 0, fw, 1, "{\"__metadata__\":{\"framework\":\"pt\"}}", NULL, 0);

    /* order: decreasing dtype alignment, then name; metadata first in the caller's order */
    int64_t i64 = 7; uint16_t h = 0x3c00; uint8_t u = 9; float one = 1.0f;
    StEntry mix[5] = {
        { "z", ST_I64, 1, { 1 }, NULL, &i64 }, { "a", ST_F16, 1, { 1 }, NULL, &h }, { "b", ST_F32, 1, { 1 }, &one, NULL },
        { "a2", ST_F32, 1, { 1 }, &one, NULL }, { "c", ST_U8, 1, { 1 }, NULL, &u },
    };
    const char *meta[4] = { "zz", "1", "aa", "2" };
    unsigned char *img = NULL; size_t size = 0;
    StFile f;
    int ok = st_write_memory(mix, 5, meta, 2, &img, &size) == MS_OK && st_open_memory(&f, img, size, "mix") == MS_OK;
    if (check(ok, "write + read 5 mixed dtypes")) {
        const char *order[5] = { "z", "a2", "b", "a", "c" };
        int same = f.count == 5;
        for (int i = 0; same && i < 5; i++) same = !strcmp(f.tensors[i].name, order[i]);
        check(same, "data order I64 z, F32 a2, F32 b, F16 a, U8 c");
        check(f.meta_count == 2 && !strcmp(f.meta_keys[0], "zz") && !strcmp(f.meta_keys[1], "aa"), "metadata in the given order");
        check(!memcmp(img + 8, "{\"__metadata__\":{\"zz\":\"1\",\"aa\":\"2\"},\"z\":", 40), "__metadata__ first");
        float x;
        check(st_read_f32(&f, "z", &x, 1, -1, NULL) == MS_OK && x == 7.0f && st_read_f32(&f, "a", &x, 1, -1, NULL) == MS_OK && x == 1.0f,
              "values read back");
        st_close(&f);
    }
    free(img);
}

static void test_roundtrip(void) {
    enum { N = 37 };
    MsRng r;
    ms_rng_seed(&r, 5);
    float x[N];
    for (int i = 0; i < N; i++) x[i] = (float)(ms_rng_normal(&r) * pow(10.0, (double)(i % 12) - 6.0));
    x[0] = 0x1.002p0f; x[1] = 65520.0f; x[2] = 0x1p-25f; x[3] = NAN; x[4] = -INFINITY; x[5] = -0.0f; x[6] = 0x1.8p-24f;
    double d[N]; int64_t i64[N]; int32_t i32[N]; uint8_t u8[N], bo[N]; int8_t i8[N]; int16_t i16[N]; uint16_t u16[N];
    uint32_t u32[N]; uint64_t u64[N];
    for (int i = 0; i < N; i++) {
        d[i] = (double)x[i] * (1.0 + 1e-12); i64[i] = (int64_t)ms_rng_u64(&r); i32[i] = (int32_t)ms_rng_u64(&r);
        u8[i] = (uint8_t)ms_rng_u64(&r); bo[i] = (uint8_t)(i % 3 == 0); i8[i] = (int8_t)(i - 18); i16[i] = (int16_t)(i * 1000 - 18000);
        u16[i] = (uint16_t)(i * 1771); u32[i] = (uint32_t)ms_rng_u64(&r); u64[i] = ms_rng_u64(&r);
    }
    StEntry e[] = {
        { "f32", ST_F32, 2, { 1, N }, x, NULL }, { "f16", ST_F16, 1, { N }, x, NULL }, { "bf16", ST_BF16, 1, { N }, x, NULL },
        { "f64_from_f32", ST_F64, 1, { N }, x, NULL }, { "f64", ST_F64, 1, { N }, NULL, d }, { "i64", ST_I64, 1, { N }, NULL, i64 },
        { "i32", ST_I32, 1, { N }, NULL, i32 }, { "u8", ST_U8, 1, { N }, NULL, u8 }, { "bool", ST_BOOL, 1, { N }, NULL, bo },
        { "i8", ST_I8, 1, { N }, NULL, i8 }, { "i16", ST_I16, 1, { N }, NULL, i16 }, { "u16", ST_U16, 1, { N }, NULL, u16 },
        { "u32", ST_U32, 1, { N }, NULL, u32 }, { "u64", ST_U64, 1, { N }, NULL, u64 }, { "nothing", ST_F32, 2, { 3, 0 }, NULL, NULL },
    };
    const size_t ne = sizeof e / sizeof e[0];
    const char *meta[4] = { "script", "test_io.c", "unicode", "\xe2\x82\xac \"q\"\n" };
    const char *path = tmp_path(".safetensors");
    StFile f;
    MsStatus s = st_write(path, e, ne, meta, 2);
    if (!check(s == MS_OK, "st_write %s", path)) { printf("      %s\n", ms_last_error()); return; }
    char tmp[600];
    snprintf(tmp, sizeof tmp, "%s.tmp", path);
    check(!file_exists(tmp), "no .tmp left after a successful write");
    if (!check(st_open(&f, path) == MS_OK, "st_open what st_write wrote")) { printf("      %s\n", ms_last_error()); remove(path); return; }
    check(f.count == ne && st_meta(&f, "unicode") && !strcmp(st_meta(&f, "unicode"), meta[3]), "%zu tensors and metadata back", ne);
    float got[N];
    int ok = st_read_f32(&f, "f32", got, N, 2, (const int64_t[]){ 1, N }) == MS_OK;
    for (int i = 0; ok && i < N; i++) ok = same_float(got[i], x[i]);
    check(ok, "F32 exact");
    ok = st_read_f32(&f, "f16", got, N, -1, NULL) == MS_OK;
    for (int i = 0; ok && i < N; i++) ok = same_float(got[i], st_f16_to_f32(st_f32_to_f16(x[i])));
    check(ok, "F16 = RNE of the floats");
    ok = st_read_f32(&f, "bf16", got, N, -1, NULL) == MS_OK;
    for (int i = 0; ok && i < N; i++) ok = same_float(got[i], st_bf16_to_f32(st_f32_to_bf16(x[i])));
    check(ok, "BF16 = RNE of the floats");
    ok = st_read_f32(&f, "f64_from_f32", got, N, -1, NULL) == MS_OK;
    for (int i = 0; ok && i < N; i++) ok = same_float(got[i], x[i]);
    check(ok, "F64 from floats, back to float exactly");
    /* raw dtypes: compare the bytes (little-endian) with the host values */
    static const char *const rawn[] = { "f64", "i64", "i32", "u8", "bool", "i8", "i16", "u16", "u32", "u64" };
    const void *rawv[] = { d, i64, i32, u8, bo, i8, i16, u16, u32, u64 };
    for (int k = 0; k < 10; k++) {
        const StTensor *t = st_find(&f, rawn[k]);
        size_t sz = t ? st_dtype_size(t->dtype) : 0;
        unsigned char host[8 * N];
        int same = t && t->numel == N;
        if (same) le_to_host(host, t->data, N, sz);
        check(same && !memcmp(host, rawv[k], N * sz), "%s raw values round trip", rawn[k]);
    }
    ok = st_read_f32(&f, "i64", got, N, -1, NULL) == MS_OK;
    for (int i = 0; ok && i < N; i++) ok = got[i] == (float)i64[i];
    check(ok, "I64 -> float by value");
    ok = st_read_f32(&f, "u64", got, N, -1, NULL) == MS_OK;
    for (int i = 0; ok && i < N; i++) ok = got[i] == (float)u64[i];
    check(ok, "U64 -> float by value");
    const StTensor *z = st_find(&f, "nothing");
    check(z && z->numel == 0 && z->ndim == 2 && z->shape[1] == 0, "(3,0) tensor with no data");
    st_close(&f);
    remove(path);

    /* writer refusals; a failed write leaves no file */
    StEntry two[2] = { { "w", ST_F32, 1, { 1 }, x, NULL }, { "w", ST_F32, 1, { 1 }, x, NULL } };
    unsigned char *img = NULL; size_t size = 0;
    check(st_write_memory(two, 2, NULL, 0, &img, &size) == MS_ERR_ARG && strstr(ms_last_error(), "two tensors named 'w'"), "duplicate names refused");
    StEntry badf = { "w", ST_I32, 1, { 1 }, x, NULL };
    check(st_write_memory(&badf, 1, NULL, 0, &img, &size) == MS_ERR_ARG, "f32 input for I32 refused: %s", ms_last_error());
    StEntry none = { "w", ST_F32, 1, { 1 }, NULL, NULL };
    check(st_write_memory(&none, 1, NULL, 0, &img, &size) == MS_ERR_ARG, "no data refused: %s", ms_last_error());
    StEntry mname = { "__metadata__", ST_F32, 1, { 1 }, x, NULL };
    check(st_write_memory(&mname, 1, NULL, 0, &img, &size) == MS_ERR_ARG, "a tensor named __metadata__ refused");
    StEntry huge = { "w", ST_F64, 3, { INT64_MAX, INT64_MAX, 2 }, x, NULL };
    check(st_write_memory(&huge, 1, NULL, 0, &img, &size) == MS_ERR_ARG, "overflowing shape refused: %s", ms_last_error());
    const char *dupm[4] = { "k", "1", "k", "2" };
    check(st_write_memory(NULL, 0, dupm, 2, &img, &size) == MS_ERR_ARG && strstr(ms_last_error(), "'k' twice"), "duplicate metadata key refused");
    const char *nodir = "/nonexistent-mixshow-dir/x.safetensors";
    check(st_write(nodir, e, 1, NULL, 0) == MS_ERR_IO && !file_exists(nodir), "unwritable path: %s", ms_last_error());
}

/* Every proper prefix of a valid file fails; corrupting any header byte fails cleanly or parses. */
static void test_truncation_and_corruption(void) {
    float x[3] = { 1, 2, 3 };
    uint16_t h[2] = { 0x3c00, 0xc000 };
    StEntry e[2] = { { "a.weight", ST_F32, 2, { 3, 1 }, x, NULL }, { "b", ST_F16, 1, { 2 }, NULL, h } };
    const char *meta[2] = { "k", "v" };
    unsigned char *img = NULL; size_t size = 0;
    if (!check(st_write_memory(e, 2, meta, 1, &img, &size) == MS_OK, "small image")) return;
    StFile f;
    int all_fail = 1, with_msg = 1;
    for (size_t n = 0; n < size; n++) {
        unsigned char *cut = (unsigned char *)malloc(n ? n : 1);   /* exact-size copy: ASan sees overreads */
        memcpy(cut, img, n);
        MsStatus s = st_open_memory(&f, cut, n, "cut");
        if (s == MS_OK) { all_fail = 0; st_close(&f); }
        else if (!ms_last_error()[0]) with_msg = 0;
        free(cut);
    }
    check(all_fail && with_msg, "all %zu proper prefixes refused with a message", size);
    static const unsigned char subst[] = { 0, '"', '9', '0', 0xff, '[', '}', ',', ' ', '\\', '-', 'e' };
    size_t hl = (size_t)le(img, 8), accepted = 0, refused = 0;
    for (size_t pos = 0; pos < 8 + hl; pos++)
        for (size_t k = 0; k < sizeof subst; k++) {
            unsigned char *c = (unsigned char *)malloc(size);
            memcpy(c, img, size);
            c[pos] = subst[k];
            ms_clear_error();
            if (st_open_memory(&f, c, size, "corrupt") == MS_OK) {
                float buf[8];
                for (size_t i = 0; i < f.count; i++) if (f.tensors[i].numel <= 8) st_to_f32(&f, &f.tensors[i], buf, f.tensors[i].numel);
                accepted++;
                st_close(&f);
            } else {
                refused++;
                if (!ms_last_error()[0]) with_msg = 0;
            }
            free(c);
        }
    check(with_msg && refused > 0, "%zu single-byte header corruptions: %zu refused with a message, %zu still valid", accepted + refused, refused, accepted);
    free(img);
}

static void test_bad_files(void) {
    FILE *m = fopen(BAD_DIR "MANIFEST.txt", "r");
    char line[512];
    int n = 0;
    if (!check(m != NULL, "open %sMANIFEST.txt", BAD_DIR)) return;
    while (fgets(line, sizeof line, m)) {
        char name[256], path[600];
        const char *word;
        if (line[0] == '#' || sscanf(line, "%255s", name) != 1) continue;
        line[strcspn(line, "\r\n")] = '\0';
        word = line + strlen(name) + 1;
        snprintf(path, sizeof path, "%s%s", BAD_DIR, name);
        ms_clear_error();
        MsStatus s;
        if (strstr(name, ".json")) { JsonValue *v = NULL; s = json_parse_file(path, &v); json_free(v); }
        else { StFile f; s = st_open(&f, path); if (s == MS_OK) st_close(&f); }
        /* the message names the file, then says why: look for the word in the why */
        const char *why = ms_last_error();
        if (!strncmp(why, path, strlen(path))) why += strlen(path);
        check(s != MS_OK && strstr(why, word) != NULL && strstr(ms_last_error(), path), "%-36s refused: %s", name, ms_last_error());
        if (s == MS_OK || !strstr(why, word)) printf("      expected the message to contain '%s'\n", word);
        n++;
    }
    fclose(m);
    check(n >= 60, "%d bad files tried", n);
}

static void test_tiny_sd(void) {
    char path[600];
    snprintf(path, sizeof path, "%s/unet/diffusion_pytorch_model.safetensors", test_tiny_dir());
    if (!file_exists(path)) { if (test_is_verbose()) printf("  (%s not found: skipped)\n", path); return; }
    StFile f;
    double t0 = ms_time();
    MsStatus s = st_open(&f, path);
    double t1 = ms_time();
    if (!check(s == MS_OK, "open tiny-sd UNet")) { printf("      %s\n", ms_last_error()); return; }
    size_t total = 0, nonfinite = 0;
    for (size_t i = 0; i < f.count; i++) {
        float *x = NULL; size_t n = 0;
        if (st_load_f32(&f, f.tensors[i].name, &x, &n) != MS_OK) { nonfinite++; continue; }
        for (size_t j = 0; j < n; j++) nonfinite += !isfinite(x[j]);
        total += n;
        ms_free_aligned(x);
    }
    const StTensor *c = st_find(&f, "conv_in.weight");
    check(f.count == 684 && nonfinite == 0, "tiny-sd UNet: %zu tensors, %zu floats, all finite (parsed in %.1f ms)", f.count, total, 1e3 * (t1 - t0));
    check(c && c->dtype == ST_F32 && st_check_shape(&f, c, 4, (const int64_t[]){ 32, 4, 3, 3 }) == MS_OK, "conv_in.weight F32 (32,4,3,3)");
    st_close(&f);
}

int main(void) {
    test_json_values();
    test_json_strings();
    test_json_numbers();
    test_json_limits();
    test_json_build();
    test_half_conversions();
    test_reference_file();
    test_layout();
    test_roundtrip();
    test_truncation_and_corruption();
    test_bad_files();
    test_tiny_sd();
    return test_summary("test_io");
}
