"""The API: the custom resources' pydantic models, labels, defaults and CRD generation."""
