#!/usr/bin/env bash
# check_bazel_test.sh tests tools/check_bazel.sh and tools/update_bazel.sh on
# copies of this checkout: each case breaks one thing in a fresh copy and
# asserts that check_bazel.sh exits 1 with the message for that kind of drift
# (and, where update_bazel.sh can repair it, that after update_bazel.sh the
# check passes again). The checkout itself is never modified.
#
# The copies are first brought up to date with update_bazel.sh, so the tests
# do not depend on whether the checkout's own BUILD files are current (that
# is what check_bazel.sh itself checks in CI). A fixture package,
# pkg/zzbazelfixture, is added to each copy; it imports golang.org/x/sys/unix,
# which go.mod requires directly (pkg/pgalloc uses it).
#
# Usage: tools/check_bazel_test.sh   (CI runs it from .ci/run)
# It prints one line per case and closes with "N passed, N failed".
set -euo pipefail

# shellcheck source=tools/bazel_lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/bazel_lib.sh"
src=$BAZEL_ROOT
# All copies share one install of the pinned tools.
export BAZEL_TOOLS_BIN
bazel_install_tools

work=$(mktemp -d "${TMPDIR:-/tmp}/livesentry-bazel-test.XXXXXX")
trap 'rm -rf "$work"' EXIT

fixture=pkg/zzbazelfixture

# Baseline: a copy of the checkout (without .git, the tool cache and Bazel's
# output links) with the fixture package, brought up to date.
mkdir "$work/base"
tar -C "$src" --exclude=./.git --exclude=./.cache --exclude='./bazel-*' -cf - . | tar -C "$work/base" -xf -
mkdir -p "$work/base/$fixture"
cat >"$work/base/$fixture/fixture.go" <<'EOF'
// Package zzbazelfixture exists only in copies made by tools/check_bazel_test.sh.
package zzbazelfixture

import "golang.org/x/sys/unix"

// PageSize is the host page size.
var PageSize = unix.Getpagesize()
EOF
cat >"$work/base/$fixture/fixture_test.go" <<'EOF'
package zzbazelfixture

import "testing"

func TestPageSize(t *testing.T) {
	if PageSize <= 0 {
		t.Fatalf("PageSize = %d", PageSize)
	}
}
EOF
if ! "$work/base/tools/update_bazel.sh" >"$work/base.log" 2>&1; then
	cat "$work/base.log" >&2
	echo "check_bazel_test: update_bazel.sh could not bring a copy of the checkout up to date" >&2
	echo "0 passed, 1 failed"
	exit 1
fi
if ! grep -q '"@org_golang_x_sys//unix"' "$work/base/$fixture/BUILD.bazel"; then
	cat "$work/base/$fixture/BUILD.bazel" >&2
	echo "check_bazel_test: the fixture's BUILD file lacks its x/sys dependency" >&2
	echo "0 passed, 1 failed"
	exit 1
fi

