package datapath_test

import (
	"go/parser"
	"go/token"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
)

const module = "github.com/sockrelay/sockrelay"

// The import rules, a statement of policy as Go's own go/build/deps_test.go is: the datapath layer knows
// nothing of HTTP, upstream pools, Prometheus or the relay that uses it, and only the kernel engine (and
// `sockrelay doctor`'s probe) reaches the BPF loader.
var (
	// datapathMustNotImport is forbidden to datapath and every package under it, test files included.
	datapathMustNotImport = []string{"net/http", module + "/upstream", "github.com/prometheus/", module + "/relay"}
	// loaderImporters are the only packages that may import loader: the kernel engine, and the doctor
	// command's probe.
	loaderImporters = []string{module + "/datapath/sockmap", module + "/cmd/sockrelay"}
)

// TestImportRules parses the imports of every Go file in the module (go/parser, imports only) and fails on
// any import the rules above forbid.
func TestImportRules(t *testing.T) {
	root, err := filepath.Abs("..")
	if err != nil {
		t.Fatal(err)
	}
	imports := moduleImports(t, root)
	if len(imports[module+"/datapath"]) == 0 || len(imports[module+"/relay"]) == 0 {
		t.Fatalf("found no imports of datapath or relay under %s: the walk is broken", root)
	}
	checked := 0
	for pkg, imps := range imports {
		for _, imp := range imps {
			if pkg == module+"/datapath" || strings.HasPrefix(pkg, module+"/datapath/") {
				checked++
				for _, bad := range datapathMustNotImport {
					if imp == bad || strings.HasPrefix(imp, bad) && (strings.HasSuffix(bad, "/") || strings.HasPrefix(imp, bad+"/")) {
						t.Errorf("%s imports %s: the datapath layer must not import %s", pkg, imp, bad)
					}
				}
			}
			if imp == module+"/loader" && pkg != module+"/loader" && !slices.Contains(loaderImporters, pkg) {
				t.Errorf("%s imports loader: only %s may", pkg, strings.Join(loaderImporters, ", "))
			}
		}
	}
	if checked == 0 {
		t.Fatal("no import of datapath was checked")
	}
}

// moduleImports maps each package directory of the module (as an import path) to what its Go files
// import.
func moduleImports(t *testing.T, root string) map[string][]string {
	t.Helper()
	out := make(map[string][]string)
	fset := token.NewFileSet()
	err := filepath.WalkDir(root, func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if d.IsDir() && path != root && (strings.HasPrefix(d.Name(), ".") || d.Name() == "testdata" || d.Name() == "vendor") {
			return filepath.SkipDir
		}
		if d.IsDir() || !strings.HasSuffix(path, ".go") {
			return nil
		}
		f, err := parser.ParseFile(fset, path, nil, parser.ImportsOnly)
		if err != nil {
			return err
		}
		rel, err := filepath.Rel(root, filepath.Dir(path))
		if err != nil {
			return err
		}
		pkg := module
		if rel != "." {
			pkg += "/" + filepath.ToSlash(rel)
		}
		for _, imp := range f.Imports {
			p, err := strconv.Unquote(imp.Path.Value)
			if err != nil {
				return err
			}
			out[pkg] = append(out[pkg], p)
		}
		return nil
	})
	if err != nil && !os.IsNotExist(err) {
		t.Fatal(err)
	}
	return out
}
