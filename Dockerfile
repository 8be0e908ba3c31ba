# The HTTP captioning service (show_attend_tell.serve) on the CPU, serving a model folder.
#
#   docker build -t show-attend-tell-serve .
#   docker run --rm -p 8000:8000 -v /path/to/model:/model:ro show-attend-tell-serve
#   curl -F image=@photo.jpg http://127.0.0.1:8000/caption
#
# The model folder is mounted at /model (read-only is enough). To bake one into an image instead:
#   FROM show-attend-tell-serve
#   COPY my-model/ /model/
# Options of the service go after the image name, replacing the defaults below, e.g.
#   docker run ... show-attend-tell-serve --model /model --host 0.0.0.0 --port 8000 --max-batch-size 32
FROM python:3.11-slim

# DL3064 is a false alarm here: TOKENIZERS_PARALLELISM names no secret.
# hadolint ignore=DL3064
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HUB_OFFLINE=1 \
    TOKENIZERS_PARALLELISM=false

WORKDIR /app

# CPU builds of torch and torchvision first, from PyTorch's CPU index: from PyPI they would bring several GB of
# CUDA libraries that a CPU container never uses. Same versions as constraints.txt.
ARG TORCH_VERSION=2.14.1
ARG TORCHVISION_VERSION=0.29.1
RUN pip install --index-url https://download.pytorch.org/whl/cpu \
        "torch==${TORCH_VERSION}" "torchvision==${TORCHVISION_VERSION}"

# Then the package with its [serve] extra, pinned like the tests; the torch above already satisfies it.
COPY pyproject.toml README.md constraints.txt ./
COPY show_attend_tell/ show_attend_tell/
# No root inside the container either: the model is read, never written.
RUN pip install -c constraints.txt ".[serve]" \
    && useradd --create-home --uid 10001 captioner
USER 10001

EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4)"]

# Listen on every interface of the container: 127.0.0.1 would be unreachable through the published port.
ENTRYPOINT ["python", "-m", "show_attend_tell.serve"]
CMD ["--model", "/model", "--host", "0.0.0.0", "--port", "8000"]
