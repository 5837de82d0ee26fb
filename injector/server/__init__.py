"""The HTTPS server: routes, the ASGI fast path, TLS, workers, logs and metrics."""
