// Package vault implements broker.SecretSource over github.com/hashicorp/vault/api: the client
// (client.go), bounded KV v2 reads with values decoded in place (kv.go), login as the pod with Vault's
// kubernetes auth method, token caching, renewal and revocation (tokens.go), and the one mapping of
// Vault's answers onto internal/fault (errors.go).
//
// It may import the standard library, package broker, internal/fault, vault/api, zap and
// golang.org/x/sync.
package vault
