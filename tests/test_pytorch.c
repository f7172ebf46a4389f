/* tests/test_pytorch.c — PyTorch checkpoints: zip container, restricted unpickler, writer.
 *
 * Goldens (tests/data/pth/, written by torch 1.13's torch.save in tools/ref/gen_pth_golden.py):
 * every tensor's name, dtype, shape and requires_grad, its values bit-exact in its own dtype,
 * and as float32 bit-exact against torch's .float(). Then: a write -> read round trip (nested
 * dicts, all dtypes, zip64 fields), and every hostile or broken file in tests/data/bad/pth/
 * must fail with a message (printed), never crash.
 */
#include "tests/test.h"
#include "tools/tools.h"

#include <stdio.h>

/* Swaps n little-endian values of es bytes in place into host order (no-op on little-endian
 * hosts). Each range is converted once: expected values are compared right after. */
static void le_to_host(unsigned char *p, size_t n, size_t es) {
    const uint16_t one = 1;
    unsigned char first;
    memcpy(&first, &one, 1);
    if (first == 1 || es < 2) return;
    for (size_t i = 0; i < n; i++, p += es)
        for (size_t a = 0, b = es - 1; a < b; a++, b--) { unsigned char t = p[a]; p[a] = p[b]; p[b] = t; }
}

static unsigned char *read_file(const char *path, size_t *n) {
    FILE *f = fopen(path, "rb");
    unsigned char *p = NULL;
    long sz;
    if (!f) return NULL;
    if (fseek(f, 0, SEEK_END) || (sz = ftell(f)) < 0 || fseek(f, 0, SEEK_SET)) { fclose(f); return NULL; }
    p = (unsigned char *)malloc((size_t)sz + 1);
    if (p && fread(p, 1, (size_t)sz, f) != (size_t)sz) { free(p); p = NULL; }
    fclose(f);
    if (p) *n = (size_t)sz;
    return p;
}

/* Compares one golden file with its .expect.txt/.expect.bin. */
static void golden(const char *stem, int flags) {
    char path[256], line[1024];
    PthFile f;
    size_t nbin = 0, nexp = 0;
    unsigned char *bin;
    FILE *txt;
    int fails = 0;
    snprintf(path, sizeof path, "tests/data/pth/%s.expect.bin", stem);
    bin = read_file(path, &nbin);
    snprintf(path, sizeof path, "tests/data/pth/%s.expect.txt", stem);
    txt = fopen(path, "r");
    if (!check(bin && txt, "%s: golden files present", stem)) { free(bin); if (txt) fclose(txt); return; }
    snprintf(path, sizeof path, "tests/data/pth/%s.pth", stem);
    MsStatus s = pth_open_ex(&f, path, flags);
    if (!check(s == MS_OK, "%s: pth_open (%s)", path, ms_last_error())) { free(bin); fclose(txt); return; }
    if (test_is_verbose()) printf("%s", f.summary);
    while (fgets(line, sizeof line, txt)) {
        char name[512], dt[16];
        int rg, nd, pos, k;
        int64_t shape[MS_MAX_DIMS];
        long long ro, rn, fo;
        if (line[0] == '#') continue;
        if (sscanf(line, "%511s %15s %d %d%n", name, dt, &rg, &nd, &pos) != 4 || nd < 0 || nd > MS_MAX_DIMS) { fails++; continue; }
        for (k = 0; k < nd; k++) { long long v; int adv; sscanf(line + pos, "%lld%n", &v, &adv); shape[k] = v; pos += adv; }
        sscanf(line + pos, "%lld %lld %lld", &ro, &rn, &fo);
        if (!strcmp(name, "\"\"")) name[0] = '\0';
        nexp++;
        const PthTensor *t = pth_find(&f, name);
        if (!t) { check(0, "%s: tensor '%s' found", stem, name); fails++; continue; }
        int ok = !strcmp(pth_dtype_name(t->dtype), dt) && t->requires_grad == rg && t->ndim == nd;
        for (k = 0; ok && k < nd; k++) ok = t->shape[k] == shape[k];
        size_t numel = pth_numel(t), es = pth_dtype_size(t->dtype);
        ok = ok && (size_t)rn == numel * es && (size_t)(fo + 4 * (long long)numel) <= nbin;
        if (!ok) { check(0, "%s: '%s' dtype %s/%s rg %d/%d ndim %d/%d", stem, name, pth_dtype_name(t->dtype), dt,
                         t->requires_grad, rg, t->ndim, nd); fails++; continue; }
        unsigned char *raw = (unsigned char *)malloc(numel * es + 1);
        float *f32 = (float *)malloc(numel * 4 + 4);
        s = pth_read_raw(&f, t, raw);
        MsStatus s2 = s ? s : pth_read_f32(&f, t, f32);
        /* the readers return host byte order; the .expect.bin files are little-endian */
        le_to_host(bin + ro, numel, es);
        le_to_host(bin + fo, numel, 4);
        int same = !s2 && !memcmp(raw, bin + ro, numel * es) && !memcmp(f32, bin + fo, numel * 4);
        if (!same) {
            check(0, "%s: '%s' values bit-exact (%s)", stem, name, s2 ? ms_last_error() : "differ");
            fails++;
        }
        free(raw); free(f32);
    }
    check(fails == 0 && nexp == f.n, "%s: %zu tensors, all names, dtypes, shapes, requires_grad and values "
          "bit-exact (raw and as f32); %zu in the file", stem, nexp, f.n);
    pth_close(&f);
    free(bin); fclose(txt);
}

