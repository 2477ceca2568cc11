package main

import (
	"errors"
	"flag"
	"fmt"
	"io"
	"regexp"
	"strconv"
	"time"
)

// usageError is a command line the flag package refused. The command prints it as one line, with a hint
// to --help, rather than the whole usage, in which the line that says what was wrong is lost.
type usageError struct {
	command string // e.g. "sockrelay run"
	msg     string
}

func (e *usageError) Error() string { return e.msg }

// hint is the line printed after a usageError.
func (e *usageError) hint() string { return e.command + " --help lists every flag" }

// parseFlags parses args with fs, which prints nothing but the usage on -h. A refused flag is a
// *usageError that names the flag, the value and what is accepted.
func parseFlags(fs *flag.FlagSet, args []string, stderr io.Writer) error {
	fs.SetOutput(io.Discard) // the flag package would print its own message and then the usage
	fs.Usage = func() {}
	err := fs.Parse(args)
	if errors.Is(err, flag.ErrHelp) {
		fs.SetOutput(stderr)
		fmt.Fprintf(stderr, "Usage of %s:\n", fs.Name())
		fs.PrintDefaults()
		return err
	}
	if err != nil {
		return &usageError{command: fs.Name(), msg: flagMessage(fs, err)}
	}
	return nil
}

var (
	flagInvalid   = regexp.MustCompile(`^invalid (?:value|boolean value) "(.*)" for flag -(\S+): (.*)$`)
	flagUndefined = regexp.MustCompile(`^flag provided but not defined: -+(\S+)$`)
	flagNoValue   = regexp.MustCompile(`^flag needs an argument: -+(\S+)$`)
)

// flagMessage rewrites the flag package's error into --FLAG: what was wrong; what is accepted.
func flagMessage(fs *flag.FlagSet, err error) string {
	msg := err.Error()
	if m := flagUndefined.FindStringSubmatch(msg); m != nil {
		return fmt.Sprintf("--%s: unknown flag", m[1])
	}
	if m := flagNoValue.FindStringSubmatch(msg); m != nil {
		return fmt.Sprintf("--%s: needs a value, e.g. --%s VALUE", m[1], m[1])
	}
	m := flagInvalid.FindStringSubmatch(msg)
	if m == nil {
		return msg
	}
	value, name := m[1], m[2]
	var v any
	if f := fs.Lookup(name); f != nil {
		if g, ok := f.Value.(flag.Getter); ok {
			v = g.Get()
		}
	}
	switch v.(type) {
	case time.Duration:
		if _, err := strconv.ParseFloat(value, 64); err == nil {
			return fmt.Sprintf("--%s: %q is not a duration; use a unit, e.g. %ss", name, value, value)
		}
		return fmt.Sprintf("--%s: %q is not a duration; accepted: a number with a unit (ms, s, m, h), e.g. 500ms, 10s or 1h30m", name, value)
	case int, int64, uint, uint64:
		return fmt.Sprintf("--%s: %q is not a whole number; accepted: digits only, e.g. 65536", name, value)
	case bool:
		return fmt.Sprintf("--%s: %q is not a boolean; accepted: true or false", name, value)
	}
	return fmt.Sprintf("--%s: %q: %s", name, value, m[3])
}
