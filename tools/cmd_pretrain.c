/* tools/cmd_pretrain.c — `mixshow pretrain` (issue 15): a small model of SD 1.x topology trained
 * from scratch on the procedural world (tools/world.c), in stages, one function each:
 *   vae   an AutoencoderKL on the scenes' pixels (ms_vae_pretrain_step) -> DIR/vae/, with its
 *         scaling_factor measured as SD's recipe does (1 / std of the latents of training scenes);
 *   unet  UNet + CLIP text encoder on the scenes' captions and the frozen VAE's latents (posterior
 *         mean * scaling_factor, cached once per scene; ms_pretrain_step) -> DIR/model/;
 *   adapters  two T2I-Adapters (keypose-like "pose", "sketch") on the frozen DIR/model
 *         (ms_adapter_train_step) -> DIR/adapters/pose/, DIR/adapters/sketch/.
 * This file builds the configs from flags (or a diffusers folder's configs), makes the data,
 * and runs each stage through one loop (pre_loop): progress with ETA, a loss.csv / loss.svg,
 * atomic checkpoints that --resume continues bit-identically (the checkpoint names its stage). */
#if !defined(_WIN32) && !defined(_POSIX_C_SOURCE)
#define _POSIX_C_SOURCE 200809L         /* mkdir, isatty: in the guarded section below */
#endif
#include "tools/tools.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#if !defined(_WIN32)
#include <sys/stat.h>
#include <sys/types.h>
#include <unistd.h>
static int pre_mkdir(const char *p) { struct stat st; mkdir(p, 0777); return stat(p, &st) == 0 && S_ISDIR(st.st_mode); }
#else
#include <direct.h>
static int pre_mkdir(const char *p) { _mkdir(p); return 1; }
#endif

static void pretrain_usage(FILE *f) {
    fprintf(f,
        "usage: mixshow pretrain --out DIR [--stage vae|text|unet|adapters|all] [options]\n"
        "Trains a small SD 1.x-topology model from scratch on scenes of the procedural world\n"
        "(mixshow world), in stages (--stage all, the default: vae, text, unet, then adapters):\n"
        "  vae   an AutoencoderKL on the scenes' pixels: MSE reconstruction + kl_weight * KL of the\n"
        "        posterior sample (LDM's objective without LPIPS and GAN), AdamW. Writes\n"
        "        DIR/vae_loss.csv (loss, error per pixel value, KL per image), DIR/vae_loss.svg,\n"
        "        DIR/vae_checkpoint.safetensors, and at the end DIR/vae/ (diffusers folder; its\n"
        "        scaling_factor = 1 / std of the latents of 256 training scenes, as SD's), the PSNR\n"
        "        of 64 held-out scenes (indices --scenes..) and DIR/vae_reconstructions.png (8 held-out\n"
        "        scenes above their reconstructions).\n"
        "  text  with --text contrastive only: a CLIP-architecture text encoder trained first, alone,\n"
        "        as SD's CLIP was: contrastively with an image encoder on world scenes and captions\n"
        "        (`mixshow eval --train-encoders DIR/text` with the --text-* config, 77 positions,\n"
        "        --text-steps, --text-seed); the unet stage trains the UNet on it, frozen. Writes\n"
        "        DIR/text/ (encoders.safetensors, checkpoint, loss.csv/.svg, heldout.json).\n"
        "  unet  every parameter of a UNet and a CLIP text encoder (real BPE tokenizer, vocab 49408),\n"
        "        captions as the text: epsilon objective, DDPM noise of the scheduler config, uniform\n"
        "        timesteps, 10%% of captions dropped to \"\" (for classifier-free guidance), AdamW with\n"
        "        linear warmup, on the frozen VAE's latents (posterior mean * scaling_factor, cached).\n"
        "        Writes DIR/loss.csv, DIR/loss.svg, DIR/checkpoint.safetensors and at the end\n"
        "        DIR/model/, a diffusers folder (must not exist yet; with the VAE) for\n"
        "        `mixshow sample --model DIR/model`; there (not in the checkpoint) the text encoder's\n"
        "        token rows of ids no training caption tokenizes to are zero (they never had a gradient).\n"
        "  adapters  two T2I-Adapters (full_adapter) on DIR/model, frozen: \"pose\" (3 channels, the\n"
        "        world's keypose-like drawings) and \"sketch\" (1 channel, its outlines), each level as\n"
        "        wide as the UNet's block (they are added to its down-block outputs), downscale factor\n"
        "        = the VAE's. Data: base scenes (objects: pose spokes, outlines) and as many creature\n"
        "        renders (a creature per image, renders below 500; \"a creature, waving, ...\").\n"
        "        Epsilon objective with the features added as sampling adds them, AdamW; both\n"
        "        adapters on the same batches and draws. Writes DIR/adapters_loss.csv, .svg,\n"
        "        DIR/adapters_checkpoint.safetensors and at the end DIR/adapters/pose/ and\n"
        "        DIR/adapters/sketch/ for `mixshow sample --adapter DIR/adapters/pose --cond IMG`.\n"
        );
    fprintf(f,
        "Checkpoints (every --checkpoint-every steps and at the end of a stage) hold the weights,\n"
        "AdamW moments, step and RNG state; --resume FILE continues that stage bit-identically,\n"
        "then runs the later stages of --stage.\n\n"
        "data:\n"
        "  --size S              image side, 64 or 128 (default 64)\n"
        "  --scenes N            distinct world scenes, indices 0..N-1 (default 4096)\n"
        "  --creatures N         unet stage: also N creature renders (N/4 creatures, 4 renders each, none of\n"
        "                        them a world's characters), captioned with the class word \"a creature\",\n"
        "                        so that the base model knows the class ED-LoRA's concepts belong to (0)\n"
        "  --world-seed S        the world's seed (default 0)\n"
        "  --vae DIR             the unet stage's frozen VAE, a diffusers VAE folder (default DIR/vae\n"
        "                        when it exists, else the embedded random models/tiny-sd/vae)\n"
        "  --tokenizer DIR       CLIP vocab.json + merges.txt (default: the shipped files)\n"
        "vae stage (defaults: 32,64,64 channels = factor 4, 1 layer per block, 8 groups, 4 latent\n"
        "channels; 64x64 images -> 4x16x16 latents):\n"
        "  --vae-channels A,B,.. block_out_channels (the factor is 2^(blocks-1))\n"
        "  --vae-layers N, --vae-groups G, --vae-latent L\n"
        "  --vae-steps N         (default 1000)   --vae-batch B (default 8)\n"
        "  --vae-crop C          train on random C x C windows of the scenes (a multiple of the factor;\n"
        "                        default: whole scenes). The VAE is convolutional: 64x64 crops of 128x128\n"
        "                        scenes teach it the same maps at a quarter of the cost per step\n"
        "  --vae-crop-at anywhere|objects   where the windows lie: uniformly (default), or around the\n"
        "                        centre of a random object of the scene (shifted by up to C/4): objects\n"
        "                        are a small part of the pixels, and uniform windows often miss them\n"
        "  --vae-lr X, --vae-warmup N   peak lr (5e-4), linear warmup steps (100)\n"
        "  --kl-weight X         (default 1e-6, SD's VAE)\n"
        "  --vae-loss mse|l1     reconstruction term (default mse: higher PSNR in minutes; l1 is LDM's)\n"
        "unet stage (defaults: UNet 32,64,64 channels, 2 CrossAttnDownBlock2D + DownBlock2D (SD's\n"
        "order, so that T2I-Adapter features fit), 1 layer per block, heads 2,4,4, 8 groups; text\n"
        "encoder width 64, 2 layers, 2 heads):\n"
        "  --channels A,B,...    UNet block_out_channels (1..4 blocks; the last is a plain block)\n"
        "  --heads A,B,...       attention heads per block (as many as --channels)\n"
        "  --layers N            resnets per down block (default 1)\n"
        "  --groups G            GroupNorm groups (default 8)\n"
        "  --text-width D        text hidden size = cross_attention_dim (default 64)\n"
        "  --text-layers N, --text-heads H   (default 2, 2; intermediate 4 D)\n"
        "  --text joint|contrastive   the text encoder trained with the UNet (joint, the default) or\n"
        "                        first and contrastively by the text stage, then frozen (contrastive)\n"
        "  --text-steps N, --text-seed S   the text stage's steps (2000) and seed (1; mixshow eval's\n"
        "                        own scoring encoders use 0)\n"
        "  --text-token-max-norm X   the text stage keeps every token row at most X long (eval\n"
        "                        --token-max-norm; default none): ED-LoRA's emb_norm_threshold 0.55\n"
        "                        presumes class words below it (models/world: 0.4)\n"
        "  --text-encoder FILE   a frozen text encoder: the text tower of a `mixshow eval --train-encoders\n"
        "                        --text-tokens 77` file (trained contrastively on world captions, as\n"
        "                        SD's CLIP), its config in place of --text-width/-layers/-heads; the\n"
        "                        UNet alone is trained (default: the text encoder is trained with it)\n"
        "  --model-config DIR    take unet/config.json, text_encoder/config.json and\n"
        "                        scheduler/scheduler_config.json from a diffusers folder instead\n");
    fprintf(f,
        "unet training:\n"
        "  --steps N             optimizer steps (default 1000)\n"
        "  --batch B             (default 8)\n"
        "  --lr X, --warmup N    peak lr (1e-3), linear warmup steps (100)\n"
        "  --decay N             the last N steps bring the lr down linearly (lr * (steps - k + 1) / N;\n"
        "                        default 0: constant after the warmup). Without an average of the weights\n"
        "                        (EMA) an annealed end makes the samples cleaner. A checkpoint of the same\n"
        "                        options without --decay resumes into it if taken before its start\n"
        "  --weight-decay X      AdamW weight decay on every parameter (0.01)\n"
        "  --uncond P            caption dropout probability (0.1; the adapters stage too)\n"
        "adapters stage (the weight decay of --weight-decay):\n"
        "  --adapter-steps N     (default 500)   --adapter-batch B (default 8)\n"
        "  --adapter-lr X, --adapter-warmup N   peak lr (1e-3), linear warmup steps (50)\n"
        "  --adapter-res R       resnets per adapter level (num_res_blocks, default 2 as SD's)\n"
        "every stage:\n"
        "  --seed S              weights, scene choice, dropout, timesteps, noise (default 0)\n"
        "  --checkpoint-every N  (default 100; 0: none)\n"
        "  --resume FILE         continue from a stage's checkpoint, bit-identically (same options)\n"
        "  --threads N           worker threads (results do not depend on it)\n"
        "  --quiet               no progress\n");
}

#if !defined(_WIN32)
static int stderr_tty(void) { return isatty(2); }
#else
static int stderr_tty(void) { return 0; }
#endif

typedef struct {
    const char *out, *vae_dir, *tok_dir, *model_config, *resume, *stage;
    const char *text_file;              /* --text-encoder: a mixshow eval encoders file's text tower, frozen */
    int text_contrastive;               /* --text contrastive: the text stage trains it (DIR/text/) */
    int64_t text_steps;
    uint64_t text_seed;
    const char *text_max_norm;          /* --text-token-max-norm X (the text stage's --token-max-norm) */
    char text_path[2100];               /* DIR/text/encoders.safetensors */
    int64_t steps, ckpt_every;
    int batch, size, scenes, quiet, threads;
    int creatures;                      /* unet stage: creature renders after the scenes (items scenes..) */
    uint64_t seed, world_seed;
    MsPretrainConfig pc;
    int n_ch, ch[MS_MAX_BLOCKS], n_heads, heads[MS_MAX_BLOCKS], layers, groups;
    int text_width, text_layers, text_heads;
    /* the vae stage */
    int64_t vae_steps;
    int vae_batch, n_vae_ch, vae_ch[MS_MAX_BLOCKS], vae_layers, vae_groups, vae_latent;
    int vae_crop;                       /* train on random C x C crops of the scenes (0: whole scenes) */
    int vae_crop_objects;               /* 1: each window holds an object's centre */
    MsVaePretrainConfig vpc;
    /* the adapters stage */
    int64_t ad_steps;
    int ad_batch, ad_res;
    MsPretrainConfig apc;
} PreArgs;

