#!/bin/sh
# tools/demo.sh — `make demo` (issue 15): the whole of Mix-of-Show in the procedural world, measured.
#
#   1. world      3 creatures, 8 renders each, with captions and masks (mixshow world)
#   2. train      per creature an ED-LoRA and a plain LoRA on the base model (mixshow train, the
#                 options .yml the world wrote, only the base model and the step count set)
#   3. fuse       the 3 ED-LoRAs by gradient fusion (mixshow fuse --method gram) and the 3 LoRAs by
#                 weight fusion (--method weight): one model each
#   4. sample     every creature alone in 4 prompts x DEMO_SEEDS seeds, from its own LoRA file
#                 at alpha 1.0 (before fusion) and from the fused model (after, the concepts'
#                 alphas 1.0 too: only the fusion differs), for both methods; then the
#                 world's multi-creature layouts with regionally controllable sampling (boxes, and
#                 the layout's keypose drawing through BASE/t2iadapter_openpose when it exists)
#   5. eval       text and image alignment of every folder (mixshow eval with the world's stand-in
#                 encoders; the prompts scored say "a creature" where the image prompt has the
#                 concept's tokens), contact sheets + HTML pages, and DEMO_OUT/table.md: the
#                 paper's ablation (single-concept vs fused, ED-LoRA + gradient fusion vs LoRA +
#                 weight fusion) in the world.
#
# Knobs (environment): DEMO_OUT (demo), DEMO_BASE (models/world: the shipped world model; any SD 1.x
# diffusers folder works), DEMO_ENCODERS (models/eval-encoders.safetensors), DEMO_STEPS (ED-LoRA /
# LoRA steps per creature, 400), DEMO_SEEDS (2), DEMO_SAMPLE_STEPS (30), DEMO_THREADS (default: each command's),
# MIXSHOW (./mixshow), DEMO_FUSE_FLAGS (more `mixshow fuse` options for the gradient fusion, e.g.
# "--method lbfgs" or "--max-change off"), DEMO_EMB_NORM (ED-LoRA's emb_norm_threshold; default: the options' official
# 0.55). When a base's token rows are larger than SD's CLIP table, 0.55 freezes the concept rows at
# step 1 (train's loss.csv: emb_frozen 1): a world model trained 14000 steps (token rows' mean L2
# norm 1.005, the shipped v0's 0.472) started them at 0.651, every creature kept the same tokens,
# identities were lost and gradient fusion met near-identical inputs with different targets (its
# weights blew up 850x). The demo then warns; raise it (1.3 there) for such a base. `make test-full` runs it on the random tiny model with a few steps (the
# pipeline, not the numbers).
set -eu
MS=${MIXSHOW:-./mixshow}
OUT=${DEMO_OUT:-demo}
BASE=${DEMO_BASE:-models/world}
ENC=${DEMO_ENCODERS:-models/eval-encoders.safetensors}
STEPS=${DEMO_STEPS:-400}
SEEDS=${DEMO_SEEDS:-2}
SSTEPS=${DEMO_SAMPLE_STEPS:-30}
THR=""; [ -n "${DEMO_THREADS:-}" ] && THR="--threads $DEMO_THREADS"
SIZE=128
EMBN=${DEMO_EMB_NORM:-}
FUSEF=${DEMO_FUSE_FLAGS:-}

if [ ! -e "$BASE" ]; then
    echo "demo: no base model at $BASE (make pretrain writes it; or DEMO_BASE=DIR)" >&2
    exit 2
fi
if [ ! -e "$ENC" ]; then
    echo "demo: no evaluation encoders at $ENC (mixshow eval --train-encoders DIR; or DEMO_ENCODERS=FILE)" >&2
    exit 2
fi
start=$(date +%s)
step() { echo "demo [$(( $(date +%s) - start )) s]: $*" >&2; }
mkdir -p "$OUT"

# ---- 1. the world ----
W=$OUT/world
if [ ! -d "$W/characters" ]; then
    step "world: 3 creatures"
    $MS world --out "$W" --n 16 --seed 7 --size $SIZE --characters 3 --per-character 8 >/dev/null
fi
CHARS=$(ls "$W/characters")

# ---- 1b. does the base model draw the world's captions? ----
# DEMO_CAPTIONS held-out captions (world seed 99; the base model was trained on seed 0's scenes),
# one sample each from the base model and from the same architecture untrained (its initial
# weights: mixshow pretrain --steps 0), scored for text alignment beside the real renders of
# those captions (the encoders' ceiling) and the base model's images against the next image's
# caption (what alignment a wrong caption gets).
NCAP=${DEMO_CAPTIONS:-32}
H=$OUT/heldout
if [ ! -d "$H/scenes" ]; then
    step "held-out captions: $NCAP scenes of world seed 99"
    $MS world --out "$H" --n "$NCAP" --seed 99 --size $SIZE --characters 0 >/dev/null
