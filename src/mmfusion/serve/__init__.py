"""The HTTP service: FastAPI app, request limits, settings and the micro-batcher in front of the models."""
