"""The model zoo: known models, downloaded on demand into the cache."""
