# shellcheck shell=bash
# Shared launcher logic for scripts/v1_5/{pretrain,finetune,finetune_lora}.sh. Source it, do not run it.
#
# Every setting is an environment variable with a LLaVA-1.5 default (set by the sourcing script
# before `finalize_settings`); anything after the script name is appended to the trainer arguments,
# and since the last occurrence of an option wins, it also overrides a default:
#   BATCH_SIZE=4 bash scripts/v1_5/pretrain.sh --max_steps 4 --learning_rate 5e-4
#
# Common variables
#   MODEL          language model              (lmsys/vicuna-7b-v1.5), or a Qwen2.5-VL, LLaVA-NeXT or
#                  LLaVA-OneVision checkpoint (below)
#   VISION_TOWER   vision encoder              (openai/clip-vit-large-patch14-336)
#   DATA_PATH      LLaVA JSON file(s), space-separated for several
#   IMAGE_FOLDER   root for the samples' relative image paths
#   OUTPUT_DIR     run folder (checkpoints, metrics.jsonl, final weights)
#   RUN_NAME       wandb run name              (basename of OUTPUT_DIR)
#   RUN_GROUP      wandb group                 (llava-v1.5-$COMPRESSION)
#   COMPRESSION    visual token reduction      (none)
#   PACKING=1      padding-free batches: the LLM layers run on the real tokens only, packed into rows with
#                  each sample's attention isolated (--packing True; off by default)
#   BATCH_SIZE     per-device micro-batch size
#   GLOBAL_BATCH   target global batch; GRAD_ACCUM defaults to GLOBAL_BATCH / (BATCH_SIZE x world)
#   GRAD_ACCUM     gradient accumulation steps (overrides the GLOBAL_BATCH arithmetic)
#   LR, EPOCHS     learning rate, epochs
#   ZERO           DeepSpeed config            (scripts/zero2.json or scripts/zero3.json)
#   PRECISION      bf16 | fp16 | fp32          (bf16 with a GPU, fp32 without)
#   REPORT_TO      wandb | tensorboard | none  (wandb; offline automatically without credentials)
#   RESUME         --resume_from_checkpoint: "auto" or a checkpoint path (unset: fresh start)
#   SAVE_STEPS, SAVE_TOTAL_LIMIT, NUM_WORKERS, MODEL_MAX_LENGTH
#   NUM_GPUS       GPUs per node               (count of `nvidia-smi -L`, else 1 CPU rank)
#   MASTER_PORT    rendezvous port             (29500)
#   DRY_RUN=1      print the launch command instead of running it
# Video (set by scripts/video/*.sh; unset for image-only LLaVA-1.5 runs)
#   VIDEO_TOWER    video encoder (a second CLIP feeding the same projector); enables the video path
#   VIDEO_FOLDER   root for the samples' relative video paths
#   NUM_FRAMES     frames sampled uniformly per video (8)
# Qwen2.5-VL (finetune.sh and finetune_lora.sh; e.g. MODEL=Qwen/Qwen2.5-VL-7B-Instruct COMPRESSION=qwen_duet_53)
#   MODEL_FAMILY   qwen2_5_vl | llava_next | llava_onevision | llava (default: from MODEL's config.json model_type,
#                  or a Hub id naming Qwen2.5-VL, LLaVA-NeXT or LLaVA-OneVision); Qwen2.5-VL runs use the
#                  checkpoint's vision transformer, merger (its projector) and chat template: VISION_TOWER and the
#                  projector settings do not apply
#   MAX_PIXELS     most pixels per image (Qwen's dynamic resolution; default: the checkpoint's)
#   VIDEO_FOLDER   root for the samples' relative video paths (videos: NUM_FRAMES frames each, default 16)
# LLaVA-NeXT (finetune.sh and finetune_lora.sh; e.g. MODEL=llava-hf/llava-v1.6-vicuna-7b-hf COMPRESSION=<a T2V
# preset or YAML file>): the checkpoint's CLIP tower, projector, AnyRes image processor and chat template; images
# only (no VIDEO_TOWER / VIDEO_FOLDER), VISION_TOWER and the projector settings do not apply
# LLaVA-OneVision (finetune.sh and finetune_lora.sh; e.g. MODEL=llava-hf/llava-onevision-qwen2-0.5b-ov-hf
# COMPRESSION=anyres_pdrop_third): the checkpoint's SigLIP tower, projector, AnyRes image processor and chat
# template (MODEL_FAMILY llava_onevision); images and videos (VIDEO_FOLDER, NUM_FRAMES frames each, default 8;
# no VIDEO_TOWER: the SigLIP tower encodes the frames), VISION_TOWER and the projector settings do not apply
#
# Multi-node (DeepSpeed's pdsh launcher; passwordless ssh between nodes, pdsh installed, the repo,
# the venv and OUTPUT_DIR on storage every node sees at the same path):
#   HOSTFILE=scripts/hostfile NUM_NODES=2 MASTER_ADDR=node-0 bash scripts/v1_5/pretrain.sh
#   HOSTFILE      MPI-style host list ("node-0 slots=8", see scripts/hostfile.example)
#   NUM_NODES     use the first N hosts of HOSTFILE (default: all of them)
#   MASTER_ADDR   address of node 0 (default: inferred by DeepSpeed)
# Without ssh (one launcher per node, started by SLURM's srun, Kubernetes or by hand): the same HOSTFILE and
# MASTER_ADDR on every node, plus NODE_RANK (0 .. nodes-1) of the node it runs on:
#   HOSTFILE=scripts/hostfile MASTER_ADDR=node-0 NODE_RANK=1 bash scripts/v1_5/finetune.sh
#   NODE_RANK     this node's rank: launch with DeepSpeed's --no_ssh (no pdsh/ssh needed)
# Collectives: a rank waits COLLECTIVE_TIMEOUT seconds (1800, --ddp_timeout) for its peers, then fails instead of
# hanging; a killed peer usually fails the collective at once.
# Only PYTHON*-prefixed variables travel to the other nodes; put anything else they need
# (e.g. WANDB_API_KEY=..., NCCL_* settings) into ./.deepspeed_env or ~/.deepspeed_env as KEY=VALUE lines.
# wandb naming travels as trainer arguments (--run_name/--run_group), so it reaches every node.

