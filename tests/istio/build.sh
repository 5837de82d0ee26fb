#!/usr/bin/env bash
# Builds the Istio peers of the tests, each a small main package of ours over Istio's own Go code
# (caclient/: Istio's CA client, as pilot-agent uses it), from the one module pinned in go.mod
# beside this script, into a cache outside the work tree keyed by Istio's version and by our own
# Go sources here (so that editing a tool rebuilds it instead of reusing a stale binary):
#   ~/.cache/injector/istio/<istio version>/<hash of our sources>/<tool>
# A binary already there is reused; only what is missing is built. `make cluster-binaries` (and
# so `make test`) runs this after tests/cluster/build.sh. `build.sh --dir` prints the directory
# and builds nothing. Istio's files are never copied here: tests read its test data from the Go
# module cache (`go env GOMODCACHE`) at test time.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

# The version comes from go.mod alone, so that bumping Istio there is the whole upgrade.
istio_version="$(awk '$1 == "require" { $1 = ""; $0 = $0 } $1 == "istio.io/istio" && $2 ~ /^v/ { print $2; exit }' \
	"$here/go.mod")"
if [[ -z "$istio_version" ]]; then
	echo "build.sh: cannot read Istio's pinned version from $here/go.mod" >&2
	exit 2
fi
cache_root="${INJECTOR_ISTIO_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/injector/istio}"
# Our sources: every Go file and the module files beside this script, hashed in a stable order.
sources_hash="$(cd "$here" && find . -name '*.go' -o -name go.mod -o -name go.sum | LC_ALL=C sort \
	| xargs sha256sum | sha256sum | cut -c1-12)"
dir="$cache_root/$istio_version/$sources_hash"

if [[ "${1:-}" == "--dir" ]]; then
	echo "$dir"
	exit 0
fi

# Go's own installer puts it in /usr/local/go/bin, which a non-login shell may not have on PATH.
if ! command -v go >/dev/null && [[ -x /usr/local/go/bin/go ]]; then
	PATH="$PATH:/usr/local/go/bin"
fi
if ! command -v go >/dev/null; then
	echo "build.sh: the Istio peers of the tests are built with Go, and 'go' is not on PATH" >&2
	exit 2
fi

mkdir -p "$dir"

# build NAME: ./NAME of this module into $dir/NAME, written under a temporary name and renamed
# when complete, so that an interrupted build never leaves a half-written binary that looks
# reusable. A tool's directory that is not there yet (another main package in flight) is skipped.
build() {
	local name="$1"
	if [[ -x "$dir/$name" || ! -d "$here/$name" ]]; then
		return
	fi
	echo "building $name (Istio $istio_version) into $dir" >&2
	local started=$SECONDS
	(cd "$here" && nice -n 10 go build -trimpath -buildvcs=false -mod=readonly \
		-ldflags "-s -w" -o "$dir/.$name.partial.$$" "./$name")
	# Named by this shell's pid: two builds at once (make test in two trees, say) each rename
	# their own, and the last complete binary wins.
	mv -f "$dir/.$name.partial.$$" "$dir/$name"
	echo "built $name in $((SECONDS - started))s" >&2
}

for tool in caclient inject injectbench webhook; do
	build "$tool"
done

# Istio's own BenchmarkInjection (pkg/kube/inject's tests), compiled once as a test binary: the
# benchmarks run it with its package directory in the module cache as the working directory, for
# the test data and charts it reads by relative path.
if [[ ! -x "$dir/inject.test" ]]; then
	echo "building inject.test (Istio $istio_version's pkg/kube/inject tests) into $dir" >&2
	started=$SECONDS
	(cd "$here" && nice -n 10 go test -c -trimpath -buildvcs=false -mod=readonly \
		-ldflags "-s -w" -o "$dir/.inject.test.partial.$$" istio.io/istio/pkg/kube/inject)
	mv -f "$dir/.inject.test.partial.$$" "$dir/inject.test"
	echo "built inject.test in $((SECONDS - started))s" >&2
fi
