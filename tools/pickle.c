/* tools/pickle.c — PyTorch checkpoints: a restricted unpickler and a torch.save writer.
 *
 * torch.save (zip format, torch >= 1.6; torch/serialization.py `_save`) writes a zip archive
 *   <archive>/data.pkl       the object tree, pickle protocol 2
 *   <archive>/data/<key>     one raw little-endian record per storage
 *   <archive>/version        "3\n"   (torch >= 2.1 adds <archive>/byteorder "little")
 * In data.pkl a tensor is  _rebuild_tensor_v2(storage, offset, size, stride, requires_grad,
 * backward_hooks[, metadata])  (torch/_utils.py) and a storage is a persistent id
 *   BINPERSID ('storage', torch.<Type>Storage, key, location, numel).
 * A Parameter is _rebuild_parameter(tensor, requires_grad, backward_hooks).
 *
 * The unpickler here executes nothing. It is a stack machine over the pickle opcodes of
 * protocols 2-5 that build plain data (Python's Lib/pickletools.py documents each opcode);
 * GLOBAL/STACK_GLOBAL resolve only the names that torch 1.13's own weights_only unpickler
 * (torch/_weights_only_unpickler.py) allows and that carry tensors or dicts, and REDUCE, NEWOBJ
 * and BUILD act only on those. Every other global is refused with an error naming it. All
 * sizes come from the input and are bounded: stack, marks, memo, objects, string lengths.
 */
#include "mixshow.h"
#include "tools/tools.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define PK_MAX_STACK    (1u << 20)   /* values on the stack */
#define PK_MAX_MARKS    512          /* nested MARKs */
#define PK_MAX_MEMO     (1u << 22)   /* highest memo index + 1 */
#define PK_MAX_OBJECTS  (1u << 24)   /* values created */
#define PK_MAX_VISITS   (1u << 22)   /* nodes visited when flattening (memo sharing can form a DAG) */
#define PK_MAX_SUMMARY  12           /* children listed per container in the summary */

/* ---------------------------------------------------------------------------------------- */
/* Values                                                                                    */
/* ---------------------------------------------------------------------------------------- */
typedef enum {
    V_NONE, V_BOOL, V_INT, V_FLOAT, V_STR, V_BYTES, V_TUPLE, V_LIST, V_DICT,
    V_GLOBAL, V_STORAGE, V_TENSOR,
    V_OBJECT              /* lenient mode: a refused global or what it built; s = its name */
} VKind;

/* The globals we resolve (torch._weights_only_unpickler allows all of them). */
typedef enum {
    G_REBUILD_TENSOR_V2, G_REBUILD_TENSOR, G_REBUILD_PARAMETER, G_REBUILD_PARAMETER_STATE,
    G_ORDERED_DICT, G_TORCH_SIZE, G_STORAGE
} GKind;

static const struct { const char *module, *name; GKind g; PthDtype dt; } allowed[] = {
    { "torch._utils", "_rebuild_tensor_v2", G_REBUILD_TENSOR_V2, PTH_F32 },
    { "torch._utils", "_rebuild_tensor", G_REBUILD_TENSOR, PTH_F32 },
    { "torch._utils", "_rebuild_parameter", G_REBUILD_PARAMETER, PTH_F32 },
    { "torch._utils", "_rebuild_parameter_with_state", G_REBUILD_PARAMETER_STATE, PTH_F32 },
    { "collections", "OrderedDict", G_ORDERED_DICT, PTH_F32 },
    { "torch", "Size", G_TORCH_SIZE, PTH_F32 },
    { "torch", "FloatStorage", G_STORAGE, PTH_F32 },
    { "torch", "HalfStorage", G_STORAGE, PTH_F16 },
    { "torch", "BFloat16Storage", G_STORAGE, PTH_BF16 },
    { "torch", "DoubleStorage", G_STORAGE, PTH_F64 },
    { "torch", "LongStorage", G_STORAGE, PTH_I64 },
    { "torch", "IntStorage", G_STORAGE, PTH_I32 },
    { "torch", "ShortStorage", G_STORAGE, PTH_I16 },
    { "torch", "CharStorage", G_STORAGE, PTH_I8 },
    { "torch", "ByteStorage", G_STORAGE, PTH_U8 },
    { "torch", "BoolStorage", G_STORAGE, PTH_BOOL },
};

typedef struct Val Val;
struct Val {
    VKind kind;
    int64_t i;            /* BOOL/INT value; GLOBAL: index into allowed[]; STORAGE/TENSOR: dtype */
    double f;             /* FLOAT */
    char *s;              /* STR/BYTES bytes (NUL-terminated copy); STORAGE/TENSOR: storage key */
    size_t len;           /* STR/BYTES length */
    Val **items;          /* TUPLE/LIST items; DICT keys and values interleaved */
    size_t n, cap;        /* items used / allocated (DICT: 2 per entry) */
    /* STORAGE: numel; TENSOR: view and requires_grad */
    int64_t numel, offset;
    int ndim, requires_grad;
    int64_t shape[MS_MAX_DIMS], stride[MS_MAX_DIMS];
    Val *storage;         /* TENSOR: its STORAGE value (not owned) */
};

typedef struct {
    const unsigned char *p;
    size_t n, pos;
    const char *label;       /* file or member name for messages */
    Val **all;               /* every value created, for freeing */
    size_t nall, capall;
    Val **stack;
    size_t sp, capstack;
    size_t *marks;
    size_t nmarks, capmarks;
    Val **memo;
    size_t nmemo, nmemo_set;  /* slots allocated, slots filled (MEMOIZE's next index) */
    Val *result;
    Val none_val;            /* shared constants need no allocation */
    int lenient;             /* PTH_LENIENT: refused globals become inert objects */
} Unpickler;

static const char *dtype_names[PTH_NDTYPES] = { "F32", "F16", "BF16", "F64", "I64", "I32", "I16", "I8", "U8", "BOOL" };
static const size_t dtype_sizes[PTH_NDTYPES] = { 4, 2, 2, 8, 8, 4, 2, 1, 1, 1 };
const char *pth_dtype_name(PthDtype t) { return (unsigned)t < PTH_NDTYPES ? dtype_names[t] : "?"; }
size_t pth_dtype_size(PthDtype t) { return (unsigned)t < PTH_NDTYPES ? dtype_sizes[t] : 0; }

static void up_free(Unpickler *u) {
    for (size_t i = 0; i < u->nall; i++) { free(u->all[i]->s); free(u->all[i]->items); free(u->all[i]); }
    free(u->all); free(u->stack); free(u->marks); free(u->memo);
    memset(u, 0, sizeof *u);
}

static MsStatus nomem(Unpickler *u) { return ms_errorf(MS_ERR_NOMEM, "%s: out of memory while unpickling", u->label); }

static Val *new_val(Unpickler *u, VKind kind) {
    Val *v;
    if (u->nall >= PK_MAX_OBJECTS) return NULL;
    if (u->nall == u->capall) {
        size_t cap = u->capall ? 2 * u->capall : 256;
        Val **a = (Val **)realloc(u->all, cap * sizeof *a);
        if (!a) return NULL;
        u->all = a; u->capall = cap;
    }
    if (!(v = (Val *)calloc(1, sizeof *v))) return NULL;
    v->kind = kind;
    u->all[u->nall++] = v;
    return v;
}

/* Appends x to a container's items (bounded by the object limit: every item was pushed). */
static int add_item(Val *c, Val *x) {
    if (c->n == c->cap) {
        size_t cap = c->cap ? 2 * c->cap : 4;
        Val **a = (Val **)realloc(c->items, cap * sizeof *a);
        if (!a) return 0;
        c->items = a; c->cap = cap;
    }
    c->items[c->n++] = x;
    return 1;
}

static const char *kind_name(const Val *v) {
    static const char *names[] = { "None", "bool", "int", "float", "str", "bytes", "tuple", "list",
                                   "dict", "global", "storage", "tensor", "object" };
    return names[v->kind];
}

/* ---------------------------------------------------------------------------------------- */
/* The unpickler                                                                             */
/* ---------------------------------------------------------------------------------------- */
#define PERR(u, op, ...) up_err(u, op, __VA_ARGS__)
static MsStatus up_err(Unpickler *u, size_t op, const char *fmt, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 3, 4)))
#endif
    ;
