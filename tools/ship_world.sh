#!/bin/sh
# tools/ship_world.sh — ship a `mixshow pretrain` output as the embedded default model (issue 15).
#
#   sh tools/ship_world.sh [--force] [--recipe 'FLAGS'] [--dest models/world] DIR
#
# DIR is a pretrain output folder (--stage all): DIR/model (the diffusers folder of the unet stage,
# with its VAE), DIR/adapters/pose and DIR/adapters/sketch (the adapters stage), the loss curves
# DIR/vae_loss.svg, DIR/loss.svg, DIR/adapters_loss.svg (DIR/text/loss.svg) and the checkpoints, whose metadata holds
# each stage's recipe. Writes DEST (models/world) with
#   - the model in F16 (mixshow convert --half: every weight rounded to nearest; configs, scheduler
#     and tokenizer files as they are), the folder `mixshow sample` uses when no --model is given;
#   - the adapters in F16 as DEST/t2iadapter_openpose (pose) and DEST/t2iadapter_sketch, where
#     regional sampling looks by default (MODEL/t2iadapter_openpose) and for --adapter;
#   - the loss curves, and DEST/README.md: the pretrain command (--recipe, else the Makefile's
#     WORLD_RECIPE, said so), each stage's recipe and step count from DIR, the commit, the sizes.
# DEST appears only complete: everything is built in a temporary folder beside it, then renamed.
# An existing DEST is refused unless --force (then replaced: the old one is moved aside first,
# and removed after the new one is in place). MIXSHOW names the binary (default ./mixshow).
set -eu
MS=${MIXSHOW:-./mixshow}
force=0
recipe=""
dest=models/world
dir=""
usage() { echo "usage: sh tools/ship_world.sh [--force] [--recipe 'FLAGS'] [--dest DEST] DIR   (MIXSHOW=binary)" >&2; exit 2; }
while [ $# -gt 0 ]; do
    case $1 in
        --force) force=1 ;;
        --recipe) [ $# -ge 2 ] || usage; recipe=$2; shift ;;
        --dest) [ $# -ge 2 ] || usage; dest=$2; shift ;;
        -h|--help) sed -n '2,19p' "$0"; exit 0 ;;
        -*) echo "ship_world: unknown option $1" >&2; usage ;;
        *) [ -z "$dir" ] || usage; dir=$1 ;;
    esac
    shift
done
[ -n "$dir" ] || usage
die() { echo "ship_world: $*" >&2; exit 1; }

[ -f "$dir/model/model_index.json" ] || die "$dir/model/model_index.json not found (the unet stage writes $dir/model)"
for a in pose sketch; do
    [ -f "$dir/adapters/$a/config.json" ] || die "$dir/adapters/$a/config.json not found (the adapters stage writes it)"
done
[ -x "$MS" ] || command -v "$MS" >/dev/null 2>&1 || die "no mixshow binary at $MS (make; or MIXSHOW=path)"
dest=${dest%/}
if [ -e "$dest" ] && [ "$force" -ne 1 ]; then die "$dest exists: give --force to replace it"; fi

parent=$(dirname "$dest")
mkdir -p "$parent"
tmp=$parent/.ship_world.$$
rm -rf "$tmp"
mkdir "$tmp"
trap 'rm -rf "$tmp"' EXIT
trap 'exit 1' INT TERM HUP
new=$tmp/world

"$MS" convert "$dir/model" "$new" --half >/dev/null
"$MS" convert "$dir/adapters/pose" "$new/t2iadapter_openpose" --half >/dev/null
"$MS" convert "$dir/adapters/sketch" "$new/t2iadapter_sketch" --half >/dev/null
for f in vae_loss.svg vae_reconstructions.png loss.svg adapters_loss.svg; do
    if [ -f "$dir/$f" ]; then cp "$dir/$f" "$new/$f"; fi
done
if [ -f "$dir/text/loss.svg" ]; then cp "$dir/text/loss.svg" "$new/text_loss.svg"; fi

