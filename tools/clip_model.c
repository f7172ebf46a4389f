/* tools/clip_model.c — a transformers CLIPModel folder (config.json, model.safetensors or
 * pytorch_model.bin, preprocessor_config.json, vocab.json + merges.txt) as the paper's metric
 * uses it: image embeddings (CLIPImageProcessor, then the image tower) and text embeddings
 * (CLIPTokenizer, then the text tower's pooled output and projection). Image alignment is the
 * cosine of two image embeddings, text alignment that of an image and a prompt embedding.
 *
 * CLIPImageProcessor (transformers 4.26-4.31 image_processing_clip.py, image_transforms.py):
 *   convert to RGB; resize so the shortest edge is `size` (long edge int(size * long / short))
 *   with PIL (BICUBIC by default, Pillow's 8-bit fixed-point resampler, bit-exact); centre crop
 *   top = (h - crop_h) // 2, left = (w - crop_w) // 2; rescale: float32(uint8 * rescale_factor)
 *   computed in float64 (numpy promotes); normalize: (x - mean) / std in float32; to (3, H, W).
 * Checked against transformers on random weights: tests/test_clip_vision.c. */
#include "tools/tools.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

void ms_clip_processor_default(ClipImageProcessor *p, int size) {
    static const double mean[3] = { 0.48145466, 0.4578275, 0.40821073 };   /* OPENAI_CLIP_MEAN */
    static const double stdv[3] = { 0.26862954, 0.26130258, 0.27577711 };  /* OPENAI_CLIP_STD */
    memset(p, 0, sizeof *p);
    p->do_resize = p->do_center_crop = p->do_rescale = p->do_normalize = 1;
    p->shortest_edge = p->crop_h = p->crop_w = size;
    p->resample = PIL_BICUBIC;
    p->rescale_factor = 1.0 / 255;
    memcpy(p->mean, mean, sizeof mean);
    memcpy(p->std, stdv, sizeof stdv);
}

/* key: an integer n or an object {sub_a: .., sub_b: ..}; for size, {"shortest_edge": n}. */
static MsStatus pp_size(const JsonValue *j, const char *key, const char *sub_a, const char *sub_b, int *a, int *b) {
    const JsonValue *v = json_get(j, key);
    int64_t x, y;
    if (!v || v->type == JSON_NULL) return MS_OK;
    if (v->type == JSON_NUMBER && (x = json_get_int(j, key, -1)) > 0 && x <= MS_IMAGE_MAX_DIM) { *a = *b = (int)x; return MS_OK; }
    x = json_get_int(v, sub_a, -1);
    y = sub_b ? json_get_int(v, sub_b, -1) : x;
    if (v->type == JSON_OBJECT && x > 0 && y > 0 && x <= MS_IMAGE_MAX_DIM && y <= MS_IMAGE_MAX_DIM &&
        json_len(v) == (sub_b ? 2u : 1u)) {
        *a = (int)x; *b = (int)y;
        return MS_OK;
    }
    return ms_errorf(MS_ERR_UNSUPPORTED, "%s:%d:%d: key '%s': expected a positive integer or {\"%s\"%s%s%s: n}",
                     v->origin ? v->origin : "<json>", v->line, v->col, key, sub_a, sub_b ? ", \"" : "",
                     sub_b ? sub_b : "", sub_b ? "\"" : "");
}

/* image_mean / image_std: 3 numbers or one (applied to every channel) */
static MsStatus pp_triple(const JsonValue *j, const char *key, double *out) {
    const JsonValue *v = json_get(j, key);
    if (!v || v->type == JSON_NULL) return MS_OK;
    if (v->type == JSON_NUMBER) { out[0] = out[1] = out[2] = v->number; return MS_OK; }
    if (v->type == JSON_ARRAY && json_len(v) == 3) {
        for (size_t i = 0; i < 3; i++) {
            const JsonValue *e = json_at(v, i);
            if (e->type != JSON_NUMBER) break;
            out[i] = e->number;
            if (i == 2) return MS_OK;
        }
    }
    return ms_errorf(MS_ERR_FORMAT, "%s:%d:%d: key '%s': expected 3 numbers", v->origin ? v->origin : "<json>",
                     v->line, v->col, key);
}

