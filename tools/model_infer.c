/* tools/model_infer.c — the configs of an original (LDM / CompVis) single-file checkpoint,
 * read off its tensor shapes.
 *
 * A single file carries no config.json. Its shapes determine most of the architecture:
 *   UNet  (model.diffusion_model.*): block widths, layers per block, which blocks have
 *         attention, transformer depth per level, cross-attention width, 1x1-conv or Linear
 *         proj_in, in/out channels, conv_in/conv_out kernels, time-embedding width;
 *   VAE   (first_stage_model.*): block widths, layers per block, in/out/latent channels;
 *   CLIP  (cond_stage_model.transformer.text_model.*): width, MLP width, layers, vocabulary,
 *         positions.
 * Nothing in a state dict says how many attention heads a layer splits into, how many groups a
 * GroupNorm uses, nor the VAE's latent scaling or the scheduler: those follow the SD 1.x
 * convention (v1-inference.yaml: num_heads 8, GroupNorm 32, CLIP ViT-L/14's head width 64,
 * scale_factor 0.18215, the SD 1.5 scheduler_config.json), reduced to the largest value that
 * divides the widths when the convention does not fit them, and reported as assumed.
 *
 * One exception: mixshow's own embedded test model (models/tiny-sd, same topology as SD 1.5
 * with tiny widths) is recognised by its exact widths and gets the heads and groups of its
 * config.json files (2 heads, 8 groups), so that its single file and its folder agree.
 *
 * Shapes that no SD 1.x topology has (a 3-D conv weight, a resnet whose widths do not chain,
 * levels with different numbers of layers, a missing tensor the inference needs) are errors
 * that name the tensor. Everything not read here is checked afterwards, tensor by tensor,
 * against the parameter tables the inferred configs imply (tools/model_load.c, fill). */
#include "tools/tools.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef struct {
    const MsShapeEntry *t;
    size_t n;
    const char *origin;
} Shapes;

static const MsShapeEntry *find(const Shapes *S, const char *fmt, ...) {
    char key[MS_KEY_MAX + 64];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(key, sizeof key, fmt, ap);
    va_end(ap);
    for (size_t i = 0; i < S->n; i++)
        if (!strcmp(S->t[i].name, key)) return &S->t[i];
    return NULL;
}

/* The tensor key, which must exist with rank ndim (and, when what is given, be named in the
 * error as that part of the model). */
static MsStatus need(const Shapes *S, const MsShapeEntry **out, int ndim, const char *what, const char *key) {
    const MsShapeEntry *e = NULL;
    for (size_t i = 0; i < S->n && !e; i++)
        if (!strcmp(S->t[i].name, key)) e = &S->t[i];
    *out = e;
    if (!e)
        return ms_errorf(MS_ERR_FORMAT, "%s: no tensor '%s' (%s): not an SD 1.x single file, or an incomplete one "
                         "(give --config DIR to describe it)", S->origin, key, what);
    if (e->ndim != ndim) {
        char sh[96];
        return ms_errorf(MS_ERR_SHAPE, "%s: tensor '%s' (%s) has shape %s: expected %d dimensions (no SD 1.x "
                         "topology has this shape)", S->origin, key, what, ms_shape_str(sh, sizeof sh, e->ndim, e->shape),
                         ndim);
    }
    for (int d = 0; d < ndim; d++)
        if (e->shape[d] < 1 || e->shape[d] > (1 << 24)) {
            char sh[96];
            return ms_errorf(MS_ERR_SHAPE, "%s: tensor '%s' (%s) has shape %s: dimension %d out of range", S->origin,
                             key, what, ms_shape_str(sh, sizeof sh, e->ndim, e->shape), d);
        }
    return MS_OK;
}

static MsStatus needf(const Shapes *S, const MsShapeEntry **out, int ndim, const char *what, const char *fmt, ...) {
    char key[MS_KEY_MAX + 64];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(key, sizeof key, fmt, ap);
    va_end(ap);
    return need(S, out, ndim, what, key);
}

