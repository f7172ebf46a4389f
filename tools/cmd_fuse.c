/* tools/cmd_fuse.c — `mixshow fuse`: Mix-of-Show gradient fusion (gradient_fusion.py) of the
 * ED-LoRAs listed in an official multi-concept JSON into one diffusers folder + new_concept_cfg.json.
 *
 *   mixshow fuse --model BASE --concepts CFG.json --out DIR [--method gram|lbfgs|weight]
 *                [--textenc-iters 500] [--unet-iters 50] [--seed 0] [--report REPORT.json] [-q]
 *
 * Order of work (all input errors come before any of it): read the JSON and every LoRA file, check
 * ranks and shapes against the base model, stack the embeddings into one tokenizer (<new0>..,
 * 16 per word, words remapped on collision; plain LoRAs, --method weight only: 1 per word, not
 * bound, the words left as prompt text), then fuse (mixshow_fuse.c) and write DIR.tmp,
 * renamed to DIR when complete. Stages: text encoder q/k/v/out_proj, cross-attention to_k/to_v,
 * then the spatial stage (attn1 q/k/v/out, attn2 q/out, from inputs recorded during each
 * concept's 20-step DPM-Solver sampling at 512x512; --spatial-size/--spatial-steps change that
 * for quick runs, --no-spatial leaves those layers at W0). */
#if !defined(_WIN32) && !defined(_POSIX_C_SOURCE)
#define _POSIX_C_SOURCE 200809L         /* mkdir */
#endif
#include "mixshow.h"
#include "tools/tools.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#ifdef _WIN32
#include <direct.h>
static int make_dir(const char *p) { return _mkdir(p); }
static size_t peak_rss(void) { return 0; }
#else
#include <sys/stat.h>
#include <sys/types.h>
static int make_dir(const char *p) { return mkdir(p, 0777); }
static size_t peak_rss(void) {                  /* bytes: Linux's VmHWM (kB); 0 elsewhere */
    FILE *f = fopen("/proc/self/status", "r");
    char line[256];
    size_t kb = 0;
    while (f && fgets(line, sizeof line, f))
        if (!strncmp(line, "VmHWM:", 6)) { kb = (size_t)strtoull(line + 6, NULL, 10); break; }
    if (f) fclose(f);
    return kb * 1024;
}
#endif

#define MAXC 64

typedef struct {
    char path[4096];
    double unet_alpha, te_alpha;
    char name[1024];                 /* concept_name after remapping */
    char given[256];                 /* concept_name as given */
    EdloraFile f, extra;             /* extra: modules outside attention (kohya: mlp, ff, proj_in/out) */
    ClipLora te; float *te_mem; unsigned char *te_has;
    UNetLora un; Arena un_ar; unsigned char *un_has;
} Concept;

static int file_exists(const char *p) { FILE *f = fopen(p, "rb"); if (f) fclose(f); return f != NULL; }


/* ---- the multi-concept JSON: [{lora_path, unet_alpha, text_encoder_alpha, concept_name}, ...] ---- */
/* gradient_fusion.py reads exactly these four keys of each entry (parse_new_concepts,
 * merge_new_concepts_, the merge_* steps) and ignores any other: an unknown key is a warning
 * here (most likely a misspelt one, whose correct spelling is then missing: an error). */
static const char *const CONCEPT_KEYS[4] = { "lora_path", "concept_name", "unet_alpha", "text_encoder_alpha" };

/* "CFG: concept I ('NAME')" for messages; name may be NULL (not read yet). */
static const char *concept_where(char *buf, size_t cap, const char *cfg, size_t i, const char *name) {
    if (name) snprintf(buf, cap, "%s: concept %zu ('%.200s')", cfg, i, name);
    else snprintf(buf, cap, "%s: concept %zu", cfg, i);
    return buf;
}

/* The key of entry e with the JSON type t, or an error naming the file, the entry and the key. */
static MsStatus concept_key(const JsonValue *e, int k, JsonType t, const char *where, const JsonValue **out) {
    const JsonValue *v = json_get(e, CONCEPT_KEYS[k]);
    *out = v;
    if (!v) return ms_errorf(MS_ERR_FORMAT, "%s: missing key '%s' (expected %s)", where, CONCEPT_KEYS[k], json_type_name(t));
    if (v->type != t)
        return ms_errorf(MS_ERR_FORMAT, "%s, line %d: '%s' is %s, expected %s", where, v->line, CONCEPT_KEYS[k],
                         json_type_name(v->type), json_type_name(t));
    return MS_OK;
}

static MsStatus read_concepts(const char *cfg, Concept *cs, int *n) {
    JsonValue *j = NULL;
    MsStatus s = json_parse_file(cfg, &j);
    char where[512], dir[2048];
    if (s) return s;
    *n = 0;
    if (j->type != JSON_ARRAY || j->count == 0 || j->count > MAXC) {
        char found[64];
        if (j->type == JSON_ARRAY) snprintf(found, sizeof found, "%zu entries", j->count);
        else snprintf(found, sizeof found, "%s", json_type_name(j->type));
        s = ms_errorf(MS_ERR_FORMAT, "%s: expected a JSON array of 1..%d concepts ({\"lora_path\", \"unet_alpha\", "
                      "\"text_encoder_alpha\", \"concept_name\"}), found %s", cfg, MAXC, found);
        goto done;
    }
    if (strlen(cfg) >= sizeof dir) { s = ms_errorf(MS_ERR_ARG, "%.100s...: path too long", cfg); goto done; }
    snprintf(dir, sizeof dir, "%s", cfg);
    char *sl = strrchr(dir, '/');
    if (sl) *sl = '\0'; else snprintf(dir, sizeof dir, ".");
    for (size_t i = 0; i < j->count && !s; i++) {
        const JsonValue *e = &j->items[i], *v[4];
        if (e->type != JSON_OBJECT) {
            s = ms_errorf(MS_ERR_FORMAT, "%s, line %d: %s, expected an object", concept_where(where, sizeof where, cfg, i, NULL),
                          e->line, json_type_name(e->type));
            break;
        }
        const JsonValue *nv = json_get(e, "concept_name");
        concept_where(where, sizeof where, cfg, i, nv && nv->type == JSON_STRING ? nv->str : NULL);
        for (int k = 0; k < 4 && !s; k++) s = concept_key(e, k, k < 2 ? JSON_STRING : JSON_NUMBER, where, &v[k]);
        if (s) break;
        for (size_t k = 0; k < e->count; k++) {
            int known = 0;
            for (int q = 0; q < 4; q++) known |= !strcmp(e->items[k].key, CONCEPT_KEYS[q]);
            if (!known)
                fprintf(stderr, "mixshow fuse: warning: %s: unknown key '%s' ignored (as gradient_fusion.py does)\n", where, e->items[k].key);
        }
        const char *lp = v[0]->str, *nm = v[1]->str;
        cs[i].unet_alpha = v[2]->number;
        cs[i].te_alpha = v[3]->number;
        if (!*lp || strlen(lp) >= 2000) { s = ms_errorf(MS_ERR_FORMAT, "%s: lora_path is empty or too long", where); break; }
        if (strlen(nm) >= 256) { s = ms_errorf(MS_ERR_FORMAT, "%s: concept_name is longer than 255 bytes", where); break; }
        if (!isfinite(cs[i].unet_alpha) || !isfinite(cs[i].te_alpha)) { s = ms_errorf(MS_ERR_FORMAT, "%s: an alpha is not finite", where); break; }
        /* the official script opens lora_path from the working directory; then the JSON's folder */
        if (file_exists(lp) || lp[0] == '/') snprintf(cs[i].path, sizeof cs[i].path, "%s", lp);
        else snprintf(cs[i].path, sizeof cs[i].path, "%s/%s", dir, lp);
        if (!file_exists(cs[i].path)) {
            s = lp[0] == '/' ? ms_errorf(MS_ERR_IO, "%s: lora_path '%s' not found", where, lp)
                             : ms_errorf(MS_ERR_IO, "%s: lora_path '%s' not found (tried ./%s and %s/%s)", where, lp, lp, dir, lp);
            break;
        }
        snprintf(cs[i].name, sizeof cs[i].name, "%s", nm);
        snprintf(cs[i].given, sizeof cs[i].given, "%s", nm);
    }
    *n = (int)j->count;
done:
    json_free(j);
    return s;
}

