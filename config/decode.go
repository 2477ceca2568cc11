package config

import (
	"fmt"
	"github.com/sockrelay/sockrelay/internal/settings"
	"math"
	"slices"
	"strconv"
	"strings"
	"time"

	"go.yaml.in/yaml/v3"
)

// decoder walks a yaml.Node tree against the schema by hand rather than decoding into structs: that is
// what gives every problem its line and key path, lets one run report all problems instead of the first,
// and lets each message say what would have been accepted.
type decoder struct {
	file     string
	errs     []*Error
	warnings []*Error
	refs     refs
	lines    map[string]int // key path to its line, for Config.ErrorAt
}

// at records that the value at path was given at n's line.
func (d *decoder) at(path string, n *yaml.Node) {
	if d.lines == nil {
		d.lines = map[string]int{}
	}
	d.lines[path] = n.Line
}

func (d *decoder) errorf(n *yaml.Node, path, format string, args ...any) {
	line := 0
	if n != nil {
		line = n.Line
	}
	d.errs = append(d.errs, &Error{File: d.file, Line: line, Path: path, Msg: fmt.Sprintf(format, args...)})
}

func (d *decoder) warnf(n *yaml.Node, path, format string, args ...any) {
	d.warnings = append(d.warnings, &Error{File: d.file, Line: n.Line, Path: path, Msg: fmt.Sprintf(format, args...)})
}

// join and index build key paths: pools.chat.servers[1].weight.
func join(path, key string) string {
	if path == "" {
		return key
	}
	return path + "." + key
}

func index(path string, i int) string { return path + "[" + strconv.Itoa(i) + "]" }

// resolve follows aliases (*name) to the node they stand for.
func resolve(n *yaml.Node) *yaml.Node {
	for n != nil && n.Kind == yaml.AliasNode {
		n = n.Alias
	}
	return n
}

func isNull(n *yaml.Node) bool { return n.Kind == yaml.ScalarNode && n.ShortTag() == "!!null" }

// describe says what a node is, for messages of the form "got a list; accepted: ...".
func describe(n *yaml.Node) string {
	switch {
	case n.Kind == yaml.MappingNode:
		return "a mapping"
	case n.Kind == yaml.SequenceNode:
		return "a list"
	case isNull(n):
		return "no value"
	default:
		return strconv.Quote(n.Value)
	}
}

// maxExpandedNodes bounds the tree that aliases may expand a file into. A real configuration has a few
// thousand nodes; without a bound, a few lines of nested aliases (the "billion laughs") would expand
// into more nodes than the walk could ever visit.
const maxExpandedNodes = 100_000

// checkAliases reports an alias that contains itself, or aliases that expand the tree past
// maxExpandedNodes, before the walk, which would loop or run out of memory on them.
func (d *decoder) checkAliases(root *yaml.Node) bool {
	memo := map[*yaml.Node]int{}
	active := map[*yaml.Node]bool{}
	var size func(n *yaml.Node) int
	size = func(n *yaml.Node) int {
		if n.Kind == yaml.AliasNode {
			if n.Alias == nil || active[n.Alias] {
				d.errorf(n, "", "alias *%s is used inside the value it names; accepted: an alias to a value defined before it", n.Value)
				return -1
			}
			return size(n.Alias)
		}
		if s, ok := memo[n]; ok {
			return s
		}
		active[n] = true
		defer delete(active, n)
		total := 1
		for _, c := range n.Content {
			s := size(c)
			if s < 0 {
				return -1
			}
			total = min(total+s, maxExpandedNodes+1)
		}
		memo[n] = total
		return total
	}
	switch s := size(root); {
	case s < 0:
		return false
	case s > maxExpandedNodes:
		d.errorf(root, "", "aliases expand the file to more than %d values; accepted: at most %d", maxExpandedNodes, maxExpandedNodes)
		return false
	}
	return true
}

// pair is one key and its value in a mapping.
type pair struct{ key, val *yaml.Node }

