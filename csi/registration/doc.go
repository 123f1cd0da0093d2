// Package registration registers keyward-broker with kubelet as a CSI plugin through kubelet's
// plugin-registration API (k8s.io/kubelet's pluginregistration v1), which the node-driver-registrar
// sidecar otherwise provides: a Registration gRPC service on a socket in kubelet's plugin
// registration directory, telling kubelet the driver's name and CSI endpoint, and keeping what
// kubelet answered for health and metrics. A thin adapter: no decision of the broker is made here.
//
// It may import the standard library, internal/grpcserver, gRPC, zap and k8s.io/kubelet's
// pluginregistration API package (nothing else of k8s.io/kubelet).
package registration
