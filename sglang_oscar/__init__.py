"""OScaR KV-cache quantization for SGLang."""
