package envexec

import (
	"errors"
	"os"
	"os/exec"
	"strings"

	"golang.org/x/sys/unix"
)

// LookPath resolves the program as execvp would: a name with a '/' as it is, otherwise the first
// executable regular file of that name in PATH's directories (keyward-env's own PATH, never one a
// secret sets). A relative PATH entry is refused (os/exec's ErrDot).
func LookPath(program string) (string, error) {
	p, err := exec.LookPath(program)
	if err == nil {
		return p, nil
	}
	if strings.Contains(program, "/") {
		if st, serr := os.Stat(program); serr == nil && !st.IsDir() {
			return "", fail(ErrNotExecutable, "%s is not executable: %v", program, errors.Unwrap(err))
		}
		return "", fail(ErrNotFound, "%s: no such file", program)
	}
	return "", fail(ErrNotFound, "%s not found on PATH=%s", program, os.Getenv("PATH"))
}

// execErr classifies a failed execve.
func execErr(path string, err error) error {
	switch {
	case errors.Is(err, unix.ENOENT):
		return fail(ErrNotFound, "executing %s: %v", path, err)
	case errors.Is(err, unix.E2BIG):
		return fail(ErrValue, "executing %s: the environment and arguments are too large for execve (%v)", path, err)
	default:
		return fail(ErrNotExecutable, "executing %s: %v", path, err)
	}
}

// Exec replaces keyward-env with the program: same PID, the environment env, no shell. It returns
// only on failure.
func Exec(path string, argv, env []string) error {
	return execErr(path, unix.Exec(path, argv, env))
}
