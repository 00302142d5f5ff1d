# finetune on a CUDA GPU box:
#   docker build -t finetune . && docker run --gpus all -v finetune-cache:/cache -v "$PWD":/work finetune train recipe.yaml
# Checked without a Docker engine by scripts/check_dockerfile.py (hadolint and the rules below).
#
# torch 2.13.0 as in constraints.txt, built for CUDA 13.0 (as PyPI's torch 2.13.0 wheel is). A *devel* image:
# DeepSpeed compiles its ops (fused Adam, CPU-Adam for offload_optimizer) on first use and needs nvcc and g++.
FROM pytorch/pytorch:2.13.0-cuda13.0-cudnn9-devel

# g++ for DeepSpeed's C++ ops; versions come with the base image's Ubuntu release.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends build-essential \
 && rm -rf /var/lib/apt/lists/*

ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1 \
    HF_HOME=/cache/huggingface FINETUNE_CACHE=/cache/finetune TORCH_EXTENSIONS_DIR=/cache/torch_extensions

WORKDIR /opt/finetune
COPY pyproject.toml README.md constraints.txt ./
COPY finetune ./finetune
COPY recipes ./recipes
# Every version from the lock; the image's torch (2.13.0+cu130) satisfies its torch==2.13.0 and stays.
RUN pip install --no-cache-dir -c constraints.txt ".[qlora,deepspeed,wandb,tensorboard,mlflow,gguf,eval]" \
 && python -c "import torch; assert torch.__version__.split('+')[0] == '2.13.0', torch.__version__" \
 && finetune --version \
 && finetune validate recipes/tiny/sft_lora.yaml > /dev/null

# A non-root user; the caches are one volume (models downloaded, data tokenised, ops compiled once).
# Writable by any uid, for `docker run --user "$(id -u):$(id -g)"`.
RUN groupadd --gid 10001 finetune \
 && useradd --create-home --uid 10001 --gid 10001 --shell /bin/bash finetune \
 && mkdir -p /cache/huggingface /cache/finetune /cache/torch_extensions /work \
 && chown -R finetune:finetune /cache /work \
 && chmod -R a+rwX /cache
USER 10001:10001
VOLUME ["/cache"]
WORKDIR /work

HEALTHCHECK --interval=5m --timeout=30s CMD ["finetune", "--version"]
ENTRYPOINT ["finetune"]
CMD ["--help"]
