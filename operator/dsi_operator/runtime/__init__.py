"""The I/O shell: kopf handlers, the controller loop, the Kubernetes client and metrics."""