static void structure(void) {
    PthFile f;
    if (pth_open(&f, "tests/data/pth/edlora.pth")) { check(0, "edlora: open (%s)", ms_last_error()); return; }
    const PthTensor *t = pth_find(&f, "params.new_concept_embedding.<cat1>");
    check(t && t->ndim == 2 && t->shape[0] == 16 && t->shape[1] == 32 && t->requires_grad &&
          !strcmp(t->name + t->leaf, "<cat1>"), "edlora: <cat1> is [16, 32] requires_grad, leaf key '<cat1>'");
    t = pth_find(&f, "params.text_encoder.text_model.encoder.layers.1.self_attn.out_proj.lora_up.weight");
    check(t && !strcmp(t->name + t->leaf, "text_model.encoder.layers.1.self_attn.out_proj.lora_up.weight"),
          "edlora: text encoder LoRA key with dots is one leaf");
    check(strstr(f.summary, "new_concept_embedding: dict (2)") != NULL, "edlora: summary lists the structure");
    printf("  edlora summary (head):\n%.600s\n", f.summary);
    pth_close(&f);
    if (pth_open(&f, "tests/data/pth/views.pth")) { check(0, "views: open (%s)", ms_last_error()); return; }
    t = pth_find(&f, "T");
    check(t && t->stride[0] == 1 && t->stride[1] == 6 && f.t[0].entry == t->entry,
          "views: transposed view keeps strides (1, 6) and shares the storage record");
    pth_close(&f);
    if (pth_open(&f, "tests/data/pth/basic.pth")) { check(0, "basic: open (%s)", ms_last_error()); return; }
    check(pth_find(&f, "7") && pth_find(&f, "list.1.0") && pth_find(&f, "param") && pth_find(&f, "param")->requires_grad,
          "basic: int key '7', list path 'list.1.0', Parameter with requires_grad");
    check(strstr(f.summary, "step: int 1000") && strstr(f.summary, "big: int 4611686018427387904"),
          "basic: summary shows non-tensor values (LONG1 2**62)");
    pth_close(&f);
}

