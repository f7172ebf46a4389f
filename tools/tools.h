/* tools/tools.h — what the CLI's files share: one entry point per subcommand, and the codecs
 * (safetensors, JSON, pickle/zip, PNG, JPEG) that only tools/ may touch. */
#ifndef MS_TOOLS_H
#define MS_TOOLS_H

#include "mixshow.h"

/* Subcommands: argv[0] is the subcommand name. Return the process exit status. */
int cmd_bench(int argc, char **argv);

/* ---- zlib: inflate/deflate, CRC-32, Adler-32 (tools/zlib.c) ---- */
/* RFC 1950/1951. Errors name the byte offset in `in`; callers add the file name (copy
 * ms_last_error() into a local buffer first: ms_errorf overwrites it). */
uint32_t ms_crc32(uint32_t crc, const uint8_t *p, size_t n);    /* start with 0; PNG/zip/gzip CRC */
uint32_t ms_adler32(uint32_t adler, const uint8_t *p, size_t n); /* start with 1 */
/* Inflates raw deflate (zlib_header 0, zip members) or a zlib stream (1: header and Adler-32
 * checked). *out is malloc'ed (free() it), grows as needed, and producing more than max_out
 * bytes is an error (decompression-bomb cap). Bytes after the end of the stream are ignored. */
MsStatus ms_inflate(const uint8_t *in, size_t in_len, int zlib_header, size_t max_out,
                    uint8_t **out, size_t *out_len);
/* Same into a caller buffer: error if the stream holds more than cap bytes; *out_len is what
 * it held (check it against what you expected). */
MsStatus ms_inflate_into(const uint8_t *in, size_t in_len, int zlib_header, uint8_t *out,
                         size_t cap, size_t *out_len);
/* Deflate with level 0 (stored blocks only) .. 9 (longer LZ77 hash chains); each block is
 * stored, fixed or dynamic Huffman, whichever is smallest. *out malloc'ed (free() it). */
MsStatus ms_deflate(const uint8_t *in, size_t in_len, int zlib_header, int level,
                    uint8_t **out, size_t *out_len);

/* ---- safetensors + JSON (tools/safetensors.c, tools/json.c) ---- */
/* JSON (RFC 8259), tools/json.c. The parser validates UTF-8, decodes every escape (\uXXXX
 * surrogate pairs too), parses numbers as correctly rounded doubles independent of the C
 * locale, limits nesting to JSON_MAX_DEPTH and rejects duplicate object keys. Errors read
 * "origin:line:col: what was expected". Values are a plain tree; the members of an object keep
 * file order and carry their key. Every node remembers origin:line:col for later messages. */
#define JSON_MAX_DEPTH 256
/* At most this many values in one document (each costs ~100 bytes in the tree), so that a
 * hostile 100 MB safetensors header of "[0,0,0,..." cannot ask for gigabytes. SD 1.5's
 * largest header holds ~10^4 values. */
#define JSON_MAX_VALUES (1u << 22)
typedef enum { JSON_NULL, JSON_BOOL, JSON_NUMBER, JSON_STRING, JSON_ARRAY, JSON_OBJECT } JsonType;
typedef struct JsonValue JsonValue;
struct JsonValue {
    JsonType type;
    int boolean;              /* JSON_BOOL: 0 or 1 */
    double number;            /* JSON_NUMBER */
    char *str;                /* JSON_STRING: UTF-8, NUL-terminated (may hold \0: use len) */
    size_t len;               /* JSON_STRING: bytes in str */
    JsonValue *items;         /* JSON_ARRAY elements / JSON_OBJECT members, in file order */
    size_t count, cap;        /* number of items */
    char *key;                /* the member's key when this value sits in an object */
    size_t key_len;
    const char *origin;       /* file name for messages (shared; owned by the root) */
    int line, col;            /* where the value starts (1-based; 0 for built values) */
};

/* Parses text[0..len) into *out (a tree to release with json_free). origin names the input
 * in messages ("unet/config.json"). MS_ERR_FORMAT on bad JSON, MS_ERR_NOMEM. */
MsStatus json_parse(const char *text, size_t len, const char *origin, JsonValue **out);
MsStatus json_parse_file(const char *path, JsonValue **out);     /* reads the file, then parses */
void json_free(JsonValue *v);                                    /* the whole tree; NULL is fine */
const char *json_type_name(JsonType t);                          /* "number", "object", ... */

/* Lookups: NULL / default when v is not an object, the key is missing, or the type differs. */
const JsonValue *json_get(const JsonValue *obj, const char *key);
size_t json_len(const JsonValue *v);                             /* array/object items, else 0 */
const JsonValue *json_at(const JsonValue *arr, size_t i);        /* NULL when out of range */
double json_get_number(const JsonValue *obj, const char *key, double def);
const char *json_get_string(const JsonValue *obj, const char *key, const char *def);
int64_t json_get_int(const JsonValue *obj, const char *key, int64_t def);  /* integral numbers */
int json_get_bool(const JsonValue *obj, const char *key, int def);
/* The same with a status: MS_ERR_FORMAT naming origin:line:col, the key and the type found
 * when the key is missing or of the wrong type ("model_index.json:3:14: key 'unet':
 * expected an integer, found a string"). An integer is a number with no fraction and
 * |x| <= 2^53. */
MsStatus json_need(const JsonValue *obj, const char *key, JsonType type, const JsonValue **out);
MsStatus json_need_number(const JsonValue *obj, const char *key, double *out);
MsStatus json_need_int(const JsonValue *obj, const char *key, int64_t *out);
MsStatus json_need_string(const JsonValue *obj, const char *key, const char **out);
MsStatus json_as_int(const JsonValue *v, const char *what, int64_t *out);  /* v itself */

/* Building values (for writers). The json_new_* functions return NULL when out of memory;
 * json_push/json_set take ownership of item (freed on failure too). json_set replaces an
 * existing key. */
JsonValue *json_new(JsonType type);                              /* null, empty array/object */
JsonValue *json_new_number(double x);
JsonValue *json_new_bool(int b);
JsonValue *json_new_string(const char *s, size_t len);           /* copies; len of s in bytes */
MsStatus json_push(JsonValue *arr, JsonValue *item);
MsStatus json_set(JsonValue *obj, const char *key, JsonValue *item);

/* A growable byte buffer. Appends return MS_ERR_NOMEM on failure and leave it consistent;
 * data is always NUL-terminated once anything was appended. */
typedef struct { char *data; size_t len, cap; } JsonBuf;
MsStatus jbuf_append(JsonBuf *b, const void *bytes, size_t n);
MsStatus jbuf_puts(JsonBuf *b, const char *s);
void jbuf_free(JsonBuf *b);
/* Writer pieces: a string with quotes and escapes ("\"\\\b\f\n\r\t", other controls as
 * \u00XX, everything else verbatim UTF-8, as serde_json does); a double in the shortest form
 * of %.15g/%.16g/%.17g that reads back bit-exactly, with '.' in every locale. Non-finite
 * numbers have no JSON form: MS_ERR_ARG. */
MsStatus json_write_string(JsonBuf *b, const char *s, size_t len);
MsStatus json_write_number(JsonBuf *b, double x);
/* Whole tree; indent 0 writes compactly ({"a":[1,2]}), indent > 0 pretty-prints with that
 * many spaces per level. json_write_file writes to path via path.tmp + rename. */
MsStatus json_write(JsonBuf *b, const JsonValue *v, int indent);
MsStatus json_write_file(const char *path, const JsonValue *v, int indent);

/* safetensors (huggingface/safetensors format), tools/safetensors.c.
 * File: u64 little-endian header length N (<= ST_MAX_HEADER), N bytes of JSON
 *   {"__metadata__": {str: str}, "name": {"dtype": "F32", "shape": [..], "data_offsets": [b, e]}}
 * then the data section. Offsets are relative to the data section, tensors tile it exactly
 * (sorted by offset: first begins at 0, each begins where the previous ends, the last ends at
 * the end of the file) and e - b == numel * dtype size: the checks the reference reader makes.
 * Reading maps the file (POSIX mmap; -DMS_NO_MMAP or other systems: one fread into memory).
 * Tensor bytes are little-endian; the f32 accessors convert on any host. */
#define ST_MAX_HEADER ((size_t)100000000)      /* as huggingface/safetensors: 100 MB */
typedef enum {   /* increasing alignment, the order of the reference's Dtype enum */
    ST_BOOL, ST_U8, ST_I8, ST_F8_E5M2, ST_F8_E4M3, ST_I16, ST_U16, ST_F16, ST_BF16,
    ST_I32, ST_U32, ST_F32, ST_F64, ST_I64, ST_U64, ST_NDTYPES
} StDtype;
const char *st_dtype_name(StDtype d);          /* "F32", ... as in the header */
size_t st_dtype_size(StDtype d);               /* bytes per element */

typedef struct {
    char *name;
    StDtype dtype;
    int ndim;                                  /* 0..MS_MAX_DIMS (0: a scalar, numel 1) */
    int64_t shape[MS_MAX_DIMS];
    size_t numel, nbytes;
    size_t offset;                             /* where data begins in the data section */
    const unsigned char *data;                 /* nbytes little-endian bytes inside the file */
} StTensor;

