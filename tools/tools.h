/* tools/tools.h — what the CLI's files share: one entry point per subcommand, and the codecs
 * (safetensors, JSON, pickle/zip, PNG, JPEG) that only tools/ may touch. */
#ifndef MS_TOOLS_H
#define MS_TOOLS_H

#include "mixshow.h"

/* Subcommands: argv[0] is the subcommand name. Return the process exit status. */
int cmd_bench(int argc, char **argv);

/* ---- zlib: inflate/deflate, CRC-32, Adler-32 (tools/zlib.c) ---- */
/* @@SECTION zlib@@ */

/* ---- safetensors + JSON (tools/safetensors.c, tools/json.c) ---- */
/* @@SECTION safetensors_json@@ */

/* ---- PNG, JPEG (tools/png.c, tools/jpeg.c) ---- */
/* @@SECTION images@@ */

/* ---- PyTorch zip + restricted pickle (tools/zip.c, tools/pickle.c) ---- */
/* @@SECTION pytorch@@ */

/* ---- model loading: diffusers folders and LDM single files (tools/model_load.c) ---- */
/* @@SECTION model_load@@ */

#endif /* MS_TOOLS_H */
