/* tools/cmd_train.c — `mixshow train`: ED-LoRA training, the single-client stage of Mix-of-Show,
 * as the official train_edlora.py runs it (the step itself is ms_trainer_step in mixshow.c; this
 * file reads the options, the data and the replay dump, shows progress, writes checkpoints,
 * traces and the ED-LoRA file).
 *
 * --replay DUMP.safetensors / --trace OUT.safetensors: the fixed verification interface of
 * issue 10 (keys in train_usage below), driven by tools/ref/gen_train_golden.py's dumps. */
#if !defined(_WIN32) && !defined(_POSIX_C_SOURCE)
#define _POSIX_C_SOURCE 200809L         /* mkdir, isatty: in the guarded sections below */
#endif
#include "tools/tools.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static void train_usage(FILE *f) {
    fprintf(f,
        "usage: mixshow train --config X.yml [options]\n"
        "       mixshow train --model M --concept-list C.json --words \"<w1>+<w2>\" [options]\n"
        "Trains one concept as ED-LoRA (layer-wise token embeddings + rank-4 LoRA on every attention\n"
        "Linear of text encoder and UNet), exactly as Mix-of-Show's train_edlora.py does with the same\n"
        "options file (float32 everywhere; mixed_precision is read and ignored).\n\n"
        "options:\n"
        "  --config X.yml        official training options (options/train/EDLoRA/...)\n"
        "  --model PATH          base model (diffusers folder or single file); overrides\n"
        "                        models.pretrained_path\n"
        "  --tokenizer DIR       CLIP vocab.json + merges.txt (default: the model's, else the shipped)\n"
        "  --model-config DIR    a diffusers folder whose configs describe a single-file model\n"
        "                        (default: the file's metadata, else inferred from its shapes)\n"
        "  --set key.sub=VALUE   override any option (VALUE in YAML flow syntax); repeatable\n"
        "plain flags (no --config needed; defaults = the paper's human-concept settings):\n"
        "  --concept-list FILE   datasets.train.concept_list (instance_prompt <TOK>, folders)\n"
        "  --words W1+W2         models.new_concept_token; <TOK> becomes \"W1 W2\" (default\n"
        "                        <concept1>+<concept2>)\n"
        "  --init I1+I2          models.initializer_token (default <rand-0.013>+man)\n"
        "  --name N, --batch B, --repeat R   name, batch_size_per_gpu, dataset_enlarge_ratio\n"
        "  --out DIR             output folder (default experiments/<name>/)\n"
        "  --seed S              manual_seed (default: the config's)\n"
        "  --steps N             stop after N steps (default: the config's length)\n"
        "  --checkpoint-every N  write DIR/checkpoint.safetensors every N steps (default 100)\n"
        "  --resume FILE         continue from a checkpoint, bit-identically\n"
        "  --threads N           worker threads (results do not depend on it)\n"
        "  --weights f16         keep the frozen weights 16-bit in memory (converted per op; the\n"
        "                        numbers of float32 on the 16-bit-rounded weights): SD 1.5 at\n"
        "                        512² then trains in about 4 GB instead of 6.3\n"
        "  --no-val              no validation images (official: val.val_during_save, at every\n"
        "                        save: each alpha of val.alpha_list, the val_vis prompts)\n"
        "  --val-samples N       validation images per prompt (default num_samples_per_prompt)\n"
        "  --replay DUMP         take every random draw, the data and the initial parameters from\n"
        "                        DUMP (keys step1.param_in.<name>, step{k}.images [B,3,H,W],\n"
        "                        step{k}.masks / step{k}.img_masks [B,1,H/8,W/8] F64,\n"
        "                        step{k}.input_ids [B*16,77] I64, step{k}.vae_eps, step{k}.noise_randn\n"
        "                        [B,4,h,w], step{k}.noise_offset_randn [B,4,1,1], step{k}.timesteps [B]\n"
        "                        I64); runs as many steps as DUMP has. The options come from --config,\n"
        "                        else from DUMP's metadata \"config\".\n"
        "  --trace OUT           write step{k}.loss, .loss_mse, .loss_attn (F64 [1]), step{k}.lr [3],\n"
        "                        step{k}.norm_mean (F64 [1]), step{k}.stop_emb_update (I64 [1]),\n"
        "                        step{k}.model_pred, step1.grad.<name>, final.<name>\n"
        "  --quiet               no progress bar\n"
        "Parameter names: token_embedding.concept [T,D]; text_encoder.<module>.lora_down.weight /\n"
        ".lora_up.weight; unet.<module>.lora_down.weight / .lora_up.weight (official .pth keys).\n");
}

#if !defined(_WIN32)
#include <sys/stat.h>
#include <sys/types.h>
#include <unistd.h>
static int stderr_tty(void) { return isatty(2); }
#else
static int stderr_tty(void) { return 0; }
#endif

/* ---- reading the dump ---- */
static uint64_t le_u64(const unsigned char *p) {
    uint64_t v = 0;
    for (int i = 7; i >= 0; i--) v = v << 8 | p[i];
    return v;
}

/* A tensor of the dump with dtype and numel checked. */
static MsStatus dump_tensor(const StFile *f, const char *name, StDtype dt, size_t n, const StTensor **out) {
    const StTensor *t = st_find(f, name);
    if (!t) return ms_errorf(MS_ERR_FORMAT, "%s: no tensor '%s'", f->origin, name);
    if (t->dtype != dt)
        return ms_errorf(MS_ERR_FORMAT, "%s: '%s' is %s, expected %s", f->origin, name, st_dtype_name(t->dtype), st_dtype_name(dt));
    if (t->numel != n)
        return ms_errorf(MS_ERR_FORMAT, "%s: '%s' has %zu values, expected %zu", f->origin, name, t->numel, n);
    *out = t;
    return MS_OK;
}
static MsStatus dump_f64(const StFile *f, const char *name, double *out, size_t n) {
    const StTensor *t;
    MsStatus s = dump_tensor(f, name, ST_F64, n, &t);
    if (s) return s;
    for (size_t i = 0; i < n; i++) { uint64_t u = le_u64(t->data + 8 * i); memcpy(&out[i], &u, 8); }
    return MS_OK;
}
static MsStatus dump_i64(const StFile *f, const char *name, int64_t *out, size_t n) {
    const StTensor *t;
    MsStatus s = dump_tensor(f, name, ST_I64, n, &t);
    if (s) return s;
    for (size_t i = 0; i < n; i++) out[i] = (int64_t)le_u64(t->data + 8 * i);
    return MS_OK;
}
static MsStatus dump_f32(const StFile *f, const char *name, float *out, size_t n) {
    return st_read_f32(f, name, out, n, -1, NULL);
}

/* ---- the trace: entries with owned data ---- */
typedef struct {
    StEntry *e;
    void **own;
    char **names;
    size_t n, cap;
} Trace;

