"""Gateway: the public API (auth, tenants, RAG orchestration, deadlines) in front of the services."""
