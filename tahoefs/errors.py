"""The exception hierarchy. Errors are raised typed and mapped once, at the edge:
exit code + one line in the CLI, errno in the FUSE layer.

    TahoefsError
    ├── UsageError          bad input from the user (exit 2): malformed cap, missing file, bad config
    │   └── BadCapError
    └── GridError           the operation failed (exit 1)
        ├── UploadUnhappyError   fewer than `happy` nodes committed a share
        │   └── GridFullError    ... because nodes are out of space
        ├── NotEnoughSharesError fewer than k good shares could be found/fetched
        └── NodeError            one node misbehaved (internal; routed around by the grid layer)
            └── IntegrityError   data from a node failed verification
"""

import contextlib
from collections.abc import Iterator


class TahoefsError(Exception):
    """Base of every error tahoefs raises on purpose."""


class UsageError(TahoefsError):
    """The user asked for something malformed or impossible; nothing on the grid is wrong."""


class BadCapError(UsageError):
    """A capability string could not be parsed."""


class GridError(TahoefsError):
    """A grid operation failed: not enough nodes, not enough shares, integrity failure."""


class UploadUnhappyError(GridError):
    """Fewer than `happy` distinct nodes committed a share; nothing is promised stored."""


class GridFullError(UploadUnhappyError):
    """The upload failed because nodes refused for lack of space (maps to ENOSPC)."""


class NotEnoughSharesError(GridError):
    """Fewer than k verified shares could be found or fetched; the data cannot be read now."""


class NodeError(GridError):
    """One node failed a request: unreachable, refused, stalled or answered nonsense."""

    def __init__(self, node: str, message: str) -> None:
        super().__init__(f"{node}: {message}")
        self.node = node
        self.reason = message


class NodeFullError(NodeError):
    """The node answered 507: not enough free space."""


class IntegrityError(NodeError):
    """Bytes from a node did not match the hashes pinned by the capability."""


def _leaves(exc: BaseException) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for sub in exc.exceptions for leaf in _leaves(sub)]
    return [exc]


def most_telling(exc: BaseException) -> BaseException:
    """The one error to report out of an exception group from a trio nursery: a KeyboardInterrupt, else
    the first TahoefsError, else the first error that is not a cancellation; `exc` itself if not a group."""
    if not isinstance(exc, BaseExceptionGroup):
        return exc
    leaves = _leaves(exc)
    for kind in (KeyboardInterrupt, TahoefsError):
        for leaf in leaves:
            if isinstance(leaf, kind):
                return leaf
    for leaf in leaves:
        if type(leaf).__name__ != "Cancelled":
            return leaf
    return exc


@contextlib.contextmanager
def ungrouped() -> Iterator[None]:
    """Re-raise an exception group escaping the block as its most telling member, so callers of the
    grid layer see one typed error, never a trio ExceptionGroup."""
    try:
        yield
    except BaseExceptionGroup as group:
        raise most_telling(group) from group


class PathError(UsageError):
    """A name or path that does not fit the tree; `errno` is what the FUSE layer answers."""

    errno = 0


class NoSuchEntryError(PathError):
    errno = 2  # ENOENT


class EntryExistsError(PathError):
    errno = 17  # EEXIST


class NotADirError(PathError):
    errno = 20  # ENOTDIR


class ReadOnlyError(PathError):
    """A write through a read-only capability."""

    errno = 30  # EROFS