/* "32,64,64" -> v (1..MS_MAX_BLOCKS positive ints) */
static int parse_list(const char *s, int *v, int *n) {
    *n = 0;
    while (*s) {
        char *end;
        long x = strtol(s, &end, 10);
        if (end == s || x < 1 || x > 100000 || *n == MS_MAX_BLOCKS) return 0;
        v[(*n)++] = (int)x;
        s = end;
        if (*s == ',') s++;
        else if (*s) return 0;
    }
    return *n > 0;
}

static MsStatus read_json_config(const char *dir, const char *file, JsonValue **j) {
    char p[2300];
    snprintf(p, sizeof p, "%s/%s", dir, file);
    return json_parse_file(p, j);
}

/* The model's configs: from --model-config, or from the flags. latent: the latent side. */
static MsStatus pre_configs(const PreArgs *a, const VaeConfig *vc, int latent, MsModel *m) {
    MsStatus s;
    ms_scheduler_config_sd15(&m->scheduler_config);
    if (a->model_config) {
        JsonValue *j = NULL;
        if ((s = read_json_config(a->model_config, "unet/config.json", &j))) return s;
        s = ms_unet_config_from_json(j, &m->unet_config);
        json_free(j);
        if (s) return s;
        if ((s = read_json_config(a->model_config, "text_encoder/config.json", &j))) return s;
        s = ms_clip_text_config_from_json(j, &m->text_config);
        json_free(j);
        if (s) return s;
        if (!read_json_config(a->model_config, "scheduler/scheduler_config.json", &j)) {
            s = ms_scheduler_config_from_json(j, &m->scheduler_config);
            json_free(j);
            if (s) return s;
        }
    } else {
        UNetConfig *c = &m->unet_config;
        ClipTextConfig *t = &m->text_config;
        if (a->n_heads != a->n_ch)
            return ms_errorf(MS_ERR_ARG, "pretrain: --heads has %d values, --channels %d", a->n_heads, a->n_ch);
        ms_unet_config_sd15(c);
        c->n_blocks = a->n_ch;
        for (int i = 0; i < a->n_ch; i++) {
            c->block_out_channels[i] = a->ch[i];
            c->attention_head_dim[i] = a->heads[i];
            c->num_attention_heads[i] = 0;
            c->transformer_layers_per_block[i] = 1;
            /* SD's order, the plain block last: a DownBlock2D with a downsampler would take its
             * T2I-Adapter residual one level down, where no adapter feature is (ms_adapter_fits_unet) */
            c->down_block_types[i] = i == a->n_ch - 1 && a->n_ch > 1 ? MS_BLOCK_DOWN : MS_BLOCK_CROSS_ATTN_DOWN;
            c->up_block_types[i] = i == 0 && a->n_ch > 1 ? MS_BLOCK_UP : MS_BLOCK_CROSS_ATTN_UP;
        }
        c->layers_per_block = a->layers;
        c->norm_num_groups = a->groups;
        c->cross_attention_dim = a->text_width;
        ms_clip_text_config_sd15(t);
        t->hidden_size = a->text_width;
        t->intermediate_size = 4 * a->text_width;
        t->projection_dim = a->text_width;
        t->num_hidden_layers = a->text_layers;
        t->num_attention_heads = a->text_heads;
    }
    if (a->text_file) {                 /* the frozen text tower's own config */
        EvalNet e;
        if ((s = evalnet_load(a->text_file, &e, NULL, NULL))) return s;
        m->text_config = e.cfg.text;
        evalnet_free(&e);
        if (m->text_config.max_position_embeddings < 77)
            return ms_errorf(MS_ERR_ARG, "%s: the text tower has %d positions; a model's text encoder needs 77 (train it "
                             "with --text-tokens 77)", a->text_file, m->text_config.max_position_embeddings);
        m->unet_config.cross_attention_dim = m->text_config.hidden_size;
    }
    m->unet_config.sample_size = latent;
    m->unet_config.in_channels = m->unet_config.out_channels = vc->latent_channels;
    if ((s = ms_unet_config_check(&m->unet_config)) || (s = ms_clip_text_config_check(&m->text_config)) ||
        (s = ms_scheduler_config_check(&m->scheduler_config)))
        return s;
    if (m->text_config.vocab_size != 49408)
        return ms_errorf(MS_ERR_ARG, "pretrain: text vocab_size %d: the CLIP BPE tokenizer has 49408", m->text_config.vocab_size);
    return MS_OK;
}

/* The frozen VAE from a diffusers folder: DIR/config.json + weights. */
static MsStatus pre_load_vae(const char *dir, MsModel *m) {
    static const char *const names[] = { "diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin" };
    JsonValue *j = NULL;
    char p[2300];
    MsStatus s = read_json_config(dir, "config.json", &j);
    if (s) return s;
    s = ms_vae_config_from_json(j, &m->vae_config);
    json_free(j);
    if (s) return s;
    if ((s = ms_param_table_vae(&m->vae_config, &m->vae))) return s;
    for (size_t i = 0; i < sizeof names / sizeof names[0]; i++) {
        FILE *f;
        snprintf(p, sizeof p, "%s/%s", dir, names[i]);
        if (!(f = fopen(p, "rb"))) continue;
        fclose(f);
        return ms_table_fill_file(&m->vae, p, 0, "vae", NULL);
    }
    return ms_errorf(MS_ERR_IO, "%s: no diffusion_pytorch_model.safetensors or .bin", dir);
}

/* ---- data: world scenes, captions, cached latents ---- */
/* Scene idx of the world `seed` at S x S: rgb (S,S,3) bytes and img (3,S,S) in [-1, 1]
 * (ToTensor + Normalize(0.5, 0.5), as the training transforms). */
static MsStatus pre_render(const WorldScene *sc, int S, uint8_t *rgb, float *img) {
    const size_t P = (size_t)S * S;
    MsStatus s = world_render(sc, S, rgb, NULL, NULL, NULL);
    if (s) return s;
    for (size_t i = 0; i < P; i++)
        for (int ch = 0; ch < 3; ch++) img[ch * P + i] = (float)rgb[3 * i + ch] / 255.0f * 2.0f - 1.0f;
    return MS_OK;
}

static MsStatus pre_image(uint64_t seed, int idx, int S, uint8_t *rgb, float *img) {
    WorldScene sc;
    world_scene_make(seed, idx, &sc);
    return pre_render(&sc, S, rgb, img);
}

/* The unet stage's training item idx: idx < scenes: base scene idx and its caption; else creature
 * render k = idx - scenes: render k % PRE_RENDERS of creature k / PRE_RENDERS, captioned with its
 * class word ("a creature, waving, on grass"), as SD knows "a man" before Mix-of-Show teaches it
 * one particular man. Creature c is index c % 16 of a world seed derived from (seed, c / 16): a
 * stream of its own, so neither the world's characters (mixshow world --seed S, as the demo
 * trains) nor the evaluation encoders' creatures are among them. */
#define PRE_RENDERS 4
static MsStatus pre_item(uint64_t seed, int scenes, int idx, WorldScene *sc, char *cap, size_t capn) {
    if (idx < scenes) {
        world_scene_make(seed, idx, sc);
        return world_caption(seed, idx, sc, cap, capn);
    }
    const int k = idx - scenes, c = k / PRE_RENDERS, img = k % PRE_RENDERS;
    const uint64_t cs = world_mix64(seed ^ world_mix64(0x9E37C3EAull + ((uint64_t)(c / 16) << 20)));
    WorldCharacter ch;
    world_character_make(cs, c % 16, &ch);
    world_character_scene(cs, &ch, c % 16, img, sc);
    return world_character_caption(cs, c % 16, img, sc, "a creature", cap, capn);
}

typedef struct {
    uint64_t seed;
    int S, scenes, n, lat_n;        /* image side, scenes, items (scenes + creature renders), floats per latent */
    float scale;                    /* the VAE's scaling_factor */
    VaeParams vp;
    Arena ar;
    float *cache;                   /* (n, lat_n) */
    unsigned char *have;            /* (n) */
    uint8_t *rgb;                   /* (S,S,3) */
    float *img, *mean, *logvar;     /* (3,S,S), (lat_n) x2 */
} PreData;

static MsStatus pre_data_init(PreData *d, const MsModel *m, const PreArgs *a, int latent) {
    VaeSizes vz;
    MsStatus s;
    memset(d, 0, sizeof *d);
    d->seed = a->world_seed; d->S = a->size; d->scenes = a->scenes; d->n = a->scenes + a->creatures;
    d->lat_n = m->vae_config.latent_channels * latent * latent;
    d->scale = m->vae_config.scaling_factor;
    if ((s = vae_params_init(&d->vp, &m->vae_config, &m->vae)) || (s = vae_sizes(&m->vae_config, d->S, d->S, -1, &vz)) ||
        (s = arena_init(&d->ar, vz.encode_bytes)))
        return s;
    d->cache = (float *)malloc((size_t)d->n * d->lat_n * sizeof(float));
    d->have = (unsigned char *)calloc((size_t)d->n, 1);
    d->rgb = (uint8_t *)malloc((size_t)d->S * d->S * 3);
    d->img = (float *)ms_alloc_aligned((size_t)3 * d->S * d->S, sizeof(float));
    d->mean = (float *)ms_alloc_aligned((size_t)d->lat_n, sizeof(float));
    d->logvar = (float *)ms_alloc_aligned((size_t)d->lat_n, sizeof(float));
    if (!d->cache || !d->have || !d->rgb || !d->img || !d->mean || !d->logvar)
        return ms_errorf(MS_ERR_NOMEM, "pretrain: out of memory for %d cached latents", d->n);
    return MS_OK;
}

static void pre_data_free(PreData *d) {
    arena_free(&d->ar);
    free(d->cache); free(d->have); free(d->rgb);
    ms_free_aligned(d->img); ms_free_aligned(d->mean); ms_free_aligned(d->logvar);
}

/* Item idx (pre_item): its caption into cap, its latent into lat (computed once, then from the cache). */
static MsStatus pre_latent(PreData *d, int idx, float *lat, char *cap, size_t capn) {
    WorldScene sc;
    MsStatus s;
    if ((s = pre_item(d->seed, d->scenes, idx, &sc, cap, capn))) return s;
    if (!d->have[idx]) {
        if ((s = pre_render(&sc, d->S, d->rgb, d->img))) return s;
        arena_reset(&d->ar, 0);
        if ((s = vae_encode(&d->vp, &d->ar, d->mean, d->logvar, d->img, 1, d->S, d->S))) return s;
        for (int i = 0; i < d->lat_n; i++) d->cache[(size_t)idx * d->lat_n + i] = d->mean[i] * d->scale;
        d->have[idx] = 1;
    }
    memcpy(lat, d->cache + (size_t)idx * d->lat_n, (size_t)d->lat_n * sizeof(float));
    return MS_OK;
}

/* ---- checkpoints ---- */
/* What a stage's checkpoint holds besides the step and the generator: its tables (weights under
 * "<prefix><key>") and the AdamW moments over them. format names the stage. */
#define PRE_MAX_TABLES 4
typedef struct {
    const char *format;
    int n;
    MsParamTable *t[PRE_MAX_TABLES];
    const char *prefix[PRE_MAX_TABLES];
    float *m, *v;
    size_t nmom;
    float *m2, *v2;                     /* a second optimizer's moments ("adam2.*"; NULL: none) */
    size_t nmom2;
} PreState;

#define UNET_FORMAT "mixshow pretrain checkpoint 1"
#define VAE_FORMAT "mixshow pretrain vae checkpoint 1"

/* FNV-1a of the parameter names and shapes of the state's tables (for recipes) */
static uint64_t pre_tables_hash(const PreState *st) {
    uint64_t h = 1469598103934665603ull;
    for (int k = 0; k < st->n; k++)
        for (int i = 0; i < st->t[k]->n; i++) {
            const MsParam *p = &st->t[k]->p[i];
            for (const char *c = p->name; *c; c++) h = (h ^ (unsigned char)*c) * 1099511628211ull;
            for (int d = 0; d < p->ndim; d++) h = (h ^ (uint64_t)p->shape[d]) * 1099511628211ull;
        }
    return h;
}

/* FNV-1a of a table's f32 values, tensor by tensor (a frozen model a resumed run must train
 * on; the block's alignment gaps are not part of it) */
