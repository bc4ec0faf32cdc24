// Command noisetor is the ceremony and operations tool of noisetor.
//
// It makes static keys (in a file or on a PKCS#11 token) and prints the line
// an operator hands to the other machines in the key ceremony, keeps
// keyrings, prints fingerprints for operators to read to each other, creates
// onion service keys, runs a sync server, pipes stdin and stdout over a
// noisetor link for testing, and runs the custody demo:
//
//	noisetor keygen -o wallet.key --name wallet
//	noisetor keyring add keyring.txt cosigner x25519:... --addr <onion>:9000
//	noisetor fingerprint keyring.txt
//	noisetor demo
//
// Run "noisetor help" for the list of commands and "noisetor <command> --help"
// for one command. Exit status: 0 on success, 1 when the operation failed,
// 2 on a usage error; 'keyring diff' exits as diff(1) does: 0 when the
// keyrings are the same, 1 when they differ, 2 on trouble.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"slices"
	"strconv"
	"strings"
	"syscall"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	code := runContext(ctx, os.Args[1:], os.Stdin, os.Stdout, os.Stderr)
	stop()
	os.Exit(code)
}

// Exit codes.
const (
	exitOK    = 0
	exitFail  = 1 // the operation failed
	exitUsage = 2 // the command line was wrong
)

// env is what a command runs with: the standard streams and a context that
// ends on SIGINT or SIGTERM.
type env struct {
	ctx    context.Context
	stdin  io.Reader
	stdout io.Writer
	stderr io.Writer
}

// A command is one subcommand of noisetor.
type command struct {
	name   string
	args   string // synopsis after the name, e.g. "[-o FILE] [--curve x25519|p256]"
	short  string // one line for the command list
	long   string // paragraphs for --help
	flags  func(fs *flag.FlagSet) any
	run    func(e *env, fs *flag.FlagSet, opts any, args []string) error
	hidden bool
}

var commands []*command

// commandOrder is the order of the command list in help.
var commandOrder = []string{"keygen", "pubkey", "fingerprint", "keyring", "onion-key", "client-auth-key",
	"serve", "connect", "relay", "status", "demo", "version"}

func register(c *command) {
	commands = append(commands, c)
	rank := func(name string) int {
		if i := slices.Index(commandOrder, name); i >= 0 {
			return i
		}
		return len(commandOrder)
	}
	slices.SortStableFunc(commands, func(a, b *command) int { return rank(a.name) - rank(b.name) })
}

func lookup(name string) *command {
	for _, c := range commands {
		if c.name == name {
			return c
		}
	}
	return nil
}

// run runs noisetor with args (without the program name) and returns the exit
// status. It is main without the process: tests call it directly.
func run(args []string, stdin io.Reader, stdout, stderr io.Writer) int {
	return runContext(context.Background(), args, stdin, stdout, stderr)
}

func runContext(ctx context.Context, args []string, stdin io.Reader, stdout, stderr io.Writer) int {
	e := &env{ctx: ctx, stdin: stdin, stdout: stdout, stderr: stderr}
	if len(args) == 0 {
		printMainUsage(stderr)
		return exitUsage
	}
	switch args[0] {
	case "-h", "-help", "--help", "help":
		if len(args) > 1 && args[0] == "help" {
			c := lookup(args[1])
			if c == nil {
				fmt.Fprintf(stderr, "noisetor: unknown command %s\nRun 'noisetor help' for the list of commands.\n", echoArg(args[1]))
				return exitUsage
			}
			fs, _ := newFlagSet(c)
			printCommandUsage(stdout, c, fs)
			return exitOK
		}
		printMainUsage(stdout)
		return exitOK
	case "-version", "--version":
		args = []string{"version"}
	}
	c := lookup(args[0])
	if c == nil {
		if strings.HasPrefix(args[0], "-") {
			fmt.Fprintf(stderr, "noisetor: a command must come first, before %s\n", echoArg(args[0]))
		} else {
			fmt.Fprintf(stderr, "noisetor: unknown command %s\n", echoArg(args[0]))
		}
		fmt.Fprintf(stderr, "Run 'noisetor help' for the list of commands.\n")
		return exitUsage
	}
	return runCommand(e, c, args[1:])
}

