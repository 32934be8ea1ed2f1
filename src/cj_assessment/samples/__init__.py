"""Bundled sample essays: 24 answers of varied quality to one prompt (the demo's input).

The essays live in `essays/essay_NN.txt`; the file stem is the essay id. Quality is deliberately
not encoded in the names and is shuffled across numbers, so nothing downstream can cheat.
"""

from __future__ import annotations

from importlib import resources

SAMPLE_INSTRUCTIONS = (
    "Should schools replace homework with project-based learning? Argue your position."
)


def load_sample_essays() -> dict[str, str]:
    """Essay id (file stem, e.g. ``essay_01``) -> text, in id order."""
    folder = resources.files(__package__).joinpath("essays")
    essays: dict[str, str] = {}
    for entry in folder.iterdir():
        if entry.is_file() and entry.name.endswith(".txt"):
            essays[entry.name.removesuffix(".txt")] = entry.read_text(encoding="utf-8").strip()
    return dict(sorted(essays.items()))
