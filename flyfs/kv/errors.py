"""Errors raised by the transactional KV layer."""


class KVError(Exception):
    """Base class for every KV error."""


class InvalidKey(KVError, ValueError):
    """A key is not bytes, is empty, or is too long."""


class InvalidValue(KVError, ValueError):
    """A value is not bytes or is too large."""


class TransactionTooLarge(KVError):
    """A transaction exceeds what the engine can commit atomically."""


class TransactionConflict(KVError):
    """A transaction conflicted with a concurrent one.

    Raised inside the runner to trigger a retry; escapes `transact` only when
    the retries are exhausted, naming the keys that conflicted.
    """

    def __init__(self, keys=(), message: str | None = None):
        self.keys = tuple(keys)
        shown = ", ".join(repr(k) for k in self.keys[:5])
        more = f" (+{len(self.keys) - 5} more)" if len(self.keys) > 5 else ""
        super().__init__(message or f"transaction conflict on {shown or 'unknown keys'}{more}")


class EngineUnavailable(KVError):
    """The engine cannot be opened or reached (owned by another process, server down)."""
