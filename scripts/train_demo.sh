#!/usr/bin/env bash
# Reproduce the built-in demo model end to end with the project's own recipe, on CPU or a GPU:
#   1. generate the shapes world,
#   2. mlp2x_gelu variant: stage `align` (connector only, captions) -> stage `instruct` (connector + LoRA),
#   3. qformer variant: `qformer_pretrain` (BLIP-2 stage 1) -> `generative` (stage 2) -> `instruct`,
#   3b. with PHOTOS=1, mlp variant, stage `photos`: read the tower's ImageNet classifier as words (real photos), the
#      shapes rows mixed in (PHOTOS_FROM=mllm/assets/demo starts it from the shipped model; off by default: it does
#      not keep the shapes world at 99% yet, README "Real photos through the classifier's view"),
#   4. score both (and the untrained default as the floor) with `mllm eval` on the held-out test split, and
#      the photos variant on the real-photo set (`mllm data photos`),
#   5. with SHIP=1, copy the mlp2x_gelu checkpoint into mllm/assets/demo (what `mllm chat` loads by default)
#      and the qformer one into mllm/assets/demo-qformer (`--model default-qformer`).
# Real EfficientNet-Lite0 tower (multi-scale features) and real SmolLM2-135M-Instruct throughout.
#
# Two profiles of the same recipe (PROFILE, default: gpu when CUDA is visible, else cpu):
#   gpu  the shipped model: 40,000 images, all 49 image tokens, batches of 64, align 300 steps +
#        instruct 1,800 steps (about 15 minutes on one H100);
#   cpu  what 2 CPU cores can do in an hour: 8,000 images, the 7x7 grid pooled to 3x3 (9 tokens),
#        the stage configs' batches of 16 and schedules (align 100 + instruct 600 steps).
#
#   SHIP=1 scripts/train_demo.sh           # full run, then ship the mlp2x_gelu model
#   N=64 STEPS=2 scripts/train_demo.sh     # smoke test: a few steps per stage
set -euo pipefail
cd "$(dirname "$0")/.."

MLLM=${MLLM:-.venv/bin/mllm}
PYTHON=${PYTHON:-.venv/bin/python}
if [ -z "${PROFILE:-}" ]; then
    PROFILE=cpu
    "$PYTHON" -c "import sys, torch; sys.exit(not torch.cuda.is_available())" 2>/dev/null && PROFILE=gpu
fi
# Per profile: images, the mlp variant's pooling, and the overrides every stage gets.
if [ "$PROFILE" = gpu ]; then
    N=${N:-40000}
    POOL=null           # 49 tokens: a GPU step costs about the same either way
    DEVICE=cuda
    # Bigger batches and more steps; image loading in worker processes keeps the GPU fed (the frozen
    # tower runs live: at this speed a feature-cache precompute would cost more than it saves).
    PROFILE_SET=(--feature-cache none --set per_device_batch_size=64 --set global_batch_size=64 --set num_workers=8)
    ALIGN_SET=(--set total_steps=300)
    INSTRUCT_SET=(--set total_steps=1800 --set save_every=250)
    QFORMER_INSTRUCT_STEPS=${QFORMER_INSTRUCT_STEPS:-1800}
elif [ "$PROFILE" = cpu ]; then
    N=${N:-8000}
    POOL=3              # the LLM's forward and backward are the CPU step: 9 tokens instead of 49
    DEVICE=cpu
    PROFILE_SET=() ALIGN_SET=() INSTRUCT_SET=()
else
    echo "train_demo: PROFILE must be gpu or cpu, got '$PROFILE'" >&2
    exit 2
fi
OUT=${OUT:-runs/demo-$PROFILE}
echo "train_demo: profile $PROFILE ($N images) into $OUT"
SEED=${SEED:-0}
STEPS=${STEPS:-}        # optional cap on optimizer steps per stage (smoke tests)
VARIANTS=${VARIANTS:-"mlp qformer"}
# The Q-Former variant's instruct budget (the shipped `default-qformer` is the cpu profile's 1,600 steps: it
# needs more than the MLP variant's 600 to pass it); QFORMER_MORE_STEPS adds a second instruct schedule after
# it (0: none).
QFORMER_INSTRUCT_STEPS=${QFORMER_INSTRUCT_STEPS:-1600}
# Questions scored per model: the test split in order (the first images' questions, every type); greedy
# decoding of long `describe` answers is what takes the time on CPU. 0: train only.
EVAL_LIMIT=${EVAL_LIMIT:-700}
[ -n "$STEPS" ] && EVAL_LIMIT=${EVAL_LIMIT_SMOKE:-20}
[ -n "$STEPS" ] && PHOTO_ROWS=${PHOTO_ROWS:-16}
DATA=$OUT/data
IMAGES=$DATA/images
CAP=()
[ -n "$STEPS" ] && CAP=(--max-steps "$STEPS")
start=$(date +%s)

