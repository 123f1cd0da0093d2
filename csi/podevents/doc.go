// Package podevents tells a pod, through Kubernetes Events on it, what happened to its secrets
// volume: a swap of changed secrets (SecretsRotated) and a refused publish (SecretsDenied). Recorder
// never delays or fails a publish: events are rate-limited per pod and overall, queued in a bounded
// queue and posted by one goroutine; a repeat of the same event on the same pod patches the earlier
// one's count, as kubectl's event aggregation shows. Messages never carry a value or a token (their
// callers pass ref names, Vault versions and the refusal text kubelet already gets).
//
// It may import the standard library only; the Sink that talks to the apiserver is restsink.
package podevents
