"""Running models: one loader for every command, decoding as functions, the completion engine, the server."""