typedef struct {
    char *origin;                              /* path or name, for messages */
    StTensor *tensors;                         /* sorted by offset (= file order) */
    size_t count;
    StTensor **by_name;                        /* the same tensors sorted by name (st_find) */
    char **meta_keys, **meta_vals;             /* __metadata__, in header order */
    size_t meta_count;
    unsigned char *buf; size_t size;           /* the whole file */
    int own;                                   /* 0: borrowed memory, 1: malloc, 2: mmap */
} StFile;

MsStatus st_open(StFile *f, const char *path);       /* on error f is left closed (zeroed) */
/* Parses a file image already in memory (borrowed: it must outlive f). On error f is closed. */
MsStatus st_open_memory(StFile *f, const void *data, size_t size, const char *origin);
void st_close(StFile *f);
const StTensor *st_find(const StFile *f, const char *name);      /* NULL when absent */
const char *st_meta(const StFile *f, const char *key);           /* NULL when absent */
/* t's data will not be read again: give its memory-mapped pages back to the OS (loaders call it
 * after copying each tensor, so a model load does not hold the file and the tables at once). */
void st_release(const StFile *f, const StTensor *t);
/* Converts all of t to float: F16/BF16/F32 exactly, F64 rounded to nearest, integers and BOOL
 * by value (rounded beyond 2^24). n must equal t->numel; F8 -> MS_ERR_UNSUPPORTED. */
MsStatus st_to_f32(const StFile *f, const StTensor *t, float *out, size_t n);
/* By name, checking the shape when ndim >= 0 ("x.safetensors: 'conv.weight' has shape
 * (320,4,3,3), expected (320,4,3,4)"). ndim < 0 only checks that numel == n. */
MsStatus st_read_f32(const StFile *f, const char *name, float *out, size_t n, int ndim,
                     const int64_t *shape);
/* Same, allocating (ms_alloc_aligned; free with ms_free_aligned). */
MsStatus st_load_f32(const StFile *f, const char *name, float **out, size_t *n);
MsStatus st_check_shape(const StFile *f, const StTensor *t, int ndim, const int64_t *shape);

/* Scalar conversions: exact widening, and round-to-nearest-even narrowing (overflow -> inf,
 * NaN stays NaN with its sign, subnormals handled). */
float st_f16_to_f32(uint16_t h);
float st_bf16_to_f32(uint16_t h);
uint16_t st_f32_to_f16(float x);
uint16_t st_f32_to_bf16(float x);

/* Writing. Each entry gives values either as floats to convert (f32; allowed for F32, F16,
 * BF16, F64) or as raw host-order values of dtype (raw: uint16_t bits for F16/BF16, one byte
 * 0/1 per BOOL). Like the reference writer, tensors are laid out by decreasing dtype
 * alignment, then by name (byte order), the header lists __metadata__ first then the tensors
 * in data order, compact JSON padded with spaces to a multiple of 8 bytes. meta holds
 * n_meta (key, value) pairs: meta[2i], meta[2i+1], written in that order (the reference
 * writes a Rust HashMap, so its order is arbitrary; a file laid out by the reference writer,
 * read and written back with its metadata in st_meta order, comes out byte for byte; older
 * writers that sorted by name only are read fine but rewritten in the new order). The file appears
 * under path only when complete (written to path.tmp, then renamed). */
typedef struct {
    const char *name;
    StDtype dtype;
    int ndim;
    int64_t shape[MS_MAX_DIMS];
    const float *f32;
    const void *raw;
} StEntry;
MsStatus st_write(const char *path, const StEntry *entries, size_t n, const char *const *meta,
                  size_t n_meta);
/* The same file image in memory (*out malloc'd, free() it). */
MsStatus st_write_memory(const StEntry *entries, size_t n, const char *const *meta,
                         size_t n_meta, unsigned char **out, size_t *out_size);

/* ---- PNG, JPEG (tools/png.c, tools/jpeg.c) ---- */
/* A decoded image: (h, w, channels) row-major, interleaved. Channels: 1 grey, 2 grey+alpha,
 * 3 RGB, 4 RGBA. depth 8: data is uint8_t; depth 16: data is uint16_t in host order. */
typedef struct {
    int w, h;
    int channels;        /* channels in data (what the caller asked for, or the file's own) */
    int file_channels;   /* the file's own: PNG palette -> 3, +1 when it has alpha or tRNS */
    int depth;           /* 8 or 16 bits per sample in data */
    void *data;          /* malloc'ed; ms_image_free() */
} MsImage;

/* Limits on what a file may declare (checked before any allocation). */
#define MS_IMAGE_MAX_DIM (1 << 24)
#define MS_IMAGE_MAX_PIXELS ((size_t)1 << 26)

/* Decoders. want_channels: 0 = the file's own, else 1..4. Conversions follow Pillow 9:
 * RGB -> grey is L = (19595 R + 38470 G + 7471 B + 0x8000) >> 16, grey -> RGB replicates,
 * dropping alpha drops it, added alpha is opaque (or from tRNS). want_depth: 8 or 16 (PNG
 * 16-bit samples keep their value; 8-bit ones are scaled by 257; 16 -> 8 keeps the high byte,
 * as Pillow does for RGB/RGBA). `name` is used in error messages. */
MsStatus ms_png_decode(const uint8_t *buf, size_t len, const char *name, int want_channels,
                       int want_depth, MsImage *img);
MsStatus ms_jpeg_decode(const uint8_t *buf, size_t len, const char *name, int want_channels,
                        MsImage *img);                       /* always depth 8 */
/* PNG or JPEG by magic bytes, 8-bit. */
MsStatus ms_image_decode(const uint8_t *buf, size_t len, const char *name, int want_channels,
                         MsImage *img);
MsStatus ms_image_read(const char *path, int want_channels, MsImage *img);
void ms_image_free(MsImage *img);

/* PNG encoder, 8-bit, channels 1..4, one filter per row (the one with the smallest sum of
 * absolute residuals, PNG spec 12.8). ms_png_write writes path.tmp then renames it. */
MsStatus ms_png_encode(const uint8_t *pixels, int w, int h, int channels, uint8_t **out,
                       size_t *out_len);
MsStatus ms_png_write(const char *path, const uint8_t *pixels, int w, int h, int channels);

/* ---- PyTorch zip + restricted pickle (tools/zip.c, tools/pickle.c) ---- */
/* Zip archives (tools/zip.c): the container of torch.save files (.pth/.ckpt/.bin).
 * Reader: central directory (zip64 too), local headers cross-checked, stored and deflated
 * members, CRC-32 verified. Writer: stored members with 64-byte-aligned data, as torch does. */
#define ZIP_MAX_ENTRIES  (1u << 20)     /* members per archive */
#define ZIP_MAX_NAME     4096           /* bytes in one member name */
typedef struct {
    char *name;                /* NUL-terminated; names with a NUL byte are refused */
    uint64_t data_off;         /* file offset of the member's (compressed) bytes */
    uint64_t csize, usize;     /* compressed / uncompressed sizes */
    uint32_t crc;              /* CRC-32 of the uncompressed bytes (central directory) */
    int method;                /* 0 stored, 8 deflate */
    int crc_ok;                /* 1 once the CRC has been verified */
} ZipEntry;
typedef struct {
    char *path;                /* for messages */
    void *f;                   /* FILE *, or NULL when reading memory */
    const unsigned char *mem;  /* zip_open_mem */
    uint64_t size;             /* bytes in the file */
    ZipEntry *e;
    size_t n;
} ZipReader;
MsStatus zip_open(ZipReader *z, const char *path);
MsStatus zip_open_mem(ZipReader *z, const void *data, size_t size, const char *label);
void zip_close(ZipReader *z);
const ZipEntry *zip_find(const ZipReader *z, const char *name);       /* NULL if absent */
/* n bytes at offset off of the uncompressed member. Verifies the member's CRC-32 the first
 * time (streaming over the whole member once if the range is partial). */
MsStatus zip_read(ZipReader *z, const ZipEntry *e, uint64_t off, void *buf, size_t n);
/* The whole member in a new malloc'd buffer (+1 NUL byte, not counted in *len). */
MsStatus zip_read_alloc(ZipReader *z, const ZipEntry *e, unsigned char **out, size_t *len);

typedef struct {
    char *path, *tmp;          /* final path, temp file renamed onto it by zip_writer_close */
    void *f;
    uint64_t pos;
    struct ZipWEntry *e;
    size_t n, cap;
    int force_zip64;           /* zip64 extra fields even when not needed (tests) */
    MsStatus status;           /* first error; later calls do nothing */
} ZipWriter;
MsStatus zip_writer_open(ZipWriter *w, const char *path, int force_zip64);
/* One stored member; its data starts on a 64-byte boundary (padding in a "FB" extra field,
 * as torch's writer does). */
MsStatus zip_writer_add(ZipWriter *w, const char *name, const void *data, size_t n);
/* Writes the central directory (zip64 when needed) and renames the temp file onto the path.
 * With commit == 0 (or after an error) the temp file is removed instead. */
MsStatus zip_writer_close(ZipWriter *w, int commit);

/* PyTorch checkpoints (tools/pickle.c): torch.save's zip format (archive/data.pkl +
 * archive/data/<key>) read with a restricted unpickler that never executes anything: only the
 * opcodes for dicts, lists, tuples, strings, numbers and tensors are understood, and only the
 * globals torch's own weights_only loader allows (tensor/parameter rebuild, OrderedDict,
 * torch.Size, storage types). Anything else is refused with an error naming it. */
