package envexec

import (
	"flag"
	"fmt"
	"io"
	"strconv"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// Mapping is one --env NAME=FILE: the variable NAME gets the content of FILE in the volume.
type Mapping struct {
	Name string
	File string
}

// Mode is what supervision does when the volume changes.
type Mode int

const (
	// ModeNone execs the application: keyward-env is gone, nothing watches the volume.
	ModeNone Mode = iota
	// ModeRestart stops the application and starts it again with the new environment.
	ModeRestart
	// ModeSignal sends a signal to the application (which reads the volume's files itself).
	ModeSignal
)

// Defaults of the supervision flags.
const (
	DefaultMinInterval = 30 * time.Second
	DefaultJitter      = 30 * time.Second
	DefaultStopTimeout = 10 * time.Second
)

// Options are keyward-env's flags and the command it runs.
type Options struct {
	From      string
	Env       []Mapping
	AllPrefix string // "" unless --env-all-prefix is given
	OnChange  Mode
	Signal    syscall.Signal // ModeSignal's signal
	// MinInterval is the least time between two actions (restarts or signals), counted from the
	// application's start; Jitter adds a random delay in [0, Jitter) to each, so that the pods of a
	// fleet, which see a rotation within a minute of each other, do not act at once.
	MinInterval time.Duration
	Jitter      time.Duration
	// StopTimeout is how long a restart waits after SIGTERM before SIGKILL.
	StopTimeout time.Duration
	Version     bool
	Command     []string
}

type envFlag struct{ m *[]Mapping }

func (e envFlag) String() string { return "" }

func (e envFlag) Set(s string) error {
	name, file, ok := strings.Cut(s, "=")
	if !ok {
		return fmt.Errorf("want NAME=FILE, got %q", s)
	}
	*e.m = append(*e.m, Mapping{Name: name, File: file})
	return nil
}

const usageText = `usage: keyward-env --from DIR [--env NAME=FILE]... [--env-all-prefix PREFIX]
                   [--on-change none|restart|signal:SIG] [--min-interval D] [--jitter D]
                   [--stop-timeout D] -- PROGRAM [ARG]...
       keyward-env install DIR

Reads the files of the Keyward secrets volume mounted at DIR (a read-only tmpfs), sets them as
environment variables and runs PROGRAM (looked up on PATH) in its place. "install DIR" copies this
binary to DIR/keyward-env (mode 0555), for an init container sharing an emptyDir with the app.

Exit codes before PROGRAM runs: 2 usage, 3 not a read-only Keyward volume, 4 file missing or
unreadable, 5 a file cannot be a variable, 125 keyward-env failed, 126 PROGRAM not executable,
127 PROGRAM not found. After: PROGRAM's status (128+N if signal N killed it).

Flags:
`

// Parse parses keyward-env's arguments. Errors wrap ErrUsage.
func Parse(args []string, stderr io.Writer) (Options, error) {
	o := Options{MinInterval: DefaultMinInterval, Jitter: DefaultJitter, StopTimeout: DefaultStopTimeout}
	fs := flag.NewFlagSet("keyward-env", flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.Usage = func() {
		fmt.Fprint(stderr, usageText)
		fs.PrintDefaults()
	}
	fs.StringVar(&o.From, "from", "", "the secrets volume's mount path (required): a read-only tmpfs")
	fs.Var(envFlag{&o.Env}, "env", "NAME=FILE: the variable NAME holds the volume's file FILE (repeatable)")
	prefix := fs.String("env-all-prefix", "", "every file of the volume as PREFIX + its name upper-cased, '-' and '.' as '_'")
	onChange := fs.String("on-change", "none", "none (exec), restart, or signal:SIG (such as signal:HUP): supervise and act when the volume changes")
	fs.DurationVar(&o.MinInterval, "min-interval", o.MinInterval, "the least time between two restarts or signals, from the app's start")
	fs.DurationVar(&o.Jitter, "jitter", o.Jitter, "a random delay in [0, jitter) added before each restart or signal")
	fs.DurationVar(&o.StopTimeout, "stop-timeout", o.StopTimeout, "a restart sends SIGTERM, then SIGKILL after this long")
	fs.BoolVar(&o.Version, "version", false, "print the version and exit")
	if err := fs.Parse(args); err != nil {
		return o, fail(ErrUsage, "%v", err)
	}
	if o.Version {
		return o, nil
	}
	o.Command = fs.Args()
	fs.Visit(func(f *flag.Flag) {
		if f.Name == "env-all-prefix" {
			o.AllPrefix = *prefix
			if o.AllPrefix == "" {
				o.AllPrefix = "\x00" // set but empty: refused below
			}
		}
	})
	if err := o.parseMode(*onChange); err != nil {
		return o, err
	}
	return o, o.Validate()
}

func (o *Options) parseMode(s string) error {
	switch {
	case s == "none":
		o.OnChange = ModeNone
	case s == "restart":
		o.OnChange = ModeRestart
	case strings.HasPrefix(s, "signal:"):
		sig, ok := signalByName(strings.TrimPrefix(s, "signal:"))
		if !ok {
			return fail(ErrUsage, "--on-change %s: unknown signal (use a name such as HUP, USR1, USR2, TERM)", s)
		}
		o.OnChange, o.Signal = ModeSignal, sig
	default:
		return fail(ErrUsage, "--on-change %q: want none, restart or signal:SIG", s)
	}
	return nil
}

// signalByName accepts "HUP", "SIGHUP" and "1"; not SIGKILL, SIGSTOP or SIGCHLD.
func signalByName(s string) (syscall.Signal, bool) {
	var sig syscall.Signal
	if n, err := strconv.Atoi(s); err == nil {
		if sig = syscall.Signal(n); n <= 0 || unix.SignalName(sig) == "" {
			return 0, false
		}
	} else {
		name := strings.ToUpper(s)
		if !strings.HasPrefix(name, "SIG") {
			name = "SIG" + name
		}
		if sig = unix.SignalNum(name); sig == 0 {
			return 0, false
		}
	}
	switch sig {
	case unix.SIGKILL, unix.SIGSTOP, unix.SIGCHLD:
		return 0, false
	}
	return sig, true
}

// Validate checks the options without touching the volume. Errors wrap ErrUsage.
func (o *Options) Validate() error {
	if o.From == "" {
		return fail(ErrUsage, "--from DIR is required: the secrets volume's mount path")
	}
	if len(o.Command) == 0 {
		return fail(ErrUsage, "no program to run: give it after --")
	}
	if len(o.Env) == 0 && o.AllPrefix == "" {
		return fail(ErrUsage, "nothing to set: give --env NAME=FILE or --env-all-prefix PREFIX")
	}
	seen := map[string]bool{}
	for _, m := range o.Env {
		if !ValidName(m.Name) {
			return fail(ErrUsage, "--env %s=%s: %q is not a valid environment variable name ([A-Za-z_][A-Za-z0-9_]*)", m.Name, m.File, m.Name)
		}
		if seen[m.Name] {
			return fail(ErrUsage, "--env %s is given twice", m.Name)
		}
		seen[m.Name] = true
		if !validFile(m.File) {
			return fail(ErrUsage, "--env %s=%s: %q cannot be a file of the volume (one path component, not starting with \"..\")", m.Name, m.File, m.File)
		}
	}
	if o.AllPrefix != "" && !ValidName(o.AllPrefix) {
		return fail(ErrUsage, "--env-all-prefix %q: the prefix must itself be a valid variable name ([A-Za-z_][A-Za-z0-9_]*), so that no file can name PATH or LD_PRELOAD", strings.Trim(o.AllPrefix, "\x00"))
	}
	if o.MinInterval < 0 || o.Jitter < 0 || o.StopTimeout < 0 {
		return fail(ErrUsage, "--min-interval, --jitter and --stop-timeout must not be negative")
	}
	return nil
}

// ValidName reports whether name is a portable environment variable name: [A-Za-z_][A-Za-z0-9_]*
// (what a shell can reference; POSIX's portable set).
func ValidName(name string) bool {
	if name == "" {
		return false
	}
	for i := 0; i < len(name); i++ {
		c := name[i]
		switch {
		case c == '_', 'A' <= c && c <= 'Z', 'a' <= c && c <= 'z':
		case '0' <= c && c <= '9' && i > 0:
		default:
			return false
		}
	}
	return true
}

// validFile reports whether name can be a file the broker delivers (csi/tmpfs.ValidName).
func validFile(name string) bool {
	return name != "" && name != "." && len(name) <= 255 && !strings.ContainsAny(name, "/\x00") && !strings.HasPrefix(name, "..")
}

// PrefixedName is the variable --env-all-prefix gives file: prefix + the name with ASCII letters
// upper-cased and '-' and '.' turned into '_'. Any other character has no sensible spelling, so it
// is refused (ok false) rather than guessed.
func PrefixedName(prefix, file string) (string, bool) {
	var b strings.Builder
	b.WriteString(prefix)
	for i := 0; i < len(file); i++ {
		c := file[i]
		switch {
		case 'a' <= c && c <= 'z':
			b.WriteByte(c - 'a' + 'A')
		case 'A' <= c && c <= 'Z', '0' <= c && c <= '9', c == '_':
			b.WriteByte(c)
		case c == '-', c == '.':
			b.WriteByte('_')
		default:
			return "", false
		}
	}
	name := b.String()
	return name, ValidName(name)
}
