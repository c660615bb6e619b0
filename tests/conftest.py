"""Shared fixtures. Engines are real (the embedded packs) and load once per test session."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import pytest

from stemme.config import EngineConfig
from stemme.engines import Engines

DATA = Path(__file__).parent / "data"
SPEECH = DATA / "speech"
TIMEOUT_FACTOR = float(os.environ.get("STEMME_TEST_TIMEOUT_FACTOR", "1"))
"""Scales every timeout in the tests (slow CI machines)."""


def timeout(seconds: float) -> float:
    return seconds * TIMEOUT_FACTOR


@pytest.fixture(scope="session")
def engines() -> Engines:
    return Engines(EngineConfig.from_env())


@pytest.fixture(scope="session")
def manifest() -> list[dict[str, str]]:
    with open(SPEECH / "manifest.tsv", newline="") as f:
        return list(csv.DictReader(f, delimiter="\t"))


@pytest.fixture(scope="session")
def sentences() -> dict[str, list[str]]:
    return json.loads((DATA / "sentences.json").read_text())


def http_get(url: str, seconds: float = 10) -> tuple[int, str]:
    """(status, body) of a GET, error statuses included."""
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=seconds) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()