typedef enum {
    PTH_F32, PTH_F16, PTH_BF16, PTH_F64, PTH_I64, PTH_I32, PTH_I16, PTH_I8, PTH_U8, PTH_BOOL,
    PTH_NDTYPES
} PthDtype;
const char *pth_dtype_name(PthDtype t);        /* "F32", "F16", ... (safetensors spelling) */
size_t pth_dtype_size(PthDtype t);

typedef struct {
    char *name;            /* dotted path through dicts/lists: "params.unet.<key>" */
    size_t leaf;           /* name + leaf is the last path component (the innermost dict key) */
    PthDtype dtype;
    int ndim;
    int64_t shape[MS_MAX_DIMS], stride[MS_MAX_DIMS];   /* stride in elements, >= 0 */
    int64_t offset;        /* storage offset in elements */
    int64_t storage_numel;
    int requires_grad;
    size_t entry;          /* index of the storage's zip member in PthFile.zip.e */
} PthTensor;

typedef struct {
    ZipReader zip;
    PthTensor *t;
    size_t n;
    char *summary;         /* the object tree, one line per node, for `inspect` */
} PthFile;

#define PTH_MAX_DEPTH 64   /* container nesting (also stops recursive structures) */
MsStatus pth_open(PthFile *f, const char *path);                 /* pth_open_ex(f, path, 0) */
/* flags: PTH_LENIENT turns a global outside the allow-list (e.g. a pytorch_lightning callback
 * or a numpy scalar in a training .ckpt) into an inert placeholder instead of an error: it is
 * never called, what it builds is dropped, and tensors are read from the rest of the tree. */
#define PTH_LENIENT 1
MsStatus pth_open_ex(PthFile *f, const char *path, int flags);
MsStatus pth_open_mem(PthFile *f, const void *data, size_t size, const char *label, int flags);
void pth_close(PthFile *f);
const PthTensor *pth_find(const PthFile *f, const char *name);
size_t pth_numel(const PthTensor *t);
/* Tensor values converted to float32 (out holds pth_numel floats); any stride layout. */
MsStatus pth_read_f32(PthFile *f, const PthTensor *t, float *out);
/* Tensor values in their own dtype, packed row-major (pth_numel * dtype size bytes), in host
 * byte order (swapped from the file's little-endian on big-endian hosts). */
MsStatus pth_read_raw(PthFile *f, const PthTensor *t, void *out);

/* Parses a pickle alone (no zip, no tensor data): what fuzz_pickle exercises. On success
 * *summary (malloc'd) holds the tree as pth_open would show it. */
MsStatus pth_parse_pickle(const void *data, size_t n, int flags, char **summary);

/* Writer: a torch.save-compatible zip pickle (protocol 2, archive/data.pkl, archive/data/<i>,
 * archive/version "3") that torch.load(..., weights_only=True) reads. Names are split on '.'
 * into nested dicts for the first `nest` components: "params.unet.x.y" with nest 2 gives
 * {'params': {'unet': {'x.y': tensor}}}; nest 0 keeps the name as one key. */
typedef struct {
    const char *name;
    int nest;
    PthDtype dtype;
    int ndim;
    int64_t shape[MS_MAX_DIMS];
    const void *data;      /* packed row-major, little-endian, in dtype */
    int requires_grad;
} PthSaveTensor;
MsStatus pth_save(const char *path, const PthSaveTensor *t, size_t n);

/* ---- model loading: diffusers folders and LDM single files (tools/model_load.c) ---- */
/* Config readers: a parsed config.json -> struct. Missing keys take the diffusers 0.19.3 /
 * transformers defaults; switches for architecture mixshow does not implement (class
 * embeddings, only_cross_attention, act_fn other than silu, ...) must be absent, null or their
 * default (MS_ERR_UNSUPPORTED naming file:line:col and the key). The result is validated with
 * ms_*_config_check (the message names the file). */
MsStatus ms_unet_config_from_json(const JsonValue *j, UNetConfig *c);
MsStatus ms_vae_config_from_json(const JsonValue *j, VaeConfig *c);
MsStatus ms_clip_text_config_from_json(const JsonValue *j, ClipTextConfig *c);
MsStatus ms_adapter_config_from_json(const JsonValue *j, AdapterConfig *c);
MsStatus ms_scheduler_config_from_json(const JsonValue *j, SchedulerConfig *c);

typedef struct {
    int keep_half;            /* keep F16/BF16 tensors 16-bit in memory (MsParam.half) */
    const char *config_dir;   /* single files: a diffusers folder whose unet/ vae/ text_encoder/
                               * scheduler/ configs describe the file (NULL: SD 1.5 values) */
} MsLoadOptions;              /* NULL options: all defaults */

/* A diffusers folder (has model_index.json) or an original single file (LDM keys). Every
 * tensor is checked against the tables the configs imply: missing, unexpected (apart from
 * position_ids, DDPM buffers, model_ema.*) and mis-shaped tensors are errors naming the file,
 * the key and both shapes. m is zeroed on failure. */
MsStatus ms_model_load(const char *path, const MsLoadOptions *opt, MsModel *m);
/* A T2I-Adapter: a diffusers folder (config.json + weights) or a TencentARC file (SD 1.x
 * channels; in_channels from conv_in). */
MsStatus ms_adapter_load(const char *path, const MsLoadOptions *opt, AdapterConfig *c, MsParamTable *t);
/* One tensor file into one table built by ms_param_table_*: keys are diffusers keys (ldm 0)
 * or original single-file keys (ldm 1); what names the component in messages. */
MsStatus ms_table_fill_file(MsParamTable *t, const char *path, int ldm, const char *what,
                            const MsLoadOptions *opt);
/* Subcommands (tools/cmd_inspect.c, tools/cmd_convert.c). */
int cmd_inspect(int argc, char **argv);   /* mixshow inspect FILE [--json] */
int cmd_convert(int argc, char **argv);   /* mixshow convert IN OUT [--config DIR] [--half] (models, adapters, eval encoders) */
MsStatus ms_copy_file(const char *from, const char *to);   /* byte copy (tools/cmd_convert.c) */
/* m as a diffusers folder at out (built in out.tmp, then renamed; out must not exist): configs,
 * unet/ vae/ text_encoder/ weights (F16 when half), the tokenizer files of tokdir. */
MsStatus ms_write_model_folder(const MsModel *m, const char *tokdir, const char *out, int half);
/* A diffusers AutoencoderKL folder at out (out.tmp, renamed; out must not exist): config.json
 * and diffusion_pytorch_model.safetensors (f32), what `mixshow pretrain --vae` reads. */
MsStatus ms_write_vae_folder(const VaeConfig *c, const MsParamTable *t, const char *out);
/* The same for a diffusers T2IAdapter (full_adapter), what `mixshow sample --adapter` reads. */
MsStatus ms_write_adapter_folder(const AdapterConfig *c, const MsParamTable *t, const char *out);
/* The same, with F16 weights when half (`mixshow convert ADAPTER_DIR OUT --half`). */
MsStatus ms_write_adapter_folder_half(const AdapterConfig *c, const MsParamTable *t, const char *out, int half);
/* The configs of a diffusers folder written from m's: DIR/model_index.json, unet/config.json,
 * vae/config.json, text_encoder/config.json, scheduler/scheduler_config.json (subfolders exist). */
MsStatus ms_write_model_configs(const MsModel *m, const char *dir);
/* m as an original LDM single .safetensors file (out.tmp, renamed): F16 tensors when half; with
 * with_configs the four configs as metadata mixshow.{unet,vae,text_encoder,scheduler}_config
 * (ms_open_model reads them back); extra: n_extra more (key, value) metadata pairs. */
#define MS_LDM_EXTRA_META 4
MsStatus ms_write_ldm(const MsModel *m, const char *out, int half, int with_configs, const char *const *extra,
                      int n_extra);
/* The same from a safetensors image in memory (origin names it in messages). */
MsStatus ms_table_fill_memory(MsParamTable *t, const void *data, size_t size, const char *origin, int ldm,
                              const char *what, const MsLoadOptions *opt);

/* ---- CLIP tokenizer files and `mixshow tokenize` (tools/cmd_tokenize.c) ---- */
/* DIR/tokenizer/ (a diffusers folder) or DIR itself: vocab.json, merges.txt, and pad_token from
 * special_tokens_map.json (else tokenizer_config.json; else <|endoftext|>). */
MsStatus ms_clip_tokenizer_load(const char *dir, ClipTokenizer *t);
/* Added tokens from a file: one per line, or a JSON array of strings (clip_tokenizer_add_tokens). */
MsStatus ms_clip_added_tokens_load(const char *path, ClipTokenizer *t, int *n_added);
/* A tokenizer folder's added_tokens.json ({token: id}, what `mixshow fuse` and transformers'
 * save_pretrained write) as transformers 4.31 from_pretrained reads it: tokens in id order, each
 * id must be the next one ("non-consecutive added token" otherwise). A token already in t at
 * that id is kept (reading the file twice adds nothing). ms_open_model calls it. */
MsStatus ms_clip_added_tokens_json(const char *path, ClipTokenizer *t);
int cmd_tokenize(int argc, char **argv);  /* mixshow tokenize --model DIR [--added-tokens FILE] "prompt" */

