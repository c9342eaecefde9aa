#!/usr/bin/env bash
# The whole pipeline, as the reference example's run_grpo_qwen.sh: prepare -> convert -> train ->
# export, each step skipped when its output already exists (so a rerun after a crash resumes).
#
#   bash run.sh                                   # Qwen2.5-7B-Instruct on 8 GPUs
#   MODEL_SIZE=0.5B GPUS_PER_NODE=1 bash run.sh --steps 50
#   enable_wandb=True wandb_project=my-proj WANDB_API_KEY=... bash run.sh
#   DEVICE=cpu MODEL_SIZE=0.5B bash run.sh --steps 2   # no GPU: the same pipeline on the CPU (slow)
#   bash run.sh --dry-run                         # print the commands, run nothing
#   bash run.sh --help
#
# Arguments other than --dry-run / --help are passed on to grpo.py.
set -euo pipefail
cd "$(dirname "$0")"

usage() {
cat <<'EOF'
usage: [VAR=value ...] bash run.sh [--dry-run] [grpo.py flags ...]

Runs prepare.py (download + preprocess), convert.py (HF -> Megatron), torchrun grpo.py, and
convert.py again (final policy -> HF), skipping each step whose output exists.

Environment variables (default in brackets):
  MODEL_SIZE      Qwen2.5 size: 0.5B 1.5B 3B 7B 14B 32B 72B, or custom (any
                  Qwen2-shaped model already in MODEL_DIR; nothing downloaded)  [7B]
  MODEL_DIR       HF checkpoint folder (downloaded if it has no config.json) [Qwen2.5-$MODEL_SIZE-Instruct]
  MODEL_ID        modelscope id to download                                 [Qwen/Qwen2.5-$MODEL_SIZE-Instruct]
  DATA_DIR        prompt set folder: its train.json/test.json are used as they are;
                  without them, MATH-lighteval is downloaded (into an empty or
                  missing folder) and preprocessed there     [dataset/MATH-lighteval]
  REWARD          the task's reward for grpo.py --reward, MODULE:FUNCTION
                  (README: Your own task)                    [prepare:math_reward]
  CKPT_DIR        where mcore/ (converted), grpo/ (run) and hf/ (export) go  [ckpts/Qwen2.5-$MODEL_SIZE]
  DEVICE          cuda, or cpu: the same pipeline without GPUs (conversion with
                  USE_CUDA=false, grpo.py --device cpu; slow, for learning)  [cuda]
  GPUS_PER_NODE   processes (GPUs) per node                        [8; 1 with DEVICE=cpu]
  TP              tensor parallel size       [1 for <=3B, 2 for 7B, 4 for 14B, 8 for 32B/72B;
                                              1 with DEVICE=cpu]
  PP              pipeline parallel size                  [1; 2 for 72B, with NNODES=2]
  NNODES          nodes                                                      [1]
  NODE_RANK       this node's rank (prepare/convert/export run on node 0)    [0]
  MASTER_ADDR     rendezvous host for torchrun                               [127.0.0.1]
  MASTER_PORT     rendezvous port                                            [29500]
  enable_wandb    True: log to wandb (offline if there is no network)        [False]
  wandb_project   wandb project                                              [grpo-megatron]
  WANDB_API_KEY   wandb key (never printed)                                  [unset]
  DRY_RUN         True: same as --dry-run                                    [False]

enable_wandb and DRY_RUN take True/true/1 or False/false/0 (empty = False).
Before step 1, `python grpo.py --check-flags` checks the flags for grpo.py.
EOF
}

DRY_RUN=${DRY_RUN:-False}
extra=()
for a in "$@"; do
  case "$a" in
    -h|--help) usage; exit 0 ;;
    --dry-run) DRY_RUN=True ;;
    *) extra+=("$a") ;;
  esac
done

die() { echo "error: $*" >&2; exit 1; }

# on NAME: whether the switch NAME is on. The one reading of every True/False variable, so that
# no spelling can mean "on" to one switch and "off" to another (DRY_RUN=true once ran the real
# pipeline); anything else is a one-line error, never a silent False.
on() {
  case "${!1}" in
    True|true|1) return 0 ;;
    False|false|0|"") return 1 ;;
    *) die "$1=${!1}: use True or False" ;;
  esac
}

