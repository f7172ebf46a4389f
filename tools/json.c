/* tools/json.c — JSON (RFC 8259) reader and writer for configs and safetensors headers.
 *
 * Reader: a recursive-descent parser into a plain tree (tools.h: JsonValue). It validates
 * UTF-8 (no overlong forms, no surrogates, nothing above U+10FFFF), decodes every escape
 * including \uXXXX surrogate pairs, rejects raw control characters in strings, limits
 * nesting to JSON_MAX_DEPTH, and reports duplicate object keys as errors. Numbers follow the
 * JSON grammar exactly and are converted with strtod after swapping '.' for the locale's
 * decimal point, so they are correctly rounded (glibc, musl, MSVC >= 2019) in any locale.
 * Every error reads "origin:line:col: what was expected, what was found" (col in bytes).
 *
 * Writer: compact or indented; strings escaped as serde_json does (so safetensors headers
 * come out byte-identical to the reference writer); doubles in the shortest %.{1..17}g form
 * that reads back bit-exactly, integers up to 2^53 without exponent.
 */
#include "tools/tools.h"

#include <locale.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

const char *json_type_name(JsonType t) {
    switch (t) {
    case JSON_NULL: return "null";
    case JSON_BOOL: return "a boolean";
    case JSON_NUMBER: return "a number";
    case JSON_STRING: return "a string";
    case JSON_ARRAY: return "an array";
    case JSON_OBJECT: return "an object";
    }
    return "?";
}

/* ---------------------------------------------------------------------------------------- */
/* Growable buffer                                                                           */
/* ---------------------------------------------------------------------------------------- */
MsStatus jbuf_append(JsonBuf *b, const void *bytes, size_t n) {
    size_t need;
    if (!ms_add_ok(b->len, n, &need) || !ms_add_ok(need, 1, &need))
        return ms_errorf(MS_ERR_NOMEM, "JSON buffer: size overflows size_t");
    if (need > b->cap) {
        size_t cap = b->cap ? b->cap : 64;
        while (cap < need) cap = cap > SIZE_MAX / 2 ? need : cap * 2;
        char *d = (char *)realloc(b->data, cap);
        if (!d) return ms_errorf(MS_ERR_NOMEM, "JSON buffer: cannot grow to %zu bytes", cap);
        b->data = d; b->cap = cap;
    }
    if (n) memcpy(b->data + b->len, bytes, n);
    b->len += n;
    b->data[b->len] = '\0';
    return MS_OK;
}

MsStatus jbuf_puts(JsonBuf *b, const char *s) { return jbuf_append(b, s, strlen(s)); }

void jbuf_free(JsonBuf *b) { free(b->data); b->data = NULL; b->len = b->cap = 0; }

/* ---------------------------------------------------------------------------------------- */
/* Numbers: locale-independent conversion both ways                                          */
/* ---------------------------------------------------------------------------------------- */
/* s[0..n) is a valid JSON number (or %g output): copy it with the locale's decimal point in
 * place of '.', then strtod. Returns 0 when out of memory. */
static int number_from_text(const char *s, size_t n, double *out) {
    const char *dp = localeconv()->decimal_point;
    size_t dpl = dp && *dp ? strlen(dp) : 1, cap = n + dpl + 1;
    char local[128], *t = cap <= sizeof local ? local : (char *)malloc(cap), *q = t;
    if (!t) return 0;
    for (size_t i = 0; i < n; i++) {
        if (s[i] == '.') { memcpy(q, dp && *dp ? dp : ".", dpl); q += dpl; }
        else *q++ = s[i];
    }
    *q = '\0';
    *out = strtod(t, NULL);
    if (t != local) free(t);
    return 1;
}

/* %.<prec>g with '.' as the decimal point whatever the locale. */
static size_t format_g(char *buf, size_t size, int prec, double x) {
    char tmp[64];
    const char *dp = localeconv()->decimal_point;
    size_t dpl = dp && *dp ? strlen(dp) : 0, n = 0;
    snprintf(tmp, sizeof tmp, "%.*g", prec, x);
    for (const char *p = tmp; *p && n + 1 < size; ) {
        if (dpl && !strncmp(p, dp, dpl)) { buf[n++] = '.'; p += dpl; }
        else buf[n++] = *p++;
    }
    buf[n] = '\0';
    return n;
}