/* ---- a transformers CLIPModel for the paper's CLIP metrics (tools/clip_model.c) ---- */
/* CLIPImageProcessor settings (preprocessor_config.json). */
typedef struct {
    int do_resize, shortest_edge, resample;     /* resample: PIL_* (default PIL_BICUBIC) */
    int do_center_crop, crop_h, crop_w;
    int do_rescale, do_normalize;
    double rescale_factor;                      /* 1/255 */
    double mean[3], std[3];                     /* OPENAI_CLIP_MEAN / _STD */
} ClipImageProcessor;
/* CLIPImageProcessor defaults with shortest edge and crop = size. */
void ms_clip_processor_default(ClipImageProcessor *p, int size);
/* preprocessor_config.json: size as n or {"shortest_edge": n}, crop_size as n or {"height",
 * "width"}, do_* switches, rescale_factor, image_mean/std, resample; missing keys take the
 * defaults with size image_size. */
MsStatus ms_clip_processor_from_json(const JsonValue *j, ClipImageProcessor *p, int image_size);
/* An 8-bit RGB image (ms_image_read(path, 3, ..): Pillow's convert("RGB")) -> pixels (3, S, S) as
 * CLIPImageProcessor gives them (bit-exact). The crop must fit and equal S (MS_ERR_UNSUPPORTED). */
MsStatus ms_clip_preprocess(float *pixels, int S, const MsImage *img, const ClipImageProcessor *p);
/* config.json of a CLIPModel (tools/model_load.c). */
MsStatus ms_clip_model_config_from_json(const JsonValue *j, ClipModelConfig *c);
typedef struct {
    ClipModelConfig config;
    ClipImageProcessor proc;    /* preprocessor_config.json, or the defaults at image_size */
    MsParamTable table;         /* every CLIPModel tensor, f32 */
    ClipVisionParams vision;
    ClipTextParams text;
    const MsParam *text_proj;   /* text_projection.weight */
    ClipTokenizer tok;          /* vocab.json + merges.txt of the folder, when it has them */
    int has_tokenizer;
} MsClip;
/* DIR/config.json, DIR/model.safetensors (else pytorch_model.bin), DIR/preprocessor_config.json
 * (optional), DIR/vocab.json + merges.txt (optional: prompts need them). Missing, unexpected or
 * mis-shaped tensors are errors naming the file and key. */
MsStatus ms_clip_load(const char *dir, MsClip *m);
void ms_clip_free(MsClip *m);
/* image_embeds (B, projection_dim) of pixels (B, 3, S, S); text_embeds (B, projection_dim) of
 * token ids (B, T), T <= max_position_embeddings. Not normalised (cosines do not need it). */
MsStatus ms_clip_image_embeds(const MsClip *m, const float *pixels, int B, float *embeds);
MsStatus ms_clip_text_embeds(const MsClip *m, const int32_t *ids, int B, int T, float *embeds);
/* One image file (PNG/JPEG) / one prompt (tokenized to max_position_embeddings, padded). */
MsStatus ms_clip_embed_image_file(const MsClip *m, const char *path, float *embed);
MsStatus ms_clip_embed_prompt(const MsClip *m, const char *prompt, float *embed);
double ms_cosine(const float *a, const float *b, int n);   /* a.b / (|a| |b|), in double; 0 for a zero vector */
int cmd_clip(int argc, char **argv);     /* mixshow clip --clip DIR [--image F]... [--text P]... [--json] */

/* ---- text-to-image pipeline, `mixshow sample`, `mixshow dump` ---- */
/* PIL Image.resize((ow, oh), Image.LANCZOS) on 8-bit interleaved pixels (Pillow 9.4, bit-exact):
 * in (h,w,C) -> out (oh,ow,C). Same size: a copy, as Image.resize. tools/cmd_sample.c. */
MsStatus ms_image_resize_lanczos(uint8_t *out, int ow, int oh, const uint8_t *in, int w, int h, int C);
int cmd_sample(int argc, char **argv);   /* mixshow sample [--model PATH] -p PROMPT ... -o out.png */
int cmd_dump(int argc, char **argv);     /* mixshow dump --model PATH --inputs IN --out OUT */
int cmd_train(int argc, char **argv);    /* mixshow train --config X.yml [--replay DUMP --trace OUT] ... */
int cmd_pretrain(int argc, char **argv); /* mixshow pretrain --out DIR [--steps N] ... (issue 15) */
/* Zeroes the rows of a text encoder's token table (text_model.embeddings.token_embedding.weight,
 * (V, D)) whose used[id] is 0 (used: V flags); returns the rows kept, -1 (an error set) when the
 * table has no such tensor. What `pretrain` and `eval --train-encoders` do to rows no training
 * caption reached before writing a model: such rows never had a gradient, only weight decay
 * shrank their random start, so zeros say "unknown word" and compress (tools/cmd_pretrain.c). */
int ms_zero_unused_token_rows(MsParamTable *text, const unsigned char *used);
/* A loss curve as an SVG plot (n values, NaN skipped), written via path.tmp (tools/cmd_train.c). */
MsStatus ms_write_loss_svg(const char *path, const double *loss, int64_t n);
int cmd_fuse(int argc, char **argv);     /* mixshow fuse --model BASE --concepts CFG.json --out DIR (helper "fuse") */

/* ---- ED-LoRA training data options (tools/train_config.c reads them from the .yml) ---- */
/* One entry of datasets.train.instance_transform, in file order (mixofshow/data/pil_transform.py
 * and torchvision). Fields not used by a type are 0. */
typedef enum {
    MS_TF_HUMAN_RESIZE_CROP_V3 = 1, /* HumanResizeCropFinalV3(size, crop_p=0.5) */
    MS_TF_RESIZE_FILL_MASK_NEW,     /* ResizeFillMaskNew(size, crop_p, scale_ratio) */
    MS_TF_TO_TENSOR,                /* ToTensor */
    MS_TF_NORMALIZE,                /* Normalize(mean, std) (lists, broadcast if of length 1) */
    MS_TF_SHUFFLE_CAPTION,          /* ShuffleCaption(keep_token_num) */
    MS_TF_ENHANCE_TEXT,             /* EnhanceText(enhance_type='object'|'human'|'style') */
    MS_TF_PAIR_RANDOM_HFLIP         /* PairRandomHorizontalFlip(p=0.5) (draws torch.rand(1)) */
} MsTransformType;
typedef struct {
    MsTransformType type;
    int size;                       /* HumanResizeCropFinalV3, ResizeFillMaskNew */
    int place;                      /* 0: the official placement bound, randint(0, 512 - h) (hard-coded);
                                     * 1: randint(0, size - h), the mixshow types HumanResizeCropPlace /
                                     * ResizeFillMaskPlace for canvases other than 512 (world images) */
    double crop_p;                  /* ditto (HumanResizeCropFinalV3 default 0.5) */
    double scale_ratio[2];          /* ResizeFillMaskNew */
    int n_mean;                     /* Normalize: 1 or 3 */
    double mean[3], std[3];
    int keep_token_num;             /* ShuffleCaption */
    char enhance_type[16];          /* EnhanceText: "object" (default), "human", "style" */
    double p;                       /* PairRandomHorizontalFlip (0.5) */
} MsTransformSpec;
#define MS_MAX_TRANSFORMS 16
#define MS_MAX_REPLACE 8
typedef struct {
    /* datasets.train (LoraDataset) */
    char concept_list[1024];        /* path of the concept-list JSON */
    int use_caption, use_mask;      /* LoraDataset defaults: false, false */
    int n_transforms;
    MsTransformSpec transforms[MS_MAX_TRANSFORMS];
    int n_replace;                  /* replace_mapping, in file order: "<TOK>" -> "<potter1> <potter2>" */
    char replace_from[MS_MAX_REPLACE][64], replace_to[MS_MAX_REPLACE][256];
    int batch_size;                 /* batch_size_per_gpu */
    int enlarge_ratio;              /* dataset_enlarge_ratio */
    /* datasets.val_vis (PromptDataset); empty prompts: no validation set */
    char val_prompts[1024];
    int val_samples_per_prompt, val_batch_size;
    int val_latent_size[3];         /* [4, 64, 64] */
    int n_val_replace;
    char val_replace_from[MS_MAX_REPLACE][64], val_replace_to[MS_MAX_REPLACE][256];
    /* val: */
    int val_during_save, compose_visualize;
    int n_alpha; double alpha_list[8];  /* [0, 0.7, 1.0] */
    int val_steps; double val_guidance; /* val.sample.num_inference_steps (50), guidance_scale (7.5) */
    /* logger: */
    int print_freq;                 /* 10 */
    int64_t save_checkpoint_freq;   /* 10000 */
    /* top level */
    char name[256];                 /* experiment name: output goes to experiments/<name>/ */
    char pretrained_path[1024];     /* models.pretrained_path */
    char mixed_precision[16];       /* "fp16", "no", ...: mixshow computes in float32 (noted) */
} TrainDataConfig;

/* ---- YAML subset (tools/yaml.c) and the training .yml reader (tools/train_config.c) ---- */
/* YAML as OmegaConf.load reads Mix-of-Show's option files (the subset is listed at the top of
 * tools/yaml.c), into the JSON tree type, so the json_get / json_need_* helpers apply. Errors
 * read "origin:line:col: what was expected"; valid YAML outside the subset is
 * MS_ERR_UNSUPPORTED "unsupported YAML feature: ...". The top level must be a mapping or a
 * sequence (an empty document is an empty mapping). */
MsStatus yaml_parse(const char *text, size_t len, const char *origin, JsonValue **out);
MsStatus yaml_parse_file(const char *path, JsonValue **out);
/* One value as a YAML document that may also be a scalar ("0.02", "[0.9, 0.99]", "~"; empty:
 * null), as OmegaConf parses a dotlist value. */
