/* tests/test_world.c — the procedural world (tools/world.c, `mixshow world`; issue 15):
 * determinism (same seed twice -> the same bytes, a pinned hash of a small dataset), captions
 * (UTF-8, and they name what the scene graph holds: counts, sizes, colours, patterns, shapes,
 * relations, backgrounds, checked with this file's own word lists), the scene graph against
 * the pixels (objects where the graph says, relations true in the geometry), masks equal to the
 * character pixels exactly (two renders on different plain backgrounds differ exactly off the
 * mask), and the written concept list + .yml loading through train_config_load and
 * train_dataset_open with the tiny model. */
#include "tests/test.h"
#include "tools/tools.h"

#include <stdint.h>

/* the two dataset folders (test_tmp names, set in main) */
static char OUT_A[512], OUT_B[512];
enum { N_SCENES = 10, N_CHARS = 3, PER_CHAR = 5, SEED = 7 };

static uint64_t fnv(uint64_t h, const void *p, size_t n) {
    const unsigned char *b = (const unsigned char *)p;
    for (size_t i = 0; i < n; i++) { h ^= b[i]; h *= 0x100000001B3u; }
    return h;
}

static unsigned char *slurp(const char *path, size_t *n) {
    FILE *f = fopen(path, "rb");
    if (!f) return NULL;
    size_t cap = 1 << 16, len = 0;
    unsigned char *b = (unsigned char *)malloc(cap);
    for (;;) {
        if (len == cap) { cap *= 2; b = (unsigned char *)realloc(b, cap); }
        size_t k = fread(b + len, 1, cap - len, f);
        if (k == 0) break;
        len += k;
    }
    fclose(f);
    *n = len;
    return b;
}

/* Every file the dataset has, relative to its folder. with_cfg 0 leaves out the files that
 * embed the output path (concept lists, .yml). Returns the count (names into out). */
static int list_files(char (*out)[160], int cap, int with_cfg) {
    static const char *const subs[5] = { "image", "caption", "mask", "pose", "sketch" };
    int n = 0;
    for (int i = 0; i < N_SCENES; i++)
        for (int k = 0; k < 5 && n < cap; k++) snprintf(out[n++], 160, "scenes/%s/%06d.%s", subs[k], i, k == 1 ? "txt" : "png");
    for (int c = 0; c < N_CHARS; c++) {
        WorldCharacter ch;
        world_character_make(SEED, c, &ch);
        for (int i = 0; i < PER_CHAR; i++)
            for (int k = 0; k < 5 && n < cap; k++)
                snprintf(out[n++], 160, "characters/%s/%s/%s_%02d.%s", ch.name, subs[k], ch.name, i, k == 1 ? "txt" : "png");
        if (with_cfg && n + 3 <= cap) {
            snprintf(out[n++], 160, "data_cfgs/%s.json", ch.name);
            snprintf(out[n++], 160, "options/%s.yml", ch.name);
            snprintf(out[n++], 160, "validation_prompts/%s.txt", ch.name);
        }
    }
    for (int m = 0; m < 4 && n + 4 <= cap; m++) {
        snprintf(out[n++], 160, "multi/%d.png", m);
        snprintf(out[n++], 160, "multi/%d_pose.png", m);
        snprintf(out[n++], 160, "multi/%d_sketch.png", m);
        snprintf(out[n++], 160, "multi/%d.txt", m);
    }
    if (n + 2 <= cap) { snprintf(out[n++], 160, "contact_sheet.png"); snprintf(out[n++], 160, "characters_sheet.png"); }
    return n;
}

/* FNV-1a over (name, size, bytes) of every listed file; 0 when one is missing. */
static uint64_t hash_dataset(const char *dir, int with_cfg) {
    static char names[512][160];
    int n = list_files(names, 512, with_cfg);
    uint64_t h = 0xcbf29ce484222325u;
    for (int i = 0; i < n; i++) {
        char p[600];
        size_t len;
        snprintf(p, sizeof p, "%.300s/%.159s", dir, names[i]);
        unsigned char *b = slurp(p, &len);
        if (!b) { printf("      missing %s\n", p); return 0; }
        uint64_t l = len;
        h = fnv(h, names[i], strlen(names[i]));
        h = fnv(h, &l, sizeof l);
        h = fnv(h, b, len);
        free(b);
    }
    return h;
}

