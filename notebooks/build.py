"""Build the notebooks from their sources in ``notebooks/src`` and execute them, storing outputs.

Sources are plain Python files split into cells by ``# %%`` lines (``# %% [markdown]``
cells hold markdown as ``#``-comments), so notebooks are reviewed as code and rebuilt
with outputs by ``python notebooks/build.py [NAME ...]``.
"""
from __future__ import annotations

import argparse
import pathlib
import sys
from typing import Optional

import nbformat
from nbclient import NotebookClient

HERE = pathlib.Path(__file__).resolve().parent


def cells_of(source: str) -> list[nbformat.NotebookNode]:
    """Split a ``# %%`` source into notebook cells."""
    cells: list[nbformat.NotebookNode] = []
    kind, lines = "code", []

    def flush() -> None:
        text = "\n".join(lines).strip("\n")
        if text:
            if kind == "markdown":
                text = "\n".join(line[2:] if line.startswith("# ") else line.lstrip("#") for line in text.splitlines())
                cells.append(nbformat.v4.new_markdown_cell(text))
            else:
                cells.append(nbformat.v4.new_code_cell(text))

    for line in source.splitlines():
        if line.startswith("# %%"):
            flush()
            kind, lines = ("markdown" if "[markdown]" in line else "code"), []
        else:
            lines.append(line)
    flush()
    return cells


def build(path: pathlib.Path, execute: bool = True, timeout: int = 600) -> pathlib.Path:
    """Write ``notebooks/<name>.ipynb`` from ``notebooks/src/<name>.py``, executed in ``notebooks/``."""
    notebook = nbformat.v4.new_notebook(cells=cells_of(path.read_text()))
    notebook.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    if execute:
        NotebookClient(notebook, timeout=timeout, kernel_name="python3",
                       resources={"metadata": {"path": str(HERE)}}).execute()
    target = HERE / (path.stem + ".ipynb")
    nbformat.write(notebook, target)
    return target


def main(argv: Optional[list[str]] = None) -> None:
    """Command line: build the notebooks named (all of them when none is), refusing unknown names."""
    sources = sorted((HERE / "src").glob("*.py"))
    stems = [source.stem for source in sources]
    parser = argparse.ArgumentParser(prog="python notebooks/build.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="*", metavar="NAME",
                        help=f"notebooks to build (default: every one), among {stems}; "
                             "a .py or .ipynb file name or path of one works too")
    args = parser.parse_args(argv)
    names = [pathlib.Path(name).stem if name.endswith((".py", ".ipynb")) else name for name in args.names]
    unknown = [name for name in names if name not in stems]
    if unknown:
        parser.error(f"NAME: expected some of {stems}, got {unknown}")
    for source in sources:
        if names and source.stem not in names:
            continue
        print("built", build(source), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