func isMerge(k *yaml.Node) bool {
	return k.Kind == yaml.ScalarNode && k.Value == "<<" && k.ShortTag() == "!!merge"
}

// pairs returns n's pairs in the file's order, with those brought in by merge keys (<<: *defaults) after
// them, where no key given explicitly or merged earlier overrides them, as YAML's merge key specifies.
// A key given twice is an error: yaml.v3 and most YAML tools would silently keep the last one.
func (d *decoder) pairs(n *yaml.Node, path string) []pair {
	var out, merged []pair
	seen := map[string]*yaml.Node{}
	for i := 0; i+1 < len(n.Content); i += 2 {
		k, v := resolve(n.Content[i]), n.Content[i+1]
		if isMerge(k) {
			merged = append(merged, d.mergedPairs(v, join(path, "<<"))...)
			continue
		}
		if k.Kind != yaml.ScalarNode || isNull(k) {
			d.errorf(k, path, "got %s as a key; accepted: a plain string key", describe(k))
			continue
		}
		if first, ok := seen[k.Value]; ok {
			d.errorf(k, join(path, k.Value), "duplicate key; first given at line %d", first.Line)
			continue
		}
		seen[k.Value] = k
		out = append(out, pair{k, v})
	}
	for _, p := range merged {
		if _, ok := seen[p.key.Value]; !ok {
			seen[p.key.Value] = p.key
			out = append(out, p)
		}
	}
	return out
}

func (d *decoder) mergedPairs(v *yaml.Node, path string) []pair {
	v = resolve(v)
	switch v.Kind {
	case yaml.MappingNode:
		return d.pairs(v, path)
	case yaml.SequenceNode:
		var out []pair
		for _, item := range v.Content {
			if item = resolve(item); item.Kind != yaml.MappingNode {
				d.errorf(item, path, "got %s; accepted: a mapping, or a list of mappings, to merge", describe(item))
				continue
			}
			out = append(out, d.pairs(item, path)...)
		}
		return out
	}
	d.errorf(v, path, "got %s; accepted: a mapping, or a list of mappings, to merge", describe(v))
	return nil
}

// fields is a checked mapping of a fixed schema: its keys are known and given once.
type fields struct {
	node *yaml.Node // the mapping, whose line a missing key is reported at
	path string
	vals map[string]pair
}

// mapping checks that n is a mapping whose keys are among keys, and returns its fields. It returns nil,
// having reported why, when n is not a mapping.
func (d *decoder) mapping(n *yaml.Node, path, what string, keys ...string) *fields {
	n = resolve(n)
	if n.Kind != yaml.MappingNode {
		d.errorf(n, path, "got %s; accepted: %s, a mapping with keys %s", describe(n), what, strings.Join(sorted(keys), ", "))
		return nil
	}
	f := &fields{node: n, path: path, vals: map[string]pair{}}
	for _, p := range d.pairs(n, path) {
		if !slices.Contains(keys, p.key.Value) {
			d.errorf(p.key, join(path, p.key.Value), "unknown key; accepted: %s", strings.Join(sorted(keys), ", "))
			continue
		}
		f.vals[p.key.Value] = p
		d.at(join(path, p.key.Value), p.key)
	}
	return f
}

func sorted(s []string) []string {
	s = slices.Clone(s)
	slices.Sort(s)
	return s
}

// get returns the value of key and its path, or nil when the key is absent.
func (f *fields) get(key string) (*yaml.Node, string) {
	p, ok := f.vals[key]
	if !ok {
		return nil, ""
	}
	return resolve(p.val), join(f.path, key)
}

func (f *fields) has(key string) bool {
	_, ok := f.vals[key]
	return ok
}

// line is the line of key when given, else of the mapping: where to report a problem with its value
// found by a later check.
func (f *fields) line(key string) *yaml.Node {
	if p, ok := f.vals[key]; ok {
		return p.key
	}
	return f.node
}

