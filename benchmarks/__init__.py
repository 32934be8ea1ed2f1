"""Benchmarks of the pure core (no broker, no database): `python -m benchmarks.<name>`."""