# Layouts that fit 80 GB GPUs by grpo.py's memory plan (python grpo.py --memory-plan SIZE ...; the
# README's table): 72B needs two pipeline stages, so two nodes of 8 (NNODES=2).
MODEL_SIZE=${MODEL_SIZE:-7B}
DEVICE=${DEVICE:-cuda}
case "$DEVICE" in
  cuda|cpu) ;;
  *) die "DEVICE=$DEVICE: use cuda or cpu" ;;
esac
pp_default=1
case "$MODEL_SIZE" in
  0.5B|1.5B|3B|custom) tp_default=1 ;;
  7B) tp_default=2 ;;
  14B) tp_default=4 ;;
  32B) tp_default=8 ;;
  72B) tp_default=8; pp_default=2 ;;
  *) die "MODEL_SIZE=$MODEL_SIZE is not one of 0.5B 1.5B 3B 7B 14B 32B 72B custom" ;;
esac
gpus_default=8
# On the CPU no layout is needed to fit memory: one process, the whole model (TP/PP/GPUS_PER_NODE
# may still be set, to rehearse a layout).
[[ $DEVICE == cpu ]] && { tp_default=1; pp_default=1; gpus_default=1; }
MODEL_DIR=${MODEL_DIR:-Qwen2.5-$MODEL_SIZE-Instruct}
MODEL_ID=${MODEL_ID:-Qwen/Qwen2.5-$MODEL_SIZE-Instruct}
DATA_DIR=${DATA_DIR:-dataset/MATH-lighteval}
REWARD=${REWARD:-prepare:math_reward}
CKPT_DIR=${CKPT_DIR:-ckpts/Qwen2.5-$MODEL_SIZE}
GPUS_PER_NODE=${GPUS_PER_NODE:-$gpus_default}
TP=${TP:-$tp_default}
PP=${PP:-$pp_default}
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}
enable_wandb=${enable_wandb:-False}
wandb_project=${wandb_project:-grpo-megatron}

for v in GPUS_PER_NODE TP PP NNODES NODE_RANK MASTER_PORT; do
  [[ ${!v} =~ ^[0-9]+$ ]] || die "$v=${!v} is not a number"
  # bash arithmetic reads a leading 0 as octal (TP=08 is an error, TP=010 is 8); 10# reads decimal
  printf -v "$v" %d "$(( 10#${!v} ))"
done
(( TP >= 1 && PP >= 1 && GPUS_PER_NODE >= 1 && NNODES >= 1 )) || die "TP, PP, GPUS_PER_NODE and NNODES must be >= 1"
world=$(( GPUS_PER_NODE * NNODES ))
(( world % (TP * PP) == 0 )) || die "$world GPUs cannot be split into TP=$TP x PP=$PP groups; use GPUS_PER_NODE x NNODES divisible by $(( TP * PP ))"
(( TP <= GPUS_PER_NODE )) || die "TP=$TP is more than GPUS_PER_NODE=$GPUS_PER_NODE: a tensor-parallel group must sit in one node"
# Conversion runs on node 0 alone: with TP x PP, or with TP only when the pipeline spans nodes (a
# dist checkpoint written at one TP/PP loads at any other).
conv_pp=$PP
(( TP * PP <= GPUS_PER_NODE )) || conv_pp=1
dry_run=0; on DRY_RUN && dry_run=1
wandb_on=0; on enable_wandb && wandb_on=1

echo "settings: MODEL_SIZE=$MODEL_SIZE MODEL_DIR=$MODEL_DIR DATA_DIR=$DATA_DIR REWARD=$REWARD CKPT_DIR=$CKPT_DIR DEVICE=$DEVICE"
echo "          GPUS_PER_NODE=$GPUS_PER_NODE NNODES=$NNODES NODE_RANK=$NODE_RANK MASTER_ADDR=$MASTER_ADDR:$MASTER_PORT TP=$TP PP=$PP"
echo "          enable_wandb=$enable_wandb wandb_project=$wandb_project WANDB_API_KEY=$([[ -n ${WANDB_API_KEY:-} ]] && echo set || echo unset)"
echo "          grpo.py extra flags: ${extra[*]:-(none)}"

