package hardening

import (
	"fmt"

	"golang.org/x/sys/unix"
)

// DisableCoreDumps makes the process non-dumpable (PR_SET_DUMPABLE 0: no core file, and no ptrace
// attach or /proc/<pid>/mem read by a process of the same user without CAP_SYS_PTRACE) and sets
// RLIMIT_CORE to 0, so a crash never writes the process's memory — secrets, tokens, PINs — to disk.
func DisableCoreDumps() error {
	if err := unix.Setrlimit(unix.RLIMIT_CORE, &unix.Rlimit{Cur: 0, Max: 0}); err != nil {
		return fmt.Errorf("setrlimit RLIMIT_CORE 0: %w", err)
	}
	if err := unix.Prctl(unix.PR_SET_DUMPABLE, 0, 0, 0, 0); err != nil {
		return fmt.Errorf("prctl PR_SET_DUMPABLE 0: %w", err)
	}
	return nil
}

// Dumpable reports the process's PR_GET_DUMPABLE and RLIMIT_CORE, for tests and start-up logs.
func Dumpable() (dumpable bool, coreLimit uint64, err error) {
	d, err := unix.PrctlRetInt(unix.PR_GET_DUMPABLE, 0, 0, 0, 0)
	if err != nil {
		return false, 0, err
	}
	var rl unix.Rlimit
	if err := unix.Getrlimit(unix.RLIMIT_CORE, &rl); err != nil {
		return false, 0, err
	}
	return d != 0, rl.Cur, nil
}
