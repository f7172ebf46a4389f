/* tools/cmd_eval.c — `mixshow eval` (issue 15): text alignment and image alignment of generated
 * images, measured by stand-ins for the paper's CLIP metrics that are trained in C on the
 * procedural world (models/evalnet.c, tools/eval_world.c); `--train-encoders DIR` trains them. */
#if !defined(_WIN32) && !defined(_POSIX_C_SOURCE)
#define _POSIX_C_SOURCE 200809L         /* mkdir: in the guarded section below */
#endif
#include "tools/tools.h"

#include <ctype.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#if !defined(_WIN32)
#include <sys/stat.h>
#include <sys/types.h>
static int ev_mkdir(const char *p) { struct stat st; mkdir(p, 0777); return stat(p, &st) == 0 && S_ISDIR(st.st_mode); }
#else
#include <direct.h>
static int ev_mkdir(const char *p) { _mkdir(p); return 1; }
#endif

static void eval_usage(FILE *f) {
    fprintf(f,
        "usage: mixshow eval --images DIR [--prompts FILE] [--ref NAME=DIR ...] [--encoders FILE] [--out PREFIX] [--sheet]\n"
        "       mixshow eval --train-encoders DIR [training options]\n"
        "\n"
        "Scores generated images the way Mix-of-Show's paper does (Sec. 5), with stand-ins for CLIP\n"
        "ViT-B/32 trained in C on the procedural world (mixshow world) and never on the images scored:\n"
        "  text alignment   cosine between the image's embedding and the prompt's in a joint space\n"
        "                   learned contrastively (CLIP's symmetric InfoNCE, learned temperature) from\n"
        "                   world scenes and their captions: colours, shapes, counts, patterns, sizes,\n"
        "                   positions, backgrounds, creatures' poses. Write a concept as its class word\n"
        "                   (\"a creature, waving, on grass\"): the world's captions know no concept tokens.\n"
        "  image alignment  mean cosine between the image's identity embedding and those of the concept's\n"
        "                   reference images; trained with a supervised contrastive loss so that renders\n"
        "                   of one creature (pose, scale, position, background vary) are close and other\n"
        "                   creatures far. An image with several creatures mixes them (no cropping).\n"
        "  caption rank     with several distinct prompts in the file: the rank of the image's own prompt\n"
        "                   among them by text alignment (1: no other prompt fits the image better); the\n"
        "                   share of rank 1 is caption retrieval top-1 (chance: 1 / distinct prompts),\n"
        "                   whether an image shows *its* caption rather than a plausible scene.\n"
        );
    fprintf(f,
        "The alignments are cosines in [-1, 1], comparable between methods scored by the same encoders, not with\n"
        "the paper's CLIP numbers. Held-out accuracy of the default encoders: see README (the training\n"
        "prints it and stores it in the file's metadata \"heldout\").\n"
        "\n"
        "scoring:\n"
        "  --images DIR        the generated images (PNG or JPEG; resized to the encoders' input size)\n"
        "  --prompts FILE      one image per line: FILE<TAB>PROMPT[<TAB>CONCEPT[,CONCEPT...]] ('#'\n"
        "                      starts a comment; FILE relative to --images; default DIR/prompts.txt)\n"
        "  --ref NAME=DIR      reference images of concept NAME: DIR/image/ if it exists (a mixshow world\n"
        "                      character folder), else DIR; when one --ref is given and a line names no\n"
        "                      concept, it applies to every image\n"
        "  --encoders FILE     from --train-encoders (default: models/eval-encoders.safetensors under\n"
        "                      the data roots)\n"
        "  --tokenizer DIR     CLIP vocab.json + merges.txt (default: the shipped files)\n"
        "  --out PREFIX        writes PREFIX.json and PREFIX.csv (default DIR/eval)\n"
        "  --sheet             also PREFIX.png, a contact sheet of the images in the prompts file's\n"
        "                      order (8 per row; --sheet-cols N), and PREFIX.html, a page of one file\n"
        "                      that shows them with their prompts and scores\n"
        "training (--train-encoders DIR writes DIR/encoders.safetensors, checkpoint.safetensors,\n"
        "loss.csv, loss.svg, heldout.json; in encoders.safetensors, not in the checkpoint, the text\n"
        "tower's token rows that never had a gradient are zero, and the held-out numbers are its):\n"
        "  --half              encoders.safetensors in F16 (the checkpoint stays F32; `mixshow convert\n"
        "                      IN.safetensors OUT.safetensors --half` converts an existing file)\n"
        "  --steps N           optimizer steps (default 1500)\n"
        "  --batch-text B      captioned images per step (48; every 4th a creature)\n"
        "  --batch-id B        creature renders per step (32, in groups of --per-id 4)\n"
        "  --identities N      training creatures (4096)\n"
        "  --scenes N          base scenes 0..N-1 only (default 0: a fresh scene almost every time)\n"
        "  --lr X              AdamW peak lr (2e-3; warmup 50 steps, weight decay 0.01)\n"
        "  --size S            input side (64); --channels A,B,..  (16,32,64,128)\n"
        "  --layers N          stride-1 units per level (0; each level ends in a stride-2 unit)\n"
        "  --text-width D      text tower width (64; intermediate 4 D)\n"
        "  --text-layers N, --text-heads H, --text-tokens T   its layers (2), heads (2) and\n"
        "                      positions (32; 77 to serve as a model's text encoder: mixshow\n"
        "                      pretrain --text-encoder FILE)\n"
        "  --token-max-norm X  after each update, token rows longer than X are scaled back to X (as\n"
        "                      torch.nn.Embedding(max_norm)): a model's text encoder keeps its rows where\n"
        "                      ED-LoRA's emb_norm_threshold (0.55) expects them (default: none)\n"
        "  --seed S            weights and data (0)\n"
        "  --checkpoint-every N  (100; 0: none)   --resume FILE   continue bit-identically\n"
        "  --threads N         worker threads (results do not depend on it)\n"
        "  --quiet             no progress\n");
}

