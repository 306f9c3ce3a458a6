"""RDMA transport (pyverbs). For now only the availability check."""
from __future__ import annotations

__all__ = ["rdma_available"]


def rdma_available() -> tuple[bool, str]:
    """(True, "rdma: ...devices...") where pyverbs sees an RDMA device, else (False, why)."""
    try:
        from pyverbs import device
    except ImportError:
        return False, "rdma: pyverbs not installed"
    except Exception as exc:  # a broken install (missing libibverbs, ...)
        return False, f"rdma: pyverbs failed to load: {exc}"
    try:
        devices = device.get_device_list()
    except Exception as exc:
        return False, f"rdma: cannot list RDMA devices: {exc}"
    if not devices:
        return False, "rdma: no RDMA device found"
    names = []
    for dev in devices:
        name = getattr(dev, "name", dev)
        names.append(name.decode() if isinstance(name, bytes) else str(name))
    return True, f"rdma: {len(names)} device(s): {', '.join(names)}"