# the token rows of the shipped text encoder that are not all zero (pretrain zeroes the rows no
# training caption produces; a model written by an older mixshow has none zeroed): read off the F16
# safetensors file with od and awk, K of V
token_rows() {
    f=$1
    set -- $(od -An -tu1 -N8 "$f")
    n=$(( $1 + $2 * 256 + $3 * 65536 + $4 * 16777216 ))
    hdr=$(head -c $(( 8 + n )) "$f" | tail -c "$n")
    set -- $(printf '%s\n' "$hdr" | sed -n 's/.*"text_model\.embeddings\.token_embedding\.weight":{"dtype":"F16","shape":\[\([0-9]*\),\([0-9]*\)\],"data_offsets":\[\([0-9]*\),\([0-9]*\)\]}.*/\1 \2 \3 \4/p')
    [ $# -eq 4 ] || { echo "? ?"; return; }
    tail -c +$(( 8 + n + $3 + 1 )) "$f" | od -An -v -tx1 -N $(( $4 - $3 )) |
        awk -v L=$(( $2 * 2 / 16 )) -v V="$1" '{ for (i = 1; i <= NF; i++) if ($i != "00") nz = 1; if (++c == L) { kept += nz; c = 0; nz = 0 } }
                                              END { print kept + 0, V }'
}
set -- $(token_rows "$new/text_encoder/model.safetensors")
rows_kept=$1 rows_all=$2
if [ "$rows_kept" = "$rows_all" ]; then
    echo "ship_world: warning: none of the $rows_all token rows of $dir/model is zero: it was written by a mixshow" \
         "older than the zeroing of unused rows (move $dir/model aside and rerun the unet stage with --resume" \
         "$dir/checkpoint.safetensors to rewrite it; the adapters were trained on the old rows)" >&2
fi

# a smoke test of what is shipped: it loads and draws
"$MS" sample --model "$new" -p "a red circle above a blue square" --steps 2 --seed 0 -o "$tmp/check.png" >/dev/null 2>&1 ||
    die "mixshow sample --model (the F16 copy) failed: run it by hand: $MS sample --model $new -p x --steps 2 -o x.png"

# ---- README.md ----
if [ -z "$recipe" ]; then
    recipe=$(sed -n '/^WORLD_RECIPE *=/,/[^\\]$/p' Makefile 2>/dev/null | sed 's/^WORLD_RECIPE *= *//; s/\\$//' | tr -s ' \n' '  ' | sed 's/ *$//')
    recipe_note="(the Makefile's WORLD_RECIPE when this was shipped: no --recipe was given)"
    echo "ship_world: no --recipe: README.md quotes the Makefile's WORLD_RECIPE" >&2
else
    recipe_note="(as given to tools/ship_world.sh)"
fi
stage_recipe() {     # the "recipe" metadata of a checkpoint, or a note
    if [ -f "$dir/$1" ]; then
        r=$("$MS" inspect "$dir/$1" 2>/dev/null | sed -n 's/^# __metadata__ recipe = //p')
        [ -n "$r" ] && { echo "$r"; return; }
    fi
    echo "(no $1 in $dir: trained without checkpoints)"
}
last_step() {        # the last step of a loss.csv and its loss
    if [ -f "$dir/$1" ]; then tail -n 1 "$dir/$1" | awk -F, '{ printf "%s steps, last loss %s", $1, $2 }'; else echo "(no $1)"; fi
}
commit=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
size=$(du -sk "$new" | awk '{ print $1 }')
{
    echo "# models/world — the shipped world model"
    echo
    echo "A small model of Stable Diffusion 1.x topology trained from scratch by \`mixshow pretrain\` on the"
    echo "procedural world (\`mixshow world\`; issue 15), with two T2I-Adapters. It is the model \`mixshow sample\`"
    echo "uses when no \`--model\` is given (models/tiny-sd, the random one, stays for the numeric tests):"
    echo
    echo "    ./mixshow sample -p \"a red circle above a blue square\" -o out.png"
    echo "    ./mixshow sample --adapter models/world/t2iadapter_openpose --cond POSE.png -p \"a creature, waving\" -o out.png"
    echo
    echo "Weights are F16 (\`mixshow convert --half\` of the trained F32 folders: each weight rounded to"
    echo "nearest). The text encoder has $rows_kept non-zero token rows of $rows_all: pretrain zeroes the rows of"
    echo "ids no training caption produces (they never had a gradient), and zeros compress in git."
    echo "About ${size} KiB. Shipped by tools/ship_world.sh from commit $commit."
    echo
    echo "## Recipe"
    echo
    echo "$recipe_note"
    echo
    echo "    mixshow pretrain --out DIR $recipe"
    echo
    echo "Each stage's recipe as its checkpoint records it (what \`--resume\` must match):"
    echo
    echo "- vae: $(last_step vae_loss.csv); \`$(stage_recipe vae_checkpoint.safetensors)\`"
    if [ -f "$dir/text/checkpoint.safetensors" ]; then     # --text contrastive: trained first, then frozen
        echo "- text (contrastive, then frozen): $(last_step text/loss.csv); \`$(stage_recipe text/checkpoint.safetensors)\`"
        echo "- unet: $(last_step loss.csv); \`$(stage_recipe checkpoint.safetensors)\`"
    else
        echo "- unet + text encoder: $(last_step loss.csv); \`$(stage_recipe checkpoint.safetensors)\`"
    fi
    echo "- adapters: $(last_step adapters_loss.csv); \`$(stage_recipe adapters_checkpoint.safetensors)\`"
    echo
    if [ -f "$new/text_loss.svg" ]; then
        echo "Loss curves: vae_loss.svg, text_loss.svg (the text stage), loss.svg (the UNet stage), adapters_loss.svg."
    else
        echo "Loss curves: vae_loss.svg, loss.svg (the UNet stage, text encoder jointly), adapters_loss.svg."
    fi
    if [ -f "$new/vae_reconstructions.png" ]; then
        echo "vae_reconstructions.png: held-out scenes (top) and the VAE's reconstructions (bottom)."
    fi
    echo "Folders: unet/ vae/ text_encoder/ tokenizer/ scheduler/ model_index.json (diffusers), t2iadapter_openpose/"
    echo "(pose: the world's keypose-like drawings, 3 channels) and t2iadapter_sketch/ (outlines, 1 channel)."
} > "$new/README.md"

# ---- in place: rename (the old one aside first with --force) ----
if [ -e "$dest" ]; then mv "$dest" "$tmp/old"; fi
if ! mv "$new" "$dest"; then
    if [ -e "$tmp/old" ]; then mv "$tmp/old" "$dest"; fi
    die "cannot rename $new to $dest"
fi
echo "ship_world: wrote $dest (${size} KiB): F16 model, t2iadapter_openpose, t2iadapter_sketch, README.md" >&2
