# tg-verify container image: the CLI on a CUDA-enabled PyTorch base. Used by action.yml
# (`docker run --gpus all IMAGE action`), as a job container (`container: options: --gpus all`),
# and on its own: `docker run --rm --gpus all -v "$PWD:$PWD" -w "$PWD" IMAGE POLICY.yml`.
#
# No USER and no WORKDIR: GitHub mounts the workspace and sets the working directory, and a Docker
# action must run as root to write there (action.yml passes --user to keep files deletable instead).
# Base pinned by tag and digest (torch 2.13.0, CUDA 12.6, cuDNN 9; runs on drivers >= 560). Refresh
# the digest with `docker buildx imagetools inspect pytorch/pytorch:2.13.0-cuda12.6-cudnn9-runtime`.
FROM pytorch/pytorch:2.13.0-cuda12.6-cudnn9-runtime@sha256:6acf597eeb8e376a96580dde4952f37cc017fef732bb40bfc73f28f25e3f64b4

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_BREAK_SYSTEM_PACKAGES=1 \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1

# Dependencies first (their own layer, cached across source changes), pinned to the versions the
# test suite runs with. torch is NOT listed: it comes from the base image with its CUDA build, and
# `pip check` fails the build if anything asked for another torch.
RUN pip install \
        "safetensors==0.8.0" \
        "transformers==5.24.0" \
        "peft==0.21.2" \
        "scikit-learn==1.9.1" \
        "scipy==1.17.1" \
        "numpy==2.4.6" \
        "pyyaml==6.0.4" \
        "rich==15.0.0" \
        "huggingface-hub==2.4.0" \
        "tokenizers==0.23.3" \
        "accelerate==1.15.0" \
    && pip check

# The package itself, from this repository, without touching the pinned dependencies.
COPY pyproject.toml README.md /tmp/tg-verify/
COPY tg_verify /tmp/tg-verify/tg_verify
RUN pip install --no-deps /tmp/tg-verify \
    && rm -rf /tmp/tg-verify \
    && tg-verify --version

LABEL org.opencontainers.image.title="tg-verify" \
      org.opencontainers.image.description="Model lineage verification for release pipelines (TensorGuard fingerprints, lineage evidence, in-toto attestations)" \
      org.opencontainers.image.licenses="Apache-2.0"

ENTRYPOINT ["tg-verify"]