/* An error of concept c's file: "CFG: concept C ('NAME', PATH): <the error>". */
static MsStatus concept_error(MsStatus s, const char *cfg, int c, const Concept *x) {
    char msg[1024];
    snprintf(msg, sizeof msg, "%s", ms_last_error());
    return ms_errorf(s, "%s: concept %d ('%s', %s): %s", cfg, c, x->given, x->path, msg);
}

/* ---- the fused folder ---- */
static MsStatus write_table(const char *path, const MsParamTable *t, const float *tok_emb, int64_t tok_rows) {
    StEntry *e = (StEntry *)calloc((size_t)t->n + 1, sizeof *e);
    int64_t *ids = NULL;
    size_t ne = 0;
    MsStatus s = MS_OK;
    static const char *const meta[2] = { "format", "pt" };
    if (!e) return ms_errorf(MS_ERR_NOMEM, "%s: out of memory", path);
    for (int i = 0; i < t->n && !s; i++) {
        const MsParam *p = &t->p[i];
        StEntry *x = &e[ne++];
        x->name = p->name;
        x->ndim = p->ndim;
        for (int d = 0; d < p->ndim; d++) x->shape[d] = p->shape[d];
        if (p->flags & MS_PARAM_BUFFER) {
            ids = (int64_t *)malloc((p->numel ? p->numel : 1) * sizeof *ids);
            if (!ids) { s = ms_errorf(MS_ERR_NOMEM, "%s: out of memory", path); break; }
            for (size_t k = 0; k < p->numel; k++) ids[k] = (int64_t)k;
            x->dtype = ST_I64;
            x->raw = ids;
        } else if (tok_emb && !strcmp(p->name, "text_model.embeddings.token_embedding.weight")) {
            x->dtype = ST_F32;
            x->f32 = tok_emb;
            x->shape[0] = tok_rows;
        } else if (p->f32) {
            x->dtype = ST_F32;
            x->f32 = p->f32;
        } else s = ms_errorf(MS_ERR_UNSUPPORTED, "%s: %s holds no f32 data", path, p->name);
    }
    if (!s) s = st_write(path, e, ne, meta, 1);
    free(e);
    free(ids);
    return s;
}

/* the text encoder's token embedding with the new rows appended: (V + n_new, D), malloc'ed */
static float *fused_token_embedding(const MsModel *m, const float *new_emb, int n_new) {
    const int V = m->text_config.vocab_size, D = m->text_config.hidden_size;
    int ie = ms_param_find(&m->text, "text_model.embeddings.token_embedding.weight");
    float *emb = ie >= 0 && m->text.p[ie].f32 ? (float *)malloc(((size_t)V + n_new) * D * sizeof(float)) : NULL;
    if (!emb) { ms_errorf(MS_ERR_NOMEM, "fuse: token embedding (f32, %d x %d)", V + n_new, D); return NULL; }
    memcpy(emb, m->text.p[ie].f32, (size_t)V * D * sizeof(float));
    if (n_new) memcpy(emb + (size_t)V * D, new_emb, (size_t)n_new * D * sizeof(float));
    return emb;
}

/* tokenizer/added_tokens.json's object {token: id} */
static MsStatus added_tokens_object(const ClipTokenizer *tok, JsonValue **out) {
    JsonValue *add = json_new(JSON_OBJECT);
    MsStatus s = add ? MS_OK : ms_errorf(MS_ERR_NOMEM, "fuse: out of memory");
    for (int k = 0; k < tok->n_added && !s; k++) {
        int id = tok->n_vocab + k;
        JsonValue *v = json_new_number(id);
        char name[256];
        size_t len = tok->tok_len[id] < sizeof name ? tok->tok_len[id] : sizeof name - 1;
        memcpy(name, tok->tok[id], len);
        name[len] = '\0';
        s = v ? json_set(add, name, v) : MS_ERR_NOMEM;
    }
    if (s) { json_free(add); add = NULL; }
    *out = add;
    return s;
}

static MsStatus write_folder(const char *base, const char *out, const MsModel *m, const ClipTokenizer *tok,
                             const float *new_emb, int n_new, const JsonValue *cfg) {
    char tmp[4200], p[4400], q[4400];
    static const char *const subs[] = { "unet", "vae", "text_encoder", "scheduler", "tokenizer" };
    static const char *const copies[] = { "model_index.json", "unet/config.json", "vae/config.json",
                                          "scheduler/scheduler_config.json" };
    static const char *const tokfiles[] = { "vocab.json", "merges.txt", "special_tokens_map.json", "tokenizer_config.json" };
    const int V = m->text_config.vocab_size;
    char tokdir[4200];
    MsStatus s = MS_OK;
    JsonValue *tc = NULL, *add = NULL;
    float *emb = NULL;
    if (file_exists(out)) return ms_errorf(MS_ERR_ARG, "%s already exists", out);
    snprintf(tmp, sizeof tmp, "%s.tmp", out);
    if (make_dir(tmp)) return ms_errorf(MS_ERR_IO, "%s: cannot create the folder (remove a stale one?)", tmp);
    for (size_t i = 0; i < sizeof subs / sizeof subs[0] && !s; i++) {
        snprintf(p, sizeof p, "%s/%s", tmp, subs[i]);
        if (make_dir(p)) s = ms_errorf(MS_ERR_IO, "%s: cannot create", p);
    }
    snprintf(q, sizeof q, "%s/model_index.json", base);
    if (!file_exists(q)) {   /* a single-file base: configs written from the loaded ones, vocab_size + n_new */
        MsModel mc = *m;
        mc.text_config.vocab_size = V + n_new;
        if (!s) s = ms_write_model_configs(&mc, tmp);
    } else {                 /* a folder: its configs as they are, text_encoder's vocab_size + n_new */
        for (size_t i = 0; i < sizeof copies / sizeof copies[0] && !s; i++) {
            snprintf(q, sizeof q, "%s/%s", base, copies[i]);
            snprintf(p, sizeof p, "%s/%s", tmp, copies[i]);
            if (file_exists(q)) s = ms_copy_file(q, p);
        }
        snprintf(q, sizeof q, "%s/text_encoder/config.json", base);
        if (!s) s = json_parse_file(q, &tc);
        if (!s) { JsonValue *v = json_new_number((double)(V + n_new)); s = v ? json_set(tc, "vocab_size", v) : MS_ERR_NOMEM; }
        snprintf(p, sizeof p, "%s/text_encoder/config.json", tmp);
        if (!s) s = json_write_file(p, tc, 2);
    }
    /* the tokenizer the model was opened with (the folder's, or the shipped CLIP BPE files) */
    if (!s) s = ms_find_tokenizer(base, NULL, tokdir, sizeof tokdir, NULL);
    for (size_t i = 0; i < sizeof tokfiles / sizeof tokfiles[0] && !s; i++) {
        snprintf(q, sizeof q, "%s/%s", tokdir, tokfiles[i]);
        snprintf(p, sizeof p, "%s/tokenizer/%s", tmp, tokfiles[i]);
        if (file_exists(q)) s = ms_copy_file(q, p);
    }
    /* weights */
    if (!s && !(emb = fused_token_embedding(m, new_emb, n_new))) s = MS_ERR_NOMEM;
    snprintf(p, sizeof p, "%s/unet/diffusion_pytorch_model.safetensors", tmp);
    if (!s) s = write_table(p, &m->unet, NULL, 0);
    snprintf(p, sizeof p, "%s/vae/diffusion_pytorch_model.safetensors", tmp);
    if (!s) s = write_table(p, &m->vae, NULL, 0);
    snprintf(p, sizeof p, "%s/text_encoder/model.safetensors", tmp);
    if (!s) s = write_table(p, &m->text, emb, (int64_t)V + n_new);
    /* tokenizer/added_tokens.json {token: id}, new_concept_cfg.json */
    if (!s) s = added_tokens_object(tok, &add);
    snprintf(p, sizeof p, "%s/tokenizer/added_tokens.json", tmp);
    if (!s) s = json_write_file(p, add, 0);
    snprintf(p, sizeof p, "%s/new_concept_cfg.json", tmp);
    if (!s) s = json_write_file(p, cfg, 0);
    if (!s && rename(tmp, out)) s = ms_errorf(MS_ERR_IO, "cannot rename %s to %s", tmp, out);
    json_free(tc);
    json_free(add);
    free(emb);
    return s;
}

