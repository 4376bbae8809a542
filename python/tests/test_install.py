"""The package as `pip install .` left it: binary, package and command line."""

import re
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import corecast
from helpers import PATIENCE, REPO, cargo_version


def assert_version_line(text):
    """`corecast <version> (commit <short hash>)`; `unknown` when built without git and
    without CORECAST_COMMIT (build.rs)."""
    pattern = rf"corecast {re.escape(cargo_version())} \(commit ([0-9a-f]{{7,}}|unknown)\)\n"
    assert re.fullmatch(pattern, text), text


def test_the_package_and_the_binary_are_installed_into_the_environment():
    site_packages = Path(sysconfig.get_path("purelib")).resolve()
    assert Path(corecast.__file__).resolve().is_relative_to(site_packages), corecast.__file__
    assert not Path(corecast.__file__).resolve().is_relative_to(REPO / "python")
    assert corecast.binary_path() == (Path(sys.prefix) / "bin" / "corecast").resolve()
    assert corecast.__version__ == cargo_version()


def test_corecast_version_runs_from_the_environment():
    out = subprocess.run(
        [str(Path(sys.prefix) / "bin" / "corecast"), "--version"],
        capture_output=True,
        timeout=PATIENCE,
        check=True,
    )
    assert_version_line(out.stdout.decode())
    out = subprocess.run(
        [sys.executable, "-m", "corecast", "--version"], capture_output=True, timeout=PATIENCE, check=True
    )
    assert_version_line(out.stdout.decode())


def test_python_m_corecast_is_the_command_line_with_its_exit_status(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"hyper_parameters": {"rate_limit_msgs_per_minute": "fast"}}')
    out = subprocess.run(
        [sys.executable, "-m", "corecast", "check", "--config", str(bad)], capture_output=True, timeout=PATIENCE
    )
    assert out.returncode == 78
    assert out.stderr.decode() == (
        'corecast: config error: hyper_parameters.rate_limit_msgs_per_minute: expected an integer, found "fast"\n'
    )
    good = tmp_path / "good.json"
    good.write_text('{"port": 9123}')
    out = subprocess.run(
        [sys.executable, "-m", "corecast", "check", "--config", str(good), "--shards", "1"],
        capture_output=True,
        timeout=PATIENCE,
        check=True,
    )
    assert b'"port": 9123' in out.stdout and b'"worker_threads": 1' in out.stdout


def test_a_release_wheel_installs_and_runs_without_a_rust_toolchain(tmp_path):
    # The build reuses the release artifacts `pip install .` left in target/.
    dist = tmp_path / "dist"
    subprocess.run(
        [str(Path(sys.prefix) / "bin" / "maturin"), "build", "--release", "--quiet", "--out", str(dist)],
        cwd=REPO,
        check=True,
        timeout=1800,
    )
    (wheel,) = dist.glob("corecast-*.whl")
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    # No cargo or rustc on PATH, no index: only the wheel.
    bare = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    subprocess.run(
        [str(env_dir / "bin" / "pip"), "install", "--quiet", "--no-index", str(wheel)],
        env=bare,
        check=True,
        timeout=300,
    )
    out = subprocess.run(
        [str(env_dir / "bin" / "corecast"), "--version"], env=bare, capture_output=True, check=True, timeout=PATIENCE
    )
    assert_version_line(out.stdout.decode())
    out = subprocess.run(
        [str(env_dir / "bin" / "python"), "-c", "import corecast; print(corecast.binary_path())"],
        env=bare,
        capture_output=True,
        check=True,
        timeout=PATIENCE,
    )
    assert Path(out.stdout.decode().strip()) == (env_dir / "bin" / "corecast").resolve()
