/* tools/zip.c — zip archives, as far as PyTorch checkpoints need them (PKWARE APPNOTE 6.3.x).
 *
 * Reader: finds the end-of-central-directory record from the end of the file (bounded search
 * over the last 64 KiB + 22 bytes), follows the zip64 locator/record when present, reads the
 * central directory, and cross-checks every member's local header (name, method, and sizes/CRC
 * unless bit 3 defers them to a data descriptor, as torch's writer does). Every offset and size
 * from the file is bounds- and overflow-checked; member data must lie before the central
 * directory. Members are stored or deflated (ms_inflate_into, tools/zlib.c, capped at the
 * size the directory declares, so a deflate bomb stops there); each member's CRC-32
 * (ms_crc32) is verified before its bytes are trusted.
 *
 * Writer: stored members only, every data start on a 64-byte boundary (torch 1.13's writer,
 * PyTorchStreamWriter over miniz, pads with an extra field of id "FB" = 0x4246 filled with
 * 'Z'), zip64 fields when a size or offset needs them, written to "<path>.tmp" and renamed.
 */
#if !defined(_WIN32) && !defined(_POSIX_C_SOURCE)
#define _POSIX_C_SOURCE 200809L   /* fseeko/ftello: 64-bit offsets on 32-bit hosts */
#endif
#include "mixshow.h"
#include "tools/tools.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ---------------------------------------------------------------------------------------- */
/* 64-bit file offsets (the one platform-specific corner of this file)                       */
/* ---------------------------------------------------------------------------------------- */
#if defined(_WIN32)
static int seek64(FILE *f, uint64_t off) { return _fseeki64(f, (__int64)off, SEEK_SET); }
static int64_t size64(FILE *f) { if (_fseeki64(f, 0, SEEK_END)) return -1; return _ftelli64(f); }
#elif defined(__unix__) || defined(__APPLE__)
#include <sys/types.h>
static int seek64(FILE *f, uint64_t off) {
    if (off > (uint64_t)INT64_MAX || (sizeof(off_t) < 8 && off > 0x7fffffffu)) return -1;
    return fseeko(f, (off_t)off, SEEK_SET);
}
static int64_t size64(FILE *f) { if (fseeko(f, 0, SEEK_END)) return -1; return (int64_t)ftello(f); }
#else
#include <limits.h>
static int seek64(FILE *f, uint64_t off) { if (off > (uint64_t)LONG_MAX) return -1; return fseek(f, (long)off, SEEK_SET); }
static int64_t size64(FILE *f) { if (fseek(f, 0, SEEK_END)) return -1; return (int64_t)ftell(f); }
#endif

static uint32_t rd16(const unsigned char *p) { return (uint32_t)p[0] | (uint32_t)p[1] << 8; }
static uint32_t rd32(const unsigned char *p) {
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}
static uint64_t rd64(const unsigned char *p) { return (uint64_t)rd32(p) | (uint64_t)rd32(p + 4) << 32; }
static void wr16(unsigned char *p, uint32_t v) { p[0] = (unsigned char)v; p[1] = (unsigned char)(v >> 8); }
static void wr32(unsigned char *p, uint32_t v) { wr16(p, v & 0xffff); wr16(p + 2, v >> 16); }
static void wr64(unsigned char *p, uint64_t v) { wr32(p, (uint32_t)v); wr32(p + 4, (uint32_t)(v >> 32)); }

/* ---------------------------------------------------------------------------------------- */
/* Reader                                                                                    */
/* ---------------------------------------------------------------------------------------- */
/* n bytes at file offset off; a range past the end is a format error. */
static MsStatus src_read(ZipReader *z, uint64_t off, void *buf, size_t n, const char *what) {
    if (off > z->size || n > z->size - off)
        return ms_errorf(MS_ERR_FORMAT, "%s: %s at offset %llu (+%zu bytes) is past the end of the "
                         "file (%llu bytes)", z->path, what, (unsigned long long)off, n,
                         (unsigned long long)z->size);
    if (n == 0) return MS_OK;
    if (z->mem) { memcpy(buf, z->mem + off, n); return MS_OK; }
    if (seek64((FILE *)z->f, off) || fread(buf, 1, n, (FILE *)z->f) != n)
        return ms_errorf(MS_ERR_IO, "%s: cannot read %s at offset %llu", z->path, what, (unsigned long long)off);
    return MS_OK;
}

