"""A run's settings and resources: the frozen Plan, the options, the compiled losses, the memory estimates."""
