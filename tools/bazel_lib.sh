# shellcheck shell=bash
# Shared code of tools/check_bazel.sh and tools/update_bazel.sh. Source it from
# a script that has `set -euo pipefail`; it defines functions and variables
# only, and changes nothing until one of them is called.
#
# Nothing here needs Bazel. Gazelle and buildifier are standalone Go programs,
# installed with `go install` at pinned versions into a cache directory. See
# docs/bazel.md for what is and is not verified.

# Pinned tool versions. Gazelle v0.54.0 does not build with `go install`.
# Keep the gazelle version equal to bazel_dep(name = "gazelle") in MODULE.bazel.
# This buildifier is the buildtools revision that gazelle v0.53.0 depends on.
# buildtools publishes no tagged Go module versions, only pseudo-versions.
GAZELLE_MODULE=github.com/bazelbuild/bazel-gazelle
GAZELLE_VERSION=v0.53.0
BUILDIFIER_MODULE=github.com/bazelbuild/buildtools
BUILDIFIER_VERSION=v0.0.0-20250930140053-2eb4fccefb52

# sort, comm and join must agree on one collation.
export LC_ALL=C

# BAZEL_ROOT is the repository root: the parent of the directory that holds
# this file.
BAZEL_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

# BAZEL_TOOLS_BIN is where gazelle and buildifier are installed. It is
# repo-local and ignored by git (.gitignore has /.cache/); tests point it at a
# shared directory so that copies of the tree reuse one install.
BAZEL_TOOLS_BIN=${BAZEL_TOOLS_BIN:-$BAZEL_ROOT/.cache/bin}

# shellcheck disable=SC2034 # used by the scripts that source this file
GAZELLE=$BAZEL_TOOLS_BIN/gazelle
# shellcheck disable=SC2034
BUILDIFIER=$BAZEL_TOOLS_BIN/buildifier

# bazel_log prints its arguments to stderr with the script's name in front.
bazel_log() {
	echo "${0##*/}: $*" >&2
}

# bazel_install_tool installs the main package pkg of module mod at version
# ver as $BAZEL_TOOLS_BIN/name, unless the binary there was already built
# from exactly that module version.
bazel_install_tool() {
	local name=$1 mod=$2 pkg=$3 ver=$4
	local bin=$BAZEL_TOOLS_BIN/$name
	if [[ -x $bin ]] && go version -m "$bin" 2>/dev/null |
		awk -v m="$mod" -v v="$ver" '$1 == "mod" && $2 == m && $3 == v { found = 1 } END { exit !found }'; then
		return 0
	fi
	bazel_log "installing $name from $mod@$ver into $BAZEL_TOOLS_BIN"
	mkdir -p "$BAZEL_TOOLS_BIN"
	# Build outside the repository so that its go.mod plays no part.
	(cd / && GOBIN=$BAZEL_TOOLS_BIN GOFLAGS=-mod=mod go install "$pkg@$ver")
}

# bazel_install_tools installs the pinned gazelle and buildifier.
bazel_install_tools() {
	bazel_install_tool gazelle "$GAZELLE_MODULE" "$GAZELLE_MODULE/cmd/gazelle" "$GAZELLE_VERSION"
	bazel_install_tool buildifier "$BUILDIFIER_MODULE" "$BUILDIFIER_MODULE/buildifier" "$BUILDIFIER_VERSION"
}

# bazel_make_repo_config writes, into the new directory $BAZEL_TMP, a
# WORKSPACE and repos.bzl that declare one go_repository per module of go.mod's
# build list. Gazelle reads them through -repo_config to map an import path to
# its repository name (org_golang_x_sys, ...) without any network lookup.
# Without it, standalone gazelle runs `go get` for every external import and,
# when that fails (GOPROXY=off, no network), silently drops the dependency.
bazel_make_repo_config() {
	BAZEL_TMP=$(mktemp -d "${TMPDIR:-/tmp}/livesentry-bazel.XXXXXX")
	cp "$BAZEL_ROOT/go.mod" "$BAZEL_ROOT/go.sum" "$BAZEL_TMP/"
	: >"$BAZEL_TMP/WORKSPACE"
	if ! (cd "$BAZEL_TMP" && GOFLAGS=-mod=mod "$GAZELLE" update-repos -from_file=go.mod \
		-to_macro=repos.bzl%go_repositories) >"$BAZEL_TMP/update-repos.log" 2>&1; then
		cat "$BAZEL_TMP/update-repos.log" >&2
		bazel_log "gazelle update-repos could not read go.mod and go.sum (is the module cache reachable?)"
		return 1
	fi
}