static uint64_t pre_weights_hash(const MsParamTable *t, uint64_t h) {
    for (int i = 0; i < t->n; i++) {
        const unsigned char *b = (const unsigned char *)t->p[i].f32;
        for (size_t k = 0; b && k < t->p[i].numel * sizeof(float); k++) h = (h ^ b[k]) * 1099511628211ull;
    }
    return h;
}

/* Everything a resumed unet stage must agree on, as one string (stored in the checkpoint). */
static void pre_recipe(char *buf, size_t cap, const PreArgs *a, const MsModel *m, const PreState *st) {
    const UNetConfig *u = &m->unet_config;
    const ClipTextConfig *tc = &m->text_config;
    snprintf(buf, cap, "size=%d batch=%d scenes=%d creatures=%d world_seed=%llu seed=%llu lr=%.17g warmup=%lld betas=%.17g,%.17g "
             "eps=%.17g wd=%.17g uncond=%.17g params=%016llx groups=%d heads=%d,%d,%d,%d text_heads=%d vae_scale=%.9g",
             a->size, a->batch, a->scenes, a->creatures, (unsigned long long)a->world_seed, (unsigned long long)a->seed, a->pc.lr,
             (long long)a->pc.warmup, a->pc.beta1, a->pc.beta2, a->pc.adam_eps, a->pc.weight_decay, a->pc.uncond_p,
             (unsigned long long)pre_tables_hash(st), u->norm_num_groups, ms_unet_heads(u, 0),
             u->n_blocks > 1 ? ms_unet_heads(u, 1) : 0, u->n_blocks > 2 ? ms_unet_heads(u, 2) : 0,
             u->n_blocks > 3 ? ms_unet_heads(u, 3) : 0, tc->num_attention_heads, (double)m->vae_config.scaling_factor);
    if (a->pc.freeze_text) {            /* the frozen text encoder's weights */
        const size_t n = strlen(buf);
        snprintf(buf + n, cap - n, " text=frozen:%016llx", (unsigned long long)pre_weights_hash(&m->text, 1469598103934665603ull));
    }
    if (a->pc.decay > 0) {              /* only then: constant-lr checkpoints keep their recipe */
        const size_t n = strlen(buf);
        snprintf(buf + n, cap - n, " decay=%lld/%lld", (long long)a->pc.decay, (long long)a->pc.steps);
    }
}

static MsStatus add_entry(StEntry **e, size_t *n, size_t *cap, const char *name, StDtype dt, int64_t len,
                          const float *f32, const void *raw) {
    if (*n == *cap) {
        size_t c = *cap ? 2 * *cap : 256;
        StEntry *x = (StEntry *)realloc(*e, c * sizeof *x);
        if (!x) return ms_errorf(MS_ERR_NOMEM, "checkpoint: out of memory");
        *e = x; *cap = c;
    }
    StEntry *x = &(*e)[(*n)++];
    memset(x, 0, sizeof *x);
    x->name = name; x->dtype = dt; x->ndim = 1; x->shape[0] = len; x->f32 = f32; x->raw = raw;
    return MS_OK;
}

/* weights, AdamW moments, the step and the generator (path.tmp, then renamed) */
static MsStatus pre_save(const char *path, const PreState *st, int64_t step, const MsTorchRng *g, const char *recipe) {
    StEntry *e = NULL;
    size_t n = 0, cap = 0, nn = 0;
    for (int j = 0; j < st->n; j++) nn += (size_t)st->t[j]->n;
    char (*names)[MS_KEY_MAX + 16] = (char (*)[MS_KEY_MAX + 16])malloc(nn * sizeof *names);
    uint32_t mt[624];
    int64_t ints[4] = { step, g->next, (int64_t)g->seed, g->has_normal };
    double gn = g->normal;
    MsStatus s = names ? MS_OK : ms_errorf(MS_ERR_NOMEM, "checkpoint: out of memory");
    int k = 0;
    for (int i = 0; i < 624; i++) mt[i] = g->mt[i];
    for (int j = 0; !s && j < st->n; j++)
        for (int i = 0; !s && i < st->t[j]->n; i++) {
            const MsParam *q = &st->t[j]->p[i];
            if (q->flags & MS_PARAM_BUFFER) continue;
            snprintf(names[k], sizeof names[k], "%s%s", st->prefix[j], q->name);
            s = add_entry(&e, &n, &cap, names[k++], ST_F32, (int64_t)q->numel, q->f32, NULL);
        }
    if (!s) s = add_entry(&e, &n, &cap, "adam.m", ST_F32, (int64_t)st->nmom, st->m, NULL);
    if (!s) s = add_entry(&e, &n, &cap, "adam.v", ST_F32, (int64_t)st->nmom, st->v, NULL);
    if (!s && st->m2) s = add_entry(&e, &n, &cap, "adam2.m", ST_F32, (int64_t)st->nmom2, st->m2, NULL);
    if (!s && st->m2) s = add_entry(&e, &n, &cap, "adam2.v", ST_F32, (int64_t)st->nmom2, st->v2, NULL);
    if (!s) s = add_entry(&e, &n, &cap, "torch_rng.mt", ST_U32, 624, NULL, mt);
    if (!s) s = add_entry(&e, &n, &cap, "torch_rng.normal", ST_F64, 1, NULL, &gn);
    if (!s) s = add_entry(&e, &n, &cap, "ints", ST_I64, 4, NULL, ints);
    if (!s) {
        const char *meta[4] = { "format", st->format, "recipe", recipe };
        s = st_write(path, e, n, meta, 2);
    }
    free(e); free(names);
    return s;
}

static MsStatus pre_raw(const StFile *f, const char *name, StDtype dt, size_t n, const StTensor **out) {
    const StTensor *x = st_find(f, name);
    if (!x) return ms_errorf(MS_ERR_FORMAT, "%s: no tensor '%s'", f->origin, name);
    if (x->dtype != dt || x->numel != n)
        return ms_errorf(MS_ERR_FORMAT, "%s: '%s' is %s x %zu, expected %s x %zu", f->origin, name, st_dtype_name(x->dtype),
                         x->numel, st_dtype_name(dt), n);
    *out = x;
    return MS_OK;
}

static uint64_t le64(const unsigned char *p) {
    uint64_t v = 0;
    for (int i = 7; i >= 0; i--) v = v << 8 | p[i];
    return v;
}

/* A checkpoint's metadata "format" (which stage wrote it) into fmt. */
static MsStatus pre_format(const char *path, char *fmt, size_t cap) {
    StFile f;
    MsStatus s = st_open(&f, path);
    if (s) return s;
    const char *v = st_meta(&f, "format");
    snprintf(fmt, cap, "%s", v ? v : "");
    st_close(&f);
    return MS_OK;
}

/* The state, step and generator of a checkpoint pre_save wrote with the same format and recipe. */
static MsStatus pre_load(const char *path, const PreState *st, int64_t *step, MsTorchRng *g, const char *recipe) {
    StFile f;
    const StTensor *x;
    char key[MS_KEY_MAX + 16];
    MsStatus s = st_open(&f, path);
    if (s) return s;
    const char *fmt = st_meta(&f, "format"), *rec = st_meta(&f, "recipe");
    if (!fmt || strcmp(fmt, st->format)) {
        s = ms_errorf(MS_ERR_FORMAT, "%s: not a checkpoint of this stage (metadata format '%s', want '%s')", path,
                      fmt ? fmt : "", st->format);
        goto done;
    }
    if (!rec || strcmp(rec, recipe)) {
        s = ms_errorf(MS_ERR_ARG, "%s: written with other options:\n  checkpoint: %s\n  this run:   %s", path,
                      rec ? rec : "(none)", recipe);
        goto done;
    }
    for (int j = 0; j < st->n; j++)
        for (int i = 0; i < st->t[j]->n; i++) {
            MsParam *q = &st->t[j]->p[i];
            if (q->flags & MS_PARAM_BUFFER) continue;
            snprintf(key, sizeof key, "%s%s", st->prefix[j], q->name);
            if ((s = st_read_f32(&f, key, q->f32, q->numel, -1, NULL))) goto done;
        }
    if ((s = st_read_f32(&f, "adam.m", st->m, st->nmom, -1, NULL)) || (s = st_read_f32(&f, "adam.v", st->v, st->nmom, -1, NULL)))
        goto done;
    if (st->m2 && ((s = st_read_f32(&f, "adam2.m", st->m2, st->nmom2, -1, NULL)) ||
                   (s = st_read_f32(&f, "adam2.v", st->v2, st->nmom2, -1, NULL))))
        goto done;
    if ((s = pre_raw(&f, "torch_rng.mt", ST_U32, 624, &x))) goto done;
    for (int i = 0; i < 624; i++)
        g->mt[i] = (uint32_t)x->data[4 * i] | (uint32_t)x->data[4 * i + 1] << 8 | (uint32_t)x->data[4 * i + 2] << 16 |
                   (uint32_t)x->data[4 * i + 3] << 24;
    if ((s = pre_raw(&f, "torch_rng.normal", ST_F64, 1, &x))) goto done;
    {
        uint64_t b = le64(x->data);
        memcpy(&g->normal, &b, sizeof b);
    }
    if ((s = pre_raw(&f, "ints", ST_I64, 4, &x))) goto done;
    {
        int64_t k = (int64_t)le64(x->data), next = (int64_t)le64(x->data + 8);
        if (k < 0 || next < 0 || next > 624) { s = ms_errorf(MS_ERR_FORMAT, "%s: ints: step %lld, rng index %lld", path, (long long)k, (long long)next); goto done; }
        *step = k;
        g->next = (int)next;
        g->seed = le64(x->data + 16);
        g->has_normal = le64(x->data + 24) != 0;
    }
done:
    st_close(&f);
    return s;
}

/* loss.csv of a resumed run: the rows up to step k0 are kept (their losses into loss[]), later
 * ones (written after the checkpoint by the interrupted run) are dropped. */
static MsStatus pre_csv_resume(const char *path, int64_t k0, double *loss) {
    FILE *f = fopen(path, "r");
    char line[512], tmp[2600];
    if (!f) return ms_errorf(MS_ERR_IO, "%s: cannot read (resuming at step %lld)", path, (long long)k0);
    snprintf(tmp, sizeof tmp, "%s.tmp", path);
    FILE *o = fopen(tmp, "w");
    if (!o) { fclose(f); return ms_errorf(MS_ERR_IO, "%s: cannot open for writing", tmp); }
    int64_t got = 0;
    while (fgets(line, sizeof line, f)) {
        long long k;
        double l;
        if (sscanf(line, "%lld,%lf", &k, &l) == 2) {
            if (k < 1 || k > k0) continue;
            loss[k - 1] = l;
            got++;
        }
        fputs(line, o);
    }
    fclose(f);
    if (fclose(o) != 0 || rename(tmp, path) != 0) { remove(tmp); return ms_errorf(MS_ERR_IO, "%s: cannot rewrite", path); }
    if (got != k0) fprintf(stderr, "pretrain: %s has %lld of the %lld steps before the checkpoint\n", path, (long long)got, (long long)k0);
    return MS_OK;
}

static void pre_progress(const char *label, int64_t k, int64_t k0, int64_t n, double loss, double t0, int tty) {
    double el = ms_time() - t0, per = el / (double)(k - k0), eta = per * (double)(n - k);
    char bar[31];
    int fill = n > 0 ? (int)(30 * k / n) : 30;
    for (int i = 0; i < 30; i++) bar[i] = i < fill ? '#' : '.';
    bar[30] = '\0';
    fprintf(stderr, "%s%s [%s] %lld/%lld loss %.4f (mean of the last 20) %.3f s/step ETA %02d:%02d:%02d%s", tty ? "\r" : "",
            label, bar, (long long)k, (long long)n, loss, per, (int)(eta / 3600), (int)(eta / 60) % 60, (int)eta % 60,
            tty ? "" : "\n");
    fflush(stderr);
}

/* ---- one stage's training loop ---- */
/* --resume FILE of a stage: its state, step (*k) and generator from the checkpoint, said on stderr
 * ("pretrain: <what>resumed at step K from FILE"); without one, *k = 0 and nothing else changes. */
static MsStatus pre_resume(const char *resume, const char *what, const PreState *st, MsTorchRng *g, const char *recipe,
                           int64_t *k) {
    *k = 0;
    if (!resume) return MS_OK;
    MsStatus s = pre_load(resume, st, k, g, recipe);
    if (!s) fprintf(stderr, "pretrain: %sresumed at step %lld from %s\n", what, (long long)*k, resume);
    return s;
}

