#!/bin/sh
# Vendor the map's web map library into the package: `npm pack` of the version pinned in
# leaflet.lock, checked against the registry's sha512 there, unpacked into static/vendor/leaflet
# (the minified dist, its CSS and images, and its licence). Run by `make vendor` and by
# templates/Dockerfile.map; needs npm and node, and the registry once.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
spec=$(sed -n 1p "$here/leaflet.lock")
want=$(sed -n 2p "$here/leaflet.lock")
out="$here/static/vendor/leaflet"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
(cd "$work" && npm pack --silent "$spec" > name.txt)
tarball="$work/$(cat "$work/name.txt")"
got=$(node -e 'const c=require("crypto"),f=require("fs");
process.stdout.write("sha512-"+c.createHash("sha512").update(f.readFileSync(process.argv[1])).digest("base64"))' "$tarball")
if [ "$got" != "$want" ]; then
  echo "vendor.sh: $spec is $got, leaflet.lock pins $want" >&2
  exit 1
fi
tar xzf "$tarball" -C "$work" package/dist/leaflet.js package/dist/leaflet.css \
  package/dist/images package/LICENSE
rm -rf "$out" && mkdir -p "$out"
mv "$work"/package/dist/* "$work/package/LICENSE" "$out/"
echo "vendored $spec into $out" >&2
