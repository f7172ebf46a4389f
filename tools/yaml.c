/* tools/yaml.c — a YAML subset reader for Mix-of-Show's option files (the options .yml files).
 *
 * The official code reads its options with OmegaConf.load (omegaconf 2.x), which is PyYAML's
 * SafeLoader (YAML 1.1) with three changes: a second float resolver that also reads `1e-3`
 * and `1e5` as floats (plain PyYAML reads them as STRINGS and needs `!!float 1e-3`),
 * timestamps stay strings, and a duplicate key is an error. This reader gives the tree
 * OmegaConf.to_container(OmegaConf.load(f), resolve=True) gives, as a JsonValue (tools.h):
 * mappings are JSON_OBJECT (file order), sequences JSON_ARRAY, ints and floats JSON_NUMBER
 * (a double), strings, booleans and null. tools/ref/gen_yaml_golden.py dumps OmegaConf's trees
 * of the official files and of tests/data/yaml/quirks.yml; tests/test_yaml.c compares.
 *
 * The subset (anything else is an error naming origin:line:col; valid YAML outside the
 * subset says "unsupported YAML feature: ..."):
 *   - Block mappings `key: value` and block sequences `- item` nested by indentation (spaces
 *     only); a sequence may sit at its key's indentation (`key:\n- a`); compact forms
 *     `- key: v` (a mapping in a sequence entry) and `- - a`. A value may start on the next
 *     line, more indented (`key:\n  [1, 2]`). A key with no value is null.
 *   - Flow mappings `{ a: 1, b }` (b: null) and flow sequences `[ 0.5, [1], {x: y} ]`, nested,
 *     across lines, a trailing comma allowed (PyYAML ignores indentation inside them).
 *   - Scalars on one line: plain, 'single' ('' is a quote) and "double" quoted (escapes
 *     \0 \a \b \t \n \v \f \r \e \" \/ \\ \space \N \_ \L \P \xXX \uXXXX \UXXXXXXXX).
 *   - Comments: `#` at the start of a token (inside a plain scalar only after a space).
 *   - Plain scalars resolve as OmegaConf's loader does: null `~ null Null NULL`; booleans
 *     `true/True/TRUE false/... yes/Yes/YES no/... on/On/ON off/...`; ints in decimal,
 *     `0b` binary, `0` octal (`010` is 8), `0x` hex, `_` separators and base-60 `1:30` (90);
 *     floats `1.5 1. .5 1.5e-3 1e-3 1E5 1_000.5 1:30.5 .inf -.inf .nan` (`-.5` stays a
 *     string, as in PyYAML); everything else is a string (`2001-01-01` too: no timestamps).
 *   - Tags before a scalar: `!!str`, `!!int`, `!!float`, `!!bool`, `!!null` (constructed as
 *     PyYAML's SafeConstructor does; `!!float 10000` is 10000.0). The tagged text must have
 *     the implicit form of its type (`!!float` also takes Python's `1e-3`, `inf`, `nan`).
 *   - A top-level mapping or sequence. As OmegaConf.load: an empty (or null) document is an
 *     empty mapping, a top-level string s is read again as a scalar t and gives {t: null} (a
 *     collection there is unsupported), a number or boolean is an error.
 *     A leading `---` line is allowed. UTF-8 only (a leading BOM is skipped), LF or CRLF.
 * Unsupported (clear errors): anchors `&a` and aliases `*a`, merge keys `<<`, block scalars
 * `|` `>`, complex keys `? ` and collections as keys, multi-line plain or quoted scalars,
 * several documents (`---`/`...` later on), directives `%YAML`, other tags (`!!map`, `!foo`),
 * tags on collections or keys, keys that resolve to non-strings (`1:`, `yes:`, `~:`; quote
 * them), single-pair mappings inside flow sequences (`[a: 1]`), OmegaConf interpolations
 * `${...}`, keys longer than 1024 bytes, Unicode line breaks (U+0085/2028/2029) and a lone CR.
 * Tabs are errors outside quoted scalars and comments (PyYAML forbids them there too), so are
 * non-printable characters (PyYAML's Reader). Nesting is limited to JSON_MAX_DEPTH, the tree
 * to JSON_MAX_VALUES values.
 */
#include "tools/tools.h"

#include <locale.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define YAML_MAX_KEY 1024    /* PyYAML's limit on an implicit (simple) key */

typedef struct {
    const unsigned char *p, *end, *line_start;
    const char *origin;
    int line, depth;
    size_t values;
} Y;

static int ycol(const Y *y) { return (int)(y->p - y->line_start); }   /* 0-based byte column */

static void describe(const Y *y, char *buf, size_t n) {
    if (y->p >= y->end) snprintf(buf, n, "end of input");
    else if (*y->p == '\n' || *y->p == '\r') snprintf(buf, n, "end of line");
    else if (*y->p == '\t') snprintf(buf, n, "a tab");
    else if (*y->p >= 0x20 && *y->p < 0x7f) snprintf(buf, n, "'%c'", *y->p);
    else snprintf(buf, n, "byte 0x%02x", *y->p);
}

/* "origin:line:col: msg" (col 1-based, in bytes); `found` appends ", found <what is at p>". */
static MsStatus yerr_at(const Y *y, MsStatus code, int found, const char *fmt, ...) {
    char msg[512], what[32] = "";
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    if (found) describe(y, what, sizeof what);
    return ms_errorf(code, "%s:%d:%d: %s%s%s", y->origin, y->line, ycol(y) + 1, msg, found ? ", found " : "", what);
}
#define YERR(y, ...) yerr_at((y), MS_ERR_FORMAT, 1, __VA_ARGS__)
#define YUNSUP(y, ...) yerr_at((y), MS_ERR_UNSUPPORTED, 0, __VA_ARGS__)

static int at_eol(const Y *y) { return y->p >= y->end || *y->p == '\n' || *y->p == '\r'; }
static int ws_at(const Y *y, size_t k) {          /* end, space, tab or line break at p + k */
    if ((size_t)(y->end - y->p) <= k) return 1;
    unsigned char c = y->p[k];
    return c == ' ' || c == '\t' || c == '\n' || c == '\r';
}

/* ---------------------------------------------------------------------------------------- */
/* Tree building (frees with json_free: every pointer is malloc'ed)                          */
/* ---------------------------------------------------------------------------------------- */
static void clear_value(JsonValue *v) {
    for (size_t i = 0; i < v->count; i++) clear_value(&v->items[i]);
    free(v->items); free(v->str); free(v->key);
    memset(v, 0, sizeof *v);
}

static MsStatus push(const Y *y, JsonValue *parent, JsonValue *item) {
    if (parent->count == parent->cap) {
        size_t cap = parent->cap ? parent->cap * 2 : 4, bytes;
        JsonValue *it;
        if (!ms_mul_ok(cap, sizeof *it, &bytes) || !(it = (JsonValue *)realloc(parent->items, bytes))) {
            clear_value(item);
            return ms_errorf(MS_ERR_NOMEM, "%s: out of memory", y->origin);
        }
        parent->items = it; parent->cap = cap;
    }
    parent->items[parent->count++] = *item;
    return MS_OK;
}

static MsStatus count_value(Y *y) {
    if (++y->values > JSON_MAX_VALUES) return yerr_at(y, MS_ERR_FORMAT, 0, "more than %u values in one document", JSON_MAX_VALUES);
    return MS_OK;
}

