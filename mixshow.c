/* mixshow.c — the method of Mix-of-Show (Gu et al., NeurIPS 2023, arXiv:2305.18292v2), in
 * sections that read top to bottom like the paper's three stages:
 *   ED-LoRA training            (single-client tuning: one step of EDLoRATrainer + AdamW)
 *   pretraining                 (issue 15: every VAE, UNet and text-encoder parameter of a small model)
 *   text-to-image pipeline      (diffusers StableDiffusion(Adapter)Pipeline + EDLoRAPipeline:
 *                                `mixshow sample`, validation images)
 *   gradient fusion             (center node: recorded features -> gram / L-BFGS / weight)
 *   regionally controllable sampling (RegionallyT2IAdapterPipeline)
 * The machinery they use lives below them: models/optim.c (AdamW, L-BFGS), models/ (networks),
 * tensor.c (ops); data, options and files are read in tools/. */
#include "mixshow.h"

#include <float.h>
#include <limits.h>
#include <stdint.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

const char *ms_version(void) { return MS_VERSION; }

/* ---- ED-LoRA training ---- */
/* Defaults of Mix-of-Show's EDLoRATrainer(...) arguments and of torch.optim.AdamW. */
void ms_train_config_defaults(MsTrainConfig *c) {
    memset(c, 0, sizeof *c);
    c->enable_edlora = 1;
    c->tune_emb = c->tune_te = c->tune_unet = 1;
    c->lr_emb = 1e-3; c->lr_te = 1e-5; c->lr_unet = 1e-4;
    c->wd_emb = NAN;
    c->te_rank = c->unet_rank = 4;
    c->te_alpha = c->unet_alpha = 1.0;
    c->reg_full_identity = 1;              /* EDLoRATrainer(reg_full_identity=True) */
    c->use_mask_loss = 1;                  /* EDLoRATrainer(use_mask_loss=True) */
    c->weight_decay = 0.01;                /* torch.optim.AdamW defaults */
    c->beta1 = 0.9; c->beta2 = 0.999; c->adam_eps = 1e-8;
    c->emb_norm_threshold = 0.55;          /* train_opt.get('emb_norm_threshold', 5.5e-1) */
}

/* Mix-of-Show's single-client stage (paper Sec. 3.2, "ED-LoRA"; official code: EDLoRATrainer in
 * mixofshow/pipelines/trainer_edlora.py and the loop of train_edlora.py, commit 51270fd). One
 * step, as the official trainer runs it on float32:
 *
 *   1. z   = (mean + exp(logvar / 2) * eps) * 0.18215      VAE posterior SAMPLE (0.18215 is
 *                                                          hard-coded there, not the config's)
 *   2. n   = randn;  n += noise_offset * randn(B,4,1,1)    (when noise_offset is set)
 *   3. t   = randint(0, T, (B,));  z_t = sqrt(ac_t) z + sqrt(1 - ac_t) n      (DDPM add_noise)
 *   4. prompts bound x16: prompt i has every concept word replaced by its i-th token <new..>
 *   5. c   = TextEncoder(ids) (B*16, 77, D), rearranged '(b n) m c -> b n m c': cross-attention
 *            layer i of the UNet (order down, mid, up) attends to c[:, i]
 *   6. eps = UNet(z_t, t, c) with LoRA on every attention Linear
 *   7. L   = mean_b [ sum (eps - n)^2 * mask / sum mask ]  (float64: the masks are float64)
 *          + attention regularisation (cal_attn_reg) unless it is NaN
 *   8. backward by hand through UNet and text encoder into the LoRA weights and the new rows
 *   9. AdamW on three groups (embedding, text-encoder LoRA, UNet LoRA), linear lr decay;
 *      every other embedding row keeps its value; the concept rows stop moving once their mean
 *      L2 norm reaches emb_norm_threshold (checked after the update).
 * Plain LoRA (enable_edlora false) is the same code with one token per word that no prompt
 * uses (the official code adds them but does not bind prompts), and one context for all layers. */

#define TRAIN_T 77                  /* tokenizer.model_max_length */
#define TRAIN_EDLORA_LAYERS 16      /* bind_concept_prompt's 16 (fixed in the official code) */
#define TRAIN_VAE_SCALE 0.18215f    /* latents * 0.18215 in EDLoRATrainer.forward */

typedef struct {
    char name[MS_KEY_MAX + 32];     /* "token_embedding.concept", "unet.<module>.lora_down.weight" */
    float *data, *grad, *m, *v;
    int ndim;
    int64_t shape[2];
    size_t n;
    int group;                      /* 0 embedding, 1 text-encoder LoRA, 2 UNet LoRA */
} TrainParam;

struct MsTrainer {
    MsTrainConfig cfg;
    const MsModel *model;
    ClipTokenizer *tok;
    int B, H, W, h, w, L;           /* batch, image size, latent size, tokens per word (16 or 1) */
    int n_tok, first_id;            /* concept tokens (L * n_words), id of <new0> */
    int D, n_cross;                 /* text width, UNet cross-attention layers */
    ClipTextParams tp;
    VaeParams vp;
    UNetParams up;
    int up_ok, ua_ok;
    MsScheduler *sch;
    /* trainable state, group by group; each with grad and AdamW moments */
    float *emb, *demb, *m_emb, *v_emb;          /* (n_tok, D): the rows of <new0>, <new1>, ... */
    float *emb_frozen;                          /* concept rows at the freeze (official_embedding) */
    float *te, *dte, *m_te, *v_te;              /* clip_lora_numel floats */
    ClipLora te_lora, te_grad;
    UNetLora u_lora, u_grad;
    float *m_u, *v_u;
    int te_on, u_on;
    TrainParam *par;
    int n_par;
    /* activations and work buffers */
    Arena text_ar, uacts, uscr, vae_ar, lora_ar;
    ClipTextActs ta;
    UNetActs ua;
    float *mean, *logvar, *lat, *noise, *noisy, *pred, *dpred, *hid_d;
    float *ctx[TRAIN_EDLORA_LAYERS], *dctx[TRAIN_EDLORA_LAYERS];
    int32_t *ids;                               /* (B*L, 77) */
    int32_t *cols;                              /* (B, 2) attention-regulariser key positions */
    float *probe[TRAIN_EDLORA_LAYERS], *dprobe[TRAIN_EDLORA_LAYERS];
    int attn_reg;                               /* the regulariser runs */
    /* loop state */
    int64_t step;                               /* optimizer steps taken */
    int stop_emb;                               /* stop_emb_update */
};

/* Heads and map size (h x w latent pixels) of cross-attention layer l (order down, mid, up),
 * for a latent of h0 x w0: each downsampler halves a side rounding up (3x3, stride 2, pad 1). */
static void unet_probe_shape_cfg(const UNetConfig *c, int h0, int w0, int l, int *heads, int *lh, int *lw) {
    int H[MS_MAX_BLOCKS], Wd[MS_MAX_BLOCKS], n = c->n_blocks, k = 0;
    H[0] = h0; Wd[0] = w0;
    for (int i = 1; i < n; i++) { H[i] = (H[i - 1] + 1) / 2; Wd[i] = (Wd[i - 1] + 1) / 2; }
    *heads = *lh = *lw = 0;
    for (int part = 0; part < 3; part++)
        for (int i = 0; i < (part == 1 ? 1 : n); i++) {
            int lv = part == 0 ? i : n - 1 - i;
            MsBlockType bt = part == 0 ? c->down_block_types[i] : part == 1 ? c->mid_block_type : c->up_block_types[i];
            int cross = bt == MS_BLOCK_CROSS_ATTN_DOWN || bt == MS_BLOCK_CROSS_ATTN_UP || bt == MS_BLOCK_MID_CROSS_ATTN;
            int cnt = part == 0 ? c->layers_per_block : part == 1 ? 1 : c->layers_per_block + 1;
            if (!cross) continue;
            cnt *= c->transformer_layers_per_block[lv];
            if (l < k + cnt) { *heads = ms_unet_heads(c, lv); *lh = H[lv]; *lw = Wd[lv]; return; }
            k += cnt;
        }
}

static double train_lr(const MsTrainer *t, double base, int64_t k) {
    /* diffusers get_scheduler('linear', warmup 0, num_training_steps = total_iter) after k - 1
     * scheduler steps: base * max(0, (T - (k-1)) / max(1, T)), T a float (len / batch). */
    double T = t->cfg.total_iter, f = (T - (double)(k - 1)) / (T > 1.0 ? T : 1.0);
    return base * (f > 0.0 ? f : 0.0);
}

static MsStatus train_add_param(MsTrainer *t, const char *name, float *data, float *grad, float *m, float *v,
                                int64_t rows, int64_t cols, int group) {
    TrainParam *p = &t->par[t->n_par++];
    snprintf(p->name, sizeof p->name, "%s", name);
    p->data = data; p->grad = grad; p->m = m; p->v = v;
    p->ndim = 2; p->shape[0] = rows; p->shape[1] = cols;
    p->n = (size_t)rows * (size_t)cols;
    p->group = group;
    return MS_OK;
}

/* Official module order: CLIPAttention registers k_proj, v_proj, q_proj, out_proj;
 * UNet2DConditionModel registers down_blocks, up_blocks, then mid_block. */
static void train_register(MsTrainer *t) {
    const ClipTextConfig *tc = &t->model->text_config;
    char nm[MS_KEY_MAX + 32], mod[MS_KEY_MAX];
    static const int te_order[4] = { CLIP_K, CLIP_V, CLIP_Q, CLIP_O };
    static const char *const te_name[4] = { "q_proj", "k_proj", "v_proj", "out_proj" };
    t->n_par = 0;
    train_add_param(t, "token_embedding.concept", t->emb, t->demb, t->m_emb, t->v_emb, t->n_tok, t->D, 0);
    if (t->te_on)
        for (int l = 0; l < tc->num_hidden_layers; l++)
            for (int j = 0; j < 4; j++) {
                int pj = te_order[j], r = t->te_lora.rank;
                size_t off_d = (size_t)(t->te_lora.down[l][pj] - t->te), off_u = (size_t)(t->te_lora.up[l][pj] - t->te);
                snprintf(nm, sizeof nm, "text_encoder.text_model.encoder.layers.%d.self_attn.%s.lora_down.weight", l, te_name[pj]);
                train_add_param(t, nm, t->te + off_d, t->dte + off_d, t->m_te + off_d, t->v_te + off_d, r, t->D, 1);
                snprintf(nm, sizeof nm, "text_encoder.text_model.encoder.layers.%d.self_attn.%s.lora_up.weight", l, te_name[pj]);
                train_add_param(t, nm, t->te + off_u, t->dte + off_u, t->m_te + off_u, t->v_te + off_u, t->D, r, 1);
            }
    if (t->u_on)
        for (int part = 0; part < 3; part++)          /* down_blocks, up_blocks, mid_block */
            for (int a = 0; a < t->u_lora.n_attn; a++) {
                static const char *const pre[3] = { "down_blocks", "up_blocks", "mid_block" };
                unet_lora_module_name(&t->up, a, 0, mod, sizeof mod);
                if (strncmp(mod, pre[part], strlen(pre[part]))) continue;
                for (int which = 0; which < 4; which++) {
                    UNetLoraLinear *x = &t->u_lora.lin[4 * a + which], *g = &t->u_grad.lin[4 * a + which];
                    size_t od = (size_t)(x->down - t->u_lora.data), ou = (size_t)(x->up - t->u_lora.data);
                    int r = t->u_lora.rank;
                    unet_lora_module_name(&t->up, a, which, mod, sizeof mod);
                    snprintf(nm, sizeof nm, "unet.%s.lora_down.weight", mod);
                    train_add_param(t, nm, x->down, g->down, t->m_u + od, t->v_u + od, r, x->in, 2);
                    snprintf(nm, sizeof nm, "unet.%s.lora_up.weight", mod);
                    train_add_param(t, nm, x->up, g->up, t->m_u + ou, t->v_u + ou, x->out, r, 2);
                }
            }
}

int ms_trainer_n_params(const MsTrainer *t) { return t->n_par; }

MsStatus ms_trainer_param(const MsTrainer *t, int i, const char **name, float **data, float **grad,
                          int64_t shape[2]) {
    if (i < 0 || i >= t->n_par) return ms_errorf(MS_ERR_ARG, "trainer: parameter %d of %d", i, t->n_par);
    const TrainParam *p = &t->par[i];
    if (name) *name = p->name;
    if (data) *data = p->data;
    if (grad) *grad = p->grad;
    if (shape) { shape[0] = p->shape[0]; shape[1] = p->shape[1]; }
    return MS_OK;
}

int ms_trainer_find_param(const MsTrainer *t, const char *name) {
    for (int i = 0; i < t->n_par; i++)
        if (!strcmp(t->par[i].name, name)) return i;
    return -1;
}

int ms_trainer_tokens(const MsTrainer *t, int *first_id) {
    if (first_id) *first_id = t->first_id;
    return t->L;
}

/* Optimizer state for checkpoints: every float of the trainable state in one fixed order
 * (parameters, then first moments, then second moments, group by group). */
size_t ms_trainer_state_floats(const MsTrainer *t) {
    size_t n = 0;
    for (int i = 0; i < t->n_par; i++) n += 3 * t->par[i].n;
    return n + (size_t)t->n_tok * t->D;                 /* + the frozen concept rows */
}
void ms_trainer_state_io(MsTrainer *t, float *buf, int store, int64_t *step, int *stop_emb) {
    size_t k = 0;
    for (int i = 0; i < t->n_par; i++) {
        TrainParam *p = &t->par[i];
        float *src[3] = { p->data, p->m, p->v };
        for (int j = 0; j < 3; j++) {
            if (store) memcpy(buf + k, src[j], p->n * sizeof(float));
            else memcpy(src[j], buf + k, p->n * sizeof(float));
            k += p->n;
        }
    }
    if (store) memcpy(buf + k, t->emb_frozen, (size_t)t->n_tok * t->D * sizeof(float));
    else memcpy(t->emb_frozen, buf + k, (size_t)t->n_tok * t->D * sizeof(float));
    if (store) { *step = t->step; *stop_emb = t->stop_emb; }
    else { t->step = *step; t->stop_emb = *stop_emb; }
}

int64_t ms_trainer_step_count(const MsTrainer *t) { return t->step; }

void ms_trainer_free(MsTrainer *t) {
    if (!t) return;
    if (t->ua_ok) unet_acts_free(&t->ua);
    if (t->up_ok) unet_params_free(&t->up);
    arena_free(&t->text_ar); arena_free(&t->uacts); arena_free(&t->uscr); arena_free(&t->vae_ar);
    arena_free(&t->lora_ar);
    ms_free_aligned(t->emb); ms_free_aligned(t->te); ms_free_aligned(t->mean);
    free(t->par);
    free(t->sch);
    free(t);
}

/* LoRALinearLayer.__init__ as the official code runs it, for one (down (r,in), up (out,r)):
 * nn.Linear(in, r) and nn.Linear(r, out) each draw kaiming_uniform_(a=sqrt(5)) at construction,
 * then kaiming_uniform_(down) again and zeros_(up). kaiming_uniform_ with a = sqrt(5):
 * bound = sqrt(2 / (1 + 5)) * sqrt(3 / fan_in) = 1 / sqrt(fan_in), uniform_(-bound, bound). */
static void torch_uniform(MsTorchRng *g, float *x, size_t n, double lo, double hi) {
    /* at::uniform_real_distribution<float>: (random() & (2^24 - 1)) * 2^-24 in double,
     * * (to - from) + from with to, from as float. */
    const float from = (float)lo, to = (float)hi;
    for (size_t i = 0; i < n; i++) {
        uint32_t r = ms_torch_random(g);
        double u = (double)(r & ((1u << 24) - 1)) * (1.0 / 16777216.0);
        x[i] = (float)(u * (double)(to - from) + (double)from);
    }
}
static void lora_init_official(MsTorchRng *g, float *down, float *up, int r, int in, int out) {
    double bd = 1.0 / sqrt((double)in), bu = 1.0 / sqrt((double)r);
    torch_uniform(g, down, (size_t)r * in, -bd, bd);
    torch_uniform(g, up, (size_t)out * r, -bu, bu);
    torch_uniform(g, down, (size_t)r * in, -bd, bd);
    memset(up, 0, (size_t)out * r * sizeof(float));
}

MsStatus ms_trainer_create(MsTrainer **out, const MsModel *m, ClipTokenizer *tok, const MsTrainConfig *c,
                           int B, int H, int W, MsTorchRng *g) {
    const UNetConfig *uc = &m->unet_config;
    const ClipTextConfig *tc = &m->text_config;
    const VaeConfig *vc = &m->vae_config;
    const int f = 1 << (vc->n_blocks - 1);
    MsStatus s;
    *out = NULL;
    if (c->n_words < 1 || c->n_words > MS_MAX_CONCEPT_WORDS)
        return ms_errorf(MS_ERR_ARG, "train: %d concept words (expected 1..%d)", c->n_words, MS_MAX_CONCEPT_WORDS);
    if (B < 1 || B > 64) return ms_errorf(MS_ERR_ARG, "train: batch size %d (expected 1..64)", B);
    if (H <= 0 || W <= 0 || H % f || W % f)
        return ms_errorf(MS_ERR_ARG, "train: image %d x %d: sides must be positive multiples of %d", W, H, f);
    if (uc->cross_attention_dim != tc->hidden_size)
        return ms_errorf(MS_ERR_ARG, "train: UNet cross_attention_dim %d != text hidden_size %d",
                         uc->cross_attention_dim, tc->hidden_size);
    MsTrainer *t = (MsTrainer *)calloc(1, sizeof *t);
    if (!t) return ms_errorf(MS_ERR_NOMEM, "train: out of memory");
    t->cfg = *c; t->model = m; t->tok = tok;
    t->B = B; t->H = H; t->W = W; t->h = H / f; t->w = W / f;
    t->L = c->enable_edlora ? TRAIN_EDLORA_LAYERS : 1;
    t->D = tc->hidden_size;
    t->n_cross = ms_unet_cross_attn_layers(uc);
    t->n_tok = t->L * c->n_words;
    t->te_on = c->tune_te && c->te_rank > 0;
    t->u_on = c->tune_unet && c->unet_rank > 0;
    if (c->enable_edlora && t->n_cross > TRAIN_EDLORA_LAYERS) {
        s = ms_errorf(MS_ERR_UNSUPPORTED, "train: the UNet has %d cross-attention layers; ED-LoRA binds %d "
                      "(the official encoder_hidden_states[:, i] has no layer for the rest)", t->n_cross, TRAIN_EDLORA_LAYERS);
        goto fail;
    }
    /* Regulariser: EDLoRATrainer runs it whenever attn_reg_weight is not None. Plain LoRA has no
     * concept tokens in its prompts and crashes there; mixshow treats the term as off then. */
    t->attn_reg = c->has_attn_reg && c->enable_edlora;
    if (t->attn_reg && c->n_words < 2) {
        s = ms_errorf(MS_ERR_UNSUPPORTED, "train: attention regularisation needs two concept words "
                      "(cal_attn_reg reads the adjective and the subject token); %d given", c->n_words);
        goto fail;
    }

    /* concept tokens <new0>.. (init_new_concept): added to the tokenizer, ids after vocab_size */
    {
        char names[MS_MAX_CONCEPT_WORDS * TRAIN_EDLORA_LAYERS][24];
        const char *np[MS_MAX_CONCEPT_WORDS * TRAIN_EDLORA_LAYERS];
        int n_added = 0;
        for (int i = 0; i < t->n_tok; i++) { snprintf(names[i], sizeof names[i], "<new%d>", i); np[i] = names[i]; }
        for (int i = 0; i < t->n_tok; i++)
            if (clip_tokenizer_find(tok, np[i], strlen(np[i])) >= 0) {
                s = ms_errorf(MS_ERR_ARG, "train: token %s is already in the tokenizer (the official trainer "
                              "asserts 'some token is already in tokenizer')", np[i]);
                goto fail;
            }
        for (int w = 0; w < c->n_words; w++)
            if (clip_tokenizer_find(tok, c->words[w], strlen(c->words[w])) >= 0) {
                /* the official code would bind it all the same, but the word then also means
                 * what the vocabulary says it means wherever it is not bound */
                s = ms_errorf(MS_ERR_ARG, "train: concept word '%s' already exists in the vocabulary (id %d): "
                              "choose a word the tokenizer splits, such as <%s1>", c->words[w],
                              clip_tokenizer_find(tok, c->words[w], strlen(c->words[w])), c->words[w]);
                goto fail;
            }
        t->first_id = tok->n_vocab + tok->n_added;
        if (t->first_id != tc->vocab_size) {
            s = ms_errorf(MS_ERR_ARG, "train: the tokenizer's next id is %d but the text encoder has %d rows",
                          t->first_id, tc->vocab_size);
            goto fail;
        }
        if ((s = clip_tokenizer_add_tokens(tok, np, t->n_tok, &n_added))) goto fail;
        if (n_added != t->n_tok) { s = ms_errorf(MS_ERR_ARG, "train: %d of %d new tokens added", n_added, t->n_tok); goto fail; }
    }

    /* networks */
    if ((s = clip_text_params(&t->tp, &m->text, tc))) goto fail;
    if ((s = vae_params_init(&t->vp, vc, &m->vae))) goto fail;
    if ((s = unet_params_init(&t->up, uc, &m->unet))) goto fail;
    t->up_ok = 1;
    t->sch = (MsScheduler *)malloc(sizeof *t->sch);
    if (!t->sch) { s = ms_errorf(MS_ERR_NOMEM, "train: out of memory"); goto fail; }
    if ((s = ms_scheduler_init(t->sch, MS_SCHED_DDPM, &m->scheduler_config, MS_TORCH_CPU_AVX2))) goto fail;

    /* trainable state and work buffers */
    {
        const size_t ne = (size_t)t->n_tok * t->D, nte = t->te_on ? clip_lora_numel(tc, c->te_rank) : 0;
        const size_t nlat = (size_t)B * uc->in_channels * t->h * t->w, nout = (size_t)B * uc->out_channels * t->h * t->w;
        const size_t nctx = (size_t)B * TRAIN_T * t->D, nhid = (size_t)B * t->L * TRAIN_T * t->D;
        size_t nprobe = 0;
        t->emb = (float *)ms_alloc_aligned(5 * ne + 1, sizeof(float));
        t->te = (float *)ms_alloc_aligned(4 * nte + 1, sizeof(float));
        if (!t->emb || !t->te) { s = ms_errorf(MS_ERR_NOMEM, "train: out of memory"); goto fail; }
        memset(t->emb, 0, (5 * ne + 1) * sizeof(float));
        memset(t->te, 0, (4 * nte + 1) * sizeof(float));
        t->demb = t->emb + ne; t->m_emb = t->emb + 2 * ne; t->v_emb = t->emb + 3 * ne; t->emb_frozen = t->emb + 4 * ne;
        t->dte = t->te + nte; t->m_te = t->te + 2 * nte; t->v_te = t->te + 3 * nte;
        if (t->te_on) {
            clip_lora_bind(&t->te_lora, t->te, tc, c->te_rank, (float)c->te_alpha);
            clip_lora_bind(&t->te_grad, t->dte, tc, c->te_rank, (float)c->te_alpha);
        }
        if (t->u_on) {
            size_t nu = unet_lora_floats(uc, c->unet_rank);
            size_t lin = (size_t)2 * t->up.n_blk * 4 * sizeof(UNetLoraLinear);
            if ((s = arena_init(&t->lora_ar, 2 * (lin + 128) + 4 * (nu * sizeof(float) + 128)))) goto fail;
            if ((s = unet_lora_init(&t->u_lora, &t->up, c->unet_rank, (float)c->unet_alpha, &t->lora_ar))) goto fail;
            if ((s = unet_lora_init(&t->u_grad, &t->up, c->unet_rank, (float)c->unet_alpha, &t->lora_ar))) goto fail;
            t->m_u = arena_floats(&t->lora_ar, nu);
            t->v_u = arena_floats(&t->lora_ar, nu);
            if (!t->m_u || !t->v_u) { s = ms_errorf(MS_ERR_NOMEM, "train: LoRA arena too small"); goto fail; }
            memset(t->m_u, 0, nu * sizeof(float)); memset(t->v_u, 0, nu * sizeof(float));
        }
        if (t->attn_reg)
            for (int l = 0; l < t->n_cross; l++) {
                int hd, lh, lw;
                unet_probe_shape_cfg(uc, t->h, t->w, l, &hd, &lh, &lw);
                nprobe += (size_t)B * hd * lh * lw * 2 + 16;
            }
        {
            size_t need = 2 * nlat + 3 * nlat + 2 * nout + nhid + 2 * (size_t)(c->enable_edlora ? t->n_cross : 1) * nctx
                          + 2 * nprobe + (size_t)B * t->L * TRAIN_T + 2 * (size_t)B + 64 * 32;
            float *q = (float *)ms_alloc_aligned(need, sizeof(float));
            if (!q) { s = ms_errorf(MS_ERR_NOMEM, "train: out of memory (%zu floats of work buffers)", need); goto fail; }
            memset(q, 0, need * sizeof(float));
            t->mean = q; q += nlat; t->logvar = q; q += nlat; t->lat = q; q += nlat;
            t->noise = q; q += nlat; t->noisy = q; q += nlat; t->pred = q; q += nout; t->dpred = q; q += nout;
            t->hid_d = q; q += nhid;
            for (int l = 0; l < (c->enable_edlora ? t->n_cross : 1); l++) { t->ctx[l] = q; q += nctx; t->dctx[l] = q; q += nctx; }
            if (t->attn_reg)
                for (int l = 0; l < t->n_cross; l++) {
                    int hd, lh, lw;
                    unet_probe_shape_cfg(uc, t->h, t->w, l, &hd, &lh, &lw);
                    size_t np_ = (size_t)B * hd * lh * lw * 2;
                    t->probe[l] = q; q += np_ + 16;
                    t->dprobe[l] = q; q += np_ + 16;
                }
            t->ids = (int32_t *)q; q += (size_t)B * t->L * TRAIN_T;
            t->cols = (int32_t *)q; q += 2 * (size_t)B;
        }
        /* arenas: text encoder (B*L prompts), UNet training activations, VAE encode */
        if ((s = arena_init(&t->text_ar, clip_text_sizes(tc, B * t->L, TRAIN_T, t->te_on ? c->te_rank : 0, CLIP_TRAIN_RECOMPUTE)))) goto fail;
        if ((s = clip_text_acts_alloc(&t->ta, &t->text_ar, tc, B * t->L, TRAIN_T, t->te_on ? c->te_rank : 0, CLIP_TRAIN_RECOMPUTE))) goto fail;
        {
            UNetSizes us;
            VaeSizes vz;
            if ((s = unet_sizes(uc, B, t->h, t->w, TRAIN_T, 1, &us))) goto fail;
            if ((s = arena_init(&t->uacts, us.acts_bytes)) || (s = arena_init(&t->uscr, us.scratch_bytes))) goto fail;
            if ((s = unet_acts_init(&t->ua, uc, B, t->h, t->w, TRAIN_T, 1, &t->uacts, &t->uscr))) goto fail;
            t->ua_ok = 1;
            if ((s = vae_sizes(vc, H, W, -1, &vz))) goto fail;
            /* The VAE encodes before the UNet runs: its scratch borrows the UNet's activation
             * arena (whose contents each forward rewrites) when that is large enough, which it
             * is for SD 1.5 at 512² (1047 MiB vs 409 MiB): one arena fewer at the peak. */
            if (t->uacts.cap >= vz.encode_bytes) {
                t->vae_ar.base = t->uacts.base; t->vae_ar.cap = t->uacts.cap; t->vae_ar.used = 0; t->vae_ar.mem = NULL;
            } else if ((s = arena_init(&t->vae_ar, vz.encode_bytes))) goto fail;
        }
    }
    t->par = (TrainParam *)calloc((size_t)1 + 8 * CLIP_MAX_LAYERS + (t->u_on ? 8 * (size_t)t->u_lora.n_attn : 0), sizeof(TrainParam));
    if (!t->par) { s = ms_errorf(MS_ERR_NOMEM, "train: out of memory"); goto fail; }
    train_register(t);

    /* initial values in the official order of draws (EDLoRATrainer.__init__ after set_seed):
     * per word the embedding init (randn_like(token_embeds[0]) * sigma for <rand-sigma>, else the
     * class word's row), then the LoRA layers, text encoder first (train_register's order). */
    if (g) {
        int ti = ms_param_find(&m->text, "text_model.embeddings.token_embedding.weight");
        const MsParam *table = ti >= 0 ? &m->text.p[ti] : NULL;
        for (int wd = 0; wd < c->n_words; wd++) {
            float *row = t->emb + (size_t)wd * t->L * t->D;
            double sigma;
            /* text_encoder.resize_token_embeddings(len(tokenizer)) builds a new nn.Embedding whose
             * constructor fills all its rows with normal_() (transformers 4.31
             * _get_resized_embeddings; _init_weights leaves a plain nn.Embedding alone) before
             * the old rows are copied in: the draws are spent, the values overwritten. */
            ms_torch_randn_skip(g, (size_t)(t->first_id + (wd + 1) * t->L) * t->D);
            if (sscanf(c->init[wd], "<rand-%lf>", &sigma) == 1) {
                ms_torch_randn(g, row, (size_t)t->D, MS_TORCH_CPU_AVX2);
                for (int d = 0; d < t->D; d++) row[d] = row[d] * (float)sigma;
            } else {
                int32_t ids[8];
                size_t n_ids = 0;
                if ((s = clip_tokenize_raw(tok, c->init[wd], strlen(c->init[wd]), ids, 8, &n_ids))) goto fail;
                if (n_ids != 1 || ids[0] >= tc->vocab_size || !table || (!table->f32 && !table->half)) {
                    s = ms_errorf(MS_ERR_ARG, "train: initializer '%s' must be a single existing token "
                                  "(it is %zu tokens)", c->init[wd], n_ids);
                    goto fail;
                }
                if (table->f32) memcpy(row, table->f32 + (size_t)ids[0] * t->D, (size_t)t->D * sizeof(float));
                else ms_half_to_f32(row, table->half + (size_t)ids[0] * t->D, (size_t)t->D, table->dtype);
            }
            for (int i = 1; i < t->L; i++) memcpy(row + (size_t)i * t->D, row, (size_t)t->D * sizeof(float));
        }
        for (int i = 0; i < t->n_par; i++) {
            TrainParam *p = &t->par[i], *q = &t->par[i + 1];
            if (p->group == 0 || !strstr(p->name, ".lora_down.")) continue;
            lora_init_official(g, p->data, q->data, (int)p->shape[0], (int)p->shape[1], (int)q->shape[0]);
        }
    }
    memcpy(t->emb_frozen, t->emb, (size_t)t->n_tok * t->D * sizeof(float));
    *out = t;
    return MS_OK;
fail:
    ms_trainer_free(t);
    return s;
}

