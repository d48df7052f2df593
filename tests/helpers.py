"""Small helpers several test files share (fixtures live in conftest.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from diffusers import StableDiffusionPipeline

REPO_ROOT = Path(__file__).resolve().parents[1]


def run_chexmem(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """`python -m scripts.cli ARGS` as a user runs it (offline, one thread), in `cwd`."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": str(REPO_ROOT)}  # fmt: skip
    return subprocess.run([sys.executable, "-m", "scripts.cli", *args], capture_output=True,
                          text=True, env=env, cwd=cwd or REPO_ROOT, timeout=600)  # fmt: skip


def assert_one_line_error(result: subprocess.CompletedProcess, *needles: str) -> str:
    """Exit code 2, no traceback, and one `chexmem: error:` line holding every needle."""
    assert result.returncode == 2, (result.returncode, result.stderr[-3000:])
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("chexmem: error:")]
    assert len(errors) == 1, result.stderr[-3000:]
    assert result.stderr.rstrip().endswith(errors[0]), result.stderr[-3000:]
    for needle in needles:
        assert needle in errors[0], errors[0]
    return errors[0]


def load_plain(folder: Path) -> StableDiffusionPipeline:
    """A model as plain diffusers loads it, progress bars off."""
    pipe = StableDiffusionPipeline.from_pretrained(folder, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync"]  # fmt: skip
PAGE_STATE = """() => ({
  images: [...document.images].map(i => i.complete && i.naturalWidth > 0),
  links: [...document.querySelectorAll('nav.toc a')]
    .map(a => document.getElementById(a.getAttribute('href').slice(1)) !== null),
  widest: Math.max(...[...document.images].map(i => i.clientWidth)),
  main: document.querySelector('main').clientWidth,
})"""


def open_in_chromium(html: Path, screenshot: Path) -> tuple[dict, list[str]]:
    """Load a page in headless Chromium (Debian's, driven by Playwright): what rendered, and
    every URL it requested; skips when either is missing."""
    import os

    import pytest

    missing = pytest.fail if os.environ.get("CI") else pytest.skip  # CI must really render
    try:
        from playwright import sync_api
    except ImportError:
        missing("playwright is not installed (pip install -e '.[dev]')")
    if not CHROMIUM.exists():
        missing(f"no Chromium at {CHROMIUM} (apt-get install chromium)")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), headless=True,
                                    args=CHROMIUM_ARGS)  # fmt: skip
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            requests: list[str] = []
            page.on("request", lambda request: requests.append(request.url))
            page.goto(html.as_uri(), wait_until="load")
            state = page.evaluate(PAGE_STATE)
            page.screenshot(path=str(screenshot), full_page=True)
        finally:
            browser.close()
    return state, requests