void zip_close(ZipReader *z) {
    if (z->f) fclose((FILE *)z->f);
    for (size_t i = 0; i < z->n; i++) free(z->e[i].name);
    free(z->e);
    free(z->path);
    memset(z, 0, sizeof *z);
}

/* The zip64 extended-information extra field (id 0x0001) replaces, in this order, each of
 * usize, csize, local offset that the fixed field set to 0xFFFFFFFF. */
static MsStatus zip64_extra(ZipReader *z, const char *name, const unsigned char *ex, size_t exlen,
                            uint64_t *usize, uint64_t *csize, uint64_t *loff) {
    size_t i = 0;
    while (i + 4 <= exlen) {
        uint32_t id = rd16(ex + i), len = rd16(ex + i + 2);
        if (len > exlen - i - 4)
            return ms_errorf(MS_ERR_FORMAT, "%s: member '%s': extra field 0x%04x overruns its "
                             "block (%u bytes)", z->path, name, (unsigned)id, (unsigned)len);
        if (id == 0x0001) {
            const unsigned char *p = ex + i + 4;
            size_t need = 0;
            uint64_t *fields[3];
            int nf = 0;
            if (*usize == 0xffffffffu) fields[nf++] = usize;
            if (csize && *csize == 0xffffffffu) fields[nf++] = csize;
            if (loff && *loff == 0xffffffffu) fields[nf++] = loff;
            need = (size_t)nf * 8;
            if (len < need)
                return ms_errorf(MS_ERR_FORMAT, "%s: member '%s': zip64 extra field has %u bytes, "
                                 "needs %zu", z->path, name, (unsigned)len, need);
            for (int k = 0; k < nf; k++) *fields[k] = rd64(p + 8 * k);
            return MS_OK;
        }
        i += 4 + len;
    }
    if (*usize == 0xffffffffu || (csize && *csize == 0xffffffffu) || (loff && *loff == 0xffffffffu))
        return ms_errorf(MS_ERR_FORMAT, "%s: member '%s': size/offset 0xFFFFFFFF without a zip64 "
                         "extra field", z->path, name);
    return MS_OK;
}

