#!/usr/bin/env bash
# Multi-node MoC pretraining with torchrun: the paper's recipe (Table 6) by default. Run the same command on
# every node (1 to N nodes; examples/pretrain_slurm.sbatch does it under SLURM):
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=node0 DATA_PATH=... TOKENIZER=... bash examples/pretrain_torchrun_multinode.sh
#   NNODES=2 NODE_RANK=1 MASTER_ADDR=node0 DATA_PATH=... TOKENIZER=... bash examples/pretrain_torchrun_multinode.sh
# DATA_PATH, TOKENIZER and SAVE_DIR must name the same files on every node (a shared filesystem).
#
# Every setting is an environment variable (default in brackets):
#   NNODES [$SLURM_NNODES or 1]  GPUS_PER_NODE: ranks per node [8]
#   NODE_RANK: names the node in the log (the c10d rendezvous numbers the nodes) [$SLURM_NODEID or 0]
#   MASTER_ADDR: the first node's hostname [localhost]  MASTER_PORT: its rendezvous port [6000]
#   RDZV_ID: names the job at the rendezvous [$SLURM_JOB_ID or moc-pretrain]
#   DEVICE: gpu (NCCL, one rank per GPU) or cpu (gloo; GPUS_PER_NODE processes per node) [gpu]
#   DATA_PATH: Megatron dataset prefix(es), "w1 p1 w2 p2" for a blend [required unless MOCK_DATA=1]
#   MOCK_DATA: 1 = synthetic data, no DATA_PATH/TOKENIZER (with VOCAB_SIZE) [0]
#   TOKENIZER: a local Hugging Face tokenizer folder or a sentencepiece .model [required unless MOCK_DATA=1]
#   TOKENIZER_TYPE [HuggingFaceTokenizer]  SPLIT [99,1,0]  VOCAB_SIZE: with MOCK_DATA only [preset's]
#   SAVE_DIR: checkpoints; also --load, so a restarted job resumes there [checkpoints/moc-paper]
#   PRESET: model size, a pretrain_moc.py --preset (moc-paper, moc-tiny, ...) [moc-paper]
#   EP / TP / PP: expert / tensor / pipeline parallel sizes [8 / 1 / 1]
#   MICRO_BATCH [32]  GLOBAL_BATCH [1024]  TRAIN_ITERS [9600]  SEQ_LENGTH [preset's]
#   LR [3e-4]  MIN_LR [3e-5]  MEMORY_LR, BANK_LR: --moc-memory-lr, --moc-bank-lr [6e-4]
#   WARMUP_ITERS [250]  WSD_DECAY_ITERS [1440]
#   SAVE_INTERVAL [500]  EVAL_INTERVAL [500]  EVAL_ITERS [20]  LOG_INTERVAL [10]
#   PRECISION: --bf16, --fp16 or empty for fp32 [--bf16 on gpu, empty on cpu]
#   MAX_RESTARTS: torchrun --max-restarts [3]
#   PREFLIGHT: 1 = check the flags and input files in one process first [1]; CHECK_ONLY: 1 = only that [0]
#   EXTRA_ARGS: more pretrain_moc.py flags, appended (they win over the above) []
#   PYTHON: the interpreter [python; the repository's .venv/bin/python when no virtualenv is active]
#
# Restarts: when a rank dies, torchrun (--max-restarts MAX_RESTARTS) stops every rank on every node, all
# agents meet again at the c10d rendezvous (RDZV_ID names the job) and the new ranks resume from the last
# checkpoint in SAVE_DIR (--save and --load are the same folder); pretrain_moc.py logs a "restart:" line
# with the iteration. Work since that checkpoint is redone; the loss curve is the uninterrupted run's.
# Bad flags or inputs stop here once (the preflight), not once per restart.
set -euo pipefail
cd "$(dirname "$0")/.."
PROG=pretrain_torchrun_multinode.sh

NNODES=${NNODES:-${SLURM_NNODES:-1}}
NODE_RANK=${NODE_RANK:-${SLURM_NODEID:-0}}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
MASTER_ADDR=${MASTER_ADDR:-localhost}
MASTER_PORT=${MASTER_PORT:-6000}
RDZV_ID=${RDZV_ID:-${SLURM_JOB_ID:-moc-pretrain}}
DEVICE=${DEVICE:-gpu}
MOCK_DATA=${MOCK_DATA:-0}
TOKENIZER_TYPE=${TOKENIZER_TYPE:-HuggingFaceTokenizer}
SPLIT=${SPLIT:-99,1,0}
SAVE_DIR=${SAVE_DIR:-checkpoints/moc-paper}
PRESET=${PRESET:-moc-paper}
EP=${EP:-8}
TP=${TP:-1}
PP=${PP:-1}
MICRO_BATCH=${MICRO_BATCH:-32}
GLOBAL_BATCH=${GLOBAL_BATCH:-1024}
TRAIN_ITERS=${TRAIN_ITERS:-9600}
LR=${LR:-3e-4}
MIN_LR=${MIN_LR:-3e-5}
MEMORY_LR=${MEMORY_LR:-6e-4}
BANK_LR=${BANK_LR:-6e-4}
WARMUP_ITERS=${WARMUP_ITERS:-250}
WSD_DECAY_ITERS=${WSD_DECAY_ITERS:-1440}
SAVE_INTERVAL=${SAVE_INTERVAL:-500}
EVAL_INTERVAL=${EVAL_INTERVAL:-500}
EVAL_ITERS=${EVAL_ITERS:-20}
LOG_INTERVAL=${LOG_INTERVAL:-10}
MAX_RESTARTS=${MAX_RESTARTS:-3}
PREFLIGHT=${PREFLIGHT:-1}
CHECK_ONLY=${CHECK_ONLY:-0}
EXTRA_ARGS=${EXTRA_ARGS:-}

