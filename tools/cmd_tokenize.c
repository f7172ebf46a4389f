/* tools/cmd_tokenize.c — reading a CLIP tokenizer folder (vocab.json, merges.txt, pad_token from
 * special_tokens_map.json / tokenizer_config.json) and `mixshow tokenize`:
 *
 *   mixshow tokenize [--model PATH] [--tokenizer DIR] [--added-tokens FILE] [--max-length N] "prompt"
 *
 * prints the N (77) input ids of the prompt on one line, as HF CLIPTokenizer(prompt,
 * padding="max_length", max_length=N, truncation=True).input_ids. PATH is a diffusers model
 * folder (its tokenizer/ is used), a tokenizer folder or a single file; the CLIP BPE files
 * shipped with mixshow stand in when it has none (ms_find_tokenizer). FILE lists added tokens (`<new0>`, ...)
 * one per line, or as a JSON array of strings; they get ids from vocab_size on, in order. */
#include "tools/tools.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static MsStatus slurp(const char *path, char **out, size_t *len) {
    FILE *f = fopen(path, "rb");
    if (!f) return ms_errorf(MS_ERR_IO, "%s: cannot open", path);
    size_t cap = 1 << 16, n = 0;
    char *b = (char *)malloc(cap + 1);
    for (;;) {
        if (!b) { fclose(f); return ms_errorf(MS_ERR_NOMEM, "%s: out of memory", path); }
        n += fread(b + n, 1, cap - n, f);
        if (n < cap) break;
        if (cap > ((size_t)1 << 30)) { free(b); fclose(f); return ms_errorf(MS_ERR_FORMAT, "%s: larger than 1 GiB", path); }
        cap *= 2;
        char *nb = (char *)realloc(b, cap + 1);
        if (!nb) free(b);
        b = nb;
    }
    int err = ferror(f);
    fclose(f);
    if (err) { free(b); return ms_errorf(MS_ERR_IO, "%s: read error", path); }
    b[n] = 0;
    *out = b; *len = n;
    return MS_OK;
}

static int file_exists(const char *path) {
    FILE *f = fopen(path, "rb");
    if (f) fclose(f);
    return f != NULL;
}

/* pad_token of a config: a string or an AddedToken object {"content": ...}; NULL when absent */
static const char *pad_of(const JsonValue *j) {
    const JsonValue *v = json_get(j, "pad_token");
    if (v && v->type == JSON_STRING) return v->str;
    if (v && v->type == JSON_OBJECT) return json_get_string(v, "content", NULL);
    return NULL;
}

MsStatus ms_clip_tokenizer_load(const char *dir, ClipTokenizer *t) {
    char d[4096], p[4200];
    MsStatus s;
    JsonValue *vocab = NULL, *stm = NULL, *cfg = NULL;
    char *merges = NULL, *pad = NULL;
    const char **toks = NULL; size_t *lens = NULL; int64_t *ids = NULL;
    size_t mlen = 0;
    memset(t, 0, sizeof *t);
    snprintf(d, sizeof d, "%s/tokenizer", dir);
    snprintf(p, sizeof p, "%s/vocab.json", d);
    if (!file_exists(p)) snprintf(d, sizeof d, "%s", dir);
    snprintf(p, sizeof p, "%s/vocab.json", d);
    if ((s = json_parse_file(p, &vocab))) goto done;
    if (vocab->type != JSON_OBJECT) { s = ms_errorf(MS_ERR_FORMAT, "%s: expected an object of token: id", p); goto done; }
    size_t n = vocab->count;
    toks = (const char **)malloc((n ? n : 1) * sizeof *toks);
    lens = (size_t *)malloc((n ? n : 1) * sizeof *lens);
    ids = (int64_t *)malloc((n ? n : 1) * sizeof *ids);
    if (!toks || !lens || !ids) { s = ms_errorf(MS_ERR_NOMEM, "%s: out of memory", p); goto done; }
    for (size_t i = 0; i < n; i++) {
        const JsonValue *v = &vocab->items[i];
        char what[200];
        snprintf(what, sizeof what, "%.120s: token '%.60s'", p, v->key);
        if ((s = json_as_int(v, what, &ids[i]))) goto done;
        toks[i] = v->key; lens[i] = v->key_len;
    }
    snprintf(p, sizeof p, "%s/merges.txt", d);
    if ((s = slurp(p, &merges, &mlen))) goto done;
    /* from_pretrained: special_tokens_map.json overrides tokenizer_config.json */
    const char *padtok = NULL;
    snprintf(p, sizeof p, "%s/special_tokens_map.json", d);
    if (file_exists(p)) { if ((s = json_parse_file(p, &stm))) goto done; padtok = pad_of(stm); }
    snprintf(p, sizeof p, "%s/tokenizer_config.json", d);
    if (!padtok && file_exists(p)) { if ((s = json_parse_file(p, &cfg))) goto done; padtok = pad_of(cfg); }
    if (padtok && !(pad = (char *)malloc(strlen(padtok) + 1))) { s = ms_errorf(MS_ERR_NOMEM, "out of memory"); goto done; }
    if (pad) strcpy(pad, padtok);
    if (n > (size_t)(1 << 24)) { s = ms_errorf(MS_ERR_FORMAT, "%s/vocab.json: %zu entries", d, n); goto done; }
    s = clip_tokenizer_init(t, toks, lens, ids, (int)n, merges, mlen, pad, d);
    /* a fused model's added tokens, as transformers' from_pretrained reads them */
    snprintf(p, sizeof p, "%s/added_tokens.json", d);
    if (!s && file_exists(p) && (s = ms_clip_added_tokens_json(p, t))) clip_tokenizer_free(t);
done:
    json_free(vocab); json_free(stm); json_free(cfg);
    free(merges); free(pad); free(toks); free(lens); free(ids);
    return s;
}