/* bind_concept_prompt: prompt i of L has every concept word replaced by its i-th token name. */
static MsStatus train_bind(char *out, size_t cap, const char *prompt, const MsTrainConfig *c, int L, int layer) {
    char a[2048], b[2048];
    if (strlen(prompt) >= sizeof a) return ms_errorf(MS_ERR_ARG, "train: prompt longer than %zu bytes", sizeof a - 1);
    strcpy(a, prompt);
    for (int wd = 0; wd < c->n_words; wd++) {              /* p.replace(concept_name, new_name) */
        char tokname[24];
        size_t wl = strlen(c->words[wd]), o = 0;
        const char *p = a, *q;
        snprintf(tokname, sizeof tokname, "<new%d>", wd * L + layer);
        if (!wl) continue;
        while ((q = strstr(p, c->words[wd]))) {
            size_t k = (size_t)(q - p), tl = strlen(tokname);
            if (o + k + tl >= sizeof b) return ms_errorf(MS_ERR_ARG, "train: bound prompt too long");
            memcpy(b + o, p, k); o += k;
            memcpy(b + o, tokname, tl); o += tl;
            p = q + wl;
        }
        if (o + strlen(p) >= sizeof b) return ms_errorf(MS_ERR_ARG, "train: bound prompt too long");
        strcpy(b + o, p);
        strcpy(a, b);
    }
    if (strlen(a) >= cap) return ms_errorf(MS_ERR_ARG, "train: bound prompt too long");
    strcpy(out, a);
    return MS_OK;
}

/* Masked epsilon loss as EDLoRATrainer.forward computes it:
 *   loss = F.mse_loss(pred, target, 'none')          float32: (p - t)^2
 *   loss = ((loss * mask).sum([1,2,3]) / mask.sum([1,2,3])).mean()   float64 (mask is float64)
 * mask (B,1,M) broadcast over the C channels: its sum counts each pixel once.
 * Backward (autograd's path): g_b = (1/B) / W_b (float64), d(loss*mask) = g_b * mask -> float32,
 *   dpred = (2 * (p - t)) * that  (mse_loss_backward in float32).                    */
static double train_masked_mse(float *dpred, const float *pred, const float *target, const double *mask,
                               int B, int C, int M) {
    double total = 0.0;
    for (int b = 0; b < B; b++) {
        double num = 0.0, den = 0.0;
        for (int m = 0; m < M; m++) den += mask[(size_t)b * M + m];
        for (int c = 0; c < C; c++)
            for (int m = 0; m < M; m++) {
                size_t i = ((size_t)b * C + c) * M + m;
                float d = pred[i] - target[i], sq = d * d;
                num += (double)sq * mask[(size_t)b * M + m];
            }
        total += num / den;
        double gb = (1.0 / B) / den;
        for (int c = 0; c < C; c++)
            for (int m = 0; m < M; m++) {
                size_t i = ((size_t)b * C + c) * M + m;
                float gm = (float)(gb * mask[(size_t)b * M + m]);
                dpred[i] = (2.0f * (pred[i] - target[i])) * gm;
            }
    }
    return total / B;
}

/* torch F.interpolate(mode='nearest') index: floor(dst * (float)(in / out)), clamped. */
static int train_nearest(int dst, int in, int out) {
    if (in == out) return dst;
    float scale = (float)in / (float)out;
    int s = (int)floorf((float)dst * scale);
    return s < in - 1 ? s : in - 1;
}

/* cal_attn_reg (trainer_edlora.py), for any latent size. For each resolution (every cross-
 * attention layer whose map has the same h x w; groups in decreasing size as the official dict
 * '64','32','16','8'), with P_l (B, heads_l, hw, 77) a layer's softmax probabilities:
 *   A[b,i,j] = mean over all heads of all layers of the group of P_l[b,hd,i,pos_b[j]]
 *   adj = A[..,0] / max(A[..,0]),  sub = A[..,1] / max(A[..,1])  (max over the whole batch)
 *   gt  = nearest-resized masks (B,h,w);  S = {gt == 0}
 *   l_sub = mean_S sub  (reg_full_identity: mean over all of (sub - gt)^2);  l_adj = mean_S adj
 *   L_attn = sum_groups w * (l_sub + l_adj)
 * NaN (an empty S) anywhere makes the whole term NaN; the official trainer then leaves it out.
 * Backward, per map a with normalised a^ = a / a_max and dL/da^ = G:
 *   da_i = G_i / a_max - [i is a max] * sum_k G_k a_k / a_max^2 / (number of maxima)
 *   (torch's max() spreads its gradient evenly over ties), dP_l[b,hd,i,j] = dA[b,i,j] / heads. */
static double train_attn_reg(MsTrainer *t, const double *masks, int want_grad) {
    const UNetConfig *uc = &t->model->unet_config;
    const int B = t->B, mh = t->h, mw = t->w;
    const double wgt = t->cfg.attn_reg_weight;
    int done[TRAIN_EDLORA_LAYERS] = { 0 };
    double total = 0.0;
    int nan = 0;
    for (int l = 0; l < t->n_cross; l++) {
        int hd, lh, lw;
        unet_probe_shape_cfg(uc, t->h, t->w, l, &hd, &lh, &lw);
        memset(t->dprobe[l], 0, (size_t)B * hd * lh * lw * 2 * sizeof(float));
    }
    for (;;) {
        /* next group: the largest unprocessed map size */
        int best = -1, bh = 0, bw = 0;
        for (int l = 0; l < t->n_cross; l++) {
            int hd, lh, lw;
            if (done[l]) continue;
            unet_probe_shape_cfg(uc, t->h, t->w, l, &hd, &lh, &lw);
            if (best < 0 || lh * lw > bh * bw) { best = l; bh = lh; bw = lw; }
        }
        if (best < 0) break;
        const size_t P = (size_t)bh * bw, n = (size_t)B * P;
        int heads_total = 0;
        double *A = (double *)calloc(4 * n + n, sizeof(double));
        if (!A) return NAN;
        double *dA = A + 2 * n, *gt = A + 4 * n;
        for (int l = 0; l < t->n_cross; l++) {
            int hd, lh, lw;
            unet_probe_shape_cfg(uc, t->h, t->w, l, &hd, &lh, &lw);
            if (done[l] || lh != bh || lw != bw) continue;
            heads_total += hd;
            for (int b = 0; b < B; b++)
                for (int k = 0; k < hd; k++)
                    for (size_t i = 0; i < P; i++)
                        for (int j = 0; j < 2; j++)
                            A[(size_t)j * n + (size_t)b * P + i] += t->probe[l][(((size_t)b * hd + k) * P + i) * 2 + j];
        }
        for (size_t i = 0; i < 2 * n; i++) A[i] /= heads_total;
        for (int b = 0; b < B; b++)
            for (int y = 0; y < bh; y++)
                for (int x = 0; x < bw; x++)
                    gt[(size_t)b * P + (size_t)y * bw + x] =
                        masks[((size_t)b * mh + train_nearest(y, mh, bh)) * mw + train_nearest(x, mw, bw)];
        double group = 0.0;
        for (int j = 0; j < 2; j++) {                   /* 0: adjective (first word), 1: subject */
            const double *a = A + (size_t)j * n;
            double *G = dA + (size_t)j * n, amax = -HUGE_VAL, dot = 0.0;
            int nmax = 0;
            size_t ns = 0;
            for (size_t i = 0; i < n; i++) amax = a[i] > amax ? a[i] : amax;
            for (size_t i = 0; i < n; i++) nmax += a[i] == amax;
            if (j == 1 && t->cfg.reg_full_identity) {   /* F.mse_loss(sub, gt) */
                double sum = 0.0;
                for (size_t i = 0; i < n; i++) { double d = a[i] / amax - gt[i]; sum += d * d; G[i] = 2.0 * d / n; }
                group += sum / n;
            } else {                                      /* map[gt == 0].mean() */
                double sum = 0.0;
                for (size_t i = 0; i < n; i++) if (gt[i] == 0.0) { sum += a[i] / amax; ns++; }
                if (!ns) nan = 1;
                for (size_t i = 0; i < n; i++) G[i] = gt[i] == 0.0 && ns ? 1.0 / ns : 0.0;
                group += ns ? sum / ns : NAN;
            }
            for (size_t i = 0; i < n; i++) dot += G[i] * a[i];
            for (size_t i = 0; i < n; i++) {
                G[i] = G[i] / amax;
                if (a[i] == amax) G[i] -= dot / (amax * amax) / nmax;
                G[i] *= wgt / heads_total;
            }
        }
        total += wgt * group;
        for (int l = 0; l < t->n_cross; l++) {
            int hd, lh, lw;
            unet_probe_shape_cfg(uc, t->h, t->w, l, &hd, &lh, &lw);
            if (done[l] || lh != bh || lw != bw) continue;
            done[l] = 1;
            if (want_grad)
                for (int b = 0; b < B; b++)
                    for (int k = 0; k < hd; k++)
                        for (size_t i = 0; i < P; i++)
                            for (int j = 0; j < 2; j++)
                                t->dprobe[l][(((size_t)b * hd + k) * P + i) * 2 + j] =
                                    (float)dA[(size_t)j * n + (size_t)b * P + i];
        }
        free(A);
    }
    return nan ? NAN : total;
}

static int train_finite(const float *x, size_t n) {
    for (size_t i = 0; i < n; i++) if (!(x[i] - x[i] == 0.0f)) return 0;
    return 1;
}

/* Steps 1-8: the loss of one batch and, with want_grad, the gradients of every trainable tensor
 * (the parameters do not move). */
MsStatus ms_trainer_loss(MsTrainer *t, const MsTrainBatch *bt, const MsStepDraws *dr, MsTorchRng *g,
                         MsStepReport *rep, int want_grad) {
    const MsTrainConfig *c = &t->cfg;
    const UNetConfig *uc = &t->model->unet_config;
    const ClipTextConfig *tc = &t->model->text_config;
    const int B = t->B, L = t->L, Lc = c->enable_edlora ? t->n_cross : 1;
    const int Cl = uc->in_channels, h = t->h, w = t->w;
    const size_t nlat = (size_t)B * Cl * h * w, M = (size_t)h * w;
    const int64_t k = t->step + 1;
    float tf[64];
    int64_t ts[64];
    MsStatus s;
    memset(rep, 0, sizeof *rep);
    if (bt->B != B || bt->H != t->H || bt->W != t->W)
        return ms_errorf(MS_ERR_SHAPE, "train step %lld: batch %d x %d x %d, trainer planned %d x %d x %d",
                         (long long)k, bt->B, bt->W, bt->H, B, t->W, t->H);
    if (!dr && !g) return ms_errorf(MS_ERR_ARG, "train step %lld: neither draws nor a generator", (long long)k);
    if (uc->in_channels != t->model->vae_config.latent_channels)
        return ms_errorf(MS_ERR_SHAPE, "train: UNet in_channels %d != VAE latent_channels %d", uc->in_channels,
                         t->model->vae_config.latent_channels);

    /* 1. latents = vae.encode(images).latent_dist.sample() * 0.18215 */
    if ((s = vae_encode(&t->vp, &t->vae_ar, t->mean, t->logvar, bt->images, B, t->H, t->W))) return s;
    if (dr) memcpy(t->noise, dr->vae_eps, nlat * sizeof(float));
    else ms_torch_randn(g, t->noise, nlat, MS_TORCH_CPU_AVX2);
    vae_posterior_sample(t->lat, NULL, t->mean, t->logvar, t->noise, nlat, TRAIN_VAE_SCALE);
    /* 2. noise (+ offset) */
    if (dr) memcpy(t->noise, dr->noise_randn, nlat * sizeof(float));
    else ms_torch_randn(g, t->noise, nlat, MS_TORCH_CPU_AVX2);
    if (c->has_noise_offset) {
        float off[256];
        if (B * Cl > 256) return ms_errorf(MS_ERR_ARG, "train: batch x channels %d > 256", B * Cl);
        if (dr) memcpy(off, dr->noise_offset_randn, (size_t)B * Cl * sizeof(float));
        else ms_torch_randn(g, off, (size_t)B * Cl, MS_TORCH_CPU_AVX2);
        for (int i = 0; i < B * Cl; i++) {
            float o = (float)c->noise_offset * off[i];
            for (size_t m = 0; m < M; m++) t->noise[(size_t)i * M + m] = t->noise[(size_t)i * M + m] + o;
        }
    }
    /* 3. timesteps, noisy latents */
    for (int b = 0; b < B; b++) {
        ts[b] = dr ? dr->timesteps[b] : (int64_t)(ms_torch_random(g) % (uint32_t)t->sch->T);
        tf[b] = (float)ts[b];
    }
    if ((s = ms_scheduler_add_noise(t->sch, t->noisy, t->lat, t->noise, ts, B, (size_t)Cl * M))) return s;

    /* 4. bound prompts -> ids (B*L, 77), sample-major */
    for (int b = 0; b < B; b++)
        for (int i = 0; i < L; i++) {
            int32_t *row = t->ids + ((size_t)b * L + i) * TRAIN_T;
            if (dr && dr->input_ids) { memcpy(row, dr->input_ids + ((size_t)b * L + i) * TRAIN_T, TRAIN_T * sizeof(int32_t)); continue; }
            char bound[2048];
            if (c->enable_edlora) { if ((s = train_bind(bound, sizeof bound, bt->prompts[b], c, L, i))) return s; }
            else snprintf(bound, sizeof bound, "%s", bt->prompts[b]);
            if ((s = clip_tokenize(t->tok, bound, strlen(bound), row, TRAIN_T))) return s;
        }
    /* 5. text encoder, then the layer contexts c[:, i] */
    if ((s = clip_text_forward(&t->ta, &t->tp, t->te_on ? &t->te_lora : NULL, t->ids, t->emb, t->n_tok, tc))) return s;
    for (int i = 0; i < Lc; i++)
        for (int b = 0; b < B; b++)
            memcpy(t->ctx[i] + (size_t)b * TRAIN_T * t->D, t->ta.out + ((size_t)b * L + (c->enable_edlora ? i : 0)) * TRAIN_T * t->D,
                   (size_t)TRAIN_T * t->D * sizeof(float));
    /* attention-regulariser probes: the concept token positions of each sample's first prompt */
    if (t->attn_reg) {
        for (int b = 0; b < B; b++) {
            const int32_t *row = t->ids + (size_t)b * L * TRAIN_T;
            int n = 0;
            for (int j = 0; j < TRAIN_T && n < 2; j++)
                if (row[j] >= t->first_id && row[j] < t->first_id + t->n_tok) t->cols[2 * b + n++] = j;
            if (n < 2)
                return ms_errorf(MS_ERR_ARG, "train step %lld: prompt of sample %d has %d concept tokens; the "
                                 "attention regulariser needs the two words (\"%s\")", (long long)k, b, n, bt->prompts[b]);
        }
        t->ua.probe_ncol = 2;
        t->ua.probe_cols = t->cols;
        t->ua.probe = t->probe;
        t->ua.dprobe = (const float *const *)t->dprobe;
    } else t->ua.probe_ncol = 0;

    /* 6. UNet */
    if ((s = unet_forward(t->pred, &t->ua, t->noisy, tf, c->enable_edlora ? NULL : t->ctx[0],
                          c->enable_edlora ? (const float *const *)t->ctx : NULL, NULL, &t->up,
                          t->u_on ? &t->u_lora : NULL))) return s;

    /* 7. losses */
    {
        const double *mask = c->use_mask_loss ? (bt->masks ? bt->masks : bt->img_masks) : bt->img_masks;
        rep->loss_mse = train_masked_mse(t->dpred, t->pred, t->noise, mask, B, uc->out_channels, (int)M);
        rep->loss = rep->loss_mse;
        rep->loss_attn = NAN;
        if (t->attn_reg) {
            rep->loss_attn = train_attn_reg(t, bt->masks ? bt->masks : bt->img_masks, 1);
            if (rep->loss_attn == rep->loss_attn) rep->loss += rep->loss_attn;
            else t->ua.probe_ncol = 0;                          /* left out: no gradient either */
        }
        rep->model_pred = t->pred;
        if (!(rep->loss_mse - rep->loss_mse == 0.0))
            return ms_errorf(MS_ERR_FORMAT, "train step %lld: the epsilon loss is not finite (%g)", (long long)k, rep->loss_mse);
    }

    if (!want_grad) return MS_OK;
    /* 8. backward: UNet -> layer contexts -> text encoder -> LoRA and concept rows */
    for (int i = 0; i < t->n_par; i++) memset(t->par[i].grad, 0, t->par[i].n * sizeof(float));
    for (int i = 0; i < Lc; i++) memset(t->dctx[i], 0, (size_t)B * TRAIN_T * t->D * sizeof(float));
    if ((s = unet_backward(&t->ua, &t->up, t->u_on ? &t->u_lora : NULL, t->u_on ? &t->u_grad : NULL, t->dpred,
                           c->enable_edlora ? NULL : t->dctx[0], c->enable_edlora ? (float *const *)t->dctx : NULL)))
        return s;
    if (t->te_on || c->tune_emb) {
        memset(t->hid_d, 0, (size_t)B * L * TRAIN_T * t->D * sizeof(float));
        for (int i = 0; i < Lc; i++)
            for (int b = 0; b < B; b++) {
                float *dst = t->hid_d + ((size_t)b * L + (c->enable_edlora ? i : 0)) * TRAIN_T * t->D;
                const float *src = t->dctx[i] + (size_t)b * TRAIN_T * t->D;
                for (size_t j = 0; j < (size_t)TRAIN_T * t->D; j++) dst[j] += src[j];
            }
        clip_text_backward(t->te_on ? &t->te_grad : NULL, c->tune_emb ? t->demb : NULL, t->hid_d, &t->ta, &t->tp,
                           t->te_on ? &t->te_lora : NULL, t->ids, t->n_tok, tc);
    }
    for (int i = 0; i < t->n_par; i++)
        if (!train_finite(t->par[i].grad, t->par[i].n))
            return ms_errorf(MS_ERR_FORMAT, "train step %lld: gradient of %s is not finite (loss %g = mse %g + attn %g)",
                             (long long)k, t->par[i].name, rep->loss, rep->loss_mse, rep->loss_attn);
    return MS_OK;
}

MsStatus ms_trainer_step(MsTrainer *t, const MsTrainBatch *bt, const MsStepDraws *dr, MsTorchRng *g,
                         MsStepReport *rep) {
    const MsTrainConfig *c = &t->cfg;
    const int64_t k = t->step + 1;
    MsStatus s = ms_trainer_loss(t, bt, dr, g, rep, 1);
    if (s) return s;

    /* 9. AdamW, linear decay; embedding rows stay frozen once stop_emb_update is set */
    {
        const double base[3] = { c->lr_emb, c->lr_te, c->lr_unet };
        const int on[3] = { c->tune_emb, t->te_on, t->u_on };
        for (int gi = 0; gi < 3; gi++) rep->lr[gi] = train_lr(t, base[gi], k);
        for (int i = 0; i < t->n_par; i++) {
            TrainParam *p = &t->par[i];
            if (!on[p->group]) continue;
            double wd = p->group == 0 && c->wd_emb == c->wd_emb ? c->wd_emb : c->weight_decay;
            ms_adamw_step(p->data, p->grad, p->m, p->v, p->n, k, rep->lr[p->group], wd, c->beta1, c->beta2, c->adam_eps);
        }
        if (t->stop_emb) memcpy(t->emb, t->emb_frozen, (size_t)t->n_tok * t->D * sizeof(float));
        for (int i = 0; i < t->n_par; i++)
            if (!train_finite(t->par[i].data, t->par[i].n))
                return ms_errorf(MS_ERR_FORMAT, "train step %lld: %s is not finite after the update", (long long)k, t->par[i].name);
    }
    /* Norm_mean and the freeze (train_edlora.py, after the step) */
    {
        double sum = 0.0;
        for (int i = 0; i < t->n_tok; i++) {
            double q = 0.0;
            for (int d = 0; d < t->D; d++) { double x = t->emb[(size_t)i * t->D + d]; q += x * x; }
            sum += (float)sqrt(q);
        }
        rep->emb_norm_mean = (float)(sum / t->n_tok);
        if (!t->stop_emb && rep->emb_norm_mean >= c->emb_norm_threshold) {
            t->stop_emb = 1;
            memcpy(t->emb_frozen, t->emb, (size_t)t->n_tok * t->D * sizeof(float));
        }
        rep->emb_frozen = t->stop_emb;
    }
    t->step = k;
    return MS_OK;
}

/* ---- pretraining ---- */
/* Issue 15's small model of SD 1.x topology, trained from scratch (tools/cmd_pretrain.c feeds it
 * the procedural world): every parameter of the UNet and the CLIP text encoder on the latents of a
 * VAE trained before them (below: the VAE stage) and frozen.
 * One step, read top to bottom:
 *   1. draws: drop_b (u_b < uncond_p: the caption becomes "" so that classifier-free guidance
 *      has an unconditional model), t_b uniform in [0, T), noise n = randn (B,C,h,w)
 *   2. z_t = sqrt(ac_t) z0 + sqrt(1 - ac_t) n            DDPMScheduler.add_noise
 *   3. ctx = TextEncoder(tokenize(caption_b)) (B,77,D)   77 = what sampling encodes
 *   4. eps = UNet(z_t, t, ctx)
 *   5. L = mean (eps - n)^2 over B*C*h*w = N values      F.mse_loss(eps, n)
 *      dL/deps = (2 / N) (eps - n)                      (float: d = (eps - n) * (float)(2 / N))
 *   6. full backward: UNet -> every UNet parameter and dctx -> every text-encoder parameter
 *   7. AdamW over each table's block as one flat array (the tables' gaps are 0 and stay 0:
 *      zero gradient, zero moments, decay of 0), lr_k = lr * min(1, k / warmup).
 * Classifier-free dropout, uniform timesteps and the epsilon objective are the recipe of
 * Rombach et al. 2022 (LDM) and Ho & Salimans 2022 (CFG). */
#define PRE_T 77

void ms_pretrain_config_defaults(MsPretrainConfig *c) {
    memset(c, 0, sizeof *c);
    c->lr = 1e-3;
    c->warmup = 100;
    c->beta1 = 0.9; c->beta2 = 0.999; c->adam_eps = 1e-8;
    c->weight_decay = 0.01;
    c->uncond_p = 0.1;
}

