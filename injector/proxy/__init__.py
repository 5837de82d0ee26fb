"""The sidecar's proxy: Envoy's bootstrap and the agent that keeps its certificate fresh."""
