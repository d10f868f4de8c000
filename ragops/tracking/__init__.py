"""Feeding ragops' runs and registry into the tools teams already run (MLflow)."""
