"""Reference model: procedural data (data.py), a deterministic judge (judge.py), the SD3
pipeline's configs and tokenizers (build.py, tokenizer.py), training (train.py) and the
held-out evaluation (evaluate.py). data.py, judge.py and tokenizer.py need no diffusers."""
