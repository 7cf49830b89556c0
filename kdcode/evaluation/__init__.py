"""Measuring models: completion sets, CodeXGLUE-exact metrics, evaluation, perplexity, benchmarks. Trains nothing."""
