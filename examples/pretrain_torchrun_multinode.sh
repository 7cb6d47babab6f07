#!/usr/bin/env bash
# Multi-node pretraining of the paper's MoC model with torchrun. Run the same command on every node:
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=node0 bash examples/pretrain_torchrun_multinode.sh   # on node0
#   NNODES=2 NODE_RANK=1 MASTER_ADDR=node0 bash examples/pretrain_torchrun_multinode.sh   # on node1
# DATA_PATH, TOKENIZER and SAVE_DIR must name the same files on every node (shared filesystem).
#
# Restarts: --max-restarts MAX_RESTARTS (default 3). When a rank dies, torchrun stops every rank on every
# node, all agents meet again at the c10d rendezvous (RDZV_ID names the job), and the new ranks resume
# from the last checkpoint in SAVE_DIR (--save and --load are the same folder). Work since that
# checkpoint is redone; the loss curve is the uninterrupted run's (docs/training.md, "Restarts").
set -euo pipefail
cd "$(dirname "$0")/.."

NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
MASTER_ADDR=${MASTER_ADDR:-localhost}
MASTER_PORT=${MASTER_PORT:-6000}
DATA_PATH=${DATA_PATH:?set DATA_PATH to a Megatron dataset prefix, e.g. data/corpus_text_document}
TOKENIZER=${TOKENIZER:?set TOKENIZER to a local Hugging Face tokenizer folder or a sentencepiece .model}
TOKENIZER_TYPE=${TOKENIZER_TYPE:-HuggingFaceTokenizer}
SAVE_DIR=${SAVE_DIR:-checkpoints/moc-paper}
EP=${EP:-8}       # expert-parallel size: the bank's 4096 routed chapters are split over EP ranks
MAX_RESTARTS=${MAX_RESTARTS:-3}
RDZV_ID=${RDZV_ID:-${SLURM_JOB_ID:-moc-paper}}

torchrun --nnodes "$NNODES" --node_rank "$NODE_RANK" --nproc_per_node "$GPUS_PER_NODE" \
    --rdzv-backend c10d --rdzv-endpoint "$MASTER_ADDR:$MASTER_PORT" --rdzv-id "$RDZV_ID" \
    --max-restarts "$MAX_RESTARTS" \
    pretrain_moc.py --preset moc-paper \
    --expert-model-parallel-size "$EP" --use-distributed-optimizer --overlap-grad-reduce \
    --data-path "$DATA_PATH" --split 99,1,0 \
    --tokenizer-type "$TOKENIZER_TYPE" --tokenizer-model "$TOKENIZER" \
    --micro-batch-size 32 --global-batch-size 1024 --train-iters 9600 --bf16 \
    --lr 3e-4 --min-lr 3e-5 --moc-memory-lr 6e-4 --moc-bank-lr 6e-4 \
    --lr-decay-style WSD --lr-warmup-iters 250 --lr-wsd-decay-iters 1440 --lr-wsd-decay-style linear \
    --weight-decay 0.1 --adam-beta1 0.9 --adam-beta2 0.95 --clip-grad 1.0 \
    --hidden-dropout 0 --attention-dropout 0 --recompute-granularity selective \
    --log-interval 10 --eval-interval 500 --eval-iters 20 \
    --save "$SAVE_DIR" --load "$SAVE_DIR" --save-interval 500 --tensorboard-dir "$SAVE_DIR/tensorboard"