static void test_determinism(void) {
    WorldOptions o;
    memset(&o, 0, sizeof o);
    o.out = OUT_A; o.n = N_SCENES; o.seed = SEED; o.size = 64; o.characters = N_CHARS; o.per_character = PER_CHAR;
    if (!check(world_generate(&o) == MS_OK, "world_generate %s: %s", OUT_A, ms_last_error())) return;
    uint64_t a1 = hash_dataset(OUT_A, 1), p1 = hash_dataset(OUT_A, 0);
    check(world_generate(&o) == MS_OK, "world_generate again");
    uint64_t a2 = hash_dataset(OUT_A, 1);
    o.out = OUT_B;
    check(world_generate(&o) == MS_OK, "world_generate %s", OUT_B);
    uint64_t p2 = hash_dataset(OUT_B, 0);
    check(a1 != 0 && a1 == a2, "same seed, same folder: identical bytes (%016llx)", (unsigned long long)a1);
    check(p1 != 0 && p1 == p2, "same seed, another folder: identical images/captions/masks/conditions");
    /* Pinned: any change to the world's geometry, palette, words or PNG encoder moves it (then
     * look at the contact sheets and re-pin on purpose). */
    const uint64_t golden = 0xed0c546dc760d04bull;
    check(p1 == golden, "golden hash of the %d-scene, %dx%d-character dataset: %016llx (pinned %016llx)", N_SCENES,
          N_CHARS, PER_CHAR, (unsigned long long)p1, (unsigned long long)golden);
    o.out = OUT_B; o.seed = SEED + 1;
    check(world_generate(&o) == MS_OK && hash_dataset(OUT_B, 0) != p1, "another seed: other bytes");
    /* files appear whole: no .tmp left behind */
    char tmpname[600];
    snprintf(tmpname, sizeof tmpname, "%s/scenes/image/000000.png.tmp", OUT_A);
    FILE *f = fopen(tmpname, "rb");
    check(!f, "no temporary files left");
    if (f) fclose(f);
}

/* ---- captions against the scene graph, with this test's own vocabulary ---- */
static int has_word(const char *cap, const char *w) {              /* whole words */
    size_t n = strlen(w);
    for (const char *p = cap; (p = strstr(p, w)) != NULL; p++) {
        int before = p == cap || p[-1] == ' ', after = p[n] == '\0' || p[n] == ' ' || p[n] == ',';
        if (before && after) return 1;
    }
    return 0;
}
static int has_any(const char *cap, const char *const *ws) {
    for (; *ws; ws++) if (has_word(cap, *ws)) return 1;
    return 0;
}

static const char *const *colour_words(int c) {
    static const char *const w[WORLD_COLOURS][3] = {
        { "red", NULL }, { "orange", NULL }, { "yellow", NULL }, { "green", NULL }, { "blue", NULL },
        { "purple", "violet", NULL }, { "pink", NULL }, { "white", NULL }, { "black", NULL }, { "brown", NULL },
        { "grey", "gray", NULL } };
    return w[c];
}
static const char *const *shape_words(int s, int plural) {
    static const char *const sing[WORLD_SHAPES][4] = {
        { "circle", "disc", "disk", NULL }, { "square", "block", NULL }, { "triangle", NULL }, { "diamond", "rhombus", NULL },
        { "star", NULL }, { "cross", "plus sign", NULL } };
    static const char *const plur[WORLD_SHAPES][4] = {
        { "circles", "discs", "disks", NULL }, { "squares", "blocks", NULL }, { "triangles", NULL },
        { "diamonds", "rhombuses", NULL }, { "stars", NULL }, { "crosses", "plus signs", NULL } };
    return plural ? plur[s] : sing[s];
}

