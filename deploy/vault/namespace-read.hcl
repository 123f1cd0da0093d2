# Keyward's Vault policy for one environment, templated per namespace. A token from a login with the
# environment's kubernetes-auth role (the broker's, made with a pod's token in vault.mode: pod, or one a
# pod made itself) reads only its own namespace's subtree of the environment and the environment's
# shared subtree: never another namespace's secrets. The namespace is the one Vault's kubernetes auth
# method recorded for the login (the entity alias's service_account_namespace metadata).
#
# deploy/vault/setup.sh writes one copy per environment, substituting the KV v2 mount, the
# environment's prefix and the accessor of the kubernetes auth method (known only once it is
# enabled); the tests write it the same way (test/harness's Vault.GrantEnvironment).
path "@KV_MOUNT@/data/@ENV_PREFIX@/{{identity.entity.aliases.@AUTH_ACCESSOR@.metadata.service_account_namespace}}/*" {
  capabilities = ["read"]
}

# Every namespace of the environment may read its shared subtree; which pods get which shared refs
# is the broker's policy (grants), not Vault's.
path "@KV_MOUNT@/data/@ENV_PREFIX@/shared/*" {
  capabilities = ["read"]
}