die() { echo "$PROG: error: $*" >&2; exit 1; }

case "$DEVICE" in
  gpu) PRECISION=${PRECISION---bf16} ;;
  cpu) PRECISION=${PRECISION:-}; export MOC_FORCE_CPU=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} ;;
  *) die "DEVICE=$DEVICE: give gpu or cpu" ;;
esac

data_args=()
if [ "$MOCK_DATA" = 1 ]; then
  data_args=(--mock-data)
  [ -n "${VOCAB_SIZE:-}" ] && data_args+=(--vocab-size "$VOCAB_SIZE")
else
  [ -n "${DATA_PATH:-}" ] || die "set DATA_PATH to a Megatron dataset prefix (e.g. data/corpus_text_document), or MOCK_DATA=1"
  [ -n "${TOKENIZER:-}" ] || die "set TOKENIZER to a local Hugging Face tokenizer folder or a sentencepiece .model"
  # shellcheck disable=SC2206  # a blend is several words: "0.7 data/a 0.3 data/b"
  data_args=(--data-path $DATA_PATH --split "$SPLIT" --tokenizer-type "$TOKENIZER_TYPE" --tokenizer-model "$TOKENIZER")
fi
[ -n "${SEQ_LENGTH:-}" ] && data_args+=(--seq-length "$SEQ_LENGTH")

# shellcheck disable=SC2206
args=(
  --preset "$PRESET" "${data_args[@]}"
  --tensor-model-parallel-size "$TP" --pipeline-model-parallel-size "$PP" --expert-model-parallel-size "$EP"
  --use-distributed-optimizer
  --micro-batch-size "$MICRO_BATCH" --global-batch-size "$GLOBAL_BATCH" --train-iters "$TRAIN_ITERS" $PRECISION
  --lr "$LR" --min-lr "$MIN_LR" --moc-memory-lr "$MEMORY_LR" --moc-bank-lr "$BANK_LR"
  --lr-decay-style WSD --lr-warmup-iters "$WARMUP_ITERS" --lr-wsd-decay-iters "$WSD_DECAY_ITERS"
  --lr-wsd-decay-style linear
  --weight-decay 0.1 --adam-beta1 0.9 --adam-beta2 0.95 --clip-grad 1.0
  --hidden-dropout 0 --attention-dropout 0 --recompute-granularity selective
  --log-interval "$LOG_INTERVAL" --eval-interval "$EVAL_INTERVAL" --eval-iters "$EVAL_ITERS"
  --save "$SAVE_DIR" --load "$SAVE_DIR" --save-interval "$SAVE_INTERVAL" --tensorboard-dir "$SAVE_DIR/tensorboard"
  $EXTRA_ARGS
)
[ "$DEVICE" = gpu ] && args+=(--overlap-grad-reduce)

PYTHON=${PYTHON:-python}
[ -x .venv/bin/python ] && [ -z "${VIRTUAL_ENV:-}" ] && PYTHON=.venv/bin/python
if [ "$DEVICE" = gpu ]; then
  gpus=$("$PYTHON" -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0)
  [ "$gpus" -ge "$GPUS_PER_NODE" ] || die "DEVICE=gpu but $(hostname) has $gpus GPUs for GPUS_PER_NODE=$GPUS_PER_NODE (DEVICE=cpu runs on CPUs)"
fi
if [ "$PREFLIGHT" = 1 ] || [ "$CHECK_ONLY" = 1 ]; then
  WORLD_SIZE=$((NNODES * GPUS_PER_NODE)) "$PYTHON" -m moc_megatron.training.preflight "${args[@]}"
fi
[ "$CHECK_ONLY" = 1 ] && exit 0

echo "$PROG: node $NODE_RANK/$NNODES ($(hostname)), $GPUS_PER_NODE ranks on $DEVICE, rendezvous $MASTER_ADDR:$MASTER_PORT" \
     "id $RDZV_ID, max restarts $MAX_RESTARTS: pretrain_moc.py ${args[*]}"
# Each restart round gets a fresh store from its rank 0 (TORCH_DISABLE_SHARE_RDZV_TCP_STORE): with the agents'
# shared store, a node whose own ranks did not fail starts the next round with another TORCHELASTIC_RESTART_COUNT
# than the node that failed, and the ranks would look for each other under different keys.
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1
# (No --node_rank: the c10d rendezvous numbers the nodes itself.)
exec "$PYTHON" -m torch.distributed.run --nnodes "$NNODES" --nproc_per_node "$GPUS_PER_NODE" \
    --rdzv-backend c10d --rdzv-endpoint "$MASTER_ADDR:$MASTER_PORT" --rdzv-id "$RDZV_ID" \
    --max-restarts "$MAX_RESTARTS" \
    pretrain_moc.py "${args[@]}"