# bazel_cleanup removes $BAZEL_TMP. Scripts call it from an EXIT trap.
bazel_cleanup() {
	if [[ -n ${BAZEL_TMP:-} ]]; then
		rm -rf "$BAZEL_TMP"
	fi
}

# bazel_gazelle runs gazelle over the repository in the given mode (fix or
# diff) with the offline repo config, GOPROXY=off so that an import it cannot
# place is an error, not a network lookup. The diff goes to stdout, gazelle's
# messages to $BAZEL_TMP/gazelle.log. It returns gazelle's exit status, or 1 if
# gazelle said anything at all: with a complete repo config it is silent, and
# any message (an unresolvable import, a package it could not parse) means a
# BUILD file may be missing a dependency.
bazel_gazelle() {
	local mode=$1 rc=0
	(cd "$BAZEL_ROOT" && GOPROXY=off GOFLAGS=-mod=mod "$GAZELLE" -repo_root=. \
		-repo_config="$BAZEL_TMP/WORKSPACE" -mode="$mode") 2>"$BAZEL_TMP/gazelle.log" || rc=$?
	if [[ -s $BAZEL_TMP/gazelle.log ]]; then
		bazel_log "gazelle reported problems (an import not provided by any module in go.mod, or a file it could not parse):"
		sed 's/^/    /' "$BAZEL_TMP/gazelle.log" >&2
		return 1
	fi
	return "$rc"
}

# bazel_files prints, one per line and relative to the root, every Bazel file
# buildifier should see: BUILD files, .bzl files, MODULE.bazel and WORKSPACE.
# It skips .git, the tool cache and Bazel's output symlinks.
bazel_files() {
	(cd "$BAZEL_ROOT" && find . \
		\( -path ./.git -o -path ./.cache -o -path './bazel-*' \) -prune -o \
		-type f \( -name BUILD -o -name BUILD.bazel -o -name '*.bzl' -o -name MODULE.bazel \
		-o -name WORKSPACE -o -name WORKSPACE.bazel -o -name REPO.bazel \) -print) |
		sed 's|^\./||' | sort
}