/* Writes nested dicts of every dtype, reads them back bit-exact. */
static void round_trip(void) {
    MsRng r;
    float a[6 * 5], emb[16 * 8];
    int64_t ids[7] = { 0, -1, 255, 256, 65536, -2147483649LL, 4611686018427387904LL };
    uint16_t h[3] = { 0x3c00, 0x8001, 0x7bff };        /* 1, -tiny subnormal, 65504 */
    unsigned char bools[4] = { 1, 0, 0, 1 };
    double dd[2] = { 1.0 / 3.0, -1e300 };
    ms_rng_seed(&r, 7);
    ms_rng_fill_normal(&r, a, 30, 0.0f, 1.0f);
    ms_rng_fill_normal(&r, emb, 128, 0.0f, 0.02f);
    PthSaveTensor t[] = {
        { "params.new_concept_embedding.<dog1>", 2, PTH_F32, 2, { 16, 8 }, emb, 1 },
        { "params.unet.down_blocks.0.attn2.to_k.lora_down.weight", 2, PTH_F32, 2, { 6, 5 }, a, 1 },
        { "params.unet.x.lora_up.weight", 2, PTH_F32, 3, { 1, 5, 6 }, a, 0 },
        { "ids", 0, PTH_I64, 1, { 7 }, ids, 0 },
        { "half", 0, PTH_F16, 1, { 3 }, h, 1 },
        { "mask", 0, PTH_BOOL, 2, { 2, 2 }, bools, 0 },
        { "d", 0, PTH_F64, 1, { 2 }, dd, 0 },
        { "scalar", 0, PTH_F32, 0, { 0 }, a, 0 },
        { "empty", 0, PTH_F32, 2, { 0, 3 }, a, 0 },
    };
    size_t nt = sizeof t / sizeof t[0];
    const char *path = "build/test_pytorch_roundtrip.pth";
    PthFile f;
    MsStatus s = pth_save(path, t, nt);
    if (!check(s == MS_OK, "pth_save %s (%s)", path, ms_last_error())) return;
    if (!check(pth_open(&f, path) == MS_OK, "round trip: open (%s)", ms_last_error())) return;
    int ok = f.n == nt;
    for (size_t i = 0; i < nt && ok; i++) {
        const PthTensor *g = pth_find(&f, t[i].name);
        size_t numel = 1, es = pth_dtype_size(t[i].dtype);
        for (int d = 0; d < t[i].ndim; d++) numel *= (size_t)t[i].shape[d];
        ok = g && g->dtype == t[i].dtype && g->ndim == t[i].ndim && g->requires_grad == t[i].requires_grad &&
             pth_numel(g) == numel && !memcmp(g->shape, t[i].shape, sizeof(int64_t) * (size_t)t[i].ndim);
        if (ok) {
            unsigned char *buf = (unsigned char *)malloc(numel * es + 1);
            ok = !pth_read_raw(&f, g, buf) && !memcmp(buf, t[i].data, numel * es);
            free(buf);
        }
        if (!ok) printf("      first mismatch: '%s'\n", t[i].name);
    }
    check(ok, "round trip: %zu tensors (nested dicts, F32/I64/F16/BOOL/F64, 0-dim, empty) bit-exact", nt);
    {
        const PthTensor *g = pth_find(&f, "half");
        float v[3];
        check(g && !pth_read_f32(&f, g, v) && v[0] == 1.0f && v[1] == -0x1p-24f && v[2] == 65504.0f,
              "F16 -> F32 exact (1, -2^-24 subnormal, 65504)");
    }
    {   /* the data records start on 64-byte boundaries, like torch's writer */
        int aligned = 1;
        for (size_t i = 0; i < f.zip.n; i++) aligned &= f.zip.e[i].data_off % 64 == 0;
        check(aligned, "writer: every member's data is 64-byte aligned");
    }
    pth_close(&f);
    {
        PthSaveTensor bad[2] = { t[3], t[3] };
        check(pth_save("build/test_pytorch_bad.pth", bad, 2) == MS_ERR_ARG, "writer refuses a repeated name: %s", ms_last_error());
        bad[0] = t[3]; bad[0].requires_grad = 1;
        check(pth_save("build/test_pytorch_bad.pth", bad, 1) == MS_ERR_ARG, "writer refuses requires_grad on I64: %s", ms_last_error());
        FILE *x = fopen("build/test_pytorch_bad.pth", "rb");
        check(!x, "a failed save leaves no file behind");
        if (x) fclose(x);
    }
}

/* zip64 fields on every member (forced), read back through the zip64 paths. */
static void zip64_round_trip(void) {
    ZipWriter w;
    ZipReader z;
    unsigned char data[300], back[300];
    for (int i = 0; i < 300; i++) data[i] = (unsigned char)(i * 7);
    if (!check(zip_writer_open(&w, "build/test_pytorch_z64.zip", 1) == MS_OK, "zip64 writer open")) return;
    zip_writer_add(&w, "a/x", data, 300);
    zip_writer_add(&w, "a/y", data, 1);
    zip_writer_add(&w, "a/empty", data, 0);
    if (!check(zip_writer_close(&w, 1) == MS_OK, "zip64 writer close (%s)", ms_last_error())) return;
    if (!check(zip_open(&z, "build/test_pytorch_z64.zip") == MS_OK, "zip64 open (%s)", ms_last_error())) return;
    const ZipEntry *e = zip_find(&z, "a/x");
    check(z.n == 3 && e && e->usize == 300 && !zip_read(&z, e, 0, back, 300) && !memcmp(back, data, 300),
          "zip64: 3 members, 300 bytes back intact");
    check(e && !zip_read(&z, e, 100, back, 50) && !memcmp(back, data + 100, 50), "zip64: partial read (CRC verified by streaming)");
    check(e && zip_read(&z, e, 290, back, 20) == MS_ERR_FORMAT, "zip: read past a member's end refused: %s", ms_last_error());
    zip_close(&z);
}

