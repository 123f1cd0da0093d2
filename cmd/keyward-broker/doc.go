// Command keyward-broker is the CSI node driver that authenticates each pod by its service-account
// token, scopes its secrets by namespace and environment, fetches them from Vault and delivers them
// into a tmpfs volume, never to a Kubernetes Secret or to disk.
//
// It only wires packages together (flags, configuration, signals, health, and the metrics the
// packages report through their hooks): it may import any Keyward package, client-go's rest, metadata
// and clientcmd, the TokenReview type, vault/api through broker/vault, Prometheus and zap.
package main