static MsStatus trace_add(Trace *tr, const char *name, StDtype dt, int ndim, const int64_t *shape, const void *data,
                          size_t bytes) {
    if (tr->n == tr->cap) {
        size_t cap = tr->cap ? 2 * tr->cap : 64;
        StEntry *e = (StEntry *)realloc(tr->e, cap * sizeof *e);
        if (!e) return ms_errorf(MS_ERR_NOMEM, "trace: out of memory");
        tr->e = e;
        void **o = (void **)realloc(tr->own, cap * sizeof *o);
        if (!o) return ms_errorf(MS_ERR_NOMEM, "trace: out of memory");
        tr->own = o;
        char **nm = (char **)realloc(tr->names, cap * sizeof *nm);
        if (!nm) return ms_errorf(MS_ERR_NOMEM, "trace: out of memory");
        tr->names = nm;
        tr->cap = cap;
    }
    void *copy = malloc(bytes ? bytes : 1);
    char *nm = (char *)malloc(strlen(name) + 1);
    if (!copy || !nm) { free(copy); free(nm); return ms_errorf(MS_ERR_NOMEM, "trace: out of memory"); }
    memcpy(copy, data, bytes);
    strcpy(nm, name);
    StEntry *e = &tr->e[tr->n];
    memset(e, 0, sizeof *e);
    e->name = nm; e->dtype = dt; e->ndim = ndim;
    for (int i = 0; i < ndim; i++) e->shape[i] = shape[i];
    if (dt == ST_F32) e->f32 = (const float *)copy; else e->raw = copy;
    tr->own[tr->n] = copy;
    tr->names[tr->n] = nm;
    tr->n++;
    return MS_OK;
}
static MsStatus trace_f64(Trace *tr, const char *name, const double *v, int64_t n) {
    return trace_add(tr, name, ST_F64, 1, &n, v, (size_t)n * sizeof(double));
}
static MsStatus trace_params(Trace *tr, const MsTrainer *t, const char *prefix, int grads) {
    for (int i = 0; i < ms_trainer_n_params(t); i++) {
        const char *nm;
        float *d, *g;
        int64_t sh[2];
        char key[512];
        ms_trainer_param(t, i, &nm, &d, &g, sh);
        snprintf(key, sizeof key, "%s%s", prefix, nm);
        MsStatus s = trace_add(tr, key, ST_F32, 2, sh, grads ? g : d, (size_t)sh[0] * sh[1] * sizeof(float));
        if (s) return s;
    }
    return MS_OK;
}
static void trace_free(Trace *tr) {
    for (size_t i = 0; i < tr->n; i++) { free(tr->own[i]); free(tr->names[i]); }
    free(tr->e); free(tr->own); free(tr->names);
    memset(tr, 0, sizeof *tr);
}

/* ---- options ---- */
typedef struct {
    const char *config, *model, *out, *replay, *trace, *resume, *tokenizer, *model_config;
    const char *sets[64];
    int n_sets;
    char flag_sets[16][1100];        /* --set equivalents of the plain flags */
    int n_flag_sets;
    int has_seed, quiet, threads, no_val, val_samples, keep_half;
    uint64_t seed;
    int64_t max_steps, checkpoint_every;
    char config_dir[1024];          /* folder of the .yml (relative data paths fall back to it) */
} TrainArgs;

/* The replay run: data, draws and initial parameters from the dump. */
static MsStatus train_replay(const TrainArgs *a, MsTrainConfig *mc, MsModel *m, ClipTokenizer *tok) {
    StFile f;
    MsStatus s = st_open(&f, a->replay);
    MsTrainer *t = NULL;
    Trace tr;
    float *images = NULL, *eps = NULL, *noise = NULL, *off = NULL;
    double *masks = NULL, *img_masks = NULL;
    int64_t *ids64 = NULL, ts[64];
    int32_t *ids = NULL;
    memset(&tr, 0, sizeof tr);
    if (s) return s;
    const StTensor *im = st_find(&f, "step1.images");
    if (!im || im->ndim != 4 || im->shape[1] != 3) {
        s = ms_errorf(MS_ERR_FORMAT, "%s: no step1.images of shape [B,3,H,W]", a->replay);
        goto done;
    }
    const int B = (int)im->shape[0], H = (int)im->shape[2], W = (int)im->shape[3];
    int S = 0;
    for (;;) {
        char key[64];
        snprintf(key, sizeof key, "step%d.images", S + 1);
        if (!st_find(&f, key)) break;
        S++;
    }
    if (B < 1 || B > 64) { s = ms_errorf(MS_ERR_FORMAT, "%s: batch %d (expected 1..64)", a->replay, B); goto done; }
    if (mc->total_iter <= 0) mc->total_iter = S;
    if ((s = ms_trainer_create(&t, m, tok, mc, B, H, W, NULL))) goto done;
    /* initial parameters */
    for (int i = 0; i < ms_trainer_n_params(t); i++) {
        const char *nm;
        float *d;
        int64_t sh[2];
        char key[512];
        ms_trainer_param(t, i, &nm, &d, NULL, sh);
        snprintf(key, sizeof key, "step1.param_in.%s", nm);
        if ((s = st_read_f32(&f, key, d, (size_t)sh[0] * sh[1], 2, sh))) goto done;
    }
    {
        const int L = ms_trainer_tokens(t, NULL), f8 = 1 << (m->vae_config.n_blocks - 1);
        const int h = H / f8, w = W / f8, C = m->unet_config.in_channels;
        const size_t ni = (size_t)B * 3 * H * W, nm = (size_t)B * h * w, nl = (size_t)B * C * h * w;
        images = (float *)malloc(ni * sizeof(float));
        eps = (float *)malloc(nl * sizeof(float));
        noise = (float *)malloc(nl * sizeof(float));
        off = (float *)malloc((size_t)B * C * sizeof(float));
        masks = (double *)malloc(nm * sizeof(double));
        img_masks = (double *)malloc(nm * sizeof(double));
        ids64 = (int64_t *)malloc((size_t)B * L * 77 * sizeof(int64_t));
        ids = (int32_t *)malloc((size_t)B * L * 77 * sizeof(int32_t));
        if (!images || !eps || !noise || !off || !masks || !img_masks || !ids64 || !ids) {
            s = ms_errorf(MS_ERR_NOMEM, "train: out of memory"); goto done;
        }
        for (int k = 1; k <= S; k++) {
            char key[96];
            MsTrainBatch bt;
            MsStepDraws dr;
            MsStepReport rep;
            const char *prompts[64];
            memset(&bt, 0, sizeof bt); memset(&dr, 0, sizeof dr);
            for (int b = 0; b < B; b++) prompts[b] = "";
#define KEY(x) (snprintf(key, sizeof key, "step%d." x, k), key)
            if ((s = dump_f32(&f, KEY("images"), images, ni))) goto done;
            if ((s = dump_f64(&f, KEY("masks"), masks, nm))) goto done;
            if (st_find(&f, KEY("img_masks"))) { if ((s = dump_f64(&f, key, img_masks, nm))) goto done; }
            else memcpy(img_masks, masks, nm * sizeof(double));
            if ((s = dump_i64(&f, KEY("input_ids"), ids64, (size_t)B * L * 77))) goto done;
            for (size_t i = 0; i < (size_t)B * L * 77; i++) {
                if (ids64[i] < 0 || ids64[i] > INT32_MAX) { s = ms_errorf(MS_ERR_FORMAT, "%s: %s holds id %lld", a->replay, key, (long long)ids64[i]); goto done; }
                ids[i] = (int32_t)ids64[i];
            }
            if ((s = dump_f32(&f, KEY("vae_eps"), eps, nl))) goto done;
            if ((s = dump_f32(&f, KEY("noise_randn"), noise, nl))) goto done;
            if (mc->has_noise_offset && (s = dump_f32(&f, KEY("noise_offset_randn"), off, (size_t)B * C))) goto done;
            if ((s = dump_i64(&f, KEY("timesteps"), ts, (size_t)B))) goto done;
#undef KEY
            bt.B = B; bt.H = H; bt.W = W; bt.images = images; bt.masks = masks; bt.img_masks = img_masks;
            bt.prompts = prompts;
            dr.input_ids = ids; dr.vae_eps = eps; dr.noise_randn = noise; dr.noise_offset_randn = off; dr.timesteps = ts;
            if ((s = ms_trainer_step(t, &bt, &dr, NULL, &rep))) goto done;
            if (!a->quiet)
                fprintf(stderr, "step %d/%d: loss %.8g (mse %.8g, attn %.8g), lr %.3g %.3g %.3g\n", k, S, rep.loss,
                        rep.loss_mse, rep.loss_attn, rep.lr[0], rep.lr[1], rep.lr[2]);
            if (a->trace) {
                int64_t sh[4] = { B, m->unet_config.out_channels, h, w };
                snprintf(key, sizeof key, "step%d.loss", k);
                if ((s = trace_f64(&tr, key, &rep.loss, 1))) goto done;
                snprintf(key, sizeof key, "step%d.loss_mse", k);
                if ((s = trace_f64(&tr, key, &rep.loss_mse, 1))) goto done;
                snprintf(key, sizeof key, "step%d.loss_attn", k);
                if ((s = trace_f64(&tr, key, &rep.loss_attn, 1))) goto done;
                snprintf(key, sizeof key, "step%d.lr", k);
                if ((s = trace_f64(&tr, key, rep.lr, 3))) goto done;
                snprintf(key, sizeof key, "step%d.norm_mean", k);
                if ((s = trace_f64(&tr, key, &rep.emb_norm_mean, 1))) goto done;
                {
                    int64_t one = 1, fz = rep.emb_frozen;
                    snprintf(key, sizeof key, "step%d.stop_emb_update", k);
                    if ((s = trace_add(&tr, key, ST_I64, 1, &one, &fz, sizeof fz))) goto done;
                }
                snprintf(key, sizeof key, "step%d.model_pred", k);
                if ((s = trace_add(&tr, key, ST_F32, 4, sh, rep.model_pred, (size_t)B * sh[1] * h * w * sizeof(float)))) goto done;
                if (k == 1 && (s = trace_params(&tr, t, "step1.grad.", 1))) goto done;
            }
        }
    }
    if (a->trace) {
        const char *meta[4] = { "format", "mixshow train --trace", "steps", NULL };
        char nsteps[32];
        snprintf(nsteps, sizeof nsteps, "%d", S);
        meta[3] = nsteps;
        if ((s = trace_params(&tr, t, "final.", 0))) goto done;
        if ((s = st_write(a->trace, tr.e, tr.n, meta, 2))) goto done;
    }
done:
    trace_free(&tr);
    free(images); free(eps); free(noise); free(off); free(masks); free(img_masks); free(ids64); free(ids);
    ms_trainer_free(t);
    st_close(&f);
    return s;
}



