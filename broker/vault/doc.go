// Package vault implements broker.SecretSource over github.com/hashicorp/vault/api: the client
// (client.go), bounded KV v2 reads with values decoded in place (kv.go), login with Vault's kubernetes
// auth method with a pod's JWT, one token per service account per node shared by its pods, renewal
// and revocation when the last of them goes (tokens.go), and the one mapping of
// Vault's answers onto internal/fault (errors.go).
//
// It may import the standard library, package broker, internal/fault, vault/api, zap and
// golang.org/x/sync.
package vault
