#!/usr/bin/env bash
# Quick start on a CPU, from a fresh clone: set up, build a corpus that needs no download, train a
# tokenizer, preprocess to Megatron .bin/.idx, pretrain moc-tiny for a few minutes, save a checkpoint,
# instruction-tune it, export it to a Hugging Face folder, generate with plain transformers, and (optional,
# with the eval extra installed) run lm-eval. A rerun keeps the data and both checkpoints (training resumes).
#
#   bash examples/quickstart.sh            # everything goes under ./runs/quickstart
#   TRAIN_ITERS=300 FT_ITERS=100 bash examples/quickstart.sh
set -euo pipefail
cd "$(dirname "$0")/.."
# Each step runs in the background and is waited for, so that a SIGTERM or SIGINT sent to this script alone
# (a scheduler, `kill PID`) ends the running step too instead of leaving it behind.
child=
on_signal() { trap - INT TERM; [ -z "$child" ] || kill -TERM "$child" 2>/dev/null; wait; exit 143; }
trap on_signal INT TERM
run() { "$@" & child=$!; local rc=0; wait "$child" || rc=$?; child=; return "$rc"; }
run bash scripts/setup.sh
. .venv/bin/activate

RUN=${RUN:-runs/quickstart}
TRAIN_ITERS=${TRAIN_ITERS:-200}
FT_ITERS=${FT_ITERS:-40}
DATA=$RUN/data
mkdir -p "$DATA"

step() { printf '\n=== %s\n' "$*"; }

step "1/8 corpus: synthetic biographies (with held-out probes) + CPython's own documentation (PSF License)"
[ -f "$DATA/bios.jsonl" ] && [ -f "$DATA/chat.jsonl" ] || run python tools/make_synthetic_corpus.py \
    --output "$DATA/bios.jsonl" --probes-output "$DATA/probes.jsonl" --chat-output "$DATA/chat.jsonl" \
    --num-people 2000 --bios-per-person 3 --num-chats 1000 --seed 1234
[ -f "$DATA/pydocs.jsonl" ] || run python tools/make_text_corpus.py --output "$DATA/pydocs.jsonl"

step "2/8 tokenizer: sentencepiece BPE, 4096 pieces, byte fallback"
[ -f "$DATA/tokenizer.model" ] || run python tools/train_tokenizer.py --input "$DATA/bios.jsonl" "$DATA/pydocs.jsonl" \
    --model-prefix "$DATA/tokenizer" --vocab-size 4096 --max-mb 20

step "3/8 preprocess to Megatron indexed datasets"
for name in bios pydocs; do
  [ -f "$DATA/${name}_text_document.idx" ] || run python tools/preprocess_data.py --input "$DATA/$name.jsonl" \
      --output-prefix "$DATA/$name" --tokenizer-type SentencePieceTokenizer \
      --tokenizer-model "$DATA/tokenizer.model" --append-eod --workers 2
done
[ -f "$DATA/chat_tokens.idx" ] || run python tools/preprocess_sft.py --input "$DATA/chat.jsonl" --output-prefix "$DATA/chat" \
    --tokenizer-type SentencePieceTokenizer --tokenizer-model "$DATA/tokenizer.model" --pack-length 256 --workers 2

step "4/8 pretrain moc-tiny on the CPU ($TRAIN_ITERS iterations)"
PRETRAIN=(python pretrain_moc.py --preset moc-tiny
    --data-path 0.5 "$DATA/bios_text_document" 0.5 "$DATA/pydocs_text_document" --split 98,2,0
    --tokenizer-type SentencePieceTokenizer --tokenizer-model "$DATA/tokenizer.model"
    --seq-length 256 --micro-batch-size 8 --global-batch-size 16
    --lr 2e-3 --min-lr 2e-4 --lr-decay-style WSD
    --lr-wsd-decay-style linear --lr-wsd-decay-iters $((TRAIN_ITERS / 5)) --lr-warmup-iters $((TRAIN_ITERS / 10))
    --weight-decay 0.1 --clip-grad 1.0 --moc-memory-lr 4e-3 --moc-bank-lr 4e-3
    --log-interval 10 --eval-interval 100 --eval-iters 5
    --save "$RUN/checkpoints" --save-interval "$TRAIN_ITERS" --tensorboard-dir "$RUN/tensorboard")