/* Without --config: mixshow's defaults, the values of the paper's human-concept runs (the
 * official options 8101_EDLoRA_potter: ED-LoRA, rank 4, lr 1e-3 / 1e-5 / 1e-4, attention
 * regularisation 0.01 with masks, noise offset 0.01, 500 repeats, batch 2, 512² crops),
 * completed by the plain flags (--concept-list, --words, --init, ...) as --set would. */
static const char TRAIN_DEFAULT_YML[] =
    "name: edlora\n"
    "manual_seed: 0\n"
    "mixed_precision: 'no'\n"
    "gradient_accumulation_steps: 1\n"
    "datasets:\n"
    "  train:\n"
    "    name: LoraDataset\n"
    "    concept_list: ~\n"
    "    use_caption: true\n"
    "    use_mask: true\n"
    "    instance_transform:\n"
    "      - { type: HumanResizeCropFinalV3, size: 512, crop_p: 0.5 }\n"
    "      - { type: ToTensor }\n"
    "      - { type: Normalize, mean: [ 0.5 ], std: [ 0.5 ] }\n"
    "      - { type: ShuffleCaption, keep_token_num: 1 }\n"
    "      - { type: EnhanceText, enhance_type: human }\n"
    "    replace_mapping:\n"
    "      <TOK>: <concept1> <concept2>\n"
    "    batch_size_per_gpu: 2\n"
    "    dataset_enlarge_ratio: 500\n"
    "models:\n"
    "  pretrained_path: ''\n"
    "  enable_edlora: true\n"
    "  finetune_cfg:\n"
    "    text_embedding: { enable_tuning: true, lr: !!float 1e-3 }\n"
    "    text_encoder: { enable_tuning: true, lora_cfg: { rank: 4, alpha: 1.0, where: CLIPAttention }, lr: !!float 1e-5 }\n"
    "    unet: { enable_tuning: true, lora_cfg: { rank: 4, alpha: 1.0, where: Attention }, lr: !!float 1e-4 }\n"
    "  new_concept_token: <concept1>+<concept2>\n"
    "  initializer_token: <rand-0.013>+man\n"
    "  noise_offset: 0.01\n"
    "  attn_reg_weight: 0.01\n"
    "  reg_full_identity: false\n"
    "  use_mask_loss: true\n"
    "  gradient_checkpoint: false\n"
    "  enable_xformers: false\n"
    "path:\n"
    "  pretrain_network: ~\n"
    "train:\n"
    "  optim_g: { type: AdamW, lr: 0.0, weight_decay: 0.01, betas: [ 0.9, 0.999 ] }\n"
    "  unet_kv_drop_rate: 0\n"
    "  scheduler: linear\n"
    "  emb_norm_threshold: !!float 5.5e-1\n"
    "val:\n"
    "  val_during_save: false\n"
    "  compose_visualize: false\n"
    "  alpha_list: [ 0, 0.7, 1.0 ]\n"
    "  sample: { num_inference_steps: 50, guidance_scale: 7.5 }\n"
    "logger:\n"
    "  print_freq: 10\n"
    "  save_checkpoint_freq: !!float 10000\n";

/* ---- the normal run: options, data, steps, checkpoints, outputs ---- */
static int ensure_dir(const char *path) {
#if defined(_WIN32)
    (void)path;
    return 1;
#else
    char tmp[2048];
    size_t n = strlen(path);
    if (n == 0 || n >= sizeof tmp) return 0;
    memcpy(tmp, path, n + 1);
    for (size_t i = 1; i <= n; i++)
        if (tmp[i] == '/' || tmp[i] == '\0') {
            char c = tmp[i];
            tmp[i] = '\0';
            mkdir(tmp, 0777);
            tmp[i] = c;
        }
    struct stat st;
    return stat(path, &st) == 0 && S_ISDIR(st.st_mode);
#endif
}