/* ---- training ---- */
typedef struct {
    const char *out, *resume, *tok_dir;
    int64_t steps, ckpt_every;
    int threads, quiet, half;
    uint64_t seed;
    EvalData d;
    EvalNetConfig c;
    EvalTrainConfig tc;
} EvTrainArgs;

static void ev_progress(int64_t k, int64_t k0, int64_t n, double loss, int hits, int Bt, float temp, double t0) {
    const double el = ms_time() - t0, per = el / (double)(k - k0), eta = per * (double)(n - k);
    fprintf(stderr, "eval encoders: %lld/%lld loss %.4f (mean of the last 20) batch top-1 %d/%d temperature %.4f "
            "%.3f s/step ETA %02d:%02d:%02d\n", (long long)k, (long long)n, loss, hits, Bt, (double)temp, per,
            (int)(eta / 3600), (int)(eta / 60) % 60, (int)eta % 60);
}

/* Everything a resumed run must agree on, as one string (stored in the checkpoint). */
static void ev_recipe(char *buf, size_t cap, const EvTrainArgs *a) {
    const EvalTrainConfig *t = &a->tc;
    const EvalNetConfig *c = &a->c;
    int n = snprintf(buf, cap, "seed=%llu identities=%d Bt=%d Bi=%d per_id=%d char_every=%d lr=%.17g warmup=%lld wd=%.17g "
                     "scenes=%d betas=%.17g,%.17g eps=%.17g tau=%.9g size=%d layers=%d groups=%d pool=%d E=%d id=%d text=%d,%d,%d,%d,%d "
                     "channels=", (unsigned long long)a->seed, a->d.identities, a->d.Bt, a->d.Bi, a->d.per_id, a->d.char_every,
                     t->lr, (long long)t->warmup, t->weight_decay, a->d.scenes, t->beta1, t->beta2, t->adam_eps, (double)t->tau, c->size,
                     c->layers, c->groups, c->text_pool, c->embed_dim, c->id_dim, c->text.hidden_size,
                     c->text.intermediate_size, c->text.num_hidden_layers, c->text.num_attention_heads,
                     c->text.max_position_embeddings);
    for (int i = 0; i < c->n_levels && n > 0 && (size_t)n < cap; i++)
        n += snprintf(buf + n, cap - (size_t)n, "%s%d", i ? "," : "", c->channels[i]);
    if (t->token_max_norm > 0 && n > 0 && (size_t)n < cap)   /* only then: older checkpoints keep their recipe */
        snprintf(buf + n, cap - (size_t)n, " token_max_norm=%.17g", t->token_max_norm);
}

/* The written encoders' token table (not the checkpoint's): rows that never had a gradient are
 * zeroed. The captions come from 2^30 scenes and every creature's renders, too many to list, so the
 * AdamW second moments tell which rows a caption reached: a row's moment stays exactly 0 until
 * its first non-zero gradient, and only weight decay ever touched the others (their random start,
 * shrunk). The moments are in the checkpoint, so a resumed run zeroes the same rows. */
static MsStatus ev_zero_unused_tokens(EvalNet *e, EvalTrainer *t, int quiet) {
    float *m, *v;
    size_t nm;
    const int i = ms_param_find(&e->text, "text_model.embeddings.token_embedding.weight");
    if (i < 0) return ms_errorf(MS_ERR_FORMAT, "eval encoders: the text tower has no token table");
    const MsParam *q = &e->text.p[i];
    const int64_t V = q->shape[0], D = q->shape[1];
    unsigned char *used = (unsigned char *)calloc((size_t)V, 1);
    if (!used) return ms_errorf(MS_ERR_NOMEM, "eval encoders: out of memory");
    evalnet_trainer_moments(t, &m, &v, &nm);
    const float *vt = v + (nm - e->text.mem_bytes / sizeof(float)) + (q->f32 - (const float *)e->text.mem);
    for (int64_t r = 0; r < V; r++)
        for (int64_t d = 0; d < D && !used[r]; d++) used[r] = vt[r * D + d] != 0.0f;
    const int kept = ms_zero_unused_token_rows(&e->text, used);
    free(used);
    if (kept < 0) return MS_ERR_FORMAT;
    if (!quiet) fprintf(stderr, "text encoder: %d of %lld token rows used; the others zeroed (never trained)\n", kept, (long long)V);
    return MS_OK;
}