/* Locates the central directory: EOCD, then zip64 locator + record if present. */
static MsStatus find_cd(ZipReader *z, uint64_t *cd_off, uint64_t *cd_size, uint64_t *count,
                        uint64_t *cd_end_limit) {
    unsigned char *tail;
    size_t tn = z->size < 22 + 65535 ? (size_t)z->size : 22 + 65535;
    uint64_t base = z->size - tn;
    MsStatus s;
    if (z->size < 22)
        return ms_errorf(MS_ERR_FORMAT, "%s: %llu bytes is too short for a zip archive (no "
                         "end-of-central-directory record)", z->path, (unsigned long long)z->size);
    if (!(tail = (unsigned char *)malloc(tn))) return ms_errorf(MS_ERR_NOMEM, "%s: out of memory", z->path);
    if ((s = src_read(z, base, tail, tn, "end of central directory"))) { free(tail); return s; }
    size_t at = tn;                                   /* search backwards for PK\5\6 */
    for (size_t i = tn - 22 + 1; i-- > 0;)
        if (tail[i] == 'P' && tail[i + 1] == 'K' && tail[i + 2] == 5 && tail[i + 3] == 6 &&
            rd16(tail + i + 20) == tn - i - 22) { at = i; break; }
    if (at == tn) {
        free(tail);
        return ms_errorf(MS_ERR_FORMAT, "%s: not a zip archive (no end-of-central-directory "
                         "record in the last %zu bytes)", z->path, tn);
    }
    const unsigned char *e = tail + at;
    uint64_t eocd = base + at;
    if (rd16(e + 4) != 0 || rd16(e + 6) != 0 || rd16(e + 8) != rd16(e + 10)) {
        free(tail);
        return ms_errorf(MS_ERR_UNSUPPORTED, "%s: multi-disk zip archives are not supported", z->path);
    }
    *count = rd16(e + 10);
    *cd_size = rd32(e + 12);
    *cd_off = rd32(e + 16);
    *cd_end_limit = eocd;
    free(tail);
    if (eocd >= 20) {                                 /* zip64 end-of-central-directory locator */
        unsigned char loc[20], rec[56];
        if ((s = src_read(z, eocd - 20, loc, 20, "zip64 locator"))) return s;
        if (rd32(loc) == 0x07064b50u) {
            uint64_t roff = rd64(loc + 8);
            if (rd32(loc + 4) != 0 || rd32(loc + 16) > 1)
                return ms_errorf(MS_ERR_UNSUPPORTED, "%s: multi-disk zip64 archives are not supported", z->path);
            if (roff > eocd - 20 || eocd - 20 - roff < 56)
                return ms_errorf(MS_ERR_FORMAT, "%s: zip64 record offset %llu does not fit before "
                                 "its locator at %llu", z->path, (unsigned long long)roff,
                                 (unsigned long long)(eocd - 20));
            if ((s = src_read(z, roff, rec, 56, "zip64 end-of-central-directory record"))) return s;
            if (rd32(rec) != 0x06064b50u)
                return ms_errorf(MS_ERR_FORMAT, "%s: no zip64 end-of-central-directory record at "
                                 "offset %llu (the locator points there)", z->path, (unsigned long long)roff);
            if (rd32(rec + 16) != 0 || rd32(rec + 20) != 0 || rd64(rec + 24) != rd64(rec + 32))
                return ms_errorf(MS_ERR_UNSUPPORTED, "%s: multi-disk zip64 archives are not supported", z->path);
            *count = rd64(rec + 32);
            *cd_size = rd64(rec + 40);
            *cd_off = rd64(rec + 48);
            *cd_end_limit = roff;
        }
    }
    if (*count > ZIP_MAX_ENTRIES)
        return ms_errorf(MS_ERR_UNSUPPORTED, "%s: %llu members (more than the limit %u)", z->path,
                         (unsigned long long)*count, (unsigned)ZIP_MAX_ENTRIES);
    if (*cd_off > *cd_end_limit || *cd_size > *cd_end_limit - *cd_off)
        return ms_errorf(MS_ERR_FORMAT, "%s: central directory (offset %llu, %llu bytes) does not "
                         "end before the end record at %llu", z->path, (unsigned long long)*cd_off,
                         (unsigned long long)*cd_size, (unsigned long long)*cd_end_limit);
    if (*count && *cd_size / 46 < *count)
        return ms_errorf(MS_ERR_FORMAT, "%s: central directory of %llu bytes cannot hold %llu members",
                         z->path, (unsigned long long)*cd_size, (unsigned long long)*count);
    return MS_OK;
}

