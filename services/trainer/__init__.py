"""Trainer service: fine-tuning jobs (LoRA and other PEFT methods) and the adapter registry."""
