/* tools/cmd_clip.c — `mixshow clip`: the paper's CLIP metrics with a real transformers CLIPModel
 * (e.g. openai/clip-vit-base-patch32 as save_pretrained writes it):
 *
 *   mixshow clip --clip DIR [--image FILE]... [--text PROMPT]... [--json]
 *
 * prints the cosine of every pair of image embeddings (image alignment: a generated image
 * against a concept's reference images) and of every image with every prompt (text alignment).
 * The embeddings are transformers' CLIPModel.get_image_features / get_text_features on
 * CLIPImageProcessor / CLIPTokenizer inputs (tools/clip_model.c; tests/test_clip_vision.c). */
#include "tools/tools.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static void clip_usage(FILE *f) {
    fprintf(f,
        "usage: mixshow clip --clip DIR [--image FILE]... [--text PROMPT]... [--json]\n\n"
        "CLIP image and text alignment (Mix-of-Show, Sec. 5) with a transformers CLIPModel folder:\n"
        "config.json, model.safetensors or pytorch_model.bin, preprocessor_config.json (optional: the\n"
        "CLIPImageProcessor defaults at the model's image_size), vocab.json + merges.txt (for --text).\n"
        "Prints cos(image_i, image_j) for every pair of images and cos(image_i, text_k) for every\n"
        "image and prompt (multiply by 100 and clip at 0 for the CLIPScore convention).\n\n"
        "  --clip DIR      the CLIPModel folder\n"
        "  --image FILE    a PNG or JPEG (repeatable)\n"
        "  --text PROMPT   a prompt (repeatable; tokenized to max_position_embeddings, truncated)\n"
        "  --json          the two matrices as JSON\n");
}

int cmd_clip(int argc, char **argv) {
    const char *dir = NULL;
    const char **img = (const char **)calloc((size_t)argc + 1, sizeof *img), **txt = (const char **)calloc((size_t)argc + 1, sizeof *txt);
    int ni = 0, nt = 0, json = 0, rc = 1;
    float *ie = NULL, *te = NULL;
    MsClip m;
    MsStatus s = MS_OK;
    memset(&m, 0, sizeof m);
    if (!img || !txt) { fprintf(stderr, "mixshow clip: out of memory\n"); goto done; }
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (!strcmp(a, "--help") || !strcmp(a, "-h")) { clip_usage(stdout); rc = 0; goto done; }
        else if (!strcmp(a, "--json")) json = 1;
        else if (i + 1 < argc && !strcmp(a, "--clip")) dir = argv[++i];
        else if (i + 1 < argc && !strcmp(a, "--image")) img[ni++] = argv[++i];
        else if (i + 1 < argc && !strcmp(a, "--text")) txt[nt++] = argv[++i];
        else { fprintf(stderr, "mixshow clip: unknown or incomplete option '%s'\n", a); clip_usage(stderr); rc = 2; goto done; }
    }
    if (!dir || !ni) { fprintf(stderr, "mixshow clip: --clip DIR and at least one --image are required\n"); clip_usage(stderr); rc = 2; goto done; }
    if ((s = ms_clip_load(dir, &m))) goto done;
    const int E = m.config.projection_dim;
    ie = (float *)malloc((size_t)ni * E * sizeof(float));
    te = (float *)malloc(((size_t)nt + 1) * E * sizeof(float));
    if (!ie || !te) { s = ms_errorf(MS_ERR_NOMEM, "mixshow clip: out of memory"); goto done; }
    for (int i = 0; i < ni && !s; i++) s = ms_clip_embed_image_file(&m, img[i], ie + (size_t)i * E);
    for (int k = 0; k < nt && !s; k++) s = ms_clip_embed_prompt(&m, txt[k], te + (size_t)k * E);
    if (s) goto done;
    if (json) {
        printf("{\"image_image\": [");
        for (int i = 0; i < ni; i++) {
            printf("%s[", i ? ", " : "");
            for (int j = 0; j < ni; j++) printf("%s%.7f", j ? ", " : "", ms_cosine(ie + (size_t)i * E, ie + (size_t)j * E, E));
            printf("]");
        }
        printf("], \"image_text\": [");
        for (int i = 0; i < ni; i++) {
            printf("%s[", i ? ", " : "");
            for (int k = 0; k < nt; k++) printf("%s%.7f", k ? ", " : "", ms_cosine(ie + (size_t)i * E, te + (size_t)k * E, E));
            printf("]");
        }
        printf("]}\n");
    } else {
        for (int i = 0; i < ni; i++)
            for (int j = i + 1; j < ni; j++)
                printf("image-image %.7f  %s  %s\n", ms_cosine(ie + (size_t)i * E, ie + (size_t)j * E, E), img[i], img[j]);
        for (int i = 0; i < ni; i++)
            for (int k = 0; k < nt; k++)
                printf("image-text  %.7f  %s  \"%s\"\n", ms_cosine(ie + (size_t)i * E, te + (size_t)k * E, E), img[i], txt[k]);
    }
    rc = 0;
done:
    if (s) fprintf(stderr, "mixshow clip: %s\n", ms_last_error());
    free(ie); free(te); free(img); free(txt);
    ms_clip_free(&m);
    return rc;
}
