#!/usr/bin/env python3
"""Run nbdev's docs processing on every notebook, as `nbdev_docs` does before Quarto, and report what fails.

    python tools/check_docs.py                     # every notebook under nbs/ (found by globbing)
    python tools/check_docs.py nbs/18_cli.ipynb    # only these

The docs build re-executes, in a fresh namespace, every cell that is an import on its own line, every `#| export`
cell, every `show_doc` cell and every `#| exec_doc` cell, and skips the rest. A lesson cell that imports a name and
then uses a variable from an earlier (skipped) cell fails there with a NameError, which `nbdev_test` cannot see
(it runs every cell). Keep imports in the import cells. One process, output into a temporary folder; prints one
line per notebook and a count, and exits 1 naming the notebook and cell of every failure.
"""
import json, os, sys, tempfile, time, warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def notebooks(nbs: Path) -> list[Path]:
    "The notebooks `nbdev_docs` renders: every `*.ipynb` under `nbs`, skipping names and folders starting with `_` or `.`"
    return sorted(p for p in nbs.rglob("*.ipynb")
                  if not any(part.startswith(("_", ".")) for part in p.relative_to(nbs).parts))


def where(nb: Path, e: Exception) -> str:
    "The failing cell as the notebook numbers it (nbdev counts the show_doc cells it inserted), with its id and first line."
    msg = str(e)
    head, _, src = msg.partition("\n")
    cells = json.loads(nb.read_text(encoding="utf-8"))["cells"]
    code = lambda t: "\n".join(l for l in t.splitlines() if not l.startswith("#|")).strip()  # nbdev drops the directives
    i = next((i for i, c in enumerate(cells) if code("".join(c["source"])) == code(src)), None)
    if i is None: return head.rstrip(" :")
    first = next((l for l in src.splitlines() if not l.startswith("#|")), "")
    return f"cell {i} (id {cells[i].get('id')}: {first.strip()[:60]!r})"


def main():
    os.chdir(ROOT)
    sys.path.insert(0, str(ROOT))  # the notebooks import this checkout's lrp_scratch, as nbdev_test does
    os.environ["IN_TEST"] = "1"    # what nbdev's docs driver sets while it processes a notebook
    from nbdev.serve_drv import exec_nb
    from nbdev.processors import FilterDefaults
    nbs = ROOT / "nbs"
    todo = [Path(a).resolve() for a in sys.argv[1:]] or notebooks(nbs)
    failed, t_all = [], time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for i, nb in enumerate(todo):
            name = nb.relative_to(ROOT)
            t = time.perf_counter()
            with warnings.catch_warnings(record=True) as ws:  # nbdev warns about each cell that mixes imports and code
                warnings.simplefilter("always")
                try: exec_nb(nb, Path(tmp) / f"{i}.ipynb", FilterDefaults)
                except Exception as e:
                    # nbdev's message names the cell and holds its source; the cause is the cell's own exception
                    cause = f"{type(e.__cause__).__name__}: {e.__cause__}" if e.__cause__ else type(e).__name__
                    failed.append(f"{name}, {where(nb, e)}: {cause}")
                    status = f"FAIL {name}, {where(nb, e)}: {cause}"
                else: status = f"ok   {name}"
            mixed = sum("imports and other code" in str(w.message) for w in ws)
            print(f"{status} ({time.perf_counter() - t:.1f} s{f'; {mixed} cells mix imports and code' if mixed else ''})", flush=True)
    print(f"{len(todo) - len(failed)} of {len(todo)} notebooks processed in {time.perf_counter() - t_all:.0f} s"
          + (f"; {len(failed)} failed:" if failed else ""))
    for f in failed: print("  " + f)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
