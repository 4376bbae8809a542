#!/usr/bin/env bash
# Installs the corecast .deb with dpkg, checks it from the installed paths, upgrades it over
# an edited config, and removes and purges it. Run as root on a Debian-like machine where
# corecast is not installed (it refuses to touch an installed one).
#
#   dist/test-deb.sh dist/out/corecast_0.1.0-1_amd64.deb
#
# Checks: /usr/bin/corecast --version and `check` of /etc/corecast/server_config.json; the
# corecast system user; the unit's ExecStart, user and limits; the config is a conffile,
# kept (with a local edit) across a reinstall and after `dpkg -r`, gone after a purge; the
# installed binary serves as the corecast user with the installed config.
set -euo pipefail

deb=${1:?usage: dist/test-deb.sh PACKAGE.deb}
fail() { echo "test-deb: FAILED: $*" >&2; exit 1; }
[ "$(id -u)" = 0 ] || fail "needs root (dpkg -i)"
status=$(dpkg-query -W -f='${Status}' corecast 2>/dev/null || true)
if [ "${status##* }" = installed ]; then  # "install ok installed", not "... not-installed"
    fail "a corecast package is already installed here; not touching it"
fi
version=$(dpkg-deb -f "$deb" Version)
version=${version%-*}
config=/etc/corecast/server_config.json
work=$(mktemp -d)
server=
cleanup() {
    [ -n "$server" ] && kill "$server" 2>/dev/null || true
    dpkg --purge corecast >/dev/null 2>&1 || true
    rm -rf "$work"
}
trap cleanup EXIT

echo "test-deb: dpkg -i $deb"
dpkg -i "$deb"

out=$(/usr/bin/corecast --version)
case "$out" in
    "corecast $version (commit "*")") ;;
    *) fail "/usr/bin/corecast --version printed '$out', not 'corecast $version (commit ...)'" ;;
esac
/usr/bin/corecast check --config "$config" >"$work/effective.json" || fail "corecast check --config $config"
grep -q '"port": 8888' "$work/effective.json" || fail "the installed config does not give port 8888"

entry=$(getent passwd corecast) || fail "no corecast user"
uid=$(echo "$entry" | cut -d: -f3)
[ "$uid" -lt 1000 ] || fail "corecast is not a system user (uid $uid)"
case $entry in *:/usr/sbin/nologin) ;; *) fail "the corecast user can log in: $entry" ;; esac

unit=$(dpkg -L corecast | grep '/systemd/system/corecast.service$') || fail "no unit installed"
for line in 'ExecStart=/usr/bin/corecast --config /etc/corecast/server_config.json' \
    'User=corecast' 'Type=notify' 'LimitNOFILE=1048576' 'LimitMEMLOCK=64M'; do
    grep -qx "$line" "$unit" || fail "$unit lacks '$line'"
done
! grep -q '^DynamicUser' "$unit" || fail "$unit still has DynamicUser"
conffiles=$(dpkg-query -W -f='${Conffiles}\n' corecast)
[[ $conffiles == *" $config "* ]] || fail "$config is not a conffile"
for doc in README.md LICENSE-MIT LICENSE-APACHE THIRD-PARTY-NOTICES.txt; do
    [ -s "/usr/share/doc/corecast/$doc" ] || fail "/usr/share/doc/corecast/$doc missing"
done

# The installed binary serves as the package's user, with the installed config (on a free
# port), and drains on SIGTERM with exit 0.
# setpriv execs corecast as that user (no process in between to take the signal).
setpriv --reuid=corecast --regid=corecast --clear-groups -- /usr/bin/corecast --config "$config" --port 0 2>"$work/serve.log" &
server=$!
for _ in $(seq 100); do
    grep -q 'listening on ' "$work/serve.log" && break
    kill -0 "$server" 2>/dev/null || break
    sleep 0.2
done
grep -q 'listening on 127.0.0.1:' "$work/serve.log" || { cat "$work/serve.log" >&2; fail "the installed corecast did not listen"; }
kill -TERM "$server"
status=0
wait "$server" || status=$?
server=
[ "$status" = 0 ] || { cat "$work/serve.log" >&2; fail "the installed corecast exited $status after SIGTERM"; }

# A local edit of the config survives a reinstall (an upgrade to the same version) and `dpkg -r`.
sed -i 's/"port": 8888/"port": 8899/' "$config"
dpkg -i "$deb"
grep -q '"port": 8899' "$config" || fail "the reinstall replaced the edited $config"
/usr/bin/corecast check --config "$config" >"$work/edited.json" || fail "corecast check of the edited $config"
grep -q '"port": 8899' "$work/edited.json" || fail "check does not see the edited port"
dpkg -r corecast
[ ! -e /usr/bin/corecast ] || fail "dpkg -r left /usr/bin/corecast"
grep -q '"port": 8899' "$config" || fail "dpkg -r removed the edited conffile"
dpkg --purge corecast
[ ! -e "$config" ] || fail "dpkg --purge left $config"
echo "test-deb: ok: installed, checked, served, upgraded over an edited config, removed, purged"
