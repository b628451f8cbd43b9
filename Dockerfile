# The chatbot's image: `chatbot start` as a non-root user, the data dir a volume, `chatbot health` the
# HEALTHCHECK. The token comes at run time (DISCORD_TOKEN, or DISCORD_TOKEN_FILE naming a secret), never here.
#
# GPU (default): a CUDA base and PyPI's CUDA build of the pinned torch (the host needs the NVIDIA driver and
# the NVIDIA Container Toolkit; run with --gpus all):
#   docker build -t gpt2-discord-chatbot .
# CPU: a slim Debian base and the 750 MB CPU build of torch:
#   docker build -t gpt2-discord-chatbot:cpu --build-arg BASE_IMAGE=debian:12.12-slim \
#     --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cpu --build-arg EXTRAS=[cpu] .
# (EXTRAS=[cpu] adds the CTranslate2 engine, several times faster than torch on a CPU.)
ARG BASE_IMAGE=nvidia/cuda:12.8.1-base-ubuntu24.04
FROM ${BASE_IMAGE}

# The same torch as the Makefile's TORCH_SPEC; TORCH_INDEX picks the CPU wheel (empty: PyPI's CUDA build).
ARG TORCH_SPEC=torch==2.13.0
ARG TORCH_INDEX=
ARG EXTRAS=
ENV VIRTUAL_ENV=/opt/chatbot/.venv \
    PATH=/opt/chatbot/.venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# Python 3.11+ with venv from the base's own packages (a base that has them skips the download). Not
# pinned to package versions: they differ between the two bases, and each base's tag pins them.
# hadolint ignore=DL3008
RUN if ! python3 -c "import ensurepip, venv" 2>/dev/null; then \
        apt-get update \
        && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
        && rm -rf /var/lib/apt/lists/*; \
    fi \
    && python3 -m venv "$VIRTUAL_ENV"

# torch first, in its own layer: it is most of the image and changes least. (Pinned: TORCH_SPEC.)
# hadolint ignore=DL3013
RUN pip install "$TORCH_SPEC" ${TORCH_INDEX:+--index-url "$TORCH_INDEX"}

WORKDIR /opt/chatbot
COPY pyproject.toml README.md ./
COPY bot ./bot
COPY model ./model
# The project itself; its dependencies' versions are bounded in pyproject.toml.
# hadolint ignore=DL3013
RUN pip install ".${EXTRAS}" && chatbot --help > /dev/null

# A dedicated user; /data holds chatbot.db, exports/, models/ and the heartbeat `chatbot health` reads.
RUN useradd --uid 10001 --user-group --no-create-home --home-dir /data --shell /usr/sbin/nologin chatbot \
    && mkdir -p /data \
    && chown chatbot:chatbot /data
ENV BOT_DATA_DIR=/data \
    HF_HOME=/data/hf-cache \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility
VOLUME ["/data"]
USER 10001:10001
WORKDIR /data

# Healthy = connected to Discord, model worker alive, event loop on time (bot/operations/health.py).
# The start period
# covers the model load; the heartbeat goes stale 15 s after any of the three fails.
HEALTHCHECK --interval=30s --timeout=10s --start-period=5m --retries=3 CMD ["chatbot", "health"]
# Metrics (opt-in): BOT_METRICS_PORT=9100 BOT_METRICS_HOST=0.0.0.0, published on the host's 127.0.0.1.
EXPOSE 9100
STOPSIGNAL SIGTERM
ENTRYPOINT ["chatbot"]
CMD ["start"]