MsStatus json_write_number(JsonBuf *b, double x) {
    char buf[64];
    size_t n = 0;
    if (!isfinite(x)) return ms_errorf(MS_ERR_ARG, "JSON has no representation for %g", x);
    if (x == floor(x) && fabs(x) <= 9007199254740992.0) {    /* integers up to 2^53, "-0" too */
        n = (size_t)snprintf(buf, sizeof buf, "%.0f", x);
    } else {
        for (int prec = 1; prec <= 17; prec++) {            /* shortest that reads back exactly */
            double y = 0.0;
            n = format_g(buf, sizeof buf, prec, x);
            if (!number_from_text(buf, n, &y)) return ms_errorf(MS_ERR_NOMEM, "JSON writer: out of memory");
            if (y == x) break;
        }
    }
    return jbuf_append(b, buf, n);
}

/* ---------------------------------------------------------------------------------------- */
/* Parser                                                                                    */
/* ---------------------------------------------------------------------------------------- */
typedef struct {
    const unsigned char *p, *end, *line_start;
    const char *origin;
    int line, depth;
    size_t values;    /* parsed so far, <= JSON_MAX_VALUES */
} Parser;

static int col_of(const Parser *ps) { return (int)(ps->p - ps->line_start) + 1; }

/* "origin:line:col: msg, found 'c'" */
static MsStatus perr(const Parser *ps, const char *msg) {
    char found[32];
    if (ps->p >= ps->end) snprintf(found, sizeof found, "end of input");
    else if (*ps->p >= 0x20 && *ps->p < 0x7f) snprintf(found, sizeof found, "'%c'", *ps->p);
    else snprintf(found, sizeof found, "byte 0x%02x", *ps->p);
    return ms_errorf(MS_ERR_FORMAT, "%s:%d:%d: %s, found %s", ps->origin, ps->line, col_of(ps), msg, found);
}

static void skip_ws(Parser *ps) {
    while (ps->p < ps->end) {
        unsigned char c = *ps->p;
        if (c == '\n') { ps->line++; ps->line_start = ps->p + 1; }
        else if (c != ' ' && c != '\t' && c != '\r') return;
        ps->p++;
    }
}

/* Frees what v owns (not v itself). */
static void json_clear(JsonValue *v) {
    for (size_t i = 0; i < v->count; i++) json_clear(&v->items[i]);
    free(v->items); free(v->str); free(v->key);
}

static MsStatus push_item(JsonValue *v, const JsonValue *item) {
    if (v->count == v->cap) {
        size_t cap = v->cap ? v->cap * 2 : 4, bytes;
        if (!ms_mul_ok(cap, sizeof *v->items, &bytes)) return ms_errorf(MS_ERR_NOMEM, "JSON: too many items");
        JsonValue *it = (JsonValue *)realloc(v->items, bytes);
        if (!it) return ms_errorf(MS_ERR_NOMEM, "JSON: out of memory (%zu items)", cap);
        v->items = it; v->cap = cap;
    }
    v->items[v->count++] = *item;
    return MS_OK;
}

/* Appends the UTF-8 encoding of code point cp (< 0x110000). */
static MsStatus put_utf8(JsonBuf *b, unsigned cp) {
    unsigned char u[4]; size_t n;
    if (cp < 0x80) { u[0] = (unsigned char)cp; n = 1; }
    else if (cp < 0x800) { u[0] = (unsigned char)(0xC0 | cp >> 6); u[1] = (unsigned char)(0x80 | (cp & 63)); n = 2; }
    else if (cp < 0x10000) { u[0] = (unsigned char)(0xE0 | cp >> 12); u[1] = (unsigned char)(0x80 | (cp >> 6 & 63));
                             u[2] = (unsigned char)(0x80 | (cp & 63)); n = 3; }
    else { u[0] = (unsigned char)(0xF0 | cp >> 18); u[1] = (unsigned char)(0x80 | (cp >> 12 & 63));
           u[2] = (unsigned char)(0x80 | (cp >> 6 & 63)); u[3] = (unsigned char)(0x80 | (cp & 63)); n = 4; }
    return jbuf_append(b, u, n);
}

