"""Small shared helpers with no Kubernetes or kopf dependency: RFC 3339 times, pydantic error
messages, JSON merge patches. Importable from the worker image (standard library and pydantic
only)."""
