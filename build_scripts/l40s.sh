#!/usr/bin/env bash
# Build profile "l40s": NVIDIA L40S, 48 GB, Ada (sm_89).
#
# Weights: FP8 while they fit in 60% of memory, else INT4-AWQ. KV cache: FP8.
# Caps: 128 sequences, 16384 tokens each, 8192 tokens per step.
#
# The numbers live in trt_gemma/build/profiles.py (PROFILES["l40s"]); the batch / sequence /
# token limits are derived there from this GPU's memory for the model being built, and stored in
# the engine's engine.json ("profile"). Override any choice by appending options, e.g.
#   build_scripts/l40s.sh gemma3-270m engines/l40s --quant int4-awq
#
# usage: build_scripts/l40s.sh SOURCE OUTPUT_DIR [more trt-gemma build options]
exec "$(dirname "$0")/_profile.sh" l40s "$0" "$@"
