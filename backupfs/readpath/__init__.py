"""readpath."""