static MsStatus bad_shape(const Shapes *S, const MsShapeEntry *e, const char *why) {
    char sh[96];
    return ms_errorf(MS_ERR_SHAPE, "%s: tensor '%s' has shape %s: %s (no SD 1.x topology has this shape)", S->origin,
                     e->name, ms_shape_str(sh, sizeof sh, e->ndim, e->shape), why);
}

/* The number of consecutive indices k = 0, 1, ... for which fmt(k) exists. */
static int count_seq(const Shapes *S, const char *fmt, int stop) {
    int k = 0;
    char key[MS_KEY_MAX + 64];
    while (k < stop) {
        snprintf(key, sizeof key, fmt, k);
        if (!find(S, "%s", key)) break;
        k++;
    }
    return k;
}

/* The largest divisor of every width in w[0..n) that is <= want (the convention, when it fits). */
static int fit_divisor(const int *w, int n, int want) {
    for (int g = want; g > 1; g--) {
        int ok = 1;
        for (int i = 0; i < n && ok; i++) ok = w[i] % g == 0;
        if (ok) return g;
    }
    return 1;
}

/* Appends to the notes buffer. */
typedef struct { char *buf; size_t cap, len; } Notes;
static void note(Notes *N, const char *fmt, ...) {
    if (!N->buf || N->cap == 0 || N->len + 1 >= N->cap) return;
    va_list ap;
    va_start(ap, fmt);
    int k = vsnprintf(N->buf + N->len, N->cap - N->len, fmt, ap);
    va_end(ap);
    if (k > 0) N->len += (size_t)k < N->cap - N->len ? (size_t)k : N->cap - N->len - 1;
}

static void list_ints(char *buf, size_t cap, const int *x, int n) {
    size_t len = 0;
    buf[0] = 0;
    for (int i = 0; i < n && len + 1 < cap; i++) {
        int k = snprintf(buf + len, cap - len, "%s%d", i ? "," : "", x[i]);
        if (k < 0) break;
        len += (size_t)k < cap - len ? (size_t)k : cap - len - 1;
    }
}

/* ---- UNet: LDM openaimodel.UNetModel keys (see ms_param_table_unet for the mapping) ---- */
#define U "model.diffusion_model."

/* transformer_blocks.* under prefix (a SpatialTransformer); 0 when there is none */
static int transformer_depth(const Shapes *S, const char *prefix) {
    char fmt[MS_KEY_MAX + 64];
    snprintf(fmt, sizeof fmt, "%stransformer_blocks.%%d.attn1.to_q.weight", prefix);
    return count_seq(S, fmt, 64);
}