static int valid_utf8(const char *s) {
    const unsigned char *p = (const unsigned char *)s;
    while (*p) {
        int n = *p < 0x80 ? 0 : (*p & 0xE0) == 0xC0 ? 1 : (*p & 0xF0) == 0xE0 ? 2 : (*p & 0xF8) == 0xF0 ? 3 : -1;
        if (n < 0) return 0;
        p++;
        for (int k = 0; k < n; k++, p++) if ((*p & 0xC0) != 0x80) return 0;
    }
    return 1;
}

static int caption_matches(const WorldScene *s, const char *cap, char *why, size_t wc) {
    static const char *const counts[4][3] = { { NULL }, { "a", "an", "one" }, { "two", "pair", NULL }, { "three", NULL } };
    static const char *const small[] = { "small", "little", "tiny", NULL }, *const large[] = { "large", "big", NULL };
    static const char *const striped[] = { "striped", "stripes", NULL }, *const dotted[] = { "dotted", "spotted", "polka-dot", "dots", "spots", NULL };
    for (int g = 0; g < s->n_groups; g++) {
        const WorldGroup *gr = &s->g[g];
        const char *const cw[4] = { counts[gr->count][0], counts[gr->count][1], counts[gr->count][2], NULL };
        if (!has_any(cap, cw)) { snprintf(why, wc, "group %d: count %d not named", g, gr->count); return 0; }
        if (!has_any(cap, colour_words(gr->colour))) { snprintf(why, wc, "group %d: colour %s", g, world_colour_name(gr->colour)); return 0; }
        if (!has_any(cap, shape_words(gr->shape, gr->count > 1))) {
            snprintf(why, wc, "group %d: %s %s", g, world_shape_name(gr->shape), gr->count > 1 ? "(plural)" : ""); return 0;
        }
        if (gr->size == 0 && !has_any(cap, small)) { snprintf(why, wc, "group %d: small", g); return 0; }
        if (gr->size == 2 && !has_any(cap, large)) { snprintf(why, wc, "group %d: large", g); return 0; }
        if (gr->pattern == 1 && !has_any(cap, striped)) { snprintf(why, wc, "group %d: striped", g); return 0; }
        if (gr->pattern == 2 && !has_any(cap, dotted)) { snprintf(why, wc, "group %d: dotted", g); return 0; }
    }
    if (s->n_groups == 2) {
        static const char *const horiz[] = { "left", "right", NULL }, *const vert[] = { "above", "over", "below", "under", "beneath", NULL };
        if (!has_any(cap, s->relation < 2 ? horiz : vert)) { snprintf(why, wc, "relation %s", world_relation_name(s->relation)); return 0; }
    }
    static const char *const bgw[5][5] = { { "sky", NULL }, { "grass", "lawn", NULL }, { "brick", NULL }, { "water", "sea", NULL },
                                           { "background", NULL } };
    const char *const *bw = s->bg.kind < 5 ? bgw[s->bg.kind] : NULL;
    if (s->bg.kind == WBG_GRADIENT) { static const char *const gw[] = { "gradient", NULL }; bw = gw; }
    if (s->bg.kind == WBG_NOISE) { static const char *const nw[] = { "texture", NULL }; bw = nw; }
    if (!has_any(cap, bw)) { snprintf(why, wc, "background %s", world_background_name(s->bg.kind)); return 0; }
    if (s->bg.kind >= WBG_PLAIN && !has_any(cap, colour_words(s->bg.colour_a))) { snprintf(why, wc, "background colour"); return 0; }
    return 1;
}

