"""The import direction written in docs/architecture.md holds: each module imports only from
layers below its own (imports inside functions count), so data flows one way and no circle can
form. A new module must be placed in a layer here and in the docs."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "seqtrain"


def documented_layers() -> list[list[str]]:
    """The layer table of docs/architecture.md: rows `| n | unit, unit | ... |`, lowest first."""
    text = (ROOT / "docs" / "architecture.md").read_text()
    rows = re.findall(r"^\| (\d+) \| ([^|]+) \|", text, flags=re.MULTILINE)
    return [[u.strip(" `") for u in units.split(",")] for _, units in rows]


def unit_of(path: Path) -> str:
    rel = path.relative_to(PACKAGE).parts
    return rel[0][:-3] if len(rel) == 1 else rel[0]


def imports(path: Path) -> set[str]:
    """seqtrain units a file imports, at any depth of the file."""
    found = set()
    package = ["seqtrain", *path.relative_to(PACKAGE).parts[:-1]]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            names = [module] + [f"{module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        for name in names:
            parts = name.split(".")
            if parts[0] == "seqtrain" and len(parts) > 1:
                found.add(parts[1])
    return found


def test_every_module_imports_only_from_lower_layers() -> None:
    layers = documented_layers()
    level = {unit: k for k, units in enumerate(layers) for unit in units}
    files = [p for p in PACKAGE.rglob("*.py") if unit_of(p) not in ("__init__", "__main__")]
    units = {unit_of(p) for p in files}
    assert units <= set(level), f"not in docs/architecture.md's layer table: {units - set(level)}"
    wrong = []
    for path in files:
        unit = unit_of(path)
        for imported in imports(path) - {unit}:
            if imported in level and level[imported] >= level[unit]:
                wrong.append(f"{unit} (layer {level[unit]}) imports {imported} ({level[imported]})")
    assert not wrong, "; ".join(sorted(set(wrong)))


# seqtrain/data/, by stage: a stage imports only from the stages listed before it.
DATA_STAGES = ["corpus", "files", "sources", "streams", "readers", "synthetic", "cache", "splits"]


def test_each_data_stage_imports_only_from_earlier_stages() -> None:
    folder = PACKAGE / "data"
    assert sorted(DATA_STAGES) == sorted(
        p.stem for p in folder.glob("*.py") if p.stem != "__init__"
    )
    wrong = []
    for k, stage in enumerate(DATA_STAGES):
        tree = ast.parse((folder / f"{stage}.py").read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith(
                "seqtrain.data."
            ):
                other = node.module.split(".")[2]
                if other not in DATA_STAGES[:k]:
                    wrong.append(f"data/{stage}.py imports data/{other}.py")
    assert not wrong, "; ".join(wrong)
