// Command brokerbench measures broker.Service per request (authenticate + authorize + fetch 5
// secrets) against real kube-apiserver and Vault, cold (no cached review or Vault token) and warm,
// next to the same work done directly in the same run: one TokenReview, one Vault kubernetes login
// and five KV v2 reads with vault/api. The three alternate request by request.
//
// It may import the harness, the Keyward packages it measures and their clients; it is not shipped.
package main
