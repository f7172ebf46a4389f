/* tools/world.c — the procedural world of issue 15: scenes, characters, captions, conditions.
 *
 * Everything is decided by integers so that every platform writes the same bytes:
 *   - randomness: splitmix64 (Steele, Lea, Flood 2014), one independent stream per
 *     (seed, what, index), so scene 7 is the same whether 10 or 1000 scenes are asked for;
 *   - geometry: a 1024 x 1024 "unit" square (WORLD_UNITS) independent of the resolution; a pixel
 *     x of an S-pixel image has its centre at (2x+1) * 512 / S units (integral for S | 1024);
 *   - rasterisation: a pixel takes the colour of the last primitive whose exact integer
 *     inside-test holds at its centre (ellipses, convex polygons, capsules; int64 arithmetic),
 *     no anti-aliasing, so masks are exact: a mask pixel is 255 iff the pixel was painted by a
 *     character (or, in scenes without characters, by an object);
 *   - angles come from a 32-step integer cosine table; there is no libm call in this file.
 *
 * A scene is a background, up to two groups of 1-3 identical objects (shape, colour, pattern,
 * size) and up to three character instances. Captions are generated from that scene graph in
 * plain English with synonyms and varied word order; the words are drawn from their own stream.
 * Conditions: "pose" is a keypose-like image (OpenPose-coloured limbs and joints on black, from
 * the characters' skeletons; objects get a joint at their centre and spokes to their corners),
 * "sketch" is white outlines on black where the part map changes (every object and character
 * part, patterns not drawn). */
#if !defined(_WIN32) && !defined(_POSIX_C_SOURCE)
#define _POSIX_C_SOURCE 200809L         /* mkdir */
#endif
#include "tools/tools.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#ifdef _WIN32
#include <direct.h>
static int world_mkdir(const char *p) { return _mkdir(p); }
#else
#include <sys/stat.h>
#include <sys/types.h>
static int world_mkdir(const char *p) { return mkdir(p, 0777); }
#endif

/* ---- randomness: splitmix64 streams ---- */
typedef struct { uint64_t s; } WRng;
uint64_t world_mix64(uint64_t z) {
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9u;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBu;
    return z ^ (z >> 31);
}
static uint64_t wr_next(WRng *r) { r->s += 0x9E3779B97F4A7C15u; return world_mix64(r->s); }
static int wr_below(WRng *r, int n) { return n <= 1 ? 0 : (int)(wr_next(r) % (uint64_t)n); }
static int wr_range(WRng *r, int a, int b) { return a + wr_below(r, b - a + 1); }
/* The stream of one (seed, what, index): what names the purpose (scene, words, character...). */
static WRng wr_stream(uint64_t seed, uint64_t what, uint64_t index) {
    WRng r;
    r.s = world_mix64(seed ^ world_mix64(what * 0x9E3779B97F4A7C15u + world_mix64(index + 0x632BE59BD9B4E019u)));
    return r;
}
static uint32_t px_hash(uint64_t seed, int64_t x, int64_t y) {
    return (uint32_t)(world_mix64(seed ^ world_mix64((uint64_t)x * 0x100000001B3u + (uint64_t)y * 0xC2B2AE3D27D4EB4Fu)) >> 32);
}

enum { WR_SCENE = 1, WR_WORDS, WR_CHAR, WR_POSE, WR_POSE_WORDS, WR_NAMES, WR_MULTI, WR_MULTI_WORDS };

/* floor division and modulo for a possibly negative a, b > 0 */
static int64_t fdiv(int64_t a, int64_t b) { return a >= 0 ? a / b : -((-a + b - 1) / b); }
static int64_t fmod64(int64_t a, int64_t b) { return a - fdiv(a, b) * b; }

/* 1024 * cos(k * 2pi / 32), k = 0..31 (rounded; the table is the definition) */
static const int cos32[32] = {
    1024, 1004, 946, 851, 724, 569, 392, 200, 0, -200, -392, -569, -724, -851, -946, -1004,
    -1024, -1004, -946, -851, -724, -569, -392, -200, 0, 200, 392, 569, 724, 851, 946, 1004 };
static int wcos(int k) { return cos32[((k % 32) + 32) % 32]; }
static int wsin(int k) { return cos32[(((k - 8) % 32) + 32) % 32]; }   /* y down: k = 8 points down */

/* ---- vocabulary ---- */
typedef struct { const char *name; uint8_t rgb[3]; const char *words; int dark; } WColour;
static const WColour colours[WORLD_COLOURS] = {
    { "red",    { 220,  40,  40 }, "red",           1 },
    { "orange", { 245, 140,  30 }, "orange",        0 },
    { "yellow", { 245, 215,  40 }, "yellow",        0 },
    { "green",  {  50, 170,  60 }, "green",         1 },
    { "blue",   {  40,  80, 220 }, "blue",          1 },
    { "purple", { 140,  60, 190 }, "purple|violet", 1 },
    { "pink",   { 245, 130, 180 }, "pink",          0 },
    { "white",  { 245, 245, 245 }, "white",         0 },
    { "black",  {  25,  25,  25 }, "black",         1 },
    { "brown",  { 130,  80,  40 }, "brown",         1 },
    { "grey",   { 128, 128, 128 }, "grey|gray",     0 },
};
static const char *const shape_names[WORLD_SHAPES] = { "circle", "square", "triangle", "diamond", "star", "cross" };
static const char *const shape_words[WORLD_SHAPES] = {                 /* singular/plural|... */
    "circle/circles|disc/discs|disk/disks", "square/squares|block/blocks", "triangle/triangles",
    "diamond/diamonds|rhombus/rhombuses", "star/stars", "cross/crosses|plus sign/plus signs" };
static const char *const pattern_names[WORLD_PATTERNS] = { "plain", "striped", "dotted" };
static const char *const size_names[3] = { "small", "medium", "large" };
static const char *const bg_names[WORLD_BACKGROUNDS] = { "sky", "grass", "brick wall", "water", "plain", "gradient", "noise" };
static const char *const where_names[WORLD_WHERES] = { "anywhere", "left", "right", "top", "bottom", "centre" };
static const char *const relation_names[4] = { "left of", "right of", "above", "below" };

const char *world_colour_name(int c) { return c >= 0 && c < WORLD_COLOURS ? colours[c].name : "?"; }
const char *world_shape_name(int s) { return s >= 0 && s < WORLD_SHAPES ? shape_names[s] : "?"; }
const char *world_pattern_name(int p) { return p >= 0 && p < WORLD_PATTERNS ? pattern_names[p] : "?"; }
const char *world_size_name(int s) { return s >= 0 && s < 3 ? size_names[s] : "?"; }
const char *world_background_name(int b) { return b >= 0 && b < WORLD_BACKGROUNDS ? bg_names[b] : "?"; }
const char *world_where_name(int w) { return w >= 0 && w < WORLD_WHERES ? where_names[w] : "?"; }
const char *world_relation_name(int r) { return r >= 0 && r < 4 ? relation_names[r] : "?"; }

/* The i-th of the '|'-separated alternatives in list (into out). */
static void pick_alt(const char *list, int i, char *out, size_t cap) {
    const char *p = list;
    while (i > 0 && (p = strchr(p, '|')) != NULL) { p++; i--; }
    if (!p) p = list;
    size_t n = strcspn(p, "|");
    if (n >= cap) n = cap - 1;
    memcpy(out, p, n); out[n] = '\0';
}
static int n_alts(const char *list) { int n = 1; for (; *list; list++) n += *list == '|'; return n; }
static void pick_word(WRng *r, const char *list, char *out, size_t cap) { pick_alt(list, wr_below(r, n_alts(list)), out, cap); }

/* ---- growing strings (captions) ---- */
typedef struct { char *s; size_t n, cap; int overflow; } WStr;
static void ws_add(WStr *b, const char *t) {
    size_t k = strlen(t);
    if (b->n + k + 1 > b->cap) { b->overflow = 1; return; }
    memcpy(b->s + b->n, t, k + 1); b->n += k;
}

/* ---- canvas and primitives ---- */
typedef struct {
    int S;                 /* pixels per side */
    uint8_t *rgb;          /* (S, S, 3) */
    uint8_t *owner;        /* (S, S) 0 background, 1..6 object groups/instances, 100 + c character c */
    uint16_t *part;        /* (S, S) part id for the sketch: 0 background */
} WCanvas;

typedef struct {
    uint8_t c0[3], c1[3];
    int pattern;           /* 0 solid, 1 stripes, 2 dots */
    int64_t ox, oy;        /* pattern origin (units) */
    int64_t period;        /* pattern period (units) */
    int dir;               /* stripes: 0 horizontal bands, 1 vertical, 2 diagonal */
    int owner, part;
    int clip;              /* 1: only inside the ellipse (ccx, ccy, crx, cry) */
    int64_t ccx, ccy, crx, cry;
} WPaint;

static int64_t unit_of(int S, int x) { return ((int64_t)2 * x + 1) * 512 / S; }
static int px_lo(int S, int64_t u) { int64_t p = fdiv(u * S, 1024) - 1; return p < 0 ? 0 : p >= S ? S - 1 : (int)p; }
static int px_hi(int S, int64_t u) { int64_t p = fdiv(u * S, 1024) + 1; return p < 0 ? 0 : p >= S ? S - 1 : (int)p; }

static int in_ellipse(int64_t ux, int64_t uy, int64_t cx, int64_t cy, int64_t rx, int64_t ry) {
    int64_t dx = ux - cx, dy = uy - cy;
    if (rx <= 0 || ry <= 0) return 0;
    return dx * dx * ry * ry + dy * dy * rx * rx <= rx * rx * ry * ry;
}

static void plot(WCanvas *cv, int x, int y, int64_t ux, int64_t uy, const WPaint *p) {
    if (p->clip && !in_ellipse(ux, uy, p->ccx, p->ccy, p->crx, p->cry)) return;
    const uint8_t *c = p->c0;
    if (p->pattern == 1) {
        int64_t t = p->dir == 0 ? uy - p->oy : p->dir == 1 ? ux - p->ox : (ux - p->ox) + (uy - p->oy);
        if (fdiv(t, p->period / 2) & 1) c = p->c1;
    } else if (p->pattern == 2) {
        int64_t lx = fmod64(ux - p->ox, p->period) - p->period / 2, ly = fmod64(uy - p->oy, p->period) - p->period / 2;
        int64_t rd = p->period * 3 / 10;
        if (lx * lx + ly * ly <= rd * rd) c = p->c1;
    }
    size_t i = (size_t)y * cv->S + x;
    memcpy(cv->rgb + 3 * i, c, 3);
    cv->owner[i] = (uint8_t)p->owner;
    cv->part[i] = (uint16_t)p->part;
}

