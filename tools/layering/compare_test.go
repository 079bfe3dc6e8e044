package layering

import (
	"reflect"
	"strings"
	"testing"
)

const sampleDoc = `# Design

Some text | with a bar.

| package | imports | what it is |
|---|---|---|
| ` + "`pkg/low`" + ` | — | the bottom |
| ` + "`pkg/mid/`" + ` | ` + "`pkg/low`" + ` | in between |
| ` + "`cmd/top`" + ` | ` + "`pkg/low`, `pkg/mid`" + ` | the command |

After the table.
`

func TestParseTableReadsRowsInOrder(t *testing.T) {
	tab, err := parseTable("d.md", sampleDoc)
	if err != nil {
		t.Fatal(err)
	}
	want := &table{line: 5, rows: []row{
		{pkg: "pkg/low", line: 7},
		{pkg: "pkg/mid", imports: []string{"pkg/low"}, line: 8},
		{pkg: "cmd/top", imports: []string{"pkg/low", "pkg/mid"}, line: 9},
	}}
	if !reflect.DeepEqual(tab, want) {
		t.Errorf("parseTable = %+v, want %+v", tab, want)
	}
}

func TestParseTableRejectsMalformedTables(t *testing.T) {
	for _, tc := range []struct {
		name, doc, want string
	}{
		{
			name: "a document without a package/imports table is an error",
			doc:  "| a | b |\n|---|---|\n| x | y |\n",
			want: `d.md: no layering table`,
		},
		{
			name: "a header without a separator line is an error",
			doc:  "| package | imports |\n| `a` | — |\n",
			want: "d.md:1: the layering table's header is not followed by",
		},
		{
			name: "a table without rows is an error",
			doc:  "| package | imports |\n|---|---|\n\ntext\n",
			want: "d.md:1: the layering table has no rows",
		},
		{
			name: "a package cell without backquotes is an error naming its line",
			doc:  "| package | imports |\n|---|---|\n| pkg/a | — |\n",
			want: `d.md:3: the package cell "pkg/a" must hold one path`,
		},
		{
			name: "an import written in prose is an error naming its line",
			doc:  "| package | imports |\n|---|---|\n| `pkg/a` | all of the above |\n",
			want: `d.md:3: the imports cell of pkg/a: "all of the above" is not a path in backquotes`,
		},
		{
			name: "a row with a missing cell is an error",
			doc:  "| package | imports | what |\n|---|---|---|\n| `pkg/a` | — |\n",
			want: "d.md:3: the row has 2 cells, the header 3",
		},
		{
			name: "a package with two rows is an error naming both lines",
			doc:  "| package | imports |\n|---|---|\n| `pkg/a` | — |\n| `pkg/a/` | — |\n",
			want: "d.md:4: pkg/a has a row already, on line 3",
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := parseTable("d.md", tc.doc)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Errorf("parseTable error = %v, want one containing %q", err, tc.want)
			}
		})
	}
}

func TestCompareNamesEveryDisagreementAndWhereToEdit(t *testing.T) {
	tab, err := parseTable("d.md", sampleDoc)
	if err != nil {
		t.Fatal(err)
	}
	agreeing := map[string]pkgInfo{
		"pkg/low": {},
		"pkg/mid": {imports: []string{"pkg/low"}},
		"cmd/top": {imports: []string{"pkg/low", "pkg/mid"}},
	}
	for _, tc := range []struct {
		name   string
		change func(map[string]pkgInfo)
		want   []string
	}{
		{
			name:   "a table that describes the code has no problems",
			change: func(map[string]pkgInfo) {},
		},
		{
			name:   "a package of tests only needs no row",
			change: func(p map[string]pkgInfo) { p["test"] = pkgInfo{testOnly: true} },
		},
		{
			name: "an import the table lacks is reported at its row",
			change: func(p map[string]pkgInfo) {
				p["pkg/low"] = pkgInfo{imports: []string{"pkg/mid"}}
			},
			want: []string{
				"d.md:7: pkg/low imports pkg/mid, but its row does not list it: add `pkg/mid` to the imports of `pkg/low` there, or remove the import",
			},
		},
		{
			name: "an arrow the code lacks is reported at its row",
			change: func(p map[string]pkgInfo) {
				p["cmd/top"] = pkgInfo{imports: []string{"pkg/mid"}}
			},
			want: []string{
				"d.md:9: the row of cmd/top lists pkg/low, but cmd/top does not import it: remove `pkg/low` from the imports of `cmd/top` there",
			},
		},
		{
			name:   "a package without a row is reported with the table's line",
			change: func(p map[string]pkgInfo) { p["pkg/new"] = pkgInfo{imports: []string{"pkg/low"}} },
			want: []string{
				"package pkg/new has no row in the layering table: add a row for `pkg/new` to the table at d.md:5, listing what it imports, below the rows of those packages",
			},
		},
		{
			name:   "a row for a package that does not exist is reported",
			change: func(p map[string]pkgInfo) { delete(p, "cmd/top") },
			want: []string{
				"d.md:9: the layering table has a row for cmd/top, which is not a package of the module: remove the row, or fix the path",
			},
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			pkgs := map[string]pkgInfo{}
			for k, v := range agreeing {
				pkgs[k] = v
			}
			tc.change(pkgs)
			got := compare("d.md", tab, pkgs)
			if !reflect.DeepEqual(got, tc.want) {
				t.Errorf("compare =\n  %s\nwant\n  %s", strings.Join(got, "\n  "), strings.Join(tc.want, "\n  "))
			}
		})
	}
}

func TestCompareWantsRowsInLayerOrder(t *testing.T) {
	doc := "| package | imports |\n|---|---|\n| `pkg/mid` | `pkg/low` |\n| `pkg/low` | — |\n"
	tab, err := parseTable("d.md", doc)
	if err != nil {
		t.Fatal(err)
	}
	got := compare("d.md", tab, map[string]pkgInfo{
		"pkg/low": {},
		"pkg/mid": {imports: []string{"pkg/low"}},
	})
	want := []string{
		"d.md:3: pkg/mid imports pkg/low, whose row is below it (line 4); rows go from the lowest layer up: move the row of `pkg/low` above the row of `pkg/mid`",
	}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("compare =\n  %s\nwant\n  %s", strings.Join(got, "\n  "), strings.Join(want, "\n  "))
	}
}
