/* tools/cmd_world.c — `mixshow world`: writes the procedural world of issue 15 (tools/world.c). */
#include "tools/tools.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static void world_usage(FILE *f) {
    fprintf(f,
        "usage: mixshow world --out DIR --n N --seed S [--size 64|128] [--characters K] [--per-character P]\n"
        "\n"
        "Writes a deterministic synthetic dataset (the same bytes for the same options on every platform):\n"
        "  DIR/scenes/{image,mask,pose,sketch}/NNNNNN.png, scenes/caption/NNNNNN.txt\n"
        "        N scenes: backgrounds (sky, grass, brick wall, water, plain, gradient, noise) with one\n"
        "        or two groups of shapes; captions from the scene graph (\"two red circles on the left\n"
        "        of a blue striped square, on grass\"); masks of the objects; keypose-like and\n"
        "        sketch-like conditions from the geometry\n"
        "  DIR/characters/<name>/{image,caption,mask,pose,sketch}/<name>_KK.png|.txt\n"
        "        K creatures (default 3), P images each (default 8, 5..10): poses, scales, positions,\n"
        "        backgrounds; captions \"<TOK>, waving, walking, facing left, on grass\"; exact masks\n"
        "  DIR/data_cfgs/<name>.json           official concept list (LoraDataset)\n"
        "  DIR/options/<name>.yml              training options derived from the official 8101 file;\n"
        "                                      set the base model: --set models.pretrained_path=DIR\n"
        "  DIR/validation_prompts/<name>.txt   val_vis prompts\n"
        "  DIR/multi/M.png, M_pose.png, M_sketch.png, M.txt   2-3 creatures with boxes (K >= 2)\n"
        "  DIR/contact_sheet.png, DIR/characters_sheet.png\n"
        "Paths inside the JSON/yml files start with DIR as given: train from the same directory.\n");
}

static int parse_int(const char *s, const char *what, long long lo, long long hi, long long *v) {
    char *end;
    long long x = strtoll(s, &end, 10);
    if (!*s || *end || x < lo || x > hi) {
        fprintf(stderr, "mixshow world: %s '%s': expected an integer in %lld..%lld\n", what, s, lo, hi);
        return 0;
    }
    *v = x;
    return 1;
}

int cmd_world(int argc, char **argv) {
    WorldOptions o;
    long long v;
    memset(&o, 0, sizeof o);
    o.n = -1; o.size = 64; o.characters = 3; o.per_character = 8; o.progress = 1;
    int have_seed = 0;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (!strcmp(a, "--help") || !strcmp(a, "-h")) { world_usage(stdout); return 0; }
        if (i + 1 >= argc) { fprintf(stderr, "mixshow world: %s needs a value (or unknown option)\n", a); world_usage(stderr); return 2; }
        const char *val = argv[++i];
        if (!strcmp(a, "--out")) o.out = val;
        else if (!strcmp(a, "--n")) { if (!parse_int(val, a, 0, 1000000, &v)) return 2; o.n = (int)v; }
        else if (!strcmp(a, "--seed")) {
            char *end;
            unsigned long long s = strtoull(val, &end, 10);
            if (!*val || *end || val[0] == '-') { fprintf(stderr, "mixshow world: --seed '%s': expected an integer >= 0\n", val); return 2; }
            o.seed = (uint64_t)s; have_seed = 1;
        }
        else if (!strcmp(a, "--size")) { if (!parse_int(val, a, 64, 128, &v)) return 2; o.size = (int)v; }
        else if (!strcmp(a, "--characters")) { if (!parse_int(val, a, 0, WORLD_MAX_CHARACTERS, &v)) return 2; o.characters = (int)v; }
        else if (!strcmp(a, "--per-character")) { if (!parse_int(val, a, 5, 10, &v)) return 2; o.per_character = (int)v; }
        else { fprintf(stderr, "mixshow world: unknown option '%s'\n", a); world_usage(stderr); return 2; }
    }
    if (!o.out || o.n < 0 || !have_seed) { fprintf(stderr, "mixshow world: --out, --n and --seed are required\n"); world_usage(stderr); return 2; }
    MsStatus st = world_generate(&o);
    if (st != MS_OK) { fprintf(stderr, "mixshow world: %s\n", ms_last_error()); return 1; }
    printf("mixshow world: %d scenes, %d characters x %d images at %dx%d in %s\n", o.n, o.characters, o.per_character,
           o.size, o.size, o.out);
    return 0;
}
