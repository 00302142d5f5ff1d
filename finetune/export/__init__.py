"""Export stage: GGUF for llama.cpp/Ollama (`gguf`, `gguf_writer`) and the vLLM serve command (`vllm`)."""
