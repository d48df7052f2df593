"""No unsafe loading or shelling out anywhere in the project's code (tests included)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("hf_datasets", "detect", "mitigate", "train", "scripts", "tests")
# (file, what): the one documented exception. diffusers asks for trust_remote_code for any
# `custom_pipeline`; the test loads our own pipeline file from this checkout, as the README shows
ALLOWED = {
    ("tests/mitigate/test_pipeline.py", "DiffusionPipeline.from_pretrained(trust_remote_code=True)")
}
PICKLING = {"pickle", "cPickle", "cloudpickle", "dill", "joblib", "shelve", "marshal"}


def dotted(node: ast.AST) -> str:
    """`a.b.c` of a name or attribute chain ('' otherwise)."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = dotted(node.value)
        return f"{base}.{node.attr}" if base else ""
    return ""


def keyword(call: ast.Call, name: str) -> ast.AST | None:
    """The value of a call's keyword argument."""
    return next((k.value for k in call.keywords if k.arg == name), None)


def is_true(node: ast.AST | None) -> bool:
    """Whether an argument is the literal True."""
    return isinstance(node, ast.Constant) and node.value is True


def unsafe(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, what) of every unsafe construct in a module."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import | ast.ImportFrom):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module]
            for name in filter(None, names):
                if name.split(".")[0] in PICKLING:
                    found.append((node.lineno, f"import {name}"))
        if not isinstance(node, ast.Call):
            continue
        name = dotted(node.func)
        last = name.rpartition(".")[2]
        if name == "torch.load" and not is_true(keyword(node, "weights_only")):
            found.append((node.lineno, "torch.load without weights_only=True"))
        if name == "yaml.load" or name == "yaml.unsafe_load" or name == "yaml.full_load":
            loader = dotted(keyword(node, "Loader") or ast.Constant(None))
            if not loader.endswith("SafeLoader"):
                found.append((node.lineno, f"{name} without a safe loader"))
        numpy = last == "load" and name.split(".")[0] in ("np", "numpy")
        if numpy and is_true(keyword(node, "allow_pickle")):
            found.append((node.lineno, "numpy load with allow_pickle=True"))
        if is_true(keyword(node, "shell")):
            found.append((node.lineno, f"{name}(shell=True)"))
        if is_true(keyword(node, "trust_remote_code")):
            found.append((node.lineno, f"{name}(trust_remote_code=True)"))
        if name in ("eval", "exec", "os.system", "os.popen"):
            found.append((node.lineno, f"{name}()"))
        if name in ("pd.read_pickle", "pandas.read_pickle"):
            found.append((node.lineno, name))
    return found


def test_the_check_catches_each_unsafe_construct() -> None:
    source = """
import pickle
torch.load(path)
torch.load(path, weights_only=False)
yaml.load(text)
np.load(path, allow_pickle=True)
subprocess.run(command, shell=True)
AutoModel.from_pretrained(name, trust_remote_code=True)
eval(text)
pd.read_pickle(path)
"""
    assert len(unsafe(ast.parse(source))) == 9  # one per line
    safe = """
torch.load(path, weights_only=True)
yaml.safe_load(text)
yaml.load(text, Loader=yaml.SafeLoader)
np.load(path)
subprocess.run(command)
"""
    assert unsafe(ast.parse(safe)) == []


def test_no_unsafe_loading_or_shell_in_the_project() -> None:
    hits = [
        f"{path.relative_to(ROOT)}:{line}: {what}"
        for package in PACKAGES
        for path in sorted((ROOT / package).rglob("*.py"))
        for line, what in unsafe(ast.parse(path.read_text(), str(path)))
        if (str(path.relative_to(ROOT)), what) not in ALLOWED
    ]
    assert hits == []
