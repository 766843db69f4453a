"""Declarative backup runner: all logic lives here; tasks.py is a thin Invoke layer."""
