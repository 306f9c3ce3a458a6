"""flyfs: a distributed parallel file system in Python, in the lineage of 3FS.

    import flyfs
    fs = flyfs.connect("127.0.0.1:8000")   # the cluster manager's address
"""

from .client import connect

__version__ = "0.1.0"
__all__ = ["connect", "__version__"]
