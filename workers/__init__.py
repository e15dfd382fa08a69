"""Plain worker classes (wrapped with ray.remote by jobs/): load a model once, decode shards, write results."""
