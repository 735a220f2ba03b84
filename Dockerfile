# One image for every relayq process: the compose file runs relayq-ingest, relayq-router,
# relayq-admin and the demo sink from it, each with its own command.
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml setup.py README.md ./
COPY protos/ protos/
COPY relayq/ relayq/
COPY jobsdb/ jobsdb/
COPY ingest_service/ ingest_service/
COPY router_service/ router_service/
COPY admin_service/ admin_service/
# The build generates relayq/v1 from protos/ (setup.py), so the wheel carries the gRPC code.
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

FROM python:3.11-slim
RUN useradd --system --create-home --uid 10001 relayq
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels
USER relayq
# Listen on every interface inside the container; the host decides what to publish.
ENV RELAYQ_INGEST_ADDRESS=0.0.0.0:50051 \
    RELAYQ_ADMIN_ADDRESS=0.0.0.0:50052 \
    RELAYQ_ROUTER_ADDRESS=0.0.0.0:50053 \
    RELAYQ_INGEST_METRICS_ADDRESS=0.0.0.0:9151 \
    RELAYQ_ADMIN_METRICS_ADDRESS=0.0.0.0:9152 \
    RELAYQ_ROUTER_METRICS_ADDRESS=0.0.0.0:9153 \
    RELAYQ_LOG_FORMAT=json \
    PYTHONUNBUFFERED=1
EXPOSE 50051 50052 50053 9151 9152 9153 8080
CMD ["relayq-ingest"]
