"""The layering rules of docs/ARCHITECTURE.md, checked on the source."""

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parent.parent


def imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def module_level_imports(path: Path) -> set[str]:
    """Modules imported when the file is imported (function bodies left out: lazy imports)."""
    names: set[str] = set()
    pending: list[ast.AST] = [ast.parse(path.read_text())]
    while pending:
        for node in ast.iter_child_nodes(pending.pop()):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
                continue
            if isinstance(node, ast.Import):
                names |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module:
                names.add(node.module)
            pending.append(node)
    return names


def under(name: str, packages: set[str]) -> bool:
    return any(name == package or name.startswith(package + ".") for package in packages)


def test_hero_ml_never_imports_prefect() -> None:
    offenders = [
        str(path.relative_to(ROOT))
        for path in (ROOT / "hero_ml").rglob("*.py")
        if any(name.split(".")[0] == "prefect" for name in imported_modules(path))
    ]
    assert offenders == []


def test_hero_ml_reaches_flows_only_from_the_cli_and_lazily() -> None:
    # the CLI hands `hero run`, `deploy`, … off to flows/ inside those commands; nothing else may
    lazy_homes = {"hero_ml/cli.py", "hero_ml/orchestration_cli.py"}
    for path in (ROOT / "hero_ml").rglob("*.py"):
        relative = str(path.relative_to(ROOT))
        assert not any(under(name, {"flows"}) for name in module_level_imports(path)), relative
        if relative not in lazy_homes:
            assert not any(under(name, {"flows"}) for name in imported_modules(path)), relative


def test_the_learning_core_imports_nothing_above_it() -> None:
    # engine, losses, encoder, guidance and the diffusion core know no run store, lease, tracker, Label
    # Studio, job or CLI: the same code learns under a flow, a command, a benchmark or a test
    core = [ROOT / f"hero_ml/{name}.py" for name in ("engine", "ddpo", "d3po", "encoder", "rewards")]
    core += [ROOT / f"hero_ml/{name}.py" for name in ("guidance", "feedback", "parallel", "images")]
    core += sorted((ROOT / "hero_ml/diffusion").glob("*.py"))
    above = {"flows", "hero_ml.adapters.tracking", "hero_ml.adapters.label_studio", "hero_ml.toy"}
    above |= {
        f"hero_ml.{name}" for name in ("training", "labelling", "run_store", "run_lease", "run_processes")
    }
    above |= {f"hero_ml.{name}" for name in ("promotion", "sample_round", "cli", "cli_support")}
    above |= {"hero_ml.labelling_cli", "hero_ml.orchestration_cli", "hero_ml.registry_cli"}
    for path in core:
        offenders = {name for name in imported_modules(path) if under(name, above)}
        assert offenders == set(), (str(path.relative_to(ROOT)), offenders)


def test_flows_hold_no_models() -> None:
    # flows only orchestrate: the learning happens in hero_ml, behind TrainingRun and the jobs
    for path in (ROOT / "flows").rglob("*.py"):
        offenders = {name for name in imported_modules(path) if under(name, {"torch", "diffusers", "peft"})}
        assert offenders == set(), (str(path.relative_to(ROOT)), offenders)


PURE = {
    "hero_ml/diffusion/ddim.py": {"math", "torch", "diffusers.schedulers"},
    "hero_ml/images.py": {"math", "torch", "PIL"},
    "hero_ml/rewards.py": {"torch"},
    "hero_ml/redact.py": {"json", "re", "collections.abc", "urllib.parse"},
    "hero_ml/toy/render.py": {"math", "numpy", "PIL", "hero_ml.toy.scene"},
    "hero_ml/toy/captions.py": {"re", "numpy", "pydantic", "hero_ml.toy.scene"},
    "hero_ml/toy/perceive.py": {
        "math",
        "numpy",
        "pydantic",
        "scipy",
        "hero_ml.toy.render",
        "hero_ml.toy.scene",
    },
}


def test_pure_modules_import_no_io_or_models_and_open_no_files() -> None:
    for module, allowed in PURE.items():
        path = ROOT / module
        offenders = {name for name in imported_modules(path) if not under(name, allowed | {"__future__"})}
        assert offenders == set(), (module, offenders)
        calls = {
            node.func.id
            for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
        }
        assert calls.isdisjoint({"open", "print", "input", "exec", "eval"}), (module, calls)


def test_config_imports_without_torch() -> None:
    code = "import sys, hero_ml.config; hero_ml.config.load_config(); print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


def test_only_adapters_talk_to_services() -> None:
    homes = {"boto3": "hero_ml/adapters/storage/s3.py", "botocore": "hero_ml/adapters/storage/s3.py"}
    homes |= {"mlflow": "hero_ml/adapters/tracking/", "label_studio_sdk": "hero_ml/adapters/label_studio/"}
    homes |= {"httpx": "hero_ml/adapters/", "urllib.request": "hero_ml/adapters/", "requests": "nowhere"}
    for path in [*(ROOT / "hero_ml").rglob("*.py"), *(ROOT / "flows").rglob("*.py")]:
        relative = str(path.relative_to(ROOT))
        for name in imported_modules(path):
            home = next((home for package, home in homes.items() if under(name, {package})), None)
            assert home is None or relative.startswith(home), f"{relative} imports {name}"
    # the S3 store (and boto3 with it) is loaded only for storage.backend s3
    storage = module_level_imports(ROOT / "hero_ml/adapters/storage/__init__.py")
    assert not any(under(name, {"hero_ml.adapters.storage.s3"}) for name in storage)