MsStatus ms_clip_processor_from_json(const JsonValue *j, ClipImageProcessor *p, int image_size) {
    MsStatus s;
    int dummy;
    ms_clip_processor_default(p, image_size);
    if (!j || j->type != JSON_OBJECT) return ms_errorf(MS_ERR_FORMAT, "preprocessor config: expected a JSON object");
    const JsonValue *sz = json_get(j, "size");
    if (sz && sz->type == JSON_OBJECT && !json_get(sz, "shortest_edge"))
        return ms_errorf(MS_ERR_UNSUPPORTED, "%s:%d:%d: key 'size': CLIPImageProcessor needs 'shortest_edge'",
                         sz->origin ? sz->origin : "<json>", sz->line, sz->col);
    if ((s = pp_size(j, "size", "shortest_edge", NULL, &p->shortest_edge, &dummy)) ||
        (s = pp_size(j, "crop_size", "height", "width", &p->crop_h, &p->crop_w)) ||
        (s = pp_triple(j, "image_mean", p->mean)) || (s = pp_triple(j, "image_std", p->std)))
        return s;
    p->do_resize = json_get_bool(j, "do_resize", 1);
    p->do_center_crop = json_get_bool(j, "do_center_crop", 1);
    p->do_rescale = json_get_bool(j, "do_rescale", 1);
    p->do_normalize = json_get_bool(j, "do_normalize", 1);
    p->rescale_factor = json_get_number(j, "rescale_factor", 1.0 / 255);
    int64_t r = json_get_int(j, "resample", PIL_BICUBIC);
    if (r < 0 || r > 3) return ms_errorf(MS_ERR_UNSUPPORTED, "preprocessor config: resample %lld (supported: 0 nearest, "
                                         "1 lanczos, 2 bilinear, 3 bicubic)", (long long)r);
    p->resample = (int)r;
    for (int c = 0; c < 3; c++)
        if (!(p->std[c] != 0.0)) return ms_errorf(MS_ERR_FORMAT, "preprocessor config: image_std[%d] is 0", c);
    return MS_OK;
}

MsStatus ms_clip_preprocess(float *pixels, int S, const MsImage *img, const ClipImageProcessor *p) {
    MsStatus s;
    if (img->channels != 3 || img->depth != 8)
        return ms_errorf(MS_ERR_ARG, "CLIP preprocessing: expected 8-bit RGB, got %d channels of %d bits (read it "
                         "with 3 channels)", img->channels, img->depth);
    int w = img->w, h = img->h;
    const uint8_t *src = (const uint8_t *)img->data;
    uint8_t *res = NULL;
    if (p->do_resize) {                                     /* get_resize_output_image_size, PIL resize */
        int ow, oh;
        if ((s = tv_resize_size(w, h, p->shortest_edge, 0, &ow, &oh))) return s;
        if (!(res = (uint8_t *)malloc((size_t)ow * oh * 3)))
            return ms_errorf(MS_ERR_NOMEM, "CLIP preprocessing: out of memory (%dx%d)", ow, oh);
        if ((s = pil_resize(res, ow, oh, src, w, h, 3, p->resample))) { free(res); return s; }
        src = res; w = ow; h = oh;
    }
    int ch = p->do_center_crop ? p->crop_h : h, cw = p->do_center_crop ? p->crop_w : w;
    if (ch > h || cw > w || ch != S || cw != S) {
        free(res);
        return ms_errorf(MS_ERR_UNSUPPORTED, "CLIP preprocessing: a %dx%d crop of a %dx%d image for a model of image_size "
                         "%d (the crop must fit in the resized image and equal image_size)", cw, ch, w, h, S);
    }
    const int top = (h - ch) / 2, left = (w - cw) / 2;      /* both >= 0: // of Python */
    for (int c = 0; c < 3; c++) {
        const float mean = (float)p->mean[c], sd = (float)p->std[c];
        for (int y = 0; y < S; y++)
            for (int x = 0; x < S; x++) {
                uint8_t v = src[((size_t)(y + top) * w + x + left) * 3 + c];
                float f = p->do_rescale ? (float)((double)v * p->rescale_factor) : (float)v;
                pixels[((size_t)c * S + y) * S + x] = p->do_normalize ? (f - mean) / sd : f;
            }
    }
    free(res);
    return MS_OK;
}

void ms_clip_free(MsClip *m) {
    ms_param_table_free(&m->table);
    if (m->has_tokenizer) clip_tokenizer_free(&m->tok);
    memset(m, 0, sizeof *m);
}