/* --ldm-out FILE.safetensors: the fused model as an original-layout single file (cmd_convert.c's
 * writer, configs in its metadata), the new rows appended to the token embedding (vocab_size
 * V + n_new). An LDM file has no tokenizer: the added tokens ({token: id}) and new_concept_cfg.json
 * go into its metadata (mixshow.added_tokens, mixshow.new_concept_cfg), which ms_open_model and
 * `mixshow sample --pretrained_model FILE` read; new_concept_cfg.json is also written beside it
 * as <FILE without .safetensors>.new_concept_cfg.json (the official format, for other tools). */
static MsStatus write_ldm_out(const char *out, const MsModel *m, const ClipTokenizer *tok, const float *new_emb,
                              int n_new, const JsonValue *cfg) {
    MsModel mc = *m;                        /* a shallow copy: only the token embedding differs */
    MsParam *p = NULL;
    JsonValue *add = NULL;
    JsonBuf ja = { 0 }, jc = { 0 };
    char side[4200];
    float *emb = fused_token_embedding(m, new_emb, n_new);
    int ie = ms_param_find(&m->text, "text_model.embeddings.token_embedding.weight");
    MsStatus s = emb ? MS_OK : MS_ERR_NOMEM;
    if (!s && !(p = (MsParam *)malloc((size_t)m->text.n * sizeof *p))) s = ms_errorf(MS_ERR_NOMEM, "fuse: out of memory");
    if (!s) {
        memcpy(p, m->text.p, (size_t)m->text.n * sizeof *p);
        p[ie].f32 = emb;
        p[ie].shape[0] = (int64_t)m->text_config.vocab_size + n_new;
        p[ie].numel = (size_t)p[ie].shape[0] * (size_t)m->text_config.hidden_size;
        mc.text.p = p;
        mc.text_config.vocab_size += n_new;
        s = added_tokens_object(tok, &add);
    }
    if (!s) s = json_write(&ja, add, 0);
    if (!s) s = json_write(&jc, cfg, 0);
    if (!s) {
        const char *extra[4] = { "mixshow.added_tokens", ja.data, "mixshow.new_concept_cfg", jc.data };
        s = ms_write_ldm(&mc, out, 0, 1, extra, 2);
    }
    size_t L = strlen(out);
    snprintf(side, sizeof side, "%.*s.new_concept_cfg.json", (int)(L > 12 ? L - 12 : L), out);
    if (!s) s = json_write_file(side, cfg, 0);
    json_free(add);
    jbuf_free(&ja); jbuf_free(&jc);
    free(p); free(emb);
    return s;
}

