#!/usr/bin/env bash
# Builds the Debian package with cargo-deb and shows what it holds.
#
#   bench/package.sh            # -> target/debian/leadsync_<version>-1_<arch>.deb
#
# Needs cargo-deb (`cargo install cargo-deb`) and dpkg-deb. Not part of CI.
set -euo pipefail
cd "$(dirname "$0")/.."

command -v cargo-deb >/dev/null || { echo "cargo-deb is not installed: cargo install cargo-deb" >&2; exit 1; }
command -v dpkg-deb >/dev/null || { echo "dpkg-deb is not installed (apt-get install dpkg)" >&2; exit 1; }

echo "== cargo build --release"
cargo build --release --locked

echo "== man page and completions -> target/assets/"
mkdir -p target/assets
bin=target/release/leadsync
"$bin" man | gzip -9n > target/assets/leadsync.1.gz
"$bin" completions bash > target/assets/leadsync.bash
"$bin" completions zsh > target/assets/_leadsync
"$bin" completions fish > target/assets/leadsync.fish

echo "== cargo deb"
deb=$(cargo deb --no-build | tail -n 1)
echo "$deb"

echo "== dpkg-deb -I"
dpkg-deb -I "$deb"
echo "== dpkg-deb -c"
dpkg-deb -c "$deb"

# What must be in it, at these paths and modes.
contents=$(dpkg-deb -c "$deb")
fail=0
for want in \
    "-rwxr-xr-x (root/root|0/0) .* ./usr/bin/leadsync$" \
    "./usr/lib/systemd/system/leadsync.service$" \
    "./usr/lib/sysusers.d/leadsync.conf$" \
    "./usr/lib/tmpfiles.d/leadsync.conf$" \
    "-rw-r----- (root/root|0/0) .* ./etc/leadsync/leadsync.toml$" \
    "./usr/share/man/man1/leadsync.1.gz$" \
    "./usr/share/bash-completion/completions/leadsync$" \
    "./usr/share/zsh/vendor-completions/_leadsync$" \
    "./usr/share/fish/vendor_completions.d/leadsync.fish$" \
    "./usr/share/doc/leadsync/README.md$" \
    "./usr/share/doc/leadsync/copyright$"; do
    if ! grep -Eq -- "$want" <<<"$contents"; then
        echo "MISSING: $want" >&2
        fail=1
    fi
done
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
dpkg-deb -e "$deb" "$work/control"
dpkg-deb -x "$deb" "$work/root"
grep -qx "/etc/leadsync/leadsync.toml" "$work/control/conffiles" || { echo "MISSING: conffile" >&2; fail=1; }
grep -q "systemd-sysusers" "$work/control/postinst" || { echo "MISSING: sysusers in postinst" >&2; fail=1; }
grep -q "systemd-tmpfiles --create" "$work/control/postinst" || { echo "MISSING: tmpfiles in postinst" >&2; fail=1; }
grep -Eq "^d /var/lib/leadsync/private +0700 leadsync leadsync" "$work/root/usr/lib/tmpfiles.d/leadsync.conf" \
    || { echo "MISSING: the private token directory in tmpfiles.d" >&2; fail=1; }
grep -q "^ExecStart=/usr/bin/leadsync run" "$work/root/usr/lib/systemd/system/leadsync.service" \
    || { echo "the unit does not start /usr/bin/leadsync" >&2; fail=1; }
"$work/root/usr/bin/leadsync" --version
zcat "$work/root/usr/share/man/man1/leadsync.1.gz" | grep -q '^\.TH leadsync 1' || { echo "bad man page" >&2; fail=1; }
echo "== conffiles"; cat "$work/control/conffiles"
echo "== postinst"; cat "$work/control/postinst"
[ "$fail" = 0 ] && echo "== package OK: $deb"
exit "$fail"
