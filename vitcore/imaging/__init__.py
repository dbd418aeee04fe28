"""Images in the decoding workers: decode.py turns an input's bytes into the upright RGB picture;
loader.py is the Dataset and DataLoader that run an encoder's worker side and carry failures as
records. What an encoder does after decoding (resize, patches) is its own processor."""
