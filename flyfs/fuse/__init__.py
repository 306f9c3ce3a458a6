"""The flyfs FUSE mount (fuse-python, libfuse 2 high-level API) on top of flyfs.client.

    flyfs mount --cluster 127.0.0.1:8000 /mnt/flyfs      # daemon; -f to stay in the foreground
    flyfs umount /mnt/flyfs

ops.py maps FUSE operations to the client; mount.py is the command line.
This package is flyfs.fuse: inside it, ``import fuse`` (absolute) is fuse-python.
"""
