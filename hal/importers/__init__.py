"""Importers of models from other frameworks into hal specs (each imports its framework lazily)."""