/* ---- report: JSON, CSV and an SVG bar chart beside it ---- */
static MsStatus write_report(const char *path, const MsFuseReport *r, MsFuseMethod method, double total, size_t peak) {
    JsonBuf b = { 0 };
    MsStatus s = MS_OK;
    char buf[512];
#define P(str) do { if (!s) s = jbuf_puts(&b, str); } while (0)
#define N(x) do { if (!s) s = json_write_number(&b, x); } while (0)
    P("{\n  \"method\": \""); P(ms_fuse_method_name(method)); P("\",\n  \"layers\": [\n");
    for (int i = 0; i < r->n; i++) {
        const MsFuseLayerReport *l = &r->l[i];
        P("    {\"layer\": "); if (!s) s = json_write_string(&b, l->layer, strlen(l->layer));
        P(", \"stage\": \""); P(l->stage); P("\", \"rows\": "); N((double)l->rows);
        P(", \"objective\": {\"W0\": "); N(l->f_w0); P(", \"weight\": "); N(l->f_weight); P(", \"fused\": "); N(l->f_fused); P("}");
        if (method == MS_FUSE_GRAM) { P(", \"rank\": "); N(l->rank); P(", \"ridge\": "); N(l->ridge); }
        P(", \"change\": "); N(l->change); P(", \"concepts_change\": "); N(l->concepts_change);
        P(", \"weight_change\": "); N(l->weight_change);
        if (method == MS_FUSE_LBFGS) {
            P(", \"loss_trace\": [");
            for (int k = 0; k < l->n_trace; k++) { if (k) P(", "); N(l->trace[k]); }
            P("]");
        }
        P(", \"seconds\": "); N(l->seconds);
        P(i + 1 < r->n ? "},\n" : "}\n");
    }
    P("  ],\n  \"totals\": {\"seconds\": {\"te\": "); N(r->seconds[0]); P(", \"kv\": "); N(r->seconds[1]);
    P(", \"sp\": "); N(r->seconds[2]); P(", \"total\": "); N(total); P("}, \"peak_memory_bytes\": "); N((double)peak);
    P(", \"layers\": "); N(r->n); P("}\n}\n");
#undef P
#undef N
    FILE *f = NULL;
    char tmp[4200];
    snprintf(tmp, sizeof tmp, "%s.tmp", path);
    if (!s && (!(f = fopen(tmp, "wb")) || fwrite(b.data, 1, b.len, f) != b.len)) s = ms_errorf(MS_ERR_IO, "%s: cannot write", tmp);
    if (f && fclose(f) && !s) s = ms_errorf(MS_ERR_IO, "%s: cannot write", tmp);
    if (!s && rename(tmp, path)) s = ms_errorf(MS_ERR_IO, "cannot rename %s", tmp);
    jbuf_free(&b);
    if (s) return s;
    /* CSV and SVG: path without .json + .csv / .svg */
    char stem[4096];
    snprintf(stem, sizeof stem, "%s", path);
    size_t L = strlen(stem);
    if (L > 5 && !strcmp(stem + L - 5, ".json")) stem[L - 5] = '\0';
    snprintf(tmp, sizeof tmp, "%s.csv", stem);
    if (!(f = fopen(tmp, "wb"))) return ms_errorf(MS_ERR_IO, "%s: cannot write", tmp);
    fprintf(f, "layer,stage,rows,W0,weight,fused,change,concepts_change,weight_change,ridge\n");
    for (int i = 0; i < r->n; i++)
        fprintf(f, "%s,%s,%zu,%.17g,%.17g,%.17g,%.17g,%.17g,%.17g,%.17g\n", r->l[i].layer, r->l[i].stage, r->l[i].rows,
                r->l[i].f_w0, r->l[i].f_weight, r->l[i].f_fused, r->l[i].change, r->l[i].concepts_change,
                r->l[i].weight_change, r->l[i].ridge);
    if (fclose(f)) return ms_errorf(MS_ERR_IO, "%s: cannot write", tmp);
    /* bars: objective / f(W0) per layer, weight (grey) and fused (blue), log scale 1e-8..1e1 */
    snprintf(tmp, sizeof tmp, "%s.svg", stem);
    if (!(f = fopen(tmp, "wb"))) return ms_errorf(MS_ERR_IO, "%s: cannot write", tmp);
    int W = 60 + 14 * (r->n > 0 ? r->n : 1), H = 260;
    fprintf(f, "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"%d\" height=\"%d\" font-family=\"sans-serif\" font-size=\"10\">\n", W, H);
    fprintf(f, "<text x=\"4\" y=\"12\">f / f(W0) per layer (log10, -8..1): grey weight fusion, blue %s</text>\n",
            ms_fuse_method_name(method));
    for (int e = -8; e <= 1; e++) {
        double y = 230 - (e + 8) * 22.0;
        fprintf(f, "<line x1=\"40\" x2=\"%d\" y1=\"%.1f\" y2=\"%.1f\" stroke=\"#ddd\"/><text x=\"4\" y=\"%.1f\">1e%d</text>\n", W, y, y, y + 3, e);
    }
    for (int i = 0; i < r->n; i++) {
        const double v[2] = { r->l[i].f_weight, r->l[i].f_fused };
        for (int k = 0; k < 2; k++) {
            double rel = r->l[i].f_w0 > 0 ? v[k] / r->l[i].f_w0 : 1.0, e = rel > 1e-8 ? log10(rel) : -8;
            if (e > 1) e = 1;
            double h = (e + 8) * 22.0;
            snprintf(buf, sizeof buf, "<rect x=\"%d\" y=\"%.1f\" width=\"6\" height=\"%.1f\" fill=\"%s\"><title>%s %s %.4e</title></rect>\n",
                     44 + 14 * i + 6 * k, 230 - h, h, k ? "#36c" : "#aaa", r->l[i].layer, k ? "fused" : "weight", v[k]);
            fputs(buf, f);
        }
    }
    fprintf(f, "</svg>\n");
    if (fclose(f)) return ms_errorf(MS_ERR_IO, "%s: cannot write", tmp);
    return MS_OK;
}

/* --dump-grams FILE: every concept's G_c = X_c^T X_c of every recorded spatial input, under the
 * official hooked module's name (sp.<c>.<module>.G float32, .rows int64), as
 * tools/ref/gen_fuse_official.py writes the official ones. */
typedef struct {
    const UNetParams *up;
    StEntry *e;
    char (*names)[MS_KEY_MAX + 64];
    float **g;
    int64_t *rows;
    size_t n, cap;
    int failed;
} GramDump;

static void dump_gram(void *ctx, int c, int block, int which, const double *G, size_t rows, int C) {
    static const char *const mod[4] = { "attn1.to_q", "attn1.to_out.0", "attn2.to_q", "attn2.to_out.0" };
    GramDump *d = (GramDump *)ctx;
    if (d->failed) return;
    if (d->n + 6 > d->cap) {                  /* room for 3 modules x (G, rows) */
        size_t cap = d->cap ? 2 * d->cap : 256;
        StEntry *e = (StEntry *)realloc(d->e, cap * sizeof *e);
        if (e) d->e = e;
        char (*nm)[MS_KEY_MAX + 64] = realloc(d->names, cap * sizeof *nm);
        if (nm) d->names = nm;
        float **g = (float **)realloc(d->g, cap * sizeof *g);
        if (g) d->g = g;
        int64_t *r = (int64_t *)realloc(d->rows, cap * sizeof *r);
        if (r) d->rows = r;
        if (!e || !nm || !g || !r) { d->failed = 1; return; }
        d->cap = cap;
    }
    const int copies = which == 0 ? 3 : 1;    /* attn1 q, k, v share norm1's output */
    for (int k = 0; k < copies; k++) {
        char m[16];
        snprintf(m, sizeof m, "%.15s", mod[which]);
        if (which == 0) m[9] = "qkv"[k];
        float *g = (float *)malloc((size_t)C * C * sizeof(float));
        if (!g) { d->failed = 1; return; }
        for (size_t q = 0; q < (size_t)C * C; q++) g[q] = (float)G[q];
        StEntry *e = &d->e[d->n];
        memset(e, 0, 2 * sizeof *e);
        snprintf(d->names[d->n], sizeof d->names[0], "sp.%d.%s.%s.G", c, d->up->blk[block].name, m);
        e[0].name = d->names[d->n]; e[0].dtype = ST_F32; e[0].ndim = 2; e[0].shape[0] = e[0].shape[1] = C; e[0].f32 = g;
        d->g[d->n] = g;
        d->rows[d->n + 1] = (int64_t)rows;
        snprintf(d->names[d->n + 1], sizeof d->names[0], "sp.%d.%s.%s.rows", c, d->up->blk[block].name, m);
        e[1].name = d->names[d->n + 1]; e[1].dtype = ST_I64; e[1].ndim = 1; e[1].shape[0] = 1;
        d->g[d->n + 1] = NULL;
        d->n += 2;
    }
}

static MsStatus dump_grams_write(GramDump *d, const char *path) {
    MsStatus s = MS_OK;
    if (d->failed) s = ms_errorf(MS_ERR_NOMEM, "%s: out of memory", path);
    for (size_t k = 0; k < d->n && !s; k++) {      /* the arrays moved while growing: point now */
        d->e[k].name = d->names[k];
        if (d->e[k].dtype == ST_I64) d->e[k].raw = &d->rows[k];
    }
    if (!s) s = st_write(path, d->e, d->n, NULL, 0);
    for (size_t k = 0; k < d->n; k++) free(d->g[k]);
    free(d->e); free(d->names); free(d->g); free(d->rows);
    memset(d, 0, sizeof *d);
    return s;
}

/* --te-kv-from F: the text-encoder (unet = 0) or cross-attention K/V (unet = 1) layers of another
 * run, as `<state-dict key>.best_W` tensors (tools/ref/gen_fuse_official.py writes them), replace
 * ours, so that the next stage records the features that run recorded. */
