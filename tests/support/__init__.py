"""Helpers shared by Conveyor's test suites."""
