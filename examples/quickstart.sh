#!/usr/bin/env bash
# Quick start on a CPU, from a fresh clone: set up, build a corpus that needs no download, train a
# tokenizer, preprocess to Megatron .bin/.idx, pretrain moc-tiny for a few minutes, save a checkpoint.
#
#   bash examples/quickstart.sh            # everything goes under ./runs/quickstart
#   TRAIN_ITERS=300 bash examples/quickstart.sh
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
export PYTHONWARNINGS=ignore

RUN=${RUN:-runs/quickstart}
TRAIN_ITERS=${TRAIN_ITERS:-200}
DATA=$RUN/data
mkdir -p "$DATA"

step() { printf '\n=== %s\n' "$*"; }

step "1/5 corpus: synthetic biographies (with held-out probes) + CPython's own documentation (PSF License)"
[ -f "$DATA/bios.jsonl" ] || python tools/make_synthetic_corpus.py --output "$DATA/bios.jsonl" \
    --num-people 2000 --bios-per-person 3 --seed 1234
[ -f "$DATA/pydocs.jsonl" ] || python tools/make_text_corpus.py --output "$DATA/pydocs.jsonl"

step "2/5 tokenizer: sentencepiece BPE, 4096 pieces, byte fallback"
[ -f "$DATA/tokenizer.model" ] || python tools/train_tokenizer.py --input "$DATA/bios.jsonl" "$DATA/pydocs.jsonl" \
    --model-prefix "$DATA/tokenizer" --vocab-size 4096 --max-mb 20

step "3/5 preprocess to Megatron indexed datasets"
for name in bios pydocs; do
  [ -f "$DATA/${name}_text_document.idx" ] || python tools/preprocess_data.py --input "$DATA/$name.jsonl" \
      --output-prefix "$DATA/$name" --tokenizer-type SentencePieceTokenizer \
      --tokenizer-model "$DATA/tokenizer.model" --append-eod --workers 2
done

step "4/5 pretrain moc-tiny on the CPU ($TRAIN_ITERS iterations)"
PRETRAIN=(python pretrain_moc.py --preset moc-tiny
    --data-path 0.5 "$DATA/bios_text_document" 0.5 "$DATA/pydocs_text_document" --split 98,2,0
    --tokenizer-type SentencePieceTokenizer --tokenizer-model "$DATA/tokenizer.model"
    --seq-length 256 --micro-batch-size 8 --global-batch-size 16
    --lr 2e-3 --min-lr 2e-4 --lr-decay-style WSD
    --lr-wsd-decay-style linear --lr-wsd-decay-iters $((TRAIN_ITERS / 5)) --lr-warmup-iters $((TRAIN_ITERS / 10))
    --weight-decay 0.1 --clip-grad 1.0 --moc-memory-lr 4e-3 --moc-bank-lr 4e-3
    --log-interval 10 --eval-interval 100 --eval-iters 5
    --save "$RUN/checkpoints" --save-interval "$TRAIN_ITERS" --tensorboard-dir "$RUN/tensorboard")
"${PRETRAIN[@]}" --train-iters "$TRAIN_ITERS"

step "5/5 done"
echo "checkpoint:  $RUN/checkpoints (latest: $(cat "$RUN/checkpoints/latest_checkpointed_iteration.txt"))"
echo "tensorboard: tensorboard --logdir $RUN/tensorboard"
echo "go on (resumes at iteration $TRAIN_ITERS, keeps the checkpoint's LR schedule; . .venv/bin/activate first):"
printf ' %q' "${PRETRAIN[@]}" --train-iters $((TRAIN_ITERS * 2)) --load "$RUN/checkpoints"
echo
