#!/usr/bin/env bash
# The README demo: a 4-layer byte-level GPT (hidden 128, sequence 256) with one sequential MTP depth, 300 steps of 8
# samples on the Python standard library's source files (no --data-path). Every flag is Megatron-LM's, so the run
# does not depend on the script's defaults. Extra flags are appended, e.g. --json-log runs/demo/metrics.jsonl.
#   PYTHON=.venv/bin/python bash examples/demo.sh --json-log runs/demo/metrics.jsonl --tensorboard-dir runs/demo/tb
exec "${PYTHON:-python}" -m megatron_mtp.pretrain \
    --num-layers 4 --hidden-size 128 --num-attention-heads 4 --seq-length 256 \
    --position-embedding-type rope --normalization RMSNorm --hidden-dropout 0 --attention-dropout 0 \
    --make-vocab-size-divisible-by 128 --tokenizer-type ByteLevel --mtp-num-layers 1 \
    --micro-batch-size 8 --train-iters 300 --lr 2e-3 --min-lr 2e-4 --lr-warmup-iters 20 --lr-decay-style cosine \
    --adam-beta2 0.95 --log-interval 10 --eval-interval 100 --eval-iters 4 "$@"
