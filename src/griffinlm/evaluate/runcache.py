"""A cache of study runs keyed by their full configuration, so a re-run computes only what is missing.

A run's key is the SHA-256 of its configuration as canonical JSON (sorted keys): the model config
dict, training settings, data description, seed and evaluation settings. Its result is a JSON file
`{out}/runs/{name}-{key[:16]}.json` holding the configuration and the result, written atomically
(to a temporary file, then renamed), so a study killed mid-way leaves only complete runs behind.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from typing import Any, Callable

# Bumped when what a run computes changes, so older cached results are not reused.
CACHE_VERSION = 1


def config_key(config: dict[str, Any]) -> str:
    """Hex SHA-256 of the configuration as canonical JSON."""
    text = json.dumps({"version": CACHE_VERSION, **config}, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


class RunCache:
    """Completed runs of one study directory.

    Args:
        directory: where run files live (created on first write).
        recompute: ignore stored results (they are overwritten as runs complete).
    """

    def __init__(self, directory: str, recompute: bool = False) -> None:
        self.directory = directory
        self.recompute = recompute
        self.hits = 0
        self.misses = 0

    def path(self, name: str, config: dict[str, Any]) -> str:
        safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", name)[:80]
        return os.path.join(self.directory, f"{safe}-{config_key(config)[:16]}.json")

    def get(self, name: str, config: dict[str, Any]) -> dict[str, Any] | None:
        """The stored result of this exact configuration, or None."""
        if self.recompute:
            return None
        path = self.path(name, config)
        try:
            with open(path) as f:
                record = json.load(f)
        except (OSError, json.JSONDecodeError):
            return None
        if record.get("key") != config_key(config):  # a truncated-key collision or a stale file
            return None
        return record["result"]

    def put(self, name: str, config: dict[str, Any], result: dict[str, Any]) -> str:
        """Stores `result` atomically; returns the file path."""
        os.makedirs(self.directory, exist_ok=True)
        path = self.path(name, config)
        record = {"name": name, "key": config_key(config), "config": config, "result": result}
        fd, tmp = tempfile.mkstemp(prefix=".run-", suffix=".json", dir=self.directory)
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(record, f, indent=1, default=float)
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
        return path

    def run(self, name: str, config: dict[str, Any], compute: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        """The cached result of `config`, computing and storing it if missing."""
        found = self.get(name, config)
        if found is not None:
            self.hits += 1
            return found
        self.misses += 1
        result = compute()
        self.put(name, config, result)
        return result