set -euo pipefail

COMMON_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(cd "$COMMON_DIR/../.." && pwd)"
# `--module llava.training.train` must import from this checkout, on every node.
export PYTHONPATH="$REPO_ROOT${PYTHONPATH:+:$PYTHONPATH}"

MODEL="${MODEL:-lmsys/vicuna-7b-v1.5}"
VISION_TOWER="${VISION_TOWER:-openai/clip-vit-large-patch14-336}"
COMPRESSION="${COMPRESSION:-none}"
REPORT_TO="${REPORT_TO:-wandb}"
MASTER_PORT="${MASTER_PORT:-29500}"
MODEL_MAX_LENGTH="${MODEL_MAX_LENGTH:-2048}"
NUM_WORKERS="${NUM_WORKERS:-4}"
HOSTFILE="${HOSTFILE:-}"
NUM_NODES="${NUM_NODES:-}"
MASTER_ADDR="${MASTER_ADDR:-}"
NODE_RANK="${NODE_RANK:-}"
COLLECTIVE_TIMEOUT="${COLLECTIVE_TIMEOUT:-1800}"
RESUME="${RESUME:-}"
DRY_RUN="${DRY_RUN:-0}"
DEEPSPEED="${DEEPSPEED:-deepspeed}"

log() { echo "[$(basename "$0")] $*" >&2; }
die() { log "error: $*"; exit 1; }

# The model family of MODEL: MODEL_FAMILY if set (the trainer's registry checks the name), else the project's
# family names (llava.families.names, no torch import: MODEL's config.json model_type, else a Hub id's name):
# qwen2_5_vl, llava_next, llava_onevision or llava.
PYTHON="${PYTHON:-python}"
if [[ -z "${MODEL_FAMILY:-}" ]]; then
    MODEL_FAMILY="$("$PYTHON" -m llava.families.names --offline "$MODEL")" ||
        die "cannot tell the model family of MODEL=$MODEL (set MODEL_FAMILY=llava|qwen2_5_vl|llava_next|llava_onevision)"