/* Length of the valid UTF-8 sequence at p (Unicode 15, Table 3-7), 0 if invalid. */
static size_t utf8_len(const unsigned char *p, const unsigned char *end) {
    size_t avail = (size_t)(end - p);
    unsigned char c = p[0];
    if (c < 0x80) return 1;
    if (c >= 0xC2 && c <= 0xDF) return avail >= 2 && (p[1] & 0xC0) == 0x80 ? 2 : 0;
    if (c >= 0xE0 && c <= 0xEF) {
        unsigned char lo = c == 0xE0 ? 0xA0 : 0x80, hi = c == 0xED ? 0x9F : 0xBF;   /* no overlong, no surrogates */
        return avail >= 3 && p[1] >= lo && p[1] <= hi && (p[2] & 0xC0) == 0x80 ? 3 : 0;
    }
    if (c >= 0xF0 && c <= 0xF4) {
        unsigned char lo = c == 0xF0 ? 0x90 : 0x80, hi = c == 0xF4 ? 0x8F : 0xBF;   /* U+10000..U+10FFFF */
        return avail >= 4 && p[1] >= lo && p[1] <= hi && (p[2] & 0xC0) == 0x80 && (p[3] & 0xC0) == 0x80 ? 4 : 0;
    }
    return 0;
}

static int hex4(const unsigned char *p, const unsigned char *end, unsigned *out) {
    unsigned v = 0;
    if (end - p < 4) return 0;
    for (int i = 0; i < 4; i++) {
        unsigned c = p[i], d;
        if (c >= '0' && c <= '9') d = c - '0';
        else if (c >= 'a' && c <= 'f') d = c - 'a' + 10;
        else if (c >= 'A' && c <= 'F') d = c - 'A' + 10;
        else return 0;
        v = v << 4 | d;
    }
    *out = v;
    return 1;
}

/* At the opening quote: decodes the string into a new NUL-terminated buffer. */
static MsStatus parse_string(Parser *ps, char **out, size_t *out_len) {
    JsonBuf b = { NULL, 0, 0 };
    MsStatus s = MS_OK;
    ps->p++;                                                         /* opening quote */
    for (;;) {
        const unsigned char *run = ps->p;                            /* plain bytes, copied in one go */
        while (ps->p < ps->end && *ps->p != '"' && *ps->p != '\\' && *ps->p >= 0x20 && *ps->p < 0x80) ps->p++;
        if (ps->p > run && (s = jbuf_append(&b, run, (size_t)(ps->p - run))) != MS_OK) goto fail;
        if (ps->p >= ps->end) { s = perr(ps, "unterminated string"); goto fail; }
        unsigned char c = *ps->p;
        if (c == '"') { ps->p++; break; }
        if (c < 0x20) { s = perr(ps, "control character in string (escape it)"); goto fail; }
        if (c >= 0x80) {
            size_t n = utf8_len(ps->p, ps->end);
            if (!n) { s = perr(ps, "invalid UTF-8 in string"); goto fail; }
            if ((s = jbuf_append(&b, ps->p, n)) != MS_OK) goto fail;
            ps->p += n;
            continue;
        }
        /* escape */
        if (ps->end - ps->p < 2) { ps->p = ps->end; s = perr(ps, "unterminated escape"); goto fail; }
        ps->p++;
        c = *ps->p;
        /* one array, not two equal literals: pointer arithmetic across separate literals is
         * undefined (tcc does not merge them, so every escape decoded wrong there) */
        static const char esc[] = "\"\\/bfnrt", repl[] = "\"\\/\b\f\n\r\t";
        const char *simple = strchr(esc, c);
        if (c && simple) {
            if ((s = jbuf_append(&b, repl + (simple - esc), 1)) != MS_OK) goto fail;
            ps->p++;
        } else if (c == 'u') {
            unsigned cp, lo;
            if (!hex4(ps->p + 1, ps->end, &cp)) { s = perr(ps, "\\u needs 4 hex digits"); goto fail; }
            if (cp >= 0xDC00 && cp <= 0xDFFF) { s = perr(ps, "lone low surrogate in \\u escape"); goto fail; }
            if (cp >= 0xD800 && cp <= 0xDBFF) {                      /* high surrogate: a low one must follow */
                const unsigned char *q = ps->p + 5;
                if (ps->end - q < 6 || q[0] != '\\' || q[1] != 'u' || !hex4(q + 2, ps->end, &lo) || lo < 0xDC00 || lo > 0xDFFF) {
                    s = perr(ps, "high surrogate \\u escape not followed by a low surrogate \\uDC00..\\uDFFF"); goto fail;
                }
                cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
                ps->p += 6;
            }
            if ((s = put_utf8(&b, cp)) != MS_OK) goto fail;
            ps->p += 5;
        } else {
            s = perr(ps, "invalid escape (expected one of \\\" \\\\ \\/ \\b \\f \\n \\r \\t \\u)"); goto fail;
        }
    }
    if (!b.data && (s = jbuf_append(&b, "", 0)) != MS_OK) goto fail;   /* "" still gets a buffer */
    *out = b.data; *out_len = b.len;
    return MS_OK;
fail:
    jbuf_free(&b);
    return s;
}