/* Parses the central directory and checks each local header. */
static MsStatus read_cd(ZipReader *z) {
    uint64_t cd_off = 0, cd_size = 0, count = 0, limit = 0;
    unsigned char *cd = NULL;
    MsStatus s = find_cd(z, &cd_off, &cd_size, &count, &limit);
    if (s) return s;
    if (!(cd = (unsigned char *)malloc(cd_size ? (size_t)cd_size : 1)) ||
        !(z->e = (ZipEntry *)calloc(count ? (size_t)count : 1, sizeof *z->e))) {
        free(cd);
        return ms_errorf(MS_ERR_NOMEM, "%s: out of memory for the central directory", z->path);
    }
    if ((s = src_read(z, cd_off, cd, (size_t)cd_size, "central directory"))) { free(cd); return s; }
    size_t p = 0;
    for (uint64_t k = 0; k < count; k++) {
        ZipEntry *e = &z->e[z->n];
        if (cd_size - p < 46 || rd32(cd + p) != 0x02014b50u) {
            s = ms_errorf(MS_ERR_FORMAT, "%s: central directory entry %llu at offset %llu: bad "
                          "signature or truncated", z->path, (unsigned long long)k,
                          (unsigned long long)(cd_off + p));
            break;
        }
        const unsigned char *h = cd + p;
        uint32_t flags = rd16(h + 8), nlen = rd16(h + 28), xlen = rd16(h + 30), clen = rd16(h + 32);
        uint64_t loff = rd32(h + 42);
        if ((size_t)46 + nlen + xlen + clen > cd_size - p) {
            s = ms_errorf(MS_ERR_FORMAT, "%s: central directory entry %llu overruns the directory",
                          z->path, (unsigned long long)k);
            break;
        }
        if (nlen == 0 || nlen > ZIP_MAX_NAME || memchr(h + 46, 0, nlen)) {
            s = ms_errorf(MS_ERR_FORMAT, "%s: central directory entry %llu: bad name (%u bytes)",
                          z->path, (unsigned long long)k, (unsigned)nlen);
            break;
        }
        if (!(e->name = (char *)malloc(nlen + 1))) { s = ms_errorf(MS_ERR_NOMEM, "%s: out of memory", z->path); break; }
        memcpy(e->name, h + 46, nlen);
        e->name[nlen] = '\0';
        z->n++;
        e->method = (int)rd16(h + 10);
        e->crc = rd32(h + 16);
        e->csize = rd32(h + 20);
        e->usize = rd32(h + 24);
        if ((s = zip64_extra(z, e->name, h + 46 + nlen, xlen, &e->usize, &e->csize, &loff))) break;
        p += (size_t)46 + nlen + xlen + clen;
        if (flags & 0x41) { s = ms_errorf(MS_ERR_UNSUPPORTED, "%s: member '%s' is encrypted", z->path, e->name); break; }
        if (e->method != 0 && e->method != 8) {
            s = ms_errorf(MS_ERR_UNSUPPORTED, "%s: member '%s': compression method %d (only stored "
                          "and deflate are supported)", z->path, e->name, e->method);
            break;
        }
        if (e->method == 0 && e->csize != e->usize) {
            s = ms_errorf(MS_ERR_FORMAT, "%s: stored member '%s' has compressed size %llu != size "
                          "%llu", z->path, e->name, (unsigned long long)e->csize, (unsigned long long)e->usize);
            break;
        }
        /* deflate cannot expand more than 1032:1; a bigger claim is a bomb or a lie */
        if (e->method == 8 && e->usize / 1032 > e->csize + 1) {
            s = ms_errorf(MS_ERR_FORMAT, "%s: deflated member '%s' claims %llu bytes from %llu "
                          "(more than deflate's 1032:1)", z->path, e->name,
                          (unsigned long long)e->usize, (unsigned long long)e->csize);
            break;
        }
        /* local header: same name and method; sizes and CRC unless a data descriptor has them */
        unsigned char lh[30];
        if (loff > cd_off || cd_off - loff < 30) {
            s = ms_errorf(MS_ERR_FORMAT, "%s: member '%s': local header offset %llu is not before "
                          "the central directory (%llu)", z->path, e->name, (unsigned long long)loff,
                          (unsigned long long)cd_off);
            break;
        }
        if ((s = src_read(z, loff, lh, 30, "local header"))) break;
        uint32_t lnlen = rd16(lh + 26), lxlen = rd16(lh + 28), lflags = rd16(lh + 6);
        if (rd32(lh) != 0x04034b50u || lnlen != nlen || rd16(lh + 8) != (uint32_t)e->method) {
            s = ms_errorf(MS_ERR_FORMAT, "%s: member '%s': local header at %llu does not match the "
                          "central directory (signature, name length or method)", z->path, e->name,
                          (unsigned long long)loff);
            break;
        }
        uint64_t doff = loff + 30 + lnlen + lxlen;
        if (doff > cd_off || e->csize > cd_off - doff) {
            s = ms_errorf(MS_ERR_FORMAT, "%s: member '%s': data at %llu (+%llu bytes) runs into the "
                          "central directory at %llu", z->path, e->name, (unsigned long long)doff,
                          (unsigned long long)e->csize, (unsigned long long)cd_off);
            break;
        }
        unsigned char *lv = (unsigned char *)malloc((size_t)lnlen + lxlen + 1);
        if (!lv) { s = ms_errorf(MS_ERR_NOMEM, "%s: out of memory", z->path); break; }
        if ((s = src_read(z, loff + 30, lv, (size_t)lnlen + lxlen, "local header name"))) { free(lv); break; }
        if (memcmp(lv, e->name, nlen)) {
            free(lv);
            s = ms_errorf(MS_ERR_FORMAT, "%s: member '%s': local header names it differently", z->path, e->name);
            break;
        }
        if (!(lflags & 8)) {
            uint64_t lus = rd32(lh + 22), lcs = rd32(lh + 18);
            if ((s = zip64_extra(z, e->name, lv + lnlen, lxlen, &lus, &lcs, NULL))) { free(lv); break; }
            if (rd32(lh + 14) != e->crc || lus != e->usize || lcs != e->csize) {
                free(lv);
                s = ms_errorf(MS_ERR_FORMAT, "%s: member '%s': local header CRC/sizes (%08x, %llu, "
                              "%llu) differ from the central directory (%08x, %llu, %llu)", z->path,
                              e->name, (unsigned)rd32(lh + 14), (unsigned long long)lcs,
                              (unsigned long long)lus, (unsigned)e->crc,
                              (unsigned long long)e->csize, (unsigned long long)e->usize);
                break;
            }
        }
        free(lv);
        e->data_off = doff;
    }
    free(cd);
    return s;
}