MsStatus ms_clip_load(const char *dir, MsClip *m) {
    static const char *const names[] = { "model.safetensors", "pytorch_model.bin" };
    char path[2048];
    JsonValue *j = NULL;
    MsStatus s;
    memset(m, 0, sizeof *m);
    snprintf(path, sizeof path, "%s/config.json", dir);
    if ((s = json_parse_file(path, &j))) return s;
    s = ms_clip_model_config_from_json(j, &m->config);
    json_free(j); j = NULL;
    if (s) return s;
    snprintf(path, sizeof path, "%s/preprocessor_config.json", dir);
    FILE *f = fopen(path, "rb");
    if (f) {
        fclose(f);
        if ((s = json_parse_file(path, &j))) return s;
        s = ms_clip_processor_from_json(j, &m->proc, m->config.vision.image_size);
        json_free(j);
        if (s) return s;
    } else {
        ms_clip_processor_default(&m->proc, m->config.vision.image_size);
    }
    size_t k = 0;
    for (; k < sizeof names / sizeof names[0]; k++) {
        snprintf(path, sizeof path, "%s/%s", dir, names[k]);
        if ((f = fopen(path, "rb"))) { fclose(f); break; }
    }
    if (k == sizeof names / sizeof names[0])
        return ms_errorf(MS_ERR_IO, "%s: no model.safetensors or pytorch_model.bin", dir);
    if ((s = ms_param_table_clip(&m->config, &m->table))) return s;
    if ((s = ms_table_fill_file(&m->table, path, 0, "CLIPModel", NULL)) ||
        (s = clip_vision_params(&m->vision, &m->table, &m->config)) ||
        (s = clip_text_params(&m->text, &m->table, &m->config.text))) {
        ms_clip_free(m);
        return s;
    }
    m->text_proj = &m->table.p[ms_param_find(&m->table, "text_projection.weight")];
    snprintf(path, sizeof path, "%s/vocab.json", dir);
    if ((f = fopen(path, "rb"))) {
        fclose(f);
        if ((s = ms_clip_tokenizer_load(dir, &m->tok))) { ms_clip_free(m); return s; }
        m->has_tokenizer = 1;
    }
    return MS_OK;
}

MsStatus ms_clip_image_embeds(const MsClip *m, const float *pixels, int B, float *embeds) {
    Arena ar;
    ClipVisionActs a;
    MsStatus s = arena_init(&ar, clip_vision_sizes(&m->config, B));
    if (s) return s;
    if (!(s = clip_vision_acts_alloc(&a, &ar, &m->config, B)) && !(s = clip_vision_forward(&a, &m->vision, pixels, &m->config)))
        memcpy(embeds, a.embeds, (size_t)B * m->config.projection_dim * sizeof(float));
    arena_free(&ar);
    return s;
}

MsStatus ms_clip_text_embeds(const MsClip *m, const int32_t *ids, int B, int T, float *embeds) {
    Arena ar;
    ClipTextActs a;
    MsStatus s = arena_init(&ar, clip_text_sizes(&m->config.text, B, T, 0, CLIP_INFER));
    if (s) return s;
    if (!(s = clip_text_acts_alloc(&a, &ar, &m->config.text, B, T, 0, CLIP_INFER)) &&
        !(s = clip_text_forward(&a, &m->text, NULL, ids, NULL, 0, &m->config.text)))
        s = clip_text_project(NULL, embeds, &a, m->text_proj, ids, &m->config);
    arena_free(&ar);
    return s;
}

MsStatus ms_clip_embed_image_file(const MsClip *m, const char *path, float *embed) {
    MsImage img;
    const int S = m->config.vision.image_size;
    MsStatus s = ms_image_read(path, 3, &img);
    if (s) return s;
    float *px = (float *)malloc((size_t)3 * S * S * sizeof(float));
    if (!px) { ms_image_free(&img); return ms_errorf(MS_ERR_NOMEM, "%s: out of memory", path); }
    if (!(s = ms_clip_preprocess(px, S, &img, &m->proc))) s = ms_clip_image_embeds(m, px, 1, embed);
    free(px);
    ms_image_free(&img);
    return s;
}

MsStatus ms_clip_embed_prompt(const MsClip *m, const char *prompt, float *embed) {
    const int T = m->config.text.max_position_embeddings;
    if (!m->has_tokenizer) return ms_errorf(MS_ERR_ARG, "CLIP model: no vocab.json / merges.txt in its folder");
    int32_t *ids = (int32_t *)malloc((size_t)T * sizeof *ids);
    if (!ids) return ms_errorf(MS_ERR_NOMEM, "CLIP text: out of memory");
    MsStatus s = clip_tokenize(&m->tok, prompt, strlen(prompt), ids, T);
    if (!s) s = ms_clip_text_embeds(m, ids, 1, T, embed);
    free(ids);
    return s;
}

double ms_cosine(const float *a, const float *b, int n) {
    double ab = 0.0, aa = 0.0, bb = 0.0;
    for (int i = 0; i < n; i++) { ab += (double)a[i] * b[i]; aa += (double)a[i] * a[i]; bb += (double)b[i] * b[i]; }
    return aa > 0.0 && bb > 0.0 ? ab / sqrt(aa * bb) : 0.0;
}
