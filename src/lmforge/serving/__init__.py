"""Inference: the generation engine and the OpenAI-compatible HTTP server."""
