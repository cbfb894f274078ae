"""Where models and data come from: the zoo, files, Hugging Face folders, GGUF and causal LMs, datasets, and the
PyTorch/ONNX input plumbing (a new source goes here)."""