static int is_digit(const Parser *ps) { return ps->p < ps->end && *ps->p >= '0' && *ps->p <= '9'; }

static MsStatus parse_number(Parser *ps, JsonValue *v) {
    const unsigned char *start = ps->p;
    if (*ps->p == '-') ps->p++;
    if (!is_digit(ps)) return perr(ps, "expected a digit");
    if (*ps->p == '0') ps->p++;                                      /* no leading zeros */
    else while (is_digit(ps)) ps->p++;
    if (ps->p < ps->end && *ps->p == '.') {
        ps->p++;
        if (!is_digit(ps)) return perr(ps, "expected a digit after '.'");
        while (is_digit(ps)) ps->p++;
    }
    if (ps->p < ps->end && (*ps->p == 'e' || *ps->p == 'E')) {
        ps->p++;
        if (ps->p < ps->end && (*ps->p == '+' || *ps->p == '-')) ps->p++;
        if (!is_digit(ps)) return perr(ps, "expected a digit in the exponent");
        while (is_digit(ps)) ps->p++;
    }
    if (!number_from_text((const char *)start, (size_t)(ps->p - start), &v->number))
        return ms_errorf(MS_ERR_NOMEM, "%s: out of memory", ps->origin);
    if (!isfinite(v->number)) {
        ps->p = start;
        return perr(ps, "number out of the range of a double");
    }
    v->type = JSON_NUMBER;
    return MS_OK;
}

static int key_cmp(const void *a, const void *b) {
    const JsonValue *x = *(const JsonValue *const *)a, *y = *(const JsonValue *const *)b;
    size_t n = x->key_len < y->key_len ? x->key_len : y->key_len;
    int c = memcmp(x->key, y->key, n);
    if (c) return c;
    if (x->key_len != y->key_len) return x->key_len < y->key_len ? -1 : 1;
    return x < y ? -1 : x > y;                    /* equal keys: file order, later one second */
}

/* Duplicate keys: pairwise for small objects, sorted otherwise (O(n log n) on hostile input). */
static MsStatus check_duplicates(const Parser *ps, const JsonValue *obj) {
    const JsonValue *dup = NULL;
    if (obj->count <= 16) {
        for (size_t i = 1; i < obj->count && !dup; i++)
            for (size_t j = 0; j < i && !dup; j++)
                if (obj->items[i].key_len == obj->items[j].key_len &&
                    !memcmp(obj->items[i].key, obj->items[j].key, obj->items[i].key_len)) dup = &obj->items[i];
    } else {
        const JsonValue **idx = (const JsonValue **)malloc(obj->count * sizeof *idx);
        if (!idx) return ms_errorf(MS_ERR_NOMEM, "%s: out of memory", ps->origin);
        for (size_t i = 0; i < obj->count; i++) idx[i] = &obj->items[i];
        qsort(idx, obj->count, sizeof *idx, key_cmp);
        for (size_t i = 1; i < obj->count && !dup; i++)
            if (idx[i]->key_len == idx[i - 1]->key_len && !memcmp(idx[i]->key, idx[i - 1]->key, idx[i]->key_len)) dup = idx[i];
        free(idx);
    }
    if (dup)
        return ms_errorf(MS_ERR_FORMAT, "%s:%d:%d: duplicate key '%.200s'", ps->origin, dup->line, dup->col, dup->key);
    return MS_OK;
}

static MsStatus parse_value(Parser *ps, JsonValue *v);

