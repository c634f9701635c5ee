"""Memory profiling of whole models: ``fused-attn profile-memory``."""
