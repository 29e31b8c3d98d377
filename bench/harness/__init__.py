"""Peer-comparison benchmark harness for Conveyor (see bench/README.md)."""