static MsStatus ev_train(const EvTrainArgs *a) {
    const EvalNetConfig *c = &a->c;
    const int S = c->size, N = a->d.Bt + a->d.Bi;
    EvalNet e;
    EvalTrainer *t = NULL;
    ClipTokenizer tok;
    MsTorchRng *g = (MsTorchRng *)malloc(sizeof *g);
    float *img = (float *)ms_alloc_aligned((size_t)N * 3 * S * S, sizeof(float));
    char (*caps)[EVAL_CAPTION] = (char (*)[EVAL_CAPTION])malloc((size_t)a->d.Bt * EVAL_CAPTION);
    const char **cp = (const char **)malloc((size_t)a->d.Bt * sizeof(char *));
    int *labels = (int *)malloc((size_t)(a->d.Bi ? a->d.Bi : 1) * sizeof(int));
    double *loss = (double *)calloc((size_t)a->steps + 1, sizeof(double));
    char tok_dir[2048], path[2400], recipe[1536];
    FILE *csv = NULL;
    int tok_ok = 0, shipped;
    MsStatus s = MS_OK;
    memset(&e, 0, sizeof e);
    if (!g || !img || !caps || !cp || !labels || !loss) { s = ms_errorf(MS_ERR_NOMEM, "eval encoders: out of memory"); goto done; }
    for (int b = 0; b < a->d.Bt; b++) cp[b] = caps[b];
    if ((s = ms_find_tokenizer(NULL, a->tok_dir, tok_dir, sizeof tok_dir, &shipped)) || (s = ms_clip_tokenizer_load(tok_dir, &tok)))
        goto done;
    tok_ok = 1;
    if ((s = evalnet_create(&e, c))) goto done;
    ms_torch_seed(g, a->seed);                   /* pretrain's initialisation; CLIP's initial temperature 0.07 */
    if ((s = ms_pretrain_init_weights(&e.net, g)) || (s = ms_pretrain_init_weights(&e.text, g))) goto done;
    e.p.logit_scale[0] = (float)log(1.0 / 0.07);
    if ((s = evalnet_trainer_create(&t, &e, &tok, &a->tc, a->d.Bt, a->d.Bi))) goto done;
    ev_recipe(recipe, sizeof recipe, a);
    if (a->resume) {
        if ((s = evalnet_load(a->resume, &e, t, recipe))) goto done;
        if (evalnet_trainer_step_count(t) > a->steps) {
            s = ms_errorf(MS_ERR_ARG, "eval encoders: %s is at step %lld, beyond --steps %lld", a->resume,
                          (long long)evalnet_trainer_step_count(t), (long long)a->steps);
            goto done;
        }
    }
    snprintf(path, sizeof path, "%s/loss.csv", a->out);
    if (!(csv = fopen(path, evalnet_trainer_step_count(t) ? "a" : "w"))) { s = ms_errorf(MS_ERR_IO, "%s: cannot open", path); goto done; }
    if (!evalnet_trainer_step_count(t)) fprintf(csv, "step,loss,clip,supcon,batch_top1,temperature,seconds\n");
    if (!a->quiet)
        fprintf(stderr, "eval encoders: image trunk + heads %zu parameters, text tower %zu; %d captioned + %d identity "
                "images %dx%d per step, %lld steps -> %s\n", ms_param_table_numel(&e.net), ms_param_table_numel(&e.text),
                a->d.Bt, a->d.Bi, S, S, (long long)a->steps, a->out);
    {
        const double t0 = ms_time();
        const int64_t k0 = evalnet_trainer_step_count(t);
        while (evalnet_trainer_step_count(t) < a->steps) {
            EvalStepReport rep;
            const int64_t k = evalnet_trainer_step_count(t) + 1;
            const double ts = ms_time();
            if ((s = eval_world_batch(&a->d, S, k, img, caps, labels)) || (s = evalnet_train_step(t, img, cp, labels, &rep)))
                goto done;
            loss[k - 1] = rep.loss;
            fprintf(csv, "%lld,%.9g,%.9g,%.9g,%d,%.6g,%.4f\n", (long long)k, rep.loss, rep.clip, rep.supcon, rep.clip_correct,
                    (double)rep.temperature, ms_time() - ts);
            fflush(csv);
            if (!a->quiet && (k % 20 == 0 || k == a->steps)) {
                double m = 0.0;
                const int64_t j0 = k > 20 ? k - 20 : 0;
                for (int64_t j = j0; j < k; j++) m += loss[j];
                ev_progress(k, k0, a->steps, m / (double)(k - j0), rep.clip_correct, a->d.Bt, rep.temperature, t0);
            }
            if (a->ckpt_every > 0 && (k % a->ckpt_every == 0 || k == a->steps)) {
                const char *meta[2] = { "recipe", recipe };
                snprintf(path, sizeof path, "%s/checkpoint.safetensors", a->out);
                if ((s = evalnet_save(path, &e, t, meta, 1))) goto done;
            }
        }
    }
    fclose(csv);
    csv = NULL;
    snprintf(path, sizeof path, "%s/loss.svg", a->out);
    if ((s = ms_write_loss_svg(path, loss, evalnet_trainer_step_count(t)))) goto done;
    if ((s = ev_zero_unused_tokens(&e, t, a->quiet))) goto done;   /* after the last checkpoint; held-out on what is written */
    {
        EvalHeldout h;
        char sum[512], js[1024];
        const double th0 = ms_time();
        if ((s = eval_heldout(&e, &tok, a->d.seed, 256, 32, &h))) goto done;
        snprintf(sum, sizeof sum, "caption retrieval top-1 (256 held-out scenes) image->text %.3f text->image %.3f; cosine "
                 "true %.3f other %.3f; identity top-1 (32 creatures, 4 refs) seen %.3f unseen %.3f; verification seen "
                 "%.3f unseen %.3f (threshold %.3f)", h.i2t_top1, h.t2i_top1, h.cos_match, h.cos_mismatch, h.id_top1_seen,
                 h.id_top1_unseen, h.verif_seen, h.verif_unseen, h.threshold);
        if (!a->quiet) fprintf(stderr, "eval encoders: held-out (%.1f s): %s\n", ms_time() - th0, sum);
        snprintf(js, sizeof js, "{\"steps\":%lld,\"scenes\":%d,\"i2t_top1\":%.4f,\"t2i_top1\":%.4f,\"cos_match\":%.4f,"
                 "\"cos_mismatch\":%.4f,\"creatures\":%d,\"id_top1_seen\":%.4f,\"id_top1_unseen\":%.4f,\"verif_seen\":%.4f,"
                 "\"verif_unseen\":%.4f,\"threshold\":%.4f}\n", (long long)evalnet_trainer_step_count(t), h.n_scenes,
                 h.i2t_top1, h.t2i_top1, h.cos_match, h.cos_mismatch, h.n_chars, h.id_top1_seen, h.id_top1_unseen,
                 h.verif_seen, h.verif_unseen, h.threshold);
        snprintf(path, sizeof path, "%s/heldout.json", a->out);
        {
            char tmp[2500];
            FILE *f;
            snprintf(tmp, sizeof tmp, "%s.tmp", path);
            if (!(f = fopen(tmp, "w")) || fputs(js, f) < 0 || fclose(f) != 0 || rename(tmp, path) != 0) {
                s = ms_errorf(MS_ERR_IO, "%s: cannot write", path); goto done;
            }
        }
        const char *meta[4] = { "recipe", recipe, "heldout", sum };
        snprintf(path, sizeof path, "%s/encoders.safetensors", a->out);
        if ((s = evalnet_save_encoders(path, &e, a->half, meta, 2))) goto done;
        if (!a->quiet) fprintf(stderr, "eval encoders: wrote %s%s\n", path, a->half ? " (F16)" : "");
    }
done:
    if (csv) fclose(csv);
    evalnet_trainer_free(t);
    evalnet_free(&e);
    if (tok_ok) clip_tokenizer_free(&tok);
    free(g); ms_free_aligned(img); free(caps); free(cp); free(labels); free(loss);
    return s;
}

