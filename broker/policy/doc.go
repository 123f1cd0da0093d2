// Package policy implements broker.Authorizer: the namespace x environment scoping of the policy file,
// deny by default, with hot reload that keeps the last good policy.
//
// It may import the standard library, package broker, internal/audit, internal/fault, zap, a YAML
// decoder, and client-go's metadata client and informer cache (never the typed clientset, whose
// scheme of every API group costs memory).
package policy