static MsStatus load_best_w(const char *path, MsModel *m, int unet) {
    StFile f;
    MsStatus s = st_open(&f, path);
    if (s) return s;
    MsParamTable *tb = unet ? &m->unet : &m->text;
    int n = 0;
    for (int i = 0; i < tb->n && !s; i++) {
        char key[MS_KEY_MAX + 16];
        snprintf(key, sizeof key, "%s.best_W", tb->p[i].name);
        const StTensor *x = st_find(&f, key);
        if (!x || (unet && !strstr(key, "attn2.to_k.") && !strstr(key, "attn2.to_v."))) continue;
        if (!tb->p[i].f32 || x->numel != tb->p[i].numel) { s = ms_errorf(MS_ERR_SHAPE, "%s: %s does not fit", path, key); break; }
        s = st_to_f32(&f, x, tb->p[i].f32, tb->p[i].numel);
        n++;
    }
    st_close(&f);
    if (!s) fprintf(stderr, "mixshow fuse: %d %s layers from %s\n", n, unet ? "K/V" : "text-encoder", path);
    return s;
}

static MsStatus after_te_best_w(void *ctx, MsModel *m) { return load_best_w((const char *)ctx, m, 0); }

static void usage(void) {
    fprintf(stderr,
            "usage: mixshow fuse --model BASE --concepts CFG.json --out DIR [--method gram|lbfgs|weight]\n"
            "                    [--textenc-iters 500] [--unet-iters 50] [--seed 0] [--report REPORT.json] [-q]\n"
            "                    [--spatial-size 512] [--spatial-steps 20] [--no-spatial] [--dump-grams FILE]\n"
            "                    [--ldm-out FILE.safetensors] [--check] [--extra-modules weight]\n"
            "                    [--rcond auto|X] [--max-change X|off] [--te-kv-from F.safetensors]\n\n"
            "Gradient fusion (Mix-of-Show gradient_fusion.py) of the ED-LoRAs in CFG.json (the official\n"
            "multi-concept JSON: lora_path, unet_alpha, text_encoder_alpha, concept_name) into BASE (a\n"
            "diffusers folder). DIR gets the fused diffusers folder, tokenizer/added_tokens.json and\n"
            "new_concept_cfg.json. Methods: gram (default: exact least squares nearest to W0), lbfgs\n"
            "(the official optimizer), weight (W0 + sum alpha dW). --method weight also fuses plain LoRAs\n"
            "(1 token per word: `mixshow train --set models.enable_edlora=false`, the paper's LoRA baseline):\n"
            "their words stay prompt text as `mixshow sample --edlora` uses them; their tokens <newK> and rows\n"
            "are added unbound and new_concept_cfg.json has no entry for them (ED-LoRAs and plain LoRAs are\n"
            "not fused together). --ldm-out also writes the fused model\n"
            "as an original-layout single file (added tokens and new_concept_cfg in its metadata, which\n"
            "`mixshow sample --pretrained_model FILE` reads; FILE's stem + .new_concept_cfg.json beside\n"
            "it). BASE may be a single file too. Stages: text encoder and\n"
            "cross-attention K/V, spatial attention (sampling each concept: --seed S draws its latents\n"
            "as the official script after torch.manual_seed(S)).\n"
            "lora_path may also name a kohya / webui LoRA .safetensors (lora_te_.. / lora_unet_.. keys,\n"
            "per-module alpha): it adds no tokens, concept_name is used as written. Its MLP / feed-forward /\n"
            "proj_in / proj_out modules are outside gradient fusion: --extra-modules weight merges them as\n"
            "W0 + sum alpha dW after fusing (implied by --method weight; an error otherwise).\n"
            "--rcond auto|X: gram's eigen cut-off: auto (default) keeps the directions the float32 features\n"
            "determine, within 0.1%% of the minimum; X keeps eigenvalues > X * max (1e-12: the exact minimiser).\n"
            "--max-change X|off: gram's trust region (default off): each layer's change ||W - W0|| at most\n"
            "max(X * sqrt(sum_i ||dW_i||^2), ||weight fusion's change||), the minimiser of the objective\n"
            "inside by a ridge (the report's ridge column says where it acted; weight fusion lies inside,\n"
            "so the result never fits worse than it). For concepts whose inputs are nearly alike but whose\n"
            "targets differ (e.g. concept tokens frozen at nearly equal rows), where the exact minimiser\n"
            "blows the weights up; the summary prints the largest change / sqrt(sum ||dW_i||^2). X = 2 is\n"
            "a tight region: on the world demo it acted on 67 of 72 layers (README).\n"
            "--check reads and checks every input (JSON, LoRA files, shapes against BASE) and stops.\n"
            "--te-kv-from F.safetensors takes the text-encoder and cross-attention K/V layers of another run\n"
            "(`<key>.best_W` tensors, as tools/ref/gen_fuse_official.py writes them) in place of ours, each\n"
            "before the next stage records: the features are then that run's (comparisons with it).\n");
}