MsStatus yaml_parse_value(const char *text, size_t len, const char *origin, JsonValue **out);
/* "models.noise_offset=0.02": sets (replacing in place, or appending) the dotted key of
 * root to the parsed value, creating missing intermediate mappings; train_config_from_yaml
 * then rejects any key it does not know, so a typo is an error, never a silent new option.
 * MS_ERR_ARG when a path element is not a mapping. Set values carry no origin (NULL). */
MsStatus yaml_apply_set(JsonValue *root, const char *assignment);
/* Defaults of TrainDataConfig (LoraDataset / PromptDataset / train_edlora.py, see tools.h). */
void train_config_defaults_data(TrainDataConfig *d);
/* A parsed training .yml (Mix-of-Show options/train/EDLoRA/ files) -> d and m (which start
 * from train_config_defaults_data and ms_train_config_defaults). Every key must be known:
 * "origin:line:col: train.optim_g.foo: unknown option"; wrong types name the dotted key, the
 * expected type and the value found. Valid options mixshow does not implement are
 * MS_ERR_UNSUPPORTED with the reason. m->total_iter stays 0 (the dataset decides it). */
MsStatus train_config_from_yaml(const JsonValue *root, TrainDataConfig *d, MsTrainConfig *m);
/* yaml_parse_file(path), then yaml_apply_set for each of sets[0..n_sets), then the above. */
MsStatus train_config_load(const char *path, const char *const *sets, int n_sets, TrainDataConfig *d, MsTrainConfig *m);

/* ---- ED-LoRA training data: Python's random, instance_transform, LoraDataset + DataLoader
 *      (tools/pyrandom.c, tools/transforms.c, tools/dataset.c) ---- */
/* CPython 3.11 `random` (Mersenne Twister mt19937ar, init_by_array seeding). Plain data: copy
 * the struct to save or restore the state (random.getstate/setstate). */
typedef struct {
    uint32_t mt[624];
    int index;                   /* next word; 624: twist first */
} PyRandom;
void py_random_seed(PyRandom *r, uint64_t n);        /* random.seed(n), n >= 0 */
void py_random_seed_i64(PyRandom *r, int64_t n);     /* random.seed(n): Python seeds with |n| */
uint32_t py_random_u32(PyRandom *r);                 /* one mt19937 word (getrandbits(32)) */
double py_random_random(PyRandom *r);                /* random.random() */
uint64_t py_random_getrandbits(PyRandom *r, int k);  /* random.getrandbits(k), 0 <= k <= 64 */
uint64_t py_random_randbelow(PyRandom *r, uint64_t n);          /* _randbelow(n), n >= 1 */
int64_t py_random_randint(PyRandom *r, int64_t a, int64_t b);   /* random.randint(a, b), a <= b */
double py_random_uniform(PyRandom *r, double a, double b);      /* a + (b - a) * random() */
void py_random_shuffle(PyRandom *r, void *items, size_t n, size_t elem_size); /* random.shuffle */
size_t py_random_choice(PyRandom *r, size_t n);      /* index random.choice(seq) picks, n >= 1 */

/* torch draws the transforms and the DataLoader make on a torch.Generator (ms_torch_*). */
float ms_torch_rand_float(MsTorchRng *g);            /* torch.rand(1): (word & 2^24-1) / 2^24 */
int64_t ms_torch_randint(MsTorchRng *g, int64_t low, int64_t high);   /* torch.randint(low, high, (1,)) */
uint64_t ms_torch_random_int64(MsTorchRng *g);       /* torch.empty((), int64).random_(): random64 % 2^63 */
void ms_torch_randperm(MsTorchRng *g, int64_t *out, int64_t n);       /* torch.randperm(n) (CPU, torch 1.13) */

/* Pillow 9.4 Image.resize on 8-bit interleaved pixels, bit-exact: PIL_NEAREST (ImagingScaleAffine)
 * or PIL_BILINEAR / PIL_BICUBIC / PIL_LANCZOS (Resample.c, antialiased: support scales with the
 * reduction, 22-bit fixed point). Same size: a copy. in (h,w,C) -> out (oh,ow,C), C 1..4. */
enum { PIL_NEAREST = 0, PIL_LANCZOS = 1, PIL_BILINEAR = 2, PIL_BICUBIC = 3 };   /* Pillow's Image.Resampling values */
MsStatus pil_resize(uint8_t *out, int ow, int oh, const uint8_t *in, int w, int h, int C, int resample);
/* torchvision 0.14 F.resize output size for an int size (short side = size, long side =
 * int(size * long / short), then the max_size rule; max_size 0: none). MS_ERR_ARG when
 * max_size <= size (torchvision's ValueError). */
MsStatus tv_resize_size(int w, int h, int size, int max_size, int *ow, int *oh);
/* cv2.resize(src (h,w) float64, (ow, oh)) with INTER_LINEAR (half-pixel centres, float weights,
 * OpenCV 4.6's arithmetic order). */
void cv_resize_linear_f64(double *out, int ow, int oh, const double *in, int w, int h);

/* One example on its way through instance_transform (mixofshow/data/pil_transform.py,
 * PairCompose). Before HumanResizeCropFinalV3 / ResizeFillMaskNew it holds PIL images (rgb and
 * the optional 'L' mask); after them the canvas and float64 masks of (mh, mw) = (S/8, S/8);
 * after ToTensor a float (3, h, w) tensor. Build with train_sample_init, free with
 * train_sample_free. */
typedef struct {
    int w, h;                    /* image size */
    uint8_t *rgb;                /* (h, w, 3) PIL RGB; NULL after ToTensor */
    float *tensor;               /* (3, h, w) after ToTensor */
    int has_mask;
    uint8_t *mask_l;             /* (h, w) PIL 'L' mask until placement */
    int placed;                  /* 1 after HumanResizeCropFinalV3 / ResizeFillMaskNew */
    int mw, mh;                  /* (mh, mw) = (S/8, S/8) */
    double *mask;                /* (mh, mw) kwargs['mask'] (has_mask) */
    double *img_mask;            /* (mh, mw) kwargs['img_mask'] */
    char *prompt;                /* kwargs['prompts'], UTF-8, malloc'ed */
} TrainSample;
/* Copies rgb (h,w,3), mask (h,w) or NULL, and prompt. */
MsStatus train_sample_init(TrainSample *s, const uint8_t *rgb, int w, int h, const uint8_t *mask,
                           const char *prompt);
void train_sample_free(TrainSample *s);
/* One transform / all n in order, with the official draws from Python's random (py) and the
 * torch global generator (g). Errors name the transform and what the official code would do
 * (e.g. ResizeFillMaskNew at size != 512 when the hard-coded 512 places outside the canvas). */
MsStatus train_transform_apply(const MsTransformSpec *t, TrainSample *s, PyRandom *py, MsTorchRng *g);
MsStatus train_transforms_run(const MsTransformSpec *t, int n, TrainSample *s, PyRandom *py,
                              MsTorchRng *g);
/* LoraDataset.process_text: each replace_mapping pair in order, str.strip(), runs of ' ' -> ' '.
 * Returns a malloc'ed string (NULL when out of memory). */
char *train_process_text(const char *text, int n_replace, const char (*from)[64],
                         const char (*to)[256]);

/* LoraDataset (mixofshow/data/lora_dataset.py). */
typedef struct TrainDataset TrainDataset;
typedef struct {
    const char *base_dir;        /* concept-list paths that do not exist relative to the current
                                  * directory are tried relative to this (NULL: no fallback) */
    int sort_names;              /* 1: list image folders in byte order of the names instead of
                                  * readdir order (readdir order is the official behaviour but
                                  * depends on the file system; tests use sorted order) */
} TrainDatasetOptions;
/* Reads the concept list, lists every instance_data_dir, then random.shuffle(list) with py (the
 * official LoraDataset.__init__). Every image, mask and caption is checked here (decodes, mask
 * size = image size, UTF-8 caption with a first line, non-empty folder): errors name the file.
 * The transforms must end in a (3, S, S) tensor with HumanResizeCropFinalV3/ResizeFillMaskNew
 * before ToTensor. */
MsStatus train_dataset_open(TrainDataset **out, const TrainDataConfig *c,
                            const TrainDatasetOptions *opt, PyRandom *py);
void train_dataset_close(TrainDataset *d);
size_t train_dataset_len(const TrainDataset *d);        /* n_images * dataset_enlarge_ratio */
size_t train_dataset_n_images(const TrainDataset *d);
int train_dataset_size(const TrainDataset *d);          /* S of the resize transform */
int train_dataset_has_masks(const TrainDataset *d);     /* use_mask: items carry 'masks' */
/* After the shuffle: image path, prompt, mask path (NULL) of list entry i < n_images. */
const char *train_dataset_image_path(const TrainDataset *d, size_t i);
const char *train_dataset_prompt(const TrainDataset *d, size_t i);
const char *train_dataset_mask_path(const TrainDataset *d, size_t i);
/* dataset[index]: image (3,S,S) float, mask (S/8,S/8) float64 (NULL to skip; zeros when the
 * dataset has no masks), img_mask (S/8,S/8) float64, prompt (malloc'ed, free it). */
MsStatus train_dataset_get(TrainDataset *d, size_t index, PyRandom *py, MsTorchRng *g,
                           float *image, double *mask, double *img_mask, char **prompt);

