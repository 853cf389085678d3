# imagequeue API. Build: docker build -t imagequeue-api .   Run: see docker-compose.yml
FROM python:3.11-slim-bookworm AS build
WORKDIR /build
COPY requirements.txt .
RUN python -m venv /opt/venv \
    && /opt/venv/bin/pip install --no-cache-dir --disable-pip-version-check -r requirements.txt

FROM python:3.11-slim-bookworm
# REQUIRE_AUTH_CONFIG: no local secret as on a developer machine; the API refuses to start without JWT_SECRET.
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PATH=/opt/venv/bin:$PATH \
    REQUIRE_AUTH_CONFIG=true
RUN useradd --create-home --uid 10001 --shell /usr/sbin/nologin imagequeue
WORKDIR /app
COPY --from=build /opt/venv /opt/venv
COPY app ./app
COPY worker.py ./
# .data: where a file image store (IMAGE_STORE unset) keeps bytes; mount a volume shared by the API
# and the workers there, or set IMAGE_STORE=s3://... (docker-compose.yml does).
RUN mkdir -p /app/.data/images && chown -R 10001 /app/.data
USER 10001
EXPOSE 8000
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=15s --timeout=5s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4).status != 200)"]
CMD ["uvicorn", "app.main:app", "--host", "0.0.0.0", "--port", "8000", "--no-access-log"]
