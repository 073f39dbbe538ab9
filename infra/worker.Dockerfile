# The HERO worker image: the package, its pinned dependencies and CUDA torch. It runs Prefect workers
# (`prefect worker start --pool …`), the webhook receiver and any `hero` command.
#   docker build -f infra/worker.Dockerfile -t hero-worker:0.1.0 .
FROM python:3.11.14-slim-bookworm

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1 \
    PREFECT_HOME=/var/lib/hero/prefect MLFLOW_DISABLE_TELEMETRY=true
WORKDIR /app
# torch first and alone, from the CUDA index, at the tested version (constraints.txt pins the rest)
COPY constraints.txt pyproject.toml README.md ./
RUN grep '^torch==' constraints.txt | sed 's/+cpu//' > /tmp/torch.txt \
    && pip install -r /tmp/torch.txt --index-url https://download.pytorch.org/whl/cu128
COPY hero_ml ./hero_ml
COPY flows ./flows
COPY label_studio ./label_studio
RUN grep -v '^torch==' constraints.txt > /tmp/constraints.txt \
    && pip install -c /tmp/constraints.txt . \
    && useradd --create-home --uid 1000 hero && mkdir -p /var/lib/hero /models \
    && chown hero /var/lib/hero /models
USER hero
# `hero deploy --source /app` in this image points deployments at this code
CMD ["prefect", "worker", "start", "--pool", "hero-gpu", "--type", "process"]