static void fill_ellipse(WCanvas *cv, int64_t cx, int64_t cy, int64_t rx, int64_t ry, const WPaint *p) {
    int S = cv->S;
    for (int y = px_lo(S, cy - ry); y <= px_hi(S, cy + ry); y++)
        for (int x = px_lo(S, cx - rx); x <= px_hi(S, cx + rx); x++) {
            int64_t ux = unit_of(S, x), uy = unit_of(S, y);
            if (in_ellipse(ux, uy, cx, cy, rx, ry)) plot(cv, x, y, ux, uy, p);
        }
}

/* Convex polygon, vertices in either orientation; a point on an edge is inside. */
static void fill_poly(WCanvas *cv, const int64_t *vx, const int64_t *vy, int n, const WPaint *p) {
    int S = cv->S;
    int64_t x0 = vx[0], x1 = vx[0], y0 = vy[0], y1 = vy[0];
    for (int i = 1; i < n; i++) {
        if (vx[i] < x0) x0 = vx[i];
        if (vx[i] > x1) x1 = vx[i];
        if (vy[i] < y0) y0 = vy[i];
        if (vy[i] > y1) y1 = vy[i];
    }
    for (int y = px_lo(S, y0); y <= px_hi(S, y1); y++)
        for (int x = px_lo(S, x0); x <= px_hi(S, x1); x++) {
            int64_t ux = unit_of(S, x), uy = unit_of(S, y);
            int pos = 0, neg = 0;
            for (int i = 0; i < n; i++) {
                int j = (i + 1) % n;
                int64_t c = (vx[j] - vx[i]) * (uy - vy[i]) - (vy[j] - vy[i]) * (ux - vx[i]);
                pos |= c > 0; neg |= c < 0;
            }
            if (!(pos && neg)) plot(cv, x, y, ux, uy, p);
        }
}

/* Capsule: points within distance w of the segment a-b. */
static int in_capsule(int64_t ux, int64_t uy, int64_t ax, int64_t ay, int64_t bx, int64_t by, int64_t w) {
    int64_t dx = bx - ax, dy = by - ay, px = ux - ax, py = uy - ay;
    int64_t dot = px * dx + py * dy, len2 = dx * dx + dy * dy;
    if (dot <= 0 || len2 == 0) return px * px + py * py <= w * w;
    if (dot >= len2) { int64_t qx = ux - bx, qy = uy - by; return qx * qx + qy * qy <= w * w; }
    int64_t cr = px * dy - py * dx;
    return cr * cr <= w * w * len2;
}
static void fill_capsule(WCanvas *cv, int64_t ax, int64_t ay, int64_t bx, int64_t by, int64_t w, const WPaint *p) {
    int S = cv->S;
    int64_t x0 = (ax < bx ? ax : bx) - w, x1 = (ax > bx ? ax : bx) + w;
    int64_t y0 = (ay < by ? ay : by) - w, y1 = (ay > by ? ay : by) + w;
    for (int y = px_lo(S, y0); y <= px_hi(S, y1); y++)
        for (int x = px_lo(S, x0); x <= px_hi(S, x1); x++) {
            int64_t ux = unit_of(S, x), uy = unit_of(S, y);
            if (in_capsule(ux, uy, ax, ay, bx, by, w)) plot(cv, x, y, ux, uy, p);
        }
}

static WPaint solid(const uint8_t *c, int owner, int part) {
    WPaint p;
    memset(&p, 0, sizeof p);
    memcpy(p.c0, c, 3); memcpy(p.c1, c, 3);
    p.owner = owner; p.part = part;
    return p;
}
static void rgb_set(uint8_t *c, int r, int g, int b) {
    c[0] = (uint8_t)(r < 0 ? 0 : r > 255 ? 255 : r);
    c[1] = (uint8_t)(g < 0 ? 0 : g > 255 ? 255 : g);
    c[2] = (uint8_t)(b < 0 ? 0 : b > 255 ? 255 : b);
}
static void rgb_mix(uint8_t *out, const uint8_t *a, const uint8_t *b, int t, int tmax) {  /* a + (b-a) t/tmax */
    for (int k = 0; k < 3; k++) out[k] = (uint8_t)(a[k] + fdiv(((int64_t)b[k] - a[k]) * t, tmax));
}

/* ---- backgrounds ---- */
static void render_background(WCanvas *cv, const WorldBackground *bg) {
    int S = cv->S;
    uint64_t hs = bg->texture_seed;
    const uint8_t *ca = colours[bg->colour_a].rgb, *cb = colours[bg->colour_b].rgb;
    for (int y = 0; y < S; y++)
        for (int x = 0; x < S; x++) {
            int64_t ux = unit_of(S, x), uy = unit_of(S, y);
            uint8_t c[3];
            uint32_t h = px_hash(hs, ux, uy);
            int n = (int)(h & 15) - 8;                                    /* -8..7 grain */
            switch (bg->kind) {
            case WBG_SKY: {
                static const uint8_t top[3] = { 70, 130, 220 }, bot[3] = { 175, 210, 245 };
                rgb_mix(c, top, bot, (int)uy, 1024);
                break;
            }
            case WBG_GRASS: {
                int blade = (int)(px_hash(hs, fdiv(ux, 24), 7) % 40) - 20; /* column streaks */
                rgb_set(c, 55 + n, 140 + blade + 2 * n, 45 + n);
                break;
            }
            case WBG_BRICK: {
                int64_t bh = 96, bw = 192, row = fdiv(uy, bh), off = (row & 1) ? bw / 2 : 0;
                int64_t col = fdiv(ux + off, bw);
                int64_t ly = uy - row * bh, lx = ux + off - col * bw;
                if (ly < 16 || lx < 16) rgb_set(c, 205 + n, 200 + n, 190 + n);   /* mortar */
                else {
                    int v = (int)(px_hash(hs, col, row) % 50) - 25;
                    rgb_set(c, 160 + v + n, 70 + v / 2 + n, 50 + v / 3 + n);
                }
                break;
            }
            case WBG_WATER: {
                int64_t per = 160, t = fmod64(ux + bg->phase, per * 2);
                int64_t tri = t < per ? t : 2 * per - t;                 /* triangle wave 0..per */
                int64_t wy = fmod64(uy + tri / 3, 112);
                if (wy < 20) rgb_set(c, 120 + n, 180 + n, 235 + n);
                else rgb_set(c, 30 + n, 90 + n + (int)(uy / 32), 175 + n);
                break;
            }
            case WBG_PLAIN:
                memcpy(c, ca, 3);
                break;
            case WBG_GRADIENT:
                rgb_mix(c, ca, cb, (int)(bg->vertical ? uy : ux), 1024);
                break;
            default: {                                                  /* WBG_NOISE: value noise */
                int64_t g = 128, gx = fdiv(ux, g), gy = fdiv(uy, g), fx = ux - gx * g, fy = uy - gy * g;
                int64_t v00 = px_hash(hs, gx, gy) & 255, v10 = px_hash(hs, gx + 1, gy) & 255;
                int64_t v01 = px_hash(hs, gx, gy + 1) & 255, v11 = px_hash(hs, gx + 1, gy + 1) & 255;
                int64_t top = v00 * (g - fx) + v10 * fx, bot = v01 * (g - fx) + v11 * fx;
                int64_t v = (top * (g - fy) + bot * fy) / (g * g);          /* 0..255 */
                rgb_mix(c, ca, cb, (int)v, 255);
                break;
            }
            }
            size_t i = (size_t)y * S + x;
            memcpy(cv->rgb + 3 * i, c, 3);
            cv->owner[i] = 0; cv->part[i] = 0;
        }
    if (bg->kind == WBG_SKY) {                                          /* clouds: unions of ellipses */
        static const uint8_t white[3] = { 250, 250, 252 };
        WPaint p = solid(white, 0, 0);
        for (int k = 0; k < bg->n_clouds; k++) {
            int64_t cx = bg->cloud_x[k], cy = bg->cloud_y[k], r = bg->cloud_r[k];
            fill_ellipse(cv, cx, cy, r * 2, r, &p);
            fill_ellipse(cv, cx - r, cy + r / 3, r, r * 2 / 3, &p);
            fill_ellipse(cv, cx + r, cy + r / 3, r, r * 2 / 3, &p);
        }
    }
}

/* ---- objects ---- */
/* Corners of a shape (for polygons) and its pose spokes. */
static int shape_poly(int shape, int64_t cx, int64_t cy, int64_t r, int which, int64_t *vx, int64_t *vy) {
    switch (shape) {
    case WSH_SQUARE: {
        int64_t h = r * 13 / 16;
        vx[0] = cx - h; vy[0] = cy - h; vx[1] = cx + h; vy[1] = cy - h; vx[2] = cx + h; vy[2] = cy + h; vx[3] = cx - h; vy[3] = cy + h;
        return 4;
    }
    case WSH_TRIANGLE:
        vx[0] = cx; vy[0] = cy - r; vx[1] = cx + r * 887 / 1024; vy[1] = cy + r / 2; vx[2] = cx - r * 887 / 1024; vy[2] = cy + r / 2;
        return 3;
    case WSH_DIAMOND:
        vx[0] = cx; vy[0] = cy - r; vx[1] = cx + r * 11 / 16; vy[1] = cy; vx[2] = cx; vy[2] = cy + r; vx[3] = cx - r * 11 / 16; vy[3] = cy;
        return 4;
    case WSH_STAR: {                                                     /* hexagram: two triangles */
        int64_t s = which ? -1 : 1;
        vx[0] = cx; vy[0] = cy - s * r; vx[1] = cx + r * 887 / 1024; vy[1] = cy + s * r / 2; vx[2] = cx - r * 887 / 1024; vy[2] = cy + s * r / 2;
        return 3;
    }
    case WSH_CROSS: {
        int64_t a = r, b = r * 5 / 16;
        if (which) { int64_t t = a; a = b; b = t; }
        vx[0] = cx - a; vy[0] = cy - b; vx[1] = cx + a; vy[1] = cy - b; vx[2] = cx + a; vy[2] = cy + b; vx[3] = cx - a; vy[3] = cy + b;
        return 4;
    }
    default: return 0;
    }
}

