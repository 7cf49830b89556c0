"""Beyond distillation: int8 weights, structured pruning, dtype casts; each step recorded in the manifest chain."""
