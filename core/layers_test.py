"""The import contracts of pyproject.toml hold: each layer imports only the layers below it, and
only the lab, the CLI and tests import the simulator (import-linter, on the source as it is)."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _toml_list(items: list[str]) -> str:
    return "[" + ", ".join(f'"{x}"' for x in items) + "]"


def contracts_config(root: Path, out: Path) -> Path:
    """pyproject's [tool.importlinter], with every test module and conftest of the root packages
    ignored as an importer (tests may import any layer)."""
    conf = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["importlinter"]
    tests = sorted(".".join(p.relative_to(root).with_suffix("").parts)
                   for pkg in conf["root_packages"] for pat in ("*_test.py", "conftest.py")
                   for p in (root / pkg).rglob(pat))
    lines = ["[tool.importlinter]", f"root_packages = {_toml_list(conf['root_packages'])}",
             f"include_external_packages = {str(conf.get('include_external_packages', False)).lower()}"]
    for c in conf["contracts"]:
        lines += ["", "[[tool.importlinter.contracts]]"]
        for k, v in c.items():
            lines.append(f"{k} = {_toml_list(v) if isinstance(v, list) else repr(v)}")
        lines.append(f"ignore_imports = {_toml_list(c.get('ignore_imports', []) + [f'{t} -> **' for t in tests])}")
        lines.append('unmatched_ignore_imports_alerting = "none"')  # a test that imports no other layer
    out.write_text("\n".join(lines) + "\n")
    return out


def lint(root: Path, tmp: Path) -> subprocess.CompletedProcess:
    cfg = contracts_config(root, tmp / "importlinter.toml")
    exe = Path(sys.executable).parent / "lint-imports"
    return subprocess.run([str(exe), str(cfg), "--no-cache"], cwd=root, capture_output=True, text=True,
                          env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"})


def test_layers_point_one_way(tmp_path: Path):
    r = lint(ROOT, tmp_path)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    assert "2 kept, 0 broken" in r.stdout, r.stdout[-2000:]


def test_an_upward_import_breaks_the_contract(tmp_path: Path):
    """A copy of the tree with one import that runs up the layers (models -> serving) fails."""
    copy = tmp_path / "tree"
    for pkg in tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["root_packages"]:
        for p in (ROOT / pkg).rglob("*.py"):
            dst = copy / p.relative_to(ROOT)
            dst.parent.mkdir(parents=True, exist_ok=True)
            dst.write_text(p.read_text())
    (copy / "pyproject.toml").write_text((ROOT / "pyproject.toml").read_text())
    store = copy / "models" / "store.py"
    store.write_text(store.read_text() + "\nfrom serving import pipelines  # noqa: E402,F401\n")
    r = lint(copy, tmp_path)
    assert r.returncode != 0 and "models.store -> serving.pipelines" in r.stdout, r.stdout[-3000:]