static MsStatus open_common(ZipReader *z) {
    MsStatus s = read_cd(z);
    if (s) zip_close(z);
    return s;
}

MsStatus zip_open(ZipReader *z, const char *path) {
    FILE *f;
    int64_t sz;
    memset(z, 0, sizeof *z);
    if (!(z->path = (char *)malloc(strlen(path) + 1))) return ms_errorf(MS_ERR_NOMEM, "%s: out of memory", path);
    strcpy(z->path, path);
    if (!(f = fopen(path, "rb"))) { zip_close(z); return ms_errorf(MS_ERR_IO, "%s: cannot open", path); }
    z->f = f;
    if ((sz = size64(f)) < 0) { zip_close(z); return ms_errorf(MS_ERR_IO, "%s: cannot get the file size", path); }
    z->size = (uint64_t)sz;
    return open_common(z);
}

MsStatus zip_open_mem(ZipReader *z, const void *data, size_t size, const char *label) {
    memset(z, 0, sizeof *z);
    if (!label) label = "<memory>";
    if (!(z->path = (char *)malloc(strlen(label) + 1))) return ms_errorf(MS_ERR_NOMEM, "%s: out of memory", label);
    strcpy(z->path, label);
    z->mem = (const unsigned char *)data;
    z->size = size;
    return open_common(z);
}

const ZipEntry *zip_find(const ZipReader *z, const char *name) {
    for (size_t i = 0; i < z->n; i++) if (!strcmp(z->e[i].name, name)) return &z->e[i];
    return NULL;
}

