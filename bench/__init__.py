"""reasoncache benchmarks: ``python -m bench kernel [--quick] [--device cpu|cuda] [--out FILE]``."""