static int pre_exists(const char *path) {
    FILE *f = fopen(path, "rb");
    if (f) fclose(f);
    return f != NULL;
}

/* An output of stage `label` that exists already is refused (before training, not after). */
static MsStatus pre_fresh(const char *path, const char *label) {
    if (!pre_exists(path)) return MS_OK;
    return ms_errorf(MS_ERR_ARG, "pretrain: %s already exists (the %s stage writes it)", path, label);
}

/* Every stage runs through pre_loop: optimizer steps until `steps`, a row of csv per step
 * ("step,loss,<the stage's columns>,seconds"), progress with the mean loss of the last 20 steps
 * and an ETA, an atomic checkpoint every --checkpoint-every steps and at the end, then the svg.
 * Its files are DIR/<prefix>loss.csv, <prefix>loss.svg and <prefix>checkpoint.safetensors. A
 * stage resuming has loaded its checkpoint before: the loop starts at its step count, and the
 * csv keeps its rows up to there. */
typedef struct {
    const char *label, *columns;        /* "vae"; the stage's csv columns after "step,loss," */
    int64_t steps;
    char csv[2400], svg[2400], ckpt[2400];  /* pre_loop fills these and the rest from the args */
    int64_t ckpt_every;
    int quiet;
    void *ctx;
    int64_t (*count)(void *ctx);                                        /* steps done */
    MsStatus (*step)(void *ctx, double *loss, char *cols, size_t cap);  /* one step; its csv columns */
    MsStatus (*save)(void *ctx, const char *path);                      /* checkpoint */
} PreLoop;

static MsStatus pre_loop(PreLoop *L, const PreArgs *a, const char *prefix) {
    snprintf(L->csv, sizeof L->csv, "%s/%sloss.csv", a->out, prefix);
    snprintf(L->svg, sizeof L->svg, "%s/%sloss.svg", a->out, prefix);
    snprintf(L->ckpt, sizeof L->ckpt, "%s/%scheckpoint.safetensors", a->out, prefix);
    L->ckpt_every = a->ckpt_every; L->quiet = a->quiet;
    const int64_t k0 = L->count(L->ctx);
    const int tty = !L->quiet && stderr_tty();
    double *losses = (double *)calloc((size_t)L->steps + 1, sizeof(double));
    FILE *csv = NULL;
    MsStatus s = MS_OK;
    if (!losses) return ms_errorf(MS_ERR_NOMEM, "pretrain: out of memory");
    if (k0 > L->steps) {
        s = ms_errorf(MS_ERR_ARG, "pretrain: the %s checkpoint is at step %lld, beyond its %lld steps", L->label,
                      (long long)k0, (long long)L->steps);
        goto done;
    }
    if (k0 > 0) {
        FILE *f = fopen(L->csv, "r");
        if (f) { fclose(f); if ((s = pre_csv_resume(L->csv, k0, losses))) goto done; }
    }
    if (!(csv = fopen(L->csv, k0 > 0 ? "a" : "w"))) { s = ms_errorf(MS_ERR_IO, "%s: cannot open for writing", L->csv); goto done; }
    if (k0 == 0) fprintf(csv, "step,loss,%s,seconds\n", L->columns);
    {
        const double t0 = ms_time();
        while (L->count(L->ctx) < L->steps) {
            char cols[256];
            double loss;
            const double ts = ms_time();
            if ((s = L->step(L->ctx, &loss, cols, sizeof cols))) goto done;
            const int64_t k = L->count(L->ctx);
            losses[k - 1] = loss;
            fprintf(csv, "%lld,%.9g,%s,%.4f\n", (long long)k, loss, cols, ms_time() - ts);
            fflush(csv);
            if (!L->quiet && (tty || k % 10 == 0 || k == L->steps)) {
                double mean = 0.0;
                int64_t j0 = k > 20 ? k - 20 : 0;
                for (int64_t j = j0; j < k; j++) mean += losses[j];
                pre_progress(L->label, k, k0, L->steps, mean / (double)(k - j0), t0, tty);
            }
            if (L->ckpt_every > 0 && k % L->ckpt_every == 0 && k < L->steps && (s = L->save(L->ctx, L->ckpt))) goto done;
        }
        if (tty) fprintf(stderr, "\n");
    }
    if (fclose(csv)) { csv = NULL; s = ms_errorf(MS_ERR_IO, "%s: cannot write", L->csv); goto done; }
    csv = NULL;
    if (L->ckpt_every > 0 && (s = L->save(L->ctx, L->ckpt))) goto done;
    s = ms_write_loss_svg(L->svg, losses, L->count(L->ctx));
done:
    if (csv) fclose(csv);
    free(losses);
    return s;
}

/* ---- the vae stage ---- */
#define VAE_EVAL_SCENES 64      /* held-out scenes for the PSNR */
#define VAE_SCALE_SCENES 256    /* training scenes whose latents set scaling_factor */
#define VAE_SHEET 8             /* held-out scenes on the reconstruction sheet */

static MsStatus pre_vae_config(const PreArgs *a, VaeConfig *c) {
    ms_vae_config_sd15(c);
    c->sample_size = a->size;
    c->n_blocks = a->n_vae_ch;
    for (int i = 0; i < a->n_vae_ch; i++) {
        c->block_out_channels[i] = a->vae_ch[i];
        c->down_block_types[i] = MS_BLOCK_DOWN_ENCODER;
        c->up_block_types[i] = MS_BLOCK_UP_DECODER;
    }
    c->layers_per_block = a->vae_layers;
    c->norm_num_groups = a->vae_groups;
    c->latent_channels = a->vae_latent;
    c->scaling_factor = 1.0f;           /* measured at the end of the stage */
    MsStatus s = ms_vae_config_check(c);
    if (s) return s;
    if (a->size % (1 << (c->n_blocks - 1)))
        return ms_errorf(MS_ERR_ARG, "pretrain: --size %d is not a multiple of the VAE's factor %d", a->size, 1 << (c->n_blocks - 1));
    return MS_OK;
}

typedef struct {
    const PreArgs *a;
    MsVaePretrainer *p;
    MsTorchRng *g;
    PreState st;
    char recipe[1024];
    uint8_t *rgb;                       /* (S,S,3) */
    float *img;                         /* (3,S,S), a whole scene when training on crops */
    float *x;                           /* (B,3,C,C), C = the crop side or S */
} VaeRun;

static int64_t vae_count(void *ctx) { return ms_vae_pretrainer_step_count(((VaeRun *)ctx)->p); }

/* a batch of training scenes drawn from g (with --vae-crop, a random C x C window of each: the
 * network is convolutional, so it learns the same maps at a quarter of the cost), one step */
static MsStatus vae_step(void *ctx, double *loss, char *cols, size_t cap) {
    VaeRun *r = (VaeRun *)ctx;
    const int S = r->a->size, C = r->a->vae_crop ? r->a->vae_crop : S;
    MsVaePretrainReport rep;
    MsStatus s;
    for (int b = 0; b < r->a->vae_batch; b++) {
        int idx = (int)(ms_torch_random(r->g) % (uint32_t)r->a->scenes);
        float *xb = r->x + (size_t)b * 3 * C * C;
        if (C == S) {
            if ((s = pre_image(r->a->world_seed, idx, S, r->rgb, xb))) return s;
            continue;
        }
        WorldScene sc;
        world_scene_make(r->a->world_seed, idx, &sc);
        if ((s = pre_render(&sc, S, r->rgb, r->img))) return s;
        int y0 = (int)(ms_torch_random(r->g) % (uint32_t)(S - C + 1));
        int x0 = (int)(ms_torch_random(r->g) % (uint32_t)(S - C + 1));
        int no = 0;
        for (int k = 0; k < sc.n_groups; k++) no += sc.g[k].count;
        if (r->a->vae_crop_objects && no > 0) {
            /* the window around object o's centre (units: 1024 across), shifted by up to C/4 */
            int o = (int)(ms_torch_random(r->g) % (uint32_t)no), k = 0;
            while (o >= sc.g[k].count) o -= sc.g[k++].count;
            const int cx = sc.g[k].x[o] * S / 1024, cy = sc.g[k].y[o] * S / 1024;
            x0 = cx - C / 2 + (x0 % (C / 2 + 1)) - C / 4;
            y0 = cy - C / 2 + (y0 % (C / 2 + 1)) - C / 4;
            x0 = x0 < 0 ? 0 : x0 > S - C ? S - C : x0;
            y0 = y0 < 0 ? 0 : y0 > S - C ? S - C : y0;
        }
        for (int ch = 0; ch < 3; ch++)
            for (int y = 0; y < C; y++)
                memcpy(xb + ((size_t)ch * C + y) * C, r->img + ((size_t)ch * S + y0 + y) * S + x0, (size_t)C * sizeof(float));
    }
    if ((s = ms_vae_pretrain_step(r->p, r->x, NULL, r->g, &rep))) return s;
    *loss = rep.loss;
    snprintf(cols, cap, "%.9g,%.9g,%.9g", rep.rec, rep.kl, rep.lr);
    return MS_OK;
}

static MsStatus vae_save(void *ctx, const char *path) {
    VaeRun *r = (VaeRun *)ctx;
    return pre_save(path, &r->st, ms_vae_pretrainer_step_count(r->p), r->g, r->recipe);
}

/* The trained VAE's scaling_factor, SD's recipe (LDM's scale_by_std): 1 / std (unbiased, about
 * the mean) of the posterior samples of the first VAE_SCALE_SCENES training scenes, noise from g. */
static MsStatus vae_scale(const PreArgs *a, VaeConfig *c, const VaeParams *vp, Arena *ar, MsTorchRng *g, uint8_t *rgb,
                          float *x) {
    const int S = a->size, f = 1 << (c->n_blocks - 1), n = a->scenes < VAE_SCALE_SCENES ? a->scenes : VAE_SCALE_SCENES;
    const size_t nl = (size_t)c->latent_channels * (S / f) * (S / f), N = (size_t)n * nl;
    float *z = (float *)ms_alloc_aligned(N, sizeof(float)), *lv = (float *)ms_alloc_aligned(nl, sizeof(float)),
          *noise = (float *)ms_alloc_aligned(nl, sizeof(float));
    MsStatus s = z && lv && noise ? MS_OK : ms_errorf(MS_ERR_NOMEM, "pretrain: out of memory");
    for (int i = 0; !s && i < n; i++) {
        arena_reset(ar, 0);
        if ((s = pre_image(a->world_seed, i, S, rgb, x)) || (s = vae_encode(vp, ar, z + (size_t)i * nl, lv, x, 1, S, S))) break;
        ms_torch_randn(g, noise, nl, MS_TORCH_CPU_AVX2);
        vae_posterior_sample(z + (size_t)i * nl, NULL, z + (size_t)i * nl, lv, noise, nl, 1.0f);
    }
    if (!s) {
        double mean = 0.0, var = 0.0;
        for (size_t i = 0; i < N; i++) mean += z[i];
        mean /= (double)N;
        for (size_t i = 0; i < N; i++) var += ((double)z[i] - mean) * ((double)z[i] - mean);
        var /= (double)(N > 1 ? N - 1 : 1);
        if (!(var > 0.0) || !(var < 1e30)) s = ms_errorf(MS_ERR_FORMAT, "pretrain: the latents' variance is %g", var);
        else c->scaling_factor = (float)(1.0 / sqrt(var));
        if (!s && !a->quiet)
            fprintf(stderr, "vae: latents of %d training scenes: mean %.4f, std %.4f -> scaling_factor %.6g\n", n, mean,
                    sqrt(var), (double)c->scaling_factor);
    }
    ms_free_aligned(z); ms_free_aligned(lv); ms_free_aligned(noise);
    return s;
}

/* PSNR (8-bit pixels, as sampling writes them) of the reconstructions (posterior mean, decoded) of
 * n scenes from index i0: the mean over the scenes of 10 log10(255^2 / MSE). With sheet, the first
 * VAE_SHEET scenes above their reconstructions as a PNG. */