static MsStatus up_err(Unpickler *u, size_t op, const char *fmt, ...) {
    char msg[600];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    return ms_errorf(MS_ERR_FORMAT, "%s: pickle offset %zu (opcode 0x%02x): %s", u->label, op,
                     op < u->n ? u->p[op] : 0, msg);
}

static MsStatus push(Unpickler *u, Val *v) {
    if (!v) return nomem(u);
    if (u->sp == u->capstack) {
        size_t cap = u->capstack ? 2 * u->capstack : 64;
        Val **a;
        if (u->sp >= PK_MAX_STACK)
            return ms_errorf(MS_ERR_FORMAT, "%s: pickle stack deeper than %u values", u->label, (unsigned)PK_MAX_STACK);
        if (!(a = (Val **)realloc(u->stack, cap * sizeof *a))) return nomem(u);
        u->stack = a; u->capstack = cap;
    }
    u->stack[u->sp++] = v;
    return MS_OK;
}

/* Values above the innermost MARK: stack[*from .. sp). */
static size_t mark_base(const Unpickler *u) { return u->nmarks ? u->marks[u->nmarks - 1] : 0; }

static const unsigned char *take(Unpickler *u, size_t n) {
    if (n > u->n - u->pos) return NULL;
    u->pos += n;
    return u->p + u->pos - n;
}

static uint32_t le32(const unsigned char *b) {
    return (uint32_t)b[0] | (uint32_t)b[1] << 8 | (uint32_t)b[2] << 16 | (uint32_t)b[3] << 24;
}
static uint64_t le64(const unsigned char *b) { return (uint64_t)le32(b) | (uint64_t)le32(b + 4) << 32; }

static Val *new_int(Unpickler *u, int64_t x) { Val *v = new_val(u, V_INT); if (v) v->i = x; return v; }

static Val *new_bytes(Unpickler *u, VKind kind, const unsigned char *b, size_t n) {
    Val *v = new_val(u, kind);
    if (!v || !(v->s = (char *)malloc(n + 1))) return NULL;
    memcpy(v->s, b, n);
    v->s[n] = '\0';
    v->len = n;
    return v;
}

/* A text line (GLOBAL module/name, PUT/GET decimal): up to max bytes, newline required. */
static const char *take_line(Unpickler *u, size_t max, size_t *len) {
    const unsigned char *s = u->p + u->pos;
    size_t room = u->n - u->pos, k;
    for (k = 0; k < room && k <= max; k++)
        if (s[k] == '\n') { *len = k; u->pos += k + 1; return (const char *)s; }
    return NULL;
}

static int is_str(const Val *v) { return v->kind == V_STR || v->kind == V_BYTES; }
static int is_int(const Val *v) { return v->kind == V_INT || v->kind == V_BOOL; }

static MsStatus resolve_global(Unpickler *u, size_t op, const char *mod, size_t ml, const char *name, size_t nl) {
    for (size_t i = 0; i < sizeof allowed / sizeof allowed[0]; i++)
        if (strlen(allowed[i].module) == ml && !memcmp(allowed[i].module, mod, ml) &&
            strlen(allowed[i].name) == nl && !memcmp(allowed[i].name, name, nl)) {
            Val *v = new_val(u, V_GLOBAL);
            if (v) v->i = (int64_t)i;
            return push(u, v);
        }
    if (u->lenient) {                      /* an inert placeholder: never called, never traversed */
        Val *v = new_bytes(u, V_OBJECT, (const unsigned char *)mod, ml);
        if (v) {
            char *t = (char *)realloc(v->s, ml + nl + 2);
            if (!t) return nomem(u);
            t[ml] = '.';
            memcpy(t + ml + 1, name, nl);
            t[ml + nl + 1] = '\0';
            v->s = t; v->len = ml + nl + 1;
        }
        return push(u, v);
    }
    return PERR(u, op, "global '%.*s.%.*s' is not allowed (only torch tensor/storage rebuilds, "
                "OrderedDict and torch.Size are; nothing is ever executed)", (int)ml, mod, (int)nl, name);
}

/* Fills a tensor's size/stride from tuples of ints. */
static MsStatus get_dims(Unpickler *u, size_t op, const Val *t, int64_t *dims, int *ndim, const char *what) {
    if (t->kind != V_TUPLE && t->kind != V_LIST) return PERR(u, op, "tensor %s is a %s, not a tuple", what, kind_name(t));
    if (t->n > MS_MAX_DIMS) return PERR(u, op, "tensor %s has %zu dims (at most %d supported)", what, t->n, MS_MAX_DIMS);
    for (size_t k = 0; k < t->n; k++) {
        if (t->items[k]->kind != V_INT || t->items[k]->i < 0)
            return PERR(u, op, "tensor %s[%zu] is not a non-negative int", what, k);
        dims[k] = t->items[k]->i;
    }
    *ndim = (int)t->n;
    return MS_OK;
}

/* _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad, backward_hooks
 * [, metadata]) and _rebuild_tensor(storage, storage_offset, size, stride). */
static MsStatus rebuild_tensor(Unpickler *u, size_t op, const Val *a, int v2, Val **out) {
    int nd2 = 0;
    Val *t;
    MsStatus s;
    if (v2 ? (a->n != 6 && a->n != 7) : a->n != 4)
        return PERR(u, op, "%s takes %s arguments, got %zu", v2 ? "_rebuild_tensor_v2" : "_rebuild_tensor",
                    v2 ? "6 or 7" : "4", a->n);
    if (a->items[0]->kind != V_STORAGE) return PERR(u, op, "tensor storage is a %s, not a storage", kind_name(a->items[0]));
    if (a->items[1]->kind != V_INT || a->items[1]->i < 0) return PERR(u, op, "tensor storage offset is not a non-negative int");
    if (!(t = new_val(u, V_TENSOR))) return nomem(u);
    if ((s = get_dims(u, op, a->items[2], t->shape, &t->ndim, "size"))) return s;
    if ((s = get_dims(u, op, a->items[3], t->stride, &nd2, "stride"))) return s;
    if (nd2 != t->ndim) return PERR(u, op, "tensor size has %d dims but stride has %d", t->ndim, nd2);
    if (v2) {
        if (!is_int(a->items[4])) return PERR(u, op, "requires_grad is a %s, not a bool", kind_name(a->items[4]));
        if (a->items[5]->kind != V_DICT || a->items[5]->n)
            return PERR(u, op, "backward_hooks must be an empty OrderedDict (hooks are never serialized)");
        t->requires_grad = a->items[4]->i != 0;
    }
    t->storage = a->items[0];
    t->i = t->storage->i;
    t->offset = a->items[1]->i;
    *out = t;
    return MS_OK;
}

/* REDUCE: callable(*args) for the callables we know; the result replaces the callable. */
static MsStatus do_reduce(Unpickler *u, size_t op, Val *fn, Val *args, Val **out) {
    GKind g;
    if (fn->kind == V_OBJECT) { *out = fn; return MS_OK; }   /* lenient: the result is inert too */
    if (fn->kind != V_GLOBAL) return PERR(u, op, "REDUCE of a %s (only allowed globals are callable)", kind_name(fn));
    if (args->kind != V_TUPLE) return PERR(u, op, "REDUCE arguments are a %s, not a tuple", kind_name(args));
    g = allowed[fn->i].g;
    switch (g) {
    case G_REBUILD_TENSOR_V2: return rebuild_tensor(u, op, args, 1, out);
    case G_REBUILD_TENSOR: return rebuild_tensor(u, op, args, 0, out);
    case G_REBUILD_PARAMETER:
    case G_REBUILD_PARAMETER_STATE:
        /* _rebuild_parameter(data, requires_grad, backward_hooks[, state]) */
        if (args->n != (g == G_REBUILD_PARAMETER ? 3u : 4u) || args->items[0]->kind != V_TENSOR ||
            !is_int(args->items[1]) || args->items[2]->kind != V_DICT || args->items[2]->n)
            return PERR(u, op, "%s expects (tensor, bool, empty OrderedDict%s)", allowed[fn->i].name,
                        g == G_REBUILD_PARAMETER ? "" : ", state");
        {
            Val *t = new_val(u, V_TENSOR);
            if (!t) return nomem(u);
            *t = *args->items[0];    /* a copy: the data tensor may be shared via the memo */
            t->requires_grad = args->items[1]->i != 0;
            *out = t;
        }
        return MS_OK;
    case G_ORDERED_DICT:
        if (args->n) return PERR(u, op, "OrderedDict(...) with arguments is not supported (torch writes OrderedDict() + SETITEMS)");
        return (*out = new_val(u, V_DICT)) ? MS_OK : nomem(u);
    case G_TORCH_SIZE:
        if (args->n != 1 || args->items[0]->kind != V_TUPLE) return PERR(u, op, "torch.Size expects one tuple");
        *out = args->items[0];
        return MS_OK;
    case G_STORAGE: break;
    }
    return PERR(u, op, "REDUCE of '%s.%s' is not allowed", allowed[fn->i].module, allowed[fn->i].name);
}