static MsStatus infer_unet(const Shapes *S, UNetConfig *c, int *ctx_found) {
    const MsShapeEntry *e;
    MsStatus s;
    char p[MS_KEY_MAX];
    ms_unet_config_sd15(c);
    if ((s = need(S, &e, 4, "the UNet's conv_in", U "input_blocks.0.0.weight"))) return s;
    if (e->shape[2] != e->shape[3] || e->shape[2] % 2 == 0 || e->shape[2] > 7)
        return bad_shape(S, e, "conv_in needs a square odd kernel up to 7");
    const int C0 = (int)e->shape[0];
    c->in_channels = (int)e->shape[1];
    c->conv_in_kernel = (int)e->shape[2];
    if ((s = need(S, &e, 4, "the UNet's conv_out", U "out.2.weight"))) return s;
    if (e->shape[1] != C0 || e->shape[2] != e->shape[3] || e->shape[2] % 2 == 0 || e->shape[2] > 7)
        return bad_shape(S, e, "conv_out must read the first level's width with a square odd kernel");
    c->out_channels = (int)e->shape[0];
    c->conv_out_kernel = (int)e->shape[2];
    if ((s = need(S, &e, 2, "the UNet's time embedding", U "time_embed.0.weight"))) return s;
    if (e->shape[1] != C0) return bad_shape(S, e, "the time embedding must read the first level's width");
    c->time_embedding_dim = e->shape[0] == 4 * (int64_t)C0 ? 0 : (int)e->shape[0];

    /* input_blocks: 1 (conv_in) + n levels x (L layers + a downsampler), the last without one */
    int total = 1;
    while (total < 1024 && (find(S, U "input_blocks.%d.0.in_layers.2.weight", total) ||
                            find(S, U "input_blocks.%d.0.op.weight", total)))
        total++;
    int first_op = 0;
    for (int k = 1; k < total && !first_op; k++)
        if (find(S, U "input_blocks.%d.0.op.weight", k)) first_op = k;
    const int L = first_op ? first_op - 1 : total - 1;     /* layers per block */
    if (L < 1)
        return ms_errorf(MS_ERR_FORMAT, "%s: no tensor '" U "input_blocks.1.0.in_layers.2.weight' (the first "
                         "down resnet): not an SD 1.x single file", S->origin);
    if (total % (L + 1) || total / (L + 1) > MS_MAX_BLOCKS)
        return ms_errorf(MS_ERR_SHAPE, "%s: '" U "input_blocks.*' holds %d blocks, which is not levels x (%d "
                         "layers + downsampler): the levels do not all have %d layers (no SD 1.x topology)",
                         S->origin, total, L, L);
    const int n = total / (L + 1);
    c->n_blocks = n;
    c->layers_per_block = L;
    for (int i = 0; i < n; i++) {                /* downsamplers exactly where SD 1.x has them */
        int k = 1 + i * (L + 1) + L;
        const MsShapeEntry *op = find(S, U "input_blocks.%d.0.op.weight", k);
        if ((i < n - 1) != (op != NULL))
            return ms_errorf(MS_ERR_SHAPE, "%s: %s tensor '" U "input_blocks.%d.0.op.weight' (level %d of %d, "
                             "%d layers per level): not an SD 1.x topology", S->origin, op ? "unexpected" : "no", k,
                             i, n, L);
    }
    /* widths, block types, transformer depth */
    int prev = C0, ctx = 0, lin = -1;
    for (int i = 0; i < n; i++) {
        int k = 1 + i * (L + 1);
        if ((s = needf(S, &e, 4, "a down resnet's conv1", U "input_blocks.%d.0.in_layers.2.weight", k))) return s;
        if (e->shape[1] != prev) return bad_shape(S, e, "its input width is not the previous level's width");
        c->block_out_channels[i] = (int)e->shape[0];
        snprintf(p, sizeof p, U "input_blocks.%d.1.", k);
        int depth = transformer_depth(S, p);
        c->down_block_types[i] = depth ? MS_BLOCK_CROSS_ATTN_DOWN : MS_BLOCK_DOWN;
        c->transformer_layers_per_block[i] = depth ? depth : 1;
        prev = c->block_out_channels[i];
    }
    for (int i = 0; i < n; i++) {
        int lv = n - 1 - i;
        snprintf(p, sizeof p, U "output_blocks.%d.1.", i * (L + 1));
        int depth = transformer_depth(S, p);
        if (!find(S, U "output_blocks.%d.0.in_layers.2.weight", i * (L + 1)))
            return ms_errorf(MS_ERR_FORMAT, "%s: no tensor '" U "output_blocks.%d.0.in_layers.2.weight' (up block %d): "
                             "not an SD 1.x single file", S->origin, i * (L + 1), i);
        c->up_block_types[i] = depth ? MS_BLOCK_CROSS_ATTN_UP : MS_BLOCK_UP;
        if (depth && c->down_block_types[lv] == MS_BLOCK_CROSS_ATTN_DOWN && depth != c->transformer_layers_per_block[lv])
            return ms_errorf(MS_ERR_SHAPE, "%s: '" U "output_blocks.%d.1' has %d transformer blocks, level %d's down "
                             "block %d: diffusers' SD 1.x UNet uses one depth per level", S->origin, i * (L + 1), depth,
                             lv, c->transformer_layers_per_block[lv]);
        if (depth) c->transformer_layers_per_block[lv] = depth;
    }
    int mid = transformer_depth(S, U "middle_block.1.");
    if (!mid)
        return ms_errorf(MS_ERR_FORMAT, "%s: no tensor '" U "middle_block.1.transformer_blocks.0.attn1.to_q.weight' "
                         "(the mid block's attention): SD 1.x UNets have a UNetMidBlock2DCrossAttn", S->origin);
    if (c->down_block_types[n - 1] == MS_BLOCK_DOWN && c->up_block_types[0] == MS_BLOCK_UP)
        c->transformer_layers_per_block[n - 1] = mid;
    else if (mid != c->transformer_layers_per_block[n - 1])
        return ms_errorf(MS_ERR_SHAPE, "%s: the mid block has %d transformer blocks, level %d has %d: diffusers' "
                         "SD 1.x UNet uses one depth per level", S->origin, mid, n - 1, c->transformer_layers_per_block[n - 1]);
    /* cross-attention width and projection kind, from every transformer's first block */
    for (size_t i = 0; i < S->n; i++) {
        const MsShapeEntry *x = &S->t[i];
        size_t len = strlen(x->name);
        if (strncmp(x->name, U, strlen(U))) continue;
        if (len > 18 && !strcmp(x->name + len - 18, ".attn2.to_k.weight")) {
            if (x->ndim != 2) return bad_shape(S, x, "attention projections are 2-D Linear weights");
            if (ctx && x->shape[1] != ctx) return bad_shape(S, x, "cross-attention widths differ between layers");
            ctx = (int)x->shape[1];
        }
        if (len > 15 && !strcmp(x->name + len - 15, ".proj_in.weight")) {
            if (x->ndim != 2 && x->ndim != 4) return bad_shape(S, x, "proj_in is a 1x1 conv or a Linear");
            int l = x->ndim == 2;
            if (lin >= 0 && l != lin) return bad_shape(S, x, "proj_in is a Linear in some transformers and a conv in others");
            lin = l;
        }
    }
    if (!ctx)
        return ms_errorf(MS_ERR_FORMAT, "%s: no tensor '*.attn2.to_k.weight' under '" U "': no cross-attention",
                         S->origin);
    c->cross_attention_dim = ctx;
    c->use_linear_projection = lin > 0;
    *ctx_found = ctx;
    return MS_OK;
}