# An indirect require of go.mod at test time (empty if there is none), and
# the repository gazelle names for it.
indirect_module=$(cd "$work/base" && go mod edit -json | awk '
	/"Path": / { p = $0; sub(/^[^:]*: "/, "", p); sub(/",?$/, "", p) }
	/"Indirect": true/ { print p; exit }')
indirect_repo=""
if [[ -n $indirect_module ]]; then
	indirect_repo=$(BAZEL_ROOT=$work/base bash -c 'source "$1/tools/bazel_lib.sh"; bazel_make_repo_config
		echo "$2" | bazel_repo_names | awk "{ print \$2 }"; bazel_cleanup' _ "$work/base" "$indirect_module")
fi

passed=0
failed=0
n=0

# run_case name want_rc want_text fixable mutation...
#   Copies the baseline, runs the mutation (a bash snippet, in the copy, under
#   set -euo pipefail, so each of its lines must succeed),
#   then check_bazel.sh. Passes if its exit status is want_rc and its output
#   contains want_text (a fixed string) and, when fixable is "fixable", if
#   update_bazel.sh then succeeds and the check passes again.
run_case() {
	local name=$1 want_rc=$2 want_text=$3 fixable=$4 mutation=$5
	local dir=$work/case$((++n)) rc=0 why=""
	cp -a "$work/base" "$dir"
	# A separate bash, so that set -e applies to every line of the mutation.
	if ! (cd "$dir" && bash -euo pipefail -c "$mutation") >"$dir.mutate.log" 2>&1; then
		why="the mutation failed: $(cat "$dir.mutate.log")"
	else
		"$dir/tools/check_bazel.sh" >"$dir.log" 2>&1 || rc=$?
		if ((rc != want_rc)); then
			why="check_bazel.sh exited $rc, want $want_rc"
		elif ! grep -qF -- "$want_text" "$dir.log"; then
			why="check_bazel.sh output lacks \"$want_text\""
		elif [[ $fixable == fixable ]] && ! "$dir/tools/update_bazel.sh" >"$dir.fix.log" 2>&1; then
			why="update_bazel.sh did not repair the drift"
			cat "$dir.fix.log" >>"$dir.log"
		fi
	fi
	if [[ -z $why ]]; then
		passed=$((passed + 1))
		echo "ok   - $name"
	else
		failed=$((failed + 1))
		echo "FAIL - $name: $why"
		sed 's/^/       | /' "$dir.log" 2>/dev/null || true
	fi
	rm -rf "$dir"
}

run_case "A clean tree passes" 0 "check_bazel: OK" no ":"

run_case "A new package without a BUILD file fails" 1 "missing BUILD file: these Go packages have no BUILD.bazel:
    pkg/zzbazelnew/BUILD.bazel" fixable '
	mkdir pkg/zzbazelnew
	printf "package zzbazelnew\n" >pkg/zzbazelnew/new.go'

run_case "A new source file makes its package's BUILD file stale" 1 "stale BUILD file" fixable "
	printf 'package zzbazelfixture\n' >$fixture/extra.go"

run_case "A package whose Go files are all removed fails" 1 "stale BUILD file" fixable "
	rm $fixture/*.go"

run_case "update_bazel.sh removes the BUILD file of a package that is gone" 0 "check_bazel: OK" no "
	rm $fixture/*.go
	tools/update_bazel.sh 2>&1 | grep -F 'removing $fixture/BUILD.bazel'
	test ! -e $fixture/BUILD.bazel"

run_case "A deps list missing an import fails" 1 "    $fixture/BUILD.bazel" fixable "
	sed -i '/\"@org_golang_x_sys\/\/unix\"/d' $fixture/BUILD.bazel
	! grep -q org_golang_x_sys $fixture/BUILD.bazel"

run_case "A deps list with a dependency the code does not import fails" 1 "stale BUILD file" fixable "
	sed -i 's|\"@org_golang_x_sys//unix\"|\"@org_golang_x_sys//unix\", \"//pkg/pgalloc\"|' $fixture/BUILD.bazel
	grep -q //pkg/pgalloc $fixture/BUILD.bazel"

run_case "A test file without a go_test rule fails" 1 "stale BUILD file" fixable "
	sed -i '/^go_test(/,\$d' $fixture/BUILD.bazel
	! grep -q '^go_test(' $fixture/BUILD.bazel"

run_case "An unformatted BUILD file fails" 1 "unformatted Bazel file: buildifier would reformat:
    $fixture/BUILD.bazel" fixable "
	sed -i 's/name = \"zzbazelfixture\"/name=\"zzbazelfixture\"/' $fixture/BUILD.bazel
	grep -q 'name=\"zzbazelfixture\"' $fixture/BUILD.bazel"

run_case "An unformatted MODULE.bazel fails" 1 "    MODULE.bazel" fixable '
	sed -i "s/^module(name = \"livesentry\")/module(name=\"livesentry\")/" MODULE.bazel
	grep -q "module(name=" MODULE.bazel'

run_case "A buildifier lint warning fails" 1 "buildifier lint" no '
	printf "def answer():\n    return 42\n" >tools_defs.bzl'

run_case "A direct require missing from use_repo fails" 1 "does not list their repositories:
    org_golang_x_sys (golang.org/x/sys)" fixable '
	sed -i "s/\"org_golang_x_sys\"//; s/, *,/,/; s/, *)/)/" MODULE.bazel
	! grep -q "\"org_golang_x_sys\"" MODULE.bazel'

run_case "MODULE.bazel without any use_repo fails" 1 "use_repo mismatch" fixable '
	sed -i "/^use_repo(go_deps/,/)/d" MODULE.bazel
	! grep -q "^use_repo" MODULE.bazel'

run_case "A use_repo entry that is not a direct require fails" 1 "not direct requires of go.mod (absent, or marked // indirect):
    com_example_not_required" fixable '
	sed -i "s/^use_repo(go_deps,/use_repo(go_deps, \"com_example_not_required\",/" MODULE.bazel
	grep -q com_example_not_required MODULE.bazel'

run_case "Two use_repo calls for go_deps fail" 1 "keep exactly one" fixable '
	echo "use_repo(go_deps, \"org_golang_x_sys\")" >>MODULE.bazel'

if [[ -n $indirect_module ]]; then
	run_case "A require that becomes direct in go.mod fails until use_repo lists it" 1 \
		"    $indirect_repo ($indirect_module)" fixable "
		sed -i 's|^\(\t*$indirect_module [^ ]*\) // indirect\$|\1|' go.mod
		go mod edit -json | grep -A3 '\"Path\": \"$indirect_module\"' | grep -vq Indirect"

	run_case "A module that provides a go.mod tool counts as direct" 1 \
		"    $indirect_repo ($indirect_module)" fixable "
		go mod edit -tool=$indirect_module/cmd/zzbazeltool
		grep -q zzbazeltool go.mod"

	run_case "A BUILD file using a module go.mod marks indirect fails" 1 \
		"    $fixture/BUILD.bazel uses @$indirect_repo" no "
		printf 'package zzbazelfixture\n\nimport _ \"$indirect_module/zzbazelpkg\"\n' >$fixture/indirect.go
		tools/update_bazel.sh || true
		grep -q '@$indirect_repo//zzbazelpkg' $fixture/BUILD.bazel"
else
	echo "skip - go.mod has no indirect require to make direct"
fi

run_case "An import no go.mod module provides fails" 1 "gazelle reported problems" no "
	printf 'package zzbazelfixture\n\nimport _ \"example.invalid/nomodule/pkg\"\n' >$fixture/unknown.go"

run_case "A WORKSPACE with a rule fails" 1 "WORKSPACE must hold comments only" no '
	echo "workspace(name = \"livesentry\")" >>WORKSPACE'

echo "$passed passed, $failed failed"
((failed == 0))
