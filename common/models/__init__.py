"""Built-in model families and loading of registered model artifacts."""