static MsStatus vae_psnr(const PreArgs *a, const VaeConfig *c, const VaeParams *vp, Arena *ar, int i0, int n,
                         uint8_t *rgb, float *x, const char *sheet, double *psnr) {
    const int S = a->size, f = 1 << (c->n_blocks - 1), W = VAE_SHEET * S;
    const size_t nl = (size_t)c->latent_channels * (S / f) * (S / f), P = (size_t)S * S;
    float *mean = (float *)ms_alloc_aligned(nl, sizeof(float)), *lv = (float *)ms_alloc_aligned(nl, sizeof(float)),
          *y = (float *)ms_alloc_aligned(3 * P, sizeof(float));
    uint8_t *out = (uint8_t *)malloc(3 * P), *sh = sheet ? (uint8_t *)calloc((size_t)2 * S * W * 3, 1) : NULL;
    MsStatus s = mean && lv && y && out && (sh || !sheet) ? MS_OK : ms_errorf(MS_ERR_NOMEM, "pretrain: out of memory");
    double sum = 0.0;
    for (int i = 0; !s && i < n; i++) {
        arena_reset(ar, 0);
        if ((s = pre_image(a->world_seed, i0 + i, S, rgb, x)) || (s = vae_encode(vp, ar, mean, lv, x, 1, S, S))) break;
        for (size_t j = 0; j < nl; j++) mean[j] *= c->scaling_factor;
        arena_reset(ar, 0);
        if ((s = vae_decode(vp, ar, y, mean, 1, S / f, S / f))) break;
        ms_image_to_u8(out, y, 3, S, S);
        double se = 0.0;
        for (size_t j = 0; j < 3 * P; j++) se += ((double)out[j] - rgb[j]) * ((double)out[j] - rgb[j]);
        sum += se > 0.0 ? 10.0 * log10(255.0 * 255.0 * 3.0 * (double)P / se) : 99.0;
        if (sh && i < VAE_SHEET)
            for (int row = 0; row < S; row++) {
                memcpy(sh + ((size_t)row * W + (size_t)i * S) * 3, rgb + (size_t)row * S * 3, (size_t)S * 3);
                memcpy(sh + ((size_t)(S + row) * W + (size_t)i * S) * 3, out + (size_t)row * S * 3, (size_t)S * 3);
            }
    }
    if (!s) *psnr = sum / n;
    if (!s && sh) s = ms_png_write(sheet, sh, W, 2 * S, 3);
    ms_free_aligned(mean); ms_free_aligned(lv); ms_free_aligned(y);
    free(out); free(sh);
    return s;
}

/* The vae stage: AutoencoderKL from scratch on the scenes -> DIR/vae/ (+ the measurements). */
static MsStatus stage_vae(const PreArgs *a, const char *resume) {
    VaeConfig vc;
    MsParamTable w;
    VaeRun r;
    PreLoop L;
    int64_t k0;                         /* the step resumed at (0: none) */
    VaeParams vp;
    VaeSizes vz;
    Arena ar;
    char out[2400], sheet[2400];
    const int S = a->size, C = a->vae_crop ? a->vae_crop : S;
    MsStatus s;
    memset(&w, 0, sizeof w); memset(&r, 0, sizeof r); memset(&L, 0, sizeof L); memset(&ar, 0, sizeof ar);
    if ((s = pre_vae_config(a, &vc))) return s;
    if (C > S || C % (1 << (vc.n_blocks - 1)))
        return ms_errorf(MS_ERR_ARG, "pretrain: --vae-crop %d must be at most --size %d and a multiple of the VAE's factor %d",
                         C, S, 1 << (vc.n_blocks - 1));
    r.a = a;
    r.g = (MsTorchRng *)malloc(sizeof *r.g);
    r.rgb = (uint8_t *)malloc((size_t)S * S * 3);
    r.img = (float *)ms_alloc_aligned((size_t)3 * S * S, sizeof(float));
    r.x = (float *)ms_alloc_aligned((size_t)a->vae_batch * 3 * S * S, sizeof(float));
    if (!r.g || !r.rgb || !r.img || !r.x) { s = ms_errorf(MS_ERR_NOMEM, "pretrain: out of memory"); goto done; }
    if ((s = ms_param_table_vae(&vc, &w)) || (s = ms_param_table_alloc(&w, NULL))) goto done;
    memset(w.mem, 0, w.mem_bytes);
    ms_torch_seed(r.g, a->seed);          /* weights first, then scenes and noise from the same generator */
    if ((s = ms_pretrain_init_weights(&w, r.g)) || (s = ms_vae_pretrainer_create(&r.p, &vc, &w, &a->vpc, a->vae_batch, C, C)))
        goto done;
    r.st.format = VAE_FORMAT; r.st.n = 1; r.st.t[0] = &w; r.st.prefix[0] = "vae.";
    ms_vae_pretrainer_moments(r.p, &r.st.m, &r.st.v, &r.st.nmom);
    snprintf(r.recipe, sizeof r.recipe, "stage=vae size=%d crop=%d%s batch=%d scenes=%d world_seed=%llu seed=%llu lr=%.17g warmup=%lld "
             "betas=%.17g,%.17g eps=%.17g wd=%.17g kl_weight=%.17g mse=%d params=%016llx groups=%d latent=%d", S,
             C, a->vae_crop_objects ? " crop_at=objects" : "", a->vae_batch, a->scenes, (unsigned long long)a->world_seed, (unsigned long long)a->seed, a->vpc.lr,
             (long long)a->vpc.warmup, a->vpc.beta1, a->vpc.beta2, a->vpc.adam_eps, a->vpc.weight_decay, a->vpc.kl_weight,
             a->vpc.mse, (unsigned long long)pre_tables_hash(&r.st), vc.norm_num_groups, vc.latent_channels);
    if ((s = pre_resume(resume, "vae stage ", &r.st, r.g, r.recipe, &k0))) goto done;
    ms_vae_pretrainer_set_step(r.p, k0);
    snprintf(out, sizeof out, "%s/vae", a->out);
    if ((s = pre_fresh(out, "vae"))) goto done;
    if (!a->quiet)
        fprintf(stderr, "pretrain: vae stage: AutoencoderKL %zu parameters (%d blocks, %d..%d channels, factor %d, latent "
                "%dx%dx%d, %d groups), %s + %g KL; %d scenes %dx%d of world seed %llu, batch %d (%dx%d windows), %lld steps, output %s\n",
                ms_param_table_numel(&w), vc.n_blocks, vc.block_out_channels[0], vc.block_out_channels[vc.n_blocks - 1],
                1 << (vc.n_blocks - 1), vc.latent_channels, S >> (vc.n_blocks - 1), S >> (vc.n_blocks - 1),
                vc.norm_num_groups, a->vpc.mse ? "MSE" : "L1", a->vpc.kl_weight, a->scenes, S, S,
                (unsigned long long)a->world_seed, a->vae_batch, C, C, (long long)a->vae_steps, out);
    L.label = "vae"; L.columns = "rec,kl,lr"; L.steps = a->vae_steps;
    L.ctx = &r; L.count = vae_count; L.step = vae_step; L.save = vae_save;
    if ((s = pre_loop(&L, a, "vae_"))) goto done;
    /* scaling_factor, held-out PSNR, the folder */
    {
        double ph = 0.0, pt = 0.0;
        if ((s = vae_params_init(&vp, &vc, &w)) || (s = vae_sizes(&vc, S, S, -1, &vz)) ||
            (s = arena_init(&ar, vz.encode_bytes > vz.decode_bytes ? vz.encode_bytes : vz.decode_bytes)) ||
            (s = vae_scale(a, &vc, &vp, &ar, r.g, r.rgb, r.x)))
            goto done;
        vp.cfg.scaling_factor = vc.scaling_factor;
        snprintf(sheet, sizeof sheet, "%s/vae_reconstructions.png", a->out);
        if ((s = vae_psnr(a, &vc, &vp, &ar, a->scenes, VAE_EVAL_SCENES, r.rgb, r.x, sheet, &ph)) ||
            (s = vae_psnr(a, &vc, &vp, &ar, 0, VAE_EVAL_SCENES < a->scenes ? VAE_EVAL_SCENES : a->scenes, r.rgb, r.x, NULL, &pt)))
            goto done;
        if (!a->quiet)
            fprintf(stderr, "vae: PSNR %.2f dB on %d held-out scenes (indices %d..%d), %.2f dB on training scenes; %s\n", ph,
                    VAE_EVAL_SCENES, a->scenes, a->scenes + VAE_EVAL_SCENES - 1, pt, sheet);
        if ((s = ms_write_vae_folder(&vc, &w, out))) goto done;
        if (!a->quiet) fprintf(stderr, "pretrain: wrote %s/vae_loss.csv, vae_loss.svg and %s\n", a->out, out);
    }
done:
    arena_free(&ar);
    ms_vae_pretrainer_free(r.p);
    ms_param_table_free(&w);
    free(r.g); free(r.rgb);
    ms_free_aligned(r.img); ms_free_aligned(r.x);
    return s;
}

/* ---- the unet stage ---- */
typedef struct {
    const PreArgs *a;
    MsPretrainer *p;
    MsTorchRng *g;
    PreData *d;
    PreState st;
    char recipe[1024];
    float *lat;                         /* (B, lat_n) */
    char **caps;                        /* B captions */
} UnetRun;

static int64_t unet_count(void *ctx) { return ms_pretrainer_step_count(((UnetRun *)ctx)->p); }

/* a batch of training scenes (latents, captions) drawn from g, one step */
static MsStatus unet_step(void *ctx, double *loss, char *cols, size_t cap) {
    UnetRun *r = (UnetRun *)ctx;
    MsPretrainReport rep;
    MsStatus s;
    for (int b = 0; b < r->a->batch; b++) {
        int idx = (int)(ms_torch_random(r->g) % (uint32_t)r->d->n);
        if ((s = pre_latent(r->d, idx, r->lat + (size_t)b * r->d->lat_n, r->caps[b], 1024))) return s;
    }
    if ((s = ms_pretrain_step(r->p, r->lat, (const char *const *)r->caps, NULL, r->g, &rep))) return s;
    *loss = rep.loss;
    snprintf(cols, cap, "%.9g", rep.lr);
    return MS_OK;
}

static MsStatus unet_save(void *ctx, const char *path) {
    UnetRun *r = (UnetRun *)ctx;
    return pre_save(path, &r->st, ms_pretrainer_step_count(r->p), r->g, r->recipe);
}

int ms_zero_unused_token_rows(MsParamTable *text, const unsigned char *used) {
    const int i = ms_param_find(text, "text_model.embeddings.token_embedding.weight");
    if (i < 0 || text->p[i].ndim != 2 || !text->p[i].f32) {
        ms_errorf(MS_ERR_FORMAT, "text encoder: no token table text_model.embeddings.token_embedding.weight");
        return -1;
    }
    const MsParam *q = &text->p[i];
    const int64_t V = q->shape[0], D = q->shape[1];
    int kept = 0;
    for (int64_t v = 0; v < V; v++) {
        if (used[v]) { kept++; continue; }
        memset(q->f32 + v * D, 0, (size_t)D * sizeof(float));
    }
    return kept;
}

/* The token ids the unet stage can train, used[id] = 1: those of every caption unet_step can draw
 * (pre_item: scenes 0..--scenes-1 and the --creatures renders; world_caption depends on the world seed and the index only, its synonyms
 * and word order included) and of "" (dropped captions), tokenized as ms_pretrain_step does (77
 * ids: BOS, the tokens, EOS, padded with EOS; truncated). Rows of other ids never had a gradient. */
static MsStatus unet_used_tokens(const PreArgs *a, const ClipTokenizer *tok, unsigned char *used, int V) {
    char cap[1024];
    int32_t ids[77];
    MsStatus s;
    for (int idx = -1; idx < a->scenes + a->creatures; idx++) {
        WorldScene sc;
        cap[0] = '\0';
        if (idx >= 0 && (s = pre_item(a->world_seed, a->scenes, idx, &sc, cap, sizeof cap))) return s;
        if ((s = clip_tokenize(tok, cap, strlen(cap), ids, 77))) return s;
        for (int k = 0; k < 77; k++) {
            if (ids[k] < 0 || ids[k] >= V) return ms_errorf(MS_ERR_ARG, "pretrain: token id %d outside the text encoder's %d", ids[k], V);
            used[ids[k]] = 1;
        }
    }
    return MS_OK;
}