func (d *decoder) required(f *fields, key, accepted string) {
	d.errorf(f.node, join(f.path, key), "required; accepted: %s", accepted)
}

// scalar returns the text of key's value, or false when key is absent or its value is not a scalar, in
// which case it has said so in terms of accepted.
func (d *decoder) scalar(f *fields, key, accepted string) (*yaml.Node, string, bool) {
	n, path := f.get(key)
	if n == nil {
		return nil, "", false
	}
	if n.Kind != yaml.ScalarNode || isNull(n) {
		d.errorf(n, path, "got %s; accepted: %s", describe(n), accepted)
		return nil, "", false
	}
	return n, path, true
}

// str sets *dst to key's value taken as text, whatever its YAML type: a name such as 2024 is a string here.
// It reports whether the key was given with a usable value.
func (d *decoder) str(f *fields, key string, dst *string, accepted string) bool {
	n, _, ok := d.scalar(f, key, accepted)
	if ok {
		*dst = n.Value
	}
	return ok
}

// oneOf sets *dst to key's value, which must be one of values (case matters, as everywhere in the file).
func (d *decoder) oneOf(f *fields, key, noun string, dst *string, values ...string) bool {
	accepted := strings.Join(values, ", ")
	n, path, ok := d.scalar(f, key, "one of "+accepted)
	if !ok {
		return false
	}
	if !slices.Contains(values, n.Value) {
		d.errorf(n, path, "%q is not %s; accepted: %s", n.Value, noun, accepted)
		return false
	}
	*dst = n.Value
	return true
}

func rangeText(lo, hi int) string {
	if hi == math.MaxInt {
		return fmt.Sprintf("%d or more", lo)
	}
	return fmt.Sprintf("%d to %d", lo, hi)
}

// integer sets *dst to key's value, an integer from lo to hi. Quoted numbers ("3") are refused, as a
// wrong type: a strict file has one spelling for each value.
func (d *decoder) integer(f *fields, key string, dst *int, lo, hi int) bool {
	n, path, ok := d.scalar(f, key, "an integer from "+rangeText(lo, hi))
	if !ok {
		return false
	}
	var v int
	if n.ShortTag() != "!!int" {
		d.errorf(n, path, "%q is not an integer; accepted %s", n.Value, rangeText(lo, hi))
		return false
	}
	if err := n.Decode(&v); err != nil || v < lo || v > hi {
		d.errorf(n, path, "%s is out of range; accepted %s", n.Value, rangeText(lo, hi))
		return false
	}
	*dst = v
	return true
}

// number sets *dst to key's value, a number from lo to hi.
func (d *decoder) number(f *fields, key string, dst *float64, lo, hi float64) bool {
	accepted := formatNumber(lo) + " to " + formatNumber(hi)
	n, path, ok := d.scalar(f, key, "a number from "+accepted)
	if !ok {
		return false
	}
	var v float64
	if tag := n.ShortTag(); (tag != "!!int" && tag != "!!float") || n.Decode(&v) != nil {
		d.errorf(n, path, "%q is not a number; accepted %s", n.Value, accepted)
		return false
	}
	if !(v >= lo && v <= hi) { // written so that NaN is out of range too
		d.errorf(n, path, "%s is out of range; accepted %s", n.Value, accepted)
		return false
	}
	*dst = v
	return true
}

// formatNumber writes v in plain decimals, 1000000 rather than %g's 1e+06.
func formatNumber(v float64) string { return strconv.FormatFloat(v, 'f', -1, 64) }

func (d *decoder) boolean(f *fields, key string, dst *bool) bool {
	n, path, ok := d.scalar(f, key, "true or false")
	if !ok {
		return false
	}
	if n.ShortTag() != "!!bool" || n.Decode(dst) != nil {
		d.errorf(n, path, "%q is not a boolean; accepted: true or false", n.Value)
		return false
	}
	return true
}

