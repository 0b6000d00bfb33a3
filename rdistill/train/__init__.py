"""Branch training: Ray Train TorchTrainer jobs whose workers run DeepSpeed SFT."""
