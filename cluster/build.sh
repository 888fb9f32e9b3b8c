#!/usr/bin/env bash
# Build (or find cached) every binary the local cluster runs, and install Prometheus from Debian.
#
# Go tools are built from the Go module proxy into $CACHE_DIR/tools/<name>-<version>/ and symlinked
# into $CACHE_DIR/bin; a tool whose directory holds a .ok stamp is not rebuilt, so a warm run takes
# seconds. Versions are pinned in cluster/versions.env. GOMODCACHE and GOCACHE stay at Go's defaults
# (outside the repository), so an interrupted build resumes from its compiled packages.
#
# Usage: cluster/build.sh            build everything that is missing
#        CACHE_DIR=... cluster/build.sh
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=versions.env
source "$here/versions.env"
# shellcheck source=lib.sh
source "$here/lib.sh"

CACHE_DIR="${CACHE_DIR:-$HOME/.cache/finetune-operator}"
TOOLS="$CACHE_DIR/tools"
BIN="$CACHE_DIR/bin"
mkdir -p "$TOOLS" "$BIN"

# Static, reproducible binaries. -p 2: the machines running this have two cores that other builds
# share. -mod=mod lets the wrapper modules below record their go.sum on first use.
export CGO_ENABLED=0
export GOFLAGS="-trimpath -buildvcs=false -mod=mod -p=2"
export GOTOOLCHAIN=local

started=$SECONDS

