// Package policy implements broker.Authorizer: the namespace x environment scoping of the policy file
// (KV refs by path, dynamic refs by Vault role of the environment's PKI and database mounts), deny by
// default, with hot reload that keeps the last good policy; and the policy's issue budgets, the token
// buckets per pod and per namespace that bound how fast dynamic credentials are issued.
//
// It may import the standard library, package broker, internal/audit, internal/fault, zap, a YAML
// decoder, and client-go's metadata client and informer cache (never the typed clientset, whose
// scheme of every API group costs memory).
package policy
