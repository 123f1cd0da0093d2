// Command keyward-broker is the CSI node driver that authenticates each pod by its service-account
// token, scopes its secrets by namespace and environment, fetches them from Vault and delivers them
// into a tmpfs volume, never to a Kubernetes Secret or to disk.
//
// It only wires packages together (flags, configuration, signals): it may import any Keyward package,
// client-go's rest, metadata and clientcmd, vault/api through broker/vault, and zap.
package main