static MsStatus memo_put(Unpickler *u, size_t op, uint64_t idx) {
    if (!u->sp) return PERR(u, op, "memo put with an empty stack");
    /* picklers number memo entries 0, 1, 2, ...: each needs >= 2 bytes of input */
    if (idx >= PK_MAX_MEMO || idx > u->n)
        return PERR(u, op, "memo index %llu is out of range (limit %zu for this input)",
                    (unsigned long long)idx, u->n < PK_MAX_MEMO ? u->n : (size_t)PK_MAX_MEMO);
    if (idx < u->nmemo && u->memo[idx]) { u->memo[idx] = u->stack[u->sp - 1]; return MS_OK; }
    if (idx >= u->nmemo) {
        size_t nn = u->nmemo ? u->nmemo : 64;
        while (nn <= idx) nn *= 2;
        Val **m = (Val **)realloc(u->memo, nn * sizeof *m);
        if (!m) return nomem(u);
        memset(m + u->nmemo, 0, (nn - u->nmemo) * sizeof *m);
        u->memo = m; u->nmemo = nn;
    }
    u->memo[idx] = u->stack[u->sp - 1];
    u->nmemo_set++;
    return MS_OK;
}

static MsStatus memo_get(Unpickler *u, size_t op, uint64_t idx) {
    if (idx >= u->nmemo || !u->memo[idx])
        return PERR(u, op, "memo index %llu was never stored", (unsigned long long)idx);
    return push(u, u->memo[idx]);
}

static int parse_dec(const char *s, size_t n, uint64_t *out) {
    uint64_t x = 0;
    if (n == 0 || n > 18) return 0;
    for (size_t k = 0; k < n; k++) { if (s[k] < '0' || s[k] > '9') return 0; x = x * 10 + (uint64_t)(s[k] - '0'); }
    *out = x;
    return 1;
}

/* d[k] = v. Keys are appended as they come; a repeated key shows up as a duplicate tensor
 * name when the tree is flattened (torch never writes one). */
static int dict_set(Val *d, Val *k, Val *v) { return add_item(d, k) && add_item(d, v); }

static MsStatus check_key(Unpickler *u, size_t op, const Val *k) {
    if (is_str(k) || k->kind == V_INT || k->kind == V_BOOL || k->kind == V_NONE) return MS_OK;
    return PERR(u, op, "dict key is a %s (only str/bytes/int keys are supported)", kind_name(k));
}