/* Inflates a deflated member into a new buffer of usize (+1) bytes and checks its CRC. */
static MsStatus inflate_member(ZipReader *z, ZipEntry *e, unsigned char **out) {
    unsigned char *c = NULL, *u = NULL;
    size_t got = 0;
    MsStatus s;
    if (e->usize >= SIZE_MAX || e->csize > SIZE_MAX)
        return ms_errorf(MS_ERR_NOMEM, "%s: member '%s' (%llu bytes) does not fit in memory",
                         z->path, e->name, (unsigned long long)e->usize);
    if (!(c = (unsigned char *)malloc(e->csize ? (size_t)e->csize : 1)) ||
        !(u = (unsigned char *)malloc((size_t)e->usize + 1))) {
        free(c); free(u);
        return ms_errorf(MS_ERR_NOMEM, "%s: member '%s': out of memory", z->path, e->name);
    }
    if ((s = src_read(z, e->data_off, c, (size_t)e->csize, e->name))) { free(c); free(u); return s; }
    s = ms_inflate_into(c, (size_t)e->csize, 0, u, (size_t)e->usize, &got);   /* tools/zlib.c */
    free(c);
    if (s) {
        char msg[512];
        snprintf(msg, sizeof msg, "%s", ms_last_error());
        free(u);
        return ms_errorf(s, "%s: member '%s': %s", z->path, e->name, msg);
    }
    if (got != e->usize) {
        free(u);
        return ms_errorf(MS_ERR_FORMAT, "%s: member '%s' inflates to %zu bytes, the directory says %llu",
                         z->path, e->name, got, (unsigned long long)e->usize);
    }
    if (ms_crc32(0, u, got) != e->crc) {
        free(u);
        return ms_errorf(MS_ERR_FORMAT, "%s: member '%s': CRC-32 mismatch (data corrupt)", z->path, e->name);
    }
    e->crc_ok = 1;
    *out = u;
    return MS_OK;
}

/* Streams a stored member once to verify its CRC. */
static MsStatus verify_stored(ZipReader *z, ZipEntry *e) {
    unsigned char *buf;
    size_t chunk = 1 << 20;
    uint32_t crc = 0;
    MsStatus s = MS_OK;
    if (!(buf = (unsigned char *)malloc(chunk))) return ms_errorf(MS_ERR_NOMEM, "%s: out of memory", z->path);
    for (uint64_t o = 0; o < e->usize && !s; o += chunk) {
        size_t n = e->usize - o < chunk ? (size_t)(e->usize - o) : chunk;
        if (!(s = src_read(z, e->data_off + o, buf, n, e->name))) crc = ms_crc32(crc, buf, n);
    }
    free(buf);
    if (s) return s;
    if (crc != e->crc) return ms_errorf(MS_ERR_FORMAT, "%s: member '%s': CRC-32 mismatch (data corrupt)", z->path, e->name);
    e->crc_ok = 1;
    return MS_OK;
}

MsStatus zip_read(ZipReader *z, const ZipEntry *ce, uint64_t off, void *buf, size_t n) {
    ZipEntry *e = &z->e[ce - z->e];
    MsStatus s;
    if (off > e->usize || n > e->usize - off)
        return ms_errorf(MS_ERR_FORMAT, "%s: member '%s': range %llu+%zu is past its end (%llu bytes)",
                         z->path, e->name, (unsigned long long)off, n, (unsigned long long)e->usize);
    if (e->method == 8) {
        unsigned char *u;
        if ((s = inflate_member(z, e, &u))) return s;
        memcpy(buf, u + off, n);
        free(u);
        return MS_OK;
    }
    if (!e->crc_ok && !(off == 0 && n == e->usize) && (s = verify_stored(z, e))) return s;
    if ((s = src_read(z, e->data_off + off, buf, n, e->name))) return s;
    if (!e->crc_ok) {                                  /* the whole member: check it now */
        if (ms_crc32(0, buf, n) != e->crc)
            return ms_errorf(MS_ERR_FORMAT, "%s: member '%s': CRC-32 mismatch (data corrupt)", z->path, e->name);
        e->crc_ok = 1;
    }
    return MS_OK;
}

MsStatus zip_read_alloc(ZipReader *z, const ZipEntry *ce, unsigned char **out, size_t *len) {
    ZipEntry *e = &z->e[ce - z->e];
    unsigned char *u;
    MsStatus s;
    *out = NULL;
    if (e->method == 8) {
        if ((s = inflate_member(z, e, &u))) return s;
    } else {
        if (e->usize >= SIZE_MAX || !(u = (unsigned char *)malloc((size_t)e->usize + 1)))
            return ms_errorf(MS_ERR_NOMEM, "%s: member '%s': out of memory", z->path, e->name);
        if ((s = zip_read(z, e, 0, u, (size_t)e->usize))) { free(u); return s; }
    }
    u[e->usize] = 0;
    *out = u;
    if (len) *len = (size_t)e->usize;
    return MS_OK;
}

