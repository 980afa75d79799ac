"""TMR method core: pure PyTorch + transformers + diffusers + stanza (no Ray, no MLflow)."""