[ -f "$DATA/train.json" ] || $MLLM data synth "$DATA" --n "$N" --seed "$SEED"

# The demo model: EfficientNet-Lite0 (multi-scale) + connector + SmolLM2 with the plain ChatML template
# (no default system prompt: ~20 fewer tokens per sample, the same format at chat time). The mlp
# variant hands the LLM the 7x7 grid (pooled to 3x3 on CPU); the Q-Former reads all 49 and hands the
# LLM 16 queries.
model_config() {  # connector-kind pool queries [more connector fields]
    cat <<EOF
{"vision": {"kind": "efficientnet_lite0", "features": "multiscale", "resize_mode": "pad", "pool": $2},
 "connector": {"kind": "$1", "num_query_tokens": $3${4:+, $4}},
 "llm": {"path": "smollm2-135m-instruct"},
 "template": "chatml"}
EOF
}

VIEW_SLOTS=10  # the classifier's view: word tokens per image (mllm.classifier_view)
with_view() {  # checkpoint copy: `checkpoint` with the classifier's view switched on (VIEW_SLOTS words per image)
    [ -f "$2/mllm_config.json" ] && return
    rm -rf "$2" && cp -r "$1" "$2" && rm -rf "$2"/checkpoint-*
    "$PYTHON" -c "import sys; from mllm.config import MLLMConfig
c = MLLMConfig.load(sys.argv[1]); n = int(sys.argv[2]); v = c.vision.__class__(**{**c.vision.__dict__, 'classifier_view': n})
c.replace(vision=v, tokens_per_image=c.tokens_per_image - c.vision.classifier_view + n).save(sys.argv[1])" "$2/mllm_config.json" "$VIEW_SLOTS"
}

train() {  # stage output [extra args...]
    local stage=$1 output=$2
    shift 2
    if [ -f "$output/mllm_config.json" ] && [ -z "$STEPS" ]; then
        echo "train_demo: $output exists, skipping stage $stage"
        return
    fi
    $MLLM train --stage "$stage" --config "training/configs/$stage.yaml" --image-folder "$IMAGES" \
        --output "$output" "${CAP[@]}" "${PROFILE_SET[@]}" "$@"
}