# link_tools DIR: expose every binary of a versioned tool directory in $CACHE_DIR/bin.
link_tools() {
  local f
  for f in "$1"/bin/*; do ln -sfn "$f" "$BIN/$(basename "$f")"; done
}

# cached NAME VERSION: true (and relinks) when NAME-VERSION is already built.
cached() {
  local dir="$TOOLS/$1-$2"
  if [[ -f "$dir/.ok" ]]; then
    link_tools "$dir"
    log "$1 $2: cached in $dir"
    return 0
  fi
  return 1
}

# go_install NAME VERSION PACKAGE@VERSION [LDFLAGS]: for modules without replace directives.
go_install() {
  local name=$1 version=$2 pkg=$3 ldflags=${4:-}
  cached "$name" "$version" && return 0
  local dir="$TOOLS/$name-$version" t=$SECONDS
  log "$name $version: go install $pkg (cold build: a few minutes)"
  rm -rf "$dir" && mkdir -p "$dir/bin"
  GOBIN="$dir/bin" go install -ldflags "-s -w $ldflags" "$pkg"
  touch "$dir/.ok"
  link_tools "$dir"
  log "$name $version: built in $(elapsed "$t")"
}

# staging_replaces GOMOD PREFIX VERSION: a "replace M => M VERSION" line for every module of GOMOD
# that is replaced by a local path (./staging/..., ../api) and whose path starts with PREFIX.
staging_replaces() {
  awk -v prefix="$2" -v version="$3" '
    $1 == "replace" && $2 == "(" { inblock = 1; next }
    inblock && $1 == ")" { inblock = 0; next }
    { line = $0; sub(/^replace[ \t]+/, "", line); n = split(line, f, /[ \t]+/) }
    (inblock || $1 == "replace") {
      # fields: module [version] => target [version]; a local target starts with "."
      for (i = 1; i <= n; i++) if (f[i] == "=>") break
      mod = (f[1] == "" ? f[2] : f[1])
      if (i < n && f[i + 1] ~ /^\./ && index(mod, prefix) == 1) print "replace " mod " => " mod " " version
    }' "$1" | sort -u
}

# module_gomod MODULE@VERSION: path of that module's go.mod in the module cache (downloads it).
module_gomod() {
  go mod download -json "$1" | sed -n 's/^\t"GoMod": "\(.*\)",$/\1/p'
}

build_kubernetes() {
  local version=$KUBERNETES_VERSION
  cached kubernetes "$version" && return 0
  local dir="$TOOLS/kubernetes-$version" src="$TOOLS/src/kubernetes-$version" t=$SECONDS
  local minor=${version#v1.}; minor=${minor%%.*}
  log "kubernetes $version: preparing wrapper module in $src"
  mkdir -p "$src"
  local gomod; gomod=$(module_gomod "k8s.io/kubernetes@$version")
  # k8s.io/kubernetes replaces its staging modules (k8s.io/api, ...) with ./staging paths, which a
  # dependent module cannot use; point each at its published v0.<minor>.<patch> release instead.
  {
    echo "module finetune.dev/cluster-build/kubernetes"
    echo
    echo "go $(go env GOVERSION | sed 's/^go//')"
    echo
    echo "require k8s.io/kubernetes $version"
    echo
    staging_replaces "$gomod" "k8s.io/" "v0.${version#v1.}"
  } >"$src/go.mod"
  log "kubernetes $version: $(grep -c '^replace' "$src/go.mod") staging modules replaced"
  cat >"$src/tools.go" <<'EOF'
//go:build tools

// Package tools pins the commands built from k8s.io/kubernetes, so "go mod tidy" records them.
package tools

import (
	_ "k8s.io/kubernetes/cmd/kube-apiserver"
	_ "k8s.io/kubernetes/cmd/kube-controller-manager"
	_ "k8s.io/kubernetes/cmd/kube-scheduler"
	_ "k8s.io/kubernetes/cmd/kubectl"
	_ "k8s.io/kubernetes/cmd/kubelet"
)
EOF
  log "kubernetes $version: resolving dependencies (go mod tidy)"
  (cd "$src" && go mod tidy)
  local ldflags="-s -w" pkg
  for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    ldflags+=" -X $pkg.gitVersion=$version -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor"
    ldflags+=" -X $pkg.gitTreeState=clean"
  done
  log "kubernetes $version: compiling kube-apiserver, kube-controller-manager, kube-scheduler, kubectl, kubelet (cold: 15-30 min on 2 cores)"
  rm -rf "$dir" && mkdir -p "$dir/bin"
  # One invocation for all five, so the packages they share are compiled once.
  (cd "$src" && go build -ldflags "$ldflags" -o "$dir/bin/" \
    k8s.io/kubernetes/cmd/kube-apiserver k8s.io/kubernetes/cmd/kube-controller-manager \
    k8s.io/kubernetes/cmd/kube-scheduler k8s.io/kubernetes/cmd/kubectl \
    k8s.io/kubernetes/cmd/kubelet)
  touch "$dir/.ok"
  link_tools "$dir"
  log "kubernetes $version: built in $(elapsed "$t")"
}

build_etcd() {
  local version=$ETCD_VERSION
  cached etcd "$version" && return 0
  local dir="$TOOLS/etcd-$version" src="$TOOLS/src/etcd-$version" t=$SECONDS
  log "etcd $version: preparing wrapper module in $src"
  mkdir -p "$src"
  local gomod; gomod=$(module_gomod "go.etcd.io/etcd/server/v3@$version")
  # Same trick as Kubernetes: server/go.mod replaces its sibling modules with ../api etc.
  {
    echo "module finetune.dev/cluster-build/etcd"
    echo
    echo "go $(go env GOVERSION | sed 's/^go//')"
    echo
    echo "require go.etcd.io/etcd/server/v3 $version"
    echo
    staging_replaces "$gomod" "go.etcd.io/etcd/" "$version"
  } >"$src/go.mod"
  cat >"$src/tools.go" <<'EOF'
//go:build tools

// Package tools pins the etcd server command, so "go mod tidy" records its dependencies.
package tools

import _ "go.etcd.io/etcd/server/v3"
EOF
  (cd "$src" && go mod tidy)
  log "etcd $version: compiling"
  rm -rf "$dir" && mkdir -p "$dir/bin"
  (cd "$src" && go build -ldflags "-s -w" -o "$dir/bin/etcd" go.etcd.io/etcd/server/v3)
  touch "$dir/.ok"
  link_tools "$dir"
  log "etcd $version: built in $(elapsed "$t")"
}

# Debian packages: Prometheus (with promtool) and the Pushgateway, which the cluster runs, and the
# test data and tools the suite needs (Fashion-MNIST, a Lua 5.1 interpreter).
install_debian_packages() {
  local missing=()
  { command -v prometheus && command -v promtool; } >/dev/null ||
    missing+=("prometheus=$PROMETHEUS_DEB_VERSION")
  command -v prometheus-pushgateway >/dev/null ||
    missing+=("prometheus-pushgateway=$PUSHGATEWAY_DEB_VERSION")
  dpkg-query -W -f '${Status}' dataset-fashion-mnist 2>/dev/null | grep -q "ok installed" ||
    missing+=("dataset-fashion-mnist=$FASHION_MNIST_DEB_VERSION")
  command -v lua5.1 >/dev/null || missing+=("lua5.1=$LUA_DEB_VERSION")
  # The real node: containerd and runc run its pods, the CNI plugins wire them to the bridge.
  command -v containerd >/dev/null || missing+=("containerd=$CONTAINERD_DEB_VERSION")
  command -v runc >/dev/null || missing+=("runc=$RUNC_DEB_VERSION")
  [[ -x /usr/lib/cni/bridge && -x /usr/lib/cni/host-local ]] ||
    missing+=("containernetworking-plugins=$CNI_PLUGINS_DEB_VERSION")
  if [[ ${#missing[@]} -eq 0 ]]; then
    log "Debian packages: prometheus, prometheus-pushgateway, dataset-fashion-mnist, lua5.1, containerd, runc, CNI plugins (installed)"
    return 0
  fi
  log "Debian packages: installing ${missing[*]}"
  apt_install "${missing[@]}"
}

# The pod sandbox ("pause") binary for containerd's sandbox image, cached by its source's hash.
build_pause() {
  local version; version=$(sha256sum "$here/pause/main.go" | cut -c1-12)
  cached pause "$version" && return 0
  local dir="$TOOLS/pause-$version"
  rm -rf "$dir" && mkdir -p "$dir/bin"
  (cd "$here/pause" && GO111MODULE=off go build -ldflags "-s -w" -o "$dir/bin/finetune-pause" main.go)
  touch "$dir/.ok"
  link_tools "$dir"
  log "pause $version: built"
}

main() {
  command -v go >/dev/null || { echo "go is required (Go >= 1.26)" >&2; exit 1; }
  log "building the local cluster's binaries into $TOOLS (linked in $BIN) with $(go env GOVERSION)"
  install_debian_packages
  # helm first: the chart's tests want it and it builds in a few minutes; Kubernetes is the long pole.
  go_install helm "$HELM_VERSION" "helm.sh/helm/v3/cmd/helm@$HELM_VERSION" \
    "-X helm.sh/helm/v3/internal/version.version=$HELM_VERSION"
  build_pause
  build_kubernetes
  build_etcd
  go_install kwok "$KWOK_VERSION" "sigs.k8s.io/kwok/cmd/kwok@$KWOK_VERSION"
  go_install coredns "$COREDNS_VERSION" "github.com/coredns/coredns@$COREDNS_VERSION"
  go_install versitygw "$VERSITYGW_VERSION" "github.com/versity/versitygw/cmd/versitygw@$VERSITYGW_VERSION" \
    "-X main.Version=$VERSITYGW_VERSION"
  log "all cluster binaries ready in $BIN ($(elapsed "$started"))"
}

main "$@"