/* --text-encoder: the text tower's weights into the model's text table (same config: pre_configs) */
static MsStatus pre_text_from_file(const char *path, MsParamTable *text) {
    EvalNet e;
    MsStatus s = evalnet_load(path, &e, NULL, NULL);
    if (s) return s;
    for (int i = 0; i < text->n && !s; i++) {
        MsParam *q = &text->p[i];
        const int j = ms_param_find(&e.text, q->name);
        if (q->flags & MS_PARAM_BUFFER) continue;
        if (j < 0 || e.text.p[j].numel != q->numel || !e.text.p[j].f32)
            s = ms_errorf(MS_ERR_SHAPE, "%s: the text tower has no %s of %zu values", path, q->name, q->numel);
        else memcpy(q->f32, e.text.p[j].f32, q->numel * sizeof(float));
    }
    evalnet_free(&e);
    return s;
}

/* The unet stage: UNet + text encoder on the frozen VAE's latents -> DIR/model/. Its VAE: --vae,
 * else DIR/vae (the vae stage's), else the embedded random tiny one. */
static MsStatus stage_unet(const PreArgs *a, const char *resume) {
    MsModel m;
    ClipTokenizer tok;
    PreData d;
    UnetRun r;
    PreLoop L;
    int64_t k0;                         /* the step resumed at (0: none) */
    char vae_dir[2048], tok_dir[2048], path[2400];
    int tok_ok = 0, shipped = 0;
    MsStatus s = MS_OK;
    memset(&m, 0, sizeof m); memset(&d, 0, sizeof d); memset(&r, 0, sizeof r); memset(&L, 0, sizeof L);
    r.a = a; r.d = &d;
    if (!(r.g = (MsTorchRng *)malloc(sizeof *r.g))) return ms_errorf(MS_ERR_NOMEM, "pretrain: out of memory");
    snprintf(vae_dir, sizeof vae_dir, "%s/vae/config.json", a->out);
    if (a->vae_dir) snprintf(vae_dir, sizeof vae_dir, "%s", a->vae_dir);
    else if (pre_exists(vae_dir)) snprintf(vae_dir, sizeof vae_dir, "%s/vae", a->out);
    else if (!ms_find_data("models/tiny-sd/vae", vae_dir, sizeof vae_dir)) {
        s = ms_errorf(MS_ERR_IO, "pretrain: no --vae, no %s/vae and the embedded models/tiny-sd/vae was not found", a->out);
        goto done;
    }
    if ((s = ms_find_tokenizer(NULL, a->tok_dir, tok_dir, sizeof tok_dir, &shipped))) goto done;
    if ((s = ms_clip_tokenizer_load(tok_dir, &tok))) goto done;
    tok_ok = 1;
    if ((s = pre_load_vae(vae_dir, &m))) goto done;
    {
        const int f = 1 << (m.vae_config.n_blocks - 1);
        if (a->size % f) { s = ms_errorf(MS_ERR_ARG, "pretrain: --size %d is not a multiple of the VAE's factor %d", a->size, f); goto done; }
        if ((s = pre_configs(a, &m.vae_config, a->size / f, &m))) goto done;
    }
    if ((s = ms_param_table_unet(&m.unet_config, &m.unet)) || (s = ms_param_table_alloc(&m.unet, NULL)) ||
        (s = ms_param_table_text(&m.text_config, &m.text)) || (s = ms_param_table_alloc(&m.text, NULL)))
        goto done;
    memset(m.unet.mem, 0, m.unet.mem_bytes);
    memset(m.text.mem, 0, m.text.mem_bytes);
    /* weights first, then everything else draws from the same generator */
    ms_torch_seed(r.g, a->seed);
    if ((s = ms_pretrain_init_weights(&m.unet, r.g)) || (s = ms_pretrain_init_weights(&m.text, r.g))) goto done;
    if (a->text_file && (s = pre_text_from_file(a->text_file, &m.text))) goto done;
    {
        const int latent = m.unet_config.sample_size;
        if ((s = ms_pretrainer_create(&r.p, &m, &tok, &a->pc, a->batch, latent, latent))) goto done;
        if ((s = pre_data_init(&d, &m, a, latent))) goto done;
    }
    r.st.format = UNET_FORMAT; r.st.n = 2;
    r.st.t[0] = &m.unet; r.st.prefix[0] = "unet.";
    r.st.t[1] = &m.text; r.st.prefix[1] = "text_encoder.";
    ms_pretrainer_moments(r.p, &r.st.m, &r.st.v, &r.st.nmom);
    pre_recipe(r.recipe, sizeof r.recipe, a, &m, &r.st);
    r.lat = (float *)ms_alloc_aligned((size_t)a->batch * d.lat_n, sizeof(float));
    r.caps = (char **)calloc((size_t)a->batch, sizeof(char *));
    if (!r.lat || !r.caps) { s = ms_errorf(MS_ERR_NOMEM, "pretrain: out of memory"); goto done; }
    for (int b = 0; b < a->batch; b++)
        if (!(r.caps[b] = (char *)malloc(1024))) { s = ms_errorf(MS_ERR_NOMEM, "pretrain: out of memory"); goto done; }
    s = pre_resume(resume, "", &r.st, r.g, r.recipe, &k0);
    if (s && resume && a->pc.decay > 0) {
        /* a checkpoint of the same options without --decay, taken before the decay starts, has had
         * the same lr schedule: the run continues from it into the decay */
        PreArgs b = *a;
        char base[1024];
        b.pc.decay = 0;
        pre_recipe(base, sizeof base, &b, &m, &r.st);
        if (!(s = pre_resume(resume, "", &r.st, r.g, base, &k0)) && k0 > a->steps - a->pc.decay)
            s = ms_errorf(MS_ERR_ARG, "%s: a checkpoint without --decay at step %lld, but the decay starts after step %lld",
                          resume, (long long)k0, (long long)(a->steps - a->pc.decay));
    }
    if (s) goto done;
    ms_pretrainer_set_step(r.p, k0);
    snprintf(path, sizeof path, "%s/model", a->out);
    if ((s = pre_fresh(path, "unet"))) goto done;
    if (!a->quiet) {
        const UNetConfig *u = &m.unet_config;
        fprintf(stderr, "pretrain: UNet %zu parameters (%d blocks, %d..%d channels, latent %dx%d), text encoder %zu "
                "(width %d, %d layers), VAE %s (frozen); %d scenes + %d creature renders %dx%d of world seed %llu, batch "
                "%d, %lld steps, output %s\n", ms_param_table_numel(&m.unet), u->n_blocks, u->block_out_channels[0],
                u->block_out_channels[u->n_blocks - 1], u->sample_size, u->sample_size, ms_param_table_numel(&m.text),
                m.text_config.hidden_size, m.text_config.num_hidden_layers, vae_dir, a->scenes, a->creatures, a->size, a->size,
                (unsigned long long)a->world_seed, a->batch, (long long)a->steps, a->out);
    }
    L.label = "unet"; L.columns = "lr"; L.steps = a->steps;
    L.ctx = &r; L.count = unet_count; L.step = unet_step; L.save = unet_save;
    if ((s = pre_loop(&L, a, ""))) goto done;
    {   /* the written model only (the checkpoint keeps every row): rows no caption reaches zeroed */
        const int V = m.text_config.vocab_size;
        unsigned char *used = (unsigned char *)calloc((size_t)V, 1);
        int kept = -1;
        if (!used) { s = ms_errorf(MS_ERR_NOMEM, "pretrain: out of memory"); goto done; }
        if (!(s = unet_used_tokens(a, &tok, used, V)) && (kept = ms_zero_unused_token_rows(&m.text, used)) < 0) s = MS_ERR_FORMAT;
        free(used);
        if (s) goto done;
        if (!a->quiet) fprintf(stderr, "text encoder: %d of %d token rows used; the others zeroed (never trained)\n", kept, V);
    }
    if ((s = ms_write_model_folder(&m, tok_dir, path, 0))) goto done;
    if (!a->quiet) fprintf(stderr, "pretrain: wrote %s/loss.csv, loss.svg and %s (sample it with mixshow sample --model %s)\n",
                           a->out, path, path);
done:
    if (r.caps) for (int b = 0; b < a->batch; b++) free(r.caps[b]);
    free(r.caps);
    ms_free_aligned(r.lat);
    pre_data_free(&d);
    ms_pretrainer_free(r.p);
    ms_model_free(&m);
    if (tok_ok) clip_tokenizer_free(&tok);
    free(r.g);
    return s;
}

/* ---- the adapters stage ---- */
#define ADAPTER_FORMAT "mixshow pretrain adapters checkpoint 1"
#define AD_RENDERS 500          /* creature renders 0..499 (mixshow eval holds out 500..999) */

/* Training item j of the adapters stage: j < scenes: base scene j (objects and their spokes and
 * outlines; its caption), else creature (j - scenes) % WORLD_MAX_CHARACTERS in render
 * (j - scenes) / WORLD_MAX_CHARACTERS % AD_RENDERS, captioned "a creature, <pose words>, ...". */
static MsStatus ad_item(uint64_t seed, int scenes, int j, WorldScene *sc, char *cap, size_t capn) {
    if (j < scenes) {
        world_scene_make(seed, j, sc);
        return world_caption(seed, j, sc, cap, capn);
    }
    const int c = (j - scenes) % WORLD_MAX_CHARACTERS, img = (j - scenes) / WORLD_MAX_CHARACTERS % AD_RENDERS;
    WorldCharacter ch;
    world_character_make(seed, c, &ch);
    world_character_scene(seed, &ch, c, img, sc);
    return world_character_caption(seed, c, img, sc, "a creature", cap, capn);
}

typedef struct {
    const PreArgs *a;
    MsAdapterTrainer *p[2];             /* pose, sketch */
    MsTorchRng *g;
    PreState st;
    char recipe[1024];
    int S, n_items, lat_n;
    float scale;                        /* the VAE's scaling_factor */
    VaeParams vp;
    Arena var;                          /* VAE encoder scratch */
    float *cache;                       /* (n_items, lat_n) latents, posterior mean * scale */
    unsigned char *have;
    uint8_t *rgb, *pose, *sketch;       /* (S,S,3) */
    float *img, *mean, *logvar;         /* (3,S,S), (lat_n) x2 */
    float *lat, *cpose, *csketch;       /* (B,lat_n), (B,3,S,S), (B,1,S,S) */
    char **caps;
} AdapterRun;

static int64_t ad_count(void *ctx) { return ms_adapter_trainer_step_count(((AdapterRun *)ctx)->p[0]); }

/* Item j into batch slot b: caption, latent (encoded once, then cached), both conditions in [0, 1]. */
static MsStatus ad_load(AdapterRun *r, int j, int b) {
    const int S = r->S;
    const size_t P = (size_t)S * S;
    WorldScene sc;
    MsStatus s;
    if ((s = ad_item(r->a->world_seed, r->a->scenes, j, &sc, r->caps[b], 1024))) return s;
    if ((s = world_render(&sc, S, r->rgb, NULL, r->pose, r->sketch))) return s;
    for (size_t i = 0; i < P; i++) {
        for (int ch = 0; ch < 3; ch++) r->cpose[((size_t)b * 3 + ch) * P + i] = (float)r->pose[3 * i + ch] / 255.0f;
        r->csketch[(size_t)b * P + i] = (float)r->sketch[3 * i] / 255.0f;     /* grey: white outlines on black */
    }
    if (!r->have[j]) {
        for (size_t i = 0; i < P; i++)                  /* ToTensor + Normalize(0.5, 0.5) */
            for (int ch = 0; ch < 3; ch++) r->img[ch * P + i] = (float)r->rgb[3 * i + ch] / 255.0f * 2.0f - 1.0f;
        arena_reset(&r->var, 0);
        if ((s = vae_encode(&r->vp, &r->var, r->mean, r->logvar, r->img, 1, S, S))) return s;
        for (int i = 0; i < r->lat_n; i++) r->cache[(size_t)j * r->lat_n + i] = r->mean[i] * r->scale;
        r->have[j] = 1;
    }
    memcpy(r->lat + (size_t)b * r->lat_n, r->cache + (size_t)j * r->lat_n, (size_t)r->lat_n * sizeof(float));
    return MS_OK;
}

