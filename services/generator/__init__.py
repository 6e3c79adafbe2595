"""Generator service: vLLM serving the base model and LoRA adapters, with streaming."""