run() {   # print a step's command; run it unless this is a dry run
  echo "+ $*"
  (( dry_run )) || "$@"
}
skip() { echo "= skip: $*"; }
check() {   # print a check's command; unless this is a dry run, run it and stop with its error line
  echo "+ $*"
  (( dry_run )) && return 0
  local err
  err=$("$@" 2>&1 >/dev/null) && return 0
  # Our scripts end a user mistake in one "error: ..." line; anything else is a bug: show it all.
  grep -q '^error: ' <<<"$err" || { echo "$err" >&2; die "${*:1:3} failed (output above)"; }
  grep '^error: ' <<<"$err" | tail -n 1 >&2
  exit 1
}

MCORE=$CKPT_DIR/mcore
OUT=$CKPT_DIR/grpo
HF_OUT=$CKPT_DIR/hf
use_cuda=true
[[ $DEVICE == cpu ]] && use_cuda=false
convert_cmd=(python convert.py)
(( TP * conv_pp > 1 )) && convert_cmd=(torchrun --nproc_per_node $(( TP * conv_pp )) --master_port "$MASTER_PORT" convert.py)

wandb_args=()
(( wandb_on )) && wandb_args=(--wandb-project "$wandb_project")
grpo_flags=(--load "$MCORE" --hf-dir "$MODEL_DIR" --data "$DATA_DIR" --reward "$REWARD" --out "$OUT" --model-size "$MODEL_SIZE"
            --device "$DEVICE" --tp "$TP" --pp "$PP" "${wandb_args[@]}" "${extra[@]}")

# 0. grpo.py's flags, now: a typo would otherwise surface in step 4, after the downloads and the
# conversion. --check-flags only parses and validates them (no files, no GPUs), and with the
# world size it checks that the step's prompts divide over the data-parallel ranks too.
check python grpo.py --world-size "$world" --check-flags "${grpo_flags[@]}"

if (( NODE_RANK == 0 )); then
  # 1. data
  if [[ -f $DATA_DIR/train.json && -f $DATA_DIR/test.json ]]; then
    skip "prompt set $DATA_DIR/{train,test}.json exists"
  else
    if compgen -G "$DATA_DIR/data/train-*.parquet" >/dev/null; then
      skip "MATH-lighteval parquet files are in $DATA_DIR/data"
    elif compgen -G "$DATA_DIR/*" >/dev/null && [[ ! -d $DATA_DIR/data ]]; then
      # Another data set (GSM8K's main/, a lone train.json): MATH-lighteval downloaded on top of it
      # would train on MATH while the user thinks it is their data.
      die "DATA_DIR=$DATA_DIR holds neither train.json + test.json nor MATH-lighteval's data/train-*.parquet; write the prompt set there with prepare.py and its layout flags (README: Your own task), or use an empty DATA_DIR for MATH-lighteval"
    else
      run python prepare.py download --local_dir "$DATA_DIR"
    fi
    run python prepare.py --input_dir "$DATA_DIR" --local_dir "$DATA_DIR"
  fi
  # 2. model
  if [[ -f $MODEL_DIR/config.json ]]; then
    skip "model $MODEL_DIR exists"
  elif [[ $MODEL_SIZE == custom ]]; then
    die "MODEL_SIZE=custom needs MODEL_DIR with the model's config.json ($MODEL_DIR/config.json not found)"
  else
    run python prepare.py download-model --model "$MODEL_ID" --local_dir "$MODEL_DIR"
  fi
  # 3. HF -> Megatron
  if [[ -f $MCORE/metadata.json ]]; then
    skip "Megatron checkpoint $MCORE exists"
  else
    run "${convert_cmd[@]}" "$MODEL_SIZE" "$MODEL_DIR" "$MCORE" false "$use_cuda" bf16 --tp "$TP" --pp "$conv_pp"
  fi
fi

# 4. train (resumes from $OUT/checkpoints by itself)
run torchrun --nnodes "$NNODES" --node_rank "$NODE_RANK" --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" \
    --nproc_per_node "$GPUS_PER_NODE" grpo.py "${grpo_flags[@]}"

# 5. final policy -> HF (loadable by transformers and vLLM)
if (( NODE_RANK == 0 )); then
  if [[ -f $HF_OUT/config.json && $HF_OUT/config.json -nt $OUT/final/metadata.json ]]; then
    skip "export $HF_OUT is newer than $OUT/final"
  else
    run "${convert_cmd[@]}" "$MODEL_SIZE" "$OUT/final" "$HF_OUT" true "$use_cuda" bf16 "$MODEL_DIR" --tp "$TP" --pp "$conv_pp" --force
  fi
  echo "done: trained policy in $HF_OUT"
fi
