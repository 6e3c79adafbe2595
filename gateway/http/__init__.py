"""The gateway's OpenAI-compatible HTTP API: an ASGI app served by uvicorn beside the gRPC server."""