static MsStatus parse_container(Parser *ps, JsonValue *v, int object) {
    const char close = object ? '}' : ']';
    MsStatus s;
    v->type = object ? JSON_OBJECT : JSON_ARRAY;
    if (++ps->depth > JSON_MAX_DEPTH) {
        char msg[64];
        snprintf(msg, sizeof msg, "nesting deeper than %d levels", JSON_MAX_DEPTH);
        return perr(ps, msg);
    }
    ps->p++;
    skip_ws(ps);
    if (ps->p < ps->end && *ps->p == close) { ps->p++; ps->depth--; return MS_OK; }
    for (;;) {
        JsonValue item;
        memset(&item, 0, sizeof item);
        if (object) {
            int line = ps->line, col = col_of(ps);
            if (ps->p >= ps->end || *ps->p != '"') return perr(ps, "expected a string key");
            if ((s = parse_string(ps, &item.key, &item.key_len)) != MS_OK) return s;
            skip_ws(ps);
            if (ps->p >= ps->end || *ps->p != ':') { free(item.key); return perr(ps, "expected ':' after key"); }
            ps->p++;
            skip_ws(ps);
            s = parse_value(ps, &item);
            item.line = line; item.col = col;                       /* a member is located by its key */
        } else {
            s = parse_value(ps, &item);
        }
        if (s == MS_OK) s = push_item(v, &item);
        if (s != MS_OK) { json_clear(&item); return s; }
        skip_ws(ps);
        if (ps->p < ps->end && *ps->p == ',') { ps->p++; skip_ws(ps); continue; }
        if (ps->p < ps->end && *ps->p == close) { ps->p++; break; }
        return perr(ps, object ? "expected ',' or '}' after an object member" : "expected ',' or ']' after an array element");
    }
    ps->depth--;
    return object ? check_duplicates(ps, v) : MS_OK;
}

/* At a non-space byte (or the end): one value into v (zeroed by the caller). */
static MsStatus parse_value(Parser *ps, JsonValue *v) {
    v->origin = ps->origin; v->line = ps->line; v->col = col_of(ps);
    if (ps->p >= ps->end) return perr(ps, "expected a value");
    if (++ps->values > JSON_MAX_VALUES) {
        char msg[64];
        snprintf(msg, sizeof msg, "more than %u values in one document", JSON_MAX_VALUES);
        return perr(ps, msg);
    }
    switch (*ps->p) {
    case '{': return parse_container(ps, v, 1);
    case '[': return parse_container(ps, v, 0);
    case '"': v->type = JSON_STRING; return parse_string(ps, &v->str, &v->len);
    case 't': case 'f': case 'n': {
        static const char *const words[3] = { "true", "false", "null" };
        for (int i = 0; i < 3; i++) {
            size_t n = strlen(words[i]);
            if ((size_t)(ps->end - ps->p) >= n && !memcmp(ps->p, words[i], n)) {
                v->type = i == 2 ? JSON_NULL : JSON_BOOL; v->boolean = i == 0;
                ps->p += n;
                return MS_OK;
            }
        }
        return perr(ps, "expected a value (true, false or null?)");
    }
    default:
        if (*ps->p == '-' || (*ps->p >= '0' && *ps->p <= '9')) return parse_number(ps, v);
        return perr(ps, "expected a value");
    }
}

MsStatus json_parse(const char *text, size_t len, const char *origin, JsonValue **out) {
    if (!origin) origin = "<json>";
    size_t olen = strlen(origin);
    JsonValue *root = (JsonValue *)calloc(1, sizeof *root + olen + 1);  /* the origin lives after the root */
    *out = NULL;
    if (!root) return ms_errorf(MS_ERR_NOMEM, "%s: out of memory", origin);
    char *name = (char *)(root + 1);
    memcpy(name, origin, olen + 1);
    Parser ps;
    ps.p = ps.line_start = (const unsigned char *)text;
    ps.end = ps.p + len;
    ps.origin = name; ps.line = 1; ps.depth = 0; ps.values = 0;
    if (len >= 3 && !memcmp(text, "\xEF\xBB\xBF", 3)) ps.p += 3, ps.line_start = ps.p;   /* UTF-8 BOM */
    skip_ws(&ps);
    MsStatus s = parse_value(&ps, root);
    if (s == MS_OK) {
        skip_ws(&ps);
        if (ps.p < ps.end) s = perr(&ps, "expected the end of input after the value");
    }
    if (s != MS_OK) { json_free(root); return s; }
    *out = root;
    return MS_OK;
}