/* ---- scoring ---- */
typedef struct { char *file, *prompt, *concepts; } EvLine;
typedef struct { const char *name, *dir; int n; float *z; } EvRef;   /* z (n, id_dim) */

static int ev_is_image(const char *name) {
    const char *dot = strrchr(name, '.');
    char ext[8];
    size_t i = 0;
    if (!dot) return 0;
    for (dot++; *dot && i < sizeof ext - 1; dot++) ext[i++] = (char)tolower((unsigned char)*dot);
    ext[i] = '\0';
    return !strcmp(ext, "png") || !strcmp(ext, "jpg") || !strcmp(ext, "jpeg");
}

static int ev_cmp_str(const void *a, const void *b) { return strcmp(*(char *const *)a, *(char *const *)b); }

/* The reference images of r (sorted by name), embedded. */
static MsStatus ev_ref_load(EvRef *r, const EvalNet *e) {
    char dir[2100], p[2400];
    char **names = NULL;
    size_t n = 0, m = 0;
    const int S = e->cfg.size;
    float *img = NULL;
    snprintf(dir, sizeof dir, "%s/image", r->dir);
    MsStatus s = ms_list_dir(dir, &names, &n);
    if (s) { ms_clear_error(); snprintf(dir, sizeof dir, "%s", r->dir); s = ms_list_dir(dir, &names, &n); }
    if (s) return s;
    for (size_t i = 0; i < n; i++) if (ev_is_image(names[i])) names[m++] = names[i]; else free(names[i]);
    qsort(names, m, sizeof *names, ev_cmp_str);
    if (!m) { s = ms_errorf(MS_ERR_ARG, "--ref %s=%s: no PNG or JPEG images in %s", r->name, r->dir, dir); goto done; }
    img = (float *)ms_alloc_aligned(m * 3 * S * S, sizeof(float));
    r->z = (float *)malloc(m * (size_t)e->cfg.id_dim * sizeof(float));
    if (!img || !r->z) { s = ms_errorf(MS_ERR_NOMEM, "--ref %s: out of memory", r->name); goto done; }
    for (size_t i = 0; i < m && !s; i++) {
        snprintf(p, sizeof p, "%s/%s", dir, names[i]);
        s = eval_image_load(p, S, img + i * 3 * S * S);
    }
    if (!s) s = evalnet_embed_images(e, img, (int)m, NULL, r->z);
    r->n = (int)m;
done:
    for (size_t i = 0; i < m; i++) free(names[i]);
    free(names);
    ms_free_aligned(img);
    return s;
}

/* FILE<TAB>PROMPT[<TAB>CONCEPTS] lines; the strings point into text (modified in place). */
static MsStatus ev_parse_prompts(char *text, const char *path, EvLine **out, int *n) {
    int cap = 0, line = 0;
    *out = NULL; *n = 0;
    for (char *p = text; p && *p;) {
        char *nl = strchr(p, '\n'), *l = p;
        if (nl) *nl = '\0';
        p = nl ? nl + 1 : NULL;
        line++;
        size_t len = strlen(l);
        if (len && l[len - 1] == '\r') l[--len] = '\0';
        if (!len || l[0] == '#') continue;
        char *t1 = strchr(l, '\t');
        if (!t1) { free(*out); return ms_errorf(MS_ERR_FORMAT, "%s:%d: expected FILE<TAB>PROMPT[<TAB>CONCEPTS]", path, line); }
        *t1 = '\0';
        char *t2 = strchr(t1 + 1, '\t');
        if (t2) *t2 = '\0';
        if (*n == cap) {
            cap = cap ? 2 * cap : 64;
            EvLine *x = (EvLine *)realloc(*out, (size_t)cap * sizeof *x);
            if (!x) { free(*out); return ms_errorf(MS_ERR_NOMEM, "%s: out of memory", path); }
            *out = x;
        }
        (*out)[*n].file = l; (*out)[*n].prompt = t1 + 1; (*out)[*n].concepts = t2 ? t2 + 1 : NULL;
        (*n)++;
    }
    if (!*n) return ms_errorf(MS_ERR_FORMAT, "%s: no FILE<TAB>PROMPT lines", path);
    return MS_OK;
}

static MsStatus ev_read_text(const char *path, char **out) {
    FILE *f = fopen(path, "rb");
    long n;
    if (!f) return ms_errorf(MS_ERR_IO, "%s: cannot open", path);
    if (fseek(f, 0, SEEK_END) || (n = ftell(f)) < 0 || n > (1L << 26) || fseek(f, 0, SEEK_SET)) {
        fclose(f);
        return ms_errorf(MS_ERR_IO, "%s: cannot read (or larger than 64 MiB)", path);
    }
    *out = (char *)malloc((size_t)n + 1);
    if (!*out) { fclose(f); return ms_errorf(MS_ERR_NOMEM, "%s: out of memory", path); }
    size_t got = fread(*out, 1, (size_t)n, f);
    fclose(f);
    (*out)[got] = '\0';
    if (got != (size_t)n) { free(*out); return ms_errorf(MS_ERR_IO, "%s: short read", path); }
    return MS_OK;
}

static void csv_field(FILE *f, const char *s) {
    fputc('"', f);
    for (; *s; s++) { if (*s == '"') fputc('"', f); fputc(*s, f); }
    fputc('"', f);
}

