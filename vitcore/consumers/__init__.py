"""What reads finished files: tokens.py (TokenFile / open_tokens), dataset.py (TokenDataset),
lm_inputs.py (the language-model hand-off), search.py (similar), index.py (vit-extract index: a faiss index
of the pooled vectors), tensors.py (stored arrays as torch tensors), visualize.py (show). Each asks
the file's encoder family object what it needs; none compares family names."""
