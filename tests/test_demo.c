/* tests/test_demo.c — `make demo` on a reduced budget (issue 15), only in `make test-full`: tiny
 * evaluation encoders trained for a few steps, then tools/demo.sh on the random tiny model with 3
 * training steps per concept, 1 seed and 2 sampling steps. Checks the pipeline (every stage ran,
 * the base model's table has its four rows and the ablation's its seven, the paired changes through fusion are
 * printed, the sheets and pages exist), not the scores: those mean
 * something only with the trained world model. */
#include "tests/test.h"

static int file_exists(const char *p) {
    FILE *f = fopen(p, "rb");
    if (f) fclose(f);
    return f != NULL;
}

int main(int argc, char **argv) {
    (void)argc;
    if (!test_full()) {
        printf("  skip: tools/demo.sh runs in make test-full only (MS_TEST_FULL=1)\n");
        return test_summary("test_demo");
    }
    /* the mixshow next to this test's folder: BUILD/tests/test_demo -> BUILD/mixshow */
    char ms[1024], dir[512], cmd[4096], p[1100];
    snprintf(ms, sizeof ms, "%s", argv[0]);
    char *slash = strrchr(ms, '/');
    if (slash) snprintf(slash, sizeof ms - (size_t)(slash - ms), "/../mixshow");
    else snprintf(ms, sizeof ms, "./mixshow");
    test_tmp(dir, sizeof dir, "demo");
    snprintf(cmd, sizeof cmd, "mkdir -p '%s'", dir);
    if (!check(system(cmd) == 0, "%s", cmd)) return test_summary("test_demo");
    snprintf(cmd, sizeof cmd,
             "'%s' eval --train-encoders '%s/enc' --steps 6 --batch-text 8 --batch-id 8 --identities 16 --quiet "
             "--tokenizer models/tiny-sd/tokenizer > /dev/null", ms, dir);
    check(system(cmd) == 0, "tiny evaluation encoders: %s", cmd);
    snprintf(cmd, sizeof cmd,
             "DEMO_OUT='%s/out' DEMO_BASE=models/tiny-sd DEMO_ENCODERS='%s/enc/encoders.safetensors' DEMO_STEPS=3 "
             "DEMO_CAPTIONS=2 DEMO_SEEDS=1 DEMO_SAMPLE_STEPS=2 MIXSHOW='%s' sh tools/demo.sh > '%s/demo.log' 2>&1", dir, dir, ms, dir);
    check(system(cmd) == 0, "tools/demo.sh ran to the end (log: %s/demo.log)", dir);
    static const char *const legs[] = { "base", "untrained", "real", "shuffled", "class", "edlora", "lora", "fused_gradient", "fused_weight", "multi_fused_gradient",
                                        "multi_fused_weight" };
    for (size_t i = 0; i < sizeof legs / sizeof legs[0]; i++) {
        int ok = 1;
        static const char *const ext[] = { "csv", "json", "png", "html" };
        for (size_t k = 0; k < 4; k++) {
            snprintf(p, sizeof p, "%s/out/samples/%s/eval.%s", dir, legs[i], ext[k]);
            ok &= file_exists(p);
        }
        check(ok, "%s: eval.csv, .json, .png (contact sheet), .html", legs[i]);
    }
    snprintf(p, sizeof p, "%s/out/table.md", dir);
    FILE *f = fopen(p, "r");
    int rows = 0, rows1 = 0, paired = 0;
    if (f) {
        char line[512];
        while (fgets(line, sizeof line, f)) {
            double a, b, c;
            const char *g = strstr(line, "ED-LoRA -> gradient fusion: ");
            double m1, s1, m2, s2;
            int n1, n2;
            if (g && sscanf(g, "ED-LoRA -> gradient fusion: %lf +- %lf (%d pairs); LoRA -> weight fusion: %lf +- %lf (%d pairs)",
                            &m1, &s1, &n1, &m2, &s2, &n2) == 6 && n1 >= 2 && n1 == n2 && s1 >= 0 && s2 >= 0)
                paired++;
            int bars = 0;
            const char *q = strchr(line + 1, '|');
            if (line[0] != '|' || !q) continue;
            for (const char *t = line; *t; t++) bars += *t == '|';
            const int k = sscanf(q, "| %lf | %lf | %lf |", &a, &b, &c);
            /* the ablation: | method | text | image | prompt top-1 (empty: one distinct prompt) | */
            if (bars == 5 && k >= 2 && a >= -1 && a <= 1 && b >= -1 && b <= 1 && (k == 2 || (c >= 0 && c <= 1))) rows++;
            /* the base model: | images | text | caption top-1 | */
            else if (bars == 4 && k == 2 && a >= -1 && a <= 1 && b >= 0 && b <= 1) rows1++;
        }
        fclose(f);
    }
    check(paired == 1, "table.md: the paired changes through fusion (mean +- s.e., pairs) for ED-LoRA and LoRA");
    check(rows == 7 && rows1 == 4, "table.md: %d rows of two cosines in [-1, 1] (+ a share in [0, 1]; 7 expected), %d of a "
          "cosine and a share (4 expected)", rows, rows1);
    if (!test_failed) {
        snprintf(cmd, sizeof cmd, "rm -rf '%s'", dir);
        if (system(cmd) != 0) printf("  (could not remove %s)\n", dir);
    }
    return test_summary("test_demo");
}