/* The ED-LoRA file (trainer_edlora.py delta_state_dict, saved as {'params': ...}). */
static MsStatus save_edlora(const MsTrainer *t, const MsTrainConfig *mc, const char *path) {
    EdloraFile f;
    MsStatus s = MS_OK;
    int first;
    const int L = ms_trainer_tokens(t, &first);
    memset(&f, 0, sizeof f);
    for (int i = 0; !s && i < ms_trainer_n_params(t); i++) {
        const char *nm;
        float *d;
        int64_t sh[2];
        ms_trainer_param(t, i, &nm, &d, NULL, sh);
        if (!strcmp(nm, "token_embedding.concept")) {
            for (int w = 0; !s && w < mc->n_words; w++)
                s = edlora_add_embedding(&f, mc->words[w], L, (int)sh[1], d + (size_t)w * L * sh[1]);
            continue;
        }
        const char *dot = strstr(nm, ".lora_down.weight");
        if (!dot) continue;                                  /* the up half comes with its down */
        int is_unet = !strncmp(nm, "unet.", 5);
        const char *mod = nm + (is_unet ? 5 : 13);           /* "unet." / "text_encoder." */
        char name[MS_KEY_MAX];
        size_t ml = (size_t)(dot - mod);
        if (ml >= sizeof name) return ms_errorf(MS_ERR_ARG, "train: module name too long: %s", nm);
        memcpy(name, mod, ml);
        name[ml] = '\0';
        const char *nu;
        float *up;
        int64_t shu[2];
        ms_trainer_param(t, i + 1, &nu, &up, NULL, shu);
        s = edlora_add_module(&f, is_unet, name, (int)sh[0], (int)sh[1], (int)shu[0], d, up);
    }
    if (!s) s = edlora_write(path, &f);
    edlora_free(&f);
    return s;
}

/* The loss curve as CSV (written as the run goes) and as an SVG plot (at the end). */
MsStatus ms_write_loss_svg(const char *path, const double *loss, int64_t n) {
    char tmp[2400];
    FILE *f;
    double lo = HUGE_VAL, hi = -HUGE_VAL;
    for (int64_t i = 0; i < n; i++) if (loss[i] == loss[i]) { lo = fmin(lo, loss[i]); hi = fmax(hi, loss[i]); }
    if (n < 1 || !(hi >= lo)) return MS_OK;
    if (hi == lo) { hi += 0.5; lo -= 0.5; }
    snprintf(tmp, sizeof tmp, "%s.tmp", path);
    if (!(f = fopen(tmp, "w"))) return ms_errorf(MS_ERR_IO, "%s: cannot open for writing", tmp);
    const double W = 800, H = 400, x0 = 60, y0 = 20, pw = 720, ph = 340;
    fprintf(f, "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"%g\" height=\"%g\" font-family=\"sans-serif\" font-size=\"12\">\n", W, H);
    fprintf(f, "<rect width=\"100%%\" height=\"100%%\" fill=\"white\"/>\n");
    fprintf(f, "<rect x=\"%g\" y=\"%g\" width=\"%g\" height=\"%g\" fill=\"none\" stroke=\"#888\"/>\n", x0, y0, pw, ph);
    fprintf(f, "<text x=\"%g\" y=\"%g\">%.4g</text><text x=\"%g\" y=\"%g\">%.4g</text>\n", 2.0, y0 + 10, hi, 2.0, y0 + ph, lo);
    fprintf(f, "<text x=\"%g\" y=\"%g\">step 1</text><text x=\"%g\" y=\"%g\" text-anchor=\"end\">step %lld</text>\n",
            x0, y0 + ph + 16, x0 + pw, y0 + ph + 16, (long long)n);
    fprintf(f, "<text x=\"%g\" y=\"14\" text-anchor=\"middle\">training loss per step</text>\n", x0 + pw / 2);
    fprintf(f, "<polyline fill=\"none\" stroke=\"#1f77b4\" stroke-width=\"1\" points=\"");
    for (int64_t i = 0; i < n; i++) {
        if (loss[i] != loss[i]) continue;
        double x = x0 + (n > 1 ? pw * (double)i / (double)(n - 1) : pw / 2), y = y0 + ph * (hi - loss[i]) / (hi - lo);
        fprintf(f, "%.1f,%.1f ", x, y);
    }
    fprintf(f, "\"/>\n</svg>\n");
    if (fclose(f) != 0 || rename(tmp, path) != 0) { remove(tmp); return ms_errorf(MS_ERR_IO, "%s: cannot write", path); }
    return MS_OK;
}

static void progress(int64_t k, int64_t n, const MsStepReport *r, double t0, int tty) {
    double el = ms_time() - t0, per = el / (double)k, eta = per * (double)(n - k);
    char bar[31];
    int fill = n > 0 ? (int)(30 * k / n) : 30;
    for (int i = 0; i < 30; i++) bar[i] = i < fill ? '#' : '.';
    bar[30] = '\0';
    fprintf(stderr, "%s[%s] %lld/%lld loss %.4f (mse %.4f) %.2f s/step ETA %02d:%02d:%02d%s", tty ? "\r" : "", bar,
            (long long)k, (long long)n, r->loss, r->loss_mse, per, (int)(eta / 3600), (int)(eta / 60) % 60, (int)eta % 60,
            tty ? "" : "\n");
    fflush(stderr);
}

/* Checkpoint: trainer state, both generators, the loader's position and a pending lookahead
 * batch, so that --resume continues bit-identically. */
static MsStatus save_checkpoint(const char *path, MsTrainer *t, const MsTorchRng *g, const PyRandom *py,
                                const TrainLoader *l, int S) {
    size_t nst = ms_trainer_state_floats(t);
    float *st = (float *)malloc(nst * sizeof(float));
    int64_t step;
    int stop;
    MsStatus s;
    if (!st) return ms_errorf(MS_ERR_NOMEM, "checkpoint: out of memory");
    ms_trainer_state_io(t, st, 1, &step, &stop);
    uint32_t gmt[624], pmt[624];
    for (int i = 0; i < 624; i++) { gmt[i] = g->mt[i]; pmt[i] = py->mt[i]; }
    double gnorm = g->normal;
    int64_t ints[12] = { step, stop, g->next, (int64_t)g->seed, g->has_normal, py->index, l->epoch, (int64_t)l->next_batch,
                         (int64_t)l->base_seed, (int64_t)l->sampler_seed, l->in_epoch, l->have_pending };
    StEntry e[10];
    size_t ne = 0;
    memset(e, 0, sizeof e);
#define ENT(nm, dt, n0, ptr) (e[ne].name = nm, e[ne].dtype = dt, e[ne].ndim = 1, e[ne].shape[0] = (int64_t)(n0), e[ne].raw = ptr, ne++)
    ENT("trainer.state", ST_F32, nst, NULL); e[ne - 1].f32 = st; e[ne - 1].raw = NULL;
    ENT("torch_rng.mt", ST_U32, 624, gmt);
    ENT("torch_rng.normal", ST_F64, 1, &gnorm);
    ENT("py_rng.mt", ST_U32, 624, pmt);
    ENT("ints", ST_I64, 12, ints);
    if (l->in_epoch && l->perm) ENT("loader.perm", ST_I64, l->n, l->perm);
    if (l->have_pending) {
        size_t bs = l->batch_size;
        ENT("loader.images", ST_F32, bs * l->img_numel, NULL); e[ne - 1].f32 = l->p_images; e[ne - 1].raw = NULL;
        ENT("loader.masks", ST_F64, bs * l->mask_numel, l->p_masks);
        ENT("loader.img_masks", ST_F64, bs * l->mask_numel, l->p_img_masks);
        ENT("loader.indices", ST_U64, bs, l->p_indices);
    }
#undef ENT
    /* pending prompts as metadata: "prompt<i>" */
    const char *meta[2 + 2 * 64];
    char keys[64][16], nsteps[32];
    size_t nm = 0;
    snprintf(nsteps, sizeof nsteps, "%d", S);
    meta[nm++] = "format"; meta[nm++] = "mixshow train checkpoint 1";
    if (l->have_pending)
        for (size_t b = 0; b < l->batch_size && b < 63; b++) {
            snprintf(keys[b], sizeof keys[b], "prompt%zu", b);
            meta[nm++] = keys[b]; meta[nm++] = l->p_prompts[b] ? l->p_prompts[b] : "";
        }
    (void)nsteps;
    s = st_write(path, e, ne, meta, nm / 2);
    free(st);
    return s;
}

