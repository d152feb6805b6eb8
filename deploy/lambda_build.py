"""Build the worker function's zip for AWS Lambda: the handler and only what it imports.

    python deploy/lambda_build.py [--out dist/emailops-worker.zip] [--ca-bundle private-ca.pem]

The package is derived, not listed by hand:

1. A probe process imports what the handler loads (`sending.worker`, its minimal Django
   settings, `django.core.mail`, `sending.providers` and every email backend the providers open
   by path) and renders a message, then reports every module it loaded.
2. Modules of the standard library are left out (the runtime has them); the project's own modules
   are copied file by file; every other module names its distribution, and those distributions
   are installed for Lambda's platform at the versions this environment runs (the pinned
   requirements): `pip install --platform manylinux2014_x86_64 --only-binary=:all:
   --python-version 3.11 --implementation cp --no-deps --target …`.
3. The zip is written deterministically (sorted, fixed timestamps): the same sources give the
   same bytes, so an unchanged package is not redeployed.

Runtime: AWS Lambda `python3.11` (x86_64), which runs on Amazon Linux 2 with glibc 2.26, so
manylinux2014 (glibc 2.17) wheels load there; wheels tagged for a newer glibc (manylinux_2_28 and
up) would not, and pip refuses them under this platform tag. The handler is
`sending.worker.handler`. `tests/deploy/test_lambda_package.py` runs it from the unzipped package
with nothing but the zip and the standard library on sys.path.

With `--ca-bundle`, the package carries `ca-bundle.pem`: certifi's public roots plus the given
private CA, for a worker API whose certificate comes from a private CA (set the function's
REQUESTS_CA_BUNDLE=/var/task/ca-bundle.pem; see docs/deploy.md).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import zipfile
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HANDLER = "sending.worker.handler"
RUNTIME = "python3.11"
PLATFORM = "manylinux2014_x86_64"
PYTHON_VERSION = "3.11"
ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)

# What the probe runs: everything the handler imports before and while it sends.
PROBE = r"""
import importlib, importlib.abc, json, sys
# Only the runtime requirements exist on Lambda: an optional import of anything else (a dev tool
# in this environment) must fail here as it would there.
BLOCKED = set(json.loads(sys.argv[1]))
class OnlyRuntime(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"{name} is not a runtime requirement", name=name)
        return None
sys.meta_path.insert(0, OnlyRuntime())
before = set(sys.modules)
from sending import worker
worker.ensure_django()
import django.core.mail
from django.utils.module_loading import import_string
import pkgutil
from sending import providers, rendering
# Every module of the handler's packages (they import some lazily), and every backend a provider
# kind opens by its dotted path.
for package in (worker, providers):
    for module in pkgutil.iter_modules(package.__path__, package.__name__ + "."):
        if not module.name.endswith(".__main__"):
            importlib.import_module(module.name)
for kind in ("smtp", "amazon_ses", "postmark", "sandbox"):
    import_string(providers.open_provider({"kind": kind}).backend_path)
compiled = rendering.compile_message(
    subject="Hello {{ first_name }}", text_body="{{ n|floatformat:2 }}", html_body="<p>{{ n }}</p>"
)
compiled.render({"first_name": "Ada", "n": 1.5})
json.dump({name: getattr(module, "__file__", None)
           for name, module in list(sys.modules.items()) if name not in before}, sys.stdout)
