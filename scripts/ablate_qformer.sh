#!/usr/bin/env bash
# Rank the causes of the Q-Former variant's lag on CPU with short, equal budgets (the same recipe as
# scripts/train_demo.sh's qformer variant: qformer_pretrain -> generative -> instruct), one change at a time:
#   base      16 queries (the current variant)
#   q49       49 queries: one per cell of the 7x7 grid the MLP variant sees (position kept?)
#   instruct+ 16 queries, instruct twice as long (simply steps?)
#   pos       16 queries + a learned position per image token (the cross-attention is blind to order, and
#             EfficientNet's features carry no position: where, how many, which colour belongs to which shape?)
#   pos49     pos with 49 queries
# Each arm is scored on the first EVAL_LIMIT held-out test questions; tables in $OUT/<arm>/eval.md.
#   scripts/ablate_qformer.sh                 # N=2000 images, 100 + 40 + 200 steps per arm
#   ARMS="base q49" N=4000 scripts/ablate_qformer.sh
set -euo pipefail
cd "$(dirname "$0")/.."
MLLM=${MLLM:-.venv/bin/mllm}
OUT=${OUT:-runs/ablate-qformer}
N=${N:-2000}
PRETRAIN_STEPS=${PRETRAIN_STEPS:-100}
GENERATIVE_STEPS=${GENERATIVE_STEPS:-40}
INSTRUCT_STEPS=${INSTRUCT_STEPS:-200}
EVAL_LIMIT=${EVAL_LIMIT:-200}
ARMS=${ARMS:-"base q49 instruct+"}
DATA=$OUT/data
[ -f "$DATA/train.json" ] || $MLLM data synth "$DATA" --n "$N" --seed 0

for arm in $ARMS; do
    queries=16 instruct=$INSTRUCT_STEPS positions=false
    [ "$arm" = q49 ] || [ "$arm" = pos49 ] && queries=49
    [ "$arm" = pos ] || [ "$arm" = pos49 ] && positions=true
    [ "$arm" = "instruct+" ] && instruct=$((INSTRUCT_STEPS * 2))
    run=$OUT/$arm
    mkdir -p "$run"
    cat >"$run/model_config.json" <<JSON
{"vision": {"kind": "efficientnet_lite0", "features": "multiscale", "resize_mode": "pad", "pool": null},
 "connector": {"kind": "qformer", "num_query_tokens": $queries, "qformer_vision_positions": $positions},
 "llm": {"path": "smollm2-135m-instruct"}, "template": "chatml"}
JSON
    start=$(date +%s)
    $MLLM train --stage qformer_pretrain --config training/configs/qformer_pretrain.yaml --image-folder "$DATA/images" \
        --model-config "$run/model_config.json" --data "$DATA/train_captions.json" --output "$run/pretrain" \
        --set "total_steps=$PRETRAIN_STEPS"
    $MLLM train --stage generative --config training/configs/generative.yaml --image-folder "$DATA/images" \
        --init "$run/pretrain" --data "$DATA/train_captions.json" --output "$run/generative" \
        --set "total_steps=$GENERATIVE_STEPS"
    $MLLM train --stage instruct --config training/configs/instruct.yaml --image-folder "$DATA/images" \
        --init "$run/generative" --data "$DATA/train.json" --output "$run/instruct" --set "total_steps=$instruct"
    $MLLM eval --model "$run/instruct" --quantization none --data "$DATA/test_qa.json" --image-folder "$DATA/images" \
        --limit "$EVAL_LIMIT" --output "$run/eval" --batch-size 8
    echo "ablate_qformer: $arm done in $(( $(date +%s) - start )) s"
done