func newFlagSet(c *command) (*flag.FlagSet, any) {
	fs := flag.NewFlagSet("noisetor "+c.name, flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	var opts any
	if c.flags != nil {
		opts = c.flags(fs)
	}
	return fs, opts
}

func runCommand(e *env, c *command, args []string) int {
	fs, opts := newFlagSet(c)
	pos, err := parseInterspersed(fs, args)
	if errors.Is(err, flag.ErrHelp) {
		printCommandUsage(e.stdout, c, fs)
		return exitOK
	}
	if err != nil {
		fmt.Fprintf(e.stderr, "noisetor %s: %s\nRun 'noisetor %s --help' for usage.\n", c.name, scrubSecrets(err.Error(), args), c.name)
		return exitUsage
	}
	err = c.run(e, fs, opts, pos)
	var ue *usageError
	var xe *exitError
	switch {
	case err == nil:
		return exitOK
	case errors.As(err, &ue):
		fmt.Fprintf(e.stderr, "noisetor %s: %s\nRun 'noisetor %s --help' for usage.\n", c.name, scrubSecrets(ue.msg, args), c.name)
		return exitUsage
	case errors.As(err, &xe):
		if xe.err != nil {
			fmt.Fprintf(e.stderr, "noisetor %s: %s\n", c.name, scrubSecrets(errorText(xe.err), args))
		}
		return xe.code
	default:
		fmt.Fprintf(e.stderr, "noisetor %s: %s\n", c.name, scrubSecrets(errorText(err), args))
		return exitFail
	}
}

// scrubSecrets removes from an error message every command-line argument
// (or flag value) that looks like a pasted secret and is not the name of an
// existing file: errors that quote a file name ("open <name>: no such
// file") would otherwise echo a private key given where a file belongs.
// Looks like a secret: a noisetor secret-key text, or 16 or more
// characters of the base64 alphabets with upper and lower case and digits.
func scrubSecrets(msg string, args []string) string {
	for _, a := range args {
		if _, err := os.Lstat(a); err == nil {
			continue
		}
		// The whole argument, and its pieces: a flag's value after '=',
		// the parts around ':' (a key text), without leading dashes.
		pieces := append([]string{a}, strings.FieldsFunc(a, func(r rune) bool { return r == '=' || r == ':' })...)
		for _, v := range pieces {
			v = strings.TrimLeft(v, "-")
			if len(v) >= 16 && looksSecret(v) {
				msg = strings.ReplaceAll(msg, v, "(not shown: it may be a secret)")
			}
		}
	}
	return msg
}

func looksSecret(s string) bool {
	if u := strings.ToUpper(s); strings.Contains(u, "NOISETOR-") && strings.Contains(u, "KEY") {
		return true
	}
	var up, low, dig bool
	for i := 0; i < len(s); i++ {
		switch c := s[i]; {
		case 'A' <= c && c <= 'Z':
			up = true
		case 'a' <= c && c <= 'z':
			low = true
		case '0' <= c && c <= '9':
			dig = true
		case c == '-' || c == '_' || c == '+' || c == '/' || c == '=':
		default:
			return false
		}
	}
	return up && low && dig
}

// errorText is err's message without the package prefix, which the command
// name already stands in for.
func errorText(err error) string {
	return strings.TrimPrefix(err.Error(), "noisetor: ")
}

// A usageError is a mistake on the command line (exit status 2).
type usageError struct{ msg string }

func (e *usageError) Error() string { return e.msg }

func usagef(format string, args ...any) error {
	return &usageError{fmt.Sprintf(format, args...)}
}

// An exitError ends a command with exit status code instead of exitFail,
// printing err first if it is not nil ('keyring diff' exits as diff(1)).
type exitError struct {
	code int
	err  error
}

func (e *exitError) Error() string {
	if e.err == nil {
		return fmt.Sprintf("exit status %d", e.code)
	}
	return e.err.Error()
}

func (e *exitError) Unwrap() error { return e.err }

// parseInterspersed parses fs from args and returns the positional
// arguments, allowing flags after them ("keyring add f name key --addr x"),
// which flag.FlagSet.Parse alone does not. A "--" ends the flags.
func parseInterspersed(fs *flag.FlagSet, args []string) ([]string, error) {
	var pos []string
	for {
		if err := fs.Parse(args); err != nil {
			return nil, err
		}
		rest := fs.Args()
		if len(rest) == 0 {
			return pos, nil
		}
		if consumed := len(args) - len(rest); consumed > 0 && args[consumed-1] == "--" {
			return append(pos, rest...), nil
		}
		pos = append(pos, rest[0])
		args = rest[1:]
	}
}

// wantArgs checks the number of positional arguments.
func wantArgs(args []string, min, max int, what string) error {
	switch {
	case len(args) < min:
		// what lists the arguments, "a, b and c": name only those missing.
		items := strings.Split(strings.Replace(what, " and ", ", ", 1), ", ")
		if len(args) > 0 && len(items) == min {
			return usagef("missing %s (after %s)", strings.Join(items[len(args):], " and "), strings.Join(items[:len(args)], " and "))
		}
		return usagef("missing %s", what)
	case max >= 0 && len(args) > max:
		return usagef("unexpected argument %s", echoArg(args[max]))
	}
	return nil
}

// echoArg returns s quoted, for an error message, if it looks like a word
// an operator typed (a command, curve or peer name, a flag): at most 24
// characters of a-z, 0-9, '.', '_' and '-' with at least one letter.
// Anything else is not shown: an argument that was rejected may be a secret
// pasted in the wrong place (a private key, a PIN), and error messages end
// up in logs and scrollback.
func echoArg(s string) string {
	letter := false
	ok := len(s) > 0 && len(s) <= 24
	for i := 0; ok && i < len(s); i++ {
		switch c := s[i]; {
		case 'a' <= c && c <= 'z':
			letter = true
		case '0' <= c && c <= '9', c == '.', c == '_', c == '-':
		default:
			ok = false
		}
	}
	if ok && letter {
		return strconv.Quote(s)
	}
	return "(not shown: it may be a secret)"
}

func printMainUsage(w io.Writer) {
	fmt.Fprint(w, `noisetor: authenticated, encrypted links between the machines of a custody system.

Usage:
  noisetor <command> [flags] [arguments]

Commands:
`)
	for _, c := range commands {
		if !c.hidden {
			fmt.Fprintf(w, "  %-16s %s\n", c.name, c.short)
		}
	}
	fmt.Fprint(w, `
Run 'noisetor <command> --help' for the flags of a command.
Exit status: 0 on success, 1 when the operation failed, 2 on a usage error
('keyring diff': 0 same, 1 different, 2 trouble, as diff(1)).
`)
}

func printCommandUsage(w io.Writer, c *command, fs *flag.FlagSet) {
	fmt.Fprintf(w, "Usage: noisetor %s %s\n\n%s\n", c.name, c.args, strings.TrimSpace(c.long))
	var names []string
	fs.VisitAll(func(f *flag.Flag) { names = append(names, f.Name) })
	if len(names) == 0 {
		return
	}
	fmt.Fprint(w, "\nFlags:\n")
	fs.VisitAll(func(f *flag.Flag) {
		name, usage := flag.UnquoteUsage(f)
		dash := "--"
		if len(f.Name) == 1 {
			dash = "-"
		}
		line := "  " + dash + f.Name
		if name != "" {
			line += " " + name
		}
		if len(line) <= 20 {
			line += strings.Repeat(" ", 22-len(line))
		} else {
			line += "\n" + strings.Repeat(" ", 22)
		}
		line += strings.ReplaceAll(usage, "\n", "\n"+strings.Repeat(" ", 22))
		if f.DefValue != "" && f.DefValue != "false" && !slices.Contains([]string{"0", "0s"}, f.DefValue) {
			line += fmt.Sprintf(" (default %s)", f.DefValue)
		}
		fmt.Fprintln(w, line)
	})
}
