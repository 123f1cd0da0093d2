#!/usr/bin/env bash
# Example Vault layout matching Keyward's scoping: one KV v2 mount, one prefix per environment
# (<mount>/<environment>/<namespace>/... and <mount>/<environment>/shared/...), and per environment a
# kubernetes-auth role bound to that environment's namespaces and the broker's audience, with the
# policy in namespace-read.hcl: templated on the namespace Vault saw at login, so a token reads only
# its own namespace's subtree of its environment and the environment's shared subtree. Vault then
# re-checks every read the broker makes on behalf of a pod (vault.mode: pod), and a pod that logs in
# to Vault directly with a token of its own gets no more than its namespace's subtree.
#   VAULT_ADDR=... VAULT_TOKEN=... KUBE_HOST=https://... KUBE_CA=/path/ca.crt REVIEWER_JWT=... ./setup.sh
# Optional: PROD_NAMESPACES, DEV_NAMESPACES (comma-separated; default payments-prod, payments-dev),
# KV_MOUNT (kv), AUTH_MOUNT (kubernetes), EXAMPLE_SECRETS=0 to write no example secrets.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
kv=${KV_MOUNT:-kv}
auth=${AUTH_MOUNT:-kubernetes}
declare -A namespaces=([prod]="${PROD_NAMESPACES:-payments-prod}" [dev]="${DEV_NAMESPACES:-payments-dev}")
vault secrets enable -path="$kv" -version=2 kv
vault auth enable -path="$auth" kubernetes
vault write "auth/$auth/config" kubernetes_host="$KUBE_HOST" kubernetes_ca_cert=@"$KUBE_CA" \
  token_reviewer_jwt="$REVIEWER_JWT" disable_local_ca_jwt=true
# The policy names the namespace by the auth method's accessor, which exists once the method is enabled.
accessor=$(vault read -field=accessor "sys/auth/$auth")
for env in prod dev; do
  sed -e "s|@KV_MOUNT@|$kv|g" -e "s|@ENV_PREFIX@|$env|g" -e "s|@AUTH_ACCESSOR@|$accessor|g" \
    "$here/namespace-read.hcl" | vault policy write "$env-read" -
  # Bind each role to the namespaces labelled with its environment (keep in sync with the labels:
  # Vault does not read them). Any service account of those namespaces may log in: which service
  # account gets which ref is the broker's policy. Keep Vault's default policy on the roles' tokens
  # (no token_no_default_policy): it allows auth/token/revoke-self, which keyward-broker uses to
  # revoke a pod's token when its volumes go.
  vault write "auth/$auth/role/$env" bound_service_account_names='*' \
    bound_service_account_namespaces="${namespaces[$env]}" audience=keyward token_policies="$env-read" token_ttl=10m
done
if [ "${EXAMPLE_SECRETS:-1}" = 1 ]; then
  vault kv put "$kv/prod/payments-prod/db" password=change-me
  vault kv put "$kv/dev/payments-dev/db" password=change-me
fi