static void draw_object(WCanvas *cv, const WorldGroup *g, int k, int owner, int part) {
    int64_t cx = g->x[k], cy = g->y[k], r = g->r[k];
    const WColour *col = &colours[g->colour];
    WPaint p = solid(col->rgb, owner, part);
    if (g->pattern) {
        static const uint8_t white[3] = { 250, 250, 250 }, black[3] = { 20, 20, 20 };
        memcpy(p.c1, col->dark ? white : black, 3);
        p.pattern = g->pattern;
        p.ox = cx; p.oy = cy;
        p.period = g->pattern == 1 ? (r * 2 / 3 < 80 ? 80 : r * 2 / 3) : (r / 2 < 88 ? 88 : r / 2);
        p.dir = g->stripe_dir;
        if (g->pattern == 1 && p.dir == 0) p.oy = cy - p.period / 4;    /* a band centred on the middle */
    }
    if (g->shape == WSH_CIRCLE) { fill_ellipse(cv, cx, cy, r, r, &p); return; }
    int64_t vx[6], vy[6];
    int n = shape_poly(g->shape, cx, cy, r, 0, vx, vy);
    fill_poly(cv, vx, vy, n, &p);
    if (g->shape == WSH_STAR || g->shape == WSH_CROSS) {
        n = shape_poly(g->shape, cx, cy, r, 1, vx, vy);
        fill_poly(cv, vx, vy, n, &p);
    }
}

/* ---- characters ---- */
static const char *const ear_names[WORLD_EARS] = { "pointed ears", "round ears", "antennae", "a horn", "long ears" };
static const char *const tail_names[WORLD_TAILS] = { "no tail", "a tufted tail", "a zigzag tail", "a fluffy tail" };
static const char *const marking_names[WORLD_MARKINGS] = { "no markings", "spots", "stripes", "a belly patch" };

void world_character_make(uint64_t seed, int index, WorldCharacter *c) {
    /* Identities differ by construction: body colours, ears, tails and markings are dealt from
     * seeded permutations over the characters, so no two of the first few share them. */
    WRng names = wr_stream(seed, WR_NAMES, 0), r = wr_stream(seed, WR_CHAR, (uint64_t)index);
    static const char *const cons = "bdfgklmnprstvz", *const vows = "aeiou";
    int perm_col[8] = { 0, 1, 2, 3, 4, 5, 6, 9 }, perm_ear[WORLD_EARS], perm_tail[WORLD_TAILS], perm_mark[WORLD_MARKINGS];
    for (int i = 0; i < WORLD_EARS; i++) perm_ear[i] = i;
    for (int i = 0; i < WORLD_TAILS; i++) perm_tail[i] = i;
    for (int i = 0; i < WORLD_MARKINGS; i++) perm_mark[i] = i;
    for (int i = 7; i > 0; i--) { int j = wr_below(&names, i + 1), t = perm_col[i]; perm_col[i] = perm_col[j]; perm_col[j] = t; }
    for (int i = WORLD_EARS - 1; i > 0; i--) { int j = wr_below(&names, i + 1), t = perm_ear[i]; perm_ear[i] = perm_ear[j]; perm_ear[j] = t; }
    for (int i = WORLD_TAILS - 1; i > 0; i--) { int j = wr_below(&names, i + 1), t = perm_tail[i]; perm_tail[i] = perm_tail[j]; perm_tail[j] = t; }
    for (int i = WORLD_MARKINGS - 1; i > 0; i--) { int j = wr_below(&names, i + 1), t = perm_mark[i]; perm_mark[i] = perm_mark[j]; perm_mark[j] = t; }
    memset(c, 0, sizeof *c);
    /* name: consonant-vowel-consonant-vowel, made unique by the index (no "<" or digits) */
    for (int k = 0; k <= index; k++) {
        char nm[8];
        nm[0] = cons[wr_below(&names, 14)]; nm[1] = vows[wr_below(&names, 5)];
        nm[2] = cons[wr_below(&names, 14)]; nm[3] = vows[wr_below(&names, 5)]; nm[4] = '\0';
        if (k == index) memcpy(c->name, nm, 5);
    }
    c->name[4] = (char)('a' + index % 26);          /* the index letter keeps names distinct */
    c->name[5] = '\0';
    c->body_colour = perm_col[index % 8];
    c->limb_colour = wr_below(&r, 2) ? c->body_colour : perm_col[(index + 3) % 8];
    c->marking = perm_mark[index % WORLD_MARKINGS];
    c->marking_colour = colours[c->body_colour].dark ? 7 : 8;              /* white on dark, black on light */
    if (c->marking == WMK_BELLY) c->marking_colour = colours[c->body_colour].dark ? 2 : 7;
    c->ears = perm_ear[index % WORLD_EARS];
    c->tail = perm_tail[index % WORLD_TAILS];
    c->eyes = 1 + (wr_below(&r, 3) != 0);          /* 1 (a cyclops) or 2 */
    c->body_rx = wr_range(&r, 110, 165);
    c->body_ry = wr_range(&r, 130, 170);
    c->head_r = wr_range(&r, 80, 110);
    c->arm_len = wr_range(&r, 95, 135);
    c->leg_len = wr_range(&r, 90, 130);
    c->limb_w = wr_range(&r, 20, 30);
}

/* Local skeleton (y down, origin at the body centre, facing right, scale 1000 = 1:1). */
typedef struct { int64_t x, y; } WPt;
typedef struct {
    WPt body, neck, head, sh[2], hand[2], hip[2], foot[2], ear[2], tail_base, tail_tip;
} WSkeleton;

static WPt to_world(const WorldCharInstance *ci, int64_t lx, int64_t ly) {
    WPt q;
    int64_t sx = ci->facing ? -1 : 1;
    q.x = ci->x + fdiv(sx * lx * ci->scale, 1000);
    q.y = ci->y + fdiv(ly * ci->scale, 1000);
    return q;
}
static int64_t scl(const WorldCharInstance *ci, int64_t v) { return v * ci->scale / 1000; }

static void skeleton_local(const WorldCharacter *c, const WorldCharInstance *ci, WSkeleton *k) {
    int rx = c->body_rx, ry = c->body_ry, hr = c->head_r;
    memset(k, 0, sizeof *k);
    k->neck.x = 0; k->neck.y = -ry + 20;
    k->head.x = ci->head_tilt; k->head.y = -ry - hr * 3 / 4;
    for (int s = 0; s < 2; s++) {
        int64_t side = s ? 1 : -1;                                   /* 0 back (left), 1 front (right) */
        int arm = ci->arm[s];                                        /* direction index, right side */
        int a = s ? arm : 16 - arm;                                  /* mirrored for the back arm */
        k->sh[s].x = side * rx * 3 / 4; k->sh[s].y = -ry / 3;
        k->hand[s].x = k->sh[s].x + (int64_t)c->arm_len * wcos(a) / 1024;
        k->hand[s].y = k->sh[s].y + (int64_t)c->arm_len * wsin(a) / 1024;
        int l = ci->walking ? (s ? 6 : 10) : (s ? 7 : 9);            /* 8 = straight down */
        k->hip[s].x = side * rx / 2; k->hip[s].y = ry * 3 / 4;
        k->foot[s].x = k->hip[s].x + (int64_t)c->leg_len * wcos(l) / 1024;
        k->foot[s].y = k->hip[s].y + (int64_t)c->leg_len * wsin(l) / 1024;
        k->ear[s].x = k->head.x + side * hr * 3 / 5; k->ear[s].y = k->head.y - hr * 4 / 5;
    }
    if (c->ears == WEAR_HORN) { k->ear[0].x = k->ear[1].x = k->head.x; }
    k->tail_base.x = -rx * 4 / 5; k->tail_base.y = ry / 4;
    k->tail_tip.x = -rx - 110; k->tail_tip.y = -ry / 4;
}

/* Extent of a character around its centre at scale 1000 (for placement): half width, top, bottom. */
static void char_extent(const WorldCharacter *c, int *half_w, int *top, int *bottom) {
    *half_w = c->body_rx + 150 + 40;
    *top = c->body_ry + c->head_r * 3 / 4 + c->head_r + 120;
    *bottom = c->body_ry * 3 / 4 + c->leg_len + 40;
}

