// Package tokenreview implements broker.Authenticator with the Kubernetes TokenReview API (audience
// checks, pod-bound tokens only, identity cross-checks and a short-lived cache of positive reviews),
// and broker.PodChecker (PodLookup), which confirms that a pod whose token is rejected is really gone.
//
// It may import the standard library, package broker, internal/fault and client-go (with its api and
// apimachinery types).
package tokenreview
