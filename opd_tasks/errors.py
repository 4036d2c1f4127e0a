"""User-facing errors of the work layer (see storage.errors for the base and storage errors)."""
from storage.errors import DataError, LayoutError, ManifestError, OpdError, ShardError

__all__ = ["OpdError", "ShardError", "ManifestError", "LayoutError",
           "TokenizerMismatchError", "ModelPathError", "DataError"]


class TokenizerMismatchError(OpdError):
    """A teacher or reference whose tokenizer differs from the student's."""


class ModelPathError(OpdError):
    """A model path that does not exist or does not hold an HF model."""
