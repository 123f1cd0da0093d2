// Package vault implements broker.SecretSource over github.com/hashicorp/vault/api: KV v2 reads, login
// as the pod with Vault's kubernetes auth method, token caching and renewal, and error mapping onto
// the broker's sentinel errors.
//
// It may import the standard library, package broker and vault/api.
package vault
