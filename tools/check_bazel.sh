#!/usr/bin/env bash
# check_bazel.sh checks, without Bazel, that the repository's Bazel files
# agree with the Go code and go.mod. CI runs it from .ci/run.
#
#   1. gazelle (pinned, -mode=diff, offline repo config) finds no BUILD.bazel
#      to create or change: every Go package has one, with current srcs,
#      deps and go_test rules;
#   2. buildifier (pinned, -mode=check -lint=warn) finds every Bazel file
#      formatted and free of lint warnings;
#   3. MODULE.bazel's use_repo(go_deps, ...) lists exactly the repositories of
#      go.mod's direct requires, as computed from go.mod now;
#   4. every external repository a BUILD file uses is visible to the root
#      module (in use_repo or a bazel_dep);
#   5. WORKSPACE holds comments only.
#
# It prints one message per kind of drift and exits 1 if there is any, 0 if
# all checks pass. tools/update_bazel.sh fixes drift of kinds 1 to 4.
# Usage: tools/check_bazel.sh   (from anywhere; it works on its own checkout)
set -euo pipefail

# shellcheck source=tools/bazel_lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/bazel_lib.sh"
trap bazel_cleanup EXIT

failed=()

# fail records a failed check: kind names the kind of drift, message says
# what is wrong, and the optional list (one item per line) follows, indented.
fail() {
	local kind=$1 message=$2 list=${3:-}
	failed+=("$kind")
	echo >&2
	echo "check_bazel: $kind: $message" >&2
	if [[ -n $list ]]; then
		printf '%s\n' "$list" | sed 's/^/    /' >&2
	fi
}

bazel_install_tools
bazel_make_repo_config
cd "$BAZEL_ROOT"

# 1. Gazelle. A "--- /dev/null" header is a package without a BUILD file;
# diff headers end in a tab and a timestamp.
gazelle_rc=0
bazel_gazelle diff >"$BAZEL_TMP/gazelle.diff" || gazelle_rc=$?
if ((gazelle_rc != 0)); then
	missing=$(awk -F '\t' '/^--- \/dev\/null/ { getline; sub(/^\+\+\+ /, "", $1); print $1 }' "$BAZEL_TMP/gazelle.diff")
	stale=$(awk -F '\t' '/^--- / && !/^--- \/dev\/null/ { sub(/^--- /, "", $1); print $1 }' "$BAZEL_TMP/gazelle.diff")
	if [[ -n $missing ]]; then
		fail "missing BUILD file" "these Go packages have no BUILD.bazel:" "$missing"
	fi
	if [[ -n $stale ]]; then
		fail "stale BUILD file" "these BUILD files do not match their Go sources (srcs, imports, tests or formatting changed):" "$stale"
	fi
	if [[ -s $BAZEL_TMP/gazelle.log ]]; then
		# bazel_gazelle has printed them.
		failed+=("gazelle problems")
	fi
	if [[ -z $missing && -z $stale ]]; then
		if [[ ! -s $BAZEL_TMP/gazelle.log ]]; then
			fail "gazelle" "gazelle failed (exit $gazelle_rc) without a diff or a message"
		fi
	else
		echo "gazelle -mode=diff (the change tools/update_bazel.sh would make):" >&2
		cat "$BAZEL_TMP/gazelle.diff" >&2
	fi
fi

# 2. Buildifier: formatting and lint warnings.
mapfile -t files < <(bazel_files)
if ! "$BUILDIFIER" -mode=check -lint=warn "${files[@]}" >"$BAZEL_TMP/buildifier.log" 2>&1; then
	unformatted=$(awk '/ # reformat$/ { print $1 }' "$BAZEL_TMP/buildifier.log")
	if [[ -n $unformatted ]]; then
		fail "unformatted Bazel file" "buildifier would reformat:" "$unformatted"
	fi
	if grep -qv ' # reformat$' "$BAZEL_TMP/buildifier.log"; then
		fail "buildifier lint" "buildifier -lint=warn reports (fix these by hand):" \
			"$(grep -v ' # reformat$' "$BAZEL_TMP/buildifier.log")"
	fi