/* DataLoader(dataset, batch_size, shuffle=True, drop_last=True), num_workers 0, torch 1.13:
 * each epoch iter(loader) draws the _BaseDataLoaderIter base seed (random_() on g), then
 * RandomSampler draws its seed the same way and permutes with torch.randperm(n) on a private
 * generator seeded with it; batches follow that order, the incomplete last one is dropped.
 * lookahead = 1 reproduces accelerate's DataLoaderShard, which fetches batch k+1 (running its
 * transforms, drawing from py and g) before it hands out batch k. The position (epoch,
 * next_batch, sampler_seed: perm is randperm(n) on a generator seeded with it) is plain data;
 * a pending lookahead batch is not (resume must refetch it with the RNG states of its time). */
typedef struct {
    size_t batch_size, n;        /* n = len(dataset) */
    int lookahead;
    int64_t epoch;               /* epochs started (iter() calls) */
    size_t next_batch;           /* batches of this epoch fetched so far */
    uint64_t base_seed, sampler_seed;
    int64_t *perm;               /* (n) this epoch's randperm */
    int in_epoch;                /* perm holds the current epoch's order */
    int have_pending;            /* lookahead: a fetched batch waits in the buffers below */
    float *p_images; double *p_masks, *p_img_masks; char **p_prompts; size_t *p_indices;
    size_t img_numel, mask_numel;
} TrainLoader;
MsStatus train_loader_init(TrainLoader *l, const TrainDataset *d, size_t batch_size, int lookahead);
void train_loader_free(TrainLoader *l);
/* The next batch: images (B,3,S,S), masks (B,S/8,S/8) (the dataset's masks when it has them,
 * else zeros; NULL to skip), img_masks (B,S/8,S/8), prompts[B] (malloc'ed strings, the caller
 * frees each). indices (B) or NULL receives the dataset indices. MS_ERR_ARG when the dataset
 * holds fewer than batch_size items (the official loader then yields nothing, forever). */
MsStatus train_loader_next(TrainLoader *l, TrainDataset *d, PyRandom *py, MsTorchRng *g,
                           float *images, double *masks, double *img_masks, char **prompts,
                           size_t *indices);

/* ---- ED-LoRA files (tools/edlora.c) ---- */
/* Mix-of-Show's ED-LoRA / LoRA file (trainer_edlora.py delta_state_dict, saved as
 * {'params': delta_dict}) in two forms:
 *   .pth          {'params': {'new_concept_embedding': {word: (T,D)},
 *                             'text_encoder': {'<module>.lora_down.weight': (r,in), '<module>.lora_up.weight': (out,r)},
 *                             'unet': {...}}}   (a bare delta_dict without 'params' is read too)
 *   .safetensors  the same tensors, F32, keys "new_concept_embedding.<word>",
 *                 "text_encoder.<module>.lora_{down,up}.weight", "unet.<module>...", metadata
 *                 format = "mixshow-edlora" and order = JSON array of the keys in dict order
 * T is 16 (ED-LoRA: one embedding per cross-attention layer) or 1 (plain LoRA). Any float dtype
 * is read (converted to f32); 1x1-conv LoRA (r,in,1,1)/(out,r,1,1) is read as (r,in)/(out,r).
 * A third form, kohya / AUTOMATIC1111-webui LoRA (.safetensors whose keys begin "lora_"), is read
 * into the same type without embeddings: lora_te_text_model_encoder_layers_<i>_self_attn_q_proj
 * -> text_encoder "text_model.encoder.layers.<i>.self_attn.q_proj", lora_unet_down_blocks_0_
 * attentions_0_transformer_blocks_0_attn1_to_out_0 -> unet "down_blocks.0...attn1.to_out.0" (also
 * mlp fc1/fc2, ff.net.0.proj, ff.net.2, proj_in/out), each module's alpha / rank folded into its
 * up matrix (alpha missing or 0: scale 1). Ranks may differ between modules. Anything else (SDXL
 * lora_te1/te2, conv LoRA on ResNets, LoCon 3x3, LyCORIS hada/lokr/lora_mid, DoRA, PEFT
 * lora_A/B, bundled embeddings, LDM-named keys) is an MS_ERR_UNSUPPORTED error naming the key. */
typedef struct {
    char word[MS_WORD_MAX];          /* concept word, "<potter1>" */
    int T, D;                        /* tokens of the word (16 or 1), embedding width */
    float *emb;                      /* (T, D) new_concept_embedding[word] */
} EdloraEmbedding;
typedef struct {
    char name[MS_KEY_MAX];           /* module path: "text_model.encoder.layers.0.self_attn.q_proj",
                                      * "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q" */
    int rank, in, out;
    float *down;                     /* (rank, in)  <name>.lora_down.weight */
    float *up;                       /* (out, rank) <name>.lora_up.weight */
} EdloraModule;
typedef struct {
    int n_emb, n_te, n_unet;         /* embeddings in concept order; modules in file order */
    EdloraEmbedding *emb;
    EdloraModule *te, *unet;
    int cap_emb, cap_te, cap_unet;
} EdloraFile;                        /* zero-initialise, or from edlora_read */
/* By extension (.safetensors, else .pth). Errors name the file and key: a section other than the
 * three, a key not ending in .lora_down.weight / .lora_up.weight, a lora_down without its
 * lora_up (or the reverse), ranks of down and up that differ, an embedding that is not 2-D,
 * words with different T. On error f is left empty. */
MsStatus edlora_read(const char *path, EdloraFile *f);
/* An ED-LoRA trained with the official 16 tokens per word on a UNet with fewer cross-attention
 * layers (the trainer binds token variant i to layer i, as the official encoder_hidden_states[:, i]:
 * the rest never reach a layer and never had a gradient): keeps the first n_layers variants of
 * every word. Returns the tokens per word after (unchanged for plain LoRA, 1, and T <= n_layers). */
int edlora_fit_layers(EdloraFile *f, int n_layers);
/* .safetensors or .pth (torch.load(weights_only=True) gives the official dict: order as held,
 * LoRA tensors with requires_grad=True and embeddings without, as delta_state_dict saves them).
 * Written to a temporary file, then renamed. Empty sections are left out of .pth files
 * (pth_save writes no empty dicts; convert_edlora needs 'unet' and 'text_encoder'). */
MsStatus edlora_write(const char *path, const EdloraFile *f);
void edlora_free(EdloraFile *f);
/* Building a file (copies the data). MS_ERR_ARG on a duplicate word/module or bad sizes. */
MsStatus edlora_add_embedding(EdloraFile *f, const char *word, int T, int D, const float *emb);
MsStatus edlora_add_module(EdloraFile *f, int is_unet, const char *name, int rank, int in, int out,
                           const float *down, const float *up);
/* Tokens per word (all equal after edlora_read); 0 without embeddings. */
int edlora_tokens_per_word(const EdloraFile *f);
/* 1 for the modules the ED-LoRA runtime types carry: text encoder self_attn.{q,k,v,out}_proj,
 * UNet attn1/attn2.{to_q,to_k,to_v,to_out.0}. */
int edlora_module_is_attention(int is_unet, const char *name);
/* Moves every other module (mlp, ff, proj_in/out: kohya files) from f into *extra (zeroed first;
 * free with edlora_free). */
MsStatus edlora_split_extra(EdloraFile *f, EdloraFile *extra);

/* To the runtime types (training resumes, tests): the text encoder's attention LoRA as a
 * ClipLora over *mem (clip_lora_numel floats, ms_alloc_aligned: free with ms_free_aligned;
 * modules absent from the file are zero), the UNet's as a UNetLora carved from `train`
 * (unet_lora_init). Errors: a module the model has no LoRA slot for, in/out sizes that differ
 * from the model's. The rank is the largest module's; smaller ones are zero-padded (exact). */
MsStatus edlora_to_clip_lora(const EdloraFile *f, const ClipTextConfig *c, float alpha, ClipLora *l, float **mem);
MsStatus edlora_to_unet_lora(const EdloraFile *f, const UNetParams *p, float alpha, Arena *train, UNetLora *l);
/* The reverse, for the trainer's output, in the official dict order: embeddings of n_words words
 * (words[w], rows emb[w*T .. w*T+T) of (n_words*T, D)), text encoder modules in CLIPTextModel
 * named_modules() order (per layer k_proj, v_proj, q_proj, out_proj), UNet modules in
 * UNet2DConditionModel named_modules() order (down_blocks, up_blocks, mid_block: diffusers
 * 0.19.3 registers up_blocks before mid_block; per attention to_q, to_k, to_v, to_out.0).
 * te or unet may be NULL (section left empty). f must be empty (zeroed). */
MsStatus edlora_from_lora(EdloraFile *f, int n_words, const char (*words)[MS_WORD_MAX], int T, int D,
                          const float *emb, const ClipLora *te, const UNetParams *up, const UNetLora *unet);

/* Mix-of-Show convert_edlora (convert_edlora_to_diffusers.py) on a loaded model:
 * merge_lora_into_weight for both networks, W += alpha * (up @ down) in float32, for every file
 * module whose <name>.weight is in the table (shape checked; 1x1 convs too). Modules with no
 * such weight are errors (the official code silently skips them). Needs f32 tables: 16-bit
 * ones (--weights f16) are refused with MS_ERR_UNSUPPORTED. */