MsStatus ms_clip_added_tokens_load(const char *path, ClipTokenizer *t, int *n_added) {
    char *text = NULL;
    size_t len = 0;
    MsStatus s;
    if ((s = slurp(path, &text, &len))) return s;
    size_t i = 0;
    while (i < len && (text[i] == ' ' || text[i] == '\t' || text[i] == '\n' || text[i] == '\r')) i++;
    int total = 0;
    if (i < len && text[i] == '[') {          /* JSON array of strings */
        JsonValue *j = NULL;
        if ((s = json_parse(text, len, path, &j))) { free(text); return s; }
        for (size_t k = 0; k < j->count && !s; k++) {
            const JsonValue *v = &j->items[k];
            if (v->type != JSON_STRING || strlen(v->str) != v->len)
                s = ms_errorf(MS_ERR_FORMAT, "%s:%d:%d: expected a string without NUL", path, v->line, v->col);
            else {
                const char *one = v->str;
                int a = 0;
                s = clip_tokenizer_add_tokens(t, &one, 1, &a);
                total += a;
            }
        }
        json_free(j);
    } else {                                  /* one token per line */
        for (char *p = text; p < text + len && !s;) {
            char *nl = memchr(p, '\n', (size_t)(text + len - p));
            char *e = nl ? nl : text + len;
            if (e > p && e[-1] == '\r') e--;
            if (e > p) {
                char save = *e;
                *e = 0;
                if (strlen(p) != (size_t)(e - p)) s = ms_errorf(MS_ERR_FORMAT, "%s: a token holds a NUL byte", path);
                else {
                    const char *one = p;
                    int a = 0;
                    s = clip_tokenizer_add_tokens(t, &one, 1, &a);
                    total += a;
                }
                *e = save;
            }
            p = nl ? nl + 1 : text + len;
        }
    }
    free(text);
    if (!s && n_added) *n_added = total;
    return s;
}

int cmd_tokenize(int argc, char **argv) {
    const char *model = NULL, *tokdir = NULL, *added = NULL, *prompt = NULL;
    int max_len = 77, help = 0;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--model") && i + 1 < argc) model = argv[++i];
        else if (!strcmp(argv[i], "--tokenizer") && i + 1 < argc) tokdir = argv[++i];
        else if (!strcmp(argv[i], "--added-tokens") && i + 1 < argc) added = argv[++i];
        else if (!strcmp(argv[i], "--max-length") && i + 1 < argc) max_len = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--help") || !strcmp(argv[i], "-h")) help = 1;
        else if (argv[i][0] == '-' && argv[i][1] == '-') { fprintf(stderr, "mixshow tokenize: unknown option %s\n", argv[i]); return 2; }
        else prompt = argv[i];
    }
    if (help || !prompt || max_len < 2 || max_len > 100000) {
        fprintf(help ? stdout : stderr,
                "usage: mixshow tokenize [--model PATH] [--tokenizer DIR] [--added-tokens FILE] [--max-length N] \"prompt\"\n"
                "  prints the N (default 77) CLIP input ids of the prompt on one line\n"
                "  PATH: a model folder (its tokenizer/), a tokenizer folder, or a single file; without a\n"
                "  tokenizer there (or without --model) the CLIP BPE files shipped with mixshow are used.\n"
                "  --tokenizer DIR overrides.\n");
        return help ? 0 : 2;
    }
    ClipTokenizer t;
    int have_t = 0;
    MsOpenOptions oo = { tokdir, NULL, 0, 0 };
    /* the tokenizer only (with a fused model's added tokens, also those in a single file's metadata) */
    MsStatus s = ms_open_model(model, &oo, NULL, &t, NULL, 0);
    if (!s) have_t = 1;
    if (!s && added) s = ms_clip_added_tokens_load(added, &t, NULL);
    int32_t *ids = s ? NULL : (int32_t *)malloc((size_t)max_len * sizeof *ids);
    if (!s && !ids) s = ms_errorf(MS_ERR_NOMEM, "out of memory");
    if (!s) s = clip_tokenize(&t, prompt, strlen(prompt), ids, max_len);
    if (s) {
        fprintf(stderr, "mixshow tokenize: %s\n", ms_last_error());
        free(ids);
        if (have_t) clip_tokenizer_free(&t);
        return 1;
    }
    for (int i = 0; i < max_len; i++) printf("%s%d", i ? " " : "", (int)ids[i]);
    printf("\n");
    free(ids);
    clip_tokenizer_free(&t);
    return 0;
}
