"""Transports: QUIC (aioquic) and an in-memory simulated network."""