static int pre_ends_with(const char *s, const char *tail) {
    size_t n = strlen(s), m = strlen(tail);
    return n >= m && !strcmp(s + n - m, tail);
}

MsStatus ms_pretrain_init_weights(MsParamTable *t, MsTorchRng *g) {
    for (int i = 0; i < t->n; i++) {
        MsParam *p = &t->p[i];
        if (p->flags & MS_PARAM_BUFFER) continue;
        if (!p->f32) return ms_errorf(MS_ERR_ARG, "pretrain init: %s holds no f32 storage", p->name);
        const int is_bias = pre_ends_with(p->name, ".bias"), is_norm = p->ndim == 1 && strstr(p->name, "norm") != NULL;
        if (is_norm && !is_bias) for (size_t k = 0; k < p->numel; k++) p->f32[k] = 1.0f;
        else if (is_bias || p->ndim == 1) memset(p->f32, 0, p->numel * sizeof(float));
        else if (strstr(p->name, "token_embedding") || strstr(p->name, "position_embedding")) {
            const float sd = strstr(p->name, "token_embedding") ? 0.02f : 0.01f;
            ms_torch_randn(g, p->f32, p->numel, MS_TORCH_CPU_AVX2);
            for (size_t k = 0; k < p->numel; k++) p->f32[k] *= sd;
        } else {
            const double fan_in = (double)(p->numel / (size_t)p->shape[0]), bound = 1.0 / sqrt(fan_in);
            torch_uniform(g, p->f32, p->numel, -bound, bound);
        }
    }
    return MS_OK;
}

/* lr of step k (1, 2, ...): linear warmup to lr over the first warmup steps */
static double pre_lr(double lr, int64_t warmup, int64_t k) {
    return warmup > 0 && k < warmup ? lr * (double)k / (double)warmup : lr;
}

/* AdamW's two moment blocks of n floats, zero (the state of step 0) */
static MsStatus pre_moments(float **m, float **v, size_t n, const char *what) {
    *m = (float *)ms_alloc_aligned(n, sizeof(float));
    *v = (float *)ms_alloc_aligned(n, sizeof(float));
    if (!*m || !*v) return ms_errorf(MS_ERR_NOMEM, "%s: out of memory for %zu AdamW moments", what, 2 * n);
    memset(*m, 0, n * sizeof(float));
    memset(*v, 0, n * sizeof(float));
    return MS_OK;
}

/* ... and, with c->decay > 0, down linearly over the last c->decay of c->steps steps (lr / decay
 * at the last one) */
static double pre_lr_sched(const MsPretrainConfig *c, int64_t k) {
    const double lr = pre_lr(c->lr, c->warmup, k);
    if (c->decay > 0 && k > c->steps - c->decay) {
        const int64_t left = c->steps - k + 1;
        return left > 0 ? lr * (double)left / (double)c->decay : 0.0;
    }
    return lr;
}

/* What both trainers of the epsilon objective (MsPretrainer, MsAdapterTrainer) hold: the DDPM
 * scheduler, the UNet's and the text encoder's parameters and activations, and a step's draws,
 * noisy latents, prediction, its gradient and token ids. */
typedef struct {
    int B, C, h, w;                     /* batch, latents (C,h,w) */
    MsScheduler *sch;
    UNetParams up;                      /* over the model's UNet weights */
    ClipTextParams tp;
    int up_ok, ua_ok;
    Arena uacts, uscr, tar;
    UNetActs ua;
    ClipTextActs ta;
    float *noise, *noisy, *pred, *dpred;    /* (B,C,h,w) */
    int64_t ts[64];
    unsigned char drop[64];
    int32_t *ids;                       /* (B, 77) */
} PreEps;

static void pre_eps_free(PreEps *e) {
    if (e->ua_ok) unet_acts_free(&e->ua);
    if (e->up_ok) unet_params_free(&e->up);
    arena_free(&e->uacts); arena_free(&e->uscr); arena_free(&e->tar);
    ms_free_aligned(e->noise); ms_free_aligned(e->noisy); ms_free_aligned(e->pred); ms_free_aligned(e->dpred);
    free(e->ids);
    free(e->sch);
}

/* e (zeroed) for B latents (C,h,w) of model m, the text encoder's activations kept as text_mode
 * (CLIP_INFER, CLIP_TRAIN_KEEP) says; `what` begins the out-of-memory error. The caller frees e with
 * pre_eps_free, after a failure too. */
static MsStatus pre_eps_init(PreEps *e, const MsModel *m, int B, int h, int w, int text_mode, const char *what) {
    const UNetConfig *uc = &m->unet_config;
    const ClipTextConfig *tc = &m->text_config;
    UNetSizes sz;
    MsStatus s;
    e->B = B; e->C = uc->in_channels; e->h = h; e->w = w;
    const size_t nlat = (size_t)B * e->C * h * w;
    if (!(e->sch = (MsScheduler *)malloc(sizeof *e->sch))) return ms_errorf(MS_ERR_NOMEM, "%s: out of memory", what);
    if ((s = ms_scheduler_init(e->sch, MS_SCHED_DDPM, &m->scheduler_config, MS_TORCH_CPU_AVX2))) return s;
    if ((s = unet_params_init(&e->up, uc, &m->unet))) return s;
    e->up_ok = 1;
    if ((s = clip_text_params(&e->tp, &m->text, tc))) return s;
    if ((s = unet_sizes(uc, B, h, w, PRE_T, 1, &sz)) || (s = arena_init(&e->uacts, sz.acts_bytes)) ||
        (s = arena_init(&e->uscr, sz.scratch_bytes)) || (s = unet_acts_init(&e->ua, uc, B, h, w, PRE_T, 1, &e->uacts, &e->uscr)))
        return s;
    e->ua_ok = 1;
    if ((s = arena_init(&e->tar, clip_text_sizes(tc, B, PRE_T, 0, text_mode))) ||
        (s = clip_text_acts_alloc(&e->ta, &e->tar, tc, B, PRE_T, 0, text_mode)))
        return s;
    e->noise = (float *)ms_alloc_aligned(nlat, sizeof(float));
    e->noisy = (float *)ms_alloc_aligned(nlat, sizeof(float));
    e->pred = (float *)ms_alloc_aligned(nlat, sizeof(float));
    e->dpred = (float *)ms_alloc_aligned(nlat, sizeof(float));
    e->ids = (int32_t *)malloc((size_t)B * PRE_T * sizeof(int32_t));
    if (!e->noise || !e->noisy || !e->pred || !e->dpred || !e->ids) return ms_errorf(MS_ERR_NOMEM, "%s: out of memory", what);
    return MS_OK;
}

/* The end of a step: the report's draws and token ids are the step's (valid until the next one). */
static void pre_eps_report(const PreEps *e, MsPretrainReport *rep) {
    rep->used.drop = e->drop;
    rep->used.timesteps = e->ts;
    rep->used.noise = e->noise;
    rep->ids = e->ids;
}

struct MsPretrainer {
    MsPretrainConfig cfg;
    MsModel *m;
    const ClipTokenizer *tok;
    PreEps e;                           /* scheduler, UNet and text encoder, the step's buffers */
    UNetParams dup;                     /* gradients (over gu) */
    ClipTextParams dtp;
    MsParamTable gu, gt;                /* gradient tables, the weights' layout */
    float *mom_m, *mom_v;               /* (nu + nt) AdamW moments: UNet block, then text block */
    size_t nu, nt;                      /* floats in each block */
    int dup_ok;
    float *dctx;                        /* (B,77,D) */
    int64_t step;
};

/* Are the table's f32 tensors laid out as ms_param_table_alloc does (so that gradients and
 * moments can share the layout)? Zeroes the gaps. */
static MsStatus pre_block(MsParamTable *t, const char *what) {
    size_t off = 0;
    unsigned char *mem = (unsigned char *)t->mem;
    if (!mem) return ms_errorf(MS_ERR_ARG, "pretrain: the %s holds no data", what);
    for (int i = 0; i < t->n; i++) {
        const MsParam *p = &t->p[i];
        if (p->flags & MS_PARAM_BUFFER) continue;
        if (!p->f32 || (unsigned char *)p->f32 != mem + off)
            return ms_errorf(MS_ERR_UNSUPPORTED, "pretrain: %s %s is not f32 in the table's own block (16-bit or "
                             "loaded weights: convert to a fresh f32 table first)", what, p->name);
        size_t bytes = p->numel * sizeof(float), next = (off + bytes + 63) & ~(size_t)63;
        memset(mem + off + bytes, 0, next - off - bytes);
        off = next;
    }
    if (off != t->mem_bytes) return ms_errorf(MS_ERR_UNSUPPORTED, "pretrain: the %s block has %zu bytes, its tensors %zu",
                                              what, t->mem_bytes, off);
    return MS_OK;
}

void ms_pretrainer_free(MsPretrainer *p) {
    if (!p) return;
    pre_eps_free(&p->e);
    if (p->dup_ok) unet_params_free(&p->dup);
    ms_param_table_free(&p->gu); ms_param_table_free(&p->gt);
    ms_free_aligned(p->mom_m); ms_free_aligned(p->mom_v);
    ms_free_aligned(p->dctx);
    free(p);
}

MsStatus ms_pretrainer_create(MsPretrainer **out, MsModel *m, const ClipTokenizer *tok, const MsPretrainConfig *c,
                              int B, int h, int w) {
    const UNetConfig *uc = &m->unet_config;
    const ClipTextConfig *tc = &m->text_config;
    MsPretrainer *p;
    MsStatus s;
    *out = NULL;
    if (B < 1 || B > 64 || h < 1 || w < 1) return ms_errorf(MS_ERR_ARG, "pretrain: batch %d (1..64), latent %dx%d", B, h, w);
    if (uc->cross_attention_dim != tc->hidden_size)
        return ms_errorf(MS_ERR_SHAPE, "pretrain: UNet cross_attention_dim %d != text hidden_size %d", uc->cross_attention_dim,
                         tc->hidden_size);
    if (tc->max_position_embeddings < PRE_T)
        return ms_errorf(MS_ERR_ARG, "pretrain: text max_position_embeddings %d < %d tokens", tc->max_position_embeddings, PRE_T);
    if (uc->in_channels != uc->out_channels)
        return ms_errorf(MS_ERR_SHAPE, "pretrain: UNet in_channels %d != out_channels %d", uc->in_channels, uc->out_channels);
    if (!(c->lr >= 0) || c->warmup < 0 || !(c->uncond_p >= 0 && c->uncond_p <= 1))
        return ms_errorf(MS_ERR_ARG, "pretrain: lr %g, warmup %lld, uncond_p %g", c->lr, (long long)c->warmup, c->uncond_p);
    if (c->decay < 0 || (c->decay > 0 && c->steps < c->decay))
        return ms_errorf(MS_ERR_ARG, "pretrain: lr decay over %lld steps of %lld", (long long)c->decay, (long long)c->steps);
    if ((s = pre_block(&m->unet, "UNet")) || (s = pre_block(&m->text, "text encoder"))) return s;
    p = (MsPretrainer *)calloc(1, sizeof *p);
    if (!p) return ms_errorf(MS_ERR_NOMEM, "pretrain: out of memory");
    p->cfg = *c; p->m = m; p->tok = tok;
    const size_t nctx = (size_t)B * PRE_T * tc->hidden_size;
    p->nu = m->unet.mem_bytes / sizeof(float);
    p->nt = m->text.mem_bytes / sizeof(float);
    if ((s = ms_param_table_unet(uc, &p->gu)) || (s = ms_param_table_alloc(&p->gu, NULL)) ||
        (s = ms_param_table_text(tc, &p->gt)) || (s = ms_param_table_alloc(&p->gt, NULL)))
        goto fail;
    if (p->gu.mem_bytes != m->unet.mem_bytes || p->gt.mem_bytes != m->text.mem_bytes) {
        s = ms_errorf(MS_ERR_SHAPE, "pretrain: the model's tables are not those of its configs"); goto fail;
    }
    memset(p->gu.mem, 0, p->gu.mem_bytes);
    memset(p->gt.mem, 0, p->gt.mem_bytes);
    if ((s = pre_eps_init(&p->e, m, B, h, w, CLIP_TRAIN_KEEP, "pretrain"))) goto fail;
    if ((s = unet_params_init(&p->dup, uc, &p->gu))) goto fail;
    p->dup_ok = 1;
    if ((s = clip_text_params(&p->dtp, &p->gt, tc))) goto fail;
    if ((s = pre_moments(&p->mom_m, &p->mom_v, p->nu + p->nt, "pretrain"))) goto fail;
    if (!(p->dctx = (float *)ms_alloc_aligned(nctx, sizeof(float)))) { s = ms_errorf(MS_ERR_NOMEM, "pretrain: out of memory"); goto fail; }
    *out = p;
    return MS_OK;
fail:
    ms_pretrainer_free(p);
    return s;
}

/* Step k's draws (1. of ms_pretrain_step), from dr or in this order from g: B words for the drops
 * (u = (word & 2^24-1) / 2^24 < uncond_p), B words for the timesteps (word % T), randn noise (N). */
static MsStatus pre_draws(unsigned char *drop, int64_t *ts, float *tf, float *noise, int B, size_t N,
                          const MsScheduler *sch, double uncond_p, const MsPretrainDraws *dr, MsTorchRng *g, int64_t k) {
    if (!dr && !g) return ms_errorf(MS_ERR_ARG, "pretrain step %lld: neither draws nor a generator", (long long)k);
    for (int b = 0; b < B; b++) {
        if (dr) { drop[b] = dr->drop[b] ? 1 : 0; continue; }
        double u = (double)(ms_torch_random(g) & ((1u << 24) - 1)) * (1.0 / 16777216.0);
        drop[b] = u < uncond_p;
    }
    for (int b = 0; b < B; b++) {
        ts[b] = dr ? dr->timesteps[b] : (int64_t)(ms_torch_random(g) % (uint32_t)sch->T);
        if (ts[b] < 0 || ts[b] >= sch->T)
            return ms_errorf(MS_ERR_ARG, "pretrain step %lld: timestep %lld outside [0, %d)", (long long)k, (long long)ts[b],
                             sch->T);
        tf[b] = (float)ts[b];
    }
    if (dr) memcpy(noise, dr->noise, N * sizeof(float));
    else ms_torch_randn(g, noise, N, MS_TORCH_CPU_AVX2);
    return MS_OK;
}

/* Step 3 of both trainers: the B captions (a dropped one as "") tokenized to ids (B, 77) and through
 * the text encoder into ta->out. */
static MsStatus pre_encode_captions(const ClipTokenizer *tok, const unsigned char *drop, const char *const *captions,
                                    int B, int32_t *ids, ClipTextActs *ta, const ClipTextParams *tp,
                                    const ClipTextConfig *tc) {
    MsStatus s;
    for (int b = 0; b < B; b++) {
        const char *text = drop[b] ? "" : captions[b];
        if ((s = clip_tokenize(tok, text, strlen(text), ids + (size_t)b * PRE_T, PRE_T))) return s;
    }
    return clip_text_forward(ta, tp, NULL, ids, NULL, 0, tc);
}

/* The epsilon objective of both trainers: L = mean (pred - noise)^2 over N values, summed in double,
 * and dL/dpred = 2 (pred - noise) / N into dpred. `what` names the step in the error of a non-finite L. */
static MsStatus pre_eps_loss(const float *pred, const float *noise, float *dpred, size_t N, const char *what, int64_t k,
                             double *loss) {
    double sum = 0.0;
    const float scale = (float)(2.0 / (double)N);
    for (size_t i = 0; i < N; i++) {
        const float d = pred[i] - noise[i];
        sum += (double)d * d;
        dpred[i] = d * scale;
    }
    *loss = sum / (double)N;
    if (!(*loss - *loss == 0.0)) return ms_errorf(MS_ERR_FORMAT, "%s %lld: the loss is not finite (%g)", what, (long long)k, *loss);
    return MS_OK;
}

MsStatus ms_pretrain_step(MsPretrainer *p, const float *latents, const char *const *captions,
                          const MsPretrainDraws *dr, MsTorchRng *g, MsPretrainReport *rep) {
    const MsPretrainConfig *c = &p->cfg;
    PreEps *e = &p->e;
    const int B = e->B;
    const size_t M = (size_t)e->C * e->h * e->w, N = (size_t)B * M, nctx = (size_t)B * PRE_T * p->m->text_config.hidden_size;
    const int64_t k = p->step + 1;
    float tf[64];
    MsStatus s;
    memset(rep, 0, sizeof *rep);
    /* 1. draws */
    if ((s = pre_draws(e->drop, e->ts, tf, e->noise, B, N, e->sch, c->uncond_p, dr, g, k))) return s;
    /* 2. noisy latents */
    if ((s = ms_scheduler_add_noise(e->sch, e->noisy, latents, e->noise, e->ts, B, M))) return s;
    /* 3. text encoder */
    if ((s = pre_encode_captions(p->tok, e->drop, captions, B, e->ids, &e->ta, &e->tp, &p->m->text_config))) return s;
    /* 4. UNet */
    if ((s = unet_forward(e->pred, &e->ua, e->noisy, tf, e->ta.out, NULL, NULL, &e->up, NULL))) return s;
    /* 5. loss */
    if ((s = pre_eps_loss(e->pred, e->noise, e->dpred, N, "pretrain step", k, &rep->loss))) return s;
    /* 6. every gradient */
    memset(p->gu.mem, 0, p->gu.mem_bytes);
    memset(p->gt.mem, 0, p->gt.mem_bytes);
    memset(p->dctx, 0, nctx * sizeof(float));
    if ((s = unet_backward_full(&e->ua, &e->up, NULL, NULL, &p->dup, e->dpred, c->freeze_text ? NULL : p->dctx, NULL)))
        return s;
    if (!c->freeze_text &&
        (s = clip_text_backward_full(NULL, NULL, &p->dtp, p->dctx, &e->ta, &e->tp, NULL, e->ids, 0, &p->m->text_config)))
        return s;
    if (!train_finite((const float *)p->gu.mem, p->nu) || !train_finite((const float *)p->gt.mem, p->nt))
        return ms_errorf(MS_ERR_FORMAT, "pretrain step %lld: a gradient is not finite (loss %g)", (long long)k, rep->loss);
    /* 7. AdamW, one flat loop per table (a frozen text encoder keeps its weights and zero moments) */
    rep->lr = pre_lr_sched(c, k);
    ms_adamw_step((float *)p->m->unet.mem, (const float *)p->gu.mem, p->mom_m, p->mom_v, p->nu, k, rep->lr,
                  c->weight_decay, c->beta1, c->beta2, c->adam_eps);
    if (!c->freeze_text)
        ms_adamw_step((float *)p->m->text.mem, (const float *)p->gt.mem, p->mom_m + p->nu, p->mom_v + p->nu, p->nt, k,
                      rep->lr, c->weight_decay, c->beta1, c->beta2, c->adam_eps);
    p->step = k;
    pre_eps_report(e, rep);
    return MS_OK;
}

int64_t ms_pretrainer_step_count(const MsPretrainer *p) { return p->step; }
void ms_pretrainer_set_step(MsPretrainer *p, int64_t step) { p->step = step; }
void ms_pretrainer_moments(MsPretrainer *p, float **m, float **v, size_t *n) {
    *m = p->mom_m; *v = p->mom_v; *n = p->nu + p->nt;
}

/* The VAE stage, before the UNet's (whose latents it makes). One step, read top to bottom:
 *   1. n = randn (B,L,h,w)                                DiagonalGaussianDistribution.sample()
 *   2. mean, logvar = Encoder(x) (taped); z = mean + exp(logvar / 2) n
 *   3. x' = Decoder(z) (taped)
 *   4. L = (sum |x' - x| + kl_weight sum_b KL_b) / numel(x); dL/dx' = sign(x' - x) / numel(x)
 *      (mse: 2 (x' - x) / numel(x)), dL/dKL_b = kl_weight / numel(x)
 *   5. backward: decoder -> dz -> (posterior) dmean, dlogvar += (KL) -> encoder
 *   6. AdamW over the table's block as one flat array, lr warmed up as in ms_pretrain_step.
 * Why this objective: LDM (Rombach et al. 2022) trains its autoencoders on L1 + LPIPS + a patch
 * GAN + kl_weight KL. LPIPS needs a VGG trained on ImageNet (a download, not something trained
 * here from scratch) and the GAN a second network and an unstable two-player game; both restore
 * texture detail after many steps, which a budget of minutes does not reach. Of the pixel terms,
 * MSE is the default, by measurement (32,64,64 channels, batch 8, the same batches, PSNR of 64
 * held-out world scenes): 200 steps L1 16.1 dB, MSE 17.3; 400 steps L1 17.4, MSE 19.0 (L1 at 700
 * steps 18.6); equally blurry to the eye at this stage, so L1's sharper edges do not show yet
 * (--vae-loss l1 keeps it). kl_weight 1e-6 is SD's VAE's: the KL only keeps the latents bounded;
 * their scale is undone by scaling_factor. */
void ms_vae_pretrain_config_defaults(MsVaePretrainConfig *c) {
    memset(c, 0, sizeof *c);
    c->lr = 5e-4;
    c->warmup = 100;
    c->beta1 = 0.9; c->beta2 = 0.999; c->adam_eps = 1e-8;
    c->weight_decay = 0.01;
    c->kl_weight = 1e-6;
    c->mse = 1;
}

struct MsVaePretrainer {
    MsVaePretrainConfig cfg;
    VaeConfig vc;
    MsParamTable *w, g;                 /* weights (trained in place), gradients (same layout) */
    VaeParams p, dp;
    VaeTape te, td;
    Arena ar;                           /* both tapes, reset every step */
    int B, H, W, h, wl;                 /* batch, image sides, latent sides */
    size_t nx, nl, n;                   /* floats of x, of the latents, of the block */
    float *mom_m, *mom_v;
    float *noise, *mean, *logvar, *z, *img, *dimg, *dz, *dmean, *dlogvar, *kl, *dkl;
    int64_t step;
};

void ms_vae_pretrainer_free(MsVaePretrainer *p) {
    if (!p) return;
    ms_param_table_free(&p->g);
    arena_free(&p->ar);
    float *bufs[] = { p->mom_m, p->mom_v, p->noise, p->mean, p->logvar, p->z, p->img, p->dimg, p->dz, p->dmean,
                      p->dlogvar, p->kl, p->dkl };
    for (size_t i = 0; i < sizeof bufs / sizeof bufs[0]; i++) ms_free_aligned(bufs[i]);
    free(p);
}

MsStatus ms_vae_pretrainer_create(MsVaePretrainer **out, const VaeConfig *vc, MsParamTable *w,
                                  const MsVaePretrainConfig *c, int B, int H, int W) {
    MsVaePretrainer *p;
    MsStatus s;
    size_t be = 0, bd = 0;
    *out = NULL;
    if ((s = ms_vae_config_check(vc))) return s;
    const int f = 1 << (vc->n_blocks - 1);
    if (B < 1 || B > 64 || H < f || W < f || H % f || W % f)
        return ms_errorf(MS_ERR_ARG, "vae pretrain: batch %d (1..64), images %dx%d (multiples of the factor %d)", B, H, W, f);
    if (!(c->lr >= 0) || c->warmup < 0 || !(c->kl_weight >= 0))
        return ms_errorf(MS_ERR_ARG, "vae pretrain: lr %g, warmup %lld, kl_weight %g", c->lr, (long long)c->warmup,
                         c->kl_weight);
    if ((s = pre_block(w, "VAE"))) return s;
    p = (MsVaePretrainer *)calloc(1, sizeof *p);
    if (!p) return ms_errorf(MS_ERR_NOMEM, "vae pretrain: out of memory");
    p->cfg = *c; p->vc = *vc; p->w = w; p->B = B; p->H = H; p->W = W; p->h = H / f; p->wl = W / f;
    p->nx = (size_t)B * vc->in_channels * H * W;
    p->nl = (size_t)B * vc->latent_channels * p->h * p->wl;
    p->n = w->mem_bytes / sizeof(float);
    if (vc->out_channels != vc->in_channels) {
        s = ms_errorf(MS_ERR_SHAPE, "vae pretrain: out_channels %d != in_channels %d", vc->out_channels, vc->in_channels);
        goto fail;
    }
    if ((s = ms_param_table_vae(vc, &p->g)) || (s = ms_param_table_alloc(&p->g, NULL))) goto fail;
    if (p->g.mem_bytes != w->mem_bytes) { s = ms_errorf(MS_ERR_SHAPE, "vae pretrain: the table is not that of its config"); goto fail; }
    memset(p->g.mem, 0, p->g.mem_bytes);
    if ((s = vae_params_init(&p->p, vc, w)) || (s = vae_params_init(&p->dp, vc, &p->g))) goto fail;
    if ((s = vae_train_sizes(vc, 1, B, H, W, &be)) || (s = vae_train_sizes(vc, 0, B, p->h, p->wl, &bd)) ||
        (s = arena_init(&p->ar, be + bd)))
        goto fail;
    {
        float **bufs[] = { &p->noise, &p->mean, &p->logvar, &p->z, &p->img, &p->dimg, &p->dz,
                           &p->dmean, &p->dlogvar, &p->kl, &p->dkl };
        const size_t len[] = { p->nl, p->nl, p->nl, p->nl, p->nx, p->nx, p->nl, p->nl, p->nl, (size_t)B, (size_t)B };
        for (size_t i = 0; i < sizeof bufs / sizeof bufs[0]; i++)
            if (!(*bufs[i] = (float *)ms_alloc_aligned(len[i], sizeof(float)))) {
                s = ms_errorf(MS_ERR_NOMEM, "vae pretrain: out of memory"); goto fail;
            }
    }
    if ((s = pre_moments(&p->mom_m, &p->mom_v, p->n, "vae pretrain"))) goto fail;
    *out = p;
    return MS_OK;
fail:
    ms_vae_pretrainer_free(p);
    return s;
}

