"""Layering: serving/ is the base a bento ships, so it never imports training/ nor TensorFlow; and
every folder imports only the folders below it in LAYERS.

Dependencies run one way, cli.py -> training/ -> serving/. These checks are fast: one clean
interpreter that imports the service, and a walk over every module's syntax tree.
"""
from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.fast  # the fast tier: pytest -m 'not slow'

ROOT = Path(__file__).resolve().parents[1]
SERVING = ROOT / "serving"
FORBIDDEN = ("training", "tensorflow", "tf_keras", "keras")


def _forbidden(name: str) -> bool:
    return any(name == top or name.startswith(top + ".") for top in FORBIDDEN)


# The folders from the bottom up: a module may import its own folder and the folders before it, never one
# after it. The reading order of the layers: data -> model -> (audit) -> fit -> record -> exported -> console.
# training.record sits below training.audit: it imports neither audit nor fit, and its page builder
# (training/record/page.py) draws the data check's page as well as compare's and eval's.
LAYERS = ("serving.base", "serving", "training", "training.data", "training.model", "training.record",
          "training.audit", "training.fit", "training.exported", "training.console", "cli")


def _module(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _layer(module: str) -> str:
    """The deepest entry of LAYERS that `module` is in (a package's face belongs to its package)."""
    return max((layer for layer in LAYERS if module == layer or module.startswith(layer + ".")), key=len)


def _import_in_clean_interpreter(modules: list[str]) -> dict:
    """Import `modules` in a new interpreter (this checkout first on sys.path, TLSERVE_MODEL unset);
    which modules are loaded afterwards, and where serving came from."""
    program = textwrap.dedent(f"""
        import importlib, json, sys
        for name in {modules!r}:
            importlib.import_module(name)
        import serving
        print(json.dumps({{"serving": serving.__file__, "modules": sorted(sys.modules)}}))
    """)
    env = {k: v for k, v in os.environ.items() if k != "TLSERVE_MODEL"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    result = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, cwd=ROOT, env=env,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    loaded = json.loads(result.stdout.strip().splitlines()[-1])
    assert Path(loaded["serving"]).resolve() == (SERVING / "__init__.py").resolve(), loaded["serving"]
    return loaded


def test_service_imports_without_training_or_tensorflow():
    loaded = _import_in_clean_interpreter(["serving.service"])
    assert "serving.service" in loaded["modules"]
    assert [m for m in loaded["modules"] if _forbidden(m)] == []


def test_every_serving_module_imports_without_training_or_tensorflow():
    modules = sorted(_module(p) for p in SERVING.rglob("*.py") if p.stem != "__init__")
    loaded = _import_in_clean_interpreter(modules)
    assert set(modules) <= set(loaded["modules"])
    assert [m for m in loaded["modules"] if _forbidden(m)] == []


def _imported_names(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, module) for every import statement, at any depth (lazy imports inside functions too),
    and every importlib.import_module / __import__ of a constant name."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module))
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant) \
                and isinstance(node.args[0].value, str):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if name in ("import_module", "__import__"):
                found.append((node.lineno, node.args[0].value))
    return found


def test_no_serving_source_imports_training():
    files = sorted(SERVING.rglob("*.py"))
    assert files
    offending = [f"{path.relative_to(ROOT)}:{line}: {name}"
                 for path in files
                 for line, name in _imported_names(ast.parse(path.read_text(encoding="utf-8"), filename=str(path)))
                 if _forbidden(name)]
    assert offending == []


def test_bento_carries_serving_alone():
    include = yaml.safe_load((ROOT / "bentofile.yaml").read_text())["include"]
    assert include and all(pattern.startswith("serving/") for pattern in include), include


def test_every_folder_imports_only_the_layers_below_it():
    sources = [*sorted((ROOT / "training").rglob("*.py")), *sorted(SERVING.rglob("*.py")), ROOT / "cli.py"]
    upward = []
    for path in sources:
        here = _module(path)
        for line, name in _imported_names(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
            if name.split(".")[0] in ("training", "serving") and \
                    LAYERS.index(_layer(name)) > LAYERS.index(_layer(here)):
                upward.append(f"{path.relative_to(ROOT)}:{line}: {here} ({_layer(here)}) imports {name}")
    assert upward == []


def test_no_folder_holds_more_than_twenty_modules():
    folders = {p.parent for p in [*(ROOT / "training").rglob("*.py"), *SERVING.rglob("*.py")]}
    crowded = {str(f.relative_to(ROOT)): n for f in folders if (n := len(list(f.glob("*.py")))) > 20}
    assert crowded == {}
