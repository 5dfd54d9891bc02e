#!/usr/bin/env python3
"""Offline preview of the docs site's content, for machines without Quarto.

    python tools/preview_docs.py                 # HTML pages in _preview/
    python tools/preview_docs.py --screenshot    # and a PNG of each page (needs Chromium: apt-get install chromium)

It runs nbdev's own docs processing (the same `proc_nbs` that `nbdev_docs` runs before Quarto: it executes
`show_doc`, import and `#| exec_doc` cells and applies the directives), then converts the processed notebooks
to plain HTML with nbconvert. This checks the content of each page (text, API docs, outputs, the C++ source
shown on the Kernels page); the look of the real site comes from Quarto, built by the docs workflow.
"""
import argparse, shutil, subprocess, sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--hide-scrollbars"]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "_preview"))
    ap.add_argument("--screenshot", action="store_true", help="also save a PNG of every page with headless Chromium")
    ap.add_argument("--height", type=int, default=4000, help="screenshot height in pixels")
    a = ap.parse_args()

    import os
    os.chdir(ROOT)
    from nbdev.quarto import refresh_quarto_yml, nbdev_sidebar
    from nbdev.serve import proc_nbs
    refresh_quarto_yml()
    nbdev_sidebar.__wrapped__()
    proc = Path(proc_nbs(n_workers=1))
    out = Path(a.out)
    if out.exists(): shutil.rmtree(out)
    out.mkdir(parents=True)
    nbs = sorted(proc.rglob("*.ipynb"))
    import json
    for nb in nbs:  # nbdev marks show_doc cells with a key that nbformat's schema does not allow: drop it
        d = json.loads(nb.read_text(encoding="utf-8"))
        for c in d["cells"]: c.pop("has_sd", None)
        nb.write_text(json.dumps(d), encoding="utf-8")
    subprocess.run([sys.executable, "-m", "jupyter", "nbconvert", "--to", "html", "--output-dir", str(out),
                    *map(str, nbs)], check=True)
    for f in proc.rglob("*"):  # images and other files the pages link to
        if f.is_file() and f.suffix not in (".ipynb", ".yml", ".css") and ".quarto" not in f.parts:
            dest = out / f.relative_to(proc)
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(f, dest)
    pages = sorted(out.glob("*.html"))
    print("pages:", *[p.name for p in pages], sep="\n  ")
    if a.screenshot:
        chrome = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
        if chrome is None: sys.exit("--screenshot needs Chromium (Debian: apt-get install chromium)")
        for p in pages:
            png = p.with_suffix(".png")
            subprocess.run([chrome, *CHROMIUM_FLAGS, f"--user-data-dir={out/'.chromium'}", f"--window-size=1200,{a.height}",
                            f"--screenshot={png}", p.as_uri()], check=True, capture_output=True, timeout=120)
            print("screenshot:", png.relative_to(ROOT))


if __name__ == "__main__":
    main()
