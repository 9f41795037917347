"""Regenerate the README's pictures from a run, so that they cannot drift from what the tools draw:

- ``docs/viewer.png``: the first screen of ``r3l view RUN_DIR``, shot by headless Chromium;
- ``docs/curves.png``: ``r3l report RUN_DIR``'s curves.

    python scripts/docs_pictures.py                     # from runs/countdown-r3l (the main job) into docs/
    python scripts/docs_pictures.py runs/my-run --out /tmp/pictures --x step

Needs Chromium (Debian: ``apt-get install -y chromium``; ``--chromium PATH`` names another binary).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def find_chromium(given: str | None = None) -> str:
    """The Chromium binary: ``given``, else the first of :data:`BROWSERS` on the PATH."""
    for name in ([given] if given else BROWSERS):
        path = shutil.which(name)
        if path is not None:
            return path
    wanted = given or " / ".join(BROWSERS)
    raise FileNotFoundError(f"no Chromium found ({wanted}): install it (Debian: apt-get install -y chromium) "
                            "or pass --chromium PATH")


def screenshot(chromium: str, page: Path, out: Path, width: int, height: int, timeout_s: float = 120.0) -> Path:
    """A ``width`` × ``height`` screenshot of the local ``page`` by headless Chromium (its scripts run first)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="r3l-chromium-") as profile:
        command = [chromium, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                   "--hide-scrollbars", f"--user-data-dir={profile}", f"--window-size={width},{height}",
                   "--virtual-time-budget=5000", f"--screenshot={out.resolve()}", page.resolve().as_uri()]
        proc = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s)
    if proc.returncode != 0 or not out.is_file():
        raise RuntimeError(f"Chromium could not shoot {page} (exit {proc.returncode}): {proc.stderr[-2000:]}")
    return out


def docs_pictures(run_dir: Path, out_dir: Path, chromium: str, width: int = 1400, height: int = 1100,
                  x: str = "epoch") -> tuple[Path, Path]:
    """Write ``out_dir/viewer.png`` and ``out_dir/curves.png`` from ``run_dir``; returns their paths."""
    from r3l_lightning.report import report
    from r3l_lightning.viewer import write_viewer

    with tempfile.TemporaryDirectory(prefix="r3l-viewer-") as tmp:
        page, _ = write_viewer(run_dir, Path(tmp) / "rollouts.html")
        viewer = screenshot(chromium, page, out_dir / "viewer.png", width, height)
    _, curves = report(run_dir, out_dir / "curves.png", x)
    return viewer, curves


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", nargs="?", default=str(ROOT / "runs" / "countdown-r3l"),
                        help="the run (default runs/countdown-r3l, the main job)")
    parser.add_argument("--out", default=str(ROOT / "docs"), help="folder of the two pictures (default docs/)")
    parser.add_argument("--chromium", help="the Chromium binary (default: the first of %s on the PATH)"
                        % ", ".join(BROWSERS))
    parser.add_argument("--width", type=int, default=1400, help="viewer screenshot width in px (default 1400)")
    parser.add_argument("--height", type=int, default=1100, help="viewer screenshot height in px (default 1100)")
    parser.add_argument("--x", choices=("epoch", "step", "tokens"), default="epoch", help="x axis of curves.png")
    options = parser.parse_args(argv)
    try:
        paths = docs_pictures(Path(options.run_dir), Path(options.out), find_chromium(options.chromium),
                              options.width, options.height, options.x)
    except FileNotFoundError as err:
        parser.exit(2, f"docs_pictures: {err}\n")
    print("\n".join(f"wrote {p}" for p in paths))


if __name__ == "__main__":
    sys.exit(main())
