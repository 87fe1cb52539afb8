"""Errors that name the file, the record and the field at fault."""

from __future__ import annotations

from pathlib import Path


class RaydpoError(Exception):
    """Base class of every error raydpo raises on purpose."""


class DataError(RaydpoError, ValueError):
    """Bad input data.

    The message always starts with where the problem is: ``FILE: record R, field 'F': what``.
    """

    def __init__(
        self,
        message: str,
        *,
        path: str | Path | None = None,
        record: int | str | None = None,
        field: str | None = None,
    ) -> None:
        self.path = str(path) if path is not None else None
        self.record = record
        self.field = field
        self.reason = message
        where = []
        if self.path is not None:
            where.append(self.path)
        loc = []
        if record is not None:
            loc.append(f"record {record}")
        if field is not None:
            loc.append(f"field '{field}'")
        if loc:
            where.append(", ".join(loc))
        prefix = ": ".join(where)
        super().__init__(f"{prefix}: {message}" if prefix else message)
