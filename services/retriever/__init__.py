"""Retriever service: tenant-scoped collections, chunking, embedding and hybrid search."""