static void draw_character(WCanvas *cv, const WorldCharacter *c, const WorldCharInstance *ci, int owner, int part0) {
    WSkeleton k;
    skeleton_local(c, ci, &k);
    const uint8_t *bc = colours[c->body_colour].rgb, *lc = colours[c->limb_colour].rgb;
    uint8_t dark[3];
    rgb_set(dark, bc[0] * 2 / 3, bc[1] * 2 / 3, bc[2] * 2 / 3);
    int64_t lw = scl(ci, c->limb_w);
    WPt a, b;
    WPaint p;
    /* tail (behind the body) */
    p = solid(lc, owner, part0 + 1);
    a = to_world(ci, k.tail_base.x, k.tail_base.y); b = to_world(ci, k.tail_tip.x, k.tail_tip.y);
    if (c->tail == WTAIL_TUFT) {
        fill_capsule(cv, a.x, a.y, b.x, b.y, lw * 2 / 3, &p);
        p = solid(dark, owner, part0 + 2);
        fill_ellipse(cv, b.x, b.y, scl(ci, 36), scl(ci, 36), &p);
    } else if (c->tail == WTAIL_ZIGZAG) {
        WPt m1 = to_world(ci, (2 * k.tail_base.x + k.tail_tip.x) / 3, k.tail_base.y - 60);
        WPt m2 = to_world(ci, (k.tail_base.x + 2 * k.tail_tip.x) / 3, k.tail_base.y + 10);
        fill_capsule(cv, a.x, a.y, m1.x, m1.y, lw * 2 / 3, &p);
        fill_capsule(cv, m1.x, m1.y, m2.x, m2.y, lw * 2 / 3, &p);
        fill_capsule(cv, m2.x, m2.y, b.x, b.y, lw * 2 / 3, &p);
    } else if (c->tail == WTAIL_FLUFFY) {
        WPt m = to_world(ci, (k.tail_base.x + k.tail_tip.x) / 2, (k.tail_base.y + k.tail_tip.y) / 2);
        fill_ellipse(cv, m.x, m.y, scl(ci, 75), scl(ci, 55), &p);
    }
    /* legs and feet */
    for (int s = 0; s < 2; s++) {
        p = solid(lc, owner, part0 + 3 + s);
        a = to_world(ci, k.hip[s].x, k.hip[s].y); b = to_world(ci, k.foot[s].x, k.foot[s].y);
        fill_capsule(cv, a.x, a.y, b.x, b.y, lw, &p);
        p = solid(dark, owner, part0 + 5 + s);
        WPt f = to_world(ci, k.foot[s].x + 20, k.foot[s].y);
        fill_ellipse(cv, f.x, f.y, scl(ci, 42), scl(ci, 22), &p);
    }
    /* body, then its markings clipped to it */
    WPt bcn = to_world(ci, 0, 0);
    int64_t brx = scl(ci, c->body_rx), bry = scl(ci, c->body_ry);
    p = solid(bc, owner, part0 + 7);
    fill_ellipse(cv, bcn.x, bcn.y, brx, bry, &p);
    const uint8_t *mc = colours[c->marking_colour].rgb;
    p = solid(mc, owner, part0 + 7);
    p.clip = 1; p.ccx = bcn.x; p.ccy = bcn.y; p.crx = brx; p.cry = bry;
    if (c->marking == WMK_SPOTS) {
        static const int sx[4] = { -60, 40, -10, 70 }, sy[4] = { -40, -70, 50, 40 };
        for (int s = 0; s < 4; s++) {
            WPt q = to_world(ci, sx[s] * c->body_rx / 140, sy[s] * c->body_ry / 150);
            fill_ellipse(cv, q.x, q.y, scl(ci, 30), scl(ci, 30), &p);
        }
    } else if (c->marking == WMK_STRIPES) {
        for (int s = -1; s <= 1; s++) {
            WPt q = to_world(ci, 0, (int64_t)s * c->body_ry * 2 / 5);
            fill_ellipse(cv, q.x, q.y, brx, scl(ci, 22), &p);
        }
    } else if (c->marking == WMK_BELLY) {
        WPt q = to_world(ci, c->body_rx / 4, c->body_ry / 5);
        p.part = part0 + 8;
        fill_ellipse(cv, q.x, q.y, brx * 11 / 20, bry * 3 / 5, &p);
    }
    /* arms (in front of the body) and hands */
    for (int s = 0; s < 2; s++) {
        p = solid(lc, owner, part0 + 9 + s);
        a = to_world(ci, k.sh[s].x, k.sh[s].y); b = to_world(ci, k.hand[s].x, k.hand[s].y);
        fill_capsule(cv, a.x, a.y, b.x, b.y, lw * 4 / 5, &p);
        p = solid(dark, owner, part0 + 11 + s);
        fill_ellipse(cv, b.x, b.y, lw * 6 / 5, lw * 6 / 5, &p);
    }
    /* ears behind the head edge, head, eyes */
    WPt h = to_world(ci, k.head.x, k.head.y);
    int64_t hr = scl(ci, c->head_r);
    for (int s = 0; s < 2; s++) {
        WPt e = to_world(ci, k.ear[s].x, k.ear[s].y);
        p = solid(c->ears == WEAR_ANTENNAE ? dark : bc, owner, part0 + 13 + s);
        if (c->ears == WEAR_POINTED || (c->ears == WEAR_HORN && s == 0)) {
            int64_t vx[3], vy[3];
            WPt t = to_world(ci, k.ear[s].x + (c->ears == WEAR_HORN ? 0 : (s ? 20 : -20)), k.ear[s].y - (c->ears == WEAR_HORN ? 90 : 70));
            WPt l = to_world(ci, k.ear[s].x - 40, k.ear[s].y + 30), rr = to_world(ci, k.ear[s].x + 40, k.ear[s].y + 30);
            if (c->ears == WEAR_HORN) { static const uint8_t ivory[3] = { 240, 230, 200 }; memcpy(p.c0, ivory, 3); }
            vx[0] = t.x; vy[0] = t.y; vx[1] = l.x; vy[1] = l.y; vx[2] = rr.x; vy[2] = rr.y;
            fill_poly(cv, vx, vy, 3, &p);
        } else if (c->ears == WEAR_ROUND) {
            fill_ellipse(cv, e.x, e.y, scl(ci, 40), scl(ci, 40), &p);
        } else if (c->ears == WEAR_ANTENNAE) {
            WPt t = to_world(ci, k.ear[s].x + (s ? 30 : -30), k.ear[s].y - 80);
            fill_capsule(cv, e.x, e.y, t.x, t.y, scl(ci, 10), &p);
            fill_ellipse(cv, t.x, t.y, scl(ci, 24), scl(ci, 24), &p);
        } else if (c->ears == WEAR_LONG) {
            WPt t = to_world(ci, k.ear[s].x + (s ? 15 : -15), k.ear[s].y - 60);
            fill_ellipse(cv, t.x, t.y, scl(ci, 26), scl(ci, 80), &p);
        }
    }
    p = solid(bc, owner, part0 + 15);
    fill_ellipse(cv, h.x, h.y, hr, hr, &p);
    static const uint8_t ew[3] = { 255, 255, 255 }, eb[3] = { 10, 10, 10 };
    for (int s = 0; s < c->eyes; s++) {
        int64_t ex = c->eyes == 1 ? c->head_r / 4 : (s ? c->head_r / 2 : -c->head_r / 8);
        WPt e = to_world(ci, k.head.x + ex, k.head.y - c->head_r / 8);
        int64_t er = scl(ci, c->eyes == 1 ? 38 : 28);
        p = solid(ew, owner, part0 + 16 + s);
        fill_ellipse(cv, e.x, e.y, er, er, &p);
        WPt q = to_world(ci, k.head.x + ex + 10, k.head.y - c->head_r / 8);
        p = solid(eb, owner, part0 + 16 + s);
        fill_ellipse(cv, q.x, q.y, er / 2, er / 2, &p);
    }
}

/* ---- keypose: OpenPose's limb colours (the official keypose images use them) ---- */
static const uint8_t op_colours[18][3] = {
    { 255, 0, 0 }, { 255, 85, 0 }, { 255, 170, 0 }, { 255, 255, 0 }, { 170, 255, 0 }, { 85, 255, 0 },
    { 0, 255, 0 }, { 0, 255, 85 }, { 0, 255, 170 }, { 0, 255, 255 }, { 0, 170, 255 }, { 0, 85, 255 },
    { 0, 0, 255 }, { 85, 0, 255 }, { 170, 0, 255 }, { 255, 0, 255 }, { 255, 0, 170 }, { 255, 0, 85 } };

static void draw_keypose_character(WCanvas *cv, const WorldCharacter *c, const WorldCharInstance *ci) {
    WSkeleton k;
    skeleton_local(c, ci, &k);
    WPt j[14];
    j[0] = to_world(ci, k.head.x, k.head.y); j[1] = to_world(ci, k.neck.x, k.neck.y);
    for (int s = 0; s < 2; s++) {
        j[2 + s] = to_world(ci, k.sh[s].x, k.sh[s].y); j[4 + s] = to_world(ci, k.hand[s].x, k.hand[s].y);
        j[6 + s] = to_world(ci, k.hip[s].x, k.hip[s].y); j[8 + s] = to_world(ci, k.foot[s].x, k.foot[s].y);
        j[10 + s] = to_world(ci, k.ear[s].x, k.ear[s].y);
    }
    j[12] = to_world(ci, k.tail_base.x, k.tail_base.y); j[13] = to_world(ci, k.tail_tip.x, k.tail_tip.y);
    static const int limbs[12][2] = { { 1, 0 }, { 1, 2 }, { 2, 4 }, { 1, 3 }, { 3, 5 }, { 1, 6 }, { 6, 8 },
                                      { 1, 7 }, { 7, 9 }, { 0, 10 }, { 0, 11 }, { 12, 13 } };
    int64_t w = scl(ci, 24);                                          /* ~3 px lines at 64 px, scale 1 */
    if (w < 10) w = 10;
    for (int l = 0; l < 12; l++) {
        if (l == 11 && c->tail == WTAIL_NONE) continue;
        WPaint p = solid(op_colours[l], 0, 0);
        fill_capsule(cv, j[limbs[l][0]].x, j[limbs[l][0]].y, j[limbs[l][1]].x, j[limbs[l][1]].y, w, &p);
    }
    for (int q = 0; q < 14; q++) {
        if (q >= 12 && c->tail == WTAIL_NONE) continue;
        WPaint p = solid(op_colours[(q * 5) % 18], 0, 0);
        fill_ellipse(cv, j[q].x, j[q].y, w * 3 / 2, w * 3 / 2, &p);
    }
}

static void draw_keypose_object(WCanvas *cv, const WorldGroup *g, int k) {
    int64_t cx = g->x[k], cy = g->y[k], r = g->r[k], w = 10 + 512 / cv->S;
    int64_t vx[6], vy[6];
    int n = g->shape == WSH_CIRCLE ? 0 : shape_poly(g->shape, cx, cy, r, 0, vx, vy);
    if (n == 0) {                                                        /* circle: four spokes */
        n = 4;
        vx[0] = cx + r; vy[0] = cy; vx[1] = cx; vy[1] = cy + r; vx[2] = cx - r; vy[2] = cy; vx[3] = cx; vy[3] = cy - r;
    }
    for (int i = 0; i < n; i++) {
        WPaint p = solid(op_colours[(g->shape * 3 + i) % 18], 0, 0);
        fill_capsule(cv, cx, cy, vx[i], vy[i], w, &p);
    }
    WPaint p = solid(op_colours[(g->shape * 3 + 9) % 18], 0, 0);
    fill_ellipse(cv, cx, cy, w * 2, w * 2, &p);
}

/* ---- whole scenes ---- */
static int object_owner(int group, int k) { return 1 + group * 3 + k; }

