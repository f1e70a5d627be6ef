"""Parameter-efficient and partial fine-tuning: adapters and trainable-parameter selection."""