/* ---------------------------------------------------------------------------------------- */
/* Whitespace, comments, lines                                                               */
/* ---------------------------------------------------------------------------------------- */
/* Skips spaces and a comment on the current line; stops at the line break. */
static MsStatus skip_inline(Y *y) {
    while (y->p < y->end && *y->p == ' ') y->p++;
    if (y->p < y->end && *y->p == '\t')
        return yerr_at(y, MS_ERR_FORMAT, 0, "tab character (YAML allows tabs only inside quoted scalars and comments; use spaces)");
    if (y->p < y->end && *y->p == '#') while (!at_eol(y)) y->p++;
    return MS_OK;
}

/* At a line break (or the end): consumes it. */
static void eat_break(Y *y) {
    if (y->p < y->end && *y->p == '\r') y->p++;      /* the pre-pass made sure "\r\n" */
    if (y->p < y->end && *y->p == '\n') { y->p++; y->line++; y->line_start = y->p; }
}

static int doc_marker(const Y *y) {              /* "---" or "..." at column 0 */
    return ycol(y) == 0 && y->end - y->p >= 3 && (!memcmp(y->p, "---", 3) || !memcmp(y->p, "...", 3)) && ws_at(y, 3);
}

/* From the end of a line's content: skips the rest of this line, blank and comment lines, and
 * the indentation of the next content line. *found = 0 at the end of input. */
static MsStatus next_content(Y *y, int *found) {
    MsStatus s;
    *found = 0;
    for (;;) {
        if ((s = skip_inline(y)) != MS_OK) return s;
        if (y->p >= y->end) return MS_OK;
        if (!at_eol(y)) break;
        eat_break(y);
    }
    if (doc_marker(y))
        return YUNSUP(y, "unsupported YAML feature: document markers '---' / '...' after the start (one document per file)");
    *found = 1;
    return MS_OK;
}

/* Every non-blank line must be followed by the end or a line break; the content after the
 * current node on its line may only be spaces and a comment. */
static MsStatus end_of_line(Y *y, const char *after) {
    MsStatus s = skip_inline(y);
    if (s != MS_OK) return s;
    if (!at_eol(y)) {
        if (*y->p == ':') return YUNSUP(y, "unsupported YAML feature: a %s as a mapping key (complex key)", after);
        return YERR(y, "expected the end of the line after the %s", after);
    }
    return MS_OK;
}

/* ---------------------------------------------------------------------------------------- */
/* Scalars                                                                                   */
/* ---------------------------------------------------------------------------------------- */
typedef struct { char *s; size_t n; int quoted; int line, col; } Scalar;

static MsStatus put_utf8(JsonBuf *b, unsigned long cp) {
    unsigned char u[4]; size_t n;
    if (cp < 0x80) { u[0] = (unsigned char)cp; n = 1; }
    else if (cp < 0x800) { u[0] = (unsigned char)(0xC0 | cp >> 6); u[1] = (unsigned char)(0x80 | (cp & 63)); n = 2; }
    else if (cp < 0x10000) { u[0] = (unsigned char)(0xE0 | cp >> 12); u[1] = (unsigned char)(0x80 | (cp >> 6 & 63));
                             u[2] = (unsigned char)(0x80 | (cp & 63)); n = 3; }
    else { u[0] = (unsigned char)(0xF0 | cp >> 18); u[1] = (unsigned char)(0x80 | (cp >> 12 & 63));
           u[2] = (unsigned char)(0x80 | (cp >> 6 & 63)); u[3] = (unsigned char)(0x80 | (cp & 63)); n = 4; }
    return jbuf_append(b, u, n);
}

static int hexval(unsigned char c) {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
}

/* At the opening quote; the scalar must close on this line. */
static MsStatus quoted_scalar(Y *y, Scalar *sc) {
    JsonBuf b = { NULL, 0, 0 };
    MsStatus s = MS_OK;
    unsigned char q = *y->p;
    const unsigned char *open = y->p;
    y->p++;
    for (;;) {
        if (at_eol(y)) {
            int eof = y->p >= y->end;
            y->p = open;
            s = yerr_at(y, eof ? MS_ERR_FORMAT : MS_ERR_UNSUPPORTED, 0, "unterminated quoted scalar: no closing %c on this line%s", q,
                        eof ? "" : " (multi-line quoted scalars are an unsupported YAML feature)");
            goto fail;
        }
        unsigned char c = *y->p;
        if (c == q) {
            if (q == '\'' && y->end - y->p >= 2 && y->p[1] == '\'') {  /* '' is one quote */
                if ((s = jbuf_append(&b, "'", 1)) != MS_OK) goto fail;
                y->p += 2;
                continue;
            }
            y->p++;
            break;
        }
        if (q == '"' && c == '\\') {
            static const char esc[] = "0abt\tnvfre \"/\\N_LP";
            static const unsigned long repl[] = { 0, 7, 8, 9, 9, 10, 11, 12, 13, 27, 32, 34, 47, 92, 0x85, 0xA0, 0x2028, 0x2029 };
            const char *hit;
            y->p++;
            if (at_eol(y)) { s = YUNSUP(y, "unsupported YAML feature: line continuation in a double-quoted scalar"); goto fail; }
            c = *y->p;
            if (c && (hit = strchr(esc, c)) != NULL) {
                if ((s = put_utf8(&b, repl[hit - esc])) != MS_OK) goto fail;
                y->p++;
            } else if (c == 'x' || c == 'u' || c == 'U') {
                int nd = c == 'x' ? 2 : c == 'u' ? 4 : 8;
                unsigned long cp = 0;
                for (int i = 1; i <= nd; i++) {
                    int h = y->end - y->p > i ? hexval(y->p[i]) : -1;
                    if (h < 0) { y->p += i; s = YERR(y, "expected %d hex digits after \\%c", nd, c); goto fail; }
                    cp = cp << 4 | (unsigned long)h;
                }
                if ((cp >= 0xD800 && cp <= 0xDFFF) || cp > 0x10FFFF) {
                    s = yerr_at(y, MS_ERR_FORMAT, 0, "escape \\%c gives U+%lX, which UTF-8 cannot hold", c, cp); goto fail;
                }
                if ((s = put_utf8(&b, cp)) != MS_OK) goto fail;
                y->p += nd + 1;
            } else {
                s = YERR(y, "unknown escape in a double-quoted scalar"); goto fail;
            }
            continue;
        }
        const unsigned char *run = y->p;
        while (!at_eol(y) && *y->p != q && !(q == '"' && *y->p == '\\')) y->p++;
        if ((s = jbuf_append(&b, run, (size_t)(y->p - run))) != MS_OK) goto fail;
    }
    if (!b.data && (s = jbuf_append(&b, "", 0)) != MS_OK) goto fail;
    sc->s = b.data; sc->n = b.len; sc->quoted = 1;
    return MS_OK;
fail:
    jbuf_free(&b);
    return s;
}

/* PyYAML's check_plain: can a plain scalar start at p? */
static int plain_start(const Y *y, int flow) {
    unsigned char c = *y->p;
    if (!strchr("-?:,[]{}#&*!|>'\"%@`", c) || !c) return 1;
    return !ws_at(y, 1) && (c == '-' || (!flow && (c == '?' || c == ':')));
}

/* A plain scalar on one line (PyYAML scan_plain without line folding). Stops before ": ",
 * " #", a line break, a tab, and in flow context before ",?[]{}" and ":" + one of ",[]{}". */