MsStatus world_render(const WorldScene *s, int S, uint8_t *rgb, uint8_t *mask, uint8_t *pose, uint8_t *sketch) {
    if (S < 16 || S > 1024 || 1024 % S)
        return ms_errorf(MS_ERR_ARG, "world_render: size %d: expected a divisor of 1024 between 16 and 1024", S);
    size_t n = (size_t)S * S;
    WCanvas cv;
    cv.S = S;
    cv.rgb = (uint8_t *)malloc(n * 3);
    cv.owner = (uint8_t *)malloc(n);
    cv.part = (uint16_t *)malloc(n * sizeof *cv.part);
    if (!cv.rgb || !cv.owner || !cv.part) { free(cv.rgb); free(cv.owner); free(cv.part); return ms_errorf(MS_ERR_NOMEM, "world_render: out of memory"); }
    render_background(&cv, &s->bg);
    for (int g = 0; g < s->n_groups; g++)
        for (int k = 0; k < s->g[g].count; k++) draw_object(&cv, &s->g[g], k, object_owner(g, k), object_owner(g, k));
    for (int c = 0; c < s->n_chars; c++) draw_character(&cv, &s->chars[c], &s->inst[c], 100 + c, 100 + 32 * c);
    if (rgb) memcpy(rgb, cv.rgb, n * 3);
    if (mask)
        for (size_t i = 0; i < n; i++)
            mask[i] = (uint8_t)((s->n_chars ? cv.owner[i] >= 100 : cv.owner[i] != 0) ? 255 : 0);
    if (sketch)
        for (int y = 0; y < S; y++)
            for (int x = 0; x < S; x++) {
                size_t i = (size_t)y * S + x;
                int id = cv.part[i], edge = 0;                   /* a part pixel beside another part */
                if (id && x > 0 && x < S - 1 && y > 0 && y < S - 1)
                    edge = cv.part[i - 1] != id || cv.part[i + 1] != id || cv.part[i - S] != id || cv.part[i + S] != id;
                else if (id)                                            /* border pixels: inner neighbours only */
                    edge = (x > 0 && cv.part[i - 1] != id) || (x < S - 1 && cv.part[i + 1] != id) ||
                           (y > 0 && cv.part[i - S] != id) || (y < S - 1 && cv.part[i + S] != id);
                memset(sketch + 3 * i, edge ? 255 : 0, 3);
            }
    if (pose) {
        memset(cv.rgb, 0, n * 3);
        for (int g = 0; g < s->n_groups; g++)
            for (int k = 0; k < s->g[g].count; k++) draw_keypose_object(&cv, &s->g[g], k);
        for (int c = 0; c < s->n_chars; c++) draw_keypose_character(&cv, &s->chars[c], &s->inst[c]);
        memcpy(pose, cv.rgb, n * 3);
    }
    free(cv.rgb); free(cv.owner); free(cv.part);
    return MS_OK;
}

/* The characters' own masks: (S,S) 255 where character c is visible, for boxes. */
static MsStatus render_owner(const WorldScene *s, int S, uint8_t *owner) {
    size_t n = (size_t)S * S;
    WCanvas cv;
    cv.S = S;
    cv.rgb = (uint8_t *)malloc(n * 3);
    cv.owner = owner;
    cv.part = (uint16_t *)malloc(n * sizeof *cv.part);
    if (!cv.rgb || !cv.part) { free(cv.rgb); free(cv.part); return ms_errorf(MS_ERR_NOMEM, "world: out of memory"); }
    render_background(&cv, &s->bg);
    for (int g = 0; g < s->n_groups; g++)
        for (int k = 0; k < s->g[g].count; k++) draw_object(&cv, &s->g[g], k, object_owner(g, k), object_owner(g, k));
    for (int c = 0; c < s->n_chars; c++) draw_character(&cv, &s->chars[c], &s->inst[c], 100 + c, 100 + 32 * c);
    free(cv.rgb); free(cv.part);
    return MS_OK;
}

/* Colours that would not stand out on a background (objects and characters avoid them). */
static int clashes(const WorldBackground *bg, int colour) {
    switch (bg->kind) {
    case WBG_SKY: return colour == 4 || colour == 7;
    case WBG_GRASS: return colour == 3;
    case WBG_BRICK: return colour == 0 || colour == 9 || colour == 1;
    case WBG_WATER: return colour == 4;
    case WBG_PLAIN: return colour == bg->colour_a;
    default: return colour == bg->colour_a || colour == bg->colour_b;
    }
}

static void make_background(WRng *r, WorldBackground *bg) {
    memset(bg, 0, sizeof *bg);
    bg->kind = wr_below(r, WORLD_BACKGROUNDS);
    bg->texture_seed = wr_next(r);
    static const int plain_pal[6] = { 7, 10, 8, 2, 6, 4 };               /* white grey black yellow pink blue */
    bg->colour_a = plain_pal[wr_below(r, 6)];
    do bg->colour_b = wr_below(r, WORLD_COLOURS); while (bg->colour_b == bg->colour_a);
    bg->vertical = wr_below(r, 2);
    bg->phase = wr_below(r, 320);
    if (bg->kind == WBG_SKY) {
        bg->n_clouds = wr_range(r, 1, 3);
        for (int k = 0; k < bg->n_clouds; k++) {
            bg->cloud_x[k] = wr_range(r, 100, 924); bg->cloud_y[k] = wr_range(r, 60, 600); bg->cloud_r[k] = wr_range(r, 40, 70);
        }
    }
}

/* Region of a centre: x0, x1, y0, y1 in units. */
static void region_box(int where, int *x0, int *x1, int *y0, int *y1) {
    *x0 = 0; *x1 = 1024; *y0 = 0; *y1 = 1024;
    if (where == WW_LEFT) *x1 = 448;
    else if (where == WW_RIGHT) *x0 = 576;
    else if (where == WW_TOP) *y1 = 448;
    else if (where == WW_BOTTOM) *y0 = 576;
    else if (where == WW_CENTRE) { *x0 = 320; *x1 = 704; *y0 = 320; *y1 = 704; }
}

static int fits(const WorldScene *s, int gi, int k, int x, int y, int r) {
    if (x - r < 24 || x + r > 1000 || y - r < 24 || y + r > 1000) return 0;
    for (int g = 0; g <= gi; g++)
        for (int j = 0; j < (g == gi ? k : s->g[g].count); j++) {
            int64_t dx = x - s->g[g].x[j], dy = y - s->g[g].y[j], d = r + s->g[g].r[j] + 40;
            if (dx * dx + dy * dy < d * d) return 0;
        }
    return 1;
}

static void place_group(WRng *r, WorldScene *s, int gi) {
    WorldGroup *g = &s->g[gi];
    int x0, x1, y0, y1, want = g->count;
    region_box(g->where, &x0, &x1, &y0, &y1);
    g->count = 0;
    for (int k = 0; k < want; k++) {
        int ok = 0;
        for (int t = 0; t < 200 && !ok; t++) {
            int rad = g->size == 0 ? wr_range(r, 88, 112) : g->size == 1 ? wr_range(r, 122, 158) : wr_range(r, 170, 220);
            int x = wr_range(r, x0, x1 - 1), y = wr_range(r, y0, y1 - 1);
            if (fits(s, gi, k, x, y, rad)) { g->x[k] = x; g->y[k] = y; g->r[k] = rad; ok = 1; }
        }
        if (!ok) break;
        g->count = k + 1;
    }
}

void world_scene_make(uint64_t seed, int index, WorldScene *s) {
    WRng r = wr_stream(seed, WR_SCENE, (uint64_t)index);
    memset(s, 0, sizeof *s);
    make_background(&r, &s->bg);
    s->n_groups = wr_below(&r, 5) < 2 ? 1 : 2;
    s->relation = wr_below(&r, 4);
    for (int gi = 0; gi < s->n_groups; gi++) {
        WorldGroup *g = &s->g[gi];
        for (;;) {
            g->shape = wr_below(&r, WORLD_SHAPES);
            g->colour = wr_below(&r, WORLD_COLOURS);
            g->pattern = wr_below(&r, 5) < 3 ? 0 : 1 + wr_below(&r, 2);
            if (clashes(&s->bg, g->colour)) continue;
            if (gi == 1 && g->shape == s->g[0].shape && g->colour == s->g[0].colour && g->pattern == s->g[0].pattern) continue;
            break;
        }
        g->stripe_dir = wr_below(&r, 3);
        g->count = 1 + (wr_below(&r, 3) == 0) + (wr_below(&r, 4) == 0);
        g->size = g->count == 1 ? wr_below(&r, 3) : wr_below(&r, 2);
        if (s->n_groups == 2) {
            static const int first[4] = { WW_LEFT, WW_RIGHT, WW_TOP, WW_BOTTOM }, second[4] = { WW_RIGHT, WW_LEFT, WW_BOTTOM, WW_TOP };
            g->where = gi == 0 ? first[s->relation] : second[s->relation];
            if (g->size == 2) g->size = 1;
        } else g->where = wr_below(&r, WORLD_WHERES);
        place_group(&r, s, gi);
        if (g->count == 0) {                                            /* nothing fitted: a small one anywhere */
            g->size = 0; g->count = 1; g->where = s->n_groups == 2 ? g->where : WW_ANY;
            place_group(&r, s, gi);
            if (g->count == 0) { s->n_groups = gi; break; }
        }
    }
    if (s->n_groups == 0) {                                             /* cannot happen on an empty canvas */
        s->n_groups = 1; s->g[0].count = 1; s->g[0].x[0] = 512; s->g[0].y[0] = 512; s->g[0].r[0] = 100; s->g[0].where = WW_CENTRE;
    }
}

/* ---- captions ---- */
static const char *const count_words[4] = { "", "a|one", "two|a pair of", "three" };

static void group_phrase(WRng *r, const WorldGroup *g, WStr *b) {
    char w[64], noun[64], alt[64];
    pick_word(r, count_words[g->count], w, sizeof w);
    pick_word(r, shape_words[g->shape], alt, sizeof alt);
    {   /* "circle/circles" */
        char *sl = strchr(alt, '/');
        if (sl) { *sl = '\0'; snprintf(noun, sizeof noun, "%s", g->count == 1 ? alt : sl + 1); }
        else snprintf(noun, sizeof noun, "%s", alt);
    }
    char col[32], size[32] = "", pat[32] = "";
    pick_word(r, colours[g->colour].words, col, sizeof col);
    if (g->size == 0) pick_word(r, "small|little|tiny", size, sizeof size);
    else if (g->size == 2) pick_word(r, "large|big", size, sizeof size);
    int with = g->pattern && wr_below(r, 3) == 0;                      /* "with stripes" after the noun */
    if (g->pattern == 1) pick_word(r, with ? "with stripes" : "striped", pat, sizeof pat);
    else if (g->pattern == 2) pick_word(r, with ? "with dots|with polka dots|with spots" : "dotted|spotted|polka-dot", pat, sizeof pat);
    const char *first = size[0] ? size : col;
    if (!strcmp(w, "a") && strchr("aeiou", first[0])) strcpy(w, "an");
    ws_add(b, w); ws_add(b, " ");
    if (size[0]) { ws_add(b, size); ws_add(b, " "); }
    int pat_first = g->pattern && !with && wr_below(r, 3) == 0;        /* "striped red" or "red striped" */
    if (pat_first) { ws_add(b, pat); ws_add(b, " "); }
    ws_add(b, col); ws_add(b, " ");
    if (g->pattern && !with && !pat_first) { ws_add(b, pat); ws_add(b, " "); }
    ws_add(b, noun);
    if (with) { ws_add(b, " "); ws_add(b, pat); }
}

