"""No pickle on any load path (DESIGN §6; issue #7 item 6): a scan of the package's source.

Every call that can unpickle must say it will not: `torch.load(..., weights_only=True)`,
`np.load(..., allow_pickle=False)`; the modules that only unpickle (pickle, dill, joblib,
cloudpickle, shelve, marshal) are not imported at all, and YAML is never loaded unsafely.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "fromage"
UNPICKLING_MODULES = {"pickle", "cPickle", "dill", "joblib", "cloudpickle", "shelve", "marshal", "_pickle"}


def _keyword(call: ast.Call, name: str):
    for kw in call.keywords:
        if kw.arg == name and isinstance(kw.value, ast.Constant):
            return kw.value.value
    return None


def _call_name(call: ast.Call) -> str:
    parts = []
    node = call.func
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
    return ".".join(reversed(parts))


def violations(source: str, filename: str = "<src>") -> list[str]:
    """Every unsafe load in `source`, as `file:line: what`."""
    found = []
    for node in ast.walk(ast.parse(source, filename)):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            for name in names:
                if name.split(".")[0] in UNPICKLING_MODULES:
                    found.append(f"{filename}:{node.lineno}: imports {name}")
        if not isinstance(node, ast.Call):
            continue
        name = _call_name(node)
        if name.endswith("torch.load"):
            if _keyword(node, "weights_only") is not True:
                found.append(f"{filename}:{node.lineno}: torch.load without weights_only=True")
        elif name in ("np.load", "numpy.load"):
            if _keyword(node, "allow_pickle") is not False:
                found.append(f"{filename}:{node.lineno}: np.load without allow_pickle=False")
        elif name in ("yaml.load", "yaml.unsafe_load", "yaml.full_load"):
            found.append(f"{filename}:{node.lineno}: {name} (use yaml.safe_load)")
        elif name.endswith("read_pickle") or name.endswith("from_pickle"):
            found.append(f"{filename}:{node.lineno}: {name}")
    return found


def test_the_package_never_unpickles():
    files = sorted(PACKAGE.rglob("*.py"))
    assert len(files) > 30  # the scan really covers the package
    problems = [v for f in files for v in violations(f.read_text(), str(f.relative_to(PACKAGE.parent)))]
    assert problems == []


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("import torch\ntorch.load('x')", "torch.load without weights_only=True"),
        ("import torch\ntorch.load('x', weights_only=False)", "torch.load without weights_only=True"),
        ("import numpy as np\nnp.load('x.npy')", "np.load without allow_pickle=False"),
        ("import pickle", "imports pickle"),
        ("from joblib import load", "imports joblib"),
        ("import yaml\nyaml.load(s)", "yaml.load (use yaml.safe_load)"),
        ("import pandas as pd\npd.read_pickle('x')", "pd.read_pickle"),
    ],
)
def test_the_scan_catches_each_unsafe_form(source, expected):
    assert any(expected in v for v in violations(source))


def test_the_scan_accepts_the_safe_forms():
    safe = "import torch, numpy as np\ntorch.load('x', weights_only=True)\nnp.load('y', allow_pickle=False)"
    assert violations(safe) == []
