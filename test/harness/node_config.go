package harness

import (
	"archive/tar"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
)

// containerdConfig is the node's containerd configuration: everything containerd and its runc keep
// lives under dir, and the CRI plugin uses the harness's CNI configuration and the imported pause image.
// restrict_oom_score_adj: root here lacks CAP_SYS_RESOURCE, and runc fails to start a sandbox ("can't
// get final child's PID from pipe: EOF") when it may not lower oom_score_adj.
// Each of insecure (HOST:PORT) is its own mirror at http://HOST:PORT (containerd 1.6's CRI registry
// mirrors: an endpoint's scheme decides plain HTTP), so pods pull from a registry on loopback.
func containerdConfig(dir, socket, pauseRef string, insecure []string) string {
	c := filepath.Join(dir, "containerd")
	var mirrors strings.Builder
	for _, host := range insecure {
		fmt.Fprintf(&mirrors, "  [plugins.\"io.containerd.grpc.v1.cri\".registry.mirrors.%q]\n    endpoint = [%q]\n", host, "http://"+host)
	}
	return fmt.Sprintf(`version = 2
root = %[1]q
state = %[2]q
disabled_plugins = ["io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper"]

[grpc]
  address = %[3]q

[plugins."io.containerd.internal.v1.opt"]
  path = %[4]q

[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = %[5]q
  restrict_oom_score_adj = true
  netns_mounts_under_state_dir = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        Root = %[6]q
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = %[7]q
    conf_dir = %[8]q
    max_conf_num = 1
%[9]s`, filepath.Join(c, "root"), filepath.Join(c, "state"), socket, filepath.Join(c, "opt"), pauseRef,
		filepath.Join(c, "runc"), cniBinDir, filepath.Join(dir, "cni", "net.d"), mirrors.String())
}

// cniConfig is the pods' network: Debian's bridge plugin on a bridge with no address (isGateway false),
// no masquerade and no routes, with host-local addresses kept under dir. A pod's network namespace has
// its loopback and an address on the bridge: it can reach the other pods of the node and nothing else
// (no default route), and nothing on the host forwards for it (ip_forward is left as it was).
func cniConfig(dir string) string {
	conf := map[string]any{
		"cniVersion": "0.4.0",
		"name":       cniNetworkName,
		"plugins": []map[string]any{{
			"type": "bridge", "bridge": nodeBridge, "isGateway": false, "isDefaultGateway": false,
			"ipMasq": false, "hairpinMode": false,
			"ipam": map[string]any{
				"type":    "host-local",
				"ranges":  [][]map[string]string{{{"subnet": nodePodCIDR}}},
				"dataDir": filepath.Join(dir, "cni", "ipam"),
			},
		}},
	}
	b, err := json.MarshalIndent(conf, "", "  ")
	if err != nil {
		panic(err) // a literal map of strings and bools always marshals
	}
	return string(b)
}

// kubeletConfig is the KubeletConfiguration of the node:
//   - failCgroupV1: false, cgroupDriver cgroupfs: this machine has cgroup v1 and no systemd;
//   - failSwapOn false, enforceNodeAllocatable [], image GC at 100/99 (never: images are imported,
//     and only a test serving a registry (InsecureRegistries) could pull them again), eviction only
//     when nearly out of memory or disk (a shared test machine);
//   - readOnlyPort 0, serving on loopback only, client certificates of the apiserver's CA only (the
//     apiserver's for logs and exec), no anonymous access;
//   - makeIPTablesUtilChains false: kubelet would otherwise add chains and rules to the host's iptables;
//   - podLogsDir and volumePluginDir inside the node's directory (their defaults are /var/log/pods and
//     /usr/libexec/kubernetes); resolvConf empty: pods get no name servers.
func kubeletConfig(n *Node, port, healthzPort, maxPods int) string {
	return fmt.Sprintf(`apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
failCgroupV1: false
cgroupDriver: cgroupfs
failSwapOn: false
containerRuntimeEndpoint: unix://%s
enforceNodeAllocatable: []
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
evictionHard:
  memory.available: 100Mi
  nodefs.available: 1%%
  nodefs.inodesFree: 1%%
  imagefs.available: 1%%
readOnlyPort: 0
address: 127.0.0.1
port: %d
healthzBindAddress: 127.0.0.1
healthzPort: %d
authentication:
  anonymous: {enabled: false}
  webhook: {enabled: false}
  x509: {clientCAFile: %q}
authorization: {mode: AlwaysAllow}
makeIPTablesUtilChains: false
staticPodPath: %q
podLogsDir: %q
volumePluginDir: %q
resolvConf: ""
maxPods: %d
serializeImagePulls: false
`, n.ContainerdSocket, port, healthzPort, n.Kube.CAFile, n.StaticPodDir, n.PodLogDir,
		filepath.Join(n.Dir, "volume-plugins"), maxPods)
}

// imageRef reads the reference an image tarball is tagged with: the first RepoTags entry of a
// docker-archive's manifest.json, or the io.containerd.image.name (else a full
// org.opencontainers.image.ref.name) annotation of an OCI layout's index.json.
func imageRef(tarball string) (string, error) {
	f, err := os.Open(tarball)
	if err != nil {
		return "", fmt.Errorf("image tarball: %w", err)
	}
	defer f.Close()
	tr := tar.NewReader(f)
	for {
		h, err := tr.Next()
		if errors.Is(err, io.EOF) {
			return "", fmt.Errorf("image tarball %s: no manifest.json or index.json naming the image", tarball)
		}
		if err != nil {
			return "", fmt.Errorf("image tarball %s: %w", tarball, err)
		}
		switch strings.TrimPrefix(h.Name, "./") {
		case "manifest.json":
			var m []struct{ RepoTags []string }
			if err := json.NewDecoder(tr).Decode(&m); err != nil {
				return "", fmt.Errorf("%s: manifest.json: %w", tarball, err)
			}
			if len(m) > 0 && len(m[0].RepoTags) > 0 {
				return m[0].RepoTags[0], nil
			}
		case "index.json":
			var idx struct {
				Manifests []struct{ Annotations map[string]string }
			}
			if err := json.NewDecoder(tr).Decode(&idx); err != nil {
				return "", fmt.Errorf("%s: index.json: %w", tarball, err)
			}
			for _, m := range idx.Manifests {
				if r := m.Annotations["io.containerd.image.name"]; r != "" {
					return r, nil
				}
				if r := m.Annotations["org.opencontainers.image.ref.name"]; strings.ContainsAny(r, "/:") {
					return r, nil
				}
			}
		}
	}
}

// run runs a command and returns its output; a failure carries the output.
func run(ctx context.Context, name string, args ...string) (string, error) {
	out, err := exec.CommandContext(ctx, name, args...).CombinedOutput()
	if err != nil {
		return string(out), fmt.Errorf("%s %s: %w: %s", filepath.Base(name), strings.Join(args, " "), err, strings.TrimSpace(string(out)))
	}
	return string(out), nil
}