static void test_captions_and_geometry(void) {
    int bad_utf8 = 0, bad_words = 0, bad_geom = 0, n = 400, shapes[WORLD_SHAPES] = { 0 }, bgs[WORLD_BACKGROUNDS] = { 0 };
    int counts[4] = { 0 }, two = 0;
    char cap[1024], why[160];
    uint8_t *mask = (uint8_t *)malloc(64 * 64);
    for (int i = 0; i < n; i++) {
        WorldScene s;
        world_scene_make(SEED, i, &s);
        if (world_caption(SEED, i, &s, cap, sizeof cap) != MS_OK) { bad_words++; continue; }
        bad_utf8 += !valid_utf8(cap);
        if (!caption_matches(&s, cap, why, sizeof why)) {
            if (bad_words++ < 5) printf("      scene %d: '%s': %s\n", i, cap, why);
        }
        bgs[s.bg.kind]++;
        two += s.n_groups == 2;
        /* geometry: inside the image, the mask set at each object's centre, relations true */
        world_render(&s, 64, NULL, mask, NULL, NULL);
        for (int g = 0; g < s.n_groups; g++) {
            counts[s.g[g].count]++;
            shapes[s.g[g].shape]++;
            for (int k = 0; k < s.g[g].count; k++) {
                int x = s.g[g].x[k], y = s.g[g].y[k], r = s.g[g].r[k];
                if (x - r < 0 || x + r > 1024 || y - r < 0 || y + r > 1024 || !mask[(y * 64 / 1024) * 64 + x * 64 / 1024]) {
                    if (bad_geom++ < 5) printf("      scene %d: object %d.%d at (%d,%d) r %d not drawn inside\n", i, g, k, x, y, r);
                }
                if (s.n_groups == 2 && g == 0)
                    for (int j = 0; j < s.g[1].count; j++) {
                        int dx = s.g[1].x[j] - x, dy = s.g[1].y[j] - y;
                        int ok = s.relation == WREL_LEFT_OF ? dx > 0 : s.relation == WREL_RIGHT_OF ? dx < 0 : s.relation == WREL_ABOVE ? dy > 0 : dy < 0;
                        if (!ok && bad_geom++ < 5) printf("      scene %d: relation %s false\n", i, world_relation_name(s.relation));
                    }
            }
        }
    }
    free(mask);
    check(bad_utf8 == 0, "%d captions are UTF-8", n);
    check(bad_words == 0, "%d captions name count, size, colour, pattern, shape, relation, background (%d do not)", n, bad_words);
    check(bad_geom == 0, "objects inside the image and on the mask; relations hold in the geometry (%d failures)", bad_geom);
    int all = 1;
    for (int k = 0; k < WORLD_SHAPES; k++) all &= shapes[k] > 0;
    for (int k = 0; k < WORLD_BACKGROUNDS; k++) all &= bgs[k] > 0;
    check(all && counts[1] && counts[2] && counts[3] && two > n / 4 && two < n * 3 / 4,
          "variety: every shape and background, counts 1-3, %d of %d scenes with two groups", two, n);
    /* word variety: the same scene graph, different seeds -> different phrasings */
    WorldScene s;
    char c2[1024];
    world_scene_make(SEED, 3, &s);
    world_caption(SEED, 3, &s, cap, sizeof cap);
    int differ = 0;
    for (int k = 1; k < 20; k++) { world_caption(SEED + (uint64_t)k, 3, &s, c2, sizeof c2); differ += strcmp(cap, c2) != 0; }
    check(differ >= 10, "the same scene worded differently under other seeds (%d of 19)", differ);
    check(world_caption(SEED, 3, &s, c2, 10) == MS_ERR_ARG, "caption longer than the buffer: error");
}

/* Masks: every character image rendered on two plain backgrounds of colours the character does
 * not use; pixels that differ are exactly the ones off the mask. */
