"""Vector-store protocol and Qdrant backends."""
