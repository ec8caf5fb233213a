"""Packaging: pyproject.toml's ranges and extras agree with the lock that `make` installs (requirements.txt and
requirements-nodeps.txt), and every import is declared."""
from __future__ import annotations

import ast
import importlib.metadata
import sys
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from tunelab.extras import EXTRAS
from tunelab.models.gguf import GGUF_MODELS

ROOT = Path(__file__).resolve().parent.parent
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
OPTIONAL = PROJECT["optional-dependencies"]
RUNTIME_EXTRAS = set(OPTIONAL) - {"all", "dev"}


def pins(file: str) -> dict[str, Version]:
    """name -> version of a requirements file's `name==version` lines."""
    out = {}
    for line in (ROOT / file).read_text(encoding="utf-8").splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, sep, version = line.partition("==")
            assert sep and version.strip(), f"{file}: '{line}' is not an exact pin"
            out[canonicalize_name(name)] = Version(version.strip())
    return out


LOCK, NODEPS = pins("requirements.txt"), pins("requirements-nodeps.txt")


def declared() -> dict[str, list[tuple[str, Requirement]]]:
    """name -> (where, requirement) for pyproject's dependencies and every extra; tunelab's own extras left out."""
    out: dict[str, list[tuple[str, Requirement]]] = {}
    for where, reqs in [("dependencies", PROJECT["dependencies"]), *OPTIONAL.items()]:
        for text in reqs:
            req = Requirement(text)
            if canonicalize_name(req.name) != PROJECT["name"]:
                out.setdefault(canonicalize_name(req.name), []).append((where, req))
    return out


def test_every_pin_is_declared_and_within_its_declared_range():
    decl, problems = declared(), []
    gguf_installs = " ".join(spec.install for spec in GGUF_MODELS.values())
    for name, version in {**LOCK, **NODEPS}.items():
        if name in LOCK and name not in decl:
            problems.append(f"{name}=={version} is pinned in requirements.txt but pyproject.toml declares it nowhere")
        elif name not in decl and f"{name}=={version}" not in gguf_installs:
            # the GGUF model packages go in with --no-deps, by the install line their model's message gives
            problems.append(f"{name}=={version} (requirements-nodeps.txt) is neither declared nor in a GGUF model's "
                            "install line (tunelab/models/gguf.py)")
        problems += [f"the lock's {name}=={version} is outside pyproject's {where} range {req}"
                     for where, req in decl.get(name, []) if not req.specifier.contains(version, prereleases=True)]
    assert not problems, "\n".join(problems)


def test_everything_declared_is_pinned():
    missing = sorted(set(declared()) - set(LOCK) - set(NODEPS))
    assert not missing, f"declared in pyproject.toml but pinned in neither requirements file: {missing}"


def test_torch_is_locked_to_the_cpu_wheel_and_declared_below_the_next_major():
    assert "torch==2.13.0" in (ROOT / "requirements.txt").read_text(encoding="utf-8").splitlines()
    [(_, torch)] = declared()["torch"]
    assert torch.specifier.contains("2.13.0") and not torch.specifier.contains("3.0.0")
    assert not torch.url and not torch.marker


def test_the_extras_are_the_ones_the_messages_name_and_all_holds_every_one():
    assert set(EXTRAS) == RUNTIME_EXTRAS
    [everything] = OPTIONAL["all"]
    assert Requirement(everything).name == PROJECT["name"] and Requirement(everything).extras == RUNTIME_EXTRAS
    assert f"{PROJECT['name']}[all]" in OPTIONAL["dev"]


def imported_modules(folder: Path) -> set[str]:
    """Top-level names a folder's Python files import, lazily or not, plus (in tunelab/) the modules named to
    tunelab.extras.need / package_dir."""
    names = set()
    for path in folder.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names.add(node.module)
            elif folder.name == "tunelab" and isinstance(node, ast.Call) and node.args \
                    and getattr(node.func, "id", None) in ("need", "package_dir"):
                names.add(getattr(node.args[0], "value", ""))  # a literal; a loop's variable is left out
    return {n.split(".")[0] for n in names if n}


def test_every_module_tunelab_and_its_tests_import_is_declared():
    local = {p.stem for folder in ("tests", "bench") for p in (ROOT / folder).glob("*.py")} | {"tunelab"}
    third_party = set().union(*(imported_modules(ROOT / f) for f in ("tunelab", "tests", "bench")))
    third_party -= set(sys.stdlib_module_names) | local
    providers = importlib.metadata.packages_distributions()
    decl = declared()
    undeclared = {m: providers.get(m) for m in third_party
                  if not any(canonicalize_name(d) in decl for d in providers.get(m, []))}
    assert not undeclared, f"imported but declared nowhere in pyproject.toml (module: distributions): {undeclared}"
