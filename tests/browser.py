"""Headless Chromium for the page tests: the rendered DOM and a screenshot of a URL.

Tests that need it skip where /usr/bin/chromium is missing, except under
TUNER_REQUIRE_CHROMIUM=1 (CI), where they fail.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from PIL import Image

CHROMIUM = "/usr/bin/chromium"


def chromium() -> str:
    """The Chromium binary, or skip (fail under TUNER_REQUIRE_CHROMIUM=1)."""
    if Path(CHROMIUM).is_file():
        return CHROMIUM
    if os.environ.get("TUNER_REQUIRE_CHROMIUM") == "1":
        pytest.fail(f"Chromium is required (TUNER_REQUIRE_CHROMIUM=1) and {CHROMIUM} is missing")
    pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install chromium)")


def render(url: str, screenshot: Path, height: int = 900) -> str:
    """Load ``url`` headless, let its scripts run, save a screenshot; return the DOM."""
    binary = chromium()
    result = subprocess.run(
        [
            binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
            "--no-first-run", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--disable-dev-shm-usage",
            f"--user-data-dir={screenshot.parent / (screenshot.stem + '-profile')}",
            f"--window-size=1280,{height}", "--virtual-time-budget=8000",
            f"--screenshot={screenshot}", "--dump-dom", url,
        ],
        capture_output=True, text=True, timeout=90,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    assert screenshot.is_file(), result.stderr[-2000:]
    return result.stdout


def colours(png: Path) -> int:
    """How many colours a screenshot has (1: a blank page)."""
    with Image.open(png) as image:
        found = image.convert("RGB").getcolors(maxcolors=1 << 20)
    return len(found) if found is not None else 1 << 20
