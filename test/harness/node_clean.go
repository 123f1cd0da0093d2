package harness

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// nodeHostPaths are the places outside its directory where a node's kubelet, containerd, runc and CNI
// plugins write (or could: some are configured away in kubeletConfig and containerdConfig, and are
// watched all the same). Anything new under them when a node stops is removed, and reported by
// Leftovers if it is still there.
var nodeHostPaths = []string{
	"/var/lib/kubelet", // pki/ and device-plugins/ whatever --root-dir says
	"/var/log/pods", "/var/log/containers",
	"/usr/libexec/kubernetes",
	"/etc/kubernetes",
	"/var/lib/cni", // libcni's result cache
	"/etc/cni", "/opt/cni",
	"/run/containerd", // the shims' sockets (/run/containerd/s)
	// Not /var/lib/containerd and /opt/containerd: containerdConfig keeps containerd's root and its opt
	// plugin in the node's directory, and another package's containerd (test/images) may create
	// /opt/containerd while a node runs.
	"/run/netns",
	"/run/runc",
}

// hostSnapshot is what a node may change on the host, as it was before the node started.
type hostSnapshot struct {
	dir       string
	paths     map[string]bool
	cgroups   map[string]bool
	links     map[string]bool
	routes    map[string]bool
	ipForward string
}

func snapshotHost(dir string) (hostSnapshot, error) {
	s := hostSnapshot{dir: dir, paths: hostPaths(), cgroups: kubepodsCgroups(), links: netLinks()}
	var err error
	if s.routes, err = routes(); err != nil {
		return s, err
	}
	s.ipForward = readTrim("/proc/sys/net/ipv4/ip_forward")
	return s, nil
}

// hostPaths lists every file and directory under nodeHostPaths.
func hostPaths() map[string]bool {
	out := map[string]bool{}
	for _, root := range nodeHostPaths {
		_ = filepath.WalkDir(root, func(p string, d fs.DirEntry, err error) error {
			if err != nil {
				return nil
			}
			out[p] = true
			return nil
		})
	}
	return out
}

// kubepodsCgroups lists the kubepods cgroup directories (the top of kubelet's QoS tree) of every cgroup
// v1 controller, and of the v2 hierarchy.
func kubepodsCgroups() map[string]bool {
	out := map[string]bool{}
	for _, pattern := range []string{"/sys/fs/cgroup/*/kubepods*", "/sys/fs/cgroup/kubepods*"} {
		m, _ := filepath.Glob(pattern)
		for _, p := range m {
			if st, err := os.Stat(p); err == nil && st.IsDir() {
				out[p] = true
			}
		}
	}
	return out
}

// netLinks lists the host's network interfaces.
func netLinks() map[string]bool {
	out := map[string]bool{}
	entries, _ := os.ReadDir("/sys/class/net")
	for _, e := range entries {
		out[e.Name()] = true
	}
	return out
}

func routes() (map[string]bool, error) {
	out, err := run(context.Background(), "ip", "route", "show")
	if err != nil {
		return nil, err
	}
	m := map[string]bool{}
	for _, l := range strings.Split(out, "\n") {
		if l = strings.TrimSpace(l); l != "" {
			m[l] = true
		}
	}
	return m, nil
}

func readTrim(p string) string {
	b, _ := os.ReadFile(p)
	return strings.TrimSpace(string(b))
}

