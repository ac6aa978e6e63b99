"""`mlip serve`: FastAPI app, batching model workers, HTTP and WebSocket APIs."""
