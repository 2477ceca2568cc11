#!/usr/bin/env bash
# make release: static binaries of sockrelay for each of ARCHES (default: amd64 arm64), a .deb for each
# (nfpm, packaging/nfpm.yaml) and SHA256SUMS, under dist/. The version is `git describe --tags` (a tag
# vX.Y.Z makes a release), stamped into the binary with the commit; `sockrelay version` and the
# sockrelay_build_info metric print both.
set -euo pipefail
cd "$(dirname "$0")/.."

arches=${ARCHES:-amd64 arm64}
version=${VERSION:-$(git describe --tags --always --dirty)}
commit=${COMMIT:-$(git rev-parse HEAD)}

# Debian wants a version that starts with a digit and has no '-' (that would start the package
# revision): v1.2.3 → 1.2.3; 4 commits past it → 1.2.3+4.g0123abcd; no tag yet → 0.0.0+107.g0123abcd.
deb_version() {
	local d
	if d=$(git describe --tags --match 'v[0-9]*' --long --abbrev=12 2>/dev/null); then
		local tag=${d%-*-g*} rest=${d#"${d%-*-g*}"-}
		local n=${rest%%-*} hash=${rest#*-}
		if [ "$n" = 0 ]; then echo "${tag#v}"; else echo "${tag#v}+$n.$hash"; fi
	else
		echo "0.0.0+$(git rev-list --count HEAD).g$(git rev-parse --short=12 HEAD)"
	fi
}
DEB_VERSION=$(deb_version)
if [ -n "$(git status --porcelain --untracked-files=no)" ]; then
	DEB_VERSION+=".dirty"
fi
export DEB_VERSION

rm -rf dist
mkdir -p dist
for arch in $arches; do
	bin="dist/sockrelay_${version}_linux_${arch}"
	echo "release: $bin"
	CGO_ENABLED=0 GOOS=linux GOARCH=$arch go build -trimpath \
		-ldflags "-s -w -X main.version=$version -X main.commit=$commit" -o "$bin" ./cmd/sockrelay
	# nfpm takes no variable in a file's source path: the binary of the architecture at hand sits here.
	mkdir -p dist/.pkg
	cp "$bin" dist/.pkg/sockrelay
	echo "release: dist/sockrelay_${DEB_VERSION}_${arch}.deb"
	DEB_ARCH=$arch go tool nfpm package --config packaging/nfpm.yaml --packager deb --target dist/ >/dev/null
done
rm -rf dist/.pkg
(cd dist && sha256sum -- * > SHA256SUMS)
echo "release: $version ($commit) in dist/:"
ls -l dist