// blackholeRoutes adds (or deletes) host routes that drop packets for the pods' and the services'
// addresses: nothing on the host routes those out of the machine (there is no kube-proxy, and the pods'
// bridge has no address on the host).
func (n *Node) blackholeRoutes(add bool) error {
	verb := "replace" // a route left by a node that was killed is taken over
	if !add {
		verb = "del"
	}
	var errs []error
	for _, cidr := range []string{nodePodCIDR, nodeServiceCIDR} {
		if _, err := run(context.Background(), "ip", "route", verb, "blackhole", cidr); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// sweep removes what the node left on the host once its processes are stopped: processes (shims,
// containers), mounts under the node's directory and nodeHostPaths, the pods' cgroups, new files under
// nodeHostPaths, the bridge and any veth left, the routes, and ip_forward as it was.
func (n *Node) sweep() {
	for range 3 {
		if killNodeProcesses(n.Dir) == 0 {
			break
		}
		time.Sleep(200 * time.Millisecond)
	}
	for _, mp := range nodeMounts(n.Dir) {
		_ = syscall.Unmount(mp, syscall.MNT_DETACH)
	}
	for cg := range kubepodsCgroups() {
		if !n.before.cgroups[cg] {
			removeCgroup(cg)
		}
	}
	var fresh []string
	for p := range hostPaths() {
		if !n.before.paths[p] {
			fresh = append(fresh, p)
		}
	}
	sort.Strings(fresh) // a directory before what is under it
	for i, p := range fresh {
		if i > 0 && strings.HasPrefix(p, fresh[i-1]+"/") {
			fresh[i] = fresh[i-1] // removed with its parent
			continue
		}
		_ = os.RemoveAll(p)
	}
	for l := range netLinks() {
		if !n.before.links[l] && (l == nodeBridge || strings.HasPrefix(l, "veth")) {
			_, _ = run(context.Background(), "ip", "link", "delete", l)
		}
	}
	_ = n.blackholeRoutes(false)
	if now := readTrim("/proc/sys/net/ipv4/ip_forward"); n.before.ipForward != "" && now != n.before.ipForward {
		_ = os.WriteFile("/proc/sys/net/ipv4/ip_forward", []byte(n.before.ipForward), 0o644)
	}
}

// nodeProcesses are the processes a node left: those whose command line names its directory
// (containerd's shims name its socket) and those in a kubepods cgroup (the pods' processes).
func nodeProcesses(dir string) []int {
	var pids []int
	entries, _ := os.ReadDir("/proc")
	self := os.Getpid()
	for _, e := range entries {
		pid, err := strconv.Atoi(e.Name())
		if err != nil || pid == self {
			continue
		}
		cmdline, _ := os.ReadFile(filepath.Join("/proc", e.Name(), "cmdline"))
		cgroup, _ := os.ReadFile(filepath.Join("/proc", e.Name(), "cgroup"))
		if strings.Contains(string(cmdline), dir+"/") || strings.Contains(string(cgroup), "/kubepods") {
			pids = append(pids, pid)
		}
	}
	return pids
}

func killNodeProcesses(dir string) int {
	pids := nodeProcesses(dir)
	for _, pid := range pids {
		_ = syscall.Kill(pid, syscall.SIGKILL)
	}
	return len(pids)
}

// nodeMounts are the mount points under dir and nodeHostPaths, deepest first.
func nodeMounts(dir string) []string {
	f, err := os.Open("/proc/self/mountinfo")
	if err != nil {
		return nil
	}
	defer f.Close()
	roots := append([]string{dir}, nodeHostPaths...)
	var out []string
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		fields := strings.Fields(sc.Text())
		if len(fields) < 5 {
			continue
		}
		mp := strings.ReplaceAll(fields[4], `\040`, " ")
		for _, r := range roots {
			if mp == r || strings.HasPrefix(mp, r+"/") {
				out = append(out, mp)
				break
			}
		}
	}
	sort.Slice(out, func(i, j int) bool { return len(out[i]) > len(out[j]) })
	return slices.Compact(out)
}

// removeCgroup kills what is left in a cgroup tree and removes its directories, deepest first.
func removeCgroup(root string) {
	var dirs []string
	_ = filepath.WalkDir(root, func(p string, d fs.DirEntry, err error) error {
		if err == nil && d.IsDir() {
			dirs = append(dirs, p)
		}
		return nil
	})
	for i := len(dirs) - 1; i >= 0; i-- {
		for try := 0; try < 20; try++ {
			if b, err := os.ReadFile(filepath.Join(dirs[i], "cgroup.procs")); err == nil {
				for _, f := range strings.Fields(string(b)) {
					if pid, err := strconv.Atoi(f); err == nil {
						_ = syscall.Kill(pid, syscall.SIGKILL)
					}
				}
			}
			if err := syscall.Rmdir(dirs[i]); err == nil || errors.Is(err, syscall.ENOENT) {
				break
			}
			time.Sleep(50 * time.Millisecond)
		}
	}
}

// Leftovers lists what a node left on the host that was not there before it started (empty after a
// clean Stop): files under nodeHostPaths, mounts under its directory and those paths, kubepods cgroups,
// its bridge and veth interfaces, routes, processes, a changed ip_forward, and iptables chains of
// kubelet's.
func (n *Node) Leftovers() []string {
	var out []string
	for p := range hostPaths() {
		if !n.before.paths[p] {
			out = append(out, "file "+p)
		}
	}
	for _, mp := range nodeMounts(n.Dir) {
		out = append(out, "mount "+mp)
	}
	for cg := range kubepodsCgroups() {
		if !n.before.cgroups[cg] {
			out = append(out, "cgroup "+cg)
		}
	}
	for l := range netLinks() {
		if !n.before.links[l] && (l == nodeBridge || strings.HasPrefix(l, "veth")) {
			out = append(out, "network interface "+l)
		}
	}
	if rs, err := routes(); err != nil {
		out = append(out, "routes unreadable: "+err.Error())
	} else {
		for r := range rs {
			if !n.before.routes[r] {
				out = append(out, "route "+r)
			}
		}
	}
	for _, pid := range nodeProcesses(n.Dir) {
		cmd, _ := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
		out = append(out, fmt.Sprintf("process %d %s", pid, strings.ReplaceAll(string(cmd), "\x00", " ")))
	}
	if now := readTrim("/proc/sys/net/ipv4/ip_forward"); now != n.before.ipForward {
		out = append(out, fmt.Sprintf("net.ipv4.ip_forward %s, was %s", now, n.before.ipForward))
	}
	if rules, err := run(context.Background(), "iptables-save"); err == nil {
		for _, l := range strings.Split(rules, "\n") {
			if strings.Contains(l, "KUBE-") {
				out = append(out, "iptables "+l)
			}
		}
	}
	sort.Strings(out)
	return out
}
