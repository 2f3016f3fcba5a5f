#!/usr/bin/env bash
# Build every profile for one checkpoint: OUTPUT_ROOT/<profile> for each target GPU.
#
# usage: build_scripts/build_all.sh SOURCE OUTPUT_ROOT [more trt-gemma build options]
#   e.g. build_scripts/build_all.sh gemma3-270m engines/gemma3-270m
#        build_scripts/build_all.sh ./gemma-3-4b-it engines/g4b --backend tensorrt-llm
#
# A profile that cannot hold the model (its weights plus one full-length sequence of KV cache
# exceed the GPU) fails with a one-line reason; the others are still built. Exits non-zero if any
# profile failed.
set -uo pipefail
if [[ $# -lt 2 ]]; then
    sed -n '2,/^set -uo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'
    exit 2
fi
SOURCE=$1
ROOT=$2
shift 2
HERE=$(cd "$(dirname "$0")" && pwd)
PROFILES=(rtx4090 l4 l40s a100-80gb h100-80gb h200)
failed=()
for profile in "${PROFILES[@]}"; do
    echo "== $profile"
    if ! "$HERE/$profile.sh" "$SOURCE" "$ROOT/$profile" "$@"; then
        failed+=("$profile")
    fi
done
if [[ ${#failed[@]} -gt 0 ]]; then
    echo "failed: ${failed[*]}" >&2
    exit 1
fi
echo "built ${#PROFILES[@]} profiles under $ROOT"
