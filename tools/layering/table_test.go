// Package layering checks that the layering table of docs/design.md (which
// package of the module imports which) describes the code: every import
// between packages of the module is in the table, every arrow the table
// claims is in the code, and the rows are in layer order, each package
// importing only packages in rows above it.
//
// The table is the source of truth and is edited by hand: adding a package,
// or an import between packages, means adding its row or arrow there, and
// nothing here. Only the imports of a package's non-test Go files count;
// tests may reach across layers. Packages made of tests only (test/,
// tools/layering) need no row.
//
// The package has test files only: `go test ./tools/layering` is the check,
// and CI runs it.
package layering

import (
	"fmt"
	"slices"
	"strings"
)

// designDoc is the document that holds the table, relative to the module
// root.
const designDoc = "docs/design.md"

// row is one row of the layering table.
type row struct {
	pkg     string   // package path relative to the module root
	imports []string // packages of the module it imports, as written
	line    int      // line number in the document, from 1
}

// table is the parsed layering table, rows in document order.
type table struct {
	rows []row
	line int // line of the header
}

// parseTable finds the layering table in doc, a Markdown document: the first
// table whose header has a "package" and an "imports" column. A package
// cell holds one path in backquotes, relative to the module root; an
// imports cell holds such paths separated by commas, or "—" (or "-", or
// nothing) for none. Anything else in those two cells is an error that
// names the line.
func parseTable(name, doc string) (*table, error) {
	lines := strings.Split(doc, "\n")
	for i := 0; i < len(lines); i++ {
		header, ok := cells(lines[i])
		if !ok {
			continue
		}
		pkgCol, importsCol := -1, -1
		for j, c := range header {
			switch strings.ToLower(c) {
			case "package":
				pkgCol = j
			case "imports":
				importsCol = j
			}
		}
		if pkgCol < 0 || importsCol < 0 {
			continue
		}
		t := &table{line: i + 1}
		if i+1 >= len(lines) || !isSeparator(lines[i+1]) {
			return nil, fmt.Errorf("%s:%d: the layering table's header is not followed by a |---|---| line", name, i+1)
		}
		seen := map[string]int{}
		for k := i + 2; k < len(lines); k++ {
			cs, ok := cells(lines[k])
			if !ok {
				break
			}
			if len(cs) != len(header) {
				return nil, fmt.Errorf("%s:%d: the row has %d cells, the header %d", name, k+1, len(cs), len(header))
			}
			pkgs, err := paths(cs[pkgCol])
			if err != nil || len(pkgs) != 1 {
				return nil, fmt.Errorf("%s:%d: the package cell %q must hold one path in backquotes, such as `pkg/pgalloc`", name, k+1, cs[pkgCol])
			}
			imports, err := paths(cs[importsCol])
			if err != nil {
				return nil, fmt.Errorf("%s:%d: the imports cell of %s: %v", name, k+1, pkgs[0], err)
			}
			if prev, ok := seen[pkgs[0]]; ok {
				return nil, fmt.Errorf("%s:%d: %s has a row already, on line %d", name, k+1, pkgs[0], prev)
			}
			seen[pkgs[0]] = k + 1
			t.rows = append(t.rows, row{pkg: pkgs[0], imports: imports, line: k + 1})
		}
		if len(t.rows) == 0 {
			return nil, fmt.Errorf("%s:%d: the layering table has no rows", name, i+1)
		}
		return t, nil
	}
	return nil, fmt.Errorf("%s: no layering table (a Markdown table with a \"package\" and an \"imports\" column)", name)
}

// cells splits a Markdown table line into its trimmed cells; ok is false if
// the line is not a table line.
func cells(line string) ([]string, bool) {
	line = strings.TrimSpace(line)
	if len(line) < 2 || line[0] != '|' || line[len(line)-1] != '|' {
		return nil, false
	}
	parts := strings.Split(line[1:len(line)-1], "|")
	for i, p := range parts {
		parts[i] = strings.TrimSpace(p)
	}
	return parts, true
}

