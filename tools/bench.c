/* tools/bench.c — `mixshow bench` (placeholder until the kernels land) */
#include "mixshow.h"
#include "tools/tools.h"
#include <stdio.h>
int cmd_bench(int argc, char **argv) { (void)argc; (void)argv; fprintf(stderr, "mixshow bench: not built yet\n"); return 1; }
