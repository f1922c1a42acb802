"""What acts on an exported model: export (SavedModel, ONNX, fp16, int8), the one loader of every
runtime, evaluation and its page, explain, bench, and the compare report."""
