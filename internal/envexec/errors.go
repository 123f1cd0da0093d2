package envexec

import (
	"errors"
	"fmt"
)

// Exit codes of keyward-env when it refuses to start or cannot run the application. Once the
// application runs, keyward-env is the application (plain exec) or exits with its status (the
// application's exit code, or 128+N when a signal N killed it).
const (
	ExitOK = 0
	// ExitInstall: the install mode could not copy the binary.
	ExitInstall = 1
	// ExitUsage: bad flags, no command, a NAME that is not a valid environment variable name, a FILE
	// that cannot be a volume's file name.
	ExitUsage = 2
	// ExitVolume: --from is not a read-only tmpfs mount, or holds no "..data" payload (not a Keyward
	// volume, or its files were withdrawn).
	ExitVolume = 3
	// ExitMissing: a file named by --env is not in the volume, or cannot be read.
	ExitMissing = 4
	// ExitValue: a file cannot become a variable: a NUL byte, more than MaxValue bytes, a file name
	// that --env-all-prefix cannot turn into a valid name, two files giving the same name, or an
	// environment too large for execve.
	ExitValue = 5
	// ExitInternal: keyward-env itself failed (inotify, fork) in supervision mode.
	ExitInternal = 125
	// ExitNotExecutable: the program was found but could not be executed.
	ExitNotExecutable = 126
	// ExitNotFound: the program was not found (on PATH, or at the path given).
	ExitNotFound = 127
)

// The failure classes; every error of the package wraps one of them.
var (
	ErrUsage         = errors.New("usage")
	ErrVolume        = errors.New("not a read-only Keyward volume")
	ErrMissing       = errors.New("file missing")
	ErrValue         = errors.New("value cannot be an environment variable")
	ErrInternal      = errors.New("internal")
	ErrNotExecutable = errors.New("not executable")
	ErrNotFound      = errors.New("program not found")
	ErrInstall       = errors.New("install")
)

// failure is an error of a class whose message says what is wrong and what to do: it names
// files, variables and paths, never a value.
type failure struct {
	class error
	msg   string
}

func (f *failure) Error() string { return f.msg }
func (f *failure) Unwrap() error { return f.class }

func fail(class error, format string, a ...any) error {
	return &failure{class: class, msg: fmt.Sprintf(format, a...)}
}

// ExitCode is the exit code for err's class.
func ExitCode(err error) int {
	switch {
	case err == nil:
		return ExitOK
	case errors.Is(err, ErrUsage):
		return ExitUsage
	case errors.Is(err, ErrVolume):
		return ExitVolume
	case errors.Is(err, ErrMissing):
		return ExitMissing
	case errors.Is(err, ErrValue):
		return ExitValue
	case errors.Is(err, ErrNotExecutable):
		return ExitNotExecutable
	case errors.Is(err, ErrNotFound):
		return ExitNotFound
	case errors.Is(err, ErrInstall):
		return ExitInstall
	default:
		return ExitInternal
	}
}