MsStatus ms_vae_pretrain_step(MsVaePretrainer *p, const float *x, const float *noise, MsTorchRng *g,
                              MsVaePretrainReport *rep) {
    const MsVaePretrainConfig *c = &p->cfg;
    const int64_t k = p->step + 1;
    const float inv = (float)(1.0 / (double)p->nx);
    MsStatus s;
    memset(rep, 0, sizeof *rep);
    if (!noise && !g) return ms_errorf(MS_ERR_ARG, "vae pretrain step %lld: neither noise nor a generator", (long long)k);
    /* 1.-3. posterior noise, encoder, sample, decoder */
    if (noise) memcpy(p->noise, noise, p->nl * sizeof(float));
    else ms_torch_randn(g, p->noise, p->nl, MS_TORCH_CPU_AVX2);
    arena_reset(&p->ar, 0);
    if ((s = vae_encode_train(&p->te, &p->ar, &p->p, p->mean, p->logvar, x, p->B, p->H, p->W))) return s;
    vae_posterior_sample(p->z, NULL, p->mean, p->logvar, p->noise, p->nl, 1.0f);
    if ((s = vae_decode_train(&p->td, &p->ar, &p->p, p->img, p->z, p->B, p->h, p->wl))) return s;
    /* 4. loss and its gradients */
    {
        double rec = 0.0, kl = 0.0;
        const float two = 2.0f * inv;
        for (size_t i = 0; i < p->nx; i++) {
            const float d = p->img[i] - x[i];
            if (c->mse) { rec += (double)d * d; p->dimg[i] = d * two; }
            else { rec += fabs((double)d); p->dimg[i] = d > 0.0f ? inv : d < 0.0f ? -inv : 0.0f; }
        }
        vae_kl(p->kl, p->mean, p->logvar, p->B, p->nl / (size_t)p->B);
        for (int b = 0; b < p->B; b++) { kl += p->kl[b]; p->dkl[b] = (float)(c->kl_weight / (double)p->nx); }
        rep->rec = rec / (double)p->nx;
        rep->kl = kl / p->B;
        rep->loss = (rec + c->kl_weight * kl) / (double)p->nx;
        if (!(rep->loss - rep->loss == 0.0))
            return ms_errorf(MS_ERR_FORMAT, "vae pretrain step %lld: the loss is not finite (%g)", (long long)k, rep->loss);
    }
    /* 5. every gradient */
    memset(p->g.mem, 0, p->g.mem_bytes);
    memset(p->dz, 0, p->nl * sizeof(float));
    memset(p->dmean, 0, p->nl * sizeof(float));
    memset(p->dlogvar, 0, p->nl * sizeof(float));
    if ((s = vae_decode_backward_full(&p->td, &p->dp, p->dz, p->dimg))) return s;
    vae_posterior_sample_backward(p->dmean, p->dlogvar, p->dz, p->logvar, p->noise, p->nl, 1.0f);
    vae_kl_backward(p->dmean, p->dlogvar, p->dkl, p->mean, p->logvar, p->B, p->nl / (size_t)p->B);
    if ((s = vae_encode_backward_full(&p->te, &p->dp, NULL, p->dmean, p->dlogvar))) return s;
    if (!train_finite((const float *)p->g.mem, p->n))
        return ms_errorf(MS_ERR_FORMAT, "vae pretrain step %lld: a gradient is not finite (loss %g)", (long long)k, rep->loss);
    /* 6. AdamW */
    rep->lr = pre_lr(c->lr, c->warmup, k);
    ms_adamw_step((float *)p->w->mem, (const float *)p->g.mem, p->mom_m, p->mom_v, p->n, k, rep->lr, c->weight_decay,
                  c->beta1, c->beta2, c->adam_eps);
    p->step = k;
    rep->noise = p->noise;
    return MS_OK;
}

int64_t ms_vae_pretrainer_step_count(const MsVaePretrainer *p) { return p->step; }
void ms_vae_pretrainer_set_step(MsVaePretrainer *p, int64_t step) { p->step = step; }
void ms_vae_pretrainer_moments(MsVaePretrainer *p, float **m, float **v, size_t *n) {
    *m = p->mom_m; *v = p->mom_v; *n = p->n;
}

/* The adapters stage, after the UNet's: one T2I-Adapter (Mou et al. 2023, arXiv:2302.08453) on
 * the frozen UNet and text encoder. One step, read top to bottom:
 *   1. draws as ms_pretrain_step (pre_draws); 2. z_t = sqrt(ac_t) z0 + sqrt(1 - ac_t) n;
 *   3. ctx = TextEncoder(tokenize(caption_b)) (inference: frozen);
 *   4. F = Adapter(cond) on a tape (adapter_forward_train), adapter_conditioning_scale 1;
 *   5. eps = UNet(z_t, t, ctx, F) (unet_forward adds F_i to down block i's output as the
 *      pipelines do: before its downsampler, so the skip sees it);
 *   6. L = mean (eps - n)^2, dL/deps = (2 / N)(eps - n);
 *   7. unet_backward with UNetActs.dadapter: dL/dF_i, the gradient where F_i was added (no UNet
 *      weight gradient); adapter_backward_full: every adapter parameter;
 *   8. AdamW over the adapter's block, lr_k = lr * min(1, k / warmup).
 * The objective is the adapter paper's: the UNet's denoising loss with the adapter's features
 * added, the UNet and text encoder fixed; timesteps uniform as in ms_pretrain_step. */
MsStatus ms_adapter_fits_unet(const AdapterConfig *ac, const UNetConfig *uc, const char *what) {
    if (ac->n_channels != uc->n_blocks)
        return ms_errorf(MS_ERR_SHAPE, "%s: the adapter has %d feature levels, the UNet %d down blocks", what,
                         ac->n_channels, uc->n_blocks);
    for (int i = 0; i < uc->n_blocks; i++) {
        if (ac->channels[i] != uc->block_out_channels[i])
            return ms_errorf(MS_ERR_SHAPE, "%s: adapter level %d has %d channels, UNet block %d has %d", what, i,
                             ac->channels[i], i, uc->block_out_channels[i]);
        if (i < uc->n_blocks - 1 && uc->down_block_types[i] != MS_BLOCK_CROSS_ATTN_DOWN)
            return ms_errorf(MS_ERR_SHAPE, "%s: UNet down block %d is a %s with a downsampler: it takes its residual after "
                             "it, at the next level's size, which no T2I-Adapter level has (SD's order has the plain "
                             "DownBlock2D last)", what, i, ms_block_type_name(uc->down_block_types[i]));
    }
    return MS_OK;
}

struct MsAdapterTrainer {
    MsPretrainConfig cfg;
    const MsModel *m;
    const ClipTokenizer *tok;
    AdapterConfig ac;
    MsParamTable *w, g;                 /* adapter weights (trained in place), gradients (same layout) */
    AdapterParams ap, adp;
    AdapterTape tape;
    PreEps e;                           /* scheduler, UNet and text encoder (frozen), the step's buffers */
    int H, W;                           /* the conditions' size */
    size_t n;                           /* floats of the adapter's block */
    Arena aar;
    float *mom_m, *mom_v;
    float *dfeat[MS_MAX_BLOCKS];            /* dL/dF_i */
    int64_t step;
};

void ms_adapter_trainer_free(MsAdapterTrainer *p) {
    if (!p) return;
    pre_eps_free(&p->e);
    ms_param_table_free(&p->g);
    arena_free(&p->aar);
    ms_free_aligned(p->mom_m); ms_free_aligned(p->mom_v);
    for (int i = 0; i < MS_MAX_BLOCKS; i++) ms_free_aligned(p->dfeat[i]);
    free(p);
}

MsStatus ms_adapter_trainer_create(MsAdapterTrainer **out, const MsModel *m, const ClipTokenizer *tok,
                                   const AdapterConfig *ac, MsParamTable *w, const MsPretrainConfig *c, int B,
                                   int h, int wl) {
    const UNetConfig *uc = &m->unet_config;
    const ClipTextConfig *tc = &m->text_config;
    MsAdapterTrainer *p;
    MsStatus s;
    size_t ab = 0, nf[MS_MAX_BLOCKS];
    *out = NULL;
    if (B < 1 || B > 64 || h < 1 || wl < 1) return ms_errorf(MS_ERR_ARG, "adapter training: batch %d (1..64), latent %dx%d", B, h, wl);
    if ((s = ms_adapter_config_check(ac)) || (s = ms_adapter_fits_unet(ac, uc, "adapter training"))) return s;
    if (uc->cross_attention_dim != tc->hidden_size || tc->max_position_embeddings < PRE_T)
        return ms_errorf(MS_ERR_SHAPE, "adapter training: UNet cross_attention_dim %d, text hidden_size %d, %d positions",
                         uc->cross_attention_dim, tc->hidden_size, tc->max_position_embeddings);
    if (!(c->lr >= 0) || c->warmup < 0 || !(c->uncond_p >= 0 && c->uncond_p <= 1))
        return ms_errorf(MS_ERR_ARG, "adapter training: lr %g, warmup %lld, uncond_p %g", c->lr, (long long)c->warmup,
                         c->uncond_p);
    if ((s = pre_block(w, "adapter"))) return s;
    if ((s = adapter_sizes(ac, B, h * ac->downscale_factor, wl * ac->downscale_factor, NULL, nf))) return s;
    p = (MsAdapterTrainer *)calloc(1, sizeof *p);
    if (!p) return ms_errorf(MS_ERR_NOMEM, "adapter training: out of memory");
    p->cfg = *c; p->m = m; p->tok = tok; p->ac = *ac; p->w = w;
    p->H = h * ac->downscale_factor; p->W = wl * ac->downscale_factor;
    p->n = w->mem_bytes / sizeof(float);
    if ((s = ms_param_table_adapter(ac, &p->g)) || (s = ms_param_table_alloc(&p->g, NULL))) goto fail;
    if (p->g.mem_bytes != w->mem_bytes) { s = ms_errorf(MS_ERR_SHAPE, "adapter training: the table is not that of its config"); goto fail; }
    memset(p->g.mem, 0, p->g.mem_bytes);
    if ((s = adapter_params_init(&p->ap, ac, w)) || (s = adapter_params_init(&p->adp, ac, &p->g))) goto fail;
    if ((s = pre_eps_init(&p->e, m, B, h, wl, CLIP_INFER, "adapter training"))) goto fail;
    p->e.ua.dadapter = p->dfeat;
    if ((s = adapter_train_sizes(ac, B, p->H, p->W, &ab)) || (s = arena_init(&p->aar, ab))) goto fail;
    if ((s = pre_moments(&p->mom_m, &p->mom_v, p->n, "adapter training"))) goto fail;
    for (int i = 0; i < ac->n_channels; i++)
        if (!(p->dfeat[i] = (float *)ms_alloc_aligned(nf[i], sizeof(float)))) {
            s = ms_errorf(MS_ERR_NOMEM, "adapter training: out of memory"); goto fail;
        }
    *out = p;
    return MS_OK;
fail:
    ms_adapter_trainer_free(p);
    return s;
}

MsStatus ms_adapter_train_step(MsAdapterTrainer *p, const float *latents, const float *cond,
                               const char *const *captions, const MsPretrainDraws *dr, MsTorchRng *g,
                               MsPretrainReport *rep) {
    const MsPretrainConfig *c = &p->cfg;
    PreEps *e = &p->e;
    const AdapterConfig *ac = &p->ac;
    const int B = e->B, R = ac->num_res_blocks;
    const size_t M = (size_t)e->C * e->h * e->w, N = (size_t)B * M;
    const int64_t k = p->step + 1;
    const float *feat[MS_MAX_BLOCKS];
    size_t nf[MS_MAX_BLOCKS];
    float tf[64];
    MsStatus s;
    memset(rep, 0, sizeof *rep);
    /* 1.-3. draws, noisy latents, text encoder */
    if ((s = pre_draws(e->drop, e->ts, tf, e->noise, B, N, e->sch, c->uncond_p, dr, g, k))) return s;
    if ((s = ms_scheduler_add_noise(e->sch, e->noisy, latents, e->noise, e->ts, B, M))) return s;
    if ((s = pre_encode_captions(p->tok, e->drop, captions, B, e->ids, &e->ta, &e->tp, &p->m->text_config))) return s;
    /* 4. adapter features */
    arena_reset(&p->aar, 0);
    if ((s = adapter_forward_train(&p->tape, &p->aar, &p->ap, cond, B, p->H, p->W))) return s;
    for (int i = 0; i < ac->n_channels; i++) feat[i] = p->tape.x[i][R];
    /* 5. UNet with the residuals */
    if ((s = unet_forward(e->pred, &e->ua, e->noisy, tf, e->ta.out, NULL, feat, &e->up, NULL))) return s;
    /* 6. loss */
    if ((s = pre_eps_loss(e->pred, e->noise, e->dpred, N, "adapter training step", k, &rep->loss))) return s;
    /* 7. dL/dF through the frozen UNet, then every adapter parameter */
    adapter_sizes(ac, B, p->H, p->W, NULL, nf);
    for (int i = 0; i < ac->n_channels; i++) memset(p->dfeat[i], 0, nf[i] * sizeof(float));
    if ((s = unet_backward(&e->ua, &e->up, NULL, NULL, e->dpred, NULL, NULL))) return s;
    memset(p->g.mem, 0, p->g.mem_bytes);
    if ((s = adapter_backward_full(&p->tape, &p->adp, NULL, (const float *const *)p->dfeat))) return s;
    if (!train_finite((const float *)p->g.mem, p->n))
        return ms_errorf(MS_ERR_FORMAT, "adapter training step %lld: a gradient is not finite (loss %g)", (long long)k,
                         rep->loss);
    /* 8. AdamW */
    rep->lr = pre_lr_sched(c, k);
    ms_adamw_step((float *)p->w->mem, (const float *)p->g.mem, p->mom_m, p->mom_v, p->n, k, rep->lr, c->weight_decay,
                  c->beta1, c->beta2, c->adam_eps);
    p->step = k;
    pre_eps_report(e, rep);
    return MS_OK;
}

int64_t ms_adapter_trainer_step_count(const MsAdapterTrainer *p) { return p->step; }
void ms_adapter_trainer_set_step(MsAdapterTrainer *p, int64_t step) { p->step = step; }
void ms_adapter_trainer_moments(MsAdapterTrainer *p, float **m, float **v, size_t *n) {
    *m = p->mom_m; *v = p->mom_v; *n = p->n;
}

/* ---- text-to-image pipeline ---- */
/* diffusers 0.19.3 StableDiffusionPipeline.__call__ (pipeline_stable_diffusion.py) and
 * StableDiffusionAdapterPipeline.__call__ (t2i_adapter/pipeline_stable_diffusion_adapter.py),
 * step for step:
 *   0. height/width default to unet.sample_size * 8 (the caller fills them in).
 *   3. _encode_prompt: ids = tokenizer(prompt, padding "max_length" 77, truncation) -> text
 *      encoder last_hidden_state; with CFG (guidance_scale > 1) the negative prompt (or "")
 *      the same way; each repeated num_images_per_prompt times; context = [uncond, cond].
 *   4. scheduler.set_timesteps(steps).
 *   5. latents = randn((B, 4, H/8, W/8), generator = torch.Generator().manual_seed(seed))
 *      * init_noise_sigma  (one randn call for the whole batch, on the CPU).
 *   7. adapter: state_k = adapter(cond)_k * adapter_conditioning_scale, repeated to B and
 *      doubled for CFG, added to the UNet's down blocks.
 *      for each t: in = scale_model_input(cat([latents] * 2), t); eps = unet(in, t, context);
 *        eps = eps_uncond + guidance_scale * (eps_text - eps_uncond);
 *        latents = scheduler.step(eps, t, latents, generator)   (DDPM/Euler draw noise from
 *        the same generator, after the initial latents).
 *   decode(latents / scaling_factor); postprocess: ms_image_to_u8. */

void ms_image_to_u8(uint8_t *out, const float *img, int C, int H, int W) {
    const size_t HW = (size_t)H * W;
    for (int c = 0; c < C; c++)
        for (size_t p = 0; p < HW; p++) {
            float v = img[(size_t)c * HW + p] / 2.0f + 0.5f;     /* denormalize: (x / 2 + 0.5) */
            v = v < 0.0f ? 0.0f : v > 1.0f ? 1.0f : v;           /* .clamp(0, 1) (NaN stays NaN) */
            v = v * 255.0f;                                      /* numpy float32 */
            out[p * C + c] = v == v ? (uint8_t)nearbyintf(v) : 0;   /* .round(): half to even */
        }
}

/* Encodes one prompt (B rows of the same ids) into ctx (B, T, D); new_emb (n_new, D): the rows
 * of added tokens (NULL, 0: none). */
static MsStatus encode_prompt(const ClipTextParams *p, const ClipTextConfig *c, const ClipTokenizer *tok,
                              const char *text, float *ctx, int B, Arena *ar, const float *new_emb, int n_new) {
    int32_t ids[77];
    const int T = 77;
    size_t mark = arena_mark(ar);
    ClipTextActs a;
    MsStatus s = clip_tokenize(tok, text, strlen(text), ids, T);
    if (s) return s;
    if ((s = clip_text_acts_alloc(&a, ar, c, 1, T, 0, 0))) return s;
    if ((s = clip_text_forward(&a, p, NULL, ids, new_emb, n_new, c))) { arena_reset(ar, mark); return s; }
    for (int b = 0; b < B; b++) memcpy(ctx + (size_t)b * T * c->hidden_size, a.out, (size_t)T * c->hidden_size * sizeof(float));
    arena_reset(ar, mark);
    return MS_OK;
}

/* Mix-of-Show pipeline_edlora.py bind_concept_prompt for layer i: starting from the prompt,
 * for each concept word in order, str.replace(word, its i-th token) (every occurrence, left to
 * right, not rescanning what was inserted). Returns a malloc'ed string or NULL (out of memory). */
static char *bind_prompt(const char *prompt, int n_words, const char *const *word, const char *const *token,
                         int n_layers, int i) {
    size_t len = strlen(prompt);
    char *cur = (char *)malloc(len + 1);
    if (!cur) return NULL;
    memcpy(cur, prompt, len + 1);
    for (int w = 0; w < n_words; w++) {
        const char *from = word[w], *to = token[(size_t)w * n_layers + i], *q;
        size_t fl = strlen(from), tl = strlen(to), n = 0;
        if (!fl) continue;                      /* str.replace('', x) would insert everywhere: words are never empty */
        for (q = strstr(cur, from); q; q = strstr(q + fl, from)) n++;
        if (!n) continue;
        size_t cap = strlen(cur) - n * fl + n * tl + 1;
        char *out = (char *)malloc(cap), *o = out;
        const char *r = cur;
        if (!out) { free(cur); return NULL; }
        for (; (q = strstr(r, from)) != NULL; r = q + fl) {
            memcpy(o, r, (size_t)(q - r)); o += q - r;
            memcpy(o, to, tl); o += tl;
        }
        strcpy(o, r);                           /* the rest after the last occurrence */
        free(cur);
        cur = out;
    }
    return cur;
}

MsStatus ms_txt2img(const MsModel *m, const ClipTokenizer *tok, const MsTxt2ImgOptions *o, float *image) {
    const UNetConfig *uc = &m->unet_config;
    const VaeConfig *vc = &m->vae_config;
    const ClipTextConfig *tc = &m->text_config;
    const int f = 1 << (vc->n_blocks - 1), B = o->batch, T = 77, D = tc->hidden_size;
    const int cfg_on = o->guidance_scale > 1.0f, NB = cfg_on ? 2 * B : B;
    MsStatus s;
    if (B < 1 || B > 64) return ms_errorf(MS_ERR_ARG, "txt2img: batch %d (expected 1..64)", B);
    if (o->width <= 0 || o->height <= 0 || o->width % f || o->height % f || o->width > 8192 || o->height > 8192)
        return ms_errorf(MS_ERR_ARG, "txt2img: size %d x %d: sides must be positive multiples of %d (at most 8192)",
                         o->width, o->height, f);
    if (o->steps < 1 || o->steps > MS_SCHED_MAX_T) return ms_errorf(MS_ERR_ARG, "txt2img: %d steps (expected 1..%d)", o->steps, MS_SCHED_MAX_T);
    if (o->release && o->release != m) return ms_errorf(MS_ERR_ARG, "txt2img: 'release' is not the model sampled from");
    if (uc->cross_attention_dim != D)
        return ms_errorf(MS_ERR_ARG, "txt2img: UNet cross_attention_dim %d != text hidden_size %d", uc->cross_attention_dim, D);
    const int n_lc = o->n_layer_ctx, n_ctx = n_lc ? n_lc : 1;   /* ED-LoRA: one context per cross-attention layer */
    if (n_lc && n_lc != ms_unet_cross_attn_layers(uc))
        return ms_errorf(MS_ERR_ARG, "txt2img: %d layer-wise contexts, the UNet has %d cross-attention layers",
                         n_lc, ms_unet_cross_attn_layers(uc));
    if (o->n_new < 0 || (o->n_new && !o->new_emb) || o->n_bind < 0 || (o->n_bind && (!n_lc || !o->bind_word || !o->bind_token)))
        return ms_errorf(MS_ERR_ARG, "txt2img: ED-LoRA options: %d new rows%s, %d words to bind%s", o->n_new,
                         o->n_new && !o->new_emb ? " without data" : "", o->n_bind,
                         o->n_bind && !n_lc ? " without layer-wise contexts" : "");
    const int h = o->height / f, w = o->width / f, L = uc->in_channels;
    const size_t nl = (size_t)B * L * h * w;            /* one latent batch */
    MsScheduler *sch = (MsScheduler *)malloc(sizeof *sch);
    ClipTextParams *tp = (ClipTextParams *)malloc(sizeof *tp);
    VaeParams *vp = (VaeParams *)malloc(sizeof *vp);
    UNetParams *up = (UNetParams *)malloc(sizeof *up);
    MsTorchRng *rng = (MsTorchRng *)malloc(sizeof *rng);
    Arena ar = { 0 }, acts = { 0 };
    UNetActs ua;
    int ua_ok = 0, up_ok = 0;
    float *lat = NULL, *in = NULL, *eps = NULL, *work = NULL, *ctx = NULL, *feat[MS_MAX_BLOCKS] = { 0 };
    const float **lctx = NULL;                          /* n_lc pointers into ctx (ED-LoRA) */
    size_t nfeat[MS_MAX_BLOCKS] = { 0 };
    int n_feat = 0;
    if (!sch || !tp || !vp || !up || !rng) { s = ms_errorf(MS_ERR_NOMEM, "txt2img: out of memory"); goto done; }
    if ((s = ms_scheduler_init(sch, o->sampler, &m->scheduler_config, o->torch_cpu))) goto done;
    if ((s = ms_scheduler_set_timesteps(sch, o->steps))) goto done;
    if ((s = clip_text_params(tp, &m->text, tc))) goto done;
    if ((s = vae_params_init(vp, vc, &m->vae))) goto done;
    if ((s = unet_params_init(up, uc, &m->unet))) goto done;
    up_ok = 1;

    /* plan: one scratch arena for the largest of text encoder, adapter, UNet and VAE decode */
    {
        VaeSizes vz;
        size_t need = clip_text_sizes(tc, 1, T, 0, 0), u = 0;
        if ((s = vae_sizes(vc, o->height, o->width, -1, &vz))) goto done;
        if (vz.decode_bytes > need) need = vz.decode_bytes;
        UNetSizes us;
        if ((s = unet_sizes(uc, NB, h, w, T, 0, &us))) goto done;
        u = us.scratch_bytes;
        if (u > need) need = u;
        if (o->adapter) {
            size_t ab;
            if ((s = adapter_sizes(&o->adapter->cfg, 1, o->height, o->width, &ab, nfeat))) goto done;
            if ((s = ms_adapter_fits_unet(&o->adapter->cfg, uc, "txt2img"))) goto done;
            if (o->height / o->adapter->cfg.downscale_factor != h || o->width / o->adapter->cfg.downscale_factor != w) {
                s = ms_errorf(MS_ERR_SHAPE, "txt2img: the adapter's downscale_factor %d is not the VAE's factor %d",
                              o->adapter->cfg.downscale_factor, f);
                goto done;
            }
            if (ab > need) need = ab;
            n_feat = o->adapter->cfg.n_channels;
        }
        if ((s = arena_init(&ar, need)) || (s = arena_init(&acts, us.acts_bytes))) goto done;
    }
    lat = (float *)ms_alloc_aligned(nl, sizeof(float));
    in = (float *)ms_alloc_aligned(2 * nl, sizeof(float));
    eps = (float *)ms_alloc_aligned(2 * nl, sizeof(float));
    work = (float *)ms_alloc_aligned(nl, sizeof(float));
    ctx = (float *)ms_alloc_aligned((size_t)n_ctx * NB * T * D, sizeof(float));
    if (n_lc) lctx = (const float **)malloc((size_t)n_lc * sizeof *lctx);
    if (!lat || !in || !eps || !work || !ctx || (n_lc && !lctx)) { s = ms_errorf(MS_ERR_NOMEM, "txt2img: out of memory"); goto done; }

    /* 3. context = [uncond x B, cond x B]. ED-LoRA (EDLoRAPipeline._encode_prompt): context i
     * (layer i) = [uncond x B, encode(bind_concept_prompt(prompt)[i]) x B]; the negative prompt
     * is encoded once, unbound, and repeated for every layer. */
    if (cfg_on && (s = encode_prompt(tp, tc, tok, o->negative ? o->negative : "", ctx, B, &ar, o->new_emb, o->n_new))) goto done;
    if (!n_lc) {
        if ((s = encode_prompt(tp, tc, tok, o->prompt, ctx + (cfg_on ? (size_t)B * T * D : 0), B, &ar, o->new_emb, o->n_new)))
            goto done;
    } else {
        for (int i = 0; i < n_lc; i++) {
            float *ci = ctx + (size_t)i * NB * T * D;
            char *bound = bind_prompt(o->prompt, o->n_bind, o->bind_word, o->bind_token, n_lc, i);
            if (!bound) { s = ms_errorf(MS_ERR_NOMEM, "txt2img: out of memory"); goto done; }
            if (cfg_on && i) memcpy(ci, ctx, (size_t)B * T * D * sizeof(float));
            s = encode_prompt(tp, tc, tok, bound, ci + (cfg_on ? (size_t)B * T * D : 0), B, &ar, o->new_emb, o->n_new);
            free(bound);
            if (s) goto done;
            lctx[i] = ci;
        }
    }

    if (o->release) ms_param_table_release(&o->release->text);   /* the prompts are encoded */

    /* 5. initial latents */
    ms_torch_seed(rng, o->seed);
    if (o->init_noise) memcpy(lat, o->init_noise, nl * sizeof(float));
    else ms_torch_randn(rng, lat, nl, o->torch_cpu);
    for (size_t k = 0; k < nl; k++) lat[k] = lat[k] * sch->init_noise_sigma;

    /* 7. adapter state: features * scale, repeated to NB samples */
    if (o->adapter) {
        float *one[MS_MAX_BLOCKS];
        for (int i = 0; i < n_feat; i++) {
            feat[i] = (float *)ms_alloc_aligned(nfeat[i] * NB, sizeof(float));
            if (!feat[i]) { s = ms_errorf(MS_ERR_NOMEM, "txt2img: out of memory"); goto done; }
            one[i] = feat[i];
        }
        if ((s = adapter_forward(o->adapter, &ar, one, o->cond, 1, o->height, o->width))) goto done;
        for (int i = 0; i < n_feat; i++) {
            for (size_t k = 0; k < nfeat[i]; k++) feat[i][k] = feat[i][k] * o->adapter_scale;
            for (int b = 1; b < NB; b++) memcpy(feat[i] + (size_t)b * nfeat[i], feat[i], nfeat[i] * sizeof(float));
        }
        arena_reset(&ar, 0);
    }

    /* 7. denoising loop (the CFG batch in parts, one per thread, when they divide it: eps is the same) */
    if ((s = unet_acts_init(&ua, uc, NB, h, w, T, 0, &acts, &ar))) goto done;
    ua_ok = 1;
    ua.split = 1;
    for (int i = 0; i < sch->num_steps; i++) {
        float t[128];
        for (int b = 0; b < NB; b++) t[b] = (float)sch->timesteps[i];
        ms_scheduler_scale_model_input(sch, i, in, lat, nl);
        if (cfg_on) memcpy(in + nl, in, nl * sizeof(float));
        if ((s = unet_forward(eps, &ua, in, t, n_lc ? NULL : ctx, (const float *const *)lctx,
                              o->adapter ? (const float *const *)feat : NULL, up, NULL)))
            goto done;
        if (cfg_on) {
            const float g = o->guidance_scale;
            for (size_t k = 0; k < nl; k++) eps[k] = eps[k] + g * (eps[nl + k] - eps[k]);
        }
        if ((s = ms_scheduler_step(sch, i, eps, lat, work, nl, rng))) goto done;
        if (o->progress) o->progress(o->progress_ctx, i, sch->num_steps, lat, nl);
    }

    /* decode(latents / scaling_factor) */
    unet_acts_free(&ua);
    ua_ok = 0;
    /* the UNet is done: give its activations, weight staging and the kernels' per-thread
     * workspaces back before the VAE decode, the peak of a 512x512 run */
    arena_free(&acts);
    if (up_ok) { unet_params_free(up); up_ok = 0; }
    if (o->release) ms_param_table_release(&o->release->unet);
    ms_gemm_scratch_free();
    ops_scratch_free();
    ms_free_aligned(in); ms_free_aligned(eps); ms_free_aligned(ctx);
    in = eps = ctx = NULL;
    free(lctx);
    lctx = NULL;
    arena_reset(&ar, 0);
    s = vae_decode(vp, &ar, image, lat, B, h, w);
done:
    for (int i = 0; i < MS_MAX_BLOCKS; i++) ms_free_aligned(feat[i]);
    ms_free_aligned(lat); ms_free_aligned(in); ms_free_aligned(eps); ms_free_aligned(work); ms_free_aligned(ctx);
    free(lctx);
    if (ua_ok) unet_acts_free(&ua);
    if (up_ok) unet_params_free(up);
    arena_free(&ar);
    arena_free(&acts);
    free(sch); free(tp); free(vp); free(up); free(rng);
    return s;
}

