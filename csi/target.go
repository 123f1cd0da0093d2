package csi

import (
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"strings"

	"github.com/keyward/keyward/internal/fault"
)

var (
	podUIDRE  = regexp.MustCompile(`^[0-9a-fA-F][0-9a-fA-F-]{0,63}$`) // UUIDs, and static pods' hashes
	volNameRE = regexp.MustCompile(`^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$`)
)

// CheckTarget checks that target is kubelet's path of a CSI volume,
// <kubeletDir>/pods/<uid>/volumes/kubernetes.io~csi/<name>/mount, absolute and clean, with <uid>
// equal to podUID (any pod when podUID is ""), and that no component below kubeletDir is a symlink
// or anything but a directory (the target itself may not exist yet). Errors wrap fault.ErrInvalid.
// Only a path of this shape is ever mounted on, scrubbed, unmounted or removed.
func CheckTarget(kubeletDir, target, podUID string) error {
	bad := func(format string, args ...any) error {
		return fmt.Errorf("target_path %q: %s: %w", target, fmt.Sprintf(format, args...), fault.ErrInvalid)
	}
	if !filepath.IsAbs(target) || filepath.Clean(target) != target {
		return bad("must be absolute and clean")
	}
	rel, ok := strings.CutPrefix(target, kubeletDir+"/")
	if !ok {
		return bad("not under the kubelet directory %s", kubeletDir)
	}
	parts := strings.Split(rel, "/")
	if len(parts) != 6 || parts[0] != "pods" || parts[2] != "volumes" || parts[3] != "kubernetes.io~csi" || parts[5] != "mount" ||
		!podUIDRE.MatchString(parts[1]) || !volNameRE.MatchString(parts[4]) {
		return bad("want %s/pods/<pod uid>/volumes/kubernetes.io~csi/<volume>/mount", kubeletDir)
	}
	if podUID != "" && parts[1] != podUID {
		return bad("the path is of pod %s, the request claims pod %s", parts[1], podUID)
	}
	p := kubeletDir
	for i, part := range parts {
		p += "/" + part
		st, err := os.Lstat(p)
		if i == len(parts)-1 && os.IsNotExist(err) {
			return nil
		}
		switch {
		case err != nil:
			return bad("%s: %v", p, err)
		case st.Mode()&os.ModeSymlink != 0:
			return bad("%s is a symlink", p)
		case !st.IsDir():
			return bad("%s is not a directory", p)
		}
	}
	return nil
}