func isSeparator(line string) bool {
	cs, ok := cells(line)
	if !ok {
		return false
	}
	for _, c := range cs {
		if strings.Trim(c, ":-") != "" || !strings.Contains(c, "-") {
			return false
		}
	}
	return true
}

// paths parses a cell of comma-separated paths in backquotes. "—", "-" and
// an empty cell mean none. Trailing slashes are dropped.
func paths(cell string) ([]string, error) {
	switch cell {
	case "", "—", "-":
		return nil, nil
	}
	var out []string
	for _, item := range strings.Split(cell, ",") {
		item = strings.TrimSpace(item)
		if len(item) < 3 || item[0] != '`' || item[len(item)-1] != '`' || strings.Count(item, "`") != 2 {
			return nil, fmt.Errorf("%q is not a path in backquotes (write `pkg/x`, `pkg/y`, or — for none)", item)
		}
		p := strings.TrimSuffix(item[1:len(item)-1], "/")
		if p == "" || strings.ContainsAny(p, " \t") {
			return nil, fmt.Errorf("%q is not a package path", item)
		}
		out = append(out, p)
	}
	return out, nil
}

// pkgInfo is what the check needs of a package of the module.
type pkgInfo struct {
	// imports are the packages of the module its non-test files import,
	// relative to the module root.
	imports []string
	// testOnly is set for a package without non-test Go files.
	testOnly bool
}

// compare checks the table against the packages of the module (keyed by
// path relative to the module root) and returns one message per
// disagreement, each saying what to edit and where; none if the table
// describes the code.
func compare(name string, t *table, pkgs map[string]pkgInfo) []string {
	var problems []string
	rowOf := map[string]row{}
	for _, r := range t.rows {
		rowOf[r.pkg] = r
	}

	// Packages without a row.
	var names []string
	for p := range pkgs {
		names = append(names, p)
	}
	slices.Sort(names)
	for _, p := range names {
		if _, ok := rowOf[p]; !ok && !pkgs[p].testOnly {
			problems = append(problems, fmt.Sprintf(
				"package %s has no row in the layering table: add a row for `%s` to the table at %s:%d, listing what it imports, below the rows of those packages",
				p, p, name, t.line))
		}
	}

	for i, r := range t.rows {
		info, ok := pkgs[r.pkg]
		if !ok {
			problems = append(problems, fmt.Sprintf(
				"%s:%d: the layering table has a row for %s, which is not a package of the module: remove the row, or fix the path",
				name, r.line, r.pkg))
			continue
		}
		// Edges in the code that the table lacks.
		for _, imp := range info.imports {
			if !slices.Contains(r.imports, imp) {
				problems = append(problems, fmt.Sprintf(
					"%s:%d: %s imports %s, but its row does not list it: add `%s` to the imports of `%s` there, or remove the import",
					name, r.line, r.pkg, imp, imp, r.pkg))
			}
		}
		// Arrows in the table that the code lacks, and the layer order.
		for _, imp := range r.imports {
			if !slices.Contains(info.imports, imp) {
				problems = append(problems, fmt.Sprintf(
					"%s:%d: the row of %s lists %s, but %s does not import it: remove `%s` from the imports of `%s` there",
					name, r.line, r.pkg, imp, r.pkg, imp, r.pkg))
				continue
			}
			ir, ok := rowOf[imp]
			if !ok {
				continue // reported above as a package without a row
			}
			if j := slices.IndexFunc(t.rows, func(x row) bool { return x.pkg == imp }); j > i {
				problems = append(problems, fmt.Sprintf(
					"%s:%d: %s imports %s, whose row is below it (line %d); rows go from the lowest layer up: move the row of `%s` above the row of `%s`",
					name, r.line, r.pkg, imp, ir.line, imp, r.pkg))
			}
		}
	}
	return problems
}
