"""Images in the decoding workers: decode.py turns an input's bytes into the upright RGB picture;
loader.py is the Dataset and DataLoader that run an encoder's worker side and carry failures as
records. What an encoder does after decoding (resize, patches) is its own processor."""

# How decode.py scales high bit depths, as a file's preprocessing record says it (Pillow-free here,
# so the store can compare records without loading Pillow).
HIGH_BIT_DEPTH = ("16-bit as the file declares it (I;16, 16-bit PNG, PGM/PPM by maxval, TIFF by BitsPerSample) /257, "
                  "a 16-bit tRNS colour as transparent; other I and F by value range (see README)")
