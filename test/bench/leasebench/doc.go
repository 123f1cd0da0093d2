// Command leasebench counts the dynamic credentials (PKI certificates and database credentials)
// issued for 1 000 republishes of the same pods' volumes, against real kube-apiserver, Vault (PKI and
// database engines) and PostgreSQL: Keyward's broker (leases held per volume, reused outside their
// renewal window) next to a naive contender that issues on every publish, as vault-csi-provider does
// for certificates and the Secrets Store CSI Driver's providers do for database credentials. The two
// alternate publish by publish in the same run; it prints the leases each issued, Vault's own count
// of live leases, and the time per republish.
//
// It may import the harness, the Keyward packages it measures and their clients; it is not shipped.
package main