/* ---------------------------------------------------------------------------------------- */
/* Writer                                                                                    */
/* ---------------------------------------------------------------------------------------- */
struct ZipWEntry { char *name; uint64_t loff, size; uint32_t crc; };

static void wput(ZipWriter *w, const void *p, size_t n) {
    if (w->status) return;
    if (n && fwrite(p, 1, n, (FILE *)w->f) != n) w->status = ms_errorf(MS_ERR_IO, "%s: write failed", w->tmp);
    w->pos += n;
}

MsStatus zip_writer_open(ZipWriter *w, const char *path, int force_zip64) {
    memset(w, 0, sizeof *w);
    size_t n = strlen(path);
    w->force_zip64 = force_zip64;
    if (!(w->path = (char *)malloc(n + 1)) || !(w->tmp = (char *)malloc(n + 5))) {
        free(w->path); free(w->tmp);
        return ms_errorf(MS_ERR_NOMEM, "%s: out of memory", path);
    }
    strcpy(w->path, path);
    strcpy(w->tmp, path);
    strcat(w->tmp, ".tmp");
    if (!(w->f = fopen(w->tmp, "wb"))) {
        free(w->path); free(w->tmp);
        return ms_errorf(MS_ERR_IO, "%s: cannot create", w->tmp);
    }
    return MS_OK;
}

MsStatus zip_writer_add(ZipWriter *w, const char *name, const void *data, size_t n) {
    size_t nlen = strlen(name);
    int z64 = w->force_zip64 || (uint64_t)n >= 0xffffffffu;
    unsigned char h[30 + 20];
    if (w->status) return w->status;
    if (nlen == 0 || nlen > ZIP_MAX_NAME) return w->status = ms_errorf(MS_ERR_ARG, "%s: bad member name", w->path);
    if (w->n == w->cap) {
        size_t cap = w->cap ? 2 * w->cap : 16;
        struct ZipWEntry *e = (struct ZipWEntry *)realloc(w->e, cap * sizeof *e);
        if (!e) return w->status = ms_errorf(MS_ERR_NOMEM, "%s: out of memory", w->path);
        w->e = e; w->cap = cap;
    }
    struct ZipWEntry *e = &w->e[w->n];
    if (!(e->name = (char *)malloc(nlen + 1))) return w->status = ms_errorf(MS_ERR_NOMEM, "%s: out of memory", w->path);
    strcpy(e->name, name);
    w->n++;
    e->loff = w->pos;
    e->size = n;
    e->crc = ms_crc32(0, (const uint8_t *)data, n);
    /* extra: [zip64 0x0001: usize, csize] then "FB" padding so that the data is 64-aligned */
    size_t xz = z64 ? 20 : 0;
    uint64_t end = w->pos + 30 + nlen + xz + 4;      /* data start with an empty FB field */
    size_t pad = (size_t)((64 - end % 64) % 64);
    size_t xlen = xz + 4 + pad;
    wr32(h, 0x04034b50u);
    wr16(h + 4, z64 ? 45 : 20);        /* version needed */
    wr16(h + 6, 0x0800);               /* UTF-8 names; sizes known up front, no data descriptor */
    wr16(h + 8, 0);                    /* stored */
    wr16(h + 10, 0); wr16(h + 12, 0x21);   /* time 00:00, date 1980-01-01 */
    wr32(h + 14, e->crc);
    wr32(h + 18, z64 ? 0xffffffffu : (uint32_t)n);
    wr32(h + 22, z64 ? 0xffffffffu : (uint32_t)n);
    wr16(h + 26, (uint32_t)nlen);
    wr16(h + 28, (uint32_t)xlen);
    wput(w, h, 30);
    wput(w, name, nlen);
    if (z64) {
        wr16(h, 1); wr16(h + 2, 16); wr64(h + 4, n); wr64(h + 12, n);
        wput(w, h, 20);
    }
    wr16(h, 0x4246); wr16(h + 2, (uint32_t)pad);
    wput(w, h, 4);
    {
        unsigned char z[64];
        memset(z, 'Z', sizeof z);
        wput(w, z, pad);
    }
    wput(w, data, n);
    return w->status;
}

