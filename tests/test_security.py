"""Security rules that must stay true as the code grows: YAML is only read safely, and
weights are only loaded with ``weights_only=True``. (The dashboard's default bind to
127.0.0.1 is checked in test_dashboard.py, on a real server.)"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SOURCES = sorted(
    p for d in ("tuner", "objectives", "search_spaces") for p in (ROOT / d).rglob("*.py")
)


def calls(path: Path, name: str) -> list[ast.Call]:
    """Every call of ``module.name(...)`` (like yaml.load) in a source file."""
    tree = ast.parse(path.read_text(), filename=str(path))
    return [
        node for node in ast.walk(tree)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
        and node.func.attr == name
    ]  # fmt: skip


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_yaml_is_only_read_with_a_safe_loader(path: Path) -> None:
    for call in calls(path, "load") + calls(path, "unsafe_load") + calls(path, "full_load"):
        target = ast.unparse(call.func)
        if target.startswith("yaml."):
            loader = {k.arg: ast.unparse(k.value) for k in call.keywords}.get("Loader", "")
            # yaml.load only with our SafeLoader subclass; never unsafe_load or full_load.
            assert target == "yaml.load" and loader == "_Loader", f"{path}:{call.lineno}"


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_weights_are_only_loaded_with_weights_only(path: Path) -> None:
    for call in calls(path, "load"):
        if ast.unparse(call.func) == "torch.load":
            keywords = {k.arg: ast.unparse(k.value) for k in call.keywords}
            # A pickle in a weights file can run code; weights_only refuses it.
            assert keywords.get("weights_only") == "True", f"{path}:{call.lineno}"
