#!/usr/bin/env bash
# Shared body of the per-GPU recipes: _profile.sh PROFILE RECIPE_SCRIPT SOURCE OUTPUT_DIR [options]
# Prints the recipe's header comment as usage when SOURCE or OUTPUT_DIR is missing.
set -euo pipefail
PROFILE=$1
RECIPE=$2
shift 2
if [[ $# -lt 2 ]]; then
    sed -n '2,/^exec /p' "$RECIPE" | sed '$d' | sed 's/^# \{0,1\}//'
    exit 2
fi
SOURCE=$1
OUTPUT=$2
shift 2
exec trt-gemma build "$SOURCE" -o "$OUTPUT" --profile "$PROFILE" "$@"