# A rerun resumes the checkpoint instead of retraining over it (the same folder as --load and --save).
DONE=$(cat "$RUN/checkpoints/latest_checkpointed_iteration.txt" 2>/dev/null || echo 0)
if [ "$DONE" -ge "$TRAIN_ITERS" ]; then
  echo "$RUN/checkpoints is at iteration $DONE already: kept (rm -rf $RUN to start the quick start over)"
else
  run "${PRETRAIN[@]}" --train-iters "$TRAIN_ITERS" --load "$RUN/checkpoints"
fi

step "5/8 instruction-tune it on synthetic chats ($FT_ITERS iterations; memory and bank at lower learning rates)"
# --load of its own --save folder: a rerun resumes (or keeps) the tuned checkpoint instead of overwriting it.
run python finetune_moc.py --preset moc-tiny --pretrained-checkpoint "$RUN/checkpoints" --load "$RUN/sft" \
    --sft-data-path "$DATA/chat" --split 98,2,0 --seq-length 256 \
    --tokenizer-type SentencePieceTokenizer --tokenizer-model "$DATA/tokenizer.model" \
    --micro-batch-size 4 --global-batch-size 8 --train-iters "$FT_ITERS" \
    --lr 3e-4 --min-lr 3e-5 --moc-memory-lr 1.5e-4 --moc-bank-lr 5e-5 --lr-decay-style cosine --lr-warmup-fraction 0.1 \
    --log-interval 10 --eval-interval "$FT_ITERS" --eval-iters 5 --save "$RUN/sft" --save-interval "$FT_ITERS"

step "6/8 export the tuned model to a Hugging Face folder (safetensors + trust_remote_code model + tokenizer)"
rm -rf "$RUN/hf"
run python tools/convert_checkpoint.py export --load "$RUN/sft" --output "$RUN/hf" \
    --tokenizer-model "$DATA/tokenizer.model"

step "7/8 generate with plain transformers (this process does not import moc_megatron)"
python - "$RUN/hf" <<'PY'
import sys
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.utils import logging
logging.disable_progress_bar()  # no "Loading weights" bar before the generated text
folder = sys.argv[1]
tok = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
prompts = ["Ada Lovelace was born in", "The list type in Python"]
tok.padding_side = "left"
batch = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
with torch.no_grad():
    out = model.generate(**batch, max_new_tokens=24, do_sample=False, pad_token_id=tok.pad_token_id)
for prompt, ids in zip(prompts, out):
    print(repr(prompt + tok.decode(ids[batch["input_ids"].shape[1]:], skip_special_tokens=True)))
assert "moc_megatron" not in sys.modules
PY

step "8/8 (optional) lm-evaluation-harness, offline, on a local 8-question task: runs only when the eval extra is installed (pip install -e '.[eval]'; scripts/setup.sh does not install it)"
if python -c "import lm_eval" 2>/dev/null; then
  # Warnings and the report only: no INFO log lines, no loading/dataset bars for an 8-question task (lm-eval's
  # own bars over the requests stay: it switches them on explicitly).
  HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 LMEVAL_LOG_LEVEL=WARNING TQDM_DISABLE=1 HF_HUB_DISABLE_PROGRESS_BARS=1 \
      HF_DATASETS_DISABLE_PROGRESS_BARS=1 run lm_eval --model hf \
      --model_args "pretrained=$RUN/hf,trust_remote_code=True,dtype=float32" \
      --include_path examples/lm_eval --tasks quickstart_mc --batch_size 4 --device cpu
else
  echo "skipped: lm-eval is not installed. To run this step: . .venv/bin/activate && pip install -e '.[eval]', then"
  echo "rerun this script (it keeps the data and checkpoints; docs/hf.md has the lm_eval command)"
fi

step "done"
echo "checkpoint:  $RUN/checkpoints (latest: $(cat "$RUN/checkpoints/latest_checkpointed_iteration.txt")), tuned: $RUN/sft"
echo "HF folder:   $RUN/hf (AutoModelForCausalLM.from_pretrained(..., trust_remote_code=True); docs/hf.md)"
echo "tensorboard: tensorboard --logdir $RUN/tensorboard"
echo "go on (resumes at iteration $TRAIN_ITERS, keeps the checkpoint's LR schedule; . .venv/bin/activate first):"
# shlex.join quotes only what the shell needs quoted (printf %q would print --split 98\,2\,0)
python -c 'import shlex, sys; print("  " + shlex.join(sys.argv[1:]))' \
    "${PRETRAIN[@]}" --train-iters $((TRAIN_ITERS * 2)) --load "$RUN/checkpoints"
