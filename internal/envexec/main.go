package envexec

import (
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"

	"golang.org/x/sys/unix"
)

// Main is keyward-env: it returns the exit code only when it does not exec the program (a refusal,
// the install mode, or supervision's end).
func Main(args []string, version string, stdout, stderr io.Writer) int {
	if len(args) > 0 && args[0] == "install" {
		if err := Install(args[1:], stdout); err != nil {
			fmt.Fprintf(stderr, "keyward-env: install: %v\n", err)
			return ExitCode(err)
		}
		return ExitOK
	}
	o, err := Parse(args, stderr)
	if err != nil {
		fmt.Fprintf(stderr, "keyward-env: %v\n", err)
		return ExitCode(err)
	}
	if o.Version {
		fmt.Fprintf(stdout, "keyward-env %s\n", version)
		return ExitOK
	}
	snap, err := Load(&o)
	if err != nil {
		fmt.Fprintf(stderr, "keyward-env: refusing to start %s: %v\n", o.Command[0], err)
		return ExitCode(err)
	}
	path, err := LookPath(o.Command[0])
	if err != nil {
		fmt.Fprintf(stderr, "keyward-env: %v\n", err)
		return ExitCode(err)
	}
	if o.OnChange == ModeNone {
		err = Exec(path, o.Command, snap.Environ(os.Environ()))
		fmt.Fprintf(stderr, "keyward-env: %v\n", err)
		return ExitCode(err)
	}
	return Supervise(&o, path, snap, stderr)
}

// Install copies the running executable (/proc/self/exe, or argv[0] without /proc) to DIR/keyward-env, mode 0555, through a temporary file
// renamed into place: the image has no shell and no cp, so its init container runs
// `keyward-env install DIR` into an emptyDir it shares with the application's container.
func Install(args []string, stdout io.Writer) error {
	if len(args) != 1 || args[0] == "" {
		return fail(ErrUsage, "want exactly one argument: the directory to install keyward-env into")
	}
	dir := args[0]
	src, err := os.Open("/proc/self/exe")
	if err != nil {
		// No /proc (a chroot, a sandbox without it): the path it was started by, as execvp found it.
		p, lerr := exec.LookPath(os.Args[0])
		if lerr != nil {
			return fail(ErrInstall, "opening the running executable: %v (and argv[0]: %v)", err, lerr)
		}
		if src, err = os.Open(p); err != nil {
			return fail(ErrInstall, "opening the running executable: %v", err)
		}
	}
	defer src.Close()
	b := make([]byte, 8)
	rand.Read(b)
	tmp := filepath.Join(dir, ".keyward-env."+hex.EncodeToString(b))
	dst, err := os.OpenFile(tmp, os.O_WRONLY|os.O_CREATE|os.O_EXCL|unix.O_NOFOLLOW, 0o700)
	if err != nil {
		return fail(ErrInstall, "%v", err)
	}
	n, err := io.Copy(dst, src)
	if err == nil {
		err = dst.Chmod(0o555)
	}
	if err == nil {
		err = dst.Sync()
	}
	if cerr := dst.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Rename(tmp, filepath.Join(dir, "keyward-env"))
	}
	if err != nil {
		os.Remove(tmp)
		return fail(ErrInstall, "%v", err)
	}
	fmt.Fprintf(stdout, "keyward-env: installed %s (%d bytes, mode 0555)\n", filepath.Join(dir, "keyward-env"), n)
	return nil
}
