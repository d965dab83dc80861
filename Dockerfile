# Image for the `nself` binary (gateway `nself claw serve`, projector `nself claw projector`),
# used by compose.yaml. Build: docker build -t nself:local .
FROM rust:1-bookworm AS builder
# cmake + libcurl headers: rdkafka's bundled librdkafka build; libssl-dev: native-tls.
RUN apt-get update \
 && apt-get install -y --no-install-recommends cmake g++ libcurl4-openssl-dev libssl-dev pkg-config \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p nself

FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates curl libcurl4 libssl3 \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --home-dir /var/lib/claw claw \
 && mkdir -p /var/lib/claw && chown claw:claw /var/lib/claw
COPY --from=builder /src/target/release/nself /usr/local/bin/nself
USER claw
WORKDIR /var/lib/claw
ENV CLAW_DATA_DIR=/var/lib/claw
EXPOSE 3713
CMD ["nself", "claw", "serve"]
