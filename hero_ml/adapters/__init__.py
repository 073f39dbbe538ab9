"""Adapters to the outside world (storage, tracking, Label Studio), each behind a small protocol."""
