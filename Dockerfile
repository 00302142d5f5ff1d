# finetune on a CUDA GPU box: docker build -t finetune . && docker run --gpus all -v $PWD:/work finetune train /work/recipe.yaml
FROM pytorch/pytorch:2.7.1-cuda12.6-cudnn9-runtime
ENV PIP_NO_CACHE_DIR=1 HF_HOME=/cache/huggingface FINETUNE_CACHE=/cache/finetune FINETUNE_CONFIGS=/opt/finetune/configs
WORKDIR /opt/finetune
COPY pyproject.toml README.md ./
COPY finetune ./finetune
COPY recipes ./recipes
COPY configs ./configs
# The base image's torch satisfies the torch>=2.4 bound, so pip keeps it.
RUN pip install ".[qlora,deepspeed,wandb]"
WORKDIR /work
ENTRYPOINT ["finetune"]
CMD ["--help"]
