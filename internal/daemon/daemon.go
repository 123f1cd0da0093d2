package daemon

import (
	"flag"
	"fmt"
	"io"
	"os"

	"go.uber.org/zap"

	"github.com/keyward/keyward/internal/logging"
	"github.com/keyward/keyward/internal/version"
)

// Spec is what a daemon's main needs.
type Spec struct {
	Name string
	// Bind registers the daemon's flags; LogLevel points at the flag the logger's level comes from.
	Bind     func(*flag.FlagSet)
	LogLevel *string
	// Validate checks the parsed options (bad usage: exit 2).
	Validate func() error
	// Run runs the daemon until it stops (an error: exit 1).
	Run func(*zap.Logger) error
}

// Main runs s with the process's arguments and exits.
func Main(s Spec) { os.Exit(run(s, os.Args[1:], os.Stdout, os.Stderr)) }

func run(s Spec, args []string, stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet(s.Name, flag.ContinueOnError)
	fs.SetOutput(stderr)
	s.Bind(fs)
	showVersion := fs.Bool("version", false, "print the version and exit")
	if err := fs.Parse(args); err != nil {
		return 2
	}
	if *showVersion {
		fmt.Fprintln(stdout, s.Name, version.Version)
		return 0
	}
	if err := s.Validate(); err != nil {
		fmt.Fprintf(stderr, "%s: %v\n", s.Name, err)
		return 2
	}
	log, err := logging.New(*s.LogLevel)
	if err != nil {
		fmt.Fprintf(stderr, "%s: %v\n", s.Name, err)
		return 2
	}
	defer log.Sync()
	if err := s.Run(log); err != nil {
		log.Error(s.Name+" stopped", zap.Error(err))
		return 1
	}
	return 0
}