/* ---- VAE: LDM AutoencoderKL keys (ms_param_table_vae) ---- */
#define V "first_stage_model."
static MsStatus infer_vae(const Shapes *S, VaeConfig *c) {
    const MsShapeEntry *e;
    MsStatus s;
    ms_vae_config_sd15(c);
    if ((s = need(S, &e, 4, "the VAE encoder's conv_in", V "encoder.conv_in.weight"))) return s;
    c->in_channels = (int)e->shape[1];
    int prev = (int)e->shape[0];
    int n = count_seq(S, V "encoder.down.%d.block.0.conv1.weight", MS_MAX_BLOCKS + 1);
    if (n < 1 || n > MS_MAX_BLOCKS)
        return ms_errorf(MS_ERR_FORMAT, "%s: %d levels under '" V "encoder.down.*' (expected 1..%d; is "
                         "'" V "encoder.down.0.block.0.conv1.weight' there?)", S->origin, n, MS_MAX_BLOCKS);
    c->n_blocks = n;
    char fmt[MS_KEY_MAX];
    c->layers_per_block = count_seq(S, V "encoder.down.0.block.%d.conv1.weight", 64);
    for (int i = 0; i < n; i++) {
        snprintf(fmt, sizeof fmt, V "encoder.down.%d.block.%%d.conv1.weight", i);
        int l = count_seq(S, fmt, 64);
        if (l != c->layers_per_block)
            return ms_errorf(MS_ERR_SHAPE, "%s: '" V "encoder.down.%d' has %d resnets, level 0 has %d: one count per "
                             "level in SD 1.x VAEs", S->origin, i, l, c->layers_per_block);
        if ((s = needf(S, &e, 4, "a VAE encoder resnet's conv1", V "encoder.down.%d.block.0.conv1.weight", i))) return s;
        if (e->shape[1] != prev) return bad_shape(S, e, "its input width is not the previous level's width");
        c->block_out_channels[i] = (int)e->shape[0];
        c->down_block_types[i] = MS_BLOCK_DOWN_ENCODER;
        c->up_block_types[i] = MS_BLOCK_UP_DECODER;
        prev = c->block_out_channels[i];
    }
    if ((s = need(S, &e, 4, "the VAE encoder's conv_out", V "encoder.conv_out.weight"))) return s;
    if (e->shape[0] % 2) return bad_shape(S, e, "the encoder's conv_out gives mean and log-variance: an even width");
    c->latent_channels = (int)(e->shape[0] / 2);
    if ((s = need(S, &e, 4, "the VAE decoder's conv_out", V "decoder.conv_out.weight"))) return s;
    c->out_channels = (int)e->shape[0];
    return MS_OK;
}

