#!/usr/bin/env bash
# Reproduce the built-in demo model end to end with the project's own recipe, on CPU or a GPU:
#   1. generate the shapes world,
#   2. mlp2x_gelu variant: stage `align` (connector only, captions) -> stage `instruct` (connector + LoRA),
#   3. qformer variant: `qformer_pretrain` (BLIP-2 stage 1) -> `generative` (stage 2) -> `instruct`,
#   4. score both (and the untrained default as the floor) with `mllm eval` on the held-out test split,
#   5. with SHIP=1, copy the mlp2x_gelu checkpoint into mllm/assets/demo (what `mllm chat` loads by default).
# Real EfficientNet-Lite0 tower (multi-scale features) and real SmolLM2-135M-Instruct throughout.
#
#   scripts/train_demo.sh                  # full run
#   N=64 STEPS=2 scripts/train_demo.sh     # smoke test: a few steps per stage
set -euo pipefail
cd "$(dirname "$0")/.."

OUT=${OUT:-runs/demo}
N=${N:-4000}            # shapes-world images (80% train)
SEED=${SEED:-0}
STEPS=${STEPS:-}        # optional cap on optimizer steps per stage (smoke tests)
VARIANTS=${VARIANTS:-"mlp qformer"}
MLLM=${MLLM:-.venv/bin/mllm}
DATA=$OUT/data
IMAGES=$DATA/images
CAP=()
[ -n "$STEPS" ] && CAP=(--max-steps "$STEPS")
start=$(date +%s)

[ -f "$DATA/train.json" ] || $MLLM data synth "$DATA" --n "$N" --seed "$SEED"

# The demo model: EfficientNet-Lite0 (multi-scale, 49 tokens) + connector + SmolLM2 with the plain ChatML
# template (no default system prompt: ~20 fewer tokens per sample, the same format at chat time).
model_config() {
    cat <<EOF
{"vision": {"kind": "efficientnet_lite0", "features": "multiscale", "resize_mode": "pad"},
 "connector": {"kind": "$1"},
 "llm": {"path": "smollm2-135m-instruct"},
 "template": "chatml"}
EOF
}

train() {  # stage output [extra args...]
    local stage=$1 output=$2
    shift 2
    if [ -f "$output/mllm_config.json" ] && [ -z "$STEPS" ]; then
        echo "train_demo: $output exists, skipping stage $stage"
        return
    fi
    $MLLM train --stage "$stage" --config "training/configs/$stage.yaml" --image-folder "$IMAGES" \
        --output "$output" "${CAP[@]}" "$@"
}

for variant in $VARIANTS; do
    run=$OUT/$variant
    mkdir -p "$run"
    if [ "$variant" = mlp ]; then
        model_config mlp2x_gelu >"$run/model_config.json"
        train align "$run/align" --model-config "$run/model_config.json" --data "$DATA/train_captions.json"
        init=$run/align
    else
        model_config qformer >"$run/model_config.json"
        train qformer_pretrain "$run/qformer_pretrain" --model-config "$run/model_config.json" \
            --data "$DATA/train_captions.json"
        train generative "$run/generative" --init "$run/qformer_pretrain" --data "$DATA/train_captions.json"
        init=$run/generative
    fi
    train instruct "$run/instruct" --init "$init" --data "$DATA/train.json" --val-data "$DATA/val.json"
    $MLLM eval --model "$run/instruct" --data "$DATA/test_qa.json" --image-folder "$IMAGES" \
        --output "$OUT/eval/$variant" ${STEPS:+--limit 20}
done
$MLLM eval --model default --data "$DATA/test_qa.json" --image-folder "$IMAGES" --output "$OUT/eval/untrained" \
    --limit "${FLOOR_LIMIT:-300}"

echo "train_demo: done in $(( $(date +%s) - start )) s; tables in $OUT/eval/*.md"
if [ "${SHIP:-0}" = 1 ]; then
    rm -rf mllm/assets/demo
    mkdir -p mllm/assets
    cp -r "$OUT/mlp/instruct" mllm/assets/demo
    rm -rf mllm/assets/demo/checkpoint-* mllm/assets/demo/metrics.jsonl mllm/assets/demo/*.png
    echo "train_demo: shipped $OUT/mlp/instruct as mllm/assets/demo"
fi
