"""ragtune's internal services: retriever, generator and trainer, one folder each."""
