"""The package as it was installed (CI: the release wheel; by hand: `pip install .`):
binary, package, command line, metadata and the Summoner hook's files."""

import json
import os
import re
import subprocess
import sys
import sysconfig
import textwrap
import venv
from importlib import metadata
from pathlib import Path

import corecast
from helpers import PATIENCE, REPO, STANDIN_SDK, cargo_version

#: A release wheel built beforehand (dist/build.sh, as .ci/run does); without it the
#: wheel test builds one with maturin.
WHEEL_ENV = "CORECAST_WHEEL"


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


def test_the_long_description_has_no_links_that_need_the_repository():
    meta = metadata.metadata("corecast")
    description = meta.get_payload() or meta["Description"]
    assert "corecast" in description and "pip install corecast" in description
    targets = re.findall(r"\]\(([^)]*)\)", description)
    assert targets, "expected at least one link"
    relative = [t for t in targets if not re.match(r"https?://", t)]
    assert not relative, f"links that only work inside the repository: {relative}"


def test_the_license_files_and_the_hook_are_installed():
    dist = metadata.distribution("corecast")
    names = {str(f) for f in dist.files or ()}
    for license_file in ("LICENSE-MIT", "LICENSE-APACHE", "THIRD-PARTY-NOTICES.txt"):
        assert any(n.endswith(f"licenses/{license_file}") for n in names), (license_file, sorted(names))
    site_packages = Path(sysconfig.get_path("purelib"))
    assert (site_packages / "corecast.pth").read_text() == "import _corecast_hook\n"
    assert (site_packages / "_corecast_hook.py").is_file()
    notices = Path(dist.locate_file(next(n for n in names if n.endswith("THIRD-PARTY-NOTICES.txt")))).read_text()
    assert "glommio 0.9.0: Apache-2.0 OR MIT" in notices


def test_a_release_wheel_installs_and_runs_without_a_rust_toolchain(tmp_path):
    given = os.environ.get(WHEEL_ENV)
    if given:
        wheel = Path(given)
    else:
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
    # The Summoner hook works from the wheel's .pth, and a binary gone missing after the
    # install is an error through the SDK, not a fall-back to the SDK's Python server.
    sdk_env = {**bare, "PYTHONPATH": str(STANDIN_SDK)}
    out = subprocess.run(
        [str(env_dir / "bin" / "python"), "-c", "from summoner.server import server; print(sorted(server.RUST_MODULES))"],
        env=sdk_env,
        capture_output=True,
        check=True,
        timeout=PATIENCE,
    )
    assert out.stdout.decode() == "['corecast', 'rust_corecast']\n"
    (env_dir / "bin" / "corecast").unlink()
    config = tmp_path / "server_config.json"
    config.write_text(json.dumps({"version": "corecast"}))
    script = textwrap.dedent(
        f"""
        from summoner.server import SummonerServer
        try:
            SummonerServer(name="s").run(config_path={str(config)!r})
        except RuntimeError as e:
            print(f"{{type(e).__name__}}: {{e}}")
        """
    )
    out = subprocess.run(
        [str(env_dir / "bin" / "python"), "-c", script], env=sdk_env, capture_output=True, check=True, timeout=PATIENCE
    )
    assert out.stdout.decode().splitlines()[-1].startswith(
        "CorecastError: the corecast executable is not installed"
    ), out.stdout.decode()