MsStatus edlora_merge(MsModel *m, const EdloraFile *f, float alpha);
/* edlora_merge's checks alone (every module has a fitting f32 weight); the model is unchanged. */
MsStatus edlora_merge_check(MsModel *m, const EdloraFile *f);
/* load_new_concept + the EDLoRAPipeline prompt binding: adds <new0>.. (word w, layer i:
 * <new{w*T+i}>) to the tokenizer (MS_ERR_ARG when one exists already: the official assert) and
 * fills the MsTxt2ImgOptions ED-LoRA fields (pointing into p, which must outlive them). T = 16
 * (== cross-attention layers): layer-wise contexts and bound prompts. T = 1 (plain LoRA): the
 * tokens and rows are added, but prompts are not bound and one context is used, as the
 * official plain-LoRA path (StableDiffusionPipeline) does. The first new id must be the text
 * encoder's vocab_size (new rows follow the table). */
typedef struct {
    float *new_emb;                  /* (n_new, D) */
    char (*tok)[24];                 /* n_new token names */
    const char **word, **token;      /* pointer arrays for MsTxt2ImgOptions */
    int n_new;
} EdloraPrompt;
MsStatus edlora_prepare(const EdloraFile *f, ClipTokenizer *tok, const MsModel *m, EdloraPrompt *p,
                        MsTxt2ImgOptions *o);
void edlora_prompt_free(EdloraPrompt *p);

/* ---- models as users have them (tools/model_infer.c, tools/model_load.c; issue 13) ---- */
/* One tensor of a single file: its key (LDM layout, text-encoder keys normalised to
 * cond_stage_model.transformer.text_model.*) and shape. */
typedef struct { const char *name; int ndim; const int64_t *shape; } MsShapeEntry;
/* The configs of an original single file from its tensor shapes: UNet widths, layers per block,
 * attention blocks, transformer depths, cross-attention width, proj_in kind, in/out channels,
 * kernels; VAE widths, layers, latent/in/out channels; text encoder width, MLP, layers,
 * vocabulary, positions. Heads, GroupNorm groups, VAE scaling and the scheduler follow SD 1.x
 * (8 heads, 32 groups, CLIP head width 64, 0.18215, SD 1.5 scheduler), reduced to divide the
 * widths; mixshow's tiny-sd topology gets its own configs' values. Fills m's four configs
 * (not the tables). notes (may be NULL) receives what was inferred and what assumed. A shape
 * no SD 1.x topology has, or a missing tensor the inference reads: MS_ERR_SHAPE/MS_ERR_FORMAT
 * naming the tensor. */
MsStatus ms_infer_ldm_configs(const MsShapeEntry *t, size_t n, const char *origin, MsModel *m, char *notes,
                              size_t cap);
/* ms_model_load, but a single file without config_dir takes its configs from the file's own
 * metadata (mixshow.{unet,vae,text_encoder,scheduler}_config, which `mixshow convert` writes)
 * or, failing that, from its tensor shapes (ms_infer_ldm_configs). notes as above. */
MsStatus ms_model_load_ex(const char *path, const MsLoadOptions *opt, MsModel *m, char *notes, size_t cap);

/* Where mixshow's data is (the CLIP BPE files and the tiny model in models/tiny-sd, the shipped
 * world model in models/world): data roots are tried in order: the executable's folder and up
 * to three parents, each as is (a source tree: build/<name>/mixshow, tests) and as
 * <dir>/share/mixshow (an install: PREFIX/bin),
 * then MS_DATADIR (compile time, `make install`'s $(PREFIX)/share/mixshow), then the current
 * directory. The executable is /proc/self/exe on Linux, else argv[0] (set it from main; searched
 * in PATH when it has no '/'). */
void ms_set_argv0(const char *argv0);
/* <root>/rel for the first data root where it exists; 0 when none. */
int ms_find_data(const char *rel, char *out, size_t cap);
/* The model used when none is given: <root>/models/world (the shipped world model, trained by
 * `mixshow pretrain`) at the first data root that has it, else <root>/models/tiny-sd (the
 * random-weight tiny model). Its folder into out; returns "models/world" or "models/tiny-sd",
 * NULL when neither is found. */
const char *ms_default_model(char *out, size_t cap);
/* The random-weight tiny model's folder (<root>/models/tiny-sd) into out, whatever the default
 * is (benchmarks and numeric checks that mean that model); 0 when not found. */
int ms_find_tiny_model(char *out, size_t cap);
/* The tokenizer folder for a model: tokenizer_dir when given (must hold vocab.json), else the
 * model folder's tokenizer/ (or the folder itself when it is a tokenizer folder), else the
 * shipped CLIP BPE files (models/tiny-sd/tokenizer under a data root). *shipped = 1 then. */
MsStatus ms_find_tokenizer(const char *model_path, const char *tokenizer_dir, char *out, size_t cap, int *shipped);

typedef struct {
    const char *tokenizer_dir;   /* --tokenizer DIR: overrides the model's and the shipped one */
    const char *config_dir;      /* --config DIR: a diffusers folder whose configs describe a
                                  * single file (overrides metadata and inference) */
    int keep_half;               /* --weights f16 */
    int quiet;                   /* 1: notes only into the buffer, not on stderr */
} MsOpenOptions;                 /* NULL: all defaults */
/* What every command that takes a model calls: path (NULL: ms_default_model, models/world else
 * models/tiny-sd under a data root) as a diffusers folder or a single .safetensors/.ckpt file, with configs from the
 * folder, --config, the file's metadata or its shapes; and the tokenizer (tok may be NULL: not
 * loaded) from --tokenizer, the folder's tokenizer/ or the shipped files. What was inferred or
 * assumed (single files, the shipped tokenizer, the default model) goes to notes (may be NULL)
 * and, unless quiet, once to stderr as "mixshow: <path>: ...". On failure nothing is held. */
MsStatus ms_open_model(const char *path, const MsOpenOptions *o, MsModel *m, ClipTokenizer *tok, char *notes,
                       size_t cap);

/* ---- regionally controllable sampling: strings, concepts, PNG text (tools/regional.c;
 * helper "regional") ---- */
/* One region of --prompt_rewrite "[prompt]-*-[negative]-*-[t, l, b, r]|...", as
 * regionally_controlable_sampling.py prepare_text builds it: the string split on '|' (stopping at
 * the first empty item), each item split on '-*-' into exactly three parts, '[' and ']' removed
 * from the prompts, the position a list of 4 numbers in pixels (or [] = the whole image). */
typedef struct {
    char *prompt, *negative;         /* malloc'ed */
    double pix[4];                   /* top, left, bottom, right in pixels as given */
    double box[4];                   /* pos[0] / height, pos[1] / width, pos[2] / height, pos[3] / width */
    int full;                        /* the position was [] */
} RegionSpec;
typedef struct { int n; RegionSpec r[MS_REGION_MAX]; } RegionList;
/* Errors (MS_ERR_ARG) name the region: a wrong number of '-*-', a position that is not [] or
 * 4 numbers, a box outside the height x width image or with zero area. */
MsStatus regional_parse_rewrite(const char *s, int height, int width, RegionList *out);
void regional_list_free(RegionList *l);
/* region_*_adaptor_weight "[t, l, b, r]-w|..." (pixels): n boxes and weights (at most cap);
 * "" gives none. what names the option in messages. */
MsStatus regional_parse_weights(const char *s, const char *what, int height, int width, int *n, double (*box)[4],
                                float *w, int cap);
/* A fused model's concepts: DIR/tokenizer/added_tokens.json ({token: id}, ids after the vocabulary)
 * added to tok, DIR/new_concept_cfg.json ({word: {"concept_token_names": [n_layers names], ...}})
 * as the bind arrays of MsTxt2ImgOptions (word_ptr, token_ptr[w * n_layers + i]). No files: none. */
typedef struct {
    int n_words, n_layers;
    char (*words)[MS_WORD_MAX];
    char (*tokens)[24];
    const char **word_ptr, **token_ptr;
} RegionalConcepts;
MsStatus regional_concepts_load(const char *dir, ClipTokenizer *tok, int n_layers, RegionalConcepts *c);
void regional_concepts_free(RegionalConcepts *c);
/* Warns on stderr about "<word>"s in text that are not among known (tokenized as plain text). */
void regional_warn_unknown(const char *text, const char *where, const char *const *known, int n_known);
/* PNG with one tEXt chunk (key, Latin-1 text; other bytes become '?') after IHDR; path.tmp, renamed. */
MsStatus regional_png_write_text(const char *path, const uint8_t *px, int w, int h, int C, const char *key,
                                 const char *text);
/* Overlay (tools/overlay.c): draws each box (pixels, top, left, bottom, right) as a 2-pixel frame in
 * its own colour with its label in a built-in 5x7 bitmap font, on px (h, w, 3). */
void regional_overlay(uint8_t *px, int w, int h, int n, const double (*box)[4], const char *const *label);
/* `mixshow sample` with the official regionally_controlable_sampling.py options (tools/regional.c):
 * regional_wanted() is 1 when argv holds one of them; cmd_sample then hands over. */
int regional_wanted(int argc, char **argv);
int cmd_sample_regional(int argc, char **argv);
/* cmd_sample.c's condition reader (diffusers _preprocess_adapter_image): (1,C,H,W) in [0,1]. */
MsStatus sample_load_cond(const char *path, int C, int W, int H, float **out);

