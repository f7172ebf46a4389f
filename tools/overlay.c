/* tools/overlay.c — region boxes and their prompts drawn on an image (mixshow sample --overlay),
 * so a person checks placement at a glance. A built-in 3x5 bitmap font of our own (upper case,
 * digits and the punctuation of prompts; lower case is drawn as upper case, anything else as
 * '?'), scaled with the image. No image library. */
#include "tools/tools.h"

#include <string.h>

/* FONT[c - 32]: 15 bits, rows top to bottom, 3 columns each, the top-left pixel the high bit. */
static const uint16_t FONT[96] = {
    0x0000, 0x2482, 0x0000, 0x0000, 0x0000, 0x0000, 0x0000, 0x2400,
    0x2922, 0x224a, 0x0000, 0x05d0, 0x0014, 0x01c0, 0x0002, 0x12a4,
    0x7b6f, 0x2c97, 0x62a7, 0x628e, 0x5bc9, 0x798e, 0x39ef, 0x7292,
    0x7bef, 0x7bce, 0x0410, 0x0000, 0x1511, 0x0e38, 0x4454, 0x6282,
    0x0000, 0x2bed, 0x6bae, 0x3923, 0x6b6e, 0x79a7, 0x79a4, 0x396b,
    0x5bed, 0x7497, 0x126a, 0x5bad, 0x4927, 0x5fed, 0x6b6d, 0x2b6a,
    0x6ba4, 0x2b73, 0x6bad, 0x388e, 0x7492, 0x5b6f, 0x5b6a, 0x5bfd,
    0x5aad, 0x5a92, 0x72a7, 0x6926, 0x0000, 0x324b, 0x0000, 0x0007,
    0x0000, 0x0000, 0x0000, 0x0000, 0x0000, 0x0000, 0x0000, 0x0000,
    0x0000, 0x0000, 0x0000, 0x0000, 0x0000, 0x0000, 0x0000, 0x0000,
    0x0000, 0x0000, 0x0000, 0x0000, 0x0000, 0x0000, 0x0000, 0x0000,
    0x0000, 0x0000, 0x0000, 0x0000, 0x0000, 0x0000, 0x0000, 0x0000,
};

static const uint8_t PALETTE[6][3] = { { 255, 64, 64 }, { 64, 200, 255 }, { 255, 210, 0 },
                                       { 80, 255, 80 }, { 255, 80, 255 }, { 255, 150, 40 } };

static void put(uint8_t *px, int w, int h, int x, int y, const uint8_t *c) {
    if (x < 0 || y < 0 || x >= w || y >= h) return;
    memcpy(px + ((size_t)y * w + x) * 3, c, 3);
}

static void fill(uint8_t *px, int w, int h, int x0, int y0, int x1, int y1, const uint8_t *c) {
    for (int y = y0; y < y1; y++)
        for (int x = x0; x < x1; x++) put(px, w, h, x, y, c);
}

static uint16_t glyph(unsigned char ch) {
    if (ch >= 'a' && ch <= 'z') ch = (unsigned char)(ch - 'a' + 'A');
    if (ch < 32 || ch > 127) ch = '?';
    uint16_t g = FONT[ch - 32];
    return g || ch == ' ' ? g : FONT['?' - 32];
}

void regional_overlay(uint8_t *px, int w, int h, int n, const double (*box)[4], const char *const *label) {
    int s = (w < h ? w : h) / 192;                       /* font scale: 1 below 384 pixels */
    if (s < 1) s = 1;
    const int t = s > 1 ? s : 1;                         /* frame thickness */
    static const uint8_t black[3] = { 0, 0, 0 };
    for (int r = 0; r < n; r++) {
        const uint8_t *c = PALETTE[r % 6];
        int y0 = (int)box[r][0], x0 = (int)box[r][1], y1 = (int)box[r][2], x1 = (int)box[r][3];
        fill(px, w, h, x0, y0, x1, y0 + t, c);           /* frame */
        fill(px, w, h, x0, y1 - t, x1, y1, c);
        fill(px, w, h, x0, y0, x0 + t, y1, c);
        fill(px, w, h, x1 - t, y0, x1, y1, c);
        /* label: "<n> prompt" on a dark band inside the box's top, cut at the box's width */
        char text[256];
        size_t len = 0;
        text[len++] = (char)('1' + r % 9);
        text[len++] = ' ';
        for (const char *q = label && label[r] ? label[r] : ""; *q && len < sizeof text - 1; q++) text[len++] = *q;
        text[len] = 0;
        const int adv = 4 * s, line = 6 * s, pad = t + s;
        int per_line = (x1 - x0 - 2 * pad) / adv, lines = per_line > 0 ? ((int)len + per_line - 1) / per_line : 0;
        if (lines > 3) lines = 3;
        if (lines <= 0) continue;
        fill(px, w, h, x0 + t, y0 + t, x1 - t, y0 + t + lines * line + s, black);
        for (int k = 0; k < lines * per_line && k < (int)len; k++) {
            uint16_t g = glyph((unsigned char)text[k]);
            int gx = x0 + pad + (k % per_line) * adv, gy = y0 + t + s + (k / per_line) * line;
            for (int row = 0; row < 5; row++)
                for (int col = 0; col < 3; col++)
                    if (g >> (14 - (row * 3 + col)) & 1) fill(px, w, h, gx + col * s, gy + row * s, gx + col * s + s, gy + row * s + s, c);
        }
    }
}
