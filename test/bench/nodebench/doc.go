// Command nodebench measures Keyward at scale on one real node: 200 pods (the pause image) with an
// inline secrets.keyward.dev volume, created at once, against the same 200 pods with an emptyDir
// volume instead (the floor), alternating, in the same run. The node is the harness's (containerd,
// runc, kubelet, kube-controller-manager, kube-scheduler, with kubelet's root at /var/lib/kubelet) and
// the broker is the DaemonSet of deploy/overlays/dev, running the image test/images builds from this
// tree, patched only where this machine differs from a cluster (as the real-node e2e does).
//
// For each round and volume kind it prints the time from the first create until all pods are Running
// (and p50/p99 of each pod's create→Running), the time until all are deleted again, the CPU seconds
// per pod of the broker, kubelet, containerd, kube-apiserver, etcd and Vault, the broker's peak RSS
// (VmHWM, reset before each phase), and the apiserver requests per pod (apiserver_request_total
// before and after), in total and by verb and resource, and the broker's own counters (publishes,
// republishes, TokenReviews, Vault logins, from its loopback /metrics); then the ratios
// secret/emptyDir.
//
// It needs root and the node runtime; without them it says why it skips and exits 0 (make bench runs
// it as an optional section).
//
// It may import the harness, test/images, the Keyward packages whose names it uses, Kubernetes'
// client libraries and kustomize; it is not shipped.
package main
