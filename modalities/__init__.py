"""Modality plugins: each subpackage implements the core's Modality protocol."""
