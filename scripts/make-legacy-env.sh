#!/usr/bin/env bash
# Make the separate environment the legacy quantizer backends run in (never the main one: they pin transformers 4.x).
#   scripts/make-legacy-env.sh autoawq|autogptq [DIR]   (DIR defaults to .venv-legacy; point QUANTMILL_LEGACY_PYTHON
#   at DIR/bin/python if it lives elsewhere)
set -euo pipefail
backend=${1:?usage: make-legacy-env.sh autoawq|autogptq [DIR]}
dir=${2:-.venv-legacy}
python3 -m venv "$dir"
"$dir/bin/pip" install -q torch==2.13.0
case "$backend" in
  autoawq)  "$dir/bin/pip" install -q "autoawq==0.2.9" "transformers==4.51.3" accelerate safetensors ;;  # 0.2.9 imports qwen3: >= 4.51
  autogptq) "$dir/bin/pip" install -q "auto-gptq==0.7.1" "transformers>=4.38,<4.48" accelerate safetensors optimum ;;
  *) echo "unknown legacy backend '$backend'; choose autoawq or autogptq" >&2; exit 2 ;;
esac
echo "legacy environment for $backend ready: $dir/bin/python"
