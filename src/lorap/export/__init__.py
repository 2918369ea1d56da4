"""Export for serving engines: GGUF (llama.cpp) and the DeciLM layout (vLLM)."""
