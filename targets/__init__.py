"""Backends. Each module registers one target; heavy libraries are imported lazily."""