int cmd_fuse(int argc, char **argv) {
    const char *model = NULL, *cfg = NULL, *out = NULL, *report = NULL, *dump = NULL, *te_kv_from = NULL, *ldm_out = NULL;
    GramDump gd;
    MsFuseOptions o;
    memset(&o, 0, sizeof o);
    o.method = MS_FUSE_GRAM;
    o.te_iters = 500;
    o.unet_iters = 50;
    o.rcond = MS_FUSE_RCOND_AUTO;
    o.verbose = 1;                   /* progress per layer / sampling step with ETA (-q: none) */
    static Concept cs[MAXC];
    int n = 0, rc = 1, no_spatial = 0, check_only = 0, extra_weight = 0;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (!strcmp(a, "-h") || !strcmp(a, "--help")) { usage(); return 0; }
        if (!strcmp(a, "-v")) { o.verbose = 1; continue; }
        if (!strcmp(a, "-q") || !strcmp(a, "--quiet")) { o.verbose = 0; continue; }
        if (!strcmp(a, "--no-spatial")) { no_spatial = 1; continue; }
        if (!strcmp(a, "--check")) { check_only = 1; continue; }
        if (!v) { fprintf(stderr, "mixshow fuse: %s needs a value\n", a); return 2; }
        i++;
        if (!strcmp(a, "--model")) model = v;
        else if (!strcmp(a, "--concepts")) cfg = v;
        else if (!strcmp(a, "--out")) out = v;
        else if (!strcmp(a, "--report")) report = v;
        else if (!strcmp(a, "--dump-grams")) dump = v;
        else if (!strcmp(a, "--te-kv-from")) te_kv_from = v;
        else if (!strcmp(a, "--ldm-out")) ldm_out = v;
        else if (!strcmp(a, "--extra-modules")) {
            if (strcmp(v, "weight")) { fprintf(stderr, "mixshow fuse: --extra-modules %s: expected weight\n", v); return 2; }
            extra_weight = 1;
        } else if (!strcmp(a, "--method")) {
            if (!strcmp(v, "gram")) o.method = MS_FUSE_GRAM;
            else if (!strcmp(v, "lbfgs")) o.method = MS_FUSE_LBFGS;
            else if (!strcmp(v, "weight")) o.method = MS_FUSE_WEIGHT;
            else { fprintf(stderr, "mixshow fuse: --method %s: expected gram, lbfgs or weight\n", v); return 2; }
        } else if (!strcmp(a, "--rcond")) {
            char *end;
            double x = strtod(v, &end);
            if (!strcmp(v, "auto")) o.rcond = MS_FUSE_RCOND_AUTO;
            else if (*end || !(x > 0.0 && x < 1.0)) { fprintf(stderr, "mixshow fuse: --rcond %s: expected auto or a number in (0, 1)\n", v); return 2; }
            else o.rcond = x;
        } else if (!strcmp(a, "--max-change")) {
            char *end;
            double x = strtod(v, &end);
            if (!strcmp(v, "off")) o.max_change = 0.0;
            else if (*end || end == v || !(x >= 1.0 && x <= 1e6)) {
                fprintf(stderr, "mixshow fuse: --max-change %s: expected off or a number in [1, 1e6]\n", v);
                return 2;
            } else o.max_change = x;
        } else if (!strcmp(a, "--seed")) {
            char *end;
            unsigned long long x = strtoull(v, &end, 10);
            if (*end || v[0] == '-' || !v[0]) { fprintf(stderr, "mixshow fuse: --seed %s: expected a non-negative integer\n", v); return 2; }
            o.seed = (uint64_t)x;
        } else if (!strcmp(a, "--textenc-iters") || !strcmp(a, "--unet-iters") || !strcmp(a, "--spatial-size") ||
                   !strcmp(a, "--spatial-steps")) {
            char *end;
            long x = strtol(v, &end, 10);
            if (*end || x < 0 || x > 1000000) { fprintf(stderr, "mixshow fuse: %s %s: expected a count\n", a, v); return 2; }
            if (a[2] == 't') o.te_iters = (int)x;
            else if (a[2] == 'u') o.unet_iters = (int)x;
            else if (!strcmp(a, "--spatial-size")) o.sp_size = (int)x;
            else o.sp_steps = (int)x;
        } else { fprintf(stderr, "mixshow fuse: unknown option %s\n", a); usage(); return 2; }
    }
    if (!model || !cfg || !out) { usage(); return 2; }
    if (ldm_out && (strlen(ldm_out) <= 12 || strcmp(ldm_out + strlen(ldm_out) - 12, ".safetensors"))) {
        fprintf(stderr, "mixshow fuse: --ldm-out %s: expected a FILE.safetensors\n", ldm_out);
        return 2;
    }
    double t_start = ms_time();
    MsModel m;
    ClipTokenizer tok;
    UNetParams up;
    MsFuseReport rep;
    JsonValue *ncfg = NULL;
    int have_m = 0, have_tok = 0, have_up = 0, T = 0, n_words = 0;
    char (*words)[MS_WORD_MAX] = NULL, (*tnames)[24] = NULL;
    const char **wptr = NULL, **tptr = NULL;
    float *new_emb = NULL;
    memset(&rep, 0, sizeof rep);
    memset(cs, 0, sizeof cs);
    MsStatus s = read_concepts(cfg, cs, &n);
    /* every LoRA file, checked before any work. Files without new_concept_embedding (kohya LoRA,
     * plain LoRA) add no tokens: their concept_name words are used as they are. Ranks may differ
     * between concepts (each concept's LoRA is merged on its own, as gradient_fusion.py does). */
    int T_from = -1, n_extra = 0, extra_c = -1, sp_any = 0, sp_missing = -1;
    for (int c = 0; c < n && !s; c++) {
        s = edlora_read(cs[c].path, &cs[c].f);
        if (!s) s = edlora_split_extra(&cs[c].f, &cs[c].extra);
        if (s) { s = concept_error(s, cfg, c, &cs[c]); break; }
        if (cs[c].extra.n_te + cs[c].extra.n_unet && extra_c < 0) extra_c = c;
        n_extra += cs[c].extra.n_te + cs[c].extra.n_unet;
        int t = edlora_tokens_per_word(&cs[c].f);
        if (t && T_from < 0) { T = t; T_from = c; }
        else if (t && t != T && (t == 1 || T == 1))
            s = ms_errorf(MS_ERR_UNSUPPORTED, "%s: concept %d ('%s', %s) has %d token(s) per word, concept %d (%s) has %d: "
                          "plain LoRAs (1 per word: their words are prompt text) and ED-LoRAs (words bound to one token "
                          "per cross-attention layer) are not fused together; fuse each kind on its own", cfg, c,
                          cs[c].given, cs[c].path, t, T_from, cs[T_from].path, T);
        else if (t && t != T)
            s = ms_errorf(MS_ERR_FORMAT, "%s: concept %d ('%s', %s): %d tokens per word, concept %d (%s) has %d", cfg, c,
                          cs[c].given, cs[c].path, t, T_from, cs[T_from].path, T);
        for (int k = 0; k < cs[c].f.n_unet; k++)
            sp_any |= !strstr(cs[c].f.unet[k].name, ".attn2.to_k") && !strstr(cs[c].f.unet[k].name, ".attn2.to_v");
        if (!cs[c].f.n_unet && sp_missing < 0) sp_missing = c;
    }
    if (!s && n_extra && o.method != MS_FUSE_WEIGHT && !extra_weight) {
        const EdloraFile *x = &cs[extra_c].extra;
        s = ms_errorf(MS_ERR_UNSUPPORTED, "%s: concept %d ('%s', %s): %s.%s: gradient fusion covers the attention projections "
                      "(text encoder self_attn q/k/v/out_proj, UNet attn1/attn2 to_q/k/v/out.0); this LoRA also changes "
                      "%d other layers (MLP / feed-forward / proj_in / proj_out) in all concepts. Add --extra-modules "
                      "weight to merge those as W0 + sum alpha dW (weight fusion), or use --method weight", cfg, extra_c,
                      cs[extra_c].given, cs[extra_c].path, x->n_te ? "text_encoder" : "unet",
                      x->n_te ? x->te[0].name : x->unet[0].name, n_extra);
    }
    if (!s && !no_spatial && sp_any && sp_missing >= 0)
        s = ms_errorf(MS_ERR_ARG, "%s: concept %d ('%s', %s) has no UNet LoRA, but other concepts change spatial attention "
                      "layers: the spatial stage samples every concept with its own UNet LoRA (gradient_fusion.py fails "
                      "there too); use --no-spatial or give it a UNet LoRA", cfg, sp_missing, cs[sp_missing].given,
                      cs[sp_missing].path);
    if (!s) { s = ms_open_model(model, NULL, &m, &tok, NULL, 0); have_m = have_tok = !s; }
    if (!s) { s = unet_params_init(&up, &m.unet_config, &m.unet); have_up = !s; }
    if (!s && T_from < 0) T = ms_unet_cross_attn_layers(&m.unet_config);   /* no new words at all */
    /* plain LoRA (1 token per word, the paper's LoRA + weight fusion baseline): the words stay
     * prompt text, as `mixshow sample --edlora` uses them; their tokens <newK> and rows are added
     * unbound (load_new_concept with enable_edlora false) and new_concept_cfg.json gets no entry
     * for them (an official 1-token entry would cut EDLoRAPipeline's 16 bound prompts to one) */
    const int plain = T == 1;
    if (!s && !plain && T > ms_unet_cross_attn_layers(&m.unet_config)) {   /* 16 variants, fewer layers */
        const int NL = ms_unet_cross_attn_layers(&m.unet_config);
        for (int c = 0; c < n; c++) edlora_fit_layers(&cs[c].f, NL);
        fprintf(stderr, "mixshow fuse: %d tokens per word, the UNet has %d cross-attention layers: the first %d of each "
                "word (the ones training bound to a layer) are fused\n", T, NL, NL);
        T = NL;
    }
    if (!s && plain && o.method != MS_FUSE_WEIGHT)
        s = ms_errorf(MS_ERR_UNSUPPORTED, "%s: concept %d ('%s', %s): a plain LoRA (1 token per word): gradient fusion "
                      "(--method %s) matches each concept's features at its words bound to %d layer-wise tokens, which "
                      "only ED-LoRA has (a plain LoRA's words are prompt text); use --method weight (W0 + sum alpha dW, "
                      "the paper's LoRA baseline)", cfg, T_from, cs[T_from].given, cs[T_from].path,
                      ms_fuse_method_name(o.method), ms_unet_cross_attn_layers(&m.unet_config));
    if (!s && !plain && T != ms_unet_cross_attn_layers(&m.unet_config))
        s = ms_errorf(MS_ERR_FORMAT, "%s: concept %d ('%s', %s): %d tokens per word; fusion needs ED-LoRA (one per "
                      "cross-attention layer: %d) or, with --method weight, plain LoRA (1)", cfg, T_from, cs[T_from].given,
                      cs[T_from].path, T, ms_unet_cross_attn_layers(&m.unet_config));
    if (!s && tok.n_vocab != m.text_config.vocab_size)
        s = ms_errorf(MS_ERR_FORMAT, "%s: tokenizer has %d tokens, text encoder vocab_size %d", model, tok.n_vocab, m.text_config.vocab_size);
    /* words in concept_name order; collisions renamed */
    if (!s) {
        words = calloc((size_t)n * MS_MAX_CONCEPT_WORDS + 1, sizeof *words);
        wptr = calloc((size_t)n * MS_MAX_CONCEPT_WORDS + 1, sizeof *wptr);
        tnames = calloc(((size_t)n * MS_MAX_CONCEPT_WORDS + 1) * T, sizeof *tnames);
        tptr = calloc(((size_t)n * MS_MAX_CONCEPT_WORDS + 1) * T, sizeof *tptr);
        new_emb = calloc(((size_t)n * MS_MAX_CONCEPT_WORDS + 1) * T * m.text_config.hidden_size, sizeof(float));
        ncfg = json_new(JSON_OBJECT);
        if (!words || !wptr || !tnames || !tptr || !new_emb || !ncfg) s = ms_errorf(MS_ERR_NOMEM, "fuse: out of memory");
    }
    for (int c = 0; c < n && !s; c++) {
        char name[1024] = "", src[1024];
        snprintf(src, sizeof src, "%s", cs[c].name);
        for (char *w = strtok(src, " "); w && !s; w = strtok(NULL, " ")) {
            if (w[0] != '<') { size_t l = strlen(name); snprintf(name + l, sizeof name - l, "%s%s", l ? " " : "", w); continue; }
            const EdloraEmbedding *e = NULL;
            for (int k = 0; k < cs[c].f.n_emb; k++) if (!strcmp(cs[c].f.emb[k].word, w)) e = &cs[c].f.emb[k];
            if (!e) {
                s = ms_errorf(MS_ERR_FORMAT, "%s: concept %d ('%s', %s): concept word %s is not in the file's "
                              "new_concept_embedding (%d words; the official assert)", cfg, c, cs[c].given, cs[c].path, w, cs[c].f.n_emb);
                break;
            }
            if (e->D != m.text_config.hidden_size) {
                s = ms_errorf(MS_ERR_SHAPE, "%s: concept %d ('%s', %s): new_concept_embedding.%s is %d wide, the text encoder %d",
                              cfg, c, cs[c].given, cs[c].path, w, e->D, m.text_config.hidden_size);
                break;
            }
            if (strlen(w) >= MS_WORD_MAX - 8) { s = ms_errorf(MS_ERR_FORMAT, "%s: concept word %.40s... is too long", cfg, w); break; }
            if (n_words >= n * MS_MAX_CONCEPT_WORDS) { s = ms_errorf(MS_ERR_ARG, "fuse: too many concept words"); break; }
            char nw[MS_WORD_MAX];
            snprintf(nw, sizeof nw, "%s", w);
            for (int dup = 2;; dup++) {           /* plain words are text: never renamed */
                int clash = 0;
                for (int k = 0; k < n_words; k++) clash |= !strcmp(words[k], nw);
                if (clash && plain)
                    fprintf(stderr, "mixshow fuse: warning: concept word %s of %s is another concept's too: prompts with it "
                            "reach both\n", w, cs[c].path);
                if (!clash || plain) break;
                int l = (int)strlen(w);
                snprintf(nw, sizeof nw, "%.*s_%d>", l > 1 ? l - 1 : l, w, dup % 1000);
            }
            if (strcmp(nw, w)) fprintf(stderr, "mixshow fuse: warning: concept word %s of %s is taken; renamed %s\n", w, cs[c].path, nw);
            snprintf(words[n_words], MS_WORD_MAX, "%s", nw);
            wptr[n_words] = words[n_words];
            size_t l = strlen(name);
            snprintf(name + l, sizeof name - l, "%s%s", l ? " " : "", nw);
            JsonValue *ent = json_new(JSON_OBJECT), *idl = json_new(JSON_ARRAY), *nml = json_new(JSON_ARRAY);
            if (!ent || !idl || !nml) { json_free(ent); json_free(idl); json_free(nml); s = ms_errorf(MS_ERR_NOMEM, "fuse"); break; }
            for (int i = 0; i < T && !s; i++) {
                size_t k = (size_t)n_words * T + i;
                snprintf(tnames[k], sizeof tnames[k], "<new%d>", (int)(k % 100000000));
                tptr[k] = tnames[k];
                int na = 0;
                const char *one = tnames[k];
                s = clip_tokenizer_add_tokens(&tok, &one, 1, &na);
                if (!s && na != 1) s = ms_errorf(MS_ERR_ARG, "fuse: token %s exists already", one);
                if (!s) s = json_push(idl, json_new_number(tok.n_vocab + (int)k));
                if (!s) s = json_push(nml, json_new_string(tnames[k], strlen(tnames[k])));
                memcpy(new_emb + k * m.text_config.hidden_size, e->emb + (size_t)i * e->D, (size_t)e->D * sizeof(float));
            }
            if (!s) s = json_set(ent, "concept_token_ids", idl); else json_free(idl);
            if (!s) s = json_set(ent, "concept_token_names", nml); else json_free(nml);
            if (!s && !plain) s = json_set(ncfg, nw, ent); else json_free(ent);   /* plain: no entry */
            n_words++;
        }
        snprintf(cs[c].name, sizeof cs[c].name, "%s", name);
    }
    /* LoRA modules onto the model (shapes checked there) */
    for (int c = 0; c < n && !s; c++) {
        const ClipTextConfig *tc = &m.text_config;
        cs[c].te_has = calloc((size_t)tc->num_hidden_layers * 4, 1);
        cs[c].un_has = calloc((size_t)up.n_blk * 2 * 4, 1);
        if (!cs[c].te_has || !cs[c].un_has) { s = ms_errorf(MS_ERR_NOMEM, "fuse"); break; }
        if (cs[c].f.n_te) {
            s = edlora_to_clip_lora(&cs[c].f, tc, (float)cs[c].te_alpha, &cs[c].te, &cs[c].te_mem);
            static const char *const pj[4] = { "q_proj", "k_proj", "v_proj", "out_proj" };
            for (int k = 0; k < cs[c].f.n_te && !s; k++)
                for (int l = 0; l < tc->num_hidden_layers; l++)
                    for (int j = 0; j < 4; j++) {
                        char nm[MS_KEY_MAX];
                        snprintf(nm, sizeof nm, "text_model.encoder.layers.%d.self_attn.%s", l, pj[j]);
                        if (!strcmp(nm, cs[c].f.te[k].name)) cs[c].te_has[l * 4 + j] = 1;
                    }
        }
        if (!s && cs[c].f.n_unet) {
            int rmax = 0;                               /* edlora_to_unet_lora pads to the largest rank */
            for (int k = 0; k < cs[c].f.n_unet; k++) if (cs[c].f.unet[k].rank > rmax) rmax = cs[c].f.unet[k].rank;
            size_t need = unet_lora_floats(&m.unet_config, rmax) * sizeof(float) * 2 + 65536 +
                          (size_t)up.n_blk * 8 * sizeof(UNetLoraLinear);
            s = arena_init(&cs[c].un_ar, need);
            if (!s) s = edlora_to_unet_lora(&cs[c].f, &up, (float)cs[c].unet_alpha, &cs[c].un_ar, &cs[c].un);
            for (int k = 0; k < cs[c].f.n_unet && !s; k++)
                for (int a = 0; a < up.n_blk * 2; a++)
                    for (int w = 0; w < 4; w++) {
                        char nm[MS_KEY_MAX];
                        unet_lora_module_name(&up, a, w, nm, sizeof nm);
                        if (!strcmp(nm, cs[c].f.unet[k].name)) cs[c].un_has[a * 4 + w] = 1;
                    }
        }
        if (!s) s = edlora_merge_check(&m, &cs[c].extra);    /* the extra modules fit too */
        if (s && s != MS_ERR_NOMEM) s = concept_error(s, cfg, c, &cs[c]);
    }
    if (!s && check_only) {
        fprintf(stderr, "mixshow fuse: %s: %d concepts, %d new words, %d extra modules: inputs fit %s\n", cfg, n, n_words,
                n_extra, model);
        rc = 0;
        goto cleanup;
    }
    if (!s) {
        /* plain: nothing bound, every layer sees the prompt as given */
        MsFuseTokens tk = { plain ? 0 : n_words, ms_unet_cross_attn_layers(&m.unet_config), wptr, tptr, new_emb, n_words * T };
        MsFuseConcept fc[MAXC];
        for (int c = 0; c < n; c++) {
            fc[c].name = cs[c].name;
            fc[c].te = cs[c].f.n_te ? &cs[c].te : NULL;
            fc[c].te_has = cs[c].te_has;
            fc[c].unet = cs[c].f.n_unet ? &cs[c].un : NULL;
            fc[c].unet_has = cs[c].un_has;
        }
        fprintf(stderr, "mixshow fuse: %d concepts, %d words%s, method %s\n", n, n_words,
                plain ? " (plain LoRA: prompt text, tokens added unbound)" : "", ms_fuse_method_name(o.method));
        if (te_kv_from) { o.after_te = after_te_best_w; o.after_te_ctx = (void *)te_kv_from; }
        s = ms_fuse_text_kv(&m, &up, &tok, &tk, fc, n, &o, &rep);
        memset(&gd, 0, sizeof gd);
        gd.up = &up;
        if (dump) { o.on_gram = dump_gram; o.on_gram_ctx = &gd; }
        if (!s && te_kv_from) s = load_best_w(te_kv_from, &m, 1);   /* and the K/V layers (after_te: text) */
        if (!s && !no_spatial) s = ms_fuse_spatial(&m, &up, &tok, &tk, fc, n, &o, &rep);
        if (dump) { MsStatus s2 = dump_grams_write(&gd, dump); if (!s) s = s2; }
        /* the extra modules (kohya mlp / ff / proj_in / proj_out) by weight fusion, after the
         * fused layers (whose recorded inputs therefore never pass through them) */
        for (int c = 0; c < n && !s; c++) {
            EdloraFile x = cs[c].extra;
            x.n_unet = 0;
            s = edlora_merge(&m, &x, (float)cs[c].te_alpha);
            x = cs[c].extra;
            x.n_te = 0;
            if (!s) s = edlora_merge(&m, &x, (float)cs[c].unet_alpha);
        }
        if (!s && n_extra) fprintf(stderr, "mixshow fuse: %d extra LoRA modules merged as W0 + sum alpha dW\n", n_extra);
    }
    if (!s) s = write_folder(model, out, &m, &tok, new_emb, n_words * T, ncfg);
    if (!s && ldm_out) s = write_ldm_out(ldm_out, &m, &tok, new_emb, n_words * T, ncfg);
    double total = ms_time() - t_start;
    size_t peak = peak_rss();
    if (!s && report) s = write_report(report, &rep, o.method, total, peak);
    if (!s) {
        double sum[3][3] = { { 0 } };
        for (int i = 0; i < rep.n; i++) {
            int st = rep.l[i].stage[0] == 't' ? 0 : rep.l[i].stage[0] == 'k' ? 1 : 2;
            sum[st][0] += rep.l[i].f_w0; sum[st][1] += rep.l[i].f_weight; sum[st][2] += rep.l[i].f_fused;
        }
        fprintf(stderr, "mixshow fuse: wrote %s in %.2f s, peak memory %.1f MB\n", out, total, peak / 1048576.0);
        static const char *const nm[3] = { "text encoder", "cross-attn K/V", "spatial" };
        for (int k = 0; k < 3; k++)
            if (sum[k][0] > 0)
                fprintf(stderr, "  %-15s sum f: W0 %.4e  weight %.4e  %s %.4e\n", nm[k], sum[k][0], sum[k][1],
                        ms_fuse_method_name(o.method), sum[k][2]);
        {   /* the largest change against the concepts' own, and where the trust region acted */
            int held = 0, worst = -1;
            double ratio = 0.0;
            for (int i = 0; i < rep.n; i++) {
                const double q = rep.l[i].concepts_change > 0 ? rep.l[i].change / rep.l[i].concepts_change : 0.0;
                held += rep.l[i].ridge > 0.0;
                if (q > ratio) { ratio = q; worst = i; }
            }
            if (worst >= 0)
                fprintf(stderr, "  largest change ||W - W0|| / sqrt(sum ||dW_i||^2): %.3g (%s)\n", ratio, rep.l[worst].layer);
            if (o.method == MS_FUSE_GRAM && o.max_change > 0)
                fprintf(stderr, "  trust region (--max-change %g) held %d of %d layers\n", o.max_change, held, rep.n);
        }
        rc = 0;
    } else fprintf(stderr, "mixshow fuse: %s\n", ms_last_error());
cleanup:
    for (int c = 0; c < n; c++) {
        edlora_free(&cs[c].f);
        edlora_free(&cs[c].extra);
        ms_free_aligned(cs[c].te_mem);
        arena_free(&cs[c].un_ar);
        free(cs[c].te_has); free(cs[c].un_has);
    }
    ms_fuse_report_free(&rep);
    json_free(ncfg);
    free(words); free(wptr); free(tnames); free(tptr); free(new_emb);
    if (have_up) unet_params_free(&up);
    if (have_tok) clip_tokenizer_free(&tok);
    if (have_m) ms_model_free(&m);
    return rc;
}