static MsStatus load_checkpoint(const char *path, MsTrainer *t, MsTorchRng *g, PyRandom *py, TrainLoader *l) {
    StFile f;
    MsStatus s = st_open(&f, path);
    if (s) return s;
    size_t nst = ms_trainer_state_floats(t);
    float *st = (float *)malloc(nst * sizeof(float));
    int64_t ints[12], step;
    int stop;
    double gnorm;
    const StTensor *x;
    if (!st) { st_close(&f); return ms_errorf(MS_ERR_NOMEM, "resume: out of memory"); }
    if ((s = st_read_f32(&f, "trainer.state", st, nst, -1, NULL))) goto done;
    if ((s = dump_i64(&f, "ints", ints, 12))) goto done;
    if ((s = dump_f64(&f, "torch_rng.normal", &gnorm, 1))) goto done;
    if ((s = dump_tensor(&f, "torch_rng.mt", ST_U32, 624, &x))) goto done;
    for (int i = 0; i < 624; i++) g->mt[i] = (uint32_t)x->data[4 * i] | (uint32_t)x->data[4 * i + 1] << 8 |
                                          (uint32_t)x->data[4 * i + 2] << 16 | (uint32_t)x->data[4 * i + 3] << 24;
    if ((s = dump_tensor(&f, "py_rng.mt", ST_U32, 624, &x))) goto done;
    for (int i = 0; i < 624; i++) py->mt[i] = (uint32_t)x->data[4 * i] | (uint32_t)x->data[4 * i + 1] << 8 |
                                           (uint32_t)x->data[4 * i + 2] << 16 | (uint32_t)x->data[4 * i + 3] << 24;
    step = ints[0]; stop = (int)ints[1];
    g->next = (int)ints[2]; g->seed = (uint64_t)ints[3]; g->has_normal = (int)ints[4]; g->normal = gnorm;
    py->index = (int)ints[5];
    l->epoch = ints[6]; l->next_batch = (size_t)ints[7]; l->base_seed = (uint64_t)ints[8];
    l->sampler_seed = (uint64_t)ints[9]; l->in_epoch = (int)ints[10]; l->have_pending = (int)ints[11];
    if (l->in_epoch && (s = dump_i64(&f, "loader.perm", l->perm, l->n))) goto done;
    if (l->have_pending) {
        size_t bs = l->batch_size;
        if ((s = st_read_f32(&f, "loader.images", l->p_images, bs * l->img_numel, -1, NULL))) goto done;
        if ((s = dump_f64(&f, "loader.masks", l->p_masks, bs * l->mask_numel))) goto done;
        if ((s = dump_f64(&f, "loader.img_masks", l->p_img_masks, bs * l->mask_numel))) goto done;
        if ((s = dump_tensor(&f, "loader.indices", ST_U64, bs, &x))) goto done;
        for (size_t b = 0; b < bs; b++) {
            char key[16];
            const char *pv;
            l->p_indices[b] = (size_t)le_u64(x->data + 8 * b);
            snprintf(key, sizeof key, "prompt%zu", b);
            pv = st_meta(&f, key);
            free(l->p_prompts[b]);
            l->p_prompts[b] = (char *)malloc(strlen(pv ? pv : "") + 1);
            if (!l->p_prompts[b]) { s = ms_errorf(MS_ERR_NOMEM, "resume: out of memory"); goto done; }
            strcpy(l->p_prompts[b], pv ? pv : "");
        }
    }
    ms_trainer_state_io(t, st, 0, &step, &stop);
done:
    free(st);
    st_close(&f);
    return s;
}


/* save_and_validation's visual_validation (train_edlora.py, test_edlora.py): for every alpha of
 * val.alpha_list, the base model with the ED-LoRA merged at alpha (convert_edlora), sampled as
 * EDLoRAPipeline with DPM-Solver++ on the PromptDataset items: prompt lines (replace_mapping,
 * stripped, runs of spaces collapsed), num_samples_per_prompt each, in the order
 * [(p, i) for i in 1..N for p in prompts], initial latents torch.randn(latent_size,
 * generator=torch.manual_seed(i)) -- which reseeds the GLOBAL generator, so g is reseeded here
 * exactly so (it matters when validation runs in the middle of training) -- the negative prompt
 * NEGATIVE_PROMPT of mixofshow/utils/util.py, val.sample steps and guidance.
 * Files: <out>/visualization/PromptDataset/Iters-<it>_Alpha-<a>/<prompt_with_underscores>---
 * G_<g>_S_<steps>---<i>---Iters-<it>_Alpha-<a>.png. (compose_visualize's grid is not made.) */
static const char *const TRAIN_NEGATIVE_PROMPT = "longbody, lowres, bad anatomy, bad hands, missing fingers, extra digit, "
                                                 "fewer digits, cropped, worst quality, low quality";

static void py_float(char *buf, size_t cap, double x) {     /* str() of a YAML number as Python prints it */
    if (x == floor(x) && fabs(x) < 1e15) {
        if (x == 0.0) snprintf(buf, cap, "0");                /* alpha_list: [0, 0.7, 1.0]: 0 is an int there */
        else snprintf(buf, cap, "%.1f", x);
    } else {
        for (int p = 1; p <= 17; p++) {                       /* shortest repr that reads back */
            snprintf(buf, cap, "%.*g", p, x);
            if (strtod(buf, NULL) == x) break;
        }
    }
}

