"""Evaluation: the same questions through base, RAG, fine-tuned and RAG + fine-tuned, measured and compared."""
