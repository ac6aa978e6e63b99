"""Training and evaluation of mlip potentials on extended-XYZ DFT data."""
