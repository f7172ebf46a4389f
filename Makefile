# mixshow — build, test, bench. `make help` lists the targets.
#
# Variants build into their own folder so they never mix objects:
#   make            ./mixshow (OpenMP when the compiler has it)
#   make test       all test programs; ends with "N passed, N failed"
#   make noomp      same without OpenMP          (build/noomp)
#   make nosimd     scalar kernels only (-DMS_NO_SIMD) (build/nosimd)
#   make asan/ubsan tests under AddressSanitizer / UndefinedBehaviorSanitizer
#   make fast       -O3 -march=native (tests must pass here too)
#   make bench      ./mixshow bench (median of several runs, ratio to the machine's FMA peak)
#   make test-full  slow checks (SD 1.5-sized shapes), not run in CI
#   make pretrain   the world model from scratch (WORLD_RECIPE below) into build/world
#   make eval-encoders  the evaluation encoders from scratch -> models/eval-encoders.safetensors
#   make demo       the method in the world, measured (tools/demo.sh; DEMO_* knobs there)
#   make install    PREFIX/bin/mixshow + PREFIX/share/mixshow (CLIP BPE files, tiny and world models);
#                   PREFIX=/usr/local, DESTDIR= for staging; make uninstall removes them

CC      ?= cc
AR      ?= ar
# header dependencies (tcc has no -MMD/-MP: make CC=tcc DEPFLAGS= NOOMP=1)
DEPFLAGS ?= -MMD -MP
BUILD   ?= build
OPT     ?= -O2
CSTD    = -std=c11 -pedantic -Wall -Wextra
CFLAGS  = $(CSTD) $(OPT) -g $(EXTRA_CFLAGS)
LDLIBS  = -lm $(EXTRA_LDLIBS)

# OpenMP when the compiler can link it (gcc; clang with libomp). NOOMP=1 turns it off.
ifneq ($(NOOMP),1)
OMPFLAG := $(shell printf 'int main(void){return 0;}\n' | $(CC) -fopenmp -x c - -o /dev/null 2>/dev/null && echo -fopenmp)
endif
CFLAGS  += $(OMPFLAG)
# No silent a*b+c -> fma contraction (clang's default; gcc's is off in ISO C mode): the same
# source then gives the same bits with every compiler. Kernels that want FMA say so explicitly.
FPCONTRACT := $(shell printf 'int main(void){return 0;}\n' | $(CC) -ffp-contract=off -x c - -o /dev/null 2>/dev/null && echo -ffp-contract=off)
CFLAGS  += $(FPCONTRACT)
# s390x gcc defines FLT_EVAL_METHOD 1 under -std=c11 (float arithmetic done in double): ask for
# plain float arithmetic there, so that its numbers are those of every other platform. Never on
# x87 (i386 without SSE2), where "fast" would keep 80-bit intermediates instead.
ifeq ($(shell printf '' | $(CC) $(CSTD) -dM -E -x c - 2>/dev/null | grep -c '__FLT_EVAL_METHOD__ 1$$'),1)
CFLAGS  += -fexcess-precision=fast
endif

