"""Errors a user can act on. Each message names what is wrong, where (file, column,
teacher, field) and how to fix it; the CLI prints it without a traceback.

OpdError is the base of every user-facing error in opd (storage is the bottom layer,
so the base lives here and opd_tasks.errors re-exports it)."""


class OpdError(Exception):
    """Base class for user-facing errors."""


class ShardError(OpdError):
    """A Parquet shard that cannot be trusted: corrupt, truncated, wrong schema version or columns, bad values."""


class ManifestError(OpdError):
    """A stage manifest that is unreadable or whose checksums do not match the files."""


class LayoutError(OpdError):
    """A run name or path that is invalid or would escape the run root."""


class DataError(OpdError):
    """A dataset (prompts, offline responses) that is missing, empty, or lacks required columns."""


class StorageError(OpdError):
    """A storage call that kept failing (after retries): unreachable, throttled, or refused."""


class StorageFullError(StorageError):
    """A write refused for lack of space or because the storage is read-only: waiting will not fix it."""
