"""DeepSpeedInference Kubernetes operator (kopf controller)."""