static MsStatus unpickle(Unpickler *u) {
    MsStatus s = MS_OK;
    for (;;) {
        size_t op = u->pos;
        const unsigned char *b;
        Val *v;
        if (u->pos >= u->n) return PERR(u, op, "truncated pickle (no STOP opcode)");
        unsigned c = u->p[u->pos++];
#define NEED(k) do { if (!(b = take(u, (k)))) return PERR(u, op, "truncated pickle (operand of %zu bytes)", (size_t)(k)); } while (0)
#define STACK(k) do { if (u->sp - mark_base(u) < (size_t)(k)) return PERR(u, op, "stack underflow (need %d values above the mark)", (int)(k)); } while (0)
        switch (c) {
        case 0x80: NEED(1); if (b[0] > 5) return PERR(u, op, "pickle protocol %u (at most 5 supported)", b[0]); break; /* PROTO */
        case 0x95: NEED(8); break;                                          /* FRAME: framing only */
        case '.':                                                           /* STOP */
            if (u->nmarks) return PERR(u, op, "STOP with %zu open MARKs", u->nmarks);
            if (u->sp != 1) return PERR(u, op, "STOP with %zu values on the stack (want 1)", u->sp);
            u->result = u->stack[0];
            return MS_OK;
        case '(':                                                           /* MARK */
            if (u->nmarks >= PK_MAX_MARKS) return PERR(u, op, "MARKs nested deeper than %d", PK_MAX_MARKS);
            if (u->nmarks == u->capmarks) {
                size_t cap = u->capmarks ? 2 * u->capmarks : 16;
                size_t *m = (size_t *)realloc(u->marks, cap * sizeof *m);
                if (!m) return nomem(u);
                u->marks = m; u->capmarks = cap;
            }
            u->marks[u->nmarks++] = u->sp;
            break;
        case '0': STACK(1); u->sp--; break;                                 /* POP */
        case '1': if (!u->nmarks) return PERR(u, op, "POP_MARK without MARK");   /* POP_MARK */
            u->sp = u->marks[--u->nmarks]; break;
        case '2': STACK(1); if ((s = push(u, u->stack[u->sp - 1]))) return s; break;   /* DUP */
        case 'N': if ((s = push(u, &u->none_val))) return s; break;         /* NONE */
        case 0x88: case 0x89:                                               /* NEWTRUE / NEWFALSE */
            if (!(v = new_val(u, V_BOOL))) return nomem(u);
            v->i = c == 0x88;
            if ((s = push(u, v))) return s;
            break;
        case 'K': NEED(1); if ((s = push(u, new_int(u, b[0])))) return s; break;           /* BININT1 */
        case 'M': NEED(2); if ((s = push(u, new_int(u, b[0] | b[1] << 8)))) return s; break; /* BININT2 */
        case 'J': NEED(4); if ((s = push(u, new_int(u, (int32_t)le32(b))))) return s; break; /* BININT */
        case 0x8a: case 0x8b: {                                             /* LONG1 / LONG4 */
            size_t k;
            uint64_t x = 0;
            if (c == 0x8a) { NEED(1); k = b[0]; } else { NEED(4); k = le32(b); }
            if (k > 8) return PERR(u, op, "integer of %zu bytes (at most 8 supported)", k);
            NEED(k);
            for (size_t j = 0; j < k; j++) x |= (uint64_t)b[j] << (8 * j);
            if (k && k < 8 && (b[k - 1] & 0x80)) x |= ~(uint64_t)0 << (8 * k);   /* sign-extend */
            if ((s = push(u, new_int(u, (int64_t)x)))) return s;
            break;
        }
        case 'G': {                                                         /* BINFLOAT: big-endian */
            uint64_t x = 0;
            NEED(8);
            for (int j = 0; j < 8; j++) x = x << 8 | b[j];
            if (!(v = new_val(u, V_FLOAT))) return nomem(u);
            memcpy(&v->f, &x, 8);
            if ((s = push(u, v))) return s;
            break;
        }
        case 'X': case 0x8c: case 0x8d:                                     /* (SHORT_)BINUNICODE(8) */
        case 'B': case 'C': case 0x8e:                                      /* (SHORT_)BINBYTES(8) */
        case 'T': case 'U': {                                               /* (SHORT_)BINSTRING */
            uint64_t k;
            if (c == 0x8c || c == 'C' || c == 'U') { NEED(1); k = b[0]; }
            else if (c == 0x8d || c == 0x8e) { NEED(8); k = le64(b); }
            else { NEED(4); k = le32(b); if (c == 'T' && (b[3] & 0x80)) return PERR(u, op, "negative string length"); }
            if (k > u->n - u->pos) return PERR(u, op, "string of %llu bytes runs past the end of the pickle",
                                              (unsigned long long)k);
            NEED((size_t)k);
            if ((s = push(u, new_bytes(u, (c == 'X' || c == 0x8c || c == 0x8d || c == 'T' || c == 'U') ? V_STR : V_BYTES,
                                       b, (size_t)k)))) return s;
            break;
        }
        case ')': if ((s = push(u, new_val(u, V_TUPLE)))) return s; break; /* EMPTY_TUPLE */
        case ']': if ((s = push(u, new_val(u, V_LIST)))) return s; break;  /* EMPTY_LIST */
        case '}': if ((s = push(u, new_val(u, V_DICT)))) return s; break;  /* EMPTY_DICT */
        case 0x85: case 0x86: case 0x87: {                                  /* TUPLE1/2/3 */
            size_t k = c - 0x84;
            STACK(k);
            if (!(v = new_val(u, V_TUPLE))) return nomem(u);
            for (size_t j = 0; j < k; j++) if (!add_item(v, u->stack[u->sp - k + j])) return nomem(u);
            u->sp -= k;
            if ((s = push(u, v))) return s;
            break;
        }
        case 't': case 'l': case 'd': {                                     /* TUPLE / LIST / DICT */
            size_t base;
            if (!u->nmarks) return PERR(u, op, "%s without MARK", c == 't' ? "TUPLE" : c == 'l' ? "LIST" : "DICT");
            base = u->marks[--u->nmarks];
            if (!(v = new_val(u, c == 't' ? V_TUPLE : c == 'l' ? V_LIST : V_DICT))) return nomem(u);
            if (c == 'd' && (u->sp - base) % 2) return PERR(u, op, "DICT with an odd number of items");
            for (size_t j = base; j < u->sp; j += c == 'd' ? 2 : 1) {
                if (c == 'd') {
                    if ((s = check_key(u, op, u->stack[j]))) return s;
                    if (!dict_set(v, u->stack[j], u->stack[j + 1])) return nomem(u);
                } else if (!add_item(v, u->stack[j])) return nomem(u);
            }
            u->sp = base;
            if ((s = push(u, v))) return s;
            break;
        }
        case 'a': case 'e': {                                               /* APPEND / APPENDS */
            size_t base;
            Val *l;
            if (c == 'a') { STACK(2); base = u->sp - 1; }
            else {
                if (!u->nmarks) return PERR(u, op, "APPENDS without MARK");
                base = u->marks[--u->nmarks];
                if (base == 0 || base - 1 < mark_base(u)) return PERR(u, op, "APPENDS with no list below the MARK");
            }
            l = u->stack[base - 1];
            if (l->kind == V_OBJECT) { u->sp = base; break; }        /* lenient: dropped */
            if (l->kind != V_LIST) return PERR(u, op, "append to a %s (only lists)", kind_name(l));
            for (size_t j = base; j < u->sp; j++) if (!add_item(l, u->stack[j])) return nomem(u);
            u->sp = base;
            break;
        }
        case 's': case 'u': {                                               /* SETITEM / SETITEMS */
            size_t base;
            Val *d;
            if (c == 's') { STACK(3); base = u->sp - 2; }
            else {
                if (!u->nmarks) return PERR(u, op, "SETITEMS without MARK");
                base = u->marks[--u->nmarks];
                if (base == 0 || base - 1 < mark_base(u)) return PERR(u, op, "SETITEMS with no dict below the MARK");
                if ((u->sp - base) % 2) return PERR(u, op, "SETITEMS with an odd number of items");
            }
            d = u->stack[base - 1];
            if (d->kind == V_OBJECT) { u->sp = base; break; }        /* lenient: dropped */
            if (d->kind != V_DICT) return PERR(u, op, "setitem on a %s (only dicts)", kind_name(d));
            for (size_t j = base; j < u->sp; j += 2) {
                if ((s = check_key(u, op, u->stack[j]))) return s;
                if (!dict_set(d, u->stack[j], u->stack[j + 1])) return nomem(u);
            }
            u->sp = base;
            break;
        }
        case 'q': NEED(1); if ((s = memo_put(u, op, b[0]))) return s; break;          /* BINPUT */
        case 'r': NEED(4); if ((s = memo_put(u, op, le32(b)))) return s; break;       /* LONG_BINPUT */
        case 0x94: if ((s = memo_put(u, op, u->nmemo_set))) return s; break; /* MEMOIZE */
        case 'h': NEED(1); if ((s = memo_get(u, op, b[0]))) return s; break;          /* BINGET */
        case 'j': NEED(4); if ((s = memo_get(u, op, le32(b)))) return s; break;       /* LONG_BINGET */
        case 'p': case 'g': {                                               /* PUT / GET (text) */
            size_t len;
            uint64_t idx;
            const char *line = take_line(u, 20, &len);
            if (!line || !parse_dec(line, len, &idx)) return PERR(u, op, "bad decimal memo index");
            if ((s = c == 'p' ? memo_put(u, op, idx) : memo_get(u, op, idx))) return s;
            break;
        }
        case 'c': {                                                         /* GLOBAL "module\nname\n" */
            size_t ml, nl;
            const char *mod = take_line(u, 256, &ml), *name = mod ? take_line(u, 256, &nl) : NULL;
            if (!name) return PERR(u, op, "GLOBAL without two short newline-terminated names");
            if ((s = resolve_global(u, op, mod, ml, name, nl))) return s;
            break;
        }
        case 0x93: {                                                        /* STACK_GLOBAL */
            Val *m, *nm;
            STACK(2);
            m = u->stack[u->sp - 2]; nm = u->stack[u->sp - 1];
            if (m->kind != V_STR || nm->kind != V_STR) return PERR(u, op, "STACK_GLOBAL needs two strings");
            u->sp -= 2;
            if ((s = resolve_global(u, op, m->s, m->len, nm->s, nm->len))) return s;
            break;
        }
        case 'R': {                                                         /* REDUCE */
            STACK(2);
            if ((s = do_reduce(u, op, u->stack[u->sp - 2], u->stack[u->sp - 1], &v))) return s;
            u->sp -= 2;
            if ((s = push(u, v))) return s;
            break;
        }
        case 0x81: {                                                        /* NEWOBJ cls args */
            Val *cls, *args;
            STACK(2);
            cls = u->stack[u->sp - 2]; args = u->stack[u->sp - 1];
            if (cls->kind == V_OBJECT) { u->sp -= 1; break; }       /* lenient: cls stays, inert */
            if (cls->kind != V_GLOBAL || allowed[cls->i].g != G_ORDERED_DICT || args->kind != V_TUPLE || args->n)
                return PERR(u, op, "NEWOBJ of a %s%s%s (only OrderedDict())", kind_name(cls),
                            cls->kind == V_GLOBAL ? " " : "", cls->kind == V_GLOBAL ? allowed[cls->i].name : "");
            u->sp -= 2;
            if ((s = push(u, new_val(u, V_DICT)))) return s;
            break;
        }
        case 0x92: {                                                        /* NEWOBJ_EX cls args kw */
            STACK(3);
            if (u->stack[u->sp - 3]->kind != V_OBJECT)
                return PERR(u, op, "NEWOBJ_EX of a %s (only refused globals in lenient mode)", kind_name(u->stack[u->sp - 3]));
            u->sp -= 2;
            break;
        }
        case 'b': {                                                         /* BUILD inst state */
            Val *inst;
            STACK(2);
            inst = u->stack[u->sp - 2];
            /* OrderedDict state is its __dict__ (a state_dict's `_metadata`): kept out of the tree */
            if (inst->kind != V_DICT && inst->kind != V_OBJECT) return PERR(u, op, "BUILD of a %s (only OrderedDict state is accepted)", kind_name(inst));
            u->sp -= 1;
            break;
        }
        case 'Q': {                                                         /* BINPERSID */
            Val *pid, *st;
            STACK(1);
            pid = u->stack[u->sp - 1];
            if (pid->kind != V_TUPLE || (pid->n != 5 && pid->n != 6) || !is_str(pid->items[0]) ||
                strcmp(pid->items[0]->s, "storage"))
                return PERR(u, op, "persistent id is not ('storage', type, key, location, numel)");
            st = pid->items[1];
            if (st->kind != V_GLOBAL || allowed[st->i].g != G_STORAGE)
                return PERR(u, op, "persistent id names a %s, not a storage type", kind_name(st));
            if (!is_str(pid->items[2]) || pid->items[2]->len == 0 || pid->items[2]->len > 256 ||
                strlen(pid->items[2]->s) != pid->items[2]->len)
                return PERR(u, op, "storage key is not a short string");
            if (!is_str(pid->items[3])) return PERR(u, op, "storage location is not a string");
            if (pid->items[4]->kind != V_INT || pid->items[4]->i < 0) return PERR(u, op, "storage numel is not a non-negative int");
            if (pid->n == 6 && pid->items[5]->kind != V_NONE)
                return PERR(u, op, "storage views (legacy view_metadata) are not supported");
            if (!(v = new_bytes(u, V_STORAGE, (const unsigned char *)pid->items[2]->s, pid->items[2]->len))) return nomem(u);
            v->i = allowed[st->i].dt;
            v->numel = pid->items[4]->i;
            u->stack[u->sp - 1] = v;
            break;
        }
        default:
            return PERR(u, op, "opcode 0x%02x ('%c') is not supported by this restricted unpickler",
                        c, c >= 32 && c < 127 ? (int)c : '?');
        }
#undef NEED
#undef STACK
    }
}

