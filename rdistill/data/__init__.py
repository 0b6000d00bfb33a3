"""SFT data for branch training: chat-template tokenization with an assistant-only loss mask,
and neat packing (several samples per row, no attention across them)."""