static MsStatus plain_scalar(Y *y, int flow, Scalar *sc) {
    const unsigned char *start = y->p, *stop = y->p;
    for (;;) {
        const unsigned char *chunk = y->p;
        while (y->p < y->end) {
            unsigned char c = *y->p;
            if (c == ' ' || c == '\t' || c == '\n' || c == '\r') break;
            if (c == ':' && (ws_at(y, 1) || (flow && strchr(",[]{}", y->p[1])))) break;
            if (flow && strchr(",?[]{}", c)) break;
            y->p++;
        }
        if (y->p == chunk) break;
        stop = y->p;
        while (y->p < y->end && *y->p == ' ') y->p++;
        if (y->p >= y->end || *y->p == '#' || *y->p == '\t' || at_eol(y)) break;
        if (y->p == stop) break;                  /* no space: stopped at an indicator */
    }
    y->p = stop;
    char *s = (char *)malloc((size_t)(stop - start) + 1);
    if (!s) return ms_errorf(MS_ERR_NOMEM, "%s: out of memory", y->origin);
    memcpy(s, start, (size_t)(stop - start));
    s[stop - start] = '\0';
    sc->s = s; sc->n = (size_t)(stop - start); sc->quoted = 0;
    return MS_OK;
}

/* A quoted or plain scalar at p (the caller checked it can start one). */
static MsStatus scalar(Y *y, int flow, Scalar *sc) {
    memset(sc, 0, sizeof *sc);
    sc->line = y->line; sc->col = ycol(y) + 1;
    if (*y->p == '\'' || *y->p == '"') return quoted_scalar(y, sc);
    return plain_scalar(y, flow, sc);
}

/* ---- Resolving plain scalars (PyYAML resolver.py + OmegaConf's float) ---- */
typedef struct { const char *p, *e; } Cur;
static int c_chr(Cur *c, const char *set) { if (c->p < c->e && *c->p && strchr(set, *c->p)) { c->p++; return 1; } return 0; }
static int c_run(Cur *c, const char *set) { int n = 0; while (c_chr(c, set)) n++; return n; }
#define DIG "0123456789"
#define DIG_ "0123456789_"

/* [eE][-+]?[0-9]+ (sign_required: [eE][-+][0-9]+); optional: returns 1 if absent. */
static int exponent(Cur *c, int sign_required) {
    Cur save = *c;
    if (!c_chr(c, "eE")) return 1;
    if (!c_chr(c, "+-") && sign_required) { *c = save; return 0; }
    if (!c_run(c, DIG)) { *c = save; return 0; }
    return 1;
}

/* (:[0-5]?[0-9])+ */
static int sexa_tail(Cur *c) {
    int n = 0;
    for (;;) {
        Cur save = *c;
        if (!c_chr(c, ":")) break;
        if (c_chr(c, "012345")) { if (!c_chr(c, DIG)) { /* [0-5] alone is [0-9] */ } }
        else if (!c_chr(c, DIG)) { *c = save; break; }
        n++;
    }
    return n;
}

static int full(const Cur *c) { return c->p == c->e; }

/* OmegaConf's float resolver (a superset of PyYAML's). */
static int is_float(const char *s, size_t n) {
    Cur c0 = { s, s + n }, c;
    /* [-+]?[0-9][0-9_]*\.[0-9_]*(?:[eE][-+]?[0-9]+)? */
    c = c0; c_chr(&c, "+-");
    if (c_chr(&c, DIG)) {
        Cur m = c; c_run(&m, DIG_);
        Cur a = m;
        if (c_chr(&a, ".")) { c_run(&a, DIG_); if (exponent(&a, 0) && full(&a)) return 1; }
        a = m;                                                  /* [-+]?[0-9][0-9_]*[eE][-+]?[0-9]+ */
        if (a.p < a.e && (*a.p == 'e' || *a.p == 'E') && exponent(&a, 0) && a.p != m.p && full(&a)) return 1;
        a = m;                                                  /* [-+]?[0-9][0-9_]*(:[0-5]?[0-9])+\.[0-9_]* */
        if (sexa_tail(&a) && c_chr(&a, ".")) { c_run(&a, DIG_); if (full(&a)) return 1; }
    }
    c = c0;                                                     /* \.[0-9_]+(?:[eE][-+][0-9]+)? */
    if (c_chr(&c, ".") && c_run(&c, DIG_) && exponent(&c, 1) && full(&c)) return 1;
    c = c0; c_chr(&c, "+-");                                    /* [-+]?\.(inf|Inf|INF) */
    if (n >= 4 && (size_t)(c.e - c.p) == 4 && (!strncmp(c.p, ".inf", 4) || !strncmp(c.p, ".Inf", 4) || !strncmp(c.p, ".INF", 4))) return 1;
    return n == 4 && (!strncmp(s, ".nan", 4) || !strncmp(s, ".NaN", 4) || !strncmp(s, ".NAN", 4));
}

static int is_int(const char *s, size_t n) {
    Cur c0 = { s, s + n }, c;
    c_chr(&c0, "+-");
    c = c0;
    if (c_chr(&c, "0")) {
        Cur a = c;
        if (c_chr(&a, "b") && c_run(&a, "01_") && full(&a)) return 1;
        a = c;
        if (c_chr(&a, "x") && c_run(&a, "0123456789abcdefABCDEF_") && full(&a)) return 1;
        a = c;
        if (c_run(&a, "01234567_") && full(&a)) return 1;
        return full(&c);                                        /* 0 */
    }
    if (!c_chr(&c, "123456789")) return 0;
    c_run(&c, DIG_);
    if (full(&c)) return 1;
    return sexa_tail(&c) && full(&c);
}

static int word_in(const char *s, const char *const *list) {
    for (; *list; list++) if (!strcmp(s, *list)) return 1;
    return 0;
}
static const char *const bool_true[] = { "yes", "Yes", "YES", "true", "True", "TRUE", "on", "On", "ON", NULL };
static const char *const bool_false[] = { "no", "No", "NO", "false", "False", "FALSE", "off", "Off", "OFF", NULL };
static const char *const null_words[] = { "~", "null", "Null", "NULL", "", NULL };