/* ---- CLIP text encoder (HF CLIPTextModel under cond_stage_model.transformer.) ---- */
#define T "cond_stage_model.transformer.text_model."
static MsStatus infer_text(const Shapes *S, ClipTextConfig *c) {
    const MsShapeEntry *e;
    MsStatus s;
    ms_clip_text_config_sd15(c);
    if ((s = need(S, &e, 2, "the text encoder's token embedding", T "embeddings.token_embedding.weight"))) return s;
    c->vocab_size = (int)e->shape[0];
    c->hidden_size = c->projection_dim = (int)e->shape[1];
    if ((s = need(S, &e, 2, "the text encoder's position embedding", T "embeddings.position_embedding.weight")))
        return s;
    if (e->shape[1] != c->hidden_size) return bad_shape(S, e, "its width is not the token embedding's");
    c->max_position_embeddings = (int)e->shape[0];
    c->num_hidden_layers = count_seq(S, T "encoder.layers.%d.self_attn.q_proj.weight", 257);
    if (c->num_hidden_layers < 1 || c->num_hidden_layers > 256)
        return ms_errorf(MS_ERR_FORMAT, "%s: %d layers under '" T "encoder.layers.*' (expected 1..256; is '" T
                         "encoder.layers.0.self_attn.q_proj.weight' there?)", S->origin, c->num_hidden_layers);
    if ((s = need(S, &e, 2, "the text encoder's first MLP", T "encoder.layers.0.mlp.fc1.weight"))) return s;
    if (e->shape[1] != c->hidden_size) return bad_shape(S, e, "fc1 must read the embedding width");
    c->intermediate_size = (int)e->shape[0];
    return MS_OK;
}

/* mixshow's embedded test model (models/tiny-sd/{unet,vae,text_encoder}/config.json): shapes that
 * identify it, and the values its configs give that shapes cannot. */
static int is_tiny_sd(const UNetConfig *u, const VaeConfig *v, const ClipTextConfig *t) {
    static const int uc[4] = { 32, 64, 64, 64 }, vc[4] = { 32, 64, 64, 64 };
    if (u->n_blocks != 4 || v->n_blocks != 4 || u->layers_per_block != 2 || v->layers_per_block != 2) return 0;
    for (int i = 0; i < 4; i++)
        if (u->block_out_channels[i] != uc[i] || v->block_out_channels[i] != vc[i] ||
            u->transformer_layers_per_block[i] != 1)
            return 0;
    return u->cross_attention_dim == 32 && t->hidden_size == 32 && t->intermediate_size == 128 &&
           t->num_hidden_layers == 2 && t->vocab_size == 49408;
}

