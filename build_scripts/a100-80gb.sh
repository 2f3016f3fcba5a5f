#!/usr/bin/env bash
# Build profile "a100-80gb": NVIDIA A100 80 GB, Ampere (sm_80): no FP8.
#
# Weights: bf16 (--quant none) while they fit in 60% of memory, else INT4-AWQ (W4A16 runs on
# sm_80). KV cache: bf16. Caps: 256 sequences, 32768 tokens each, 8192 tokens per step.
#
# The numbers live in trt_gemma/build/profiles.py (PROFILES["a100-80gb"]); the batch / sequence /
# token limits are derived there from this GPU's memory for the model being built, and stored in
# the engine's engine.json ("profile"). Override any choice by appending options, e.g.
#   build_scripts/a100-80gb.sh gemma3-270m engines/a100-80gb --quant int4-awq
#
# usage: build_scripts/a100-80gb.sh SOURCE OUTPUT_DIR [more trt-gemma build options]
exec "$(dirname "$0")/_profile.sh" a100-80gb "$0" "$@"
