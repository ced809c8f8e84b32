"""Screenshot a report as a reader's browser shows it: headless Chromium, 1280 px wide.

    python tools/screenshot_report.py runs/image/report.html --out runs/image/report-first-screen.png
    python tools/screenshot_report.py runs/image/report.html --height 9000 --out full.png   # the whole page

The first screen (1280 x 900) is what a reader sees before scrolling: the verdict must be in it.
Chromium comes from the Debian packages (`apt-get install chromium`); without it this exits with one
error line.
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def find_browser() -> str | None:
    return next((path for name in BROWSERS if (path := shutil.which(name))), None)


def screenshot(page: Path, out: Path, width: int = 1280, height: int = 900, timeout: float = 120) -> Path:
    """Render ``page`` (a local HTML file) and write a ``width`` x ``height`` PNG to ``out``."""
    browser = find_browser()
    if browser is None:
        raise RuntimeError("no Chromium found; install it with `apt-get install chromium`")
    page, out = Path(page).resolve(), Path(out).resolve()
    if not page.is_file():
        raise FileNotFoundError(f"no report at {page}")
    with tempfile.TemporaryDirectory() as profile:  # a throwaway profile: no state shared between runs
        cmd = [browser, "--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
               f"--user-data-dir={profile}", f"--window-size={width},{height}", f"--screenshot={out}",
               page.as_uri()]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0 or not out.is_file():
        raise RuntimeError(f"chromium failed ({done.returncode}): {done.stderr.strip()[-300:]}")
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("page", type=Path)
    ap.add_argument("--out", type=Path, default=Path("report-screenshot.png"))
    ap.add_argument("--width", type=int, default=1280)
    ap.add_argument("--height", type=int, default=900)
    args = ap.parse_args()
    try:
        print(screenshot(args.page, args.out, args.width, args.height))
    except (RuntimeError, OSError, subprocess.TimeoutExpired) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
