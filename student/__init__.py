"""The causal STFT FNet student: model, losses, training loop, evaluation."""
