#!/usr/bin/env bash
# Build profile "l4": NVIDIA L4, 24 GB, Ada (sm_89), 300 GB/s.
#
# Weights: INT4-AWQ (decode is memory-bound and the L4 has the least bandwidth here: 4-bit
# weights halve FP8's bytes per step). KV cache: FP8. Caps: 64 sequences, 8192 tokens each,
# 4096 tokens per step.
#
# The numbers live in trt_gemma/build/profiles.py (PROFILES["l4"]); the batch / sequence /
# token limits are derived there from this GPU's memory for the model being built, and stored in
# the engine's engine.json ("profile"). Override any choice by appending options, e.g.
#   build_scripts/l4.sh gemma3-270m engines/l4 --quant int4-awq
#
# usage: build_scripts/l4.sh SOURCE OUTPUT_DIR [more trt-gemma build options]
exec "$(dirname "$0")/_profile.sh" l4 "$0" "$@"