static void background_phrase(WRng *r, const WorldBackground *bg, WStr *b) {
    char w[96], a[32], c[32];
    switch (bg->kind) {
    case WBG_SKY: pick_word(r, "in the sky|against a blue sky|in front of a cloudy sky|with sky behind", w, sizeof w); break;
    case WBG_GRASS: pick_word(r, "on grass|on the grass|on a lawn|on green grass", w, sizeof w); break;
    case WBG_BRICK: pick_word(r, "in front of a brick wall|against a brick wall|by a brick wall", w, sizeof w); break;
    case WBG_WATER: pick_word(r, "on water|over the water|on the sea|on blue water", w, sizeof w); break;
    case WBG_PLAIN:
        pick_word(r, colours[bg->colour_a].words, a, sizeof a);
        snprintf(w, sizeof w, wr_below(r, 2) ? "on a plain %s background" : "on a %s background", a);
        break;
    case WBG_GRADIENT:
        pick_word(r, colours[bg->colour_a].words, a, sizeof a);
        pick_word(r, colours[bg->colour_b].words, c, sizeof c);
        snprintf(w, sizeof w, wr_below(r, 2) ? "on a %s to %s gradient" : "on a gradient from %s to %s", a, c);
        break;
    default:
        pick_word(r, colours[bg->colour_a].words, a, sizeof a);
        pick_word(r, colours[bg->colour_b].words, c, sizeof c);
        snprintf(w, sizeof w, wr_below(r, 2) ? "on a noisy %s and %s texture" : "on a mottled %s and %s texture", a, c);
        break;
    }
    ws_add(b, w);
}

static const char *const relation_words[4] = {
    "on the left of|to the left of|left of", "on the right of|to the right of|right of",
    "above|over", "below|under|beneath" };
static const char *const where_words[WORLD_WHERES] = {
    "", "on the left|at the left", "on the right|at the right", "at the top|near the top",
    "at the bottom|near the bottom", "in the centre|in the middle|in the center" };

static void scene_phrase(WRng *r, const WorldScene *s, WStr *b) {
    if (s->n_groups == 2) {
        int swap = wr_below(r, 2);                                     /* "B right of A" for "A left of B" */
        const WorldGroup *a = &s->g[swap], *c = &s->g[1 - swap];
        int rel = swap ? (s->relation ^ 1) : s->relation;
        char w[64];
        group_phrase(r, a, b);
        pick_word(r, relation_words[rel], w, sizeof w);
        ws_add(b, " "); ws_add(b, w); ws_add(b, " ");
        group_phrase(r, c, b);
    } else {
        group_phrase(r, &s->g[0], b);
        if (s->g[0].where != WW_ANY) {
            char w[64];
            pick_word(r, where_words[s->g[0].where], w, sizeof w);
            ws_add(b, " "); ws_add(b, w);
        }
    }
}

MsStatus world_caption(uint64_t seed, int index, const WorldScene *s, char *out, size_t cap) {
    WRng r = wr_stream(seed, WR_WORDS, (uint64_t)index);
    WStr b = { out, 0, cap, 0 };
    if (cap) out[0] = '\0';
    int order = wr_below(&r, 4);
    if (order == 0) {                                                   /* background first */
        WStr t;
        char tmp[160];
        t.s = tmp; t.n = 0; t.cap = sizeof tmp; t.overflow = 0; tmp[0] = '\0';
        background_phrase(&r, &s->bg, &t);
        ws_add(&b, t.s); ws_add(&b, ", ");
        scene_phrase(&r, s, &b);
    } else {
        if (order == 3) ws_add(&b, wr_below(&r, 2) ? "a picture of " : "an image of ");
        scene_phrase(&r, s, &b);
        ws_add(&b, order == 2 ? ", " : " ");
        background_phrase(&r, &s->bg, &b);
    }
    if (b.overflow) return ms_errorf(MS_ERR_ARG, "world_caption: caption longer than %zu bytes", cap);
    return MS_OK;
}

/* ---- character images ---- */
void world_character_scene(uint64_t seed, const WorldCharacter *c, int char_index, int image, WorldScene *s) {
    WRng r = wr_stream(seed, WR_POSE, (uint64_t)char_index * 1000 + (uint64_t)image);
    memset(s, 0, sizeof *s);
    do make_background(&r, &s->bg); while (clashes(&s->bg, c->body_colour) || clashes(&s->bg, c->limb_colour));
    s->n_chars = 1;
    s->chars[0] = *c;
    WorldCharInstance *ci = &s->inst[0];
    static const int arms[4] = { 6, 2, 0, 28 };                         /* down, out-down, out, up */
    ci->arm[0] = arms[wr_below(&r, 4)];
    ci->arm[1] = arms[wr_below(&r, 4)];
    ci->walking = wr_below(&r, 2);
    ci->facing = wr_below(&r, 2);
    ci->head_tilt = wr_range(&r, -20, 20);
    ci->scale = image == 0 ? 950 : wr_range(&r, 560, 1000);
    int hw, top, bot;
    char_extent(c, &hw, &top, &bot);
    int64_t shw = (int64_t)hw * ci->scale / 1000, st = (int64_t)top * ci->scale / 1000, sb = (int64_t)bot * ci->scale / 1000;
    int xlo = (int)shw + 8, xhi = 1016 - (int)shw, ylo = (int)st + 8, yhi = 1016 - (int)sb;
    if (xhi < xlo) xhi = xlo = 512;
    if (yhi < ylo) yhi = ylo = (int)((st + 1024 - sb) / 2);
    ci->x = wr_range(&r, xlo, xhi);
    ci->y = wr_range(&r, ylo, yhi);
}

/* "<TOK>, waving, walking, facing left, on grass, small, on the left": the first part is kept in
 * front by ShuffleCaption(keep_token_num=1), the others are shuffled during training. */
MsStatus world_character_caption(uint64_t seed, int char_index, int image, const WorldScene *s, const char *tok,
                                 char *out, size_t cap) {
    WRng r = wr_stream(seed, WR_POSE_WORDS, (uint64_t)char_index * 1000 + (uint64_t)image);
    WStr b = { out, 0, cap, 0 };
    const WorldCharInstance *ci = &s->inst[0];
    char w[96];
    if (cap) out[0] = '\0';
    ws_add(&b, tok);
    int up = ci->arm[0] == 28 || ci->arm[1] == 28, down = ci->arm[0] == 6 && ci->arm[1] == 6;
    ws_add(&b, ", ");
    pick_word(&r, up ? (ci->arm[0] == ci->arm[1] ? "arms raised|both arms up" : "waving|one arm raised")
                     : down ? "arms down|arms at its sides" : "arms out|arms spread", w, sizeof w);
    ws_add(&b, w); ws_add(&b, ", ");
    pick_word(&r, ci->walking ? "walking|striding" : "standing|standing still", w, sizeof w);
    ws_add(&b, w); ws_add(&b, ", ");
    ws_add(&b, ci->facing ? "facing left" : "facing right");
    ws_add(&b, ", ");
    background_phrase(&r, &s->bg, &b);
    if (ci->scale < 700) { pick_word(&r, "small|far away", w, sizeof w); ws_add(&b, ", "); ws_add(&b, w); }
    else if (ci->scale > 900) { pick_word(&r, "close-up|large", w, sizeof w); ws_add(&b, ", "); ws_add(&b, w); }
    if (ci->x < 400) { ws_add(&b, ", "); ws_add(&b, "on the left"); }
    else if (ci->x > 624) { ws_add(&b, ", "); ws_add(&b, "on the right"); }
    if (b.overflow) return ms_errorf(MS_ERR_ARG, "world_character_caption: caption longer than %zu bytes", cap);
    return MS_OK;
}

const char *world_ear_name(int e) { return e >= 0 && e < WORLD_EARS ? ear_names[e] : "?"; }
const char *world_tail_name(int t) { return t >= 0 && t < WORLD_TAILS ? tail_names[t] : "?"; }
const char *world_marking_name(int m) { return m >= 0 && m < WORLD_MARKINGS ? marking_names[m] : "?"; }

/* ---- multi-character layouts (for regionally controllable sampling) ---- */
void world_multi_scene(uint64_t seed, int index, int n_chars, const WorldCharacter *all, int n_all, WorldScene *s,
                       int *which) {
    WRng r = wr_stream(seed, WR_MULTI, (uint64_t)index);
    memset(s, 0, sizeof *s);
    if (n_chars > n_all) n_chars = n_all;
    if (n_chars > 3) n_chars = 3;
    int perm[WORLD_MAX_CHARACTERS];
    for (int i = 0; i < n_all; i++) perm[i] = i;
    for (int i = n_all - 1; i > 0; i--) { int j = wr_below(&r, i + 1), t = perm[i]; perm[i] = perm[j]; perm[j] = t; }
    for (;;) {
        make_background(&r, &s->bg);
        int ok = 1;
        for (int c = 0; c < n_chars; c++) ok &= !clashes(&s->bg, all[perm[c]].body_colour) && !clashes(&s->bg, all[perm[c]].limb_colour);
        if (ok) break;
    }
    s->n_chars = n_chars;
    for (int c = 0; c < n_chars; c++) {
        which[c] = perm[c];
        s->chars[c] = all[perm[c]];
        WorldCharInstance *ci = &s->inst[c];
        static const int arms[4] = { 6, 2, 0, 28 };
        ci->arm[0] = arms[wr_below(&r, 4)]; ci->arm[1] = arms[wr_below(&r, 4)];
        ci->walking = wr_below(&r, 2); ci->facing = wr_below(&r, 2);
        ci->head_tilt = wr_range(&r, -20, 20);
        int hw, top, bot;
        char_extent(&all[perm[c]], &hw, &top, &bot);
        int colw = 1024 / n_chars;                                     /* one column each, no overlap */
        int sc = (int)((int64_t)(colw / 2 - 12) * 1000 / hw);
        int sv = (int)((int64_t)(1000) * 1000 / (top + bot));
        if (sc > sv) sc = sv;
        if (sc > 900) sc = 900;
        ci->scale = sc - wr_below(&r, 80);
        int64_t st = (int64_t)top * ci->scale / 1000, sb = (int64_t)bot * ci->scale / 1000;
        ci->x = colw * c + colw / 2;
        ci->y = (int)(st + 12 + (1000 - 12 - st - sb) / 2);
    }
}

