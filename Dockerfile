# One image for every relayq process: the compose file runs relayq-ingest, relayq-router,
# relayq-admin and the demo sink from it, each with its own command.
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY protos/ protos/
# client/protos is a link to ../protos (copied above).
COPY client/ client/
COPY relayq/ relayq/
COPY filterlang/ filterlang/
COPY jobsdb/ jobsdb/
COPY ingest_service/ ingest_service/
COPY router_service/ router_service/
COPY admin_service/ admin_service/
# Two wheels: relayq-client (its build generates relayq/v1 from protos/, client/setup.py) and
# relayq, which depends on it; --no-deps so pip looks for relayq-client nowhere but here.
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels ./client .

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