static MsStatus train_validate(const TrainArgs *a, const TrainDataConfig *dc, const char *pth, const char *out,
                               const char *label, MsTorchRng *g) {
    MsStatus s = MS_OK;
    char *text = NULL, *lines[256];
    int n_lines = 0;
    FILE *f;
    if (a->no_val || !dc->val_during_save || !dc->val_prompts[0] || dc->n_alpha == 0) return MS_OK;
    if (!(f = fopen(dc->val_prompts, "rb"))) return ms_errorf(MS_ERR_IO, "%s: cannot open the validation prompts", dc->val_prompts);
    {
        char buf[4096];
        while (n_lines < 256 && fgets(buf, sizeof buf, f)) {
            char *p = train_process_text(buf, dc->n_val_replace, (const char (*)[64])dc->val_replace_from,
                                         (const char (*)[256])dc->val_replace_to);
            if (!p) { fclose(f); s = ms_errorf(MS_ERR_NOMEM, "validation: out of memory"); goto done; }
            if (!p[0]) { free(p); continue; }
            lines[n_lines++] = p;
        }
        fclose(f);
    }
    const int N = a->val_samples > 0 ? a->val_samples : dc->val_samples_per_prompt;
    for (int ai = 0; !s && ai < dc->n_alpha; ai++) {
        MsModel m;
        ClipTokenizer tok;
        MsOpenOptions oo;
        EdloraFile ef;
        EdloraPrompt ep;
        MsTxt2ImgOptions o;
        char alpha_s[32], g_s[32], dir[3000], it[96];
        float *lat = NULL, *image = NULL;
        uint8_t *px = NULL;
        int have = 0;
        memset(&oo, 0, sizeof oo); memset(&ef, 0, sizeof ef); memset(&ep, 0, sizeof ep); memset(&o, 0, sizeof o);
        oo.tokenizer_dir = a->tokenizer; oo.config_dir = a->model_config; oo.quiet = 1;
        py_float(alpha_s, sizeof alpha_s, dc->alpha_list[ai]);
        py_float(g_s, sizeof g_s, dc->val_guidance);
        snprintf(it, sizeof it, "Iters-%s_Alpha-%s", label, alpha_s);
        snprintf(dir, sizeof dir, "%s/visualization/PromptDataset/%s", out, it);
        if (!ensure_dir(dir)) { s = ms_errorf(MS_ERR_IO, "%s: cannot create", dir); break; }
        s = ms_open_model(a->model ? a->model : dc->pretrained_path, &oo, &m, &tok, NULL, 0);
        if (!s) have = 1;
        if (!s) s = edlora_read(pth, &ef);
        if (!s) s = edlora_merge(&m, &ef, (float)dc->alpha_list[ai]);
        if (!s) s = edlora_prepare(&ef, &tok, &m, &ep, &o);
        const int h = dc->val_latent_size[1], w = dc->val_latent_size[2], f8 = have ? 1 << (m.vae_config.n_blocks - 1) : 8;
        const size_t nl = (size_t)dc->val_latent_size[0] * h * w, np_ = (size_t)3 * h * f8 * w * f8;
        if (!s && dc->val_latent_size[0] != m.unet_config.in_channels)
            s = ms_errorf(MS_ERR_ARG, "validation: latent_size[0] %d != the UNet's %d input channels", dc->val_latent_size[0],
                          m.unet_config.in_channels);
        if (!s && (!(lat = (float *)malloc(nl * sizeof(float))) || !(image = (float *)ms_alloc_aligned(np_, sizeof(float))) ||
                   !(px = (uint8_t *)malloc(np_))))
            s = ms_errorf(MS_ERR_NOMEM, "validation: out of memory");
        o.width = w * f8; o.height = h * f8; o.steps = dc->val_steps; o.guidance_scale = (float)dc->val_guidance;
        o.sampler = MS_SCHED_DPMSOLVER; o.torch_cpu = MS_TORCH_CPU_AVX2; o.batch = 1; o.negative = TRAIN_NEGATIVE_PROMPT;
        for (int i = 1; !s && i <= N; i++)
            for (int pi = 0; !s && pi < n_lines; pi++) {
                char name[4096], path[8200];
                ms_torch_seed(g, (uint64_t)i);                     /* torch.manual_seed(seed): the global generator */
                ms_torch_randn(g, lat, nl, MS_TORCH_CPU_AVX2);
                o.prompt = lines[pi];
                o.init_noise = lat;
                if ((s = ms_txt2img(&m, &tok, &o, image))) break;
                ms_image_to_u8(px, image, 3, o.height, o.width);
                snprintf(name, sizeof name, "%s", lines[pi]);
                for (char *c = name; *c; c++) if (*c == ' ') *c = '_';
                snprintf(path, sizeof path, "%s/%s---G_%s_S_%d---%d---%s.png", dir, name, g_s, dc->val_steps, i, it);
                s = ms_png_write(path, px, o.width, o.height, 3);
            }
        if (!s && !a->quiet) fprintf(stderr, "train: validation images (alpha %s) in %s\n", alpha_s, dir);
        free(lat); ms_free_aligned(image); free(px);
        edlora_prompt_free(&ep);
        edlora_free(&ef);
        if (have) { clip_tokenizer_free(&tok); ms_model_free(&m); }
    }
done:
    for (int i = 0; i < n_lines; i++) free(lines[i]);
    free(text);
    return s;
}

