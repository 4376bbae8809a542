#!/usr/bin/env bash
# Builds every release artefact from one compile of the `dist` profile (stripped release):
#
#   corecast-VERSION.tar.gz                                   the sdist
#   corecast-VERSION-py3-none-manylinux2014_x86_64.manylinux_2_17_x86_64.whl
#                                                             the wheel, built FROM the sdist
#   corecast_VERSION-1_amd64.deb                              cargo-deb, same binary
#   corecast-VERSION-x86_64-linux.tar.gz (+ .sha256)          binary, configs, unit, docs
#
# into dist/out/ (or $OUT). The wheel is built from the sdist, so a green run also shows
# that the sdist builds. The binary is linked by zig against glibc 2.17 (manylinux2014), so
# the wheel, the .deb and the tarball need no newer glibc than 2.17; the kernel must still
# be Linux 5.8 or newer (io_uring). glommio calls copy_file_range, which glibc has only
# since 2.27: src/glibc_compat.rs defines it in the binary as the raw system call, so the
# link needs nothing newer. `auditwheel show` checks the wheel's tag. With --aarch64 it
# also cross-builds the aarch64 wheel (manylinux2014 too; not the .deb or the tarball;
# about 4 minutes more; not in CI).
#
# Needs: Rust (>= 1.85), Python 3 with venv, a C compiler, git. maturin, ziglang and
# auditwheel come from PyPI into target/dist-tools; cargo-deb from crates.io.
# Environment: CARGO_TARGET_DIR (default ./target), OUT (default dist/out).
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD

aarch64=0
for arg in "$@"; do
    case $arg in
        --aarch64) aarch64=1 ;;
        *) echo "usage: dist/build.sh [--aarch64]" >&2; exit 2 ;;
    esac
done

export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$repo/target}
mkdir -p "$CARGO_TARGET_DIR"
CARGO_TARGET_DIR=$(cd "$CARGO_TARGET_DIR" && pwd)
out=${OUT:-$repo/dist/out}
mkdir -p "$out"
out=$(cd "$out" && pwd)
target=x86_64-unknown-linux-gnu
version=$(sed -n 's/^version = "\(.*\)"$/\1/p' Cargo.toml | head -1)
[ -n "$version" ] || { echo "dist/build.sh: no version in Cargo.toml" >&2; exit 1; }
step() { printf '\n== %s\n' "$*" >&2; }
# The wheel is built from the sdist, which has no .git: build.rs takes the commit for
# `--version` and corecast_build_info from here instead.
CORECAST_COMMIT=${CORECAST_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}
export CORECAST_COMMIT

# -- tools ---------------------------------------------------------------------------------
tools=$CARGO_TARGET_DIR/dist-tools
if [ ! -x "$tools/bin/maturin" ] || [ ! -x "$tools/bin/auditwheel" ] || ! "$tools/bin/python" -m ziglang version >/dev/null 2>&1; then
    step "maturin, ziglang and auditwheel into $tools"
    python3 -m venv "$tools"
    "$tools/bin/python" -m pip install --quiet "maturin>=1.4,<2" ziglang auditwheel
fi
export PATH=$tools/bin:$PATH
if ! cargo deb --version >/dev/null 2>&1; then
    step "cargo-deb from crates.io"
    cargo install cargo-deb --locked
fi

# -- third-party notices (also fails on a dependency with an unexpected license) -----------
# Regenerated before every build, so the artefacts always carry the current list; the
# committed copy (for `pip install .` and the sdist) should then be committed again.
step "third-party notices"
python3 dist/notices.py THIRD-PARTY-NOTICES.txt
if ! git diff --quiet -- THIRD-PARTY-NOTICES.txt 2>/dev/null; then
    echo "dist/build.sh: warning: THIRD-PARTY-NOTICES.txt changed (the dependencies did): commit it" >&2
fi
staging=$repo/target/dist-debian  # cargo-deb's unit path (Cargo.toml) points here
mkdir -p "$staging"

# -- sdist, then the wheel from it ---------------------------------------------------------
step "sdist"
rm -f "$out"/corecast-"$version".tar.gz "$out"/corecast-"$version"-*.whl
maturin sdist --out "$out"
sdist=$out/corecast-$version.tar.gz
[ -f "$sdist" ] || { echo "dist/build.sh: maturin made no $sdist" >&2; exit 1; }

