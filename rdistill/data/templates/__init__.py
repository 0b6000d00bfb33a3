"""Chat templates rdistill ships for training (render SFT samples), by name."""