/* ---------------------------------------------------------------------------------------- */
/* Growable byte buffer (summaries, names, the writer's pickle)                               */
/* ---------------------------------------------------------------------------------------- */
typedef struct { char *p; size_t n, cap; int oom; } Buf;

static void buf_put(Buf *b, const void *s, size_t n) {
    if (b->oom) return;
    if (n + 1 > b->cap - b->n || !b->p) {
        size_t cap = b->cap ? b->cap : 256;
        char *p;
        while (cap - b->n < n + 1) { if (cap > SIZE_MAX / 2) { b->oom = 1; return; } cap *= 2; }
        if (!(p = (char *)realloc(b->p, cap))) { b->oom = 1; return; }
        b->p = p; b->cap = cap;
    }
    memcpy(b->p + b->n, s, n);
    b->n += n;
    b->p[b->n] = '\0';
}
static void buf_str(Buf *b, const char *s) { buf_put(b, s, strlen(s)); }
static void buf_byte(Buf *b, unsigned c) { unsigned char x = (unsigned char)c; buf_put(b, &x, 1); }

/* A dict key or list index as a path component; control bytes become '?'. */
static void key_text(Buf *b, const Val *k) {
    char t[32];
    if (is_str(k)) {
        for (size_t j = 0; j < k->len; j++) {
            unsigned char ch = (unsigned char)k->s[j];
            buf_byte(b, ch < 32 || ch == 127 ? '?' : ch);
        }
        return;
    }
    if (k->kind == V_BOOL) snprintf(t, sizeof t, "%s", k->i ? "True" : "False");
    else if (k->kind == V_NONE) snprintf(t, sizeof t, "None");
    else snprintf(t, sizeof t, "%lld", (long long)k->i);
    buf_str(b, t);
}

/* ---------------------------------------------------------------------------------------- */
/* Flattening: the tree -> named tensors, and a short summary for `inspect`                   */
/* ---------------------------------------------------------------------------------------- */
typedef struct {
    const char *label;
    ZipReader *zip;          /* NULL: parse only, storages are not looked up */
    const char *prefix;      /* "archive/" */
    PthTensor *t;
    size_t n, cap;
    size_t visits;
    Buf sum;
} Flat;

static MsStatus tensor_check(Flat *fl, const char *name, const Val *v, PthTensor *t) {
    size_t es = pth_dtype_size((PthDtype)v->i), numel = 1, last = 0, nbytes;
    const Val *st = v->storage;
    for (int d = 0; d < v->ndim; d++) {
        size_t step;
        if (!ms_mul_ok(numel, (size_t)v->shape[d], &numel) ||
            (v->shape[d] > 0 && (!ms_mul_ok((size_t)(v->shape[d] - 1), (size_t)v->stride[d], &step) ||
                                 !ms_add_ok(last, step, &last))))
            return ms_errorf(MS_ERR_FORMAT, "%s: tensor '%s': shape/stride overflow", fl->label, name);
    }
    if ((uint64_t)st->numel > SIZE_MAX / es || (uint64_t)v->offset > SIZE_MAX)
        return ms_errorf(MS_ERR_FORMAT, "%s: tensor '%s': storage size overflows", fl->label, name);
    if (numel && (!ms_add_ok(last, (size_t)v->offset, &last) || last >= (size_t)st->numel))
        return ms_errorf(MS_ERR_FORMAT, "%s: tensor '%s': view (offset %lld, shape/stride) reaches "
                         "element %zu of a storage of %lld", fl->label, name, (long long)v->offset,
                         last, (long long)st->numel);
    nbytes = (size_t)st->numel * es;
    memset(t, 0, sizeof *t);
    t->dtype = (PthDtype)v->i;
    t->ndim = v->ndim;
    memcpy(t->shape, v->shape, sizeof t->shape);
    memcpy(t->stride, v->stride, sizeof t->stride);
    t->offset = v->offset;
    t->storage_numel = st->numel;
    t->requires_grad = v->requires_grad;
    t->entry = SIZE_MAX;
    if (fl->zip) {
        Buf mn = { 0 };
        const ZipEntry *e;
        buf_str(&mn, fl->prefix); buf_str(&mn, "data/"); buf_str(&mn, st->s);
        if (mn.oom) return ms_errorf(MS_ERR_NOMEM, "%s: out of memory", fl->label);
        e = zip_find(fl->zip, mn.p);
        if (!e) {
            MsStatus s = ms_errorf(MS_ERR_FORMAT, "%s: tensor '%s': storage record '%s' is missing",
                                   fl->label, name, mn.p);
            free(mn.p);
            return s;
        }
        if (e->usize < nbytes) {
            MsStatus s = ms_errorf(MS_ERR_FORMAT, "%s: tensor '%s': record '%s' has %llu bytes, the "
                                   "storage needs %zu (%lld x %s)", fl->label, name, mn.p,
                                   (unsigned long long)e->usize, nbytes, (long long)st->numel,
                                   pth_dtype_name(t->dtype));
            free(mn.p);
            return s;
        }
        free(mn.p);
        t->entry = (size_t)(e - fl->zip->e);
    }
    return MS_OK;
}

static MsStatus flatten(Flat *fl, const Val *v, Buf *path, int depth) {
    MsStatus s;
    if (++fl->visits > PK_MAX_VISITS)
        return ms_errorf(MS_ERR_FORMAT, "%s: object tree has more than %u nodes (shared memo "
                         "references?)", fl->label, (unsigned)PK_MAX_VISITS);
    if (depth > PTH_MAX_DEPTH)
        return ms_errorf(MS_ERR_FORMAT, "%s: containers nested deeper than %d (or a recursive "
                         "structure) at '%.200s'", fl->label, PTH_MAX_DEPTH, path->p ? path->p : "");
    if (v->kind == V_TENSOR) {
        PthTensor t;
        const char *name = path->p ? path->p : "";
        if ((s = tensor_check(fl, name, v, &t))) return s;
        if (fl->n == fl->cap) {
            size_t cap = fl->cap ? 2 * fl->cap : 64;
            PthTensor *a = (PthTensor *)realloc(fl->t, cap * sizeof *a);
            if (!a) return ms_errorf(MS_ERR_NOMEM, "%s: out of memory", fl->label);
            fl->t = a; fl->cap = cap;
        }
        if (!(t.name = (char *)malloc(strlen(name) + 1))) return ms_errorf(MS_ERR_NOMEM, "%s: out of memory", fl->label);
        strcpy(t.name, name);
        t.leaf = 0;                       /* set by the caller, which knows the key */
        fl->t[fl->n++] = t;
        return MS_OK;
    }
    if (v->kind == V_DICT || v->kind == V_LIST || v->kind == V_TUPLE) {
        size_t step = v->kind == V_DICT ? 2 : 1, keep = path->n;
        for (size_t j = 0; j + step - 1 < v->n; j += step) {
            char idx[32];
            const Val *child = v->items[j + step - 1];
            if (child->kind != V_TENSOR && child->kind != V_DICT && child->kind != V_LIST && child->kind != V_TUPLE)
                continue;
            if (path->n) buf_byte(path, '.');
            if (v->kind == V_DICT) key_text(path, v->items[j]);
            else { snprintf(idx, sizeof idx, "%zu", j); buf_str(path, idx); }
            if (path->oom) return ms_errorf(MS_ERR_NOMEM, "%s: out of memory", fl->label);
            if ((s = flatten(fl, child, path, depth + 1))) return s;
            if (child->kind == V_TENSOR) fl->t[fl->n - 1].leaf = keep ? keep + 1 : 0;
            path->n = keep;
            if (path->p) path->p[keep] = '\0';
        }
    }
    return MS_OK;
}

