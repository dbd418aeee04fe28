"""What reads finished files: tokens.py (TokenFile / open_tokens), dataset.py (TokenDataset),
lm_inputs.py (the language-model hand-off), search.py (similar), visualize.py (show). Each asks
the file's encoder family object what it needs; none compares family names."""
