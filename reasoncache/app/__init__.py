"""The application layer, on top of the op, the HF integration and the cache: data,
training, evaluation, tasks, offline model loading, baselines, the demo and the CLI."""