static void summarize(Flat *fl, const Val *v, int depth, size_t *budget) {
    char t[160];
    if (!*budget) return;
    (*budget)--;
    switch (v->kind) {
    case V_TENSOR: {
        size_t k = (size_t)snprintf(t, sizeof t, "tensor %s [", pth_dtype_name((PthDtype)v->i));
        for (int d = 0; d < v->ndim && k < sizeof t - 40; d++)
            k += (size_t)snprintf(t + k, sizeof t - k, "%s%lld", d ? ", " : "", (long long)v->shape[d]);
        snprintf(t + k, sizeof t - k, "]%s", v->requires_grad ? " requires_grad" : "");
        buf_str(&fl->sum, t);
        buf_byte(&fl->sum, '\n');
        return;
    }
    case V_DICT: case V_LIST: case V_TUPLE: {
        size_t step = v->kind == V_DICT ? 2 : 1, count = v->n / step;
        snprintf(t, sizeof t, "%s (%zu)\n", kind_name(v), count);
        buf_str(&fl->sum, t);
        if (depth >= PTH_MAX_DEPTH) return;
        for (size_t j = 0; j + step - 1 < v->n; j += step) {
            if (j / step == PK_MAX_SUMMARY && count > PK_MAX_SUMMARY + 1) {
                for (int d = 0; d <= depth; d++) buf_str(&fl->sum, "  ");
                snprintf(t, sizeof t, "... %zu more\n", count - PK_MAX_SUMMARY);
                buf_str(&fl->sum, t);
                return;
            }
            for (int d = 0; d <= depth; d++) buf_str(&fl->sum, "  ");
            if (v->kind == V_DICT) key_text(&fl->sum, v->items[j]);
            else { snprintf(t, sizeof t, "[%zu]", j); buf_str(&fl->sum, t); }
            buf_str(&fl->sum, ": ");
            summarize(fl, v->items[j + step - 1], depth + 1, budget);
        }
        return;
    }
    case V_INT: snprintf(t, sizeof t, "int %lld\n", (long long)v->i); break;
    case V_OBJECT: snprintf(t, sizeof t, "object %.120s (not loaded)\n", v->s); break;
    case V_BOOL: snprintf(t, sizeof t, "bool %s\n", v->i ? "True" : "False"); break;
    case V_FLOAT: snprintf(t, sizeof t, "float %.17g\n", v->f); break;
    case V_STR: case V_BYTES:
        buf_str(&fl->sum, v->kind == V_STR ? "str '" : "bytes '");
        if (v->len > 60) { Val c = *v; c.len = 60; key_text(&fl->sum, &c); buf_str(&fl->sum, "...'\n"); }
        else { key_text(&fl->sum, v); buf_str(&fl->sum, "'\n"); }
        return;
    default: snprintf(t, sizeof t, "%s\n", kind_name(v)); break;
    }
    buf_str(&fl->sum, t);
}

static int cmp_tensor_name(const void *a, const void *b) {
    return strcmp((*(const PthTensor *const *)a)->name, (*(const PthTensor *const *)b)->name);
}

/* Unpickles data and flattens the tree into fl (fl->t, fl->sum). */
static MsStatus load_pickle(Flat *fl, const unsigned char *data, size_t n, int lenient) {
    Unpickler u;
    Buf path = { 0 };
    size_t budget = 4096;
    MsStatus s;
    memset(&u, 0, sizeof u);
    u.p = data; u.n = n; u.label = fl->label;
    u.none_val.kind = V_NONE;
    u.lenient = lenient;
    s = unpickle(&u);
    if (!s) s = flatten(fl, u.result, &path, 0);
    if (!s) {
        summarize(fl, u.result, 0, &budget);
        if (fl->sum.oom) s = ms_errorf(MS_ERR_NOMEM, "%s: out of memory", fl->label);
    }
    free(path.p);
    up_free(&u);
    if (!s && fl->n > 1) {                                /* names must be unique */
        PthTensor **ix = (PthTensor **)malloc(fl->n * sizeof *ix);
        if (!ix) return ms_errorf(MS_ERR_NOMEM, "%s: out of memory", fl->label);
        for (size_t i = 0; i < fl->n; i++) ix[i] = &fl->t[i];
        qsort(ix, fl->n, sizeof *ix, cmp_tensor_name);
        for (size_t i = 1; i < fl->n && !s; i++)
            if (!strcmp(ix[i - 1]->name, ix[i]->name))
                s = ms_errorf(MS_ERR_FORMAT, "%s: two tensors are named '%.200s'", fl->label, ix[i]->name);
        free(ix);
    }
    return s;
}

static void flat_free(Flat *fl) {
    for (size_t i = 0; i < fl->n; i++) free(fl->t[i].name);
    free(fl->t);
    free(fl->sum.p);
}

MsStatus pth_parse_pickle(const void *data, size_t n, int flags, char **summary) {
    Flat fl;
    MsStatus s;
    memset(&fl, 0, sizeof fl);
    fl.label = "<pickle>";
    *summary = NULL;
    s = load_pickle(&fl, (const unsigned char *)data, n, flags & PTH_LENIENT);
    if (!s) { *summary = fl.sum.p; fl.sum.p = NULL; }
    flat_free(&fl);
    return s;
}

/* ---------------------------------------------------------------------------------------- */
/* Opening a checkpoint                                                                      */
/* ---------------------------------------------------------------------------------------- */
void pth_close(PthFile *f) {
    for (size_t i = 0; i < f->n; i++) free(f->t[i].name);
    free(f->t);
    free(f->summary);
    zip_close(&f->zip);
    memset(f, 0, sizeof *f);
}

/* torch's legacy format (torch.save(..., _use_new_zipfile_serialization=False), and every
 * torch < 1.6) starts with the pickled magic number 0x1950a86a20f9469cfc6c as a LONG1. */
static int is_legacy(const unsigned char *p, size_t n) {
    return n >= 4 && p[0] == 0x80 && p[1] == 0x02 && p[2] == 0x8a && p[3] == 0x0a;
}

static MsStatus open_loaded(PthFile *f, int flags) {
    ZipReader *z = &f->zip;
    const ZipEntry *pkl = NULL, *bo;
    unsigned char *data = NULL;
    size_t n = 0;
    Flat fl;
    MsStatus s;
    Buf prefix = { 0 };
    /* the archive folder is the prefix of <name>/data.pkl (torch: the first record's folder) */
    for (size_t i = 0; i < z->n && !pkl; i++) {
        const char *nm = z->e[i].name, *slash = strchr(nm, '/');
        if (slash && slash != nm && !strcmp(slash, "/data.pkl")) pkl = &z->e[i];
    }
    if (!pkl) {
        s = ms_errorf(MS_ERR_FORMAT, "%s: no <archive>/data.pkl member: a zip file, but not one "
                      "written by torch.save", z->path);
        pth_close(f);
        return s;
    }
    buf_put(&prefix, pkl->name, (size_t)(strchr(pkl->name, '/') - pkl->name + 1));
    if (prefix.oom) { s = ms_errorf(MS_ERR_NOMEM, "%s: out of memory", z->path); pth_close(f); return s; }
    {   /* torch >= 2.1 records the byte order of the data records */
        Buf bn = { 0 };
        buf_str(&bn, prefix.p); buf_str(&bn, "byteorder");
        bo = bn.oom ? NULL : zip_find(z, bn.p);
        free(bn.p);
        if (bo) {
            unsigned char *t = NULL;
            size_t tn = 0;
            if (bo->usize > 16) s = ms_errorf(MS_ERR_FORMAT, "%s: byteorder record is %llu bytes", z->path,
                                              (unsigned long long)bo->usize);
            else s = zip_read_alloc(z, bo, &t, &tn);
            if (!s && strcmp((const char *)t, "little"))
                s = ms_errorf(MS_ERR_UNSUPPORTED, "%s: byteorder '%s' (only little-endian records are "
                              "supported)", z->path, (const char *)t);
            free(t);
            if (s) { free(prefix.p); pth_close(f); return s; }
        }
    }
    if ((s = zip_read_alloc(z, pkl, &data, &n))) { free(prefix.p); pth_close(f); return s; }
    memset(&fl, 0, sizeof fl);
    fl.label = z->path;
    fl.zip = z;
    fl.prefix = prefix.p;
    s = load_pickle(&fl, data, n, flags & PTH_LENIENT);
    free(data);
    free(prefix.p);
    f->t = fl.t; f->n = fl.n; f->summary = fl.sum.p;
    if (s) pth_close(f);
    return s;
}

MsStatus pth_open(PthFile *f, const char *path) { return pth_open_ex(f, path, 0); }

MsStatus pth_open_ex(PthFile *f, const char *path, int flags) {
    unsigned char head[4] = { 0 };
    size_t got = 0;
    FILE *fp;
    MsStatus s;
    memset(f, 0, sizeof *f);
    if ((fp = fopen(path, "rb"))) { got = fread(head, 1, 4, fp); fclose(fp); }
    if (is_legacy(head, got))
        return ms_errorf(MS_ERR_UNSUPPORTED, "%s: legacy (pre-zip) torch.save format is not supported; "
                         "re-save it with torch.save(obj, path) from torch >= 1.6", path);
    if ((s = zip_open(&f->zip, path))) return s;
    return open_loaded(f, flags);
}