/* ---- gradient fusion ---- */
/* Mix-of-Show gradient fusion (arXiv:2305.18292, "Gradient Fusion"; official
 * code: gradient_fusion.py of Mix-of-Show commit 51270fd).
 *
 * Every layer W0 (d_out, d_in) that some concept's LoRA touches is replaced by one W that does,
 * on each concept's own recorded inputs, what that concept's merged layer W_i = W0 + a_i up_i down_i
 * does:
 *     f(W) = sum_i ||X_i W^T - V_i||^2 / (n d_out),   V_i = X_i W_i^T  (bias removed),  n = sum n_i
 * f is a convex quadratic in W: with G = sum_i X_i^T X_i and C = sum_i V_i^T X_i,
 *     f(W) = (sum||V||^2 - 2 <W, C> + <W G, W>) / (n d_out),   grad f = 2 (W G - C) / (n d_out).
 * Its minimisers solve W G = C. Three ways to pick W:
 *   gram   (default) the minimiser nearest to W0: W = W0 + (C - W0 G) G+, in double, G+ from a
 *          symmetric eigen-decomposition with eigenvalues below MS_FUSE_RCOND * max dropped;
 *   lbfgs  the official: torch.optim.LBFGS from W0 (history 25, strong Wolfe, lr 1, tolerances
 *          1e-16, max_iter 500 text / 50 UNet), returning the best W seen (the official closure
 *          clones W whenever the loss drops; that W, not the last, is what it saves);
 *   weight the paper's baseline W0 + sum_i a_i up_i down_i.
 * Why gram is the same answer: L-BFGS from W0 only moves W inside W0 + span{rows of gradients}
 * = W0 + (range of G) on the input side, so where it converges it lands on the minimiser whose
 * change lies in range(G): exactly W0 + (C - W0 G) G+. On ill-conditioned layers it stops short.
 *
 * Which inputs are recorded (gradient_fusion.py):
 *   text encoder q/k/v/out_proj: each concept's merged text encoder encodes the 32 bound prompts
 *     of ["photo of a {concept}", "{concept}"] (16 layer variants each, no padding); every token
 *     row that reaches the layer is a row of X (q, k, v share their input layer_norm1(x));
 *   UNet attn2.to_k/to_v of cross-attention layer l: the FUSED text encoder's last_hidden_state
 *     of the two prompts bound for layer l, at the positions whose id >= 49407 (the concept
 *     tokens and EOS), targets from the concept's merged to_k/to_v;
 *   the other UNet attention layers: 20-step DPM-Solver sampling at 512x512 (not done here yet).
 */

const char *ms_fuse_method_name(MsFuseMethod m) {
    return m == MS_FUSE_GRAM ? "gram" : m == MS_FUSE_LBFGS ? "lbfgs" : m == MS_FUSE_WEIGHT ? "weight" : "?";
}

/* ---- recorded rows ---- */
MsStatus ms_fuse_rows_init(MsFuseRows *r, int d_in, int n_concepts) {
    memset(r, 0, sizeof *r);
    if (d_in <= 0 || n_concepts <= 0) return ms_errorf(MS_ERR_ARG, "fuse: rows of width %d for %d concepts", d_in, n_concepts);
    r->end = (size_t *)calloc((size_t)n_concepts, sizeof(size_t));
    if (!r->end) return ms_errorf(MS_ERR_NOMEM, "fuse: out of memory");
    r->d_in = d_in;
    r->n_concepts = n_concepts;
    return MS_OK;
}

MsStatus ms_fuse_rows_add(MsFuseRows *r, int concept, const float *X, size_t n) {
    size_t need, bytes;
    if (concept < 0 || concept >= r->n_concepts) return ms_errorf(MS_ERR_ARG, "fuse: concept %d of %d", concept, r->n_concepts);
    for (int c = concept + 1; c < r->n_concepts; c++)
        if (r->end[c] != r->end[concept]) return ms_errorf(MS_ERR_ARG, "fuse: rows of concept %d after concept %d", concept, c);
    if (!ms_add_ok(r->n, n, &need)) return ms_errorf(MS_ERR_NOMEM, "fuse: row count overflows");
    if (need > r->cap) {
        size_t cap = r->cap ? r->cap : 64;
        while (cap < need) cap *= 2;
        if (!ms_mul_ok(cap, (size_t)r->d_in * sizeof(float), &bytes)) return ms_errorf(MS_ERR_NOMEM, "fuse: rows overflow");
        float *X2 = (float *)realloc(r->X, bytes);
        if (!X2) return ms_errorf(MS_ERR_NOMEM, "fuse: cannot keep %zu rows of %d floats", cap, r->d_in);
        r->X = X2;
        r->cap = cap;
    }
    if (n) memcpy(r->X + r->n * (size_t)r->d_in, X, n * (size_t)r->d_in * sizeof(float));
    r->n = need;
    for (int c = concept; c < r->n_concepts; c++) r->end[c] = need;
    return MS_OK;
}

void ms_fuse_rows_free(MsFuseRows *r) {
    free(r->X);
    free(r->end);
    memset(r, 0, sizeof *r);
}

/* ---- statistics ---- */
MsStatus ms_fuse_stats_init(MsFuseStats *s, int d_in, int d_out) {
    memset(s, 0, sizeof *s);
    s->G = (double *)calloc((size_t)d_in * d_in, sizeof(double));
    s->C = (double *)calloc((size_t)d_out * d_in, sizeof(double));
    if (!s->G || !s->C) { ms_fuse_stats_free(s); return ms_errorf(MS_ERR_NOMEM, "fuse: statistics of a %dx%d layer", d_out, d_in); }
    s->d_in = d_in;
    s->d_out = d_out;
    return MS_OK;
}

void ms_fuse_stats_free(MsFuseStats *s) {
    free(s->G);
    free(s->C);
    memset(s, 0, sizeof *s);
}

void ms_fuse_merged_weight(float *Wc, const float *W0, const MsFuseDelta *d, int d_out, int d_in) {
    const size_t m = (size_t)d_out * d_in;
    if (!d || !d->down || d->rank <= 0) { memcpy(Wc, W0, m * sizeof(float)); return; }
    /* merge_lora_into_weight: original + alpha * (up @ down), the product in float32 */
    ms_gemm_ref(0, 0, d_out, d_in, d->rank, 1.0f, d->up, d->rank, d->down, d_in, 0.0f, Wc, d_in);
    for (size_t k = 0; k < m; k++) Wc[k] = W0[k] + d->alpha * Wc[k];
}

/* G += X^T X, C += V^T X with V = X Wc^T, vv += sum V^2, all in double. Three threaded double
 * GEMMs (tensor.c) in which every element sums over its index in order: V[r][o] = sum_i
 * x_ri Wc_oi, C[o][i] += sum_r V[r][o] x_ri, G[i][j] += sum_r x_ri x_rj, the same sums in the
 * same order as the row-by-row loops they replace. */
MsStatus ms_fuse_stats_add(MsFuseStats *s, const float *X, size_t n, const float *Wc) {
    const int di = s->d_in, dout = s->d_out;
    size_t nx, nv, nw, total;
    if (n == 0) return MS_OK;
    if (n > (size_t)INT_MAX || !ms_mul_ok(n, (size_t)di, &nx) || !ms_mul_ok(n, (size_t)dout, &nv) ||
        !ms_mul_ok((size_t)di, (size_t)dout, &nw) || !ms_add_ok(2 * nx, 2 * nv, &total) || !ms_add_ok(total, nw, &total) ||
        total > SIZE_MAX / sizeof(double))
        return ms_errorf(MS_ERR_NOMEM, "fuse: statistics of %zu rows of %d", n, di);
    double *Xd = (double *)malloc(total * sizeof(double));
    if (!Xd) return ms_errorf(MS_ERR_NOMEM, "fuse: statistics of %zu rows of %d", n, di);
    double *Xt = Xd + nx, *V = Xt + nx, *Vt = V + nv, *WcT = Vt + nv;
    for (size_t r = 0; r < n; r++)
        for (int i = 0; i < di; i++) Xd[r * di + i] = Xt[(size_t)i * n + r] = X[r * di + i];
    for (int o = 0; o < dout; o++)
        for (int i = 0; i < di; i++) WcT[(size_t)i * dout + o] = Wc[(size_t)o * di + i];
    memset(V, 0, nv * sizeof(double));
    ms_gemm_f64_acc(V, Xd, WcT, (int)n, dout, di);          /* V = X Wc^T */
    for (size_t r = 0; r < n; r++)
        for (int o = 0; o < dout; o++) {
            const double v = V[r * dout + o];
            s->vv += v * v;
            Vt[(size_t)o * n + r] = v;
        }
    ms_gemm_f64_acc(s->C, Vt, Xd, dout, di, (int)n);        /* C += V^T X */
    ms_gemm_f64_acc(s->G, Xt, Xd, di, di, (int)n);          /* G += X^T X */
    s->n += n;
    free(Xd);
    return MS_OK;
}

double ms_fuse_objective_stats(const MsFuseStats *s, const float *W) {
    const int di = s->d_in;
    double f = s->vv;
    for (int o = 0; o < s->d_out; o++) {
        const float *w = W + (size_t)o * di;
        const double *c = s->C + (size_t)o * di;
        double wc = 0.0, wgw = 0.0;
        for (int i = 0; i < di; i++) {
            const double *g = s->G + (size_t)i * di;
            double gw = 0.0;
            for (int j = 0; j < di; j++) gw += g[j] * w[j];
            wgw += w[i] * gw;
            wc += w[i] * c[i];
        }
        f += wgw - 2.0 * wc;
    }
    return s->n ? f / ((double)s->n * s->d_out) : 0.0;
}

/* Per concept: Y = X_c (W - W_c)^T by the threaded double GEMM (each element a sum over the inputs
 * in order), f += sum Y^2 row by row: the sums of the row-by-row loop, in its order. */
double ms_fuse_objective_rows(const MsFuseRows *r, const float *W0, const MsFuseDelta *d, int d_out, const float *W) {
    const int di = r->d_in;
    const size_t m = (size_t)d_out * di;
    size_t cmax = 0, start = 0;
    for (int c = 0; c < r->n_concepts; c++) { if (r->end[c] - start > cmax) cmax = r->end[c] - start; start = r->end[c]; }
    if (cmax > (size_t)INT_MAX || cmax > SIZE_MAX / sizeof(double) / ((size_t)di + d_out)) return NAN;
    double *DT = (double *)malloc((m + cmax * ((size_t)di + d_out) + 1) * sizeof(double));
    float *Wc = (float *)malloc(m * sizeof(float));
    double f = 0.0;
    if (!DT || !Wc) { free(DT); free(Wc); return NAN; }
    double *Xd = DT + m, *Y = Xd + cmax * di;
    start = 0;
    for (int c = 0; c < r->n_concepts; c++) {
        const size_t nr = r->end[c] - start;
        ms_fuse_merged_weight(Wc, W0, d ? &d[c] : NULL, d_out, di);
        for (int o = 0; o < d_out; o++)                     /* x (W - W_i)^T = x W^T - v */
            for (int i = 0; i < di; i++) DT[(size_t)i * d_out + o] = (double)W[(size_t)o * di + i] - (double)Wc[(size_t)o * di + i];
        for (size_t q = 0; q < nr * di; q++) Xd[q] = r->X[start * di + q];
        memset(Y, 0, nr * d_out * sizeof(double));
        ms_gemm_f64_acc(Y, Xd, DT, (int)nr, d_out, di);
        for (size_t q = 0; q < nr * d_out; q++) f += Y[q] * Y[q];
        start = r->end[c];
    }
    free(DT); free(Wc);
    return r->n ? f / ((double)r->n * d_out) : 0.0;
}

/* ---- symmetric eigen-decomposition: Householder tridiagonalisation + implicit QL ----
 * The fast solver (Golub & Van Loan, Matrix Computations, 4th ed., Alg. 8.3.1 and Sec. 8.3.5;
 * the EISPACK pair tred2/tql2 of Smith et al. 1976, after Bowdler, Martin, Reinsch and
 * Wilkinson, Numer. Math. 11 (1968) 293-306). O(n^3) in three phases, all in double:
 *
 * 1. Tridiagonalisation A = Q T Q^T. Step k (k = 0 .. n-3) takes the part x = A[k][k+1..] of
 *    row k (the current, already transformed matrix) and the reflector H_k = I - beta v v^T on
 *    indices k+1.. that maps x to alpha e_1:
 *        sigma = ||x||, alpha = -sign(x_0) sigma, v = x - alpha e_1, beta = 2 / v^T v
 *              = 1 / (sigma (sigma + |x_0|))   (x_0 - alpha adds two numbers of one sign: no
 *    cancellation). T gets d_k = A[k][k], e_k = alpha. The trailing block A' = A[k+1.., k+1..]
 *    becomes H A' H = A' - v w^T - w v^T with p = beta A' v, w = p - (beta p^T v / 2) v (the
 *    symmetric rank-2 form; G&VL 8.3.1). The rank-2 update of rows >= k+2 and the product
 *    A'' v_{k+1} the next step needs are one pass over the matrix (ms_tridiag_update_f64):
 *    row k+1 is updated first, v_{k+1} built from it, then every further row is updated and
 *    dotted with v_{k+1} while it is in cache. v_k is kept in row k (no longer needed there).
 * 2. Q^T = H_{n-3} ... H_1 H_0, accumulated backwards (k = n-3 .. 0: Q^T <- Q^T H_k, which
 *    touches only rows and columns >= k+1): row i -= beta (row i . v) v (ms_house_rows_f64).
 * 3. Implicit QL on T with shifts (tql2): for each l the smallest m >= l with a negligible
 *    e_m (|e_m| <= eps * max_{j<=l} (|d_j| + |e_j|), i.e. eps ||T||) splits the problem; while
 *    e_l is not negligible, shift by the eigenvalue of the leading 2x2 [d_l e_l; e_l d_l+1]
 *    nearer to d_l (its origin kept in f), then sweep plane rotations from i = m-1 up to l that
 *    restore tridiagonal form after the shifted QL step (chasing the bulge; each rotation is
 *    (c, s) = (p, e_i) / hypot(p, e_i)). Convergence is cubic; about 2 sweeps per eigenvalue.
 *    The rotations depend only on d and e, so they are recorded (about 64 n of them, a few
 *    dozen sweeps) and then applied together to the eigenvector rows (Z^T <- G^T Z^T, starting
 *    at Z^T = Q^T) in one threaded pass over column chunks (ms_rot_rows_f64): each chunk of Z^T
 *    stays in cache for all the sweeps of a batch. The eigenvectors are the rows of Z^T.
 * Accuracy: backward stable, every eigenvalue to about eps ||A|| (as Jacobi; small eigenvalues
 * of a Gram matrix carry absolute, not relative, accuracy either way), Q orthonormal to
 * O(n eps). Cost: 4/3 n^3 (1) + 4/3 n^3 (2) + about 6 n^3 (3) flops; for n = 1280 about a
 * hundred times fewer operations than 8 Jacobi sweeps, and every heavy loop threaded over
 * independent rows or columns in a fixed order, so any thread count gives the same bits. */

#define EIG_ROT_BATCH 64

/* Reflector of x = row k of A beyond the diagonal; v stored in place, returns beta (0: none). */
static double eig_house(double *A, int n, int k, double *e) {
    double *x = A + (size_t)k * n + k + 1, scale = 0.0, tail = 0.0;
    const int m = n - k - 1;
    for (int j = 0; j < m; j++) scale = fmax(scale, fabs(x[j]));
    if (scale > 0.0) for (int j = 1; j < m; j++) tail += (x[j] / scale) * (x[j] / scale);
    if (tail == 0.0) { e[k] = x[0]; return 0.0; }
    const double x0 = x[0], sigma = scale * sqrt((x0 / scale) * (x0 / scale) + tail);
    const double alpha = x0 >= 0.0 ? -sigma : sigma;
    e[k] = alpha;
    x[0] = x0 - alpha;
    return 1.0 / (sigma * (sigma + fabs(x0)));
}

MsStatus ms_sym_eigen(double *A, int n, double *w, double *V) {
    if (n <= 0) return MS_OK;
    if (n == 1) { w[0] = A[0]; V[0] = 1.0; return MS_OK; }
    const size_t nn = (size_t)n * n;
    /* rotations are kept for up to ROT_BATCH sweeps' worth of n and applied together */
    const size_t rcap = (size_t)n * EIG_ROT_BATCH;
    const int scap = 8 * EIG_ROT_BATCH;
    double *buf = (double *)malloc((nn + 4 * (size_t)n + 2 * rcap) * sizeof(double));
    int *sw = (int *)malloc(2 * (size_t)scap * sizeof(int));
    size_t *soff = (size_t *)malloc((size_t)scap * sizeof(size_t));
    if (!buf || !sw || !soff) { free(buf); free(sw); free(soff); return ms_errorf(MS_ERR_NOMEM, "eigen: %d x %d", n, n); }
    double *Z = buf, *e = Z + nn, *beta = e + n, *p = beta + n, *wv = p + n, *cs = wv + n, *sn = cs + rcap;
    int *slo = sw, *shi = sw + scap, nsw = 0;
    size_t nrot = 0;
    double *d = w;
#define A_(i, j) A[(size_t)(i) * n + (j)]
    /* 1. tridiagonalisation */
    for (int k = 0; k < n; k++) beta[k] = 0.0;
    if (n > 2) {
        beta[0] = eig_house(A, n, 0, e);
        if (beta[0] != 0.0) ms_tridiag_update_f64(A, n, 1, NULL, NULL, A, p);  /* p = A' v_0 */
    }
    for (int k = 0; k <= n - 3; k++) {
        const double *v = A + (size_t)k * n;          /* v_k, absolute indices k+1 .. n-1 */
        const double b = beta[k];
        d[k] = A_(k, k);
        if (b != 0.0) {
            double pv = 0.0;
            for (int i = k + 1; i < n; i++) { wv[i] = b * p[i]; pv += wv[i] * v[i]; }
            const double K = 0.5 * b * pv;
            for (int i = k + 1; i < n; i++) wv[i] -= K * v[i];
            double *r = A + (size_t)(k + 1) * n;      /* row k+1 first: v_{k+1} comes from it */
            for (int j = k + 1; j < n; j++) r[j] -= v[k + 1] * wv[j] + wv[k + 1] * v[j];
        }
        const double *u = NULL;
        if (k + 1 <= n - 3) {
            beta[k + 1] = eig_house(A, n, k + 1, e);
            if (beta[k + 1] != 0.0) u = A + (size_t)(k + 1) * n;
        }
        if (b != 0.0 || u) ms_tridiag_update_f64(A, n, k + 2, b != 0.0 ? v : NULL, wv, u, p);
    }
    d[n - 2] = A_(n - 2, n - 2);
    e[n - 2] = A_(n - 2, n - 1);
    d[n - 1] = A_(n - 1, n - 1);
    e[n - 1] = 0.0;
    /* 2. Z^T = Q^T */
    memset(Z, 0, nn * sizeof(double));
    for (int i = 0; i < n; i++) Z[(size_t)i * n + i] = 1.0;
    ms_house_accumulate_f64(Z, n, A, beta);
#undef A_
    /* 3. implicit QL */
    const double eps = DBL_EPSILON;
    double f = 0.0, tst1 = 0.0;
    for (int l = 0; l < n; l++) {
        tst1 = fmax(tst1, fabs(d[l]) + fabs(e[l]));
        int m = l;
        while (m < n - 1 && fabs(e[m]) > eps * tst1) m++;
        for (int it = 0; m > l && fabs(e[l]) > eps * tst1; it++) {
            if (it == 60) {
                free(buf); free(sw); free(soff);
                return ms_errorf(MS_ERR_FORMAT, "eigen: QL did not converge at eigenvalue %d of %d", l, n);
            }
            if (nsw == scap || nrot + (size_t)(m - l) > rcap) {      /* apply the batch */
                ms_rot_rows_f64(Z, n, n, slo, shi, soff, nsw, cs, sn);
                nsw = 0; nrot = 0;
            }
            /* shift: the eigenvalue of [d_l e_l; e_l d_l+1] nearer d_l; d[l+1..] relative to it */
            double g = d[l], q = (d[l + 1] - g) / (2.0 * e[l]), r = hypot(q, 1.0);
            if (q < 0.0) r = -r;
            d[l] = e[l] / (q + r);
            d[l + 1] = e[l] * (q + r);
            const double dl1 = d[l + 1], el1 = e[l + 1];
            double h = g - d[l];
            for (int i = l + 2; i < n; i++) d[i] -= h;
            f += h;
            /* the QL sweep from the bottom of the unreduced block up to l */
            double pp = d[m], c = 1.0, c2 = 1.0, c3 = 1.0, s = 0.0, s2 = 0.0;
            for (int i = m - 1; i >= l; i--) {
                c3 = c2; c2 = c; s2 = s;
                g = c * e[i];
                h = c * pp;
                r = hypot(pp, e[i]);
                e[i + 1] = s * r;
                s = e[i] / r;
                c = pp / r;
                pp = c * d[i] - s * g;
                d[i + 1] = h + s * (c * g + s * d[i]);
                cs[nrot + (size_t)(i - l)] = c; sn[nrot + (size_t)(i - l)] = s;
            }
            slo[nsw] = l; shi[nsw] = m; soff[nsw] = nrot;
            nsw++; nrot += (size_t)(m - l);
            pp = -s * s2 * c3 * el1 * e[l] / dl1;
            e[l] = s * pp;
            d[l] = c * pp;
        }
        d[l] += f;
        e[l] = 0.0;
    }
    if (nsw) ms_rot_rows_f64(Z, n, n, slo, shi, soff, nsw, cs, sn);
    /* ascending, then V = Z (eigenvector k in column k) */
    for (int i = 0; i < n - 1; i++) {     /* (selection: n swaps of rows) */
        int k = i;
        for (int j = i + 1; j < n; j++) if (d[j] < d[k]) k = j;
        if (k != i) {
            double t = d[i]; d[i] = d[k]; d[k] = t;
            double *zi = Z + (size_t)i * n, *zk = Z + (size_t)k * n;
            for (int j = 0; j < n; j++) { t = zi[j]; zi[j] = zk[j]; zk[j] = t; }
        }
    }
    for (int i = 0; i < n; i++)
        for (int j = 0; j < n; j++) V[(size_t)j * n + i] = Z[(size_t)i * n + j];
    free(buf); free(sw); free(soff);
    return MS_OK;
}

/* ---- symmetric eigen-decomposition, the accurate twin: cyclic Jacobi (Rutishauser's
 * thresholds) ----
 * Each rotation in the (p,q) plane zeroes A[p][q]:
 *   theta = (a_qq - a_pp) / (2 a_pq),  t = sgn(theta) / (|theta| + sqrt(theta^2 + 1)),
 *   c = 1/sqrt(t^2+1), s = t c:  a_pp -= t a_pq, a_qq += t a_pq, other rows/columns rotate.
 * The sum of squares off the diagonal falls quadratically once small; 6-10 sweeps in double.
 * Jacobi is accurate to eps * ||A|| in every eigenvalue, small ones included; O(n^3) per sweep
 * and not threaded: tests compare ms_sym_eigen with it. */
