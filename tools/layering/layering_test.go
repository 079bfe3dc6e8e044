package layering

import (
	"bytes"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

// goCmd runs the go command in dir and returns its standard output.
func goCmd(dir string, args ...string) (string, error) {
	cmd := exec.Command("go", args...)
	cmd.Dir = dir
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		return "", fmt.Errorf("go %s: %v\n%s", strings.Join(args, " "), err, stderr.Bytes())
	}
	return string(out), nil
}

// modulePackages lists the packages of the module rooted at root with
// `go list`, keyed by path relative to the root, with the imports of their
// non-test files that are packages of the module.
func modulePackages(root string) (map[string]pkgInfo, error) {
	modPath, err := goCmd(root, "list", "-m", "-f", "{{.Path}}")
	if err != nil {
		return nil, err
	}
	modPath = strings.TrimSpace(modPath)
	out, err := goCmd(root, "list", "-f",
		`{{.ImportPath}}{{"\t"}}{{len .GoFiles}}{{"\t"}}{{len .CgoFiles}}{{"\t"}}{{join .Imports " "}}`, "./...")
	if err != nil {
		return nil, err
	}
	rel := func(p string) (string, bool) {
		if p == modPath {
			return ".", true
		}
		r, ok := strings.CutPrefix(p, modPath+"/")
		return r, ok
	}
	pkgs := map[string]pkgInfo{}
	for _, line := range strings.Split(strings.TrimRight(out, "\n"), "\n") {
		f := strings.Split(line, "\t")
		if len(f) != 4 {
			return nil, fmt.Errorf("go list printed %q", line)
		}
		p, ok := rel(f[0])
		if !ok {
			return nil, fmt.Errorf("go list ./... printed %s, outside module %s", f[0], modPath)
		}
		info := pkgInfo{testOnly: f[1] == "0" && f[2] == "0"}
		for _, imp := range strings.Fields(f[3]) {
			if r, ok := rel(imp); ok {
				info.imports = append(info.imports, r)
			}
		}
		pkgs[p] = info
	}
	return pkgs, nil
}

// TestTheLayeringTableDescribesTheImports is the check: docs/design.md's
// table against `go list` of the module.
func TestTheLayeringTableDescribesTheImports(t *testing.T) {
	gomod, err := goCmd(".", "env", "GOMOD")
	if err != nil {
		t.Fatal(err)
	}
	gomod = strings.TrimSpace(gomod)
	if gomod == "" || gomod == os.DevNull {
		t.Fatal("go env GOMOD: not inside the module")
	}
	root := filepath.Dir(gomod)
	doc, err := os.ReadFile(filepath.Join(root, designDoc))
	if err != nil {
		t.Fatal(err)
	}
	tab, err := parseTable(designDoc, string(doc))
	if err != nil {
		t.Fatal(err)
	}
	pkgs, err := modulePackages(root)
	if err != nil {
		t.Fatal(err)
	}
	if problems := compare(designDoc, tab, pkgs); len(problems) > 0 {
		t.Errorf("the layering table of %s does not describe the imports of the code (the table is edited by hand; fix the table or the code):\n  %s",
			designDoc, strings.Join(problems, "\n  "))
		return
	}
	t.Logf("%d rows in %s agree with go list of %d packages", len(tab.rows), designDoc, len(pkgs))
}