/* a batch of items drawn from g; the pose adapter's step draws, the sketch adapter's reuses them */
static MsStatus ad_step(void *ctx, double *loss, char *cols, size_t cap) {
    AdapterRun *r = (AdapterRun *)ctx;
    MsPretrainReport rp, rs;
    MsStatus s;
    for (int b = 0; b < r->a->ad_batch; b++)
        if ((s = ad_load(r, (int)(ms_torch_random(r->g) % (uint32_t)r->n_items), b))) return s;
    if ((s = ms_adapter_train_step(r->p[0], r->lat, r->cpose, (const char *const *)r->caps, NULL, r->g, &rp)) ||
        (s = ms_adapter_train_step(r->p[1], r->lat, r->csketch, (const char *const *)r->caps, &rp.used, NULL, &rs)))
        return s;
    *loss = 0.5 * (rp.loss + rs.loss);
    snprintf(cols, cap, "%.9g,%.9g,%.9g", rp.loss, rs.loss, rp.lr);
    return MS_OK;
}

static MsStatus ad_save(void *ctx, const char *path) {
    AdapterRun *r = (AdapterRun *)ctx;
    return pre_save(path, &r->st, ms_adapter_trainer_step_count(r->p[0]), r->g, r->recipe);
}

/* The adapters stage: a pose and a sketch T2I-Adapter on the frozen DIR/model -> DIR/adapters/. */
static MsStatus stage_adapters(const PreArgs *a, const char *resume) {
    static const char *const names[2] = { "pose", "sketch" };
    MsModel m;
    ClipTokenizer tok;
    AdapterRun r;
    PreLoop L;
    int64_t k0;                         /* the step resumed at (0: none) */
    AdapterConfig ac[2];
    MsParamTable w[2];
    VaeSizes vz;
    char model[2400], tok_dir[2048], out[2][2400], dir[2300];
    int tok_ok = 0, shipped = 0;
    const int S = a->size;
    MsStatus s = MS_OK;
    memset(&m, 0, sizeof m); memset(&r, 0, sizeof r); memset(&L, 0, sizeof L); memset(w, 0, sizeof w);
    r.a = a; r.S = S;
    if (!(r.g = (MsTorchRng *)malloc(sizeof *r.g))) return ms_errorf(MS_ERR_NOMEM, "pretrain: out of memory");
    snprintf(model, sizeof model, "%s/model", a->out);
    if ((s = ms_model_load(model, NULL, &m))) {
        char why[1024];
        snprintf(why, sizeof why, "%s", ms_last_error());   /* ms_errorf writes the buffer it returns */
        s = ms_errorf(s, "pretrain: the adapters stage trains on %s (the unet stage's): %s", model, why);
        goto done;
    }
    if ((s = ms_find_tokenizer(model, a->tok_dir, tok_dir, sizeof tok_dir, &shipped))) goto done;
    if ((s = ms_clip_tokenizer_load(tok_dir, &tok))) goto done;
    tok_ok = 1;
    const int f = 1 << (m.vae_config.n_blocks - 1), latent = S / f;
    if (S % f || latent != m.unet_config.sample_size) {
        s = ms_errorf(MS_ERR_ARG, "pretrain: --size %d: %s has latents of %d (VAE factor %d)", S, model,
                      m.unet_config.sample_size, f);
        goto done;
    }
    ms_torch_seed(r.g, a->seed);          /* weights first (pose, sketch), then the data and draws */
    for (int k = 0; k < 2; k++) {
        memset(&ac[k], 0, sizeof ac[k]);
        ac[k].adapter_type = MS_ADAPTER_FULL;
        ac[k].in_channels = k ? 1 : 3;
        ac[k].n_channels = m.unet_config.n_blocks;
        for (int i = 0; i < ac[k].n_channels; i++) ac[k].channels[i] = m.unet_config.block_out_channels[i];
        ac[k].num_res_blocks = a->ad_res;
        ac[k].downscale_factor = f;
        if ((s = ms_param_table_adapter(&ac[k], &w[k])) || (s = ms_param_table_alloc(&w[k], NULL))) goto done;
        memset(w[k].mem, 0, w[k].mem_bytes);
        if ((s = ms_pretrain_init_weights(&w[k], r.g)) ||
            (s = ms_adapter_trainer_create(&r.p[k], &m, &tok, &ac[k], &w[k], &a->apc, a->ad_batch, latent, latent)))
            goto done;
    }
    /* data: items, cached latents of the model's own VAE */
    r.n_items = 2 * a->scenes;
    r.lat_n = m.vae_config.latent_channels * latent * latent;
    r.scale = m.vae_config.scaling_factor;
    if ((s = vae_params_init(&r.vp, &m.vae_config, &m.vae)) || (s = vae_sizes(&m.vae_config, S, S, -1, &vz)) ||
        (s = arena_init(&r.var, vz.encode_bytes)))
        goto done;
    {
        const size_t P = (size_t)S * S, B = (size_t)a->ad_batch;
        r.cache = (float *)malloc((size_t)r.n_items * r.lat_n * sizeof(float));
        r.have = (unsigned char *)calloc((size_t)r.n_items, 1);
        r.rgb = (uint8_t *)malloc(3 * P); r.pose = (uint8_t *)malloc(3 * P); r.sketch = (uint8_t *)malloc(3 * P);
        r.img = (float *)ms_alloc_aligned(3 * P, sizeof(float));
        r.mean = (float *)ms_alloc_aligned((size_t)r.lat_n, sizeof(float));
        r.logvar = (float *)ms_alloc_aligned((size_t)r.lat_n, sizeof(float));
        r.lat = (float *)ms_alloc_aligned(B * r.lat_n, sizeof(float));
        r.cpose = (float *)ms_alloc_aligned(B * 3 * P, sizeof(float));
        r.csketch = (float *)ms_alloc_aligned(B * P, sizeof(float));
        r.caps = (char **)calloc(B, sizeof(char *));
        if (!r.cache || !r.have || !r.rgb || !r.pose || !r.sketch || !r.img || !r.mean || !r.logvar || !r.lat || !r.cpose ||
            !r.csketch || !r.caps) {
            s = ms_errorf(MS_ERR_NOMEM, "pretrain: out of memory"); goto done;
        }
        for (size_t b = 0; b < B; b++)
            if (!(r.caps[b] = (char *)malloc(1024))) { s = ms_errorf(MS_ERR_NOMEM, "pretrain: out of memory"); goto done; }
    }
    r.st.format = ADAPTER_FORMAT; r.st.n = 2;
    r.st.t[0] = &w[0]; r.st.prefix[0] = "pose.";
    r.st.t[1] = &w[1]; r.st.prefix[1] = "sketch.";
    ms_adapter_trainer_moments(r.p[0], &r.st.m, &r.st.v, &r.st.nmom);
    ms_adapter_trainer_moments(r.p[1], &r.st.m2, &r.st.v2, &r.st.nmom2);
    snprintf(r.recipe, sizeof r.recipe, "stage=adapters size=%d batch=%d scenes=%d world_seed=%llu seed=%llu lr=%.17g "
             "warmup=%lld betas=%.17g,%.17g eps=%.17g wd=%.17g uncond=%.17g params=%016llx model=%016llx", S, a->ad_batch,
             a->scenes, (unsigned long long)a->world_seed, (unsigned long long)a->seed, a->apc.lr, (long long)a->apc.warmup,
             a->apc.beta1, a->apc.beta2, a->apc.adam_eps, a->apc.weight_decay, a->apc.uncond_p,
             (unsigned long long)pre_tables_hash(&r.st),
             (unsigned long long)pre_weights_hash(&m.vae, pre_weights_hash(&m.text, pre_weights_hash(&m.unet, 1469598103934665603ull))));
    if ((s = pre_resume(resume, "adapters stage ", &r.st, r.g, r.recipe, &k0))) goto done;
    ms_adapter_trainer_set_step(r.p[0], k0);
    ms_adapter_trainer_set_step(r.p[1], k0);
    snprintf(dir, sizeof dir, "%s/adapters", a->out);
    for (int k = 0; k < 2; k++) {
        snprintf(out[k], sizeof out[k], "%s/%s", dir, names[k]);
        if ((s = pre_fresh(out[k], "adapters"))) goto done;
    }
    if (!a->quiet)
        fprintf(stderr, "pretrain: adapters stage: pose %zu and sketch %zu parameters (channels %d..%d, %d resnets per level, "
                "factor %d) on %s (frozen); %d scenes + %d creature renders %dx%d of world seed %llu, batch %d, %lld steps, "
                "output %s\n", ms_param_table_numel(&w[0]), ms_param_table_numel(&w[1]), ac[0].channels[0],
                ac[0].channels[ac[0].n_channels - 1], a->ad_res, f, model, a->scenes, a->scenes, S, S,
                (unsigned long long)a->world_seed, a->ad_batch, (long long)a->ad_steps, dir);
    L.label = "adapters"; L.columns = "pose,sketch,lr"; L.steps = a->ad_steps;
    L.ctx = &r; L.count = ad_count; L.step = ad_step; L.save = ad_save;
    if ((s = pre_loop(&L, a, "adapters_"))) goto done;
    if (!pre_mkdir(dir)) { s = ms_errorf(MS_ERR_IO, "%s: cannot create the folder", dir); goto done; }
    for (int k = 0; k < 2; k++)
        if ((s = ms_write_adapter_folder(&ac[k], &w[k], out[k]))) goto done;
    if (!a->quiet)
        fprintf(stderr, "pretrain: wrote %s/adapters_loss.csv, adapters_loss.svg, %s and %s (mixshow sample --model %s "
                "--adapter %s --cond POSE.png)\n", a->out, out[0], out[1], model, out[0]);
done:
    if (r.caps) for (int b = 0; b < a->ad_batch; b++) free(r.caps[b]);
    free(r.caps);
    free(r.cache); free(r.have); free(r.rgb); free(r.pose); free(r.sketch);
    float *bufs[] = { r.img, r.mean, r.logvar, r.lat, r.cpose, r.csketch };
    for (size_t i = 0; i < sizeof bufs / sizeof bufs[0]; i++) ms_free_aligned(bufs[i]);
    arena_free(&r.var);
    for (int k = 0; k < 2; k++) { ms_adapter_trainer_free(r.p[k]); ms_param_table_free(&w[k]); }
    ms_model_free(&m);
    if (tok_ok) clip_tokenizer_free(&tok);
    free(r.g);
    return s;
}

/* ---- stages ---- */
/* In the order --stage all runs them; a checkpoint's metadata format names the stage it resumes. */
/* ---- the text stage (--text contrastive) ----
 * A CLIP-architecture text encoder trained first and on its own, as SD's CLIP was: contrastively
 * against an image encoder on world scenes and their captions (CLIP's symmetric InfoNCE), by
 * `mixshow eval --train-encoders DIR/text` with the model's text config (--text-width, -layers,
 * -heads) and 77 positions; the unet stage then trains the UNet on it, frozen. Why: trained jointly
 * with the UNet from scratch, the text encoder learnt what the epsilon loss rewards most, the
 * background (the 67 padding positions' states moved 0.7-0.8 relative when the background word
 * changed, 0.1-0.2 when the object's colour or shape did), and samples ignored colour and shape
 * words; the contrastive objective must tell every caption's scene from 47 others'. --text-seed
 * (default 1) keeps it apart from `mixshow eval`'s own encoders (seed 0), which score the model. */
