/* tools/tools.h — what the CLI's files share: one entry point per subcommand, and the codecs
 * (safetensors, JSON, pickle/zip, PNG, JPEG) that only tools/ may touch. */
#ifndef MS_TOOLS_H
#define MS_TOOLS_H

#include "mixshow.h"

/* Subcommands: argv[0] is the subcommand name. Return the process exit status. */
int cmd_bench(int argc, char **argv);

/* @@SECTION codecs@@ */

#endif /* MS_TOOLS_H */
