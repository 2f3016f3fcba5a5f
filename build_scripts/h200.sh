#!/usr/bin/env bash
# Build profile "h200": NVIDIA H200 141 GB, Hopper (sm_90).
#
# Weights: FP8 while they fit in 60% of memory, else INT4-AWQ. KV cache: FP8.
# Caps: 512 sequences, 131072 tokens each (the model's context caps it), 16384 tokens per step.
#
# The numbers live in trt_gemma/build/profiles.py (PROFILES["h200"]); the batch / sequence /
# token limits are derived there from this GPU's memory for the model being built, and stored in
# the engine's engine.json ("profile"). Override any choice by appending options, e.g.
#   build_scripts/h200.sh gemma3-270m engines/h200 --quant int4-awq
#
# usage: build_scripts/h200.sh SOURCE OUTPUT_DIR [more trt-gemma build options]
exec "$(dirname "$0")/_profile.sh" h200 "$0" "$@"
