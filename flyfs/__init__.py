"""flyfs: a distributed parallel file system in Python, in the lineage of 3FS."""

__version__ = "0.1.0"
from .client import connect
