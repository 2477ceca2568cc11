package docs

import (
	"bufio"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"unicode"
)

// pages are the Markdown files whose links are checked: the README and every page under docs/.
func pages(t *testing.T) []string {
	t.Helper()
	files := []string{"../README.md"}
	err := filepath.WalkDir(".", func(path string, d os.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if !d.IsDir() && strings.HasSuffix(path, ".md") {
			files = append(files, path)
		}
		return nil
	})
	if err != nil {
		t.Fatalf("list docs: %v", err)
	}
	return files
}

// TestRelativeLinksResolve: every relative link or image of README.md and docs/ names a file that
// exists, and where it names an anchor (page.md#heading, or #heading in the same page), a heading of
// that page has it, as GitHub spells heading anchors. Links with a scheme (https:, mailto:) are not
// followed.
func TestRelativeLinksResolve(t *testing.T) {
	anchors := map[string]map[string]bool{} // page path: its headings' anchors, read once
	anchorsOf := func(path string) map[string]bool {
		if a, ok := anchors[path]; ok {
			return a
		}
		a, err := headingAnchors(path)
		if err != nil {
			t.Errorf("read headings of %s: %v", path, err)
		}
		anchors[path] = a
		return a
	}
	checked := 0
	for _, page := range pages(t) {
		links, err := relativeLinks(page)
		if err != nil {
			t.Fatalf("read links of %s: %v", page, err)
		}
		for _, l := range links {
			checked++
			file, anchor, _ := strings.Cut(l.target, "#")
			target := page
			if file != "" {
				target = filepath.Join(filepath.Dir(page), file)
				if _, err := os.Stat(target); err != nil {
					t.Errorf("%s:%d: link to %q: %s does not exist", page, l.line, l.target, target)
					continue
				}
			}
			if anchor != "" && strings.HasSuffix(target, ".md") && !anchorsOf(target)[anchor] {
				t.Errorf("%s:%d: link to %q: %s has no heading with anchor #%s", page, l.line, l.target, target, anchor)
			}
		}
	}
	if checked == 0 {
		t.Fatal("no relative link found: the scan is broken")
	}
}

type link struct {
	line   int
	target string
}

var (
	// inlineLink matches [text](target) and ![alt](target); a title after the target is not used here.
	inlineLink = regexp.MustCompile(`!?\[[^\]]*\]\(([^)\s]+)\)`)
	codeSpan   = regexp.MustCompile("`[^`]*`")
	scheme     = regexp.MustCompile(`^[a-zA-Z][a-zA-Z0-9+.-]*:`)
)

// relativeLinks returns the links of a Markdown file that have no scheme, outside fenced code blocks
// and code spans.
func relativeLinks(path string) ([]link, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	var out []link
	inFence := false
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 0, 64*1024), 1<<20) // generated tables have long lines
	for n := 1; sc.Scan(); n++ {
		line := sc.Text()
		if strings.HasPrefix(strings.TrimSpace(line), "```") {
			inFence = !inFence
			continue
		}
		if inFence {
			continue
		}
		for _, m := range inlineLink.FindAllStringSubmatch(codeSpan.ReplaceAllString(line, ""), -1) {
			if !scheme.MatchString(m[1]) {
				out = append(out, link{line: n, target: m[1]})
			}
		}
	}
	return out, sc.Err()
}

// headingAnchors returns the anchors GitHub gives the headings of a Markdown file: the heading's text
// lower-cased, without characters other than letters, digits, spaces, hyphens and underscores, spaces
// turned into hyphens; a repeated anchor gets -1, -2, ...
func headingAnchors(path string) (map[string]bool, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	anchors := map[string]bool{}
	seen := map[string]int{}
	inFence := false
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 0, 64*1024), 1<<20)
	for sc.Scan() {
		line := sc.Text()
		if strings.HasPrefix(strings.TrimSpace(line), "```") {
			inFence = !inFence
			continue
		}
		text, ok := strings.CutPrefix(line, "#")
		if inFence || !ok {
			continue
		}
		text = strings.TrimLeft(text, "#")
		if !strings.HasPrefix(text, " ") {
			continue // #word is not a heading
		}
		a := slug(strings.TrimSpace(text))
		if n := seen[a]; n > 0 {
			anchors[fmt.Sprintf("%s-%d", a, n)] = true
		} else {
			anchors[a] = true
		}
		seen[a]++
	}
	return anchors, sc.Err()
}

func slug(heading string) string {
	var b strings.Builder
	for _, r := range strings.ToLower(heading) {
		switch {
		case unicode.IsLetter(r) || unicode.IsDigit(r) || r == '-' || r == '_':
			b.WriteRune(r)
		case r == ' ':
			b.WriteByte('-')
		}
	}
	return b.String()
}

// TestSlug: anchors as GitHub writes them for headings like those of these pages.
func TestSlug(t *testing.T) {
	for _, c := range []struct{ heading, want string }{
		{"Flags of `sockrelay run`", "flags-of-sockrelay-run"},
		{"6. Renew the certificate without dropping tunnels", "6-renew-the-certificate-without-dropping-tunnels"},
		{"The edge: TLS, client identity, timeouts, limits, raw TCP", "the-edge-tls-client-identity-timeouts-limits-raw-tcp"},
		{"The relay's own failures", "the-relays-own-failures"},
		{"FIN, RST and the end of a tunnel", "fin-rst-and-the-end-of-a-tunnel"},
		{"The event-loop engine (`datapath/eventloop`, issue 15; not yet wired into `--datapath copy`)",
			"the-event-loop-engine-datapatheventloop-issue-15-not-yet-wired-into---datapath-copy"},
	} {
		if got := slug(c.heading); got != c.want {
			t.Errorf("slug(%q) = %q, want %q", c.heading, got, c.want)
		}
	}
}
