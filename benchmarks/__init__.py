"""Benchmarks: scripts run from the repository root (`python benchmarks/<name>.py --help`)."""