MsStatus json_parse_file(const char *path, JsonValue **out) {
    FILE *f = fopen(path, "rb");
    JsonBuf b = { NULL, 0, 0 };
    char chunk[65536];
    size_t n;
    MsStatus s = MS_OK;
    *out = NULL;
    if (!f) return ms_errorf(MS_ERR_IO, "%s: cannot open for reading", path);
    while (s == MS_OK && (n = fread(chunk, 1, sizeof chunk, f)) > 0) s = jbuf_append(&b, chunk, n);
    if (s == MS_OK && ferror(f)) s = ms_errorf(MS_ERR_IO, "%s: read error", path);
    fclose(f);
    if (s == MS_OK) s = json_parse(b.data ? b.data : "", b.len, path, out);
    jbuf_free(&b);
    return s;
}

void json_free(JsonValue *v) {
    if (!v) return;
    json_clear(v);
    free(v);
}

/* ---------------------------------------------------------------------------------------- */
/* Lookups                                                                                   */
/* ---------------------------------------------------------------------------------------- */
const JsonValue *json_get(const JsonValue *obj, const char *key) {
    size_t n = strlen(key);
    if (!obj || obj->type != JSON_OBJECT) return NULL;
    for (size_t i = 0; i < obj->count; i++)
        if (obj->items[i].key_len == n && !memcmp(obj->items[i].key, key, n)) return &obj->items[i];
    return NULL;
}

size_t json_len(const JsonValue *v) {
    return v && (v->type == JSON_ARRAY || v->type == JSON_OBJECT) ? v->count : 0;
}

const JsonValue *json_at(const JsonValue *arr, size_t i) {
    return i < json_len(arr) ? &arr->items[i] : NULL;
}

static int as_int(const JsonValue *v, int64_t *out) {
    if (!v || v->type != JSON_NUMBER || v->number != floor(v->number) || fabs(v->number) > 9007199254740992.0) return 0;
    *out = (int64_t)v->number;
    return 1;
}

double json_get_number(const JsonValue *obj, const char *key, double def) {
    const JsonValue *v = json_get(obj, key);
    return v && v->type == JSON_NUMBER ? v->number : def;
}

const char *json_get_string(const JsonValue *obj, const char *key, const char *def) {
    const JsonValue *v = json_get(obj, key);
    return v && v->type == JSON_STRING ? v->str : def;
}

int64_t json_get_int(const JsonValue *obj, const char *key, int64_t def) {
    int64_t x;
    return as_int(json_get(obj, key), &x) ? x : def;
}

int json_get_bool(const JsonValue *obj, const char *key, int def) {
    const JsonValue *v = json_get(obj, key);
    return v && v->type == JSON_BOOL ? v->boolean : def;
}

static const char *origin_of(const JsonValue *v) { return v && v->origin ? v->origin : "<json>"; }

MsStatus json_need(const JsonValue *obj, const char *key, JsonType type, const JsonValue **out) {
    const JsonValue *v = json_get(obj, key);
    *out = NULL;
    if (!obj || obj->type != JSON_OBJECT)
        return ms_errorf(MS_ERR_FORMAT, "%s:%d:%d: expected an object holding '%s', found %s", origin_of(obj),
                         obj ? obj->line : 0, obj ? obj->col : 0, key, obj ? json_type_name(obj->type) : "nothing");
    if (!v)
        return ms_errorf(MS_ERR_FORMAT, "%s:%d:%d: missing key '%s'", origin_of(obj), obj->line, obj->col, key);
    if (v->type != type)
        return ms_errorf(MS_ERR_FORMAT, "%s:%d:%d: key '%s': expected %s, found %s", origin_of(v), v->line, v->col,
                         key, json_type_name(type), json_type_name(v->type));
    *out = v;
    return MS_OK;
}

MsStatus json_need_number(const JsonValue *obj, const char *key, double *out) {
    const JsonValue *v;
    MsStatus s = json_need(obj, key, JSON_NUMBER, &v);
    if (s == MS_OK) *out = v->number;
    return s;
}

MsStatus json_as_int(const JsonValue *v, const char *what, int64_t *out) {
    if (as_int(v, out)) return MS_OK;
    if (v && v->type == JSON_NUMBER && v->number == floor(v->number))
        return ms_errorf(MS_ERR_FORMAT, "%s:%d:%d: %s: integer %.17g overflows (|x| <= 2^53 expected)", origin_of(v), v->line,
                         v->col, what, v->number);
    return ms_errorf(MS_ERR_FORMAT, "%s:%d:%d: %s: expected an integer, found %s", origin_of(v), v ? v->line : 0,
                     v ? v->col : 0, what, !v ? "nothing" : v->type == JSON_NUMBER ? "a non-integral number"
                     : json_type_name(v->type));
}

