#!/usr/bin/env bash
# Build a local Kubernetes control plane (etcd, kube-apiserver, kube-controller-manager,
# kube-scheduler, kwok, helm, kubectl) from the Go module proxy only, into a cache
# outside the repo. Idempotent: finished binaries are kept and skipped. The last line printed on
# stdout is the bin dir, so callers can do BIN=$(scripts/k8s/build-bins.sh | tail -n1).
# With --check it builds nothing: it prints the bin dir if complete, else exits 3.
#
# Environment:
#   CONVEYOR_K8S_BIN      bin dir to use (default ~/.cache/conveyor-k8s/<versions>/bin)
#   CONVEYOR_K8S_KUBECTL  0 to skip kubectl (it costs about 30 s once the apiserver is built;
#                         the Python harness itself never calls it)
#   GOCACHE, GOMODCACHE   honoured as usual; they hold several GB after a build
set -euo pipefail

# One brace group around the whole script: bash parses it all before running any of it, so a
# checkout that rewrites this file during a half-hour build cannot derail the running copy.
{
K8S_VERSION=1.37.2
# kubeadm v1.37.2 pins etcd 3.7.0 (DefaultEtcdVersion); 3.7.4 is that minor's newest patch.
ETCD_VERSION=3.7.4
KWOK_VERSION=0.8.0
HELM_VERSION=4.3.2
# Bump when the build recipe changes in a way that changes the binaries (flags, stamping).
RECIPE=1

VERSIONS="k8s${K8S_VERSION}-etcd${ETCD_VERSION}-kwok${KWOK_VERSION}-helm${HELM_VERSION}-r${RECIPE}"
BIN="${CONVEYOR_K8S_BIN:-${HOME}/.cache/conveyor-k8s/${VERSIONS}/bin}"
WITH_KUBECTL="${CONVEYOR_K8S_KUBECTL:-1}"

REQUIRED=(etcd kube-apiserver kube-controller-manager kube-scheduler kwok helm)
case "${1:-}" in
    "") ;;
    --check)
        for c in "${REQUIRED[@]}" kwok-stages.yaml; do
            if [ ! -s "$BIN/$c" ]; then
                echo "missing $BIN/$c" >&2
                exit 3
            fi
        done
        echo "$BIN"
        exit 0
        ;;
    *)
        echo "usage: $0 [--check]" >&2
        exit 2
        ;;
esac

export PATH="/usr/local/go/bin:${PATH}"
# A module asking for a newer Go must fail here rather than fetch a toolchain.
export GOTOOLCHAIN=local
# Upstream builds these statically; cgo would also need a C toolchain on CI.
export CGO_ENABLED=0

log() { printf '[build-bins %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() {
    log "FAILED: $*"
    exit 1
}

command -v go >/dev/null || die "go not found (expected /usr/local/go/bin/go)"
case "$(go env GOVERSION)" in
    go1.2[6-9]* | go1.[3-9]*) ;;
    *) die "need Go >= 1.26, have $(go env GOVERSION)" ;;
esac

mkdir -p "$BIN"
BIN="$(cd "$BIN" && pwd)"
STATE="$(dirname "$BIN")"
TIMES="$STATE/build-times.txt"

# Two concurrent runs (a developer shell and CI) would race on the same outputs.
exec 9>"$STATE/.lock"
if ! flock -w 7200 9; then die "timed out waiting for lock $STATE/.lock"; fi

WORK="$(mktemp -d "$STATE/work.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT

have() { [ -x "$BIN/$1" ] && [ -s "$BIN/$1" ]; }

# Runs a build step, records its wall time; a step only counts as done once its output is
# renamed into place, so an interrupted build is redone rather than trusted.
timed() {
    local name="$1"
    shift
    local t0 t1
    t0=$(date +%s)
    log "building $name"
    "$@" || die "$name (see the go output above)"
    t1=$(date +%s)
    log "built $name in $((t1 - t0))s"
    printf '%s\t%ss\t%s\n' "$name" "$((t1 - t0))" "$(date -u +%FT%TZ)" >>"$TIMES"
}

# Prints the directory (Dir) or go.mod path (GoMod) of a module version from `go mod download`.
mod_field() {
    (cd "$WORK" && go mod download -json "$2") | sed -n "s/^[[:space:]]*\"$1\": \"\\(.*\\)\",*\$/\\1/p"
}

# --- kube-apiserver, kube-controller-manager, kube-scheduler, kubectl --------------------------
K8S_CMDS=(kube-apiserver kube-controller-manager kube-scheduler)
[ "$WITH_KUBECTL" = 1 ] && K8S_CMDS+=(kubectl)

# Note: these functions run under `timed ... || die`, where bash ignores `set -e`, so every
# step checks its own status.
k8s_wrapper() {
    # k8s.io/kubernetes requires its staging modules at v0.0.0 and maps them to ./staging with
    # replace lines that consumers ignore; pin each to the matching v0.X.Y release instead. The
    # list comes from the tag's own go.mod, so new staging modules are picked up by themselves.
    local dir="$WORK/k8s" gomod mods m staging="v0.${K8S_VERSION#1.}"
    local tools=()
    mkdir -p "$dir" || return 1
    gomod="$(mod_field GoMod "k8s.io/kubernetes@v${K8S_VERSION}")"
    [ -f "$gomod" ] || return 1
    mods="$(sed -n 's#^[[:space:]]*\(k8s\.io/[A-Za-z0-9._-]*\)[[:space:]]*=>[[:space:]]*\./staging/.*#\1#p' "$gomod")"
    if [ -z "$mods" ]; then
        echo "no staging replace lines found in $gomod" >&2
        return 1
    fi
    for m in "${K8S_CMDS[@]}"; do tools+=("k8s.io/kubernetes/cmd/$m@v${K8S_VERSION}"); done
    (
        cd "$dir" || exit 1
        go mod init local.invalid/conveyor-k8sbins || exit 1
        # The main module's go line sets GODEBUG defaults; match upstream's.
        go mod edit -go=1.26.0 -require="k8s.io/kubernetes@v${K8S_VERSION}" || exit 1
        for m in $mods; do go mod edit -replace="$m=$m@$staging" || exit 1; done
        go get -tool "${tools[@]}" || exit 1
    )
}