LIB_SRC   = tensor.c mixshow.c $(wildcard models/*.c) $(filter-out tools/main.c tools/fuzz_%.c,$(wildcard tools/*.c))
LIB_OBJ   = $(LIB_SRC:%.c=$(BUILD)/%.o)
TEST_SRC  = $(wildcard tests/test_*.c)
TEST_BIN  = $(TEST_SRC:tests/%.c=$(BUILD)/tests/%)

.PHONY: all test test-full pretrain eval-encoders demo bench noomp nosimd asan ubsan fast clean help

all: mixshow

mixshow: $(BUILD)/mixshow
	cp $< $@

$(BUILD)/mixshow: $(BUILD)/tools/main.o $(BUILD)/libmixshow.a
	$(CC) $(CFLAGS) -o $@ $^ $(LDLIBS)

$(BUILD)/libmixshow.a: $(LIB_OBJ)
	rm -f $@
	$(AR) rcs $@ $^

$(BUILD)/%.o: %.c
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) $(DEPFLAGS) -I. -c $< -o $@

$(BUILD)/tests/%: tests/%.c $(wildcard tests/*.h) $(BUILD)/libmixshow.a
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) -I. -o $@ $< $(BUILD)/libmixshow.a $(LDLIBS)

test: $(TEST_BIN) $(BUILD)/mixshow
	@sh tests/run.sh $(TEST_BIN)

test-full: $(TEST_BIN) $(BUILD)/mixshow
	@MS_TEST_FULL=1 sh tests/run.sh $(TEST_BIN)

# The world model's recipe (issue 15), the one models/world was trained with (models/world/README.md):
# VAE factor 8 (128x128 scenes -> 4x16x16 latents) on random 64x64 windows; a text encoder trained
# first and alone, contrastively on world scenes and captions (token rows kept <= 0.4 long), then
# frozen; the UNet on 8192 scenes and 2048 renders of 512 anonymous creatures, the last 1500 of
# 5000 steps with a decaying lr; then the two adapters. Deterministic from the seeds (the thread
# count changes no bit).
WORLD_RECIPE = --size 128 --scenes 8192 --creatures 2048 --vae-channels 16,32,64,64 --vae-crop 64 \
               --vae-steps 3000 --vae-lr 2e-3 --channels 64,128,128 --heads 2,4,4 --text-width 128 \
               --text-layers 4 --text-heads 4 --text contrastive --text-token-max-norm 0.4 \
               --steps 5000 --decay 1500 --adapter-steps 300 --seed 0
pretrain: $(BUILD)/mixshow
	$(BUILD)/mixshow pretrain --out build/world $(WORLD_RECIPE)

# The evaluation encoders (mixshow eval's stand-ins for CLIP, issue 15): the defaults of
# --train-encoders (1500 steps, seed 0), written F16 with the never-trained token rows zero.
eval-encoders: $(BUILD)/mixshow
	$(BUILD)/mixshow eval --train-encoders build/eval-encoders --half
	cp build/eval-encoders/encoders.safetensors models/eval-encoders.safetensors

demo: $(BUILD)/mixshow
	MIXSHOW=$(BUILD)/mixshow sh tools/demo.sh

bench: $(BUILD)/mixshow
	$(BUILD)/mixshow bench

noomp:
	$(MAKE) NOOMP=1 BUILD=build/noomp test

nosimd:
	$(MAKE) BUILD=build/nosimd EXTRA_CFLAGS="-DMS_NO_SIMD" test

asan:
	$(MAKE) BUILD=build/asan OPT=-O1 EXTRA_CFLAGS="-fsanitize=address -fno-omit-frame-pointer" test

ubsan:
	$(MAKE) BUILD=build/ubsan OPT=-O1 EXTRA_CFLAGS="-fsanitize=undefined -fno-sanitize-recover=undefined -fno-omit-frame-pointer" test

fast:
	$(MAKE) BUILD=build/fast OPT="-O3 -march=native" test

clean:
	rm -rf build mixshow

help:
	@sed -n '1,15p' Makefile

# Install: the binary, and the data it looks for next to itself or in MS_DATADIR (the CLIP BPE
# files and the tiny model in models/tiny-sd; the shipped world model models/world, the default, and
# the evaluation encoders models/eval-encoders.safetensors when present). model_load.o is rebuilt when
# DATADIR changes (the stamp file holds the value it was built with).
PREFIX  ?= /usr/local
DESTDIR ?=
BINDIR   = $(PREFIX)/bin
DATADIR  = $(PREFIX)/share/mixshow
$(BUILD)/tools/model_load.o: CFLAGS += -DMS_DATADIR='"$(DATADIR)"'
$(BUILD)/tools/model_load.o: $(BUILD)/datadir.stamp
$(BUILD)/datadir.stamp: FORCE
	@mkdir -p $(dir $@)
	@echo '$(DATADIR)' | cmp -s - $@ || echo '$(DATADIR)' > $@
.PHONY: install uninstall FORCE
FORCE:
install: $(BUILD)/mixshow
	mkdir -p '$(DESTDIR)$(BINDIR)' '$(DESTDIR)$(DATADIR)/models'
	cp $(BUILD)/mixshow '$(DESTDIR)$(BINDIR)/mixshow.tmp' && chmod 755 '$(DESTDIR)$(BINDIR)/mixshow.tmp' && \
	  mv -f '$(DESTDIR)$(BINDIR)/mixshow.tmp' '$(DESTDIR)$(BINDIR)/mixshow'
	rm -rf '$(DESTDIR)$(DATADIR)/models/tiny-sd' '$(DESTDIR)$(DATADIR)/models/world'
	cp -R models/tiny-sd '$(DESTDIR)$(DATADIR)/models/'
	if [ -f models/world/model_index.json ]; then cp -R models/world '$(DESTDIR)$(DATADIR)/models/'; fi
	if [ -f models/eval-encoders.safetensors ]; then cp models/eval-encoders.safetensors '$(DESTDIR)$(DATADIR)/models/'; fi
	chmod -R a+rX '$(DESTDIR)$(DATADIR)'
uninstall:
	rm -f '$(DESTDIR)$(BINDIR)/mixshow'
	rm -rf '$(DESTDIR)$(DATADIR)'

-include $(LIB_OBJ:.o=.d) $(BUILD)/tools/main.d

# Fuzz targets: each tools/fuzz_*.c defines LLVMFuzzerTestOneInput. `make fuzz` builds them
# with clang's libFuzzer into $(BUILD)/fuzz/; `make fuzz FUZZ_CC=afl-clang-fast` for AFL++.
FUZZ_CC  ?= clang
FUZZ_SRC  = $(wildcard tools/fuzz_*.c)
.PHONY: fuzz cross-test
fuzz:
	$(MAKE) BUILD=$(BUILD)/fuzzlib CC=$(FUZZ_CC) NOOMP=1 OPT=-O1 EXTRA_CFLAGS="-fsanitize=fuzzer-no-link,address,undefined" $(BUILD)/fuzzlib/libmixshow.a
	@mkdir -p $(BUILD)/fuzz
	@for f in $(FUZZ_SRC); do b=$(BUILD)/fuzz/$$(basename $$f .c); echo "$(FUZZ_CC) $$f -> $$b"; \
	  $(FUZZ_CC) -std=c11 -g -O1 -I. -fsanitize=fuzzer,address,undefined -o $$b $$f $(BUILD)/fuzzlib/libmixshow.a -lm || exit 1; done

# Cross-architecture tests under qemu-user: make cross-test ARCH=aarch64|s390x|i386
cross-test:
	sh tests/cross.sh $(ARCH)