static void test_masks(void) {
    int bad = 0, checked = 0;
    size_t n = 64 * 64;
    uint8_t *a = (uint8_t *)malloc(n * 3), *b = (uint8_t *)malloc(n * 3), *m = (uint8_t *)malloc(n), *m2 = (uint8_t *)malloc(n);
    for (int c = 0; c < 6; c++) {
        WorldCharacter ch;
        world_character_make(SEED, c, &ch);
        for (int i = 0; i < 10; i++) {
            WorldScene s;
            world_character_scene(SEED, &ch, c, i, &s);
            world_render(&s, 64, a, m, NULL, NULL);
            size_t on = 0;
            for (size_t k = 0; k < n; k++) on += m[k] == 255;
            if (on < 20 || on > n / 2) { bad++; printf("      character %d image %d: %zu mask pixels\n", c, i, on); }
            s.bg.kind = WBG_PLAIN;
            int used[3] = { ch.body_colour, ch.limb_colour, ch.marking_colour }, pick[2], np = 0;
            for (int col = 0; col < WORLD_COLOURS && np < 2; col++)
                if (col != used[0] && col != used[1] && col != used[2] && col != 7 && col != 8) pick[np++] = col;
            s.bg.colour_a = pick[0];
            world_render(&s, 64, a, m, NULL, NULL);
            s.bg.colour_a = pick[1];
            world_render(&s, 64, b, m2, NULL, NULL);
            for (size_t k = 0; k < n; k++) {
                int same = !memcmp(a + 3 * k, b + 3 * k, 3);
                if ((m[k] == 255) != same || m[k] != m2[k] || (m[k] != 0 && m[k] != 255)) { bad++; break; }
            }
            checked++;
        }
    }
    check(bad == 0, "character masks == the character's pixels exactly (%d images, 6 characters)", checked);
    /* scenes without characters: the mask is the objects' pixels */
    int sbad = 0;
    for (int i = 0; i < 30; i++) {
        WorldScene s;
        world_scene_make(SEED, i, &s);
        s.bg.kind = WBG_PLAIN;
        s.bg.colour_a = 11 - 1;                       /* try grey, else another colour no object uses */
        for (int col = 0; col < WORLD_COLOURS; col++) {
            int clash = 0;
            for (int g = 0; g < s.n_groups; g++) clash |= s.g[g].colour == col || col == 7 || col == 8;
            if (!clash) { s.bg.colour_a = col; break; }
        }
        world_render(&s, 64, a, m, NULL, NULL);
        int c0 = s.bg.colour_a;
        for (int col = c0 + 1; col < WORLD_COLOURS; col++) {
            int clash = 0;
            for (int g = 0; g < s.n_groups; g++) clash |= s.g[g].colour == col || col == 7 || col == 8;
            if (!clash) { s.bg.colour_a = col; break; }
        }
        world_render(&s, 64, b, m2, NULL, NULL);
        for (size_t k = 0; k < n; k++)
            if ((m[k] == 255) != !memcmp(a + 3 * k, b + 3 * k, 3)) { sbad++; break; }
    }
    check(sbad == 0, "scene masks == the objects' pixels exactly (30 scenes)");
    /* 128 pixels: the same geometry, about 4x the mask pixels */
    WorldCharacter ch;
    WorldScene s;
    world_character_make(SEED, 0, &ch);
    world_character_scene(SEED, &ch, 0, 0, &s);
    uint8_t *big = (uint8_t *)malloc(128 * 128);
    world_render(&s, 64, NULL, m, NULL, NULL);
    world_render(&s, 128, NULL, big, NULL, NULL);
    size_t s64 = 0, s128 = 0;
    for (size_t k = 0; k < n; k++) s64 += m[k] != 0;
    for (size_t k = 0; k < 4 * n; k++) s128 += big[k] != 0;
    check(s128 > s64 * 36 / 10 && s128 < s64 * 44 / 10, "128 px: the same character (%zu vs 4 x %zu mask pixels)", s128, s64);
    /* conditions: the keypose and the sketch are non-empty and black elsewhere */
    uint8_t *pose = (uint8_t *)malloc(n * 3), *sk = (uint8_t *)malloc(n * 3);
    world_render(&s, 64, NULL, m, pose, sk);
    size_t pon = 0, son = 0, son_off = 0;
    for (size_t k = 0; k < n; k++) {
        pon += pose[3 * k] || pose[3 * k + 1] || pose[3 * k + 2];
        son += sk[3 * k] == 255;
        son_off += sk[3 * k] == 255 && m[k] == 0;
    }
    check(pon > 30 && pon < n / 3 && son > 30 && son_off == 0, "keypose (%zu px) and sketch (%zu px, all on the character)", pon, son);
    free(pose); free(sk); free(big);
    free(a); free(b); free(m); free(m2);
}

