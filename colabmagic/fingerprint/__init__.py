"""Audio fingerprinting (landmark hashes) on NumPy or CuPy."""
