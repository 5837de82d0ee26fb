#!/usr/bin/env bash
# Builds the real peers of the cluster tests, kube-apiserver and etcd, from the Go modules pinned
# in go.mod beside this script, into a cache outside the work tree keyed by their versions:
#   ~/.cache/injector/cluster/kube-apiserver-<v>_etcd-<v>/{kube-apiserver,etcd}
# A binary already there is reused; only what is missing is built. `make cluster-binaries` (and so
# `make test`) runs this. `build.sh --dir` prints the directory and builds nothing.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

# The versions come from go.mod alone, so that bumping a release there is the whole upgrade.
module_version() {
	awk -v mod="$1" '$1 == mod && $2 ~ /^v/ { print $2; exit }' "$here/go.mod"
}
kube_version="$(module_version k8s.io/kubernetes)"
etcd_version="$(module_version go.etcd.io/etcd/server/v3)"
if [[ -z "$kube_version" || -z "$etcd_version" ]]; then
	echo "build.sh: cannot read the pinned versions from $here/go.mod" >&2
	exit 2
fi
cache_root="${INJECTOR_CLUSTER_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/injector/cluster}"
dir="$cache_root/kube-apiserver-${kube_version}_etcd-${etcd_version}"

if [[ "${1:-}" == "--dir" ]]; then
	echo "$dir"
	exit 0
fi

# Go's own installer puts it in /usr/local/go/bin, which a non-login shell may not have on PATH.
if ! command -v go >/dev/null && [[ -x /usr/local/go/bin/go ]]; then
	PATH="$PATH:/usr/local/go/bin"
fi
if ! command -v go >/dev/null; then
	echo "build.sh: the cluster tests build kube-apiserver and etcd with Go, and 'go' is not on PATH" >&2
	exit 2
fi

mkdir -p "$dir"

# build NAME PACKAGE [LDFLAGS]: a binary is written under a temporary name and renamed when
# complete, so an interrupted build never leaves a half-written binary that looks reusable.
build() {
	local name="$1" package="$2" ldflags="${3:-}"
	if [[ -x "$dir/$name" ]]; then
		return
	fi
	echo "building $name ($package) into $dir" >&2
	local started=$SECONDS
	(cd "$here" && nice -n 10 go build -trimpath -buildvcs=false -mod=readonly \
		-ldflags "-s -w $ldflags" -o "$dir/.$name.partial" "$package")
	mv -f "$dir/.$name.partial" "$dir/$name"
	echo "built $name in $((SECONDS - started))s" >&2
}

# kube-apiserver reports the release it was built from (kubectl version, /version), as a release
# build would; without these it says v0.0.0-master.
version_flags="-X k8s.io/component-base/version.gitVersion=${kube_version}"
version_flags+=" -X k8s.io/component-base/version.gitMajor=$(cut -d. -f1 <<<"${kube_version#v}")"
version_flags+=" -X k8s.io/component-base/version.gitMinor=$(cut -d. -f2 <<<"${kube_version#v}")"
version_flags+=" -X k8s.io/client-go/pkg/version.gitVersion=${kube_version}"

build etcd go.etcd.io/etcd/server/v3
build kube-apiserver k8s.io/kubernetes/cmd/kube-apiserver "$version_flags"
