"""Helpers that are not part of the model: visualisation."""