static MsStatus train_run(const TrainArgs *a, const TrainDataConfig *dc, MsTrainConfig *mc, MsModel *m,
                          ClipTokenizer *tok) {
    MsTorchRng *g = (MsTorchRng *)malloc(sizeof *g);
    PyRandom *py = (PyRandom *)malloc(sizeof *py);
    TrainDataset *ds = NULL;
    TrainLoader ld;
    MsTrainer *t = NULL;
    TrainDatasetOptions dopt;
    MsStatus s = MS_OK;
    char out[2048], models_dir[2100], path[2300];
    float *images = NULL;
    double *masks = NULL, *img_masks = NULL, *losses = NULL;
    char *prompts[64] = { 0 };
    FILE *csv = NULL;
    int ld_ok = 0;
    memset(&ld, 0, sizeof ld);
    memset(&dopt, 0, sizeof dopt);
    if (!g || !py) { free(g); free(py); return ms_errorf(MS_ERR_NOMEM, "train: out of memory"); }
    if (dc->batch_size > 64) { s = ms_errorf(MS_ERR_ARG, "train: batch_size_per_gpu %d > 64", dc->batch_size); goto done; }
    /* accelerate's set_seed(manual_seed): random.seed, numpy (unused here), torch.manual_seed */
    ms_torch_seed(g, mc->seed);
    py_random_seed(py, mc->seed);
    snprintf(out, sizeof out, "%s", a->out ? a->out : "");
    if (!out[0]) snprintf(out, sizeof out, "experiments/%s", dc->name);
    snprintf(models_dir, sizeof models_dir, "%s/models", out);
    if (!ensure_dir(models_dir)) { s = ms_errorf(MS_ERR_IO, "%s: cannot create the output folder", models_dir); goto done; }

    /* train_edlora.py builds EDLoRATrainer (torch draws) before LoraDataset (random.shuffle):
     * two independent generators, so the dataset can be read first (total_iter needs its length) */
    dopt.base_dir = a->config_dir[0] ? a->config_dir : NULL;
    if ((s = train_dataset_open(&ds, dc, &dopt, py))) goto done;
    mc->total_iter = (double)train_dataset_len(ds) / dc->batch_size;   /* len(train_dataset) / total_batch_size */
    {
        /* the image size comes from the resize transform: peek at the config */
        int S = 0;
        for (int i = 0; i < dc->n_transforms; i++)
            if (dc->transforms[i].type == MS_TF_HUMAN_RESIZE_CROP_V3 || dc->transforms[i].type == MS_TF_RESIZE_FILL_MASK_NEW)
                S = dc->transforms[i].size;
        if (S <= 0) { s = ms_errorf(MS_ERR_ARG, "train: the instance transforms have no resize (HumanResizeCropFinalV3 or ResizeFillMaskNew)"); goto done; }
        if ((s = ms_trainer_create(&t, m, tok, mc, dc->batch_size, S, S, g))) goto done;
    }
    {
        const int B = dc->batch_size, S = train_dataset_size(ds), ms8 = S / 8;
        const size_t len = train_dataset_len(ds);
        int64_t total = (int64_t)ceil(mc->total_iter);
        if (a->max_steps > 0 && a->max_steps < total) total = a->max_steps;
        if ((s = train_loader_init(&ld, ds, (size_t)B, 1))) goto done;
        ld_ok = 1;
        images = (float *)malloc((size_t)B * 3 * S * S * sizeof(float));
        masks = (double *)malloc((size_t)B * ms8 * ms8 * sizeof(double));
        img_masks = (double *)malloc((size_t)B * ms8 * ms8 * sizeof(double));
        losses = (double *)calloc((size_t)total + 1, sizeof(double));
        if (!images || !masks || !img_masks || !losses) { s = ms_errorf(MS_ERR_NOMEM, "train: out of memory"); goto done; }
        if (a->resume) {
            if ((s = load_checkpoint(a->resume, t, g, py, &ld))) goto done;
            fprintf(stderr, "train: resumed at step %lld from %s\n", (long long)ms_trainer_step_count(t), a->resume);
        }
        snprintf(path, sizeof path, "%s/loss.csv", out);
        csv = fopen(path, ms_trainer_step_count(t) > 0 ? "a" : "w");
        if (!csv) { s = ms_errorf(MS_ERR_IO, "%s: cannot open for writing", path); goto done; }
        if (ms_trainer_step_count(t) == 0) fprintf(csv, "step,loss,loss_mse,loss_attn,lr_embedding,lr_text_encoder,lr_unet,norm_mean,emb_frozen,seconds\n");
        fprintf(stderr, "train: %s: %zu images x %d = %zu items, batch %d, %lld steps, %dx%d, %s, output %s\n", dc->name,
                train_dataset_n_images(ds), dc->enlarge_ratio, len, B, (long long)total, S, S,
                mc->enable_edlora ? "ED-LoRA" : "LoRA", out);
        const double t0 = ms_time();
        const int64_t k0 = ms_trainer_step_count(t);
        const int tty = !a->quiet && stderr_tty();
        while (ms_trainer_step_count(t) < total) {
            MsTrainBatch bt;
            MsStepReport rep;
            double ts = ms_time();
            for (int b = 0; b < B; b++) { free(prompts[b]); prompts[b] = NULL; }
            if ((s = train_loader_next(&ld, ds, py, g, images, masks, img_masks, prompts, NULL))) goto done;
            bt.B = B; bt.H = S; bt.W = S; bt.images = images;
            bt.masks = train_dataset_has_masks(ds) ? masks : NULL;
            bt.img_masks = img_masks;
            bt.prompts = (const char *const *)prompts;
            if ((s = ms_trainer_step(t, &bt, NULL, g, &rep))) goto done;
            const int64_t k = ms_trainer_step_count(t);
            losses[k - 1] = rep.loss;
            fprintf(csv, "%lld,%.9g,%.9g,%.9g,%.9g,%.9g,%.9g,%.9g,%d,%.3f\n", (long long)k, rep.loss, rep.loss_mse,
                    rep.loss_attn, rep.lr[0], rep.lr[1], rep.lr[2], rep.emb_norm_mean, rep.emb_frozen, ms_time() - ts);
            fflush(csv);
            if (!a->quiet && (tty || k % dc->print_freq == 0 || k == total)) progress(k - k0, total - k0, &rep, t0, tty);
            if (dc->save_checkpoint_freq > 0 && k % dc->save_checkpoint_freq == 0) {
                snprintf(path, sizeof path, "%s/%s_model-%lld.pth", models_dir, mc->enable_edlora ? "edlora" : "lora", (long long)k);
                if ((s = save_edlora(t, mc, path))) goto done;
                char lab[32];
                snprintf(lab, sizeof lab, "%lld", (long long)k);
                if ((s = train_validate(a, dc, path, out, lab, g))) goto done;
            }
            if (a->checkpoint_every > 0 && k % a->checkpoint_every == 0 && k < total) {
                snprintf(path, sizeof path, "%s/checkpoint.safetensors", out);
                if ((s = save_checkpoint(path, t, g, py, &ld, (int)k))) goto done;
            }
        }
        if (tty) fprintf(stderr, "\n");
        /* save_and_validation(..., 'latest'): the .pth and the same content as .safetensors */
        snprintf(path, sizeof path, "%s/%s_model-latest.pth", models_dir, mc->enable_edlora ? "edlora" : "lora");
        if ((s = save_edlora(t, mc, path))) goto done;
        fprintf(stderr, "train: wrote %s (and .safetensors)\n", path);
        snprintf(path, sizeof path, "%s/%s_model-latest.safetensors", models_dir, mc->enable_edlora ? "edlora" : "lora");
        if ((s = save_edlora(t, mc, path))) goto done;
        snprintf(path, sizeof path, "%s/loss.svg", out);
        if ((s = ms_write_loss_svg(path, losses, ms_trainer_step_count(t)))) goto done;
        fprintf(stderr, "train: wrote %s/loss.csv, %s\n", out, path);
        /* the training state is done with: give its memory back before the validation models */
        ms_trainer_free(t);
        t = NULL;
        ms_model_free(m);
        snprintf(path, sizeof path, "%s/%s_model-latest.pth", models_dir, mc->enable_edlora ? "edlora" : "lora");
        if ((s = train_validate(a, dc, path, out, "latest", g))) goto done;
    }
done:
    for (int b = 0; b < 64; b++) free(prompts[b]);
    if (csv) fclose(csv);
    free(images); free(masks); free(img_masks); free(losses);
    if (ld_ok) train_loader_free(&ld);
    train_dataset_close(ds);
    ms_trainer_free(t);
    free(g); free(py);
    return s;
}