fi

# 3. use_repo(go_deps, ...) against go.mod's direct requires.
calls=$(bazel_use_repo_calls)
if ((calls > 1)); then
	fail "use_repo mismatch" "MODULE.bazel has $calls use_repo(go_deps, ...) calls; keep exactly one"
fi
expected=$(bazel_expected_use_repo) || {
	fail "use_repo mismatch" "cannot compute the repositories of go.mod's direct requires"
	expected=""
}
actual=$(bazel_use_repo_names)
only_expected=$(comm -23 <(sed '/^$/d' <<<"$expected") <(sed '/^$/d' <<<"$actual"))
only_actual=$(comm -13 <(sed '/^$/d' <<<"$expected") <(sed '/^$/d' <<<"$actual"))
if [[ -n $only_expected ]]; then
	fail "use_repo mismatch" "go.mod requires these modules directly, but MODULE.bazel's use_repo(go_deps, ...) does not list their repositories:" \
		"$(bazel_direct_modules | bazel_repo_names |
			awk 'NR == FNR { want[$1] = 1; next } ($2 in want) { print $2 " (" $1 ")" }' <(echo "$only_expected") -)"
fi
if [[ -n $only_actual ]]; then
	fail "use_repo mismatch" "MODULE.bazel's use_repo(go_deps, ...) lists repositories that are not direct requires of go.mod (absent, or marked // indirect):" \
		"$only_actual"
fi

# 4. External repositories used by BUILD files must be visible to the root
# module. Gazelle writes a label for an imported module even if go.mod marks
# it "// indirect" (go mod tidy not run); Bazel would then fail to find it.
visible=$(printf '%s\n%s\n' "$actual" "$(bazel_module_deps)" | sed '/^$/d' | sort -u)
undeclared=""
for f in "${files[@]}"; do
	case $f in BUILD.bazel | BUILD | */BUILD.bazel | */BUILD) ;; *) continue ;; esac
	while read -r repo; do
		if ! grep -qxF "$repo" <<<"$visible"; then
			undeclared+="$f uses @$repo"$'\n'
		fi
	done < <(grep -o '"@[A-Za-z0-9_.~+-]*//' "$f" | sed 's/^"@//; s|//$||' | sort -u)
done
if [[ -n $undeclared ]]; then
	fail "undeclared repository" "BUILD files use repositories that MODULE.bazel does not make visible (is the module marked // indirect in go.mod? run go mod tidy, then tools/update_bazel.sh):" \
		"${undeclared%$'\n'}"
fi

# 5. WORKSPACE is a comment-only marker; dependencies live in MODULE.bazel.
if [[ ! -f WORKSPACE ]]; then
	fail "WORKSPACE" "WORKSPACE is missing (it marks the workspace root; see docs/bazel.md)"
elif grep -qv '^[[:space:]]*\(#.*\)\?$' WORKSPACE; then
	fail "WORKSPACE" "WORKSPACE must hold comments only; declare dependencies in MODULE.bazel:" \
		"$(grep -nv '^[[:space:]]*\(#.*\)\?$' WORKSPACE | sed 's/^/WORKSPACE:/')"
fi

if ((${#failed[@]} > 0)); then
	echo >&2
	echo "check_bazel: FAILED (${#failed[@]}): $(printf '%s; ' "${failed[@]}" | sed 's/; $//')." >&2
	echo "check_bazel: run tools/update_bazel.sh to regenerate the BUILD files and use_repo, then commit them." >&2
	exit 1
fi
echo "check_bazel: OK (gazelle $GAZELLE_VERSION, buildifier $BUILDIFIER_VERSION, ${#files[@]} Bazel files," \
	"use_repo: $(paste -sd ' ' <<<"${actual:-none}"))"
