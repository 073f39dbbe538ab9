"""Prefect flows: they only orchestrate hero_ml (see docs/ARCHITECTURE.md)."""