MsStatus ms_sym_eigen_ref(double *A, int n, double *w, double *V) {
    double *b = (double *)malloc(2 * (size_t)n * sizeof(double)), *z;
    if (!b) return ms_errorf(MS_ERR_NOMEM, "eigen: %d x %d", n, n);
    z = b + n;
#define A_(i, j) A[(size_t)(i) * n + (j)]
#define V_(i, j) V[(size_t)(i) * n + (j)]
    for (int i = 0; i < n; i++) {
        for (int j = 0; j < n; j++) V_(i, j) = i == j;
        b[i] = w[i] = A_(i, i);
        z[i] = 0.0;
    }
    int sweep;
    for (sweep = 1; sweep <= 100; sweep++) {
        double sm = 0.0;
        for (int p = 0; p < n; p++) for (int q = p + 1; q < n; q++) sm += fabs(A_(p, q));
        if (sm == 0.0) break;
        double tresh = sweep < 4 ? 0.2 * sm / ((double)n * n) : 0.0;
        for (int p = 0; p < n; p++) for (int q = p + 1; q < n; q++) {
            double apq = A_(p, q), g = 100.0 * fabs(apq);
            if (sweep > 4 && fabs(w[p]) + g == fabs(w[p]) && fabs(w[q]) + g == fabs(w[q])) { A_(p, q) = 0.0; continue; }
            if (fabs(apq) <= tresh) continue;
            double h = w[q] - w[p], t;
            if (fabs(h) + g == fabs(h)) t = apq / h;
            else {
                double theta = 0.5 * h / apq;
                t = 1.0 / (fabs(theta) + sqrt(1.0 + theta * theta));
                if (theta < 0.0) t = -t;
            }
            double c = 1.0 / sqrt(1.0 + t * t), s = t * c, tau = s / (1.0 + c);
            h = t * apq;
            z[p] -= h; z[q] += h; w[p] -= h; w[q] += h;
            A_(p, q) = 0.0;
#define ROT(M, i, j, k, l) do { double g_ = M(i, j), h_ = M(k, l); \
            M(i, j) = g_ - s * (h_ + g_ * tau); M(k, l) = h_ + s * (g_ - h_ * tau); } while (0)
            for (int j = 0; j < p; j++) ROT(A_, j, p, j, q);
            for (int j = p + 1; j < q; j++) ROT(A_, p, j, j, q);
            for (int j = q + 1; j < n; j++) ROT(A_, p, j, q, j);
            for (int j = 0; j < n; j++) ROT(V_, j, p, j, q);
#undef ROT
        }
        for (int p = 0; p < n; p++) { b[p] += z[p]; w[p] = b[p]; z[p] = 0.0; }
    }
    /* sort ascending (selection sort: n swaps of columns) */
    for (int i = 0; i < n - 1; i++) {
        int k = i;
        for (int j = i + 1; j < n; j++) if (w[j] < w[k]) k = j;
        if (k != i) {
            double t = w[i]; w[i] = w[k]; w[k] = t;
            for (int r = 0; r < n; r++) { t = V_(r, i); V_(r, i) = V_(r, k); V_(r, k) = t; }
        }
    }
#undef A_
#undef V_
    free(b);
    if (sweep > 100) return ms_errorf(MS_ERR_FORMAT, "eigen: Jacobi did not converge in 100 sweeps (n %d)", n);
    return MS_OK;
}

/* ---- solvers ---- */
MsStatus ms_sym_eig_init(MsSymEig *e, const double *G, int n) {
    const size_t nn = (size_t)n * n;
    memset(e, 0, sizeof *e);
    double *A = (double *)malloc(nn * sizeof(double));
    e->l = (double *)malloc((size_t)(n > 0 ? n : 1) * sizeof(double));
    e->V = (double *)malloc(nn * sizeof(double) + 1);
    e->Vt = (double *)malloc(nn * sizeof(double) + 1);
    if (!A || !e->l || !e->V || !e->Vt) { free(A); ms_sym_eig_free(e); return ms_errorf(MS_ERR_NOMEM, "eigen: %d x %d", n, n); }
    e->n = n;
    memcpy(A, G, nn * sizeof(double));
    MsStatus st = ms_sym_eigen(A, n, e->l, e->V);
    free(A);
    if (st) { ms_sym_eig_free(e); return st; }
    for (int i = 0; i < n; i++)
        for (int j = 0; j < n; j++) e->Vt[(size_t)j * n + i] = e->V[(size_t)i * n + j];
    return MS_OK;
}

void ms_sym_eig_free(MsSymEig *e) {
    free(e->l); free(e->V); free(e->Vt);
    memset(e, 0, sizeof *e);
}

/* The trust region of the gram solve. Its change along kept eigen-direction k is P_k / (l_k + lam)
 * with P = R V (d_out, kk columns), so ||W - W0||_F^2 = sum_k |P_k|^2 / (l_k + lam)^2, which falls
 * as lam grows. lam = 0 when that is <= cap^2 (cap <= 0: no region); else the lam >= 0 at which it
 * equals cap^2, by bisection in double: the minimiser of f over the ball ||W - W0|| <= cap (the
 * KKT point of f + lam ||W - W0||^2, a ridge). Why a region: when two concepts' inputs are nearly
 * the same rows but their targets differ, the exact minimiser tells them apart through the tiny
 * difference of their inputs: along that direction l_k ~ eps^2 while |P_k| ~ eps, and the change
 * |P_k| / l_k ~ 1/eps is as large as the inputs are alike, for a real part of the decrease (so the
 * determination cut above keeps it). Every other input with a component there is then sent far
 * away: a world model whose concepts' token rows had frozen at nearly equal values fused into
 * weights 852x their size and drew noise (issue 15's note). `mixshow fuse --max-change X` bounds
 * the change by max(X sqrt(sum_i ||dW_i||^2), ||weight fusion's change||): weight fusion lies
 * inside, so the result never fits the features worse than weight fusion does. Not the default:
 * large changes are normal (the world demo's exact solution moves its layers by a median 0.69 of
 * ||W0||, some by 47x, up to 2000x sqrt(sum ||dW_i||^2), and keeps identities: 0.092 after fusion
 * against 0.093 before); X = 2 acted on 67 of 72 layers without a measured gain (0.045, paired
 * difference -0.047 +- 0.043 over 24 images; README). */
static double fuse_trust_ridge(const double *P, const double *l, int dout, int kk, double cap) {
    if (!(cap > 0.0) || kk <= 0) return 0.0;
    double *a = (double *)calloc((size_t)kk, sizeof(double)), sum = 0.0;
    if (!a) return 0.0;
    for (int o = 0; o < dout; o++)
        for (int k = 0; k < kk; k++) a[k] += P[(size_t)o * kk + k] * P[(size_t)o * kk + k];
    for (int k = 0; k < kk; k++) sum += a[k];
    double lo = 0.0, hi = sqrt(sum) / cap, lam = 0.0;   /* at hi: sum a_k / (l_k + hi)^2 <= sum / hi^2 = cap^2 */
    const double c2 = cap * cap;
    double n0 = 0.0;
    for (int k = 0; k < kk; k++) n0 += a[k] / (l[k] * l[k]);
    if (n0 > c2) {
        for (int it = 0; it < 200 && hi - lo > 1e-15 * hi; it++) {
            const double mid = 0.5 * (lo + hi);
            double n2 = 0.0;
            for (int k = 0; k < kk; k++) n2 += a[k] / ((l[k] + mid) * (l[k] + mid));
            if (n2 > c2) lo = mid; else hi = mid;
        }
        lam = hi;                       /* the side inside the region */
    }
    free(a);
    return lam;
}

/* W = W0 + R G+ with R = C - W0 G (d_out, d_in); G = V diag(l) V^T, G+ = V_k diag(1/l_k) V_k^T
 * over the kept eigen-directions k (l ascends: the kept ones are the last columns of V).
 *
 * Which directions to keep. Along eigenvector v_k the change is dW v_k = R v_k / l_k and it lowers
 * n d_out f by gain_k = |R v_k|^2 / l_k. Two limits:
 *  - noise (rcond, MS_FUSE_RCOND = 1e-12): G is summed in double from float rows (relative
 *    errors ~ n_rows 2^-53) and the eigen-solver adds eps ||G||: eigenvalues below 1e-12 max are
 *    not eigenvalues of the data at all. The plain cut (rcond > 0) keeps everything above it:
 *    the exact minimiser nearest to W0.
 *  - determination (MS_FUSE_RCOND_AUTO, the default of `mixshow fuse`): the features are float32
 *    computations; two implementations (ours, the official) record them equal only to ~1e-6
 *    (measured: tests/test_fuse_official.c). A relative perturbation d of the features moves
 *    dW v_k by ~ d sqrt(l_max / l_k) of the solution's scale, so directions with
 *    l_k < 1e-6 l_max (MS_FUSE_RCOND_DETERMINED) are fixed by the data to no better than 0.1%:
 *    inverting them sends W hundreds of times further from W0 than the official L-BFGS goes
 *    (measured on tiny-sd: up to 700x its change) along directions the features do not pin down,
 *    for a negligible part of the objective. AUTO drops such directions, smallest l first, as long
 *    as their summed gain stays below MS_FUSE_GAIN_KEEP = 1e-3 of the total: the result is within
 *    0.1% of the possible decrease (the official stops 0.2-2% short), with every kept direction
 *    determined by the data.
 * Three threaded double GEMMs (tensor.c): T = W0 G, P = R V_k (d_out x kept), U = P' V_k^T
 * with P' = P diag(1/l_k); under-determined problems (kept << d_in) cost little. */
MsStatus ms_fuse_solve_gram_eig(const MsSymEig *e, const MsFuseStats *s, const float *W0, float *W, double rcond,
                                double cap, int *rank, double *ridge) {
    const int di = s->d_in, dout = s->d_out;
    const size_t md = (size_t)dout * di;
    const int automatic = rcond < 0.0;
    if (e->n != di) return ms_errorf(MS_ERR_SHAPE, "fuse: gram solve with a %d x %d decomposition for %d inputs", e->n, e->n, di);
    if (rcond <= 0.0) rcond = MS_FUSE_RCOND;
    const double lmax = di > 0 ? e->l[di - 1] : 0.0, cut = rcond * lmax;
    int kept = 0;
    while (lmax > 0.0 && kept < di && e->l[di - 1 - kept] > cut) kept++;
    int k0 = di - kept;
    double *R = (double *)malloc((2 * md + (size_t)di * kept + 1) * sizeof(double));
    if (!R) return ms_errorf(MS_ERR_NOMEM, "fuse: gram solve of a %dx%d layer", dout, di);
    double *T = R + md, *Vk = T + md;
    /* R = C - W0 G */
    memcpy(R, s->C, md * sizeof(double));
    if (W0) {
        for (size_t q = 0; q < md; q++) T[q] = W0[q];
        double *Tg = (double *)calloc(md, sizeof(double));
        if (!Tg) { free(R); return ms_errorf(MS_ERR_NOMEM, "fuse: gram solve of a %dx%d layer", dout, di); }
        ms_gemm_f64_acc(Tg, T, s->G, dout, di, di);
        for (size_t q = 0; q < md; q++) R[q] -= Tg[q];
        free(Tg);
    }
    /* P = R V_k diag(1/l_k) (d_out, kept) into T */
    for (int i = 0; i < di; i++) memcpy(Vk + (size_t)i * kept, e->V + (size_t)i * di + k0, (size_t)kept * sizeof(double));
    memset(T, 0, (size_t)dout * kept * sizeof(double));
    ms_gemm_f64_acc(T, R, Vk, dout, kept, di);
    int drop = 0;
    if (automatic && kept > 0) {     /* gain_k = |R v_k|^2 / l_k; drop the undetermined, smallest first */
        double total = 0.0, lost = 0.0;
        double *gain = (double *)malloc((size_t)kept * sizeof(double));
        if (!gain) { free(R); return ms_errorf(MS_ERR_NOMEM, "fuse: gram solve of a %dx%d layer", dout, di); }
        for (int k = 0; k < kept; k++) {
            double a = 0.0;
            for (int o = 0; o < dout; o++) a += T[(size_t)o * kept + k] * T[(size_t)o * kept + k];
            gain[k] = a / e->l[k0 + k];
            total += gain[k];
        }
        while (drop < kept - 1 && e->l[k0 + drop] < MS_FUSE_RCOND_DETERMINED * lmax &&
               lost + gain[drop] <= MS_FUSE_GAIN_KEEP * total)
            lost += gain[drop++];
        free(gain);
    }
    const int kk = kept - drop, kd = k0 + drop;
    for (int o = 0; o < dout; o++)      /* compact the kept columns: T (d_out, kk) = R V_kk */
        for (int k = 0; k < kk; k++) T[(size_t)o * kk + k] = T[(size_t)o * kept + drop + k];
    const double lam = fuse_trust_ridge(T, e->l + kd, dout, kk, cap);
    for (int o = 0; o < dout; o++)
        for (int k = 0; k < kk; k++) T[(size_t)o * kk + k] /= e->l[kd + k] + lam;
    /* U = P V_k^T (d_out, d_in) into R; W = W0 + U */
    memset(R, 0, md * sizeof(double));
    ms_gemm_f64_acc(R, T, e->Vt + (size_t)kd * di, dout, di, kk);
    for (size_t q = 0; q < md; q++) W[q] = (float)((W0 ? (double)W0[q] : 0.0) + R[q]);
    if (rank) *rank = kk;
    if (ridge) *ridge = lam;
    free(R);
    return MS_OK;
}

MsStatus ms_fuse_solve_gram(const MsFuseStats *s, const float *W0, float *W, double rcond, int *rank) {
    MsSymEig e;
    MsStatus st = ms_sym_eig_init(&e, s->G, s->d_in);
    if (!st) st = ms_fuse_solve_gram_eig(&e, s, W0, W, rcond, 0.0, rank, NULL);
    ms_sym_eig_free(&e);
    return st;
}

/* The official closure on the statistics: f(W) as above and its gradient 2 (W G - C) / (n d_out).
 * T = W G by the threaded double GEMM (tensor.c; each element sums over the inputs in order, so
 * the bits do not depend on the thread count); Wd, T: (d_out, d_in) doubles allocated once. */
typedef struct { const MsFuseStats *s; double *Wd, *T; } FuseClosure;
static double fuse_closure(void *ctx, const float *W, float *grad) {
    const FuseClosure *fc = (const FuseClosure *)ctx;
    const MsFuseStats *s = fc->s;
    const int di = s->d_in;
    const size_t m = (size_t)s->d_out * di;
    const double scale = s->n ? 1.0 / ((double)s->n * s->d_out) : 0.0;
    double f = s->vv;
    for (size_t q = 0; q < m; q++) { fc->Wd[q] = W[q]; fc->T[q] = 0.0; }
    ms_gemm_f64_acc(fc->T, fc->Wd, s->G, s->d_out, di, di);
    for (int o = 0; o < s->d_out; o++) {
        const double *w = fc->Wd + (size_t)o * di, *t = fc->T + (size_t)o * di, *c = s->C + (size_t)o * di;
        double wgw = 0.0, wc = 0.0;
        for (int j = 0; j < di; j++) {
            wgw += w[j] * t[j];
            wc += w[j] * c[j];
            grad[(size_t)o * di + j] = (float)(2.0 * (t[j] - c[j]) * scale);
        }
        f += wgw - 2.0 * wc;
    }
    return f * scale;
}

MsStatus ms_fuse_solve_lbfgs(const MsFuseStats *s, const float *W0, float *W, int iters, double *trace,
                             int trace_cap, MsLbfgsResult *res) {
    const size_t m = (size_t)s->d_out * s->d_in;
    MsLbfgsOptions o;
    ms_lbfgs_defaults(&o);
    o.max_iter = iters;
    o.max_eval = iters * 5 / 4;
    o.history_size = 25;
    o.tolerance_grad = 1e-16;      /* gradient_fusion.py update_quasi_newton */
    o.tolerance_change = 1e-16;
    o.strong_wolfe = 1;
    float *x = (float *)malloc(m * sizeof(float));
    FuseClosure fc = { s, (double *)malloc(2 * m * sizeof(double) + 1), NULL };
    if (!x || !fc.Wd) { free(x); free(fc.Wd); return ms_errorf(MS_ERR_NOMEM, "fuse: lbfgs on a %dx%d layer", s->d_out, s->d_in); }
    fc.T = fc.Wd + m;
    memcpy(x, W0, m * sizeof(float));
    MsStatus st = ms_lbfgs(x, m, fuse_closure, &fc, &o, W, trace, trace_cap, res);
    free(x); free(fc.Wd);
    return st;
}

MsStatus ms_fuse_weight(float *W, const float *W0, const MsFuseDelta *d, int n_concepts, int d_out, int d_in) {
    const size_t m = (size_t)d_out * d_in;
    float *t = (float *)malloc(m * sizeof(float));
    memcpy(W, W0, m * sizeof(float));
    if (!t) return ms_errorf(MS_ERR_NOMEM, "fuse: out of memory");
    for (int c = 0; c < n_concepts; c++) {
        if (!d[c].down || d[c].rank <= 0) continue;
        ms_gemm_ref(0, 0, d_out, d_in, d[c].rank, 1.0f, d[c].up, d[c].rank, d[c].down, d_in, 0.0f, t, d_in);
        for (size_t k = 0; k < m; k++) W[k] += d[c].alpha * t[k];
    }
    free(t);
    return MS_OK;
}

/* The trust region's radius for one layer (fuse_trust_ridge): max(k sqrt(sum_i ||alpha_i up_i down_i||^2),
 * ||Ww - W0||) with k = max_change (<= 0: no region, 0 returned); *rho the concepts' joint norm (the
 * products formed as merge_lora_into_weight forms them, the squares summed in double), *wchange
 * ||Ww - W0|| (either NULL ok). */
static MsStatus fuse_trust_cap(const MsFuseDelta *d, int n, const float *W0, const float *Ww, int dout, int di,
                               double max_change, double *cap, double *rho, double *wchange) {
    const size_t m = (size_t)dout * di;
    double r2 = 0.0, w2 = 0.0;
    float *t = (float *)malloc(m * sizeof(float));
    if (!t) return ms_errorf(MS_ERR_NOMEM, "fuse: out of memory");
    for (int c = 0; c < n; c++) {
        if (!d[c].down || d[c].rank <= 0) continue;
        ms_gemm_ref(0, 0, dout, di, d[c].rank, 1.0f, d[c].up, d[c].rank, d[c].down, di, 0.0f, t, di);
        for (size_t k = 0; k < m; k++) r2 += ((double)d[c].alpha * t[k]) * ((double)d[c].alpha * t[k]);
    }
    for (size_t k = 0; k < m; k++) w2 += ((double)Ww[k] - W0[k]) * ((double)Ww[k] - W0[k]);
    free(t);
    if (rho) *rho = sqrt(r2);
    if (wchange) *wchange = sqrt(w2);
    *cap = max_change > 0.0 ? fmax(max_change * sqrt(r2), sqrt(w2)) : 0.0;
    return MS_OK;
}

/* ||W - W0||_F in double */
static double fuse_change_norm(const float *W, const float *W0, size_t m) {
    double a = 0.0;
    for (size_t k = 0; k < m; k++) a += ((double)W[k] - W0[k]) * ((double)W[k] - W0[k]);
    return sqrt(a);
}

/* ==========================================================================================
 * The per-layer loop over a model: record, solve, write back (text encoder, cross-attention K/V)
 * ======================================================================================== */

#define FUSE_TEMPLATE "photo of a "          /* TEMPLATE_SIMPLE = 'photo of a {}' */
#define FUSE_EOS 49407                       /* get_text_feature: positions where id >= 49407 */

/* str.replace(word, token) for every bound word in order (bind_concept_prompt, variant i). */
static char *fuse_bind(const char *prompt, const MsFuseTokens *t, int i) {
    size_t cap = strlen(prompt) * 4 + 256;
    char *a = (char *)malloc(cap), *b = (char *)malloc(cap);
    if (!a || !b) { free(a); free(b); return NULL; }
    snprintf(a, cap, "%s", prompt);
    for (int w = 0; w < t->n_bind; w++) {
        const char *word = t->bind_word[w], *tok = t->bind_token[(size_t)w * t->n_layers + i];
        size_t lw = strlen(word), lt = strlen(tok), o = 0;
        if (!lw) continue;
        for (const char *p = a; *p;) {
            if (!strncmp(p, word, lw)) {
                if (o + lt + 1 >= cap) break;
                memcpy(b + o, tok, lt); o += lt; p += lw;
            } else {
                if (o + 2 >= cap) break;
                b[o++] = *p++;
            }
        }
        b[o] = '\0';
        char *sw = a; a = b; b = sw;
    }
    free(b);
    return a;
}

/* tokenizer(text, truncation=True, max_length=77, padding='do_not_pad').input_ids */
static MsStatus fuse_tokens(const ClipTokenizer *tok, const char *text, int32_t *ids, int *T, int max_len) {
    size_t n = 0;
    MsStatus s = clip_tokenize_raw(tok, text, strlen(text), ids + 1, (size_t)max_len - 2, &n);
    if (s) return s;
    if (n > (size_t)max_len - 2) n = (size_t)max_len - 2;
    ids[0] = tok->bos_id;
    ids[n + 1] = tok->eos_id;
    *T = (int)n + 2;
    return MS_OK;
}

static MsStatus report_add(MsFuseReport *rep, const char *layer, const char *stage, size_t rows, double f0,
                           double fw, double ff, int rank, const double *trace, int n_trace, double sec,
                           double change, double rho, double wchange, double ridge) {
    if (!rep) return MS_OK;
    if (rep->n == rep->cap) {
        int cap = rep->cap ? 2 * rep->cap : 64;
        MsFuseLayerReport *l = (MsFuseLayerReport *)realloc(rep->l, (size_t)cap * sizeof *l);
        if (!l) return ms_errorf(MS_ERR_NOMEM, "fuse: report");
        rep->l = l; rep->cap = cap;
    }
    MsFuseLayerReport *e = &rep->l[rep->n];
    memset(e, 0, sizeof *e);
    snprintf(e->layer, sizeof e->layer, "%s", layer);
    snprintf(e->stage, sizeof e->stage, "%s", stage);
    e->rows = rows; e->f_w0 = f0; e->f_weight = fw; e->f_fused = ff; e->rank = rank; e->seconds = sec;
    e->change = change; e->concepts_change = rho; e->weight_change = wchange; e->ridge = ridge;
    if (n_trace > 0 && trace) {
        e->trace = (double *)malloc((size_t)n_trace * sizeof(double));
        if (!e->trace) return ms_errorf(MS_ERR_NOMEM, "fuse: report");
        memcpy(e->trace, trace, (size_t)n_trace * sizeof(double));
        e->n_trace = n_trace;
    }
    rep->n++;
    return MS_OK;
}

void ms_fuse_report_free(MsFuseReport *rep) {
    for (int i = 0; i < rep->n; i++) free(rep->l[i].trace);
    free(rep->l);
    memset(rep, 0, sizeof *rep);
}

/* gram: the decomposition of the last recorded input's G, kept for the next layer reading the
 * same rows (q, k, v share layer_norm1's output; to_k, to_v the same text features): G depends
 * on the rows only, so the next layer's G is the same matrix, bit for bit. */
typedef struct { const MsFuseRows *rows; MsSymEig e; } FuseEigCache;

/* One layer: W0 = *param (f32, d_out x d_in), rows of every concept, deltas; solve with the
 * chosen method, report f(W0), f(weight), f(fused) exactly from the rows, write W into param. */
static MsStatus fuse_layer(MsParam *param, const MsFuseRows *R, const MsFuseDelta *d, const MsFuseOptions *o,
                           int iters, const char *stage, MsFuseReport *rep, FuseEigCache *ec) {
    const int dout = (int)param->shape[0], di = R->d_in;
    const size_t m = (size_t)dout * di;
    double t0 = ms_time();
    if (!param->f32) return ms_errorf(MS_ERR_UNSUPPORTED, "fuse: %s holds no f32 data", param->name);
    if (param->ndim != 2 || param->shape[1] != di)
        return ms_errorf(MS_ERR_SHAPE, "fuse: %s is not a (%d, %d) matrix", param->name, dout, di);
    float *W0 = (float *)malloc(m * sizeof(float)), *Wc = (float *)malloc(m * sizeof(float));
    float *Ww = (float *)malloc(m * sizeof(float)), *W = (float *)malloc(m * sizeof(float));
    double *trace = NULL;
    int n_trace = 0, rank = 0;
    double cap = 0.0, rho = 0.0, ridge = 0.0, wch = 0.0;
    MsFuseStats S;
    MsStatus s = ms_fuse_stats_init(&S, di, dout);
    if (!s && (!W0 || !Wc || !Ww || !W)) s = ms_errorf(MS_ERR_NOMEM, "fuse: %s", param->name);
    if (!s) {
        memcpy(W0, param->f32, m * sizeof(float));
        size_t start = 0;
        for (int c = 0; c < R->n_concepts && !s; c++) {
            ms_fuse_merged_weight(Wc, W0, &d[c], dout, di);
            s = ms_fuse_stats_add(&S, R->X + start * di, R->end[c] - start, Wc);
            start = R->end[c];
        }
    }
    if (!s) s = ms_fuse_weight(Ww, W0, d, R->n_concepts, dout, di);
    if (!s) s = fuse_trust_cap(d, R->n_concepts, W0, Ww, dout, di, o->max_change, &cap, &rho, &wch);
    if (!s) {
        if (o->method == MS_FUSE_GRAM) {
            if (ec->rows != R || ec->e.n != di) {
                ms_sym_eig_free(&ec->e);
                ec->rows = NULL;
                s = ms_sym_eig_init(&ec->e, S.G, di);
                if (!s) ec->rows = R;
            }
            if (!s) s = ms_fuse_solve_gram_eig(&ec->e, &S, W0, W, o->rcond, cap, &rank, &ridge);
        }
        else if (o->method == MS_FUSE_WEIGHT) memcpy(W, Ww, m * sizeof(float));
        else {
            MsLbfgsResult res;
            int cap = iters * 5 / 4 + 64;
            trace = (double *)malloc((size_t)cap * sizeof(double));
            if (!trace) s = ms_errorf(MS_ERR_NOMEM, "fuse: trace");
            if (!s) s = ms_fuse_solve_lbfgs(&S, W0, W, iters, trace, cap, &res);
            n_trace = res.n_evals < cap ? res.n_evals : cap;
        }
    }
    if (!s) {
        double f0 = ms_fuse_objective_rows(R, W0, d, dout, W0);
        double fw = ms_fuse_objective_rows(R, W0, d, dout, Ww);
        double ff = ms_fuse_objective_rows(R, W0, d, dout, W);
        char key[MS_KEY_MAX];
        snprintf(key, sizeof key, "%s", param->name);
        memcpy(param->f32, W, m * sizeof(float));
        s = report_add(rep, key, stage, R->n, f0, fw, ff, rank, trace, n_trace, ms_time() - t0,
                       fuse_change_norm(W, W0, m), rho, wch, ridge);
        if (o->verbose)
            fprintf(stderr, "  [%s] %-60s rows %6zu  f(W0) %.4e  weight %.4e  %s %.4e\n", stage, key, R->n, f0, fw,
                    ms_fuse_method_name(o->method), ff);
    }
    free(W0); free(Wc); free(Ww); free(W); free(trace);
    ms_fuse_stats_free(&S);
    return s;
}

