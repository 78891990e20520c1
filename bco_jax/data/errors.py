"""Bad-input reporting: the exception types of bad data (DataError) and of options that do not fit
the data (ConfigError), and a collector that either stops or counts.

Every malformed record is named by where it came from ("file.jsonl:12", "dir row 7") and why, so
a user can fix the file; with skip_invalid the same findings are kept and reported instead.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

from bco_jax.errors import ConfigError, DataError

log = logging.getLogger("bco_jax.data")

__all__ = ["ConfigError", "DataError", "Issues"]


@dataclass
class Issues:
    """Collects malformed records; raises on the first one unless skipping is allowed."""

    skip_invalid: bool = False
    found: list[tuple[str, str]] = field(default_factory=list)

    def bad(self, where: str, reason: str) -> None:
        if not self.skip_invalid:
            raise DataError(f"{where}: {reason} (set skip_invalid=true to skip such records)")
        self.found.append((where, reason))

    def summary(self, limit: int = 20) -> str:
        if not self.found:
            return "no invalid records"
        lines = [f"skipped {len(self.found)} invalid record(s):"]
        lines += [f"  {w}: {r}" for w, r in self.found[:limit]]
        if len(self.found) > limit:
            lines.append(f"  ... and {len(self.found) - limit} more")
        return "\n".join(lines)
