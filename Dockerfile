# Two images from one file (docs/packaging.md):
#   docker build --target operator -t finetune-operator:0.1.0 .   # kopf operator, no torch
#   docker build --target trainer  -t finetune-trainer:0.1.0 .    # torch, torchvision, timm
# Plain Dockerfile syntax (no heredocs, no RUN --mount): Docker BuildKit and Debian's buildah/podman
# both build it; `make images` builds both targets with podman on a Debian base (cluster/images.sh).
# Both run as a non-root user with a read-only root filesystem in mind: HOME and every cache point
# at /tmp, which the pod mounts as an emptyDir (or a volume for caches worth keeping).
#
# Base images are pinned by tag; pin them by digest too with the *_DIGEST arguments, e.g.
#   --build-arg PYTHON_DIGEST=@sha256:<digest of python:3.11.14-slim-bookworm>
# TRAINER_BASE picks the trainer's runtime base. The default (Debian slim + CPython) runs on GPUs:
# the torch wheels from PyPI bundle the CUDA runtime, so nodes only need the NVIDIA driver and
# container toolkit. TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu gives a CPU-only image
# (about 1.5 GB smaller); a cuXYZ index pins a CUDA version matching older drivers.

ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm
ARG PYTHON_DIGEST=
ARG TRAINER_BASE=${PYTHON_IMAGE}
ARG TRAINER_BASE_DIGEST=${PYTHON_DIGEST}

# ---------------------------------------------------------------------------------------------
# builder: one virtual environment per image in /opt/venv. Dependencies are installed from
# pyproject.toml alone, before the sources are copied, so a code change reuses the dependency
# layer. Compilers (for any sdist without a wheel) exist only in the build stages.
FROM ${PYTHON_IMAGE}${PYTHON_DIGEST} AS builder
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN apt-get update \
 && apt-get install -y --no-install-recommends build-essential \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml ./
# requirements-<extra>.txt: the base dependencies plus one extra, read from pyproject.toml.
RUN for extra in operator trainer; do \
      python -c 'import sys, tomllib; p = tomllib.load(open("pyproject.toml", "rb"))["project"]; print(*p["dependencies"], *p["optional-dependencies"][sys.argv[1]], sep="\n")' \
        "$extra" > "requirements-$extra.txt"; \
    done

# <target>-deps: the dependencies in /opt/venv; <target>-venv: the same without pip and setuptools,
# the runtime's environment; <target>-build: the project itself (`pip install --target`) in
# /opt/finetune. The final stages copy the two separately, so a code change leaves the large
# environment layer as it was (the trainer's is 6 GB) and adds a layer of about 1 MB.
FROM builder AS operator-deps
RUN python -m venv /opt/venv \
 && /opt/venv/bin/pip install -r requirements-operator.txt

FROM operator-deps AS operator-venv
RUN /opt/venv/bin/pip uninstall -y pip setuptools wheel

FROM operator-deps AS operator-build
COPY README.md ./
COPY api ./api
COPY operator ./operator
COPY trainer ./trainer
RUN /opt/venv/bin/pip install --no-deps --target /opt/finetune .

FROM builder AS trainer-deps
ARG TORCH_INDEX_URL=
RUN python -m venv /opt/venv \
 && /opt/venv/bin/pip install ${TORCH_INDEX_URL:+--extra-index-url "$TORCH_INDEX_URL"} \
      -r requirements-trainer.txt

FROM trainer-deps AS trainer-venv
RUN /opt/venv/bin/pip uninstall -y pip setuptools wheel

FROM trainer-deps AS trainer-build
COPY README.md ./
COPY api ./api
COPY operator ./operator
COPY trainer ./trainer
RUN /opt/venv/bin/pip install --no-deps --target /opt/finetune .

# ---------------------------------------------------------------------------------------------
# operator: kopf, the Kubernetes client and prometheus-client; no torch, no compilers.
FROM ${PYTHON_IMAGE}${PYTHON_DIGEST} AS operator
ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="finetune-operator" \
      org.opencontainers.image.description="Kubernetes operator for FineTuneJobs (finetune.dev)" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0"
# PYTHONMALLOC=malloc: small objects from glibc, not pymalloc's 1 MiB arenas, so the pages a
# deleted FineTuneJob's records held can be handed back (the operator calls malloc_trim); with
# pymalloc a churn of 1000 jobs left the RSS 10 % up, as a few live objects pin each arena.
ENV PATH=/opt/finetune/bin:/opt/venv/bin:$PATH \
    PYTHONPATH=/opt/finetune \
    HOME=/tmp \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PYTHONMALLOC=malloc
COPY --from=operator-venv /opt/venv /opt/venv
COPY --from=operator-build /opt/finetune /opt/finetune
USER 65532:65532
EXPOSE 8080
ENTRYPOINT ["finetune-operator"]

# ---------------------------------------------------------------------------------------------
# trainer: torch, torchvision, timm. Caches (weights, datasets, matplotlib) go under /tmp unless
# FINETUNE_CACHE_DIR points at a volume.
FROM ${TRAINER_BASE}${TRAINER_BASE_DIGEST} AS trainer
ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="finetune-trainer" \
      org.opencontainers.image.description="Fine-tunes pretrained image models for FineTuneJobs" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0"
ENV PATH=/opt/finetune/bin:/opt/venv/bin:$PATH \
    PYTHONPATH=/opt/finetune \
    HOME=/tmp \
    XDG_CACHE_HOME=/tmp/.cache \
    TORCH_HOME=/tmp/.cache/torch \
    HF_HOME=/tmp/.cache/huggingface \
    MPLCONFIGDIR=/tmp/.cache/matplotlib \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
COPY --from=trainer-venv /opt/venv /opt/venv
COPY --from=trainer-build /opt/finetune /opt/finetune
USER 65532:65532
EXPOSE 9400
ENTRYPOINT ["python", "-m", "finetune_trainer"]
