#!/usr/bin/env bash
# go_tools.sh installs the pinned Go programs that CI's lint steps run and
# prints the path of each, one per line, in the order asked:
#
#   checklocks   gVisor's lock checker, a vet tool:
#                go vet -vettool="$(tools/go_tools.sh checklocks)" ./pkg/x/...
#   staticcheck  honnef.co/go/tools' staticcheck:
#                "$(tools/go_tools.sh staticcheck)" ./...
#
# Each is built with `go install PKG@VERSION` from the Go module proxy, from
# its own module's go.mod and go.sum at the pinned version, outside this
# repository: the project's go.mod and go.sum play no part and are never
# changed. The binaries go to .cache/bin (ignored by git; GO_TOOLS_BIN
# overrides it), and a binary already there is reused if `go version -m`
# shows it was built from exactly the pinned module version.
#
# Caveat for checklocks: go vet caches a package that it analysed only for
# the facts of a package importing it (vetting ./pkg/sentry/memfd analyses
# ./pkg/sentry/luo that way) under the same key as a full analysis, so a
# later `go vet -vettool=... ./pkg/sentry/luo` in the same directory
# replays "no findings". Vet ./... (as CI does), or pass -a, to see them all.
#
# Usage: tools/go_tools.sh NAME...   (from anywhere)
set -euo pipefail

# Pinned versions.
# checklocks comes from the gVisor module at the same version as go.mod's
# gvisor.dev/gvisor requirement; keep the two equal.
CHECKLOCKS_MODULE=gvisor.dev/gvisor
CHECKLOCKS_PKG=gvisor.dev/gvisor/tools/checklocks/cmd/checklocks
CHECKLOCKS_VERSION=v0.0.0-20260905035102-160fafc42237
# staticcheck 2026.2.2 (v0.8.2) is the newest release, and supports Go 1.26.
STATICCHECK_MODULE=honnef.co/go/tools
STATICCHECK_PKG=honnef.co/go/tools/cmd/staticcheck
STATICCHECK_VERSION=v0.8.2

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bin_dir=${GO_TOOLS_BIN:-$root/.cache/bin}

log() {
	echo "${0##*/}: $*" >&2
}

# install builds the main package pkg of module mod at version ver as
# $bin_dir/name unless it is there already, and prints its path.
install() {
	local name=$1 mod=$2 pkg=$3 ver=$4
	local bin=$bin_dir/$name
	if [[ -x $bin ]] && go version -m "$bin" 2>/dev/null |
		awk -v m="$mod" -v v="$ver" '$1 == "mod" && $2 == m && $3 == v { found = 1 } END { exit !found }'; then
		echo "$bin"
		return 0
	fi
	log "installing $name from $mod@$ver into $bin_dir"
	mkdir -p "$bin_dir"
	# Outside the repository, so that its go.mod plays no part.
	(cd / && GOBIN=$bin_dir GOFLAGS=-mod=mod go install "$pkg@$ver") >&2
	echo "$bin"
}

if (($# == 0)); then
	log "usage: tools/go_tools.sh checklocks|staticcheck..."
	exit 2
fi
for name in "$@"; do
	case $name in
	checklocks) install checklocks "$CHECKLOCKS_MODULE" "$CHECKLOCKS_PKG" "$CHECKLOCKS_VERSION" ;;
	staticcheck) install staticcheck "$STATICCHECK_MODULE" "$STATICCHECK_PKG" "$STATICCHECK_VERSION" ;;
	*)
		log "unknown tool $name (known: checklocks, staticcheck)"
		exit 2
		;;
	esac
done
