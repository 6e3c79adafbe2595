"""Vector store backends behind one small interface (`backends.base.VectorStore`)."""