for variant in $VARIANTS; do
    run=$OUT/$variant
    mkdir -p "$run"
    budget=()
    if [ "$variant" = mlp ]; then
        model_config mlp2x_gelu "$POOL" 32 >"$run/model_config.json"
        train align "$run/align" --model-config "$run/model_config.json" --data "$DATA/train_captions.json" \
            "${ALIGN_SET[@]}"
        init=$run/align
        budget=("${INSTRUCT_SET[@]}")
    else
        # EfficientNet's grid carries no position and the cross-attention is blind to order: the Q-Former
        # learns one per image token.
        model_config qformer null 16 '"qformer_vision_positions": true' >"$run/model_config.json"
        train qformer_pretrain "$run/qformer_pretrain" --model-config "$run/model_config.json" \
            --data "$DATA/train_captions.json"
        train generative "$run/generative" --init "$run/qformer_pretrain" --data "$DATA/train_captions.json"
        init=$run/generative
        budget=(--set "total_steps=$QFORMER_INSTRUCT_STEPS")
    fi
    train instruct "$run/instruct" --init "$init" --data "$DATA/train.json" --val-data "$DATA/val.json" "${budget[@]}"
    final=$run/instruct
    if [ "$variant" = qformer ] && [ "${QFORMER_MORE_STEPS:-0}" -gt 0 ]; then
        # A second instruct schedule from the first one's end (warm restart of the cosine): how a CPU run
        # adds steps to a finished variant without redoing it.
        train instruct "$run/instruct-more" --init "$run/instruct" --data "$DATA/train.json" \
            --val-data "$DATA/val.json" --set "total_steps=$QFORMER_MORE_STEPS"
        final=$run/instruct-more
    fi
    if [ "$variant" = mlp ] && [ "${PHOTOS:-0}" = 1 ]; then
        # Stage 3, real photos: the tower's ImageNet classifier read as words after the image tokens
        # (mllm.classifier_view), learnt from rows made in the classifier's output space mixed with the shapes
        # world's own rows (training/synth_views.py). PHOTOS_FROM=mllm/assets/demo builds on the shipped
        # shapes model (trained on a GPU) instead of this run's.
        photos_from=${PHOTOS_FROM:-$final}
        with_view "$photos_from" "$run/photos-init"
        [ -f "$DATA/views.json" ] || $MLLM data views "$DATA/train_qa.json" "$DATA/views.json" \
            --views "${PHOTO_ROWS:-1500}" --shapes-rows "${PHOTO_ROWS:-1200}" --slots "$VIEW_SLOTS" --seed "$SEED"
        train instruct "$run/photos" --init "$run/photos-init" --data "$DATA/views.json" --set connector=frozen \
            --set llm_lr=3e-4 --set per_device_batch_size=8 --set global_batch_size=8 \
            --set "total_steps=${PHOTO_STEPS:-300}" --set warmup_ratio=0.05 --set save_every=40
        final=$run/photos
        if [ "$EVAL_LIMIT" -gt 0 ]; then
            $MLLM data photos "$OUT/photos"
            $MLLM eval --model "$final" --data "$OUT/photos/photos.json" --image-folder "$OUT/photos/images" \
                --output "$OUT/eval/photos" --device "$DEVICE"
        fi
    fi
    echo "$final" >"$run/final"
    if [ "$EVAL_LIMIT" -gt 0 ]; then
        $MLLM eval --model "$final" --data "$DATA/test_qa.json" --image-folder "$IMAGES" \
            --output "$OUT/eval/$variant" --limit "$EVAL_LIMIT" --device "$DEVICE"
    fi
done
# The floor: the demo architecture with its connector as initialised and no adapter (chance level).
if [ ! -f "$OUT/untrained/mllm_config.json" ]; then
    model_config mlp2x_gelu "$POOL" 32 >"$OUT/untrained_config.json"
    "$PYTHON" -c "import sys, torch; from mllm.assembly import build_model; from mllm.checkpoint import save_pretrained
from mllm.config import MLLMConfig; torch.manual_seed(0); save_pretrained(build_model(MLLMConfig.load(sys.argv[1])), sys.argv[2])" \
        "$OUT/untrained_config.json" "$OUT/untrained"
fi
# It rambles to the token limit on every question, so it is scored on fewer questions and shorter replies
# (no short reply can be a whole description, so its `describe` score is 0 either way).
if [ "$EVAL_LIMIT" -gt 0 ]; then
    $MLLM eval --model "$OUT/untrained" --data "$DATA/test_qa.json" --image-folder "$IMAGES" --output "$OUT/eval/untrained" \
        --limit "${FLOOR_LIMIT:-$((EVAL_LIMIT < 200 ? EVAL_LIMIT : 200))}" --max-new-tokens 24 --device "$DEVICE"
fi

echo "train_demo: done in $(( $(date +%s) - start )) s; tables in $OUT/eval/*.md"
ship() {  # trained-run built-in-directory: copy a variant's final checkpoint into mllm/assets, in float16
    rm -rf "$2"
    mkdir -p mllm/assets
    cp -r "$1" "$2"
    rm -rf "$2"/checkpoint-* "$2"/metrics.jsonl "$2"/*.png "$2"/adapter/README.md
    # Shipped in float16 (half the bytes; loading casts back to the model's float32).
    "$PYTHON" -c "import sys, pathlib; from safetensors.torch import load_file, save_file
for p in pathlib.Path(sys.argv[1]).rglob('*.safetensors'):
    save_file({k: v.half() if v.is_floating_point() else v for k, v in load_file(p).items()}, p, {'format': 'pt'})" "$2"
    echo "train_demo: shipped $1 as $2"
}
if [ "${SHIP:-0}" = 1 ]; then
    # `--model default` and `--model default-qformer` (mllm.loading.BUILTIN).
    for variant in $VARIANTS; do
        if [ "$variant" = mlp ]; then ship "$(cat "$OUT/mlp/final")" mllm/assets/demo; fi
        if [ "$variant" = qformer ]; then ship "$(cat "$OUT/qformer/final")" mllm/assets/demo-qformer; fi
    done
fi