fi
if [ ! -d "$OUT/untrained/model" ]; then
    step "the untrained model (the base's configs, initial weights)"
    $MS pretrain --out "$OUT/untrained" --stage unet --steps 0 --model-config "$BASE" --vae "$BASE/vae" \
        --size $SIZE --scenes 1 -q
fi
for v in base untrained; do
    S=$OUT/samples/$v
    [ -f "$S/prompts.txt" ] && continue
    step "sample $v: $NCAP held-out captions"
    mkdir -p "$S"
    : > "$S/prompts.part"
    model=$BASE; [ $v = untrained ] && model=$OUT/untrained/model
    for c in "$H"/scenes/caption/*.txt; do
        n=$(basename "$c" .txt)
        # shellcheck disable=SC2086
        $MS sample --model "$model" -p "$(cat "$c")" --seed "$(( 1$n - 1000000 ))" --steps "$SSTEPS" -W $SIZE -H $SIZE \
            $THR -o "$S/$n.png" >/dev/null
        printf '%s\t%s\n' "$n.png" "$(cat "$c")" >> "$S/prompts.part"
    done
    mv "$S/prompts.part" "$S/prompts.txt"
done
if [ ! -f "$OUT/samples/real/prompts.txt" ]; then
    mkdir -p "$OUT/samples/real" "$OUT/samples/shuffled"
    : > "$OUT/samples/real/prompts.txt"
    for c in "$H"/scenes/caption/*.txt; do
        n=$(basename "$c" .txt)
        cp "$H/scenes/image/$n.png" "$OUT/samples/real/$n.png"
        printf '%s\t%s\n' "$n.png" "$(cat "$c")" >> "$OUT/samples/real/prompts.txt"
    done
    # the base model's images, each with the caption of the next one
    cut -f1 "$OUT/samples/base/prompts.txt" > "$OUT/samples/shuffled/files"
    cut -f2 "$OUT/samples/base/prompts.txt" > "$OUT/samples/shuffled/caps0"
    { tail -n +2 "$OUT/samples/shuffled/caps0"; head -n 1 "$OUT/samples/shuffled/caps0"; } > "$OUT/samples/shuffled/caps"
    for f in $(cat "$OUT/samples/shuffled/files"); do cp "$OUT/samples/base/$f" "$OUT/samples/shuffled/$f"; done
    paste "$OUT/samples/shuffled/files" "$OUT/samples/shuffled/caps" > "$OUT/samples/shuffled/prompts.txt"
    rm -f "$OUT/samples/shuffled/files" "$OUT/samples/shuffled/caps0" "$OUT/samples/shuffled/caps"
fi

# ---- 2. one ED-LoRA and one LoRA per creature ----
lora_file() { if [ "$1" = lora ]; then echo "$OUT/lora/$2/models/lora_model-latest.pth"; else echo "$OUT/edlora/$2/models/edlora_model-latest.pth"; fi; }
for c in $CHARS; do
    for kind in edlora lora; do
        d=$OUT/$kind/$c
        [ -f "$(lora_file $kind "$c")" ] && continue
        step "train $kind $c ($STEPS steps)"
        set -- --config "$W/options/$c.yml" --model "$BASE" --steps "$STEPS" --no-val --out "$d" --quiet
        [ $kind = lora ] && set -- "$@" --set models.enable_edlora=false
        [ -n "$EMBN" ] && set -- "$@" --set train.emb_norm_threshold="$EMBN"
        # shellcheck disable=SC2086
        $MS train "$@" $THR >/dev/null
        if [ $kind = edlora ] && awk -F, 'NR == 2 && $9 == 1 { f = 1 } END { exit !f }' "$d/loss.csv"; then
            echo "demo: warning: $c's concept embeddings were frozen at step 1 (their mean norm is already above" \
                 "emb_norm_threshold: the base's token rows are large); set DEMO_EMB_NORM higher" >&2
        fi
    done
done

# ---- 3. fusion: ED-LoRA by gradient fusion, LoRA by weight fusion ----
concepts_json() {   # $1 kind -> the official multi-concept JSON on stdout
    first=1
    echo "["
    for c in $CHARS; do
        [ $first = 1 ] || echo ","
        first=0
        printf '  {"lora_path": "%s", "unet_alpha": 1.0, "text_encoder_alpha": 1.0, "concept_name": "<%s1> <%s2>"}' \
            "$(lora_file "$1" "$c")" "$c" "$c"
    done
    printf '\n]\n'
}
concepts_json edlora > "$OUT/edlora.json"
concepts_json lora > "$OUT/lora.json"
if [ ! -f "$OUT/fused_gradient/new_concept_cfg.json" ]; then
    step "fuse: gradient fusion of 3 ED-LoRAs"
    # shellcheck disable=SC2086
    $MS fuse -q --model "$BASE" --concepts "$OUT/edlora.json" --out "$OUT/fused_gradient" --method gram \
        --spatial-size $SIZE --report "$OUT/fused_gradient.json" $FUSEF
fi
if [ ! -f "$OUT/fused_weight/new_concept_cfg.json" ]; then
    step "fuse: weight fusion of 3 LoRAs"
    $MS fuse -q --model "$BASE" --concepts "$OUT/lora.json" --out "$OUT/fused_weight" --method weight \
        --spatial-size $SIZE --report "$OUT/fused_weight.json"
fi

# ---- 4. sampling ----
# Four prompts per creature: the image prompt names the concept, the scored prompt its class word.
PROMPTS="on grass|in the sky|in front of a brick wall|on water"
single() {   # $1 variant  $2 creature  $3 prompt tail  $4 seed  $5 out.png
    case $1 in
        class) $MS sample --model "$BASE" -p "a creature $3" --seed "$4" --steps "$SSTEPS" -W $SIZE -H $SIZE $THR \
                        -o "$5" >/dev/null ;;
        edlora|lora) $MS sample --model "$BASE" --edlora "$(lora_file "$1" "$2"):1.0" \
                        -p "a <${2}1> <${2}2> $3" --seed "$4" --steps "$SSTEPS" -W $SIZE -H $SIZE $THR -o "$5" >/dev/null ;;
        *) $MS sample --pretrained_model="$OUT/$1" --prompt="a <${2}1> <${2}2> $3" --prompt_rewrite= \
                        --seed="$4" --steps="$SSTEPS" -W $SIZE -H $SIZE --save_dir="$OUT/tmp_$1" --suffix=x >/dev/null
           mv "$(ls -t "$OUT/tmp_$1/seed_$4/"*.png | head -n 1)" "$5" ;;
    esac
}
for v in class edlora lora fused_gradient fused_weight; do
    S=$OUT/samples/$v
    [ -f "$S/prompts.txt" ] && continue
    step "sample $v"
    mkdir -p "$S"
    : > "$S/prompts.part"
    for c in $CHARS; do
        echo "$PROMPTS" | tr '|' '\n' | while read -r p; do
            k=0
            while [ $k -lt "$SEEDS" ]; do
                f=$(printf '%s_%s_%d.png' "$c" "$(echo "$p" | tr ' ' '_')" $k)
                single $v "$c" "$p" $k "$S/$f"
                printf '%s\ta creature %s\t%s\n' "$f" "$p" "$c" >> "$S/prompts.part"
                k=$((k + 1))
            done
        done
    done
    mv "$S/prompts.part" "$S/prompts.txt"
done
# the world's multi-creature layouts, regionally (both fused models; boxes from the world)
for v in fused_gradient fused_weight; do
    S=$OUT/samples/multi_$v
    [ -f "$S/prompts.txt" ] && continue
    step "regional sampling $v"
    mkdir -p "$S"
    : > "$S/prompts.part"
    for m in "$W"/multi/*.txt; do
        n=$(basename "$m" .txt)
        ctx=$(sed -n "s/^context_prompt='\(.*\)'$/\1/p" "$m")
        rw=$(sed -n "s/^prompt_rewrite='\(.*\)'$/\1/p" "$m")
        # the layout's keypose drawing through the base model's pose adapter, when it has one
        set --
        if [ -d "$BASE/t2iadapter_openpose" ] && [ -f "$W/multi/${n}_pose.png" ]; then
            set -- --keypose_condition="$W/multi/${n}_pose.png" --keypose_adaptor_weight=1.0 \
                --adapter-keypose="$BASE/t2iadapter_openpose"
        fi
        $MS sample --pretrained_model="$OUT/$v" --prompt="$ctx" --prompt_rewrite="$rw" --seed=0 --steps="$SSTEPS" \
            -W $SIZE -H $SIZE --save_dir="$OUT/tmp_$v" --suffix=multi "$@" >/dev/null
        mv "$(ls -t "$OUT/tmp_$v/seed_0/"*.png | head -n 1)" "$S/$n.png"
        names=$(grep -o '<[a-z]*1>' "$m" | tr -d '<>' | sed 's/1$//' | sort -u | paste -sd, -)
        printf '%s\t%s\t%s\n' "$n.png" "$ctx" "$names" >> "$S/prompts.part"
    done
    mv "$S/prompts.part" "$S/prompts.txt"
done
rm -rf "$OUT"/tmp_*

# ---- 5. scores, sheets, the table ----
refs=""
for c in $CHARS; do refs="$refs --ref $c=$W/characters/$c"; done
for v in base untrained real shuffled; do
    step "eval $v"
    $MS eval --images "$OUT/samples/$v" --encoders "$ENC" --out "$OUT/samples/$v/eval" --sheet >/dev/null
done
for v in class edlora lora fused_gradient fused_weight multi_fused_gradient multi_fused_weight; do
    step "eval $v"
    # shellcheck disable=SC2086
    $MS eval --images "$OUT/samples/$v" --encoders "$ENC" $refs --out "$OUT/samples/$v/eval" --sheet >/dev/null
done
mean() { awk -F, '$1 == "\"mean\"" { print ($'"$2"' == "" ? "-" : $'"$2"') }' "$OUT/samples/$1/eval.csv"; }
# image alignment from leg $1 to leg $2, paired by file (the same creature, prompt and seed): the
# mean change, its standard error and the pairs (image_alignment is the next-to-last column)
paired() {
    awk -F, 'FNR == 1 || $1 == "\"mean\"" { next }
             NR == FNR { a[$1] = $(NF - 1); next }
             ($1 in a) && a[$1] != "" && $(NF - 1) != "" { d = $(NF - 1) - a[$1]; n++; s += d; q += d * d }
             END { if (n < 2) { print "- (fewer than 2 pairs)"; exit }
                   m = s / n; v = (q - n * m * m) / (n - 1); if (v < 0) v = 0
                   printf "%+.3f +- %.3f (%d pairs)", m, sqrt(v / n), n }' "$OUT/samples/$1/eval.csv" "$OUT/samples/$2/eval.csv"
}
{
    echo "The base model on $NCAP held-out world captions (text alignment: cosine of the stand-in encoders;"
    echo "caption top-1: share of images whose own caption fits them best among the $NCAP, chance 1/$NCAP):"
    echo
    echo "| images | text alignment | caption top-1 |"
    echo "|---|---|---|"
    echo "| real renders of the captions (ceiling) | $(mean real 4) | $(mean real 6) |"
    echo "| base model $BASE | $(mean base 4) | $(mean base 6) |"
    echo "| the same architecture untrained | $(mean untrained 4) | $(mean untrained 6) |"
    echo "| base model's images, another image's caption | $(mean shuffled 4) | $(mean shuffled 6) |"
    echo
    echo "Mix-of-Show's ablation in the world (prompt top-1: share of single-concept images whose"
    echo "background prompt fits best among the 4, chance 0.25; regional rows: among the layouts' prompts):"
    echo
    echo "| method | text alignment | image alignment | prompt top-1 |"
    echo "|---|---|---|---|"
    echo "| base model, the class word (\"a creature ...\": no concept) | $(mean class 4) | $(mean class 5) | $(mean class 6) |"
    echo "| ED-LoRA, single concept | $(mean edlora 4) | $(mean edlora 5) | $(mean edlora 6) |"
    echo "| ED-LoRA + gradient fusion | $(mean fused_gradient 4) | $(mean fused_gradient 5) | $(mean fused_gradient 6) |"
    echo "| LoRA, single concept | $(mean lora 4) | $(mean lora 5) | $(mean lora 6) |"
    echo "| LoRA + weight fusion | $(mean fused_weight 4) | $(mean fused_weight 5) | $(mean fused_weight 6) |"
    echo "| regional, gradient-fused | $(mean multi_fused_gradient 4) | $(mean multi_fused_gradient 5) | $(mean multi_fused_gradient 6) |"
    echo "| regional, weight-fused | $(mean multi_fused_weight 4) | $(mean multi_fused_weight 5) | $(mean multi_fused_weight 6) |"
    echo
    echo "Image alignment through fusion, paired by creature, prompt and seed (mean change +- standard error):"
    echo "ED-LoRA -> gradient fusion: $(paired edlora fused_gradient); LoRA -> weight fusion: $(paired lora fused_weight)."
    echo
    echo "base $BASE, $STEPS training steps per concept (emb_norm_threshold ${EMBN:-of the options}), $SEEDS seeds x 4 prompts per creature, $SSTEPS sampling steps;"
    echo "$(( $(date +%s) - start )) s in all. Contact sheets: $OUT/samples/*/eval.png, pages: $OUT/samples/*/eval.html"
} > "$OUT/table.md"
cat "$OUT/table.md"