/* RFC 4648 base64 of n bytes into f (for the HTML page's self-contained data: URIs). */
static void ev_base64(FILE *f, const uint8_t *b, size_t n) {
    static const char A[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    for (size_t i = 0; i < n; i += 3) {
        const uint32_t v = (uint32_t)b[i] << 16 | (i + 1 < n ? (uint32_t)b[i + 1] << 8 : 0) | (i + 2 < n ? b[i + 2] : 0);
        fputc(A[v >> 18], f);
        fputc(A[(v >> 12) & 63], f);
        fputc(i + 1 < n ? A[(v >> 6) & 63] : '=', f);
        fputc(i + 2 < n ? A[v & 63] : '=', f);
    }
}

static void ev_html_text(FILE *f, const char *s) {
    for (; *s; s++) {
        if (*s == '<') fputs("&lt;", f);
        else if (*s == '>') fputs("&gt;", f);
        else if (*s == '&') fputs("&amp;", f);
        else if (*s == '"') fputs("&quot;", f);
        else fputc(*s, f);
    }
}

/* --sheet: PREFIX.png, every image in the prompts file's order on a grid of `cols` columns, each
 * at the first image's size (others resized, Pillow bilinear), and PREFIX.html, a page that shows
 * those tiles (embedded as data: URIs, so the page is one file) with their prompts and scores. */
static MsStatus ev_sheet(const char *prefix, const char *images, const EvLine *L, int n, const double *ta,
                         const double *ia, double mta, double mia, int nia, int cols) {
    char p[2400], tmp[2500];
    int W = 0, H = 0, rows = (n + cols - 1) / cols, g = 2;
    uint8_t *tiles = NULL, *sheet = NULL;
    MsStatus s = MS_OK;
    FILE *f = NULL;
    for (int i = 0; i < n && !s; i++) {
        MsImage im;
        snprintf(p, sizeof p, "%s/%s", images, L[i].file);
        if ((s = ms_image_read(p, 3, &im))) break;
        if (!tiles) {
            W = im.w; H = im.h;
            if (!(tiles = (uint8_t *)malloc((size_t)n * W * H * 3))) s = ms_errorf(MS_ERR_NOMEM, "eval --sheet: out of memory");
        }
        uint8_t *t = tiles ? tiles + (size_t)i * W * H * 3 : NULL;
        if (!s && im.w == W && im.h == H) memcpy(t, im.data, (size_t)W * H * 3);
        else if (!s) s = pil_resize(t, W, H, (const uint8_t *)im.data, im.w, im.h, 3, PIL_BILINEAR);
        ms_image_free(&im);
    }
    const int SW = cols * (W + g) + g, SH = rows * (H + g) + g;
    if (!s && !(sheet = (uint8_t *)malloc((size_t)SW * SH * 3))) s = ms_errorf(MS_ERR_NOMEM, "eval --sheet: out of memory");
    if (!s) {
        memset(sheet, 90, (size_t)SW * SH * 3);
        for (int i = 0; i < n; i++)
            for (int y = 0; y < H; y++)
                memcpy(sheet + ((size_t)(g + (i / cols) * (H + g) + y) * SW + g + (i % cols) * (W + g)) * 3,
                       tiles + ((size_t)i * H + y) * W * 3, (size_t)W * 3);
        snprintf(p, sizeof p, "%s.png", prefix);
        s = ms_png_write(p, sheet, SW, SH, 3);
    }
    snprintf(p, sizeof p, "%s.html", prefix);
    snprintf(tmp, sizeof tmp, "%s.tmp", p);
    if (!s && !(f = fopen(tmp, "w"))) s = ms_errorf(MS_ERR_IO, "%s: cannot create", tmp);
    if (!s) {
        fprintf(f, "<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>mixshow eval: ");
        ev_html_text(f, images);
        fprintf(f, "</title>\n<style>body{font-family:sans-serif;background:#222;color:#ddd}"
                   ".c{display:inline-block;width:%dpx;margin:6px;vertical-align:top;font-size:12px}"
                   ".c img{width:%dpx;image-rendering:pixelated}</style></head><body>\n", 2 * W, 2 * W);
        fprintf(f, "<h3>mean text alignment %.4f", mta);
        if (nia) fprintf(f, ", mean image alignment %.4f (%d images with concepts)", mia, nia);
        fprintf(f, "</h3>\n");
        for (int i = 0; i < n && !s; i++) {
            uint8_t *png = NULL;
            size_t len = 0;
            if ((s = ms_png_encode(tiles + (size_t)i * W * H * 3, W, H, 3, &png, &len))) break;
            fprintf(f, "<div class=\"c\"><img src=\"data:image/png;base64,");
            ev_base64(f, png, len);
            free(png);
            fprintf(f, "\"><br><b>");
            ev_html_text(f, L[i].file);
            fprintf(f, "</b><br>");
            ev_html_text(f, L[i].prompt);
            fprintf(f, "<br>text %.4f", ta[i]);
            if (!isnan(ia[i])) fprintf(f, ", image %.4f", ia[i]);
            fprintf(f, "</div>\n");
        }
        fprintf(f, "</body></html>\n");
        if (fclose(f) != 0 && !s) s = ms_errorf(MS_ERR_IO, "%s: cannot write", tmp);
        if (!s && rename(tmp, p) != 0) s = ms_errorf(MS_ERR_IO, "%s: cannot rename to %s", tmp, p);
        if (s) remove(tmp);
    }
    free(tiles);
    free(sheet);
    return s;
}

/* Caption retrieval: rank[i] = 1 + the number of distinct prompts other than line i's whose text
 * embedding fits image i better (cosine) than its own; 0 for every line when the file has fewer
 * than two distinct prompts. Returns the number of distinct prompts. u: image embeddings, v: the
 * lines' prompt embeddings (n x E, unit length). */
static int ev_caption_ranks(const EvLine *L, int n, const float *u, const float *v, int E, int *rank) {
    int distinct = 0;
    for (int j = 0; j < n; j++) {          /* rank[j] = 1 while j is its prompt's first line */
        rank[j] = 1;
        for (int q = 0; q < j && rank[j]; q++) rank[j] = strcmp(L[q].prompt, L[j].prompt) != 0;
        distinct += rank[j];
    }
    unsigned char *first = (unsigned char *)malloc(n > 0 ? (size_t)n : 1);
    if (!first) distinct = 0;              /* out of memory: no ranks, as for one prompt */
    for (int j = 0; j < n && first; j++) first[j] = (unsigned char)rank[j];
    for (int i = 0; i < n; i++) {
        rank[i] = distinct < 2 ? 0 : 1;
        if (distinct < 2) continue;
        double own = 0.0;
        for (int k = 0; k < E; k++) own += (double)u[(size_t)i * E + k] * v[(size_t)i * E + k];
        for (int j = 0; j < n; j++) {
            if (!first[j] || !strcmp(L[j].prompt, L[i].prompt)) continue;   /* a repeat, or i's own */
            double c = 0.0;
            for (int k = 0; k < E; k++) c += (double)u[(size_t)i * E + k] * v[(size_t)j * E + k];
            rank[i] += c > own;
        }
    }
    free(first);
    return distinct;
}

static MsStatus ev_write(const char *prefix, const EvLine *L, int n, const double *ta, const double *ia, double mta,
                         double mia, int nia, const int *rank, int distinct) {
    char p[2400], tmp[2500];
    FILE *f;
    MsStatus s = MS_OK;
    /* CSV */
    snprintf(p, sizeof p, "%s.csv", prefix);
    snprintf(tmp, sizeof tmp, "%s.tmp", p);
    if (!(f = fopen(tmp, "w"))) return ms_errorf(MS_ERR_IO, "%s: cannot create", tmp);
    /* the last column: each image's caption rank; on the mean row, the share of rank 1 */
    int top1 = 0;
    for (int i = 0; i < n; i++) top1 += rank[i] == 1;
    fprintf(f, "image,prompt,concepts,text_alignment,image_alignment,caption_rank\n");
    for (int i = 0; i < n; i++) {
        csv_field(f, L[i].file); fputc(',', f); csv_field(f, L[i].prompt); fputc(',', f);
        csv_field(f, L[i].concepts ? L[i].concepts : ""); fprintf(f, ",%.6f,", ta[i]);
        if (!isnan(ia[i])) fprintf(f, "%.6f", ia[i]);
        fputc(',', f);
        if (distinct >= 2) fprintf(f, "%d", rank[i]);
        fputc('\n', f);
    }
    fprintf(f, "\"mean\",\"\",\"\",%.6f,", mta);
    if (nia) fprintf(f, "%.6f", mia);
    fputc(',', f);
    if (distinct >= 2) fprintf(f, "%.6f", (double)top1 / n);
    fputc('\n', f);
    if (fclose(f) != 0 || rename(tmp, p) != 0) { remove(tmp); return ms_errorf(MS_ERR_IO, "%s: cannot write", p); }
    /* JSON */
    JsonValue *root = json_new(JSON_OBJECT), *arr = json_new(JSON_ARRAY);
    if (!root || !arr) { json_free(root); json_free(arr); return ms_errorf(MS_ERR_NOMEM, "eval: out of memory"); }
    for (int i = 0; i < n && !s; i++) {
        JsonValue *o = json_new(JSON_OBJECT);
        if (!o) { s = ms_errorf(MS_ERR_NOMEM, "eval: out of memory"); break; }
        if ((s = json_set(o, "image", json_new_string(L[i].file, strlen(L[i].file)))) ||
            (s = json_set(o, "prompt", json_new_string(L[i].prompt, strlen(L[i].prompt)))) ||
            (s = json_set(o, "text_alignment", json_new_number(ta[i]))) ||
            (s = json_set(o, "image_alignment", isnan(ia[i]) ? json_new(JSON_NULL) : json_new_number(ia[i])))) {
            json_free(o);
            break;
        }
        if (L[i].concepts && (s = json_set(o, "concepts", json_new_string(L[i].concepts, strlen(L[i].concepts))))) { json_free(o); break; }
        if (distinct >= 2 && (s = json_set(o, "caption_rank", json_new_number(rank[i])))) { json_free(o); break; }
        s = json_push(arr, o);
    }
    if (!s) s = json_set(root, "images", arr); else json_free(arr);
    if (!s) s = json_set(root, "mean_text_alignment", json_new_number(mta));
    if (!s) s = json_set(root, "mean_image_alignment", nia ? json_new_number(mia) : json_new(JSON_NULL));
    if (!s) s = json_set(root, "images_with_concepts", json_new_number(nia));
    if (!s) s = json_set(root, "distinct_prompts", json_new_number(distinct));
    if (!s) s = json_set(root, "caption_top1", distinct >= 2 ? json_new_number((double)top1 / n) : json_new(JSON_NULL));
    snprintf(p, sizeof p, "%s.json", prefix);
    if (!s) s = json_write_file(p, root, 2);
    json_free(root);
    return s;
}

typedef struct {
    const char *images, *prompts, *encoders, *tok_dir, *out;
    int n_refs, sheet_cols;           /* sheet_cols > 0: --sheet */
    EvRef refs[64];
} EvArgs;

static MsStatus ev_score(EvArgs *a) {
    EvalNet e;
    ClipTokenizer tok;
    char tok_dir[2048], enc[2048], path[2400], prefix[2100];
    char *text = NULL;
    EvLine *L = NULL;
    int n = 0, tok_ok = 0, net_ok = 0, shipped;
    float *img = NULL, *u = NULL, *z = NULL, *v = NULL;
    double *ta = NULL, *ia = NULL;
    int *rank = NULL;
    const char **prompts = NULL;
    MsStatus s;
    if (a->encoders) snprintf(enc, sizeof enc, "%s", a->encoders);
    else if (!ms_find_data("models/eval-encoders.safetensors", enc, sizeof enc))
        return ms_errorf(MS_ERR_ARG, "eval: no --encoders and no shipped models/eval-encoders.safetensors (train them with "
                         "mixshow eval --train-encoders DIR)");
    if ((s = evalnet_load(enc, &e, NULL, NULL))) return s;
    net_ok = 1;
    if ((s = ms_find_tokenizer(NULL, a->tok_dir, tok_dir, sizeof tok_dir, &shipped)) || (s = ms_clip_tokenizer_load(tok_dir, &tok)))
        goto done;
    tok_ok = 1;
    if (a->prompts) snprintf(path, sizeof path, "%s", a->prompts);
    else snprintf(path, sizeof path, "%s/prompts.txt", a->images);
    if ((s = ev_read_text(path, &text)) || (s = ev_parse_prompts(text, path, &L, &n))) goto done;
    for (int r = 0; r < a->n_refs; r++) if ((s = ev_ref_load(&a->refs[r], &e))) goto done;
    {
        const int S = e.cfg.size, E = e.cfg.embed_dim, Ei = e.cfg.id_dim;
        img = (float *)ms_alloc_aligned((size_t)n * 3 * S * S, sizeof(float));
        u = (float *)malloc((size_t)n * E * sizeof(float));
        v = (float *)malloc((size_t)n * E * sizeof(float));
        z = (float *)malloc((size_t)n * Ei * sizeof(float));
        ta = (double *)malloc((size_t)n * sizeof(double));
        ia = (double *)malloc((size_t)n * sizeof(double));
        prompts = (const char **)malloc((size_t)n * sizeof(char *));
        rank = (int *)malloc((size_t)n * sizeof(int));
        if (!img || !u || !v || !z || !ta || !ia || !prompts || !rank) { s = ms_errorf(MS_ERR_NOMEM, "eval: out of memory"); goto done; }
        for (int i = 0; i < n && !s; i++) {
            snprintf(path, sizeof path, "%s/%s", a->images, L[i].file);
            s = eval_image_load(path, S, img + (size_t)i * 3 * S * S);
            prompts[i] = L[i].prompt;
        }
        if (s || (s = evalnet_embed_images(&e, img, n, u, z)) || (s = evalnet_embed_texts(&e, &tok, prompts, n, v))) goto done;
        double mta = 0.0, mia = 0.0;
        int nia = 0;
        printf("%-32s %8s %8s  prompt\n", "image", "text", "image");
        for (int i = 0; i < n; i++) {
            double c = 0.0, sum = 0.0;
            int nc = 0;
            for (int k = 0; k < E; k++) c += (double)u[(size_t)i * E + k] * v[(size_t)i * E + k];
            ta[i] = c;
            mta += c / n;
            /* image alignment: the named concepts (comma-separated), or the only --ref */
            for (int r = 0; r < a->n_refs; r++) {
                int use = 0;
                if (L[i].concepts && *L[i].concepts) {
                    const char *q = L[i].concepts;
                    const size_t len = strlen(a->refs[r].name);
                    while (*q) {
                        const char *end = strchr(q, ',');
                        const size_t ql = end ? (size_t)(end - q) : strlen(q);
                        use |= ql == len && !strncmp(q, a->refs[r].name, len);
                        q += ql + (end ? 1 : 0);
                    }
                } else use = a->n_refs == 1;
                if (!use) continue;
                double m = 0.0;
                for (int j = 0; j < a->refs[r].n; j++) {
                    double d = 0.0;
                    for (int k = 0; k < Ei; k++) d += (double)z[(size_t)i * Ei + k] * a->refs[r].z[(size_t)j * Ei + k];
                    m += d / a->refs[r].n;
                }
                sum += m;
                nc++;
            }
            if (L[i].concepts && *L[i].concepts && !nc) {
                s = ms_errorf(MS_ERR_ARG, "eval: %s names concepts '%s' but no --ref NAME=DIR matches", L[i].file, L[i].concepts);
                goto done;
            }
            ia[i] = nc ? sum / nc : NAN;
            if (nc) { mia += ia[i]; nia++; }
            printf("%-32s %8.4f ", L[i].file, ta[i]);
            if (nc) printf("%8.4f", ia[i]); else printf("%8s", "-");
            printf("  %s\n", L[i].prompt);
        }
        if (nia) mia /= nia;
        printf("%-32s %8.4f ", "mean", mta);
        if (nia) printf("%8.4f", mia); else printf("%8s", "-");
        printf("  (%d images, %d with concepts)\n", n, nia);
        const int distinct = ev_caption_ranks(L, n, u, v, E, rank);
        if (distinct >= 2) {
            int top1 = 0;
            for (int i = 0; i < n; i++) top1 += rank[i] == 1;
            printf("caption retrieval top-1: %d of %d images (%.3f; chance %.3f: %d distinct prompts)\n", top1, n,
                   (double)top1 / n, 1.0 / distinct, distinct);
        }
        if (a->out) snprintf(prefix, sizeof prefix, "%s", a->out);
        else snprintf(prefix, sizeof prefix, "%s/eval", a->images);
        if ((s = ev_write(prefix, L, n, ta, ia, mta, mia, nia, rank, distinct))) goto done;
        fprintf(stderr, "eval: wrote %s.json and %s.csv\n", prefix, prefix);
        if (a->sheet_cols > 0) {
            if ((s = ev_sheet(prefix, a->images, L, n, ta, ia, mta, mia, nia, a->sheet_cols))) goto done;
            fprintf(stderr, "eval: wrote %s.png and %s.html\n", prefix, prefix);
        }
    }
done:
    for (int r = 0; r < a->n_refs; r++) { free(a->refs[r].z); a->refs[r].z = NULL; }
    free(text); free(L);
    ms_free_aligned(img); free(u); free(v); free(z); free(ta); free(ia); free(prompts); free(rank);
    if (tok_ok) clip_tokenizer_free(&tok);
    if (net_ok) evalnet_free(&e);
    return s;
}

/* "16,32,64" -> v */
static int ev_parse_list(const char *s, int *v, int *n) {
    *n = 0;
    while (*s) {
        char *end;
        long x = strtol(s, &end, 10);
        if (end == s || x < 1 || x > 4096 || *n == MS_MAX_BLOCKS) return 0;
        v[(*n)++] = (int)x;
        s = end;
        if (*s == ',') s++;
        else if (*s) return 0;
    }
    return *n > 0;
}

int cmd_eval(int argc, char **argv) {
    EvTrainArgs t;
    EvArgs a;
    memset(&t, 0, sizeof t);
    memset(&a, 0, sizeof a);
    evalnet_config_default(&t.c);
    evalnet_train_config_default(&t.tc);
    t.steps = 1500; t.ckpt_every = 100;
    t.d.identities = 4096; t.d.Bt = 48; t.d.Bi = 32; t.d.per_id = 4; t.d.char_every = 4;
    for (int i = 1; i < argc; i++) {
        const char *o = argv[i];
        if (!strcmp(o, "--help") || !strcmp(o, "-h")) { eval_usage(stdout); return 0; }
        if (!strcmp(o, "--quiet") || !strcmp(o, "-q")) { t.quiet = 1; continue; }
        if (!strcmp(o, "--sheet")) { if (!a.sheet_cols) a.sheet_cols = 8; continue; }
        if (!strcmp(o, "--half")) { t.half = 1; continue; }
        if (i + 1 >= argc) { fprintf(stderr, "mixshow eval: %s needs a value (see --help)\n", o); return 2; }
        const char *v = argv[++i];
        char *end = NULL;
        long long x = 0;
        int ok = 1;
        if (!strcmp(o, "--train-encoders")) t.out = v;
        else if (!strcmp(o, "--resume")) t.resume = v;
        else if (!strcmp(o, "--tokenizer")) t.tok_dir = a.tok_dir = v;
        else if (!strcmp(o, "--images")) a.images = v;
        else if (!strcmp(o, "--prompts")) a.prompts = v;
        else if (!strcmp(o, "--encoders")) a.encoders = v;
        else if (!strcmp(o, "--out")) a.out = v;
        else if (!strcmp(o, "--ref")) {
            const char *eq = strchr(v, '=');
            ok = eq && eq != v && eq[1] && a.n_refs < 64;
            if (ok) {
                static char names[64][128];
                size_t len = (size_t)(eq - v) < sizeof names[0] - 1 ? (size_t)(eq - v) : sizeof names[0] - 1;
                memcpy(names[a.n_refs], v, len);
                names[a.n_refs][len] = '\0';
                a.refs[a.n_refs].name = names[a.n_refs];
                a.refs[a.n_refs].dir = eq + 1;
                a.n_refs++;
            }
        } else if (!strcmp(o, "--channels")) {
            ok = ev_parse_list(v, t.c.channels, &t.c.n_levels);
        } else if (!strcmp(o, "--lr")) {
            double d = strtod(v, &end);
            ok = end != v && !*end && d >= 0 && d <= 1;
            t.tc.lr = d;
        } else if (!strcmp(o, "--token-max-norm")) {
            double d = strtod(v, &end);
            ok = end != v && !*end && d > 0 && d <= 1000;
            t.tc.token_max_norm = d;
        } else {
            x = strtoll(v, &end, 10);
            ok = end != v && !*end && x >= 0 && x <= 1000000000;
            if (!strcmp(o, "--steps")) t.steps = x;
            else if (!strcmp(o, "--checkpoint-every")) t.ckpt_every = x;
            else if (!strcmp(o, "--seed")) t.seed = t.d.seed = (uint64_t)x;
            else if (!strcmp(o, "--batch-text")) { t.d.Bt = (int)x; ok = ok && x >= 2 && x <= 1024; }
            else if (!strcmp(o, "--batch-id")) { t.d.Bi = (int)x; ok = ok && x >= 2 && x <= 1024; }
            else if (!strcmp(o, "--per-id")) { t.d.per_id = (int)x; ok = ok && x >= 2 && x <= 64; }
            else if (!strcmp(o, "--scenes")) { t.d.scenes = (int)x; }
            else if (!strcmp(o, "--identities")) { t.d.identities = (int)x; ok = ok && x >= 2; }
            else if (!strcmp(o, "--size")) { t.c.size = (int)x; ok = ok && x >= 8 && x <= 1024; }
            else if (!strcmp(o, "--layers")) { t.c.layers = (int)x; ok = ok && x <= 8; }
            else if (!strcmp(o, "--text-width")) {
                t.c.text.hidden_size = (int)x; t.c.text.intermediate_size = 4 * (int)x; t.c.text.projection_dim = t.c.embed_dim;
                ok = ok && x >= 2 && x <= 1024;
            }
            else if (!strcmp(o, "--text-layers")) { t.c.text.num_hidden_layers = (int)x; ok = ok && x >= 1 && x <= 48; }
            else if (!strcmp(o, "--text-heads")) { t.c.text.num_attention_heads = (int)x; ok = ok && x >= 1 && x <= 1024; }
            else if (!strcmp(o, "--text-tokens")) { t.c.text.max_position_embeddings = (int)x; ok = ok && x >= 8 && x <= 77; }
            else if (!strcmp(o, "--threads")) { t.threads = (int)x; ok = ok && x >= 1 && x <= 1024; }
            else if (!strcmp(o, "--sheet-cols")) { a.sheet_cols = (int)x; ok = ok && x >= 1 && x <= 256; }
            else { fprintf(stderr, "mixshow eval: unknown option %s (see --help)\n", o); return 2; }
        }
        if (!ok) { fprintf(stderr, "mixshow eval: %s %s: not a valid value (see --help)\n", o, v); return 2; }
    }
    if (t.threads > 0) ms_set_threads(t.threads);
    MsStatus s;
    if (t.out) {
        if (t.d.Bi % t.d.per_id) { fprintf(stderr, "mixshow eval: --batch-id %d is not a multiple of --per-id %d\n", t.d.Bi, t.d.per_id); return 2; }
        if ((s = evalnet_config_check(&t.c))) { fprintf(stderr, "mixshow eval: %s\n", ms_last_error()); return 2; }
        if (!ev_mkdir(t.out)) { fprintf(stderr, "mixshow eval: %s: cannot create the folder\n", t.out); return 1; }
        s = ev_train(&t);
    } else {
        if (!a.images) { fprintf(stderr, "mixshow eval: --images DIR or --train-encoders DIR is required (see --help)\n"); return 2; }
        s = ev_score(&a);
    }
    if (s) { fprintf(stderr, "mixshow eval: %s\n", ms_last_error()); return 1; }
    return 0;
}
