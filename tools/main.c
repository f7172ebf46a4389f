/* tools/main.c — the `mixshow` command line: dispatches to one function per subcommand.
 * Only tools/ parses arguments or touches image files; everything below returns MsStatus. */
#include "mixshow.h"
#include "tools/tools.h"

#include <stdio.h>
#include <string.h>

typedef struct {
    const char *name;
    int (*run)(int argc, char **argv);
    const char *summary;
} Command;

static int cmd_version(int argc, char **argv) {
    (void)argc; (void)argv;
    printf("mixshow %s (kernels: %s, detected: %s, threads: %d)\n", MS_VERSION,
           ms_simd_name(ms_simd()), ms_simd_name(ms_simd_detected()), ms_get_threads());
    return 0;
}

static const Command commands[] = {
    { "version", cmd_version, "print version, SIMD level and thread count" },
    { "sample",  cmd_sample,  "text to image (diffusers StableDiffusionPipeline; the shipped world model by default)" },
    { "dump",    cmd_dump,    "run networks on tensors from a safetensors file and write their outputs" },
    { "tokenize", cmd_tokenize, "print the 77 CLIP input ids of a prompt (with added tokens)" },
    { "clip",    cmd_clip,    "CLIP image-image and image-text cosines with a transformers CLIPModel (the paper's metrics)" },
    { "inspect", cmd_inspect, "list every tensor (name, dtype, shape) of a .safetensors/.pth/.ckpt/.bin" },
    { "convert", cmd_convert, "model folder/single file -> diffusers folder or LDM .safetensors; image -> PNG" },
    { "train",   cmd_train,   "ED-LoRA training of one concept (Mix-of-Show train_edlora.py)" },
    { "eval",    cmd_eval,    "text and image alignment of generated images by stand-in encoders trained on the world (issue 15)" },
    { "pretrain", cmd_pretrain, "train a small SD 1.x model from scratch on the procedural world (issue 15)" },
    { "fuse",    cmd_fuse,    "gradient fusion of ED-LoRAs into one model (Mix-of-Show gradient_fusion.py)" },
    { "world",   cmd_world,   "write the procedural world: scenes, characters, captions, masks, conditions, configs" },
    { "bench",   cmd_bench,   "measure kernels against the machine's FMA peak (see mixshow bench --help)" },
};

static void usage(FILE *f) {
    fprintf(f, "mixshow %s — Mix-of-Show on Stable Diffusion 1.x in plain C11\n\n"
               "usage: mixshow COMMAND [options]      (mixshow COMMAND --help for its options)\n\n"
               "commands:\n", MS_VERSION);
    for (size_t i = 0; i < sizeof commands / sizeof commands[0]; i++)
        fprintf(f, "  %-9s %s\n", commands[i].name, commands[i].summary);
    fprintf(f, "\nenvironment: OMP_NUM_THREADS sets the thread count; results do not depend on it.\n");
}

int main(int argc, char **argv) {
    ms_wait_policy_passive(argv);              /* no spinning against a busy core (issue 14) */
    ms_set_argv0(argc > 0 ? argv[0] : NULL);   /* finding shipped data where /proc/self/exe is absent */
    if (argc < 2) { usage(stderr); return 2; }
    if (!strcmp(argv[1], "--help") || !strcmp(argv[1], "-h") || !strcmp(argv[1], "help")) { usage(stdout); return 0; }
    if (!strcmp(argv[1], "--version")) return cmd_version(0, NULL);
    for (size_t i = 0; i < sizeof commands / sizeof commands[0]; i++)
        if (!strcmp(argv[1], commands[i].name)) return commands[i].run(argc - 1, argv + 1);
    fprintf(stderr, "mixshow: unknown command '%s'\n\n", argv[1]);
    usage(stderr);
    return 2;
}
