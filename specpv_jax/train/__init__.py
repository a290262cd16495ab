"""Training: the demo target (causal LM), EAGLE-3 heads (training-time test), YaRN long-context fine-tunes.

Modules: `corpus` (the standard library as a corpus), `tokenizer` (byte-level
BPE), `trainer` (the optax loop), `lm` (target LM), `eagle` (EAGLE-3 head).
"""