int cmd_train(int argc, char **argv) {
    TrainArgs a;
    TrainDataConfig dc;
    MsTrainConfig mc;
    MsModel m;
    ClipTokenizer tok;
    MsStatus s;
    int have_model = 0, have_tok = 0;
    memset(&a, 0, sizeof a);
    a.checkpoint_every = 100;
    a.threads = -1;
    for (int i = 1; i < argc; i++) {
        const char *o = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        char *end = NULL;
        if (!strcmp(o, "--help") || !strcmp(o, "-h")) { train_usage(stdout); return 0; }
        if (!strcmp(o, "--quiet")) { a.quiet = 1; continue; }
        if (!strcmp(o, "--no-val")) { a.no_val = 1; continue; }
        if (!v) { fprintf(stderr, "mixshow train: %s needs a value (or is unknown; see --help)\n", o); return 2; }
        i++;
        if (!strcmp(o, "--config")) a.config = v;
        else if (!strcmp(o, "--model")) a.model = v;
        else if (!strcmp(o, "--out")) a.out = v;
        else if (!strcmp(o, "--replay")) a.replay = v;
        else if (!strcmp(o, "--trace")) a.trace = v;
        else if (!strcmp(o, "--resume")) a.resume = v;
        else if (!strcmp(o, "--tokenizer")) a.tokenizer = v;
        else if (!strcmp(o, "--model-config")) a.model_config = v;
        else if (!strcmp(o, "--concept-list") || !strcmp(o, "--words") || !strcmp(o, "--init") || !strcmp(o, "--name") ||
                 !strcmp(o, "--batch") || !strcmp(o, "--repeat")) {
            /* plain flags: the same as --set on the defaults (or on --config) */
            char q[1024];
            size_t k = 0;
            for (const char *c = v; *c && k + 2 < sizeof q; c++) { if (*c == '\'' ) q[k++] = '\''; q[k++] = *c; }
            q[k] = '\0';
            if (a.n_flag_sets >= 15) { fprintf(stderr, "mixshow train: too many flags\n"); return 2; }
            char *fs = a.flag_sets[a.n_flag_sets++];
            if (!strcmp(o, "--concept-list")) snprintf(fs, 1100, "datasets.train.concept_list='%s'", q);
            else if (!strcmp(o, "--init")) snprintf(fs, 1100, "models.initializer_token='%s'", q);
            else if (!strcmp(o, "--name")) snprintf(fs, 1100, "name='%s'", q);
            else if (!strcmp(o, "--batch")) snprintf(fs, 1100, "datasets.train.batch_size_per_gpu=%s", v);
            else if (!strcmp(o, "--repeat")) snprintf(fs, 1100, "datasets.train.dataset_enlarge_ratio=%s", v);
            else {                                  /* --words A+B: new_concept_token, and <TOK> -> "A B" */
                snprintf(fs, 1100, "models.new_concept_token='%s'", q);
                char *sp = a.flag_sets[a.n_flag_sets++];
                snprintf(sp, 1100, "datasets.train.replace_mapping={'<TOK>': '%s'}", q);
                for (char *c = sp + strlen("datasets.train.replace_mapping={'<TOK>': '"); *c; c++) if (*c == '+') *c = ' ';
            }
        }
        else if (!strcmp(o, "--set")) {
            if (a.n_sets == 64) { fprintf(stderr, "mixshow train: more than 64 --set\n"); return 2; }
            a.sets[a.n_sets++] = v;
        }
        else if (!strcmp(o, "--seed")) { a.seed = strtoull(v, &end, 10); a.has_seed = 1; }
        else if (!strcmp(o, "--steps")) a.max_steps = strtoll(v, &end, 10);
        else if (!strcmp(o, "--checkpoint-every")) a.checkpoint_every = strtoll(v, &end, 10);
        else if (!strcmp(o, "--threads")) a.threads = (int)strtol(v, &end, 10);
        else if (!strcmp(o, "--val-samples")) a.val_samples = (int)strtol(v, &end, 10);
        else if (!strcmp(o, "--weights")) {
            if (!strcmp(v, "f16") || !strcmp(v, "half")) a.keep_half = 1;
            else if (!strcmp(v, "f32")) a.keep_half = 0;
            else { fprintf(stderr, "mixshow train: --weights %s: expected f32 or f16\n", v); return 2; }
        }
        else { fprintf(stderr, "mixshow train: unknown option '%s'\n\n", o); train_usage(stderr); return 2; }
        if (end && (*end || end == v)) { fprintf(stderr, "mixshow train: %s %s: not a number\n", o, v); return 2; }
    }
    if (a.threads > 0) ms_set_threads(a.threads);
    if (a.config) {
        const char *sl = strrchr(a.config, '/');
        size_t n = sl ? (size_t)(sl - a.config) : 0;
        if (n < sizeof a.config_dir) { memcpy(a.config_dir, a.config, n); a.config_dir[n] = '\0'; }
    }
    memset(&m, 0, sizeof m);
    memset(&tok, 0, sizeof tok);

    /* options: the .yml (or the defaults) + plain flags + --set, else (replay) the dump's "config" */
    if (a.config || !a.replay) {
        JsonValue *root = NULL;
        const char *all[64 + 16];
        int n = 0;
        for (int i = 0; i < a.n_flag_sets; i++) all[n++] = a.flag_sets[i];
        for (int i = 0; i < a.n_sets; i++) all[n++] = a.sets[i];
        if (a.config) s = train_config_load(a.config, all, n, &dc, &mc);
        else {
            s = yaml_parse(TRAIN_DEFAULT_YML, strlen(TRAIN_DEFAULT_YML), "(mixshow defaults)", &root);
            for (int i = 0; !s && i < n; i++) s = yaml_apply_set(root, all[i]);
            if (!s) s = train_config_from_yaml(root, &dc, &mc);
            json_free(root);
            if (!s && !dc.concept_list[0]) s = ms_errorf(MS_ERR_ARG, "train: no --config and no --concept-list (see --help)");
        }
        if (s) goto fail;
    } else if (a.replay) {
        StFile f;
        JsonValue *root = NULL;
        const char *cfg;
        if ((s = st_open(&f, a.replay))) goto fail;
        cfg = st_meta(&f, "config");
        if (!cfg) { st_close(&f); s = ms_errorf(MS_ERR_ARG, "%s: no --config and no metadata \"config\"", a.replay); goto fail; }
        s = json_parse(cfg, strlen(cfg), a.replay, &root);
        /* a dump carries the options that shape the step (models:, train:); the data came with
         * it, so the dataset part is a placeholder here */
        if (!s && !json_get(root, "name")) s = yaml_apply_set(root, "name=replay");
        if (!s && !json_get(root, "datasets"))
            s = yaml_apply_set(root, "datasets.train={name: LoraDataset, concept_list: (replay), "
                                     "instance_transform: [], batch_size_per_gpu: 1, dataset_enlarge_ratio: 1}");
        for (int i = 0; !s && i < a.n_sets; i++) s = yaml_apply_set(root, a.sets[i]);
        if (!s) s = train_config_from_yaml(root, &dc, &mc);
        if (!s && st_meta(&f, "total_iter")) mc.total_iter = strtod(st_meta(&f, "total_iter"), NULL);
        json_free(root);
        st_close(&f);
        if (s) goto fail;
    }
    if (a.has_seed) mc.seed = a.seed;
    {
        const char *path = a.model ? a.model : dc.pretrained_path;
        if (!path[0]) { s = ms_errorf(MS_ERR_ARG, "train: no model (--model or models.pretrained_path)"); goto fail; }
        MsOpenOptions oo;
        memset(&oo, 0, sizeof oo);
        oo.tokenizer_dir = a.tokenizer; oo.config_dir = a.model_config; oo.keep_half = a.keep_half;
        if ((s = ms_open_model(path, &oo, &m, &tok, NULL, 0))) goto fail;
        have_model = have_tok = 1;
    }
    if (a.replay) s = train_replay(&a, &mc, &m, &tok);
    else s = train_run(&a, &dc, &mc, &m, &tok);
    if (s) goto fail;
    if (have_tok) clip_tokenizer_free(&tok);
    ms_model_free(&m);
    return 0;
fail:
    fprintf(stderr, "mixshow train: %s\n", ms_last_error());
    if (have_tok) clip_tokenizer_free(&tok);
    if (have_model) ms_model_free(&m);
    return 1;
}
