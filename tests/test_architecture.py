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


def test_hero_ml_never_imports_prefect() -> None:
    offenders = [
        str(path.relative_to(ROOT))
        for path in (ROOT / "hero_ml").rglob("*.py")
        if any(name.split(".")[0] == "prefect" for name in imported_modules(path))
    ]
    assert offenders == []


def test_pure_math_modules_import_no_io_or_models() -> None:
    allowed = {"__future__", "math", "torch", "diffusers", "PIL"}
    for module in ("hero_ml/diffusion/ddim.py", "hero_ml/images.py"):
        roots = {name.split(".")[0] for name in imported_modules(ROOT / module)}
        assert roots <= allowed, (module, roots - allowed)


def test_config_imports_without_torch() -> None:
    code = "import sys, hero_ml.config; hero_ml.config.load_config(); print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


def test_only_adapters_talk_to_services() -> None:
    homes = {"boto3": "hero_ml/adapters/storage/", "botocore": "hero_ml/adapters/storage/"}
    homes |= {"mlflow": "hero_ml/adapters/tracking/", "label_studio_sdk": "hero_ml/adapters/label_studio/"}
    for path in [*(ROOT / "hero_ml").rglob("*.py"), *(ROOT / "flows").rglob("*.py")]:
        relative = str(path.relative_to(ROOT))
        for name in imported_modules(path):
            home = homes.get(name.split(".")[0])
            assert home is None or relative.startswith(home), f"{relative} imports {name}"