static MsParam *find_param(MsParamTable *t, const char *name) {
    int i = ms_param_find(t, name);
    return i < 0 ? NULL : &t->p[i];
}

MsStatus ms_fuse_text_kv(MsModel *m, const UNetParams *up, const ClipTokenizer *tok, const MsFuseTokens *tk,
                         const MsFuseConcept *cs, int n, const MsFuseOptions *o, MsFuseReport *rep) {
    const ClipTextConfig *tc = &m->text_config;
    const int L = tc->num_hidden_layers, D = tc->hidden_size, P = tc->max_position_embeddings;
    const int NL = ms_unet_cross_attn_layers(&m->unet_config);
    static const char *const proj[4] = { "q_proj", "k_proj", "v_proj", "out_proj" };
    MsFuseRows *rows = NULL;        /* text: [l*2 + 0] layer_norm1 out (q,k,v), [l*2 + 1] attention out; kv: [2L + i] */
    ClipTextParams tp;
    Arena ar = { 0 };
    int32_t *ids = NULL;
    int max_rank = 0, any_te = 0, any_kv = 0;
    MsStatus s = MS_OK;
    FuseEigCache ec;
    memset(&ec, 0, sizeof ec);
    if (tk->n_layers != NL) return ms_errorf(MS_ERR_ARG, "fuse: %d token variants per word, the UNet has %d cross-attention layers", tk->n_layers, NL);
    for (int c = 0; c < n; c++) {
        if (cs[c].te && cs[c].te->rank > max_rank) max_rank = cs[c].te->rank;
        for (int k = 0; cs[c].te_has && k < L * 4; k++) any_te |= cs[c].te_has[k];
        for (int i = 0; cs[c].unet_has && i < NL; i++) any_kv |= cs[c].unet_has[4 * (2 * i + 1) + 1] | cs[c].unet_has[4 * (2 * i + 1) + 2];
    }
    rows = (MsFuseRows *)calloc((size_t)(2 * L + NL), sizeof *rows);
    ids = (int32_t *)malloc((size_t)P * sizeof(int32_t));
    if (!rows || !ids) { s = ms_errorf(MS_ERR_NOMEM, "fuse: out of memory"); goto done; }
    for (int k = 0; k < 2 * L + NL && !s; k++) s = ms_fuse_rows_init(&rows[k], k < 2 * L ? D : D, n);
    if (!s) s = clip_text_params(&tp, &m->text, tc);
    if (!s) s = arena_init(&ar, clip_text_sizes(tc, 1, P, max_rank, 1));
    if (s) goto done;

    /* ---- step 4 (merge_text_encoder): record each concept's text-encoder layer inputs ---- */
    double t0 = ms_time();
    for (int c = 0; c < n && any_te && !s; c++) {
        char base[2][1024];
        snprintf(base[0], sizeof base[0], FUSE_TEMPLATE "%s", cs[c].name);
        snprintf(base[1], sizeof base[1], "%s", cs[c].name);
        for (int b = 0; b < 2 && !s; b++)
            for (int i = 0; i < NL && !s; i++) {
                char *p = fuse_bind(base[b], tk, i);
                int T = 0;
                ClipTextActs a;
                if (!p) { s = ms_errorf(MS_ERR_NOMEM, "fuse: prompt"); break; }
                s = fuse_tokens(tok, p, ids, &T, P);
                free(p);
                arena_reset(&ar, 0);
                if (!s) s = clip_text_acts_alloc(&a, &ar, tc, 1, T, max_rank, 1);
                if (!s) s = clip_text_forward(&a, &tp, cs[c].te, ids, tk->new_emb, tk->n_new, tc);
                for (int l = 0; l < L && !s; l++) {     /* the hooks: inputs of q/k/v (shared) and out_proj */
                    s = ms_fuse_rows_add(&rows[2 * l], c, a.l[l].ln1, (size_t)T);
                    if (!s) s = ms_fuse_rows_add(&rows[2 * l + 1], c, a.l[l].attn, (size_t)T);
                }
            }
    }
    /* ---- solve every text-encoder layer some concept's LoRA touches ---- */
    for (int l = 0; l < L && any_te && !s; l++)
        for (int j = 0; j < 4 && !s; j++) {
            int touched = 0;
            MsFuseDelta d[64];
            if (n > 64) { s = ms_errorf(MS_ERR_ARG, "fuse: at most 64 concepts"); break; }
            for (int c = 0; c < n; c++) {
                int has = cs[c].te_has && cs[c].te_has[l * 4 + j] && cs[c].te;
                touched |= has;
                d[c].alpha = has ? cs[c].te->alpha : 0.0f;
                d[c].rank = has ? cs[c].te->rank : 0;
                d[c].down = has ? cs[c].te->down[l][j] : NULL;
                d[c].up = has ? cs[c].te->up[l][j] : NULL;
            }
            if (!touched) continue;
            char key[MS_KEY_MAX];
            snprintf(key, sizeof key, "text_model.encoder.layers.%d.self_attn.%s.weight", l, proj[j]);
            MsParam *W = find_param(&m->text, key);
            if (!W) { s = ms_errorf(MS_ERR_ARG, "fuse: the text encoder has no %s", key); break; }
            s = fuse_layer(W, &rows[2 * l + (j == 3)], d, o, o->te_iters, "te", rep, &ec);
        }
    if (rep) rep->seconds[0] = ms_time() - t0;
    for (int k = 0; k < 2 * L; k++) ms_fuse_rows_free(&rows[k]);
    ms_sym_eig_free(&ec.e);
    ec.rows = NULL;
    if (!s && o->after_te) s = o->after_te(o->after_te_ctx, m);

    /* ---- step 5 (merge_kv_in_cross_attention): the FUSED text encoder's features at the concept
     * tokens and EOS of the prompts bound for layer i; targets from each concept's to_k/to_v ---- */
    t0 = ms_time();
    for (int c = 0; c < n && any_kv && !s; c++) {
        char base[2][1024];
        snprintf(base[0], sizeof base[0], FUSE_TEMPLATE "%s", cs[c].name);
        snprintf(base[1], sizeof base[1], "%s", cs[c].name);
        for (int i = 0; i < NL && !s; i++)
            for (int b = 0; b < 2 && !s; b++) {
                char *p = fuse_bind(base[b], tk, i);
                int T = 0;
                ClipTextActs a;
                if (!p) { s = ms_errorf(MS_ERR_NOMEM, "fuse: prompt"); break; }
                s = fuse_tokens(tok, p, ids, &T, P);
                free(p);
                arena_reset(&ar, 0);
                if (!s) s = clip_text_acts_alloc(&a, &ar, tc, 1, T, 0, 0);
                if (!s) s = clip_text_forward(&a, &tp, NULL, ids, tk->new_emb, tk->n_new, tc);
                for (int t = 0; t < T && !s; t++)
                    if (ids[t] >= FUSE_EOS) s = ms_fuse_rows_add(&rows[2 * L + i], c, a.out + (size_t)t * D, 1);
            }
    }
    for (int i = 0; i < NL && any_kv && !s; i++)
        for (int w = 1; w <= 2 && !s; w++) {          /* to_k, to_v of attention module 2i+1 (attn2) */
            const int am = 2 * i + 1;
            MsFuseDelta d[64];
            if (n > 64) { s = ms_errorf(MS_ERR_ARG, "fuse: at most 64 concepts"); break; }
            for (int c = 0; c < n; c++) {
                int has = cs[c].unet_has && cs[c].unet_has[4 * am + w] && cs[c].unet;
                const UNetLoraLinear *ll = has ? &cs[c].unet->lin[4 * am + w] : NULL;
                d[c].alpha = has ? cs[c].unet->alpha : 0.0f;
                d[c].rank = has ? cs[c].unet->rank : 0;
                d[c].down = ll ? ll->down : NULL;
                d[c].up = ll ? ll->up : NULL;
            }
            char name[MS_KEY_MAX], key[MS_KEY_MAX + 8];
            unet_lora_module_name(up, am, w, name, sizeof name);
            snprintf(key, sizeof key, "%s.weight", name);
            MsParam *W = find_param(&m->unet, key);
            if (!W) { s = ms_errorf(MS_ERR_ARG, "fuse: the UNet has no %s", key); break; }
            s = fuse_layer(W, &rows[2 * L + i], d, o, o->te_iters, "kv", rep, &ec);   /* official: textenc iters */
        }
    if (rep) rep->seconds[1] = ms_time() - t0;
done:
    ms_sym_eig_free(&ec.e);
    if (rows) for (int k = 0; k < 2 * L + NL; k++) ms_fuse_rows_free(&rows[k]);
    free(rows);
    free(ids);
    arena_free(&ar);
    return s;
}

/* ==========================================================================================
 * Step 6 (merge_spatial_attention): every other attention Linear of the UNet
 * ==========================================================================================
 * gradient_fusion.py samples each concept once: the prompt "photo of a {concept_name}" bound to
 * the 16 layer tokens, encoded (padded to 77) by the FUSED text encoder, a UNet whose attention
 * layers carry that concept's LoRA merged (attn2 to_k/to_v stay at their fused values: the
 * stage's base state dict is taken after step 5), 20 DPM-Solver++ steps at 512x512, batch 1, no
 * guidance, initial latents torch.randn((1, 4, 64, 64)) from the global generator. Forward hooks
 * keep every input row of the hooked Linears at every step (20 * h*w rows per layer and concept:
 * gigabytes at SD 1.5 sizes: the official memory problem).
 *
 * Here no row is kept. The recorder folds each call into G_c = X_c^T X_c of the current concept
 * (double, one per distinct input: attn1's q, k and v share norm1's output). When concept c is
 * done, every layer that reads that input takes, with D_c = W_c - W0 (the float32 merge minus W0,
 * exactly the change the official targets V_c = X_c W_c^T carry):
 *     B += D_c G_c,   e += <D_c G_c, D_c>,   G += G_c,   n += n_c.
 * The objective in terms of D = W - W0 needs nothing else and keeps no cancellation of W0's size:
 *     f(W) = (<D G, D> - 2 <D, B> + e) / (n d_out),
 * the gram minimiser nearest to W0 is W = W0 + B G+, and the absolute statistics for L-BFGS's
 * closure are C = W0 G + B, sum||V||^2 = <W0 G, W0> + 2 <W0, B> + e.
 *
 * The generator: the reference runs seed torch.manual_seed(S) after loading the pipeline; the
 * official order then draws, for every concept word w = 1, 2, .. (merge_new_concepts_), an
 * nn.Embedding(V0 + 16 w, D) whose init normal_ takes (V0 + 16 w) * D normals, then one
 * torch.randn((1, 4, 64, 64)) per concept in order. We skip the first and draw the second. */
#define FUSE_SP_STEPS 20

typedef struct {
    int C, need;
    size_t n_cur, n;
    double *Gc, *G;          /* (C,C): current concept (upper triangle while recording); sum */
} FuseSpInput;
typedef struct {
    int blk, am, w;          /* transformer block, attention module (2 blk + 0|1), Linear (0..3) */
    int input;               /* index into the inputs: 4 blk + which */
    MsParam *W;
    int d_out, d_in;
    double *B, e;            /* sum_c D_c G_c (d_out,d_in); sum_c <D_c G_c, D_c> */
} FuseSpLayer;

typedef struct { FuseSpInput *in; int n_in; double sec; } FuseSpRec;   /* sec: time in ms_gram_f64_acc */

static void fuse_sp_record(void *ctx, int block, int which, const float *x, size_t rows, int C) {
    FuseSpRec *r = (FuseSpRec *)ctx;
    int k = 4 * block + which;
    if (k < 0 || k >= r->n_in || !r->in[k].need || r->in[k].C != C) return;
    double t0 = ms_time();
    ms_gram_f64_acc(r->in[k].Gc, x, rows, C);          /* upper triangle (tensor.c) */
    r->sec += ms_time() - t0;
    r->in[k].n_cur += rows;
}

/* f(W) from the delta statistics (D = W - W0 in double): T = D G by the threaded double GEMM
 * (tensor.c), then the two inner products row by row in order. NAN when out of memory. */
static double fuse_sp_objective(const FuseSpLayer *L, const FuseSpInput *in, const float *W0, const float *W) {
    const int di = L->d_in;
    const size_t m = (size_t)L->d_out * di;
    double f = L->e, dgd = 0.0, db = 0.0;
    int zero = 1;
    for (size_t q = 0; q < m && zero; q++) zero = W[q] == W0[q];
    if (zero) return in->n ? f / ((double)in->n * L->d_out) : 0.0;
    double *D = (double *)malloc(2 * m * sizeof(double));
    if (!D) return NAN;
    double *T = D + m;
    for (size_t q = 0; q < m; q++) { D[q] = (double)W[q] - (double)W0[q]; T[q] = 0.0; }
    ms_gemm_f64_acc(T, D, in->G, L->d_out, di, di);
    for (size_t q = 0; q < m; q++) { dgd += T[q] * D[q]; db += D[q] * L->B[q]; }
    f += dgd - 2.0 * db;
    free(D);
    return in->n ? f / ((double)in->n * L->d_out) : 0.0;
}

/* Folds concept c's G_c into every layer reading input k (see above), then into G. */
static MsStatus fuse_sp_fold(FuseSpInput *in, FuseSpLayer *ls, int nl, int k, const MsFuseConcept *c) {
    const int d = in->C;
    for (int i = 0; i < d; i++)
        for (int j = 0; j < i; j++) in->Gc[(size_t)i * d + j] = in->Gc[(size_t)j * d + i];
    for (int l = 0; l < nl; l++) {
        FuseSpLayer *L = &ls[l];
        if (L->input != k) continue;
        int has = c->unet && c->unet_has && c->unet_has[4 * L->am + L->w];
        if (!has) continue;
        const size_t m = (size_t)L->d_out * d;
        const UNetLoraLinear *ll = &c->unet->lin[4 * L->am + L->w];
        MsFuseDelta dl = { c->unet->alpha, c->unet->rank, ll->down, ll->up };
        float *Wc = (float *)malloc(m * sizeof(float));
        double *D = (double *)malloc(2 * m * sizeof(double)), *T = D ? D + m : NULL;
        if (!Wc || !D) { free(Wc); free(D); return ms_errorf(MS_ERR_NOMEM, "fuse: spatial statistics"); }
        ms_fuse_merged_weight(Wc, L->W->f32, &dl, L->d_out, d);
        for (size_t q = 0; q < m; q++) { D[q] = (double)Wc[q] - (double)L->W->f32[q]; T[q] = 0.0; }
        ms_gemm_f64_acc(T, D, in->Gc, L->d_out, d, d);     /* T = D G_c (tensor.c) */
        double e = 0.0;                                /* in order, independent of threads */
        for (size_t q = 0; q < m; q++) { L->B[q] += T[q]; e += T[q] * D[q]; }
        L->e += e;
        free(Wc); free(D);
    }
    const size_t dd = (size_t)d * d;
    for (size_t q = 0; q < dd; q++) { in->G[q] += in->Gc[q]; in->Gc[q] = 0.0; }
    in->n += in->n_cur;
    in->n_cur = 0;
    return MS_OK;
}

static void fuse_eta(const char *stage, int done, int total, double t0, const char *what) {
    double el = ms_time() - t0, eta = done > 0 ? el / done * (total - done) : 0.0;
    fprintf(stderr, "\r  [%s] %d/%d %-48.48s %6.1f s elapsed, ETA %6.1f s ", stage, done, total, what, el, eta);
    if (done == total) fputc('\n', stderr);
    fflush(stderr);
}

MsStatus ms_fuse_spatial(MsModel *m, const UNetParams *up, const ClipTokenizer *tok, const MsFuseTokens *tk,
                         const MsFuseConcept *cs, int n, const MsFuseOptions *o, MsFuseReport *rep) {
    const UNetConfig *uc = &m->unet_config;
    const ClipTextConfig *tc = &m->text_config;
    const int NB = up->n_blk, NL = ms_unet_cross_attn_layers(uc), D = tc->hidden_size, T = 77;
    const int size = o->sp_size > 0 ? o->sp_size : 512, steps = o->sp_steps > 0 ? o->sp_steps : FUSE_SP_STEPS;
    const int f = 1 << (m->vae_config.n_blocks - 1);                 /* the official: height // 8 (SD's VAE) */
    const int h = size / f, w = size / f, Lc = uc->in_channels;
    const size_t nl = (size_t)Lc * h * w;
    FuseSpInput *in = NULL;
    FuseSpLayer *ls = NULL;
    int n_layers = 0;
    MsStatus s = MS_OK;
    double t_start = ms_time();
    if (tk->n_layers != NL || NB != NL) return ms_errorf(MS_ERR_ARG, "fuse: %d token variants, %d blocks, %d cross-attention layers", tk->n_layers, NB, NL);
    if (size % f || size < f) return ms_errorf(MS_ERR_ARG, "fuse: spatial sampling size %d (a multiple of %d)", size, f);
    /* the layers: every attention Linear but attn2 to_k/to_v that some concept's LoRA touches */
    in = (FuseSpInput *)calloc((size_t)4 * NB, sizeof *in);
    ls = (FuseSpLayer *)calloc((size_t)6 * NB, sizeof *ls);
    if (!in || !ls) { free(in); free(ls); return ms_errorf(MS_ERR_NOMEM, "fuse: out of memory"); }
    for (int b = 0; b < NB && !s; b++)
        for (int am = 2 * b; am <= 2 * b + 1 && !s; am++)
            for (int wi = 0; wi < 4 && !s; wi++) {
                if ((am & 1) && (wi == 1 || wi == 2)) continue;     /* cross K/V: step 5 */
                int touched = 0;
                for (int c = 0; c < n; c++) touched |= cs[c].unet && cs[c].unet_has && cs[c].unet_has[4 * am + wi];
                if (!touched) continue;
                FuseSpLayer *L = &ls[n_layers++];
                char name[MS_KEY_MAX], key[MS_KEY_MAX + 8];
                unet_lora_module_name(up, am, wi, name, sizeof name);
                snprintf(key, sizeof key, "%s.weight", name);
                int pi = ms_param_find(&m->unet, key);
                if (pi < 0 || !m->unet.p[pi].f32 || m->unet.p[pi].ndim != 2) { s = ms_errorf(MS_ERR_ARG, "fuse: the UNet has no f32 matrix %s", key); break; }
                L->blk = b; L->am = am; L->w = wi; L->W = &m->unet.p[pi];
                L->input = 4 * b + ((am & 1) ? 2 : 0) + (wi == 3);
                L->d_out = (int)L->W->shape[0]; L->d_in = (int)L->W->shape[1];
                FuseSpInput *x = &in[L->input];
                if (!x->need) {
                    x->need = 1; x->C = L->d_in;
                    x->Gc = (double *)calloc((size_t)x->C * x->C, sizeof(double));
                    x->G = (double *)calloc((size_t)x->C * x->C, sizeof(double));
                    if (!x->Gc || !x->G) { s = ms_errorf(MS_ERR_NOMEM, "fuse: statistics of %s", key); break; }
                } else if (x->C != L->d_in) { s = ms_errorf(MS_ERR_SHAPE, "fuse: %s has %d inputs, expected %d", key, L->d_in, x->C); break; }
                L->B = (double *)calloc((size_t)L->d_out * L->d_in, sizeof(double));
                if (!L->B) { s = ms_errorf(MS_ERR_NOMEM, "fuse: statistics of %s", key); break; }
            }
    if (!s && n_layers == 0) goto done;
    for (int c = 0; c < n && !s; c++)
        if (!cs[c].unet) s = ms_errorf(MS_ERR_ARG, "fuse: concept %d (%s) has no UNet LoRA; the spatial stage samples every concept with its own", c, cs[c].name);
    if (s) goto done;

    /* ---- sampling with the hooks, concept by concept ---- */
    {
        MsScheduler *sch = (MsScheduler *)malloc(sizeof *sch);
        MsTorchRng *rng = (MsTorchRng *)malloc(sizeof *rng);
        ClipTextParams tp;
        Arena ar = { 0 }, acts = { 0 };
        UNetActs ua;
        int ua_ok = 0;
        float *lat = (float *)ms_alloc_aligned(nl, sizeof(float)), *xin = (float *)ms_alloc_aligned(nl, sizeof(float));
        float *eps = (float *)ms_alloc_aligned(nl, sizeof(float)), *work = (float *)ms_alloc_aligned(nl, sizeof(float));
        float *ctx = (float *)ms_alloc_aligned((size_t)NL * T * D, sizeof(float));
        const float **lctx = (const float **)malloc((size_t)NL * sizeof *lctx);
        UNetLoraLinear *lin = (UNetLoraLinear *)malloc((size_t)8 * NB * sizeof *lin);
        float *zero_up = NULL;
        FuseSpRec rec = { in, 4 * NB, 0.0 };
        double t_samp = 0.0, t_fold = 0.0;
        if (!sch || !rng || !lat || !xin || !eps || !work || !ctx || !lctx || !lin) s = ms_errorf(MS_ERR_NOMEM, "fuse: out of memory");
        if (!s) s = ms_scheduler_init(sch, MS_SCHED_DPMSOLVER, &m->scheduler_config, MS_TORCH_CPU_AVX2);
        if (!s) s = clip_text_params(&tp, &m->text, tc);
        if (!s) {
            UNetSizes us;
            s = unet_sizes(uc, 1, h, w, T, 0, &us);
            size_t need = clip_text_sizes(tc, 1, T, 0, 0);
            if (!s && us.scratch_bytes > need) need = us.scratch_bytes;
            if (!s) s = arena_init(&ar, need);
            if (!s) s = arena_init(&acts, us.acts_bytes);
        }
        /* the official order of draws: the resized embeddings, then one randn per concept */
        if (!s) {
            ms_torch_seed(rng, o->seed);
            for (int wd = 1; wd <= tk->n_bind; wd++)
                ms_torch_randn_skip(rng, ((size_t)tc->vocab_size + (size_t)tk->n_layers * wd) * D);
        }
        double t0 = ms_time();
        for (int c = 0; c < n && !s; c++) {
            /* the prompt bound for every layer, encoded by the fused text encoder */
            char base[1200];
            snprintf(base, sizeof base, FUSE_TEMPLATE "%s", cs[c].name);
            for (int i = 0; i < NL && !s; i++) {
                char *p = fuse_bind(base, tk, i);
                int32_t ids[77];
                ClipTextActs a;
                if (!p) { s = ms_errorf(MS_ERR_NOMEM, "fuse: prompt"); break; }
                s = clip_tokenize(tok, p, strlen(p), ids, T);
                free(p);
                arena_reset(&ar, 0);
                if (!s) s = clip_text_acts_alloc(&a, &ar, tc, 1, T, 0, 0);
                if (!s) s = clip_text_forward(&a, &tp, NULL, ids, tk->new_emb, tk->n_new, tc);
                if (!s) memcpy(ctx + (size_t)i * T * D, a.out, (size_t)T * D * sizeof(float));
                lctx[i] = ctx + (size_t)i * T * D;
            }
            arena_reset(&ar, 0);
            /* this concept's LoRA on the spatial layers only (cross K/V are fused already) */
            UNetLora lora = *cs[c].unet;
            if (!s && !zero_up) {                   /* zeros for every concept's rank (ranks may differ) */
                size_t mx = 0;
                for (int cc = 0; cc < n; cc++)
                    for (int b = 0; cs[cc].unet && b < NB; b++) for (int k = 1; k <= 2; k++) {
                        size_t q = (size_t)cs[cc].unet->lin[4 * (2 * b + 1) + k].out * cs[cc].unet->rank;
                        if (q > mx) mx = q;
                    }
                zero_up = (float *)calloc(mx ? mx : 1, sizeof(float));
                if (!zero_up) s = ms_errorf(MS_ERR_NOMEM, "fuse: out of memory");
            }
            if (s) break;
            if (lora.rank <= 0 || lora.n_attn != 2 * NB) { s = ms_errorf(MS_ERR_SHAPE, "fuse: %s: UNet LoRA of %d modules, rank %d", cs[c].name, lora.n_attn, lora.rank); break; }
            memcpy(lin, cs[c].unet->lin, (size_t)8 * NB * sizeof *lin);
            for (int b = 0; b < NB; b++) for (int k = 1; k <= 2; k++) lin[4 * (2 * b + 1) + k].up = zero_up;
            for (int am = 0; am < 2 * NB; am++)      /* modules the file lacks add nothing */
                for (int k = 0; k < 4; k++)
                    if (!cs[c].unet_has || !cs[c].unet_has[4 * am + k]) lin[4 * am + k].up = zero_up;
            lora.lin = lin;
            /* the latents and the loop */
            ms_torch_randn(rng, lat, nl, MS_TORCH_CPU_AVX2);
            if (!s) s = ms_scheduler_set_timesteps(sch, steps);
            if (s) break;
            for (size_t k = 0; k < nl; k++) lat[k] = lat[k] * sch->init_noise_sigma;
            if (!ua_ok) { s = unet_acts_init(&ua, uc, 1, h, w, T, 0, &acts, &ar); ua_ok = !s; }
            ua.record = fuse_sp_record;
            ua.record_ctx = &rec;
            double ts0 = ms_time();
            for (int i = 0; i < sch->num_steps && !s; i++) {
                float t = (float)sch->timesteps[i];
                ms_scheduler_scale_model_input(sch, i, xin, lat, nl);
                s = unet_forward(eps, &ua, xin, &t, NULL, (const float *const *)lctx, NULL, up, &lora);
                if (!s) s = ms_scheduler_step(sch, i, eps, lat, work, nl, NULL);
                if (o->verbose) {
                    char what[64];
                    snprintf(what, sizeof what, "concept %d/%d step %d/%d", c + 1, n, i + 1, sch->num_steps);
                    fuse_eta("sp", c * sch->num_steps + i + 1, n * sch->num_steps, t0, what);
                }
            }
            t_samp += ms_time() - ts0;
            ts0 = ms_time();
            for (int k = 0; k < 4 * NB && !s; k++) {
                if (!in[k].need) continue;
                if (o->on_gram) {
                    for (int i = 0; i < in[k].C; i++)
                        for (int j = 0; j < i; j++) in[k].Gc[(size_t)i * in[k].C + j] = in[k].Gc[(size_t)j * in[k].C + i];
                    o->on_gram(o->on_gram_ctx, c, k / 4, k % 4, in[k].Gc, in[k].n_cur, in[k].C);
                }
                s = fuse_sp_fold(&in[k], ls, n_layers, k, &cs[c]);
            }
            t_fold += ms_time() - ts0;
        }
        if (rep) { rep->sp_sample = t_samp; rep->sp_gram = rec.sec; rep->sp_fold = t_fold; }
        if (ua_ok) unet_acts_free(&ua);
        arena_free(&ar); arena_free(&acts);
        ms_free_aligned(lat); ms_free_aligned(xin); ms_free_aligned(eps); ms_free_aligned(work); ms_free_aligned(ctx);
        free(lctx); free(lin); free(zero_up); free(sch); free(rng);
    }

    /* ---- solve every layer ---- */
    double t1 = ms_time();
    MsSymEig eig;
    int eig_in = -1;
    memset(&eig, 0, sizeof eig);
    for (int l = 0; l < n_layers && !s; l++) {
        FuseSpLayer *L = &ls[l];
        FuseSpInput *x = &in[L->input];
        const size_t m = (size_t)L->d_out * L->d_in;
        const float *W0 = L->W->f32;
        float *W = (float *)malloc(m * sizeof(float)), *Ww = (float *)malloc(m * sizeof(float));
        double *trace = NULL, lt0 = ms_time(), cap = 0.0, rho = 0.0, ridge = 0.0, wch = 0.0;
        int rank = 0, n_trace = 0;
        MsFuseDelta d[64];
        if (!W || !Ww) s = ms_errorf(MS_ERR_NOMEM, "fuse: %s", L->W->name);
        if (n > 64) s = ms_errorf(MS_ERR_ARG, "fuse: at most 64 concepts");
        for (int c = 0; c < n && !s; c++) {
            int has = cs[c].unet && cs[c].unet_has && cs[c].unet_has[4 * L->am + L->w];
            const UNetLoraLinear *ll = has ? &cs[c].unet->lin[4 * L->am + L->w] : NULL;
            d[c].alpha = has ? cs[c].unet->alpha : 0.0f;
            d[c].rank = has ? cs[c].unet->rank : 0;
            d[c].down = ll ? ll->down : NULL;
            d[c].up = ll ? ll->up : NULL;
        }
        if (!s) s = ms_fuse_weight(Ww, W0, d, n, L->d_out, L->d_in);
        if (!s) s = fuse_trust_cap(d, n, W0, Ww, L->d_out, L->d_in, o->max_change, &cap, &rho, &wch);
        if (!s && o->method == MS_FUSE_WEIGHT) memcpy(W, Ww, m * sizeof(float));
        else if (!s && o->method == MS_FUSE_GRAM) {
            MsFuseStats S = { L->d_in, L->d_out, x->n, x->G, L->B, L->e };
            if (eig_in != L->input) {          /* one decomposition per distinct G (attn1 q, k, v share one) */
                ms_sym_eig_free(&eig);
                eig_in = -1;
                s = ms_sym_eig_init(&eig, x->G, L->d_in);
                if (!s) eig_in = L->input;
            }
            if (!s) s = ms_fuse_solve_gram_eig(&eig, &S, NULL, W, o->rcond, cap, &rank, &ridge);   /* W = B G+ = the change */
            for (size_t q = 0; q < m && !s; q++) W[q] = W0[q] + W[q];
        } else if (!s) {
            const int di = L->d_in;
            double *Cabs = (double *)malloc(m * sizeof(double)), vv = L->e;
            int cap = o->unet_iters * 5 / 4 + 64;
            trace = (double *)malloc((size_t)cap * sizeof(double));
            if (!Cabs || !trace) s = ms_errorf(MS_ERR_NOMEM, "fuse: %s", L->W->name);
            for (int oo = 0; oo < L->d_out && !s; oo++) {
                const float *w0 = W0 + (size_t)oo * di;
                for (int j = 0; j < di; j++) {
                    double acc = 0.0;
                    for (int i = 0; i < di; i++) acc += (double)w0[i] * x->G[(size_t)i * di + j];
                    Cabs[(size_t)oo * di + j] = acc + L->B[(size_t)oo * di + j];
                    vv += acc * w0[j] + 2.0 * (double)w0[j] * L->B[(size_t)oo * di + j];
                }
            }
            if (!s) {
                MsFuseStats S = { di, L->d_out, x->n, x->G, Cabs, vv };
                MsLbfgsResult res;
                s = ms_fuse_solve_lbfgs(&S, W0, W, o->unet_iters, trace, cap, &res);
                n_trace = res.n_evals < cap ? res.n_evals : cap;
            }
            free(Cabs);
        }
        if (!s) {
            double f0 = fuse_sp_objective(L, x, W0, W0), fw = fuse_sp_objective(L, x, W0, Ww), ff = fuse_sp_objective(L, x, W0, W);
            const double change = fuse_change_norm(W, W0, m);      /* W0 is the layer's weight: before it is written */
            char key[MS_KEY_MAX];
            snprintf(key, sizeof key, "%s", L->W->name);
            memcpy(L->W->f32, W, m * sizeof(float));
            s = report_add(rep, key, "sp", x->n, f0, fw, ff, rank, trace, n_trace, ms_time() - lt0, change, rho, wch, ridge);
            if (o->verbose) fuse_eta("sp", l + 1, n_layers, t1, key);
        }
        free(W); free(Ww); free(trace);
    }
    ms_sym_eig_free(&eig);
    if (rep) rep->sp_solve = ms_time() - t1;
done:
    if (rep) rep->seconds[2] = ms_time() - t_start;
    for (int k = 0; in && k < 4 * NB; k++) { free(in[k].Gc); free(in[k].G); }
    for (int l = 0; ls && l < 6 * NB; l++) free(ls[l].B);
    free(in); free(ls);
    return s;
}