MsStatus zip_writer_close(ZipWriter *w, int commit) {
    MsStatus s;
    if (commit && !w->status) {
        uint64_t cd_off = w->pos;
        unsigned char h[56];
        for (size_t i = 0; i < w->n; i++) {
            const struct ZipWEntry *e = &w->e[i];
            size_t nlen = strlen(e->name);
            int zs = w->force_zip64 || e->size >= 0xffffffffu, zo = w->force_zip64 || e->loff >= 0xffffffffu;
            size_t xlen = (zs || zo) ? 4 + (zs ? 16 : 0) + (zo ? 8 : 0) : 0;
            wr32(h, 0x02014b50u);
            wr16(h + 4, (zs || zo) ? 45 : 20);   /* made by: MS-DOS, spec 4.5 / 2.0 */
            wr16(h + 6, (zs || zo) ? 45 : 20);
            wr16(h + 8, 0x0800); wr16(h + 10, 0); wr16(h + 12, 0); wr16(h + 14, 0x21);
            wr32(h + 16, e->crc);
            wr32(h + 20, zs ? 0xffffffffu : (uint32_t)e->size);
            wr32(h + 24, zs ? 0xffffffffu : (uint32_t)e->size);
            wr16(h + 28, (uint32_t)nlen); wr16(h + 30, (uint32_t)xlen); wr16(h + 32, 0);
            wr16(h + 34, 0); wr16(h + 36, 0); wr32(h + 38, 0);
            wr32(h + 42, zo ? 0xffffffffu : (uint32_t)e->loff);
            wput(w, h, 46);
            wput(w, e->name, nlen);
            if (xlen) {
                unsigned char x[28];
                size_t k = 4;
                wr16(x, 1); wr16(x + 2, (uint32_t)(xlen - 4));
                if (zs) { wr64(x + k, e->size); wr64(x + k + 8, e->size); k += 16; }
                if (zo) { wr64(x + k, e->loff); k += 8; }
                wput(w, x, k);
            }
        }
        uint64_t cd_size = w->pos - cd_off;
        int z64 = w->force_zip64 || w->n >= 0xffff || cd_off >= 0xffffffffu || cd_size >= 0xffffffffu;
        if (z64) {
            uint64_t rec = w->pos;
            wr32(h, 0x06064b50u); wr64(h + 4, 44); wr16(h + 12, 45); wr16(h + 14, 45);
            wr32(h + 16, 0); wr32(h + 20, 0); wr64(h + 24, w->n); wr64(h + 32, w->n);
            wr64(h + 40, cd_size); wr64(h + 48, cd_off);
            wput(w, h, 56);
            wr32(h, 0x07064b50u); wr32(h + 4, 0); wr64(h + 8, rec); wr32(h + 16, 1);
            wput(w, h, 20);
        }
        wr32(h, 0x06054b50u); wr16(h + 4, 0); wr16(h + 6, 0);
        wr16(h + 8, z64 ? 0xffff : (uint32_t)w->n); wr16(h + 10, z64 ? 0xffff : (uint32_t)w->n);
        wr32(h + 12, z64 ? 0xffffffffu : (uint32_t)cd_size);
        wr32(h + 16, z64 ? 0xffffffffu : (uint32_t)cd_off);
        wr16(h + 20, 0);
        wput(w, h, 22);
    }
    if (fclose((FILE *)w->f) && !w->status) w->status = ms_errorf(MS_ERR_IO, "%s: write failed", w->tmp);
    s = commit ? w->status : MS_OK;
    if (commit && !s) {
#if defined(_WIN32)
        remove(w->path);                  /* rename() does not replace on Windows */
#endif
        if (rename(w->tmp, w->path)) s = ms_errorf(MS_ERR_IO, "%s: cannot rename %s onto it", w->path, w->tmp);
    }
    if (!commit || s) remove(w->tmp);
    for (size_t i = 0; i < w->n; i++) free(w->e[i].name);
    free(w->e); free(w->path); free(w->tmp);
    memset(w, 0, sizeof *w);
    return s;
}