build_wheel() {  # target triple
    step "wheel for $1 from the sdist (manylinux2014 = manylinux_2_17, zig)"
    local wheels=$CARGO_TARGET_DIR/dist-wheels-$1
    rm -rf "$wheels"
    MATURIN_PEP517_ARGS="--profile dist --zig --compatibility manylinux2014 --target $1" \
        "$tools/bin/python" -m pip wheel --quiet --no-deps --no-build-isolation --wheel-dir "$wheels" "$sdist"
    local wheel
    wheel=$(ls "$wheels"/corecast-"$version"-*.whl)
    case $wheel in *manylinux_2_17*) ;; *) echo "dist/build.sh: $wheel is not manylinux_2_17" >&2; exit 1 ;; esac
    auditwheel show "$wheel" | tee "$wheels/auditwheel.txt" >&2
    # auditwheel wraps its lines: join them before looking for the verdict.
    local verdict
    verdict=$(tr -s '\n ' '  ' <"$wheels/auditwheel.txt")
    [[ $verdict == *'consistent with the following platform tag: "manylinux_2_17_'* ]] || {
        echo "dist/build.sh: auditwheel does not confirm manylinux_2_17 for $wheel" >&2
        exit 1
    }
    cp "$wheel" "$out/"
}

build_wheel "$target"
if [ "$aarch64" = 1 ]; then
    rustup target add aarch64-unknown-linux-gnu
    build_wheel aarch64-unknown-linux-gnu
fi

binary=$CARGO_TARGET_DIR/$target/dist/corecast
[ -x "$binary" ] || { echo "dist/build.sh: no binary at $binary" >&2; exit 1; }
"$binary" --version >&2

# -- the Debian package --------------------------------------------------------------------
step "Debian package"
# The packaged unit is configs/corecast.service with the packaged path and the system user
# the postinst creates (instead of DynamicUser); each substitution must have happened.
{
    echo "# corecast as a systemd service, as the corecast Debian package installs it."
    echo "# Generated by dist/build.sh from configs/corecast.service."
    echo
    sed -n '/^\[Unit\]$/,$p' configs/corecast.service |
        sed -e 's|^ExecStart=/usr/local/bin/corecast |ExecStart=/usr/bin/corecast |' \
            -e 's|^DynamicUser=yes$|User=corecast\nGroup=corecast|' \
            -e 's|^# Runs as a transient unprivileged user;|# Runs as the corecast system user (the postinst creates it);|'
} >"$staging/corecast.service"
if ! grep -q '^ExecStart=/usr/bin/corecast --config /etc/corecast/server_config.json$' "$staging/corecast.service" ||
    ! grep -q '^User=corecast$' "$staging/corecast.service" || grep -q '^DynamicUser' "$staging/corecast.service"; then
    echo "dist/build.sh: configs/corecast.service changed: the packaged unit's substitutions failed" >&2
    exit 1
fi
rm -f "$out"/corecast_"$version"-*.deb
cargo deb --no-build --no-strip --target "$target" --profile dist --output "$out/corecast_${version}-1_amd64.deb"
dpkg-deb --info "$out/corecast_${version}-1_amd64.deb" >&2

# -- the tarball ---------------------------------------------------------------------------
step "release tarball"
name=corecast-$version-x86_64-linux
tree=$CARGO_TARGET_DIR/dist-tarball/$name
rm -rf "$tree" && mkdir -p "$tree/configs"
install -m 0755 "$binary" "$tree/corecast"
install -m 0644 configs/*.json configs/corecast.service "$tree/configs/"
install -m 0644 README.md LICENSE-MIT LICENSE-APACHE THIRD-PARTY-NOTICES.txt "$tree/"
tar --sort=name --owner=0 --group=0 --numeric-owner --mtime="@$(git log -1 --format=%ct 2>/dev/null || echo 0)" \
    -C "$(dirname "$tree")" -czf "$out/$name.tar.gz" "$name"
(cd "$out" && sha256sum "$name.tar.gz" >"$name.tar.gz.sha256" && sha256sum -c "$name.tar.gz.sha256" >&2)

step "artefacts in $out"
ls -l "$out" >&2
