# syntax=docker/dockerfile:1
#
# reshard in a container: docker build -t reshard . && docker run -v ./reshard.toml:/etc/reshard/reshard.toml:ro -v reshard-data:/var/lib/reshard -p 6433:6433 -p 9187:9187 reshard
# In the mounted config, set [admin] listen = "0.0.0.0:6433" and metrics = "0.0.0.0:9187"
# (the defaults listen on the container's loopback only) and an admin password.

FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p reshard-cli \
 && install -m 0755 target/release/reshard /usr/local/bin/reshard

FROM debian:bookworm-slim
# ca-certificates: TLS to managed PostgreSQL; postgresql-client: psql for the admin console
# and pg_isready for debugging inside the container.
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates postgresql-client \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 reshard \
 && useradd --system --uid 10001 --gid reshard --home-dir /var/lib/reshard \
      --shell /usr/sbin/nologin reshard \
 && mkdir -p /etc/reshard /var/lib/reshard \
 && chown reshard:reshard /var/lib/reshard
COPY --from=build /usr/local/bin/reshard /usr/local/bin/reshard
COPY deploy/reshard.example.toml /etc/reshard/reshard.example.toml

USER reshard
WORKDIR /var/lib/reshard
# The spill log: reshard's only local state. Keep it on a persistent volume.
VOLUME ["/var/lib/reshard"]
# 6433: admin console (PostgreSQL protocol); 9187: /metrics, /healthz, /readyz.
EXPOSE 6433 9187
ENV RESHARD_LOG_FORMAT=json
# /healthz without curl (not in the slim image): bash's /dev/tcp.
HEALTHCHECK --interval=10s --timeout=5s --retries=3 \
  CMD ["bash", "-c", "exec 3<>/dev/tcp/127.0.0.1/9187 && printf 'GET /healthz HTTP/1.0\\r\\n\\r\\n' >&3 && grep -q '200 OK' <&3"]
# SIGTERM (docker stop) shuts down cleanly: batches finish, the spill log is flushed.
STOPSIGNAL SIGTERM
ENTRYPOINT ["reshard"]
CMD ["run", "-c", "/etc/reshard/reshard.toml"]