k8s_build_one() {
    local cmd="$1" minor
    minor="$(echo "$K8S_VERSION" | cut -d. -f2)"
    # Unstamped binaries report v0.0.0-master; helm checks chart kubeVersion against this.
    local ldf="-s -w"
    local pkg
    for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
        ldf+=" -X $pkg.gitVersion=v${K8S_VERSION} -X $pkg.gitMajor=1 -X $pkg.gitMinor=${minor}"
        ldf+=" -X $pkg.gitTreeState=clean -X $pkg.buildDate=1970-01-01T00:00:00Z"
    done
    (cd "$WORK/k8s" && go build -p 2 -trimpath -ldflags "$ldf" -o "$BIN/.$cmd.tmp" \
        "k8s.io/kubernetes/cmd/$cmd") || return 1
    if [ "$cmd" = kubectl ]; then
        "$BIN/.$cmd.tmp" version --client >&2 || return 1
    else
        "$BIN/.$cmd.tmp" --version >&2 || return 1
    fi
    mv -f "$BIN/.$cmd.tmp" "$BIN/$cmd" || return 1
}

need_k8s=0
for c in "${K8S_CMDS[@]}"; do have "$c" || need_k8s=1; done
if [ "$need_k8s" = 1 ]; then
    timed "k8s wrapper module (go get k8s.io/kubernetes@v${K8S_VERSION})" k8s_wrapper
    for c in "${K8S_CMDS[@]}"; do
        have "$c" || timed "$c" k8s_build_one "$c"
    done
fi

# --- etcd ---------------------------------------------------------------------------------------
etcd_build() {
    # server/go.mod carries local replace lines, so `go install ...@v` refuses it; a wrapper
    # module consumes it like any dependency, and its requires name real versions.
    local dir="$WORK/etcd"
    mkdir -p "$dir" || return 1
    (
        cd "$dir" || exit 1
        go mod init local.invalid/conveyor-etcdbin || exit 1
        go mod edit -go=1.26.0 || exit 1
        go get -tool "go.etcd.io/etcd/server/v3@v${ETCD_VERSION}" || exit 1
        go build -p 2 -trimpath -ldflags "-s -w" -o "$BIN/.etcd.tmp" go.etcd.io/etcd/server/v3
    ) || return 1
    "$BIN/.etcd.tmp" --version >&2 || return 1
    mv -f "$BIN/.etcd.tmp" "$BIN/etcd" || return 1
}
have etcd || timed etcd etcd_build

# --- kwok and helm: plain `go install`, which keeps each tool's own dependency versions --------
go_install() {
    local name="$1" pkg="$2" ldf="$3" gobin="$WORK/gobin-$1"
    mkdir -p "$gobin" || return 1
    GOBIN="$gobin" go install -p 2 -trimpath -ldflags "$ldf" "$pkg" || return 1
    "$gobin/$name" --version >&2 2>/dev/null || "$gobin/$name" version >&2 || return 1
    mv -f "$gobin/$name" "$BIN/$name" || return 1
}
have kwok || timed kwok go_install kwok "sigs.k8s.io/kwok/cmd/kwok@v${KWOK_VERSION}" "-s -w"
have helm || timed helm go_install helm "helm.sh/helm/v4/cmd/helm@v${HELM_VERSION}" \
    "-s -w -X helm.sh/helm/v4/internal/version.version=v${HELM_VERSION}"

# --- kwok stages ------------------------------------------------------------------------------
# The bare kwok binary refuses to start without Stage objects (kwokctl injects its defaults);
# take the same defaults from the module that was built rather than copying them into the repo.
kwok_stages() {
    local dir f out="$BIN/.kwok-stages.yaml.tmp"
    dir="$(mod_field Dir "sigs.k8s.io/kwok@v${KWOK_VERSION}")"
    [ -d "$dir" ] || return 1
    : >"$out" || return 1
    for f in node/fast/node-initialize.yaml \
        node/heartbeat-with-lease/node-heartbeat-with-lease.yaml \
        pod/fast/pod-ready.yaml pod/fast/pod-complete.yaml pod/fast/pod-delete.yaml; do
        [ -f "$dir/kustomize/stage/$f" ] || {
            echo "missing $dir/kustomize/stage/$f" >&2
            return 1
        }
        { echo '---' && cat "$dir/kustomize/stage/$f"; } >>"$out" || return 1
    done
    mv -f "$out" "$BIN/kwok-stages.yaml"
}
[ -s "$BIN/kwok-stages.yaml" ] || timed kwok-stages.yaml kwok_stages

cat >"$STATE/versions.txt" <<EOF
kubernetes v${K8S_VERSION}
etcd v${ETCD_VERSION}
kwok v${KWOK_VERSION}
helm v${HELM_VERSION}
go $(go env GOVERSION)
recipe ${RECIPE}
EOF

for c in "${REQUIRED[@]}"; do
    have "$c" || die "$c missing from $BIN after the build"
done
log "all binaries present in $BIN"
echo "$BIN"
exit 0
}
