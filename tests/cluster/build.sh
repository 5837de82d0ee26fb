#!/usr/bin/env bash
# Builds the real peers of the cluster tests, kube-apiserver and etcd, from the Go modules pinned
# in go.mod beside this script, and Helm from helm/go.mod (a module of its own: it needs newer
# k8s.io modules than kube-apiserver's), into a cache outside the work tree keyed by their versions:
#   ~/.cache/injector/cluster/kube-apiserver-<v>_etcd-<v>/{kube-apiserver,etcd}
#   ~/.cache/injector/cluster/helm-<v>/helm
# A binary already there is reused; only what is missing is built. `make cluster-binaries` (and so
# `make test`) runs this. `build.sh --dir` (`--helm-dir`) prints the directory and builds nothing.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

# The versions come from go.mod alone, so that bumping a release there is the whole upgrade.
# module_version MODULE [GO.MOD]
module_version() {
	awk -v mod="$1" '$1 == "require" { $1 = ""; $0 = $0 } $1 == mod && $2 ~ /^v/ { print $2; exit }' \
		"${2:-$here/go.mod}"
}
kube_version="$(module_version k8s.io/kubernetes)"
etcd_version="$(module_version go.etcd.io/etcd/server/v3)"
helm_version="$(module_version helm.sh/helm/v3 "$here/helm/go.mod")"
if [[ -z "$kube_version" || -z "$etcd_version" || -z "$helm_version" ]]; then
	echo "build.sh: cannot read the pinned versions from $here/go.mod and $here/helm/go.mod" >&2
	exit 2
fi
cache_root="${INJECTOR_CLUSTER_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/injector/cluster}"
dir="$cache_root/kube-apiserver-${kube_version}_etcd-${etcd_version}"
helm_dir="$cache_root/helm-${helm_version}"

if [[ "${1:-}" == "--dir" ]]; then
	echo "$dir"
	exit 0
fi
if [[ "${1:-}" == "--helm-dir" ]]; then
	echo "$helm_dir"
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

mkdir -p "$dir" "$helm_dir"

# build NAME PACKAGE [LDFLAGS [DIR [MODULE]]]: a binary is written under a temporary name and
# renamed when complete, so an interrupted build never leaves a half-written binary that looks
# reusable.
build() {
	local name="$1" package="$2" ldflags="${3:-}" into="${4:-$dir}" module="${5:-$here}"
	if [[ -x "$into/$name" ]]; then
		return
	fi
	echo "building $name ($package) into $into" >&2
	local started=$SECONDS
	(cd "$module" && nice -n 10 go build -trimpath -buildvcs=false -mod=readonly \
		-ldflags "-s -w $ldflags" -o "$into/.$name.partial.$$" "$package")
	# Each build writes its own partial file (two runs at once must not share one), and the
	# rename is atomic: the binary is there whole, or not at all.
	mv -f "$into/.$name.partial.$$" "$into/$name"
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

# Helm says which release it is (helm version), and its lint and template checks assume the
# Kubernetes minor of the client-go it is built with, as a release build does.
helm_k8s="$(module_version k8s.io/client-go "$here/helm/go.mod")"
helm_flags="-X helm.sh/helm/v3/internal/version.version=${helm_version}"
for package in pkg/lint/rules pkg/chartutil; do
	helm_flags+=" -X helm.sh/helm/v3/${package}.k8sVersionMajor=1"
	helm_flags+=" -X helm.sh/helm/v3/${package}.k8sVersionMinor=$(cut -d. -f2 <<<"${helm_k8s#v}")"
done
build helm helm.sh/helm/v3/cmd/helm "$helm_flags" "$helm_dir" "$here/helm"