/* Locale-independent strtod of s[0..n) (digits, '.', e, sign only). 0 if out of memory. */
static int to_double(const char *s, size_t n, double *out) {
    const char *dp = localeconv()->decimal_point;
    size_t dpl = dp && *dp ? strlen(dp) : 1, cap = n * dpl + 1;
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

/* Python float() of an underscore-free, lower-cased string with at most one leading sign
 * removed: [sign](digits[.digits*]|.digits)[e[sign]digits] | inf | infinity | nan. */
static int py_float(const char *s, size_t n, double *out) {
    Cur c = { s, s + n };
    int neg = 0;
    if (c.p < c.e && (*c.p == '+' || *c.p == '-')) neg = *c.p++ == '-';
    size_t rest = (size_t)(c.e - c.p);
    if ((rest == 3 && !strncmp(c.p, "inf", 3)) || (rest == 8 && !strncmp(c.p, "infinity", 8))) { *out = neg ? -INFINITY : INFINITY; return 1; }
    if (rest == 3 && !strncmp(c.p, "nan", 3)) { *out = NAN; return 1; }
    int digits = c_run(&c, DIG);
    if (c_chr(&c, ".")) digits += c_run(&c, DIG);
    if (!digits || !exponent(&c, 0) || !full(&c)) return 0;
    return to_double(s, n, out) ? 1 : -1;
}

/* Copy of s without '_' (and lower-cased when lower). Caller frees. */
static char *strip_us(const char *s, size_t n, int lower, size_t *m) {
    char *t = (char *)malloc(n + 1);
    size_t k = 0;
    if (!t) return NULL;
    for (size_t i = 0; i < n; i++) {
        char ch = s[i];
        if (ch == '_') continue;
        if (lower && ch >= 'A' && ch <= 'Z') ch = (char)(ch - 'A' + 'a');
        t[k++] = ch;
    }
    t[k] = '\0';
    *m = k;
    return t;
}

/* PyYAML construct_yaml_float. 0: not a float; -1: out of memory. */
static int construct_float(const char *text, size_t len, double *out) {
    size_t n;
    char *t = strip_us(text, len, 1, &n), *v = t;
    int ok = 0;
    double sign = 1.0;
    if (!t) return -1;
    if (n && (*v == '-' || *v == '+')) { sign = *v == '-' ? -1.0 : 1.0; v++; n--; }
    if (n == 4 && !strcmp(v, ".inf")) { *out = sign * INFINITY; ok = 1; }
    else if (n == 4 && !strcmp(v, ".nan")) { *out = NAN; ok = 1; }
    else if (n && memchr(v, ':', n)) {
        /* digits = [float(part) for part in value.split(':')], least significant first:
         * value += digit * base; base *= 60 */
        double value = 0.0, base = 1.0;
        char *end = v + n, *part_end = end;
        ok = 1;
        while (ok) {
            char *part = part_end;
            while (part > v && part[-1] != ':') part--;
            double d;
            int r = py_float(part, (size_t)(part_end - part), &d);
            if (r <= 0) { ok = r; break; }
            value += d * base; base *= 60.0;
            if (part == v) break;
            part_end = part - 1;
        }
        if (ok > 0) *out = sign * value;
    } else {
        double d;
        ok = py_float(v, n, &d);
        if (ok > 0) *out = sign * d;
    }
    free(t);
    return ok;
}

/* uint64 accumulate with overflow check */
static int acc(uint64_t *v, unsigned base, unsigned d) {
    if (*v > (UINT64_MAX - d) / base) return 0;
    *v = *v * base + d;
    return 1;
}

/* PyYAML construct_yaml_int, restricted to the forms of its resolver (no Python int() extras).
 * 0: not an int / too large for 64 bits; -1: out of memory. */
static int construct_int(const char *text, size_t len, double *out) {
    size_t n;
    char *t = strip_us(text, len, 0, &n), *v = t;
    int neg = 0, ok = 1;
    uint64_t x = 0;
    if (!t) return -1;
    if (n && (*v == '-' || *v == '+')) { neg = *v == '-'; v++; n--; }
    if (!n) ok = 0;
    else if (n == 1 && *v == '0') x = 0;
    else if (n > 2 && v[0] == '0' && v[1] == 'b') { for (size_t i = 2; i < n && ok; i++) ok = (v[i] == '0' || v[i] == '1') && acc(&x, 2, (unsigned)(v[i] - '0')); }
    else if (n > 2 && v[0] == '0' && v[1] == 'x') { for (size_t i = 2; i < n && ok; i++) ok = hexval((unsigned char)v[i]) >= 0 && acc(&x, 16, (unsigned)hexval((unsigned char)v[i])); }
    else if (v[0] == '0') { for (size_t i = 1; i < n && ok; i++) ok = v[i] >= '0' && v[i] <= '7' && acc(&x, 8, (unsigned)(v[i] - '0')); }
    else if (memchr(v, ':', n)) {                          /* base 60: parts are decimal ints */
        uint64_t part = 0;
        int digits = 0;
        for (size_t i = 0; i <= n && ok; i++) {
            if (i == n || v[i] == ':') {
                ok = digits && x <= UINT64_MAX - part;          /* Horner: x = x*60 + part */
                if (ok) x += part;
                if (ok && i < n) ok = acc(&x, 60, 0);
                part = 0; digits = 0;
            } else {
                ok = v[i] >= '0' && v[i] <= '9' && acc(&part, 10, (unsigned)(v[i] - '0'));
                digits = 1;
            }
        }
    } else {
        for (size_t i = 0; i < n && ok; i++) ok = v[i] >= '0' && v[i] <= '9';
        if (ok) {                                                   /* correctly rounded, any size */
            double d;
            if (!to_double(v, n, &d)) { free(t); return -1; }
            free(t);
            *out = neg ? -d : d;
            if (*out == 0.0) *out = 0.0;                            /* int -0 is 0 */
            return 1;
        }
    }
    free(t);
    if (!ok) return 0;
    *out = neg ? -(double)x : (double)x;
    if (*out == 0.0) *out = 0.0;
    return 1;
}

/* Tag kinds */
enum { TAG_NONE, TAG_STR, TAG_INT, TAG_FLOAT, TAG_BOOL, TAG_NULL };

/* At '!': reads `!!str` etc. followed by a space or line break. */
static MsStatus read_tag(Y *y, int *tag) {
    static const char *const names[] = { "!!str", "!!int", "!!float", "!!bool", "!!null" };
    const unsigned char *start = y->p;
    while (!ws_at(y, 0)) y->p++;
    size_t n = (size_t)(y->p - start);
    for (int i = 0; i < 5; i++)
        if (strlen(names[i]) == n && !memcmp(start, names[i], n)) { *tag = TAG_STR + i; return MS_OK; }
    y->p = start;
    return YUNSUP(y, "unsupported YAML feature: tag '%.*s' (supported: !!str !!int !!float !!bool !!null)", (int)(n > 40 ? 40 : n), (const char *)start);
}

/* Turns a scalar into a value: the tag's constructor, else the resolver for plain scalars.
 * Takes ownership of sc->s. */
static MsStatus make_scalar(Y *y, Scalar *sc, int tag, JsonValue *v) {
    MsStatus s = MS_OK;
    int r = 0;
    v->origin = y->origin; v->line = sc->line; v->col = sc->col;
    if ((s = count_value(y)) != MS_OK) goto fail;
    if (tag == TAG_NONE && !sc->quoted) {
        if (word_in(sc->s, null_words)) { v->type = JSON_NULL; goto done; }
        if (word_in(sc->s, bool_true) || word_in(sc->s, bool_false)) { v->type = JSON_BOOL; v->boolean = word_in(sc->s, bool_true); goto done; }
        if (is_int(sc->s, sc->n)) tag = TAG_INT;
        else if (is_float(sc->s, sc->n)) tag = TAG_FLOAT;
        else if (!strcmp(sc->s, "<<")) { s = ms_errorf(MS_ERR_UNSUPPORTED, "%s:%d:%d: unsupported YAML feature: merge key '<<'", y->origin, sc->line, sc->col); goto fail; }
        else if (!strcmp(sc->s, "=")) { s = ms_errorf(MS_ERR_UNSUPPORTED, "%s:%d:%d: unsupported YAML feature: the value key '='", y->origin, sc->line, sc->col); goto fail; }
    }
    switch (tag) {
    case TAG_NULL: v->type = JSON_NULL; goto done;
    case TAG_BOOL: {                                  /* bool_values[value.lower()] */
        char low[8];
        size_t k;
        for (k = 0; k < sc->n && k < sizeof low - 1; k++) low[k] = (char)(sc->s[k] >= 'A' && sc->s[k] <= 'Z' ? sc->s[k] - 'A' + 'a' : sc->s[k]);
        low[k] = '\0';
        if (sc->n < sizeof low && (!strcmp(low, "yes") || !strcmp(low, "true") || !strcmp(low, "on"))) { v->type = JSON_BOOL; v->boolean = 1; goto done; }
        if (sc->n < sizeof low && (!strcmp(low, "no") || !strcmp(low, "false") || !strcmp(low, "off"))) { v->type = JSON_BOOL; v->boolean = 0; goto done; }
        s = ms_errorf(MS_ERR_FORMAT, "%s:%d:%d: !!bool: '%.60s' is not a boolean (true/false/yes/no/on/off)", y->origin, sc->line, sc->col, sc->s);
        goto fail;
    }
    case TAG_INT:
        r = construct_int(sc->s, sc->n, &v->number);
        if (r > 0) { v->type = JSON_NUMBER; goto done; }
        s = r < 0 ? ms_errorf(MS_ERR_NOMEM, "%s: out of memory", y->origin)
                  : ms_errorf(MS_ERR_FORMAT, "%s:%d:%d: '%.60s' is not an integer that fits 64 bits", y->origin, sc->line, sc->col, sc->s);
        goto fail;
    case TAG_FLOAT:
        r = construct_float(sc->s, sc->n, &v->number);
        if (r > 0) { v->type = JSON_NUMBER; goto done; }
        s = r < 0 ? ms_errorf(MS_ERR_NOMEM, "%s: out of memory", y->origin)
                  : ms_errorf(MS_ERR_FORMAT, "%s:%d:%d: '%.60s' is not a float", y->origin, sc->line, sc->col, sc->s);
        goto fail;
    default: break;
    }
    if (memchr(sc->s, '$', sc->n) && strstr(sc->s, "${")) {
        s = ms_errorf(MS_ERR_UNSUPPORTED, "%s:%d:%d: unsupported: OmegaConf interpolation '${...}' in '%.60s'", y->origin, sc->line, sc->col, sc->s);
        goto fail;
    }
    v->type = JSON_STRING; v->str = sc->s; v->len = sc->n;
    return MS_OK;
done:
    free(sc->s); sc->s = NULL;
    return MS_OK;
fail:
    free(sc->s); sc->s = NULL;
    return s;
}

/* ---------------------------------------------------------------------------------------- */
/* Flow collections                                                                          */
/* ---------------------------------------------------------------------------------------- */
/* Skips spaces, comments and line breaks inside [] / {}. */
static MsStatus flow_ws(Y *y) {
    MsStatus s;
    for (;;) {
        if ((s = skip_inline(y)) != MS_OK) return s;
        if (y->p >= y->end || !at_eol(y)) break;
        eat_break(y);
        if (doc_marker(y)) return YUNSUP(y, "unsupported YAML feature: a document marker inside a flow collection");
    }
    return MS_OK;
}

static MsStatus flow_node(Y *y, JsonValue *v);

/* A key or scalar in flow context; unsupported starts are errors. */
static MsStatus flow_scalar_start(Y *y) {
    unsigned char c = *y->p;
    if (c == '&' || c == '*') return YUNSUP(y, "unsupported YAML feature: anchors and aliases (%c)", c);
    if (c == '|' || c == '>') return YUNSUP(y, "unsupported YAML feature: block scalars (%c) inside a flow collection", c);
    if (c == '?' && ws_at(y, 1)) return YUNSUP(y, "unsupported YAML feature: explicit keys '? '");
    if (!plain_start(y, 1) && c != '\'' && c != '"') return YERR(y, "expected a value");
    return MS_OK;
}

static MsStatus flow_collection(Y *y, JsonValue *v) {
    int object = *y->p == '{';
    const char close = object ? '}' : ']';
    MsStatus s;
    v->type = object ? JSON_OBJECT : JSON_ARRAY;
    v->origin = y->origin; v->line = y->line; v->col = ycol(y) + 1;
    if ((s = count_value(y)) != MS_OK) return s;
    if (++y->depth > JSON_MAX_DEPTH) return yerr_at(y, MS_ERR_FORMAT, 0, "nesting deeper than %d levels", JSON_MAX_DEPTH);
    y->p++;
    for (;;) {
        JsonValue item;
        memset(&item, 0, sizeof item);
        if ((s = flow_ws(y)) != MS_OK) return s;
        if (y->p >= y->end) return YERR(y, "expected '%c' to close the flow collection", close);
        if (*y->p == close) { y->p++; break; }
        if (object) {
            Scalar k;
            if (*y->p == '[' || *y->p == '{') return YUNSUP(y, "unsupported YAML feature: a collection as a mapping key");
            if (*y->p == '!') return YUNSUP(y, "unsupported YAML feature: tags on mapping keys");
            if (*y->p == ',') return YERR(y, "expected a key");
            if ((s = flow_scalar_start(y)) != MS_OK) return s;
            if ((s = scalar(y, 1, &k)) != MS_OK) return s;
            JsonValue kv;
            memset(&kv, 0, sizeof kv);
            int kline = k.line, kcol = k.col, quoted = k.quoted;
            if ((s = make_scalar(y, &k, TAG_NONE, &kv)) != MS_OK) return s;
            if (kv.type != JSON_STRING || (!quoted && !kv.len)) {
                clear_value(&kv);
                return ms_errorf(MS_ERR_UNSUPPORTED, "%s:%d:%d: unsupported YAML feature: a key that is not a string (quote it)", y->origin, kline, kcol);
            }
            item.key = kv.str; item.key_len = kv.len;
            if ((s = flow_ws(y)) != MS_OK) { clear_value(&item); return s; }
            if (y->p < y->end && *y->p == ':' && y->line != kline) {    /* a key and its ':' share a line */
                clear_value(&item);
                return YERR(y, "expected ',' or '}' (a ':' must be on the line of its key)");
            }
            if (y->p < y->end && *y->p == ':') {
                y->p++;
                if ((s = flow_ws(y)) != MS_OK) { clear_value(&item); return s; }
                if (y->p < y->end && (*y->p == ',' || *y->p == close)) {
                    item.type = JSON_NULL; item.origin = y->origin; item.line = y->line; item.col = ycol(y) + 1;
                    s = count_value(y);
                } else {
                    char *key = item.key; size_t kl = item.key_len;
                    item.key = NULL;
                    s = flow_node(y, &item);
                    item.key = key; item.key_len = kl;
                }
            } else {
                item.type = JSON_NULL; item.origin = y->origin; item.line = kline; item.col = kcol;
                s = count_value(y);
            }
            if (s == MS_OK) {
                for (size_t i = 0; i < v->count; i++)
                    if (v->items[i].key_len == item.key_len && !memcmp(v->items[i].key, item.key, item.key_len)) {
                        s = ms_errorf(MS_ERR_FORMAT, "%s:%d:%d: duplicate key '%.200s' (first at line %d)", y->origin, kline, kcol,
                                      item.key, v->items[i].line);
                        break;
                    }
            }
            if (s == MS_OK) { item.line = kline; item.col = kcol; s = push(y, v, &item); }
            if (s != MS_OK) { clear_value(&item); return s; }
        } else {
            if (*y->p == ',') return YERR(y, "expected a value before ','");
            if ((s = flow_node(y, &item)) == MS_OK) s = flow_ws(y);
            if (s == MS_OK && y->p < y->end && *y->p == ':')
                s = YUNSUP(y, "unsupported YAML feature: a single-pair mapping inside a flow sequence ([a: 1])");
            if (s == MS_OK) s = push(y, v, &item);
            if (s != MS_OK) { clear_value(&item); return s; }
        }
        if ((s = flow_ws(y)) != MS_OK) return s;
        if (y->p >= y->end) return YERR(y, "expected '%c' to close the flow collection", close);
        if (*y->p == ',') { y->p++; continue; }
        if (y->p < y->end && *y->p == close) { y->p++; break; }
        return YERR(y, object ? "expected ',' or '}' in a flow mapping" : "expected ',' or ']' in a flow sequence");
    }
    y->depth--;
    return MS_OK;
}

/* A value inside a flow collection. */
static MsStatus flow_node(Y *y, JsonValue *v) {
    int tag = TAG_NONE;
    MsStatus s;
    Scalar sc;
    if (y->p < y->end && *y->p == '!') {
        if ((s = read_tag(y, &tag)) != MS_OK) return s;
        if ((s = flow_ws(y)) != MS_OK) return s;
        if (y->p < y->end && (*y->p == ',' || *y->p == ']' || *y->p == '}')) {       /* tagged empty scalar */
            sc.s = (char *)calloc(1, 1); sc.n = 0; sc.quoted = 0; sc.line = y->line; sc.col = ycol(y) + 1;
            if (!sc.s) return ms_errorf(MS_ERR_NOMEM, "%s: out of memory", y->origin);
            return make_scalar(y, &sc, tag, v);
        }
    }
    if (y->p >= y->end) return YERR(y, "expected a value");
    if (*y->p == '[' || *y->p == '{') {
        if (tag != TAG_NONE) return YUNSUP(y, "unsupported YAML feature: tags on collections");
        return flow_collection(y, v);
    }
    if ((s = flow_scalar_start(y)) != MS_OK) return s;
    if ((s = scalar(y, 1, &sc)) != MS_OK) return s;
    {   /* a plain scalar continued on the next line would fold: not in the subset */
        Y look = *y;
        if (!sc.quoted && flow_ws(&look) == MS_OK && look.line != y->line && look.p < look.end && !strchr(",]}:#", *look.p)) {
            free(sc.s);
            return YUNSUP(&look, "unsupported YAML feature: multi-line plain scalar");
        }
    }
    return make_scalar(y, &sc, tag, v);
}

/* ---------------------------------------------------------------------------------------- */
/* Block collections                                                                         */
/* ---------------------------------------------------------------------------------------- */
static MsStatus block_mapping(Y *y, int c, JsonValue *v);
static MsStatus block_sequence(Y *y, int c, int indentless, JsonValue *v);

/* Does a scalar at p end in ':' + space (a mapping key)? Errors in the scalar are reported. */
static MsStatus is_key(const Y *y, int *yes) {
    Y look = *y;
    Scalar sc;
    MsStatus s = scalar(&look, 0, &sc);
    *yes = 0;
    if (s != MS_OK) return s;
    free(sc.s);
    while (look.p < look.end && *look.p == ' ') look.p++;
    *yes = look.p < look.end && *look.p == ':' && ws_at(&look, 1);
    return MS_OK;
}

/* Common checks where a node may start in block context. */
static MsStatus block_start_check(Y *y) {
    unsigned char c = *y->p;
    if (c == '&' || c == '*') return YUNSUP(y, "unsupported YAML feature: anchors and aliases (%c)", c);
    if (c == '|' || c == '>') return YUNSUP(y, "unsupported YAML feature: block scalars (%c)", c);
    if (c == '?' && ws_at(y, 1)) return YUNSUP(y, "unsupported YAML feature: explicit keys '? '");
    if (c == '%') return YUNSUP(y, "unsupported YAML feature: directives (%%)");
    if (c == '\'' || c == '"' || plain_start(y, 0)) return MS_OK;
    return YERR(y, "expected a value");
}

/* A node at p whose first line holds only it (column c), or the rest of a "- " / "key: "
 * line (inline; then parent is the indentation of that entry). After it, p is at the next
 * content line (or the end). tag: a tag already read. */
static MsStatus block_node(Y *y, int tag, int seq_entry, JsonValue *v) {
    MsStatus s;
    int found, yes;
    if (*y->p == '-' && ws_at(y, 1)) {
        if (!seq_entry) return YERR(y, "a block sequence cannot start on the line of a mapping key");
        if (tag != TAG_NONE) return YUNSUP(y, "unsupported YAML feature: tags on collections");
        return block_sequence(y, ycol(y), 0, v);
    }
    if (*y->p == '[' || *y->p == '{') {
        if (tag != TAG_NONE) return YUNSUP(y, "unsupported YAML feature: tags on collections");
        if ((s = flow_collection(y, v)) != MS_OK) return s;
        if ((s = end_of_line(y, "flow collection")) != MS_OK) return s;
        return next_content(y, &found);
    }
    if ((s = block_start_check(y)) != MS_OK) return s;
    if ((s = is_key(y, &yes)) != MS_OK) return s;
    if (yes) {
        if (!seq_entry) return YERR(y, "a mapping cannot start on the line of another key (mapping values are not allowed here)");
        if (tag != TAG_NONE) return YUNSUP(y, "unsupported YAML feature: tags on collections");
        return block_mapping(y, ycol(y), v);
    }
    Scalar sc;
    if ((s = scalar(y, 0, &sc)) != MS_OK) return s;
    if ((s = make_scalar(y, &sc, tag, v)) != MS_OK) return s;
    if ((s = end_of_line(y, "scalar")) != MS_OK) return s;
    return next_content(y, &found);
}

/* After "key:" (seq_entry 0) or "-" (1) at indentation `indent`: the value, inline or on the
 * following lines. */
static MsStatus value_after_indicator(Y *y, int indent, int seq_entry, JsonValue *v) {
    MsStatus s;
    int tag = TAG_NONE, found;
    y->p++;                                                          /* ':' or '-' */
    if ((s = skip_inline(y)) != MS_OK) return s;
    if (y->p < y->end && *y->p == '!') {
        if ((s = read_tag(y, &tag)) != MS_OK) return s;
        if ((s = skip_inline(y)) != MS_OK) return s;
    }
    if (!at_eol(y)) return block_node(y, tag, seq_entry, v);
    int line = y->line, col = ycol(y) + 1;
    if ((s = next_content(y, &found)) != MS_OK) return s;
    if (found && ycol(y) > indent) {
        if (tag != TAG_NONE && ((*y->p == '-' && ws_at(y, 1)) || *y->p == '[' || *y->p == '{'))
            return YUNSUP(y, "unsupported YAML feature: tags on collections");
        return block_node(y, tag, 1, v);    /* own line: "- a" or "k: v" start collections */
    }
    if (found && !seq_entry && ycol(y) == indent && *y->p == '-' && ws_at(y, 1)) {
        if (tag != TAG_NONE) return YUNSUP(y, "unsupported YAML feature: tags on collections");
        return block_sequence(y, indent, 1, v);
    }
    /* empty: null, or the tag's constructor on "" */
    Scalar sc;
    sc.s = (char *)calloc(1, 1); sc.n = 0; sc.quoted = 0; sc.line = line; sc.col = col;
    if (!sc.s) return ms_errorf(MS_ERR_NOMEM, "%s: out of memory", y->origin);
    return make_scalar(y, &sc, tag, v);
}

static MsStatus indentation_error(Y *y, int c) {
    return yerr_at(y, MS_ERR_FORMAT, 0, "bad indentation: this line is indented %d spaces but the enclosing block is at %d "
                   "(a mis-indented entry, or a multi-line plain scalar, which is an unsupported YAML feature)", ycol(y), c);
}

static MsStatus block_mapping(Y *y, int c, JsonValue *v) {
    MsStatus s;
    v->type = JSON_OBJECT; v->origin = y->origin; v->line = y->line; v->col = ycol(y) + 1;
    if ((s = count_value(y)) != MS_OK) return s;
    if (++y->depth > JSON_MAX_DEPTH) return yerr_at(y, MS_ERR_FORMAT, 0, "nesting deeper than %d levels", JSON_MAX_DEPTH);
    for (;;) {
        JsonValue item, kv;
        Scalar k;
        memset(&item, 0, sizeof item); memset(&kv, 0, sizeof kv);
        unsigned char ch = *y->p;
        if (ch == '-' && ws_at(y, 1)) return YERR(y, "expected a mapping key (a sequence entry cannot follow a mapping entry at the same indentation)");
        if (ch == '[' || ch == '{') return YUNSUP(y, "unsupported YAML feature: a collection as a mapping key");
        if (ch == '!') return YUNSUP(y, "unsupported YAML feature: tags on mapping keys");
        if ((s = block_start_check(y)) != MS_OK) return s;
        const unsigned char *kstart = y->p;
        if ((s = scalar(y, 0, &k)) != MS_OK) return s;
        if ((size_t)(y->p - kstart) > YAML_MAX_KEY) { free(k.s); y->p = kstart; return YUNSUP(y, "unsupported YAML feature: a key longer than %d bytes", YAML_MAX_KEY); }
        int kline = k.line, kcol = k.col, quoted = k.quoted;
        if ((s = make_scalar(y, &k, TAG_NONE, &kv)) != MS_OK) return s;
        if (kv.type != JSON_STRING || (!quoted && !kv.len)) {
            clear_value(&kv);
            return ms_errorf(MS_ERR_UNSUPPORTED, "%s:%d:%d: unsupported YAML feature: a key that is not a string (quote it)", y->origin, kline, kcol);
        }
        while (y->p < y->end && *y->p == ' ') y->p++;
        if (y->p >= y->end || *y->p != ':' || !ws_at(y, 1)) {
            s = YERR(y, "expected ':' after the key '%.100s'", kv.str);
            clear_value(&kv);
            return s;
        }
        for (size_t i = 0; i < v->count; i++)
            if (v->items[i].key_len == kv.len && !memcmp(v->items[i].key, kv.str, kv.len)) {
                s = ms_errorf(MS_ERR_FORMAT, "%s:%d:%d: duplicate key '%.200s' (first at line %d)", y->origin, kline, kcol, kv.str, v->items[i].line);
                clear_value(&kv);
                return s;
            }
        s = value_after_indicator(y, c, 0, &item);
        item.key = kv.str; item.key_len = kv.len;                /* a member is located by its key */
        item.line = kline; item.col = kcol;
        if (s == MS_OK) s = push(y, v, &item);
        if (s != MS_OK) { clear_value(&item); return s; }
        if (y->p >= y->end || ycol(y) < c) break;
        if (ycol(y) > c) return indentation_error(y, c);
    }
    y->depth--;
    return MS_OK;
}

static MsStatus block_sequence(Y *y, int c, int indentless, JsonValue *v) {
    MsStatus s;
    v->type = JSON_ARRAY; v->origin = y->origin; v->line = y->line; v->col = ycol(y) + 1;
    if ((s = count_value(y)) != MS_OK) return s;
    if (++y->depth > JSON_MAX_DEPTH) return yerr_at(y, MS_ERR_FORMAT, 0, "nesting deeper than %d levels", JSON_MAX_DEPTH);
    for (;;) {
        JsonValue item;
        memset(&item, 0, sizeof item);
        s = value_after_indicator(y, c, 1, &item);
        if (s == MS_OK) s = push(y, v, &item);
        if (s != MS_OK) { clear_value(&item); return s; }
        if (y->p >= y->end || ycol(y) < c) break;
        if (ycol(y) > c) return indentation_error(y, c);
        if (!(*y->p == '-' && ws_at(y, 1))) {
            if (indentless) break;
            return YERR(y, "expected '- ' (a sequence entry) at this indentation");
        }
    }
    y->depth--;
    return MS_OK;
}

/* ---------------------------------------------------------------------------------------- */
/* Documents                                                                                 */
/* ---------------------------------------------------------------------------------------- */
/* PyYAML's Reader: UTF-8, printable characters only; line breaks LF or CRLF. */
static MsStatus check_chars(Y *y) {
    const unsigned char *p = y->p;
    while (p < y->end) {
        unsigned c = *p;
        size_t n = 1;
        unsigned long cp = c;
        if (c >= 0x80) {
            size_t avail = (size_t)(y->end - p);
            if (c >= 0xC2 && c <= 0xDF && avail >= 2 && (p[1] & 0xC0) == 0x80) { n = 2; cp = (c & 0x1Fu) << 6 | (p[1] & 0x3Fu); }
            else if (c >= 0xE0 && c <= 0xEF && avail >= 3 && (p[1] & 0xC0) == 0x80 && (p[2] & 0xC0) == 0x80) {
                n = 3; cp = (c & 0x0Fu) << 12 | (p[1] & 0x3Fu) << 6 | (p[2] & 0x3Fu);
                if (cp < 0x800 || (cp >= 0xD800 && cp <= 0xDFFF)) n = 0;
            } else if (c >= 0xF0 && c <= 0xF4 && avail >= 4 && (p[1] & 0xC0) == 0x80 && (p[2] & 0xC0) == 0x80 && (p[3] & 0xC0) == 0x80) {
                n = 4; cp = (unsigned long)(c & 0x07u) << 18 | (p[1] & 0x3Fu) << 12 | (p[2] & 0x3Fu) << 6 | (p[3] & 0x3Fu);
                if (cp < 0x10000 || cp > 0x10FFFF) n = 0;
            } else n = 0;
            if (!n) { y->p = p; return yerr_at(y, MS_ERR_FORMAT, 0, "invalid UTF-8 (byte 0x%02x)", c); }
        }
        if (cp == 0x85 || cp == 0x2028 || cp == 0x2029) { y->p = p; return YUNSUP(y, "unsupported YAML feature: Unicode line break U+%04lX", cp); }
        if (c == '\r' && !(p + 1 < y->end && p[1] == '\n')) { y->p = p; return YUNSUP(y, "unsupported YAML feature: a CR line break without LF"); }
        if ((cp < 0x20 && cp != '\t' && cp != '\n' && cp != '\r') || (cp >= 0x7F && cp <= 0x9F) || cp == 0xFFFE || cp == 0xFFFF) {
            y->p = p;
            return yerr_at(y, MS_ERR_FORMAT, 0, "non-printable character U+%04lX (YAML allows only printable characters)", cp);
        }
        if (c == '\n') { y->line++; y->line_start = p + 1; }
        p += n;
    }
    return MS_OK;
}

static MsStatus parse_document(const char *text, size_t len, const char *origin, int allow_scalar, JsonValue *root) {
    Y y;
    MsStatus s;
    int found;
    y.p = y.line_start = (const unsigned char *)text;
    y.end = y.p + len;
    y.origin = origin; y.line = 1; y.depth = 0; y.values = 0;
    if (len >= 3 && !memcmp(text, "\xEF\xBB\xBF", 3)) y.p += 3, y.line_start = y.p;
    {
        Y pre = y;
        if ((s = check_chars(&pre)) != MS_OK) return s;
    }
    /* the first content; a leading "---" is allowed */
    for (;;) {
        if ((s = skip_inline(&y)) != MS_OK) return s;
        if (y.p >= y.end || !at_eol(&y)) break;
        eat_break(&y);
    }
    if (y.p < y.end && *y.p == '%') return YUNSUP(&y, "unsupported YAML feature: directives (%%YAML, %%TAG)");
    if (y.p < y.end && ycol(&y) == 0 && y.end - y.p >= 3 && !memcmp(y.p, "---", 3) && ws_at(&y, 3)) {
        y.p += 3;
        if ((s = skip_inline(&y)) != MS_OK) return s;
        if (!at_eol(&y)) return YUNSUP(&y, "unsupported YAML feature: content on the '---' line");
    }
    if ((s = next_content(&y, &found)) != MS_OK) return s;
    root->origin = origin; root->line = y.line; root->col = ycol(&y) + 1;
    if (!found) { root->type = allow_scalar ? JSON_NULL : JSON_OBJECT; return MS_OK; }   /* OmegaConf: {} */
    int tag = TAG_NONE;
    if (*y.p == '!') {
        if ((s = read_tag(&y, &tag)) != MS_OK) return s;
        if ((s = skip_inline(&y)) != MS_OK) return s;
        if (at_eol(&y)) return YUNSUP(&y, "unsupported YAML feature: a tag alone on the first line");
    }
    s = block_node(&y, tag, 1, root);
    if (s == MS_OK && y.p < y.end) {
        if (root->type != JSON_OBJECT && root->type != JSON_ARRAY)
            return YUNSUP(&y, "unsupported YAML feature: a multi-line plain scalar (or content after the top-level scalar)");
        return YERR(&y, "expected the end of the document (this line is less indented than the first)");
    }
    if (s != MS_OK || allow_scalar || root->type == JSON_OBJECT || root->type == JSON_ARRAY) return s;
    /* OmegaConf.load: None -> {}, a string s -> {s: None}, anything else is an error */
    if (root->type == JSON_NULL) { root->type = JSON_OBJECT; return MS_OK; }
    if (root->type == JSON_STRING) {        /* OmegaConf.create(s) parses s as YAML once more */
        JsonValue again, item;
        memset(&again, 0, sizeof again);
        memset(&item, 0, sizeof item);
        s = parse_document(root->str, root->len, origin, 1, &again);
        if (s == MS_OK && again.type == JSON_NULL) {
            clear_value(root); root->type = JSON_OBJECT; root->origin = origin;
            return MS_OK;
        }
        if (s == MS_OK && again.type != JSON_STRING)
            s = ms_errorf(MS_ERR_UNSUPPORTED, "%s:%d:%d: unsupported: a top-level string that reads as YAML %s (OmegaConf parses it again)",
                          origin, root->line, root->col, json_type_name(again.type));
        if (s != MS_OK) { clear_value(&again); return s; }
        item.type = JSON_NULL; item.origin = origin; item.line = root->line; item.col = root->col;
        item.key = again.str; item.key_len = again.len;
        free(root->str);
        root->str = NULL; root->len = 0; root->type = JSON_OBJECT;
        return push(&y, root, &item);
    }
    return ms_errorf(MS_ERR_FORMAT, "%s:%d:%d: expected a mapping or a sequence at the top level (OmegaConf), found %s", origin,
                     root->line, root->col, json_type_name(root->type));
}

static MsStatus parse_root(const char *text, size_t len, const char *origin, int allow_scalar, JsonValue **out) {
    if (!origin) origin = "<yaml>";
    size_t olen = strlen(origin);
    JsonValue *root = (JsonValue *)calloc(1, sizeof *root + olen + 1);   /* origin lives after the root, as json.c does */
    *out = NULL;
    if (!root) return ms_errorf(MS_ERR_NOMEM, "%s: out of memory", origin);
    char *name = (char *)(root + 1);
    memcpy(name, origin, olen + 1);
    MsStatus s = parse_document(text ? text : "", text ? len : 0, name, allow_scalar, root);
    if (s != MS_OK) { json_free(root); return s; }
    *out = root;
    return MS_OK;
}

MsStatus yaml_parse(const char *text, size_t len, const char *origin, JsonValue **out) {
    return parse_root(text, len, origin, 0, out);
}

MsStatus yaml_parse_value(const char *text, size_t len, const char *origin, JsonValue **out) {
    return parse_root(text, len, origin, 1, out);
}

MsStatus yaml_parse_file(const char *path, JsonValue **out) {
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
    if (s == MS_OK) s = yaml_parse(b.data ? b.data : "", b.len, path, out);
    jbuf_free(&b);
    return s;
}

/* ---------------------------------------------------------------------------------------- */
/* --set key.path=value                                                                      */
/* ---------------------------------------------------------------------------------------- */
MsStatus yaml_apply_set(JsonValue *root, const char *assignment) {
    const char *eq = strchr(assignment, '=');
    MsStatus s;
    if (!root || root->type != JSON_OBJECT) return ms_errorf(MS_ERR_ARG, "--set %s: the configuration is not a mapping", assignment);
    if (!eq || eq == assignment) return ms_errorf(MS_ERR_ARG, "--set '%s': expected KEY.PATH=VALUE", assignment);
    size_t klen = (size_t)(eq - assignment);
    char origin[300];
    snprintf(origin, sizeof origin, "--set %.*s", (int)(klen > 200 ? 200 : klen), assignment);
    JsonValue *val = NULL;
    if ((s = yaml_parse_value(eq + 1, strlen(eq + 1), origin, &val)) != MS_OK) return s;
    JsonValue *obj = root;
    const char *k = assignment;
    for (;;) {
        const char *dot = memchr(k, '.', (size_t)(eq - k));
        const char *kend = dot ? dot : eq;
        char key[256];
        if (kend == k || (size_t)(kend - k) >= sizeof key) {
            json_free(val);
            return ms_errorf(MS_ERR_ARG, "--set '%s': empty or too long key in the path", assignment);
        }
        memcpy(key, k, (size_t)(kend - k));
        key[kend - k] = '\0';
        if (!dot) return json_set(obj, key, val);                 /* replaces in place, or appends */
        JsonValue *next = (JsonValue *)json_get(obj, key);
        if (!next) {                                             /* the schema check rejects unknown paths */
            if ((s = json_set(obj, key, json_new(JSON_OBJECT))) != MS_OK) { json_free(val); return s; }
            next = (JsonValue *)json_get(obj, key);
        } else if (next->type != JSON_OBJECT) {
            json_free(val);
            return ms_errorf(MS_ERR_ARG, "--set %.*s: '%.*s' is %s, not a mapping", (int)klen, assignment, (int)(kend - assignment),
                             assignment, json_type_name(next->type));
        }
        obj = next;
        k = dot + 1;
    }
}
