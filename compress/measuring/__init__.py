"""Stage 3, timing: interleaved latency, statistics, the machine's load, memory, the generation runners of language
models, and how two measured cells compare."""
