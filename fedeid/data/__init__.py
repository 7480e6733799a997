"""Images with known patient identity and findings: the synthetic benchmark and real-data loaders."""

from fedeid.data.imageset import ImageSet

__all__ = ["ImageSet"]
