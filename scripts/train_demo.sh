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
N=${N:-8000}            # shapes-world images (80% train)
SEED=${SEED:-0}
STEPS=${STEPS:-}        # optional cap on optimizer steps per stage (smoke tests)
VARIANTS=${VARIANTS:-"mlp qformer"}
# The Q-Former variant is reported beside the shipped one, on a shorter stage-2 budget.
QFORMER_INSTRUCT_STEPS=${QFORMER_INSTRUCT_STEPS:-150}
# Questions scored per model: the test split in order (the first images' questions, every type); greedy
# decoding of long `describe` answers is what takes the time on CPU.
EVAL_LIMIT=${EVAL_LIMIT:-700}
[ -n "$STEPS" ] && EVAL_LIMIT=20
MLLM=${MLLM:-.venv/bin/mllm}
DATA=$OUT/data
IMAGES=$DATA/images
CAP=()
[ -n "$STEPS" ] && CAP=(--max-steps "$STEPS")
start=$(date +%s)

[ -f "$DATA/train.json" ] || $MLLM data synth "$DATA" --n "$N" --seed "$SEED"

# The demo model: EfficientNet-Lite0 (multi-scale) + connector + SmolLM2 with the plain ChatML template
# (no default system prompt: ~20 fewer tokens per sample, the same format at chat time). The LLM's
# forward and backward dominate a CPU step, so tokens are the budget: the mlp variant pools the 7x7
# grid to 3x3 (9 image tokens, one per cell of the world's grid); the Q-Former reads all 49 and
# hands the LLM 16 queries.
model_config() {  # connector-kind pool queries
    cat <<EOF
{"vision": {"kind": "efficientnet_lite0", "features": "multiscale", "resize_mode": "pad", "pool": $2},
 "connector": {"kind": "$1", "num_query_tokens": $3},
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
    budget=()
    if [ "$variant" = mlp ]; then
        model_config mlp2x_gelu 3 32 >"$run/model_config.json"
        train align "$run/align" --model-config "$run/model_config.json" --data "$DATA/train_captions.json"
        init=$run/align
    else
        model_config qformer null 16 >"$run/model_config.json"
        train qformer_pretrain "$run/qformer_pretrain" --model-config "$run/model_config.json" \
            --data "$DATA/train_captions.json"
        train generative "$run/generative" --init "$run/qformer_pretrain" --data "$DATA/train_captions.json"
        init=$run/generative
        budget=(--set "total_steps=$QFORMER_INSTRUCT_STEPS")
    fi
    train instruct "$run/instruct" --init "$init" --data "$DATA/train.json" --val-data "$DATA/val.json" "${budget[@]}"
    $MLLM eval --model "$run/instruct" --data "$DATA/test_qa.json" --image-folder "$IMAGES" \
        --output "$OUT/eval/$variant" --limit "$EVAL_LIMIT"
done
# The floor: the demo architecture with its connector as initialised and no adapter (chance level).
if [ ! -f "$OUT/untrained/mllm_config.json" ]; then
    model_config mlp2x_gelu 3 32 >"$OUT/untrained_config.json"
    ${PYTHON:-.venv/bin/python} -c "import sys, torch; from mllm.config import MLLMConfig; from mllm.model import MLLM
torch.manual_seed(0); MLLM.build(MLLMConfig.load(sys.argv[1])).save_pretrained(sys.argv[2])" \
        "$OUT/untrained_config.json" "$OUT/untrained"
fi
# It rambles to the token limit on every question, so it is scored on fewer questions and shorter replies
# (no short reply can be a whole description, so its `describe` score is 0 either way).
$MLLM eval --model "$OUT/untrained" --data "$DATA/test_qa.json" --image-folder "$IMAGES" --output "$OUT/eval/untrained" \
    --limit "${FLOOR_LIMIT:-$((EVAL_LIMIT < 200 ? EVAL_LIMIT : 200))}" --max-new-tokens 24

echo "train_demo: done in $(( $(date +%s) - start )) s; tables in $OUT/eval/*.md"
if [ "${SHIP:-0}" = 1 ]; then
    rm -rf mllm/assets/demo
    mkdir -p mllm/assets
    cp -r "$OUT/mlp/instruct" mllm/assets/demo
    rm -rf mllm/assets/demo/checkpoint-* mllm/assets/demo/metrics.jsonl mllm/assets/demo/*.png \
        mllm/assets/demo/adapter/README.md
    # Shipped in float16 (half the bytes; loading casts back to the model's float32).
    ${PYTHON:-.venv/bin/python} -c "import sys, pathlib; from safetensors.torch import load_file, save_file
for p in pathlib.Path(sys.argv[1]).rglob('*.safetensors'):
    save_file({k: v.half() if v.is_floating_point() else v for k, v in load_file(p).items()}, p, {'format': 'pt'})" \
        mllm/assets/demo
    echo "train_demo: shipped $OUT/mlp/instruct as mllm/assets/demo"
fi