/* ---- regionally controllable sampling ---- */
/* Regionally controllable sampling (Mix-of-Show, arXiv:2305.18292v2,
 * Sec. 3.4 "Regionally Controllable Sampling"; official code, commit 51270fd:
 * mixofshow/pipelines/pipeline_regionally_t2iadapter.py RegionallyT2IAdapterPipeline and
 * regionally_controlable_sampling.py).
 *
 * The algorithm, as the official pipeline runs it:
 *   1. prompts: the global prompt is bound x16 (bind_concept_prompt: layer i replaces every
 *      concept word by its i-th token) and encoded per layer; the negative prompt is encoded
 *      once, unbound, for every layer: context_i = [neg, pos_i]. Each region the same with its
 *      own prompt and negative prompt: region_i = [rneg, rpos_i].
 *   2. latents = randn(1,4,h,w) (torch.Generator().manual_seed(seed)) * init_noise_sigma.
 *   3. adapters: for every level k, state_k = keypose_k * W_k + sketch_k * S_k, where W_k is the
 *      spatial weight map (the global weight, a region's weight inside its box); the same state
 *      for both CFG halves.
 *   4. for each timestep: eps = UNet([x, x], t, contexts, regions, state) with the regional
 *      attention of UNetRegions in every attn2 (global attention outside the boxes, per-region
 *      attention inside, averaged where boxes overlap); eps = eps_u + g (eps_c - eps_u);
 *      x = scheduler.step(eps, t, x).
 *   5. image = vae.decode(x / scaling_factor).
 * The official pipeline crashes when per-region adapter weights are given (the parsed weight
 * strings overwrite the variable that holds the encoded region prompts); here they work as the
 * paper describes (tests/test_regional.c checks the three properties of the issue). */

/* One (negative, positive) pair for n_ctx layers: out (n_ctx, 2, 77, D) = [neg, bound pos_i]. */
static MsStatus rs_encode_pair(const ClipTextParams *tp, const ClipTextConfig *tc, const ClipTokenizer *tok,
                               const MsTxt2ImgOptions *b, const char *pos, const char *neg, int n_ctx, float *out,
                               Arena *ar) {
    const size_t one = (size_t)77 * tc->hidden_size;
    MsStatus s = encode_prompt(tp, tc, tok, neg ? neg : "", out, 1, ar, b->new_emb, b->n_new);
    for (int i = 0; !s && i < n_ctx; i++) {
        float *ci = out + (size_t)i * 2 * one;
        if (i) memcpy(ci, out, one * sizeof(float));            /* negative: encoded once, repeated */
        if (b->n_layer_ctx && b->n_bind) {
            char *bound = bind_prompt(pos, b->n_bind, b->bind_word, b->bind_token, b->n_layer_ctx, i);
            if (!bound) return ms_errorf(MS_ERR_NOMEM, "regional: out of memory");
            s = encode_prompt(tp, tc, tok, bound, ci + one, 1, ar, b->new_emb, b->n_new);
            free(bound);
        } else if (i == 0) {
            s = encode_prompt(tp, tc, tok, pos, ci + one, 1, ar, b->new_emb, b->n_new);
        } else {
            memcpy(ci + one, out + one, one * sizeof(float));   /* nothing to bind: every layer alike */
        }
    }
    return s;
}

void ms_regional_weight_map(float *map, int fh, int fw, int height, int width, const MsRegionalAdapter *a) {
    for (size_t k = 0; k < (size_t)fh * fw; k++) map[k] = a->weight;  /* weight * torch.ones(fh, fw) */
    for (int r = 0; r < a->n_box; r++) {
        /* start_h, end_h = start_h / height, end_h / height (likewise w), then ceil / floor */
        double f[4] = { a->box[r][0] / height, a->box[r][1] / width, a->box[r][2] / height, a->box[r][3] / width };
        int r0, c0, r1, c1;
        unet_region_rows(f, fh, fw, &r0, &c0, &r1, &c1);
        for (int y = r0; y < r1; y++)
            for (int x = c0; x < c1; x++) map[(size_t)y * fw + x] = a->box_weight[r];
    }
}

static MsStatus rs_check_adapter(const MsRegionalAdapter *a, const char *name, int want_cin, const UNetConfig *uc) {
    if (!a->adapter) return MS_OK;
    const AdapterConfig *ac = &a->adapter->cfg;
    if (!a->cond) return ms_errorf(MS_ERR_ARG, "regional: %s adapter without a condition image", name);
    if (ac->in_channels != want_cin)
        return ms_errorf(MS_ERR_ARG, "regional: the %s adapter takes %d input channel(s); a %s condition has %d "
                         "(the official script reads it as %s)", name, ac->in_channels, name, want_cin,
                         want_cin == 3 ? "RGB" : "grey (L)");
    if (ac->n_channels != uc->n_blocks)
        return ms_errorf(MS_ERR_ARG, "regional: the %s adapter has %d feature levels, the UNet %d", name, ac->n_channels,
                         uc->n_blocks);
    for (int i = 0; i < ac->n_channels; i++)
        if (ac->channels[i] != uc->block_out_channels[i])
            return ms_errorf(MS_ERR_ARG, "regional: %s adapter level %d has %d channels, the UNet block %d", name, i,
                             ac->channels[i], uc->block_out_channels[i]);
    if (!(a->weight == a->weight)) return ms_errorf(MS_ERR_ARG, "regional: %s adapter weight is NaN", name);
    for (int r = 0; r < a->n_box; r++)
        if (!a->box || !a->box_weight)
            return ms_errorf(MS_ERR_ARG, "regional: %s adapter: %d region weights without data", name, a->n_box);
    return MS_OK;
}

MsStatus ms_regional_sample(const MsModel *m, const ClipTokenizer *tok, const MsRegionalOptions *o, float *image) {
    const MsTxt2ImgOptions *b = &o->base;
    const UNetConfig *uc = &m->unet_config;
    const VaeConfig *vc = &m->vae_config;
    const ClipTextConfig *tc = &m->text_config;
    const int f = 1 << (vc->n_blocks - 1), T = 77, D = tc->hidden_size, NB = 2, R = o->n_regions;
    const int n_cross = ms_unet_cross_attn_layers(uc);
    MsStatus s;
    if (b->batch != 1) return ms_errorf(MS_ERR_ARG, "regional: batch %d (the official pipeline samples one image)", b->batch);
    if (!(b->guidance_scale > 1.0f))
        return ms_errorf(MS_ERR_ARG, "regional: guidance scale %g: must be > 1 (the pipeline always builds both halves)",
                         (double)b->guidance_scale);
    if (!b->prompt) return ms_errorf(MS_ERR_ARG, "regional: no prompt");
    if (b->width <= 0 || b->height <= 0 || b->width % f || b->height % f || b->width > 8192 || b->height > 8192)
        return ms_errorf(MS_ERR_ARG, "regional: size %d x %d: sides must be positive multiples of %d", b->width,
                         b->height, f);
    if (b->steps < 1 || b->steps > MS_SCHED_MAX_T) return ms_errorf(MS_ERR_ARG, "regional: %d steps", b->steps);
    if (uc->cross_attention_dim != D)
        return ms_errorf(MS_ERR_ARG, "regional: UNet cross_attention_dim %d != text hidden_size %d", uc->cross_attention_dim, D);
    if (b->n_layer_ctx && b->n_layer_ctx != n_cross)
        return ms_errorf(MS_ERR_ARG, "regional: %d layer-wise contexts, the UNet has %d cross-attention layers",
                         b->n_layer_ctx, n_cross);
    if (b->n_bind && (!b->n_layer_ctx || !b->bind_word || !b->bind_token))
        return ms_errorf(MS_ERR_ARG, "regional: %d concept words to bind without layer-wise contexts", b->n_bind);
    if (R < 0 || R > MS_REGION_MAX || (R && !o->regions))
        return ms_errorf(MS_ERR_ARG, "regional: %d regions (expected 0..%d)", R, MS_REGION_MAX);
    for (int r = 0; r < R; r++) {
        const double *bx = o->regions[r].box;
        if (!o->regions[r].prompt) return ms_errorf(MS_ERR_ARG, "regional: region %d has no prompt", r + 1);
        if (!(bx[0] >= 0 && bx[1] >= 0 && bx[2] <= 1 && bx[3] <= 1 && bx[0] < bx[2] && bx[1] < bx[3]))
            return ms_errorf(MS_ERR_ARG, "regional: region %d box [%g, %g, %g, %g] (fractions top, left, bottom, right): "
                             "expected 0 <= top < bottom <= 1 and 0 <= left < right <= 1", r + 1, bx[0], bx[1], bx[2], bx[3]);
    }
    if ((s = rs_check_adapter(&o->keypose, "keypose", 3, uc))) return s;
    if ((s = rs_check_adapter(&o->sketch, "sketch", 1, uc))) return s;

    const int h = b->height / f, w = b->width / f, L = uc->in_channels;
    const int n_ctx = b->n_layer_ctx ? b->n_layer_ctx : 1;
    const size_t nl = (size_t)L * h * w, one = (size_t)NB * T * D;   /* one latent; one (2,77,D) context */
    MsScheduler *sch = (MsScheduler *)malloc(sizeof *sch);
    ClipTextParams *tp = (ClipTextParams *)malloc(sizeof *tp);
    VaeParams *vp = (VaeParams *)malloc(sizeof *vp);
    UNetParams *up = (UNetParams *)malloc(sizeof *up);
    MsTorchRng *rng = (MsTorchRng *)malloc(sizeof *rng);
    Arena ar = { 0 }, acts = { 0 };
    UNetActs ua;
    UNetRegions reg;
    int ua_ok = 0, up_ok = 0;
    float *lat = NULL, *in = NULL, *eps = NULL, *work = NULL, *ctx = NULL, *rctx = NULL, *rwork = NULL;
    float *feat[MS_MAX_BLOCKS] = { 0 }, *tmpf[MS_MAX_BLOCKS] = { 0 }, *wmap = NULL;
    const float **lctx = NULL, **rptr = NULL;
    double (*rbox)[4] = NULL;
    size_t nfeat[MS_MAX_BLOCKS] = { 0 };
    const int use_ad = o->keypose.adapter || o->sketch.adapter;
    memset(&reg, 0, sizeof reg);
    if (!sch || !tp || !vp || !up || !rng) { s = ms_errorf(MS_ERR_NOMEM, "regional: out of memory"); goto done; }
    if ((s = ms_scheduler_init(sch, b->sampler, &m->scheduler_config, b->torch_cpu))) goto done;
    if ((s = ms_scheduler_set_timesteps(sch, b->steps))) goto done;
    if ((s = clip_text_params(tp, &m->text, tc))) goto done;
    if ((s = vae_params_init(vp, vc, &m->vae))) goto done;
    if ((s = unet_params_init(up, uc, &m->unet))) goto done;
    up_ok = 1;

    /* plan: one scratch arena for the largest of text encoder, adapters, UNet and VAE decode */
    {
        VaeSizes vz;
        UNetSizes us;
        size_t need = clip_text_sizes(tc, 1, T, 0, 0);
        if ((s = vae_sizes(vc, b->height, b->width, -1, &vz))) goto done;
        if (vz.decode_bytes > need) need = vz.decode_bytes;
        if ((s = unet_sizes(uc, NB, h, w, T, 0, &us))) goto done;
        if (us.scratch_bytes > need) need = us.scratch_bytes;
        for (int k = 0; k < 2; k++) {
            const MsRegionalAdapter *a = k ? &o->sketch : &o->keypose;
            size_t ab;
            if (!a->adapter) continue;
            if ((s = adapter_sizes(&a->adapter->cfg, 1, b->height, b->width, &ab, nfeat))) goto done;
            if (ab > need) need = ab;
        }
        if ((s = arena_init(&ar, need)) || (s = arena_init(&acts, us.acts_bytes))) goto done;
    }
    /* the official box mapping: downscale = sqrt(H W / seq_len), fh = int(H // downscale) must
     * be the layer's own height (else its rearrange fails); checked for every level */
    {
        int lh = h, lw = w, pad = uc->downsample_padding, extra = pad == 0 ? 1 : 2 * pad;
        for (int i = 0; R && i < uc->n_blocks; i++) {
            double ds = sqrt((double)b->height * b->width / ((double)lh * lw));
            int fh = (int)floor((double)b->height / ds), fw = (int)floor((double)b->width / ds);
            if (fh != lh || fw != lw) {
                s = ms_errorf(MS_ERR_ARG, "regional: %d x %d: at UNet level %d (%d x %d latents) the official box "
                              "mapping gives %d x %d; use sides that are multiples of %d", b->width, b->height, i, lw,
                              lh, fw, fh, f << (uc->n_blocks - 1));
                goto done;
            }
            lh = (lh + extra - 3) / 2 + 1;
            lw = (lw + extra - 3) / 2 + 1;
        }
    }
    lat = (float *)ms_alloc_aligned(nl, sizeof(float));
    in = (float *)ms_alloc_aligned(2 * nl, sizeof(float));
    eps = (float *)ms_alloc_aligned(2 * nl, sizeof(float));
    work = (float *)ms_alloc_aligned(nl, sizeof(float));
    ctx = (float *)ms_alloc_aligned((size_t)n_ctx * one, sizeof(float));
    lctx = (const float **)malloc((size_t)n_cross * sizeof *lctx);
    if (R) {
        rctx = (float *)ms_alloc_aligned((size_t)R * n_ctx * one, sizeof(float));
        rptr = (const float **)malloc((size_t)R * n_ctx * sizeof *rptr);
        rbox = (double (*)[4])malloc((size_t)R * sizeof *rbox);
        rwork = (float *)ms_alloc_aligned(unet_regions_work_floats(uc, NB, h, w, T), sizeof(float));
    }
    if (!lat || !in || !eps || !work || !ctx || !lctx || (R && (!rctx || !rptr || !rbox || !rwork))) {
        s = ms_errorf(MS_ERR_NOMEM, "regional: out of memory");
        goto done;
    }

    /* 1. prompts: global [neg, pos_i], regions [rneg, rpos_i] */
    if ((s = rs_encode_pair(tp, tc, tok, b, b->prompt, b->negative, n_ctx, ctx, &ar))) goto done;
    for (int i = 0; i < n_cross; i++) lctx[i] = ctx + (size_t)(b->n_layer_ctx ? i : 0) * one;
    for (int r = 0; r < R; r++) {
        float *rc = rctx + (size_t)r * n_ctx * one;
        if ((s = rs_encode_pair(tp, tc, tok, b, o->regions[r].prompt, o->regions[r].negative, n_ctx, rc, &ar))) goto done;
        for (int i = 0; i < n_ctx; i++) rptr[(size_t)r * n_ctx + i] = rc + (size_t)i * one;
        memcpy(rbox[r], o->regions[r].box, sizeof rbox[r]);
    }

    /* 2. initial latents */
    ms_torch_seed(rng, b->seed);
    if (b->init_noise) memcpy(lat, b->init_noise, nl * sizeof(float));
    else ms_torch_randn(rng, lat, nl, b->torch_cpu);
    for (size_t k = 0; k < nl; k++) lat[k] = lat[k] * sch->init_noise_sigma;
    if (o->trace) { int64_t sh[4] = { 1, L, h, w }; o->trace(o->trace_ctx, "latents_init", lat, 4, sh); }

    /* 3. adapter state: keypose_k * W_k + sketch_k * S_k, for both halves */
    if (use_ad) {
        const int nlev = uc->n_blocks;
        size_t maxhw = 0;
        for (int i = 0; i < nlev; i++) {
            feat[i] = (float *)ms_alloc_aligned(nfeat[i] * NB, sizeof(float));
            tmpf[i] = (float *)ms_alloc_aligned(nfeat[i], sizeof(float));
            if (!feat[i] || !tmpf[i]) { s = ms_errorf(MS_ERR_NOMEM, "regional: out of memory"); goto done; }
            size_t hw = nfeat[i] / (size_t)uc->block_out_channels[i];
            if (hw > maxhw) maxhw = hw;
            memset(feat[i], 0, nfeat[i] * sizeof(float));
        }
        if (!(wmap = (float *)malloc(maxhw * sizeof(float)))) { s = ms_errorf(MS_ERR_NOMEM, "regional: out of memory"); goto done; }
        int first = 1;
        for (int k = 0; k < 2; k++) {
            const MsRegionalAdapter *a = k ? &o->sketch : &o->keypose;
            if (!a->adapter) continue;
            if ((s = adapter_forward(a->adapter, &ar, tmpf, a->cond, 1, b->height, b->width))) goto done;
            arena_reset(&ar, 0);
            int fh = b->height / f, fw = b->width / f;
            for (int i = 0; i < nlev; i++) {
                const int C = uc->block_out_channels[i];
                const size_t HW = nfeat[i] / (size_t)C;
                if ((size_t)fh * fw != HW) {   /* adapter levels: AvgPool 2x2 halves (H/8)/2^i */
                    s = ms_errorf(MS_ERR_SHAPE, "regional: adapter level %d: %zu pixels, expected %d x %d", i, HW, fh, fw);
                    goto done;
                }
                ms_regional_weight_map(wmap, fh, fw, b->height, b->width, a);
                for (int c = 0; c < C; c++)
                    for (size_t p = 0; p < HW; p++) {
                        float v = wmap[p] * tmpf[i][(size_t)c * HW + p];     /* spatial_adaptor_weight * feat */
                        feat[i][(size_t)c * HW + p] = first ? v : feat[i][(size_t)c * HW + p] + v;  /* keypose + sketch */
                    }
                fh /= 2; fw /= 2;
            }
            first = 0;
        }
        for (int i = 0; i < nlev; i++) memcpy(feat[i] + nfeat[i], feat[i], nfeat[i] * sizeof(float));  /* cat([v] * 2) */
    }

    /* 4. denoising loop (the CFG batch in parts, one per thread, when they divide it: eps is the same) */
    if ((s = unet_acts_init(&ua, uc, NB, h, w, T, 0, &acts, &ar))) goto done;
    ua_ok = 1;
    ua.split = 1;
    if (R) {
        reg.n = R;
        reg.box = (const double (*)[4])rbox;
        reg.n_layer_ctx = b->n_layer_ctx;
        reg.ctx = rptr;
        reg.work = rwork;
        ua.regions = &reg;
    }
    {
        double tu = 0.0;
        for (int i = 0; i < sch->num_steps; i++) {
            float t[2];
            char key[48];
            int64_t sh[4] = { NB, L, h, w };
            t[0] = t[1] = (float)sch->timesteps[i];
            memcpy(in, lat, nl * sizeof(float));
            memcpy(in + nl, lat, nl * sizeof(float));               /* cat([latents] * 2) */
            ms_scheduler_scale_model_input(sch, i, in, in, 2 * nl);
            double t0 = ms_time();
            if ((s = unet_forward(eps, &ua, in, t, NULL, (const float *const *)lctx,
                                  use_ad ? (const float *const *)feat : NULL, up, NULL)))
                goto done;
            tu += ms_time() - t0;
            if (o->trace) { snprintf(key, sizeof key, "step%d.eps", i); o->trace(o->trace_ctx, key, eps, 4, sh); }
            const float g = b->guidance_scale;
            for (size_t k = 0; k < nl; k++) eps[k] = eps[k] + g * (eps[nl + k] - eps[k]);
            if ((s = ms_scheduler_step(sch, i, eps, lat, work, nl, rng))) goto done;
            if (o->trace) { sh[0] = 1; snprintf(key, sizeof key, "step%d.latents", i); o->trace(o->trace_ctx, key, lat, 4, sh); }
            if (b->progress) b->progress(b->progress_ctx, i, sch->num_steps, lat, nl);
        }
        if (o->unet_seconds) *o->unet_seconds = tu;
    }

    /* 5. decode(latents / scaling_factor) */
    unet_acts_free(&ua);
    ua_ok = 0;
    arena_free(&acts);
    if (up_ok) { unet_params_free(up); up_ok = 0; }
    ms_gemm_scratch_free();
    ops_scratch_free();
    arena_reset(&ar, 0);
    s = vae_decode(vp, &ar, image, lat, 1, h, w);
done:
    for (int i = 0; i < MS_MAX_BLOCKS; i++) { ms_free_aligned(feat[i]); ms_free_aligned(tmpf[i]); }
    free(wmap);
    ms_free_aligned(lat); ms_free_aligned(in); ms_free_aligned(eps); ms_free_aligned(work);
    ms_free_aligned(ctx); ms_free_aligned(rctx); ms_free_aligned(rwork);
    free(lctx); free(rptr); free(rbox);
    if (ua_ok) unet_acts_free(&ua);
    if (up_ok) unet_params_free(up);
    arena_free(&ar);
    arena_free(&acts);
    free(sch); free(tp); free(vp); free(up); free(rng);
    return s;
}