// durationRange says which durations a key accepts, and in what words. The relay's own settings take
// theirs from package settings (fromSettings); pools and checks have ranges of their own.
type durationRange struct {
	ok   func(time.Duration) bool
	text string
}

func fromSettings(r settings.Duration) durationRange { return durationRange{r.Contains, r.String()} }

func atLeast(lo time.Duration) durationRange { return fromSettings(settings.Duration{Min: lo}) }

func between(lo, hi time.Duration) durationRange {
	return fromSettings(settings.Duration{Min: lo, Max: hi})
}

const durationSyntax = "a number with a unit (ms, s, m, h) such as 500ms, 10s or 1h30m"

// duration sets *dst to key's value, a Go duration string. A bare 0 is accepted: it needs no unit.
func (d *decoder) duration(f *fields, key string, dst *time.Duration, r durationRange) bool {
	n, path, ok := d.scalar(f, key, durationSyntax)
	if !ok {
		return false
	}
	v, err := time.ParseDuration(n.Value)
	if err != nil {
		d.errorf(n, path, "%q is not a duration; accepted: %s", n.Value, durationSyntax)
		return false
	}
	if !r.ok(v) {
		d.errorf(n, path, "%s is out of range; accepted %s", n.Value, r.text)
		return false
	}
	*dst = v
	return true
}

const sizeSyntax = "a number of bytes or a number with KiB, MiB or GiB"

// parseSize reads "16384", "64KiB", "4 MiB" or "1GiB". Only binary units: "4MB" could mean 4,000,000 or
// 4,194,304 bytes, and a limit should not depend on which the reader assumed.
func parseSize(s string) (int64, bool) {
	num, mult := s, int64(1)
	for _, u := range settings.SizeUnits {
		if rest, ok := strings.CutSuffix(s, u.Suffix); ok {
			num, mult = strings.TrimSuffix(rest, " "), u.Mult
			break
		}
	}
	if num == "" || strings.TrimLeft(num, "0123456789") != "" {
		return 0, false
	}
	v, err := strconv.ParseInt(num, 10, 64)
	if err != nil || v > math.MaxInt64/mult {
		return math.MaxInt64, true // syntactically a size, and too large for any range
	}
	return v * mult, true
}

// size sets *dst to key's value, a byte count within r.
func (d *decoder) size(f *fields, key string, dst *int, r settings.Size) bool {
	n, path, ok := d.scalar(f, key, sizeSyntax)
	if !ok {
		return false
	}
	v, ok := parseSize(n.Value)
	if !ok {
		d.errorf(n, path, "%q is not a size; accepted: %s", n.Value, sizeSyntax)
		return false
	}
	if !r.Contains(v) {
		d.errorf(n, path, "%s is out of range; accepted %s", n.Value, r)
		return false
	}
	*dst = int(v)
	return true
}

// count sets *dst to key's value, a whole number within r (0 for r's default).
func (d *decoder) count(f *fields, key string, dst *int, r settings.Count) bool {
	n, path, ok := d.scalar(f, key, r.String())
	if !ok {
		return false
	}
	var v int64
	if n.ShortTag() != "!!int" || n.Decode(&v) != nil {
		d.errorf(n, path, "%q is not a whole number; accepted %s", n.Value, r)
		return false
	}
	if !r.Contains(v) {
		d.errorf(n, path, "%s is out of range; accepted %s", n.Value, r)
		return false
	}
	*dst = int(v)
	return true
}

// list returns the items of key's value, which must be a list, with their paths; nil when absent or not
// a list (said so).
func (d *decoder) list(f *fields, key, accepted string) ([]*yaml.Node, string, bool) {
	n, path := f.get(key)
	if n == nil {
		return nil, "", false
	}
	if n.Kind != yaml.SequenceNode {
		d.errorf(n, path, "got %s; accepted: %s", describe(n), accepted)
		return nil, "", false
	}
	for i, item := range n.Content {
		d.at(index(path, i), item)
	}
	return n.Content, path, true
}