MsStatus json_need_int(const JsonValue *obj, const char *key, int64_t *out) {
    const JsonValue *v;
    MsStatus s = json_need(obj, key, JSON_NUMBER, &v);
    if (s != MS_OK) return s;
    char what[96];
    snprintf(what, sizeof what, "key '%.80s'", key);
    return json_as_int(v, what, out);
}

MsStatus json_need_string(const JsonValue *obj, const char *key, const char **out) {
    const JsonValue *v;
    MsStatus s = json_need(obj, key, JSON_STRING, &v);
    if (s == MS_OK) *out = v->str;
    return s;
}

/* ---------------------------------------------------------------------------------------- */
/* Building                                                                                  */
/* ---------------------------------------------------------------------------------------- */
JsonValue *json_new(JsonType type) {
    JsonValue *v = (JsonValue *)calloc(1, sizeof *v);
    if (v) v->type = type;
    return v;
}

JsonValue *json_new_number(double x) {
    JsonValue *v = json_new(JSON_NUMBER);
    if (v) v->number = x;
    return v;
}

JsonValue *json_new_bool(int b) {
    JsonValue *v = json_new(JSON_BOOL);
    if (v) v->boolean = b != 0;
    return v;
}

JsonValue *json_new_string(const char *s, size_t len) {
    JsonValue *v = json_new(JSON_STRING);
    if (!v) return NULL;
    v->str = (char *)malloc(len + 1);
    if (!v->str) { free(v); return NULL; }
    if (len) memcpy(v->str, s, len);
    v->str[len] = '\0';
    v->len = len;
    return v;
}

/* A parsed root keeps its origin name right after itself; once moved into another tree that
 * memory goes away, so the moved values forget it. */
static void forget_origin(JsonValue *v, const char *origin) {
    if (v->origin == origin) v->origin = NULL;
    for (size_t i = 0; i < v->count; i++) forget_origin(&v->items[i], origin);
}

static MsStatus adopt(JsonValue *parent, JsonValue *item, char *key, size_t key_len) {
    if (item->origin == (const char *)(item + 1)) forget_origin(item, item->origin);
    free(item->key);
    item->key = key; item->key_len = key_len;
    MsStatus s = push_item(parent, item);
    if (s != MS_OK) json_clear(item);
    free(item);                                                   /* the struct was copied */
    return s;
}

MsStatus json_push(JsonValue *arr, JsonValue *item) {
    if (!item) return ms_errorf(MS_ERR_NOMEM, "json_push: out of memory");
    if (!arr || arr->type != JSON_ARRAY) { json_free(item); return ms_errorf(MS_ERR_ARG, "json_push: not an array"); }
    return adopt(arr, item, NULL, 0);
}

MsStatus json_set(JsonValue *obj, const char *key, JsonValue *item) {
    size_t n = strlen(key);
    if (!item) return ms_errorf(MS_ERR_NOMEM, "json_set: out of memory");
    if (!obj || obj->type != JSON_OBJECT) { json_free(item); return ms_errorf(MS_ERR_ARG, "json_set '%s': not an object", key); }
    char *k = (char *)malloc(n + 1);
    if (!k) { json_free(item); return ms_errorf(MS_ERR_NOMEM, "json_set: out of memory"); }
    memcpy(k, key, n + 1);
    JsonValue *old = (JsonValue *)json_get(obj, key);
    if (old) {                                                    /* replace in place */
        if (item->origin == (const char *)(item + 1)) forget_origin(item, item->origin);
        json_clear(old);
        *old = *item;
        old->key = k; old->key_len = n;
        free(item);
        return MS_OK;
    }
    return adopt(obj, item, k, n);
}

