"""Compression techniques. Each module registers its passes on import."""
