"""Exports of a model folder for other runtimes: one GGUF file (llama.cpp, ollama) or an ONNX folder with
past key values (ONNX Runtime). Each records the source folder's sha256 and the export settings, and is
written atomically through :mod:`kdcode.models.artifacts`. ``kdcode.inference.backends`` runs them."""