/* ---------------------------------------------------------------------------------------- */
/* Writer                                                                                    */
/* ---------------------------------------------------------------------------------------- */
MsStatus json_write_string(JsonBuf *b, const char *s, size_t len) {
    MsStatus st = jbuf_append(b, "\"", 1);
    size_t run = 0;                                  /* start of bytes not yet copied */
    for (size_t i = 0; i < len && st == MS_OK; i++) {
        unsigned char c = (unsigned char)s[i];
        char esc[8];
        if (c >= 0x20 && c != '"' && c != '\\') continue;
        switch (c) {
        case '"': strcpy(esc, "\\\""); break;
        case '\\': strcpy(esc, "\\\\"); break;
        case '\b': strcpy(esc, "\\b"); break;
        case '\f': strcpy(esc, "\\f"); break;
        case '\n': strcpy(esc, "\\n"); break;
        case '\r': strcpy(esc, "\\r"); break;
        case '\t': strcpy(esc, "\\t"); break;
        default: snprintf(esc, sizeof esc, "\\u%04x", c); break;
        }
        st = jbuf_append(b, s + run, i - run);
        if (st == MS_OK) st = jbuf_puts(b, esc);
        run = i + 1;
    }
    if (st == MS_OK) st = jbuf_append(b, s + run, len - run);
    if (st == MS_OK) st = jbuf_append(b, "\"", 1);
    return st;
}

static MsStatus newline(JsonBuf *b, int indent, int level) {
    MsStatus s = MS_OK;
    if (indent <= 0) return MS_OK;
    s = jbuf_append(b, "\n", 1);
    for (int i = 0; i < indent * level && s == MS_OK; i++) s = jbuf_append(b, " ", 1);
    return s;
}

static MsStatus write_value(JsonBuf *b, const JsonValue *v, int indent, int level) {
    MsStatus s = MS_OK;
    if (level > JSON_MAX_DEPTH) return ms_errorf(MS_ERR_ARG, "JSON writer: nesting deeper than %d", JSON_MAX_DEPTH);
    switch (v->type) {
    case JSON_NULL: return jbuf_puts(b, "null");
    case JSON_BOOL: return jbuf_puts(b, v->boolean ? "true" : "false");
    case JSON_NUMBER: return json_write_number(b, v->number);
    case JSON_STRING: return json_write_string(b, v->str ? v->str : "", v->len);
    case JSON_ARRAY:
    case JSON_OBJECT: {
        int obj = v->type == JSON_OBJECT;
        s = jbuf_puts(b, obj ? "{" : "[");
        for (size_t i = 0; i < v->count && s == MS_OK; i++) {
            if (i) s = jbuf_puts(b, ",");
            if (s == MS_OK) s = newline(b, indent, level + 1);
            if (s == MS_OK && obj) s = json_write_string(b, v->items[i].key ? v->items[i].key : "", v->items[i].key_len);
            if (s == MS_OK && obj) s = jbuf_puts(b, indent > 0 ? ": " : ":");
            if (s == MS_OK) s = write_value(b, &v->items[i], indent, level + 1);
        }
        if (s == MS_OK && v->count) s = newline(b, indent, level);
        if (s == MS_OK) s = jbuf_puts(b, obj ? "}" : "]");
        return s;
    }
    }
    return ms_errorf(MS_ERR_ARG, "JSON writer: bad value type %d", (int)v->type);
}

MsStatus json_write(JsonBuf *b, const JsonValue *v, int indent) { return write_value(b, v, indent, 0); }

MsStatus json_write_file(const char *path, const JsonValue *v, int indent) {
    JsonBuf b = { NULL, 0, 0 }, tmp = { NULL, 0, 0 };
    MsStatus s = json_write(&b, v, indent);
    if (s == MS_OK && indent > 0) s = jbuf_puts(&b, "\n");
    if (s == MS_OK) s = jbuf_puts(&tmp, path);
    if (s == MS_OK) s = jbuf_puts(&tmp, ".tmp");
    if (s == MS_OK) {
        FILE *f = fopen(tmp.data, "wb");
        if (!f) s = ms_errorf(MS_ERR_IO, "%s: cannot open for writing", tmp.data);
        else {
            int bad = fwrite(b.data, 1, b.len, f) != b.len;
            bad |= fclose(f) != 0;
            if (bad) s = ms_errorf(MS_ERR_IO, "%s: write failed", tmp.data);
#ifdef _WIN32
            if (s == MS_OK) remove(path);                   /* rename does not replace on Windows */
#endif
            if (s == MS_OK && rename(tmp.data, path) != 0) s = ms_errorf(MS_ERR_IO, "%s: cannot rename to %s", tmp.data, path);
            if (s != MS_OK) remove(tmp.data);
        }
    }
    jbuf_free(&b); jbuf_free(&tmp);
    return s;
}
