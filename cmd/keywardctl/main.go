// Command keywardctl is Keyward's operator CLI: HSM keys, policy dry-run, audit verification and
// queries, encryption coverage.
package main

import (
	"fmt"
	"io"
	"os"

	"github.com/keyward/keyward/internal/version"
)

const usage = `keywardctl: operate Keyward.

Usage:
  keywardctl version      print the version
  keywardctl help         show this help

Exit codes: 0 success, 1 the operation failed, 2 bad usage.
`

func main() { os.Exit(run(os.Args[1:], os.Stdout, os.Stderr)) }

func run(args []string, stdout, stderr io.Writer) int {
	if len(args) == 0 {
		fmt.Fprint(stderr, usage)
		return 2
	}
	switch args[0] {
	case "version":
		fmt.Fprintln(stdout, "keywardctl", version.Version)
		return 0
	case "help", "-h", "--help":
		fmt.Fprint(stdout, usage)
		return 0
	default:
		fmt.Fprintf(stderr, "keywardctl: unknown command %q (see keywardctl help)\n", args[0])
		return 2
	}
}
