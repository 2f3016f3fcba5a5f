# trt-gemma on NVIDIA GPUs: the OpenAI-compatible server with the Triton kernels.
#   docker build -t trt-gemma:cuda .
#   docker run --gpus all -v $PWD/engines:/models -p 8000:8000 trt-gemma:cuda \
#       serve /models/gemma-2-9b-fp8 --host 0.0.0.0 --port 8000
# Without arguments it serves the bundled Gemma 3 270M. Replicas on Ray Serve inside one
# container (one GPU each): build with --build-arg EXTRAS=server,gpu,demo,ray and pass
# `serve SOURCE --replicas N`; on Kubernetes prefer one pod per replica (deploy/kubernetes/).
FROM nvidia/cuda:12.8.1-base-ubuntu24.04

ARG EXTRAS=server,gpu,demo
ENV DEBIAN_FRONTEND=noninteractive PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH
# Triton compiles a small C launcher per kernel at run time: it needs gcc and Python's headers.
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv python3-dev gcc \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv
WORKDIR /opt/trt-gemma

# PyTorch's default Linux wheels carry their own CUDA libraries; the base image brings only the
# driver's user-space hooks (the NVIDIA container toolkit mounts the driver).
RUN pip install torch
COPY pyproject.toml README.md ./
COPY trt_gemma ./trt_gemma
COPY kernels ./kernels
RUN pip install ".[${EXTRAS}]"

RUN useradd --create-home --uid 10001 trtgemma
USER trtgemma
# Triton's compiled-kernel cache: somewhere writable (mount a volume to keep it across restarts).
ENV TRITON_CACHE_DIR=/home/trtgemma/.triton

EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=300s \
    CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4)"
ENTRYPOINT ["trt-gemma"]
CMD ["serve", "gemma3-270m", "--host", "0.0.0.0", "--port", "8000"]
