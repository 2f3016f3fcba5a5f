#!/usr/bin/env bash
# Build profile "rtx4090": GeForce RTX 4090, 24 GB, Ada (sm_89).
#
# Weights: FP8 (E4M3 tensor cores) while they fit in 60% of memory (every Gemma up to 12B);
# INT4-AWQ beyond (Gemma 2/3 27B). KV cache: FP8. Caps: 64 sequences, 8192 tokens each,
# 4096 tokens per step.
#
# The numbers live in trt_gemma/build/profiles.py (PROFILES["rtx4090"]); the batch / sequence /
# token limits are derived there from this GPU's memory for the model being built, and stored in
# the engine's engine.json ("profile"). Override any choice by appending options, e.g.
#   build_scripts/rtx4090.sh gemma3-270m engines/rtx4090 --quant int4-awq
#
# usage: build_scripts/rtx4090.sh SOURCE OUTPUT_DIR [more trt-gemma build options]
exec "$(dirname "$0")/_profile.sh" rtx4090 "$0" "$@"
