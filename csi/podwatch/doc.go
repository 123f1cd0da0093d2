// Package podwatch keeps the pods of one node in a metadata-only informer (client-go's metadata
// client, field selector spec.nodeName=<node>): which pod UIDs live on the node, and a callback when
// one is deleted. The provider API uses it to hold a pod's service-account Vault token while the pod
// lives instead of logging in and revoking at every Mount. It needs pods list and watch, nothing else,
// and receives no pod specs.
//
// It may import the standard library, k8s.io/apimachinery and k8s.io/client-go.
package podwatch
