# Keyward's Vault policy for dynamic secrets, templated per namespace: PKI certificates and database
# credentials tied to a pod's lifetime. The broker issues them with the pod's kubernetes-auth Vault
# token (vault.mode: pod), so Vault re-checks each one: a token may use only the Vault roles named
# after its own namespace, "<namespace>_<name>" (for namespace payments: payments_web, payments_ro),
# and revoke, list and look up only their leases. The namespace is the one Vault's kubernetes auth
# method recorded for the login (the entity alias's service_account_namespace metadata).
#
# The separator is an underscore because a namespace name (a DNS label) cannot hold one: the glob
# "payments_*" never reaches the roles of namespace "payments-eu" ("payments-eu_web"), as
# "payments-*" would.
#
# deploy/vault/setup.sh writes one copy per environment, substituting the pki and database mounts and
# the accessor of the kubernetes auth method (known only once it is enabled); the tests write it the
# same way (test/harness's Vault.PutDynamicPolicy).

# Issue a certificate (Vault makes the key) or sign a CSR (the pod's key never leaves it).
path "@PKI_MOUNT@/issue/{{identity.entity.aliases.@AUTH_ACCESSOR@.metadata.service_account_namespace}}_*" {
  capabilities = ["update"]
}
path "@PKI_MOUNT@/sign/{{identity.entity.aliases.@AUTH_ACCESSOR@.metadata.service_account_namespace}}_*" {
  capabilities = ["update"]
}

# Database credentials: a new login role per read, dropped when its lease is revoked or expires.
path "@DB_MOUNT@/creds/{{identity.entity.aliases.@AUTH_ACCESSOR@.metadata.service_account_namespace}}_*" {
  capabilities = ["read"]
}

# Revoke one lease by its ID in the path (sys/leases/revoke/<lease id>; a lease ID starts with the
# path that created it): only leases of the namespace's own roles.
path "sys/leases/revoke/@PKI_MOUNT@/issue/{{identity.entity.aliases.@AUTH_ACCESSOR@.metadata.service_account_namespace}}_*" {
  capabilities = ["update"]
}
path "sys/leases/revoke/@PKI_MOUNT@/sign/{{identity.entity.aliases.@AUTH_ACCESSOR@.metadata.service_account_namespace}}_*" {
  capabilities = ["update"]
}
path "sys/leases/revoke/@DB_MOUNT@/creds/{{identity.entity.aliases.@AUTH_ACCESSOR@.metadata.service_account_namespace}}_*" {
  capabilities = ["update"]
}

# Renew one lease by its ID in the path (sys/leases/renew/<lease id>): only leases of the namespace's
# own roles. Vault's default policy also allows sys/leases/renew for any lease ID in the body; the
# broker uses the path form, so a role with token_no_default_policy still renews.
path "sys/leases/renew/@DB_MOUNT@/creds/{{identity.entity.aliases.@AUTH_ACCESSOR@.metadata.service_account_namespace}}_*" {
  capabilities = ["update"]
}

# List the lease IDs under the namespace's own roles (LIST sys/leases/lookup/<mount>/issue/<role>/):
# how the broker finds a volume's leases again after a restart. sys/leases/lookup/* is a sudo path.
path "sys/leases/lookup/@PKI_MOUNT@/issue/{{identity.entity.aliases.@AUTH_ACCESSOR@.metadata.service_account_namespace}}_*" {
  capabilities = ["list", "sudo"]
}
path "sys/leases/lookup/@PKI_MOUNT@/sign/{{identity.entity.aliases.@AUTH_ACCESSOR@.metadata.service_account_namespace}}_*" {
  capabilities = ["list", "sudo"]
}
path "sys/leases/lookup/@DB_MOUNT@/creds/{{identity.entity.aliases.@AUTH_ACCESSOR@.metadata.service_account_namespace}}_*" {
  capabilities = ["list", "sudo"]
}

# Look up a lease's expiry by its ID (in the request body, so this path cannot be scoped: it tells
# the expiry of any lease whose ID the caller already knows, nothing else).
path "sys/leases/lookup" {
  capabilities = ["update"]
}
