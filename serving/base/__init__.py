"""The TF-free base every layer imports and a bento ships: errors, image decoding, atomic storage,
machine facts, the model manifest and the runtime formats table."""