# bazel_direct_modules prints the module paths that go.mod requires directly
# (without "// indirect"), plus the modules that provide a package named by a
# go.mod "tool" directive, which go_deps also treats as direct. This is the
# set that go_deps expects in use_repo.
bazel_direct_modules() {
	(cd "$BAZEL_ROOT" && go mod edit -json) | awk '
		# go mod edit -json prints one field per line, indented, e.g.
		#   "Require": [ { "Path": "x", "Version": "v1", "Indirect": true }, ... ]
		function flush() {
			if (path != "") {
				if (section == "Require") {
					req[path] = 1
					if (!indirect) direct[path] = 1
				} else if (section == "Tool") {
					tool[path] = 1
				}
			}
			path = ""; indirect = 0
		}
		/^\t"[A-Za-z]+": \[/ { flush(); section = $1; gsub(/[":]/, "", section); next }
		/^\t"[A-Za-z]+":/ { flush(); section = ""; next }
		/^\t\t\{/ { flush(); next }
		/^\t\t\}/ { flush(); next }
		/^\t\t\t"Path": / { p = $0; sub(/^[^:]*: "/, "", p); sub(/",?$/, "", p); path = p; next }
		/^\t\t\t"Indirect": true/ { indirect = 1; next }
		END {
			flush()
			for (t in tool) {
				best = ""
				for (m in req) {
					if ((t == m || index(t, m "/") == 1) && length(m) > length(best)) best = m
				}
				if (best != "") direct[best] = 1
			}
			for (m in direct) print m
		}' | sort -u
}

# bazel_repo_names reads module paths on stdin and prints "path repo" for
# each, with the repository name gazelle gives that module (the same name the
# go_deps extension uses). It needs the repo config of bazel_make_repo_config.
# A module missing from the repo config is printed with repo "?".
bazel_repo_names() {
	awk '
		FNR == NR {
			if ($0 ~ /go_repository\(/) { name = ""; imp = "" }
			if ($0 ~ /^ *name = "/) { name = $0; sub(/^[^"]*"/, "", name); sub(/".*/, "", name) }
			if ($0 ~ /^ *importpath = "/) { imp = $0; sub(/^[^"]*"/, "", imp); sub(/".*/, "", imp) }
			if (name != "" && imp != "") { repo[imp] = name; name = ""; imp = "" }
			next
		}
		NF { print $1, ($1 in repo ? repo[$1] : "?") }
	' "$BAZEL_TMP/repos.bzl" -
}

# bazel_use_repo_calls prints how many use_repo(go_deps ...) calls MODULE.bazel
# has.
bazel_use_repo_calls() {
	grep -c '^[[:space:]]*use_repo([[:space:]]*go_deps\b' "$BAZEL_ROOT/MODULE.bazel" || true
}

# bazel_use_repo_names prints the repository names listed in MODULE.bazel's
# use_repo(go_deps, ...) call, one per line and sorted. Comments are ignored.
bazel_use_repo_names() {
	awk '
		!inside && /^[[:space:]]*use_repo\([[:space:]]*go_deps/ { inside = 1; sub(/^[^(]*\([[:space:]]*go_deps/, "") }
		inside {
			line = $0
			sub(/#.*/, "", line)
			done = line ~ /\)/
			sub(/\).*/, "", line)
			while (match(line, /"[^"]*"/)) {
				print substr(line, RSTART + 1, RLENGTH - 2)
				line = substr(line, RSTART + RLENGTH)
			}
			if (done) inside = 0
		}
	' "$BAZEL_ROOT/MODULE.bazel" | sort -u
}

# bazel_expected_use_repo prints the repository names that use_repo(go_deps,
# ...) must list, sorted. It fails if a direct module has no repository name.
bazel_expected_use_repo() {
	local pairs
	pairs=$(bazel_direct_modules | bazel_repo_names)
	if grep -q ' ?$' <<<"$pairs"; then
		bazel_log "no repository name for these go.mod requires (missing from go.sum?):"
		grep ' ?$' <<<"$pairs" | sed 's/ ?$//; s/^/    /' >&2
		return 1
	fi
	if [[ -n $pairs ]]; then
		awk '{ print $2 }' <<<"$pairs" | sort -u
	fi
}

# bazel_module_deps prints the repository names that MODULE.bazel's
# bazel_dep calls make visible (repo_name if given, else name).
bazel_module_deps() {
	awk '
		/bazel_dep\(/ { stmt = ""; inside = 1 }
		inside {
			stmt = stmt $0
			if ($0 ~ /\)/) {
				inside = 0
				name = stmt; repo = ""
				if (match(stmt, /repo_name *= *"[^"]*"/)) { repo = substr(stmt, RSTART, RLENGTH); sub(/^[^"]*"/, "", repo); sub(/"$/, "", repo) }
				sub(/.*[^_]name *= *"/, "", name); sub(/".*/, "", name)
				print (repo != "" ? repo : name)
			}
		}
	' "$BAZEL_ROOT/MODULE.bazel" | sort -u
}

# bazel_rewrite_use_repo replaces MODULE.bazel's use_repo(go_deps, ...) call
# with one that lists exactly the given repositories (arguments), appends one
# if there is none, or removes it when there are no repositories. buildifier
# formats it afterwards.
bazel_rewrite_use_repo() {
	local module=$BAZEL_ROOT/MODULE.bazel call=""
	if (($# > 0)); then
		call=$(printf 'use_repo(go_deps'; printf ', "%s"' "$@"; printf ')')
	fi
	awk -v call="$call" '
		!inside && /^[[:space:]]*use_repo\([[:space:]]*go_deps/ {
			inside = 1
			if (!done && call != "") print call
			done = 1
		}
		inside { line = $0; sub(/#.*/, "", line); if (line ~ /\)/) inside = 0; next }
		{ print }
		END { if (!done && call != "") print call }
	' "$module" >"$module.tmp"
	mv "$module.tmp" "$module"
}
