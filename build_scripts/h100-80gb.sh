#!/usr/bin/env bash
# Build profile "h100-80gb": NVIDIA H100 80 GB (SXM or PCIe), Hopper (sm_90).
#
# Weights: FP8 while they fit in 60% of memory, else INT4-AWQ. KV cache: FP8.
# Caps: 256 sequences, 32768 tokens each, 16384 tokens per step.
#
# The numbers live in trt_gemma/build/profiles.py (PROFILES["h100-80gb"]); the batch / sequence /
# token limits are derived there from this GPU's memory for the model being built, and stored in
# the engine's engine.json ("profile"). Override any choice by appending options, e.g.
#   build_scripts/h100-80gb.sh gemma3-270m engines/h100-80gb --quant int4-awq
#
# usage: build_scripts/h100-80gb.sh SOURCE OUTPUT_DIR [more trt-gemma build options]
exec "$(dirname "$0")/_profile.sh" h100-80gb "$0" "$@"
