"""Synthetic playground: tiny random models and generated LLaVA-format data, built offline."""
