"""The mesh's vocabulary: its config, Istio's names and defaults, and their parsers."""