static MsStatus stage_text(const PreArgs *a, const char *resume) {
    char dir[2100], w[16], l[16], h[16], n[32], sd[32], ce[32], th[16];
    char *argv[32];
    int k = 0;
    if (!a->text_contrastive) {
        if (!strcmp(a->stage, "text")) return ms_errorf(MS_ERR_ARG, "pretrain: --stage text needs --text contrastive");
        return MS_OK;                   /* --stage all of a jointly trained text encoder */
    }
    snprintf(dir, sizeof dir, "%s/text", a->out);
    if (!resume && pre_exists(a->text_path))
        return ms_errorf(MS_ERR_ARG, "pretrain: %s already exists (the text stage writes it; --stage unet uses it)", a->text_path);
    snprintf(w, sizeof w, "%d", a->text_width); snprintf(l, sizeof l, "%d", a->text_layers); snprintf(h, sizeof h, "%d", a->text_heads);
    snprintf(n, sizeof n, "%lld", (long long)a->text_steps); snprintf(sd, sizeof sd, "%llu", (unsigned long long)a->text_seed);
    snprintf(ce, sizeof ce, "%lld", (long long)a->ckpt_every); snprintf(th, sizeof th, "%d", a->threads);
    argv[k++] = "eval"; argv[k++] = "--train-encoders"; argv[k++] = dir;
    argv[k++] = "--text-width"; argv[k++] = w; argv[k++] = "--text-layers"; argv[k++] = l; argv[k++] = "--text-heads"; argv[k++] = h;
    argv[k++] = "--text-tokens"; argv[k++] = "77"; argv[k++] = "--steps"; argv[k++] = n; argv[k++] = "--seed"; argv[k++] = sd;
    argv[k++] = "--checkpoint-every"; argv[k++] = ce;
    if (a->threads > 0) { argv[k++] = "--threads"; argv[k++] = th; }
    if (a->text_max_norm) { argv[k++] = "--token-max-norm"; argv[k++] = (char *)a->text_max_norm; }
    if (resume) { argv[k++] = "--resume"; argv[k++] = (char *)resume; }
    if (a->quiet) argv[k++] = "-q";
    argv[k] = NULL;
    if (!a->quiet) fprintf(stderr, "pretrain: the text stage: a text encoder (width %s, %s layers, %s heads, 77 positions) "
                           "trained contrastively, %s steps, seed %s -> %s\n", w, l, h, n, sd, dir);
    if (cmd_eval(k, argv) != 0) return ms_errorf(MS_ERR_ARG, "pretrain: the text stage failed: %s", ms_last_error());
    return MS_OK;
}

typedef struct {
    const char *name, *format;
    MsStatus (*run)(const PreArgs *a, const char *resume);
} PreStage;
static const PreStage STAGES[] = { { "vae", VAE_FORMAT, stage_vae }, { "text", "mixshow eval encoders 1", stage_text },
                                   { "unet", UNET_FORMAT, stage_unet },
                                   { "adapters", ADAPTER_FORMAT, stage_adapters } };
#define N_STAGES ((int)(sizeof STAGES / sizeof STAGES[0]))

/* --stage S (one) or all (every stage in order); --resume starts at its checkpoint's stage. */
static MsStatus pretrain_run(const PreArgs *a) {
    int first = 0, last = N_STAGES - 1;
    MsStatus s;
    if (strcmp(a->stage, "all")) {
        for (first = 0; first < N_STAGES && strcmp(STAGES[first].name, a->stage); first++) {}
        if (first == N_STAGES) return ms_errorf(MS_ERR_ARG, "pretrain: --stage %s: expected vae, text, unet, adapters or all", a->stage);
        last = first;
    }
    if (a->resume) {
        char fmt[256];
        int r = 0;
        if ((s = pre_format(a->resume, fmt, sizeof fmt))) return s;
        while (r < N_STAGES && strcmp(STAGES[r].format, fmt)) r++;
        if (r == N_STAGES)
            return ms_errorf(MS_ERR_FORMAT, "%s: not a mixshow pretrain checkpoint (metadata format '%s')", a->resume, fmt);
        if (r < first || r > last)
            return ms_errorf(MS_ERR_ARG, "%s: a checkpoint of the %s stage, not of --stage %s", a->resume, STAGES[r].name, a->stage);
        first = r;
    }
    for (int i = first; i <= last; i++)
        if ((s = STAGES[i].run(a, a->resume && i == first ? a->resume : NULL))) return s;
    return MS_OK;
}

int cmd_pretrain(int argc, char **argv) {
    PreArgs a;
    memset(&a, 0, sizeof a);
    ms_pretrain_config_defaults(&a.pc);
    a.steps = 1000; a.ckpt_every = 100; a.batch = 8; a.size = 64; a.scenes = 4096;
    a.n_ch = 3; a.ch[0] = 32; a.ch[1] = 64; a.ch[2] = 64;
    a.n_heads = 3; a.heads[0] = 2; a.heads[1] = 4; a.heads[2] = 4;
    a.layers = 1; a.groups = 8; a.text_width = 64; a.text_layers = 2; a.text_heads = 2;
    a.text_steps = 2000; a.text_seed = 1;
    a.stage = "all";
    ms_vae_pretrain_config_defaults(&a.vpc);
    a.vae_steps = 1000; a.vae_batch = 8;
    a.n_vae_ch = 3; a.vae_ch[0] = 32; a.vae_ch[1] = 64; a.vae_ch[2] = 64;
    a.vae_layers = 1; a.vae_groups = 8; a.vae_latent = 4;
    ms_pretrain_config_defaults(&a.apc);
    a.apc.warmup = 50;
    a.ad_steps = 500; a.ad_batch = 8; a.ad_res = 2;
    for (int i = 1; i < argc; i++) {
        const char *o = argv[i];
        if (!strcmp(o, "--help") || !strcmp(o, "-h")) { pretrain_usage(stdout); return 0; }
        if (!strcmp(o, "--quiet") || !strcmp(o, "-q")) { a.quiet = 1; continue; }
        if (i + 1 >= argc) { fprintf(stderr, "mixshow pretrain: %s needs a value (see --help)\n", o); return 2; }
        const char *v = argv[++i];
        char *end = NULL;
        long long n = 0;
        double x = 0.0;
        int ok = 1;
        if (!strcmp(o, "--out")) a.out = v;
        else if (!strcmp(o, "--vae")) a.vae_dir = v;
        else if (!strcmp(o, "--tokenizer")) a.tok_dir = v;
        else if (!strcmp(o, "--model-config")) a.model_config = v;
        else if (!strcmp(o, "--text-encoder")) { a.text_file = v; a.pc.freeze_text = 1; }
        else if (!strcmp(o, "--text-token-max-norm")) { a.text_max_norm = v; x = strtod(v, &end); ok = end != v && !*end && x > 0; }
        else if (!strcmp(o, "--text")) { ok = !strcmp(v, "contrastive") || !strcmp(v, "joint"); a.text_contrastive = !strcmp(v, "contrastive"); }
        else if (!strcmp(o, "--resume")) a.resume = v;
        else if (!strcmp(o, "--stage")) a.stage = v;
        else if (!strcmp(o, "--channels")) ok = parse_list(v, a.ch, &a.n_ch);
        else if (!strcmp(o, "--heads")) ok = parse_list(v, a.heads, &a.n_heads);
        else if (!strcmp(o, "--vae-channels")) ok = parse_list(v, a.vae_ch, &a.n_vae_ch);
        else if (!strcmp(o, "--vae-crop-at")) { ok = !strcmp(v, "objects") || !strcmp(v, "anywhere"); a.vae_crop_objects = !strcmp(v, "objects"); }
        else if (!strcmp(o, "--vae-loss")) { ok = !strcmp(v, "l1") || !strcmp(v, "mse"); a.vpc.mse = !strcmp(v, "mse"); }
        else if (!strcmp(o, "--lr") || !strcmp(o, "--weight-decay") || !strcmp(o, "--uncond") || !strcmp(o, "--vae-lr") ||
                 !strcmp(o, "--kl-weight") || !strcmp(o, "--adapter-lr")) {
            x = strtod(v, &end);
            ok = end != v && !*end && x >= 0 && x <= 10;
            if (!strcmp(o, "--lr")) a.pc.lr = x;
            else if (!strcmp(o, "--weight-decay")) a.pc.weight_decay = x;
            else if (!strcmp(o, "--vae-lr")) a.vpc.lr = x;
            else if (!strcmp(o, "--kl-weight")) a.vpc.kl_weight = x;
            else if (!strcmp(o, "--adapter-lr")) a.apc.lr = x;
            else { a.pc.uncond_p = x; ok = ok && x <= 1; }
        } else {
            n = strtoll(v, &end, 10);
            ok = end != v && !*end && n >= 0;
            if (!strcmp(o, "--steps")) a.steps = n;
            else if (!strcmp(o, "--checkpoint-every")) a.ckpt_every = n;
            else if (!strcmp(o, "--warmup")) a.pc.warmup = n;
            else if (!strcmp(o, "--decay")) a.pc.decay = n;
            else if (!strcmp(o, "--seed")) a.seed = (uint64_t)n;
            else if (!strcmp(o, "--world-seed")) a.world_seed = (uint64_t)n;
            else if (!strcmp(o, "--batch")) { a.batch = (int)n; ok = ok && n >= 1 && n <= 64; }
            else if (!strcmp(o, "--size")) { a.size = (int)n; ok = ok && (n == 64 || n == 128); }
            else if (!strcmp(o, "--scenes")) { a.scenes = (int)n; ok = ok && n >= 1 && n <= 1000000; }
            else if (!strcmp(o, "--creatures")) { a.creatures = (int)n; ok = ok && n <= 1000000; }
            else if (!strcmp(o, "--layers")) { a.layers = (int)n; ok = ok && n >= 1 && n <= 4; }
            else if (!strcmp(o, "--groups")) { a.groups = (int)n; ok = ok && n >= 1; }
            else if (!strcmp(o, "--text-width")) { a.text_width = (int)n; ok = ok && n >= 1 && n <= 4096; }
            else if (!strcmp(o, "--text-layers")) { a.text_layers = (int)n; ok = ok && n >= 1 && n <= 48; }
            else if (!strcmp(o, "--text-heads")) { a.text_heads = (int)n; ok = ok && n >= 1; }
            else if (!strcmp(o, "--threads")) { a.threads = (int)n; ok = ok && n >= 1 && n <= 1024; }
            else if (!strcmp(o, "--text-steps")) a.text_steps = n;
            else if (!strcmp(o, "--text-seed")) a.text_seed = (uint64_t)n;
            else if (!strcmp(o, "--vae-steps")) a.vae_steps = n;
            else if (!strcmp(o, "--vae-warmup")) a.vpc.warmup = n;
            else if (!strcmp(o, "--vae-crop")) { a.vae_crop = (int)n; ok = ok && n <= 128; }
            else if (!strcmp(o, "--vae-batch")) { a.vae_batch = (int)n; ok = ok && n >= 1 && n <= 64; }
            else if (!strcmp(o, "--vae-layers")) { a.vae_layers = (int)n; ok = ok && n >= 1 && n <= MS_VAE_MAX_LAYERS; }
            else if (!strcmp(o, "--vae-groups")) { a.vae_groups = (int)n; ok = ok && n >= 1; }
            else if (!strcmp(o, "--vae-latent")) { a.vae_latent = (int)n; ok = ok && n >= 1 && n <= 64; }
            else if (!strcmp(o, "--adapter-steps")) a.ad_steps = n;
            else if (!strcmp(o, "--adapter-warmup")) a.apc.warmup = n;
            else if (!strcmp(o, "--adapter-batch")) { a.ad_batch = (int)n; ok = ok && n >= 1 && n <= 64; }
            else if (!strcmp(o, "--adapter-res")) { a.ad_res = (int)n; ok = ok && n >= 1 && n <= MS_ADAPTER_MAX_RES; }
            else { fprintf(stderr, "mixshow pretrain: unknown option %s (see --help)\n", o); return 2; }
        }
        if (!ok) { fprintf(stderr, "mixshow pretrain: %s %s: not a valid value (see --help)\n", o, v); return 2; }
    }
    if (!a.out) { fprintf(stderr, "mixshow pretrain: --out DIR is required (see --help)\n"); return 2; }
    snprintf(a.text_path, sizeof a.text_path, "%s/text/encoders.safetensors", a.out);
    if (a.text_contrastive) {
        if (a.text_file) { fprintf(stderr, "mixshow pretrain: --text contrastive trains the text encoder: not with --text-encoder\n"); return 2; }
        a.text_file = a.text_path;          /* the unet stage's frozen text encoder */
        a.pc.freeze_text = 1;
    }
    a.pc.steps = a.steps;                                  /* the decay's end */
    if (a.pc.decay > a.steps) {
        fprintf(stderr, "mixshow pretrain: --decay %lld is more than --steps %lld\n", (long long)a.pc.decay, (long long)a.steps);
        return 2;
    }
    a.apc.uncond_p = a.pc.uncond_p;                        /* shared by the unet and adapters stages */
    a.apc.weight_decay = a.pc.weight_decay;
    if (a.threads > 0) ms_set_threads(a.threads);
    if (!pre_mkdir(a.out)) { fprintf(stderr, "mixshow pretrain: %s: cannot create the folder\n", a.out); return 1; }
    MsStatus s = pretrain_run(&a);
    if (s) { fprintf(stderr, "mixshow pretrain: %s\n", ms_last_error()); return 1; }
    return 0;
}
