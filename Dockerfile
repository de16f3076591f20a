# The relay's container image: nothing but the binary, the shared libraries it links and the
# CA certificates, on `scratch` (no base image, so no registry is needed). Build it with
# .ci/build-relay-image.sh, which prepares the context (target/relay-image/rootfs) and runs
#   docker build -f Dockerfile target/relay-image
# Use:
#   docker run --network host -v /etc/matrix-synapse:/etc/matrix-synapse:ro \
#     -v /etc/synapse-account-data-relay:/etc/synapse-account-data-relay:ro \
#     synapse-account-data-relay run --config /etc/synapse-account-data-relay/config.toml
FROM scratch
COPY rootfs/ /
ENV SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt
# nobody:nogroup; configuration files must be readable by it.
USER 65534:65534
EXPOSE 9109
ENTRYPOINT ["/usr/bin/synapse-account-data-relay"]
CMD ["--help"]
