"""Render a report page in headless Chromium and check that it is not blank (figures load, tables show)."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

from suite.errors import PruneBenchError

# closed network: without the background-networking flags Chromium keeps dialling out and stalls
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync", "--hide-scrollbars"]


def chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if found := shutil.which(name):
            return found
    return None


def screenshot(page: Path, png: Path, width: int = 1280, height: int = 4000, timeout: float = 120) -> Path:
    """A full-width PNG of `page` as Chromium draws it (images decoded, layout done)."""
    browser = chromium()
    if browser is None:
        raise PruneBenchError("headless Chromium is not installed (Debian: apt-get install chromium)")
    with tempfile.TemporaryDirectory() as profile:
        cmd = [browser, *FLAGS, f"--user-data-dir={profile}", f"--window-size={width},{height}",
               f"--screenshot={png.resolve()}", "--virtual-time-budget=5000", page.resolve().as_uri()]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if not png.is_file():
        raise PruneBenchError(f"Chromium wrote no screenshot (exit {done.returncode}): {done.stderr.strip()[-300:]}")
    return png


def ink(png: Path) -> float:
    """Fraction of pixels that are not (near) white: 0 for a blank page."""
    import matplotlib.image

    pixels = matplotlib.image.imread(str(png))[..., :3]
    return float((pixels.min(axis=-1) < 0.9).mean())


def images_drawn(png: Path, min_colour: float = 0.002) -> bool:
    """Figures are colour; text and rules are grey. Coloured pixels mean the page's images were loaded."""
    import matplotlib.image

    pixels = matplotlib.image.imread(str(png))[..., :3]
    chroma = pixels.max(axis=-1) - pixels.min(axis=-1)
    return float((chroma > 0.15).mean()) >= min_colour