/* Bounding box (top, left, bottom, right, pixels, exclusive ends) of character c; 0 when absent. */
static int char_box(const uint8_t *owner, int S, int c, int *t, int *l, int *b, int *r) {
    int found = 0;
    *t = S; *l = S; *b = 0; *r = 0;
    for (int y = 0; y < S; y++)
        for (int x = 0; x < S; x++)
            if (owner[(size_t)y * S + x] == 100 + c) {
                found = 1;
                if (y < *t) *t = y;
                if (x < *l) *l = x;
                if (y + 1 > *b) *b = y + 1;
                if (x + 1 > *r) *r = x + 1;
            }
    return found;
}

/* ---- writing the dataset ---- */
static MsStatus write_text(const char *path, const char *text) {
    char tmp[1200];
    if (snprintf(tmp, sizeof tmp, "%s.tmp", path) >= (int)sizeof tmp) return ms_errorf(MS_ERR_ARG, "%s: path too long", path);
    FILE *f = fopen(tmp, "wb");
    if (!f) return ms_errorf(MS_ERR_IO, "%s: cannot create", tmp);
    size_t n = strlen(text);
    int ok = fwrite(text, 1, n, f) == n;
    ok &= fclose(f) == 0;
    if (!ok) { remove(tmp); return ms_errorf(MS_ERR_IO, "%s: write failed", tmp); }
    if (rename(tmp, path) != 0) { remove(tmp); return ms_errorf(MS_ERR_IO, "%s: cannot rename to %s", tmp, path); }
    return MS_OK;
}

static MsStatus make_dir_p(const char *path) {
    char buf[1024];
    size_t n = strlen(path);
    if (n >= sizeof buf) return ms_errorf(MS_ERR_ARG, "%s: path too long", path);
    memcpy(buf, path, n + 1);
    for (size_t i = 1; i <= n; i++)
        if (buf[i] == '/' || buf[i] == '\0') {
            char c = buf[i];
            buf[i] = '\0';
            world_mkdir(buf);                                          /* exists already: fine */
            buf[i] = c;
        }
    FILE *probe;
    char t[1100];
    snprintf(t, sizeof t, "%s/.world_probe", path);
    probe = fopen(t, "wb");
    if (!probe) return ms_errorf(MS_ERR_IO, "%s: cannot create the folder (or write into it)", path);
    fclose(probe);
    remove(t);
    return MS_OK;
}

static MsStatus write_png(const char *dir, const char *sub, const char *stem, const uint8_t *px, int S, int C) {
    char p[1100];
    if (snprintf(p, sizeof p, "%s/%s/%s.png", dir, sub, stem) >= (int)sizeof p) return ms_errorf(MS_ERR_ARG, "%s: path too long", dir);
    return ms_png_write(p, px, S, S, C);
}

/* A grid of images (each S x S x 3), cols wide, 2-pixel grey gaps. */
static MsStatus write_sheet(const char *path, uint8_t *const *imgs, int n, int cols, int S) {
    int rows = (n + cols - 1) / cols, g = 2, W = cols * (S + g) + g, H = rows * (S + g) + g;
    uint8_t *px = (uint8_t *)malloc((size_t)W * H * 3);
    if (!px) return ms_errorf(MS_ERR_NOMEM, "%s: out of memory", path);
    memset(px, 90, (size_t)W * H * 3);
    for (int i = 0; i < n; i++) {
        int ox = g + (i % cols) * (S + g), oy = g + (i / cols) * (S + g);
        for (int y = 0; y < S; y++) memcpy(px + ((size_t)(oy + y) * W + ox) * 3, imgs[i] + (size_t)y * S * 3, (size_t)S * 3);
    }
    MsStatus st = ms_png_write(path, px, W, H, 3);
    free(px);
    return st;
}

static const char *const yml_template =
    "name: %s\n"
    "manual_seed: 0\n"
    "mixed_precision: fp16\n"
    "gradient_accumulation_steps: 1\n"
    "\n"
    "# derived from Mix-of-Show options/train/EDLoRA/real/8101_EDLoRA_potter_Cmix_B4_Repeat500.yml by\n"
    "# `mixshow world` (seed %llu): the concept list, validation prompts, concept words, initializer\n"
    "# ('creature') and EnhanceText 'object' changed; the base model is a placeholder: set it with\n"
    "#   mixshow train --config THIS.yml --set models.pretrained_path=DIR\n"
    "# HumanResizeCropPlace is mixshow's HumanResizeCropFinalV3 on its own %dx%d canvas: the official\n"
    "# transform places images on a hard-coded 512 canvas and fails at smaller sizes (for the official\n"
    "# trainer write { type: HumanResizeCropFinalV3, size: 512, crop_p: 0.5 }: the images are upscaled).\n"
    "\n"
    "# dataset and data loader settings\n"
    "datasets:\n"
    "  train:\n"
    "    name: LoraDataset\n"
    "    concept_list: %s\n"
    "    use_caption: true\n"
    "    use_mask: true\n"
    "    instance_transform:\n"
    "      - { type: HumanResizeCropPlace, size: %d, crop_p: 0.5 }\n"
    "      - { type: ToTensor }\n"
    "      - { type: Normalize, mean: [ 0.5 ], std: [ 0.5 ] }\n"
    "      - { type: ShuffleCaption, keep_token_num: 1 }\n"
    "      - { type: EnhanceText, enhance_type: object }\n"
    "    replace_mapping:\n"
    "      <TOK>: <%s1> <%s2>\n"
    "    batch_size_per_gpu: 2\n"
    "    dataset_enlarge_ratio: 500\n"
    "\n"
    "  val_vis:\n"
    "    name: PromptDataset\n"
    "    prompts: %s\n"
    "    num_samples_per_prompt: 8\n"
    "    latent_size: [ 4,%d,%d ]\n"
    "    replace_mapping:\n"
    "      <TOK>: <%s1> <%s2>\n"
    "    batch_size_per_gpu: 4\n"
    "\n"
    "models:\n"
    "  pretrained_path: PLACEHOLDER/base-model\n"
    "  enable_edlora: true  # true means ED-LoRA, false means vallina LoRA\n"
    "  finetune_cfg:\n"
    "    text_embedding:\n"
    "      enable_tuning: true\n"
    "      lr: !!float 1e-3\n"
    "    text_encoder:\n"
    "      enable_tuning: true\n"
    "      lora_cfg:\n"
    "        rank: 4\n"
    "        alpha: 1.0\n"
    "        where: CLIPAttention\n"
    "      lr: !!float 1e-5\n"
    "    unet:\n"
    "      enable_tuning: true\n"
    "      lora_cfg:\n"
    "        rank: 4\n"
    "        alpha: 1.0\n"
    "        where: Attention\n"
    "      lr: !!float 1e-4\n"
    "  new_concept_token: <%s1>+<%s2>\n"
    "  initializer_token: <rand-0.013>+creature\n"
    "  noise_offset: 0.01\n"
    "  attn_reg_weight: 0.01\n"
    "  reg_full_identity: false\n"
    "  use_mask_loss: true\n"
    "  gradient_checkpoint: false\n"
    "  enable_xformers: true\n"
    "\n"
    "# path\n"
    "path:\n"
    "  pretrain_network: ~\n"
    "\n"
    "# training settings\n"
    "train:\n"
    "  optim_g:\n"
    "    type: AdamW\n"
    "    lr: !!float 0.0 # no use since we define different component lr in model\n"
    "    weight_decay: 0.01\n"
    "    betas: [ 0.9, 0.999 ] # align with taming\n"
    "\n"
    "  # dropkv\n"
    "  unet_kv_drop_rate: 0\n"
    "  scheduler: linear\n"
    "  emb_norm_threshold: !!float 5.5e-1\n"
    "\n"
    "# validation settings\n"
    "val:\n"
    "  val_during_save: true\n"
    "  compose_visualize: true\n"
    "  alpha_list: [0, 0.7, 1.0] # 0 means only visualize embedding (without lora weight)\n"
    "  sample:\n"
    "    num_inference_steps: 50\n"
    "    guidance_scale: 7.5\n"
    "\n"
    "# logging settings\n"
    "logger:\n"
    "  print_freq: 10\n"
    "  save_checkpoint_freq: !!float 10000\n";

