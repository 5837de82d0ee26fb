"""Istio's CA protocol: our .proto and the message classes protoc generates from it."""