MsStatus pth_open_mem(PthFile *f, const void *data, size_t size, const char *label, int flags) {
    MsStatus s;
    memset(f, 0, sizeof *f);
    if (is_legacy((const unsigned char *)data, size))
        return ms_errorf(MS_ERR_UNSUPPORTED, "%s: legacy (pre-zip) torch.save format is not supported",
                         label ? label : "<memory>");
    if ((s = zip_open_mem(&f->zip, data, size, label))) return s;
    return open_loaded(f, flags);
}

const PthTensor *pth_find(const PthFile *f, const char *name) {
    for (size_t i = 0; i < f->n; i++) if (!strcmp(f->t[i].name, name)) return &f->t[i];
    return NULL;
}

size_t pth_numel(const PthTensor *t) {
    size_t n = 1;
    for (int d = 0; d < t->ndim; d++) n *= (size_t)t->shape[d];   /* checked at open */
    return n;
}

/* ---------------------------------------------------------------------------------------- */
/* Reading tensor values                                                                     */
/* ---------------------------------------------------------------------------------------- */
static int host_is_little(void) { const uint16_t one = 1; unsigned char b; memcpy(&b, &one, 1); return b == 1; }

static void swap_bytes(unsigned char *p, size_t n, size_t es) {
    for (size_t i = 0; i + es <= n; i += es)
        for (size_t a = 0, b = es - 1; a < b; a++, b--) { unsigned char t = p[i + a]; p[i + a] = p[i + b]; p[i + b] = t; }
}

MsStatus pth_read_raw(PthFile *f, const PthTensor *t, void *out) {
    size_t es = pth_dtype_size(t->dtype), numel = pth_numel(t), span = 0, expect = 1;
    int contiguous = 1;
    MsStatus s;
    if (t->entry >= f->zip.n) return ms_errorf(MS_ERR_ARG, "%s: tensor '%s' has no storage record", f->zip.path, t->name);
    const ZipEntry *e = &f->zip.e[t->entry];
    for (int d = t->ndim - 1; d >= 0; d--) {               /* row-major strides? */
        if (t->shape[d] != 1 && t->stride[d] != (int64_t)expect) contiguous = 0;
        expect *= (size_t)t->shape[d];
    }
    if (numel == 0) return MS_OK;
    if (contiguous || numel == 1) {
        s = zip_read(&f->zip, e, (uint64_t)t->offset * es, out, numel * es);
    } else {                                                /* gather a strided view */
        unsigned char *tmp;
        size_t idx[MS_MAX_DIMS] = { 0 };
        for (int d = 0; d < t->ndim; d++) span += (size_t)(t->shape[d] - 1) * (size_t)t->stride[d];
        span += 1;                                          /* all checked at open */
        if (!(tmp = (unsigned char *)malloc(span * es)))
            return ms_errorf(MS_ERR_NOMEM, "%s: tensor '%s': out of memory", f->zip.path, t->name);
        if ((s = zip_read(&f->zip, e, (uint64_t)t->offset * es, tmp, span * es))) { free(tmp); return s; }
        for (size_t i = 0; i < numel; i++) {
            size_t src = 0;
            for (int d = 0; d < t->ndim; d++) src += idx[d] * (size_t)t->stride[d];
            memcpy((unsigned char *)out + i * es, tmp + src * es, es);
            for (int d = t->ndim - 1; d >= 0; d--) { if (++idx[d] < (size_t)t->shape[d]) break; idx[d] = 0; }
        }
        free(tmp);
    }
    if (!s && !host_is_little() && es > 1) swap_bytes((unsigned char *)out, numel * es, es);
    return s;
}

/* IEEE half -> float, exact (subnormals, inf, NaN payload kept). */
static float half_to_float(uint16_t h) {
    uint32_t sign = (uint32_t)(h >> 15) << 31, e = (h >> 10) & 0x1f, m = h & 0x3ff, bits;
    float f;
    if (e == 0x1f) bits = sign | 0x7f800000u | m << 13;
    else if (e) bits = sign | (e + 112) << 23 | m << 13;
    else if (!m) bits = sign;
    else {                                     /* subnormal: m * 2^-24, normalise */
        e = 113;
        while (!(m & 0x400)) { m <<= 1; e--; }
        bits = sign | e << 23 | (m & 0x3ff) << 13;
    }
    memcpy(&f, &bits, 4);
    return f;
}

MsStatus pth_read_f32(PthFile *f, const PthTensor *t, float *out) {
    size_t numel = pth_numel(t), es = pth_dtype_size(t->dtype);
    unsigned char *raw;
    MsStatus s;
    if (t->dtype == PTH_F32) return pth_read_raw(f, t, out);
    if (!(raw = (unsigned char *)malloc(numel * es + 1)))
        return ms_errorf(MS_ERR_NOMEM, "%s: tensor '%s': out of memory", f->zip.path, t->name);
    if ((s = pth_read_raw(f, t, raw))) { free(raw); return s; }
    for (size_t i = 0; i < numel; i++) {
        const unsigned char *p = raw + i * es;
        uint16_t h; uint32_t u32; int32_t i32; int16_t i16; int64_t i64; double d;
        switch (t->dtype) {
        case PTH_F16: memcpy(&h, p, 2); out[i] = half_to_float(h); break;
        case PTH_BF16: memcpy(&h, p, 2); u32 = (uint32_t)h << 16; memcpy(&out[i], &u32, 4); break;
        case PTH_F64: memcpy(&d, p, 8); out[i] = (float)d; break;
        case PTH_I64: memcpy(&i64, p, 8); out[i] = (float)i64; break;
        case PTH_I32: memcpy(&i32, p, 4); out[i] = (float)i32; break;
        case PTH_I16: memcpy(&i16, p, 2); out[i] = (float)i16; break;
        case PTH_I8: out[i] = (float)(int8_t)p[0]; break;
        case PTH_U8: out[i] = (float)p[0]; break;
        case PTH_BOOL: out[i] = p[0] ? 1.0f : 0.0f; break;
        default: out[i] = 0.0f; break;
        }
    }
    free(raw);
    return MS_OK;
}

/* ---------------------------------------------------------------------------------------- */
/* Writer                                                                                    */
/* ---------------------------------------------------------------------------------------- */
/* pickle's save_long for protocol 2: BININT1, BININT2, BININT, else LONG1 (two's complement) */
static void put_int(Buf *b, int64_t x) {
    unsigned char t[9];
    if (x >= 0 && x < 256) { buf_byte(b, 'K'); buf_byte(b, (unsigned)x); return; }
    if (x >= 0 && x < 65536) { buf_byte(b, 'M'); buf_byte(b, (unsigned)(x & 0xff)); buf_byte(b, (unsigned)(x >> 8)); return; }
    if (x >= INT32_MIN && x <= INT32_MAX) {
        uint32_t v = (uint32_t)(int32_t)x;
        buf_byte(b, 'J');
        for (int k = 0; k < 4; k++) buf_byte(b, (v >> (8 * k)) & 0xff);
        return;
    }
    {
        uint64_t v = (uint64_t)x;
        int k = 8;
        while (k > 1) {                    /* drop bytes that sign extension restores */
            unsigned top = (unsigned)(v >> (8 * (k - 1))) & 0xff, next = (unsigned)(v >> (8 * (k - 2))) & 0x80;
            if ((top == 0 && !next) || (top == 0xff && next)) k--; else break;
        }
        t[0] = (unsigned char)k;
        for (int j = 0; j < k; j++) t[1 + j] = (unsigned char)(v >> (8 * j));
        buf_byte(b, 0x8a);
        buf_put(b, t, (size_t)k + 1);
    }
}

static void put_str(Buf *b, const char *s, size_t n) {
    buf_byte(b, 'X');
    for (int k = 0; k < 4; k++) buf_byte(b, (unsigned)((uint64_t)n >> (8 * k)) & 0xff);
    buf_put(b, s, n);
}

static void put_global(Buf *b, const char *mod, const char *name) {
    buf_byte(b, 'c'); buf_str(b, mod); buf_byte(b, '\n'); buf_str(b, name); buf_byte(b, '\n');
}