static void test_training_config(void) {
    WorldCharacter ch;
    world_character_make(SEED, 1, &ch);
    char yml[700], set[] = "models.pretrained_path=models/tiny-sd";
    const char *sets[1] = { set };
    snprintf(yml, sizeof yml, "%s/options/%s.yml", OUT_A, ch.name);
    TrainDataConfig d;
    MsTrainConfig mc;
    MsStatus st = train_config_load(yml, sets, 1, &d, &mc);
    if (!check(st == MS_OK, "%s loads (pretrained_path set to models/tiny-sd): %s", yml, st == MS_OK ? "" : ms_last_error())) return;
    char w1[32];
    snprintf(w1, sizeof w1, "<%s1>", ch.name);
    check(!strcmp(d.pretrained_path, "models/tiny-sd") && mc.n_words == 2 && !strcmp(mc.words[0], w1) && d.use_mask && d.use_caption,
          "yml: base model, concept words %s %s, captions and masks on", mc.n_words > 0 ? mc.words[0] : "?", mc.n_words > 1 ? mc.words[1] : "?");
    PyRandom py;
    MsTorchRng g;
    TrainDataset *ds = NULL;
    TrainDatasetOptions o = { NULL, 1 };
    py_random_seed(&py, 0);
    ms_torch_seed(&g, 0);
    st = train_dataset_open(&ds, &d, &o, &py);
    if (!check(st == MS_OK, "train_dataset_open on the written concept list: %s", st == MS_OK ? "" : ms_last_error())) return;
    int ok = train_dataset_n_images(ds) == PER_CHAR && train_dataset_has_masks(ds);
    char want[64];
    snprintf(want, sizeof want, "<%s1> <%s2>, ", ch.name, ch.name);
    for (size_t i = 0; ok && i < train_dataset_n_images(ds); i++) {
        ok = strncmp(train_dataset_prompt(ds, i), want, strlen(want)) == 0 && train_dataset_mask_path(ds, i) != NULL;
        if (!ok) printf("      item %zu: '%s'\n", i, train_dataset_prompt(ds, i));
    }
    check(ok, "%zu images with captions '%s...' and masks", train_dataset_n_images(ds), want);
    int S = train_dataset_size(ds);
    float *img = (float *)malloc((size_t)3 * S * S * sizeof *img);
    double *mk = (double *)malloc((size_t)(S / 8) * (S / 8) * sizeof *mk), *im = (double *)malloc((size_t)(S / 8) * (S / 8) * sizeof *im);
    char *prompt = NULL;
    st = train_dataset_get(ds, 0, &py, &g, img, mk, im, &prompt);
    double msum = 0;
    if (st == MS_OK) for (int k = 0; k < (S / 8) * (S / 8); k++) msum += mk[k];
    check(st == MS_OK && msum > 1.0 && prompt && strstr(prompt, ch.name), "dataset[0] through the official transforms: mask sum %.1f, '%s'",
          msum, prompt ? prompt : ms_last_error());
    free(prompt); free(img); free(mk); free(im);
    train_dataset_close(ds);
}

static void test_bad_input(void) {
    WorldOptions o;
    memset(&o, 0, sizeof o);
    o.out = OUT_B; o.n = 1; o.size = 100; o.characters = 0; o.per_character = 5;
    check(world_generate(&o) == MS_ERR_ARG && strstr(ms_last_error(), "--size"), "--size 100: %s", ms_last_error());
    o.size = 64; o.per_character = 11;
    check(world_generate(&o) == MS_ERR_ARG && strstr(ms_last_error(), "per-character"), "--per-character 11: %s", ms_last_error());
    o.per_character = 5;
    char under_file[600];
    snprintf(under_file, sizeof under_file, "%s/contact_sheet.png/x", OUT_A);
    o.out = under_file;
    check(world_generate(&o) == MS_ERR_IO, "output under a file: %s", ms_last_error());
    o.out = "";
    check(world_generate(&o) == MS_ERR_ARG, "no --out: %s", ms_last_error());
    WorldScene s;
    world_scene_make(SEED, 0, &s);
    check(world_render(&s, 100, NULL, NULL, NULL, NULL) == MS_ERR_ARG, "render at 100 px: %s", ms_last_error());
}

int main(void) {
    test_tmp(OUT_A, sizeof OUT_A, "world_a");
    test_tmp(OUT_B, sizeof OUT_B, "world_b");
    test_determinism();
    test_captions_and_geometry();
    test_masks();
    test_training_config();
    test_bad_input();
    return test_summary("test_world");
}