static MsStatus write_character_files(const WorldOptions *o, const WorldCharacter *c) {
    char dir[1100], p[1200], list[1200], prompts[1200], *buf;
    MsStatus st = MS_OK;
    snprintf(dir, sizeof dir, "%s/characters/%s", o->out, c->name);
    snprintf(list, sizeof list, "%s/data_cfgs/%s.json", o->out, c->name);
    snprintf(prompts, sizeof prompts, "%s/validation_prompts/%s.txt", o->out, c->name);
    /* official concept list: one concept, instance_prompt <TOK> */
    buf = (char *)malloc(16384);
    if (!buf) return ms_errorf(MS_ERR_NOMEM, "world: out of memory");
    {
        char img[1200], cap[1200], msk[1200];
        snprintf(img, sizeof img, "%s/image", dir);
        snprintf(cap, sizeof cap, "%s/caption", dir);
        snprintf(msk, sizeof msk, "%s/mask", dir);
        /* JSON strings: the paths are escaped by hand (only '"' and '\\' can occur in a path) */
        char e[3][2400];
        const char *src[3] = { img, cap, msk };
        for (int k = 0; k < 3; k++) {
            size_t j = 0;
            for (const char *q = src[k]; *q && j + 3 < sizeof e[k]; q++) {
                if (*q == '"' || *q == '\\') e[k][j++] = '\\';
                e[k][j++] = *q;
            }
            e[k][j] = '\0';
        }
        snprintf(buf, 16384,
                 "[\n    {\n        \"instance_prompt\": \"<TOK>\",\n        \"instance_data_dir\": \"%s\",\n"
                 "        \"caption_dir\": \"%s\",\n        \"mask_dir\": \"%s\"\n    }\n]\n", e[0], e[1], e[2]);
    }
    st = write_text(list, buf);
    if (st == MS_OK) {
        snprintf(buf, 16384,
                 "photo of a <TOK>\n<TOK>\nphoto of a creature\na <TOK> on grass\na <TOK> in the sky\n"
                 "a <TOK> in front of a brick wall\na <TOK> on the left, waving\na <TOK>, walking, facing left, on water\n");
        st = write_text(prompts, buf);
    }
    if (st == MS_OK) {
        char name[64];
        snprintf(name, sizeof name, "EDLoRA_%.7s_World_B2_Repeat500", c->name);
        snprintf(p, sizeof p, "%s/options/%s.yml", o->out, c->name);
        snprintf(buf, 16384, yml_template, name, (unsigned long long)o->seed, o->size, o->size, list, o->size, c->name, c->name,
                 prompts, o->size / 8, o->size / 8, c->name, c->name, c->name, c->name);
        st = write_text(p, buf);
    }
    free(buf);
    return st;
}

MsStatus world_generate(const WorldOptions *o) {
    int S = o->size, n = o->n, K = o->characters, P = o->per_character;
    if (!o->out || !*o->out) return ms_errorf(MS_ERR_ARG, "world: --out DIR is required");
    if (strlen(o->out) > 700) return ms_errorf(MS_ERR_ARG, "world: --out path longer than 700 bytes");
    if (S != 64 && S != 128) return ms_errorf(MS_ERR_ARG, "world: --size %d: expected 64 or 128", S);
    if (n < 0 || n > 1000000) return ms_errorf(MS_ERR_ARG, "world: --n %d: expected 0..1000000", n);
    if (K < 0 || K > WORLD_MAX_CHARACTERS) return ms_errorf(MS_ERR_ARG, "world: --characters %d: expected 0..%d", K, WORLD_MAX_CHARACTERS);
    if (P < 5 || P > 10) return ms_errorf(MS_ERR_ARG, "world: --per-character %d: expected 5..10", P);
    static const char *const subs[5] = { "image", "caption", "mask", "pose", "sketch" };
    char d[1100];
    MsStatus st = MS_OK;
    size_t np = (size_t)S * S;
    uint8_t *rgb = (uint8_t *)malloc(np * 3), *mask = (uint8_t *)malloc(np), *pose = (uint8_t *)malloc(np * 3);
    uint8_t *sketch = (uint8_t *)malloc(np * 3), *owner = (uint8_t *)malloc(np);
    int n_sheet = n < 16 ? n : 16, n_csheet = K * P;
    uint8_t *sheet = (uint8_t *)malloc(np * 3 * (size_t)(n_sheet + n_csheet + 1));
    uint8_t *ptrs_buf[16 + WORLD_MAX_CHARACTERS * 10];
    char *cap = (char *)malloc(1024), stem[64], path[1200];
    if (!rgb || !mask || !pose || !sketch || !owner || !sheet || !cap) { st = ms_errorf(MS_ERR_NOMEM, "world: out of memory"); goto done; }
    for (int k = 0; k < 5 && st == MS_OK; k++) { snprintf(d, sizeof d, "%s/scenes/%s", o->out, subs[k]); st = make_dir_p(d); }
    for (int i = 0; i < n && st == MS_OK; i++) {
        WorldScene s;
        world_scene_make(o->seed, i, &s);
        st = world_render(&s, S, rgb, mask, pose, sketch);
        if (st == MS_OK) st = world_caption(o->seed, i, &s, cap, 1023);
        snprintf(stem, sizeof stem, "%06d", i);
        snprintf(d, sizeof d, "%s/scenes", o->out);
        if (st == MS_OK) st = write_png(d, "image", stem, rgb, S, 3);
        if (st == MS_OK) st = write_png(d, "mask", stem, mask, S, 1);
        if (st == MS_OK) st = write_png(d, "pose", stem, pose, S, 3);
        if (st == MS_OK) st = write_png(d, "sketch", stem, sketch, S, 3);
        if (st == MS_OK) { strcat(cap, "\n"); snprintf(path, sizeof path, "%s/caption/%s.txt", d, stem); st = write_text(path, cap); }
        if (st == MS_OK && i < n_sheet) { memcpy(sheet + np * 3 * (size_t)i, rgb, np * 3); ptrs_buf[i] = sheet + np * 3 * (size_t)i; }
        if (o->progress && st == MS_OK && ((i + 1) % 1000 == 0 || i + 1 == n)) fprintf(stderr, "world: %d/%d scenes\n", i + 1, n);
    }
    if (st == MS_OK && n_sheet) { snprintf(path, sizeof path, "%s/contact_sheet.png", o->out); st = write_sheet(path, ptrs_buf, n_sheet, 4, S); }
    WorldCharacter chars[WORLD_MAX_CHARACTERS];
    for (int c = 0; c < K && st == MS_OK; c++) {
        world_character_make(o->seed, c, &chars[c]);
        snprintf(d, sizeof d, "%s/characters/%s", o->out, chars[c].name);
        for (int k = 0; k < 5 && st == MS_OK; k++) { snprintf(path, sizeof path, "%s/%s", d, subs[k]); st = make_dir_p(path); }
        for (int k = 0; k < P && st == MS_OK; k++) {
            WorldScene s;
            world_character_scene(o->seed, &chars[c], c, k, &s);
            st = world_render(&s, S, rgb, mask, pose, sketch);
            if (st == MS_OK) st = world_character_caption(o->seed, c, k, &s, "<TOK>", cap, 1023);
            snprintf(stem, sizeof stem, "%.7s_%02d", chars[c].name, k);
            if (st == MS_OK) st = write_png(d, "image", stem, rgb, S, 3);
            if (st == MS_OK) st = write_png(d, "mask", stem, mask, S, 1);
            if (st == MS_OK) st = write_png(d, "pose", stem, pose, S, 3);
            if (st == MS_OK) st = write_png(d, "sketch", stem, sketch, S, 3);
            if (st == MS_OK) { strcat(cap, "\n"); snprintf(path, sizeof path, "%s/caption/%s.txt", d, stem); st = write_text(path, cap); }
            if (st == MS_OK) {
                uint8_t *dst = sheet + np * 3 * (size_t)(n_sheet + c * P + k);
                memcpy(dst, rgb, np * 3);
                ptrs_buf[n_sheet + c * P + k] = dst;
            }
        }
    }
    if (st == MS_OK && K) {
        snprintf(d, sizeof d, "%s/data_cfgs", o->out); st = make_dir_p(d);
        if (st == MS_OK) { snprintf(d, sizeof d, "%s/options", o->out); st = make_dir_p(d); }
        if (st == MS_OK) { snprintf(d, sizeof d, "%s/validation_prompts", o->out); st = make_dir_p(d); }
        for (int c = 0; c < K && st == MS_OK; c++) st = write_character_files(o, &chars[c]);
        if (st == MS_OK) { snprintf(path, sizeof path, "%s/characters_sheet.png", o->out); st = write_sheet(path, ptrs_buf + n_sheet, K * P, P, S); }
    }
    /* multi-character layouts with boxes, for regionally controllable sampling */
    if (st == MS_OK && K >= 2) {
        snprintf(d, sizeof d, "%s/multi", o->out);
        st = make_dir_p(d);
        for (int m = 0; m < 4 && st == MS_OK; m++) {
            WorldScene s;
            int which[3] = { 0, 0, 0 }, nc = (K >= 3 && (m & 1)) ? 3 : 2;
            world_multi_scene(o->seed, m, nc, chars, K, &s, which);
            st = world_render(&s, S, rgb, mask, pose, sketch);
            if (st == MS_OK) st = render_owner(&s, S, owner);
            snprintf(stem, sizeof stem, "%d", m);
            snprintf(path, sizeof path, "%s/%s.png", d, stem);
            if (st == MS_OK) st = ms_png_write(path, rgb, S, S, 3);
            snprintf(path, sizeof path, "%s/%s_pose.png", d, stem);
            if (st == MS_OK) st = ms_png_write(path, pose, S, S, 3);
            snprintf(path, sizeof path, "%s/%s_sketch.png", d, stem);
            if (st == MS_OK) st = ms_png_write(path, sketch, S, S, 3);
            if (st == MS_OK) {
                char bgp[160], txt[2048], rw[1400] = "";
                WStr b = { bgp, 0, sizeof bgp, 0 };
                WRng r = wr_stream(o->seed, WR_MULTI_WORDS, (uint64_t)m);
                bgp[0] = '\0';
                background_phrase(&r, &s.bg, &b);
                int len = snprintf(txt, sizeof txt, "context_prompt='%s creatures %s'\n", nc == 2 ? "two" : "three", bgp);
                for (int c = 0; c < nc; c++) {
                    int t, l, bb, rr;
                    const char *nm = chars[which[c]].name;
                    if (!char_box(owner, S, c, &t, &l, &bb, &rr)) { t = l = 0; bb = rr = S; }
                    len += snprintf(txt + len, sizeof txt - (size_t)len, "region%d_prompt='a <%s1> <%s2>, %s'\nregion%d='[%d, %d, %d, %d]'\n",
                                    c + 1, nm, nm, bgp, c + 1, t, l, bb, rr);
                    size_t rl = strlen(rw);
                    snprintf(rw + rl, sizeof rw - rl, "%s[a <%s1> <%s2>, %s]-*-[]-*-[%d, %d, %d, %d]", c ? "|" : "", nm, nm, bgp, t, l, bb, rr);
                }
                snprintf(txt + len, sizeof txt - (size_t)len, "prompt_rewrite='%s'\n", rw);
                snprintf(path, sizeof path, "%s/%s.txt", d, stem);
                st = write_text(path, txt);
            }
        }
    }
done:
    free(rgb); free(mask); free(pose); free(sketch); free(owner); free(sheet); free(cap);
    return st;
}