fi

# Number of GPUs nvidia-smi lists; 0 when it is missing or fails.
count_gpus() {
    local listing
    if command -v nvidia-smi >/dev/null 2>&1 && listing="$(nvidia-smi -L 2>/dev/null)"; then
        grep -c '^GPU ' <<<"$listing" || true
    else
        echo 0
    fi
}

# Hosts used from HOSTFILE (NUM_NODES or every non-comment line), 1 without a hostfile.
count_nodes() {
    if [[ -z "$HOSTFILE" ]]; then
        echo 1
    elif [[ -n "$NUM_NODES" ]]; then
        echo "$NUM_NODES"
    else
        [[ -f "$HOSTFILE" ]] || die "HOSTFILE '$HOSTFILE' does not exist"
        grep -cE '^[[:space:]]*[^#[:space:]]+[[:space:]]+slots=' "$HOSTFILE" || true
    fi
}

# Fill the settings that depend on the machine or on other settings; the sourcing script sets its
# recipe defaults (OUTPUT_DIR, BATCH_SIZE, GLOBAL_BATCH, LR, ZERO, ...) first.
finalize_settings() {
    local gpus
    gpus="$(count_gpus)"
    if [[ "$gpus" -gt 0 ]]; then
        PRECISION="${PRECISION:-bf16}"
        NUM_GPUS="${NUM_GPUS:-$gpus}"
    else
        # No GPU: DeepSpeed runs CPU ranks, in fp32 unless PRECISION says otherwise (bf16 runs on CPUs
        # that support it, with --use_cpu so the Trainer accepts it; it checks the GPU-path numerics).
        # (llava.training.train sets up a gloo process group so the Trainer counts every CPU rank.)
        export DS_ACCELERATOR="${DS_ACCELERATOR:-cpu}"
        PRECISION="${PRECISION:-fp32}"
        NUM_GPUS="${NUM_GPUS:-1}"
    fi
    case "$PRECISION" in
        bf16) PRECISION_ARGS=(--bf16 True) ;;
        fp16) PRECISION_ARGS=(--fp16 True) ;;
        fp32) PRECISION_ARGS=() ;;
        *) die "PRECISION must be bf16, fp16 or fp32, got '$PRECISION'" ;;
    esac
    if [[ "$gpus" -eq 0 && "$PRECISION" != fp32 ]]; then
        PRECISION_ARGS+=(--use_cpu True)
    fi

    local world=$((NUM_GPUS * $(count_nodes)))
    if [[ -z "${GRAD_ACCUM:-}" ]]; then
        GRAD_ACCUM=$((GLOBAL_BATCH / (BATCH_SIZE * world)))
        [[ "$GRAD_ACCUM" -ge 1 ]] || GRAD_ACCUM=1
        if ((GRAD_ACCUM * BATCH_SIZE * world != GLOBAL_BATCH)); then
            log "warning: GLOBAL_BATCH=$GLOBAL_BATCH is not BATCH_SIZE=$BATCH_SIZE x $world ranks x an integer"
        fi
    fi
    log "world size $world, per-device batch $BATCH_SIZE, grad accum $GRAD_ACCUM:" \
        "global batch $((BATCH_SIZE * world * GRAD_ACCUM)), precision $PRECISION"

    RUN_NAME="${RUN_NAME:-$(basename "$OUTPUT_DIR")}"
    if [[ "$MODEL_FAMILY" == qwen2_5_vl ]]; then
        RUN_GROUP="${RUN_GROUP:-qwen2.5-vl-$COMPRESSION}"
        TEMPLATE=chat_template # the checkpoint's own
    elif [[ "$MODEL_FAMILY" == llava_next ]]; then
        RUN_GROUP="${RUN_GROUP:-llava-next-$(basename "$COMPRESSION" .yaml)}"
        TEMPLATE=chat_template # the checkpoint's own
    elif [[ "$MODEL_FAMILY" == llava_onevision ]]; then
        RUN_GROUP="${RUN_GROUP:-llava-onevision-$(basename "$COMPRESSION" .yaml)}"
        TEMPLATE=chat_template # the checkpoint's processor's own
    else
        RUN_GROUP="${RUN_GROUP:-llava-v1.5-$COMPRESSION}"
    fi
    read -r -a DATA_PATHS <<<"${DATA_PATH:?DATA_PATH is not set}"
    [[ ${#DATA_PATHS[@]} -gt 0 ]] || die "DATA_PATH is empty"
}

# Trainer arguments every stage shares; stage scripts add their own after these.
common_train_args() {
    COMMON_ARGS=(
        --deepspeed "$ZERO"
        --model_name_or_path "$MODEL"
        --data_path "${DATA_PATHS[@]}"
        --image_folder "$IMAGE_FOLDER"
        --version "$TEMPLATE"
        --compression "$COMPRESSION"
        --output_dir "$OUTPUT_DIR"
        "${PRECISION_ARGS[@]}"
        --num_train_epochs "$EPOCHS"
        --per_device_train_batch_size "$BATCH_SIZE"
        --gradient_accumulation_steps "$GRAD_ACCUM"
        --learning_rate "$LR"
        --weight_decay 0.
        --warmup_ratio 0.03
        --lr_scheduler_type cosine
        --logging_steps 1
        --save_strategy steps
        --save_steps "$SAVE_STEPS"
        --save_total_limit "$SAVE_TOTAL_LIMIT"
        --model_max_length "$MODEL_MAX_LENGTH"
        --gradient_checkpointing True
        --dataloader_num_workers "$NUM_WORKERS"
        --report_to "$REPORT_TO"
        --run_name "$RUN_NAME"
        --run_group "$RUN_GROUP"
        --ddp_timeout "$COLLECTIVE_TIMEOUT"
    )
    [[ "${PACKING:-0}" != 1 ]] || COMMON_ARGS+=(--packing True)
    if [[ "$MODEL_FAMILY" == qwen2_5_vl ]]; then
        [[ -z "${VIDEO_TOWER:-}" ]] || die "VIDEO_TOWER does not apply to Qwen2.5-VL (its vision transformer" \
            "encodes videos too): set VIDEO_FOLDER (and NUM_FRAMES) for video data"
        [[ -z "${MAX_PIXELS:-}" ]] || COMMON_ARGS+=(--max_pixels "$MAX_PIXELS")
        [[ -z "${VIDEO_FOLDER:-}" ]] || COMMON_ARGS+=(--video_folder "$VIDEO_FOLDER" --num_frames "${NUM_FRAMES:-16}")
    elif [[ "$MODEL_FAMILY" == llava_next ]]; then
        [[ -z "${VIDEO_TOWER:-}${VIDEO_FOLDER:-}" ]] || die "LLaVA-NeXT trains on images only: unset VIDEO_TOWER" \
            "and VIDEO_FOLDER"
        [[ -z "${MAX_PIXELS:-}" ]] || die "MAX_PIXELS is Qwen2.5-VL's; LLaVA-NeXT tiles images by its grid pinpoints"
    elif [[ "$MODEL_FAMILY" == llava_onevision ]]; then
        [[ -z "${VIDEO_TOWER:-}" ]] || die "VIDEO_TOWER does not apply to LLaVA-OneVision (its SigLIP tower encodes" \
            "the frames): set VIDEO_FOLDER (and NUM_FRAMES) for video data"
        [[ -z "${MAX_PIXELS:-}" ]] || die "MAX_PIXELS is Qwen2.5-VL's; LLaVA-OneVision tiles images by its grid" \
            "pinpoints"
        [[ -z "${VIDEO_FOLDER:-}" ]] || COMMON_ARGS+=(--video_folder "$VIDEO_FOLDER" --num_frames "${NUM_FRAMES:-8}")
    else
        COMMON_ARGS+=(--vision_tower "$VISION_TOWER" --mm_projector_type mlp2x_gelu --mm_vision_select_layer -2
            --mm_vision_select_feature patch)
    fi
    if [[ -n "${VIDEO_TOWER:-}" ]]; then
        COMMON_ARGS+=(--video_tower "$VIDEO_TOWER" --video_folder "${VIDEO_FOLDER:?VIDEO_FOLDER is not set}"
            --num_frames "${NUM_FRAMES:-8}" --mm_video_select_feature cls_patch)
    fi
    if [[ -n "$RESUME" ]]; then
        COMMON_ARGS+=(--resume_from_checkpoint "$RESUME")
    fi
}

# Stage-2 projector initialisation from PRETRAINED_PROJECTOR ("none" or empty: a fresh projector).
# shellcheck disable=SC2034  # PROJECTOR_ARGS is read by the sourcing script
projector_args() {
    PROJECTOR_ARGS=()
    if [[ "$MODEL_FAMILY" == qwen2_5_vl && -z "${PRETRAINED_PROJECTOR:-}" ]]; then
        log "Qwen2.5-VL: the checkpoint's own merger (projector) is finetuned"
        return 0
    fi
    if [[ "$MODEL_FAMILY" == llava_next && -z "${PRETRAINED_PROJECTOR:-}" ]]; then
        log "LLaVA-NeXT: the checkpoint's own projector is finetuned"
        return 0
    fi
    if [[ "$MODEL_FAMILY" == llava_onevision && -z "${PRETRAINED_PROJECTOR:-}" ]]; then
        log "LLaVA-OneVision: the checkpoint's own projector is finetuned"
        return 0
    fi
    case "${PRETRAINED_PROJECTOR:-none}" in
        none | "") log "warning: no PRETRAINED_PROJECTOR; the projector starts from random weights" ;;
        *)
            if [[ "$DRY_RUN" != "1" && ! -f "$PRETRAINED_PROJECTOR" ]]; then
                die "PRETRAINED_PROJECTOR '$PRETRAINED_PROJECTOR' not found; run pretrain.sh first," \
                    "or set PRETRAIN_DIR / PRETRAINED_PROJECTOR (or PRETRAINED_PROJECTOR=none)"
            fi
            PROJECTOR_ARGS=(--pretrain_mm_mlp_adapter "$PRETRAINED_PROJECTOR")
            ;;
    esac
}

