package config

import (
	"fmt"
	"slices"
	"strings"
)

// Error is one problem found in a configuration file: where it is and what is accepted instead.
type Error struct {
	File string
	// Line is the 1-based line of the offending key or value; 0 when the problem belongs to the whole file
	// (an empty file, or a YAML error the parser gave no line for).
	Line int
	// Path names the key, e.g. pools.chat.servers[1].weight; "" when the problem is not under one key.
	Path string
	Msg  string
}

// Error formats e as FILE:LINE: PATH: MSG, leaving out what e does not have, so that editors and
// terminals can jump to the line as they do for compiler errors.
func (e *Error) Error() string {
	var b strings.Builder
	b.WriteString(e.File)
	if e.Line > 0 {
		fmt.Fprintf(&b, ":%d", e.Line)
	}
	b.WriteString(": ")
	if e.Path != "" {
		b.WriteString(e.Path)
		b.WriteString(": ")
	}
	b.WriteString(e.Msg)
	return b.String()
}

// MaxReported is how many problems ErrorList.Error lists before it only counts the rest: past that,
// the first few usually explain the others (a wrong indentation, say).
const MaxReported = 20

// ErrorList is every problem found in one file, sorted by line. Parse and Load return it whole, so that a
// user fixes every mistake in one go rather than one per run.
type ErrorList []*Error

// Error has one line per problem, the first MaxReported of them, then how many more there were.
func (l ErrorList) Error() string {
	lines := make([]string, 0, min(len(l), MaxReported)+1)
	for i, e := range l {
		if i == MaxReported {
			lines = append(lines, fmt.Sprintf("%s: %d more errors not shown", e.File, len(l)-MaxReported))
			break
		}
		lines = append(lines, e.Error())
	}
	return strings.Join(lines, "\n")
}

// sortErrors orders errors by line, keeping the order they were found in within a line, and drops exact
// repeats: a mapping merged or aliased into several places would otherwise report its mistake each time
// at the same line.
func sortErrors(errs []*Error) ErrorList {
	seen := make(map[Error]bool, len(errs))
	errs = slices.DeleteFunc(errs, func(e *Error) bool {
		if seen[*e] {
			return true
		}
		seen[*e] = true
		return false
	})
	slices.SortStableFunc(errs, func(a, b *Error) int { return a.Line - b.Line })
	return errs
}
