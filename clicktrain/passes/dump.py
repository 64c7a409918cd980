"""Numbered per-pass debug dump: ``000_trace.txt``, ``001_<pass>.txt``, ...

Each file holds the graph's Python code after that stage and, for the pattern passes,
a per-layer table. Files are written atomically (temp file + rename). ``summarize_dump``
is what ``clicktrain inspect DIR`` prints.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch.fx as fx

from ..util import atomic_write_text

_FILE_RE = re.compile(r"^(\d{3})_(.+)\.txt$")
_STAGE_RE = re.compile(r"^\d{3}_[A-Za-z0-9_]+\.")  # a stage file or one of its extra files


class DumpWriter:
    """Writes the numbered stages of one compilation. A new writer starts at 000 and removes
    the stage files of an earlier compilation in the same directory (other files stay)."""

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)
        if self.directory.exists() and not self.directory.is_dir():
            raise NotADirectoryError(f"debug_dir {self.directory} exists and is not a directory")
        self.directory.mkdir(parents=True, exist_ok=True)
        for f in self.directory.iterdir():
            if _STAGE_RE.match(f.name):
                f.unlink()
        self.counter = 0

    def write(self, stage: str, gm: fx.GraphModule | None, table: str = "", modified: bool = True,
              extra_files: dict[str, str] | None = None) -> Path:
        number = f"{self.counter:03d}"
        self.counter += 1
        parts = [f"# clicktrain dump {number}: {stage}", f"# graph modified: {'yes' if modified else 'no'}"]
        if gm is not None:
            n_nodes = len(gm.graph.nodes)
            parts += [f"# nodes: {n_nodes}", "", gm.code.strip()]
        if table:
            parts += ["", table.rstrip()]
        path = self.directory / f"{number}_{stage}.txt"
        atomic_write_text(path, "\n".join(parts) + "\n")
        for name, text in (extra_files or {}).items():
            atomic_write_text(self.directory / f"{number}_{stage}.{name}", text)
        return path


def summarize_dump(directory: str | os.PathLike) -> str:
    """A short summary of a dump directory: one line per stage, then the last layer table."""
    directory = Path(directory)
    files = sorted(f for f in directory.iterdir() if _FILE_RE.match(f.name)) if directory.is_dir() else []
    if not files:
        raise FileNotFoundError(f"{directory} holds no clicktrain dump files (NNN_<stage>.txt)")
    lines = [f"clicktrain dump {directory} ({len(files)} stages)"]
    last_table = ""
    for f in files:
        text = f.read_text()
        header = dict(re.findall(r"^# (graph modified|nodes): (.+)$", text, flags=re.M))
        table_at = text.find("\n## ")
        extras = sorted(p.name for p in directory.glob(f.stem + ".*") if p.suffix != ".txt")
        lines.append(f"  {f.stem:<34} nodes={header.get('nodes', '-'):>4}  modified={header.get('graph modified', '-'):<3}"
                     + (f"  +{len(extras)} files" if extras else ""))
        if table_at >= 0:
            last_table = f"{f.stem}:\n" + text[table_at + 1:]
    if last_table:
        lines += ["", last_table.rstrip()]
    return "\n".join(lines)