"""


def runtime_distributions(requirements: Path = ROOT / "requirements.txt") -> set[str]:
    """The distributions requirements.txt installs: its own and their dependencies (with the
    extras asked for), as this environment has them."""
    from packaging.requirements import Requirement

    wanted = [
        Requirement(line.split("#")[0].strip())
        for line in requirements.read_text().splitlines()
        if line.split("#")[0].strip()
    ]
    seen: set[str] = set()
    while wanted:
        requirement = wanted.pop()
        key = requirement.name.lower().replace("_", "-")
        if key in seen:
            continue
        seen.add(key)
        try:
            requires = metadata.requires(requirement.name) or []
        except metadata.PackageNotFoundError:
            continue  # for another platform or Python (its marker said so)
        for line in requires:
            dependency = Requirement(line)
            extras = requirement.extras or {""}
            if dependency.marker is None or any(
                dependency.marker.evaluate({"extra": extra}) for extra in extras
            ):
                wanted.append(dependency)
    return seen


def non_runtime_modules() -> set[str]:
    """Top-level module names installed here by distributions that are no runtime requirement."""
    dists = runtime_distributions()
    return {
        top
        for top, names in metadata.packages_distributions().items()
        if not any(name.lower().replace("_", "-") in dists for name in names)
    }


def probe_modules(python: str = sys.executable) -> dict[str, str | None]:
    """Module name -> file, for every module the handler's imports load."""
    env = {k: v for k, v in os.environ.items() if k != "DJANGO_SETTINGS_MODULE"}
    blocked = json.dumps(sorted(non_runtime_modules()))
    result = subprocess.run(
        [python, "-c", PROBE, blocked],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode:
        raise SystemExit(f"the import probe failed:\n{result.stderr}")
    return json.loads(result.stdout)


def _stdlib_dirs() -> list[Path]:
    paths = sysconfig.get_paths()
    return [Path(paths[k]).resolve() for k in ("stdlib", "platstdlib")]


def classify(modules: dict[str, str | None]) -> tuple[set[Path], dict[str, str]]:
    """(project files to copy, {distribution: version} to install)."""
    stdlib = _stdlib_dirs()
    site_dirs = {Path(p).resolve() for p in sys.path if p.endswith("site-packages")}
    top_to_dists = metadata.packages_distributions()
    project_files: set[Path] = set()
    dists: dict[str, str] = {}
    for name, file in modules.items():
        if file is None:
            continue  # built in, frozen or a namespace package
        path = Path(file).resolve()
        if any(path.is_relative_to(site) for site in site_dirs):
            top = name.split(".")[0]
            for dist in top_to_dists.get(top, ()):
                dists[dist] = metadata.version(dist)
            if top not in top_to_dists:
                raise SystemExit(f"module {name} ({file}) belongs to no installed distribution")
        elif path.is_relative_to(ROOT):
            project_files.add(path.relative_to(ROOT))
        elif any(path.is_relative_to(d) for d in stdlib):
            continue
        else:
            raise SystemExit(f"module {name} is loaded from {file}: neither stdlib nor installed")
    return project_files, dists


def install(dists: dict[str, str], target: Path) -> None:
    command = [
        sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
        "--no-deps", "--only-binary=:all:", "--platform", PLATFORM,
        "--python-version", PYTHON_VERSION, "--implementation", "cp",
        "--target", str(target),
        *(f"{name}=={version}" for name, version in sorted(dists.items())),
    ]  # fmt: skip
    subprocess.run(command, check=True)


def write_zip(source: Path, out: Path) -> None:
    """Sorted entries with fixed timestamps and modes: same input, same bytes."""
    out.parent.mkdir(parents=True, exist_ok=True)
    files = sorted(
        p
        for p in source.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"
    )
    tmp = out.with_suffix(".tmp")
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as archive:
        for path in files:
            info = zipfile.ZipInfo(str(path.relative_to(source)), ZIP_EPOCH)
            info.external_attr = (0o755 if os.access(path, os.X_OK) else 0o644) << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            archive.writestr(info, path.read_bytes(), compresslevel=9)
    tmp.replace(out)


def build(out: Path, *, ca_bundle: Path | None = None) -> dict:
    modules = probe_modules()
    project_files, dists = classify(modules)
    with tempfile.TemporaryDirectory(prefix="emailops-lambda-") as tmp:
        package = Path(tmp) / "package"
        package.mkdir()
        install(dists, package)
        for relative in sorted(project_files):
            (package / relative).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / relative, package / relative)
        if ca_bundle is not None:
            import certifi

            roots = Path(certifi.where()).read_text()
            (package / "ca-bundle.pem").write_text(roots + "\n" + ca_bundle.read_text())
        write_zip(package, out)
        unpacked = sum(p.stat().st_size for p in package.rglob("*") if p.is_file())
    return {
        "zip": str(out),
        "zip_bytes": out.stat().st_size,
        "unzipped_bytes": unpacked,
        "runtime": RUNTIME,
        "platform": PLATFORM,
        "handler": HANDLER,
        "project_files": sorted(str(p) for p in project_files),
        "distributions": dict(sorted(dists.items())),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "dist" / "emailops-worker.zip")
    parser.add_argument("--ca-bundle", type=Path, default=None, help="a private CA (PEM) to trust")
    args = parser.parse_args(argv)
    summary = build(args.out, ca_bundle=args.ca_bundle)
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
