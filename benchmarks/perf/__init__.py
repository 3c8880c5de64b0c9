"""Performance and accuracy benchmarks."""
