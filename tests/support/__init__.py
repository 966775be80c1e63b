"""Shared helpers for tests (real QUIC pairs over loopback UDP)."""
