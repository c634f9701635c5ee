"""Benchmark harness and suites behind ``fused-attn bench``."""
