"""The package's layering, read from the sources: the backends (reference.py, ops/) and the component
functions depend on the contract module, never on the nn.Module file that produces the parameters, and the
contract module is a leaf."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "spectraformer_fused"


def _imported_modules(path: Path) -> set[str]:
    """The package modules a file imports, as dotted names relative to the package ("feature_map", ...)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level > 0:
            parts = path.parent.relative_to(PACKAGE).parts  # "from ." is this folder, "from .." its parent
            here = parts[: len(parts) - node.level + 1]
            base = ".".join((*here, node.module) if node.module else here)
            names.update({base} if node.module else {f"{base}.{a.name}".lstrip(".") for a in node.names})
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("spectraformer_fused"):
            names.add(node.module.removeprefix("spectraformer_fused").lstrip("."))
    return names


BACKENDS = [
    "reference.py",
    "components.py",
    *(str(p.relative_to(PACKAGE)) for p in sorted((PACKAGE / "ops").rglob("*.py"))),
]


@pytest.mark.parametrize("name", BACKENDS)
def test_backends_depend_on_the_contract_not_on_feature_map(name):
    imported = _imported_modules(PACKAGE / name)
    assert not {m for m in imported if m == "feature_map" or m.startswith("feature_map.")}, (
        f"{name} imports feature_map: {sorted(imported)}"
    )


def test_the_contract_module_is_a_leaf():
    imported = _imported_modules(PACKAGE / "contract.py")
    assert not imported, f"contract.py imports package modules: {sorted(imported)}"


def test_the_reader_sees_every_import():
    """The reader of imports itself: feature_map.py's imports include the contract and components."""
    imported = _imported_modules(PACKAGE / "feature_map.py")
    assert {"contract", "components"} <= imported, sorted(imported)
    assert "contract" in _imported_modules(PACKAGE / "ops" / "triton" / "common.py")