# launch TRAINER_ARGS...: run llava.training.train under the DeepSpeed launcher (or print it).
launch() {
    local -a cmd=("$DEEPSPEED")
    if [[ -n "$HOSTFILE" ]]; then
        cmd+=(--hostfile "$HOSTFILE")
        [[ -z "$NUM_NODES" ]] || cmd+=(--num_nodes "$NUM_NODES")
    fi
    if [[ -n "$NODE_RANK" ]]; then
        [[ -n "$HOSTFILE" && -n "$MASTER_ADDR" ]] || die "NODE_RANK needs HOSTFILE and MASTER_ADDR (the same on every node)"
        cmd+=(--no_ssh --node_rank "$NODE_RANK")
    fi
    [[ -z "$MASTER_ADDR" ]] || cmd+=(--master_addr "$MASTER_ADDR")
    cmd+=(--num_gpus "$NUM_GPUS" --master_port "$MASTER_PORT" --module llava.training.train "$@")
    if [[ "$DRY_RUN" == "1" ]]; then
        [[ -z "${DS_ACCELERATOR:-}" ]] || printf 'DS_ACCELERATOR=%q ' "$DS_ACCELERATOR"
        printf '%q ' "${cmd[@]}"
        printf '\n'
        return 0
    fi
    command -v "$DEEPSPEED" >/dev/null 2>&1 || die "'$DEEPSPEED' not found; activate the environment"
    mkdir -p "$OUTPUT_DIR"
    exec "${cmd[@]}"
}