MsStatus ms_infer_ldm_configs(const MsShapeEntry *t, size_t n, const char *origin, MsModel *m, char *notes,
                              size_t cap) {
    Shapes S = { t, n, origin ? origin : "<single file>" };
    Notes N = { notes, cap, 0 };
    MsStatus s;
    int ctx = 0;
    char a[128], b[128];
    if (notes && cap) notes[0] = 0;
    if ((s = infer_unet(&S, &m->unet_config, &ctx))) return s;
    if ((s = infer_vae(&S, &m->vae_config))) return s;
    if ((s = infer_text(&S, &m->text_config))) return s;
    ms_scheduler_config_sd15(&m->scheduler_config);
    UNetConfig *u = &m->unet_config;
    VaeConfig *v = &m->vae_config;
    ClipTextConfig *c = &m->text_config;
    if (ctx != c->hidden_size)
        return ms_errorf(MS_ERR_SHAPE, "%s: the UNet's cross-attention reads %d-wide context (attn2.to_k.weight), "
                         "the text encoder is %d wide (token_embedding.weight): the parts do not belong together",
                         S.origin, ctx, c->hidden_size);

    /* what the shapes do not say */
    const int tiny = is_tiny_sd(u, v, c);
    int heads = tiny ? 2 : 8, ug = tiny ? 8 : 32, vg = tiny ? 8 : 32, th = c->hidden_size % 64 ? 0 : c->hidden_size / 64;
    if (tiny) th = 2;
    /* GroupNorm must divide every width it normalises (the up resnets' concatenations are sums of
     * these); heads must divide every width with attention */
    ug = fit_divisor(u->block_out_channels, u->n_blocks, ug);
    vg = fit_divisor(v->block_out_channels, v->n_blocks, vg);
    heads = fit_divisor(u->block_out_channels, u->n_blocks, heads);
    if (!th) th = fit_divisor(&c->hidden_size, 1, 8);
    u->norm_num_groups = ug;
    v->norm_num_groups = vg;
    for (int i = 0; i < u->n_blocks; i++) { u->attention_head_dim[i] = heads; u->num_attention_heads[i] = 0; }
    c->num_attention_heads = th;
    if (tiny) { u->sample_size = 8; v->sample_size = 64; }

    list_ints(a, sizeof a, u->block_out_channels, u->n_blocks);
    list_ints(b, sizeof b, v->block_out_channels, v->n_blocks);
    int depth = u->transformer_layers_per_block[0], mixed = 0;
    for (int i = 1; i < u->n_blocks; i++) mixed |= u->transformer_layers_per_block[i] != depth;
    note(&N, "no config: inferred from the weights: UNet widths %s, %d layers per block, transformer depth %d%s, "
         "cross-attention %d, %s proj_in, in/out channels %d/%d; VAE widths %s, %d layers, latent %d; text encoder "
         "width %d, MLP %d, %d layers, vocabulary %d, %d positions.\n", a, u->layers_per_block, depth,
         mixed ? " (varies per level)" : "", u->cross_attention_dim, u->use_linear_projection ? "Linear" : "1x1-conv",
         u->in_channels, u->out_channels, b, v->layers_per_block, v->latent_channels, c->hidden_size,
         c->intermediate_size, c->num_hidden_layers, c->vocab_size, c->max_position_embeddings);
    note(&N, "assumed (%s): UNet %d attention heads, GroupNorm %d groups%s%s; VAE GroupNorm %d, scaling 0.18215; "
         "text encoder %d heads, quick_gelu; scheduler of SD 1.5 (PNDM, scaled_linear 0.00085..0.012, 1000 steps); "
         "--config DIR overrides.\n", tiny ? "the shapes are mixshow's tiny-sd: its config.json values" :
         "SD 1.x convention", heads, ug, (!tiny && (heads != 8 || ug != 32)) ? " (reduced to divide the widths)" : "",
         tiny ? ", sample size 8" : "", vg, th);
    /* the checks of the config readers */
    if ((s = ms_unet_config_check(u)) || (s = ms_vae_config_check(v)) || (s = ms_clip_text_config_check(c))) {
        char msg[512];
        snprintf(msg, sizeof msg, "%s", ms_last_error());
        return ms_errorf(s, "%s: configs inferred from the weights: %s", S.origin, msg);
    }
    return MS_OK;
}