/* ---- the procedural world (tools/world.c, tools/cmd_world.c; issue 15, helper "world") ---- */
/* Scenes on a 1024-unit square rendered at 64 or 128 pixels with integer arithmetic only, so a
 * seed gives the same bytes everywhere. Indices below name the vocabulary; world_*_name gives
 * the canonical word ("circle", "red", "striped", ...); captions use these or synonyms. */
#define WORLD_COLOURS 11
#define WORLD_SHAPES 6
#define WORLD_PATTERNS 3
#define WORLD_BACKGROUNDS 7
#define WORLD_WHERES 6
#define WORLD_EARS 5
#define WORLD_TAILS 4
#define WORLD_MARKINGS 4
#define WORLD_MAX_CHARACTERS 16
enum { WSH_CIRCLE, WSH_SQUARE, WSH_TRIANGLE, WSH_DIAMOND, WSH_STAR, WSH_CROSS };
enum { WBG_SKY, WBG_GRASS, WBG_BRICK, WBG_WATER, WBG_PLAIN, WBG_GRADIENT, WBG_NOISE };
enum { WW_ANY, WW_LEFT, WW_RIGHT, WW_TOP, WW_BOTTOM, WW_CENTRE };          /* where a lone group sits */
enum { WREL_LEFT_OF, WREL_RIGHT_OF, WREL_ABOVE, WREL_BELOW };             /* g[0] REL g[1] */
enum { WEAR_POINTED, WEAR_ROUND, WEAR_ANTENNAE, WEAR_HORN, WEAR_LONG };
enum { WTAIL_NONE, WTAIL_TUFT, WTAIL_ZIGZAG, WTAIL_FLUFFY };
enum { WMK_NONE, WMK_SPOTS, WMK_STRIPES, WMK_BELLY };
typedef struct {
    int kind;                        /* WBG_* */
    int colour_a, colour_b;          /* plain: a; gradient: a -> b; noise: a and b */
    int vertical, phase;             /* gradient direction; water wave phase (units) */
    uint64_t texture_seed;           /* grain, grass, bricks, noise */
    int n_clouds, cloud_x[3], cloud_y[3], cloud_r[3];   /* sky */
} WorldBackground;
typedef struct {                     /* count identical objects */
    int shape, colour, pattern, size;   /* size 0 small, 1 medium, 2 large */
    int stripe_dir;                  /* 0 horizontal, 1 vertical, 2 diagonal */
    int count;                       /* 1..3 */
    int where;                       /* WW_*: the region holding the centres */
    int x[3], y[3], r[3];            /* centres and radii, units */
} WorldGroup;
typedef struct {                     /* a creature: its identity */
    char name[8];                    /* folder name and concept words <name1> <name2> */
    int body_colour, limb_colour, marking, marking_colour, ears, tail, eyes;
    int body_rx, body_ry, head_r, arm_len, leg_len, limb_w;   /* units at scale 1000 */
} WorldCharacter;
typedef struct {                     /* one appearance of a creature */
    int x, y;                        /* body centre, units */
    int scale;                       /* 1000 = 1:1 */
    int facing;                      /* 0 right, 1 left (mirrored) */
    int arm[2];                      /* arm directions, 32-step angles (0 out, 8 down, 24 up) */
    int walking, head_tilt;
} WorldCharInstance;
typedef struct {
    WorldBackground bg;
    int n_groups, relation;          /* relation: WREL_* when n_groups == 2 */
    WorldGroup g[2];
    int n_chars;
    WorldCharacter chars[3];
    WorldCharInstance inst[3];
} WorldScene;
const char *world_colour_name(int c);
const char *world_shape_name(int s);
const char *world_pattern_name(int p);
const char *world_size_name(int s);
const char *world_background_name(int b);
const char *world_where_name(int w);
const char *world_relation_name(int r);
const char *world_ear_name(int e);
const char *world_tail_name(int t);
const char *world_marking_name(int m);
/* Scene `index` of the base world (no characters); its caption in plain English. */
void world_scene_make(uint64_t seed, int index, WorldScene *s);
MsStatus world_caption(uint64_t seed, int index, const WorldScene *s, char *out, size_t cap);
/* Character `index` (identities dealt so the first ones differ in colour, ears, tail, markings),
 * its training image `image` (pose, scale, position, background), and that image's caption
 * "<tok>, waving, walking, facing left, on grass, ..." (tok: "<TOK>" in the dataset). */
/* splitmix64's finaliser: the world's streams, and the seeds derived from a world seed
 * (pretrain's and the evaluation encoders' creature streams) */
uint64_t world_mix64(uint64_t z);
void world_character_make(uint64_t seed, int index, WorldCharacter *c);
void world_character_scene(uint64_t seed, const WorldCharacter *c, int char_index, int image, WorldScene *s);
MsStatus world_character_caption(uint64_t seed, int char_index, int image, const WorldScene *s, const char *tok,
                                 char *out, size_t cap);
/* n_chars (2..3) of the n_all characters side by side in columns; which[] receives their indices. */
void world_multi_scene(uint64_t seed, int index, int n_chars, const WorldCharacter *all, int n_all, WorldScene *s,
                       int *which);
/* Renders at S (16..1024 dividing 1024) pixels: rgb (S,S,3); mask (S,S) 255 on character pixels
 * (scenes without characters: object pixels); pose (S,S,3) keypose-like (OpenPose colours on
 * black); sketch (S,S,3) white outlines on black. Any output may be NULL. */
MsStatus world_render(const WorldScene *s, int S, uint8_t *rgb, uint8_t *mask, uint8_t *pose, uint8_t *sketch);
typedef struct {
    const char *out;                 /* output folder (created) */
    int n;                           /* base scenes */
    uint64_t seed;
    int size;                        /* 64 or 128 */
    int characters;                  /* 0..WORLD_MAX_CHARACTERS */
    int per_character;               /* images per character, 5..10 */
    int progress;                    /* 1: progress lines on stderr */
} WorldOptions;
/* The dataset (layout in tools/cmd_world.c's usage): scenes/, characters/<name>/, data_cfgs/,
 * options/, validation_prompts/, multi/, contact sheets. Files are written via .tmp + rename. */
MsStatus world_generate(const WorldOptions *o);
int cmd_world(int argc, char **argv);    /* mixshow world --out DIR --n N --seed S [--size 64|128] [--characters K] */

/* ---- the alignment stand-ins of `mixshow eval` (tools/eval_world.c, tools/cmd_eval.c; issue 15) ---- */
#define EVAL_CAPTION 256                /* bytes of a world caption */
typedef struct {
    uint64_t seed;                   /* the world data seed (scenes, creatures, the draws per step) */
    int identities;                  /* training creatures (4096) */
    int Bt, Bi, per_id;              /* captioned images, identity images, renders per identity */
    int char_every;                  /* every k-th captioned image is a creature (4; 0: none) */
    int scenes;                      /* base scenes drawn from indices 0..scenes-1 (0: 0..2^30-1) */
} EvalData;
/* The batch of step `step` (a function of d and step only): images ((Bt+Bi),3,S,S) in [-1,1],
 * captions (Bt), labels (Bi) = identity ids. */
MsStatus eval_world_batch(const EvalData *d, int S, int64_t step, float *images, char (*captions)[EVAL_CAPTION],
                          int *labels);
void eval_image_from_rgb(float *out, const uint8_t *rgb, int S);   /* (S,S,3) -> (3,S,S) in [-1,1] */
/* A PNG/JPEG as RGB, resized to S x S (Pillow bilinear, antialiased), -> (3,S,S) in [-1,1]. */
MsStatus eval_image_load(const char *path, int S, float *out);
typedef struct {
    int n_scenes;                    /* held-out base scenes (indices >= 2^30) */
    double i2t_top1, t2i_top1;       /* caption retrieval among them (an identical caption counts) */
    double cos_match, cos_mismatch;  /* mean text alignment of true vs other pairs */
    int n_chars;                     /* creatures per identity test (4 reference + 4 query renders) */
    double id_top1_seen, id_top1_unseen;  /* identification: nearest creature by mean cosine */
    double verif_seen, verif_unseen; /* balanced verification accuracy at `threshold` */
    double threshold;                /* chosen on the seen creatures' held-out renders */
} EvalHeldout;
MsStatus eval_heldout(const EvalNet *e, const ClipTokenizer *tok, uint64_t seed, int n_scenes, int n_chars, EvalHeldout *h);
/* The encoders file; with t, also the training state (checkpoint). meta: n_meta (key, value)
 * pairs added to the metadata (a checkpoint's "recipe"). Written via path.tmp + rename. */
MsStatus evalnet_save(const char *path, const EvalNet *e, EvalTrainer *t, const char *const *meta, int n_meta);
/* The encoders file alone (no training state) with F16 weights when half (rounded to nearest;
 * evalnet_load widens them back), what `eval --train-encoders --half` and `convert --half` write. */
MsStatus evalnet_save_encoders(const char *path, const EvalNet *e, int half, const char *const *meta, int n_meta);
/* t NULL: creates e from the file's config and weights. t given (resume): e is the run's own,
 * the file's "recipe" must equal recipe; weights, moments and step are read. */
MsStatus evalnet_load(const char *path, EvalNet *e, EvalTrainer *t, const char *recipe);
/* The names in dir (readdir order; tools/dataset.c): *names and each name malloc'ed. */
MsStatus ms_list_dir(const char *dir, char ***names, size_t *n);
int cmd_eval(int argc, char **argv);     /* mixshow eval [--train-encoders OUT] ... */

#endif /* MS_TOOLS_H */
