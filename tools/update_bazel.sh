#!/usr/bin/env bash
# update_bazel.sh regenerates the repository's Bazel files from the Go code
# and go.mod, without Bazel, then runs tools/check_bazel.sh:
#
#   1. gazelle (pinned, -mode=fix, offline repo config) writes or updates the
#      BUILD.bazel of every Go package (go_library, go_binary, go_test), and
#      the BUILD.bazel of a directory whose Go files are all gone is removed;
#   2. MODULE.bazel's use_repo(go_deps, ...) is rewritten to list exactly
#      the repositories of go.mod's direct requires;
#   3. buildifier (pinned) formats every Bazel file.
#
# Hand-added attributes gazelle knows to keep (such as size = "small" on a
# go_test) survive. Lint warnings are not fixed automatically; check_bazel.sh
# reports them.
# Usage: tools/update_bazel.sh   (from anywhere; it works on its own checkout)
set -euo pipefail

# shellcheck source=tools/bazel_lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/bazel_lib.sh"
trap bazel_cleanup EXIT

bazel_install_tools
bazel_make_repo_config
cd "$BAZEL_ROOT"

bazel_gazelle fix

# Gazelle empties, but does not delete, the BUILD file of a directory that
# no longer holds Go files. Delete such empty files (never the root one).
while read -r empty; do
	bazel_log "removing $empty: its directory has no Go package any more"
	rm -- "$empty"
done < <(find . \( -path ./.git -o -path ./.cache -o -path './bazel-*' \) -prune -o \
	-mindepth 2 -name BUILD.bazel -type f -size 0 -print | sed 's|^\./||')

repos=$(bazel_expected_use_repo)
# shellcheck disable=SC2086 # one repository name per word
bazel_rewrite_use_repo $repos

mapfile -t files < <(bazel_files)
"$BUILDIFIER" -mode=fix "${files[@]}"

bazel_log "BUILD files and use_repo regenerated; checking"
"$BAZEL_ROOT/tools/check_bazel.sh"