static void put_tuple(Buf *b, const int64_t *x, int n) {
    if (n == 0) { buf_byte(b, ')'); return; }
    if (n > 3) buf_byte(b, '(');
    for (int k = 0; k < n; k++) put_int(b, x[k]);
    buf_byte(b, n == 1 ? 0x85 : n == 2 ? 0x86 : n == 3 ? 0x87 : 't');
}

static const char *storage_names[PTH_NDTYPES] = { "FloatStorage", "HalfStorage", "BFloat16Storage",
    "DoubleStorage", "LongStorage", "IntStorage", "ShortStorage", "CharStorage", "ByteStorage", "BoolStorage" };

/* _rebuild_tensor_v2(('storage', torch.XStorage, key, 'cpu', numel), 0, size, stride,
 *                    requires_grad, OrderedDict()) — exactly torch.save's byte sequence
 *                    apart from the memo (BINPUT) records, which are optional. */
static void put_tensor(Buf *b, const PthSaveTensor *t, size_t key) {
    char k[32];
    int64_t stride[MS_MAX_DIMS], st = 1, numel = 1;
    for (int d = t->ndim - 1; d >= 0; d--) { stride[d] = st; st *= t->shape[d]; }
    for (int d = 0; d < t->ndim; d++) numel *= t->shape[d];
    snprintf(k, sizeof k, "%zu", key);
    put_global(b, "torch._utils", "_rebuild_tensor_v2");
    buf_byte(b, '(');
    buf_byte(b, '(');
    put_str(b, "storage", 7);
    put_global(b, "torch", storage_names[t->dtype]);
    put_str(b, k, strlen(k));
    put_str(b, "cpu", 3);
    put_int(b, numel);
    buf_byte(b, 't');
    buf_byte(b, 'Q');
    put_int(b, 0);
    put_tuple(b, t->shape, t->ndim);
    put_tuple(b, stride, t->ndim);
    buf_byte(b, t->requires_grad ? 0x88 : 0x89);
    put_global(b, "collections", "OrderedDict");
    buf_byte(b, ')');
    buf_byte(b, 'R');
    buf_byte(b, 't');
    buf_byte(b, 'R');
}

/* The nested-dict tree of the names (insertion order kept). */
typedef struct SNode { char *key; struct SNode *kid; size_t nk, capk; size_t tensor; } SNode;

static void snode_free(SNode *n) {
    for (size_t i = 0; i < n->nk; i++) snode_free(&n->kid[i]);
    free(n->kid); free(n->key);
}

static SNode *snode_child(SNode *n, const char *key, size_t len) {
    for (size_t i = 0; i < n->nk; i++)
        if (strlen(n->kid[i].key) == len && !memcmp(n->kid[i].key, key, len)) return &n->kid[i];
    if (n->nk == n->capk) {
        size_t cap = n->capk ? 2 * n->capk : 8;
        SNode *k = (SNode *)realloc(n->kid, cap * sizeof *k);
        if (!k) return NULL;
        n->kid = k; n->capk = cap;
    }
    SNode *c = &n->kid[n->nk];
    memset(c, 0, sizeof *c);
    if (!(c->key = (char *)malloc(len + 1))) return NULL;
    memcpy(c->key, key, len);
    c->key[len] = '\0';
    c->tensor = SIZE_MAX;
    n->nk++;
    return c;
}

static void put_dict(Buf *b, const SNode *n, const PthSaveTensor *t) {
    buf_byte(b, '}');
    for (size_t i = 0; i < n->nk; i++) {
        if (i % 1000 == 0) buf_byte(b, '(');            /* pickle batches SETITEMS by 1000 */
        put_str(b, n->kid[i].key, strlen(n->kid[i].key));
        if (n->kid[i].tensor != SIZE_MAX) put_tensor(b, &t[n->kid[i].tensor], n->kid[i].tensor);
        else put_dict(b, &n->kid[i], t);
        if (i % 1000 == 999 || i + 1 == n->nk) buf_byte(b, 'u');
    }
}

MsStatus pth_save(const char *path, const PthSaveTensor *t, size_t n) {
    SNode root;
    Buf pkl = { 0 };
    ZipWriter w;
    MsStatus s = MS_OK;
    memset(&root, 0, sizeof root);
    root.tensor = SIZE_MAX;
    for (size_t i = 0; i < n && !s; i++) {
        const char *p = t[i].name, *dot;
        SNode *node = &root;
        size_t numel = 1, nbytes;
        if ((unsigned)t[i].dtype >= PTH_NDTYPES || t[i].ndim < 0 || t[i].ndim > MS_MAX_DIMS ||
            t[i].nest < 0 || t[i].nest >= PTH_MAX_DEPTH || !t[i].name || !*t[i].name) {
            s = ms_errorf(MS_ERR_ARG, "%s: tensor %zu: bad name, dtype, ndim or nest", path, i);
            break;
        }
        if (t[i].requires_grad && t[i].dtype != PTH_F32 && t[i].dtype != PTH_F16 &&
            t[i].dtype != PTH_BF16 && t[i].dtype != PTH_F64) {
            s = ms_errorf(MS_ERR_ARG, "%s: tensor '%s': requires_grad needs a floating dtype", path, t[i].name);
            break;
        }
        for (int d = 0; d < t[i].ndim; d++)
            if (t[i].shape[d] < 0 || !ms_mul_ok(numel, (size_t)t[i].shape[d], &numel) ||
                !ms_mul_ok(numel, pth_dtype_size(t[i].dtype), &nbytes)) {
                s = ms_errorf(MS_ERR_ARG, "%s: tensor '%s': bad shape", path, t[i].name);
                break;
            }
        for (int k = 0; k < t[i].nest && !s; k++) {
            if (!(dot = strchr(p, '.')) || dot == p) {
                s = ms_errorf(MS_ERR_ARG, "%s: tensor '%s' has fewer than %d '.'-separated levels",
                              path, t[i].name, t[i].nest + 1);
                break;
            }
            if (!(node = snode_child(node, p, (size_t)(dot - p)))) s = ms_errorf(MS_ERR_NOMEM, "%s: out of memory", path);
            else if (node->tensor != SIZE_MAX)
                s = ms_errorf(MS_ERR_ARG, "%s: '%s' is a tensor and a dict", path, node->key);
            p = dot + 1;
        }
        if (s) break;
        if (!*p) { s = ms_errorf(MS_ERR_ARG, "%s: tensor '%s': empty key", path, t[i].name); break; }
        if (!(node = snode_child(node, p, strlen(p)))) { s = ms_errorf(MS_ERR_NOMEM, "%s: out of memory", path); break; }
        if (node->tensor != SIZE_MAX || node->nk)
            s = ms_errorf(MS_ERR_ARG, "%s: tensor '%s' is named twice (or is also a dict)", path, t[i].name);
        node->tensor = i;
    }
    if (!s) {
        buf_byte(&pkl, 0x80); buf_byte(&pkl, 2);          /* PROTO 2 */
        put_dict(&pkl, &root, t);
        buf_byte(&pkl, '.');
        if (pkl.oom) s = ms_errorf(MS_ERR_NOMEM, "%s: out of memory", path);
    }
    snode_free(&root);
    if (!s && !(s = zip_writer_open(&w, path, 0))) {
        char nm[64];
        zip_writer_add(&w, "archive/data.pkl", pkl.p, pkl.n);
        for (size_t i = 0; i < n; i++) {
            size_t bytes = pth_dtype_size(t[i].dtype);
            for (int d = 0; d < t[i].ndim; d++) bytes *= (size_t)t[i].shape[d];
            snprintf(nm, sizeof nm, "archive/data/%zu", i);
            if (host_is_little() || pth_dtype_size(t[i].dtype) == 1) {
                zip_writer_add(&w, nm, t[i].data, bytes);
            } else {                                     /* big-endian host: records are LE */
                unsigned char *tmp = (unsigned char *)malloc(bytes + 1);
                if (!tmp) { w.status = ms_errorf(MS_ERR_NOMEM, "%s: out of memory", path); break; }
                memcpy(tmp, t[i].data, bytes);
                swap_bytes(tmp, bytes, pth_dtype_size(t[i].dtype));
                zip_writer_add(&w, nm, tmp, bytes);
                free(tmp);
            }
        }
        zip_writer_add(&w, "archive/version", "3\n", 2);
        zip_writer_add(&w, "archive/byteorder", "little", 6);
        s = zip_writer_close(&w, 1);
    }
    free(pkl.p);
    return s;
}