static void bad_files(void) {
    static const char *bad[] = {
        "global_os_system", "reduce_builtins_eval", "posix_system_newobj", "memo_out_of_range",
        "huge_long_binput", "deep_mark", "recursive_list", "long_string", "no_stop",
        "storage_too_short", "missing_record", "truncated", "not_a_zip", "crc_mismatch",
        "zip64_cd_past_eof", "zip64_member_past_eof", "deflate_bomb_lie", "deflate_bomb_ratio",
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        char path[256];
        PthFile f;
        snprintf(path, sizeof path, "tests/data/bad/pth/%s.pth", bad[i]);
        ms_clear_error();
        MsStatus s = pth_open(&f, path);
        if (!s) {   /* CRC and storage errors surface when the tensor is read */
            for (size_t k = 0; k < f.n && !s; k++) {
                float *buf = (float *)malloc(pth_numel(&f.t[k]) * 4 + 4);
                s = pth_read_f32(&f, &f.t[k], buf);
                free(buf);
            }
            pth_close(&f);
        }
        check(s != MS_OK && ms_last_error()[0], "%-24s refused: %s", bad[i], ms_last_error());
        if (s != MS_OK) printf("  %-24s -> %s\n", bad[i], ms_last_error());
    }
    {   /* specific messages that matter */
        PthFile f;
        pth_open(&f, "tests/data/bad/pth/global_os_system.pth");
        check(strstr(ms_last_error(), "'os.system' is not allowed") != NULL, "os.system named in the error");
        pth_open(&f, "tests/data/bad/pth/reduce_builtins_eval.pth");
        check(strstr(ms_last_error(), "'builtins.eval' is not allowed") != NULL, "builtins.eval named in the error");
        check(pth_open(&f, "tests/data/pth/lenient.pth") == MS_ERR_FORMAT && strstr(ms_last_error(), "'numpy.core.multiarray.scalar' is not allowed"),
              "strict mode refuses a training checkpoint's object: %s", ms_last_error());
        check(pth_open_ex(&f, "tests/data/pth/lenient.pth", PTH_LENIENT) == MS_OK &&
              strstr(f.summary, "cb: object __main__.Callback (not loaded)") && strstr(f.summary, "global_step: object numpy"),
              "lenient mode: objects shown as inert placeholders in the summary");
        if (f.summary) printf("  lenient summary:\n%s", f.summary);
        pth_close(&f);
        check(pth_open(&f, "tests/data/pth/legacy.pth") == MS_ERR_UNSUPPORTED && strstr(ms_last_error(), "legacy"),
              "legacy format refused clearly: %s", ms_last_error());
    }
}

/* Every prefix and many single-byte corruptions of a good file: never a crash (ASan run). */
static void mutations(void) {
    size_t n = 0, refused = 0, opened = 0;
    unsigned char *good = read_file("tests/data/pth/proto4.pth", &n), *m;
    if (!check(good != NULL, "mutations: proto4.pth read")) return;
    m = (unsigned char *)malloc(n);
    MsRng r;
    ms_rng_seed(&r, 99);
    for (size_t k = 0; k < 600; k++) {
        PthFile f;
        size_t len = n;
        memcpy(m, good, n);
        if (k < 200) len = k * n / 200;                                 /* truncations */
        else for (int j = 0; j < 1 + (int)(k % 3); j++) m[ms_rng_u64(&r) % n] ^= (unsigned char)(1 + ms_rng_u64(&r) % 255);
        if (pth_open_mem(&f, m, len, "mutant", 0)) { refused++; continue; }
        opened++;
        for (size_t i = 0; i < f.n; i++) {
            float *buf = (float *)malloc(pth_numel(&f.t[i]) * 4 + 4);
            if (pth_read_f32(&f, &f.t[i], buf)) refused++;
            free(buf);
        }
        pth_close(&f);
    }
    check(refused > 200, "mutations: 600 damaged files, %zu opened, %zu errors, no crash", opened, refused);
    free(m); free(good);
}

int main(void) {
    golden("basic", 0);
    golden("edlora", 0);
    golden("views", 0);
    golden("state_dict", 0);
    golden("proto4", 0);
    golden("flat_tensor", 0);
    golden("deflated", 0);
    golden("lenient", PTH_LENIENT);
    structure();
    round_trip();
    zip64_round_trip();
    bad_files();
    mutations();
    return test_summary("test_pytorch");
}
